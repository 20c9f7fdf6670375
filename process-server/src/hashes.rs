//! Hash requests to the master target (protocol 3), for the hash-diff resync
//! ([`crate::resync`]) and the online verify ([`crate::verify`]).
//!
//! The shipper owns the connection. When a session negotiated protocol 3 or later it
//! attaches to the [`HashBroker`] with the channel its sender writes control frames
//! from (between two data frames, like cut answers); its ack reader hands every hash
//! list it reads to [`HashBroker::deliver`]. Any thread may then [`HashBroker::ask`]
//! for the hashes of a range of blocks and [`HashBroker::wait`] for the answer. When
//! the session ends, every request still waiting fails with
//! [`Unavailable::Disconnected`]; nothing is resent by the broker (a caller asks again,
//! or does without).
//!
//! An answer must match its request (group, disk, first block, block size, and as many
//! hashes as blocks asked for); anything else is a protocol error that ends the
//! session, never a panic. Memory: one entry per request waiting, bounded by what the
//! callers keep in flight ([`Prefetch`] keeps [`HASH_REQUESTS_AHEAD`] of
//! [`HASH_REQUEST_BLOCKS`] blocks).
//!
//! [`Prefetch`] walks one disk forward and keeps the requests for the blocks ahead of
//! the reader in flight, so the master target hashes while the process server reads.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use datapath::frame::{
    self, HASH_PROTOCOL_VERSION, HashListFrame, HashOf, HashRequest, HashStatus,
};
use datapath::hashing::{self, BlockHash, HASH_BLOCK_BYTES};
use tokio::sync::mpsc;

/// Blocks one hash request asks for: 16 MiB of disk, 8 KiB of hashes.
pub const HASH_REQUEST_BLOCKS: u32 = 256;
/// Requests a [`Prefetch`] keeps in flight ahead of the reader (64 MiB of disk).
pub const HASH_REQUESTS_AHEAD: usize = 4;
/// An answer that takes longer than this counts as lost.
pub const HASH_ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// Why no hashes came.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unavailable {
    /// No session with the master target now.
    NotConnected,
    /// The session speaks a protocol without hash requests.
    OldProtocol(u16),
    /// The session ended before the answer came.
    Disconnected,
    /// No answer within [`HASH_ANSWER_TIMEOUT`].
    Timeout,
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unavailable::NotConnected => write!(f, "not connected to the master target"),
            Unavailable::OldProtocol(p) => write!(
                f,
                "the master target speaks protocol {p}, without hash requests (needs \
                 {HASH_PROTOCOL_VERSION})"
            ),
            Unavailable::Disconnected => write!(f, "the connection ended before the answer"),
            Unavailable::Timeout => write!(
                f,
                "no answer from the master target within {} s",
                HASH_ANSWER_TIMEOUT.as_secs()
            ),
        }
    }
}

struct Session {
    generation: u64,
    protocol: u16,
    /// Encoded control frames for the session's sender.
    tx: mpsc::UnboundedSender<Vec<u8>>,
}

struct Waiting {
    generation: u64,
    req: HashRequest,
    answer: Option<Result<HashListFrame, Unavailable>>,
}

#[derive(Default)]
struct Inner {
    session: Option<Session>,
    generations: u64,
    next_id: u64,
    waiting: HashMap<u64, Waiting>,
}

/// The hash requests of every group of one process server. See the module doc.
#[derive(Default)]
pub struct HashBroker {
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl HashBroker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A session negotiated `protocol`; its sender writes what goes to `tx`. Returns
    /// the session's generation, for [`HashBroker::detach`].
    pub fn attach(&self, protocol: u16, tx: mpsc::UnboundedSender<Vec<u8>>) -> u64 {
        let mut g = self.lock();
        g.generations += 1;
        let generation = g.generations;
        g.session = Some(Session {
            generation,
            protocol,
            tx,
        });
        drop(g);
        self.changed.notify_all();
        generation
    }

    /// The session of `generation` ended: its requests fail.
    pub fn detach(&self, generation: u64) {
        let mut g = self.lock();
        if g.session
            .as_ref()
            .is_some_and(|s| s.generation == generation)
        {
            g.session = None;
        }
        for w in g.waiting.values_mut() {
            if w.generation == generation && w.answer.is_none() {
                w.answer = Some(Err(Unavailable::Disconnected));
            }
        }
        drop(g);
        self.changed.notify_all();
    }

    /// The protocol of the session now, `None` when not connected.
    pub fn protocol(&self) -> Option<u16> {
        self.lock().session.as_ref().map(|s| s.protocol)
    }

    /// Sends a request for `count` blocks of `disk` from `first_block`; returns its id.
    pub fn ask(
        &self,
        group: &str,
        disk: &str,
        of: HashOf,
        first_block: u64,
        count: u32,
    ) -> Result<u64, Unavailable> {
        let mut g = self.lock();
        let Some(s) = g.session.as_ref() else {
            return Err(Unavailable::NotConnected);
        };
        if s.protocol < HASH_PROTOCOL_VERSION {
            return Err(Unavailable::OldProtocol(s.protocol));
        }
        let generation = s.generation;
        let tx = s.tx.clone();
        g.next_id += 1;
        let id = g.next_id;
        let req = HashRequest {
            request_id: id,
            group: group.to_string(),
            disk: disk.to_string(),
            block_size_bytes: HASH_BLOCK_BYTES as u32,
            first_block,
            count,
            of,
        };
        let mut out = Vec::new();
        // Ids, counts and ranges come from our own config and disks: a refusal here is
        // a caller bug, reported as a lost answer rather than a panic.
        if frame::encode_hash_request(&req, &mut out).is_err() || tx.send(out).is_err() {
            return Err(Unavailable::Disconnected);
        }
        g.waiting.insert(
            id,
            Waiting {
                generation,
                req,
                answer: None,
            },
        );
        Ok(id)
    }

    /// Waits for the answer to request `id` (at most [`HASH_ANSWER_TIMEOUT`]); the
    /// request is forgotten either way.
    pub fn wait(&self, id: u64) -> Result<HashListFrame, Unavailable> {
        let deadline = Instant::now() + HASH_ANSWER_TIMEOUT;
        let mut g = self.lock();
        loop {
            match g.waiting.get_mut(&id) {
                None => return Err(Unavailable::Disconnected),
                Some(w) => {
                    if let Some(a) = w.answer.take() {
                        g.waiting.remove(&id);
                        return a;
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                g.waiting.remove(&id);
                return Err(Unavailable::Timeout);
            }
            g = self
                .changed
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Forgets request `id` (its answer, when it comes, is dropped).
    pub fn cancel(&self, id: u64) {
        self.lock().waiting.remove(&id);
    }

    /// A hash list from the master target. An answer to a request that was cancelled
    /// is dropped; one that does not match its request is an error (the session ends).
    pub fn deliver(&self, l: HashListFrame) -> Result<(), String> {
        let mut g = self.lock();
        let Some(w) = g.waiting.get_mut(&l.request_id) else {
            return Ok(());
        };
        let q = &w.req;
        let wrong = if l.group != q.group || l.disk != q.disk {
            Some(format!("names {}/{}", l.group, l.disk))
        } else if l.first_block != q.first_block || l.block_size_bytes != q.block_size_bytes {
            Some(format!(
                "starts at block {} of {} bytes",
                l.first_block, l.block_size_bytes
            ))
        } else if l.status == HashStatus::Hashes && l.hashes.len() != q.count as usize {
            Some(format!("carries {} hashes", l.hashes.len()))
        } else {
            None
        };
        if let Some(why) = wrong {
            return Err(format!(
                "the hash list answering request {} (blocks {}+{} of {}/{}) {why}",
                q.request_id, q.first_block, q.count, q.group, q.disk
            ));
        }
        w.answer = Some(Ok(l));
        drop(g);
        self.changed.notify_all();
        Ok(())
    }
}

/// What [`Prefetch::get`] found for a range of blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fetched {
    /// One hash per block asked for.
    Hashes(Vec<BlockHash>),
    /// The master target has no copy of the disk: send it in full.
    NoCopy,
    /// The master target could not hash (its log says why) or has no such state.
    Refused(HashStatus),
}

/// One range asked for, and its answer once it came.
struct Range {
    first: u64,
    count: u32,
    id: u64,
    answer: Option<Result<Vec<BlockHash>, Fetched>>,
}

/// Ascending, without repeats: the points the answers so far were hashed at.
pub type Points = Vec<u64>;

/// The hashes of one disk, fetched ahead of a reader that walks it forward. See the
/// module doc.
pub struct Prefetch {
    group: String,
    disk: String,
    of: HashOf,
    disk_blocks: u64,
    /// The next block to ask for.
    next: u64,
    ranges: VecDeque<Range>,
    /// The points the answers named (0: the latest state or the replica).
    points: Points,
}

impl Prefetch {
    pub fn new(group: &str, disk: &str, disk_bytes: u64, of: HashOf) -> Self {
        Self {
            group: group.to_string(),
            disk: disk.to_string(),
            of,
            disk_blocks: hashing::disk_blocks(disk_bytes),
            next: 0,
            ranges: VecDeque::new(),
            points: Points::new(),
        }
    }

    /// The points the answers so far were hashed at.
    pub fn points(&self) -> &Points {
        &self.points
    }

    /// The disk this prefetch walks.
    pub fn disk(&self) -> &str {
        &self.disk
    }

    /// Asks for at most one request's worth of `want` blocks from `from` (= `next`),
    /// and moves `next` past them; on an error, forgets everything (the reader is at
    /// `reader`).
    fn ask(
        &mut self,
        broker: &HashBroker,
        from: u64,
        want: u64,
        reader: u64,
    ) -> Result<(), Unavailable> {
        let n = want
            .min(HASH_REQUEST_BLOCKS.into())
            .min(self.disk_blocks - from)
            .max(1) as u32;
        match broker.ask(&self.group, &self.disk, self.of, from, n) {
            Ok(id) => {
                self.ranges.push_back(Range {
                    first: from,
                    count: n,
                    id,
                    answer: None,
                });
                self.next = from + u64::from(n);
                Ok(())
            }
            Err(e) => {
                self.reset(broker, reader);
                Err(e)
            }
        }
    }

    /// Forgets every request in flight.
    pub fn reset(&mut self, broker: &HashBroker, next: u64) {
        for r in self.ranges.drain(..) {
            if r.answer.is_none() {
                broker.cancel(r.id);
            }
        }
        self.next = next.min(self.disk_blocks);
    }

    /// The hashes of blocks `first..first + count` (inside the disk), asking ahead for
    /// the blocks after them: a reader that walks the whole disk.
    pub fn get(
        &mut self,
        broker: &HashBroker,
        first: u64,
        count: u64,
    ) -> Result<Fetched, Unavailable> {
        let blocks = self.disk_blocks;
        self.get_planned(broker, first, count, &mut |from| {
            (from < blocks).then_some((from, blocks - from))
        })
    }

    /// [`Prefetch::get`] for a reader that reads only some ranges (the dirty blocks of
    /// an initial sync from change lists): `plan(b)` names the next run of blocks it
    /// will read at or after block `b` (first block, count), `None` when nothing
    /// follows; only those are asked ahead, so the master target hashes no block the
    /// reader skips. The plan is a hint: blocks asked for that the plan missed are
    /// fetched anyway.
    pub fn get_planned(
        &mut self,
        broker: &HashBroker,
        first: u64,
        count: u64,
        plan: &mut dyn FnMut(u64) -> Option<(u64, u64)>,
    ) -> Result<Fetched, Unavailable> {
        let end = first.saturating_add(count).min(self.disk_blocks);
        // Ranges wholly behind the reader are done with.
        while self
            .ranges
            .front()
            .is_some_and(|r| r.first + u64::from(r.count) <= first)
        {
            if let Some(r) = self.ranges.pop_front()
                && r.answer.is_none()
            {
                broker.cancel(r.id);
            }
        }
        // What is asked already covers `first` onwards up to `covered`; a gap before
        // `end` that is not simply the end of what was asked means a jump: start over.
        let mut covered = first;
        for r in &self.ranges {
            if r.first > covered {
                break;
            }
            covered = covered.max(r.first + u64::from(r.count));
        }
        if covered < end && covered != self.next {
            self.reset(broker, first);
        }
        // The blocks the reader needs now, as far as its planned run goes.
        while self.next < end {
            let want = match plan(self.next) {
                Some((s, len)) if s == self.next => len.max(end - self.next),
                _ => end - self.next,
            };
            self.ask(broker, self.next, want, first)?;
        }
        // Keep the window ahead full, along the plan.
        while self.ranges.len() < HASH_REQUESTS_AHEAD && self.next < self.disk_blocks {
            let Some((s, len)) = plan(self.next) else {
                break;
            };
            let s_end = s.saturating_add(len).min(self.disk_blocks);
            let s = s.max(self.next);
            if s >= s_end {
                break;
            }
            self.next = s;
            self.ask(broker, s, s_end - s, first)?;
        }
        // The ranges cover `first..end` without a gap (the ones after `end` may have
        // gaps, and are not looked at).
        let mut out = Vec::with_capacity((end - first) as usize);
        for k in 0..self.ranges.len() {
            let r = &mut self.ranges[k];
            if r.first >= end {
                break;
            }
            if r.answer.is_none() {
                match broker.wait(r.id) {
                    Ok(l) => {
                        if let Err(at) = self.points.binary_search(&l.point_id) {
                            self.points.insert(at, l.point_id);
                        }
                        r.answer = Some(match l.status {
                            HashStatus::Hashes => Ok(l.hashes),
                            HashStatus::NoCopy => Err(Fetched::NoCopy),
                            st => Err(Fetched::Refused(st)),
                        })
                    }
                    Err(e) => {
                        self.reset(broker, first);
                        return Err(e);
                    }
                }
            }
            match &r.answer {
                Some(Ok(hashes)) => {
                    let from = first.max(r.first);
                    let to = end.min(r.first + u64::from(r.count));
                    // The broker checked that an answer holds one hash per block.
                    let slice = hashes.get((from - r.first) as usize..(to - r.first) as usize);
                    match slice {
                        Some(h) => out.extend_from_slice(h),
                        None => return Ok(Fetched::Refused(HashStatus::Failed)),
                    }
                }
                Some(Err(f)) => return Ok(f.clone()),
                None => return Ok(Fetched::Refused(HashStatus::Failed)),
            }
        }
        Ok(Fetched::Hashes(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(req: &HashRequest, status: HashStatus) -> HashListFrame {
        HashListFrame {
            request_id: req.request_id,
            group: req.group.clone(),
            disk: req.disk.clone(),
            block_size_bytes: req.block_size_bytes,
            first_block: req.first_block,
            point_id: 0,
            status,
            hashes: if status == HashStatus::Hashes {
                (0..req.count as u64)
                    .map(|i| {
                        let mut h = [0u8; 32];
                        h[..8].copy_from_slice(&(req.first_block + i).to_le_bytes());
                        h
                    })
                    .collect()
            } else {
                Vec::new()
            },
        }
    }

    /// A fake master target: answers every request on `rx` through the broker.
    fn serve(
        broker: std::sync::Arc<HashBroker>,
        mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
        no_copy_from: u64,
    ) -> std::thread::JoinHandle<Vec<HashRequest>> {
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while let Some(f) = rx.blocking_recv() {
                let q = frame::decode_hash_request(&f).unwrap();
                let status = if q.first_block >= no_copy_from {
                    HashStatus::NoCopy
                } else {
                    HashStatus::Hashes
                };
                broker.deliver(answer(&q, status)).unwrap();
                seen.push(q);
            }
            seen
        })
    }

    /// Proves a prefetch returns each block's own hash across request boundaries,
    /// asks ahead in order without asking twice, starts over after a jump, and passes
    /// a "no copy" answer on.
    #[test]
    fn prefetch_walks_a_disk() {
        let broker = std::sync::Arc::new(HashBroker::default());
        assert_eq!(
            broker.ask("g1", "d0", HashOf::Latest, 0, 1),
            Err(Unavailable::NotConnected)
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let gen_ = broker.attach(HASH_PROTOCOL_VERSION, tx);
        let fake = serve(broker.clone(), rx, 2000);
        let disk_bytes = 2100 * HASH_BLOCK_BYTES;
        let mut p = Prefetch::new("g1", "d0", disk_bytes, HashOf::Latest);
        let mut at = 0u64;
        while at < 600 {
            // Chunks of 16 blocks, one straddling two requests (256 blocks each).
            let Fetched::Hashes(h) = p.get(&broker, at, 16).unwrap() else {
                panic!("no hashes at {at}");
            };
            assert_eq!(h.len(), 16);
            for (i, x) in h.iter().enumerate() {
                assert_eq!(
                    u64::from_le_bytes(x[..8].try_into().unwrap()),
                    at + i as u64
                );
            }
            at += 16;
        }
        // A jump ahead, then past the end of the copy.
        let Fetched::Hashes(h) = p.get(&broker, 1800, 3).unwrap() else {
            panic!();
        };
        assert_eq!(u64::from_le_bytes(h[2][..8].try_into().unwrap()), 1802);
        assert_eq!(p.get(&broker, 2050, 16).unwrap(), Fetched::NoCopy);
        p.reset(&broker, 0);
        // The fake ends when the detached session's sender is gone.
        broker.detach(gen_);
        assert_eq!(p.get(&broker, 0, 1), Err(Unavailable::NotConnected));
        let seen = fake.join().unwrap();
        let firsts: Vec<u64> = seen.iter().map(|q| q.first_block).collect();
        assert_eq!(&firsts[..4], &[0, 256, 512, 768]);
        assert!(firsts.contains(&1800), "{firsts:?}");
    }

    /// Proves a planned prefetch asks only for the runs the plan names (so the master
    /// target hashes nothing else), ahead of the reader, with each block's own hash;
    /// and that a read the plan missed is fetched anyway.
    #[test]
    fn planned_prefetch_asks_only_the_plan() {
        let broker = std::sync::Arc::new(HashBroker::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let gen_ = broker.attach(HASH_PROTOCOL_VERSION, tx);
        let fake = serve(broker.clone(), rx, u64::MAX);
        let runs = [(10u64, 20u64), (500, 300), (1500, 1)];
        let mut plan = |from: u64| {
            runs.iter().find(|(s, n)| s + n > from).map(|&(s, n)| {
                if s < from {
                    (from, n - (from - s))
                } else {
                    (s, n)
                }
            })
        };
        let mut p = Prefetch::new("g1", "d0", 2100 * HASH_BLOCK_BYTES, HashOf::Latest);
        let check = |f: Fetched, at: u64, n: usize| {
            let Fetched::Hashes(h) = f else {
                panic!("no hashes at {at}")
            };
            assert_eq!(h.len(), n);
            for (i, x) in h.iter().enumerate() {
                assert_eq!(
                    u64::from_le_bytes(x[..8].try_into().unwrap()),
                    at + i as u64
                );
            }
        };
        check(p.get_planned(&broker, 10, 16, &mut plan).unwrap(), 10, 16);
        check(p.get_planned(&broker, 26, 4, &mut plan).unwrap(), 26, 4);
        for at in (500..800).step_by(16) {
            let n = 16.min(800 - at);
            check(
                p.get_planned(&broker, at, n, &mut plan).unwrap(),
                at,
                n as usize,
            );
        }
        check(p.get_planned(&broker, 1500, 1, &mut plan).unwrap(), 1500, 1);
        // Off the plan.
        check(p.get_planned(&broker, 2000, 2, &mut plan).unwrap(), 2000, 2);
        p.reset(&broker, 0);
        broker.detach(gen_);
        let seen = fake.join().unwrap();
        let asked: Vec<(u64, u32)> = seen.iter().map(|q| (q.first_block, q.count)).collect();
        assert_eq!(
            asked,
            [(10, 20), (500, 256), (756, 44), (1500, 1), (2000, 2)],
            "only the planned runs, in requests of at most 256 blocks"
        );
    }

    /// Proves an answer that does not match its request is refused, an unknown one is
    /// dropped, and a detach fails the requests still waiting.
    #[test]
    fn answers_are_checked() {
        let broker = HashBroker::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let g = broker.attach(HASH_PROTOCOL_VERSION, tx);
        let id = broker.ask("g1", "d0", HashOf::Latest, 4, 2).unwrap();
        let q = frame::decode_hash_request(&rx.try_recv().unwrap()).unwrap();
        let mut a = answer(&q, HashStatus::Hashes);
        a.hashes.pop();
        assert!(broker.deliver(a).is_err());
        let mut a = answer(&q, HashStatus::Hashes);
        a.disk = "d1".into();
        assert!(broker.deliver(a).is_err());
        let mut a = answer(&q, HashStatus::Hashes);
        a.request_id = 999;
        assert!(broker.deliver(a).is_ok());
        broker.detach(g);
        assert_eq!(broker.wait(id), Err(Unavailable::Disconnected));
        let (tx, _rx) = mpsc::unbounded_channel();
        broker.attach(2, tx);
        assert_eq!(
            broker.ask("g1", "d0", HashOf::Latest, 0, 1),
            Err(Unavailable::OldProtocol(2))
        );
    }
}
