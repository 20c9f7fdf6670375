//! Change lists: which blocks of one disk may have changed, as a file that travels
//! between the sites of a reprotect.
//!
//! After a failback at site B to point P and its commit, a reprotect towards site A
//! need not compare every block: the blocks where A's disk and B's disk can differ are
//! the ones some side wrote after P and the other never saw. Two programs know them,
//! and each writes its knowledge as a change list of a disk:
//!
//! - B's master target, at `commit`, before its journal goes: the extents of every
//!   journal frame after P ([`Origin::FramesAfterPoint`]; A wrote them and B journaled
//!   them, but B's disks are at P);
//! - A's process server, offline (`process-server changed`): the blocks its dirty
//!   bitmap holds ([`Origin::Unacknowledged`]; A wrote them, B never acknowledged them).
//!
//! B's new process server starts its initial sync with the union of the lists dirty
//! instead of every block (see [`crate::tracker`], "Initial sync"); its own writes after
//! its start are tracked as always. Why that union covers every difference is in the
//! README ("Reprotect").
//!
//! # File layout, version 1 (all integers little-endian)
//!
//! A 256-byte header, then `extent_count` entries of 16 bytes, then a crc32 of the
//! entries. The file is exactly `256 + 16 * extent_count + 4` bytes.
//!
//! | offset | size | field             | meaning                                                   |
//! |-------:|-----:|-------------------|-----------------------------------------------------------|
//! | 0      | 8    | `magic`           | `b"BRCHGLST"` ([`MAGIC`]); never modify                   |
//! | 8      | 2    | `version`         | [`VERSION`]; readers refuse versions they do not know     |
//! | 10     | 1    | `origin`          | 1 frames after a point (master target), 2 writes not acknowledged (process server) ([`Origin`]) |
//! | 11     | 1    | `group_len`       | length of the group id, 1..=64                            |
//! | 12     | 1    | `disk_len`        | length of the disk id, 1..=64                             |
//! | 13     | 1    | `node_len`        | length of the node id of who wrote the list, 0..=64       |
//! | 14     | 2    | `reserved0`       | must be 0                                                 |
//! | 16     | 8    | `disk_bytes`      | the disk's size: a multiple of 512, 1..=[`crate::bitmap::DISK_BYTES_MAX`] |
//! | 24     | 8    | `point_id`        | the point the list relates to (frames after it; the last point the master target acknowledged); 0: unknown |
//! | 32     | 8    | `created_unix_ms` | when the list was written                                 |
//! | 40     | 8    | `extent_count`    | entries that follow, at most half the disk's 4 KiB blocks, rounded up |
//! | 48     | 8    | `block_count`     | 4 KiB blocks the entries cover (the sum of their lengths in blocks, a partial last block counted whole) |
//! | 56     | 64   | `group`           | the group id, zero-padded                                 |
//! | 120    | 64   | `disk`            | the disk id, zero-padded                                  |
//! | 184    | 64   | `node`            | the node id (a `[a-z0-9][a-z0-9_-]*` id or empty), zero-padded |
//! | 248    | 4    | `reserved1`       | must be 0                                                 |
//! | 252    | 4    | `header_crc32`    | crc32 (IEEE) of bytes 0..252                              |
//!
//! Each entry is `offset: u64, len: u64`. The entries are whole 4 KiB blocks (offset a
//! multiple of 4096; end a multiple of 4096 or the disk's end), inside the disk,
//! ascending and merged (each starts after the previous one's end, never at it).
//! After them, `table_crc32`: crc32 (IEEE) of every entry byte.
//!
//! # Reading and writing
//!
//! [`write()`] takes the extents in ascending order (any alignment: each is grown to the
//! 4 KiB blocks it touches, overlapping or touching ones are merged), streams them to
//! a temp file and replaces the list with [`storage::write_atomic_with`] (synced,
//! renamed, directory synced): a crash leaves the old list or the new one.
//! [`read()`] streams a list back through a callback with every check above, in bounded
//! memory (one chunk of entries at a time), whatever the disk's size; [`check`] reads
//! one for a given disk and size and keeps nothing. Every error names what is wrong;
//! nothing in a file is trusted before its check (lengths are checked against the
//! file's size before anything is read). A list whose table crc turns out wrong at the
//! end has already handed its entries to the callback: callers that act on entries
//! [`check`] the list first, and every entry handed out is inside the disk whatever
//! the crc says.

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::bitmap::DISK_BYTES_MAX;
use crate::extent::{Extent, SECTOR_BYTES};
use crate::le::{u16_at, u32_at, u64_at};
use crate::storage::{self, OpenMode, Storage, StorageFile};

/// The file magic. Never modify: it names the format on disk.
pub const MAGIC: [u8; 8] = *b"BRCHGLST";
/// The format version written and read by this code.
pub const VERSION: u16 = 1;
/// Bytes of the header.
pub const HEADER_BYTES: usize = 256;
/// Bytes of one entry.
pub const ENTRY_BYTES: usize = 16;
/// The unit of a list: a dirty bitmap's block.
pub const BLOCK_BYTES: u64 = 4096;
/// Entries read or written at a time (64 KiB): the memory a list costs.
pub const CHUNK_ENTRIES: usize = 4096;
/// The name a list usually has: `<disk>.chg`.
pub const FILE_SUFFIX: &str = ".chg";

const ID_FIELD_BYTES: usize = 64;
const OFF_VERSION: usize = 8;
const OFF_ORIGIN: usize = 10;
const OFF_GROUP_LEN: usize = 11;
const OFF_DISK_LEN: usize = 12;
const OFF_NODE_LEN: usize = 13;
const OFF_RESERVED0: usize = 14;
const OFF_DISK_BYTES: usize = 16;
const OFF_POINT: usize = 24;
const OFF_CREATED: usize = 32;
const OFF_COUNT: usize = 40;
const OFF_BLOCKS: usize = 48;
const OFF_GROUP: usize = 56;
const OFF_DISK: usize = OFF_GROUP + ID_FIELD_BYTES;
const OFF_NODE: usize = OFF_DISK + ID_FIELD_BYTES;
const OFF_RESERVED1: usize = OFF_NODE + ID_FIELD_BYTES;
const OFF_CRC: usize = HEADER_BYTES - 4;

const _: () = assert!(OFF_DISK == 120 && OFF_NODE == 184 && OFF_RESERVED1 == 248);
const _: () = assert!(OFF_CRC == 252);

/// Who wrote a list, and so what its blocks are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A master target's journal frames after a point: written by the other site,
    /// journaled here, not in the disks failed back to the point.
    FramesAfterPoint,
    /// A process server's dirty blocks: written to its disk, not acknowledged by the
    /// master target (or not known to be).
    Unacknowledged,
}

impl Origin {
    fn to_u8(self) -> u8 {
        match self {
            Origin::FramesAfterPoint => 1,
            Origin::Unacknowledged => 2,
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Origin::FramesAfterPoint),
            2 => Some(Origin::Unacknowledged),
            _ => None,
        }
    }

    /// A word for people and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Origin::FramesAfterPoint => "frames-after-point",
            Origin::Unacknowledged => "unacknowledged-writes",
        }
    }
}

/// What a list is about (the header without its counts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    pub origin: Origin,
    pub group: String,
    pub disk: String,
    /// The node id of the master target or process server that wrote it; may be empty.
    pub node: String,
    pub disk_bytes: u64,
    /// The point it relates to, when known.
    pub point_id: Option<u64>,
    pub created_unix_ms: u64,
}

/// A list's header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub meta: Meta,
    /// Entries in the list.
    pub extent_count: u64,
    /// 4 KiB blocks they cover.
    pub block_count: u64,
}

impl Header {
    /// A sentence saying what the list is, for logs and summaries.
    pub fn describe(&self) -> String {
        let m = &self.meta;
        let who = if m.node.is_empty() {
            String::new()
        } else {
            format!(" {}", m.node)
        };
        let point = m
            .point_id
            .map_or_else(|| "an unknown point".to_string(), |p| format!("point {p}"));
        match m.origin {
            Origin::FramesAfterPoint => format!(
                "frames after {point} at master target{who} (group {}, disk {})",
                m.group, m.disk
            ),
            Origin::Unacknowledged => format!(
                "writes not acknowledged since {point} at process server{who} (group {}, disk {})",
                m.group, m.disk
            ),
        }
    }
}

/// Why a list could not be written or read.
#[derive(Debug, Error)]
pub enum ChangeListError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("truncated: {field} needs {need} bytes, {got} there")]
    Truncated {
        field: &'static str,
        need: u64,
        got: u64,
    },
    #[error("not a change list (magic {found:02x?})")]
    BadMagic { found: [u8; 8] },
    #[error("change list version {found} is unknown (this build reads version {VERSION})")]
    UnsupportedVersion { found: u16 },
    #[error("{what} crc32 mismatch (stored {stored:08x}, computed {computed:08x}): damaged")]
    Crc {
        what: &'static str,
        stored: u32,
        computed: u32,
    },
    #[error("{field}: {why}")]
    Invalid { field: &'static str, why: String },
    #[error(
        "extent {offset}+{len} does not come after byte {after}: the extents must ascend, merged"
    )]
    Unsorted { offset: u64, len: u64, after: u64 },
    #[error("the list is for disk {found:?}, not {expected:?}")]
    WrongDisk { expected: String, found: String },
    #[error("the list is for a disk of {found} bytes, disk {disk:?} has {expected}")]
    WrongSize {
        disk: String,
        expected: u64,
        found: u64,
    },
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: Box<ChangeListError>,
    },
}

impl From<io::Error> for ChangeListError {
    fn from(source: io::Error) -> Self {
        ChangeListError::Io {
            what: "write change list",
            source,
        }
    }
}

fn invalid(field: &'static str, why: impl Into<String>) -> ChangeListError {
    ChangeListError::Invalid {
        field,
        why: why.into(),
    }
}

fn in_file(path: &Path) -> impl FnOnce(ChangeListError) -> ChangeListError + '_ {
    move |e| ChangeListError::File {
        path: path.to_path_buf(),
        source: Box::new(e),
    }
}

/// The usual file name of `disk`'s list: `<disk>.chg`.
pub fn file_name(disk: &str) -> String {
    format!("{disk}{FILE_SUFFIX}")
}

/// The most entries a list of a disk of `disk_bytes` can hold: merged entries leave a
/// block out between each two.
pub fn extents_max(disk_bytes: u64) -> u64 {
    disk_bytes.div_ceil(BLOCK_BYTES).div_ceil(2)
}

fn check_meta(m: &Meta) -> Result<(), ChangeListError> {
    if !crate::valid_id(&m.group) {
        return Err(invalid("group", format!("{:?} is not a valid id", m.group)));
    }
    if !crate::valid_id(&m.disk) {
        return Err(invalid("disk", format!("{:?} is not a valid id", m.disk)));
    }
    if !m.node.is_empty() && !crate::valid_id(&m.node) {
        return Err(invalid("node", format!("{:?} is not a valid id", m.node)));
    }
    if m.disk_bytes == 0
        || !m.disk_bytes.is_multiple_of(SECTOR_BYTES)
        || m.disk_bytes > DISK_BYTES_MAX
    {
        return Err(invalid(
            "disk_bytes",
            format!(
                "{} is not a multiple of 512 in 512..={DISK_BYTES_MAX}",
                m.disk_bytes
            ),
        ));
    }
    if m.point_id == Some(0) {
        return Err(invalid("point_id", "0 means unknown: say None"));
    }
    Ok(())
}

fn encode_header(h: &Header) -> [u8; HEADER_BYTES] {
    let m = &h.meta;
    let mut b = [0u8; HEADER_BYTES];
    b[..8].copy_from_slice(&MAGIC);
    b[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&VERSION.to_le_bytes());
    b[OFF_ORIGIN] = m.origin.to_u8();
    b[OFF_GROUP_LEN] = m.group.len() as u8;
    b[OFF_DISK_LEN] = m.disk.len() as u8;
    b[OFF_NODE_LEN] = m.node.len() as u8;
    b[OFF_DISK_BYTES..OFF_DISK_BYTES + 8].copy_from_slice(&m.disk_bytes.to_le_bytes());
    b[OFF_POINT..OFF_POINT + 8].copy_from_slice(&m.point_id.unwrap_or(0).to_le_bytes());
    b[OFF_CREATED..OFF_CREATED + 8].copy_from_slice(&m.created_unix_ms.to_le_bytes());
    b[OFF_COUNT..OFF_COUNT + 8].copy_from_slice(&h.extent_count.to_le_bytes());
    b[OFF_BLOCKS..OFF_BLOCKS + 8].copy_from_slice(&h.block_count.to_le_bytes());
    b[OFF_GROUP..OFF_GROUP + m.group.len()].copy_from_slice(m.group.as_bytes());
    b[OFF_DISK..OFF_DISK + m.disk.len()].copy_from_slice(m.disk.as_bytes());
    b[OFF_NODE..OFF_NODE + m.node.len()].copy_from_slice(m.node.as_bytes());
    let crc = crc32fast::hash(&b[..OFF_CRC]);
    b[OFF_CRC..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// The id in a zero-padded field of `len` bytes; `empty_ok` for the node.
fn decode_id(
    b: &[u8; HEADER_BYTES],
    field: &'static str,
    at: usize,
    len: u8,
    empty_ok: bool,
) -> Result<String, ChangeListError> {
    let len = len as usize;
    if len > ID_FIELD_BYTES || (len == 0 && !empty_ok) {
        return Err(invalid(field, format!("length {len} outside 1..=64")));
    }
    let raw = &b[at..at + ID_FIELD_BYTES];
    if raw[len..].iter().any(|&c| c != 0) {
        return Err(invalid(field, "padding after the id is not zero"));
    }
    let id = std::str::from_utf8(&raw[..len])
        .ok()
        .filter(|s| s.is_empty() || crate::valid_id(s))
        .ok_or_else(|| invalid(field, format!("{:?} is not a valid id", &raw[..len])))?;
    Ok(id.to_string())
}

/// Decodes and checks a header read from a file of `file_bytes` bytes.
fn decode_header(b: &[u8; HEADER_BYTES], file_bytes: u64) -> Result<Header, ChangeListError> {
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&b[..8]);
    if magic != MAGIC {
        return Err(ChangeListError::BadMagic { found: magic });
    }
    let version = u16_at(b, OFF_VERSION);
    if version != VERSION {
        return Err(ChangeListError::UnsupportedVersion { found: version });
    }
    let stored = u32_at(b, OFF_CRC);
    let computed = crc32fast::hash(&b[..OFF_CRC]);
    if stored != computed {
        return Err(ChangeListError::Crc {
            what: "header",
            stored,
            computed,
        });
    }
    if u16_at(b, OFF_RESERVED0) != 0 {
        return Err(invalid("reserved0", "must be 0"));
    }
    if u32_at(b, OFF_RESERVED1) != 0 {
        return Err(invalid("reserved1", "must be 0"));
    }
    let origin = Origin::from_u8(b[OFF_ORIGIN])
        .ok_or_else(|| invalid("origin", format!("{} is neither 1 nor 2", b[OFF_ORIGIN])))?;
    let point = u64_at(b, OFF_POINT);
    let meta = Meta {
        origin,
        group: decode_id(b, "group", OFF_GROUP, b[OFF_GROUP_LEN], false)?,
        disk: decode_id(b, "disk", OFF_DISK, b[OFF_DISK_LEN], false)?,
        node: decode_id(b, "node", OFF_NODE, b[OFF_NODE_LEN], true)?,
        disk_bytes: u64_at(b, OFF_DISK_BYTES),
        point_id: (point != 0).then_some(point),
        created_unix_ms: u64_at(b, OFF_CREATED),
    };
    check_meta(&meta)?;
    let extent_count = u64_at(b, OFF_COUNT);
    let most = extents_max(meta.disk_bytes);
    if extent_count > most {
        return Err(invalid(
            "extent_count",
            format!(
                "{extent_count} is more than a disk of {} bytes can have ({most})",
                meta.disk_bytes
            ),
        ));
    }
    let block_count = u64_at(b, OFF_BLOCKS);
    if block_count > meta.disk_bytes.div_ceil(BLOCK_BYTES) || block_count < extent_count {
        return Err(invalid(
            "block_count",
            format!("{block_count} does not fit {extent_count} extents of the disk"),
        ));
    }
    // Bounded by the checks above: no overflow.
    let need = HEADER_BYTES as u64 + extent_count * ENTRY_BYTES as u64 + 4;
    if file_bytes < need {
        return Err(ChangeListError::Truncated {
            field: "extent table",
            need,
            got: file_bytes,
        });
    }
    if file_bytes > need {
        return Err(invalid(
            "file length",
            format!("{file_bytes} bytes, the header says {need}"),
        ));
    }
    Ok(Header {
        meta,
        extent_count,
        block_count,
    })
}

/// Streams a list from `read` (positional reads of a source of `len` bytes), checking
/// everything (module doc); each entry goes to `each` as it is read.
fn decode_from(
    len: u64,
    read: &mut dyn FnMut(&mut [u8], u64) -> io::Result<()>,
    each: &mut dyn FnMut(Extent),
) -> Result<Header, ChangeListError> {
    if len < HEADER_BYTES as u64 {
        return Err(ChangeListError::Truncated {
            field: "header",
            need: HEADER_BYTES as u64,
            got: len,
        });
    }
    let io = |source| ChangeListError::Io {
        what: "read change list",
        source,
    };
    let mut hb = [0u8; HEADER_BYTES];
    read(&mut hb, 0).map_err(io)?;
    let h = decode_header(&hb, len)?;
    let disk_bytes = h.meta.disk_bytes;
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK_ENTRIES.min(h.extent_count as usize) * ENTRY_BYTES];
    let mut at = HEADER_BYTES as u64;
    let mut left = h.extent_count;
    let mut prev_end: Option<u64> = None;
    let mut blocks = 0u64;
    while left > 0 {
        let n = left.min(CHUNK_ENTRIES as u64) as usize;
        let chunk = &mut buf[..n * ENTRY_BYTES];
        read(chunk, at).map_err(io)?;
        crc.update(chunk);
        for e in chunk.chunks_exact(ENTRY_BYTES) {
            let (offset, elen) = (u64_at(e, 0), u64_at(e, 8));
            let end = offset.checked_add(elen).filter(|&x| x <= disk_bytes);
            let Some(end) = end.filter(|_| elen > 0) else {
                return Err(invalid(
                    "extent",
                    format!("{offset}+{elen} is empty or past the disk's end ({disk_bytes})"),
                ));
            };
            if !offset.is_multiple_of(BLOCK_BYTES)
                || !(end.is_multiple_of(BLOCK_BYTES) || end == disk_bytes)
            {
                return Err(invalid(
                    "extent",
                    format!("{offset}+{elen} is not whole 4 KiB blocks"),
                ));
            }
            if let Some(p) = prev_end
                && offset <= p
            {
                return Err(ChangeListError::Unsorted {
                    offset,
                    len: elen,
                    after: p,
                });
            }
            prev_end = Some(end);
            blocks += end.div_ceil(BLOCK_BYTES) - offset / BLOCK_BYTES;
            each(Extent { offset, len: elen });
        }
        at += chunk.len() as u64;
        left -= n as u64;
    }
    let mut cb = [0u8; 4];
    read(&mut cb, at).map_err(io)?;
    let (stored, computed) = (u32::from_le_bytes(cb), crc.finalize());
    if stored != computed {
        return Err(ChangeListError::Crc {
            what: "extent table",
            stored,
            computed,
        });
    }
    if blocks != h.block_count {
        return Err(invalid(
            "block_count",
            format!(
                "{} in the header, the extents cover {blocks}",
                h.block_count
            ),
        ));
    }
    Ok(h)
}

/// Decodes a whole list held in memory (tests, small lists).
pub fn decode(bytes: &[u8]) -> Result<(Header, Vec<Extent>), ChangeListError> {
    let mut out = Vec::new();
    let h = decode_from(
        bytes.len() as u64,
        &mut |buf, at| {
            let from = usize::try_from(at).map_err(io::Error::other)?;
            let src = bytes
                .get(from..from + buf.len())
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            buf.copy_from_slice(src);
            Ok(())
        },
        &mut |e| out.push(e),
    )?;
    Ok((h, out))
}

/// Reads the list at `path`, handing every entry to `each` in order; returns its header.
/// Errors name the file.
pub fn read(
    fs: &dyn Storage,
    path: &Path,
    each: &mut dyn FnMut(Extent),
) -> Result<Header, ChangeListError> {
    let r = (|| {
        let f = fs
            .open(path, OpenMode::ReadOnly)
            .map_err(|source| ChangeListError::Io {
                what: "open change list",
                source,
            })?;
        let len = f.len().map_err(|source| ChangeListError::Io {
            what: "stat change list",
            source,
        })?;
        decode_from(len, &mut |buf, at| f.read_exact_at(buf, at), each)
    })();
    r.map_err(in_file(path))
}

/// Reads the list at `path` through (every check, nothing kept) and checks that it is
/// for disk `disk` of `disk_bytes` bytes. Errors name the file.
pub fn check(
    fs: &dyn Storage,
    path: &Path,
    disk: &str,
    disk_bytes: u64,
) -> Result<Header, ChangeListError> {
    let h = read(fs, path, &mut |_| {})?;
    let wrong = if h.meta.disk != disk {
        Some(ChangeListError::WrongDisk {
            expected: disk.to_string(),
            found: h.meta.disk.clone(),
        })
    } else if h.meta.disk_bytes != disk_bytes {
        Some(ChangeListError::WrongSize {
            disk: disk.to_string(),
            expected: disk_bytes,
            found: h.meta.disk_bytes,
        })
    } else {
        None
    };
    match wrong {
        Some(e) => Err(in_file(path)(e)),
        None => Ok(h),
    }
}

/// Builds the entries of a list from ascending extents: grown to whole blocks, merged,
/// checked against the disk; each finished chunk of entry bytes goes to `out`.
struct Entries<'a> {
    disk_bytes: u64,
    run: Option<(u64, u64)>,
    prev_offset: u64,
    chunk: Vec<u8>,
    crc: crc32fast::Hasher,
    extent_count: u64,
    block_count: u64,
    out: &'a mut dyn FnMut(&[u8]) -> Result<(), ChangeListError>,
}

impl Entries<'_> {
    fn push(&mut self, e: Extent) -> Result<(), ChangeListError> {
        let end = e
            .offset
            .checked_add(e.len)
            .filter(|&x| x <= self.disk_bytes && e.len > 0)
            .ok_or_else(|| {
                invalid(
                    "extent",
                    format!(
                        "{}+{} is empty or past the disk's end ({})",
                        e.offset, e.len, self.disk_bytes
                    ),
                )
            })?;
        if e.offset < self.prev_offset {
            return Err(ChangeListError::Unsorted {
                offset: e.offset,
                len: e.len,
                after: self.prev_offset,
            });
        }
        self.prev_offset = e.offset;
        let start = e.offset / BLOCK_BYTES * BLOCK_BYTES;
        let end = end
            .div_ceil(BLOCK_BYTES)
            .saturating_mul(BLOCK_BYTES)
            .min(self.disk_bytes);
        match &mut self.run {
            Some((_, run_end)) if start <= *run_end => *run_end = (*run_end).max(end),
            _ => {
                if let Some(run) = self.run.replace((start, end)) {
                    self.emit(run)?;
                }
            }
        }
        Ok(())
    }

    fn emit(&mut self, (start, end): (u64, u64)) -> Result<(), ChangeListError> {
        self.chunk.extend_from_slice(&start.to_le_bytes());
        self.chunk.extend_from_slice(&(end - start).to_le_bytes());
        self.extent_count += 1;
        self.block_count += end.div_ceil(BLOCK_BYTES) - start / BLOCK_BYTES;
        if self.chunk.len() >= CHUNK_ENTRIES * ENTRY_BYTES {
            self.drain()?;
        }
        Ok(())
    }

    fn drain(&mut self) -> Result<(), ChangeListError> {
        if !self.chunk.is_empty() {
            self.crc.update(&self.chunk);
            (self.out)(&self.chunk)?;
            self.chunk.clear();
        }
        Ok(())
    }

    /// Emits the last run and the rest; returns the table's crc.
    fn finish(mut self) -> Result<(u64, u64, u32), ChangeListError> {
        if let Some(run) = self.run.take() {
            self.emit(run)?;
        }
        self.drain()?;
        Ok((self.extent_count, self.block_count, self.crc.finalize()))
    }
}

/// A positional write of list bytes.
type PutAt<'a> = dyn FnMut(&[u8], u64) -> Result<(), ChangeListError> + 'a;

/// Writes a list through `put` (positional writes), returning its header.
fn encode_to(
    meta: &Meta,
    extents: &mut dyn Iterator<Item = Extent>,
    put: &mut PutAt<'_>,
) -> Result<Header, ChangeListError> {
    check_meta(meta)?;
    let mut at = HEADER_BYTES as u64;
    let mut out = |chunk: &[u8]| -> Result<(), ChangeListError> {
        put(chunk, at)?;
        at += chunk.len() as u64;
        Ok(())
    };
    let mut entries = Entries {
        disk_bytes: meta.disk_bytes,
        run: None,
        prev_offset: 0,
        chunk: Vec::new(),
        crc: crc32fast::Hasher::new(),
        extent_count: 0,
        block_count: 0,
        out: &mut out,
    };
    for e in extents {
        entries.push(e)?;
    }
    let (extent_count, block_count, crc) = entries.finish()?;
    let end = HEADER_BYTES as u64 + extent_count * ENTRY_BYTES as u64;
    put(&crc.to_le_bytes(), end)?;
    let h = Header {
        meta: meta.clone(),
        extent_count,
        block_count,
    };
    put(&encode_header(&h), 0)?;
    Ok(h)
}

/// Encodes a whole list in memory (tests, small lists).
pub fn encode(
    meta: &Meta,
    extents: impl IntoIterator<Item = Extent>,
) -> Result<Vec<u8>, ChangeListError> {
    let mut out = Vec::new();
    encode_to(meta, &mut extents.into_iter(), &mut |b, at| {
        let at = at as usize;
        if out.len() < at + b.len() {
            out.resize(at + b.len(), 0);
        }
        out[at..at + b.len()].copy_from_slice(b);
        Ok(())
    })?;
    Ok(out)
}

/// Writes the list `dir/name` durably (module doc) from `extents`, ascending by
/// offset; returns its header. `dir` must exist.
pub fn write(
    fs: &dyn Storage,
    dir: &Path,
    name: &str,
    meta: &Meta,
    extents: impl IntoIterator<Item = Extent>,
) -> Result<Header, ChangeListError> {
    let mut header = None;
    storage::write_atomic_with(fs, dir, name, |f: &dyn StorageFile| {
        let h = encode_to(meta, &mut extents.into_iter(), &mut |b, at| {
            Ok(f.write_all_at(b, at)?)
        })?;
        header = Some(h);
        Ok::<(), ChangeListError>(())
    })
    .map_err(in_file(&dir.join(name)))?;
    header.ok_or_else(|| invalid("list", "not written"))
}

#[cfg(test)]
mod tests;
