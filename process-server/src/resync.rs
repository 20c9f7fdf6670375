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
//! is recorded, [`GroupTracker::finish_resync`]: the next cut is a consistent point.
//!
//! Progress: a bar on a terminal (stderr), a log line every [`LOG_EVERY`], and the
//! tracker's [`datapath::tracker::ResyncProgress`] in `status`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datapath::extent::Extent;
use datapath::tracker::{GroupTracker, RESYNC_EXTENT_BYTES_MAX, TrackMode};
use indicatif::{ProgressBar, ProgressStyle};
use tracing::{error, info, warn};

use crate::nbd_server::Exports;
use crate::tracking::Tracking;

/// How often an idle driver looks at its group again.
pub const POLL: Duration = Duration::from_millis(50);
/// How often a pass under way logs its progress.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// What one step found to do.
enum Step {
    Idle,
    Read { disk: String, ext: Extent },
    Done { initial: Vec<String> },
}

/// Runs the driver of every group on its own thread until `stop` is set.
pub fn spawn_all(
    tracking: Arc<Tracking>,
    exports: Arc<Exports>,
    stop: Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    tracking
        .specs()
        .iter()
        .filter_map(|(g, _)| {
            let tracker = tracking.group(g)?;
            let (tracking, exports, stop, g) =
                (tracking.clone(), exports.clone(), stop.clone(), g.clone());
            std::thread::Builder::new()
                .name(format!("resync-{g}"))
                .spawn(move || run(&g, &tracker, &tracking, &exports, &stop))
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
) {
    let mut bar: Option<ProgressBar> = None;
    let mut last_log = Instant::now();
    let mut buf = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let step = match next_step(group, tracker) {
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
            Step::Done { initial } => {
                if let Some(b) = bar.take() {
                    b.finish();
                }
                if initial.is_empty() {
                    info!(
                        group,
                        "resync done: the next cut is a consistent recovery point"
                    );
                } else {
                    info!(
                        group,
                        disks = %initial.join(","),
                        "initial sync done: the next cut is a consistent recovery point"
                    );
                }
            }
            Step::Read { disk, ext } => {
                if let Err(e) =
                    read_and_record(group, tracker, tracking, exports, &disk, ext, &mut buf)
                {
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
fn next_step(group: &str, tracker: &Mutex<GroupTracker>) -> anyhow::Result<Step> {
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
            if t.begin_resync()? {
                let initial = t.initial_sync_disks().to_vec();
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
            }
            Ok(Step::Idle)
        }
        TrackMode::Resyncing => {
            let most = RESYNC_EXTENT_BYTES_MAX.min(max / 16);
            match t.next_resync_extent(most) {
                Some((disk, ext)) => Ok(Step::Read { disk, ext }),
                None => Ok(Step::Done {
                    initial: t.finish_resync()?,
                }),
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
        export.store.read_at(buf, ext.offset).map_err(|e| {
            anyhow::anyhow!(
                "read {} bytes at {} of {}: {e}",
                ext.len,
                ext.offset,
                export.path.display()
            )
        })?;
        let mut t = tracker
            .lock()
            .map_err(|_| anyhow::anyhow!("tracking failed earlier"))?;
        t.record_resync(disk, ext, buf)?;
        anyhow::Ok(())
    })();
    ranges.release(disk, ext.offset, ext.len);
    r
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
