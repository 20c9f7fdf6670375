//! Applying extents to a target (a replica file or a block device), and the undo log
//! that lets failback go back.
//!
//! This module owns two things:
//!
//! - [`apply_extents`]: writes a list of extents into a target opened through
//!   [`Storage`] as a [`StorageFile`]. Every extent is checked (sector alignment, inside
//!   the target) *before* anything is written, so bad input changes nothing. Failback
//!   calls it with an [`UndoLog`]; the retention fold (moving the base point forward)
//!   calls it with `None`.
//! - [`UndoLog`]: a file of the old contents of every range failback overwrote, so the
//!   recovery point can be changed (replay the undo log, then apply another point) until
//!   commit ([`UndoLog::discard`]).
//!
//! ## Writing: pwrite, not a memory map
//!
//! The bench (`cargo bench --bench ratios`, rows "apply") measures both on this
//! 2-vCPU machine, overwriting 64 MiB of a file in place in 64 KiB extents: pwrite +
//! `fdatasync` ~1.9-2.0 GB/s, a fresh memmap2 map + copy + `msync` ~2.3-2.4 GB/s (about
//! 15% faster, it saves the per-page work of the write path). pwrite stays, on purpose:
//! with a map, an I/O error of the replica's disk arrives as SIGBUS and kills the master
//! target in the middle of a failback instead of returning an error the operator can
//! read; and apply is not the bottleneck of failback (decode + blake3 verify runs at
//! ~1.4 GB/s per core, below either). pwrite also needs no `unsafe` and works the same
//! on files and block devices.
//!
//! ## Order of writes and syncs (the durability protocol)
//!
//! | step | what                                                                 | why                                                                 |
//! |-----:|----------------------------------------------------------------------|---------------------------------------------------------------------|
//! | 1    | every extent of the call is checked                                  | a refused call writes nothing, neither to the undo log nor the target |
//! | 2    | old contents of all extents of the call appended to the undo log, except ranges an earlier record of the log holds already | read before *any* write of the call, so overlaps within a call are saved as they were; a range saved once needs no second record (below) |
//! | 3    | undo log synced, once per call ([`StorageFile::sync_data`]); no append and no sync when step 2 found nothing to save. Each record's writeback is started as it is appended ([`StorageFile::start_writeback`]), so the sync waits for the last ones only | the old contents are durable before the first overwrite             |
//! | 4    | new data written to the target                                       | a crash now leaves a torn target that the undo log can still undo   |
//! | 5    | target synced by the caller ([`sync_target`]), once at the end       | one sync for many calls; the target need not be synced per call     |
//! | 6    | only then the undo log may be dropped ([`UndoLog::discard`]: remove, sync dir) | dropping it earlier could lose the only copy of old contents |
//!
//! [`UndoLog::replay`] writes the saved contents back in **reverse** order of recording,
//! so a range overwritten several times ends at its contents from before the first
//! overwrite, then syncs the target.
//!
//! **Saved once.** Because replay ends at the *oldest* record of every range, a second
//! record of a range (the contents some later overwrite replaced) would be written back
//! and then overwritten again by the first one: it is never needed. The log therefore
//! remembers which ranges its records hold (a merged range set, rebuilt from the
//! complete batches when the log is opened, emptied by [`UndoLog::reset`], at most
//! [`SAVED_RANGES_MAX`] ranges: beyond that a range is only saved again) and
//! [`UndoLog::save`] appends records only for the parts of a call's extents outside it.
//! A failback whose writes overlap (hot blocks, a point applied after a crash resumed
//! it) reads, writes and syncs each old byte once. Apply can also be split:
//! [`UndoLog::save`] (steps 1-3), then [`write_extents`] (step 4), so that a caller can
//! do other work between the two (failback checks the previous batch there). It reads the undo log and never changes it, so a
//! crash during replay followed by another replay is exact. [`UndoLog::reset`] empties
//! the log after a replay (the target is synced by then), so the next point starts with
//! a short log.
//!
//! ## Undo log layout, version 1 (all integers little-endian)
//!
//! A 32-byte file header, then records back to back. The records are grouped in
//! **batches**: one batch per [`apply_extents`] call, numbered from 1; the last record of a
//! batch carries the `LAST` flag. A batch is written and synced before its overwrites
//! start, and the next batch is written only after that, so only the last batch in the
//! file can be incomplete after a crash.
//!
//! File header:
//!
//! | offset | size | field          | meaning                                                   |
//! |-------:|-----:|----------------|-----------------------------------------------------------|
//! | 0      | 4    | `magic`        | `b"BRUL"` ([`UNDO_MAGIC`]); never modify                  |
//! | 4      | 2    | `version`      | [`VERSION`]; readers refuse versions they do not know     |
//! | 6      | 2    | `reserved0`    | must be 0                                                 |
//! | 8      | 8    | `target_bytes` | size of the target the log belongs to                     |
//! | 16     | 12   | `reserved1`    | must be 0                                                 |
//! | 28     | 4    | `crc32`        | crc32 (IEEE) of header bytes 0..28                        |
//!
//! Record (40-byte header, then `len` bytes of old contents unless `ZERO` is set):
//!
//! | offset | size | field               | meaning                                                         |
//! |-------:|-----:|---------------------|-----------------------------------------------------------------|
//! | 0      | 4    | `magic`             | `b"BRUR"` ([`RECORD_MAGIC`]); never modify                      |
//! | 4      | 4    | `batch`             | the batch (apply call) this record belongs to, from 1           |
//! | 8      | 8    | `offset`            | target offset of the saved range, a multiple of 512             |
//! | 16     | 4    | `len`               | bytes of the range: a multiple of 512, 1..=[`UNDO_RECORD_BYTES_MAX`] |
//! | 20     | 4    | `prev_record_bytes` | size of the previous record (header + data), 0 for the first    |
//! | 24     | 1    | `flags`             | bit 0 `ZERO`: the old contents were zeros, no data follows; bit 1 `LAST`: last record of its batch; other bits 0 |
//! | 25     | 7    | `reserved`          | must be 0                                                       |
//! | 32     | 4    | `data_crc`          | crc32 of the data bytes (0 with `ZERO`)                         |
//! | 36     | 4    | `header_crc`        | crc32 of record bytes 0..36; through `data_crc` it covers header and data |
//!
//! `prev_record_bytes` lets replay walk the records backwards without holding an index
//! in memory: memory stays flat however much failback overwrote.
//!
//! ## Recovery of a damaged tail (the explicit policy of [`UndoLog::open`])
//!
//! Records are read forward. The log ends cleanly at the end of the last complete
//! batch. A record that does not check (torn header or data, bad crc, short file) or
//! a last batch without its `LAST` record is a **torn tail**: that batch's sync never
//! finished, so none of its overwrites happened, and the whole incomplete batch is cut
//! (the file is truncated to the last complete batch and synced). But if, after the
//! damaged record, the rest of the file holds a record header that checks and belongs
//! to *another* batch than the one being cut, that batch was written after the damaged
//! one was synced: the damage is inside durable history and [`UndoLog::open`] returns
//! [`ApplyError::Corruption`] instead of silently losing old contents. A record whose crc
//! checks but whose fields are wrong (batch out of sequence, range outside the target,
//! reserved bits set) is corruption too: a torn write cannot produce it.
//!
//! Known limit: damage inside the *last* batch after it was synced (a bit flip on the
//! medium) looks exactly like a torn tail and is cut; a crc cannot tell the two apart.
//! The search for records after damage looks at every byte offset, so old contents that
//! themselves contain an undo log of another batch number (a disk image holding such a
//! file) can make a torn tail report [`ApplyError::Corruption`]: a false alarm, never a
//! silent loss.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

use crate::extent::{Extent, ExtentData, ExtentError, RangeSet};
use crate::storage::{OpenMode, Storage, StorageFile, synced_whole_pages};

/// The undo log file magic. Never modify: it names the format on disk.
pub const UNDO_MAGIC: [u8; 4] = *b"BRUL";
/// The undo record magic. Never modify: it names the format on disk.
pub const RECORD_MAGIC: [u8; 4] = *b"BRUR";
/// The undo log format version this code writes and reads.
pub const VERSION: u16 = 1;
/// Size of the undo log file header.
pub const HEADER_BYTES: u64 = 32;
/// Size of an undo record header.
pub const RECORD_HEADER_BYTES: usize = 40;
/// Hard bound on the old contents one undo record holds; longer extents are split.
/// Checked before anything read from disk is allocated.
pub const UNDO_RECORD_BYTES_MAX: u32 = 1 << 20;
/// Bytes of zeros written per call when applying a [`ExtentData::Zero`] extent.
pub const ZERO_CHUNK_BYTES: usize = 1 << 20;
/// Most merged ranges an open undo log remembers as saved (about 40 bytes each in
/// memory). Past it, further ranges are saved again when overwritten again: a
/// redundant record, never a missing one.
pub const SAVED_RANGES_MAX: usize = 1 << 16;
/// Bytes read per step when the tail of a damaged undo log is searched for records.
const SCAN_CHUNK_BYTES: usize = 1 << 20;

/// Record flag: the old contents were all zeros; no data follows the header.
const FLAG_ZERO: u8 = 1;
/// Record flag: the last record of its batch.
const FLAG_LAST: u8 = 2;

const HEADER_CRC_OFFSET: usize = 28;
const RECORD_DATA_CRC_OFFSET: usize = 32;
const RECORD_HEADER_CRC_OFFSET: usize = 36;

const _: () = assert!(HEADER_BYTES as usize == HEADER_CRC_OFFSET + 4);
const _: () = assert!(RECORD_HEADER_BYTES == RECORD_HEADER_CRC_OFFSET + 4);
const _: () = assert!(RECORD_DATA_CRC_OFFSET + 4 == RECORD_HEADER_CRC_OFFSET);
const _: () = assert!((UNDO_RECORD_BYTES_MAX as u64).is_multiple_of(crate::extent::SECTOR_BYTES));
const _: () = assert!((ZERO_CHUNK_BYTES as u64).is_multiple_of(crate::extent::SECTOR_BYTES));
// A record's total size must fit `prev_record_bytes`.
const _: () =
    assert!((UNDO_RECORD_BYTES_MAX as u64) + (RECORD_HEADER_BYTES as u64) < u32::MAX as u64);

/// Zeros for [`ExtentData::Zero`] extents and zero records (in `.bss`, costs no heap).
static ZEROS: [u8; ZERO_CHUNK_BYTES] = [0; ZERO_CHUNK_BYTES];

/// Why applying, recording or replaying was refused. Callers branch on the case.
#[derive(Debug, Error)]
pub enum ApplyError {
    /// An extent of the call is misaligned, empty or outside the target; nothing was
    /// written.
    #[error("extent {index} refused: {source}")]
    BadExtent { index: usize, source: ExtentError },
    /// The undo log belongs to a target of another size.
    #[error("undo log was made for a target of {undo_target_bytes} bytes, not {target_bytes}")]
    TargetMismatch {
        undo_target_bytes: u64,
        target_bytes: u64,
    },
    /// The undo log does not check; `field` names what is wrong.
    #[error("undo log corrupt at byte {at_bytes}: {field}: {why}")]
    Corruption {
        at_bytes: u64,
        field: &'static str,
        why: String,
    },
    /// The undo log has a version this build does not read.
    #[error("unsupported undo log version {0} (this build reads version {VERSION})")]
    UnsupportedVersion(u16),
    /// The undo log has reached its maximum number of batches.
    #[error("undo log is full: {0} batches")]
    Full(u32),
    /// An earlier append or reset failed half-way; the in-memory view may not match the
    /// file. Reopen the log ([`UndoLog::open`]), which recovers the file's tail.
    #[error("undo log is poisoned by an earlier failed write; reopen it to recover")]
    Poisoned,
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

fn corruption(at_bytes: u64, field: &'static str, why: impl Into<String>) -> ApplyError {
    ApplyError::Corruption {
        at_bytes,
        field,
        why: why.into(),
    }
}

/// What one [`apply_extents`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Extents applied.
    pub extents: u64,
    /// Bytes of data written from [`ExtentData::Bytes`] extents.
    pub data_bytes: u64,
    /// Bytes of zeros written for [`ExtentData::Zero`] extents.
    pub zero_bytes: u64,
    /// Undo records appended (0 without an undo log).
    pub undo_records: u64,
    /// Bytes appended to the undo log file (0 without an undo log).
    pub undo_file_bytes: u64,
    /// Bytes whose old contents were not saved again: an earlier record of the log
    /// holds them already (see [`UndoLog::save`]).
    pub undo_skipped_bytes: u64,
}

/// What [`UndoLog::replay`] wrote back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplayStats {
    /// Records replayed.
    pub records: u64,
    /// Target bytes written back.
    pub target_bytes: u64,
}

/// What [`UndoLog::open`] found and did to the tail.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UndoRecovery {
    /// Records kept (all in complete batches).
    pub records: u64,
    /// Complete batches kept.
    pub batches: u32,
    /// Bytes cut from the end of the file (an incomplete last batch or a torn tail).
    pub cut_bytes: u64,
    /// Records that checked but were cut because their batch was incomplete.
    pub cut_records: u64,
    /// Where the first record that did not check starts, when one was found.
    pub damaged_at_bytes: Option<u64>,
}

/// Checks every extent against `target_bytes` before anything is written.
fn check_extents(target_bytes: u64, extents: &[(u64, ExtentData<'_>)]) -> Result<(), ApplyError> {
    for (index, (offset, data)) in extents.iter().enumerate() {
        Extent::new(*offset, data.len(), target_bytes)
            .map_err(|source| ApplyError::BadExtent { index, source })?;
    }
    Ok(())
}

/// Writes `len` zero bytes at `offset`, in chunks of at most [`ZERO_CHUNK_BYTES`].
fn write_zeros(target: &dyn StorageFile, mut offset: u64, len: u64) -> io::Result<()> {
    let mut left = len;
    while left > 0 {
        let n = left.min(ZERO_CHUNK_BYTES as u64) as usize;
        target.write_all_at(&ZEROS[..n], offset)?;
        offset += n as u64;
        left -= n as u64;
    }
    Ok(())
}

/// Reads `buf.len()` bytes at `offset`; bytes past the end of the target read as
/// zeros (a replica file not yet extended to its full size holds zeros there).
fn read_old(target: &dyn StorageFile, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match target.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes `extents` into `target` (a replica file or block device of `target_bytes`).
///
/// Every extent is checked first (sector-aligned, non-empty, inside `target_bytes`):
/// a refused call writes nothing. With `undo`, the old contents of the extents are
/// saved first ([`UndoLog::save`]: appended and synced once, before the first
/// overwrite). Extents are written in order, so a later extent wins where two overlap.
///
/// The target is **not** synced here: call [`sync_target`] once at the end of a run of
/// calls, and before the undo log is discarded.
pub fn apply_extents(
    target: &dyn StorageFile,
    target_bytes: u64,
    extents: &[(u64, ExtentData<'_>)],
    undo: Option<&mut UndoLog>,
) -> Result<ApplyStats, ApplyError> {
    check_extents(target_bytes, extents)?;
    let saved = match undo {
        Some(undo) => undo.save_checked(target, target_bytes, extents)?,
        None => ApplyStats::default(),
    };
    let written = write_checked(target, extents)?;
    Ok(ApplyStats {
        undo_records: saved.undo_records,
        undo_file_bytes: saved.undo_file_bytes,
        undo_skipped_bytes: saved.undo_skipped_bytes,
        ..written
    })
}

/// Writes `extents` into `target` without an undo log: [`apply_extents`] step 4 alone,
/// for a caller that saved their old contents with [`UndoLog::save`] first (and may
/// have done other work in between). Every extent is checked before anything is
/// written; the target is not synced.
pub fn write_extents(
    target: &dyn StorageFile,
    target_bytes: u64,
    extents: &[(u64, ExtentData<'_>)],
) -> Result<ApplyStats, ApplyError> {
    check_extents(target_bytes, extents)?;
    write_checked(target, extents)
}

/// Writes checked extents in order.
fn write_checked(
    target: &dyn StorageFile,
    extents: &[(u64, ExtentData<'_>)],
) -> Result<ApplyStats, ApplyError> {
    let mut stats = ApplyStats::default();
    for (offset, data) in extents {
        match data {
            ExtentData::Bytes(b) => {
                target.write_all_at(b, *offset)?;
                stats.data_bytes += b.len() as u64;
            }
            ExtentData::Zero(n) => {
                write_zeros(target, *offset, *n)?;
                stats.zero_bytes += n;
            }
        }
        stats.extents += 1;
    }
    Ok(stats)
}

/// Makes everything applied to `target` durable. Call it at the end of a run of
/// [`apply_extents`] calls, and always before [`UndoLog::discard`] or before the
/// journal drops the frames that were applied (retention fold).
///
/// A failed sync leaves it unknown which of the writes since the last good sync reached
/// the disk (Linux may drop the failed pages and report success on a retry). Never
/// retry the sync alone: re-apply everything since the last good sync (or replay the
/// undo log), then sync again.
pub fn sync_target(target: &dyn StorageFile) -> Result<(), ApplyError> {
    target.sync_data()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Encoding and decoding.

use crate::le::{u16_at as le_u16, u32_at as le_u32, u64_at as le_u64};

/// The undo log file header for a target of `target_bytes`.
fn encode_header(target_bytes: u64) -> [u8; HEADER_BYTES as usize] {
    let mut h = [0u8; HEADER_BYTES as usize];
    h[0..4].copy_from_slice(&UNDO_MAGIC);
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&target_bytes.to_le_bytes());
    let crc = crc32fast::hash(&h[..HEADER_CRC_OFFSET]);
    h[HEADER_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks the undo log file header and returns the target size it names.
fn decode_header(h: &[u8; HEADER_BYTES as usize]) -> Result<u64, ApplyError> {
    if h[0..4] != UNDO_MAGIC {
        return Err(corruption(
            0,
            "magic",
            format!("{:02x?}, expected \"BRUL\"", &h[0..4]),
        ));
    }
    let version = le_u16(h, 4);
    if version != VERSION {
        return Err(ApplyError::UnsupportedVersion(version));
    }
    let stored = le_u32(h, HEADER_CRC_OFFSET);
    let actual = crc32fast::hash(&h[..HEADER_CRC_OFFSET]);
    if stored != actual {
        return Err(corruption(
            HEADER_CRC_OFFSET as u64,
            "header crc32",
            format!("header says {stored:08x}, bytes give {actual:08x}"),
        ));
    }
    if le_u16(h, 6) != 0 {
        return Err(corruption(6, "reserved0", "not zero"));
    }
    if h[16..28].iter().any(|&b| b != 0) {
        return Err(corruption(16, "reserved1", "not zero"));
    }
    Ok(le_u64(h, 8))
}

/// A decoded undo record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RecordHeader {
    batch: u32,
    offset: u64,
    len: u32,
    prev_record_bytes: u32,
    flags: u8,
    data_crc: u32,
}

impl RecordHeader {
    fn is_zero(&self) -> bool {
        self.flags & FLAG_ZERO != 0
    }
    fn is_last(&self) -> bool {
        self.flags & FLAG_LAST != 0
    }
    /// Bytes of data stored after the header.
    fn stored_bytes(&self) -> u32 {
        if self.is_zero() { 0 } else { self.len }
    }
    /// Total size of the record in the file.
    fn record_bytes(&self) -> u32 {
        RECORD_HEADER_BYTES as u32 + self.stored_bytes()
    }

    fn encode(&self, out: &mut [u8]) {
        let h = &mut out[..RECORD_HEADER_BYTES];
        h[0..4].copy_from_slice(&RECORD_MAGIC);
        h[4..8].copy_from_slice(&self.batch.to_le_bytes());
        h[8..16].copy_from_slice(&self.offset.to_le_bytes());
        h[16..20].copy_from_slice(&self.len.to_le_bytes());
        h[20..24].copy_from_slice(&self.prev_record_bytes.to_le_bytes());
        h[24] = self.flags;
        h[25..32].fill(0);
        h[32..36].copy_from_slice(&self.data_crc.to_le_bytes());
        let crc = crc32fast::hash(&h[..RECORD_HEADER_CRC_OFFSET]);
        h[RECORD_HEADER_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Why a record header was not accepted.
#[derive(Debug)]
enum RecordFault {
    /// Magic or crc wrong: torn, never written, or damaged. Tail policy decides.
    Damaged(&'static str),
    /// The crc checks but a field is wrong: a torn write cannot produce this.
    Invalid(&'static str, String),
}

/// Decodes and checks a record header against a target of `target_bytes`.
fn decode_record_header(
    h: &[u8; RECORD_HEADER_BYTES],
    target_bytes: u64,
) -> Result<RecordHeader, RecordFault> {
    if h[0..4] != RECORD_MAGIC {
        return Err(RecordFault::Damaged("record magic"));
    }
    if le_u32(h, RECORD_HEADER_CRC_OFFSET) != crc32fast::hash(&h[..RECORD_HEADER_CRC_OFFSET]) {
        return Err(RecordFault::Damaged("record header_crc"));
    }
    let r = RecordHeader {
        batch: le_u32(h, 4),
        offset: le_u64(h, 8),
        len: le_u32(h, 16),
        prev_record_bytes: le_u32(h, 20),
        flags: h[24],
        data_crc: le_u32(h, RECORD_DATA_CRC_OFFSET),
    };
    if r.batch == 0 {
        return Err(RecordFault::Invalid(
            "batch",
            "0; batches start at 1".into(),
        ));
    }
    if r.flags & !(FLAG_ZERO | FLAG_LAST) != 0 {
        return Err(RecordFault::Invalid(
            "flags",
            format!("unknown bits in {:#04x}", r.flags),
        ));
    }
    if h[25..32].iter().any(|&b| b != 0) {
        return Err(RecordFault::Invalid("reserved", "not zero".into()));
    }
    if r.len > UNDO_RECORD_BYTES_MAX {
        return Err(RecordFault::Invalid(
            "len",
            format!("{} above the bound {UNDO_RECORD_BYTES_MAX}", r.len),
        ));
    }
    if let Err(e) = Extent::new(r.offset, r.len.into(), target_bytes) {
        return Err(RecordFault::Invalid("offset/len", e.to_string()));
    }
    if r.is_zero() && r.data_crc != 0 {
        return Err(RecordFault::Invalid(
            "data_crc",
            "not zero in a ZERO record".into(),
        ));
    }
    Ok(r)
}

/// Reads and checks the record at `pos` (header, bounds, data crc) of a file of
/// `file_bytes`. The data is read into `buf` (at most [`UNDO_RECORD_BYTES_MAX`] bytes,
/// allocated only once the header checked).
fn read_record(
    file: &dyn StorageFile,
    pos: u64,
    file_bytes: u64,
    target_bytes: u64,
    buf: &mut Vec<u8>,
) -> Result<Result<RecordHeader, RecordFault>, io::Error> {
    if file_bytes - pos < RECORD_HEADER_BYTES as u64 {
        return Ok(Err(RecordFault::Damaged("record header (file ends)")));
    }
    let mut hb = [0u8; RECORD_HEADER_BYTES];
    file.read_exact_at(&mut hb, pos)?;
    let h = match decode_record_header(&hb, target_bytes) {
        Ok(h) => h,
        Err(f) => return Ok(Err(f)),
    };
    let data_pos = pos + RECORD_HEADER_BYTES as u64;
    let stored = u64::from(h.stored_bytes());
    if file_bytes - data_pos < stored {
        return Ok(Err(RecordFault::Damaged("record data (file ends)")));
    }
    buf.clear();
    buf.resize(stored as usize, 0);
    file.read_exact_at(buf, data_pos)?;
    if crc32fast::hash(buf) != h.data_crc {
        return Ok(Err(RecordFault::Damaged("record data_crc")));
    }
    Ok(Ok(h))
}

/// Searches `[from, file_bytes)` for a record header that checks and belongs to a batch
/// other than `allowed_batch`; returns its position and batch. Reads in bounded chunks.
fn find_foreign_record(
    file: &dyn StorageFile,
    from: u64,
    file_bytes: u64,
    target_bytes: u64,
    allowed_batch: u32,
) -> io::Result<Option<(u64, u32)>> {
    let mut chunk = Vec::new();
    let mut start = from;
    while file_bytes.saturating_sub(start) >= RECORD_HEADER_BYTES as u64 {
        let n = (file_bytes - start).min((SCAN_CHUNK_BYTES + RECORD_HEADER_BYTES) as u64) as usize;
        chunk.clear();
        chunk.resize(n, 0);
        file.read_exact_at(&mut chunk, start)?;
        let last = n - RECORD_HEADER_BYTES;
        for i in 0..=last {
            if chunk[i..i + 4] != RECORD_MAGIC {
                continue;
            }
            let mut hb = [0u8; RECORD_HEADER_BYTES];
            hb.copy_from_slice(&chunk[i..i + RECORD_HEADER_BYTES]);
            if let Ok(h) = decode_record_header(&hb, target_bytes)
                && h.batch != allowed_batch
            {
                return Ok(Some((start + i as u64, h.batch)));
            }
        }
        // The next chunk starts right after the last position tried here; headers that
        // straddle the boundary are tried there, since chunks overlap by a header.
        start += last as u64 + 1;
    }
    Ok(None)
}

// ---------------------------------------------------------------------------------------
// The undo log.

/// Adds `[start, end)` to `saved` unless the set is at [`SAVED_RANGES_MAX`].
fn note_saved(saved: &mut RangeSet, start: u64, end: u64) {
    if saved.len() < SAVED_RANGES_MAX {
        saved.insert(start, end);
    }
}

/// The position and size of a record, to walk the log backwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RecordRef {
    pos: u64,
    bytes: u32,
}

/// The state of the log at the end of its last complete batch.
#[derive(Clone, Copy, Debug)]
struct Committed {
    end_bytes: u64,
    records: u64,
    batches: u32,
    last: Option<RecordRef>,
    saved_bytes: u64,
}

impl Committed {
    fn empty() -> Self {
        Self {
            end_bytes: HEADER_BYTES,
            records: 0,
            batches: 0,
            last: None,
            saved_bytes: 0,
        }
    }
}

/// The undo log of one target: old contents saved before failback overwrote them.
///
/// Holds an `Arc<dyn Storage>` and the open file. Its in-memory view always describes
/// complete, synced batches; an append or reset that fails half-way poisons it
/// ([`ApplyError::Poisoned`]) until it is reopened.
pub struct UndoLog {
    fs: Arc<dyn Storage>,
    path: PathBuf,
    file: Box<dyn StorageFile>,
    target_bytes: u64,
    state: Committed,
    /// Target ranges whose old contents a record of the log holds (at most
    /// [`SAVED_RANGES_MAX`] merged ranges; a range left out is only saved again).
    saved: RangeSet,
    /// A record buffer reused across records: header, then at most
    /// [`UNDO_RECORD_BYTES_MAX`] bytes of old contents.
    rec: Vec<u8>,
    poisoned: bool,
}

impl std::fmt::Debug for UndoLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UndoLog")
            .field("path", &self.path)
            .field("target_bytes", &self.target_bytes)
            .field("state", &self.state)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

/// The directory whose entries hold `path`'s name.
fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

impl UndoLog {
    /// Creates a new, empty undo log at `path` (which must not exist) for a target of
    /// `target_bytes`: file created, header written, file synced, directory synced.
    ///
    /// If this fails or the machine crashes inside it, no record can exist yet: the
    /// caller removes whatever is at `path` and creates again.
    pub fn create(
        fs: Arc<dyn Storage>,
        path: &Path,
        target_bytes: u64,
    ) -> Result<Self, ApplyError> {
        let file = fs.open(path, OpenMode::CreateNew)?;
        file.write_all_at(&encode_header(target_bytes), 0)?;
        file.sync_data()?;
        fs.sync_dir(dir_of(path))?;
        Ok(Self {
            fs,
            path: path.to_path_buf(),
            file,
            target_bytes,
            state: Committed::empty(),
            saved: RangeSet::new(),
            rec: Vec::new(),
            poisoned: false,
        })
    }

    /// Opens the undo log at `path`, checks every record, and applies the tail policy
    /// of the module doc: an incomplete or torn last batch is cut (the file truncated
    /// and synced); damage followed by a record of another batch is
    /// [`ApplyError::Corruption`].
    pub fn open(fs: Arc<dyn Storage>, path: &Path) -> Result<(Self, UndoRecovery), ApplyError> {
        let file = fs.open(path, OpenMode::Existing)?;
        let file_bytes = file.len()?;
        if file_bytes < HEADER_BYTES {
            return Err(corruption(
                0,
                "header",
                format!("file is {file_bytes} bytes, the header needs {HEADER_BYTES}"),
            ));
        }
        let mut hb = [0u8; HEADER_BYTES as usize];
        file.read_exact_at(&mut hb, 0)?;
        let target_bytes = decode_header(&hb)?;

        let mut committed = Committed::empty();
        // The state including records of a batch not (yet) seen complete.
        let mut seen = Committed::empty();
        let mut last_was_last = true;
        let mut prev_record_bytes = 0u32;
        let mut pos = HEADER_BYTES;
        let mut buf = Vec::new();
        let mut damaged_at = None;
        let mut saved = RangeSet::new();
        // Ranges of the batch being read, added to `saved` once the batch is complete.
        let mut batch_ranges: Vec<(u64, u64)> = Vec::new();
        while pos < file_bytes {
            let h = match read_record(file.as_ref(), pos, file_bytes, target_bytes, &mut buf)? {
                Ok(h) => h,
                Err(RecordFault::Damaged(_)) => {
                    damaged_at = Some(pos);
                    break;
                }
                Err(RecordFault::Invalid(field, why)) => return Err(corruption(pos, field, why)),
            };
            let expected_batch = if last_was_last {
                seen.batches
                    .checked_add(1)
                    .ok_or(ApplyError::Full(seen.batches))?
            } else {
                seen.batches
            };
            if h.batch != expected_batch {
                return Err(corruption(
                    pos,
                    "batch",
                    format!("{}, expected {expected_batch}", h.batch),
                ));
            }
            if h.prev_record_bytes != prev_record_bytes {
                return Err(corruption(
                    pos,
                    "prev_record_bytes",
                    format!(
                        "{}, the previous record has {prev_record_bytes}",
                        h.prev_record_bytes
                    ),
                ));
            }
            seen.batches = h.batch;
            seen.records += 1;
            seen.saved_bytes += u64::from(h.len);
            seen.last = Some(RecordRef {
                pos,
                bytes: h.record_bytes(),
            });
            pos += u64::from(h.record_bytes());
            seen.end_bytes = pos;
            prev_record_bytes = h.record_bytes();
            last_was_last = h.is_last();
            batch_ranges.push((h.offset, h.offset + u64::from(h.len)));
            if last_was_last {
                committed = seen;
                for (a, b) in batch_ranges.drain(..) {
                    note_saved(&mut saved, a, b);
                }
            }
        }

        if let Some(bad) = damaged_at {
            // The batch being cut is the one after the last complete batch; a record of
            // any other batch after the damage proves the damage is in synced history.
            let cut_batch = committed.batches.saturating_add(1);
            if let Some((at, batch)) =
                find_foreign_record(file.as_ref(), bad + 1, file_bytes, target_bytes, cut_batch)?
            {
                return Err(corruption(
                    bad,
                    "record",
                    format!(
                        "damaged, but a valid record of batch {batch} follows at byte {at} \
                         (only batch {cut_batch} may be torn)"
                    ),
                ));
            }
        }

        let recovery = UndoRecovery {
            records: committed.records,
            batches: committed.batches,
            cut_bytes: file_bytes - committed.end_bytes,
            cut_records: seen.records - committed.records,
            damaged_at_bytes: damaged_at,
        };
        if committed.end_bytes < file_bytes {
            // Durably cut the torn tail before anything is appended after it, so no
            // stale record can ever follow a new one.
            file.set_len(committed.end_bytes)?;
            file.sync_data()?;
        }
        Ok((
            Self {
                fs,
                path: path.to_path_buf(),
                file,
                target_bytes,
                state: committed,
                saved,
                rec: Vec::new(),
                poisoned: false,
            },
            recovery,
        ))
    }

    /// The size of the target this log belongs to.
    pub fn target_bytes(&self) -> u64 {
        self.target_bytes
    }

    /// The path of the log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records in complete, synced batches.
    pub fn records(&self) -> u64 {
        self.state.records
    }

    /// Complete, synced batches (apply calls with at least one extent).
    pub fn batches(&self) -> u32 {
        self.state.batches
    }

    /// Size of the log file in bytes (header included).
    pub fn bytes(&self) -> u64 {
        self.state.end_bytes
    }

    /// Target bytes whose old contents the log holds (overlaps counted each time).
    pub fn saved_bytes(&self) -> u64 {
        self.state.saved_bytes
    }

    /// Saves the old contents of `extents` in `target` (a target of `target_bytes`)
    /// before they are overwritten: steps 1 to 3 of the module doc. Every extent is
    /// checked first; then the parts of the extents whose old contents no record of the
    /// log holds yet are read and appended as one batch, and the log is synced once.
    /// When every part is saved already (an earlier record covers it: replay, newest
    /// record first, ends at that record's contents anyway) nothing is written or
    /// synced. Returns the undo fields of [`ApplyStats`].
    ///
    /// The caller then writes the extents ([`write_extents`]), and reads nothing from
    /// `target` for another save in between that it expects to see the old contents.
    pub fn save(
        &mut self,
        target: &dyn StorageFile,
        target_bytes: u64,
        extents: &[(u64, ExtentData<'_>)],
    ) -> Result<ApplyStats, ApplyError> {
        check_extents(target_bytes, extents)?;
        self.save_checked(target, target_bytes, extents)
    }

    /// [`UndoLog::save`] of extents that were checked.
    fn save_checked(
        &mut self,
        target: &dyn StorageFile,
        target_bytes: u64,
        extents: &[(u64, ExtentData<'_>)],
    ) -> Result<ApplyStats, ApplyError> {
        if self.poisoned {
            return Err(ApplyError::Poisoned);
        }
        if self.target_bytes != target_bytes {
            return Err(ApplyError::TargetMismatch {
                undo_target_bytes: self.target_bytes,
                target_bytes,
            });
        }
        let mut stats = ApplyStats::default();
        if extents.is_empty() {
            return Ok(stats);
        }
        let r = self.append_batch(target, extents, &mut stats);
        if r.is_err() {
            // The file may hold part of the batch, and `saved` may name its ranges.
            self.poisoned = true;
        }
        r.map(|()| stats)
    }

    /// Appends one batch: the old contents of every part of `extents` not saved yet,
    /// read from `target` before anything is overwritten, then one sync.
    fn append_batch(
        &mut self,
        target: &dyn StorageFile,
        extents: &[(u64, ExtentData<'_>)],
        stats: &mut ApplyStats,
    ) -> Result<(), ApplyError> {
        let batch = self
            .state
            .batches
            .checked_add(1)
            .ok_or(ApplyError::Full(self.state.batches))?;
        // The records: parts not covered by an earlier record (of an earlier batch, or
        // of an earlier extent of this call: read before any write of the call, so it
        // holds the contents from before the call), split at the record bound.
        let max = u64::from(UNDO_RECORD_BYTES_MAX);
        let mut parts: Vec<(u64, u32)> = Vec::new();
        for (offset, data) in extents {
            let end = offset + data.len();
            for (a, b) in self.saved.uncovered(*offset, end) {
                let mut at = a;
                while at < b {
                    let len = (b - at).min(max);
                    parts.push((at, len as u32));
                    at += len;
                }
            }
            note_saved(&mut self.saved, *offset, end);
        }
        let covered: u64 = extents.iter().map(|(_, d)| d.len()).sum();
        let to_save: u64 = parts.iter().map(|&(_, len)| u64::from(len)).sum();
        stats.undo_skipped_bytes = covered - to_save;
        if parts.is_empty() {
            return Ok(());
        }
        let biggest = parts.iter().map(|&(_, len)| len).max().unwrap_or(0) as usize;
        if self.rec.len() < RECORD_HEADER_BYTES + biggest {
            self.rec.resize(RECORD_HEADER_BYTES + biggest, 0);
        }
        let mut next = self.state;
        let mut prev_record_bytes = next.last.map_or(0, |r| r.bytes);
        for (i, &(at, len)) in parts.iter().enumerate() {
            let rec = &mut self.rec[..RECORD_HEADER_BYTES + len as usize];
            // A hole of a sparse replica (never written, e.g. a blank one) is saved as
            // zeros without reading it: the kernel would zero a fresh cache page for
            // every 4 KiB of it, which was half of a failback's time onto a blank
            // replica. Whatever is not certainly a hole is read.
            let zero = if target.is_hole(at, u64::from(len))? {
                true
            } else {
                read_old(target, &mut rec[RECORD_HEADER_BYTES..], at)?;
                rec[RECORD_HEADER_BYTES..].iter().all(|&b| b == 0)
            };
            let stored = if zero { 0 } else { len as usize };
            let data_crc = if zero {
                0
            } else {
                crc32fast::hash(&rec[RECORD_HEADER_BYTES..])
            };
            let h = RecordHeader {
                batch,
                offset: at,
                len,
                prev_record_bytes,
                flags: if zero { FLAG_ZERO } else { 0 }
                    | if i + 1 == parts.len() { FLAG_LAST } else { 0 },
                data_crc,
            };
            h.encode(rec);
            let rec = &rec[..RECORD_HEADER_BYTES + stored];
            self.file.write_all_at(rec, next.end_bytes)?;
            // The disk writes this record while the next ones are read, so the sync
            // at the end waits for the last of them only.
            self.file
                .start_writeback(next.end_bytes, rec.len() as u64)?;
            next.last = Some(RecordRef {
                pos: next.end_bytes,
                bytes: h.record_bytes(),
            });
            next.end_bytes += rec.len() as u64;
            next.records += 1;
            next.saved_bytes += u64::from(len);
            prev_record_bytes = h.record_bytes();
        }
        next.batches = batch;
        // The one sync of the call: the old contents are durable before any overwrite.
        self.file.sync_data()?;
        // Read again only by a change of point: the synced records need not stay in
        // the cache (a hint, see `Journal`'s commit for why it pays).
        if let Some((start, end)) = synced_whole_pages(self.state.end_bytes, next.end_bytes) {
            let _ = self.file.drop_cached(start, end - start);
        }
        stats.undo_records = next.records - self.state.records;
        stats.undo_file_bytes = next.end_bytes - self.state.end_bytes;
        self.state = next;
        Ok(())
    }

    /// Writes the saved old contents back into `target`, newest record first, so every
    /// range ends at its contents from before the first overwrite; then syncs `target`.
    ///
    /// The log is only read (each record checked again), so a crash during replay
    /// followed by another replay is exact.
    pub fn replay(&self, target: &dyn StorageFile) -> Result<ReplayStats, ApplyError> {
        if self.poisoned {
            return Err(ApplyError::Poisoned);
        }
        let mut stats = ReplayStats::default();
        let mut buf = Vec::new();
        let mut at = self.state.last;
        while let Some(r) = at {
            let h = match read_record(
                self.file.as_ref(),
                r.pos,
                self.state.end_bytes,
                self.target_bytes,
                &mut buf,
            )? {
                Ok(h) => h,
                Err(RecordFault::Damaged(field)) => {
                    return Err(corruption(r.pos, field, "changed since the log was opened"));
                }
                Err(RecordFault::Invalid(field, why)) => return Err(corruption(r.pos, field, why)),
            };
            if h.record_bytes() != r.bytes {
                return Err(corruption(
                    r.pos,
                    "len",
                    format!("record is {} bytes, expected {}", h.record_bytes(), r.bytes),
                ));
            }
            if h.is_zero() {
                write_zeros(target, h.offset, h.len.into())?;
            } else {
                target.write_all_at(&buf, h.offset)?;
            }
            stats.records += 1;
            stats.target_bytes += u64::from(h.len);
            at = match h.prev_record_bytes {
                0 if r.pos == HEADER_BYTES => None,
                0 => {
                    return Err(corruption(
                        r.pos,
                        "prev_record_bytes",
                        "0 after the first record",
                    ));
                }
                prev => match r.pos.checked_sub(u64::from(prev)) {
                    Some(p) if p >= HEADER_BYTES => Some(RecordRef {
                        pos: p,
                        bytes: prev,
                    }),
                    _ => {
                        return Err(corruption(
                            r.pos,
                            "prev_record_bytes",
                            format!("{prev} points before the first record"),
                        ));
                    }
                },
            };
        }
        if stats.records != self.state.records {
            return Err(corruption(
                HEADER_BYTES,
                "records",
                format!(
                    "replayed {}, the log holds {}",
                    stats.records, self.state.records
                ),
            ));
        }
        target.sync_data()?;
        Ok(stats)
    }

    /// Empties the log (truncate to the header, sync) so the next point starts short.
    /// Call it only after [`UndoLog::replay`] returned: the target is synced by then.
    /// A crash inside leaves the old log or the empty one; replaying either is exact.
    pub fn reset(&mut self) -> Result<(), ApplyError> {
        let r = (|| {
            self.file.set_len(HEADER_BYTES)?;
            self.file.sync_data()
        })();
        match r {
            Ok(()) => {
                self.state = Committed::empty();
                self.saved.clear();
                self.poisoned = false;
                Ok(())
            }
            Err(e) => {
                self.poisoned = true;
                Err(e.into())
            }
        }
    }

    /// Removes the log at commit: file removed, directory synced. The caller must have
    /// synced the target ([`sync_target`]) first; after this the overwrite is final.
    pub fn discard(self) -> Result<(), ApplyError> {
        let Self { fs, path, file, .. } = self;
        drop(file);
        fs.remove_file(&path)?;
        fs.sync_dir(dir_of(&path))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{CrashMode, RealFs, SimFs};
    use proptest::prelude::*;

    const SECTOR: u64 = crate::extent::SECTOR_BYTES;

    /// An extent with owned data, for building test workloads.
    #[derive(Clone, Debug)]
    enum Owned {
        Bytes(u64, Vec<u8>),
        Zero(u64, u64),
    }

    fn borrow(epoch: &[Owned]) -> Vec<(u64, ExtentData<'_>)> {
        epoch
            .iter()
            .map(|e| match e {
                Owned::Bytes(o, b) => (*o, ExtentData::Bytes(b)),
                Owned::Zero(o, n) => (*o, ExtentData::Zero(*n)),
            })
            .collect()
    }

    fn model_apply(model: &mut [u8], epoch: &[Owned]) {
        for e in epoch {
            match e {
                Owned::Bytes(o, b) => model[*o as usize..*o as usize + b.len()].copy_from_slice(b),
                Owned::Zero(o, n) => model[*o as usize..(*o + *n) as usize].fill(0),
            }
        }
    }

    /// Deterministic pseudo-random bytes (xorshift64*).
    fn rand_bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
            })
            .collect()
    }

    /// Builds epochs from (sector, sectors, is_zero, seed) tuples over a target of
    /// `sectors_total` sectors.
    fn build_epochs(raw: &[Vec<(u64, u64, bool, u64)>], sectors_total: u64) -> Vec<Vec<Owned>> {
        raw.iter()
            .map(|ep| {
                ep.iter()
                    .map(|&(s, n, zero, seed)| {
                        let s = s % sectors_total;
                        let n = n.clamp(1, sectors_total - s);
                        if zero {
                            Owned::Zero(s * SECTOR, n * SECTOR)
                        } else {
                            Owned::Bytes(s * SECTOR, rand_bytes(seed, (n * SECTOR) as usize))
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// How many of `epochs` save old contents (one batch each): those with a sector no
    /// earlier extent (of an earlier epoch, or earlier in the same one) covered.
    fn saving_epochs(epochs: &[Vec<Owned>], sectors_total: u64) -> usize {
        let mut covered = vec![false; sectors_total as usize];
        epochs
            .iter()
            .filter(|ep| {
                let mut saves = false;
                for e in ep.iter() {
                    let (o, n) = match e {
                        Owned::Bytes(o, b) => (*o, b.len() as u64),
                        Owned::Zero(o, n) => (*o, *n),
                    };
                    for c in &mut covered[(o / SECTOR) as usize..((o + n) / SECTOR) as usize] {
                        saves |= !*c;
                        *c = true;
                    }
                }
                saves
            })
            .count()
    }

    /// The models: `models[i]` is the target after epochs `0..i`.
    fn models(base: &[u8], epochs: &[Vec<Owned>]) -> Vec<Vec<u8>> {
        let mut out = vec![base.to_vec()];
        for ep in epochs {
            let mut m = out[out.len() - 1].clone();
            model_apply(&mut m, ep);
            out.push(m);
        }
        out
    }

    fn dir() -> PathBuf {
        PathBuf::from("/d")
    }
    fn replica_path() -> PathBuf {
        dir().join("replica")
    }
    fn undo_path() -> PathBuf {
        dir().join("undo")
    }

    /// A base image with zero runs (so ZERO records appear) and random data.
    fn base_image(seed: u64, bytes: usize) -> Vec<u8> {
        let mut b = rand_bytes(seed, bytes);
        let quarter = bytes / 4 / SECTOR as usize * SECTOR as usize;
        b[quarter..2 * quarter].fill(0);
        b
    }

    /// A SimFs with a durable replica holding `base`.
    fn sim_with_replica(base: &[u8]) -> SimFs {
        let fs = SimFs::new();
        fs.create_dir_all(&dir()).unwrap();
        let f = fs.open(&replica_path(), OpenMode::Create).unwrap();
        f.write_all_at(base, 0).unwrap();
        f.sync_data().unwrap();
        fs.sync_dir(&dir()).unwrap();
        fs
    }

    fn read_all(f: &dyn StorageFile, n: u64) -> Vec<u8> {
        let mut b = vec![0u8; n as usize];
        f.read_exact_at(&mut b, 0).unwrap();
        b
    }

    fn arc(fs: &SimFs) -> Arc<dyn Storage> {
        Arc::new(fs.clone())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Proves applying up to any point with undo gives the model at that point,
        /// replay gives the base back, and applying another point afterwards (with a
        /// reset or an appended log) gives that point and replays to the base again.
        #[test]
        fn apply_replay_repoint_matches_model(
            base_seed in any::<u64>(),
            raw in prop::collection::vec(
                prop::collection::vec((0u64..64, 1u64..20, any::<bool>(), any::<u64>()), 1..5),
                1..6),
            i in any::<prop::sample::Index>(),
            j in any::<prop::sample::Index>(),
            reset in any::<bool>(),
        ) {
            let sectors = 64;
            let target_bytes = sectors * SECTOR;
            let base = base_image(base_seed, target_bytes as usize);
            let epochs = build_epochs(&raw, sectors);
            let models = models(&base, &epochs);
            let i = i.index(models.len());
            let j = j.index(models.len());

            let fs = sim_with_replica(&base);
            let target = fs.open(&replica_path(), OpenMode::Existing).unwrap();
            let mut undo = UndoLog::create(arc(&fs), &undo_path(), target_bytes).unwrap();
            for ep in &epochs[..i] {
                let st = apply_extents(target.as_ref(), target_bytes, &borrow(ep), Some(&mut undo)).unwrap();
                prop_assert_eq!(st.extents, ep.len() as u64);
            }
            // A batch only where an epoch overwrites something no record saved yet.
            prop_assert_eq!(undo.batches() as usize, saving_epochs(&epochs[..i], sectors));
            prop_assert_eq!(read_all(target.as_ref(), target_bytes), models[i].clone());

            let st = undo.replay(target.as_ref()).unwrap();
            prop_assert_eq!(st.records, undo.records());
            prop_assert_eq!(read_all(target.as_ref(), target_bytes), base.clone());
            // Replay is idempotent.
            undo.replay(target.as_ref()).unwrap();
            prop_assert_eq!(read_all(target.as_ref(), target_bytes), base.clone());

            if reset {
                undo.reset().unwrap();
                prop_assert_eq!(undo.records(), 0);
            }
            for ep in &epochs[..j] {
                apply_extents(target.as_ref(), target_bytes, &borrow(ep), Some(&mut undo)).unwrap();
            }
            sync_target(target.as_ref()).unwrap();
            prop_assert_eq!(read_all(target.as_ref(), target_bytes), models[j].clone());

            // The log reopens to the same records, and still replays to the base.
            drop(undo);
            let (undo, rec) = UndoLog::open(arc(&fs), &undo_path()).unwrap();
            prop_assert_eq!(rec.cut_bytes, 0);
            undo.replay(target.as_ref()).unwrap();
            prop_assert_eq!(fs.durable_contents(&replica_path()).unwrap(), base);
        }
    }

    /// Runs the failback workload: epochs `0..k` applied with undo, target synced,
    /// undo discarded (commit).
    fn workload(fs: &SimFs, epochs: &[Vec<Owned>], target_bytes: u64) -> Result<(), ApplyError> {
        let target = fs.open(&replica_path(), OpenMode::Existing)?;
        let (mut undo, _) = UndoLog::open(arc(fs), &undo_path())?;
        for ep in epochs {
            apply_extents(target.as_ref(), target_bytes, &borrow(ep), Some(&mut undo))?;
        }
        sync_target(target.as_ref())?;
        undo.discard()
    }

    /// The recovery after a crash: if the undo log exists, open it, replay it (the
    /// target must then be the base), reset it and run the workload again; if it is
    /// gone, the commit happened and the target must already be at the point.
    fn recover(
        fs: &SimFs,
        epochs: &[Vec<Owned>],
        base: &[u8],
        point: &[u8],
        target_bytes: u64,
    ) -> Result<(), ApplyError> {
        let target = fs.open(&replica_path(), OpenMode::Existing)?;
        if !fs.exists(&undo_path()) {
            assert_eq!(read_all(target.as_ref(), target_bytes), point, "committed");
            return Ok(());
        }
        let (mut undo, _) = UndoLog::open(arc(fs), &undo_path())?;
        undo.replay(target.as_ref())?;
        assert_eq!(
            read_all(target.as_ref(), target_bytes),
            base,
            "after replay"
        );
        undo.reset()?;
        drop(undo);
        workload(fs, epochs, target_bytes)
    }

    /// Proves a crash at every durability step of a failback (torn writes, several
    /// seeds), and again at every step of the recovery (including during replay),
    /// always ends, after a full recovery, at exactly the chosen point, with the base
    /// restored by every replay on the way.
    #[test]
    fn crash_at_every_step_recovers_exactly() {
        let sectors = 32;
        let target_bytes = sectors * SECTOR;
        let base = base_image(7, target_bytes as usize);
        let raw = vec![
            vec![(0, 4, false, 1), (2, 6, true, 2), (20, 3, false, 3)],
            vec![(3, 10, false, 4), (0, 1, false, 5)],
            vec![(8, 8, true, 6), (1, 30, false, 7)],
            vec![(5, 2, false, 8)],
        ];
        let epochs = build_epochs(&raw, sectors);
        let point = models(&base, &epochs).pop().unwrap();

        let setup = || {
            let fs = sim_with_replica(&base);
            UndoLog::create(arc(&fs), &undo_path(), target_bytes).unwrap();
            fs
        };
        let fs = setup();
        let before = fs.steps();
        workload(&fs, &epochs, target_bytes).unwrap();
        let workload_steps = fs.steps() - before;
        // One undo sync per call that saves something (the last one overwrites only
        // sectors saved before), the target sync, the removal and the directory sync.
        assert_eq!(saving_epochs(&epochs, sectors), epochs.len() - 1);
        assert_eq!(workload_steps, saving_epochs(&epochs, sectors) as u64 + 3);

        let mut runs = 0;
        for step in 1..=workload_steps {
            for seed in 0..4u64 {
                let mut step2 = 1;
                loop {
                    let fs = setup();
                    fs.crash_after(step);
                    assert!(workload(&fs, &epochs, target_bytes).is_err());
                    fs.crash(CrashMode::Torn { seed });
                    // Crash the recovery itself at its step `step2`.
                    fs.crash_after(step2);
                    let r = recover(&fs, &epochs, &base, &point, target_bytes);
                    let crashed = fs.is_frozen();
                    if !crashed {
                        r.unwrap();
                    }
                    fs.crash(CrashMode::Torn {
                        seed: seed.wrapping_mul(31) + step2,
                    });
                    recover(&fs, &epochs, &base, &point, target_bytes)
                        .unwrap_or_else(|e| panic!("step {step} seed {seed} step2 {step2}: {e}"));
                    assert_eq!(
                        fs.durable_contents(&replica_path()).unwrap(),
                        point,
                        "step {step} seed {seed} step2 {step2}"
                    );
                    assert!(fs.durable_contents(&undo_path()).is_none());
                    runs += 1;
                    if !crashed {
                        break;
                    }
                    step2 += 1;
                }
            }
        }
        assert!(
            runs > workload_steps * 4 * 3,
            "recovery steps were crashed too"
        );
    }

    /// Proves a crash during replay (torn target writes), then replay again, gives
    /// exactly the base.
    #[test]
    fn crash_during_replay_then_replay_is_exact() {
        let sectors = 16;
        let target_bytes = sectors * SECTOR;
        let base = base_image(3, target_bytes as usize);
        let epochs = build_epochs(
            &[
                vec![(0, 12, false, 9)],
                vec![(4, 4, true, 0), (2, 3, false, 10), (10, 6, false, 11)],
            ],
            sectors,
        );
        for seed in 0..16 {
            let fs = sim_with_replica(&base);
            let target = fs.open(&replica_path(), OpenMode::Existing).unwrap();
            let mut undo = UndoLog::create(arc(&fs), &undo_path(), target_bytes).unwrap();
            for ep in &epochs {
                apply_extents(target.as_ref(), target_bytes, &borrow(ep), Some(&mut undo)).unwrap();
            }
            sync_target(target.as_ref()).unwrap();
            fs.crash_after(1);
            assert!(undo.replay(target.as_ref()).is_err());
            fs.crash(CrashMode::Torn { seed });
            let target = fs.open(&replica_path(), OpenMode::Existing).unwrap();
            let (undo, rec) = UndoLog::open(arc(&fs), &undo_path()).unwrap();
            assert_eq!(rec.cut_bytes, 0);
            assert_eq!(rec.batches, 2);
            undo.replay(target.as_ref()).unwrap();
            assert_eq!(
                fs.durable_contents(&replica_path()).unwrap(),
                base,
                "seed {seed}"
            );
        }
    }

    /// Proves old contents are saved once per log: a call whose ranges an earlier record
    /// holds saves only the rest, one that is wholly saved writes and syncs nothing; a
    /// reopened log remembers the ranges of its complete batches, not those of a batch
    /// a crash cut; and replay still ends exactly at the base.
    #[test]
    fn old_contents_are_saved_once() {
        let sectors = 32;
        let target_bytes = sectors * SECTOR;
        let base = base_image(21, target_bytes as usize);
        let fs = sim_with_replica(&base);
        let target = fs.open(&replica_path(), OpenMode::Existing).unwrap();
        let mut undo = UndoLog::create(arc(&fs), &undo_path(), target_bytes).unwrap();
        let epochs = build_epochs(
            &[
                vec![(0, 8, false, 1)],
                // Sectors 8..12 are new; 4..8 and 2..4 were saved by the first call.
                vec![(4, 8, false, 2), (2, 2, true, 3)],
                vec![(1, 10, false, 4)],
                vec![(20, 4, false, 5)],
            ],
            sectors,
        );
        let apply = |undo: &mut UndoLog, ep: &[Owned]| {
            apply_extents(target.as_ref(), target_bytes, &borrow(ep), Some(undo))
        };
        let st = apply(&mut undo, &epochs[0]).unwrap();
        assert_eq!((st.undo_records, st.undo_skipped_bytes), (1, 0));
        let st = apply(&mut undo, &epochs[1]).unwrap();
        assert_eq!((st.undo_records, st.undo_skipped_bytes), (1, 6 * SECTOR));
        assert_eq!(undo.saved_bytes(), 12 * SECTOR);
        let steps = fs.steps();
        let st = apply(&mut undo, &epochs[2]).unwrap();
        assert_eq!(
            (st.undo_records, st.undo_file_bytes, st.undo_skipped_bytes),
            (0, 0, 10 * SECTOR)
        );
        assert_eq!(fs.steps(), steps, "a wholly saved call syncs nothing");
        assert_eq!(undo.batches(), 2);
        sync_target(target.as_ref()).unwrap();
        // The fourth call crashes at its undo sync: its batch is cut on reopen.
        fs.crash_after(1);
        assert!(apply(&mut undo, &epochs[3]).is_err());
        fs.crash(CrashMode::Torn { seed: 1 });
        let (mut undo, rec) = UndoLog::open(arc(&fs), &undo_path()).unwrap();
        assert_eq!(rec.batches, 2);
        let target = fs.open(&replica_path(), OpenMode::Existing).unwrap();
        let apply = |undo: &mut UndoLog, ep: &[Owned]| {
            apply_extents(target.as_ref(), target_bytes, &borrow(ep), Some(undo))
        };
        assert_eq!(apply(&mut undo, &epochs[2]).unwrap().undo_records, 0);
        assert_eq!(apply(&mut undo, &epochs[3]).unwrap().undo_records, 1);
        assert_eq!(
            read_all(target.as_ref(), target_bytes),
            models(&base, &epochs).pop().unwrap()
        );
        undo.replay(target.as_ref()).unwrap();
        assert_eq!(fs.durable_contents(&replica_path()).unwrap(), base);
        // After a reset nothing counts as saved any more.
        undo.reset().unwrap();
        assert_eq!(apply(&mut undo, &epochs[2]).unwrap().undo_records, 1);
    }

    /// Checks that an [`ExtentError`] is the expected case.
    type IsRight = fn(&ExtentError) -> bool;

    /// Proves misaligned, empty, out-of-range and overflowing extents are refused with
    /// the right error before anything is written or synced.
    #[test]
    fn bad_extents_change_nothing() {
        let target_bytes = 16 * SECTOR;
        let base = base_image(5, target_bytes as usize);
        let fs = sim_with_replica(&base);
        let target = fs.open(&replica_path(), OpenMode::Existing).unwrap();
        let mut undo = UndoLog::create(arc(&fs), &undo_path(), target_bytes).unwrap();
        let good = vec![0xAAu8; 1024];
        let odd = vec![0xBBu8; 513];
        let cases: Vec<(ExtentData<'_>, u64, IsRight)> = vec![
            (ExtentData::Bytes(&good), 100, |e| {
                matches!(e, ExtentError::MisalignedOffset { .. })
            }),
            (ExtentData::Bytes(&odd), 0, |e| {
                matches!(e, ExtentError::MisalignedLength { .. })
            }),
            (ExtentData::Zero(0), 512, |e| {
                matches!(e, ExtentError::Empty { .. })
            }),
            (ExtentData::Zero(1024), target_bytes - 512, |e| {
                matches!(e, ExtentError::OutOfRange { .. })
            }),
            (ExtentData::Bytes(&good), target_bytes, |e| {
                matches!(e, ExtentError::OutOfRange { .. })
            }),
            (ExtentData::Zero(1024), u64::MAX - 511, |e| {
                matches!(e, ExtentError::OutOfRange { .. })
            }),
        ];
        for (k, (data, offset, is_right)) in cases.into_iter().enumerate() {
            let extents = [(0, ExtentData::Bytes(&good)), (offset, data)];
            for with_undo in [false, true] {
                let steps = fs.steps();
                let r = apply_extents(
                    target.as_ref(),
                    target_bytes,
                    &extents,
                    if with_undo { Some(&mut undo) } else { None },
                );
                match r {
                    Err(ApplyError::BadExtent { index: 1, source }) => {
                        assert!(is_right(&source), "case {k}: {source}")
                    }
                    other => panic!("case {k}: {other:?}"),
                }
                assert_eq!(fs.steps(), steps, "case {k}: nothing synced");
                assert_eq!(read_all(target.as_ref(), target_bytes), base, "case {k}");
                assert_eq!(undo.records(), 0);
                assert_eq!(
                    fs.open(&undo_path(), OpenMode::ReadOnly)
                        .unwrap()
                        .len()
                        .unwrap(),
                    HEADER_BYTES
                );
            }
        }
    }

    /// Proves an undo log made for another target size is refused before any write.
    #[test]
    fn target_size_mismatch_is_refused() {
        let base = base_image(1, 8 * 512);
        let fs = sim_with_replica(&base);
        let target = fs.open(&replica_path(), OpenMode::Existing).unwrap();
        let mut undo = UndoLog::create(arc(&fs), &undo_path(), 16 * 512).unwrap();
        let r = apply_extents(
            target.as_ref(),
            8 * 512,
            &[(0, ExtentData::Zero(512))],
            Some(&mut undo),
        );
        assert!(matches!(
            r,
            Err(ApplyError::TargetMismatch {
                undo_target_bytes: 8192,
                target_bytes: 4096
            })
        ));
        assert_eq!(read_all(target.as_ref(), 8 * 512), base);
    }

    /// Proves one call with undo costs exactly one sync (of the undo log) and a call
    /// without undo none, whatever the number of extents.
    #[test]
    fn one_undo_sync_per_call() {
        let target_bytes = 64 * SECTOR;
        let fs = sim_with_replica(&base_image(2, target_bytes as usize));
        let target = fs.open(&replica_path(), OpenMode::Existing).unwrap();
        let mut undo = UndoLog::create(arc(&fs), &undo_path(), target_bytes).unwrap();
        let epoch = build_epochs(&[(0..20).map(|s| (s * 3, 2, s % 3 == 0, s)).collect()], 64);
        let steps = fs.steps();
        let st = apply_extents(
            target.as_ref(),
            target_bytes,
            &borrow(&epoch[0]),
            Some(&mut undo),
        )
        .unwrap();
        assert_eq!(fs.steps(), steps + 1);
        assert_eq!(st.undo_records, 20);
        assert_eq!(st.extents, 20);
        assert_eq!(st.data_bytes + st.zero_bytes, 40 * SECTOR);
        let steps = fs.steps();
        apply_extents(target.as_ref(), target_bytes, &borrow(&epoch[0]), None).unwrap();
        assert_eq!(fs.steps(), steps);
        // An empty call records no batch.
        apply_extents(target.as_ref(), target_bytes, &[], Some(&mut undo)).unwrap();
        assert_eq!(undo.batches(), 1);
    }

    /// Proves extents longer than the record bound are split into bounded records,
    /// zero extents longer than the zero chunk are written whole, and replay restores
    /// the base.
    #[test]
    fn large_extents_split_into_bounded_records() {
        let target_bytes = 5 * u64::from(UNDO_RECORD_BYTES_MAX);
        let base = rand_bytes(11, target_bytes as usize);
        let fs = sim_with_replica(&base);
        let target = fs.open(&replica_path(), OpenMode::Existing).unwrap();
        let mut undo = UndoLog::create(arc(&fs), &undo_path(), target_bytes).unwrap();
        let big = rand_bytes(12, 2 * UNDO_RECORD_BYTES_MAX as usize + 1024);
        let zero_len = (ZERO_CHUNK_BYTES * 2 + 512) as u64;
        let zero_at = big.len() + 4096;
        let extents = [
            (512, ExtentData::Bytes(&big)),
            (zero_at as u64, ExtentData::Zero(zero_len)),
        ];
        let st = apply_extents(target.as_ref(), target_bytes, &extents, Some(&mut undo)).unwrap();
        assert_eq!(st.undo_records, 3 + 3);
        let mut model = base.clone();
        model[512..512 + big.len()].copy_from_slice(&big);
        model[zero_at..zero_at + zero_len as usize].fill(0);
        assert_eq!(read_all(target.as_ref(), target_bytes), model);
        undo.replay(target.as_ref()).unwrap();
        assert_eq!(read_all(target.as_ref(), target_bytes), base);
    }

    /// Builds a synced undo log of three batches over a random base; returns its bytes,
    /// the file size after each batch and the records after each batch.
    fn three_batch_log() -> (Vec<u8>, Vec<u64>, Vec<u64>, u64) {
        let sectors = 16;
        let target_bytes = sectors * SECTOR;
        let fs = sim_with_replica(&base_image(4, target_bytes as usize));
        let target = fs.open(&replica_path(), OpenMode::Existing).unwrap();
        let mut undo = UndoLog::create(arc(&fs), &undo_path(), target_bytes).unwrap();
        let epochs = build_epochs(
            &[
                vec![(0, 2, false, 1), (4, 1, true, 2)],
                vec![(5, 3, false, 3)],
                vec![(1, 2, false, 4), (12, 1, false, 5), (4, 2, true, 6)],
            ],
            sectors,
        );
        let (mut ends, mut recs) = (vec![HEADER_BYTES], vec![0]);
        for ep in &epochs {
            apply_extents(target.as_ref(), target_bytes, &borrow(ep), Some(&mut undo)).unwrap();
            ends.push(undo.bytes());
            recs.push(undo.records());
        }
        (
            fs.durable_contents(&undo_path()).unwrap(),
            ends,
            recs,
            target_bytes,
        )
    }

    fn sim_with_file(bytes: &[u8]) -> SimFs {
        let fs = SimFs::new();
        fs.create_dir_all(&dir()).unwrap();
        let f = fs.open(&undo_path(), OpenMode::Create).unwrap();
        f.write_all_at(bytes, 0).unwrap();
        f.sync_data().unwrap();
        fs.sync_dir(&dir()).unwrap();
        fs
    }

    /// Proves every truncation of an undo log is an error (inside the header) or opens
    /// to exactly the complete batches before the cut, with the file cut there.
    #[test]
    fn every_truncation_is_error_or_batch_boundary() {
        let (bytes, ends, recs, _) = three_batch_log();
        for len in 0..=bytes.len() {
            let fs = sim_with_file(&bytes[..len]);
            let r = UndoLog::open(arc(&fs), &undo_path());
            if (len as u64) < HEADER_BYTES {
                assert!(
                    matches!(
                        r,
                        Err(ApplyError::Corruption {
                            field: "header",
                            ..
                        })
                    ),
                    "len {len}"
                );
                continue;
            }
            let (undo, rec) = r.unwrap_or_else(|e| panic!("len {len}: {e}"));
            let k = ends.iter().rposition(|&e| e <= len as u64).unwrap();
            assert_eq!(undo.records(), recs[k], "len {len}");
            assert_eq!(undo.bytes(), ends[k], "len {len}");
            assert_eq!(rec.cut_bytes, len as u64 - ends[k], "len {len}");
            assert_eq!(
                fs.durable_contents(&undo_path()).unwrap().len() as u64,
                ends[k]
            );
        }
    }

    /// Proves a bit flip in the header or in any batch but the last is a typed error,
    /// and one in the last batch cuts exactly that batch.
    #[test]
    fn bit_flips_are_errors_or_cut_the_last_batch() {
        let (bytes, ends, recs, _) = three_batch_log();
        let last_start = ends[ends.len() - 2];
        for byte in 0..bytes.len() {
            let bit = (byte * 5 % 8) as u8;
            let fs = sim_with_file(&bytes);
            fs.flip_bit(&undo_path(), byte, bit);
            let r = UndoLog::open(arc(&fs), &undo_path());
            if (byte as u64) < HEADER_BYTES {
                assert!(
                    matches!(
                        r,
                        Err(ApplyError::Corruption { .. } | ApplyError::UnsupportedVersion(_))
                    ),
                    "byte {byte}: {r:?}"
                );
            } else if (byte as u64) < last_start {
                assert!(
                    matches!(r, Err(ApplyError::Corruption { .. })),
                    "byte {byte}: {r:?}"
                );
            } else {
                let (undo, rec) = r.unwrap_or_else(|e| panic!("byte {byte}: {e}"));
                assert_eq!(undo.records(), recs[recs.len() - 2], "byte {byte}");
                assert!(rec.damaged_at_bytes.is_some());
                assert_eq!(rec.cut_bytes, bytes.len() as u64 - last_start);
            }
        }
    }

    /// Proves random bytes, a valid header followed by random bytes, and a valid log
    /// followed by random bytes never panic: the first two give errors or empty logs,
    /// the last keeps every complete batch.
    #[test]
    fn random_bytes_never_panic() {
        let (log, ends, recs, target_bytes) = three_batch_log();
        for i in 0..600u64 {
            let noise = rand_bytes(0xF00D + i, (i as usize * 37) % 3000);
            let bytes = match i % 3 {
                0 => noise,
                1 => [encode_header(target_bytes).as_slice(), &noise].concat(),
                _ => [log.as_slice(), &noise].concat(),
            };
            let fs = sim_with_file(&bytes);
            match (i % 3, UndoLog::open(arc(&fs), &undo_path())) {
                (0, r) => assert!(r.is_err() || r.unwrap().0.records() == 0, "case {i}"),
                (1, r) => assert_eq!(r.unwrap().0.records(), 0, "case {i}"),
                (_, r) => {
                    let (undo, _) = r.unwrap_or_else(|e| panic!("case {i}: {e}"));
                    assert_eq!(undo.records(), recs[recs.len() - 1]);
                    assert_eq!(undo.bytes(), ends[ends.len() - 1]);
                }
            }
        }
    }

    /// Proves a record whose crc checks but whose batch is out of sequence (which no
    /// torn write can produce) is corruption, naming the field.
    #[test]
    fn crc_valid_record_with_wrong_batch_is_corruption() {
        let (mut bytes, ends, _, _) = three_batch_log();
        let at = ends[1] as usize; // first record of batch 2
        bytes[at + 4..at + 8].copy_from_slice(&7u32.to_le_bytes());
        let crc = crc32fast::hash(&bytes[at..at + RECORD_HEADER_CRC_OFFSET]);
        bytes[at + RECORD_HEADER_CRC_OFFSET..at + RECORD_HEADER_BYTES]
            .copy_from_slice(&crc.to_le_bytes());
        let fs = sim_with_file(&bytes);
        let r = UndoLog::open(arc(&fs), &undo_path());
        assert!(
            matches!(r, Err(ApplyError::Corruption { field: "batch", .. })),
            "{r:?}"
        );
    }

    /// Proves the header layout is frozen: version 1 encodes to these exact bytes.
    #[test]
    fn header_golden_bytes() {
        let h = encode_header(0x0102_0304_0506_0708);
        let mut want = [0u8; 32];
        want[0..4].copy_from_slice(b"BRUL");
        want[4] = 1;
        want[8..16].copy_from_slice(&[8, 7, 6, 5, 4, 3, 2, 1]);
        let crc = crc32fast::hash(&want[..28]);
        want[28..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(h, want);
        assert_eq!(decode_header(&h).unwrap(), 0x0102_0304_0506_0708);
        let mut v2 = h;
        v2[4] = 2;
        assert!(matches!(
            decode_header(&v2),
            Err(ApplyError::UnsupportedVersion(2))
        ));
    }

    /// Proves the real file system path: apply with undo, replay, discard removes the
    /// file.
    #[test]
    fn real_fs_apply_replay_discard() {
        let tmp = tempfile::tempdir().unwrap();
        let fs: Arc<dyn Storage> = Arc::new(RealFs);
        let target_bytes = 32 * SECTOR;
        let base = base_image(8, target_bytes as usize);
        let rp = tmp.path().join("replica");
        let up = tmp.path().join("undo");
        let target = fs.open(&rp, OpenMode::Create).unwrap();
        target.write_all_at(&base, 0).unwrap();
        let mut undo = UndoLog::create(fs.clone(), &up, target_bytes).unwrap();
        let data = rand_bytes(9, 4096);
        apply_extents(
            target.as_ref(),
            target_bytes,
            &[
                (1024, ExtentData::Bytes(&data)),
                (0, ExtentData::Zero(2048)),
            ],
            Some(&mut undo),
        )
        .unwrap();
        sync_target(target.as_ref()).unwrap();
        assert_ne!(read_all(target.as_ref(), target_bytes), base);
        undo.replay(target.as_ref()).unwrap();
        assert_eq!(read_all(target.as_ref(), target_bytes), base);
        undo.discard().unwrap();
        assert!(!up.exists());
    }

    /// Proves the undo log of a sparse replica: a range is taken for a hole only where
    /// no data lies, written back or still in the cache (never where data is, which
    /// would lose it on a change of point), and a replay brings back every byte, data
    /// and holes alike.
    #[test]
    fn sparse_replica_holes_are_saved_without_reading() {
        const MIB: u64 = 1 << 20;
        let tmp = tempfile::tempdir().unwrap();
        let fs: Arc<dyn Storage> = Arc::new(RealFs);
        let target_bytes = 16 * MIB;
        let rp = tmp.path().join("replica");
        let target = fs.open(&rp, OpenMode::Create).unwrap();
        target.set_len(target_bytes).unwrap();
        // Data in a few places, synced or only in the cache.
        let old = [
            (MIB, rand_bytes(1, 64 << 10)),
            (5 * MIB + 4096, rand_bytes(2, 4096)),
            (8 * MIB - 512, rand_bytes(3, 512)),
        ];
        target.write_all_at(&old[0].1, old[0].0).unwrap();
        target.sync_data().unwrap();
        for (at, d) in &old[1..] {
            target.write_all_at(d, *at).unwrap();
        }
        let before = read_all(target.as_ref(), target_bytes);
        for (at, d) in &old {
            let len = d.len() as u64;
            assert!(!target.is_hole(*at, len).unwrap(), "data at {at}");
            assert!(
                !target.is_hole(at - 4096, 8192).unwrap(),
                "data in [{at}-4096, +8192)"
            );
        }
        // On the file systems whose SEEK_DATA is trusted (the temp dir's, on this
        // project's machines and CI) the never-written ranges are holes; elsewhere no
        // range is, and everything is read.
        let trusted = {
            use std::os::unix::ffi::OsStrExt;
            let c = std::ffi::CString::new(tmp.path().as_os_str().as_bytes()).unwrap();
            // SAFETY: zeros are a valid `statfs`.
            let mut st: libc::statfs = unsafe { std::mem::zeroed() };
            // SAFETY: statfs fills the struct we own from a C string we own.
            let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
            #[allow(clippy::unnecessary_cast)]
            let kind = st.f_type as i64;
            r == 0 && crate::storage::SEEK_DATA_TRUSTED.contains(&kind)
        };
        for (at, len) in [
            (0, MIB),
            (2 * MIB, 3 * MIB),
            (9 * MIB, 7 * MIB),
            (target_bytes, 4096),
        ] {
            assert_eq!(target.is_hole(at, len).unwrap(), trusted, "[{at}, +{len})");
            if at < target_bytes {
                assert!(
                    before[at as usize..(at + len) as usize]
                        .iter()
                        .all(|&b| b == 0)
                );
            }
        }

        let up = tmp.path().join("undo");
        let mut undo = UndoLog::create(fs.clone(), &up, target_bytes).unwrap();
        let new = rand_bytes(4, (2 * MIB) as usize);
        apply_extents(
            target.as_ref(),
            target_bytes,
            &[
                (0, ExtentData::Bytes(&new)),
                (4 * MIB, ExtentData::Bytes(&new)),
                (7 * MIB, ExtentData::Bytes(&new[..MIB as usize])),
            ],
            Some(&mut undo),
        )
        .unwrap();
        sync_target(target.as_ref()).unwrap();
        undo.replay(target.as_ref()).unwrap();
        assert_eq!(read_all(target.as_ref(), target_bytes), before);
    }
}
