//! The NBD server in-process, driven by a raw client built from `datapath::nbd`, with a
//! recording [`Capture`]: hook order around the backing write, hook failures, bad
//! requests and bad handshakes.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use datapath::nbd::{self, Command, Errno, InfoRequest, OptionHeader, Request};
use process_server::capture::{Capture, WriteData};
use process_server::nbd_server::{Export, Exports, serve};

const DISK_BYTES: u64 = 1 << 20;

#[derive(Debug, PartialEq, Eq)]
enum Event {
    /// disk, offset, len, backing bytes of the range at that moment
    Before(String, u64, u64, Vec<u8>),
    /// disk, offset, data (None = zeros of len), backing bytes at that moment
    After(String, u64, Option<Vec<u8>>, u64, Vec<u8>),
    Flush(String),
}

#[derive(Default)]
struct Recorder {
    path: PathBuf,
    events: Mutex<Vec<Event>>,
    fail_before: AtomicBool,
    fail_after: AtomicBool,
    fail_flush: AtomicBool,
}

impl Recorder {
    fn backing(&self, offset: u64, len: u64) -> Vec<u8> {
        let f = std::fs::File::open(&self.path).unwrap();
        let mut b = vec![0u8; len as usize];
        f.read_exact_at(&mut b, offset).unwrap();
        b
    }

    fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }
}

fn injected(flag: &AtomicBool) -> io::Result<()> {
    if flag.load(Ordering::SeqCst) {
        Err(io::Error::other("injected capture failure"))
    } else {
        Ok(())
    }
}

impl Capture for Recorder {
    fn before_write(&self, disk: &str, offset: u64, len: u64) -> io::Result<()> {
        injected(&self.fail_before)?;
        let snap = self.backing(offset, len);
        self.events
            .lock()
            .unwrap()
            .push(Event::Before(disk.into(), offset, len, snap));
        Ok(())
    }

    fn after_write(&self, disk: &str, offset: u64, data: WriteData<'_>) -> io::Result<()> {
        injected(&self.fail_after)?;
        let (bytes, len) = match data {
            WriteData::Bytes(b) => (Some(b.to_vec()), b.len() as u64),
            WriteData::Zero(n) => (None, n),
        };
        let snap = self.backing(offset, len);
        self.events
            .lock()
            .unwrap()
            .push(Event::After(disk.into(), offset, bytes, len, snap));
        Ok(())
    }

    fn flush(&self, disk: &str) -> io::Result<()> {
        injected(&self.fail_flush)?;
        self.events.lock().unwrap().push(Event::Flush(disk.into()));
        Ok(())
    }
}

struct Harness {
    _rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    addr: SocketAddr,
    rec: Arc<Recorder>,
}

fn start() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk0.img");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.set_len(DISK_BYTES).unwrap();
    let exports = Exports::new(vec![Export {
        id: "disk0".into(),
        group: "g1".into(),
        store: Arc::new(file),
        path: path.clone(),
        size_bytes: DISK_BYTES,
    }]);
    let rec = Arc::new(Recorder {
        path,
        ..Default::default()
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(serve(listener, Arc::new(exports), rec.clone()));
    Harness {
        _rt: rt,
        _dir: dir,
        addr,
        rec,
    }
}

fn connect_raw(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn greet(s: &mut TcpStream) {
    let mut g = [0u8; nbd::GREETING_BYTES];
    s.read_exact(&mut g).unwrap();
    assert_eq!(g, nbd::encode_greeting());
    s.write_all(&(nbd::FLAG_C_FIXED_NEWSTYLE | nbd::FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
}

fn send_option(s: &mut TcpStream, option: u32, data: &[u8]) {
    let h = OptionHeader {
        option,
        data_len: data.len() as u32,
    };
    s.write_all(&h.encode()).unwrap();
    s.write_all(data).unwrap();
}

/// Reads one option reply: (option, reply type, data).
fn read_option_reply(s: &mut TcpStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; nbd::OPTION_REPLY_HEADER_BYTES];
    s.read_exact(&mut h).unwrap();
    assert_eq!(h[0..8], nbd::OPTION_REPLY_MAGIC.to_be_bytes());
    let be = |a: usize| u32::from_be_bytes([h[a], h[a + 1], h[a + 2], h[a + 3]]);
    let mut data = vec![0u8; be(16) as usize];
    s.read_exact(&mut data).unwrap();
    (be(8), be(12), data)
}

/// Sends GO for `name`; returns the final reply type (after any INFO replies).
fn go(s: &mut TcpStream, name: &str) -> u32 {
    let data = nbd::encode_info_request(&InfoRequest {
        name: name.into(),
        info_types: vec![nbd::INFO_BLOCK_SIZE],
    });
    send_option(s, nbd::OPT_GO, &data);
    loop {
        let (opt, ty, _) = read_option_reply(s);
        assert_eq!(opt, nbd::OPT_GO);
        if ty != nbd::REP_INFO {
            return ty;
        }
    }
}

fn open(addr: SocketAddr) -> TcpStream {
    let mut s = connect_raw(addr);
    greet(&mut s);
    assert_eq!(go(&mut s, "disk0"), nbd::REP_ACK);
    s
}

fn send(
    s: &mut TcpStream,
    command: Command,
    flags: u16,
    cookie: u64,
    offset: u64,
    data: &[u8],
    len: u32,
) {
    let r = Request {
        flags,
        command,
        cookie,
        offset,
        len,
    };
    s.write_all(&r.encode()).unwrap();
    if command == Command::Write {
        s.write_all(data).unwrap();
    }
}

/// Reads one simple reply: (error, cookie).
fn reply(s: &mut TcpStream) -> (u32, u64) {
    let mut h = [0u8; nbd::SIMPLE_REPLY_BYTES];
    s.read_exact(&mut h).unwrap();
    nbd::parse_simple_reply(&h).unwrap()
}

fn call(
    s: &mut TcpStream,
    command: Command,
    flags: u16,
    offset: u64,
    data: &[u8],
    len: u32,
) -> u32 {
    send(s, command, flags, 77, offset, data, len);
    let (err, cookie) = reply(s);
    assert_eq!(cookie, 77);
    err
}

fn read_range(s: &mut TcpStream, offset: u64, len: u32) -> Vec<u8> {
    send(s, Command::Read, 0, 5, offset, &[], len);
    let (err, cookie) = reply(s);
    assert_eq!((err, cookie), (0, 5));
    let mut b = vec![0u8; len as usize];
    s.read_exact(&mut b).unwrap();
    b
}

/// Whether the server closed the connection (EOF, or reset).
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

/// Proves before_write runs before the data reaches the backing file, after_write
/// after it (with the exact data, or Zero for TRIM and WRITE_ZEROES), and flush on FLUSH.
#[test]
fn hooks_run_in_order_around_the_backing_write() {
    let h = start();
    let mut s = open(h.addr);
    let data = vec![0xabu8; 4096];
    assert_eq!(
        call(&mut s, Command::Write, nbd::CMD_FLAG_FUA, 8192, &data, 4096),
        0
    );
    assert_eq!(
        h.rec.take(),
        vec![
            Event::Before("disk0".into(), 8192, 4096, vec![0; 4096]),
            Event::After("disk0".into(), 8192, Some(data.clone()), 4096, data.clone()),
        ]
    );
    assert_eq!(read_range(&mut s, 8192, 4096), data);
    assert_eq!(call(&mut s, Command::Trim, 0, 8192, &[], 1024), 0);
    assert_eq!(
        call(
            &mut s,
            Command::WriteZeroes,
            nbd::CMD_FLAG_NO_HOLE,
            9216,
            &[],
            1024
        ),
        0
    );
    assert_eq!(call(&mut s, Command::Flush, 0, 0, &[], 0), 0);
    assert_eq!(
        h.rec.take(),
        vec![
            Event::Before("disk0".into(), 8192, 1024, vec![0xab; 1024]),
            Event::After("disk0".into(), 8192, None, 1024, vec![0; 1024]),
            Event::Before("disk0".into(), 9216, 1024, vec![0xab; 1024]),
            Event::After("disk0".into(), 9216, None, 1024, vec![0; 1024]),
            Event::Flush("disk0".into()),
        ]
    );
    let mut want = vec![0u8; 2048];
    want.extend_from_slice(&[0xab; 2048]);
    assert_eq!(read_range(&mut s, 8192, 4096), want);
    send(&mut s, Command::Disc, 0, 1, 0, &[], 0);
    assert!(closed(&mut s));
}

/// Proves a failing hook fails the request with EIO: before_write failing keeps the
/// data off the backing disk; after_write and flush failing are not acknowledged.
#[test]
fn hook_failures_give_eio() {
    let h = start();
    let mut s = open(h.addr);
    h.rec.fail_before.store(true, Ordering::SeqCst);
    assert_eq!(
        call(&mut s, Command::Write, 0, 0, &[1u8; 512], 512),
        Errno::Io.code()
    );
    assert_eq!(
        call(&mut s, Command::Trim, 0, 0, &[], 512),
        Errno::Io.code()
    );
    assert_eq!(
        h.rec.backing(0, 512),
        vec![0u8; 512],
        "data reached the disk"
    );
    h.rec.fail_before.store(false, Ordering::SeqCst);
    h.rec.fail_after.store(true, Ordering::SeqCst);
    assert_eq!(
        call(&mut s, Command::Write, 0, 0, &[1u8; 512], 512),
        Errno::Io.code()
    );
    h.rec.fail_after.store(false, Ordering::SeqCst);
    h.rec.fail_flush.store(true, Ordering::SeqCst);
    assert_eq!(call(&mut s, Command::Flush, 0, 0, &[], 0), Errno::Io.code());
    h.rec.fail_flush.store(false, Ordering::SeqCst);
    assert_eq!(call(&mut s, Command::Flush, 0, 0, &[], 0), 0);
}

/// Proves out-of-range and unknown requests get their errno without touching the disk
/// or the hooks and the session goes on, while a bad magic drops only that connection.
#[test]
fn bad_requests_get_errno_or_disconnect() {
    let h = start();
    let mut s = open(h.addr);
    let e = call(
        &mut s,
        Command::Write,
        0,
        DISK_BYTES - 512,
        &[7u8; 1024],
        1024,
    );
    assert_eq!(e, Errno::NoSpc.code());
    // Not sector-aligned: below the advertised minimum block size.
    let e = call(&mut s, Command::Write, 0, 256, &[7u8; 512], 512);
    assert_eq!(e, Errno::Inval.code());
    assert_eq!(
        call(&mut s, Command::Read, 0, DISK_BYTES, &[], 1),
        Errno::Inval.code()
    );
    assert_eq!(
        call(&mut s, Command::Trim, 0, u64::MAX, &[], 2),
        Errno::Inval.code()
    );
    assert_eq!(
        call(&mut s, Command::Other(42), 0, 0, &[], 0),
        Errno::Inval.code()
    );
    assert_eq!(
        call(
            &mut s,
            Command::Write,
            nbd::CMD_FLAG_NO_HOLE,
            0,
            &[7u8; 8],
            8
        ),
        Errno::Inval.code()
    );
    assert_eq!(
        call(&mut s, Command::Read, 0, 0, &[], nbd::REQUEST_BYTES_MAX + 1),
        Errno::Inval.code()
    );
    assert!(
        h.rec.take().is_empty(),
        "a refused request reached the hooks"
    );
    assert_eq!(h.rec.backing(DISK_BYTES - 4096, 4096), vec![0u8; 4096]);
    assert_eq!(read_range(&mut s, 0, 16), vec![0u8; 16]);
    let mut bad = Request {
        flags: 0,
        command: Command::Read,
        cookie: 1,
        offset: 0,
        len: 1,
    }
    .encode();
    bad[0] ^= 0xff;
    s.write_all(&bad).unwrap();
    assert!(closed(&mut s));
    let mut s2 = open(h.addr);
    assert_eq!(read_range(&mut s2, 0, 16), vec![0u8; 16]);
}

/// Proves many requests sent without waiting all get answered, cookies matched.
#[test]
fn pipelined_requests_all_answered() {
    let h = start();
    let mut s = open(h.addr);
    let n = 48u64;
    for i in 0..n {
        let data = vec![i as u8; 4096];
        send(&mut s, Command::Write, 0, 1000 + i, i * 4096, &data, 4096);
    }
    let mut cookies: Vec<u64> = (0..n)
        .map(|_| {
            let (err, c) = reply(&mut s);
            assert_eq!(err, 0);
            c
        })
        .collect();
    cookies.sort_unstable();
    assert_eq!(cookies, (1000..1000 + n).collect::<Vec<_>>());
    for i in 0..n {
        assert_eq!(h.rec.backing(i * 4096, 4096), vec![i as u8; 4096]);
    }
}

/// Proves handshake abuse is refused without harming the server: unknown options and
/// STRUCTURED_REPLY get ERR_UNSUP, a bad GO gets ERR_INVALID, an unknown export
/// ERR_UNKNOWN (and the same connection may then GO to a real one); an over-long
/// option, unknown client flags and a truncated greeting drop the connection.
#[test]
fn handshake_abuse() {
    let h = start();
    let mut s = connect_raw(h.addr);
    greet(&mut s);
    send_option(&mut s, 99, b"x");
    assert_eq!(read_option_reply(&mut s).1, nbd::REP_ERR_UNSUP);
    send_option(&mut s, nbd::OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(read_option_reply(&mut s).1, nbd::REP_ERR_UNSUP);
    send_option(&mut s, nbd::OPT_GO, &[0, 0, 0, 9, b'a']);
    assert_eq!(read_option_reply(&mut s).1, nbd::REP_ERR_INVALID);
    send_option(&mut s, nbd::OPT_LIST, b"junk");
    assert_eq!(read_option_reply(&mut s).1, nbd::REP_ERR_INVALID);
    send_option(&mut s, nbd::OPT_LIST, &[]);
    let (_, ty, data) = read_option_reply(&mut s);
    assert_eq!((ty, &data[4..]), (nbd::REP_SERVER, &b"disk0"[..]));
    assert_eq!(read_option_reply(&mut s).1, nbd::REP_ACK);
    assert_eq!(go(&mut s, "nope"), nbd::REP_ERR_UNKNOWN);
    assert_eq!(go(&mut s, "disk0"), nbd::REP_ACK);
    assert_eq!(read_range(&mut s, 0, 8), vec![0u8; 8]);

    let mut s = connect_raw(h.addr);
    greet(&mut s);
    s.write_all(
        &OptionHeader {
            option: nbd::OPT_GO,
            data_len: nbd::OPTION_DATA_BYTES_MAX + 1,
        }
        .encode(),
    )
    .unwrap();
    assert!(closed(&mut s));

    let mut s = connect_raw(h.addr);
    let mut g = [0u8; nbd::GREETING_BYTES];
    s.read_exact(&mut g).unwrap();
    s.write_all(&[0, 0, 0, 0x10]).unwrap();
    assert!(closed(&mut s));

    let mut s = connect_raw(h.addr);
    s.write_all(&[0, 0]).unwrap();
    drop(s);

    let mut s = connect_raw(h.addr);
    greet(&mut s);
    send_option(&mut s, nbd::OPT_ABORT, &[]);
    assert_eq!(read_option_reply(&mut s).1, nbd::REP_ACK);
    assert!(closed(&mut s));

    let mut s = open(h.addr);
    assert_eq!(read_range(&mut s, 0, 8), vec![0u8; 8]);
}
