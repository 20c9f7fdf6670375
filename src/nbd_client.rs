//! A blocking NBD client: fixed newstyle negotiation with `NBD_OPT_GO`, then simple
//! replies, over one `std::net::TcpStream`.
//!
//! The demo and the throughput benchmark drive write capture with it; the tests use it
//! beside the real clients (qemu-io, nbdcopy). It speaks the subset the process server
//! serves (`datapath::nbd`): no TLS, no structured replies, no extended headers.
//!
//! ## What it sends and expects
//!
//! | step        | client sends                                      | server answers                                   |
//! |-------------|---------------------------------------------------|--------------------------------------------------|
//! | greeting    | -                                                 | `NBDMAGIC`, `IHAVEOPT`, handshake flags (must offer fixed newstyle) |
//! | flags       | `FIXED_NEWSTYLE` (+ `NO_ZEROES` when offered)     | -                                                |
//! | `OPT_GO`    | export name, asking for `INFO_BLOCK_SIZE`         | `REP_INFO`s (`INFO_EXPORT` required), then `REP_ACK`; or a `REP_ERR_*` |
//! | request     | 28-byte header (+ data for `WRITE`)               | 16-byte simple reply (+ data for a good `READ`)  |
//! | `CMD_DISC`  | header                                            | nothing; the server closes                       |
//!
//! ## Trust
//!
//! Every byte from the server is checked before it is used: magics, the option each
//! reply answers, reply lengths against [`OPTION_REPLY_DATA_BYTES_MAX`] before
//! anything is allocated, the sizes of info payloads, that a reply's cookie belongs to
//! a request in flight. A violation is an [`io::Error`] of kind `InvalidData` naming the
//! server and the field, and the connection is not used again (its stream position is
//! unknown). An error reply to a request (`NBD_EINVAL`, ...) is an `io::Error` naming
//! the errno, the command and the range; the connection stays usable.
//!
//! Pipelining: [`NbdClient::write_many`] keeps up to `depth` writes in flight (at most
//! [`IN_FLIGHT_MAX`]) and matches replies by cookie, in whatever order they come.
//! Only writes are pipelined: their replies are 16 bytes each, so a client that sends
//! before it reads can never fill its own receive buffer and deadlock with the server.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use datapath::nbd::{
    self, CMD_FLAG_FUA, Command, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE,
    FLAG_HAS_FLAGS, FLAG_NO_ZEROES, FLAG_READ_ONLY, FLAG_SEND_FLUSH, FLAG_SEND_FUA, FLAG_SEND_TRIM,
    FLAG_SEND_WRITE_ZEROES, GREETING_BYTES, IHAVEOPT, INFO_BLOCK_SIZE, INFO_EXPORT, InfoRequest,
    NBDMAGIC, OPT_GO, OPTION_REPLY_HEADER_BYTES, OPTION_REPLY_MAGIC, OptionHeader, REP_ACK,
    REP_INFO, REQUEST_BYTES_MAX, Request, SIMPLE_REPLY_BYTES,
};

/// Error bit of an option reply type (the spec's `NBD_REP_FLAG_ERROR`).
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option reply error: extended headers required (spec value; the server's codec does
/// not define it because it never sends it).
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;
/// The second word of an oldstyle greeting, recognised only to name it in the error.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Longest export name the spec allows (strings are capped at 4096 bytes).
pub const EXPORT_NAME_BYTES_MAX: usize = 4096;
/// Largest option reply data accepted, checked before allocating: an info item is at
/// most a 4096-byte string plus its type, an error message is text for people.
pub const OPTION_REPLY_DATA_BYTES_MAX: u32 = 16 << 10;
/// Option replies accepted in answer to one `OPT_GO` before giving up on the server.
pub const OPTION_REPLIES_MAX: usize = 64;
/// Requests one pipelined call keeps in flight at most.
pub const IN_FLIGHT_MAX: usize = 256;
/// Length of one `TRIM` / `WRITE_ZEROES` request when a longer range is split.
pub const ZERO_REQUEST_BYTES_MAX: u64 = 1 << 30;
/// Time a blocking read or write on the socket may take by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// What the server told about the export during negotiation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// The export name asked for.
    pub name: String,
    pub size_bytes: u64,
    /// Transmission flags (`FLAG_*` of `datapath::nbd`).
    pub flags: u16,
    /// Minimum block size: writes, trims and write-zeroes must be aligned to it (1
    /// when the server did not say).
    pub block_min_bytes: u32,
    /// Preferred block size (4096 when the server did not say).
    pub block_preferred_bytes: u32,
    /// Largest payload of one request; longer reads and writes are split.
    pub payload_max_bytes: u32,
}

impl ExportInfo {
    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// The name of an NBD error value (the spec's `NBD_E*`).
pub fn errno_name(code: u32) -> &'static str {
    use nbd::Errno;
    match code {
        c if c == Errno::Perm.code() => "NBD_EPERM",
        c if c == Errno::Io.code() => "NBD_EIO",
        c if c == Errno::NoMem.code() => "NBD_ENOMEM",
        c if c == Errno::Inval.code() => "NBD_EINVAL",
        c if c == Errno::NoSpc.code() => "NBD_ENOSPC",
        c if c == Errno::Overflow.code() => "NBD_EOVERFLOW",
        c if c == Errno::NotSup.code() => "NBD_ENOTSUP",
        c if c == Errno::Shutdown.code() => "NBD_ESHUTDOWN",
        _ => "unknown NBD error",
    }
}

fn errno_kind(code: u32) -> io::ErrorKind {
    use nbd::Errno;
    match code {
        c if c == Errno::Perm.code() => io::ErrorKind::PermissionDenied,
        c if c == Errno::Inval.code() => io::ErrorKind::InvalidInput,
        c if c == Errno::NoSpc.code() => io::ErrorKind::StorageFull,
        c if c == Errno::NotSup.code() => io::ErrorKind::Unsupported,
        c if c == Errno::NoMem.code() => io::ErrorKind::OutOfMemory,
        _ => io::ErrorKind::Other,
    }
}

/// The name of an option reply error (the spec's `NBD_REP_ERR_*`).
pub fn rep_err_name(reply_type: u32) -> &'static str {
    match reply_type {
        nbd::REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        nbd::REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        nbd::REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        nbd::REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        nbd::REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        nbd::REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        nbd::REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        nbd::REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        nbd::REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        REP_ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD",
        _ => "unknown NBD_REP_ERR",
    }
}

fn rep_err_kind(reply_type: u32) -> io::ErrorKind {
    match reply_type {
        nbd::REP_ERR_UNKNOWN => io::ErrorKind::NotFound,
        nbd::REP_ERR_POLICY | nbd::REP_ERR_TLS_REQD => io::ErrorKind::PermissionDenied,
        nbd::REP_ERR_UNSUP | nbd::REP_ERR_PLATFORM | REP_ERR_EXT_HEADER_REQD => {
            io::ErrorKind::Unsupported
        }
        _ => io::ErrorKind::Other,
    }
}

/// One request waiting for its reply.
#[derive(Clone, Copy, Debug)]
struct Pending {
    command: Command,
    offset: u64,
    len: u32,
}

/// A connection to one export, in transmission phase.
pub struct NbdClient {
    peer: SocketAddr,
    info: ExportInfo,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    next_cookie: u64,
    in_flight: HashMap<u64, Pending>,
    /// Set when the stream can no longer be trusted (a protocol violation or an I/O
    /// error in the middle of a message); every later call fails with it.
    broken: Option<String>,
    disconnected: bool,
}

impl fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdClient")
            .field("peer", &self.peer)
            .field("info", &self.info)
            .field("in_flight", &self.in_flight.len())
            .field("broken", &self.broken)
            .finish()
    }
}

fn read_array<const N: usize>(r: &mut impl Read) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// What the option replies to `OPT_GO` told so far.
#[derive(Default)]
struct GoReplies {
    export: Option<(u64, u16)>,
    block: Option<(u32, u32, u32)>,
}

impl NbdClient {
    /// Connects to `addr`, negotiates `export` with `NBD_OPT_GO` and enters
    /// transmission. Socket reads and writes time out after [`DEFAULT_TIMEOUT`].
    pub fn connect(addr: impl ToSocketAddrs, export: &str) -> io::Result<Self> {
        Self::connect_timeout(addr, export, DEFAULT_TIMEOUT)
    }

    /// Like [`NbdClient::connect`] with a timeout for the connect and for every
    /// blocking read or write on the socket.
    pub fn connect_timeout(
        addr: impl ToSocketAddrs,
        export: &str,
        timeout: Duration,
    ) -> io::Result<Self> {
        let mut last = None;
        for a in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => return Self::handshake(s, a, export, timeout),
                Err(e) => last = Some(io::Error::new(e.kind(), format!("connect to {a}: {e}"))),
            }
        }
        Err(last.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "no address to connect to")
        }))
    }

    fn handshake(
        stream: TcpStream,
        peer: SocketAddr,
        export: &str,
        timeout: Duration,
    ) -> io::Result<Self> {
        let ctx = |e: io::Error| {
            io::Error::new(
                e.kind(),
                format!("NBD server {peer}, export {export:?}: negotiation: {e}"),
            )
        };
        if export.len() > EXPORT_NAME_BYTES_MAX {
            return Err(ctx(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "export name of {} bytes, the protocol allows {EXPORT_NAME_BYTES_MAX}",
                    export.len()
                ),
            )));
        }
        stream.set_nodelay(true).map_err(ctx)?;
        stream.set_read_timeout(Some(timeout)).map_err(ctx)?;
        stream.set_write_timeout(Some(timeout)).map_err(ctx)?;
        let mut writer = stream.try_clone().map_err(ctx)?;
        let mut reader = BufReader::new(stream);
        let info = negotiate(&mut reader, &mut writer, export).map_err(ctx)?;
        Ok(Self {
            peer,
            info,
            reader,
            writer,
            next_cookie: 1,
            in_flight: HashMap::new(),
            broken: None,
            disconnected: false,
        })
    }

    /// What the server told about the export.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// The export's size.
    pub fn size_bytes(&self) -> u64 {
        self.info.size_bytes
    }

    /// The server's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    fn error(&self, kind: io::ErrorKind, msg: impl fmt::Display) -> io::Error {
        io::Error::new(
            kind,
            format!(
                "NBD server {}, export {:?}: {msg}",
                self.peer, self.info.name
            ),
        )
    }

    /// Marks the connection unusable after a raw I/O error and returns the error,
    /// naming the server.
    fn break_with(&mut self, e: io::Error) -> io::Error {
        let e = if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut {
            self.error(io::ErrorKind::TimedOut, format!("no answer in time ({e})"))
        } else {
            self.error(e.kind(), e)
        };
        self.fail(e)
    }

    /// Marks the connection unusable because of `e` (already naming the server).
    fn fail(&mut self, e: io::Error) -> io::Error {
        self.broken = Some(e.to_string());
        e
    }

    fn check_usable(&self) -> io::Result<()> {
        if let Some(why) = &self.broken {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!("connection unusable after an earlier error: {why}"),
            ));
        }
        if self.disconnected {
            return Err(self.error(io::ErrorKind::NotConnected, "already disconnected"));
        }
        Ok(())
    }

    fn require(&self, flag: u16, what: &str) -> io::Result<()> {
        if flag != FLAG_READ_ONLY && !self.info.has(flag) {
            return Err(self.error(
                io::ErrorKind::Unsupported,
                format!("the export does not support {what}"),
            ));
        }
        if flag == FLAG_READ_ONLY && self.info.has(FLAG_READ_ONLY) {
            return Err(self.error(
                io::ErrorKind::PermissionDenied,
                format!("the export is read-only: no {what}"),
            ));
        }
        Ok(())
    }

    /// Sends one request header (and its payload); the cookie is remembered.
    fn send(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        len: u32,
        data: Option<&[u8]>,
    ) -> io::Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1).max(1);
        let header = Request {
            flags,
            command,
            cookie,
            offset,
            len,
        }
        .encode();
        let sent = self
            .writer
            .write_all(&header)
            .and_then(|()| data.map_or(Ok(()), |d| self.writer.write_all(d)));
        if let Err(e) = sent {
            return Err(self.break_with(e));
        }
        if command != Command::Disc {
            self.in_flight.insert(
                cookie,
                Pending {
                    command,
                    offset,
                    len,
                },
            );
        }
        Ok(cookie)
    }

    /// Reads one simple reply. `read_buf` receives the data of a good `READ` reply;
    /// it must be the buffer of that read (the caller knows which cookie it waits
    /// for). Returns the request it answers and its error value (0: success).
    fn receive(&mut self, read_buf: Option<&mut [u8]>) -> io::Result<(Pending, u32)> {
        let header: [u8; SIMPLE_REPLY_BYTES] = match read_array(&mut self.reader) {
            Ok(h) => h,
            Err(e) => {
                let e = if e.kind() == io::ErrorKind::UnexpectedEof {
                    io::Error::new(e.kind(), "connection closed (or reply truncated)")
                } else {
                    e
                };
                return Err(self.break_with(e));
            }
        };
        let (error, cookie) = match nbd::parse_simple_reply(&header) {
            Ok(r) => r,
            Err(e) => {
                let e = self.error(io::ErrorKind::InvalidData, format!("bad reply: {e}"));
                return Err(self.fail(e));
            }
        };
        let Some(p) = self.in_flight.remove(&cookie) else {
            let e = self.error(
                io::ErrorKind::InvalidData,
                format!("reply with cookie {cookie:#x}, which no request in flight has"),
            );
            return Err(self.fail(e));
        };
        if p.command == Command::Read && error == 0 {
            let Some(buf) = read_buf else {
                let e = self.error(
                    io::ErrorKind::InvalidData,
                    "read data for a request this call did not send",
                );
                return Err(self.fail(e));
            };
            if buf.len() != p.len as usize {
                let e = self.error(io::ErrorKind::InvalidData, "read reply out of order");
                return Err(self.fail(e));
            }
            if let Err(e) = self.reader.read_exact(buf) {
                return Err(self.break_with(e));
            }
        }
        Ok((p, error))
    }

    fn reply_error(&self, p: Pending, error: u32) -> io::Error {
        self.error(
            errno_kind(error),
            format!(
                "{:?} of {} bytes at offset {} failed: {} ({error})",
                p.command,
                p.len,
                p.offset,
                errno_name(error)
            ),
        )
    }

    /// Sends one request and waits for its reply.
    fn round_trip(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        len: u32,
        data: Option<&[u8]>,
        read_buf: Option<&mut [u8]>,
    ) -> io::Result<()> {
        self.check_usable()?;
        self.send(command, flags, offset, len, data)?;
        let (p, error) = self.receive(read_buf)?;
        if error != 0 {
            return Err(self.reply_error(p, error));
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset.checked_add(len).is_none() {
            return Err(self.error(
                io::ErrorKind::InvalidInput,
                format!("range {offset}+{len} overflows"),
            ));
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` (split into requests of at most the
    /// server's maximum payload).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let max = self.info.payload_max_bytes as usize;
        let mut at = offset;
        for chunk in buf.chunks_mut(max) {
            let len = chunk.len() as u32;
            self.round_trip(Command::Read, 0, at, len, None, Some(chunk))?;
            at += u64::from(len);
        }
        Ok(())
    }

    /// Writes `data` at `offset`; with `fua` the server makes it durable before it
    /// answers.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.require(FLAG_READ_ONLY, "writes")?;
        let flags = self.fua_flag(fua)?;
        self.check_range(offset, data.len() as u64)?;
        let max = self.info.payload_max_bytes as usize;
        let mut at = offset;
        for chunk in data.chunks(max) {
            let len = chunk.len() as u32;
            self.round_trip(Command::Write, flags, at, len, Some(chunk), None)?;
            at += u64::from(len);
        }
        Ok(())
    }

    fn fua_flag(&self, fua: bool) -> io::Result<u16> {
        if fua {
            self.require(FLAG_SEND_FUA, "FUA")?;
            Ok(CMD_FLAG_FUA)
        } else {
            Ok(0)
        }
    }

    fn zero_range(&mut self, command: Command, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(ZERO_REQUEST_BYTES_MAX) as u32;
            self.round_trip(command, 0, at, n, None, None)?;
            at += u64::from(n);
        }
        Ok(())
    }

    /// Writes `len` zero bytes at `offset` (`NBD_CMD_WRITE_ZEROES`).
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.require(FLAG_READ_ONLY, "write-zeroes")?;
        self.require(FLAG_SEND_WRITE_ZEROES, "write-zeroes")?;
        self.zero_range(Command::WriteZeroes, offset, len)
    }

    /// Discards `len` bytes at `offset` (`NBD_CMD_TRIM`; the process server zeroes them).
    pub fn trim(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.require(FLAG_READ_ONLY, "trim")?;
        self.require(FLAG_SEND_TRIM, "trim")?;
        self.zero_range(Command::Trim, offset, len)
    }

    /// Makes every write the server has answered durable (`NBD_CMD_FLUSH`).
    pub fn flush(&mut self) -> io::Result<()> {
        self.require(FLAG_SEND_FLUSH, "flush")?;
        self.round_trip(Command::Flush, 0, 0, 0, None, None)
    }

    /// Writes every `(offset, data)` of `writes` in order of sending, keeping up to
    /// `depth` requests (clamped to `1..=IN_FLIGHT_MAX`) in flight on this connection;
    /// data longer than the maximum payload is split. Replies are matched by cookie.
    /// After the first error reply no new write is sent, those in flight are still
    /// answered, and that first error is returned. Returns the number of requests.
    ///
    /// Writes in flight together may be applied in any order, so overlapping ranges
    /// in one call leave either's data where they overlap.
    pub fn write_many<I, D>(&mut self, writes: I, depth: usize) -> io::Result<u64>
    where
        I: IntoIterator<Item = (u64, D)>,
        D: AsRef<[u8]>,
    {
        self.check_usable()?;
        self.require(FLAG_READ_ONLY, "writes")?;
        let depth = depth.clamp(1, IN_FLIGHT_MAX);
        let max = self.info.payload_max_bytes as usize;
        let mut writes = writes.into_iter();
        // The item being sent and how far into it.
        let mut current: Option<(u64, D, usize)> = None;
        let mut first_error = None;
        let mut requests = 0u64;
        loop {
            while first_error.is_none() && self.in_flight.len() < depth {
                if current.is_none() {
                    current = writes.next().map(|(o, d)| (o, d, 0));
                }
                let Some((offset, data, done)) = current.take() else {
                    break;
                };
                let bytes = data.as_ref();
                if let Err(e) = self.check_range(offset, bytes.len() as u64) {
                    first_error = Some(e);
                    break;
                }
                let n = (bytes.len() - done).min(max);
                if n > 0 {
                    let at = offset + done as u64;
                    let chunk = &bytes[done..done + n];
                    self.send(Command::Write, 0, at, n as u32, Some(chunk))?;
                    requests += 1;
                }
                if done + n < bytes.len() {
                    current = Some((offset, data, done + n));
                }
            }
            if self.in_flight.is_empty() {
                break;
            }
            let (p, error) = self.receive(None)?;
            if error != 0 && first_error.is_none() {
                first_error = Some(self.reply_error(p, error));
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(requests),
        }
    }

    /// Ends the session with `NBD_CMD_DISC` (the server answers nothing and closes).
    pub fn disconnect(mut self) -> io::Result<()> {
        self.check_usable()?;
        self.disconnect_inner()
    }

    fn disconnect_inner(&mut self) -> io::Result<()> {
        self.disconnected = true;
        let header = Request {
            flags: 0,
            command: Command::Disc,
            cookie: 0,
            offset: 0,
            len: 0,
        }
        .encode();
        self.writer
            .write_all(&header)
            .map_err(|e| self.error(e.kind(), format!("send disconnect: {e}")))?;
        // The server may already have closed; that is what was asked for.
        let _ = self.writer.shutdown(Shutdown::Write);
        Ok(())
    }
}

impl Drop for NbdClient {
    /// A client dropped without [`NbdClient::disconnect`] still says goodbye when the
    /// stream is in a known state, so the server logs a clean end.
    fn drop(&mut self) {
        if self.broken.is_none() && !self.disconnected && self.in_flight.is_empty() {
            let _ = self.disconnect_inner();
        }
    }
}

/// The handshake up to transmission: greeting, client flags, `OPT_GO` and its replies.
fn negotiate(
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
    export: &str,
) -> io::Result<ExportInfo> {
    let bad = |msg: String| io::Error::new(io::ErrorKind::InvalidData, msg);
    let greeting: [u8; GREETING_BYTES] = read_array(reader)?;
    let magic = be_u64(&greeting, 0);
    if magic != NBDMAGIC {
        return Err(bad(format!(
            "bad greeting magic {magic:#018x} (not an NBD server?)"
        )));
    }
    let second = be_u64(&greeting, 8);
    if second == OLDSTYLE_MAGIC {
        return Err(bad("the server speaks oldstyle negotiation only".into()));
    }
    if second != IHAVEOPT {
        return Err(bad(format!("bad greeting option magic {second:#018x}")));
    }
    let hflags = be_u16(&greeting, 16);
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(bad(format!(
            "the server does not offer fixed newstyle negotiation (handshake flags {hflags:#x})"
        )));
    }
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if hflags & FLAG_NO_ZEROES != 0 {
        cflags |= FLAG_C_NO_ZEROES;
    }
    let data = nbd::encode_info_request(&InfoRequest {
        name: export.to_owned(),
        info_types: vec![INFO_BLOCK_SIZE],
    });
    let mut out = Vec::with_capacity(4 + nbd::OPTION_HEADER_BYTES + data.len());
    out.extend_from_slice(&cflags.to_be_bytes());
    out.extend_from_slice(
        &OptionHeader {
            option: OPT_GO,
            data_len: data.len() as u32,
        }
        .encode(),
    );
    out.extend_from_slice(&data);
    writer.write_all(&out)?;

    let mut got = GoReplies::default();
    for _ in 0..OPTION_REPLIES_MAX {
        let h: [u8; OPTION_REPLY_HEADER_BYTES] = read_array(reader)?;
        let magic = be_u64(&h, 0);
        if magic != OPTION_REPLY_MAGIC {
            return Err(bad(format!("bad option reply magic {magic:#018x}")));
        }
        let option = be_u32(&h, 8);
        if option != OPT_GO {
            return Err(bad(format!(
                "option reply for option {option}, expected NBD_OPT_GO ({OPT_GO})"
            )));
        }
        let reply_type = be_u32(&h, 12);
        let len = be_u32(&h, 16);
        if len > OPTION_REPLY_DATA_BYTES_MAX {
            return Err(bad(format!(
                "option reply {reply_type:#x} announces {len} bytes, over the bound {OPTION_REPLY_DATA_BYTES_MAX}"
            )));
        }
        let mut data = vec![0u8; len as usize];
        reader.read_exact(&mut data)?;
        match reply_type {
            REP_ACK => {
                let Some((size_bytes, flags)) = got.export else {
                    return Err(bad(
                        "NBD_REP_ACK to NBD_OPT_GO without NBD_INFO_EXPORT before it".into(),
                    ));
                };
                let (block_min_bytes, block_preferred_bytes, payload_max_bytes) =
                    got.block.unwrap_or((1, 4096, REQUEST_BYTES_MAX));
                return Ok(ExportInfo {
                    name: export.to_owned(),
                    size_bytes,
                    flags,
                    block_min_bytes,
                    block_preferred_bytes,
                    // Never more than the spec's default maximum, whatever was said (a
                    // simple reply cannot carry more safely), and a multiple of the
                    // minimum so that split requests stay aligned.
                    payload_max_bytes: payload_max_bytes.min(REQUEST_BYTES_MAX) / block_min_bytes
                        * block_min_bytes,
                });
            }
            REP_INFO => info_reply(&data, &mut got)?,
            t if t & REP_FLAG_ERROR != 0 => {
                let text = String::from_utf8_lossy(&data);
                return Err(io::Error::new(
                    rep_err_kind(t),
                    format!(
                        "the server refused export {export:?}: {} ({t:#x}){}",
                        rep_err_name(t),
                        if text.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", text.trim())
                        }
                    ),
                ));
            }
            other => {
                return Err(bad(format!(
                    "unexpected option reply type {other:#x} to NBD_OPT_GO"
                )));
            }
        }
    }
    Err(bad(format!(
        "more than {OPTION_REPLIES_MAX} option replies to NBD_OPT_GO without an ACK"
    )))
}

/// Takes in one `NBD_REP_INFO` item; unknown info types are ignored, as the spec asks.
fn info_reply(data: &[u8], got: &mut GoReplies) -> io::Result<()> {
    let bad = |msg: String| io::Error::new(io::ErrorKind::InvalidData, msg);
    if data.len() < 2 {
        return Err(bad(format!(
            "NBD_REP_INFO of {} bytes, need at least 2",
            data.len()
        )));
    }
    match be_u16(data, 0) {
        INFO_EXPORT => {
            if data.len() != 12 {
                return Err(bad(format!(
                    "NBD_INFO_EXPORT of {} bytes, expected 12",
                    data.len()
                )));
            }
            let flags = be_u16(data, 10);
            if flags & FLAG_HAS_FLAGS == 0 {
                return Err(bad(format!(
                    "transmission flags {flags:#x} lack NBD_FLAG_HAS_FLAGS"
                )));
            }
            got.export = Some((be_u64(data, 2), flags));
        }
        INFO_BLOCK_SIZE => {
            if data.len() != 14 {
                return Err(bad(format!(
                    "NBD_INFO_BLOCK_SIZE of {} bytes, expected 14",
                    data.len()
                )));
            }
            let (min, pref, max) = (be_u32(data, 2), be_u32(data, 6), be_u32(data, 10));
            if !min.is_power_of_two() || min > 64 << 10 || pref < min || max < min {
                return Err(bad(format!(
                    "NBD_INFO_BLOCK_SIZE minimum {min}, preferred {pref}, maximum {max} is not valid"
                )));
            }
            got.block = Some((min, pref, max));
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Proves every errno and option error of the spec has its name.
    #[test]
    fn names() {
        assert_eq!(errno_name(22), "NBD_EINVAL");
        assert_eq!(errno_name(108), "NBD_ESHUTDOWN");
        assert_eq!(errno_name(7), "unknown NBD error");
        assert_eq!(rep_err_name(nbd::REP_ERR_UNKNOWN), "NBD_REP_ERR_UNKNOWN");
        assert_eq!(rep_err_name(0x8000_000a), "NBD_REP_ERR_EXT_HEADER_REQD");
        assert_eq!(REP_ERR_EXT_HEADER_REQD & !REP_FLAG_ERROR, 10);
        assert_eq!(nbd::REP_ERR_UNKNOWN & REP_FLAG_ERROR, REP_FLAG_ERROR);
    }

    /// Proves info items are bounds-checked: wrong lengths and invalid block sizes are
    /// errors, unknown types are ignored, and no length panics.
    #[test]
    fn info_items() {
        let mut got = GoReplies::default();
        let mut export = vec![0, 0];
        export.extend_from_slice(&(1u64 << 20).to_be_bytes());
        export.extend_from_slice(&FLAG_HAS_FLAGS.to_be_bytes());
        info_reply(&export, &mut got).unwrap();
        assert_eq!(got.export, Some((1 << 20, FLAG_HAS_FLAGS)));
        assert!(info_reply(&export[..11], &mut got).is_err());
        let mut no_flags = export.clone();
        no_flags[11] = 0;
        assert!(info_reply(&no_flags, &mut got).is_err());
        let mut block = vec![0, 3];
        for v in [512u32, 4096, 1 << 25] {
            block.extend_from_slice(&v.to_be_bytes());
        }
        info_reply(&block, &mut got).unwrap();
        assert_eq!(got.block, Some((512, 4096, 1 << 25)));
        block[5] = 3; // minimum 515: not a power of two
        assert!(info_reply(&block, &mut got).is_err());
        info_reply(&[0, 9, 1, 2, 3], &mut got).unwrap();
        for n in 0..20 {
            let _ = info_reply(&vec![0u8; n], &mut got);
        }
    }
}
