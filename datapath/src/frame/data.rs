//! Data frames (kind 1): extents of one disk, their blake3 hashes and one payload.
//!
//! The byte layout is in the doc of [`crate::frame`]. This file holds the encoder (with
//! its cheap incompressibility test), the decoder and the extent checks both share.

use super::{
    FrameError, FrameHeader, FrameKind, MAX_BODY_BYTES, Reader, begin, put_id, seal, verify_kind,
};
use crate::extent::{ExtentData, SECTOR_BYTES};

/// Hard bound on the extents of one data frame; checked before the table is allocated.
pub const MAX_EXTENTS: u32 = 4096;
/// Hard bound on the plain (uncompressed) bytes of the non-zero extents of one frame.
pub const MAX_PLAIN_BYTES: u32 = 16 << 20;
/// Hard bound on the bytes covered by the zero extents of one frame (1 TiB): a trim of
/// a larger range takes several frames.
pub const MAX_ZERO_BYTES: u64 = 1 << 40;
/// The zstd level a new encoder uses unless told otherwise.
///
/// Chosen by measurement (`cargo bench --bench datapath -- encode/realistic`, 1 MiB
/// frames of 64 KiB extents of this machine's files under /usr, one core of a 2-vCPU
/// AMD EPYC): level 1 encodes ~384 MB/s at ratio 2.15, level -1 ~438 MB/s at 1.86,
/// level -2 ~492 MB/s at 1.78, level -3 ~532 MB/s at 1.69. The data path must carry
/// ~450 MB/s of realistic data per core, so -2 is the default; a slow WAN link is
/// better served by level 1 or higher, which the configuration can choose.
pub const DEFAULT_ZSTD_LEVEL: i32 = -2;
/// Bytes of the fixed part of a data body, before the group id.
pub const DATA_FIXED_BYTES: usize = 24;
/// Bytes of one extent table entry.
pub const EXTENT_ENTRY_BYTES: usize = 56;
/// Extent flag: the extent is all zeros and has no bytes in the payload.
pub const EXTENT_FLAG_ZERO: u32 = 1;

/// Bytes of one sample the encoder compresses to guess whether the payload compresses.
const SAMPLE_BYTES: usize = 4096;
/// Samples taken, spread evenly from the start to the end of the payload.
const SAMPLE_COUNT: usize = 3;
/// The samples together must shrink by at least this many percent for the encoder to
/// spend a compression pass on the whole payload.
const SAMPLE_MIN_SAVING_PERCENT: usize = 3;
/// Payloads up to this size are compressed whole without sampling: the whole pass costs
/// about as much as the samples would.
const SAMPLE_SKIP_MAX_BYTES: usize = 32 << 10;
/// Longest id on the wire (see [`crate::valid_id`]).
const ID_BYTES_MAX: usize = 64;

// The largest data body the bounds allow must fit in a frame: an encoder that respects
// the bounds can never trip the body-length assertion of `seal`.
const _: () = assert!(
    DATA_FIXED_BYTES
        + 2 * (1 + ID_BYTES_MAX)
        + MAX_EXTENTS as usize * EXTENT_ENTRY_BYTES
        + MAX_PLAIN_BYTES as usize
        <= MAX_BODY_BYTES as usize
);
const _: () = assert!(EXTENT_ENTRY_BYTES == 8 + 8 + 4 + 4 + 32);
const _: () = assert!(SAMPLE_SKIP_MAX_BYTES >= SAMPLE_COUNT * SAMPLE_BYTES);

/// How the payload of a data frame is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PayloadEncoding {
    /// No payload: every extent is a zero extent.
    None = 0,
    /// The plain bytes as they are (zstd would not shrink them).
    Raw = 1,
    /// One zstd frame that decompresses to exactly the plain bytes.
    Zstd = 2,
}

impl PayloadEncoding {
    /// The encoding for a body byte, or `None` when unknown.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::None,
            1 => Self::Raw,
            2 => Self::Zstd,
            _ => return None,
        })
    }
}

/// Who a data frame belongs to: group, disk and the epoch of its writes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DataFrameMeta {
    pub group: String,
    pub disk: String,
    pub epoch: u64,
}

/// What [`Encoder::encode_data`] did with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncodeStats {
    /// Bytes of the non-zero extents (the plain payload).
    pub plain_bytes: u64,
    /// Bytes covered by zero extents (given as zero, or found to be zero).
    pub zero_bytes: u64,
    /// Bytes of the payload as stored in the frame.
    pub payload_bytes: u64,
    pub encoding: PayloadEncoding,
}

/// One entry of a data frame's extent table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExtentEntry {
    pub offset: u64,
    pub len: u64,
    /// All zeros, no payload bytes.
    pub zero: bool,
    /// blake3 of the plain bytes; all zeros for a zero extent.
    pub hash: [u8; 32],
}

impl ExtentEntry {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Whether every byte of `b` is zero. Folds 64-byte chunks with OR so the compiler can
/// vectorise, and stops at the first chunk that is not zero (random data: at once).
fn is_all_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    for c in &mut chunks {
        if c.iter().fold(0u8, |acc, &x| acc | x) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&x| x == 0)
}

/// Checks one extent against the rules every data frame keeps (sector-aligned, not empty,
/// no overflow, starting at or after `prev_end`) and returns its end.
fn check_extent(index: usize, offset: u64, len: u64, prev_end: u64) -> Result<u64, FrameError> {
    if !offset.is_multiple_of(SECTOR_BYTES) {
        return Err(FrameError::Invalid {
            field: "extent.offset",
            why: format!("extent {index}: offset {offset} is not a multiple of {SECTOR_BYTES}"),
        });
    }
    if len == 0 || !len.is_multiple_of(SECTOR_BYTES) {
        return Err(FrameError::Invalid {
            field: "extent.len",
            why: format!(
                "extent {index}: length {len} is not a positive multiple of {SECTOR_BYTES}"
            ),
        });
    }
    let end = offset.checked_add(len).ok_or_else(|| FrameError::Invalid {
        field: "extent.len",
        why: format!("extent {index}: {offset}+{len} overflows"),
    })?;
    if offset < prev_end {
        return Err(FrameError::Invalid {
            field: "extent.offset",
            why: format!(
                "extent {index} starts at {offset}, before the end {prev_end} of the one \
                 before it (extents must ascend without overlap)"
            ),
        });
    }
    Ok(end)
}

/// Refuses an id the wire cannot carry, instead of letting `put_id` panic.
pub(super) fn check_id(field: &'static str, id: &str) -> Result<(), FrameError> {
    if crate::valid_id(id) {
        Ok(())
    } else {
        Err(FrameError::Invalid {
            field,
            why: format!("{id:?} is not an id ([a-z0-9][a-z0-9_-]{{0,63}})"),
        })
    }
}

/// The bytes of the non-zero extents, in order, as `zero` classified them.
fn data_slices<'a>(
    extents: &'a [(u64, ExtentData<'a>)],
    zero: &'a [bool],
) -> impl Iterator<Item = &'a [u8]> + 'a {
    extents.iter().zip(zero).filter_map(|((_, d), &z)| match d {
        ExtentData::Bytes(b) if !z => Some(*b),
        _ => None,
    })
}

/// Copies `dst.len()` bytes starting at `pos` of the concatenation of `slices` into `dst`.
fn gather<'a>(slices: impl Iterator<Item = &'a [u8]>, mut pos: usize, dst: &mut [u8]) {
    let mut filled = 0;
    for s in slices {
        if filled == dst.len() {
            break;
        }
        if pos >= s.len() {
            pos -= s.len();
            continue;
        }
        let take = (s.len() - pos).min(dst.len() - filled);
        dst[filled..filled + take].copy_from_slice(&s[pos..pos + take]);
        filled += take;
        pos = 0;
    }
    debug_assert_eq!(filled, dst.len(), "gather past the end of the payload");
}

/// Builds data frames. Holds a zstd context and scratch buffers reused across frames;
/// one per thread (the caller parallelises over frames).
pub struct Encoder {
    /// `None` stores every payload raw.
    compressor: Option<zstd::bulk::Compressor<'static>>,
    /// Per extent of the frame being built: whether it is stored as a zero extent.
    zero: Vec<bool>,
    /// The concatenated plain bytes when a frame has several non-zero extents.
    plain: Vec<u8>,
    /// One sample in, one sample out.
    sample_in: Vec<u8>,
    sample_out: Vec<u8>,
}

impl Encoder {
    /// An encoder compressing with zstd at `level` (clamped to zstd's range).
    pub fn new(level: i32) -> Self {
        let range = zstd::compression_level_range();
        let level = level.clamp(*range.start(), *range.end());
        // Creating a context only fails when zstd cannot allocate it, as a Vec would.
        let compressor = zstd::bulk::Compressor::new(level).expect("zstd compression context");
        Self {
            compressor: Some(compressor),
            ..Self::uncompressed()
        }
    }

    /// An encoder that stores every payload raw: for links where the CPU, not the
    /// bandwidth, is the bottleneck, and for golden tests independent of zstd's output.
    pub fn uncompressed() -> Self {
        Self {
            compressor: None,
            zero: Vec::new(),
            plain: Vec::new(),
            sample_in: vec![0; SAMPLE_BYTES],
            sample_out: vec![0; SAMPLE_BYTES],
        }
    }

    /// Encodes the extents of one disk into a data frame with sequence `seq` in `out`
    /// (cleared first). `extents` must be sector-aligned, non-empty, ascending and
    /// non-overlapping, at most [`MAX_EXTENTS`], with at most [`MAX_PLAIN_BYTES`] of data
    /// and [`MAX_ZERO_BYTES`] of zeros; otherwise the frame is refused and `out` holds
    /// nothing useful. `Bytes` that are all zeros are stored as zero extents.
    pub fn encode_data(
        &mut self,
        meta: &DataFrameMeta,
        seq: u64,
        extents: &[(u64, ExtentData<'_>)],
        out: &mut Vec<u8>,
    ) -> Result<EncodeStats, FrameError> {
        check_id("group", &meta.group)?;
        check_id("disk", &meta.disk)?;
        if extents.is_empty() {
            return Err(FrameError::Invalid {
                field: "extent_count",
                why: "a data frame carries at least one extent".into(),
            });
        }
        if extents.len() > MAX_EXTENTS as usize {
            return Err(FrameError::TooLarge {
                field: "extent_count",
                value: extents.len() as u64,
                max: MAX_EXTENTS.into(),
            });
        }

        // Check and classify every extent before writing anything.
        self.zero.clear();
        let mut plain_bytes = 0u64;
        let mut zero_bytes = 0u64;
        let mut prev_end = 0u64;
        for (index, (offset, data)) in extents.iter().enumerate() {
            prev_end = check_extent(index, *offset, data.len(), prev_end)?;
            let zero = match data {
                ExtentData::Zero(_) => true,
                ExtentData::Bytes(b) => is_all_zero(b),
            };
            if zero {
                zero_bytes += data.len();
                if zero_bytes > MAX_ZERO_BYTES {
                    return Err(FrameError::TooLarge {
                        field: "zero extents",
                        value: zero_bytes,
                        max: MAX_ZERO_BYTES,
                    });
                }
            } else {
                plain_bytes += data.len();
                if plain_bytes > MAX_PLAIN_BYTES.into() {
                    return Err(FrameError::TooLarge {
                        field: "plain_bytes",
                        value: plain_bytes,
                        max: MAX_PLAIN_BYTES.into(),
                    });
                }
            }
            self.zero.push(zero);
        }

        begin(out);
        // One allocation at most for the whole frame (the raw payload is the largest).
        out.reserve(
            DATA_FIXED_BYTES
                + 2
                + meta.group.len()
                + meta.disk.len()
                + extents.len() * EXTENT_ENTRY_BYTES
                + plain_bytes as usize,
        );
        out.extend_from_slice(&meta.epoch.to_le_bytes());
        out.extend_from_slice(&(extents.len() as u32).to_le_bytes());
        let encoding_at = out.len();
        out.extend_from_slice(&[0, 0, 0, 0]); // encoding (filled in below) + reserved
        out.extend_from_slice(&(plain_bytes as u32).to_le_bytes());
        let payload_len_at = out.len();
        out.extend_from_slice(&[0, 0, 0, 0]); // payload_bytes, filled in below
        put_id(out, &meta.group);
        put_id(out, &meta.disk);
        for ((offset, data), &zero) in extents.iter().zip(&self.zero) {
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&data.len().to_le_bytes());
            let flags = if zero { EXTENT_FLAG_ZERO } else { 0 };
            out.extend_from_slice(&flags.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            // The hash is filled in below, once the payload is built.
            out.extend_from_slice(&[0; 32]);
        }
        let table_end = out.len();

        let payload_start = out.len();
        let encoding = if plain_bytes == 0 {
            PayloadEncoding::None
        } else {
            self.write_payload(extents, plain_bytes as usize, out)
        };
        let payload_bytes = out.len() - payload_start;

        // blake3 of each non-zero extent, hashed from the copy that was touched last (the
        // raw payload in `out`, or the concatenation zstd just read), which is still in
        // cache, rather than from the caller's buffers a second time.
        let single = data_slices(extents, &self.zero).nth(1).is_none();
        let (head, payload) = out.split_at_mut(table_end);
        let plain_copy: Option<&[u8]> = match encoding {
            PayloadEncoding::Raw => Some(&payload[..]),
            PayloadEncoding::Zstd if !single => Some(&self.plain[..]),
            _ => None,
        };
        let mut pos = 0usize;
        let entries_at = table_end - extents.len() * EXTENT_ENTRY_BYTES;
        for (i, ((_, data), &zero)) in extents.iter().zip(&self.zero).enumerate() {
            let ExtentData::Bytes(b) = data else { continue };
            if zero {
                continue;
            }
            let src = match plain_copy {
                Some(copy) => &copy[pos..pos + b.len()],
                None => b,
            };
            pos += b.len();
            let at = entries_at + i * EXTENT_ENTRY_BYTES + 24;
            head[at..at + 32].copy_from_slice(blake3::hash(src).as_bytes());
        }
        out[encoding_at] = encoding as u8;
        out[payload_len_at..payload_len_at + 4]
            .copy_from_slice(&(payload_bytes as u32).to_le_bytes());
        seal(out, FrameKind::Data, seq);
        Ok(EncodeStats {
            plain_bytes,
            zero_bytes,
            payload_bytes: payload_bytes as u64,
            encoding,
        })
    }

    /// Appends the payload of the non-zero extents (`plain` bytes, more than zero) to
    /// `out`, compressed when that pays, and says how it is stored.
    ///
    /// The heuristic, so that incompressible data costs one copy and no compression pass:
    /// payloads above `SAMPLE_SKIP_MAX_BYTES` first have `SAMPLE_COUNT` samples of
    /// `SAMPLE_BYTES` compressed (at the start, evenly spread, and at the end). Unless the
    /// samples together shrink by `SAMPLE_MIN_SAVING_PERCENT`, the payload is stored raw.
    /// Otherwise the whole payload is compressed into a buffer one byte smaller than the
    /// plain data, so zstd gives up as soon as it cannot win, and stored raw if it did not
    /// fit. Redundancy only visible at distances longer than a sample (e.g. a repeated
    /// 1 MiB block of random bytes) is missed; that is the price of the cheap test.
    fn write_payload(
        &mut self,
        extents: &[(u64, ExtentData<'_>)],
        plain: usize,
        out: &mut Vec<u8>,
    ) -> PayloadEncoding {
        let Self {
            compressor,
            zero,
            plain: concat,
            sample_in,
            sample_out,
        } = self;
        let payload_start = out.len();
        let Some(compressor) = compressor.as_mut() else {
            for s in data_slices(extents, zero) {
                out.extend_from_slice(s);
            }
            return PayloadEncoding::Raw;
        };

        if plain > SAMPLE_SKIP_MAX_BYTES {
            let mut sampled = 0usize;
            let mut compressed = 0usize;
            for i in 0..SAMPLE_COUNT {
                let pos = i * (plain - SAMPLE_BYTES) / (SAMPLE_COUNT - 1);
                gather(data_slices(extents, zero), pos, sample_in);
                sampled += SAMPLE_BYTES;
                // A sample that does not fit in its own size did not shrink.
                compressed += compressor
                    .compress_to_buffer(sample_in, &mut sample_out[..])
                    .unwrap_or(SAMPLE_BYTES);
            }
            if compressed * 100 > sampled * (100 - SAMPLE_MIN_SAVING_PERCENT) {
                for s in data_slices(extents, zero) {
                    out.extend_from_slice(s);
                }
                return PayloadEncoding::Raw;
            }
        }

        // zstd needs the payload in one piece: a single extent is used where it lies.
        let mut slices = data_slices(extents, zero);
        let src: &[u8] = match (slices.next(), slices.next()) {
            (Some(only), None) => only,
            _ => {
                concat.clear();
                for s in data_slices(extents, zero) {
                    concat.extend_from_slice(s);
                }
                concat
            }
        };
        debug_assert_eq!(src.len(), plain);
        // zstd writes straight into `out` after the extent table, into at most
        // `plain - 1` bytes of spare capacity (no zero-filling first).
        out.reserve(plain);
        let mut tail = Tail {
            vec: out,
            start: payload_start,
            limit: plain - 1,
        };
        // Any failure (almost always: the output did not fit, so zstd could not shrink
        // the payload) means storing raw, which is always correct.
        match compressor.compress_to_buffer(src, &mut tail) {
            Ok(n) if n < plain => {
                debug_assert_eq!(out.len(), payload_start + n);
                PayloadEncoding::Zstd
            }
            _ => {
                out.truncate(payload_start);
                out.extend_from_slice(src);
                PayloadEncoding::Raw
            }
        }
    }
}

/// The spare capacity of a `Vec` after `start`, limited to `limit` bytes, as a zstd
/// output buffer: zstd writes there directly and the `Vec` grows to what it wrote.
struct Tail<'a> {
    vec: &'a mut Vec<u8>,
    start: usize,
    limit: usize,
}

// SAFETY: `as_mut_ptr` points at `start` inside the Vec's allocation, and the caller
// reserved at least `start + limit` bytes of capacity, so the `limit` bytes after it
// are allocated; `filled_until(n)` is only called by zstd after it initialised those
// `n` bytes (n <= limit), so setting the length to `start + n` exposes only
// initialised memory. `start` never exceeds the Vec's length.
unsafe impl zstd::zstd_safe::WriteBuf for Tail<'_> {
    fn as_slice(&self) -> &[u8] {
        &self.vec[self.start..]
    }
    fn capacity(&self) -> usize {
        self.limit
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        assert!(self.start <= self.vec.len() && self.start + self.limit <= self.vec.capacity());
        // SAFETY: `start <= len <= capacity`, checked just above.
        unsafe { self.vec.as_mut_ptr().add(self.start) }
    }
    unsafe fn filled_until(&mut self, n: usize) {
        assert!(n <= self.limit);
        // SAFETY: zstd initialised `n` bytes from `as_mut_ptr()` (trait contract).
        unsafe { self.vec.set_len(self.start + n) }
    }
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new(DEFAULT_ZSTD_LEVEL)
    }
}

/// A decoded and verified data frame: every extent's bytes matched its blake3.
#[derive(Clone, PartialEq, Eq)]
pub struct DataFrame {
    pub seq: u64,
    pub meta: DataFrameMeta,
    extents: Vec<ExtentEntry>,
    /// The plain bytes of the non-zero extents, concatenated in order.
    data: Vec<u8>,
    encoding: PayloadEncoding,
    payload_bytes: u64,
}

impl DataFrame {
    /// The extents in order with their contents.
    pub fn extents(&self) -> impl Iterator<Item = (u64, ExtentData<'_>)> {
        let mut pos = 0usize;
        self.extents.iter().map(move |e| {
            if e.zero {
                (e.offset, ExtentData::Zero(e.len))
            } else {
                // In bounds: decoding checked that the data lengths sum to data.len().
                let bytes = &self.data[pos..pos + e.len as usize];
                pos += e.len as usize;
                (e.offset, ExtentData::Bytes(bytes))
            }
        })
    }

    /// The extent table: offsets, lengths, zero flags and hashes.
    pub fn entries(&self) -> &[ExtentEntry] {
        &self.extents
    }

    /// Bytes of the non-zero extents.
    pub fn plain_bytes(&self) -> u64 {
        self.data.len() as u64
    }

    /// Bytes the plain buffer holds allocated (at least [`DataFrame::plain_bytes`]).
    pub(crate) fn capacity_bytes(&self) -> u64 {
        self.data.capacity() as u64
    }

    /// Bytes covered by zero extents.
    pub fn zero_bytes(&self) -> u64 {
        self.extents.iter().filter(|e| e.zero).map(|e| e.len).sum()
    }

    /// How the payload was stored.
    pub fn encoding(&self) -> PayloadEncoding {
        self.encoding
    }

    /// Bytes of the payload as it was stored.
    pub fn payload_bytes(&self) -> u64 {
        self.payload_bytes
    }
}

impl std::fmt::Debug for DataFrame {
    // The data can be megabytes: show its size, not its bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataFrame")
            .field("seq", &self.seq)
            .field("meta", &self.meta)
            .field("extents", &self.extents)
            .field("plain_bytes", &self.data.len())
            .field("encoding", &self.encoding)
            .field("payload_bytes", &self.payload_bytes)
            .finish()
    }
}

/// The checked table of a data frame, without decompressing or hashing its payload:
/// enough to index a journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataFrameInfo {
    pub seq: u64,
    pub meta: DataFrameMeta,
    pub entries: Vec<ExtentEntry>,
    pub encoding: PayloadEncoding,
    pub plain_bytes: u64,
    pub payload_bytes: u64,
}

/// Verifies a data frame's length and crc and checks its extent table, without
/// decompressing or checking the blake3 hashes (use [`Decoder::decode_data`] for that).
pub fn peek_data(frame: &[u8]) -> Result<DataFrameInfo, FrameError> {
    let (h, body) = verify_kind(frame, FrameKind::Data)?;
    Ok(parse_head(body, body.len())?.info(h.seq))
}

/// The `plain_bytes` field of a data frame this process encoded itself, read without
/// checking its crc: for counting what is shipped, not for trusting a peer's frame (that
/// goes through [`peek_data`]). `None` for another kind or bytes too short to hold it.
pub fn encoded_plain_bytes(frame: &[u8]) -> Option<u32> {
    const AT: usize = super::HEADER_BYTES + 16;
    if frame.get(6) != Some(&(FrameKind::Data as u8)) {
        return None;
    }
    let b: [u8; 4] = frame.get(AT..AT + 4)?.try_into().ok()?;
    Some(u32::from_le_bytes(b))
}

/// A data body whose fields and extent table passed every check.
struct Table<'a> {
    meta: DataFrameMeta,
    entries: Vec<ExtentEntry>,
    encoding: PayloadEncoding,
    plain_bytes: u32,
    payload: &'a [u8],
}

fn invalid(field: &'static str, why: String) -> FrameError {
    FrameError::Invalid { field, why }
}

/// Parses a data body (crc already checked) with every bound checked before allocating.
fn parse_table(body: &[u8]) -> Result<Table<'_>, FrameError> {
    let head = parse_head(body, body.len())?;
    let payload = &body[head.payload_at..];
    Ok(Table {
        meta: head.meta,
        entries: head.entries,
        encoding: head.encoding,
        plain_bytes: head.plain_bytes,
        payload,
    })
}

/// A data body's fields and checked extent table, and where its payload starts.
struct Head {
    meta: DataFrameMeta,
    entries: Vec<ExtentEntry>,
    encoding: PayloadEncoding,
    plain_bytes: u32,
    payload_bytes: u32,
    payload_at: usize,
}

impl Head {
    fn info(self, seq: u64) -> DataFrameInfo {
        DataFrameInfo {
            seq,
            meta: self.meta,
            entries: self.entries,
            encoding: self.encoding,
            plain_bytes: self.plain_bytes.into(),
            payload_bytes: self.payload_bytes.into(),
        }
    }
}

/// Parses the fields and the extent table of a data body of `body_len` bytes from
/// `prefix`, its first bytes (all of it, or at least up to the end of the table).
fn parse_head(prefix: &[u8], body_len: usize) -> Result<Head, FrameError> {
    let mut r = Reader::new(prefix);
    let epoch = r.u64("epoch")?;
    let count = r.u32("extent_count")?;
    if count == 0 {
        return Err(invalid("extent_count", "0; at least one extent".into()));
    }
    if count > MAX_EXTENTS {
        return Err(FrameError::TooLarge {
            field: "extent_count",
            value: count.into(),
            max: MAX_EXTENTS.into(),
        });
    }
    let enc = r.u8("encoding")?;
    let encoding = PayloadEncoding::from_u8(enc)
        .ok_or_else(|| invalid("encoding", format!("{enc} is not 0, 1 or 2")))?;
    if r.take(3, "data.reserved")? != [0, 0, 0] {
        return Err(FrameError::Reserved("data.reserved"));
    }
    let plain_bytes = r.u32("plain_bytes")?;
    if plain_bytes > MAX_PLAIN_BYTES {
        return Err(FrameError::TooLarge {
            field: "plain_bytes",
            value: plain_bytes.into(),
            max: MAX_PLAIN_BYTES.into(),
        });
    }
    let payload_bytes = r.u32("payload_bytes")?;
    if payload_bytes > MAX_PLAIN_BYTES {
        return Err(FrameError::TooLarge {
            field: "payload_bytes",
            value: payload_bytes.into(),
            max: MAX_PLAIN_BYTES.into(),
        });
    }
    // Exactly what the encoder writes: no payload iff no plain bytes; raw is the plain
    // size; zstd is kept only when strictly smaller.
    let consistent = match encoding {
        PayloadEncoding::None => plain_bytes == 0 && payload_bytes == 0,
        PayloadEncoding::Raw => plain_bytes > 0 && payload_bytes == plain_bytes,
        PayloadEncoding::Zstd => payload_bytes > 0 && payload_bytes < plain_bytes,
    };
    if !consistent {
        return Err(invalid(
            "payload_bytes",
            format!("{payload_bytes} does not fit {encoding:?} with plain_bytes {plain_bytes}"),
        ));
    }
    let group = r.id("group")?;
    let disk = r.id("disk")?;
    let table_bytes = count as usize * EXTENT_ENTRY_BYTES;
    let expected = table_bytes + payload_bytes as usize;
    let follow = body_len.saturating_sub(r.pos());
    if follow != expected {
        return Err(invalid(
            "data body",
            format!(
                "{follow} bytes follow the ids; {count} extents and a payload of \
                 {payload_bytes} need {expected}"
            ),
        ));
    }

    // Bounded by MAX_EXTENTS, and the bytes for every entry are known to be present.
    let mut entries = Vec::with_capacity(count as usize);
    let mut prev_end = 0u64;
    let mut data_sum = 0u64;
    let mut zero_sum = 0u64;
    for index in 0..count as usize {
        let offset = r.u64("extent.offset")?;
        let len = r.u64("extent.len")?;
        let flags = r.u32("extent.flags")?;
        let reserved = r.u32("extent.reserved")?;
        let hash: [u8; 32] = r
            .take(32, "extent.blake3")?
            .try_into()
            .map_err(|_| invalid("extent.blake3", "not 32 bytes".into()))?;
        if flags & !EXTENT_FLAG_ZERO != 0 {
            return Err(FrameError::Reserved("extent.flags"));
        }
        if reserved != 0 {
            return Err(FrameError::Reserved("extent.reserved"));
        }
        prev_end = check_extent(index, offset, len, prev_end)?;
        let zero = flags & EXTENT_FLAG_ZERO != 0;
        if zero {
            if hash != [0; 32] {
                return Err(invalid(
                    "extent.blake3",
                    format!("zero extent {index} has a non-zero hash"),
                ));
            }
            zero_sum = zero_sum.saturating_add(len);
            if zero_sum > MAX_ZERO_BYTES {
                return Err(FrameError::TooLarge {
                    field: "zero extents",
                    value: zero_sum,
                    max: MAX_ZERO_BYTES,
                });
            }
        } else {
            data_sum = data_sum.saturating_add(len);
            if data_sum > plain_bytes.into() {
                return Err(invalid(
                    "plain_bytes",
                    format!("{plain_bytes}, but the data extents up to {index} hold {data_sum}"),
                ));
            }
        }
        entries.push(ExtentEntry {
            offset,
            len,
            zero,
            hash,
        });
    }
    if data_sum != u64::from(plain_bytes) {
        return Err(invalid(
            "plain_bytes",
            format!("{plain_bytes}, but the data extents hold {data_sum}"),
        ));
    }
    let payload_at = r.pos();
    if prefix.len() == body_len {
        r.take(payload_bytes as usize, "payload")?;
        r.finish("data body")?;
    }
    Ok(Head {
        meta: DataFrameMeta { group, disk, epoch },
        entries,
        encoding,
        plain_bytes,
        payload_bytes,
        payload_at,
    })
}

/// Bytes of the start of a data frame that always hold its whole extent table: header,
/// fixed fields, two ids of the longest length and [`MAX_EXTENTS`] entries.
pub const DATA_HEAD_BYTES_MAX: usize = super::HEADER_BYTES
    + DATA_FIXED_BYTES
    + 2 * (1 + ID_BYTES_MAX)
    + MAX_EXTENTS as usize * EXTENT_ENTRY_BYTES;

/// The extent table of a data frame from the first bytes of it (at least up to the end
/// of the table; [`DATA_HEAD_BYTES_MAX`] always suffice), without its payload. Every
/// field and extent is checked as in [`peek_data`], but NOT the crc, which covers the
/// whole frame: for indexing frames whose crc was checked when they were stored (a
/// journal); read the whole frame with [`Decoder::decode_data`] before trusting its
/// bytes. A prefix too short for the table is [`FrameError::Truncated`].
pub fn peek_data_head(prefix: &[u8]) -> Result<DataFrameInfo, FrameError> {
    let head: &[u8; super::HEADER_BYTES] = prefix
        .get(..super::HEADER_BYTES)
        .and_then(|h| h.try_into().ok())
        .ok_or(FrameError::Truncated {
            field: "header",
            need: super::HEADER_BYTES,
            got: prefix.len(),
        })?;
    let h = FrameHeader::parse(head)?;
    if h.kind != FrameKind::Data {
        return Err(invalid("kind", format!("{:?}, expected Data", h.kind)));
    }
    let body = &prefix[super::HEADER_BYTES..];
    let body = &body[..body.len().min(h.body_len as usize)];
    Ok(parse_head(body, h.body_len as usize)?.info(h.seq))
}

/// Decodes and verifies frames. Holds a zstd context and a spare plain buffer reused
/// across frames; one per thread.
pub struct Decoder {
    decompressor: zstd::bulk::Decompressor<'static>,
    /// A plain buffer handed back by [`Decoder::recycle`], reused by the next frame.
    spare: Vec<u8>,
}

impl Decoder {
    pub fn new() -> Self {
        // Creating a context only fails when zstd cannot allocate it, as a Vec would.
        let decompressor = zstd::bulk::Decompressor::new().expect("zstd decompression context");
        Self {
            decompressor,
            spare: Vec::new(),
        }
    }

    /// Decodes a data frame: checks length and crc first, then the extent table with
    /// every bound, then decompresses into exactly the declared plain length, then
    /// checks each extent's blake3 ([`FrameError::HashMismatch`]).
    pub fn decode_data(&mut self, frame: &[u8]) -> Result<DataFrame, FrameError> {
        let (h, body) = verify_kind(frame, FrameKind::Data)?;
        self.decode_data_body(&h, body)
    }

    /// Hands a decoded frame's plain buffer back for the next frame to reuse. The spare
    /// is at most [`MAX_PLAIN_BYTES`] (plus allocator slack), like any decoded frame.
    pub fn recycle(&mut self, frame: DataFrame) {
        if frame.data.capacity() > self.spare.capacity() {
            self.spare = frame.data;
        }
    }

    /// Decodes the body of a data frame whose header and crc were checked.
    pub(super) fn decode_data_body(
        &mut self,
        h: &FrameHeader,
        body: &[u8],
    ) -> Result<DataFrame, FrameError> {
        debug_assert_eq!(h.kind, FrameKind::Data);
        let t = parse_table(body)?;
        let mut data = std::mem::take(&mut self.spare);
        data.clear();
        let result = self.fill_and_check(&t, &mut data);
        if let Err(e) = result {
            self.spare = data;
            return Err(e);
        }
        Ok(DataFrame {
            seq: h.seq,
            meta: t.meta,
            extents: t.entries,
            data,
            encoding: t.encoding,
            payload_bytes: t.payload.len() as u64,
        })
    }

    /// Puts the plain bytes of `t` into `data` (empty) and checks every extent's hash.
    fn fill_and_check(&mut self, t: &Table<'_>, data: &mut Vec<u8>) -> Result<(), FrameError> {
        let plain = t.plain_bytes as usize;
        match t.encoding {
            PayloadEncoding::None => {}
            PayloadEncoding::Raw => data.extend_from_slice(t.payload),
            PayloadEncoding::Zstd => {
                // The zstd frame must declare exactly `plain_bytes` (bounded by
                // MAX_PLAIN_BYTES) before a byte is allocated for it: a tiny payload
                // cannot make the decoder reserve megabytes it then throws away.
                match zstd::zstd_safe::get_frame_content_size(t.payload) {
                    Ok(Some(n)) if n == plain as u64 => {}
                    Ok(Some(n)) => {
                        return Err(invalid(
                            "payload",
                            format!("zstd frame declares {n} bytes, plain_bytes says {plain}"),
                        ));
                    }
                    Ok(None) | Err(_) => {
                        return Err(invalid(
                            "payload",
                            "zstd frame header does not declare its content size".into(),
                        ));
                    }
                }
                // zstd writes into the spare capacity (no zero-filling first) and fails
                // if the data does not match the size its header declared.
                data.reserve_exact(plain);
                let n = self
                    .decompressor
                    .decompress_to_buffer(t.payload, data)
                    .map_err(|e| FrameError::Decompress(e.to_string()))?;
                if n != plain {
                    return Err(invalid(
                        "payload",
                        format!("decompresses to {n} bytes, plain_bytes says {plain}"),
                    ));
                }
            }
        }
        let mut pos = 0usize;
        for (index, e) in t.entries.iter().enumerate() {
            if e.zero {
                continue;
            }
            let bytes = data
                .get(pos..pos + e.len as usize)
                .ok_or_else(|| invalid("plain_bytes", "extents run past the data".into()))?;
            if blake3::hash(bytes).as_bytes() != &e.hash {
                return Err(FrameError::HashMismatch { index });
            }
            pos += e.len as usize;
        }
        Ok(())
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests;
