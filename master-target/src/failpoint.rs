//! The failpoints of the end-to-end crash tests (`BLOCKREP_FAILPOINT`, see
//! [`crate::failback`] and [`crate::retention`]): a file that behaves like the one it
//! wraps, except that a sync it is told to hold never returns, so the test can kill the
//! process exactly there.

use std::time::Duration;

use datapath::storage::StorageFile;

/// `inner` with every call passed through, except a `sync_data` for which `hold` says
/// yes (asked at every sync): it logs that the failpoint `what` is reached (the tests
/// wait for that line), with `file`, and waits to be killed.
pub struct HeldSync<'a> {
    pub inner: Box<dyn StorageFile + 'a>,
    pub hold: Box<dyn Fn() -> bool + Send + Sync + 'a>,
    pub what: &'static str,
    pub file: String,
}

impl StorageFile for HeldSync<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_all_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn start_writeback(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.start_writeback(offset, len)
    }
    fn write_all_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> std::io::Result<()> {
        self.inner.write_all_vectored_at(bufs, offset)
    }
    fn drop_cached(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.drop_cached(offset, len)
    }
    fn is_hole(&self, offset: u64, len: u64) -> std::io::Result<bool> {
        self.inner.is_hole(offset, len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        if (self.hold)() {
            tracing::warn!(file = %self.file, "failpoint {} reached: waiting to be killed", self.what);
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        self.inner.sync_data()
    }
}
