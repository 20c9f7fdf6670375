//! The resync driver: brings a group out of bitmap-only tracking (spool overflow, an
//! unclean restart, or a disk's first protection) by reading its dirty blocks from the
//! backing disks into the spool, from where the shipper sends them like any write.
//!
//! One blocking thread per group. While the group is bitmap-only and its spool is at
//! most half full (so the link works: only acknowledgements free the spool), it starts
//! a pass ([`GroupTracker::begin_resync`]). Then, extent by extent
//! ([`GroupTracker::next_resync_extent`], at most [`RESYNC_EXTENT_BYTES_MAX`] or a
//! sixteenth of the spool): hold the extent's range in [`InFlightRanges`] (so no write
//! to it is between its dirty mark and its spool record), read it from the backing
//! disk, record it ([`GroupTracker::record_resync`]: all-zero blocks cost no data),
//! release the range. The tracker lock is held only to pick and to record an extent,
//! never during the read, so writes go on meanwhile. The pass waits while the spool is
//! more than half full, leaving room for the writes that keep coming. When every extent
//! is recorded, [`GroupTracker::finish_resync`] and a cut at once: a consistent point.
//!
//! Progress: a bar on a terminal (stderr), a log line every [`LOG_EVERY`], and the
//! tracker's [`datapath::tracker::ResyncProgress`] in `status`.
//!
//! # Hash-diff initial sync (reprotect)
//!
//! When the group has disks in their initial sync, `[tracking] hash_diff` is on (the
//! default) and the master target speaks protocol 3, the pass compares instead of
//! copying (the argument that makes it exact is in `datapath::tracker`, "Hash-diff"):
//!
//! 1. It starts only once every record spooled before it is acknowledged
//!    ([`GroupTracker::begin_hash_diff_resync`]); until a session with the master
//!    target exists, the initial sync waits for one.
//! 2. Per extent (at most 1 MiB, grown to whole 64 KiB blocks): the master target's
//!    hashes of the blocks are fetched first, outside every lock, by a [`Prefetch`]
//!    that keeps [`crate::hashes::HASH_REQUESTS_AHEAD`] requests of up to 16 MiB in
//!    flight ahead of the reader, for the dirty runs the pass will read next (all of
//!    the disk in a full initial sync; only the change lists' union in an initial
//!    sync from lists, so the master target hashes nothing else); then, under the range lock, the extent is read, its 64 KiB blocks
//!    hashed and compared ([`datapath::hashing::differing_parts`]), and only the
//!    differing blocks are recorded ([`GroupTracker::record_resync_parts`]); the
//!    others' dirty bits are cleared.
//! 3. A master target that has no copy of a disk (a blank replica) says so once: that
//!    disk is then read and recorded in full for the rest of the pass ("no copy: full
//!    sync"; a disk whose initial sync started from change lists, which assumed a copy,
//!    first gets every block marked dirty and the pass reads it from its start), as is an extent whose hashes could not be had (the master target failed
//!    to hash, no answer in time). A lost connection makes the extent wait for the
//!    next session.
//! 4. Counters: 64 KiB blocks compared and blocks sent, per disk, in `status`
//!    (`disks[].resync_compared_blocks`, `.resync_sent_blocks`) and `/metrics`, and a
//!    log line when the pass ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datapath::extent::Extent;
use datapath::frame::{HASH_PROTOCOL_VERSION, HashOf};
use datapath::hashing::{BlockHash, HASH_BLOCK_BYTES, PartsDiff, default_threads, differing_parts};
use datapath::tracker::{GroupTracker, RESYNC_EXTENT_BYTES_MAX, TrackMode};
use indicatif::{ProgressBar, ProgressStyle};
use tracing::{error, info, warn};

use crate::hashes::{Fetched, HashBroker, Prefetch, Unavailable};
use crate::nbd_server::{Export, Exports};
use crate::tracking::{Tracking, now_unix_ms};

/// How often an idle driver looks at its group again.
pub const POLL: Duration = Duration::from_millis(50);
/// How often a pass under way logs its progress.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// Bytes a hash-diff pass reads and compares at a time (at most a sixteenth of the
/// spool): the differing parts are still recorded in pieces of at most
/// [`RESYNC_EXTENT_BYTES_MAX`].
pub const HASH_DIFF_EXTENT_BYTES: u64 = 8 << 20;
/// Bytes a resync reader reads before it hashes them (whole 64 KiB blocks; small
/// enough to stay in a core's cache in between).
const READ_PIECE_BYTES: usize = 256 << 10;

/// What one step found to do.
enum Step {
    Idle,
    /// A pass began; these disks are compared by hash.
    Begun {
        hash_diff: Vec<String>,
    },
    Read {
        disk: String,
        ext: Extent,
    },
    Done {
        initial: Vec<String>,
        /// The consistent point cut as the pass ended.
        point: Option<u64>,
    },
}

/// How the driver of a group may compare by hash.
#[derive(Clone)]
pub struct HashDiff {
    /// `[tracking] hash_diff`.
    pub enabled: bool,
    /// The shipper's hash requests (none without a `[target]`).
    pub broker: Option<Arc<HashBroker>>,
}

/// The hash-diff state of the pass under way.
struct HashPass {
    /// Disks compared by hash.
    disks: Vec<String>,
    /// Among them, the ones the master target has no copy of: read in full.
    full: Vec<String>,
    prefetch: Option<Prefetch>,
    compared_blocks: u64,
    sent_blocks: u64,
}

/// Runs the driver of every group on its own thread until `stop` is set.
pub fn spawn_all(
    tracking: Arc<Tracking>,
    exports: Arc<Exports>,
    stop: Arc<AtomicBool>,
    hash_diff: HashDiff,
) -> Vec<std::thread::JoinHandle<()>> {
    tracking
        .specs()
        .iter()
        .filter_map(|(g, _)| {
            let tracker = tracking.group(g)?;
            let (tracking, exports, stop, g, hd) = (
                tracking.clone(),
                exports.clone(),
                stop.clone(),
                g.clone(),
                hash_diff.clone(),
            );
            std::thread::Builder::new()
                .name(format!("resync-{g}"))
                .spawn(move || run(&g, &tracker, &tracking, &exports, &stop, &hd))
                .ok()
        })
        .collect()
}

fn run(
    group: &str,
    tracker: &Mutex<GroupTracker>,
    tracking: &Tracking,
    exports: &Exports,
    stop: &AtomicBool,
    hd: &HashDiff,
) {
    let mut bar: Option<ProgressBar> = None;
    let mut last_log = Instant::now();
    let mut buf = Vec::new();
    let mut pass: Option<HashPass> = None;
    let mut said_waiting = false;
    let mut said_disconnected = false;
    while !stop.load(Ordering::SeqCst) {
        let step = match next_step(group, tracker, hd, &mut said_waiting) {
            Ok(s) => s,
            Err(e) => {
                error!(group, "resync: {e:#}");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        match step {
            Step::Idle => {
                if let Some(b) = bar.take() {
                    b.abandon();
                }
                std::thread::sleep(POLL);
            }
            Step::Begun { hash_diff } => {
                pass = (!hash_diff.is_empty()).then(|| HashPass {
                    disks: hash_diff,
                    full: Vec::new(),
                    prefetch: None,
                    compared_blocks: 0,
                    sent_blocks: 0,
                });
            }
            Step::Done { initial, point } => {
                if let Some(b) = bar.take() {
                    b.finish();
                }
                if let Some(p) = pass.take() {
                    info!(
                        group,
                        disks = %p.disks.join(","),
                        compared_blocks = p.compared_blocks,
                        sent_blocks = p.sent_blocks,
                        "hash-diff pass done: only the 64 KiB blocks that differ from the \
                         master target's copy were sent"
                    );
                }
                if initial.is_empty() {
                    info!(
                        group,
                        point, "resync done: a consistent recovery point is cut"
                    );
                } else {
                    info!(
                        group,
                        disks = %initial.join(","),
                        point,
                        "initial sync done: a consistent recovery point is cut"
                    );
                }
            }
            Step::Read { disk, ext } => {
                let hashed = pass.as_mut().filter(|p| {
                    p.disks.contains(&disk)
                        && !p.full.contains(&disk)
                        && tracker.lock().is_ok_and(|t| t.resync_is_hash_diff())
                });
                let r = match (hashed, hd.broker.as_deref()) {
                    (Some(p), Some(broker)) => {
                        let io = Io {
                            group,
                            tracker,
                            tracking,
                            exports,
                        };
                        compare_and_record(&io, broker, p, &disk, ext, &mut buf)
                    }
                    _ => read_and_record(group, tracker, tracking, exports, &disk, ext, &mut buf)
                        .map(|()| {
                            // A disk of a hash-diff pass sent in full (no copy there).
                            if let Some(p) = pass.as_mut().filter(|p| p.disks.contains(&disk)) {
                                let sent = blocks_touched(ext);
                                p.sent_blocks += sent;
                                if let Some(m) = tracking.metrics().disk(&disk) {
                                    m.hash_diffed(0, sent);
                                }
                            }
                            true
                        }),
                };
                match r {
                    Ok(true) => said_disconnected = false,
                    Ok(false) => {
                        // No session: nothing ships anyway; the extent waits for one.
                        if !said_disconnected {
                            info!(
                                group,
                                disk, "hash-diff resync waits for the master target's connection"
                            );
                            said_disconnected = true;
                        }
                        std::thread::sleep(POLL);
                        continue;
                    }
                    Err(_) => {}
                }
                if let Err(e) = r {
                    error!(
                        group,
                        disk,
                        offset = ext.offset,
                        "resync: {e:#}; retrying in 1 s"
                    );
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
                let Ok(t) = tracker.lock() else { return };
                if let Some(p) = t.resync_progress() {
                    let b = bar.get_or_insert_with(|| new_bar(group, p.total_bytes));
                    b.set_length(p.total_bytes.max(p.done_bytes));
                    b.set_position(p.done_bytes);
                    if last_log.elapsed() >= LOG_EVERY {
                        last_log = Instant::now();
                        info!(
                            group,
                            done_bytes = p.done_bytes,
                            total_bytes = p.total_bytes,
                            "resync progress"
                        );
                    }
                }
            }
        }
    }
}

/// Under the tracker lock: starts a pass, picks the next extent, or ends the pass.
fn next_step(
    group: &str,
    tracker: &Mutex<GroupTracker>,
    hd: &HashDiff,
    said_waiting: &mut bool,
) -> anyhow::Result<Step> {
    let mut t = tracker
        .lock()
        .map_err(|_| anyhow::anyhow!("tracking failed earlier"))?;
    let (used, max) = t.spool_fill();
    if used > max / 2 {
        // Only acknowledgements free the spool: wait for the link to drain it.
        return Ok(Step::Idle);
    }
    match t.mode().clone() {
        TrackMode::Spooling => Ok(Step::Idle),
        TrackMode::BitmapOnly { reason } => {
            let initial = t.initial_sync_disks().to_vec();
            if let (true, false, Some(broker)) = (hd.enabled, initial.is_empty(), &hd.broker) {
                match broker.protocol() {
                    None => {
                        if !*said_waiting {
                            info!(
                                group,
                                disks = %initial.join(","),
                                "initial sync waits for the master target, to compare block hashes with its copy"
                            );
                            *said_waiting = true;
                        }
                        return Ok(Step::Idle);
                    }
                    Some(p) if p < HASH_PROTOCOL_VERSION => {
                        if !*said_waiting {
                            info!(
                                group,
                                protocol = p,
                                "the master target speaks no protocol with hash requests: full initial sync"
                            );
                            *said_waiting = true;
                        }
                    }
                    Some(_) => {
                        // Only with every earlier record acknowledged (the tracker
                        // refuses otherwise); until then the acks drain the spool.
                        if !t.begin_hash_diff_resync()? {
                            return Ok(Step::Idle);
                        }
                        *said_waiting = false;
                        let total = t.resync_progress().map_or(0, |p| p.total_bytes);
                        info!(
                            group,
                            disks = %initial.join(","),
                            total_bytes = total,
                            "initial sync started: a hash-diff resync, only blocks that differ from the master target's copy are sent"
                        );
                        return Ok(Step::Begun { hash_diff: initial });
                    }
                }
            }
            if t.begin_resync()? {
                *said_waiting = false;
                let total = t.resync_progress().map_or(0, |p| p.total_bytes);
                if initial.is_empty() {
                    warn!(
                        group,
                        total_bytes = total,
                        "resync started ({reason}); points are inconsistent until it ends"
                    );
                } else {
                    info!(group, disks = %initial.join(","), total_bytes = total, "initial sync started: every block goes to the master target, zero blocks without data");
                }
                return Ok(Step::Begun {
                    hash_diff: Vec::new(),
                });
            }
            Ok(Step::Idle)
        }
        TrackMode::Resyncing => {
            let mut most = RESYNC_EXTENT_BYTES_MAX.min(max / 16);
            if t.resync_is_hash_diff() {
                // Larger reads (mostly of blocks that match and are not recorded), in
                // whole 64 KiB blocks, so that every block can be compared.
                most = HASH_DIFF_EXTENT_BYTES.min(max / 16);
                most = (most / HASH_BLOCK_BYTES * HASH_BLOCK_BYTES).max(HASH_BLOCK_BYTES);
            }
            match t.next_resync_extent(most) {
                Some((disk, ext)) => Ok(Step::Read { disk, ext }),
                None => {
                    let initial = t.finish_resync()?;
                    // A consistent point at once (as a `tag` cuts one), rather than at
                    // the next scheduled cut: the resync's end is its time.
                    let point = t.cut(now_unix_ms(), false)?.map(|p| p.point_id);
                    Ok(Step::Done { initial, point })
                }
            }
        }
    }
}

/// Reads `ext` of `disk` with no write to it in flight and records it.
fn read_and_record(
    group: &str,
    tracker: &Mutex<GroupTracker>,
    tracking: &Tracking,
    exports: &Exports,
    disk: &str,
    ext: Extent,
    buf: &mut Vec<u8>,
) -> anyhow::Result<()> {
    let export = exports
        .get(disk)
        .ok_or_else(|| anyhow::anyhow!("group {group}: no export for disk {disk}"))?;
    buf.resize(ext.len as usize, 0);
    let ranges = tracking.in_flight();
    ranges.acquire(disk, ext.offset, ext.len);
    let r = (|| {
        read_and_compare(export, ext, buf, 0, None)?;
        let mut t = tracker
            .lock()
            .map_err(|_| anyhow::anyhow!("tracking failed earlier"))?;
        t.record_resync_parts(disk, ext, buf, &split_parts(&[ext]))?;
        anyhow::Ok(())
    })();
    ranges.release(disk, ext.offset, ext.len);
    r
}

/// What the reads of a group need.
struct Io<'a> {
    group: &'a str,
    tracker: &'a Mutex<GroupTracker>,
    tracking: &'a Tracking,
    exports: &'a Exports,
}

/// The 64 KiB blocks `e` touches.
fn blocks_touched(e: Extent) -> u64 {
    (e.end() - 1) / HASH_BLOCK_BYTES - e.offset / HASH_BLOCK_BYTES + 1
}

/// The longest dirty run one look ahead of the hash prefetch takes (a request's worth).
const PLAN_RUN_BYTES_MAX: u64 = 16 << 20;

/// `e` grown to the 64 KiB blocks it touches (the last one clipped to the disk).
fn hash_blocks_around(e: Extent, disk_bytes: u64) -> Extent {
    let offset = e.offset / HASH_BLOCK_BYTES * HASH_BLOCK_BYTES;
    let end = e
        .end()
        .div_ceil(HASH_BLOCK_BYTES)
        .saturating_mul(HASH_BLOCK_BYTES)
        .min(disk_bytes);
    Extent {
        offset,
        len: end - offset,
    }
}

/// The hash-diff form of [`read_and_record`] (see the module doc): the master
/// target's hashes of the blocks of `ext` first, then, under the range lock, the read,
/// the comparison and the record of the differing parts. False (nothing done) while
/// there is no session with the master target.
fn compare_and_record(
    io: &Io<'_>,
    broker: &HashBroker,
    pass: &mut HashPass,
    disk: &str,
    ext: Extent,
    buf: &mut Vec<u8>,
) -> anyhow::Result<bool> {
    let group = io.group;
    let export = io
        .exports
        .get(disk)
        .ok_or_else(|| anyhow::anyhow!("group {group}: no export for disk {disk}"))?;
    let size = export.size_bytes;
    // Whole 64 KiB blocks, so that every block the extent touches is compared (a run
    // of dirty 4 KiB blocks need not be aligned; reading clean blocks around it too is
    // a true copy of them, as every resync read is).
    let ext = hash_blocks_around(ext, size);
    if pass.prefetch.as_ref().is_none_or(|p| p.disk() != disk) {
        if let Some(mut old) = pass.prefetch.take() {
            old.reset(broker, 0);
        }
        pass.prefetch = Some(Prefetch::new(group, disk, size, HashOf::Latest));
    }
    let first = ext.offset / HASH_BLOCK_BYTES;
    let count = (ext.end() - 1) / HASH_BLOCK_BYTES - first + 1;
    let prefetch = pass
        .prefetch
        .as_mut()
        .ok_or_else(|| anyhow::anyhow!("no prefetch"))?;
    // Hashes are asked ahead only for the blocks the pass will read: the dirty runs
    // from here on (all of the disk in a full initial sync, the change lists' union in
    // one from lists), so the master target hashes nothing else.
    let mut plan = |from_block: u64| {
        let t = io.tracker.lock().ok()?;
        let run = t.next_dirty_run(disk, from_block * HASH_BLOCK_BYTES, PLAN_RUN_BYTES_MAX)?;
        let e = hash_blocks_around(run, size);
        Some((e.offset / HASH_BLOCK_BYTES, blocks_touched(e)))
    };
    let theirs = match prefetch.get_planned(broker, first, count, &mut plan) {
        Ok(Fetched::Hashes(h)) => Some(h),
        Ok(Fetched::NoCopy) => {
            info!(
                group,
                disk, "no copy at the master target (a blank replica): full sync of this disk"
            );
            pass.full.push(disk.to_string());
            pass.prefetch = None;
            // A disk that started from change lists has only their blocks dirty, which
            // assumed a copy: now every block must go, from the disk's start.
            let mut t = io
                .tracker
                .lock()
                .map_err(|_| anyhow::anyhow!("tracking failed earlier"))?;
            if t.mark_all_dirty(disk)? {
                warn!(
                    group,
                    disk,
                    "the disk's initial sync started from change lists, which assume a copy at \
                     the master target, but it has none: every block is sent"
                );
                return Ok(true);
            }
            None
        }
        Ok(Fetched::Refused(status)) => {
            warn!(
                group,
                disk,
                offset = ext.offset,
                ?status,
                "the master target gave no hashes for this extent: it is sent in full"
            );
            None
        }
        Err(Unavailable::OldProtocol(p)) => {
            info!(
                group,
                disk,
                protocol = p,
                "the master target speaks no protocol with hash requests: full sync of this disk"
            );
            pass.full.push(disk.to_string());
            pass.prefetch = None;
            None
        }
        Err(Unavailable::Timeout) => {
            warn!(
                group,
                disk,
                offset = ext.offset,
                "{}: this extent is sent in full",
                Unavailable::Timeout
            );
            None
        }
        Err(Unavailable::NotConnected | Unavailable::Disconnected) => return Ok(false),
    };
    buf.resize(ext.len as usize, 0);
    let ranges = io.tracking.in_flight();
    ranges.acquire(disk, ext.offset, ext.len);
    let r = (|| {
        let d = read_and_compare(export, ext, buf, first, theirs.as_deref())?;
        let mut t = io
            .tracker
            .lock()
            .map_err(|_| anyhow::anyhow!("tracking failed earlier"))?;
        t.record_resync_parts(disk, ext, buf, &split_parts(&d.parts))?;
        anyhow::Ok((d.parts, d.compared_blocks))
    })();
    ranges.release(disk, ext.offset, ext.len);
    let (parts, compared) = r?;
    let sent: u64 = parts.iter().map(|p| blocks_touched(*p)).sum();
    pass.compared_blocks += compared;
    pass.sent_blocks += sent;
    if let Some(m) = io.tracking.metrics().disk(disk) {
        m.hash_diffed(compared, sent);
    }
    Ok(true)
}

/// Reads `ext` of `export` into `buf` (its length) and, given the master target's
/// hashes of its blocks (from block `first` on), finds the parts that differ
/// ([`differing_parts`]); without hashes the whole extent is one part. On every core
/// (up to [`default_threads`]): each thread reads and hashes its own share of whole
/// 64 KiB blocks, so the pass is not bound by one core's blake3 and memcpy. The caller
/// holds the extent's range lock throughout, as for every resync read.
fn read_and_compare(
    export: &Export,
    ext: Extent,
    buf: &mut [u8],
    first: u64,
    theirs: Option<&[BlockHash]>,
) -> anyhow::Result<PartsDiff> {
    let blocks = ext.len.div_ceil(HASH_BLOCK_BYTES);
    let threads = (default_threads() as u64).clamp(1, blocks.max(1));
    let share = blocks.div_ceil(threads) * HASH_BLOCK_BYTES;
    let size = export.size_bytes;
    // A share is read and hashed a few blocks at a time, so that blake3 finds the
    // bytes the read just copied still in the core's cache.
    let work = |share: &mut [u8], offset: u64| -> anyhow::Result<PartsDiff> {
        let mut out = PartsDiff::default();
        for (k, piece) in share.chunks_mut(READ_PIECE_BYTES).enumerate() {
            let at = offset + (k * READ_PIECE_BYTES) as u64;
            export.store.read_at(piece, at).map_err(|e| {
                anyhow::anyhow!(
                    "read {} bytes at {at} of {}: {e}",
                    piece.len(),
                    export.path.display()
                )
            })?;
            let d = match theirs {
                Some(h) => differing_parts(size, at, piece, first, h),
                None => PartsDiff {
                    parts: vec![Extent {
                        offset: at,
                        len: piece.len() as u64,
                    }],
                    ..PartsDiff::default()
                },
            };
            append_parts(&mut out, d);
        }
        Ok(out)
    };
    // The first share on this thread, the others on threads of their own.
    let results: Vec<anyhow::Result<PartsDiff>> = std::thread::scope(|s| {
        let mut chunks = buf.chunks_mut(share as usize);
        let head = chunks.next();
        let others: Vec<_> = chunks
            .enumerate()
            .map(|(k, chunk)| {
                let offset = ext.offset + (k as u64 + 1) * share;
                s.spawn(move || work(chunk, offset))
            })
            .collect();
        let mut out = Vec::with_capacity(others.len() + 1);
        out.extend(head.map(|c| work(c, ext.offset)));
        out.extend(others.into_iter().map(|h| {
            h.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a resync reader panicked")))
        }));
        out
    });
    let mut out = PartsDiff::default();
    for r in results {
        append_parts(&mut out, r?);
    }
    Ok(out)
}

/// Adds `d` (of the bytes right after those of `out`) to `out`, merging touching parts.
fn append_parts(out: &mut PartsDiff, d: PartsDiff) {
    out.compared_blocks += d.compared_blocks;
    out.equal_blocks += d.equal_blocks;
    for p in d.parts {
        match out.parts.last_mut() {
            Some(last) if last.end() == p.offset => last.len += p.len,
            _ => out.parts.push(p),
        }
    }
}

/// `parts` cut at every [`RESYNC_EXTENT_BYTES_MAX`] boundary, so that no spool record
/// of a resync is larger than a frame's worth, however large the extent read.
fn split_parts(parts: &[Extent]) -> Vec<Extent> {
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        let mut at = p.offset;
        while at < p.end() {
            let next = ((at / RESYNC_EXTENT_BYTES_MAX + 1) * RESYNC_EXTENT_BYTES_MAX).min(p.end());
            out.push(Extent {
                offset: at,
                len: next - at,
            });
            at = next;
        }
    }
    out
}

fn new_bar(group: &str, total: u64) -> ProgressBar {
    // Hidden unless stderr is a terminal (indicatif's default target checks it).
    let b = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        b.set_style(style.progress_chars("=> "));
    }
    b.set_prefix(format!("resync {group}"));
    b
}
