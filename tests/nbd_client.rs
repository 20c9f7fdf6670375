//! Tests of `blockrep::nbd_client`: against the real `process-server serve` (every
//! write read back and compared with the backing file), and against fake servers in
//! a thread that send bad, truncated or random bytes (an error, never a panic or a
//! hang).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use blockrep::nbd_client::NbdClient;
use blockrep::workload::{Rng, random_bytes, realistic_bytes};
use datapath::nbd;

/// Size of every test disk.
const DISK_BYTES: usize = 16 << 20;
/// Time the server has to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Socket timeout of clients talking to fake servers: a test must fail, not hang.
const FAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A running `process-server serve` (nothing shipped) with disks disk0 and disk1 in a
/// temp dir; killed on drop.
struct Server {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("ps.toml");
        let mut text = "[nbd]\nlisten = \"127.0.0.1:0\"\n[[group]]\nid = \"g1\"\n".to_string();
        for d in ["disk0", "disk1"] {
            text.push_str(&format!(
                "[[group.disk]]\nid = \"{d}\"\npath = \"{d}.img\"\nsize = {DISK_BYTES}\n"
            ));
        }
        std::fs::write(&config, text).expect("write config");
        let mut cmd = Command::new(common::bin_path("process-server"));
        cmd.args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info");
        let common::Started { child, port, .. } = common::start_listening(cmd, START_TIMEOUT);
        Self { child, port, dir }
    }

    fn connect(&self, export: &str) -> NbdClient {
        NbdClient::connect(("127.0.0.1", self.port), export)
            .unwrap_or_else(|e| panic!("connect to {export}: {e}"))
    }

    fn backing(&self, disk: &str) -> Vec<u8> {
        std::fs::read(self.path(&format!("{disk}.img"))).expect("read backing file")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Proves writes of several sizes and alignments read back byte for byte, and land in
/// the backing file exactly there; the export's size and block sizes are as served.
#[test]
fn write_then_read_back_exact() {
    let s = Server::start();
    let mut c = s.connect("disk0");
    assert_eq!(c.size_bytes(), DISK_BYTES as u64);
    assert_eq!(c.info().block_min_bytes, nbd::BLOCK_MIN_BYTES);
    assert_eq!(c.info().payload_max_bytes, nbd::REQUEST_BYTES_MAX);
    let data = realistic_bytes(3 << 20);
    let mut model = vec![0u8; DISK_BYTES];
    for (offset, len) in [
        (0usize, 4096usize),
        (512, 1536),
        (1 << 20, 3 << 20),
        (DISK_BYTES - 65536, 65536),
    ] {
        c.write(offset as u64, &data[..len], false).expect("write");
        model[offset..offset + len].copy_from_slice(&data[..len]);
        let mut back = vec![0u8; len];
        c.read(offset as u64, &mut back).expect("read");
        assert!(back == data[..len], "read back differs at {offset}+{len}");
    }
    // An unaligned read is fine (only changes must be sector-aligned).
    let mut odd = vec![0u8; 1001];
    c.read(777, &mut odd).expect("unaligned read");
    assert_eq!(odd[..], model[777..1778]);
    c.flush().expect("flush");
    c.disconnect().expect("disconnect");
    assert!(
        s.backing("disk0") == model,
        "backing file differs from the writes"
    );
}

/// Proves FUA writes and flushes are accepted and the data is in the backing file
/// when they are answered.
#[test]
fn fua_write_and_flush() {
    let s = Server::start();
    let mut c = s.connect("disk1");
    let data = random_bytes(256 << 10, 5);
    c.write(8192, &data, true).expect("FUA write");
    assert!(s.backing("disk1")[8192..8192 + data.len()] == data[..]);
    c.write(1 << 20, &data[..4096], false).expect("write");
    c.flush().expect("flush");
    assert!(s.backing("disk1")[1 << 20..(1 << 20) + 4096] == data[..4096]);
}

/// Proves write-zeroes and trim zero exactly their ranges and nothing around them.
#[test]
fn write_zeroes_and_trim() {
    let s = Server::start();
    let mut c = s.connect("disk0");
    let data = realistic_bytes(1 << 20);
    c.write(0, &data, false).expect("write");
    c.write_zeroes(4096, 8192).expect("write zeroes");
    c.trim(65536, 512).expect("trim");
    let mut model = data.clone();
    model[4096..4096 + 8192].fill(0);
    model[65536..65536 + 512].fill(0);
    let mut back = vec![0u8; 1 << 20];
    c.read(0, &mut back).expect("read");
    assert!(back == model, "zeroed ranges differ");
    c.flush().expect("flush");
    assert!(s.backing("disk0")[..1 << 20] == model[..]);
}

/// Proves an unknown export name is refused with an error that names the export and
/// the option error.
#[test]
fn unknown_export_is_named() {
    let s = Server::start();
    let e = NbdClient::connect(("127.0.0.1", s.port), "no-such-disk").expect_err("connected");
    let msg = e.to_string();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{msg}");
    assert!(
        msg.contains("no-such-disk") && msg.contains("NBD_REP_ERR_UNKNOWN"),
        "{msg}"
    );
}

/// Proves a write the server refuses (misaligned, past the end) is an error naming
/// the errno and the range, and the connection stays usable; in a pipelined batch
/// the first refusal is returned after the writes in flight are answered.
#[test]
fn refused_requests_name_the_errno() {
    let s = Server::start();
    let mut c = s.connect("disk0");
    let e = c
        .write(1, &[7u8; 512], false)
        .expect_err("misaligned write");
    assert!(e.to_string().contains("NBD_EINVAL"), "{e}");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let e = c
        .write(DISK_BYTES as u64, &[7u8; 512], false)
        .expect_err("write past the end");
    assert!(
        e.to_string().contains("NBD_ENOSPC") && e.to_string().contains(&DISK_BYTES.to_string()),
        "{e}"
    );
    let good = vec![9u8; 4096];
    let batch = vec![(0u64, &good[..]), (3, &good[..]), (8192, &good[..])];
    let e = c
        .write_many(batch, 8)
        .expect_err("a misaligned write in the batch");
    assert!(e.to_string().contains("NBD_EINVAL"), "{e}");
    let mut back = vec![0u8; 4096];
    c.read(0, &mut back).expect("still usable");
    assert_eq!(back, good);
}

/// Proves pipelined writes at depth 8 (different sizes, one over the maximum payload
/// so it is split) all land, read back byte for byte.
#[test]
fn pipelined_writes_depth_8_read_back_exact() {
    let s = Server::start();
    let mut c = s.connect("disk1");
    let pool = realistic_bytes(4 << 20);
    let mut rng = Rng::new(8);
    let mut model = vec![0u8; DISK_BYTES];
    let mut writes = Vec::new();
    // Non-overlapping slots of 256 KiB, in random order, each written with 4 KiB to
    // 256 KiB of data: writes in flight together may land in any order.
    let mut slots: Vec<usize> = (0..DISK_BYTES / (256 << 10)).collect();
    for i in (1..slots.len()).rev() {
        slots.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for &slot in &slots {
        let len = 4096 * (1 + rng.below(64) as usize);
        let src = 4096 * rng.below(((pool.len() - len) / 4096) as u64) as usize;
        let at = slot * (256 << 10);
        model[at..at + len].copy_from_slice(&pool[src..src + len]);
        writes.push((at as u64, pool[src..src + len].to_vec()));
    }
    let n = writes.len() as u64;
    assert_eq!(c.write_many(writes, 8).expect("write_many"), n);
    let mut back = vec![0u8; DISK_BYTES];
    c.read(0, &mut back).expect("read all");
    assert!(back == model, "pipelined writes read back differently");
    c.flush().expect("flush");
    assert!(s.backing("disk1") == model);
}

// ---- fake servers ----

/// Starts a one-connection fake server running `script` on the accepted stream.
fn fake_server(script: impl FnOnce(TcpStream) + Send + 'static) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        if let Ok((s, _)) = l.accept() {
            let _ = s.set_read_timeout(Some(FAKE_TIMEOUT));
            script(s);
        }
    });
    addr
}

/// Plays the server side of a good negotiation for an export of `size_bytes`.
fn negotiate(s: &mut TcpStream, size_bytes: u64) {
    s.write_all(&nbd::encode_greeting()).unwrap();
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags).unwrap();
    let mut h = [0u8; nbd::OPTION_HEADER_BYTES];
    s.read_exact(&mut h).unwrap();
    let h = nbd::OptionHeader::parse(&h).unwrap();
    assert_eq!(h.option, nbd::OPT_GO);
    let mut data = vec![0u8; h.data_len as usize];
    s.read_exact(&mut data).unwrap();
    let mut out = Vec::new();
    nbd::encode_info_export(nbd::OPT_GO, size_bytes, nbd::TRANSMISSION_FLAGS, &mut out);
    nbd::encode_option_reply(nbd::OPT_GO, nbd::REP_ACK, &[], &mut out);
    s.write_all(&out).unwrap();
}

/// Reads one request header (and a write's payload) from the client.
fn read_request(s: &mut TcpStream) -> nbd::Request {
    let mut b = [0u8; nbd::REQUEST_BYTES];
    s.read_exact(&mut b).unwrap();
    let r = nbd::Request::parse(&b).unwrap();
    let mut payload = vec![0u8; r.payload_bytes() as usize];
    s.read_exact(&mut payload).unwrap();
    r
}

fn fake_connect(addr: SocketAddr) -> std::io::Result<NbdClient> {
    NbdClient::connect_timeout(addr, "disk0", FAKE_TIMEOUT)
}

/// Proves a greeting with a bad magic is an error naming it, not a panic.
#[test]
fn fake_bad_greeting_magic() {
    let addr = fake_server(|mut s| {
        let mut g = nbd::encode_greeting();
        g[0] ^= 0xff;
        let _ = s.write_all(&g);
    });
    let e = fake_connect(addr).expect_err("connected to a bad server");
    assert_eq!(e.kind(), ErrorKind::InvalidData, "{e}");
    assert!(e.to_string().contains("greeting magic"), "{e}");
}

/// Proves a reply with a bad magic is an error, and the connection refuses further
/// use rather than read from an unknown stream position.
#[test]
fn fake_bad_reply_magic() {
    let addr = fake_server(|mut s| {
        negotiate(&mut s, 1 << 20);
        let r = read_request(&mut s);
        let mut reply = nbd::encode_simple_reply(r.cookie, 0);
        reply[1] ^= 0x10;
        let _ = s.write_all(&reply);
        std::thread::sleep(Duration::from_millis(200));
    });
    let mut c = fake_connect(addr).expect("negotiate");
    let e = c.flush().expect_err("bad magic accepted");
    assert_eq!(e.kind(), ErrorKind::InvalidData, "{e}");
    assert!(e.to_string().contains("simple reply magic"), "{e}");
    let e = c.flush().expect_err("used after a protocol error");
    assert!(e.to_string().contains("unusable"), "{e}");
}

/// Proves a reply cut short (the server closes mid-header, or mid-read data) is an
/// error, not a panic or a hang.
#[test]
fn fake_truncated_replies() {
    let addr = fake_server(|mut s| {
        negotiate(&mut s, 1 << 20);
        let r = read_request(&mut s);
        let _ = s.write_all(&nbd::encode_simple_reply(r.cookie, 0)[..9]);
    });
    let mut c = fake_connect(addr).expect("negotiate");
    let e = c
        .write(0, &[1u8; 4096], false)
        .expect_err("truncated reply");
    assert_eq!(e.kind(), ErrorKind::UnexpectedEof, "{e}");

    let addr = fake_server(|mut s| {
        negotiate(&mut s, 1 << 20);
        let r = read_request(&mut s);
        let _ = s.write_all(&nbd::encode_simple_reply(r.cookie, 0));
        let _ = s.write_all(&[5u8; 100]);
    });
    let mut c = fake_connect(addr).expect("negotiate");
    let mut buf = vec![0u8; 4096];
    let e = c.read(0, &mut buf).expect_err("read data cut short");
    assert_eq!(e.kind(), ErrorKind::UnexpectedEof, "{e}");

    // Negotiation cut short.
    let addr = fake_server(|mut s| {
        let _ = s.write_all(&nbd::encode_greeting()[..10]);
    });
    assert!(fake_connect(addr).is_err());
}

/// Proves a reply whose cookie no request has is an error.
#[test]
fn fake_unknown_cookie() {
    let addr = fake_server(|mut s| {
        negotiate(&mut s, 1 << 20);
        let r = read_request(&mut s);
        let _ = s.write_all(&nbd::encode_simple_reply(r.cookie ^ 0xffff, 0));
        std::thread::sleep(Duration::from_millis(200));
    });
    let mut c = fake_connect(addr).expect("negotiate");
    let e = c.flush().expect_err("unknown cookie accepted");
    assert!(e.to_string().contains("cookie"), "{e}");
}

/// Proves pipelined writes are matched by cookie: a server answering a batch in
/// reverse order is fine, and an error reply in it names the errno.
#[test]
fn fake_replies_out_of_order() {
    let addr = fake_server(|mut s| {
        negotiate(&mut s, 1 << 20);
        let reqs: Vec<nbd::Request> = (0..4).map(|_| read_request(&mut s)).collect();
        for r in reqs.iter().rev() {
            let err = if r.offset == 8192 { 5 } else { 0 };
            s.write_all(&nbd::encode_simple_reply(r.cookie, err))
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
    });
    let mut c = fake_connect(addr).expect("negotiate");
    let data = [3u8; 4096];
    let writes = (0..4u64).map(|i| (i * 4096, &data[..]));
    let e = c.write_many(writes, 4).expect_err("EIO in the batch");
    assert!(
        e.to_string().contains("NBD_EIO") && e.to_string().contains("8192"),
        "{e}"
    );
}

/// Appends a fake server's option reply bytes.
type WriteReply = dyn Fn(&mut Vec<u8>) + Send;

/// Proves option replies are bounded and checked: a huge announced length, an
/// option error with its message, an ACK without an export info.
#[test]
fn fake_bad_option_replies() {
    let cases: Vec<(Box<WriteReply>, &str)> = vec![
        (
            Box::new(|out| {
                out.extend_from_slice(&nbd::OPTION_REPLY_MAGIC.to_be_bytes());
                out.extend_from_slice(&nbd::OPT_GO.to_be_bytes());
                out.extend_from_slice(&nbd::REP_INFO.to_be_bytes());
                out.extend_from_slice(&u32::MAX.to_be_bytes());
            }),
            "over the bound",
        ),
        (
            Box::new(|out| {
                nbd::encode_option_reply(nbd::OPT_GO, nbd::REP_ERR_POLICY, b"go away", out)
            }),
            "NBD_REP_ERR_POLICY",
        ),
        (
            Box::new(|out| nbd::encode_option_reply(nbd::OPT_GO, nbd::REP_ACK, &[], out)),
            "without NBD_INFO_EXPORT",
        ),
        (
            Box::new(|out| nbd::encode_option_reply(nbd::OPT_LIST, nbd::REP_ACK, &[], out)),
            "expected NBD_OPT_GO",
        ),
    ];
    for (reply, want) in cases {
        let addr = fake_server(move |mut s| {
            s.write_all(&nbd::encode_greeting()).unwrap();
            let mut buf = [0u8; 4 + nbd::OPTION_HEADER_BYTES];
            s.read_exact(&mut buf).unwrap();
            let mut out = Vec::new();
            reply(&mut out);
            let _ = s.write_all(&out);
            std::thread::sleep(Duration::from_millis(200));
        });
        let e = fake_connect(addr).expect_err("bad option reply accepted");
        let msg = e.to_string();
        assert!(
            msg.contains(want) && msg.contains("disk0"),
            "want {want:?}: {msg}"
        );
    }
}

/// Proves random bytes from a server, in negotiation or after it, give errors and
/// never a panic or a hang (seeded; the seed is in the failure message).
#[test]
fn fake_random_bytes_never_panic() {
    for seed in 0..40u64 {
        let after_negotiation = seed % 2 == 0;
        let addr = fake_server(move |mut s| {
            let mut rng = Rng::new(seed);
            if after_negotiation {
                negotiate(&mut s, 1 << 20);
            } else if seed % 4 == 1 {
                // A valid greeting, then garbage instead of option replies.
                let _ = s.write_all(&nbd::encode_greeting());
            }
            let n = 1 + rng.below(300) as usize;
            let _ = s.write_all(&random_bytes(n, seed));
            std::thread::sleep(Duration::from_millis(100));
        });
        match fake_connect(addr) {
            Err(_) => assert!(!after_negotiation, "seed {seed}: negotiation failed"),
            Ok(mut c) => {
                let mut buf = vec![0u8; 4096];
                assert!(c.read(0, &mut buf).is_err(), "seed {seed}: read succeeded");
                assert!(c.flush().is_err(), "seed {seed}: flush succeeded");
            }
        }
    }
}
