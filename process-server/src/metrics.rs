//! Live counters of the process server, the throughput over them, its state names, and
//! its Prometheus endpoint.
//!
//! # Counters
//!
//! Plain atomics with relaxed ordering, bumped on the hot paths without a lock: each is
//! a statistic, nothing synchronises through it. Groups and disks are fixed at start,
//! so the maps that find them are never written after [`Metrics::new`].
//!
//! | counter                          | bumped where                                        |
//! |----------------------------------|-----------------------------------------------------|
//! | captured bytes, per disk         | `Tracking::after_write`, once the spool took the write (or the group tracks by bitmap only) |
//! | frames and bytes on the wire     | the shipper's sender, after a frame was written to the socket |
//! | plain bytes shipped              | the same place, from the data frame's `plain_bytes` |
//! | newest acknowledged point        | `Shipper::on_ack`, after its state was stored (and at start, from the stored state) |
//! | connected                        | the shipper: set when a session resumed the group, cleared when it ends |
//!
//! Spool fill, epoch, mode and dirty blocks are read from the trackers when asked.
//! A sampler task ([`Metrics::sample_forever`]) reads the totals every
//! [`SAMPLE_INTERVAL_MS`] into a [`RateWindow`] of [`RATE_WINDOW_SAMPLES`]: every
//! throughput is the rate over the last 10 s.
//!
//! # `GET /metrics`
//!
//! Served when the config names `metrics = "ADDR"` (see [`crate::config`]), plain HTTP,
//! read-only, one request per connection (see [`datapath::metrics`]). At most
//! [`HTTP_CONNECTIONS_MAX`] scrapes at once, each with [`HTTP_READ_TIMEOUT_MS`] to send
//! its request head.
//!
//! | metric                                        | type    | labels        |
//! |-----------------------------------------------|---------|---------------|
//! | `blockrep_captured_bytes_total`               | counter | group, disk   |
//! | `blockrep_dirty_blocks`                       | gauge   | group, disk   |
//! | `blockrep_resync_compared_blocks_total`, `blockrep_resync_sent_blocks_total` (hash-diff resync, 64 KiB blocks) | counter | group, disk |
//! | `blockrep_shipped_bytes_total` (on the wire)  | counter | group         |
//! | `blockrep_shipped_plain_bytes_total`          | counter | group         |
//! | `blockrep_shipped_frames_total`               | counter | group         |
//! | `blockrep_capture_bytes_per_second` (10 s)    | gauge   | group         |
//! | `blockrep_ship_bytes_per_second` (10 s, wire) | gauge   | group         |
//! | `blockrep_spool_used_bytes`                   | gauge   | group         |
//! | `blockrep_spool_max_bytes`                    | gauge   | group         |
//! | `blockrep_epoch`                              | gauge   | group         |
//! | `blockrep_acked_point_timestamp_seconds`      | gauge   | group         |
//! | `blockrep_rpo_seconds` (absent before the first ack) | gauge | group    |
//! | `blockrep_connected` (0/1; absent without `[target]`) | gauge | group   |
//! | `blockrep_group_state` (1 for the current state) | gauge | group, state |

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datapath::metrics::{
    Exposition, MetricType, REQUEST_HEAD_BYTES_MAX, RateWindow, Route, SampleValue, answer, route,
};
use datapath::tracker::{DiskSpec, TrackMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::tracking::{Tracking, now_unix_ms};

/// How often the sampler reads the totals.
pub const SAMPLE_INTERVAL_MS: u64 = 1000;
/// Samples a rate spans: 10 s at one a second.
pub const RATE_WINDOW_SAMPLES: usize = 11;
/// Scrapes served at once; more are closed at once.
pub const HTTP_CONNECTIONS_MAX: usize = 16;
/// A scrape must send its whole request head within this time.
pub const HTTP_READ_TIMEOUT_MS: u64 = 5000;
/// After answering, what the client still sends is drained for at most this long ...
pub const HTTP_LINGER_MS: u64 = 1000;
/// ... and at most this many bytes, so that the answer is not lost to a reset.
pub const HTTP_LINGER_BYTES_MAX: u64 = 64 << 10;

/// Every group's and disk's counters.
pub struct Metrics {
    /// Sorted by group id (the order of [`Tracking::specs`]).
    groups: Vec<Arc<GroupMetrics>>,
    disks: HashMap<String, Arc<DiskMetrics>>,
    /// Origin of the monotonic sample times.
    started: Instant,
}

/// One group's counters.
pub struct GroupMetrics {
    pub id: String,
    /// In config order.
    pub disks: Vec<Arc<DiskMetrics>>,
    shipped_wire_bytes: AtomicU64,
    shipped_plain_bytes: AtomicU64,
    shipped_frames: AtomicU64,
    /// Newest acknowledged point; time 0: none yet.
    acked_point_id: AtomicU64,
    acked_point_time_unix_ms: AtomicU64,
    connected: AtomicBool,
    capture_rate: Mutex<RateWindow>,
    ship_rate: Mutex<RateWindow>,
}

/// One disk's counters.
pub struct DiskMetrics {
    pub id: String,
    pub group: String,
    captured_bytes: AtomicU64,
    /// Hash-diff resync: 64 KiB blocks compared with the master target's hashes.
    hash_compared_blocks: AtomicU64,
    /// Hash-diff resync: 64 KiB blocks (or parts of them) sent because they differed
    /// or could not be compared.
    hash_sent_blocks: AtomicU64,
}

/// A group's counters at one instant.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupSnapshot {
    pub captured_bytes: u64,
    pub shipped_wire_bytes: u64,
    pub shipped_plain_bytes: u64,
    pub shipped_frames: u64,
    /// (point id, time) of the newest acknowledged point.
    pub acked_point: Option<(u64, u64)>,
    pub connected: bool,
    pub capture_bytes_per_s: f64,
    pub ship_bytes_per_s: f64,
}

impl GroupSnapshot {
    /// The recovery point objective now: the age of the newest acknowledged point.
    pub fn rpo_ms(&self, now_unix_ms: u64) -> Option<u64> {
        self.acked_point.map(|(_, t)| now_unix_ms.saturating_sub(t))
    }
}

/// The state of a group (and of each of its disks) as `status` and `/metrics` name it.
/// `connected`: whether the shipper holds a session for the group, `None` when no
/// `[target]` is configured. The one place these names are decided: `initial-sync`
/// (a disk's first full sync is not done), then `bitmap-only` (no point until a
/// resync), then `disconnected`, then `resyncing` or `replicating`.
pub fn state_name(mode: &TrackMode, initial: bool, connected: Option<bool>) -> &'static str {
    // What needs the operator most wins; the connection is its own field too.
    match (initial, mode, connected) {
        (true, _, _) => "initial-sync",
        (_, TrackMode::BitmapOnly { .. }, _) => "bitmap-only",
        (_, _, Some(false)) => "disconnected",
        (_, TrackMode::Resyncing, _) => "resyncing",
        (_, TrackMode::Spooling, _) => "replicating",
    }
}

/// Every name [`state_name`] returns (for the one-hot `blockrep_group_state`).
pub const STATE_NAMES: &[&str] = &[
    "replicating",
    "initial-sync",
    "resyncing",
    "bitmap-only",
    "disconnected",
];

impl GroupMetrics {
    fn new(id: &str, disks: &[DiskSpec]) -> Self {
        Self {
            id: id.to_string(),
            disks: disks
                .iter()
                .map(|d| {
                    Arc::new(DiskMetrics {
                        id: d.id.clone(),
                        group: id.to_string(),
                        captured_bytes: AtomicU64::new(0),
                        hash_compared_blocks: AtomicU64::new(0),
                        hash_sent_blocks: AtomicU64::new(0),
                    })
                })
                .collect(),
            shipped_wire_bytes: AtomicU64::new(0),
            shipped_plain_bytes: AtomicU64::new(0),
            shipped_frames: AtomicU64::new(0),
            acked_point_id: AtomicU64::new(0),
            acked_point_time_unix_ms: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            capture_rate: Mutex::new(RateWindow::new(RATE_WINDOW_SAMPLES)),
            ship_rate: Mutex::new(RateWindow::new(RATE_WINDOW_SAMPLES)),
        }
    }

    /// A group's counters on their own (the shipper's unit tests).
    pub fn standalone(id: &str, disks: &[DiskSpec]) -> Arc<Self> {
        Arc::new(Self::new(id, disks))
    }

    /// A frame of `wire_bytes` went out; `plain_bytes` of captured data in it.
    pub fn sent_frame(&self, wire_bytes: u64, plain_bytes: u64) {
        self.shipped_frames.fetch_add(1, Ordering::Relaxed);
        self.shipped_wire_bytes
            .fetch_add(wire_bytes, Ordering::Relaxed);
        self.shipped_plain_bytes
            .fetch_add(plain_bytes, Ordering::Relaxed);
    }

    /// The master target acknowledged point `id` cut at `time_unix_ms`. The time is
    /// stored first and the id after it; a reader may see a new time with the old id
    /// for an instant, which a statistic tolerates.
    pub fn acked_point(&self, id: u64, time_unix_ms: u64) {
        self.acked_point_time_unix_ms
            .store(time_unix_ms.max(1), Ordering::Relaxed);
        self.acked_point_id.store(id, Ordering::Relaxed);
    }

    /// The shipper holds (or lost) a session for this group.
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    fn captured_bytes(&self) -> u64 {
        self.disks
            .iter()
            .map(|d| d.captured_bytes())
            .fold(0, u64::saturating_add)
    }

    /// The counters now.
    pub fn snapshot(&self) -> GroupSnapshot {
        let t = self.acked_point_time_unix_ms.load(Ordering::Relaxed);
        GroupSnapshot {
            captured_bytes: self.captured_bytes(),
            shipped_wire_bytes: self.shipped_wire_bytes.load(Ordering::Relaxed),
            shipped_plain_bytes: self.shipped_plain_bytes.load(Ordering::Relaxed),
            shipped_frames: self.shipped_frames.load(Ordering::Relaxed),
            acked_point: (t != 0).then(|| (self.acked_point_id.load(Ordering::Relaxed), t)),
            connected: self.connected.load(Ordering::Relaxed),
            capture_bytes_per_s: rate(&self.capture_rate),
            ship_bytes_per_s: rate(&self.ship_rate),
        }
    }
}

fn rate(w: &Mutex<RateWindow>) -> f64 {
    w.lock().unwrap_or_else(|e| e.into_inner()).per_second()
}

impl DiskMetrics {
    pub fn captured_bytes(&self) -> u64 {
        self.captured_bytes.load(Ordering::Relaxed)
    }

    /// A hash-diff resync compared `compared` blocks and sent `sent`.
    pub fn hash_diffed(&self, compared: u64, sent: u64) {
        self.hash_compared_blocks
            .fetch_add(compared, Ordering::Relaxed);
        self.hash_sent_blocks.fetch_add(sent, Ordering::Relaxed);
    }

    /// Blocks compared and sent by hash-diff resyncs since start.
    pub fn hash_blocks(&self) -> (u64, u64) {
        (
            self.hash_compared_blocks.load(Ordering::Relaxed),
            self.hash_sent_blocks.load(Ordering::Relaxed),
        )
    }
}

impl Metrics {
    /// Counters for every group and disk of `specs` (groups sorted by id).
    pub fn new(specs: &[(String, Vec<DiskSpec>)]) -> Self {
        let groups: Vec<Arc<GroupMetrics>> = specs
            .iter()
            .map(|(g, disks)| Arc::new(GroupMetrics::new(g, disks)))
            .collect();
        let disks = groups
            .iter()
            .flat_map(|g| g.disks.iter().map(|d| (d.id.clone(), d.clone())))
            .collect();
        Self {
            groups,
            disks,
            started: Instant::now(),
        }
    }

    /// A write of `bytes` to `disk` was captured (an unknown disk is ignored: the
    /// tracker refuses it before this is called).
    pub fn captured(&self, disk: &str, bytes: u64) {
        if let Some(d) = self.disks.get(disk) {
            d.captured_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// The counters of group `id`.
    pub fn group(&self, id: &str) -> Option<&Arc<GroupMetrics>> {
        self.groups.iter().find(|g| g.id == id)
    }

    /// Every group, sorted by id.
    pub fn groups(&self) -> &[Arc<GroupMetrics>] {
        &self.groups
    }

    /// The counters of disk `id`.
    pub fn disk(&self, id: &str) -> Option<&Arc<DiskMetrics>> {
        self.disks.get(id)
    }

    /// Adds one sample of every total to the rate windows.
    pub fn sample(&self) {
        let at_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        for g in &self.groups {
            let captured = g.captured_bytes();
            let shipped = g.shipped_wire_bytes.load(Ordering::Relaxed);
            g.capture_rate
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(at_ms, captured);
            g.ship_rate
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(at_ms, shipped);
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

/// The exposition of every metric (see the module doc). `shipping`: a `[target]` is
/// configured. Takes each group's tracker lock briefly (spool fill, dirty blocks).
pub fn render(metrics: &Metrics, tracking: &Tracking, shipping: bool) -> String {
    let now = now_unix_ms();
    let status: HashMap<String, (u64, TrackMode, u64, u64)> = tracking
        .status()
        .into_iter()
        .map(|(g, epoch, mode, used, max)| (g, (epoch, mode, used, max)))
        .collect();
    let groups: Vec<(&GroupMetrics, GroupSnapshot)> = metrics
        .groups
        .iter()
        .map(|g| (g.as_ref(), g.snapshot()))
        .collect();
    let mut e = Exposition::new();

    let mut f = e.family(
        "blockrep_captured_bytes_total",
        MetricType::Counter,
        "Bytes written by clients through write capture, per disk.",
    );
    for (g, _) in &groups {
        for d in &g.disks {
            f.sample(&[("group", &g.id), ("disk", &d.id)], d.captured_bytes());
        }
    }
    let mut f = e.family(
        "blockrep_resync_compared_blocks_total",
        MetricType::Counter,
        "Blocks (64 KiB) a hash-diff resync compared with the master target's copy, per disk.",
    );
    for (g, _) in &groups {
        for d in &g.disks {
            f.sample(&[("group", &g.id), ("disk", &d.id)], d.hash_blocks().0);
        }
    }
    let mut f = e.family(
        "blockrep_resync_sent_blocks_total",
        MetricType::Counter,
        "Blocks (64 KiB) a hash-diff resync sent because they differed or could not be compared, per disk.",
    );
    for (g, _) in &groups {
        for d in &g.disks {
            f.sample(&[("group", &g.id), ("disk", &d.id)], d.hash_blocks().1);
        }
    }
    let mut f = e.family(
        "blockrep_dirty_blocks",
        MetricType::Gauge,
        "Blocks (4 KiB) of the disk marked dirty and not yet acknowledged by the master target.",
    );
    for (g, _) in &groups {
        if let Some(t) = tracking.group(&g.id)
            && let Ok(t) = t.lock()
        {
            for d in &g.disks {
                if let Some(n) = t.dirty_blocks(&d.id) {
                    f.sample(&[("group", &g.id), ("disk", &d.id)], n);
                }
            }
        }
    }
    type Pick = fn(&GroupSnapshot) -> SampleValue;
    let per_group: [(&'static str, MetricType, &str, Pick); 5] = [
        (
            "blockrep_shipped_bytes_total",
            MetricType::Counter,
            "Bytes of frames sent to the master target (compressed, headers included).",
            |s| s.shipped_wire_bytes.into(),
        ),
        (
            "blockrep_shipped_plain_bytes_total",
            MetricType::Counter,
            "Bytes of captured data in the data frames sent (before compression).",
            |s| s.shipped_plain_bytes.into(),
        ),
        (
            "blockrep_shipped_frames_total",
            MetricType::Counter,
            "Frames sent to the master target (resends after a reconnect included).",
            |s| s.shipped_frames.into(),
        ),
        (
            "blockrep_capture_bytes_per_second",
            MetricType::Gauge,
            "Captured bytes per second over the last 10 s.",
            |s| s.capture_bytes_per_s.into(),
        ),
        (
            "blockrep_ship_bytes_per_second",
            MetricType::Gauge,
            "Bytes sent on the wire per second over the last 10 s.",
            |s| s.ship_bytes_per_s.into(),
        ),
    ];
    for (name, kind, help, pick) in per_group {
        let mut f = e.family(name, kind, help);
        for (g, s) in &groups {
            f.sample(&[("group", &g.id)], pick(s));
        }
    }
    type PickStatus = fn(&(u64, TrackMode, u64, u64)) -> u64;
    let from_status: [(&'static str, &str, PickStatus); 3] = [
        (
            "blockrep_spool_used_bytes",
            "Bytes the group's spool holds.",
            |s| s.2,
        ),
        (
            "blockrep_spool_max_bytes",
            "Bound of the group's spool; when full the group tracks by bitmap only.",
            |s| s.3,
        ),
        (
            "blockrep_epoch",
            "The epoch the group's writes go to now.",
            |s| s.0,
        ),
    ];
    for (name, help, pick) in from_status {
        let mut f = e.family(name, MetricType::Gauge, help);
        for (g, _) in &groups {
            if let Some(s) = status.get(&g.id) {
                f.sample(&[("group", &g.id)], pick(s));
            }
        }
    }
    let mut f = e.family(
        "blockrep_acked_point_timestamp_seconds",
        MetricType::Gauge,
        "Cut time (Unix seconds) of the newest recovery point the master target acknowledged as durable.",
    );
    for (g, s) in &groups {
        if let Some((_, t)) = s.acked_point {
            f.sample(&[("group", &g.id)], t as f64 / 1000.0);
        }
    }
    let mut f = e.family(
        "blockrep_rpo_seconds",
        MetricType::Gauge,
        "Age of the newest recovery point durable at the master target (the recovery point objective now).",
    );
    for (g, s) in &groups {
        if let Some(ms) = s.rpo_ms(now) {
            f.sample(&[("group", &g.id)], ms as f64 / 1000.0);
        }
    }
    if shipping {
        let mut f = e.family(
            "blockrep_connected",
            MetricType::Gauge,
            "1 while a session with the master target ships the group, else 0.",
        );
        for (g, s) in &groups {
            f.sample(&[("group", &g.id)], s.connected);
        }
    }
    let mut f = e.family(
        "blockrep_group_state",
        MetricType::Gauge,
        "1 for the group's current state (replicating, initial-sync, resyncing, bitmap-only, disconnected), 0 for the others.",
    );
    let sync = tracking.sync_status();
    for (g, s) in &groups {
        if let Some((_, mode, _, _)) = status.get(&g.id) {
            let initial = sync.get(&g.id).is_some_and(|(d, _)| !d.is_empty());
            let now_state = state_name(mode, initial, shipping.then_some(s.connected));
            for st in STATE_NAMES {
                f.sample(&[("group", &g.id), ("state", st)], *st == now_state);
            }
        }
    }
    e.finish()
}

/// Produces the exposition for one scrape (run on the blocking pool).
pub type Render = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Serves `GET /metrics` on `listener` until it fails.
pub async fn serve_http(listener: TcpListener, render: Render) {
    let permits = Arc::new(Semaphore::new(HTTP_CONNECTIONS_MAX));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: wait instead of spinning.
                warn!("metrics: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!(%peer, "metrics: {HTTP_CONNECTIONS_MAX} scrapes in progress, closing");
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = scrape(stream, render).await {
                debug!(%peer, "metrics: {e}");
            }
        });
    }
}

/// Answers one request: reads its head (bounded in bytes and time), answers, closes.
async fn scrape(mut stream: TcpStream, render: Render) -> std::io::Result<()> {
    let mut buf = vec![0u8; REQUEST_HEAD_BYTES_MAX];
    let mut len = 0;
    let read = async {
        loop {
            // `route` decides before the buffer is full, so the slice is never empty.
            let n = stream.read(&mut buf[len..]).await?;
            len += n;
            if let Some(r) = route(&buf[..len], n == 0) {
                return std::io::Result::Ok(r);
            }
        }
    };
    let r = match tokio::time::timeout(Duration::from_millis(HTTP_READ_TIMEOUT_MS), read).await {
        Ok(r) => r?,
        Err(_) => Route::Bad(format!(
            "no whole request head within {HTTP_READ_TIMEOUT_MS} ms"
        )),
    };
    let out = match &r {
        Route::Metrics { .. } => {
            let body = tokio::task::spawn_blocking(move || render())
                .await
                .unwrap_or_else(|e| Err(format!("render the metrics: {e}")));
            answer(&r, || body)
        }
        _ => answer(&r, || Err("not a metrics request".into())),
    };
    stream.write_all(&out).await?;
    stream.shutdown().await?;
    // Drain what the client still sends (a refused oversized head, say) for a bounded
    // while: closing with unread bytes would reset the connection and could lose the
    // answer on its way.
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut total = 0u64;
        while total < HTTP_LINGER_BYTES_MAX {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n as u64,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(HTTP_LINGER_MS), drain).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn specs() -> Vec<(String, Vec<DiskSpec>)> {
        vec![(
            "g1".into(),
            vec![
                DiskSpec {
                    id: "disk0".into(),
                    size_bytes: 1 << 20,
                },
                DiskSpec {
                    id: "disk1".into(),
                    size_bytes: 1 << 20,
                },
            ],
        )]
    }

    /// Proves the counters add up per disk and group, the rate is taken over the
    /// samples, and the RPO is the age of the newest acknowledged point.
    #[test]
    fn counters_snapshot_and_rate() {
        let m = Metrics::new(&specs());
        m.captured("disk0", 4096);
        m.captured("disk1", 512);
        m.captured("nope", 1);
        let g = m.group("g1").unwrap();
        g.sent_frame(100, 4096);
        g.set_connected(true);
        let s = g.snapshot();
        assert_eq!(
            (
                s.captured_bytes,
                s.shipped_wire_bytes,
                s.shipped_plain_bytes,
                s.shipped_frames
            ),
            (4608, 100, 4096, 1)
        );
        assert_eq!(s.rpo_ms(5000), None);
        g.acked_point(7, 1000);
        let s = g.snapshot();
        assert_eq!(
            (s.acked_point, s.rpo_ms(5000)),
            (Some((7, 1000)), Some(4000))
        );
        assert!(s.connected);
        g.capture_rate.lock().unwrap().push(0, 0);
        g.capture_rate.lock().unwrap().push(2000, 4608);
        assert_eq!(g.snapshot().capture_bytes_per_s, 2304.0);
        assert_eq!(m.disk("disk1").unwrap().captured_bytes(), 512);
    }

    /// Proves the state names follow their order: initial sync, bitmap-only,
    /// disconnected, then the tracker's mode.
    #[test]
    fn state_names() {
        let bitmap = TrackMode::BitmapOnly { reason: "x".into() };
        assert_eq!(state_name(&TrackMode::Spooling, false, None), "replicating");
        assert_eq!(
            state_name(&TrackMode::Spooling, false, Some(true)),
            "replicating"
        );
        assert_eq!(
            state_name(&TrackMode::Spooling, false, Some(false)),
            "disconnected"
        );
        assert_eq!(state_name(&bitmap, false, Some(true)), "bitmap-only");
        assert_eq!(state_name(&bitmap, false, Some(false)), "bitmap-only");
        assert_eq!(
            state_name(&TrackMode::Resyncing, false, Some(false)),
            "disconnected"
        );
        assert_eq!(state_name(&bitmap, true, Some(true)), "initial-sync");
        assert_eq!(
            state_name(&TrackMode::Resyncing, true, None),
            "initial-sync"
        );
        assert_eq!(state_name(&TrackMode::Resyncing, false, None), "resyncing");
        for s in [
            state_name(&TrackMode::Resyncing, false, None),
            state_name(&bitmap, true, None),
            state_name(&TrackMode::Spooling, false, None),
            state_name(&bitmap, false, None),
            state_name(&bitmap, false, Some(false)),
        ] {
            assert!(STATE_NAMES.contains(&s));
        }
    }

    /// Proves a write through the capture hook is counted for its disk, and the
    /// exposition shows it with HELP/TYPE lines, the spool fill, the state one-hot, no
    /// RPO before an ack, and `blockrep_connected` only when shipping.
    #[test]
    fn render_counts_captured_writes() {
        use crate::capture::Capture;
        use datapath::extent::ExtentData;
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::config::Config::parse(
            "[nbd]\nlisten = \"127.0.0.1:0\"\n[tracking]\nspool_bytes_max = \"2MiB\"\nspool_segment_bytes = \"1MiB\"\ninitial_sync = false\n[[group]]\nid = \"g1\"\n[[group.disk]]\nid = \"disk0\"\npath = \"d0.img\"\nsize = \"1MiB\"\n",
            dir.path(),
        )
        .unwrap();
        let exports = crate::nbd_server::Exports::open(&cfg).unwrap();
        let (t, _) = Tracking::open(&exports, &cfg).unwrap();
        t.before_write("disk0", 4096, 8192).unwrap();
        t.after_write("disk0", 4096, ExtentData::Bytes(&[7u8; 8192]))
            .unwrap();
        t.before_write("disk0", 0, 4096).unwrap();
        t.after_write("disk0", 0, ExtentData::Zero(4096)).unwrap();
        let text = render(t.metrics(), &t, false);
        for family in [
            "blockrep_captured_bytes_total",
            "blockrep_spool_used_bytes",
            "blockrep_spool_max_bytes",
            "blockrep_rpo_seconds",
        ] {
            assert!(text.contains(&format!("# HELP {family} ")), "{family}");
            assert!(text.contains(&format!("# TYPE {family} ")), "{family}");
        }
        assert!(
            text.contains("blockrep_captured_bytes_total{group=\"g1\",disk=\"disk0\"} 12288\n"),
            "{text}"
        );
        assert!(text.contains("blockrep_dirty_blocks{group=\"g1\",disk=\"disk0\"} 3\n"));
        t.metrics().disk("disk0").unwrap().hash_diffed(16, 2);
        let text = render(t.metrics(), &t, false);
        assert!(
            text.contains(
                "blockrep_resync_compared_blocks_total{group=\"g1\",disk=\"disk0\"} 16\n"
            )
        );
        assert!(
            text.contains("blockrep_resync_sent_blocks_total{group=\"g1\",disk=\"disk0\"} 2\n")
        );
        assert!(text.contains(&format!(
            "blockrep_spool_max_bytes{{group=\"g1\"}} {}\n",
            2 << 20
        )));
        assert!(text.contains("blockrep_group_state{group=\"g1\",state=\"replicating\"} 1\n"));
        assert!(!text.contains("blockrep_rpo_seconds{"), "no ack, no RPO");
        assert!(
            !text.contains("blockrep_connected"),
            "no target, no connection"
        );
        let shipping = render(t.metrics(), &t, true);
        assert!(shipping.contains("blockrep_connected{group=\"g1\"} 0\n"));
        assert!(shipping.contains("blockrep_group_state{group=\"g1\",state=\"disconnected\"} 1\n"));
        t.shutdown().unwrap();
    }

    async fn exchange(addr: std::net::SocketAddr, req: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        // The server may answer (and stop reading) before everything was sent.
        let _ = s.write_all(req).await;
        let _ = s.shutdown().await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Proves the endpoint answers a scrape, refuses garbage, truncated and oversized
    /// heads with 400 and other paths with 404, and keeps serving after each.
    #[test]
    fn http_endpoint_refuses_garbage_and_keeps_serving() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let render: Render = Arc::new(|| Ok("# HELP x y\n# TYPE x gauge\nx 1\n".into()));
            tokio::spawn(serve_http(listener, render));
            let ok = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".as_slice();
            let mut oversized = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
            oversized.resize(3 * REQUEST_HEAD_BYTES_MAX, b'a');
            let garbage: Vec<u8> = (0..5000u32).map(|i| (i * 7919 % 251) as u8).collect();
            let cases: [(&[u8], &str); 6] = [
                (b"\x00\x01\x02\r\n\r\n", "400"),
                (b"GET /metrics HTTP/1.1\r\nHost", "400"),
                (&oversized, "400"),
                (&garbage, "400"),
                (b"GET /other HTTP/1.1\r\n\r\n", "404"),
                (b"DELETE /metrics HTTP/1.1\r\n\r\n", "405"),
            ];
            for (req, code) in cases {
                let a = exchange(addr, req).await;
                assert!(a.starts_with(&format!("HTTP/1.1 {code} ")), "{code}: {a:?}");
                let a = exchange(addr, ok).await;
                assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
                assert!(
                    a.ends_with("\r\n\r\n# HELP x y\n# TYPE x gauge\nx 1\n"),
                    "{a}"
                );
            }
        });
    }
}
