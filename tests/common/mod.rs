//! Helpers shared by the end-to-end tests. Each test crate uses some of them.
#![allow(dead_code)]

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
        // Cargo gives this test process the variables of the package under test.
        blockrep::harness::strip_package_env(&mut cmd);
        let status = cmd.status().expect("run cargo build for the binaries");
        assert!(status.success(), "cargo build of the binaries failed");
    });
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    dir.join(name)
}

/// A started server whose stderr is drained into `log` by a thread (so the server never
/// blocks on a full pipe), and the port it announced with a `listening on ADDR` line.
pub struct Started {
    pub child: std::process::Child,
    pub port: u16,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

/// Spawns `cmd` with stderr piped, waits (up to `timeout`) for its `listening on ADDR`
/// log line, then until the port accepts. Panics with the log when it does not.
pub fn start_listening(mut cmd: Command, timeout: std::time::Duration) -> Started {
    use std::io::{BufRead, BufReader};
    use std::sync::{Arc, Mutex};
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
    let stderr = child.stderr.take().expect("stderr");
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(addr) = line.split("listening on ").nth(1) {
                let _ = tx.send(addr.trim().to_owned());
            }
            let mut l = sink.lock().unwrap_or_else(|e| e.into_inner());
            l.push_str(&line);
            l.push('\n');
        }
    });
    let addr = rx.recv_timeout(timeout).unwrap_or_else(|_| {
        let _ = child.kill();
        panic!(
            "{cmd:?} did not listen; log:\n{}",
            log.lock().unwrap_or_else(|e| e.into_inner())
        )
    });
    let port: u16 = addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("bad listen line {addr:?}"));
    let deadline = std::time::Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "port {port} never accepted"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Started { child, port, log }
}

/// Starts `master-target serve --config CONFIG` with its log (stderr) appended to `log`
/// and `RUST_LOG` as given; waits for the `listening on ADDR` line it prints on stdout.
/// Panics with the log when it does not start.
pub fn start_master_target(
    config: &std::path::Path,
    log: &std::path::Path,
    rust_log: &str,
) -> (std::process::Child, std::net::SocketAddr) {
    start_master_target_env(config, log, rust_log, &[])
}

/// [`start_master_target`] with more environment variables (a failpoint).
pub fn start_master_target_env(
    config: &std::path::Path,
    log: &std::path::Path,
    rust_log: &str,
    env: &[(&str, &str)],
) -> (std::process::Child, std::net::SocketAddr) {
    use std::io::{BufRead, BufReader};
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open master-target log");
    let mut child = Command::new(bin_path("master-target"))
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", rust_log)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(log_file)
        .spawn()
        .expect("start master-target serve");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout");
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read master-target stdout");
    match line
        .trim()
        .strip_prefix("listening on ")
        .and_then(|a| a.parse().ok())
    {
        Some(addr) => (child, addr),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "master target did not start: stdout {line:?}, log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        }
    }
}

/// Runs one qemu-io command against the NBD export `uri`; it must succeed. Returns its
/// output.
pub fn qemu_io(uri: &str, cmd: &str) -> String {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", uri, "-c", cmd])
        .output()
        .expect("run qemu-io (is qemu-utils installed?)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {cmd:?} on {uri}: {text}"
    );
    text
}

/// Now, in milliseconds since 1970.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A running `process-server serve`; killed on drop.
pub struct ProcessServer {
    pub child: std::process::Child,
    pub port: u16,
    log: std::sync::Arc<std::sync::Mutex<String>>,
    /// How long [`ProcessServer::wait_acked_after`] waits.
    timeout: std::time::Duration,
}

impl ProcessServer {
    /// Starts `process-server serve --config CONFIG` (RUST_LOG=info) and waits (up to
    /// `timeout`) until its NBD port accepts.
    pub fn start(config: &std::path::Path, timeout: std::time::Duration) -> Self {
        let mut cmd = Command::new(bin_path("process-server"));
        cmd.args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info");
        let Started { child, port, log } = start_listening(cmd, timeout);
        Self {
            child,
            port,
            log,
            timeout,
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs one qemu-io command against `disk`; it must succeed.
    pub fn qemu_io(&self, disk: &str, cmd: &str) {
        qemu_io(&format!("nbd://127.0.0.1:{}/{disk}", self.port), cmd);
    }

    /// Waits until the shipper logs an acknowledged consistent point cut after
    /// `after_unix_ms`.
    pub fn wait_acked_after(&self, after_unix_ms: u64) {
        let deadline = std::time::Instant::now() + self.timeout;
        loop {
            let log = self.log();
            let acked = log
                .lines()
                .filter(|l| l.contains("point acknowledged") && l.contains("consistent=true"))
                .filter_map(|l| l.split("point_time_unix_ms=").nth(1))
                .filter_map(|rest| {
                    rest.split(|c: char| !c.is_ascii_digit())
                        .next()
                        .and_then(|n| n.parse::<u64>().ok())
                })
                .any(|t| t > after_unix_ms);
            if acked {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no point after {after_unix_ms} acknowledged; log:\n{log}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// SIGTERM (a clean stop), and waits for the exit; it must succeed.
    pub fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        let st = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(st.success());
        let status = self.child.wait().expect("wait for process server");
        // Let the log thread drain the last lines.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let log = self.log();
        assert!(
            status.success(),
            "process server exit {status:?}; log:\n{log}"
        );
        log
    }
}

impl Drop for ProcessServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
