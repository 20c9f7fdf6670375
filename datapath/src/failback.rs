//! Failback: applying a group's journal through one recovery point to every replica of
//! the group, with an undo log per disk so that the point can be changed until commit,
//! and with progress recorded durably so that a rerun after a crash finishes exactly.
//!
//! The master target keeps each replica at the group's *base* (the journal's
//! [`Journal::base_seq`]) and every frame after it in the journal. Failing back to point
//! P applies the frames `(base, P]` to the replicas; every disk of the group goes to the
//! same point. The binaries choose the point ([`resolve`]), stop replication of the
//! group, and call [`Failback::run`]; [`Failback::commit`] makes it final.
//!
//! # State machine
//!
//! The state lives in `dir` (the master target's `data_dir/<group>/failback/`), in one
//! small file replaced with [`storage::write_atomic`]. No file means *none*: the group
//! replicates and the replicas are at the base.
//!
//! ```text
//!   none --run(P)--> applying P --(last batch)--> applied P --commit--> committed P
//!                      ^   |                        |
//!                      |   +--crash: run(P) resumes after `applied_seq`
//!                      +------ run(Q): revert (replay undo), then apply Q
//! ```
//!
//! | phase       | replicas hold                                                     | a rerun of `run(P)` | `run(Q)`, Q != P | `commit` |
//! |-------------|-------------------------------------------------------------------|---------------------|------------------|----------|
//! | none        | the base                                                          | starts              | starts           | refused ([`FailbackError::NotFailedBack`]) |
//! | applying P  | base + frames through `applied_seq`, maybe parts of later frames through P (or, with `revert`, anything the undo logs can take back) | resumes (or reverts first) | reverts, applies Q | refused ([`FailbackError::Unfinished`]) |
//! | applied P   | exactly the disks at P (synced, re-read and checked)              | nothing to do ([`Outcome::already`]) | reverts, applies Q | (writes the change lists) drops undo logs and journal |
//! | committed P | exactly the disks at P; no undo log, no journal                   | refused ([`FailbackError::Committed`]) | refused | finishes a removal a crash interrupted |
//!
//! **Why resuming is exact.** Frames through `applied_seq` were applied and the
//! replicas synced before `applied_seq` was recorded. A crash after that can only have
//! written bytes of later frames (through P); applying the frames after `applied_seq`
//! again, in order, overwrites every such byte with what the frames say, so the result
//! is base + frames through P whatever the crash left. The undo logs stay exact too:
//! a range is saved once, before its first overwrite ([`UndoLog::save`] skips what a
//! record holds already), and replay goes newest record first, so the contents from
//! before the first overwrite win. A start records `applying P` before the first
//! overwrite: a rerun that finds no state takes the undo logs for leftovers of a start
//! that wrote nothing, and makes new ones.
//!
//! **Why a change of point records `revert` first.** Once an undo log replay starts, the
//! replicas are neither at the base nor at the old point; `applied_seq` no longer
//! describes them. The state is therefore rewritten (new point, `applied_seq` = base,
//! `revert` set) *before* the first replay; a rerun that finds `revert` replays the undo
//! logs again (a replay only reads the log, and the undo logs hold, for every range
//! overwritten since the base, its contents from before the first overwrite, so it
//! always ends at the base). The first progress
//! record after the apply resumed clears `revert`.
//!
//! # The pipeline
//!
//! A run keeps both cores busy and the disk writing while the CPU works: the stages
//! below run on threads of their own and hand batches on through channels without
//! capacity (module `pipeline`):
//!
//! - **read ahead** (module `ahead`): a reader thread reads the frames in order (crc),
//!   up to [`DECODE_THREADS_MAX`] decoder threads (one per core) decompress them and
//!   check every extent's blake3; the saver gets them back in journal order.
//! - **saver** (the calling thread): collects a batch and saves its old contents in the
//!   undo logs ([`UndoLog::save`]: one sync per log with something new to save, the
//!   disk writing each record while the next is read).
//! - **applier**: writes a saved batch ([`crate::apply::write_extents`]) once the
//!   checker has re-read the batch before.
//! - **checker**: re-reads and checks the batch's extents (from the page cache, before
//!   or while the batch is synced: the bytes are the same).
//! - **committer**: syncs every replica the checked batches wrote, then records the
//!   progress (`applied_seq`) through the newest of them; one sync per replica and one
//!   record cover every batch checked meanwhile.
//!
//! So batch k+1 is saved (its undo records synced) while batch k is written, checked,
//! synced and recorded, and written while batch k is synced and recorded. All of it is
//! safe:
//!
//! - every overwrite still comes after the undo record that covers it is durable (the
//!   saver hands a batch on only after its save);
//! - a range of batch k+1 that batch k writes was saved by batch k or earlier, so the
//!   save of k+1 never records it first (it may record it again, with the cap of
//!   [`crate::apply::SAVED_RANGES_MAX`], but replay ends at the oldest record): what
//!   it reads while k is written does not matter;
//! - a batch is recorded only after it is checked and every replica it wrote synced;
//!   a state that says `applied_seq` = j while bytes of later batches are on the
//!   replicas (synced or not) is the ordinary crash case above (frames after
//!   `applied_seq` applied again, every overwrite undoable).
//!
//! What never happens is an overwrite by batch k+1 before the checker has re-read batch
//! k (the check would find the next batch's bytes). [`Failback::with_overlap`]`(false)`
//! runs the same stages one batch at a time, each batch recorded before the next is
//! saved: the durable steps then come in one fixed order, for tests that crash every
//! one of them. [`Outcome::stages`] tells where a run's time went.
//!
//! **Memory.** Decoded frames are counted from the read until their batch is checked,
//! at most [`DECODED_BYTES_MAX`]: the batches being saved, written and checked, and
//! the frames decoded ahead; the reader waits beyond it.
//!
//! **Speed.** `cargo run --release --example failback_apply -- --mib 1024` journals 1
//! GiB of realistic 64 KiB..1 MiB writes (1 MiB zstd -2 frames, as the shipper makes
//! them) over a 2 GiB replica and times [`Failback::run`]. On this project's 2-vCPU VM
//! (shared with other work; old and new code interleaved, same data): 619-738 MB/s of
//! replica bytes, median 698 (other sets that day: medians 663-778, at best 854),
//! against 271-327, median 287, when every step waited for the one before (the old
//! run used one core at ~25% and waited on its syncs). Where the time goes now
//! ([`Outcome::stages`]; `perf record` on the example): the run is CPU-bound, 85-88%
//! of both cores, 2.4-2.8 CPU-seconds per GB applied: decoding 42% (zstd 26%, blake3
//! 7%), the saver 18% (old contents read, crc, undo log appended and written back),
//! the applier 13% (pwrite: the copy and ext4's per-buffer work, about half each), the
//! checker 11% (re-read, blake3), the committer 10% (writeback), the reader 6%; the
//! disk writes 1.8 bytes per byte applied (undo 0.8 after "saved once", replica 1.0)
//! and is busy ~80% of the run. The 800 MB/s of the throughput issue is reached on a
//! quiet machine only. Closing the gap needs less CPU per byte, not more overlap: the
//! old contents and the re-read check through a read-only map instead of copies (~8%
//! of the CPU, but an I/O error of the replica would come as SIGBUS: see
//! [`crate::apply`]); an undo log written with `O_DIRECT` in 4 KiB-aligned records (a
//! new format version; no copy and no page-cache writeback for 0.8 bytes per byte,
//! ~10%); or more cores (decoding, the largest part, scales with them).
//!
//! # Files in `dir`
//!
//! | name                 | what                                                        |
//! |----------------------|-------------------------------------------------------------|
//! | `failback.state`     | the state below, replaced with [`storage::write_atomic`]    |
//! | `failback.state.tmp` | a leftover of an interrupted replace; ignored               |
//! | `undo-<disk>.log`    | the [`crate::apply`] undo log of one disk (`BRUL`): one per disk, because an undo log belongs to one target |
//!
//! ## State file `failback.state`, version 1 (all integers little-endian)
//!
//! | offset | size | field           | meaning                                                   |
//! |-------:|-----:|-----------------|-----------------------------------------------------------|
//! | 0      | 8    | `magic`         | `b"BRFBSTAT"` ([`STATE_MAGIC`]); never modify             |
//! | 8      | 2    | `version`       | [`VERSION`]; readers refuse versions they do not know     |
//! | 10     | 1    | `phase`         | 1 applying, 2 applied, 3 committed ([`Phase`])            |
//! | 11     | 1    | `flags`         | bit 0 `REVERT`: replay the undo logs before applying; other bits 0 |
//! | 12     | 1    | `point_kind`    | 0 crash-consistent, 1 app-consistent                      |
//! | 13     | 1    | `group_len`     | length of the group id, 1..=64                            |
//! | 14     | 2    | `disk_count`    | disks of the group (one undo log each), >= 1              |
//! | 16     | 8    | `point_id`      | the point failed back to                                  |
//! | 24     | 8    | `point_seq`     | seq of its point frame in the journal                     |
//! | 32     | 8    | `point_time_unix_ms` | its time                                             |
//! | 40     | 8    | `base_seq`      | the journal's base when the failback started              |
//! | 48     | 8    | `applied_seq`   | frames `(base_seq, applied_seq]` are applied and synced; `base_seq <= applied_seq <= point_seq` |
//! | 56     | 8    | `applied_bytes` | replica bytes written for this point so far (statistics)  |
//! | 64     | 64   | `group`         | the group id, zero-padded (padding must be 0)             |
//! | 128    | 28   | `reserved`      | must be 0                                                 |
//! | 156    | 4    | `crc32`         | crc32 (IEEE) of bytes 0..156                              |
//!
//! # Order of durable steps
//!
//! | operation            | order                                                                 |
//! |----------------------|-----------------------------------------------------------------------|
//! | start (from none)    | `dir` created, its parent synced -> leftover undo logs of an interrupted start removed, `dir` synced -> one undo log per disk created (header synced, `dir` synced) -> state `applying P`, `applied_seq` = base |
//! | one batch            | frames read (crc) and decoded (blake3) -> per disk the batch touches: the old contents its undo log does not hold yet appended, the log synced ([`UndoLog::save`]) -> (the batch before checked) every touched replica written ([`crate::apply::write_extents`]) -> its applied extents re-read and checked, and every touched replica synced -> state `applying P`, `applied_seq` = the batch's last seq |
//! | batches overlapping  | batch k+1's old contents saved and synced may come before any of batch k's replica writes, syncs and state replace; batch k+1's replica writes may come before batch k's replica sync and state replace, never before batch k's check; one replica sync and one state replace may stand for several batches (see "The pipeline") |
//! | end                  | (last batch) -> state `applied P`                                     |
//! | change of point to Q | state `applying Q`, `applied_seq` = base, `REVERT` -> every undo log replayed (newest record first; the replica synced) -> every undo log reset (truncated, synced) -> batches as above (the first clears `REVERT`) |
//! | commit               | (with lists: journal opened, the extent tables of the frames after P indexed, one change list per disk replaced with [`storage::write_atomic_with`]) -> state `committed P` -> every undo log removed -> `dir` synced -> the journal removed ([`journal::remove_all`]) |
//!
//! # Change lists at commit
//!
//! A reprotect after the commit goes the other way: the other site's disks are the
//! point plus every write made there after it. Those writes the journal still holds
//! are the frames after P; once the journal is gone nothing knows them. So
//! [`Failback::commit_with_lists`] first writes, per disk, a [`crate::changelist`] of
//! the extents of every data frame after P's frame (`seq > point_seq`, read from the
//! extent tables alone: [`PointIndex`]), into a directory the caller names (the master
//! target's `data_dir/<group>/changed-since-point/<disk>.chg`). They are durable
//! before the state says committed: a crash before that leaves the journal whole and a
//! rerun writes them again; after it, they are whole, and a rerun (which must not open
//! a half-removed journal) reports the lists it finds for this point.
//!
//! A batch is at most [`BATCH_PLAIN_BYTES_MAX`] of decoded data (plus one frame) or
//! [`BATCH_FRAMES_MAX`] frames, and costs one sync per undo log (with something new to
//! save) and replica it touches plus one state replace.
//!
//! The replicas are opened through [`Storage`] like everything durable here; the
//! binary passes [`crate::storage::RealFs`], the tests [`crate::storage::SimFs`].
//!
//! # Checks
//!
//! Every frame is read back with its crc checked ([`Journal::read`]) and decoded with
//! every extent's blake3 checked ([`crate::frame::Decoder::decode_data`]) before any
//! byte of it is written. Once a batch is written, every applied extent is read back
//! from its replica (before its progress is recorded, which also waits for the sync):
//! where no later extent of the same batch overwrote it, its blake3 must match the
//! frame's; where a later one overwrote part of it, the rest must equal the frame's
//! bytes (zero extents: zeros). A frame naming a disk that is not in the group, or an
//! extent past a replica's end, is refused before its batch writes anything.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::apply::{ApplyError, UndoLog};
use crate::changelist::{self, ChangeListError};
use crate::extent::Extent;
use crate::frame::{FrameError, MAX_PLAIN_BYTES, PointKind};
use crate::journal::{self, FrameEntry, Journal, JournalConfig, JournalError, PointEntry};
use crate::le::{u16_at as le_u16, u32_at as le_u32, u64_at as le_u64};
use crate::pointview::{PointIndex, PointViewError, ViewDisk};
use crate::storage::{self, OpenMode, Storage, StorageFile};

use pipeline::ReplicaRef;

/// Format version of the state file.
pub const VERSION: u16 = 1;
/// State file magic. Never modify: it names the format of every failback state file.
pub const STATE_MAGIC: [u8; 8] = *b"BRFBSTAT";
/// Size of the state file.
pub const STATE_BYTES: usize = 160;
/// Name of the state file in the failback directory.
pub const STATE_FILE: &str = "failback.state";
/// A batch takes no further frame once it holds this many decoded bytes. 16 MiB: in
/// `examples/failback_apply` 8 and 16 MiB batches applied at the same speed and 32 MiB
/// ~10% slower (a longer fill and drain of the pipeline); fewer, larger syncs than 8.
pub const BATCH_PLAIN_BYTES_MAX: u64 = 16 << 20;
/// A batch takes at most this many frames.
pub const BATCH_FRAMES_MAX: usize = 256;
/// Bytes read per step when applied extents are checked.
pub const VERIFY_CHUNK_BYTES: usize = 1 << 20;
/// Most threads decoding frames ahead of the writer (one per core up to this).
pub const DECODE_THREADS_MAX: usize = 4;
/// Plain bytes of decoded frames in memory at once: the batch being saved, the batch
/// being written, the batch being checked, and frames decoded ahead. Three whole
/// batches (each at most [`BATCH_PLAIN_BYTES_MAX`] plus one frame) always fit, so the
/// saver can always finish its batch while the other two stages hold theirs.
pub const DECODED_BYTES_MAX: u64 = 3 * (BATCH_PLAIN_BYTES_MAX + MAX_PLAIN_BYTES as u64);

const FLAG_REVERT: u8 = 1;
const OFF_VERSION: usize = 8;
const OFF_PHASE: usize = 10;
const OFF_FLAGS: usize = 11;
const OFF_KIND: usize = 12;
const OFF_GROUP_LEN: usize = 13;
const OFF_DISKS: usize = 14;
const OFF_POINT_ID: usize = 16;
const OFF_POINT_SEQ: usize = 24;
const OFF_POINT_TIME: usize = 32;
const OFF_BASE_SEQ: usize = 40;
const OFF_APPLIED_SEQ: usize = 48;
const OFF_APPLIED_BYTES: usize = 56;
const OFF_GROUP: usize = 64;
const GROUP_FIELD_BYTES: usize = 64;
const OFF_RESERVED: usize = OFF_GROUP + GROUP_FIELD_BYTES;
const OFF_CRC: usize = STATE_BYTES - 4;

const _: () = assert!(OFF_RESERVED == 128 && OFF_CRC == 156);

/// The name of a disk's undo log in the failback directory.
pub fn undo_file_name(disk: &str) -> String {
    format!("undo-{disk}.log")
}

/// Where a group stands in its failback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The point is being applied (or a crash interrupted that).
    Applying,
    /// Failed back to the point, not committed: the point can still be changed.
    Applied,
    /// Failed back and committed: undo logs and journal dropped; not protected.
    Committed,
}

impl Phase {
    fn to_u8(self) -> u8 {
        match self {
            Phase::Applying => 1,
            Phase::Applied => 2,
            Phase::Committed => 3,
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Phase::Applying,
            2 => Phase::Applied,
            3 => Phase::Committed,
            _ => return None,
        })
    }

    /// A word for people and JSON: `applying`, `failed-back`, `committed`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Applying => "applying",
            Phase::Applied => "failed-back",
            Phase::Committed => "committed",
        }
    }
}

/// The point a failback goes to, as recorded in the state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PointRef {
    pub id: u64,
    /// Seq of its point frame.
    pub seq: u64,
    pub time_unix_ms: u64,
    pub kind: PointKind,
}

impl From<&PointEntry> for PointRef {
    fn from(p: &PointEntry) -> Self {
        Self {
            id: p.record.point_id,
            seq: p.seq,
            time_unix_ms: p.record.time_unix_ms,
            kind: p.record.kind,
        }
    }
}

/// The decoded state file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailbackState {
    pub phase: Phase,
    /// Replay the undo logs before applying (a change of point began).
    pub revert: bool,
    pub point: PointRef,
    /// The journal's base when the failback started.
    pub base_seq: u64,
    /// Frames `(base_seq, applied_seq]` are applied and synced.
    pub applied_seq: u64,
    /// Replica bytes written for this point so far.
    pub applied_bytes: u64,
    /// Disks (and undo logs) of the group.
    pub disks: u16,
}

/// Which point to fail back to. `latest` (ask the process server to cut first) is the
/// binary's business: it ends in [`Choice::Id`] or [`Choice::LatestProcessed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// The newest consistent point in the journal.
    LatestProcessed,
    /// The newest consistent app-consistent point.
    LatestApp,
    /// The point with this id (it must be consistent).
    Id(u64),
    /// The newest consistent point whose time is at or before this (ms since 1970).
    AtOrBefore(u64),
}

impl std::fmt::Display for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Choice::LatestProcessed => write!(f, "the latest processed point"),
            Choice::LatestApp => write!(f, "the latest app-consistent point"),
            Choice::Id(id) => write!(f, "point {id}"),
            Choice::AtOrBefore(t) => write!(f, "the newest point at or before unix ms {t}"),
        }
    }
}

/// Why a failback or commit was refused or failed. Each case names the group, point,
/// disk or file at fault.
#[derive(Debug, Error)]
pub enum FailbackError {
    #[error("failback I/O: {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: invalid {field}: {why}", file.display())]
    BadState {
        file: PathBuf,
        field: &'static str,
        why: String,
    },
    #[error("{}: unsupported version {version} (this build reads version {VERSION})", file.display())]
    UnsupportedVersion { file: PathBuf, version: u16 },
    #[error(
        "group {group:?}: no consistent recovery point for {choice} (the journal holds {points} points, {consistent} consistent)"
    )]
    NoPoint {
        group: String,
        choice: Choice,
        points: usize,
        consistent: usize,
    },
    #[error("group {group:?}: no point {id} in the journal ({range})")]
    UnknownPoint {
        group: String,
        id: u64,
        range: String,
    },
    #[error(
        "group {group:?}: point {id} is inconsistent (cut during a resync) and cannot be failed back to"
    )]
    Inconsistent { group: String, id: u64 },
    #[error(
        "group {group:?} was failed back to point {point} and committed: it is not protected and has no journal to fail back from (reprotect it first)"
    )]
    Committed { group: String, point: u64 },
    #[error("group {group:?} has not failed back: there is nothing to commit")]
    NotFailedBack { group: String },
    #[error(
        "group {group:?}: the failback to point {point} did not finish (a crash or an error interrupted it): run the failback again before committing"
    )]
    Unfinished { group: String, point: u64 },
    #[error(
        "group {group:?}: the failback started at journal base seq {state_base}, the journal's base is now {journal_base}"
    )]
    BaseMoved {
        group: String,
        state_base: u64,
        journal_base: u64,
    },
    #[error("group {group:?}: {why}")]
    Disks { group: String, why: String },
    #[error(
        "group {group:?}: frame seq {seq} names disk {disk:?}, which is not a disk of the group"
    )]
    UnknownDisk {
        group: String,
        seq: u64,
        disk: String,
    },
    #[error("journal: {0}")]
    Journal(#[from] JournalError),
    #[error("failback stopped: {what} ended before its work was done")]
    Stopped { what: &'static str },
    #[error("start thread {name}: {source}")]
    Thread {
        name: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("index the journal frames after the point: {0}")]
    Index(#[source] PointViewError),
    #[error("disk {disk:?}: change list: {source}")]
    ChangeList {
        disk: String,
        #[source]
        source: ChangeListError,
    },
    #[error("journal frame seq {seq}: {source}")]
    Frame {
        seq: u64,
        #[source]
        source: FrameError,
    },
    #[error("disk {disk:?}: {what}: {source}")]
    Apply {
        disk: String,
        what: &'static str,
        #[source]
        source: ApplyError,
    },
    #[error("disk {disk:?}: replica {} at byte {offset} ({len} bytes) does not hold what frame seq {seq} wrote there: {why}", path.display())]
    Verify {
        disk: String,
        path: PathBuf,
        offset: u64,
        len: u64,
        seq: u64,
        why: &'static str,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FailbackError {
    let path = path.to_path_buf();
    move |source| FailbackError::Io { what, path, source }
}

/// Encodes the state file of `group`. The caller guarantees `group` is a valid id.
pub fn encode_state(group: &str, s: &FailbackState) -> [u8; STATE_BYTES] {
    assert!(crate::valid_id(group), "invalid group id {group:?}");
    let mut b = [0u8; STATE_BYTES];
    b[..8].copy_from_slice(&STATE_MAGIC);
    b[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&VERSION.to_le_bytes());
    b[OFF_PHASE] = s.phase.to_u8();
    b[OFF_FLAGS] = if s.revert { FLAG_REVERT } else { 0 };
    b[OFF_KIND] = match s.point.kind {
        PointKind::Crash => 0,
        PointKind::App => 1,
    };
    b[OFF_GROUP_LEN] = group.len() as u8;
    b[OFF_DISKS..OFF_DISKS + 2].copy_from_slice(&s.disks.to_le_bytes());
    for (off, v) in [
        (OFF_POINT_ID, s.point.id),
        (OFF_POINT_SEQ, s.point.seq),
        (OFF_POINT_TIME, s.point.time_unix_ms),
        (OFF_BASE_SEQ, s.base_seq),
        (OFF_APPLIED_SEQ, s.applied_seq),
        (OFF_APPLIED_BYTES, s.applied_bytes),
    ] {
        b[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }
    b[OFF_GROUP..OFF_GROUP + group.len()].copy_from_slice(group.as_bytes());
    let crc = crc32fast::hash(&b[..OFF_CRC]);
    b[OFF_CRC..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes the state file of `group`; the error names the field that is wrong.
pub fn decode_state(b: &[u8], group: &str, file: &Path) -> Result<FailbackState, FailbackError> {
    let bad = |field: &'static str, why: String| FailbackError::BadState {
        file: file.to_path_buf(),
        field,
        why,
    };
    if b.len() != STATE_BYTES {
        return Err(bad(
            "length",
            format!("{} bytes, the state file is {STATE_BYTES}", b.len()),
        ));
    }
    if b[..8] != STATE_MAGIC {
        return Err(bad(
            "magic",
            format!("{:02x?}, expected {:02x?}", &b[..8], STATE_MAGIC),
        ));
    }
    // The version before the crc: a later version may place its crc elsewhere.
    let version = le_u16(b, OFF_VERSION);
    if version != VERSION {
        return Err(FailbackError::UnsupportedVersion {
            file: file.to_path_buf(),
            version,
        });
    }
    let crc = le_u32(b, OFF_CRC);
    let want = crc32fast::hash(&b[..OFF_CRC]);
    if crc != want {
        return Err(bad(
            "crc32",
            format!("{crc:#010x}, the bytes give {want:#010x}"),
        ));
    }
    let phase = Phase::from_u8(b[OFF_PHASE])
        .ok_or_else(|| bad("phase", format!("{} is not 1, 2 or 3", b[OFF_PHASE])))?;
    if b[OFF_FLAGS] & !FLAG_REVERT != 0 {
        return Err(bad(
            "flags",
            format!("{:#04x}: unknown bits set", b[OFF_FLAGS]),
        ));
    }
    let revert = b[OFF_FLAGS] & FLAG_REVERT != 0;
    if revert && phase != Phase::Applying {
        return Err(bad("flags", "REVERT is only valid while applying".into()));
    }
    let kind = match b[OFF_KIND] {
        0 => PointKind::Crash,
        1 => PointKind::App,
        k => return Err(bad("point_kind", format!("{k} is not 0 or 1"))),
    };
    let glen = usize::from(b[OFF_GROUP_LEN]);
    if !(1..=GROUP_FIELD_BYTES).contains(&glen) {
        return Err(bad("group_len", format!("{glen} is not in 1..=64")));
    }
    let gbytes = &b[OFF_GROUP..OFF_GROUP + glen];
    if b[OFF_GROUP + glen..OFF_RESERVED].iter().any(|&x| x != 0) {
        return Err(bad("group", "padding is not zero".into()));
    }
    if gbytes != group.as_bytes() {
        return Err(bad(
            "group",
            format!(
                "{:?}, this is group {group:?}'s directory",
                String::from_utf8_lossy(gbytes)
            ),
        ));
    }
    if b[OFF_RESERVED..OFF_CRC].iter().any(|&x| x != 0) {
        return Err(bad("reserved", "not zero".into()));
    }
    let disks = le_u16(b, OFF_DISKS);
    if disks == 0 {
        return Err(bad("disk_count", "0: a group has at least one disk".into()));
    }
    let s = FailbackState {
        phase,
        revert,
        point: PointRef {
            id: le_u64(b, OFF_POINT_ID),
            seq: le_u64(b, OFF_POINT_SEQ),
            time_unix_ms: le_u64(b, OFF_POINT_TIME),
            kind,
        },
        base_seq: le_u64(b, OFF_BASE_SEQ),
        applied_seq: le_u64(b, OFF_APPLIED_SEQ),
        applied_bytes: le_u64(b, OFF_APPLIED_BYTES),
        disks,
    };
    if s.point.seq <= s.base_seq {
        return Err(bad(
            "point_seq",
            format!("{} is not above base_seq {}", s.point.seq, s.base_seq),
        ));
    }
    if !(s.base_seq..=s.point.seq).contains(&s.applied_seq) {
        return Err(bad(
            "applied_seq",
            format!(
                "{} is not in base_seq..=point_seq ({}..={})",
                s.applied_seq, s.base_seq, s.point.seq
            ),
        ));
    }
    if phase != Phase::Applying && s.applied_seq != s.point.seq {
        return Err(bad(
            "applied_seq",
            format!(
                "{} while {}: every frame through point_seq {} is applied then",
                s.applied_seq,
                phase.name(),
                s.point.seq
            ),
        ));
    }
    Ok(s)
}

/// Reads the failback state of `group` from `dir`; `None` when there is none (the group
/// replicates).
pub fn load_state(
    fs: &dyn Storage,
    dir: &Path,
    group: &str,
) -> Result<Option<FailbackState>, FailbackError> {
    let path = dir.join(STATE_FILE);
    let Some(b) = storage::read_whole(fs, &path).map_err(io_err("read failback state", &path))?
    else {
        return Ok(None);
    };
    decode_state(&b, group, &path).map(Some)
}

/// What [`choose`] needs to know of a point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PointInfo {
    pub id: u64,
    pub time_unix_ms: u64,
    pub kind: PointKind,
    pub consistent: bool,
}

impl From<&PointEntry> for PointInfo {
    fn from(p: &PointEntry) -> Self {
        Self {
            id: p.record.point_id,
            time_unix_ms: p.record.time_unix_ms,
            kind: p.record.kind,
            consistent: p.record.consistent,
        }
    }
}

/// The index in `points` (a group's points, oldest first, ids rising) of the point
/// [`Choice`] names: only consistent points qualify. A caller that knows only a copy of
/// the point list (the server, before it stops replication) checks a choice with it.
pub fn choose(group: &str, points: &[PointInfo], choice: Choice) -> Result<usize, FailbackError> {
    let consistent = points.iter().filter(|p| p.consistent).count();
    let newest = |f: &dyn Fn(&PointInfo) -> bool| points.iter().rposition(|p| p.consistent && f(p));
    let found = match choice {
        Choice::LatestProcessed => newest(&|_| true),
        Choice::LatestApp => newest(&|p| p.kind == PointKind::App),
        // Times are not trusted to rise (clocks step): the newest by seq that is not
        // later than asked.
        Choice::AtOrBefore(t) => newest(&|p| p.time_unix_ms <= t),
        Choice::Id(id) => {
            let Some(i) = points.iter().position(|p| p.id == id) else {
                let range = match (points.first(), points.last()) {
                    (Some(a), Some(b)) => format!("it holds points {}..={}", a.id, b.id),
                    _ => "it holds no point".to_string(),
                };
                return Err(FailbackError::UnknownPoint {
                    group: group.to_string(),
                    id,
                    range,
                });
            };
            if !points[i].consistent {
                return Err(FailbackError::Inconsistent {
                    group: group.to_string(),
                    id,
                });
            }
            Some(i)
        }
    };
    found.ok_or_else(|| FailbackError::NoPoint {
        group: group.to_string(),
        choice,
        points: points.len(),
        consistent,
    })
}

/// The point [`Choice`] names in `j` ([`choose`] over its point index).
pub fn resolve(j: &Journal, choice: Choice) -> Result<PointEntry, FailbackError> {
    let infos: Vec<PointInfo> = j.points().iter().map(PointInfo::from).collect();
    let i = choose(j.group(), &infos, choice)?;
    Ok(j.points()[i].clone())
}

/// One disk of the group: its id (as frames name it), its replica, its size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    pub id: String,
    pub replica: PathBuf,
    pub size_bytes: u64,
}

/// What [`Failback::run`] is doing, for a progress bar.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Undo log records replayed (a change of point, before applying).
    pub reverted_bytes: u64,
    /// Journal bytes (frames as stored) applied so far in this run.
    pub done_bytes: u64,
    /// Journal bytes this run applies in all.
    pub total_bytes: u64,
    /// Frames applied so far in this run, and in all.
    pub done_frames: u64,
    pub total_frames: u64,
}

/// What applying wrote in one run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Journal frames read (data and point frames).
    pub frames: u64,
    /// Extents written.
    pub extents: u64,
    /// Bytes of data written.
    pub data_bytes: u64,
    /// Bytes of zeros written.
    pub zero_bytes: u64,
    /// Replica bytes re-read and checked (before the batch is recorded).
    pub verified_bytes: u64,
    /// Journal bytes (frames as stored) read.
    pub journal_bytes: u64,
}

impl Applied {
    /// Replica bytes written (data and zeros).
    pub fn bytes(&self) -> u64 {
        self.data_bytes + self.zero_bytes
    }
}

/// What [`Failback::run`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub point: PointRef,
    /// The group was already failed back to this point: nothing was done.
    pub already: bool,
    /// The point the replicas were at (or being taken to) before this run, when this
    /// run changed the point.
    pub changed_from: Option<u64>,
    /// A crash interrupted an earlier run to this point: this one went on after this
    /// seq instead of starting over.
    pub resumed_after_seq: Option<u64>,
    /// Replica bytes written back from the undo logs (a change of point, or a rerun
    /// that had to revert).
    pub reverted_bytes: u64,
    pub applied: Applied,
    /// Disks of the group.
    pub disks: usize,
    /// Where the apply's time went, stage by stage.
    pub stages: StageTimes,
}

/// Where the time of [`Failback::run`]'s apply went, per stage of its pipeline (see
/// the module doc, "The pipeline"). The stages run on threads of their own, so their
/// times overlap; the stage whose work and waits fill the run's time is its limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageTimes {
    /// The saver waiting for decoded frames (decoding is behind).
    pub frames_wait: Duration,
    /// The saver saving old contents: reading them, appending and syncing undo logs.
    pub save: Duration,
    /// The saver waiting for the applier to take a saved batch.
    pub hand_over: Duration,
    /// The applier waiting for the check of the batch before.
    pub check_wait: Duration,
    /// The applier writing the replicas.
    pub write: Duration,
    /// The checker re-reading the batches.
    pub check: Duration,
    /// The committer syncing the replicas and replacing the failback state.
    pub commit: Duration,
}

/// What [`Failback::commit`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    pub point: PointRef,
    /// The group was committed already (this call only finished removing leftovers).
    pub already: bool,
    /// Journal files removed.
    pub journal_files_removed: usize,
    /// The change lists of the frames after the point, one per disk
    /// ([`Failback::commit_with_lists`]; when committed already, the ones found).
    pub lists: Vec<WrittenList>,
}

/// Where [`Failback::commit_with_lists`] writes the change lists of the journal frames
/// after the point (see the module doc, "Change lists at commit").
#[derive(Clone, Debug)]
pub struct ListsOut {
    /// The directory of the lists (created if missing): one `<disk>.chg` per disk.
    pub dir: PathBuf,
    /// This master target's node id, named in each list.
    pub node: String,
    /// How to open the journal.
    pub journal_cfg: JournalConfig,
    /// The time the lists carry.
    pub created_unix_ms: u64,
}

/// A change list of one disk, written by a commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenList {
    pub disk: String,
    pub path: PathBuf,
    pub extent_count: u64,
    /// 4 KiB blocks it names.
    pub block_count: u64,
}

/// The failback of one group. See the module doc for the state machine and the order
/// of durable steps.
pub struct Failback {
    fs: Arc<dyn Storage>,
    dir: PathBuf,
    group: String,
    disks: Vec<Disk>,
    /// [`BATCH_PLAIN_BYTES_MAX`] and [`BATCH_FRAMES_MAX`]; smaller in tests.
    batch_plain_bytes_max: u64,
    batch_frames_max: usize,
    /// Save and write a batch while the checker still syncs and records the one
    /// before (the default); off, every step waits for the one before it, in one
    /// fixed order ([`Failback::with_overlap`]).
    overlap: bool,
}

/// A disk and its open replica.
type Replica = (Disk, Box<dyn StorageFile>);

/// An open replica and its undo log.
struct Target {
    disk: Disk,
    file: Box<dyn StorageFile>,
    undo: UndoLog,
}

impl Failback {
    /// The failback of `group`, whose state and undo logs live in `dir`, over `disks`.
    pub fn new(
        fs: Arc<dyn Storage>,
        dir: &Path,
        group: &str,
        disks: Vec<Disk>,
    ) -> Result<Self, FailbackError> {
        let refuse = |why: String| FailbackError::Disks {
            group: group.to_string(),
            why,
        };
        if !crate::valid_id(group) {
            return Err(refuse(format!("{group:?} is not a valid group id")));
        }
        if disks.is_empty() || disks.len() > usize::from(u16::MAX) {
            return Err(refuse(format!(
                "{} disks: a group has 1..=65535",
                disks.len()
            )));
        }
        for (i, d) in disks.iter().enumerate() {
            if !crate::valid_id(&d.id) {
                return Err(refuse(format!("{:?} is not a valid disk id", d.id)));
            }
            if disks[..i].iter().any(|o| o.id == d.id) {
                return Err(refuse(format!("disk {:?} is named twice", d.id)));
            }
        }
        Ok(Self {
            fs,
            dir: dir.to_path_buf(),
            group: group.to_string(),
            disks,
            batch_plain_bytes_max: BATCH_PLAIN_BYTES_MAX,
            batch_frames_max: BATCH_FRAMES_MAX,
            overlap: true,
        })
    }

    /// Smaller batches than [`BATCH_PLAIN_BYTES_MAX`] and [`BATCH_FRAMES_MAX`] (at
    /// least one frame each): more progress records, for tests of a resumed run.
    pub fn with_batch_limits(mut self, plain_bytes_max: u64, frames_max: usize) -> Self {
        self.batch_plain_bytes_max = plain_bytes_max.clamp(1, BATCH_PLAIN_BYTES_MAX);
        self.batch_frames_max = frames_max.clamp(1, BATCH_FRAMES_MAX);
        self
    }

    /// With `false`, a batch's old contents are saved only after the batch before is
    /// synced, checked and recorded: the durable steps of a run then come in one fixed
    /// order (for tests that crash a run at each of them). Slower; the result is the
    /// same.
    pub fn with_overlap(mut self, overlap: bool) -> Self {
        self.overlap = overlap;
        self
    }

    /// The group's failback state; `None`: it replicates (no failback).
    pub fn state(&self) -> Result<Option<FailbackState>, FailbackError> {
        load_state(self.fs.as_ref(), &self.dir, &self.group)
    }

    fn store(&self, s: &FailbackState) -> Result<(), FailbackError> {
        let b = encode_state(&self.group, s);
        storage::write_atomic(self.fs.as_ref(), &self.dir, STATE_FILE, &b)
            .map_err(io_err("replace failback state", &self.dir.join(STATE_FILE)))
    }

    fn undo_path(&self, disk: &str) -> PathBuf {
        self.dir.join(undo_file_name(disk))
    }

    /// Opens every replica and checks its size.
    fn open_replicas(&self) -> Result<Vec<Replica>, FailbackError> {
        let mut out = Vec::with_capacity(self.disks.len());
        for d in &self.disks {
            let f = self
                .fs
                .open(&d.replica, OpenMode::Existing)
                .map_err(io_err("open replica", &d.replica))?;
            let len = f.len().map_err(io_err("size of replica", &d.replica))?;
            if len != d.size_bytes {
                return Err(FailbackError::Disks {
                    group: self.group.clone(),
                    why: format!(
                        "replica {} of disk {:?} is {len} bytes, the disk is {} bytes",
                        d.replica.display(),
                        d.id,
                        d.size_bytes
                    ),
                });
            }
            out.push((d.clone(), f));
        }
        Ok(out)
    }

    /// Applies the journal through `point` to every replica (see the module doc): from
    /// the base, or on from where an interrupted run to the same point stopped, or
    /// after reverting the point the replicas are at. `point` must be a consistent
    /// point of `journal` (see [`resolve`]). `progress` is called after every batch.
    pub fn run(
        &self,
        journal: &Journal,
        point: &PointEntry,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Outcome, FailbackError> {
        let state = self.state()?;
        if let Some(s) = &state
            && s.phase == Phase::Committed
        {
            return Err(FailbackError::Committed {
                group: self.group.clone(),
                point: s.point.id,
            });
        }
        if journal.group() != self.group {
            return Err(FailbackError::Disks {
                group: self.group.clone(),
                why: format!("the journal belongs to group {:?}", journal.group()),
            });
        }
        if !point.record.consistent {
            return Err(FailbackError::Inconsistent {
                group: self.group.clone(),
                id: point.record.point_id,
            });
        }
        if journal.point_by_id(point.record.point_id).map(|p| p.seq) != Some(point.seq)
            || point.seq > journal.durable_seq()
        {
            return Err(FailbackError::UnknownPoint {
                group: self.group.clone(),
                id: point.record.point_id,
                range: "not a durable point of this journal".into(),
            });
        }
        let target = PointRef::from(point);
        let base = journal.base_seq();
        if let Some(s) = &state {
            if s.base_seq != base {
                return Err(FailbackError::BaseMoved {
                    group: self.group.clone(),
                    state_base: s.base_seq,
                    journal_base: base,
                });
            }
            if usize::from(s.disks) != self.disks.len() {
                return Err(FailbackError::Disks {
                    group: self.group.clone(),
                    why: format!(
                        "the failback state names {} disks, the group has {}: the \
                         configuration changed during a failback",
                        s.disks,
                        self.disks.len()
                    ),
                });
            }
        }
        let replicas = self.open_replicas()?;
        let disks = self.disks.len() as u16;
        let mut out = Outcome {
            point: target,
            already: false,
            changed_from: None,
            resumed_after_seq: None,
            reverted_bytes: 0,
            applied: Applied::default(),
            disks: self.disks.len(),
            stages: StageTimes::default(),
        };
        let (mut targets, from_seq, mut applied_bytes) = match state {
            None => (self.start(replicas, target, base)?, base, 0),
            Some(s) => {
                let mut targets = self.open_undo(replicas)?;
                if s.point.id == target.id && !s.revert {
                    if s.phase == Phase::Applied {
                        out.already = true;
                        return Ok(out);
                    }
                    if s.applied_seq > base {
                        out.resumed_after_seq = Some(s.applied_seq);
                    }
                    (targets, s.applied_seq, s.applied_bytes)
                } else {
                    if s.point.id != target.id {
                        out.changed_from = Some(s.point.id);
                    }
                    // Recorded before the first replay: from here the replicas are
                    // anywhere between the base and the old point.
                    self.store(&FailbackState {
                        phase: Phase::Applying,
                        revert: true,
                        point: target,
                        base_seq: base,
                        applied_seq: base,
                        applied_bytes: 0,
                        disks,
                    })?;
                    out.reverted_bytes = self.revert(&mut targets, progress)?;
                    (targets, base, 0)
                }
            }
        };
        self.apply(
            journal,
            target,
            &mut targets,
            from_seq,
            &mut applied_bytes,
            &mut out,
            progress,
        )?;
        self.store(&FailbackState {
            phase: Phase::Applied,
            revert: false,
            point: target,
            base_seq: base,
            applied_seq: target.seq,
            applied_bytes,
            disks,
        })?;
        Ok(out)
    }

    /// From none: the directory, fresh undo logs, and the state `applying` at the base.
    fn start(
        &self,
        replicas: Vec<Replica>,
        target: PointRef,
        base: u64,
    ) -> Result<Vec<Target>, FailbackError> {
        self.fs
            .create_dir_all(&self.dir)
            .map_err(io_err("create failback directory", &self.dir))?;
        if let Some(parent) = self.dir.parent() {
            self.fs
                .sync_dir(parent)
                .map_err(io_err("sync directory", parent))?;
        }
        // Undo logs without a state are leftovers of a start a crash interrupted before
        // its state was written: no replica byte was overwritten yet.
        let names = self
            .fs
            .list_dir(&self.dir)
            .map_err(io_err("list failback directory", &self.dir))?;
        let mut removed = false;
        for n in names
            .iter()
            .filter(|n| n.starts_with("undo-") && n.ends_with(".log"))
        {
            let p = self.dir.join(n);
            self.fs
                .remove_file(&p)
                .map_err(io_err("remove leftover undo log", &p))?;
            removed = true;
        }
        if removed {
            self.fs
                .sync_dir(&self.dir)
                .map_err(io_err("sync failback directory", &self.dir))?;
        }
        let mut targets = Vec::with_capacity(replicas.len());
        for (disk, file) in replicas {
            let path = self.undo_path(&disk.id);
            let undo =
                UndoLog::create(self.fs.clone(), &path, disk.size_bytes).map_err(|source| {
                    FailbackError::Apply {
                        disk: disk.id.clone(),
                        what: "create undo log",
                        source,
                    }
                })?;
            targets.push(Target { disk, file, undo });
        }
        // Before the first overwrite: from here on a rerun must keep the undo logs (a
        // rerun without a state takes them for leftovers of an interrupted start and
        // makes new ones, which would hold the first batch's data as the base).
        self.store(&FailbackState {
            phase: Phase::Applying,
            revert: false,
            point: target,
            base_seq: base,
            applied_seq: base,
            applied_bytes: 0,
            disks: targets.len() as u16,
        })?;
        Ok(targets)
    }

    /// Opens every disk's undo log (its torn tail cut, see [`UndoLog::open`]).
    fn open_undo(&self, replicas: Vec<Replica>) -> Result<Vec<Target>, FailbackError> {
        let mut targets = Vec::with_capacity(replicas.len());
        for (disk, file) in replicas {
            let path = self.undo_path(&disk.id);
            let (undo, _) =
                UndoLog::open(self.fs.clone(), &path).map_err(|source| FailbackError::Apply {
                    disk: disk.id.clone(),
                    what: "open undo log",
                    source,
                })?;
            if undo.target_bytes() != disk.size_bytes {
                return Err(FailbackError::Disks {
                    group: self.group.clone(),
                    why: format!(
                        "undo log {} is for {} bytes, disk {:?} is {} bytes",
                        path.display(),
                        undo.target_bytes(),
                        disk.id,
                        disk.size_bytes
                    ),
                });
            }
            targets.push(Target { disk, file, undo });
        }
        Ok(targets)
    }

    /// Replays every undo log (the replicas go back to the base) and resets it.
    fn revert(
        &self,
        targets: &mut [Target],
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<u64, FailbackError> {
        let mut bytes = 0;
        for t in targets.iter() {
            let st = t
                .undo
                .replay(t.file.as_ref())
                .map_err(|source| FailbackError::Apply {
                    disk: t.disk.id.clone(),
                    what: "replay undo log",
                    source,
                })?;
            bytes += st.target_bytes;
            progress(&Progress {
                reverted_bytes: bytes,
                ..Progress::default()
            });
        }
        // Only once every replica is back at the base (each replay synced its replica).
        for t in targets.iter_mut() {
            t.undo.reset().map_err(|source| FailbackError::Apply {
                disk: t.disk.id.clone(),
                what: "reset undo log",
                source,
            })?;
        }
        Ok(bytes)
    }

    /// Applies frames `(from_seq, target.seq]` in batches (see the module doc, "The
    /// pipeline"): frames decoded ahead on threads ([`ahead`]), each batch's old
    /// contents saved and its extents written here, and a checker thread that syncs the
    /// replicas, re-reads and checks the batch and records the progress.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &self,
        journal: &Journal,
        target: PointRef,
        targets: &mut [Target],
        from_seq: u64,
        applied_bytes: &mut u64,
        out: &mut Outcome,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<(), FailbackError> {
        let mut prog = Progress {
            reverted_bytes: out.reverted_bytes,
            ..Progress::default()
        };
        for seq in from_seq + 1..=target.seq {
            let e = journal.entry(seq).ok_or(JournalError::OutOfRange {
                from: seq,
                to: seq,
                first: journal.base_seq() + 1,
                last: journal.write_seq(),
            })?;
            prog.total_bytes += u64::from(e.len);
            prog.total_frames += 1;
        }
        progress(&prog);
        let frames = journal.read(from_seq + 1, target.seq)?.dropping_cache();
        let (replicas, mut undos): (Vec<ReplicaRef<'_>>, Vec<&mut UndoLog>) = targets
            .iter_mut()
            .map(|Target { disk, file, undo }| {
                let file: &dyn StorageFile = &**file;
                (ReplicaRef { disk, file }, undo)
            })
            .unzip();
        let stamp = FailbackState {
            phase: Phase::Applying,
            revert: false,
            point: target,
            base_seq: journal.base_seq(),
            applied_seq: from_seq,
            applied_bytes: *applied_bytes,
            disks: replicas.len() as u16,
        };
        let work = pipeline::Work {
            fb: self,
            replicas: &replicas,
            undos: &mut undos,
            stamp,
            last_seq: target.seq,
            applied_bytes,
            out,
            progress,
        };
        pipeline::run(work, frames, prog)
    }

    /// Makes the failback final (see the module doc): the state `committed` first, then
    /// the undo logs and the journal in `journal_dir` are removed. The caller has closed
    /// the journal. A second call finishes a removal a crash interrupted.
    pub fn commit(&self, journal_dir: &Path) -> Result<Committed, FailbackError> {
        self.commit_inner(journal_dir, None)
    }

    /// [`Failback::commit`] that first writes, for every disk, the change list of the
    /// journal frames after the point to `out` (module doc, "Change lists at commit"):
    /// the blocks the other site wrote after the point, which its reprotect must
    /// compare. The lists are durable before the state says committed, so the journal
    /// never goes before them; a rerun before that writes them again, a rerun after it
    /// reports the lists it finds.
    pub fn commit_with_lists(
        &self,
        journal_dir: &Path,
        out: &ListsOut,
    ) -> Result<Committed, FailbackError> {
        self.commit_inner(journal_dir, Some(out))
    }

    fn commit_inner(
        &self,
        journal_dir: &Path,
        out: Option<&ListsOut>,
    ) -> Result<Committed, FailbackError> {
        let Some(s) = self.state()? else {
            return Err(FailbackError::NotFailedBack {
                group: self.group.clone(),
            });
        };
        let mut lists = Vec::new();
        let already = match s.phase {
            Phase::Applying => {
                return Err(FailbackError::Unfinished {
                    group: self.group.clone(),
                    point: s.point.id,
                });
            }
            Phase::Applied => {
                if let Some(out) = out {
                    lists = self.write_lists(journal_dir, &s, out)?;
                }
                self.store(&FailbackState {
                    phase: Phase::Committed,
                    ..s
                })?;
                false
            }
            Phase::Committed => {
                if let Some(out) = out {
                    lists = self.found_lists(&s, out);
                }
                true
            }
        };
        let names = self
            .fs
            .list_dir(&self.dir)
            .map_err(io_err("list failback directory", &self.dir))?;
        let mut removed = false;
        for n in names
            .iter()
            .filter(|n| n.starts_with("undo-") && n.ends_with(".log"))
        {
            let p = self.dir.join(n);
            self.fs
                .remove_file(&p)
                .map_err(io_err("remove undo log", &p))?;
            removed = true;
        }
        if removed {
            self.fs
                .sync_dir(&self.dir)
                .map_err(io_err("sync failback directory", &self.dir))?;
        }
        let journal_files_removed = journal::remove_all(self.fs.as_ref(), journal_dir)?;
        Ok(Committed {
            point: s.point,
            already,
            journal_files_removed,
            lists,
        })
    }

    /// Writes the change list of the frames after the point of every disk (only their
    /// extent tables are read: [`PointIndex`]).
    fn write_lists(
        &self,
        journal_dir: &Path,
        s: &FailbackState,
        out: &ListsOut,
    ) -> Result<Vec<WrittenList>, FailbackError> {
        let (journal, _) =
            Journal::open(self.fs.clone(), journal_dir, &self.group, out.journal_cfg)?;
        if journal.base_seq() > s.point.seq {
            return Err(FailbackError::BaseMoved {
                group: self.group.clone(),
                state_base: s.base_seq,
                journal_base: journal.base_seq(),
            });
        }
        // Every frame after the point is in the index: the base is at or before it.
        let entries: Vec<FrameEntry> = (s.point.seq + 1..=journal.write_seq())
            .filter_map(|q| journal.entry(q).copied())
            .collect();
        let disks: Vec<ViewDisk> = self
            .disks
            .iter()
            .map(|d| ViewDisk {
                id: d.id.clone(),
                size_bytes: d.size_bytes,
            })
            .collect();
        let (index, _) =
            PointIndex::build(self.fs.as_ref(), journal_dir, &self.group, &entries, &disks)
                .map_err(FailbackError::Index)?;
        drop(journal);
        self.fs
            .create_dir_all(&out.dir)
            .map_err(io_err("create change list directory", &out.dir))?;
        if let Some(parent) = out.dir.parent() {
            self.fs
                .sync_dir(parent)
                .map_err(io_err("sync parent of change list directory", parent))?;
        }
        let mut written = Vec::with_capacity(self.disks.len());
        for (i, d) in self.disks.iter().enumerate() {
            let meta = changelist::Meta {
                origin: changelist::Origin::FramesAfterPoint,
                group: self.group.clone(),
                disk: d.id.clone(),
                node: out.node.clone(),
                disk_bytes: d.size_bytes,
                point_id: Some(s.point.id),
                created_unix_ms: out.created_unix_ms,
            };
            let name = changelist::file_name(&d.id);
            let ranges = index.written(i).into_iter().map(|(a, b)| Extent {
                offset: a,
                len: b - a,
            });
            let h = changelist::write(self.fs.as_ref(), &out.dir, &name, &meta, ranges).map_err(
                |source| FailbackError::ChangeList {
                    disk: d.id.clone(),
                    source,
                },
            )?;
            written.push(WrittenList {
                disk: d.id.clone(),
                path: out.dir.join(name),
                extent_count: h.extent_count,
                block_count: h.block_count,
            });
        }
        Ok(written)
    }

    /// The lists of a commit that happened already: those in `out.dir` made for this
    /// point (the journal they came from may be gone).
    fn found_lists(&self, s: &FailbackState, out: &ListsOut) -> Vec<WrittenList> {
        self.disks
            .iter()
            .filter_map(|d| {
                let path = out.dir.join(changelist::file_name(&d.id));
                let h = changelist::check(self.fs.as_ref(), &path, &d.id, d.size_bytes).ok()?;
                (h.meta.origin == changelist::Origin::FramesAfterPoint
                    && h.meta.point_id == Some(s.point.id))
                .then(|| WrittenList {
                    disk: d.id.clone(),
                    path,
                    extent_count: h.extent_count,
                    block_count: h.block_count,
                })
            })
            .collect()
    }
}

mod ahead;
mod pipeline;
#[cfg(test)]
mod tests;
