//! The NBD server of write capture: every protected disk is an export named by its id;
//! writes go through the [`Capture`] hook and on to the backing file or device.
//!
//! One task per connection reads requests; each request runs on the blocking pool
//! (positional I/O through the export's [`BlockStore`], so the runtime never waits on a
//! disk), and one writer task per connection sends replies as requests finish, in any
//! order (the cookie matches them). Bounds per connection: [`REQUESTS_IN_FLIGHT_MAX`]
//! requests and [`IN_FLIGHT_BYTES_MAX`] bytes of payload, and
//! [`SERVER_IN_FLIGHT_BYTES_MAX`] for all connections together; the handshake must
//! finish within [`HANDSHAKE_TIMEOUT`]; at most [`CONNECTIONS_MAX`] connections at once.
//!
//! Many connections may share an export (`CAN_MULTI_CONN`): they write one shared file
//! with no cache of ours, so a FLUSH (`fdatasync`) on any connection makes every write
//! acked on any connection durable.
//!
//! Bad input: a protocol violation that leaves the stream unreadable (bad magic,
//! unknown client flags, an option or a write over its bound, a truncated handshake,
//! an unknown `EXPORT_NAME`) is logged with the peer and the connection is dropped; a
//! bad but well-framed request gets its errno (EINVAL, ENOSPC) and the session goes on.
//! Other connections never notice.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use datapath::nbd::{self, Command, Errno, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::{debug, error, info, warn};

use crate::capture::{Capture, WriteData};

/// Requests of one connection being served at once (more wait in the socket).
pub const REQUESTS_IN_FLIGHT_MAX: usize = 64;
/// Payload bytes (read buffers and write data) of one connection held at once; at
/// least one request of the largest size must fit.
pub const IN_FLIGHT_BYTES_MAX: u32 = 2 * nbd::REQUEST_BYTES_MAX;
/// Connections served at once; more wait in the listen backlog.
pub const CONNECTIONS_MAX: usize = 256;
/// Time a client has from connecting to entering transmission.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Size of the zero buffer TRIM and WRITE_ZEROES write with.
const ZERO_CHUNK_BYTES: usize = 1 << 20;
/// Read buffer of a connection's request stream.
const SOCKET_BUFFER_BYTES: usize = 256 << 10;

/// Payload bytes held at once by all connections together: with this, memory stays
/// bounded however many clients connect (each connection also keeps to its own
/// [`IN_FLIGHT_BYTES_MAX`], so one client cannot take the whole budget).
pub const SERVER_IN_FLIGHT_BYTES_MAX: u32 = 256 << 20;

const _: () = assert!(IN_FLIGHT_BYTES_MAX >= nbd::REQUEST_BYTES_MAX);
const _: () = assert!(SERVER_IN_FLIGHT_BYTES_MAX >= IN_FLIGHT_BYTES_MAX);

static ZEROS: [u8; ZERO_CHUNK_BYTES] = [0u8; ZERO_CHUNK_BYTES];

/// What an export's requests read and write: the backing file or device of a protected
/// disk, or on the master target a recovery point with a throwaway overlay (test
/// failover). Called from blocking threads, concurrently.
pub trait BlockStore: Send + Sync + std::fmt::Debug {
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `data` at `offset`.
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every write before it durable.
    fn sync(&self) -> io::Result<()>;
    /// Writes `len` zero bytes at `offset` (TRIM is served the same way, so a trimmed
    /// range reads back as zeros and the replica can be told exactly what the disk holds).
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK_BYTES as u64) as usize;
            self.write_at(&ZEROS[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

impl BlockStore for std::fs::File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(data, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }
}

/// One protected disk as an export.
#[derive(Debug)]
pub struct Export {
    /// Disk id = export name.
    pub id: String,
    /// The disk's consistency group.
    pub group: String,
    /// Where its bytes are.
    pub store: Arc<dyn BlockStore>,
    /// The backing file or device.
    pub path: std::path::PathBuf,
    pub size_bytes: u64,
}

/// Every export of the server, in config order.
#[derive(Debug, Default)]
pub struct Exports {
    list: Vec<Arc<Export>>,
}

impl Exports {
    pub fn new(list: Vec<Export>) -> Self {
        Self {
            list: list.into_iter().map(Arc::new).collect(),
        }
    }

    /// Opens every disk of `config` (creating missing files).
    pub fn open(config: &crate::config::Config) -> anyhow::Result<Self> {
        let mut list = Vec::new();
        for g in &config.groups {
            for d in &g.disks {
                let (file, size_bytes) = d.open()?;
                list.push(Export {
                    id: d.id.clone(),
                    group: g.id.clone(),
                    store: Arc::new(file),
                    path: d.path.clone(),
                    size_bytes,
                });
            }
        }
        Ok(Self::new(list))
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Export>> {
        self.list.iter().find(|e| e.id == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.list.iter()
    }
}

/// Serves NBD on `listener` until the task is dropped. Connections already open are
/// tasks of their own and go on until their clients leave (the process ends them).
pub async fn serve(
    listener: TcpListener,
    exports: Arc<Exports>,
    capture: Arc<dyn Capture>,
) -> io::Result<()> {
    accept_loop(listener, exports, capture, None).await
}

/// Like [`serve`], but every connection belongs to the returned future: dropping it
/// closes the listener and aborts every connection too. For an export that ends while
/// the process goes on (the master target's test failover, whose overlay and pinned
/// point go away with it).
pub async fn serve_owned(
    listener: TcpListener,
    exports: Arc<Exports>,
    capture: Arc<dyn Capture>,
) -> io::Result<()> {
    let mut owned = tokio::task::JoinSet::new();
    accept_loop(listener, exports, capture, Some(&mut owned)).await
}

/// Accepts connections and spawns a task for each: detached, or into `owned`.
async fn accept_loop(
    listener: TcpListener,
    exports: Arc<Exports>,
    capture: Arc<dyn Capture>,
    mut owned: Option<&mut tokio::task::JoinSet<()>>,
) -> io::Result<()> {
    let connections = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let budget = Arc::new(Semaphore::new(SERVER_IN_FLIGHT_BYTES_MAX as usize));
    loop {
        let permit = connections
            .clone()
            .acquire_owned()
            .await
            .map_err(io::Error::other)?;
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Per-connection failures (EMFILE, ECONNABORTED) must not stop the server.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let exports = exports.clone();
        let capture = capture.clone();
        let budget = budget.clone();
        let conn = async move {
            let _permit = permit;
            match handle_connection(stream, peer, exports, capture, budget).await {
                Ok(()) => debug!(%peer, "connection closed"),
                Err(e) => warn!(%peer, error = %e, "connection dropped"),
            }
        };
        match owned.as_deref_mut() {
            Some(set) => {
                // Reap the connections that ended, so the set stays as small as the
                // connections that are open.
                while set.try_join_next().is_some() {}
                set.spawn(conn);
            }
            None => {
                tokio::spawn(conn);
            }
        }
    }
}

/// Why a connection ended early.
#[derive(Debug)]
enum ConnError {
    Io(io::Error),
    Protocol(String),
}

impl std::fmt::Display for ConnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                write!(f, "client closed the connection mid-message")
            }
            Self::Io(e) => write!(f, "i/o: {e}"),
            Self::Protocol(s) => write!(f, "protocol violation: {s}"),
        }
    }
}

impl From<io::Error> for ConnError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl From<nbd::NbdError> for ConnError {
    fn from(e: nbd::NbdError) -> Self {
        Self::Protocol(e.to_string())
    }
}

async fn handle_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    exports: Arc<Exports>,
    capture: Arc<dyn Capture>,
    budget: Arc<Semaphore>,
) -> Result<(), ConnError> {
    stream.set_nodelay(true)?;
    debug!(%peer, "connected");
    let export =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut stream, peer, &exports)).await
        {
            Err(_) => {
                return Err(ConnError::Protocol(format!(
                    "handshake not finished within {HANDSHAKE_TIMEOUT:?}"
                )));
            }
            Ok(r) => r?,
        };
    let Some(export) = export else {
        debug!(%peer, "client aborted negotiation");
        return Ok(());
    };
    info!(%peer, disk = %export.id, size_bytes = export.size_bytes, "transmission started");
    transmission(stream, peer, export, capture, budget).await
}

/// Option haggling; `Ok(None)` when the client aborted.
async fn handshake(
    stream: &mut TcpStream,
    peer: SocketAddr,
    exports: &Exports,
) -> Result<Option<Arc<Export>>, ConnError> {
    stream.write_all(&nbd::encode_greeting()).await?;
    let mut f = [0u8; 4];
    stream.read_exact(&mut f).await?;
    let client_flags = nbd::parse_client_flags(&f)?;
    let no_zeroes = client_flags & nbd::FLAG_C_NO_ZEROES != 0;
    let mut out = Vec::new();
    loop {
        let mut h = [0u8; nbd::OPTION_HEADER_BYTES];
        stream.read_exact(&mut h).await?;
        let header = nbd::OptionHeader::parse(&h)?;
        // Bounded by OptionHeader::parse before this allocation.
        let mut data = vec![0u8; header.data_len as usize];
        stream.read_exact(&mut data).await?;
        out.clear();
        let opt = header.option;
        match opt {
            nbd::OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                let Some(export) = exports.get(&name) else {
                    // EXPORT_NAME has no error reply: the spec says to disconnect.
                    return Err(ConnError::Protocol(format!(
                        "EXPORT_NAME for unknown export {name:?}"
                    )));
                };
                nbd::encode_export_name_reply(
                    export.size_bytes,
                    nbd::TRANSMISSION_FLAGS,
                    no_zeroes,
                    &mut out,
                );
                stream.write_all(&out).await?;
                return Ok(Some(export.clone()));
            }
            nbd::OPT_ABORT => {
                nbd::encode_option_reply(opt, nbd::REP_ACK, &[], &mut out);
                // The client may already be gone; that is a normal abort too.
                let _ = stream.write_all(&out).await;
                return Ok(None);
            }
            nbd::OPT_LIST => {
                if data.is_empty() {
                    for e in exports.iter() {
                        nbd::encode_rep_server(&e.id, &mut out);
                    }
                    nbd::encode_option_reply(opt, nbd::REP_ACK, &[], &mut out);
                } else {
                    warn!(%peer, "LIST with data refused");
                    nbd::encode_option_reply(
                        opt,
                        nbd::REP_ERR_INVALID,
                        b"LIST takes no data",
                        &mut out,
                    );
                }
            }
            nbd::OPT_INFO | nbd::OPT_GO => match nbd::parse_info_request(&data) {
                Err(e) => {
                    warn!(%peer, error = %e, "INFO/GO refused");
                    nbd::encode_option_reply(
                        opt,
                        nbd::REP_ERR_INVALID,
                        e.to_string().as_bytes(),
                        &mut out,
                    );
                }
                Ok(req) => match exports.get(&req.name) {
                    None => {
                        warn!(%peer, export = %req.name, "unknown export requested");
                        let msg = format!("no export named {:?}", req.name);
                        nbd::encode_option_reply(
                            opt,
                            nbd::REP_ERR_UNKNOWN,
                            msg.as_bytes(),
                            &mut out,
                        );
                    }
                    Some(export) => {
                        nbd::encode_info_export(
                            opt,
                            export.size_bytes,
                            nbd::TRANSMISSION_FLAGS,
                            &mut out,
                        );
                        if req.info_types.contains(&nbd::INFO_NAME) {
                            nbd::encode_info_string(opt, nbd::INFO_NAME, &export.id, &mut out);
                        }
                        if req.info_types.contains(&nbd::INFO_DESCRIPTION) {
                            let d = format!("disk {} of group {}", export.id, export.group);
                            nbd::encode_info_string(opt, nbd::INFO_DESCRIPTION, &d, &mut out);
                        }
                        if req.info_types.contains(&nbd::INFO_BLOCK_SIZE) {
                            nbd::encode_info_block_size(
                                opt,
                                nbd::BLOCK_MIN_BYTES,
                                nbd::BLOCK_PREFERRED_BYTES,
                                nbd::REQUEST_BYTES_MAX,
                                &mut out,
                            );
                        }
                        nbd::encode_option_reply(opt, nbd::REP_ACK, &[], &mut out);
                        if opt == nbd::OPT_GO {
                            stream.write_all(&out).await?;
                            return Ok(Some(export.clone()));
                        }
                    }
                },
            },
            other => {
                debug!(%peer, option = other, "unsupported option");
                nbd::encode_option_reply(
                    other,
                    nbd::REP_ERR_UNSUP,
                    b"option not supported",
                    &mut out,
                );
            }
        }
        stream.write_all(&out).await?;
    }
}

/// One reply on its way to the writer task; the permits return when it is sent.
struct Reply {
    header: [u8; nbd::SIMPLE_REPLY_BYTES],
    data: Option<Vec<u8>>,
    _permits: (
        OwnedSemaphorePermit,
        OwnedSemaphorePermit,
        OwnedSemaphorePermit,
    ),
}

async fn transmission(
    stream: TcpStream,
    peer: SocketAddr,
    export: Arc<Export>,
    capture: Arc<dyn Capture>,
    budget: Arc<Semaphore>,
) -> Result<(), ConnError> {
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(SOCKET_BUFFER_BYTES, rd);
    // Every reply holds a request slot, so the channel never holds more than this.
    let (tx, mut rx) = mpsc::channel::<Reply>(REQUESTS_IN_FLIGHT_MAX);
    let writer = tokio::spawn(async move {
        let mut wr = BufWriter::with_capacity(SOCKET_BUFFER_BYTES, wr);
        while let Some(reply) = rx.recv().await {
            wr.write_all(&reply.header).await?;
            if let Some(d) = &reply.data {
                wr.write_all(d).await?;
            }
            // Batch replies that are already waiting into one send.
            if rx.is_empty() {
                wr.flush().await?;
            }
        }
        wr.flush().await?;
        wr.shutdown().await
    });
    let slots = Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_MAX));
    let bytes = Arc::new(Semaphore::new(IN_FLIGHT_BYTES_MAX as usize));
    let result = loop {
        let mut h = [0u8; nbd::REQUEST_BYTES];
        match rd.read_exact(&mut h).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                // A client that closes without DISC at a request boundary; not an error
                // of ours, but worth a note since in-flight replies are lost to it.
                debug!(%peer, disk = %export.id, "client closed without DISC");
                break Ok(());
            }
            Err(e) => break Err(e.into()),
        }
        let req = match Request::parse(&h) {
            Ok(r) => r,
            Err(e) => break Err(e.into()),
        };
        let verdict = req.check(export.size_bytes);
        let cost = match (verdict, req.command) {
            (Ok(()), Command::Read) => req.len,
            (_, Command::Write) => req.len,
            _ => 0,
        }
        .max(1);
        // Always in this order (slot, connection bytes, server bytes), so waiting for the
        // server's budget only ever waits for requests that are already running.
        let (Ok(slot), Ok(held), Ok(shared)) = (
            slots.clone().acquire_owned().await,
            bytes.clone().acquire_many_owned(cost).await,
            budget.clone().acquire_many_owned(cost).await,
        ) else {
            break Err(ConnError::Protocol("semaphore closed".into()));
        };
        let permits = (slot, held, shared);
        let payload = if req.command == Command::Write {
            // Bounded by Request::parse (REQUEST_BYTES_MAX) and held in `permits`.
            match read_payload(&mut rd, req.len as usize).await {
                Ok(p) => p,
                Err(e) => break Err(e.into()),
            }
        } else {
            Vec::new()
        };
        if let Err(errno) = verdict {
            warn!(%peer, disk = %export.id, command = ?req.command, offset = req.offset,
                len = req.len, flags = req.flags, ?errno, "request refused");
            let reply = Reply {
                header: nbd::encode_simple_reply(req.cookie, errno.code()),
                data: None,
                _permits: permits,
            };
            if tx.send(reply).await.is_err() {
                break Ok(());
            }
            continue;
        }
        if req.command == Command::Disc {
            debug!(%peer, disk = %export.id, "DISC");
            break Ok(());
        }
        let export = export.clone();
        let capture = capture.clone();
        let tx = tx.clone();
        tokio::task::spawn_blocking(move || {
            let (error, data) = match execute(&export, &*capture, &req, payload) {
                Ok(d) => (0, d),
                Err(errno) => (errno.code(), None),
            };
            let reply = Reply {
                header: nbd::encode_simple_reply(req.cookie, error),
                data,
                _permits: permits,
            };
            // The writer is gone only when the client is; the reply has no one to go to.
            let _ = tx.blocking_send(reply);
        });
    };
    // The writer ends once every in-flight request has sent its reply (each holds a
    // sender), so a DISC still answers everything that came before it.
    drop(tx);
    let written = writer
        .await
        .map_err(|e| ConnError::Protocol(format!("writer task: {e}")))?;
    result?;
    match written {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Reads exactly `len` bytes of a WRITE's payload into a new buffer, straight into its
/// spare capacity: no zero-filling first (a memset of every byte written was ~2% of the
/// process server's CPU). A stream that ends early is `UnexpectedEof`, as `read_exact`.
async fn read_payload(
    rd: &mut (impl tokio::io::AsyncRead + Unpin),
    len: usize,
) -> io::Result<Vec<u8>> {
    let mut p = Vec::with_capacity(len);
    // `take` keeps each read within the payload, whatever spare capacity `p` has.
    let mut rest = rd.take(len as u64);
    while p.len() < len {
        if rest.read_buf(&mut p).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(p)
}

fn io_errno(e: &io::Error) -> Errno {
    // ENOSPC, EDQUOT and EFBIG map to ENOSPC as the spec asks; anything else is EIO.
    match e.raw_os_error() {
        Some(28) | Some(122) | Some(27) => Errno::NoSpc,
        _ => Errno::Io,
    }
}

/// Runs one checked request on a blocking thread: the data of a READ, or nothing.
fn execute(
    export: &Export,
    capture: &dyn Capture,
    req: &Request,
    payload: Vec<u8>,
) -> Result<Option<Vec<u8>>, Errno> {
    let disk = export.id.as_str();
    let io_fail = |what: &str, e: io::Error| {
        error!(disk, offset = req.offset, len = req.len, error = %e, "{what} failed");
        io_errno(&e)
    };
    let hook_fail = |what: &str, e: io::Error| {
        error!(disk, offset = req.offset, len = req.len, error = %e,
            "capture {what} failed; request not acknowledged");
        Errno::Io
    };
    // After the backing write of a WRITE, TRIM or WRITE_ZEROES: the FUA sync, and on
    // any failure the capture hook hears that the write will not be acknowledged.
    let finish_write = |written: Result<(), Errno>| {
        let r = written.and_then(|()| {
            if req.fua() {
                export.store.sync().map_err(|e| io_fail("fua sync", e))
            } else {
                Ok(())
            }
        });
        if r.is_err() {
            capture.write_failed(disk, req.offset, u64::from(req.len));
        }
        r
    };
    match req.command {
        Command::Read => {
            let mut buf = vec![0u8; req.len as usize];
            export
                .store
                .read_at(&mut buf, req.offset)
                .map_err(|e| io_fail("read", e))?;
            Ok(Some(buf))
        }
        Command::Write => {
            let len = u64::from(req.len);
            capture
                .before_write(disk, req.offset, len)
                .map_err(|e| hook_fail("before_write", e))?;
            let written = export
                .store
                .write_at(&payload, req.offset)
                .map_err(|e| io_fail("write", e));
            finish_write(written)?;
            capture
                .after_write(disk, req.offset, WriteData::Bytes(&payload))
                .map_err(|e| hook_fail("after_write", e))?;
            Ok(None)
        }
        Command::Trim | Command::WriteZeroes => {
            let len = u64::from(req.len);
            capture
                .before_write(disk, req.offset, len)
                .map_err(|e| hook_fail("before_write", e))?;
            let written = export
                .store
                .write_zeroes(req.offset, len)
                .map_err(|e| io_fail("zero", e));
            finish_write(written)?;
            capture
                .after_write(disk, req.offset, WriteData::Zero(len))
                .map_err(|e| hook_fail("after_write", e))?;
            Ok(None)
        }
        Command::Flush => {
            export.store.sync().map_err(|e| io_fail("flush", e))?;
            capture.flush(disk).map_err(|e| hook_fail("flush", e))?;
            Ok(None)
        }
        // DISC is handled by the reader and unknown commands are refused by check.
        Command::Disc | Command::Other(_) => Err(Errno::Inval),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Proves a payload that arrives in small pieces is read whole and exactly (not a
    /// byte of the next request taken), and a stream that ends inside a payload is
    /// `UnexpectedEof`, as `read_exact` reports it.
    #[test]
    fn read_payload_reads_exactly_len_bytes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let data: Vec<u8> = (0..70_000u32).map(|i| (i % 253) as u8).collect();
            let (mut client, mut server) = tokio::io::duplex(1000);
            let sent = data.clone();
            let writer = tokio::spawn(async move {
                for piece in sent.chunks(777) {
                    client.write_all(piece).await.unwrap();
                }
            });
            let got = read_payload(&mut server, 65_536).await.unwrap();
            assert_eq!(got, data[..65_536]);
            let rest = read_payload(&mut server, 70_000 - 65_536).await.unwrap();
            assert_eq!(rest, data[65_536..]);
            writer.await.unwrap();
            let e = read_payload(&mut server, 1).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
            let mut short: &[u8] = &[1, 2, 3];
            let e = read_payload(&mut short, 4).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        });
    }
}
