//! The shipping state of one group: the last recovery point the master target
//! acknowledged as durable, kept in `state_dir/<group>/shipped`.
//!
//! It is replaced with [`datapath::storage::write_atomic`] when an ack covers a point
//! frame, BEFORE the spool is released up to the point's cut
//! ([`datapath::tracker::GroupTracker::ack_through`]): after any crash the state is
//! never behind the spool release, so the shipper can always find the first record it
//! still has to ship.
//!
//! # Layout (48 bytes, little-endian)
//!
//! | offset | size | field          | meaning                                           |
//! |--------|------|----------------|---------------------------------------------------|
//! | 0      | 4    | magic          | `BRSH` (never modify)                             |
//! | 4      | 2    | version        | [`VERSION`]                                       |
//! | 6      | 2    | reserved       | zero                                              |
//! | 8      | 8    | epoch          | epoch (= point id) of the acknowledged point      |
//! | 16     | 8    | frame_seq      | frame seq of its point frame                      |
//! | 24     | 8    | cut_spool_seq  | spool seq of the cut record that sealed the epoch |
//! | 32     | 8    | time_unix_ms   | the point's time                                  |
//! | 40     | 4    | reserved       | zero                                              |
//! | 44     | 4    | crc32          | crc32 (IEEE) of bytes 0..44                       |

use std::io;
use std::path::{Path, PathBuf};

use datapath::storage::{Storage, read_whole, write_atomic};
use thiserror::Error;

/// Magic of the file. Never modify.
pub const MAGIC: [u8; 4] = *b"BRSH";
/// Version of the layout; readers refuse others.
pub const VERSION: u16 = 1;
/// Size of the file.
pub const STATE_BYTES: usize = 48;
/// Name of the file in the group's state directory.
pub const STATE_FILE: &str = "shipped";

/// The last acknowledged point of a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShipState {
    pub epoch: u64,
    pub frame_seq: u64,
    pub cut_spool_seq: u64,
    pub time_unix_ms: u64,
}

/// Why a state file could not be read.
#[derive(Debug, Error)]
pub enum ShipStateError {
    #[error("{file}: corrupt shipping state: {why}")]
    Corruption { file: PathBuf, why: String },
    #[error("{file}: unsupported shipping state version {version} (this build reads {VERSION})")]
    UnsupportedVersion { file: PathBuf, version: u16 },
    #[error("{what} {file}: {source}")]
    Io {
        what: &'static str,
        file: PathBuf,
        source: io::Error,
    },
}

fn u64_at(b: &[u8; STATE_BYTES], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

impl ShipState {
    /// The file's bytes.
    pub fn encode(&self) -> [u8; STATE_BYTES] {
        let mut b = [0u8; STATE_BYTES];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&self.epoch.to_le_bytes());
        b[16..24].copy_from_slice(&self.frame_seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.cut_spool_seq.to_le_bytes());
        b[32..40].copy_from_slice(&self.time_unix_ms.to_le_bytes());
        let crc = crc32fast::hash(&b[..44]);
        b[44..48].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes the file's bytes; `file` names it in errors.
    pub fn decode(bytes: &[u8], file: &Path) -> Result<Self, ShipStateError> {
        let bad = |why: String| ShipStateError::Corruption {
            file: file.to_path_buf(),
            why,
        };
        let b: &[u8; STATE_BYTES] = bytes
            .try_into()
            .map_err(|_| bad(format!("length {} is not {STATE_BYTES}", bytes.len())))?;
        if b[0..4] != MAGIC {
            return Err(bad("magic is not BRSH".into()));
        }
        let crc = u32::from_le_bytes([b[44], b[45], b[46], b[47]]);
        if crc != crc32fast::hash(&b[..44]) {
            return Err(bad("crc32 mismatch".into()));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(ShipStateError::UnsupportedVersion {
                file: file.to_path_buf(),
                version,
            });
        }
        if b[6..8] != [0, 0] || b[40..44] != [0; 4] {
            return Err(bad("reserved bytes are not zero".into()));
        }
        let s = Self {
            epoch: u64_at(b, 8),
            frame_seq: u64_at(b, 16),
            cut_spool_seq: u64_at(b, 24),
            time_unix_ms: u64_at(b, 32),
        };
        if s.frame_seq == 0 || s.cut_spool_seq == 0 {
            return Err(bad("frame_seq and cut_spool_seq must be at least 1".into()));
        }
        Ok(s)
    }

    /// Reads the state of the group whose state directory is `dir`; `None` when nothing
    /// was ever acknowledged.
    pub fn load(fs: &dyn Storage, dir: &Path) -> Result<Option<Self>, ShipStateError> {
        let file = dir.join(STATE_FILE);
        match read_whole(fs, &file) {
            Ok(None) => Ok(None),
            Ok(Some(b)) => Self::decode(&b, &file).map(Some),
            Err(source) => Err(ShipStateError::Io {
                what: "read",
                file,
                source,
            }),
        }
    }

    /// Durably replaces the state of the group whose state directory is `dir`.
    pub fn store(&self, fs: &dyn Storage, dir: &Path) -> Result<(), ShipStateError> {
        write_atomic(fs, dir, STATE_FILE, &self.encode()).map_err(|source| ShipStateError::Io {
            what: "write",
            file: dir.join(STATE_FILE),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: ShipState = ShipState {
        epoch: 7,
        frame_seq: 42,
        cut_spool_seq: 99,
        time_unix_ms: 1_700_000_000_000,
    };

    /// Proves a state round-trips through its bytes and through a file.
    #[test]
    fn round_trip() {
        let p = Path::new("x");
        assert_eq!(ShipState::decode(&S.encode(), p).unwrap(), S);
        let dir = tempfile::tempdir().unwrap();
        let fs = datapath::storage::RealFs;
        assert_eq!(ShipState::load(&fs, dir.path()).unwrap(), None);
        S.store(&fs, dir.path()).unwrap();
        assert_eq!(ShipState::load(&fs, dir.path()).unwrap(), Some(S));
    }

    /// Proves every truncation, every bit flip and random bytes are refused.
    #[test]
    fn bad_bytes_are_refused() {
        let p = Path::new("x");
        let good = S.encode();
        for n in 0..STATE_BYTES {
            assert!(ShipState::decode(&good[..n], p).is_err());
        }
        for bit in 0..STATE_BYTES * 8 {
            let mut b = good;
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(ShipState::decode(&b, p).is_err(), "bit {bit}");
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..1000 {
            let mut b = [0u8; STATE_BYTES];
            for v in &mut b {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *v = x as u8;
            }
            assert!(ShipState::decode(&b, p).is_err());
        }
        let mut v = good;
        v[4] = 2;
        let crc = crc32fast::hash(&v[..44]);
        v[44..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            ShipState::decode(&v, p),
            Err(ShipStateError::UnsupportedVersion { version: 2, .. })
        ));
    }
}
