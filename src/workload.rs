//! Data to write in benches, demos and tests: reproducible, and shaped like what disks
//! hold.
//!
//! - [`random_bytes`]: incompressible (a seeded xorshift stream).
//! - [`realistic_bytes`]: this machine's own binaries, libraries and text under `/usr`,
//!   concatenated in a fixed order, as a system disk holds them.
//! - [`zero90_bytes`]: 90% of the 64 KiB blocks zero, the rest realistic.

use std::io::Read;
use std::path::Path;

use datapath::extent::ExtentData;
use datapath::frame::{DataFrameMeta, Encoder};

/// Block size of the mixed data sets: a guest's typical large write.
pub const BLOCK_BYTES: usize = 64 << 10;
/// Extents per frame in the benches: 16 x 64 KiB = 1 MiB of plain data per frame.
pub const EXTENTS_PER_FRAME: usize = 16;
/// At most this much of one file is taken, so that one huge file does not dominate.
const FILE_BYTES_MAX: u64 = 4 << 20;

/// A small fast PRNG (xorshift64) so every run writes the same bytes for one seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value, zero included).
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

/// `n` incompressible bytes.
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    Rng::new(seed).fill(&mut v);
    v
}

/// `n` bytes of this machine's files under /usr (binaries, libraries, text), in a fixed
/// order; generated text makes up the rest if /usr holds less.
pub fn realistic_bytes(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    let mut stack = vec![
        Path::new("/usr/share").to_path_buf(),
        Path::new("/usr/lib").to_path_buf(),
        Path::new("/usr/bin").to_path_buf(),
    ];
    while let Some(dir) = stack.pop() {
        if out.len() >= n {
            break;
        }
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<_> = rd.filter_map(Result::ok).collect();
        entries.sort_by_key(|e| e.file_name());
        let mut subdirs = Vec::new();
        for e in entries {
            if out.len() >= n {
                break;
            }
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                subdirs.push(e.path());
            } else if ft.is_file()
                && let Ok(f) = std::fs::File::open(e.path())
            {
                let mut buf = Vec::new();
                if f.take(FILE_BYTES_MAX).read_to_end(&mut buf).is_ok() {
                    out.extend_from_slice(&buf);
                }
            }
        }
        // Depth first, in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    let mut i = 0u64;
    while out.len() < n {
        i += 1;
        out.extend_from_slice(
            format!("line {i} of generated text, value {}\n", i * 7919 % 1000).as_bytes(),
        );
    }
    out.truncate(n);
    out
}

/// `n` bytes in 64 KiB blocks of which nine in ten are zero and the rest realistic.
pub fn zero90_bytes(n: usize) -> Vec<u8> {
    let real = realistic_bytes(n / 10 + BLOCK_BYTES);
    let mut out = vec![0u8; n];
    for (i, chunk) in out.chunks_mut(BLOCK_BYTES).enumerate() {
        if i % 10 == 0 {
            let src = (i / 10) * BLOCK_BYTES;
            let len = chunk.len();
            chunk.copy_from_slice(&real[src..src + len]);
        }
    }
    out
}

/// The three data sets of the benches, `n` bytes each: random, realistic, 90% zero.
pub fn datasets(n: usize) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("random", random_bytes(n, 0x9E37_79B9_7F4A_7C15)),
        ("realistic", realistic_bytes(n)),
        ("zero90", zero90_bytes(n)),
    ]
}

/// The frame metadata the benches use.
pub fn bench_meta() -> DataFrameMeta {
    DataFrameMeta {
        group: "g".into(),
        disk: "d".into(),
        epoch: 1,
    }
}

/// `data` as the extent lists of frames: [`EXTENTS_PER_FRAME`] extents of
/// [`BLOCK_BYTES`] each, at their offsets in a disk holding `data`.
pub fn frames_of(data: &[u8]) -> Vec<Vec<(u64, ExtentData<'_>)>> {
    data.chunks(BLOCK_BYTES * EXTENTS_PER_FRAME)
        .enumerate()
        .map(|(f, frame)| {
            frame
                .chunks(BLOCK_BYTES)
                .enumerate()
                .map(|(e, ext)| {
                    let off = (f * EXTENTS_PER_FRAME + e) * BLOCK_BYTES;
                    (off as u64, ExtentData::Bytes(ext))
                })
                .collect()
        })
        .collect()
}

/// `data` encoded as data frames (see [`frames_of`]) at zstd `level`, seqs from 1.
pub fn encode_frames(data: &[u8], level: i32) -> Vec<Vec<u8>> {
    let mut enc = Encoder::new(level);
    frames_of(data)
        .iter()
        .enumerate()
        .map(|(i, exts)| {
            let mut out = Vec::new();
            enc.encode_data(&bench_meta(), i as u64 + 1, exts, &mut out)
                .expect("encode bench frames");
            out
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Proves the data sets are reproducible and of the asked size and shape.
    #[test]
    fn data_sets() {
        assert_eq!(random_bytes(1000, 7), random_bytes(1000, 7));
        assert_ne!(random_bytes(1000, 7), random_bytes(1000, 8));
        let r = realistic_bytes(1 << 20);
        assert_eq!(r.len(), 1 << 20);
        assert_eq!(r, realistic_bytes(1 << 20));
        let z = zero90_bytes(20 * BLOCK_BYTES);
        let zero_blocks = z
            .chunks(BLOCK_BYTES)
            .filter(|c| c.iter().all(|&b| b == 0))
            .count();
        assert!(zero_blocks >= 18, "{zero_blocks} zero blocks");
    }
}
