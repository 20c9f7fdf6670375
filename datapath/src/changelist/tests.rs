use std::collections::BTreeSet;

use super::*;
use crate::storage::{CrashMode, SimFs};
use crate::testutil::Rng;

const DISK: u64 = 8 << 20;

fn meta() -> Meta {
    Meta {
        origin: Origin::FramesAfterPoint,
        group: "g1".into(),
        disk: "d0".into(),
        node: "mt-b".into(),
        disk_bytes: DISK,
        point_id: Some(42),
        created_unix_ms: 1_700_000_000_000,
    }
}

fn e(offset: u64, len: u64) -> Extent {
    Extent { offset, len }
}

/// The 4 KiB blocks `extents` touch.
fn blocks_of(extents: &[Extent], disk_bytes: u64) -> BTreeSet<u64> {
    extents
        .iter()
        .flat_map(|x| x.offset / BLOCK_BYTES..x.end().min(disk_bytes).div_ceil(BLOCK_BYTES))
        .collect()
}

/// A valid list with a few extents (some merged, one at the disk's unaligned end).
fn sample() -> Vec<u8> {
    let m = Meta {
        disk_bytes: DISK - 512,
        ..meta()
    };
    encode(
        &m,
        [
            e(0, 512),
            e(512, 4096),
            e(1 << 20, 64 << 10),
            e((1 << 20) + (60 << 10), 8192),
            e(3 << 20, 4096),
            e(DISK - 4096, 3584),
        ],
    )
    .unwrap()
}

/// Proves the encoder grows extents to whole blocks and merges them, the decoder gives
/// back exactly those blocks, and the header says what it was given.
#[test]
fn round_trip_grows_and_merges() {
    let bytes = sample();
    let (h, got) = decode(&bytes).unwrap();
    assert_eq!(
        got,
        vec![
            e(0, 8192),
            e(1 << 20, 68 << 10),
            e(3 << 20, 4096),
            e(DISK - 4096, 3584),
        ]
    );
    assert_eq!(h.extent_count, 4);
    assert_eq!(h.block_count, 2 + 17 + 1 + 1);
    assert_eq!(h.meta.group, "g1");
    assert_eq!(h.meta.disk, "d0");
    assert_eq!(h.meta.node, "mt-b");
    assert_eq!(h.meta.point_id, Some(42));
    assert_eq!(h.meta.disk_bytes, DISK - 512);
    assert_eq!(bytes.len(), HEADER_BYTES + 4 * ENTRY_BYTES + 4);
    assert!(
        h.describe()
            .contains("frames after point 42 at master target mt-b")
    );
    // An empty list and an unknown point.
    let m = Meta {
        point_id: None,
        node: String::new(),
        origin: Origin::Unacknowledged,
        ..meta()
    };
    let (h, got) = decode(&encode(&m, []).unwrap()).unwrap();
    assert!(got.is_empty());
    assert_eq!(
        (h.extent_count, h.block_count, h.meta.point_id),
        (0, 0, None)
    );
    assert!(h.describe().contains("an unknown point at process server"));
}

/// Proves, for seeded random sorted extents of any alignment, that the decoded list
/// covers exactly the blocks the extents touch, merged (no two entries touch).
#[test]
fn random_extents_round_trip_to_their_blocks() {
    for seed in 0..200u64 {
        let mut rng = Rng::new(seed);
        let disk_bytes = (1 + rng.below(4096)) * 512;
        let mut xs: Vec<Extent> = (0..rng.below(40))
            .map(|_| {
                let off = rng.below(disk_bytes / 512) * 512;
                let len = (1 + rng.below(40)) * 512;
                e(off, len.min(disk_bytes - off))
            })
            .collect();
        xs.sort_unstable();
        let m = Meta {
            disk_bytes,
            ..meta()
        };
        let (h, got) = decode(&encode(&m, xs.clone()).unwrap()).unwrap();
        assert_eq!(
            blocks_of(&got, disk_bytes),
            blocks_of(&xs, disk_bytes),
            "seed {seed}"
        );
        assert!(
            got.windows(2).all(|w| w[0].end() < w[1].offset),
            "seed {seed}"
        );
        assert_eq!(h.block_count, blocks_of(&xs, disk_bytes).len() as u64);
    }
}

/// Proves the encoder refuses what would make a bad list: unsorted extents, extents
/// past the disk, empty extents, bad ids and sizes; each error names the problem.
#[test]
fn encoder_refuses_bad_input() {
    let err = |m: &Meta, xs: Vec<Extent>| encode(m, xs).unwrap_err().to_string();
    assert!(err(&meta(), vec![e(8192, 4096), e(0, 4096)]).contains("must ascend"));
    assert!(err(&meta(), vec![e(DISK - 4096, 8192)]).contains("past the disk"));
    assert!(err(&meta(), vec![e(0, 0)]).contains("empty"));
    for (m, what) in [
        (
            Meta {
                group: "G".into(),
                ..meta()
            },
            "group",
        ),
        (
            Meta {
                disk: String::new(),
                ..meta()
            },
            "disk",
        ),
        (
            Meta {
                node: "no/de".into(),
                ..meta()
            },
            "node",
        ),
        (
            Meta {
                disk_bytes: 1000,
                ..meta()
            },
            "disk_bytes",
        ),
        (
            Meta {
                point_id: Some(0),
                ..meta()
            },
            "point_id",
        ),
    ] {
        assert!(err(&m, vec![]).starts_with(what), "{what}");
    }
}

/// Proves every truncation of a valid list is a clear error, never a panic.
#[test]
fn every_truncation_is_an_error() {
    let bytes = sample();
    for n in 0..bytes.len() {
        let e = decode(&bytes[..n]).unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(
                e,
                ChangeListError::Truncated { .. } | ChangeListError::Invalid { .. }
            ),
            "cut to {n}: {text}"
        );
    }
    // Trailing bytes are refused too.
    let mut long = bytes.clone();
    long.push(0);
    assert!(
        decode(&long)
            .unwrap_err()
            .to_string()
            .contains("file length")
    );
}

/// Proves every single bit flip anywhere in a list is detected (magic, version,
/// either crc), never accepted and never a panic.
#[test]
fn every_bit_flip_is_an_error() {
    let bytes = sample();
    for byte in 0..bytes.len() {
        for bit in 0..8 {
            let mut b = bytes.clone();
            b[byte] ^= 1 << bit;
            assert!(
                decode(&b).is_err(),
                "flip of byte {byte} bit {bit} accepted"
            );
        }
    }
}

/// Proves random bytes, and random bytes behind a valid magic and version, are
/// refused with an error, never a panic or a huge allocation.
#[test]
fn random_input_is_an_error() {
    let mut rng = Rng::new(7);
    for i in 0..2000 {
        let n = rng.below(600) as usize;
        let mut b = rng.bytes(n);
        if i % 2 == 0 && b.len() >= 10 {
            b[..8].copy_from_slice(&MAGIC);
            b[8..10].copy_from_slice(&VERSION.to_le_bytes());
        }
        assert!(decode(&b).is_err(), "case {i}");
    }
}

/// Proves a header whose crc is right but whose fields are wrong is refused by
/// field, and a huge extent count is refused before any table is read.
#[test]
fn checked_fields_are_named() {
    let bytes = sample();
    let patch = |at: usize, v: &[u8]| {
        let mut b = bytes.clone();
        b[at..at + v.len()].copy_from_slice(v);
        let crc = crc32fast::hash(&b[..OFF_CRC]);
        b[OFF_CRC..HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
        decode(&b).unwrap_err().to_string()
    };
    assert!(patch(OFF_VERSION, &2u16.to_le_bytes()).contains("version 2"));
    assert!(patch(OFF_ORIGIN, &[3]).starts_with("origin"));
    assert!(patch(OFF_RESERVED0, &[1]).starts_with("reserved0"));
    assert!(patch(OFF_RESERVED1, &[1]).starts_with("reserved1"));
    assert!(patch(OFF_GROUP_LEN, &[0]).starts_with("group"));
    assert!(patch(OFF_DISK_LEN, &[65]).starts_with("disk"));
    assert!(patch(OFF_DISK + 2, b"x").starts_with("disk"), "padding");
    assert!(patch(OFF_DISK_BYTES, &0u64.to_le_bytes()).starts_with("disk_bytes"));
    assert!(patch(OFF_COUNT, &u64::MAX.to_le_bytes()).starts_with("extent_count"));
    assert!(patch(OFF_COUNT, &5u64.to_le_bytes()).contains("truncated"));
    assert!(patch(OFF_BLOCKS, &20u64.to_le_bytes()).starts_with("block_count"));
    // The magic is checked first, whatever the crc.
    let mut b = bytes.clone();
    b[0] = b'X';
    assert!(matches!(decode(&b), Err(ChangeListError::BadMagic { .. })));
}

/// Proves entries that break the rules (unaligned, overlapping or touching, past the
/// disk) are refused even with a right crc.
#[test]
fn bad_entries_are_refused() {
    let m = meta();
    let good = encode(&m, [e(0, 4096), e(8192, 4096)]).unwrap();
    let entry = |k: usize, off: u64, len: u64| {
        let mut b = good.clone();
        let at = HEADER_BYTES + k * ENTRY_BYTES;
        b[at..at + 8].copy_from_slice(&off.to_le_bytes());
        b[at + 8..at + 16].copy_from_slice(&len.to_le_bytes());
        let end = HEADER_BYTES + 2 * ENTRY_BYTES;
        let crc = crc32fast::hash(&b[HEADER_BYTES..end]);
        b[end..].copy_from_slice(&crc.to_le_bytes());
        decode(&b).unwrap_err().to_string()
    };
    assert!(entry(1, 4096, 4096).contains("must ascend"), "touching");
    assert!(entry(1, 0, 4096).contains("must ascend"), "overlapping");
    assert!(entry(1, 8192 + 512, 4096).contains("4 KiB"));
    assert!(entry(1, DISK, 4096).contains("past the disk"));
    assert!(entry(1, u64::MAX - 10, 4096).contains("past the disk"));
    assert!(entry(0, 0, 0).contains("empty"));
    // Same blocks, a different count in the header than the entries: refused.
    assert!(entry(1, 8192, 8192).starts_with("block_count"));
}

/// Proves the header layout is the documented one: a list built by hand from the
/// table's offsets decodes.
#[test]
fn layout_matches_the_doc() {
    let mut b = vec![0u8; HEADER_BYTES];
    b[0..8].copy_from_slice(b"BRCHGLST");
    b[8..10].copy_from_slice(&1u16.to_le_bytes());
    b[10] = 2;
    b[11] = 2;
    b[12] = 2;
    b[13] = 3;
    b[16..24].copy_from_slice(&(1u64 << 20).to_le_bytes());
    b[24..32].copy_from_slice(&7u64.to_le_bytes());
    b[32..40].copy_from_slice(&99u64.to_le_bytes());
    b[40..48].copy_from_slice(&1u64.to_le_bytes());
    b[48..56].copy_from_slice(&2u64.to_le_bytes());
    b[56..58].copy_from_slice(b"g1");
    b[120..122].copy_from_slice(b"d1");
    b[184..187].copy_from_slice(b"ps1");
    let crc = crc32fast::hash(&b[..252]);
    b[252..256].copy_from_slice(&crc.to_le_bytes());
    let mut table = Vec::new();
    table.extend_from_slice(&65536u64.to_le_bytes());
    table.extend_from_slice(&8192u64.to_le_bytes());
    b.extend_from_slice(&table);
    b.extend_from_slice(&crc32fast::hash(&table).to_le_bytes());
    let (h, xs) = decode(&b).unwrap();
    assert_eq!(h.meta.origin, Origin::Unacknowledged);
    assert_eq!((h.meta.group.as_str(), h.meta.disk.as_str()), ("g1", "d1"));
    assert_eq!(h.meta.node, "ps1");
    assert_eq!((h.meta.point_id, h.meta.created_unix_ms), (Some(7), 99));
    assert_eq!(xs, vec![e(65536, 8192)]);
    // And the encoder writes the same bytes.
    let m = h.meta.clone();
    assert_eq!(encode(&m, xs).unwrap(), b);
}

/// Proves lists of many chunks stream through the file functions: written, read back
/// entry by entry, checked for their disk and size (another disk or size is refused,
/// naming the file).
#[test]
fn file_write_read_check() {
    let fs = SimFs::new();
    let dir = Path::new("/lists");
    fs.create_dir_all(dir).unwrap();
    // Every other block of 40 MiB: 5120 entries, more than one chunk.
    let m = Meta {
        disk_bytes: 40 << 20,
        ..meta()
    };
    let xs: Vec<Extent> = (0..(40u64 << 20) / 8192)
        .map(|k| e(k * 8192, 4096))
        .collect();
    assert!(xs.len() > CHUNK_ENTRIES);
    let h = write(&fs, dir, "d0.chg", &m, xs.clone()).unwrap();
    assert_eq!(h.extent_count, xs.len() as u64);
    let path = dir.join("d0.chg");
    let mut got = Vec::new();
    let h2 = read(&fs, &path, &mut |x| got.push(x)).unwrap();
    assert_eq!((h2, &got), (h.clone(), &xs));
    assert_eq!(check(&fs, &path, "d0", 40 << 20).unwrap(), h);
    let e1 = check(&fs, &path, "d1", 40 << 20).unwrap_err().to_string();
    assert!(
        e1.contains("/lists/d0.chg") && e1.contains("not \"d1\""),
        "{e1}"
    );
    let e2 = check(&fs, &path, "d0", 1 << 20).unwrap_err().to_string();
    assert!(e2.contains("1048576"), "{e2}");
    let e3 = check(&fs, &dir.join("nope.chg"), "d0", 1)
        .unwrap_err()
        .to_string();
    assert!(e3.contains("nope.chg") && e3.contains("open"), "{e3}");
    // A damaged entry far into the file is refused by its bounds, a damaged table crc
    // by the crc.
    fs.flip_bit(&path, HEADER_BYTES + 4000 * ENTRY_BYTES + 3, 1);
    let e4 = check(&fs, &path, "d0", 40 << 20).unwrap_err().to_string();
    assert!(
        e4.contains("/lists/d0.chg") && e4.contains("past the disk"),
        "{e4}"
    );
    fs.flip_bit(&path, HEADER_BYTES + 4000 * ENTRY_BYTES + 3, 1);
    check(&fs, &path, "d0", 40 << 20).unwrap();
    fs.flip_bit(&path, HEADER_BYTES + xs.len() * ENTRY_BYTES + 1, 7);
    let e5 = check(&fs, &path, "d0", 40 << 20).unwrap_err().to_string();
    assert!(e5.contains("extent table crc32"), "{e5}");
}

/// Proves replacing a list is atomic: a crash at every durability step of `write`
/// leaves the old list or the new one, each whole.
#[test]
fn crash_while_replacing_keeps_old_or_new() {
    let dir = Path::new("/lists");
    let old = vec![e(0, 4096)];
    let new = vec![e(8192, 4096), e(1 << 20, 8192)];
    let steps = {
        let fs = SimFs::new();
        fs.create_dir_all(dir).unwrap();
        write(&fs, dir, "d0.chg", &meta(), old.clone()).unwrap();
        let before = fs.steps();
        write(&fs, dir, "d0.chg", &meta(), new.clone()).unwrap();
        fs.steps() - before
    };
    assert!(steps >= 2);
    for step in 1..=steps {
        for seed in 0..4 {
            let fs = SimFs::new();
            fs.create_dir_all(dir).unwrap();
            write(&fs, dir, "d0.chg", &meta(), old.clone()).unwrap();
            fs.crash_after(step);
            let _ = write(&fs, dir, "d0.chg", &meta(), new.clone());
            fs.crash(CrashMode::Torn { seed });
            let mut got = Vec::new();
            read(&fs, &dir.join("d0.chg"), &mut |x| got.push(x)).unwrap();
            assert!(got == old || got == new, "step {step} seed {seed}: {got:?}");
        }
    }
}
