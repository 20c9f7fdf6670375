//! The persistent dirty bitmap of one disk, with a DRBD-style log of hot regions.
//!
//! This module owns two files in a disk's state directory:
//!
//! - [`BITMAP_FILE`]: one bit per [`BLOCK_BYTES`] block of the disk, set before a write
//!   reaches the backing disk and cleared once the master target acked that block's
//!   data. It is memory-mapped (through [`Storage::map_mut`]) and mostly *not* synced:
//!   setting a bit costs a memory store.
//! - [`LOG_FILE`]: the **hot-region log** (DRBD calls it the activity log). The disk is
//!   cut into regions of `region_bytes` (default [`REGION_BYTES`]); at most
//!   `hot_regions_max` of them are *hot*. The set of hot regions is durable: every
//!   change to it is one small synced write. After a crash every block of every hot
//!   region counts as dirty, so bits inside hot regions never need a sync.
//!
//! The price of a write into a cold region is one `sync_data` of 4 KiB; a write into a
//! hot region costs nothing durable. One call to [`Bitmap::mark`] shares that sync among
//! all of its extents: the process server queues the marks of concurrent writes and
//! marks each queue with one call (`GroupTracker::before_writes`, the group commit).
//! A full hot set evicts an eighth of its capacity at once ([`EVICT_BATCH_DIVISOR`])
//! with one flush per cluster of victims, so the next cold marks pay only their log
//! sync. Random 64 KiB writes spread over more regions than the hot set holds (5% of a
//! 2 GiB disk's blocks: 1638 writes, 16 in flight, over 512 regions) became durable at
//! the master target in 2.5-3.4 s with both, 5.1-7.5 s before (one log sync per cold
//! write plus one eviction flush each); `cargo run --release --bin bench -- --size 2G
//! --only incremental,memory`, a shared, noisy 2-core machine.
//!
//! # Protocol (the numbered rules the code keeps)
//!
//! 1. **Mark before write.** A block may be written to the backing disk only after its
//!    bit is set in the map *and* its region is in the durable hot set.
//!    [`Bitmap::mark`] adds all regions its extents touch that are not hot in ONE log
//!    transaction (one `sync_data`), then sets the bits in the map without a sync.
//! 2. **Flush before evict.** When the hot set is full, the least recently marked
//!    regions not touched by the mark are evicted, at least `hot_regions_max /`
//!    [`EVICT_BATCH_DIVISOR`] of them: first the bitmap bytes holding the evicted
//!    regions' bits are flushed (`msync` through [`MappedFile::flush_range`]; victims'
//!    ranges at most [`FLUSH_JOIN_GAP_BYTES`] apart are flushed as one range, which
//!    makes the hot bits between them durable early, as writeback may), then the log
//!    transaction without them is written and synced.
//! 3. **Clear lazily.** [`Bitmap::clear`] clears the bits of blocks wholly inside an
//!    extent; the caller guarantees the target acked their data and no later write to
//!    them is pending. No sync: a lost clear only causes extra resync.
//! 4. **Recover conservatively.** [`Bitmap::open`] validates the header (typed errors
//!    naming the field), reads the log (the valid slot with the highest `seq` wins; a
//!    torn slot is ignored because the one before it is untouched), sets every bit of
//!    every recovered hot region, bumps `generation`, flushes the whole map, and only
//!    then writes an empty hot set (the recovered dirt now lives in the bitmap itself,
//!    so a later crash need not dirty those regions again).
//! 5. **Clean shutdown.** [`Bitmap::flush`] flushes the whole map, then writes an empty
//!    hot set, so the next open adds no dirt of its own.
//! 6. **Fail stop.** An error in any durability step poisons the [`Bitmap`]: after a
//!    failed sync the durable contents are unknown, so every later `mark` and `flush`
//!    returns [`BitmapError::Poisoned`]. The caller drops it and opens it again, which
//!    re-derives a safe state from what is on disk.
//!
//! **Invariant.** For every block with a write not yet acked by the target, at every
//! instant: its bit is durable in [`BITMAP_FILE`], or its region is in the hot set of
//! the newest valid log slot. Rule 1 establishes it (the write follows the sync), rule 2
//! moves a region from the second case to the first before the log forgets it, and a
//! log transaction that is torn by a crash only ever concerned regions that had no
//! write under them yet (added) or whose bits were already durable (evicted). Page
//! writeback the kernel does on its own may make any bit durable early; that only
//! ever writes the current bits, which are a superset of what must be dirty.
//!
//! # Order of writes and syncs
//!
//! | operation | order |
//! |-----------|-------|
//! | `create`  | bitmap file: set_len, header written, initial dirty bits written (all, or [`NewBitmap::mark`]'s, a window at a time), `sync_data` -> log file: set_len, slot of seq 1 (empty set), `sync_data` -> `sync_dir(dir)` -> `sync_dir` of its parent |
//! | `mark`    | (hot set full) evicted regions' bits flushed (one `flush_range` per joined span of victims) -> log slot written, `sync_data` -> bits set in the map |
//! | `clear`   | bits cleared in the map (no sync) |
//! | `open`    | header and log read and checked -> recovered regions' bits set, generation bumped -> whole map flushed -> (if any region was recovered) empty log slot, `sync_data` |
//! | `flush`   | whole map flushed -> (if the hot set was not empty) empty log slot, `sync_data` |
//!
//! # Bitmap file, version 1 (all integers little-endian)
//!
//! A 4096-byte header, then the bits: bit `b % 8` of byte `HEADER_BYTES + b / 8` is the
//! bit of block `b` (so bit `b % 64` of the little-endian `u64` word `b / 64`). The bits
//! are padded with zeros to whole `u64` words; the file length is exactly
//! [`bitmap_file_bytes`]`(disk_bytes)`. A 1 TiB disk needs 32 MiB + 4 KiB.
//!
//! | offset | size | field             | meaning                                                   |
//! |-------:|-----:|-------------------|-----------------------------------------------------------|
//! | 0      | 4    | `magic`           | `b"BRBM"` ([`MAGIC`]); never modify                       |
//! | 4      | 2    | `version`         | [`VERSION`]; readers refuse versions they do not know     |
//! | 6      | 2    | `reserved0`       | must be 0                                                 |
//! | 8      | 8    | `disk_bytes`      | disk size, a multiple of 512, at most [`DISK_BYTES_MAX`]  |
//! | 16     | 4    | `block_bytes`     | [`BLOCK_BYTES`] (4096); anything else is refused          |
//! | 20     | 4    | `hot_regions_max` | capacity of the hot set, 1..=[`SLOT_REGIONS_MAX`]         |
//! | 24     | 8    | `region_bytes`    | region size: a multiple of [`REGION_BYTES_MIN`], at most [`REGION_BYTES_MAX`] |
//! | 32     | 8    | `generation`      | 1 at create, +1 at every open                             |
//! | 40     | 20   | `reserved1`       | must be 0                                                 |
//! | 60     | 4    | `crc32`           | crc32 (IEEE) of header bytes 0..60 followed by 64..4096   |
//! | 64     | 4032 | `reserved2`       | must be 0                                                 |
//!
//! Every field that ever changes lives in the first 512-byte sector, so a torn write of
//! the header page leaves either the old or the new header, both valid.
//!
//! # Hot-region log file, version 1
//!
//! [`LOG_SLOTS`] slots of [`SLOT_BYTES`], used round robin: the transaction with
//! sequence `seq` goes to slot `seq % LOG_SLOTS`. Each transaction holds the *whole*
//! hot set, so the newest valid slot alone says what is hot.
//!
//! | offset | size    | field       | meaning                                                   |
//! |-------:|--------:|-------------|-----------------------------------------------------------|
//! | 0      | 4       | `magic`     | `b"BRHL"` ([`LOG_MAGIC`]); never modify                   |
//! | 4      | 2       | `version`   | [`VERSION`]                                               |
//! | 6      | 2       | `reserved0` | must be 0                                                 |
//! | 8      | 8       | `seq`       | transaction sequence, from 1; `seq % LOG_SLOTS` is the slot |
//! | 16     | 4       | `count`     | number of hot regions, at most `hot_regions_max`          |
//! | 20     | 4       | `reserved1` | must be 0                                                 |
//! | 24     | 8*count | `regions`   | region numbers, strictly ascending, below the region count |
//! | ..     | ..      | padding     | zeros up to offset 4092                                   |
//! | 4092   | 4       | `crc32`     | crc32 (IEEE) of slot bytes 0..4092                        |
//!
//! **Recovery policy.** A slot whose crc does not match (never written, torn, or
//! damaged) is ignored. A slot whose crc matches but whose contents are wrong cannot
//! come from a torn write: that is a typed error, as is a log with no valid slot at all
//! (the caller may then create a new bitmap and resync the whole disk).

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::extent::{Extent, ExtentError, SECTOR_BYTES};
use crate::storage::{MappedFile, OpenMode, Storage, StorageFile};

/// The bitmap file magic. Never modify: it names the format on disk.
pub const MAGIC: [u8; 4] = *b"BRBM";
/// The hot-region log slot magic. Never modify: it names the format on disk.
pub const LOG_MAGIC: [u8; 4] = *b"BRHL";
/// The format version of both files, written and read by this code.
pub const VERSION: u16 = 1;

/// Bytes of disk tracked by one bit.
pub const BLOCK_BYTES: u64 = 4096;
/// Default region size: the unit of the hot set.
pub const REGION_BYTES: u64 = 4 << 20;
/// Smallest region: eight blocks, so that a region's bits are whole bytes of the map
/// and flushing them never touches a neighbour's byte.
pub const REGION_BYTES_MIN: u64 = 8 * BLOCK_BYTES;
/// Largest region.
pub const REGION_BYTES_MAX: u64 = 1 << 30;
/// Default capacity of the hot set.
pub const HOT_REGIONS_MAX: u32 = 256;
/// An eviction frees at least `hot_regions_max / EVICT_BATCH_DIVISOR` regions at once
/// (rule 2), one flush for all of them, so the cold marks after it need no eviction.
pub const EVICT_BATCH_DIVISOR: usize = 8;
/// Victims' bit ranges of the map at most this far apart are flushed as one range
/// (the bits of 2 GiB of disk per 64 KiB).
pub const FLUSH_JOIN_GAP_BYTES: usize = 64 << 10;
/// Largest disk a bitmap tracks (1 PiB: a 32 GiB bitmap).
pub const DISK_BYTES_MAX: u64 = 1 << 50;

/// Size of the bitmap file header.
pub const HEADER_BYTES: usize = 4096;
/// Size of one log slot.
pub const SLOT_BYTES: usize = 4096;
/// Number of log slots (at least 2, so a torn slot always leaves the previous one).
pub const LOG_SLOTS: u64 = 4;
/// Size of the hot-region log file.
pub const LOG_BYTES: u64 = LOG_SLOTS * SLOT_BYTES as u64;
/// Fixed part of a slot before the region numbers.
const SLOT_HEAD_BYTES: usize = 24;
/// Offset of the crc in a slot.
const SLOT_CRC_OFFSET: usize = SLOT_BYTES - 4;
/// The most region numbers that fit one slot: the hard bound on `hot_regions_max`.
pub const SLOT_REGIONS_MAX: u32 = ((SLOT_CRC_OFFSET - SLOT_HEAD_BYTES) / 8) as u32;
/// Offset of the crc in the bitmap header.
const HEADER_CRC_OFFSET: usize = 60;
/// Bytes of the header that hold fields (the rest is reserved zeros).
const HEADER_FIELDS_BYTES: usize = 64;

/// Name of the bitmap file in the disk's state directory.
pub const BITMAP_FILE: &str = "dirty.bitmap";
/// Name of the hot-region log file in the disk's state directory.
pub const LOG_FILE: &str = "dirty.hotlog";

const _: () = assert!(HEADER_CRC_OFFSET + 4 == HEADER_FIELDS_BYTES);
// Every changing header field sits in the first sector, so a header write cannot tear.
const _: () = assert!(HEADER_FIELDS_BYTES <= SECTOR_BYTES as usize);
const _: () = assert!(HEADER_BYTES as u64 == BLOCK_BYTES);
const _: () = assert!(SLOT_HEAD_BYTES + 8 * SLOT_REGIONS_MAX as usize <= SLOT_CRC_OFFSET);
const _: () = assert!(SLOT_REGIONS_MAX == 508);
const _: () = assert!(HOT_REGIONS_MAX <= SLOT_REGIONS_MAX);
const _: () = assert!(LOG_SLOTS >= 2);
const _: () =
    assert!(REGION_BYTES.is_multiple_of(REGION_BYTES_MIN) && REGION_BYTES <= REGION_BYTES_MAX);

/// What refused a bitmap operation. The corruption cases name the file and the field.
#[derive(Debug, Error)]
pub enum BitmapError {
    #[error("dirty bitmap: {op} failed: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{} already exists; refusing to overwrite a dirty bitmap", path.display())]
    Exists { path: PathBuf },
    #[error("{file} truncated: {field} needs {need} bytes, {got} present")]
    Truncated {
        file: &'static str,
        field: &'static str,
        need: u64,
        got: u64,
    },
    #[error("{file}: bad magic {found:02x?}")]
    BadMagic { file: &'static str, found: [u8; 4] },
    #[error("{file}: unsupported version {version} (this build reads version {VERSION})")]
    UnsupportedVersion { file: &'static str, version: u16 },
    #[error("{file}: crc mismatch: stored {stored:08x}, bytes give {actual:08x}")]
    CrcMismatch {
        file: &'static str,
        stored: u32,
        actual: u32,
    },
    #[error("{file}: reserved field {field} is not zero")]
    Reserved {
        file: &'static str,
        field: &'static str,
    },
    #[error("{file}: invalid {field}: {why}")]
    Invalid {
        file: &'static str,
        field: &'static str,
        why: String,
    },
    #[error("{file} is {actual} bytes, expected {expected}")]
    SizeMismatch {
        file: &'static str,
        expected: u64,
        actual: u64,
    },
    #[error("bitmap was made for a disk of {bitmap_disk_bytes} bytes, the disk has {disk_bytes}")]
    DiskSizeMismatch {
        bitmap_disk_bytes: u64,
        disk_bytes: u64,
    },
    #[error("hot-region log has no valid slot: the hot set is lost; recreate and resync")]
    NoValidLogSlot,
    #[error("invalid bitmap config {field}: {why}")]
    InvalidConfig { field: &'static str, why: String },
    #[error("bad extent: {0}")]
    BadExtent(#[from] ExtentError),
    #[error("one mark touches {regions} regions, above hot_regions_max {max}: split it")]
    TooManyRegions { regions: u64, max: u32 },
    #[error("dirty bitmap poisoned by an earlier failed durability step: reopen it")]
    Poisoned,
}

const BITMAP: &str = "bitmap file";
const LOG: &str = "hot-region log";

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> BitmapError {
    move |source| BitmapError::Io { op, source }
}

/// Region geometry and hot-set capacity, fixed at [`Bitmap::create`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapConfig {
    /// Size of a region, the unit of the hot set.
    pub region_bytes: u64,
    /// How many regions may be hot at once.
    pub hot_regions_max: u32,
}

impl Default for BitmapConfig {
    fn default() -> Self {
        Self {
            region_bytes: REGION_BYTES,
            hot_regions_max: HOT_REGIONS_MAX,
        }
    }
}

impl BitmapConfig {
    /// The field at fault and why, or `Ok`.
    fn check(&self) -> Result<(), (&'static str, String)> {
        let r = self.region_bytes;
        if !(REGION_BYTES_MIN..=REGION_BYTES_MAX).contains(&r)
            || !r.is_multiple_of(REGION_BYTES_MIN)
        {
            return Err((
                "region_bytes",
                format!(
                    "{r} is not a multiple of {REGION_BYTES_MIN} in {REGION_BYTES_MIN}..={REGION_BYTES_MAX}"
                ),
            ));
        }
        if !(1..=SLOT_REGIONS_MAX).contains(&self.hot_regions_max) {
            return Err((
                "hot_regions_max",
                format!("{} is not in 1..={SLOT_REGIONS_MAX}", self.hot_regions_max),
            ));
        }
        Ok(())
    }
}

fn check_disk_bytes(disk_bytes: u64) -> Result<(), String> {
    if disk_bytes == 0 || !disk_bytes.is_multiple_of(SECTOR_BYTES) || disk_bytes > DISK_BYTES_MAX {
        return Err(format!(
            "{disk_bytes} is not a non-zero multiple of {SECTOR_BYTES} up to {DISK_BYTES_MAX}"
        ));
    }
    Ok(())
}

/// Number of blocks (bits) of a disk; the last one may be partial.
pub fn block_count(disk_bytes: u64) -> u64 {
    disk_bytes.div_ceil(BLOCK_BYTES)
}

/// Exact length of the bitmap file of a disk: the header plus whole `u64` words of bits.
pub fn bitmap_file_bytes(disk_bytes: u64) -> u64 {
    HEADER_BYTES as u64 + block_count(disk_bytes).div_ceil(64) * 8
}

/// What a [`Bitmap::mark`] did durably.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MarkOutcome {
    /// Whether a log transaction was written and synced (some region was cold).
    pub log_synced: bool,
    /// Regions that became hot.
    pub regions_added: u32,
    /// Regions evicted to make room (their bits were flushed first).
    pub regions_evicted: u32,
}

// ---------------------------------------------------------------------------------------
// Byte helpers. Offsets are constants inside fixed-size buffers, so these cannot fail.

use crate::le::{u16_at as le_u16, u32_at as le_u32, u64_at as le_u64};
fn all_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

// ---------------------------------------------------------------------------------------
// The bitmap header.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    disk_bytes: u64,
    config: BitmapConfig,
    generation: u64,
}

fn header_crc(b: &[u8; HEADER_BYTES]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..HEADER_CRC_OFFSET]);
    h.update(&b[HEADER_FIELDS_BYTES..]);
    h.finalize()
}

fn encode_header(h: &Header) -> [u8; HEADER_BYTES] {
    let mut b = [0u8; HEADER_BYTES];
    b[0..4].copy_from_slice(&MAGIC);
    b[4..6].copy_from_slice(&VERSION.to_le_bytes());
    b[8..16].copy_from_slice(&h.disk_bytes.to_le_bytes());
    b[16..20].copy_from_slice(&(BLOCK_BYTES as u32).to_le_bytes());
    b[20..24].copy_from_slice(&h.config.hot_regions_max.to_le_bytes());
    b[24..32].copy_from_slice(&h.config.region_bytes.to_le_bytes());
    b[32..40].copy_from_slice(&h.generation.to_le_bytes());
    let crc = header_crc(&b);
    b[HEADER_CRC_OFFSET..HEADER_FIELDS_BYTES].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode_header(b: &[u8; HEADER_BYTES]) -> Result<Header, BitmapError> {
    let magic = [b[0], b[1], b[2], b[3]];
    if magic != MAGIC {
        return Err(BitmapError::BadMagic {
            file: BITMAP,
            found: magic,
        });
    }
    let version = le_u16(b, 4);
    if version != VERSION {
        return Err(BitmapError::UnsupportedVersion {
            file: BITMAP,
            version,
        });
    }
    let stored = le_u32(b, HEADER_CRC_OFFSET);
    let actual = header_crc(b);
    if stored != actual {
        return Err(BitmapError::CrcMismatch {
            file: BITMAP,
            stored,
            actual,
        });
    }
    for (field, range) in [
        ("reserved0", 6..8),
        ("reserved1", 40..HEADER_CRC_OFFSET),
        ("reserved2", HEADER_FIELDS_BYTES..HEADER_BYTES),
    ] {
        if !all_zero(&b[range]) {
            return Err(BitmapError::Reserved {
                file: BITMAP,
                field,
            });
        }
    }
    let block_bytes = le_u32(b, 16);
    if u64::from(block_bytes) != BLOCK_BYTES {
        return Err(BitmapError::Invalid {
            file: BITMAP,
            field: "block_bytes",
            why: format!("{block_bytes}, only {BLOCK_BYTES} is supported"),
        });
    }
    let disk_bytes = le_u64(b, 8);
    check_disk_bytes(disk_bytes).map_err(|why| BitmapError::Invalid {
        file: BITMAP,
        field: "disk_bytes",
        why,
    })?;
    let config = BitmapConfig {
        hot_regions_max: le_u32(b, 20),
        region_bytes: le_u64(b, 24),
    };
    config
        .check()
        .map_err(|(field, why)| BitmapError::Invalid {
            file: BITMAP,
            field,
            why,
        })?;
    Ok(Header {
        disk_bytes,
        config,
        generation: le_u64(b, 32),
    })
}

// ---------------------------------------------------------------------------------------
// Log slots.

fn slot_offset(seq: u64) -> u64 {
    (seq % LOG_SLOTS) * SLOT_BYTES as u64
}

/// Encodes a transaction; `regions` must be strictly ascending and fit a slot.
fn encode_slot(seq: u64, regions: &[u64]) -> [u8; SLOT_BYTES] {
    assert!(
        regions.len() <= SLOT_REGIONS_MAX as usize,
        "hot set exceeds a slot"
    );
    assert!(
        regions.windows(2).all(|w| w[0] < w[1]),
        "hot set not ascending"
    );
    let mut b = [0u8; SLOT_BYTES];
    b[0..4].copy_from_slice(&LOG_MAGIC);
    b[4..6].copy_from_slice(&VERSION.to_le_bytes());
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..20].copy_from_slice(&(regions.len() as u32).to_le_bytes());
    for (i, r) in regions.iter().enumerate() {
        let at = SLOT_HEAD_BYTES + 8 * i;
        b[at..at + 8].copy_from_slice(&r.to_le_bytes());
    }
    let crc = crc32fast::hash(&b[..SLOT_CRC_OFFSET]);
    b[SLOT_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes the slot at index `index`: `Ok(None)` when its crc does not match (never
/// written or torn: ignored by policy), the transaction when valid, an error when the
/// crc matches but the contents are wrong.
fn decode_slot(
    b: &[u8; SLOT_BYTES],
    index: u64,
    region_count: u64,
    hot_regions_max: u32,
) -> Result<Option<(u64, Vec<u64>)>, BitmapError> {
    if le_u32(b, SLOT_CRC_OFFSET) != crc32fast::hash(&b[..SLOT_CRC_OFFSET]) {
        return Ok(None);
    }
    let magic = [b[0], b[1], b[2], b[3]];
    if magic != LOG_MAGIC {
        return Err(BitmapError::BadMagic {
            file: LOG,
            found: magic,
        });
    }
    let version = le_u16(b, 4);
    if version != VERSION {
        return Err(BitmapError::UnsupportedVersion { file: LOG, version });
    }
    if le_u16(b, 6) != 0 {
        return Err(BitmapError::Reserved {
            file: LOG,
            field: "reserved0",
        });
    }
    if le_u32(b, 20) != 0 {
        return Err(BitmapError::Reserved {
            file: LOG,
            field: "reserved1",
        });
    }
    let seq = le_u64(b, 8);
    if seq == 0 || seq % LOG_SLOTS != index {
        return Err(BitmapError::Invalid {
            file: LOG,
            field: "seq",
            why: format!("{seq} does not belong in slot {index}"),
        });
    }
    let count = le_u32(b, 16);
    if count > hot_regions_max {
        return Err(BitmapError::Invalid {
            file: LOG,
            field: "count",
            why: format!("{count} is above hot_regions_max {hot_regions_max}"),
        });
    }
    let end = SLOT_HEAD_BYTES + 8 * count as usize;
    let mut regions = Vec::with_capacity(count as usize);
    for at in (SLOT_HEAD_BYTES..end).step_by(8) {
        let r = le_u64(b, at);
        if r >= region_count || regions.last().is_some_and(|&prev| prev >= r) {
            return Err(BitmapError::Invalid {
                file: LOG,
                field: "regions",
                why: format!("region {r} is out of range or out of order"),
            });
        }
        regions.push(r);
    }
    if !all_zero(&b[end..SLOT_CRC_OFFSET]) {
        return Err(BitmapError::Reserved {
            file: LOG,
            field: "padding",
        });
    }
    Ok(Some((seq, regions)))
}

// ---------------------------------------------------------------------------------------
// Bit helpers over the bits area (little-endian bit order within bytes).

/// Writes the bits of `blocks` dirty blocks after the header, 1 MiB at a time (the bits
/// past the last block stay 0).
fn write_all_ones(f: &dyn StorageFile, blocks: u64) -> Result<(), BitmapError> {
    const STEP: u64 = 1 << 20;
    let full_bytes = blocks / 8;
    let ones = vec![0xffu8; STEP.min(full_bytes) as usize];
    let mut at = 0u64;
    while at < full_bytes {
        let n = STEP.min(full_bytes - at) as usize;
        f.write_all_at(&ones[..n], HEADER_BYTES as u64 + at)
            .map_err(io_err("write bitmap bits"))?;
        at += n as u64;
    }
    let tail = blocks % 8;
    if tail != 0 {
        f.write_all_at(&[(1u8 << tail) - 1], HEADER_BYTES as u64 + full_bytes)
            .map_err(io_err("write bitmap bits"))?;
    }
    Ok(())
}

fn set_bit_range(bits: &mut [u8], from: u64, to: u64, value: bool) {
    let put = |bits: &mut [u8], i: u64| {
        let (byte, mask) = ((i / 8) as usize, 1u8 << (i % 8));
        if value {
            bits[byte] |= mask;
        } else {
            bits[byte] &= !mask;
        }
    };
    let mut i = from;
    while i < to && !i.is_multiple_of(8) {
        put(bits, i);
        i += 1;
    }
    let whole_end = to - to % 8;
    if whole_end > i {
        bits[(i / 8) as usize..(whole_end / 8) as usize].fill(if value { 0xff } else { 0 });
        i = whole_end;
    }
    while i < to {
        put(bits, i);
        i += 1;
    }
}

fn word(bits: &[u8], k: u64) -> u64 {
    le_u64(bits, (k * 8) as usize)
}

/// The first block in `from..limit` whose bit equals `set`, skipping whole words.
fn find_bit(bits: &[u8], from: u64, limit: u64, set: bool) -> Option<u64> {
    let mut i = from;
    while i < limit {
        let w = word(bits, i / 64);
        let w = if set { w } else { !w };
        let masked = w & (!0u64 << (i % 64));
        if masked != 0 {
            let b = (i / 64) * 64 + u64::from(masked.trailing_zeros());
            return (b < limit).then_some(b);
        }
        i = (i / 64 + 1) * 64;
    }
    None
}

/// Maximal runs of dirty blocks as byte extents, from [`Bitmap::dirty_runs`].
pub struct DirtyRuns<'a> {
    bits: &'a [u8],
    next_block: u64,
    block_count: u64,
    disk_bytes: u64,
}

impl Iterator for DirtyRuns<'_> {
    type Item = Extent;

    fn next(&mut self) -> Option<Extent> {
        let start = find_bit(self.bits, self.next_block, self.block_count, true)?;
        let end = find_bit(self.bits, start, self.block_count, false).unwrap_or(self.block_count);
        self.next_block = end;
        let offset = start * BLOCK_BYTES;
        // The last block of a disk whose size is not a multiple of 4 KiB is partial.
        let end_bytes = (end * BLOCK_BYTES).min(self.disk_bytes);
        Some(Extent {
            offset,
            len: end_bytes - offset,
        })
    }
}

// ---------------------------------------------------------------------------------------
// The bitmap.

/// The dirty bitmap of one disk and its hot-region log (see the module doc).
pub struct Bitmap {
    map: Box<dyn MappedFile>,
    log: Box<dyn StorageFile>,
    dir: PathBuf,
    disk_bytes: u64,
    block_count: u64,
    config: BitmapConfig,
    generation: u64,
    /// The hot set as durable in the log: region -> tick of its last mark (for LRU).
    hot: HashMap<u64, u64>,
    tick: u64,
    /// Sequence of the last log transaction written (or attempted).
    log_seq: u64,
    poisoned: bool,
}

impl std::fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bitmap")
            .field("dir", &self.dir)
            .field("disk_bytes", &self.disk_bytes)
            .field("config", &self.config)
            .field("generation", &self.generation)
            .field("hot", &self.hot.len())
            .field("log_seq", &self.log_seq)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

fn create_new(fs: &dyn Storage, path: &Path) -> Result<Box<dyn StorageFile>, BitmapError> {
    fs.open(path, OpenMode::CreateNew).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            BitmapError::Exists {
                path: path.to_path_buf(),
            }
        } else {
            BitmapError::Io {
                op: "create file",
                source: e,
            }
        }
    })
}

/// Bytes of bits [`NewBitmap::mark`] keeps in memory at a time (the bits of 2 GiB of
/// disk): creating a bitmap costs this much, whatever the disk's size.
pub const NEW_BITMAP_WINDOW_BYTES: usize = 64 << 10;

/// A bitmap being created by [`Bitmap::begin_create`]: its file holds the header and
/// the bits marked so far, nothing synced, and the hot-region log does not exist yet.
/// Until [`NewBitmap::finish`] made both files and their names durable, what a crash
/// leaves is an interrupted create, which the next create removes (rule: a bitmap in
/// use always has both files). Dropping it unfinished leaves the same.
pub struct NewBitmap<'a> {
    fs: &'a dyn Storage,
    dir: PathBuf,
    file: Box<dyn StorageFile>,
    disk_bytes: u64,
    config: BitmapConfig,
    /// Bytes of bits from `window_at` (offset in the bits, a multiple of the window).
    window: Vec<u8>,
    window_at: Option<u64>,
    window_dirty: bool,
}

impl NewBitmap<'_> {
    /// Marks every block `extent` touches dirty (a partial block counts whole).
    pub fn mark(&mut self, extent: Extent) -> Result<(), BitmapError> {
        let e = Extent::new(extent.offset, extent.len, self.disk_bytes)?;
        let (mut from, to) = (e.offset / BLOCK_BYTES, e.end().div_ceil(BLOCK_BYTES));
        while from < to {
            let w = NEW_BITMAP_WINDOW_BYTES as u64;
            let at = from / 8 / w * w;
            self.load(at)?;
            let until = to.min((at + self.window.len() as u64) * 8);
            set_bit_range(&mut self.window, from - at * 8, until - at * 8, true);
            self.window_dirty = true;
            from = until;
        }
        Ok(())
    }

    /// Marks every block dirty.
    pub fn mark_all(&mut self) -> Result<(), BitmapError> {
        self.store()?;
        self.window_at = None;
        write_all_ones(self.file.as_ref(), block_count(self.disk_bytes))
    }

    /// Makes the window hold the bits from byte `at`.
    fn load(&mut self, at: u64) -> Result<(), BitmapError> {
        if self.window_at == Some(at) {
            return Ok(());
        }
        self.store()?;
        let bits_bytes = bitmap_file_bytes(self.disk_bytes) - HEADER_BYTES as u64;
        let n = (bits_bytes - at).min(NEW_BITMAP_WINDOW_BYTES as u64) as usize;
        self.window.resize(n, 0);
        self.file
            .read_exact_at(&mut self.window, HEADER_BYTES as u64 + at)
            .map_err(io_err("read bitmap bits"))?;
        self.window_at = Some(at);
        Ok(())
    }

    /// Writes the window back if it changed.
    fn store(&mut self) -> Result<(), BitmapError> {
        if let (Some(at), true) = (self.window_at, self.window_dirty) {
            self.file
                .write_all_at(&self.window, HEADER_BYTES as u64 + at)
                .map_err(io_err("write bitmap bits"))?;
            self.window_dirty = false;
        }
        Ok(())
    }

    /// Makes the bitmap durable (bits, then the log, then both names) and opens it.
    pub fn finish(mut self) -> Result<Bitmap, BitmapError> {
        self.store()?;
        self.file.sync_data().map_err(io_err("sync bitmap file"))?;
        let (fs, dir) = (self.fs, self.dir.as_path());
        let log = create_new(fs, &dir.join(LOG_FILE))?;
        log.set_len(LOG_BYTES)
            .map_err(io_err("size hot-region log"))?;
        log.write_all_at(&encode_slot(1, &[]), slot_offset(1))
            .map_err(io_err("write hot-region log slot"))?;
        log.sync_data().map_err(io_err("sync hot-region log"))?;
        fs.sync_dir(dir).map_err(io_err("sync state directory"))?;
        // The state directory may be new: make its own name durable too.
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs.sync_dir(parent)
                .map_err(io_err("sync parent of state directory"))?;
        }
        let map = fs
            .map_mut(&dir.join(BITMAP_FILE))
            .map_err(io_err("map bitmap file"))?;
        Ok(Bitmap {
            map,
            log,
            dir: self.dir,
            disk_bytes: self.disk_bytes,
            block_count: block_count(self.disk_bytes),
            config: self.config,
            generation: 1,
            hot: HashMap::new(),
            tick: 0,
            log_seq: 1,
            poisoned: false,
        })
    }
}

impl Bitmap {
    /// Creates the bitmap and log files of a disk of `disk_bytes` in `dir` (created if
    /// missing), all bits clear, and makes them durable. Existing files are refused.
    pub fn create(
        fs: &dyn Storage,
        dir: &Path,
        disk_bytes: u64,
        config: BitmapConfig,
    ) -> Result<Self, BitmapError> {
        Self::create_inner(fs, dir, disk_bytes, config, false)
    }

    /// Like [`Bitmap::create`] with every block dirty, durable before the files' names
    /// are: a disk protected for the first time, whose every block the replica lacks.
    pub fn create_all_dirty(
        fs: &dyn Storage,
        dir: &Path,
        disk_bytes: u64,
        config: BitmapConfig,
    ) -> Result<Self, BitmapError> {
        Self::create_inner(fs, dir, disk_bytes, config, true)
    }

    fn create_inner(
        fs: &dyn Storage,
        dir: &Path,
        disk_bytes: u64,
        config: BitmapConfig,
        all_dirty: bool,
    ) -> Result<Self, BitmapError> {
        let mut b = Self::begin_create(fs, dir, disk_bytes, config)?;
        if all_dirty {
            b.mark_all()?;
        }
        b.finish()
    }

    /// Starts creating the bitmap and log files of a disk of `disk_bytes` in `dir`
    /// (created if missing) with the blocks [`NewBitmap::mark`] names dirty; made
    /// durable, bits included, by [`NewBitmap::finish`]. Existing files are refused.
    /// A disk protected for the first time whose replica differs from it only in
    /// known blocks (an initial sync from change lists) starts this way.
    pub fn begin_create<'a>(
        fs: &'a dyn Storage,
        dir: &Path,
        disk_bytes: u64,
        config: BitmapConfig,
    ) -> Result<NewBitmap<'a>, BitmapError> {
        config
            .check()
            .map_err(|(field, why)| BitmapError::InvalidConfig { field, why })?;
        check_disk_bytes(disk_bytes).map_err(|why| BitmapError::InvalidConfig {
            field: "disk_bytes",
            why,
        })?;
        fs.create_dir_all(dir)
            .map_err(io_err("create state directory"))?;
        let bitmap_path = dir.join(BITMAP_FILE);
        let log_path = dir.join(LOG_FILE);
        // A bitmap in use always has both files: one without the other is what a crash
        // inside an earlier `create` leaves (before the directory sync made both names
        // durable). No write was ever tracked by it, so it is removed and created anew.
        match (fs.exists(&bitmap_path), fs.exists(&log_path)) {
            (true, true) => return Err(BitmapError::Exists { path: bitmap_path }),
            (true, false) => fs
                .remove_file(&bitmap_path)
                .map_err(io_err("remove bitmap file of an interrupted create"))?,
            (false, true) => fs
                .remove_file(&log_path)
                .map_err(io_err("remove hot-region log of an interrupted create"))?,
            (false, false) => {}
        }
        let header = Header {
            disk_bytes,
            config,
            generation: 1,
        };
        let file = create_new(fs, &bitmap_path)?;
        file.set_len(bitmap_file_bytes(disk_bytes))
            .map_err(io_err("size bitmap file"))?;
        file.write_all_at(&encode_header(&header), 0)
            .map_err(io_err("write bitmap header"))?;
        Ok(NewBitmap {
            fs,
            dir: dir.to_path_buf(),
            file,
            disk_bytes,
            config,
            window: Vec::new(),
            window_at: None,
            window_dirty: false,
        })
    }

    /// Opens the bitmap in `dir` after a clean shutdown or a crash (rule 4).
    pub fn open(fs: &dyn Storage, dir: &Path) -> Result<Self, BitmapError> {
        Self::open_inner(fs, dir, None)
    }

    /// Like [`Bitmap::open`], and refuses a bitmap made for a disk of another size
    /// (before changing anything).
    pub fn open_for_disk(
        fs: &dyn Storage,
        dir: &Path,
        disk_bytes: u64,
    ) -> Result<Self, BitmapError> {
        Self::open_inner(fs, dir, Some(disk_bytes))
    }

    fn open_inner(
        fs: &dyn Storage,
        dir: &Path,
        expect_disk_bytes: Option<u64>,
    ) -> Result<Self, BitmapError> {
        let bitmap_path = dir.join(BITMAP_FILE);
        let log_path = dir.join(LOG_FILE);

        // Header and file length.
        let header = {
            let f = fs
                .open(&bitmap_path, OpenMode::ReadOnly)
                .map_err(io_err("open bitmap file"))?;
            let len = f.len().map_err(io_err("stat bitmap file"))?;
            if len < HEADER_BYTES as u64 {
                return Err(BitmapError::Truncated {
                    file: BITMAP,
                    field: "header",
                    need: HEADER_BYTES as u64,
                    got: len,
                });
            }
            let mut b = [0u8; HEADER_BYTES];
            f.read_exact_at(&mut b, 0)
                .map_err(io_err("read bitmap header"))?;
            let h = decode_header(&b)?;
            if let Some(disk_bytes) = expect_disk_bytes
                && disk_bytes != h.disk_bytes
            {
                return Err(BitmapError::DiskSizeMismatch {
                    bitmap_disk_bytes: h.disk_bytes,
                    disk_bytes,
                });
            }
            let expected = bitmap_file_bytes(h.disk_bytes);
            if len != expected {
                return Err(BitmapError::SizeMismatch {
                    file: BITMAP,
                    expected,
                    actual: len,
                });
            }
            h
        };
        let generation = header
            .generation
            .checked_add(1)
            .ok_or(BitmapError::Invalid {
                file: BITMAP,
                field: "generation",
                why: "at its maximum".into(),
            })?;

        // The newest valid log transaction.
        let log = fs
            .open(&log_path, OpenMode::Existing)
            .map_err(io_err("open hot-region log"))?;
        let log_len = log.len().map_err(io_err("stat hot-region log"))?;
        if log_len != LOG_BYTES {
            return Err(BitmapError::SizeMismatch {
                file: LOG,
                expected: LOG_BYTES,
                actual: log_len,
            });
        }
        let region_count = header.disk_bytes.div_ceil(header.config.region_bytes);
        let mut newest: Option<(u64, Vec<u64>)> = None;
        for index in 0..LOG_SLOTS {
            let mut b = [0u8; SLOT_BYTES];
            log.read_exact_at(&mut b, index * SLOT_BYTES as u64)
                .map_err(io_err("read hot-region log"))?;
            if let Some((seq, regions)) =
                decode_slot(&b, index, region_count, header.config.hot_regions_max)?
                && newest.as_ref().is_none_or(|(s, _)| seq > *s)
            {
                newest = Some((seq, regions));
            }
        }
        let (log_seq, recovered) = newest.ok_or(BitmapError::NoValidLogSlot)?;
        if log_seq == u64::MAX {
            // No transaction can follow it; refused before anything changes.
            return Err(BitmapError::Invalid {
                file: LOG,
                field: "seq",
                why: "at its maximum".into(),
            });
        }

        let map = fs
            .map_mut(&bitmap_path)
            .map_err(io_err("map bitmap file"))?;
        let map_len = map.bytes().len() as u64;
        if map_len != bitmap_file_bytes(header.disk_bytes) {
            return Err(BitmapError::SizeMismatch {
                file: BITMAP,
                expected: bitmap_file_bytes(header.disk_bytes),
                actual: map_len,
            });
        }
        let mut bm = Self {
            map,
            log,
            dir: dir.to_path_buf(),
            disk_bytes: header.disk_bytes,
            block_count: block_count(header.disk_bytes),
            config: header.config,
            generation,
            hot: HashMap::new(),
            tick: 0,
            log_seq,
            poisoned: false,
        };

        // Every block of a recovered hot region counts as dirty; padding bits past the
        // last block are kept zero so that counts and runs need not mask them.
        let (block_count, words_end) = (bm.block_count, bm.block_count.div_ceil(64) * 64);
        let bits = bm.bits_mut();
        set_bit_range(bits, block_count, words_end, false);
        for &r in &recovered {
            let (from, to) = bm.region_blocks(r);
            set_bit_range(bm.bits_mut(), from, to, true);
        }
        let head = encode_header(&Header {
            generation,
            ..header
        });
        bm.map.bytes_mut()[..HEADER_BYTES].copy_from_slice(&head);
        let len = bm.map.bytes().len();
        bm.map
            .flush_range(0, len)
            .map_err(io_err("flush bitmap file"))?;
        if !recovered.is_empty() {
            bm.write_log(&[])?;
        }
        Ok(bm)
    }

    /// Marks the blocks of `extents` dirty (rule 1, with rule 2 when the hot set is
    /// full). On return every block they touch may be written to the backing disk.
    /// Refuses bad extents and marks touching more than `hot_regions_max` regions
    /// before changing anything.
    pub fn mark(&mut self, extents: &[Extent]) -> Result<MarkOutcome, BitmapError> {
        if self.poisoned {
            return Err(BitmapError::Poisoned);
        }
        let max = self.config.hot_regions_max;
        let rb = self.config.region_bytes;
        let mut touched = BTreeSet::new();
        for e in extents {
            let e = Extent::new(e.offset, e.len, self.disk_bytes)?;
            let (first, last) = (e.offset / rb, (e.end() - 1) / rb);
            // Checked before collecting, so a huge extent never builds a huge set.
            if last - first + 1 > u64::from(max) {
                return Err(BitmapError::TooManyRegions {
                    regions: last - first + 1,
                    max,
                });
            }
            touched.extend(first..=last);
            if touched.len() > max as usize {
                return Err(BitmapError::TooManyRegions {
                    regions: touched.len() as u64,
                    max,
                });
            }
        }
        self.tick += 1;
        let tick = self.tick;
        let mut new = Vec::new();
        for &r in &touched {
            match self.hot.get_mut(&r) {
                Some(t) => *t = tick,
                None => new.push(r),
            }
        }

        let mut outcome = MarkOutcome::default();
        if !new.is_empty() {
            let victims = self.pick_victims(&touched, new.len());
            // Rule 2: the evicted regions' bits are durable before the log forgets them.
            for (from, to) in self.flush_spans(&victims) {
                if let Err(e) = self.map.flush_range(from, to - from) {
                    self.poisoned = true;
                    return Err(BitmapError::Io {
                        op: "flush evicted regions",
                        source: e,
                    });
                }
            }
            let mut set: Vec<u64> = self
                .hot
                .keys()
                .copied()
                .filter(|r| !victims.contains(r))
                .chain(new.iter().copied())
                .collect();
            set.sort_unstable();
            let written = self.write_log(&set);
            // Either way the victims are no longer safely hot: the slot may or may not
            // have reached the disk, and their bits are durable anyway.
            for r in &victims {
                self.hot.remove(r);
            }
            written?;
            for &r in &new {
                self.hot.insert(r, tick);
            }
            outcome = MarkOutcome {
                log_synced: true,
                regions_added: new.len() as u32,
                regions_evicted: victims.len() as u32,
            };
        }
        let bits = self.bits_mut();
        for e in extents {
            set_bit_range(
                bits,
                e.offset / BLOCK_BYTES,
                (e.end() - 1) / BLOCK_BYTES + 1,
                true,
            );
        }
        Ok(outcome)
    }

    /// The regions to evict so that `adding` regions fit (rule 2): none while they fit;
    /// else the least recently marked ones outside `touched`, at least an
    /// [`EVICT_BATCH_DIVISOR`]th of the capacity, so that the next cold marks find room
    /// without an eviction (and its flush) of their own.
    fn pick_victims(&self, touched: &BTreeSet<u64>, adding: usize) -> BTreeSet<u64> {
        let max = self.config.hot_regions_max as usize;
        let excess = (self.hot.len() + adding).saturating_sub(max);
        if excess == 0 {
            return BTreeSet::new();
        }
        let batch = excess.max(max / EVICT_BATCH_DIVISOR);
        let mut lru: Vec<(u64, u64)> = self
            .hot
            .iter()
            .filter(|(r, _)| !touched.contains(*r))
            .map(|(&r, &t)| (t, r))
            .collect();
        lru.sort_unstable();
        let victims: BTreeSet<u64> = lru.iter().take(batch).map(|&(_, r)| r).collect();
        // Holds because the touched regions alone fit the capacity (checked by `mark`).
        assert!(victims.len() >= excess, "not enough regions to evict");
        victims
    }

    /// The byte ranges of the map to flush for `regions` (ascending): their bits, joined
    /// when at most [`FLUSH_JOIN_GAP_BYTES`] apart, so a batch of victims costs one
    /// `msync` (one device flush) per cluster, never more than one per region. Bits of
    /// hot regions in a joined gap become durable early, which is harmless: they are
    /// current bits, as in the kernel's own writeback.
    fn flush_spans(&self, regions: &BTreeSet<u64>) -> Vec<(usize, usize)> {
        let mut spans: Vec<(usize, usize)> = Vec::new();
        for &r in regions {
            let (from, to) = self.region_byte_range(r);
            match spans.last_mut() {
                Some(last) if from <= last.1 + FLUSH_JOIN_GAP_BYTES => last.1 = last.1.max(to),
                _ => spans.push((from, to)),
            }
        }
        spans
    }

    /// Clears the bits of the blocks wholly inside `extent` (rule 3): the caller
    /// guarantees the target acked their data and no later write to them is pending.
    /// The last, partial block of a disk counts as wholly inside when the extent ends at
    /// the end of the disk.
    pub fn clear(&mut self, extent: Extent) -> Result<(), BitmapError> {
        let e = Extent::new(extent.offset, extent.len, self.disk_bytes)?;
        let from = e.offset.div_ceil(BLOCK_BYTES);
        let to = if e.end() == self.disk_bytes {
            self.block_count
        } else {
            e.end() / BLOCK_BYTES
        };
        if from < to {
            set_bit_range(self.bits_mut(), from, to, false);
        }
        Ok(())
    }

    /// Sets every block's bit and makes the whole map durable before it returns (then
    /// the hot set is not needed and is emptied, as in [`Bitmap::flush`]): every block
    /// must be resynced, and no crash may forget it.
    pub fn mark_all_durably(&mut self) -> Result<(), BitmapError> {
        if self.poisoned {
            return Err(BitmapError::Poisoned);
        }
        let blocks = self.block_count;
        set_bit_range(self.bits_mut(), 0, blocks, true);
        self.flush()
    }

    /// Clean shutdown (rule 5): makes every bit durable, then empties the hot set, so
    /// the next open adds no dirt. The bitmap stays usable.
    pub fn flush(&mut self) -> Result<(), BitmapError> {
        if self.poisoned {
            return Err(BitmapError::Poisoned);
        }
        let len = self.map.bytes().len();
        if let Err(e) = self.map.flush_range(0, len) {
            self.poisoned = true;
            return Err(BitmapError::Io {
                op: "flush bitmap file",
                source: e,
            });
        }
        if !self.hot.is_empty() {
            self.hot.clear();
            self.write_log(&[])?;
        }
        Ok(())
    }

    /// Writes and syncs the next log transaction holding `regions`; poisons on error.
    fn write_log(&mut self, regions: &[u64]) -> Result<(), BitmapError> {
        // The sequence advances even when the write fails, so that a retry can never
        // land in the slot holding the newest valid transaction.
        let Some(seq) = self.log_seq.checked_add(1) else {
            self.poisoned = true;
            return Err(BitmapError::Invalid {
                file: LOG,
                field: "seq",
                why: "at its maximum".into(),
            });
        };
        self.log_seq = seq;
        let slot = encode_slot(seq, regions);
        let r = self
            .log
            .write_all_at(&slot, slot_offset(seq))
            .map_err(io_err("write hot-region log slot"))
            .and_then(|()| self.log.sync_data().map_err(io_err("sync hot-region log")));
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    fn bits(&self) -> &[u8] {
        &self.map.bytes()[HEADER_BYTES..]
    }

    fn bits_mut(&mut self) -> &mut [u8] {
        &mut self.map.bytes_mut()[HEADER_BYTES..]
    }

    /// Blocks `from..to` of region `r`.
    fn region_blocks(&self, r: u64) -> (u64, u64) {
        let per = self.config.region_bytes / BLOCK_BYTES;
        (r * per, ((r + 1) * per).min(self.block_count))
    }

    /// The byte range of the map that holds region `r`'s bits.
    fn region_byte_range(&self, r: u64) -> (usize, usize) {
        let (from, to) = self.region_blocks(r);
        (
            HEADER_BYTES + (from / 8) as usize,
            HEADER_BYTES + to.div_ceil(8) as usize,
        )
    }

    /// Whether block `block` is dirty (false past the end of the disk).
    pub fn is_dirty(&self, block: u64) -> bool {
        block < self.block_count && self.bits()[(block / 8) as usize] & (1 << (block % 8)) != 0
    }

    /// The number of dirty blocks.
    pub fn dirty_blocks(&self) -> u64 {
        self.bits()
            .chunks_exact(8)
            .map(|w| u64::from(le_u64(w, 0).count_ones()))
            .sum()
    }

    /// Maximal runs of dirty blocks as byte extents in ascending order, the last block
    /// clipped to the disk size. Zero words are skipped whole.
    pub fn dirty_runs(&self) -> DirtyRuns<'_> {
        DirtyRuns {
            bits: self.bits(),
            next_block: 0,
            block_count: self.block_count,
            disk_bytes: self.disk_bytes,
        }
    }

    /// The first run of dirty blocks at or after byte `from` (rounded down to its
    /// block), at most `max_len` bytes long (rounded down to whole blocks, at least one),
    /// as a byte extent clipped to the disk. Scans no further than the run's end.
    pub fn next_dirty_run(&self, from: u64, max_len: u64) -> Option<Extent> {
        let start = find_bit(self.bits(), from / BLOCK_BYTES, self.block_count, true)?;
        let limit = start
            .saturating_add((max_len / BLOCK_BYTES).max(1))
            .min(self.block_count);
        let end = find_bit(self.bits(), start, limit, false).unwrap_or(limit);
        let offset = start * BLOCK_BYTES;
        Some(Extent {
            offset,
            len: (end * BLOCK_BYTES).min(self.disk_bytes) - offset,
        })
    }

    /// The hot regions, ascending.
    pub fn hot_regions(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.hot.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// The disk size this bitmap tracks.
    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes
    }

    /// The number of blocks (bits).
    pub fn block_count(&self) -> u64 {
        self.block_count
    }

    /// Region size and hot-set capacity.
    pub fn config(&self) -> BitmapConfig {
        self.config
    }

    /// 1 at create, +1 at every open: tells runs of the process apart.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether a failed durability step poisoned this bitmap (rule 6).
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{CrashMode, RealFs, SimFs};
    use proptest::prelude::*;
    use std::ops::Range;

    /// xorshift64*: a seeded generator for workloads and fuzz loops.
    use crate::testutil::Rng;

    const KIB: u64 = 1024;

    fn dir() -> PathBuf {
        PathBuf::from("/state/disk0")
    }

    fn ext(offset: u64, len: u64) -> Extent {
        Extent { offset, len }
    }

    fn cfg(region_bytes: u64, hot_regions_max: u32) -> BitmapConfig {
        BitmapConfig {
            region_bytes,
            hot_regions_max,
        }
    }

    /// A SimFs with a fresh bitmap of `disk_bytes` in [`dir`].
    fn setup(disk_bytes: u64, config: BitmapConfig) -> (SimFs, Bitmap) {
        let fs = SimFs::new();
        let bm = Bitmap::create(&fs, &dir(), disk_bytes, config).unwrap();
        (fs, bm)
    }

    /// Replaces the contents of an existing file durably (corruption helper).
    fn rewrite(fs: &SimFs, path: &Path, bytes: &[u8]) {
        let f = fs.open(path, OpenMode::Existing).unwrap();
        f.set_len(0).unwrap();
        f.write_all_at(bytes, 0).unwrap();
        f.sync_data().unwrap();
    }

    fn bitmap_path() -> PathBuf {
        dir().join(BITMAP_FILE)
    }

    fn log_path() -> PathBuf {
        dir().join(LOG_FILE)
    }

    /// Blocks touched by an extent.
    fn blocks(e: &Extent) -> Range<u64> {
        e.offset / BLOCK_BYTES..(e.end() - 1) / BLOCK_BYTES + 1
    }

    fn dirty_list(bm: &Bitmap) -> Vec<u64> {
        (0..bm.block_count()).filter(|&b| bm.is_dirty(b)).collect()
    }

    /// Proves a 1 TiB disk's bitmap file stays within 33 MiB.
    /// Proves a bitmap created all dirty has every block's bit set (the last partial
    /// byte only up to the last block), durably, and that `next_dirty_run` walks runs
    /// from any offset with a bounded length.
    #[test]
    fn all_dirty_create_and_next_dirty_run() {
        let fs = SimFs::new();
        let d = Path::new("/bm");
        // 37 blocks: the bits end inside a byte.
        let disk = 37 * BLOCK_BYTES - 512;
        let mut b = Bitmap::create_all_dirty(&fs, d, disk, BitmapConfig::default()).unwrap();
        assert_eq!(b.dirty_blocks(), 37);
        drop(b);
        fs.crash(CrashMode::DropUnsynced);
        b = Bitmap::open(&fs, d).unwrap();
        assert_eq!(b.dirty_blocks(), 37);
        let e = |offset, len| Extent { offset, len };
        assert_eq!(
            b.next_dirty_run(0, 8 * BLOCK_BYTES),
            Some(e(0, 8 * BLOCK_BYTES))
        );
        // From inside a block: rounded down; a length below a block reads one block.
        assert_eq!(b.next_dirty_run(5000, 1), Some(e(4096, 4096)));
        // The last block is clipped to the disk.
        assert_eq!(
            b.next_dirty_run(36 * BLOCK_BYTES, 1 << 20),
            Some(e(36 * BLOCK_BYTES, BLOCK_BYTES - 512))
        );
        b.clear(e(0, 36 * BLOCK_BYTES)).unwrap();
        b.clear(e(36 * BLOCK_BYTES, BLOCK_BYTES - 512)).unwrap();
        assert_eq!(b.next_dirty_run(0, 1 << 20), None);
        b.mark(&[e(10 * BLOCK_BYTES, 3 * BLOCK_BYTES)]).unwrap();
        assert_eq!(
            b.next_dirty_run(0, 1 << 20),
            Some(e(10 * BLOCK_BYTES, 3 * BLOCK_BYTES))
        );
        assert_eq!(
            b.next_dirty_run(11 * BLOCK_BYTES, 1 << 20),
            Some(e(11 * BLOCK_BYTES, 2 * BLOCK_BYTES))
        );
        assert_eq!(b.next_dirty_run(13 * BLOCK_BYTES, 1 << 20), None);
        assert_eq!(b.next_dirty_run(u64::MAX - 10, 1 << 20), None);
    }

    /// Proves a bitmap created with marked extents has exactly their blocks dirty,
    /// durably, when the marks come in any order and cross the bit windows; and that a
    /// create a crash interrupted before `finish` synced it is made anew.
    #[test]
    fn create_with_marked_extents() {
        let fs = SimFs::new();
        let d = Path::new("/bm");
        // 5 GiB: three windows of bits.
        let disk = 5u64 << 30;
        let window_blocks = NEW_BITMAP_WINDOW_BYTES as u64 * 8;
        let marks = [
            ext(2 * window_blocks * BLOCK_BYTES - 8192, 3 << 20),
            ext(512, 512),
            ext((window_blocks - 1) * BLOCK_BYTES, 2 * BLOCK_BYTES),
            ext(disk - 4096, 4096),
            ext(9216, 100 << 10),
        ];
        let mut model = std::collections::BTreeSet::new();
        for m in &marks {
            model.extend(m.offset / BLOCK_BYTES..m.end().div_ceil(BLOCK_BYTES));
        }
        let mut nb = Bitmap::begin_create(&fs, d, disk, BitmapConfig::default()).unwrap();
        for m in marks {
            nb.mark(m).unwrap();
        }
        assert!(matches!(
            nb.mark(ext(disk, 4096)),
            Err(BitmapError::BadExtent(_))
        ));
        let b = nb.finish().unwrap();
        let got: std::collections::BTreeSet<u64> = b
            .dirty_runs()
            .flat_map(|e| e.offset / BLOCK_BYTES..e.end().div_ceil(BLOCK_BYTES))
            .collect();
        assert_eq!(got, model);
        drop(b);
        fs.crash(CrashMode::DropUnsynced);
        let b = Bitmap::open(&fs, d).unwrap();
        assert_eq!(b.dirty_blocks(), model.len() as u64);
        // An unfinished create (marks written, nothing synced, no log) and a crash:
        // the next create starts over.
        let d2 = Path::new("/bm2");
        let mut nb = Bitmap::begin_create(&fs, d2, 1 << 20, BitmapConfig::default()).unwrap();
        nb.mark(ext(0, 8192)).unwrap();
        drop(nb);
        fs.crash(CrashMode::Torn { seed: 3 });
        let b = Bitmap::create(&fs, d2, 1 << 20, BitmapConfig::default()).unwrap();
        assert_eq!(b.dirty_blocks(), 0);
    }

    #[test]
    fn one_tib_disk_fits_33_mib() {
        let bytes = bitmap_file_bytes(1 << 40);
        assert_eq!(bytes, (32 << 20) + HEADER_BYTES as u64);
        assert!(bytes <= 33 << 20);
        assert_eq!(bitmap_file_bytes(512), HEADER_BYTES as u64 + 8);
    }

    /// Proves marks set every touched block, runs are maximal and the partial last block
    /// of an odd-sized disk is clipped to the disk size.
    #[test]
    fn mark_and_runs_on_odd_sized_disk() {
        let disk = 10 * BLOCK_BYTES + 1536;
        let (_fs, mut bm) = setup(disk, cfg(32 * KIB, 4));
        assert_eq!(bm.block_count(), 11);
        assert_eq!(bm.dirty_runs().count(), 0);
        bm.mark(&[ext(512, 512), ext(4096 + 3584, 1024), ext(disk - 512, 512)])
            .unwrap();
        assert_eq!(dirty_list(&bm), vec![0, 1, 2, 10]);
        assert_eq!(bm.dirty_blocks(), 4);
        let runs: Vec<Extent> = bm.dirty_runs().collect();
        assert_eq!(
            runs,
            vec![ext(0, 3 * BLOCK_BYTES), ext(10 * BLOCK_BYTES, 1536)]
        );
        assert!(!bm.is_dirty(11) && !bm.is_dirty(u64::MAX));
    }

    /// Proves clear drops only blocks wholly inside the extent, the partial last block
    /// included when the extent reaches the end of the disk.
    #[test]
    fn clear_only_whole_blocks() {
        let disk = 10 * BLOCK_BYTES + 1536;
        let (_fs, mut bm) = setup(disk, cfg(32 * KIB, 4));
        bm.mark(&[ext(0, disk)]).unwrap();
        assert_eq!(bm.dirty_blocks(), 11);
        // Covers block 1 wholly, blocks 0 and 2 partly.
        bm.clear(ext(2048, 2 * BLOCK_BYTES + 1024)).unwrap();
        assert_eq!(dirty_list(&bm), vec![0, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        // Stops one sector short of the end: the partial block stays.
        bm.clear(ext(10 * BLOCK_BYTES, 1024)).unwrap();
        assert!(bm.is_dirty(10));
        bm.clear(ext(9 * BLOCK_BYTES, BLOCK_BYTES + 1536)).unwrap();
        assert_eq!(dirty_list(&bm), vec![0, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            bm.dirty_runs().collect::<Vec<_>>(),
            vec![ext(0, BLOCK_BYTES), ext(2 * BLOCK_BYTES, 7 * BLOCK_BYTES)]
        );
    }

    /// Proves a mark into regions that are already hot takes no durability step, and a
    /// mark adding several cold regions takes exactly one (the group commit).
    #[test]
    fn hot_marks_do_not_sync_and_cold_marks_sync_once() {
        let (fs, mut bm) = setup(1 << 20, cfg(64 * KIB, 8));
        let s0 = fs.steps();
        let out = bm.mark(&[ext(0, 4096)]).unwrap();
        assert!(out.log_synced);
        assert_eq!(fs.steps(), s0 + 1);
        let out = bm.mark(&[ext(8192, 512), ext(60 * KIB, 4 * KIB)]).unwrap();
        assert_eq!(out, MarkOutcome::default());
        assert_eq!(fs.steps(), s0 + 1, "a hot mark must not sync");
        // Three extents, three new regions (one extent spans two), one hot: one sync.
        let out = bm
            .mark(&[ext(0, 512), ext(128 * KIB, 512), ext(250 * KIB, 12 * KIB)])
            .unwrap();
        assert_eq!(
            out,
            MarkOutcome {
                log_synced: true,
                regions_added: 3,
                regions_evicted: 0
            }
        );
        assert_eq!(fs.steps(), s0 + 2);
        assert_eq!(bm.hot_regions(), vec![0, 2, 3, 4]);
    }

    /// Proves eviction picks the least recently marked region and makes its bits
    /// durable before the log transaction that drops it.
    #[test]
    fn eviction_is_lru_and_flushes_bits_first() {
        let (fs, mut bm) = setup(1 << 20, cfg(32 * KIB, 2));
        bm.mark(&[ext(0, 512)]).unwrap(); // region 0
        bm.mark(&[ext(32 * KIB, 512)]).unwrap(); // region 1
        bm.mark(&[ext(0, 512)]).unwrap(); // region 0 is now the most recent
        let durable_bit = |block: u64| {
            let d = fs.durable_contents(&bitmap_path()).unwrap();
            d[HEADER_BYTES + (block / 8) as usize] & (1 << (block % 8)) != 0
        };
        assert!(!durable_bit(8), "bits are not synced while hot");
        let s0 = fs.steps();
        let out = bm.mark(&[ext(64 * KIB, 512)]).unwrap(); // region 2 evicts region 1
        assert_eq!(
            out,
            MarkOutcome {
                log_synced: true,
                regions_added: 1,
                regions_evicted: 1
            }
        );
        assert_eq!(fs.steps(), s0 + 2, "one flush of region 1, one log sync");
        assert_eq!(bm.hot_regions(), vec![0, 2]);
        assert!(durable_bit(8), "evicted region's bit is durable");
        assert!(!durable_bit(0), "hot region 0 was not flushed");
        // After a crash, region 0 and 2 are wholly dirty, region 1 only its marked block.
        drop(bm);
        fs.crash(CrashMode::DropUnsynced);
        let bm = Bitmap::open(&fs, &dir()).unwrap();
        let mut want: Vec<u64> = (0..8).collect();
        want.push(8);
        want.extend(16..24);
        assert_eq!(dirty_list(&bm), want);
    }

    /// Proves a full hot set evicts an eighth of its capacity at once (the least
    /// recently marked regions), with one flush for all of them before the log
    /// transaction, so the next cold marks need only their log sync.
    #[test]
    fn eviction_frees_an_eighth_of_the_set_with_one_flush() {
        let (fs, mut bm) = setup(4 << 20, cfg(32 * KIB, 16));
        for r in 0..16 {
            bm.mark(&[ext(r * 32 * KIB + 4 * KIB, 512)]).unwrap();
        }
        bm.mark(&[ext(0, 512)]).unwrap(); // region 0 is now the most recent
        let durable_bit = |block: u64| {
            let d = fs.durable_contents(&bitmap_path()).unwrap();
            d[HEADER_BYTES + (block / 8) as usize] & (1 << (block % 8)) != 0
        };
        let s0 = fs.steps();
        let out = bm.mark(&[ext(16 * 32 * KIB, 512)]).unwrap();
        assert_eq!(
            out,
            MarkOutcome {
                log_synced: true,
                regions_added: 1,
                regions_evicted: 2
            }
        );
        assert_eq!(
            fs.steps(),
            s0 + 2,
            "one flush for both victims, one log sync"
        );
        let mut want: Vec<u64> = (0..16).filter(|&r| r != 1 && r != 2).collect();
        want.push(16);
        assert_eq!(bm.hot_regions(), want, "regions 1 and 2 were least recent");
        assert!(
            durable_bit(8 + 1) && durable_bit(16 + 1),
            "victims' bits durable"
        );
        // The next cold mark finds room: only its log sync.
        let out = bm.mark(&[ext(17 * 32 * KIB, 512)]).unwrap();
        assert_eq!(out.regions_evicted, 0);
        assert_eq!(fs.steps(), s0 + 3);
        // After a crash the hot regions are wholly dirty, the victims only their block.
        drop(bm);
        fs.crash(CrashMode::DropUnsynced);
        let bm = Bitmap::open(&fs, &dir()).unwrap();
        for r in [1u64, 2] {
            let marked = r * 8 + 1;
            assert!(bm.is_dirty(marked), "region {r}: marked block");
            assert!(!bm.is_dirty(r * 8), "region {r}: only the marked block");
        }
        assert!((0..8).all(|b| bm.is_dirty(b)), "hot region 0 wholly dirty");
        assert!(
            (17 * 8..18 * 8).all(|b| bm.is_dirty(b)),
            "region 17 wholly dirty"
        );
    }

    /// Proves victims' bit ranges are flushed as one range when close, apart when far
    /// (so a batch never flushes much more than its own bits).
    #[test]
    fn flush_spans_join_close_victims_only() {
        let (_fs, bm) = setup(8 << 30, cfg(32 * KIB, 16)); // one byte of bits per region
        let h = HEADER_BYTES;
        let far = (FLUSH_JOIN_GAP_BYTES + 10) as u64;
        let spans = bm.flush_spans(&BTreeSet::from([0, 1, 5, far, far + 3]));
        assert_eq!(
            spans,
            [(h, h + 6), (h + far as usize, h + far as usize + 4)]
        );
    }

    /// Proves bad extents and marks touching more regions than the hot set holds are
    /// refused before anything changes.
    #[test]
    fn bad_marks_change_nothing() {
        let (fs, mut bm) = setup(1 << 20, cfg(32 * KIB, 4));
        let s0 = fs.steps();
        for bad in [
            ext(100, 512),
            ext(0, 100),
            ext(0, 0),
            ext(1 << 20, 512),
            ext(u64::MAX - 511, 512),
        ] {
            assert!(matches!(
                bm.mark(&[ext(0, 512), bad]),
                Err(BitmapError::BadExtent(_))
            ));
            assert!(matches!(bm.clear(bad), Err(BitmapError::BadExtent(_))));
        }
        assert!(matches!(
            bm.mark(&[ext(0, 5 * 32 * KIB)]),
            Err(BitmapError::TooManyRegions { regions: 5, max: 4 })
        ));
        let spread: Vec<Extent> = (0..5).map(|r| ext(r * 32 * KIB, 512)).collect();
        assert!(matches!(
            bm.mark(&spread),
            Err(BitmapError::TooManyRegions { regions: 5, max: 4 })
        ));
        assert_eq!(fs.steps(), s0);
        assert_eq!(bm.dirty_blocks(), 0);
        assert!(bm.hot_regions().is_empty());
        assert!(!bm.is_poisoned());
    }

    /// Proves a crash makes every hot region wholly dirty, bumps the generation, and that
    /// the recovered dirt survives a second crash though the hot set was emptied.
    #[test]
    fn crash_makes_hot_regions_dirty() {
        let (fs, mut bm) = setup(1 << 20, cfg(32 * KIB, 4));
        bm.mark(&[ext(40 * KIB, 512)]).unwrap();
        drop(bm);
        fs.crash(CrashMode::DropUnsynced);
        let bm = Bitmap::open(&fs, &dir()).unwrap();
        assert_eq!(bm.generation(), 2);
        assert_eq!(dirty_list(&bm), (8..16).collect::<Vec<_>>());
        assert!(bm.hot_regions().is_empty());
        drop(bm);
        fs.crash(CrashMode::DropUnsynced);
        let bm = Bitmap::open(&fs, &dir()).unwrap();
        assert_eq!(bm.generation(), 3);
        assert_eq!(dirty_list(&bm), (8..16).collect::<Vec<_>>());
    }

    /// Proves a clean flush makes exactly the marked bits durable and empties the hot
    /// set, so reopening after it adds no region-wide dirt.
    #[test]
    fn clean_flush_then_reopen_adds_no_dirt() {
        let (fs, mut bm) = setup(1 << 20, cfg(32 * KIB, 4));
        bm.mark(&[ext(40 * KIB, 512), ext(200 * KIB, 8 * KIB)])
            .unwrap();
        bm.clear(ext(200 * KIB, 4 * KIB)).unwrap();
        let before = dirty_list(&bm);
        bm.flush().unwrap();
        assert!(bm.hot_regions().is_empty());
        drop(bm);
        fs.crash(CrashMode::DropUnsynced);
        let s0 = fs.steps();
        let bm = Bitmap::open(&fs, &dir()).unwrap();
        assert_eq!(dirty_list(&bm), before);
        assert_eq!(before, vec![10, 51]);
        assert_eq!(fs.steps(), s0 + 1, "nothing recovered: only the map flush");
    }

    /// Proves a failed durability step poisons the bitmap and a reopen recovers.
    #[test]
    fn failed_sync_poisons_until_reopen() {
        let (fs, mut bm) = setup(1 << 20, cfg(32 * KIB, 4));
        fs.crash_after(1);
        assert!(matches!(
            bm.mark(&[ext(0, 512)]),
            Err(BitmapError::Io { .. })
        ));
        assert!(bm.is_poisoned());
        assert!(bm.hot_regions().is_empty());
        fs.crash(CrashMode::Torn { seed: 3 });
        assert!(matches!(
            bm.mark(&[ext(0, 512)]),
            Err(BitmapError::Poisoned)
        ));
        assert!(matches!(bm.flush(), Err(BitmapError::Poisoned)));
        drop(bm);
        let mut bm = Bitmap::open(&fs, &dir()).unwrap();
        bm.mark(&[ext(0, 512)]).unwrap();
        assert!(bm.is_dirty(0));
    }

    /// Proves create refuses bad configs, bad disk sizes and existing files.
    #[test]
    fn create_refuses_bad_config_and_existing_files() {
        let fs = SimFs::new();
        for (c, field) in [
            (cfg(4096, 4), "region_bytes"),
            (cfg(48 * KIB, 4), "region_bytes"),
            (cfg(2 << 30, 4), "region_bytes"),
            (cfg(32 * KIB, 0), "hot_regions_max"),
            (cfg(32 * KIB, SLOT_REGIONS_MAX + 1), "hot_regions_max"),
        ] {
            match Bitmap::create(&fs, &dir(), 1 << 20, c) {
                Err(BitmapError::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{c:?}: {other:?}"),
            }
        }
        for disk in [0, 1000, DISK_BYTES_MAX + 512] {
            assert!(matches!(
                Bitmap::create(&fs, &dir(), disk, BitmapConfig::default()),
                Err(BitmapError::InvalidConfig {
                    field: "disk_bytes",
                    ..
                })
            ));
        }
        let bm = Bitmap::create(&fs, &dir(), 1 << 20, BitmapConfig::default()).unwrap();
        assert_eq!(bm.config(), BitmapConfig::default());
        assert!(matches!(
            Bitmap::create(&fs, &dir(), 1 << 20, BitmapConfig::default()),
            Err(BitmapError::Exists { .. })
        ));
        // Names are durable: both files survive a crash right after create.
        drop(bm);
        fs.crash(CrashMode::DropUnsynced);
        assert!(Bitmap::open(&fs, &dir()).is_ok());
    }

    /// Proves a crash at any step of `create` leaves a state from which `open` or a new
    /// `create` succeeds, including one file's name durable without the other's.
    #[test]
    fn interrupted_create_can_be_created_again() {
        for step in 1..=8 {
            let fs = SimFs::new();
            fs.crash_after(step);
            let done = Bitmap::create(&fs, &dir(), 1 << 20, BitmapConfig::default()).is_ok();
            fs.crash(CrashMode::Torn { seed: step });
            // What a process server does at start: open, or create when that fails.
            let opened = Bitmap::open(&fs, &dir()).is_ok();
            assert!(opened || !done, "step {step}: a completed create must open");
            if !opened {
                assert!(
                    Bitmap::create(&fs, &dir(), 1 << 20, BitmapConfig::default()).is_ok(),
                    "step {step}"
                );
            }
        }
        // The directory sync of a real file system may persist one name and not the other.
        for missing in [LOG_FILE, BITMAP_FILE] {
            let fs = SimFs::new();
            drop(Bitmap::create(&fs, &dir(), 1 << 20, BitmapConfig::default()).unwrap());
            fs.remove_file(&dir().join(missing)).unwrap();
            fs.sync_dir(&dir()).unwrap();
            assert!(Bitmap::open(&fs, &dir()).is_err());
            let bm = Bitmap::create(&fs, &dir(), 1 << 20, BitmapConfig::default()).unwrap();
            assert_eq!(bm.dirty_blocks(), 0);
        }
    }

    // -----------------------------------------------------------------------------------
    // The crash test.

    const CRASH_DISK_BYTES: u64 = (2 << 20) + 1536;
    const CRASH_REGION_BYTES: u64 = 32 * KIB;

    fn crash_config() -> BitmapConfig {
        // Small capacity so that evictions are frequent; two extents of at most two
        // regions each always fit.
        cfg(CRASH_REGION_BYTES, 4)
    }

    fn random_extent(rng: &mut Rng) -> Extent {
        let disk_sectors = CRASH_DISK_BYTES / SECTOR_BYTES;
        let region_sectors = CRASH_REGION_BYTES / SECTOR_BYTES;
        let regions = disk_sectors.div_ceil(region_sectors);
        // Most writes hit a few regions, so hot marks happen as well as evictions.
        let region = if rng.below(3) != 0 {
            rng.below(3)
        } else {
            rng.below(regions)
        };
        let start = (region * region_sectors + rng.below(region_sectors)).min(disk_sectors - 1);
        let len = (1 + rng.below(16)).min(disk_sectors - start);
        ext(start * SECTOR_BYTES, len * SECTOR_BYTES)
    }

    /// Counters of what a workload exercised.
    #[derive(Default)]
    struct Seen {
        evictions: u64,
        hot_marks: u64,
        clears: u64,
    }

    /// Runs `ops` operations of a seeded workload against `bm`, keeping `outstanding`
    /// (the writes not yet acked: their blocks must stay dirty), with clean flushes
    /// when `flushes`. Stops at the first error, as a crashed process would.
    fn workload(
        bm: &mut Bitmap,
        fs: &SimFs,
        flushes: bool,
        rng: &mut Rng,
        ops: usize,
        outstanding: &mut Vec<Extent>,
        seen: &mut Seen,
    ) -> Result<(), BitmapError> {
        for _ in 0..ops {
            match rng.below(20) {
                0..=9 => {
                    let n = 1 + rng.below(2);
                    let exts: Vec<Extent> = (0..n).map(|_| random_extent(rng)).collect();
                    let out = bm.mark(&exts)?;
                    seen.evictions += u64::from(out.regions_evicted);
                    seen.hot_marks += u64::from(!out.log_synced);
                    // Only now may the data reach the backing disk.
                    outstanding.extend(exts);
                }
                10..=15 => {
                    if outstanding.is_empty() {
                        continue;
                    }
                    let e = outstanding.swap_remove(rng.below(outstanding.len() as u64) as usize);
                    let b = blocks(&e);
                    // The ack clears only when no later write to these blocks is pending.
                    let pending = outstanding.iter().any(|o| {
                        let ob = blocks(o);
                        ob.start < b.end && b.start < ob.end
                    });
                    if !pending {
                        bm.clear(e)?;
                        seen.clears += 1;
                    }
                }
                16 if flushes => bm.flush()?,
                _ => fs.writeback(&*bm.map, &bitmap_path()),
            }
        }
        Ok(())
    }

    fn assert_covers(bm: &Bitmap, outstanding: &[Extent], what: &str) {
        for e in outstanding {
            for b in blocks(e) {
                assert!(
                    bm.is_dirty(b),
                    "{what}: block {b} of unacked {e:?} is clean"
                );
            }
        }
    }

    /// Crashes (torn) and reopens, crashing once more inside recovery at `open_step`.
    fn crash_and_recover(fs: &SimFs, seed: u64, open_step: u64) -> Bitmap {
        fs.crash(CrashMode::Torn { seed });
        fs.crash_after(open_step);
        drop(Bitmap::open(fs, &dir()));
        fs.crash(CrashMode::Torn {
            seed: seed ^ 0xABCD,
        });
        Bitmap::open(fs, &dir()).unwrap_or_else(|e| panic!("seed {seed}: reopen failed: {e}"))
    }

    /// Proves that a crash at every durability step of a random workload (with torn
    /// writes, spontaneous page writeback, forced evictions and a second crash during
    /// recovery) never loses the dirty bit of a block written and not yet acked.
    #[test]
    fn crash_at_every_step_keeps_unacked_blocks_dirty() {
        crash_at_every_step(crash_config(), true, 120, 0..6);
    }

    /// Like [`crash_at_every_step_keeps_unacked_blocks_dirty`] with a hot set large
    /// enough that an eviction takes a batch of several regions (one flush for all).
    #[test]
    fn crash_at_every_step_of_batched_evictions() {
        let config = cfg(CRASH_REGION_BYTES, 16);
        assert!(config.hot_regions_max as usize / EVICT_BATCH_DIVISOR >= 2);
        // Without clean flushes (which empty the hot set) it fills and evicts.
        crash_at_every_step(config, false, 240, 10..14);
    }

    fn crash_at_every_step(config: BitmapConfig, flushes: bool, ops: usize, seeds: Range<u64>) {
        for seed in seeds {
            let total = {
                let fs = SimFs::new();
                let mut bm = Bitmap::create(&fs, &dir(), CRASH_DISK_BYTES, config).unwrap();
                let s0 = fs.steps();
                let (mut out, mut seen) = (Vec::new(), Seen::default());
                workload(
                    &mut bm,
                    &fs,
                    flushes,
                    &mut Rng::new(seed),
                    ops,
                    &mut out,
                    &mut seen,
                )
                .unwrap();
                eprintln!(
                    "seed {seed}: {} evictions, {} hot marks, {} clears",
                    seen.evictions, seen.hot_marks, seen.clears
                );
                assert!(seen.evictions > 10, "seed {seed}: too few evictions");
                assert!(seen.hot_marks > 10, "seed {seed}: too few hot marks");
                assert!(seen.clears > 5, "seed {seed}: too few clears");
                fs.steps() - s0
            };
            for step in 1..=total + 1 {
                let what = format!("seed {seed} step {step}/{total}");
                let fs = SimFs::new();
                let mut bm = Bitmap::create(&fs, &dir(), CRASH_DISK_BYTES, config).unwrap();
                let mut rng = Rng::new(seed);
                let (mut out, mut seen) = (Vec::new(), Seen::default());
                fs.crash_after(step);
                let r = workload(&mut bm, &fs, flushes, &mut rng, ops, &mut out, &mut seen);
                assert_eq!(r.is_err(), step <= total, "{what}: {r:?}");
                if step % 2 == 0 {
                    fs.writeback(&*bm.map, &bitmap_path());
                }
                drop(bm);
                let mut bm = crash_and_recover(&fs, seed << 32 | step, 1 + step % 3);
                assert_covers(&bm, &out, &what);

                // Go on from the recovered state and crash once more at a seeded step.
                let mut rng = Rng::new(seed * 1000 + step);
                fs.crash_after(1 + rng.below(12));
                let _ = workload(&mut bm, &fs, flushes, &mut rng, 40, &mut out, &mut seen);
                if rng.below(2) == 0 {
                    fs.writeback(&*bm.map, &bitmap_path());
                }
                drop(bm);
                let bm = crash_and_recover(&fs, seed << 32 | step | 1 << 31, 1 + rng.below(3));
                assert_covers(&bm, &out, &format!("{what}, second crash"));
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // Bad input.

    /// A valid header of a `disk_bytes` disk after `f` changed it, crc recomputed.
    fn header_with(disk_bytes: u64, f: impl FnOnce(&mut [u8; HEADER_BYTES])) -> Vec<u8> {
        let mut b = encode_header(&Header {
            disk_bytes,
            config: cfg(32 * KIB, 8),
            generation: 5,
        });
        f(&mut b);
        let crc = header_crc(&b);
        b[HEADER_CRC_OFFSET..HEADER_FIELDS_BYTES].copy_from_slice(&crc.to_le_bytes());
        b.to_vec()
    }

    /// Opens, expecting a refusal that is not an I/O error.
    fn refused(fs: &SimFs, what: &str) -> BitmapError {
        match Bitmap::open(fs, &dir()) {
            Ok(_) => panic!("{what}: opened"),
            Err(e @ BitmapError::Io { .. }) => panic!("{what}: untyped {e}"),
            Err(e) => e,
        }
    }

    /// Proves every truncation and extension of the bitmap file is a typed error.
    #[test]
    fn truncated_or_extended_files_are_refused() {
        let (fs, bm) = setup(256 * KIB, cfg(32 * KIB, 8));
        drop(bm);
        let orig = fs.durable_contents(&bitmap_path()).unwrap();
        assert_eq!(orig.len(), HEADER_BYTES + 8);
        for len in 0..orig.len() {
            rewrite(&fs, &bitmap_path(), &orig[..len]);
            match refused(&fs, &format!("len {len}")) {
                BitmapError::Truncated { need, got, .. } => {
                    assert!(len < HEADER_BYTES);
                    assert_eq!((need, got), (HEADER_BYTES as u64, len as u64));
                }
                BitmapError::SizeMismatch { file, .. } => {
                    assert!(len >= HEADER_BYTES);
                    assert_eq!(file, BITMAP);
                }
                e => panic!("len {len}: {e}"),
            }
        }
        let mut longer = orig.clone();
        longer.extend_from_slice(&[0; 8]);
        rewrite(&fs, &bitmap_path(), &longer);
        assert!(matches!(
            refused(&fs, "longer"),
            BitmapError::SizeMismatch { .. }
        ));
        rewrite(&fs, &bitmap_path(), &orig);
        let log = fs.durable_contents(&log_path()).unwrap();
        for len in [
            0,
            SLOT_BYTES,
            LOG_BYTES as usize - 1,
            LOG_BYTES as usize + 1,
        ] {
            let mut l = log.clone();
            l.resize(len, 0);
            rewrite(&fs, &log_path(), &l);
            assert!(matches!(
                refused(&fs, &format!("log len {len}")),
                BitmapError::SizeMismatch { file: LOG, .. }
            ));
        }
        rewrite(&fs, &log_path(), &log);
        assert!(Bitmap::open(&fs, &dir()).is_ok());
    }

    /// Proves bit flips anywhere in the header are refused with a typed error.
    #[test]
    fn header_bit_flips_are_refused() {
        let (fs, bm) = setup(256 * KIB, cfg(32 * KIB, 8));
        drop(bm);
        let path = bitmap_path();
        let mut flips: Vec<(usize, u8)> = (0..HEADER_FIELDS_BYTES)
            .flat_map(|byte| (0..8).map(move |bit| (byte, bit)))
            .collect();
        flips.extend((HEADER_FIELDS_BYTES..HEADER_BYTES).map(|byte| (byte, (byte % 8) as u8)));
        for (byte, bit) in flips {
            fs.flip_bit(&path, byte, bit);
            let e = refused(&fs, &format!("byte {byte} bit {bit}"));
            match byte {
                0..4 => assert!(matches!(e, BitmapError::BadMagic { .. })),
                4..6 => assert!(matches!(e, BitmapError::UnsupportedVersion { .. })),
                _ => assert!(matches!(e, BitmapError::CrcMismatch { .. }), "{e}"),
            }
            fs.flip_bit(&path, byte, bit);
        }
        assert!(Bitmap::open(&fs, &dir()).is_ok());
    }

    /// Proves random bytes as a header, with or without a valid magic, version and crc,
    /// are always refused with a typed error.
    #[test]
    fn random_headers_are_refused() {
        let disk = 256 * KIB;
        let (fs, bm) = setup(disk, cfg(32 * KIB, 8));
        drop(bm);
        let orig = fs.durable_contents(&bitmap_path()).unwrap();
        let mut rng = Rng::new(7);
        for i in 0..300 {
            let mut head = [0u8; HEADER_BYTES];
            rng.fill(&mut head);
            let head = match i % 3 {
                0 => head.to_vec(),
                1 => header_with(disk, |b| b[6..].copy_from_slice(&head[6..])),
                _ => header_with(disk, |b| {
                    // Plausible field values, random within their types.
                    b[8..16].copy_from_slice(&(rng.below(1 << 30) * 512).to_le_bytes());
                    b[20..24].copy_from_slice(&(rng.below(600) as u32).to_le_bytes());
                    b[24..32].copy_from_slice(&(rng.below(64) * 32 * KIB).to_le_bytes());
                    b[32..40].copy_from_slice(&rng.next().to_le_bytes());
                }),
            };
            let mut file = head;
            file.extend_from_slice(&orig[HEADER_BYTES..]);
            rewrite(&fs, &bitmap_path(), &file);
            refused(&fs, &format!("case {i}"));
        }
    }

    /// Proves unknown versions of the bitmap header and of a log slot are refused.
    #[test]
    fn unsupported_versions_are_refused() {
        let disk = 256 * KIB;
        let (fs, bm) = setup(disk, cfg(32 * KIB, 8));
        drop(bm);
        let orig = fs.durable_contents(&bitmap_path()).unwrap();
        let mut file = header_with(disk, |b| b[4..6].copy_from_slice(&2u16.to_le_bytes()));
        file.extend_from_slice(&orig[HEADER_BYTES..]);
        rewrite(&fs, &bitmap_path(), &file);
        assert!(matches!(
            refused(&fs, "header v2"),
            BitmapError::UnsupportedVersion {
                file: BITMAP,
                version: 2
            }
        ));
        rewrite(&fs, &bitmap_path(), &orig);
        let mut log = fs.durable_contents(&log_path()).unwrap();
        let mut slot = encode_slot(2, &[1]);
        slot[4] = 2;
        let crc = crc32fast::hash(&slot[..SLOT_CRC_OFFSET]);
        slot[SLOT_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        log[2 * SLOT_BYTES..3 * SLOT_BYTES].copy_from_slice(&slot);
        rewrite(&fs, &log_path(), &log);
        assert!(matches!(
            refused(&fs, "slot v2"),
            BitmapError::UnsupportedVersion {
                file: LOG,
                version: 2
            }
        ));
    }

    /// Proves a bit flip anywhere in the newest log slot makes recovery fall back to the
    /// previous transaction instead of failing or panicking.
    #[test]
    fn damaged_newest_slot_falls_back_to_previous() {
        let (fs, mut bm) = setup(256 * KIB, cfg(32 * KIB, 8));
        bm.mark(&[ext(0, 512)]).unwrap(); // seq 2 in slot 2: {0}
        bm.mark(&[ext(32 * KIB, 512)]).unwrap(); // seq 3 in slot 3: {0, 1}
        drop(bm);
        fs.crash(CrashMode::DropUnsynced);
        let bitmap = fs.durable_contents(&bitmap_path()).unwrap();
        let log = fs.durable_contents(&log_path()).unwrap();
        {
            let bm = Bitmap::open(&fs, &dir()).unwrap();
            assert_eq!(dirty_list(&bm), (0..16).collect::<Vec<_>>());
        }
        let mut flips: Vec<(usize, u8)> = (0..SLOT_HEAD_BYTES + 16)
            .chain(SLOT_CRC_OFFSET..SLOT_BYTES)
            .flat_map(|byte| (0..8).map(move |bit| (byte, bit)))
            .collect();
        flips.extend(
            (SLOT_HEAD_BYTES + 16..SLOT_CRC_OFFSET)
                .step_by(61)
                .map(|b| (b, (b % 8) as u8)),
        );
        for (byte, bit) in flips {
            rewrite(&fs, &bitmap_path(), &bitmap);
            rewrite(&fs, &log_path(), &log);
            fs.flip_bit(&log_path(), 3 * SLOT_BYTES + byte, bit);
            let bm =
                Bitmap::open(&fs, &dir()).unwrap_or_else(|e| panic!("byte {byte} bit {bit}: {e}"));
            assert_eq!(
                dirty_list(&bm),
                (0..8).collect::<Vec<_>>(),
                "byte {byte} bit {bit}"
            );
        }
    }

    /// Proves random log contents give a typed error: no valid slot when no crc
    /// matches, and a named field when a crc matches but the contents are wrong.
    #[test]
    fn random_log_bytes_are_refused() {
        let (fs, bm) = setup(256 * KIB, cfg(32 * KIB, 8));
        drop(bm);
        let orig = fs.durable_contents(&log_path()).unwrap();
        let mut rng = Rng::new(11);
        for i in 0..300 {
            let mut log = orig.clone();
            if i % 3 == 0 {
                rng.fill(&mut log);
                rewrite(&fs, &log_path(), &log);
                assert!(matches!(
                    refused(&fs, &format!("case {i}")),
                    BitmapError::NoValidLogSlot
                ));
                continue;
            }
            let mut slot = [0u8; SLOT_BYTES];
            rng.fill(&mut slot);
            if i % 3 == 2 {
                // Valid magic, version and slot number; random count, regions, padding.
                slot[..SLOT_HEAD_BYTES].copy_from_slice(&encode_slot(2, &[])[..SLOT_HEAD_BYTES]);
                slot[16..20].copy_from_slice(&(rng.below(12) as u32).to_le_bytes());
            }
            let crc = crc32fast::hash(&slot[..SLOT_CRC_OFFSET]);
            slot[SLOT_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
            log[2 * SLOT_BYTES..3 * SLOT_BYTES].copy_from_slice(&slot);
            rewrite(&fs, &log_path(), &log);
            refused(&fs, &format!("case {i}"));
        }
    }

    /// Proves a bitmap made for another disk size is refused, by the caller's size and
    /// by a header that does not match the file length.
    #[test]
    fn other_disk_size_is_refused() {
        let (fs, bm) = setup(256 * KIB, cfg(32 * KIB, 8));
        drop(bm);
        assert!(matches!(
            Bitmap::open_for_disk(&fs, &dir(), 512 * KIB),
            Err(BitmapError::DiskSizeMismatch {
                bitmap_disk_bytes: 262_144,
                disk_bytes: 524_288
            })
        ));
        let orig = fs.durable_contents(&bitmap_path()).unwrap();
        let mut file = header_with(512 * KIB, |_| {});
        file.extend_from_slice(&orig[HEADER_BYTES..]);
        rewrite(&fs, &bitmap_path(), &file);
        assert!(matches!(
            refused(&fs, "header of another disk"),
            BitmapError::SizeMismatch { file: BITMAP, .. }
        ));
        rewrite(&fs, &bitmap_path(), &orig);
        let bm = Bitmap::open_for_disk(&fs, &dir(), 256 * KIB).unwrap();
        assert_eq!(bm.disk_bytes(), 256 * KIB);
    }

    /// Proves runs over a large, sparse bitmap are found (zero words skipped) and end
    /// at the right blocks.
    #[test]
    fn runs_on_a_large_sparse_disk() {
        let disk = 16 << 30;
        let (_fs, mut bm) = setup(disk, BitmapConfig::default());
        bm.mark(&[ext(4096 * 63, 4096 * 2), ext(disk - 8192, 8192)])
            .unwrap();
        bm.mark(&[ext(4096 * 1_000_000, 4096 * 200)]).unwrap();
        let runs: Vec<Extent> = bm.dirty_runs().collect();
        assert_eq!(
            runs,
            vec![
                ext(4096 * 63, 8192),
                ext(4096 * 1_000_000, 4096 * 200),
                ext(disk - 8192, 8192)
            ]
        );
        assert_eq!(bm.dirty_blocks(), 204);
    }

    /// Proves the real file system and memory map keep bits and hot regions across a
    /// reopen without flush, and exactly the bits after a clean flush.
    #[test]
    fn real_fs_roundtrip() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("disk0");
        let disk = 64 << 20;
        let mut bm = Bitmap::create(&RealFs, &d, disk, BitmapConfig::default()).unwrap();
        bm.mark(&[ext(8192, 512)]).unwrap();
        drop(bm);
        let mut bm = Bitmap::open_for_disk(&RealFs, &d, disk).unwrap();
        assert_eq!(bm.generation(), 2);
        // Not flushed: the whole 4 MiB region 0 counts as dirty.
        assert_eq!(
            bm.dirty_runs().collect::<Vec<_>>(),
            vec![ext(0, REGION_BYTES)]
        );
        bm.clear(ext(0, REGION_BYTES)).unwrap();
        bm.mark(&[ext(20 << 20, 4096)]).unwrap();
        bm.flush().unwrap();
        drop(bm);
        let bm = Bitmap::open(&RealFs, &d).unwrap();
        assert_eq!(bm.generation(), 3);
        assert_eq!(
            bm.dirty_runs().collect::<Vec<_>>(),
            vec![ext(20 << 20, 4096)]
        );
    }

    // -----------------------------------------------------------------------------------
    // Property test against a naive model.

    const PROP_DISK_BYTES: u64 = 300 * BLOCK_BYTES + 1024;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Proves marks, clears, counts and runs agree with a naive vector of bools on
        /// an odd-sized disk, with evictions along the way.
        #[test]
        fn bits_match_naive_model(
            ops in prop::collection::vec((any::<bool>(), 0u64..PROP_DISK_BYTES / 512, 1u64..48), 1..40)
        ) {
            let (_fs, mut bm) = setup(PROP_DISK_BYTES, cfg(32 * KIB, 3));
            let n = bm.block_count() as usize;
            let mut model = vec![false; n];
            for (is_mark, sector, sectors) in ops {
                let offset = sector * 512;
                let len = (sectors * 512).min(PROP_DISK_BYTES - offset);
                let e = ext(offset, len);
                if is_mark {
                    bm.mark(&[e]).unwrap();
                    for b in blocks(&e) {
                        model[b as usize] = true;
                    }
                } else {
                    bm.clear(e).unwrap();
                    for (b, m) in model.iter_mut().enumerate() {
                        let start = b as u64 * BLOCK_BYTES;
                        let end = (start + BLOCK_BYTES).min(PROP_DISK_BYTES);
                        if e.offset <= start && end <= e.end() {
                            *m = false;
                        }
                    }
                }
            }
            for (b, &m) in model.iter().enumerate() {
                prop_assert_eq!(bm.is_dirty(b as u64), m, "block {}", b);
            }
            prop_assert_eq!(bm.dirty_blocks(), model.iter().filter(|&&m| m).count() as u64);
            let mut runs = Vec::new();
            let mut b = 0;
            while b < n {
                if model[b] {
                    let start = b;
                    while b < n && model[b] {
                        b += 1;
                    }
                    let off = start as u64 * BLOCK_BYTES;
                    runs.push(ext(off, (b as u64 * BLOCK_BYTES).min(PROP_DISK_BYTES) - off));
                } else {
                    b += 1;
                }
            }
            prop_assert_eq!(bm.dirty_runs().collect::<Vec<_>>(), runs);
        }
    }

    /// Proves a crc-valid log slot holding the largest seq (no next transaction can
    /// follow it) is refused on open with a typed error instead of overflowing.
    #[test]
    fn log_seq_at_its_maximum_is_refused() {
        let (fs, bm) = setup(256 * KIB, cfg(32 * KIB, 8));
        drop(bm);
        let mut log = fs.durable_contents(&log_path()).unwrap();
        let at = slot_offset(u64::MAX) as usize;
        log[at..at + SLOT_BYTES].copy_from_slice(&encode_slot(u64::MAX, &[0]));
        rewrite(&fs, &log_path(), &log);
        assert!(matches!(
            Bitmap::open(&fs, &dir()),
            Err(BitmapError::Invalid { field: "seq", .. })
        ));

        // One below the maximum opens; the transaction after the next is refused.
        log[at..at + SLOT_BYTES].fill(0);
        let at = slot_offset(u64::MAX - 1) as usize;
        log[at..at + SLOT_BYTES].copy_from_slice(&encode_slot(u64::MAX - 1, &[]));
        rewrite(&fs, &log_path(), &log);
        let mut bm = Bitmap::open(&fs, &dir()).unwrap();
        bm.mark(&[ext(0, 512)]).unwrap();
        assert!(matches!(
            bm.mark(&[ext(64 * KIB, 512)]),
            Err(BitmapError::Invalid { field: "seq", .. })
        ));
        assert!(bm.is_poisoned());
    }

    /// Proves create makes the state directory's own name durable (a sync of its
    /// parent), not only the files inside it: a bitmap whose directory vanishes in a
    /// crash would let the caller start over without the dirt it had recorded.
    #[test]
    fn create_syncs_the_parent_directory() {
        struct Recording(SimFs, std::sync::Mutex<Vec<PathBuf>>);
        impl Storage for Recording {
            fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StorageFile>> {
                self.0.open(path, mode)
            }
            fn map_mut(&self, path: &Path) -> io::Result<Box<dyn MappedFile>> {
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
                self.1.lock().unwrap().push(dir.to_path_buf());
                self.0.sync_dir(dir)
            }
        }
        let fs = Recording(SimFs::new(), Default::default());
        Bitmap::create(&fs, &dir(), 256 * KIB, cfg(32 * KIB, 8)).unwrap();
        let synced = fs.1.lock().unwrap().clone();
        assert!(synced.contains(&dir()), "{synced:?}");
        assert!(synced.contains(&PathBuf::from("/state")), "{synced:?}");
    }
}
