//! End-to-end tests of replication: the real `process-server serve` captures writes
//! made with qemu-io over NBD and ships them to the real `master-target serve`; the
//! master target's journal is then replayed point by point onto zero images, and every
//! point must be one of the states the disks went through, in order, the last one the
//! final state.
//!
//! Needs qemu-utils (qemu-io).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ProcessServer, now_unix_ms};

use datapath::extent::ExtentData;
use datapath::frame::{self, Decoder, Frame};
use datapath::journal::{Journal, JournalConfig};
use datapath::storage::RealFs;

/// Size of each of the two disks.
const DISK_BYTES: usize = 16 << 20;
/// Time a server has to start, and the shipper to acknowledge the last write.
const TIMEOUT: Duration = Duration::from_secs(20);

/// The disks' ids, in the order their images are hashed together.
const DISKS: [&str; 2] = ["disk0", "disk1"];

/// A running `master-target serve`; killed (SIGKILL) on drop.
struct MasterTarget {
    child: Child,
    addr: SocketAddr,
}

impl MasterTarget {
    /// Writes the config (listening on `listen`) in `dir` and starts the server.
    fn start(dir: &Path, listen: &str) -> Self {
        let config = dir.join("mt.toml");
        let mut text = format!(
            "listen = \"{listen}\"\ndata_dir = \"mt-data\"\nplain_tcp_loopback = true\n[[group]]\nid = \"g1\"\n"
        );
        for d in DISKS {
            text.push_str(&format!(
                "[[group.disk]]\nid = \"{d}\"\nsize = \"16MiB\"\nreplica = \"mt-data/replica-{d}.img\"\n"
            ));
        }
        std::fs::write(&config, text).expect("write master-target config");
        let (child, addr) = common::start_master_target(&config, &dir.join("mt.log"), "info");
        Self { child, addr }
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

/// Writes the process server's config (shipping to `target`) in `dir` and starts it.
fn start_process_server(dir: &Path, target: SocketAddr) -> ProcessServer {
    start_process_server_with(dir, target, "")
}

/// Like [`start_process_server`] with `tracking` added to the `[tracking]` table.
fn start_process_server_with(dir: &Path, target: SocketAddr, tracking: &str) -> ProcessServer {
    let config = dir.join("ps.toml");
    let mut text = format!(
        "[nbd]\nlisten = \"127.0.0.1:0\"\n[tracking]\nstate_dir = \"ps-state\"\ncut_interval_ms = 100\n{tracking}[target]\naddress = \"{target}\"\nnode = \"ps1\"\nplain_tcp = true\n[[group]]\nid = \"g1\"\n"
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

    /// The disks as they are now (or zero where missing) as the first state.
    fn from_disks(dir: &Path) -> Self {
        let mut s = Self {
            dir: dir.to_path_buf(),
            hashes: Vec::new(),
        };
        s.record();
        s
    }

    /// Records the disks' current state.
    fn record(&mut self) {
        let imgs: Vec<Vec<u8>> = DISKS
            .iter()
            .map(|d| {
                std::fs::read(self.dir.join(format!("{d}.img")))
                    .unwrap_or_else(|_| vec![0u8; DISK_BYTES])
            })
            .collect();
        self.hashes.push(pair_hash(&[&imgs[0], &imgs[1]]));
    }

    /// Runs one qemu-io write and records the state after it; returns the time just
    /// after the write completed.
    fn write(&mut self, ps: &ProcessServer, disk: &str, cmd: &str) -> u64 {
        ps.qemu_io(disk, cmd);
        let done = now_unix_ms();
        self.record();
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

/// Replays the master target's journal of g1 onto zero images and checks every
/// consistent point against `states`: each is some state S_k, k never decreases along
/// the points, and the last point is consistent and the last state. Inconsistent points
/// (cut during a resync) are history only and not checked. Checks the journal's seqs
/// are contiguous from 1 and the point ids rise. Returns the number of consistent
/// points.
fn check_journal(dir: &Path, states: &States) -> usize {
    let (j, _) = Journal::open(
        Arc::new(RealFs),
        &dir.join("mt-data/g1/journal"),
        "g1",
        JournalConfig::default(),
    )
    .expect("open journal");
    assert_eq!(j.base_seq(), 0);
    let listed: Vec<u64> = j.points().iter().map(|p| p.record.point_id).collect();
    assert!(!listed.is_empty(), "no point journaled");
    let mut imgs = [vec![0u8; DISK_BYTES], vec![0u8; DISK_BYTES]];
    let mut dec = Decoder::new();
    let mut k = 0usize;
    let mut seen = Vec::new();
    let mut hash = pair_hash(&[&imgs[0], &imgs[1]]);
    let mut changed = false;
    let (mut consistent, mut last_consistent) = (0, false);
    for (i, r) in j.read(1, j.write_seq()).expect("read journal").enumerate() {
        let (h, bytes) = r.expect("journal frame");
        assert_eq!(h.seq, i as u64 + 1, "journal seqs are not contiguous");
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
                changed = true;
            }
            Frame::Point(_, p) => {
                if let Some(&prev) = seen.last() {
                    assert!(p.point_id > prev, "point ids do not rise");
                }
                seen.push(p.point_id);
                last_consistent = p.consistent;
                if !p.consistent {
                    continue;
                }
                consistent += 1;
                if changed {
                    hash = pair_hash(&[&imgs[0], &imgs[1]]);
                    changed = false;
                }
                let found = (k..states.hashes.len())
                    .find(|&x| states.hashes[x] == hash)
                    .unwrap_or_else(|| {
                        panic!(
                            "point {} is none of the states S{k}..S{}",
                            p.point_id,
                            states.hashes.len() - 1
                        )
                    });
                k = found;
            }
            other => panic!("unexpected frame in the journal: {other:?}"),
        }
    }
    assert_eq!(
        seen, listed,
        "the points replayed are not the points listed"
    );
    assert!(last_consistent, "the last point is not consistent");
    assert_eq!(
        states.hashes[k],
        *states.hashes.last().expect("states"),
        "the last point is not the final state"
    );
    consistent
}

/// The write commands of one round: distinct patterns, a large write (several frames),
/// and a write of zeroes, on both disks.
fn round(r: u8) -> Vec<(&'static str, String)> {
    let base = u64::from(r) * (2 << 20);
    vec![
        ("disk0", format!("write -P 0x{:02x} {} 64k", 0x10 + r, base)),
        (
            "disk1",
            format!("write -P 0x{:02x} {} 3M", 0x20 + r, base + 4096),
        ),
        (
            "disk0",
            format!("write -P 0x{:02x} {} 1M", 0x30 + r, base + 32768),
        ),
        ("disk1", format!("write -z {} 1M", base + 512 * 1024)),
        (
            "disk0",
            format!("write -P 0x{:02x} {} 4k", 0x40 + r, base + (8 << 20)),
        ),
    ]
}

/// Proves a sequence of writes is shipped so that every journaled point is one of the
/// states the disks went through, in order, and the last point is the final state.
#[test]
fn writes_replicate_point_by_point() {
    let dir = tempfile::tempdir().unwrap();
    let mt = MasterTarget::start(dir.path(), "127.0.0.1:0");
    let ps = start_process_server(dir.path(), mt.addr);
    let mut states = States::new(dir.path());
    let mut done = 0;
    for (disk, cmd) in round(0).into_iter().chain(round(1)) {
        done = states.write(&ps, disk, &cmd);
    }
    ps.wait_acked_after(done);
    let log = ps.stop();
    assert!(log.contains("connected"), "{log}");
    mt.kill();
    let points = check_journal(dir.path(), &states);
    assert!(points >= 2, "only {points} points");
}

/// Proves a master target killed (-9) mid-replication and restarted on the same
/// address is reconnected to and resumed from: the journal stays contiguous (no gap,
/// no duplicate) and the point checks hold.
#[test]
fn master_target_kill_and_restart_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let mt = MasterTarget::start(dir.path(), "127.0.0.1:0");
    let addr = mt.addr;
    let ps = start_process_server(dir.path(), addr);
    let mut states = States::new(dir.path());
    for (disk, cmd) in round(0) {
        states.write(&ps, disk, &cmd);
    }
    // Killed while the last writes are still being cut and shipped.
    mt.kill();
    for (disk, cmd) in round(1) {
        states.write(&ps, disk, &cmd);
    }
    std::thread::sleep(Duration::from_millis(300));
    let mt = MasterTarget::start(dir.path(), &addr.to_string());
    let mut done = 0;
    for (disk, cmd) in round(2) {
        done = states.write(&ps, disk, &cmd);
    }
    ps.wait_acked_after(done);
    let log = ps.stop();
    assert!(
        log.matches("resumed").count() >= 2,
        "no resume after the restart; log:\n{log}"
    );
    mt.kill();
    check_journal(dir.path(), &states);
}

/// Proves a clean restart (SIGTERM) of the process server between write rounds resumes
/// shipping from its state file: the journal stays contiguous and the checks hold.
#[test]
fn process_server_restart_resumes_from_state() {
    let dir = tempfile::tempdir().unwrap();
    let mt = MasterTarget::start(dir.path(), "127.0.0.1:0");
    let mut states = States::new(dir.path());
    let ps = start_process_server(dir.path(), mt.addr);
    for (disk, cmd) in round(0) {
        states.write(&ps, disk, &cmd);
    }
    ps.stop();
    assert!(
        dir.path().join("ps-state/g1/shipped").exists(),
        "no shipping state written"
    );
    let ps = start_process_server(dir.path(), mt.addr);
    let mut done = 0;
    for (disk, cmd) in round(1) {
        done = states.write(&ps, disk, &cmd);
    }
    ps.wait_acked_after(done);
    let log = ps.stop();
    assert!(log.contains("resumed"), "{log}");
    mt.kill();
    check_journal(dir.path(), &states);
}

/// Proves a master target that lost acknowledged data (its data dir wiped) is detected:
/// the process server logs an error naming the group and ships nothing more of it.
#[test]
fn lost_target_data_stops_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let mt = MasterTarget::start(dir.path(), "127.0.0.1:0");
    let addr = mt.addr;
    let ps = start_process_server(dir.path(), addr);
    let mut states = States::new(dir.path());
    let mut done = 0;
    for (disk, cmd) in round(0) {
        done = states.write(&ps, disk, &cmd);
    }
    ps.wait_acked_after(done);
    mt.kill();
    std::fs::remove_dir_all(dir.path().join("mt-data")).expect("wipe the master target");
    let mt = MasterTarget::start(dir.path(), &addr.to_string());
    let deadline = Instant::now() + TIMEOUT;
    while !ps.log().contains("holds less than it acknowledged") {
        assert!(
            Instant::now() < deadline,
            "not detected; log:\n{}",
            ps.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = ps.log();
    let line = log
        .lines()
        .find(|l| l.contains("holds less than it acknowledged"))
        .unwrap_or_default();
    assert!(line.contains("ERROR") && line.contains("g1"), "{line}");
    states.write(&ps, "disk0", "write -P 0x77 0 64k");
    std::thread::sleep(Duration::from_millis(400));
    ps.stop();
    mt.kill();
    let (j, _) = Journal::open(
        Arc::new(RealFs),
        &dir.path().join("mt-data/g1/journal"),
        "g1",
        JournalConfig::default(),
    )
    .expect("open journal");
    assert_eq!(j.write_seq(), 0, "frames were shipped to the wiped target");
}

/// Proves a process server killed with -9 mid-replication comes back in bitmap-only
/// mode, resyncs its dirty blocks from the backing disks and carries on: no write
/// acknowledged to the NBD client is lost, the last point is the final state, and every
/// consistent point is one of the states the disks went through.
#[test]
fn process_server_kill_9_resyncs_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let mt = MasterTarget::start(dir.path(), "127.0.0.1:0");
    let mut states = States::new(dir.path());
    let mut ps = start_process_server(dir.path(), mt.addr);
    let mut done = 0;
    for (disk, cmd) in round(0) {
        done = states.write(&ps, disk, &cmd);
    }
    ps.wait_acked_after(done);
    for (disk, cmd) in round(1) {
        states.write(&ps, disk, &cmd);
    }
    // Killed while round 1 is being cut and shipped.
    ps.child.kill().expect("kill -9 the process server");
    ps.child.wait().expect("wait");
    drop(ps);
    let ps = start_process_server(dir.path(), mt.addr);
    for (disk, cmd) in round(2) {
        done = states.write(&ps, disk, &cmd);
    }
    ps.wait_acked_after(done);
    let log = ps.stop();
    for want in ["did not shut down cleanly", "resync started", "resync done"] {
        assert!(log.contains(want), "no {want:?} in the log:\n{log}");
    }
    mt.kill();
    check_journal(dir.path(), &states);
}

/// Proves the first protection of disks that already hold data ships every block:
/// the first consistent point is the disks as they were found (zero blocks included),
/// cuts before it are inconsistent, and replication goes on after it.
#[test]
fn initial_sync_ships_existing_data() {
    let dir = tempfile::tempdir().unwrap();
    // Data on the disks before they are protected: scattered runs, the rest zero.
    for (i, d) in DISKS.iter().enumerate() {
        let mut img = vec![0u8; DISK_BYTES];
        for k in 0..40usize {
            let at = (k * 397 + i * 131) % (DISK_BYTES / 4096) * 4096;
            img[at..at + 4096].fill((k + 1) as u8);
        }
        std::fs::write(dir.path().join(format!("{d}.img")), &img).unwrap();
    }
    let mut states = States::from_disks(dir.path());
    let mt = MasterTarget::start(dir.path(), "127.0.0.1:0");
    let start = now_unix_ms();
    let ps = start_process_server(dir.path(), mt.addr);
    ps.wait_acked_after(start);
    let mut done = 0;
    for (disk, cmd) in round(0) {
        done = states.write(&ps, disk, &cmd);
    }
    ps.wait_acked_after(done);
    let log = ps.stop();
    assert!(log.contains("initial sync done"), "{log}");
    mt.kill();
    let (j, _) = Journal::open(
        Arc::new(RealFs),
        &dir.path().join("mt-data/g1/journal"),
        "g1",
        JournalConfig::default(),
    )
    .expect("open journal");
    // Zero blocks cost no payload: far less than the disks' size crossed.
    let journal_bytes: u64 = j
        .read(1, j.write_seq())
        .unwrap()
        .map(|r| r.unwrap().1.len() as u64)
        .sum();
    assert!(
        journal_bytes < (DISK_BYTES as u64) / 2,
        "{journal_bytes} journal bytes for two mostly-zero disks of {DISK_BYTES}"
    );
    drop(j);
    check_journal(dir.path(), &states);
}

/// Proves a spool that fills while the master target is away drops the group to
/// bitmap-only tracking (status says so), and once the master target is back the dirty
/// blocks are resynced and the last point is the final state.
#[test]
fn spool_overflow_then_resync() {
    let dir = tempfile::tempdir().unwrap();
    let mt = MasterTarget::start(dir.path(), "127.0.0.1:0");
    let addr = mt.addr;
    let mut states = States::new(dir.path());
    let ps = start_process_server_with(
        dir.path(),
        addr,
        "spool_bytes_max = \"2MiB\"\nspool_segment_bytes = \"1MiB\"\n",
    );
    ps.wait_acked_after(0);
    mt.kill();
    // 4 MiB of writes into a 2 MiB spool with nobody draining it.
    for r in 0..4u64 {
        states.write(
            &ps,
            "disk0",
            &format!("write -P 0x{:02x} {} 1M", 0x51 + r, r << 20),
        );
    }
    let status = Command::new(common::bin_path("process-server"))
        .args(["status", "--json", "--config"])
        .arg(dir.path().join("ps.toml"))
        .output()
        .expect("run status");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("bitmap-only"), "{text}\n{}", ps.log());
    let mt = MasterTarget::start(dir.path(), &addr.to_string());
    let done = states.write(&ps, "disk1", "write -P 0x66 4096 64k");
    ps.wait_acked_after(done);
    let log = ps.stop();
    assert!(log.contains("resync done"), "{log}");
    mt.kill();
    check_journal(dir.path(), &states);
}
