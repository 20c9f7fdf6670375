//! Test failover: every disk of a group, as it was at a recovery point, served as an NBD
//! export (export name = disk id), without touching the replicas and without stopping
//! replication.
//!
//! ```text
//! master-target export --config FILE --group G --point SPEC --listen ADDR
//! ```
//!
//! SPEC is a failback's point spec ([`PointSpec`]: `latest`, `latest-processed`,
//! `latest-app`, a point id, an RFC 3339 time), resolved by the same code
//! ([`datapath::failback::choose`]); only consistent points qualify. For an export,
//! `latest` is the latest processed point: no cut is asked of the process server, so
//! that an export is ready at once and costs replication nothing (a test failover
//! checks that the machines boot, not the last second of data; `process-server tag`
//! cuts a point first when one is wanted).
//!
//! **Reads** come from a [`PointView`] (the replica with the journal's frames through the
//! point laid over it: an index of extent tables, not a copy, taken from the index file
//! of each sealed journal segment and the heads of the open segment's frames, so the
//! export is ready in well under a second whatever the journal's size: see
//! [`datapath::pointview`] for the measurements). **Writes** from the test machine
//! go to a sparse overlay file per disk in `data_dir/<group>/export-<pid>-<n>/` (`n`
//! numbers the exports of the process), and a map of the byte ranges written sends later
//! reads of them there. The overlay is throwaway: it is removed when the export ends,
//! and nothing of it ever reaches a replica or the journal. A FLUSH syncs the overlay
//! (the test machine's own view of durability holds while the export lives). The NBD
//! server is write capture's ([`process_server::nbd_server::serve_owned`]) with a
//! [`BlockStore`] per disk and no capture hook.
//!
//! # Who serves it
//!
//! **With `serve` running** (it holds the group's lock and journal) the command asks it
//! over the control socket (`{"cmd":"export","group":..,"point":SPEC,"listen":ADDR}`,
//! see [`crate::control`]) and replication goes on. The server ([`session`]):
//!
//! 1. registers the export in the group's slot: from here a failback or commit of the
//!    group is refused (it would rewrite the replicas the view reads), and an export of
//!    a group that fails back or failed back is refused;
//! 2. resolves the point on the group's published point list;
//! 3. pins it in the group's retention [`Pins`](datapath::retention::Pins), so that the
//!    fold never goes past it while the export lives, then checks it is still listed;
//! 4. takes the frame entries from the base through the point from the copy the group's
//!    [`GroupMetrics`](crate::metrics::GroupMetrics) keeps of the journal's index
//!    (republished after every commit and fold step; frames are immutable once durable,
//!    so a copy of their locations is all the index needs): the journal stays with the
//!    connection that holds it, which never waits for an export;
//! 5. builds the view and the overlays ([`build`]), binds `listen`, answers
//!    `{"ok":true,"listening":ADDR,"point":{..},"ready_ms":N,"overlay":DIR}`, and serves
//!    NBD until the control connection closes or the server stops; then it closes the
//!    listener and every NBD connection, removes the overlay, unpins the point, and
//!    answers `{"ok":true,"ended":WHY}`.
//!
//! Retention goes on under a live export: it folds frames older than the pinned point
//! into the replicas and drops their segments. The view reads such ranges from the
//! replica (see [`datapath::pointview`]), which then holds them.
//!
//! The command prints `listening on ADDR` once the export is ready, waits for SIGINT or
//! SIGTERM, then closes its end and waits (up to [`END_WAIT_MS`]) for the server's
//! `ended`. A server that stops ends its exports; the command then fails with the reason.
//!
//! **With no server running**, [`run_offline`] holds the group's lock (so no server
//! starts meanwhile), reads the journal itself and serves in-process until SIGINT or
//! SIGTERM.
//!
//! Several exports of a group (other points, or the same) may run at once, each with
//! its own address and overlay directory. Overlay directories left by a killed process
//! are removed when `serve` or the next offline export takes the group's lock
//! ([`remove_stale_overlays`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use datapath::failback::{FailbackError, PointInfo};
use datapath::journal::{FrameEntry, Journal};
use datapath::pointview::{IndexStats, PointIndex, PointView, RangeMap};
use datapath::storage::RealFs;
use process_server::nbd_server::{BlockStore, Export, Exports};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::{Config, GroupConfig};
use crate::control::{self, GroupOps};
use crate::failback::PointSpec;
use crate::metrics::PointSummary;
use crate::query::PointOut;

/// After SIGINT or SIGTERM, the command waits this long for the server to confirm the
/// export ended (overlay removed, point unpinned).
pub const END_WAIT_MS: u64 = 10_000;
/// Name prefix of an export's overlay directory in `data_dir/<group>/`.
pub const OVERLAY_DIR_PREFIX: &str = "export-";

/// A disk at a point, with writes going to an overlay.
pub struct PointStore {
    disk: usize,
    view: Arc<Mutex<PointView>>,
    overlay: File,
    overlay_path: PathBuf,
    /// Byte ranges written through the export (they are in the overlay).
    written: Mutex<RangeMap<()>>,
}

impl std::fmt::Debug for PointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PointStore")
            .field("disk", &self.disk)
            .field("overlay", &self.overlay_path)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> io::Result<std::sync::MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| io::Error::other("an export thread panicked"))
}

impl BlockStore for PointStore {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let pieces = lock(&self.written)?.pieces(offset, end);
        for (from, to, written) in pieces {
            let out = &mut buf[(from - offset) as usize..(to - offset) as usize];
            if written.is_some() {
                self.overlay.read_exact_at(out, from)?;
            } else {
                lock(&self.view)?
                    .read(self.disk, from, out)
                    .map_err(io::Error::other)?;
            }
        }
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.overlay.write_all_at(data, offset)?;
        lock(&self.written)?.insert(offset, offset + data.len() as u64, ());
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.overlay.sync_data()
    }
}

/// The exports of a group at a point, and their overlay directory (removed on drop).
pub struct PointExports {
    pub exports: Arc<Exports>,
    pub stats: IndexStats,
    dir: PathBuf,
}

impl PointExports {
    /// The overlay directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PointExports {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), "remove the export overlay: {e}");
        }
    }
}

/// Removes the overlay directories of `group` a killed export or server left behind.
/// The caller holds the group's lock, so no export of another process uses them.
pub fn remove_stale_overlays(cfg: &Config, group: &str) {
    let Ok(dir) = std::fs::read_dir(cfg.group_dir(group)) else {
        return;
    };
    for e in dir.flatten() {
        if !e
            .file_name()
            .to_string_lossy()
            .starts_with(OVERLAY_DIR_PREFIX)
        {
            continue;
        }
        let path = e.path();
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                tracing::info!(group, dir = %path.display(), "removed the overlay of an export that did not end cleanly")
            }
            Err(err) => {
                tracing::warn!(group, dir = %path.display(), "remove a stale export overlay: {err}")
            }
        }
    }
}

/// The frame entries from the journal's base through point `point_id` (which must be a
/// point of the journal).
pub fn entries_through(journal: &Journal, point_id: u64) -> anyhow::Result<Vec<FrameEntry>> {
    let Some(p) = journal.point_by_id(point_id) else {
        bail!(
            "group {:?} has no point {point_id} (see `master-target points`)",
            journal.group()
        );
    };
    (journal.base_seq() + 1..=p.seq)
        .map(|s| {
            journal
                .entry(s)
                .copied()
                .with_context(|| format!("journal frame {s} is not in the index"))
        })
        .collect()
}

/// The point `spec` names among `points` (a group's points, oldest first): the
/// failback's choice ([`datapath::failback::choose`]), with `latest` taken as the latest
/// processed point. Only consistent points qualify.
pub fn choose(
    group: &str,
    points: &[PointSummary],
    spec: PointSpec,
) -> anyhow::Result<PointSummary> {
    let infos: Vec<PointInfo> = points
        .iter()
        .map(|p| PointInfo {
            id: p.id,
            time_unix_ms: p.time_unix_ms,
            kind: p.kind,
            consistent: p.consistent,
        })
        .collect();
    match datapath::failback::choose(group, &infos, spec.choice()) {
        Ok(i) => Ok(points[i]),
        Err(FailbackError::Inconsistent { group, id }) => Err(anyhow::anyhow!(
            "group {group:?}: point {id} is inconsistent (cut during a resync) and cannot be \
             exported: its disks may hold a mix of old and new blocks"
        )),
        Err(e) => Err(crate::failback::explain(e, spec))
            .with_context(|| format!("export of group {group:?} at --point {spec}")),
    }
}

/// Numbers the exports of this process (overlay directory names).
static EXPORTS_BUILT: AtomicU64 = AtomicU64::new(0);

/// Builds the exports of `group` at the point whose frames are `frames` (the entries
/// from the base through the point, see [`entries_through`] and
/// [`GroupMetrics::frames_through`](crate::metrics::GroupMetrics::frames_through)), with
/// overlays in a new `data_dir/<group>/export-<pid>-<n>`.
pub fn build(
    cfg: &Config,
    group: &GroupConfig,
    frames: &[FrameEntry],
) -> anyhow::Result<PointExports> {
    let disks = group.view_disks();
    let fs = Arc::new(RealFs);
    let (index, stats) = PointIndex::build(
        fs.as_ref(),
        &cfg.journal_dir(&group.id),
        &group.id,
        frames,
        &disks,
    )
    .with_context(|| format!("group {:?}: index the journal", group.id))?;
    let replicas: Vec<PathBuf> = group.disks.iter().map(|d| d.replica.clone()).collect();
    let view = Arc::new(Mutex::new(
        PointView::new(index, fs, &replicas).with_context(|| format!("group {:?}", group.id))?,
    ));
    let n = EXPORTS_BUILT.fetch_add(1, Ordering::Relaxed) + 1;
    let dir = cfg
        .group_dir(&group.id)
        .join(format!("{OVERLAY_DIR_PREFIX}{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let list = (|| {
        let mut list = Vec::new();
        for (i, d) in group.disks.iter().enumerate() {
            let overlay_path = dir.join(format!("overlay-{}.img", d.id));
            let overlay = open_overlay(&overlay_path, d.size_bytes)?;
            list.push(Export {
                id: d.id.clone(),
                group: group.id.clone(),
                store: Arc::new(PointStore {
                    disk: i,
                    view: view.clone(),
                    overlay,
                    overlay_path,
                    written: Mutex::new(RangeMap::default()),
                }),
                path: d.replica.clone(),
                size_bytes: d.size_bytes,
            });
        }
        anyhow::Ok(list)
    })();
    match list {
        Ok(list) => Ok(PointExports {
            exports: Arc::new(Exports::new(list)),
            stats,
            dir,
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}

fn open_overlay(path: &Path, size: u64) -> anyhow::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("create overlay {}", path.display()))?;
    f.set_len(size)
        .with_context(|| format!("size overlay {}", path.display()))?;
    Ok(f)
}

/// An export's place in the running server: its registration (failbacks refused) and
/// its pinned point. Dropping it unregisters and unpins.
pub trait ExportHold: Send {
    /// Numbers the export in the server.
    fn id(&self) -> u64;
    /// The export serves on `addr` now (for `status`).
    fn listening(&self, addr: SocketAddr);
}

/// An export the running server opened ([`GroupOps::export_open`]): fields drop in
/// order, so the overlay is gone before the point is unpinned and the export leaves
/// `status`.
pub struct LiveExport {
    pub exports: PointExports,
    pub point: PointSummary,
    pub hold: Box<dyn ExportHold>,
}

fn refusal(e: impl std::fmt::Display) -> Value {
    json!({"ok": false, "error": e.to_string()})
}

/// Waits until the peer closes its end (or the connection fails); what it sends is
/// ignored.
async fn closed<R: AsyncRead + Unpin>(rd: &mut R) {
    let mut buf = [0u8; 512];
    while let Ok(n) = rd.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

/// The running server's side of `{"cmd":"export",...}` on a control connection `rd`,
/// `wr` (the request `line` already read): see the module doc. Returns the refusal to
/// send, or null once it wrote the ready and `ended` lines itself.
pub async fn session<R, W>(ops: Arc<dyn GroupOps>, line: &str, rd: &mut R, wr: &mut W) -> Value
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let started = Instant::now();
    let req: Value = match serde_json::from_str(line.trim()) {
        Ok(v) => v,
        Err(e) => return refusal(format!("request is not JSON: {e}")),
    };
    let field = |name: &str| req.get(name).and_then(Value::as_str).map(str::to_string);
    let (Some(group), Some(point), Some(listen)) =
        (field("group"), field("point"), field("listen"))
    else {
        return refusal("export needs \"group\", \"point\" and \"listen\" (strings)");
    };
    let listen: SocketAddr = match listen.parse() {
        Ok(a) => a,
        Err(e) => {
            return refusal(format!(
                "export of group {group:?}: listen {listen:?} is not an address (IP:PORT): {e}"
            ));
        }
    };
    let spec = match PointSpec::parse(&point) {
        Ok(s) => s,
        Err(e) => return refusal(format!("export of group {group:?}: {e:#}")),
    };
    let mut stopping = ops.stopping();
    if *stopping.borrow() {
        return refusal("the master target is stopping");
    }
    let open = {
        let (ops, group) = (ops.clone(), group.clone());
        tokio::task::spawn_blocking(move || ops.export_open(&group, spec)).await
    };
    let live = match open {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => {
            tracing::warn!(group, point = %spec, "export refused: {e:#}");
            return refusal(format!("{e:#}"));
        }
        Err(e) => return refusal(format!("internal: export: {e}")),
    };
    let point_id = live.point.id;
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            end(live).await;
            return refusal(format!(
                "export of group {group:?} at point {point_id}: listen on {listen}: {e}"
            ));
        }
    };
    let local = listener.local_addr().unwrap_or(listen);
    live.hold.listening(local);
    let ready_ms = started.elapsed().as_millis() as u64;
    tracing::info!(
        group,
        point = point_id,
        export = live.hold.id(),
        listen = %local,
        data_frames = live.exports.stats.data_frames,
        extents = live.exports.stats.extents,
        folded_frames = live.exports.stats.folded_frames,
        indexed_frames = live.exports.stats.indexed_frames,
        peeked_frames = live.exports.stats.peeked_frames,
        overlay = %live.exports.dir().display(),
        ready_ms,
        "export ready while replication goes on: writes go to a throwaway overlay"
    );
    let ready = json!({
        "ok": true,
        "listening": local.to_string(),
        "point": PointOut::from(&live.point),
        "ready_ms": ready_ms,
        "overlay": live.exports.dir().display().to_string(),
    });
    let mut out = ready.to_string();
    out.push('\n');
    let why = if wr.write_all(out.as_bytes()).await.is_err() {
        "the client went away before the export was ready".to_string()
    } else {
        let capture: Arc<dyn process_server::capture::Capture> =
            Arc::new(process_server::capture::NoCapture);
        let serve = process_server::nbd_server::serve_owned(
            listener,
            live.exports.exports.clone(),
            capture,
        );
        // The select drops the NBD server when it ends: listener and connections close.
        tokio::select! {
            r = serve => match r {
                Ok(()) => "the NBD server ended".to_string(),
                Err(e) => format!("the NBD server failed: {e}"),
            },
            _ = closed(rd) => "the client closed the control connection".to_string(),
            _ = stopping.wait_for(|s| *s) => "the master target stops".to_string(),
        }
    };
    // The overlay goes first, then the registration and the pin: once `status` no
    // longer lists the export, its overlay is gone.
    let LiveExport { exports, hold, .. } = live;
    let _ = tokio::task::spawn_blocking(move || drop(exports)).await;
    let export = hold.id();
    drop(hold);
    tracing::info!(group, point = point_id, export, listen = %local, "export ended ({why}): NBD closed, overlay removed, point unpinned");
    let mut out = json!({"ok": true, "ended": why}).to_string();
    out.push('\n');
    let _ = wr.write_all(out.as_bytes()).await;
    // A stopping server waits for every session's `stopping` receiver to go, which it
    // does here, after the last line.
    drop(stopping);
    Value::Null
}

/// Drops an export on the blocking pool (the overlay's removal is file I/O).
async fn end(live: LiveExport) {
    let _ = tokio::task::spawn_blocking(move || drop(live)).await;
}

/// `master-target export`: through the running server, or in this process when none
/// runs.
pub fn export_cmd(
    cfg: &Config,
    group: &str,
    point: &str,
    listen: SocketAddr,
) -> anyhow::Result<()> {
    let spec = PointSpec::parse(point)?;
    let g = cfg.group(group).with_context(|| {
        format!(
            "group {group:?} is not in config file {} (groups: {})",
            cfg.file.display(),
            cfg.groups
                .iter()
                .map(|g| g.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let live = rt.block_on(live_cmd(cfg, group, point, listen))?;
    if live {
        return Ok(());
    }
    run_offline(&rt, cfg, g, spec, listen)
}

/// Reads one line of at most [`control::ANSWER_BYTES_MAX`] bytes; `None` at the end.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(rd: &mut R) -> io::Result<Option<String>> {
    let mut line = String::new();
    let n = (&mut *rd)
        .take(control::ANSWER_BYTES_MAX)
        .read_line(&mut line)
        .await?;
    Ok((n > 0).then_some(line))
}

/// The export through the running server; `false` when none runs.
async fn live_cmd(
    cfg: &Config,
    group: &str,
    point: &str,
    listen: SocketAddr,
) -> anyhow::Result<bool> {
    let socket = control::socket_path(cfg);
    let stream = match tokio::net::UnixStream::connect(&socket).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(false);
        }
        Err(e) => return Err(e).with_context(|| format!("connect to {}", socket.display())),
    };
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install SIGTERM handler")?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("install SIGINT handler")?;
    let (rd, mut wr) = stream.into_split();
    let mut rd = tokio::io::BufReader::new(rd);
    let mut req =
        json!({"cmd": "export", "group": group, "point": point, "listen": listen.to_string()})
            .to_string();
    req.push('\n');
    wr.write_all(req.as_bytes())
        .await
        .with_context(|| format!("send a request to {}", socket.display()))?;
    let gone = || {
        format!(
            "the master target ({}) closed the connection (did it stop?)",
            socket.display()
        )
    };
    let answer = tokio::select! {
        r = read_line(&mut rd) => r.with_context(|| format!("read the answer from {}", socket.display()))?,
        // Closing the connection ends the export wherever the server is with it.
        _ = sigterm.recv() => return Ok(true),
        _ = sigint.recv() => return Ok(true),
    };
    let Some(answer) = answer else {
        bail!("{} before it answered", gone());
    };
    let v: Value = serde_json::from_str(answer.trim()).with_context(|| {
        format!(
            "the answer from {} is not JSON: {:?}",
            socket.display(),
            answer.chars().take(200).collect::<String>()
        )
    })?;
    if v["ok"] != true {
        bail!(
            "the running master target ({}) refused: {}",
            socket.display(),
            v["error"].as_str().unwrap_or("no reason given")
        );
    }
    let addr = v["listening"].as_str().unwrap_or_default().to_string();
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {addr}").context("write to stdout")?;
        out.flush().context("flush stdout")?;
    }
    let p = &v["point"];
    tracing::info!(
        group,
        point = p["id"].as_u64().unwrap_or(0),
        time = p["time"].as_str().unwrap_or(""),
        kind = p["kind"].as_str().unwrap_or(""),
        ready_ms = v["ready_ms"].as_u64().unwrap_or(0),
        overlay = v["overlay"].as_str().unwrap_or(""),
        "export ready through the running master target (replication goes on); SIGINT or SIGTERM ends it"
    );
    let what = format!(
        "the export of group {group:?} at point {} on {addr}",
        p["id"].as_u64().unwrap_or(0)
    );
    tokio::select! {
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
        r = read_line(&mut rd) => {
            let why = match r {
                Ok(Some(l)) => serde_json::from_str::<Value>(l.trim())
                    .ok()
                    .and_then(|v| v["ended"].as_str().map(str::to_string))
                    .unwrap_or_else(|| format!("unexpected line {:?}", l.trim())),
                Ok(None) => gone(),
                Err(e) => format!("read from {}: {e}", socket.display()),
            };
            bail!("the master target ended {what}: {why}");
        }
    }
    // Our end closes; the server ends the export and says so.
    let _ = wr.shutdown().await;
    match tokio::time::timeout(Duration::from_millis(END_WAIT_MS), read_line(&mut rd)).await {
        Ok(Ok(Some(l)))
            if serde_json::from_str::<Value>(l.trim()).is_ok_and(|v| v["ended"].is_string()) =>
        {
            tracing::info!(group, "{what} ended: overlay removed, point unpinned");
        }
        _ => tracing::warn!(
            group,
            "{what}: the master target did not confirm its end within {END_WAIT_MS} ms (see its log)"
        ),
    }
    Ok(true)
}

/// The export with no server running: holds the group's lock, builds the exports of
/// the point and serves them on `listen` until SIGINT or SIGTERM. Prints `listening on
/// ADDR` on stdout once they are ready.
pub fn run_offline(
    rt: &tokio::runtime::Runtime,
    cfg: &Config,
    g: &GroupConfig,
    spec: PointSpec,
    listen: SocketAddr,
) -> anyhow::Result<()> {
    let group = g.id.as_str();
    let _lock = crate::store::GroupLock::acquire(cfg, group).with_context(|| {
        format!("export of group {group:?}: another master-target command holds the group")
    })?;
    let t0 = Instant::now();
    if let Some(s) = crate::failback::load_state(cfg, group)? {
        bail!(
            "export of group {group:?} refused: it is {} (point {}), so its replicas no longer \
             hold the journal's base and no point can be served from them",
            crate::failback::phase_state_name(s.phase),
            s.point.id
        );
    }
    remove_stale_overlays(cfg, group);
    let (journal, _) = crate::store::open_journal(cfg, group)?;
    let points: Vec<PointSummary> = journal.points().iter().map(PointSummary::from).collect();
    let point = choose(group, &points, spec)?;
    let frames = entries_through(&journal, point.id)?;
    drop(journal);
    let px = build(cfg, g, &frames)?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("export of group {group:?} at point {}: listen on {listen} (--listen)", point.id))?;
        let local = listener.local_addr().context("local address")?;
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("install SIGTERM handler")?;
        let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .context("install SIGINT handler")?;
        tracing::info!(
            group,
            point = point.id,
            data_frames = px.stats.data_frames,
            extents = px.stats.extents,
            indexed_frames = px.stats.indexed_frames,
            peeked_frames = px.stats.peeked_frames,
            ready_ms = t0.elapsed().as_millis() as u64,
            "export ready (no server runs: served by this process): writes go to a throwaway overlay"
        );
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            writeln!(out, "listening on {local}").context("write to stdout")?;
            out.flush().context("flush stdout")?;
        }
        let capture: Arc<dyn process_server::capture::Capture> =
            Arc::new(process_server::capture::NoCapture);
        tokio::select! {
            r = process_server::nbd_server::serve_owned(listener, px.exports.clone(), capture) => {
                r.context("serve NBD")?;
            }
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
        tracing::info!(group, point = point.id, "export ended: overlay removed");
        anyhow::Ok(())
    })?;
    drop(px);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use datapath::frame::PointKind;

    fn pt(id: u64, consistent: bool, kind: PointKind) -> PointSummary {
        PointSummary {
            id,
            time_unix_ms: 1_700_000_000_000 + id * 1000,
            kind,
            consistent,
            seq: id * 3,
        }
    }

    /// Proves an export resolves point specs as a failback does, with `latest` as the
    /// latest processed point, and refuses an inconsistent, unknown or missing point
    /// with the group and point named.
    #[test]
    fn choose_points_like_a_failback() {
        let pts = [
            pt(1, true, PointKind::App),
            pt(2, true, PointKind::Crash),
            pt(3, false, PointKind::Crash),
        ];
        let id = |spec: &str| choose("g1", &pts, PointSpec::parse(spec).unwrap()).map(|p| p.id);
        assert_eq!(id("latest").unwrap(), 2, "the newest consistent point");
        assert_eq!(id("latest-processed").unwrap(), 2);
        assert_eq!(id("latest-app").unwrap(), 1);
        assert_eq!(id("1").unwrap(), 1);
        assert_eq!(id("2023-11-14T22:13:21.500Z").unwrap(), 1);
        let e = format!("{:#}", id("3").unwrap_err());
        assert!(
            e.contains("point 3") && e.contains("inconsistent") && e.contains("\"g1\""),
            "{e}"
        );
        let e = format!("{:#}", id("9").unwrap_err());
        assert!(e.contains("no point 9") && e.contains("g1"), "{e}");
        let e = format!("{:#}", id("2000-01-01T00:00:00Z").unwrap_err());
        assert!(e.contains("g1") && e.contains("at or before"), "{e}");
        let e = format!("{:#}", choose("g1", &[], PointSpec::Latest).unwrap_err());
        assert!(
            e.contains("g1") && e.contains("no consistent recovery point"),
            "{e}"
        );
    }
}
