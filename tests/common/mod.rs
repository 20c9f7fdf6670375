//! Helpers shared by the end-to-end tests.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Once;

/// The path of a workspace binary, built first if needed. `cargo test` builds only the
/// test harnesses of binary crates, not the binaries themselves, so the first call runs
/// `cargo build` for both (same profile and target directory as this test).
pub fn bin_path(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "process-server",
            "-p",
            "master-target",
        ]);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build for the binaries");
        assert!(status.success(), "cargo build of the binaries failed");
    });
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    dir.join(name)
}
