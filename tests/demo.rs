//! Smoke test of the networked demo (`src/bin/demo.rs`): the real binary, with both
//! servers, on tiny settings.

mod common;

use std::process::Command;

/// Proves the demo runs end to end (servers, initial sync, workload through NBD,
/// points, offline journal check, failback to the newest app point, commit) and reports
/// that the replica matches the disks, and the failed-back replicas the disks at that point.
#[test]
fn demo_runs_and_verifies() {
    // The servers are another package's binaries: build them like the other tests do,
    // so the demo finds them next to itself and does not build them itself.
    common::bin_path("process-server");
    let out = Command::new(env!("CARGO_BIN_EXE_demo"))
        .args(["--disk-mib", "16", "--seconds", "2"])
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
    ] {
        assert!(stdout.contains(want), "no {want:?} in:\n{stdout}");
    }
    for check in ["replica matches the disks", "replicas match the disks"] {
        let line = stdout
            .lines()
            .find(|l| l.contains(check))
            .unwrap_or_default();
        assert!(line.ends_with(": yes"), "{line}");
    }
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
