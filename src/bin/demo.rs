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
//! configs, servers and the status polling come from [`blockrep::harness`] (shared with
//! the throughput benchmark), the journal check is the demo's own.
//!
//! Run: `cargo run --release --bin demo [-- --disk-mib 256 --seconds 10 --rate-mib 100 --keep DIR]`.
//! Any failure ends it with a non-zero exit and a message naming what failed and the
//! log to read; the directory is then kept.

use std::fs::{self, File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use blockrep::harness::{
    self, Ack, Configs, Direction, Options, POLL, ProcessServer, STOP_TIMEOUT, Setup, SyncReport,
    WorkDir, ensure_server_binaries, fmt_secs as secs, fmt_size as size, group_status, now_unix_ms,
    read_acks, run_ok, start_master_target, wait_initial_sync,
};
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
/// Time the master target has to acknowledge a point after the last write.
const ACK_TIMEOUT: Duration = Duration::from_secs(120);
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

fn main() -> ExitCode {
    let args = Args::parse();
    harness::catch_ctrl_c();
    let mut kept = None;
    let result = run(&args, &mut kept);
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) if harness::interrupted() => {
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
    let work = WorkDir::new(args.keep.as_deref(), "blockrep-demo-")?;
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
        (Err(e), work @ WorkDir::Temp(_)) if !harness::interrupted() => {
            *kept = Some(work.keep());
            Err(e)
        }
        (Err(e), _) => Err(e),
    }
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
    harness::make_certs(bin_dir, dir, &[PROTECT.ps_node, REPROTECT.ps_node])?;
    println!("  certificates for TLS 1.3 (mutual) made with `master-target certs` in certs/");
    let setup = setup(dir, &PROTECT, disk_bytes);
    let (configs, mt) = start_master_target(bin_dir, &setup)?;
    println!(
        "  master target listening on {} (TLS, log {})",
        mt.addr, PROTECT.mt_log
    );
    let ps_start_ms = now_unix_ms();
    let mut ps = ProcessServer::start(bin_dir, &setup, &configs)?;
    println!(
        "  process server: NBD on {}, a point every {CUT_INTERVAL_MS} ms, shipping to {} (log {})",
        ps.nbd_addr, mt.addr, PROTECT.ps_log
    );

    let sync = wait_sync(&mut ps, "initial sync", total_bytes, ps_start_ms)?;
    println!(
        "  initial sync done in {} (first consistent point {} acknowledged)",
        secs(sync.done_ms),
        sync.first_point
    );

    let wl = run_workload(args, &mut ps, dir, disk_bytes, &pool, &mut rng)?;
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
    let ps_log = ps.server.log.clone();
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
        let g = group_status(st, GROUP)?;
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
    let setup = setup(dir, d, disk_bytes);
    let (configs, mt) = start_master_target(bin_dir, &setup)?;
    let start_ms = now_unix_ms();
    let mut ps = ProcessServer::start(bin_dir, &setup, &configs)?;
    let sync = wait_sync(&mut ps, "reprotect", total_bytes, start_ms)?;
    let took_ms = t.elapsed().as_millis() as u64;
    let c = ReprotectCounters::from_status(&ps.status()?)?;
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

/// The demo's replication pair of direction `d` in `dir`: group [`GROUP`] of the
/// [`DISKS`], a crash-consistent cut every [`CUT_INTERVAL_MS`], harmless freeze/thaw
/// hooks, an initial sync (a hash-diff one where the replicas hold a copy).
fn setup<'a>(dir: &'a Path, d: &'a Direction, disk_bytes: u64) -> Setup<'a> {
    Setup {
        dir,
        direction: d,
        group: GROUP,
        disks: &DISKS,
        disk_bytes,
        options: Options {
            cut_interval_ms: CUT_INTERVAL_MS,
            hooks: true,
            ..Options::default()
        },
    }
}

/// [`wait_initial_sync`] with a progress line on a terminal.
fn wait_sync(
    ps: &mut ProcessServer,
    what: &str,
    total_bytes: u64,
    start_unix_ms: u64,
) -> Result<SyncReport> {
    let tty = std::io::stdout().is_terminal();
    let report = wait_initial_sync(ps, what, total_bytes, start_unix_ms, &mut |p| {
        if tty && p.state != "replicating" {
            print!(
                "\r\x1b[K  {what}: {}, {} of {} read",
                p.state,
                size(p.done_bytes),
                size(p.total_bytes)
            );
            let _ = std::io::stdout().flush();
        }
    });
    if tty {
        print!("\r\x1b[K");
        let _ = std::io::stdout().flush();
    }
    report
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
    dir: &Path,
    disk_bytes: u64,
    pool: &Pool,
    rng: &mut Rng,
) -> Result<Workload> {
    workload(args, ps, dir, disk_bytes, pool, rng).map_err(|e| {
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
    dir: &Path,
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
            let mut tagged = tag_app_consistent(ps)?;
            tagged.written_bytes = wl.bytes + wl.zero_bytes;
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

/// `process-server tag --group g1 --app-consistent`: the freeze hook, a cut, the thaw
/// hook.
fn tag_app_consistent(ps: &ProcessServer) -> Result<Tagged> {
    let t = ps.tag(true)?;
    ensure!(
        t.app_consistent,
        "tag --app-consistent gave a crash-consistent point ({}); is the freeze hook \
         failing? see {}",
        t.id,
        ps.server.log.display()
    );
    Ok(Tagged {
        id: t.id,
        consistent: t.consistent,
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
