//! The receiver: process servers connect, name their groups, and stream frames that
//! are verified, journaled, synced and acknowledged.
//!
//! # Protocol on one connection
//!
//! A connection is TLS 1.3 with a client certificate (config `[tls]`, see [`crate::tls`])
//! or plain TCP on loopback. Every message is a [`datapath::frame`] frame.
//!
//! 1. The process server sends a Hello (role process server; its groups, each with its
//!    disks' ids and sizes). Nothing else is accepted first: a header of another kind is
//!    refused before its body is read.
//! 2. The master target checks it: over TLS, the hello's `node` must be a name of the
//!    client certificate (its CN or a DNS name); then role, a common protocol version
//!    ([`Hello::negotiate`]), every group configured here, every disk configured in its
//!    group with the same size, and no group already streamed by another connection.
//!    Then it answers with its own Hello (the accepted groups with their configured
//!    disks) followed by one Ack per accepted group, in hello order, carrying the
//!    group's journal `durable_seq`: the resume point.
//! 3. The process server streams Data and Point frames of its groups; a frame's `seq` is
//!    its group's sequence. Each frame is verified fully: crc first ([`frame::verify`]),
//!    then the body: a data frame's group and disk must have been accepted in the hello,
//!    its extents must end within the disk's size, and its blake3 hashes must match
//!    ([`Decoder::decode_data`]); a point frame must decode. A frame whose seq the
//!    journal already holds (a resend after reconnect) is skipped silently once its crc
//!    and extent table passed (it is not decompressed: it will not be written); a seq
//!    beyond the next one is a gap and refused. The ORIGINAL bytes are appended to the group's
//!    journal, never re-encoded.
//! 4. Group commit: the server takes every frame already received, up to
//!    [`BATCH_FRAMES_MAX`] frames or [`BATCH_BYTES_MAX`] bytes or until the socket has
//!    nothing more buffered, appends them, commits each touched journal once (one
//!    fsync), and then sends one Ack per touched group with its new `durable_seq`
//!    (groups whose frames were all duplicates are acked too).
//!
//! 5. Cut requests (protocol 2, see [`crate::failback`]): a failback to `latest` asks the
//!    connection holding its group to send a `CutRequest`; it goes out between batches.
//!    The process server answers with a `CutDone` naming the point it cut, which is
//!    taken out of the frame stream (never journaled) and handed to the failback; the
//!    point itself arrives as a Point frame like any other.
//!
//! 6. Hash requests (protocol 3, see [`crate::hashes`]): a `HashRequest` ends the batch
//!    it arrives in; once the frames before it are committed and acknowledged, it is
//!    answered with a `HashList` (hashes, "no copy", "no point" or "failed"). A request
//!    on a connection that negotiated less, or naming a group or disk the hello did not
//!    bring, blocks past the disk's end or another block size, is refused.
//!
//! A refusal is one Error frame ([`ErrorFrame`] code and a message naming the thing at
//! fault), after which the server stops reading, half-closes, drains what the peer
//! still sends for a short while ([`LINGER_MS`], [`LINGER_BYTES_MAX`]) so that the
//! Error frame is not lost to a TCP reset, and closes. When a frame mid-batch is
//! refused, the good frames before it are still committed and acknowledged first; the
//! refused frame never reaches the journal.
//!
//! | refusal                                             | code                  |
//! |-----------------------------------------------------|-----------------------|
//! | bad header, bad crc, truncated, oversized body_len  | `BAD_FRAME`           |
//! | first frame not a Hello, Hello after the opening    | `BAD_FRAME`           |
//! | frame header version, or no common hello version    | `UNSUPPORTED_VERSION` |
//! | hello node not named by the client certificate (TLS) | `AUTH`              |
//! | group not configured (or not in this hello)         | `UNKNOWN_GROUP`       |
//! | disk not configured in its group (or not in hello)  | `UNKNOWN_DISK`        |
//! | disk size differs from the replica's                | `SIZE_MISMATCH`       |
//! | extent past the end of its disk                     | `OUT_OF_RANGE`        |
//! | seq gap; point id not rising                        | `SEQUENCE`            |
//! | group busy on a connection of another node; too many connections | `BUSY` |
//! | (to the old connection) superseded by a newer one of the same node | `BUSY` |
//! | hash request on a connection below protocol 3, or for blocks other than 64 KiB | `BAD_FRAME` |
//! | hash request for blocks past the end of its disk    | `OUT_OF_RANGE`        |
//! | journal I/O failure | `INTERNAL` |
//! | group failing back, failed back or committed here (see [`crate::failback`]); also to the connection holding it when a failback begins | `NOT_PROTECTED` |
//!
//! # Concurrency and memory
//!
//! One task per connection; journal work (decompress, hash, append, fsync) runs on the
//! blocking pool so other connections keep being served. A group is streamed by at most
//! one connection at a time: the connection takes the group's [`Journal`] out of its
//! slot for its lifetime and puts it back when it ends. A newer connection of the same
//! node (hello `node`) takes a group over from an older one, which may be a half-open
//! leftover of a network failure (see [`claim`]); over TLS the node id is the one the
//! client certificate names, on plain TCP (loopback only) it is taken on trust. A
//! connection holds at most one
//! frame being read (bounded by [`frame::MAX_BODY_BYTES`]) plus one batch, and at most
//! [`CONNECTIONS_MAX`] connections are served at once.
//!
//! # Retention
//!
//! Each group's [`GroupRetention`] folds history older than its window into the
//! replicas (see [`crate::retention`]): the connection that holds the group runs a
//! bounded step between batches, after sending the acks; a background task per group
//! ([`retention_forever`]) runs it while no connection holds the group, taking the
//! journal out of the slot with `folding` set, so that a claim waits for the step
//! instead of reopening the journal. At start, a fold a crash interrupted is finished
//! before the server listens.
//!
//! # Test failover exports
//!
//! An export of a group ([`crate::export`], asked over the control socket) never takes
//! the journal: it registers in the group's slot (`exports`), pins its point in the
//! group's retention pins, takes the frame entries through the point from the copy
//! [`GroupMetrics`] keeps of the journal's index, and reads the journal's segment files
//! and the replicas itself. Under the slot's lock, a failback or commit is refused while
//! the slot lists an export, and an export is refused while the group fails back or
//! failed back. When the server stops it tells every export to end and waits for them
//! ([`EXPORT_END_WAIT_MS`]).
//!
//! # Status and metrics
//!
//! Each group's counters, durable seq, point list, frame entries and holder are published to its
//! [`GroupMetrics`] (see [`crate::metrics`]), which the control socket
//! ([`crate::control`], `data_dir/control.sock`) and the optional `GET /metrics`
//! endpoint read: neither touches a journal a connection holds.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use datapath::failback::{FailbackError, FailbackState, Phase, PointInfo, Progress};
use datapath::frame::{
    self, Ack, CUT_PROTOCOL_VERSION, CutDone, CutRequest, Decoder, ErrorFrame, FrameError,
    FrameKind, HASH_PROTOCOL_VERSION, Hello, HelloDisk, HelloGroup, MAX_HELLO_DISKS,
    MAX_HELLO_GROUPS, PROTOCOL_VERSION, Role,
};
use datapath::journal::{Journal, JournalError};
use datapath::retention::PinGuard;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc};

use crate::config::{Config, GroupConfig};
use crate::control::{self, GroupOps};
use crate::export::{self, ExportHold, LiveExport};
use crate::failback::{self as fb, CommitSummary, PointSpec, Summary};
use crate::hashes::{HashSources, HashStats};
use crate::metrics::{self, ExportMark, FailbackMark, GroupMetrics, Metrics, Peer};
use crate::reader::{FrameReader, ReadError, Step};
use crate::retention::GroupRetention;
use crate::store::{self, GroupLock};
use crate::tls::{self, ClientNames};

/// A batch takes at most this many frames before it is committed.
pub const BATCH_FRAMES_MAX: usize = 64;
/// A batch takes no further frame once it holds this many bytes.
pub const BATCH_BYTES_MAX: usize = 64 << 20;
/// Connections served at once; more are refused.
pub const CONNECTIONS_MAX: usize = 64;
/// Largest hello body the protocol allows (every group and disk at its bound, ids at
/// 64 bytes): the first frame of a connection may not announce more.
pub const HELLO_BODY_BYTES_MAX: u32 =
    (8 + 65 + MAX_HELLO_GROUPS as usize * (2 + 65 + MAX_HELLO_DISKS as usize * (8 + 65))) as u32;
const _: () = assert!(HELLO_BODY_BYTES_MAX <= frame::MAX_BODY_BYTES);
/// A connection that sends no whole Hello within this time is closed.
pub const HELLO_TIMEOUT_MS: u64 = 30_000;
/// A new connection waits at most this long for the old connection of the same node
/// to let go of a group (it lets go between batches).
pub const TAKEOVER_WAIT_MS: u64 = 10_000;
/// After a refusal, what the peer still sends is drained for at most this long ...
pub const LINGER_MS: u64 = 2_000;
/// ... and at most this many bytes, then the socket is closed.
pub const LINGER_BYTES_MAX: u64 = 64 << 20;
/// A stopping server waits at most this long for its exports to end.
pub const EXPORT_END_WAIT_MS: u64 = 5_000;

/// One configured group and its journal, which a connection borrows for its lifetime.
struct GroupSlot {
    cfg: GroupConfig,
    state: Mutex<SlotState>,
    /// What status and metrics see of the group.
    metrics: Arc<GroupMetrics>,
    /// The group's retention fold and its pins.
    retention: Arc<GroupRetention>,
}

struct SlotState {
    /// `None` while a connection or a failback holds it, while the idle retention fold
    /// runs a step (`folding`), after a journal failure (reopened on the next claim), or
    /// once the group's failback is committed (the journal is gone).
    journal: Option<Journal>,
    /// The idle retention fold has the journal for one bounded step; a claim waits.
    folding: bool,
    /// A claim waits for the idle fold: it takes no further step until the claim is in.
    claim_waiting: bool,
    /// The connection that holds the group.
    holder: Option<Holder>,
    /// Whether the group replicates or fails back; every state but `Replicating`
    /// refuses hellos naming the group.
    failback: SlotFailback,
    /// Test failover exports of the group that run now (from their start: a failback
    /// is refused from the moment one registers).
    exports: Vec<SlotExport>,
}

/// One running export of a group, as its slot lists it.
#[derive(Clone, Copy, Debug)]
struct SlotExport {
    /// Numbers exports in this process (also in its overlay directory's name).
    id: u64,
    mark: ExportMark,
}

/// A group's failback as the server sees it.
#[derive(Clone, Copy, Debug)]
enum SlotFailback {
    /// No failback: the group replicates.
    Replicating,
    /// A failback or commit of the group runs now.
    Running,
    /// The failback state on disk: interrupted (applying), failed back, or committed.
    Stopped(FailbackState),
    /// The failback state file could not be read after a failback or commit: nothing
    /// is known, so replication stays refused; the next command reports why.
    Unreadable,
}

/// Who holds a group, and how to ask it to let go.
struct Holder {
    peer: SocketAddr,
    /// The node id from its hello.
    node: String,
    /// Notified when a newer connection of the same node takes the group over, or a
    /// failback stops replication of the group.
    cancel: Arc<Notify>,
    /// Where a failback to `latest` asks the connection to send a cut request; `None`
    /// when the peer speaks no protocol with one (older than [`CUT_PROTOCOL_VERSION`]).
    cut: Option<mpsc::UnboundedSender<CutAsk>>,
}

/// A failback's request for a cut of `group` now, and where the answer goes.
struct CutAsk {
    group: String,
    reply: std::sync::mpsc::Sender<CutDone>,
}

/// What woke a connection between batches.
enum Wake {
    Frame(Result<Option<Vec<u8>>, ReadError>),
    Cancel,
    Cut(CutAsk),
}

/// What every connection shares.
struct Shared {
    cfg: Config,
    groups: HashMap<String, Arc<GroupSlot>>,
    /// Held for the server's lifetime: no other process opens these journals.
    _locks: Vec<GroupLock>,
    metrics: Arc<Metrics>,
    /// Exports started so far (numbers them).
    exports_started: AtomicU64,
    /// Becomes true when the server stops: running exports end.
    stopping: tokio::sync::watch::Sender<bool>,
}

/// Why a connection ended.
enum End {
    /// The peer closed between frames (or the connection failed below the protocol).
    Closed,
    /// We refuse: send this, then close.
    Refuse(ErrorFrame),
}

fn refuse(code: u16, message: impl AsRef<str>) -> End {
    End::Refuse(ErrorFrame::new(code, message.as_ref()))
}

/// Prepares every group (lock, replicas, journal) and serves until SIGINT or SIGTERM.
/// Prints `listening on ADDR` on stdout once the socket accepts connections.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    cfg.check_transport()?;
    let acceptor = match &cfg.tls {
        Some(files) => Some(tokio_rustls::TlsAcceptor::from(tls::server_config(
            files, &cfg.file,
        )?)),
        None => None,
    };
    let metrics = Arc::new(Metrics::new(&cfg));
    let mut locks = Vec::new();
    let mut groups = HashMap::new();
    for g in &cfg.groups {
        locks.push(GroupLock::acquire(&cfg, &g.id)?);
        for d in &g.disks {
            store::prepare_replica(&g.id, d)?;
        }
        let gm = metrics
            .group(&g.id)
            .with_context(|| format!("group {:?}: no metrics", g.id))?
            .clone();
        let retention = Arc::new(GroupRetention::new(g, gm.clone()));
        // Overlays of exports a killed server left: nothing else uses them (the lock
        // is ours).
        export::remove_stale_overlays(&cfg, &g.id);
        let state = fb::load_state(&cfg, &g.id)?;
        log_failback_state(&g.id, state.as_ref());
        // A committed group's journal is gone (or half removed by an interrupted
        // commit, which a rerun of `commit` finishes): it is not opened.
        let journal = if state.is_some_and(|s| s.phase == Phase::Committed) {
            None
        } else {
            let (mut journal, rec) = store::open_journal(&cfg, &g.id)?;
            tracing::info!(
                group = %g.id,
                durable_seq = journal.durable_seq(),
                frames = rec.frames,
                points = rec.points,
                truncated_bytes = rec.truncated_bytes,
                segments_indexed = rec.segments_indexed,
                "journal opened"
            );
            // A fold never runs while a group fails back (the failback takes the
            // journal, and the idle fold skips such a group), so an interrupted fold
            // can only be one of a replicating group.
            if state.is_none() {
                retention.finish_interrupted(&mut journal)?;
            }
            gm.publish(&journal);
            Some(journal)
        };
        gm.set_failback(state.as_ref().map(FailbackMark::from));
        groups.insert(
            g.id.clone(),
            Arc::new(GroupSlot {
                cfg: g.clone(),
                state: Mutex::new(SlotState {
                    journal,
                    folding: false,
                    claim_waiting: false,
                    holder: None,
                    failback: state.map_or(SlotFailback::Replicating, SlotFailback::Stopped),
                    exports: Vec::new(),
                }),
                metrics: gm,
                retention,
            }),
        );
    }
    // The control socket once the locks are held: a second server fails on them first.
    let control_path = control::socket_path(&cfg);
    let control_listener = control::bind(&control_path)?;
    let metrics_listener = match cfg.metrics {
        Some(a) => Some(TcpListener::bind(a).await.with_context(|| {
            format!("config file {}: metrics: listen on {a}", cfg.file.display())
        })?),
        None => None,
    };
    let metrics_addr = match &metrics_listener {
        Some(l) => Some(l.local_addr().context("metrics address")?),
        None => None,
    };
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listen on {}", cfg.listen))?;
    let local = listener.local_addr().context("local address")?;
    // Installed before the server says it listens, so a SIGTERM right after that line
    // stops it cleanly instead of killing it.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install SIGTERM handler")?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("install SIGINT handler")?;
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        groups,
        _locks: locks,
        metrics: metrics.clone(),
        exports_started: AtomicU64::new(0),
        stopping: tokio::sync::watch::Sender::new(false),
    });
    let mut background = tokio::task::JoinSet::new();
    background.spawn(metrics.clone().sample_forever());
    {
        let control = Arc::new(control::Control {
            cfg: cfg.clone(),
            metrics: metrics.clone(),
            metrics_addr,
            groups: shared.clone(),
        });
        background.spawn(async move {
            if let Err(e) = control::serve(control_listener, control).await {
                tracing::error!("control socket: {e:#}");
            }
        });
    }
    if let (Some(l), Some(a)) = (metrics_listener, metrics_addr) {
        let (c, m) = (cfg.clone(), metrics.clone());
        let render: metrics::Render = Arc::new(move || metrics::render(&c, &m));
        background.spawn(metrics::serve_http(l, render));
        tracing::info!("metrics at http://{a}/metrics");
    }
    if acceptor.is_some() {
        tracing::info!(%local, "listening (TLS 1.3, mutual)");
    } else {
        tracing::info!(%local, "listening (plain TCP on loopback)");
    }
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {local}").context("write to stdout")?;
        out.flush().context("flush stdout")?;
    }
    for slot in shared.groups.values() {
        background.spawn(retention_forever(slot.clone()));
    }
    let permits = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors and the like: wait a little instead of spinning.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        };
        let shared = shared.clone();
        let permit = permits.clone().try_acquire_owned();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            match acceptor {
                None => serve_or_busy(shared, stream, peer, permit, None).await,
                // A failed handshake is logged (with the peer) and closes the connection.
                Some(a) => {
                    if let Some((stream, names)) = tls::accept(&a, stream, peer).await {
                        serve_or_busy(shared, stream, peer, permit, Some(names)).await;
                    }
                }
            }
        });
    }
    end_exports(&shared).await;
    background.abort_all();
    let _ = std::fs::remove_file(&control_path);
    tracing::info!("shutting down: every acknowledged frame is already durable");
    Ok(())
}

/// Tells every running export to end and waits (up to [`EXPORT_END_WAIT_MS`]) until
/// they did: their NBD listeners and connections closed, overlays removed, points
/// unpinned, their commands told. Each export session holds a receiver of `stopping`
/// until its last line is sent.
async fn end_exports(shared: &Shared) {
    shared.stopping.send_replace(true);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(EXPORT_END_WAIT_MS);
    loop {
        let running = shared.stopping.receiver_count();
        if running == 0 {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                running,
                "exports did not end within {EXPORT_END_WAIT_MS} ms; stopping anyway"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Serves a connection, or refuses it as busy when there was no permit for it.
async fn serve_or_busy<S: AsyncRead + AsyncWrite + Unpin>(
    shared: Arc<Shared>,
    stream: S,
    peer: SocketAddr,
    permit: Result<OwnedSemaphorePermit, TryAcquireError>,
    client: Option<ClientNames>,
) {
    match permit {
        Ok(_permit) => serve_conn(shared, stream, peer, client.as_ref()).await,
        Err(_) => {
            let e = ErrorFrame::new(
                ErrorFrame::BUSY,
                &format!("too many connections (at most {CONNECTIONS_MAX}); retry later"),
            );
            tracing::warn!(%peer, "{}", e.message);
            send_error_and_close(stream, &e).await;
        }
    }
}

/// Serves one connection; `client` holds the names of its client certificate when it is
/// TLS, `None` on plain TCP.
async fn serve_conn<S: AsyncRead + AsyncWrite + Unpin>(
    shared: Arc<Shared>,
    mut stream: S,
    peer: SocketAddr,
    client: Option<&ClientNames>,
) {
    tracing::debug!(%peer, transport = transport(client), "connection");
    let mut rd = FrameReader::new();
    let end = conn(&shared, &mut stream, peer, client, &mut rd).await;
    match end {
        End::Closed => tracing::info!(%peer, "connection closed"),
        End::Refuse(e) => {
            tracing::warn!(
                %peer,
                code = ErrorFrame::code_name(e.code),
                "refused: {}",
                e.message
            );
            send_error_and_close(stream, &e).await;
        }
    }
}

fn transport(client: Option<&ClientNames>) -> &'static str {
    if client.is_some() { "TLS" } else { "plain TCP" }
}

/// Sends an Error frame, half-closes (over TLS: a close_notify, then the TCP half-close),
/// drains the peer for a bounded while, closes.
async fn send_error_and_close<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, e: &ErrorFrame) {
    let mut out = Vec::new();
    if frame::encode_error(e, &mut out).is_err() {
        return;
    }
    if write_all(&mut stream, &out).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        let mut buf = vec![0u8; 16 << 10];
        let mut total = 0u64;
        while total < LINGER_BYTES_MAX {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n as u64,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(LINGER_MS), drain).await;
}

fn read_refusal(e: ReadError) -> End {
    match e {
        ReadError::Io(e) => {
            tracing::debug!("read: {e}");
            End::Closed
        }
        ReadError::Header(FrameError::UnsupportedVersion(v)) => refuse(
            ErrorFrame::UNSUPPORTED_VERSION,
            format!(
                "frame header version {v} is not supported (this master target reads frame \
                 version {})",
                frame::VERSION
            ),
        ),
        ReadError::UnexpectedKind(k) => refuse(
            ErrorFrame::BAD_FRAME,
            format!("the first frame must be a Hello, got a {k:?} frame"),
        ),
        e => refuse(ErrorFrame::BAD_FRAME, e.to_string()),
    }
}

async fn conn<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Arc<Shared>,
    stream: &mut S,
    peer: SocketAddr,
    client: Option<&ClientNames>,
    rd: &mut FrameReader,
) -> End {
    // 1. The hello, within a deadline; a header of another kind is refused at once.
    rd.only_kind = Some(FrameKind::Hello);
    rd.body_max = HELLO_BODY_BYTES_MAX;
    let first =
        tokio::time::timeout(Duration::from_millis(HELLO_TIMEOUT_MS), rd.next(stream)).await;
    rd.only_kind = None;
    rd.body_max = frame::MAX_BODY_BYTES;
    let raw = match first {
        Err(_) => {
            return refuse(
                ErrorFrame::BAD_FRAME,
                format!("no Hello within {HELLO_TIMEOUT_MS} ms"),
            );
        }
        Ok(Err(e)) => return read_refusal(e),
        Ok(Ok(None)) => return End::Closed,
        Ok(Ok(Some(f))) => f,
    };
    let hello = match frame::decode_hello(&raw) {
        Ok(h) => h,
        Err(e) => return refuse(ErrorFrame::BAD_FRAME, format!("hello: {e}")),
    };
    // Before anything is claimed: over TLS a node may only speak for itself (the node
    // id decides who may take a group over, see `claim`).
    if let Some(names) = client
        && !names.names(&hello.node)
    {
        return refuse(
            ErrorFrame::AUTH,
            format!(
                "hello: node {:?} is not the node of the client certificate, which names {}",
                hello.node, names
            ),
        );
    }
    let cancel = Arc::new(Notify::new());
    let (cut_tx, mut cut_rx) = mpsc::unbounded_channel::<CutAsk>();
    let mut st = match check_hello(shared, &hello, peer, cancel.clone(), cut_tx).await {
        Ok(st) => st,
        Err(end) => return end,
    };
    let _counted = shared.metrics.connection();
    tracing::info!(
        %peer,
        node = %hello.node,
        transport = transport(client),
        groups = ?st.groups.iter().map(|g| (g.id.as_str(), g.durable_seq())).collect::<Vec<_>>(),
        "process server connected"
    );

    // 2. Our hello and the resume points.
    let reply = Hello {
        version_min: 1,
        version_max: PROTOCOL_VERSION,
        role: Role::MasterTarget,
        node: shared.cfg.node.clone(),
        groups: st
            .groups
            .iter()
            .map(|g| HelloGroup {
                id: g.id.clone(),
                disks: g
                    .slot
                    .cfg
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
    let mut out = Vec::new();
    if let Err(e) = frame::encode_hello(&reply, &mut out) {
        return refuse(ErrorFrame::INTERNAL, format!("encode our hello: {e}"));
    }
    let acks: Vec<Ack> = st
        .groups
        .iter()
        .map(|g| Ack {
            group: g.id.clone(),
            durable_seq: g.durable_seq(),
        })
        .collect();
    if let Err(end) = append_acks(&acks, &mut out) {
        return end;
    }
    if let Err(e) = write_all(stream, &out).await {
        tracing::debug!(%peer, "write hello: {e}");
        return End::Closed;
    }

    // 3. Batches of frames until the peer closes or a frame is refused. Cut requests of
    // a failback go out between batches; their answers are taken out of the stream.
    let mut pending_cuts: HashMap<String, std::sync::mpsc::Sender<CutDone>> = HashMap::new();
    loop {
        let wake = tokio::select! {
            r = rd.next(stream) => Wake::Frame(r),
            _ = cancel.notified() => Wake::Cancel,
            Some(ask) = cut_rx.recv() => Wake::Cut(ask),
        };
        let next = match wake {
            Wake::Frame(r) => r,
            Wake::Cancel => {
                // A failback stops replication of its group; otherwise a newer
                // connection of the same node took over.
                let failing_back = st.groups.iter().find_map(|g| {
                    let s = g.slot.state.lock().unwrap_or_else(|e| e.into_inner());
                    not_protected(&g.id, s.failback)
                });
                if let Some(why) = failing_back {
                    return refuse(ErrorFrame::NOT_PROTECTED, why);
                }
                return refuse(
                    ErrorFrame::BUSY,
                    format!(
                        "superseded: a newer connection of node {:?} took over this \
                         connection's groups",
                        hello.node
                    ),
                );
            }
            Wake::Cut(ask) => {
                let mut out = Vec::new();
                let req = CutRequest {
                    group: ask.group.clone(),
                };
                if let Err(e) = frame::encode_cut_request(&req, &mut out) {
                    return refuse(ErrorFrame::INTERNAL, format!("encode a cut request: {e}"));
                }
                if let Err(e) = write_all(stream, &out).await {
                    tracing::debug!(%peer, "write a cut request: {e}");
                    return End::Closed;
                }
                tracing::info!(%peer, group = %ask.group, "asked the process server for a cut (failback to latest)");
                pending_cuts.insert(ask.group, ask.reply);
                continue;
            }
        };
        let first = match next {
            Ok(Some(f)) => f,
            Ok(None) => return End::Closed,
            Err(e) => return read_refusal(e),
        };
        if is_cut_done(&first) {
            if let Err(end) = take_cut_done(&first, &mut pending_cuts) {
                return end;
            }
            continue;
        }
        if is_hash_request(&first) {
            st = match answer_hashes(st, stream, vec![first]).await {
                Ok(st) => st,
                Err(end) => return end,
            };
            continue;
        }
        let mut bytes = first.len();
        let mut batch = vec![first];
        let mut after: Option<End> = None;
        // A hash request ends the batch: it is answered once the frames before it are
        // committed and acknowledged (protocol 3, see `crate::hashes`).
        let mut hash_requests = Vec::new();
        while batch.len() < BATCH_FRAMES_MAX && bytes < BATCH_BYTES_MAX {
            match rd.try_step(stream) {
                Ok(Step::Frame(f)) if is_cut_done(&f) => {
                    if let Err(end) = take_cut_done(&f, &mut pending_cuts) {
                        after = Some(end);
                        break;
                    }
                }
                Ok(Step::Frame(f)) if is_hash_request(&f) => {
                    hash_requests.push(f);
                    break;
                }
                Ok(Step::Frame(f)) => {
                    bytes += f.len();
                    batch.push(f);
                }
                Ok(Step::WouldBlock) => break,
                Ok(Step::Eof) => {
                    after = Some(End::Closed);
                    break;
                }
                Err(e) => {
                    after = Some(read_refusal(e));
                    break;
                }
            }
        }
        let joined = tokio::task::spawn_blocking(move || {
            let outcome = st.process(batch);
            (st, outcome)
        })
        .await;
        let outcome;
        (st, outcome) = match joined {
            Ok(x) => x,
            Err(e) => {
                // The connection state was dropped during the panic, and with it the
                // claims: the slots get `None` back and reopen their journals.
                return refuse(
                    ErrorFrame::INTERNAL,
                    format!("batch processing failed: {e}"),
                );
            }
        };
        let mut out = Vec::new();
        if let Err(end) = append_acks(&outcome.acks, &mut out) {
            return end;
        }
        if !out.is_empty()
            && let Err(e) = write_all(stream, &out).await
        {
            tracing::debug!(%peer, "write acks: {e}");
            return End::Closed;
        }
        if let Some(e) = outcome.error {
            return End::Refuse(e);
        }
        if let Some(end) = after {
            return end;
        }
        if !hash_requests.is_empty() {
            st = match answer_hashes(st, stream, hash_requests).await {
                Ok(st) => st,
                Err(end) => return end,
            };
        }
        // Between batches, after the acks: a bounded retention step when one is due.
        if st.groups.iter().any(|g| g.slot.retention.due()) {
            st = match tokio::task::spawn_blocking(move || {
                st.fold_due();
                st
            })
            .await
            {
                Ok(st) => st,
                Err(e) => {
                    return refuse(ErrorFrame::INTERNAL, format!("retention fold failed: {e}"));
                }
            };
        }
    }
}

/// Whether a frame off the stream is a cut answer (its header kind; the frame is
/// checked by [`take_cut_done`]).
fn is_cut_done(f: &[u8]) -> bool {
    f.get(6) == Some(&(FrameKind::CutDone as u8))
}

/// Whether a frame off the stream is a hash request (its header kind; the frame is
/// checked by [`ConnState::answer_hashes`]).
fn is_hash_request(f: &[u8]) -> bool {
    f.get(6) == Some(&(FrameKind::HashRequest as u8))
}

/// Answers hash requests on the blocking pool and sends the hash lists.
async fn answer_hashes<S: AsyncWrite + Unpin>(
    mut st: ConnState,
    stream: &mut S,
    requests: Vec<Vec<u8>>,
) -> Result<ConnState, End> {
    let joined = tokio::task::spawn_blocking(move || {
        let r = st.answer_hashes(requests);
        (st, r)
    })
    .await;
    let (st, r) =
        joined.map_err(|e| refuse(ErrorFrame::INTERNAL, format!("hash request failed: {e}")))?;
    let out = r.map_err(End::Refuse)?;
    if let Err(e) = write_all(stream, &out).await {
        tracing::debug!("write hash lists: {e}");
        return Err(End::Closed);
    }
    Ok(st)
}

/// Hands a cut answer to the failback waiting for it (one that gave up is gone: the
/// answer is dropped); a bad one is refused.
fn take_cut_done(
    f: &[u8],
    pending: &mut HashMap<String, std::sync::mpsc::Sender<CutDone>>,
) -> Result<(), End> {
    let d = frame::decode_cut_done(f)
        .map_err(|e| refuse(ErrorFrame::BAD_FRAME, format!("cut answer: {e}")))?;
    tracing::info!(group = %d.group, point = d.point_id, consistent = d.consistent, "the process server cut a point on request");
    if let Some(tx) = pending.remove(&d.group) {
        let _ = tx.send(d);
    }
    Ok(())
}

/// Writes `buf` and flushes it: TLS keeps records it could not send yet in its own
/// buffer until the next write or flush, and the peer waits for these bytes.
async fn write_all<S: AsyncWrite + Unpin>(stream: &mut S, buf: &[u8]) -> std::io::Result<()> {
    stream.write_all(buf).await?;
    stream.flush().await
}

fn append_acks(acks: &[Ack], out: &mut Vec<u8>) -> Result<(), End> {
    let mut one = Vec::new();
    for a in acks {
        frame::encode_ack(a, &mut one)
            .map_err(|e| refuse(ErrorFrame::INTERNAL, format!("encode ack: {e}")))?;
        out.extend_from_slice(&one);
    }
    Ok(())
}

/// Checks the peer's hello against the config and claims its groups (all or none).
async fn check_hello(
    shared: &Arc<Shared>,
    hello: &Hello,
    peer: SocketAddr,
    cancel: Arc<Notify>,
    cut: mpsc::UnboundedSender<CutAsk>,
) -> Result<ConnState, End> {
    if hello.role != Role::ProcessServer {
        return Err(refuse(
            ErrorFrame::BAD_FRAME,
            format!(
                "hello: role is {:?}, a master target only talks to a process server",
                hello.role
            ),
        ));
    }
    let ours = Hello {
        version_min: 1,
        version_max: PROTOCOL_VERSION,
        role: Role::MasterTarget,
        node: shared.cfg.node.clone(),
        groups: Vec::new(),
    };
    let Some(protocol) = ours.negotiate(hello) else {
        return Err(refuse(
            ErrorFrame::UNSUPPORTED_VERSION,
            format!(
                "hello: process server {:?} speaks protocol versions {}..={}, this master target \
                 {}..={}",
                hello.node,
                hello.version_min,
                hello.version_max,
                ours.version_min,
                ours.version_max
            ),
        ));
    };
    let cut = (protocol >= CUT_PROTOCOL_VERSION).then_some(cut);
    let mut wanted = Vec::with_capacity(hello.groups.len());
    for g in &hello.groups {
        let Some(slot) = shared.groups.get(&g.id) else {
            return Err(refuse(
                ErrorFrame::UNKNOWN_GROUP,
                format!(
                    "hello: group {:?} is not configured on this master target",
                    g.id
                ),
            ));
        };
        let mut disks = HashMap::with_capacity(g.disks.len());
        for d in &g.disks {
            let Some(dc) = slot.cfg.disk(&d.id) else {
                return Err(refuse(
                    ErrorFrame::UNKNOWN_DISK,
                    format!(
                        "hello: disk {:?} is not configured in group {:?}",
                        d.id, g.id
                    ),
                ));
            };
            if dc.size_bytes != d.size_bytes {
                return Err(refuse(
                    ErrorFrame::SIZE_MISMATCH,
                    format!(
                        "hello: disk {:?} of group {:?} is {} bytes at the process server, the \
                         replica here is {} bytes",
                        d.id, g.id, d.size_bytes, dc.size_bytes
                    ),
                ));
            }
            disks.insert(d.id.clone(), d.size_bytes);
        }
        wanted.push((slot.clone(), disks));
    }
    let shared = shared.clone();
    let node = hello.node.clone();
    tokio::task::spawn_blocking(move || claim(&shared, wanted, peer, &node, cancel, cut))
        .await
        .unwrap_or_else(|e| Err(refuse(ErrorFrame::INTERNAL, format!("claim groups: {e}"))))
        .map(|mut st| {
            st.protocol = protocol;
            st
        })
}

/// Takes the journals of the wanted groups out of their slots (reopening one that
/// failed earlier); all or none.
///
/// A group held by another connection of the same node is taken over: a process server
/// that reconnects after a network failure may find its old connection still open here
/// (half-open TCP, no keepalive), and must not be locked out by it. The old connection
/// is told to end, lets go between batches (so every frame it appended is committed and
/// counted in the durable seq this connection is told), and this claim waits for that
/// up to [`TAKEOVER_WAIT_MS`]. A group held by another node is refused as busy.
fn claim(
    shared: &Shared,
    wanted: Vec<(Arc<GroupSlot>, HashMap<String, u64>)>,
    peer: SocketAddr,
    node: &str,
    cancel: Arc<Notify>,
    cut: Option<mpsc::UnboundedSender<CutAsk>>,
) -> Result<ConnState, End> {
    let mut st = ConnState {
        groups: Vec::with_capacity(wanted.len()),
        decoder: Decoder::new(),
        // Set by `check_hello`, which negotiated it.
        protocol: 1,
        hashes: HashSources::default(),
    };
    for (slot, disks) in wanted {
        let deadline = std::time::Instant::now() + Duration::from_millis(TAKEOVER_WAIT_MS);
        let journal = loop {
            let mut s = slot.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(why) = not_protected(&slot.cfg.id, s.failback) {
                return Err(refuse(ErrorFrame::NOT_PROTECTED, why));
            }
            match &s.holder {
                // The idle retention fold has the journal for one bounded step.
                None if s.folding => s.claim_waiting = true,
                None => {
                    s.claim_waiting = false;
                    s.holder = Some(Holder {
                        peer,
                        node: node.to_string(),
                        cancel: cancel.clone(),
                        cut: cut.clone(),
                    });
                    slot.metrics.set_peer(Some(Peer {
                        node: node.to_string(),
                        address: peer,
                    }));
                    break s.journal.take();
                }
                Some(h) if h.node == node && std::time::Instant::now() < deadline => {
                    tracing::info!(group = %slot.cfg.id, old = %h.peer, new = %peer, node, "taking the group over from an older connection of the same node");
                    h.cancel.notify_one();
                }
                Some(h) => {
                    return Err(refuse(
                        ErrorFrame::BUSY,
                        format!(
                            "group {:?} is busy: another connection ({}, node {:?}) is \
                             streaming it; retry once it has closed",
                            slot.cfg.id, h.peer, h.node
                        ),
                    ));
                }
            }
            drop(s);
            std::thread::sleep(Duration::from_millis(10));
        };
        // From here the group is ours; `ClaimedGroup`'s drop gives it back, even on error.
        let mut cg = ClaimedGroup {
            id: slot.cfg.id.clone(),
            slot,
            disks,
            journal,
        };
        if cg.journal.is_none() {
            match store::open_journal(&shared.cfg, &cg.id) {
                Ok((j, rec)) => {
                    tracing::info!(group = %cg.id, durable_seq = j.durable_seq(), truncated_bytes = rec.truncated_bytes, "journal reopened");
                    cg.slot.metrics.publish(&j);
                    cg.journal = Some(j);
                }
                Err(e) => {
                    return Err(refuse(
                        ErrorFrame::INTERNAL,
                        format!("group {:?}: {e:#}", cg.id),
                    ));
                }
            }
        }
        st.groups.push(cg);
    }
    Ok(st)
}

/// A group a connection holds.
struct ClaimedGroup {
    id: String,
    slot: Arc<GroupSlot>,
    /// Disks named in the hello (size checked against the config).
    disks: HashMap<String, u64>,
    /// `None` after a journal failure: the slot reopens it on the next claim.
    journal: Option<Journal>,
}

impl ClaimedGroup {
    fn durable_seq(&self) -> u64 {
        self.journal.as_ref().map_or(0, |j| j.durable_seq())
    }
}

impl Drop for ClaimedGroup {
    fn drop(&mut self) {
        let mut s = self.slot.state.lock().unwrap_or_else(|e| e.into_inner());
        // A journal dropped during a panic may be mid-change: it is reopened instead.
        let journal = self.journal.take();
        s.journal = if std::thread::panicking() {
            None
        } else {
            journal
        };
        s.holder = None;
        self.slot.metrics.set_peer(None);
    }
}

/// The state of one connection past its hello; moved to the blocking pool per batch.
struct ConnState {
    groups: Vec<ClaimedGroup>,
    decoder: Decoder,
    /// The protocol version the hellos agreed on.
    protocol: u16,
    /// Views for hash requests (protocol 3).
    hashes: HashSources,
}

/// What one batch produced.
struct Outcome {
    acks: Vec<Ack>,
    /// The refusal of a frame in the batch; frames after it were not looked at.
    error: Option<ErrorFrame>,
}

impl ConnState {
    /// Runs a retention step on each held group whose fold is due.
    fn fold_due(&mut self) {
        for g in &mut self.groups {
            if let Some(j) = g.journal.as_mut()
                && g.slot.retention.due()
            {
                g.slot.retention.step(j);
                // The replica may have moved past what a hash view stands for.
                self.hashes.invalidate();
            }
        }
    }

    /// Answers hash requests in order: the encoded hash lists, or the refusal of a
    /// request that names what this connection did not accept (see `crate::hashes`).
    fn answer_hashes(&mut self, requests: Vec<Vec<u8>>) -> Result<Vec<u8>, ErrorFrame> {
        if self.protocol < HASH_PROTOCOL_VERSION {
            return Err(ErrorFrame::new(
                ErrorFrame::BAD_FRAME,
                &format!(
                    "a hash request needs protocol {HASH_PROTOCOL_VERSION}; this connection \
                     negotiated {}",
                    self.protocol
                ),
            ));
        }
        let mut out = Vec::new();
        let mut one = Vec::new();
        let mut stats = HashStats::default();
        for f in requests {
            let req = frame::decode_hash_request(&f).map_err(|e| {
                ErrorFrame::new(ErrorFrame::BAD_FRAME, &format!("hash request: {e}"))
            })?;
            let i = self.group_index(&req.group, "hash request", 0)?;
            let g = &self.groups[i];
            if !g.disks.contains_key(&req.disk) {
                return Err(ErrorFrame::new(
                    ErrorFrame::UNKNOWN_DISK,
                    &format!(
                        "hash request: disk {:?} of group {:?} was not accepted in this \
                         connection's hello",
                        req.disk, g.id
                    ),
                ));
            }
            let Some(j) = g.journal.as_ref() else {
                return Err(ErrorFrame::new(
                    ErrorFrame::INTERNAL,
                    &format!(
                        "group {:?}: journal unavailable after an earlier failure",
                        g.id
                    ),
                ));
            };
            let answer = self.hashes.answer(&g.slot.cfg, j, &req, &mut stats)?;
            frame::encode_hash_list(&answer, &mut one).map_err(|e| {
                ErrorFrame::new(ErrorFrame::INTERNAL, &format!("encode a hash list: {e}"))
            })?;
            out.extend_from_slice(&one);
            tracing::debug!(
                group = %req.group,
                disk = %req.disk,
                first_block = req.first_block,
                count = req.count,
                of = ?req.of,
                status = ?answer.status,
                point = answer.point_id,
                "hash request answered"
            );
        }
        if stats.bytes > 0 {
            tracing::debug!(
                bytes = stats.bytes,
                mb_per_s = stats.bytes as f64 / 1e6 / stats.seconds.max(1e-9),
                "hashed"
            );
        }
        Ok(out)
    }

    /// Appends the batch's frames in order until one is refused, commits every touched
    /// journal once, and returns the acks.
    fn process(&mut self, batch: Vec<Vec<u8>>) -> Outcome {
        let mut touched = vec![false; self.groups.len()];
        // Per group: frames and bytes appended, counted as journaled once committed.
        let mut appended = vec![(0u64, 0u64); self.groups.len()];
        let mut error = None;
        for f in &batch {
            match self.accept(f) {
                Ok((i, new)) => {
                    touched[i] = true;
                    self.groups[i].slot.metrics.received(f.len() as u64);
                    if new {
                        appended[i].0 += 1;
                        appended[i].1 += f.len() as u64;
                    }
                }
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        drop(batch);
        let mut acks = Vec::new();
        for (i, g) in self.groups.iter_mut().enumerate() {
            if !touched[i] {
                continue;
            }
            let Some(j) = g.journal.as_mut() else {
                continue;
            };
            match j.commit() {
                Ok(durable_seq) => {
                    if let Some(e) = j.take_index_error() {
                        tracing::warn!(group = %g.id, "journal segment index: {e} (the journal works without it; the next open rebuilds it)");
                    }
                    g.slot.metrics.journaled(appended[i].0, appended[i].1);
                    g.slot.metrics.publish(j);
                    acks.push(Ack {
                        group: g.id.clone(),
                        durable_seq,
                    })
                }
                Err(e) => {
                    tracing::error!(group = %g.id, "journal commit failed: {e}");
                    g.journal = None;
                    error.get_or_insert_with(|| {
                        ErrorFrame::new(
                            ErrorFrame::INTERNAL,
                            &format!("group {:?}: journal commit failed: {e}", g.id),
                        )
                    });
                }
            }
        }
        Outcome { acks, error }
    }

    fn group_index(&self, group: &str, what: &str, seq: u64) -> Result<usize, ErrorFrame> {
        self.groups
            .iter()
            .position(|g| g.id == group)
            .ok_or_else(|| {
                ErrorFrame::new(
                    ErrorFrame::UNKNOWN_GROUP,
                    &format!(
                        "{what} frame seq {seq}: group {group:?} was not accepted in this \
                     connection's hello"
                    ),
                )
            })
    }

    /// Verifies one frame and appends it to its group's journal, or skips it as a
    /// duplicate. Returns the index of its group and whether it was appended.
    fn accept(&mut self, f: &[u8]) -> Result<(usize, bool), ErrorFrame> {
        let bad = |what: String| ErrorFrame::new(ErrorFrame::BAD_FRAME, &what);
        // The crc first: nothing in the body is looked at before it matches.
        let h = frame::verify(f).map_err(|e| bad(e.to_string()))?;
        let i = match h.kind {
            FrameKind::Data => {
                // The table first (cheap), so that group, disk and range are refused by
                // name before any decompression.
                let info = frame::peek_data(f)
                    .map_err(|e| bad(format!("data frame seq {}: {e}", h.seq)))?;
                let i = self.group_index(&info.meta.group, "data", h.seq)?;
                let g = &self.groups[i];
                let Some(&size) = g.disks.get(&info.meta.disk) else {
                    return Err(ErrorFrame::new(
                        ErrorFrame::UNKNOWN_DISK,
                        &format!(
                            "data frame seq {}: disk {:?} of group {:?} was not accepted in \
                             this connection's hello",
                            h.seq, info.meta.disk, g.id
                        ),
                    ));
                };
                if let Some(e) = info.entries.iter().find(|e| e.end() > size) {
                    return Err(ErrorFrame::new(
                        ErrorFrame::OUT_OF_RANGE,
                        &format!(
                            "data frame seq {}: extent at byte {} of {} bytes ends past the end \
                             of disk {:?} ({size} bytes)",
                            h.seq, e.offset, e.len, info.meta.disk
                        ),
                    ));
                }
                if self.is_duplicate(i, h.seq)? {
                    return Ok((i, false));
                }
                let plain = self
                    .decoder
                    .decode_data(f)
                    .map_err(|e| bad(format!("data frame seq {}: {e}", h.seq)))?;
                self.decoder.recycle(plain);
                i
            }
            FrameKind::Point => {
                let (_, p) = frame::decode_point(f)
                    .map_err(|e| bad(format!("point frame seq {}: {e}", h.seq)))?;
                let i = self.group_index(&p.group, "point", h.seq)?;
                if self.is_duplicate(i, h.seq)? {
                    return Ok((i, false));
                }
                i
            }
            k => {
                return Err(bad(format!(
                    "a {k:?} frame is not accepted after the hello (only Data and Point)"
                )));
            }
        };
        let g = &mut self.groups[i];
        let Some(j) = g.journal.as_mut() else {
            return Err(ErrorFrame::new(
                ErrorFrame::INTERNAL,
                &format!(
                    "group {:?}: journal unavailable after an earlier failure",
                    g.id
                ),
            ));
        };
        match j.append(f) {
            Ok(_) => Ok((i, true)),
            Err(e) => {
                let code = match &e {
                    JournalError::Frame(_)
                    | JournalError::PointGroup { .. }
                    | JournalError::WrongKind(_) => ErrorFrame::BAD_FRAME,
                    JournalError::PointIdNotRising { .. }
                    | JournalError::Gap { .. }
                    | JournalError::Duplicate { .. } => ErrorFrame::SEQUENCE,
                    _ => {
                        tracing::error!(group = %g.id, "journal append failed: {e}");
                        g.journal = None;
                        ErrorFrame::INTERNAL
                    }
                };
                Err(ErrorFrame::new(
                    code,
                    &format!("group {:?}: frame seq {}: {e}", g.id, h.seq),
                ))
            }
        }
    }

    /// Whether the group's journal already holds `seq` (a resend: skip it); a seq past
    /// the next one is a gap.
    fn is_duplicate(&self, i: usize, seq: u64) -> Result<bool, ErrorFrame> {
        let g = &self.groups[i];
        let Some(j) = g.journal.as_ref() else {
            return Err(ErrorFrame::new(
                ErrorFrame::INTERNAL,
                &format!(
                    "group {:?}: journal unavailable after an earlier failure",
                    g.id
                ),
            ));
        };
        if seq == 0 {
            return Err(ErrorFrame::new(
                ErrorFrame::SEQUENCE,
                &format!("group {:?}: frame seq 0; sequences start at 1", g.id),
            ));
        }
        if seq > j.next_seq() {
            return Err(ErrorFrame::new(
                ErrorFrame::SEQUENCE,
                &format!(
                    "group {:?}: frame seq {seq} leaves a gap: the next seq is {}",
                    g.id,
                    j.next_seq()
                ),
            ));
        }
        Ok(seq < j.next_seq())
    }
}

/// The idle retention fold of one group: every check interval, while no connection
/// holds the group, bounded steps until the fold has no backlog.
async fn retention_forever(slot: Arc<GroupSlot>) {
    let mut tick = tokio::time::interval(slot.retention.check_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let s = slot.clone();
        let _ = tokio::task::spawn_blocking(move || fold_idle(&s)).await;
    }
}

/// Takes the journal out of an unheld slot (marked `folding`) for one step at a time,
/// giving it back between steps and stopping as soon as a claim waits, so that a
/// process server gets its group back within one step however large the backlog.
fn fold_idle(slot: &GroupSlot) {
    /// Gives the journal back and clears `folding`, also on a panic (then `None`: the
    /// next claim reopens the journal).
    struct Back<'a> {
        slot: &'a GroupSlot,
        journal: Option<Journal>,
    }
    impl Drop for Back<'_> {
        fn drop(&mut self) {
            let mut s = self.slot.state.lock().unwrap_or_else(|e| e.into_inner());
            let journal = self.journal.take();
            s.journal = if std::thread::panicking() {
                None
            } else {
                journal
            };
            s.folding = false;
        }
    }
    loop {
        let journal = {
            let mut s = slot.state.lock().unwrap_or_else(|e| e.into_inner());
            // A failing-back or failed-back group is never folded: its replicas are
            // not at the journal's base any more.
            if s.holder.is_some()
                || s.folding
                || s.claim_waiting
                || !matches!(s.failback, SlotFailback::Replicating)
            {
                return;
            }
            let Some(j) = s.journal.take() else {
                return;
            };
            s.folding = true;
            j
        };
        let mut back = Back {
            slot,
            journal: Some(journal),
        };
        let more = match back.journal.as_mut() {
            Some(j) => slot.retention.step(j),
            None => false,
        };
        drop(back);
        if !more {
            return;
        }
    }
}

/// Why a hello naming `group` is refused while it fails back; `None` while it
/// replicates.
fn not_protected(group: &str, f: SlotFailback) -> Option<String> {
    match f {
        SlotFailback::Replicating => None,
        SlotFailback::Running => Some(format!(
            "group {group:?} is failing back at the master target: replication of it stops, \
             and it is not protected until it is reprotected"
        )),
        SlotFailback::Unreadable => Some(format!(
            "group {group:?}: the master target cannot read its failback state (see its \
             log): it is not protected; replication is refused"
        )),
        SlotFailback::Stopped(s) => Some(match s.phase {
            Phase::Applying => format!(
                "group {group:?} is failing back at the master target (to point {}, \
                 interrupted): it is not protected; replication is refused until it is \
                 reprotected",
                s.point.id
            ),
            Phase::Applied => format!(
                "group {group:?} is failed back at the master target (point {}, not \
                 committed): it is not protected; replication is refused until it is \
                 reprotected",
                s.point.id
            ),
            Phase::Committed => format!(
                "group {group:?} was failed back at the master target (point {}, \
                 committed): it is not protected; replication is refused until it is \
                 reprotected",
                s.point.id
            ),
        }),
    }
}

/// Says at start what a group's failback state means: the server finishes nothing by
/// itself.
fn log_failback_state(group: &str, s: Option<&FailbackState>) {
    let Some(s) = s else { return };
    match s.phase {
        Phase::Applying => tracing::warn!(
            group,
            point = s.point.id,
            applied_seq = s.applied_seq,
            "a failback was interrupted: the group is not replicated; run `master-target \
             failback --group {group} --point {}` again (or name another point) to finish it",
            s.point.id
        ),
        Phase::Applied => tracing::info!(
            group,
            point = s.point.id,
            "failed back, not committed: the group is not replicated; run `master-target \
             commit --group {group}` or change the point with `failback --point OTHER`"
        ),
        Phase::Committed => tracing::info!(
            group,
            point = s.point.id,
            "failed back and committed: not protected, replication refused until reprotect \
             (a `commit` rerun removes what an interrupted commit left)"
        ),
    }
}

/// Puts a group's failback state back from the files when a failback or commit ends
/// (however it ends): what is on disk decides whether the group replicates again.
struct Settle<'a> {
    cfg: &'a Config,
    slot: &'a GroupSlot,
}

impl Drop for Settle<'_> {
    fn drop(&mut self) {
        let loaded = fb::load_state(self.cfg, &self.slot.cfg.id);
        let mut s = self.slot.state.lock().unwrap_or_else(|e| e.into_inner());
        s.failback = match &loaded {
            Ok(None) => SlotFailback::Replicating,
            Ok(Some(st)) => SlotFailback::Stopped(*st),
            Err(e) => {
                tracing::error!(group = %self.slot.cfg.id, "{e:#}");
                SlotFailback::Unreadable
            }
        };
        self.slot
            .metrics
            .set_failback(loaded.ok().flatten().as_ref().map(FailbackMark::from));
    }
}

impl Shared {
    fn slot(&self, group: &str) -> anyhow::Result<&Arc<GroupSlot>> {
        self.groups.get(group).with_context(|| {
            format!(
                "group {group:?} is not configured on this master target (config file {})",
                self.cfg.file.display()
            )
        })
    }

    /// Marks the group's failback as running; refuses a second one and a committed
    /// group. Returns what it was.
    fn begin(&self, slot: &GroupSlot, what: &str) -> anyhow::Result<SlotFailback> {
        let mut s = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        if let SlotFailback::Running = s.failback {
            anyhow::bail!(
                "{what} of group {:?} refused: a failback or commit of it is running; wait \
                 for it to end",
                slot.cfg.id
            );
        }
        // The failback rewrites the replicas that an export's view reads.
        if !s.exports.is_empty() {
            let list: Vec<String> = s
                .exports
                .iter()
                .map(|e| match (e.mark.point_id, e.mark.listen) {
                    (_, Some(a)) => format!("point {} on {a}", e.mark.point_id),
                    (0, None) => "one starting".to_string(),
                    (p, None) => format!("point {p}, starting"),
                })
                .collect();
            anyhow::bail!(
                "{what} of group {:?} refused: a test failover export of it runs ({}); end \
                 the export first (the failback would rewrite the replicas it reads)",
                slot.cfg.id,
                list.join(", ")
            );
        }
        Ok(std::mem::replace(&mut s.failback, SlotFailback::Running))
    }

    /// Stops replication of the group: the connection that holds it is told to let go
    /// (it does between batches, so every frame it appended is committed), and the
    /// journal is taken out of the slot (reopened if an earlier failure dropped it).
    fn take_journal(&self, slot: &GroupSlot) -> anyhow::Result<Journal> {
        let deadline = std::time::Instant::now() + Duration::from_millis(TAKEOVER_WAIT_MS);
        loop {
            {
                let mut s = slot.state.lock().unwrap_or_else(|e| e.into_inner());
                match &s.holder {
                    // The idle fold has the journal for one step: it stops after it.
                    None if s.folding => s.claim_waiting = true,
                    None => {
                        s.claim_waiting = false;
                        if let Some(j) = s.journal.take() {
                            return Ok(j);
                        }
                        drop(s);
                        let (j, _) = store::open_journal(&self.cfg, &slot.cfg.id)?;
                        slot.metrics.publish(&j);
                        return Ok(j);
                    }
                    Some(h) if std::time::Instant::now() < deadline => h.cancel.notify_one(),
                    Some(h) => anyhow::bail!(
                        "group {:?}: the connection of {} (node {:?}) did not let go of it \
                         within {TAKEOVER_WAIT_MS} ms",
                        slot.cfg.id,
                        h.peer,
                        h.node
                    ),
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl GroupOps for Shared {
    fn failback(
        &self,
        group: &str,
        spec: PointSpec,
        progress: &mut dyn FnMut(&Progress),
    ) -> anyhow::Result<Summary> {
        let slot = self.slot(group)?;
        let before = self.begin(slot, "failback")?;
        let _settle = Settle {
            cfg: &self.cfg,
            slot,
        };
        if let SlotFailback::Stopped(s) = before
            && s.phase == Phase::Committed
        {
            return Err(FailbackError::Committed {
                group: group.to_string(),
                point: s.point.id,
            }
            .into());
        }
        // Checked on the published point list before replication stops, so that a
        // point that does not exist costs the process server nothing.
        if spec != PointSpec::Latest {
            let infos: Vec<PointInfo> = slot
                .metrics
                .points()
                .iter()
                .map(|p| PointInfo {
                    id: p.id,
                    time_unix_ms: p.time_unix_ms,
                    kind: p.kind,
                    consistent: p.consistent,
                })
                .collect();
            if let Err(e) = datapath::failback::choose(group, &infos, spec.choice()) {
                return Err(fb::explain(e, spec));
            }
        }
        let (resolved, note) = match spec {
            PointSpec::Latest => self.cut_for_latest(slot),
            _ => (None, None),
        };
        slot.metrics.set_failback(Some(FailbackMark {
            phase: Phase::Applying,
            point_id: resolved.unwrap_or(0),
            point_time_unix_ms: 0,
        }));
        let journal = self.take_journal(slot)?;
        tracing::info!(group, point = %spec, "failback: replication of the group stopped");
        let r = fb::apply(
            &self.cfg, &slot.cfg, &journal, spec, resolved, note, progress,
        );
        {
            let mut s = slot.state.lock().unwrap_or_else(|e| e.into_inner());
            s.journal = Some(journal);
        }
        match &r {
            Ok(sum) => tracing::info!(
                group,
                point = sum.point_id,
                bytes_applied = sum.bytes_applied,
                seconds = sum.seconds,
                already = sum.already,
                "failed back, not committed"
            ),
            Err(e) => tracing::error!(group, "failback: {e:#}"),
        }
        r
    }

    fn commit(&self, group: &str) -> anyhow::Result<CommitSummary> {
        let slot = self.slot(group)?;
        self.begin(slot, "commit")?;
        let _settle = Settle {
            cfg: &self.cfg,
            slot,
        };
        // Refusals (nothing to commit, an unfinished failback) before the journal is
        // touched.
        match fb::load_state(&self.cfg, group)? {
            None => {
                return Err(FailbackError::NotFailedBack {
                    group: group.to_string(),
                }
                .into());
            }
            Some(s) if s.phase == Phase::Applying => {
                return Err(FailbackError::Unfinished {
                    group: group.to_string(),
                    point: s.point.id,
                }
                .into());
            }
            Some(_) => {}
        }
        {
            let mut s = slot.state.lock().unwrap_or_else(|e| e.into_inner());
            if s.holder.is_some() {
                anyhow::bail!("group {group:?} is held by a connection: cannot commit");
            }
            // Closed before its files are removed.
            s.journal = None;
        }
        let r = fb::commit_files(&self.cfg, &slot.cfg);
        if let Ok(c) = &r {
            slot.metrics.forget_journal();
            tracing::info!(
                group,
                change_lists = c.change_lists.len(),
                "failback committed: change lists of the frames after the point written, undo logs and journal dropped"
            );
        }
        r
    }

    fn export_open(&self, group: &str, spec: PointSpec) -> anyhow::Result<LiveExport> {
        let slot = self.slot(group)?;
        let id = self.exports_started.fetch_add(1, Ordering::Relaxed) + 1;
        // Registered before anything else, under the slot's lock: a failback is refused
        // from here on, and one that runs refuses the export.
        {
            let mut s = slot.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(why) = not_exportable(group, s.failback) {
                anyhow::bail!(why);
            }
            s.exports.push(SlotExport {
                id,
                mark: ExportMark {
                    point_id: 0,
                    point_time_unix_ms: 0,
                    listen: None,
                    since_unix_ms: crate::timefmt::now_unix_ms(),
                },
            });
            publish_exports(slot, &s);
        }
        let mut hold = ExportHoldOf {
            slot: slot.clone(),
            id,
            _pin: None,
        };
        // The point, from the published list (the journal stays with its holder).
        let point = export::choose(group, &slot.metrics.points(), spec)?;
        // Pinned, then checked again: a fold that took the point before the pin is
        // refused by the pin or gone from the list.
        let pin =
            slot.retention.pins.pin(point.id).map_err(|e| {
                anyhow::anyhow!("export of group {group:?} at point {}: {e}", point.id)
            })?;
        if !slot.metrics.points().iter().any(|p| p.id == point.id) {
            anyhow::bail!(
                "export of group {group:?}: point {} was folded into the replicas by retention \
                 just now (see `master-target points`)",
                point.id
            );
        }
        hold._pin = Some(pin);
        hold.update(|m| {
            m.point_id = point.id;
            m.point_time_unix_ms = point.time_unix_ms;
        });
        let frames = slot.metrics.frames_through(point.seq);
        if frames.last().map(|e| e.seq) != Some(point.seq) {
            anyhow::bail!(
                "export of group {group:?} at point {}: the published frame index ends at seq \
                 {:?}, before the point's seq {}",
                point.id,
                frames.last().map(|e| e.seq),
                point.seq
            );
        }
        let exports = export::build(&self.cfg, &slot.cfg, &frames)
            .with_context(|| format!("export of group {group:?} at point {}", point.id))?;
        Ok(LiveExport {
            exports,
            point,
            hold: Box::new(hold),
        })
    }

    fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stopping.subscribe()
    }
}

/// Why an export of `group` is refused in failback state `f`; `None` while it
/// replicates.
fn not_exportable(group: &str, f: SlotFailback) -> Option<String> {
    let what = match f {
        SlotFailback::Replicating => return None,
        SlotFailback::Running => "a failback or commit of it runs".to_string(),
        SlotFailback::Unreadable => "its failback state cannot be read (see the log)".to_string(),
        SlotFailback::Stopped(s) => match s.phase {
            Phase::Applying => format!("it is failing back to point {} (interrupted)", s.point.id),
            Phase::Applied => format!("it is failed back to point {} (not committed)", s.point.id),
            Phase::Committed => format!("it was failed back to point {} and committed", s.point.id),
        },
    };
    Some(format!(
        "export of group {group:?} refused: {what}, so its replicas no longer hold the \
         journal's base and no point can be served from them"
    ))
}

/// Mirrors a slot's running exports to its metrics (`status`). Called under the slot's
/// lock.
fn publish_exports(slot: &GroupSlot, s: &SlotState) {
    slot.metrics
        .set_exports(s.exports.iter().map(|e| e.mark).collect());
}

/// An export's place in its slot: its registration and its pin, both dropped with it.
struct ExportHoldOf {
    slot: Arc<GroupSlot>,
    id: u64,
    _pin: Option<PinGuard>,
}

impl ExportHoldOf {
    fn update(&self, f: impl FnOnce(&mut ExportMark)) {
        let mut s = self.slot.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = s.exports.iter_mut().find(|e| e.id == self.id) {
            f(&mut e.mark);
        }
        publish_exports(&self.slot, &s);
    }
}

impl ExportHold for ExportHoldOf {
    fn id(&self) -> u64 {
        self.id
    }

    fn listening(&self, addr: SocketAddr) {
        self.update(|m| m.listen = Some(addr));
    }
}

impl Drop for ExportHoldOf {
    fn drop(&mut self) {
        let mut s = self.slot.state.lock().unwrap_or_else(|e| e.into_inner());
        s.exports.retain(|e| e.id != self.id);
        publish_exports(&self.slot, &s);
    }
}

impl Shared {
    /// `latest`: asks the process server holding the group to cut now and waits until
    /// that point is durable. Returns the point, or `None` and the note saying the
    /// latest processed point is used.
    fn cut_for_latest(&self, slot: &GroupSlot) -> (Option<u64>, Option<String>) {
        let group = &slot.cfg.id;
        let fallback = |why: String| (None, Some(format!("{} ({why})", fb::NOT_REACHABLE_NOTE)));
        let (tx, rx) = std::sync::mpsc::channel();
        let asked = {
            let s = slot.state.lock().unwrap_or_else(|e| e.into_inner());
            match &s.holder {
                None => Err("no process server is connected for the group".to_string()),
                Some(h) => match &h.cut {
                    None => Err(format!(
                        "process server {:?} speaks no protocol with cut requests",
                        h.node
                    )),
                    Some(c) => c
                        .send(CutAsk {
                            group: group.clone(),
                            reply: tx,
                        })
                        .map_err(|_| "its connection is closing".to_string()),
                },
            }
        };
        if let Err(why) = asked {
            return fallback(why);
        }
        let deadline = std::time::Instant::now() + Duration::from_millis(fb::LATEST_WAIT_MS);
        let done = match rx.recv_timeout(Duration::from_millis(fb::LATEST_WAIT_MS)) {
            Ok(d) => d,
            Err(_) => {
                return fallback(format!(
                    "no answer to the cut request within {} ms",
                    fb::LATEST_WAIT_MS
                ));
            }
        };
        if done.point_id == 0 {
            return fallback(
                "the process server could not cut a point: the group tracks by bitmap only \
                 until a resync"
                    .into(),
            );
        }
        if !done.consistent {
            return fallback(format!(
                "the process server's cut, point {}, is inconsistent: a resync runs",
                done.point_id
            ));
        }
        // Everything the process server held before the cut ships ahead of its point.
        loop {
            if slot.metrics.points().iter().any(|p| p.id == done.point_id) {
                tracing::info!(
                    group,
                    point = done.point_id,
                    "the process server's cut is durable: failing back to it"
                );
                return (Some(done.point_id), None);
            }
            if std::time::Instant::now() >= deadline {
                return fallback(format!(
                    "the process server cut point {} but it was not durable here within {} ms",
                    done.point_id,
                    fb::LATEST_WAIT_MS
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
