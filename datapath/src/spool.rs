//! The spool: the process server's bounded on-disk queue of captured writes and cuts.
//!
//! Every write the process server captures (and every trim or write-zeroes, and every
//! cut of a group) is appended here under a rising sequence number, kept until the
//! master target acknowledges it as durable, then released. The spool lives in one
//! directory as a series of segment files; memory holds only a small index per segment
//! (first seq and size), never per record, so it stays flat however much is spooled.
//!
//! # Files
//!
//! A segment is named after the seq of its first record, zero-padded so that names sort
//! in seq order: `spool-00000000000000000001.seg` ([`segment_file_name`]). Other names
//! in the directory are ignored. The last segment is the *active* one: the only one
//! appended to, and never released.
//!
//! # Segment header, version 1 (all integers little-endian)
//!
//! | offset | size | field       | meaning                                                 |
//! |-------:|-----:|-------------|---------------------------------------------------------|
//! | 0      | 4    | `magic`     | [`SEGMENT_MAGIC`] `b"BRSS"`; never modify               |
//! | 4      | 2    | `version`   | [`VERSION`]; readers refuse versions they do not know   |
//! | 6      | 2    | `reserved0` | must be 0                                               |
//! | 8      | 8    | `first_seq` | seq of the segment's first record; equals the file name |
//! | 16     | 12   | `reserved1` | must be 0                                               |
//! | 28     | 4    | `crc32`     | crc32 (IEEE) of bytes 0..28                             |
//!
//! Records follow the header back to back, with seqs `first_seq, first_seq + 1, ...`.
//!
//! # Record, version 1
//!
//! A fixed 64-byte header, then `disk_len` bytes of disk id, then `data_len` bytes of
//! data (writes only).
//!
//! | offset | size | field        | meaning                                                      |
//! |-------:|-----:|--------------|--------------------------------------------------------------|
//! | 0      | 4    | `magic`      | [`RECORD_MAGIC`] `b"BRSR"`; never modify                     |
//! | 4      | 2    | `version`    | [`VERSION`]                                                  |
//! | 6      | 1    | `kind`       | [`RecordKind`]: 1 write, 2 zero (trim / write-zeroes), 3 cut |
//! | 7      | 1    | `flags`      | cut: bit 0 = app-consistent, bit 1 = inconsistent; others 0  |
//! | 8      | 8    | `seq`        | the record's seq, one more than the record before it        |
//! | 16     | 8    | `synced_seq` | highest seq durable when this record was appended (< `seq`)  |
//! | 24     | 8    | `epoch`      | the group epoch the record belongs to                        |
//! | 32     | 8    | `offset`     | write/zero: disk byte offset; cut: `point_id`                |
//! | 40     | 8    | `len`        | write/zero: byte length; cut: `time_unix_ms` (UTC)           |
//! | 48     | 4    | `data_len`   | bytes of data: write: = `len`, at most [`RECORD_DATA_BYTES_MAX`]; else 0 |
//! | 52     | 1    | `disk_len`   | write/zero: 1..=64; cut: 0                                   |
//! | 53     | 7    | `reserved`   | must be 0                                                    |
//! | 60     | 4    | `crc32`      | crc32 of bytes 0..60, then the disk id, then the data        |
//!
//! Writes and zeros are sector aligned ([`SECTOR_BYTES`]) and not empty. A cut stores its
//! point id in `offset`, its time in `len`, its app-consistent flag in `flags` bit 0 and
//! its inconsistent flag in bit 1 (a cut made while a resync is still reading the backing
//! disks: a point in the history, not one to recover to),
//! so that every record shares one fixed header.
//!
//! # Order of writes and syncs
//!
//! - Append: header + disk id, then data, written at the end of the active segment
//!   in one vectored write ([`StorageFile::write_all_vectored_at`]); nothing is
//!   synced, but every [`WRITEBACK_BYTES`] appended have their writeback started (a
//!   hint that shortens the next sync). [`Spool::sync`] is one `sync_data` of the
//!   active segment for all appends since the last one, and moves
//!   [`Spool::durable_seq`].
//! - Roll (inside [`Spool::append`] when the active segment would pass
//!   `segment_bytes_max`): the old segment is synced (so only the last segment can ever
//!   hold un-synced records), then the new file is created, its header written, the file
//!   synced, the directory synced; only then is a record written to it.
//! - Release: each segment wholly at or below the acknowledged seq is removed, oldest
//!   first, and the directory synced after each removal, so a crash never leaves a gap.
//! - Readers ([`Spool::read_from`]) see only records at or below `durable_seq`: a record
//!   shipped to the master target can then never be lost by a crash here and its seq
//!   reused for different data.
//!
//! Invariant: `first_seq - 1 <= durable_seq <= last_seq`.
//!
//! A failed sync or roll stops the spool ([`SpoolError::Poisoned`]) until it is
//! reopened: after a failed `fsync` the kernel may have dropped the pages it was given,
//! so a later sync that succeeds would report lost records durable.
//!
//! # Recovery policy (on [`Spool::open`])
//!
//! Every segment is scanned in seq order and every record's crc verified; seqs must be
//! contiguous across segments.
//!
//! - A bad record in a segment other than the last is [`SpoolError::Corruption`]: those
//!   segments were synced whole before the next one was created.
//! - A bad or short record in the last segment is a torn tail *unless* a valid record
//!   after it proves the bad one had been synced (its `synced_seq` is at or above the bad
//!   record's seq): then it is corruption in the middle, an error. A torn tail is cut:
//!   the file is truncated to the end of the last good record and synced, and the cut is
//!   reported in [`SpoolRecovery`]. (Un-synced appends may reach the disk in any order,
//!   so a hole followed by good but un-synced records is an ordinary torn tail.)
//! - A last segment shorter than its header, or all zeros, is a roll cut short by a
//!   crash: its header is rewritten from the file name.
//! - A record with valid crc but the wrong seq, a header with a wrong magic or a bad
//!   crc: errors. An unknown segment version: [`SpoolError::UnsupportedVersion`].
//!
//! When open refuses a spool (corruption, unknown version) it changes nothing on disk. After recovery the last segment is
//! synced, so everything reported is durable.
//!
//! # Bounds
//!
//! `spool_bytes_max` bounds the sum of segment sizes ([`SpoolError::Full`]); a record's
//! data is at most [`RECORD_DATA_BYTES_MAX`], checked before anything is allocated. Only
//! whole non-active segments are released, so `spool_bytes_max` should be several times
//! `segment_bytes_max`.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

use crate::extent::SECTOR_BYTES;
use crate::storage::{OpenMode, Storage, StorageFile};

/// The spool format version (segment header and records) this code writes and reads.
pub const VERSION: u16 = 1;
/// Segment header magic. Never modify: it names the format of every spool segment.
pub const SEGMENT_MAGIC: [u8; 4] = *b"BRSS";
/// Record magic. Never modify: it names the format of every spool record.
pub const RECORD_MAGIC: [u8; 4] = *b"BRSR";
/// Size of the segment header.
pub const SEGMENT_HEADER_BYTES: usize = 32;
/// Size of the fixed record header.
pub const RECORD_HEADER_BYTES: usize = 64;
/// Hard bound on the data of one record; checked before anything is allocated.
pub const RECORD_DATA_BYTES_MAX: u32 = 32 << 20;
/// Bytes past `spool_bytes_max` only cut records may use: a full spool can still seal
/// the epoch its last records belong to, so they can be shipped, acknowledged and
/// released (without a cut they could never be).
pub const CUT_RESERVE_BYTES: u64 = 64 << 10;
/// Hard bound on a disk id (see [`crate::valid_id`]).
pub const DISK_ID_BYTES_MAX: usize = 64;
/// Bytes appended to the active segment after which their writeback is started
/// ([`Spool::start_writeback`]).
pub const WRITEBACK_BYTES: u64 = 4 << 20;

const SEGMENT_CRC_OFFSET: usize = 28;
const RECORD_CRC_OFFSET: usize = 60;
const SEGMENT_PREFIX: &str = "spool-";
const SEGMENT_SUFFIX: &str = ".seg";
/// Digits of the seq in a segment name: enough for every u64.
const SEGMENT_SEQ_DIGITS: usize = 20;
/// Chunk in which recovery reads a file when it looks for a magic or checks for zeros.
const SCAN_CHUNK_BYTES: usize = 64 << 10;

const _: () = assert!(SEGMENT_HEADER_BYTES == SEGMENT_CRC_OFFSET + 4);
const _: () = assert!(RECORD_HEADER_BYTES == RECORD_CRC_OFFSET + 4);
const _: () = assert!(DISK_ID_BYTES_MAX <= u8::MAX as usize);

/// What a record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// Data written to a disk range.
    Write = 1,
    /// A disk range that reads as zeros now (trim or write-zeroes); no data.
    Zero = 2,
    /// A cut: the recovery point that closes an epoch of the group.
    Cut = 3,
}

impl RecordKind {
    /// The kind for a header byte, or `None` when unknown.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Write,
            2 => Self::Zero,
            3 => Self::Cut,
            _ => return None,
        })
    }
}

/// Sizes of the spool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpoolConfig {
    /// A segment is rolled when the next record would take it past this size (a segment
    /// always takes at least one record, so one large record may exceed it).
    pub segment_bytes_max: u64,
    /// The sum of all segment sizes never passes this; appends beyond it are `Full`.
    /// Must be at least `segment_bytes_max` ([`SpoolError::InvalidConfig`] otherwise).
    pub spool_bytes_max: u64,
}

impl SpoolConfig {
    fn check(&self) -> Result<(), SpoolError> {
        let min = (SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES) as u64;
        if self.segment_bytes_max < min {
            return Err(SpoolError::InvalidConfig(format!(
                "segment_bytes_max {} is below {min}",
                self.segment_bytes_max
            )));
        }
        if self.spool_bytes_max < self.segment_bytes_max {
            return Err(SpoolError::InvalidConfig(format!(
                "spool_bytes_max {} is below segment_bytes_max {}",
                self.spool_bytes_max, self.segment_bytes_max
            )));
        }
        Ok(())
    }
}

/// A record to append (the spool assigns its seq).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpoolRecordRef<'a> {
    /// `data` was written to `disk` at byte `offset`.
    Write {
        epoch: u64,
        disk: &'a str,
        offset: u64,
        data: &'a [u8],
    },
    /// `len` bytes at `offset` of `disk` read as zeros.
    Zero {
        epoch: u64,
        disk: &'a str,
        offset: u64,
        len: u64,
    },
    /// The cut that closes `epoch`.
    Cut {
        epoch: u64,
        point_id: u64,
        time_unix_ms: u64,
        app_consistent: bool,
        /// False for a cut made during a resync: not a point to recover to.
        consistent: bool,
    },
}

impl SpoolRecordRef<'_> {
    /// The epoch the record belongs to.
    pub fn epoch(&self) -> u64 {
        match *self {
            Self::Write { epoch, .. } | Self::Zero { epoch, .. } | Self::Cut { epoch, .. } => epoch,
        }
    }

    /// Bytes the record takes in a segment.
    pub fn encoded_bytes(&self) -> u64 {
        let (disk, data) = self.disk_and_data();
        (RECORD_HEADER_BYTES + disk.len() + data.len()) as u64
    }

    fn disk_and_data(&self) -> (&str, &[u8]) {
        match *self {
            Self::Write { disk, data, .. } => (disk, data),
            Self::Zero { disk, .. } => (disk, &[]),
            Self::Cut { .. } => ("", &[]),
        }
    }

    /// The header of this record as seq `seq`, not yet checked.
    fn header(&self, seq: u64, synced_seq: u64) -> RecordHeader {
        let (disk, data) = self.disk_and_data();
        let (kind, flags, offset, len) = match *self {
            Self::Write { offset, data, .. } => (RecordKind::Write, 0, offset, data.len() as u64),
            Self::Zero { offset, len, .. } => (RecordKind::Zero, 0, offset, len),
            Self::Cut {
                point_id,
                time_unix_ms,
                app_consistent,
                consistent,
                ..
            } => (
                RecordKind::Cut,
                u8::from(app_consistent) | (u8::from(!consistent) << 1),
                point_id,
                time_unix_ms,
            ),
        };
        RecordHeader {
            kind,
            flags,
            seq,
            synced_seq,
            epoch: self.epoch(),
            offset,
            len,
            // Saturate: a length above u32 fails the bound check instead of wrapping.
            data_len: u32::try_from(data.len()).unwrap_or(u32::MAX),
            disk_len: u8::try_from(disk.len()).unwrap_or(u8::MAX),
        }
    }
}

/// A record read back, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpoolEntry {
    Write {
        epoch: u64,
        disk: String,
        offset: u64,
        data: Vec<u8>,
    },
    Zero {
        epoch: u64,
        disk: String,
        offset: u64,
        len: u64,
    },
    Cut {
        epoch: u64,
        point_id: u64,
        time_unix_ms: u64,
        app_consistent: bool,
        consistent: bool,
    },
}

impl SpoolEntry {
    /// A borrowed view, as [`Spool::append`] takes it.
    pub fn record_ref(&self) -> SpoolRecordRef<'_> {
        match self {
            Self::Write {
                epoch,
                disk,
                offset,
                data,
            } => SpoolRecordRef::Write {
                epoch: *epoch,
                disk,
                offset: *offset,
                data,
            },
            Self::Zero {
                epoch,
                disk,
                offset,
                len,
            } => SpoolRecordRef::Zero {
                epoch: *epoch,
                disk,
                offset: *offset,
                len: *len,
            },
            Self::Cut {
                epoch,
                point_id,
                time_unix_ms,
                app_consistent,
                consistent,
            } => SpoolRecordRef::Cut {
                epoch: *epoch,
                point_id: *point_id,
                time_unix_ms: *time_unix_ms,
                app_consistent: *app_consistent,
                consistent: *consistent,
            },
        }
    }
}

/// A record read back with its seq.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpoolRecord {
    pub seq: u64,
    pub entry: SpoolEntry,
}

impl SpoolRecord {
    /// A borrowed view of the entry.
    pub fn record_ref(&self) -> SpoolRecordRef<'_> {
        self.entry.record_ref()
    }
}

/// Why a spool operation failed. Callers branch on the case.
#[derive(Debug, Error)]
pub enum SpoolError {
    #[error("spool i/o failed ({context}): {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "spool full: {used_bytes} of {max_bytes} bytes used, the record needs {need_bytes} more"
    )]
    Full {
        used_bytes: u64,
        max_bytes: u64,
        need_bytes: u64,
    },
    #[error("spool segment {} corrupt at byte {offset}: {why}", segment.display())]
    Corruption {
        segment: PathBuf,
        offset: u64,
        why: String,
    },
    #[error("spool segment {} has version {version} (this build reads version {VERSION})", segment.display())]
    UnsupportedVersion { segment: PathBuf, version: u16 },
    #[error("record refused: {why}")]
    InvalidRecord { why: String },
    #[error("spool config refused: {0}")]
    InvalidConfig(String),
    #[error("seq {seq} was released; the spool starts at {first_seq}")]
    Released { seq: u64, first_seq: u64 },
    #[error("release up to seq {up_to_seq} asked, but the last seq is {last_seq}")]
    ReleaseBeyondEnd { up_to_seq: u64, last_seq: u64 },
    /// A sync or a roll failed earlier: what is durable is unknown (a failed fsync may
    /// drop the dirty pages it was given), so the spool refuses appends and syncs until
    /// it is reopened, which re-derives the durable state from the disk.
    #[error("spool stopped after an earlier failure ({why}); reopen it")]
    Poisoned { why: String },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> SpoolError {
    let context = context.into();
    move |source| SpoolError::Io { context, source }
}

/// What [`Spool::open`] found and repaired.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpoolRecovery {
    /// The directory held no segment: a first one was created.
    pub created: bool,
    /// Segments found (after repair).
    pub segments: usize,
    /// Valid records found (after the tail cut).
    pub records: u64,
    /// Bytes cut off the last segment (a torn tail or a torn header).
    pub truncated_bytes: u64,
    /// Where the tail was cut and why, when it was.
    pub tail_cut: Option<TailCut>,
}

/// A torn tail cut off the last segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TailCut {
    pub segment: PathBuf,
    /// Offset the file was truncated to (0 when the header was rewritten).
    pub offset: u64,
    pub why: String,
}

/// The file name of the segment whose first record has seq `first_seq`.
pub fn segment_file_name(first_seq: u64) -> String {
    format!("{SEGMENT_PREFIX}{first_seq:0SEGMENT_SEQ_DIGITS$}{SEGMENT_SUFFIX}")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name
        .strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEGMENT_SEQ_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

use crate::le::{u16_at as le_u16, u32_at as le_u32, u64_at as le_u64};

/// Encodes a segment header.
pub fn encode_segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut b = [0u8; SEGMENT_HEADER_BYTES];
    b[0..4].copy_from_slice(&SEGMENT_MAGIC);
    b[4..6].copy_from_slice(&VERSION.to_le_bytes());
    b[8..16].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc32fast::hash(&b[..SEGMENT_CRC_OFFSET]);
    b[SEGMENT_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Why a segment header was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentHeaderError {
    /// The version is not [`VERSION`].
    Version(u16),
    /// A field is wrong; the text names it.
    Bad(String),
}

/// Decodes a segment header: magic, version, crc, reserved bytes, first seq. Returns
/// the first seq.
pub fn decode_segment_header(b: &[u8; SEGMENT_HEADER_BYTES]) -> Result<u64, SegmentHeaderError> {
    use SegmentHeaderError::{Bad, Version};
    if b[0..4] != SEGMENT_MAGIC {
        return Err(Bad(format!("magic {:02x?}, expected \"BRSS\"", &b[0..4])));
    }
    let version = le_u16(b, 4);
    if version != VERSION {
        return Err(Version(version));
    }
    let stored = le_u32(b, SEGMENT_CRC_OFFSET);
    let actual = crc32fast::hash(&b[..SEGMENT_CRC_OFFSET]);
    if stored != actual {
        return Err(Bad(format!(
            "header crc32 says {stored:08x}, bytes give {actual:08x}"
        )));
    }
    if b[6..8] != [0; 2] {
        return Err(Bad("reserved0 (bytes 6..8) is not zero".into()));
    }
    if b[16..SEGMENT_CRC_OFFSET].iter().any(|&x| x != 0) {
        return Err(Bad("reserved1 (bytes 16..28) is not zero".into()));
    }
    let first_seq = le_u64(b, 8);
    if first_seq == 0 {
        return Err(Bad("first_seq is 0 (seqs start at 1)".into()));
    }
    Ok(first_seq)
}

/// The fixed header of a record, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub flags: u8,
    pub seq: u64,
    pub synced_seq: u64,
    pub epoch: u64,
    pub offset: u64,
    pub len: u64,
    pub data_len: u32,
    pub disk_len: u8,
}

impl RecordHeader {
    /// Bytes of the whole record: header, disk id, data.
    pub fn total_bytes(&self) -> u64 {
        RECORD_HEADER_BYTES as u64 + u64::from(self.disk_len) + u64::from(self.data_len)
    }

    /// Encodes the header with a zero crc (the crc also covers disk id and data).
    fn encode(&self) -> [u8; RECORD_HEADER_BYTES] {
        let mut b = [0u8; RECORD_HEADER_BYTES];
        b[0..4].copy_from_slice(&RECORD_MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6] = self.kind as u8;
        b[7] = self.flags;
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.synced_seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.epoch.to_le_bytes());
        b[32..40].copy_from_slice(&self.offset.to_le_bytes());
        b[40..48].copy_from_slice(&self.len.to_le_bytes());
        b[48..52].copy_from_slice(&self.data_len.to_le_bytes());
        b[52] = self.disk_len;
        b
    }

    /// Decodes and checks a fixed header (everything but the crc, which needs the disk
    /// id and data). The error names the field at fault.
    pub fn parse(b: &[u8; RECORD_HEADER_BYTES]) -> Result<Self, String> {
        if b[0..4] != RECORD_MAGIC {
            return Err(format!("record magic {:02x?}, expected \"BRSR\"", &b[0..4]));
        }
        let version = le_u16(b, 4);
        if version != VERSION {
            return Err(format!(
                "record version {version} unknown (this build reads {VERSION})"
            ));
        }
        let kind = RecordKind::from_u8(b[6]).ok_or_else(|| format!("kind {} unknown", b[6]))?;
        if b[53..RECORD_CRC_OFFSET].iter().any(|&x| x != 0) {
            return Err("reserved (bytes 53..60) is not zero".into());
        }
        let h = Self {
            kind,
            flags: b[7],
            seq: le_u64(b, 8),
            synced_seq: le_u64(b, 16),
            epoch: le_u64(b, 24),
            offset: le_u64(b, 32),
            len: le_u64(b, 40),
            data_len: le_u32(b, 48),
            disk_len: b[52],
        };
        h.check_shape()?;
        Ok(h)
    }

    /// The rules every record keeps, for encoder and decoder alike. Bounds come first,
    /// so a reader never allocates for a header that fails here.
    fn check_shape(&self) -> Result<(), String> {
        if self.data_len > RECORD_DATA_BYTES_MAX {
            return Err(format!(
                "data_len {} is above the bound {RECORD_DATA_BYTES_MAX}",
                self.data_len
            ));
        }
        if usize::from(self.disk_len) > DISK_ID_BYTES_MAX {
            return Err(format!(
                "disk_len {} is above the bound {DISK_ID_BYTES_MAX}",
                self.disk_len
            ));
        }
        if self.seq == 0 {
            return Err("seq is 0 (seqs start at 1)".into());
        }
        if self.synced_seq >= self.seq {
            return Err(format!(
                "synced_seq {} is not below seq {}",
                self.synced_seq, self.seq
            ));
        }
        match self.kind {
            RecordKind::Write | RecordKind::Zero => {
                if self.flags != 0 {
                    return Err(format!(
                        "flags {:#x} must be 0 for {:?}",
                        self.flags, self.kind
                    ));
                }
                if self.disk_len == 0 {
                    return Err("disk_len is 0 (a write or zero names its disk)".into());
                }
                if self.kind == RecordKind::Write && u64::from(self.data_len) != self.len {
                    return Err(format!(
                        "data_len {} differs from len {}",
                        self.data_len, self.len
                    ));
                }
                if self.kind == RecordKind::Zero && self.data_len != 0 {
                    return Err(format!("data_len {} is not 0 for a zero", self.data_len));
                }
                if self.len == 0 || !self.len.is_multiple_of(SECTOR_BYTES) {
                    return Err(format!(
                        "len {} is not a non-zero multiple of {SECTOR_BYTES}",
                        self.len
                    ));
                }
                if !self.offset.is_multiple_of(SECTOR_BYTES) {
                    return Err(format!(
                        "offset {} is not a multiple of {SECTOR_BYTES}",
                        self.offset
                    ));
                }
                if self.offset.checked_add(self.len).is_none() {
                    return Err(format!(
                        "offset {} + len {} overflows",
                        self.offset, self.len
                    ));
                }
            }
            RecordKind::Cut => {
                if self.flags & !3 != 0 {
                    return Err(format!(
                        "flags {:#x}: only bits 0 and 1 are defined for a cut",
                        self.flags
                    ));
                }
                if self.disk_len != 0 || self.data_len != 0 {
                    return Err(format!(
                        "a cut has disk_len {} and data_len {}, both must be 0",
                        self.disk_len, self.data_len
                    ));
                }
            }
        }
        Ok(())
    }

    fn entry(&self, disk: String, data: Vec<u8>) -> SpoolEntry {
        match self.kind {
            RecordKind::Write => SpoolEntry::Write {
                epoch: self.epoch,
                disk,
                offset: self.offset,
                data,
            },
            RecordKind::Zero => SpoolEntry::Zero {
                epoch: self.epoch,
                disk,
                offset: self.offset,
                len: self.len,
            },
            RecordKind::Cut => SpoolEntry::Cut {
                epoch: self.epoch,
                point_id: self.offset,
                time_unix_ms: self.len,
                app_consistent: self.flags & 1 != 0,
                consistent: self.flags & 2 == 0,
            },
        }
    }
}

fn check_disk(kind: RecordKind, disk: &str) -> Result<(), String> {
    if kind != RecordKind::Cut && !crate::valid_id(disk) {
        return Err(format!(
            "disk id {disk:?} is not [a-z0-9][a-z0-9_-]{{0,63}}"
        ));
    }
    Ok(())
}

/// Why a record could not be read at some offset.
enum Fault {
    Io(io::Error),
    /// The file ends inside the record.
    Short(String),
    /// The bytes are there but wrong.
    Bad(String),
}

/// Reads the record at `pos` of a file whose readable end is `end`. With `body` false
/// only the header is read and checked (no crc): used to skip records.
fn read_record(
    file: &dyn StorageFile,
    pos: u64,
    end: u64,
    body: bool,
) -> Result<(RecordHeader, Option<SpoolEntry>), Fault> {
    let left = end.saturating_sub(pos);
    if left < RECORD_HEADER_BYTES as u64 {
        return Err(Fault::Short(format!(
            "record header needs {RECORD_HEADER_BYTES} bytes, {left} left"
        )));
    }
    // The header and the longest disk id at once, as far as the file goes: one read
    // instead of two for every record.
    let mut first = [0u8; RECORD_HEADER_BYTES + DISK_ID_BYTES_MAX];
    let first_len = usize::try_from(left).map_or(first.len(), |l| l.min(first.len()));
    file.read_exact_at(&mut first[..first_len], pos)
        .map_err(Fault::Io)?;
    let mut head = [0u8; RECORD_HEADER_BYTES];
    head.copy_from_slice(&first[..RECORD_HEADER_BYTES]);
    let h = RecordHeader::parse(&head).map_err(Fault::Bad)?;
    if left < h.total_bytes() {
        return Err(Fault::Short(format!(
            "record needs {} bytes, {left} left",
            h.total_bytes()
        )));
    }
    if !body {
        return Ok((h, None));
    }
    // Both lengths passed their bounds in `parse`, and the file holds them; the disk id
    // (at most DISK_ID_BYTES_MAX) came with the header.
    let disk = first[RECORD_HEADER_BYTES..][..usize::from(h.disk_len)].to_vec();
    let mut data = vec![0u8; h.data_len as usize];
    file.read_exact_at(
        &mut data,
        pos + RECORD_HEADER_BYTES as u64 + u64::from(h.disk_len),
    )
    .map_err(Fault::Io)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head[..RECORD_CRC_OFFSET]);
    crc.update(&disk);
    crc.update(&data);
    let actual = crc.finalize();
    let stored = le_u32(&head, RECORD_CRC_OFFSET);
    if stored != actual {
        return Err(Fault::Bad(format!(
            "record crc32 says {stored:08x}, bytes give {actual:08x}"
        )));
    }
    let disk = String::from_utf8(disk).map_err(|_| Fault::Bad("disk id is not UTF-8".into()))?;
    check_disk(h.kind, &disk).map_err(Fault::Bad)?;
    let entry = h.entry(disk, data);
    Ok((h, Some(entry)))
}

/// Looks in `[from, end)` of a last segment for a valid record that proves the record
/// with seq `bad_seq` had been synced (its `synced_seq >= bad_seq`). Returns its offset
/// and seq.
fn find_sync_proof(
    file: &dyn StorageFile,
    from: u64,
    end: u64,
    bad_seq: u64,
) -> Result<Option<(u64, u64)>, io::Error> {
    let mut chunk = vec![0u8; SCAN_CHUNK_BYTES];
    let mut at = from;
    while at < end {
        let n = usize::try_from((end - at).min(SCAN_CHUNK_BYTES as u64)).unwrap_or(0);
        file.read_exact_at(&mut chunk[..n], at)?;
        // A magic that straddles two chunks is found in the next one: chunks overlap by
        // three bytes.
        for i in 0..n.saturating_sub(3) {
            if chunk[i..i + 4] != RECORD_MAGIC {
                continue;
            }
            let q = at + i as u64;
            match read_record(file, q, end, false) {
                Ok((h, _)) if h.synced_seq >= bad_seq => {}
                Ok(_) | Err(Fault::Short(_)) | Err(Fault::Bad(_)) => continue,
                Err(Fault::Io(e)) => return Err(e),
            }
            match read_record(file, q, end, true) {
                Ok((h, _)) => return Ok(Some((q, h.seq))),
                Err(Fault::Io(e)) => return Err(e),
                Err(_) => {}
            }
        }
        if at + n as u64 >= end {
            break;
        }
        at += n.saturating_sub(3).max(1) as u64;
    }
    Ok(None)
}

/// Whether the whole file is zeros.
fn all_zero(file: &dyn StorageFile, len: u64) -> io::Result<bool> {
    let mut chunk = vec![0u8; SCAN_CHUNK_BYTES];
    let mut at = 0;
    while at < len {
        let n = usize::try_from((len - at).min(SCAN_CHUNK_BYTES as u64)).unwrap_or(0);
        file.read_exact_at(&mut chunk[..n], at)?;
        if chunk[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

/// The index entry of one segment: all the spool keeps in memory per segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    first_seq: u64,
    size_bytes: u64,
}

/// Creates a segment file durably: create, header, sync file, sync directory.
fn create_segment(
    fs: &dyn Storage,
    dir: &Path,
    first_seq: u64,
) -> Result<Box<dyn StorageFile>, SpoolError> {
    let path = dir.join(segment_file_name(first_seq));
    let ctx = || format!("create segment {}", path.display());
    // `Create`, not `CreateNew`: a roll that failed half-way may have left the file.
    let f = fs.open(&path, OpenMode::Create).map_err(io_err(ctx()))?;
    f.set_len(0).map_err(io_err(ctx()))?;
    f.write_all_at(&encode_segment_header(first_seq), 0)
        .map_err(io_err(ctx()))?;
    f.sync_data().map_err(io_err(ctx()))?;
    fs.sync_dir(dir).map_err(io_err(ctx()))?;
    Ok(f)
}

/// What recovery will do to the last segment.
enum TailFix {
    /// Truncate to this many bytes.
    Truncate(u64),
    /// Rewrite the header (the file held less than a header, or only zeros).
    RewriteHeader,
}

/// The spool of one process server. See the module doc for format and policies.
pub struct Spool {
    fs: Arc<dyn Storage>,
    dir: PathBuf,
    cfg: SpoolConfig,
    /// Segments in seq order; the last is the active one. Never empty.
    segments: VecDeque<Segment>,
    active: Box<dyn StorageFile>,
    /// Bytes of the active segment known durable.
    active_durable_bytes: u64,
    last_seq: u64,
    durable_seq: u64,
    used_bytes: u64,
    /// A write failed: bytes past the active segment's size may be garbage and are cut
    /// before the next write or sync.
    tail_unknown: bool,
    /// Set by a failed sync or roll; see [`SpoolError::Poisoned`].
    failed: Option<String>,
    /// Bytes of the active segment whose writeback was started or that are durable
    /// ([`Spool::start_writeback`]).
    writeback_from: u64,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.dir)
            .field("segments", &self.segments.len())
            .field("first_seq", &self.first_seq())
            .field("last_seq", &self.last_seq)
            .field("durable_seq", &self.durable_seq)
            .field("used_bytes", &self.used_bytes)
            .finish_non_exhaustive()
    }
}

impl Spool {
    /// Opens the spool in `dir` (creating the directory and a first segment when there
    /// is none), scans and verifies every segment and cuts a torn tail, as the module
    /// doc's recovery policy says.
    pub fn open(
        fs: Arc<dyn Storage>,
        dir: &Path,
        cfg: SpoolConfig,
    ) -> Result<(Spool, SpoolRecovery), SpoolError> {
        cfg.check()?;
        let names = match fs.list_dir(dir) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs.create_dir_all(dir)
                    .map_err(io_err(format!("create {}", dir.display())))?;
                if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                    fs.sync_dir(parent)
                        .map_err(io_err(format!("sync {}", parent.display())))?;
                }
                Vec::new()
            }
            Err(e) => return Err(io_err(format!("list {}", dir.display()))(e)),
        };
        let mut firsts: Vec<u64> = names.iter().filter_map(|n| parse_segment_name(n)).collect();
        firsts.sort_unstable();
        if firsts.first() == Some(&0) {
            // Seqs start at 1: no spool ever names a segment 0.
            return Err(SpoolError::Corruption {
                segment: dir.join(segment_file_name(0)),
                offset: 0,
                why: "segment name has first seq 0 (seqs start at 1)".into(),
            });
        }

        if firsts.is_empty() {
            let active = create_segment(&*fs, dir, 1)?;
            let seg = Segment {
                first_seq: 1,
                size_bytes: SEGMENT_HEADER_BYTES as u64,
            };
            let spool = Spool {
                fs,
                dir: dir.to_path_buf(),
                cfg,
                segments: VecDeque::from([seg]),
                active,
                active_durable_bytes: seg.size_bytes,
                last_seq: 0,
                durable_seq: 0,
                used_bytes: seg.size_bytes,
                tail_unknown: false,
                failed: None,
                writeback_from: seg.size_bytes,
            };
            let rec = SpoolRecovery {
                created: true,
                segments: 1,
                ..SpoolRecovery::default()
            };
            return Ok((spool, rec));
        }

        // Pass 1: read and judge everything, change nothing.
        let mut segments = VecDeque::with_capacity(firsts.len());
        let mut records = 0u64;
        let mut next_seq: Option<u64> = None;
        let mut fix: Option<(TailFix, u64, String)> = None;
        for (i, &first) in firsts.iter().enumerate() {
            let is_last = i + 1 == firsts.len();
            let path = dir.join(segment_file_name(first));
            let corrupt = |offset: u64, why: String| SpoolError::Corruption {
                segment: path.clone(),
                offset,
                why,
            };
            if let Some(want) = next_seq
                && first != want
            {
                return Err(corrupt(
                    0,
                    format!(
                        "first seq {first} does not follow the previous segment's last seq {}",
                        want - 1
                    ),
                ));
            }
            let ctx = || format!("scan {}", path.display());
            let file = fs.open(&path, OpenMode::ReadOnly).map_err(io_err(ctx()))?;
            let len = file.len().map_err(io_err(ctx()))?;

            let torn_header = len < SEGMENT_HEADER_BYTES as u64
                || all_zero(&*file, len).map_err(io_err(ctx()))?;
            if torn_header {
                if !is_last {
                    return Err(corrupt(0, format!("segment of {len} bytes has no header")));
                }
                fix = Some((
                    TailFix::RewriteHeader,
                    len,
                    format!("segment of {len} bytes has no header (a roll cut short)"),
                ));
                segments.push_back(Segment {
                    first_seq: first,
                    size_bytes: SEGMENT_HEADER_BYTES as u64,
                });
                next_seq = Some(first);
                break;
            }
            let mut head = [0u8; SEGMENT_HEADER_BYTES];
            file.read_exact_at(&mut head, 0).map_err(io_err(ctx()))?;
            match decode_segment_header(&head) {
                Ok(s) if s == first => {}
                Ok(s) => {
                    return Err(corrupt(
                        8,
                        format!("header first_seq {s} differs from the file name's {first}"),
                    ));
                }
                Err(SegmentHeaderError::Version(version)) => {
                    return Err(SpoolError::UnsupportedVersion {
                        segment: path,
                        version,
                    });
                }
                Err(SegmentHeaderError::Bad(why)) => return Err(corrupt(0, why)),
            }

            let mut pos = SEGMENT_HEADER_BYTES as u64;
            let mut seq = first;
            while pos < len {
                let why = match read_record(&*file, pos, len, true) {
                    Ok((h, _)) if h.seq == seq => {
                        // A valid record with the last seq there is leaves no seq for
                        // the next append: refused like any impossible seq.
                        let Some(next) = seq.checked_add(1) else {
                            return Err(corrupt(pos, format!("record has seq {seq}, the last")));
                        };
                        pos += h.total_bytes();
                        seq = next;
                        records += 1;
                        continue;
                    }
                    Ok((h, _)) => {
                        // A valid record with the wrong seq is never a torn write.
                        return Err(corrupt(
                            pos,
                            format!("record has seq {}, expected {seq}", h.seq),
                        ));
                    }
                    Err(Fault::Io(e)) => return Err(io_err(ctx())(e)),
                    Err(Fault::Short(why)) | Err(Fault::Bad(why)) => why,
                };
                if !is_last {
                    return Err(corrupt(pos, format!("{why} (in a segment synced whole)")));
                }
                if let Some((q, proof)) =
                    find_sync_proof(&*file, pos + 1, len, seq).map_err(io_err(ctx()))?
                {
                    return Err(corrupt(
                        pos,
                        format!(
                            "{why}; record seq {proof} at byte {q} shows seq {seq} had been synced"
                        ),
                    ));
                }
                fix = Some((TailFix::Truncate(pos), len - pos, why));
                break;
            }
            segments.push_back(Segment {
                first_seq: first,
                size_bytes: pos,
            });
            next_seq = Some(seq);
        }
        let last_seq = next_seq.unwrap_or(1) - 1;

        // Pass 2: repair the last segment, then make everything found durable.
        let back = *segments
            .back()
            .ok_or_else(|| SpoolError::InvalidConfig("internal: no segment after scan".into()))?;
        let path = dir.join(segment_file_name(back.first_seq));
        let ctx = || format!("recover {}", path.display());
        let active = fs.open(&path, OpenMode::Existing).map_err(io_err(ctx()))?;
        let mut recovery = SpoolRecovery {
            created: false,
            segments: segments.len(),
            records,
            truncated_bytes: 0,
            tail_cut: None,
        };
        if let Some((how, cut_bytes, why)) = fix {
            let offset = match how {
                TailFix::Truncate(to) => {
                    active.set_len(to).map_err(io_err(ctx()))?;
                    to
                }
                TailFix::RewriteHeader => {
                    active.set_len(0).map_err(io_err(ctx()))?;
                    active
                        .write_all_at(&encode_segment_header(back.first_seq), 0)
                        .map_err(io_err(ctx()))?;
                    0
                }
            };
            recovery.truncated_bytes = cut_bytes;
            recovery.tail_cut = Some(TailCut {
                segment: path.clone(),
                offset,
                why,
            });
        }
        active.sync_data().map_err(io_err(ctx()))?;

        let used_bytes = segments.iter().map(|s| s.size_bytes).sum();
        let spool = Spool {
            fs,
            dir: dir.to_path_buf(),
            cfg,
            segments,
            active,
            active_durable_bytes: back.size_bytes,
            last_seq,
            durable_seq: last_seq,
            used_bytes,
            tail_unknown: false,
            failed: None,
            writeback_from: back.size_bytes,
        };
        spool.assert_invariants();
        Ok((spool, recovery))
    }

    fn assert_invariants(&self) {
        assert!(self.first_seq() - 1 <= self.durable_seq && self.durable_seq <= self.last_seq);
        assert!(self.active_durable_bytes <= self.active_segment().size_bytes);
    }

    fn active_segment(&self) -> Segment {
        // `segments` is never empty: open puts one in and release keeps the last.
        self.segments[self.segments.len() - 1]
    }

    fn active_path(&self) -> PathBuf {
        self.dir
            .join(segment_file_name(self.active_segment().first_seq))
    }

    fn check_usable(&self) -> Result<(), SpoolError> {
        match &self.failed {
            Some(why) => Err(SpoolError::Poisoned { why: why.clone() }),
            None => Ok(()),
        }
    }

    /// Records a failed sync or roll: after it the spool refuses appends and syncs.
    fn fail<T>(&mut self, r: Result<T, SpoolError>) -> Result<T, SpoolError> {
        if let Err(e) = &r {
            self.failed = Some(e.to_string());
        }
        r
    }

    /// Cuts bytes a failed write may have left past the active segment's end.
    fn trim_unknown_tail(&mut self) -> Result<(), SpoolError> {
        if self.tail_unknown {
            let size = self.active_segment().size_bytes;
            self.active
                .set_len(size)
                .map_err(io_err(format!("trim {}", self.active_path().display())))?;
            self.tail_unknown = false;
        }
        Ok(())
    }

    /// Appends a record with seq `last_seq() + 1` and returns that seq. Nothing is
    /// synced (see [`Spool::sync`]) unless the active segment is full: then the roll
    /// syncs the old segment and creates the next one durably. `Full` and
    /// `InvalidRecord` write nothing.
    pub fn append(&mut self, rec: &SpoolRecordRef<'_>) -> Result<u64, SpoolError> {
        self.check_usable()?;
        // Open refuses a record with seq u64::MAX, so this fails only at the very end
        // of the seq space (a spool whose segment name was forged near it).
        let seq = self
            .last_seq
            .checked_add(1)
            .filter(|&s| s < u64::MAX)
            .ok_or_else(|| SpoolError::InvalidRecord {
                why: format!("no seq after {} is left", self.last_seq),
            })?;
        let (disk, data) = rec.disk_and_data();
        let mut head = rec.header(seq, self.durable_seq);
        if disk.len() > DISK_ID_BYTES_MAX || data.len() > RECORD_DATA_BYTES_MAX as usize {
            return Err(SpoolError::InvalidRecord {
                why: format!(
                    "disk id of {} bytes or data of {} bytes above the bounds {DISK_ID_BYTES_MAX} and {RECORD_DATA_BYTES_MAX}",
                    disk.len(),
                    data.len()
                ),
            });
        }
        head.check_shape()
            .and_then(|()| check_disk(head.kind, disk))
            .map_err(|why| SpoolError::InvalidRecord { why })?;

        let record_bytes = head.total_bytes();
        let seg = self.active_segment();
        let roll = seg.size_bytes > SEGMENT_HEADER_BYTES as u64
            && seg.size_bytes + record_bytes > self.cfg.segment_bytes_max;
        let need_bytes = record_bytes + if roll { SEGMENT_HEADER_BYTES as u64 } else { 0 };
        let reserve = if head.kind == RecordKind::Cut {
            CUT_RESERVE_BYTES
        } else {
            0
        };
        if self.used_bytes + need_bytes > self.cfg.spool_bytes_max + reserve {
            return Err(SpoolError::Full {
                used_bytes: self.used_bytes,
                max_bytes: self.cfg.spool_bytes_max,
                need_bytes,
            });
        }
        if roll {
            let r = self.roll();
            self.fail(r)?;
            head.synced_seq = self.durable_seq;
        }
        self.trim_unknown_tail()?;

        let mut first = Vec::with_capacity(RECORD_HEADER_BYTES + disk.len());
        first.extend_from_slice(&head.encode());
        first.extend_from_slice(disk.as_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&first[..RECORD_CRC_OFFSET]);
        crc.update(disk.as_bytes());
        crc.update(data);
        first[RECORD_CRC_OFFSET..RECORD_HEADER_BYTES]
            .copy_from_slice(&crc.finalize().to_le_bytes());

        let pos = self.active_segment().size_bytes;
        // One system call for header and data; a crash may still tear it anywhere, as
        // it could the two writes it replaces (recovery cuts a torn tail either way).
        let written = self.active.write_all_vectored_at(&[&first, data], pos);
        if let Err(e) = written {
            self.tail_unknown = true;
            return Err(io_err(format!(
                "append to {}",
                self.active_path().display()
            ))(e));
        }
        if let Some(s) = self.segments.back_mut() {
            s.size_bytes += record_bytes;
        }
        self.start_writeback();
        self.used_bytes += record_bytes;
        self.last_seq = seq;
        Ok(seq)
    }

    /// Syncs the active segment, then starts the next one.
    /// Once [`WRITEBACK_BYTES`] were appended to the active segment since the last
    /// time, has the disk start writing them ([`StorageFile::start_writeback`], a
    /// hint): the sync of the next cut, which runs under the group's lock and so holds
    /// up every write of the group, then waits for the last few MiB instead of a whole
    /// second's worth. Measured (`bench --size 2G --only replication`, interleaved
    /// runs): writes through NBD 225-245 -> 257-312 MB/s, realistic data durable
    /// 185-193 -> 197-229 MB/s.
    fn start_writeback(&mut self) {
        let size = self.active_segment().size_bytes;
        if size.saturating_sub(self.writeback_from) >= WRITEBACK_BYTES {
            // A hint: a failure changes nothing that the sync does not do anyway.
            let _ = self
                .active
                .start_writeback(self.writeback_from, size - self.writeback_from);
            self.writeback_from = size;
        }
    }

    fn roll(&mut self) -> Result<(), SpoolError> {
        self.sync()?;
        let first_seq = self.last_seq + 1;
        let active = create_segment(&*self.fs, &self.dir, first_seq)?;
        let seg = Segment {
            first_seq,
            size_bytes: SEGMENT_HEADER_BYTES as u64,
        };
        self.segments.push_back(seg);
        self.used_bytes += seg.size_bytes;
        self.active = active;
        self.active_durable_bytes = seg.size_bytes;
        self.writeback_from = seg.size_bytes;
        self.tail_unknown = false;
        self.assert_invariants();
        Ok(())
    }

    /// Makes every record appended so far durable with one `sync_data` (none when
    /// nothing was appended since the last sync). Returns the durable seq.
    pub fn sync(&mut self) -> Result<u64, SpoolError> {
        self.check_usable()?;
        if self.last_seq == self.durable_seq && !self.tail_unknown {
            return Ok(self.durable_seq);
        }
        self.trim_unknown_tail()?;
        let r = self
            .active
            .sync_data()
            .map_err(io_err(format!("sync {}", self.active_path().display())));
        self.fail(r)?;
        self.durable_seq = self.last_seq;
        self.active_durable_bytes = self.active_segment().size_bytes;
        self.assert_invariants();
        Ok(self.durable_seq)
    }

    /// A cursor over the durable records with seq `>= seq`, read from disk with their
    /// crc verified. It stops at the `durable_seq()` of this moment; make a new cursor
    /// to see later records. `seq` below `first_seq()` gives a `Released` error.
    pub fn read_from(&self, seq: u64) -> SpoolCursor {
        let mut segs: Vec<Segment> = self.segments.iter().copied().collect();
        if let Some(last) = segs.last_mut() {
            last.size_bytes = self.active_durable_bytes;
        }
        SpoolCursor {
            fs: Arc::clone(&self.fs),
            dir: self.dir.clone(),
            segs,
            want_seq: seq,
            end_seq: self.durable_seq,
            seg_idx: None,
            file: None,
            pos: 0,
            next_seq: 0,
            done: false,
        }
    }

    /// Removes every non-active segment whose records all have seq `<= up_to_seq`,
    /// oldest first, syncing the directory after each removal. Returns the bytes freed.
    pub fn release(&mut self, up_to_seq: u64) -> Result<u64, SpoolError> {
        if up_to_seq > self.last_seq {
            return Err(SpoolError::ReleaseBeyondEnd {
                up_to_seq,
                last_seq: self.last_seq,
            });
        }
        let mut freed = 0;
        while self.segments.len() > 1 {
            let (seg, next_first) = (self.segments[0], self.segments[1].first_seq);
            if next_first - 1 > up_to_seq {
                break;
            }
            let path = self.dir.join(segment_file_name(seg.first_seq));
            self.fs
                .remove_file(&path)
                .map_err(io_err(format!("remove {}", path.display())))?;
            self.segments.pop_front();
            self.used_bytes -= seg.size_bytes;
            freed += seg.size_bytes;
            self.fs
                .sync_dir(&self.dir)
                .map_err(io_err(format!("sync {}", self.dir.display())))?;
        }
        Ok(freed)
    }

    /// Sum of the segment sizes.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    /// The bound on [`Spool::used_bytes`].
    pub fn max_bytes(&self) -> u64 {
        self.cfg.spool_bytes_max
    }

    /// The seq of the first record still on disk (`last_seq() + 1` when none).
    pub fn first_seq(&self) -> u64 {
        self.segments.front().map_or(1, |s| s.first_seq)
    }

    /// The seq of the last record appended (`first_seq() - 1` when none).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The seq up to which every record is durable.
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Reads durable records in seq order from a snapshot of the segment index; owns its
/// handles, so the spool can go on appending while a cursor is alive.
pub struct SpoolCursor {
    fs: Arc<dyn Storage>,
    dir: PathBuf,
    /// Snapshot of the index; sizes are the durable ends.
    segs: Vec<Segment>,
    want_seq: u64,
    /// The last seq this cursor yields.
    end_seq: u64,
    seg_idx: Option<usize>,
    file: Option<Box<dyn StorageFile>>,
    pos: u64,
    next_seq: u64,
    done: bool,
}

impl SpoolCursor {
    /// Opens segment `idx` and checks its header.
    fn enter(&mut self, idx: usize) -> Result<(), SpoolError> {
        let seg = self.segs[idx];
        let path = self.dir.join(segment_file_name(seg.first_seq));
        let ctx = || format!("read {}", path.display());
        let file = self
            .fs
            .open(&path, OpenMode::ReadOnly)
            .map_err(io_err(ctx()))?;
        let mut head = [0u8; SEGMENT_HEADER_BYTES];
        file.read_exact_at(&mut head, 0).map_err(io_err(ctx()))?;
        match decode_segment_header(&head) {
            Ok(s) if s == seg.first_seq => {}
            Ok(s) => {
                return Err(SpoolError::Corruption {
                    segment: path,
                    offset: 8,
                    why: format!("header first_seq {s} differs from {}", seg.first_seq),
                });
            }
            Err(SegmentHeaderError::Version(version)) => {
                return Err(SpoolError::UnsupportedVersion {
                    segment: path,
                    version,
                });
            }
            Err(SegmentHeaderError::Bad(why)) => {
                return Err(SpoolError::Corruption {
                    segment: path,
                    offset: 0,
                    why,
                });
            }
        }
        self.seg_idx = Some(idx);
        self.file = Some(file);
        self.pos = SEGMENT_HEADER_BYTES as u64;
        self.next_seq = seg.first_seq;
        Ok(())
    }

    fn step(&mut self) -> Result<Option<SpoolRecord>, SpoolError> {
        let Some(first) = self.segs.first().map(|s| s.first_seq) else {
            return Ok(None);
        };
        let want = self.want_seq.max(1);
        if want < first {
            return Err(SpoolError::Released {
                seq: self.want_seq,
                first_seq: first,
            });
        }
        loop {
            let idx = match self.seg_idx {
                Some(i) => i,
                None => {
                    if want > self.end_seq {
                        return Ok(None);
                    }
                    let i = self
                        .segs
                        .iter()
                        .rposition(|s| s.first_seq <= want)
                        .unwrap_or(0);
                    self.enter(i)?;
                    i
                }
            };
            if self.next_seq > self.end_seq {
                return Ok(None);
            }
            let seg = self.segs[idx];
            if self.pos >= seg.size_bytes {
                if idx + 1 >= self.segs.len() {
                    return Ok(None);
                }
                self.enter(idx + 1)?;
                continue;
            }
            let path = || self.dir.join(segment_file_name(seg.first_seq));
            let Some(file) = self.file.as_deref() else {
                return Ok(None);
            };
            let body = self.next_seq >= want;
            match read_record(file, self.pos, seg.size_bytes, body) {
                Ok((h, entry)) => {
                    if h.seq != self.next_seq {
                        return Err(SpoolError::Corruption {
                            segment: path(),
                            offset: self.pos,
                            why: format!("record has seq {}, expected {}", h.seq, self.next_seq),
                        });
                    }
                    self.pos += h.total_bytes();
                    self.next_seq += 1;
                    if let Some(entry) = entry {
                        return Ok(Some(SpoolRecord { seq: h.seq, entry }));
                    }
                }
                Err(Fault::Io(e)) => {
                    return Err(io_err(format!("read {}", path().display()))(e));
                }
                Err(Fault::Short(why)) | Err(Fault::Bad(why)) => {
                    return Err(SpoolError::Corruption {
                        segment: path(),
                        offset: self.pos,
                        why,
                    });
                }
            }
        }
    }
}

impl Iterator for SpoolCursor {
    type Item = Result<SpoolRecord, SpoolError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.step() {
            Ok(Some(r)) => Some(Ok(r)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{CrashMode, RealFs, SimFs, read_whole};
    use proptest::prelude::*;

    const DIR: &str = "/spool";

    fn dir() -> PathBuf {
        PathBuf::from(DIR)
    }

    fn cfg(segment_bytes_max: u64, spool_bytes_max: u64) -> SpoolConfig {
        SpoolConfig {
            segment_bytes_max,
            spool_bytes_max,
        }
    }

    fn open(fs: &SimFs, c: SpoolConfig) -> Result<(Spool, SpoolRecovery), SpoolError> {
        Spool::open(Arc::new(fs.clone()), &dir(), c)
    }

    fn read_all(sp: &Spool) -> Vec<SpoolRecord> {
        sp.read_from(sp.first_seq())
            .collect::<Result<Vec<_>, _>>()
            .expect("read back")
    }

    fn seg_path(first_seq: u64) -> PathBuf {
        dir().join(segment_file_name(first_seq))
    }

    /// Names and current contents of every file in the spool directory.
    fn snapshot(fs: &SimFs) -> Vec<(String, Vec<u8>)> {
        fs.list_dir(&dir())
            .unwrap()
            .into_iter()
            .map(|n| {
                let c = read_whole(fs, &dir().join(&n)).unwrap().unwrap();
                (n, c)
            })
            .collect()
    }

    fn segment_firsts(fs: &SimFs) -> Vec<u64> {
        let mut v: Vec<u64> = fs
            .list_dir(&dir())
            .unwrap()
            .iter()
            .filter_map(|n| parse_segment_name(n))
            .collect();
        v.sort_unstable();
        v
    }

    use crate::testutil::Rng;

    fn write(epoch: u64, disk: &str, offset: u64, data: Vec<u8>) -> SpoolEntry {
        SpoolEntry::Write {
            epoch,
            disk: disk.into(),
            offset,
            data,
        }
    }

    fn gen_entry(rng: &mut Rng, data_sectors_max: u64) -> SpoolEntry {
        let epoch = rng.below(4);
        let disk = ["d0", "disk-1", "x"][rng.below(3) as usize].to_string();
        let offset = rng.below(1 << 20) * SECTOR_BYTES;
        match rng.below(6) {
            0..=3 => {
                let n = (1 + rng.below(data_sectors_max)) as usize * SECTOR_BYTES as usize;
                write(epoch, &disk, offset, rng.bytes(n))
            }
            4 => SpoolEntry::Zero {
                epoch,
                disk,
                offset,
                len: (1 + rng.below(64)) * SECTOR_BYTES,
            },
            _ => SpoolEntry::Cut {
                epoch,
                point_id: rng.next(),
                time_unix_ms: rng.next() >> 20,
                app_consistent: rng.below(2) == 0,
                consistent: rng.below(2) == 0,
            },
        }
    }

    /// A 512-byte write to disk `d0` whose data names its index.
    fn small_write(i: u64) -> SpoolEntry {
        let mut data = vec![0u8; 512];
        data[..8].copy_from_slice(&i.to_le_bytes());
        write(1, "d0", i * 512, data)
    }

    /// Proves every record kind comes back byte-exact with rising seqs, across segment
    /// rolls, a crash and a reopen.
    #[test]
    fn round_trip_all_kinds() {
        let fs = SimFs::new();
        let (mut sp, rec) = open(&fs, cfg(4096, 1 << 20)).unwrap();
        assert!(rec.created);
        let mut rng = Rng(7);
        let mut entries: Vec<SpoolEntry> = (0..40).map(|_| gen_entry(&mut rng, 4)).collect();
        entries.push(SpoolEntry::Cut {
            epoch: 9,
            point_id: u64::MAX,
            time_unix_ms: 0,
            app_consistent: true,
            consistent: true,
        });
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(sp.append(&e.record_ref()).unwrap(), i as u64 + 1);
        }
        assert!(
            read_all(&sp).len() < entries.len(),
            "un-synced records are hidden"
        );
        assert_eq!(sp.sync().unwrap(), entries.len() as u64);
        assert!(sp.segment_count() > 3);
        let got = read_all(&sp);
        assert_eq!(got.len(), entries.len());
        for (i, r) in got.iter().enumerate() {
            assert_eq!(r.seq, i as u64 + 1);
            assert_eq!(r.entry, entries[i]);
        }
        drop(sp);
        fs.crash(CrashMode::DropUnsynced);
        let (sp, rec) = open(&fs, cfg(4096, 1 << 20)).unwrap();
        assert_eq!(rec.records, entries.len() as u64);
        assert_eq!(rec.tail_cut, None);
        assert_eq!(read_all(&sp), got);
        assert_eq!((sp.first_seq(), sp.last_seq()), (1, entries.len() as u64));
    }

    /// Proves the spool works on the real file system too, and survives a reopen.
    #[test]
    fn round_trip_real_fs() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("spool");
        let c = cfg(2048, 1 << 20);
        let entries: Vec<SpoolEntry> = (0..10).map(small_write).collect();
        {
            let (mut sp, rec) = Spool::open(Arc::new(RealFs), &d, c).unwrap();
            assert!(rec.created);
            for e in &entries {
                sp.append(&e.record_ref()).unwrap();
            }
            assert_eq!(sp.sync().unwrap(), 10);
        }
        let (sp, rec) = Spool::open(Arc::new(RealFs), &d, c).unwrap();
        assert_eq!(rec.records, 10);
        let got: Vec<SpoolEntry> = read_all(&sp).into_iter().map(|r| r.entry).collect();
        assert_eq!(got, entries);
    }

    /// Proves reading from the middle skips earlier records, reading past the end yields
    /// nothing, and reading released seqs is an error.
    #[test]
    fn read_from_middle_end_and_released() {
        let fs = SimFs::new();
        let (mut sp, _) = open(&fs, cfg(2048, 1 << 20)).unwrap();
        for i in 0..20 {
            sp.append(&small_write(i).record_ref()).unwrap();
        }
        sp.sync().unwrap();
        let mid: Vec<u64> = sp.read_from(13).map(|r| r.unwrap().seq).collect();
        assert_eq!(mid, (13..=20).collect::<Vec<_>>());
        assert_eq!(sp.read_from(21).count(), 0);
        sp.release(10).unwrap();
        assert!(sp.first_seq() > 1 && sp.first_seq() <= 11);
        let mut c = sp.read_from(1);
        assert!(matches!(
            c.next(),
            Some(Err(SpoolError::Released { seq: 1, .. }))
        ));
        assert!(c.next().is_none());
        // A cursor stays valid while the spool appends; it stops at its snapshot.
        let c = sp.read_from(sp.first_seq());
        sp.append(&small_write(99).record_ref()).unwrap();
        sp.sync().unwrap();
        assert_eq!(c.last().unwrap().unwrap().seq, 20);
    }

    /// Proves a full spool refuses the record, writes nothing, and takes appends again
    /// once a release frees whole segments.
    #[test]
    fn full_changes_nothing_and_release_makes_room() {
        let fs = SimFs::new();
        let (mut sp, _) = open(&fs, cfg(2048, 8192)).unwrap();
        let mut i = 0;
        let err = loop {
            match sp.append(&small_write(i).record_ref()) {
                Ok(_) => i += 1,
                Err(e) => break e,
            }
        };
        let SpoolError::Full {
            used_bytes,
            max_bytes,
            need_bytes,
        } = err
        else {
            panic!("expected Full, got {err}");
        };
        assert_eq!((used_bytes, max_bytes), (sp.used_bytes(), 8192));
        assert!(used_bytes + need_bytes > max_bytes && used_bytes <= max_bytes);
        let before = snapshot(&fs);
        let (last, used) = (sp.last_seq(), sp.used_bytes());
        for _ in 0..3 {
            assert!(matches!(
                sp.append(&small_write(i).record_ref()),
                Err(SpoolError::Full { .. })
            ));
        }
        assert_eq!(snapshot(&fs), before);
        assert_eq!((sp.last_seq(), sp.used_bytes()), (last, used));
        let on_disk: u64 = before.iter().map(|(_, c)| c.len() as u64).sum();
        assert_eq!(on_disk, used);

        sp.sync().unwrap();
        let freed = sp.release(last).unwrap();
        assert!(freed > 0);
        assert_eq!(sp.used_bytes(), used - freed);
        assert_eq!(sp.append(&small_write(i).record_ref()).unwrap(), last + 1);
    }

    /// Proves release removes exactly the segments wholly at or below the seq, durably,
    /// and leaves every later record readable before and after a crash.
    #[test]
    fn release_deletes_segments_and_keeps_later_data() {
        let fs = SimFs::new();
        let c = cfg(2048, 1 << 20);
        let (mut sp, _) = open(&fs, c).unwrap();
        let entries: Vec<SpoolEntry> = (0..30).map(small_write).collect();
        for e in &entries {
            sp.append(&e.record_ref()).unwrap();
        }
        sp.sync().unwrap();
        let firsts = segment_firsts(&fs);
        assert!(firsts.len() >= 8);
        let up_to = 14;
        sp.release(up_to).unwrap();
        let left = segment_firsts(&fs);
        // Every removed segment ended at or below up_to; the first kept one did not.
        for w in firsts.windows(2) {
            assert_eq!(left.contains(&w[0]), w[1] - 1 > up_to, "segment {}", w[0]);
        }
        assert_eq!(sp.first_seq(), left[0]);
        let check = |sp: &Spool| {
            let got = read_all(sp);
            assert_eq!(got.first().unwrap().seq, sp.first_seq());
            for r in &got {
                assert_eq!(r.entry, entries[(r.seq - 1) as usize]);
            }
            assert_eq!(got.last().unwrap().seq, 30);
        };
        check(&sp);
        drop(sp);
        fs.crash(CrashMode::DropUnsynced);
        let (mut sp, _) = open(&fs, c).unwrap();
        assert_eq!(segment_firsts(&fs), left);
        check(&sp);
        sp.release(30).unwrap();
        assert_eq!(
            sp.segment_count(),
            1,
            "the active segment is never released"
        );
        assert_eq!(segment_firsts(&fs).len(), 1);
    }

    /// Proves a release beyond the last seq is refused and removes nothing.
    #[test]
    fn release_beyond_end_is_refused() {
        let fs = SimFs::new();
        let (mut sp, _) = open(&fs, cfg(2048, 1 << 20)).unwrap();
        for i in 0..10 {
            sp.append(&small_write(i).record_ref()).unwrap();
        }
        let before = snapshot(&fs);
        assert!(matches!(
            sp.release(11),
            Err(SpoolError::ReleaseBeyondEnd {
                up_to_seq: 11,
                last_seq: 10
            })
        ));
        assert_eq!(snapshot(&fs), before);
    }

    /// Proves records that break the format's rules are refused and nothing is written.
    #[test]
    fn append_refuses_invalid_records() {
        let fs = SimFs::new();
        let (mut sp, _) = open(&fs, cfg(2048, 1 << 30)).unwrap();
        sp.append(&small_write(0).record_ref()).unwrap();
        let before = snapshot(&fs);
        let long_id = "a".repeat(65);
        let huge = vec![0u8; RECORD_DATA_BYTES_MAX as usize + 512];
        let sector = [0u8; 512];
        let bad: Vec<SpoolRecordRef<'_>> = vec![
            SpoolRecordRef::Write {
                epoch: 0,
                disk: "D",
                offset: 0,
                data: &sector,
            },
            SpoolRecordRef::Write {
                epoch: 0,
                disk: "",
                offset: 0,
                data: &sector,
            },
            SpoolRecordRef::Write {
                epoch: 0,
                disk: &long_id,
                offset: 0,
                data: &sector,
            },
            SpoolRecordRef::Write {
                epoch: 0,
                disk: "d",
                offset: 1,
                data: &sector,
            },
            SpoolRecordRef::Write {
                epoch: 0,
                disk: "d",
                offset: 0,
                data: &sector[..100],
            },
            SpoolRecordRef::Write {
                epoch: 0,
                disk: "d",
                offset: 0,
                data: &[],
            },
            SpoolRecordRef::Write {
                epoch: 0,
                disk: "d",
                offset: 0,
                data: &huge,
            },
            SpoolRecordRef::Write {
                epoch: 0,
                disk: "d",
                offset: u64::MAX - 511,
                data: &sector,
            },
            SpoolRecordRef::Zero {
                epoch: 0,
                disk: "d",
                offset: 0,
                len: 0,
            },
            SpoolRecordRef::Zero {
                epoch: 0,
                disk: "d",
                offset: 512,
                len: 100,
            },
            SpoolRecordRef::Zero {
                epoch: 0,
                disk: "d/e",
                offset: 0,
                len: 512,
            },
        ];
        for r in &bad {
            let e = sp.append(r).unwrap_err();
            assert!(matches!(e, SpoolError::InvalidRecord { .. }), "{r:?}: {e}");
        }
        assert_eq!(snapshot(&fs), before);
        assert_eq!(sp.last_seq(), 1);
        assert!(matches!(
            Spool::open(Arc::new(fs.clone()), &dir(), cfg(10, 1 << 20)),
            Err(SpoolError::InvalidConfig(_))
        ));
        assert!(matches!(
            Spool::open(Arc::new(fs.clone()), &dir(), cfg(4096, 4095)),
            Err(SpoolError::InvalidConfig(_))
        ));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Append(SpoolEntry),
        Sync,
        /// Release up to this many quarters of the synced seq.
        Release(u64),
    }

    fn script(seed: u64, n: usize) -> Vec<Op> {
        let mut rng = Rng(seed | 1);
        (0..n)
            .map(|_| match rng.below(20) {
                0..=11 => Op::Append(gen_entry(&mut rng, 2)),
                12..=16 => Op::Sync,
                _ => Op::Release(1 + rng.below(4)),
            })
            .collect()
    }

    #[derive(Default, Debug)]
    struct Outcome {
        /// Entry of seq `i + 1` at index `i`.
        appended: Vec<SpoolEntry>,
        synced: u64,
        release_asked: u64,
    }

    /// Runs `ops` until the first error other than `Full` (a simulated crash).
    fn run(sp: &mut Spool, ops: &[Op], out: &mut Outcome) {
        for op in ops {
            match op {
                Op::Append(e) => match sp.append(&e.record_ref()) {
                    Ok(seq) => {
                        assert_eq!(seq, out.appended.len() as u64 + 1);
                        out.appended.push(e.clone());
                    }
                    Err(SpoolError::Full { .. }) => {}
                    Err(_) => return,
                },
                Op::Sync => match sp.sync() {
                    Ok(s) => out.synced = s,
                    Err(_) => return,
                },
                Op::Release(q) => {
                    let up = out.synced * q / 4;
                    out.release_asked = out.release_asked.max(up);
                    if sp.release(up).is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// What a reopened spool must show after a crash of a run that reached `out`.
    fn check_after_crash(sp: &Spool, out: &Outcome, what: &str) {
        let got = read_all(sp);
        let (first, last) = (sp.first_seq(), sp.last_seq());
        assert!(
            last >= out.synced,
            "{what}: lost synced records: last {last} < {}",
            out.synced
        );
        assert!(
            last <= out.appended.len() as u64,
            "{what}: records never appended"
        );
        assert!(
            first <= out.release_asked + 1,
            "{what}: first seq {first} was never released"
        );
        assert_eq!(got.len() as u64, last + 1 - first, "{what}: count");
        for (i, r) in got.iter().enumerate() {
            assert_eq!(r.seq, first + i as u64, "{what}: seqs not contiguous");
            assert_eq!(
                r.entry,
                out.appended[(r.seq - 1) as usize],
                "{what}: seq {}",
                r.seq
            );
        }
        assert_eq!(
            sp.durable_seq(),
            last,
            "{what}: recovery syncs what it found"
        );
    }

    /// Proves a crash at every durability step, torn or clean, and a second crash inside
    /// recovery, keeps every record up to the last successful sync byte-exact, invents
    /// none, and keeps seqs contiguous.
    #[test]
    fn crash_at_every_step_keeps_synced_records() {
        let c = cfg(2048, 8192);
        for script_seed in [3u64, 11] {
            let ops = script(script_seed, 90);
            let total = {
                let fs = SimFs::new();
                let (mut sp, _) = open(&fs, c).unwrap();
                let base = fs.steps();
                let mut out = Outcome::default();
                run(&mut sp, &ops, &mut out);
                assert!(out.appended.len() > 20 && out.release_asked > 0);
                fs.steps() - base
            };
            assert!(total > 20, "script takes {total} steps");
            for step in 1..=total + 1 {
                for mode in 0..5u64 {
                    let crash = if mode == 4 {
                        CrashMode::DropUnsynced
                    } else {
                        CrashMode::Torn {
                            seed: step * 31 + mode,
                        }
                    };
                    let what = format!("script {script_seed} step {step} {crash:?}");
                    let fs = SimFs::new();
                    let (mut sp, _) = open(&fs, c).unwrap();
                    fs.crash_after(step);
                    let mut out = Outcome::default();
                    run(&mut sp, &ops, &mut out);
                    drop(sp);
                    fs.crash(crash);
                    if mode == 1 {
                        // Crash again inside recovery, then recover for real.
                        fs.crash_after(1);
                        let _ = open(&fs, c);
                        fs.crash(CrashMode::Torn { seed: step });
                    }
                    let (mut sp, _) =
                        open(&fs, c).unwrap_or_else(|e| panic!("{what}: reopen: {e}"));
                    check_after_crash(&sp, &out, &what);
                    let last = sp.last_seq();
                    sp.release(last).unwrap();
                    assert_eq!(sp.append(&small_write(1).record_ref()).unwrap(), last + 1);
                }
            }
        }
    }

    #[derive(Clone, Debug)]
    enum ModelOp {
        Append(u64),
        Sync,
        Release(u64),
        Reopen { crash: bool },
    }

    fn model_op() -> impl Strategy<Value = ModelOp> {
        prop_oneof![
            6 => any::<u64>().prop_map(ModelOp::Append),
            2 => Just(ModelOp::Sync),
            1 => (0u64..=4).prop_map(ModelOp::Release),
            1 => any::<bool>().prop_map(|crash| ModelOp::Reopen { crash }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Proves the spool behaves like a plain list of entries (append, sync, release of
        /// a prefix, reopen with and without a crash), and that used bytes match the files.
        #[test]
        fn behaves_like_a_list(ops in proptest::collection::vec(model_op(), 1..60)) {
            let fs = SimFs::new();
            let c = cfg(1536, 6144);
            let (mut sp, _) = open(&fs, c).unwrap();
            let mut model: Vec<SpoolEntry> = Vec::new();
            let mut synced = 0u64;
            let mut released = 0u64;
            for op in ops {
                match op {
                    ModelOp::Append(seed) => {
                        let e = gen_entry(&mut Rng(seed | 1), 2);
                        let (used, last) = (sp.used_bytes(), sp.last_seq());
                        match sp.append(&e.record_ref()) {
                            Ok(seq) => {
                                prop_assert_eq!(seq, model.len() as u64 + 1);
                                model.push(e);
                                // A roll syncs the segment it leaves.
                                prop_assert!(sp.durable_seq() >= synced);
                                synced = sp.durable_seq();
                            }
                            Err(SpoolError::Full { used_bytes, max_bytes, need_bytes }) => {
                                prop_assert!(used_bytes + need_bytes > max_bytes);
                                prop_assert_eq!((sp.used_bytes(), sp.last_seq()), (used, last));
                            }
                            Err(e) => return Err(TestCaseError::fail(e.to_string())),
                        }
                    }
                    ModelOp::Sync => {
                        synced = sp.sync().unwrap();
                        prop_assert_eq!(synced, model.len() as u64);
                    }
                    ModelOp::Release(q) => {
                        let up = synced * q / 4;
                        released = released.max(up);
                        sp.release(up).unwrap();
                    }
                    ModelOp::Reopen { crash } => {
                        drop(sp);
                        if crash {
                            fs.crash(CrashMode::DropUnsynced);
                            model.truncate(synced as usize);
                        }
                        sp = open(&fs, c).unwrap().0;
                        synced = model.len() as u64;
                    }
                }
                prop_assert_eq!(sp.last_seq(), model.len() as u64);
                prop_assert_eq!(sp.durable_seq(), synced);
                prop_assert!(sp.first_seq() <= released + 1);
                let got = read_all(&sp);
                prop_assert_eq!(got.len() as u64, synced + 1 - sp.first_seq());
                for r in &got {
                    prop_assert_eq!(&r.entry, &model[(r.seq - 1) as usize]);
                }
                let on_disk: u64 = snapshot(&fs).iter().map(|(_, b)| b.len() as u64).sum();
                prop_assert_eq!(on_disk, sp.used_bytes());
            }
        }
    }

    const FLIP_CFG: SpoolConfig = SpoolConfig {
        segment_bytes_max: 4096,
        spool_bytes_max: 1 << 20,
    };

    /// Builds two segments: seqs 1..=7 (full), then 8..=13 in the last one, synced after
    /// 7, 10 and 13, so records 11..=13 carry `synced_seq` 10. Returns the record offsets
    /// in the last segment.
    fn build_two_segments(fs: &SimFs) -> Vec<(u64, u64)> {
        let (mut sp, _) = open(fs, FLIP_CFG).unwrap();
        for i in 0..13 {
            sp.append(&small_write(i).record_ref()).unwrap();
            if i == 6 || i == 9 || i == 12 {
                sp.sync().unwrap();
            }
        }
        assert_eq!(segment_firsts(fs), vec![1, 8]);
        // Each record is 64 + 2 + 512 bytes.
        (0..6).map(|k| (8 + k, 32 + k * 578)).collect()
    }

    /// Proves a flipped bit in the last segment is cut as a torn tail when no later
    /// record proves it synced, and is refused (changing nothing) when one does; a
    /// corrupt record is never returned.
    #[test]
    fn bit_flips_in_last_segment_cut_or_refuse() {
        let fs0 = SimFs::new();
        let offsets = build_two_segments(&fs0);
        let len = fs0.durable_contents(&seg_path(8)).unwrap().len();
        for byte in 0..len {
            let fs = SimFs::new();
            build_two_segments(&fs);
            fs.flip_bit(&seg_path(8), byte, byte as u8);
            let before = snapshot(&fs);
            let seq = offsets
                .iter()
                .rev()
                .find(|(_, off)| *off as usize <= byte)
                .map(|(s, _)| *s);
            match (open(&fs, FLIP_CFG), seq) {
                (Err(e), None) | (Err(e), Some(8..=10)) => {
                    assert!(
                        matches!(
                            e,
                            SpoolError::Corruption { .. } | SpoolError::UnsupportedVersion { .. }
                        ),
                        "byte {byte}: {e}"
                    );
                    assert_eq!(snapshot(&fs), before, "byte {byte}: error changed files");
                }
                (Ok((sp, rec)), Some(s @ 11..=13)) => {
                    assert_eq!(sp.last_seq(), s - 1, "byte {byte}");
                    assert_eq!(rec.records, s - 1);
                    assert!(rec.truncated_bytes > 0 && rec.tail_cut.is_some());
                    let got = read_all(&sp);
                    assert_eq!(got.len() as u64, s - 1);
                    for r in got {
                        assert_eq!(r.entry, small_write(r.seq - 1));
                    }
                }
                (Ok(_), s) => panic!("byte {byte} (seq {s:?}): flip accepted"),
                (Err(e), s) => panic!("byte {byte} (seq {s:?}): {e}"),
            }
        }
    }

    /// Proves a flipped bit anywhere in a segment that is not the last is an error and
    /// changes nothing.
    #[test]
    fn bit_flips_in_earlier_segment_are_errors() {
        let fs0 = SimFs::new();
        build_two_segments(&fs0);
        let len = fs0.durable_contents(&seg_path(1)).unwrap().len();
        for byte in 0..len {
            let fs = SimFs::new();
            build_two_segments(&fs);
            fs.flip_bit(&seg_path(1), byte, (byte * 3) as u8);
            let before = snapshot(&fs);
            let e = open(&fs, FLIP_CFG).expect_err("flip accepted");
            assert!(
                matches!(
                    e,
                    SpoolError::Corruption { .. } | SpoolError::UnsupportedVersion { .. }
                ),
                "byte {byte}: {e}"
            );
            assert_eq!(snapshot(&fs), before, "byte {byte}");
        }
    }

    fn set_len(fs: &SimFs, path: &Path, len: u64) {
        let f = fs.open(path, OpenMode::Existing).unwrap();
        f.set_len(len).unwrap();
        f.sync_data().unwrap();
    }

    /// Proves every truncation of the last segment recovers exactly the records wholly
    /// inside it (a cut header is rewritten), while any truncation of an earlier segment,
    /// header included, is an error that changes nothing.
    #[test]
    fn every_truncation() {
        let fs0 = SimFs::new();
        let offsets = build_two_segments(&fs0);
        let last_len = fs0.durable_contents(&seg_path(8)).unwrap().len() as u64;
        for cut in 0..last_len {
            let fs = SimFs::new();
            build_two_segments(&fs);
            set_len(&fs, &seg_path(8), cut);
            let (sp, rec) = open(&fs, FLIP_CFG).unwrap_or_else(|e| panic!("cut {cut}: {e}"));
            let whole = offsets.iter().filter(|(_, o)| o + 578 <= cut).count() as u64;
            assert_eq!(sp.last_seq(), 7 + whole, "cut {cut}");
            assert_eq!(rec.records, 7 + whole);
            assert_eq!(read_all(&sp).len() as u64, 7 + whole);
            if cut < SEGMENT_HEADER_BYTES as u64 {
                assert_eq!(rec.tail_cut.as_ref().map(|t| t.offset), Some(0));
                assert_eq!(
                    fs.durable_contents(&seg_path(8)).unwrap(),
                    encode_segment_header(8)
                );
            }
        }
        let first_len = fs0.durable_contents(&seg_path(1)).unwrap().len() as u64;
        for cut in 0..first_len {
            let fs = SimFs::new();
            build_two_segments(&fs);
            set_len(&fs, &seg_path(1), cut);
            let before = snapshot(&fs);
            assert!(
                matches!(open(&fs, FLIP_CFG), Err(SpoolError::Corruption { .. })),
                "cut {cut}"
            );
            assert_eq!(snapshot(&fs), before);
        }
    }

    /// Proves a missing middle segment is a seq gap, refused.
    #[test]
    fn seq_gap_between_segments_is_refused() {
        let fs = SimFs::new();
        let (mut sp, _) = open(&fs, cfg(2048, 1 << 20)).unwrap();
        for i in 0..12 {
            sp.append(&small_write(i).record_ref()).unwrap();
        }
        sp.sync().unwrap();
        drop(sp);
        let firsts = segment_firsts(&fs);
        fs.remove_file(&seg_path(firsts[1])).unwrap();
        fs.sync_dir(&dir()).unwrap();
        let e = open(&fs, cfg(2048, 1 << 20)).unwrap_err();
        assert!(
            matches!(&e, SpoolError::Corruption { why, .. } if why.contains("does not follow")),
            "{e}"
        );
    }

    fn put_file(fs: &SimFs, path: &Path, bytes: &[u8]) {
        fs.create_dir_all(&dir()).unwrap();
        let f = fs.open(path, OpenMode::Create).unwrap();
        f.set_len(0).unwrap();
        f.write_all_at(bytes, 0).unwrap();
        f.sync_data().unwrap();
        fs.sync_dir(&dir()).unwrap();
    }

    /// Proves random bytes never panic: as the only segment they are refused (or, when
    /// shorter than a header, replaced by one); after a valid header they are cut as a
    /// torn tail; as an earlier segment they are refused.
    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(0x5eed);
        let c = cfg(4096, 1 << 20);
        for i in 0..300 {
            let n = rng.below(3000) as usize;
            let junk = rng.bytes(n);

            let fs = SimFs::new();
            put_file(&fs, &seg_path(1), &junk);
            match open(&fs, c) {
                Ok((sp, rec)) => {
                    assert!(
                        n < SEGMENT_HEADER_BYTES,
                        "case {i}: junk of {n} bytes accepted"
                    );
                    assert_eq!((rec.records, sp.last_seq()), (0, 0));
                }
                Err(e) => assert!(n >= SEGMENT_HEADER_BYTES, "case {i}: {e}"),
            }

            let fs = SimFs::new();
            let mut seg = encode_segment_header(5).to_vec();
            seg.extend_from_slice(&junk);
            put_file(&fs, &seg_path(5), &seg);
            let (sp, rec) = open(&fs, c).unwrap_or_else(|e| panic!("case {i}: {e}"));
            assert_eq!((rec.records, rec.truncated_bytes), (0, n as u64));
            assert_eq!((sp.first_seq(), sp.last_seq()), (5, 4));

            let fs = SimFs::new();
            put_file(&fs, &seg_path(1), &junk);
            put_file(&fs, &seg_path(9), &encode_segment_header(9));
            assert!(open(&fs, c).is_err(), "case {i}");
        }
    }

    /// Proves a record whose data_len is above the bound is refused by the header
    /// decoder, before anything is read or allocated for its data.
    #[test]
    fn oversized_data_len_is_refused_before_allocating() {
        let h = RecordHeader {
            kind: RecordKind::Write,
            flags: 0,
            seq: 1,
            synced_seq: 0,
            epoch: 0,
            offset: 0,
            len: u64::from(u32::MAX),
            data_len: u32::MAX,
            disk_len: 2,
        };
        let mut b = h.encode();
        let err = RecordHeader::parse(&b).unwrap_err();
        assert!(err.contains("data_len"), "{err}");
        let crc = crc32fast::hash(&b[..RECORD_CRC_OFFSET]);
        b[RECORD_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        let mut seg = encode_segment_header(1).to_vec();
        seg.extend_from_slice(&b);
        seg.extend_from_slice(b"d0");
        let fs = SimFs::new();
        put_file(&fs, &seg_path(1), &seg);
        put_file(&fs, &seg_path(2), &encode_segment_header(2));
        let e = open(&fs, FLIP_CFG).unwrap_err();
        assert!(
            matches!(&e, SpoolError::Corruption { offset: 32, why, .. } if why.contains("data_len")),
            "{e}"
        );
        // As the last segment it is a torn tail, cut.
        fs.remove_file(&seg_path(2)).unwrap();
        let (sp, rec) = open(&fs, FLIP_CFG).unwrap();
        assert_eq!(
            (sp.last_seq(), rec.truncated_bytes),
            (0, b.len() as u64 + 2)
        );
    }

    /// Proves unknown versions are refused: a segment header's as UnsupportedVersion, a
    /// record's by the decoder naming the version.
    #[test]
    fn unknown_version_is_refused() {
        let mut h = encode_segment_header(1);
        h[4..6].copy_from_slice(&2u16.to_le_bytes());
        let crc = crc32fast::hash(&h[..SEGMENT_CRC_OFFSET]);
        h[SEGMENT_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            decode_segment_header(&h),
            Err(SegmentHeaderError::Version(2))
        );
        let fs = SimFs::new();
        put_file(&fs, &seg_path(1), &h);
        let before = snapshot(&fs);
        assert!(matches!(
            open(&fs, FLIP_CFG),
            Err(SpoolError::UnsupportedVersion { version: 2, .. })
        ));
        assert_eq!(snapshot(&fs), before);

        let fs = SimFs::new();
        build_two_segments(&fs);
        let raw = fs.durable_contents(&seg_path(1)).unwrap();
        let mut rec: [u8; RECORD_HEADER_BYTES] = raw[32..96].try_into().unwrap();
        assert!(RecordHeader::parse(&rec).is_ok());
        rec[4] = 9;
        assert!(RecordHeader::parse(&rec).unwrap_err().contains("version 9"));
    }

    /// Proves the segment header decoder refuses every single bit flip, each naming
    /// what is wrong.
    #[test]
    fn segment_header_bit_flips_are_refused() {
        let good = encode_segment_header(42);
        assert_eq!(decode_segment_header(&good), Ok(42));
        for byte in 0..SEGMENT_HEADER_BYTES {
            for bit in 0..8 {
                let mut b = good;
                b[byte] ^= 1 << bit;
                assert!(decode_segment_header(&b).is_err(), "byte {byte} bit {bit}");
            }
        }
    }

    /// Proves the bytes on disk follow the documented layout (golden bytes).
    #[test]
    fn golden_layout() {
        assert_eq!(
            encode_segment_header(1),
            [
                b'B', b'R', b'S', b'S', 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                0, 0, 0, 0, 0x57, 0x79, 0xe1, 0x61
            ]
        );
        let fs = SimFs::new();
        let (mut sp, _) = open(&fs, FLIP_CFG).unwrap();
        sp.append(&SpoolRecordRef::Cut {
            epoch: 3,
            point_id: 77,
            time_unix_ms: 1_700_000_000_000,
            app_consistent: true,
            consistent: false,
        })
        .unwrap();
        sp.append(&SpoolRecordRef::Zero {
            epoch: 4,
            disk: "ab",
            offset: 1024,
            len: 512,
        })
        .unwrap();
        sp.sync().unwrap();
        let raw = fs.durable_contents(&seg_path(1)).unwrap();
        let cut = &raw[32..96];
        assert_eq!(&cut[0..4], b"BRSR");
        assert_eq!(le_u16(cut, 4), 1);
        assert_eq!((cut[6], cut[7]), (3, 3));
        assert_eq!(
            (le_u64(cut, 8), le_u64(cut, 16), le_u64(cut, 24)),
            (1, 0, 3)
        );
        assert_eq!((le_u64(cut, 32), le_u64(cut, 40)), (77, 1_700_000_000_000));
        assert_eq!((le_u32(cut, 48), cut[52]), (0, 0));
        let zero = &raw[96..];
        assert_eq!(zero.len(), 64 + 2);
        assert_eq!((zero[6], le_u64(zero, 8), le_u64(zero, 24)), (2, 2, 4));
        assert_eq!(
            (le_u64(zero, 32), le_u64(zero, 40), zero[52]),
            (1024, 512, 2)
        );
        assert_eq!(&zero[64..], b"ab");
        let mut crc = crc32fast::Hasher::new();
        crc.update(&zero[..60]);
        crc.update(b"ab");
        assert_eq!(le_u32(zero, 60), crc.finalize());
    }

    /// Proves a segment file named with seq 0, or a record with seq `u64::MAX` (whose
    /// successor does not exist), is refused with a typed error instead of a panic.
    #[test]
    fn extreme_seqs_in_names_and_records_are_refused() {
        let c = cfg(4096, 1 << 20);
        // A header-less (empty) last segment named with seq 0.
        let fs = SimFs::new();
        put_file(&fs, &dir().join("spool-00000000000000000000.seg"), &[]);
        assert!(open(&fs, c).is_err());

        // A valid segment whose first record has seq u64::MAX.
        let fs = SimFs::new();
        let mut seg = encode_segment_header(u64::MAX).to_vec();
        let rec = SpoolRecordRef::Cut {
            epoch: 1,
            point_id: 1,
            time_unix_ms: 1,
            app_consistent: false,
            consistent: true,
        };
        let mut head = rec.header(u64::MAX, 0).encode();
        let crc = crc32fast::hash(&head[..RECORD_CRC_OFFSET]);
        head[RECORD_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        seg.extend_from_slice(&head);
        put_file(&fs, &seg_path(u64::MAX), &seg);
        assert!(open(&fs, c).is_err());

        // A header-less last segment named u64::MAX - 1 opens empty; its one append
        // takes seq u64::MAX - 1 and the next is refused, not a panic.
        let fs = SimFs::new();
        put_file(&fs, &seg_path(u64::MAX - 1), &[]);
        let (mut sp, _) = open(&fs, c).unwrap();
        assert_eq!(sp.append(&rec).unwrap(), u64::MAX - 1);
        assert!(matches!(
            sp.append(&rec),
            Err(SpoolError::InvalidRecord { .. })
        ));
    }

    /// Proves a failed sync stops the spool: the records it covered may be gone from
    /// the page cache (the kernel drops dirty pages after a failed fsync), so a later
    /// sync that succeeds must not report them durable; a failed roll stops it too.
    #[test]
    fn failed_sync_stops_the_spool_until_reopen() {
        let c = cfg(4096, 1 << 20);
        let fs = SimFs::new();
        let (mut sp, _) = open(&fs, c).unwrap();
        sp.append(&small_write(1).record_ref()).unwrap();
        assert_eq!(sp.sync().unwrap(), 1);
        sp.append(&small_write(2).record_ref()).unwrap();
        fs.crash_after(1);
        assert!(sp.sync().is_err());
        // The un-synced record is lost while the process goes on.
        fs.crash(CrashMode::DropUnsynced);
        assert!(matches!(sp.sync(), Err(SpoolError::Poisoned { .. })));
        assert!(matches!(
            sp.append(&small_write(3).record_ref()),
            Err(SpoolError::Poisoned { .. })
        ));
        assert_eq!(sp.durable_seq(), 1);
        drop(sp);
        let (sp, _) = open(&fs, c).unwrap();
        assert_eq!(sp.last_seq(), 1);

        // A roll whose new segment could not be made durable stops it as well: a
        // later, smaller record must not go on into the old segment past a new file
        // that may be there.
        let fs = SimFs::new();
        let (mut sp, _) = open(&fs, c).unwrap();
        // 32 + 7 x 578 bytes fill the 4096-byte segment: the 8th record rolls.
        for i in 1..=7 {
            sp.append(&small_write(i).record_ref()).unwrap();
        }
        sp.sync().unwrap();
        fs.crash_after(2); // the new segment's sync, then its directory's sync
        assert!(sp.append(&small_write(8).record_ref()).is_err());
        fs.crash(CrashMode::DropUnsynced);
        assert!(matches!(
            sp.append(&small_write(8).record_ref()),
            Err(SpoolError::Poisoned { .. })
        ));
    }
}
