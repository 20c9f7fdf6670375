//! End-to-end smoke test: the binaries build and answer `--version`.

use std::path::PathBuf;
use std::process::Command;

/// The path of a workspace binary next to this test executable (`cargo test
/// --workspace` builds them into the same target directory).
fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    dir.join(name)
}

/// Proves both binaries start and report their version.
#[test]
fn binaries_report_version() {
    for bin in ["process-server", "master-target"] {
        let out = Command::new(bin_path(bin))
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("run {bin}: {e}"));
        assert!(out.status.success(), "{bin}: {out:?}");
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(s.contains(bin), "{bin} printed {s}");
    }
}
