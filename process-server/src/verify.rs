//! The online verify (`process-server verify --disk D`): compares a disk with the
//! master target's copy by 64 KiB block hashes, while both keep running, and reports
//! the ranges that differ. DRBD calls this an online verify.
//!
//! The master target hashes the disk at its newest consistent point (protocol 3,
//! [`HashOf::ConsistentPoint`], fetched ahead with a [`Prefetch`]); this side reads the
//! disk in 1 MiB chunks under the range lock (no write in flight in the chunk) and
//! hashes them. A block whose hashes differ is:
//!
//! - **in flight, not compared** when any of its 4 KiB dirty bits is set: it changed
//!   since the last point the master target acknowledged (or is still in its initial
//!   sync), so the copy at that point is expected to differ;
//! - otherwise a **candidate** difference. Between the master target's hashing and our
//!   read, a newer point may have been acknowledged, clearing bits of blocks the copy
//!   hashed before they changed; so every candidate is checked once more at the end,
//!   with fresh hashes and a fresh read. What still differs with no dirty bit is a
//!   **difference**: the replica does not hold what was written (a damaged replica, a
//!   bug).
//!
//! Nothing is written anywhere; memory is one chunk, the hashes in flight and the
//! candidate ranges.

use std::time::Instant;

use anyhow::{Context, bail};
use datapath::extent::Extent;
use datapath::frame::{HashOf, HashStatus};
use datapath::hashing::{self, BlockHash, HASH_BLOCK_BYTES};
use serde_json::{Value, json};

use crate::hashes::{Fetched, HashBroker, Prefetch};
use crate::nbd_server::Exports;
use crate::tracking::Tracking;

/// Blocks read and compared at a time (1 MiB).
pub const VERIFY_CHUNK_BLOCKS: u64 = 16;

/// What a verify found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    pub disk: String,
    pub group: String,
    pub size_bytes: u64,
    /// The master target's points whose states were compared (0: its replica).
    pub points: Vec<u64>,
    /// Blocks compared (not in flight).
    pub compared_blocks: u64,
    pub compared_bytes: u64,
    /// Blocks in flight (dirty), not compared.
    pub in_flight: Vec<Extent>,
    pub in_flight_blocks: u64,
    /// Blocks that differ with no write in flight.
    pub differing: Vec<Extent>,
    pub differing_blocks: u64,
    pub seconds: f64,
}

impl Report {
    /// The JSON form (`verify --json` prints it).
    pub fn to_json(&self) -> Value {
        let ranges = |v: &[Extent]| -> Vec<Value> {
            v.iter()
                .map(|e| json!({"offset": e.offset, "len": e.len}))
                .collect()
        };
        json!({
            "disk": self.disk,
            "group": self.group,
            "size_bytes": self.size_bytes,
            "points": self.points,
            "compared_blocks": self.compared_blocks,
            "compared_bytes": self.compared_bytes,
            "in_flight_blocks": self.in_flight_blocks,
            "in_flight": ranges(&self.in_flight),
            "differing_blocks": self.differing_blocks,
            "differing": ranges(&self.differing),
            "seconds": self.seconds,
        })
    }
}

/// How one block compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    Equal,
    InFlight,
    Differs,
}

/// Appends `[offset, offset + len)` to `v`, merged with the last range when adjacent.
fn push(v: &mut Vec<Extent>, offset: u64, len: u64) {
    match v.last_mut() {
        Some(last) if last.end() == offset => last.len += len,
        _ => v.push(Extent { offset, len }),
    }
}

/// Verifies `disk` against the master target's copy (see the module doc).
pub fn verify(
    broker: &HashBroker,
    tracking: &Tracking,
    exports: &Exports,
    disk: &str,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let export = exports
        .get(disk)
        .with_context(|| format!("unknown disk {disk:?}"))?;
    let size = export.size_bytes;
    let blocks = hashing::disk_blocks(size);
    let mut rep = Report {
        disk: disk.to_string(),
        group: export.group.clone(),
        size_bytes: size,
        ..Report::default()
    };
    let mut prefetch = Prefetch::new(&export.group, disk, size, HashOf::ConsistentPoint);
    let mut candidates: Vec<Extent> = Vec::new();
    let mut buf = Vec::new();
    let mut first = 0u64;
    while first < blocks {
        let count = VERIFY_CHUNK_BLOCKS.min(blocks - first);
        let theirs = fetch(&mut prefetch, broker, first, count)?;
        for (b, seen) in compare(tracking, exports, disk, first, &theirs, &mut buf)? {
            let (offset, len) = block_range(b, size);
            match seen {
                Seen::Equal => {
                    rep.compared_blocks += 1;
                    rep.compared_bytes += len;
                }
                Seen::InFlight => {
                    rep.in_flight_blocks += 1;
                    push(&mut rep.in_flight, offset, len);
                }
                Seen::Differs => push(&mut candidates, offset, len),
            }
        }
        first += count;
    }
    // Candidates once more, with fresh hashes (of just these blocks) and a fresh read.
    for c in candidates {
        let mut b = c.offset / HASH_BLOCK_BYTES;
        let end = c.end().div_ceil(HASH_BLOCK_BYTES);
        while b < end {
            let count = VERIFY_CHUNK_BLOCKS.min(end - b);
            let (theirs, point) = fetch_exact(broker, &export.group, disk, b, count)?;
            if let Err(at) = rep.points.binary_search(&point) {
                rep.points.insert(at, point);
            }
            for (blk, seen) in compare(tracking, exports, disk, b, &theirs, &mut buf)? {
                let (offset, len) = block_range(blk, size);
                rep.compared_blocks += u64::from(seen != Seen::InFlight);
                match seen {
                    Seen::Equal => rep.compared_bytes += len,
                    Seen::InFlight => {
                        rep.in_flight_blocks += 1;
                        push(&mut rep.in_flight, offset, len);
                    }
                    Seen::Differs => {
                        rep.compared_bytes += len;
                        rep.differing_blocks += 1;
                        push(&mut rep.differing, offset, len);
                    }
                }
            }
            b += count;
        }
    }
    for p in prefetch.points() {
        if let Err(at) = rep.points.binary_search(p) {
            rep.points.insert(at, *p);
        }
    }
    rep.in_flight.sort_unstable();
    rep.seconds = started.elapsed().as_secs_f64();
    Ok(rep)
}

/// The byte range of block `b` of a disk of `size` bytes.
fn block_range(b: u64, size: u64) -> (u64, u64) {
    let offset = b * HASH_BLOCK_BYTES;
    (offset, (offset + HASH_BLOCK_BYTES).min(size) - offset)
}

/// The master target's hashes of `count` blocks from `first`, or why there are none.
fn fetch(
    p: &mut Prefetch,
    broker: &HashBroker,
    first: u64,
    count: u64,
) -> anyhow::Result<Vec<BlockHash>> {
    match p.get(broker, first, count) {
        Ok(Fetched::Hashes(h)) => Ok(h),
        Ok(Fetched::Refused(HashStatus::NoPoint)) => bail!(
            "the master target holds no consistent point of this disk's group yet (the first \
             comes once the initial sync has ended)"
        ),
        Ok(Fetched::Refused(_) | Fetched::NoCopy) => {
            bail!("the master target could not hash its copy (its log says why)")
        }
        Err(e) => bail!("hashes of the master target's copy: {e}"),
    }
}

/// The master target's hashes of exactly `count` blocks from `first`, asked for now,
/// and the point they were hashed at.
fn fetch_exact(
    broker: &HashBroker,
    group: &str,
    disk: &str,
    first: u64,
    count: u64,
) -> anyhow::Result<(Vec<BlockHash>, u64)> {
    let id = broker
        .ask(group, disk, HashOf::ConsistentPoint, first, count as u32)
        .map_err(|e| anyhow::anyhow!("hashes of the master target's copy: {e}"))?;
    let l = broker
        .wait(id)
        .map_err(|e| anyhow::anyhow!("hashes of the master target's copy: {e}"))?;
    match l.status {
        HashStatus::Hashes => Ok((l.hashes, l.point_id)),
        s => bail!("the master target gave no hashes ({s:?}; its log says why)"),
    }
}

/// Reads the blocks from `first` under the range lock and compares each with
/// `theirs`; a differing block with a dirty bit is in flight.
fn compare(
    tracking: &Tracking,
    exports: &Exports,
    disk: &str,
    first: u64,
    theirs: &[BlockHash],
    buf: &mut Vec<u8>,
) -> anyhow::Result<Vec<(u64, Seen)>> {
    let export = exports
        .get(disk)
        .with_context(|| format!("unknown disk {disk:?}"))?;
    let size = export.size_bytes;
    let offset = first * HASH_BLOCK_BYTES;
    let end = ((first + theirs.len() as u64) * HASH_BLOCK_BYTES).min(size);
    let len = end - offset;
    buf.resize(len as usize, 0);
    let tracker = tracking
        .group(&export.group)
        .with_context(|| format!("no tracking of group {}", export.group))?;
    let ranges = tracking.in_flight();
    ranges.acquire(disk, offset, len);
    let r = (|| {
        export
            .store
            .read_at(buf, offset)
            .map_err(|e| anyhow::anyhow!("read {len} bytes at {offset} of {disk}: {e}"))?;
        // Dirty bits after the read: a write since the read has marked its blocks.
        let t = tracker
            .lock()
            .map_err(|_| anyhow::anyhow!("tracking failed earlier"))?;
        let mut out = Vec::with_capacity(theirs.len());
        for (i, h) in theirs.iter().enumerate() {
            let b = first + i as u64;
            let (o, l) = block_range(b, size);
            let mine = hashing::block_hash(&buf[(o - offset) as usize..(o - offset + l) as usize]);
            let seen = if &mine == h {
                Seen::Equal
            } else if t
                .any_dirty(disk, Extent { offset: o, len: l })
                .unwrap_or(true)
            {
                Seen::InFlight
            } else {
                Seen::Differs
            };
            out.push((b, seen));
        }
        anyhow::Ok(out)
    })();
    ranges.release(disk, offset, len);
    r
}
