//! Running the product's two servers from a program: what the networked demo
//! (`src/bin/demo.rs`) and the throughput benchmark (`src/bin/bench.rs`) share.
//!
//! Both start the release binaries `master-target serve` and `process-server serve` on
//! loopback, talking TLS 1.3 with mutual certificates made by `master-target certs`, in
//! a work directory of their own, and watch them as an operator would: the process
//! server's `status --json` and its log's `point acknowledged` lines. This module
//! holds that machinery, so neither binary copies the other:
//!
//! - finding or building the server binaries next to the running executable
//!   ([`ensure_server_binaries`]), the work directory ([`WorkDir`]), the certificates
//!   ([`make_certs`]);
//! - one replication pair in a work dir: file names ([`Direction`]), what is protected
//!   and how ([`Setup`], [`Options`]), both configs ([`write_configs`]);
//! - the running servers ([`Server`], [`MasterTarget`], [`ProcessServer`]), their CPU
//!   time and peak memory ([`Usage`]), clean stops, and a kill on drop so that no
//!   server outlives an error;
//! - acknowledged points ([`Ack`], from the process server's log), waits for an
//!   acknowledgement after a moment ([`ProcessServer::wait_ack_after`]) and for the
//!   initial sync ([`wait_initial_sync`]), cuts on demand ([`ProcessServer::tag`]);
//! - Ctrl-C ([`catch_ctrl_c`]): every wait checks it, so a program stops its servers and
//!   cleans up instead of dying on the spot;
//! - figures for people ([`fmt_size`], [`fmt_secs`]).
//!
//! Errors are `anyhow` errors that name what failed and the log to read.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};

/// Time a server has to start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a server has to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the waits look at logs and status.
pub const POLL: Duration = Duration::from_millis(50);
/// Time the initial sync may take per GiB of disks (plus a minute).
const SYNC_TIMEOUT_PER_GIB: Duration = Duration::from_secs(60);
/// How often [`wait_initial_sync`] asks the process server for its status.
const SYNC_STATUS_EVERY: Duration = Duration::from_millis(200);

// ---- interruption ----

/// Set by Ctrl-C; every wait checks it.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// True once Ctrl-C was pressed (after [`catch_ctrl_c`]).
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// An error once Ctrl-C was pressed.
pub fn check_interrupt() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Catches Ctrl-C on a thread of its own, so that the program stops its servers and
/// removes its temp dir instead of dying on the spot: the waits of this module fail with
/// "interrupted" from then on.
pub fn catch_ctrl_c() {
    let _ = std::thread::Builder::new().name("ctrl-c".into()).spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        if rt.block_on(tokio::signal::ctrl_c()).is_ok() {
            INTERRUPTED.store(true, Ordering::SeqCst);
        }
    });
}

// ---- figures ----

/// Milliseconds since the Unix epoch (the servers' point times use the same clock).
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Bytes with a binary unit: `96.0 KiB`, `812.4 MiB`, `1.21 GiB`.
pub fn fmt_size(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// Milliseconds as seconds: `1.25 s`.
pub fn fmt_secs(ms: u64) -> String {
    format!("{:.2} s", ms as f64 / 1000.0)
}

// ---- binaries, work dir, certificates ----

/// Makes sure `process-server` and `master-target` sit next to the running executable
/// and are not older than it; builds them with the cargo that ran us (same profile)
/// otherwise. Returns their directory.
pub fn ensure_server_binaries() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("find the running executable")?;
    let dir = exe
        .parent()
        .context("the running executable has no directory")?
        .to_path_buf();
    let built = |p: &Path| fs::metadata(p).and_then(|m| m.modified());
    let exe_time = built(&exe).with_context(|| format!("stat {}", exe.display()))?;
    let stale = ["process-server", "master-target"]
        .iter()
        .any(|b| built(&dir.join(b)).map_or(true, |t| t < exe_time));
    if !stale {
        return Ok(dir);
    }
    let release = !cfg!(debug_assertions);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    println!(
        "building process-server and master-target ({}) next to {}",
        if release { "release" } else { "debug" },
        exe.display()
    );
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "-p", "process-server", "-p", "master-target"])
        .arg("--manifest-path")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"));
    if release {
        cmd.arg("--release");
    }
    strip_package_env(&mut cmd);
    let status = cmd
        .status()
        .with_context(|| format!("run {} build", Path::new(&cargo).display()))?;
    ensure!(
        status.success(),
        "cargo build of the servers failed ({status})"
    );
    for b in ["process-server", "master-target"] {
        ensure!(
            dir.join(b).exists(),
            "cargo built {b}, but not into {} (another target dir or profile?); build it \
             there, e.g. `cargo build {}-p process-server -p master-target`",
            dir.display(),
            if release { "--release " } else { "" }
        );
    }
    Ok(dir)
}

/// Removes from `cmd`'s environment the variables cargo gives the process of a
/// package (`cargo run`, `cargo test`): build scripts that watch them (ring's watches
/// `CARGO_MANIFEST_DIR`, `CARGO_PKG_NAME`, ...) would see them change between a nested
/// `cargo build` and the next plain one, and each would rebuild ring and everything
/// above it.
pub fn strip_package_env(cmd: &mut Command) {
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_EXE_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_MANIFEST_LINKS",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
            ]
            .contains(&name)
        {
            cmd.env_remove(name);
        }
    }
}

/// The work directory: a temp dir removed when dropped, or one the user named, kept.
pub enum WorkDir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl WorkDir {
    /// `keep` (created; it must be empty if it exists), or a new temp dir named
    /// `<prefix>XXXXXX`.
    pub fn new(keep: Option<&Path>, prefix: &str) -> Result<Self> {
        let Some(dir) = keep else {
            return Ok(Self::Temp(
                tempfile::Builder::new()
                    .prefix(prefix)
                    .tempdir()
                    .context("create a temp dir")?,
            ));
        };
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("resolve {}", dir.display()))?;
        let empty = fs::read_dir(&dir)
            .with_context(|| format!("list {}", dir.display()))?
            .next()
            .is_none();
        ensure!(
            empty,
            "--keep {}: the directory is not empty",
            dir.display()
        );
        Ok(Self::Kept(dir))
    }

    pub fn path(&self) -> &Path {
        match self {
            Self::Temp(t) => t.path(),
            Self::Kept(p) => p,
        }
    }

    /// Keeps the directory (a temp dir is no longer removed); returns its path.
    pub fn keep(self) -> PathBuf {
        match self {
            Self::Temp(t) => t.keep(),
            Self::Kept(p) => p,
        }
    }
}

/// `master-target certs --out certs` in `dir`: a CA, the master target's certificate
/// (loopback names) and one certificate per process server node in `ps_nodes`.
pub fn make_certs(bin_dir: &Path, dir: &Path, ps_nodes: &[&str]) -> Result<()> {
    let mut cmd = Command::new(bin_dir.join("master-target"));
    cmd.args(["certs", "--out", "certs"]).current_dir(dir);
    for n in ps_nodes {
        cmd.args(["--process-server", n]);
    }
    run_ok(&mut cmd, "master-target certs")?;
    Ok(())
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {what}"))?;
    ensure!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---- one replication pair ----

/// One direction of replication in a work dir: the files each server reads and
/// writes, and which files are the protected disks and which the replicas. Every path
/// is relative to the work dir.
pub struct Direction {
    pub mt_config: &'static str,
    pub mt_data: &'static str,
    pub mt_node: &'static str,
    pub mt_log: &'static str,
    pub ps_config: &'static str,
    pub ps_state: &'static str,
    pub ps_log: &'static str,
    /// The process server's node id; `certs/process-server-<node>.pem` is its
    /// certificate.
    pub ps_node: &'static str,
    /// The protected disks are `<disk_prefix><disk>.img`.
    pub disk_prefix: &'static str,
    /// The master target's replicas are `<replica_prefix><disk>.img`.
    pub replica_prefix: &'static str,
}

impl Direction {
    pub fn disk_file(&self, disk: &str) -> String {
        format!("{}{disk}.img", self.disk_prefix)
    }

    pub fn replica_file(&self, disk: &str) -> String {
        format!("{}{disk}.img", self.replica_prefix)
    }
}

/// How the process server tracks and what its group runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// `tracking.cut_interval_ms`: a crash-consistent point this often.
    pub cut_interval_ms: u64,
    /// `tracking.spool_bytes_max`; `None`: the server's default.
    pub spool_bytes_max: Option<u64>,
    /// `tracking.initial_sync`: false only when every replica already equals its disk.
    pub initial_sync: bool,
    /// Harmless freeze and thaw hooks (a line each into `hooks.log`), so that
    /// `tag --app-consistent` gives app-consistent points.
    pub hooks: bool,
}

impl Default for Options {
    /// 1 s cuts, the default spool, an initial sync, no hooks.
    fn default() -> Self {
        Self {
            cut_interval_ms: 1000,
            spool_bytes_max: None,
            initial_sync: true,
            hooks: false,
        }
    }
}

/// What one replication pair protects, where, and how.
pub struct Setup<'a> {
    /// The work dir: configs, logs and data of both servers live in it.
    pub dir: &'a Path,
    pub direction: &'a Direction,
    /// The consistency group of the disks.
    pub group: &'a str,
    /// Disk ids (NBD export names); the files come from the direction.
    pub disks: &'a [&'a str],
    /// Size of every disk.
    pub disk_bytes: u64,
    pub options: Options,
}

impl Setup<'_> {
    /// The path of disk `disk`'s protected file.
    pub fn disk_path(&self, disk: &str) -> PathBuf {
        self.dir.join(self.direction.disk_file(disk))
    }

    /// The path of disk `disk`'s replica.
    pub fn replica_path(&self, disk: &str) -> PathBuf {
        self.dir.join(self.direction.replica_file(disk))
    }
}

/// The config files of both servers.
pub struct Configs {
    pub mt: PathBuf,
    pub ps: PathBuf,
}

/// Writes both servers' configs of `s` into its work dir: the master target listens on
/// `mt_addr` and journals into its data dir; the process server serves the disks over
/// NBD on a free loopback port and ships to `mt_addr` as its node, as [`Options`] say.
/// TLS 1.3 with the certificates [`make_certs`] made in `certs/`.
pub fn write_configs(s: &Setup<'_>, mt_addr: SocketAddr) -> Result<Configs> {
    let d = s.direction;
    let (mt_data, mt_node, ps_state, node, group) =
        (d.mt_data, d.mt_node, d.ps_state, d.ps_node, s.group);
    let o = &s.options;
    let mut mt = format!(
        "# master target of a blockrep harness run\n\
         listen = \"{mt_addr}\"\n\
         data_dir = \"{mt_data}\"\n\
         node = \"{mt_node}\"\n\n\
         [tls]\nca = \"certs/ca.pem\"\ncert = \"certs/master-target.pem\"\nkey = \"certs/master-target.key\"\n\n\
         [[group]]\nid = \"{group}\"\n"
    );
    let mut tracking = format!(
        "state_dir = \"{ps_state}\"\ncut_interval_ms = {}\ninitial_sync = {}\n",
        o.cut_interval_ms, o.initial_sync
    );
    if let Some(max) = o.spool_bytes_max {
        tracking.push_str(&format!("spool_bytes_max = {max}\n"));
    }
    let hooks = if o.hooks {
        "freeze = \"echo freeze >> hooks.log\"\n\
         thaw = \"echo thaw >> hooks.log\"\n\
         hook_timeout_ms = 5000\n"
    } else {
        ""
    };
    let mut ps = format!(
        "# process server of a blockrep harness run\n\
         [nbd]\nlisten = \"127.0.0.1:0\"\n\n\
         [tracking]\n{tracking}\n\
         [target]\naddress = \"{mt_addr}\"\nnode = \"{node}\"\n\
         ca = \"certs/ca.pem\"\ncert = \"certs/process-server-{node}.pem\"\nkey = \"certs/process-server-{node}.key\"\n\n\
         [[group]]\nid = \"{group}\"\n{hooks}"
    );
    for disk in s.disks {
        let (path, replica) = (d.disk_file(disk), d.replica_file(disk));
        let disk_bytes = s.disk_bytes;
        mt.push_str(&format!(
            "\n[[group.disk]]\nid = \"{disk}\"\nsize = {disk_bytes}\nreplica = \"{replica}\"\n"
        ));
        ps.push_str(&format!(
            "\n[[group.disk]]\nid = \"{disk}\"\npath = \"{path}\"\nsize = {disk_bytes}\n"
        ));
    }
    let configs = Configs {
        mt: s.dir.join(d.mt_config),
        ps: s.dir.join(d.ps_config),
    };
    fs::write(&configs.mt, mt).with_context(|| format!("write {}", configs.mt.display()))?;
    fs::write(&configs.ps, ps).with_context(|| format!("write {}", configs.ps.display()))?;
    Ok(configs)
}

// ---- servers ----

/// CPU time and memory of a running process, from `/proc/PID/stat` and `status`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// User plus system CPU time so far, in seconds.
    pub cpu_s: f64,
    /// Peak resident set size (`VmHWM`).
    pub peak_rss_bytes: u64,
    /// Resident set size now (`VmRSS`).
    pub rss_bytes: u64,
}

impl Usage {
    /// The usage of process `pid` now.
    pub fn of(pid: u32) -> Result<Self> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("read /proc/{pid}/stat"))?;
        // The command name (field 2) is in parentheses and may hold spaces: count the
        // fields after its closing parenthesis. utime and stime are fields 14 and 15.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .with_context(|| format!("/proc/{pid}/stat: no command name"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| -> Result<u64> {
            fields
                .get(i)
                .and_then(|f| f.parse().ok())
                .with_context(|| format!("/proc/{pid}/stat: field {} is not a number", i + 3))
        };
        // Field k (1-based) is fields[k - 3].
        let cpu_ticks = ticks(14 - 3)? + ticks(15 - 3)?;
        let status = fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("read /proc/{pid}/status"))?;
        let kib = |key: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok(Self {
            cpu_s: cpu_ticks as f64 / clock_ticks_per_s() as f64,
            peak_rss_bytes: kib("VmHWM:") * 1024,
            rss_bytes: kib("VmRSS:") * 1024,
        })
    }
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`), 100 if it cannot be asked.
fn clock_ticks_per_s() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// A server process with its log file; killed on drop unless it was stopped.
pub struct Server {
    pub name: &'static str,
    pub child: Child,
    pub log: PathBuf,
}

impl Server {
    /// Starts `cmd` in `dir` with stderr appended to `dir/log` (`RUST_LOG=info`).
    pub fn spawn(name: &'static str, mut cmd: Command, dir: &Path, log: &str) -> Result<Self> {
        let log = dir.join(log);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("open {}", log.display()))?;
        let child = cmd
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stderr(file)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        Ok(Self { name, child, log })
    }

    /// Fails (naming the log) if the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait().context("wait")? {
            bail!(
                "{} exited ({status}); its log: {}",
                self.name,
                self.log.display()
            );
        }
        Ok(())
    }

    /// Its CPU time and memory now.
    pub fn usage(&self) -> Result<Usage> {
        Usage::of(self.child.id()).with_context(|| format!("the {}'s usage", self.name))
    }

    /// SIGTERM, and waits for a clean exit.
    pub fn stop(mut self, timeout: Duration) -> Result<()> {
        let pid = self.child.id().to_string();
        let st = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .context("run kill")?;
        ensure!(st.success(), "kill -TERM {pid} ({}) failed", self.name);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().context("wait")? {
                ensure!(
                    status.success(),
                    "{} exited with {status} after SIGTERM; its log: {}",
                    self.name,
                    self.log.display()
                );
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not exit within {} s of SIGTERM; its log: {}",
                    self.name,
                    timeout.as_secs(),
                    self.log.display()
                );
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The running master target.
pub struct MasterTarget {
    pub server: Server,
    pub addr: SocketAddr,
}

/// Picks a free loopback port for the master target of `s`, writes both configs and
/// starts it. A port taken by someone else between the pick and the bind is retried.
pub fn start_master_target(bin_dir: &Path, s: &Setup<'_>) -> Result<(Configs, MasterTarget)> {
    let mut last_err = None;
    for _ in 0..3 {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("find a free loopback port")?;
        let configs = write_configs(s, addr)?;
        let mut cmd = Command::new(bin_dir.join("master-target"));
        cmd.args(["serve", "--config"])
            .arg(&configs.mt)
            .stdout(Stdio::piped());
        let mut server = Server::spawn("master target", cmd, s.dir, s.direction.mt_log)?;
        // It prints `listening on ADDR` on stdout once it accepts connections.
        let stdout = server.child.stdout.take().context("master target stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(a) = line.trim().strip_prefix("listening on ") {
                    let _ = tx.send(a.to_owned());
                }
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        let listening = loop {
            check_interrupt()?;
            if let Ok(a) = rx.recv_timeout(POLL) {
                break Some(a);
            }
            if server.check_running().is_err() || Instant::now() > deadline {
                break None;
            }
        };
        match listening.map(|a| a.parse::<SocketAddr>()) {
            Some(Ok(addr)) => return Ok((configs, MasterTarget { server, addr })),
            Some(Err(e)) => bail!("master target announced a bad address: {e}"),
            None => {
                let log = fs::read_to_string(&server.log).unwrap_or_default();
                let e = anyhow::anyhow!(
                    "master target did not start within {} s; its log: {}",
                    START_TIMEOUT.as_secs(),
                    server.log.display()
                );
                if !log.contains("in use") {
                    return Err(e);
                }
                last_err = Some(e);
            }
        }
    }
    Err(last_err.unwrap_or_else(|| anyhow::anyhow!("master target did not start")))
}

/// One `point acknowledged` line of the process server's log: the master target has
/// made the point and every write before it durable.
#[derive(Clone, Copy, Debug)]
pub struct Ack {
    pub point: u64,
    /// When the point was cut.
    pub point_time_unix_ms: u64,
    pub consistent: bool,
    /// Time from the cut to the acknowledgement.
    pub rpo_ms: u64,
}

impl Ack {
    /// When the acknowledgement arrived.
    pub fn acked_unix_ms(&self) -> u64 {
        self.point_time_unix_ms + self.rpo_ms
    }
}

/// The value of ` name=` in a log line, up to the next space.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=");
    let at = line.find(&key)? + key.len();
    line[at..].split_whitespace().next()
}

/// The acknowledgement a log line reports, if it reports one.
pub fn parse_ack(line: &str) -> Option<Ack> {
    if !line.contains("point acknowledged") {
        return None;
    }
    Some(Ack {
        point: field(line, "point")?.parse().ok()?,
        point_time_unix_ms: field(line, "point_time_unix_ms")?.parse().ok()?,
        consistent: field(line, "consistent")? == "true",
        rpo_ms: field(line, "rpo_ms")?.parse().ok()?,
    })
}

/// Every acknowledgement in a process server's log.
pub fn read_acks(log: &Path) -> Result<Vec<Ack>> {
    let text = fs::read_to_string(log).with_context(|| format!("read {}", log.display()))?;
    Ok(text.lines().filter_map(parse_ack).collect())
}

/// Follows a growing log file line by line.
pub struct LogTail {
    path: PathBuf,
    pos: u64,
    partial: String,
}

impl LogTail {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            pos: 0,
            partial: String::new(),
        }
    }

    /// The complete lines appended since the last call.
    pub fn new_lines(&mut self) -> Result<Vec<String>> {
        let mut f =
            File::open(&self.path).with_context(|| format!("open {}", self.path.display()))?;
        f.seek(SeekFrom::Start(self.pos))
            .with_context(|| format!("seek {}", self.path.display()))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)
            .with_context(|| format!("read {}", self.path.display()))?;
        self.pos += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        let mut lines: Vec<String> = self.partial.split('\n').map(str::to_owned).collect();
        self.partial = lines.pop().unwrap_or_default();
        Ok(lines)
    }
}

/// A point cut on demand ([`ProcessServer::tag`]).
#[derive(Clone, Copy, Debug)]
pub struct Tag {
    pub id: u64,
    pub app_consistent: bool,
    pub consistent: bool,
    pub time_unix_ms: u64,
}

/// The running process server, with its log followed for acknowledgements.
pub struct ProcessServer {
    pub server: Server,
    pub nbd_addr: SocketAddr,
    /// Every acknowledgement its log reported so far (see [`ProcessServer::poll`]).
    pub acks: Vec<Ack>,
    pub group: String,
    log: LogTail,
    bin: PathBuf,
    config: PathBuf,
}

impl ProcessServer {
    /// Starts `process-server serve` of `s` and waits for its `listening on ADDR` log
    /// line.
    pub fn start(bin_dir: &Path, s: &Setup<'_>, configs: &Configs) -> Result<Self> {
        let bin = bin_dir.join("process-server");
        let mut cmd = Command::new(&bin);
        cmd.args(["serve", "--config"])
            .arg(&configs.ps)
            .stdout(Stdio::null());
        let mut server = Server::spawn("process server", cmd, s.dir, s.direction.ps_log)?;
        let mut log = LogTail::new(&server.log);
        let mut acks = Vec::new();
        let deadline = Instant::now() + START_TIMEOUT;
        let nbd_addr = 'found: loop {
            check_interrupt()?;
            server.check_running()?;
            for line in log.new_lines()? {
                acks.extend(parse_ack(&line));
                if let Some(a) = line.split("listening on ").nth(1) {
                    let a = a.trim();
                    break 'found a.parse::<SocketAddr>().with_context(|| {
                        format!("process server announced a bad address {a:?}")
                    })?;
                }
            }
            ensure!(
                Instant::now() < deadline,
                "process server did not listen within {} s; its log: {}",
                START_TIMEOUT.as_secs(),
                server.log.display()
            );
            std::thread::sleep(POLL);
        };
        Ok(Self {
            server,
            nbd_addr,
            acks,
            group: s.group.to_owned(),
            log,
            bin,
            config: configs.ps.clone(),
        })
    }

    /// Reads new log lines into [`ProcessServer::acks`]; fails if the server has
    /// exited or Ctrl-C was pressed.
    pub fn poll(&mut self) -> Result<()> {
        check_interrupt()?;
        self.server.check_running()?;
        for line in self.log.new_lines()? {
            self.acks.extend(parse_ack(&line));
        }
        Ok(())
    }

    /// Waits until a consistent point cut after `after_unix_ms` is acknowledged.
    pub fn wait_ack_after(&mut self, after_unix_ms: u64, timeout: Duration) -> Result<Ack> {
        self.wait_ack(timeout, &format!("cut after {after_unix_ms}"), |a| {
            a.consistent && a.point_time_unix_ms > after_unix_ms
        })
    }

    /// Waits until point `id` or a later consistent one is acknowledged. The master
    /// target acknowledges the newest durable sequence, so one acknowledgement covers
    /// every point before it, and the log may name only the newest of them.
    pub fn wait_ack_through(&mut self, id: u64, timeout: Duration) -> Result<Ack> {
        self.wait_ack(timeout, &format!("at or after {id}"), |a| {
            a.consistent && a.point >= id
        })
    }

    fn wait_ack(&mut self, timeout: Duration, what: &str, f: impl Fn(&Ack) -> bool) -> Result<Ack> {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll()?;
            if let Some(a) = self.acks.iter().find(|a| f(a)) {
                return Ok(*a);
            }
            ensure!(
                Instant::now() < deadline,
                "the master target acknowledged no consistent point {what} within {} s; \
                 the process server's log: {}",
                timeout.as_secs(),
                self.server.log.display()
            );
            std::thread::sleep(POLL);
        }
    }

    /// Waits until its group's shipper is connected to the master target (`status
    /// --json`: `connected`), so that what follows does not time the connection.
    pub fn wait_connected(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll()?;
            let st = self.status()?;
            if group_status(&st, &self.group)?["connected"] == true {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the process server did not connect to the master target within {} s; its \
                 log: {}",
                timeout.as_secs(),
                self.server.log.display()
            );
            std::thread::sleep(POLL);
        }
    }

    /// `process-server status --json` of the running server.
    pub fn status(&self) -> Result<serde_json::Value> {
        let out = run_ok(
            Command::new(&self.bin)
                .args(["status", "--json", "--config"])
                .arg(&self.config),
            "process-server status",
        )?;
        serde_json::from_str(&out).with_context(|| format!("process-server status: {out:?}"))
    }

    /// `process-server tag --group G [--app-consistent] --json`: a point of the group
    /// cut now (app-consistent: between the freeze and thaw hooks).
    pub fn tag(&self, app_consistent: bool) -> Result<Tag> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(["tag", "--group", &self.group, "--json", "--config"])
            .arg(&self.config);
        if app_consistent {
            cmd.arg("--app-consistent");
        }
        let what = if app_consistent {
            "process-server tag --app-consistent"
        } else {
            "process-server tag"
        };
        let out = run_ok(&mut cmd, what)?;
        let p: serde_json::Value =
            serde_json::from_str(out.trim()).with_context(|| format!("tag answered {out:?}"))?;
        Ok(Tag {
            id: p["id"]
                .as_u64()
                .with_context(|| format!("tag answered {out:?}"))?,
            app_consistent: p["kind"] == "app",
            consistent: p["consistent"] == true,
            time_unix_ms: p["time_unix_ms"].as_u64().unwrap_or(0),
        })
    }
}

/// The group `group`'s entry of a `process-server status --json`.
pub fn group_status<'a>(st: &'a serde_json::Value, group: &str) -> Result<&'a serde_json::Value> {
    st["groups"]
        .as_array()
        .and_then(|gs| gs.iter().find(|g| g["id"] == group))
        .with_context(|| format!("process-server status has no group {group}: {st}"))
}

/// The end of an initial sync.
pub struct SyncReport {
    /// From `start_unix_ms` to the acknowledgement of the first consistent point
    /// after the sync.
    pub done_ms: u64,
    pub first_point: u64,
}

/// Where an initial sync stands, for a progress display: the group's state and the
/// bytes read of those to read.
pub struct SyncProgress<'a> {
    pub state: &'a str,
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// Waits for the initial sync of the process server's group (a full one, or a
/// hash-diff resync: `what` names it in messages): until a consistent point cut after
/// `start_unix_ms` is acknowledged (points are inconsistent until the sync ends, and the
/// process server cuts one as it ends). `progress` is called with each status while the
/// sync runs, and once with `replicating`.
pub fn wait_initial_sync(
    ps: &mut ProcessServer,
    what: &str,
    total_bytes: u64,
    start_unix_ms: u64,
    progress: &mut dyn FnMut(SyncProgress<'_>),
) -> Result<SyncReport> {
    let timeout = Duration::from_secs(60)
        + SYNC_TIMEOUT_PER_GIB.mul_f64(total_bytes as f64 / (1u64 << 30) as f64);
    let deadline = Instant::now() + timeout;
    let mut last_status = Instant::now() - SYNC_STATUS_EVERY;
    let mut replicating = false;
    loop {
        ps.poll()?;
        if !replicating && last_status.elapsed() >= SYNC_STATUS_EVERY {
            last_status = Instant::now();
            let st = ps.status()?;
            let g = group_status(&st, &ps.group)?;
            let state = g["state"].as_str().unwrap_or("?");
            replicating = state == "replicating";
            progress(SyncProgress {
                state,
                done_bytes: g["resync"]["done_bytes"].as_u64().unwrap_or(0),
                total_bytes: g["resync"]["total_bytes"].as_u64().unwrap_or(total_bytes),
            });
        }
        if let Some(a) = ps
            .acks
            .iter()
            .find(|a| a.consistent && a.point_time_unix_ms >= start_unix_ms)
        {
            return Ok(SyncReport {
                done_ms: now_unix_ms().saturating_sub(start_unix_ms),
                first_point: a.point,
            });
        }
        ensure!(
            Instant::now() < deadline,
            "the {what} did not finish within {} s; the process server's log: {}",
            timeout.as_secs(),
            ps.server.log.display()
        );
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Proves an acknowledgement line of the process server's log is read field by
    /// field, and other lines are not taken for one.
    #[test]
    fn ack_lines() {
        let line = "2026-01-01T00:00:00Z  INFO process_server::shipper: point acknowledged \
                    group=g1 point=7 frame_seq=40 point_time_unix_ms=1000 consistent=true rpo_ms=250";
        let a = parse_ack(line).expect("an ack");
        assert_eq!(
            (a.point, a.point_time_unix_ms, a.consistent, a.rpo_ms),
            (7, 1000, true, 250)
        );
        assert_eq!(a.acked_unix_ms(), 1250);
        assert!(parse_ack("INFO tagged group=g1 point=7").is_none());
        assert!(parse_ack("point acknowledged group=g1 point=x").is_none());
    }

    /// Proves the usage of this very process is read: some CPU time, a peak RSS at
    /// least the current one.
    #[test]
    fn usage_of_self() {
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let u = Usage::of(std::process::id()).expect("usage");
        assert!(u.rss_bytes > 0 && u.peak_rss_bytes >= u.rss_bytes, "{u:?}");
        assert!(u.cpu_s >= 0.0, "{u:?}");
    }
}
