//! Shared pieces of the workspace's benches, demos and end-to-end tests.
//!
//! The product lives in `datapath` (library) and the two binaries; this small crate
//! holds what its benches, demos and tests share: the data they write
//! ([`workload`]), a blocking NBD client to write it with ([`nbd_client`]), and the
//! machinery that runs the two servers from a program ([`harness`]). Its binaries are
//! the networked demo (`src/bin/demo.rs`) and the throughput benchmark
//! (`src/bin/bench.rs`).

pub mod harness;
pub mod nbd_client;
pub mod workload;
