//! Smoke test of the networked demo (`src/bin/demo.rs`): the real binary, with both
//! servers, on tiny settings.

mod common;

use std::process::Command;

/// Proves the demo runs end to end (servers, initial sync, workload through NBD,
/// points, offline journal check, failback to the newest app point, commit, reprotect
/// in the other direction) and reports that the replica matches the disks, the
/// failed-back replicas the disks at that point, and, after a hash-diff reprotect that
/// sent some but not all of the blocks it compared, A's disks B's.
#[test]
fn demo_runs_and_verifies() {
    // The servers are another package's binaries: build them like the other tests do,
    // so the demo finds them next to itself and does not build them itself.
    common::bin_path("process-server");
    // A slow workload, so that the writes after the app-consistent point (tagged at
    // half time) change a part of the disks, not all of it: the reprotect then has
    // blocks to send and blocks to skip.
    let out = Command::new(env!("CARGO_BIN_EXE_demo"))
        .args(["--disk-mib", "32", "--seconds", "3", "--rate-mib", "8"])
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    for want in [
        "initial sync done",
        "app-consistent",
        "replica matches the disks at point",
        "replicas match the disks at point",
        "failed back, not protected",
        "reprotect  B -> A",
        "on the wire B -> A:",
    ] {
        assert!(stdout.contains(want), "no {want:?} in:\n{stdout}");
    }
    for check in [
        "replica matches the disks",
        "replicas match the disks",
        "match B's disks",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.contains(check))
            .unwrap_or_default();
        assert!(line.ends_with(": yes"), "{line}\nstdout:\n{stdout}");
    }
    // `hash-diff resync: C blocks compared, S sent (...)`
    let line = stdout
        .lines()
        .find(|l| l.contains("blocks compared"))
        .unwrap_or_else(|| panic!("no reprotect counts in:\n{stdout}"));
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    let [compared, sent, ..] = numbers[..] else {
        panic!("no counts in {line:?}");
    };
    assert_eq!(
        compared,
        2 * (32 << 20) / (64 << 10),
        "every 64 KiB block of both disks compared: {line}"
    );
    assert!(
        sent > 0 && sent < compared,
        "the reprotect sends the blocks written after the point, not all: {line}\n{stdout}"
    );
}

/// Proves a bad option is refused with a message and a non-zero exit, before any
/// server starts.
#[test]
fn demo_refuses_bad_options() {
    let out = Command::new(env!("CARGO_BIN_EXE_demo"))
        .args(["--disk-mib", "1"])
        .output()
        .expect("run the demo");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--disk-mib"), "{stderr}");
}
