//! `failback` and `commit`: the master target's side of [`datapath::failback`].
//!
//! ```text
//! master-target failback --config FILE --group G --point SPEC [--json]
//! master-target commit   --config FILE --group G [--json]
//! ```
//!
//! SPEC ([`PointSpec`]) is `latest`, `latest-processed`, `latest-app`, a point id, or an
//! RFC 3339 time (the newest consistent point at or before it). Only consistent points
//! qualify: a point cut during a resync is refused by id and skipped by the others.
//!
//! **Who does the work.** While `serve` runs it holds the group's lock and journal, so
//! both commands ask it over the control socket ([`crate::control`]); it stops
//! replication of the group (the connection holding the group lets go, later hellos
//! naming it are refused with `NOT_PROTECTED`) and runs the failback on its blocking
//! pool, streaming progress to the command, which waits for the end. When no server
//! runs, the command takes the group's lock ([`crate::store::GroupLock`]) and does the
//! same in-process. Both call [`apply`] (and [`commit_files`], which first writes the
//! change lists of the frames after the point to [`Config::changes_dir`], for a
//! reprotect from change lists). A second failback or
//! commit of a group while one runs is refused: the server knows, and offline the lock
//! is held. So is a failback or commit while a test failover export of the group runs
//! (the failback would rewrite the replicas the export reads; see [`crate::export`]).
//!
//! **`latest`** asks the process server that holds the group (if one does and speaks
//! protocol 2) to cut now (a `CutRequest` frame; see `server`), waits up to
//! [`LATEST_WAIT_MS`] until that cut's point is durable in the journal, and fails back
//! to it: everything the process server held before the request is in it. Without a
//! process server, or without an answer in time, it uses the latest processed point and
//! the summary says so ([`NOT_REACHABLE_NOTE`]).
//!
//! **The summary** names the point (id, RFC 3339 time, kind), the data-loss window
//! (the newest point in the journal minus the point's time: writes the process server
//! still held, newer than any point, are not counted), the bytes applied, the seconds
//! and the disks; `--json` prints it as one object ([`Summary`]). On a terminal a
//! progress bar shows the apply.
//!
//! **The state on disk** lives in `data_dir/<group>/failback/` (see
//! [`datapath::failback`]): the state file and one undo log per disk. `serve` reads it
//! at start and keeps refusing replication for a group that is failing back, failed
//! back or committed; it finishes nothing by itself.
//!
//! **A failpoint for tests.** With `BLOCKREP_FAILPOINT=failback::after_first_record`
//! in its environment, a failback (in-process or in `serve`) goes on until the
//! progress of its first batch is recorded, logs `failpoint failback::after_first_record
//! reached`, and then waits for ever at its next file sync: a test kills it (-9) in
//! the middle of an apply however fast the apply is. Unset, it costs one lookup of
//! the variable per failback.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use datapath::failback::{
    self, Choice, Disk, Failback, FailbackError, FailbackState, ListsOut, Phase, Progress,
};
use datapath::frame::PointKind;
use datapath::journal::Journal;
use datapath::storage::{MappedFile, OpenMode, RealFs, Storage, StorageFile};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{Config, GroupConfig};
use crate::control;
use crate::failpoint::HeldSync;
use crate::store::{self, GroupLock};
use crate::timefmt::{parse_rfc3339, rfc3339_ms};

/// How long `latest` waits for the process server's cut to be durable in the journal.
pub const LATEST_WAIT_MS: u64 = 30_000;
/// What the summary says when `latest` could not reach the process server.
pub const NOT_REACHABLE_NOTE: &str =
    "process server not reachable: used the latest processed point";

/// The point a failback goes to, as the operator names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PointSpec {
    /// Ask the process server to cut and drain first; else the latest processed point.
    Latest,
    /// The newest consistent point in the journal.
    LatestProcessed,
    /// The newest consistent app-consistent point.
    LatestApp,
    /// The point with this id.
    Id(u64),
    /// The newest consistent point at or before this time (ms since 1970, UTC).
    Time(u64),
}

impl PointSpec {
    /// Parses `--point`: a keyword, a point id (digits), or an RFC 3339 time.
    pub fn parse(s: &str) -> anyhow::Result<PointSpec> {
        let t = s.trim();
        Ok(match t {
            "latest" => PointSpec::Latest,
            "latest-processed" => PointSpec::LatestProcessed,
            "latest-app" => PointSpec::LatestApp,
            _ if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => PointSpec::Id(
                t.parse()
                    .map_err(|_| anyhow::anyhow!("--point {s:?}: a point id must be below 2^64"))?,
            ),
            _ if t.len() >= 10 && t.as_bytes()[..4].iter().all(u8::is_ascii_digit) => {
                PointSpec::Time(
                    parse_rfc3339(t)
                        .map_err(|e| anyhow::anyhow!("--point {s:?}: not an RFC 3339 time: {e}"))?,
                )
            }
            _ => bail!(
                "--point {s:?} is not latest, latest-processed, latest-app, a point id or an \
                 RFC 3339 time (such as 2026-11-27T10:00:00Z)"
            ),
        })
    }

    /// The library's choice for every spec but `latest`, which the caller resolves.
    pub fn choice(self) -> Choice {
        match self {
            PointSpec::Latest | PointSpec::LatestProcessed => Choice::LatestProcessed,
            PointSpec::LatestApp => Choice::LatestApp,
            PointSpec::Id(id) => Choice::Id(id),
            PointSpec::Time(t) => Choice::AtOrBefore(t),
        }
    }
}

impl std::fmt::Display for PointSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PointSpec::Latest => write!(f, "latest"),
            PointSpec::LatestProcessed => write!(f, "latest-processed"),
            PointSpec::LatestApp => write!(f, "latest-app"),
            PointSpec::Id(id) => write!(f, "{id}"),
            PointSpec::Time(t) => write!(f, "{}", rfc3339_ms(*t)),
        }
    }
}

/// What a failback did, as the command prints it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub group: String,
    /// The `--point` asked for.
    pub asked: String,
    pub point_id: u64,
    pub point_time: String,
    pub point_time_unix_ms: u64,
    pub point_kind: String,
    /// Something the operator must know (e.g. [`NOT_REACHABLE_NOTE`]).
    pub note: Option<String>,
    /// The group was failed back to this point already: nothing was done.
    pub already: bool,
    /// The point the replicas were at before, when this changed the point.
    pub changed_from: Option<u64>,
    /// An interrupted failback to this point went on after this journal seq.
    pub resumed_after_seq: Option<u64>,
    /// Newest point time in the journal minus the point's time.
    pub data_loss_window_ms: u64,
    /// What the window was measured against.
    pub data_loss_window_basis: String,
    /// Replica bytes written from the journal (data and zeros).
    pub bytes_applied: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    /// Replica bytes re-read and checked against their blake3 before being recorded.
    pub verified_bytes: u64,
    /// Journal bytes read (frames as stored).
    pub journal_bytes: u64,
    pub frames: u64,
    /// Replica bytes written back from the undo logs (a change of point).
    pub reverted_bytes: u64,
    pub seconds: f64,
    /// `bytes_applied` per second, in MB/s (10^6).
    pub apply_mb_per_s: f64,
    pub disks: Vec<String>,
    /// `failed-back-uncommitted`.
    pub state: String,
}

/// What a commit did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommitSummary {
    pub group: String,
    pub point_id: u64,
    pub point_time: String,
    /// It was committed already; this only finished removing leftovers.
    pub already: bool,
    pub journal_files_removed: usize,
    /// `failed-back`: failed back, not protected.
    pub state: String,
    /// Per disk, the change list of the journal frames after the point (the blocks
    /// the other site wrote after it), written before the journal went; for a
    /// reprotect from change lists (process server `initial_sync_changed`).
    pub change_lists: Vec<ChangeListOut>,
}

/// One disk's change list, as a commit reports it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChangeListOut {
    pub disk: String,
    pub path: String,
    pub extents: u64,
    /// 4 KiB blocks it names.
    pub blocks: u64,
}

fn kind_name(k: PointKind) -> &'static str {
    match k {
        PointKind::Crash => "crash",
        PointKind::App => "app",
    }
}

/// The state name `status` shows for a failback phase (see [`crate::metrics::state_name`]).
pub fn phase_state_name(p: Phase) -> &'static str {
    match p {
        Phase::Applying => "failing-back",
        Phase::Applied => "failed-back-uncommitted",
        Phase::Committed => "failed-back",
    }
}

/// The library's failback of group `g` (state and undo logs in its failback dir).
pub fn failback_of(cfg: &Config, g: &GroupConfig) -> anyhow::Result<Failback> {
    let disks = g
        .disks
        .iter()
        .map(|d| Disk {
            id: d.id.clone(),
            replica: d.replica.clone(),
            size_bytes: d.size_bytes,
        })
        .collect();
    let fs: Arc<dyn Storage> = match std::env::var(crate::retention::FAILPOINT_ENV) {
        Ok(v) if v == FAILPOINT_AFTER_FIRST_RECORD => Arc::new(Failpoint::default()),
        _ => Arc::new(RealFs),
    };
    Ok(Failback::new(fs, &cfg.failback_dir(&g.id), &g.id, disks)?)
}

/// The failback's failpoint (tests only; see the module doc).
pub const FAILPOINT_AFTER_FIRST_RECORD: &str = "failback::after_first_record";

/// The real file system, but once the failback state was replaced twice (the start,
/// or a change of point's revert, then the first batch's progress), every file sync
/// waits for ever: the process waits to be killed.
#[derive(Default)]
struct Failpoint {
    state_replaces: Arc<AtomicUsize>,
}

impl Storage for Failpoint {
    fn open(&self, path: &Path, mode: OpenMode) -> std::io::Result<Box<dyn StorageFile>> {
        let replaces = self.state_replaces.clone();
        Ok(Box::new(HeldSync {
            inner: RealFs.open(path, mode)?,
            hold: Box::new(move || replaces.load(Ordering::SeqCst) >= 2),
            what: FAILPOINT_AFTER_FIRST_RECORD,
            file: path.display().to_string(),
        }))
    }
    fn map_mut(&self, path: &Path) -> std::io::Result<Box<dyn MappedFile>> {
        RealFs.map_mut(path)
    }
    fn create_dir_all(&self, path: &Path) -> std::io::Result<()> {
        RealFs.create_dir_all(path)
    }
    fn list_dir(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        RealFs.list_dir(dir)
    }
    fn exists(&self, path: &Path) -> bool {
        RealFs.exists(path)
    }
    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        RealFs.remove_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        RealFs.rename(from, to)?;
        if to.file_name() == Some(std::ffi::OsStr::new(failback::STATE_FILE)) {
            self.state_replaces.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        RealFs.sync_dir(dir)
    }
}

/// The failback state of group `g` on disk (`None`: it replicates).
pub fn load_state(cfg: &Config, group: &str) -> anyhow::Result<Option<FailbackState>> {
    let dir = cfg.failback_dir(group);
    failback::load_state(&RealFs, &dir, group).with_context(|| {
        format!(
            "group {group:?}: read the failback state in {}",
            dir.display()
        )
    })
}

/// Words for an error of the library, with times in RFC 3339.
pub fn explain(e: FailbackError, spec: PointSpec) -> anyhow::Error {
    match (&e, spec) {
        (FailbackError::NoPoint { group, .. }, PointSpec::Time(t)) => anyhow::anyhow!(
            "group {group:?}: no consistent recovery point at or before {} (--point {spec})",
            rfc3339_ms(t)
        ),
        _ => anyhow::Error::new(e),
    }
}

/// Fails group `g` back to the point `spec` names in `journal` (both paths end here).
/// `latest` must already be resolved by the caller: `resolved` is then the point the
/// process server cut, or `None` with `note` set.
#[allow(clippy::too_many_arguments)]
pub fn apply(
    cfg: &Config,
    g: &GroupConfig,
    journal: &Journal,
    spec: PointSpec,
    resolved: Option<u64>,
    note: Option<String>,
    progress: &mut dyn FnMut(&Progress),
) -> anyhow::Result<Summary> {
    let choice = resolved.map_or(spec.choice(), Choice::Id);
    let point = failback::resolve(journal, choice).map_err(|e| explain(e, spec))?;
    let fb = failback_of(cfg, g)?;
    let started = Instant::now();
    let out = fb
        .run(journal, &point, progress)
        .map_err(anyhow::Error::new)
        .with_context(|| {
            format!(
                "failback of group {:?} to point {}",
                g.id, point.record.point_id
            )
        })?;
    let seconds = started.elapsed().as_secs_f64();
    let newest = journal.latest_point().unwrap_or(&point);
    let bytes_applied = out.applied.bytes();
    Ok(Summary {
        group: g.id.clone(),
        asked: spec.to_string(),
        point_id: point.record.point_id,
        point_time: rfc3339_ms(point.record.time_unix_ms),
        point_time_unix_ms: point.record.time_unix_ms,
        point_kind: kind_name(point.record.kind).to_string(),
        note,
        already: out.already,
        changed_from: out.changed_from,
        resumed_after_seq: out.resumed_after_seq,
        data_loss_window_ms: newest
            .record
            .time_unix_ms
            .saturating_sub(point.record.time_unix_ms),
        data_loss_window_basis: format!(
            "the newest point in the journal (point {} at {})",
            newest.record.point_id,
            rfc3339_ms(newest.record.time_unix_ms)
        ),
        bytes_applied,
        data_bytes: out.applied.data_bytes,
        zero_bytes: out.applied.zero_bytes,
        verified_bytes: out.applied.verified_bytes,
        journal_bytes: out.applied.journal_bytes,
        frames: out.applied.frames,
        reverted_bytes: out.reverted_bytes,
        seconds,
        apply_mb_per_s: if seconds > 0.0 {
            bytes_applied as f64 / seconds / 1e6
        } else {
            0.0
        },
        disks: g.disks.iter().map(|d| d.id.clone()).collect(),
        state: phase_state_name(Phase::Applied).to_string(),
    })
}

/// Commits group `g`'s failback: the change lists of the frames after the point are
/// written to [`Config::changes_dir`], then the undo logs and the journal are dropped.
/// The caller holds the group (lock or slot) and has closed its journal. Both the
/// running server and the offline command end here.
pub fn commit_files(cfg: &Config, g: &GroupConfig) -> anyhow::Result<CommitSummary> {
    let fb = failback_of(cfg, g)?;
    let out = ListsOut {
        dir: cfg.changes_dir(&g.id),
        node: cfg.node.clone(),
        journal_cfg: store::journal_config(cfg, &g.id),
        created_unix_ms: crate::timefmt::now_unix_ms(),
    };
    let c = fb
        .commit_with_lists(&cfg.journal_dir(&g.id), &out)
        .map_err(anyhow::Error::new)
        .with_context(|| format!("commit of group {:?}", g.id))?;
    Ok(CommitSummary {
        group: g.id.clone(),
        point_id: c.point.id,
        point_time: rfc3339_ms(c.point.time_unix_ms),
        already: c.already,
        journal_files_removed: c.journal_files_removed,
        state: phase_state_name(Phase::Committed).to_string(),
        change_lists: c
            .lists
            .iter()
            .map(|l| ChangeListOut {
                disk: l.disk.clone(),
                path: l.path.display().to_string(),
                extents: l.extent_count,
                blocks: l.block_count,
            })
            .collect(),
    })
}

/// A progress bar on stderr when it is a terminal; nothing otherwise.
struct Bar(Option<indicatif::ProgressBar>);

impl Bar {
    fn new() -> Self {
        if !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        let pb = indicatif::ProgressBar::new(0);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        pb.set_message("applying");
        Bar(Some(pb))
    }

    fn update(&self, p: &Progress) {
        if let Some(pb) = &self.0 {
            if p.total_bytes == 0 && p.reverted_bytes > 0 {
                pb.set_message(format!("reverting ({} bytes)", p.reverted_bytes));
                return;
            }
            pb.set_message("applying");
            pb.set_length(p.total_bytes);
            pb.set_position(p.done_bytes);
        }
    }

    fn finish(&self) {
        if let Some(pb) = &self.0 {
            pb.finish_and_clear();
        }
    }
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

/// Sends a long request (failback, commit) to the running server, showing its progress
/// lines on `bar`; `None` when no server runs.
fn ask_long(cfg: &Config, req: Value, bar: &Bar) -> anyhow::Result<Option<Value>> {
    let socket = control::socket_path(cfg);
    let answer = control::request_long(&socket, &req, &mut |v| {
        if let Ok(p) = serde_json::from_value::<ProgressOut>(v["progress"].clone()) {
            bar.update(&Progress {
                reverted_bytes: p.reverted_bytes,
                done_bytes: p.done_bytes,
                total_bytes: p.total_bytes,
                done_frames: p.done_frames,
                total_frames: p.total_frames,
            });
        }
    })?;
    let Some(answer) = answer else {
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

/// One progress line of a long control request.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct ProgressOut {
    pub reverted_bytes: u64,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub done_frames: u64,
    pub total_frames: u64,
}

impl From<&Progress> for ProgressOut {
    fn from(p: &Progress) -> Self {
        Self {
            reverted_bytes: p.reverted_bytes,
            done_bytes: p.done_bytes,
            total_bytes: p.total_bytes,
            done_frames: p.done_frames,
            total_frames: p.total_frames,
        }
    }
}

/// Opens the group's journal without creating one where none is.
fn open_journal(cfg: &Config, group: &str) -> anyhow::Result<Journal> {
    let dir = cfg.journal_dir(group);
    if !dir.exists() {
        bail!(
            "group {group:?} has no journal ({} does not exist): nothing was replicated, there \
             is no point to fail back to",
            dir.display()
        );
    }
    let (j, rec) = store::open_journal(cfg, group)?;
    if rec.truncated_bytes > 0 {
        eprintln!(
            "note: group {group:?}: cut a torn tail of {} bytes (frames never acknowledged)",
            rec.truncated_bytes
        );
    }
    Ok(j)
}

/// The failback in this process: no server runs, so nothing replicates the group; its
/// lock keeps a server (or a second command) away meanwhile.
fn offline(cfg: &Config, g: &GroupConfig, spec: PointSpec, bar: &Bar) -> anyhow::Result<Summary> {
    let _lock = GroupLock::acquire(cfg, &g.id).with_context(|| {
        format!(
            "failback of group {:?}: another master-target command (a failback, a commit, \
             or a server starting) holds the group",
            g.id
        )
    })?;
    if let Some(s) = load_state(cfg, &g.id)?
        && s.phase == Phase::Committed
    {
        return Err(FailbackError::Committed {
            group: g.id.clone(),
            point: s.point.id,
        }
        .into());
    }
    let journal = open_journal(cfg, &g.id)?;
    let note = (spec == PointSpec::Latest).then(|| {
        format!("{NOT_REACHABLE_NOTE} (the master target is not running, so no process server is connected)")
    });
    apply(cfg, g, &journal, spec, None, note, &mut |p| bar.update(p))
}

/// `master-target failback`.
pub fn failback_cmd(cfg: &Config, group: &str, point: &str, json: bool) -> anyhow::Result<()> {
    let spec = PointSpec::parse(point)?;
    let g = check_group(cfg, group)?;
    let bar = Bar::new();
    let req = serde_json::json!({"cmd": "failback", "group": group, "point": point});
    let r = match ask_long(cfg, req, &bar) {
        Ok(Some(mut answer)) => serde_json::from_value::<Summary>(answer["summary"].take())
            .context("the running master target's failback summary"),
        Ok(None) => offline(cfg, g, spec, &bar),
        Err(e) => Err(e),
    };
    bar.finish();
    let s = r?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&s).context("encode JSON")?
        );
    } else {
        print!("{}", summary_text(&s));
    }
    Ok(())
}

/// `master-target commit`.
pub fn commit_cmd(cfg: &Config, group: &str, json: bool) -> anyhow::Result<()> {
    let g = check_group(cfg, group)?;
    let bar = Bar(None);
    let req = serde_json::json!({"cmd": "commit", "group": group});
    let c = match ask_long(cfg, req, &bar)? {
        Some(mut answer) => serde_json::from_value::<CommitSummary>(answer["commit"].take())
            .context("the running master target's commit summary")?,
        None => {
            let _lock = GroupLock::acquire(cfg, &g.id).with_context(|| {
                format!(
                    "commit of group {:?}: another master-target command holds the group",
                    g.id
                )
            })?;
            commit_files(cfg, g)?
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&c).context("encode JSON")?
        );
        return Ok(());
    }
    if c.already {
        println!(
            "group {}: already committed at point {} ({}); leftovers removed: failed back, not \
             protected",
            c.group, c.point_id, c.point_time
        );
    } else {
        println!(
            "group {}: committed at point {} ({}): undo logs and journal ({} files) dropped; \
             failed back, not protected (reprotect to replicate again)",
            c.group, c.point_id, c.point_time, c.journal_files_removed
        );
    }
    if c.change_lists.is_empty() {
        println!("  change lists: none found (a reprotect compares every block)");
    } else {
        println!(
            "  change lists of the writes after point {} (for the reprotect's \
             initial_sync_changed):",
            c.point_id
        );
        for l in &c.change_lists {
            println!("    {}: {} ({} blocks of 4 KiB)", l.disk, l.path, l.blocks);
        }
    }
    Ok(())
}

/// The human form of a [`Summary`].
pub fn summary_text(s: &Summary) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if let Some(n) = &s.note {
        let _ = writeln!(out, "note: {n}");
    }
    if s.already {
        let _ = writeln!(
            out,
            "group {}: already failed back to point {} ({}, {}); nothing to do",
            s.group, s.point_id, s.point_kind, s.point_time
        );
        return out;
    }
    let _ = writeln!(
        out,
        "group {}: failed back to point {} ({}, {}), not committed",
        s.group, s.point_id, s.point_kind, s.point_time
    );
    if let Some(from) = s.changed_from {
        let _ = writeln!(
            out,
            "  changed from point {from}: {} bytes reverted through the undo logs",
            s.reverted_bytes
        );
    }
    if let Some(seq) = s.resumed_after_seq {
        let _ = writeln!(
            out,
            "  resumed an interrupted failback after journal seq {seq}"
        );
    }
    let _ = writeln!(
        out,
        "  data-loss window: {:.3} s (to {})",
        s.data_loss_window_ms as f64 / 1000.0,
        s.data_loss_window_basis
    );
    let _ = writeln!(
        out,
        "  applied {} bytes ({} data, {} zeros) from {} frames in {:.2} s ({:.0} MB/s), \
         {} bytes re-read and checked",
        s.bytes_applied,
        s.data_bytes,
        s.zero_bytes,
        s.frames,
        s.seconds,
        s.apply_mb_per_s,
        s.verified_bytes
    );
    let _ = writeln!(out, "  disks: {}", s.disks.join(", "));
    let _ = writeln!(
        out,
        "  next: `master-target commit --group {}` to make it final, or `failback --point \
         OTHER` to change the point",
        s.group
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Proves the point specs parse: keywords, ids, RFC 3339 times with offsets, and
    /// that garbage is refused with the accepted forms named.
    #[test]
    fn point_specs() {
        assert_eq!(PointSpec::parse("latest").unwrap(), PointSpec::Latest);
        assert_eq!(
            PointSpec::parse("latest-processed").unwrap(),
            PointSpec::LatestProcessed
        );
        assert_eq!(
            PointSpec::parse("latest-app").unwrap(),
            PointSpec::LatestApp
        );
        assert_eq!(PointSpec::parse("42").unwrap(), PointSpec::Id(42));
        assert_eq!(PointSpec::parse(" 7 ").unwrap(), PointSpec::Id(7));
        assert_eq!(
            PointSpec::parse("18446744073709551615").unwrap(),
            PointSpec::Id(u64::MAX)
        );
        assert_eq!(
            PointSpec::parse("2023-11-14T22:13:20.123Z").unwrap(),
            PointSpec::Time(1_700_000_000_123)
        );
        assert_eq!(
            PointSpec::parse("2023-11-14T23:13:20.123+01:00").unwrap(),
            PointSpec::Time(1_700_000_000_123)
        );
        assert_eq!(
            PointSpec::parse("2023-11-14T18:13:20.123-04:00").unwrap(),
            PointSpec::Time(1_700_000_000_123)
        );
        for bad in [
            "",
            "   ",
            "Latest",
            "newest",
            "-1",
            "1.5",
            "0x10",
            "18446744073709551616",
            "2023-11-14",
            "2023-11-14T22:13:20",
            "2023-02-30T00:00:00Z",
            "2023-11-14T22:13:20Z junk",
            "latest;rm -rf /",
        ] {
            let e = PointSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains("--point"), "{bad:?}: {e}");
        }
        let e = PointSpec::parse("yesterday").unwrap_err().to_string();
        assert!(
            e.contains("latest-app") && e.contains("RFC 3339"),
            "the accepted forms are named: {e}"
        );
        for s in [
            PointSpec::Latest,
            PointSpec::LatestApp,
            PointSpec::LatestProcessed,
            PointSpec::Id(3),
            PointSpec::Time(1_700_000_000_123),
        ] {
            assert_eq!(PointSpec::parse(&s.to_string()).unwrap(), s);
        }
    }
}
