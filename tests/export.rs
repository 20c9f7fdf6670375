//! End-to-end tests of test failover: `master-target export` serves a group's disks as
//! they were at a recovery point over NBD, read with `qemu-img convert` and compared
//! byte for byte with the disks at that point; writes through the export go to a
//! throwaway overlay and never reach the replicas.
//!
//! Needs qemu-utils (qemu-io, qemu-img).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{ProcessServer, now_unix_ms};

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
    let mut cmd = Command::new(common::bin_path("master-target"));
    cmd.args(["export", "--group", "g1", "--listen", "127.0.0.1:0"])
        .args(["--point", point, "--config"])
        .arg(config);
    cmd
}

/// Starts `master-target export` and returns it with the address it serves.
fn start_export(config: &Path, point: &str) -> (Child, String) {
    use std::io::{BufRead, BufReader};
    let mut child = export_cmd(config, point)
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
    for (spec, why) in [("nope", "not a point id"), ("999999", "no point 999999")] {
        let out = export_cmd(&d.join("mt.toml"), spec).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(why), "{spec}: {err}");
    }
}
