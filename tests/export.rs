//! End-to-end tests of test failover: `master-target export` serves a group's disks as
//! they were at a recovery point over NBD, read with `qemu-img convert` and compared
//! byte for byte with the disks at that point; writes through the export go to a
//! throwaway overlay and never reach the replicas. Served by the running server while
//! replication and retention go on, or in-process when no server runs.
//!
//! Needs qemu-utils (qemu-io, qemu-img).

mod common;
// Only some of the wire helpers serve here.
#[allow(dead_code)]
#[path = "common/wire.rs"]
mod wire;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ProcessServer, now_unix_ms};
use datapath::extent::ExtentData;
use datapath::frame::{self, Decoder, Frame, PointKind, PointRecord};
use datapath::journal::{Journal, JournalConfig};
use datapath::storage::RealFs;
use serde_json::Value;

const DISKS: [&str; 2] = ["disk0", "disk1"];
const TIMEOUT: Duration = Duration::from_secs(20);

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn disks(dir: &Path) -> Vec<Vec<u8>> {
    DISKS
        .iter()
        .map(|d| read(&dir.join(format!("{d}.img"))))
        .collect()
}

fn replicas(dir: &Path) -> Vec<Vec<u8>> {
    DISKS
        .iter()
        .map(|d| read(&dir.join(format!("mt-data/replica-{d}.img"))))
        .collect()
}

/// `master-target export` of group g1 at `point` on any free loopback port.
fn export_cmd(config: &Path, point: &str) -> Command {
    export_cmd_at(config, "g1", point, "127.0.0.1:0")
}

/// `master-target export` of `group` at `point` on `listen`.
fn export_cmd_at(config: &Path, group: &str, point: &str, listen: &str) -> Command {
    let mut cmd = Command::new(common::bin_path("master-target"));
    cmd.args(["export", "--group", group, "--listen", listen])
        .args(["--point", point, "--config"])
        .arg(config);
    cmd
}

/// Starts `master-target export` and returns it with the address it serves.
fn start_export(config: &Path, point: &str) -> (Child, String) {
    start_export_cmd(export_cmd(config, point))
}

/// Starts an export command and returns it with the address it serves.
fn start_export_cmd(mut cmd: Command) -> (Child, String) {
    use std::io::{BufRead, BufReader};
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start master-target export");
    let out = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .expect("read stdout");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("export did not start: {line:?}"))
        .to_string();
    (child, addr)
}

fn stop(mut child: Child) {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    let st = child.wait().expect("wait");
    assert!(st.success(), "export exit {st:?}");
}

/// The whole export of `disk` read with qemu-img convert.
fn fetch(addr: &str, disk: &str, into: &Path) -> Vec<u8> {
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(format!("nbd://{addr}/{disk}"))
        .arg(into)
        .output()
        .expect("run qemu-img");
    assert!(out.status.success(), "{out:?}");
    read(into)
}

fn qemu_io(addr: &str, disk: &str, cmd: &str) -> String {
    common::qemu_io(&format!("nbd://{addr}/{disk}"), cmd)
}

/// Proves an export serves exactly the disks as they were at the chosen point (an older
/// one and the latest), that a write through it reads back while the replicas stay
/// untouched, and that its overlay is gone when it ends.
#[test]
fn export_serves_exactly_the_point() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut mt_cfg = "listen = \"127.0.0.1:0\"\ndata_dir = \"mt-data\"\nplain_tcp_loopback = true\n[[group]]\nid = \"g1\"\n".to_string();
    let mut ps_cfg = String::new();
    for disk in DISKS {
        mt_cfg.push_str(&format!(
            "[[group.disk]]\nid = \"{disk}\"\nsize = \"16MiB\"\nreplica = \"mt-data/replica-{disk}.img\"\n"
        ));
        ps_cfg.push_str(&format!(
            "[[group.disk]]\nid = \"{disk}\"\npath = \"{disk}.img\"\nsize = \"16MiB\"\n"
        ));
    }
    std::fs::write(d.join("mt.toml"), &mt_cfg).unwrap();
    let (mut mt, addr) = common::start_master_target(&d.join("mt.toml"), &d.join("mt.log"), "info");
    std::fs::write(
        d.join("ps.toml"),
        format!(
            "[nbd]\nlisten = \"127.0.0.1:0\"\n[tracking]\ncut_interval_ms = 100\n[target]\naddress = \"{addr}\"\nnode = \"ps1\"\nplain_tcp = true\n[[group]]\nid = \"g1\"\n{ps_cfg}"
        ),
    )
    .unwrap();
    let ps = ProcessServer::start(&d.join("ps.toml"), TIMEOUT);
    ps.qemu_io("disk0", "write -P 0x11 0 1M");
    ps.qemu_io("disk1", "write -P 0x22 4096 3M");
    ps.wait_acked_after(now_unix_ms());
    let at_first = disks(d);
    let second_start = now_unix_ms();
    ps.qemu_io("disk0", "write -P 0x33 512k 2M");
    ps.qemu_io("disk1", "write -z 1M 64k");
    ps.wait_acked_after(now_unix_ms());
    let at_last = disks(d);
    ps.stop();
    mt.kill().unwrap();
    mt.wait().unwrap();

    // The newest point cut before the second round began holds the first state.
    let out = Command::new(common::bin_path("master-target"))
        .args(["points", "--group", "g1", "--json", "--config"])
        .arg(d.join("mt.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let points: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let first = points
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["consistent"] == true && p["time_unix_ms"].as_u64().unwrap() < second_start)
        .map(|p| p["id"].as_u64().unwrap())
        .max()
        .expect("a point before the second round");
    let replicas_before = replicas(d);

    for (spec, want) in [
        (first.to_string(), &at_first),
        ("latest".to_string(), &at_last),
    ] {
        let (exp, addr) = start_export(&d.join("mt.toml"), &spec);
        for (i, disk) in DISKS.iter().enumerate() {
            let got = fetch(&addr, disk, &d.join(format!("got-{disk}.img")));
            assert!(got == want[i], "point {spec}: {disk} differs");
        }
        // A write through the export reads back; the rest is still the point.
        qemu_io(&addr, "disk0", "write -P 0x77 0 64k");
        qemu_io(&addr, "disk0", "read -P 0x77 0 64k");
        let got = fetch(&addr, "disk0", &d.join("after-write.img"));
        assert!(got[..65536].iter().all(|&b| b == 0x77));
        assert!(got[65536..] == want[0][65536..]);
        stop(exp);
        assert!(
            replicas(d) == replicas_before,
            "the export touched a replica"
        );
        let leftovers: Vec<_> = std::fs::read_dir(d.join("mt-data/g1"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("export-"))
            .collect();
        assert!(leftovers.is_empty(), "the overlay was not removed");
    }

    // Bad specs are refused with a reason.
    for (spec, why) in [
        (
            "nope",
            "is not latest, latest-processed, latest-app, a point id",
        ),
        ("999999", "no point 999999"),
    ] {
        let out = export_cmd(&d.join("mt.toml"), spec).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(why), "{spec}: {err}");
    }
}

/// `master-target <args> --config CONFIG` run to completion: (success, stdout, stderr).
fn mt(config: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(common::bin_path("master-target"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run master-target");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `master-target <args> --json --config CONFIG`, which must succeed, parsed.
fn mt_json(config: &Path, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let (ok, out, err) = mt(config, &a);
    assert!(ok, "master-target {args:?}: {err}");
    serde_json::from_str(&out).expect("JSON output")
}

/// The ids of group g1's points.
fn point_ids(config: &Path) -> Vec<u64> {
    mt_json(config, &["points", "--group", "g1"])
        .as_array()
        .expect("points")
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// The running exports of `group` in `status --json`: (point id, listen address).
fn exports_of(config: &Path, group: &str) -> Vec<(u64, String)> {
    let st = mt_json(config, &["status"]);
    let g = st["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .find(|g| g["id"] == group)
        .expect("the group in status")
        .clone();
    g["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .map(|e| {
            (
                e["point_id"].as_u64().unwrap(),
                e["listen"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The overlay directories left in `group_dir`.
fn overlays(group_dir: &Path) -> Vec<String> {
    std::fs::read_dir(group_dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("export-"))
                .collect()
        })
        .unwrap_or_default()
}

/// A server's log without its colour escapes.
fn plain_log(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
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

/// Waits until `cond` holds (up to [`TIMEOUT`]), failing with `what`.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Replays what is left of g1's journal over the replicas (the disks at the base) and
/// returns the disks at the journal's newest point.
fn replay_journal(d: &Path) -> Vec<Vec<u8>> {
    let (j, _) = Journal::open(
        Arc::new(RealFs),
        &d.join("mt-data/g1/journal"),
        "g1",
        JournalConfig {
            segment_bytes_max: 1 << 20,
            ..JournalConfig::default()
        },
    )
    .expect("open journal");
    let mut imgs = replicas(d);
    let mut dec = Decoder::new();
    let mut at_last_point = imgs.clone();
    for r in j
        .read(j.base_seq() + 1, j.write_seq())
        .expect("read journal")
    {
        let (_, bytes) = r.expect("journal frame");
        match frame::decode(&bytes, &mut dec).expect("decode a journaled frame") {
            Frame::Data(f) => {
                let disk = DISKS.iter().position(|x| *x == f.meta.disk).unwrap();
                for (offset, data) in f.extents() {
                    let at = offset as usize;
                    match data {
                        ExtentData::Bytes(b) => imgs[disk][at..at + b.len()].copy_from_slice(b),
                        ExtentData::Zero(n) => imgs[disk][at..at + n as usize].fill(0),
                    }
                }
            }
            Frame::Point(..) => at_last_point = imgs.clone(),
            other => panic!("unexpected frame in the journal: {other:?}"),
        }
    }
    at_last_point
}

/// `len` bytes of xorshift noise (incompressible: the journal grows by about that).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Proves an export serves exactly the point while replication goes on: started
/// through the running server with both servers replicating, it reads back as the disks
/// at its point (qemu-img) while new writes are captured, shipped and acknowledged as
/// newer points, and while a 1 s retention window folds the history before the point
/// into the replicas under it; a second export of a newer point runs beside it; a write
/// through it reads back; a failback meanwhile is refused and changes nothing; the
/// point stays listed as long as it is exported and is folded once the export ended;
/// the overlays are gone, and the replicas plus the journal are exactly the disks (the
/// journal grew only by replication).
#[test]
fn export_while_replicating() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = d.join("mt.toml");
    let mut mt_cfg = "listen = \"127.0.0.1:0\"\ndata_dir = \"mt-data\"\nplain_tcp_loopback = true\n[[group]]\nid = \"g1\"\nretention = \"1s\"\nretention_check_interval_ms = 200\njournal_segment_bytes = \"1MiB\"\n".to_string();
    let mut ps_cfg = String::new();
    for disk in DISKS {
        mt_cfg.push_str(&format!(
            "[[group.disk]]\nid = \"{disk}\"\nsize = \"16MiB\"\nreplica = \"mt-data/replica-{disk}.img\"\n"
        ));
        ps_cfg.push_str(&format!(
            "[[group.disk]]\nid = \"{disk}\"\npath = \"{disk}.img\"\nsize = \"16MiB\"\n"
        ));
    }
    std::fs::write(&config, &mt_cfg).unwrap();
    let mt_log = d.join("mt.log");
    let (mut mts, addr) = common::start_master_target(&config, &mt_log, "info");
    std::fs::write(
        d.join("ps.toml"),
        format!(
            "[nbd]\nlisten = \"127.0.0.1:0\"\n[tracking]\ncut_interval_ms = 100\n[target]\naddress = \"{addr}\"\nnode = \"ps1\"\nplain_tcp = true\n[[group]]\nid = \"g1\"\n{ps_cfg}"
        ),
    )
    .unwrap();
    let ps = ProcessServer::start(&d.join("ps.toml"), TIMEOUT);
    // Round 1: patterns and 3 MiB of noise (several 1 MiB journal segments, which the
    // fold removes under the export).
    let noise_file = d.join("noise.bin");
    std::fs::write(&noise_file, noise(1, 3 << 20)).unwrap();
    let noise_path = noise_file.display().to_string();
    ps.qemu_io("disk0", "write -P 0x11 0 1M");
    ps.qemu_io("disk1", &format!("write -s {noise_path} 4096 3M"));
    ps.qemu_io("disk0", "write -P 0x12 8M 64k");
    ps.wait_acked_after(now_unix_ms());
    let at_p = disks(d);
    // A few empty epochs, so that the point exported below comes after the epochs that
    // hold round 1: the fold may take those (and their segments) under the export.
    std::thread::sleep(Duration::from_millis(500));

    // The export of the newest point, which holds exactly `at_p` (nothing was written
    // since), through the running server.
    let (exp1, addr1) = start_export(&config, "latest");
    let ex = exports_of(&config, "g1");
    assert_eq!(ex.len(), 1, "{ex:?}");
    assert_eq!(ex[0].1, addr1);
    let p = ex[0].0;
    assert!(point_ids(&config).contains(&p));
    let log = plain_log(&mt_log);
    let ready_ms: u64 = log
        .lines()
        .find(|l| l.contains("export ready"))
        .and_then(|l| l.split("ready_ms=").nth(1))
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no ready_ms in the log:\n{log}"));
    // A figure, not a test of speed (those live in the benchmark).
    eprintln!("export of point {p} ready in {ready_ms} ms");

    // Replication goes on: round 2 is captured, shipped and acknowledged as newer points
    // while the export lives; time passes beyond the window and several check intervals.
    let round2_start = now_unix_ms();
    ps.qemu_io("disk0", "write -P 0x33 512k 2M");
    ps.qemu_io("disk1", "write -z 1M 64k");
    std::fs::write(&noise_file, noise(2, 2 << 20)).unwrap();
    ps.qemu_io("disk1", &format!("write -s {noise_path} 5M 2M"));
    ps.wait_acked_after(now_unix_ms());
    let at_p2 = disks(d);
    let ids = point_ids(&config);
    assert!(
        ids.iter().any(|&i| i > p) && ids.contains(&p),
        "newer points while point {p} is exported: {ids:?}"
    );
    let st = mt_json(&config, &["status"]);
    assert_eq!(st["groups"][0]["state"], "replicating", "{st}");
    assert!(
        st["groups"][0]["newest_point"]["time_unix_ms"]
            .as_u64()
            .unwrap()
            > round2_start,
        "{st}"
    );
    // Retention folds what is older than the window up to the pinned point (polled:
    // the folds run on their own clock, slower on a loaded machine).
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let st = mt_json(&config, &["status"]);
        if st["groups"][0]["folded_bytes"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing folded before point {p}: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        point_ids(&config).contains(&p),
        "point {p} folded while exported"
    );

    // A second export, of a newer point, beside the first.
    let (exp2, addr2) = start_export(&config, "latest");
    let ex = exports_of(&config, "g1");
    assert_eq!(ex.len(), 2, "{ex:?}");
    let p2 = ex
        .iter()
        .find(|e| e.1 == addr2)
        .expect("export 2 in status")
        .0;
    assert!(p2 > p, "{ex:?}");
    for (i, disk) in DISKS.iter().enumerate() {
        let got = fetch(&addr1, disk, &d.join(format!("p-{disk}.img")));
        assert!(got == at_p[i], "point {p}: {disk} differs");
        let got = fetch(&addr2, disk, &d.join(format!("p2-{disk}.img")));
        assert!(got == at_p2[i], "point {p2}: {disk} differs");
    }

    // A write through the export reads back; the rest is still the point.
    qemu_io(&addr1, "disk0", "write -P 0x77 0 64k");
    qemu_io(&addr1, "disk0", "read -P 0x77 0 64k");
    let got = fetch(&addr1, "disk0", &d.join("after-write.img"));
    assert!(got[..65536].iter().all(|&b| b == 0x77));
    assert!(got[65536..] == at_p[0][65536..]);

    // A failback while the exports run is refused, naming them, and changes nothing.
    let (ok, _, err) = mt(
        &config,
        &["failback", "--group", "g1", "--point", &p.to_string()],
    );
    assert!(!ok, "a failback ran under an export");
    assert!(
        err.contains("export") && err.contains(&format!("point {p} on {addr1}")),
        "{err}"
    );
    let st = mt_json(&config, &["status"]);
    let g = &st["groups"][0];
    assert_eq!(g["state"], "replicating", "{st}");
    assert_eq!(g["failback"], Value::Null, "{st}");
    assert!(!d.join("mt-data/g1/failback/failback.state").exists());

    // Replication and retention go on; the first export still reads exactly its point.
    ps.qemu_io("disk0", "write -P 0x44 10M 1M");
    let last_write = now_unix_ms();
    ps.wait_acked_after(last_write);
    let final_disks = disks(d);
    stop(exp2);
    assert_eq!(exports_of(&config, "g1").len(), 1);
    // The folds under the export remove journal segments it had indexed: those ranges
    // come from the replicas then (polled, as above).
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let log = plain_log(&mt_log);
        let removed: u64 = log
            .lines()
            .skip_while(|l| !l.contains("export ready"))
            .filter(|l| l.contains("retention fold"))
            .filter_map(|l| l.split("segments_removed=").nth(1))
            .filter_map(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .filter_map(|n| n.parse::<u64>().ok())
            .sum();
        if removed > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no segment removed under the export:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        point_ids(&config).contains(&p),
        "point {p} folded while exported"
    );
    let got = fetch(&addr1, "disk1", &d.join("p-again.img"));
    assert!(got == at_p[1], "point {p}: disk1 differs after the folds");
    let got = fetch(&addr1, "disk0", &d.join("p-again.img"));
    assert!(
        got[..65536].iter().all(|&b| b == 0x77),
        "the overlay's write is lost"
    );
    assert!(
        got[65536..] == at_p[0][65536..],
        "point {p}: disk0 differs after the folds"
    );

    // The end: overlays gone, no export listed, and the point is folded soon.
    stop(exp1);
    assert!(exports_of(&config, "g1").is_empty());
    let left = overlays(&d.join("mt-data/g1"));
    assert!(left.is_empty(), "overlays left: {left:?}");
    wait_until(&format!("point {p} folded after its export ended"), || {
        !point_ids(&config).contains(&p)
    });
    let log = plain_log(&mt_log);
    assert!(log.contains("export ended"), "{log}");

    // The replicas plus the journal are exactly the disks: nothing written through the
    // exports reached them.
    ps.stop();
    mts.kill().unwrap();
    mts.wait().unwrap();
    let replayed = replay_journal(d);
    assert!(
        replayed == final_disks,
        "replicas + journal differ from the disks"
    );
}

/// The disks of the wire tests' group after `epochs` epochs of [`wire::epochs`] (each
/// epoch: a data frame per disk, an 8 KiB pattern and a 4 KiB zero run at
/// `epoch * 16 KiB`; the first data frame's seq is `first_seq`).
fn wire_disks(epochs: u64, first_seq: u64) -> Vec<Vec<u8>> {
    let mut imgs = vec![vec![0u8; wire::DISK_BYTES as usize]; 2];
    let mut seq = first_seq;
    for epoch in 1..=epochs {
        for img in imgs.iter_mut() {
            let at = (epoch * 16384) as usize;
            img[at..at + 8192].copy_from_slice(&wire::pattern(seq, 8192));
            img[at + 8192..at + 12288].fill(0);
            seq += 1;
        }
        seq += 1;
    }
    imgs
}

/// Proves the refusals around live exports: an unknown group, a bad spec, an unknown
/// or inconsistent point, an address in use are refused with the thing named; a
/// failback while an export runs is refused and changes nothing (it runs once the
/// export ended); a failed-back group is not exported; and a server that stops ends its
/// exports cleanly (the command says why, the overlay is gone).
#[test]
fn export_refusals_and_exclusions() {
    let setup = wire::Setup::new();
    let config = setup.config.clone();
    let log = setup.dir.path().join("serve.log");
    let (mut server, addr) = common::start_master_target(&config, &log, "info");
    let mut c = wire::Client::connect(addr);
    c.hello_ok(&["g1", "g2"]);
    // g1: points 1..=3 consistent, then point 4 inconsistent (seq 10..=12).
    for f in wire::epochs("g1", 1, 3, 1) {
        c.send(&f);
    }
    c.send(&wire::data_frame("g1", "disk0", 4, 10, 4 * 16384));
    c.send(&wire::data_frame("g1", "disk1", 4, 11, 4 * 16384));
    let mut inconsistent = Vec::new();
    frame::encode_point(
        &PointRecord {
            point_id: 4,
            epoch: 4,
            time_unix_ms: 1_700_000_004_000,
            kind: PointKind::Crash,
            consistent: false,
            group: "g1".into(),
        },
        12,
        &mut inconsistent,
    );
    c.send(&inconsistent);
    c.wait_ack("g1", 12);
    for f in wire::epochs("g2", 1, 2, 1) {
        c.send(&f);
    }
    c.wait_ack("g2", 6);

    let refused = |group: &str, point: &str, listen: &str, why: &[&str]| {
        let out = export_cmd_at(&config, group, point, listen)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{group} {point}: not refused");
        for w in why {
            assert!(
                err.contains(w),
                "{group} {point} {listen}: no {w:?} in {err}"
            );
        }
    };
    refused(
        "nope",
        "latest",
        "127.0.0.1:0",
        &["\"nope\"", "not in config file"],
    );
    refused("g1", "yesterday", "127.0.0.1:0", &["--point \"yesterday\""]);
    refused("g1", "99", "127.0.0.1:0", &["\"g1\"", "no point 99"]);
    refused(
        "g1",
        "4",
        "127.0.0.1:0",
        &["\"g1\"", "point 4 is inconsistent"],
    );
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    refused(
        "g1",
        "2",
        &busy_addr,
        &["\"g1\"", "point 2", &format!("listen on {busy_addr}")],
    );
    drop(busy);
    assert!(
        exports_of(&config, "g1").is_empty(),
        "a refused export is listed"
    );
    assert!(overlays(&setup.dir.path().join("data/g1")).is_empty());

    // An export of point 2 (latest skips the inconsistent point 4: point 3) reads back
    // the disks at that point while replication of g1 goes on.
    let (exp, exp_addr) = start_export_cmd(export_cmd_at(&config, "g1", "2", "127.0.0.1:0"));
    let want = wire_disks(2, 1);
    for (i, disk) in DISKS.iter().enumerate() {
        let got = fetch(
            &exp_addr,
            disk,
            &setup.dir.path().join(format!("g1-{disk}.img")),
        );
        assert!(got == want[i], "point 2: {disk} differs");
    }
    for f in wire::epochs("g1", 5, 1, 13) {
        c.send(&f);
    }
    c.wait_ack("g1", 15);
    let before = point_ids(&config);
    let (ok, _, err) = mt(&config, &["failback", "--group", "g1", "--point", "3"]);
    assert!(!ok, "a failback ran under an export");
    assert!(
        err.contains("\"g1\"")
            && err.contains(&format!("export of it runs (point 2 on {exp_addr})")),
        "{err}"
    );
    assert_eq!(
        point_ids(&config),
        before,
        "the refused failback changed the points"
    );
    let st = mt_json(&config, &["status"]);
    assert_eq!(st["groups"][0]["failback"], Value::Null, "{st}");
    assert!(
        !setup
            .dir
            .path()
            .join("data/g1/failback/failback.state")
            .exists()
    );
    stop(exp);
    assert!(overlays(&setup.dir.path().join("data/g1")).is_empty());

    // Once the export ended, the failback runs; a failed-back group is not exported.
    let (ok, _, err) = mt(&config, &["failback", "--group", "g1", "--point", "3"]);
    assert!(ok, "failback after the export: {err}");
    refused(
        "g1",
        "3",
        "127.0.0.1:0",
        &["\"g1\"", "failed back to point 3"],
    );

    // A server that stops ends its exports: the command says why and fails, the overlay
    // is gone, the server exits cleanly.
    let (exp, _) = start_export_cmd(export_cmd_at(&config, "g2", "latest", "127.0.0.1:0"));
    assert_eq!(exports_of(&config, "g2").len(), 1);
    let st = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let server_exit = server.wait().unwrap();
    assert!(server_exit.success(), "server exit {server_exit:?}");
    let out = exp.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "the export command did not notice the end"
    );
    assert!(overlays(&setup.dir.path().join("data/g2")).is_empty());
    let text = plain_log(&log);
    assert!(
        text.contains("export ended (the master target stops)"),
        "{text}"
    );
}
