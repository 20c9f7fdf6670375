//! Smoke test of the throughput benchmark (`src/bin/bench.rs`): the real binary, with
//! both servers, qemu-nbd and rsync, on a tiny disk, so that it cannot rot.

mod common;

use std::process::Command;

use serde_json::Value;

/// Disk size of the smoke run.
const SIZE_BYTES: u64 = 64 << 20;
/// 64 KiB blocks of that disk, and the 5% the incremental and resync phases change.
const BLOCKS: u64 = SIZE_BYTES / (64 << 10);
const CHANGED_BLOCKS: u64 = BLOCKS * 5 / 100;
/// Seconds of the RPO phase, sampled every 100 ms.
const RPO_SECONDS: u64 = 3;

/// Proves the benchmark runs every phase end to end at a tiny size and writes every
/// figure the issue names to its JSON, each sane: throughputs and times above zero,
/// incompressible data not compressed and realistic data compressed, the hash-diff
/// resync comparing every block and sending exactly the damaged ones, one RPO sample
/// per 100 ms, and a table with a verdict on each target.
#[test]
fn bench_runs_every_phase() {
    // The servers are another package's binaries: build them like the other tests do,
    // so the benchmark finds them next to itself.
    common::bin_path("process-server");
    let json = tempfile::NamedTempFile::new().expect("temp file");
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["--size", "64M", "--rpo-seconds", &RPO_SECONDS.to_string()])
        .arg("--json")
        .arg(json.path())
        .output()
        .expect("run the benchmark");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench failed ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let text = std::fs::read_to_string(json.path()).expect("read the JSON");
    let v: Value = serde_json::from_str(&text).expect("the JSON parses");
    let num = |key: &str| {
        v[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} is not a number in:\n{text}"))
    };
    for key in [
        "capture_mb_s",
        "qemu_nbd_capture_mb_s",
        "replication_realistic_mb_s",
        "replication_incompressible_mb_s",
        "compression_ratio",
        "incremental_s",
        "rsync_incremental_s",
        "resync_s",
        "rsync_resync_s",
        "rpo_p99_ms",
        "apply_mb_s",
        "ps_rss_1g_bytes",
        "ps_rss_16g_bytes",
        "replication_realistic_ps_cpu_s_per_gb",
        "replication_realistic_mt_cpu_s_per_gb",
        "replication_realistic_ps_peak_rss_bytes",
        "replication_realistic_mt_peak_rss_bytes",
        "replication_incompressible_ps_cpu_s_per_gb",
        "replication_incompressible_mt_cpu_s_per_gb",
        "disk_write_mb_s",
        "replication_realistic_disk_bound_mb_s",
        "replication_incompressible_disk_bound_mb_s",
    ] {
        assert!(num(key) > 0.0, "{key} = {} in:\n{text}", num(key));
    }
    let p50 = num("rpo_p50_ms");
    assert!(
        p50 >= 0.0 && p50 <= num("rpo_p99_ms"),
        "p50 {p50} in:\n{text}"
    );
    assert_eq!(num("rpo_samples") as u64, RPO_SECONDS * 10, "{text}");

    // Random data crosses the wire whole, /usr's files and zero blocks compressed.
    assert!(
        num("replication_incompressible_wire_bytes") >= SIZE_BYTES as f64,
        "{text}"
    );
    assert!(num("compression_ratio") > 1.2, "{text}");
    assert!(
        num("replication_realistic_wire_bytes") < SIZE_BYTES as f64,
        "{text}"
    );

    // The incremental writes 5% of the blocks; the resync compares every block and
    // sends exactly the 5% of the replica that was damaged.
    assert_eq!(
        num("incremental_changed_bytes") as u64,
        CHANGED_BLOCKS * (64 << 10),
        "{text}"
    );
    assert_eq!(num("resync_blocks_compared") as u64, BLOCKS, "{text}");
    assert_eq!(num("resync_blocks_sent") as u64, CHANGED_BLOCKS, "{text}");
    assert_eq!(num("apply_bytes") as u64, SIZE_BYTES, "{text}");

    // The 16 GiB disk's bitmap is 16 times the 1 GiB disk's map (plus the same log).
    assert!(
        num("ps_bitmap_16g_bytes") > num("ps_bitmap_1g_bytes"),
        "{text}"
    );

    let m = &v["machine"];
    assert!(m["cores"].as_u64().is_some_and(|c| c > 0), "{text}");
    assert!(m["memory_bytes"].as_u64().is_some_and(|b| b > 0), "{text}");
    assert!(m["cpu"].as_str().is_some_and(|s| !s.is_empty()), "{text}");
    assert!(
        m["kernel"].as_str().is_some_and(|s| !s.is_empty()),
        "{text}"
    );

    // Every target has a verdict, in the JSON and in the table.
    let targets = v["targets"].as_array().expect("targets");
    let judged: Vec<&Value> = targets.iter().filter(|t| t["target"] != "-").collect();
    assert_eq!(judged.len(), 8, "{text}");
    assert!(judged.iter().all(|t| t["ok"].is_boolean()), "{text}");
    for figure in ["NBD capture", "incremental 5%", "RPO p99", "failback apply"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(figure))
            .unwrap_or_else(|| panic!("no {figure:?} row in:\n{stdout}"));
        assert!(
            line.ends_with(" ok") || line.ends_with(" MISS"),
            "{line}\n{stdout}"
        );
    }
}

/// Proves bad options are refused with a message naming them and a non-zero exit,
/// before any server starts.
#[test]
fn bench_refuses_bad_options() {
    for (args, want) in [
        (&["--size", "1M"][..], "--size"),
        (&["--size", "64M", "--only", "nonsense"][..], "--only"),
        (
            &["--size", "64M", "--rpo-seconds", "0"][..],
            "--rpo-seconds",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_bench"))
            .args(args)
            .output()
            .expect("run the benchmark");
        assert!(!out.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}
