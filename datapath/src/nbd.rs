//! # nbd: the NBD wire codec of write capture (fixed newstyle handshake + transmission)
//!
//! The process server serves every protected disk to its machine over the Network Block
//! Device protocol (`doc/proto.md` of the NetworkBlockDevice/nbd project). This module
//! owns the bytes of that protocol and nothing else: it parses what a client sends,
//! checks it against hard bounds before anything is allocated, validates requests
//! against the export, and encodes what the server answers. No sockets, no runtime.
//!
//! Every integer on the NBD wire is **big-endian** (network order), unlike the formats
//! of this crate. The magics below are fixed by the protocol: never modify them. NBD
//! has no version number of its own; features are negotiated through the handshake
//! flags and options, so this module has no `VERSION` constant.
//!
//! Subset served: fixed newstyle handshake with `NO_ZEROES`; options `EXPORT_NAME`,
//! `ABORT`, `LIST`, `INFO`, `GO` (everything else, `STRUCTURED_REPLY` and `STARTTLS`
//! included, gets [`REP_ERR_UNSUP`]); simple replies only; commands `READ`, `WRITE`,
//! `DISC`, `FLUSH`, `TRIM`, `WRITE_ZEROES` with the `FUA` and `NO_HOLE` flags.
//!
//! ## Handshake, server greeting (18 bytes, [`encode_greeting`])
//!
//! | offset | size | field           | meaning                                        |
//! |--------|------|-----------------|------------------------------------------------|
//! | 0      | 8    | magic           | [`NBDMAGIC`] `"NBDMAGIC"`                      |
//! | 8      | 8    | option magic    | [`IHAVEOPT`] `"IHAVEOPT"`                      |
//! | 16     | 2    | handshake flags | [`FLAG_FIXED_NEWSTYLE`] \| [`FLAG_NO_ZEROES`]  |
//!
//! Client flags (4 bytes, [`parse_client_flags`]): [`FLAG_C_FIXED_NEWSTYLE`],
//! [`FLAG_C_NO_ZEROES`]; any other bit is refused (the spec says the server must drop
//! the connection).
//!
//! ## Option request header (16 bytes, [`OptionHeader::parse`])
//!
//! | offset | size | field    | meaning                                                 |
//! |--------|------|----------|---------------------------------------------------------|
//! | 0      | 8    | magic    | [`IHAVEOPT`]                                            |
//! | 8      | 4    | option   | `OPT_*`                                                 |
//! | 12     | 4    | data_len | bytes of option data that follow, at most [`OPTION_DATA_BYTES_MAX`] |
//!
//! `INFO` / `GO` option data ([`parse_info_request`]): name length u32 (at most
//! data_len - 6), the name (UTF-8), count of information requests u16, then count u16
//! `INFO_*` codes; the data must end exactly there.
//!
//! ## Option reply (20-byte header + data, [`encode_option_reply`])
//!
//! | offset | size | field      | meaning                                     |
//! |--------|------|------------|---------------------------------------------|
//! | 0      | 8    | magic      | [`OPTION_REPLY_MAGIC`] `0x3e889045565a9`    |
//! | 8      | 4    | option     | the option answered                         |
//! | 12     | 4    | reply type | `REP_*` (errors have bit 31 set)            |
//! | 16     | 4    | length     | bytes of reply data that follow             |
//!
//! Reply data: `REP_SERVER` = name length u32 + name; `REP_INFO` = info type u16 +
//! payload: `INFO_EXPORT` size u64 + transmission flags u16, `INFO_NAME` /
//! `INFO_DESCRIPTION` a string, `INFO_BLOCK_SIZE` minimum, preferred and maximum
//! payload, u32 each.
//!
//! `EXPORT_NAME` is answered without a reply header: size u64, transmission flags u16,
//! then 124 zero bytes unless the client set [`FLAG_C_NO_ZEROES`]
//! ([`encode_export_name_reply`]).
//!
//! ## Transmission request (28 bytes, [`Request::parse`])
//!
//! | offset | size | field   | meaning                                           |
//! |--------|------|---------|---------------------------------------------------|
//! | 0      | 4    | magic   | [`REQUEST_MAGIC`] `0x25609513`                    |
//! | 4      | 2    | flags   | `CMD_FLAG_*`                                      |
//! | 6      | 2    | type    | `CMD_*`                                           |
//! | 8      | 8    | cookie  | opaque, echoed in the reply (formerly "handle")   |
//! | 16     | 8    | offset  | byte offset in the export                         |
//! | 24     | 4    | length  | bytes; a `WRITE` is followed by that many bytes   |
//!
//! ## Simple reply (16 bytes + read data, [`encode_simple_reply`])
//!
//! | offset | size | field  | meaning                                            |
//! |--------|------|--------|----------------------------------------------------|
//! | 0      | 4    | magic  | [`SIMPLE_REPLY_MAGIC`] `0x67446698`                |
//! | 4      | 4    | error  | 0 or an [`Errno`] code                             |
//! | 8      | 8    | cookie | the request's cookie                               |
//!
//! A successful `READ` reply is followed by exactly `length` bytes of data.
//!
//! ## Bad input policy
//! A malformed option (bad length inside INFO/GO data) gets `REP_ERR_INVALID` and
//! negotiation goes on. A bad magic, unknown client flags, an option longer than
//! [`OPTION_DATA_BYTES_MAX`] or a `WRITE` longer than [`REQUEST_BYTES_MAX`] cannot be
//! skipped safely (or only by reading unbounded bytes): the parser returns an
//! [`NbdError`] and the server disconnects. A well-formed request that the export cannot
//! serve (out of range, unknown command or flag, a `READ` over the bound) is refused by
//! [`Request::check`] with the [`Errno`] the spec asks for, and the session goes on.

use thiserror::Error;

/// First magic of the server greeting: ASCII `NBDMAGIC`. Fixed by the protocol; never modify.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Option magic of the greeting and of every option request: ASCII `IHAVEOPT`. Never modify.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply. Never modify.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request. Never modify.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of every simple reply. Never modify.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Handshake flags this server sends.
pub const HANDSHAKE_FLAGS: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `CMD_WRITE_ZEROES` (and `CMD_FLAG_NO_HOLE`) is supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: a flush on one connection covers writes acked on every connection.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flags of every export this server serves (writable, one shared file
/// per export, so a flush on any connection makes every acked write durable).
pub const TRANSMISSION_FLAGS: u16 = FLAG_HAS_FLAGS
    | FLAG_SEND_FLUSH
    | FLAG_SEND_FUA
    | FLAG_SEND_TRIM
    | FLAG_SEND_WRITE_ZEROES
    | FLAG_CAN_MULTI_CONN;

/// Option: choose an export and enter transmission (no error reply possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end negotiation (soft disconnect).
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: STARTTLS (not supported).
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: structured replies (refused with [`REP_ERR_UNSUP`]; simple replies only).
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// Information type: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information type: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Information type: human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information type: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Option reply: success / end of list.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a `LIST`.
pub const REP_SERVER: u32 = 2;
/// Option reply: one information item of an `INFO` / `GO`.
pub const REP_INFO: u32 = 3;
const REP_ERR: u32 = 1 << 31;
/// Option reply error: unknown option.
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// Option reply error: forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
/// Option reply error: malformed option.
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
/// Option reply error: not available on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_ERR | 4;
/// Option reply error: TLS required.
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
/// Option reply error: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
/// Option reply error: server shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
/// Option reply error: block size negotiation required.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR | 8;
/// Option reply error: request or reply too large.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (payload follows).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect after the outstanding requests.
pub const CMD_DISC: u16 = 2;
/// Command: make every completed write durable.
pub const CMD_FLUSH: u16 = 3;
/// Command: discard a range (this server zeroes it).
pub const CMD_TRIM: u16 = 4;
/// Command: write zeros to a range.
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Command flag: force unit access (durable before the reply).
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: `WRITE_ZEROES` must not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Largest option data accepted, checked before allocating. The longest legitimate
/// option here is `INFO`/`GO`: a name (the spec caps strings at 4096 bytes) plus a few
/// info codes.
pub const OPTION_DATA_BYTES_MAX: u32 = 4096 + 64;
/// Largest `READ`/`WRITE` payload: the spec's default maximum payload (2^25), which
/// clients must not exceed unless told otherwise and which we advertise in
/// `INFO_BLOCK_SIZE`.
pub const REQUEST_BYTES_MAX: u32 = 32 << 20;
/// Minimum block size advertised: the data path tracks and ships 512-byte sectors, so
/// writes, trims and write-zeroes must be sector-aligned (a client that honours the
/// minimum does read-modify-write itself); misaligned ones get `EINVAL`.
pub const BLOCK_MIN_BYTES: u32 = 512;
/// Preferred block size advertised: the dirty bitmap's block.
pub const BLOCK_PREFERRED_BYTES: u32 = 4096;
/// Bytes of the server greeting.
pub const GREETING_BYTES: usize = 18;
/// Bytes of an option request header.
pub const OPTION_HEADER_BYTES: usize = 16;
/// Bytes of an option reply header.
pub const OPTION_REPLY_HEADER_BYTES: usize = 20;
/// Bytes of a transmission request header.
pub const REQUEST_BYTES: usize = 28;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_BYTES: usize = 16;
/// Zero padding after an `EXPORT_NAME` reply without `NO_ZEROES`.
pub const EXPORT_NAME_PAD_BYTES: usize = 124;

const _: () = assert!(GREETING_BYTES == 8 + 8 + 2);
const _: () = assert!(OPTION_HEADER_BYTES == 8 + 4 + 4);
const _: () = assert!(OPTION_REPLY_HEADER_BYTES == 8 + 4 + 4 + 4);
const _: () = assert!(REQUEST_BYTES == 4 + 2 + 2 + 8 + 8 + 4);
const _: () = assert!(SIMPLE_REPLY_BYTES == 4 + 4 + 8);
const _: () = assert!(BLOCK_PREFERRED_BYTES <= REQUEST_BYTES_MAX);

/// The error values of a simple reply (the spec's `NBD_E*`); the discriminant is the
/// wire value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    /// Operation not permitted (write to a read-only export).
    Perm = 1,
    /// Input/output error (backing disk or capture failed).
    Io = 5,
    /// Cannot allocate memory.
    NoMem = 12,
    /// Invalid argument (out of range, unknown command or flag).
    Inval = 22,
    /// No space left (write beyond the end of the export).
    NoSpc = 28,
    /// Value too large.
    Overflow = 75,
    /// Operation not supported.
    NotSup = 95,
    /// Server shutting down.
    Shutdown = 108,
}

impl Errno {
    /// The value of the reply's error field.
    pub fn code(self) -> u32 {
        self as u32
    }
}

/// Why bytes from a client were refused. Each case names the field.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NbdError {
    /// A magic number is not the protocol's.
    #[error("bad {field}: {found:#x}")]
    BadMagic { field: &'static str, found: u64 },
    /// The client set flags this server did not offer.
    #[error("unknown client flags {flags:#x}")]
    UnknownClientFlags { flags: u32 },
    /// An option announced more data than [`OPTION_DATA_BYTES_MAX`].
    #[error("option {option} data_len {len} exceeds {max}")]
    OptionTooLong { option: u32, len: u32, max: u32 },
    /// A `WRITE` announced a payload over [`REQUEST_BYTES_MAX`].
    #[error("write length {len} exceeds {max}")]
    PayloadTooLong { len: u32, max: u32 },
    /// A field does not fit in the bytes given.
    #[error("truncated {field}: need {need} bytes, have {have}")]
    Truncated {
        field: &'static str,
        need: usize,
        have: usize,
    },
    /// A field has a value the protocol does not allow.
    #[error("invalid {field}: {reason}")]
    Invalid {
        field: &'static str,
        reason: &'static str,
    },
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// The server greeting: magic, option magic, [`HANDSHAKE_FLAGS`].
pub fn encode_greeting() -> [u8; GREETING_BYTES] {
    let mut b = [0u8; GREETING_BYTES];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&HANDSHAKE_FLAGS.to_be_bytes());
    b
}

/// The client's flags, refused if they hold a bit this server did not offer.
pub fn parse_client_flags(b: &[u8; 4]) -> Result<u32, NbdError> {
    let flags = u32::from_be_bytes(*b);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::UnknownClientFlags { flags });
    }
    Ok(flags)
}

/// The header of one option request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// `OPT_*` code.
    pub option: u32,
    /// Bytes of option data that follow; at most [`OPTION_DATA_BYTES_MAX`].
    pub data_len: u32,
}

impl OptionHeader {
    /// Parses and bounds an option header; the data length is checked here, before
    /// the caller allocates for the data.
    pub fn parse(b: &[u8; OPTION_HEADER_BYTES]) -> Result<Self, NbdError> {
        let magic = be_u64(b, 0);
        if magic != IHAVEOPT {
            return Err(NbdError::BadMagic {
                field: "option magic",
                found: magic,
            });
        }
        let option = be_u32(b, 8);
        let data_len = be_u32(b, 12);
        if data_len > OPTION_DATA_BYTES_MAX {
            return Err(NbdError::OptionTooLong {
                option,
                len: data_len,
                max: OPTION_DATA_BYTES_MAX,
            });
        }
        Ok(Self { option, data_len })
    }

    /// The header's bytes (for clients and tests).
    pub fn encode(&self) -> [u8; OPTION_HEADER_BYTES] {
        let mut b = [0u8; OPTION_HEADER_BYTES];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.data_len.to_be_bytes());
        b
    }
}

/// The data of an `INFO` or `GO` option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name (empty = default export).
    pub name: String,
    /// Information types asked for (`INFO_*`; unknown ones are kept and ignored).
    pub info_types: Vec<u16>,
}

/// Parses `INFO`/`GO` option data: every length is checked against the bytes given.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, NbdError> {
    if data.len() < 6 {
        return Err(NbdError::Truncated {
            field: "info request",
            need: 6,
            have: data.len(),
        });
    }
    let name_len = be_u32(data, 0) as usize;
    if name_len > data.len() - 6 {
        return Err(NbdError::Invalid {
            field: "info name length",
            reason: "longer than the option data - 6",
        });
    }
    let name = std::str::from_utf8(&data[4..4 + name_len])
        .map_err(|_| NbdError::Invalid {
            field: "info name",
            reason: "not UTF-8",
        })?
        .to_owned();
    let rest = &data[4 + name_len..];
    let count = usize::from(be_u16(rest, 0));
    let list = &rest[2..];
    if list.len() != count * 2 {
        return Err(NbdError::Invalid {
            field: "info request count",
            reason: "does not match the option data length",
        });
    }
    let info_types = list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok(InfoRequest { name, info_types })
}

/// Encodes `INFO`/`GO` option data (for clients and tests).
pub fn encode_info_request(req: &InfoRequest) -> Vec<u8> {
    let mut b = Vec::with_capacity(6 + req.name.len() + 2 * req.info_types.len());
    b.extend_from_slice(&(req.name.len() as u32).to_be_bytes());
    b.extend_from_slice(req.name.as_bytes());
    b.extend_from_slice(&(req.info_types.len() as u16).to_be_bytes());
    for t in &req.info_types {
        b.extend_from_slice(&t.to_be_bytes());
    }
    b
}

/// Appends one option reply (header + data) to `out`.
pub fn encode_option_reply(option: u32, reply_type: u32, data: &[u8], out: &mut Vec<u8>) {
    // Reply data is built by the server from its own bounded strings.
    let len = u32::try_from(data.len()).expect("option reply data fits u32");
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends a `REP_SERVER` reply naming one export (answer to `LIST`).
pub fn encode_rep_server(name: &str, out: &mut Vec<u8>) {
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    encode_option_reply(OPT_LIST, REP_SERVER, &data, out);
}

/// Appends a `REP_INFO` / `INFO_EXPORT` reply: size and transmission flags.
pub fn encode_info_export(option: u32, size_bytes: u64, flags: u16, out: &mut Vec<u8>) {
    let mut data = [0u8; 12];
    data[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    data[2..10].copy_from_slice(&size_bytes.to_be_bytes());
    data[10..12].copy_from_slice(&flags.to_be_bytes());
    encode_option_reply(option, REP_INFO, &data, out);
}

/// Appends a `REP_INFO` reply carrying a string (`INFO_NAME` or `INFO_DESCRIPTION`).
pub fn encode_info_string(option: u32, info_type: u16, s: &str, out: &mut Vec<u8>) {
    let mut data = Vec::with_capacity(2 + s.len());
    data.extend_from_slice(&info_type.to_be_bytes());
    data.extend_from_slice(s.as_bytes());
    encode_option_reply(option, REP_INFO, &data, out);
}

/// Appends a `REP_INFO` / `INFO_BLOCK_SIZE` reply.
pub fn encode_info_block_size(
    option: u32,
    min_bytes: u32,
    preferred_bytes: u32,
    max_payload_bytes: u32,
    out: &mut Vec<u8>,
) {
    let mut data = [0u8; 14];
    data[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    data[2..6].copy_from_slice(&min_bytes.to_be_bytes());
    data[6..10].copy_from_slice(&preferred_bytes.to_be_bytes());
    data[10..14].copy_from_slice(&max_payload_bytes.to_be_bytes());
    encode_option_reply(option, REP_INFO, &data, out);
}

/// Appends the answer to `EXPORT_NAME`: size, flags, and the 124 zero bytes unless
/// the client negotiated [`FLAG_C_NO_ZEROES`].
pub fn encode_export_name_reply(size_bytes: u64, flags: u16, no_zeroes: bool, out: &mut Vec<u8>) {
    out.extend_from_slice(&size_bytes.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; EXPORT_NAME_PAD_BYTES]);
    }
}

/// The command of a request; unknown types are kept so the server can answer EINVAL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    WriteZeroes,
    /// A type this server does not implement.
    Other(u16),
}

impl Command {
    fn from_wire(t: u16) -> Self {
        match t {
            CMD_READ => Self::Read,
            CMD_WRITE => Self::Write,
            CMD_DISC => Self::Disc,
            CMD_FLUSH => Self::Flush,
            CMD_TRIM => Self::Trim,
            CMD_WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Other(other),
        }
    }

    fn to_wire(self) -> u16 {
        match self {
            Self::Read => CMD_READ,
            Self::Write => CMD_WRITE,
            Self::Disc => CMD_DISC,
            Self::Flush => CMD_FLUSH,
            Self::Trim => CMD_TRIM,
            Self::WriteZeroes => CMD_WRITE_ZEROES,
            Self::Other(t) => t,
        }
    }
}

/// One transmission request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// `CMD_FLAG_*` bits.
    pub flags: u16,
    pub command: Command,
    /// Opaque client value echoed in the reply.
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    /// Parses a request header. Refuses a bad magic and a `WRITE` whose payload is over
    /// [`REQUEST_BYTES_MAX`] (the stream cannot be resynchronised without reading it);
    /// everything else is left to [`Request::check`], which answers with an errno.
    pub fn parse(b: &[u8; REQUEST_BYTES]) -> Result<Self, NbdError> {
        let magic = be_u32(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(NbdError::BadMagic {
                field: "request magic",
                found: u64::from(magic),
            });
        }
        let req = Self {
            flags: be_u16(b, 4),
            command: Command::from_wire(be_u16(b, 6)),
            cookie: be_u64(b, 8),
            offset: be_u64(b, 16),
            len: be_u32(b, 24),
        };
        if req.command == Command::Write && req.len > REQUEST_BYTES_MAX {
            return Err(NbdError::PayloadTooLong {
                len: req.len,
                max: REQUEST_BYTES_MAX,
            });
        }
        Ok(req)
    }

    /// The header's bytes (for clients and tests).
    pub fn encode(&self) -> [u8; REQUEST_BYTES] {
        let mut b = [0u8; REQUEST_BYTES];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_wire().to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Bytes of payload that follow this header on the wire (and must be consumed
    /// even when the request is refused).
    pub fn payload_bytes(&self) -> u32 {
        if self.command == Command::Write {
            self.len
        } else {
            0
        }
    }

    /// Whether the client asked for the write to be durable before the reply.
    pub fn fua(&self) -> bool {
        self.flags & CMD_FLAG_FUA != 0
    }

    /// Checks the request against an export of `export_bytes`, with the errno the spec
    /// asks for: unknown command or flag, or a flag not valid for this command, EINVAL;
    /// a `READ` over [`REQUEST_BYTES_MAX`] EINVAL (a simple reply cannot carry it); a
    /// range past the end (or overflowing u64) ENOSPC for `WRITE` and `WRITE_ZEROES`,
    /// EINVAL otherwise. `TRIM` and `WRITE_ZEROES` carry no payload, so any length
    /// inside the export is served.
    pub fn check(&self, export_bytes: u64) -> Result<(), Errno> {
        let allowed = match self.command {
            Command::Read | Command::Write | Command::Trim | Command::Flush | Command::Disc => {
                CMD_FLAG_FUA
            }
            Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            Command::Other(_) => return Err(Errno::Inval),
        };
        if self.flags & !allowed != 0 {
            return Err(Errno::Inval);
        }
        let changes = matches!(
            self.command,
            Command::Write | Command::Trim | Command::WriteZeroes
        );
        let bmin = u64::from(BLOCK_MIN_BYTES);
        if changes
            && (self.len == 0
                || !self.offset.is_multiple_of(bmin)
                || !u64::from(self.len).is_multiple_of(bmin))
        {
            return Err(Errno::Inval);
        }
        match self.command {
            Command::Flush | Command::Disc => Ok(()),
            Command::Read if self.len > REQUEST_BYTES_MAX => Err(Errno::Inval),
            _ => {
                let in_range = self
                    .offset
                    .checked_add(u64::from(self.len))
                    .is_some_and(|end| end <= export_bytes);
                if in_range {
                    Ok(())
                } else if matches!(self.command, Command::Write | Command::WriteZeroes) {
                    Err(Errno::NoSpc)
                } else {
                    Err(Errno::Inval)
                }
            }
        }
    }
}

/// A simple reply header; a successful `READ` reply is followed by its data.
pub fn encode_simple_reply(cookie: u64, error: u32) -> [u8; SIMPLE_REPLY_BYTES] {
    let mut b = [0u8; SIMPLE_REPLY_BYTES];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A parsed simple reply header (for clients and tests): `(error, cookie)`.
pub fn parse_simple_reply(b: &[u8; SIMPLE_REPLY_BYTES]) -> Result<(u32, u64), NbdError> {
    let magic = be_u32(b, 0);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(NbdError::BadMagic {
            field: "simple reply magic",
            found: u64::from(magic),
        });
    }
    Ok((be_u32(b, 4), be_u64(b, 8)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Rng;

    fn req(command: Command, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            command,
            cookie: 0xdead_beef_0102_0304,
            offset,
            len,
        }
    }

    /// Proves the greeting and magics have the exact bytes the spec gives.
    #[test]
    fn golden_greeting_and_magics() {
        let g = encode_greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..18], &[0, 3]);
        let r = encode_simple_reply(7, Errno::Inval.code());
        assert_eq!(r[0..8], [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22]);
        assert_eq!(r[8..16], 7u64.to_be_bytes());
        let mut o = Vec::new();
        encode_option_reply(OPT_GO, REP_ACK, &[], &mut o);
        assert_eq!(
            o,
            [
                0, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0
            ]
        );
        assert_eq!(REP_ERR_UNSUP, 0x8000_0001);
        assert_eq!(REP_ERR_UNKNOWN, 0x8000_0006);
    }

    /// Proves request headers round-trip and a wrong magic is refused naming the field.
    #[test]
    fn request_roundtrip_and_magic() {
        let r = req(Command::WriteZeroes, CMD_FLAG_NO_HOLE, 1 << 40, 4096);
        assert_eq!(Request::parse(&r.encode()), Ok(r));
        let r = req(Command::Other(9), 0, 0, 0);
        assert_eq!(Request::parse(&r.encode()), Ok(r));
        let mut b = r.encode();
        b[0] ^= 1;
        assert!(matches!(
            Request::parse(&b),
            Err(NbdError::BadMagic {
                field: "request magic",
                ..
            })
        ));
    }

    /// Proves a WRITE over the payload bound is refused at parse time, but a READ or
    /// TRIM of the same length parses (and READ is refused by check with EINVAL).
    #[test]
    fn payload_bound() {
        let w = req(Command::Write, 0, 0, REQUEST_BYTES_MAX + 1);
        assert!(matches!(
            Request::parse(&w.encode()),
            Err(NbdError::PayloadTooLong { .. })
        ));
        let ok = req(Command::Write, 0, 0, REQUEST_BYTES_MAX);
        assert_eq!(Request::parse(&ok.encode()), Ok(ok));
        assert_eq!(ok.payload_bytes(), REQUEST_BYTES_MAX);
        let r = req(Command::Read, 0, 0, REQUEST_BYTES_MAX + 1);
        assert_eq!(Request::parse(&r.encode()), Ok(r));
        assert_eq!(r.check(u64::MAX), Err(Errno::Inval));
        assert_eq!(r.payload_bytes(), 0);
        let t = req(Command::Trim, 0, 0, u32::MAX - 511);
        assert_eq!(t.check(u64::MAX), Ok(()));
    }

    /// Proves range checks against the export: at the end is fine, past it is ENOSPC for
    /// writes and EINVAL for reads and trims, and u64 overflow is caught.
    #[test]
    fn range_checks() {
        let size = 1 << 20;
        for cmd in [
            Command::Read,
            Command::Write,
            Command::Trim,
            Command::WriteZeroes,
        ] {
            assert_eq!(req(cmd, 0, size - 512, 512).check(size), Ok(()));
            let past = if matches!(cmd, Command::Write | Command::WriteZeroes) {
                Errno::NoSpc
            } else {
                Errno::Inval
            };
            assert_eq!(req(cmd, 0, size, 512).check(size), Err(past));
            assert_eq!(req(cmd, 0, size - 512, 1024).check(size), Err(past));
            assert_eq!(req(cmd, 0, u64::MAX - 511, 1024).check(u64::MAX), Err(past));
        }
        assert_eq!(req(Command::Read, 0, size, 0).check(size), Ok(()));
        assert_eq!(req(Command::Read, 0, 1, 7).check(size), Ok(()));
        assert_eq!(req(Command::Flush, 0, u64::MAX, 9).check(size), Ok(()));
    }

    /// Proves writes, trims and write-zeroes must be sector-aligned and not empty (the
    /// advertised minimum block size): anything else is EINVAL, reads may be unaligned.
    #[test]
    fn changes_must_be_sector_aligned() {
        let size = 1 << 20;
        for cmd in [Command::Write, Command::Trim, Command::WriteZeroes] {
            assert_eq!(req(cmd, 0, 1, 512).check(size), Err(Errno::Inval));
            assert_eq!(req(cmd, 0, 512, 511).check(size), Err(Errno::Inval));
            assert_eq!(req(cmd, 0, 512, 0).check(size), Err(Errno::Inval));
            assert_eq!(req(cmd, 0, 512, 4096).check(size), Ok(()));
        }
    }

    /// Proves unknown commands, unknown flags and flags invalid for the command get EINVAL.
    #[test]
    fn flag_and_command_checks() {
        assert_eq!(req(Command::Other(5), 0, 0, 0).check(1), Err(Errno::Inval));
        assert_eq!(
            req(Command::Write, 1 << 7, 0, 1).check(1),
            Err(Errno::Inval)
        );
        assert_eq!(
            req(Command::Write, CMD_FLAG_NO_HOLE, 0, 1).check(1),
            Err(Errno::Inval)
        );
        assert_eq!(
            req(
                Command::WriteZeroes,
                CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
                0,
                512
            )
            .check(512),
            Ok(())
        );
        assert_eq!(req(Command::Flush, CMD_FLAG_FUA, 0, 0).check(1), Ok(()));
        assert!(req(Command::Write, CMD_FLAG_FUA, 0, 1).fua());
    }

    /// Proves the option header bound is checked (before any allocation) and the magic too.
    #[test]
    fn option_header() {
        let h = OptionHeader {
            option: OPT_GO,
            data_len: OPTION_DATA_BYTES_MAX,
        };
        assert_eq!(OptionHeader::parse(&h.encode()), Ok(h));
        let long = OptionHeader {
            option: OPT_GO,
            data_len: OPTION_DATA_BYTES_MAX + 1,
        };
        assert!(matches!(
            OptionHeader::parse(&long.encode()),
            Err(NbdError::OptionTooLong { .. })
        ));
        let mut b = h.encode();
        b[7] ^= 0x80;
        assert!(matches!(
            OptionHeader::parse(&b),
            Err(NbdError::BadMagic {
                field: "option magic",
                ..
            })
        ));
    }

    /// Proves client flags other than the two offered are refused.
    #[test]
    fn client_flags() {
        assert_eq!(parse_client_flags(&[0, 0, 0, 3]), Ok(3));
        assert_eq!(parse_client_flags(&[0, 0, 0, 0]), Ok(0));
        assert!(parse_client_flags(&[0, 0, 0, 4]).is_err());
        assert!(parse_client_flags(&[0x80, 0, 0, 0]).is_err());
    }

    /// Proves INFO/GO data round-trips, and every truncation or extension of it is an
    /// error, never a panic.
    #[test]
    fn info_request_roundtrip_and_truncations() {
        let r = InfoRequest {
            name: "disk0".into(),
            info_types: vec![INFO_BLOCK_SIZE, INFO_NAME],
        };
        let b = encode_info_request(&r);
        assert_eq!(parse_info_request(&b), Ok(r.clone()));
        for cut in 0..b.len() {
            assert!(parse_info_request(&b[..cut]).is_err(), "cut {cut}");
        }
        let mut longer = b.clone();
        longer.push(0);
        assert!(parse_info_request(&longer).is_err());
        let empty = InfoRequest {
            name: String::new(),
            info_types: vec![],
        };
        assert_eq!(
            parse_info_request(&encode_info_request(&empty)),
            Ok(empty.clone())
        );
        let mut bad_utf8 = encode_info_request(&r);
        bad_utf8[4] = 0xff;
        assert!(matches!(
            parse_info_request(&bad_utf8),
            Err(NbdError::Invalid {
                field: "info name",
                ..
            })
        ));
        let mut huge_name = b.clone();
        huge_name[0] = 0xff;
        assert!(matches!(
            parse_info_request(&huge_name),
            Err(NbdError::Invalid {
                field: "info name length",
                ..
            })
        ));
    }

    /// Proves bit flips in every parsed structure never panic, and flips in a magic
    /// are always caught.
    #[test]
    fn bit_flips() {
        let r = req(Command::Write, CMD_FLAG_FUA, 4096, 65536).encode();
        let h = OptionHeader {
            option: OPT_INFO,
            data_len: 11,
        }
        .encode();
        let i = encode_info_request(&InfoRequest {
            name: "disk0".into(),
            info_types: vec![INFO_EXPORT],
        });
        for bit in 0..REQUEST_BYTES * 8 {
            let mut b = r;
            b[bit / 8] ^= 1 << (bit % 8);
            let got = Request::parse(&b);
            if bit < 32 {
                assert!(got.is_err(), "flip in magic bit {bit}");
            }
            if let Ok(q) = got {
                let _ = q.check(1 << 30);
            }
        }
        for bit in 0..OPTION_HEADER_BYTES * 8 {
            let mut b = h;
            b[bit / 8] ^= 1 << (bit % 8);
            let got = OptionHeader::parse(&b);
            if bit < 64 {
                assert!(got.is_err(), "flip in magic bit {bit}");
            }
        }
        for bit in 0..i.len() * 8 {
            let mut b = i.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            let _ = parse_info_request(&b);
        }
    }

    /// Proves random bytes fed to every parser give errors or values, never a panic,
    /// and that random option data never yields a name longer than the input.
    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng::new(0x004e_4244);
        for _ in 0..20_000 {
            let mut r = [0u8; REQUEST_BYTES];
            rng.fill(&mut r);
            if rng.below(2) == 0 {
                r[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            }
            if let Ok(q) = Request::parse(&r) {
                assert!(q.payload_bytes() <= REQUEST_BYTES_MAX);
                let _ = q.check(rng.next());
            }
            let mut h = [0u8; OPTION_HEADER_BYTES];
            rng.fill(&mut h);
            if rng.below(2) == 0 {
                h[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
            }
            if let Ok(o) = OptionHeader::parse(&h) {
                assert!(o.data_len <= OPTION_DATA_BYTES_MAX);
            }
            let n = rng.below(64) as usize;
            let d = rng.bytes(n);
            if let Ok(info) = parse_info_request(&d) {
                assert!(info.name.len() + 2 * info.info_types.len() + 6 == d.len());
            }
            let mut f = [0u8; 4];
            rng.fill(&mut f);
            let _ = parse_client_flags(&f);
            let mut s = [0u8; SIMPLE_REPLY_BYTES];
            rng.fill(&mut s);
            let _ = parse_simple_reply(&s);
        }
    }

    /// Proves the reply encoders produce the lengths and fields the spec defines.
    #[test]
    fn reply_encoders() {
        let mut o = Vec::new();
        encode_info_export(OPT_GO, 1 << 26, TRANSMISSION_FLAGS, &mut o);
        assert_eq!(o.len(), OPTION_REPLY_HEADER_BYTES + 12);
        assert_eq!(be_u32(&o, 12), REP_INFO);
        assert_eq!(be_u32(&o, 16), 12);
        assert_eq!(be_u16(&o, 20), INFO_EXPORT);
        assert_eq!(be_u64(&o, 22), 1 << 26);
        assert_eq!(be_u16(&o, 30), TRANSMISSION_FLAGS);
        o.clear();
        encode_info_block_size(OPT_INFO, 1, 4096, REQUEST_BYTES_MAX, &mut o);
        assert_eq!(be_u32(&o, 16), 14);
        assert_eq!(be_u32(&o, 30), REQUEST_BYTES_MAX);
        o.clear();
        encode_rep_server("disk1", &mut o);
        assert_eq!(be_u32(&o, 16), 9);
        assert_eq!(be_u32(&o, 20), 5);
        assert_eq!(&o[24..], b"disk1");
        o.clear();
        encode_info_string(OPT_GO, INFO_NAME, "d", &mut o);
        assert_eq!(&o[20..], &[0, 1, b'd']);
        o.clear();
        encode_export_name_reply(512, TRANSMISSION_FLAGS, false, &mut o);
        assert_eq!(o.len(), 10 + EXPORT_NAME_PAD_BYTES);
        o.clear();
        encode_export_name_reply(512, TRANSMISSION_FLAGS, true, &mut o);
        assert_eq!(o.len(), 10);
        assert_eq!(parse_simple_reply(&encode_simple_reply(9, 0)), Ok((0, 9)));
    }
}
