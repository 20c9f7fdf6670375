//! Change tracking of one replication group on the process server: the dirty bitmap of
//! each disk, the group's spool, the epoch counter and the cuts, kept in the order the
//! design's write path demands.
//!
//! The NBD server calls, for every write, trim or write-zeroes of a disk of the group:
//!
//! 1. [`GroupTracker::before_write`]: marks the blocks dirty, durably (through the
//!    bitmap's hot-region log), *before* the data may reach the backing disk
//!    ([`GroupTracker::before_writes`] marks several concurrent writes with one log
//!    transaction per disk: the group commit);
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
//! brought to a consistent state from the spool any more): it only seals the epoch the
//! spool's last records belong to, as an inconsistent cut, so they can drain. Getting
//! back needs a resync of the dirty blocks from the backing disks.
//!
//! **Resync.** [`GroupTracker::begin_resync`] leaves bitmap-only mode for
//! [`TrackMode::Resyncing`]: writes are spooled again, and the caller walks the dirty
//! blocks with [`GroupTracker::next_resync_extent`], reads each extent from the backing
//! disk while no write to it is in flight (the caller's range lock), and records it with
//! [`GroupTracker::record_resync`] (data runs as writes, all-zero blocks as zeros, in the
//! current epoch). Such a record is exactly a write of the disk's contents at its place
//! in the spool, so once every extent is recorded ([`GroupTracker::finish_resync`]) the
//! next cut is consistent again. Cuts made meanwhile are recorded as *inconsistent*:
//! history, not points to recover to. A cursor per disk is all the state: blocks at or
//! past it are still to read, so an ack clears none of their bits.
//!
//! **Initial sync.** A disk protected for the first time (no bitmap yet) gets a bitmap
//! with every block dirty and is listed in the group's `initial-sync` file (written
//! before the bitmap is created, removed when a resync pass ends); the group starts in
//! bitmap-only mode, so the first resync ships every block (zero blocks as zero records,
//! no payload). With [`InitialSync::Skip`] new disks start clean instead (the replica is
//! known to equal the disk, e.g. both blank).
//!
//! **Initial sync from change lists.** With [`InitialSync::Changed`], a new disk named
//! there starts with only the blocks of its [`crate::changelist`] files dirty (their
//! union) instead of every block: a reprotect after a failback, where the replica is
//! known to differ from the disk only there (the lists' origins, and why their union
//! covers every difference, are in that module and the README). Everything else is as
//! above: the disk is listed in `initial-sync` before its bitmap is created, the group
//! starts bitmap-only, and the pass (a hash-diff pass when the caller compares, which
//! then sends only the blocks that really differ) ends the initial sync. The lists are
//! read through and checked (each decodes; disk id and size match) before anything is
//! written, so a bad list changes nothing; a new disk's bitmap gets its bits from them
//! before its files are synced and named ([`Bitmap::begin_create`]), so a crash leaves
//! either no bitmap (the disk is still listed: the next open creates it from the lists
//! again) or the whole one. Lists of a disk that already has a bitmap are not read.
//!
//! **Hash-diff.** When the master target already holds a copy of a disk (a reprotect:
//! the copy is the disk as it was at a point, plus what changed since), reading and
//! shipping every block is a waste. The caller then reads each extent under its range
//! lock as usual, hashes its 64 KiB blocks ([`crate::hashing::differing_parts`]),
//! compares them with the master target's hashes of its *latest journaled state* (the
//! replica with every durable journal frame laid over it, consistent or not), and
//! records only the differing parts with [`GroupTracker::record_resync_parts`]; the
//! matching blocks' dirty bits are cleared at once, except where a write that is not
//! acknowledged yet touched them (that write's ack clears them, as always).
//!
//! Why it is exact. The pass must start with every earlier spool record acknowledged
//! ([`GroupTracker::all_acked`], checked with [`GroupTracker::begin_resync`] under the
//! same lock), so the hashed state, whenever it was taken, contains everything spooled
//! before the pass, and every record the master target has not seen yet comes from
//! this pass, in which every write is spooled. Take a block X read at time T with
//! contents D equal to the hashed contents H, and skipped. If records of X follow the
//! hashed state, the last of them before T is the last write to X before T (the range
//! lock means no write to X is in flight at T), whose contents are D; if none does, the
//! copy keeps H = D. Either way the master target holds D once everything up to T is
//! applied, and writes after T are spooled and shipped like any other. Neither the
//! order of hashing and reading nor retries matter, so hashes can be fetched ahead of
//! the read, pipelined. A pass that ends early (spool full, restart) leaves the
//! unread blocks dirty, and the next pass may compare again under the same rule.
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
use crate::changelist::{self, ChangeListError};
use crate::extent::{Extent, ExtentError};
use crate::spool::{Spool, SpoolConfig, SpoolEntry, SpoolError, SpoolRecordRef};
use crate::storage::{OpenMode, Storage, write_atomic};

/// No format of its own (it uses the spool's and the bitmap's); kept so every module
/// reports a version.
pub const VERSION: u16 = 1;
/// Name of the clean-shutdown marker in the group's directory.
pub const CLEAN_MARKER: &str = "clean";
/// Name of the file listing the disks whose initial sync is not done, one id a line.
pub const INITIAL_SYNC_FILE: &str = "initial-sync";
/// Bytes a resync reads and records at a time (a whole frame's worth).
pub const RESYNC_EXTENT_BYTES_MAX: u64 = 1 << 20;
const BLOCK_BYTES: u64 = 4096;
const CLEAN_CONTENTS: &[u8] = b"clean shutdown\n";
/// The marker of a clean stop of a group that still needed a resync.
const CLEAN_RESYNC_CONTENTS: &[u8] = b"clean shutdown, resync pending\n";

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
    #[error("the resync has not read disk {disk} from byte {offset} on yet")]
    ResyncNotDone { disk: String, offset: u64 },
    #[error("disk {disk}: resync part {offset}+{len} is not inside its extent, or not in order")]
    BadParts { disk: String, offset: u64, len: u64 },
    #[error(
        "disk {disk}: an extent recorded in parts outside a hash-diff pass (begin it with every record acknowledged)"
    )]
    NotHashDiff { disk: String },
    #[error("disk {disk}: change list refused: {source}")]
    ChangeList {
        disk: String,
        #[source]
        source: ChangeListError,
    },
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
    /// Writes are spooled and the dirty blocks are being read from the backing disks;
    /// cuts are inconsistent until every one is recorded.
    Resyncing,
}

/// What [`GroupTracker::open`] does with a disk that has no bitmap yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InitialSync {
    /// Every block is shipped first (the default for a disk protected the first time).
    Full,
    /// The replica already equals the disk: start with no dirty block.
    Skip,
    /// As `Full`, except that the disks named here start with only the blocks of
    /// these change lists dirty (see the module doc, "Initial sync from change lists").
    Changed(BTreeMap<String, Vec<PathBuf>>),
}

impl InitialSync {
    /// The change lists of `disk`, if it starts from lists.
    fn lists(&self, disk: &str) -> Option<&[PathBuf]> {
        match self {
            InitialSync::Changed(m) => m.get(disk).map(Vec::as_slice),
            _ => None,
        }
    }
}

/// A new disk whose initial sync starts from change lists, as [`GroupTracker::open`]
/// created it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartedFromLists {
    pub disk: String,
    /// What each list said it was ([`changelist::Header::describe`]) and its blocks.
    pub lists: Vec<(String, u64)>,
    /// Blocks dirty in the new bitmap (the union).
    pub dirty_blocks: u64,
    /// Blocks of the disk.
    pub disk_blocks: u64,
}

/// How far a resync pass is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResyncProgress {
    /// Bytes dirty when the pass began (blocks of 4 KiB).
    pub total_bytes: u64,
    /// Bytes read and recorded so far (more than `total_bytes` when writes during the
    /// pass dirtied blocks ahead of the cursor).
    pub done_bytes: u64,
}

/// The state of a resync pass.
struct Resync {
    /// Per disk index: the next byte to read; the disk size when done.
    cursor: Vec<u64>,
    progress: ResyncProgress,
    /// Started with every earlier record acknowledged: extents may be recorded in
    /// parts (see "Hash-diff" in the module doc).
    hash_diff: bool,
}

/// A sealed epoch: the recovery point the cut made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CutPoint {
    pub point_id: u64,
    pub epoch: u64,
    pub time_unix_ms: u64,
    pub app_consistent: bool,
    /// False for a cut during a resync: kept in the history, never recovered to.
    pub consistent: bool,
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
    /// New disks whose bitmap this open made from change lists.
    pub from_lists: Vec<StartedFromLists>,
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
    /// The pass under way in [`TrackMode::Resyncing`].
    resync: Option<Resync>,
    /// Disks whose initial sync is not done (the `initial-sync` file).
    initial: Vec<String>,
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
        initial_sync: InitialSync,
    ) -> Result<(Self, OpenReport), TrackerError> {
        let bitmap_dir = |d: &DiskSpec| dir.join(format!("bitmap-{}", d.id));
        let has_bitmap = |d: &DiskSpec| Self::has_bitmap(fs.as_ref(), dir, &d.id);
        // Disks still in their initial sync; new disks join the list BEFORE their
        // first bitmap is created, so a crash in between cannot lose the pass.
        let mut initial = read_initial(fs.as_ref(), dir)?;
        initial.retain(|id| disks.iter().any(|d| &d.id == id));
        // Every change list a bitmap will be made from is read through first: a bad
        // one is refused before anything is written.
        for d in disks.iter().filter(|d| !has_bitmap(d)) {
            for path in initial_sync.lists(&d.id).unwrap_or_default() {
                changelist::check(fs.as_ref(), path, &d.id, d.size_bytes).map_err(|source| {
                    TrackerError::ChangeList {
                        disk: d.id.clone(),
                        source,
                    }
                })?;
            }
        }
        fs.create_dir_all(dir)
            .map_err(io_err(format!("create {}", dir.display())))?;
        let marker = dir.join(CLEAN_MARKER);
        let spool_dir = dir.join("spool");
        let existed = fs.exists(&spool_dir.join(crate::spool::segment_file_name(1)))
            || fs.list_dir(&spool_dir).is_ok_and(|n| !n.is_empty());
        let unclean = existed && !fs.exists(&marker);
        let resync_pending =
            fs.exists(&marker) && read_small(fs.as_ref(), &marker)? == CLEAN_RESYNC_CONTENTS;
        if fs.exists(&marker) {
            // From here on a crash is an unclean end again.
            fs.remove_file(&marker)
                .map_err(io_err("remove clean marker"))?;
            fs.sync_dir(dir).map_err(io_err("sync group directory"))?;
        }
        let new: Vec<String> = disks
            .iter()
            .filter(|d| !has_bitmap(d) && !initial.contains(&d.id))
            .map(|d| d.id.clone())
            .collect();
        if initial_sync != InitialSync::Skip && !new.is_empty() {
            initial.extend(new);
            write_initial(fs.as_ref(), dir, &initial)?;
        }
        let mut opened = Vec::with_capacity(disks.len());
        let mut from_lists = Vec::new();
        for d in disks {
            let bdir = bitmap_dir(d);
            let bitmap_err = |source| TrackerError::Bitmap {
                disk: d.id.clone(),
                source,
            };
            let bm = if has_bitmap(d) {
                Bitmap::open_for_disk(fs.as_ref(), &bdir, d.size_bytes).map_err(bitmap_err)?
            } else if let (true, Some(lists)) = (initial.contains(&d.id), initial_sync.lists(&d.id))
            {
                let (bm, started) = create_from_lists(fs.as_ref(), &bdir, d, lists, bitmap_cfg)?;
                from_lists.push(started);
                bm
            } else if initial.contains(&d.id) {
                Bitmap::create_all_dirty(fs.as_ref(), &bdir, d.size_bytes, bitmap_cfg)
                    .map_err(bitmap_err)?
            } else {
                Bitmap::create(fs.as_ref(), &bdir, d.size_bytes, bitmap_cfg).map_err(bitmap_err)?
            };
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
            resync: None,
            initial,
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
        } else if resync_pending {
            t.mode = TrackMode::BitmapOnly {
                reason: "the previous run stopped before its resync ended: the dirty blocks must be resynced before the next recovery point".into(),
            };
        } else if !t.initial.is_empty() {
            t.mode = TrackMode::BitmapOnly {
                reason: format!(
                    "initial sync of {}: every block goes to the master target before the first recovery point",
                    t.initial.join(", ")
                ),
            };
        }
        let report = OpenReport {
            unclean,
            needs_resync: unclean,
            epoch: t.epoch,
            spool_records: rec.records,
            from_lists,
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

    /// The disks whose initial sync is not done.
    pub fn initial_sync_disks(&self) -> &[String] {
        &self.initial
    }

    /// How far the resync pass under way is.
    pub fn resync_progress(&self) -> Option<ResyncProgress> {
        self.resync.as_ref().map(|r| r.progress)
    }

    /// Whether the pass under way is a hash-diff pass.
    pub fn resync_is_hash_diff(&self) -> bool {
        self.resync.as_ref().is_some_and(|r| r.hash_diff)
    }

    /// Starts a resync pass from bitmap-only mode (see the module doc): writes are
    /// spooled again from now on. Returns false (and changes nothing) in another mode.
    pub fn begin_resync(&mut self) -> Result<bool, TrackerError> {
        self.begin(false)
    }

    /// [`GroupTracker::begin_resync`] for a hash-diff pass, whose extents may be
    /// recorded in parts ([`GroupTracker::record_resync_parts`]). Returns false (and
    /// changes nothing) unless the group is bitmap-only AND every record spooled so far
    /// is acknowledged ([`GroupTracker::all_acked`]): the rule that makes skipping the
    /// matching blocks exact (module doc, "Hash-diff").
    pub fn begin_hash_diff_resync(&mut self) -> Result<bool, TrackerError> {
        if !self.all_acked() {
            return Ok(false);
        }
        self.begin(true)
    }

    fn begin(&mut self, hash_diff: bool) -> Result<bool, TrackerError> {
        if self.closed {
            return Err(TrackerError::Closed);
        }
        if !matches!(self.mode, TrackMode::BitmapOnly { .. }) {
            return Ok(false);
        }
        let total_bytes = self
            .disks
            .iter()
            .map(|d| d.bitmap.dirty_blocks() * BLOCK_BYTES)
            .sum();
        self.resync = Some(Resync {
            cursor: vec![0; self.disks.len()],
            progress: ResyncProgress {
                total_bytes,
                done_bytes: 0,
            },
            hash_diff,
        });
        self.mode = TrackMode::Resyncing;
        Ok(true)
    }

    /// The next dirty extent the resync must read (at most `max_bytes`, at least one
    /// block; [`RESYNC_EXTENT_BYTES_MAX`] suits a large spool): its disk id and extent.
    /// `None` when the pass has read everything (then [`GroupTracker::finish_resync`])
    /// or is not under way.
    pub fn next_resync_extent(&mut self, max_bytes: u64) -> Option<(String, Extent)> {
        let r = self.resync.as_mut()?;
        for (i, d) in self.disks.iter().enumerate() {
            if r.cursor[i] >= d.size_bytes {
                continue;
            }
            match d.bitmap.next_dirty_run(r.cursor[i], max_bytes) {
                Some(e) => return Some((d.id.clone(), e)),
                None => r.cursor[i] = d.size_bytes,
            }
        }
        None
    }

    /// Records `data`, read from the backing disk at `ext` (from
    /// [`GroupTracker::next_resync_extent`]) while no write to it was in flight, as
    /// spool records of the current epoch. Returns false when the pass ended meanwhile
    /// (the spool filled: bitmap-only again) and nothing more should be read.
    pub fn record_resync(
        &mut self,
        disk: &str,
        ext: Extent,
        data: &[u8],
    ) -> Result<bool, TrackerError> {
        self.record_resync_parts(disk, ext, data, &[ext])
    }

    /// The hash-diff form of [`GroupTracker::record_resync`]: `data` is the whole of
    /// `ext`, read while no write to it was in flight (the caller's range lock), and
    /// `parts` (sorted, disjoint, inside `ext`) are the pieces that differ from the
    /// master target's copy. Only the parts are recorded; the cursor moves over the
    /// whole extent. The blocks of `ext` outside the parts equal the copy, so their
    /// dirty bits are cleared now, except where a write not yet acknowledged touched
    /// them (its ack clears them, as always; clearing earlier could let a crash lose
    /// its record while the bit is gone). Why skipping them is exact is in the module
    /// doc ("Hash-diff"). Returns false, like `record_resync`, when the pass ended.
    pub fn record_resync_parts(
        &mut self,
        disk: &str,
        ext: Extent,
        data: &[u8],
        parts: &[Extent],
    ) -> Result<bool, TrackerError> {
        let (i, ext) = self.disk_extent(disk, ext.offset, ext.len)?;
        if self.mode != TrackMode::Resyncing || data.len() as u64 != ext.len {
            return Ok(false);
        }
        let mut at = ext.offset;
        for p in parts {
            Extent::new(p.offset, p.len, self.disks[i].size_bytes).map_err(|source| {
                TrackerError::Extent {
                    disk: disk.to_string(),
                    source,
                }
            })?;
            if p.offset < at || p.end() > ext.end() {
                return Err(TrackerError::BadParts {
                    disk: disk.to_string(),
                    offset: p.offset,
                    len: p.len,
                });
            }
            at = p.end();
        }
        let covered: u64 = parts.iter().map(|p| p.len).sum();
        if covered < ext.len && !self.resync_is_hash_diff() {
            return Err(TrackerError::NotHashDiff {
                disk: disk.to_string(),
            });
        }
        for p in parts {
            let from = (p.offset - ext.offset) as usize;
            let bytes = &data[from..from + p.len as usize];
            if !self.append_resync_runs(disk, p.offset, bytes)? {
                return Ok(false);
            }
            self.current.by_disk.entry(i).or_default().push(*p);
        }
        if covered < ext.len {
            self.clear_matching(i, ext)?;
        }
        if let Some(r) = self.resync.as_mut() {
            r.cursor[i] = ext.end();
            r.progress.done_bytes += ext.len;
        }
        Ok(true)
    }

    /// Every write of disk `i` not yet safe at the target: in unacknowledged epochs, in
    /// the open epoch, or in flight.
    fn pending_extents(&self, i: usize) -> impl Iterator<Item = Extent> + '_ {
        self.unacked
            .iter()
            .map(|(_, _, e)| &e.by_disk)
            .chain(std::iter::once(&self.current.by_disk))
            .filter_map(move |m| m.get(&i))
            .flatten()
            .copied()
            .chain(
                self.in_flight
                    .iter()
                    .filter(move |(d, _)| *d == i)
                    .map(|&(_, e)| e),
            )
    }

    /// Clears the bits of `ext` of disk `i` (read under the range lock, its differing
    /// parts already in `current`) where no write not yet acknowledged touched it.
    fn clear_matching(&mut self, i: usize, ext: Extent) -> Result<(), TrackerError> {
        let size = self.disks[i].size_bytes;
        let mut pending: Vec<Extent> = self
            .pending_extents(i)
            .filter(|e| e.offset < ext.end() && ext.offset < e.end())
            .map(|e| whole_blocks(e, size))
            .collect();
        pending.sort_unstable();
        let d = &mut self.disks[i];
        for piece in subtract(ext, &pending) {
            d.bitmap
                .clear(piece)
                .map_err(|source| TrackerError::Bitmap {
                    disk: d.id.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Appends `data` read at `offset` as resync records: runs of all-zero blocks as
    /// zero records, the rest as writes. False when the spool filled (the pass ends).
    fn append_resync_runs(
        &mut self,
        disk: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<bool, TrackerError> {
        let epoch = self.epoch;
        let mut at = 0usize;
        while at < data.len() {
            let block = |k: usize| &data[k..(k + BLOCK_BYTES as usize).min(data.len())];
            let zero = is_zero(block(at));
            let mut end = at;
            while end < data.len() && is_zero(block(end)) == zero {
                end = (end + BLOCK_BYTES as usize).min(data.len());
            }
            let run_offset = offset + at as u64;
            let rec = if zero {
                SpoolRecordRef::Zero {
                    epoch,
                    disk,
                    offset: run_offset,
                    len: (end - at) as u64,
                }
            } else {
                SpoolRecordRef::Write {
                    epoch,
                    disk,
                    offset: run_offset,
                    data: &data[at..end],
                }
            };
            match self.spool.append(&rec) {
                Ok(_) => {}
                Err(SpoolError::Full {
                    used_bytes,
                    max_bytes,
                    ..
                }) => {
                    // What was appended is a true copy of the disk and harmless.
                    self.overflow(format!(
                        "spool full during a resync ({used_bytes} of {max_bytes} bytes): tracking by dirty bitmap only until the next resync"
                    ));
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            }
            at = end;
        }
        Ok(true)
    }

    /// Whether every record spooled so far is acknowledged: no sealed epoch waits for
    /// an ack and the current epoch spooled nothing. A hash-diff pass starts only then
    /// (see the module doc).
    pub fn all_acked(&self) -> bool {
        self.unacked.is_empty() && self.current.by_disk.is_empty()
    }

    /// Whether any 4 KiB block `ext` of `disk` touches is dirty (`None`: no such disk).
    pub fn any_dirty(&self, disk: &str, ext: Extent) -> Option<bool> {
        let i = self.index(disk)?;
        let bm = &self.disks[i].bitmap;
        let end = ext.end().div_ceil(BLOCK_BYTES).min(bm.block_count());
        Some((ext.offset / BLOCK_BYTES..end).any(|b| bm.is_dirty(b)))
    }

    /// Ends a pass whose every extent is recorded: the group spools normally and its
    /// next cut is a consistent point; the initial sync, if it was one, is done.
    /// Returns the disks whose initial sync ended. Refused while extents remain.
    pub fn finish_resync(&mut self) -> Result<Vec<String>, TrackerError> {
        if self.mode != TrackMode::Resyncing {
            return Ok(Vec::new());
        }
        if let Some((disk, e)) = self.next_resync_extent(BLOCK_BYTES) {
            return Err(TrackerError::ResyncNotDone {
                disk,
                offset: e.offset,
            });
        }
        self.resync = None;
        self.mode = TrackMode::Spooling;
        let done = std::mem::take(&mut self.initial);
        if !done.is_empty() {
            write_initial(self.fs.as_ref(), &self.dir, &[])?;
        }
        Ok(done)
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

    /// The first run of dirty blocks of `disk` at or after byte `from` (at most
    /// `max_bytes`, at least a block), or `None` (no such disk, nothing dirty there).
    /// What a resync will read next, for fetching hashes ahead of it.
    pub fn next_dirty_run(&self, disk: &str, from: u64, max_bytes: u64) -> Option<Extent> {
        let i = self.index(disk)?;
        self.disks[i].bitmap.next_dirty_run(from, max_bytes)
    }

    /// Marks every block of `disk` dirty, durably, and makes a pass under way read the
    /// disk from its start. For a disk whose initial sync started from change lists
    /// (which assume the master target holds a copy of the disk) when the master
    /// target turns out to have no copy at all: then every block must go, not only the
    /// listed ones. Returns false (and changes nothing) when every block is dirty
    /// already.
    pub fn mark_all_dirty(&mut self, disk: &str) -> Result<bool, TrackerError> {
        let (i, d) = self.disk(disk)?;
        let before = d.bitmap.dirty_blocks();
        if before == d.bitmap.block_count() {
            return Ok(false);
        }
        d.bitmap
            .mark_all_durably()
            .map_err(|source| TrackerError::Bitmap {
                disk: disk.to_string(),
                source,
            })?;
        let added = (d.bitmap.block_count() - before) * BLOCK_BYTES;
        if let Some(r) = self.resync.as_mut() {
            r.cursor[i] = 0;
            r.progress.total_bytes += added;
        }
        Ok(true)
    }

    /// Whether `disk` has a dirty bitmap in the group directory `dir` (it was protected
    /// there), without opening anything.
    pub fn has_bitmap(fs: &dyn Storage, dir: &Path, disk: &str) -> bool {
        let bdir = dir.join(format!("bitmap-{disk}"));
        fs.exists(&bdir.join(bitmap::BITMAP_FILE)) && fs.exists(&bdir.join(bitmap::LOG_FILE))
    }

    /// The dirty runs of a disk (for a resync).
    pub fn dirty_runs(&self, disk: &str) -> Option<Vec<Extent>> {
        self.index(disk)
            .map(|i| self.disks[i].bitmap.dirty_runs().collect())
    }

    /// Step 1 of a write: marks `len` bytes at `offset` dirty, durably, before they may
    /// reach the backing disk. Refuses ranges outside the disk.
    pub fn before_write(&mut self, disk: &str, offset: u64, len: u64) -> Result<(), TrackerError> {
        let mut r = self.before_writes(&[(disk, offset, len)]);
        r.pop().expect("one result per write")
    }

    /// Step 1 of several concurrent writes `(disk, offset, len)` at once (the group
    /// commit): each disk's writes share one bitmap mark, so regions that are cold for
    /// several of them cost ONE synced log transaction, not one each. Returns one result
    /// per write, in order; a refused write (range outside its disk) fails alone. A
    /// disk's marks are split so that none touches more regions than its hot set holds.
    pub fn before_writes(&mut self, writes: &[(&str, u64, u64)]) -> Vec<Result<(), TrackerError>> {
        let mut results: Vec<Result<(), TrackerError>> = Vec::with_capacity(writes.len());
        // Per disk: the writes (index into `writes`, extent) to mark together.
        let mut by_disk: Vec<(usize, Vec<(usize, Extent)>)> = Vec::new();
        for (k, &(disk, offset, len)) in writes.iter().enumerate() {
            match self.disk_extent(disk, offset, len) {
                Ok((i, ext)) => {
                    match by_disk.iter_mut().find(|(d, _)| *d == i) {
                        Some((_, v)) => v.push((k, ext)),
                        None => by_disk.push((i, vec![(k, ext)])),
                    }
                    results.push(Ok(()));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        for (i, marks) in by_disk {
            for chunk in self.mark_chunks(i, &marks) {
                let exts: Vec<Extent> = chunk.iter().map(|&(_, e)| e).collect();
                match self.disks[i].bitmap.mark(&exts) {
                    Ok(_) => self.in_flight.extend(chunk.iter().map(|&(_, e)| (i, e))),
                    Err(source) => {
                        // Only one write gets the cause; a failed durability step
                        // poisoned the bitmap, which is what the others are told.
                        let mut source = Some(source);
                        for &(k, _) in chunk {
                            results[k] = Err(TrackerError::Bitmap {
                                disk: self.disks[i].id.clone(),
                                source: source.take().unwrap_or(BitmapError::Poisoned),
                            });
                        }
                    }
                }
            }
        }
        results
    }

    /// Splits the writes `marks` of disk `i` into runs whose regions (counted per
    /// extent, an upper bound) fit the bitmap's hot set, so one mark may take each.
    fn mark_chunks<'a>(
        &self,
        i: usize,
        marks: &'a [(usize, Extent)],
    ) -> Vec<&'a [(usize, Extent)]> {
        let config = self.disks[i].bitmap.config();
        let regions = |e: &Extent| {
            e.end().saturating_sub(1) / config.region_bytes - e.offset / config.region_bytes + 1
        };
        let max = u64::from(config.hot_regions_max);
        let (mut chunks, mut start, mut sum) = (Vec::new(), 0, 0);
        for (k, (_, e)) in marks.iter().enumerate() {
            let n = regions(e);
            if k > start && sum + n > max {
                chunks.push(&marks[start..k]);
                (start, sum) = (k, 0);
            }
            sum += n;
        }
        if start < marks.len() {
            chunks.push(&marks[start..]);
        }
        chunks
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
        if matches!(self.mode, TrackMode::BitmapOnly { .. }) {
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
                self.overflow(format!(
                    "spool full ({used_bytes} of {max_bytes} bytes): tracking by dirty bitmap only until a resync"
                ));
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The spool is full: bitmap-only tracking until the next resync (a pass under way
    /// ends; its bits stay set).
    fn overflow(&mut self, reason: String) {
        self.resync = None;
        self.mode = TrackMode::BitmapOnly { reason };
    }

    /// A FLUSH: makes every spooled write durable. Returns the durable spool seq.
    pub fn flush(&mut self) -> Result<u64, TrackerError> {
        Ok(self.spool.sync()?)
    }

    /// Seals the current epoch into a recovery point (point id = epoch) and opens the
    /// next. During a resync, and in bitmap-only mode, the point is recorded as
    /// inconsistent (`consistent: false`): no point is offered from an inconsistent
    /// state. In bitmap-only mode only an epoch with spooled records is sealed (`None`
    /// otherwise), so those records can be shipped and released; cut records may use
    /// the spool's [`crate::spool::CUT_RESERVE_BYTES`].
    pub fn cut(
        &mut self,
        time_unix_ms: u64,
        app_consistent: bool,
    ) -> Result<Option<CutPoint>, TrackerError> {
        if self.closed {
            return Err(TrackerError::Closed);
        }
        if matches!(self.mode, TrackMode::BitmapOnly { .. }) && self.current.by_disk.is_empty() {
            return Ok(None);
        }
        let consistent = self.mode == TrackMode::Spooling;
        let epoch = self.epoch;
        let rec = SpoolRecordRef::Cut {
            epoch,
            point_id: epoch,
            time_unix_ms,
            app_consistent,
            consistent,
        };
        let seq = match self.spool.append(&rec) {
            Ok(seq) => seq,
            Err(SpoolError::Full { .. }) => {
                self.overflow(
                    "spool full at a cut: tracking by dirty bitmap only until a resync".into(),
                );
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
            consistent,
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
        if matches!(self.mode, TrackMode::BitmapOnly { .. }) {
            // Writes since the spool overflowed are known only to the bitmaps, not to
            // `current`: clearing now could clear a block written again since. The
            // resync that ends bitmap-only mode clears what it ships.
            return Ok(());
        }
        for (_, _, ext) in done {
            for (disk, extents) in ext.by_disk {
                // Later writes to the disk, not yet safe at the target.
                let later: Vec<Extent> = self
                    .pending_extents(disk)
                    // A resync still to read a block: its replica copy may be stale.
                    .chain(self.resync.as_ref().map(|r| Extent {
                        offset: r.cursor[disk],
                        len: self.disks[disk].size_bytes - r.cursor[disk],
                    }))
                    .collect();
                // Whole blocks: a bit stands for its whole block, and every write to a
                // block not yet safe is in `later` (in these modes all are tracked).
                let size = self.disks[disk].size_bytes;
                let mut later: Vec<Extent> =
                    later.into_iter().map(|e| whole_blocks(e, size)).collect();
                later.sort_unstable();
                let d = &mut self.disks[disk];
                for e in extents {
                    for piece in subtract(whole_blocks(e, size), &later) {
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
        // A group that still needs a resync says so in the marker (its dirty bits are
        // what the resync reads). A write still in flight may reach its backing disk
        // with its record refused from now on: the spool then misses it, so the stop
        // is not clean.
        if !self.in_flight.is_empty() {
            return Ok(());
        }
        let contents = if self.mode == TrackMode::Spooling {
            CLEAN_CONTENTS
        } else {
            CLEAN_RESYNC_CONTENTS
        };
        write_atomic(self.fs.as_ref(), &self.dir, CLEAN_MARKER, contents)
            .map_err(io_err("write clean marker"))
    }
}

/// Creates the bitmap of new disk `d` in `bdir` with the blocks of `lists` dirty
/// (their union; the lists were checked by the caller, and are checked again as they
/// are read).
fn create_from_lists(
    fs: &dyn Storage,
    bdir: &Path,
    d: &DiskSpec,
    lists: &[PathBuf],
    cfg: BitmapConfig,
) -> Result<(Bitmap, StartedFromLists), TrackerError> {
    let bitmap_err = |source| TrackerError::Bitmap {
        disk: d.id.clone(),
        source,
    };
    let mut nb = Bitmap::begin_create(fs, bdir, d.size_bytes, cfg).map_err(bitmap_err)?;
    let mut described = Vec::with_capacity(lists.len());
    for path in lists {
        // Entries of a checked list lie inside the disk, so a mark can only fail on
        // I/O; the first failure is kept and returned after the read.
        let mut marked = Ok(());
        let h = changelist::read(fs, path, &mut |e| {
            if marked.is_ok() {
                marked = nb.mark(e);
            }
        })
        .map_err(|source| TrackerError::ChangeList {
            disk: d.id.clone(),
            source,
        })?;
        marked.map_err(bitmap_err)?;
        if h.meta.disk != d.id || h.meta.disk_bytes != d.size_bytes {
            return Err(TrackerError::ChangeList {
                disk: d.id.clone(),
                source: ChangeListError::WrongDisk {
                    expected: d.id.clone(),
                    found: format!("{} ({} bytes)", h.meta.disk, h.meta.disk_bytes),
                },
            });
        }
        described.push((h.describe(), h.block_count));
    }
    let bm = nb.finish().map_err(bitmap_err)?;
    let started = StartedFromLists {
        disk: d.id.clone(),
        lists: described,
        dirty_blocks: bm.dirty_blocks(),
        disk_blocks: bm.block_count(),
    };
    Ok((bm, started))
}

/// `e` grown to the 4 KiB blocks it touches (the last one clipped to the disk).
fn whole_blocks(e: Extent, disk_bytes: u64) -> Extent {
    let offset = e.offset / BLOCK_BYTES * BLOCK_BYTES;
    let end = e
        .end()
        .div_ceil(BLOCK_BYTES)
        .saturating_mul(BLOCK_BYTES)
        .min(disk_bytes);
    Extent {
        offset,
        len: end - offset,
    }
}

/// Whether `b` (at most one block) is all zero; a slice compare is a `memcmp`.
fn is_zero(b: &[u8]) -> bool {
    static ZEROS: [u8; BLOCK_BYTES as usize] = [0; BLOCK_BYTES as usize];
    b.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

/// The disks listed in the group's `initial-sync` file (none when it is missing).
fn read_initial(fs: &dyn Storage, dir: &Path) -> Result<Vec<String>, TrackerError> {
    let path = dir.join(INITIAL_SYNC_FILE);
    if !fs.exists(&path) {
        return Ok(Vec::new());
    }
    let bytes = read_small(fs, &path)?;
    let text = String::from_utf8_lossy(&bytes);
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// The first MiB of a small state file (anything longer is not ours).
fn read_small(fs: &dyn Storage, path: &Path) -> Result<Vec<u8>, TrackerError> {
    let what = format!("read {}", path.display());
    let f = fs
        .open(path, OpenMode::ReadOnly)
        .map_err(io_err(what.clone()))?;
    let len = f.len().map_err(io_err(what.clone()))?.min(1 << 20);
    let mut bytes = vec![0u8; len as usize];
    f.read_exact_at(&mut bytes, 0).map_err(io_err(what))?;
    Ok(bytes)
}

/// Replaces the `initial-sync` file durably (removes it when `disks` is empty).
fn write_initial(fs: &dyn Storage, dir: &Path, disks: &[String]) -> Result<(), TrackerError> {
    if disks.is_empty() {
        let path = dir.join(INITIAL_SYNC_FILE);
        if fs.exists(&path) {
            fs.remove_file(&path)
                .map_err(io_err("remove the initial-sync file"))?;
            fs.sync_dir(dir).map_err(io_err("sync group directory"))?;
        }
        return Ok(());
    }
    let mut text = disks.join("\n");
    text.push('\n');
    write_atomic(fs, dir, INITIAL_SYNC_FILE, text.as_bytes())
        .map_err(io_err("write the initial-sync file"))
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
            InitialSync::Skip,
        )
        .unwrap()
    }

    fn open_initial(fs: &SimFs) -> (GroupTracker, OpenReport) {
        GroupTracker::open(
            Arc::new(fs.clone()),
            Path::new("/g"),
            &disks(),
            spool_cfg(),
            bitmap_cfg(),
            InitialSync::Full,
        )
        .unwrap()
    }

    /// Proves the group commit: concurrent writes' marks share one log transaction per
    /// disk, a refused write fails alone, and a batch touching more regions than the
    /// hot set holds is split into marks that fit, every write marked.
    #[test]
    fn before_writes_share_one_log_sync_per_disk() {
        let fs = SimFs::new();
        let (mut t, _) = open(&fs);
        let r = 64 << 10; // bitmap_cfg's region
        let ext = |offset, len| Extent { offset, len };
        let s0 = fs.steps();
        let results = t.before_writes(&[
            ("d0", 0, 4096),
            ("d0", r, 4096),
            ("d0", DISK_BYTES, 4096),
            ("d1", 3 * r, 512),
            ("d0", 2 * r + 512, 512),
        ]);
        let ok: Vec<bool> = results.iter().map(Result::is_ok).collect();
        assert_eq!(ok, [true, true, false, true, true]);
        assert_eq!(fs.steps(), s0 + 2, "one log sync for d0, one for d1");
        assert_eq!(
            t.dirty_runs("d0").unwrap(),
            [ext(0, 4096), ext(r, 4096), ext(2 * r, 4096)]
        );
        assert_eq!(t.dirty_runs("d1").unwrap(), [ext(3 * r, 4096)]);

        // Six cold regions, a hot set of four: split, and every write marked.
        let writes: Vec<(&str, u64, u64)> = (8..14).map(|k| ("d0", k * r, 4096)).collect();
        assert!(t.before_writes(&writes).iter().all(Result::is_ok));
        let runs = t.dirty_runs("d0").unwrap();
        for k in 8..14 {
            assert!(runs.contains(&ext(k * r, 4096)), "region {k} marked");
        }
    }

    type Disks = Vec<Vec<u8>>;

    /// The process server's disks and the master target's replicas, as the spool and
    /// the acks see them: the replica applies every record up to an acknowledged cut.
    struct Model {
        disk: Vec<Vec<u8>>,
        replica: Vec<Vec<u8>>,
        /// Spool seq the replica has applied through.
        applied: u64,
        /// Unacknowledged cuts: (spool seq, consistent, the disks at a consistent cut).
        cuts: Vec<(u64, bool, Option<Disks>)>,
    }

    impl Model {
        fn new() -> Self {
            let z = vec![vec![0u8; DISK_BYTES as usize]; 2];
            Self {
                disk: z.clone(),
                replica: z,
                applied: 0,
                cuts: Vec::new(),
            }
        }

        fn write(&mut self, t: &mut GroupTracker, d: usize, off: u64, data: &[u8]) {
            let disk = ["d0", "d1"][d];
            t.before_write(disk, off, data.len() as u64).unwrap();
            self.disk[d][off as usize..off as usize + data.len()].copy_from_slice(data);
            t.record_write(disk, off, data).unwrap();
        }

        fn cut(&mut self, t: &mut GroupTracker) {
            let spooling = *t.mode() == TrackMode::Spooling;
            if let Some(p) = t.cut(1, false).unwrap() {
                assert_eq!(
                    p.consistent, spooling,
                    "only a spooling group cuts consistent points"
                );
                let snapshot = p.consistent.then(|| self.disk.clone());
                self.cuts.push((p.spool_seq, p.consistent, snapshot));
            }
        }

        /// The master target acknowledges the oldest cut: the replica applies the
        /// records up to it and, for a consistent point, must equal the disks then.
        fn ack_oldest(&mut self, t: &mut GroupTracker) {
            if self.cuts.is_empty() {
                return;
            }
            let (seq, consistent, at_cut) = self.cuts.remove(0);
            for r in t.spool().read_from(self.applied + 1) {
                let r = r.unwrap();
                if r.seq > seq {
                    break;
                }
                let (d, off, data) = match r.entry {
                    SpoolEntry::Write {
                        disk, offset, data, ..
                    } => (disk, offset, data),
                    SpoolEntry::Zero {
                        disk, offset, len, ..
                    } => (disk, offset, vec![0; len as usize]),
                    SpoolEntry::Cut { .. } => continue,
                };
                let d = if d == "d0" { 0 } else { 1 };
                self.replica[d][off as usize..off as usize + data.len()].copy_from_slice(&data);
            }
            self.applied = seq;
            if let Some(at_cut) = at_cut {
                assert!(consistent);
                assert!(
                    self.replica == at_cut,
                    "a consistent point differs from the disks at its cut"
                );
            }
            t.ack_through(seq).unwrap();
        }

        /// One resync step: begin, read and record one extent, or finish.
        fn resync_step(&mut self, t: &mut GroupTracker) {
            match t.mode() {
                TrackMode::BitmapOnly { .. } => {
                    let (used, max) = t.spool_fill();
                    if used < max / 2 {
                        assert!(t.begin_resync().unwrap());
                    }
                }
                TrackMode::Resyncing => match t.next_resync_extent(64 << 10) {
                    Some((disk, e)) => {
                        let d = if disk == "d0" { 0 } else { 1 };
                        let data = self.disk[d][e.offset as usize..e.end() as usize].to_vec();
                        t.record_resync(&disk, e, &data).unwrap();
                    }
                    None => {
                        t.finish_resync().unwrap();
                    }
                },
                TrackMode::Spooling => {}
            }
        }

        /// Resyncs, cuts and acks until everything is at the target.
        fn drain(&mut self, t: &mut GroupTracker) {
            for _ in 0..10_000 {
                if *t.mode() == TrackMode::Spooling {
                    break;
                }
                self.resync_step(t);
                self.cut(t);
                self.ack_oldest(t);
            }
            self.cut(t);
            while !self.cuts.is_empty() {
                self.ack_oldest(t);
            }
            assert_eq!(*t.mode(), TrackMode::Spooling);
            assert!(
                self.replica == self.disk,
                "the replica differs after a full drain"
            );
            assert_eq!(t.dirty_blocks("d0"), Some(0));
            assert_eq!(t.dirty_blocks("d1"), Some(0));
        }
    }

    /// Proves, for random workloads that overflow the spool, that a resync brings the
    /// replica back: every consistent point equals the disks at its cut, no point is
    /// consistent while a resync reads, and at the end the replica equals the disks and
    /// no bit stays set.
    #[test]
    fn resync_after_overflow_is_exact() {
        for seed in 1..=20u64 {
            let fs = SimFs::new();
            let (mut t, _) = open(&fs);
            let mut m = Model::new();
            let mut rng = Rng::new(seed);
            let mut saw = (false, false);
            for _ in 0..600 {
                match rng.below(20) {
                    0..=11 => {
                        let d = rng.below(2) as usize;
                        let len = (1 + rng.below(16)) * 4096;
                        let off = rng.below((DISK_BYTES - len) / 512) * 512;
                        let data = vec![rng.next() as u8 | 1; len as usize];
                        m.write(&mut t, d, off, &data);
                    }
                    12 | 13 => m.cut(&mut t),
                    14 | 15 => {
                        if rng.below(3) == 0 {
                            m.ack_oldest(&mut t);
                        }
                    }
                    _ => m.resync_step(&mut t),
                }
                saw.0 |= matches!(t.mode(), TrackMode::BitmapOnly { .. });
                saw.1 |= *t.mode() == TrackMode::Resyncing;
            }
            assert!(saw.0 && saw.1, "seed {seed}: the spool never overflowed");
            m.drain(&mut t);
        }
    }

    /// Proves a hash-diff pass is exact and sends only what differs: for random disks
    /// whose master target copy differs in some 64 KiB blocks (whole blocks and single
    /// 4 KiB pieces), with writes during the pass (some of them writing what the copy
    /// already holds), cuts, acks, spool overflows, extents of random sizes (some not
    /// 64 KiB-aligned) and hashes taken from any state of the copy since the pass began,
    /// the replica ends equal to the disks with no bit set, and every block a pass
    /// recorded differed when it began, was written since, or was only partly inside
    /// the extent that recorded it.
    #[test]
    fn hash_diff_resync_is_exact_and_sends_only_differences() {
        use crate::hashing::{HASH_BLOCK_BYTES, differing_parts, hash_buffer};
        use std::collections::BTreeSet;
        const HB: u64 = HASH_BLOCK_BYTES;
        let mut aligned_recorded = 0u64;
        let mut overflows = 0;
        for seed in 1..=40u64 {
            let fs = SimFs::new();
            let (mut t, _) = open_initial(&fs);
            let mut m = Model::new();
            let mut rng = Rng::new(seed);
            // The disks hold data (some 4 KiB blocks zero); the copy equals them except
            // in the blocks of `differ`.
            for d in 0..2 {
                for b in 0..(DISK_BYTES / 4096) as usize {
                    let v = if rng.below(5) == 0 {
                        0
                    } else {
                        rng.next() as u8 | 1
                    };
                    m.disk[d][b * 4096..(b + 1) * 4096].fill(v);
                }
            }
            m.replica = m.disk.clone();
            let mut differ: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); 2];
            for (d, set) in differ.iter_mut().enumerate() {
                for blk in 0..DISK_BYTES / HB {
                    if rng.below(4) != 0 {
                        continue;
                    }
                    let at = (blk * HB) as usize;
                    if rng.below(2) == 0 {
                        m.replica[d][at..at + HB as usize].fill(0x5a);
                    } else {
                        let k = at + rng.below(16) as usize * 4096;
                        m.replica[d][k] ^= 0xff;
                    }
                    set.insert(blk);
                }
            }
            // Some seeds read in whole 64 KiB blocks only.
            let aligned = seed % 2 == 0;
            let mut written: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); 2];
            let mut recorded: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); 2];
            let mut edges: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); 2];
            // The copy's states since the pass began: what the master target may hash.
            let mut states: Vec<Disks> = Vec::new();
            let mut overflowed = false;
            // Spooled writes: (spool seq, disk, extent); their bits must stay set until
            // an ack covers them (the rule a crash relies on).
            let mut spooled: Vec<(u64, usize, Extent)> = Vec::new();
            type Spooled = Vec<(u64, usize, Extent)>;
            type Blocks = Vec<BTreeSet<u64>>;
            fn write(
                t: &mut GroupTracker,
                m: &mut Model,
                rng: &mut Rng,
                spooled: &mut Spooled,
                written: &mut Blocks,
            ) {
                let d = rng.below(2) as usize;
                let len = (1 + rng.below(8)) * 4096;
                let off = rng.below((DISK_BYTES - len) / 4096) * 4096;
                // Half the writes put back what the copy holds there.
                let data = if rng.below(2) == 0 {
                    m.replica[d][off as usize..(off + len) as usize].to_vec()
                } else {
                    vec![rng.next() as u8 | 1; len as usize]
                };
                let disk = ["d0", "d1"][d];
                t.before_write(disk, off, len).unwrap();
                m.disk[d][off as usize..(off + len) as usize].copy_from_slice(&data);
                if let Some(seq) = t.record_write(disk, off, &data).unwrap() {
                    spooled.push((seq, d, Extent { offset: off, len }));
                }
                for blk in off / HB..=(off + len - 1) / HB {
                    written[d].insert(blk);
                }
            }
            let mut began = false;
            for _ in 0..3000 {
                let acked = m.applied;
                spooled.retain(|&(seq, _, _)| seq > acked);
                for &(_, d, e) in &spooled {
                    for b in e.offset / 4096..e.end() / 4096 {
                        let one = Extent {
                            offset: b * 4096,
                            len: 4096,
                        };
                        assert!(
                            t.any_dirty(["d0", "d1"][d], one).unwrap(),
                            "seed {seed}: block {b} of d{d} lost its bit before its ack"
                        );
                    }
                }
                match t.mode().clone() {
                    TrackMode::Spooling => break,
                    TrackMode::BitmapOnly { .. } => {
                        overflowed |= began;
                        if rng.below(3) == 0 {
                            // Written while only the bitmap tracks: not spooled.
                            write(&mut t, &mut m, &mut rng, &mut spooled, &mut written);
                        } else if t.begin_hash_diff_resync().unwrap() {
                            began = true;
                            states = vec![m.replica.clone()];
                        } else {
                            // Earlier records still wait for their ack.
                            assert!(!t.all_acked());
                            m.cut(&mut t);
                            m.ack_oldest(&mut t);
                        }
                        continue;
                    }
                    TrackMode::Resyncing => {}
                }
                match rng.below(12) {
                    0..=2 => write(&mut t, &mut m, &mut rng, &mut spooled, &mut written),
                    3 => m.cut(&mut t),
                    4 => {
                        m.ack_oldest(&mut t);
                        states.push(m.replica.clone());
                    }
                    _ => {
                        let most = if aligned {
                            (1 + rng.below(4)) * HB
                        } else {
                            (1 + rng.below(64)) * 4096
                        };
                        let Some((disk, e)) = t.next_resync_extent(most) else {
                            t.finish_resync().unwrap();
                            continue;
                        };
                        let d = if disk == "d0" { 0 } else { 1 };
                        let data = m.disk[d][e.offset as usize..e.end() as usize].to_vec();
                        let state = &states[rng.below(states.len() as u64) as usize];
                        let theirs = hash_buffer(&state[d]).hashes;
                        let pd = differing_parts(DISK_BYTES, e.offset, &data, 0, &theirs);
                        for p in &pd.parts {
                            for blk in p.offset / HB..=(p.end() - 1) / HB {
                                recorded[d].insert(blk);
                                if blk * HB < e.offset || (blk + 1) * HB > e.end() {
                                    edges[d].insert(blk);
                                }
                            }
                        }
                        t.record_resync_parts(&disk, e, &data, &pd.parts).unwrap();
                    }
                }
            }
            m.drain(&mut t);
            assert!(t.initial_sync_disks().is_empty());
            overflows += usize::from(overflowed);
            for d in 0..2 {
                let allowed: BTreeSet<u64> = differ[d]
                    .union(&written[d])
                    .chain(edges[d].iter())
                    .copied()
                    .collect();
                let extra: Vec<_> = recorded[d].difference(&allowed).collect();
                assert!(
                    extra.is_empty(),
                    "seed {seed}: disk {d} recorded blocks {extra:?} that were equal"
                );
                if aligned && !overflowed {
                    // Whole blocks: an edge is only a block a write split into runs.
                    assert!(
                        edges[d].is_subset(&written[d]),
                        "seed {seed}: edges {edges:?}"
                    );
                    aligned_recorded += recorded[d].len() as u64;
                }
            }
        }
        assert!(
            aligned_recorded > 0,
            "no aligned seed went without an overflow"
        );
        assert!(overflows > 0, "no seed overflowed its spool");
    }

    /// Proves extents recorded in parts are refused outside a hash-diff pass, and
    /// parts outside their extent or out of order are refused.
    #[test]
    fn record_in_parts_needs_a_hash_diff_pass() {
        let fs = SimFs::new();
        let (mut t, _) = open_initial(&fs);
        assert!(t.begin_resync().unwrap());
        let e = Extent {
            offset: 0,
            len: 8192,
        };
        let part = Extent {
            offset: 0,
            len: 4096,
        };
        let data = vec![1u8; 8192];
        assert!(matches!(
            t.record_resync_parts("d0", e, &data, &[part]),
            Err(TrackerError::NotHashDiff { .. })
        ));
        t.shutdown().unwrap();
        let (mut t, _) = open_initial(&fs);
        assert!(t.all_acked());
        assert!(t.begin_hash_diff_resync().unwrap());
        assert!(t.resync_is_hash_diff());
        let outside = Extent {
            offset: 8192,
            len: 4096,
        };
        assert!(matches!(
            t.record_resync_parts("d0", e, &data, &[outside]),
            Err(TrackerError::BadParts { .. })
        ));
        assert!(matches!(
            t.record_resync_parts("d0", e, &data, &[outside, part]),
            Err(TrackerError::BadParts { .. })
        ));
        assert!(t.record_resync_parts("d0", e, &data, &[part]).unwrap());
        // The matching second block's bit is clear, the recorded one stays until acked.
        assert!(t.any_dirty("d0", part).unwrap());
        assert!(
            !t.any_dirty(
                "d0",
                Extent {
                    offset: 4096,
                    len: 4096
                }
            )
            .unwrap()
        );
    }

    /// Proves a first protection ships every block: the group starts bitmap-only with
    /// every block dirty and the disks listed for initial sync, zero blocks become zero
    /// records without data, the list survives a crash, and the pass's end empties it.
    #[test]
    fn initial_sync_ships_every_block_once() {
        let fs = SimFs::new();
        let (mut t, rep) = open_initial(&fs);
        assert!(!rep.unclean);
        assert_eq!(t.initial_sync_disks(), ["d0", "d1"]);
        assert!(matches!(t.mode(), TrackMode::BitmapOnly { .. }));
        assert_eq!(t.dirty_blocks("d0"), Some(DISK_BYTES / 4096));
        assert_eq!(t.cut(1, false).unwrap(), None);
        drop(t);
        fs.crash(CrashMode::DropUnsynced);
        let (mut t, _) = open_initial(&fs);
        assert_eq!(t.initial_sync_disks(), ["d0", "d1"]);
        assert_eq!(t.dirty_blocks("d1"), Some(DISK_BYTES / 4096));
        let mut m = Model::new();
        // Data already on d0 before protection (the model's replica lacks it).
        for b in [3u64, 4, 100] {
            m.disk[0][(b * 4096) as usize..(b * 4096 + 4096) as usize].fill(b as u8);
        }
        assert!(t.begin_resync().unwrap());
        assert_eq!(t.resync_progress().unwrap().total_bytes, 2 * DISK_BYTES);
        m.resync_step(&mut t);
        // A write during the pass, then an inconsistent cut.
        m.write(&mut t, 1, 8192, &[9; 4096]);
        m.cut(&mut t);
        assert!(!m.cuts[0].1, "a cut during the resync must be inconsistent");
        m.drain(&mut t);
        assert!(t.initial_sync_disks().is_empty());
        // Zero blocks cost no data in the spool: only the 3 data blocks, the write, and
        // the written block again when the pass reached it.
        let data: u64 = t
            .spool()
            .read_from(t.spool().first_seq())
            .map(|r| match r.unwrap().entry {
                SpoolEntry::Write { data, .. } => data.len() as u64,
                _ => 0,
            })
            .sum();
        assert_eq!(
            data,
            5 * 4096,
            "zero blocks were spooled as data ({data} bytes)"
        );
        t.shutdown().unwrap();
        let (t, rep) = open_initial(&fs);
        assert!(!rep.unclean && t.initial_sync_disks().is_empty());
        assert_eq!(*t.mode(), TrackMode::Spooling);
    }

    /// Crashes a first open with `initial` at each of its durability steps (tearing
    /// what was not synced), reopens with the same `initial`, and hands the tracker to
    /// `check`. `prepare` puts files in place first (synced, not part of the count).
    fn crash_every_step_of_first_open(
        prepare: impl Fn(&SimFs),
        initial: InitialSync,
        check: impl Fn(&GroupTracker, u64),
    ) {
        let open_with = |fs: &SimFs| {
            GroupTracker::open(
                Arc::new(fs.clone()),
                Path::new("/g"),
                &disks(),
                spool_cfg(),
                bitmap_cfg(),
                initial.clone(),
            )
        };
        let steps = {
            let fs = SimFs::new();
            prepare(&fs);
            let before = fs.steps();
            open_with(&fs).unwrap();
            fs.steps() - before
        };
        assert!(steps > 4);
        for step in 1..=steps {
            let fs = SimFs::new();
            prepare(&fs);
            fs.crash_after(step);
            let _ = open_with(&fs);
            fs.crash(CrashMode::Torn { seed: step });
            let (t, _) = open_with(&fs).unwrap();
            check(&t, step);
        }
    }

    /// Proves a crash at every durability step of a first protection leaves, after the
    /// restart, both disks listed for initial sync with every block dirty: a new disk
    /// can never start as if it were in sync.
    #[test]
    fn crash_during_first_open_keeps_the_initial_sync() {
        crash_every_step_of_first_open(
            |_| {},
            InitialSync::Full,
            |t, step| {
                assert_eq!(t.initial_sync_disks(), ["d0", "d1"], "crash at step {step}");
                for d in ["d0", "d1"] {
                    assert_eq!(
                        t.dirty_blocks(d),
                        Some(DISK_BYTES / 4096),
                        "step {step}: {d}"
                    );
                }
                assert!(matches!(t.mode(), TrackMode::BitmapOnly { .. }));
            },
        );
    }

    fn list_meta(disk: &str, origin: changelist::Origin) -> changelist::Meta {
        changelist::Meta {
            origin,
            group: "g".into(),
            disk: disk.into(),
            node: String::new(),
            disk_bytes: DISK_BYTES,
            point_id: Some(7),
            created_unix_ms: 1,
        }
    }

    /// Two overlapping lists of d0 in `/lists` (synced): the master target's frames
    /// after a point and the process server's unacknowledged writes.
    fn write_d0_lists(fs: &SimFs) -> Vec<PathBuf> {
        let dir = Path::new("/lists");
        fs.create_dir_all(dir).unwrap();
        let e = |offset, len| Extent { offset, len };
        changelist::write(
            fs,
            dir,
            "b-d0.chg",
            &list_meta("d0", changelist::Origin::FramesAfterPoint),
            [e(0, 4096), e(65536, 65536)],
        )
        .unwrap();
        changelist::write(
            fs,
            dir,
            "a-d0.chg",
            &list_meta("d0", changelist::Origin::Unacknowledged),
            [e(98304, 65536), e(DISK_BYTES - 4096, 4096)],
        )
        .unwrap();
        vec![dir.join("b-d0.chg"), dir.join("a-d0.chg")]
    }

    /// The blocks of d0's two lists: 0, 16..40 (the two overlap), the last.
    fn d0_list_runs() -> Vec<Extent> {
        vec![
            Extent {
                offset: 0,
                len: 4096,
            },
            Extent {
                offset: 65536,
                len: 98304,
            },
            Extent {
                offset: DISK_BYTES - 4096,
                len: 4096,
            },
        ]
    }

    fn d0_from_lists() -> InitialSync {
        InitialSync::Changed(BTreeMap::from([(
            "d0".to_string(),
            vec![
                PathBuf::from("/lists/b-d0.chg"),
                PathBuf::from("/lists/a-d0.chg"),
            ],
        )]))
    }

    /// Proves a first protection from change lists starts d0 with exactly the union of
    /// its lists dirty (d1, which has none, with every block), both listed for initial
    /// sync, and that the pass reads only those blocks; and that a crash at every
    /// durability step of that first open leaves the same after the restart.
    #[test]
    fn first_open_from_change_lists_marks_their_union() {
        let fs = SimFs::new();
        write_d0_lists(&fs);
        let (mut t, rep) = GroupTracker::open(
            Arc::new(fs.clone()),
            Path::new("/g"),
            &disks(),
            spool_cfg(),
            bitmap_cfg(),
            d0_from_lists(),
        )
        .unwrap();
        assert_eq!(t.dirty_runs("d0").unwrap(), d0_list_runs());
        assert_eq!(t.dirty_blocks("d1"), Some(DISK_BYTES / 4096));
        assert_eq!(t.initial_sync_disks(), ["d0", "d1"]);
        assert_eq!(rep.from_lists.len(), 1);
        let started = &rep.from_lists[0];
        assert_eq!((started.disk.as_str(), started.dirty_blocks), ("d0", 26));
        assert_eq!(started.disk_blocks, DISK_BYTES / 4096);
        assert!(started.lists[0].0.contains("frames after point 7"));
        assert_eq!(started.lists[1].1, 17);
        // The pass reads the lists' runs of d0, then all of d1.
        assert!(t.begin_resync().unwrap());
        let mut read = Vec::new();
        while let Some((d, e)) = t.next_resync_extent(1 << 20) {
            let data = vec![0u8; e.len as usize];
            t.record_resync(&d, e, &data).unwrap();
            read.push((d, e));
        }
        let d0: Vec<Extent> = read.iter().filter(|r| r.0 == "d0").map(|r| r.1).collect();
        assert_eq!(d0, d0_list_runs());
        assert_eq!(t.finish_resync().unwrap(), ["d0", "d1"]);
        drop(t);

        crash_every_step_of_first_open(
            |fs| {
                write_d0_lists(fs);
            },
            d0_from_lists(),
            |t, step| {
                assert_eq!(t.initial_sync_disks(), ["d0", "d1"], "crash at step {step}");
                assert_eq!(t.dirty_runs("d0").unwrap(), d0_list_runs(), "step {step}");
                assert_eq!(t.dirty_blocks("d1"), Some(DISK_BYTES / 4096), "step {step}");
                assert!(matches!(t.mode(), TrackMode::BitmapOnly { .. }));
            },
        );
    }

    /// Proves `mark_all_dirty` (no copy at the master target after a start from
    /// lists) makes every block dirty durably and sends the pass back to the disk's
    /// start, and does nothing on a disk that is wholly dirty already.
    #[test]
    fn mark_all_dirty_restarts_the_disk() {
        let fs = SimFs::new();
        write_d0_lists(&fs);
        let open_lists = |fs: &SimFs| {
            GroupTracker::open(
                Arc::new(fs.clone()),
                Path::new("/g"),
                &disks(),
                spool_cfg(),
                bitmap_cfg(),
                d0_from_lists(),
            )
            .unwrap()
            .0
        };
        let mut t = open_lists(&fs);
        assert!(t.begin_resync().unwrap());
        let (d, e) = t.next_resync_extent(1 << 20).unwrap();
        assert_eq!((d.as_str(), e.offset), ("d0", 0));
        t.record_resync("d0", e, &vec![0; e.len as usize]).unwrap();
        assert_eq!(t.next_resync_extent(1 << 20).unwrap().1.offset, 65536);
        assert!(t.mark_all_dirty("d0").unwrap());
        assert!(!t.mark_all_dirty("d1").unwrap(), "d1 is wholly dirty");
        assert_eq!(t.dirty_blocks("d0"), Some(DISK_BYTES / 4096));
        assert_eq!(
            t.next_resync_extent(1 << 20),
            Some((
                "d0".to_string(),
                Extent {
                    offset: 0,
                    len: 1 << 20
                }
            ))
        );
        drop(t);
        fs.crash(CrashMode::DropUnsynced);
        let t = open_lists(&fs);
        assert_eq!(t.dirty_blocks("d0"), Some(DISK_BYTES / 4096), "durable");
    }

    /// Proves a change list that is damaged, missing, or made for another disk or size
    /// is refused by name and nothing is created (no bitmap, no initial-sync entry);
    /// and that the lists of a disk that already has a bitmap are not read at all.
    #[test]
    fn bad_change_lists_change_nothing() {
        let open_with = |fs: &SimFs, initial: InitialSync| {
            GroupTracker::open(
                Arc::new(fs.clone()),
                Path::new("/g"),
                &disks(),
                spool_cfg(),
                bitmap_cfg(),
                initial,
            )
        };
        let one = |path: &str| {
            InitialSync::Changed(BTreeMap::from([(
                "d0".to_string(),
                vec![PathBuf::from("/lists/b-d0.chg"), PathBuf::from(path)],
            )]))
        };
        type Damage<'a> = &'a dyn Fn(&SimFs);
        let cases: [(&str, Damage, &str); 4] = [
            (
                "/lists/a-d0.chg",
                &|fs: &SimFs| fs.flip_bit(Path::new("/lists/a-d0.chg"), 289, 2),
                "crc32",
            ),
            ("/lists/missing.chg", &|_: &SimFs| {}, "missing.chg"),
            (
                "/lists/d1.chg",
                &|fs: &SimFs| {
                    changelist::write(
                        fs,
                        Path::new("/lists"),
                        "d1.chg",
                        &list_meta("d1", changelist::Origin::Unacknowledged),
                        [],
                    )
                    .unwrap();
                },
                "not \"d0\"",
            ),
            (
                "/lists/small.chg",
                &|fs: &SimFs| {
                    let m = changelist::Meta {
                        disk_bytes: DISK_BYTES / 2,
                        ..list_meta("d0", changelist::Origin::Unacknowledged)
                    };
                    changelist::write(fs, Path::new("/lists"), "small.chg", &m, []).unwrap();
                },
                "disk \"d0\" has 1048576",
            ),
        ];
        for (path, damage, says) in cases {
            let fs = SimFs::new();
            write_d0_lists(&fs);
            damage(&fs);
            let e = open_with(&fs, one(path)).err().expect(path).to_string();
            assert!(
                e.contains("disk d0: change list refused") && e.contains(says),
                "{e}"
            );
            assert!(
                fs.list_dir(Path::new("/g")).is_err(),
                "{path}: /g was created"
            );
        }
        // A disk with a bitmap already: its lists (even a missing one) are not read.
        let fs = SimFs::new();
        write_d0_lists(&fs);
        open_with(&fs, InitialSync::Skip)
            .unwrap()
            .0
            .shutdown()
            .unwrap();
        let (t, rep) = open_with(&fs, one("/lists/missing.chg")).unwrap();
        assert!(rep.from_lists.is_empty());
        assert_eq!(t.dirty_blocks("d0"), Some(0));
    }

    /// Proves a clean stop of a group that still needs a resync is clean (no unclean
    /// report) yet comes back bitmap-only, with its dirty blocks kept for the resync.
    #[test]
    fn clean_stop_before_the_resync_keeps_it_pending() {
        let fs = SimFs::new();
        let (mut t, _) = open_initial(&fs);
        assert!(t.begin_resync().unwrap());
        t.shutdown().unwrap();
        let (t, rep) = open_initial(&fs);
        assert!(!rep.unclean);
        assert!(matches!(t.mode(), TrackMode::BitmapOnly { .. }));
        assert_eq!(t.dirty_blocks("d0"), Some(DISK_BYTES / 4096));
        drop(t);
        // The same through `open` without initial sync: still pending.
        let (t, _) = open(&fs);
        assert!(matches!(t.mode(), TrackMode::BitmapOnly { .. }));
    }

    /// Proves a spool that fills during a resync ends the pass (bitmap-only again,
    /// nothing lost) and a later pass still ends exact.
    #[test]
    fn spool_full_during_resync_starts_over() {
        let fs = SimFs::new();
        let (mut t, _) = open_initial(&fs);
        let mut m = Model::new();
        for b in 0..(DISK_BYTES / 4096) {
            m.disk[(b % 2) as usize][(b * 4096) as usize..(b * 4096 + 4096) as usize]
                .fill(b as u8 | 1);
        }
        assert!(t.begin_resync().unwrap());
        // Both 1 MiB disks hold data: 2 MiB do not fit the 1 MiB spool without acks.
        let mut ended = false;
        for _ in 0..40 {
            m.resync_step(&mut t);
            if matches!(t.mode(), TrackMode::BitmapOnly { .. }) {
                ended = true;
                break;
            }
        }
        assert!(ended, "the spool should have filled");
        assert_eq!(t.resync_progress(), None);
        m.drain(&mut t);
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
        // The spooled records' epoch is sealed, as an inconsistent point, then no more.
        let p = t.cut(1, false).unwrap().unwrap();
        assert!(!p.consistent);
        assert_eq!(t.cut(2, false).unwrap(), None);
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
