//! `bench`: the end-to-end throughput benchmark, our engine against the tools an
//! operator would otherwise use, on this machine, in one command.
//!
//! Every phase runs the real release binaries on loopback over TLS 1.3 (as the demo:
//! [`blockrep::harness`]) in a directory of its own under one work dir, writes through
//! NBD with [`blockrep::nbd_client`] (pipelined 64 KiB writes, [`WRITE_DEPTH`] in
//! flight), and removes its big files as soon as it ends. MB is 10^6 bytes throughout.
//!
//! | phase | what is timed | peer |
//! |-------|---------------|------|
//! | capture | `--size` of sequential 64 KiB writes and a flush through the process server, while it tracks and ships to a master target (the realistic replication's writes) | the same writes to `qemu-nbd -f raw --cache=writeback` serving the same file |
//! | replication | those writes over the whole disk, realistic and incompressible data, unthrottled: from the first write until the master target acknowledged a point cut after the last (`tag`, then its acknowledgement); wire bytes, CPU seconds per GB and peak RSS of each server | the disk bound: what this machine's disk allows at its bulk speed, since each byte written lands on it three times (backing file, spool record synced at each cut, journal frame synced before the ack): the disk's speed (`--size` written, then synced, when the disk is generated: `disk_write_mb_s`) times `size / (2 size + wire bytes)` |
//! | failback | `master-target failback --json` of the realistic replication's journal onto its blank replica (offline): bytes applied per second, as the command reports them | - |
//! | incremental | the replica equal to the disk (the failed-back one, checked by hash; else a copy), `initial_sync = false`: 5% of the 64 KiB blocks changed at random places through NBD, until durable at the master target | `rsync --inplace --no-whole-file -I` of the same change between two local files (DST the old copy) |
//! | resync | the replica with 5% of its blocks damaged, a fresh process server state: from its start until the hash-diff initial sync is done and a point after it acknowledged | rsync of the same pair |
//! | rpo | 100 MB/s of writes for `--rpo-seconds`, 1 s cuts: every 100 ms the age of the newest acknowledged consistent point (now minus its cut time), p50 and p99 | - |
//! | memory | process server peak RSS (`VmHWM`) with a 1 GiB and a 16 GiB sparse disk under the same writes (at most 512 MiB at random places, at 50 MB/s); the bitmap files' size beside | - |
//!
//! The realistic data is this machine's files under /usr ([`workload::realistic_bytes`])
//! in 64 KiB blocks, one in [`ZERO_ONE_IN`] a zero block; the incompressible data is a
//! seeded random stream. Both are made before any timing starts and written from
//! memory, so the writer costs the same for every server. Each figure goes into the
//! JSON (`--json FILE`) and into a table of ours, the peer, the ratio and the issue's
//! target, ok or MISS (a figure not measured, with `--only`, says "not run"); the
//! JSON's `machine` says where it ran (cpu, cores, memory, kernel, load at the start
//! and the end) and `phase_seconds` how long each phase took.
//!
//! The replication, rpo and memory phases start with blank replicas and
//! `initial_sync = false` (they time the changes, not a first copy). Every phase but
//! memory writes onto one generated disk of `--size` in the work dir, every block
//! allocated, so that both NBD servers overwrite allocated blocks. The phases run in
//! the order of the table, which keeps the disk space low (at the default 4 GiB, at
//! most about 12 GiB: disk, spool and journal of the incompressible replication): the
//! disk lives until the rpo phase ends, the realistic journal until the failback has
//! applied it. `--only capture` and `--only failback` run the realistic replication
//! too; incremental and resync copy the disk when the failback did not run.
//!
//! Run: `cargo run --release --bin bench [-- --size 4G --json FILE --only PHASES --keep DIR]`.
//! rsync and qemu-nbd are installed with apt-get when missing (as root).

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::IsTerminal;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use blockrep::harness::{
    self, Direction, MasterTarget, Options, POLL, ProcessServer, START_TIMEOUT, STOP_TIMEOUT,
    Server, Setup, Usage, WorkDir, fmt_secs, fmt_size, group_status, now_unix_ms, run_ok,
    start_master_target, wait_initial_sync,
};
use blockrep::nbd_client::NbdClient;
use blockrep::workload::{self, Rng};
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value, json};

/// The consistency group of every phase.
const GROUP: &str = "g1";
/// The one disk of every phase (NBD export name).
const DISK: &str = "disk0";
/// The size of every write, and the block of the incremental and resync changes.
const BLOCK_BYTES: u64 = 64 << 10;
/// Writes in flight on the NBD connection, the same for every server.
const WRITE_DEPTH: usize = 16;
/// Writes handed to one pipelined `write_many` (the progress moves between them).
const BATCH_WRITES: usize = 256;
/// Realistic bytes read from /usr once and cut into 64 KiB blocks.
const REALISTIC_POOL_BYTES: usize = 64 << 20;
/// Incompressible bytes generated once; its blocks repeat only this far apart, far
/// beyond any frame, so nothing the engine compresses sees a repeat.
const RANDOM_POOL_BYTES: usize = 64 << 20;
/// One realistic block in this many is a zero block.
const ZERO_ONE_IN: u64 = 10;
/// Share of the 64 KiB blocks changed by the incremental and resync phases.
const CHANGE_PERCENT: u64 = 5;
/// The RPO phase's steady write rate.
const RPO_RATE_BYTES_PER_S: u64 = 100_000_000;
/// How often the RPO phase samples the age of the newest acknowledged point.
const RPO_SAMPLE: Duration = Duration::from_millis(100);
/// The cut interval of every phase.
const CUT_INTERVAL_MS: u64 = 1000;
/// The two disks of the memory phase.
const MEMORY_SMALL_BYTES: u64 = 1 << 30;
const MEMORY_LARGE_BYTES: u64 = 16 << 30;
/// Bytes written in the memory phase (at most; never more than `--size`).
const MEMORY_WRITE_BYTES_MAX: u64 = 512 << 20;
/// The memory phase's write rate, the same for both disks, so that both runs hold
/// epochs of the same size.
const MEMORY_RATE_BYTES_PER_S: u64 = 50_000_000;
/// Spool room beyond what a phase writes, so that it never overflows.
const SPOOL_MARGIN_BYTES: u64 = 256 << 20;
/// Time the master target has to acknowledge a point after the last write.
const ACK_TIMEOUT: Duration = Duration::from_secs(600);
/// Files of a phase bigger than this are its data (disks, spools, journals): removed
/// when the phase ends even with `--keep`.
const BIG_FILE_BYTES: u64 = 1 << 20;
/// The dirty bitmap tracks blocks of this size, one bit each.
const BITMAP_BLOCK_BYTES: u64 = 4096;
const MB: f64 = 1e6;
const GB: f64 = 1e9;

/// A phase of the benchmark, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
enum Phase {
    Capture,
    Replication,
    Failback,
    Incremental,
    Resync,
    Rpo,
    Memory,
}

#[derive(Parser, Debug)]
#[command(
    name = "bench",
    about = "Measures the replication engine end to end on loopback (capture, replication, \
             incremental, resync, RPO, failback apply, memory) against qemu-nbd and rsync, \
             and prints a table against the targets."
)]
struct Args {
    /// Size of the disk and of each replication workload: bytes, or with K, M, G, T
    /// (binary: 4G = 4 GiB); a multiple of 64 KiB, at least 16M.
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    size: u64,
    /// Write every figure (and the machine) to FILE as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Run only these phases (comma-separated): capture, replication, failback,
    /// incremental, resync, rpo, memory. Capture and failback also run the realistic
    /// replication (its writes are capture's, its journal is failback's).
    #[arg(long, value_delimiter = ',', value_name = "PHASES")]
    only: Vec<Phase>,
    /// Work in DIR (created; must be empty if it exists) and keep its configs and logs.
    /// Disk images, spools and journals are removed after each phase all the same.
    #[arg(long, value_name = "DIR")]
    keep: Option<PathBuf>,
    /// Duration of the RPO phase's steady 100 MB/s load.
    #[arg(long, default_value_t = 30.0, value_name = "S")]
    rpo_seconds: f64,
    /// Seed of the data and of the changed places.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// `4G`, `64M`, `512MiB`, `65536`: bytes with a binary unit, as the process server's
/// config reads them, on the 64 KiB grid from 16 MiB to 1 TiB.
fn parse_size(s: &str) -> Result<u64, String> {
    let bytes = process_server::config::parse_size(s)
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 4G, 64M, 512MiB)"))?;
    if bytes < 16 << 20 || bytes % BLOCK_BYTES != 0 || bytes > 1 << 40 {
        return Err(format!(
            "{s:?}: the size must be a multiple of 64 KiB from 16M to 1T"
        ));
    }
    Ok(bytes)
}

fn main() -> ExitCode {
    let args = Args::parse();
    harness::catch_ctrl_c();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) if harness::interrupted() => {
            eprintln!("bench interrupted: its servers stopped");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Checks the options, runs the phases in a work dir and reports. On failure the work
/// dir is kept with its logs and configs (its big files removed) and named.
fn run(args: &Args) -> Result<()> {
    ensure!(
        args.rpo_seconds.is_finite() && args.rpo_seconds >= 1.0 && args.rpo_seconds <= 3600.0,
        "--rpo-seconds must be 1 to 3600"
    );
    let phases: HashSet<Phase> = if args.only.is_empty() {
        Phase::value_variants().iter().copied().collect()
    } else {
        args.only.iter().copied().collect()
    };
    if phases.contains(&Phase::Capture) {
        ensure_tool("qemu-nbd", "qemu-utils")?;
    }
    if phases.contains(&Phase::Incremental) || phases.contains(&Phase::Resync) {
        ensure_tool("rsync", "rsync")?;
    }
    let bin_dir = harness::ensure_server_binaries()?;
    let work = WorkDir::new(args.keep.as_deref(), "blockrep-bench-")?;
    println!(
        "blockrep bench: {} disk, 64 KiB writes ({WRITE_DEPTH} in flight), in {}",
        fmt_size(args.size),
        work.path().display()
    );
    let t = Instant::now();
    let data = Data::new(args.seed);
    println!(
        "  data: {} of /usr's files, {} random ({} ms)",
        fmt_size(data.realistic.len() as u64),
        fmt_size(data.random.len() as u64),
        t.elapsed().as_millis()
    );
    let mut bench = Bench {
        args,
        bin_dir,
        root: work.path().to_path_buf(),
        keep: args.keep.is_some(),
        tty: std::io::stderr().is_terminal(),
        data: &data,
        report: Report::new(args),
    };
    let result = bench.run_phases(&phases);
    let root = bench.root.clone();
    match result {
        Ok(()) => {
            bench.report.machine_end();
            bench.report.print_table();
            if let Some(path) = &args.json {
                let text = serde_json::to_string_pretty(&bench.report.json())
                    .context("encode the JSON")?;
                fs::write(path, text + "\n")
                    .with_context(|| format!("write {}", path.display()))?;
                println!("figures written to {}", path.display());
            }
            if bench.keep {
                println!("kept: {} (configs and logs of every phase)", root.display());
            }
            Ok(())
        }
        Err(e) => {
            let _ = remove_big_files(&root);
            if !harness::interrupted() {
                let dir = work.keep();
                eprintln!(
                    "the work dir {} is kept for a look (configs, logs); remove it when done",
                    dir.display()
                );
            }
            Err(e)
        }
    }
}

/// Makes sure `cmd` is on the PATH; installs `package` with apt-get when it is not and
/// we are root (the benchmark's only install).
fn ensure_tool(cmd: &str, package: &str) -> Result<()> {
    let found = |c: &str| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(c).is_file()))
    };
    if found(cmd) {
        return Ok(());
    }
    let root = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|u| u.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false);
    ensure!(
        root,
        "{cmd} is missing: install it (`apt-get install {package}`) and run again"
    );
    println!("{cmd} is missing: apt-get install {package}");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-qq", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        let _ = Command::new("apt-get")
            .args(["update", "-qq"])
            .stdout(Stdio::null())
            .status();
        ensure!(install(), "apt-get install {package} failed");
    }
    ensure!(
        found(cmd),
        "{package} is installed but {cmd} is not on the PATH"
    );
    Ok(())
}

// ---- data ----

/// What a workload writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// /usr's files, one block in [`ZERO_ONE_IN`] zero.
    Realistic,
    /// A random stream.
    Incompressible,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Realistic => "realistic",
            Self::Incompressible => "incompressible",
        }
    }
}

static ZERO_BLOCK: [u8; BLOCK_BYTES as usize] = [0; BLOCK_BYTES as usize];

/// The bytes every phase writes, made once before anything is timed.
struct Data {
    realistic: Vec<u8>,
    random: Vec<u8>,
}

impl Data {
    fn new(seed: u64) -> Self {
        Self {
            realistic: workload::realistic_bytes(REALISTIC_POOL_BYTES),
            random: workload::random_bytes(RANDOM_POOL_BYTES, seed ^ 0x5eed),
        }
    }

    /// `count` blocks of a `kind` stream: the pool's 64 KiB blocks in order (as files
    /// lie on a disk), for realistic data one in [`ZERO_ONE_IN`] (chosen by `rng`) a
    /// zero block.
    fn stream(&self, kind: Kind, count: u64, rng: &mut Rng) -> Vec<&[u8]> {
        let pool = match kind {
            Kind::Realistic => &self.realistic,
            Kind::Incompressible => &self.random,
        };
        let pool_blocks = pool.len() as u64 / BLOCK_BYTES;
        (0..count)
            .map(|k| {
                if kind == Kind::Realistic && rng.below(ZERO_ONE_IN) == 0 {
                    &ZERO_BLOCK[..]
                } else {
                    let at = ((k % pool_blocks) * BLOCK_BYTES) as usize;
                    &pool[at..at + BLOCK_BYTES as usize]
                }
            })
            .collect()
    }

    /// A realistic 64 KiB block from a random 4 KiB-aligned place of the pool, so
    /// that it differs from the blocks of [`Data::stream`] a disk holds.
    fn changed_block(&self, rng: &mut Rng) -> &[u8] {
        let slots = (self.realistic.len() as u64 - BLOCK_BYTES) / 4096;
        let at = (rng.below(slots) * 4096) as usize;
        &self.realistic[at..at + BLOCK_BYTES as usize]
    }
}

/// `count` distinct block numbers below `blocks`, in random order.
fn random_blocks(rng: &mut Rng, blocks: u64, count: u64) -> Vec<u64> {
    let mut all: Vec<u64> = (0..blocks).collect();
    let count = count.min(blocks) as usize;
    for i in 0..count {
        let j = i + rng.below((all.len() - i) as u64) as usize;
        all.swap(i, j);
    }
    all.truncate(count);
    all
}

/// The writes of `blocks` laid one after the other from offset 0, wrapping around a
/// disk of `disk_bytes`.
fn sequential(blocks: Vec<&[u8]>, disk_bytes: u64) -> Vec<(u64, &[u8])> {
    let disk_blocks = disk_bytes / BLOCK_BYTES;
    blocks
        .into_iter()
        .enumerate()
        .map(|(k, b)| ((k as u64 % disk_blocks) * BLOCK_BYTES, b))
        .collect()
}

fn bytes_of(writes: &[(u64, &[u8])]) -> u64 {
    writes.iter().map(|(_, b)| b.len() as u64).sum()
}

// ---- progress ----

/// What runs now: an indicatif bar on a terminal (stderr), a plain line otherwise.
struct Bar {
    pb: Option<ProgressBar>,
    what: String,
}

impl Bar {
    /// A bar over `total_bytes` (0: a spinner).
    fn new(tty: bool, what: String, total_bytes: u64) -> Self {
        if !tty {
            println!("  {what} ...");
            return Self { pb: None, what };
        }
        let pb = if total_bytes > 0 {
            let pb = ProgressBar::new(total_bytes);
            pb.set_style(
                ProgressStyle::with_template(
                    "  {msg} [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            pb
        } else {
            let pb = ProgressBar::new_spinner();
            pb.set_style(
                ProgressStyle::with_template("  {msg} {spinner} {elapsed}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            pb
        };
        pb.set_message(what.clone());
        pb.enable_steady_tick(Duration::from_millis(200));
        Self { pb: Some(pb), what }
    }

    fn set(&self, done_bytes: u64) {
        if let Some(pb) = &self.pb {
            pb.set_position(done_bytes);
        }
    }

    /// Ends the bar with a line saying what came out.
    fn done(self, result: &str) {
        if let Some(pb) = &self.pb {
            pb.finish_and_clear();
        }
        println!("  {}: {result}", self.what);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(pb) = &self.pb {
            pb.finish_and_clear();
        }
    }
}

// ---- the figures ----

/// The figures the issue asks for by name: always in the JSON (null when their phase
/// did not run).
const KEYS: [&str; 14] = [
    "capture_mb_s",
    "qemu_nbd_capture_mb_s",
    "replication_realistic_mb_s",
    "replication_incompressible_mb_s",
    "compression_ratio",
    "incremental_s",
    "rsync_incremental_s",
    "resync_s",
    "rsync_resync_s",
    "rpo_p50_ms",
    "rpo_p99_ms",
    "apply_mb_s",
    "ps_rss_1g_bytes",
    "ps_rss_16g_bytes",
];

/// Every figure of the run, in the JSON's order.
struct Report {
    figures: Map<String, Value>,
    machine: Map<String, Value>,
    /// Wall time of each phase (and `total`).
    phase_seconds: Map<String, Value>,
}

impl Report {
    fn new(args: &Args) -> Self {
        let mut figures = Map::new();
        figures.insert("size_bytes".into(), args.size.into());
        figures.insert("rpo_seconds".into(), args.rpo_seconds.into());
        figures.insert("write_bytes".into(), BLOCK_BYTES.into());
        figures.insert("write_depth".into(), (WRITE_DEPTH as u64).into());
        for k in KEYS {
            figures.insert(k.into(), Value::Null);
        }
        Self {
            figures,
            machine: machine(),
            phase_seconds: Map::new(),
        }
    }

    fn set(&mut self, key: &str, v: impl Into<Value>) {
        self.figures.insert(key.into(), v.into());
    }

    fn num(&self, key: &str) -> Option<f64> {
        self.figures.get(key).and_then(Value::as_f64)
    }

    fn machine_end(&mut self) {
        self.machine.insert("loadavg_end".into(), loadavg().into());
    }

    fn json(&self) -> Value {
        let mut all = self.figures.clone();
        all.insert("machine".into(), Value::Object(self.machine.clone()));
        all.insert(
            "phase_seconds".into(),
            Value::Object(self.phase_seconds.clone()),
        );
        all.insert(
            "targets".into(),
            self.rows()
                .iter()
                .map(|r| {
                    json!({
                        "figure": r.figure,
                        "ours": r.ours,
                        "peer": r.peer,
                        "ratio": r.ratio,
                        "target": r.target,
                        "ok": r.ok,
                    })
                })
                .collect(),
        );
        Value::Object(all)
    }

    /// The table's rows: each target of the issue with ours, the peer, the ratio.
    fn rows(&self) -> Vec<Row> {
        let n = |k: &str| self.num(k);
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        let at_least = |v: Option<f64>, min: f64| v.map(|v| v >= min);
        let at_most = |v: Option<f64>, max: f64| v.map(|v| v <= max);
        let capture = ratio(n("capture_mb_s"), n("qemu_nbd_capture_mb_s"));
        let incremental = ratio(n("rsync_incremental_s"), n("incremental_s"));
        let resync = ratio(n("rsync_resync_s"), n("resync_s"));
        let rss = ratio(
            self.rss_less_bitmap("ps_rss_16g_bytes", "ps_bitmap_16g_bytes"),
            self.rss_less_bitmap("ps_rss_1g_bytes", "ps_bitmap_1g_bytes"),
        );
        let mib = |k: &str| n(k).map(|v| v / (1u64 << 20) as f64);
        vec![
            Row::new("NBD capture, MB/s", n("capture_mb_s"))
                .peer("qemu-nbd", n("qemu_nbd_capture_mb_s"))
                .ratio(capture, ">= 0.85x qemu-nbd", at_least(capture, 0.85)),
            Row::new(
                "replication, realistic, MB/s",
                n("replication_realistic_mb_s"),
            )
            .peer("disk bound", n("replication_realistic_disk_bound_mb_s"))
            .ratio(
                ratio(
                    n("replication_realistic_mb_s"),
                    n("replication_realistic_disk_bound_mb_s"),
                ),
                ">= 400 MB/s",
                at_least(n("replication_realistic_mb_s"), 400.0),
            ),
            Row::new(
                "replication, incompressible, MB/s",
                n("replication_incompressible_mb_s"),
            )
            .peer(
                "disk bound",
                n("replication_incompressible_disk_bound_mb_s"),
            )
            .ratio(
                ratio(
                    n("replication_incompressible_mb_s"),
                    n("replication_incompressible_disk_bound_mb_s"),
                ),
                ">= 850 MB/s",
                at_least(n("replication_incompressible_mb_s"), 850.0),
            ),
            Row::new("compression ratio, realistic", n("compression_ratio")),
            Row::new("incremental 5%, s", n("incremental_s"))
                .peer("rsync", n("rsync_incremental_s"))
                .ratio(
                    incremental,
                    ">= 10x faster than rsync",
                    at_least(incremental, 10.0),
                ),
            Row::new("hash-diff resync 5%, s", n("resync_s"))
                .peer("rsync", n("rsync_resync_s"))
                .ratio(resync, ">= 3x faster than rsync", at_least(resync, 3.0)),
            Row::new("RPO p50 at 100 MB/s, ms", n("rpo_p50_ms")),
            Row::new("RPO p99 at 100 MB/s, ms", n("rpo_p99_ms"))
                .target("<= 2000 ms", at_most(n("rpo_p99_ms"), 2000.0)),
            Row::new("failback apply, MB/s", n("apply_mb_s"))
                .target(">= 800 MB/s", at_least(n("apply_mb_s"), 800.0)),
            Row::new(
                "process server RSS, 1 GiB disk, MiB",
                mib("ps_rss_1g_bytes"),
            ),
            Row::new(
                "process server RSS, 16 GiB disk, MiB",
                mib("ps_rss_16g_bytes"),
            )
            .ratio(rss, "<= 1.10x of 1 GiB's, bitmap aside", at_most(rss, 1.10)),
        ]
    }

    fn rss_less_bitmap(&self, rss: &str, bitmap: &str) -> Option<f64> {
        Some(self.num(rss)? - self.num(bitmap).unwrap_or(0.0))
    }

    fn print_table(&self) {
        let rows = self.rows();
        println!();
        println!(
            "{:<38} {:>8} {:>16} {:>7}  {:<36} result",
            "figure", "ours", "peer", "ratio", "target"
        );
        for r in &rows {
            let peer = match r.peer {
                Some(v) => format!("{} {}", r.peer_name, cell(Some(v))),
                None => "-".into(),
            };
            println!(
                "{:<38} {:>8} {:>16} {:>7}  {:<36} {}",
                r.figure,
                cell(r.ours),
                peer,
                r.ratio.map_or("-".into(), |x| format!("{x:.2}x")),
                r.target,
                match (r.ok, r.measured) {
                    (Some(true), _) => "ok",
                    (Some(false), _) => "MISS",
                    (None, true) => "not run",
                    (None, false) => "",
                }
            );
        }
        println!();
        let f = |k: &str| self.num(k).map_or("-".into(), |v| format!("{v:.2}"));
        let m = |k: &str| {
            self.num(k)
                .map_or("-".into(), |v| fmt_size(v as u64).to_string())
        };
        for kind in ["realistic", "incompressible"] {
            let p = format!("replication_{kind}");
            println!(
                "replication, {kind}: CPU s/GB process server {}, master target {}; peak RSS {} / {}; {} on the wire",
                f(&format!("{p}_ps_cpu_s_per_gb")),
                f(&format!("{p}_mt_cpu_s_per_gb")),
                m(&format!("{p}_ps_peak_rss_bytes")),
                m(&format!("{p}_mt_peak_rss_bytes")),
                m(&format!("{p}_wire_bytes")),
            );
        }
        println!(
            "RPO load: {} MB/s written of the 100 MB/s asked; bitmaps: {} (1 GiB disk), {} (16 GiB disk)",
            self.num("rpo_write_mb_s")
                .map_or("-".into(), |v| format!("{v:.0}")),
            m("ps_bitmap_1g_bytes"),
            m("ps_bitmap_16g_bytes")
        );
        let s = |k: &str| match self.machine.get(k) {
            Some(Value::String(v)) => v.clone(),
            Some(v) => v.to_string(),
            None => "?".into(),
        };
        println!(
            "machine: {}, {} cores, {} memory, kernel {}, load {} at the start, {} at the end",
            s("cpu"),
            s("cores"),
            self.machine
                .get("memory_bytes")
                .and_then(Value::as_u64)
                .map_or("?".into(), fmt_size),
            s("kernel"),
            s("loadavg_start"),
            s("loadavg_end")
        );
    }
}

/// A figure for the table: no decimals from 100 up, one from 10, two below.
fn cell(v: Option<f64>) -> String {
    match v {
        None => "-".to_string(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

/// One line of the table.
struct Row {
    figure: &'static str,
    ours: Option<f64>,
    peer_name: &'static str,
    peer: Option<f64>,
    ratio: Option<f64>,
    target: &'static str,
    /// Whether the target holds; `None` when the figure was not measured.
    ok: Option<bool>,
    /// The row has a target.
    measured: bool,
}

impl Row {
    fn new(figure: &'static str, ours: Option<f64>) -> Self {
        Self {
            figure,
            ours,
            peer_name: "",
            peer: None,
            ratio: None,
            target: "-",
            ok: None,
            measured: false,
        }
    }

    fn peer(mut self, name: &'static str, v: Option<f64>) -> Self {
        self.peer_name = name;
        self.peer = v;
        self
    }

    fn ratio(mut self, ratio: Option<f64>, target: &'static str, ok: Option<bool>) -> Self {
        self.ratio = ratio;
        self.target(target, ok)
    }

    fn target(mut self, target: &'static str, ok: Option<bool>) -> Self {
        self.target = target;
        self.ok = ok;
        self.measured = true;
        self
    }
}

/// The machine: cpu model, cores, memory, kernel, load average now.
fn machine() -> Map<String, Value> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown".to_string(), |(_, m)| m.trim().to_string());
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or("unknown".to_string(), |k| k.trim().to_string());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get() as u64);
    let mut m = Map::new();
    m.insert("cpu".into(), cpu.into());
    m.insert("cores".into(), cores.into());
    m.insert("memory_bytes".into(), memory.into());
    m.insert("kernel".into(), kernel.into());
    m.insert("loadavg_start".into(), loadavg().into());
    m
}

/// The 1-minute load average (other work on the machine shows here).
fn loadavg() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

// ---- phases ----

/// A phase's pair whose disk is the work dir's generated one (`../disk0.img`) and whose
/// replica lives in the phase dir.
const SHARED_DISK: Direction = Direction {
    mt_config: "mt.toml",
    mt_data: "mt-data",
    mt_node: "mt-bench",
    mt_log: "mt.log",
    ps_config: "ps.toml",
    ps_state: "ps-state",
    ps_log: "ps.log",
    ps_node: "ps1",
    disk_prefix: "../",
    replica_prefix: "replica-",
};

/// The realistic replication's phase dir: its journal stays for the failback.
const REALISTIC_DIR: &str = "replication-realistic";

/// A phase's pair with a disk of its own in the phase dir (the memory phase's sparse
/// disks).
const OWN_DISK: Direction = Direction {
    disk_prefix: "",
    ..SHARED_DISK
};

/// Both servers of a phase, running.
struct Pair {
    mt: MasterTarget,
    ps: ProcessServer,
}

impl Pair {
    /// Certificates, both servers, and a shipper connected to the master target.
    fn start(bin_dir: &Path, s: &Setup<'_>) -> Result<Self> {
        harness::make_certs(bin_dir, s.dir, &[s.direction.ps_node])?;
        let (configs, mt) = start_master_target(bin_dir, s)?;
        let mut ps = ProcessServer::start(bin_dir, s, &configs)?;
        ps.wait_connected(START_TIMEOUT)?;
        Ok(Self { mt, ps })
    }

    /// An NBD connection to the process server's disk.
    fn connect(&self) -> Result<NbdClient> {
        NbdClient::connect(self.ps.nbd_addr, DISK).with_context(|| {
            format!(
                "connect to the process server's NBD export {DISK} at {} (log {})",
                self.ps.nbd_addr,
                self.ps.server.log.display()
            )
        })
    }

    /// The group's wire bytes and the group's state (`bitmap-only` after an overflow).
    fn shipped(&self) -> Result<(u64, String)> {
        let st = self.ps.status()?;
        let g = group_status(&st, GROUP)?;
        Ok((
            g["shipped_bytes"].as_u64().unwrap_or(0),
            g["state"].as_str().unwrap_or("?").to_string(),
        ))
    }

    /// Cuts a point now and waits for its acknowledgement: everything written before
    /// is durable at the master target.
    fn durable_now(&mut self) -> Result<()> {
        let tag = self.ps.tag(false)?;
        ensure!(
            tag.consistent,
            "point {} is not consistent: the group is resyncing (spool overflow?); the \
             process server's log: {}",
            tag.id,
            self.ps.server.log.display()
        );
        self.ps.wait_ack_through(tag.id, ACK_TIMEOUT)?;
        Ok(())
    }

    fn stop(self) -> Result<()> {
        self.ps.server.stop(STOP_TIMEOUT)?;
        self.mt.server.stop(STOP_TIMEOUT)
    }
}

/// The run: the work dir, the data, the figures.
struct Bench<'a> {
    args: &'a Args,
    bin_dir: PathBuf,
    root: PathBuf,
    keep: bool,
    tty: bool,
    data: &'a Data,
    report: Report,
}

impl Bench<'_> {
    /// Runs the chosen phases in an order that keeps the disk space low (see the module
    /// doc). The capture phase's process server figure is the realistic replication's
    /// write time (the same writes, the full path running), so that 4 GiB are not
    /// written through it twice; the failback's replica, which then equals the disk,
    /// is the incremental phase's in-sync copy.
    fn run_phases(&mut self, phases: &HashSet<Phase>) -> Result<()> {
        let t = Instant::now();
        let on = |p| phases.contains(&p);
        if phases.iter().any(|&p| p != Phase::Memory) {
            self.timed("disk", |b| b.generate_disk())?;
        }
        if on(Phase::Capture) {
            self.timed("capture", |b| b.qemu_capture())?;
        }
        if on(Phase::Replication) {
            self.timed("replication-incompressible", |b| {
                b.replication(Kind::Incompressible, false)
            })?;
        }
        let mut replica = None;
        if on(Phase::Replication) || on(Phase::Capture) || on(Phase::Failback) {
            let capture = on(Phase::Capture);
            self.timed("replication-realistic", |b| {
                b.replication(Kind::Realistic, capture)
            })?;
            if on(Phase::Failback) {
                replica = Some(self.timed("failback", |b| b.failback())?);
            }
            if let Some(r) = replica.take()
                && (on(Phase::Incremental) || on(Phase::Resync))
            {
                let kept = self.root.join(SHARED_DISK.replica_file(DISK));
                fs::rename(&r, &kept).context("keep the failed-back replica")?;
                replica = Some(kept);
            }
            self.end_phase(&self.root.join(REALISTIC_DIR))?;
        }
        if on(Phase::Incremental) || on(Phase::Resync) {
            self.timed("incremental+resync", |b| {
                b.incremental_and_resync(
                    replica.as_deref(),
                    on(Phase::Incremental),
                    on(Phase::Resync),
                )
            })?;
        }
        if on(Phase::Rpo) {
            self.timed("rpo", |b| b.rpo())?;
        }
        let _ = fs::remove_file(self.disk_path());
        if on(Phase::Memory) {
            self.timed("memory", |b| b.memory())?;
        }
        let total = t.elapsed().as_secs_f64();
        println!("  all phases done in {total:.0} s");
        self.report
            .phase_seconds
            .insert("total".into(), total.into());
        Ok(())
    }

    /// Runs one phase and records its wall time.
    fn timed<T>(&mut self, name: &str, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let t = Instant::now();
        let out = f(self)?;
        self.report
            .phase_seconds
            .insert(name.into(), t.elapsed().as_secs_f64().into());
        Ok(out)
    }

    fn disk_path(&self) -> PathBuf {
        self.root.join(format!("{DISK}.img"))
    }

    fn bar(&self, what: String, total_bytes: u64) -> Bar {
        Bar::new(self.tty, what, total_bytes)
    }

    /// A new phase directory under the work dir.
    fn phase_dir(&self, name: &str) -> Result<PathBuf> {
        harness::check_interrupt()?;
        println!("{name}");
        let dir = self.root.join(name);
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(dir)
    }

    /// Ends a phase: its big files go at once; the rest too unless `--keep`.
    fn end_phase(&self, dir: &Path) -> Result<()> {
        if self.keep {
            remove_big_files(dir)
        } else {
            fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))
        }
    }

    fn setup<'s>(&self, dir: &'s Path, direction: &'s Direction, disk_bytes: u64) -> Setup<'s> {
        Setup {
            dir,
            direction,
            group: GROUP,
            disks: &[DISK],
            disk_bytes,
            options: Options {
                cut_interval_ms: CUT_INTERVAL_MS,
                spool_bytes_max: None,
                initial_sync: false,
                hooks: false,
            },
        }
    }

    /// The work dir's disk: `--size` of realistic data, every block written (zero
    /// blocks too), so that both NBD servers overwrite allocated blocks, and synced.
    fn generate_disk(&mut self) -> Result<()> {
        let size = self.args.size;
        let path = self.disk_path();
        let bar = self.bar(format!("generating the disk {DISK}.img"), size);
        let mut rng = Rng::new(self.args.seed);
        let blocks = self
            .data
            .stream(Kind::Realistic, size / BLOCK_BYTES, &mut rng);
        let f = File::create(&path).with_context(|| format!("create {}", path.display()))?;
        let t = Instant::now();
        for (k, b) in blocks.iter().enumerate() {
            let at = k as u64 * BLOCK_BYTES;
            f.write_all_at(b, at)
                .with_context(|| format!("write {}", path.display()))?;
            if k % BATCH_WRITES == 0 {
                harness::check_interrupt()?;
                bar.set(at);
            }
        }
        f.sync_all()
            .with_context(|| format!("sync {}", path.display()))?;
        let took = t.elapsed();
        bar.done(&format!(
            "{}, written and synced in {}: {:.0} MB/s",
            fmt_size(size),
            fmt_secs(ms(took)),
            mb_s(size, took)
        ));
        self.report.set("disk_write_mb_s", mb_s(size, took));
        Ok(())
    }

    /// The writes of the capture and replication phases: `--size` of sequential
    /// 64 KiB writes of `kind` data, the same for every server.
    fn sequential_writes(&self, kind: Kind) -> Vec<(u64, &[u8])> {
        let size = self.args.size;
        let mut rng = Rng::new(self.args.seed ^ 2);
        sequential(self.data.stream(kind, size / BLOCK_BYTES, &mut rng), size)
    }

    /// Phase 1, the peer's half: the realistic replication's writes through qemu-nbd
    /// serving the disk, ended by a flush. (Ours is that replication's write time.)
    fn qemu_capture(&mut self) -> Result<()> {
        let dir = self.phase_dir("capture")?;
        let size = self.args.size;
        let writes = self.sequential_writes(Kind::Realistic);
        let qemu = QemuNbd::start(&dir, &self.disk_path())?;
        let mut client = qemu.connect()?;
        let bar = self.bar("qemu-nbd".into(), size);
        let took = write_through(&mut client, &writes, &bar)
            .with_context(|| format!("writes to qemu-nbd (log {})", qemu.server.log.display()))?;
        let peer = mb_s(size, took);
        bar.done(&format!("{peer:.0} MB/s ({})", fmt_secs(ms(took))));
        client.disconnect().context("disconnect from qemu-nbd")?;
        qemu.server.stop(STOP_TIMEOUT)?;
        self.report.set("qemu_nbd_capture_mb_s", peer);
        self.report.set("capture_bytes", size);
        self.end_phase(&dir)
    }

    /// Phases 3 and 4 (they share the replica): a replica equal to the disk (the
    /// failback's `replica`, else a copy), 5% of the blocks changed through NBD and
    /// timed until durable, rsync of the same change; then 5% of the replica's blocks
    /// damaged, a fresh process server's hash-diff initial sync timed, rsync of the
    /// same pair.
    fn incremental_and_resync(
        &mut self,
        replica: Option<&Path>,
        incremental: bool,
        resync: bool,
    ) -> Result<()> {
        let dir = self.phase_dir("incremental")?;
        let in_sync = dir.join(SHARED_DISK.replica_file(DISK));
        match replica {
            Some(r) => {
                let bar = self.bar(
                    "checking that the failed-back replica equals the disk".into(),
                    0,
                );
                ensure!(
                    hash(r)? == hash(&self.disk_path())?,
                    "the failed-back replica {} differs from the disk",
                    r.display()
                );
                fs::rename(r, &in_sync).context("move the failed-back replica")?;
                bar.done("yes (blake3 of every 64 KiB block)");
            }
            None => {
                let bar = self.bar("copying the disk as the replica".into(), 0);
                fs::copy(self.disk_path(), &in_sync).context("copy the disk as the replica")?;
                File::open(&in_sync)
                    .and_then(|f| f.sync_all())
                    .context("sync the replica")?;
                bar.done(&fmt_size(self.args.size));
            }
        }
        if incremental {
            self.incremental(&dir)?;
        }
        if resync {
            let resync_dir = self.phase_dir("resync")?;
            let moved = resync_dir.join(SHARED_DISK.replica_file(DISK));
            fs::rename(&in_sync, &moved).context("move the replica to the resync phase")?;
            self.resync(&resync_dir)?;
            self.end_phase(&resync_dir)?;
        }
        self.end_phase(&dir)
    }

    /// The changes of the incremental and resync phases: [`CHANGE_PERCENT`] of the
    /// disk's blocks at random places.
    fn changed_blocks(&self, salt: u64) -> Vec<u64> {
        let blocks = self.args.size / BLOCK_BYTES;
        let count = (blocks * CHANGE_PERCENT / 100).max(1);
        random_blocks(&mut Rng::new(self.args.seed ^ salt), blocks, count)
    }

    /// Phase 3 in `dir`, whose replica equals the disk.
    fn incremental(&mut self, dir: &Path) -> Result<()> {
        let size = self.args.size;
        let mut rng = Rng::new(self.args.seed ^ 3);
        let changed = self.changed_blocks(3);
        let data = self.data;
        let writes: Vec<(u64, &[u8])> = changed
            .iter()
            .map(|&b| (b * BLOCK_BYTES, data.changed_block(&mut rng)))
            .collect();
        let bytes = bytes_of(&writes);
        let s = self.setup(dir, &SHARED_DISK, size);
        let mut pair = Pair::start(&self.bin_dir, &s)?;
        let mut client = pair.connect()?;
        let bar = self.bar(
            format!(
                "ours: {} blocks changed ({})",
                writes.len(),
                fmt_size(bytes)
            ),
            bytes,
        );
        let t = Instant::now();
        write_through(&mut client, &writes, &bar).context("the incremental writes")?;
        pair.durable_now()?;
        let ours = t.elapsed();
        bar.done(&format!(
            "durable at the master target in {}",
            fmt_secs(ms(ours))
        ));
        client.disconnect().context("disconnect")?;
        pair.stop()?;

        let replica = dir.join(SHARED_DISK.replica_file(DISK));
        let peer = self.rsync("rsync of the same change", &self.disk_path(), &replica)?;
        self.report.set("incremental_s", ours.as_secs_f64());
        self.report.set("rsync_incremental_s", peer.as_secs_f64());
        self.report.set("incremental_changed_bytes", bytes);
        remove_big_files(&dir.join(SHARED_DISK.mt_data))?;
        remove_big_files(&dir.join(SHARED_DISK.ps_state))
    }

    /// Phase 4 in `dir`, whose replica equals the disk: damages 5% of the replica's
    /// blocks, then times a fresh process server's hash-diff initial sync and rsync.
    fn resync(&mut self, dir: &Path) -> Result<()> {
        let size = self.args.size;
        let replica = dir.join(SHARED_DISK.replica_file(DISK));
        let changed = self.changed_blocks(4);
        {
            let f = OpenOptions::new()
                .write(true)
                .open(&replica)
                .with_context(|| format!("open {}", replica.display()))?;
            let mut rng = Rng::new(self.args.seed ^ 4);
            let mut block = vec![0u8; BLOCK_BYTES as usize];
            for &b in &changed {
                rng.fill(&mut block);
                f.write_all_at(&block, b * BLOCK_BYTES)
                    .with_context(|| format!("write {}", replica.display()))?;
            }
            f.sync_all()
                .with_context(|| format!("sync {}", replica.display()))?;
        }
        let mut s = self.setup(dir, &SHARED_DISK, size);
        s.options.initial_sync = true;
        harness::make_certs(&self.bin_dir, dir, &[SHARED_DISK.ps_node])?;
        let (configs, mt) = start_master_target(&self.bin_dir, &s)?;
        let bar = self.bar(
            format!(
                "ours: hash-diff initial sync, {} of {} blocks differ",
                changed.len(),
                size / BLOCK_BYTES
            ),
            size,
        );
        let start_ms = now_unix_ms();
        let t = Instant::now();
        let mut ps = ProcessServer::start(&self.bin_dir, &s, &configs)?;
        wait_initial_sync(&mut ps, "hash-diff resync", size, start_ms, &mut |p| {
            bar.set(p.done_bytes)
        })?;
        let ours = t.elapsed();
        let st = ps.status()?;
        let disk = st["disks"]
            .as_array()
            .and_then(|ds| ds.iter().find(|d| d["id"] == DISK))
            .context("process-server status lists no disk")?;
        let compared = disk["resync_compared_blocks"].as_u64().unwrap_or(0);
        let sent = disk["resync_sent_blocks"].as_u64().unwrap_or(0);
        bar.done(&format!(
            "{} ({compared} blocks compared, {sent} sent)",
            fmt_secs(ms(ours))
        ));
        ensure!(
            compared > 0,
            "the resync compared no block: it was not a hash-diff initial sync; the \
             process server's log: {}",
            ps.server.log.display()
        );
        ps.server.stop(STOP_TIMEOUT)?;
        mt.server.stop(STOP_TIMEOUT)?;

        let peer = self.rsync("rsync of the same pair", &self.disk_path(), &replica)?;
        self.report.set("resync_s", ours.as_secs_f64());
        self.report.set("rsync_resync_s", peer.as_secs_f64());
        self.report.set("resync_blocks_compared", compared);
        self.report.set("resync_blocks_sent", sent);
        Ok(())
    }

    /// `rsync --inplace --no-whole-file -I src dst`, timed.
    fn rsync(&self, what: &str, src: &Path, dst: &Path) -> Result<Duration> {
        let bar = self.bar(format!("peer: {what}"), 0);
        let t = Instant::now();
        run_ok(
            Command::new("rsync")
                .args(["--inplace", "--no-whole-file", "-I"])
                .arg(src)
                .arg(dst),
            "rsync --inplace --no-whole-file -I",
        )?;
        let took = t.elapsed();
        bar.done(&fmt_secs(ms(took)));
        Ok(took)
    }

    /// Phase 5: a steady 100 MB/s of writes for `--rpo-seconds` while the age of the
    /// newest acknowledged point is sampled every 100 ms.
    fn rpo(&mut self) -> Result<()> {
        let dir = self.phase_dir("rpo")?;
        let size = self.args.size;
        let secs = self.args.rpo_seconds;
        let total = (RPO_RATE_BYTES_PER_S as f64 * secs) as u64 / BLOCK_BYTES * BLOCK_BYTES;
        let mut rng = Rng::new(self.args.seed ^ 5);
        let blocks = self
            .data
            .stream(Kind::Realistic, total / BLOCK_BYTES, &mut rng);
        let writes = sequential(blocks, size);
        let mut s = self.setup(&dir, &SHARED_DISK, size);
        s.options.spool_bytes_max = Some(spool_for(total));
        let mut pair = Pair::start(&self.bin_dir, &s)?;
        // A point acknowledged before the load, so that every sample has one.
        pair.durable_now()?;
        let mut client = pair.connect()?;
        let bar = self.bar(format!("{secs} s at 100 MB/s, 1 s cuts"), total);
        let stop = AtomicBool::new(false);
        let start = Instant::now();
        let (written, samples) = std::thread::scope(|scope| -> Result<(u64, Vec<u64>)> {
            let writer = scope.spawn(|| {
                paced_writes(
                    &mut client,
                    &writes,
                    start,
                    RPO_RATE_BYTES_PER_S,
                    &stop,
                    &|_| {},
                )
            });
            let samples = sample_rpo(&mut pair.ps, start, secs, &bar);
            stop.store(true, Ordering::SeqCst);
            let written = writer
                .join()
                .map_err(|_| anyhow::anyhow!("the RPO writer panicked"))??;
            Ok((written, samples?))
        })?;
        let write_s = start.elapsed().as_secs_f64();
        let mut sorted = samples.clone();
        sorted.sort_unstable();
        let (p50, p99) = (percentile(&sorted, 50.0), percentile(&sorted, 99.0));
        let max = sorted.last().copied().unwrap_or(0);
        let (_, state) = pair.shipped()?;
        ensure!(
            state == "replicating",
            "the process server is {state} after the RPO phase (spool overflow?); its log: {}",
            pair.ps.server.log.display()
        );
        bar.done(&format!(
            "p50 {p50} ms, p99 {p99} ms, max {max} ms over {} samples; {:.0} MB/s written",
            sorted.len(),
            written as f64 / MB / write_s
        ));
        client.disconnect().context("disconnect")?;
        pair.stop()?;
        self.report.set("rpo_p50_ms", p50);
        self.report.set("rpo_p99_ms", p99);
        self.report.set("rpo_max_ms", max);
        self.report.set("rpo_samples", sorted.len() as u64);
        self.report
            .set("rpo_write_mb_s", written as f64 / MB / write_s);
        self.end_phase(&dir)
    }

    /// Phase 2 for one kind of data: `--size` of sequential writes over the whole
    /// disk, unthrottled, until a point after the last is acknowledged. With
    /// `capture`, the time of the writes and their flush is the capture phase's figure.
    /// The realistic run's dir (its journal) stays for the failback.
    fn replication(&mut self, kind: Kind, capture: bool) -> Result<()> {
        let name = format!("replication-{}", kind.name());
        let dir = self.phase_dir(&name)?;
        let size = self.args.size;
        let writes = self.sequential_writes(kind);
        let mut s = self.setup(&dir, &SHARED_DISK, size);
        s.options.spool_bytes_max = Some(spool_for(size));
        let mut pair = Pair::start(&self.bin_dir, &s)?;
        let mut client = pair.connect()?;
        let (wire0, _) = pair.shipped()?;
        let ps0 = pair.ps.server.usage()?;
        let mt0 = pair.mt.server.usage()?;
        let bar = self.bar(format!("{} data", kind.name()), size);
        let t = Instant::now();
        let captured = write_through(&mut client, &writes, &bar).with_context(|| {
            format!(
                "writes to the process server (log {})",
                pair.ps.server.log.display()
            )
        })?;
        bar.set(size);
        pair.durable_now()?;
        let took = t.elapsed();
        let (_, state) = pair.shipped()?;
        ensure!(
            state == "replicating",
            "the process server is {state} after the writes (spool overflow?); its log: {}",
            pair.ps.server.log.display()
        );
        let ps1 = pair.ps.server.usage()?;
        let mt1 = pair.mt.server.usage()?;
        let (wire1, _) = pair.shipped()?;
        let wire = wire1 - wire0;
        let rate = mb_s(size, took);
        bar.done(&format!(
            "{rate:.0} MB/s ({} until durable; written and flushed in {}: {:.0} MB/s), {} on \
             the wire",
            fmt_secs(ms(took)),
            fmt_secs(ms(captured)),
            mb_s(size, captured),
            fmt_size(wire)
        ));
        client.disconnect().context("disconnect")?;
        pair.stop()?;
        let p = format!("replication_{}", kind.name());
        let per_gb = |a: Usage, b: Usage| (b.cpu_s - a.cpu_s) / (size as f64 / GB);
        self.report.set(&format!("{p}_mb_s"), rate);
        self.report
            .set(&format!("{p}_written_s"), captured.as_secs_f64());
        if capture {
            self.report.set("capture_mb_s", mb_s(size, captured));
        }
        self.report.set(&format!("{p}_wire_bytes"), wire);
        // What the disk allows at its bulk speed: every byte written lands on this one
        // disk three times, in the backing file, as its spool record (synced at each
        // cut) and as its frame in the journal (fsynced before the ack).
        if let Some(disk) = self.report.num("disk_write_mb_s") {
            let synced = 2.0 * size as f64 + wire as f64;
            self.report
                .set(&format!("{p}_disk_bound_mb_s"), disk * size as f64 / synced);
        }
        self.report
            .set(&format!("{p}_ps_cpu_s_per_gb"), per_gb(ps0, ps1));
        self.report
            .set(&format!("{p}_mt_cpu_s_per_gb"), per_gb(mt0, mt1));
        self.report
            .set(&format!("{p}_ps_peak_rss_bytes"), ps1.peak_rss_bytes);
        self.report
            .set(&format!("{p}_mt_peak_rss_bytes"), mt1.peak_rss_bytes);
        if kind == Kind::Realistic {
            self.report
                .set("compression_ratio", size as f64 / wire.max(1) as f64);
            // The journal stays for the failback; the spool goes now.
            return remove_big_files(&dir.join(SHARED_DISK.ps_state));
        }
        self.end_phase(&dir)
    }

    /// Phase 6: `master-target failback --json` of the realistic replication's
    /// journal onto its (blank) replica, offline. Returns the replica: the writes
    /// covered the whole disk, so it now equals the disk.
    fn failback(&mut self) -> Result<PathBuf> {
        let dir = self.root.join(REALISTIC_DIR);
        println!("failback");
        let bar = self.bar("applying the realistic replication's journal".into(), 0);
        let out = run_ok(
            Command::new(self.bin_dir.join("master-target"))
                .args([
                    "failback",
                    "--group",
                    GROUP,
                    "--point",
                    "latest-processed",
                    "--json",
                    "--config",
                ])
                .arg(dir.join(SHARED_DISK.mt_config)),
            "master-target failback",
        )?;
        let sum: Value = serde_json::from_str(out.trim())
            .with_context(|| format!("failback answered {out:?}"))?;
        let applied = sum["bytes_applied"].as_u64().unwrap_or(0);
        let seconds = sum["seconds"].as_f64().unwrap_or(0.0);
        let rate = sum["apply_mb_per_s"].as_f64().unwrap_or(0.0);
        ensure!(
            applied > 0 && seconds > 0.0,
            "the failback applied nothing: {out}"
        );
        bar.done(&format!(
            "{} applied in {seconds:.2} s: {rate:.0} MB/s",
            fmt_size(applied)
        ));
        self.report.set("apply_mb_s", rate);
        self.report.set("apply_bytes", applied);
        self.report.set("apply_s", seconds);
        Ok(dir.join(SHARED_DISK.replica_file(DISK)))
    }

    /// Phase 7: the process server's peak RSS with a 1 GiB and a 16 GiB sparse disk
    /// under the same writes: 64 KiB at random places over the disk, at
    /// [`MEMORY_RATE_BYTES_PER_S`]. The process server holds an epoch's data in memory
    /// while it ships it, so an unpaced writer would measure how fast each run happened
    /// to write rather than what the disk's size costs.
    fn memory(&mut self) -> Result<()> {
        let write_bytes = MEMORY_WRITE_BYTES_MAX.min(self.args.size);
        for (disk_bytes, name) in [(MEMORY_SMALL_BYTES, "1g"), (MEMORY_LARGE_BYTES, "16g")] {
            let dir = self.phase_dir(&format!("memory-{name}"))?;
            let t = Instant::now();
            let mut rng = Rng::new(self.args.seed ^ 7);
            let count = write_bytes / BLOCK_BYTES;
            let places = random_blocks(&mut rng, disk_bytes / BLOCK_BYTES, count);
            let blocks = self.data.stream(Kind::Realistic, count, &mut rng);
            let writes: Vec<(u64, &[u8])> = places
                .iter()
                .zip(blocks)
                .map(|(&p, b)| (p * BLOCK_BYTES, b))
                .collect();
            let mut s = self.setup(&dir, &OWN_DISK, disk_bytes);
            s.options.spool_bytes_max = Some(spool_for(write_bytes));
            let mut pair = Pair::start(&self.bin_dir, &s)?;
            let mut client = pair.connect()?;
            let bar = self.bar(
                format!(
                    "{} sparse disk, {} of writes",
                    fmt_size(disk_bytes),
                    fmt_size(write_bytes)
                ),
                write_bytes,
            );
            paced_writes(
                &mut client,
                &writes,
                Instant::now(),
                MEMORY_RATE_BYTES_PER_S,
                &AtomicBool::new(false),
                &|done| bar.set(done),
            )
            .context("the memory phase's writes")?;
            pair.durable_now()?;
            let rss = pair.ps.server.usage()?.peak_rss_bytes;
            let bitmap = bitmap_bytes(&dir.join(SHARED_DISK.ps_state), disk_bytes);
            bar.done(&format!(
                "process server peak RSS {} (bitmap {})",
                fmt_size(rss),
                fmt_size(bitmap)
            ));
            client.disconnect().context("disconnect")?;
            pair.stop()?;
            self.report.set(&format!("ps_rss_{name}_bytes"), rss);
            self.report.set(&format!("ps_bitmap_{name}_bytes"), bitmap);
            self.end_phase(&dir)?;
            self.report
                .phase_seconds
                .insert(format!("memory-{name}"), t.elapsed().as_secs_f64().into());
        }
        Ok(())
    }
}

/// The size of the process server's dirty bitmap files under `state_dir` (the
/// `bitmap-<disk>` directories: the memory-mapped map and its hot-region log), or one
/// bit per 4 KiB block of `disk_bytes` if none is found.
fn bitmap_bytes(state_dir: &Path, disk_bytes: u64) -> u64 {
    let mut found = 0;
    let mut stack = vec![(state_dir.to_path_buf(), false)];
    while let Some((d, in_bitmap)) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                let bitmap = in_bitmap || e.file_name().to_string_lossy().starts_with("bitmap-");
                stack.push((e.path(), bitmap));
            } else if in_bitmap {
                found += m.len();
            }
        }
    }
    if found > 0 {
        found
    } else {
        (disk_bytes / BITMAP_BLOCK_BYTES).div_ceil(8)
    }
}

/// A spool that holds `bytes` of writes with room to spare.
fn spool_for(bytes: u64) -> u64 {
    bytes + SPOOL_MARGIN_BYTES
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn mb_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / MB / took.as_secs_f64().max(1e-9)
}

/// The `p`th percentile of sorted samples (nearest rank).
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Writes `writes` pipelined ([`WRITE_DEPTH`] in flight) in batches of
/// [`BATCH_WRITES`], then flushes. Returns the time from the first write to the
/// flush's reply.
fn write_through(client: &mut NbdClient, writes: &[(u64, &[u8])], bar: &Bar) -> Result<Duration> {
    let t = Instant::now();
    let mut done = 0;
    for batch in writes.chunks(BATCH_WRITES) {
        harness::check_interrupt()?;
        client
            .write_many(batch.iter().copied(), WRITE_DEPTH)
            .context("NBD writes")?;
        done += bytes_of(batch);
        bar.set(done);
    }
    client.flush().context("NBD flush")?;
    Ok(t.elapsed())
}

/// Writes `writes` at `rate_bytes_per_s` from `start` until `stop` is set or they are
/// all written, flushing every second; `progress` is told the bytes written so far.
/// Returns the bytes written.
fn paced_writes(
    client: &mut NbdClient,
    writes: &[(u64, &[u8])],
    start: Instant,
    rate_bytes_per_s: u64,
    stop: &AtomicBool,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<u64> {
    let mut written = 0u64;
    let mut next_flush = start + Duration::from_secs(1);
    for batch in writes.chunks(16) {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        client
            .write_many(batch.iter().copied(), WRITE_DEPTH)
            .context("NBD writes")?;
        written += bytes_of(batch);
        progress(written);
        if Instant::now() >= next_flush {
            client.flush().context("NBD flush")?;
            next_flush += Duration::from_secs(1);
        }
        let due = start + Duration::from_secs_f64(written as f64 / rate_bytes_per_s as f64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
    }
    client.flush().context("NBD flush")?;
    Ok(written)
}

/// Every [`RPO_SAMPLE`] from `start` for `secs`: now minus the cut time of the newest
/// consistent point the master target has acknowledged (the process server's log).
fn sample_rpo(ps: &mut ProcessServer, start: Instant, secs: f64, bar: &Bar) -> Result<Vec<u64>> {
    let end = start + Duration::from_secs_f64(secs);
    let mut samples = Vec::new();
    let mut next = start;
    while next < end {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        ps.poll()?;
        let newest = ps
            .acks
            .iter()
            .filter(|a| a.consistent)
            .map(|a| a.point_time_unix_ms)
            .max()
            .context("no point acknowledged before the RPO load")?;
        samples.push(now_unix_ms().saturating_sub(newest));
        let elapsed = start.elapsed().as_secs_f64();
        bar.set((elapsed * RPO_RATE_BYTES_PER_S as f64) as u64);
        next += RPO_SAMPLE;
    }
    Ok(samples)
}

/// Removes every file over [`BIG_FILE_BYTES`] under `dir`.
fn remove_big_files(dir: &Path) -> Result<()> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(p);
            } else if m.len() > BIG_FILE_BYTES {
                fs::remove_file(&p).with_context(|| format!("remove {}", p.display()))?;
            }
        }
    }
    Ok(())
}

/// The blake3 root of a file's 64 KiB block hashes (every core).
fn hash(path: &Path) -> Result<[u8; 32]> {
    let list = datapath::hashing::hash_file(path, datapath::hashing::default_threads(), &|_| {})
        .with_context(|| format!("hash {}", path.display()))?;
    Ok(list.root())
}

/// `qemu-nbd` serving a raw file on a free loopback port (the capture phase's peer).
struct QemuNbd {
    server: Server,
    port: u16,
}

impl QemuNbd {
    /// `qemu-nbd -f raw -x disk0 -b 127.0.0.1 -p PORT --persistent --cache=writeback
    /// FILE`, log in `dir/qemu-nbd.log`.
    fn start(dir: &Path, file: &Path) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("find a free loopback port")?
            .port();
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-f", "raw", "-x", DISK, "-b", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .args(["--persistent", "--cache=writeback"])
            .arg(file)
            .stdout(Stdio::null());
        let server = Server::spawn("qemu-nbd", cmd, dir, "qemu-nbd.log")?;
        Ok(Self { server, port })
    }

    /// Connects once it listens.
    fn connect(&self) -> Result<NbdClient> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            harness::check_interrupt()?;
            match NbdClient::connect(("127.0.0.1", self.port), DISK) {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() > deadline => {
                    bail!(
                        "qemu-nbd did not serve within {} s ({e}); its log: {}",
                        START_TIMEOUT.as_secs(),
                        self.server.log.display()
                    )
                }
                Err(_) => std::thread::sleep(POLL),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Proves sizes are read with binary units and refused off the 64 KiB grid or
    /// outside 16M..=1T.
    #[test]
    fn sizes() {
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("16777216"), Ok(16 << 20));
        for bad in ["1M", "4X", "G", "16777217", "2T", ""] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    /// Proves the percentile is the nearest rank: p50 of 1..=100 is 50, p99 is 99.
    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    /// Proves the changed places are distinct and inside the disk.
    #[test]
    fn random_places() {
        let b = random_blocks(&mut Rng::new(1), 1000, 50);
        assert_eq!(b.len(), 50);
        assert_eq!(b.iter().collect::<HashSet<_>>().len(), 50);
        assert!(b.iter().all(|&x| x < 1000));
        assert_eq!(random_blocks(&mut Rng::new(1), 10, 50).len(), 10);
    }

    /// Proves a missed or unmeasured target shows as MISS, a met one as ok.
    #[test]
    fn table_verdicts() {
        let args = Args::parse_from(["bench"]);
        let mut r = Report::new(&args);
        r.set("capture_mb_s", 90.0);
        r.set("qemu_nbd_capture_mb_s", 100.0);
        r.set("incremental_s", 1.0);
        r.set("rsync_incremental_s", 5.0);
        let rows = r.rows();
        let ok = |f: &str| rows.iter().find(|x| x.figure.starts_with(f)).unwrap().ok;
        assert_eq!(ok("NBD capture"), Some(true));
        assert_eq!(ok("incremental"), Some(false));
        assert_eq!(ok("failback"), None);
        assert_eq!(ok("compression"), None);
    }
}
