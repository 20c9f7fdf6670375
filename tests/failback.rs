//! End-to-end tests of failback, change of point and commit: the real `process-server
//! serve` captures writes made with qemu-io over NBD and ships them to the real
//! `master-target serve`; `master-target failback` then takes the replicas to chosen
//! points (live through the running server, or in-process when none runs), and each
//! result is compared byte for byte with the disks as they were at that point.
//!
//! The model: after each write the test copies the disks (the process server's
//! backing files) and notes when the write was done and when the next one started. A
//! consistent point cut in between is exactly that copy.
//!
//! Needs qemu-utils (qemu-io).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use common::{ProcessServer, now_unix_ms};
use serde_json::Value;

/// Time a server has to start, and the shipper to acknowledge the last write.
const TIMEOUT: Duration = Duration::from_secs(60);

/// A deployment in a temp dir: configs for both servers over `disks` of `disk_mib`.
struct Env {
    dir: PathBuf,
    disks: Vec<String>,
    disk_bytes: usize,
    mt: Option<Child>,
    ps: Option<ProcessServer>,
}

/// The disks at one moment, and the window in which a cut gives exactly them.
struct Mark {
    disks: Vec<Vec<u8>>,
    /// The write before was done (acknowledged to qemu-io) at this time ...
    done_ms: u64,
    /// ... and the next one started after this time (`u64::MAX` for the last).
    next_ms: u64,
}

impl Env {
    fn new(dir: &Path, disks: &[&str], disk_mib: usize) -> Self {
        let mut mt = "listen = \"127.0.0.1:0\"\ndata_dir = \"mt-data\"\nplain_tcp_loopback = true\n[[group]]\nid = \"g1\"\n".to_string();
        for d in disks {
            mt.push_str(&format!(
                "[[group.disk]]\nid = \"{d}\"\nsize = \"{disk_mib}MiB\"\nreplica = \"mt-data/replica-{d}.img\"\n"
            ));
        }
        mt.push_str("[[group]]\nid = \"g2\"\n[[group.disk]]\nid = \"other\"\nsize = \"1MiB\"\nreplica = \"mt-data/replica-other.img\"\n");
        std::fs::write(dir.join("mt.toml"), mt).unwrap();
        Self {
            dir: dir.to_path_buf(),
            disks: disks.iter().map(|d| d.to_string()).collect(),
            disk_bytes: disk_mib << 20,
            mt: None,
            ps: None,
        }
    }

    fn start_mt(&mut self) {
        let (child, addr) = common::start_master_target(
            &self.dir.join("mt.toml"),
            &self.dir.join("mt.log"),
            "info",
        );
        let mut ps = format!(
            "[nbd]\nlisten = \"127.0.0.1:0\"\n[tracking]\nstate_dir = \"ps-state\"\ncut_interval_ms = 100\n[target]\naddress = \"{addr}\"\nnode = \"ps1\"\nplain_tcp = true\n[[group]]\nid = \"g1\"\nfreeze = \"true\"\nthaw = \"true\"\n"
        );
        for d in &self.disks {
            ps.push_str(&format!(
                "[[group.disk]]\nid = \"{d}\"\npath = \"{d}.img\"\nsize = \"{}MiB\"\n",
                self.disk_bytes >> 20
            ));
        }
        std::fs::write(self.dir.join("ps.toml"), ps).unwrap();
        self.mt = Some(child);
    }

    fn start_ps(&mut self) {
        self.ps = Some(ProcessServer::start(&self.dir.join("ps.toml"), TIMEOUT));
    }

    fn ps(&self) -> &ProcessServer {
        self.ps.as_ref().expect("process server running")
    }

    /// kill -9 of the master target, and the wait for it.
    fn kill_mt(&mut self) {
        if let Some(mut c) = self.mt.take() {
            c.kill().expect("kill master target");
            c.wait().expect("wait for master target");
        }
    }

    fn mt_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mt.log")).unwrap_or_default()
    }

    /// The disks as the process server's backing files hold them now.
    fn disks_now(&self) -> Vec<Vec<u8>> {
        self.disks
            .iter()
            .map(|d| {
                std::fs::read(self.dir.join(format!("{d}.img")))
                    .unwrap_or_else(|_| vec![0; self.disk_bytes])
            })
            .collect()
    }

    fn replicas(&self) -> Vec<Vec<u8>> {
        self.disks
            .iter()
            .map(|d| std::fs::read(self.dir.join(format!("mt-data/replica-{d}.img"))).unwrap())
            .collect()
    }

    /// One qemu-io command per (disk, command), then the mark of the state after them
    /// (once a point after them is acknowledged). `marks` gets its `next_ms` closed.
    fn write(&self, marks: &mut [Mark], cmds: &[(&str, String)]) -> Mark {
        if let Some(m) = marks.last_mut() {
            m.next_ms = now_unix_ms();
        }
        for (disk, cmd) in cmds {
            self.ps().qemu_io(disk, cmd);
        }
        let done_ms = now_unix_ms();
        self.ps().wait_acked_after(done_ms);
        Mark {
            disks: self.disks_now(),
            done_ms,
            next_ms: u64::MAX,
        }
    }

    /// `master-target ARGS --config mt.toml`.
    fn mt_cli(&self, args: &[&str]) -> Output {
        Command::new(common::bin_path("master-target"))
            .args(args)
            .arg("--config")
            .arg(self.dir.join("mt.toml"))
            .output()
            .expect("run master-target")
    }

    /// A command that must succeed; its stdout as JSON.
    fn mt_json(&self, args: &[&str]) -> Value {
        let out = self.mt_cli(args);
        assert!(
            out.status.success(),
            "master-target {args:?} failed: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.mt_log()
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{args:?}: not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// A command that must fail; its stderr.
    fn mt_fails(&self, args: &[&str]) -> String {
        let out = self.mt_cli(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "master-target {args:?} succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        err
    }

    fn failback(&self, point: &str) -> Value {
        self.mt_json(&["failback", "--group", "g1", "--point", point, "--json"])
    }

    fn points(&self) -> Vec<Value> {
        self.mt_json(&["points", "--group", "g1", "--json"])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn group_state(&self) -> String {
        let st = self.mt_json(&["status", "--json"]);
        st["groups"][0]["state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Asserts every replica holds the disk as it was at `m`.
    fn assert_replicas(&self, m: &Mark, what: &str) {
        let got = self.replicas();
        for (i, d) in self.disks.iter().enumerate() {
            assert!(got[i] == m.disks[i], "{what}: replica of {d} differs");
        }
    }

    /// blake3 of every replica and every file of the group's directory (journal,
    /// failback state, undo logs): what "nothing changed" is checked against.
    fn fingerprint(&self) -> Vec<(String, blake3::Hash)> {
        let mut out = Vec::new();
        for d in &self.disks {
            let p = self.dir.join(format!("mt-data/replica-{d}.img"));
            out.push((
                p.display().to_string(),
                blake3::hash(&std::fs::read(&p).unwrap()),
            ));
        }
        for sub in ["journal", "failback"] {
            let dir = self.dir.join("mt-data/g1").join(sub);
            let mut names: Vec<_> = std::fs::read_dir(&dir)
                .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
                .unwrap_or_default();
            names.sort();
            for p in names {
                out.push((
                    p.display().to_string(),
                    blake3::hash(&std::fs::read(&p).unwrap()),
                ));
            }
        }
        out
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.kill_mt();
    }
}

/// The id of a consistent point cut inside `m`'s window.
fn point_in(points: &[Value], m: &Mark) -> (u64, u64) {
    points
        .iter()
        .filter(|p| p["consistent"] == true)
        .map(|p| {
            (
                p["id"].as_u64().unwrap(),
                p["time_unix_ms"].as_u64().unwrap(),
            )
        })
        .find(|&(_, t)| t > m.done_ms && t < m.next_ms)
        .unwrap_or_else(|| panic!("no point between {} and {}", m.done_ms, m.next_ms))
}

/// `unix_ms` as RFC 3339 in the +02:00 offset (GNU date), to test offsets end to end.
fn rfc3339_plus2(unix_ms: u64) -> String {
    let out = Command::new("date")
        .env("TZ", "Etc/GMT-2")
        .arg("-d")
        .arg(format!("@{}.{:03}", unix_ms / 1000, unix_ms % 1000))
        .arg("+%Y-%m-%dT%H:%M:%S.%3N%:z")
        .output()
        .expect("run date");
    let s = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(s.ends_with("+02:00"), "{s}");
    s
}

/// The state file of group g1's failback: (phase, flags, base_seq, applied_seq,
/// point_seq), or `None` without one. Layout: `datapath::failback`.
fn failback_state(dir: &Path) -> Option<(u8, u8, u64, u64, u64)> {
    let b = std::fs::read(dir.join("mt-data/g1/failback/failback.state")).ok()?;
    let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    Some((b[10], b[11], u64_at(40), u64_at(48), u64_at(24)))
}

/// The write commands of round `r` over `disks`: distinct patterns, a large write,
/// a write of zeroes, on every disk.
fn round(disks: &[String], r: u64) -> Vec<(&str, String)> {
    let mut out = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let base = (r * 3 + i as u64) % 8 * (1 << 20);
        out.push((
            d.as_str(),
            format!("write -P 0x{:02x} {} 1M", 0x10 + r * 8 + i as u64, base),
        ));
        out.push((
            d.as_str(),
            format!("write -P 0x{:02x} {} 64k", 0x80 + r, base + (3 << 19)),
        ));
        if r % 2 == 1 {
            out.push((d.as_str(), format!("write -z {} 256k", base + 4096 * 8)));
        }
    }
    out
}

/// Proves, on a group of three disks with the servers running, that failback to the
/// latest point (the process server cuts on request), to the latest processed point, to the latest app-consistent point (tagged with `process-
/// server tag --app-consistent`), to a point id and to a time (RFC 3339 with an offset)
/// each gives every disk exactly as it was at that point (one common point for the
/// group), each change of point is exact, the same point again is a no-op, the process
/// server is refused while the group is failed back, and commit drops journal and undo
/// logs: `points` shows none and `status` says failed-back.
#[test]
fn failback_to_each_kind_of_point_and_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let mut env = Env::new(tmp.path(), &["disk0", "disk1", "disk2"], 16);
    env.start_mt();
    env.start_ps();
    let start = now_unix_ms();
    env.ps().wait_acked_after(start);
    let mut marks: Vec<Mark> = Vec::new();
    for r in 0..2 {
        let m = env.write(&mut marks, &round(&env.disks, r));
        marks.push(m);
    }
    // An app-consistent point right after round 1's state.
    let tag = Command::new(common::bin_path("process-server"))
        .args([
            "tag",
            "--app-consistent",
            "--json",
            "--group",
            "g1",
            "--config",
        ])
        .arg(tmp.path().join("ps.toml"))
        .output()
        .unwrap();
    assert!(
        tag.status.success(),
        "{}",
        String::from_utf8_lossy(&tag.stderr)
    );
    let app: Value = serde_json::from_slice(&tag.stdout).unwrap();
    let app_id = app["id"].as_u64().unwrap_or_else(|| panic!("tag: {app}"));
    for r in 2..4 {
        let m = env.write(&mut marks, &round(&env.disks, r));
        marks.push(m);
    }
    let points = env.points();
    assert!(
        points
            .iter()
            .any(|p| p["id"] == app_id && p["kind"] == "app")
    );
    assert_eq!(env.group_state(), "replicating");

    // Latest: the process server cuts on request, and that cut is the final state.
    let newest_listed = points
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .max()
        .unwrap();
    let s = env.failback("latest");
    assert!(s["note"].is_null(), "{s}");
    assert!(s["point_id"].as_u64().unwrap() > newest_listed, "{s}");
    assert_eq!(s["point_kind"], "crash");
    assert!(s["bytes_applied"].as_u64().unwrap() > 0, "{s}");
    env.assert_replicas(marks.last().unwrap(), "latest");
    let cut_id = s["point_id"].as_u64().unwrap();
    assert!(
        env.ps()
            .log()
            .contains("cut at the master target's request"),
        "{}",
        env.ps().log()
    );

    // Latest processed: the newest point in the journal (the cut, or a timer's cut that
    // arrived before replication stopped), the final state too.
    let s = env.failback("latest-processed");
    assert_eq!(s["disks"].as_array().unwrap().len(), 3, "{s}");
    assert_eq!(s["state"], "failed-back-uncommitted");
    assert!(s["already"] == true || s["changed_from"] == cut_id, "{s}");
    assert!(s["point_time"].as_str().unwrap().ends_with('Z'), "{s}");
    env.assert_replicas(marks.last().unwrap(), "latest-processed");
    let latest_id = s["point_id"].as_u64().unwrap();
    eprintln!(
        "failback to latest-processed: {} bytes in {:.3} s ({:.0} MB/s)",
        s["bytes_applied"], s["seconds"], s["apply_mb_per_s"]
    );
    // The process server is refused now, by name.
    let deadline = Instant::now() + TIMEOUT;
    while !env.ps().log().contains("not protected") {
        assert!(Instant::now() < deadline, "no refusal: {}", env.ps().log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(env.group_state(), "failed-back-uncommitted");

    // The same point again: nothing to do.
    let s = env.failback(&latest_id.to_string());
    assert_eq!(s["already"], true, "{s}");

    // Latest app-consistent: round 1's state.
    let s = env.failback("latest-app");
    assert_eq!(s["point_id"], app_id, "{s}");
    assert_eq!(s["point_kind"], "app");
    assert_eq!(s["changed_from"], latest_id);
    assert!(s["reverted_bytes"].as_u64().unwrap() > 0, "{s}");
    assert!(s["data_loss_window_ms"].as_u64().unwrap() > 0, "{s}");
    env.assert_replicas(&marks[1], "latest-app");

    // A point id from round 0's window.
    let (id0, _) = point_in(&points, &marks[0]);
    let s = env.failback(&id0.to_string());
    assert_eq!(s["point_id"], id0);
    env.assert_replicas(&marks[0], "point id");

    // A time in round 2's window, with an offset: the newest point at or before it.
    let (id2, t2) = point_in(&points, &marks[2]);
    let s = env.failback(&rfc3339_plus2(t2));
    assert_eq!(s["point_id"], id2, "{s}");
    env.assert_replicas(&marks[2], "time");

    // Commit.
    let c = env.mt_json(&["commit", "--group", "g1", "--json"]);
    assert_eq!(c["point_id"], id2, "{c}");
    assert_eq!(c["state"], "failed-back");
    env.assert_replicas(&marks[2], "after commit");
    assert!(env.points().is_empty(), "points after commit");
    assert_eq!(env.group_state(), "failed-back");
    let undo: Vec<_> = std::fs::read_dir(tmp.path().join("mt-data/g1/failback"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(undo, ["failback.state"], "undo logs dropped");
    let e = env.mt_fails(&["failback", "--group", "g1", "--point", "latest-processed"]);
    assert!(
        e.contains("committed") && e.contains("not protected"),
        "{e}"
    );

    // A restart keeps refusing replication, and points stay empty.
    env.kill_mt();
    std::thread::sleep(Duration::from_millis(200));
    env.start_mt_same_port();
    assert_eq!(env.group_state(), "failed-back");
    assert!(env.points().is_empty());
    assert!(
        env.mt_log().contains("failed back and committed"),
        "{}",
        env.mt_log()
    );
}

impl Env {
    /// Restarts the master target with the same config (its port is 0: the process
    /// server, which names the old port, will not find it; the group refuses it anyway).
    fn start_mt_same_port(&mut self) {
        self.start_mt_env(&[]);
    }

    /// [`Env::start_mt_same_port`] with more environment variables (a failpoint).
    fn start_mt_env(&mut self, env: &[(&str, &str)]) {
        let (child, _) = common::start_master_target_env(
            &self.dir.join("mt.toml"),
            &self.dir.join("mt.log"),
            "info",
            env,
        );
        self.mt = Some(child);
    }
}

/// Proves bad point specs, an unknown point, an unknown group and a commit without a
/// failback are each a clear error that changes nothing (replicas, journal and
/// failback files hashed before and after) and leaves replication running; with the
/// server stopped, the same holds for the in-process path.
#[test]
fn refusals_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut env = Env::new(tmp.path(), &["disk0", "disk1"], 16);
    env.start_mt();
    env.start_ps();
    let mut marks: Vec<Mark> = Vec::new();
    let m = env.write(&mut marks, &round(&env.disks, 0));
    marks.push(m);
    if let Some(ps) = env.ps.take() {
        ps.stop();
    }
    let cases: &[(&[&str], &str)] = &[
        (
            &["failback", "--group", "g1", "--point", "yesterday"],
            "RFC 3339",
        ),
        (
            &[
                "failback",
                "--group",
                "g1",
                "--point",
                "2026-13-01T00:00:00Z",
            ],
            "month 13",
        ),
        (&["failback", "--group", "g1", "--point", ""], "--point"),
        (
            &["failback", "--group", "g1", "--point", "999999"],
            "no point 999999",
        ),
        (
            &[
                "failback",
                "--group",
                "g1",
                "--point",
                "1970-01-02T00:00:00Z",
            ],
            "at or before 1970-01-02",
        ),
        (
            &["failback", "--group", "nope", "--point", "latest"],
            "group \"nope\" is not in config",
        ),
        (&["failback", "--group", "g2", "--point", "latest"], "g2"),
        (&["commit", "--group", "g1"], "has not failed back"),
        (&["commit", "--group", "nope"], "group \"nope\""),
    ];
    for live in [true, false] {
        if !live {
            env.kill_mt();
        }
        for (args, want) in cases {
            let before = env.fingerprint();
            let e = env.mt_fails(args);
            assert!(
                e.contains(want),
                "live {live}: {args:?}: {e:?} lacks {want:?}"
            );
            assert_eq!(
                env.fingerprint(),
                before,
                "live {live}: {args:?} changed files"
            );
        }
        if live {
            assert_eq!(env.group_state(), "disconnected");
        }
    }
    env.assert_replicas(
        &Mark {
            disks: vec![vec![0; env.disk_bytes]; 2],
            done_ms: 0,
            next_ms: 0,
        },
        "replicas untouched (at the base)",
    );
}

/// The master target's failpoint that stops a failback, once its first batch is
/// recorded, until it is killed (an apply is too fast to be caught mid-way otherwise).
const STOP_AFTER_FIRST_RECORD: (&str, &str) =
    ("BLOCKREP_FAILPOINT", "failback::after_first_record");

/// Proves kill -9 during apply is followed by an exact result when the command runs
/// again: in-process (the command killed mid-apply, a second failback and a commit
/// refused while it runs), then live (the server killed mid-way through a change of
/// point, restarted: it keeps refusing replication and finishes nothing by itself, and
/// the rerun through it is exact); a second failback while one runs is refused; and
/// `latest` without a process server uses the latest processed point and says so. The
/// failpoint holds each failback after its first recorded batch until the kill.
#[test]
fn kill_9_during_apply_then_rerun_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let mut env = Env::new(tmp.path(), &["disk0", "disk1"], 64);
    env.start_mt();
    env.start_ps();
    let mut marks: Vec<Mark> = Vec::new();
    // Each round rewrites both disks whole: a journal of 128 MiB per round.
    for r in 0..3u64 {
        let cmds: Vec<(&str, String)> = env
            .disks
            .iter()
            .map(|d| (d.as_str(), format!("write -P 0x{:02x} 0 64M", 0x31 + r)))
            .chain(std::iter::once((
                "disk1",
                format!("write -P 0x{:02x} {} 4k", 0x71 + r, 4096 * (r + 1)),
            )))
            .collect();
        let m = env.write(&mut marks, &cmds);
        marks.push(m);
    }
    let points = env.points();
    if let Some(ps) = env.ps.take() {
        ps.stop();
    }
    env.kill_mt();

    // In-process: kill -9 once the first batches are recorded.
    let (last_id, _) = point_in(&points, &marks[2]);
    let mut child = Command::new(common::bin_path("master-target"))
        .args(["failback", "--json", "--group", "g1", "--point"])
        .arg(last_id.to_string())
        .arg("--config")
        .arg(tmp.path().join("mt.toml"))
        .env(STOP_AFTER_FIRST_RECORD.0, STOP_AFTER_FIRST_RECORD.1)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some((1, _, base, applied, _)) = failback_state(tmp.path())
            && applied > base
        {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the failback ended before it could be killed"
        );
        assert!(Instant::now() < deadline, "no progress recorded");
        std::thread::sleep(Duration::from_millis(2));
    }
    // While it runs, a second failback and a commit are refused.
    let e = env.mt_fails(&["failback", "--group", "g1", "--point", "latest-processed"]);
    assert!(e.contains("holds the group"), "{e}");
    let e = env.mt_fails(&["commit", "--group", "g1"]);
    assert!(e.contains("holds the group"), "{e}");
    child.kill().unwrap();
    child.wait().unwrap();
    let (phase, _, _, applied, point_seq) = failback_state(tmp.path()).unwrap();
    assert!(
        phase == 1 && applied < point_seq,
        "killed too late: the apply ended"
    );
    let e = env.mt_fails(&["commit", "--group", "g1"]);
    assert!(e.contains("did not finish"), "{e}");
    let s = env.failback(&last_id.to_string());
    assert!(s["resumed_after_seq"].as_u64().is_some(), "{s}");
    env.assert_replicas(&marks[2], "rerun after kill -9 (in-process)");
    eprintln!(
        "resumed failback: {} bytes in {:.3} s ({:.0} MB/s)",
        s["bytes_applied"], s["seconds"], s["apply_mb_per_s"]
    );

    // Live: a change of point through the server, the server killed mid-way.
    env.start_mt_env(&[STOP_AFTER_FIRST_RECORD]);
    assert_eq!(env.group_state(), "failed-back-uncommitted");
    let (first_id, _) = point_in(&points, &marks[0]);
    let mut child = Command::new(common::bin_path("master-target"))
        .args(["failback", "--json", "--group", "g1", "--point"])
        .arg(first_id.to_string())
        .arg("--config")
        .arg(tmp.path().join("mt.toml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        // Applying the new point (the revert recorded, or batches of it).
        if let Some((1, _, _, _, seq)) = failback_state(tmp.path())
            && seq != s_point_seq(&s, &points)
        {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "ended before the kill");
        assert!(Instant::now() < deadline, "no change of point recorded");
        std::thread::sleep(Duration::from_millis(2));
    }
    let e = env.mt_fails(&["failback", "--group", "g1", "--point", "latest-processed"]);
    assert!(e.contains("is running"), "{e}");
    env.kill_mt();
    let _ = child.wait();
    assert_eq!(failback_state(tmp.path()).unwrap().0, 1, "killed too late");
    env.start_mt_same_port();
    assert_eq!(env.group_state(), "failing-back");
    assert!(
        env.mt_log().contains("a failback was interrupted"),
        "{}",
        env.mt_log()
    );
    let s = env.failback(&first_id.to_string());
    assert_eq!(s["point_id"], first_id);
    env.assert_replicas(&marks[0], "rerun after kill -9 (live change of point)");
    // And forth again, then back: each exact.
    env.failback(&last_id.to_string());
    env.assert_replicas(&marks[2], "change to the last point");
    let (mid_id, _) = point_in(&points, &marks[1]);
    env.failback(&mid_id.to_string());
    env.assert_replicas(&marks[1], "change to the middle point");
    // `latest` without a process server: the latest processed point, and a note.
    let s = env.failback("latest");
    let note = s["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("process server not reachable") && note.contains("no process server"),
        "{s}"
    );
    env.assert_replicas(&marks[2], "latest without a process server");
}

/// The journal seq of the point a summary names, from a `points --json` list.
fn s_point_seq(s: &Value, points: &[Value]) -> u64 {
    points
        .iter()
        .find(|p| p["id"] == s["point_id"])
        .and_then(|p| p["seq"].as_u64())
        .unwrap_or(0)
}
