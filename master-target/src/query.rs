//! `points` and `status`: what the journals on disk hold, for people and scripts.
//!
//! Both take each group's lock (see [`crate::store`]) and so refuse to run while
//! `serve` holds it. Opening a journal may cut a torn tail left by a crash, exactly as
//! `serve` would on its next start; nothing acknowledged is ever cut.

use anyhow::{Context, bail};
use datapath::frame::PointKind;
use datapath::journal::Journal;
use serde::Serialize;

use crate::config::Config;
use crate::store::{self, GroupLock};
use crate::timefmt::{now_unix_ms, rfc3339_ms};

/// One recovery point as `points --json` prints it.
#[derive(Debug, Serialize)]
pub struct PointOut {
    pub id: u64,
    pub time: String,
    pub time_unix_ms: u64,
    pub kind: &'static str,
    pub consistent: bool,
    pub seq: u64,
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

fn points_of(j: Option<&Journal>) -> Vec<PointOut> {
    let Some(j) = j else {
        return Vec::new();
    };
    j.points()
        .iter()
        .map(|p| PointOut {
            id: p.record.point_id,
            time: rfc3339_ms(p.record.time_unix_ms),
            time_unix_ms: p.record.time_unix_ms,
            kind: match p.record.kind {
                PointKind::Crash => "crash",
                PointKind::App => "app",
            },
            consistent: p.record.consistent,
            seq: p.seq,
        })
        .collect()
}

/// `master-target points`: the recovery points of one group, oldest first.
pub fn points(cfg: &Config, group: &str, json: bool) -> anyhow::Result<()> {
    if cfg.group(group).is_none() {
        bail!(
            "group {group:?} is not in config file {} (groups: {})",
            cfg.file.display(),
            cfg.groups
                .iter()
                .map(|g| g.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _lock = GroupLock::acquire(cfg, group)?;
    let j = open_existing(cfg, group)?;
    let pts = points_of(j.as_ref());
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

#[derive(Debug, Serialize)]
struct NewestPoint {
    id: u64,
    time: String,
    time_unix_ms: u64,
    /// Age of the newest point: the recovery point objective right now.
    age_ms: u64,
}

#[derive(Debug, Serialize)]
struct GroupStatus {
    id: String,
    durable_seq: u64,
    base_seq: u64,
    points: usize,
    newest_point: Option<NewestPoint>,
    journal_bytes: u64,
}

#[derive(Debug, Serialize)]
struct DiskStatus {
    id: String,
    group: String,
    replica: String,
    size_bytes: u64,
    replica_exists: bool,
}

#[derive(Debug, Serialize)]
struct Status {
    groups: Vec<GroupStatus>,
    disks: Vec<DiskStatus>,
}

/// `master-target status`: per group and per disk, read from disk.
pub fn status(cfg: &Config, json: bool) -> anyhow::Result<()> {
    let now = now_unix_ms();
    let mut st = Status {
        groups: Vec::new(),
        disks: Vec::new(),
    };
    for g in &cfg.groups {
        let _lock = GroupLock::acquire(cfg, &g.id)?;
        let j = open_existing(cfg, &g.id)?;
        let newest = j
            .as_ref()
            .and_then(|j| j.latest_point())
            .map(|p| NewestPoint {
                id: p.record.point_id,
                time: rfc3339_ms(p.record.time_unix_ms),
                time_unix_ms: p.record.time_unix_ms,
                age_ms: now.saturating_sub(p.record.time_unix_ms),
            });
        st.groups.push(GroupStatus {
            id: g.id.clone(),
            durable_seq: j.as_ref().map_or(0, |j| j.durable_seq()),
            base_seq: j.as_ref().map_or(0, |j| j.base_seq()),
            points: j.as_ref().map_or(0, |j| j.points().len()),
            newest_point: newest,
            journal_bytes: store::dir_bytes(&cfg.journal_dir(&g.id))?,
        });
        for d in &g.disks {
            st.disks.push(DiskStatus {
                id: d.id.clone(),
                group: g.id.clone(),
                replica: d.replica.display().to_string(),
                size_bytes: d.size_bytes,
                replica_exists: d.replica.exists(),
            });
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&st).context("encode JSON")?
        );
        return Ok(());
    }
    println!("groups:");
    for g in &st.groups {
        let newest = match &g.newest_point {
            Some(p) => format!("point {} at {} (age {})", p.id, p.time, age(p.age_ms)),
            None => "no point".to_string(),
        };
        println!(
            "  {}: durable seq {}, {} points, newest {newest}, journal {} bytes",
            g.id, g.durable_seq, g.points, g.journal_bytes
        );
    }
    println!("disks:");
    for d in &st.disks {
        println!(
            "  {} (group {}): {} bytes, replica {}{}",
            d.id,
            d.group,
            d.size_bytes,
            d.replica,
            if d.replica_exists { "" } else { " (missing)" }
        );
    }
    Ok(())
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
