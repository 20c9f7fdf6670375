//! Control frames: hello (kind 3), ack (kind 4), error (kind 5), hash list (kind 6), cut
//! request (kind 7), cut done (kind 8) and hash request (kind 9).
//!
//! The byte layouts are in the doc of [`crate::frame`]. Each type has a `check` that both
//! its encoder (before writing) and its decoder (after parsing) run, so that what one
//! side can write the other side accepts, and nothing else. Control frames carry
//! `seq` 0 in the header; decoders refuse any other.

use super::data::check_id;
use super::{FrameError, FrameHeader, FrameKind, Reader, begin, put_id, seal, verify_kind};
use crate::extent::SECTOR_BYTES;

/// The newest protocol version this build speaks (the frame format has its own
/// [`super::VERSION`]). Version 2 adds [`CutRequest`] and [`CutDone`]: a master target
/// sends a cut request only on a connection that negotiated 2 or later, so both sides
/// still speak version 1 with a peer that knows nothing newer. Version 3 adds
/// [`HashRequest`] (process server -> master target) and its answer, the hash list in
/// its second layout ([`HashListFrame`]); a process server sends hash requests only on
/// a connection that negotiated 3 or later.
pub const PROTOCOL_VERSION: u16 = 3;
/// The first protocol version with [`CutRequest`] and [`CutDone`].
pub const CUT_PROTOCOL_VERSION: u16 = 2;
/// The first protocol version with [`HashRequest`] and hash list answers.
pub const HASH_PROTOCOL_VERSION: u16 = 3;
/// Hard bound on the groups of one hello.
pub const MAX_HELLO_GROUPS: u16 = 256;
/// Hard bound on the disks of one group in a hello.
pub const MAX_HELLO_DISKS: u16 = 256;
/// Hard bound on an error message in bytes of UTF-8.
pub const MAX_ERROR_MESSAGE_BYTES: u16 = 1024;
/// Hard bound on the hashes of one hash list frame.
pub const MAX_HASHES: u32 = 65536;
/// Hard bound on the block size of a hash list.
pub const MAX_HASH_BLOCK_BYTES: u32 = 16 << 20;
/// Bytes of one blake3 hash.
pub const HASH_BYTES: usize = 32;

// The largest hello and hash list bodies fit in a frame.
const _: () = assert!(
    8 + 65 + MAX_HELLO_GROUPS as usize * (2 + 65 + MAX_HELLO_DISKS as usize * (8 + 65))
        <= super::MAX_BODY_BYTES as usize
);
const _: () =
    assert!(36 + 65 + 65 + MAX_HASHES as usize * HASH_BYTES <= super::MAX_BODY_BYTES as usize);

/// Which program sends a hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Role {
    /// The side next to the live disks; it ships frames.
    ProcessServer = 1,
    /// The side with the replicas and the journal; it acks.
    MasterTarget = 2,
}

/// One disk named in a hello.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HelloDisk {
    pub id: String,
    /// Size of the disk, a positive multiple of [`SECTOR_BYTES`].
    pub size_bytes: u64,
}

/// One group named in a hello, with its disks.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HelloGroup {
    pub id: String,
    pub disks: Vec<HelloDisk>,
}

/// The opening frame of a connection, sent by each side.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Hello {
    /// Lowest protocol version the sender speaks, at least 1.
    pub version_min: u16,
    /// Highest protocol version the sender speaks, at least `version_min`.
    pub version_max: u16,
    pub role: Role,
    /// The sender's node id (id syntax, see [`crate::valid_id`]).
    pub node: String,
    /// Unique group ids; disk ids unique within their group.
    pub groups: Vec<HelloGroup>,
}

impl Hello {
    /// Checks the rules the decoder enforces.
    pub fn check(&self) -> Result<(), FrameError> {
        if self.version_min == 0 || self.version_min > self.version_max {
            return Err(FrameError::Invalid {
                field: "version_min",
                why: format!(
                    "range {}..={} is empty or starts at 0",
                    self.version_min, self.version_max
                ),
            });
        }
        check_id("node", &self.node)?;
        if self.groups.len() > MAX_HELLO_GROUPS as usize {
            return Err(FrameError::TooLarge {
                field: "group_count",
                value: self.groups.len() as u64,
                max: MAX_HELLO_GROUPS.into(),
            });
        }
        for (i, g) in self.groups.iter().enumerate() {
            check_id("group", &g.id)?;
            if self.groups[..i].iter().any(|o| o.id == g.id) {
                return Err(FrameError::Invalid {
                    field: "group",
                    why: format!("group {:?} named twice", g.id),
                });
            }
            if g.disks.len() > MAX_HELLO_DISKS as usize {
                return Err(FrameError::TooLarge {
                    field: "disk_count",
                    value: g.disks.len() as u64,
                    max: MAX_HELLO_DISKS.into(),
                });
            }
            for (j, d) in g.disks.iter().enumerate() {
                check_id("disk", &d.id)?;
                if g.disks[..j].iter().any(|o| o.id == d.id) {
                    return Err(FrameError::Invalid {
                        field: "disk",
                        why: format!("disk {:?} named twice in group {:?}", d.id, g.id),
                    });
                }
                if d.size_bytes == 0 || d.size_bytes % SECTOR_BYTES != 0 {
                    return Err(FrameError::Invalid {
                        field: "size_bytes",
                        why: format!(
                            "disk {:?}: {} is not a positive multiple of {SECTOR_BYTES}",
                            d.id, d.size_bytes
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// The highest protocol version both ranges contain, if any.
    pub fn negotiate(&self, other: &Hello) -> Option<u16> {
        let v = self.version_max.min(other.version_max);
        (v >= self.version_min.max(other.version_min)).then_some(v)
    }
}

/// The master target's acknowledgement: every frame of `group` up to `durable_seq` is
/// durable in its journal.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Ack {
    pub group: String,
    pub durable_seq: u64,
}

/// The master target asks the process server to cut `group` now and ship everything up
/// to the cut (failback to `latest`). Sent only when protocol 2 or later was negotiated.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CutRequest {
    pub group: String,
}

/// The process server's answer to a [`CutRequest`]: the point it cut, which follows
/// on the connection like every point; `point_id` 0 when it could not cut one (the group
/// tracks by bitmap only, or the cut failed).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CutDone {
    pub group: String,
    pub point_id: u64,
    /// False for a cut during a resync (a failback cannot use it).
    pub consistent: bool,
}

/// A refusal: a code callers branch on, and a message for people.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ErrorFrame {
    /// One of the `ErrorFrame::*` codes; unknown non-zero codes are carried as they are.
    pub code: u16,
    /// UTF-8, at most [`MAX_ERROR_MESSAGE_BYTES`].
    pub message: String,
}

impl ErrorFrame {
    /// A frame failed its checks (crc, blake3, layout).
    pub const BAD_FRAME: u16 = 1;
    /// No protocol version in common.
    pub const UNSUPPORTED_VERSION: u16 = 2;
    /// The peer is not allowed in.
    pub const AUTH: u16 = 3;
    /// A group id the receiver does not know.
    pub const UNKNOWN_GROUP: u16 = 4;
    /// A disk id the receiver does not know.
    pub const UNKNOWN_DISK: u16 = 5;
    /// A disk's size differs between the two sides.
    pub const SIZE_MISMATCH: u16 = 6;
    /// An extent ends beyond its disk.
    pub const OUT_OF_RANGE: u16 = 7;
    /// A frame sequence that skips or repeats.
    pub const SEQUENCE: u16 = 8;
    /// The receiver has no room (journal full); retry later.
    pub const FULL: u16 = 9;
    /// A fault of the receiver itself.
    pub const INTERNAL: u16 = 10;
    /// The peer is busy (a group held by another connection, too many connections,
    /// superseded by a newer connection): retry later.
    pub const BUSY: u16 = 11;
    /// The group is failing back, failed back or committed at the master target: it is
    /// not protected, and replication of it is refused until it is reprotected
    /// (retrying does not help).
    pub const NOT_PROTECTED: u16 = 12;

    /// An error frame whose message is cut (at a character boundary) to the bound.
    pub fn new(code: u16, message: &str) -> Self {
        let mut end = message.len().min(MAX_ERROR_MESSAGE_BYTES as usize);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        Self {
            code,
            message: message[..end].to_string(),
        }
    }

    /// The name of a known code, for logs.
    pub fn code_name(code: u16) -> &'static str {
        match code {
            Self::BAD_FRAME => "bad frame",
            Self::UNSUPPORTED_VERSION => "unsupported version",
            Self::AUTH => "authentication",
            Self::UNKNOWN_GROUP => "unknown group",
            Self::UNKNOWN_DISK => "unknown disk",
            Self::SIZE_MISMATCH => "size mismatch",
            Self::OUT_OF_RANGE => "out of range",
            Self::SEQUENCE => "sequence",
            Self::FULL => "full",
            Self::INTERNAL => "internal",
            Self::BUSY => "busy",
            Self::NOT_PROTECTED => "not protected",
            _ => "unknown",
        }
    }

    /// Checks the rules the decoder enforces.
    pub fn check(&self) -> Result<(), FrameError> {
        if self.code == 0 {
            return Err(FrameError::Invalid {
                field: "code",
                why: "0 is not an error code".into(),
            });
        }
        if self.message.len() > MAX_ERROR_MESSAGE_BYTES as usize {
            return Err(FrameError::TooLarge {
                field: "message_len",
                value: self.message.len() as u64,
                max: MAX_ERROR_MESSAGE_BYTES.into(),
            });
        }
        Ok(())
    }
}

/// Which state of a disk a [`HashRequest`] asks the master target to hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum HashOf {
    /// The replica with every durable journal frame laid over it, consistent or not
    /// (what the disk becomes once everything acknowledged is applied): a resync
    /// compares against this.
    Latest = 0,
    /// The newest consistent point in the journal (or the replica, when the journal
    /// holds no point but was folded before): an online verify compares against this.
    ConsistentPoint = 1,
}

/// The process server asks for the hashes of `count` blocks of a disk (protocol 3).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HashRequest {
    /// Echoed by the answer; the asker's to choose.
    pub request_id: u64,
    pub group: String,
    pub disk: String,
    /// A positive multiple of [`SECTOR_BYTES`], at most [`MAX_HASH_BLOCK_BYTES`]; a
    /// master target answers only the block size of [`crate::hashing`].
    pub block_size_bytes: u32,
    pub first_block: u64,
    /// 1..=[`MAX_HASHES`].
    pub count: u32,
    pub of: HashOf,
}

impl HashRequest {
    /// Checks the rules the decoder enforces.
    pub fn check(&self) -> Result<(), FrameError> {
        check_id("group", &self.group)?;
        check_id("disk", &self.disk)?;
        if self.count == 0 {
            return Err(FrameError::Invalid {
                field: "count",
                why: "a hash request asks for at least one block".into(),
            });
        }
        check_hash_list(self.block_size_bytes, self.first_block, self.count as usize)
    }
}

/// What a [`HashListFrame`] answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum HashStatus {
    /// The hashes follow, one per block asked for.
    Hashes = 0,
    /// The master target holds no copy of this disk (a replica it created and nothing
    /// was ever written to it): hashing it is of no use, send every block.
    NoCopy = 1,
    /// A consistent point was asked for and the journal holds none.
    NoPoint = 2,
    /// Hashing failed at the master target (its log says why); the asker sends the
    /// blocks, or asks again later.
    Failed = 3,
}

/// The master target's answer to a [`HashRequest`] (hash list layout 2, protocol 3):
/// blake3 hashes of `hashes.len()` consecutive blocks of a disk, from `first_block`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HashListFrame {
    /// The request's id.
    pub request_id: u64,
    pub group: String,
    pub disk: String,
    /// A positive multiple of [`SECTOR_BYTES`], at most [`MAX_HASH_BLOCK_BYTES`].
    pub block_size_bytes: u32,
    pub first_block: u64,
    /// The point whose state was hashed; 0 for [`HashOf::Latest`] or the replica.
    pub point_id: u64,
    pub status: HashStatus,
    /// At most [`MAX_HASHES`]; empty unless `status` is [`HashStatus::Hashes`].
    pub hashes: Vec<[u8; HASH_BYTES]>,
}

impl HashListFrame {
    /// Checks the rules the decoder enforces.
    pub fn check(&self) -> Result<(), FrameError> {
        check_id("group", &self.group)?;
        check_id("disk", &self.disk)?;
        check_hash_list(self.block_size_bytes, self.first_block, self.hashes.len())?;
        if self.status != HashStatus::Hashes && !self.hashes.is_empty() {
            return Err(FrameError::Invalid {
                field: "count",
                why: format!(
                    "{} hashes in an answer of status {:?}, which carries none",
                    self.hashes.len(),
                    self.status
                ),
            });
        }
        Ok(())
    }
}

/// The hash list in its first layout (kind 6 before protocol 3): FROZEN. It never
/// went on a wire (nothing sent it before protocol 3 replaced it with
/// [`HashListFrame`]); it stays, with its golden bytes, so that the layout is on
/// record and a reader of old captures can name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HashListV1 {
    pub disk: String,
    pub block_size_bytes: u32,
    pub first_block: u64,
    pub hashes: Vec<[u8; HASH_BYTES]>,
}

fn check_hash_list(
    block_size_bytes: u32,
    first_block: u64,
    count: usize,
) -> Result<(), FrameError> {
    if block_size_bytes == 0
        || u64::from(block_size_bytes) % SECTOR_BYTES != 0
        || block_size_bytes > MAX_HASH_BLOCK_BYTES
    {
        return Err(FrameError::Invalid {
            field: "block_size_bytes",
            why: format!(
                "{block_size_bytes} is not a positive multiple of {SECTOR_BYTES} up to \
                 {MAX_HASH_BLOCK_BYTES}"
            ),
        });
    }
    if count > MAX_HASHES as usize {
        return Err(FrameError::TooLarge {
            field: "count",
            value: count as u64,
            max: MAX_HASHES.into(),
        });
    }
    // The byte range the list covers must be addressable.
    let end_ok = first_block
        .checked_add(count as u64)
        .and_then(|end| end.checked_mul(block_size_bytes.into()))
        .is_some();
    if !end_ok {
        return Err(FrameError::Invalid {
            field: "first_block",
            why: format!("{first_block}+{count} blocks of {block_size_bytes} bytes overflow"),
        });
    }
    Ok(())
}

/// Refuses a control frame whose header carries a sequence.
pub(super) fn check_control_seq(h: &FrameHeader) -> Result<(), FrameError> {
    if h.seq != 0 {
        return Err(FrameError::Invalid {
            field: "seq",
            why: format!("{} in a {:?} frame, which carries 0", h.seq, h.kind),
        });
    }
    Ok(())
}

/// Encodes a hello frame into `out` (cleared first); refuses a hello [`Hello::check`] refuses.
pub fn encode_hello(hello: &Hello, out: &mut Vec<u8>) -> Result<(), FrameError> {
    hello.check()?;
    begin(out);
    out.extend_from_slice(&hello.version_min.to_le_bytes());
    out.extend_from_slice(&hello.version_max.to_le_bytes());
    out.push(hello.role as u8);
    out.push(0);
    out.extend_from_slice(&(hello.groups.len() as u16).to_le_bytes());
    put_id(out, &hello.node);
    for g in &hello.groups {
        out.extend_from_slice(&(g.disks.len() as u16).to_le_bytes());
        put_id(out, &g.id);
        for d in &g.disks {
            out.extend_from_slice(&d.size_bytes.to_le_bytes());
            put_id(out, &d.id);
        }
    }
    seal(out, FrameKind::Hello, 0);
    Ok(())
}

/// Decodes and verifies a hello frame.
pub fn decode_hello(frame: &[u8]) -> Result<Hello, FrameError> {
    let (h, body) = verify_kind(frame, FrameKind::Hello)?;
    check_control_seq(&h)?;
    decode_hello_body(body)
}

/// Decodes the body of a hello frame whose crc was checked.
pub fn decode_hello_body(body: &[u8]) -> Result<Hello, FrameError> {
    let mut r = Reader::new(body);
    let version_min = r.u16("version_min")?;
    let version_max = r.u16("version_max")?;
    let role = match r.u8("role")? {
        1 => Role::ProcessServer,
        2 => Role::MasterTarget,
        v => {
            return Err(FrameError::Invalid {
                field: "role",
                why: format!("{v} is neither 1 (process server) nor 2 (master target)"),
            });
        }
    };
    if r.u8("hello.reserved")? != 0 {
        return Err(FrameError::Reserved("hello.reserved"));
    }
    let group_count = r.u16("group_count")?;
    if group_count > MAX_HELLO_GROUPS {
        return Err(FrameError::TooLarge {
            field: "group_count",
            value: group_count.into(),
            max: MAX_HELLO_GROUPS.into(),
        });
    }
    let node = r.id("node")?;
    let mut groups = Vec::with_capacity(group_count.into());
    for _ in 0..group_count {
        let disk_count = r.u16("disk_count")?;
        if disk_count > MAX_HELLO_DISKS {
            return Err(FrameError::TooLarge {
                field: "disk_count",
                value: disk_count.into(),
                max: MAX_HELLO_DISKS.into(),
            });
        }
        let id = r.id("group")?;
        let mut disks = Vec::with_capacity(disk_count.into());
        for _ in 0..disk_count {
            let size_bytes = r.u64("size_bytes")?;
            let id = r.id("disk")?;
            disks.push(HelloDisk { id, size_bytes });
        }
        groups.push(HelloGroup { id, disks });
    }
    r.finish("hello body")?;
    let hello = Hello {
        version_min,
        version_max,
        role,
        node,
        groups,
    };
    hello.check()?;
    Ok(hello)
}

/// Encodes an ack frame into `out` (cleared first).
pub fn encode_ack(ack: &Ack, out: &mut Vec<u8>) -> Result<(), FrameError> {
    check_id("group", &ack.group)?;
    begin(out);
    out.extend_from_slice(&ack.durable_seq.to_le_bytes());
    put_id(out, &ack.group);
    seal(out, FrameKind::Ack, 0);
    Ok(())
}

/// Decodes and verifies an ack frame.
pub fn decode_ack(frame: &[u8]) -> Result<Ack, FrameError> {
    let (h, body) = verify_kind(frame, FrameKind::Ack)?;
    check_control_seq(&h)?;
    decode_ack_body(body)
}

/// Decodes the body of an ack frame whose crc was checked.
pub fn decode_ack_body(body: &[u8]) -> Result<Ack, FrameError> {
    let mut r = Reader::new(body);
    let durable_seq = r.u64("durable_seq")?;
    let group = r.id("group")?;
    r.finish("ack body")?;
    Ok(Ack { group, durable_seq })
}

/// Encodes an error frame into `out` (cleared first); see [`ErrorFrame::new`] to cut a
/// long message to the bound.
pub fn encode_error(e: &ErrorFrame, out: &mut Vec<u8>) -> Result<(), FrameError> {
    e.check()?;
    begin(out);
    out.extend_from_slice(&e.code.to_le_bytes());
    out.extend_from_slice(&(e.message.len() as u16).to_le_bytes());
    out.extend_from_slice(e.message.as_bytes());
    seal(out, FrameKind::Error, 0);
    Ok(())
}

/// Decodes and verifies an error frame.
pub fn decode_error(frame: &[u8]) -> Result<ErrorFrame, FrameError> {
    let (h, body) = verify_kind(frame, FrameKind::Error)?;
    check_control_seq(&h)?;
    decode_error_body(body)
}

/// Decodes the body of an error frame whose crc was checked.
pub fn decode_error_body(body: &[u8]) -> Result<ErrorFrame, FrameError> {
    let mut r = Reader::new(body);
    let code = r.u16("code")?;
    let len = r.u16("message_len")?;
    if len > MAX_ERROR_MESSAGE_BYTES {
        return Err(FrameError::TooLarge {
            field: "message_len",
            value: len.into(),
            max: MAX_ERROR_MESSAGE_BYTES.into(),
        });
    }
    let raw = r.take(len.into(), "message")?;
    let message = std::str::from_utf8(raw)
        .map_err(|_| FrameError::Invalid {
            field: "message",
            why: "not UTF-8".into(),
        })?
        .to_string();
    r.finish("error body")?;
    let e = ErrorFrame { code, message };
    e.check()?;
    Ok(e)
}

/// Encodes a hash list frame (layout 2) into `out` (cleared first).
pub fn encode_hash_list(l: &HashListFrame, out: &mut Vec<u8>) -> Result<(), FrameError> {
    l.check()?;
    begin(out);
    out.extend_from_slice(&l.request_id.to_le_bytes());
    out.extend_from_slice(&l.first_block.to_le_bytes());
    out.extend_from_slice(&(l.hashes.len() as u32).to_le_bytes());
    out.extend_from_slice(&l.block_size_bytes.to_le_bytes());
    out.extend_from_slice(&l.point_id.to_le_bytes());
    out.push(l.status as u8);
    out.extend_from_slice(&[0; 3]);
    put_id(out, &l.group);
    put_id(out, &l.disk);
    for h in &l.hashes {
        out.extend_from_slice(h);
    }
    seal(out, FrameKind::HashList, 0);
    Ok(())
}

/// Decodes and verifies a hash list frame (layout 2).
pub fn decode_hash_list(frame: &[u8]) -> Result<HashListFrame, FrameError> {
    let (h, body) = verify_kind(frame, FrameKind::HashList)?;
    check_control_seq(&h)?;
    decode_hash_list_body(body)
}

/// Reads `count` hashes that must be exactly the rest of the body.
fn read_hashes(r: &mut Reader<'_>, count: u32) -> Result<Vec<[u8; HASH_BYTES]>, FrameError> {
    let need = count as usize * HASH_BYTES;
    if r.remaining() != need {
        return Err(FrameError::Invalid {
            field: "count",
            why: format!(
                "{count} hashes need {need} bytes, {} follow the ids",
                r.remaining()
            ),
        });
    }
    // Bounded by MAX_HASHES (checked by the caller), and every byte is present.
    let mut hashes = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let h: [u8; HASH_BYTES] =
            r.take(HASH_BYTES, "hash")?
                .try_into()
                .map_err(|_| FrameError::Invalid {
                    field: "hash",
                    why: "not 32 bytes".into(),
                })?;
        hashes.push(h);
    }
    Ok(hashes)
}

/// Decodes the body of a hash list frame (layout 2) whose crc was checked.
pub fn decode_hash_list_body(body: &[u8]) -> Result<HashListFrame, FrameError> {
    let mut r = Reader::new(body);
    let request_id = r.u64("request_id")?;
    let first_block = r.u64("first_block")?;
    let count = r.u32("count")?;
    let block_size_bytes = r.u32("block_size_bytes")?;
    check_hash_list(block_size_bytes, first_block, count as usize)?;
    let point_id = r.u64("point_id")?;
    let status = match r.u8("status")? {
        0 => HashStatus::Hashes,
        1 => HashStatus::NoCopy,
        2 => HashStatus::NoPoint,
        3 => HashStatus::Failed,
        v => {
            return Err(FrameError::Invalid {
                field: "status",
                why: format!("{v} is not a hash list status (0..=3)"),
            });
        }
    };
    if r.take(3, "hash_list.reserved")? != [0; 3] {
        return Err(FrameError::Reserved("hash_list.reserved"));
    }
    let group = r.id("group")?;
    let disk = r.id("disk")?;
    let hashes = read_hashes(&mut r, count)?;
    r.finish("hash list body")?;
    let l = HashListFrame {
        request_id,
        group,
        disk,
        block_size_bytes,
        first_block,
        point_id,
        status,
        hashes,
    };
    l.check()?;
    Ok(l)
}

/// Encodes a hash list in the frozen layout 1 (see [`HashListV1`]; for its golden test).
pub fn encode_hash_list_v1(l: &HashListV1, out: &mut Vec<u8>) -> Result<(), FrameError> {
    check_id("disk", &l.disk)?;
    check_hash_list(l.block_size_bytes, l.first_block, l.hashes.len())?;
    begin(out);
    out.extend_from_slice(&l.block_size_bytes.to_le_bytes());
    out.extend_from_slice(&(l.hashes.len() as u32).to_le_bytes());
    out.extend_from_slice(&l.first_block.to_le_bytes());
    put_id(out, &l.disk);
    for h in &l.hashes {
        out.extend_from_slice(h);
    }
    seal(out, FrameKind::HashList, 0);
    Ok(())
}

/// Decodes a hash list frame in the frozen layout 1 (see [`HashListV1`]).
pub fn decode_hash_list_v1(frame: &[u8]) -> Result<HashListV1, FrameError> {
    let (h, body) = verify_kind(frame, FrameKind::HashList)?;
    check_control_seq(&h)?;
    let mut r = Reader::new(body);
    let block_size_bytes = r.u32("block_size_bytes")?;
    let count = r.u32("count")?;
    let first_block = r.u64("first_block")?;
    check_hash_list(block_size_bytes, first_block, count as usize)?;
    let disk = r.id("disk")?;
    let hashes = read_hashes(&mut r, count)?;
    r.finish("hash list body")?;
    Ok(HashListV1 {
        disk,
        block_size_bytes,
        first_block,
        hashes,
    })
}

/// Encodes a hash request frame into `out` (cleared first).
pub fn encode_hash_request(q: &HashRequest, out: &mut Vec<u8>) -> Result<(), FrameError> {
    q.check()?;
    begin(out);
    out.extend_from_slice(&q.request_id.to_le_bytes());
    out.extend_from_slice(&q.first_block.to_le_bytes());
    out.extend_from_slice(&q.count.to_le_bytes());
    out.extend_from_slice(&q.block_size_bytes.to_le_bytes());
    out.push(q.of as u8);
    out.extend_from_slice(&[0; 3]);
    put_id(out, &q.group);
    put_id(out, &q.disk);
    seal(out, FrameKind::HashRequest, 0);
    Ok(())
}

/// Decodes and verifies a hash request frame.
pub fn decode_hash_request(frame: &[u8]) -> Result<HashRequest, FrameError> {
    let (h, body) = verify_kind(frame, FrameKind::HashRequest)?;
    check_control_seq(&h)?;
    decode_hash_request_body(body)
}

/// Decodes the body of a hash request frame whose crc was checked.
pub fn decode_hash_request_body(body: &[u8]) -> Result<HashRequest, FrameError> {
    let mut r = Reader::new(body);
    let request_id = r.u64("request_id")?;
    let first_block = r.u64("first_block")?;
    let count = r.u32("count")?;
    let block_size_bytes = r.u32("block_size_bytes")?;
    let of = match r.u8("of")? {
        0 => HashOf::Latest,
        1 => HashOf::ConsistentPoint,
        v => {
            return Err(FrameError::Invalid {
                field: "of",
                why: format!("{v} is neither 0 (latest) nor 1 (consistent point)"),
            });
        }
    };
    if r.take(3, "hash_request.reserved")? != [0; 3] {
        return Err(FrameError::Reserved("hash_request.reserved"));
    }
    let group = r.id("group")?;
    let disk = r.id("disk")?;
    r.finish("hash request body")?;
    let q = HashRequest {
        request_id,
        group,
        disk,
        block_size_bytes,
        first_block,
        count,
        of,
    };
    q.check()?;
    Ok(q)
}

/// Encodes a cut request frame into `out` (cleared first).
pub fn encode_cut_request(c: &CutRequest, out: &mut Vec<u8>) -> Result<(), FrameError> {
    check_id("group", &c.group)?;
    begin(out);
    put_id(out, &c.group);
    seal(out, FrameKind::CutRequest, 0);
    Ok(())
}

/// Decodes and verifies a cut request frame.
pub fn decode_cut_request(frame: &[u8]) -> Result<CutRequest, FrameError> {
    let (h, body) = verify_kind(frame, FrameKind::CutRequest)?;
    check_control_seq(&h)?;
    decode_cut_request_body(body)
}

/// Decodes the body of a cut request frame whose crc was checked.
pub fn decode_cut_request_body(body: &[u8]) -> Result<CutRequest, FrameError> {
    let mut r = Reader::new(body);
    let group = r.id("group")?;
    r.finish("cut request body")?;
    Ok(CutRequest { group })
}

/// Encodes a cut done frame into `out` (cleared first).
pub fn encode_cut_done(c: &CutDone, out: &mut Vec<u8>) -> Result<(), FrameError> {
    check_id("group", &c.group)?;
    begin(out);
    out.extend_from_slice(&c.point_id.to_le_bytes());
    out.push(u8::from(c.consistent));
    put_id(out, &c.group);
    seal(out, FrameKind::CutDone, 0);
    Ok(())
}

/// Decodes and verifies a cut done frame.
pub fn decode_cut_done(frame: &[u8]) -> Result<CutDone, FrameError> {
    let (h, body) = verify_kind(frame, FrameKind::CutDone)?;
    check_control_seq(&h)?;
    decode_cut_done_body(body)
}

/// Decodes the body of a cut done frame whose crc was checked.
pub fn decode_cut_done_body(body: &[u8]) -> Result<CutDone, FrameError> {
    let mut r = Reader::new(body);
    let point_id = r.u64("point_id")?;
    let consistent = match r.u8("flags")? {
        0 => false,
        1 => true,
        f => {
            return Err(FrameError::Invalid {
                field: "flags",
                why: format!("{f:#04x}: only bit 0 (consistent) is defined"),
            });
        }
    };
    let group = r.id("group")?;
    r.finish("cut done body")?;
    Ok(CutDone {
        group,
        point_id,
        consistent,
    })
}

#[cfg(test)]
mod tests;
