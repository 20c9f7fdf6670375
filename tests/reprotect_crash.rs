//! kill -9 of the process server in the middle of a hash-diff initial sync (a
//! reprotect), with writes acknowledged to the NBD client while the pass was under way:
//! after the restart the pass runs again (a hash-diff again, not a full sync) and the
//! master target's copy ends equal to the disks byte for byte.
//!
//! Topology: a process server on `b0.img`, `b1.img` (fresh state) protects them towards
//! a master target whose replicas `a0.img`, `a1.img` are copies of them with some 64 KiB
//! blocks changed (as after a failback: the other site's disks hold the point plus what
//! it wrote after it). The master target is paused (SIGSTOP) once the pass has begun,
//! so the pass stands still half done whatever the machine's speed; then the test
//! writes through NBD, kills the process server, resumes the master target and restarts
//! the process server.
//!
//! Needs qemu-utils (qemu-io).

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{ProcessServer, now_unix_ms};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(120);
/// Big enough that the pass is far from done when the master target is paused (the
/// process server asks for at most 64 MiB of hashes ahead).
const DISK_MIB: u64 = 256;
const BLOCK: u64 = 64 << 10;
const DISKS_A: [(&str, &str); 2] = [("d0", "a0.img"), ("d1", "a1.img")];
const DISKS_B: [(&str, &str); 2] = [("d0", "b0.img"), ("d1", "b1.img")];

fn write_config(dir: &Path, name: &str, text: String) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn disks_toml(disks: &[(&str, &str)], key: &str) -> String {
    disks
        .iter()
        .map(|(id, file)| {
            format!("[[group.disk]]\nid = \"{id}\"\nsize = \"{DISK_MIB}MiB\"\n{key} = \"{file}\"\n")
        })
        .collect()
}

fn status(cfg: &Path) -> Value {
    let out = Command::new(common::bin_path("process-server"))
        .args(["status", "--json", "--config"])
        .arg(cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}

fn wait_until(what: &str, log: impl Fn() -> String, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "{what}: timed out; log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Disks with data in some places (a pattern per 1 MiB region), holes elsewhere.
fn make_disks(dir: &Path) {
    for (i, (_, file)) in DISKS_B.iter().enumerate() {
        let f = std::fs::File::create(dir.join(file)).unwrap();
        f.set_len(DISK_MIB << 20).unwrap();
        let mut region = vec![0u8; 1 << 20];
        for r in (0..DISK_MIB).step_by(7) {
            for (j, b) in region.iter_mut().enumerate() {
                *b = (j as u64 ^ r ^ (i as u64) << 4).wrapping_mul(2654435761) as u8;
            }
            f.write_all_at(&region, r << 20).unwrap();
        }
        f.sync_all().unwrap();
    }
}

/// A's copies: B's disks with `blocks` 64 KiB blocks changed on each.
fn make_copies(dir: &Path, blocks: u64) {
    for ((_, a), (_, b)) in DISKS_A.iter().zip(DISKS_B) {
        std::fs::copy(dir.join(b), dir.join(a)).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(a))
            .unwrap();
        for k in 0..blocks {
            let at = (k * 37 + 3) % (DISK_MIB * 16) * BLOCK;
            f.write_all_at(&vec![0xa0 | k as u8 & 0xf; BLOCK as usize], at)
                .unwrap();
        }
        f.sync_all().unwrap();
    }
}

/// Proves a kill -9 of the process server mid hash-diff pass loses no write it
/// acknowledged and leaves no difference: the restarted server compares again (a
/// hash-diff pass, not a full sync) and the master target's files end equal to the
/// disks.
#[test]
fn kill_mid_hash_diff_pass_then_restart_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_disks(dir);
    make_copies(dir, 24);

    let mt_cfg = write_config(
        dir,
        "mt-a.toml",
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"mt-a-data\"\nplain_tcp_loopback = true\n\
             [[group]]\nid = \"g1\"\nretention = \"1s\"\nretention_check_interval_ms = 200\n{}",
            disks_toml(&DISKS_A, "replica")
        ),
    );
    let mt_log = dir.join("mt-a.log");
    let (mut mt, mt_addr) = common::start_master_target(&mt_cfg, &mt_log, "info");
    let mt_log_text = || std::fs::read_to_string(&mt_log).unwrap_or_default();
    let ps_cfg = write_config(
        dir,
        "ps-b.toml",
        format!(
            "[nbd]\nlisten = \"127.0.0.1:0\"\n[tracking]\nstate_dir = \"ps-b-state\"\n\
             cut_interval_ms = 100\n[target]\naddress = \"{mt_addr}\"\nnode = \"ps1\"\n\
             plain_tcp = true\n[[group]]\nid = \"g1\"\n{}",
            disks_toml(&DISKS_B, "path")
        ),
    );

    // 1. The pass begins; the master target is paused at once, so it stands half done.
    let ps = ProcessServer::start(&ps_cfg, TIMEOUT);
    wait_until(
        "hash-diff pass begun",
        || ps.log(),
        || ps.log().contains("a hash-diff resync"),
    );
    signal(mt.id(), "-STOP");
    let st = status(&ps_cfg);
    let resync = &st["groups"][0]["resync"];
    let (done, total) = (
        resync["done_bytes"].as_u64().unwrap_or(0),
        resync["total_bytes"].as_u64().unwrap_or(0),
    );
    assert!(
        total > 0 && done < total,
        "the pass should stand half done while the master target is paused: {st}"
    );

    // 2. Writes acknowledged to the client while the pass stands (one ahead of the
    // cursor, one over a block that differs at A), then kill -9.
    ps.qemu_io("d0", &format!("write -P 0x5a {} 1M", (DISK_MIB - 8) << 20));
    ps.qemu_io("d1", &format!("write -P 0x6b {} 64k", 3 * BLOCK));
    let mut ps = ps;
    ps.child.kill().unwrap();
    ps.child.wait().unwrap();
    drop(ps);
    signal(mt.id(), "-CONT");

    // 3. The restart compares again (a hash-diff pass) and ends replicating.
    let ps = ProcessServer::start(&ps_cfg, TIMEOUT);
    wait_until(
        "initial sync done after the restart",
        || ps.log(),
        || {
            let st = status(&ps_cfg);
            st["groups"][0]["state"] == "replicating"
                && st["groups"][0]["initial_sync_disks"]
                    .as_array()
                    .is_some_and(|a| a.is_empty())
        },
    );
    let log = ps.log();
    assert!(
        log.contains("did not shut down cleanly"),
        "the restart should see the unclean end; log:\n{log}"
    );
    assert!(
        log.contains("a hash-diff resync"),
        "the pass after the restart should compare hashes again; log:\n{log}"
    );
    let st = status(&ps_cfg);
    let (mut compared, mut sent) = (0, 0);
    for d in st["disks"].as_array().unwrap() {
        compared += d["resync_compared_blocks"].as_u64().unwrap();
        sent += d["resync_sent_blocks"].as_u64().unwrap();
    }
    eprintln!(
        "after the restart: {sent} of {compared} blocks sent; before the kill: {done} of {total} bytes done"
    );
    assert!(
        compared > 0 && sent < compared,
        "a hash-diff pass sends less than it compares: {sent} of {compared}; log:\n{log}"
    );
    ps.wait_acked_after(now_unix_ms());

    // 4. The master target's files equal the disks byte for byte (the 1 s retention
    // folds its journal into them), the writes of step 2 included.
    let same = || {
        DISKS_A.iter().zip(DISKS_B).all(|((_, a), (_, b))| {
            std::fs::read(dir.join(a)).unwrap() == std::fs::read(dir.join(b)).unwrap()
        })
    };
    wait_until("A's files equal B's disks", mt_log_text, same);
    let b0 = std::fs::read(dir.join("b0.img")).unwrap();
    let at = ((DISK_MIB - 8) << 20) as usize;
    assert!(b0[at..at + (1 << 20)].iter().all(|&x| x == 0x5a));
    ps.stop();
    let _ = mt.kill();
    let _ = mt.wait();
}
