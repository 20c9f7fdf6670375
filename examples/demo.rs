//! The data path end to end on real files, in one process: the library half of the
//! product on an embedded default (the networked demo with both binaries replaces it
//! with the replication issue).
//!
//! In a temp dir: a source disk of realistic data (this machine's files under /usr),
//! replica seeded as a copy of it. A workload of 64 KiB writes and trims goes through
//! write capture's order (dirty bitmap marked, backing disk written, spool appended);
//! every epoch is cut into a recovery point (every third one app-consistent). The
//! shipper coalesces each epoch, encodes zstd + blake3 + crc32 frames, and the journal
//! commits them (one fsync per epoch); the "ack" releases the spool and clears the
//! bitmap. Then failback with `datapath::failback` (the code `master-target failback`
//! runs): the replica goes to the latest app-consistent point (with an undo log), is
//! checked block for block against the source as it was at that cut, then changes point
//! to the latest one (through the undo log) and is checked again, then commits.
//!
//! Run: `cargo run --release --example demo [-- DISK_MIB [EPOCHS]]`

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use blockrep::workload::{Rng, realistic_bytes};
use datapath::bitmap::{Bitmap, BitmapConfig};
use datapath::extent::{EpochMap, Extent};
use datapath::failback::{self, Choice, Disk, Failback};
use datapath::frame::{self, DataFrameMeta, Encoder, PointKind, PointRecord};
use datapath::hashing::{self, HashList};
use datapath::journal::{Journal, JournalConfig};
use datapath::spool::{Spool, SpoolConfig, SpoolEntry, SpoolRecordRef};
use datapath::storage::{OpenMode, RealFs, Storage};

const GROUP: &str = "demo";
const DISK: &str = "disk0";
const WRITE_BYTES: usize = 64 << 10;
const FRAME_BYTES_MAX: u64 = 1 << 20;

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn hash(path: &Path) -> Result<HashList> {
    hashing::hash_file(path, hashing::default_threads(), &|_| {})
        .with_context(|| format!("hash {}", path.display()))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let disk_mib: u64 = args.first().map_or(Ok(256), |s| s.parse())?;
    let epochs: u64 = args.get(1).map_or(Ok(8), |s| s.parse())?;
    ensure!(
        disk_mib >= 4 && epochs >= 1,
        "need DISK_MIB >= 4 and EPOCHS >= 1"
    );
    let disk_bytes = disk_mib << 20;

    let tmp = tempfile::tempdir().context("create temp dir")?;
    let dir = tmp.path();
    let fs: Arc<dyn Storage> = Arc::new(RealFs);
    println!("demo in {} (removed at exit)", dir.display());

    // The protected disk and its replica, equal at protection time.
    let t = Instant::now();
    let source_path = dir.join("source.img");
    let replica_path = dir.join("replica.img");
    let content = realistic_bytes(disk_bytes as usize);
    std::fs::write(&source_path, &content).context("write source disk")?;
    std::fs::write(&replica_path, &content).context("write replica")?;
    drop(content);
    println!(
        "disk: {disk_mib} MiB of this machine's files under /usr, replica seeded ({:.1} s)",
        t.elapsed().as_secs_f64()
    );

    let source = fs.open(&source_path, OpenMode::Existing)?;
    let mut bitmap = Bitmap::create(
        fs.as_ref(),
        &dir.join("bitmap"),
        disk_bytes,
        BitmapConfig::default(),
    )
    .context("create dirty bitmap")?;
    let spool_cfg = SpoolConfig {
        segment_bytes_max: 64 << 20,
        spool_bytes_max: 4 << 30,
    };
    let (mut spool, _) =
        Spool::open(fs.clone(), &dir.join("spool"), spool_cfg).context("open spool")?;

    // Capture: each epoch writes ~3% of the disk in 64 KiB writes (half of them into a
    // hot 10% of the disk, as real workloads do), and trims one range.
    let mut rng = Rng::new(2026);
    let writes_per_epoch = (disk_bytes / WRITE_BYTES as u64 / 32).max(4);
    let blocks = disk_bytes / WRITE_BYTES as u64;
    let pool = realistic_bytes(8 << 20);
    let (mut captured_bytes, mut captured_writes, mut log_syncs) = (0u64, 0u64, 0u64);
    let mut app_point = None;
    let mut app_hashes = None;
    let t = Instant::now();
    for epoch in 1..=epochs {
        for _ in 0..writes_per_epoch {
            let block = if rng.below(2) == 0 {
                rng.below(blocks / 10 + 1)
            } else {
                rng.below(blocks)
            };
            let offset = block.min(blocks - 1) * WRITE_BYTES as u64;
            let src = rng.below((pool.len() - WRITE_BYTES) as u64 / 512) as usize * 512;
            let data = &pool[src..src + WRITE_BYTES];
            let ext = Extent::new(offset, WRITE_BYTES as u64, disk_bytes)?;
            log_syncs += bitmap.mark(&[ext])?.log_synced as u64;
            source.write_all_at(data, offset)?;
            spool.append(&SpoolRecordRef::Write {
                epoch,
                disk: DISK,
                offset,
                data,
            })?;
            captured_bytes += WRITE_BYTES as u64;
            captured_writes += 1;
        }
        let trim_len = 16 * WRITE_BYTES as u64;
        let trim_at = rng.below(blocks - 16) * WRITE_BYTES as u64;
        bitmap.mark(&[Extent::new(trim_at, trim_len, disk_bytes)?])?;
        source.write_all_at(&vec![0; trim_len as usize], trim_at)?;
        spool.append(&SpoolRecordRef::Zero {
            epoch,
            disk: DISK,
            offset: trim_at,
            len: trim_len,
        })?;

        // The cut: every write before it is in the epoch; FLUSH-like durability.
        let app = epoch % 3 == 0;
        source.sync_data()?;
        spool.append(&SpoolRecordRef::Cut {
            epoch,
            point_id: epoch,
            time_unix_ms: 1_800_000_000_000 + epoch * 1000,
            app_consistent: app,
            consistent: true,
        })?;
        spool.sync()?;
        if app {
            app_point = Some(epoch);
            app_hashes = Some(hash(&source_path)?);
        }
    }
    let capture_s = t.elapsed().as_secs_f64();
    println!(
        "captured: {captured_writes} writes, {:.1} MB in {epochs} epochs; {log_syncs} hot-region log syncs; spool {:.1} MB",
        mb(captured_bytes),
        mb(spool.used_bytes())
    );

    // Ship: coalesce each epoch, encode, journal with one commit per epoch, then ack.
    let t = Instant::now();
    let (mut journal, _) = Journal::open(
        fs.clone(),
        &dir.join("journal"),
        GROUP,
        JournalConfig::default(),
    )
    .context("open journal")?;
    let mut enc = Encoder::new(frame::DEFAULT_ZSTD_LEVEL);
    let mut map = EpochMap::new(disk_bytes);
    let mut out = Vec::new();
    let (mut plain, mut wire, mut frames) = (0u64, 0u64, 0u64);
    let records: Vec<_> = spool
        .read_from(spool.first_seq())
        .collect::<Result<_, _>>()?;
    for rec in records {
        match rec.entry {
            SpoolEntry::Write { offset, data, .. } => map.insert(offset, &data)?,
            SpoolEntry::Zero { offset, len, .. } => map.insert_zero(offset, len)?,
            SpoolEntry::Cut {
                epoch,
                point_id,
                time_unix_ms,
                app_consistent,
                ..
            } => {
                let meta = DataFrameMeta {
                    group: GROUP.into(),
                    disk: DISK.into(),
                    epoch,
                };
                for chunk in map.chunks(FRAME_BYTES_MAX) {
                    let st = enc.encode_data(&meta, journal.next_seq(), &chunk, &mut out)?;
                    plain += st.plain_bytes;
                    wire += out.len() as u64;
                    frames += 1;
                    journal.append(&out)?;
                }
                let kind = if app_consistent {
                    PointKind::App
                } else {
                    PointKind::Crash
                };
                let point = PointRecord {
                    point_id,
                    epoch,
                    time_unix_ms,
                    kind,
                    consistent: true,
                    group: GROUP.into(),
                };
                frame::encode_point(&point, journal.next_seq(), &mut out);
                journal.append(&out)?;
                journal.commit()?;
                // The master target's ack: forget the spooled epoch, clear its blocks.
                spool.release(rec.seq)?;
                for e in map.extents() {
                    bitmap.clear(e)?;
                }
                map.clear();
            }
        }
    }
    let ship_s = t.elapsed().as_secs_f64();
    println!(
        "shipped: {frames} frames, {:.1} MB of coalesced data as {:.1} MB of frames (compression {:.2}x) in {:.2} s ({:.0} MB/s, one core); dirty blocks left {}",
        mb(plain),
        mb(wire),
        plain as f64 / wire.max(1) as f64,
        ship_s,
        mb(plain) / ship_s,
        bitmap.dirty_blocks()
    );
    println!("capture took {capture_s:.2} s; points in the journal:");
    for p in journal.points() {
        println!(
            "  point {:>3}  seq {:>5}  {}",
            p.record.point_id,
            p.seq,
            match p.record.kind {
                PointKind::App => "app-consistent",
                PointKind::Crash => "crash-consistent",
            }
        );
    }

    // Failback to the latest app-consistent point, verified, then change of point.
    let Some(app_id) = app_point else {
        bail!("no app-consistent point: run with EPOCHS >= 3");
    };
    // The library's failback: undo log per disk, progress state, re-read check.
    let fb = Failback::new(
        fs.clone(),
        &dir.join("failback"),
        GROUP,
        vec![Disk {
            id: DISK.into(),
            replica: replica_path.clone(),
            size_bytes: disk_bytes,
        }],
    )?;
    let point = failback::resolve(&journal, Choice::LatestApp)?;
    ensure!(
        point.record.point_id == app_id,
        "the latest app point is not {app_id}"
    );
    let t = Instant::now();
    let out = fb.run(&journal, &point, &mut |_| {})?;
    let secs = t.elapsed().as_secs_f64();
    let bytes = out.applied.bytes();
    let ok = hash(&replica_path)?.hashes == app_hashes.context("app hashes")?.hashes;
    println!(
        "failback to latest app-consistent point {app_id}: {:.1} MB applied in {secs:.2} s ({:.0} MB/s), replica {}",
        mb(bytes),
        mb(bytes) / secs,
        if ok {
            "matches the source at that cut, block for block"
        } else {
            "DIFFERS"
        }
    );
    ensure!(ok, "replica differs from the source at point {app_id}");

    let t = Instant::now();
    let point = failback::resolve(&journal, Choice::LatestProcessed)?;
    let latest = point.record.point_id;
    let out = fb.run(&journal, &point, &mut |_| {})?;
    let ok = hash(&replica_path)?.hashes == hash(&source_path)?.hashes;
    println!(
        "change of point to latest {latest}: undo replayed ({:.1} MB) and {:.1} MB applied in {:.2} s, replica {}",
        mb(out.reverted_bytes),
        mb(out.applied.bytes()),
        t.elapsed().as_secs_f64(),
        if ok {
            "matches the source now, block for block"
        } else {
            "DIFFERS"
        }
    );
    ensure!(ok, "replica differs from the source at point {latest}");
    drop(journal);
    fb.commit(&dir.join("journal"))?;
    bitmap.flush()?;
    Ok(())
}
