//! The segment index: one small side file per sealed journal segment, listing every
//! frame of it (seq, place, length, crc, kind) with what a reader needs without reading
//! the frame: a point's record, a data frame's disk and extent table. Purely derived
//! data, so that opening a journal and indexing a recovery point
//! ([`crate::pointview::PointIndex`]) read one small file per sealed segment instead of
//! every frame: a test-failover export is then ready in a time that does not grow with
//! the journal's bytes.
//!
//! **Derived, never trusted over the frames.** The journal writes a segment's index when
//! it seals the segment (rolls to the next one), after the segment's frames were synced,
//! with [`storage::write_atomic`]: the file is whole or absent, never torn. A missing,
//! stale or corrupt index is ignored and rebuilt from the segment's frames (on
//! [`super::Journal::open`]); a reader checks an index against its segment before using
//! it ([`load`]: the segment's length, its header, its last frame's header), and every
//! frame a reader serves bytes from is still read whole and verified (crc, blake3).
//! The index goes with its segment: removed before it by a drop, by
//! [`super::remove_all`], and an orphan or a leftover temp is removed on open. The
//! active (last) segment has none: it is scanned on open and indexed in memory as frames
//! are appended (at most the size of the segment). A record takes 34 bytes for a data
//! frame of one extent on a disk named `d0` (17 more per extent) and 9 plus the body
//! for a point (40 for a group named `g1`).
//!
//! # File `journal-<first_seq, 20 digits>.idx`, version 1 (integers little-endian)
//!
//! | offset | size | field           | meaning                                                    |
//! |-------:|-----:|-----------------|------------------------------------------------------------|
//! | 0      | 8    | `magic`         | `b"BRJSEGIX"` ([`INDEX_MAGIC`]); never modify               |
//! | 8      | 2    | `version`       | the journal's [`super::VERSION`]; another is ignored (rebuilt) |
//! | 10     | 1    | `group_len`     | 1..=64                                                     |
//! | 11     | 1    | `reserved0`     | must be 0                                                  |
//! | 12     | 4    | `reserved1`     | must be 0                                                  |
//! | 16     | 8    | `first_seq`     | the segment's first seq; equals the file name              |
//! | 24     | 64   | `group`         | the group id, zero-padded                                  |
//! | 88     | 8    | `frames`        | records that follow, one per frame, at least 1             |
//! | 96     | 8    | `segment_bytes` | the segment file's length, header included                 |
//! | 104    | 8    | `records_bytes` | bytes of the records; the file is 128 + this long          |
//! | 112    | 4    | `records_crc32` | crc32 (IEEE) of the records                                |
//! | 116    | 8    | `reserved2`     | must be 0                                                  |
//! | 124    | 4    | `crc32`         | crc32 (IEEE) of bytes 0..124                               |
//!
//! Then one record per frame, in seq order: frame `i` has seq `first_seq + i` and sits
//! at the end of the one before it (the first at byte 128 of the segment); the last
//! ends at `segment_bytes`.
//!
//! | size      | field          | meaning                                                   |
//! |----------:|----------------|-----------------------------------------------------------|
//! | 1         | `kind`         | the frame kind: 1 data, 2 point                           |
//! | 4         | `frame_len`    | the whole frame's length, header included (at least 32)   |
//! | 4         | `frame_crc`    | the crc field of the frame's header                       |
//! | (data) 1  | `table`        | 1: the table follows; 0: none (the head did not parse as a data frame this build reads; a reader peeks the frame itself) |
//! | (data) 1  | `disk_len`     | with a table: length of the disk id, 1..=64               |
//! | (data) n  | `disk`         | the disk id                                               |
//! | (data) 2  | `extent_count` | 1..=[`MAX_EXTENTS`]                                       |
//! | (data) 17 each | extent    | `offset` u64, `len` u64 (> 0), `flags` u8 (bit 0: zero extent; others 0); ascending, not overlapping |
//! | (point) frame_len - 32 | `body` | the point frame's body ([`frame::decode_point_body`]) |
//!
//! A record is never larger than its frame, so an index is never larger than its
//! segment: a reader refuses to read one that is.

use std::io;
use std::path::Path;

use crate::frame::{self, FrameHeader, FrameKind, MAX_BODY_BYTES, MAX_EXTENTS};
use crate::le::{u16_at as le_u16, u32_at as le_u32, u64_at as le_u64};
use crate::storage::{self, OpenMode, Storage, StorageFile};

use super::{
    FrameEntry, SEGMENT_HEADER_BYTES, decode_fixed, decode_segment_header, encode_fixed, seal_fixed,
};

/// Index file magic. Never modify: it names the format of every segment index on disk.
pub const INDEX_MAGIC: [u8; 8] = *b"BRJSEGIX";
/// Size of the index file's header.
pub const INDEX_HEADER_BYTES: usize = 128;
/// Bytes of one extent of a record's table.
pub const INDEX_EXTENT_BYTES: usize = 17;

const OFF_FRAMES: usize = 88;
const OFF_SEGMENT_BYTES: usize = 96;
const OFF_RECORDS_BYTES: usize = 104;
const OFF_RECORDS_CRC: usize = 112;
const OFF_INDEX_RESERVED2: usize = 116;
const EXTENT_FLAG_ZERO: u8 = 1;

const _: () = assert!(OFF_FRAMES == super::OFF_RESERVED2);
const _: () = assert!(OFF_INDEX_RESERVED2 + 8 == INDEX_HEADER_BYTES - 4);
const _: () = assert!(MAX_EXTENTS <= u16::MAX as u32);

/// Name of the index of the segment whose first frame is `first_seq`.
pub fn index_name(first_seq: u64) -> String {
    format!("journal-{first_seq:020}.idx")
}

/// The first seq an index file name (or the name of its temp, `.idx.tmp`) encodes.
pub(super) fn parse_index_name(name: &str) -> Option<u64> {
    let base = name.strip_suffix(".tmp").unwrap_or(name);
    let num = base.strip_prefix("journal-")?.strip_suffix(".idx")?;
    if num.len() != 20 || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    num.parse().ok()
}

/// The records of one segment's frames, built as they are appended or scanned.
#[derive(Debug, Default)]
pub(crate) struct IndexBuilder {
    records: Vec<u8>,
    frames: u64,
}

impl IndexBuilder {
    /// Adds the record of `frame` (whole, its crc verified), whose header is `h`.
    pub(crate) fn push(&mut self, frame: &[u8], h: &FrameHeader) {
        let r = &mut self.records;
        r.push(h.kind as u8);
        r.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        r.extend_from_slice(&h.crc.to_le_bytes());
        match h.kind {
            FrameKind::Data => match frame::peek_data_head(frame) {
                Ok(info) => {
                    r.push(1);
                    r.push(info.meta.disk.len() as u8);
                    r.extend_from_slice(info.meta.disk.as_bytes());
                    r.extend_from_slice(&(info.entries.len() as u16).to_le_bytes());
                    for e in &info.entries {
                        r.extend_from_slice(&e.offset.to_le_bytes());
                        r.extend_from_slice(&e.len.to_le_bytes());
                        r.push(if e.zero { EXTENT_FLAG_ZERO } else { 0 });
                    }
                }
                // Not a data frame this build can index (the journal stores any frame
                // whose crc holds): readers peek it themselves, as without an index.
                Err(_) => r.push(0),
            },
            _ => r.extend_from_slice(&frame[frame::HEADER_BYTES..]),
        }
        self.frames += 1;
    }

    /// The records of a checked index: what pushing its segment's frames gives.
    pub(super) fn from_index(index: &SegmentIndex) -> Self {
        Self {
            records: index.bytes[INDEX_HEADER_BYTES..].to_vec(),
            frames: index.frames,
        }
    }

    /// Records added.
    pub(super) fn frames(&self) -> u64 {
        self.frames
    }

    /// The index file of segment `first_seq` of `group`, `segment_bytes` long.
    pub(crate) fn encode(&self, group: &str, first_seq: u64, segment_bytes: u64) -> Vec<u8> {
        let mut b = encode_fixed(INDEX_MAGIC, first_seq, group, INDEX_HEADER_BYTES);
        b[OFF_FRAMES..OFF_FRAMES + 8].copy_from_slice(&self.frames.to_le_bytes());
        b[OFF_SEGMENT_BYTES..OFF_SEGMENT_BYTES + 8].copy_from_slice(&segment_bytes.to_le_bytes());
        b[OFF_RECORDS_BYTES..OFF_RECORDS_BYTES + 8]
            .copy_from_slice(&(self.records.len() as u64).to_le_bytes());
        let crc = crc32fast::hash(&self.records);
        b[OFF_RECORDS_CRC..OFF_RECORDS_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        seal_fixed(&mut b);
        b.extend_from_slice(&self.records);
        b
    }
}

/// One frame as its segment's index lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexedFrame<'a> {
    /// Where the frame is (the journal's own entry for it).
    pub entry: FrameEntry,
    /// The crc field of its header.
    pub crc: u32,
    pub detail: Detail<'a>,
}

/// What an index holds about a frame besides its place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detail<'a> {
    /// A data frame's table, `None` when its head was not indexed.
    Data(Option<Table<'a>>),
    /// A point frame's body, to decode with [`frame::decode_point_body`].
    Point(&'a [u8]),
}

/// A data frame's disk and extents, as its index lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Table<'a> {
    pub disk: &'a str,
    /// `extent_count` entries of [`INDEX_EXTENT_BYTES`].
    raw: &'a [u8],
}

/// One extent of a [`Table`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexedExtent {
    pub offset: u64,
    pub len: u64,
    pub zero: bool,
}

impl Table<'_> {
    /// The extents, in the frame's order.
    pub fn extents(&self) -> impl Iterator<Item = IndexedExtent> + '_ {
        self.raw
            .chunks_exact(INDEX_EXTENT_BYTES)
            .map(|c| IndexedExtent {
                offset: le_u64(c, 0),
                len: le_u64(c, 8),
                zero: c[16] & EXTENT_FLAG_ZERO != 0,
            })
    }
}

/// A decoded, checked segment index (see the module doc).
#[derive(Debug)]
pub struct SegmentIndex {
    bytes: Vec<u8>,
    first_seq: u64,
    frames: u64,
    segment_bytes: u64,
    /// The last frame's entry and crc.
    last: (FrameEntry, u32),
}

impl SegmentIndex {
    /// Decodes an index file of segment `first_seq` of `group` and checks every field
    /// and record (not yet against the segment: see [`load`]). The error says why the
    /// file is not usable.
    pub fn decode(bytes: Vec<u8>, group: &str, first_seq: u64) -> Result<Self, String> {
        let head = bytes.get(..INDEX_HEADER_BYTES).ok_or_else(|| {
            format!(
                "{} bytes, shorter than the {INDEX_HEADER_BYTES}-byte header",
                bytes.len()
            )
        })?;
        let seq = decode_fixed(
            head,
            INDEX_HEADER_BYTES,
            INDEX_MAGIC,
            OFF_INDEX_RESERVED2,
            group,
            Path::new("index"),
        )
        .map_err(|e| e.to_string())?;
        if seq != first_seq {
            return Err(format!(
                "header says first_seq {seq}, the file name {first_seq}"
            ));
        }
        let frames = le_u64(head, OFF_FRAMES);
        let segment_bytes = le_u64(head, OFF_SEGMENT_BYTES);
        let records_bytes = le_u64(head, OFF_RECORDS_BYTES);
        if records_bytes != (bytes.len() - INDEX_HEADER_BYTES) as u64 {
            return Err(format!(
                "records_bytes {records_bytes}, but {} bytes follow the header",
                bytes.len() - INDEX_HEADER_BYTES
            ));
        }
        let records = &bytes[INDEX_HEADER_BYTES..];
        let crc = crc32fast::hash(records);
        if crc != le_u32(head, OFF_RECORDS_CRC) {
            return Err(format!(
                "records crc32 stored {:08x}, bytes give {crc:08x}",
                le_u32(head, OFF_RECORDS_CRC)
            ));
        }
        if frames == 0 {
            return Err("no frames: a sealed segment has at least one".into());
        }
        let mut it = Records {
            rest: records,
            seq: first_seq,
            offset: SEGMENT_HEADER_BYTES as u64,
            segment: first_seq,
        };
        let mut last = None;
        let mut n = 0u64;
        while !it.rest.is_empty() {
            let f = it.next_record(true)?;
            last = Some((f.entry, f.crc));
            n += 1;
        }
        if n != frames {
            return Err(format!("header says {frames} frames, the records hold {n}"));
        }
        if it.offset != segment_bytes {
            return Err(format!(
                "the frames end at byte {}, the header says the segment is {segment_bytes} bytes",
                it.offset
            ));
        }
        let last = last.ok_or("no frames")?;
        Ok(Self {
            bytes,
            first_seq,
            frames,
            segment_bytes,
            last,
        })
    }

    /// The segment's first seq.
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// Frames listed.
    pub fn frame_count(&self) -> u64 {
        self.frames
    }

    /// Seq of the segment's last frame.
    pub fn last_seq(&self) -> u64 {
        self.first_seq + self.frames - 1
    }

    /// The segment's length in bytes.
    pub fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }

    /// The frames, in seq order.
    pub fn frames(&self) -> impl Iterator<Item = IndexedFrame<'_>> + '_ {
        let mut it = Records {
            rest: &self.bytes[INDEX_HEADER_BYTES..],
            seq: self.first_seq,
            offset: SEGMENT_HEADER_BYTES as u64,
            segment: self.first_seq,
        };
        // Every record was checked by `decode`: only its fields are read again.
        std::iter::from_fn(move || {
            (!it.rest.is_empty())
                .then(|| it.next_record(false).ok())
                .flatten()
        })
    }

    /// Checks the index against its open segment file `seg`: the length, the header
    /// (group, first seq, a mark within the frames) and the last frame's header (seq,
    /// kind, length, crc) must agree. What makes an index of another segment that
    /// happens to bear the same name (a journal removed and started again) unusable.
    pub fn check_segment(&self, seg: &dyn StorageFile, group: &str) -> Result<(), String> {
        let len = seg.len().map_err(|e| format!("size the segment: {e}"))?;
        if len != self.segment_bytes {
            return Err(format!(
                "the segment is {len} bytes, the index describes {}",
                self.segment_bytes
            ));
        }
        let mut head = [0u8; SEGMENT_HEADER_BYTES];
        seg.read_exact_at(&mut head, 0)
            .map_err(|e| format!("read the segment header: {e}"))?;
        let h = decode_segment_header(&head, group, Path::new("segment"))
            .map_err(|e| format!("segment header: {e}"))?;
        if h.first_seq != self.first_seq {
            return Err(format!(
                "the segment header says first_seq {}, the index {}",
                h.first_seq, self.first_seq
            ));
        }
        if h.synced_seq > self.last_seq() {
            return Err(format!(
                "the segment header's mark {} is past the index's last frame {}",
                h.synced_seq,
                self.last_seq()
            ));
        }
        let (e, crc) = self.last;
        let mut fh = [0u8; frame::HEADER_BYTES];
        seg.read_exact_at(&mut fh, e.offset)
            .map_err(|err| format!("read the last frame's header: {err}"))?;
        let found = FrameHeader::parse(&fh).map_err(|err| format!("last frame header: {err}"))?;
        if found.seq != e.seq
            || found.kind != e.kind
            || found.frame_len() != e.len as usize
            || found.crc != crc
        {
            return Err(format!(
                "the last frame is seq {} kind {:?} of {} bytes crc {:08x}, the index says seq {} kind {:?} of {} bytes crc {crc:08x}",
                found.seq,
                found.kind,
                found.frame_len(),
                found.crc,
                e.seq,
                e.kind,
                e.len
            ));
        }
        Ok(())
    }
}

/// A walk over the records of an index.
struct Records<'a> {
    rest: &'a [u8],
    seq: u64,
    offset: u64,
    segment: u64,
}

impl<'a> Records<'a> {
    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], String> {
        if self.rest.len() < n {
            return Err(format!(
                "record of frame {}: {field} needs {n} bytes, {} left",
                self.seq,
                self.rest.len()
            ));
        }
        let (a, b) = self.rest.split_at(n);
        self.rest = b;
        Ok(a)
    }

    /// The next record; with `check`, every field of it is checked (else it was before).
    fn next_record(&mut self, check: bool) -> Result<IndexedFrame<'a>, String> {
        let seq = self.seq;
        let bad = |why: String| format!("record of frame {seq}: {why}");
        let fixed = self.take(9, "kind, frame_len, frame_crc")?;
        let kind = FrameKind::from_u8(fixed[0]);
        let len = le_u32(fixed, 1);
        let crc = le_u32(fixed, 5);
        if !(frame::HEADER_BYTES as u64..=frame::HEADER_BYTES as u64 + MAX_BODY_BYTES as u64)
            .contains(&u64::from(len))
        {
            return Err(bad(format!("frame_len {len} is not a frame's")));
        }
        let detail = match kind {
            Some(FrameKind::Data) => Detail::Data(self.table(seq, check)?),
            Some(FrameKind::Point) => {
                Detail::Point(self.take(len as usize - frame::HEADER_BYTES, "point body")?)
            }
            _ => return Err(bad(format!("kind {} is not a journal frame's", fixed[0]))),
        };
        let entry = FrameEntry {
            seq,
            segment: self.segment,
            offset: self.offset,
            len,
            kind: kind.unwrap_or(FrameKind::Data),
        };
        self.seq = seq
            .checked_add(1)
            .ok_or_else(|| bad("seq overflows".into()))?;
        self.offset += u64::from(len);
        Ok(IndexedFrame { entry, crc, detail })
    }

    fn table(&mut self, seq: u64, check: bool) -> Result<Option<Table<'a>>, String> {
        let bad = |why: String| format!("record of frame {seq}: {why}");
        match self.take(1, "table")?[0] {
            0 => return Ok(None),
            1 => {}
            v => return Err(bad(format!("table flag {v} is neither 0 nor 1"))),
        }
        let disk_len = self.take(1, "disk_len")?[0] as usize;
        let disk = std::str::from_utf8(self.take(disk_len, "disk")?)
            .ok()
            .filter(|d| !check || crate::valid_id(d))
            .ok_or_else(|| bad("the disk is not a disk id".into()))?;
        let count = le_u16(self.take(2, "extent_count")?, 0) as usize;
        if count == 0 || count > MAX_EXTENTS as usize {
            return Err(bad(format!(
                "extent_count {count} is not in 1..={MAX_EXTENTS}"
            )));
        }
        let raw = self.take(count * INDEX_EXTENT_BYTES, "extents")?;
        let table = Table { disk, raw };
        if !check {
            return Ok(Some(table));
        }
        let mut end = 0u64;
        for (i, (c, e)) in raw
            .chunks_exact(INDEX_EXTENT_BYTES)
            .zip(table.extents())
            .enumerate()
        {
            if c[16] & !EXTENT_FLAG_ZERO != 0 {
                return Err(bad(format!("extent {i}: unknown flags {:#x}", c[16])));
            }
            let e_end = e.offset.checked_add(e.len);
            if e.len == 0 || e_end.is_none() || (i > 0 && e.offset < end) {
                return Err(bad(format!(
                    "extent {i} ({}+{}) is empty, overflows or is out of order",
                    e.offset, e.len
                )));
            }
            end = e_end.unwrap_or(u64::MAX);
        }
        Ok(Some(table))
    }
}

/// Reads the index of segment `first_seq` of `group` from `dir` and checks it against
/// the segment, open as `seg`: `Ok(None)` when there is none, `Err(why)` when it cannot
/// be used (the caller then reads the frames). Reads at most the segment's length.
pub fn load(
    fs: &dyn Storage,
    dir: &Path,
    group: &str,
    first_seq: u64,
    seg: &dyn StorageFile,
) -> Result<Option<SegmentIndex>, String> {
    let path = dir.join(index_name(first_seq));
    let f = match fs.open(&path, OpenMode::ReadOnly) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("open: {e}")),
    };
    let len = f.len().map_err(|e| format!("size: {e}"))?;
    let seg_len = seg.len().map_err(|e| format!("size the segment: {e}"))?;
    if len > seg_len {
        return Err(format!(
            "{len} bytes, larger than its segment ({seg_len} bytes)"
        ));
    }
    let mut bytes = vec![0u8; len as usize];
    f.read_exact_at(&mut bytes, 0)
        .map_err(|e| format!("read: {e}"))?;
    let index = SegmentIndex::decode(bytes, group, first_seq)?;
    index.check_segment(seg, group)?;
    Ok(Some(index))
}

/// Writes the index file `bytes` of segment `first_seq` durably and whole
/// ([`storage::write_atomic`]).
pub(super) fn write(fs: &dyn Storage, dir: &Path, first_seq: u64, bytes: &[u8]) -> io::Result<()> {
    storage::write_atomic(fs, dir, &index_name(first_seq), bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent::ExtentData;
    use crate::frame::{DataFrameMeta, Encoder, PointKind};
    use crate::testutil::Rng;
    use proptest::prelude::*;

    const GROUP: &str = "g1";

    /// The records of a few real frames (data of one and of several extents, a zero
    /// extent, a point, a frame whose head does not parse) and the segment they fill.
    fn sample() -> (IndexBuilder, u64) {
        let mut b = IndexBuilder::default();
        let mut enc = Encoder::new(1);
        let mut out = Vec::new();
        let mut at = SEGMENT_HEADER_BYTES as u64;
        for seq in 1..=6u64 {
            let data = vec![seq as u8; 1024];
            match seq % 3 {
                1 => {
                    let meta = DataFrameMeta {
                        group: GROUP.into(),
                        disk: "d0".into(),
                        epoch: seq,
                    };
                    let ext = [
                        (seq << 20, ExtentData::Bytes(&data)),
                        ((seq << 20) + 4096, ExtentData::Zero(512)),
                    ];
                    enc.encode_data(&meta, seq, &ext[..(seq as usize % 2) + 1], &mut out)
                        .unwrap();
                }
                2 => {
                    let p = frame::PointRecord {
                        point_id: seq,
                        epoch: seq,
                        time_unix_ms: seq,
                        kind: PointKind::App,
                        consistent: true,
                        group: GROUP.into(),
                    };
                    frame::encode_point(&p, seq, &mut out);
                }
                _ => {
                    out.clear();
                    frame::begin(&mut out);
                    out.extend_from_slice(&data[..100]);
                    frame::seal(&mut out, FrameKind::Data, seq);
                }
            }
            b.push(&out, &frame::verify(&out).unwrap());
            at += out.len() as u64;
        }
        (b, at)
    }

    /// Proves an index round-trips: it decodes to the frames pushed, in order and in
    /// place, each with its crc and what it holds.
    #[test]
    fn round_trip() {
        let (b, end) = sample();
        let idx = SegmentIndex::decode(b.encode(GROUP, 1, end), GROUP, 1).unwrap();
        assert_eq!(
            (idx.first_seq(), idx.last_seq(), idx.segment_bytes()),
            (1, 6, end)
        );
        let frames: Vec<IndexedFrame<'_>> = idx.frames().collect();
        assert_eq!(frames.len(), 6);
        assert_eq!(frames[0].entry.offset, SEGMENT_HEADER_BYTES as u64);
        for (i, f) in frames.iter().enumerate() {
            assert_eq!(f.entry.seq, i as u64 + 1);
            if i > 0 {
                let prev = &frames[i - 1].entry;
                assert_eq!(f.entry.offset, prev.offset + u64::from(prev.len));
            }
        }
        match frames[0].detail {
            Detail::Data(Some(t)) => {
                assert_eq!(t.disk, "d0");
                let ex: Vec<_> = t.extents().collect();
                assert_eq!(ex.len(), 2);
                assert_eq!(
                    (ex[1].offset, ex[1].len, ex[1].zero),
                    ((1 << 20) + 4096, 512, true)
                );
            }
            d => panic!("{d:?}"),
        }
        assert!(matches!(frames[1].detail, Detail::Point(_)));
        assert!(matches!(frames[2].detail, Detail::Data(None)));
        assert!(IndexBuilder::from_index(&idx).encode(GROUP, 1, end) == b.encode(GROUP, 1, end));
    }

    /// Proves every byte of the records changed (to 8 random values each), behind crcs made
    /// right again (what only a bug or a forgery writes), is refused by name or decodes
    /// to records that still chain from the segment header to its end: never a panic.
    #[test]
    fn changed_records_behind_good_crcs_never_panic() {
        let (b, end) = sample();
        let mut rng = Rng::new(3);
        for at in 0..b.records.len() {
            for _ in 0..8 {
                let mut records = b.records.clone();
                records[at] = rng.next() as u8;
                let bad = IndexBuilder {
                    records,
                    frames: b.frames,
                };
                if let Ok(idx) = SegmentIndex::decode(bad.encode(GROUP, 1, end), GROUP, 1) {
                    let last = idx.frames().last().unwrap().entry;
                    assert_eq!(last.offset + u64::from(last.len), end);
                    assert_eq!(idx.frames().count() as u64, idx.frame_count());
                }
            }
        }
    }

    proptest! {
        /// Proves random records and header fields behind good crcs are refused with a
        /// reason or decode consistently, never a panic.
        #[test]
        fn random_records_never_panic(
            records in proptest::collection::vec(any::<u8>(), 0..400),
            frames in 0u64..20,
            end in 0u64..2000,
        ) {
            let b = IndexBuilder { records, frames };
            if let Ok(idx) = SegmentIndex::decode(b.encode(GROUP, 7, end), GROUP, 7) {
                prop_assert_eq!(idx.frames().count() as u64, frames);
                prop_assert_eq!(idx.segment_bytes(), end);
            }
        }
    }

    /// Proves a wrong group, a wrong first seq and a short or long file are refused.
    #[test]
    fn header_refusals() {
        let (b, end) = sample();
        let good = b.encode(GROUP, 1, end);
        let why = |r: Result<SegmentIndex, String>| r.err().unwrap_or_default();
        assert!(why(SegmentIndex::decode(good.clone(), "g2", 1)).contains("group"));
        assert!(why(SegmentIndex::decode(good.clone(), GROUP, 2)).contains("first_seq"));
        assert!(why(SegmentIndex::decode(good[..100].to_vec(), GROUP, 1)).contains("shorter"));
        let mut long = good.clone();
        long.push(0);
        assert!(why(SegmentIndex::decode(long, GROUP, 1)).contains("records_bytes"));
        let empty = IndexBuilder::default().encode(GROUP, 1, SEGMENT_HEADER_BYTES as u64);
        assert!(why(SegmentIndex::decode(empty, GROUP, 1)).contains("no frames"));
    }
}
