//! A recovery point as a readable disk, without applying anything: the replica with the
//! journal's frames up to the point laid over it. The basis of test failover (serve a
//! point over NBD), of an online verify and of hashing a copy for a resync.
//!
//! **Index.** [`PointIndex::build`] takes the extent table of every data frame from the
//! journal's base through the point's frame, in seq order, and keeps per disk a map from
//! byte ranges to the newest extent that wrote them (later frames win, overlapped
//! ranges are split; laid in one sweep, [`RangeMap::insert_all`]). The tables of a
//! sealed segment's frames come from its index file ([`segindex`], one small sequential
//! read per segment, checked against the segment before use); those of the open
//! segment, and of a sealed one without a usable index, from the frames' heads
//! ([`frame::peek_data_head`], read a window of [`PEEK_WINDOW_BYTES`] at a time for
//! small frames). Payloads are never read. So building costs one small file per
//! sealed segment plus the open segment's heads, not a read per frame of the journal.
//! Memory is one map entry per surviving extent piece and one place per data frame.
//!
//! Measured with `cargo run --release --example export_ready -- --frames N` (a journal
//! of N frames, a random 4 KiB write and a point per cut, 64 MiB segments; this
//! 2-vCPU machine, shared; cold: page cache dropped first; the time until the export
//! can listen, best of 3; before: every frame read on open, every data frame's head
//! read for the index):
//!
//! | frames  | journal   | before: offline / live, warm | cold             | now: offline / live, warm | cold          |
//! |--------:|----------:|------------------------------|------------------|---------------------------|---------------|
//! | 50,000  | 102 MiB   | 154 / 68 ms                  | 207 / 107 ms     | 54 / 11 ms                | 67 / 36 ms    |
//! | 500,000 | 1,020 MiB | 1,708 / 988 ms               | 2,283 / 1,391 ms | 254 / 77 ms               | 312 / 208 ms  |
//!
//! *Offline* (no server runs) opens the journal first ([`crate::journal::Journal::open`]
//! reads the sealed segments' index files and scans only the open segment); *live*
//! (the server runs) has the entries in memory. What remains grows with the open
//! segment (at most `journal_segment_bytes`, read whole when cold) and, about ten times
//! slower than before, with the frames (~37 bytes of index file and ~0.15 µs of CPU a
//! frame live, ~0.5 µs offline): not with the journal's bytes. On a disk busy with
//! other work the cold numbers stretch (up to ~0.8 s for 500,000 frames here).
//!
//! **Reads.** [`PointView::read`] fills a range piece by piece: a range no frame wrote
//! comes from the replica; a range of an extent comes from its frame, which is read
//! whole and decoded with every check ([`frame::Decoder::decode_data`]: crc, bounds,
//! blake3) and must hold what the index says (its seq, disk, the extent's place and
//! kind; else [`PointViewError::IndexMismatch`]) before a byte of it is served, zeros
//! included: the index decides where to look, never what a byte is. A few decoded
//! frames are cached ([`FRAME_CACHE_MAX`]).
//!
//! **Consistency with the master target.** The view reads the journal's segment files
//! and the replicas directly, so it can live while replication appends. Two things must
//! not happen under it: the replica must not receive frames newer than the point (a
//! failback), and the frames it indexes must not be dropped unless they were folded into
//! the replica first. Retention folds only frames older than a pinned point and drops a
//! segment only after its frames are in the replica, so a segment that is gone when a
//! frame is needed means its data is in the replica: the view then reads the replica.
//! The same holds while the index is built from a copy of the journal's entries that a
//! fold overtook: frames of a missing segment are skipped ([`PointIndex::build`]).
//!
//! Why the replica is right for such a range: let the replica be at `Q` (folded
//! through `Q`, `Q` before the pinned point `P`, or mid-fold towards such a `Q`). A
//! range whose newest write up to `P` is a frame at or before `Q` holds that frame's
//! bytes in the replica once its segment is gone (segments go only after the fold's
//! sync), and a fold towards `Q` writes only ranges of frames up to `Q`, which the
//! index sends to the journal while their segments exist. A range no frame through `P`
//! wrote is never written by a fold that stops before `P`.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

use crate::extent::ExtentData;
use crate::frame::{self, DATA_HEAD_BYTES_MAX, Decoder, FrameError, FrameKind};
use crate::journal::segindex::{self, Detail, IndexedFrame, Table};
use crate::journal::{FrameEntry, segment_name};
use crate::storage::{OpenMode, Storage, StorageFile};

/// Decoded frames kept for reads.
pub const FRAME_CACHE_MAX: usize = 8;
/// Fewer ranges than this are inserted one by one by [`RangeMap::insert_all`].
const BATCH_MIN: usize = 64;
/// Bytes read first from a frame's start to find its extent table (enough for up to
/// ~70 extents; more are read when the table is longer).
pub const HEAD_PEEK_BYTES: usize = 4096;
/// Bytes read ahead at once when the heads of small frames are read (frames up to an
/// eighth of it are served from the window).
pub const PEEK_WINDOW_BYTES: usize = 256 << 10;

/// Why a view could not be built or read.
#[derive(Debug, Error)]
pub enum PointViewError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("journal frame {seq} in {}: {source}", path.display())]
    Frame {
        seq: u64,
        path: PathBuf,
        #[source]
        source: FrameError,
    },
    #[error("journal frame {seq} is for disk {disk:?}, which is not a disk of this view")]
    UnknownDisk { seq: u64, disk: String },
    #[error(
        "journal frame {seq} writes {offset}+{len} past the end of disk {disk:?} ({size} bytes)"
    )]
    OutOfRange {
        seq: u64,
        disk: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("read {offset}+{len} of disk {disk:?} is past its end ({size} bytes)")]
    ReadOutOfRange {
        disk: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("frame {seq} changed since the index was built: its extent {extent} is gone")]
    Stale { seq: u64, extent: usize },
    #[error("frame {seq} does not hold what the index says of its extent {extent}: {why}")]
    IndexMismatch {
        seq: u64,
        extent: usize,
        why: String,
    },
}

/// Where the bytes of a range come from: extent `extent` of frame `seq`, which starts at
/// disk byte `extent_offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Src {
    seq: u64,
    extent: u32,
    extent_offset: u64,
    zero: bool,
}

/// Non-overlapping byte ranges, each with a value; a later insert wins over what it
/// overlaps (which is split around it). The index of a point, and an export's map of
/// what its overlay holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeMap<V> {
    /// start -> (end, value).
    map: BTreeMap<u64, (u64, V)>,
}

impl<V> Default for RangeMap<V> {
    fn default() -> Self {
        Self {
            map: BTreeMap::new(),
        }
    }
}

impl<V: Copy> RangeMap<V> {
    /// Sets `[start, end)` to `src`.
    pub fn insert(&mut self, start: u64, end: u64, src: V) {
        if start >= end {
            return;
        }
        // Most writes overlap nothing indexed yet: one lookup, no list of hits.
        let overlaps = self
            .map
            .range(..end)
            .next_back()
            .is_some_and(|(_, (e, _))| *e > start);
        if !overlaps {
            self.map.insert(start, (end, src));
            return;
        }
        let hit: Vec<u64> = self
            .map
            .range(..end)
            .rev()
            .take_while(|(_, (e, _))| *e > start)
            .map(|(k, _)| *k)
            .collect();
        for k in hit {
            if let Some((e, s)) = self.map.remove(&k) {
                if k < start {
                    self.map.insert(k, (start, s));
                }
                if e > end {
                    self.map.insert(end, (e, s));
                }
            }
        }
        self.map.insert(start, (end, src));
    }

    /// Sets each `(start, end, value)` of `items` in turn, as [`RangeMap::insert`] one
    /// after the other would (later items win), but in one sweep when they are many:
    /// `O((m + n) log(m + n))` for `n` items over `m` ranges, instead of `n` searches of
    /// a growing tree (what makes indexing a point of 250,000 frames several times
    /// faster). A few items are inserted one by one.
    pub fn insert_all(&mut self, items: Vec<(u64, u64, V)>) {
        if items.len() < BATCH_MIN || items.len() * 4 < self.map.len() {
            for (s, e, v) in items {
                self.insert(s, e, v);
            }
            return;
        }
        // Every range with its rank: the ranges held first (they do not overlap, so any
        // order of them will do), then the items in order; a higher rank wins.
        let mut all: Vec<(u64, u64, V)> = std::mem::take(&mut self.map)
            .into_iter()
            .map(|(s, (e, v))| (s, e, v))
            .chain(items.into_iter().filter(|(s, e, _)| s < e))
            .collect();
        let mut order: Vec<u32> = (0..all.len() as u32).collect();
        order.sort_unstable_by_key(|&r| all[r as usize].0);
        // Sweep the starts in order with a heap of the ranges open at `x`, the highest
        // rank on top (ranges that ended are dropped when they surface). From `x` the
        // top holds until it ends or the next range starts.
        let mut open: std::collections::BinaryHeap<u32> = std::collections::BinaryHeap::new();
        let mut out: Vec<(u64, u64, u32)> = Vec::with_capacity(all.len());
        let mut next = 0;
        let mut x = 0u64;
        loop {
            while let Some(&r) = order.get(next)
                && all[r as usize].0 <= x
            {
                open.push(r);
                next += 1;
            }
            while open.peek().is_some_and(|&r| all[r as usize].1 <= x) {
                open.pop();
            }
            let next_start = order.get(next).map(|&r| all[r as usize].0);
            let Some(&top) = open.peek() else {
                match next_start {
                    Some(s) => {
                        x = s;
                        continue;
                    }
                    None => break,
                }
            };
            let to = all[top as usize].1.min(next_start.unwrap_or(u64::MAX));
            match out.last_mut() {
                Some(last) if last.2 == top && last.1 == x => last.1 = to,
                _ => out.push((x, to, top)),
            }
            x = to;
        }
        // Sorted and not overlapping: the tree is built in one pass.
        self.map = out
            .into_iter()
            .map(|(s, e, r)| (s, (e, all[r as usize].2)))
            .collect();
        all.clear();
    }

    /// The pieces of `[start, end)` in order: `(from, to, value)`, `None` where nothing
    /// was inserted.
    pub fn pieces(&self, start: u64, end: u64) -> Vec<(u64, u64, Option<V>)> {
        let mut out = Vec::new();
        let mut at = start;
        // A range that starts before `start` and reaches into it.
        let before = self
            .map
            .range(..start)
            .next_back()
            .filter(|(_, (e, _))| *e > start)
            .map(|(k, v)| (*k, *v));
        for (k, (e, s)) in before
            .into_iter()
            .chain(self.map.range(start..end).map(|(k, v)| (*k, *v)))
        {
            let from = k.max(start);
            if from > at {
                out.push((at, from, None));
            }
            let to = e.min(end);
            out.push((from, to, Some(s)));
            at = to;
        }
        if at < end {
            out.push((at, end, None));
        }
        out
    }

    /// Ranges held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing was inserted.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// One disk of a view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViewDisk {
    pub id: String,
    pub size_bytes: u64,
}

/// Where a frame lives in the journal's files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FrameLoc {
    seq: u64,
    segment: u64,
    offset: u64,
    len: u32,
}

/// The index of a point: for every disk, which frame extent holds each written range.
#[derive(Debug, PartialEq, Eq)]
pub struct PointIndex {
    disks: Vec<ViewDisk>,
    maps: Vec<RangeMap<Src>>,
    /// The data frames indexed, by seq (ascending).
    frames: Vec<FrameLoc>,
    journal_dir: PathBuf,
    group: String,
}

/// What building an index found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexStats {
    pub data_frames: u64,
    pub extents: u64,
    /// Map entries kept (extent pieces still visible at the point).
    pub pieces: u64,
    /// Data frames skipped because their segment was gone: retention folded them into
    /// the replicas after the entries were copied.
    pub folded_frames: u64,
    /// Data frames whose extent table came from their segment's index file.
    pub indexed_frames: u64,
    /// Data frames whose extent table was read from the frame (the open segment's, and
    /// those of a sealed segment without a usable index).
    pub peeked_frames: u64,
    /// Segment index files found unusable (their frames were read instead).
    pub indexes_ignored: u64,
}

impl PointIndex {
    /// Indexes the data frames among `frames` (the journal's entries from its base
    /// through the point's frame, in seq order; other kinds are skipped) of the journal
    /// of `group` in `journal_dir`.
    ///
    /// The entries may be a copy taken a moment earlier, while retention folds under
    /// it (the running master target builds from such a copy): a frame whose segment
    /// is gone was folded into the replicas, so it is skipped and its ranges come from
    /// the replica, as in [`PointView::read`]. Segments go oldest first, so the skipped
    /// frames are always a prefix. The caller keeps the point pinned (see
    /// [`crate::retention::Pins`]), so the fold never goes past it.
    pub fn build(
        fs: &dyn Storage,
        journal_dir: &Path,
        group: &str,
        frames: &[FrameEntry],
        disks: &[ViewDisk],
    ) -> Result<(Self, IndexStats), PointViewError> {
        let mut index = Self {
            disks: disks.to_vec(),
            maps: vec![RangeMap::default(); disks.len()],
            frames: Vec::new(),
            journal_dir: journal_dir.to_path_buf(),
            group: group.to_string(),
        };
        let stats = index.extend(fs, frames)?;
        Ok((index, stats))
    }

    /// Indexes further frames, newer than every frame indexed so far (in seq order):
    /// the index then stands for the state through the last of them. How a master
    /// target keeps a view of its latest journaled state up to date as frames arrive.
    /// On an error the index may hold part of `frames`: drop it.
    pub fn extend(
        &mut self,
        fs: &dyn Storage,
        frames: &[FrameEntry],
    ) -> Result<IndexStats, PointViewError> {
        let mut stats = IndexStats::default();
        // The extents of each disk, in seq order, laid over its map at the end.
        let mut laid = vec![Vec::new(); self.disks.len()];
        for run in frames.chunk_by(|a, b| a.segment == b.segment) {
            self.extend_segment(fs, run, &mut laid, &mut stats)?;
        }
        for (map, items) in self.maps.iter_mut().zip(laid) {
            map.insert_all(items);
        }
        stats.pieces = self.maps.iter().map(|m| m.len() as u64).sum();
        Ok(stats)
    }

    /// Indexes the data frames of `run`, entries of one segment: their tables from the
    /// segment's index file where it has a usable one that lists them, else from the
    /// frames.
    fn extend_segment(
        &mut self,
        fs: &dyn Storage,
        run: &[FrameEntry],
        laid: &mut [Vec<(u64, u64, Src)>],
        stats: &mut IndexStats,
    ) -> Result<(), PointViewError> {
        let data = || run.iter().filter(|f| f.kind == FrameKind::Data);
        let Some(segment) = data().next().map(|f| f.segment) else {
            return Ok(());
        };
        let path = self.journal_dir.join(segment_name(segment));
        let file = match fs.open(&path, OpenMode::ReadOnly) {
            Ok(f) => f,
            // Folded into the replicas since the entries were copied: the replica holds
            // these frames' bytes (see the module doc).
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                stats.folded_frames += data().count() as u64;
                return Ok(());
            }
            Err(source) => {
                return Err(PointViewError::Io {
                    what: "open journal segment",
                    path,
                    source,
                });
            }
        };
        let index = segindex::load(fs, &self.journal_dir, &self.group, segment, file.as_ref())
            .unwrap_or_else(|_| {
                stats.indexes_ignored += 1;
                None
            });
        let mut records = index.as_ref().map(|i| i.frames());
        let mut heads = HeadReader::new(file, path);
        for fe in data() {
            let table = records.as_mut().and_then(|r| table_of(r, fe));
            match table {
                Some(t) => {
                    let extents = t.extents().map(|e| (e.offset, e.len, e.zero));
                    stats.extents += self.lay_frame(laid, fe.seq, t.disk, extents)?;
                    stats.indexed_frames += 1;
                }
                None => {
                    let info = heads.data_head(fe)?;
                    let extents = info.entries.iter().map(|e| (e.offset, e.len, e.zero));
                    stats.extents += self.lay_frame(laid, fe.seq, &info.meta.disk, extents)?;
                    stats.peeked_frames += 1;
                }
            }
            self.add_loc(FrameLoc {
                seq: fe.seq,
                segment,
                offset: fe.offset,
                len: fe.len,
            });
            stats.data_frames += 1;
        }
        Ok(())
    }

    /// Records where a frame is; frames come in seq order (else they are put in it).
    fn add_loc(&mut self, loc: FrameLoc) {
        match self.frames.last() {
            Some(last) if last.seq >= loc.seq => {
                let i = self.frames.partition_point(|f| f.seq < loc.seq);
                if self.frames.get(i).is_some_and(|f| f.seq == loc.seq) {
                    self.frames[i] = loc;
                } else {
                    self.frames.insert(i, loc);
                }
            }
            _ => self.frames.push(loc),
        }
    }

    /// Where data frame `seq` is.
    fn loc(&self, seq: u64) -> Option<FrameLoc> {
        let i = self.frames.binary_search_by_key(&seq, |f| f.seq).ok()?;
        self.frames.get(i).copied()
    }

    /// Adds the extents `(offset, len, zero)` of data frame `seq` of `disk` to those to
    /// lay over the map of that disk; returns how many.
    fn lay_frame(
        &self,
        laid: &mut [Vec<(u64, u64, Src)>],
        seq: u64,
        disk: &str,
        extents: impl Iterator<Item = (u64, u64, bool)>,
    ) -> Result<u64, PointViewError> {
        let d = self
            .disks
            .iter()
            .position(|d| d.id == disk)
            .ok_or_else(|| PointViewError::UnknownDisk {
                seq,
                disk: disk.to_string(),
            })?;
        let size = self.disks[d].size_bytes;
        let mut n = 0;
        for (i, (offset, len, zero)) in extents.enumerate() {
            let end = offset.checked_add(len).filter(|&e| e <= size);
            let Some(end) = end else {
                return Err(PointViewError::OutOfRange {
                    seq,
                    disk: disk.to_string(),
                    offset,
                    len,
                    size,
                });
            };
            laid[d].push((
                offset,
                end,
                Src {
                    seq,
                    extent: i as u32,
                    extent_offset: offset,
                    zero,
                },
            ));
            n += 1;
        }
        Ok(n)
    }

    /// Whether any frame wrote disk `d` (else the view of it is the replica).
    pub fn touches(&self, d: usize) -> bool {
        self.maps.get(d).is_some_and(|m| !m.is_empty())
    }

    /// The disks, in the order given to [`PointIndex::build`].
    pub fn disks(&self) -> &[ViewDisk] {
        &self.disks
    }

    /// The byte ranges of disk `d` that frames wrote (they differ from the replica, or
    /// may), merged, ascending.
    pub fn written(&self, d: usize) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (&s, &(e, _)) in self.maps.get(d).map(|m| &m.map).into_iter().flatten() {
            match out.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => out.push((s, e)),
            }
        }
        out
    }
}

/// The table the index's records give for `fe`, consuming the records up to it; `None`
/// when they do not list it as it is (then the frame is read).
fn table_of<'a>(
    records: &mut impl Iterator<Item = IndexedFrame<'a>>,
    fe: &FrameEntry,
) -> Option<Table<'a>> {
    for r in records.by_ref() {
        if r.entry.seq < fe.seq {
            continue;
        }
        return match r.detail {
            Detail::Data(Some(t)) if r.entry == *fe => Some(t),
            _ => None,
        };
    }
    None
}

/// Reads the heads (extent tables) of a segment's data frames, in offset order. Small
/// frames are served from a window of [`PEEK_WINDOW_BYTES`] read ahead, so that a
/// segment of many small frames costs a read per window, not per frame.
struct HeadReader {
    file: Box<dyn StorageFile>,
    path: PathBuf,
    /// The file's length, read on first use.
    size: Option<u64>,
    /// Where `window` starts in the file.
    at: u64,
    window: Vec<u8>,
    scratch: Vec<u8>,
}

impl HeadReader {
    fn new(file: Box<dyn StorageFile>, path: PathBuf) -> Self {
        Self {
            file,
            path,
            size: None,
            at: 0,
            window: Vec::new(),
            scratch: Vec::new(),
        }
    }

    fn io(&self, what: &'static str) -> impl FnOnce(io::Error) -> PointViewError {
        let path = self.path.clone();
        move |source| PointViewError::Io { what, path, source }
    }

    /// `len` bytes at `offset` of the segment.
    fn bytes(&mut self, offset: u64, len: usize, frame_len: u32) -> Result<&[u8], PointViewError> {
        let end = offset + len as u64;
        let in_window = offset >= self.at && end <= self.at + self.window.len() as u64;
        if !in_window && frame_len as usize <= PEEK_WINDOW_BYTES / 8 {
            let size = match self.size {
                Some(s) => s,
                None => {
                    let s = self.file.len().map_err(self.io("size journal segment"))?;
                    self.size = Some(s);
                    s
                }
            };
            let n = (PEEK_WINDOW_BYTES as u64)
                .min(size.saturating_sub(offset))
                .max(len as u64);
            self.window.resize(n as usize, 0);
            self.at = offset;
            if let Err(e) = self.file.read_exact_at(&mut self.window, offset) {
                self.window.clear();
                return Err(self.io("read journal segment")(e));
            }
        } else if !in_window {
            self.scratch.resize(len, 0);
            self.file
                .read_exact_at(&mut self.scratch, offset)
                .map_err(self.io("read journal segment"))?;
            return Ok(&self.scratch[..len]);
        }
        let s = (offset - self.at) as usize;
        Ok(&self.window[s..s + len])
    }

    /// The extent table of data frame `fe`, read from its start (more when the table is
    /// long).
    fn data_head(&mut self, fe: &FrameEntry) -> Result<frame::DataFrameInfo, PointViewError> {
        let mut want = HEAD_PEEK_BYTES.min(fe.len as usize);
        let path = self.path.clone();
        let frame_err = |source| PointViewError::Frame {
            seq: fe.seq,
            path,
            source,
        };
        loop {
            let r = frame::peek_data_head(self.bytes(fe.offset, want, fe.len)?);
            match r {
                Err(FrameError::Truncated { .. })
                    if want < (fe.len as usize).min(DATA_HEAD_BYTES_MAX) =>
                {
                    want = (fe.len as usize).min(DATA_HEAD_BYTES_MAX);
                }
                Ok(info) if info.seq != fe.seq => {
                    return Err(frame_err(FrameError::Invalid {
                        field: "seq",
                        why: format!("{} where the index expects {}", info.seq, fe.seq),
                    }));
                }
                r => return r.map_err(frame_err),
            }
        }
    }
}

/// A frame read whole and verified: its disk and its extents (offset, length, bytes or
/// `None` for a zero extent).
struct Decoded {
    disk: String,
    extents: Vec<(u64, u64, Option<Vec<u8>>)>,
}

/// A point, readable: [`PointIndex`] over the replicas. See the module doc.
pub struct PointView {
    index: PointIndex,
    fs: Arc<dyn Storage>,
    replicas: Vec<(PathBuf, Box<dyn StorageFile>)>,
    decoder: Decoder,
    cache: VecDeque<(u64, Decoded)>,
}

impl PointView {
    /// A view of `index` over the replica files (one per disk, in the index's order).
    pub fn new(
        index: PointIndex,
        fs: Arc<dyn Storage>,
        replicas: &[PathBuf],
    ) -> Result<Self, PointViewError> {
        let files = replicas
            .iter()
            .map(|p| {
                fs.open(p, OpenMode::ReadOnly)
                    .map(|f| (p.clone(), f))
                    .map_err(|source| PointViewError::Io {
                        what: "open replica",
                        path: p.clone(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            index,
            fs,
            replicas: files,
            decoder: Decoder::new(),
            cache: VecDeque::new(),
        })
    }

    /// The index.
    pub fn index(&self) -> &PointIndex {
        &self.index
    }

    /// The index, to [`PointIndex::extend`] it with newer frames.
    pub fn index_mut(&mut self) -> &mut PointIndex {
        &mut self.index
    }

    /// Fills `buf` with disk `d`'s bytes at `offset` as they were at the point.
    pub fn read(&mut self, d: usize, offset: u64, buf: &mut [u8]) -> Result<(), PointViewError> {
        let disk = &self.index.disks[d];
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > disk.size_bytes) {
            return Err(PointViewError::ReadOutOfRange {
                disk: disk.id.clone(),
                offset,
                len: buf.len() as u64,
                size: disk.size_bytes,
            });
        }
        let end = offset + buf.len() as u64;
        for (from, to, src) in self.index.maps[d].pieces(offset, end) {
            let out = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match src {
                None => self.read_replica(d, from, out)?,
                Some(s) => {
                    if !self.read_extent(d, s, from, out)? {
                        // Folded into the replica by retention since the index was built.
                        self.read_replica(d, from, out)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn read_replica(&self, d: usize, offset: u64, out: &mut [u8]) -> Result<(), PointViewError> {
        let (path, f) = &self.replicas[d];
        f.read_exact_at(out, offset)
            .map_err(|source| PointViewError::Io {
                what: "read replica",
                path: path.clone(),
                source,
            })
    }

    /// Copies the bytes at `from` of extent `s` into `out` (zeros for a zero extent);
    /// false when its frame's segment is gone (folded). The frame is read and verified
    /// first, and must hold what the index says (disk, the extent's place and kind):
    /// the index, built from extent tables alone, never decides a byte by itself.
    fn read_extent(
        &mut self,
        d: usize,
        s: Src,
        from: u64,
        out: &mut [u8],
    ) -> Result<bool, PointViewError> {
        let disk = self.index.disks[d].id.clone();
        let Some(frame) = self.frame(s.seq)? else {
            return Ok(false);
        };
        let mismatch = |why: String| PointViewError::IndexMismatch {
            seq: s.seq,
            extent: s.extent as usize,
            why,
        };
        if frame.disk != disk {
            return Err(mismatch(format!(
                "the frame is of disk {:?}, the index says {disk:?}",
                frame.disk
            )));
        }
        let Some((offset, len, bytes)) = frame.extents.get(s.extent as usize) else {
            return Err(mismatch(format!(
                "the frame has {} extents",
                frame.extents.len()
            )));
        };
        let at = from.checked_sub(*offset).map(|a| a as usize);
        let within = at.filter(|&a| *offset == s.extent_offset && (a + out.len()) as u64 <= *len);
        let (Some(at), true) = (within, bytes.is_none() == s.zero) else {
            return Err(mismatch(format!(
                "the frame's extent is {offset}+{len} ({}), the index says {}.. ({}) and reads {from}+{}",
                if bytes.is_none() { "zero" } else { "data" },
                s.extent_offset,
                if s.zero { "zero" } else { "data" },
                out.len()
            )));
        };
        match bytes {
            None => out.fill(0),
            Some(b) => out.copy_from_slice(&b[at..at + out.len()]),
        }
        Ok(true)
    }

    /// Frame `seq`, read and verified (cached), `None` when its segment is gone.
    fn frame(&mut self, seq: u64) -> Result<Option<&Decoded>, PointViewError> {
        if let Some(i) = self.cache.iter().position(|(s, _)| *s == seq) {
            // Most recent at the back.
            if let Some(e) = self.cache.remove(i) {
                self.cache.push_back(e);
            }
            return Ok(self.cache.back().map(|(_, e)| e));
        }
        let Some(loc) = self.index.loc(seq) else {
            return Err(PointViewError::Stale { seq, extent: 0 });
        };
        let path = self.index.journal_dir.join(segment_name(loc.segment));
        let file = match self.fs.open(&path, OpenMode::ReadOnly) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(PointViewError::Io {
                    what: "open journal segment",
                    path,
                    source,
                });
            }
        };
        let mut bytes = vec![0u8; loc.len as usize];
        file.read_exact_at(&mut bytes, loc.offset)
            .map_err(|source| PointViewError::Io {
                what: "read journal segment",
                path: path.clone(),
                source,
            })?;
        let frame = self
            .decoder
            .decode_data(&bytes)
            .map_err(|source| PointViewError::Frame {
                seq,
                path: path.clone(),
                source,
            })?;
        if frame.seq != seq {
            return Err(PointViewError::Frame {
                seq,
                path,
                source: FrameError::Invalid {
                    field: "seq",
                    why: format!("{} where the index expects {seq}", frame.seq),
                },
            });
        }
        let decoded = Decoded {
            disk: frame.meta.disk.clone(),
            extents: frame
                .extents()
                .map(|(offset, d)| match d {
                    ExtentData::Bytes(b) => (offset, b.len() as u64, Some(b.to_vec())),
                    ExtentData::Zero(n) => (offset, n, None),
                })
                .collect(),
        };
        self.decoder.recycle(frame);
        if self.cache.len() >= FRAME_CACHE_MAX {
            self.cache.pop_front();
        }
        self.cache.push_back((seq, decoded));
        Ok(self.cache.back().map(|(_, e)| e))
    }
}

#[cfg(test)]
mod tests;
