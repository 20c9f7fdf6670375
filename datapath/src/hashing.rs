//! Block hashing for resync and online verify.
//!
//! This module owns the definition of a disk's *hash list*: the blake3 hash of every
//! [`HASH_BLOCK_BYTES`] (64 KiB) block of a file or block device, and the *root* that
//! names a whole list in 32 bytes. It also owns the comparison of two lists
//! ([`diff`], [`diff_into`]), which yields the byte ranges that must be resent.
//!
//! During reprotect the master target hashes its replica, the process server hashes
//! its disk, and only the 64 KiB blocks whose hashes differ cross the wire. An online
//! verify compares the roots (or the lists) of both sides without moving data.
//!
//! # Definition, version [`VERSION`]
//!
//! - Block `i` covers bytes `[i * 64 KiB, min((i + 1) * 64 KiB, disk_bytes))`. The last
//!   block may be short: only the bytes inside the disk are hashed, nothing is padded.
//! - A block hash is plain `blake3(block bytes)` (32 bytes), with no key and no index,
//!   so the same contents at two offsets hash alike (and the naive hash of a block
//!   read by any other tool matches).
//! - The root of a [`HashList`] is `blake3::derive_key(ROOT_CONTEXT, input)` where the
//!   input is laid out as follows (all integers little-endian):
//!
//! | offset | size   | field         | meaning                                            |
//! |-------:|-------:|---------------|----------------------------------------------------|
//! | 0      | 8      | `disk_bytes`  | size of the whole disk in bytes                    |
//! | 8      | 8      | `block_bytes` | [`HASH_BLOCK_BYTES`]                               |
//! | 16     | 8      | `first_block` | index of the first hashed block (0 for a full list)|
//! | 24     | 8      | `block_count` | number of block hashes that follow                 |
//! | 32     | 32 × n | `hashes`      | the block hashes, in block order                   |
//!
//! [`ROOT_CONTEXT`] is the key-derivation context string: never modify it, it names
//! this definition on both sides of the wire. The root binds the geometry as well as
//! the contents, so two disks of different sizes (or two different ranges of one disk)
//! never share a root even when their block hashes agree. A change to any of these
//! rules needs a new [`VERSION`], and peers refuse versions they do not know.
//!
//! # Memory
//!
//! Reading uses one buffer of [`HASH_CHUNK_BLOCKS`] blocks (1 MiB) per worker thread,
//! whatever the disk size. The hash list itself is 32 bytes per 64 KiB block, that is
//! 0.05% of the disk (512 MiB for a 1 TiB disk): [`hash_file`] keeps the whole list in
//! memory, which is right for the disks tests and demos use; callers that handle
//! multi-TiB disks walk the disk in windows with [`hash_range`] or [`hash_range_into`]
//! and compare each window with [`diff_into`] as it arrives, so that only one window of
//! hashes is held at a time.
//!
//! # Reading
//!
//! Reading is plain [`std::fs::File`] with positioned reads (`read_exact_at`), because
//! hashing is read-only: no durability is involved, and it works on block devices as
//! well as on image files. A block device reports a length of 0 in its metadata, so
//! [`disk_size`] seeks to the end instead.
//!
//! # Extents
//!
//! The ranges [`diff`] returns are [`Extent`]s. Their offsets are multiples of 64 KiB;
//! their ends are multiples of 64 KiB except the last one, which is clipped to
//! `disk_bytes`. When `disk_bytes` is a multiple of [`SECTOR_BYTES`] (always true of
//! block devices) every extent is sector-aligned and passes [`Extent::new`]; for an
//! image file of odd size the final extent ends at the odd `disk_bytes`.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use thiserror::Error;

use crate::extent::{Extent, SECTOR_BYTES};

/// Version of the hash definition above (block size, block hash, root layout).
pub const VERSION: u16 = 1;

/// Bytes per hashed block. Part of the definition: changing it needs a new [`VERSION`].
pub const HASH_BLOCK_BYTES: u64 = 64 * 1024;

/// Bytes of one block hash.
pub const HASH_BYTES: usize = 32;

/// Blocks a worker thread claims, reads (in one call) and hashes at a time. Its read
/// buffer is this many blocks: 1 MiB.
pub const HASH_CHUNK_BLOCKS: u64 = 16;

/// Blocks [`hash_file`] hashes between two progress reports (64 MiB of disk). Each
/// window is one [`hash_range_into`] call, so the worker threads are started once per
/// window.
pub const HASH_WINDOW_BLOCKS: u64 = 1024;

/// Upper bound on worker threads, whatever the caller asks for.
pub const HASH_THREADS_MAX: usize = 64;

/// The blake3 key-derivation context of [`HashList::root`]. Never modify: it names
/// this definition on both sides of the wire.
pub const ROOT_CONTEXT: &str = "blockrep 2025 hashing root v1";

/// The blake3 hash of one block.
pub type BlockHash = [u8; HASH_BYTES];

const HASH_CHUNK_BYTES: usize = (HASH_CHUNK_BLOCKS * HASH_BLOCK_BYTES) as usize;

const _: () = assert!(HASH_BLOCK_BYTES.is_multiple_of(SECTOR_BYTES));
const _: () = assert!(HASH_CHUNK_BLOCKS > 0 && HASH_WINDOW_BLOCKS > 0);
const _: () = assert!(HASH_BYTES == blake3::OUT_LEN);

/// Why a hash list or a range of blocks was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HashError {
    /// The list claims a block size this version does not define.
    #[error("block size {block_bytes} is not the {HASH_BLOCK_BYTES} bytes of version {VERSION}")]
    UnsupportedBlockSize { block_bytes: u64 },
    /// The blocks named do not all lie inside the disk.
    #[error("blocks {first_block}+{count} lie beyond the disk's {disk_blocks} blocks")]
    OutOfRange {
        first_block: u64,
        count: u64,
        disk_blocks: u64,
    },
    /// Two lists do not describe the same disk geometry and block range.
    #[error("hash lists differ in {field}: {a} vs {b}")]
    GeometryMismatch { field: &'static str, a: u64, b: u64 },
}

/// The number of [`HASH_BLOCK_BYTES`] blocks of a disk of `disk_bytes` (the last one
/// may be short).
pub fn disk_blocks(disk_bytes: u64) -> u64 {
    disk_bytes.div_ceil(HASH_BLOCK_BYTES)
}

/// Checks that blocks `[first_block, first_block + count)` lie inside the disk.
fn check_range(disk_bytes: u64, first_block: u64, count: u64) -> Result<(), HashError> {
    let disk_blocks = disk_blocks(disk_bytes);
    match first_block.checked_add(count) {
        Some(end) if end <= disk_blocks => Ok(()),
        _ => Err(HashError::OutOfRange {
            first_block,
            count,
            disk_blocks,
        }),
    }
}

/// The byte offset where `block` starts, clipped to `disk_bytes` (so the end of the
/// last, short block is the end of the disk, and no multiplication overflows).
fn block_offset(block: u64, disk_bytes: u64) -> u64 {
    block
        .checked_mul(HASH_BLOCK_BYTES)
        .map_or(disk_bytes, |o| o.min(disk_bytes))
}

/// The hashes of a range of a disk's blocks, with the geometry they belong to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HashList {
    /// [`HASH_BLOCK_BYTES`]; carried so a list describes itself.
    pub block_bytes: u64,
    /// Size of the whole disk in bytes.
    pub disk_bytes: u64,
    /// Index of the block `hashes[0]` belongs to.
    pub first_block: u64,
    /// One hash per block, in block order.
    pub hashes: Vec<BlockHash>,
}

impl HashList {
    /// Checks the block size and that every hash belongs to a block inside the disk.
    pub fn validate(&self) -> Result<(), HashError> {
        if self.block_bytes != HASH_BLOCK_BYTES {
            return Err(HashError::UnsupportedBlockSize {
                block_bytes: self.block_bytes,
            });
        }
        check_range(self.disk_bytes, self.first_block, self.hashes.len() as u64)
    }

    /// Whether the list covers every block of the disk.
    pub fn is_complete(&self) -> bool {
        self.first_block == 0 && self.hashes.len() as u64 == disk_blocks(self.disk_bytes)
    }

    /// The root: one hash that names the geometry and every block hash (see the module
    /// doc for its exact input). Equal roots mean equal lists.
    pub fn root(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key(ROOT_CONTEXT);
        h.update(&self.disk_bytes.to_le_bytes());
        h.update(&self.block_bytes.to_le_bytes());
        h.update(&self.first_block.to_le_bytes());
        h.update(&(self.hashes.len() as u64).to_le_bytes());
        h.update(self.hashes.as_flattened());
        *h.finalize().as_bytes()
    }
}

/// The hash of one block's bytes (at most [`HASH_BLOCK_BYTES`]; the last block of a
/// disk may be short): plain blake3, as the definition says.
pub fn block_hash(bytes: &[u8]) -> BlockHash {
    *blake3::hash(bytes).as_bytes()
}

/// The complete hash list of in-memory data (tests, benches), single-threaded.
pub fn hash_buffer(data: &[u8]) -> HashList {
    HashList {
        block_bytes: HASH_BLOCK_BYTES,
        disk_bytes: data.len() as u64,
        first_block: 0,
        hashes: data
            .chunks(HASH_BLOCK_BYTES as usize)
            .map(|block| *blake3::hash(block).as_bytes())
            .collect(),
    }
}

/// The worker thread count to use by default: the machine's available parallelism,
/// at most [`HASH_THREADS_MAX`].
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(HASH_THREADS_MAX)
}

/// The size of a file or block device in bytes. Block devices report 0 in their
/// metadata, so this seeks to the end; the file's cursor is put back where it was.
pub fn disk_size(file: &File) -> io::Result<u64> {
    let mut f = file;
    let here = f.stream_position()?;
    let end = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(here))?;
    Ok(end)
}

/// Hashes `count` blocks from `first_block` of a disk of `disk_bytes` with `threads`
/// worker threads (0 counts as 1; at most [`HASH_THREADS_MAX`]).
///
/// Refuses (with [`io::ErrorKind::InvalidInput`]) a range that does not lie inside the
/// disk, before allocating anything. A file shorter than `disk_bytes` gives
/// [`io::ErrorKind::UnexpectedEof`].
pub fn hash_range(
    file: &File,
    disk_bytes: u64,
    first_block: u64,
    count: u64,
    threads: usize,
) -> io::Result<Vec<BlockHash>> {
    check_range(disk_bytes, first_block, count)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let len = usize::try_from(count).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut out = Vec::new();
    out.try_reserve_exact(len)
        .map_err(|e| io::Error::new(io::ErrorKind::OutOfMemory, e))?;
    out.resize(len, [0; HASH_BYTES]);
    hash_range_into(file, disk_bytes, first_block, &mut out, threads)?;
    Ok(out)
}

/// Like [`hash_range`], into a caller's buffer: hashes `out.len()` blocks from
/// `first_block`. Lets a caller walk a large disk with one reused window of hashes.
///
/// Workers take [`HASH_CHUNK_BLOCKS`] blocks at a time from a shared counter, so a
/// slow read on one thread does not hold up the others; each chunk's hashes go to
/// that chunk's own slot of `out`. The first error stops every worker.
pub fn hash_range_into(
    file: &File,
    disk_bytes: u64,
    first_block: u64,
    out: &mut [BlockHash],
    threads: usize,
) -> io::Result<()> {
    hash_source_into(file, disk_bytes, first_block, out, threads)
}

/// Where hashed bytes come from: a file or block device, or anything else that reads
/// at an offset from several threads at once (a recovery point through a view).
pub trait BlockSource: Sync {
    /// Fills `buf` with the bytes at `offset`, or fails.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl BlockSource for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

/// [`hash_range_into`] over any [`BlockSource`]: the same workers, chunks and checks.
pub fn hash_source_into(
    file: &dyn BlockSource,
    disk_bytes: u64,
    first_block: u64,
    out: &mut [BlockHash],
    threads: usize,
) -> io::Result<()> {
    check_range(disk_bytes, first_block, out.len() as u64)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let chunk_blocks = HASH_CHUNK_BLOCKS as usize;
    let chunks = out.len().div_ceil(chunk_blocks);
    let threads = threads.clamp(1, HASH_THREADS_MAX).min(chunks);
    if threads <= 1 {
        // Zero or one chunk of work, or one thread asked for: no thread is worth
        // starting.
        let mut buf =
            vec![0u8; HASH_CHUNK_BYTES.min(out.len().saturating_mul(HASH_BLOCK_BYTES as usize))];
        for (i, slot) in out.chunks_mut(chunk_blocks).enumerate() {
            let block = first_block + (i * chunk_blocks) as u64;
            hash_chunk(file, disk_bytes, block, slot, &mut buf)?;
        }
        return Ok(());
    }

    // One lock per chunk slot, taken once by the one worker that claims the chunk: it
    // is never contended, and it lets the workers share `out` without unsafe code.
    let slots: Vec<Mutex<&mut [BlockHash]>> =
        out.chunks_mut(chunk_blocks).map(Mutex::new).collect();
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let worker = || -> io::Result<()> {
        let mut buf = vec![0u8; HASH_CHUNK_BYTES];
        loop {
            if failed.load(Ordering::Relaxed) {
                return Ok(());
            }
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(slot) = slots.get(i) else {
                return Ok(());
            };
            let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
            let block = first_block + (i * chunk_blocks) as u64;
            if let Err(e) = hash_chunk(file, disk_bytes, block, &mut slot, &mut buf) {
                failed.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(worker)).collect();
        let mut first_err = None;
        for h in handles {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        first_err.map_or(Ok(()), Err)
    })
}

/// Reads the blocks `out` stands for (starting at `first_block`, all inside the disk
/// as checked by the caller) in one positioned read, and hashes each.
fn hash_chunk(
    file: &dyn BlockSource,
    disk_bytes: u64,
    first_block: u64,
    out: &mut [BlockHash],
    buf: &mut [u8],
) -> io::Result<()> {
    let start = block_offset(first_block, disk_bytes);
    let end = block_offset(first_block + out.len() as u64, disk_bytes);
    // The caller checked the range, so at most `out.len()` blocks lie in `start..end`
    // and they fit the buffer.
    let len = (end - start) as usize;
    assert!(len <= buf.len() && len > (out.len() - 1) * HASH_BLOCK_BYTES as usize);
    let data = &mut buf[..len];
    file.read_exact_at(data, start).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("read {len} bytes at offset {start} of a {disk_bytes}-byte disk: {e}"),
        )
    })?;
    for (hash, block) in out.iter_mut().zip(data.chunks(HASH_BLOCK_BYTES as usize)) {
        *hash = *blake3::hash(block).as_bytes();
    }
    Ok(())
}

/// The complete hash list of the file or block device at `path`, with `threads`
/// worker threads. Reads in windows of [`HASH_WINDOW_BLOCKS`] blocks and calls
/// `progress` with the bytes hashed so far after each window (the last call reports
/// `disk_bytes`). The whole list stays in memory: see the module doc.
pub fn hash_file(
    path: impl AsRef<Path>,
    threads: usize,
    progress: &dyn Fn(u64),
) -> io::Result<HashList> {
    hash_file_windowed(path.as_ref(), threads, HASH_WINDOW_BLOCKS, progress)
}

fn hash_file_windowed(
    path: &Path,
    threads: usize,
    window_blocks: u64,
    progress: &dyn Fn(u64),
) -> io::Result<HashList> {
    let file = File::open(path)?;
    let disk_bytes = disk_size(&file)?;
    let blocks = disk_blocks(disk_bytes);
    let blocks_len =
        usize::try_from(blocks).map_err(|e| io::Error::new(io::ErrorKind::OutOfMemory, e))?;
    let mut hashes = Vec::new();
    hashes
        .try_reserve_exact(blocks_len)
        .map_err(|e| io::Error::new(io::ErrorKind::OutOfMemory, e))?;
    let mut done_blocks = 0u64;
    while done_blocks < blocks {
        let n = window_blocks.min(blocks - done_blocks) as usize;
        let at = hashes.len();
        hashes.resize(at + n, [0; HASH_BYTES]);
        hash_range_into(&file, disk_bytes, done_blocks, &mut hashes[at..], threads)?;
        done_blocks += n as u64;
        progress(block_offset(done_blocks, disk_bytes));
    }
    Ok(HashList {
        block_bytes: HASH_BLOCK_BYTES,
        disk_bytes,
        first_block: 0,
        hashes,
    })
}

/// The byte ranges where two hash lists of the same disk range differ: runs of
/// adjacent differing blocks merged into one extent each, the last one clipped to
/// `disk_bytes`, in disk order.
///
/// Refuses lists that do not describe the same geometry and block range
/// ([`HashError::GeometryMismatch`] names the field), or that are not valid on their
/// own ([`HashList::validate`]).
pub fn diff(a: &HashList, b: &HashList) -> Result<Vec<Extent>, HashError> {
    let fields = [
        ("block_bytes", a.block_bytes, b.block_bytes),
        ("disk_bytes", a.disk_bytes, b.disk_bytes),
        ("first_block", a.first_block, b.first_block),
        ("block_count", a.hashes.len() as u64, b.hashes.len() as u64),
    ];
    for (field, x, y) in fields {
        if x != y {
            return Err(HashError::GeometryMismatch { field, a: x, b: y });
        }
    }
    a.validate()?;
    let mut out = Vec::new();
    diff_into(a.disk_bytes, a.first_block, &a.hashes, &b.hashes, &mut out)?;
    Ok(out)
}

/// The streaming form of [`diff`], for lists that arrive in chunks: compares the
/// hashes of blocks `first_block..first_block + a.len()` of a disk of `disk_bytes` and
/// appends the differing ranges to `out`. A range that starts where the last extent
/// in `out` ends is merged into it, so feeding consecutive chunks in order gives the
/// same extents as one [`diff`] of the whole lists.
///
/// Refuses chunks of unequal length and ranges outside the disk, leaving `out`
/// unchanged.
pub fn diff_into(
    disk_bytes: u64,
    first_block: u64,
    a: &[BlockHash],
    b: &[BlockHash],
    out: &mut Vec<Extent>,
) -> Result<(), HashError> {
    if a.len() != b.len() {
        return Err(HashError::GeometryMismatch {
            field: "block_count",
            a: a.len() as u64,
            b: b.len() as u64,
        });
    }
    check_range(disk_bytes, first_block, a.len() as u64)?;
    let mut run_start: Option<u64> = None;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let block = first_block + i as u64;
        match (x != y, run_start) {
            (true, None) => run_start = Some(block),
            (false, Some(start)) => {
                push_merged(out, start, block, disk_bytes);
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run_start {
        push_merged(out, start, first_block + a.len() as u64, disk_bytes);
    }
    Ok(())
}

/// What [`differing_parts`] found in one range.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartsDiff {
    /// The byte ranges to send, ascending, adjacent ones merged.
    pub parts: Vec<Extent>,
    /// Blocks compared by hash (wholly inside the range, a hash given for them).
    pub compared_blocks: u64,
    /// Blocks among those whose hashes matched: they are not sent.
    pub equal_blocks: u64,
}

/// The pieces of `data` (a disk's bytes at `offset`) that differ from a copy of the
/// disk whose block hashes are `theirs` (blocks `first_block..first_block +
/// theirs.len()`): a hash-diff resync sends only these. A block is left out only when
/// it lies wholly inside the range, its hash is given, and it equals
/// `blake3(block bytes)`; every other block the range touches is sent (its part inside
/// the range), so a range that is not block-aligned, or hashes that do not cover it,
/// cost bytes, never correctness.
pub fn differing_parts(
    disk_bytes: u64,
    offset: u64,
    data: &[u8],
    first_block: u64,
    theirs: &[BlockHash],
) -> PartsDiff {
    let end = offset.saturating_add(data.len() as u64).min(disk_bytes);
    let mut out = PartsDiff::default();
    if offset >= end {
        return out;
    }
    let mut block = offset / HASH_BLOCK_BYTES;
    while block_offset(block, disk_bytes) < end {
        let b_start = block_offset(block, disk_bytes);
        let b_end = block_offset(block + 1, disk_bytes);
        let from = b_start.max(offset);
        let to = b_end.min(end);
        let whole = b_start >= offset && b_end <= end;
        let their = block
            .checked_sub(first_block)
            .and_then(|k| theirs.get(usize::try_from(k).ok()?));
        let equal = match (whole, their) {
            (true, Some(h)) => {
                out.compared_blocks += 1;
                let bytes = &data[(b_start - offset) as usize..(b_end - offset) as usize];
                blake3::hash(bytes).as_bytes() == h
            }
            _ => false,
        };
        if equal {
            out.equal_blocks += 1;
        } else {
            match out.parts.last_mut() {
                Some(last) if last.end() == from => last.len += to - from,
                _ => out.parts.push(Extent {
                    offset: from,
                    len: to - from,
                }),
            }
        }
        block += 1;
    }
    out
}

/// Appends blocks `[start_block, end_block)` as bytes, merging with the last extent
/// when they touch.
fn push_merged(out: &mut Vec<Extent>, start_block: u64, end_block: u64, disk_bytes: u64) {
    let offset = block_offset(start_block, disk_bytes);
    let end = block_offset(end_block, disk_bytes);
    assert!(
        offset < end,
        "a run of differing blocks inside the disk is never empty"
    );
    match out.last_mut() {
        Some(last) if last.end() == offset => last.len += end - offset,
        _ => out.push(Extent {
            offset,
            len: end - offset,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cell::RefCell;
    use std::io::Write;

    const BS: u64 = HASH_BLOCK_BYTES;

    /// Deterministic pseudo-random bytes (xorshift64*), so tests need no extra crate.
    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            v.extend_from_slice(&s.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        v.truncate(len);
        v
    }

    fn temp_file_with(data: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(data).unwrap();
        f.flush().unwrap();
        f
    }

    /// The model: blake3 of each block, computed with no cleverness at all.
    fn naive_hashes(data: &[u8]) -> Vec<BlockHash> {
        let mut out = Vec::new();
        let mut at = 0usize;
        while at < data.len() {
            let end = (at + BS as usize).min(data.len());
            out.push(*blake3::hash(&data[at..end]).as_bytes());
            at = end;
        }
        out
    }

    /// The model of a diff: compare the bytes block by block, merge adjacent changed
    /// blocks, clip to the data length.
    fn naive_diff(a: &[u8], b: &[u8]) -> Vec<Extent> {
        assert_eq!(a.len(), b.len());
        let mut out: Vec<Extent> = Vec::new();
        for (i, (x, y)) in a.chunks(BS as usize).zip(b.chunks(BS as usize)).enumerate() {
            if x == y {
                continue;
            }
            let offset = i as u64 * BS;
            let len = x.len() as u64;
            match out.last_mut() {
                Some(last) if last.end() == offset => last.len += len,
                _ => out.push(Extent { offset, len }),
            }
        }
        out
    }

    /// Sizes around every boundary that matters: empty, sectors, blocks, chunks.
    const SIZES: &[u64] = &[
        0,
        1,
        511,
        512,
        513,
        BS - 1,
        BS,
        BS + 1,
        BS + 512,
        5 * BS + 700,
        16 * BS,
        16 * BS + 1,
        17 * BS - 3,
        40 * BS + 3,
    ];

    /// Proves every block hash equals the naive blake3 of that block's bytes, for
    /// sizes that are not multiples of 64 KiB or of 512, with one and several threads.
    #[test]
    fn block_hashes_match_naive_blake3() {
        for (k, &size) in SIZES.iter().enumerate() {
            let data = pseudo_random(size as usize, k as u64 + 1);
            let f = temp_file_with(&data);
            let want = naive_hashes(&data);
            assert_eq!(want.len() as u64, disk_blocks(size));
            for threads in [1, 2, 3] {
                let got = hash_file(f.path(), threads, &|_| {}).unwrap();
                assert_eq!(got.disk_bytes, size);
                assert_eq!(got.block_bytes, BS);
                assert_eq!(got.first_block, 0);
                assert!(got.is_complete());
                assert_eq!(got.hashes, want, "size {size}, {threads} threads");
            }
            assert_eq!(hash_buffer(&data).hashes, want, "hash_buffer, size {size}");
        }
    }

    /// Proves the last block of a disk hashes only the bytes inside the disk: padding
    /// it with zeros to a full block changes its hash.
    #[test]
    fn short_last_block_is_not_padded() {
        let data = pseudo_random((BS + 100) as usize, 7);
        let mut padded = data.clone();
        padded.resize(2 * BS as usize, 0);
        let short = hash_buffer(&data);
        let full = hash_buffer(&padded);
        assert_eq!(short.hashes[0], full.hashes[0]);
        assert_ne!(short.hashes[1], full.hashes[1]);
        assert_eq!(
            short.hashes[1],
            *blake3::hash(&data[BS as usize..]).as_bytes()
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Proves any in-disk range hashed with any thread count equals the same slice
        /// of the single-threaded, naive list.
        #[test]
        fn threads_agree_on_any_range(
            blocks in 0u64..40,
            tail in 0u64..BS,
            seed in any::<u64>(),
            first_pick in any::<u64>(),
            count_pick in any::<u64>(),
            threads in 0usize..6,
        ) {
            let size = blocks * BS + tail;
            let data = pseudo_random(size as usize, seed);
            let f = temp_file_with(&data);
            let file = f.as_file();
            let total = disk_blocks(size);
            let first = first_pick % (total + 1);
            let count = count_pick % (total - first + 1);
            let want = naive_hashes(&data);
            let single = hash_range(file, size, first, count, 1).unwrap();
            let multi = hash_range(file, size, first, count, threads).unwrap();
            prop_assert_eq!(&single[..], &want[first as usize..(first + count) as usize]);
            prop_assert_eq!(multi, single);
        }
    }

    /// Proves `hash_file` visits the disk in windows, reports rising progress ending at
    /// `disk_bytes`, and that window boundaries do not change the result.
    #[test]
    fn windows_and_progress() {
        let size = 10 * BS + 5;
        let data = pseudo_random(size as usize, 3);
        let f = temp_file_with(&data);
        for window in [1, 3, 11, 12, HASH_WINDOW_BLOCKS] {
            let seen = RefCell::new(Vec::new());
            let list =
                hash_file_windowed(f.path(), 2, window, &|b| seen.borrow_mut().push(b)).unwrap();
            assert_eq!(list, hash_buffer(&data), "window {window}");
            let seen = seen.into_inner();
            assert_eq!(seen.len() as u64, disk_blocks(size).div_ceil(window));
            assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
            assert_eq!(seen.last(), Some(&size));
            if window == 3 {
                assert_eq!(seen, vec![3 * BS, 6 * BS, 9 * BS, size]);
            }
        }
    }

    /// Proves ranges outside the disk (including ones whose end overflows u64) are
    /// refused as invalid input before anything is allocated.
    #[test]
    fn ranges_beyond_the_disk_are_refused() {
        let data = pseudo_random((3 * BS + 1) as usize, 5);
        let f = temp_file_with(&data);
        let file = f.as_file();
        let size = data.len() as u64;
        for (first, count) in [(0, 5), (4, 1), (5, 0), (1, u64::MAX), (u64::MAX, 1)] {
            let err = hash_range(file, size, first, count, 2).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{first}+{count}");
        }
        assert_eq!(
            hash_range(file, size, 4, 0, 2).unwrap(),
            Vec::<BlockHash>::new()
        );
        assert_eq!(
            hash_range(file, size, 0, 4, 2).unwrap(),
            naive_hashes(&data)
        );
        let mut out = vec![[0u8; HASH_BYTES]; 2];
        let err = hash_range_into(file, size, 3, &mut out, 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    /// Proves a file shorter than the disk size the caller claims gives an
    /// unexpected-EOF error, with one or several threads, instead of hashing garbage.
    #[test]
    fn file_shorter_than_claimed_is_an_error() {
        let data = pseudo_random((40 * BS) as usize, 9);
        let f = temp_file_with(&data);
        for threads in [1, 2, 4] {
            let err = hash_range(f.as_file(), 40 * BS + 1, 0, 41, threads).unwrap_err();
            assert_eq!(
                err.kind(),
                io::ErrorKind::UnexpectedEof,
                "{threads} threads"
            );
        }
    }

    /// Proves `disk_size` gives the file's length by seeking and leaves the cursor
    /// where it was.
    #[test]
    fn disk_size_seeks_and_restores_the_cursor() {
        let f = temp_file_with(&pseudo_random(3 * BS as usize + 17, 2));
        let mut file = f.as_file();
        file.seek(SeekFrom::Start(1234)).unwrap();
        assert_eq!(disk_size(file).unwrap(), 3 * BS + 17);
        assert_eq!(file.stream_position().unwrap(), 1234);
    }

    /// Proves an empty file hashes to an empty, complete list whose diff with itself is
    /// empty and whose root is that of an empty buffer.
    #[test]
    fn empty_file() {
        let f = temp_file_with(&[]);
        let calls = RefCell::new(0);
        let list = hash_file(f.path(), 2, &|_| *calls.borrow_mut() += 1).unwrap();
        assert_eq!(list.disk_bytes, 0);
        assert!(list.hashes.is_empty());
        assert!(list.is_complete());
        assert_eq!(*calls.borrow(), 0);
        assert_eq!(list, hash_buffer(&[]));
        assert_eq!(list.root(), hash_buffer(&[]).root());
        assert_ne!(list.root(), hash_buffer(&[0]).root());
        assert_eq!(diff(&list, &list).unwrap(), vec![]);
        assert_eq!(
            hash_range(f.as_file(), 0, 0, 0, 2).unwrap(),
            Vec::<BlockHash>::new()
        );
    }

    /// Flips the bytes named by `flips` (position picks, xor values) in a copy.
    fn flipped(data: &[u8], flips: &[(u64, u8)]) -> Vec<u8> {
        let mut b = data.to_vec();
        if !b.is_empty() {
            for &(pick, x) in flips {
                let at = (pick % b.len() as u64) as usize;
                b[at] ^= x;
            }
        }
        b
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Proves `diff` finds exactly the changed blocks as merged, clipped ranges, and
        /// that feeding `diff_into` the lists in random chunks gives the same extents.
        #[test]
        fn diff_finds_exactly_the_changed_blocks(
            blocks in 0u64..12,
            tail in prop_oneof![Just(0u64), 0u64..BS, (0u64..128).prop_map(|s| s * 512)],
            seed in any::<u64>(),
            flips in proptest::collection::vec((any::<u64>(), any::<u8>()), 0..10),
            cuts in proptest::collection::vec(1usize..6, 0..8),
        ) {
            let size = blocks * BS + tail;
            let a = pseudo_random(size as usize, seed);
            let b = flipped(&a, &flips);
            let (ha, hb) = (hash_buffer(&a), hash_buffer(&b));
            let want = naive_diff(&a, &b);
            let got = diff(&ha, &hb).unwrap();
            prop_assert_eq!(&got, &want);
            prop_assert_eq!(diff(&hb, &ha).unwrap(), want.clone());
            prop_assert_eq!(diff(&ha, &ha).unwrap(), vec![]);
            prop_assert_eq!(ha.root() == hb.root(), want.is_empty());
            for e in &got {
                prop_assert_eq!(e.offset % BS, 0);
                prop_assert!(e.end() <= size);
                if size.is_multiple_of(SECTOR_BYTES) {
                    prop_assert!(Extent::new(e.offset, e.len, size).is_ok());
                }
            }

            let mut streamed = Vec::new();
            let mut at = 0usize;
            let mut cuts = cuts.into_iter().cycle();
            while at < ha.hashes.len() {
                let n = cuts.next().unwrap_or(ha.hashes.len()).min(ha.hashes.len() - at);
                diff_into(size, at as u64, &ha.hashes[at..at + n], &hb.hashes[at..at + n], &mut streamed)
                    .unwrap();
                at += n;
            }
            prop_assert_eq!(streamed, want);
        }
    }

    /// Proves diff merges adjacent blocks, keeps separate runs apart, and clips the
    /// last extent to a disk size that is not a multiple of 64 KiB.
    #[test]
    fn diff_merges_and_clips() {
        let size = 6 * BS + 1000;
        let a = pseudo_random(size as usize, 4);
        let mut b = a.clone();
        for at in [0, BS + 3, 3 * BS + 9, size - 1] {
            b[at as usize] ^= 0xff;
        }
        let got = diff(&hash_buffer(&a), &hash_buffer(&b)).unwrap();
        let want = vec![
            Extent {
                offset: 0,
                len: 2 * BS,
            },
            Extent {
                offset: 3 * BS,
                len: BS,
            },
            Extent {
                offset: 6 * BS,
                len: 1000,
            },
        ];
        assert_eq!(got, want);
    }

    /// Proves lists of different geometry or range are refused with a typed error that
    /// names the field, and that partial lists of the same range compare fine.
    #[test]
    fn geometry_mismatch_is_a_typed_error() {
        let data = pseudo_random((4 * BS + 10) as usize, 6);
        let a = hash_buffer(&data);
        type Change = fn(&mut HashList);
        let cases: [(&str, Change); 4] = [
            ("block_bytes", |l| l.block_bytes = 4096),
            ("disk_bytes", |l| l.disk_bytes += 1),
            ("first_block", |l| l.first_block = 1),
            ("block_count", |l| {
                l.hashes.pop();
            }),
        ];
        for (name, change) in cases {
            let mut b = a.clone();
            change(&mut b);
            match diff(&a, &b) {
                Err(HashError::GeometryMismatch { field, .. }) => assert_eq!(field, name),
                other => panic!("{name}: {other:?}"),
            }
            assert!(matches!(
                diff(&b, &a),
                Err(HashError::GeometryMismatch { .. })
            ));
        }

        let part = |l: &HashList| HashList {
            first_block: 1,
            hashes: l.hashes[1..3].to_vec(),
            ..l.clone()
        };
        let mut other = data.clone();
        other[(2 * BS) as usize] ^= 1;
        let b = hash_buffer(&other);
        assert_eq!(
            diff(&part(&a), &part(&b)).unwrap(),
            vec![Extent {
                offset: 2 * BS,
                len: BS
            }]
        );

        let mut out = Vec::new();
        assert!(matches!(
            diff_into(data.len() as u64, 0, &a.hashes, &a.hashes[1..], &mut out),
            Err(HashError::GeometryMismatch {
                field: "block_count",
                ..
            })
        ));
        assert!(out.is_empty());
    }

    /// Proves lists that are not valid on their own (unknown block size, hashes beyond
    /// the disk, an overflowing first block) are refused, never panic.
    #[test]
    fn invalid_lists_are_refused() {
        let a = hash_buffer(&pseudo_random((2 * BS) as usize, 8));
        let with = |f: &dyn Fn(&mut HashList)| {
            let mut l = a.clone();
            f(&mut l);
            l
        };
        let bad_block = with(&|l| l.block_bytes = 4096);
        assert!(matches!(
            diff(&bad_block, &bad_block),
            Err(HashError::UnsupportedBlockSize { block_bytes: 4096 })
        ));
        let too_many = with(&|l| l.hashes.push([0; 32]));
        assert!(matches!(
            diff(&too_many, &too_many),
            Err(HashError::OutOfRange { disk_blocks: 2, .. })
        ));
        let overflow = with(&|l| l.first_block = u64::MAX);
        assert!(matches!(
            diff(&overflow, &overflow),
            Err(HashError::OutOfRange { .. })
        ));
        let tiny = with(&|l| l.disk_bytes = 1);
        assert!(matches!(tiny.validate(), Err(HashError::OutOfRange { .. })));
        let mut out = Vec::new();
        assert!(diff_into(2 * BS, 1, &a.hashes, &a.hashes, &mut out).is_err());
        assert!(diff_into(u64::MAX, u64::MAX, &a.hashes, &a.hashes, &mut out).is_err());
        assert!(out.is_empty());
        assert!(a.validate().is_ok());
    }

    /// Proves the root changes when any single block changes, and when the disk size
    /// or the first block changes, and is stable for equal lists.
    #[test]
    fn root_changes_when_any_block_changes() {
        let size = 6 * BS + 100;
        let data = pseudo_random(size as usize, 11);
        let base = hash_buffer(&data);
        assert_eq!(base.root(), hash_buffer(&data.clone()).root());
        let mut roots = vec![base.root()];
        for block in 0..disk_blocks(size) {
            let mut d = data.clone();
            d[(block * BS) as usize + 17.min((size - block * BS - 1) as usize)] ^= 0x40;
            roots.push(hash_buffer(&d).root());
        }
        let distinct: std::collections::HashSet<_> = roots.iter().collect();
        assert_eq!(
            distinct.len(),
            roots.len(),
            "every one-block change moves the root"
        );
        let moved = HashList {
            first_block: 1,
            disk_bytes: size + BS,
            ..base.clone()
        };
        assert_ne!(moved.root(), base.root());
        let bigger = HashList {
            disk_bytes: size + 1,
            ..base.clone()
        };
        assert_ne!(bigger.root(), base.root());
    }

    /// Proves `default_threads` stays within 1..=HASH_THREADS_MAX.
    /// Proves `differing_parts` leaves out exactly the whole blocks whose hashes match,
    /// sends partial blocks at unaligned edges and blocks without a hash, clips to the
    /// disk, and merges adjacent pieces.
    #[test]
    fn differing_parts_examples() {
        let disk = 5 * BS + 4096; // a short last block
        let mine = pseudo_random(disk as usize, 9);
        let mut theirs_data = mine.clone();
        theirs_data[(2 * BS + 5) as usize] ^= 1; // block 2 differs
        let theirs = naive_hashes(&theirs_data);
        let e = |offset, len| Extent { offset, len };
        // The whole disk: only block 2 is sent; the short block 5 matches.
        let d = differing_parts(disk, 0, &mine, 0, &theirs);
        assert_eq!(d.parts, vec![e(2 * BS, BS)]);
        assert_eq!((d.compared_blocks, d.equal_blocks), (6, 5));
        // Unaligned range from 4 KiB into block 0 to 4 KiB into block 3: the partial
        // blocks 0 and 3 are sent, block 1 matches, block 2 differs (merged with 3).
        let (from, to) = (4096u64, 3 * BS + 4096);
        let d = differing_parts(disk, from, &mine[from as usize..to as usize], 0, &theirs);
        assert_eq!(d.parts, vec![e(4096, BS - 4096), e(2 * BS, BS + 4096)]);
        assert_eq!((d.compared_blocks, d.equal_blocks), (2, 1));
        // Hashes for blocks 1..3 only: blocks 0, 3, 4, 5 are sent.
        let d = differing_parts(disk, 0, &mine, 1, &theirs[1..3]);
        assert_eq!(d.parts, vec![e(0, BS), e(2 * BS, disk - 2 * BS)]);
        assert_eq!((d.compared_blocks, d.equal_blocks), (2, 1));
        // Nothing to compare.
        assert_eq!(
            differing_parts(disk, disk, &[], 0, &theirs),
            PartsDiff::default()
        );
    }

    #[test]
    fn default_threads_is_bounded() {
        let n = default_threads();
        assert!((1..=HASH_THREADS_MAX).contains(&n));
    }
}
