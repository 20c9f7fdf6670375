//! End-to-end tests of TLS between the process server and the master target: the
//! certificates come from `master-target certs`, the real binaries run on loopback, and
//! the refusals are driven by a small blocking rustls client that speaks frames.
//!
//! Needs qemu-utils (qemu-io).

mod common;
#[allow(dead_code)]
#[path = "common/wire.rs"]
mod wire;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ProcessServer, now_unix_ms};
use datapath::extent::ExtentData;
use datapath::frame::{self, ErrorFrame, Frame, HEADER_BYTES, PROTOCOL_VERSION};
use datapath::journal::{Journal, JournalConfig};
use datapath::storage::RealFs;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Time a server has to start, the shipper to acknowledge, a log line to appear.
const TIMEOUT: Duration = Duration::from_secs(20);
/// Size of the one disk of the end-to-end test.
const DISK_BYTES: usize = 16 << 20;

/// Runs `master-target certs --out DIR --process-server NODE...`; it must succeed.
fn make_certs(dir: &Path, nodes: &[&str]) {
    let mut cmd = Command::new(common::bin_path("master-target"));
    cmd.args(["certs", "--out"]).arg(dir);
    for n in nodes {
        cmd.args(["--process-server", n]);
    }
    let out = cmd.output().expect("run master-target certs");
    assert!(
        out.status.success(),
        "certs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A master target config in `dir` with `[tls]` naming `certs/` (relative) and the
/// groups of `wire` (g1, g2 with disk0 and disk1 of 1 MiB), plus `extra` at the top.
fn tls_master_target_config(dir: &Path, extra: &str) -> PathBuf {
    let config = dir.join("mt.toml");
    let mut text = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n{extra}[tls]\nca = \"certs/ca.pem\"\n\
         cert = \"certs/master-target.pem\"\nkey = \"certs/master-target.key\"\n"
    );
    for g in ["g1", "g2"] {
        text.push_str(&format!("[[group]]\nid = \"{g}\"\n"));
        for d in ["disk0", "disk1"] {
            text.push_str(&format!(
                "[[group.disk]]\nid = \"{d}\"\nsize = \"1MiB\"\nreplica = \"replicas/{g}-{d}.img\"\n"
            ));
        }
    }
    std::fs::write(&config, text).expect("write master-target config");
    config
}

/// A running TLS master target with certificates for nodes ps1 and ps2 in
/// `dir/certs`; killed on drop.
struct TlsServer {
    dir: tempfile::TempDir,
    child: Child,
    addr: SocketAddr,
}

impl TlsServer {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        make_certs(&dir.path().join("certs"), &["ps1", "ps2"]);
        let config = tls_master_target_config(dir.path(), "");
        let (child, addr) =
            common::start_master_target(&config, &dir.path().join("mt.log"), "debug");
        Self { dir, child, addr }
    }

    fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mt.log")).unwrap_or_default()
    }

    /// Waits until a log line contains every one of `parts`; returns it.
    fn wait_log(&self, parts: &[&str]) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let log = self.log();
            if let Some(l) = log.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
                return l.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no line with {parts:?}; log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn assert_alive(&mut self) {
        assert!(
            self.child.try_wait().expect("try_wait").is_none(),
            "the master target died; log:\n{}",
            self.log()
        );
    }

    /// A client of node `node` with its certificate from this deployment.
    fn client_config(&self, node: &str) -> Arc<rustls::ClientConfig> {
        let c = self.certs();
        client_config(
            &c.join("ca.pem"),
            Some((
                &c.join(format!("process-server-{node}.pem")),
                &c.join(format!("process-server-{node}.key")),
            )),
        )
    }

    /// Proves the server still serves: node ps1 with its own certificate gets a Hello
    /// and an Ack for g1.
    fn assert_serves_a_good_client(&mut self) {
        self.assert_alive();
        let mut s = connect_tls(self.addr, self.client_config("ps1"));
        match hello(&mut s, "ps1") {
            Ok(Some(Frame::Hello(h))) => assert_eq!(h.role, frame::Role::MasterTarget),
            other => panic!(
                "a good client was not served: {other:?}; log:\n{}",
                self.log()
            ),
        }
        match read_frame(&mut s) {
            Ok(Some(Frame::Ack(a))) => assert_eq!(a.group, "g1"),
            other => panic!("no resume ack: {other:?}"),
        }
        self.wait_log(&["process server connected", "ps1", "TLS"]);
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TLS 1.3 client config trusting `ca`, presenting `cert` and `key` when given.
fn client_config(ca: &Path, cert_key: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca).expect("read ca"))
        .expect("add ca");
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots);
    Arc::new(match cert_key {
        Some((cert, key)) => b
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_file(cert).expect("read cert")],
                PrivateKeyDer::from_pem_file(key).expect("read key"),
            )
            .expect("client cert"),
        None => b.with_no_client_auth(),
    })
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connects TCP and starts TLS (the handshake runs on the first read or write).
fn connect_tls(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> TlsStream {
    let tcp = TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_millis(wire::CLIENT_READ_TIMEOUT_MS)))
        .expect("read timeout");
    let name = ServerName::try_from("localhost").expect("server name");
    let conn = rustls::ClientConnection::new(config, name).expect("client connection");
    rustls::StreamOwned::new(conn, tcp)
}

/// Reads one frame: `Ok(None)` at a clean end, `Err` for a failed read (a TLS alert, a
/// reset, a broken handshake).
fn read_frame(s: &mut impl Read) -> Result<Option<Frame>, String> {
    let mut head = [0u8; HEADER_BYTES];
    match s.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.to_string()),
    }
    let h = frame::FrameHeader::parse(&head).map_err(|e| format!("frame header: {e}"))?;
    let mut f = head.to_vec();
    f.resize(h.frame_len(), 0);
    s.read_exact(&mut f[HEADER_BYTES..])
        .map_err(|e| e.to_string())?;
    let mut dec = frame::Decoder::new();
    frame::decode(&f, &mut dec)
        .map(Some)
        .map_err(|e| format!("frame: {e}"))
}

/// Sends a hello of `node` for group g1 and reads the first answer.
fn hello(s: &mut TlsStream, node: &str) -> Result<Option<Frame>, String> {
    let disks: &[(&str, u64)] = &[("disk0", wire::DISK_BYTES), ("disk1", wire::DISK_BYTES)];
    let f = wire::hello_frame_as(node, 1, PROTOCOL_VERSION, &[("g1", disks)]);
    s.write_all(&f).map_err(|e| e.to_string())?;
    s.flush().map_err(|e| e.to_string())?;
    read_frame(s)
}

/// Sends `bytes` over plain TCP, half-closes, and reads until the server closes; returns
/// our address and what the server sent back. Fails the test when the server keeps the
/// connection open.
fn plain_exchange(addr: SocketAddr, bytes: &[u8]) -> (SocketAddr, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connect");
    let local = s.local_addr().expect("local address");
    s.set_read_timeout(Some(Duration::from_millis(wire::CLIENT_READ_TIMEOUT_MS)))
        .expect("read timeout");
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server did not close the connection: {e}"),
        }
    }
    (local, got)
}

/// Proves data flows over TLS end to end: with certificates from `master-target certs`,
/// a process server with TLS in `[target]` ships qemu-io's writes to a master target
/// with `[tls]`; the write is acknowledged, `points` lists a point, and the journal
/// replayed onto a zero image gives exactly the disk.
#[test]
fn data_flows_over_tls_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_certs(&dir.join("certs"), &["ps1"]);
    let mt_config = dir.join("mt.toml");
    std::fs::write(
        &mt_config,
        "listen = \"127.0.0.1:0\"\ndata_dir = \"mt-data\"\n[tls]\nca = \"certs/ca.pem\"\n\
         cert = \"certs/master-target.pem\"\nkey = \"certs/master-target.key\"\n\
         [[group]]\nid = \"g1\"\n[[group.disk]]\nid = \"disk0\"\nsize = \"16MiB\"\n\
         replica = \"mt-data/replica-disk0.img\"\n",
    )
    .unwrap();
    let mt_log = dir.join("mt.log");
    let (mut mt, addr) = common::start_master_target(&mt_config, &mt_log, "info");
    let ps_config = dir.join("ps.toml");
    std::fs::write(
        &ps_config,
        format!(
            "[nbd]\nlisten = \"127.0.0.1:0\"\n[tracking]\nstate_dir = \"ps-state\"\n\
             cut_interval_ms = 100\n[target]\naddress = \"{addr}\"\nnode = \"ps1\"\n\
             ca = \"certs/ca.pem\"\ncert = \"certs/process-server-ps1.pem\"\n\
             key = \"certs/process-server-ps1.key\"\n[[group]]\nid = \"g1\"\n\
             [[group.disk]]\nid = \"disk0\"\npath = \"disk0.img\"\nsize = \"16MiB\"\n"
        ),
    )
    .unwrap();
    let ps = ProcessServer::start(&ps_config, TIMEOUT);
    ps.qemu_io("disk0", "write -P 0xab 4096 1M");
    ps.qemu_io("disk0", "write -z 65536 64k");
    let done = now_unix_ms();
    ps.wait_acked_after(done);
    let log = ps.stop();
    assert!(
        log.lines()
            .any(|l| l.contains("connected") && l.contains("TLS 1.3")),
        "the shipper did not say it connected over TLS; log:\n{log}"
    );
    mt.kill().unwrap();
    mt.wait().unwrap();
    let mt_text = std::fs::read_to_string(&mt_log).unwrap();
    assert!(mt_text.contains("TLS 1.3, mutual"), "{mt_text}");

    let out = Command::new(common::bin_path("master-target"))
        .args(["points", "--group", "g1", "--json", "--config"])
        .arg(&mt_config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let points: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!points.as_array().unwrap().is_empty(), "no point: {points}");

    let (j, _) = Journal::open(
        Arc::new(RealFs),
        &dir.join("mt-data/g1/journal"),
        "g1",
        JournalConfig::default(),
    )
    .unwrap();
    let mut img = vec![0u8; DISK_BYTES];
    let mut dec = frame::Decoder::new();
    for r in j.read(1, j.write_seq()).unwrap() {
        let (_, bytes) = r.unwrap();
        if let Frame::Data(d) = frame::decode(&bytes, &mut dec).unwrap() {
            for (offset, data) in d.extents() {
                let at = offset as usize;
                match data {
                    ExtentData::Bytes(b) => img[at..at + b.len()].copy_from_slice(b),
                    ExtentData::Zero(n) => img[at..at + n as usize].fill(0),
                }
            }
        }
    }
    let disk = std::fs::read(dir.join("disk0.img")).unwrap();
    assert!(disk[4096..65536].iter().all(|&b| b == 0xab));
    assert!(img == disk, "the journal does not replay to the disk");
}

/// Proves a client whose certificate comes from another CA fails the handshake, the
/// server logs it at warn with the peer's address, and still serves a good client.
#[test]
fn certificate_of_another_ca_is_refused() {
    let mut server = TlsServer::start();
    let other = server.dir.path().join("other");
    make_certs(&other, &["ps1"]);
    // Trusts the right CA, presents a certificate of the other one.
    let config = client_config(
        &server.certs().join("ca.pem"),
        Some((
            &other.join("process-server-ps1.pem"),
            &other.join("process-server-ps1.key"),
        )),
    );
    let mut s = connect_tls(server.addr, config);
    let local = s.sock.local_addr().unwrap();
    let got = hello(&mut s, "ps1");
    assert!(
        !matches!(got, Ok(Some(_))),
        "a foreign certificate was answered: {got:?}"
    );
    let line = server.wait_log(&["TLS handshake failed", &local.to_string()]);
    assert!(line.contains("WARN"), "{line}");

    // No client certificate at all: refused the same way.
    let mut s = connect_tls(
        server.addr,
        client_config(&server.certs().join("ca.pem"), None),
    );
    let local = s.sock.local_addr().unwrap();
    assert!(!matches!(hello(&mut s, "ps1"), Ok(Some(_))));
    server.wait_log(&["TLS handshake failed", &local.to_string()]);
    server.assert_serves_a_good_client();
}

/// Proves the process server checks the master target too: one whose certificate comes
/// from another CA fails the handshake, which the shipper logs at warn (retrying), and
/// it never connects.
#[test]
fn process_server_refuses_a_master_target_of_another_ca() {
    let mut server = TlsServer::start();
    let dir = server.dir.path();
    make_certs(&dir.join("other"), &["ps1"]);
    let ps_config = dir.join("ps.toml");
    std::fs::write(
        &ps_config,
        format!(
            "[nbd]\nlisten = \"127.0.0.1:0\"\n[target]\naddress = \"{}\"\nnode = \"ps1\"\n\
             ca = \"other/ca.pem\"\ncert = \"other/process-server-ps1.pem\"\n\
             key = \"other/process-server-ps1.key\"\n[[group]]\nid = \"g1\"\n\
             [[group.disk]]\nid = \"disk0\"\npath = \"disk0.img\"\nsize = \"1MiB\"\n",
            server.addr
        ),
    )
    .unwrap();
    let ps = ProcessServer::start(&ps_config, TIMEOUT);
    let deadline = Instant::now() + TIMEOUT;
    while !ps.log().contains("TLS handshake failed") {
        assert!(Instant::now() < deadline, "no warning; log:\n{}", ps.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    server.wait_log(&["TLS handshake failed"]);
    let log = ps.stop();
    let line = log
        .lines()
        .find(|l| l.contains("TLS handshake failed"))
        .unwrap_or_default();
    assert!(
        line.contains("WARN") && line.contains("127.0.0.1"),
        "{line}"
    );
    assert!(
        !log.lines()
            .any(|l| l.contains("connected") && l.contains("TLS 1.3")),
        "{log}"
    );
    server.assert_serves_a_good_client();
}

/// Proves a plain-TCP client (a frame hello) to a TLS master target is disconnected
/// without being answered by a frame, and the server keeps serving.
#[test]
fn plain_tcp_client_is_disconnected() {
    let mut server = TlsServer::start();
    let disks: &[(&str, u64)] = &[("disk0", wire::DISK_BYTES)];
    let (local, got) = plain_exchange(
        server.addr,
        &wire::hello_frame_as("ps1", 1, PROTOCOL_VERSION, &[("g1", disks)]),
    );
    assert!(
        got.len() < HEADER_BYTES
            || frame::FrameHeader::parse(&got[..HEADER_BYTES].try_into().unwrap()).is_err(),
        "a plain client got a frame"
    );
    server.wait_log(&["TLS handshake failed", &local.to_string()]);
    server.assert_serves_a_good_client();
}

/// Proves random bytes sent to the TLS port are disconnected with a warning and the
/// server keeps serving.
#[test]
fn garbage_to_the_tls_port_is_disconnected() {
    let mut server = TlsServer::start();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let garbage: Vec<u8> = (0..8192)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let (local, _) = plain_exchange(server.addr, &garbage);
    server.wait_log(&["TLS handshake failed", &local.to_string()]);
    // A TLS handshake record cut short by the close.
    let (local, _) = plain_exchange(server.addr, &[0x16, 0x03, 0x01, 0x40, 0x00, 1, 2, 3]);
    server.wait_log(&["TLS handshake failed", &local.to_string()]);
    server.assert_serves_a_good_client();
}

/// Proves a client that connects and never sends a byte is dropped once the handshake
/// timeout (10 s) passes, logged with its address.
#[test]
fn silent_client_is_dropped_after_the_handshake_timeout() {
    let mut server = TlsServer::start();
    let mut s = TcpStream::connect(server.addr).unwrap();
    let local = s.local_addr().unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected a close, got {other:?}"),
    }
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    let line = server.wait_log(&["TLS handshake", "not finished", &local.to_string()]);
    assert!(line.contains("WARN"), "{line}");
    server.assert_serves_a_good_client();
}

/// Proves a client certificate of node ps2 cannot speak for node ps1: the hello is
/// refused with AUTH, naming both, and ps1 itself is still served.
#[test]
fn certificate_of_another_node_is_refused() {
    let mut server = TlsServer::start();
    let mut s = connect_tls(server.addr, server.client_config("ps2"));
    let e = match hello(&mut s, "ps1") {
        Ok(Some(Frame::Error(e))) => e,
        other => panic!("expected an Error frame, got {other:?}"),
    };
    assert_eq!(e.code, ErrorFrame::AUTH, "{e:?}");
    assert!(
        e.message.contains("\"ps1\"") && e.message.contains("\"ps2\""),
        "{}",
        e.message
    );
    assert!(matches!(read_frame(&mut s), Ok(None) | Err(_)));
    server.assert_serves_a_good_client();
}

/// Proves bad TLS settings stop both binaries at start with the file and field named:
/// a missing key file of the master target, [tls] together with plain_tcp_loopback, a
/// missing CA file of the process server.
#[test]
fn bad_tls_files_are_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_certs(&dir.join("certs"), &["ps1"]);
    let serve = |bin: &str, config: &Path| {
        let out = Command::new(common::bin_path(bin))
            .args(["serve", "--config"])
            .arg(config)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bin} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let config = tls_master_target_config(dir, "");
    std::fs::remove_file(dir.join("certs/master-target.key")).unwrap();
    let err = serve("master-target", &config);
    assert!(
        err.contains("mt.toml") && err.contains("tls.key") && err.contains("master-target.key"),
        "{err}"
    );
    let config = tls_master_target_config(dir, "plain_tcp_loopback = true\n");
    let err = serve("master-target", &config);
    assert!(
        err.contains("mt.toml") && err.contains("plain_tcp_loopback") && err.contains("tls"),
        "{err}"
    );

    let ps_config = dir.join("ps.toml");
    std::fs::write(
        &ps_config,
        "[nbd]\nlisten = \"127.0.0.1:0\"\n[target]\naddress = \"192.0.2.1:10900\"\n\
         node = \"ps1\"\nca = \"certs/missing-ca.pem\"\ncert = \"certs/process-server-ps1.pem\"\n\
         key = \"certs/process-server-ps1.key\"\n[[group]]\nid = \"g1\"\n[[group.disk]]\n\
         id = \"disk0\"\npath = \"disk0.img\"\nsize = \"1MiB\"\n",
    )
    .unwrap();
    let err = serve("process-server", &ps_config);
    assert!(
        err.contains("ps.toml") && err.contains("target.ca") && err.contains("missing-ca.pem"),
        "{err}"
    );
}
