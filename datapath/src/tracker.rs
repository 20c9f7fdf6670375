//! Change tracking of one replication group on the process server: the dirty bitmap of
//! each disk, the group's spool, the epoch counter and the cuts, kept in the order the
//! design's write path demands.
//!
//! The NBD server calls, for every write, trim or write-zeroes of a disk of the group:
//!
//! 1. [`GroupTracker::before_write`]: marks the blocks dirty, durably (through the
//!    bitmap's hot-region log), *before* the data may reach the backing disk;
//! 2. (the backing disk is written)
//! 3. [`GroupTracker::record_write`] / [`GroupTracker::record_zero`]: appends the write
//!    to the spool under the group's current epoch, before the reply.
//!
//! A FLUSH calls [`GroupTracker::flush`] (spool synced) after the backing disk's sync.
//! [`GroupTracker::cut`] seals the current epoch: a cut record is appended and synced,
//! and its point id is the epoch number, which rises for ever (a restart continues from
//! the spool's last record). Callers serialise the calls of one group (one mutex):
//! every write's spool record is then either before or after a cut, never split.
//!
//! When the master target acknowledges the frames of the group up to the cut at spool
//! seq `s` as durable, [`GroupTracker::ack_through`] releases the spool up to `s` and
//! clears the dirty bits of the blocks written in the acknowledged epochs, except those
//! written again in a later epoch that is not acknowledged yet (DRBD's rule: a bit is
//! cleared only when the last write to its block is safe at the target).
//!
//! **Spool full.** An append that finds the spool full switches the group to
//! [`TrackMode::BitmapOnly`]: writes are still marked in the bitmaps, nothing more is
//! spooled, and [`GroupTracker::cut`] offers no recovery point (the replica cannot be
//! brought to a consistent state from the spool any more). Getting back needs a resync
//! of the dirty blocks from the backing disks (the shipper's job).
//!
//! **Unclean restart.** [`GroupTracker::shutdown`] writes a `clean` marker; [`open`]
//! removes it. Without it at open, the previous run ended in a crash: writes that
//! reached a backing disk may be missing from the spool (their records were not synced
//! yet), so the report says `needs_resync`: the dirty blocks (every block of every
//! region that was hot) must be resynced from the backing disks before the next
//! consistent point.
//!
//! Memory: the extents of every epoch not yet acknowledged are kept (to clear bits
//! correctly), which is bounded by what the spool holds. [`GroupTracker::open`] reads
//! the spool once to rebuild them.
//!
//! [`open`]: GroupTracker::open

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

use crate::bitmap::{self, Bitmap, BitmapConfig, BitmapError};
use crate::extent::{Extent, ExtentError};
use crate::spool::{Spool, SpoolConfig, SpoolEntry, SpoolError, SpoolRecordRef};
use crate::storage::{Storage, write_atomic};

/// No format of its own (it uses the spool's and the bitmap's); kept so every module
/// reports a version.
pub const VERSION: u16 = 1;
/// Name of the clean-shutdown marker in the group's directory.
pub const CLEAN_MARKER: &str = "clean";
const CLEAN_CONTENTS: &[u8] = b"clean shutdown\n";

/// Why the tracker refused something.
#[derive(Debug, Error)]
pub enum TrackerError {
    #[error("unknown disk {0:?} in this group")]
    UnknownDisk(String),
    #[error("disk {disk}: {source}")]
    Extent {
        disk: String,
        #[source]
        source: ExtentError,
    },
    #[error("disk {disk}: dirty bitmap: {source}")]
    Bitmap {
        disk: String,
        #[source]
        source: BitmapError,
    },
    #[error("spool: {0}")]
    Spool(#[from] SpoolError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("spool record for {0:?}, which is not a disk of this group")]
    SpoolForeignDisk(String),
    #[error("change tracking of this group was closed (the server is stopping)")]
    Closed,
}

/// One disk of the group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    pub id: String,
    pub size_bytes: u64,
}

/// How the group is tracked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrackMode {
    /// Every write is spooled; cuts are recovery points.
    Spooling,
    /// Only the bitmaps track writes; no recovery point until a resync.
    BitmapOnly { reason: String },
}

/// A sealed epoch: the recovery point the cut made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CutPoint {
    pub point_id: u64,
    pub epoch: u64,
    pub time_unix_ms: u64,
    pub app_consistent: bool,
    /// Spool seq of the cut record: acknowledging it acknowledges the epoch.
    pub spool_seq: u64,
}

/// What [`GroupTracker::open`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenReport {
    /// The previous run did not shut down cleanly.
    pub unclean: bool,
    /// Dirty blocks must be resynced from the backing disks before the next consistent
    /// point (after an unclean end, or when the spool had overflowed).
    pub needs_resync: bool,
    /// The epoch writes now go to.
    pub epoch: u64,
    /// Spool records found.
    pub spool_records: u64,
}

struct Disk {
    id: String,
    size_bytes: u64,
    bitmap: Bitmap,
}

/// The extents written in one epoch, per disk index.
#[derive(Default)]
struct EpochExtents {
    by_disk: BTreeMap<usize, Vec<Extent>>,
}

/// Change tracking of one group. See the module doc.
pub struct GroupTracker {
    fs: Arc<dyn Storage>,
    dir: PathBuf,
    spool: Spool,
    disks: Vec<Disk>,
    epoch: u64,
    mode: TrackMode,
    /// Sealed epochs not yet acknowledged: (epoch, cut seq, extents), oldest first.
    unacked: VecDeque<(u64, u64, EpochExtents)>,
    current: EpochExtents,
    /// Writes marked by `before_write` and not recorded yet (disk index, extent): an
    /// ack must not clear their bits, their data may not be in the spool. A write whose
    /// backing write failed stays here (its bits then stay set, the safe side).
    in_flight: Vec<(usize, Extent)>,
    /// Set by [`GroupTracker::close`]: every later write is refused.
    closed: bool,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> TrackerError {
    let what = what.into();
    move |source| TrackerError::Io { what, source }
}

impl GroupTracker {
    /// Opens (or creates) the tracking state of a group in `dir`: `dir/spool` and one
    /// bitmap directory per disk (`dir/bitmap-<disk>`). Rebuilds the unacknowledged
    /// epochs from the spool.
    pub fn open(
        fs: Arc<dyn Storage>,
        dir: &Path,
        disks: &[DiskSpec],
        spool_cfg: SpoolConfig,
        bitmap_cfg: BitmapConfig,
    ) -> Result<(Self, OpenReport), TrackerError> {
        fs.create_dir_all(dir)
            .map_err(io_err(format!("create {}", dir.display())))?;
        let marker = dir.join(CLEAN_MARKER);
        let spool_dir = dir.join("spool");
        let existed = fs.exists(&spool_dir.join(crate::spool::segment_file_name(1)))
            || fs.list_dir(&spool_dir).is_ok_and(|n| !n.is_empty());
        let unclean = existed && !fs.exists(&marker);
        if fs.exists(&marker) {
            // From here on a crash is an unclean end again.
            fs.remove_file(&marker)
                .map_err(io_err("remove clean marker"))?;
            fs.sync_dir(dir).map_err(io_err("sync group directory"))?;
        }
        let mut opened = Vec::with_capacity(disks.len());
        for d in disks {
            let bdir = dir.join(format!("bitmap-{}", d.id));
            let both = fs.exists(&bdir.join(bitmap::BITMAP_FILE))
                && fs.exists(&bdir.join(bitmap::LOG_FILE));
            let bm = if both {
                Bitmap::open_for_disk(fs.as_ref(), &bdir, d.size_bytes)
            } else {
                Bitmap::create(fs.as_ref(), &bdir, d.size_bytes, bitmap_cfg)
            }
            .map_err(|source| TrackerError::Bitmap {
                disk: d.id.clone(),
                source,
            })?;
            opened.push(Disk {
                id: d.id.clone(),
                size_bytes: d.size_bytes,
                bitmap: bm,
            });
        }
        let (spool, rec) = Spool::open(fs.clone(), &spool_dir, spool_cfg)?;
        let mut t = Self {
            fs,
            dir: dir.to_path_buf(),
            spool,
            disks: opened,
            epoch: 1,
            mode: TrackMode::Spooling,
            unacked: VecDeque::new(),
            current: EpochExtents::default(),
            in_flight: Vec::new(),
            closed: false,
        };
        // Rebuild the epochs still in the spool (all of it is unacknowledged as far as
        // this side knows; the master target's resume point releases the rest).
        let mut last_epoch = 0u64;
        let mut last_was_cut = false;
        for r in t.spool.read_from(t.spool.first_seq()) {
            let r = r?;
            match r.entry {
                SpoolEntry::Write {
                    epoch,
                    disk,
                    offset,
                    data,
                } => {
                    let i = t.index(&disk).ok_or(TrackerError::SpoolForeignDisk(disk))?;
                    t.current.by_disk.entry(i).or_default().push(Extent {
                        offset,
                        len: data.len() as u64,
                    });
                    (last_epoch, last_was_cut) = (epoch, false);
                }
                SpoolEntry::Zero {
                    epoch,
                    disk,
                    offset,
                    len,
                } => {
                    let i = t.index(&disk).ok_or(TrackerError::SpoolForeignDisk(disk))?;
                    t.current
                        .by_disk
                        .entry(i)
                        .or_default()
                        .push(Extent { offset, len });
                    (last_epoch, last_was_cut) = (epoch, false);
                }
                SpoolEntry::Cut { epoch, .. } => {
                    let ext = std::mem::take(&mut t.current);
                    t.unacked.push_back((epoch, r.seq, ext));
                    (last_epoch, last_was_cut) = (epoch, true);
                }
            }
        }
        t.epoch = if last_was_cut {
            last_epoch + 1
        } else {
            last_epoch.max(1)
        };
        if unclean {
            t.mode = TrackMode::BitmapOnly {
                reason: "the previous run did not shut down cleanly: writes that reached a backing disk may be missing from the spool, so the dirty blocks must be resynced before the next recovery point".into(),
            };
        }
        let report = OpenReport {
            unclean,
            needs_resync: unclean,
            epoch: t.epoch,
            spool_records: rec.records,
        };
        Ok((t, report))
    }

    fn index(&self, disk: &str) -> Option<usize> {
        self.disks.iter().position(|d| d.id == disk)
    }

    fn disk(&mut self, disk: &str) -> Result<(usize, &mut Disk), TrackerError> {
        if self.closed {
            return Err(TrackerError::Closed);
        }
        let i = self
            .index(disk)
            .ok_or_else(|| TrackerError::UnknownDisk(disk.to_string()))?;
        Ok((i, &mut self.disks[i]))
    }

    /// The index of `disk` and the checked extent `[offset, offset + len)` inside it.
    fn disk_extent(
        &mut self,
        disk: &str,
        offset: u64,
        len: u64,
    ) -> Result<(usize, Extent), TrackerError> {
        let (i, d) = self.disk(disk)?;
        let ext =
            Extent::new(offset, len, d.size_bytes).map_err(|source| TrackerError::Extent {
                disk: disk.to_string(),
                source,
            })?;
        Ok((i, ext))
    }

    /// The epoch writes go to now.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// How the group is tracked.
    pub fn mode(&self) -> &TrackMode {
        &self.mode
    }

    /// Spool bytes in use and the bound.
    pub fn spool_fill(&self) -> (u64, u64) {
        (self.spool.used_bytes(), self.spool.max_bytes())
    }

    /// The spool (for the shipper to read durable records from).
    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Dirty blocks of a disk.
    pub fn dirty_blocks(&self, disk: &str) -> Option<u64> {
        self.index(disk)
            .map(|i| self.disks[i].bitmap.dirty_blocks())
    }

    /// The dirty runs of a disk (for a resync).
    pub fn dirty_runs(&self, disk: &str) -> Option<Vec<Extent>> {
        self.index(disk)
            .map(|i| self.disks[i].bitmap.dirty_runs().collect())
    }

    /// Step 1 of a write: marks `len` bytes at `offset` dirty, durably, before they may
    /// reach the backing disk. Refuses ranges outside the disk.
    pub fn before_write(&mut self, disk: &str, offset: u64, len: u64) -> Result<(), TrackerError> {
        let (i, ext) = self.disk_extent(disk, offset, len)?;
        self.disks[i]
            .bitmap
            .mark(&[ext])
            .map_err(|source| TrackerError::Bitmap {
                disk: disk.to_string(),
                source,
            })?;
        self.in_flight.push((i, ext));
        Ok(())
    }

    /// Step 3 of a write: spools `data` written at `offset`. Returns its spool seq, or
    /// `None` when the group tracks by bitmap only (the spool was or became full).
    pub fn record_write(
        &mut self,
        disk: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<Option<u64>, TrackerError> {
        let (i, ext) = self.disk_extent(disk, offset, data.len() as u64)?;
        let rec = SpoolRecordRef::Write {
            epoch: self.epoch,
            disk,
            offset,
            data,
        };
        self.record(i, ext, &rec)
    }

    /// Step 3 of a trim or write-zeroes: spools `len` zero bytes at `offset`.
    pub fn record_zero(
        &mut self,
        disk: &str,
        offset: u64,
        len: u64,
    ) -> Result<Option<u64>, TrackerError> {
        let (i, ext) = self.disk_extent(disk, offset, len)?;
        let rec = SpoolRecordRef::Zero {
            epoch: self.epoch,
            disk,
            offset,
            len,
        };
        self.record(i, ext, &rec)
    }

    fn record(
        &mut self,
        disk: usize,
        ext: Extent,
        rec: &SpoolRecordRef<'_>,
    ) -> Result<Option<u64>, TrackerError> {
        let in_flight = self.in_flight.iter().position(|&x| x == (disk, ext));
        let landed = |t: &mut Self| {
            if let Some(k) = in_flight {
                t.in_flight.swap_remove(k);
            }
        };
        if self.mode != TrackMode::Spooling {
            landed(self);
            return Ok(None);
        }
        // A failed append keeps the write in flight: its data is on the backing disk but
        // maybe not in the spool, so its bits must stay.
        let appended = self.spool.append(rec);
        if matches!(appended, Ok(_) | Err(SpoolError::Full { .. })) {
            landed(self);
        }
        match appended {
            Ok(seq) => {
                self.current.by_disk.entry(disk).or_default().push(ext);
                Ok(Some(seq))
            }
            Err(SpoolError::Full {
                used_bytes,
                max_bytes,
                ..
            }) => {
                self.mode = TrackMode::BitmapOnly {
                    reason: format!(
                        "spool full ({used_bytes} of {max_bytes} bytes): tracking by dirty bitmap only until a resync"
                    ),
                };
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A FLUSH: makes every spooled write durable. Returns the durable spool seq.
    pub fn flush(&mut self) -> Result<u64, TrackerError> {
        Ok(self.spool.sync()?)
    }

    /// Seals the current epoch into a recovery point (point id = epoch) and opens the
    /// next. `None` in bitmap-only mode: no point is offered from an inconsistent state.
    pub fn cut(
        &mut self,
        time_unix_ms: u64,
        app_consistent: bool,
    ) -> Result<Option<CutPoint>, TrackerError> {
        if self.mode != TrackMode::Spooling {
            return Ok(None);
        }
        let epoch = self.epoch;
        let rec = SpoolRecordRef::Cut {
            epoch,
            point_id: epoch,
            time_unix_ms,
            app_consistent,
        };
        let seq = match self.spool.append(&rec) {
            Ok(seq) => seq,
            Err(SpoolError::Full { .. }) => {
                self.mode = TrackMode::BitmapOnly {
                    reason: "spool full at a cut: tracking by dirty bitmap only until a resync"
                        .into(),
                };
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        self.spool.sync()?;
        let ext = std::mem::take(&mut self.current);
        self.unacked.push_back((epoch, seq, ext));
        self.epoch += 1;
        Ok(Some(CutPoint {
            point_id: epoch,
            epoch,
            time_unix_ms,
            app_consistent,
            spool_seq: seq,
        }))
    }

    /// The master target holds everything up to the cut at spool seq `seq` durably:
    /// releases the spool up to it and clears the dirty bits of the acknowledged
    /// epochs' blocks that no later, unacknowledged write touched.
    pub fn ack_through(&mut self, seq: u64) -> Result<(), TrackerError> {
        let mut done = Vec::new();
        while self.unacked.front().is_some_and(|(_, s, _)| *s <= seq) {
            if let Some(e) = self.unacked.pop_front() {
                done.push(e);
            }
        }
        if done.is_empty() {
            return Ok(());
        }
        self.spool.release(seq)?;
        if self.mode != TrackMode::Spooling {
            // Writes since the spool overflowed are known only to the bitmaps, not to
            // `current`: clearing now could clear a block written again since. The
            // resync that ends bitmap-only mode clears what it ships.
            return Ok(());
        }
        for (_, _, ext) in done {
            for (disk, extents) in ext.by_disk {
                // Later writes to the disk, not yet safe at the target.
                let mut later: Vec<Extent> = self
                    .unacked
                    .iter()
                    .map(|(_, _, e)| &e.by_disk)
                    .chain(std::iter::once(&self.current.by_disk))
                    .filter_map(|m| m.get(&disk))
                    .flatten()
                    .copied()
                    .chain(
                        self.in_flight
                            .iter()
                            .filter(|(d, _)| *d == disk)
                            .map(|&(_, e)| e),
                    )
                    .collect();
                later.sort_unstable();
                let d = &mut self.disks[disk];
                for e in extents {
                    for piece in subtract(e, &later) {
                        d.bitmap
                            .clear(piece)
                            .map_err(|source| TrackerError::Bitmap {
                                disk: d.id.clone(),
                                source,
                            })?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A clean stop: spool synced, bitmaps flushed, then the clean marker written.
    pub fn shutdown(mut self) -> Result<(), TrackerError> {
        self.close()
    }

    /// [`GroupTracker::shutdown`] for a tracker shared with threads that may still try
    /// to write: after it every write is refused ([`TrackerError::Closed`]), so nothing
    /// can follow the clean marker.
    pub fn close(&mut self) -> Result<(), TrackerError> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        self.spool.sync()?;
        for d in &mut self.disks {
            d.bitmap.flush().map_err(|source| TrackerError::Bitmap {
                disk: d.id.clone(),
                source,
            })?;
        }
        // The mode is not in the marker: a group that was bitmap-only stays so only
        // through the bitmaps' dirty bits, which a resync clears. A write still in
        // flight may reach its backing disk with its record refused from now on: the
        // spool then misses it, so the stop is not clean either.
        if self.mode != TrackMode::Spooling || !self.in_flight.is_empty() {
            return Ok(());
        }
        write_atomic(self.fs.as_ref(), &self.dir, CLEAN_MARKER, CLEAN_CONTENTS)
            .map_err(io_err("write clean marker"))
    }
}

/// The parts of `e` that no extent of `sorted` covers.
fn subtract(e: Extent, sorted: &[Extent]) -> Vec<Extent> {
    let mut out = Vec::new();
    let mut start = e.offset;
    let end = e.end();
    for o in sorted {
        if o.end() <= start || o.offset >= end {
            continue;
        }
        if o.offset > start {
            out.push(Extent {
                offset: start,
                len: o.offset - start,
            });
        }
        start = start.max(o.end());
        if start >= end {
            break;
        }
    }
    if start < end {
        out.push(Extent {
            offset: start,
            len: end - start,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{CrashMode, SimFs};
    use crate::testutil::Rng;

    const DISK_BYTES: u64 = 1 << 20;

    fn disks() -> Vec<DiskSpec> {
        vec![
            DiskSpec {
                id: "d0".into(),
                size_bytes: DISK_BYTES,
            },
            DiskSpec {
                id: "d1".into(),
                size_bytes: DISK_BYTES,
            },
        ]
    }

    fn spool_cfg() -> SpoolConfig {
        SpoolConfig {
            segment_bytes_max: 64 << 10,
            spool_bytes_max: 1 << 20,
        }
    }

    fn bitmap_cfg() -> BitmapConfig {
        BitmapConfig {
            region_bytes: 64 << 10,
            hot_regions_max: 4,
        }
    }

    fn open(fs: &SimFs) -> (GroupTracker, OpenReport) {
        GroupTracker::open(
            Arc::new(fs.clone()),
            Path::new("/g"),
            &disks(),
            spool_cfg(),
            bitmap_cfg(),
        )
        .unwrap()
    }

    /// Proves the subtraction of later writes leaves exactly the uncovered parts.
    #[test]
    fn subtract_examples() {
        let e = |offset, len| Extent { offset, len };
        assert_eq!(subtract(e(0, 100), &[]), vec![e(0, 100)]);
        assert_eq!(subtract(e(0, 100), &[e(10, 10)]), vec![e(0, 10), e(20, 80)]);
        assert_eq!(subtract(e(0, 100), &[e(0, 100)]), vec![]);
        assert_eq!(
            subtract(e(10, 100), &[e(0, 20), e(50, 10), e(100, 50)]),
            vec![e(20, 30), e(60, 40)]
        );
    }

    /// Proves writes, cuts and acks: points are epochs, bits of acknowledged blocks are
    /// cleared, bits of blocks written again later stay set until that write is acked.
    #[test]
    fn cut_and_ack_clear_only_safe_blocks() {
        let fs = SimFs::new();
        let (mut t, rep) = open(&fs);
        assert!(!rep.unclean);
        assert_eq!(t.epoch(), 1);
        t.before_write("d0", 0, 8192).unwrap();
        t.record_write("d0", 0, &[1; 8192]).unwrap();
        let p1 = t.cut(1000, false).unwrap().unwrap();
        assert_eq!((p1.point_id, p1.epoch), (1, 1));
        // Block 1 written again in epoch 2.
        t.before_write("d0", 4096, 4096).unwrap();
        t.record_write("d0", 4096, &[2; 4096]).unwrap();
        let p2 = t.cut(2000, true).unwrap().unwrap();
        assert_eq!(p2.point_id, 2);
        assert_eq!(t.dirty_blocks("d0"), Some(2));
        t.ack_through(p1.spool_seq).unwrap();
        // Block 0 is safe; block 1's later write is not acked yet.
        assert_eq!(
            t.dirty_runs("d0").unwrap(),
            vec![Extent {
                offset: 4096,
                len: 4096
            }]
        );
        t.ack_through(p2.spool_seq).unwrap();
        assert_eq!(t.dirty_blocks("d0"), Some(0));
        assert!(matches!(
            t.before_write("nope", 0, 512),
            Err(TrackerError::UnknownDisk(_))
        ));
        assert!(matches!(
            t.before_write("d0", DISK_BYTES, 512),
            Err(TrackerError::Extent { .. })
        ));
    }

    /// Proves an ack never clears the bit of a block whose write is in flight (marked by
    /// `before_write`, not yet recorded), so a crash before its record is durable still
    /// leaves the block to the resync.
    #[test]
    fn ack_keeps_bits_of_writes_in_flight() {
        let fs = SimFs::new();
        let (mut t, _) = open(&fs);
        t.before_write("d0", 0, 4096).unwrap();
        t.record_write("d0", 0, &[1; 4096]).unwrap();
        let p1 = t.cut(1000, false).unwrap().unwrap();
        // The same block again, on its way to the backing disk: not in the spool yet.
        t.before_write("d0", 0, 4096).unwrap();
        t.ack_through(p1.spool_seq).unwrap();
        assert_eq!(
            t.dirty_blocks("d0"),
            Some(1),
            "in-flight block lost its bit"
        );
        // Once recorded and acknowledged, the bit goes.
        t.record_write("d0", 0, &[2; 4096]).unwrap();
        let p2 = t.cut(2000, false).unwrap().unwrap();
        t.ack_through(p2.spool_seq).unwrap();
        assert_eq!(t.dirty_blocks("d0"), Some(0));
    }

    /// Proves a full spool drops the group to bitmap-only tracking: writes stay marked,
    /// no recovery point is offered.
    #[test]
    fn full_spool_goes_bitmap_only() {
        let fs = SimFs::new();
        let (mut t, _) = open(&fs);
        let data = vec![7u8; 60 << 10];
        let mut spooled = 0;
        // Two passes over 960 KiB of the disk: more than the 1 MiB spool holds.
        for i in (0..16u64).chain(0..16) {
            let off = i * (60 << 10);
            t.before_write("d1", off, data.len() as u64).unwrap();
            if t.record_write("d1", off, &data).unwrap().is_some() {
                spooled += 1;
            }
        }
        assert!(spooled < 32, "the spool must have filled");
        assert!(matches!(t.mode(), TrackMode::BitmapOnly { .. }));
        assert_eq!(t.cut(1, false).unwrap(), None);
        // Every write is dirty in the bitmap (16 x 60 KiB from 0 = 960 KiB = 240 blocks).
        assert_eq!(t.dirty_blocks("d1"), Some(240));
    }

    /// Proves an ack after the spool overflowed clears no bit: a block written again in
    /// bitmap-only mode is known only to the bitmap.
    #[test]
    fn ack_in_bitmap_only_mode_keeps_bits() {
        let fs = SimFs::new();
        let (mut t, _) = open(&fs);
        t.before_write("d1", 0, 4096).unwrap();
        t.record_write("d1", 0, &[1; 4096]).unwrap();
        let p = t.cut(1, false).unwrap().unwrap();
        let data = vec![7u8; 60 << 10];
        for i in (0..16u64).chain(0..16) {
            t.before_write("d0", i * (60 << 10), data.len() as u64)
                .unwrap();
            t.record_write("d0", i * (60 << 10), &data).unwrap();
        }
        assert!(matches!(t.mode(), TrackMode::BitmapOnly { .. }));
        // Written again, after the overflow: not spooled.
        t.before_write("d1", 0, 4096).unwrap();
        assert_eq!(t.record_write("d1", 0, &[2; 4096]).unwrap(), None);
        t.ack_through(p.spool_seq).unwrap();
        assert_eq!(
            t.dirty_blocks("d1"),
            Some(1),
            "the rewritten block must stay dirty"
        );
    }

    /// Proves a close while a write is in flight (marked, its backing write maybe done,
    /// its record refused) writes no clean marker: the next open asks for a resync.
    #[test]
    fn close_with_a_write_in_flight_is_unclean() {
        let fs = SimFs::new();
        let (mut t, _) = open(&fs);
        t.before_write("d0", 0, 512).unwrap();
        t.record_write("d0", 0, &[1; 512]).unwrap();
        t.before_write("d0", 4096, 512).unwrap();
        t.close().unwrap();
        assert!(matches!(
            t.record_write("d0", 4096, &[2; 512]),
            Err(TrackerError::Closed)
        ));
        drop(t);
        let (_, rep) = open(&fs);
        assert!(rep.unclean && rep.needs_resync);
    }

    /// Proves a restart continues the epochs after the last cut, a clean shutdown is
    /// recognised, and a crash is reported as needing a resync.
    #[test]
    fn restart_continues_epochs_and_tells_unclean() {
        let fs = SimFs::new();
        let (mut t, _) = open(&fs);
        t.before_write("d0", 0, 512).unwrap();
        t.record_write("d0", 0, &[1; 512]).unwrap();
        t.cut(1, false).unwrap().unwrap();
        t.before_write("d0", 512, 512).unwrap();
        t.record_write("d0", 512, &[1; 512]).unwrap();
        t.flush().unwrap();
        t.shutdown().unwrap();
        let (mut t, rep) = open(&fs);
        assert!(!rep.unclean && !rep.needs_resync);
        assert_eq!(rep.epoch, 2, "the open epoch 2 continues");
        assert_eq!(t.cut(2, false).unwrap().unwrap().point_id, 2);
        drop(t);
        fs.crash(CrashMode::DropUnsynced);
        let (mut t, rep) = open(&fs);
        assert!(rep.unclean && rep.needs_resync);
        assert_eq!(rep.epoch, 3);
        // No recovery point from an unclean state.
        assert!(matches!(t.mode(), TrackMode::BitmapOnly { .. }));
        assert_eq!(t.cut(3, false).unwrap(), None);
        // Closed: writes are refused.
        t.close().unwrap();
        assert!(matches!(
            t.before_write("d0", 0, 512),
            Err(TrackerError::Closed)
        ));
    }

    /// Proves, at every durability step of a random workload with crashes, that every
    /// block written since its last acknowledgement is still dirty after the restart,
    /// and that every flushed write is in the spool or covered by a dirty bit.
    #[test]
    fn crash_at_every_step_keeps_unacked_writes_tracked() {
        for seed in 1..=3u64 {
            // Count the steps of one uncrashed run first.
            let steps = {
                let fs = SimFs::new();
                run(&fs, seed, None);
                fs.steps()
            };
            for step in 1..=steps {
                let fs = SimFs::new();
                run(&fs, seed, Some(step));
            }
        }
    }

    /// One workload; with `crash_at`, a crash at that step, then the checks.
    fn run(fs: &SimFs, seed: u64, crash_at: Option<u64>) {
        let mut rng = Rng::new(seed);
        let (mut t, _) = open(fs);
        if let Some(s) = crash_at {
            fs.crash_after(s);
        }
        // Blocks written and not yet acknowledged, per disk (the model).
        let mut unacked: Vec<std::collections::BTreeSet<u64>> = vec![Default::default(); 2];
        let mut epochs: Vec<(u64, Vec<(usize, u64)>)> = Vec::new(); // (cut seq, blocks)
        let mut current: Vec<(usize, u64)> = Vec::new();
        let r = (|| -> Result<(), TrackerError> {
            for _ in 0..60 {
                match rng.below(10) {
                    0..=6 => {
                        let d = rng.below(2) as usize;
                        let block = rng.below(DISK_BYTES / 4096 - 4);
                        let len = (1 + rng.below(3)) * 4096;
                        let disk = ["d0", "d1"][d];
                        t.before_write(disk, block * 4096, len)?;
                        for b in block..block + len / 4096 {
                            unacked[d].insert(b);
                            current.push((d, b));
                        }
                        t.record_write(disk, block * 4096, &vec![rng.next() as u8; len as usize])?;
                    }
                    7 => {
                        t.flush()?;
                    }
                    8 => {
                        if let Some(p) = t.cut(rng.next(), false)? {
                            epochs.push((p.spool_seq, std::mem::take(&mut current)));
                        }
                    }
                    _ => {
                        if !epochs.is_empty() {
                            let k = rng.below(epochs.len() as u64) as usize;
                            let seq = epochs[k].0;
                            t.ack_through(seq)?;
                            let acked: Vec<_> = epochs.drain(..=k).collect();
                            // Model: a block is safe when no later write is pending.
                            for (_, blocks) in acked {
                                for (d, b) in blocks {
                                    let later = epochs
                                        .iter()
                                        .flat_map(|(_, v)| v.iter())
                                        .chain(current.iter())
                                        .any(|&(d2, b2)| d2 == d && b2 == b);
                                    if !later {
                                        unacked[d].remove(&b);
                                    }
                                }
                            }
                        }
                    }
                }
            }
            Ok(())
        })();
        if crash_at.is_none() {
            r.unwrap();
        }
        drop(t);
        fs.crash(CrashMode::Torn {
            seed: seed ^ crash_at.unwrap_or(0),
        });
        let (t, _) = open(fs);
        for (d, blocks) in unacked.iter().enumerate() {
            let disk = ["d0", "d1"][d];
            let runs = t.dirty_runs(disk).unwrap();
            for &b in blocks {
                assert!(
                    runs.iter()
                        .any(|e| e.offset <= b * 4096 && b * 4096 < e.end()),
                    "seed {seed} crash {crash_at:?}: {disk} block {b} lost its dirty bit"
                );
            }
        }
    }
}
