//! End-to-end tests of retention with the real binaries: the process server captures
//! qemu-io writes and ships them to the master target, whose retention fold applies the
//! history older than a short window (or beyond a small byte limit) to the replicas and
//! drops it. Afterwards the replicas plus what is left of the journal must still give
//! every remaining point, and the final state, byte for byte.
//!
//! Needs qemu-utils (qemu-io).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ProcessServer, now_unix_ms};

use datapath::extent::ExtentData;
use datapath::frame::{self, Decoder, Frame};
use datapath::journal::{Journal, JournalConfig};
use datapath::storage::RealFs;

/// Size of each of the two disks.
const DISK_BYTES: usize = 16 << 20;
/// Time a server has to start, the shipper to acknowledge, the fold to catch up.
const TIMEOUT: Duration = Duration::from_secs(30);
/// The disks' ids, in the order their images are hashed together.
const DISKS: [&str; 2] = ["disk0", "disk1"];
/// Journal segments in these tests: small, so that folds remove some.
const SEGMENT: &str = "1MiB";
/// The short window of these tests.
const RETENTION_MS: u64 = 2000;
/// How often the fold looks in these tests.
const CHECK_MS: u64 = 200;

/// A running `master-target serve`; killed (SIGKILL) on drop.
struct MasterTarget {
    child: Child,
    addr: std::net::SocketAddr,
    log: PathBuf,
}

impl MasterTarget {
    /// Writes the config (listening on `listen`, `retention` lines in the group) in
    /// `dir` and starts the server with `env` added to its environment.
    fn start(dir: &Path, listen: &str, retention: &str, env: &[(&str, &str)]) -> Self {
        let config = dir.join("mt.toml");
        let mut text = format!(
            "listen = \"{listen}\"\ndata_dir = \"mt-data\"\nplain_tcp_loopback = true\n\
             [[group]]\nid = \"g1\"\njournal_segment_bytes = \"{SEGMENT}\"\n\
             retention_check_interval_ms = {CHECK_MS}\n{retention}\n"
        );
        for d in DISKS {
            text.push_str(&format!(
                "[[group.disk]]\nid = \"{d}\"\nsize = \"16MiB\"\nreplica = \"mt-data/replica-{d}.img\"\n"
            ));
        }
        std::fs::write(&config, text).expect("write master-target config");
        let log = dir.join("mt.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open master-target log");
        let mut cmd = Command::new(common::bin_path("master-target"));
        cmd.args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log_file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start master-target serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read master-target stdout");
        let Some(addr) = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
        else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "master target did not start: {line:?}; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        Self { child, addr, log }
    }

    /// The log, without the terminal colour codes tracing may put around fields.
    fn log(&self) -> String {
        let raw = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\x1b' {
                // ESC [ ... m
                for c in chars.by_ref() {
                    if c == 'm' {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    /// Waits until the log contains `what`.
    fn wait_log(&self, what: &str) {
        let deadline = Instant::now() + TIMEOUT;
        while !self.log().contains(what) {
            assert!(
                Instant::now() < deadline,
                "no {what:?} in the master target's log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9, and wait until the process is gone (its locks are released).
    fn kill(mut self) {
        self.child.kill().expect("kill master target");
        self.child.wait().expect("wait for master target");
    }
}

impl Drop for MasterTarget {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `master-target <args> --config mt.toml --json`, parsed.
fn mt_json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(common::bin_path("master-target"))
        .args(args)
        .arg("--config")
        .arg(dir.join("mt.toml"))
        .arg("--json")
        .output()
        .expect("run master-target");
    assert!(
        out.status.success(),
        "master-target {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

fn start_process_server(dir: &Path, target: std::net::SocketAddr) -> ProcessServer {
    let config = dir.join("ps.toml");
    let mut text = format!(
        "[nbd]\nlisten = \"127.0.0.1:0\"\n[tracking]\nstate_dir = \"ps-state\"\ncut_interval_ms = 100\n[target]\naddress = \"{target}\"\nnode = \"ps1\"\nplain_tcp = true\n[[group]]\nid = \"g1\"\n"
    );
    for d in DISKS {
        text.push_str(&format!(
            "[[group.disk]]\nid = \"{d}\"\npath = \"{d}.img\"\nsize = \"16MiB\"\n"
        ));
    }
    std::fs::write(&config, text).expect("write process-server config");
    ProcessServer::start(&config, TIMEOUT)
}

/// The states the disk pair went through: S0 (all zero), then one after each write.
struct States {
    dir: PathBuf,
    hashes: Vec<blake3::Hash>,
}

impl States {
    fn new(dir: &Path) -> Self {
        let zero = vec![0u8; DISK_BYTES];
        Self {
            dir: dir.to_path_buf(),
            hashes: vec![pair_hash(&[&zero, &zero])],
        }
    }

    /// Runs one qemu-io write and records the disks' state after it; returns the time
    /// just after the write completed.
    fn write(&mut self, ps: &ProcessServer, disk: &str, cmd: &str) -> u64 {
        ps.qemu_io(disk, cmd);
        let done = now_unix_ms();
        let imgs: Vec<Vec<u8>> = DISKS
            .iter()
            .map(|d| std::fs::read(self.dir.join(format!("{d}.img"))).expect("read disk"))
            .collect();
        self.hashes.push(pair_hash(&[&imgs[0], &imgs[1]]));
        done
    }

    /// Writes round `r` on both disks: 4 MiB of random data (several frames, which do
    /// not compress, so the journal grows by about that much), a pattern, zeroes.
    /// Returns when the last write ended.
    fn round(&mut self, ps: &ProcessServer, r: u8) -> u64 {
        let base = u64::from(r) * (2 << 20);
        let random = self.dir.join(format!("random-{r}.bin"));
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(r);
        let bytes: Vec<u8> = (0..3 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(&random, bytes).expect("write random data");
        let random = random.display();
        let cmds = [
            ("disk0", format!("write -P 0x{:02x} {} 64k", 0x10 + r, base)),
            ("disk1", format!("write -s {random} {} 3M", base + 4096)),
            ("disk0", format!("write -s {random} {} 1M", base + 32768)),
            ("disk1", format!("write -z {} 1M", base + 512 * 1024)),
            (
                "disk0",
                format!("write -P 0x{:02x} {} 4k", 0x40 + r, base + (8 << 20)),
            ),
        ];
        let mut done = 0;
        for (disk, cmd) in cmds {
            done = self.write(ps, disk, &cmd);
        }
        done
    }
}

fn pair_hash(imgs: &[&[u8]; 2]) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    for i in imgs {
        assert_eq!(i.len(), DISK_BYTES);
        h.update(i);
    }
    h.finalize()
}

/// Replays what is left of g1's journal over the replicas (the disks at the base):
/// every consistent point must be one of the states, in order, and the end the final
/// state. Returns (base seq, consistent points checked).
fn check_replicas_and_journal(dir: &Path, states: &States) -> (u64, usize) {
    let jdir = dir.join("mt-data/g1/journal");
    let (j, rec) = Journal::open(
        Arc::new(RealFs),
        &jdir,
        "g1",
        JournalConfig {
            segment_bytes_max: 1 << 20,
            ..JournalConfig::default()
        },
    )
    .expect("open journal");
    // The server indexed every segment it sealed, and the folds took each index with
    // its segment: the sealed segments, and only they, have one.
    assert!(rec.indexes_rebuilt.is_empty(), "{:?}", rec.indexes_rebuilt);
    let stems = |ext: &str| {
        let mut v: Vec<String> = std::fs::read_dir(&jdir)
            .expect("journal dir")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(ext).map(str::to_string))
            .collect();
        v.sort();
        v
    };
    let segs = stems(".seg");
    assert_eq!(
        stems(".idx"),
        segs[..segs.len() - 1],
        "indexes of the sealed segments"
    );
    assert_eq!(rec.segments_indexed, segs.len() - 1);
    let mut imgs: Vec<Vec<u8>> = DISKS
        .iter()
        .map(|d| std::fs::read(dir.join(format!("mt-data/replica-{d}.img"))).expect("replica"))
        .collect();
    let mut dec = Decoder::new();
    let mut k = 0usize;
    let mut consistent = 0;
    let base = j.base_seq();
    for r in j.read(base + 1, j.write_seq()).expect("read journal") {
        let (_, bytes) = r.expect("journal frame");
        match frame::decode(&bytes, &mut dec).expect("decode a journaled frame") {
            Frame::Data(d) => {
                let disk = DISKS
                    .iter()
                    .position(|x| *x == d.meta.disk)
                    .expect("known disk");
                for (offset, data) in d.extents() {
                    let at = offset as usize;
                    match data {
                        ExtentData::Bytes(b) => imgs[disk][at..at + b.len()].copy_from_slice(b),
                        ExtentData::Zero(n) => imgs[disk][at..at + n as usize].fill(0),
                    }
                }
            }
            Frame::Point(_, p) => {
                if !p.consistent {
                    continue;
                }
                consistent += 1;
                let hash = pair_hash(&[&imgs[0], &imgs[1]]);
                k = (k..states.hashes.len())
                    .find(|&x| states.hashes[x] == hash)
                    .unwrap_or_else(|| {
                        panic!(
                            "point {} (after base {base}) is none of the states S{k}..",
                            p.point_id
                        )
                    });
            }
            other => panic!("unexpected frame in the journal: {other:?}"),
        }
    }
    assert_eq!(
        pair_hash(&[&imgs[0], &imgs[1]]),
        *states.hashes.last().expect("states"),
        "replicas + journal from base {base} are not the final state"
    );
    (base, consistent)
}

/// Waits until `master-target points` lists no consistent point older than the window
/// plus two check intervals and some slack.
fn wait_old_points_gone(dir: &Path) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let pts = mt_json(dir, &["points", "--group", "g1"]);
        let pts = pts.as_array().expect("points").clone();
        let now = now_unix_ms();
        let oldest_ok = now - RETENTION_MS - 2 * CHECK_MS - 1500;
        // Inconsistent points (initial sync) stay until a consistent one after them
        // ages out too; only consistent ones must be gone on time.
        if pts
            .iter()
            .all(|p| p["time_unix_ms"].as_u64().unwrap() >= oldest_ok || p["consistent"] == false)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "points older than the window are still listed: {pts:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Proves a short retention window folds old history away while replicating: the old
/// points leave `master-target points`, the journal shrinks (status: base seq, journal
/// bytes far below what was journaled, bytes folded), and the replicas plus the rest of
/// the journal still give every remaining point and the final state byte for byte.
#[test]
fn old_points_leave_and_the_rest_replays_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mt = MasterTarget::start(d, "127.0.0.1:0", "retention = \"2s\"", &[]);
    let ps = start_process_server(d, mt.addr);
    let mut states = States::new(d);
    let mut done = 0;
    for r in 0..4 {
        done = states.round(&ps, r);
        std::thread::sleep(Duration::from_millis(700));
    }
    ps.wait_acked_after(done);
    let oldest = |v: &serde_json::Value| {
        v.as_array()
            .expect("points")
            .iter()
            .filter_map(|p| p["id"].as_u64())
            .min()
    };
    let first = oldest(&mt_json(d, &["points", "--group", "g1"])).expect("a point");
    let deadline = Instant::now() + TIMEOUT;
    while oldest(&mt_json(d, &["points", "--group", "g1"])).is_some_and(|o| o <= first) {
        assert!(
            Instant::now() < deadline,
            "point {first} never left the list"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_old_points_gone(d);
    // Once the last write is older than the window, nearly everything journaled is
    // folded.
    let deadline = Instant::now() + TIMEOUT;
    let st = loop {
        let st = mt_json(d, &["status"]);
        let g = &st["groups"][0];
        if g["journal_bytes"].as_u64().unwrap() < g["journaled_bytes"].as_u64().unwrap() / 4 {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the journal does not shrink: {g}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let g = &st["groups"][0];
    assert_eq!(st["running"], true, "{st}");
    assert_eq!(g["retention_ms"], RETENTION_MS);
    assert_eq!(g["journal_bytes_max"], 64u64 << 30);
    assert_eq!(g["journal_warning"], serde_json::Value::Null, "{g}");
    assert!(g["base_seq"].as_u64().unwrap() > 0, "{g}");
    let journal_bytes = g["journal_bytes"].as_u64().unwrap();
    let journaled = g["journaled_bytes"].as_u64().unwrap();
    assert!(
        journaled > 12 << 20 && journal_bytes < journaled / 4,
        "journal {journal_bytes} bytes of {journaled} journaled: {g}"
    );
    assert!(g["folded_bytes"].as_u64().unwrap() > 0, "{g}");

    let log = mt.log();
    assert!(log.contains("retention fold"), "{log}");
    ps.stop();
    mt.kill();
    let (base, _) = check_replicas_and_journal(d, &states);
    assert!(base > 0);
}

/// Proves a master target killed (-9) in the middle of a fold (after it wrote the
/// replicas, before it synced them) loses nothing: restarted with a window that would
/// fold nothing, it first finishes the interrupted fold (its intent), replication goes
/// on, and the replicas plus the journal give every remaining point and the final
/// state byte for byte.
#[test]
fn kill_9_during_a_fold_then_restart_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The initial sync first (and folded), then rounds spooled while the master target
    // is away, so that the first fold after it comes back covers megabytes of them.
    let mt = MasterTarget::start(d, "127.0.0.1:0", "retention = \"2s\"", &[]);
    let addr = mt.addr;
    let ps = start_process_server(d, addr);
    ps.wait_acked_after(now_unix_ms());
    mt.wait_log("retention fold");
    mt.kill();
    let mut states = States::new(d);
    for r in 0..3 {
        states.round(&ps, r);
    }
    // The rounds reach the journal under a window that folds nothing, so the fold of the
    // next start finds them all old, however soon after its start it runs.
    let mt = MasterTarget::start(d, &addr.to_string(), "retention = \"1d\"", &[]);
    ps.wait_acked_after(now_unix_ms());
    mt.kill();
    std::thread::sleep(Duration::from_millis(RETENTION_MS + 500));
    let mt = MasterTarget::start(
        d,
        &addr.to_string(),
        "retention = \"2s\"",
        &[("BLOCKREP_FAILPOINT", "retention::before_sync")],
    );
    mt.wait_log("failpoint retention::before_sync reached");
    mt.kill();
    let mt = MasterTarget::start(d, &addr.to_string(), "retention = \"1d\"", &[]);
    mt.wait_log("reason=Interrupted");
    let log = mt.log();
    let line = log
        .lines()
        .find(|l| l.contains("reason=Interrupted"))
        .unwrap_or_default();
    let frame_bytes: u64 = line
        .split("frame_bytes=")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        frame_bytes > 1 << 20,
        "the interrupted fold was small: {line}"
    );
    let done = states.round(&ps, 3);
    ps.wait_acked_after(done);
    ps.stop();
    mt.kill();
    let (base, points) = check_replicas_and_journal(d, &states);
    assert!(base > 0, "the interrupted fold was not finished");
    assert!(points > 0, "no point left to check");
}

/// Proves a journal over its byte limit drops its oldest points for space before the
/// window would: a warning in the log (how many, the newest's time) and in `status`,
/// and the replicas plus the journal still give the final state byte for byte.
#[test]
fn byte_limit_drops_oldest_points_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mt = MasterTarget::start(
        d,
        "127.0.0.1:0",
        "retention = \"1d\"\njournal_bytes_max = \"3MiB\"",
        &[],
    );
    let ps = start_process_server(d, mt.addr);
    let mut states = States::new(d);
    let mut done = 0;
    for r in 0..4 {
        done = states.round(&ps, r);
    }
    ps.wait_acked_after(done);
    mt.wait_log("younger than the retention window");
    let deadline = Instant::now() + TIMEOUT;
    let g = loop {
        let st = mt_json(d, &["status"]);
        let g = st["groups"][0].clone();
        if g["journal_bytes"].as_u64().unwrap() <= 3 << 20 {
            break g;
        }
        assert!(
            Instant::now() < deadline,
            "journal stays over its limit: {g}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let w = g["journal_warning"].as_str().unwrap_or_default();
    assert!(w.contains("points dropped for space"), "{g}");
    let log = mt.log();
    let line = log
        .lines()
        .find(|l| l.contains("dropped") && l.contains("younger than the retention window"))
        .unwrap_or_else(|| panic!("no space warning in the log:\n{log}"));
    assert!(
        line.contains("WARN") && line.contains("newest_dropped="),
        "{line}"
    );
    assert!(log.contains("journal at"), "no near-limit warning:\n{log}");
    ps.stop();
    mt.kill();
    let (base, _) = check_replicas_and_journal(d, &states);
    assert!(base > 0);
}
