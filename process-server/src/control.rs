//! The control socket of a running process server: `process-server tag` and
//! `process-server status` talk to it.
//!
//! A Unix domain socket at `state_dir/control.sock` (created by `serve`, mode of the
//! state directory: only who may read the state may control the server). One request per
//! connection, one JSON object per line each way:
//!
//! | request                                                  | answer                                     |
//! |----------------------------------------------------------|--------------------------------------------|
//! | `{"cmd":"tag","group":"g1","app_consistent":true}`       | `{"ok":true,"point":{...},"warnings":[..]}` |
//! | `{"cmd":"status"}`                                       | `{"ok":true,"groups":[...],"disks":[...]}`  |
//! | `{"cmd":"verify","disk":"d0"}`                           | `{"ok":true,"verify":{...}}` ([`crate::verify::Report::to_json`]) |
//! | anything else, or a request over [`REQUEST_BYTES_MAX`]   | `{"ok":false,"error":"..."}`               |
//!
//! A status answer, for scripts (`process-server status --json` prints it without `ok`):
//!
//! | field                              | meaning                                                   |
//! |------------------------------------|-----------------------------------------------------------|
//! | `shipping`                         | a `[target]` is configured                                |
//! | `metrics`                          | the address of `GET /metrics`, or null                    |
//! | `groups[].id`, `.state`            | the group and its state ([`crate::metrics::state_name`]: `replicating`, `initial-sync`, `resyncing`, `bitmap-only`, `disconnected`) |
//! | `groups[].reason`                  | why it tracks by bitmap only, or null                     |
//! | `groups[].epoch`                   | the epoch its writes go to now                            |
//! | `groups[].connected`               | a session with the master target ships it (null: no target) |
//! | `groups[].rpo_ms`                  | age of the newest point the master target acknowledged as durable; null before the first |
//! | `groups[].acked_point`             | that point: `{id, time_unix_ms}`, or null                 |
//! | `groups[].spool_bytes`, `.spool_bytes_max` | spool fill and bound                              |
//! | `groups[].captured_bytes`, `.shipped_bytes`, `.shipped_plain_bytes`, `.shipped_frames` | totals since start (shipped: on the wire) |
//! | `groups[].capture_bytes_per_s`, `.ship_bytes_per_s` | throughput over the last 10 s              |
//! | `disks[].id`, `.group`, `.nbd_uri`, `.path` | the disk, its NBD export and its backing file or device |
//! | `disks[].state`, `.size_bytes`, `.dirty_blocks`, `.captured_bytes` | its group's state, size, dirty 4 KiB blocks, bytes captured |
//! | `disks[].resync_compared_blocks`, `.resync_sent_blocks` | hash-diff resyncs since start: 64 KiB blocks compared with the master target's copy, and sent (they differed or could not be compared) |
//! | `groups[].resync.hash_diff`        | the pass under way compares block hashes              |
//!
//! An app-consistent tag runs the group's freeze hook, cuts, then runs the thaw hook
//! whatever happened: a freeze that fails or outruns `hook_timeout_ms` yields a
//! crash-consistent point and a warning, never a frozen machine.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tracing::{info, warn};

use crate::config::{Config, Hooks};
use crate::metrics::state_name;
use crate::nbd_server::Exports;
use crate::tracking::{Tracking, now_unix_ms};

/// Bound on one request line.
pub const REQUEST_BYTES_MAX: u64 = 4096;
/// A client has this long to send its request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Name of the socket in the state directory.
pub const SOCKET_NAME: &str = "control.sock";

/// Where the control socket of the server configured by `config` lives.
pub fn socket_path(config: &Config) -> PathBuf {
    config.tracking.state_dir.join(SOCKET_NAME)
}

/// What the control server needs from the running process server.
pub struct Control {
    pub tracking: Arc<Tracking>,
    pub exports: Arc<Exports>,
    pub hooks: HashMap<String, Hooks>,
    pub nbd_addr: std::net::SocketAddr,
    /// A `[target]` is configured: the group is `disconnected` while not shipped.
    pub shipping: bool,
    /// Where `GET /metrics` is served, if anywhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Hash requests to the master target (none without a `[target]`): `verify`.
    pub hashes: Option<Arc<crate::hashes::HashBroker>>,
}

/// Binds the control socket (replacing a stale one left by a killed server).
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "{} is in use: another process server runs with this state_dir",
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
            let read = tokio::time::timeout(REQUEST_TIMEOUT, rd.read_line(&mut line)).await;
            let answer = match read.unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no whole request line in {REQUEST_TIMEOUT:?}"),
                ))
            }) {
                Ok(_) if line.len() as u64 > REQUEST_BYTES_MAX => {
                    json!({"ok": false, "error": format!("request over {REQUEST_BYTES_MAX} bytes")})
                }
                Ok(_) => {
                    let c = control.clone();
                    tokio::task::spawn_blocking(move || handle(&c, &line))
                        .await
                        .unwrap_or_else(|e| json!({"ok": false, "error": format!("internal: {e}")}))
                }
                Err(e) => json!({"ok": false, "error": format!("read request: {e}")}),
            };
            let mut out = answer.to_string();
            out.push('\n');
            let _ = wr.write_all(out.as_bytes()).await;
        });
    }
}

fn handle(c: &Control, line: &str) -> Value {
    let req: Value = match serde_json::from_str(line.trim()) {
        Ok(v) => v,
        Err(e) => return json!({"ok": false, "error": format!("request is not JSON: {e}")}),
    };
    match req.get("cmd").and_then(Value::as_str) {
        Some("tag") => {
            let Some(group) = req.get("group").and_then(Value::as_str) else {
                return json!({"ok": false, "error": "tag needs \"group\""});
            };
            let app = req
                .get("app_consistent")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            tag(c, group, app)
        }
        Some("status") => status(c),
        Some("verify") => {
            let Some(disk) = req.get("disk").and_then(Value::as_str) else {
                return json!({"ok": false, "error": "verify needs \"disk\""});
            };
            let Some(broker) = &c.hashes else {
                return json!({"ok": false, "error": "no [target] configured: there is no copy to verify against"});
            };
            match crate::verify::verify(broker, &c.tracking, &c.exports, disk) {
                Ok(r) => {
                    info!(
                        disk,
                        compared_blocks = r.compared_blocks,
                        differing_blocks = r.differing_blocks,
                        in_flight_blocks = r.in_flight_blocks,
                        "verify done"
                    );
                    json!({"ok": true, "verify": r.to_json()})
                }
                Err(e) => json!({"ok": false, "error": format!("verify {disk}: {e:#}")}),
            }
        }
        Some(other) => json!({"ok": false, "error": format!("unknown cmd {other:?}")}),
        None => json!({"ok": false, "error": "request needs \"cmd\""}),
    }
}

/// Runs `cmd` with `sh -c`, killing it at the timeout. Ok when it exited with 0.
fn run_hook(what: &str, cmd: &str, timeout: Duration) -> Result<(), String> {
    let mut child = Command::new("sh")
        .args(["-c", cmd])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what} hook {cmd:?} did not start: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.by_ref().take(1024).read_to_string(&mut err);
                }
                return Err(format!(
                    "{what} hook {cmd:?} failed ({status}): {}",
                    err.trim()
                ));
            }
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{what} hook {cmd:?} outran its timeout of {} ms and was killed",
                    timeout.as_millis()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("{what} hook {cmd:?}: {e}")),
        }
    }
}

/// Cuts a point of `group` now (with the freeze and thaw hooks around it when `app`):
/// the `tag` command's answer. Also what the app-consistent schedule runs.
pub fn tag(c: &Control, group: &str, app: bool) -> Value {
    let Some(t) = c.tracking.group(group) else {
        return json!({"ok": false, "error": format!("unknown group {group:?}")});
    };
    let hooks = c.hooks.get(group).cloned().unwrap_or_default();
    let timeout = Duration::from_millis(hooks.timeout_ms);
    let mut warnings = Vec::new();
    let mut frozen = app;
    if app {
        match &hooks.freeze {
            Some(cmd) => {
                if let Err(w) = run_hook("freeze", cmd, timeout) {
                    warn!(group, "{w}: this point is crash-consistent only");
                    warnings.push(format!("{w}: the point is crash-consistent"));
                    frozen = false;
                }
            }
            None => {
                warnings.push("no freeze hook configured: the point is crash-consistent".into());
                frozen = false;
            }
        }
    }
    let cut = match t.lock() {
        Ok(mut t) => t
            .cut(now_unix_ms(), frozen)
            .map_err(|e| format!("cut: {e}")),
        Err(_) => Err("tracking of this group failed earlier".to_string()),
    };
    // The thaw runs whatever happened above: the machine is never left frozen.
    if app
        && let Some(cmd) = &hooks.thaw
        && let Err(w) = run_hook("thaw", cmd, timeout)
    {
        warn!(group, "{w}");
        warnings.push(w);
    }
    if let Ok(Some(p)) = &cut
        && !p.consistent
    {
        warnings.push(
            "the group is resyncing: this point is kept in the history but is not consistent"
                .into(),
        );
    }
    match cut {
        Ok(Some(p)) => {
            info!(
                group,
                point = p.point_id,
                app_consistent = p.app_consistent,
                "tagged"
            );
            json!({
                "ok": true,
                "warnings": warnings,
                "point": {
                    "id": p.point_id,
                    "group": group,
                    "epoch": p.epoch,
                    "time_unix_ms": p.time_unix_ms,
                    "kind": if p.app_consistent { "app" } else { "crash" },
                    "consistent": p.consistent,
                },
            })
        }
        Ok(None) => json!({
            "ok": false,
            "warnings": warnings,
            "error": format!("group {group} tracks by bitmap only: no recovery point until a resync"),
        }),
        Err(e) => json!({"ok": false, "warnings": warnings, "error": e}),
    }
}

fn status(c: &Control) -> Value {
    let sync = c.tracking.sync_status();
    let hash_diff: HashMap<String, bool> = c
        .tracking
        .specs()
        .iter()
        .filter_map(|(g, _)| {
            let t = c.tracking.group(g)?;
            let t = t.lock().ok()?;
            Some((g.clone(), t.resync_is_hash_diff()))
        })
        .collect();
    let now = now_unix_ms();
    let metrics = c.tracking.metrics();
    let mut states: HashMap<String, &'static str> = HashMap::new();
    let mut initials: HashMap<String, Vec<String>> = HashMap::new();
    let groups: Vec<Value> = c
        .tracking
        .status()
        .into_iter()
        .map(|(id, epoch, mode, used, max)| {
            let snap = metrics.group(&id).map(|m| m.snapshot()).unwrap_or_default();
            let connected = c.shipping.then_some(snap.connected);
            let (initial, progress) = sync.get(&id).cloned().unwrap_or_default();
            let state = state_name(&mode, !initial.is_empty(), connected);
            states.insert(id.clone(), state);
            initials.insert(id.clone(), initial.clone());
            let reason = match mode {
                datapath::tracker::TrackMode::BitmapOnly { reason } => Some(reason),
                datapath::tracker::TrackMode::Spooling
                | datapath::tracker::TrackMode::Resyncing => None,
            };
            json!({
                "id": id,
                "state": state,
                "reason": reason,
                "epoch": epoch,
                "connected": connected,
                "rpo_ms": snap.rpo_ms(now),
                "acked_point": snap.acked_point.map(|(id, t)| json!({"id": id, "time_unix_ms": t})),
                "spool_bytes": used,
                "spool_bytes_max": max,
                "initial_sync_disks": initial,
                "resync": progress.map(|p| json!({
                    "total_bytes": p.total_bytes,
                    "done_bytes": p.done_bytes,
                    "hash_diff": hash_diff.get(&id).copied().unwrap_or(false),
                })),
                "captured_bytes": snap.captured_bytes,
                "shipped_bytes": snap.shipped_wire_bytes,
                "shipped_plain_bytes": snap.shipped_plain_bytes,
                "shipped_frames": snap.shipped_frames,
                "capture_bytes_per_s": snap.capture_bytes_per_s,
                "ship_bytes_per_s": snap.ship_bytes_per_s,
            })
        })
        .collect();
    let disks: Vec<Value> = c
        .exports
        .iter()
        .map(|e| {
            let dirty = c
                .tracking
                .group(&e.group)
                .and_then(|t| t.lock().ok().and_then(|t| t.dirty_blocks(&e.id)));
            json!({
                "id": e.id,
                "group": e.group,
                "nbd_uri": format!("nbd://{}/{}", c.nbd_addr, e.id),
                "path": e.path.display().to_string(),
                "state": if initials.get(&e.group).is_some_and(|d| d.contains(&e.id))
                    && states.get(&e.group) != Some(&"disconnected")
                {
                    Some("initial-sync")
                } else {
                    states.get(&e.group).copied().map(|s| if s == "initial-sync" { "replicating" } else { s })
                },
                "size_bytes": e.size_bytes,
                "dirty_blocks": dirty,
                "captured_bytes": metrics.disk(&e.id).map(|d| d.captured_bytes()),
                "resync_compared_blocks": metrics.disk(&e.id).map(|d| d.hash_blocks().0),
                "resync_sent_blocks": metrics.disk(&e.id).map(|d| d.hash_blocks().1),
            })
        })
        .collect();
    json!({
        "ok": true,
        "shipping": c.shipping,
        "metrics": c.metrics_addr.map(|a| a.to_string()),
        "groups": groups,
        "disks": disks,
    })
}

/// Sends one request to the running server's control socket and returns its answer.
pub fn request(socket: &Path, req: &Value) -> anyhow::Result<Value> {
    let mut s = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "connect to {} (is `process-server serve` running with this config?)",
            socket.display()
        )
    })?;
    let mut line = req.to_string();
    line.push('\n');
    s.write_all(line.as_bytes()).context("send request")?;
    let mut answer = String::new();
    BufReader::new(s.take(1 << 20))
        .read_line(&mut answer)
        .context("read answer")?;
    serde_json::from_str(answer.trim()).with_context(|| format!("answer is not JSON: {answer:?}"))
}
