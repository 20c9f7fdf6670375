//! End-to-end tests of write capture over NBD: the real `process-server serve` binary
//! on loopback, driven by real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy,
//! nbdfuse), checked against the backing files byte for byte.
//!
//! Needs qemu-utils (qemu-io, qemu-img) and libnbd-bin (nbdinfo, nbdcopy, nbdfuse);
//! the nbdfuse test also needs libfuse3 and a usable /dev/fuse, and says it skipped
//! otherwise.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Size of every test disk.
const DISK_BYTES: usize = 16 << 20;
/// Time the server has to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `process-server serve` with two disks in a temp dir; killed on drop.
struct Server {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start() -> Self {
        Self::start_with("")
    }

    /// Starts the server with `extra` appended to the config (e.g. a `[tracking]`
    /// section).
    fn start_with(extra: &str) -> Self {
        Self::start_full(extra, "")
    }

    /// Like [`Server::start_with`], with `group_extra` added to the group's table
    /// (hooks). The server runs with `BR_TEST_DIR` set to its temp dir, for hooks.
    fn start_full(extra: &str, group_extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("ps.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[nbd]
listen = "127.0.0.1:0"
[[group]]
id = "g1"
{group_extra}
[[group.disk]]
id = "disk0"
path = "disk0.img"
size = "{mib}MiB"
[[group.disk]]
id = "disk1"
path = "disk1.img"
size = {DISK_BYTES}
{extra}
"#,
                mib = DISK_BYTES >> 20
            ),
        )
        .expect("write config");
        let mut cmd = Command::new(common::bin_path("process-server"));
        cmd.args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .env("BR_TEST_DIR", dir.path());
        let common::Started { child, port, log } = common::start_listening(cmd, START_TIMEOUT);
        Self {
            child,
            port,
            dir,
            log,
        }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    fn backing(&self, disk: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join(format!("{disk}.img"))).expect("read backing file")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("ps.toml")
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Panics unless the server process is still running and serving.
    fn assert_alive(&mut self) {
        assert!(
            self.child.try_wait().expect("try_wait").is_none(),
            "server exited; log:\n{}",
            self.log()
        );
        let out = run_ok(Command::new("nbdinfo").arg("--size").arg(self.uri("disk0")));
        assert_eq!(out.trim(), DISK_BYTES.to_string());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e} (is the tool installed?)"))
}

/// Runs a command that must succeed (qemu-io also reports failed I/O on stdout with
/// exit status 0 in some versions, so "failed" in its output counts as failure);
/// returns its stdout.
fn run_ok(cmd: &mut Command) -> String {
    let out = output(cmd);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stdout.contains("failed") && !stderr.contains("failed"),
        "{cmd:?}: {:?}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    stdout
}

/// Runs a command that must fail; returns stdout + stderr.
fn run_fail(cmd: &mut Command) -> String {
    let out = output(cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() || text.contains("failed"),
        "{cmd:?} succeeded: {text}"
    );
    text
}

fn qemu_io(uri: &str, cmds: &[&str]) -> Command {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c
}

/// Deterministic pseudo-random bytes (xorshift64*), so a failure reproduces.
fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

fn expect_pattern(len: usize, ranges: &[(usize, usize, u8)]) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for &(off, n, b) in ranges {
        v[off..off + n].fill(b);
    }
    v
}

/// Proves a qemu-io write + flush lands in the backing file exactly (and nowhere
/// else), and reads back with the pattern while a wrong pattern is reported.
#[test]
fn qemu_io_write_flush_read() {
    let s = Server::start();
    let uri = s.uri("disk0");
    run_ok(&mut qemu_io(&uri, &["write -P 0xab 4096 65536", "flush"]));
    assert!(s.backing("disk0") == expect_pattern(DISK_BYTES, &[(4096, 65536, 0xab)]));
    assert!(s.backing("disk1") == vec![0u8; DISK_BYTES]);
    run_ok(&mut qemu_io(
        &uri,
        &["read -P 0xab 4096 65536", "read -P 0 0 4096"],
    ));
    run_fail(&mut qemu_io(&uri, &["read -P 0xac 4096 65536"]));
}

/// Proves qemu-img convert copies a random image onto the export byte for byte.
#[test]
fn qemu_img_convert_is_byte_exact() {
    let s = Server::start();
    let src = s.path("src.img");
    let data = random_bytes(1, DISK_BYTES);
    std::fs::write(&src, &data).unwrap();
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(s.uri("disk1")),
    );
    assert!(s.backing("disk1") == data, "disk1 differs from the source");
}

/// Proves nbdinfo lists both disks with their sizes and describes one export.
#[test]
fn nbdinfo_lists_and_describes() {
    let s = Server::start();
    let list = run_ok(
        Command::new("nbdinfo")
            .arg("--list")
            .arg(format!("nbd://127.0.0.1:{}", s.port)),
    );
    for d in ["disk0", "disk1"] {
        assert!(list.contains(&format!("export=\"{d}\"")), "{list}");
    }
    assert_eq!(
        list.matches(&format!("export-size: {DISK_BYTES}")).count(),
        2,
        "{list}"
    );
    assert!(list.contains("can_multi_conn: true"), "{list}");
    let one = run_ok(Command::new("nbdinfo").arg(s.uri("disk0")));
    assert!(one.contains(&format!("export-size: {DISK_BYTES}")), "{one}");
    assert!(one.contains("description: disk disk0 of group g1"), "{one}");
}

/// Proves nbdcopy (several connections, multi-conn) writes to and reads from the
/// export byte-exactly.
#[test]
fn nbdcopy_to_and_from() {
    let s = Server::start();
    let src = s.path("src.img");
    let data = random_bytes(2, DISK_BYTES);
    std::fs::write(&src, &data).unwrap();
    run_ok(Command::new("nbdcopy").arg(&src).arg(s.uri("disk0")));
    assert!(s.backing("disk0") == data, "disk0 differs after nbdcopy in");
    let back = s.path("back.img");
    run_ok(Command::new("nbdcopy").arg(s.uri("disk0")).arg(&back));
    assert!(std::fs::read(&back).unwrap() == data, "copy out differs");
}

/// Proves writes through an nbdfuse-mounted file reach the backing disk and read back
/// (skipped, saying so, where FUSE is not usable).
#[test]
fn nbdfuse_write_and_read() {
    if !Path::new("/dev/fuse").exists() {
        println!("SKIPPED nbdfuse_write_and_read: /dev/fuse does not exist");
        return;
    }
    let s = Server::start();
    let mnt = s.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let pidfile = s.path("nbdfuse.pid");
    let mut fuse = Command::new("nbdfuse")
        .arg("-P")
        .arg(&pidfile)
        .arg(mnt.join("disk"))
        .arg(s.uri("disk1"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nbdfuse");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pidfile.exists() {
        if let Ok(Some(status)) = fuse.try_wait() {
            let mut err = String::new();
            let _ = fuse.stderr.take().map(|mut e| e.read_to_string(&mut err));
            println!("SKIPPED nbdfuse_write_and_read: nbdfuse exited {status}: {err}");
            return;
        }
        if Instant::now() > deadline {
            let _ = fuse.kill();
            println!("SKIPPED nbdfuse_write_and_read: nbdfuse did not become ready");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let file = mnt.join("disk");
    let data = random_bytes(3, 1 << 20);
    let result = std::panic::catch_unwind(|| {
        let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let mut back = vec![0u8; data.len()];
        std::fs::File::open(&file)
            .unwrap()
            .read_exact(&mut back)
            .unwrap();
        assert!(back == data, "read back through fuse differs");
    });
    let unmounted = Command::new("umount").arg(&mnt).status();
    if !matches!(unmounted, Ok(st) if st.success()) {
        let _ = Command::new("fusermount3").arg("-u").arg(&mnt).status();
    }
    let _ = fuse.wait();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
    let b = s.backing("disk1");
    assert!(b[..data.len()] == data[..], "backing file differs");
    assert!(b[data.len()..].iter().all(|&x| x == 0));
}

/// Proves write-zeroes and discard read back as zeros, through the export and in
/// the backing file, leaving neighbouring data alone.
#[test]
fn trim_and_write_zeroes_read_back_zero() {
    let s = Server::start();
    let uri = s.uri("disk0");
    run_ok(&mut qemu_io(&uri, &["write -P 0xcd 0 2M", "write -z 0 1M"]));
    run_ok(&mut qemu_io(
        &uri,
        &["read -P 0 0 1M", "read -P 0xcd 1M 1M"],
    ));
    run_ok(&mut qemu_io(
        &uri,
        &["discard 1M 64k", "flush", "read -P 0 1M 64k"],
    ));
    let want = expect_pattern(
        DISK_BYTES,
        &[((1 << 20) + (64 << 10), (1 << 20) - (64 << 10), 0xcd)],
    );
    assert!(s.backing("disk0") == want);
}

/// Proves two clients writing disjoint ranges at the same time both land intact.
#[test]
fn two_clients_write_disjoint_ranges_at_once() {
    let s = Server::start();
    let uri = s.uri("disk0");
    let spawn = |cmds: &[&str]| {
        qemu_io(&uri, cmds)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn qemu-io")
    };
    let a = spawn(&["write -P 0x11 0 4M", "flush"]);
    let b = spawn(&["write -P 0x22 8M 4M", "flush"]);
    for c in [a, b] {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let want = expect_pattern(DISK_BYTES, &[(0, 4 << 20, 0x11), (8 << 20, 4 << 20, 0x22)]);
    assert!(s.backing("disk0") == want);
}

/// Proves an unknown export name is a client error and the server keeps serving.
#[test]
fn unknown_export_is_refused() {
    let mut s = Server::start();
    let text = run_fail(&mut qemu_io(&s.uri("nope"), &["read 0 512"]));
    assert!(text.contains("no export named"), "{text}");
    run_fail(Command::new("nbdinfo").arg(s.uri("nope")));
    s.assert_alive();
}

/// Proves garbage bytes get the connection dropped (logged with the peer) and the
/// server still serves the next client.
#[test]
fn garbage_is_disconnected_and_server_survives() {
    let mut s = Server::start();
    for seed in 0..3 {
        let mut c = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let local = c.local_addr().unwrap();
        // Writing may fail once the server has hung up; that is the expected outcome.
        let _ = c.write_all(&random_bytes(100 + seed, 4096));
        let mut sink = Vec::new();
        let r = c.read_to_end(&mut sink);
        assert!(
            r.is_ok()
                || r.as_ref().is_err_and(|e| !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )),
            "server kept the connection open: {r:?}"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while !s.log().contains(&local.to_string()) {
            assert!(
                Instant::now() < deadline,
                "peer {local} not in the log:\n{}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(s.log().contains("protocol violation"), "{}", s.log());
    run_ok(&mut qemu_io(
        &s.uri("disk1"),
        &["write -P 0x5a 0 4k", "read -P 0x5a 0 4k"],
    ));
    s.assert_alive();
}

/// Proves a write beyond the end of the disk is an error and changes nothing.
#[test]
fn write_beyond_end_is_refused() {
    let mut s = Server::start();
    let uri = s.uri("disk0");
    let end = DISK_BYTES.to_string();
    let near = (DISK_BYTES - 512).to_string();
    run_fail(&mut qemu_io(&uri, &[&format!("write -P 0x77 {end} 512")]));
    run_fail(&mut qemu_io(&uri, &[&format!("write -P 0x77 {near} 4096")]));
    assert!(s.backing("disk0") == vec![0u8; DISK_BYTES]);
    s.assert_alive();
}

/// Proves captured writes reach the group's spool in their order with their data (and
/// trims as zero records), the cutter seals epochs on its timer so writes far apart in
/// time land in different epochs, and SIGTERM closes change tracking cleanly.
#[test]
fn writes_are_spooled_and_cut_into_epochs() {
    use datapath::spool::{Spool, SpoolConfig, SpoolEntry};
    use datapath::storage::RealFs;

    let mut s = Server::start_with(
        "[tracking]\ncut_interval_ms = 50\nstate_dir = \"state\"\ninitial_sync = false\n",
    );
    run_ok(&mut qemu_io(
        &s.uri("disk0"),
        &["write -P 0xab 0 64k", "flush"],
    ));
    std::thread::sleep(Duration::from_millis(400));
    run_ok(&mut qemu_io(
        &s.uri("disk1"),
        &["write -P 0xcd 1M 4k", "flush"],
    ));
    run_ok(&mut qemu_io(&s.uri("disk0"), &["write -z 2M 64k", "flush"]));
    std::thread::sleep(Duration::from_millis(400));
    let pid = s.child.id().to_string();
    run_ok(Command::new("kill").args(["-TERM", &pid]));
    let status = s.child.wait().expect("wait for the server");
    assert!(status.success(), "{status:?}; log:\n{}", s.log());
    assert!(
        s.log().contains("change tracking closed cleanly"),
        "{}",
        s.log()
    );
    let state = s.path("state/g1");
    assert!(state.join("clean").exists(), "no clean marker");

    let (spool, _) = Spool::open(
        std::sync::Arc::new(RealFs),
        &state.join("spool"),
        SpoolConfig {
            segment_bytes_max: 64 << 20,
            spool_bytes_max: 1 << 30,
        },
    )
    .expect("open the spool");
    let records: Vec<_> = spool
        .read_from(spool.first_seq())
        .collect::<Result<_, _>>()
        .expect("read the spool");
    let epoch_of = |want: &dyn Fn(&SpoolEntry) -> bool| {
        records
            .iter()
            .find(|r| want(&r.entry))
            .map(|r| match r.entry {
                SpoolEntry::Write { epoch, .. }
                | SpoolEntry::Zero { epoch, .. }
                | SpoolEntry::Cut { epoch, .. } => epoch,
            })
    };
    let first = epoch_of(&|e| {
        matches!(e, SpoolEntry::Write { disk, offset: 0, data, .. }
            if disk == "disk0" && data.len() == 65536 && data.iter().all(|&b| b == 0xab))
    })
    .expect("the 0xab write of disk0 is spooled");
    let second = epoch_of(&|e| {
        matches!(e, SpoolEntry::Write { disk, offset: 1048576, data, .. }
            if disk == "disk1" && data.len() == 4096 && data.iter().all(|&b| b == 0xcd))
    })
    .expect("the 0xcd write of disk1 is spooled");
    let zero = epoch_of(&|e| {
        matches!(e, SpoolEntry::Zero { disk, offset: 2097152, len: 65536, .. } if disk == "disk0")
    })
    .expect("the write-zeroes of disk0 is spooled");
    assert!(first < second, "writes 400 ms apart share epoch {first}");
    assert!(second <= zero);
    // Cuts: rising epochs, one per epoch, and the first write's epoch was sealed.
    let cuts: Vec<u64> = records
        .iter()
        .filter_map(|r| match r.entry {
            SpoolEntry::Cut {
                epoch, point_id, ..
            } => {
                assert_eq!(epoch, point_id);
                Some(epoch)
            }
            _ => None,
        })
        .collect();
    assert!(cuts.windows(2).all(|w| w[0] < w[1]), "{cuts:?}");
    assert!(cuts.contains(&first), "epoch {first} never cut: {cuts:?}");
}

/// Proves the shipped example config works as it is (but for the port), given by a bare
/// file name relative to the current directory, and stops cleanly on SIGTERM.
#[test]
fn example_config_runs_from_its_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/process-server.toml"),
    )
    .expect("read the example config");
    assert!(example.contains("127.0.0.1:10809"));
    std::fs::write(
        dir.path().join("ps.toml"),
        example.replace("127.0.0.1:10809", "127.0.0.1:0"),
    )
    .expect("write config");
    let mut child = Command::new(common::bin_path("process-server"))
        .args(["serve", "--config", "ps.toml"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start process-server");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut log = String::new();
    for line in lines.by_ref() {
        let line = line.expect("read log");
        log.push_str(&line);
        log.push('\n');
        if line.contains("listening on") {
            break;
        }
    }
    assert!(log.contains("listening on"), "{log}");
    run_ok(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    for line in lines {
        log.push_str(&line.expect("read log"));
        log.push('\n');
    }
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status:?}\n{log}");
    assert!(dir.path().join("disk0.img").exists() && dir.path().join("ps-state/g1/clean").exists());
}

/// Proves `tag --app-consistent` runs the freeze hook, cuts an app-consistent point,
/// then runs the thaw hook; a failing or slow freeze gives a crash-consistent point and
/// a warning and still thaws; `status --json` names each disk's group, NBD URI and
/// backing path.
#[test]
fn tag_with_hooks_and_status() {
    let tracking =
        "[tracking]\nstate_dir = \"state\"\ncut_interval_ms = 600000\ninitial_sync = false\n";
    let hooks = |freeze: &str| {
        format!(
            "freeze = '{freeze}'\nthaw = 'echo thaw >> \"$BR_TEST_DIR/hooks.log\"'\nhook_timeout_ms = 300\n"
        )
    };
    let tag = |s: &Server| {
        let out = output(
            Command::new(common::bin_path("process-server"))
                .args([
                    "tag",
                    "--group",
                    "g1",
                    "--app-consistent",
                    "--json",
                    "--config",
                ])
                .arg(s.config()),
        );
        assert!(out.status.success(), "{out:?}\n{}", s.log());
        let point: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("tag --json prints JSON");
        (point, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let hook_log = |s: &Server| std::fs::read_to_string(s.path("hooks.log")).unwrap_or_default();

    // A working freeze: an app-consistent point, frozen then thawed.
    let s = Server::start_full(
        tracking,
        &hooks("echo freeze >> \"$BR_TEST_DIR/hooks.log\""),
    );
    run_ok(&mut qemu_io(
        &s.uri("disk0"),
        &["write -P 0x11 0 4k", "flush"],
    ));
    let (p, warnings) = tag(&s);
    assert_eq!(p["kind"], "app", "{p} {warnings}");
    assert_eq!(p["group"], "g1");
    assert!(p["id"].as_u64().is_some());
    assert_eq!(hook_log(&s), "freeze\nthaw\n");
    let out = run_ok(
        Command::new(common::bin_path("process-server"))
            .args(["status", "--json", "--config"])
            .arg(s.config()),
    );
    let st: serde_json::Value = serde_json::from_str(&out).expect("status --json");
    assert_eq!(st["groups"][0]["id"], "g1");
    assert_eq!(st["groups"][0]["state"], "replicating");
    let disks = st["disks"].as_array().expect("disks");
    assert_eq!(disks.len(), 2);
    assert_eq!(disks[0]["id"], "disk0");
    assert_eq!(disks[0]["group"], "g1");
    assert_eq!(disks[0]["nbd_uri"], s.uri("disk0"));
    assert!(disks[0]["path"].as_str().unwrap().ends_with("disk0.img"));
    assert!(disks[0]["dirty_blocks"].as_u64().unwrap() >= 1);
    drop(s);

    // A failing freeze and a freeze that outruns its timeout: crash-consistent points
    // with a warning, and the thaw ran anyway.
    for freeze in ["exit 3", "sleep 5"] {
        let s = Server::start_full(tracking, &hooks(freeze));
        let started = Instant::now();
        let (p, warnings) = tag(&s);
        assert_eq!(p["kind"], "crash", "{freeze}: {p}");
        assert!(warnings.contains("freeze hook"), "{freeze}: {warnings}");
        assert_eq!(hook_log(&s), "thaw\n", "{freeze}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "the slow hook was not cut short"
        );
    }

    // An unknown group is refused with its name.
    let s = Server::start_full(tracking, "");
    let out = output(
        Command::new(common::bin_path("process-server"))
            .args(["tag", "--group", "nope", "--config"])
            .arg(s.config()),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
}

/// Proves `app_consistent_interval_s` makes app-consistent points on its own: the
/// freeze hook runs, an app-consistent cut lands in the spool, then the thaw hook runs,
/// once per interval.
#[test]
fn scheduled_app_consistent_points() {
    use datapath::spool::{Spool, SpoolConfig, SpoolEntry};
    use datapath::storage::RealFs;

    let mut s = Server::start_full(
        "[tracking]\nstate_dir = \"state\"\ncut_interval_ms = 600000\ninitial_sync = false\n",
        "freeze = 'echo freeze >> \"$BR_TEST_DIR/hooks.log\"'\nthaw = 'echo thaw >> \"$BR_TEST_DIR/hooks.log\"'\napp_consistent_interval_s = 1\n",
    );
    run_ok(&mut qemu_io(&s.uri("disk0"), &["write -P 0x21 0 4k"]));
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let hooks = || std::fs::read_to_string(s.path("hooks.log")).unwrap_or_default();
    while hooks().matches("thaw").count() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "{}\n{}",
            hooks(),
            s.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = hooks();
    assert!(log.starts_with("freeze\nthaw\nfreeze\nthaw\n"), "{log}");
    // Stopped before its spool is read.
    run_ok(Command::new("kill").args(["-TERM", &s.child.id().to_string()]));
    assert!(s.child.wait().expect("wait").success(), "{}", s.log());
    let (spool, _) = Spool::open(
        std::sync::Arc::new(RealFs),
        &s.path("state/g1/spool"),
        SpoolConfig {
            segment_bytes_max: 64 << 20,
            spool_bytes_max: 1 << 30,
        },
    )
    .expect("open the spool");
    let app_cuts = spool
        .read_from(spool.first_seq())
        .filter(|r| {
            matches!(
                r.as_ref().expect("record").entry,
                SpoolEntry::Cut {
                    app_consistent: true,
                    consistent: true,
                    ..
                }
            )
        })
        .count();
    assert!(app_cuts >= 2, "{app_cuts} app-consistent cuts in the spool");
}

/// Proves the control socket answers garbage (not JSON, binary, unknown commands, an
/// oversized line, a request cut short) with an error or a close, never a crash, and
/// keeps serving `status` afterwards.
#[test]
fn control_socket_garbage_is_refused_and_server_survives() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    let mut s = Server::start_with("[tracking]\nstate_dir = \"state\"\ninitial_sync = false\n");
    let sock = s.path("state/control.sock");
    let ask = |bytes: &[u8]| -> String {
        let mut c = UnixStream::connect(&sock).expect("connect control socket");
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let _ = c.write_all(bytes);
        let _ = c.shutdown(std::net::Shutdown::Write);
        let mut answer = String::new();
        let _ = c.read_to_string(&mut answer);
        answer
    };
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let random: Vec<u8> = (0..3000)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng as u8
        })
        .collect();
    let oversized = format!(
        "{{\"cmd\":\"status\",\"pad\":\"{}\"}}\n",
        "x".repeat(10_000)
    );
    for (what, bytes) in [
        ("not JSON", b"hello\n".to_vec()),
        ("random bytes", random),
        ("unknown cmd", b"{\"cmd\":\"format-disks\"}\n".to_vec()),
        ("no cmd", b"{}\n".to_vec()),
        ("tag without group", b"{\"cmd\":\"tag\"}\n".to_vec()),
        (
            "unknown group",
            b"{\"cmd\":\"tag\",\"group\":\"nope\"}\n".to_vec(),
        ),
        ("oversized", oversized.into_bytes()),
        ("cut short", b"{\"cmd\":\"sta".to_vec()),
        ("empty", Vec::new()),
    ] {
        let answer = ask(&bytes);
        assert!(
            answer.is_empty() || answer.contains("\"ok\":false"),
            "{what}: {answer}"
        );
        s.assert_alive();
    }
    let ok = ask(b"{\"cmd\":\"status\"}\n");
    assert!(ok.contains("\"ok\":true"), "{ok}");
}
