//! The capture hook: how write capture tells change tracking about every write.
//!
//! Order for one WRITE / TRIM / WRITE_ZEROES (see the map in `datapath`):
//! [`Capture::before_write`] (the dirty bitmap marks the range, so a crash never loses
//! track of a change) -> the backing disk is written (FUA: synced) ->
//! [`Capture::after_write`] (the spool appends the data) -> the reply. For a FLUSH:
//! backing disk synced -> [`Capture::flush`] (the spool is synced) -> the reply.
//! A hook error fails the request with EIO, and nothing is acknowledged. When the
//! backing write itself fails after `before_write`, [`Capture::write_failed`] is called
//! instead of `after_write`.

use std::io;

/// The contents of a captured write: bytes, or zeros of a length (TRIM and
/// WRITE_ZEROES; this server zeroes trimmed ranges, so the replica must too).
pub type WriteData<'a> = datapath::extent::ExtentData<'a>;

/// Called around every write to a protected disk. Implementations are shared by all
/// connections, so they are called concurrently, from blocking threads.
pub trait Capture: Send + Sync {
    /// Before the write reaches the backing disk of `disk`.
    fn before_write(&self, disk: &str, offset: u64, len: u64) -> io::Result<()>;
    /// After the write reached the backing disk, before the reply.
    fn after_write(&self, disk: &str, offset: u64, data: WriteData<'_>) -> io::Result<()>;
    /// After the backing disk was synced by a FLUSH, before the reply.
    fn flush(&self, disk: &str) -> io::Result<()>;
    /// The backing write (or its FUA sync) that followed a successful `before_write`
    /// failed: the request is not acknowledged and `after_write` will not come.
    fn write_failed(&self, _disk: &str, _offset: u64, _len: u64) {}
}

/// Captures nothing: the server is a plain write-through NBD server.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoCapture;

impl Capture for NoCapture {
    fn before_write(&self, _disk: &str, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    fn after_write(&self, _disk: &str, _offset: u64, _data: WriteData<'_>) -> io::Result<()> {
        Ok(())
    }

    fn flush(&self, _disk: &str) -> io::Result<()> {
        Ok(())
    }
}
