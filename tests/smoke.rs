//! End-to-end smoke test: the binaries build and answer `--version` and `--help`.

mod common;

use std::process::Command;

/// Proves both binaries start, report their version and print their help.
#[test]
fn binaries_report_version_and_help() {
    for bin in ["process-server", "master-target"] {
        let path = common::bin_path(bin);
        let out = Command::new(&path)
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", path.display()));
        assert!(out.status.success(), "{bin}: {out:?}");
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(s.contains(bin), "{bin} printed {s}");
        let out = Command::new(&path)
            .arg("--help")
            .output()
            .expect("run --help");
        assert!(out.status.success(), "{bin} --help: {out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage"));
    }
}
