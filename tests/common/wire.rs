//! Test helpers for the master target's receiver: a config in a tempdir, the real
//! `master-target serve` process, and a small blocking client speaking frames.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use datapath::extent::ExtentData;
use datapath::frame::{
    self, Ack, DataFrameMeta, Encoder, ErrorFrame, Frame, FrameKind, HEADER_BYTES, Hello,
    HelloDisk, HelloGroup, PROTOCOL_VERSION, PointKind, PointRecord, Role,
};
use datapath::journal::{Journal, JournalConfig};
use datapath::storage::RealFs;

/// How long a test client waits for one read before failing the test.
pub const CLIENT_READ_TIMEOUT_MS: u64 = 20_000;

/// Size of every disk the tests configure.
pub const DISK_BYTES: u64 = 1 << 20;

/// A config file in a temporary directory: groups `g1` and `g2`, each with disks
/// `disk0` and `disk1` of [`DISK_BYTES`].
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Setup {
    pub fn new() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("mt.toml");
        let mut text = String::from(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\nplain_tcp_loopback = true\n",
        );
        for g in ["g1", "g2"] {
            // The points these tests make are dated 2023 (see `point_frame`): a window
            // of a century keeps the retention fold from folding them away.
            text.push_str(&format!(
                "[[group]]\nid = \"{g}\"\nretention = \"36500d\"\n"
            ));
            for d in ["disk0", "disk1"] {
                text.push_str(&format!(
                    "[[group.disk]]\nid = \"{d}\"\nsize = \"1MiB\"\nreplica = \"replicas/{g}-{d}.img\"\n"
                ));
            }
        }
        std::fs::write(&config, text).expect("write config");
        Setup { dir, config }
    }

    pub fn journal_dir(&self, group: &str) -> PathBuf {
        self.dir.path().join("data").join(group).join("journal")
    }

    /// Every frame of the group's journal, in seq order (the server must be stopped).
    pub fn journal_frames(&self, group: &str) -> Vec<Vec<u8>> {
        let (j, _) = Journal::open(
            Arc::new(RealFs),
            &self.journal_dir(group),
            group,
            JournalConfig::default(),
        )
        .expect("open journal");
        if j.write_seq() == 0 {
            return Vec::new();
        }
        assert_eq!(j.durable_seq(), j.write_seq());
        j.read(1, j.write_seq())
            .expect("read journal")
            .map(|r| r.expect("journal frame").1)
            .collect()
    }

    /// Runs `master-target ARGS --config FILE` to completion; returns stdout.
    pub fn run_cli(&self, args: &[&str]) -> String {
        let out = Command::new(super::common::bin_path("master-target"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("run master-target");
        assert!(
            out.status.success(),
            "master-target {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }
}

/// A running `master-target serve`; killed (SIGKILL) on drop.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    log: PathBuf,
}

impl Server {
    /// Starts the server and waits until it prints its listening address.
    pub fn start(setup: &Setup) -> Server {
        let log = setup.dir.path().join("serve.log");
        let (child, addr) = super::common::start_master_target(&setup.config, &log, "debug");
        Server { child, addr, log }
    }

    /// kill -9, and wait until the process is gone (its locks are released).
    pub fn kill(mut self) {
        self.child.kill().expect("kill server");
        self.child.wait().expect("wait for server");
    }

    /// The server's log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking test client.
pub struct Client {
    pub s: TcpStream,
}

/// What the next read from the server gave.
#[derive(Debug)]
pub enum Got {
    Frame(Frame),
    /// The server closed (EOF or reset).
    Closed,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_millis(CLIENT_READ_TIMEOUT_MS)))
            .expect("read timeout");
        s.set_nodelay(true).expect("nodelay");
        Client { s }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("send");
    }

    /// Sends, ignoring a failure (the server may already have refused and closed).
    pub fn send_lossy(&mut self, bytes: &[u8]) {
        let _ = self.s.write_all(bytes);
    }

    pub fn shutdown_write(&mut self) {
        let _ = self.s.shutdown(Shutdown::Write);
    }

    /// Reads and decodes the next frame, or reports a close.
    pub fn read(&mut self) -> Got {
        let mut head = [0u8; HEADER_BYTES];
        match self.s.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Got::Closed,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Got::Closed,
            Err(e) => panic!("read from server: {e}"),
        }
        let h = frame::FrameHeader::parse(&head).expect("server frame header");
        let mut f = head.to_vec();
        f.resize(h.frame_len(), 0);
        self.s
            .read_exact(&mut f[HEADER_BYTES..])
            .expect("server frame body");
        let mut dec = frame::Decoder::new();
        Got::Frame(frame::decode(&f, &mut dec).expect("server frame decodes"))
    }

    /// Sends a hello for `groups` (with their disks and sizes) and returns the server's
    /// Hello and the resume Acks, or the Error it answered with.
    pub fn hello(
        &mut self,
        groups: &[(&str, &[(&str, u64)])],
    ) -> Result<(Hello, Vec<Ack>), ErrorFrame> {
        self.hello_as(NODE, groups)
    }

    /// [`Client::hello`] as process server node `node`.
    pub fn hello_as(
        &mut self,
        node: &str,
        groups: &[(&str, &[(&str, u64)])],
    ) -> Result<(Hello, Vec<Ack>), ErrorFrame> {
        self.send(&hello_frame_as(node, 1, PROTOCOL_VERSION, groups));
        let h = match self.read() {
            Got::Frame(Frame::Hello(h)) => h,
            Got::Frame(Frame::Error(e)) => return Err(e),
            other => panic!("expected a Hello, got {other:?}"),
        };
        let mut acks = Vec::new();
        for _ in 0..groups.len() {
            match self.read() {
                Got::Frame(Frame::Ack(a)) => acks.push(a),
                other => panic!("expected an Ack, got {other:?}"),
            }
        }
        Ok((h, acks))
    }

    /// Hello for the standard groups (both disks of [`DISK_BYTES`]); returns the acks.
    pub fn hello_ok(&mut self, groups: &[&str]) -> Vec<Ack> {
        let disks: &[(&str, u64)] = &[("disk0", DISK_BYTES), ("disk1", DISK_BYTES)];
        let spec: Vec<(&str, &[(&str, u64)])> = groups.iter().map(|g| (*g, disks)).collect();
        let (h, acks) = self.hello(&spec).expect("hello accepted");
        assert_eq!(h.role, Role::MasterTarget);
        assert_eq!(h.groups.len(), groups.len());
        acks
    }

    /// Reads acks until `group`'s durable seq reaches `seq`; fails on an Error.
    pub fn wait_ack(&mut self, group: &str, seq: u64) -> u64 {
        loop {
            match self.read() {
                Got::Frame(Frame::Ack(a)) if a.group == group => {
                    assert!(a.durable_seq <= seq, "acked {} beyond {seq}", a.durable_seq);
                    if a.durable_seq == seq {
                        return seq;
                    }
                }
                Got::Frame(Frame::Ack(_)) => {}
                other => panic!("waiting for ack {group}/{seq}, got {other:?}"),
            }
        }
    }

    /// Reads until the server's Error frame (acks before it are skipped) and then its
    /// close; returns the error.
    pub fn expect_error(&mut self) -> ErrorFrame {
        loop {
            match self.read() {
                Got::Frame(Frame::Error(e)) => {
                    assert!(
                        matches!(self.read(), Got::Closed),
                        "the server must close after an Error frame"
                    );
                    return e;
                }
                Got::Frame(Frame::Ack(_)) | Got::Frame(Frame::Hello(_)) => {}
                other => panic!("expected an Error frame, got {other:?}"),
            }
        }
    }
}

/// The node id of the test's process server.
pub const NODE: &str = "ps-test";

/// A hello frame of process server [`NODE`] speaking versions `vmin..=vmax`.
pub fn hello_frame(vmin: u16, vmax: u16, groups: &[(&str, &[(&str, u64)])]) -> Vec<u8> {
    hello_frame_as(NODE, vmin, vmax, groups)
}

/// A hello frame of process server `node`.
pub fn hello_frame_as(
    node: &str,
    vmin: u16,
    vmax: u16,
    groups: &[(&str, &[(&str, u64)])],
) -> Vec<u8> {
    let hello = Hello {
        version_min: vmin,
        version_max: vmax,
        role: Role::ProcessServer,
        node: node.into(),
        groups: groups
            .iter()
            .map(|(g, disks)| HelloGroup {
                id: g.to_string(),
                disks: disks
                    .iter()
                    .map(|(d, size)| HelloDisk {
                        id: d.to_string(),
                        size_bytes: *size,
                    })
                    .collect(),
            })
            .collect(),
    };
    let mut out = Vec::new();
    frame::encode_hello(&hello, &mut out).expect("encode hello");
    out
}

/// Deterministic, somewhat compressible bytes for extent `tag`.
pub fn pattern(tag: u64, len: usize) -> Vec<u8> {
    let mut x = tag.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|i| {
            if i % 64 < 32 {
                (i / 64) as u8 ^ tag as u8
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
        })
        .collect()
}

/// A data frame (zstd level 1): one 8 KiB extent of `disk` at `offset` plus a 4 KiB
/// zero extent after it.
pub fn data_frame(group: &str, disk: &str, epoch: u64, seq: u64, offset: u64) -> Vec<u8> {
    data_frame_with(Encoder::new(1), group, disk, epoch, seq, offset)
}

/// [`data_frame`] built with `enc`.
pub fn data_frame_with(
    mut enc: Encoder,
    group: &str,
    disk: &str,
    epoch: u64,
    seq: u64,
    offset: u64,
) -> Vec<u8> {
    let bytes = pattern(seq, 8192);
    let meta = DataFrameMeta {
        group: group.into(),
        disk: disk.into(),
        epoch,
    };
    let extents = [
        (offset, ExtentData::Bytes(&bytes)),
        (offset + 8192, ExtentData::Zero(4096)),
    ];
    let mut out = Vec::new();
    enc.encode_data(&meta, seq, &extents, &mut out)
        .expect("encode data");
    out
}

/// A crash-consistent point frame sealing `epoch`.
pub fn point_frame(group: &str, point_id: u64, epoch: u64, seq: u64) -> Vec<u8> {
    let p = PointRecord {
        point_id,
        epoch,
        time_unix_ms: 1_700_000_000_000 + point_id * 1000,
        kind: if point_id.is_multiple_of(2) {
            PointKind::App
        } else {
            PointKind::Crash
        },
        consistent: true,
        group: group.into(),
    };
    let mut out = Vec::new();
    frame::encode_point(&p, seq, &mut out);
    out
}

/// The frames of `epochs` epochs of `group` from seq `first_seq` on: per epoch one data
/// frame per disk, then a point (id = epoch). Returns the frames in seq order.
pub fn epochs(group: &str, first_epoch: u64, epochs: u64, first_seq: u64) -> Vec<Vec<u8>> {
    let mut seq = first_seq;
    let mut out = Vec::new();
    for epoch in first_epoch..first_epoch + epochs {
        for disk in ["disk0", "disk1"] {
            out.push(data_frame(group, disk, epoch, seq, epoch * 16384));
            seq += 1;
        }
        out.push(point_frame(group, epoch, epoch, seq));
        seq += 1;
    }
    out
}

/// Recomputes a frame's crc after a test changed its bytes (so only the body check
/// can catch the change).
pub fn reseal(f: &mut [u8]) {
    let mut c = crc32fast::Hasher::new();
    c.update(&f[..28]);
    c.update(&f[HEADER_BYTES..]);
    let crc = c.finalize();
    f[28..32].copy_from_slice(&crc.to_le_bytes());
}

/// The kind byte of a frame, for assertions.
pub fn kind_of(f: &[u8]) -> FrameKind {
    FrameKind::from_u8(f[6]).expect("kind")
}
