//! End-to-end tests of live status and metrics: the real `process-server serve` ships
//! writes made with qemu-io over NBD to the real `master-target serve`; both `status
//! --json` commands and both `GET /metrics` endpoints are read while they run, and
//! garbage sent to the endpoints and to the master target's control socket is refused
//! without stopping either server.
//!
//! Needs qemu-utils (qemu-io).

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// Time a server has to start, and the shipper to acknowledge the written data.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes written to disk0 and to disk1.
const DISK0_BYTES: u64 = 1 << 20;
const DISK1_BYTES: u64 = 512 << 10;

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Incompressible bytes (xorshift), so that bytes on the wire and in the journal are at
/// least the bytes written.
fn random_bytes(n: usize, mut x: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Both servers, started from configs in `dir`, each with a metrics endpoint on a free
/// port; killed on drop.
struct Pair {
    dir: PathBuf,
    mt: Option<Child>,
    ps: Option<Child>,
    nbd_port: u16,
    ps_log: Arc<Mutex<String>>,
}

impl Pair {
    fn start(dir: &Path) -> Self {
        let mt_config = dir.join("mt.toml");
        let mut text = "metrics = \"127.0.0.1:0\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"mt-data\"\nplain_tcp_loopback = true\n[[group]]\nid = \"g1\"\n".to_string();
        for d in ["disk0", "disk1"] {
            text.push_str(&format!(
                "[[group.disk]]\nid = \"{d}\"\nsize = \"16MiB\"\nreplica = \"replicas/{d}.img\"\n"
            ));
        }
        std::fs::write(&mt_config, text).expect("write master-target config");
        let (mt, mt_addr) = common::start_master_target(&mt_config, &dir.join("mt.log"), "info");

        let ps_config = dir.join("ps.toml");
        let mut text = format!(
            "metrics = \"127.0.0.1:0\"\n[nbd]\nlisten = \"127.0.0.1:0\"\n[tracking]\nstate_dir = \"ps-state\"\ncut_interval_ms = 100\n[target]\naddress = \"{mt_addr}\"\nnode = \"ps1\"\nplain_tcp = true\n[[group]]\nid = \"g1\"\n"
        );
        for d in ["disk0", "disk1"] {
            text.push_str(&format!(
                "[[group.disk]]\nid = \"{d}\"\npath = \"{d}.img\"\nsize = \"16MiB\"\n"
            ));
        }
        std::fs::write(&ps_config, text).expect("write process-server config");
        let mut cmd = Command::new(common::bin_path("process-server"));
        cmd.args(["serve", "--config"])
            .arg(&ps_config)
            .env("RUST_LOG", "info");
        let common::Started { child, port, log } = common::start_listening(cmd, TIMEOUT);
        Self {
            dir: dir.to_path_buf(),
            mt: Some(mt),
            ps: Some(child),
            nbd_port: port,
            ps_log: log,
        }
    }

    fn logs(&self) -> String {
        format!(
            "process server log:\n{}\nmaster target log:\n{}",
            self.ps_log.lock().unwrap(),
            std::fs::read_to_string(self.dir.join("mt.log")).unwrap_or_default()
        )
    }

    /// Runs `bin ARGS --config CONFIG`; it must succeed. Returns stdout.
    fn cli(&self, bin: &str, config: &str, args: &[&str]) -> String {
        let out = Command::new(common::bin_path(bin))
            .args(args)
            .arg("--config")
            .arg(self.dir.join(config))
            .output()
            .unwrap_or_else(|e| panic!("run {bin}: {e}"));
        assert!(
            out.status.success(),
            "{bin} {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn ps_status(&self) -> Value {
        let out = self.cli("process-server", "ps.toml", &["status", "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}: {out}"))
    }

    fn mt_status(&self) -> Value {
        let out = self.cli("master-target", "mt.toml", &["status", "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}: {out}"))
    }

    /// Writes `len` bytes of `src` at `offset` of `disk` with qemu-io over NBD.
    fn write(&self, disk: &str, src: &Path, offset: u64, len: u64) {
        let uri = format!("nbd://127.0.0.1:{}/{disk}", self.nbd_port);
        common::qemu_io(&uri, &format!("write -s {} {offset} {len}", src.display()));
    }

    /// Waits until the process server reports a point cut after `after_unix_ms` as
    /// acknowledged; returns that status.
    fn wait_acked_after(&self, after_unix_ms: u64) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let st = self.ps_status();
            let t = st["groups"][0]["acked_point"]["time_unix_ms"].as_u64();
            if t.is_some_and(|t| t > after_unix_ms) {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "no point after {after_unix_ms} acknowledged: {st}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM to one server, and waits for a successful exit.
    fn stop(&mut self, which: &str) {
        let child = match which {
            "ps" => self.ps.as_mut(),
            _ => self.mt.as_mut(),
        }
        .expect("server running");
        let st = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(st.success());
        let status = child.wait().expect("wait for the server");
        assert!(status.success(), "{which} exit {status:?}\n{}", self.logs());
        match which {
            "ps" => self.ps = None,
            _ => self.mt = None,
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for c in [self.ps.as_mut(), self.mt.as_mut()].into_iter().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends `request` to `addr` and returns the whole answer (the server closes).
fn http(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    // The server may answer and stop reading before a long request is all sent.
    let _ = s.write_all(request);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// `GET /metrics` from `addr`: the samples by `name{labels}`, and the whole text.
fn scrape(addr: SocketAddr) -> (HashMap<String, f64>, String) {
    let answer = http(
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: text/plain\r\n\r\n",
    );
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {answer:?}"));
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("Content-Length");
    assert_eq!(len, body.len());
    let samples = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').expect("a sample is `name value`");
            let v = match v {
                "NaN" => f64::NAN,
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("value in {l:?}")),
            };
            (k.to_string(), v)
        })
        .collect();
    (samples, body.to_string())
}

fn sample(samples: &HashMap<String, f64>, key: &str, text: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("no sample {key} in:\n{text}"))
}

fn metrics_addr(status: &Value) -> SocketAddr {
    status["metrics"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address in {status}"))
}

/// Proves, on a live pair: the process server's status shows the group replicating
/// with an RPO, captured and shipped bytes at least what was written, and each disk's
/// id, group, NBD URI and backing path; the master target's status, asked while it
/// runs, shows the peer, the RPO and the replica paths, and `points` works while it
/// runs; both `/metrics` endpoints carry HELP/TYPE lines and the written bytes under
/// the right labels; after the process server stops the master target shows the group
/// disconnected, and after it stops too, `status` reads the files (`running: false`).
#[test]
fn status_and_metrics_of_both_servers_while_replicating() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let data = dir.join("data.bin");
    std::fs::write(
        &data,
        random_bytes(DISK0_BYTES as usize, 0x9e37_79b9_7f4a_7c15),
    )
    .expect("write data file");
    let mut pair = Pair::start(dir);
    pair.write("disk0", &data, 0, DISK0_BYTES);
    pair.write("disk1", &data, 4 << 20, DISK1_BYTES);
    let written = now_unix_ms();
    let st = pair.wait_acked_after(written);

    // The process server, from its control socket.
    assert_eq!(st["shipping"], true, "{st}");
    let g = &st["groups"][0];
    assert_eq!(g["id"], "g1");
    assert_eq!(g["state"], "replicating", "{st}");
    assert_eq!(g["connected"], true);
    let rpo = g["rpo_ms"].as_u64().expect("numeric rpo_ms");
    assert!(rpo < TIMEOUT.as_millis() as u64, "RPO {rpo} ms");
    assert!(g["captured_bytes"].as_u64().unwrap() >= DISK0_BYTES + DISK1_BYTES);
    assert!(g["shipped_plain_bytes"].as_u64().unwrap() >= DISK0_BYTES + DISK1_BYTES);
    assert!(g["shipped_bytes"].as_u64().unwrap() >= DISK0_BYTES + DISK1_BYTES);
    assert!(g["shipped_frames"].as_u64().unwrap() >= 3);
    assert!(g["spool_bytes_max"].as_u64().unwrap() > 0);
    assert!(g["capture_bytes_per_s"].as_f64().is_some());
    assert!(g["ship_bytes_per_s"].as_f64().is_some());
    let disks = st["disks"].as_array().expect("disks");
    assert_eq!(disks.len(), 2);
    for (d, (id, bytes)) in disks
        .iter()
        .zip([("disk0", DISK0_BYTES), ("disk1", DISK1_BYTES)])
    {
        assert_eq!(d["id"], id);
        assert_eq!(d["group"], "g1");
        assert_eq!(
            d["nbd_uri"],
            format!("nbd://127.0.0.1:{}/{id}", pair.nbd_port)
        );
        assert_eq!(
            d["path"].as_str().map(PathBuf::from),
            Some(dir.join(format!("{id}.img")))
        );
        assert_eq!(d["state"], "replicating");
        assert!(d["captured_bytes"].as_u64().unwrap() >= bytes, "{d}");
    }
    let human = pair.cli("process-server", "ps.toml", &["status"]);
    assert!(
        human.contains("replicating") && human.contains("disk1"),
        "{human}"
    );

    // The master target, live from its control socket while it runs.
    let mt = pair.mt_status();
    assert_eq!(mt["running"], true, "{mt}");
    let mg = &mt["groups"][0];
    assert_eq!(mg["id"], "g1");
    assert_eq!(mg["peer"]["node"], "ps1", "{mt}");
    assert_eq!(mg["state"], "replicating");
    assert!(mg["points"].as_u64().unwrap() >= 1);
    assert_eq!(mg["newest_point"]["consistent"], true);
    let mt_rpo = mg["rpo_ms"].as_u64().expect("numeric rpo_ms");
    assert!(mt_rpo < TIMEOUT.as_millis() as u64, "RPO {mt_rpo} ms");
    assert!(mg["journal_bytes"].as_u64().unwrap() >= DISK0_BYTES + DISK1_BYTES);
    assert!(mg["journaled_bytes"].as_u64().unwrap() >= DISK0_BYTES + DISK1_BYTES);
    assert!(mg["receive_bytes_per_s"].as_f64().is_some());
    let mdisks = mt["disks"].as_array().expect("disks");
    assert_eq!(mdisks.len(), 2);
    for (d, id) in mdisks.iter().zip(["disk0", "disk1"]) {
        assert_eq!(d["id"], id);
        assert_eq!(d["group"], "g1");
        assert_eq!(
            d["path"].as_str().map(PathBuf::from),
            Some(dir.join(format!("replicas/{id}.img")))
        );
        assert_eq!(d["state"], "replicating");
    }
    let points: Value = serde_json::from_str(&pair.cli(
        "master-target",
        "mt.toml",
        &["points", "--group", "g1", "--json"],
    ))
    .expect("points --json");
    let points = points.as_array().expect("an array");
    assert!(points.len() as u64 >= mg["points"].as_u64().unwrap());
    assert!(
        points
            .windows(2)
            .all(|w| w[0]["id"].as_u64() < w[1]["id"].as_u64())
    );
    let human = pair.cli("master-target", "mt.toml", &["status"]);
    assert!(
        human.contains("running") && human.contains("peer ps1"),
        "{human}"
    );

    // Both metrics endpoints.
    let (ps, text) = scrape(metrics_addr(&st));
    for (family, kind) in [
        ("blockrep_captured_bytes_total", "counter"),
        ("blockrep_shipped_bytes_total", "counter"),
        ("blockrep_spool_used_bytes", "gauge"),
        ("blockrep_rpo_seconds", "gauge"),
        ("blockrep_connected", "gauge"),
    ] {
        assert!(text.contains(&format!("# HELP {family} ")), "{family}");
        assert!(
            text.contains(&format!("# TYPE {family} {kind}\n")),
            "{family}"
        );
    }
    let at_least = |k: &str, v: u64| {
        let got = sample(&ps, k, &text);
        assert!(got >= v as f64, "{k} = {got} < {v}");
    };
    at_least(
        "blockrep_captured_bytes_total{group=\"g1\",disk=\"disk0\"}",
        DISK0_BYTES,
    );
    at_least(
        "blockrep_captured_bytes_total{group=\"g1\",disk=\"disk1\"}",
        DISK1_BYTES,
    );
    at_least(
        "blockrep_shipped_bytes_total{group=\"g1\"}",
        DISK0_BYTES + DISK1_BYTES,
    );
    at_least(
        "blockrep_shipped_plain_bytes_total{group=\"g1\"}",
        DISK0_BYTES + DISK1_BYTES,
    );
    assert_eq!(sample(&ps, "blockrep_connected{group=\"g1\"}", &text), 1.0);
    let rpo_s = sample(&ps, "blockrep_rpo_seconds{group=\"g1\"}", &text);
    assert!((0.0..TIMEOUT.as_secs_f64()).contains(&rpo_s), "{rpo_s}");
    assert!(sample(&ps, "blockrep_spool_max_bytes{group=\"g1\"}", &text) > 0.0);
    sample(&ps, "blockrep_spool_used_bytes{group=\"g1\"}", &text);
    assert_eq!(
        sample(
            &ps,
            "blockrep_group_state{group=\"g1\",state=\"replicating\"}",
            &text
        ),
        1.0
    );

    let (mts, text) = scrape(metrics_addr(&mt));
    for family in [
        "blockrep_journaled_bytes_total",
        "blockrep_journal_bytes",
        "blockrep_rpo_seconds",
    ] {
        assert!(text.contains(&format!("# HELP {family} ")), "{family}");
        assert!(text.contains(&format!("# TYPE {family} ")), "{family}");
    }
    let at_least = |k: &str, v: u64| {
        let got = sample(&mts, k, &text);
        assert!(got >= v as f64, "{k} = {got} < {v}");
    };
    at_least(
        "blockrep_journaled_bytes_total{group=\"g1\"}",
        DISK0_BYTES + DISK1_BYTES,
    );
    at_least(
        "blockrep_received_bytes_total{group=\"g1\"}",
        DISK0_BYTES + DISK1_BYTES,
    );
    at_least(
        "blockrep_journal_bytes{group=\"g1\"}",
        DISK0_BYTES + DISK1_BYTES,
    );
    assert_eq!(sample(&mts, "blockrep_connected{group=\"g1\"}", &text), 1.0);
    assert_eq!(
        sample(&mts, "blockrep_connected_process_servers", &text),
        1.0
    );
    let rpo_s = sample(&mts, "blockrep_rpo_seconds{group=\"g1\"}", &text);
    assert!((0.0..TIMEOUT.as_secs_f64()).contains(&rpo_s), "{rpo_s}");

    // Without its process server the group is disconnected, live.
    pair.stop("ps");
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let mt = pair.mt_status();
        if mt["groups"][0]["peer"].is_null() {
            assert_eq!(mt["groups"][0]["state"], "disconnected", "{mt}");
            assert_eq!(mt["disks"][0]["state"], "disconnected", "{mt}");
            break;
        }
        assert!(Instant::now() < deadline, "the peer never left: {mt}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A stopped master target removes its socket; status then reads the files.
    pair.stop("mt");
    assert!(!dir.join("mt-data/control.sock").exists());
    let off = pair.mt_status();
    assert_eq!(off["running"], false, "{off}");
    assert!(off["groups"][0]["points"].as_u64().unwrap() >= 1);
    assert!(off["groups"][0]["rpo_ms"].as_u64().is_some());
    assert!(off["groups"][0]["receive_bytes_per_s"].is_null());
    assert_eq!(off["disks"][1]["state"], "disconnected");
    let human = pair.cli("master-target", "mt.toml", &["status"]);
    assert!(human.contains("not running"), "{human}");
}

/// Sends one line to a Unix socket and returns the answer line.
fn control(socket: &Path, line: &[u8]) -> Value {
    let mut s = UnixStream::connect(socket).expect("connect control socket");
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let _ = s.write_all(line);
    let mut answer = String::new();
    BufReader::new(s)
        .read_line(&mut answer)
        .expect("read answer");
    serde_json::from_str(answer.trim()).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
}

/// Proves garbage, truncated, oversized and wrong requests to both metrics endpoints
/// get an HTTP error answer (400, 404, 405), and garbage to the master target's
/// control socket gets `ok: false` with a reason, and that both servers keep serving
/// scrapes and status after each.
#[test]
fn garbage_to_metrics_and_control_is_refused_and_servers_keep_serving() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pair = Pair::start(tmp.path());
    let ps_addr = metrics_addr(&pair.ps_status());
    let mt_addr = metrics_addr(&pair.mt_status());
    let mut oversized = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
    oversized.resize(64 << 10, b'a');
    let soup = random_bytes(20_000, 42);
    let cases: [(&[u8], &str); 7] = [
        (&soup, "400"),
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
            "400",
        ),
        (b"GET /metrics HTTP/1.1\r\nHost: x", "400"),
        (&oversized, "400"),
        (b"GET /metrics HTTP/9.9\r\n\r\n", "400"),
        (b"GET /nothing-here HTTP/1.1\r\n\r\n", "404"),
        (b"POST /metrics HTTP/1.1\r\n\r\n", "405"),
    ];
    for addr in [ps_addr, mt_addr] {
        for (req, code) in cases {
            let a = http(addr, req);
            assert!(
                a.starts_with(&format!("HTTP/1.1 {code} ")),
                "{addr}: expected {code}, got {a:?}"
            );
            let (samples, text) = scrape(addr);
            sample(&samples, "blockrep_connected{group=\"g1\"}", &text);
        }
        // A client that connects and says nothing is cut off; scrapes go on meanwhile.
        let idle = TcpStream::connect(addr).expect("connect");
        scrape(addr);
        drop(idle);
    }

    let socket = tmp.path().join("mt-data/control.sock");
    let mut long = vec![b'{'; 10_000];
    long.push(b'\n');
    for (req, why) in [
        (&b"not json\n"[..], "not JSON"),
        (&long[..], "over"),
        (b"{\"cmd\":\"launch\"}\n", "unknown cmd"),
        (b"{\"nocmd\":1}\n", "needs"),
        (
            b"{\"cmd\":\"points\",\"group\":\"nope\"}\n",
            "unknown group",
        ),
        (b"{\"cmd\":\"points\"}\n", "needs"),
        (b"\xff\xfe\n", "read request"),
    ] {
        let a = control(&socket, req);
        assert_eq!(a["ok"], false, "{a}");
        let e = a["error"].as_str().unwrap_or_default();
        assert!(e.contains(why), "{why:?} not in {e:?}");
        let st = pair.mt_status();
        assert_eq!(st["running"], true, "{st}");
    }
    // A request cut off (no newline, then EOF) is still answered.
    let mut s = UnixStream::connect(&socket).expect("connect");
    s.write_all(b"{\"cmd\":\"sta").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.contains("\"ok\":false"), "{answer}");
    let points = control(&socket, b"{\"cmd\":\"points\",\"group\":\"g1\"}\n");
    assert_eq!(points["ok"], true, "{points}");
    assert_eq!(pair.ps_status()["groups"][0]["id"], "g1");
}
