//! Journal frames read and decoded ahead of the failback's writer, on threads, in
//! journal order.
//!
//! One reader thread reads the frames in order ([`Journal::read`] checks each crc) and
//! hands them round-robin to the decoder threads (zstd, then the blake3 of every
//! extent: [`Decoder::decode_data`]); [`Ahead`] takes the results back in the same
//! round-robin order, so the writer sees every frame in journal order whichever thread
//! decoded it, and an error at the frame where it happened. Nothing here writes.
//!
//! **Memory.** A [`Budget`] counts the plain bytes of every data frame from the moment
//! the reader takes it until the failback is done with it (its batch written, synced
//! and checked: [`Budget::release`]). The reader takes frames in order and waits while
//! the next one would pass the bound (unless nothing is held: one frame always fits),
//! so the frames held are always the writer's current batches plus the frames right
//! after them, never a later frame that keeps an earlier one out. Buffers of released
//! frames are kept for the decoders to reuse (no fresh pages to fault in and zero for
//! every frame), counted in the same bound and dropped first when a frame needs room.

use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::Scope;

use super::FailbackError;
use crate::frame::{self, DataFrame, Decoder, FrameKind, MAX_PLAIN_BYTES};
use crate::journal::FrameIter;

/// A frame read from the journal, crc checked, with the budget bytes held for it.
type Raw = Result<(frame::FrameHeader, Vec<u8>, u64), FailbackError>;

/// A frame as the writer gets it.
pub(super) struct Decoded {
    pub seq: u64,
    /// Its size in the journal.
    pub journal_bytes: u64,
    /// The decoded data frame; `None` for a point frame.
    pub frame: Option<DataFrame>,
    /// Budget bytes held for it, to [`Budget::release`] when its batch is done.
    pub held_bytes: u64,
}

/// The bound on decoded bytes in memory, shared by the reader, the decoders and the
/// failback's writer and checker.
pub(super) struct Budget {
    max_bytes: u64,
    state: Mutex<BudgetState>,
    changed: Condvar,
}

#[derive(Default)]
struct BudgetState {
    /// Plain bytes of the frames held.
    held_bytes: u64,
    /// Buffers of released frames, for the decoders to reuse, and their capacity.
    spare: Vec<DataFrame>,
    spare_bytes: u64,
    /// The writer stopped: nobody releases any more, waiting is pointless.
    closed: bool,
}

impl Budget {
    pub fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            state: Mutex::new(BudgetState::default()),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BudgetState> {
        // A thread that panicked while holding the lock left counts that are still
        // whole (every update is a single statement); the panic itself ends the scope.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `n` more bytes fit, dropping spare buffers first; false once closed.
    fn acquire(&self, n: u64) -> bool {
        let mut s = self.lock();
        loop {
            if s.closed {
                return false;
            }
            if s.held_bytes == 0 || s.held_bytes + s.spare_bytes + n <= self.max_bytes {
                s.held_bytes += n;
                return true;
            }
            if let Some(df) = s.spare.pop() {
                s.spare_bytes -= df.capacity_bytes();
                continue;
            }
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Gives back `n` held bytes; the buffers of `frames` are kept for reuse while
    /// they fit in the bound.
    pub fn release(&self, n: u64, frames: impl IntoIterator<Item = DataFrame>) {
        let mut s = self.lock();
        s.held_bytes -= n.min(s.held_bytes);
        for df in frames {
            let cap = df.capacity_bytes();
            if s.held_bytes + s.spare_bytes + cap <= self.max_bytes {
                s.spare_bytes += cap;
                s.spare.push(df);
            }
        }
        drop(s);
        self.changed.notify_all();
    }

    /// A released frame whose buffer a decoder may reuse.
    fn spare(&self) -> Option<DataFrame> {
        let mut s = self.lock();
        let df = s.spare.pop()?;
        s.spare_bytes -= df.capacity_bytes();
        Some(df)
    }

    /// Stops every wait: the writer has stopped (done or failed).
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }
}

/// Closes the budget when dropped, so that no reader waits for a release that will
/// never come, whichever way the writer leaves.
pub(super) struct CloseOnDrop<'a>(pub &'a Budget);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// A frame's bytes that go back to the reader when the decoder is done with them.
struct Recycle<'a>(Vec<u8>, &'a SyncSender<Vec<u8>>);

impl Drop for Recycle<'_> {
    fn drop(&mut self) {
        // A full channel: the reader has enough; this one is freed.
        let _ = self.1.try_send(std::mem::take(&mut self.0));
    }
}

impl std::ops::Deref for Recycle<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// The decoded frames in journal order; see the module doc.
pub(super) struct Ahead {
    outs: Vec<Receiver<Result<Decoded, FailbackError>>>,
    next: u64,
    count: u64,
}

impl Iterator for Ahead {
    type Item = Result<Decoded, FailbackError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next == self.count {
            return None;
        }
        let i = (self.next % self.outs.len() as u64) as usize;
        self.next += 1;
        // A decoder ends early only when its input ended early: the reader stopped (the
        // budget closed) or a thread panicked. Never report a short stream as the end.
        Some(self.outs[i].recv().unwrap_or(Err(FailbackError::Stopped {
            what: "the journal reader or a frame decoder",
        })))
    }
}

/// Starts the reader and `threads` decoders in `s` over `frames` (`count` of them).
pub(super) fn start<'scope, 'env>(
    s: &'scope Scope<'scope, 'env>,
    frames: FrameIter<'env>,
    count: u64,
    threads: usize,
    budget: &'env Budget,
) -> Result<Ahead, FailbackError> {
    let threads = threads.max(1);
    let mut ins: Vec<SyncSender<Raw>> = Vec::with_capacity(threads);
    let mut outs = Vec::with_capacity(threads);
    // Frame buffers the decoders are done with, back to the reader (a few: the rest
    // are freed).
    let (spare_tx, spare_rx) = sync_channel::<Vec<u8>>(2 * threads);
    for _ in 0..threads {
        // One raw frame waits per decoder. The decoded ones need no bound of their own:
        // the budget bounds the data frames, and a point frame or an error is small.
        let (in_tx, in_rx) = sync_channel::<Raw>(1);
        let (out_tx, out_rx) = channel();
        ins.push(in_tx);
        outs.push(out_rx);
        let spare = spare_tx.clone();
        spawn(s, "failback-decode", move || {
            decode_loop(in_rx, out_tx, spare, budget)
        })?;
    }
    drop(spare_tx);
    spawn(s, "failback-read", move || {
        read_loop(frames, ins, spare_rx, budget)
    })?;
    Ok(Ahead {
        outs,
        next: 0,
        count,
    })
}

/// Starts a named thread in `s` (the name shows in `top -H` and in profiles).
pub(super) fn spawn<'scope>(
    s: &'scope Scope<'scope, '_>,
    name: &'static str,
    f: impl FnOnce() + Send + 'scope,
) -> Result<(), FailbackError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn_scoped(s, f)
        .map(drop)
        .map_err(|source| FailbackError::Thread { name, source })
}

/// The reader: frames in order, round-robin to the decoders, each within the budget;
/// read into buffers the decoders hand back.
fn read_loop(
    mut frames: FrameIter<'_>,
    ins: Vec<SyncSender<Raw>>,
    spare: Receiver<Vec<u8>>,
    budget: &Budget,
) {
    for i in 0.. {
        let mut bytes = spare.try_recv().unwrap_or_default();
        let Some(item) = frames.next_into(&mut bytes) else {
            return;
        };
        let raw = match item {
            Ok(h) => {
                // The declared plain size (the crc checked; the decoder checks the
                // data against it), only to count the frame against the bound.
                let n = match h.kind {
                    FrameKind::Data => frame::encoded_plain_bytes(&bytes)
                        .map_or(0, |n| u64::from(n.min(MAX_PLAIN_BYTES))),
                    _ => 0,
                };
                if !budget.acquire(n) {
                    return;
                }
                Ok((h, bytes, n))
            }
            // The iterator ends after an error; the decoder passes it on in order.
            Err(e) => Err(e.into()),
        };
        if ins[i % ins.len()].send(raw).is_err() {
            return;
        }
    }
}

/// A decoder: each frame decoded with every extent's blake3 checked, or its error.
fn decode_loop(
    input: Receiver<Raw>,
    out: Sender<Result<Decoded, FailbackError>>,
    spare: SyncSender<Vec<u8>>,
    budget: &Budget,
) {
    let mut dec = Decoder::new();
    for raw in input {
        let decoded = raw.and_then(|(h, bytes, held_bytes)| {
            let bytes = Recycle(bytes, &spare);
            let journal_bytes = bytes.len() as u64;
            let frame = match h.kind {
                FrameKind::Data => {
                    if let Some(df) = budget.spare() {
                        dec.recycle(df);
                    }
                    match dec.decode_data(&bytes) {
                        Ok(df) => Some(df),
                        Err(source) => {
                            budget.release(held_bytes, None);
                            return Err(FailbackError::Frame { seq: h.seq, source });
                        }
                    }
                }
                _ => None,
            };
            Ok(Decoded {
                seq: h.seq,
                journal_bytes,
                frame,
                held_bytes,
            })
        });
        if out.send(decoded).is_err() {
            return;
        }
    }
}
