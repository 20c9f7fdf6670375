//! Shared pieces of the workspace's benches, demos and end-to-end tests.
//!
//! The product lives in `datapath` (library) and the two binaries; this small crate
//! holds what its benches, demos and tests share: the data they write
//! ([`workload`]) and a blocking NBD client to write it with ([`nbd_client`]). The
//! networked demo (`src/bin/demo.rs`) is its binary.

pub mod nbd_client;
pub mod workload;
