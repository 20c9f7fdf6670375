//! How long a test-failover export takes to get ready with a big journal: the work
//! `master-target export` does before it listens, timed on real files, warm and cold.
//!
//! Builds (once, kept in DIR) a journal of N frames as a cut every second makes them:
//! one data frame of one random 4 KiB write (random offset of a 1 GiB disk) and one
//! point frame per cut, committed every 1,000 frames, 64 MiB segments. Then times the
//! two ways an export starts:
//!
//! - **offline** (no server runs): `Journal::open` (recovery), the frame entries from
//!   the base through the latest point, `PointIndex::build`;
//! - **live** (the server holds the journal): the published entries are in memory, so
//!   only `PointIndex::build`.
//!
//! Each is timed warm (page cache hot: the run before it read everything) and cold
//! (`sync; echo 3 > /proc/sys/vm/drop_caches` before it; needs root, skipped with a
//! note otherwise). The journal of 500,000 frames takes about 1.1 GB.
//!
//! Run: `cargo run --release --example export_ready -- --frames 500000 --dir /var/tmp/er`

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use blockrep::workload::Rng;
use clap::Parser;
use datapath::extent::ExtentData;
use datapath::frame::{self, DataFrameMeta, Encoder, PointKind, PointRecord};
use datapath::journal::{FrameEntry, Journal, JournalConfig};
use datapath::pointview::{IndexStats, PointIndex, ViewDisk};
use datapath::storage::RealFs;

const GROUP: &str = "g1";
const DISK: &str = "d0";
const DISK_BYTES: u64 = 1 << 30;
const WRITE_BYTES: usize = 4096;
const FRAMES_PER_COMMIT: u64 = 1000;

#[derive(Parser)]
#[command(about = "Time a test-failover export's readiness over a journal of N frames")]
struct Args {
    /// Frames in the journal (half data, half points).
    #[arg(long, default_value_t = 50_000)]
    frames: u64,
    /// Where the journal is built and kept (a real disk, not tmpfs, for cold numbers).
    #[arg(long, default_value = "/var/tmp/export-ready")]
    dir: PathBuf,
    /// Timed runs of each kind (the best and the worst are printed).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let jdir = args.dir.join(format!("journal-{}", args.frames));
    ensure_journal(&jdir, args.frames)?;
    let disks = [ViewDisk {
        id: DISK.into(),
        size_bytes: DISK_BYTES,
    }];
    let bytes = dir_bytes(&jdir)?;
    println!(
        "journal {}: {} frames, {:.1} MiB on disk",
        jdir.display(),
        args.frames,
        bytes as f64 / (1 << 20) as f64
    );
    let can_drop = can_drop_caches();
    if !can_drop {
        println!("(not root: cold runs skipped)");
    }
    // Warm the cache once.
    offline(&jdir, &disks)?;
    for cold in [false, true] {
        if cold && !can_drop {
            continue;
        }
        let temp = if cold { "cold" } else { "warm" };
        let mut off = Vec::new();
        let mut live = Vec::new();
        for _ in 0..args.runs {
            if cold {
                drop_caches()?;
            }
            off.push(offline(&jdir, &disks)?);
            let entries = {
                let (j, _) = open(&jdir)?;
                latest_entries(&j)?
            };
            if cold {
                drop_caches()?;
            }
            live.push(live_build(&jdir, &entries, &disks)?);
        }
        report(&format!("offline {temp}"), &off);
        report(&format!("live {temp}"), &live);
    }
    Ok(())
}

/// One timed phase list: (what, time), the CPU time of the whole run and the index
/// stats.
struct Run {
    phases: Vec<(&'static str, Duration)>,
    cpu: Duration,
    stats: IndexStats,
}

/// CPU time this thread has run (`/proc/thread-self/schedstat`): the machine is shared,
/// so wall times carry other processes' load; this does not.
fn thread_cpu() -> Duration {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let ns = s
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Duration::from_nanos(ns)
}

fn report(what: &str, runs: &[Run]) {
    let total = |r: &Run| r.phases.iter().map(|p| p.1).sum::<Duration>();
    let best = runs.iter().min_by_key(|r| total(r));
    let worst = runs.iter().max_by_key(|r| total(r));
    let (Some(best), Some(worst)) = (best, worst) else {
        return;
    };
    let phases = |r: &Run| {
        r.phases
            .iter()
            .map(|(n, d)| format!("{n} {:.1} ms", d.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "{what:>13}: ready in {:>7.1} ms (worst {:>7.1} ms, CPU {:>6.1} ms) [{}] data frames {} (tables from index files {}, from frames {})",
        total(best).as_secs_f64() * 1e3,
        total(worst).as_secs_f64() * 1e3,
        best.cpu.as_secs_f64() * 1e3,
        phases(best),
        best.stats.data_frames,
        best.stats.indexed_frames,
        best.stats.peeked_frames,
    );
}

fn open(jdir: &Path) -> Result<(Journal, datapath::journal::JournalRecovery)> {
    Journal::open(Arc::new(RealFs), jdir, GROUP, JournalConfig::default())
        .with_context(|| format!("open journal {}", jdir.display()))
}

/// The entries from the base through the latest point, as `export::entries_through`.
fn latest_entries(j: &Journal) -> Result<Vec<FrameEntry>> {
    let Some(p) = j.latest_point() else {
        bail!("the journal has no point");
    };
    (j.base_seq() + 1..=p.seq)
        .map(|s| j.entry(s).copied().context("entry missing"))
        .collect()
}

fn offline(jdir: &Path, disks: &[ViewDisk]) -> Result<Run> {
    let cpu = thread_cpu();
    let t = Instant::now();
    let (j, _) = open(jdir)?;
    let t_open = t.elapsed();
    let t = Instant::now();
    let entries = latest_entries(&j)?;
    drop(j);
    let t_entries = t.elapsed();
    let t = Instant::now();
    let (_, stats) = PointIndex::build(&RealFs, jdir, GROUP, &entries, disks)?;
    Ok(Run {
        phases: vec![
            ("open", t_open),
            ("entries", t_entries),
            ("index", t.elapsed()),
        ],
        cpu: thread_cpu() - cpu,
        stats,
    })
}

fn live_build(jdir: &Path, entries: &[FrameEntry], disks: &[ViewDisk]) -> Result<Run> {
    let cpu = thread_cpu();
    let t = Instant::now();
    let copy = entries.to_vec();
    let t_copy = t.elapsed();
    let t = Instant::now();
    let (_, stats) = PointIndex::build(&RealFs, jdir, GROUP, &copy, disks)?;
    Ok(Run {
        phases: vec![("entries", t_copy), ("index", t.elapsed())],
        cpu: thread_cpu() - cpu,
        stats,
    })
}

/// Builds the journal of `frames` frames in `jdir` unless a finished one is there.
fn ensure_journal(jdir: &Path, frames: u64) -> Result<()> {
    let done = jdir.join("built");
    if done.exists() {
        return Ok(());
    }
    if jdir.exists() {
        std::fs::remove_dir_all(jdir).with_context(|| format!("remove {}", jdir.display()))?;
    }
    println!(
        "building a journal of {frames} frames in {} ...",
        jdir.display()
    );
    let t = Instant::now();
    let (mut j, _) = open(jdir)?;
    let mut enc = Encoder::new(frame::DEFAULT_ZSTD_LEVEL);
    let mut rng = Rng::new(frames);
    let mut data = vec![0u8; WRITE_BYTES];
    let mut out = Vec::new();
    let blocks = DISK_BYTES / WRITE_BYTES as u64;
    let mut seq = 0;
    let mut point_id = 0;
    while seq < frames {
        point_id += 1;
        seq += 1;
        rng.fill(&mut data);
        let meta = DataFrameMeta {
            group: GROUP.into(),
            disk: DISK.into(),
            epoch: point_id,
        };
        let at = rng.below(blocks) * WRITE_BYTES as u64;
        enc.encode_data(&meta, seq, &[(at, ExtentData::Bytes(&data))], &mut out)?;
        j.append(&out)?;
        if seq == frames {
            break;
        }
        seq += 1;
        let rec = PointRecord {
            point_id,
            epoch: point_id,
            time_unix_ms: 1_700_000_000_000 + point_id * 1000,
            kind: PointKind::Crash,
            consistent: true,
            group: GROUP.into(),
        };
        frame::encode_point(&rec, seq, &mut out);
        j.append(&out)?;
        if seq % FRAMES_PER_COMMIT == 0 {
            j.commit()?;
        }
    }
    j.commit()?;
    drop(j);
    std::fs::write(&done, b"")?;
    println!("built in {:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}

fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)? {
        n += e?.metadata()?.len();
    }
    Ok(n)
}

fn can_drop_caches() -> bool {
    std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/sys/vm/drop_caches")
        .is_ok()
}

/// Writes dirty pages back, then drops the page cache, dentries and inodes.
fn drop_caches() -> Result<()> {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc_sync() };
    std::fs::write("/proc/sys/vm/drop_caches", b"3\n").context("drop caches")?;
    Ok(())
}

unsafe extern "C" {
    #[link_name = "sync"]
    fn libc_sync();
}
