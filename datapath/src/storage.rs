//! File I/O on which durability depends, behind a small trait.
//!
//! Every module that must survive a crash (bitmap, spool, journal, undo log, durable
//! state files) does its file I/O through [`Storage`] and [`StorageFile`], never through
//! `std::fs` directly. Two implementations:
//!
//! - [`RealFs`]: the real file system (positional `pread`/`pwrite`, `fdatasync`,
//!   `fsync` of directories, `rename`, memory maps through memmap2).
//! - [`SimFs`]: an in-memory file system that remembers what was made durable and what
//!   was not. [`SimFs::crash`] throws away or tears everything that was not synced,
//!   exactly as a power cut may: un-synced writes are each kept, dropped or cut short at a
//!   sector boundary; directory entries created, renamed or removed since the last
//!   [`Storage::sync_dir`] of their directory revert. [`SimFs::crash_after`] makes the
//!   n-th durability step (a sync, a rename, a removal) fail and freezes the file system,
//!   so a test can crash a workload *at every step* and check what recovery finds.
//!
//! The rules the simulation holds callers to are the POSIX ones that bite in practice:
//! data is durable only after `sync_data`/`sync_all` of its file; a new, renamed or
//! removed name is durable only after `sync_dir` of its directory; a file's length
//! change is durable only after a sync of the file.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// How [`Storage::open`] treats a missing or existing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Open an existing file for reading and writing; missing is `NotFound`.
    Existing,
    /// Open for reading and writing, creating the file when missing.
    Create,
    /// Create a new file; an existing one is `AlreadyExists`.
    CreateNew,
    /// Open an existing file for reading only.
    ReadOnly,
}

/// An open file: positional reads and writes, length, and explicit syncs.
pub trait StorageFile: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`; fewer only at end of file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes `bufs` one after the other from `offset`, as that many
    /// [`StorageFile::write_all_at`] calls would (the default makes exactly those calls,
    /// which is how [`SimFs`] models it: a crash may tear it anywhere, like any
    /// un-synced write). [`RealFs`] does it in one `pwritev` where it can: one system
    /// call instead of one per buffer.
    fn write_all_vectored_at(&self, bufs: &[&[u8]], mut offset: u64) -> io::Result<()> {
        for b in bufs {
            self.write_all_at(b, offset)?;
            offset += b.len() as u64;
        }
        Ok(())
    }
    /// The current length in bytes (including un-synced writes).
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends (with zeros) to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes the data and length durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// Makes data, length and metadata durable (`fsync`).
    fn sync_all(&self) -> io::Result<()> {
        self.sync_data()
    }

    /// Starts writing `len` bytes at `offset` back to the disk and returns without
    /// waiting for them (Linux `sync_file_range` with `SYNC_FILE_RANGE_WRITE`). Only a
    /// hint that shortens a later sync, never a durability step: nothing is durable
    /// before [`StorageFile::sync_data`]. The default does nothing.
    fn start_writeback(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    /// Tells the kernel that the cached pages of `len` bytes at `offset` (0: to the
    /// end) will not be read soon (Linux `posix_fadvise` with `POSIX_FADV_DONTNEED`):
    /// clean pages go back to the free lists instead of the cache growing with data
    /// written once; dirty ones stay and have their writeback started. Only a hint,
    /// never a durability step and never a change of the file's bytes (a later read
    /// fetches them from the disk). The default does nothing.
    fn drop_cached(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    /// Whether the `len` bytes at `offset` are certainly a hole of a sparse file (or
    /// past its end): no block holds data there, on the disk or waiting in the cache,
    /// so they read as zeros (Linux `lseek` with `SEEK_DATA`, asked only on file
    /// systems known to count cached data as data). `false` whenever that is not
    /// known (a block device, another file system); the default always says `false`,
    /// so callers read.
    fn is_hole(&self, _offset: u64, _len: u64) -> io::Result<bool> {
        Ok(false)
    }

    /// Whether the file has no bytes.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Reads exactly `buf.len()` bytes at `offset`; a short file is `UnexpectedEof`.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "file ends before the bytes asked for",
                    ));
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// A writable memory map of a whole file (used by the dirty bitmap).
///
/// Changes through [`MappedFile::bytes_mut`] are durable only after
/// [`MappedFile::flush_range`] covers them; the kernel may write any page back earlier
/// on its own, which [`SimFs`] models too.
pub trait MappedFile: Send + Sync {
    /// The mapped bytes.
    fn bytes(&self) -> &[u8];
    /// The mapped bytes, writable.
    fn bytes_mut(&mut self) -> &mut [u8];
    /// Makes `len` bytes at `offset` durable (`msync`).
    fn flush_range(&self, offset: usize, len: usize) -> io::Result<()>;
}

/// A file system: the operations on names and directories that durability needs.
pub trait Storage: Send + Sync {
    /// Opens `path` as `mode` says.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StorageFile>>;
    /// Maps the whole file at `path` (which must exist) writable.
    fn map_mut(&self, path: &Path) -> io::Result<Box<dyn MappedFile>>;
    /// Creates a directory and its parents (durable only after `sync_dir` of the parent).
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// The names (not paths) of the files directly in `dir`, sorted.
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Whether a file exists at `path`.
    fn exists(&self, path: &Path) -> bool;
    /// Removes a file (durable only after `sync_dir` of its directory).
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Renames a file within its directory, replacing `to` (durable after `sync_dir`).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the directory's entries durable (`fsync` of the directory).
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The one durable replace of a small state file: write `name.tmp`, sync it, rename it
/// over `name`, sync the directory. After a crash at any instant the file holds either
/// the old or the new contents, never a mix. No other code renames state files.
pub fn write_atomic(fs: &dyn Storage, dir: &Path, name: &str, contents: &[u8]) -> io::Result<()> {
    write_atomic_with(fs, dir, name, |f| f.write_all_at(contents, 0))
}

/// [`write_atomic`] for contents written in pieces (a file too large to build in
/// memory first): `write` fills the empty temp file, which is then synced, renamed over
/// `name` and made durable with its directory. An error of `write` leaves `name` as it
/// was (the temp file stays behind, and the next replace truncates it).
pub fn write_atomic_with<E: From<io::Error>>(
    fs: &dyn Storage,
    dir: &Path,
    name: &str,
    write: impl FnOnce(&dyn StorageFile) -> Result<(), E>,
) -> Result<(), E> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    {
        let f = fs.open(&tmp, OpenMode::Create)?;
        f.set_len(0)?;
        write(f.as_ref())?;
        f.sync_data()?;
    }
    fs.rename(&tmp, &dst)?;
    Ok(fs.sync_dir(dir)?)
}

/// Takes an exclusive advisory lock (`flock`) on the file at `path`, creating it if
/// missing, without waiting: `Ok(None)` when another open file holds it. The lock lasts
/// as long as the returned file is open, and the kernel drops it when the process
/// dies (kill -9 included), so it never goes stale. Who may open a state directory
/// (a master target's group, a process server's state) is decided with it.
pub fn try_lock_file(path: &Path) -> io::Result<Option<File>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Reads a whole (small) file, or `None` when it does not exist.
pub fn read_whole(fs: &dyn Storage, path: &Path) -> io::Result<Option<Vec<u8>>> {
    if !fs.exists(path) {
        return Ok(None);
    }
    let f = fs.open(path, OpenMode::ReadOnly)?;
    let len = usize::try_from(f.len()?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "file too large"))?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, 0)?;
    Ok(Some(buf))
}

// ---------------------------------------------------------------------------------------
// The real file system.

/// The real file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealFs;

/// Most buffers one `pwritev` takes (Linux's `IOV_MAX`); more go in later calls.
const IOV_MAX: usize = 1024;

struct RealFile(File);

impl StorageFile for RealFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn write_all_vectored_at(&self, bufs: &[&[u8]], mut offset: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // The buffers not yet written whole, and how much of the first one is.
        let mut rest: Vec<&[u8]> = bufs.iter().copied().filter(|b| !b.is_empty()).collect();
        let mut done = 0usize;
        while let Some(first) = rest.first() {
            let iov: Vec<libc::iovec> = std::iter::once(&first[done..])
                .chain(rest[1..].iter().copied())
                .take(IOV_MAX)
                .map(|b| libc::iovec {
                    iov_base: b.as_ptr() as *mut libc::c_void,
                    iov_len: b.len(),
                })
                .collect();
            let at = i64::try_from(offset)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset past i64"))?;
            // SAFETY: every iovec points into a slice borrowed for this call, with its
            // length; the kernel only reads them. The descriptor is this file's own.
            let n =
                unsafe { libc::pwritev(self.0.as_raw_fd(), iov.as_ptr(), iov.len() as i32, at) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            // Skip what was written: whole buffers, then part of the next.
            let mut n = n as usize;
            offset += n as u64;
            while let Some(first) = rest.first() {
                let left = first.len() - done;
                if n < left {
                    done += n;
                    break;
                }
                n -= left;
                done = 0;
                rest.remove(0);
            }
        }
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn sync_all(&self) -> io::Result<()> {
        self.0.sync_all()
    }
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Ok(());
        };
        // SAFETY: a plain system call on a descriptor this file owns and keeps open;
        // no memory is passed.
        let r = unsafe {
            libc::sync_file_range(self.0.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // A file system or file kind without it: the later sync does all the work.
            Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::ESPIPE) => Ok(()),
            _ => Err(e),
        }
    }
    fn drop_cached(&self, offset: u64, len: u64) -> io::Result<()> {
        self.advise_dontneed(offset, len)
    }
    fn is_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        use std::os::fd::AsRawFd;
        let Ok(at) = i64::try_from(offset) else {
            return Ok(false);
        };
        if !self.seek_data_trusted() {
            return Ok(false);
        }
        // SAFETY: a plain system call on a descriptor this file owns and keeps open;
        // no memory is passed. It moves the file offset, which nothing here uses
        // (every read and write is positional).
        let data = unsafe { libc::lseek(self.0.as_raw_fd(), at, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data at or after `offset`. Anything else (EINVAL: the file
            // system has no SEEK_DATA) says nothing.
            return Ok(e.raw_os_error() == Some(libc::ENXIO));
        }
        Ok(u64::try_from(data).is_ok_and(|d| d >= offset.saturating_add(len)))
    }
}

/// The page size [`StorageFile::drop_cached`]'s callers assume; on a system with
/// larger pages the kernel rounds the range inwards, which only keeps more.
pub const CACHE_PAGE_BYTES: u64 = 4096;

/// The whole pages of an append-only file of `len` bytes, from the page holding
/// `cached_from` on, that may leave the cache once synced: never the first page (a
/// header rewritten in place) nor a partial last page (the next append writes into
/// it, which would read it back from the disk first). `None` when there is none.
pub fn synced_whole_pages(cached_from: u64, len: u64) -> Option<(u64, u64)> {
    let start = (cached_from - cached_from % CACHE_PAGE_BYTES).max(CACHE_PAGE_BYTES);
    let end = len - len % CACHE_PAGE_BYTES;
    (end > start).then_some((start, end))
}

/// File systems whose `SEEK_DATA` counts data still in the page cache (dirty, delayed
/// allocation, unwritten extents with cached pages) as data: ext4, xfs, btrfs, tmpfs,
/// and overlayfs, which asks the file system below. Elsewhere (FUSE with a writeback
/// cache, network file systems) a hole answer is not trusted.
pub(crate) const SEEK_DATA_TRUSTED: [i64; 5] =
    [0xEF53, 0x5846_5342, 0x9123_683E, 0x0102_1994, 0x794C_7630];

impl RealFile {
    /// Whether this file's file system is one of [`SEEK_DATA_TRUSTED`].
    fn seek_data_trusted(&self) -> bool {
        use std::os::fd::AsRawFd;
        // SAFETY: `statfs` is a plain C struct of integers, for which all zeros is a
        // valid value.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: fstatfs writes one `statfs` into the struct we own, on a descriptor
        // this file keeps open.
        let r = unsafe { libc::fstatfs(self.0.as_raw_fd(), &mut st) };
        #[allow(clippy::unnecessary_cast)]
        let kind = st.f_type as i64;
        r == 0 && SEEK_DATA_TRUSTED.contains(&kind)
    }

    /// `posix_fadvise(fd, offset, len, DONTNEED)`; a kernel or file kind without it is
    /// no error (a hint).
    fn advise_dontneed(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Ok(());
        };
        // SAFETY: a plain system call on a descriptor this file owns and keeps open;
        // no memory is passed.
        let r = unsafe {
            libc::posix_fadvise(self.0.as_raw_fd(), offset, len, libc::POSIX_FADV_DONTNEED)
        };
        // posix_fadvise returns the error number instead of setting errno.
        match r {
            0 | libc::EINVAL | libc::ENOSYS | libc::ESPIPE => Ok(()),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }
}

struct RealMap(memmap2::MmapMut);

impl MappedFile for RealMap {
    fn bytes(&self) -> &[u8] {
        &self.0
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
    fn flush_range(&self, offset: usize, len: usize) -> io::Result<()> {
        self.0.flush_range(offset, len)
    }
}

impl Storage for RealFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StorageFile>> {
        let mut o = OpenOptions::new();
        match mode {
            OpenMode::Existing => o.read(true).write(true),
            OpenMode::Create => o.read(true).write(true).create(true),
            OpenMode::CreateNew => o.read(true).write(true).create_new(true),
            OpenMode::ReadOnly => o.read(true),
        };
        Ok(Box::new(RealFile(o.open(path)?)))
    }

    fn map_mut(&self, path: &Path) -> io::Result<Box<dyn MappedFile>> {
        let f = OpenOptions::new().read(true).write(true).open(path)?;
        // SAFETY: the mapped files belong to this process (the dirty bitmap of a disk it
        // serves, opened once); nothing else truncates them while mapped.
        let map = unsafe { memmap2::MmapMut::map_mut(&f)? };
        Ok(Box::new(RealMap(map)))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if e.file_type()?.is_file()
                && let Some(n) = e.file_name().to_str()
            {
                names.push(n.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

// ---------------------------------------------------------------------------------------
// The simulated file system.

/// Sector size at which [`SimFs::crash`] tears an un-synced write.
pub const SIM_SECTOR_BYTES: usize = 512;
/// Page size at which a simulated memory map is written back on its own.
pub const SIM_PAGE_BYTES: usize = 4096;

#[derive(Clone, Debug)]
enum PendingOp {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Default)]
struct Inode {
    /// Contents as the process sees them.
    current: Vec<u8>,
    /// Contents that survive a crash.
    durable: Vec<u8>,
    /// Operations since the last sync, in order (for tearing on a crash).
    pending: Vec<PendingOp>,
}

#[derive(Default)]
struct SimState {
    inodes: Vec<Inode>,
    /// Names as the process sees them: path -> inode.
    names: BTreeMap<PathBuf, usize>,
    /// Names that survive a crash.
    durable_names: BTreeMap<PathBuf, usize>,
    dirs: std::collections::BTreeSet<PathBuf>,
    /// Count of durability steps taken (syncs, renames, removals).
    steps: u64,
    /// When set, the durability step with this number fails and freezes the fs.
    crash_at_step: Option<u64>,
    /// Set once a planned crash happened: every later operation fails.
    frozen: bool,
    rng: u64,
}

fn frozen_err() -> io::Error {
    io::Error::other("simulated crash: the file system is frozen")
}

impl SimState {
    /// Counts a durability step; fails it (and freezes) when it is the planned crash.
    fn step(&mut self) -> io::Result<()> {
        if self.frozen {
            return Err(frozen_err());
        }
        self.steps += 1;
        if self.crash_at_step == Some(self.steps) {
            self.frozen = true;
            return Err(io::Error::other(format!(
                "simulated crash at durability step {}",
                self.steps
            )));
        }
        Ok(())
    }

    fn check(&self) -> io::Result<()> {
        if self.frozen {
            Err(frozen_err())
        } else {
            Ok(())
        }
    }

    fn next_rand(&mut self) -> u64 {
        // xorshift64*: deterministic for a given seed.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn apply_write(buf: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let off = offset as usize;
    let end = off + data.len();
    if buf.len() < end {
        buf.resize(end, 0);
    }
    buf[off..end].copy_from_slice(data);
}

/// How [`SimFs::crash`] treats what was not made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// Every un-synced write and name change is lost.
    DropUnsynced,
    /// Each 4 KiB page of each un-synced write is kept, lost, or cut short at a sector
    /// boundary, independently (chosen by the seed), as page-cache writeback does;
    /// un-synced pages of memory maps may have been written back.
    Torn { seed: u64 },
}

/// An in-memory [`Storage`] that can simulate a crash. Cheap to clone (shared state).
#[derive(Clone, Default)]
pub struct SimFs {
    state: Arc<Mutex<SimState>>,
}

impl std::fmt::Debug for SimFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimFs").finish_non_exhaustive()
    }
}

impl SimFs {
    /// An empty file system.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        // A panic in another test thread must not hide this one's result.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The number of durability steps (syncs, renames, removals) taken so far.
    pub fn steps(&self) -> u64 {
        self.lock().steps
    }

    /// Makes the `n`-th durability step from now fail and freezes the file system, as if
    /// the machine died right before it. `crash_after(1)` fails the very next one.
    pub fn crash_after(&self, n: u64) {
        let mut s = self.lock();
        s.crash_at_step = Some(s.steps + n.max(1));
    }

    /// Whether a planned crash (from [`SimFs::crash_after`]) has happened.
    pub fn is_frozen(&self) -> bool {
        self.lock().frozen
    }

    /// Simulates a power cut and reboot: what was not durable is lost or torn as `mode`
    /// says, open files and maps become stale (use new ones), and the file system works
    /// again.
    pub fn crash(&self, mode: CrashMode) {
        let mut s = self.lock();
        if let CrashMode::Torn { seed } = mode {
            s.rng = seed | 1;
        }
        for i in 0..s.inodes.len() {
            let pending = std::mem::take(&mut s.inodes[i].pending);
            let mut durable = std::mem::take(&mut s.inodes[i].durable);
            if let CrashMode::Torn { .. } = mode {
                for op in pending {
                    let r = s.next_rand() % 3;
                    match op {
                        PendingOp::SetLen(len) => {
                            if r != 0 {
                                durable.resize(len as usize, 0);
                            }
                        }
                        // The page cache writes a large write back page by page, in
                        // any order: each page of it is kept, lost, or cut short at a
                        // sector boundary on its own.
                        PendingOp::Write { offset, data } => {
                            let mut at = 0usize;
                            while at < data.len() {
                                let page_end = ((offset as usize + at) / SIM_PAGE_BYTES + 1)
                                    * SIM_PAGE_BYTES
                                    - offset as usize;
                                let piece = &data[at..page_end.min(data.len())];
                                let off = offset + at as u64;
                                match s.next_rand() % 3 {
                                    0 => {}
                                    1 => apply_write(&mut durable, off, piece),
                                    _ => {
                                        let sectors = piece.len().div_ceil(SIM_SECTOR_BYTES);
                                        let keep = (s.next_rand() as usize) % (sectors + 1);
                                        let keep = (keep * SIM_SECTOR_BYTES).min(piece.len());
                                        apply_write(&mut durable, off, &piece[..keep]);
                                    }
                                }
                                at += piece.len();
                            }
                        }
                    }
                }
            }
            s.inodes[i].current = durable.clone();
            s.inodes[i].durable = durable;
        }
        s.names = s.durable_names.clone();
        s.frozen = false;
        s.crash_at_step = None;
    }

    /// The durable contents of `path` (what a crash now would leave), if it has a name.
    pub fn durable_contents(&self, path: &Path) -> Option<Vec<u8>> {
        let s = self.lock();
        s.durable_names
            .get(path)
            .map(|&i| s.inodes[i].durable.clone())
    }

    /// Flips one bit of the file at `path` in both its current and durable contents
    /// (a test helper for corruption on disk).
    pub fn flip_bit(&self, path: &Path, byte: usize, bit: u8) {
        let mut s = self.lock();
        if let Some(&i) = s.names.get(path) {
            let ino = &mut s.inodes[i];
            if byte < ino.current.len() {
                ino.current[byte] ^= 1 << (bit % 8);
            }
            if byte < ino.durable.len() {
                ino.durable[byte] ^= 1 << (bit % 8);
            }
        }
    }
}

struct SimFile {
    fs: SimFs,
    ino: usize,
    writable: bool,
}

impl StorageFile for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let s = self.fs.lock();
        s.check()?;
        let cur = &s.inodes[self.ino].current;
        let off = offset as usize;
        if off >= cur.len() {
            return Ok(0);
        }
        let n = buf.len().min(cur.len() - off);
        buf[..n].copy_from_slice(&cur[off..off + n]);
        Ok(n)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "file opened read-only",
            ));
        }
        let mut s = self.fs.lock();
        s.check()?;
        let ino = &mut s.inodes[self.ino];
        apply_write(&mut ino.current, offset, buf);
        ino.pending.push(PendingOp::Write {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let s = self.fs.lock();
        s.check()?;
        Ok(s.inodes[self.ino].current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.fs.lock();
        s.check()?;
        let ino = &mut s.inodes[self.ino];
        ino.current.resize(len as usize, 0);
        ino.pending.push(PendingOp::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.fs.lock();
        s.step()?;
        let ino = &mut s.inodes[self.ino];
        ino.durable = ino.current.clone();
        ino.pending.clear();
        Ok(())
    }
}

struct SimMap {
    fs: SimFs,
    ino: usize,
    buf: Vec<u8>,
}

impl MappedFile for SimMap {
    fn bytes(&self) -> &[u8] {
        &self.buf
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
    fn flush_range(&self, offset: usize, len: usize) -> io::Result<()> {
        let mut s = self.fs.lock();
        s.step()?;
        let end = (offset + len).min(self.buf.len());
        let start = offset.min(end);
        let ino = &mut s.inodes[self.ino];
        ino.current[start..end].copy_from_slice(&self.buf[start..end]);
        // Earlier page writebacks that overlap the flushed range are superseded: make any
        // replay of them on a torn crash write the flushed bytes.
        for op in &mut ino.pending {
            if let PendingOp::Write { offset, data } = op {
                let (o, e) = (*offset as usize, *offset as usize + data.len());
                let (a, b) = (o.max(start), e.min(end));
                if a < b {
                    data[a - o..b - o].copy_from_slice(&self.buf[a..b]);
                }
            }
        }
        if ino.durable.len() < end {
            ino.durable.resize(end, 0);
        }
        ino.durable[start..end].copy_from_slice(&self.buf[start..end]);
        Ok(())
    }
}

impl Drop for SimMap {
    fn drop(&mut self) {
        // Un-flushed pages of a dropped map are still in the page cache: they reach the
        // file's current contents and become pending page writes, which a torn crash may
        // or may not keep.
        let mut s = self.fs.lock();
        if s.frozen {
            return;
        }
        let ino = &mut s.inodes[self.ino];
        if ino.current.len() < self.buf.len() {
            return;
        }
        for (p, page) in self.buf.chunks(SIM_PAGE_BYTES).enumerate() {
            let off = p * SIM_PAGE_BYTES;
            if ino.current[off..off + page.len()] != *page {
                ino.current[off..off + page.len()].copy_from_slice(page);
                ino.pending.push(PendingOp::Write {
                    offset: off as u64,
                    data: page.to_vec(),
                });
            }
        }
    }
}

impl SimFs {
    /// Hands the un-flushed pages of a live map to the page cache, as the kernel's
    /// writeback may at any time: they become pending writes that a torn crash may keep.
    /// Tests call this before [`SimFs::crash`] to model spontaneous writeback.
    pub fn writeback(&self, map: &dyn MappedFile, path: &Path) {
        let mut s = self.lock();
        let Some(&ino) = s.names.get(path) else {
            return;
        };
        let buf = map.bytes();
        let inode = &mut s.inodes[ino];
        if inode.current.len() < buf.len() {
            return;
        }
        for (p, page) in buf.chunks(SIM_PAGE_BYTES).enumerate() {
            let off = p * SIM_PAGE_BYTES;
            if inode.current[off..off + page.len()] != *page {
                inode.current[off..off + page.len()].copy_from_slice(page);
                inode.pending.push(PendingOp::Write {
                    offset: off as u64,
                    data: page.to_vec(),
                });
            }
        }
    }
}

fn parent_of(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

impl Storage for SimFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StorageFile>> {
        let mut s = self.lock();
        s.check()?;
        let existing = s.names.get(path).copied();
        let ino = match (mode, existing) {
            (OpenMode::CreateNew, Some(_)) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists", path.display()),
                ));
            }
            (OpenMode::Existing | OpenMode::ReadOnly, None) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} not found", path.display()),
                ));
            }
            (_, Some(i)) => i,
            (OpenMode::Create | OpenMode::CreateNew, None) => {
                if !s.dirs.contains(&parent_of(path)) {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("directory of {} not found", path.display()),
                    ));
                }
                s.inodes.push(Inode::default());
                let i = s.inodes.len() - 1;
                s.names.insert(path.to_path_buf(), i);
                i
            }
        };
        Ok(Box::new(SimFile {
            fs: self.clone(),
            ino,
            writable: mode != OpenMode::ReadOnly,
        }))
    }

    fn map_mut(&self, path: &Path) -> io::Result<Box<dyn MappedFile>> {
        let s = self.lock();
        s.check()?;
        let Some(&ino) = s.names.get(path) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} not found", path.display()),
            ));
        };
        let buf = s.inodes[ino].current.clone();
        Ok(Box::new(SimMap {
            fs: self.clone(),
            ino,
            buf,
        }))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.check()?;
        // Directories are not the subject of the crash model: they exist once created.
        for a in path.ancestors() {
            s.dirs.insert(a.to_path_buf());
        }
        Ok(())
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let s = self.lock();
        s.check()?;
        if !s.dirs.contains(dir) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("directory {} not found", dir.display()),
            ));
        }
        Ok(s.names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
            .collect())
    }

    fn exists(&self, path: &Path) -> bool {
        self.lock().names.contains_key(path)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.step()?;
        match s.names.remove(path) {
            Some(_) => Ok(()),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} not found", path.display()),
            )),
        }
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.step()?;
        let Some(i) = s.names.remove(from) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} not found", from.display()),
            ));
        };
        s.names.insert(to.to_path_buf(), i);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.step()?;
        let in_dir = |p: &PathBuf| p.parent() == Some(dir);
        s.durable_names.retain(|p, _| !in_dir(p));
        let entries: Vec<(PathBuf, usize)> = s
            .names
            .iter()
            .filter(|(p, _)| in_dir(p))
            .map(|(p, &i)| (p.clone(), i))
            .collect();
        s.durable_names.extend(entries);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    /// Proves a vectored write puts its buffers back to back at the offset on the real
    /// file system and in the simulation alike, with empty buffers and more buffers than
    /// one `pwritev` takes (the loop over partial writes).
    #[test]
    fn vectored_write_equals_sequential_writes() {
        let dir = tempfile::tempdir().unwrap();
        let pieces: Vec<Vec<u8>> = (0..IOV_MAX + 300)
            .map(|i| vec![(i % 251) as u8; i % 7])
            .collect();
        let bufs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
        let want: Vec<u8> = [&[9u8; 100][..], &pieces.concat()].concat();
        let sim = SimFs::new();
        sim.create_dir_all(&p("/d")).unwrap();
        let real_path = dir.path().join("v");
        let files = [
            RealFs.open(&real_path, OpenMode::Create).unwrap(),
            sim.open(&p("/d/v"), OpenMode::Create).unwrap(),
        ];
        for f in &files {
            f.write_all_at(&[9u8; 100], 0).unwrap();
            f.write_all_vectored_at(&bufs, 100).unwrap();
            f.write_all_vectored_at(&[], 7).unwrap();
            let mut got = vec![0u8; want.len()];
            f.read_exact_at(&mut got, 0).unwrap();
            assert!(got == want);
            assert_eq!(f.len().unwrap(), want.len() as u64);
        }
    }

    /// Proves the simulation forgets un-synced data and un-synced names on a crash.
    #[test]
    fn crash_drops_unsynced_writes_and_names() {
        let fs = SimFs::new();
        fs.create_dir_all(&p("/d")).unwrap();
        let f = fs.open(&p("/d/a"), OpenMode::Create).unwrap();
        f.write_all_at(b"hello", 0).unwrap();
        f.sync_data().unwrap();
        // Name not yet durable: the file vanishes.
        fs.crash(CrashMode::DropUnsynced);
        assert!(!fs.exists(&p("/d/a")));

        let f = fs.open(&p("/d/a"), OpenMode::Create).unwrap();
        f.write_all_at(b"hello", 0).unwrap();
        f.sync_data().unwrap();
        fs.sync_dir(&p("/d")).unwrap();
        f.write_all_at(b"HELLO world", 0).unwrap();
        fs.crash(CrashMode::DropUnsynced);
        let f = fs.open(&p("/d/a"), OpenMode::Existing).unwrap();
        let mut buf = vec![0; f.len().unwrap() as usize];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, b"hello");
    }

    /// Proves the durable replace leaves the old or the new contents at every crash step.
    #[test]
    fn write_atomic_is_old_or_new_at_every_step() {
        for step in 1..=6 {
            for seed in 0..8 {
                let fs = SimFs::new();
                let dir = p("/s");
                fs.create_dir_all(&dir).unwrap();
                write_atomic(&fs, &dir, "state", b"old-contents").unwrap();
                fs.crash_after(step);
                let _ = write_atomic(&fs, &dir, "state", b"new-contents-longer");
                fs.crash(CrashMode::Torn { seed });
                let got = read_whole(&fs, &dir.join("state")).unwrap().unwrap();
                assert!(
                    got == b"old-contents" || got == b"new-contents-longer",
                    "step {step} seed {seed}: {got:?}"
                );
            }
        }
    }

    /// Proves a planned crash fails the chosen step and every operation after it.
    #[test]
    fn crash_after_freezes_until_crash() {
        let fs = SimFs::new();
        fs.create_dir_all(&p("/d")).unwrap();
        let f = fs.open(&p("/d/a"), OpenMode::Create).unwrap();
        fs.crash_after(2);
        f.sync_data().unwrap();
        assert!(f.sync_data().is_err());
        assert!(fs.is_frozen());
        assert!(f.write_all_at(b"x", 0).is_err());
        fs.crash(CrashMode::DropUnsynced);
        assert!(!fs.is_frozen());
    }

    /// Proves a torn crash keeps only sector-aligned prefixes of un-synced writes.
    #[test]
    fn torn_crash_cuts_at_sectors() {
        for seed in 0..32 {
            let fs = SimFs::new();
            fs.create_dir_all(&p("/d")).unwrap();
            let f = fs.open(&p("/d/a"), OpenMode::Create).unwrap();
            f.sync_data().unwrap();
            fs.sync_dir(&p("/d")).unwrap();
            f.write_all_at(&[7u8; 2048], 0).unwrap();
            fs.crash(CrashMode::Torn { seed });
            let got = fs.durable_contents(&p("/d/a")).unwrap();
            assert_eq!(got.len() % SIM_SECTOR_BYTES, 0, "seed {seed}");
            assert!(got.iter().all(|&b| b == 7));
        }
    }

    /// Proves the real file system round-trips through the same trait.
    #[test]
    fn real_fs_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let fs = RealFs;
        write_atomic(&fs, dir.path(), "s", b"abc").unwrap();
        assert_eq!(
            read_whole(&fs, &dir.path().join("s")).unwrap().unwrap(),
            b"abc"
        );
        assert_eq!(fs.list_dir(dir.path()).unwrap(), vec!["s".to_string()]);
        let f = fs.open(&dir.path().join("s"), OpenMode::Existing).unwrap();
        f.set_len(4096).unwrap();
        drop(f);
        let mut m = fs.map_mut(&dir.path().join("s")).unwrap();
        m.bytes_mut()[10] = 9;
        m.flush_range(0, 4096).unwrap();
        assert_eq!(m.bytes()[10], 9);
    }

    /// Proves starting writeback early is only a hint: the bytes read back are the ones
    /// written (before and after the sync), a range past the end is accepted, and the
    /// simulated file system counts no durability step for it.
    #[test]
    fn start_writeback_is_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let f = RealFs
            .open(&dir.path().join("f"), OpenMode::Create)
            .unwrap();
        f.write_all_at(&[7u8; 8192], 0).unwrap();
        f.start_writeback(0, 8192).unwrap();
        f.start_writeback(1 << 40, 4096).unwrap();
        let mut b = [0u8; 8192];
        f.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(b, [7u8; 8192]);
        f.sync_data().unwrap();
        let sim = SimFs::new();
        sim.create_dir_all(Path::new("/d")).unwrap();
        let g = sim.open(Path::new("/d/g"), OpenMode::Create).unwrap();
        sim.sync_dir(Path::new("/d")).unwrap();
        g.write_all_at(b"x", 0).unwrap();
        let steps = sim.steps();
        g.start_writeback(0, 1).unwrap();
        assert_eq!(sim.steps(), steps);
        sim.crash(CrashMode::DropUnsynced);
        assert_eq!(sim.durable_contents(Path::new("/d/g")), Some(Vec::new()));
    }

    /// Proves dropping cached pages is only a hint: after a sync and the drop, every
    /// byte reads back as written (from the disk now), a range past the end is
    /// accepted, and the simulated file system counts no step for it.
    #[test]
    fn drop_cached_is_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let f = RealFs
            .open(&dir.path().join("f"), OpenMode::Create)
            .unwrap();
        let data: Vec<u8> = (0..64 << 10).map(|i| (i * 7 % 251) as u8).collect();
        f.write_all_at(&data, 0).unwrap();
        f.sync_data().unwrap();
        f.drop_cached(4096, 48 << 10).unwrap();
        f.drop_cached(1 << 40, 4096).unwrap();
        let mut b = vec![0u8; data.len()];
        f.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(b, data);
        let sim = SimFs::new();
        sim.create_dir_all(Path::new("/d")).unwrap();
        let g = sim.open(Path::new("/d/g"), OpenMode::Create).unwrap();
        g.write_all_at(b"x", 0).unwrap();
        let steps = sim.steps();
        g.drop_cached(0, 4096).unwrap();
        assert_eq!(sim.steps(), steps);
    }
}
