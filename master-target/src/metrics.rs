//! Live counters of the master target, the throughput over them, the state names, and
//! its Prometheus endpoint.
//!
//! # Counters and what the server publishes
//!
//! Per group, relaxed atomics bumped by the connection that holds the group, without a
//! lock on the frame path: each is a statistic, nothing synchronises through it.
//!
//! | value                            | updated where                                          |
//! |----------------------------------|--------------------------------------------------------|
//! | received bytes and frames        | `server`: each frame of the group that passed verification (resends skipped as duplicates included) |
//! | journaled bytes and frames       | `server`: the frames a batch appended, once its commit (fsync) succeeded |
//! | durable seq, base seq, points, frame entries | [`GroupMetrics::publish`] after every commit, after a fold step, and when a journal is opened |
//! | peer                             | `server`: set when a connection claims the group, cleared when it lets go (under the slot's lock) |
//! | connected process servers        | `server`: connections past their hello                 |
//! | folded bytes, points dropped for space | `retention`: after each fold step ([`GroupMetrics::folded`]) |
//! | running exports                  | `server`: when a test failover export starts, gets its address, and ends (under the slot's lock) |
//!
//! The point list is the journal's durable point index, copied incrementally (new points
//! appended, the whole list replaced only when the journal's front moved): the journal
//! itself belongs to the connection that holds the group, so `status` and `points` read
//! this copy. The journal's size on disk is measured when asked.
//!
//! **Frame entries.** The same way, the journal's durable frame index (seq, segment,
//! offset, length, kind of every frame after the base) is copied: new entries appended
//! after each commit, entries at or below the base dropped from the front. A test
//! failover export ([`crate::export`]) takes the entries through its point from this
//! copy ([`GroupMetrics::frames_through`]) instead of taking the journal from the
//! connection that holds it: frames are immutable once durable, so a copy of their
//! locations is all its index needs, and replication never waits for an export. The
//! cost is a second copy of the index in memory, as large as the journal's own: 32 bytes
//! per frame, 2.6 MiB for a day of one frame a second.
//!
//! A sampler task ([`Metrics::sample_forever`]) reads the totals every
//! [`SAMPLE_INTERVAL_MS`] into a [`RateWindow`] of [`RATE_WINDOW_SAMPLES`]: every
//! throughput is the rate over the last 10 s.
//!
//! # `GET /metrics`
//!
//! Served when the config names `metrics = "ADDR"`, plain HTTP, read-only, one request
//! per connection (see [`datapath::metrics`]), served by the process server's loop
//! ([`process_server::metrics::serve_http`], with its bounds).
//!
//! | metric                                        | type    | labels        |
//! |-----------------------------------------------|---------|---------------|
//! | `blockrep_received_bytes_total`               | counter | group         |
//! | `blockrep_received_frames_total`              | counter | group         |
//! | `blockrep_journaled_bytes_total`              | counter | group         |
//! | `blockrep_journaled_frames_total`             | counter | group         |
//! | `blockrep_receive_bytes_per_second` (10 s)    | gauge   | group         |
//! | `blockrep_durable_seq`                        | gauge   | group         |
//! | `blockrep_points`                             | gauge   | group         |
//! | `blockrep_newest_point_timestamp_seconds`     | gauge   | group         |
//! | `blockrep_rpo_seconds` (absent without a point) | gauge | group         |
//! | `blockrep_journal_bytes`                      | gauge   | group         |
//! | `blockrep_journal_bytes_max` (`journal_bytes_max`) | gauge | group       |
//! | `blockrep_folded_bytes_total` (frames folded into the replicas) | counter | group |
//! | `blockrep_points_dropped_for_space_total`     | counter | group         |
//! | `blockrep_connected` (0/1)                    | gauge   | group         |
//! | `blockrep_group_state` (1 for the current state) | gauge | group, state |
//! | `blockrep_connected_process_servers`          | gauge   |               |

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datapath::failback::Phase;
use datapath::frame::PointKind;
use datapath::journal::{FrameEntry, Journal, PointEntry};
use datapath::metrics::{Exposition, MetricType, RateWindow, SampleValue};
use datapath::retention::FoldReport;

use crate::config::Config;
use crate::store;
use crate::timefmt::now_unix_ms;

/// How often the sampler reads the totals.
pub const SAMPLE_INTERVAL_MS: u64 = 1000;
/// Samples a rate spans: 10 s at one a second.
pub const RATE_WINDOW_SAMPLES: usize = 11;
/// The state of a group's disks as `status` and `/metrics` name it: `peer` whether a
/// process server holds the group now, `newest_consistent` whether the newest durable
/// point is consistent (`None`: no point yet). The one place these names are decided.
///
/// `failback` is the group's failback phase, if it has one (a failback running counts
/// as applying); it decides alone, because such a group does not replicate.
///
/// | state          | when                                                            |
/// |----------------|-----------------------------------------------------------------|
/// | `failing-back` | a failback runs, or one was interrupted (rerun it)              |
/// | `failed-back-uncommitted` | failed back to a point, not committed: the point can still be changed |
/// | `failed-back`  | failed back and committed: not protected until reprotect        |
/// | `initial-sync` | no consistent point yet, and a process server holds the group or its newest point is inconsistent |
/// | `resyncing`    | the newest point is inconsistent (a resync has not ended)       |
/// | `replicating`  | a process server holds the group, newest point consistent       |
/// | `disconnected` | no process server holds the group                               |
pub fn state_name(
    peer: bool,
    newest_consistent: Option<bool>,
    any_consistent: bool,
    failback: Option<Phase>,
) -> &'static str {
    if let Some(p) = failback {
        return crate::failback::phase_state_name(p);
    }
    match (peer, newest_consistent) {
        (true, None) => "initial-sync",
        (_, Some(false)) if !any_consistent => "initial-sync",
        (_, Some(false)) => "resyncing",
        (true, Some(true)) => "replicating",
        (false, _) => "disconnected",
    }
}

/// Every name [`state_name`] returns (for the one-hot `blockrep_group_state`).
pub const STATE_NAMES: &[&str] = &[
    "replicating",
    "initial-sync",
    "resyncing",
    "disconnected",
    "failing-back",
    "failed-back-uncommitted",
    "failed-back",
];

/// One durable recovery point, as published from the journal's index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PointSummary {
    pub id: u64,
    pub time_unix_ms: u64,
    pub kind: PointKind,
    pub consistent: bool,
    /// Seq of its point frame.
    pub seq: u64,
}

impl From<&PointEntry> for PointSummary {
    fn from(p: &PointEntry) -> Self {
        Self {
            id: p.record.point_id,
            time_unix_ms: p.record.time_unix_ms,
            kind: p.record.kind,
            consistent: p.record.consistent,
            seq: p.seq,
        }
    }
}

/// Where a group stands in a failback: its phase and the point it goes (or went) to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailbackMark {
    pub phase: Phase,
    pub point_id: u64,
    pub point_time_unix_ms: u64,
}

impl From<&datapath::failback::FailbackState> for FailbackMark {
    fn from(s: &datapath::failback::FailbackState) -> Self {
        Self {
            phase: s.phase,
            point_id: s.point.id,
            point_time_unix_ms: s.point.time_unix_ms,
        }
    }
}

/// A running test failover export of a group (see [`crate::export`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportMark {
    pub point_id: u64,
    pub point_time_unix_ms: u64,
    /// Where it serves NBD; `None` while it starts.
    pub listen: Option<SocketAddr>,
    pub since_unix_ms: u64,
}

/// The process server that holds a group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub node: String,
    pub address: SocketAddr,
}

/// One group's counters and published journal state.
pub struct GroupMetrics {
    pub id: String,
    /// The configured limit of the journal.
    journal_bytes_max: u64,
    received_bytes: AtomicU64,
    received_frames: AtomicU64,
    journaled_bytes: AtomicU64,
    journaled_frames: AtomicU64,
    durable_seq: AtomicU64,
    base_seq: AtomicU64,
    /// The journal's durable points, oldest first.
    points: Mutex<Vec<PointSummary>>,
    /// The journal's durable frame entries after its base, in seq order (see the module
    /// doc).
    frames: Mutex<VecDeque<FrameEntry>>,
    /// Running test failover exports, oldest first.
    exports: Mutex<Vec<ExportMark>>,
    peer: Mutex<Option<Peer>>,
    /// The failback phase and point; `None` while the group replicates.
    failback: Mutex<Option<FailbackMark>>,
    receive_rate: Mutex<RateWindow>,
    journal_rate: Mutex<RateWindow>,
    retention: Mutex<RetentionTotals>,
}

/// What the retention fold did since the server started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionTotals {
    pub folded_frames: u64,
    /// Bytes of journal frames folded into the replicas.
    pub folded_bytes: u64,
    /// Points dropped because the journal was over `journal_bytes_max`.
    pub space_dropped_points: u64,
    /// Time of the newest of them.
    pub newest_space_dropped_time_unix_ms: Option<u64>,
}

/// A group's values at one instant.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupSnapshot {
    pub received_bytes: u64,
    pub received_frames: u64,
    pub journaled_bytes: u64,
    pub journaled_frames: u64,
    pub durable_seq: u64,
    pub base_seq: u64,
    pub points: usize,
    pub newest_point: Option<PointSummary>,
    /// The newest point a failback can use.
    pub newest_consistent: Option<PointSummary>,
    pub peer: Option<Peer>,
    pub failback: Option<FailbackMark>,
    /// Running test failover exports.
    pub exports: Vec<ExportMark>,
    pub receive_bytes_per_s: f64,
    pub journal_bytes_per_s: f64,
    pub journal_bytes_max: u64,
    pub retention: RetentionTotals,
}

impl GroupSnapshot {
    /// The recovery point objective now: the age of the newest durable consistent
    /// point (an inconsistent one cannot be recovered to).
    pub fn rpo_ms(&self, now_unix_ms: u64) -> Option<u64> {
        self.newest_consistent
            .map(|p| now_unix_ms.saturating_sub(p.time_unix_ms))
    }

    /// The state of the group's disks ([`state_name`]).
    pub fn state(&self) -> &'static str {
        state_name(
            self.peer.is_some(),
            self.newest_point.map(|p| p.consistent),
            self.newest_consistent.is_some(),
            self.failback.map(|f| f.phase),
        )
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The values are statistics: a panic elsewhere leaves them usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl GroupMetrics {
    fn new(id: &str, journal_bytes_max: u64) -> Self {
        Self {
            id: id.to_string(),
            journal_bytes_max,
            received_bytes: AtomicU64::new(0),
            received_frames: AtomicU64::new(0),
            journaled_bytes: AtomicU64::new(0),
            journaled_frames: AtomicU64::new(0),
            durable_seq: AtomicU64::new(0),
            base_seq: AtomicU64::new(0),
            points: Mutex::new(Vec::new()),
            frames: Mutex::new(VecDeque::new()),
            exports: Mutex::new(Vec::new()),
            peer: Mutex::new(None),
            failback: Mutex::new(None),
            receive_rate: Mutex::new(RateWindow::new(RATE_WINDOW_SAMPLES)),
            journal_rate: Mutex::new(RateWindow::new(RATE_WINDOW_SAMPLES)),
            retention: Mutex::new(RetentionTotals::default()),
        }
    }

    /// A retention fold step did `r`.
    pub fn folded(&self, r: &FoldReport) {
        let mut t = lock(&self.retention);
        t.folded_frames += r.frames;
        t.folded_bytes += r.frame_bytes;
        t.space_dropped_points += r.space_points_dropped as u64;
        if r.newest_space_dropped_time_unix_ms.is_some() {
            t.newest_space_dropped_time_unix_ms = r.newest_space_dropped_time_unix_ms;
        }
    }

    /// A verified frame of `bytes` arrived for this group.
    pub fn received(&self, bytes: u64) {
        self.received_frames.fetch_add(1, Ordering::Relaxed);
        self.received_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A commit made `frames` frames of `bytes` durable in the journal.
    pub fn journaled(&self, frames: u64, bytes: u64) {
        self.journaled_frames.fetch_add(frames, Ordering::Relaxed);
        self.journaled_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Copies what is durable in `journal` (seqs, its new frame entries and points).
    /// Called by the holder of the journal after each commit, fold step and open.
    pub fn publish(&self, journal: &Journal) {
        let durable = journal.durable_seq();
        self.durable_seq.store(durable, Ordering::Relaxed);
        self.base_seq.store(journal.base_seq(), Ordering::Relaxed);
        // Frames before points: whoever sees a point finds its frames.
        self.publish_frames(journal);
        let all = journal.points();
        let src = &all[..all.partition_point(|p| p.seq <= durable)];
        let mut dst = lock(&self.points);
        // The copy is a prefix of the index unless the journal dropped points from its
        // front (retention) or was reopened with fewer: then it is copied afresh.
        let prefix = dst.len() <= src.len()
            && dst.first().is_none_or(|p| p.seq == src[0].seq)
            && dst.last().is_none_or(|p| p.seq == src[dst.len() - 1].seq);
        if !prefix {
            dst.clear();
        }
        let from = dst.len();
        dst.extend(src[from..].iter().map(PointSummary::from));
    }

    /// Appends the journal's new durable frame entries to the copy and drops those the
    /// base passed.
    fn publish_frames(&self, journal: &Journal) {
        let (base, durable) = (journal.base_seq(), journal.durable_seq());
        let mut dst = lock(&self.frames);
        while dst.front().is_some_and(|e| e.seq <= base) {
            dst.pop_front();
        }
        // The copy is the journal's entries base + 1 ..= (its last); anything else (a
        // journal reopened with a different history, which durable frames never are)
        // is copied afresh.
        let matches = |e: &FrameEntry| journal.entry(e.seq) == Some(e);
        let whole = dst.front().is_none_or(|e| e.seq == base + 1 && matches(e))
            && dst.back().is_none_or(|e| e.seq <= durable && matches(e));
        if !whole {
            dst.clear();
        }
        let from = dst.back().map_or(base + 1, |e| e.seq + 1);
        for seq in from..=durable {
            match journal.entry(seq) {
                Some(e) => dst.push_back(*e),
                None => break,
            }
        }
    }

    /// The durable frame entries from the published base through `seq`, in seq order
    /// (a copy: see the module doc). Entries the fold passed since are still in it when
    /// the copy was not republished yet: a reader skips those whose segment is gone.
    pub fn frames_through(&self, seq: u64) -> Vec<FrameEntry> {
        lock(&self.frames)
            .iter()
            .take_while(|e| e.seq <= seq)
            .copied()
            .collect()
    }

    /// The running exports changed.
    pub fn set_exports(&self, exports: Vec<ExportMark>) {
        *lock(&self.exports) = exports;
    }

    /// A connection claimed the group (`Some`) or let go of it (`None`).
    pub fn set_peer(&self, peer: Option<Peer>) {
        *lock(&self.peer) = peer;
    }

    /// The group's failback phase changed (`None`: it replicates).
    pub fn set_failback(&self, mark: Option<FailbackMark>) {
        *lock(&self.failback) = mark;
    }

    /// The journal was dropped (a failback commit): no seqs, no points.
    pub fn forget_journal(&self) {
        self.durable_seq.store(0, Ordering::Relaxed);
        self.base_seq.store(0, Ordering::Relaxed);
        lock(&self.frames).clear();
        lock(&self.points).clear();
    }

    /// The durable points, oldest first.
    pub fn points(&self) -> Vec<PointSummary> {
        lock(&self.points).clone()
    }

    /// The values now.
    pub fn snapshot(&self) -> GroupSnapshot {
        let (points, newest_point, newest_consistent) = {
            let p = lock(&self.points);
            (
                p.len(),
                p.last().copied(),
                p.iter().rev().find(|p| p.consistent).copied(),
            )
        };
        GroupSnapshot {
            received_bytes: self.received_bytes.load(Ordering::Relaxed),
            received_frames: self.received_frames.load(Ordering::Relaxed),
            journaled_bytes: self.journaled_bytes.load(Ordering::Relaxed),
            journaled_frames: self.journaled_frames.load(Ordering::Relaxed),
            durable_seq: self.durable_seq.load(Ordering::Relaxed),
            base_seq: self.base_seq.load(Ordering::Relaxed),
            points,
            newest_point,
            newest_consistent,
            peer: lock(&self.peer).clone(),
            failback: *lock(&self.failback),
            exports: lock(&self.exports).clone(),
            receive_bytes_per_s: lock(&self.receive_rate).per_second(),
            journal_bytes_per_s: lock(&self.journal_rate).per_second(),
            journal_bytes_max: self.journal_bytes_max,
            retention: *lock(&self.retention),
        }
    }
}

/// Every group's values, and the connections.
pub struct Metrics {
    /// In config order.
    groups: Vec<Arc<GroupMetrics>>,
    connections: AtomicU64,
    /// Origin of the monotonic sample times.
    started: Instant,
}

/// Counts a connection past its hello while it lives.
pub struct ConnectionGuard(Arc<Metrics>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Values for every group of `cfg`.
    pub fn new(cfg: &Config) -> Self {
        Self {
            groups: cfg
                .groups
                .iter()
                .map(|g| Arc::new(GroupMetrics::new(&g.id, g.journal_bytes_max)))
                .collect(),
            connections: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    /// The values of group `id`.
    pub fn group(&self, id: &str) -> Option<&Arc<GroupMetrics>> {
        self.groups.iter().find(|g| g.id == id)
    }

    /// A process server connection passed its hello; counted until the guard drops.
    pub fn connection(self: &Arc<Self>) -> ConnectionGuard {
        self.connections.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(self.clone())
    }

    /// Process server connections past their hello now.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Adds one sample of every total to the rate windows.
    pub fn sample(&self) {
        let at_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        for g in &self.groups {
            lock(&g.receive_rate).push(at_ms, g.received_bytes.load(Ordering::Relaxed));
            lock(&g.journal_rate).push(at_ms, g.journaled_bytes.load(Ordering::Relaxed));
        }
    }

    /// Samples every [`SAMPLE_INTERVAL_MS`], for ever.
    pub async fn sample_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(SAMPLE_INTERVAL_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sample();
        }
    }
}

/// The exposition of every metric (see the module doc). Measures each journal
/// directory: run it on the blocking pool.
pub fn render(cfg: &Config, metrics: &Metrics) -> Result<String, String> {
    let now = now_unix_ms();
    let mut groups = Vec::with_capacity(metrics.groups.len());
    for g in &metrics.groups {
        let journal_bytes = store::dir_bytes(&cfg.journal_dir(&g.id))
            .map_err(|e| format!("group {}: {e:#}", g.id))?;
        groups.push((g.id.as_str(), g.snapshot(), journal_bytes));
    }
    let mut e = Exposition::new();
    // (snapshot, journal bytes, now in Unix ms)
    type Pick = fn(&GroupSnapshot, u64, u64) -> Option<SampleValue>;
    let per_group: [(&'static str, MetricType, &str, Pick); 14] = [
        (
            "blockrep_received_bytes_total",
            MetricType::Counter,
            "Bytes of verified frames received from the process server (resends included).",
            |s, _, _| Some(s.received_bytes.into()),
        ),
        (
            "blockrep_received_frames_total",
            MetricType::Counter,
            "Verified frames received from the process server (resends included).",
            |s, _, _| Some(s.received_frames.into()),
        ),
        (
            "blockrep_journaled_bytes_total",
            MetricType::Counter,
            "Bytes of frames appended to the journal and synced.",
            |s, _, _| Some(s.journaled_bytes.into()),
        ),
        (
            "blockrep_journaled_frames_total",
            MetricType::Counter,
            "Frames appended to the journal and synced.",
            |s, _, _| Some(s.journaled_frames.into()),
        ),
        (
            "blockrep_receive_bytes_per_second",
            MetricType::Gauge,
            "Bytes of frames received per second over the last 10 s.",
            |s, _, _| Some(s.receive_bytes_per_s.into()),
        ),
        (
            "blockrep_durable_seq",
            MetricType::Gauge,
            "Highest frame seq of the group durable in the journal.",
            |s, _, _| Some(s.durable_seq.into()),
        ),
        (
            "blockrep_points",
            MetricType::Gauge,
            "Recovery points the journal holds.",
            |s, _, _| Some((s.points as u64).into()),
        ),
        (
            "blockrep_newest_point_timestamp_seconds",
            MetricType::Gauge,
            "Cut time (Unix seconds) of the newest durable recovery point.",
            |s, _, _| {
                s.newest_point
                    .map(|p| (p.time_unix_ms as f64 / 1000.0).into())
            },
        ),
        (
            "blockrep_rpo_seconds",
            MetricType::Gauge,
            "Age of the newest durable recovery point (the recovery point objective now).",
            |s, _, now| s.rpo_ms(now).map(|ms| (ms as f64 / 1000.0).into()),
        ),
        (
            "blockrep_connected",
            MetricType::Gauge,
            "1 while a process server holds the group, else 0.",
            |s, _, _| Some(s.peer.is_some().into()),
        ),
        (
            "blockrep_journal_bytes",
            MetricType::Gauge,
            "Bytes of the group's journal files on disk.",
            |_, journal_bytes, _| Some(journal_bytes.into()),
        ),
        (
            "blockrep_journal_bytes_max",
            MetricType::Gauge,
            "The journal's limit (journal_bytes_max): beyond it the oldest points are dropped.",
            |s, _, _| Some(s.journal_bytes_max.into()),
        ),
        (
            "blockrep_folded_bytes_total",
            MetricType::Counter,
            "Bytes of journal frames the retention fold applied to the replicas and dropped.",
            |s, _, _| Some(s.retention.folded_bytes.into()),
        ),
        (
            "blockrep_points_dropped_for_space_total",
            MetricType::Counter,
            "Points dropped before their retention window ended, because the journal was over journal_bytes_max.",
            |s, _, _| Some(s.retention.space_dropped_points.into()),
        ),
    ];
    for (name, kind, help, pick) in per_group {
        let mut f = e.family(name, kind, help);
        for (id, s, journal_bytes) in &groups {
            if let Some(v) = pick(s, *journal_bytes, now) {
                f.sample(&[("group", id)], v);
            }
        }
    }
    let mut f = e.family(
        "blockrep_group_state",
        MetricType::Gauge,
        "1 for the state of the group's disks (replicating, initial-sync, resyncing, disconnected, failing-back, failed-back-uncommitted, failed-back), 0 for the others.",
    );
    for (id, s, _) in &groups {
        let now_state = s.state();
        for st in STATE_NAMES {
            f.sample(&[("group", id), ("state", st)], *st == now_state);
        }
    }
    e.family(
        "blockrep_connected_process_servers",
        MetricType::Gauge,
        "Process server connections past their hello.",
    )
    .sample(&[], metrics.connections());
    Ok(e.finish())
}

/// The `GET /metrics` endpoint is write capture's: one HTTP loop for both binaries.
pub use process_server::metrics::{Render, serve_http};

#[cfg(test)]
mod tests {
    use super::*;
    use datapath::frame::{PointRecord, encode_point};
    use datapath::journal::JournalConfig;
    use datapath::storage::RealFs;

    /// Proves the state names follow the table in [`state_name`].
    #[test]
    fn state_names() {
        assert_eq!(state_name(true, Some(true), true, None), "replicating");
        assert_eq!(state_name(true, None, false, None), "initial-sync");
        assert_eq!(state_name(true, Some(false), true, None), "resyncing");
        assert_eq!(state_name(true, Some(false), false, None), "initial-sync");
        assert_eq!(state_name(false, Some(false), true, None), "resyncing");
        assert_eq!(state_name(false, Some(true), true, None), "disconnected");
        assert_eq!(state_name(false, None, false, None), "disconnected");
        assert_eq!(
            state_name(false, None, false, Some(Phase::Committed)),
            "failed-back"
        );
        assert_eq!(
            state_name(true, Some(true), true, Some(Phase::Applied)),
            "failed-back-uncommitted"
        );
        assert_eq!(
            state_name(false, Some(true), true, Some(Phase::Applying)),
            "failing-back"
        );
        for p in [true, false] {
            for c in [None, Some(true), Some(false)] {
                for any in [true, false] {
                    for f in [
                        None,
                        Some(Phase::Applying),
                        Some(Phase::Applied),
                        Some(Phase::Committed),
                    ] {
                        assert!(STATE_NAMES.contains(&state_name(p, c, any, f)));
                    }
                }
            }
        }
    }

    fn config(dir: &std::path::Path) -> Config {
        let file = dir.join("mt.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:0\"\ndata_dir = \"d\"\n[[group]]\nid = \"g1\"\n[[group.disk]]\nid = \"disk0\"\nsize = 4096\nreplica = \"r.img\"\n",
        )
        .unwrap();
        Config::load(&file).unwrap()
    }

    /// Proves the exposition has every family with HELP and TYPE, the group label, no
    /// RPO before a point, and the connection count.
    #[test]
    fn render_names_every_group() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let m = Arc::new(Metrics::new(&cfg));
        m.group("g1").unwrap().received(100);
        let _c = m.connection();
        let text = render(&cfg, &m).unwrap();
        for family in [
            "blockrep_received_bytes_total",
            "blockrep_journaled_bytes_total",
            "blockrep_journal_bytes",
            "blockrep_journal_bytes_max",
            "blockrep_folded_bytes_total",
            "blockrep_points_dropped_for_space_total",
            "blockrep_rpo_seconds",
            "blockrep_connected",
            "blockrep_connected_process_servers",
        ] {
            assert!(text.contains(&format!("# HELP {family} ")), "{family}");
            assert!(text.contains(&format!("# TYPE {family} ")), "{family}");
        }
        assert!(text.contains("blockrep_received_bytes_total{group=\"g1\"} 100\n"));
        assert!(text.contains("blockrep_journal_bytes{group=\"g1\"} 0\n"));
        assert!(text.contains("blockrep_journal_bytes_max{group=\"g1\"} 68719476736\n"));
        assert!(text.contains("blockrep_connected{group=\"g1\"} 0\n"));
        assert!(text.contains("blockrep_group_state{group=\"g1\",state=\"disconnected\"} 1\n"));
        assert!(text.contains("blockrep_connected_process_servers 1\n"));
        assert!(!text.contains("blockrep_rpo_seconds{"), "no point, no RPO");
        drop(_c);
        assert_eq!(m.connections(), 0);
    }

    fn point(id: u64, consistent: bool) -> PointRecord {
        PointRecord {
            point_id: id,
            epoch: id,
            time_unix_ms: 1000 * id,
            kind: PointKind::Crash,
            consistent,
            group: "g1".into(),
        }
    }

    /// Proves publish copies only durable points and frame entries, appends new ones to
    /// the copy, and follows the journal when it dropped points from its front.
    #[test]
    fn publish_follows_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) =
            Journal::open(Arc::new(RealFs), dir.path(), "g1", JournalConfig::default()).unwrap();
        let g = GroupMetrics::new("g1", 1 << 30);
        let mut buf = Vec::new();
        for id in 1..=3 {
            encode_point(&point(id, id != 3), id, &mut buf);
            j.append(&buf).unwrap();
            if id == 2 {
                j.commit().unwrap();
            }
            g.publish(&j);
        }
        // Point 3 is appended, not yet durable.
        let s = g.snapshot();
        assert_eq!((s.durable_seq, s.points), (2, 2));
        assert_eq!(s.newest_point.map(|p| p.id), Some(2));
        assert_eq!(s.rpo_ms(2500), Some(500));
        assert_eq!(s.state(), "disconnected");
        j.commit().unwrap();
        g.publish(&j);
        let s = g.snapshot();
        assert_eq!(s.points, 3);
        assert_eq!(s.state(), "resyncing", "point 3 is inconsistent");
        g.set_peer(Some(Peer {
            node: "ps1".into(),
            address: "127.0.0.1:1".parse().unwrap(),
        }));
        assert!(g.snapshot().peer.is_some());
        let seqs = |v: Vec<FrameEntry>| v.iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(g.frames_through(u64::MAX)), vec![1, 2, 3]);
        assert_eq!(seqs(g.frames_through(2)), vec![1, 2]);
        assert_eq!(g.frames_through(1)[0], *j.entry(1).unwrap());
        j.drop_through(1).unwrap();
        g.publish(&j);
        let ids: Vec<u64> = g.points().iter().map(|p| p.id).collect();
        assert_eq!(ids, vec![2, 3]);
        assert_eq!(seqs(g.frames_through(u64::MAX)), vec![2, 3]);
        assert_eq!(g.snapshot().base_seq, 1);
        g.received(10);
        g.journaled(1, 10);
        let s = g.snapshot();
        assert_eq!(
            (
                s.received_bytes,
                s.received_frames,
                s.journaled_bytes,
                s.journaled_frames
            ),
            (10, 1, 10, 1)
        );
    }
}
