//! The stages of [`Failback::apply`] (see the module doc of [`super`], "The
//! pipeline"): the saver on the calling thread, the applier, the checker and the
//! committer on threads of their own, after the frames read and decoded ahead
//! ([`super::ahead`]).
//!
//! ```text
//!  ahead --frames--> saver --saved--> applier --written--> checker --checked--> committer
//!                      ^                 ^                    |                    |
//!                      |                 +---- re-read -------+                    |
//!                      +------------------------- news --------------------------+
//! ```
//!
//! - **saver**: collects a batch and saves its old contents ([`UndoLog::save`]: the
//!   logs it touches appended, their writeback started record by record, then
//!   synced). It may save batch k+1 while batch k is written: a range of k+1 that k
//!   writes was saved by k (or before), so k+1 never records it first (see
//!   [`UndoLog::save`]), and only the first record of a range matters to replay.
//! - **applier**: writes a saved batch ([`apply::write_extents`]) once the checker has
//!   re-read the batch before (it would find this batch's bytes otherwise).
//! - **checker**: re-reads and checks every extent of a written batch ([`verify`]),
//!   from the page cache, before or while the batch is synced: the bytes are the same.
//! - **committer**: syncs every replica the checked batches wrote, then records the
//!   progress (`applied_seq`) through the newest of them; one sync per replica and one
//!   record cover every batch checked meanwhile. A batch is recorded only once it is
//!   both checked and synced. Synced replicas' pages then leave the page cache
//!   ([`crate::storage::StorageFile::drop_cached`], a hint).
//!
//! The hand-overs to the applier and the checker are rendezvous (channels of no
//! capacity) and the checker releases a batch's frames once it is checked, so each of
//! saver, applier and checker holds one batch: with the frames decoded ahead, at most
//! [`DECODED_BYTES_MAX`] of decoded data. With [`Failback::with_overlap`]`(false)` the
//! saver waits for each batch's progress record before it takes the next frame: one
//! step at a time, in one fixed order.

use std::io;
use std::sync::mpsc::{Receiver, Sender, SyncSender, TryRecvError, channel, sync_channel};
use std::time::{Duration, Instant};

use super::ahead::{self, Ahead, Budget};
use super::{
    DECODE_THREADS_MAX, DECODED_BYTES_MAX, Failback, FailbackError, FailbackState, Outcome,
    Progress, VERIFY_CHUNK_BYTES,
};
use crate::apply::{self, UndoLog};
use crate::extent::{ExtentData, RangeSet};
use crate::frame::DataFrame;
use crate::storage::StorageFile;

use super::Disk;

/// A replica as the stages share it.
pub(super) struct ReplicaRef<'a> {
    pub disk: &'a Disk,
    pub file: &'a dyn StorageFile,
}

/// A batch on its way through the stages.
#[derive(Default)]
struct Batch {
    frames: Vec<DataFrame>,
    /// Budget bytes its frames hold.
    held_bytes: u64,
    /// Indexes of the replicas it writes to.
    touched: Vec<usize>,
    /// Its last frame: `applied_seq` once it is synced and checked.
    last_seq: u64,
    /// `applied_bytes` through it (set by the applier).
    applied_bytes: u64,
    /// The progress through it.
    prog: Progress,
}

/// What the applier, the checker and the committer tell the saver.
enum News {
    /// The applier wrote a batch, after waiting for the check before and writing.
    Written(apply::ApplyStats, Duration, Duration),
    /// The checker checked a batch, re-reading this many bytes, in this time.
    Checked(u64, Duration),
    /// The committer synced and recorded the progress through this many more batches
    /// (one sync per replica and one record for all of them), in this time.
    Stored(usize, Progress, Duration),
    /// A stage failed and stopped.
    Failed(FailbackError),
}

/// Everything [`run`] works on.
pub(super) struct Work<'a, 'r> {
    pub fb: &'a Failback,
    pub replicas: &'a [ReplicaRef<'r>],
    pub undos: &'a mut [&'r mut UndoLog],
    /// The state to record after each batch, but for `applied_seq` and
    /// `applied_bytes`.
    pub stamp: FailbackState,
    /// The seq of the last frame: the point frame.
    pub last_seq: u64,
    pub applied_bytes: &'a mut u64,
    pub out: &'a mut Outcome,
    pub progress: &'a mut dyn FnMut(&Progress),
}

/// Runs the stages over `frames` (`prog` counts their totals) until the last frame's
/// batch is recorded, or the first error.
pub(super) fn run(
    w: Work<'_, '_>,
    frames: crate::journal::FrameIter<'_>,
    prog: Progress,
) -> Result<(), FailbackError> {
    let budget = Budget::new(DECODED_BYTES_MAX);
    let Work {
        fb,
        replicas,
        undos,
        stamp,
        last_seq,
        applied_bytes,
        out,
        progress,
    } = w;
    std::thread::scope(|s| {
        let _close = ahead::CloseOnDrop(&budget);
        let budget = &budget;
        let ahead = ahead::start(s, frames, prog.total_frames, decode_threads(), budget)?;
        let (saved_tx, saved_rx) = sync_channel::<Batch>(0);
        let (written_tx, written_rx) = sync_channel::<Batch>(0);
        let (checked_tx, checked_rx) = channel::<()>();
        let (commit_tx, commit_rx) = channel::<Commit>();
        let (news_tx, news_rx) = channel::<News>();
        let applier_news = news_tx.clone();
        let checker_news = news_tx.clone();
        let applied_from = *applied_bytes;
        ahead::spawn(s, "failback-apply", move || {
            apply_batches(
                replicas,
                applied_from,
                saved_rx,
                checked_rx,
                written_tx,
                applier_news,
            )
        })?;
        ahead::spawn(s, "failback-check", move || {
            check_batches(
                replicas,
                written_rx,
                checked_tx,
                commit_tx,
                checker_news,
                budget,
            )
        })?;
        ahead::spawn(s, "failback-commit", move || {
            commit_batches(fb, replicas, stamp, commit_rx, news_tx)
        })?;
        let mut saver = Saver {
            fb,
            replicas,
            undos,
            saved: Some(saved_tx),
            news: news_rx,
            unstored: 0,
            applied_bytes,
            out,
            progress,
        };
        saver.run(ahead, last_seq, prog)
    })
}

/// The saver (the calling thread): batches collected, their old contents saved,
/// handed to the applier; the news of the other stages taken in.
struct Saver<'a, 'r> {
    fb: &'a Failback,
    replicas: &'a [ReplicaRef<'r>],
    undos: &'a mut [&'r mut UndoLog],
    /// `None` once every batch is handed over.
    saved: Option<SyncSender<Batch>>,
    news: Receiver<News>,
    /// Batches handed over and not yet recorded.
    unstored: usize,
    applied_bytes: &'a mut u64,
    out: &'a mut Outcome,
    progress: &'a mut dyn FnMut(&Progress),
}

impl Saver<'_, '_> {
    fn run(
        &mut self,
        mut frames: Ahead,
        last_seq: u64,
        mut prog: Progress,
    ) -> Result<(), FailbackError> {
        let mut batch = Batch::default();
        let (mut plain, mut count) = (0u64, 0usize);
        loop {
            let t0 = Instant::now();
            let Some(item) = frames.next() else { break };
            self.out.stages.frames_wait += t0.elapsed();
            let d = item?;
            prog.done_bytes += d.journal_bytes;
            prog.done_frames += 1;
            self.out.applied.frames += 1;
            self.out.applied.journal_bytes += d.journal_bytes;
            batch.held_bytes += d.held_bytes;
            count += 1;
            if let Some(df) = d.frame {
                if !self.replicas.iter().any(|r| r.disk.id == df.meta.disk) {
                    return Err(FailbackError::UnknownDisk {
                        group: self.fb.group.clone(),
                        seq: d.seq,
                        disk: df.meta.disk.clone(),
                    });
                }
                plain += df.plain_bytes();
                batch.frames.push(df);
            }
            if d.seq == last_seq
                || plain >= self.fb.batch_plain_bytes_max
                || count >= self.fb.batch_frames_max
            {
                batch.last_seq = d.seq;
                batch.prog = prog;
                self.save(std::mem::take(&mut batch))?;
                (plain, count) = (0, 0);
            }
            self.take_news(false)?;
        }
        // Every batch handed over: wait until the committer recorded the last one.
        self.saved = None;
        while self.unstored > 0 {
            self.take_news(true)?;
        }
        Ok(())
    }

    /// Saves the batch's old contents in the undo logs of the replicas it touches and
    /// hands it to the applier.
    fn save(&mut self, mut batch: Batch) -> Result<(), FailbackError> {
        let t0 = Instant::now();
        batch.touched = (0..self.replicas.len())
            .filter(|&i| {
                let id = &self.replicas[i].disk.id;
                batch.frames.iter().any(|df| &df.meta.disk == id)
            })
            .collect();
        for &i in &batch.touched {
            let r = &self.replicas[i];
            let exts = extents_of(&batch.frames, r.disk);
            self.undos[i]
                .save(r.file, r.disk.size_bytes, &exts)
                .map_err(|source| FailbackError::Apply {
                    disk: r.disk.id.clone(),
                    what: "save old contents",
                    source,
                })?;
        }
        self.out.stages.save += t0.elapsed();
        let t0 = Instant::now();
        let sent = self.saved.as_ref().is_some_and(|tx| tx.send(batch).is_ok());
        self.out.stages.hand_over += t0.elapsed();
        if !sent {
            // The applier stopped; it (or a stage after it) said why before it went.
            self.take_news(true)?;
            return Err(FailbackError::Stopped {
                what: "the failback applier",
            });
        }
        self.unstored += 1;
        if !self.fb.overlap {
            while self.unstored > 0 {
                self.take_news(true)?;
            }
        }
        Ok(())
    }

    /// Takes the news of the other stages: all there is, or (with `wait`) at least one.
    /// The committer ends only after the last batch is recorded: when the stages have
    /// gone with batches outstanding, they stopped early.
    fn take_news(&mut self, wait: bool) -> Result<(), FailbackError> {
        let mut wait = wait;
        loop {
            let next = if wait {
                wait = false;
                self.news.recv().map_err(|_| TryRecvError::Disconnected)
            } else {
                self.news.try_recv()
            };
            let n = match next {
                Ok(n) => n,
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Disconnected) if self.unstored == 0 => return Ok(()),
                Err(TryRecvError::Disconnected) => {
                    return Err(FailbackError::Stopped {
                        what: "the failback's applier, checker and committer",
                    });
                }
            };
            match n {
                News::Written(st, wait, write) => {
                    self.out.stages.check_wait += wait;
                    self.out.stages.write += write;
                    self.out.applied.extents += st.extents;
                    self.out.applied.data_bytes += st.data_bytes;
                    self.out.applied.zero_bytes += st.zero_bytes;
                    *self.applied_bytes += st.data_bytes + st.zero_bytes;
                }
                News::Checked(verified, took) => {
                    self.out.applied.verified_bytes += verified;
                    self.out.stages.check += took;
                }
                News::Stored(batches, p, took) => {
                    self.out.stages.commit += took;
                    self.unstored -= batches;
                    (self.progress)(&p);
                }
                News::Failed(e) => return Err(e),
            }
        }
    }
}

/// The extents `frames` write to `disk`, in order.
fn extents_of<'f>(frames: &'f [DataFrame], disk: &Disk) -> Vec<(u64, ExtentData<'f>)> {
    frames
        .iter()
        .filter(|df| df.meta.disk == disk.id)
        .flat_map(|df| df.extents())
        .collect()
}

/// The applier: each saved batch written once the batch before it is checked.
fn apply_batches(
    replicas: &[ReplicaRef<'_>],
    mut applied_bytes: u64,
    saved: Receiver<Batch>,
    checked: Receiver<()>,
    written: SyncSender<Batch>,
    news: Sender<News>,
) {
    let mut unchecked = 0usize;
    for mut batch in saved {
        let t0 = Instant::now();
        // The checker re-reads the batch before: none of it may be overwritten first.
        while unchecked > 0 {
            if checked.recv().is_err() {
                // The checker stopped; it said why.
                return;
            }
            unchecked -= 1;
        }
        let wait = t0.elapsed();
        let t0 = Instant::now();
        let mut stats = apply::ApplyStats::default();
        for &i in &batch.touched {
            let r = &replicas[i];
            let exts = extents_of(&batch.frames, r.disk);
            match apply::write_extents(r.file, r.disk.size_bytes, &exts) {
                Ok(st) => {
                    stats.extents += st.extents;
                    stats.data_bytes += st.data_bytes;
                    stats.zero_bytes += st.zero_bytes;
                }
                Err(source) => {
                    let _ = news.send(News::Failed(FailbackError::Apply {
                        disk: r.disk.id.clone(),
                        what: "apply",
                        source,
                    }));
                    return;
                }
            }
        }
        let write = t0.elapsed();
        applied_bytes += stats.data_bytes + stats.zero_bytes;
        batch.applied_bytes = applied_bytes;
        if news.send(News::Written(stats, wait, write)).is_err() || written.send(batch).is_err() {
            return;
        }
        unchecked += 1;
    }
}

/// The checker: per batch, every extent re-read and checked (from the page cache: the
/// bytes are the same before and after the sync), the frames released, the applier
/// told, then the batch passed to the committer.
fn check_batches(
    replicas: &[ReplicaRef<'_>],
    written: Receiver<Batch>,
    checked: Sender<()>,
    commit: Sender<Commit>,
    news: Sender<News>,
    budget: &Budget,
) {
    for batch in written {
        let t0 = Instant::now();
        let mut verified = 0;
        for &i in &batch.touched {
            match verify(&replicas[i], &batch.frames) {
                Ok(n) => verified += n,
                Err(e) => {
                    let _ = news.send(News::Failed(e));
                    return;
                }
            }
        }
        let took = t0.elapsed();
        budget.release(batch.held_bytes, batch.frames);
        // The applier is gone once it wrote the last batch: nobody waits any more.
        let _ = checked.send(());
        let c = Commit {
            touched: batch.touched,
            last_seq: batch.last_seq,
            applied_bytes: batch.applied_bytes,
            prog: batch.prog,
        };
        if news.send(News::Checked(verified, took)).is_err() || commit.send(c).is_err() {
            return;
        }
    }
}

/// A checked batch, for the committer.
struct Commit {
    touched: Vec<usize>,
    last_seq: u64,
    applied_bytes: u64,
    prog: Progress,
}

/// The committer: every replica the checked batches wrote synced, then the progress
/// through the newest of them recorded (`applied_seq` = its last frame). When several
/// batches were checked meanwhile, one sync per replica and one record cover them all.
fn commit_batches(
    fb: &Failback,
    replicas: &[ReplicaRef<'_>],
    stamp: FailbackState,
    commits: Receiver<Commit>,
    news: Sender<News>,
) {
    while let Ok(first) = commits.recv() {
        let t0 = Instant::now();
        let mut touched = vec![false; replicas.len()];
        let mut batches = 0;
        let mut newest = first;
        loop {
            batches += 1;
            for &i in &newest.touched {
                touched[i] = true;
            }
            match commits.try_recv() {
                Ok(c) => newest = c,
                Err(_) => break,
            }
        }
        let r = (|| {
            for (i, r) in replicas.iter().enumerate().filter(|&(i, _)| touched[i]) {
                apply::sync_target(r.file).map_err(|source| FailbackError::Apply {
                    disk: replicas[i].disk.id.clone(),
                    what: "sync replica",
                    source,
                })?;
                // Synced and checked: the replica's pages need not stay in the cache
                // (a hint; dirty pages of later batches stay, their writeback starts).
                // Kept, a failback of gigabytes grows the cache by every byte written
                // and each new write lands in memory the kernel must find anew:
                // `bench --only failback` (4 GiB) applied 381-403 MB/s with the pages
                // kept and 665-784 MB/s with them dropped.
                let _ = r.file.drop_cached(0, 0);
            }
            // Progress only after the replicas are synced and checked.
            fb.store(&FailbackState {
                applied_seq: newest.last_seq,
                applied_bytes: newest.applied_bytes,
                ..stamp
            })
        })();
        let n = match r {
            Ok(()) => News::Stored(batches, newest.prog, t0.elapsed()),
            Err(e) => News::Failed(e),
        };
        if news.send(n).is_err() {
            return;
        }
    }
}

/// Threads decoding frames ahead of the saver: one per core, at most
/// [`DECODE_THREADS_MAX`].
fn decode_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, DECODE_THREADS_MAX)
}

/// Re-reads every extent the batch applied to `t`'s replica (see the module doc's
/// checks); returns the bytes read.
fn verify(t: &ReplicaRef<'_>, batch: &[DataFrame]) -> Result<u64, FailbackError> {
    let mut covered = RangeSet::new();
    let mut read = 0u64;
    // Grown, never shrunk: no bytes are zeroed again for every extent.
    let mut buf: Vec<u8> = Vec::new();
    fn room(buf: &mut Vec<u8>, n: usize) -> &mut [u8] {
        if buf.len() < n {
            buf.resize(n, 0);
        }
        &mut buf[..n]
    }
    let fail = |seq: u64, offset: u64, len: u64, why: &'static str| FailbackError::Verify {
        disk: t.disk.id.clone(),
        path: t.disk.replica.clone(),
        offset,
        len,
        seq,
        why,
    };
    let io_fail = |e: io::Error| FailbackError::Io {
        what: "re-read replica",
        path: t.disk.replica.clone(),
        source: e,
    };
    for df in batch.iter().rev().filter(|df| df.meta.disk == t.disk.id) {
        let exts: Vec<_> = df.entries().iter().zip(df.extents()).collect();
        for (entry, (offset, data)) in exts.into_iter().rev() {
            let end = offset + data.len();
            let parts = covered.uncovered(offset, end);
            let whole = parts.len() == 1 && parts[0] == (offset, end);
            if whole && let ExtentData::Bytes(b) = data {
                let buf = room(&mut buf, b.len());
                t.file.read_exact_at(buf, offset).map_err(io_fail)?;
                read += b.len() as u64;
                if *blake3::hash(buf).as_bytes() != entry.hash {
                    return Err(fail(df.seq, offset, data.len(), "blake3 mismatch"));
                }
            } else {
                for (s, e) in parts {
                    let mut at = s;
                    while at < e {
                        let n = (e - at).min(VERIFY_CHUNK_BYTES as u64) as usize;
                        let buf = room(&mut buf, n);
                        t.file.read_exact_at(buf, at).map_err(io_fail)?;
                        read += n as u64;
                        let ok = match data {
                            ExtentData::Bytes(b) => {
                                let from = (at - offset) as usize;
                                buf[..] == b[from..from + n]
                            }
                            ExtentData::Zero(_) => buf.iter().all(|&x| x == 0),
                        };
                        if !ok {
                            return Err(fail(df.seq, at, n as u64, "bytes differ"));
                        }
                        at += n as u64;
                    }
                }
            }
            covered.insert(offset, end);
        }
    }
    Ok(read)
}
