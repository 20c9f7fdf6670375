//! Sector-aligned byte ranges of a disk, and the epoch map.
//!
//! (The epoch map is being written; the types below are the shared vocabulary.)

use thiserror::Error;

/// Format version of nothing on disk; kept so every module reports one.
pub const VERSION: u16 = 1;

/// Every offset and length on the data path is a multiple of this.
pub const SECTOR_BYTES: u64 = 512;

/// Why a byte range was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ExtentError {
    #[error("offset {offset} is not a multiple of {SECTOR_BYTES}")]
    MisalignedOffset { offset: u64 },
    #[error("length {len} is not a multiple of {SECTOR_BYTES}")]
    MisalignedLength { len: u64 },
    #[error("empty range at offset {offset}")]
    Empty { offset: u64 },
    #[error("range {offset}+{len} ends beyond the disk's {disk_bytes} bytes")]
    OutOfRange {
        offset: u64,
        len: u64,
        disk_bytes: u64,
    },
}

/// A non-empty, sector-aligned byte range `[offset, offset + len)` inside a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

impl Extent {
    /// Checks alignment, emptiness and that the range lies inside `disk_bytes`.
    pub fn new(offset: u64, len: u64, disk_bytes: u64) -> Result<Self, ExtentError> {
        if offset % SECTOR_BYTES != 0 {
            return Err(ExtentError::MisalignedOffset { offset });
        }
        if len % SECTOR_BYTES != 0 {
            return Err(ExtentError::MisalignedLength { len });
        }
        if len == 0 {
            return Err(ExtentError::Empty { offset });
        }
        match offset.checked_add(len) {
            Some(end) if end <= disk_bytes => Ok(Self { offset, len }),
            _ => Err(ExtentError::OutOfRange {
                offset,
                len,
                disk_bytes,
            }),
        }
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// The contents of one extent: bytes, or all zeros (a trim or write-zeroes, or data
/// found to be zero) of a length, which costs no payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentData<'a> {
    Bytes(&'a [u8]),
    Zero(u64),
}

impl ExtentData<'_> {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Self::Bytes(b) => b.len() as u64,
            Self::Zero(n) => *n,
        }
    }

    /// Whether the extent has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
