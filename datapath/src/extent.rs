//! Sector-aligned byte ranges of a disk, and the epoch map.
//!
//! This module owns two things:
//!
//! - [`Extent`], a non-empty, sector-aligned byte range inside a disk, with the range
//!   arithmetic the rest of the data path needs (overlap, intersection, containment,
//!   splitting), and [`ExtentData`], the contents of one extent: bytes, or zeros that
//!   cost no payload.
//! - [`EpochMap`], the latest data of every byte written to one disk during one epoch.
//!   The process server coalesces each epoch in such a map before shipping it, so a
//!   block overwritten ten times in an epoch is shipped once.
//! - [`RangeSet`], a set of byte ranges kept merged: which parts of a range are not yet
//!   covered (failback's re-read check, the undo log's "old contents already saved").
//!
//! Nothing here is stored on disk or sent on the wire as is: the frame and spool
//! modules own those layouts. [`VERSION`] exists only because every module reports one.
//!
//! # The epoch map
//!
//! The map is a `BTreeMap` from an extent's first byte to its contents. Between calls
//! it keeps these invariants, which its property test checks against a naive model:
//!
//! 1. Extents are sector-aligned, non-empty, lie inside the disk and do not overlap;
//!    iteration is in ascending offset order.
//! 2. Every byte written in the epoch is covered by exactly one extent holding the
//!    data of the last write to it; no unwritten byte is covered.
//! 3. No data extent is longer than the map's `extent_bytes_max` (by default
//!    [`EXTENT_BYTES_MAX`]), so frames chunk nicely and a split never copies more than
//!    that bound.
//! 4. Adjacent extents of the same kind are merged whenever the merge is allowed: two
//!    adjacent zero extents never occur (zero extents have no payload and no bound),
//!    and two adjacent data extents together exceed `extent_bytes_max`.
//!
//! ## Cost
//!
//! An insert costs `O(log n)` map operations plus one per extent it replaces, and
//! copies its own payload once. Sequential writes, the common case, append to the
//! last extent's `Vec` until it reaches the bound, so they stay linear in the bytes
//! written; the first write that continues an extent reserves its whole bound, so its
//! bytes move once rather than at every doubling. A write that must merge *before* an
//! existing data extent (a reverse sequential stream) or that cuts a tail off one
//! copies at most `extent_bytes_max`
//! bytes. A data extent's `Vec` never reserves more than `extent_bytes_max`, and a
//! head left by a split gives back its spare capacity once it uses less than half, and
//! at most [`STREAM_EXTENTS_MAX`] extents at a time hold a whole bound reserved ahead,
//! so the memory held stays close to [`EpochMap::data_bytes`].
//!
//! ## Chunks
//!
//! [`EpochMap::chunks`] splits the map, in order, into groups of extents that each
//! carry at most `frame_bytes_max` payload bytes and at most [`CHUNK_EXTENTS_MAX`]
//! extents; one group becomes one frame. Groups are filled greedily: a data extent
//! that does not fit in what is left of a group is split at a sector boundary and
//! continues in the next group. Zero extents carry no payload; they are split only
//! where a group would otherwise cover more than a data frame's bound on zero bytes
//! ([`crate::frame::MAX_ZERO_BYTES`]), so that every group encodes into one frame.

use std::collections::BTreeMap;
use std::collections::btree_map;

use thiserror::Error;

/// Format version of nothing on disk; kept so every module reports one.
pub const VERSION: u16 = 1;

/// Every offset and length on the data path is a multiple of this.
pub const SECTOR_BYTES: u64 = 512;

/// Longest data extent an [`EpochMap`] builds by merging adjacent writes, and the
/// longest piece it stores a single large write as. 1 MiB: large enough that a
/// sequential stream costs few extent headers, small enough that splitting or
/// prepending to an extent stays cheap and frames chunk evenly.
pub const EXTENT_BYTES_MAX: u64 = 1 << 20;

/// Most data extents of an [`EpochMap`] that hold room for their whole bound ahead of
/// their data (sequential streams being appended to): the memory a map holds beyond
/// its data stays within this many bounds plus what doubling leaves spare.
pub const STREAM_EXTENTS_MAX: usize = 4;

/// Most extents in one group from [`EpochMap::chunks`], so that a map of many small
/// or zero extents still gives frames with a bounded number of extent headers.
pub const CHUNK_EXTENTS_MAX: usize = 4096;

const _: () =
    assert!(EXTENT_BYTES_MAX.is_multiple_of(SECTOR_BYTES) && EXTENT_BYTES_MAX >= SECTOR_BYTES);
const _: () = assert!(
    crate::frame::MAX_ZERO_BYTES.is_multiple_of(SECTOR_BYTES)
        && crate::frame::MAX_ZERO_BYTES >= SECTOR_BYTES
);

/// Why a byte range was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ExtentError {
    #[error("offset {offset} is not a multiple of {SECTOR_BYTES}")]
    MisalignedOffset { offset: u64 },
    #[error("length {len} is not a multiple of {SECTOR_BYTES}")]
    MisalignedLength { len: u64 },
    #[error("empty range at offset {offset}")]
    Empty { offset: u64 },
    #[error("range {offset}+{len} ends beyond the disk's {disk_bytes} bytes")]
    OutOfRange {
        offset: u64,
        len: u64,
        disk_bytes: u64,
    },
}

/// A non-empty, sector-aligned byte range `[offset, offset + len)` inside a disk.
///
/// The fields are public for pattern matching and tests; ranges that come from
/// outside the process must go through [`Extent::new`]. The helpers below treat an
/// empty hand-made extent as covering nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

impl Extent {
    /// Checks alignment, emptiness and that the range lies inside `disk_bytes`.
    pub fn new(offset: u64, len: u64, disk_bytes: u64) -> Result<Self, ExtentError> {
        if !offset.is_multiple_of(SECTOR_BYTES) {
            return Err(ExtentError::MisalignedOffset { offset });
        }
        if !len.is_multiple_of(SECTOR_BYTES) {
            return Err(ExtentError::MisalignedLength { len });
        }
        if len == 0 {
            return Err(ExtentError::Empty { offset });
        }
        match offset.checked_add(len) {
            Some(end) if end <= disk_bytes => Ok(Self { offset, len }),
            _ => Err(ExtentError::OutOfRange {
                offset,
                len,
                disk_bytes,
            }),
        }
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }

    /// Number of sectors in the range.
    pub fn sectors(&self) -> u64 {
        self.len / SECTOR_BYTES
    }

    /// Whether the two ranges share at least one byte.
    pub fn overlaps(&self, other: &Extent) -> bool {
        self.len > 0 && other.len > 0 && self.offset < other.end() && other.offset < self.end()
    }

    /// The bytes both ranges cover, or `None` when they share none.
    pub fn intersect(&self, other: &Extent) -> Option<Extent> {
        if !self.overlaps(other) {
            return None;
        }
        let offset = self.offset.max(other.offset);
        let end = self.end().min(other.end());
        Some(Extent {
            offset,
            len: end - offset,
        })
    }

    /// Whether every byte of `other` lies in this range (an empty `other` lies nowhere).
    pub fn contains(&self, other: &Extent) -> bool {
        other.len > 0 && self.offset <= other.offset && other.end() <= self.end()
    }

    /// Whether byte `byte` of the disk lies in this range.
    pub fn contains_byte(&self, byte: u64) -> bool {
        self.offset <= byte && byte < self.end()
    }

    /// Whether one range ends exactly where the other begins.
    pub fn is_adjacent(&self, other: &Extent) -> bool {
        self.end() == other.offset || other.end() == self.offset
    }

    /// Splits the range at disk byte `at` into `[offset, at)` and `[at, end)`, or
    /// `None` when `at` is not a sector boundary strictly inside the range.
    pub fn split_at(&self, at: u64) -> Option<(Extent, Extent)> {
        if at <= self.offset || at >= self.end() || !at.is_multiple_of(SECTOR_BYTES) {
            return None;
        }
        Some((
            Extent {
                offset: self.offset,
                len: at - self.offset,
            },
            Extent {
                offset: at,
                len: self.end() - at,
            },
        ))
    }
}

/// The contents of one extent: bytes, or all zeros (a trim or write-zeroes, or data
/// found to be zero) of a length, which costs no payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentData<'a> {
    Bytes(&'a [u8]),
    Zero(u64),
}

impl ExtentData<'_> {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Self::Bytes(b) => b.len() as u64,
            Self::Zero(n) => *n,
        }
    }

    /// Whether the extent has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Payload bytes this extent carries in a frame: its length for bytes, 0 for zeros.
    pub fn payload_bytes(&self) -> u64 {
        match self {
            Self::Bytes(b) => b.len() as u64,
            Self::Zero(_) => 0,
        }
    }
}

/// One extent of an [`EpochMap`], owned. Lengths are always non-zero sector multiples.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Entry {
    Bytes(Vec<u8>),
    Zero(u64),
}

impl Entry {
    fn len(&self) -> u64 {
        match self {
            Self::Bytes(v) => v.len() as u64,
            Self::Zero(n) => *n,
        }
    }

    fn is_bytes(&self) -> bool {
        matches!(self, Self::Bytes(_))
    }

    fn as_data(&self) -> ExtentData<'_> {
        match self {
            Self::Bytes(v) => ExtentData::Bytes(v),
            Self::Zero(n) => ExtentData::Zero(*n),
        }
    }

    /// A copy of the part from relative byte `at` on; `at` is inside the entry.
    fn tail_from(&self, at: u64) -> Entry {
        match self {
            Self::Bytes(v) => Self::Bytes(v[at as usize..].to_vec()),
            Self::Zero(n) => Self::Zero(n - at),
        }
    }

    /// Keeps only the first `at` bytes; `at` is inside the entry.
    fn truncate(&mut self, at: u64) {
        match self {
            Self::Bytes(v) => {
                v.truncate(at as usize);
                // A small head cut from a large extent should not pin the large buffer.
                if v.capacity() > 2 * v.len() {
                    v.shrink_to_fit();
                }
            }
            Self::Zero(n) => *n = at,
        }
    }
}

/// Makes room for `more` bytes at the end of `v` by doubling, never reserving beyond
/// `cap_bytes` so that a full extent holds no more memory than its bound.
fn grow_capped(v: &mut Vec<u8>, more: usize, cap_bytes: usize) {
    let needed = v.len() + more;
    if needed > v.capacity() {
        let target = needed.max(2 * v.capacity()).min(cap_bytes.max(needed));
        v.reserve_exact(target - v.len());
    }
}

/// Appends `data` to `v`, growing it as [`grow_capped`] does.
fn append_capped(v: &mut Vec<u8>, data: &[u8], cap_bytes: usize) {
    grow_capped(v, data.len(), cap_bytes);
    v.extend_from_slice(data);
}

/// The latest data of every byte written to one disk during one epoch; see the
/// module documentation for its invariants and costs.
#[derive(Clone, Debug)]
pub struct EpochMap {
    disk_bytes: u64,
    extent_bytes_max: u64,
    entries: BTreeMap<u64, Entry>,
    /// Sum of the lengths of the data extents.
    data_bytes: u64,
    /// Sum of the lengths of all extents.
    covered_bytes: u64,
    /// Data extents (their first bytes) a write continued and that were given room for
    /// their whole bound at once; at most [`STREAM_EXTENTS_MAX`], see
    /// [`EpochMap::reserve_for_append`].
    streams: Vec<u64>,
}

impl EpochMap {
    /// An empty map for a disk of `disk_bytes`, merging data extents up to
    /// [`EXTENT_BYTES_MAX`].
    pub fn new(disk_bytes: u64) -> Self {
        Self::with_extent_bytes_max(disk_bytes, EXTENT_BYTES_MAX)
    }

    /// An empty map whose data extents are at most `extent_bytes_max` long (tests use a
    /// small bound to reach it on small disks).
    ///
    /// # Panics
    /// When `extent_bytes_max` is not a non-zero multiple of [`SECTOR_BYTES`]: the
    /// bound is a program constant, not input.
    pub fn with_extent_bytes_max(disk_bytes: u64, extent_bytes_max: u64) -> Self {
        assert!(
            extent_bytes_max >= SECTOR_BYTES && extent_bytes_max.is_multiple_of(SECTOR_BYTES),
            "extent_bytes_max {extent_bytes_max} must be a non-zero multiple of {SECTOR_BYTES}"
        );
        Self {
            disk_bytes,
            extent_bytes_max,
            entries: BTreeMap::new(),
            data_bytes: 0,
            covered_bytes: 0,
            streams: Vec::with_capacity(STREAM_EXTENTS_MAX),
        }
    }

    /// Size of the disk this map belongs to.
    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes
    }

    /// The bound on one data extent's length.
    pub fn extent_bytes_max(&self) -> u64 {
        self.extent_bytes_max
    }

    /// Records a write of `data` at `offset`; it replaces whatever the map held there.
    /// A misaligned, empty or out-of-range write is refused and changes nothing.
    pub fn insert(&mut self, offset: u64, data: &[u8]) -> Result<(), ExtentError> {
        let ext = Extent::new(offset, data.len() as u64, self.disk_bytes)?;
        self.carve(ext);
        let cap = self.extent_bytes_max;
        // The common case: the write continues the previous data extent, which has room.
        let continued = match self.entries.range(..offset).next_back() {
            Some((&k, Entry::Bytes(v)))
                if k + v.len() as u64 == offset && v.len() as u64 + ext.len <= cap =>
            {
                Some(k)
            }
            _ => None,
        };
        if let Some(k) = continued {
            self.reserve_for_append(k, data.len());
            if let Some(Entry::Bytes(v)) = self.entries.get_mut(&k) {
                v.extend_from_slice(data);
            }
        } else {
            let mut at = offset;
            for piece in data.chunks(cap as usize) {
                self.entries.insert(at, Entry::Bytes(piece.to_vec()));
                at += piece.len() as u64;
            }
        }
        self.data_bytes += ext.len;
        self.covered_bytes += ext.len;
        self.merge_around(ext);
        Ok(())
    }

    /// Records a trim or write-zeroes of `len` bytes at `offset`: the range reads as
    /// zeros and costs no payload. Refusals are those of [`Extent::new`].
    pub fn insert_zero(&mut self, offset: u64, len: u64) -> Result<(), ExtentError> {
        let ext = Extent::new(offset, len, self.disk_bytes)?;
        self.carve(ext);
        let appended = match self.entries.range_mut(..offset).next_back() {
            Some((&k, Entry::Zero(n))) if k + *n == offset => {
                *n += len;
                true
            }
            _ => false,
        };
        if !appended {
            self.entries.insert(offset, Entry::Zero(len));
        }
        self.covered_bytes += len;
        self.merge_around(ext);
        Ok(())
    }

    /// The extents in ascending offset order: `(offset, contents)`, never overlapping.
    pub fn iter(&self) -> impl Iterator<Item = (u64, ExtentData<'_>)> + '_ {
        self.entries.iter().map(|(&k, e)| (k, e.as_data()))
    }

    /// The ranges covered, in ascending order.
    pub fn extents(&self) -> impl Iterator<Item = Extent> + '_ {
        self.entries.iter().map(|(&k, e)| Extent {
            offset: k,
            len: e.len(),
        })
    }

    /// Number of extents.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing was written in this epoch.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Payload bytes held: the total length of the data extents.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Bytes of the disk covered by an extent, data or zero.
    pub fn covered_bytes(&self) -> u64 {
        self.covered_bytes
    }

    /// Forgets everything, for the next epoch.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.streams.clear();
        self.data_bytes = 0;
        self.covered_bytes = 0;
    }

    /// The map split into groups of at most `frame_bytes_max` payload bytes and at
    /// most [`CHUNK_EXTENTS_MAX`] extents each; see [`EpochMap::chunks_bounded`].
    pub fn chunks(&self, frame_bytes_max: u64) -> Chunks<'_> {
        self.chunks_bounded(frame_bytes_max, CHUNK_EXTENTS_MAX)
    }

    /// The map split, in order, into non-empty groups of at most `frame_bytes_max`
    /// payload bytes (rounded down to a sector multiple) and at most `extents_max`
    /// extents each, and zero extents covering at most [`crate::frame::MAX_ZERO_BYTES`].
    /// An extent that does not fit in what is left of a group is split at a sector
    /// boundary. Concatenated, the groups are exactly the map.
    ///
    /// # Panics
    /// When `frame_bytes_max < SECTOR_BYTES` or `extents_max == 0`: no group could
    /// make progress, and both bounds are program constants, not input.
    pub fn chunks_bounded(&self, frame_bytes_max: u64, extents_max: usize) -> Chunks<'_> {
        assert!(
            frame_bytes_max >= SECTOR_BYTES,
            "frame_bytes_max {frame_bytes_max} is below one sector"
        );
        assert!(extents_max > 0, "extents_max must be at least 1");
        Chunks {
            entries: self.entries.iter(),
            pending: None,
            payload_bytes_max: frame_bytes_max - frame_bytes_max % SECTOR_BYTES,
            zero_bytes_max: crate::frame::MAX_ZERO_BYTES,
            extents_max,
        }
    }

    /// Removes every byte of `ext` from the map, keeping the head and tail of extents
    /// that stick out of it.
    fn carve(&mut self, ext: Extent) {
        let (start, end) = (ext.offset, ext.end());
        // At most one extent begins before `start` and reaches into the range.
        let mut tail = None;
        let mut removed = None;
        if let Some((&k, e)) = self.entries.range_mut(..start).next_back() {
            let e_end = k + e.len();
            if e_end > start {
                if e_end > end {
                    tail = Some(e.tail_from(end - k));
                }
                removed = Some((e.is_bytes(), e_end.min(end) - start));
                e.truncate(start - k);
            }
        }
        if let Some((is_bytes, n)) = removed {
            self.forget(is_bytes, n);
        }
        if let Some(t) = tail {
            // That extent covered the whole range, so nothing else lies inside it.
            self.entries.insert(end, t);
            return;
        }
        // Then every extent that begins inside the range.
        while let Some((&k, _)) = self.entries.range(start..end).next() {
            let Some(e) = self.entries.remove(&k) else {
                break;
            };
            let e_end = k + e.len();
            if e_end > end {
                self.forget(e.is_bytes(), end - k);
                self.entries.insert(end, e.tail_from(end - k));
                break;
            }
            self.forget(e.is_bytes(), e.len());
        }
    }

    /// Makes room for `more` bytes at the end of the data extent at `k`, which a write
    /// is about to continue. A write that continues an extent is most likely part of a
    /// sequential stream that will fill it to the bound, so the extent gets room for
    /// its whole bound at once: its bytes move once, instead of once per doubling
    /// (64 KiB writes into a 1 MiB extent moved 960 KiB by doubling, and each larger
    /// buffer was fresh memory to fault in). At most [`STREAM_EXTENTS_MAX`] extents hold
    /// such room beyond what doubling would give them at a time (one that has filled
    /// past half of it no longer counts); past that the extent grows by doubling, so
    /// scattered pairs of adjacent writes cannot pin a whole bound each.
    fn reserve_for_append(&mut self, k: u64, more: usize) {
        let cap = self.extent_bytes_max as usize;
        match self.entries.get(&k) {
            Some(Entry::Bytes(v)) if v.capacity() - v.len() < more => {}
            _ => return,
        }
        let entries = &self.entries;
        self.streams.retain(|s| {
            s != &k && matches!(entries.get(s), Some(Entry::Bytes(v)) if v.capacity() > 2 * v.len())
        });
        let Some(Entry::Bytes(v)) = self.entries.get_mut(&k) else {
            return;
        };
        if self.streams.len() < STREAM_EXTENTS_MAX {
            v.reserve_exact(cap.max(v.len() + more) - v.len());
            self.streams.push(k);
        } else {
            grow_capped(v, more, cap);
        }
    }

    fn forget(&mut self, is_bytes: bool, n: u64) {
        self.covered_bytes -= n;
        if is_bytes {
            self.data_bytes -= n;
        }
    }

    /// Restores invariant 4 after `ext` was written: merges every allowed pair of
    /// adjacent extents from two extents before `ext` through the extent after it.
    /// Starting two back matters: a head left by the carve may now be short enough to
    /// merge with its own left neighbour.
    fn merge_around(&mut self, ext: Extent) {
        let start = {
            let mut before = self.entries.range(..ext.offset).rev().map(|(&k, _)| k);
            let first = before.next();
            before.next().or(first).unwrap_or(ext.offset)
        };
        let Some(mut cur) = self.entries.range(start..).next().map(|(&k, _)| k) else {
            return;
        };
        loop {
            let next = self
                .entries
                .range((std::ops::Bound::Excluded(cur), std::ops::Bound::Unbounded))
                .next()
                .map(|(&k, _)| k);
            let Some(next) = next else {
                break;
            };
            if self.try_merge(cur, next) {
                continue;
            }
            // The pair (extent at or after the written range's end, its successor) has
            // been looked at; nothing beyond it changed.
            if cur >= ext.end() {
                break;
            }
            cur = next;
        }
    }

    /// Merges the extent at `right` into the one at `left` when they are adjacent, of
    /// the same kind, and (for data) within the bound together.
    fn try_merge(&mut self, left: u64, right: u64) -> bool {
        let (Some(l), Some(r)) = (self.entries.get(&left), self.entries.get(&right)) else {
            return false;
        };
        if left + l.len() != right {
            return false;
        }
        let allowed = match (l, r) {
            (Entry::Zero(_), Entry::Zero(_)) => true,
            (Entry::Bytes(a), Entry::Bytes(b)) => {
                (a.len() + b.len()) as u64 <= self.extent_bytes_max
            }
            _ => false,
        };
        if !allowed {
            return false;
        }
        let cap = self.extent_bytes_max as usize;
        match (self.entries.remove(&right), self.entries.get_mut(&left)) {
            (Some(Entry::Zero(m)), Some(Entry::Zero(n))) => *n += m,
            (Some(Entry::Bytes(b)), Some(Entry::Bytes(a))) => append_capped(a, &b, cap),
            // Checked above: both exist and are of the same kind.
            _ => unreachable!("merge of extents checked to be mergeable"),
        }
        true
    }
}

/// Iterator over the groups of an [`EpochMap`]; see [`EpochMap::chunks_bounded`].
#[derive(Clone, Debug)]
pub struct Chunks<'a> {
    entries: btree_map::Iter<'a, u64, Entry>,
    /// The rest of a data extent split at the end of the previous group.
    pending: Option<(u64, ExtentData<'a>)>,
    payload_bytes_max: u64,
    /// A data frame refuses more zero bytes than this (a sector multiple).
    zero_bytes_max: u64,
    extents_max: usize,
}

impl<'a> Iterator for Chunks<'a> {
    type Item = Vec<(u64, ExtentData<'a>)>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut group = Vec::new();
        let mut payload_bytes = 0;
        let mut zero_bytes = 0;
        while group.len() < self.extents_max {
            let Some((offset, data)) = self
                .pending
                .take()
                .or_else(|| self.entries.next().map(|(&k, e)| (k, e.as_data())))
            else {
                break;
            };
            match data {
                ExtentData::Zero(n) => {
                    // A sector multiple, like the bound.
                    let room = self.zero_bytes_max - zero_bytes;
                    if room == 0 {
                        self.pending = Some((offset, data));
                        break;
                    }
                    if n <= room {
                        zero_bytes += n;
                        group.push((offset, data));
                    } else {
                        group.push((offset, ExtentData::Zero(room)));
                        self.pending = Some((offset + room, ExtentData::Zero(n - room)));
                        break;
                    }
                }
                ExtentData::Bytes(b) => {
                    // A sector multiple: the bound is one and so is every payload.
                    let room = self.payload_bytes_max - payload_bytes;
                    if room == 0 {
                        self.pending = Some((offset, data));
                        break;
                    }
                    if b.len() as u64 <= room {
                        payload_bytes += b.len() as u64;
                        group.push((offset, data));
                    } else {
                        let (head, rest) = b.split_at(room as usize);
                        group.push((offset, ExtentData::Bytes(head)));
                        self.pending = Some((offset + room, ExtentData::Bytes(rest)));
                        break;
                    }
                }
            }
        }
        (!group.is_empty()).then_some(group)
    }
}

/// A set of byte ranges `[start, end)`, kept merged (overlapping and touching ranges
/// become one): start -> end.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet(BTreeMap<u64, u64>);

impl RangeSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The parts of `[start, end)` no range of the set covers, in order.
    pub fn uncovered(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if start >= end {
            return out;
        }
        let mut at = start;
        // The range that may start before `start` and reach into it, then the rest.
        let first = self.0.range(..=start).next_back().map(|(&s, &e)| (s, e));
        let rest = self.0.range(start + 1..end).map(|(&s, &e)| (s, e));
        for (s, e) in first.into_iter().chain(rest) {
            if e <= at {
                continue;
            }
            if s > at {
                out.push((at, s.min(end)));
            }
            at = at.max(e);
            if at >= end {
                break;
            }
        }
        if at < end {
            out.push((at, end));
        }
        out
    }

    /// Adds `[start, end)`, merging it with every range it overlaps or touches.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        let touching: Vec<(u64, u64)> = self
            .0
            .range(..=end)
            .rev()
            .take_while(|&(_, &re)| re >= start)
            .map(|(&rs, &re)| (rs, re))
            .collect();
        for (rs, re) in touching {
            self.0.remove(&rs);
            s = s.min(rs);
            e = e.max(re);
        }
        self.0.insert(s, e);
    }

    /// The number of (merged) ranges.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set holds no range.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Removes every range.
    pub fn clear(&mut self) {
        self.0.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: u64 = SECTOR_BYTES;

    /// Proves a misaligned offset is refused with its own error.
    #[test]
    fn extent_refuses_misaligned_offset() {
        assert_eq!(
            Extent::new(1, S, 1 << 20),
            Err(ExtentError::MisalignedOffset { offset: 1 })
        );
        assert_eq!(
            Extent::new(S + 511, S, 1 << 20),
            Err(ExtentError::MisalignedOffset { offset: S + 511 })
        );
    }

    /// Proves a misaligned length is refused with its own error.
    #[test]
    fn extent_refuses_misaligned_length() {
        assert_eq!(
            Extent::new(0, 100, 1 << 20),
            Err(ExtentError::MisalignedLength { len: 100 })
        );
        assert_eq!(
            Extent::new(S, S + 1, 1 << 20),
            Err(ExtentError::MisalignedLength { len: S + 1 })
        );
    }

    /// Proves an empty range is refused.
    #[test]
    fn extent_refuses_empty() {
        assert_eq!(
            Extent::new(S, 0, 1 << 20),
            Err(ExtentError::Empty { offset: S })
        );
    }

    /// Proves a range ending past the disk is refused and one ending exactly at its end
    /// is accepted.
    #[test]
    fn extent_refuses_out_of_range() {
        let disk = 8 * S;
        assert_eq!(
            Extent::new(7 * S, 2 * S, disk),
            Err(ExtentError::OutOfRange {
                offset: 7 * S,
                len: 2 * S,
                disk_bytes: disk
            })
        );
        assert!(matches!(
            Extent::new(disk, S, disk),
            Err(ExtentError::OutOfRange { .. })
        ));
        assert_eq!(
            Extent::new(7 * S, S, disk),
            Ok(Extent {
                offset: 7 * S,
                len: S
            })
        );
    }

    /// Proves an offset plus length that overflows u64 is refused, not wrapped.
    #[test]
    fn extent_refuses_overflow() {
        let offset = u64::MAX - (S - 1) - S; // aligned, two sectors below the top
        let len = 4 * S;
        assert_eq!(
            Extent::new(offset, len, u64::MAX),
            Err(ExtentError::OutOfRange {
                offset,
                len,
                disk_bytes: u64::MAX
            })
        );
        let huge = u64::MAX - (S - 1);
        assert!(matches!(
            Extent::new(huge, huge, u64::MAX),
            Err(ExtentError::OutOfRange { .. })
        ));
    }

    /// Proves the range helpers on hand-picked cases, including touching and empty ranges.
    #[test]
    fn extent_helpers_examples() {
        let a = Extent {
            offset: 0,
            len: 4 * S,
        };
        let b = Extent {
            offset: 2 * S,
            len: 4 * S,
        };
        let c = Extent {
            offset: 4 * S,
            len: S,
        };
        let empty = Extent { offset: S, len: 0 };
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c) && a.is_adjacent(&c) && c.is_adjacent(&a));
        assert!(!a.overlaps(&empty) && !a.contains(&empty));
        assert_eq!(
            a.intersect(&b),
            Some(Extent {
                offset: 2 * S,
                len: 2 * S
            })
        );
        assert_eq!(a.intersect(&c), None);
        assert!(b.contains(&c) && !a.contains(&b));
        assert!(a.contains_byte(4 * S - 1) && !a.contains_byte(4 * S));
        assert_eq!(a.sectors(), 4);
        assert_eq!(
            a.split_at(S),
            Some((
                Extent { offset: 0, len: S },
                Extent {
                    offset: S,
                    len: 3 * S
                }
            ))
        );
        assert_eq!(a.split_at(0), None);
        assert_eq!(a.split_at(4 * S), None);
        assert_eq!(a.split_at(S + 1), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Proves overlaps, intersect and contains agree with sets of sectors.
        #[test]
        fn extent_helpers_match_sector_sets(
            ao in 0u64..16, al in 1u64..8, bo in 0u64..16, bl in 1u64..8,
        ) {
            let a = Extent { offset: ao * S, len: al * S };
            let b = Extent { offset: bo * S, len: bl * S };
            let sa: std::collections::BTreeSet<u64> = (ao..ao + al).collect();
            let sb: std::collections::BTreeSet<u64> = (bo..bo + bl).collect();
            let both: Vec<u64> = sa.intersection(&sb).copied().collect();
            prop_assert_eq!(a.overlaps(&b), !both.is_empty());
            match a.intersect(&b) {
                None => prop_assert!(both.is_empty()),
                Some(i) => {
                    let si: Vec<u64> = (i.offset / S..i.end() / S).collect();
                    prop_assert_eq!(si, both);
                }
            }
            prop_assert_eq!(a.contains(&b), sb.is_subset(&sa));
        }
    }

    /// Proves every refusal of the map leaves it unchanged.
    #[test]
    fn map_refusals_change_nothing() {
        let mut m = EpochMap::new(16 * S);
        m.insert(0, &[7; 4 * S as usize]).unwrap();
        let before: Vec<(u64, Vec<u8>)> = snapshot(&m);
        assert_eq!(
            m.insert(1, &[1; S as usize]),
            Err(ExtentError::MisalignedOffset { offset: 1 })
        );
        assert_eq!(
            m.insert(0, &[1; 100]),
            Err(ExtentError::MisalignedLength { len: 100 })
        );
        assert_eq!(m.insert(S, &[]), Err(ExtentError::Empty { offset: S }));
        assert!(matches!(
            m.insert(15 * S, &[1; 2 * S as usize]),
            Err(ExtentError::OutOfRange { .. })
        ));
        assert!(matches!(
            m.insert_zero(0, 3),
            Err(ExtentError::MisalignedLength { len: 3 })
        ));
        assert!(matches!(
            m.insert_zero(u64::MAX - (S - 1), 2 * S),
            Err(ExtentError::OutOfRange { .. })
        ));
        assert!(matches!(
            m.insert_zero(2 * S, 0),
            Err(ExtentError::Empty { .. })
        ));
        assert_eq!(snapshot(&m), before);
        assert_eq!((m.data_bytes(), m.covered_bytes()), (4 * S, 4 * S));
    }

    /// Proves a write inside an earlier extent leaves its head and its tail around it.
    #[test]
    fn map_write_in_the_middle_splits() {
        let mut m = EpochMap::new(64 * S);
        let old: Vec<u8> = (0..8 * S).map(|i| (i / S) as u8).collect();
        m.insert(0, &old).unwrap();
        m.insert_zero(3 * S, 2 * S).unwrap();
        let got: Vec<(u64, ExtentData<'_>)> = m.iter().collect();
        assert_eq!(
            got,
            vec![
                (0, ExtentData::Bytes(&old[..3 * S as usize])),
                (3 * S, ExtentData::Zero(2 * S)),
                (5 * S, ExtentData::Bytes(&old[5 * S as usize..])),
            ]
        );
        assert_eq!(m.data_bytes(), 6 * S);
        assert_eq!(m.covered_bytes(), 8 * S);
        // Writing data back over the hole merges all three into one data extent again.
        m.insert(3 * S, &[9; 2 * S as usize]).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m.data_bytes(), 8 * S);
    }

    /// Proves adjacent extents of one kind merge and of different kinds do not.
    #[test]
    fn map_merges_adjacent_same_kind() {
        let mut m = EpochMap::new(64 * S);
        m.insert_zero(4 * S, S).unwrap();
        m.insert_zero(2 * S, 2 * S).unwrap();
        m.insert_zero(5 * S, S).unwrap();
        assert_eq!(
            m.iter().collect::<Vec<_>>(),
            vec![(2 * S, ExtentData::Zero(4 * S))]
        );
        m.insert(6 * S, &[1; S as usize]).unwrap();
        m.insert(8 * S, &[3; S as usize]).unwrap();
        m.insert(7 * S, &[2; S as usize]).unwrap();
        assert_eq!(m.len(), 2);
        let bytes: Vec<u8> = [[1u8; S as usize], [2; S as usize], [3; S as usize]].concat();
        assert_eq!(
            m.iter().nth(1),
            Some((6 * S, ExtentData::Bytes(&bytes[..])))
        );
    }

    /// Capacity of every data extent's buffer together.
    fn held_bytes(m: &EpochMap) -> usize {
        m.entries
            .values()
            .map(|e| match e {
                Entry::Bytes(v) => v.capacity(),
                Entry::Zero(_) => 0,
            })
            .sum()
    }

    /// Proves the second write of a sequential stream reserves the extent's whole bound,
    /// so its buffer never moves again while the stream fills it (no copy per doubling),
    /// and a full extent holds exactly its bound.
    #[test]
    fn map_stream_reserves_the_bound_once() {
        let block = vec![0x5au8; 64 << 10];
        let mut m = EpochMap::new(4 << 20);
        m.insert(0, &block).unwrap();
        m.insert(block.len() as u64, &block).unwrap();
        let buf = |m: &EpochMap| match m.entries.get(&0) {
            Some(Entry::Bytes(v)) => (v.as_ptr(), v.capacity()),
            other => panic!("no data extent at 0: {other:?}"),
        };
        let first = buf(&m);
        assert_eq!(first.1, EXTENT_BYTES_MAX as usize);
        for i in 2..16u64 {
            m.insert(i * block.len() as u64, &block).unwrap();
            assert_eq!(buf(&m), first, "the extent's buffer moved at write {i}");
        }
        assert_eq!(held_bytes(&m), EXTENT_BYTES_MAX as usize);
    }

    /// Proves scattered pairs of adjacent writes (each pair continues an extent once
    /// and never again) pin a whole bound for at most `STREAM_EXTENTS_MAX` extents:
    /// the memory held stays within that plus twice the data.
    #[test]
    fn map_scattered_pairs_hold_little_spare_memory() {
        let block = vec![7u8; 4096];
        let mut m = EpochMap::new(1 << 30);
        for i in 0..512u64 {
            let at = i * (2 << 20);
            m.insert(at, &block).unwrap();
            m.insert(at + 4096, &block).unwrap();
        }
        assert_eq!(m.data_bytes(), 512 * 8192);
        let bound = STREAM_EXTENTS_MAX * EXTENT_BYTES_MAX as usize + 2 * m.data_bytes() as usize;
        assert!(
            held_bytes(&m) <= bound,
            "{} bytes held for {} of data",
            held_bytes(&m),
            m.data_bytes()
        );
        m.clear();
        assert!(m.streams.is_empty());
    }

    /// Proves a stream of sequential 64 KiB writes builds extents of exactly the bound
    /// (and finishes quickly, which a quadratic insert would not at 64 MiB).
    #[test]
    fn map_sequential_writes_fill_to_the_bound() {
        let block = vec![0xa5u8; 64 << 10];
        let total: u64 = 64 << 20;
        let mut m = EpochMap::new(total);
        for i in 0..total / block.len() as u64 {
            m.insert(i * block.len() as u64, &block).unwrap();
        }
        assert_eq!(m.len() as u64, total / EXTENT_BYTES_MAX);
        assert!(
            m.iter()
                .all(|(o, d)| o % EXTENT_BYTES_MAX == 0 && d.len() == EXTENT_BYTES_MAX)
        );
        assert_eq!(m.data_bytes(), total);
        // A large single write is stored as bounded pieces too.
        m.clear();
        assert!(m.is_empty() && m.data_bytes() == 0 && m.covered_bytes() == 0);
        let big = vec![1u8; (2 * EXTENT_BYTES_MAX + 4096) as usize];
        m.insert(S, &big).unwrap();
        let lens: Vec<u64> = m.iter().map(|(_, d)| d.len()).collect();
        assert_eq!(lens, vec![EXTENT_BYTES_MAX, EXTENT_BYTES_MAX, 4096]);
    }

    /// Proves reverse-sequential writes merge forwards into bounded extents too.
    #[test]
    fn map_reverse_writes_merge() {
        let block = vec![3u8; 64 << 10];
        let total: u64 = 4 << 20;
        let mut m = EpochMap::new(total);
        for i in (0..total / block.len() as u64).rev() {
            m.insert(i * block.len() as u64, &block).unwrap();
        }
        assert_eq!(m.len() as u64, total / EXTENT_BYTES_MAX);
        assert_eq!(m.covered_bytes(), total);
    }

    /// Proves chunks of a sequential map are full frames with extents split evenly.
    #[test]
    fn chunks_example() {
        let mut m = EpochMap::new(16 << 20);
        m.insert(0, &vec![1u8; 3 << 20]).unwrap();
        m.insert_zero(4 << 20, 1 << 20).unwrap();
        let groups: Vec<_> = m.chunks(1536 << 10).collect();
        assert_eq!(groups.len(), 2);
        let payload: Vec<u64> = groups
            .iter()
            .map(|g| g.iter().map(|(_, d)| d.payload_bytes()).sum())
            .collect();
        assert_eq!(payload, vec![1536 << 10, 1536 << 10]);
        assert_eq!(
            groups[1].last(),
            Some(&(4 << 20, ExtentData::Zero(1 << 20)))
        );
        assert_eq!(EpochMap::new(S).chunks(S).count(), 0);
    }

    /// Proves a trim larger than a data frame may carry (and many trims that together
    /// are) comes out in chunks that each stay within the frame's zero-byte bound, so
    /// every chunk encodes into a frame.
    #[test]
    fn chunks_bound_zero_bytes_per_frame() {
        let max = crate::frame::MAX_ZERO_BYTES;
        let mut m = EpochMap::new(8 * max);
        m.insert_zero(0, 2 * max + S).unwrap();
        m.insert(3 * max, &[7u8; 512]).unwrap();
        m.insert_zero(4 * max, max - S).unwrap();
        m.insert_zero(5 * max, 2 * S).unwrap();
        let mut enc = crate::frame::Encoder::uncompressed();
        let meta = crate::frame::DataFrameMeta {
            group: "g".into(),
            disk: "d".into(),
            epoch: 1,
        };
        let mut out = Vec::new();
        let mut covered = 0;
        for group in m.chunks(1 << 20) {
            let zero: u64 = group
                .iter()
                .filter(|(_, d)| matches!(d, ExtentData::Zero(_)))
                .map(|(_, d)| d.len())
                .sum();
            assert!(zero <= max, "a chunk carries {zero} zero bytes");
            covered += group.iter().map(|(_, d)| d.len()).sum::<u64>();
            enc.encode_data(&meta, 1, &group, &mut out).unwrap();
        }
        assert_eq!(covered, m.covered_bytes());
    }

    fn snapshot(m: &EpochMap) -> Vec<(u64, Vec<u8>)> {
        m.iter()
            .map(|(o, d)| match d {
                ExtentData::Bytes(b) => (o, b.to_vec()),
                ExtentData::Zero(n) => (o, vec![0; n as usize]),
            })
            .collect()
    }

    /// One operation of the property tests, in sectors.
    #[derive(Clone, Debug)]
    enum Op {
        Write { sector: u64, sectors: u64, seed: u8 },
        Zero { sector: u64, sectors: u64 },
    }

    const DISK_SECTORS: u64 = 48;

    fn op() -> impl Strategy<Value = Op> {
        // Short and long ranges, so that writes both split and swallow extents.
        let range = (0..DISK_SECTORS).prop_flat_map(|s| (Just(s), 1..=(DISK_SECTORS - s).min(12)));
        prop_oneof![
            3 => (range.clone(), any::<u8>()).prop_map(|((sector, sectors), seed)| Op::Write { sector, sectors, seed }),
            1 => range.prop_map(|(sector, sectors)| Op::Zero { sector, sectors }),
        ]
    }

    /// Distinct bytes per write and per position, so a misplaced split shows.
    fn payload(seed: u8, sectors: u64) -> Vec<u8> {
        (0..sectors * S)
            .map(|i| {
                seed.wrapping_mul(31)
                    .wrapping_add((i / S) as u8 * 7)
                    .wrapping_add(i as u8)
                    | 1
            })
            .collect()
    }

    /// Applies `ops` to the map and to a naive model (a disk plus a touched mask).
    fn run(m: &mut EpochMap, ops: &[Op], disk: &mut [u8], touched: &mut [bool]) {
        for op in ops {
            match *op {
                Op::Write {
                    sector,
                    sectors,
                    seed,
                } => {
                    let data = payload(seed, sectors);
                    m.insert(sector * S, &data).unwrap();
                    let r = (sector * S) as usize..((sector + sectors) * S) as usize;
                    disk[r.clone()].copy_from_slice(&data);
                    touched[r].iter_mut().for_each(|t| *t = true);
                }
                Op::Zero { sector, sectors } => {
                    m.insert_zero(sector * S, sectors * S).unwrap();
                    let r = (sector * S) as usize..((sector + sectors) * S) as usize;
                    disk[r.clone()].iter_mut().for_each(|b| *b = 0);
                    touched[r].iter_mut().for_each(|t| *t = true);
                }
            }
        }
    }

    /// Checks every invariant of the module doc against the model.
    fn check(m: &EpochMap, disk: &[u8], touched: &[bool]) -> Result<(), TestCaseError> {
        let cap = m.extent_bytes_max();
        let mut covered = vec![false; disk.len()];
        let (mut data_bytes, mut covered_bytes, mut count) = (0, 0, 0);
        let mut prev: Option<(u64, ExtentData<'_>)> = None;
        for (o, d) in m.iter() {
            count += 1;
            prop_assert!(!d.is_empty(), "empty extent at {}", o);
            prop_assert!(
                o.is_multiple_of(S) && d.len().is_multiple_of(S),
                "misaligned extent at {}",
                o
            );
            prop_assert!(o + d.len() <= m.disk_bytes());
            if let Some((po, pd)) = prev {
                prop_assert!(
                    po + pd.len() <= o,
                    "extents at {} and {} overlap or are unsorted",
                    po,
                    o
                );
                if po + pd.len() == o {
                    match (pd, d) {
                        (ExtentData::Zero(_), ExtentData::Zero(_)) => {
                            prop_assert!(false, "adjacent zero extents at {} and {}", po, o)
                        }
                        (ExtentData::Bytes(a), ExtentData::Bytes(b)) => prop_assert!(
                            (a.len() + b.len()) as u64 > cap,
                            "adjacent data extents at {} and {} fit under the bound",
                            po,
                            o
                        ),
                        _ => {}
                    }
                }
            }
            let r = o as usize..(o + d.len()) as usize;
            match d {
                ExtentData::Bytes(b) => {
                    prop_assert!(b.len() as u64 <= cap, "extent at {} over the bound", o);
                    prop_assert_eq!(&disk[r.clone()], b, "data differs in extent at {}", o);
                    data_bytes += b.len() as u64;
                }
                ExtentData::Zero(_) => {
                    prop_assert!(
                        disk[r.clone()].iter().all(|&b| b == 0),
                        "zero extent at {} over data",
                        o
                    )
                }
            }
            covered[r].iter_mut().for_each(|c| *c = true);
            covered_bytes += d.len();
            prev = Some((o, d));
        }
        prop_assert_eq!(
            &covered[..],
            touched,
            "covered bytes differ from written bytes"
        );
        prop_assert_eq!(count, m.len());
        prop_assert_eq!(data_bytes, m.data_bytes());
        prop_assert_eq!(covered_bytes, m.covered_bytes());
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Proves the map equals a naive disk model after every step of random writes
        /// and zeroes, and keeps every invariant of the module doc.
        #[test]
        fn map_matches_model(
            cap_sectors in 1u64..=8,
            ops in proptest::collection::vec(op(), 1..40),
        ) {
            let mut m = EpochMap::with_extent_bytes_max(DISK_SECTORS * S, cap_sectors * S);
            let mut disk = vec![0u8; (DISK_SECTORS * S) as usize];
            let mut touched = vec![false; disk.len()];
            for op in &ops {
                run(&mut m, std::slice::from_ref(op), &mut disk, &mut touched);
                check(&m, &disk, &touched)?;
            }
            m.clear();
            check(&m, &disk, &vec![false; disk.len()])?;
        }

        /// Proves the groups from chunks, concatenated, are exactly the map, and each
        /// group is non-empty and within both bounds.
        #[test]
        fn chunks_cover_exactly_the_map(
            cap_sectors in 1u64..=8,
            ops in proptest::collection::vec(op(), 1..40),
            frame_bytes_max in S..(10 * S),
            extents_max in 1usize..6,
        ) {
            let mut m = EpochMap::with_extent_bytes_max(DISK_SECTORS * S, cap_sectors * S);
            let mut disk = vec![0u8; (DISK_SECTORS * S) as usize];
            let mut touched = vec![false; disk.len()];
            run(&mut m, &ops, &mut disk, &mut touched);
            let bound = frame_bytes_max - frame_bytes_max % S;
            // Rebuild the map's extents by joining pieces that continue one another.
            let mut joined: Vec<(u64, Vec<u8>, bool)> = Vec::new();
            for group in m.chunks_bounded(frame_bytes_max, extents_max) {
                prop_assert!(!group.is_empty());
                prop_assert!(group.len() <= extents_max);
                let payload: u64 = group.iter().map(|(_, d)| d.payload_bytes()).sum();
                prop_assert!(payload <= bound, "group of {} payload bytes over {}", payload, bound);
                for (o, d) in group {
                    prop_assert!(!d.is_empty() && o.is_multiple_of(S) && d.len().is_multiple_of(S));
                    let (bytes, is_zero) = match d {
                        ExtentData::Bytes(b) => (b.to_vec(), false),
                        ExtentData::Zero(n) => (vec![0; n as usize], true),
                    };
                    match joined.last_mut() {
                        Some((lo, lb, lz)) if !is_zero && !*lz && *lo + lb.len() as u64 == o
                            && m.iter().any(|(mo, md)| mo <= *lo && o < mo + md.len()) =>
                        {
                            lb.extend_from_slice(&bytes)
                        }
                        Some((lo, lb, _)) => {
                            prop_assert!(*lo + lb.len() as u64 <= o, "pieces out of order");
                            joined.push((o, bytes, is_zero))
                        }
                        None => joined.push((o, bytes, is_zero)),
                    }
                }
            }
            let expected: Vec<(u64, Vec<u8>, bool)> = m
                .iter()
                .map(|(o, d)| match d {
                    ExtentData::Bytes(b) => (o, b.to_vec(), false),
                    ExtentData::Zero(n) => (o, vec![0; n as usize], true),
                })
                .collect();
            prop_assert_eq!(joined, expected);
        }
    }

    /// Proves the uncovered parts of a range against merged covered ranges.
    #[test]
    fn range_set_uncovered_parts() {
        let mut c = RangeSet::new();
        assert_eq!(c.uncovered(0, 100), vec![(0, 100)]);
        c.insert(10, 20);
        c.insert(30, 40);
        assert_eq!(c.uncovered(0, 100), vec![(0, 10), (20, 30), (40, 100)]);
        assert_eq!(c.uncovered(12, 18), vec![]);
        assert_eq!(c.uncovered(15, 35), vec![(20, 30)]);
        c.insert(20, 30);
        assert_eq!(c.len(), 1);
        assert_eq!(c.uncovered(5, 45), vec![(5, 10), (40, 45)]);
        c.insert(0, 50);
        assert_eq!(c.uncovered(0, 60), vec![(50, 60)]);
        // Against a naive model.
        let mut rng = crate::testutil::Rng::new(9);
        for _ in 0..200 {
            let mut c = RangeSet::new();
            let mut model = [false; 200];
            for _ in 0..rng.below(8) {
                let s = rng.below(190);
                let e = s + 1 + rng.below(200 - s);
                c.insert(s, e.min(200));
                model[s as usize..e.min(200) as usize].fill(true);
            }
            let (s, e) = (rng.below(150), 150 + rng.below(50));
            let mut got = [true; 200];
            for (a, b) in c.uncovered(s, e) {
                assert!(a < b);
                got[a as usize..b as usize].fill(false);
            }
            for i in s..e {
                assert_eq!(got[i as usize], model[i as usize], "byte {i}");
            }
        }
    }
}
