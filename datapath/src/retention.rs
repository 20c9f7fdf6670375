//! Retention: folding the oldest journal history into the replicas, so that the journal
//! keeps a bounded window of recovery points.
//!
//! Each replica holds its disk at the group's *base*; the journal holds every frame
//! after it (see [`crate::journal`]). A fold applies the oldest frames to the replicas
//! and then moves the base past them with [`Journal::drop_through`], which removes the
//! points at or before it from the index and whole folded segments from the disk.
//!
//! # Which point the fold goes to ([`plan`])
//!
//! Only durable points after the base are candidates, and only those strictly older
//! (by id, which rises with seq) than the oldest pinned point (see *Pins* below).
//!
//! - **Window**: the newest *consistent* candidate whose time is at or before
//!   `now - retention_ms`. Inconsistent points (cut during a resync) are never the
//!   window's target: the base stays a state a failback could use. So an inconsistent
//!   point older than the window stays listed until a consistent point after it ages
//!   out too. Point times come from the process server's clock; a clock step only
//!   moves which point is chosen, never what a fold writes.
//! - **Space**: when the journal's segments hold more than `journal_bytes_max`, the
//!   oldest consistent candidate whose fold brings the journal within the limit; when
//!   no consistent one does, the oldest candidate of any kind that does (a long initial
//!   sync has only inconsistent points); when none does (pins, or one huge segment),
//!   the newest candidate, as far as the fold may go ([`Plan::fits`] says false). Only
//!   whole segments are removed ([`Journal::drop_through`]), so the planner counts what
//!   stays with [`bytes_after_drop`].
//!
//! The target is the later of the two. Points the window alone would have kept but the
//! fold drops are *dropped for space* ([`FoldReport::space_points_dropped`]); the caller
//! warns about them. [`near_limit`] says when a journal has reached
//! [`NEAR_LIMIT_PERCENT`] of its limit, so the caller can warn *before* points have to go.
//!
//! # Bounded steps ([`fold_step`])
//!
//! One call folds at most [`Policy::fold_bytes_max`] bytes of frames (at least one
//! frame): from the base to the target, or to the last frame within the budget, which
//! may lie between two points. Each call is a complete fold of its own (apply, sync,
//! drop), so the base always moves in whole steps and the caller may hand the journal to
//! someone else between two calls. A caller keeps calling while
//! [`FoldReport::done`] is false and it has the time.
//!
//! **The base need not be a point.** DESIGN.md speaks of the replicas at the group's
//! *base point*; with bounded steps the base may stop between two points (mid-epoch),
//! until the next step reaches the target. Nothing depends on the base being a point:
//! every point after it is the replicas plus the frames up to it, exactly, and the
//! points before it have left the list. A fold that runs to its end (the usual case,
//! one step for up to 256 MiB) leaves the base at a consistent point.
//!
//! # Order of durable steps
//!
//! | step | what                                                                          |
//! |-----:|-------------------------------------------------------------------------------|
//! | 1    | the intent: `retention.intent` in the journal directory names `through_seq` ([`storage::write_atomic`]: temp written, synced, renamed, directory synced) |
//! | 2    | frames `base + 1 ..= through_seq` read back (crc), decoded (blake3), their extents written to each disk's replica in journal order (later frames win) |
//! | 3    | every replica written in step 2 synced ([`apply::sync_target`])              |
//! | 4    | [`Journal::drop_through`]`(through_seq)`: journal state replaced (the base moves), whole folded segments removed, directory synced |
//!
//! The intent is left in place afterwards: one at or below the base means nothing.
//!
//! # Why a crash anywhere loses nothing, and why no undo is needed
//!
//! Let `B` be the durable base and `I` the durable intent. Invariant: *every replica
//! holds its disk at `B`, except in ranges that frames `B + 1 ..= I` write, where it may
//! hold any mix of old and new bytes.* Step 1 makes `I` durable before step 2 writes
//! anything, so the invariant holds at every instant, whatever a crash tears.
//!
//! Recovery ([`finish_interrupted`], also the first thing [`fold_step`] does) applies
//! frames `B + 1 ..= I` again, in order, syncs, and drops through `I`. Afterwards every
//! range some frame in `B + 1 ..= I` writes holds the last such frame's bytes (the whole
//! run is re-applied in order: later frames win, exactly as in the first run), and every
//! other range still holds its bytes at `B`, which no frame of the run changed: the
//! replica is exactly the disk at `I`. Applying a frame writes absolute bytes at absolute
//! offsets and never reads the replica, so applying it a second time over its own
//! result, or over a torn half of it, gives the same bytes: the fold is idempotent and
//! needs no undo log. The frames stay readable until step 4 removes them, and step 4
//! happens only after step 3 made their effect durable; a crash inside step 4 is
//! finished by [`Journal::open`] (segments at or below the base are removed).
//!
//! Why the intent, rather than just re-planning after a crash: the plan depends on the
//! time, the config and the pins. Without `I`, a restart with a longer `retention` could
//! plan a shorter fold than the interrupted one, and the replica would keep bytes of
//! frames after the new base: replaying the journal from the base to a point between
//! the two would then be wrong. With `I`, recovery always finishes the interrupted fold
//! first, and the pins refuse every point up to it ([`Pins::pin`]).
//!
//! Nothing else may write the replicas beyond the base while folds run: a failback that
//! applies a point *in place* holds [`Pins::pin_all`], which stops every fold.
//!
//! # Pins
//!
//! [`Pins`] is a small per-group registry of points in use (a failback's chosen point,
//! a test failover's export). [`Pins::pin`] returns a guard; the point is pinned until
//! the guard drops. The fold goes only up to points strictly older than the oldest
//! pinned one. A point the fold has already taken (or is taking) is refused with
//! [`PinError::Folded`]; a point folded before this process started is simply no longer
//! in the journal's point list, so a user pins first and then checks the list.
//!
//! # Intent file `retention.intent`, version 1 (all integers little-endian)
//!
//! | offset | size | field         | meaning                                              |
//! |-------:|-----:|---------------|------------------------------------------------------|
//! | 0      | 8    | `magic`       | `b"BRFOLDIN"` ([`INTENT_MAGIC`]); never modify       |
//! | 8      | 2    | `version`     | [`VERSION`]; readers refuse versions they do not know |
//! | 10     | 1    | `group_len`   | length of the group id, 1..=64                       |
//! | 11     | 5    | `reserved0`   | must be 0                                            |
//! | 16     | 8    | `through_seq` | the fold in progress applies frames up to this seq   |
//! | 24     | 64   | `group`       | the group id, zero-padded (padding must be 0)        |
//! | 88     | 4    | `reserved1`   | must be 0                                            |
//! | 92     | 4    | `crc32`       | crc32 (IEEE) of bytes 0..92                          |
//!
//! A missing file means no fold was ever started. The journal ignores the file (and its
//! `.tmp`), see [`crate::journal`].

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;

use crate::apply::{self, ApplyError};
use crate::extent::ExtentData;
use crate::frame::{self, Decoder, Frame, FrameError, FrameKind};
use crate::journal::{Journal, JournalError, PointEntry, SegmentInfo};
use crate::le::{u16_at as le_u16, u32_at as le_u32, u64_at as le_u64};
use crate::storage::{self, StorageFile};

/// Format version of the intent file.
pub const VERSION: u16 = 1;
/// Intent file magic. Never modify: it names the format of every intent file on disk.
pub const INTENT_MAGIC: [u8; 8] = *b"BRFOLDIN";
/// Size of the intent file.
pub const INTENT_BYTES: usize = 96;
/// Name of the intent file, in the journal directory.
pub const INTENT_FILE: &str = "retention.intent";
/// Default [`Policy::retention_ms`]: 24 h.
pub const RETENTION_MS_DEFAULT: u64 = 24 * 3600 * 1000;
/// Default [`Policy::journal_bytes_max`]: 64 GiB.
pub const JOURNAL_BYTES_MAX_DEFAULT: u64 = 64 << 30;
/// Default [`Policy::fold_bytes_max`]: 256 MiB of frames per step, a fraction of a
/// second of decode and apply at the speeds the README measures.
pub const FOLD_BYTES_MAX_DEFAULT: u64 = 256 << 20;
/// A journal at or above this share of its limit is near it ([`near_limit`]).
pub const NEAR_LIMIT_PERCENT: u64 = 80;

const GROUP_FIELD_BYTES: usize = 64;
const OFF_VERSION: usize = 8;
const OFF_GROUP_LEN: usize = 10;
const OFF_RESERVED0: usize = 11;
const OFF_SEQ: usize = 16;
const OFF_GROUP: usize = 24;
const OFF_RESERVED1: usize = OFF_GROUP + GROUP_FIELD_BYTES;
const OFF_CRC: usize = INTENT_BYTES - 4;
const _: () = assert!(OFF_RESERVED1 == 88 && OFF_CRC == 92);

/// Why a fold step failed. Nothing is lost either way: see the module doc.
#[derive(Debug, Error)]
pub enum RetentionError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("journal frame seq {seq}: {source}")]
    Frame {
        seq: u64,
        #[source]
        source: FrameError,
    },
    #[error("journal frame seq {seq} is a {kind:?} frame; a journal holds data and point frames")]
    UnexpectedFrame { seq: u64, kind: FrameKind },
    #[error("journal frame seq {seq} is for disk {disk:?}, which has no replica here")]
    UnknownDisk { seq: u64, disk: String },
    #[error("disk {disk:?}: apply journal frame seq {seq} to the replica: {source}")]
    Apply {
        disk: String,
        seq: u64,
        #[source]
        source: ApplyError,
    },
    #[error("disk {disk:?}: sync the replica: {source}")]
    Sync {
        disk: String,
        #[source]
        source: ApplyError,
    },
    #[error("retention intent {}: {what}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: invalid {field}: {why}", file.display())]
    BadIntent {
        file: PathBuf,
        field: &'static str,
        why: String,
    },
    #[error("{}: unsupported version {version} (this build reads version {VERSION})", file.display())]
    UnsupportedVersion { file: PathBuf, version: u16 },
}

/// How far history is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Points older than this (by their time) are folded.
    pub retention_ms: u64,
    /// The journal's segments may hold this many bytes; beyond, the oldest points go.
    pub journal_bytes_max: u64,
    /// One [`fold_step`] folds at most this many bytes of frames (at least one frame).
    pub fold_bytes_max: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            retention_ms: RETENTION_MS_DEFAULT,
            journal_bytes_max: JOURNAL_BYTES_MAX_DEFAULT,
            fold_bytes_max: FOLD_BYTES_MAX_DEFAULT,
        }
    }
}

/// Why a fold goes where it goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reason {
    /// Points older than the retention window.
    #[default]
    Window,
    /// The journal is over `journal_bytes_max`.
    Space,
    /// Finishing a fold a crash or an error interrupted (its intent).
    Interrupted,
}

/// What the planner looks at: the journal's point index, seqs and segment sizes.
#[derive(Clone, Copy, Debug)]
pub struct JournalShape<'a> {
    /// Points after the base, oldest first ([`Journal::points`]).
    pub points: &'a [PointEntry],
    pub base_seq: u64,
    pub durable_seq: u64,
    /// Oldest first ([`Journal::segments`]).
    pub segments: &'a [SegmentInfo],
}

/// Where the next fold goes, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The point folded through: it and every point before it leave the journal.
    pub target: PointEntry,
    pub reason: Reason,
    /// The seq the window alone would fold through (the base when it would fold
    /// nothing): points after it, up to the target, are dropped for space.
    pub window_seq: u64,
    /// Whether the journal fits in `journal_bytes_max` once folded through the target.
    pub fits: bool,
}

/// Bytes the journal's segments hold after [`Journal::drop_through`]`(seq)`: it removes
/// every segment but the last whose successor starts at or below `seq + 1`.
pub fn bytes_after_drop(segments: &[SegmentInfo], seq: u64) -> u64 {
    let n = segments.len();
    segments
        .iter()
        .enumerate()
        .filter(|&(i, _)| !(i + 1 < n && segments[i + 1].first_seq <= seq.saturating_add(1)))
        .map(|(_, s)| s.bytes)
        .sum()
}

/// Whether `bytes` reached [`NEAR_LIMIT_PERCENT`] of `max`.
pub fn near_limit(bytes: u64, max: u64) -> bool {
    u128::from(bytes) * 100 >= u128::from(max) * u128::from(NEAR_LIMIT_PERCENT)
}

/// Chooses the point the next fold goes to (see the module doc), or `None` when nothing
/// is to be folded. `oldest_pin` is [`Pins::oldest`]: only points with a smaller id are
/// candidates.
pub fn plan(
    shape: &JournalShape<'_>,
    now_unix_ms: u64,
    policy: &Policy,
    oldest_pin: Option<u64>,
) -> Option<Plan> {
    let pts = shape.points;
    // Seqs and ids rise together along the index, so the candidates are one slice.
    let lo = pts.partition_point(|p| p.seq <= shape.base_seq);
    let hi = pts.partition_point(|p| {
        p.seq <= shape.durable_seq && oldest_pin.is_none_or(|pin| p.record.point_id < pin)
    });
    let candidates = &pts[lo..hi.max(lo)];
    let cutoff = now_unix_ms.saturating_sub(policy.retention_ms);
    let window = candidates
        .iter()
        .rev()
        .find(|p| p.record.consistent && p.record.time_unix_ms <= cutoff);
    let max = policy.journal_bytes_max;
    let total: u64 = shape.segments.iter().map(|s| s.bytes).sum();
    let space = if total > max {
        let fits = |p: &&PointEntry| bytes_after_drop(shape.segments, p.seq) <= max;
        candidates
            .iter()
            .filter(|p| p.record.consistent)
            .find(fits)
            .or_else(|| candidates.iter().find(fits))
            .or_else(|| candidates.last())
    } else {
        None
    };
    let window_seq = window.map_or(shape.base_seq, |p| p.seq);
    let (target, reason) = match (window, space) {
        (_, Some(s)) if s.seq > window_seq => (s, Reason::Space),
        (Some(w), _) => (w, Reason::Window),
        (None, _) => return None,
    };
    Some(Plan {
        target: target.clone(),
        reason,
        window_seq,
        fits: bytes_after_drop(shape.segments, target.seq) <= max,
    })
}

/// One disk's replica, as a fold writes it.
#[derive(Clone, Copy)]
pub struct Replica<'a> {
    /// The disk id data frames name.
    pub disk: &'a str,
    pub file: &'a dyn StorageFile,
    pub size_bytes: u64,
}

/// What one [`fold_step`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FoldReport {
    pub reason: Reason,
    /// The plan's target point (`None` when finishing an interrupted fold).
    pub target: Option<PointEntry>,
    /// Frames `from_seq..=through_seq` were folded; the base is now `through_seq`.
    pub from_seq: u64,
    pub through_seq: u64,
    /// Whether the step reached the plan's target (an interrupted fold: always).
    pub done: bool,
    /// Whether the journal fits in its limit once the target is reached ([`Plan::fits`]).
    pub fits: bool,
    pub frames: u64,
    /// Bytes of the frames as journaled.
    pub frame_bytes: u64,
    /// Bytes written to replicas (data and zeros).
    pub written_bytes: u64,
    /// Points that left the journal.
    pub points_dropped: usize,
    /// Of those, points the window alone would have kept.
    pub space_points_dropped: usize,
    /// Time of the newest point dropped for space.
    pub newest_space_dropped_time_unix_ms: Option<u64>,
    /// Segment files removed.
    pub segments_removed: usize,
}

/// Runs one bounded fold step: first finishes an interrupted fold (its intent), else
/// plans ([`plan`], under the pins' lock) and folds towards the plan's target, at most
/// [`Policy::fold_bytes_max`] bytes of frames. `None`: nothing to fold. See the module
/// doc for the order of durable steps.
pub fn fold_step(
    j: &mut Journal,
    replicas: &[Replica<'_>],
    pins: &Pins,
    policy: &Policy,
    now_unix_ms: u64,
    dec: &mut Decoder,
) -> Result<Option<FoldReport>, RetentionError> {
    if let Some(r) = finish_interrupted(j, replicas, pins, dec)? {
        return Ok(Some(r));
    }
    let segments = j.segments();
    let decided = pins.decide(|oldest| {
        let shape = JournalShape {
            points: j.points(),
            base_seq: j.base_seq(),
            durable_seq: j.durable_seq(),
            segments: &segments,
        };
        let p = plan(&shape, now_unix_ms, policy, oldest)?;
        let through = chunk_end(j, p.target.seq, policy.fold_bytes_max);
        let floor = newest_point_through(j, through);
        Some(((p, through), floor))
    });
    let Some((p, through)) = decided else {
        return Ok(None);
    };
    write_intent(j, through)?;
    let dropped: Vec<&PointEntry> = points_through(j, through).iter().collect();
    let space: Vec<u64> = dropped
        .iter()
        .filter(|e| e.seq > p.window_seq)
        .map(|e| e.record.time_unix_ms)
        .collect();
    let mut r = FoldReport {
        reason: p.reason,
        done: through == p.target.seq,
        fits: p.fits,
        points_dropped: dropped.len(),
        space_points_dropped: space.len(),
        newest_space_dropped_time_unix_ms: space.last().copied(),
        target: Some(p.target),
        ..FoldReport::default()
    };
    fold_through(j, replicas, through, dec, &mut r)?;
    Ok(Some(r))
}

/// Finishes a fold whose intent is beyond the base (a crash or an error interrupted
/// it): applies its frames again, syncs, drops. `None` when there is none. Run it before
/// anything reads the replicas after a restart; [`fold_step`] runs it first too.
pub fn finish_interrupted(
    j: &mut Journal,
    replicas: &[Replica<'_>],
    pins: &Pins,
    dec: &mut Decoder,
) -> Result<Option<FoldReport>, RetentionError> {
    let Some(through) = read_intent(j)? else {
        return Ok(None);
    };
    if through <= j.base_seq() {
        return Ok(None);
    }
    if through > j.durable_seq() {
        return Err(RetentionError::BadIntent {
            file: j.dir().join(INTENT_FILE),
            field: "through_seq",
            why: format!(
                "{through} is beyond the journal's durable seq {}: the intent never names a \
                 frame that was not durable",
                j.durable_seq()
            ),
        });
    }
    pins.raise_floor(newest_point_through(j, through));
    let mut r = FoldReport {
        reason: Reason::Interrupted,
        done: true,
        fits: true,
        points_dropped: points_through(j, through).len(),
        ..FoldReport::default()
    };
    fold_through(j, replicas, through, dec, &mut r)?;
    Ok(Some(r))
}

/// The points after the base up to `seq`.
fn points_through(j: &Journal, seq: u64) -> &[PointEntry] {
    let pts = j.points();
    &pts[..pts.partition_point(|p| p.seq <= seq)]
}

/// The id of the newest point at or before `seq` still in the index (0: none).
fn newest_point_through(j: &Journal, seq: u64) -> u64 {
    points_through(j, seq)
        .last()
        .map_or(0, |p| p.record.point_id)
}

/// The last seq of a step from the base towards `target_seq` within `budget` bytes of
/// frames (at least one frame).
fn chunk_end(j: &Journal, target_seq: u64, budget: u64) -> u64 {
    let base = j.base_seq();
    let mut seq = base;
    let mut bytes = 0u64;
    while seq < target_seq {
        let len = j.entry(seq + 1).map_or(0, |e| u64::from(e.len));
        if seq > base && bytes + len > budget {
            break;
        }
        bytes += len;
        seq += 1;
    }
    seq
}

/// Steps 2-4 of the module doc: apply `base + 1 ..= through`, sync, drop.
fn fold_through(
    j: &mut Journal,
    replicas: &[Replica<'_>],
    through: u64,
    dec: &mut Decoder,
    r: &mut FoldReport,
) -> Result<(), RetentionError> {
    r.from_seq = j.base_seq() + 1;
    r.through_seq = through;
    let mut touched = vec![false; replicas.len()];
    for item in j.read(r.from_seq, through)? {
        let (h, bytes) = item?;
        r.frames += 1;
        r.frame_bytes += bytes.len() as u64;
        let seq = h.seq;
        match frame::decode(&bytes, dec).map_err(|source| RetentionError::Frame { seq, source })? {
            Frame::Data(df) => {
                let Some(i) = replicas.iter().position(|x| x.disk == df.meta.disk) else {
                    return Err(RetentionError::UnknownDisk {
                        seq,
                        disk: df.meta.disk.clone(),
                    });
                };
                let rep = replicas[i];
                let extents: Vec<(u64, ExtentData<'_>)> = df.extents().collect();
                let st = apply::apply_extents(rep.file, rep.size_bytes, &extents, None).map_err(
                    |source| RetentionError::Apply {
                        disk: rep.disk.to_string(),
                        seq,
                        source,
                    },
                )?;
                drop(extents);
                r.written_bytes += st.data_bytes + st.zero_bytes;
                touched[i] = true;
                dec.recycle(df);
            }
            Frame::Point(..) => {}
            _ => {
                return Err(RetentionError::UnexpectedFrame { seq, kind: h.kind });
            }
        }
    }
    for (rep, _) in replicas.iter().zip(&touched).filter(|(_, t)| **t) {
        apply::sync_target(rep.file).map_err(|source| RetentionError::Sync {
            disk: rep.disk.to_string(),
            source,
        })?;
    }
    r.segments_removed = j.drop_through(through)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The intent file.

/// Encodes the intent file of `group` (a valid id) naming `through_seq`.
pub fn encode_intent(group: &str, through_seq: u64) -> Vec<u8> {
    assert!(crate::valid_id(group), "invalid group id {group:?}");
    let mut b = vec![0u8; INTENT_BYTES];
    b[..8].copy_from_slice(&INTENT_MAGIC);
    b[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&VERSION.to_le_bytes());
    b[OFF_GROUP_LEN] = group.len() as u8;
    b[OFF_SEQ..OFF_SEQ + 8].copy_from_slice(&through_seq.to_le_bytes());
    b[OFF_GROUP..OFF_GROUP + group.len()].copy_from_slice(group.as_bytes());
    let crc = crc32fast::hash(&b[..OFF_CRC]);
    b[OFF_CRC..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes the intent file of `group`; returns its `through_seq`. Every error names the
/// field at fault.
pub fn decode_intent(b: &[u8], group: &str, file: &Path) -> Result<u64, RetentionError> {
    let bad = |field: &'static str, why: String| RetentionError::BadIntent {
        file: file.to_path_buf(),
        field,
        why,
    };
    if b.len() != INTENT_BYTES {
        return Err(bad(
            "length",
            format!("{} bytes, the intent file is {INTENT_BYTES}", b.len()),
        ));
    }
    if b[..8] != INTENT_MAGIC {
        return Err(bad(
            "magic",
            format!("{:02x?}, expected {INTENT_MAGIC:02x?}", &b[..8]),
        ));
    }
    let crc = le_u32(b, OFF_CRC);
    let want = crc32fast::hash(&b[..OFF_CRC]);
    if crc != want {
        return Err(bad(
            "crc32",
            format!("stored {crc:#010x}, computed {want:#010x}"),
        ));
    }
    let version = le_u16(b, OFF_VERSION);
    if version != VERSION {
        return Err(RetentionError::UnsupportedVersion {
            file: file.to_path_buf(),
            version,
        });
    }
    if b[OFF_RESERVED0..OFF_SEQ].iter().any(|&x| x != 0) {
        return Err(bad("reserved0", "must be 0".into()));
    }
    if b[OFF_RESERVED1..OFF_CRC].iter().any(|&x| x != 0) {
        return Err(bad("reserved1", "must be 0".into()));
    }
    let len = usize::from(b[OFF_GROUP_LEN]);
    if !(1..=GROUP_FIELD_BYTES).contains(&len) {
        return Err(bad("group_len", format!("{len}, must be 1..=64")));
    }
    let field = &b[OFF_GROUP..OFF_GROUP + GROUP_FIELD_BYTES];
    if field[len..].iter().any(|&x| x != 0) {
        return Err(bad("group", "padding must be 0".into()));
    }
    let found = String::from_utf8_lossy(&field[..len]);
    if found != group {
        return Err(bad(
            "group",
            format!("belongs to group {found:?}, not {group:?}"),
        ));
    }
    Ok(le_u64(b, OFF_SEQ))
}

/// The journal's intent (its `through_seq`), if an intent file exists.
pub fn read_intent(j: &Journal) -> Result<Option<u64>, RetentionError> {
    let path = j.dir().join(INTENT_FILE);
    let b =
        storage::read_whole(j.storage().as_ref(), &path).map_err(|source| RetentionError::Io {
            what: "read",
            path: path.clone(),
            source,
        })?;
    b.map(|b| decode_intent(&b, j.group(), &path)).transpose()
}

/// Step 1: makes the intent to fold through `through_seq` durable.
fn write_intent(j: &Journal, through_seq: u64) -> Result<(), RetentionError> {
    let b = encode_intent(j.group(), through_seq);
    storage::write_atomic(j.storage().as_ref(), j.dir(), INTENT_FILE, &b).map_err(|source| {
        RetentionError::Io {
            what: "replace",
            path: j.dir().join(INTENT_FILE),
            source,
        }
    })
}

// ---------------------------------------------------------------------------------------
// Pins.

/// Why a point cannot be pinned.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum PinError {
    #[error(
        "point {point_id} is folded into the replicas, or being folded (points up to id {floor} are)"
    )]
    Folded { point_id: u64, floor: u64 },
}

/// A group's points in use, which the fold must not take (see the module doc). Shared
/// (`Arc`) by the fold and its users.
#[derive(Debug, Default)]
pub struct Pins {
    state: Mutex<PinState>,
}

#[derive(Debug, Default)]
struct PinState {
    /// Pinned point id -> number of guards. Id 0 stands for "everything".
    held: BTreeMap<u64, usize>,
    /// Points up to this id are folded or being folded (by this process).
    floor: u64,
}

/// Keeps a point pinned until dropped.
#[derive(Debug)]
pub struct PinGuard {
    pins: Arc<Pins>,
    point_id: u64,
}

impl PinGuard {
    /// The pinned point's id (0 for [`Pins::pin_all`]).
    pub fn point_id(&self) -> u64 {
        self.point_id
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let mut s = self.pins.lock();
        if let Some(n) = s.held.get_mut(&self.point_id) {
            *n -= 1;
            if *n == 0 {
                s.held.remove(&self.point_id);
            }
        }
    }
}

impl Pins {
    /// An empty registry.
    pub fn new() -> Arc<Pins> {
        Arc::new(Pins::default())
    }

    fn lock(&self) -> MutexGuard<'_, PinState> {
        // The state is a map of counters, whole after any panic elsewhere.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(self: &Arc<Self>, s: &mut PinState, point_id: u64) -> PinGuard {
        *s.held.entry(point_id).or_insert(0) += 1;
        PinGuard {
            pins: self.clone(),
            point_id,
        }
    }

    /// Pins `point_id`: no fold starts that would take it or a later point, until the
    /// guard drops. Refused when a fold of this process took it already, or is taking
    /// it. A point folded before this process started is not refused here: check the
    /// journal's point list after pinning. `pin(0)` is [`Pins::pin_all`].
    pub fn pin(self: &Arc<Self>, point_id: u64) -> Result<PinGuard, PinError> {
        let mut s = self.lock();
        if point_id != 0 && point_id <= s.floor {
            return Err(PinError::Folded {
                point_id,
                floor: s.floor,
            });
        }
        Ok(self.add(&mut s, point_id))
    }

    /// Stops every fold until the guard drops: for a user that writes the replicas
    /// itself (a failback applying a point in place), which a fold would overwrite.
    pub fn pin_all(self: &Arc<Self>) -> PinGuard {
        let mut s = self.lock();
        self.add(&mut s, 0)
    }

    /// The oldest pinned point id (0 when everything is pinned), if any.
    pub fn oldest(&self) -> Option<u64> {
        self.lock().held.keys().next().copied()
    }

    /// Points up to this id are folded or being folded by this process.
    pub fn floor(&self) -> u64 {
        self.lock().floor
    }

    /// Under the registry's lock: `decide` gets the oldest pin and returns what to fold
    /// with the newest point id it takes, which becomes the floor before any pin can
    /// slip in between.
    fn decide<T>(&self, decide: impl FnOnce(Option<u64>) -> Option<(T, u64)>) -> Option<T> {
        let mut s = self.lock();
        let oldest = s.held.keys().next().copied();
        let (t, floor) = decide(oldest)?;
        s.floor = s.floor.max(floor);
        Some(t)
    }

    fn raise_floor(&self, floor: u64) {
        let mut s = self.lock();
        s.floor = s.floor.max(floor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{DataFrameMeta, Encoder, PointKind, PointRecord};
    use crate::journal::{JournalConfig, RecoveryMode};
    use crate::storage::{CrashMode, OpenMode, SimFs, Storage};
    use crate::testutil::Rng;

    const GROUP: &str = "g1";
    const DISKS: [&str; 2] = ["d0", "d1"];
    const DISK_BYTES: u64 = 64 << 10;
    const T0: u64 = 1_700_000_000_000;

    fn pe(id: u64, seq: u64, time_s: u64, consistent: bool) -> PointEntry {
        PointEntry {
            record: PointRecord {
                point_id: id,
                epoch: id,
                time_unix_ms: T0 + time_s * 1000,
                kind: PointKind::Crash,
                consistent,
                group: GROUP.into(),
            },
            seq,
        }
    }

    fn seg(first_seq: u64, bytes: u64) -> SegmentInfo {
        SegmentInfo { first_seq, bytes }
    }

    fn policy(retention_s: u64, max: u64) -> Policy {
        Policy {
            retention_ms: retention_s * 1000,
            journal_bytes_max: max,
            fold_bytes_max: FOLD_BYTES_MAX_DEFAULT,
        }
    }

    /// Points 1..=6 at seqs 10, 20, .., 60 and times 10 s, 20 s, ..; point 4 inconsistent.
    fn points() -> Vec<PointEntry> {
        (1..=6).map(|i| pe(i, i * 10, i * 10, i != 4)).collect()
    }

    /// Segments of 100 bytes starting at seqs 1, 11, 21, .., 61.
    fn segments() -> Vec<SegmentInfo> {
        (0..7).map(|i| seg(i * 10 + 1, 100)).collect()
    }

    fn shape<'a>(pts: &'a [PointEntry], segs: &'a [SegmentInfo]) -> JournalShape<'a> {
        JournalShape {
            points: pts,
            base_seq: 0,
            durable_seq: 60,
            segments: segs,
        }
    }

    fn target(p: Option<Plan>) -> Option<(u64, Reason)> {
        p.map(|p| (p.target.record.point_id, p.reason))
    }

    /// Proves the window picks the newest consistent point at or before now - retention,
    /// skips inconsistent points, and never goes past the durable seq or the base.
    #[test]
    fn window_choice() {
        let (pts, segs) = (points(), segments());
        let s = shape(&pts, &segs);
        let big = 1 << 40;
        let now = |t: u64| T0 + t * 1000;
        // Nothing is old enough.
        assert_eq!(target(plan(&s, now(15), &policy(10, big), None)), None);
        // Exactly at the cutoff counts as old.
        assert_eq!(
            target(plan(&s, now(30), &policy(10, big), None)),
            Some((2, Reason::Window))
        );
        // Point 4 (inconsistent) is older than the window: the fold stops at 3.
        assert_eq!(
            target(plan(&s, now(45), &policy(5, big), None)),
            Some((3, Reason::Window))
        );
        assert_eq!(
            target(plan(&s, now(1000), &policy(5, big), None)),
            Some((6, Reason::Window))
        );
        // Point 6 is not durable yet.
        let mut s2 = s;
        s2.durable_seq = 59;
        assert_eq!(
            target(plan(&s2, now(1000), &policy(5, big), None)),
            Some((5, Reason::Window))
        );
        // Points at or before the base are gone already.
        s2.base_seq = 50;
        assert_eq!(target(plan(&s2, now(1000), &policy(5, big), None)), None);
        // A clock far behind the points folds nothing.
        assert_eq!(target(plan(&s, 0, &policy(5, big), None)), None);
        let p = plan(&s, now(45), &policy(5, big), None).unwrap();
        assert!(p.fits);
        assert_eq!(p.window_seq, 30);
    }

    /// Proves pins stop the fold strictly before the oldest pinned point, that pinning
    /// everything stops it entirely, and that unpinning lets it go on.
    #[test]
    fn pins_bound_the_fold() {
        let (pts, segs) = (points(), segments());
        let s = shape(&pts, &segs);
        let now = T0 + 1_000_000;
        let pol = policy(5, 1 << 40);
        let pins = Pins::new();
        assert_eq!(pins.oldest(), None);
        let g5 = pins.pin(5).unwrap();
        let g3 = pins.pin(3).unwrap();
        let g3b = pins.pin(3).unwrap();
        assert_eq!(pins.oldest(), Some(3));
        assert_eq!(
            target(plan(&s, now, &pol, pins.oldest())),
            Some((2, Reason::Window))
        );
        drop(g3);
        assert_eq!(pins.oldest(), Some(3), "a second guard still pins 3");
        drop(g3b);
        // Oldest pin 5: point 4 is inconsistent, so the fold stops at 3.
        assert_eq!(
            target(plan(&s, now, &pol, pins.oldest())),
            Some((3, Reason::Window))
        );
        let all = pins.pin_all();
        assert_eq!(all.point_id(), 0);
        assert_eq!(plan(&s, now, &pol, pins.oldest()), None);
        drop(all);
        drop(g5);
        assert_eq!(pins.oldest(), None);
        assert_eq!(
            target(plan(&s, now, &pol, pins.oldest())),
            Some((6, Reason::Window))
        );
        // The floor refuses points being folded; pin(0) is always allowed.
        pins.raise_floor(3);
        assert_eq!(
            pins.pin(3).unwrap_err(),
            PinError::Folded {
                point_id: 3,
                floor: 3
            }
        );
        assert!(pins.pin(1).is_err());
        assert!(pins.pin(4).is_ok());
        assert!(pins.pin(0).is_ok());
        pins.raise_floor(2);
        assert_eq!(pins.floor(), 3, "the floor never goes down");
    }

    /// Proves the byte limit folds the oldest consistent point that makes the journal
    /// fit, falls back to an inconsistent point when no consistent one would, and to the
    /// newest allowed point when nothing fits; and that only whole segments count.
    #[test]
    fn byte_limit_choice() {
        let (pts, segs) = (points(), segments());
        let s = shape(&pts, &segs);
        // 700 bytes in 7 segments; nothing old enough for the window.
        let now = T0;
        // Folding through point 2 (seq 20) removes segments 1 and 11: 500 left.
        assert_eq!(bytes_after_drop(&segs, 20), 500);
        assert_eq!(bytes_after_drop(&segs, 19), 600);
        assert_eq!(bytes_after_drop(&segs, 0), 700);
        // The active (last) segment always stays.
        assert_eq!(bytes_after_drop(&segs, 1000), 100);
        let p = plan(&s, now, &policy(10, 500), None).unwrap();
        assert_eq!((p.target.record.point_id, p.reason), (2, Reason::Space));
        assert!(p.fits);
        assert_eq!(p.window_seq, 0);
        // Within the limit: nothing.
        assert_eq!(plan(&s, now, &policy(10, 700), None), None);
        // Point 4 is inconsistent: a limit of 300 needs seq 40, so point 5 is taken.
        let p = plan(&s, now, &policy(10, 300), None).unwrap();
        assert_eq!(p.target.record.point_id, 5);
        // Only inconsistent candidates fit (points 5 and 6 pinned away).
        let p = plan(&s, now, &policy(10, 300), Some(5)).unwrap();
        assert_eq!((p.target.record.point_id, p.fits), (4, true));
        // Nothing fits (pinned at 3): as far as allowed, and it says so.
        let p = plan(&s, now, &policy(10, 100), Some(3)).unwrap();
        assert_eq!((p.target.record.point_id, p.fits), (2, false));
        // The window goes further than space needs: the window wins.
        let p = plan(&s, T0 + 60_000, &policy(10, 600), None).unwrap();
        assert_eq!((p.target.record.point_id, p.reason), (5, Reason::Window));
        // Space goes further than the window: space, and the window's seq is kept.
        let p = plan(&s, T0 + 25_000, &policy(10, 300), None).unwrap();
        assert_eq!((p.target.record.point_id, p.reason), (5, Reason::Space));
        assert_eq!(p.window_seq, 10);
        assert!(near_limit(80, 100) && !near_limit(79, 100) && near_limit(u64::MAX, 1));
    }

    /// Proves the intent file round-trips, its layout is pinned, and every truncation,
    /// bit flip and wrong group is refused with a typed error, never a panic.
    #[test]
    fn intent_format() {
        let f = Path::new("/j/retention.intent");
        let b = encode_intent(GROUP, 0x0102_0304_0506_0708);
        assert_eq!(b.len(), INTENT_BYTES);
        assert_eq!(&b[..16], b"BRFOLDIN\x01\x00\x02\x00\x00\x00\x00\x00");
        assert_eq!(&b[16..24], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[24..26], b"g1");
        assert!(b[26..92].iter().all(|&x| x == 0));
        assert_eq!(decode_intent(&b, GROUP, f).unwrap(), 0x0102_0304_0506_0708);
        for n in 0..b.len() {
            assert!(decode_intent(&b[..n], GROUP, f).is_err(), "cut to {n}");
        }
        for i in 0..b.len() * 8 {
            let mut c = b.clone();
            c[i / 8] ^= 1 << (i % 8);
            assert!(decode_intent(&c, GROUP, f).is_err(), "bit {i}");
        }
        let e = decode_intent(&b, "g2", f).unwrap_err().to_string();
        assert!(e.contains("group") && e.contains("retention.intent"), "{e}");
        let mut rng = Rng::new(7);
        for _ in 0..1000 {
            let n = rng.below(200) as usize;
            let _ = decode_intent(&rng.bytes(n), GROUP, f);
        }
    }

    // -----------------------------------------------------------------------------------
    // Folds on the simulated file system.

    /// A journal, two replicas and the model: each disk's contents after every seq.
    struct World {
        fs: SimFs,
        cfg: JournalConfig,
        /// `states[seq]`: both disks after frame `seq` (`states[0]`: the replicas' start).
        states: Vec<[Vec<u8>; 2]>,
        /// (point id, seq) of every point journaled.
        points: Vec<(u64, u64)>,
    }

    fn replica_path(d: usize) -> PathBuf {
        PathBuf::from(format!("/r/{}", DISKS[d]))
    }

    fn read_all(fs: &dyn Storage, path: &Path) -> Vec<u8> {
        let f = fs.open(path, OpenMode::ReadOnly).unwrap();
        let mut b = vec![0u8; f.len().unwrap() as usize];
        f.read_exact_at(&mut b, 0).unwrap();
        b
    }

    /// Builds a journal of `epochs` epochs (a few data frames on random disks, then a
    /// point one second after the last, every fourth inconsistent), committed epoch by
    /// epoch, with small segments so that folds remove some.
    fn world(seed: u64, epochs: u64) -> World {
        let mut rng = Rng::new(seed);
        let fs = SimFs::new();
        let cfg = JournalConfig {
            segment_bytes_max: 24 << 10,
            recovery: RecoveryMode::TolerateTailCorruption,
        };
        fs.create_dir_all(Path::new("/r")).unwrap();
        let mut state: [Vec<u8>; 2] =
            [rng.bytes(DISK_BYTES as usize), vec![0; DISK_BYTES as usize]];
        for (d, img) in state.iter().enumerate() {
            let f = fs.open(&replica_path(d), OpenMode::CreateNew).unwrap();
            f.write_all_at(img, 0).unwrap();
            f.sync_data().unwrap();
        }
        fs.sync_dir(Path::new("/r")).unwrap();
        let (mut j, _) = Journal::open(Arc::new(fs.clone()), Path::new("/j"), GROUP, cfg).unwrap();
        let mut states = vec![state.clone()];
        let mut points = Vec::new();
        let mut enc = Encoder::new(frame::DEFAULT_ZSTD_LEVEL);
        let mut out = Vec::new();
        for epoch in 1..=epochs {
            for _ in 0..1 + rng.below(3) {
                let d = rng.below(2) as usize;
                // Two ascending extents, one in each half of the disk.
                let half = DISK_BYTES / 2;
                // (offset, length, data; empty data: a zero extent)
                let mut exts: Vec<(u64, u64, Vec<u8>)> = Vec::new();
                for h in 0..2 {
                    let len = (1 + rng.below(16)) * 512;
                    let off = h * half + rng.below((half - len) / 512 + 1) * 512;
                    let data = match rng.below(5) {
                        0 => Vec::new(),
                        1 | 2 => rng.bytes(len as usize),
                        _ => vec![rng.next() as u8; len as usize],
                    };
                    exts.push((off, len, data));
                }
                let refs: Vec<(u64, ExtentData<'_>)> = exts
                    .iter()
                    .map(|(o, len, data)| match data.is_empty() {
                        true => (*o, ExtentData::Zero(*len)),
                        false => (*o, ExtentData::Bytes(data)),
                    })
                    .collect();
                for (o, e) in &refs {
                    let at = *o as usize;
                    match e {
                        ExtentData::Bytes(b) => state[d][at..at + b.len()].copy_from_slice(b),
                        ExtentData::Zero(n) => state[d][at..at + *n as usize].fill(0),
                    }
                }
                let meta = DataFrameMeta {
                    group: GROUP.into(),
                    disk: DISKS[d].into(),
                    epoch,
                };
                enc.encode_data(&meta, j.next_seq(), &refs, &mut out)
                    .unwrap();
                j.append(&out).unwrap();
                states.push(state.clone());
            }
            let p = PointRecord {
                point_id: epoch * 10,
                epoch,
                time_unix_ms: T0 + epoch * 1000,
                kind: PointKind::Crash,
                consistent: epoch % 4 != 3,
                group: GROUP.into(),
            };
            frame::encode_point(&p, j.next_seq(), &mut out);
            let seq = j.append(&out).unwrap();
            points.push((p.point_id, seq));
            states.push(state.clone());
            j.commit().unwrap();
        }
        World {
            fs,
            cfg,
            states,
            points,
        }
    }

    impl World {
        fn open(&self) -> Journal {
            Journal::open(Arc::new(self.fs.clone()), Path::new("/j"), GROUP, self.cfg)
                .unwrap()
                .0
        }

        /// Folds step by step until nothing is left to fold (or an error: a crash).
        fn fold_all(
            &self,
            j: &mut Journal,
            pins: &Pins,
            pol: &Policy,
            now: u64,
        ) -> Result<Vec<FoldReport>, RetentionError> {
            let files: Vec<Box<dyn StorageFile>> = (0..2)
                .map(|d| self.fs.open(&replica_path(d), OpenMode::Existing))
                .collect::<Result<_, _>>()
                .map_err(|source| RetentionError::Io {
                    what: "open replica",
                    path: PathBuf::from("/r"),
                    source,
                })?;
            let reps: Vec<Replica<'_>> = (0..2)
                .map(|d| Replica {
                    disk: DISKS[d],
                    file: files[d].as_ref(),
                    size_bytes: DISK_BYTES,
                })
                .collect();
            let mut dec = Decoder::new();
            let mut out = Vec::new();
            while let Some(r) = fold_step(j, &reps, pins, pol, now, &mut dec)? {
                out.push(r);
            }
            Ok(out)
        }

        /// Checks the replicas hold the disks at the base, every point after the base is
        /// still listed, and replaying the journal from the base over the replicas gives
        /// each point's disks byte for byte.
        fn check(&self, j: &Journal, what: &str) {
            let base = j.base_seq();
            let mut imgs: [Vec<u8>; 2] = [0, 1].map(|d| read_all(&self.fs, &replica_path(d)));
            assert!(
                imgs == self.states[base as usize],
                "{what}: replicas are not the disks at the base {base}"
            );
            let want: Vec<u64> = self
                .points
                .iter()
                .filter(|(_, s)| *s > base)
                .map(|(id, _)| *id)
                .collect();
            let got: Vec<u64> = j.points().iter().map(|p| p.record.point_id).collect();
            assert_eq!(got, want, "{what}: points after the base {base}");
            assert_eq!(j.durable_seq() as usize, self.states.len() - 1, "{what}");
            let mut dec = Decoder::new();
            for item in j.read(base + 1, j.durable_seq()).unwrap() {
                let (h, bytes) = item.unwrap();
                if let Frame::Data(df) = frame::decode(&bytes, &mut dec).unwrap() {
                    let d = DISKS.iter().position(|x| *x == df.meta.disk).unwrap();
                    for (o, e) in df.extents() {
                        let at = o as usize;
                        match e {
                            ExtentData::Bytes(b) => imgs[d][at..at + b.len()].copy_from_slice(b),
                            ExtentData::Zero(n) => imgs[d][at..at + n as usize].fill(0),
                        }
                    }
                }
                if h.kind == FrameKind::Point {
                    assert!(
                        imgs == self.states[h.seq as usize],
                        "{what}: point at seq {} is not exact",
                        h.seq
                    );
                }
            }
        }
    }

    fn small_steps(retention_s: u64) -> Policy {
        Policy {
            retention_ms: retention_s * 1000,
            journal_bytes_max: JOURNAL_BYTES_MAX_DEFAULT,
            fold_bytes_max: 10 << 10,
        }
    }

    /// Proves a fold in bounded steps moves the base to the newest consistent point
    /// older than the window, removes folded segments, keeps every later point exact,
    /// and raises the pin floor past the points it took.
    #[test]
    fn fold_in_steps_is_exact() {
        let w = world(1, 16);
        let mut j = w.open();
        let segs_before = j.segment_count();
        let bytes_before = j.bytes();
        let pins = Pins::new();
        // Now is 20 s after T0 with a 10 s window: points up to epoch 10 are old.
        let reports = w
            .fold_all(&mut j, &pins, &small_steps(10), T0 + 20_000)
            .unwrap();
        assert!(reports.len() > 1, "the budget splits the fold: {reports:?}");
        assert!(reports.iter().all(|r| r.reason == Reason::Window));
        assert!(reports.last().unwrap().done);
        assert_eq!(j.points()[0].record.point_id, 110);
        assert_eq!(pins.floor(), 100);
        assert!(pins.pin(100).is_err() && pins.pin(110).is_ok());
        assert!(j.segment_count() < segs_before && j.bytes() < bytes_before);
        w.check(&j, "after the fold");
        // The next fold has nothing to do.
        assert!(
            w.fold_all(&mut j, &pins, &small_steps(10), T0 + 20_000)
                .unwrap()
                .is_empty()
        );
        // Reopened, the journal and replicas agree.
        drop(j);
        w.fs.crash(CrashMode::DropUnsynced);
        let j = w.open();
        w.check(&j, "after reopen");
    }

    /// Proves the byte limit folds for space and reports how many points it dropped that
    /// the window would have kept, and the newest dropped time.
    #[test]
    fn fold_for_space_reports_dropped_points() {
        let w = world(2, 16);
        let mut j = w.open();
        let total = j.bytes();
        let pol = Policy {
            retention_ms: RETENTION_MS_DEFAULT,
            journal_bytes_max: total / 2,
            fold_bytes_max: FOLD_BYTES_MAX_DEFAULT,
        };
        let reports = w.fold_all(&mut j, &Pins::new(), &pol, T0 + 20_000).unwrap();
        assert_eq!(reports.len(), 1, "{reports:?}");
        let r = &reports[0];
        assert_eq!(r.reason, Reason::Space);
        assert!(r.fits && r.done);
        assert!(r.space_points_dropped > 0);
        assert_eq!(r.space_points_dropped, r.points_dropped);
        assert_eq!(
            r.newest_space_dropped_time_unix_ms,
            Some(r.target.as_ref().unwrap().record.time_unix_ms)
        );
        assert!(j.bytes() <= total / 2);
        w.check(&j, "after the space fold");
    }

    /// Proves a frame for a disk without a replica stops the fold with an error naming
    /// the disk and moves nothing; the intent then finishes once the replica is there.
    #[test]
    fn unknown_disk_refused_then_finished() {
        let w = world(3, 8);
        let mut j = w.open();
        let f0 = w.fs.open(&replica_path(0), OpenMode::Existing).unwrap();
        let only_d0 = [Replica {
            disk: DISKS[0],
            file: f0.as_ref(),
            size_bytes: DISK_BYTES,
        }];
        let pins = Pins::new();
        let mut dec = Decoder::new();
        let e = fold_step(
            &mut j,
            &only_d0,
            &pins,
            &small_steps(1),
            T0 + 100_000,
            &mut dec,
        )
        .unwrap_err();
        assert!(
            matches!(&e, RetentionError::UnknownDisk { disk, .. } if disk == "d1"),
            "{e}"
        );
        assert_eq!(j.base_seq(), 0);
        let intent = read_intent(&j).unwrap().unwrap();
        assert!(intent > 0);
        // With both replicas, the first step finishes exactly the interrupted fold.
        drop(f0);
        let reports = w
            .fold_all(&mut j, &pins, &small_steps(1_000_000), T0)
            .unwrap();
        assert_eq!(reports[0].reason, Reason::Interrupted);
        assert_eq!(reports[0].through_seq, intent);
        assert_eq!(j.base_seq(), intent);
        w.check(&j, "after finishing");
    }

    /// Proves an intent beyond the durable seq is refused, naming the field.
    #[test]
    fn intent_beyond_durable_refused() {
        let w = world(4, 3);
        let mut j = w.open();
        let b = encode_intent(GROUP, j.durable_seq() + 1);
        storage::write_atomic(&w.fs, Path::new("/j"), INTENT_FILE, &b).unwrap();
        let e = w
            .fold_all(&mut j, &Pins::new(), &small_steps(1), T0)
            .unwrap_err();
        assert!(e.to_string().contains("through_seq"), "{e}");
        assert_eq!(j.base_seq(), 0);
    }

    /// Proves a crash at every durability step of a fold (dropping or tearing what was
    /// not synced, with several seeds), then a reopen and a rerun, loses nothing: the
    /// replicas hold the disks at the base, every point after it is listed and exact.
    /// Half of the reruns use a window that would fold nothing, so only the intent
    /// makes them finish the interrupted step.
    #[test]
    fn crash_at_every_fold_step_loses_nothing() {
        const NOW: u64 = T0 + 20_000;
        let mut runs = 0;
        let mut interrupted = 0;
        for wseed in [11u64, 12] {
            let w = world(wseed, 16);
            let mut j = w.open();
            let before = w.fs.steps();
            let reports = w
                .fold_all(&mut j, &Pins::new(), &small_steps(10), NOW)
                .unwrap();
            let total = w.fs.steps() - before;
            let final_base = j.base_seq();
            assert!(reports.len() > 1 && total > 8, "{total} steps");
            for step in 1..=total {
                for cseed in 0..6u64 {
                    let what = format!("world {wseed} step {step}/{total} crash seed {cseed}");
                    let w = world(wseed, 16);
                    let mut j = w.open();
                    w.fs.crash_after(step);
                    let r = w.fold_all(&mut j, &Pins::new(), &small_steps(10), NOW);
                    assert!(r.is_err(), "{what}: the crash did not hit");
                    drop(j);
                    w.fs.crash(if cseed == 0 {
                        CrashMode::DropUnsynced
                    } else {
                        CrashMode::Torn { seed: cseed }
                    });
                    let mut j = w.open();
                    let pins = Pins::new();
                    let long = cseed % 2 == 1;
                    let pol = small_steps(if long { 1_000_000 } else { 10 });
                    let again = w
                        .fold_all(&mut j, &pins, &pol, NOW)
                        .unwrap_or_else(|e| panic!("{what}: rerun: {e}"));
                    interrupted += again
                        .iter()
                        .filter(|r| r.reason == Reason::Interrupted)
                        .count();
                    w.check(&j, &what);
                    if !long {
                        assert_eq!(j.base_seq(), final_base, "{what}");
                    }
                    runs += 1;
                }
            }
        }
        eprintln!("{runs} crashes, {interrupted} interrupted folds finished");
        assert!(interrupted > 0, "no crash left an interrupted fold");
    }
}
