//! Criterion benches of the data path's hot paths, each beside its baseline in the same
//! run (this machine is noisy; only ratios hold):
//!
//! | group             | ours                                   | baseline                                  |
//! |-------------------|----------------------------------------|-------------------------------------------|
//! | `encode/KIND`     | `frame::Encoder::encode_data`          | plain zstd compression of the same bytes  |
//! | `decode/KIND`     | `frame::Decoder::decode_data` + verify | plain zstd decompression of the same      |
//! | `journal`         | append 64 KiB frames + group commit    | sequential write + fdatasync, new file    |
//! | `apply`           | `apply::apply_extents` + sync          | pwrite + fdatasync; mmap write + msync    |
//!
//! KIND is `random` (incompressible), `realistic` (this machine's binaries and text
//! under /usr, as a disk holds them) and `zero90` (90% of the 64 KiB blocks zero).
//!
//! Run: `cargo bench --bench datapath` (add `-- encode` to pick a group). The README's
//! table comes from that command.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockrep::workload::{
    BLOCK_BYTES, EXTENTS_PER_FRAME, bench_meta, datasets, encode_frames, frames_of, realistic_bytes,
};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use datapath::extent::ExtentData;
use datapath::frame::{self, Decoder, Encoder};
use datapath::storage::{OpenMode, RealFs, Storage};

/// Size of each data set.
const DATA_BYTES: usize = 32 << 20;
/// Extent size: what a guest's 64 KiB writes become.
/// Extents per frame (1 MiB of plain data per frame).
/// Frames per group commit in the journal bench.
const FRAMES_PER_COMMIT: usize = 16;

fn bench_codec(c: &mut Criterion) {
    let level = frame::DEFAULT_ZSTD_LEVEL;
    for (kind, data) in datasets(DATA_BYTES) {
        let mut g = c.benchmark_group(format!("encode/{kind}"));
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_function(BenchmarkId::new("zstd_baseline", level), |b| {
            let mut cctx = zstd::bulk::Compressor::new(level).expect("zstd");
            let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(1 << 20));
            b.iter(|| {
                for chunk in data.chunks(BLOCK_BYTES * EXTENTS_PER_FRAME) {
                    out.clear();
                    cctx.compress_to_buffer(chunk, &mut out).expect("zstd");
                    black_box(&out);
                }
            })
        });
        g.bench_function(BenchmarkId::new("encode", level), |b| {
            let frames = frames_of(&data);
            let mut enc = Encoder::new(level);
            let mut out = Vec::new();
            b.iter(|| {
                for (i, exts) in frames.iter().enumerate() {
                    enc.encode_data(&bench_meta(), i as u64 + 1, exts, &mut out)
                        .expect("encode");
                    black_box(&out);
                }
            })
        });
        g.finish();

        let encoded = encode_frames(&data, level);
        let wire: usize = encoded.iter().map(Vec::len).sum();
        eprintln!(
            "{kind}: {} plain bytes encode to {wire} frame bytes (ratio {:.2})",
            data.len(),
            data.len() as f64 / wire as f64
        );
        let compressed: Vec<Vec<u8>> = data
            .chunks(BLOCK_BYTES * EXTENTS_PER_FRAME)
            .map(|c| zstd::bulk::compress(c, level).expect("zstd"))
            .collect();
        let mut g = c.benchmark_group(format!("decode/{kind}"));
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_function("zstd_baseline", |b| {
            let mut dctx = zstd::bulk::Decompressor::new().expect("zstd");
            let mut out = Vec::with_capacity(1 << 20);
            b.iter(|| {
                for z in &compressed {
                    out.clear();
                    dctx.decompress_to_buffer(z, &mut out).expect("zstd");
                    black_box(&out);
                }
            })
        });
        g.bench_function("decode_verify", |b| {
            let mut dec = Decoder::new();
            b.iter(|| {
                for f in &encoded {
                    black_box(dec.decode_data(f).expect("decode"));
                }
            })
        });
        g.finish();
    }
}

fn bench_journal(c: &mut Criterion) {
    let data = realistic_bytes(64 << 20);
    let frames = encode_frames(&data, frame::DEFAULT_ZSTD_LEVEL);
    let bytes: u64 = frames.iter().map(|f| f.len() as u64).sum();
    let mut g = c.benchmark_group("journal");
    g.throughput(Throughput::Bytes(bytes));
    g.sample_size(10);
    g.bench_function("write_fdatasync_baseline", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = tempfile::tempdir().expect("tempdir");
                let t = Instant::now();
                let f = RealFs
                    .open(&dir.path().join("plain"), OpenMode::CreateNew)
                    .expect("open");
                let mut off = 0u64;
                for batch in frames.chunks(FRAMES_PER_COMMIT) {
                    for fr in batch {
                        f.write_all_at(fr, off).expect("write");
                        off += fr.len() as u64;
                    }
                    f.sync_data().expect("sync");
                }
                total += t.elapsed();
            }
            total
        })
    });
    g.bench_function("append_group_commit", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = tempfile::tempdir().expect("tempdir");
                let t = Instant::now();
                let fs: Arc<dyn Storage> = Arc::new(RealFs);
                let (mut j, _) = datapath::journal::Journal::open(
                    fs,
                    dir.path(),
                    "g",
                    datapath::journal::JournalConfig::default(),
                )
                .expect("open journal");
                for batch in frames.chunks(FRAMES_PER_COMMIT) {
                    for fr in batch {
                        j.append(fr).expect("append");
                    }
                    j.commit().expect("commit");
                }
                total += t.elapsed();
            }
            total
        })
    });
    g.finish();
}

fn bench_apply(c: &mut Criterion) {
    let data = realistic_bytes(64 << 20);
    let target_bytes = data.len() as u64;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replica");
    // Overwrite in place: a replica's blocks exist already (new blocks cost 10x more).
    std::fs::write(&path, vec![1u8; data.len()]).expect("prefill");
    let extents: Vec<(u64, ExtentData<'_>)> = data
        .chunks(BLOCK_BYTES)
        .enumerate()
        .map(|(i, c)| ((i * BLOCK_BYTES) as u64, ExtentData::Bytes(c)))
        .collect();
    let mut g = c.benchmark_group("apply");
    g.throughput(Throughput::Bytes(target_bytes));
    g.sample_size(10);
    g.bench_function("pwrite_fdatasync_baseline", |b| {
        let f = RealFs.open(&path, OpenMode::Existing).expect("open");
        b.iter(|| {
            for (off, d) in &extents {
                if let ExtentData::Bytes(bytes) = d {
                    f.write_all_at(bytes, *off).expect("write");
                }
            }
            f.sync_data().expect("sync");
        })
    });
    // A failback maps the replica once and touches each page once: map anew per
    // iteration so page faults count, as they would there.
    g.bench_function("mmap_msync", |b| {
        b.iter(|| {
            let mut m = RealFs.map_mut(&path).expect("map");
            for (off, d) in &extents {
                if let ExtentData::Bytes(bytes) = d {
                    let o = *off as usize;
                    m.bytes_mut()[o..o + bytes.len()].copy_from_slice(bytes);
                }
            }
            m.flush_range(0, data.len()).expect("msync");
        })
    });
    g.bench_function("apply_extents", |b| {
        let f = RealFs.open(&path, OpenMode::Existing).expect("open");
        b.iter(|| {
            for batch in extents.chunks(EXTENTS_PER_FRAME) {
                datapath::apply::apply_extents(f.as_ref(), target_bytes, batch, None)
                    .expect("apply");
            }
            f.sync_data().expect("sync");
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_codec, bench_journal, bench_apply
}
criterion_main!(benches);
