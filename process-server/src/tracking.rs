//! Change tracking behind write capture: the [`Capture`] hook that feeds every write of
//! a group's disks to that group's [`GroupTracker`] (dirty bitmap before the backing
//! write, spool after it), and the cutter that seals every group's epoch on a timer.
//!
//! One mutex per group serialises its writes' tracking steps and its cuts: every
//! write's spool record is either before a cut or after it, never split, which is what
//! makes a cut crash-consistent across all disks of the group. Writes to different
//! groups do not wait for each other.
//!
//! **Group commit of marks.** A write into a cold region of the dirty bitmap waits for a
//! synced log transaction (and, with a full hot set, an eviction) before it may reach
//! the backing disk. Concurrent writes of a group share that wait: each queues its
//! range in the group's [`GroupCommit`]; one of them (the leader) takes the whole queue
//! and marks it with one [`GroupTracker::before_writes`] (one log transaction per disk)
//! while the writes arriving meanwhile queue for the next leader. Random writes with 16
//! in flight thus pay about one log sync per batch instead of one each.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use datapath::bitmap::BitmapConfig;
use datapath::extent::ExtentData;
use datapath::spool::SpoolConfig;
use datapath::storage::RealFs;
use datapath::tracker::{
    CutPoint, DiskSpec, GroupTracker, InitialSync, OpenReport, ResyncProgress, TrackMode,
    TrackerError,
};
use tracing::{error, info, warn};

use crate::capture::{Capture, WriteData};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::nbd_server::Exports;

/// The trackers of every group, and which group each disk belongs to.
pub struct Tracking {
    groups: HashMap<String, Arc<Mutex<GroupTracker>>>,
    disk_group: HashMap<String, String>,
    /// Every group's disks, groups sorted by id, disks in config order.
    specs: Vec<(String, Vec<DiskSpec>)>,
    /// Writes between their mark and their spool record, per disk.
    in_flight: InFlightRanges,
    /// The queue of marks waiting for their group's next log transaction, per group.
    commits: HashMap<String, GroupCommit>,
    /// Live counters (captured bytes are counted here).
    metrics: Arc<Metrics>,
}

fn to_io(e: TrackerError) -> io::Error {
    io::Error::other(e.to_string())
}

/// Milliseconds since 1970 (UTC), the time of a cut.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Opens (or creates) the change tracking of group `group` (its disks `disks`, sizes
/// from the backing files) under `state_dir/<group>`, as `serve` does: an unclean end's
/// recovery applied, new disks' initial sync set up (from their
/// `initial_sync_changed` lists, if any). The caller holds the [`StateLock`].
pub fn open_group(
    config: &Config,
    group: &str,
    disks: &[DiskSpec],
) -> anyhow::Result<(GroupTracker, OpenReport)> {
    let cfg = &config.tracking;
    let spool_cfg = SpoolConfig {
        segment_bytes_max: cfg.spool_segment_bytes,
        spool_bytes_max: cfg.spool_bytes_max,
    };
    let lists: BTreeMap<String, Vec<PathBuf>> = config
        .groups
        .iter()
        .filter(|g| g.id == group)
        .flat_map(|g| &g.disks)
        .filter(|d| !d.initial_sync_changed.is_empty())
        .map(|d| (d.id.clone(), d.initial_sync_changed.clone()))
        .collect();
    let initial = match (cfg.initial_sync, lists.is_empty()) {
        (false, _) => InitialSync::Skip,
        (true, true) => InitialSync::Full,
        (true, false) => InitialSync::Changed(lists),
    };
    let dir = cfg.state_dir.join(group);
    GroupTracker::open(
        Arc::new(RealFs),
        &dir,
        disks,
        spool_cfg,
        BitmapConfig::default(),
        initial,
    )
    .with_context(|| format!("group {group}: open change tracking in {}", dir.display()))
}

/// The exclusive hold of a process server's `state_dir` (`state_dir/lock`): `serve`
/// keeps it while it runs, offline commands (`changed`) take it, so they never open
/// a group's tracking under a running server. Released on drop or process exit (an
/// advisory `flock`; see [`datapath::storage::try_lock_file`]).
#[derive(Debug)]
pub struct StateLock {
    _file: std::fs::File,
}

/// Name of the lock file in `state_dir`.
pub const STATE_LOCK_FILE: &str = "lock";

impl StateLock {
    /// Takes the lock without waiting; an error says who holds it.
    pub fn acquire(state_dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("create state directory {}", state_dir.display()))?;
        let path = state_dir.join(STATE_LOCK_FILE);
        match datapath::storage::try_lock_file(&path)
            .with_context(|| format!("lock {}", path.display()))?
        {
            Some(file) => Ok(Self { _file: file }),
            None => anyhow::bail!(
                "state directory {} is in use by another process-server (lock {} is held: is \
                 `process-server serve` running with this config? stop it first)",
                state_dir.display(),
                path.display()
            ),
        }
    }
}

impl Tracking {
    /// Opens (or creates) the tracking state of every group of `exports` under
    /// `state_dir/<group>` ([`open_group`]). Returns it with what each group's open
    /// found. The caller holds the [`StateLock`].
    pub fn open(
        exports: &Exports,
        config: &Config,
    ) -> anyhow::Result<(Self, Vec<(String, OpenReport)>)> {
        let mut by_group: HashMap<String, Vec<DiskSpec>> = HashMap::new();
        let mut disk_group = HashMap::new();
        for e in exports.iter() {
            by_group.entry(e.group.clone()).or_default().push(DiskSpec {
                id: e.id.clone(),
                size_bytes: e.size_bytes,
            });
            disk_group.insert(e.id.clone(), e.group.clone());
        }
        let mut groups = HashMap::new();
        let mut reports = Vec::new();
        let mut names: Vec<_> = by_group.keys().cloned().collect();
        names.sort();
        let mut specs = Vec::new();
        for g in names {
            specs.push((g.clone(), by_group[&g].clone()));
            let (t, rep) = open_group(config, &g, &by_group[&g])?;
            groups.insert(g.clone(), Arc::new(Mutex::new(t)));
            reports.push((g, rep));
        }
        let metrics = Arc::new(Metrics::new(&specs));
        let commits = groups
            .keys()
            .map(|g| (g.clone(), GroupCommit::default()))
            .collect();
        Ok((
            Self {
                groups,
                disk_group,
                specs,
                in_flight: InFlightRanges::default(),
                commits,
                metrics,
            },
            reports,
        ))
    }

    /// The tracker of group `id`.
    pub fn group(&self, id: &str) -> Option<Arc<Mutex<GroupTracker>>> {
        self.groups.get(id).cloned()
    }

    /// Every group with its disks, groups sorted by id.
    pub fn specs(&self) -> &[(String, Vec<DiskSpec>)] {
        &self.specs
    }

    /// The live counters of every group and disk.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn group_of(&self, disk: &str) -> io::Result<MutexGuard<'_, GroupTracker>> {
        let g = self
            .disk_group
            .get(disk)
            .and_then(|g| self.groups.get(g))
            .ok_or_else(|| io::Error::other(format!("disk {disk} is in no tracked group")))?;
        // A panic while tracking poisons the mutex; the state is then unknown and every
        // later write of the group fails (EIO) instead of being tracked wrongly.
        g.lock()
            .map_err(|_| io::Error::other(format!("tracking of disk {disk} failed earlier")))
    }

    /// Cuts every group now: crash-consistent points (or app-consistent ones when
    /// `app_consistent`). Returns the points made, per group; a group in bitmap-only
    /// mode makes none.
    pub fn cut_all(&self, app_consistent: bool) -> Vec<(String, anyhow::Result<Option<CutPoint>>)> {
        let mut out = Vec::new();
        let mut names: Vec<_> = self.groups.keys().cloned().collect();
        names.sort();
        for g in names {
            let r = match self.groups[&g].lock() {
                Ok(mut t) => t
                    .cut(now_unix_ms(), app_consistent)
                    .with_context(|| format!("group {g}: cut")),
                Err(_) => Err(anyhow::anyhow!("group {g}: tracking failed earlier")),
            };
            out.push((g, r));
        }
        out
    }

    /// Per group: epoch, mode, spool bytes used and bound.
    pub fn status(&self) -> Vec<(String, u64, TrackMode, u64, u64)> {
        let mut out: Vec<_> = self
            .groups
            .iter()
            .filter_map(|(g, t)| {
                let t = t.lock().ok()?;
                let (used, max) = t.spool_fill();
                Some((g.clone(), t.epoch(), t.mode().clone(), used, max))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Per group: the disks whose initial sync is not done, and the resync pass under
    /// way, if any.
    pub fn sync_status(&self) -> HashMap<String, (Vec<String>, Option<ResyncProgress>)> {
        self.groups
            .iter()
            .filter_map(|(g, t)| {
                let t = t.lock().ok()?;
                Some((
                    g.clone(),
                    (t.initial_sync_disks().to_vec(), t.resync_progress()),
                ))
            })
            .collect()
    }

    /// The byte ranges of writes in flight, shared by writes and the resync.
    pub fn in_flight(&self) -> &InFlightRanges {
        &self.in_flight
    }

    /// A clean stop: every group's spool synced, bitmaps flushed, clean marker written;
    /// writes arriving after it fail (EIO) rather than go untracked.
    pub fn shutdown(&self) -> anyhow::Result<()> {
        for (g, t) in &self.groups {
            let mut t = t
                .lock()
                .map_err(|_| anyhow::anyhow!("group {g}: tracking failed earlier"))?;
            t.close()
                .with_context(|| format!("group {g}: clean shutdown"))?;
        }
        Ok(())
    }
}

/// The marks of one group's writes waiting for a log transaction (see the module doc):
/// a queue, and whether a leader is marking a batch now.
#[derive(Default)]
struct GroupCommit {
    state: Mutex<CommitState>,
    /// Signalled when a leader is done: its results are in, the next one may lead.
    done: Condvar,
}

#[derive(Default)]
struct CommitState {
    /// Marks not taken by a leader yet: (ticket, disk, offset, len).
    queued: Vec<(u64, String, u64, u64)>,
    /// Results of marks done, by ticket, until their writer takes them.
    results: HashMap<u64, io::Result<()>>,
    leading: bool,
    next_ticket: u64,
    /// Batches marked so far (what the group commit saved is marks minus batches).
    batches: u64,
}

impl GroupCommit {
    fn lock(&self) -> MutexGuard<'_, CommitState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `len` bytes at `offset` of `disk` in `tracker`, durably, together with the
    /// marks of the writes queued at the same time; returns once this one is marked.
    fn mark(
        &self,
        tracker: &Mutex<GroupTracker>,
        disk: &str,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let mut s = self.lock();
        let ticket = s.next_ticket;
        s.next_ticket += 1;
        s.queued.push((ticket, disk.to_string(), offset, len));
        loop {
            if let Some(r) = s.results.remove(&ticket) {
                return r;
            }
            if s.leading {
                s = self.done.wait(s).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            s.leading = true;
            s.batches += 1;
            let batch = std::mem::take(&mut s.queued);
            drop(s);
            let mut lead = Leader {
                commit: self,
                tickets: batch.iter().map(|w| w.0).collect(),
                results: Vec::new(),
            };
            // A panic while tracking poisons the mutex; the state is then unknown and
            // every later write of the group fails (EIO) instead of being tracked wrongly.
            if let Ok(mut t) = tracker.lock() {
                let writes: Vec<(&str, u64, u64)> =
                    batch.iter().map(|w| (w.1.as_str(), w.2, w.3)).collect();
                lead.results = t
                    .before_writes(&writes)
                    .into_iter()
                    .map(|r| r.map_err(to_io))
                    .collect();
            }
            drop(lead);
            s = self.lock();
        }
    }
}

/// The leader of one batch: hands every write of it its result when dropped (an error
/// for each one without a result, as after a panic), then lets the next leader go.
struct Leader<'a> {
    commit: &'a GroupCommit,
    tickets: Vec<u64>,
    results: Vec<io::Result<()>>,
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        let mut results = std::mem::take(&mut self.results).into_iter();
        let mut s = self.commit.lock();
        for &t in &self.tickets {
            let r = results
                .next()
                .unwrap_or_else(|| Err(io::Error::other("tracking of this group failed earlier")));
            s.results.insert(t, r);
        }
        s.leading = false;
        drop(s);
        self.commit.done.notify_all();
    }
}

/// The byte ranges of every disk with a write between `before_write` and its end
/// (`after_write` or `write_failed`). A write waits in `before_write` while an earlier
/// one overlaps it, so two writes to the same blocks reach the backing disk and the
/// spool in the same order; otherwise the disk could keep one value and the replica the
/// other. Writes that do not overlap never wait for each other.
#[derive(Default)]
pub struct InFlightRanges {
    ranges: Mutex<Vec<(String, u64, u64)>>,
    released: Condvar,
}

impl InFlightRanges {
    /// Waits until no range in flight on `disk` overlaps `[offset, offset + len)`, then
    /// holds it.
    pub fn acquire(&self, disk: &str, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        let overlaps = |r: &Vec<(String, u64, u64)>| {
            r.iter()
                .any(|(d, o, e)| d == disk && *o < end && offset < *e)
        };
        let mut r = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        while overlaps(&r) {
            r = self.released.wait(r).unwrap_or_else(|e| e.into_inner());
        }
        r.push((disk.to_string(), offset, end));
    }

    /// Lets go of a range held by [`InFlightRanges::acquire`].
    pub fn release(&self, disk: &str, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        let mut r = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = r
            .iter()
            .position(|(d, o, e)| d == disk && *o == offset && *e == end)
        {
            r.swap_remove(i);
        }
        drop(r);
        self.released.notify_all();
    }
}

impl Capture for Tracking {
    fn before_write(&self, disk: &str, offset: u64, len: u64) -> io::Result<()> {
        self.in_flight.acquire(disk, offset, len);
        let r = self.mark(disk, offset, len);
        if r.is_err() {
            self.in_flight.release(disk, offset, len);
        }
        r
    }

    fn write_failed(&self, disk: &str, offset: u64, len: u64) {
        self.in_flight.release(disk, offset, len);
    }

    fn after_write(&self, disk: &str, offset: u64, data: WriteData<'_>) -> io::Result<()> {
        let r = self.record(disk, offset, data);
        self.in_flight.release(disk, offset, data.len());
        if r.is_ok() {
            self.metrics.captured(disk, data.len());
        }
        r
    }

    fn flush(&self, disk: &str) -> io::Result<()> {
        self.group_of(disk)?.flush().map(|_| ()).map_err(to_io)
    }
}

impl Tracking {
    /// Step 1 of a write, through its group's [`GroupCommit`].
    fn mark(&self, disk: &str, offset: u64, len: u64) -> io::Result<()> {
        let (tracker, commit) = self
            .disk_group
            .get(disk)
            .and_then(|g| Some((self.groups.get(g)?, self.commits.get(g)?)))
            .ok_or_else(|| io::Error::other(format!("disk {disk} is in no tracked group")))?;
        commit.mark(tracker, disk, offset, len)
    }

    /// Step 3 of a write: the spool append (see [`GroupTracker::record_write`]).
    fn record(&self, disk: &str, offset: u64, data: WriteData<'_>) -> io::Result<()> {
        let mut t = self.group_of(disk)?;
        let was_spooling = *t.mode() == TrackMode::Spooling;
        let r = match data {
            ExtentData::Bytes(b) => t.record_write(disk, offset, b),
            ExtentData::Zero(len) => t.record_zero(disk, offset, len),
        }
        .map_err(to_io)?;
        if r.is_none()
            && was_spooling
            && let TrackMode::BitmapOnly { reason } = t.mode()
        {
            // Loud, once: the group offers no recovery point until a resync.
            error!(disk, "{reason}");
        }
        Ok(())
    }
}

/// Logs what opening the trackers found.
pub fn log_open_reports(reports: &[(String, OpenReport)], state_dir: &Path) {
    for (g, rep) in reports {
        if rep.unclean {
            warn!(
                group = %g,
                "previous run did not shut down cleanly: dirty blocks need a resync before the next consistent point"
            );
        }
        for s in &rep.from_lists {
            for (list, blocks) in &s.lists {
                info!(group = %g, disk = %s.disk, blocks, "change list: {list}");
            }
            info!(
                group = %g,
                disk = %s.disk,
                dirty_blocks = s.dirty_blocks,
                disk_blocks = s.disk_blocks,
                "initial sync from change lists: only the blocks of their union are compared"
            );
        }
        info!(
            group = %g,
            epoch = rep.epoch,
            spool_records = rep.spool_records,
            state_dir = %state_dir.display(),
            "change tracking ready"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Proves the group commit: writes that queue while a leader marks are marked
    /// together by the next leader (one batch), each gets its own result (a write
    /// outside the disk fails alone), and every good one is marked when it returns.
    #[test]
    fn queued_marks_share_one_batch() {
        const REGION: u64 = 64 << 10;
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskSpec {
            id: "d0".into(),
            size_bytes: 1 << 20,
        };
        let (t, _) = GroupTracker::open(
            Arc::new(RealFs),
            dir.path(),
            &[disk],
            SpoolConfig {
                segment_bytes_max: 1 << 20,
                spool_bytes_max: 4 << 20,
            },
            BitmapConfig {
                region_bytes: REGION,
                hot_regions_max: 16,
            },
            InitialSync::Skip,
        )
        .unwrap();
        let tracker = Arc::new(Mutex::new(t));
        let commit = Arc::new(GroupCommit::default());
        // The first leader blocks on the tracker while the others queue behind it.
        let held = tracker.lock().unwrap();
        let (tx, rx) = mpsc::channel();
        let offsets: Vec<u64> = vec![0, 3 * REGION, 1 << 20, 5 * REGION, 9 * REGION, 12 * REGION];
        let threads: Vec<_> = offsets
            .iter()
            .map(|&offset| {
                let (tracker, commit, tx) = (tracker.clone(), commit.clone(), tx.clone());
                std::thread::spawn(move || {
                    let r = commit.mark(&tracker, "d0", offset, 4096);
                    tx.send((offset, r.is_ok())).unwrap();
                })
            })
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let s = commit.lock();
            if s.leading && s.queued.len() == offsets.len() - 1 {
                break;
            }
            drop(s);
            assert!(std::time::Instant::now() < deadline, "writes did not queue");
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(held);
        let mut done: Vec<(u64, bool)> = (0..offsets.len())
            .map(|_| {
                rx.recv_timeout(Duration::from_secs(30))
                    .expect("a write hung")
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        done.sort();
        let want: Vec<(u64, bool)> = {
            let mut w: Vec<(u64, bool)> = offsets.iter().map(|&o| (o, o < 1 << 20)).collect();
            w.sort();
            w
        };
        assert_eq!(done, want, "only the write outside the disk fails");
        assert_eq!(commit.lock().batches, 2, "the queued writes took one batch");
        let runs = tracker.lock().unwrap().dirty_runs("d0").unwrap();
        for &o in offsets.iter().filter(|&&o| o < 1 << 20) {
            assert!(runs.iter().any(|e| e.offset == o), "write at {o} marked");
        }
    }

    /// Proves an overlapping write waits until the earlier one is done, while writes to
    /// other ranges or other disks go on at once.
    #[test]
    fn overlapping_writes_wait_for_each_other() {
        let r = Arc::new(InFlightRanges::default());
        r.acquire("d0", 0, 8192);
        // Other disk, and a range that only touches: no wait.
        r.acquire("d1", 0, 8192);
        r.acquire("d0", 8192, 4096);
        let (tx, rx) = mpsc::channel();
        let r2 = r.clone();
        let t = std::thread::spawn(move || {
            r2.acquire("d0", 4096, 8192);
            tx.send(()).unwrap();
            r2.release("d0", 4096, 8192);
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "an overlapping write went ahead"
        );
        r.release("d0", 0, 8192);
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "still overlapping [8192, 12288)"
        );
        r.release("d0", 8192, 4096);
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the write goes on once nothing overlaps");
        t.join().unwrap();
        r.release("d1", 0, 8192);
        assert!(r.ranges.lock().unwrap().is_empty());
    }
}
