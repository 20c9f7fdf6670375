//! Shared pieces of the workspace's benches, examples and end-to-end tests.
//!
//! The product lives in `datapath` (library) and the two binaries; this small crate
//! only holds what its benches, demo and tests share: the data they write.

pub mod workload;
