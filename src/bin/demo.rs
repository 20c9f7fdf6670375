//! `demo`: the product end to end on an embedded default, over the network, both ways.
//!
//! In a temp dir: two generated disks with data on them (about 30% of their blocks
//! realistic data, the rest zero), a `master-target serve` and a `process-server serve`
//! on loopback protecting them as group `g1` over TLS. It waits for the initial sync,
//! writes a workload through NBD with [`blockrep::nbd_client`] (pipelined writes of 4 KiB
//! to 1 MiB at random places, some write-zeroes, flushes, an app-consistent point every
//! few seconds between crash-consistent cuts every second), waits until the master
//! target has acknowledged a point after the last write, stops both servers, and
//! reads the master target's journal offline: points, bytes shipped, compression, zero
//! extents, and a replay of the journal up to the newest point compared byte for byte
//! with the disks.
//!
//! Then the failback: the master target's replicas go to the newest app-consistent
//! point, are checked against the disks as they were at that point, and the failback is
//! committed. Last, the reprotect in the other direction: the disks (site A) still hold
//! the point plus the writes made after it, the failed-back replicas (site B) are the
//! machines' disks now. A new process server on B's files ships to a new master target
//! whose replicas are A's files, and its initial sync is a hash-diff resync: only the
//! 64 KiB blocks that differ cross the wire. The demo prints blocks compared and sent,
//! the frame bytes the process server shipped (its own counter) against the disks'
//! size, and the time it took; then it stops both servers and replays the new master
//! target's journal over a copy of A's files, which must equal B's byte for byte.
//!
//! The two directions differ only in names ([`Direction`]: [`PROTECT`], [`REPROTECT`]);
//! configs, servers, the status polling and the journal check are shared.
//!
//! Run: `cargo run --release --bin demo [-- --disk-mib 256 --seconds 10 --rate-mib 100 --keep DIR]`.
//! Any failure ends it with a non-zero exit and a message naming what failed and the
//! log to read; the directory is then kept.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, IsTerminal, Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use blockrep::nbd_client::NbdClient;
use blockrep::workload::{Rng, random_bytes, realistic_bytes};
use clap::Parser;
use datapath::extent::ExtentData;
use datapath::frame::{self, Decoder, Frame, PointKind, PointRecord};
use datapath::journal::{Journal, JournalConfig, RecoveryMode};
use datapath::storage::RealFs;

/// The consistency group of the two disks.
const GROUP: &str = "g1";
/// The protected disks (ids = NBD export names = `<id>.img` in the work dir).
const DISKS: [&str; 2] = ["disk0", "disk1"];
/// Share of the disks' blocks that hold data before protection (the rest is zero).
const DATA_PERCENT: u64 = 30;
/// Share of the data, on the disks and in the workload, that is incompressible
/// (media, archives, encrypted files); the rest is this machine's files under /usr.
const RANDOM_PERCENT: u64 = 10;
/// Granularity of the generated layout: runs of 64 KiB blocks are data or zero.
const LAYOUT_BLOCK_BYTES: u64 = 64 << 10;
/// Longest run of data or zero blocks in the generated layout.
const LAYOUT_RUN_BLOCKS_MAX: u64 = 32;
/// Realistic bytes generated once and sliced for every data block and write.
const POOL_BYTES: usize = 32 << 20;
/// Incompressible bytes generated once and sliced likewise.
const RANDOM_POOL_BYTES: usize = 4 << 20;
/// Alignment of the workload's writes (the dirty bitmap's block).
const WRITE_ALIGN_BYTES: u64 = 4096;
/// Writes of one disk sent in one pipelined batch.
const BATCH_WRITES: usize = 16;
/// Writes in flight on one NBD connection.
const WRITE_DEPTH: usize = 8;
/// Write sizes: 4 KiB << k for k in 0..=WRITE_SIZE_STEPS (4 KiB to 1 MiB).
const WRITE_SIZE_STEPS: u64 = 8;
/// One batch in this many is followed by a write-zeroes.
const ZEROES_ONE_IN: u64 = 6;
/// A flush of both disks this often.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// An app-consistent point this often during the workload.
const TAG_EVERY: Duration = Duration::from_secs(3);
/// The process server's crash-consistent cut interval.
const CUT_INTERVAL_MS: u64 = 1000;
/// Time a server has to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Time the initial sync may take per GiB of disks (plus a minute).
const SYNC_TIMEOUT_PER_GIB: Duration = Duration::from_secs(60);
/// Time the master target has to acknowledge a point after the last write.
const ACK_TIMEOUT: Duration = Duration::from_secs(120);
/// Time a server has to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the demo looks at logs and status while it waits.
const POLL: Duration = Duration::from_millis(50);
/// Points of `master-target points` printed (the newest).
const POINTS_SHOWN: usize = 6;

#[derive(Parser, Debug)]
#[command(
    name = "demo",
    about = "Protects two generated disks with a process server and a master target on loopback, \
             writes a workload through NBD, and verifies the replica."
)]
struct Args {
    /// Size of each of the two disks, in MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    disk_mib: u64,
    /// Seconds of workload.
    #[arg(long, default_value_t = 10.0, value_name = "S")]
    seconds: f64,
    /// Work in DIR (created; must be empty if it exists) and keep it: configs, logs,
    /// disks, spool and journal. Without it a temp dir is used and removed.
    #[arg(long, value_name = "DIR")]
    keep: Option<PathBuf>,
    /// Seed of the disk layout and the workload.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write rate of the workload in MiB/s (0: as fast as the server takes them; a
    /// rate above what replication carries fills the spool and drops the group to
    /// bitmap-only tracking until a resync).
    #[arg(long, default_value_t = 100, value_name = "MIB_S")]
    rate_mib: u64,
}

/// Set by Ctrl-C; every wait checks it.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Catches Ctrl-C on a thread of its own so that the demo stops its servers and
/// removes its temp dir instead of dying on the spot.
fn catch_ctrl_c() {
    let _ = std::thread::Builder::new().name("ctrl-c".into()).spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        if rt.block_on(tokio::signal::ctrl_c()).is_ok() {
            INTERRUPTED.store(true, Ordering::SeqCst);
        }
    });
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Bytes with a binary unit: `96.0 KiB`, `812.4 MiB`, `1.21 GiB`.
fn size(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

fn secs(ms: u64) -> String {
    format!("{:.2} s", ms as f64 / 1000.0)
}

fn main() -> ExitCode {
    let args = Args::parse();
    catch_ctrl_c();
    let mut kept = None;
    let result = run(&args, &mut kept);
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) if INTERRUPTED.load(Ordering::SeqCst) => {
            eprintln!("demo interrupted: both servers stopped");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    };
    if let Some(dir) = kept {
        eprintln!(
            "the work dir {} is kept for a look (logs {}); remove it when done",
            dir.display(),
            log_names()
        );
    }
    code
}

/// The servers' logs of both directions, in the order they are written.
fn log_names() -> String {
    [PROTECT, REPROTECT]
        .map(|d| format!("{}, {}", d.ps_log, d.mt_log))
        .join(", ")
}

/// The work directory: a temp dir removed at the end, or `--keep DIR`.
enum WorkDir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl WorkDir {
    fn path(&self) -> &Path {
        match self {
            Self::Temp(t) => t.path(),
            Self::Kept(p) => p,
        }
    }
}

/// Runs the demo; on failure a temp work dir is kept and named in `kept`.
fn run(args: &Args, kept: &mut Option<PathBuf>) -> Result<()> {
    ensure!(
        (8..=1 << 20).contains(&args.disk_mib),
        "--disk-mib must be 8 to 1048576"
    );
    ensure!(
        args.seconds.is_finite() && args.seconds > 0.0 && args.seconds <= 3600.0,
        "--seconds must be more than 0 and at most 3600"
    );
    let bin_dir = ensure_server_binaries()?;
    let work = match &args.keep {
        Some(dir) => {
            fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
            let dir = dir
                .canonicalize()
                .with_context(|| format!("resolve {}", dir.display()))?;
            let empty = fs::read_dir(&dir)
                .with_context(|| format!("list {}", dir.display()))?
                .next()
                .is_none();
            ensure!(
                empty,
                "--keep {}: the directory is not empty",
                dir.display()
            );
            WorkDir::Kept(dir)
        }
        None => WorkDir::Temp(
            tempfile::Builder::new()
                .prefix("blockrep-demo-")
                .tempdir()
                .context("create a temp dir")?,
        ),
    };
    let result = demo(args, &bin_dir, work.path());
    match (result, work) {
        (Ok(()), WorkDir::Kept(dir)) => {
            println!(
                "kept: {} (logs {}, hooks.log; configs, disks, journals)",
                dir.display(),
                log_names()
            );
            Ok(())
        }
        (Ok(()), WorkDir::Temp(_)) => Ok(()),
        (Err(e), WorkDir::Temp(t)) if !INTERRUPTED.load(Ordering::SeqCst) => {
            *kept = Some(t.keep());
            Err(e)
        }
        (Err(e), _) => Err(e),
    }
}

/// Makes sure `process-server` and `master-target` sit next to this executable and are
/// not older than it; builds them with the cargo that ran us (same profile) otherwise.
/// Returns their directory.
fn ensure_server_binaries() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("find the demo's own executable")?;
    let dir = exe
        .parent()
        .context("the demo's executable has no directory")?
        .to_path_buf();
    let built = |p: &Path| fs::metadata(p).and_then(|m| m.modified());
    let exe_time = built(&exe).with_context(|| format!("stat {}", exe.display()))?;
    let stale = ["process-server", "master-target"]
        .iter()
        .any(|b| built(&dir.join(b)).map_or(true, |t| t < exe_time));
    if !stale {
        return Ok(dir);
    }
    let release = !cfg!(debug_assertions);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    println!(
        "building process-server and master-target ({}) next to {}",
        if release { "release" } else { "debug" },
        exe.display()
    );
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "-p", "process-server", "-p", "master-target"])
        .arg("--manifest-path")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"));
    if release {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .with_context(|| format!("run {} build", Path::new(&cargo).display()))?;
    ensure!(
        status.success(),
        "cargo build of the servers failed ({status})"
    );
    for b in ["process-server", "master-target"] {
        ensure!(
            dir.join(b).exists(),
            "cargo built {b}, but not into {} (another target dir or profile?); build it \
             there, e.g. `cargo build {}-p process-server -p master-target`",
            dir.display(),
            if release { "--release " } else { "" }
        );
    }
    Ok(dir)
}

/// The whole demo in `dir`.
fn demo(args: &Args, bin_dir: &Path, dir: &Path) -> Result<()> {
    let disk_bytes = args.disk_mib << 20;
    let total_bytes = disk_bytes * DISKS.len() as u64;
    println!(
        "blockrep demo: 2 disks of {}, {} s of writes through NBD, in {}",
        size(disk_bytes),
        args.seconds,
        dir.display()
    );
    let pool = Pool::new(args.seed);
    let mut rng = Rng::new(args.seed);

    let t = Instant::now();
    let mut data_before = 0;
    for d in DISKS {
        data_before += generate_disk(&dir.join(PROTECT.disk_file(d)), disk_bytes, &pool, &mut rng)?;
    }
    println!(
        "  generated {}: {} each, {} of data ({}%), the rest zero ({} ms)",
        DISKS.map(|d| PROTECT.disk_file(d)).join(", "),
        size(disk_bytes),
        size(data_before),
        data_before * 100 / total_bytes,
        t.elapsed().as_millis()
    );

    // TLS 1.3 with mutual certificates, as a deployment would run it: one CA, one
    // certificate for the master targets (loopback names, both directions) and one per
    // process server node.
    let out = Command::new(bin_dir.join("master-target"))
        .args(["certs", "--out", "certs"])
        .args(["--process-server", PROTECT.ps_node])
        .args(["--process-server", REPROTECT.ps_node])
        .current_dir(dir)
        .output()
        .context("run master-target certs")?;
    if !out.status.success() {
        bail!(
            "master-target certs failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    println!("  certificates for TLS 1.3 (mutual) made with `master-target certs` in certs/");
    let (configs, mt) = start_master_target(bin_dir, dir, &PROTECT, disk_bytes)?;
    println!(
        "  master target listening on {} (TLS, log {})",
        mt.addr, PROTECT.mt_log
    );
    let ps_start_ms = now_unix_ms();
    let mut ps = ProcessServer::start(bin_dir, dir, &PROTECT, &configs)?;
    println!(
        "  process server: NBD on {}, a point every {CUT_INTERVAL_MS} ms, shipping to {} (log {})",
        ps.nbd_addr, mt.addr, PROTECT.ps_log
    );

    let sync = wait_initial_sync(&mut ps, &configs, "initial sync", total_bytes, ps_start_ms)?;
    println!(
        "  initial sync done in {} (first consistent point {} acknowledged)",
        secs(sync.done_ms),
        sync.first_point
    );

    let wl = run_workload(args, &mut ps, &configs, disk_bytes, &pool, &mut rng)?;
    println!(
        "  workload done: {} writes, {} captured in {:.1} s; {} app-consistent points tagged",
        wl.writes,
        size(wl.bytes),
        wl.elapsed_ms as f64 / 1000.0,
        wl.tags.len()
    );

    let t = Instant::now();
    let last = ps.wait_ack_after(wl.last_write_unix_ms, ACK_TIMEOUT)?;
    println!(
        "  point {} (after the last write) acknowledged {} ms after the workload ended",
        last.point,
        t.elapsed().as_millis()
    );
    let ps_log = ps.log.path.clone();
    ps.server.stop(STOP_TIMEOUT)?;
    mt.server.stop(STOP_TIMEOUT)?;
    println!("  stopped both servers (SIGTERM, clean exit)");

    let points_out = run_ok(
        Command::new(bin_dir.join("master-target"))
            .args(["points", "--group", GROUP, "--config"])
            .arg(&configs.mt),
        "master-target points",
    )?;
    let (js, verify) = check_journal(dir, &PROTECT, ReplayBase::Zero, disk_bytes)?;
    for tag in &wl.tags {
        let found = js.points.iter().find(|p| p.point_id == tag.id);
        ensure!(
            found.is_some_and(|p| p.kind == PointKind::App && p.consistent == tag.consistent),
            "tagged app-consistent point {} is not in the journal as such (found {found:?})",
            tag.id
        );
    }
    let acks = read_acks(&ps_log)?;
    print_summary(&Summary {
        disk_bytes,
        data_before,
        sync: &sync,
        wl: &wl,
        js: &js,
        verify: &verify,
        acks: &acks,
        points_out: &points_out,
    });
    ensure!(
        verify.matches,
        "the replica at point {} differs from the disks (see above)",
        verify.point
    );
    if let Some(app) = failback(bin_dir, dir, &configs, &wl)? {
        let after = wl.bytes + wl.zero_bytes - app.written_bytes;
        reprotect(bin_dir, dir, disk_bytes, app.id, after)?;
    }
    Ok(())
}

/// Fails the replicas back to the newest app-consistent point, checks them against the
/// disks as they were at that point, and commits. Returns that point's tag, or None
/// when no point qualified.
fn failback<'a>(
    bin_dir: &Path,
    dir: &Path,
    configs: &Configs,
    wl: &'a Workload,
) -> Result<Option<&'a Tagged>> {
    let Some(app) = wl.tags.iter().rev().find(|t| t.consistent) else {
        println!("\nfailback skipped: no consistent app-consistent point was tagged");
        return Ok(None);
    };
    let out = run_ok(
        Command::new(bin_dir.join("master-target"))
            .args([
                "failback",
                "--group",
                GROUP,
                "--point",
                "latest-app",
                "--json",
            ])
            .arg("--config")
            .arg(&configs.mt),
        "master-target failback --point latest-app",
    )?;
    let sum: serde_json::Value =
        serde_json::from_str(out.trim()).with_context(|| format!("failback answered {out:?}"))?;
    let point = sum["point_id"].as_u64().unwrap_or(0);
    ensure!(
        point == app.id,
        "failback chose point {point}, the newest app-consistent point tagged is {}",
        app.id
    );
    let mut matches = true;
    for (d, want) in DISKS.iter().zip(&app.disk_roots) {
        matches &= hash(&dir.join(PROTECT.replica_file(d)))? == *want;
    }
    println!(
        "\nfailback   to app-consistent point {point} (latest-app): {} applied in {:.2} s \
         ({:.0} MB/s), data-loss window {} (to {})",
        size(sum["bytes_applied"].as_u64().unwrap_or(0)),
        sum["seconds"].as_f64().unwrap_or(0.0),
        sum["apply_mb_per_s"].as_f64().unwrap_or(0.0),
        secs(sum["data_loss_window_ms"].as_u64().unwrap_or(0)),
        sum["data_loss_window_basis"].as_str().unwrap_or("?")
    );
    println!(
        "           replicas match the disks at point {point}: {}",
        if matches { "yes" } else { "NO" }
    );
    ensure!(
        matches,
        "the failed-back replicas differ from the disks at point {point}"
    );
    run_ok(
        Command::new(bin_dir.join("master-target"))
            .args(["commit", "--group", GROUP, "--config"])
            .arg(&configs.mt),
        "master-target commit",
    )?;
    println!("commit     undo logs and journal dropped: failed back, not protected");
    Ok(Some(app))
}

/// What the reprotect's process server counted once its first consistent point after
/// the hash-diff pass was acknowledged.
struct ReprotectCounters {
    compared_blocks: u64,
    sent_blocks: u64,
    /// Frames shipped to the master target (data and points), as encoded on the wire.
    shipped_bytes: u64,
    shipped_plain_bytes: u64,
    shipped_frames: u64,
}

impl ReprotectCounters {
    /// From a `process-server status --json`: the group's shipping totals and its
    /// disks' hash-diff counters.
    fn from_status(st: &serde_json::Value) -> Result<Self> {
        let g = group_status(st)?;
        let num = |v: &serde_json::Value, key: &str| {
            v[key]
                .as_u64()
                .with_context(|| format!("process-server status has no {key}: {st}"))
        };
        let mut c = Self {
            compared_blocks: 0,
            sent_blocks: 0,
            shipped_bytes: num(g, "shipped_bytes")?,
            shipped_plain_bytes: num(g, "shipped_plain_bytes")?,
            shipped_frames: num(g, "shipped_frames")?,
        };
        let disks = st["disks"].as_array().map_or(&[][..], Vec::as_slice);
        for d in disks.iter().filter(|d| d["group"] == GROUP) {
            c.compared_blocks += num(d, "resync_compared_blocks")?;
            c.sent_blocks += num(d, "resync_sent_blocks")?;
        }
        Ok(c)
    }
}

/// Reprotect after the committed failback ([`REPROTECT`]): a master target on A's disks
/// and a process server on B's failed-back replicas, whose initial sync is a hash-diff
/// resync. B's disks are the disks at point `point`, A's hold that point plus
/// `written_after_bytes` of the workload's writes. Prints blocks compared and sent, the
/// frame bytes shipped against the disks' size and the time it took; stops both
/// servers and checks that A's files with the new journal replayed equal B's.
fn reprotect(
    bin_dir: &Path,
    dir: &Path,
    disk_bytes: u64,
    point: u64,
    written_after_bytes: u64,
) -> Result<()> {
    let d = &REPROTECT;
    let total_bytes = disk_bytes * DISKS.len() as u64;
    println!(
        "\nreprotect  B -> A, roles swapped: B's failed-back disks ({}) are protected,\n           \
         A's disks ({}) are the replicas of a new master target (TLS; logs {}, {});\n           \
         A holds point {point} plus {} of writes at random places after it",
        DISKS.map(|x| d.disk_file(x)).join(", "),
        DISKS.map(|x| d.replica_file(x)).join(", "),
        d.ps_log,
        d.mt_log,
        size(written_after_bytes)
    );
    let t = Instant::now();
    let (configs, mt) = start_master_target(bin_dir, dir, d, disk_bytes)?;
    let start_ms = now_unix_ms();
    let mut ps = ProcessServer::start(bin_dir, dir, d, &configs)?;
    let sync = wait_initial_sync(&mut ps, &configs, "reprotect", total_bytes, start_ms)?;
    let took_ms = t.elapsed().as_millis() as u64;
    let c = ReprotectCounters::from_status(&ps.status(&configs)?)?;
    ensure!(
        c.compared_blocks > 0,
        "the reprotect compared no block: its initial sync was not a hash-diff resync; \
         the process server's log: {}",
        ps.server.log.display()
    );
    ps.server.stop(STOP_TIMEOUT)?;
    mt.server.stop(STOP_TIMEOUT)?;
    let pct = |part: u64, whole: u64| part as f64 * 100.0 / whole.max(1) as f64;
    println!(
        "           hash-diff resync: {} blocks compared, {} sent ({:.1}%; 64 KiB blocks)",
        c.compared_blocks,
        c.sent_blocks,
        pct(c.sent_blocks, c.compared_blocks)
    );
    println!(
        "           on the wire B -> A: {} of frames for {} of disks: {:.2}%",
        size(c.shipped_bytes),
        size(total_bytes),
        pct(c.shipped_bytes, total_bytes),
    );
    println!(
        "           ({} frames, {} of data; A -> B: hash lists, 32 B per block, {})",
        c.shipped_frames,
        size(c.shipped_plain_bytes),
        size(c.compared_blocks * 32)
    );
    println!(
        "           took {}: both servers started, the hash-diff pass, point {} acknowledged",
        secs(took_ms),
        sync.first_point
    );
    let (_, verify) = check_journal(dir, d, ReplayBase::Replicas, disk_bytes)?;
    println!(
        "           A's disks with their journal replayed to point {} match B's disks: {}",
        verify.point,
        if verify.matches { "yes" } else { "NO" }
    );
    ensure!(
        verify.matches,
        "after the reprotect, A's disks at point {} differ from B's failed-back disks",
        verify.point
    );
    Ok(())
}

// ---- data ----

/// Data to write: realistic bytes and random bytes, sliced at random places.
struct Pool {
    realistic: Vec<u8>,
    random: Vec<u8>,
}

impl Pool {
    fn new(seed: u64) -> Self {
        Self {
            realistic: realistic_bytes(POOL_BYTES),
            random: random_bytes(RANDOM_POOL_BYTES, seed ^ 0x5eed),
        }
    }

    /// `len` bytes (at most the random pool's size) of realistic or, one time in
    /// [`RANDOM_PERCENT`], incompressible data, from a random 4 KiB-aligned place.
    fn slice(&self, rng: &mut Rng, len: usize) -> &[u8] {
        let src = if rng.below(100) < RANDOM_PERCENT {
            &self.random
        } else {
            &self.realistic
        };
        let slots = ((src.len() - len) as u64 / WRITE_ALIGN_BYTES).max(1);
        let at = (rng.below(slots) * WRITE_ALIGN_BYTES) as usize;
        &src[at..at + len]
    }
}

/// Writes a disk image of `disk_bytes`: runs of 64 KiB blocks, about
/// [`DATA_PERCENT`]% of them data, the rest left as holes (zero). Returns the data bytes.
fn generate_disk(path: &Path, disk_bytes: u64, pool: &Pool, rng: &mut Rng) -> Result<u64> {
    let f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    f.set_len(disk_bytes)
        .with_context(|| format!("size {}", path.display()))?;
    let blocks = disk_bytes / LAYOUT_BLOCK_BYTES;
    let mut b = 0;
    let mut data = 0;
    while b < blocks {
        let run = (1 + rng.below(LAYOUT_RUN_BLOCKS_MAX)).min(blocks - b);
        if rng.below(100) < DATA_PERCENT {
            for k in b..b + run {
                let bytes = pool.slice(rng, LAYOUT_BLOCK_BYTES as usize);
                f.write_all_at(bytes, k * LAYOUT_BLOCK_BYTES)
                    .with_context(|| format!("write {}", path.display()))?;
            }
            data += run * LAYOUT_BLOCK_BYTES;
        }
        b += run;
    }
    f.sync_all()
        .with_context(|| format!("sync {}", path.display()))?;
    Ok(data)
}

// ---- servers ----

/// One direction of replication in the work dir: the files each server reads and
/// writes, and which files are the protected disks and which the replicas.
struct Direction {
    mt_config: &'static str,
    mt_data: &'static str,
    mt_node: &'static str,
    mt_log: &'static str,
    ps_config: &'static str,
    ps_state: &'static str,
    ps_log: &'static str,
    /// The process server's node id; `certs/process-server-<node>.pem` is its
    /// certificate.
    ps_node: &'static str,
    /// The protected disks are `<disk_prefix><disk>.img`.
    disk_prefix: &'static str,
    /// The master target's replicas are `<replica_prefix><disk>.img`.
    replica_prefix: &'static str,
}

impl Direction {
    fn disk_file(&self, disk: &str) -> String {
        format!("{}{disk}.img", self.disk_prefix)
    }

    fn replica_file(&self, disk: &str) -> String {
        format!("{}{disk}.img", self.replica_prefix)
    }
}

/// Protection: the generated disks (site A) replicate to a master target whose
/// replicas it creates in `mt-data` (site B).
const PROTECT: Direction = Direction {
    mt_config: "mt.toml",
    mt_data: "mt-data",
    mt_node: "mt-demo",
    mt_log: "mt.log",
    ps_config: "ps.toml",
    ps_state: "ps-state",
    ps_log: "ps.log",
    ps_node: "ps1",
    disk_prefix: "",
    replica_prefix: "mt-data/replica-",
};

/// Reprotect after the failback: B's failed-back replicas are the protected disks,
/// A's disks the replicas of a new master target (fresh data dir: the files with
/// content and an empty journal, so each replica is its copy).
const REPROTECT: Direction = Direction {
    mt_config: "mt-a.toml",
    mt_data: "mt-a-data",
    mt_node: "mt-a",
    mt_log: "mt-a.log",
    ps_config: "ps-b.toml",
    ps_state: "ps-b-state",
    ps_log: "ps-b.log",
    ps_node: "ps2",
    disk_prefix: "mt-data/replica-",
    replica_prefix: "",
};

/// The config files of both servers.
struct Configs {
    mt: PathBuf,
    ps: PathBuf,
}

/// Writes both servers' configs of direction `d` into `dir`: the master target listens
/// on `mt_addr` and journals into its data dir; the process server serves the disks over
/// NBD on a free loopback port, cuts a point every [`CUT_INTERVAL_MS`], runs harmless
/// freeze/thaw hooks (a line each into `hooks.log`) and ships to `mt_addr` as its node.
/// TLS 1.3 with the certificates `master-target certs` made in `certs/`.
fn write_configs(
    dir: &Path,
    d: &Direction,
    disk_bytes: u64,
    mt_addr: SocketAddr,
) -> Result<Configs> {
    let (mt_data, mt_node, ps_state, node) = (d.mt_data, d.mt_node, d.ps_state, d.ps_node);
    let mut mt = format!(
        "# master target of the blockrep demo\n\
         listen = \"{mt_addr}\"\n\
         data_dir = \"{mt_data}\"\n\
         node = \"{mt_node}\"\n\n\
         [tls]\nca = \"certs/ca.pem\"\ncert = \"certs/master-target.pem\"\nkey = \"certs/master-target.key\"\n\n\
         [[group]]\nid = \"{GROUP}\"\n"
    );
    let mut ps = format!(
        "# process server of the blockrep demo\n\
         [nbd]\nlisten = \"127.0.0.1:0\"\n\n\
         [tracking]\nstate_dir = \"{ps_state}\"\ncut_interval_ms = {CUT_INTERVAL_MS}\n\n\
         [target]\naddress = \"{mt_addr}\"\nnode = \"{node}\"\n\
         ca = \"certs/ca.pem\"\ncert = \"certs/process-server-{node}.pem\"\nkey = \"certs/process-server-{node}.key\"\n\n\
         [[group]]\nid = \"{GROUP}\"\n\
         freeze = \"echo freeze >> hooks.log\"\n\
         thaw = \"echo thaw >> hooks.log\"\n\
         hook_timeout_ms = 5000\n"
    );
    for disk in DISKS {
        let (path, replica) = (d.disk_file(disk), d.replica_file(disk));
        mt.push_str(&format!(
            "\n[[group.disk]]\nid = \"{disk}\"\nsize = {disk_bytes}\nreplica = \"{replica}\"\n"
        ));
        ps.push_str(&format!(
            "\n[[group.disk]]\nid = \"{disk}\"\npath = \"{path}\"\nsize = {disk_bytes}\n"
        ));
    }
    let configs = Configs {
        mt: dir.join(d.mt_config),
        ps: dir.join(d.ps_config),
    };
    fs::write(&configs.mt, mt).with_context(|| format!("write {}", configs.mt.display()))?;
    fs::write(&configs.ps, ps).with_context(|| format!("write {}", configs.ps.display()))?;
    Ok(configs)
}

/// A server process with its log file; killed on drop unless it was stopped.
struct Server {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Server {
    fn spawn(name: &'static str, mut cmd: Command, dir: &Path, log: &str) -> Result<Self> {
        let log = dir.join(log);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("open {}", log.display()))?;
        let child = cmd
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stderr(file)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        Ok(Self { name, child, log })
    }

    /// Fails (naming the log) if the process has exited.
    fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait().context("wait")? {
            bail!(
                "{} exited ({status}); its log: {}",
                self.name,
                self.log.display()
            );
        }
        Ok(())
    }

    /// SIGTERM, and waits for a clean exit.
    fn stop(mut self, timeout: Duration) -> Result<()> {
        let pid = self.child.id().to_string();
        let st = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .context("run kill")?;
        ensure!(st.success(), "kill -TERM {pid} ({}) failed", self.name);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().context("wait")? {
                ensure!(
                    status.success(),
                    "{} exited with {status} after SIGTERM; its log: {}",
                    self.name,
                    self.log.display()
                );
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not exit within {} s of SIGTERM; its log: {}",
                    self.name,
                    timeout.as_secs(),
                    self.log.display()
                );
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The running master target.
struct MasterTarget {
    server: Server,
    addr: SocketAddr,
}

/// Picks a free loopback port for the master target of direction `d`, writes the
/// configs and starts it. A port taken by someone else between the pick and the bind
/// is retried.
fn start_master_target(
    bin_dir: &Path,
    dir: &Path,
    d: &Direction,
    disk_bytes: u64,
) -> Result<(Configs, MasterTarget)> {
    let mut last_err = None;
    for _ in 0..3 {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("find a free loopback port")?;
        let configs = write_configs(dir, d, disk_bytes, addr)?;
        let mut cmd = Command::new(bin_dir.join("master-target"));
        cmd.args(["serve", "--config"])
            .arg(&configs.mt)
            .stdout(Stdio::piped());
        let mut server = Server::spawn("master target", cmd, dir, d.mt_log)?;
        // It prints `listening on ADDR` on stdout once it accepts connections.
        let stdout = server.child.stdout.take().context("master target stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(a) = line.trim().strip_prefix("listening on ") {
                    let _ = tx.send(a.to_owned());
                }
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        let listening = loop {
            check_interrupt()?;
            if let Ok(a) = rx.recv_timeout(POLL) {
                break Some(a);
            }
            if server.check_running().is_err() || Instant::now() > deadline {
                break None;
            }
        };
        match listening.map(|a| a.parse::<SocketAddr>()) {
            Some(Ok(addr)) => return Ok((configs, MasterTarget { server, addr })),
            Some(Err(e)) => bail!("master target announced a bad address: {e}"),
            None => {
                let log = fs::read_to_string(&server.log).unwrap_or_default();
                let e = anyhow::anyhow!(
                    "master target did not start within {} s; its log: {}",
                    START_TIMEOUT.as_secs(),
                    server.log.display()
                );
                if !log.contains("in use") {
                    return Err(e);
                }
                last_err = Some(e);
            }
        }
    }
    Err(last_err.unwrap_or_else(|| anyhow::anyhow!("master target did not start")))
}

/// One `point acknowledged` line of the process server's log.
#[derive(Clone, Copy, Debug)]
struct Ack {
    point: u64,
    point_time_unix_ms: u64,
    consistent: bool,
    /// Time from the cut to the acknowledgement.
    rpo_ms: u64,
}

/// The value of ` name=` in a log line, up to the next space.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=");
    let at = line.find(&key)? + key.len();
    line[at..].split_whitespace().next()
}

fn parse_ack(line: &str) -> Option<Ack> {
    if !line.contains("point acknowledged") {
        return None;
    }
    Some(Ack {
        point: field(line, "point")?.parse().ok()?,
        point_time_unix_ms: field(line, "point_time_unix_ms")?.parse().ok()?,
        consistent: field(line, "consistent")? == "true",
        rpo_ms: field(line, "rpo_ms")?.parse().ok()?,
    })
}

fn read_acks(log: &Path) -> Result<Vec<Ack>> {
    let text = fs::read_to_string(log).with_context(|| format!("read {}", log.display()))?;
    Ok(text.lines().filter_map(parse_ack).collect())
}

/// Follows a growing log file line by line.
struct LogTail {
    path: PathBuf,
    pos: u64,
    partial: String,
}

impl LogTail {
    fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            pos: 0,
            partial: String::new(),
        }
    }

    /// The complete lines appended since the last call.
    fn new_lines(&mut self) -> Result<Vec<String>> {
        let mut f =
            File::open(&self.path).with_context(|| format!("open {}", self.path.display()))?;
        f.seek(SeekFrom::Start(self.pos))
            .with_context(|| format!("seek {}", self.path.display()))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)
            .with_context(|| format!("read {}", self.path.display()))?;
        self.pos += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        let mut lines: Vec<String> = self.partial.split('\n').map(str::to_owned).collect();
        self.partial = lines.pop().unwrap_or_default();
        Ok(lines)
    }
}

/// The running process server, with its log followed for acknowledgements.
struct ProcessServer {
    server: Server,
    nbd_addr: SocketAddr,
    log: LogTail,
    acks: Vec<Ack>,
    status_cmd: PathBuf,
}

impl ProcessServer {
    /// Starts `process-server serve` of direction `d` and waits for its `listening on
    /// ADDR` log line.
    fn start(bin_dir: &Path, dir: &Path, d: &Direction, configs: &Configs) -> Result<Self> {
        let mut cmd = Command::new(bin_dir.join("process-server"));
        cmd.args(["serve", "--config"])
            .arg(&configs.ps)
            .stdout(Stdio::null());
        let mut server = Server::spawn("process server", cmd, dir, d.ps_log)?;
        let mut log = LogTail::new(&server.log);
        let mut acks = Vec::new();
        let deadline = Instant::now() + START_TIMEOUT;
        let nbd_addr = 'found: loop {
            check_interrupt()?;
            server.check_running()?;
            for line in log.new_lines()? {
                acks.extend(parse_ack(&line));
                if let Some(a) = line.split("listening on ").nth(1) {
                    let a = a.trim();
                    break 'found a.parse::<SocketAddr>().with_context(|| {
                        format!("process server announced a bad address {a:?}")
                    })?;
                }
            }
            ensure!(
                Instant::now() < deadline,
                "process server did not listen within {} s; its log: {}",
                START_TIMEOUT.as_secs(),
                server.log.display()
            );
            std::thread::sleep(POLL);
        };
        Ok(Self {
            server,
            nbd_addr,
            log,
            acks,
            status_cmd: bin_dir.join("process-server"),
        })
    }

    /// Reads new log lines; fails if the server has exited.
    fn poll(&mut self) -> Result<()> {
        check_interrupt()?;
        self.server.check_running()?;
        for line in self.log.new_lines()? {
            self.acks.extend(parse_ack(&line));
        }
        Ok(())
    }

    /// Waits until a consistent point cut after `after_unix_ms` is acknowledged.
    fn wait_ack_after(&mut self, after_unix_ms: u64, timeout: Duration) -> Result<Ack> {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll()?;
            if let Some(a) = self
                .acks
                .iter()
                .find(|a| a.consistent && a.point_time_unix_ms > after_unix_ms)
            {
                return Ok(*a);
            }
            ensure!(
                Instant::now() < deadline,
                "the master target acknowledged no consistent point cut after {after_unix_ms} \
                 within {} s; the process server's log: {}",
                timeout.as_secs(),
                self.server.log.display()
            );
            std::thread::sleep(POLL);
        }
    }

    /// `process-server status --json` of the running server.
    fn status(&self, configs: &Configs) -> Result<serde_json::Value> {
        let out = run_ok(
            Command::new(&self.status_cmd)
                .args(["status", "--json", "--config"])
                .arg(&configs.ps),
            "process-server status",
        )?;
        serde_json::from_str(&out).with_context(|| format!("process-server status: {out:?}"))
    }
}

/// Runs a command that must succeed; returns its stdout.
fn run_ok(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {what}"))?;
    ensure!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---- initial sync ----

struct SyncReport {
    /// From the process server's start to the acknowledgement of the first
    /// consistent point.
    done_ms: u64,
    first_point: u64,
}

/// The group's entry of a `process-server status --json`.
fn group_status(st: &serde_json::Value) -> Result<&serde_json::Value> {
    st["groups"]
        .as_array()
        .and_then(|gs| gs.iter().find(|g| g["id"] == GROUP))
        .with_context(|| format!("process-server status has no group {GROUP}: {st}"))
}

/// Waits for the initial sync (a full one, or the reprotect's hash-diff resync: `what`
/// names it in messages): the group's state goes to `replicating`, then a consistent
/// point is acknowledged. Shows progress on a terminal.
fn wait_initial_sync(
    ps: &mut ProcessServer,
    configs: &Configs,
    what: &str,
    total_bytes: u64,
    start_unix_ms: u64,
) -> Result<SyncReport> {
    let timeout = Duration::from_secs(60)
        + SYNC_TIMEOUT_PER_GIB.mul_f64(total_bytes as f64 / (1u64 << 30) as f64);
    let deadline = Instant::now() + timeout;
    let tty = std::io::stdout().is_terminal();
    let mut last_status = Instant::now() - Duration::from_secs(1);
    let mut replicating_at = None;
    loop {
        ps.poll()?;
        if replicating_at.is_none() && last_status.elapsed() >= Duration::from_millis(200) {
            last_status = Instant::now();
            let st = ps.status(configs)?;
            let g = group_status(&st)?;
            let state = g["state"].as_str().unwrap_or("?");
            if state == "replicating" {
                replicating_at = Some(now_unix_ms());
                if tty {
                    print!("\r\x1b[K");
                }
            } else if tty {
                let done = g["resync"]["done_bytes"].as_u64().unwrap_or(0);
                let total = g["resync"]["total_bytes"].as_u64().unwrap_or(total_bytes);
                print!(
                    "\r\x1b[K  {what}: {state}, {} of {} read",
                    size(done),
                    size(total)
                );
            }
            let _ = std::io::stdout().flush();
        }
        if let Some(at) = replicating_at
            && let Some(a) = ps
                .acks
                .iter()
                .find(|a| a.consistent && a.point_time_unix_ms >= at)
        {
            return Ok(SyncReport {
                done_ms: now_unix_ms().saturating_sub(start_unix_ms),
                first_point: a.point,
            });
        }
        ensure!(
            Instant::now() < deadline,
            "the {what} did not finish within {} s; the process server's log: {}",
            timeout.as_secs(),
            ps.server.log.display()
        );
        std::thread::sleep(POLL);
    }
}

// ---- workload ----

/// An app-consistent point the workload tagged.
struct Tagged {
    id: u64,
    consistent: bool,
    /// blake3 roots of the disks right after the tag (the writes wait for it): the
    /// disks as they are at that point.
    disk_roots: Vec<[u8; 32]>,
    /// Bytes the workload had written (writes and write-zeroes) when it was tagged.
    written_bytes: u64,
}

/// What the workload did.
struct Workload {
    writes: u64,
    bytes: u64,
    zero_ops: u64,
    zero_bytes: u64,
    flushes: u64,
    tags: Vec<Tagged>,
    start_unix_ms: u64,
    elapsed_ms: u64,
    /// When the final flush of both disks was answered.
    last_write_unix_ms: u64,
    /// Acknowledgements seen in the log when the workload ended.
    acks_at_end: Vec<Ack>,
}

fn nbd_context(disk: &str, addr: SocketAddr, log: &Path) -> String {
    format!(
        "NBD I/O on {disk} at {addr} (process server log: {})",
        log.display()
    )
}

/// [`workload`], with a server that died named as the cause of any error.
fn run_workload(
    args: &Args,
    ps: &mut ProcessServer,
    configs: &Configs,
    disk_bytes: u64,
    pool: &Pool,
    rng: &mut Rng,
) -> Result<Workload> {
    workload(args, ps, configs, disk_bytes, pool, rng).map_err(|e| {
        // A killed server's sockets close a moment before its exit can be seen.
        let deadline = Instant::now() + Duration::from_millis(500);
        loop {
            match ps.server.check_running() {
                Err(dead) => return anyhow::anyhow!("{dead:#} (the workload saw: {e:#})"),
                Ok(()) if Instant::now() > deadline => return e,
                Ok(()) => std::thread::sleep(POLL),
            }
        }
    })
}

/// Writes through NBD for `--seconds`: batches of pipelined writes on alternating
/// disks, write-zeroes now and then, a flush of both disks every [`FLUSH_EVERY`], and
/// an app-consistent point (flush, then `process-server tag --app-consistent`) every
/// [`TAG_EVERY`]. Ends with a flush of both disks.
fn workload(
    args: &Args,
    ps: &mut ProcessServer,
    configs: &Configs,
    disk_bytes: u64,
    pool: &Pool,
    rng: &mut Rng,
) -> Result<Workload> {
    let log = ps.server.log.clone();
    let mut clients = Vec::new();
    for d in DISKS {
        clients.push(
            NbdClient::connect(ps.nbd_addr, d)
                .with_context(|| nbd_context(d, ps.nbd_addr, &log))?,
        );
    }
    let mut wl = Workload {
        writes: 0,
        bytes: 0,
        zero_ops: 0,
        zero_bytes: 0,
        flushes: 0,
        tags: Vec::new(),
        start_unix_ms: now_unix_ms(),
        elapsed_ms: 0,
        last_write_unix_ms: 0,
        acks_at_end: Vec::new(),
    };
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(args.seconds);
    let mut next_flush = start + FLUSH_EVERY;
    // The first tag comes early enough that a short run has one too.
    let mut next_tag = start + TAG_EVERY.min(Duration::from_secs_f64(args.seconds / 2.0));
    let mut last_print = Instant::now();
    let tty = std::io::stdout().is_terminal();
    let mut batch = 0usize;
    while Instant::now() < end {
        ps.poll()?;
        let i = batch % DISKS.len();
        batch += 1;
        let ctx = || nbd_context(DISKS[i], ps.nbd_addr, &log);
        let mut writes = Vec::with_capacity(BATCH_WRITES);
        for _ in 0..BATCH_WRITES {
            let len = WRITE_ALIGN_BYTES << rng.below(WRITE_SIZE_STEPS + 1);
            let at = rng.below((disk_bytes - len) / WRITE_ALIGN_BYTES + 1) * WRITE_ALIGN_BYTES;
            writes.push((at, pool.slice(rng, len as usize)));
            wl.bytes += len;
        }
        wl.writes += writes.len() as u64;
        clients[i]
            .write_many(writes, WRITE_DEPTH)
            .with_context(ctx)?;
        if rng.below(ZEROES_ONE_IN) == 0 {
            let len = (64 << 10) << rng.below(5);
            let at = rng.below((disk_bytes - len) / WRITE_ALIGN_BYTES + 1) * WRITE_ALIGN_BYTES;
            clients[i].write_zeroes(at, len).with_context(ctx)?;
            wl.zero_ops += 1;
            wl.zero_bytes += len;
        }
        let now = Instant::now();
        if now >= next_flush || now >= next_tag {
            for (c, d) in clients.iter_mut().zip(DISKS) {
                c.flush()
                    .with_context(|| nbd_context(d, ps.nbd_addr, &log))?;
            }
            wl.flushes += 1;
            next_flush = now + FLUSH_EVERY;
        }
        if now >= next_tag {
            // The writes stop while the app-consistent point is taken, as an
            // application quiesced by the freeze hook would.
            let mut tagged = tag_app_consistent(&ps.status_cmd, configs)?;
            tagged.written_bytes = wl.bytes + wl.zero_bytes;
            let dir = configs.ps.parent().unwrap_or(Path::new("."));
            for d in DISKS {
                tagged
                    .disk_roots
                    .push(hash(&dir.join(PROTECT.disk_file(d)))?);
            }
            wl.tags.push(tagged);
            next_tag = Instant::now() + TAG_EVERY;
        }
        if args.rate_mib > 0 {
            // Ahead of the rate: wait until the clock catches up (not past the end).
            let due = Duration::from_secs_f64(wl.bytes as f64 / (args.rate_mib << 20) as f64);
            let wake = (start + due).min(end);
            let now = Instant::now();
            if wake > now {
                std::thread::sleep(wake - now);
            }
        }
        if tty && last_print.elapsed() >= Duration::from_millis(250) {
            last_print = Instant::now();
            let s = start.elapsed().as_secs_f64();
            print!(
                "\r\x1b[K  workload: {s:.1} s, {} writes, {} ({:.0} MiB/s), {} app points",
                wl.writes,
                size(wl.bytes),
                wl.bytes as f64 / (1 << 20) as f64 / s,
                wl.tags.len()
            );
            let _ = std::io::stdout().flush();
        }
    }
    for (c, d) in clients.iter_mut().zip(DISKS) {
        c.flush()
            .with_context(|| nbd_context(d, ps.nbd_addr, &log))?;
    }
    wl.flushes += 1;
    wl.last_write_unix_ms = now_unix_ms();
    wl.elapsed_ms = start.elapsed().as_millis() as u64;
    if tty {
        print!("\r\x1b[K");
    }
    ps.poll()?;
    wl.acks_at_end = ps.acks.clone();
    for (c, d) in clients.into_iter().zip(DISKS) {
        c.disconnect()
            .with_context(|| nbd_context(d, ps.nbd_addr, &log))?;
    }
    Ok(wl)
}

/// `process-server tag --group g1 --app-consistent --json`: the freeze hook, a cut,
/// the thaw hook.
fn tag_app_consistent(ps_bin: &Path, configs: &Configs) -> Result<Tagged> {
    let out = run_ok(
        Command::new(ps_bin)
            .args([
                "tag",
                "--group",
                GROUP,
                "--app-consistent",
                "--json",
                "--config",
            ])
            .arg(&configs.ps),
        "process-server tag --app-consistent",
    )?;
    let p: serde_json::Value =
        serde_json::from_str(out.trim()).with_context(|| format!("tag answered {out:?}"))?;
    let id = p["id"]
        .as_u64()
        .with_context(|| format!("tag answered {out:?}"))?;
    ensure!(
        p["kind"] == "app",
        "tag --app-consistent gave a {} point ({out}); is the freeze hook failing? see ps.log",
        p["kind"]
    );
    Ok(Tagged {
        id,
        consistent: p["consistent"] == true,
        disk_roots: Vec::new(),
        written_bytes: 0,
    })
}

// ---- the journal, offline ----

/// What the master target's journal holds.
#[derive(Default)]
struct JournalStats {
    points: Vec<PointRecord>,
    data_frames: u64,
    /// Non-zero extent bytes of data frames (before compression).
    plain_bytes: u64,
    /// Bytes covered by zero extents (no payload).
    zero_bytes: u64,
    /// Payload bytes as stored (compressed or raw).
    payload_bytes: u64,
    /// Bytes of every frame, as sent and as journaled.
    frame_bytes: u64,
    /// The same three up to the first consistent point: the initial sync.
    sync_plain_bytes: u64,
    sync_zero_bytes: u64,
    sync_frame_bytes: u64,
}

/// The journal of direction `d`'s master target, opened offline (the server is
/// stopped).
fn open_journal(dir: &Path, d: &Direction) -> Result<Journal> {
    let jdir = dir.join(d.mt_data).join(GROUP).join("journal");
    let cfg = JournalConfig {
        recovery: RecoveryMode::AbsoluteConsistency,
        ..JournalConfig::default()
    };
    let (j, _) = Journal::open(Arc::new(RealFs), &jdir, GROUP, cfg)
        .with_context(|| format!("open the journal {}", jdir.display()))?;
    Ok(j)
}

/// The outcome of the replay.
struct Verify {
    point: u64,
    matches: bool,
    ms: u64,
}

/// What [`check_journal`] replays a journal onto.
#[derive(Clone, Copy)]
enum ReplayBase {
    /// Zero images: the master target created its replicas blank and retention (24 h)
    /// folded nothing into them, so its journal alone holds the disks.
    Zero,
    /// Copies of the master target's replica files: replicas that held a copy before
    /// the journal began (the reprotect's, A's disks).
    Replicas,
}

/// Reads every frame of direction `d`'s journal once (crc and blake3 are checked on
/// the way): counts points and bytes, and replays the data frames up to the newest
/// consistent point onto `base`, which is then compared with the protected disks
/// (blake3 hash lists of 64 KiB blocks). The replicas themselves are not written.
fn check_journal(
    dir: &Path,
    d: &Direction,
    base: ReplayBase,
    disk_bytes: u64,
) -> Result<(JournalStats, Verify)> {
    let t = Instant::now();
    let j = open_journal(dir, d)?;
    let newest = j
        .points()
        .iter()
        .rev()
        .find(|p| p.record.consistent)
        .context("the journal holds no consistent point")?;
    let (point, point_seq) = (newest.record.point_id, newest.seq);
    let mut imgs = Vec::new();
    for disk in DISKS {
        let copy_of = match base {
            ReplayBase::Zero => None,
            ReplayBase::Replicas => Some(dir.join(d.replica_file(disk))),
        };
        imgs.push(Replay::create(
            &dir.join(format!("replay-{disk}.img")),
            disk_bytes,
            copy_of.as_deref(),
        )?);
    }
    let mut st = JournalStats::default();
    let mut dec = Decoder::new();
    let mut synced = false;
    for r in j.read(1, j.write_seq()).context("read the journal")? {
        let (h, bytes) = r.context("read a journal frame")?;
        st.frame_bytes += bytes.len() as u64;
        if !synced {
            st.sync_frame_bytes += bytes.len() as u64;
        }
        match frame::decode(&bytes, &mut dec)
            .with_context(|| format!("decode journal frame {}", h.seq))?
        {
            Frame::Data(f) => {
                let i = DISKS
                    .iter()
                    .position(|x| *x == f.meta.disk)
                    .with_context(|| {
                        format!(
                            "journal frame {} is for unknown disk {:?}",
                            h.seq, f.meta.disk
                        )
                    })?;
                st.data_frames += 1;
                st.plain_bytes += f.plain_bytes();
                st.zero_bytes += f.zero_bytes();
                st.payload_bytes += f.payload_bytes();
                if !synced {
                    st.sync_plain_bytes += f.plain_bytes();
                    st.sync_zero_bytes += f.zero_bytes();
                }
                if h.seq < point_seq {
                    for (offset, data) in f.extents() {
                        imgs[i].apply(offset, &data).with_context(|| {
                            format!("replay journal frame {} onto {}", h.seq, DISKS[i])
                        })?;
                    }
                }
                dec.recycle(f);
            }
            Frame::Point(_, p) => {
                synced |= p.consistent;
                st.points.push(p);
            }
            other => bail!("journal frame {} is not data or a point: {other:?}", h.seq),
        }
    }
    let mut matches = true;
    for (img, disk) in imgs.iter().zip(DISKS) {
        matches &= hash(&img.path)? == hash(&dir.join(d.disk_file(disk)))?;
    }
    for img in &imgs {
        let _ = fs::remove_file(&img.path);
    }
    let verify = Verify {
        point,
        matches,
        ms: t.elapsed().as_millis() as u64,
    };
    Ok((st, verify))
}

/// Granularity at which the replay remembers which parts of an image it wrote.
const TOUCH_BLOCK_BYTES: u64 = 4096;
/// Zeros written per call when a zero extent covers written data.
static ZEROS: [u8; 1 << 20] = [0u8; 1 << 20];

/// An image being replayed: a sparse file, and which of its 4 KiB blocks were ever
/// written (a zero extent over blocks never written has nothing to do: they are
/// holes, which read as zeros, and so most of the initial sync's zero extents cost
/// no write). An image copied from a replica counts every block as written.
struct Replay {
    path: PathBuf,
    file: File,
    disk_bytes: u64,
    touched: Vec<u64>,
}

impl Replay {
    /// An image of `disk_bytes` at `path`: a copy of `copy_of`, or sparse zeros.
    fn create(path: &Path, disk_bytes: u64, copy_of: Option<&Path>) -> Result<Self> {
        let words = (disk_bytes / TOUCH_BLOCK_BYTES).div_ceil(64) as usize;
        let touched = match copy_of {
            Some(src) => {
                fs::copy(src, path)
                    .with_context(|| format!("copy {} to {}", src.display(), path.display()))?;
                vec![u64::MAX; words]
            }
            None => vec![0u64; words],
        };
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(copy_of.is_none())
            .open(path)
            .with_context(|| format!("open {}", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("stat {}", path.display()))?
            .len();
        match copy_of {
            None => file
                .set_len(disk_bytes)
                .with_context(|| format!("size {}", path.display()))?,
            Some(src) => ensure!(
                len == disk_bytes,
                "{} holds {len} bytes, not the disk's {disk_bytes}",
                src.display()
            ),
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            disk_bytes,
            touched,
        })
    }

    fn blocks(offset: u64, len: u64) -> std::ops::Range<u64> {
        offset / TOUCH_BLOCK_BYTES..(offset + len).div_ceil(TOUCH_BLOCK_BYTES)
    }

    fn apply(&mut self, offset: u64, data: &ExtentData<'_>) -> Result<()> {
        let len = match data {
            ExtentData::Bytes(b) => b.len() as u64,
            ExtentData::Zero(n) => *n,
        };
        ensure!(
            offset
                .checked_add(len)
                .is_some_and(|end| end <= self.disk_bytes),
            "extent {offset}+{len} is past the end of the disk ({} bytes)",
            self.disk_bytes
        );
        let ctx = || format!("write {}", self.path.display());
        match data {
            ExtentData::Bytes(b) => {
                self.file.write_all_at(b, offset).with_context(ctx)?;
                for k in Self::blocks(offset, b.len() as u64) {
                    self.touched[(k / 64) as usize] |= 1 << (k % 64);
                }
            }
            ExtentData::Zero(n) => {
                let any = Self::blocks(offset, *n)
                    .any(|k| self.touched[(k / 64) as usize] & (1 << (k % 64)) != 0);
                if any {
                    let mut at = offset;
                    while at < offset + n {
                        let k = (offset + n - at).min(ZEROS.len() as u64);
                        self.file
                            .write_all_at(&ZEROS[..k as usize], at)
                            .with_context(ctx)?;
                        at += k;
                    }
                }
            }
        }
        Ok(())
    }
}

fn hash(path: &Path) -> Result<[u8; 32]> {
    let list = datapath::hashing::hash_file(path, datapath::hashing::default_threads(), &|_| {})
        .with_context(|| format!("hash {}", path.display()))?;
    Ok(list.root())
}

// ---- summary ----

struct Summary<'a> {
    disk_bytes: u64,
    data_before: u64,
    sync: &'a SyncReport,
    wl: &'a Workload,
    js: &'a JournalStats,
    verify: &'a Verify,
    acks: &'a [Ack],
    points_out: &'a str,
}

fn percentile(sorted: &[u64], p: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[(sorted.len() - 1) * p / 100]
}

fn print_summary(s: &Summary<'_>) {
    let (wl, js) = (s.wl, s.js);
    let total = s.disk_bytes * DISKS.len() as u64;
    let lines: Vec<&str> = s.points_out.lines().collect();
    if let Some((header, rows)) = lines.split_first() {
        println!();
        println!(
            "master-target points --group {GROUP} (newest {} of {}):",
            rows.len().min(POINTS_SHOWN),
            rows.len()
        );
        println!("  {header}");
        for r in &rows[rows.len().saturating_sub(POINTS_SHOWN)..] {
            println!("  {r}");
        }
    }
    println!();
    println!("summary");
    let row = |key: &str, first: String, second: Option<String>| {
        println!("  {key:<10} {first}");
        if let Some(s) = second {
            println!("  {:<10} {s}", "");
        }
    };
    row(
        "disks",
        format!(
            "{}: 2 x {}, {} of data before protection",
            DISKS.join(", "),
            size(s.disk_bytes),
            size(s.data_before)
        ),
        None,
    );
    row(
        "sync",
        format!(
            "{} of disks shipped as {} of frames in {}",
            size(total),
            size(js.sync_frame_bytes),
            secs(s.sync.done_ms)
        ),
        Some(format!(
            "{} of data; {} of zero blocks cost no payload",
            size(js.sync_plain_bytes),
            size(js.sync_zero_bytes)
        )),
    );
    let wl_s = wl.elapsed_ms.max(1) as f64 / 1000.0;
    row(
        "workload",
        format!(
            "{wl_s:.1} s, {} writes of 4 KiB-1 MiB: {} captured ({:.0} MiB/s)",
            wl.writes,
            size(wl.bytes),
            wl.bytes as f64 / (1 << 20) as f64 / wl_s
        ),
        Some(format!(
            "{} write-zeroes ({}), {} flushes of both disks, {} app-consistent {}",
            wl.zero_ops,
            size(wl.zero_bytes),
            wl.flushes,
            wl.tags.len(),
            if wl.tags.len() == 1 { "tag" } else { "tags" }
        )),
    );
    let count = |f: &dyn Fn(&PointRecord) -> bool| js.points.iter().filter(|p| f(p)).count();
    let crash = count(&|p| p.kind == PointKind::Crash && p.consistent);
    let app = count(&|p| p.kind == PointKind::App && p.consistent);
    let inconsistent = count(&|p| !p.consistent);
    let newest_app = js
        .points
        .iter()
        .rev()
        .find(|p| p.kind == PointKind::App && p.consistent)
        .map_or("no app-consistent point".to_string(), |p| {
            format!(
                "newest app-consistent: point {}, cut at t+{:.1} s of the workload",
                p.point_id,
                p.time_unix_ms.saturating_sub(wl.start_unix_ms) as f64 / 1000.0
            )
        });
    row(
        "points",
        format!(
            "{}: {crash} crash-consistent, {app} app-consistent, {inconsistent} inconsistent (during the initial sync)",
            js.points.len()
        ),
        Some(newest_app),
    );
    let ratio = js.plain_bytes as f64 / js.payload_bytes.max(1) as f64;
    row(
        "shipped",
        format!(
            "{} of data -> {} of payload (zstd {ratio:.2}x) in {} frames",
            size(js.plain_bytes),
            size(js.payload_bytes),
            js.data_frames
        ),
        Some(format!(
            "{} of zero extents without payload; {} sent and journaled in all",
            size(js.zero_bytes),
            size(js.frame_bytes)
        )),
    );
    let at_end = wl
        .acks_at_end
        .iter()
        .rev()
        .find(|a| a.consistent)
        .map(|a| wl.last_write_unix_ms.saturating_sub(a.point_time_unix_ms));
    let mut lags: Vec<u64> = s
        .acks
        .iter()
        .filter(|a| {
            a.point_time_unix_ms >= wl.start_unix_ms
                && a.point_time_unix_ms <= wl.last_write_unix_ms
        })
        .map(|a| a.rpo_ms)
        .collect();
    lags.sort_unstable();
    row(
        "RPO",
        at_end.map_or(
            "no point acknowledged during the workload".to_string(),
            |ms| {
                format!(
                    "the newest acknowledged point was {} old when the writes stopped",
                    secs(ms)
                )
            },
        ),
        Some(format!(
            "cut to acknowledgement during the workload: p50 {}, max {} ({} points)",
            secs(percentile(&lags, 50)),
            secs(lags.last().copied().unwrap_or(0)),
            lags.len()
        )),
    );
    row(
        "verify",
        format!(
            "replica matches the disks at point {}: {}",
            s.verify.point,
            if s.verify.matches { "yes" } else { "NO" }
        ),
        Some(format!(
            "(the journal replayed onto zero images and hashed in {})",
            secs(s.verify.ms)
        )),
    );
}
