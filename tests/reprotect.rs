//! End-to-end tests of reprotect after a failback (a hash-diff initial sync in the
//! other direction) and of `process-server verify`, with the real binaries on loopback
//! and qemu-io writing through NBD.
//!
//! Reprotect topology: site A's process server `ps_a` (disks `a0.img`, `a1.img`)
//! replicates to site B's master target `mt_b` (replicas `b0.img`, `b1.img`). B fails
//! back to a point P and commits: B's files hold the disks at P. Then a process server
//! on B's files (`ps_b`, fresh state) ships to a master target on A's files (`mt_a`,
//! fresh data dir), which hold P plus what A wrote after P. Only those blocks may cross
//! the wire.
//!
//! Needs qemu-utils (qemu-io).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use common::{ProcessServer, now_unix_ms};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(60);
const DISK_MIB: u64 = 16;
const BLOCK: u64 = 64 << 10;

/// A master target config over `replicas` (disk id, file) keeping `retention` of
/// history (a short one makes its replicas soon hold what it journaled).
fn mt_config(
    dir: &Path,
    name: &str,
    data_dir: &str,
    retention: &str,
    replicas: &[(&str, &str)],
) -> PathBuf {
    let mut mt = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{data_dir}\"\nplain_tcp_loopback = true\n\
         [[group]]\nid = \"g1\"\nretention = \"{retention}\"\nretention_check_interval_ms = 200\n"
    );
    for (id, file) in replicas {
        mt.push_str(&format!(
            "[[group.disk]]\nid = \"{id}\"\nsize = \"{DISK_MIB}MiB\"\nreplica = \"{file}\"\n"
        ));
    }
    let path = dir.join(name);
    std::fs::write(&path, mt).unwrap();
    path
}

/// A process server config over `disks` (disk id, file), shipping to `target`.
fn ps_config(
    dir: &Path,
    name: &str,
    state: &str,
    target: std::net::SocketAddr,
    disks: &[(&str, &str)],
) -> PathBuf {
    let disks: Vec<(&str, &str, Vec<PathBuf>)> =
        disks.iter().map(|(id, f)| (*id, *f, Vec::new())).collect();
    ps_config_with_lists(dir, name, state, Some(target), &disks)
}

/// [`ps_config`] with each disk's `initial_sync_changed` lists, and without a
/// `[target]` when `target` is `None`.
fn ps_config_with_lists(
    dir: &Path,
    name: &str,
    state: &str,
    target: Option<std::net::SocketAddr>,
    disks: &[(&str, &str, Vec<PathBuf>)],
) -> PathBuf {
    let mut ps = format!(
        "[nbd]\nlisten = \"127.0.0.1:0\"\n[tracking]\nstate_dir = \"{state}\"\n\
         cut_interval_ms = 100\n"
    );
    if let Some(target) = target {
        ps.push_str(&format!(
            "[target]\naddress = \"{target}\"\nnode = \"ps1\"\nplain_tcp = true\n"
        ));
    }
    ps.push_str("[[group]]\nid = \"g1\"\n");
    for (id, file, lists) in disks {
        ps.push_str(&format!(
            "[[group.disk]]\nid = \"{id}\"\npath = \"{file}\"\nsize = \"{DISK_MIB}MiB\"\n"
        ));
        if !lists.is_empty() {
            let quoted: Vec<String> = lists.iter().map(|p| format!("{p:?}")).collect();
            ps.push_str(&format!("initial_sync_changed = [{}]\n", quoted.join(", ")));
        }
    }
    let path = dir.join(name);
    std::fs::write(&path, ps).unwrap();
    path
}

fn run(bin: &str, args: &[&str], config: &Path) -> Output {
    Command::new(common::bin_path(bin))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap_or_else(|e| panic!("run {bin}: {e}"))
}

/// A command that must succeed; its stdout as JSON.
/// `process-server changed --disk DISK --out OUT --json` under `config`: its summary.
fn changed_json(disk: &str, out: &Path, config: &Path) -> Value {
    json(
        "process-server",
        &[
            "changed",
            "--disk",
            disk,
            "--out",
            out.to_str().unwrap(),
            "--json",
        ],
        config,
    )
}

fn json(bin: &str, args: &[&str], config: &Path) -> Value {
    let out = run(bin, args, config);
    assert!(
        out.status.success(),
        "{bin} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{bin} {args:?}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn read(dir: &Path, file: &str) -> Vec<u8> {
    std::fs::read(dir.join(file)).unwrap()
}

/// Polls `f` until it holds, or panics with `what` and the log.
fn wait_until(what: &str, log: impl Fn() -> String, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "{what}: timed out; log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// kill -9 and wait.
fn kill(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

/// `master-target failback --point P` then `commit` of group g1 (both must succeed, the
/// failback to P); the commit's JSON answer.
fn failback_and_commit(cfg: &Path, p: u64) -> Value {
    let point = p.to_string();
    let fb = json(
        "master-target",
        &["failback", "--group", "g1", "--point", &point, "--json"],
        cfg,
    );
    assert_eq!(fb["point_id"], p, "{fb}");
    json("master-target", &["commit", "--group", "g1", "--json"], cfg)
}

/// The process server's status, once its group replicates and its initial sync is
/// done.
fn wait_replicating(ps: &ProcessServer, cfg: &Path) -> Value {
    let mut st = Value::Null;
    wait_until(
        "initial sync done",
        || ps.log(),
        || {
            st = json("process-server", &["status", "--json"], cfg);
            st["groups"][0]["state"] == "replicating"
                && st["groups"][0]["initial_sync_disks"]
                    .as_array()
                    .is_some_and(|a| a.is_empty())
        },
    );
    st
}

/// Proves reprotect after a failback sends only what differs: A replicates to B, a
/// point P is tagged, A writes K more distinct 64 KiB blocks, B fails back to P and
/// commits; a process server on B's files then protects them towards a master target
/// on A's files with a hash-diff initial sync that compares every block and sends
/// exactly K, after which A's files equal B's byte for byte and replication goes on
/// (a write on B reaches A).
#[test]
fn reprotect_after_failback_sends_only_the_differing_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let disks_a = [("d0", "a0.img"), ("d1", "a1.img")];
    let disks_b = [("d0", "b0.img"), ("d1", "b1.img")];

    // 1. A -> B. Both sides start blank: B has no copy, the initial sync is a full one
    // (the master target says so once instead of hashing zeros).
    let mt_b_cfg = mt_config(dir, "mt-b.toml", "mt-b-data", "24h", &disks_b);
    let (mt_b, mt_b_addr) = common::start_master_target(&mt_b_cfg, &dir.join("mt-b.log"), "info");
    let ps_a_cfg = ps_config(dir, "ps-a.toml", "ps-a-state", mt_b_addr, &disks_a);
    let ps_a = ProcessServer::start(&ps_a_cfg, TIMEOUT);
    wait_replicating(&ps_a, &ps_a_cfg);
    assert!(
        ps_a.log().contains("no copy at the master target"),
        "a blank replica should be no copy; log:\n{}",
        ps_a.log()
    );
    // Data on both disks before P: large writes, some zeros.
    for (d, pattern, at) in [
        ("d0", 0x21, 0u64),
        ("d0", 0x22, 5 << 20),
        ("d1", 0x31, 1 << 20),
        ("d1", 0x32, 9 << 20),
    ] {
        ps_a.qemu_io(d, &format!("write -P 0x{pattern:02x} {at} 2M"));
    }
    ps_a.qemu_io("d0", &format!("write -z {} 256k", 1 << 20));
    let tag = json(
        "process-server",
        &["tag", "--group", "g1", "--json"],
        &ps_a_cfg,
    );
    let p = tag["id"].as_u64().expect("point id");
    assert_eq!(tag["consistent"], true);
    let at_p: Vec<Vec<u8>> = disks_a.iter().map(|(_, f)| read(dir, f)).collect();
    // 2. K distinct 64 KiB blocks after P, over data P holds (so B's copy of them
    // is data too, and what B sends back costs payload bytes).
    let after_p: [(&str, u64); 7] = [
        ("d0", 0),
        ("d0", 2 * BLOCK),
        ("d0", (5 << 20) + BLOCK),
        ("d0", (7 << 20) - BLOCK),
        ("d1", 1 << 20),
        ("d1", (2 << 20) + 3 * BLOCK),
        ("d1", 9 << 20),
    ];
    let k = after_p.len() as u64;
    for (i, (d, at)) in after_p.iter().enumerate() {
        ps_a.qemu_io(d, &format!("write -P 0x{:02x} {at} 64k", 0x41 + i));
    }
    let done = now_unix_ms();
    ps_a.wait_acked_after(done);
    ps_a.stop();

    // 3. Failback of B to P, commit: B's files are the disks at P.
    let c = failback_and_commit(&mt_b_cfg, p);
    // The running server wrote the change lists of the frames after P: the K blocks.
    let lists = c["change_lists"].as_array().expect("change_lists");
    assert_eq!(lists.len(), 2, "{c}");
    let listed: u64 = lists.iter().map(|l| l["blocks"].as_u64().unwrap()).sum();
    assert_eq!(listed, k * BLOCK / 4096, "{c}");
    kill(mt_b);
    for (i, (_, f)) in disks_b.iter().enumerate() {
        assert!(read(dir, f) == at_p[i], "{f} is not the disk at point {p}");
    }

    // 4. Reprotect: a master target on A's files, a process server on B's files.
    let mt_a_cfg = mt_config(dir, "mt-a.toml", "mt-a-data", "1s", &disks_a);
    let (mt_a, mt_a_addr) = common::start_master_target(&mt_a_cfg, &dir.join("mt-a.log"), "info");
    let ps_b_cfg = ps_config(dir, "ps-b.toml", "ps-b-state", mt_a_addr, &disks_b);
    let started = Instant::now();
    let ps_b = ProcessServer::start(&ps_b_cfg, TIMEOUT);
    let st = wait_replicating(&ps_b, &ps_b_cfg);
    let seconds = started.elapsed().as_secs_f64();
    let blocks_per_disk = (DISK_MIB << 20) / BLOCK;
    let (mut compared, mut sent) = (0, 0);
    for d in st["disks"].as_array().unwrap() {
        compared += d["resync_compared_blocks"].as_u64().unwrap();
        sent += d["resync_sent_blocks"].as_u64().unwrap();
    }
    let log = ps_b.log();
    assert!(log.contains("hash-diff resync"), "log:\n{log}");
    assert_eq!(
        compared,
        2 * blocks_per_disk,
        "every block compared; log:\n{log}"
    );
    assert_eq!(sent, k, "only the blocks A wrote after P; log:\n{log}");
    // Once a point after the pass is acknowledged, everything it recorded was shipped.
    ps_b.wait_acked_after(now_unix_ms());
    let st = json("process-server", &["status", "--json"], &ps_b_cfg);
    let plain = st["groups"][0]["shipped_plain_bytes"].as_u64().unwrap();
    let wire = st["groups"][0]["shipped_bytes"].as_u64().unwrap();
    eprintln!(
        "reprotect: {} of {} blocks sent; {plain} plain bytes, {wire} bytes on the wire, for \
         disks of {} bytes; start to replicating in {seconds:.2} s",
        sent,
        compared,
        2 * (DISK_MIB << 20)
    );
    assert_eq!(plain, k * BLOCK, "plain bytes shipped for {k} blocks");

    // 5. A's files follow B's (the short retention folds the journal into them).
    let same = || {
        disks_a
            .iter()
            .zip(&disks_b)
            .all(|((_, a), (_, b))| read(dir, a) == read(dir, b))
    };
    let mt_a_log = || std::fs::read_to_string(dir.join("mt-a.log")).unwrap_or_default();
    wait_until("A's replicas equal B's disks", mt_a_log, same);
    let v = json(
        "process-server",
        &["verify", "--disk", "d0", "--json"],
        &ps_b_cfg,
    );
    assert_eq!(v["differing_blocks"], 0, "{v}");

    // 6. Replication goes on: a write on B reaches A.
    ps_b.qemu_io("d1", &format!("write -P 0x77 {} 128k", 14 << 20));
    let done = now_unix_ms();
    ps_b.wait_acked_after(done);
    wait_until("a write on B reaches A", mt_a_log, || {
        let a = read(dir, "a1.img");
        a[(14 << 20)..(14 << 20) + (128 << 10)]
            .iter()
            .all(|&b| b == 0x77)
            && a == read(dir, "b1.img")
    });
    ps_b.stop();
    kill(mt_a);
}

/// Proves `process-server verify` finds no difference once replication settled;
/// after one block of the master target's replica was damaged while both servers were
/// stopped, reports exactly that block's range (exit status 2, the text form naming
/// it too); and reports a write no acknowledged point holds yet as in flight, not as a
/// difference, until a point covers it.
#[test]
fn verify_reports_a_damaged_replica_block() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let disks = [("d0", "ps0.img"), ("d1", "ps1.img")];
    let replicas = [("d0", "r0.img"), ("d1", "r1.img")];
    let mt_cfg = mt_config(dir, "mt.toml", "mt-data", "1s", &replicas);
    let (mt, addr) = common::start_master_target(&mt_cfg, &dir.join("mt.log"), "info");
    let ps_cfg = ps_config(dir, "ps.toml", "ps-state", addr, &disks);
    let ps = ProcessServer::start(&ps_cfg, TIMEOUT);
    wait_replicating(&ps, &ps_cfg);
    ps.qemu_io("d0", "write -P 0x5a 0 4M");
    ps.qemu_io("d1", &format!("write -P 0x6b {} 3M", 2 << 20));
    let done = now_unix_ms();
    ps.wait_acked_after(done);
    let blocks = (DISK_MIB << 20) / BLOCK;
    for d in ["d0", "d1"] {
        let v = json(
            "process-server",
            &["verify", "--disk", d, "--json"],
            &ps_cfg,
        );
        assert_eq!(v["differing_blocks"], 0, "{v}");
        assert_eq!(v["in_flight_blocks"], 0, "{v}");
        assert_eq!(v["compared_blocks"], blocks, "{v}");
        assert_eq!(v["compared_bytes"], DISK_MIB << 20, "{v}");
        assert!(v["points"][0].as_u64().unwrap() > 0, "{v}");
    }
    // The one-second retention folds the initial sync and the writes into the
    // replicas: then the journal holds no frame that covers them. The epoch of the last
    // write may be cut up to a cut interval (100 ms) after `done`, and its frames stay
    // until a point after it is folded: so every listed point must be well after that.
    let settled = done + 1000;
    wait_until(
        "the writes folded into the replicas",
        || std::fs::read_to_string(dir.join("mt.log")).unwrap_or_default(),
        || {
            let points = json(
                "master-target",
                &["points", "--group", "g1", "--json"],
                &mt_cfg,
            );
            let points = points.as_array().cloned().unwrap_or_default();
            !points.is_empty()
                && points
                    .iter()
                    .all(|p| p["time_unix_ms"].as_u64().is_some_and(|t| t > settled))
        },
    );
    // Damage one block of d0's replica that was never written, with both servers
    // stopped.
    ps.stop();
    kill(mt);
    let bad = 10 * BLOCK;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("r0.img"))
            .unwrap();
        f.write_all_at(&[0xee; 512], bad + 4096).unwrap();
        f.sync_all().unwrap();
    }
    let (mt, addr) = common::start_master_target(&mt_cfg, &dir.join("mt.log"), "info");
    let ps_cfg = ps_config(dir, "ps.toml", "ps-state", addr, &disks);
    let ps = ProcessServer::start(&ps_cfg, TIMEOUT);
    wait_until(
        "connected again",
        || ps.log(),
        || json("process-server", &["status", "--json"], &ps_cfg)["groups"][0]["connected"] == true,
    );
    let out = run(
        "process-server",
        &["verify", "--disk", "d0", "--json"],
        &ps_cfg,
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}{}\nps log:\n{}\nmt log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        ps.log(),
        std::fs::read_to_string(dir.join("mt.log")).unwrap_or_default()
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["differing_blocks"], 1, "{v}");
    assert_eq!(v["differing"][0]["offset"], bad, "{v}");
    assert_eq!(v["differing"][0]["len"], BLOCK, "{v}");
    assert_eq!(v["compared_blocks"], blocks, "{v}");
    let text = run("process-server", &["verify", "--disk", "d0"], &ps_cfg);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!("DIFFERING: 1 blocks: {bad}+{BLOCK}")),
        "{text}"
    );
    // The other disk is intact.
    let v = json(
        "process-server",
        &["verify", "--disk", "d1", "--json"],
        &ps_cfg,
    );
    assert_eq!(v["differing_blocks"], 0, "{v}");
    // An unknown disk is an error.
    let out = run("process-server", &["verify", "--disk", "nope"], &ps_cfg);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown disk"));

    // A write in no acknowledged point yet (no timer cuts now) is in flight, not
    // compared; once a point covers it, it compares equal.
    ps.stop();
    let slow = std::fs::read_to_string(&ps_cfg)
        .unwrap()
        .replace("cut_interval_ms = 100", "cut_interval_ms = 600000");
    std::fs::write(&ps_cfg, slow).unwrap();
    let ps = ProcessServer::start(&ps_cfg, TIMEOUT);
    wait_until(
        "connected again",
        || ps.log(),
        || json("process-server", &["status", "--json"], &ps_cfg)["groups"][0]["connected"] == true,
    );
    ps.qemu_io("d1", &format!("write -P 0x7c {} 64k", 12 * BLOCK));
    let v = json(
        "process-server",
        &["verify", "--disk", "d1", "--json"],
        &ps_cfg,
    );
    assert_eq!(v["in_flight_blocks"], 1, "{v}");
    assert_eq!(v["in_flight"][0]["offset"], 12 * BLOCK, "{v}");
    assert_eq!(v["in_flight"][0]["len"], BLOCK, "{v}");
    assert_eq!(v["differing_blocks"], 0, "{v}");
    assert_eq!(v["compared_blocks"], blocks - 1, "{v}");
    let tagged = now_unix_ms();
    json(
        "process-server",
        &["tag", "--group", "g1", "--json"],
        &ps_cfg,
    );
    ps.wait_acked_after(tagged);
    let v = json(
        "process-server",
        &["verify", "--disk", "d1", "--json"],
        &ps_cfg,
    );
    assert_eq!(
        (
            v["in_flight_blocks"].as_u64(),
            v["differing_blocks"].as_u64()
        ),
        (Some(0), Some(0)),
        "{v}"
    );
    ps.stop();
    kill(mt);
}

/// One write: disk, offset, length, byte pattern.
type Write = (&'static str, u64, u64, u8);

/// Writes `w` through the process server's NBD export.
fn write_all(ps: &ProcessServer, w: &[Write]) {
    for (d, at, len, pattern) in w {
        ps.qemu_io(d, &format!("write -P 0x{pattern:02x} {at} {len}"));
    }
}

/// The 64 KiB blocks (disk index, block) that `writes` touch.
fn blocks_of(disks: &[(&str, &str)], writes: &[Write]) -> BTreeSet<(usize, u64)> {
    writes
        .iter()
        .flat_map(|(d, at, len, _)| {
            let i = disks.iter().position(|(id, _)| id == d).unwrap();
            (at / BLOCK..(at + len).div_ceil(BLOCK)).map(move |b| (i, b))
        })
        .collect()
}

/// The 64 KiB blocks (disk index, block) where the files `a` and `b` differ.
fn differing(dir: &Path, a: &[(&str, &str)], b: &[(&str, &str)]) -> BTreeSet<(usize, u64)> {
    let mut out = BTreeSet::new();
    for (i, ((_, fa), (_, fb))) in a.iter().zip(b).enumerate() {
        let (x, y) = (read(dir, fa), read(dir, fb));
        for (k, (p, q)) in x
            .chunks(BLOCK as usize)
            .zip(y.chunks(BLOCK as usize))
            .enumerate()
        {
            if p != q {
                out.insert((i, k as u64));
            }
        }
    }
    out
}

/// The sum of the 64 KiB blocks of the master target's answered hash requests for the
/// latest state, from its debug log (colour codes and all).
fn hashed_blocks(log: &str) -> u64 {
    let mut plain = String::with_capacity(log.len());
    let mut rest = log;
    while let Some(at) = rest.find('\x1b') {
        plain.push_str(&rest[..at]);
        rest = &rest[at..];
        rest = rest.find('m').map_or("", |m| &rest[m + 1..]);
    }
    plain.push_str(rest);
    plain
        .lines()
        .filter(|l| l.contains("hash request answered") && l.contains("of=Latest"))
        .filter_map(|l| l.split(" count=").nth(1))
        .filter_map(|r| {
            r.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// An address nothing listens on (a process server shipping there waits).
fn dead_address() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Proves a reprotect from change lists compares only the blocks that can differ and
/// sends only the ones that do: A replicates to B; after point P, A writes blocks B
/// acknowledges (frames after P in B's journal), then, with B's master target killed,
/// more that stay dirty at A; A stops; B fails back to P offline and its commit writes
/// the lists of the frames after P; `process-server changed` lists A's unacknowledged
/// writes; a process server on B's files starts from both lists, B writes more, and
/// its initial sync towards a master target on A's files compares exactly the blocks
/// of the union (the master target hashes only those), sends exactly the blocks that
/// really differ (every one of which is in the union), and leaves A's files equal to
/// B's byte for byte.
#[test]
fn reprotect_from_change_lists_compares_only_what_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let disks_a = [("d0", "a0.img"), ("d1", "a1.img")];
    let disks_b = [("d0", "b0.img"), ("d1", "b1.img")];

    // 1. A -> B, data on both disks, point P.
    let mt_b_cfg = mt_config(dir, "mt-b.toml", "mt-b-data", "24h", &disks_b);
    let (mt_b, mt_b_addr) = common::start_master_target(&mt_b_cfg, &dir.join("mt-b.log"), "info");
    let ps_a_cfg = ps_config(dir, "ps-a.toml", "ps-a-state", mt_b_addr, &disks_a);
    let ps_a = ProcessServer::start(&ps_a_cfg, TIMEOUT);
    wait_replicating(&ps_a, &ps_a_cfg);
    write_all(
        &ps_a,
        &[
            ("d0", 0, 2 << 20, 0x21),
            ("d0", 5 << 20, 2 << 20, 0x22),
            ("d1", 1 << 20, 2 << 20, 0x31),
            ("d1", 9 << 20, 2 << 20, 0x32),
        ],
    );
    let tag = json(
        "process-server",
        &["tag", "--group", "g1", "--json"],
        &ps_a_cfg,
    );
    let p = tag["id"].as_u64().expect("point id");
    let at_p: Vec<Vec<u8>> = disks_a.iter().map(|(_, f)| read(dir, f)).collect();

    // 2. After P, acknowledged by B: one block rewritten with P's own bytes (in the
    // lists, equal), and a 4 KiB write inside a block.
    let acked: [Write; 3] = [
        ("d0", 0, BLOCK, 0x41),
        ("d0", (5 << 20) + BLOCK, BLOCK, 0x22),
        ("d1", (2 << 20) + 3 * BLOCK + 4096, 4096, 0x43),
    ];
    write_all(&ps_a, &acked);
    ps_a.wait_acked_after(now_unix_ms());
    // 3. B's master target dies; A writes on: dirty at A, never acknowledged.
    kill(mt_b);
    let unacked: [Write; 3] = [
        ("d0", 8 << 20, BLOCK, 0x51),
        ("d1", 12 << 20, 2 * BLOCK, 0x52),
        ("d0", (5 << 20) + 4 * BLOCK, BLOCK, 0x22),
    ];
    write_all(&ps_a, &unacked);
    let out = run(
        "process-server",
        &["changed", "--disk", "d0", "--out", "x.chg"],
        &ps_a_cfg,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("in use") && err.contains("serve"),
        "changed while the server runs: {err}"
    );
    ps_a.stop();

    // 4. B fails back to P and commits, offline: the commit writes B's lists.
    let c = failback_and_commit(&mt_b_cfg, p);
    for (i, (_, f)) in disks_b.iter().enumerate() {
        assert!(read(dir, f) == at_p[i], "{f} is not the disk at point {p}");
    }
    let b_lists: Vec<(String, u64)> = c["change_lists"]
        .as_array()
        .expect("change_lists")
        .iter()
        .map(|l| {
            (
                l["path"].as_str().unwrap().to_string(),
                l["blocks"].as_u64().unwrap(),
            )
        })
        .collect();
    // In 4 KiB blocks: d0 two 64 KiB blocks, d1 one 4 KiB write.
    assert_eq!(
        b_lists.iter().map(|l| l.1).collect::<Vec<_>>(),
        [32, 1],
        "{c}"
    );

    // 5. A's lists: the blocks its process server never had acknowledged.
    std::fs::create_dir(dir.join("a-lists")).unwrap();
    let mut a_lists = Vec::new();
    for (d, blocks) in [("d0", 32), ("d1", 32)] {
        let out = dir.join("a-lists").join(format!("{d}.chg"));
        let w = changed_json(d, &out, &ps_a_cfg);
        assert_eq!(w["blocks"], blocks, "{w}");
        assert_eq!(w["origin"], "unacknowledged-writes", "{w}");
        assert_eq!(
            (w["initial_sync"].as_bool(), w["unclean"].as_bool()),
            (Some(false), Some(false))
        );
        assert!(w["point_id"].as_u64().is_some_and(|q| q > p), "{w}");
        a_lists.push(out);
    }

    // 6. A process server on B's files starts from both lists (its master target not
    // reachable yet, so the pass waits), and B writes.
    let with_lists = |target| {
        let disks: Vec<(&str, &str, Vec<PathBuf>)> = disks_b
            .iter()
            .enumerate()
            .map(|(i, (id, f))| {
                (
                    *id,
                    *f,
                    vec![PathBuf::from(&b_lists[i].0), a_lists[i].clone()],
                )
            })
            .collect();
        ps_config_with_lists(dir, "ps-b.toml", "ps-b-state", Some(target), &disks)
    };
    let ps_b_cfg = with_lists(dead_address());
    let ps_b = ProcessServer::start(&ps_b_cfg, TIMEOUT);
    assert!(
        ps_b.log().contains("initial sync from change lists"),
        "log:\n{}",
        ps_b.log()
    );
    let on_b: [Write; 2] = [("d0", 10 << 20, BLOCK, 0x61), ("d1", 14 << 20, BLOCK, 0x62)];
    write_all(&ps_b, &on_b);
    let st = json("process-server", &["status", "--json"], &ps_b_cfg);
    let dirty: Vec<u64> = st["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["dirty_blocks"].as_u64().unwrap())
        .collect();
    assert_eq!(dirty, [32 + 32 + 16, 1 + 32 + 16], "{st}");
    assert_eq!(st["groups"][0]["state"], "initial-sync", "{st}");
    ps_b.stop();

    // What the pass must compare and send.
    let union: BTreeSet<(usize, u64)> = blocks_of(&disks_a, &acked)
        .into_iter()
        .chain(blocks_of(&disks_a, &unacked))
        .chain(blocks_of(&disks_a, &on_b))
        .collect();
    let differ = differing(dir, &disks_a, &disks_b);
    assert!(
        differ.is_subset(&union),
        "a block differs that no list names: {:?}",
        differ.difference(&union).collect::<Vec<_>>()
    );
    assert_eq!((union.len(), differ.len()), (9, 7));

    // 7. Reprotect: a master target on A's files, the process server on B's again.
    let mt_a_cfg = mt_config(dir, "mt-a.toml", "mt-a-data", "1s", &disks_a);
    let mt_a_log = dir.join("mt-a.log");
    let (mt_a, mt_a_addr) =
        common::start_master_target(&mt_a_cfg, &mt_a_log, "info,master_target::server=debug");
    let ps_b_cfg = with_lists(mt_a_addr);
    let started = Instant::now();
    let ps_b = ProcessServer::start(&ps_b_cfg, TIMEOUT);
    let st = wait_replicating(&ps_b, &ps_b_cfg);
    let seconds = started.elapsed().as_secs_f64();
    let (mut compared, mut sent) = (0, 0);
    for d in st["disks"].as_array().unwrap() {
        compared += d["resync_compared_blocks"].as_u64().unwrap();
        sent += d["resync_sent_blocks"].as_u64().unwrap();
    }
    let hashed = hashed_blocks(&std::fs::read_to_string(&mt_a_log).unwrap());
    let whole = 2 * (DISK_MIB << 20) / BLOCK;
    eprintln!(
        "reprotect from change lists: {compared} of {whole} blocks compared, {sent} sent, \
         {hashed} hashed by the master target; start to replicating in {seconds:.2} s"
    );
    let log = ps_b.log();
    assert_eq!(
        compared,
        union.len() as u64,
        "blocks of the union; log:\n{log}"
    );
    assert_eq!(sent, differ.len() as u64, "blocks that differ; log:\n{log}");
    assert_eq!(
        hashed,
        union.len() as u64,
        "the master target hashed only the union"
    );

    // 8. A's files follow B's, byte for byte (the short retention folds the journal).
    ps_b.wait_acked_after(now_unix_ms());
    let mt_log = || std::fs::read_to_string(&mt_a_log).unwrap_or_default();
    wait_until("A's files equal B's", mt_log, || {
        differing(dir, &disks_a, &disks_b).is_empty()
    });
    for d in ["d0", "d1"] {
        let v = json(
            "process-server",
            &["verify", "--disk", d, "--json"],
            &ps_b_cfg,
        );
        assert_eq!(v["differing_blocks"], 0, "{v}");
    }
    ps_b.stop();
    kill(mt_a);
}

/// `process-server serve` with `cfg`, which must fail to start; its stderr.
fn serve_fails(cfg: &Path) -> String {
    let mut child = Command::new(common::bin_path("process-server"))
        .args(["serve", "--config"])
        .arg(cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(!st.success(), "serve with {} started", cfg.display());
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            return err;
        }
        if Instant::now() > deadline {
            kill(child);
            panic!("serve with {} did not fail", cfg.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Proves `process-server changed` lists exactly a disk's unacknowledged writes (the
/// whole disk while its initial sync is pending), and refuses an unknown disk and one
/// this process server never protected; that `serve` refuses a change list made for
/// another disk, for another size, or damaged, naming it, and creates no tracking
/// state for the group; and that a start from lists towards a master target that has
/// no copy of the disk (a blank replica) sends every block, not only the listed ones.
#[test]
fn change_lists_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let plain = |name: &str, state: &str, file: &str| {
        ps_config_with_lists(dir, name, state, None, &[("d0", file, Vec::new())])
    };
    // A disk in its initial sync (nothing ships: no target) is listed whole.
    let cfg = plain("ps-1.toml", "s1", "x1.img");
    let ps = ProcessServer::start(&cfg, TIMEOUT);
    ps.qemu_io("d0", "write -P 0x11 0 64k");
    ps.stop();
    let out = dir.join("l1.chg");
    let w = changed_json("d0", &out, &cfg);
    assert_eq!(
        (w["initial_sync"].as_bool(), w["blocks"].as_u64()),
        (Some(true), Some(4096)),
        "{w}"
    );
    // Without an initial sync: exactly the blocks written (64 KiB and one 4 KiB block).
    let cfg = plain("ps-2.toml", "s2", "x2.img");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "cut_interval_ms = 100\n",
        "cut_interval_ms = 100\ninitial_sync = false\n",
    );
    std::fs::write(&cfg, text).unwrap();
    let ps = ProcessServer::start(&cfg, TIMEOUT);
    ps.qemu_io("d0", &format!("write -P 0x12 {} 64k", 1 << 20));
    ps.qemu_io("d0", &format!("write -P 0x13 {} 512", (3 << 20) + 512));
    ps.stop();
    let list = dir.join("l2.chg");
    let w = changed_json("d0", &list, &cfg);
    assert_eq!(
        (w["blocks"].as_u64(), w["extents"].as_u64()),
        (Some(17), Some(2)),
        "{w}"
    );
    assert!(w["point_id"].is_null(), "{w}");
    let text = run(
        "process-server",
        &["changed", "--disk", "d0", "--out", list.to_str().unwrap()],
        &cfg,
    );
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("17 of 4096 blocks"),
        "{text:?}"
    );
    let e = run(
        "process-server",
        &["changed", "--disk", "nope", "--out", "x.chg"],
        &cfg,
    );
    assert!(
        String::from_utf8_lossy(&e.stderr).contains("unknown disk"),
        "{e:?}"
    );
    let fresh = plain("ps-3.toml", "s3", "x2.img");
    let e = run(
        "process-server",
        &["changed", "--disk", "d0", "--out", "x.chg"],
        &fresh,
    );
    assert!(
        String::from_utf8_lossy(&e.stderr).contains("never protected"),
        "{e:?}"
    );

    // A list for another disk, for another size, damaged: refused, nothing created.
    let bad = dir.join("bad.chg");
    let mut bytes = std::fs::read(&list).unwrap();
    bytes[20] ^= 1;
    std::fs::write(&bad, bytes).unwrap();
    let cases = [
        ("d1", format!("{DISK_MIB}MiB"), list.clone(), "not \"d1\""),
        ("d0", "8MiB".to_string(), list.clone(), "16777216"),
        ("d0", format!("{DISK_MIB}MiB"), bad, "crc32"),
    ];
    for (k, (id, size, path, says)) in cases.into_iter().enumerate() {
        let cfg = ps_config_with_lists(
            dir,
            "ps-bad.toml",
            &format!("sb{k}"),
            None,
            &[(id, "y.img", vec![path])],
        );
        let text = std::fs::read_to_string(&cfg).unwrap().replace(
            &format!("size = \"{DISK_MIB}MiB\""),
            &format!("size = \"{size}\""),
        );
        std::fs::write(&cfg, text).unwrap();
        let _ = std::fs::remove_file(dir.join("y.img"));
        let err = serve_fails(&cfg);
        assert!(
            err.contains("change list refused") && err.contains(says),
            "{says}: {err}"
        );
        assert!(
            !dir.join(format!("sb{k}/g1")).exists(),
            "{says}: tracking state was created"
        );
    }

    // Lists that assume a copy, and a master target without one: every block goes.
    // The disk holds data only outside the listed blocks.
    std::fs::copy(dir.join("x1.img"), dir.join("n.img")).unwrap();
    let mt_cfg = mt_config(
        dir,
        "mt-n.toml",
        "mt-n-data",
        "1s",
        &[("d0", "n-replica.img")],
    );
    let (mt, addr) = common::start_master_target(&mt_cfg, &dir.join("mt-n.log"), "info");
    let cfg = ps_config_with_lists(
        dir,
        "ps-n.toml",
        "sn",
        Some(addr),
        &[("d0", "n.img", vec![list])],
    );
    let ps = ProcessServer::start(&cfg, TIMEOUT);
    wait_replicating(&ps, &cfg);
    ps.wait_acked_after(now_unix_ms());
    let mt_log = || std::fs::read_to_string(dir.join("mt-n.log")).unwrap_or_default();
    wait_until("the blank replica holds the whole disk", mt_log, || {
        read(dir, "n-replica.img") == read(dir, "n.img")
    });
    assert!(ps.log().contains("assume a copy"), "log:\n{}", ps.log());
    ps.stop();
    kill(mt);
}
