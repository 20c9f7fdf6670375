//! The journal: the master target's per-group, append-only, durable log of frames.
//!
//! A group's journal lives in one directory. It holds data frames and recovery-point
//! frames exactly as they came off the wire (the bytes that [`crate::frame`] verified:
//! never re-encoded, never re-compressed), in segment files, plus a small state file
//! that remembers how far the caller has folded the journal into the replicas (the
//! *base*). In memory it keeps an index only: one small [`FrameEntry`] per frame and one
//! [`PointEntry`] per recovery point, never frame data (except the frames appended since
//! the last [`Journal::commit`], see below), and the records of the active segment's
//! index ([`segindex`]: a few dozen bytes a frame, at most the segment's size).
//!
//! # Sequence rule
//!
//! Frame seqs of a group are contiguous and start at 1. [`Journal::append`] takes exactly
//! [`Journal::next_seq`]; a lower seq is a [`JournalError::Duplicate`], a higher one a
//! [`JournalError::Gap`], and neither writes anything. Three positions are tracked and
//! their order is asserted after every change:
//! `write_seq >= durable_seq >= base_seq`.
//!
//! - `write_seq`: the last frame appended (readable, not necessarily durable);
//! - `durable_seq`: the last frame made durable by a sync (what the master target acks);
//! - `base_seq`: frames up to it were folded into the replicas by the caller and may be
//!   deleted; they are no longer readable.
//!
//! # Files
//!
//! | name                                   | what                                              |
//! |----------------------------------------|---------------------------------------------------|
//! | `journal-<first_seq, 20 digits>.seg`   | a segment: header, then frames back to back       |
//! | `journal-<first_seq, 20 digits>.idx`   | a sealed segment's index ([`segindex`]): derived, written when the segment is sealed |
//! | `journal.state`                        | the base seq, replaced with [`storage::write_atomic`] |
//! | `journal.state.tmp`                    | a leftover of an interrupted replace; ignored     |
//! | `journal-<first_seq>.idx.tmp`          | a leftover of an interrupted index write; removed on open |
//!
//! Other names in the directory are ignored, among them the retention fold's intent
//! `retention.intent` ([`crate::retention`]).
//!
//! ## Segment header, version 1 (all integers little-endian)
//!
//! | offset | size | field        | meaning                                                   |
//! |-------:|-----:|--------------|-----------------------------------------------------------|
//! | 0      | 8    | `magic`      | `b"BRJRNSEG"` ([`SEGMENT_MAGIC`]); never modify           |
//! | 8      | 2    | `version`    | [`VERSION`]; readers refuse versions they do not know     |
//! | 10     | 1    | `group_len`  | length of the group id, 1..=64                            |
//! | 11     | 1    | `reserved0`  | must be 0                                                 |
//! | 12     | 4    | `reserved1`  | must be 0                                                 |
//! | 16     | 8    | `first_seq`  | seq of the segment's first frame; equals the file name    |
//! | 24     | 64   | `group`      | the group id, zero-padded (padding must be 0)             |
//! | 88     | 8    | `synced_seq` | frames up to this seq are durable (the *mark*), see below |
//! | 96     | 28   | `reserved2`  | must be 0                                                 |
//! | 124    | 4    | `crc32`      | crc32 (IEEE) of bytes 0..124                              |
//!
//! `synced_seq` is at least `first_seq - 1` (a new segment starts with the durable seq
//! at its creation, which is `first_seq - 1`) and never beyond the segment's last
//! frame; a header breaking either rule is refused ([`JournalError::BadHeader`] naming
//! `synced_seq`). Every commit rewrites the active segment's header to move the mark
//! (see the order of writes below); the header of a closed segment keeps its last mark.
//!
//! The header is 128 bytes ([`SEGMENT_HEADER_BYTES`]), not 64: a group id may be 64
//! bytes long and is stored whole, so that a misplaced segment names its real group.
//! After the header come whole frames, each self-delimiting (its 32-byte frame header
//! carries `body_len` and the crc, see [`crate::frame`]). Frame seqs in a segment run
//! `first_seq, first_seq + 1, ...`, and the next segment starts where this one ends.
//! A segment takes new frames until the next one would take it past
//! [`JournalConfig::segment_bytes_max`]; a frame larger than that gets a segment of its own.
//!
//! ## State file `journal.state`, version 1
//!
//! | offset | size | field       | meaning                                                 |
//! |-------:|-----:|-------------|---------------------------------------------------------|
//! | 0      | 8    | `magic`     | `b"BRJSTATE"` ([`STATE_MAGIC`]); never modify            |
//! | 8      | 2    | `version`   | [`VERSION`]                                             |
//! | 10     | 1    | `group_len` | 1..=64                                                  |
//! | 11     | 1    | `reserved0` | must be 0                                               |
//! | 12     | 4    | `reserved1` | must be 0                                               |
//! | 16     | 8    | `base_seq`  | frames up to it were folded by the caller               |
//! | 24     | 64   | `group`     | the group id, zero-padded                               |
//! | 88     | 4    | `reserved2` | must be 0                                               |
//! | 92     | 4    | `crc32`     | crc32 (IEEE) of bytes 0..92                             |
//!
//! A missing state file means base 0.
//!
//! # Order of writes and syncs
//!
//! | operation          | order                                                                    |
//! |--------------------|--------------------------------------------------------------------------|
//! | append             | frame verified -> written at the end of the active segment (not synced)  |
//! | commit             | the segment header rewritten with `synced_seq` = the durable seq *before* this commit -> ONE `sync_data` of the segment, covering every frame appended since the last commit -> its synced whole pages let go of from the page cache (a hint, [`StorageFile::drop_cached`]) |
//! | roll (new segment) | commit of the old segment -> its index written ([`storage::write_atomic`], best effort) -> new file created -> header (`synced_seq` = `first_seq - 1`) written -> `sync_data` -> `sync_dir` |
//! | drop_through(seq)  | state file replaced ([`storage::write_atomic`]) -> whole segments <= seq removed, each after its index -> `sync_dir` |
//! | open               | every segment verified (a sealed one through its index when it has a usable one, see below; an index found missing or unusable is written anew once its segment is verified) -> segments wholly <= base removed -> torn tail cut (`set_len`) -> stray indexes removed -> `sync_data` of the last segment -> `sync_dir` |
//! | [`remove_all`]     | (the caller's durable record that the journal is dropped) -> every segment and index (newest first), the state file and its temp removed -> `sync_dir` |
//!
//! **Why the header carries a mark.** A crash may keep any subset of the writes issued
//! since the last sync, and of the pages of one write: the page cache writes a large
//! write back page by page, in any order (a disk and [`crate::storage::SimFs`] alike).
//! So a crash during a commit of several frames can leave a hole followed by an intact
//! frame of that same, never acknowledged, batch; by the bytes alone this is
//! indistinguishable from rot in the middle of the log. The mark tells them apart: it
//! names only frames that a previous sync already made durable, so it is true however
//! the writes of the current commit tear, and every frame past it belongs to the
//! commit a crash may have interrupted. The header is 128 bytes at the start of the
//! file, inside the first 512-byte sector, and rewriting it is assumed to leave it
//! whole or not at all: a disk writes a sector atomically (SimFs tears at sector
//! granularity too). Either the new mark or the old one then survives, both true.
//!
//! Appends are written straight to the segment (no copy in memory): the mark makes any
//! order in which they reach the disk safe, so a commit costs one header write and one
//! sync however many frames it covers.
//!
//! The segment is synced before the next one is created, so only the last segment can
//! ever hold un-synced bytes: damage anywhere else is rot, never a crash.
//!
//! # Recovery policy
//!
//! [`Journal::open`] verifies every frame header, length and crc of the last segment,
//! and of every sealed segment not wholly folded that has no usable index, then applies
//! [`RecoveryMode`]. A sealed segment with a usable index ([`segindex::load`]: the
//! index whole by its crcs, and agreeing with the segment's length, header and last
//! frame header) is not read: its frames and points come from the index. So opening
//! reads one small file per sealed segment plus the last segment, whatever the
//! journal's bytes; rot inside a sealed segment's frames is then found when the frame
//! is read back ([`Journal::read`] re-verifies every crc; so do the fold, a failback
//! and a recovery-point view), not on open. The index is written before the next
//! segment exists, so a crash never leaves a sealed segment without one; a journal
//! from before indexes, or one whose index could not be written, gets them on open.
//!
//! - In both modes, every frame of every segment but the last, and every frame of the
//!   last segment up to its header's `synced_seq`, must be intact: damage there is a
//!   [`JournalError::Corruption`], and a mark beyond the frames present is a
//!   [`JournalError::BadHeader`] naming `synced_seq`.
//! - [`RecoveryMode::AbsoluteConsistency`]: any bad byte is an error.
//! - [`RecoveryMode::TolerateTailCorruption`] (default): the first bad spot of the last
//!   segment *after* the mark is a torn tail: the segment is cut there (truncate, sync),
//!   whatever valid-looking frames follow it (they can only belong to the batch whose
//!   commit never returned), and the bytes cut are reported in
//!   [`JournalRecovery::truncated_bytes`]. A last segment whose header is missing or all
//!   zero (a crash while it was created) is removed.
//!
//! After a tail cut the journal is synced and the next commit moves the mark as usual.
//!
//! ## Known gaps
//!
//! The mark trails the acknowledged frames by one commit: a frame of the *last* commit
//! that was acknowledged and later rots on disk is cut in Tolerate mode (and reported
//! in [`JournalRecovery::truncated_bytes`]) instead of refused, because it is
//! indistinguishable from a torn tail. Every earlier frame is protected by the mark.
//! [`RecoveryMode::AbsoluteConsistency`] refuses it, as it refuses any bad byte.
//! A disk that tears inside a 512-byte sector could tear the header; that is outside
//! the model (see above), and a torn header is refused, never silently trusted.
//!
//! Every error on open is raised before anything on disk is changed, apart from the
//! indexes written for sealed segments verified until then (derived files, correct
//! whatever follows).

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

use crate::frame::{self, FrameError, FrameHeader, FrameKind, PointKind, PointRecord};
use crate::storage::{self, OpenMode, Storage, StorageFile, synced_whole_pages};

pub mod segindex;
use segindex::{Detail, IndexBuilder};

/// Format version of the segment header and the state file.
pub const VERSION: u16 = 1;
/// Segment magic. Never modify: it names the format of every journal segment on disk.
pub const SEGMENT_MAGIC: [u8; 8] = *b"BRJRNSEG";
/// State file magic. Never modify: it names the format of every journal state file.
pub const STATE_MAGIC: [u8; 8] = *b"BRJSTATE";
/// Size of the segment header.
pub const SEGMENT_HEADER_BYTES: usize = 128;
/// Size of the state file.
pub const STATE_BYTES: usize = 96;
/// Name of the state file.
pub const STATE_FILE: &str = "journal.state";
/// Smallest allowed [`JournalConfig::segment_bytes_max`].
pub const SEGMENT_BYTES_MIN: u64 = 1024;
/// Largest allowed [`JournalConfig::segment_bytes_max`].
pub const SEGMENT_BYTES_LIMIT: u64 = 16 << 30;
/// Default [`JournalConfig::segment_bytes_max`].
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 << 20;

/// Room for a group id in the fixed headers.
const GROUP_FIELD_BYTES: usize = 64;
/// Offsets shared by the segment header and the state file.
const OFF_VERSION: usize = 8;
const OFF_GROUP_LEN: usize = 10;
const OFF_RESERVED0: usize = 11;
const OFF_RESERVED1: usize = 12;
const OFF_SEQ: usize = 16;
const OFF_GROUP: usize = 24;
/// Start of `reserved2` in the state file; the segment header has `synced_seq` there.
const OFF_RESERVED2: usize = OFF_GROUP + GROUP_FIELD_BYTES;
const OFF_SYNCED_SEQ: usize = OFF_RESERVED2;
const OFF_SEGMENT_RESERVED2: usize = OFF_SYNCED_SEQ + 8;
const SEGMENT_CRC_OFFSET: usize = SEGMENT_HEADER_BYTES - 4;
const STATE_CRC_OFFSET: usize = STATE_BYTES - 4;

const _: () = assert!(OFF_RESERVED2 == 88 && OFF_SEGMENT_RESERVED2 == 96);
// The header must sit in the first 512-byte sector: it is rewritten in place on every
// commit and relies on a sector being written whole or not at all.
const _: () = assert!(SEGMENT_HEADER_BYTES <= 512);
const _: () = assert!(SEGMENT_CRC_OFFSET == 124 && STATE_CRC_OFFSET == 92);
const _: () =
    assert!(SEGMENT_HEADER_BYTES as u64 + frame::HEADER_BYTES as u64 <= SEGMENT_BYTES_MIN);

/// What [`Journal::open`] does with a damaged tail.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RecoveryMode {
    /// Any bad byte anywhere is an error; nothing is cut.
    AbsoluteConsistency,
    /// The last segment is cut at its first bad spot past the header's mark (a torn
    /// tail); damage at or below the mark, or in an earlier segment, is an error.
    #[default]
    TolerateTailCorruption,
}

/// How a journal is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalConfig {
    /// A segment takes no frame that would take it past this many bytes (unless empty).
    pub segment_bytes_max: u64,
    /// Policy for a damaged tail on open.
    pub recovery: RecoveryMode,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            segment_bytes_max: SEGMENT_BYTES_DEFAULT,
            recovery: RecoveryMode::default(),
        }
    }
}

/// What [`Journal::open`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JournalRecovery {
    /// Frames after the base, now in the index.
    pub frames: u64,
    /// Points after the base, now in the index.
    pub points: usize,
    /// Bytes cut from a torn or corrupt tail past the mark (including a removed
    /// header-less segment). This includes a frame of the last acknowledged commit that
    /// rotted on disk, which cannot be told from a torn tail (see the module doc).
    pub truncated_bytes: u64,
    /// Segments removed because every frame in them was folded (an interrupted drop).
    pub segments_deleted: usize,
    /// Sealed segments whose frames and points came from their index file
    /// ([`segindex`]), without reading the frames.
    pub segments_indexed: usize,
    /// Sealed segments without a usable index (first seq, why: missing, stale,
    /// corrupt): their frames were verified and the index written anew.
    pub indexes_rebuilt: Vec<(u64, String)>,
    /// Index files that could not be written or removed (the journal works without
    /// them; the next open tries again).
    pub index_errors: Vec<String>,
}

/// Where one frame lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameEntry {
    pub seq: u64,
    /// The `first_seq` of the segment that holds it.
    pub segment: u64,
    /// Byte offset of the frame in its segment.
    pub offset: u64,
    /// Whole frame length, header included.
    pub len: u32,
    pub kind: FrameKind,
}

/// One segment file, as [`Journal::segments`] lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Seq of its first frame (also in its name).
    pub first_seq: u64,
    /// Bytes in the file, header included.
    pub bytes: u64,
}

/// A recovery point in the index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PointEntry {
    pub record: PointRecord,
    /// Seq of the point frame.
    pub seq: u64,
}

/// Why the journal refused something. Each case says what and where.
#[derive(Debug, Error)]
pub enum JournalError {
    #[error("journal I/O: {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("journal corruption in {} at byte {offset}: {why}", segment.display())]
    Corruption {
        segment: PathBuf,
        offset: u64,
        why: String,
    },
    #[error("{}: bad magic {found:02x?}, expected {expected:02x?}", file.display())]
    BadMagic {
        file: PathBuf,
        found: [u8; 8],
        expected: [u8; 8],
    },
    #[error("{}: unsupported version {version} (this build reads version {VERSION})", file.display())]
    UnsupportedVersion { file: PathBuf, version: u16 },
    #[error("{}: belongs to group {found:?}, not {expected:?}", file.display())]
    WrongGroup {
        file: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{}: invalid {field}: {why}", file.display())]
    BadHeader {
        file: PathBuf,
        field: &'static str,
        why: String,
    },
    #[error("frame refused: {0}")]
    Frame(#[from] FrameError),
    #[error("a {0:?} frame does not belong in a journal")]
    WrongKind(FrameKind),
    #[error("frame seq {seq} is already journaled (next is {next_seq})")]
    Duplicate { seq: u64, next_seq: u64 },
    #[error("frame seq {got} leaves a gap: expected {expected}")]
    Gap { expected: u64, got: u64 },
    #[error("point of group {found:?} refused by the journal of group {expected:?}")]
    PointGroup { expected: String, found: String },
    #[error("point id {point_id} does not rise above the latest point id {latest}")]
    PointIdNotRising { point_id: u64, latest: u64 },
    #[error("no point {0} in the journal")]
    UnknownPoint(u64),
    #[error("frames {from}..={to} are not readable: the journal holds {first}..={last}")]
    OutOfRange {
        from: u64,
        to: u64,
        first: u64,
        last: u64,
    },
    #[error("cannot drop through {seq}: only {durable} is durable")]
    BeyondDurable { seq: u64, durable: u64 },
    #[error("invalid group id {0:?}")]
    InvalidGroup(String),
    #[error("invalid journal config: {0}")]
    Config(String),
    #[error("journal stopped after an earlier failure ({0}); reopen it")]
    Failed(String),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> JournalError {
    let path = path.to_path_buf();
    move |source| JournalError::Io { what, path, source }
}

/// Name of the segment whose first frame is `first_seq`.
pub fn segment_name(first_seq: u64) -> String {
    format!("journal-{first_seq:020}.seg")
}

/// The first seq a segment file name encodes; `None` when the name is not a segment's.
/// `Some(Err(..))` when it looks like one but the number is malformed.
fn parse_segment_name(name: &str) -> Option<Result<u64, String>> {
    let num = name.strip_prefix("journal-")?.strip_suffix(".seg")?;
    if num.len() != 20 || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Err(format!("segment name {name:?} lacks a 20-digit seq")));
    }
    match num.parse::<u64>() {
        Ok(0) => Some(Err(format!("segment name {name:?} has seq 0"))),
        Ok(n) => Some(Ok(n)),
        Err(e) => Some(Err(format!("segment name {name:?}: {e}"))),
    }
}

use crate::le::{u16_at as le_u16, u32_at as le_u32, u64_at as le_u64};

/// Encodes the fixed record shared by the segment header and the state file: `len`
/// bytes, crc in the last four still zero (see [`seal_fixed`]). The caller guarantees
/// `group` is a valid id.
fn encode_fixed(magic: [u8; 8], seq: u64, group: &str, len: usize) -> Vec<u8> {
    assert!(crate::valid_id(group), "invalid group id {group:?}");
    let mut b = vec![0u8; len];
    b[..8].copy_from_slice(&magic);
    b[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&VERSION.to_le_bytes());
    b[OFF_GROUP_LEN] = group.len() as u8;
    b[OFF_SEQ..OFF_SEQ + 8].copy_from_slice(&seq.to_le_bytes());
    b[OFF_GROUP..OFF_GROUP + group.len()].copy_from_slice(group.as_bytes());
    b
}

/// Stores the crc of a fixed record (of everything before it) in its last four bytes.
fn seal_fixed(b: &mut [u8]) {
    let at = b.len() - 4;
    let crc = crc32fast::hash(&b[..at]);
    b[at..].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes and checks a fixed record of exactly `len` bytes (`b` may be shorter: then
/// it is refused), whose `reserved2` runs from `reserved2_from` to the crc. Returns the
/// seq field; checks that the group is `group`.
fn decode_fixed(
    b: &[u8],
    len: usize,
    magic: [u8; 8],
    reserved2_from: usize,
    group: &str,
    file: &Path,
) -> Result<u64, JournalError> {
    let bad = |field: &'static str, why: String| JournalError::BadHeader {
        file: file.to_path_buf(),
        field,
        why,
    };
    if b.len() != len {
        return Err(bad(
            "length",
            format!("{} bytes, the header is {len}", b.len()),
        ));
    }
    let mut found = [0u8; 8];
    found.copy_from_slice(&b[..8]);
    if found != magic {
        return Err(JournalError::BadMagic {
            file: file.to_path_buf(),
            found,
            expected: magic,
        });
    }
    // The version is checked before the crc: a later version may place its crc elsewhere.
    let version = le_u16(b, OFF_VERSION);
    if version != VERSION {
        return Err(JournalError::UnsupportedVersion {
            file: file.to_path_buf(),
            version,
        });
    }
    let stored = le_u32(b, len - 4);
    let actual = crc32fast::hash(&b[..len - 4]);
    if stored != actual {
        return Err(bad(
            "crc32",
            format!("stored {stored:08x}, bytes give {actual:08x}"),
        ));
    }
    if b[OFF_RESERVED0] != 0 {
        return Err(bad("reserved0", "not zero".into()));
    }
    if le_u32(b, OFF_RESERVED1) != 0 {
        return Err(bad("reserved1", "not zero".into()));
    }
    if b[reserved2_from..len - 4].iter().any(|&x| x != 0) {
        return Err(bad("reserved2", "not zero".into()));
    }
    let group_len = b[OFF_GROUP_LEN] as usize;
    if group_len == 0 || group_len > GROUP_FIELD_BYTES {
        return Err(bad("group_len", format!("{group_len} is not in 1..=64")));
    }
    let (id, pad) = b[OFF_GROUP..OFF_RESERVED2].split_at(group_len);
    if pad.iter().any(|&x| x != 0) {
        return Err(bad("group", "padding after the id is not zero".into()));
    }
    let found = match std::str::from_utf8(id) {
        Ok(s) if crate::valid_id(s) => s.to_string(),
        _ => return Err(bad("group", format!("{id:02x?} is not a group id"))),
    };
    if found != group {
        return Err(JournalError::WrongGroup {
            file: file.to_path_buf(),
            expected: group.to_string(),
            found,
        });
    }
    Ok(le_u64(b, OFF_SEQ))
}

/// Reads the state file, or `None` when there is none. A file longer than the format
/// is read only up to one byte past it, which [`decode_state`] then refuses by its
/// length: the file's size never sizes an allocation.
fn read_state_file(fs: &dyn Storage, path: &Path) -> io::Result<Option<Vec<u8>>> {
    if !fs.exists(path) {
        return Ok(None);
    }
    let f = fs.open(path, OpenMode::ReadOnly)?;
    let len = f.len()?.min(STATE_BYTES as u64 + 1) as usize;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, 0)?;
    Ok(Some(buf))
}

/// The fields of a segment header that vary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Seq of the segment's first frame.
    pub first_seq: u64,
    /// Frames up to this seq are durable (the mark; see the module doc).
    pub synced_seq: u64,
}

/// Encodes a segment header. The caller guarantees `group` is a valid id.
pub fn encode_segment_header(group: &str, first_seq: u64, synced_seq: u64) -> Vec<u8> {
    let mut b = encode_fixed(SEGMENT_MAGIC, first_seq, group, SEGMENT_HEADER_BYTES);
    b[OFF_SYNCED_SEQ..OFF_SYNCED_SEQ + 8].copy_from_slice(&synced_seq.to_le_bytes());
    seal_fixed(&mut b);
    b
}

/// Decodes a segment header of `group`. Checks the rules that need no frame: a
/// `first_seq` of at least 1 and `synced_seq >= first_seq - 1`. Whether the frames the
/// mark names are present is checked by the scan on open.
pub fn decode_segment_header(
    b: &[u8],
    group: &str,
    file: &Path,
) -> Result<SegmentHeader, JournalError> {
    let first_seq = decode_fixed(
        b,
        SEGMENT_HEADER_BYTES,
        SEGMENT_MAGIC,
        OFF_SEGMENT_RESERVED2,
        group,
        file,
    )?;
    let bad = |field: &'static str, why: String| JournalError::BadHeader {
        file: file.to_path_buf(),
        field,
        why,
    };
    if first_seq == 0 {
        return Err(bad("first_seq", "0: seqs start at 1".into()));
    }
    let synced_seq = le_u64(b, OFF_SYNCED_SEQ);
    if synced_seq < first_seq - 1 {
        return Err(bad(
            "synced_seq",
            format!(
                "{synced_seq} is below first_seq - 1 = {}: a segment starts with the frames before it durable",
                first_seq - 1
            ),
        ));
    }
    Ok(SegmentHeader {
        first_seq,
        synced_seq,
    })
}

/// Encodes the state file.
pub fn encode_state(group: &str, base_seq: u64) -> Vec<u8> {
    let mut b = encode_fixed(STATE_MAGIC, base_seq, group, STATE_BYTES);
    seal_fixed(&mut b);
    b
}

/// Decodes the state file of `group`; returns the base seq.
pub fn decode_state(b: &[u8], group: &str, file: &Path) -> Result<u64, JournalError> {
    decode_fixed(b, STATE_BYTES, STATE_MAGIC, OFF_RESERVED2, group, file)
}

/// One segment file.
#[derive(Clone, Debug)]
struct Segment {
    first_seq: u64,
    /// Bytes in the segment, including frames not yet committed.
    len_bytes: u64,
    /// Frames in the segment, including those not yet committed.
    frames: u64,
}

/// A group's journal. See the module doc for formats, order of syncs and recovery.
pub struct Journal {
    fs: Arc<dyn Storage>,
    dir: PathBuf,
    group: String,
    cfg: JournalConfig,
    /// Oldest first; the last one is the active segment. Never empty.
    segments: VecDeque<Segment>,
    active: Box<dyn StorageFile>,
    /// Index of the frames after the base, contiguous by seq.
    frames: VecDeque<FrameEntry>,
    points: Vec<PointEntry>,
    base_seq: u64,
    durable_seq: u64,
    write_seq: u64,
    /// Set by the first failed write or sync: the state on disk is then unknown (a failed
    /// fsync may have dropped pages), so the journal refuses changes until reopened.
    failed: Option<String>,
    /// The records of the active segment's frames, written as its index when it is
    /// sealed ([`segindex`]). At most the segment's size (a record is smaller than its
    /// frame), a few dozen bytes a frame.
    index: IndexBuilder,
    /// The last failure to write or remove an index since [`Journal::take_index_error`]:
    /// derived data, so it does not stop the journal.
    index_error: Option<String>,
    /// Bytes of the active segment below which its synced pages were already let go
    /// of ([`Journal::drop_synced_pages`]).
    cached_from: u64,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("dir", &self.dir)
            .field("group", &self.group)
            .field("base_seq", &self.base_seq)
            .field("durable_seq", &self.durable_seq)
            .field("write_seq", &self.write_seq)
            .field("segments", &self.segments.len())
            .finish_non_exhaustive()
    }
}

/// What the scan of one segment on open found.
struct SegmentScan {
    frames: Vec<FrameEntry>,
    points: Vec<PointEntry>,
    /// Seq of the segment's last frame, or `first_seq - 1` when it has none.
    last_seq: u64,
    /// Bytes of the segment that hold the header and valid frames.
    valid_bytes: u64,
    /// Bytes in the file.
    file_bytes: u64,
    /// The records of its valid frames (kept only for the newest segment scanned: it
    /// may be the active one).
    index: Option<IndexBuilder>,
}

/// A change planned on open, applied only after everything was verified.
enum TailFix {
    None,
    /// Cut the last segment to this length.
    Truncate(u64),
    /// Remove the last segment: its header never made it to disk.
    Remove,
}

impl Journal {
    /// Opens the journal of `group` in `dir`, creating it when there is none, and
    /// recovers it as [`JournalConfig::recovery`] says. Every error is raised before
    /// anything on disk changes.
    pub fn open(
        fs: Arc<dyn Storage>,
        dir: &Path,
        group: &str,
        cfg: JournalConfig,
    ) -> Result<(Journal, JournalRecovery), JournalError> {
        if !crate::valid_id(group) {
            return Err(JournalError::InvalidGroup(group.to_string()));
        }
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_LIMIT).contains(&cfg.segment_bytes_max) {
            return Err(JournalError::Config(format!(
                "segment_bytes_max {} is not in {SEGMENT_BYTES_MIN}..={SEGMENT_BYTES_LIMIT}",
                cfg.segment_bytes_max
            )));
        }
        fs.create_dir_all(dir)
            .map_err(io_err("create journal directory", dir))?;
        let names = fs
            .list_dir(dir)
            .map_err(io_err("list journal directory", dir))?;
        let mut segs = Vec::new();
        for name in &names {
            match parse_segment_name(name) {
                None => {}
                Some(Ok(seq)) => segs.push(seq),
                Some(Err(why)) => {
                    return Err(JournalError::Corruption {
                        segment: dir.join(name),
                        offset: 0,
                        why,
                    });
                }
            }
        }
        segs.sort_unstable();
        let state_path = dir.join(STATE_FILE);
        let state = read_state_file(fs.as_ref(), &state_path)
            .map_err(io_err("read journal state", &state_path))?;
        let base_seq = match &state {
            Some(b) => decode_state(b, group, &state_path)?,
            None => 0,
        };

        let mut j = Journal {
            active: Box::new(NoFile),
            fs,
            dir: dir.to_path_buf(),
            group: group.to_string(),
            cfg,
            segments: VecDeque::new(),
            frames: VecDeque::new(),
            points: Vec::new(),
            base_seq,
            durable_seq: base_seq,
            write_seq: base_seq,
            failed: None,
            index: IndexBuilder::default(),
            index_error: None,
            cached_from: 0,
        };
        let mut rec = JournalRecovery::default();

        // Segments whose every frame is folded: the next segment starts at or below
        // base + 1. They are not read, only removed (finishing an interrupted drop).
        let folded = segs
            .windows(2)
            .take_while(|w| w[1] <= base_seq.saturating_add(1))
            .count();
        let (to_delete, kept) = segs.split_at(folded);

        let mut fix = TailFix::None;
        let mut scans: Vec<(u64, SegmentScan)> = Vec::new();
        let mut expected = None::<u64>;
        let mut latest_point_id = None::<u64>;
        for (i, &first_seq) in kept.iter().enumerate() {
            let last = i + 1 == kept.len();
            let path = j.segment_path(first_seq);
            match expected {
                None if first_seq > base_seq.saturating_add(1) => {
                    return Err(JournalError::Corruption {
                        segment: path,
                        offset: 0,
                        why: format!(
                            "the oldest segment starts at seq {first_seq}: frames {}..{first_seq} after the base {base_seq} are missing",
                            base_seq + 1
                        ),
                    });
                }
                Some(e) if e != first_seq => {
                    return Err(JournalError::Corruption {
                        segment: path,
                        offset: 0,
                        why: format!(
                            "segment starts at seq {first_seq}, the one before ends at {}",
                            e - 1
                        ),
                    });
                }
                _ => {}
            }
            // A sealed segment is read from its index when it has a usable one; the
            // last is always scanned (its tail may be torn).
            let indexed = if last {
                Err(String::new())
            } else {
                j.segment_from_index(first_seq, &path, &mut latest_point_id)
            };
            let scan = match indexed {
                Ok(scan) => {
                    rec.segments_indexed += 1;
                    scan
                }
                Err(why) => {
                    let tolerate = last && cfg.recovery == RecoveryMode::TolerateTailCorruption;
                    let scan = j.scan_segment(first_seq, &path, tolerate, &mut latest_point_id)?;
                    let Some(scan) = scan else {
                        // A last segment whose header never reached the disk.
                        fix = TailFix::Remove;
                        break;
                    };
                    if !last {
                        // Verified whole: its index is rebuilt now (derived data; a
                        // failure costs only the next open's scan).
                        j.write_index(first_seq, &scan, &mut rec);
                        rec.indexes_rebuilt.push((first_seq, why));
                    }
                    scan
                }
            };
            if scan.valid_bytes < scan.file_bytes {
                fix = TailFix::Truncate(scan.valid_bytes);
            }
            expected = Some(scan.last_seq + 1);
            // Only the newest segment's records can be the active segment's.
            if let Some((_, prev)) = scans.last_mut() {
                prev.index = None;
            }
            scans.push((first_seq, scan));
        }

        if scans.is_empty() && (state.is_some() || !to_delete.is_empty()) {
            // The active segment is never removed, so a journal that has a state file
            // or older segments has lost its newest segment.
            return Err(JournalError::Corruption {
                segment: dir.to_path_buf(),
                offset: 0,
                why: format!("no usable segment left, yet the state says base {base_seq}"),
            });
        }
        if let Some((first_seq, s)) = scans.last()
            && s.last_seq < base_seq
        {
            return Err(JournalError::Corruption {
                segment: j.segment_path(*first_seq),
                offset: s.valid_bytes,
                why: format!(
                    "frames end at seq {}, below the base {base_seq} folded earlier",
                    s.last_seq
                ),
            });
        }

        // Everything checked: now change the disk.
        for &seq in to_delete {
            let p = j.segment_path(seq);
            j.fs.remove_file(&p)
                .map_err(io_err("remove folded segment", &p))?;
            rec.segments_deleted += 1;
        }
        if let TailFix::Remove = fix {
            let p = j.segment_path(kept[scans.len()]);
            let f =
                j.fs.open(&p, OpenMode::ReadOnly)
                    .map_err(io_err("open segment", &p))?;
            rec.truncated_bytes += f.len().map_err(io_err("size segment", &p))?;
            drop(f);
            j.fs.remove_file(&p)
                .map_err(io_err("remove header-less segment", &p))?;
        }
        // Only sealed segments keep an index: the active one (appends make it stale),
        // folded ones, orphans and temps of an interrupted write go. Made durable by
        // the directory sync below (a removal that does not last is harmless).
        let sealed: Vec<u64> = scans.iter().rev().skip(1).map(|(s, _)| *s).collect();
        let active = scans.last().map(|(s, _)| *s);
        j.remove_stray_indexes(&names, &sealed, active, &mut rec);
        j.index = match scans.last_mut() {
            Some((_, s)) if s.index.is_some() => s.index.take().unwrap_or_default(),
            Some((first_seq, _)) => j.active_records(*first_seq)?,
            None => IndexBuilder::default(),
        };
        if scans.is_empty() {
            if let TailFix::Remove = fix {
                j.fs.sync_dir(dir)
                    .map_err(io_err("sync journal directory", dir))?;
            }
            j.create_first_segment()?;
        } else {
            for (first_seq, scan) in scans {
                for e in scan.frames {
                    if e.seq > base_seq {
                        j.frames.push_back(e);
                    }
                }
                j.points
                    .extend(scan.points.into_iter().filter(|p| p.seq > base_seq));
                j.write_seq = scan.last_seq;
                j.segments.push_back(Segment {
                    first_seq,
                    len_bytes: scan.valid_bytes,
                    frames: scan.last_seq + 1 - first_seq,
                });
            }
            let last = j.segments.back().map(|s| s.first_seq).unwrap_or(1);
            let path = j.segment_path(last);
            let f =
                j.fs.open(&path, OpenMode::Existing)
                    .map_err(io_err("open active segment", &path))?;
            if let TailFix::Truncate(at) = fix {
                let len = f.len().map_err(io_err("size segment", &path))?;
                rec.truncated_bytes += len.saturating_sub(at);
                f.set_len(at).map_err(io_err("cut torn tail", &path))?;
            }
            // Synced even when nothing was cut: a process that was killed (not a machine
            // that lost power) leaves written but un-synced bytes in the page cache, and
            // they must be durable before `durable_seq` covers them.
            f.sync_data()
                .map_err(io_err("sync active segment", &path))?;
            j.fs.sync_dir(dir)
                .map_err(io_err("sync journal directory", dir))?;
            j.active = f;
            j.durable_seq = j.write_seq;
        }
        rec.frames = j.frames.len() as u64;
        rec.points = j.points.len();
        j.check_invariants();
        Ok((j, rec))
    }

    /// A sealed segment's frames and points from its index ([`segindex`]), checked
    /// against the segment and the points before it; `Err(why)` when it has no usable
    /// index (then `latest_point_id` is unchanged and the caller scans the frames).
    fn segment_from_index(
        &self,
        first_seq: u64,
        path: &Path,
        latest_point_id: &mut Option<u64>,
    ) -> Result<SegmentScan, String> {
        let f = self
            .fs
            .open(path, OpenMode::ReadOnly)
            .map_err(|e| format!("open the segment: {e}"))?;
        let index = segindex::load(
            self.fs.as_ref(),
            &self.dir,
            &self.group,
            first_seq,
            f.as_ref(),
        )?
        .ok_or_else(|| "missing".to_string())?;
        let mut latest = *latest_point_id;
        let mut frames = Vec::with_capacity(index.frame_count() as usize);
        let mut points = Vec::new();
        for f in index.frames() {
            frames.push(f.entry);
            let Detail::Point(body) = f.detail else {
                continue;
            };
            let seq = f.entry.seq;
            let record =
                frame::decode_point_body(body).map_err(|e| format!("point of frame {seq}: {e}"))?;
            if record.group != self.group {
                return Err(format!(
                    "point of frame {seq} is of group {:?}",
                    record.group
                ));
            }
            if latest.is_some_and(|l| record.point_id <= l) {
                return Err(format!(
                    "point id {} of frame {seq} does not rise above {}",
                    record.point_id,
                    latest.unwrap_or(0)
                ));
            }
            latest = Some(record.point_id);
            points.push(PointEntry { record, seq });
        }
        *latest_point_id = latest;
        Ok(SegmentScan {
            frames,
            points,
            last_seq: index.last_seq(),
            valid_bytes: index.segment_bytes(),
            file_bytes: index.segment_bytes(),
            // Needed only when this segment turns out to be the active one: see
            // `active_records`.
            index: None,
        })
    }

    /// The index records of segment `first_seq`, which was read through its index and
    /// now is the active one (the segment after it had no header and was removed):
    /// from its index again, or from its frames.
    fn active_records(&self, first_seq: u64) -> Result<IndexBuilder, JournalError> {
        let path = self.segment_path(first_seq);
        let f = self
            .fs
            .open(&path, OpenMode::ReadOnly)
            .map_err(io_err("open segment", &path))?;
        let loaded = segindex::load(
            self.fs.as_ref(),
            &self.dir,
            &self.group,
            first_seq,
            f.as_ref(),
        );
        if let Ok(Some(index)) = loaded {
            return Ok(IndexBuilder::from_index(&index));
        }
        // Its points rise (checked when it was read through its index).
        let scan = self.scan_segment(first_seq, &path, false, &mut None)?;
        Ok(scan.and_then(|s| s.index).unwrap_or_default())
    }

    /// Writes the index of the sealed segment `first_seq` from the records of `scan`
    /// (best effort: the journal works without it; a failure is reported in `rec`).
    fn write_index(&self, first_seq: u64, scan: &SegmentScan, rec: &mut JournalRecovery) {
        let Some(b) = &scan.index else {
            return;
        };
        let bytes = b.encode(&self.group, first_seq, scan.valid_bytes);
        if let Err(e) = segindex::write(self.fs.as_ref(), &self.dir, first_seq, &bytes) {
            rec.index_errors.push(format!(
                "write segment index {}: {e}",
                self.dir.join(segindex::index_name(first_seq)).display()
            ));
        }
    }

    /// Removes every index file among `names` (the directory as open found it) that is
    /// not the index of one of the `sealed` segments, every temp of one, and the
    /// active segment's (best effort, reported in `rec`).
    fn remove_stray_indexes(
        &self,
        names: &[String],
        sealed: &[u64],
        active: Option<u64>,
        rec: &mut JournalRecovery,
    ) {
        let mut stray: Vec<String> = names
            .iter()
            .filter(|n| {
                segindex::parse_index_name(n)
                    .is_some_and(|s| n.ends_with(".tmp") || !sealed.contains(&s))
            })
            .cloned()
            .collect();
        // One written by this open for a segment that then turned out to be the active one.
        if let Some(active) = active {
            let name = segindex::index_name(active);
            if !stray.contains(&name) {
                stray.push(name);
            }
        }
        for name in stray {
            let p = self.dir.join(&name);
            match self.fs.remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => rec
                    .index_errors
                    .push(format!("remove {}: {e}", p.display())),
            }
        }
    }

    /// Creates the first segment of an empty journal, at seq `base_seq + 1`.
    fn create_first_segment(&mut self) -> Result<(), JournalError> {
        let first_seq = self.base_seq + 1;
        self.active = self.create_segment(first_seq)?;
        if let Some(parent) = self.dir.parent()
            && !parent.as_os_str().is_empty()
        {
            // The journal directory itself may be new: make its name durable too.
            self.fs
                .sync_dir(parent)
                .map_err(io_err("sync parent directory", parent))?;
        }
        self.segments.push_back(Segment {
            first_seq,
            len_bytes: SEGMENT_HEADER_BYTES as u64,
            frames: 0,
        });
        self.write_seq = self.base_seq;
        self.durable_seq = self.base_seq;
        Ok(())
    }

    /// Creates a segment file: header written, synced, directory synced. Its mark is
    /// the durable seq now, which is `first_seq - 1`: the segment before it (if any)
    /// was committed first.
    fn create_segment(&self, first_seq: u64) -> Result<Box<dyn StorageFile>, JournalError> {
        assert_eq!(
            self.durable_seq,
            first_seq - 1,
            "a segment is created only when every frame before it is durable"
        );
        let path = self.segment_path(first_seq);
        let f = self
            .fs
            .open(&path, OpenMode::CreateNew)
            .map_err(io_err("create segment", &path))?;
        let header = encode_segment_header(&self.group, first_seq, self.durable_seq);
        f.write_all_at(&header, 0)
            .map_err(io_err("write segment header", &path))?;
        f.sync_data()
            .map_err(io_err("sync segment header", &path))?;
        self.fs
            .sync_dir(&self.dir)
            .map_err(io_err("sync journal directory", &self.dir))?;
        Ok(f)
    }

    /// Verifies one segment. `Ok(None)`: the (last) segment has no header on disk and
    /// `tolerate` allows removing it. Frames up to the header's mark must be intact and
    /// present. With `tolerate`, the first bad spot after the mark ends the scan
    /// (`valid_bytes < file_bytes`): a torn tail; otherwise it is an error.
    fn scan_segment(
        &self,
        first_seq: u64,
        path: &Path,
        tolerate: bool,
        latest_point_id: &mut Option<u64>,
    ) -> Result<Option<SegmentScan>, JournalError> {
        let f = self
            .fs
            .open(path, OpenMode::ReadOnly)
            .map_err(io_err("open segment", path))?;
        let file_bytes = f.len().map_err(io_err("size segment", path))?;
        let head_len = file_bytes.min(SEGMENT_HEADER_BYTES as u64) as usize;
        let mut head = vec![0u8; head_len];
        f.read_exact_at(&mut head, 0)
            .map_err(io_err("read segment header", path))?;
        if tolerate && file_bytes <= SEGMENT_HEADER_BYTES as u64 && head.iter().all(|&b| b == 0) {
            // Created, but the header write never reached the disk: the crash came
            // before the header's sync, so no frame can have followed.
            return Ok(None);
        }
        let header = decode_segment_header(&head, &self.group, path)?;
        if header.first_seq != first_seq {
            return Err(JournalError::BadHeader {
                file: path.to_path_buf(),
                field: "first_seq",
                why: format!(
                    "header says {}, the file name {first_seq}",
                    header.first_seq
                ),
            });
        }
        let synced_seq = header.synced_seq;
        let mut scan = SegmentScan {
            frames: Vec::new(),
            points: Vec::new(),
            last_seq: first_seq - 1,
            valid_bytes: SEGMENT_HEADER_BYTES as u64,
            file_bytes,
            index: Some(IndexBuilder::default()),
        };
        let mut offset = SEGMENT_HEADER_BYTES as u64;
        let mut buf = Vec::new();
        while offset < file_bytes {
            let expected = scan.last_seq + 1;
            let bad = match read_frame_at(f.as_ref(), offset, file_bytes, &mut buf) {
                Ok(h) => {
                    // The bytes are intact (crc): anything wrong now is not a torn write
                    // but a wrong frame, and no recovery mode cuts it.
                    let corrupt = |why: String| JournalError::Corruption {
                        segment: path.to_path_buf(),
                        offset,
                        why,
                    };
                    if h.seq != expected {
                        return Err(corrupt(format!(
                            "frame seq {} where {expected} belongs",
                            h.seq
                        )));
                    }
                    if h.seq == u64::MAX {
                        // No seq can follow it: never written by a journal.
                        return Err(corrupt(format!("frame seq {} is the last one", h.seq)));
                    }
                    match h.kind {
                        FrameKind::Data => {}
                        FrameKind::Point => {
                            let (_, record) = frame::decode_point(&buf)
                                .map_err(|e| corrupt(format!("point frame: {e}")))?;
                            if record.group != self.group {
                                return Err(corrupt(format!(
                                    "point of group {:?} in the journal of {:?}",
                                    record.group, self.group
                                )));
                            }
                            if let Some(l) = *latest_point_id
                                && record.point_id <= l
                            {
                                return Err(corrupt(format!(
                                    "point id {} does not rise above {l}",
                                    record.point_id
                                )));
                            }
                            *latest_point_id = Some(record.point_id);
                            scan.points.push(PointEntry { record, seq: h.seq });
                        }
                        k => return Err(corrupt(format!("a {k:?} frame in the journal"))),
                    }
                    scan.frames.push(FrameEntry {
                        seq: h.seq,
                        segment: first_seq,
                        offset,
                        len: h.frame_len() as u32,
                        kind: h.kind,
                    });
                    if let Some(b) = scan.index.as_mut() {
                        b.push(&buf, &h);
                    }
                    scan.last_seq = h.seq;
                    offset += h.frame_len() as u64;
                    scan.valid_bytes = offset;
                    continue;
                }
                Err(why) => why,
            };
            let corrupt = |why: String| JournalError::Corruption {
                segment: path.to_path_buf(),
                offset,
                why,
            };
            if !tolerate {
                return Err(corrupt(bad));
            }
            if expected <= synced_seq {
                // The mark says this frame was durable before the last commit began:
                // no crash can have torn it.
                return Err(corrupt(format!(
                    "{bad}; frame {expected} is at or below the header's synced_seq {synced_seq}, so this is not a torn tail"
                )));
            }
            // Past the mark: the batch of a commit that never returned, torn.
            break;
        }
        if scan.last_seq < synced_seq {
            return Err(JournalError::BadHeader {
                file: path.to_path_buf(),
                field: "synced_seq",
                why: format!(
                    "says frames through {synced_seq} are durable, but the segment ends after frame {}",
                    scan.last_seq
                ),
            });
        }
        Ok(Some(scan))
    }

    fn segment_path(&self, first_seq: u64) -> PathBuf {
        self.dir.join(segment_name(first_seq))
    }

    fn check_invariants(&self) {
        assert!(
            self.write_seq >= self.durable_seq && self.durable_seq >= self.base_seq,
            "journal positions out of order: write {} durable {} base {}",
            self.write_seq,
            self.durable_seq,
            self.base_seq
        );
        assert!(!self.segments.is_empty(), "journal without a segment");
    }

    fn check_usable(&self) -> Result<(), JournalError> {
        match &self.failed {
            Some(why) => Err(JournalError::Failed(why.clone())),
            None => Ok(()),
        }
    }

    /// Records a failed write or sync: after it the journal refuses changes.
    fn fail<T>(&mut self, r: Result<T, JournalError>) -> Result<T, JournalError> {
        if let Err(e) = &r {
            self.failed = Some(e.to_string());
        }
        r
    }

    /// The group this journal belongs to.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The seq the next [`Journal::append`] must carry.
    pub fn next_seq(&self) -> u64 {
        self.write_seq + 1
    }

    /// The last frame appended (0 when none ever was).
    pub fn write_seq(&self) -> u64 {
        self.write_seq
    }

    /// The last frame made durable; what the master target may acknowledge.
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// Frames up to this seq were folded into the replicas and are no longer readable.
    pub fn base_seq(&self) -> u64 {
        self.base_seq
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// The segment files, oldest first: where each starts and how many bytes it holds
    /// (frames not yet committed included). The retention fold plans with it: a
    /// [`Journal::drop_through`] removes whole segments only, never the active one.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.segments
            .iter()
            .map(|s| SegmentInfo {
                first_seq: s.first_seq,
                bytes: s.len_bytes,
            })
            .collect()
    }

    /// Bytes of every segment file (headers included): what the journal occupies on
    /// disk, apart from its 96-byte state file.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len_bytes).sum()
    }

    /// The journal's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file system the journal lives on (a file next to it, such as the retention
    /// fold's intent, must be written through the same one).
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.fs
    }

    /// Appends one whole frame (a data or point frame as verified off the wire): writes it
    /// at the end of the active segment. It must carry [`Journal::next_seq`]. Not durable
    /// until [`Journal::commit`]. Returns its seq.
    pub fn append(&mut self, frame: &[u8]) -> Result<u64, JournalError> {
        self.check_usable()?;
        let h = frame::verify(frame)?;
        let next_seq = self.next_seq();
        if h.seq < next_seq {
            return Err(JournalError::Duplicate {
                seq: h.seq,
                next_seq,
            });
        }
        if h.seq > next_seq {
            return Err(JournalError::Gap {
                expected: next_seq,
                got: h.seq,
            });
        }
        let point = match h.kind {
            FrameKind::Data => None,
            FrameKind::Point => {
                let (_, record) = frame::decode_point(frame)?;
                if record.group != self.group {
                    return Err(JournalError::PointGroup {
                        expected: self.group.clone(),
                        found: record.group,
                    });
                }
                if let Some(latest) = self.points.last()
                    && record.point_id <= latest.record.point_id
                {
                    return Err(JournalError::PointIdNotRising {
                        point_id: record.point_id,
                        latest: latest.record.point_id,
                    });
                }
                Some(record)
            }
            k => return Err(JournalError::WrongKind(k)),
        };
        let len = frame.len() as u64;
        let active = self.segments.back().map(|s| (s.frames, s.len_bytes));
        if let Some((frames, len_bytes)) = active
            && frames > 0
            && len_bytes + len > self.cfg.segment_bytes_max
        {
            let r = self.roll(h.seq);
            self.fail(r)?;
        }
        let seg = self
            .segments
            .back()
            .expect("a journal always has an active segment");
        let (offset, segment) = (seg.len_bytes, seg.first_seq);
        let path = self.active_path();
        let r = self
            .active
            .write_all_at(frame, offset)
            .map_err(io_err("write frame", &path));
        self.fail(r)?;
        let seg = self
            .segments
            .back_mut()
            .expect("a journal always has an active segment");
        seg.len_bytes += len;
        seg.frames += 1;
        self.index.push(frame, &h);
        self.frames.push_back(FrameEntry {
            seq: h.seq,
            segment,
            offset,
            len: len as u32,
            kind: h.kind,
        });
        if let Some(record) = point {
            self.points.push(PointEntry { record, seq: h.seq });
        }
        self.write_seq = h.seq;
        self.check_invariants();
        Ok(h.seq)
    }

    /// Makes every frame appended so far durable with one rewrite of the segment header
    /// (its mark) and one `sync_data` (group commit).
    /// Returns the durable seq. Without new frames it does nothing.
    pub fn commit(&mut self) -> Result<u64, JournalError> {
        self.check_usable()?;
        let r = self.flush();
        self.fail(r)?;
        Ok(self.durable_seq)
    }

    /// Rewrites the active segment's header, whose mark moves to
    /// the durable seq before this commit (already true, however the writes tear), then
    /// syncs the active segment once.
    fn flush(&mut self) -> Result<(), JournalError> {
        if self.durable_seq == self.write_seq {
            return Ok(());
        }
        let path = self.active_path();
        let first_seq = self.segments.back().map(|s| s.first_seq).unwrap_or(1);
        let header = encode_segment_header(&self.group, first_seq, self.durable_seq);
        self.active
            .write_all_at(&header, 0)
            .map_err(io_err("write segment header", &path))?;
        self.active
            .sync_data()
            .map_err(io_err("sync frames", &path))?;
        self.durable_seq = self.write_seq;
        self.drop_synced_pages();
        self.check_invariants();
        Ok(())
    }

    /// Lets the page cache drop the active segment's pages that this commit made
    /// durable ([`StorageFile::drop_cached`], a hint). Frames are written once and read
    /// again only by a fold, an export or a failback, mostly long after; kept, they
    /// would grow the cache by every byte journaled, and each new write would land in
    /// memory the kernel has to find anew. Measured (`bench --only replication`,
    /// incompressible data, 2 GiB, interleaved runs on a 2-vCPU VM): the master target
    /// spent 2.1-2.5 CPU s per GB with the pages kept and 1.6-1.8 with them dropped, a
    /// third of its time having gone into copying frames into freshly allocated cache
    /// pages. The header page (rewritten by every commit) and the partial last page (the
    /// next append writes into it, which would read it back from the disk first) stay.
    fn drop_synced_pages(&mut self) {
        let len = self.segments.back().map_or(0, |s| s.len_bytes);
        if let Some((start, end)) = synced_whole_pages(self.cached_from, len) {
            // A hint: a failure costs memory, never correctness.
            let _ = self.active.drop_cached(start, end - start);
            self.cached_from = end;
        }
    }

    fn active_path(&self) -> PathBuf {
        self.segment_path(self.segments.back().map(|s| s.first_seq).unwrap_or(1))
    }

    /// Closes the active segment (its frames written and synced) and starts a new one
    /// whose first frame will be `first_seq`.
    fn roll(&mut self, first_seq: u64) -> Result<(), JournalError> {
        self.flush()?;
        self.seal_index();
        let f = self.create_segment(first_seq)?;
        self.active = f;
        self.cached_from = 0;
        self.segments.push_back(Segment {
            first_seq,
            len_bytes: SEGMENT_HEADER_BYTES as u64,
            frames: 0,
        });
        self.index = IndexBuilder::default();
        Ok(())
    }

    /// Writes the index of the active segment, whose frames were just synced, before
    /// it is sealed (best effort: see [`Journal::take_index_error`]).
    fn seal_index(&mut self) {
        let Some(seg) = self.segments.back() else {
            return;
        };
        assert_eq!(
            self.index.frames(),
            seg.frames,
            "the active segment's index lists every frame of it"
        );
        let bytes = self.index.encode(&self.group, seg.first_seq, seg.len_bytes);
        if let Err(e) = segindex::write(self.fs.as_ref(), &self.dir, seg.first_seq, &bytes) {
            self.index_error = Some(format!(
                "write segment index {}: {e}",
                self.dir.join(segindex::index_name(seg.first_seq)).display()
            ));
        }
    }

    /// The last failure to write or remove a segment index since the previous call.
    /// The journal works on without it (a reader then reads the segment's frames, and
    /// the next open writes it); the caller logs it.
    pub fn take_index_error(&mut self) -> Option<String> {
        self.index_error.take()
    }

    /// Records that the caller folded every frame up to `seq` into the replicas: the
    /// base moves there (durably, first), whole segments up to it are removed (never the
    /// active one), and points up to it leave the index. A `seq` at or below the base
    /// does nothing. Returns the number of segments removed.
    pub fn drop_through(&mut self, seq: u64) -> Result<usize, JournalError> {
        self.check_usable()?;
        if seq <= self.base_seq {
            return Ok(0);
        }
        if seq > self.durable_seq {
            return Err(JournalError::BeyondDurable {
                seq,
                durable: self.durable_seq,
            });
        }
        let r = self.drop_through_inner(seq);
        self.fail(r)
    }

    fn drop_through_inner(&mut self, seq: u64) -> Result<usize, JournalError> {
        let state = encode_state(&self.group, seq);
        storage::write_atomic(self.fs.as_ref(), &self.dir, STATE_FILE, &state)
            .map_err(io_err("replace journal state", &self.dir.join(STATE_FILE)))?;
        self.base_seq = seq;
        while self.frames.front().is_some_and(|e| e.seq <= seq) {
            self.frames.pop_front();
        }
        let keep_from = self.points.partition_point(|p| p.seq <= seq);
        self.points.drain(..keep_from);
        let mut removed = 0;
        while self.segments.len() > 1 && self.segments[1].first_seq <= seq + 1 {
            let Some(s) = self.segments.pop_front() else {
                break;
            };
            // The index first: it never outlives its segment (an orphan a crash
            // leaves is removed on open).
            let ip = self.dir.join(segindex::index_name(s.first_seq));
            match self.fs.remove_file(&ip) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => self.index_error = Some(format!("remove {}: {e}", ip.display())),
            }
            let p = self.segment_path(s.first_seq);
            self.fs
                .remove_file(&p)
                .map_err(io_err("remove folded segment", &p))?;
            removed += 1;
        }
        if removed > 0 {
            self.fs
                .sync_dir(&self.dir)
                .map_err(io_err("sync journal directory", &self.dir))?;
        }
        self.check_invariants();
        Ok(removed)
    }

    /// The index entry of frame `seq`, if it is after the base and appended.
    pub fn entry(&self, seq: u64) -> Option<&FrameEntry> {
        let first = self.frames.front()?.seq;
        let e = self
            .frames
            .get(usize::try_from(seq.checked_sub(first)?).ok()?)?;
        debug_assert_eq!(e.seq, seq);
        Some(e)
    }

    /// Reads frames `from_seq..=to_seq` back, one at a time, re-verifying each crc.
    /// `from_seq == to_seq + 1` is an empty range.
    pub fn read(&self, from_seq: u64, to_seq: u64) -> Result<FrameIter<'_>, JournalError> {
        let first = self.base_seq + 1;
        if from_seq < first || to_seq > self.write_seq || from_seq > to_seq.saturating_add(1) {
            return Err(JournalError::OutOfRange {
                from: from_seq,
                to: to_seq,
                first,
                last: self.write_seq,
            });
        }
        Ok(FrameIter {
            journal: self,
            next: from_seq,
            to: to_seq,
            file: None,
            done: false,
            drop_behind: None,
        })
    }

    /// Reads the frames from the base through point `point_id` (its frame included).
    pub fn frames_through_point(&self, point_id: u64) -> Result<FrameIter<'_>, JournalError> {
        let p = self
            .point_by_id(point_id)
            .ok_or(JournalError::UnknownPoint(point_id))?;
        self.read(self.base_seq + 1, p.seq)
    }

    /// Points after the base, oldest first.
    pub fn points(&self) -> &[PointEntry] {
        &self.points
    }

    /// The point with this id.
    pub fn point_by_id(&self, point_id: u64) -> Option<&PointEntry> {
        // Ids rise with seq (append refuses anything else), so the list is sorted by id.
        let i = self
            .points
            .binary_search_by_key(&point_id, |p| p.record.point_id)
            .ok()?;
        self.points.get(i)
    }

    /// The newest point.
    pub fn latest_point(&self) -> Option<&PointEntry> {
        self.points.last()
    }

    /// The newest app-consistent point.
    pub fn latest_app_point(&self) -> Option<&PointEntry> {
        self.points
            .iter()
            .rev()
            .find(|p| p.record.kind == PointKind::App)
    }

    /// The newest point (by seq) whose time is at or before `time_unix_ms`. Times are
    /// not trusted to rise (clocks step), so this looks at every point.
    pub fn point_at_or_before(&self, time_unix_ms: u64) -> Option<&PointEntry> {
        self.points
            .iter()
            .rev()
            .find(|p| p.record.time_unix_ms <= time_unix_ms)
    }
}

/// Removes a group's whole journal from `dir` for good (failback commit): every
/// segment, the state file and a leftover temp of it, then ONE `sync_dir`. The
/// journal must be closed (dropped) first, and the caller must have recorded durably,
/// before calling this, that the journal is no longer needed (the failback state
/// `committed`): a crash inside may leave any subset of the files, which nobody may
/// open as a journal any more; calling this again removes the rest. Other names in the
/// directory are left alone, and so is the (then empty) directory. A missing directory
/// is nothing to do. Returns the number of files removed.
pub fn remove_all(fs: &dyn Storage, dir: &Path) -> Result<usize, JournalError> {
    let names = match fs.list_dir(dir) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err("list journal directory", dir)(e)),
    };
    let tmp = format!("{STATE_FILE}.tmp");
    let mut removed = 0;
    // Newest segment first: a journal cut short from its end is what a torn tail
    // looks like, should anything ever read a half-removed one.
    for name in names.iter().rev() {
        let ours = parse_segment_name(name).is_some()
            || segindex::parse_index_name(name).is_some()
            || *name == STATE_FILE
            || *name == tmp;
        if !ours {
            continue;
        }
        let p = dir.join(name);
        fs.remove_file(&p)
            .map_err(io_err("remove journal file", &p))?;
        removed += 1;
    }
    if removed > 0 {
        fs.sync_dir(dir)
            .map_err(io_err("sync journal directory", dir))?;
    }
    Ok(removed)
}

/// Reads the frame at `offset` of a segment of `file_bytes` bytes into `buf` and
/// verifies it. The error says, in words, why the bytes there are not a frame.
fn read_frame_at(
    f: &dyn StorageFile,
    offset: u64,
    file_bytes: u64,
    buf: &mut Vec<u8>,
) -> Result<FrameHeader, String> {
    let rest = file_bytes - offset;
    if rest < frame::HEADER_BYTES as u64 {
        return Err(format!("{rest} bytes left, a frame header needs 32"));
    }
    let mut head = [0u8; frame::HEADER_BYTES];
    f.read_exact_at(&mut head, offset)
        .map_err(|e| format!("reading frame header: {e}"))?;
    // The header is checked (including the body bound) before the body is allocated.
    let h = FrameHeader::parse(&head).map_err(|e| format!("frame header: {e}"))?;
    if h.frame_len() as u64 > rest {
        return Err(format!(
            "frame of {} bytes runs past the end of the file ({rest} bytes left)",
            h.frame_len()
        ));
    }
    buf.clear();
    buf.resize(h.frame_len(), 0);
    f.read_exact_at(buf, offset)
        .map_err(|e| format!("reading frame: {e}"))?;
    frame::verify(buf).map_err(|e| format!("frame: {e}"))
}

/// Frames read back from the journal, one at a time; see [`Journal::read`].
pub struct FrameIter<'a> {
    journal: &'a Journal,
    next: u64,
    to: u64,
    /// The segment file read last, kept open for the next frame.
    file: Option<(u64, Box<dyn StorageFile>)>,
    done: bool,
    /// With [`FrameIter::dropping_cache`]: bytes of the open segment below which its
    /// pages were let go of.
    drop_behind: Option<u64>,
}

/// Bytes a [`FrameIter::dropping_cache`] iteration reads between two cache hints.
const DROP_BEHIND_BYTES: u64 = 8 << 20;

impl FrameIter<'_> {
    /// The same iteration, letting the pages of the frames read leave the page cache
    /// behind it ([`StorageFile::drop_cached`], a hint), for one pass over many frames
    /// that are not read again soon (a failback): the pages the next reads need are
    /// then the ones just given back, not memory the kernel must find anew.
    pub fn dropping_cache(mut self) -> Self {
        self.drop_behind = Some(0);
        self
    }

    /// The next frame read into `buf` (its capacity reused: no allocation and no
    /// zeroing once it is large enough), as [`Iterator::next`] reads it.
    pub fn next_into(&mut self, buf: &mut Vec<u8>) -> Option<Result<FrameHeader, JournalError>> {
        if self.done || self.next > self.to {
            return None;
        }
        let r = self.read_one(self.next, buf);
        match r {
            Ok(_) => self.next += 1,
            // One error ends the iteration: later frames are not trusted past a bad one.
            Err(_) => self.done = true,
        }
        Some(r)
    }

    fn read_one(&mut self, seq: u64, buf: &mut Vec<u8>) -> Result<FrameHeader, JournalError> {
        let j = self.journal;
        let e = *j.entry(seq).ok_or(JournalError::OutOfRange {
            from: seq,
            to: seq,
            first: j.base_seq + 1,
            last: j.write_seq,
        })?;
        let path = j.segment_path(e.segment);
        // Only bytes the buffer never held are zeroed; the read overwrites them all.
        buf.resize(e.len as usize, 0);
        let same_segment = matches!(&self.file, Some((s, _)) if *s == e.segment);
        let f = match self.file.take() {
            Some((s, f)) if s == e.segment => f,
            _ => {
                j.fs.open(&path, OpenMode::ReadOnly)
                    .map_err(io_err("open segment", &path))?
            }
        };
        let r = f.read_exact_at(buf, e.offset);
        if r.is_ok()
            && let Some(dropped) = self.drop_behind.as_mut()
        {
            if !same_segment {
                *dropped = 0;
            }
            let end = e.offset + u64::from(e.len);
            // Never the header page (a commit rewrites it) nor a partial last page.
            if let Some((start, upto)) = synced_whole_pages(*dropped, end)
                && upto - start >= DROP_BEHIND_BYTES
            {
                // A hint: a failure costs memory, never correctness.
                let _ = f.drop_cached(start, upto - start);
                *dropped = upto;
            }
        }
        self.file = Some((e.segment, f));
        r.map_err(io_err("read frame", &path))?;
        let corrupt = |why: String| JournalError::Corruption {
            segment: path.clone(),
            offset: e.offset,
            why,
        };
        let h = frame::verify(buf).map_err(|err| corrupt(format!("frame read back: {err}")))?;
        if h.seq != seq || h.kind != e.kind {
            return Err(corrupt(format!(
                "read back seq {} kind {:?}, the index says seq {seq} kind {:?}",
                h.seq, h.kind, e.kind
            )));
        }
        Ok(h)
    }
}

impl Iterator for FrameIter<'_> {
    type Item = Result<(FrameHeader, Vec<u8>), JournalError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut buf = Vec::new();
        let r = self.next_into(&mut buf)?;
        Some(r.map(|h| (h, buf)))
    }
}

/// Placeholder for the active file while a journal is being opened.
struct NoFile;

impl StorageFile for NoFile {
    fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<usize> {
        Err(io::Error::other("journal segment not open"))
    }
    fn write_all_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(io::Error::other("journal segment not open"))
    }
    fn len(&self) -> io::Result<u64> {
        Err(io::Error::other("journal segment not open"))
    }
    fn set_len(&self, _: u64) -> io::Result<()> {
        Err(io::Error::other("journal segment not open"))
    }
    fn sync_data(&self) -> io::Result<()> {
        Err(io::Error::other("journal segment not open"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{CrashMode, RealFs, SimFs};
    use proptest::prelude::*;

    const GROUP: &str = "g1";

    fn dir() -> PathBuf {
        PathBuf::from("/j/g1")
    }

    fn cfg(segment_bytes_max: u64, recovery: RecoveryMode) -> JournalConfig {
        JournalConfig {
            segment_bytes_max,
            recovery,
        }
    }

    fn tolerate(segment_bytes_max: u64) -> JournalConfig {
        cfg(segment_bytes_max, RecoveryMode::TolerateTailCorruption)
    }

    fn absolute(segment_bytes_max: u64) -> JournalConfig {
        cfg(segment_bytes_max, RecoveryMode::AbsoluteConsistency)
    }

    fn open(fs: &SimFs, c: JournalConfig) -> Result<(Journal, JournalRecovery), JournalError> {
        Journal::open(Arc::new(fs.clone()), &dir(), GROUP, c)
    }

    /// Proves an iteration that lets pages go behind it reads every frame whole,
    /// across segments, and leaves the frames readable again afterwards.
    #[test]
    fn reading_dropping_cache_reads_every_frame() {
        let dir = tempfile::tempdir().unwrap();
        let jdir = dir.path().join("g1");
        let (mut j, _) = Journal::open(Arc::new(RealFs), &jdir, GROUP, tolerate(6 << 20)).unwrap();
        let frames: Vec<Vec<u8>> = (1..=60u64)
            .map(|seq| data_frame(seq, &vec![seq as u8; (256 << 10) + seq as usize * 13]))
            .collect();
        for f in &frames {
            j.append(f).unwrap();
        }
        j.commit().unwrap();
        assert!(j.segment_count() >= 3, "{} segments", j.segment_count());
        let mut it = j.read(1, 60).unwrap().dropping_cache();
        let mut buf = Vec::new();
        for (k, f) in frames.iter().enumerate() {
            let h = it.next_into(&mut buf).unwrap().unwrap();
            assert_eq!(h.seq, k as u64 + 1);
            assert_eq!(&buf, f, "frame {}", k + 1);
        }
        assert!(it.next_into(&mut buf).is_none());
        assert_eq!(read_all(&j), frames);
    }

    /// Proves the pages a commit lets go of are whole, synced, past the header page and
    /// before a partial last page, each given up once.
    #[test]
    fn commit_drops_only_whole_synced_pages_once() {
        const P: u64 = storage::CACHE_PAGE_BYTES;
        assert_eq!(synced_whole_pages(0, 128), None);
        assert_eq!(synced_whole_pages(0, P + 100), None);
        assert_eq!(synced_whole_pages(0, 2 * P), Some((P, 2 * P)));
        assert_eq!(synced_whole_pages(0, 5 * P + 1), Some((P, 5 * P)));
        assert_eq!(synced_whole_pages(5 * P, 5 * P + 4000), None);
        assert_eq!(synced_whole_pages(5 * P, 9 * P), Some((5 * P, 9 * P)));
        // The page a previous call left partial goes once it is whole.
        assert_eq!(synced_whole_pages(5 * P + 10, 7 * P), Some((5 * P, 7 * P)));

        let dir = tempfile::tempdir().unwrap();
        let jdir = dir.path().join("g1");
        let (mut j, _) = Journal::open(Arc::new(RealFs), &jdir, GROUP, tolerate(1 << 30)).unwrap();
        let mut frames = Vec::new();
        for seq in 1..=40u64 {
            let f = data_frame(seq, &vec![seq as u8; 3000 + seq as usize * 17]);
            j.append(&f).unwrap();
            frames.push(f);
            if seq % 7 == 0 {
                j.commit().unwrap();
                let len = j.segments.back().unwrap().len_bytes;
                assert_eq!(j.cached_from, len - len % P, "after seq {seq}");
            }
        }
        j.commit().unwrap();
        // Dropped from the cache, never from the file: every frame reads back whole,
        // in this process and after a reopen.
        assert_eq!(read_all(&j), frames);
        drop(j);
        let (j, _) = Journal::open(Arc::new(RealFs), &jdir, GROUP, tolerate(1 << 30)).unwrap();
        assert_eq!(j.durable_seq(), 40);
        assert_eq!(read_all(&j), frames);
    }

    /// A data-like frame: only its header and crc matter to the journal.
    fn data_frame(seq: u64, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame::begin(&mut out);
        out.extend_from_slice(body);
        frame::seal(&mut out, FrameKind::Data, seq);
        out
    }

    fn point_record(point_id: u64, time_unix_ms: u64, kind: PointKind) -> PointRecord {
        PointRecord {
            point_id,
            epoch: point_id,
            time_unix_ms,
            kind,
            consistent: true,
            group: GROUP.into(),
        }
    }

    fn point_frame(seq: u64, p: &PointRecord) -> Vec<u8> {
        let mut out = Vec::new();
        frame::encode_point(p, seq, &mut out);
        out
    }

    fn read_all(j: &Journal) -> Vec<Vec<u8>> {
        j.read(j.base_seq() + 1, j.write_seq())
            .unwrap()
            .map(|r| r.unwrap().1)
            .collect()
    }

    fn seg_path(first_seq: u64) -> PathBuf {
        dir().join(segment_name(first_seq))
    }

    fn idx_path(first_seq: u64) -> PathBuf {
        dir().join(segindex::index_name(first_seq))
    }

    /// The index a segment's frames give: its bytes walked frame by frame (apart from
    /// the journal's open), each frame's record pushed.
    fn expected_index(fs: &SimFs, first_seq: u64) -> Vec<u8> {
        let seg = storage::read_whole(fs, &seg_path(first_seq))
            .unwrap()
            .unwrap();
        let mut b = IndexBuilder::default();
        let mut at = SEGMENT_HEADER_BYTES;
        while at < seg.len() {
            let head: [u8; frame::HEADER_BYTES] =
                seg[at..at + frame::HEADER_BYTES].try_into().unwrap();
            let h = FrameHeader::parse(&head).unwrap();
            let f = &seg[at..at + h.frame_len()];
            frame::verify(f).unwrap();
            b.push(f, &h);
            at += h.frame_len();
        }
        b.encode(GROUP, first_seq, seg.len() as u64)
    }

    /// Checks that exactly the sealed segments (all but the last) have an index, each
    /// the one their frames give, and that no temp of one is left.
    fn check_indexes(fs: &SimFs, what: &str) {
        let segs = segment_files(fs);
        let names = fs.list_dir(&dir()).unwrap();
        assert!(
            !names.iter().any(|n| n.ends_with(".idx.tmp")),
            "{what}: a temp is left: {names:?}"
        );
        let indexed: Vec<u64> = names
            .iter()
            .filter_map(|n| segindex::parse_index_name(n))
            .collect();
        assert_eq!(
            indexed,
            segs[..segs.len().saturating_sub(1)],
            "{what}: the sealed segments and only they have an index"
        );
        for s in indexed {
            let got = storage::read_whole(fs, &idx_path(s)).unwrap().unwrap();
            assert!(got == expected_index(fs, s), "{what}: index of segment {s}");
        }
    }

    /// What a reopened journal holds: every frame, point and entry.
    fn contents(j: &Journal) -> (Vec<Vec<u8>>, Vec<PointEntry>, Vec<FrameEntry>) {
        let entries = (j.base_seq() + 1..=j.write_seq())
            .map(|s| *j.entry(s).unwrap())
            .collect();
        (read_all(j), j.points().to_vec(), entries)
    }

    fn segment_files(fs: &SimFs) -> Vec<u64> {
        fs.list_dir(&dir())
            .unwrap()
            .iter()
            .filter_map(|n| parse_segment_name(n).and_then(Result::ok))
            .collect()
    }

    /// Every durable name of the journal directory with its durable contents.
    fn snapshot(fs: &SimFs) -> Vec<(String, Option<Vec<u8>>)> {
        fs.list_dir(&dir())
            .unwrap()
            .into_iter()
            .map(|n| {
                let c = fs.durable_contents(&dir().join(&n));
                (n, c)
            })
            .collect()
    }

    /// Replaces a file's contents durably (a test helper to plant bad bytes).
    fn put_file(fs: &SimFs, path: &Path, bytes: &[u8]) {
        fs.create_dir_all(path.parent().unwrap()).unwrap();
        let f = fs.open(path, OpenMode::Create).unwrap();
        f.set_len(0).unwrap();
        f.write_all_at(bytes, 0).unwrap();
        f.sync_data().unwrap();
        fs.sync_dir(path.parent().unwrap()).unwrap();
    }

    /// xorshift64*: a small deterministic generator for workloads and fuzz loops.
    use crate::testutil::Rng;

    /// Builds a journal of `n` committed frames (every fourth a point) and returns them.
    fn build(fs: &SimFs, c: JournalConfig, n: u64, body_bytes: usize) -> Vec<Vec<u8>> {
        let (mut j, _) = open(fs, c).unwrap();
        let mut frames = Vec::new();
        for seq in 1..=n {
            let f = if seq % 4 == 0 {
                point_frame(seq, &point_record(seq, seq * 10, PointKind::Crash))
            } else {
                data_frame(seq, &vec![seq as u8; body_bytes])
            };
            j.append(&f).unwrap();
            frames.push(f);
        }
        j.commit().unwrap();
        frames
    }

    /// Proves the segment header and state file layouts are pinned byte for byte.
    #[test]
    fn golden_bytes() {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        // Pinned: a change here is a format change and needs a new version. Computed
        // independently (Python struct + zlib.crc32) from the layout tables.
        let zeros = |n: usize| "0".repeat(2 * n);
        assert_eq!(
            hex(&encode_segment_header("g1", 1, 0)),
            format!(
                "42524a524e53454701000200000000000100000000000000{}{}1a4412ff",
                "6731",
                zeros(62 + 8 + 28)
            )
        );
        // A mark of distinct bytes pins the place and byte order of `synced_seq`.
        assert_eq!(
            hex(&encode_segment_header("g1", 7, 0x0102_0304_0506_0708)),
            format!(
                "42524a524e53454701000200000000000700000000000000{}{}{}{}3a18873b",
                "6731",
                zeros(62),
                "0807060504030201",
                zeros(28)
            )
        );
        assert_eq!(
            hex(&encode_state("g1", 42)),
            format!(
                "42524a535441544501000200000000002a00000000000000{}{}2056f6b7",
                "6731",
                zeros(62 + 4)
            )
        );
        let p = Path::new("x");
        assert_eq!(
            decode_segment_header(&encode_segment_header("g1", 7, 9), "g1", p).unwrap(),
            SegmentHeader {
                first_seq: 7,
                synced_seq: 9
            }
        );
        assert_eq!(decode_state(&encode_state("g1", 9), "g1", p).unwrap(), 9);
    }

    /// Proves data and point frames come back byte for byte, before and after a commit
    /// and a reopen, and that the point index answers every kind of query.
    #[test]
    fn round_trip_data_and_points() {
        let fs = SimFs::new();
        let (mut j, rec) = open(&fs, JournalConfig::default()).unwrap();
        assert_eq!(rec, JournalRecovery::default());
        assert_eq!(j.next_seq(), 1);
        let points = [
            point_record(10, 1_000, PointKind::Crash),
            point_record(11, 2_000, PointKind::App),
            point_record(12, 3_000, PointKind::Crash),
        ];
        let mut frames = Vec::new();
        let mut seq = 1;
        for p in &points {
            for k in 0..3 {
                let f = data_frame(seq, &vec![k as u8; 100 * k]);
                assert_eq!(j.append(&f).unwrap(), seq);
                frames.push(f);
                seq += 1;
            }
            let f = point_frame(seq, p);
            j.append(&f).unwrap();
            frames.push(f);
            seq += 1;
        }
        // Readable before the commit (from the segment file, not yet synced) ...
        assert_eq!(read_all(&j), frames);
        assert_eq!(j.durable_seq(), 0);
        assert_eq!(j.commit().unwrap(), 12);
        // ... after it (from the file) ...
        assert_eq!(read_all(&j), frames);
        drop(j);
        // ... and after a reopen.
        let (j, rec) = open(&fs, JournalConfig::default()).unwrap();
        assert_eq!(rec.frames, 12);
        assert_eq!(rec.points, 3);
        assert_eq!(rec.truncated_bytes, 0);
        assert_eq!(read_all(&j), frames);
        assert_eq!((j.write_seq(), j.durable_seq(), j.base_seq()), (12, 12, 0));
        let got: Vec<_> = j
            .points()
            .iter()
            .map(|p| (p.record.clone(), p.seq))
            .collect();
        assert_eq!(
            got,
            vec![
                (points[0].clone(), 4),
                (points[1].clone(), 8),
                (points[2].clone(), 12)
            ]
        );
        assert_eq!(j.point_by_id(11).unwrap().seq, 8);
        assert!(j.point_by_id(13).is_none());
        assert_eq!(j.latest_point().unwrap().record.point_id, 12);
        assert_eq!(j.latest_app_point().unwrap().record.point_id, 11);
        assert_eq!(j.point_at_or_before(2_999).unwrap().record.point_id, 11);
        assert_eq!(j.point_at_or_before(3_000).unwrap().record.point_id, 12);
        assert!(j.point_at_or_before(999).is_none());
        let through: Vec<_> = j
            .frames_through_point(11)
            .unwrap()
            .map(|r| r.unwrap().1)
            .collect();
        assert_eq!(through, frames[..8]);
        assert!(matches!(
            j.frames_through_point(99),
            Err(JournalError::UnknownPoint(99))
        ));
        assert!(matches!(j.read(0, 3), Err(JournalError::OutOfRange { .. })));
        assert!(matches!(
            j.read(1, 13),
            Err(JournalError::OutOfRange { .. })
        ));
        assert_eq!(j.read(5, 4).unwrap().count(), 0);
    }

    /// Proves duplicates, gaps, bad crcs, foreign kinds and foreign or non-rising points
    /// are refused with their own error and leave nothing behind.
    #[test]
    fn seq_rules_refuse_and_write_nothing() {
        let fs = SimFs::new();
        let (mut j, _) = open(&fs, JournalConfig::default()).unwrap();
        let f1 = data_frame(1, b"one");
        j.append(&f1).unwrap();
        let f2 = point_frame(2, &point_record(5, 1, PointKind::Crash));
        j.append(&f2).unwrap();
        j.commit().unwrap();
        let steps = fs.steps();
        let before = snapshot(&fs);

        assert!(matches!(
            j.append(&data_frame(2, b"dup")),
            Err(JournalError::Duplicate {
                seq: 2,
                next_seq: 3
            })
        ));
        assert!(matches!(
            j.append(&data_frame(4, b"gap")),
            Err(JournalError::Gap {
                expected: 3,
                got: 4
            })
        ));
        let mut rotten = data_frame(3, b"rotten");
        rotten[frame::HEADER_BYTES + 2] ^= 1;
        assert!(matches!(
            j.append(&rotten),
            Err(JournalError::Frame(FrameError::CrcMismatch { .. }))
        ));
        let short = data_frame(3, b"short");
        assert!(matches!(
            j.append(&short[..short.len() - 1]),
            Err(JournalError::Frame(FrameError::LengthMismatch { .. }))
        ));
        let mut ack = Vec::new();
        frame::begin(&mut ack);
        frame::seal(&mut ack, FrameKind::Ack, 3);
        assert!(matches!(
            j.append(&ack),
            Err(JournalError::WrongKind(FrameKind::Ack))
        ));
        let mut other = point_record(6, 2, PointKind::App);
        other.group = "g2".into();
        assert!(matches!(
            j.append(&point_frame(3, &other)),
            Err(JournalError::PointGroup { .. })
        ));
        assert!(matches!(
            j.append(&point_frame(3, &point_record(5, 2, PointKind::App))),
            Err(JournalError::PointIdNotRising {
                point_id: 5,
                latest: 5
            })
        ));

        assert_eq!(j.next_seq(), 3);
        assert_eq!(j.points().len(), 1);
        assert_eq!(j.commit().unwrap(), 2);
        assert_eq!(fs.steps(), steps, "a refused frame caused I/O");
        assert_eq!(snapshot(&fs), before);
        drop(j);
        let (j, _) = open(&fs, JournalConfig::default()).unwrap();
        assert_eq!(read_all(&j), vec![f1, f2]);
    }

    /// Proves a commit costs exactly one sync however many frames it covers, and an empty
    /// commit costs none.
    #[test]
    fn group_commit_syncs_once() {
        let fs = SimFs::new();
        let (mut j, _) = open(&fs, JournalConfig::default()).unwrap();
        for n in [1u64, 7, 100] {
            let before = fs.steps();
            for _ in 0..n {
                let seq = j.next_seq();
                j.append(&data_frame(seq, &[seq as u8; 500])).unwrap();
            }
            assert_eq!(fs.steps(), before, "append must not sync");
            assert_eq!(j.commit().unwrap(), j.write_seq());
            assert_eq!(fs.steps(), before + 1, "{n} appends");
        }
        let before = fs.steps();
        j.commit().unwrap();
        assert_eq!(fs.steps(), before);
    }

    /// Proves segments roll at the bound (an oversized frame gets a segment of its own),
    /// each segment's header names its first seq, and reads cross segments.
    #[test]
    fn segments_roll_at_the_bound() {
        let fs = SimFs::new();
        let c = tolerate(SEGMENT_BYTES_MIN);
        let (mut j, _) = open(&fs, c).unwrap();
        let mut frames = Vec::new();
        for seq in 1..=40u64 {
            // Every tenth frame is larger than a whole segment.
            let len = if seq % 10 == 0 { 2000 } else { 100 };
            let f = data_frame(seq, &vec![seq as u8; len]);
            j.append(&f).unwrap();
            frames.push(f);
            if seq % 3 == 0 {
                j.commit().unwrap();
            }
        }
        j.commit().unwrap();
        assert_eq!(read_all(&j), frames);
        let segs = segment_files(&fs);
        assert!(segs.len() > 5, "{segs:?}");
        assert_eq!(segs.len(), j.segment_count());
        for (i, &s) in segs.iter().enumerate() {
            let bytes = fs.durable_contents(&seg_path(s)).unwrap();
            assert_eq!(
                decode_segment_header(&bytes[..SEGMENT_HEADER_BYTES], GROUP, Path::new("x"))
                    .unwrap()
                    .first_seq,
                s
            );
            let one_frame = match segs.get(i + 1) {
                Some(&n) => n == s + 1,
                None => j.write_seq() == s,
            };
            assert!(
                bytes.len() as u64 <= SEGMENT_BYTES_MIN || one_frame,
                "segment {s} is {} bytes",
                bytes.len()
            );
        }
        drop(j);
        let (j, rec) = open(&fs, c).unwrap();
        assert_eq!(rec.frames, 40);
        assert_eq!(read_all(&j), frames);
    }

    /// Proves drop_through moves the base durably, removes only whole folded segments
    /// (never the active one), drops folded points, and refuses non-durable seqs.
    #[test]
    fn drop_through_removes_whole_segments() {
        let fs = SimFs::new();
        let c = tolerate(SEGMENT_BYTES_MIN);
        let frames = build(&fs, c, 30, 200);
        let (mut j, _) = open(&fs, c).unwrap();
        let segs = segment_files(&fs);
        assert!(segs.len() >= 5);
        j.append(&data_frame(31, b"pending")).unwrap();
        assert!(matches!(
            j.drop_through(31),
            Err(JournalError::BeyondDurable {
                seq: 31,
                durable: 30
            })
        ));
        j.commit().unwrap();

        // Through the middle of the third segment: the first two go.
        let through = segs[2] + 1;
        assert_eq!(j.drop_through(through).unwrap(), 2);
        assert_eq!(segment_files(&fs), segs[2..].to_vec());
        assert_eq!(j.base_seq(), through);
        assert!(j.points().iter().all(|p| p.seq > through));
        assert!(matches!(
            j.read(through, through),
            Err(JournalError::OutOfRange { .. })
        ));
        let rest: Vec<_> = j
            .read(through + 1, 30)
            .unwrap()
            .map(|r| r.unwrap().1)
            .collect();
        assert_eq!(rest, frames[through as usize..]);
        assert_eq!(
            j.drop_through(through - 1).unwrap(),
            0,
            "base never goes back"
        );

        // Everything: only the active segment stays.
        assert_eq!(j.drop_through(31).unwrap(), segs.len() - 3);
        assert_eq!(segment_files(&fs).len(), 1);
        assert!(j.points().is_empty());
        assert_eq!(j.read(32, 31).unwrap().count(), 0);
        j.append(&data_frame(32, b"after")).unwrap();
        j.commit().unwrap();
        drop(j);
        fs.crash(CrashMode::DropUnsynced);
        let (j, rec) = open(&fs, c).unwrap();
        assert_eq!(j.base_seq(), 31);
        assert_eq!(rec.frames, 1);
        assert_eq!(read_all(&j), vec![data_frame(32, b"after")]);
    }

    /// Proves a crash after the base moved but before the folded segments were removed
    /// is finished on open, at every step of the removal.
    #[test]
    fn drop_through_interrupted_is_finished_on_open() {
        let c = tolerate(SEGMENT_BYTES_MIN);
        // write_atomic takes 3 steps; then one removal per segment and one dir sync.
        for step in 1..=10 {
            let fs = SimFs::new();
            let frames = build(&fs, c, 30, 200);
            let (mut j, _) = open(&fs, c).unwrap();
            let segs = segment_files(&fs);
            fs.crash_after(step);
            let moved = j.drop_through(25).is_ok();
            drop(j);
            fs.crash(CrashMode::Torn { seed: step });
            let (j, _) = open(&fs, c).unwrap();
            assert!(j.base_seq() == 0 || j.base_seq() == 25, "step {step}");
            if moved || j.base_seq() == 25 {
                assert_eq!(j.base_seq(), 25);
                let left = segment_files(&fs);
                assert!(
                    left.iter()
                        .all(|&s| s >= *segs.iter().rev().nth(1).unwrap())
                );
                assert!(left.len() <= 2);
            }
            let first = j.base_seq() as usize;
            assert_eq!(read_all(&j), frames[first..], "step {step}");
        }
    }

    /// The naive model of the crash test: what was appended, committed and dropped.
    #[derive(Default)]
    struct Model {
        frames: Vec<Vec<u8>>,
        points: Vec<PointEntry>,
        /// Highest durable seq the journal reported.
        durable: u64,
        appended: u64,
        /// The base is between these: the last drop that returned and the last one asked.
        base_lo: u64,
        base_hi: u64,
    }

    /// Room for several multi-page frames per segment, so commits of several of them
    /// tear page by page inside one write.
    const CRASH_SEGMENT_BYTES: u64 = 128 << 10;

    /// A body of `rng`'s choosing: small (under a page) or large (10..40 KiB, several
    /// pages), half each. A short random pattern repeated keeps the debug build fast;
    /// the seq in the frame header makes every frame distinct anyway.
    fn crash_body(rng: &mut Rng) -> Vec<u8> {
        let n = if rng.below(2) == 0 {
            rng.below(900)
        } else {
            (10 << 10) + rng.below(30 << 10)
        } as usize;
        let pattern = rng.bytes(61);
        pattern.iter().copied().cycle().take(n).collect()
    }

    /// Random appends (data and points), commits and drops until `ops` are done or the
    /// file system freezes; the model records what returned successfully.
    fn workload(fs: &SimFs, seed: u64, ops: usize, m: &mut Model) -> Result<(), JournalError> {
        let (mut j, _) = open(fs, tolerate(CRASH_SEGMENT_BYTES))?;
        let mut rng = Rng(seed | 1);
        let mut point_id = 1;
        for _ in 0..ops {
            match rng.below(10) {
                0..=6 => {
                    let seq = j.next_seq();
                    let f = data_frame(seq, &crash_body(&mut rng));
                    j.append(&f)?;
                    m.frames.push(f);
                    m.appended = seq;
                }
                7 => {
                    let seq = j.next_seq();
                    let kind = if rng.below(2) == 0 {
                        PointKind::Crash
                    } else {
                        PointKind::App
                    };
                    let record = point_record(point_id, rng.below(1 << 40), kind);
                    j.append(&point_frame(seq, &record))?;
                    point_id += 1;
                    m.frames.push(point_frame(seq, &record));
                    m.points.push(PointEntry { record, seq });
                    m.appended = seq;
                }
                8 => {
                    j.commit()?;
                }
                _ => {
                    let base = j.base_seq();
                    let target = base + rng.below(j.durable_seq() - base + 1);
                    m.base_hi = m.base_hi.max(target);
                    j.drop_through(target)?;
                    m.base_lo = m.base_lo.max(target);
                }
            }
            m.durable = m.durable.max(j.durable_seq());
        }
        j.commit()?;
        m.durable = j.durable_seq();
        Ok(())
    }

    /// Checks a reopened journal against the model of a crashed workload.
    fn check_recovered(j: &Journal, rec: &JournalRecovery, m: &Model, what: &str) {
        let (base, write) = (j.base_seq(), j.write_seq());
        assert!(
            (m.base_lo..=m.base_hi).contains(&base),
            "{what}: base {base} not in {}..={}",
            m.base_lo,
            m.base_hi
        );
        assert!(
            (m.durable..=m.appended).contains(&write),
            "{what}: write_seq {write} not in {}..={}",
            m.durable,
            m.appended
        );
        assert_eq!(j.durable_seq(), write, "{what}");
        assert_eq!(rec.frames, write - base, "{what}");
        let got = read_all(j);
        assert_eq!(got.len() as u64, write - base, "{what}");
        for (i, f) in got.iter().enumerate() {
            assert_eq!(
                *f,
                m.frames[base as usize + i],
                "{what}: seq {}",
                base + 1 + i as u64
            );
        }
        let want: Vec<_> = m
            .points
            .iter()
            .filter(|p| p.seq > base && p.seq <= write)
            .cloned()
            .collect();
        assert_eq!(j.points(), &want[..], "{what}");
    }

    /// Proves that a crash at every durability step of a random workload, torn in several
    /// ways, reopens to every frame up to the last commit byte for byte, nothing after the
    /// last append, the base of the last or the pending drop, and the model's points,
    /// with exactly the sealed segments indexed, each index what its frames give (one is
    /// durable before the next segment exists, so no crash leaves a sealed segment
    /// without it); and that the recovered journal keeps working.
    #[test]
    fn crash_at_every_step_keeps_committed_frames() {
        const OPS: usize = 100;
        let mut tails_cut = 0;
        let (mut indexed, mut rebuilt) = (0, 0);
        let mut runs = 0;
        for wseed in [3u64, 8, 21, 40] {
            let fs = SimFs::new();
            let mut m = Model::default();
            workload(&fs, wseed, OPS, &mut m).unwrap();
            let total = fs.steps();
            // The oldest segment left starts late: segments rolled and were dropped.
            assert!(segment_files(&fs)[0] > 1, "the workload must roll and drop");
            assert!(m.base_lo > 0, "the workload must drop");
            for step in 1..=total + 1 {
                for cseed in 0..16u64 {
                    let what = format!("workload {wseed} step {step} crash seed {cseed}");
                    let fs = SimFs::new();
                    fs.crash_after(step);
                    let mut m = Model::default();
                    let _ = workload(&fs, wseed, OPS, &mut m);
                    fs.crash(if cseed == 0 {
                        CrashMode::DropUnsynced
                    } else {
                        CrashMode::Torn { seed: cseed }
                    });
                    let (mut j, rec) = open(&fs, tolerate(CRASH_SEGMENT_BYTES))
                        .unwrap_or_else(|e| panic!("{what}: reopen: {e}"));
                    check_recovered(&j, &rec, &m, &what);
                    assert!(
                        rec.index_errors.is_empty(),
                        "{what}: {:?}",
                        rec.index_errors
                    );
                    check_indexes(&fs, &what);
                    tails_cut += usize::from(rec.truncated_bytes > 0);
                    indexed += usize::from(rec.segments_indexed > 0);
                    rebuilt += rec.indexes_rebuilt.len();
                    runs += 1;
                    // The recovered journal takes the next frame and keeps it.
                    let seq = j.next_seq();
                    let f = data_frame(seq, b"after the crash");
                    j.append(&f).unwrap();
                    j.commit().unwrap();
                    drop(j);
                    fs.crash(CrashMode::DropUnsynced);
                    let (j, _) = open(&fs, absolute(CRASH_SEGMENT_BYTES))
                        .unwrap_or_else(|e| panic!("{what}: second reopen: {e}"));
                    assert_eq!(j.write_seq(), seq, "{what}");
                    let last: Vec<_> = j.read(seq, seq).unwrap().map(|r| r.unwrap().1).collect();
                    assert_eq!(last, vec![f], "{what}");
                }
            }
        }
        eprintln!(
            "{runs} crashes, {tails_cut} torn tails cut, {indexed} opens read indexes, {rebuilt} indexes rebuilt"
        );
        assert!(
            tails_cut > 0,
            "no crash tore a tail: the test proves too little"
        );
        assert!(
            indexed > 0,
            "no reopen read an index: the test proves too little"
        );
        assert_eq!(
            rebuilt, 0,
            "a sealed segment always has its index: it is durable before the next segment exists"
        );
    }

    /// Proves a crash during a commit of several multi-page frames, torn page by page
    /// with many seeds, never makes open fail: every frame of the earlier commits comes
    /// back byte for byte and the torn batch is cut to its intact prefix; and that the
    /// seeds include the case the mark exists for (a hole followed by an intact frame
    /// of the torn batch).
    #[test]
    fn torn_multi_page_commit_is_cut_not_refused() {
        let c = tolerate(SEGMENT_BYTES_DEFAULT);
        let mut hole_then_intact = 0;
        for seed in 1..=200u64 {
            let fs = SimFs::new();
            let (mut j, _) = open(&fs, c).unwrap();
            let mut rng = Rng(seed);
            let mut frames = Vec::new();
            // Two commits of four frames, then four more whose commit crashes. Every
            // other frame is small, so that some of the torn batch fit in one page
            // and survive whole after a lost page.
            for batch in 0..3 {
                for i in 0..4 {
                    let seq = j.next_seq();
                    let body_bytes = if i % 2 == 0 {
                        (10 << 10) + rng.below(30 << 10) as usize
                    } else {
                        100 + rng.below(2000) as usize
                    };
                    let body: Vec<u8> =
                        rng.bytes(61).into_iter().cycle().take(body_bytes).collect();
                    let f = data_frame(seq, &body);
                    j.append(&f).unwrap();
                    frames.push(f);
                }
                if batch < 2 {
                    j.commit().unwrap();
                }
            }
            let acked = j.durable_seq();
            assert_eq!(acked, 8);
            let torn: Vec<FrameEntry> = (acked + 1..=j.write_seq())
                .map(|s| *j.entry(s).unwrap())
                .collect();
            fs.crash_after(1);
            assert!(j.commit().is_err());
            drop(j);
            fs.crash(CrashMode::Torn { seed });
            let bytes = fs.durable_contents(&seg_path(1)).unwrap();
            let intact: Vec<bool> = torn
                .iter()
                .map(|e| {
                    let at = e.offset as usize;
                    bytes.get(at..at + e.len as usize) == Some(&frames[e.seq as usize - 1][..])
                })
                .collect();
            let kept = intact.iter().take_while(|&&ok| ok).count();
            if intact[kept..].iter().any(|&ok| ok) {
                hole_then_intact += 1;
            }
            let (j, rec) = open(&fs, c).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            assert_eq!(read_all(&j), frames[..acked as usize + kept], "seed {seed}");
            let valid_end = torn.get(kept).map_or(bytes.len() as u64, |e| e.offset);
            assert_eq!(
                rec.truncated_bytes,
                bytes.len() as u64 - valid_end,
                "seed {seed}"
            );
        }
        eprintln!("{hole_then_intact} of 200 crashes left a hole before an intact frame");
        assert!(
            hole_then_intact > 0,
            "no crash left a hole before an intact frame: the test proves too little"
        );
    }

    /// Proves a crash while open cuts a torn tail leaves a journal that opens again with
    /// every committed frame.
    #[test]
    fn recovery_itself_survives_a_crash() {
        let c = JournalConfig::default();
        let scenario = |tear: u64| {
            let fs = SimFs::new();
            let frames = build(&fs, c, 6, 150);
            let (mut j, _) = open(&fs, c).unwrap();
            for seq in 7..=9 {
                // Several pages each: a crash tears them page by page.
                j.append(&data_frame(seq, &vec![seq as u8; 12 << 10]))
                    .unwrap();
            }
            fs.crash_after(1);
            assert!(j.commit().is_err());
            assert!(matches!(j.commit(), Err(JournalError::Failed(_))));
            drop(j);
            fs.crash(CrashMode::Torn { seed: tear });
            (fs, frames)
        };
        let mut torn_seen = false;
        for tear in 1..12 {
            let (fs, _) = scenario(tear);
            let (_, rec) = open(&fs, c).unwrap();
            torn_seen |= rec.truncated_bytes > 0;
            for step in 1..=4 {
                let (fs, frames) = scenario(tear);
                fs.crash_after(step);
                let _ = open(&fs, c);
                fs.crash(CrashMode::Torn { seed: step });
                let (j, _) =
                    open(&fs, c).unwrap_or_else(|e| panic!("tear {tear} step {step}: {e}"));
                let got = read_all(&j);
                assert!(got.len() >= 6 && got.len() <= 9);
                assert_eq!(got[..6], frames[..], "tear {tear} step {step}");
            }
        }
        assert!(torn_seen, "no seed tore a frame: the test proves nothing");
    }

    /// Proves every truncation of a segment header is refused in an earlier segment and
    /// in Absolute mode, while an empty or all-zero last segment (a crash at creation) is
    /// removed in Tolerate mode.
    #[test]
    fn truncated_segment_header() {
        let c = tolerate(SEGMENT_BYTES_MIN);
        let fs = SimFs::new();
        let frames = build(&fs, c, 12, 200);
        let segs = segment_files(&fs);
        assert!(segs.len() >= 3);
        let header = encode_segment_header(GROUP, segs[0], segs[0] - 1);
        // An earlier segment cut inside its header: an error in both modes.
        for n in 0..SEGMENT_HEADER_BYTES {
            let fs2 = SimFs::new();
            build(&fs2, c, 12, 200);
            put_file(&fs2, &seg_path(segs[0]), &header[..n]);
            let before = snapshot(&fs2);
            for mode in [tolerate(SEGMENT_BYTES_MIN), absolute(SEGMENT_BYTES_MIN)] {
                assert!(open(&fs2, mode).is_err(), "cut to {n}");
                assert_eq!(snapshot(&fs2), before);
            }
        }
        // The last segment cut inside its header.
        let last = *segs.last().unwrap();
        let header = encode_segment_header(GROUP, last, last - 1);
        for n in 0..=SEGMENT_HEADER_BYTES {
            for zeroed in [false, true] {
                let fs2 = SimFs::new();
                build(&fs2, c, 12, 200);
                let bytes = if zeroed {
                    vec![0u8; n]
                } else {
                    header[..n].to_vec()
                };
                put_file(&fs2, &seg_path(last), &bytes);
                let before = snapshot(&fs2);
                let whole = n == SEGMENT_HEADER_BYTES && !zeroed;
                if !whole {
                    assert!(
                        open(&fs2, absolute(SEGMENT_BYTES_MIN)).is_err(),
                        "cut to {n}"
                    );
                    assert_eq!(snapshot(&fs2), before);
                }
                let r = open(&fs2, c);
                if zeroed || n == 0 {
                    let (j, rec) = r.unwrap();
                    assert_eq!(rec.truncated_bytes, n as u64);
                    assert_eq!(read_all(&j), frames[..last as usize - 1]);
                    assert!(!segment_files(&fs2).contains(&last));
                } else if n < SEGMENT_HEADER_BYTES {
                    assert!(
                        matches!(
                            r,
                            Err(JournalError::BadHeader {
                                field: "length",
                                ..
                            })
                        ),
                        "cut to {n}: {r:?}"
                    );
                    assert_eq!(snapshot(&fs2), before);
                } else {
                    // The whole header and no frame: a valid, empty last segment.
                    let (j, rec) = r.unwrap();
                    assert_eq!(rec.truncated_bytes, 0);
                    assert_eq!(read_all(&j), frames[..last as usize - 1]);
                }
            }
        }
    }

    /// Proves every bit flip in the frames of the last segment is a Corruption in both
    /// modes when the frame is at or below the header's mark, is cut in Tolerate mode
    /// (with every frame after it) when it is past the mark, and is always an error in
    /// Absolute mode; an error changes nothing on disk.
    #[test]
    fn bit_flips_in_last_segment() {
        let fs = SimFs::new();
        let (mut j, _) = open(&fs, JournalConfig::default()).unwrap();
        let mut frames = Vec::new();
        // Three commits of two frames: the mark ends at 4, frames 5 and 6 are past it.
        for seq in 1..=6u64 {
            let f = data_frame(seq, &vec![seq as u8; 20 + seq as usize]);
            j.append(&f).unwrap();
            frames.push(f);
            if seq % 2 == 0 {
                j.commit().unwrap();
            }
        }
        drop(j);
        let path = seg_path(1);
        let clean = fs.durable_contents(&path).unwrap();
        let header = decode_segment_header(&clean[..SEGMENT_HEADER_BYTES], GROUP, &path).unwrap();
        assert_eq!(header.synced_seq, 4);
        let starts: Vec<usize> = frames
            .iter()
            .scan(SEGMENT_HEADER_BYTES, |at, f| {
                let s = *at;
                *at += f.len();
                Some(s)
            })
            .collect();
        let (mut refused, mut cut) = (0, 0);
        for bit in SEGMENT_HEADER_BYTES * 8..clean.len() * 8 {
            let fs2 = SimFs::new();
            put_file(&fs2, &path, &clean);
            fs2.flip_bit(&path, bit / 8, (bit % 8) as u8);
            let before = snapshot(&fs2);
            let r = open(&fs2, absolute(SEGMENT_BYTES_DEFAULT));
            assert!(
                matches!(r, Err(JournalError::Corruption { .. })),
                "bit {bit}: {r:?}"
            );
            assert_eq!(snapshot(&fs2), before);
            // The index of the frame the flip hit; seq is one more.
            let hit = starts.iter().rposition(|&s| s <= bit / 8).unwrap();
            let r = open(&fs2, JournalConfig::default());
            if hit as u64 + 1 > header.synced_seq {
                let (j, rec) = r.unwrap_or_else(|e| panic!("bit {bit}: {e}"));
                assert_eq!(rec.truncated_bytes, (clean.len() - starts[hit]) as u64);
                assert_eq!(read_all(&j), frames[..hit]);
                assert_eq!(
                    fs2.durable_contents(&path).unwrap().len(),
                    starts[hit],
                    "the cut is durable"
                );
                cut += 1;
            } else {
                assert!(
                    matches!(r, Err(JournalError::Corruption { .. })),
                    "bit {bit}: {r:?}"
                );
                assert_eq!(snapshot(&fs2), before);
                refused += 1;
            }
        }
        assert!(refused > 0 && cut > 0);
    }

    /// Proves every bit flip in an earlier segment without its index (header or frames)
    /// is an error in both modes and changes nothing: its frames are scanned, and the
    /// scan is the authority wherever no index vouches for the segment.
    #[test]
    fn bit_flips_in_earlier_segment() {
        let c = tolerate(SEGMENT_BYTES_MIN);
        let fs = SimFs::new();
        build(&fs, c, 8, 300);
        let segs = segment_files(&fs);
        assert!(segs.len() >= 2);
        fs.remove_file(&idx_path(segs[0])).unwrap();
        fs.sync_dir(&dir()).unwrap();
        let path = seg_path(segs[0]);
        let clean = fs.durable_contents(&path).unwrap();
        let mut rng = Rng(77);
        // Every bit of the header, and a sample of the frame bits (each frame's header
        // bits all, its body bits sampled) to keep the run short.
        let bits = (0..clean.len() * 8).filter(|&b| b < 1024 || rng.below(8) == 0);
        for bit in bits {
            fs.flip_bit(&path, bit / 8, (bit % 8) as u8);
            let before = snapshot(&fs);
            for mode in [c, absolute(SEGMENT_BYTES_MIN)] {
                let r = open(&fs, mode);
                assert!(r.is_err(), "bit {bit}");
                assert_eq!(snapshot(&fs), before, "bit {bit}");
            }
            fs.flip_bit(&path, bit / 8, (bit % 8) as u8);
        }
        assert!(open(&fs, c).is_ok());
    }

    /// Proves that with its index, a bit flip in an earlier segment's header or in its
    /// last frame's header makes the index unusable (the scan then refuses the segment
    /// in both modes and nothing changes), and a flip anywhere else is found when the
    /// frame is read back, a Corruption at that frame: the index lists the frames, it
    /// never vouches for their bytes.
    #[test]
    fn bit_flips_in_earlier_segment_with_its_index() {
        let c = tolerate(SEGMENT_BYTES_MIN);
        let fs = SimFs::new();
        build(&fs, c, 8, 300);
        let segs = segment_files(&fs);
        assert!(segs.len() >= 2);
        let (j, rec) = open(&fs, c).unwrap();
        assert_eq!(rec.segments_indexed, segs.len() - 1);
        let entries: Vec<FrameEntry> = (1..=j.write_seq())
            .map(|s| *j.entry(s).unwrap())
            .filter(|e| e.segment == segs[0])
            .collect();
        drop(j);
        let last = entries.last().unwrap().offset as usize;
        let path = seg_path(segs[0]);
        let clean = fs.durable_contents(&path).unwrap();
        let mut rng = Rng(78);
        let (mut refused, mut found_on_read) = (0, 0);
        for bit in (0..clean.len() * 8).filter(|&b| b < 1024 || rng.below(4) == 0) {
            let byte = bit / 8;
            fs.flip_bit(&path, byte, (bit % 8) as u8);
            let checked =
                byte < SEGMENT_HEADER_BYTES || (last..last + frame::HEADER_BYTES).contains(&byte);
            if checked {
                let before = snapshot(&fs);
                for mode in [c, absolute(SEGMENT_BYTES_MIN)] {
                    assert!(open(&fs, mode).is_err(), "bit {bit}");
                    assert_eq!(snapshot(&fs), before, "bit {bit}");
                }
                refused += 1;
            } else {
                let (j, rec) = open(&fs, c).unwrap_or_else(|e| panic!("bit {bit}: {e}"));
                assert_eq!(rec.segments_indexed, segs.len() - 1, "bit {bit}");
                let hit = entries.iter().rfind(|e| e.offset as usize <= byte).unwrap();
                let r = j.read(hit.seq, hit.seq).unwrap().next().unwrap();
                assert!(
                    matches!(r, Err(JournalError::Corruption { offset, .. }) if offset == hit.offset),
                    "bit {bit}: {r:?}"
                );
                found_on_read += 1;
            }
            fs.flip_bit(&path, byte, (bit % 8) as u8);
        }
        assert!(refused > 0 && found_on_read > 0);
        assert_eq!(read_all(&open(&fs, c).unwrap().0).len(), 8);
    }

    /// Proves a truncated, bit-flipped, random, foreign, misplaced, stale or oversized
    /// index of a sealed segment is never used: open gives exactly what a scan of the
    /// frames gives, names the segment in `indexes_rebuilt`, and writes the right index
    /// back.
    #[test]
    fn bad_index_is_ignored_and_rebuilt() {
        let c = tolerate(SEGMENT_BYTES_MIN);
        let fs = SimFs::new();
        build(&fs, c, 12, 300);
        let segs = segment_files(&fs);
        assert!(segs.len() >= 3);
        let s0 = segs[0];
        let good = expected_index(&fs, s0);
        check_indexes(&fs, "built");
        let want = contents(&open(&fs, c).unwrap().0);
        let mut bad: Vec<(String, Vec<u8>)> = Vec::new();
        for n in 0..good.len() {
            bad.push((format!("cut to {n} bytes"), good[..n].to_vec()));
        }
        let mut rng = Rng(11);
        for bit in (0..good.len() * 8).filter(|&b| b < 2048 || rng.below(3) == 0) {
            let mut b = good.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            bad.push((format!("bit {bit} flipped"), b));
        }
        for i in 0..32 {
            let n = rng.below(2 * good.len() as u64) as usize;
            bad.push((format!("random {i}"), rng.bytes(n)));
        }
        let mut longer = good.clone();
        longer.push(0);
        bad.push(("a byte longer".into(), longer));
        bad.push(("the next segment's".into(), expected_index(&fs, segs[1])));
        let decoded = segindex::SegmentIndex::decode(good.clone(), GROUP, s0).unwrap();
        let records = IndexBuilder::from_index(&decoded);
        bad.push((
            "another group's".into(),
            records.encode("g2", s0, decoded.segment_bytes()),
        ));
        bad.push((
            "a shorter segment's".into(),
            records.encode(GROUP, s0, decoded.segment_bytes() - 1),
        ));
        // A journal started again with frames of the same lengths but other bytes.
        let mut stale = IndexBuilder::default();
        for f in decoded.frames() {
            let body_len = f.entry.len as usize - frame::HEADER_BYTES;
            let other = data_frame(f.entry.seq, &vec![0xee; body_len]);
            stale.push(&other, &frame::verify(&other).unwrap());
        }
        bad.push((
            "stale".into(),
            stale.encode(GROUP, s0, decoded.segment_bytes()),
        ));
        for (what, bytes) in bad {
            put_file(&fs, &idx_path(s0), &bytes);
            let (j, rec) = open(&fs, c).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(contents(&j), want, "{what}");
            assert_eq!(rec.indexes_rebuilt.len(), 1, "{what}");
            assert_eq!(rec.indexes_rebuilt[0].0, s0, "{what}");
            assert_eq!(rec.segments_indexed, segs.len() - 2, "{what}");
            drop(j);
            check_indexes(&fs, &what);
        }
    }

    /// Proves that when the last segment has no header (a crash while it was created)
    /// and the one before, read through its index, becomes the active segment again,
    /// that segment loses its index (appends will change it), keeps taking frames, and
    /// gets the index its frames give when it is sealed again.
    #[test]
    fn sealed_segment_that_becomes_active_again() {
        let c = tolerate(SEGMENT_BYTES_MIN);
        let fs = SimFs::new();
        build(&fs, c, 6, 300);
        let segs = segment_files(&fs);
        let last = *segs.last().unwrap();
        let (j, _) = open(&fs, c).unwrap();
        let next = j.next_seq();
        drop(j);
        // A full last segment, sealed: the next segment's file exists, header-less.
        put_file(&fs, &idx_path(last), &expected_index(&fs, last));
        put_file(&fs, &seg_path(next), &[]);
        let (mut j, rec) = open(&fs, c).unwrap();
        assert_eq!(rec.segments_indexed, segs.len());
        assert!(!fs.exists(&seg_path(next)) && !fs.exists(&idx_path(last)));
        for seq in next..next + 6 {
            j.append(&data_frame(seq, &[seq as u8; 300])).unwrap();
        }
        j.commit().unwrap();
        assert!(segment_files(&fs).len() > segs.len() + 1);
        drop(j);
        check_indexes(&fs, "sealed again");
        let (j, _) = open(&fs, c).unwrap();
        assert_eq!(read_all(&j).len() as u64, next + 5);
    }

    /// Proves an index goes with its segment: a drop removes the indexes of the
    /// segments it removes; open removes an orphan index, a temp of one and an index of
    /// the active segment; remove_all leaves no index or temp.
    #[test]
    fn indexes_go_with_their_segments() {
        let c = tolerate(SEGMENT_BYTES_MIN);
        let fs = SimFs::new();
        build(&fs, c, 12, 300);
        check_indexes(&fs, "built");
        let (mut j, _) = open(&fs, c).unwrap();
        let before = segment_files(&fs);
        assert!(j.drop_through(5).unwrap() > 0);
        assert!(segment_files(&fs)[0] > before[0]);
        check_indexes(&fs, "after a drop");
        drop(j);
        let segs = segment_files(&fs);
        let active = *segs.last().unwrap();
        put_file(&fs, &idx_path(1), b"orphan");
        put_file(
            &fs,
            &dir().join(format!("{}.tmp", segindex::index_name(segs[0]))),
            b"t",
        );
        put_file(&fs, &idx_path(active), &expected_index(&fs, active));
        let (j, rec) = open(&fs, c).unwrap();
        assert!(rec.index_errors.is_empty(), "{:?}", rec.index_errors);
        check_indexes(&fs, "after open");
        drop(j);
        put_file(
            &fs,
            &dir().join(format!("{}.tmp", segindex::index_name(segs[0]))),
            b"t",
        );
        assert!(remove_all(&fs, &dir()).unwrap() > 0);
        assert_eq!(fs.list_dir(&dir()).unwrap(), Vec::<String>::new());
    }

    /// Proves the index a segment gets when it is sealed decodes to its frames: every
    /// entry and point the journal lists, data frames of this build with their disk and
    /// extent table, frames it cannot parse without one.
    #[test]
    fn index_lists_frames_tables_and_points() {
        let c = tolerate(SEGMENT_BYTES_MIN * 2);
        let fs = SimFs::new();
        let (mut j, _) = open(&fs, c).unwrap();
        let mut enc = frame::Encoder::new(1);
        let mut out = Vec::new();
        let mut tables = Vec::new();
        for seq in 1..=40u64 {
            match seq % 3 {
                0 => {
                    let p = point_record(seq, seq * 10, PointKind::App);
                    j.append(&point_frame(seq, &p)).unwrap();
                }
                1 => {
                    let meta = frame::DataFrameMeta {
                        group: GROUP.into(),
                        disk: format!("d{}", seq % 2),
                        epoch: seq,
                    };
                    let bytes = vec![seq as u8; 512];
                    let extents = [
                        (seq * 4096, crate::extent::ExtentData::Bytes(&bytes)),
                        (seq * 4096 + 1024, crate::extent::ExtentData::Zero(2048)),
                    ];
                    enc.encode_data(&meta, seq, &extents, &mut out).unwrap();
                    j.append(&out).unwrap();
                    tables.push((seq, meta.disk));
                }
                _ => {
                    j.append(&data_frame(seq, &[seq as u8; 40])).unwrap();
                }
            }
        }
        j.commit().unwrap();
        let segs = segment_files(&fs);
        assert!(segs.len() >= 2);
        let mut seen = 0;
        for &s in &segs[..segs.len() - 1] {
            let f = fs.open(&seg_path(s), OpenMode::ReadOnly).unwrap();
            let idx = segindex::load(&fs, &dir(), GROUP, s, f.as_ref())
                .unwrap()
                .unwrap();
            for fr in idx.frames() {
                assert_eq!(Some(&fr.entry), j.entry(fr.entry.seq));
                let seq = fr.entry.seq;
                match (seq % 3, fr.detail) {
                    (0, segindex::Detail::Point(body)) => {
                        let p = frame::decode_point_body(body).unwrap();
                        assert_eq!(j.point_by_id(seq).unwrap().record, p);
                    }
                    (1, segindex::Detail::Data(Some(t))) => {
                        let disk = &tables.iter().find(|(s, _)| *s == seq).unwrap().1;
                        assert_eq!(t.disk, disk);
                        let ex: Vec<_> = t.extents().map(|e| (e.offset, e.len, e.zero)).collect();
                        assert_eq!(
                            ex,
                            vec![(seq * 4096, 512, false), (seq * 4096 + 1024, 2048, true)]
                        );
                    }
                    (2, segindex::Detail::Data(None)) => {}
                    (_, d) => panic!("frame {seq}: {d:?}"),
                }
                seen += 1;
            }
        }
        assert!(seen > 10);
    }

    /// Proves a well-formed header with a foreign group, an unknown version, a bad magic or
    /// a first seq that disagrees with the file name gets the typed error naming it.
    #[test]
    fn segment_header_fields_named() {
        let fs = SimFs::new();
        build(&fs, JournalConfig::default(), 2, 10);
        let path = seg_path(1);
        let clean = fs.durable_contents(&path).unwrap();
        let reseal = |b: &mut Vec<u8>| {
            let crc = crc32fast::hash(&b[..SEGMENT_CRC_OFFSET]);
            b[SEGMENT_CRC_OFFSET..SEGMENT_HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
        };
        let try_open = |b: &[u8]| {
            let fs2 = SimFs::new();
            put_file(&fs2, &path, b);
            open(&fs2, JournalConfig::default()).map(|_| ())
        };

        let mut b = clean.clone();
        b[..SEGMENT_HEADER_BYTES].copy_from_slice(&encode_segment_header("g2", 1, 0));
        assert!(
            matches!(try_open(&b), Err(JournalError::WrongGroup { found, .. }) if found == "g2")
        );
        let mut b = clean.clone();
        b[OFF_VERSION] = 2;
        reseal(&mut b);
        assert!(matches!(
            try_open(&b),
            Err(JournalError::UnsupportedVersion { version: 2, .. })
        ));
        let mut b = clean.clone();
        b[0] = b'X';
        assert!(matches!(try_open(&b), Err(JournalError::BadMagic { .. })));
        let mut b = clean.clone();
        b[..SEGMENT_HEADER_BYTES].copy_from_slice(&encode_segment_header(GROUP, 2, 1));
        assert!(matches!(
            try_open(&b),
            Err(JournalError::BadHeader {
                field: "first_seq",
                ..
            })
        ));
        for (at, field) in [
            (OFF_RESERVED0, "reserved0"),
            (OFF_RESERVED1 + 3, "reserved1"),
            (OFF_SEGMENT_RESERVED2 + 5, "reserved2"),
            (OFF_GROUP + 40, "group"),
        ] {
            let mut b = clean.clone();
            b[at] = 1;
            reseal(&mut b);
            let r = try_open(&b);
            assert!(
                matches!(&r, Err(JournalError::BadHeader { field: f, .. }) if *f == field),
                "{field}: {r:?}"
            );
        }
        let mut b = clean.clone();
        b[OFF_GROUP_LEN] = 65;
        reseal(&mut b);
        assert!(matches!(
            try_open(&b),
            Err(JournalError::BadHeader {
                field: "group_len",
                ..
            })
        ));
        let mut b = clean.clone();
        b[100] ^= 1;
        assert!(matches!(
            try_open(&b),
            Err(JournalError::BadHeader { field: "crc32", .. })
        ));
        // A mark beyond the two frames present; a mark on the last one is fine.
        let mut b = clean.clone();
        b[..SEGMENT_HEADER_BYTES].copy_from_slice(&encode_segment_header(GROUP, 1, 3));
        let r = try_open(&b);
        assert!(
            matches!(
                r,
                Err(JournalError::BadHeader {
                    field: "synced_seq",
                    ..
                })
            ),
            "{r:?}"
        );
        b[..SEGMENT_HEADER_BYTES].copy_from_slice(&encode_segment_header(GROUP, 1, 2));
        assert!(try_open(&b).is_ok());
        // A mark below `first_seq - 1`, and a `first_seq` of 0, refused by the decoder.
        let bad_field = |b: &[u8]| match decode_segment_header(b, GROUP, &path) {
            Err(JournalError::BadHeader { field, .. }) => Some(field),
            _ => None,
        };
        assert_eq!(
            bad_field(&encode_segment_header(GROUP, 5, 3)),
            Some("synced_seq")
        );
        assert_eq!(bad_field(&encode_segment_header(GROUP, 5, 4)), None);
        assert_eq!(
            bad_field(&encode_segment_header(GROUP, 0, 0)),
            Some("first_seq")
        );
        assert!(try_open(&clean).is_ok());
    }

    /// Proves random bytes as a segment, as a segment tail, as the state file, or under a
    /// malformed segment name give an error (or a clean tail cut), never a panic.
    #[test]
    fn random_bytes_refused() {
        let mut rng = Rng(0x5eed);
        for i in 0..300 {
            let len = 1 + rng.below(2000) as usize;
            let junk = rng.bytes(len);
            // A whole segment of junk.
            let fs = SimFs::new();
            put_file(&fs, &seg_path(1), &junk);
            for mode in [tolerate(SEGMENT_BYTES_MIN), absolute(SEGMENT_BYTES_MIN)] {
                assert!(open(&fs, mode).is_err(), "case {i}");
            }
            // A valid header followed by junk: a tail cut, or an error in Absolute mode.
            let fs = SimFs::new();
            let mut b = encode_segment_header(GROUP, 1, 0);
            b.extend_from_slice(&junk);
            put_file(&fs, &seg_path(1), &b);
            assert!(open(&fs, absolute(SEGMENT_BYTES_MIN)).is_err(), "case {i}");
            let (j, rec) = open(&fs, tolerate(SEGMENT_BYTES_MIN)).unwrap();
            assert_eq!(rec.truncated_bytes, len as u64);
            assert_eq!(j.write_seq(), 0);
            // Junk as the state file.
            let fs = SimFs::new();
            build(&fs, JournalConfig::default(), 2, 10);
            put_file(&fs, &dir().join(STATE_FILE), &junk[..len.min(200)]);
            assert!(open(&fs, JournalConfig::default()).is_err(), "case {i}");
        }
        let fs = SimFs::new();
        build(&fs, JournalConfig::default(), 2, 10);
        put_file(&fs, &dir().join("journal-12x.seg"), b"");
        assert!(matches!(
            open(&fs, JournalConfig::default()),
            Err(JournalError::Corruption { .. })
        ));
    }

    /// Proves every truncation and bit flip of the state file is refused.
    #[test]
    fn state_file_bad_input_refused() {
        let fs = SimFs::new();
        build(&fs, JournalConfig::default(), 4, 10);
        let (mut j, _) = open(&fs, JournalConfig::default()).unwrap();
        j.drop_through(2).unwrap();
        drop(j);
        let path = dir().join(STATE_FILE);
        let clean = fs.durable_contents(&path).unwrap();
        assert_eq!(clean, encode_state(GROUP, 2));
        for n in 0..clean.len() {
            put_file(&fs, &path, &clean[..n]);
            assert!(open(&fs, JournalConfig::default()).is_err(), "cut to {n}");
        }
        put_file(&fs, &path, &clean);
        for bit in 0..clean.len() * 8 {
            fs.flip_bit(&path, bit / 8, (bit % 8) as u8);
            assert!(open(&fs, JournalConfig::default()).is_err(), "bit {bit}");
            fs.flip_bit(&path, bit / 8, (bit % 8) as u8);
        }
        let (j, _) = open(&fs, JournalConfig::default()).unwrap();
        assert_eq!(j.base_seq(), 2);
    }

    /// Proves a frame header claiming a body over the bound is refused on append, is an
    /// error at or below the mark even with a valid frame after it, and is cut past the
    /// mark only in Tolerate mode (whatever follows it); no allocation of the claimed
    /// size happens (the bound is checked first).
    #[test]
    fn oversized_body_claim() {
        let mut huge = data_frame(3, b"x");
        huge[8..12].copy_from_slice(&(frame::MAX_BODY_BYTES + 1).to_le_bytes());
        let fs = SimFs::new();
        let frames = build(&fs, JournalConfig::default(), 2, 10);
        let (mut j, _) = open(&fs, JournalConfig::default()).unwrap();
        assert!(matches!(
            j.append(&huge),
            Err(JournalError::Frame(FrameError::TooLarge { .. }))
        ));
        drop(j);
        let path = seg_path(1);
        let clean = fs.durable_contents(&path).unwrap();
        // As the tail.
        let mut tail = clean.clone();
        tail.extend_from_slice(&huge);
        put_file(&fs, &path, &tail);
        assert!(open(&fs, absolute(SEGMENT_BYTES_DEFAULT)).is_err());
        let (j, rec) = open(&fs, JournalConfig::default()).unwrap();
        assert_eq!(rec.truncated_bytes, huge.len() as u64);
        assert_eq!(read_all(&j), frames);
        drop(j);
        // A valid frame follows it, and the mark covers its place: rot, in both modes.
        let mut mid = clean.clone();
        mid[..SEGMENT_HEADER_BYTES].copy_from_slice(&encode_segment_header(GROUP, 1, 3));
        mid.extend_from_slice(&huge);
        mid.extend_from_slice(&data_frame(3, b"y"));
        put_file(&fs, &path, &mid);
        for mode in [JournalConfig::default(), absolute(SEGMENT_BYTES_DEFAULT)] {
            assert!(matches!(
                open(&fs, mode),
                Err(JournalError::Corruption { .. })
            ));
        }
        // The same bytes past the mark: a torn batch, cut with the frame after it.
        mid[..SEGMENT_HEADER_BYTES].copy_from_slice(&encode_segment_header(GROUP, 1, 2));
        put_file(&fs, &path, &mid);
        assert!(open(&fs, absolute(SEGMENT_BYTES_DEFAULT)).is_err());
        let (j, rec) = open(&fs, JournalConfig::default()).unwrap();
        assert_eq!(rec.truncated_bytes, (mid.len() - clean.len()) as u64);
        assert_eq!(read_all(&j), frames);
    }

    /// Proves the journal reports a frame that rotted on disk after it was indexed, and
    /// stops reading there.
    #[test]
    fn read_back_reverifies_crc() {
        let fs = SimFs::new();
        build(&fs, JournalConfig::default(), 3, 50);
        let (j, _) = open(&fs, JournalConfig::default()).unwrap();
        let e = *j.entry(2).unwrap();
        fs.flip_bit(&seg_path(1), e.offset as usize + 40, 3);
        let got: Vec<_> = j.read(1, 3).unwrap().collect();
        assert_eq!(got.len(), 2);
        assert!(got[0].is_ok());
        assert!(
            matches!(got[1], Err(JournalError::Corruption { offset, .. }) if offset == e.offset)
        );
    }

    /// Proves bad ids and configs are refused before anything is created.
    #[test]
    fn bad_open_arguments() {
        let fs = SimFs::new();
        let a: Arc<dyn Storage> = Arc::new(fs.clone());
        assert!(matches!(
            Journal::open(a.clone(), &dir(), "Bad", JournalConfig::default()),
            Err(JournalError::InvalidGroup(_))
        ));
        assert!(matches!(
            Journal::open(a, &dir(), GROUP, tolerate(SEGMENT_BYTES_MIN - 1)),
            Err(JournalError::Config(_))
        ));
        assert_eq!(fs.steps(), 0);
    }

    /// Proves the journal works on the real file system through the same trait.
    #[test]
    fn real_fs_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("g1");
        let fs: Arc<dyn Storage> = Arc::new(RealFs);
        let c = tolerate(SEGMENT_BYTES_MIN);
        let (mut j, _) = Journal::open(fs.clone(), &d, GROUP, c).unwrap();
        let mut frames = Vec::new();
        for seq in 1..=20 {
            let f = data_frame(seq, &[seq as u8; 300]);
            j.append(&f).unwrap();
            frames.push(f);
        }
        j.append(&point_frame(21, &point_record(1, 5, PointKind::App)))
            .unwrap();
        j.commit().unwrap();
        j.drop_through(10).unwrap();
        drop(j);
        let (j, rec) = Journal::open(fs, &d, GROUP, c).unwrap();
        assert_eq!((rec.frames, rec.points), (11, 1));
        let got = read_all(&j);
        assert_eq!(got[..10], frames[10..]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Proves the point queries agree with a naive model over random point lists,
        /// before and after a reopen and a drop.
        #[test]
        fn point_queries_match_model(
            pts in proptest::collection::vec((0u64..5, 0u64..1000, any::<bool>(), 0u64..3), 1..20),
            probe in 0u64..1100,
            drop_at in 0usize..20,
        ) {
            let fs = SimFs::new();
            let (mut j, _) = open(&fs, JournalConfig::default()).unwrap();
            let mut id = 0;
            let mut model: Vec<PointEntry> = Vec::new();
            for (step, time, app, data_before) in pts {
                id += 1 + step;
                for _ in 0..data_before {
                    let seq = j.next_seq();
                    j.append(&data_frame(seq, b"d")).unwrap();
                }
                let kind = if app { PointKind::App } else { PointKind::Crash };
                let record = point_record(id, time, kind);
                let seq = j.next_seq();
                j.append(&point_frame(seq, &record)).unwrap();
                model.push(PointEntry { record, seq });
            }
            j.commit().unwrap();
            let check = |j: &Journal, model: &[PointEntry]| {
                prop_assert_eq!(j.points(), model);
                prop_assert_eq!(j.latest_point(), model.last());
                prop_assert_eq!(
                    j.latest_app_point(),
                    model.iter().rev().find(|p| p.record.kind == PointKind::App)
                );
                prop_assert_eq!(
                    j.point_at_or_before(probe),
                    model.iter().rev().find(|p| p.record.time_unix_ms <= probe)
                );
                for p in model {
                    prop_assert_eq!(j.point_by_id(p.record.point_id), Some(p));
                    let n = j.frames_through_point(p.record.point_id).unwrap().count() as u64;
                    prop_assert_eq!(n, p.seq - j.base_seq());
                }
                prop_assert!(j.point_by_id(id + 1).is_none());
                Ok(())
            };
            check(&j, &model)?;
            let cut = model.get(drop_at).map(|p| p.seq).unwrap_or(0);
            j.drop_through(cut).unwrap();
            model.retain(|p| p.seq > cut);
            check(&j, &model)?;
            drop(j);
            let (j, _) = open(&fs, JournalConfig::default()).unwrap();
            check(&j, &model)?;
        }
    }

    /// Proves a crc-valid frame with seq `u64::MAX` (no seq can follow it) in a segment
    /// is refused as corruption, in the last segment as well, instead of overflowing.
    #[test]
    fn frame_with_the_last_seq_is_refused() {
        let fs = SimFs::new();
        put_file(
            &fs,
            &dir().join(STATE_FILE),
            &encode_state(GROUP, u64::MAX - 1),
        );
        let mut seg = encode_segment_header(GROUP, u64::MAX, u64::MAX - 1);
        seg.extend_from_slice(&data_frame(u64::MAX, b"x"));
        put_file(&fs, &seg_path(u64::MAX), &seg);
        for c in [JournalConfig::default(), absolute(SEGMENT_BYTES_DEFAULT)] {
            assert!(matches!(open(&fs, c), Err(JournalError::Corruption { .. })));
        }
    }

    /// A storage that reports a huge length for the state file, to catch a reader that
    /// allocates what the file claims.
    struct HugeState(SimFs);
    struct HugeFile(Box<dyn StorageFile>);
    impl StorageFile for HugeFile {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            self.0.read_at(buf, offset)
        }
        fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.0.write_all_at(buf, offset)
        }
        fn len(&self) -> io::Result<u64> {
            Ok(1 << 60)
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.0.set_len(len)
        }
        fn sync_data(&self) -> io::Result<()> {
            self.0.sync_data()
        }
    }
    impl Storage for HugeState {
        fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StorageFile>> {
            let f = self.0.open(path, mode)?;
            Ok(if path.ends_with(STATE_FILE) {
                Box::new(HugeFile(f))
            } else {
                f
            })
        }
        fn map_mut(&self, path: &Path) -> io::Result<Box<dyn crate::storage::MappedFile>> {
            self.0.map_mut(path)
        }
        fn create_dir_all(&self, path: &Path) -> io::Result<()> {
            self.0.create_dir_all(path)
        }
        fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
            self.0.list_dir(dir)
        }
        fn exists(&self, path: &Path) -> bool {
            self.0.exists(path)
        }
        fn remove_file(&self, path: &Path) -> io::Result<()> {
            self.0.remove_file(path)
        }
        fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            self.0.rename(from, to)
        }
        fn sync_dir(&self, dir: &Path) -> io::Result<()> {
            self.0.sync_dir(dir)
        }
    }

    /// A storage that refuses to create index temps (a full or failing disk, for the
    /// derived files only).
    struct NoIndexWrites(SimFs);
    impl Storage for NoIndexWrites {
        fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StorageFile>> {
            if path.to_string_lossy().ends_with(".idx.tmp") {
                return Err(io::Error::other("no space left for an index"));
            }
            self.0.open(path, mode)
        }
        fn map_mut(&self, path: &Path) -> io::Result<Box<dyn crate::storage::MappedFile>> {
            self.0.map_mut(path)
        }
        fn create_dir_all(&self, path: &Path) -> io::Result<()> {
            self.0.create_dir_all(path)
        }
        fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
            self.0.list_dir(dir)
        }
        fn exists(&self, path: &Path) -> bool {
            self.0.exists(path)
        }
        fn remove_file(&self, path: &Path) -> io::Result<()> {
            self.0.remove_file(path)
        }
        fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            self.0.rename(from, to)
        }
        fn sync_dir(&self, dir: &Path) -> io::Result<()> {
            self.0.sync_dir(dir)
        }
    }

    /// Proves a segment index that cannot be written does not stop the journal: it
    /// rolls on and says so once ([`Journal::take_index_error`]), an open that cannot
    /// write them reports it and still opens, and the next open that can rebuilds every
    /// missing index.
    #[test]
    fn failed_index_write_does_not_stop_the_journal() {
        let fs = SimFs::new();
        let failing: Arc<dyn Storage> = Arc::new(NoIndexWrites(fs.clone()));
        let c = tolerate(SEGMENT_BYTES_MIN);
        let (mut j, _) = Journal::open(failing.clone(), &dir(), GROUP, c).unwrap();
        for seq in 1..=8 {
            j.append(&data_frame(seq, &[seq as u8; 300])).unwrap();
        }
        j.commit().unwrap();
        let e = j
            .take_index_error()
            .expect("the roll says it could not write");
        assert!(e.contains(".idx") && e.contains("no space left"), "{e}");
        assert_eq!(j.take_index_error(), None);
        let want = contents(&j);
        drop(j);
        let sealed = segment_files(&fs).len() - 1;
        assert!(sealed >= 2);
        let (j, rec) = Journal::open(failing, &dir(), GROUP, c).unwrap();
        assert_eq!(contents(&j), want);
        assert_eq!(rec.indexes_rebuilt.len(), sealed);
        assert_eq!(rec.index_errors.len(), sealed, "{:?}", rec.index_errors);
        drop(j);
        let (j, rec) = open(&fs, c).unwrap();
        assert_eq!(contents(&j), want);
        assert_eq!(rec.indexes_rebuilt.len(), sealed);
        assert!(rec.indexes_rebuilt.iter().all(|(_, why)| why == "missing"));
        assert!(rec.index_errors.is_empty());
        drop(j);
        check_indexes(&fs, "rebuilt");
        assert_eq!(open(&fs, c).unwrap().1.segments_indexed, sealed);
    }

    /// Proves a state file longer than the format is refused by its length, before a
    /// buffer of that length is allocated.
    #[test]
    fn huge_state_file_refused_without_allocating() {
        let fs = SimFs::new();
        let mut long = encode_state(GROUP, 0);
        long.push(0);
        put_file(&fs, &dir().join(STATE_FILE), &long);
        let r = Journal::open(
            Arc::new(HugeState(fs)),
            &dir(),
            GROUP,
            JournalConfig::default(),
        );
        assert!(
            matches!(
                r,
                Err(JournalError::BadHeader {
                    field: "length",
                    ..
                })
            ),
            "{r:?}"
        );
    }

    /// A storage that counts the bytes read from files, to bound the work of a scan.
    struct CountingFs(SimFs, Arc<std::sync::atomic::AtomicU64>);
    struct CountingFile(Box<dyn StorageFile>, Arc<std::sync::atomic::AtomicU64>);
    impl StorageFile for CountingFile {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            let n = self.0.read_at(buf, offset)?;
            self.1
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            Ok(n)
        }
        fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.0.write_all_at(buf, offset)
        }
        fn len(&self) -> io::Result<u64> {
            self.0.len()
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.0.set_len(len)
        }
        fn sync_data(&self) -> io::Result<()> {
            self.0.sync_data()
        }
    }
    impl Storage for CountingFs {
        fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StorageFile>> {
            Ok(Box::new(CountingFile(
                self.0.open(path, mode)?,
                Arc::clone(&self.1),
            )))
        }
        fn map_mut(&self, path: &Path) -> io::Result<Box<dyn crate::storage::MappedFile>> {
            self.0.map_mut(path)
        }
        fn create_dir_all(&self, path: &Path) -> io::Result<()> {
            self.0.create_dir_all(path)
        }
        fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
            self.0.list_dir(dir)
        }
        fn exists(&self, path: &Path) -> bool {
            self.0.exists(path)
        }
        fn remove_file(&self, path: &Path) -> io::Result<()> {
            self.0.remove_file(path)
        }
        fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            self.0.rename(from, to)
        }
        fn sync_dir(&self, dir: &Path) -> io::Result<()> {
            self.0.sync_dir(dir)
        }
    }

    /// Proves a torn tail past the mark is cut at its first bad spot without reading
    /// what follows: stray frame headers after it (a guest can write them into its
    /// disk, and so into raw payloads) claiming large bodies are never read.
    #[test]
    fn torn_tail_cut_without_reading_past_it() {
        let fs = SimFs::new();
        build(&fs, JournalConfig::default(), 2, 10);
        let path = seg_path(1);
        let mut seg = fs.durable_contents(&path).unwrap();
        // A torn frame, then 64 stray headers claiming 1 MiB bodies of seq 0.
        seg.extend_from_slice(&data_frame(3, b"torn")[..20]);
        let mut stray = data_frame(0, b"");
        stray[8..12].copy_from_slice(&(1u32 << 20).to_le_bytes());
        for _ in 0..64 {
            seg.extend_from_slice(&stray);
        }
        seg.resize(seg.len() + (1 << 20), 0);
        // A magic in the last bytes of the file, too short for a header.
        seg.extend_from_slice(&frame::MAGIC);
        put_file(&fs, &path, &seg);
        let read = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counting = CountingFs(fs, Arc::clone(&read));
        let (j, rec) =
            Journal::open(Arc::new(counting), &dir(), GROUP, JournalConfig::default()).unwrap();
        assert_eq!(j.write_seq(), 2);
        assert!(rec.truncated_bytes > 1 << 20);
        let read = read.load(std::sync::atomic::Ordering::Relaxed);
        assert!(read < 64 << 10, "the scan read {read} bytes");
    }
}
