//! `points` and `status`: what each group's journal holds and how replication is going,
//! for people and scripts.
//!
//! While `serve` runs it holds every group's lock and journal, so both commands ask it
//! over its control socket ([`crate::control`]) and show live values (`"running": true`).
//! When no server answers (no socket, or a stale one nobody listens on) they read the
//! files a stopped server left (`"running": false`): they take each group's lock (see
//! [`crate::store`]) and so refuse a group a server starting meanwhile holds. Opening a
//! journal may cut a torn tail left by a crash, exactly as `serve` would on its next
//! start; nothing acknowledged is ever cut.
//!
//! A group that failed back shows its failback (`failing-back`,
//! `failed-back-uncommitted`, or `failed-back` once committed, see
//! [`crate::metrics::state_name`]); a committed group has no journal and no points.
//!
//! `status --json` prints a [`Status`]; the fields only a running server knows
//! (throughput, totals since start) are null when it is not running. Each group lists
//! the test failover exports the running server serves (`exports`: point and address;
//! empty when it is not running).

use std::net::SocketAddr;

use anyhow::{Context, bail};
use datapath::frame::PointKind;
use datapath::journal::Journal;
use serde::{Deserialize, Serialize};

use crate::config::{Config, GroupConfig};
use crate::control;
use crate::failback::{load_state, phase_state_name};
use crate::metrics::{
    ExportMark, FailbackMark, Metrics, PointSummary, RetentionTotals, state_name,
};
use crate::store::{self, GroupLock};
use crate::timefmt::{now_unix_ms, rfc3339_ms};

/// One recovery point as `points --json` prints it.
#[derive(Debug, Serialize, Deserialize)]
pub struct PointOut {
    pub id: u64,
    pub time: String,
    pub time_unix_ms: u64,
    pub kind: String,
    pub consistent: bool,
    pub seq: u64,
}

fn kind_name(k: PointKind) -> &'static str {
    match k {
        PointKind::Crash => "crash",
        PointKind::App => "app",
    }
}

impl From<&PointSummary> for PointOut {
    fn from(p: &PointSummary) -> Self {
        Self {
            id: p.id,
            time: rfc3339_ms(p.time_unix_ms),
            time_unix_ms: p.time_unix_ms,
            kind: kind_name(p.kind).to_string(),
            consistent: p.consistent,
            seq: p.seq,
        }
    }
}

/// Opens the journal of `group` if it exists (without creating an empty one).
fn open_existing(cfg: &Config, group: &str) -> anyhow::Result<Option<Journal>> {
    let dir = cfg.journal_dir(group);
    if !dir.exists() {
        return Ok(None);
    }
    let (j, rec) = store::open_journal(cfg, group)?;
    if rec.truncated_bytes > 0 {
        eprintln!(
            "note: group {group:?}: cut a torn tail of {} bytes (frames never acknowledged)",
            rec.truncated_bytes
        );
    }
    Ok(Some(j))
}

/// Like [`open_existing`], but a committed group's journal is gone for good: what may
/// be left of it (a commit a crash interrupted) is not opened.
fn open_unless_committed(
    cfg: &Config,
    group: &str,
    fb: Option<&FailbackMark>,
) -> anyhow::Result<Option<Journal>> {
    if fb.is_some_and(|m| m.phase == datapath::failback::Phase::Committed) {
        return Ok(None);
    }
    open_existing(cfg, group)
}

fn check_group<'a>(cfg: &'a Config, group: &str) -> anyhow::Result<&'a GroupConfig> {
    cfg.group(group).with_context(|| {
        format!(
            "group {group:?} is not in config file {} (groups: {})",
            cfg.file.display(),
            cfg.groups
                .iter()
                .map(|g| g.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// Sends `req` to the running server; `None` when none runs. An answer that is not ok
/// is an error with the server's reason.
fn ask(cfg: &Config, req: serde_json::Value) -> anyhow::Result<Option<serde_json::Value>> {
    let socket = control::socket_path(cfg);
    let Some(answer) = control::request(&socket, &req)? else {
        return Ok(None);
    };
    if answer["ok"] != true {
        bail!(
            "the running master target ({}) refused: {}",
            socket.display(),
            answer["error"].as_str().unwrap_or("no reason given")
        );
    }
    Ok(Some(answer))
}

/// `master-target points`: the recovery points of one group, oldest first.
pub fn points(cfg: &Config, group: &str, json: bool) -> anyhow::Result<()> {
    check_group(cfg, group)?;
    let pts: Vec<PointOut> = match ask(cfg, serde_json::json!({"cmd": "points", "group": group}))? {
        Some(mut answer) => serde_json::from_value(answer["points"].take())
            .context("the running master target's point list")?,
        None => {
            let _lock = GroupLock::acquire(cfg, group)?;
            let fb = load_state(cfg, group)?.map(|s| FailbackMark::from(&s));
            let j = open_unless_committed(cfg, group, fb.as_ref())?;
            j.iter()
                .flat_map(|j| j.points())
                .map(|p| PointOut::from(&PointSummary::from(p)))
                .collect()
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&pts).context("encode JSON")?
        );
        return Ok(());
    }
    if pts.is_empty() {
        println!("group {group}: no recovery points");
        return Ok(());
    }
    println!(
        "{:>10}  {:<24}  {:<5}  {:<10}  {:>10}",
        "ID", "TIME (UTC)", "KIND", "CONSISTENT", "SEQ"
    );
    for p in &pts {
        println!(
            "{:>10}  {:<24}  {:<5}  {:<10}  {:>10}",
            p.id,
            p.time,
            p.kind,
            if p.consistent { "yes" } else { "no" },
            p.seq
        );
    }
    Ok(())
}

/// The newest durable point of a group.
#[derive(Debug, Serialize, Deserialize)]
pub struct NewestPoint {
    pub id: u64,
    pub time: String,
    pub time_unix_ms: u64,
    pub kind: String,
    pub consistent: bool,
    /// Age of the newest point: the recovery point objective right now.
    pub age_ms: u64,
}

/// The process server that holds a group.
#[derive(Debug, Serialize, Deserialize)]
pub struct PeerOut {
    pub node: String,
    pub address: String,
}

/// One group in `status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct GroupStatus {
    pub id: String,
    /// The state of its disks ([`state_name`]).
    pub state: String,
    /// The process server that holds the group now, or null.
    pub peer: Option<PeerOut>,
    pub durable_seq: u64,
    pub base_seq: u64,
    pub points: usize,
    pub newest_point: Option<NewestPoint>,
    /// Age of the newest durable point; null without one.
    pub rpo_ms: Option<u64>,
    pub journal_bytes: u64,
    /// The journal's limit (`journal_bytes_max`).
    pub journal_bytes_max: u64,
    /// Set when the journal is at 80% of its limit or more, or points were dropped for
    /// space since the server started ([`journal_warning`]); else null.
    pub journal_warning: Option<String>,
    /// History kept (`retention`).
    pub retention_ms: u64,
    /// Bytes of frames the retention fold applied to the replicas since the server
    /// started (null when it is not running).
    pub folded_bytes: Option<u64>,
    /// The group's failback, when it has one (null while it replicates).
    pub failback: Option<FailbackOut>,
    /// Test failover exports the running server serves now (`master-target export`).
    #[serde(default)]
    pub exports: Vec<ExportOut>,
    /// Totals since the server started (null when it is not running).
    pub received_bytes: Option<u64>,
    pub received_frames: Option<u64>,
    pub journaled_bytes: Option<u64>,
    pub journaled_frames: Option<u64>,
    /// Bytes received per second over the last 10 s (null when not running).
    pub receive_bytes_per_s: Option<f64>,
    /// Bytes journaled per second over the last 10 s (null when not running).
    pub journal_bytes_per_s: Option<f64>,
}

/// A group's failback in `status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct FailbackOut {
    /// `failing-back`, `failed-back-uncommitted` or `failed-back` (committed).
    pub state: String,
    pub point_id: u64,
    pub point_time: String,
}

impl From<&FailbackMark> for FailbackOut {
    fn from(m: &FailbackMark) -> Self {
        Self {
            state: phase_state_name(m.phase).to_string(),
            point_id: m.point_id,
            point_time: rfc3339_ms(m.point_time_unix_ms),
        }
    }
}

/// A running export in `status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ExportOut {
    pub point_id: u64,
    pub point_time: String,
    /// Where it serves NBD (null while it starts).
    pub listen: Option<String>,
    pub since: String,
}

impl From<&ExportMark> for ExportOut {
    fn from(m: &ExportMark) -> Self {
        Self {
            point_id: m.point_id,
            point_time: rfc3339_ms(m.point_time_unix_ms),
            listen: m.listen.map(|a| a.to_string()),
            since: rfc3339_ms(m.since_unix_ms),
        }
    }
}

/// One disk in `status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct DiskStatus {
    pub id: String,
    pub group: String,
    /// The replica image.
    pub path: String,
    pub size_bytes: u64,
    pub replica_exists: bool,
    /// Its group's state.
    pub state: String,
}

/// What `status` shows.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    /// Whether the values come from a running server (else from the files on disk).
    pub running: bool,
    /// Where the running server serves `GET /metrics`, if anywhere.
    pub metrics: Option<String>,
    pub groups: Vec<GroupStatus>,
    pub disks: Vec<DiskStatus>,
}

/// The warning `status` shows for a journal of `bytes` with limit `max`: near or over
/// the limit ([`datapath::retention::near_limit`]), and points dropped for space since
/// the server started. `None` when there is nothing to warn about.
pub fn journal_warning(bytes: u64, max: u64, totals: Option<&RetentionTotals>) -> Option<String> {
    let mut parts = Vec::new();
    if datapath::retention::near_limit(bytes, max) {
        parts.push(format!(
            "journal at {}% of journal_bytes_max ({bytes} of {max} bytes): beyond it the oldest \
             points are dropped for space",
            u128::from(bytes) * 100 / u128::from(max.max(1))
        ));
    }
    if let Some(t) = totals.filter(|t| t.space_dropped_points > 0) {
        parts.push(format!(
            "{} points dropped for space since the server started, the newest from {}",
            t.space_dropped_points,
            t.newest_space_dropped_time_unix_ms
                .map(rfc3339_ms)
                .unwrap_or_default()
        ));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

fn newest(p: &PointSummary, now: u64) -> NewestPoint {
    NewestPoint {
        id: p.id,
        time: rfc3339_ms(p.time_unix_ms),
        time_unix_ms: p.time_unix_ms,
        kind: kind_name(p.kind).to_string(),
        consistent: p.consistent,
        age_ms: now.saturating_sub(p.time_unix_ms),
    }
}

fn disks_of(g: &GroupConfig, state: &str, out: &mut Vec<DiskStatus>) {
    for d in &g.disks {
        out.push(DiskStatus {
            id: d.id.clone(),
            group: g.id.clone(),
            path: d.replica.display().to_string(),
            size_bytes: d.size_bytes,
            replica_exists: d.replica.exists(),
            state: state.to_string(),
        });
    }
}

/// The status of a running server, from its live values (the control socket's answer).
pub fn live_status(
    cfg: &Config,
    metrics: &Metrics,
    metrics_addr: Option<SocketAddr>,
) -> anyhow::Result<Status> {
    let now = now_unix_ms();
    let mut st = Status {
        running: true,
        metrics: metrics_addr.map(|a| a.to_string()),
        groups: Vec::new(),
        disks: Vec::new(),
    };
    for g in &cfg.groups {
        let s = metrics
            .group(&g.id)
            .map(|m| m.snapshot())
            .unwrap_or_default();
        let state = s.state();
        let journal_bytes = store::dir_bytes(&cfg.journal_dir(&g.id))?;
        st.groups.push(GroupStatus {
            id: g.id.clone(),
            state: state.to_string(),
            peer: s.peer.as_ref().map(|p| PeerOut {
                node: p.node.clone(),
                address: p.address.to_string(),
            }),
            durable_seq: s.durable_seq,
            base_seq: s.base_seq,
            points: s.points,
            newest_point: s.newest_point.map(|p| newest(&p, now)),
            rpo_ms: s.rpo_ms(now),
            journal_bytes,
            journal_bytes_max: g.journal_bytes_max,
            journal_warning: journal_warning(
                journal_bytes,
                g.journal_bytes_max,
                Some(&s.retention),
            ),
            retention_ms: g.retention_ms,
            folded_bytes: Some(s.retention.folded_bytes),
            failback: s.failback.as_ref().map(FailbackOut::from),
            exports: s.exports.iter().map(ExportOut::from).collect(),
            received_bytes: Some(s.received_bytes),
            received_frames: Some(s.received_frames),
            journaled_bytes: Some(s.journaled_bytes),
            journaled_frames: Some(s.journaled_frames),
            receive_bytes_per_s: Some(s.receive_bytes_per_s),
            journal_bytes_per_s: Some(s.journal_bytes_per_s),
        });
        disks_of(g, state, &mut st.disks);
    }
    Ok(st)
}

/// The status of a stopped server, read from its files.
fn offline_status(cfg: &Config) -> anyhow::Result<Status> {
    let now = now_unix_ms();
    let mut st = Status {
        running: false,
        metrics: None,
        groups: Vec::new(),
        disks: Vec::new(),
    };
    for g in &cfg.groups {
        let _lock = GroupLock::acquire(cfg, &g.id)?;
        let fb = load_state(cfg, &g.id)?.map(|s| FailbackMark::from(&s));
        let j = open_unless_committed(cfg, &g.id, fb.as_ref())?;
        let newest_point = j
            .as_ref()
            .and_then(|j| j.latest_point())
            .map(PointSummary::from);
        let newest_consistent = j
            .as_ref()
            .and_then(|j| j.points().iter().rev().find(|p| p.record.consistent))
            .map(PointSummary::from);
        let journal_bytes = store::dir_bytes(&cfg.journal_dir(&g.id))?;
        let state = state_name(
            false,
            newest_point.map(|p| p.consistent),
            newest_consistent.is_some(),
            fb.map(|m| m.phase),
        );
        st.groups.push(GroupStatus {
            id: g.id.clone(),
            state: state.to_string(),
            peer: None,
            durable_seq: j.as_ref().map_or(0, |j| j.durable_seq()),
            base_seq: j.as_ref().map_or(0, |j| j.base_seq()),
            points: j.as_ref().map_or(0, |j| j.points().len()),
            newest_point: newest_point.map(|p| newest(&p, now)),
            rpo_ms: newest_consistent.map(|p| now.saturating_sub(p.time_unix_ms)),
            journal_bytes,
            journal_bytes_max: g.journal_bytes_max,
            journal_warning: journal_warning(journal_bytes, g.journal_bytes_max, None),
            retention_ms: g.retention_ms,
            folded_bytes: None,
            failback: fb.as_ref().map(FailbackOut::from),
            exports: Vec::new(),
            received_bytes: None,
            received_frames: None,
            journaled_bytes: None,
            journaled_frames: None,
            receive_bytes_per_s: None,
            journal_bytes_per_s: None,
        });
        disks_of(g, state, &mut st.disks);
    }
    Ok(st)
}

/// `master-target status`: per group and per disk, from the running server or, when
/// none runs, from the files on disk.
pub fn status(cfg: &Config, json: bool) -> anyhow::Result<()> {
    let st = match ask(cfg, serde_json::json!({"cmd": "status"}))? {
        Some(answer) => serde_json::from_value::<Status>(answer)
            .context("the running master target's status")?,
        None => offline_status(cfg)?,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&st).context("encode JSON")?
        );
        return Ok(());
    }
    print!("{}", status_text(&st));
    Ok(())
}

/// The human form of a [`Status`].
fn status_text(st: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if st.running {
        let _ = write!(out, "master target running (live values)");
        if let Some(m) = &st.metrics {
            let _ = write!(out, ", metrics at http://{m}/metrics");
        }
        out.push('\n');
    } else {
        out.push_str("master target not running (read from the files on disk)\n");
    }
    out.push_str("groups:\n");
    for g in &st.groups {
        let peer = match &g.peer {
            Some(p) => format!("peer {} ({})", p.node, p.address),
            None => "no peer".to_string(),
        };
        let newest = match &g.newest_point {
            Some(p) => format!(
                "point {} ({}, {}) at {} (RPO {})",
                p.id,
                p.kind,
                if p.consistent {
                    "consistent"
                } else {
                    "inconsistent"
                },
                p.time,
                age(p.age_ms)
            ),
            None => "no point".to_string(),
        };
        let _ = write!(
            out,
            "  {}: {}, {peer}, durable seq {}, {} points, newest {newest}, journal {} bytes \
             (max {}, retention {})",
            g.id,
            g.state,
            g.durable_seq,
            g.points,
            g.journal_bytes,
            g.journal_bytes_max,
            age(g.retention_ms)
        );
        if let Some(f) = &g.failback {
            let what = match f.state.as_str() {
                "failed-back" => "committed: failed back, not protected",
                "failed-back-uncommitted" => "not committed: the point can still be changed",
                _ => "interrupted or running: rerun the failback",
            };
            let _ = write!(
                out,
                ", failback to point {} ({}; {what})",
                f.point_id, f.point_time
            );
        }
        if let Some(r) = g.receive_bytes_per_s {
            let _ = write!(out, ", receiving {}", human_rate(r));
        }
        for e in &g.exports {
            let _ = write!(
                out,
                ", exporting point {} on {}",
                e.point_id,
                e.listen.as_deref().unwrap_or("(starting)")
            );
        }
        out.push('\n');
        if let Some(w) = &g.journal_warning {
            let _ = writeln!(out, "    WARNING: {w}");
        }
    }
    out.push_str("disks:\n");
    for d in &st.disks {
        let _ = writeln!(
            out,
            "  {} (group {}): {}, {} bytes, replica {}{}",
            d.id,
            d.group,
            d.state,
            d.size_bytes,
            d.path,
            if d.replica_exists { "" } else { " (missing)" }
        );
    }
    out
}

/// A short human age: `42s`, `3m07s`, `5h02m`, `2d03h`.
fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Bytes per second in binary units: `0 B/s`, `12.3 MiB/s`.
fn human_rate(bytes_per_s: f64) -> String {
    const UNITS: [&str; 5] = ["B/s", "KiB/s", "MiB/s", "GiB/s", "TiB/s"];
    let mut v = bytes_per_s.max(0.0);
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Proves the journal warning appears at 80% of the limit, names the points dropped
    /// for space and the newest one's time, and is null otherwise.
    #[test]
    fn journal_warning_levels() {
        assert_eq!(journal_warning(79, 100, None), None);
        assert_eq!(
            journal_warning(79, 100, Some(&RetentionTotals::default())),
            None
        );
        let w = journal_warning(80, 100, None).unwrap();
        assert!(w.contains("80%") && w.contains("journal_bytes_max"), "{w}");
        let t = RetentionTotals {
            space_dropped_points: 3,
            newest_space_dropped_time_unix_ms: Some(1_700_000_000_000),
            ..RetentionTotals::default()
        };
        let w = journal_warning(10, 100, Some(&t)).unwrap();
        assert!(
            w.contains("3 points dropped for space") && w.contains("2023-11-14T22:13:20.000Z"),
            "{w}"
        );
        assert!(
            journal_warning(u64::MAX, 1, Some(&t))
                .unwrap()
                .contains("; ")
        );
    }
}
