//! Hash lists for a process server (protocol 3): the answers to its `HashRequest`s,
//! for a hash-diff resync (reprotect) and for `process-server verify`.
//!
//! # What is hashed
//!
//! A request names a group, a disk, a range of 64 KiB blocks and which state of the
//! disk ([`HashOf`]):
//!
//! - [`HashOf::Latest`]: the replica with every durable frame of the journal laid over
//!   it, consistent or not: what the disk becomes once everything acknowledged is
//!   applied. A hash-diff resync compares against it (why that is exact is in
//!   `datapath::tracker`'s module doc, "Hash-diff"). With an empty journal (a master
//!   target started on existing replica files, the reprotect case) it is the replica.
//! - [`HashOf::ConsistentPoint`]: the newest consistent point in the journal; without
//!   one, the replica when the journal was folded before (the replica then holds the
//!   last folded point, always a consistent one), else the answer is
//!   [`HashStatus::NoPoint`].
//!
//! A disk no journal frame wrote is hashed straight from its replica file; otherwise
//! through a [`PointView`] (`datapath::pointview`: the journal's extent tables over the
//! replica, frames decoded and verified on read). Either way the blocks are hashed on
//! every core ([`hashing::default_threads`], `datapath::hashing`); through a view the
//! reads take turns (one view, one lock) while the hashing runs in parallel.
//!
//! # No copy
//!
//! A replica that holds no data at all (every byte a hole of a sparse file: a replica
//! this master target created and nothing ever wrote) and that no frame wrote is no
//! copy: hashing its zeros would only tell the process server to send every block it
//! has, so the answer is [`HashStatus::NoCopy`] at once and the process server sends
//! the disk in full ("no copy: full sync"). The test is one `lseek(SEEK_DATA)` per
//! request, no state of our own: a replica written since (a retention fold, a failback)
//! has data and is hashed. A file system without `SEEK_DATA` reports data everywhere,
//! which only costs the hashing of zeros (measured: see the README's Reprotect section).
//!
//! # Views and their lifetime
//!
//! One connection keeps one view per group for the latest state (extended with the
//! frames that became durable since the last request, [`PointIndex::extend`]) and one
//! for the newest consistent point (rebuilt when a newer point arrives). Both are
//! dropped when a retention fold ran ([`HashSources::invalidate`]): a fold can move
//! the replica past the point a view stands for. Requests are answered on the
//! connection's task between batches, where no fold runs, so no pin is needed.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use datapath::frame::{ErrorFrame, HashListFrame, HashOf, HashRequest, HashStatus};
use datapath::hashing::{self, BlockSource, HASH_BLOCK_BYTES};
use datapath::journal::{FrameEntry, Journal};
use datapath::pointview::{PointIndex, PointView};
use datapath::storage::RealFs;

use crate::config::GroupConfig;

/// The views one connection keeps; see the module doc.
#[derive(Default)]
pub struct HashSources {
    /// Per group: the latest state, indexed through `through_seq`.
    latest: HashMap<String, (u64, PointView)>,
    /// Per group: the newest consistent point (its id) and its view.
    point: HashMap<String, (u64, PointView)>,
}

/// Bytes hashed and time spent, for the connection's log line.
#[derive(Clone, Copy, Debug, Default)]
pub struct HashStats {
    pub bytes: u64,
    pub seconds: f64,
}

impl HashSources {
    /// Forgets every view (after a retention fold).
    pub fn invalidate(&mut self) {
        self.latest.clear();
        self.point.clear();
    }

    /// The answer to `req` for `group`, whose journal is `journal`. A request the
    /// process server should not have sent (a block size other than 64 KiB, a disk not
    /// in the group, blocks past the disk's end) is an [`ErrorFrame`]; trouble of ours
    /// (I/O, a bad journal frame) is a [`HashStatus::Failed`] answer and a log line.
    pub fn answer(
        &mut self,
        group: &GroupConfig,
        journal: &Journal,
        req: &HashRequest,
        stats: &mut HashStats,
    ) -> Result<HashListFrame, ErrorFrame> {
        if u64::from(req.block_size_bytes) != HASH_BLOCK_BYTES {
            return Err(ErrorFrame::new(
                ErrorFrame::BAD_FRAME,
                &format!(
                    "hash request: blocks of {} bytes; this master target hashes blocks of \
                     {HASH_BLOCK_BYTES} bytes (hashing version {})",
                    req.block_size_bytes,
                    hashing::VERSION
                ),
            ));
        }
        let Some(d) = group.disks.iter().position(|x| x.id == req.disk) else {
            return Err(ErrorFrame::new(
                ErrorFrame::UNKNOWN_DISK,
                &format!(
                    "hash request: disk {:?} is not configured in group {:?}",
                    req.disk, group.id
                ),
            ));
        };
        let size = group.disks[d].size_bytes;
        let blocks = hashing::disk_blocks(size);
        if req.first_block.saturating_add(req.count.into()) > blocks {
            return Err(ErrorFrame::new(
                ErrorFrame::OUT_OF_RANGE,
                &format!(
                    "hash request: blocks {}+{} of disk {:?}, which has {blocks} blocks of \
                     {HASH_BLOCK_BYTES} bytes",
                    req.first_block, req.count, req.disk
                ),
            ));
        }
        let mut answer = HashListFrame {
            request_id: req.request_id,
            group: group.id.clone(),
            disk: req.disk.clone(),
            block_size_bytes: req.block_size_bytes,
            first_block: req.first_block,
            point_id: 0,
            status: HashStatus::Hashes,
            hashes: Vec::new(),
        };
        let started = Instant::now();
        match self.hash(group, journal, req, d, &mut answer) {
            Ok(()) => {
                if answer.status == HashStatus::Hashes {
                    stats.bytes += (answer.hashes.len() as u64 * HASH_BLOCK_BYTES).min(size);
                    stats.seconds += started.elapsed().as_secs_f64();
                }
            }
            Err(e) => {
                tracing::error!(
                    group = %group.id,
                    disk = %req.disk,
                    first_block = req.first_block,
                    count = req.count,
                    "hash request: {e:#}"
                );
                answer.status = HashStatus::Failed;
                answer.hashes.clear();
                // A view that failed once is rebuilt next time.
                self.invalidate();
            }
        }
        Ok(answer)
    }

    fn hash(
        &mut self,
        group: &GroupConfig,
        journal: &Journal,
        req: &HashRequest,
        d: usize,
        answer: &mut HashListFrame,
    ) -> anyhow::Result<()> {
        let replica = &group.disks[d].replica;
        let size = group.disks[d].size_bytes;
        let view: &mut PointView = match req.of {
            HashOf::Latest => {
                let durable = journal.durable_seq();
                let (through, view) = match self.latest.remove(&group.id) {
                    Some(v) => v,
                    None => (journal.base_seq(), new_view(group, journal, &[])?),
                };
                // Frames folded since cannot be missing: a fold invalidates the views.
                let more = entries(journal, through.max(journal.base_seq()) + 1, durable)?;
                let mut view = view;
                view.index_mut()
                    .extend(&RealFs, &more)
                    .map_err(|e| anyhow::anyhow!("index the journal: {e}"))?;
                &mut self
                    .latest
                    .entry(group.id.clone())
                    .or_insert((durable, view))
                    .1
            }
            HashOf::ConsistentPoint => {
                let newest = journal
                    .points()
                    .iter()
                    .rev()
                    .find(|p| p.record.consistent)
                    .map(|p| (p.record.point_id, p.seq));
                let Some((point_id, seq)) = newest else {
                    if journal.base_seq() == 0 {
                        answer.status = HashStatus::NoPoint;
                        return Ok(());
                    }
                    // Folded before: the replica holds the last folded point.
                    answer.hashes = hash_file(replica, size, req)?;
                    return Ok(());
                };
                answer.point_id = point_id;
                if self
                    .point
                    .get(&group.id)
                    .is_none_or(|(p, _)| *p != point_id)
                {
                    let frames = entries(journal, journal.base_seq() + 1, seq)?;
                    let view = new_view(group, journal, &frames)?;
                    self.point.insert(group.id.clone(), (point_id, view));
                }
                match self.point.get_mut(&group.id) {
                    Some((_, v)) => v,
                    None => anyhow::bail!("the point's view is gone"),
                }
            }
        };
        if !view.index().touches(d) {
            if req.of == HashOf::Latest && is_blank(replica)? {
                answer.status = HashStatus::NoCopy;
                return Ok(());
            }
            answer.hashes = hash_file(replica, size, req)?;
            return Ok(());
        }
        let src = ViewSource {
            view: Mutex::new(view),
            disk: d,
        };
        let mut out = vec![[0u8; 32]; req.count as usize];
        hashing::hash_source_into(
            &src,
            size,
            req.first_block,
            &mut out,
            hashing::default_threads(),
        )?;
        answer.hashes = out;
        Ok(())
    }
}

/// The index entries of frames `from..=to` (an empty range when `from > to`).
fn entries(journal: &Journal, from: u64, to: u64) -> anyhow::Result<Vec<FrameEntry>> {
    (from..=to)
        .map(|s| {
            journal
                .entry(s)
                .copied()
                .ok_or_else(|| anyhow::anyhow!("journal frame {s} is not in the index"))
        })
        .collect()
}

/// A view of `group`'s replicas with `frames` laid over them.
fn new_view(
    group: &GroupConfig,
    journal: &Journal,
    frames: &[FrameEntry],
) -> anyhow::Result<PointView> {
    let disks = group.view_disks();
    let (index, _) = PointIndex::build(&RealFs, journal.dir(), journal.group(), frames, &disks)
        .map_err(|e| anyhow::anyhow!("index the journal: {e}"))?;
    let replicas: Vec<PathBuf> = group.disks.iter().map(|d| d.replica.clone()).collect();
    PointView::new(index, Arc::new(RealFs), &replicas)
        .map_err(|e| anyhow::anyhow!("open the replicas: {e}"))
}

/// Hashes the requested blocks of a replica file on every core.
fn hash_file(path: &PathBuf, size: u64, req: &HashRequest) -> anyhow::Result<Vec<[u8; 32]>> {
    let f = File::open(path).map_err(|e| anyhow::anyhow!("open {}: {e}", path.display()))?;
    hashing::hash_range(
        &f,
        size,
        req.first_block,
        req.count.into(),
        hashing::default_threads(),
    )
    .map_err(|e| anyhow::anyhow!("hash {}: {e}", path.display()))
}

/// Whether the file at `path` holds no data at all: `lseek(SEEK_DATA)` from 0 finds
/// none (ENXIO). A file system without SEEK_DATA says data everywhere: not blank.
pub fn is_blank(path: &PathBuf) -> anyhow::Result<bool> {
    use std::os::fd::AsRawFd;
    let f = File::open(path).map_err(|e| anyhow::anyhow!("open {}: {e}", path.display()))?;
    // SAFETY: lseek on a descriptor we own, with no pointer arguments.
    let r = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
    if r >= 0 {
        return Ok(false);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENXIO) => Ok(true),
        // EINVAL: no SEEK_DATA here; treat the file as holding data.
        Some(libc::EINVAL) => Ok(false),
        _ => Err(anyhow::anyhow!("look for data in {}: {e}", path.display())),
    }
}

/// One disk of a view as a [`BlockSource`]: reads take turns, hashing runs on every
/// worker thread.
struct ViewSource<'a> {
    view: Mutex<&'a mut PointView>,
    disk: usize,
}

impl BlockSource for ViewSource<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut v = self
            .view
            .lock()
            .map_err(|_| io::Error::other("a hashing thread panicked"))?;
        v.read(self.disk, offset, buf).map_err(io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Proves a sparse file without data is blank, and one byte of data makes it not.
    #[test]
    fn blank_replica_is_told_by_seek_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.img");
        let f = File::create(&p).unwrap();
        f.set_len(8 << 20).unwrap();
        assert!(is_blank(&p).unwrap());
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[1], 5 << 20).unwrap();
        f.sync_all().unwrap();
        assert!(!is_blank(&p).unwrap());
        assert!(is_blank(&dir.path().join("missing")).is_err());
    }
}
