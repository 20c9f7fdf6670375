//! # datapath: formats and algorithms of the block-replication data path
//!
//! No sockets and no runtime: everything here is a format or an algorithm, testable
//! on its own. The binaries (`process-server`, `master-target`) wire these pieces to
//! the network.
//!
//! ## Map
//!
//! | module       | owns                                                                  |
//! |--------------|-----------------------------------------------------------------------|
//! | [`storage`]  | the file I/O trait durability depends on; real and crash-simulating   |
//! | [`extent`]   | sector-aligned byte ranges; the epoch map of one epoch's latest data  |
//! | [`bitmap`]   | the persistent dirty bitmap (4 KiB blocks) and its hot-region log     |
//! | [`frame`]    | the frame codec shared by wire and journal                            |
//! | [`spool`]    | the process server's bounded on-disk queue of captured writes         |
//! | [`journal`]  | the master target's per-group log of frames and recovery points; each sealed segment's index (`journal::segindex`) |
//! | [`apply`]    | applying extents to a replica, with an undo log to go back            |
//! | [`pointview`] | a recovery point as a readable disk: the replica with the journal laid over it |
//! | [`retention`] | the retention fold: which point, bounded steps, intent, pins         |
//! | [`failback`] | a group's failback to a point: journal through it onto every replica, undo, progress, commit |
//! | [`hashing`]  | blake3 of 64 KiB blocks for resync and verify; the diff of two hash lists, the differing parts of a read range |
//! | [`tracker`]  | a group's change tracking: bitmaps + spool + epochs, cuts, acks; resync passes, hash-diff passes; an initial sync from change lists |
//! | [`changelist`] | which blocks of a disk may have changed since a point: the file a reprotect carries between the sites |
//! | [`nbd`]      | the NBD wire codec write capture speaks: handshake, requests, replies |
//! | [`metrics`]  | Prometheus text exposition, the HTTP exchange of a scrape, rates      |
//!
//! ## Order of writes, syncs and renames
//!
//! Each durable step happens strictly after the one above it in its row; "ack" means
//! the step is visible to the other side.
//!
//! | what                    | order                                                                        |
//! |-------------------------|------------------------------------------------------------------------------|
//! | a captured write        | hot-region log synced (only if its region was cold) -> bit set in bitmap -> write to backing disk (FUA: sync) -> spool append -> reply |
//! | a FLUSH                 | backing disk synced -> spool synced -> reply                                 |
//! | a disk's first protection | (from change lists: every list read through and checked) -> `initial-sync` file replaced -> bitmap file with its dirty bits (all, or the lists' union) synced -> hot-region log synced -> directory synced |
//! | hot region evicted      | its bitmap bytes flushed (msync) -> hot-region log without it synced         |
//! | a frame at the target   | crc + blake3 verified -> journal append -> journal segment synced (one sync per batch) -> ack |
//! | a new journal segment   | the old one committed -> its index replaced ([`storage::write_atomic`]) -> file created, header written and synced -> directory synced -> first frame |
//! | spool release           | target ack received -> segments wholly below it removed -> directory synced  |
//! | dirty bit cleared       | target ack covers the block's last write -> bit cleared (lazily flushed)     |
//! | hash-diff resync extent | every earlier record acked (at the pass's start) -> target's hashes fetched -> range lock -> read -> differing parts spooled -> matching blocks' bits cleared (unless a write to them is unacked) -> range unlocked |
//! | retention fold          | intent replaced ([`storage::write_atomic`]) -> frames applied to replicas -> replicas synced -> journal `drop_through` (state replaced, segments removed, directory synced) |
//! | apply with undo         | old contents appended to undo log (ranges it holds already skipped; nothing new: no append, no sync; writeback started per record) -> undo log synced -> replica written -> replica synced |
//! | state file replaced     | [`storage::write_atomic`]: temp written -> temp synced -> rename -> directory synced |
//! | failback start          | undo logs created (synced, directory synced) -> failback state `applying` at the base replaced, before the first overwrite |
//! | failback batch          | frames read (crc) and decoded (blake3) ahead, on threads -> per disk: old contents saved (row above) -> (the batch before checked) replica written -> applied extents re-read and checked, replica synced -> failback state (`applied_seq`) replaced; the next batch is saved while this one is written, checked, synced and recorded, and written while it is synced and recorded, never before its check |
//! | change of point         | failback state `applying Q` + `REVERT` replaced -> every undo log replayed (replica synced) -> undo logs reset -> batches |
//! | failback commit         | (with change lists: journal frames after the point indexed -> one list per disk replaced, [`storage::write_atomic_with`]) -> failback state `committed` replaced -> undo logs removed -> directory synced -> journal files removed -> journal directory synced |

pub mod apply;
pub mod bitmap;
pub mod changelist;
pub mod extent;
pub mod failback;
pub mod frame;
pub mod hashing;
pub mod journal;
mod le;
pub mod metrics;
pub mod nbd;
pub mod pointview;
pub mod retention;
pub mod spool;
pub mod storage;
#[cfg(test)]
mod testutil;
pub mod tracker;

/// Whether `s` is a valid disk or group id: `[a-z0-9][a-z0-9_-]{0,63}`.
pub fn valid_id(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b[1..]
            .iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
}

#[cfg(test)]
mod tests {
    /// Proves the id syntax accepts what DESIGN.md allows and nothing else.
    #[test]
    fn ids() {
        assert!(super::valid_id("disk-0_a"));
        assert!(super::valid_id(&"a".repeat(64)));
        assert!(!super::valid_id(&"a".repeat(65)));
        assert!(!super::valid_id(""));
        assert!(!super::valid_id("-a"));
        assert!(!super::valid_id("A"));
        assert!(!super::valid_id("a/b"));
    }
}
