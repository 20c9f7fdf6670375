//! `process-server` as a library: the binary (`main.rs`) parses the command line and
//! calls [`nbd_server::serve`]; tests drive the same code in-process.
//!
//! | module           | owns                                                              |
//! |------------------|-------------------------------------------------------------------|
//! | [`bufpool`]      | a bounded pool of byte buffers (the shipper's frames)              |
//! | [`config`]       | the TOML config file: listen address, groups, disks               |
//! | [`changed`]      | `changed`: a disk's unacknowledged writes as a change list (offline) |
//! | [`capture`]      | the [`capture::Capture`] hook every write goes through            |
//! | [`nbd_server`]   | the NBD server: handshake, transmission, write-through to disks   |
//! | [`control`]      | the control socket: `tag` (with freeze/thaw hooks) and `status`   |
//! | [`tracking`]     | the capture hook to each group's change tracker, the cutter, the state lock |
//! | [`resync`]       | reading dirty blocks back into the spool: resync and initial sync |
//! | [`hashes`]       | hash requests to the master target (protocol 3), fetched ahead    |
//! | [`verify`]       | the online verify: the disk against the master target's hashes    |
//! | [`shipper`]      | shipping sealed epochs to the master target; acks, resume         |
//! | [`ship_state`]   | a group's durable shipping state: the last acknowledged point     |
//! | [`metrics`]      | live counters, throughput, state names, the `/metrics` endpoint   |
//! | [`tls`]          | the connection to the master target: TLS 1.3 or plain TCP         |

pub mod bufpool;
pub mod capture;
pub mod changed;
pub mod config;
pub mod control;
pub mod hashes;
pub mod metrics;
pub mod nbd_server;
pub mod resync;
pub mod ship_state;
pub mod shipper;
pub mod tls;
pub mod tracking;
pub mod verify;
