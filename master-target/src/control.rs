//! The control socket of a running master target: `master-target status`, `points`,
//! `failback`, `commit` and `export` ask it, because the running server holds every
//! group's lock and journal (see [`crate::store`]).
//!
//! A Unix domain socket at `data_dir/control.sock`, created by `serve` once it holds the
//! group locks (mode of the data directory: only who may read the journals may ask). A
//! stale socket left by a killed server is replaced; one a live server answers on is
//! refused; a clean stop removes it. One request per connection, one JSON object per
//! line each way:
//!
//! | request                           | answer                                                    |
//! |-----------------------------------|-----------------------------------------------------------|
//! | `{"cmd":"status"}`                | `{"ok":true,"running":true,"metrics":..,"groups":[..],"disks":[..]}` ([`crate::query::Status`]) |
//! | `{"cmd":"points","group":"g1"}`   | `{"ok":true,"points":[{"id","time","time_unix_ms","kind","consistent","seq"},..]}` |
//! | `{"cmd":"failback","group":"g1","point":"SPEC"}` | progress lines `{"progress":{"done_bytes",..}}`, then `{"ok":true,"summary":{..}}` ([`crate::failback::Summary`]) |
//! | `{"cmd":"commit","group":"g1"}`   | `{"ok":true,"commit":{..}}` ([`crate::failback::CommitSummary`]) |
//! | `{"cmd":"export","group":"g1","point":"SPEC","listen":"ADDR"}` | `{"ok":true,"listening":"ADDR","point":{..},"ready_ms":N,"overlay":"DIR"}` once it serves; the export lives until the client closes its end (or the server stops), then `{"ok":true,"ended":"WHY"}` ([`crate::export`]) |
//! | anything else, a request over [`REQUEST_BYTES_MAX`], or none within [`REQUEST_TIMEOUT_MS`] | `{"ok":false,"error":"..."}` |
//!
//! **Long requests.** A failback runs as long as its apply takes, so `failback` and
//! `commit` are answered when they are done: the server sends a progress line after
//! every batch (at most one per [`PROGRESS_INTERVAL_MS`]) and then the answer, and the
//! client ([`request_long`]) waits without a deadline: a server that dies closes the
//! socket, which ends the wait with an error. The work does not depend on the client:
//! a client that goes away does not stop a failback, and rerunning the command then
//! finds it running (refused) or done (a no-op). Short requests keep their bounds
//! ([`ANSWER_TIMEOUT_MS`]). The request line itself is bounded the same for all.
//!
//! **Exports** live as long as their control connection: after the ready line the
//! server reads (and ignores) what the client sends until it closes its end, which ends
//! the export; the last line says why it ended.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

use crate::config::Config;
use crate::export::LiveExport;
use crate::failback::{CommitSummary, PointSpec, ProgressOut, Summary};
use crate::metrics::Metrics;
use crate::query;
use datapath::failback::Progress;

/// Bound on one request line.
pub const REQUEST_BYTES_MAX: u64 = 4096;
/// A client must send its request within this time.
pub const REQUEST_TIMEOUT_MS: u64 = 5000;
/// Bound on one answer as the client reads it (a long point list is the largest).
pub const ANSWER_BYTES_MAX: u64 = 64 << 20;
/// How long a client waits for the answer.
pub const ANSWER_TIMEOUT_MS: u64 = 30_000;
/// A long request sends at most one progress line per this many ms.
pub const PROGRESS_INTERVAL_MS: u64 = 200;
/// Name of the socket in the data directory.
pub const SOCKET_NAME: &str = "control.sock";

/// Where the control socket of the server configured by `cfg` lives.
pub fn socket_path(cfg: &Config) -> PathBuf {
    cfg.data_dir.join(SOCKET_NAME)
}

/// What the control server needs from the running master target.
pub struct Control {
    pub cfg: Config,
    pub metrics: Arc<Metrics>,
    /// Where `GET /metrics` is served, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    /// The groups' failback and commit, done by the server (see [`crate::server`]).
    pub groups: Arc<dyn GroupOps>,
}

/// The long operations the running server does on a group for the control socket.
/// Both run on the blocking pool and return when done.
pub trait GroupOps: Send + Sync {
    /// Stops replication of `group` and fails it back to `spec`.
    fn failback(
        &self,
        group: &str,
        spec: PointSpec,
        progress: &mut dyn FnMut(&Progress),
    ) -> anyhow::Result<Summary>;
    /// Commits `group`'s failback.
    fn commit(&self, group: &str) -> anyhow::Result<CommitSummary>;
    /// Opens a test failover export of `group` at `spec` (registered, pinned, built;
    /// not yet serving): see [`crate::export`]. Blocking.
    fn export_open(&self, group: &str, spec: PointSpec) -> anyhow::Result<LiveExport>;
    /// Becomes true when the server stops: running exports end.
    fn stopping(&self) -> tokio::sync::watch::Receiver<bool>;
}

/// Binds the control socket (replacing a stale one left by a killed server).
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "{} is in use: another master target runs with this data_dir",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("remove stale socket {}", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("bind control socket {}", path.display()))
}

/// Serves control requests until the listener fails.
pub async fn serve(listener: UnixListener, control: Arc<Control>) -> anyhow::Result<()> {
    loop {
        let (stream, _) = listener
            .accept()
            .await
            .context("accept on control socket")?;
        let control = control.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut line = String::new();
            let mut rd = tokio::io::BufReader::new(rd.take(REQUEST_BYTES_MAX + 1));
            let read = tokio::time::timeout(
                Duration::from_millis(REQUEST_TIMEOUT_MS),
                rd.read_line(&mut line),
            )
            .await;
            let answer = match read {
                Err(_) => {
                    json!({"ok": false, "error": format!("no request within {REQUEST_TIMEOUT_MS} ms")})
                }
                Ok(Ok(_)) if line.len() as u64 > REQUEST_BYTES_MAX => {
                    json!({"ok": false, "error": format!("request over {REQUEST_BYTES_MAX} bytes")})
                }
                Ok(Ok(_)) if cmd_of(&line).as_deref() == Some("export") => {
                    crate::export::session(control.groups.clone(), &line, &mut rd, &mut wr).await
                }
                Ok(Ok(_)) if is_long(&line) => {
                    let c = control.clone();
                    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
                    let work = tokio::task::spawn_blocking(move || handle_long(&c, &line, &tx));
                    // Progress lines until the work drops its sender; a client that
                    // went away does not stop the work.
                    let mut client_gone = false;
                    while let Some(v) = rx.recv().await {
                        if client_gone {
                            continue;
                        }
                        let mut out = v.to_string();
                        out.push('\n');
                        client_gone = wr.write_all(out.as_bytes()).await.is_err();
                    }
                    work.await
                        .unwrap_or_else(|e| json!({"ok": false, "error": format!("internal: {e}")}))
                }
                Ok(Ok(_)) => {
                    let c = control.clone();
                    tokio::task::spawn_blocking(move || handle(&c, &line))
                        .await
                        .unwrap_or_else(|e| json!({"ok": false, "error": format!("internal: {e}")}))
                }
                Ok(Err(e)) => json!({"ok": false, "error": format!("read request: {e}")}),
            };
            // Null: the request wrote its answers itself (an export).
            if !answer.is_null() {
                let mut out = answer.to_string();
                out.push('\n');
                let _ = wr.write_all(out.as_bytes()).await;
            }
        });
    }
}

/// The `cmd` of a request line, if it is JSON with one.
fn cmd_of(line: &str) -> Option<String> {
    serde_json::from_str::<Value>(line.trim())
        .ok()?
        .get("cmd")?
        .as_str()
        .map(str::to_string)
}

/// Whether the request line asks for a long operation (failback, commit).
fn is_long(line: &str) -> bool {
    matches!(cmd_of(line).as_deref(), Some("failback" | "commit"))
}

/// Runs a failback or commit; progress goes to `tx` as lines for the client.
fn handle_long(c: &Control, line: &str, tx: &tokio::sync::mpsc::UnboundedSender<Value>) -> Value {
    let req: Value = match serde_json::from_str(line.trim()) {
        Ok(v) => v,
        Err(e) => return json!({"ok": false, "error": format!("request is not JSON: {e}")}),
    };
    let Some(group) = req.get("group").and_then(Value::as_str) else {
        return json!({"ok": false, "error": "the request needs \"group\""});
    };
    let fail = |e: anyhow::Error| json!({"ok": false, "error": format!("{e:#}")});
    match req.get("cmd").and_then(Value::as_str) {
        Some("failback") => {
            let Some(point) = req.get("point").and_then(Value::as_str) else {
                return json!({"ok": false, "error": "failback needs \"point\""});
            };
            let spec = match PointSpec::parse(point) {
                Ok(s) => s,
                Err(e) => return fail(e),
            };
            let mut last: Option<std::time::Instant> = None;
            let mut progress = |p: &Progress| {
                let due = last
                    .is_none_or(|t| t.elapsed() >= Duration::from_millis(PROGRESS_INTERVAL_MS))
                    || (p.total_bytes > 0 && p.done_bytes == p.total_bytes);
                if due {
                    last = Some(std::time::Instant::now());
                    let _ = tx.send(json!({"progress": ProgressOut::from(p)}));
                }
            };
            match c.groups.failback(group, spec, &mut progress) {
                Ok(s) => json!({"ok": true, "summary": s}),
                Err(e) => fail(e),
            }
        }
        Some("commit") => match c.groups.commit(group) {
            Ok(s) => json!({"ok": true, "commit": s}),
            Err(e) => fail(e),
        },
        other => json!({"ok": false, "error": format!("not a long request: {other:?}")}),
    }
}

fn handle(c: &Control, line: &str) -> Value {
    let req: Value = match serde_json::from_str(line.trim()) {
        Ok(v) => v,
        Err(e) => return json!({"ok": false, "error": format!("request is not JSON: {e}")}),
    };
    match req.get("cmd").and_then(Value::as_str) {
        Some("status") => match query::live_status(&c.cfg, &c.metrics, c.metrics_addr) {
            Ok(st) => {
                let mut v = serde_json::to_value(&st).unwrap_or(Value::Null);
                match v.as_object_mut() {
                    Some(o) => {
                        o.insert("ok".into(), Value::Bool(true));
                        v
                    }
                    None => json!({"ok": false, "error": "internal: status is not an object"}),
                }
            }
            Err(e) => json!({"ok": false, "error": format!("{e:#}")}),
        },
        Some("points") => {
            let Some(group) = req.get("group").and_then(Value::as_str) else {
                return json!({"ok": false, "error": "points needs \"group\""});
            };
            let Some(m) = c.metrics.group(group) else {
                return json!({"ok": false, "error": format!("unknown group {group:?}")});
            };
            let points: Vec<query::PointOut> =
                m.points().iter().map(query::PointOut::from).collect();
            json!({"ok": true, "points": points})
        }
        Some(other) => json!({"ok": false, "error": format!("unknown cmd {other:?}")}),
        None => json!({"ok": false, "error": "request needs \"cmd\""}),
    }
}

/// Sends a long request (failback, commit) and waits for its answer without a
/// deadline, handing every progress line to `on_progress`; `None` when no server runs.
/// The server closing the socket before its answer is an error.
pub fn request_long(
    socket: &Path,
    req: &Value,
    on_progress: &mut dyn FnMut(&Value),
) -> anyhow::Result<Option<Value>> {
    let Some(mut s) = connect(socket)? else {
        return Ok(None);
    };
    let mut line = req.to_string();
    line.push('\n');
    s.write_all(line.as_bytes())
        .with_context(|| format!("send a request to {}", socket.display()))?;
    let mut rd = BufReader::new(s);
    loop {
        let mut answer = String::new();
        let n = (&mut rd)
            .take(ANSWER_BYTES_MAX)
            .read_line(&mut answer)
            .with_context(|| format!("read the answer from {}", socket.display()))?;
        if n == 0 {
            bail!(
                "the master target ({}) closed the connection before it answered (did it \
                 stop?); the operation may have been interrupted: run the command again",
                socket.display()
            );
        }
        let v: Value = serde_json::from_str(answer.trim()).with_context(|| {
            format!(
                "the answer from {} is not JSON: {:?}",
                socket.display(),
                answer.chars().take(200).collect::<String>()
            )
        })?;
        if v.get("progress").is_some() {
            on_progress(&v);
            continue;
        }
        return Ok(Some(v));
    }
}

/// Connects to the control socket; `None` when no server runs (no socket, or a stale
/// one nobody listens on).
fn connect(socket: &Path) -> anyhow::Result<Option<std::os::unix::net::UnixStream>> {
    match std::os::unix::net::UnixStream::connect(socket) {
        Ok(s) => Ok(Some(s)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("connect to {}", socket.display())),
    }
}

/// Sends one request to the running server's control socket and returns its answer;
/// `None` when no server runs (no socket, or a stale one nobody listens on).
pub fn request(socket: &Path, req: &Value) -> anyhow::Result<Option<Value>> {
    let mut s = match std::os::unix::net::UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("connect to {}", socket.display())),
    };
    s.set_read_timeout(Some(Duration::from_millis(ANSWER_TIMEOUT_MS)))
        .context("set a read timeout")?;
    let mut line = req.to_string();
    line.push('\n');
    s.write_all(line.as_bytes())
        .with_context(|| format!("send a request to {}", socket.display()))?;
    let mut answer = String::new();
    BufReader::new(s.take(ANSWER_BYTES_MAX))
        .read_line(&mut answer)
        .with_context(|| format!("read the answer from {}", socket.display()))?;
    let v = serde_json::from_str(answer.trim()).with_context(|| {
        format!(
            "the answer from {} is not JSON: {:?}",
            socket.display(),
            answer.chars().take(200).collect::<String>()
        )
    })?;
    Ok(Some(v))
}
