//! The failback apply speed, measured: `datapath::failback` (the code `master-target
//! failback` runs) on real files, timed, with the replica checked byte for byte after
//! every round.
//!
//! In a directory (a temp dir, or `--dir`): a replica of `--disk-mib` holding realistic
//! data (the base), and a journal of `--mib` MiB of realistic writes (this machine's
//! files under /usr, [`realistic_bytes`]) of 64 KiB..1 MiB each at random sector-aligned
//! places, coalesced per epoch of ~64 MiB and encoded as the shipper encodes them
//! ([`EpochMap::chunks`] of 1 MiB, zstd level [`frame::DEFAULT_ZSTD_LEVEL`]), a point
//! after each epoch. Then `--rounds` times: the replica is put back to the base, the
//! failback directory removed, and [`Failback::run`] to the newest point is timed; the
//! replica is then compared with the model (blake3 per MiB).
//!
//! Printed per round and as the median: MB/s of replica bytes applied (data and zeros,
//! the `apply_mb_per_s` of `master-target failback --json`), wall and CPU seconds (user +
//! system, all threads), bytes the process wrote to storage, undo log bytes.
//!
//! Run: `cargo run --release --example failback_apply -- --mib 1024`
//! (`--disk-mib 2048 --rounds 3 --seed 1` are the defaults). With `--dir DIR` the files
//! stay there, and a rerun with the same sizes and seed reuses the journal (a profile
//! then sees only the rounds). A profile of the timed runs alone:
//!
//! ```sh
//! mkfifo /tmp/ctl
//! perf record -g --control fifo:/tmp/ctl -D -1 -- \
//!     target/release/examples/failback_apply --dir DIR --perf-ctl /tmp/ctl
//! perf report --no-children
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use blockrep::workload::{Rng, realistic_bytes};
use datapath::extent::EpochMap;
use datapath::failback::{self, Choice, Disk, Failback};
use datapath::frame::{self, DataFrameMeta, Encoder, PointKind, PointRecord};
use datapath::journal::{Journal, JournalConfig};
use datapath::storage::{OpenMode, RealFs, Storage};

const GROUP: &str = "bench";
const DISK: &str = "disk0";
/// The shipper's frame size (`process-server` `FRAME_PLAIN_BYTES_MAX`).
const FRAME_PLAIN_BYTES_MAX: u64 = 1 << 20;
/// Written bytes per epoch (one point each).
const EPOCH_WRITE_BYTES: u64 = 64 << 20;
/// Realistic bytes the writes take their data from.
const POOL_BYTES_MAX: usize = 256 << 20;
/// The model's hash granularity.
const CHECK_CHUNK_BYTES: usize = 1 << 20;
const SECTOR: u64 = 512;
/// In `--dir`: the parameters its journal was made with (a rerun with the same ones
/// reuses it), and the model's hashes.
const SETUP_FILE: &str = "setup.txt";
const HASHES_FILE: &str = "model.b3";

struct Args {
    mib: u64,
    disk_mib: u64,
    rounds: usize,
    seed: u64,
    dir: Option<PathBuf>,
    /// perf's control fifo: `enable` is written to it before each timed run, `disable`
    /// after, so that `perf record --control fifo:FIFO -D -1` sees only the runs.
    perf_ctl: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        mib: 1024,
        disk_mib: 2048,
        rounds: 3,
        seed: 1,
        dir: None,
        perf_ctl: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--mib" => a.mib = v()?.parse()?,
            "--disk-mib" => a.disk_mib = v()?.parse()?,
            "--rounds" => a.rounds = v()?.parse()?,
            "--seed" => a.seed = v()?.parse()?,
            "--dir" => a.dir = Some(PathBuf::from(v()?)),
            "--perf-ctl" => a.perf_ctl = Some(PathBuf::from(v()?)),
            "-h" | "--help" => {
                println!(
                    "failback_apply [--mib 1024] [--disk-mib 2048] [--rounds 3] [--seed 1] [--dir DIR] [--perf-ctl FIFO]"
                );
                std::process::exit(0);
            }
            _ => bail!("unknown argument {k:?} (see --help)"),
        }
    }
    ensure!(
        a.mib >= 1 && a.disk_mib >= 4 && a.rounds >= 1,
        "sizes and rounds must be positive"
    );
    Ok(a)
}

/// Milliseconds the disks were busy and sectors they wrote, over every whole disk in
/// /proc/diskstats (the disk is shared: other processes' I/O counts too).
fn disk_busy() -> (u64, u64) {
    let Ok(s) = std::fs::read_to_string("/proc/diskstats") else {
        return (0, 0);
    };
    s.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Whole virtio, SCSI or NVMe disks, not partitions or zram.
            let name = *f.get(2)?;
            let whole = (name.starts_with("vd") || name.starts_with("sd"))
                && !name.ends_with(|c: char| c.is_ascii_digit())
                || name.starts_with("nvme") && !name.contains('p');
            if !whole {
                return None;
            }
            Some((
                f.get(12)?.parse::<u64>().ok()?,
                f.get(9)?.parse::<u64>().ok()?,
            ))
        })
        .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
}

/// Tells perf (`--perf-ctl`) to start or stop counting.
fn perf_ctl(a: &Args, cmd: &str) -> Result<()> {
    if let Some(p) = &a.perf_ctl {
        let mut f = std::fs::OpenOptions::new().write(true).open(p)?;
        std::io::Write::write_all(&mut f, format!("{cmd}\n").as_bytes())?;
    }
    Ok(())
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// User + system CPU seconds of this process (all threads), from /proc/self/stat.
fn cpu_seconds() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// The base contents of the replica: the pool tiled from a seed-dependent offset.
fn write_base(
    path: &Path,
    pool: &[u8],
    disk_bytes: u64,
    model: Option<&mut Vec<u8>>,
) -> Result<()> {
    let f = RealFs.open(path, OpenMode::Create)?;
    f.set_len(disk_bytes)?;
    let mut at = 0u64;
    let mut model = model;
    while at < disk_bytes {
        let n = (disk_bytes - at).min(pool.len() as u64) as usize;
        let src = &pool[(at as usize / 7) % (pool.len() - n + 1).max(1)..][..n];
        f.write_all_at(src, at)?;
        if let Some(m) = model.as_deref_mut() {
            m[at as usize..at as usize + n].copy_from_slice(src);
        }
        at += n as u64;
    }
    f.sync_data()?;
    Ok(())
}

/// Journals `mib` MiB of writes over the model; returns the journal plain bytes.
fn write_journal(dir: &Path, pool: &[u8], a: &Args, model: &mut [u8]) -> Result<(u64, u64, u64)> {
    let disk_bytes = a.disk_mib << 20;
    let fs: Arc<dyn Storage> = Arc::new(RealFs);
    let (mut journal, _) = Journal::open(fs, &dir.join("journal"), GROUP, JournalConfig::default())
        .context("open journal")?;
    let mut rng = Rng::new(a.seed);
    let mut enc = Encoder::new(frame::DEFAULT_ZSTD_LEVEL);
    let mut map = EpochMap::new(disk_bytes);
    let mut out = Vec::new();
    let (mut written, mut plain, mut wire) = (0u64, 0u64, 0u64);
    let total = a.mib << 20;
    let mut epoch = 0;
    while written < total {
        epoch += 1;
        let mut in_epoch = 0u64;
        while in_epoch < EPOCH_WRITE_BYTES && written < total {
            // 64 KiB..1 MiB, sector-aligned, at a random sector.
            let len = ((64 << 10) + rng.below((1 << 20) - (64 << 10) + 1)) / SECTOR * SECTOR;
            let len = len.min(disk_bytes);
            let offset = rng.below((disk_bytes - len) / SECTOR + 1) * SECTOR;
            let src = rng.below((pool.len() as u64 - len) / SECTOR + 1) * SECTOR;
            let data = &pool[src as usize..(src + len) as usize];
            map.insert(offset, data)?;
            model[offset as usize..(offset + len) as usize].copy_from_slice(data);
            in_epoch += len;
            written += len;
        }
        let meta = DataFrameMeta {
            group: GROUP.into(),
            disk: DISK.into(),
            epoch,
        };
        for chunk in map.chunks(FRAME_PLAIN_BYTES_MAX) {
            let st = enc.encode_data(&meta, journal.next_seq(), &chunk, &mut out)?;
            plain += st.plain_bytes;
            wire += out.len() as u64;
            journal.append(&out)?;
        }
        map.clear();
        let point = PointRecord {
            point_id: epoch,
            epoch,
            time_unix_ms: 1_800_000_000_000 + epoch * 1000,
            kind: PointKind::Crash,
            consistent: true,
            group: GROUP.into(),
        };
        frame::encode_point(&point, journal.next_seq(), &mut out);
        journal.append(&out)?;
        journal.commit()?;
    }
    Ok((written, plain, wire))
}

fn chunk_hashes(bytes: &[u8]) -> Vec<blake3::Hash> {
    bytes.chunks(CHECK_CHUNK_BYTES).map(blake3::hash).collect()
}

fn read_hashes(path: &Path) -> Result<Vec<blake3::Hash>> {
    let b = std::fs::read(path)?;
    Ok(b.chunks_exact(32)
        .map(|c| blake3::Hash::from_bytes(c.try_into().expect("32 bytes")))
        .collect())
}

fn file_hashes(path: &Path) -> Result<Vec<blake3::Hash>> {
    let f = RealFs.open(path, OpenMode::ReadOnly)?;
    let len = f.len()?;
    let mut buf = vec![0u8; CHECK_CHUNK_BYTES];
    let mut out = Vec::new();
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(CHECK_CHUNK_BYTES as u64) as usize;
        f.read_exact_at(&mut buf[..n], at)?;
        out.push(blake3::hash(&buf[..n]));
        at += n as u64;
    }
    Ok(out)
}

struct Round {
    secs: f64,
    disk_busy_secs: f64,
    disk_written: u64,
    cpu_secs: f64,
    applied: u64,
    undo_bytes: u64,
}

fn main() -> Result<()> {
    let a = parse_args()?;
    let tmp;
    let dir = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir().context("create temp dir")?;
            tmp.path().to_path_buf()
        }
    };
    let disk_bytes = a.disk_mib << 20;
    let t = Instant::now();
    let pool = realistic_bytes(((a.mib << 20) as usize).clamp(2 << 20, POOL_BYTES_MAX));
    let replica = dir.join("replica.img");
    let setup = format!("mib {} disk_mib {} seed {}\n", a.mib, a.disk_mib, a.seed);
    let want = match std::fs::read_to_string(dir.join(SETUP_FILE)) {
        Ok(s) if s == setup => {
            println!("in {}: reusing the journal set up there", dir.display());
            read_hashes(&dir.join(HASHES_FILE))?
        }
        _ => {
            let mut model = vec![0u8; disk_bytes as usize];
            write_base(&replica, &pool, disk_bytes, Some(&mut model))?;
            let (written, plain, wire) = write_journal(&dir, &pool, &a, &mut model)?;
            let want = chunk_hashes(&model);
            drop(model);
            let flat: Vec<u8> = want.iter().flat_map(|h| *h.as_bytes()).collect();
            std::fs::write(dir.join(HASHES_FILE), flat)?;
            std::fs::write(dir.join(SETUP_FILE), &setup)?;
            println!(
                "in {}: replica {} MiB; journal: {:.0} MB written, {:.0} MB coalesced as {:.0} MB of frames ({:.2}x), {:.1} s to set up",
                dir.display(),
                a.disk_mib,
                mb(written),
                mb(plain),
                mb(wire),
                plain as f64 / wire.max(1) as f64,
                t.elapsed().as_secs_f64()
            );
            want
        }
    };

    let fs: Arc<dyn Storage> = Arc::new(RealFs);
    let (journal, _) = Journal::open(
        fs.clone(),
        &dir.join("journal"),
        GROUP,
        JournalConfig::default(),
    )?;
    let point = failback::resolve(&journal, Choice::LatestProcessed)?;
    let fb_dir = dir.join("failback");
    let mut rounds = Vec::new();
    for r in 0..a.rounds {
        write_base(&replica, &pool, disk_bytes, None)?;
        if fb_dir.exists() {
            std::fs::remove_dir_all(&fb_dir)?;
        }
        let fb = Failback::new(
            fs.clone(),
            &fb_dir,
            GROUP,
            vec![Disk {
                id: DISK.into(),
                replica: replica.clone(),
                size_bytes: disk_bytes,
            }],
        )?;
        perf_ctl(&a, "enable")?;
        let (cpu0, disk0) = (cpu_seconds(), disk_busy());
        let t = Instant::now();
        let out = fb.run(&journal, &point, &mut |_| {})?;
        let secs = t.elapsed().as_secs_f64();
        perf_ctl(&a, "disable")?;
        let disk1 = disk_busy();
        let round = Round {
            secs,
            disk_busy_secs: (disk1.0 - disk0.0) as f64 / 1e3,
            disk_written: (disk1.1 - disk0.1) * 512,
            cpu_secs: cpu_seconds() - cpu0,
            applied: out.applied.bytes(),
            undo_bytes: std::fs::metadata(fb_dir.join(failback::undo_file_name(DISK)))?.len(),
        };
        ensure!(
            file_hashes(&replica)? == want,
            "round {r}: the replica differs from the model"
        );
        println!(
            "round {r}: {:.0} MB applied in {:.2} s = {:.0} MB/s; cpu {:.2} s ({:.0}% of 2 cores); disk busy {:.0}%, {:.0} MB written; undo log {:.0} MB; replica exact",
            mb(round.applied),
            round.secs,
            mb(round.applied) / round.secs,
            round.cpu_secs,
            round.cpu_secs / round.secs / 2.0 * 100.0,
            round.disk_busy_secs / round.secs * 100.0,
            mb(round.disk_written),
            mb(round.undo_bytes),
        );
        let st = out.stages;
        println!(
            "  stages (s): saver: frames wait {:.2}, save {:.2}, hand over {:.2}; applier: check wait {:.2}, write {:.2}; checker {:.2}; committer {:.2}",
            st.frames_wait.as_secs_f64(),
            st.save.as_secs_f64(),
            st.hand_over.as_secs_f64(),
            st.check_wait.as_secs_f64(),
            st.write.as_secs_f64(),
            st.check.as_secs_f64(),
            st.commit.as_secs_f64(),
        );
        rounds.push(round);
    }
    let mut speeds: Vec<f64> = rounds.iter().map(|r| mb(r.applied) / r.secs).collect();
    speeds.sort_by(f64::total_cmp);
    println!(
        "apply MB/s: median {:.0} (min {:.0}, max {:.0}) over {} rounds",
        speeds[speeds.len() / 2],
        speeds[0],
        speeds[speeds.len() - 1],
        speeds.len()
    );
    Ok(())
}
