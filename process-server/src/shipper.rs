//! The shipper: sends every group's sealed epochs to the master target as data frames
//! followed by a point frame, and turns the master target's acks into durable shipping
//! state and spool releases.
//!
//! # Connection
//!
//! TLS 1.3 with a client certificate, or plain TCP to a loopback master target (see
//! [`crate::tls`]); everything below runs the same over both. The shipper sends a Hello
//! (role process server, its node id, every group still shipped with its disks and
//! sizes), reads the master target's Hello and one Ack per group carrying the group's
//! journal `durable_seq`, then runs a sender and an ack reader on the same connection.
//! At most [`WINDOW_BYTES_MAX`] of frames are sent and not yet acknowledged; the sender
//! waits for acks beyond it. Any failure (connect refused, an Error frame, the socket
//! closed, a bad frame, no hello or no ack within [`ACK_TIMEOUT_MS`] while frames wait
//! for one) ends the connection; the shipper reconnects with exponential
//! backoff from [`BACKOFF_MIN_MS`] doubling to [`BACKOFF_MAX_MS`] and resumes.
//!
//! Both sides speak protocol 1 to 3 (the hello carries 1..=[`PROTOCOL_VERSION`]). On a
//! connection that negotiated 2 or later, the master target may send a `CutRequest`
//! for a group (a failback to `latest`): the ack reader cuts the group at once
//! (crash-consistent, like the timer's cuts) and the sender answers with a `CutDone`
//! naming the point (0 when none could be cut, e.g. in bitmap-only mode), between two
//! frames. The point itself ships like every point, after everything spooled before it.
//! On a connection that negotiated 3, the session attaches to the [`HashBroker`]: hash
//! requests of the resync and of `verify` go out between two frames the same way, and
//! the ack reader hands the hash lists that answer them back ([`crate::hashes`]).
//!
//! # Frames of an epoch
//!
//! A producer per group (a blocking thread) reads the group's DURABLE spool records
//! (the cutter syncs the spool at every cut, so each epoch becomes visible at its cut)
//! through an owned cursor, taking the tracker's lock only to make the cursor. Writes
//! and zeroes of an epoch go into one [`EpochMap`] per disk; on the epoch's Cut record
//! the maps are encoded, disks in id order, each as its chunks of at most
//! [`FRAME_PLAIN_BYTES_MAX`] bytes (zstd level [`frame::DEFAULT_ZSTD_LEVEL`]) with
//! consecutive frame seqs, then the point frame (point id = epoch). The chunks are
//! encoded on [`ENCODE_THREADS`] threads and sent in seq order as they come, into
//! buffers of a bounded pool ([`crate::bufpool`], [`FRAME_POOL_BUFFERS_MAX`]) that the
//! sender gives back once a frame is on the socket: frames are built in memory already
//! faulted in, not in fresh pages every time. When the maps hold
//! more than [`EPOCH_MAP_BYTES_MAX`] of data before the cut they are emitted early, so
//! memory stays bounded. The frames depend only on the records: the same records always
//! give the same frames with the same seqs, which is what makes resending safe.
//!
//! # Acknowledgement and resume
//!
//! When an ack's `durable_seq` covers a point frame, the shipper FIRST writes the
//! group's [`ShipState`] (epoch, point frame seq, spool seq of the cut), THEN calls
//! [`GroupTracker::ack_through`] with the cut's spool seq (spool released, dirty bits
//! cleared). The state is therefore never behind the spool release.
//!
//! Resume rule, after a reconnect or a restart: the producer starts at spool seq
//! `state.cut_spool_seq + 1` (the spool's first record without a state), skips records
//! of epochs `<= state.epoch`, and numbers the first frame `state.frame_seq + 1` (1
//! without a state). Frames the master target already holds (`seq <= durable_seq`) are
//! resent identically and skipped by it. A master target whose `durable_seq` is below
//! `state.frame_seq` lost acknowledged data: the group is logged as an error and not
//! shipped any more by this process.
//!
//! A group in bitmap-only mode ships what its spool still holds (the cuts made before
//! the overflow) and nothing after, until the resync driver ([`crate::resync`]) has put
//! the dirty blocks back into the spool; cuts made before that pass ends are sent as
//! inconsistent points.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use datapath::extent::{EpochMap, ExtentData};
use datapath::frame::{
    self, Ack, CUT_PROTOCOL_VERSION, CutDone, DataFrameMeta, Decoder, Encoder, ErrorFrame, Frame,
    FrameHeader, HASH_PROTOCOL_VERSION, Hello, HelloDisk, HelloGroup, PROTOCOL_VERSION, PointKind,
    PointRecord, Role,
};
use datapath::spool::SpoolEntry;
use datapath::storage::{RealFs, Storage};
use datapath::tracker::{DiskSpec, GroupTracker, TrackMode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, error, info, warn};

use crate::bufpool::BufferPool;
use crate::config::TargetConfig;
use crate::hashes::HashBroker;
use crate::metrics::GroupMetrics;
use crate::ship_state::ShipState;
use crate::tls::TlsClient;
use crate::tracking::{Tracking, now_unix_ms};

/// Bytes of frames sent and not yet acknowledged, per connection.
pub const WINDOW_BYTES_MAX: u64 = 64 << 20;
/// Data an epoch's maps may hold before their frames are emitted ahead of the cut.
pub const EPOCH_MAP_BYTES_MAX: u64 = 64 << 20;
/// Plain bytes of one data frame.
pub const FRAME_PLAIN_BYTES_MAX: u64 = 1 << 20;
/// Encoded frames queued between a group's producer and the sender.
pub const FRAME_QUEUE_MAX: usize = 8;
/// First reconnect delay.
pub const BACKOFF_MIN_MS: u64 = 100;
/// Longest reconnect delay.
pub const BACKOFF_MAX_MS: u64 = 5000;
/// How often a producer with nothing new looks at its spool again.
pub const POLL_MS: u64 = 20;
/// Threads encoding the chunks of one epoch.
pub const ENCODE_THREADS: usize = 2;
/// Encoded frames each encoder thread may hold ahead of the one the producer sends next.
pub const ENCODED_AHEAD_MAX: usize = 2;
/// Frame buffers kept for reuse: as many as one producer can have in flight at once
/// (each encoder thread's frame being built and those it holds ahead, the one being
/// handed over, the queue, the one on the socket), so steady shipping allocates none.
pub const FRAME_POOL_BUFFERS_MAX: usize =
    ENCODE_THREADS * (ENCODED_AHEAD_MAX + 1) + 1 + FRAME_QUEUE_MAX + 1;
/// Smallest buffer the frame pool keeps: smaller ones (point frames, the short last
/// frame of an epoch) are cheap to allocate and would only have to grow.
pub const FRAME_POOL_CAPACITY_MIN_BYTES: usize = (FRAME_PLAIN_BYTES_MAX / 4) as usize;
/// Largest buffer the frame pool keeps: a data frame of [`FRAME_PLAIN_BYTES_MAX`] with
/// its extent table fits well below it.
pub const FRAME_POOL_CAPACITY_MAX_BYTES: usize = 2 * FRAME_PLAIN_BYTES_MAX as usize;
/// A master target that sends no hello and acks within this time after the connect,
/// or no ack within this time while frames wait for one, is taken for dead (a peer
/// that vanished without a FIN would otherwise hold the connection for as long as TCP
/// retransmits, or for ever when nothing is sent) and the shipper reconnects.
pub const ACK_TIMEOUT_MS: u64 = 30_000;

// The window must admit the largest frame, or the sender would wait for ever.
const _: () = assert!(WINDOW_BYTES_MAX >= frame::MAX_BODY_BYTES as u64 + 32);
const _: () = assert!(WINDOW_BYTES_MAX <= u32::MAX as u64);
// A full data frame (payload, the most extents a chunk holds, the ids) fits a pooled buffer.
const _: () = assert!(
    frame::HEADER_BYTES
        + frame::DATA_FIXED_BYTES
        + 2 * 65
        + datapath::extent::CHUNK_EXTENTS_MAX * frame::EXTENT_ENTRY_BYTES
        + FRAME_PLAIN_BYTES_MAX as usize
        <= FRAME_POOL_CAPACITY_MAX_BYTES
);

/// One group as the shipper sees it.
struct GroupShip {
    id: String,
    /// In config order (the hello's order).
    disks: Vec<DiskSpec>,
    tracker: Arc<Mutex<GroupTracker>>,
    dir: PathBuf,
    /// The last acknowledged point; mirrors the state file.
    state: Mutex<Option<ShipState>>,
    /// Set when the master target lost acknowledged data: never shipped again.
    stopped: AtomicBool,
    /// Live counters: frames sent, newest acknowledged point, connected.
    metrics: Arc<GroupMetrics>,
}

/// A point frame sent and not yet acknowledged.
#[derive(Clone, Copy, Debug)]
struct PendingPoint {
    state: ShipState,
    /// False for a point cut during a resync.
    consistent: bool,
}

/// An encoded frame on its way to the socket.
struct Out {
    group: usize,
    seq: u64,
    bytes: Vec<u8>,
    point: Option<PendingPoint>,
}

/// Ships every group of a [`Tracking`] to one master target. See the module doc.
pub struct Shipper {
    target: TargetConfig,
    /// Built from `target.tls`; `None`: plain TCP.
    tls: Option<TlsClient>,
    fs: Arc<dyn Storage>,
    groups: Vec<Arc<GroupShip>>,
    /// [`ACK_TIMEOUT_MS`]; shorter in tests.
    ack_timeout: Duration,
    /// Hash requests ride this shipper's connection (protocol 3).
    hashes: Arc<HashBroker>,
    /// Frame buffers: taken by the encoders, given back by the sender once written.
    frames: Arc<BufferPool>,
}

impl Shipper {
    /// The hash requests of this shipper's connection (resync, verify).
    pub fn hashes(&self) -> Arc<HashBroker> {
        self.hashes.clone()
    }

    /// Loads every group's shipping state from `state_dir/<group>`, and the TLS files.
    pub fn new(
        target: TargetConfig,
        tracking: &Tracking,
        state_dir: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let fs: Arc<dyn Storage> = Arc::new(RealFs);
        let mut groups = Vec::new();
        for (id, disks) in tracking.specs() {
            let tracker = tracking
                .group(id)
                .with_context(|| format!("group {id}: no tracker"))?;
            let dir = state_dir.join(id);
            let state = ShipState::load(fs.as_ref(), &dir)
                .with_context(|| format!("group {id}: read the shipping state"))?;
            let metrics = tracking
                .metrics()
                .group(id)
                .with_context(|| format!("group {id}: no metrics"))?
                .clone();
            if let Some(s) = state {
                metrics.acked_point(s.epoch, s.time_unix_ms);
            }
            groups.push(Arc::new(GroupShip {
                id: id.clone(),
                disks: disks.clone(),
                tracker,
                dir,
                state: Mutex::new(state),
                stopped: AtomicBool::new(false),
                metrics,
            }));
        }
        let tls = target.tls.as_ref().map(TlsClient::load).transpose()?;
        Ok(Self {
            target,
            tls,
            fs,
            groups,
            ack_timeout: Duration::from_millis(ACK_TIMEOUT_MS),
            hashes: Arc::new(HashBroker::default()),
            frames: Arc::new(frame_pool()),
        })
    }

    /// Ships for ever, reconnecting after every failure.
    pub async fn run(self: Arc<Self>) {
        let mut backoff_ms = BACKOFF_MIN_MS;
        loop {
            let mut connected = false;
            let r = self.session(&mut connected).await;
            for g in &self.groups {
                g.metrics.set_connected(false);
            }
            if connected {
                backoff_ms = BACKOFF_MIN_MS;
            }
            match r {
                Ok(()) => info!(target = %self.target.address, "disconnected"),
                Err(e) if connected => {
                    warn!(target = %self.target.address, "disconnected: {e:#}")
                }
                Err(e) => debug!(target = %self.target.address, "connect failed: {e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
            backoff_ms = (backoff_ms * 2).min(BACKOFF_MAX_MS);
        }
    }

    /// One connection, from the hello to its end.
    async fn session(&self, connected: &mut bool) -> anyhow::Result<()> {
        let active: Vec<usize> = (0..self.groups.len())
            .filter(|&i| !self.groups[i].stopped.load(Ordering::SeqCst))
            .collect();
        if active.is_empty() {
            // Nothing to ship: stay idle (the stop was logged when it happened).
            std::future::pending::<()>().await;
        }
        let (mut stream, transport) =
            crate::tls::connect(self.target.address, self.tls.as_ref()).await?;
        // Version 1 too: a master target that knows no cut request still takes us.
        let hello = Hello {
            version_min: 1,
            version_max: PROTOCOL_VERSION,
            role: Role::ProcessServer,
            node: self.target.node.clone(),
            groups: active
                .iter()
                .map(|&i| HelloGroup {
                    id: self.groups[i].id.clone(),
                    disks: self.groups[i]
                        .disks
                        .iter()
                        .map(|d| HelloDisk {
                            id: d.id.clone(),
                            size_bytes: d.size_bytes,
                        })
                        .collect(),
                })
                .collect(),
        };
        let mut buf = Vec::new();
        frame::encode_hello(&hello, &mut buf).context("encode the hello")?;
        stream.write_all(&buf).await.context("send the hello")?;
        // TLS holds records it could not send yet until a flush.
        stream.flush().await.context("send the hello")?;
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut dec = Decoder::new();
        let hello_reply = tokio::time::timeout(self.ack_timeout, read_frame(&mut rd, &mut dec))
            .await
            .with_context(|| {
                format!("no hello from the master target in {:?}", self.ack_timeout)
            })?;
        let protocol = match hello_reply? {
            Frame::Hello(h) if h.role == Role::MasterTarget => {
                hello.negotiate(&h).with_context(|| {
                    format!(
                        "no common protocol version: the master target speaks {}..={}, this \
                         process server {}..={}",
                        h.version_min, h.version_max, hello.version_min, hello.version_max
                    )
                })?
            }
            Frame::Hello(_) => bail!("the peer's hello is not a master target's"),
            other => bail!("expected a hello, got {}", frame_name(&other)),
        };
        *connected = true;
        info!(target = %self.target.address, transport, protocol, "connected");
        let mut producing = Vec::new();
        for _ in &active {
            let first_ack = tokio::time::timeout(self.ack_timeout, read_frame(&mut rd, &mut dec))
                .await
                .with_context(|| format!("no resume ack in {:?}", self.ack_timeout))?;
            let ack = match first_ack? {
                Frame::Ack(a) => a,
                other => bail!("expected an ack, got {}", frame_name(&other)),
            };
            let gi = self.group_index(&ack.group)?;
            let g = &self.groups[gi];
            let state = *g.state.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            let acked = state.map_or(0, |s| s.frame_seq);
            if ack.durable_seq < acked {
                error!(
                    group = %g.id,
                    durable_seq = ack.durable_seq,
                    acknowledged_seq = acked,
                    "the master target holds less than it acknowledged (data lost there): shipping of this group stops"
                );
                g.stopped.store(true, Ordering::SeqCst);
                continue;
            }
            info!(group = %g.id, durable_seq = ack.durable_seq, "resumed");
            g.metrics.set_connected(true);
            producing.push((gi, state));
        }

        let (tx, mut rx) = mpsc::channel::<Out>(FRAME_QUEUE_MAX);
        let mut producers = tokio::task::JoinSet::new();
        for (gi, state) in producing {
            let g = self.groups[gi].clone();
            let tx = tx.clone();
            let pool = self.frames.clone();
            producers.spawn_blocking(move || produce(gi, &g, state, &tx, &pool));
        }
        drop(tx);

        let window = Semaphore::new(WINDOW_BYTES_MAX as usize);
        // Per group: frames sent and not acknowledged (seq, bytes), and points among them.
        let inflight: Mutex<HashMap<usize, VecDeque<(u64, u32)>>> = Mutex::default();
        let points: Mutex<HashMap<usize, VecDeque<PendingPoint>>> = Mutex::default();
        // When the oldest unacknowledged frame started waiting: the last ack, or the send
        // that found nothing in flight.
        let waiting_since = Mutex::new(tokio::time::Instant::now());

        // Answers to the master target's cut requests and hash requests, sent between
        // frames.
        let (answer_tx, mut answer_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        /// Fails the session's hash requests however the session ends.
        struct Detach<'a>(&'a HashBroker, Option<u64>);
        impl Drop for Detach<'_> {
            fn drop(&mut self) {
                if let Some(g) = self.1 {
                    self.0.detach(g);
                }
            }
        }
        let _detach = Detach(
            &self.hashes,
            (protocol >= HASH_PROTOCOL_VERSION)
                .then(|| self.hashes.attach(protocol, answer_tx.clone())),
        );
        let sender = async {
            loop {
                let out = tokio::select! {
                    biased;
                    Some(answer) = answer_rx.recv() => {
                        wr.write_all(&answer).await.context("send a control frame")?;
                        wr.flush().await.context("send a control frame")?;
                        continue;
                    }
                    out = rx.recv() => match out {
                        Some(out) => out,
                        None => break,
                    },
                };
                let n = out.bytes.len() as u32;
                window
                    .acquire_many(n)
                    .await
                    .context("window closed")?
                    .forget();
                {
                    let mut q = lock(&inflight)?;
                    if q.values().all(VecDeque::is_empty) {
                        *lock(&waiting_since)? = tokio::time::Instant::now();
                    }
                    q.entry(out.group).or_default().push_back((out.seq, n));
                }
                if let Some(p) = out.point {
                    lock(&points)?.entry(out.group).or_default().push_back(p);
                }
                wr.write_all(&out.bytes).await.context("send a frame")?;
                let plain = frame::encoded_plain_bytes(&out.bytes).unwrap_or(0);
                self.groups[out.group]
                    .metrics
                    .sent_frame(u64::from(n), u64::from(plain));
                // Nothing keeps a frame once it is on the socket: a resend encodes it
                // again from the spool.
                self.frames.give(out.bytes);
                wr.flush().await.context("send a frame")?;
            }
            anyhow::Ok(())
        };
        let reader = async {
            loop {
                let ack = match read_frame(&mut rd, &mut dec).await? {
                    Frame::Ack(a) => a,
                    Frame::HashList(l) if protocol >= HASH_PROTOCOL_VERSION => {
                        self.hashes.deliver(l).map_err(|e| anyhow::anyhow!("{e}"))?;
                        continue;
                    }
                    Frame::CutRequest(c) if protocol >= CUT_PROTOCOL_VERSION => {
                        let answer = self.cut_now(&c.group, &active).await;
                        let mut out = Vec::new();
                        frame::encode_cut_done(&answer, &mut out).context("encode a cut answer")?;
                        answer_tx
                            .send(out)
                            .map_err(|_| anyhow::anyhow!("the sender stopped"))?;
                        continue;
                    }
                    other => bail!("expected an ack, got {}", frame_name(&other)),
                };
                *lock(&waiting_since)? = tokio::time::Instant::now();
                self.on_ack(&ack, &window, &inflight, &points).await?;
            }
        };
        let watchdog = async {
            loop {
                tokio::time::sleep(self.ack_timeout / 4).await;
                let waiting = !lock(&inflight)?.values().all(VecDeque::is_empty);
                let since = *lock(&waiting_since)?;
                if waiting && since.elapsed() >= self.ack_timeout {
                    bail!(
                        "no ack from the master target in {:?} while frames wait for one",
                        self.ack_timeout
                    );
                }
            }
        };
        let producers_done = async {
            while let Some(r) = producers.join_next().await {
                r.context("a producer panicked")??;
            }
            // Every producer ended without error: only when the connection is closing.
            std::future::pending::<()>().await;
            anyhow::Ok(())
        };
        tokio::select! {
            r = sender => r.and_then(|()| bail!("every producer stopped")),
            r = reader => r,
            r = producers_done => r,
            r = watchdog => r,
        }
    }

    /// A master target's cut request (failback `latest`): a crash-consistent cut of
    /// the group now, whose point then ships like every point. The answer names it, or
    /// 0 when none could be cut (not a group of this session, bitmap-only, an error).
    async fn cut_now(&self, group: &str, active: &[usize]) -> CutDone {
        let none = CutDone {
            group: group.to_string(),
            point_id: 0,
            consistent: false,
        };
        let Some(&gi) = active.iter().find(|&&i| self.groups[i].id == group) else {
            warn!(
                group,
                "the master target asked for a cut of a group this connection does not ship"
            );
            return none;
        };
        let tracker = self.groups[gi].tracker.clone();
        let cut = tokio::task::spawn_blocking(move || {
            let mut t = tracker
                .lock()
                .map_err(|_| anyhow::anyhow!("tracking failed earlier"))?;
            t.cut(now_unix_ms(), false).context("cut")
        })
        .await;
        match cut {
            Ok(Ok(Some(p))) => {
                info!(
                    group,
                    point = p.point_id,
                    consistent = p.consistent,
                    "cut at the master target's request (failback to latest)"
                );
                CutDone {
                    group: group.to_string(),
                    point_id: p.point_id,
                    consistent: p.consistent,
                }
            }
            Ok(Ok(None)) => {
                warn!(
                    group,
                    "the master target asked for a cut, but the group tracks by bitmap only (no point until a resync)"
                );
                none
            }
            Ok(Err(e)) => {
                warn!(group, "cut at the master target's request: {e:#}");
                none
            }
            Err(e) => {
                warn!(group, "cut at the master target's request: {e}");
                none
            }
        }
    }

    fn group_index(&self, id: &str) -> anyhow::Result<usize> {
        self.groups
            .iter()
            .position(|g| g.id == id)
            .with_context(|| format!("an ack names group {id:?}, which is not ours"))
    }

    /// Frees the window of the acknowledged frames; for the newest acknowledged point,
    /// writes the shipping state, then releases the spool up to its cut.
    async fn on_ack(
        &self,
        ack: &Ack,
        window: &Semaphore,
        inflight: &Mutex<HashMap<usize, VecDeque<(u64, u32)>>>,
        points: &Mutex<HashMap<usize, VecDeque<PendingPoint>>>,
    ) -> anyhow::Result<()> {
        let gi = self.group_index(&ack.group)?;
        let mut freed = 0usize;
        if let Some(q) = lock(inflight)?.get_mut(&gi) {
            while q.front().is_some_and(|&(s, _)| s <= ack.durable_seq) {
                freed += q.pop_front().map_or(0, |(_, n)| n as usize);
            }
        }
        window.add_permits(freed);
        let mut newest = None;
        if let Some(q) = lock(points)?.get_mut(&gi) {
            while q
                .front()
                .is_some_and(|p| p.state.frame_seq <= ack.durable_seq)
            {
                newest = q.pop_front();
            }
        }
        let Some(p) = newest else {
            return Ok(());
        };
        let g = self.groups[gi].clone();
        let fs = self.fs.clone();
        let st = p.state;
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            // State first, release second: the state is never behind the spool.
            st.store(fs.as_ref(), &g.dir)
                .with_context(|| format!("group {}: write the shipping state", g.id))?;
            *lock(&g.state)? = Some(st);
            lock(&g.tracker)?
                .ack_through(st.cut_spool_seq)
                .with_context(|| format!("group {}: release the spool", g.id))?;
            Ok(())
        })
        .await
        .context("join the ack")??;
        if p.consistent {
            // The RPO counts recovery points only.
            self.groups[gi]
                .metrics
                .acked_point(st.epoch, st.time_unix_ms);
        }
        info!(
            group = %ack.group,
            point = st.epoch,
            frame_seq = st.frame_seq,
            point_time_unix_ms = st.time_unix_ms,
            consistent = p.consistent,
            rpo_ms = now_unix_ms().saturating_sub(st.time_unix_ms),
            "point acknowledged"
        );
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> anyhow::Result<std::sync::MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| anyhow::anyhow!("a shipper thread panicked"))
}

fn frame_name(f: &Frame) -> String {
    match f {
        Frame::Error(e) => format!(
            "an error frame: {} ({}): {}",
            ErrorFrame::code_name(e.code),
            e.code,
            e.message
        ),
        Frame::Data(_) => "a data frame".into(),
        Frame::Point(..) => "a point frame".into(),
        Frame::Hello(_) => "a hello".into(),
        Frame::Ack(_) => "an ack".into(),
        Frame::HashList(_) => "a hash list".into(),
        Frame::CutRequest(_) => "a cut request".into(),
        Frame::CutDone(_) => "a cut answer".into(),
        Frame::HashRequest(_) => "a hash request".into(),
    }
}

/// Reads one whole frame and decodes it; the body length is bounded by the header's
/// check against [`frame::MAX_BODY_BYTES`].
async fn read_frame(rd: &mut (impl AsyncRead + Unpin), dec: &mut Decoder) -> anyhow::Result<Frame> {
    let mut head = [0u8; frame::HEADER_BYTES];
    rd.read_exact(&mut head)
        .await
        .context("read from the master target")?;
    let h = FrameHeader::parse(&head).context("a frame from the master target")?;
    let mut buf = vec![0u8; h.frame_len()];
    buf[..frame::HEADER_BYTES].copy_from_slice(&head);
    rd.read_exact(&mut buf[frame::HEADER_BYTES..])
        .await
        .context("read from the master target")?;
    frame::decode(&buf, dec).context("a frame from the master target")
}

/// The producer of one group for one connection: reads its durable spool records from
/// the resume point and sends their frames until the connection ends (the channel
/// closes) or an error.
fn produce(
    gi: usize,
    g: &GroupShip,
    state: Option<ShipState>,
    tx: &mpsc::Sender<Out>,
    pool: &BufferPool,
) -> anyhow::Result<()> {
    let mut p = Producer {
        gi,
        g,
        tx,
        pool,
        next_seq: state.map_or(1, |s| s.frame_seq + 1),
        maps: g
            .disks
            .iter()
            .map(|d| EpochMap::new(d.size_bytes))
            .collect(),
        map_epoch: None,
        encoders: (0..ENCODE_THREADS)
            .map(|_| Encoder::new(frame::DEFAULT_ZSTD_LEVEL))
            .collect(),
    };
    // Disks in id order for the frames: independent of the config's order.
    let mut order: Vec<usize> = (0..g.disks.len()).collect();
    order.sort_by(|&a, &b| g.disks[a].id.cmp(&g.disks[b].id));
    let skip_epoch = state.map(|s| s.epoch);
    let mut read_seq = match state {
        Some(s) => s.cut_spool_seq + 1,
        None => lock(&g.tracker)?.spool().first_seq(),
    };
    let mut said_bitmap_only = false;
    loop {
        if tx.is_closed() {
            return Ok(());
        }
        let cursor = {
            let t = lock(&g.tracker)?;
            if !said_bitmap_only && let TrackMode::BitmapOnly { reason } = t.mode() {
                warn!(
                    group = %g.id,
                    "bitmap-only tracking ({reason}): shipping what the spool holds, nothing after it until a resync"
                );
                said_bitmap_only = true;
            }
            t.spool().read_from(read_seq)
        };
        let mut any = false;
        for rec in cursor {
            let rec = rec.with_context(|| format!("group {}: read the spool", g.id))?;
            read_seq = rec.seq + 1;
            any = true;
            let epoch = rec.record_ref().epoch();
            if skip_epoch.is_some_and(|s| epoch <= s) {
                continue;
            }
            if p.map_epoch.is_some_and(|e| e != epoch) {
                // An epoch that ended without a cut (it cannot be a point): its data
                // still goes out, labelled with its own epoch.
                if !p.emit_maps(&order)? {
                    return Ok(());
                }
            }
            match rec.entry {
                SpoolEntry::Write {
                    disk, offset, data, ..
                } => {
                    let d = p.disk(&disk)?;
                    p.maps[d]
                        .insert(offset, &data)
                        .with_context(|| format!("group {}: spool seq {}", g.id, rec.seq))?;
                    p.map_epoch = Some(epoch);
                }
                SpoolEntry::Zero {
                    disk, offset, len, ..
                } => {
                    let d = p.disk(&disk)?;
                    p.maps[d]
                        .insert_zero(offset, len)
                        .with_context(|| format!("group {}: spool seq {}", g.id, rec.seq))?;
                    p.map_epoch = Some(epoch);
                }
                SpoolEntry::Cut {
                    epoch,
                    point_id,
                    time_unix_ms,
                    app_consistent,
                    consistent,
                } => {
                    if !p.emit_maps(&order)? {
                        return Ok(());
                    }
                    let point = PointRecord {
                        point_id,
                        epoch,
                        time_unix_ms,
                        kind: if app_consistent {
                            PointKind::App
                        } else {
                            PointKind::Crash
                        },
                        consistent,
                        group: g.id.clone(),
                    };
                    let seq = p.next_seq;
                    let mut bytes = Vec::new();
                    frame::encode_point(&point, seq, &mut bytes);
                    p.next_seq += 1;
                    let pending = PendingPoint {
                        state: ShipState {
                            epoch,
                            frame_seq: seq,
                            cut_spool_seq: rec.seq,
                            time_unix_ms,
                        },
                        consistent,
                    };
                    if !p.send(seq, bytes, Some(pending)) {
                        return Ok(());
                    }
                }
            }
            let held: u64 = p.maps.iter().map(|m| m.data_bytes()).sum();
            if held >= EPOCH_MAP_BYTES_MAX && !p.emit_maps(&order)? {
                return Ok(());
            }
        }
        if !any {
            std::thread::sleep(Duration::from_millis(POLL_MS));
        }
    }
}

struct Producer<'a> {
    gi: usize,
    g: &'a GroupShip,
    tx: &'a mpsc::Sender<Out>,
    /// Where data frames are built; the sender gives the buffers back.
    pool: &'a BufferPool,
    next_seq: u64,
    /// One map per disk, in config order.
    maps: Vec<EpochMap>,
    /// The epoch the maps hold data of.
    map_epoch: Option<u64>,
    encoders: Vec<Encoder>,
}

impl Producer<'_> {
    fn disk(&self, id: &str) -> anyhow::Result<usize> {
        self.g
            .disks
            .iter()
            .position(|d| d.id == id)
            .with_context(|| format!("group {}: the spool names unknown disk {id}", self.g.id))
    }

    /// Sends a frame; false when the connection has ended.
    fn send(&self, seq: u64, bytes: Vec<u8>, point: Option<PendingPoint>) -> bool {
        send_out(self.tx, self.gi, seq, bytes, point)
    }

    /// Encodes the maps (disks in `order`) as data frames with consecutive seqs, sends
    /// them in seq order and empties the maps. Returns false when the connection has
    /// ended.
    ///
    /// The chunks are dealt round-robin to [`ENCODE_THREADS`] threads (chunk `k` to
    /// thread `k % ENCODE_THREADS`), each with its own encoder, building frames in
    /// buffers from the pool; each thread holds at most [`ENCODED_AHEAD_MAX`] frames
    /// ahead, and this thread takes them back in seq order and sends each as soon as it
    /// is its turn. So frames go out while later ones are encoded, and the buffers in
    /// flight stay few enough for the pool to hold them all. A frame's bytes depend only
    /// on its chunk, its seq and the zstd level, not on the thread or the buffer.
    fn emit_maps(&mut self, order: &[usize]) -> anyhow::Result<bool> {
        let Some(epoch) = self.map_epoch.take() else {
            return Ok(true);
        };
        let mut jobs: Vec<(usize, Vec<(u64, ExtentData<'_>)>)> = Vec::new();
        for &d in order {
            for chunk in self.maps[d].chunks(FRAME_PLAIN_BYTES_MAX) {
                jobs.push((d, chunk));
            }
        }
        let first_seq = self.next_seq;
        let count = jobs.len();
        let (gi, g, tx, pool) = (self.gi, self.g, self.tx, self.pool);
        let encoders = &mut self.encoders;
        let threads = encoders.len();
        let sent_all = std::thread::scope(|s| -> anyhow::Result<bool> {
            let jobs = &jobs;
            let lanes: Vec<_> = encoders
                .iter_mut()
                .enumerate()
                .map(|(t, enc)| {
                    let (lane_tx, lane_rx) =
                        std::sync::mpsc::sync_channel::<anyhow::Result<Vec<u8>>>(ENCODED_AHEAD_MAX);
                    let handle = s.spawn(move || {
                        for k in (t..jobs.len()).step_by(threads) {
                            let (d, extents) = &jobs[k];
                            let seq = first_seq + k as u64;
                            let meta = DataFrameMeta {
                                group: g.id.clone(),
                                disk: g.disks[*d].id.clone(),
                                epoch,
                            };
                            let mut bytes = pool.take();
                            let r = enc
                                .encode_data(&meta, seq, extents, &mut bytes)
                                .map(|_| bytes)
                                .with_context(|| format!("group {}: encode frame {seq}", g.id));
                            let failed = r.is_err();
                            // A closed lane: the producer stopped taking frames.
                            if lane_tx.send(r).is_err() || failed {
                                break;
                            }
                        }
                    });
                    (lane_rx, handle)
                })
                .collect();
            let mut result = Ok(true);
            for k in 0..count {
                let seq = first_seq + k as u64;
                match lanes[k % threads].0.recv() {
                    Ok(Ok(bytes)) => {
                        if !send_out(tx, gi, seq, bytes, None) {
                            result = Ok(false);
                            break;
                        }
                    }
                    Ok(Err(e)) => {
                        result = Err(e);
                        break;
                    }
                    Err(_) => {
                        result = Err(anyhow::anyhow!("an encoder thread panicked"));
                        break;
                    }
                }
            }
            // Closing the lanes stops threads still encoding after an early end.
            let mut panicked = false;
            for (lane_rx, handle) in lanes {
                drop(lane_rx);
                panicked |= handle.join().is_err();
            }
            if panicked && result.is_ok() {
                result = Err(anyhow::anyhow!("an encoder thread panicked"));
            }
            result
        })?;
        if !sent_all {
            return Ok(false);
        }
        drop(jobs);
        self.next_seq = first_seq + count as u64;
        for m in &mut self.maps {
            m.clear();
        }
        Ok(true)
    }
}

/// Hands a frame to the sender; false when the connection has ended.
fn send_out(
    tx: &mpsc::Sender<Out>,
    group: usize,
    seq: u64,
    bytes: Vec<u8>,
    point: Option<PendingPoint>,
) -> bool {
    tx.blocking_send(Out {
        group,
        seq,
        bytes,
        point,
    })
    .is_ok()
}

/// The shipper's pool of frame buffers, bounded by the `FRAME_POOL_*` constants.
fn frame_pool() -> BufferPool {
    BufferPool::new(
        FRAME_POOL_BUFFERS_MAX,
        FRAME_POOL_CAPACITY_MIN_BYTES,
        FRAME_POOL_CAPACITY_MAX_BYTES,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use datapath::bitmap::BitmapConfig;
    use datapath::spool::SpoolConfig;
    use datapath::tracker::InitialSync;
    use tokio::net::TcpStream;

    const DISK_BYTES: u64 = 8 << 20;

    fn group(dir: &std::path::Path) -> GroupShip {
        let disks = vec![
            DiskSpec {
                id: "disk1".into(),
                size_bytes: DISK_BYTES,
            },
            DiskSpec {
                id: "disk0".into(),
                size_bytes: DISK_BYTES,
            },
        ];
        let (t, _) = GroupTracker::open(
            Arc::new(RealFs),
            dir,
            &disks,
            SpoolConfig {
                segment_bytes_max: 1 << 20,
                spool_bytes_max: 64 << 20,
            },
            BitmapConfig::default(),
            InitialSync::Skip,
        )
        .unwrap();
        let metrics = GroupMetrics::standalone("g1", &disks);
        GroupShip {
            id: "g1".into(),
            disks,
            tracker: Arc::new(Mutex::new(t)),
            dir: dir.to_path_buf(),
            state: Mutex::new(None),
            stopped: AtomicBool::new(false),
            metrics,
        }
    }

    /// Runs a producer from `state` until it has sent `points` point frames.
    fn frames(g: &Arc<GroupShip>, state: Option<ShipState>, points: usize) -> Vec<Out> {
        frames_with(g, state, points, Arc::new(frame_pool()))
    }

    /// [`frames`] with the given buffer pool.
    fn frames_with(
        g: &Arc<GroupShip>,
        state: Option<ShipState>,
        points: usize,
        pool: Arc<BufferPool>,
    ) -> Vec<Out> {
        let (tx, mut rx) = mpsc::channel(FRAME_QUEUE_MAX);
        let g2 = g.clone();
        let h = std::thread::spawn(move || produce(0, &g2, state, &tx, &pool));
        let mut out = Vec::new();
        let mut seen = 0;
        while seen < points {
            let o = rx.blocking_recv().expect("producer ended early");
            seen += usize::from(o.point.is_some());
            out.push(o);
        }
        drop(rx);
        h.join().unwrap().unwrap();
        out
    }

    /// Proves the frames depend only on the spool records (two producers give the same
    /// bytes), seqs are consecutive from 1, a point ends each epoch, big epochs span
    /// several data frames, and a producer resumed from the first point's state sends
    /// exactly the frames that followed it, with the same seqs.
    #[test]
    fn frames_are_deterministic_and_resume_after_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let g = Arc::new(group(dir.path()));
        {
            let mut t = g.tracker.lock().unwrap();
            let big: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
            for (disk, off, data) in [
                ("disk0", 0u64, &big[..]),
                ("disk1", 4096, &big[..65536]),
                ("disk0", 512, &big[..1024]),
            ] {
                t.before_write(disk, off, data.len() as u64).unwrap();
                t.record_write(disk, off, data).unwrap();
            }
            t.cut(1000, false).unwrap().unwrap();
            t.before_write("disk1", 0, 1 << 20).unwrap();
            t.record_zero("disk1", 0, 1 << 20).unwrap();
            t.before_write("disk0", 1 << 20, 4096).unwrap();
            t.record_write("disk0", 1 << 20, &big[..4096]).unwrap();
            t.cut(2000, true).unwrap().unwrap();
        }
        let a = frames(&g, None, 2);
        let b = frames(&g, None, 2);
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(x.seq, i as u64 + 1);
            assert_eq!(x.bytes, y.bytes, "frame {} differs", x.seq);
            assert_eq!(frame::verify(&x.bytes).unwrap().seq, x.seq);
        }
        let first = a.iter().position(|o| o.point.is_some()).unwrap();
        assert!(first >= 4, "3 MiB of disk0 + disk1 should take 4+ frames");
        let st = a[first].point.unwrap().state;
        assert_eq!(st.frame_seq, first as u64 + 1);
        let last = a.last().unwrap().point.unwrap().state;
        assert_eq!((st.epoch + 1, last.time_unix_ms), (last.epoch, 2000));
        let resumed = frames(&g, Some(st), 1);
        let tail: Vec<_> = a[first + 1..].iter().map(|o| (o.seq, &o.bytes)).collect();
        let got: Vec<_> = resumed.iter().map(|o| (o.seq, &o.bytes)).collect();
        assert_eq!(got, tail);
    }

    /// Proves the frames the encoder threads build in reused pool buffers (holding
    /// stale bytes) are byte for byte those one fresh encoder writes into new buffers
    /// from the same epoch maps, in the same order with the same seqs: pooling and
    /// pipelining change nothing on the wire. Compressible and random data both occur.
    #[test]
    fn pooled_frames_equal_a_plain_encoding() {
        let dir = tempfile::tempdir().unwrap();
        let g = Arc::new(group(dir.path()));
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut data: Vec<u8> = (0..5u32 << 20).map(|i| (i % 251) as u8).collect();
        for b in &mut data[2 << 20..3 << 20] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let writes = [
            ("disk0", 0u64, &data[..5 << 20]),
            ("disk1", 8192, &data[2 << 20..3 << 20]),
            ("disk1", 4 << 20, &data[..4096]),
        ];
        {
            let mut t = g.tracker.lock().unwrap();
            for (disk, off, d) in writes {
                t.before_write(disk, off, d.len() as u64).unwrap();
                t.record_write(disk, off, d).unwrap();
            }
            t.before_write("disk0", 6 << 20, 1 << 20).unwrap();
            t.record_zero("disk0", 6 << 20, 1 << 20).unwrap();
            t.cut(1000, false).unwrap().unwrap();
        }
        let pool = Arc::new(frame_pool());
        for _ in 0..FRAME_POOL_BUFFERS_MAX {
            pool.give(vec![0xee; FRAME_POOL_CAPACITY_MAX_BYTES]);
        }
        let got = frames_with(&g, None, 1, pool.clone());
        assert!(
            pool.len() < FRAME_POOL_BUFFERS_MAX,
            "no pooled buffer was used"
        );
        let epoch = got.last().unwrap().point.unwrap().state.epoch;

        let mut maps = [EpochMap::new(DISK_BYTES), EpochMap::new(DISK_BYTES)];
        for (disk, off, d) in writes {
            maps[usize::from(disk == "disk1")].insert(off, d).unwrap();
        }
        maps[0].insert_zero(6 << 20, 1 << 20).unwrap();
        let mut enc = Encoder::new(frame::DEFAULT_ZSTD_LEVEL);
        let mut want = Vec::new();
        for (disk, map) in ["disk0", "disk1"].iter().zip(&maps) {
            for chunk in map.chunks(FRAME_PLAIN_BYTES_MAX) {
                let meta = DataFrameMeta {
                    group: "g1".into(),
                    disk: disk.to_string(),
                    epoch,
                };
                let mut out = Vec::new();
                enc.encode_data(&meta, want.len() as u64 + 1, &chunk, &mut out)
                    .unwrap();
                want.push(out);
            }
        }
        assert!(want.len() >= 7, "6 MiB of data should take 7+ frames");
        assert_eq!(got.len(), want.len() + 1, "data frames and one point frame");
        for (i, (o, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(o.seq, i as u64 + 1);
            assert!(
                o.bytes == *w,
                "frame {} differs from a plain encoding",
                o.seq
            );
        }
    }

    /// Reads one whole frame from a test peer.
    async fn read_any(rd: &mut TcpStream) -> Vec<u8> {
        let mut head = [0u8; frame::HEADER_BYTES];
        rd.read_exact(&mut head).await.unwrap();
        let h = FrameHeader::parse(&head).unwrap();
        let mut buf = vec![0u8; h.frame_len()];
        buf[..frame::HEADER_BYTES].copy_from_slice(&head);
        rd.read_exact(&mut buf[frame::HEADER_BYTES..])
            .await
            .unwrap();
        buf
    }

    /// Proves a master target that goes silent (no ack while frames wait, no FIN) ends
    /// the session after the ack timeout instead of stalling shipping for ever, and one
    /// that never answers the hello does too.
    #[test]
    fn silent_master_target_ends_the_session() {
        let dir = tempfile::tempdir().unwrap();
        let g = Arc::new(group(dir.path()));
        {
            let mut t = g.tracker.lock().unwrap();
            t.before_write("disk0", 0, 4096).unwrap();
            t.record_write("disk0", 0, &[3; 4096]).unwrap();
            t.cut(1000, false).unwrap().unwrap();
        }
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            for answer_hello in [true, false] {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let shipper = Shipper {
                    target: TargetConfig {
                        address: listener.local_addr().unwrap(),
                        node: "ps1".into(),
                        tls: None,
                    },
                    tls: None,
                    fs: Arc::new(RealFs),
                    groups: vec![g.clone()],
                    ack_timeout: Duration::from_millis(300),
                    hashes: Arc::default(),
                    frames: Arc::new(frame_pool()),
                };
                let peer = tokio::spawn(async move {
                    let (mut s, _) = listener.accept().await.unwrap();
                    read_any(&mut s).await;
                    if answer_hello {
                        let mut out = Vec::new();
                        let hello = Hello {
                            version_min: PROTOCOL_VERSION,
                            version_max: PROTOCOL_VERSION,
                            role: Role::MasterTarget,
                            node: "mt".into(),
                            groups: Vec::new(),
                        };
                        frame::encode_hello(&hello, &mut out).unwrap();
                        let ack = Ack {
                            group: "g1".into(),
                            durable_seq: 0,
                        };
                        s.write_all(&out).await.unwrap();
                        // The encoders replace the buffer's contents.
                        frame::encode_ack(&ack, &mut out).unwrap();
                        s.write_all(&out).await.unwrap();
                    }
                    // Reads what comes and never answers, never closes.
                    let mut sink = vec![0u8; 1 << 16];
                    while s.read(&mut sink).await.is_ok_and(|n| n > 0) {}
                });
                let mut connected = false;
                let r =
                    tokio::time::timeout(Duration::from_secs(10), shipper.session(&mut connected))
                        .await
                        .expect("the session hung on a silent master target");
                assert!(r.is_err());
                assert_eq!(connected, answer_hello);
                peer.abort();
            }
        });
    }
}
