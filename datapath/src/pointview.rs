//! A recovery point as a readable disk, without applying anything: the replica with the
//! journal's frames up to the point laid over it. The basis of test failover (serve a
//! point over NBD), of an online verify and of hashing a copy for a resync.
//!
//! **Index.** [`PointIndex::build`] reads the extent table of every data frame from the
//! journal's base through the point's frame, in seq order, and keeps per disk a map from
//! byte ranges to the newest extent that wrote them (later frames win, overlapped
//! ranges are split). Only the tables are read ([`frame::peek_data_head`], a few KiB per
//! frame), never the payloads: building is a small read per frame, whatever the bytes
//! the journal holds. Memory is one map entry per surviving extent piece.
//!
//! **Reads.** [`PointView::read`] fills a range piece by piece: a range no frame wrote
//! comes from the replica, a zero extent is zeros, a data extent comes from its frame,
//! which is read whole and decoded with every check ([`frame::Decoder::decode_data`]:
//! crc, bounds, blake3) before a byte of it is served. A few decoded frames are cached
//! ([`FRAME_CACHE_MAX`]).
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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

use crate::extent::ExtentData;
use crate::frame::{self, DATA_HEAD_BYTES_MAX, Decoder, FrameError, FrameKind};
use crate::journal::{FrameEntry, segment_name};
use crate::storage::{OpenMode, Storage, StorageFile};

/// Decoded frames kept for reads.
pub const FRAME_CACHE_MAX: usize = 8;
/// Bytes read first from a frame's start to find its extent table (enough for up to
/// ~70 extents; more are read when the table is longer).
pub const HEAD_PEEK_BYTES: usize = 4096;

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
#[derive(Clone, Debug)]
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
#[derive(Clone, Debug)]
struct FrameLoc {
    path: PathBuf,
    offset: u64,
    len: u32,
}

/// The index of a point: for every disk, which frame extent holds each written range.
#[derive(Debug)]
pub struct PointIndex {
    disks: Vec<ViewDisk>,
    maps: Vec<RangeMap<Src>>,
    frames: HashMap<u64, FrameLoc>,
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
}

impl PointIndex {
    /// Indexes the data frames among `frames` (the journal's entries from its base
    /// through the point's frame, in seq order; other kinds are skipped) of the journal
    /// in `journal_dir`.
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
        frames: &[FrameEntry],
        disks: &[ViewDisk],
    ) -> Result<(Self, IndexStats), PointViewError> {
        let mut index = Self {
            disks: disks.to_vec(),
            maps: vec![RangeMap::default(); disks.len()],
            frames: HashMap::new(),
        };
        let stats = index.extend(fs, journal_dir, frames)?;
        Ok((index, stats))
    }

    /// Indexes further frames, newer than every frame indexed so far (in seq order):
    /// the index then stands for the state through the last of them. How a master
    /// target keeps a view of its latest journaled state up to date as frames arrive.
    /// On an error the index may hold part of `frames`: drop it.
    pub fn extend(
        &mut self,
        fs: &dyn Storage,
        journal_dir: &Path,
        frames: &[FrameEntry],
    ) -> Result<IndexStats, PointViewError> {
        let disks = &self.disks;
        let maps = &mut self.maps;
        let locs = &mut self.frames;
        let mut stats = IndexStats::default();
        let mut open: Option<(u64, Box<dyn StorageFile>)> = None;
        // The last segment found missing (folded): its other frames are skipped too.
        let mut gone: Option<u64> = None;
        let mut buf = Vec::new();
        for fe in frames.iter().filter(|f| f.kind == FrameKind::Data) {
            let path = journal_dir.join(segment_name(fe.segment));
            if gone == Some(fe.segment) {
                stats.folded_frames += 1;
                continue;
            }
            if open.as_ref().is_none_or(|(s, _)| *s != fe.segment) {
                match fs.open(&path, OpenMode::ReadOnly) {
                    Ok(f) => open = Some((fe.segment, f)),
                    // Folded into the replicas since the entries were copied: the
                    // replica holds these frames' bytes (see the module doc).
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        gone = Some(fe.segment);
                        stats.folded_frames += 1;
                        continue;
                    }
                    Err(source) => {
                        return Err(PointViewError::Io {
                            what: "open journal segment",
                            path: path.clone(),
                            source,
                        });
                    }
                }
            }
            let Some((_, file)) = open.as_ref() else {
                continue;
            };
            let info = peek(file.as_ref(), fe, &path, &mut buf)?;
            let d = disks
                .iter()
                .position(|d| d.id == info.meta.disk)
                .ok_or_else(|| PointViewError::UnknownDisk {
                    seq: fe.seq,
                    disk: info.meta.disk.clone(),
                })?;
            for (i, e) in info.entries.iter().enumerate() {
                if e.end() > disks[d].size_bytes {
                    return Err(PointViewError::OutOfRange {
                        seq: fe.seq,
                        disk: disks[d].id.clone(),
                        offset: e.offset,
                        len: e.len,
                        size: disks[d].size_bytes,
                    });
                }
                maps[d].insert(
                    e.offset,
                    e.end(),
                    Src {
                        seq: fe.seq,
                        extent: i as u32,
                        extent_offset: e.offset,
                        zero: e.zero,
                    },
                );
                stats.extents += 1;
            }
            locs.insert(
                fe.seq,
                FrameLoc {
                    path,
                    offset: fe.offset,
                    len: fe.len,
                },
            );
            stats.data_frames += 1;
        }
        stats.pieces = maps.iter().map(|m| m.len() as u64).sum();
        Ok(stats)
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

/// Reads the extent table of frame `fe` from its start (more when the table is long).
fn peek(
    file: &dyn StorageFile,
    fe: &FrameEntry,
    path: &Path,
    buf: &mut Vec<u8>,
) -> Result<frame::DataFrameInfo, PointViewError> {
    let mut want = HEAD_PEEK_BYTES.min(fe.len as usize);
    loop {
        buf.resize(want, 0);
        file.read_exact_at(buf, fe.offset)
            .map_err(|source| PointViewError::Io {
                what: "read journal segment",
                path: path.to_path_buf(),
                source,
            })?;
        match frame::peek_data_head(buf) {
            Err(FrameError::Truncated { .. })
                if want < (fe.len as usize).min(DATA_HEAD_BYTES_MAX) =>
            {
                want = (fe.len as usize).min(DATA_HEAD_BYTES_MAX);
            }
            Ok(info) if info.seq != fe.seq => {
                return Err(PointViewError::Frame {
                    seq: fe.seq,
                    path: path.to_path_buf(),
                    source: FrameError::Invalid {
                        field: "seq",
                        why: format!("{} where the index expects {}", info.seq, fe.seq),
                    },
                });
            }
            r => {
                return r.map_err(|source| PointViewError::Frame {
                    seq: fe.seq,
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
}

/// A decoded frame's extents: bytes, or `None` for a zero extent.
type Extents = Vec<Option<Vec<u8>>>;

/// A point, readable: [`PointIndex`] over the replicas. See the module doc.
pub struct PointView {
    index: PointIndex,
    fs: Arc<dyn Storage>,
    replicas: Vec<(PathBuf, Box<dyn StorageFile>)>,
    decoder: Decoder,
    cache: VecDeque<(u64, Extents)>,
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
                Some(s) if s.zero => out.fill(0),
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

    /// Copies the bytes at `from` of extent `s` into `out`; false when its frame's
    /// segment is gone (folded).
    fn read_extent(
        &mut self,
        _d: usize,
        s: Src,
        from: u64,
        out: &mut [u8],
    ) -> Result<bool, PointViewError> {
        let Some(extents) = self.frame(s.seq)? else {
            return Ok(false);
        };
        let bytes = extents
            .get(s.extent as usize)
            .and_then(|e| e.as_ref())
            .ok_or(PointViewError::Stale {
                seq: s.seq,
                extent: s.extent as usize,
            })?;
        let at = (from - s.extent_offset) as usize;
        let src = bytes.get(at..at + out.len()).ok_or(PointViewError::Stale {
            seq: s.seq,
            extent: s.extent as usize,
        })?;
        out.copy_from_slice(src);
        Ok(true)
    }

    /// The decoded extents of frame `seq` (cached), `None` when its segment is gone.
    fn frame(&mut self, seq: u64) -> Result<Option<&Extents>, PointViewError> {
        if let Some(i) = self.cache.iter().position(|(s, _)| *s == seq) {
            // Most recent at the back.
            if let Some(e) = self.cache.remove(i) {
                self.cache.push_back(e);
            }
            return Ok(self.cache.back().map(|(_, e)| e));
        }
        let Some(loc) = self.index.frames.get(&seq) else {
            return Err(PointViewError::Stale { seq, extent: 0 });
        };
        let file = match self.fs.open(&loc.path, OpenMode::ReadOnly) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(PointViewError::Io {
                    what: "open journal segment",
                    path: loc.path.clone(),
                    source,
                });
            }
        };
        let mut bytes = vec![0u8; loc.len as usize];
        file.read_exact_at(&mut bytes, loc.offset)
            .map_err(|source| PointViewError::Io {
                what: "read journal segment",
                path: loc.path.clone(),
                source,
            })?;
        let frame = self
            .decoder
            .decode_data(&bytes)
            .map_err(|source| PointViewError::Frame {
                seq,
                path: loc.path.clone(),
                source,
            })?;
        let extents: Extents = frame
            .extents()
            .map(|(_, d)| match d {
                ExtentData::Bytes(b) => Some(b.to_vec()),
                ExtentData::Zero(_) => None,
            })
            .collect();
        self.decoder.recycle(frame);
        if self.cache.len() >= FRAME_CACHE_MAX {
            self.cache.pop_front();
        }
        self.cache.push_back((seq, extents));
        Ok(self.cache.back().map(|(_, e)| e))
    }
}

#[cfg(test)]
mod tests;
