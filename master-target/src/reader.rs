//! Cuts a byte stream (plain TCP or TLS) into whole frames, one at a time, with bounded
//! memory.
//!
//! The 32-byte header is read and checked with [`FrameHeader::parse`] (which bounds
//! `body_len` by [`frame::MAX_BODY_BYTES`]) before the body is allocated, so a peer can
//! make us hold at most one frame of that bound. Nothing else is checked here: the crc
//! and the body are the caller's (see `server`), so that a frame that fails its crc is
//! refused with the same message whether it came first or mid-batch.
//!
//! [`FrameReader::try_step`] never waits: it returns [`Step::WouldBlock`] when the stream
//! has nothing more buffered, keeping a partial frame for the next call. That is how the
//! server knows a batch is complete ("append every frame already received"). It polls
//! the stream once with a waker that does nothing: a stream that is not ready answers
//! `Pending` (for TLS: no whole record buffered), which is exactly "nothing more now";
//! the next [`FrameReader::next`] polls again with the task's real waker.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use datapath::frame::{self, FrameError, FrameHeader, FrameKind, HEADER_BYTES};
use tokio::io::{AsyncRead, ReadBuf};

/// Bytes of the read-ahead buffer: small frames (points, small writes) are cut out of
/// it without a system call each; larger bodies are read straight into their frame.
pub const READ_AHEAD_BYTES: usize = 64 << 10;

/// Why no frame could be read.
#[derive(Debug)]
pub enum ReadError {
    Io(io::Error),
    /// The header is not a frame header (magic, version, kind, reserved, body bound).
    Header(FrameError),
    /// The header is fine but names a kind the caller did not allow here.
    UnexpectedKind(FrameKind),
    /// The peer closed the connection inside a frame.
    Truncated {
        have: usize,
        need: usize,
    },
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Io(e) => write!(f, "read: {e}"),
            ReadError::Header(e) => write!(f, "bad frame header: {e}"),
            ReadError::UnexpectedKind(k) => write!(f, "unexpected {k:?} frame"),
            ReadError::Truncated { have, need } => write!(
                f,
                "truncated frame: the connection closed after {have} of its {need} bytes"
            ),
        }
    }
}

/// What one non-waiting step produced.
#[derive(Debug)]
pub enum Step {
    /// One whole frame, header included; its crc is not yet checked.
    Frame(Vec<u8>),
    /// The peer closed the connection between frames.
    Eof,
    /// Nothing more is buffered on the stream; a partial frame is kept.
    WouldBlock,
}

/// The state of one connection's frame cutting.
pub struct FrameReader {
    ahead: Box<[u8]>,
    ahead_start: usize,
    ahead_end: usize,
    /// The frame being assembled: the header until it is parsed, then the whole frame.
    cur: Vec<u8>,
    /// Bytes of `cur` filled so far.
    filled: usize,
    header_done: bool,
    /// When set, a header of another kind is refused before its body is read.
    pub only_kind: Option<FrameKind>,
    /// A header announcing a longer body is refused before the body is allocated; at
    /// most [`frame::MAX_BODY_BYTES`] (which the header check enforces anyway).
    pub body_max: u32,
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameReader {
    pub fn new() -> Self {
        Self {
            ahead: vec![0u8; READ_AHEAD_BYTES].into_boxed_slice(),
            ahead_start: 0,
            ahead_end: 0,
            cur: vec![0u8; HEADER_BYTES],
            filled: 0,
            header_done: false,
            only_kind: None,
            body_max: frame::MAX_BODY_BYTES,
        }
    }

    /// Waits for the next whole frame; `None` when the peer closed between frames.
    /// Cancel-safe: a partial frame stays in the reader.
    pub async fn next<S: AsyncRead + Unpin>(
        &mut self,
        s: &mut S,
    ) -> Result<Option<Vec<u8>>, ReadError> {
        std::future::poll_fn(|cx| match self.step(s, cx) {
            // The stream answered Pending, so it wakes this task when it has more.
            Ok(Step::WouldBlock) => Poll::Pending,
            Ok(Step::Frame(f)) => Poll::Ready(Ok(Some(f))),
            Ok(Step::Eof) => Poll::Ready(Ok(None)),
            Err(e) => Poll::Ready(Err(e)),
        })
        .await
    }

    /// Makes as much progress as the stream allows without waiting.
    pub fn try_step<S: AsyncRead + Unpin>(&mut self, s: &mut S) -> Result<Step, ReadError> {
        self.step(s, &mut Context::from_waker(Waker::noop()))
    }

    /// Makes as much progress as the stream allows; [`Step::WouldBlock`] when a read
    /// answered `Pending` (which registered `cx`'s waker).
    fn step<S: AsyncRead + Unpin>(
        &mut self,
        s: &mut S,
        cx: &mut Context<'_>,
    ) -> Result<Step, ReadError> {
        loop {
            let want = self.cur.len() - self.filled;
            let avail = self.ahead_end - self.ahead_start;
            if avail > 0 && want > 0 {
                let n = want.min(avail);
                self.cur[self.filled..self.filled + n]
                    .copy_from_slice(&self.ahead[self.ahead_start..self.ahead_start + n]);
                self.filled += n;
                self.ahead_start += n;
            }
            if self.filled == self.cur.len() {
                if !self.header_done {
                    self.parse_header()?;
                    if self.filled < self.cur.len() {
                        continue;
                    }
                }
                return Ok(Step::Frame(self.take_frame()));
            }
            // The read-ahead is empty here: refill it, or read a large body directly.
            let read = if self.cur.len() - self.filled >= self.ahead.len() {
                let end = self.cur.len();
                poll_read(s, cx, &mut self.cur[self.filled..end]).map(|n| (n, false))
            } else {
                poll_read(s, cx, &mut self.ahead).map(|n| (n, true))
            };
            match read {
                Ok((0, _)) => {
                    return if self.filled == 0 && !self.header_done {
                        Ok(Step::Eof)
                    } else {
                        Err(ReadError::Truncated {
                            have: self.filled,
                            need: self.cur.len(),
                        })
                    };
                }
                Ok((n, true)) => {
                    self.ahead_start = 0;
                    self.ahead_end = n;
                }
                Ok((n, false)) => self.filled += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::WouldBlock),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }

    /// Checks the header in `cur` and grows `cur` to the whole frame's length (bounded
    /// by the header check).
    fn parse_header(&mut self) -> Result<(), ReadError> {
        let mut head = [0u8; HEADER_BYTES];
        head.copy_from_slice(&self.cur[..HEADER_BYTES]);
        let h = FrameHeader::parse(&head).map_err(ReadError::Header)?;
        if let Some(k) = self.only_kind
            && h.kind != k
        {
            return Err(ReadError::UnexpectedKind(h.kind));
        }
        if h.body_len > self.body_max {
            return Err(ReadError::Header(FrameError::TooLarge {
                field: "body_len",
                value: h.body_len.into(),
                max: self.body_max.into(),
            }));
        }
        self.cur.resize(h.frame_len(), 0);
        self.header_done = true;
        Ok(())
    }

    fn take_frame(&mut self) -> Vec<u8> {
        self.filled = 0;
        self.header_done = false;
        std::mem::replace(&mut self.cur, vec![0u8; HEADER_BYTES])
    }
}

/// One read into `buf`, as `try_read` on a socket answers: the byte count (0 at the
/// end of the stream), or `WouldBlock` when the stream is not ready.
fn poll_read<S: AsyncRead + Unpin>(
    s: &mut S,
    cx: &mut Context<'_>,
    buf: &mut [u8],
) -> io::Result<usize> {
    let mut rb = ReadBuf::new(buf);
    match Pin::new(s).poll_read(cx, &mut rb) {
        Poll::Ready(Ok(())) => Ok(rb.filled().len()),
        Poll::Ready(Err(e)) => Err(e),
        Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
    }
}
