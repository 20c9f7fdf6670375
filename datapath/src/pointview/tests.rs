use super::*;
use crate::frame::{DataFrameMeta, Encoder, Frame, PointKind, PointRecord};
use crate::journal::{Journal, JournalConfig, RecoveryMode};
use crate::storage::{self, OpenMode, SimFs};
use crate::testutil::Rng;

const DISK_BYTES: u64 = 1 << 20;
const DISKS: [&str; 2] = ["d0", "d1"];

fn p(s: &str) -> PathBuf {
    PathBuf::from(s)
}

fn view_disks() -> Vec<ViewDisk> {
    DISKS
        .iter()
        .map(|d| ViewDisk {
            id: d.to_string(),
            size_bytes: DISK_BYTES,
        })
        .collect()
}

fn replica_path(d: &str) -> PathBuf {
    p(&format!("/mt/replica-{d}"))
}

/// A journal of random writes (data and zeros, overlapping, several extents per frame)
/// with a point after each epoch; returns it and the disks' contents at each point
/// (by point id), the replicas holding `base`.
/// The disks' contents at each point, by point id.
type States = Vec<(u64, Vec<Vec<u8>>)>;

fn journal(fs: &SimFs, seed: u64) -> (Journal, States) {
    let mut rng = Rng::new(seed);
    let base: Vec<Vec<u8>> = (0..2)
        .map(|_| (0..DISK_BYTES).map(|_| rng.next() as u8).collect())
        .collect();
    fs.create_dir_all(&p("/mt")).unwrap();
    for (d, b) in DISKS.iter().zip(&base) {
        let f = fs.open(&replica_path(d), OpenMode::CreateNew).unwrap();
        f.write_all_at(b, 0).unwrap();
        f.sync_data().unwrap();
    }
    let cfg = JournalConfig {
        segment_bytes_max: 96 << 10,
        recovery: RecoveryMode::TolerateTailCorruption,
    };
    let (mut j, _) = Journal::open(Arc::new(fs.clone()), &p("/mt/journal"), "g", cfg).unwrap();
    let mut disks = base;
    let mut states = Vec::new();
    let mut enc = Encoder::new(1);
    let mut seq = 0u64;
    let mut out = Vec::new();
    for epoch in 1..=12u64 {
        for _ in 0..(1 + rng.below(4)) {
            let d = rng.below(2) as usize;
            // Sorted, non-overlapping extents within one frame: bytes, or a zero length.
            let mut at = rng.below(DISK_BYTES / 2 / 512) * 512;
            let mut owned: Vec<(u64, Result<Vec<u8>, u64>)> = Vec::new();
            for _ in 0..(1 + rng.below(5)) {
                let len = (1 + rng.below(24)) * 512;
                if at + len > DISK_BYTES {
                    break;
                }
                let range = at as usize..(at + len) as usize;
                if rng.below(4) == 0 {
                    disks[d][range].fill(0);
                    owned.push((at, Err(len)));
                } else {
                    let b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                    disks[d][range].copy_from_slice(&b);
                    owned.push((at, Ok(b)));
                }
                at += len + rng.below(8) * 512;
            }
            if owned.is_empty() {
                continue;
            }
            let extents: Vec<(u64, ExtentData<'_>)> = owned
                .iter()
                .map(|(o, b)| match b {
                    Ok(b) => (*o, ExtentData::Bytes(b)),
                    Err(n) => (*o, ExtentData::Zero(*n)),
                })
                .collect();
            seq += 1;
            let meta = DataFrameMeta {
                group: "g".into(),
                disk: DISKS[d].into(),
                epoch,
            };
            enc.encode_data(&meta, seq, &extents, &mut out).unwrap();
            j.append(&out).unwrap();
        }
        seq += 1;
        let rec = PointRecord {
            point_id: epoch,
            epoch,
            time_unix_ms: epoch * 1000,
            kind: PointKind::Crash,
            consistent: true,
            group: "g".into(),
        };
        frame::encode_point(&rec, seq, &mut out);
        j.append(&out).unwrap();
        j.commit().unwrap();
        states.push((epoch, disks.clone()));
    }
    (j, states)
}

fn entries_through(j: &Journal, point_id: u64) -> Vec<FrameEntry> {
    let pe = j.point_by_id(point_id).unwrap();
    (j.base_seq() + 1..=pe.seq)
        .map(|s| *j.entry(s).unwrap())
        .collect()
}

fn view(fs: &SimFs, j: &Journal, point_id: u64) -> PointView {
    let (idx, stats) = PointIndex::build(
        fs,
        &p("/mt/journal"),
        "g",
        &entries_through(j, point_id),
        &view_disks(),
    )
    .unwrap();
    assert!(stats.data_frames > 0);
    let reps: Vec<PathBuf> = DISKS.iter().map(|d| replica_path(d)).collect();
    PointView::new(idx, Arc::new(fs.clone()), &reps).unwrap()
}

/// Proves every point reads back as exactly the disks at that point, whole and in
/// random slices that cross extents, frames and gaps.
#[test]
fn every_point_reads_exact() {
    for seed in 1..=4u64 {
        let fs = SimFs::new();
        let (j, states) = journal(&fs, seed);
        let mut rng = Rng::new(seed ^ 77);
        for (pid, disks) in &states {
            let mut v = view(&fs, &j, *pid);
            for (d, want) in disks.iter().enumerate() {
                let mut got = vec![0u8; DISK_BYTES as usize];
                v.read(d, 0, &mut got).unwrap();
                assert!(got == *want, "seed {seed} point {pid} disk {d}");
                for _ in 0..20 {
                    let off = rng.below(DISK_BYTES);
                    let len = rng.below((DISK_BYTES - off).min(100_000)) as usize;
                    let mut b = vec![0u8; len];
                    v.read(d, off, &mut b).unwrap();
                    assert!(b[..] == want[off as usize..off as usize + len]);
                }
            }
            let mut b = [0u8; 2];
            assert!(v.read(0, DISK_BYTES - 1, &mut b).is_err());
        }
    }
}

/// Folds the journal through point `point_id` as retention does: its frames applied to
/// the replicas, synced, then dropped (whole segments removed).
fn fold_through(fs: &SimFs, j: &mut Journal, point_id: u64) {
    let through = j.point_by_id(point_id).unwrap().seq;
    let mut dec = Decoder::new();
    let reps: Vec<Box<dyn StorageFile>> = DISKS
        .iter()
        .map(|d| fs.open(&replica_path(d), OpenMode::Existing).unwrap())
        .collect();
    for r in j.read(j.base_seq() + 1, through).unwrap() {
        let (_, bytes) = r.unwrap();
        if let Frame::Data(f) = frame::decode(&bytes, &mut dec).unwrap() {
            let d = DISKS.iter().position(|x| *x == f.meta.disk).unwrap();
            for (off, data) in f.extents() {
                match data {
                    ExtentData::Bytes(b) => reps[d].write_all_at(b, off).unwrap(),
                    ExtentData::Zero(n) => reps[d].write_all_at(&vec![0; n as usize], off).unwrap(),
                }
            }
        }
    }
    for r in &reps {
        r.sync_data().unwrap();
    }
    let dropped = j.drop_through(through).unwrap();
    assert!(dropped > 0, "the fold should drop whole segments");
}

fn assert_reads(v: &mut PointView, want: &[Vec<u8>], what: &str) {
    for (d, w) in want.iter().enumerate() {
        let mut got = vec![0u8; DISK_BYTES as usize];
        v.read(d, 0, &mut got).unwrap();
        assert!(got == *w, "disk {d} {what}");
    }
}

/// Proves a view built before retention folded the frames it indexes (applied to the
/// replica, then their segments dropped) still reads its point exactly: the folded
/// ranges come from the replica.
#[test]
fn view_survives_a_fold_under_it() {
    let fs = SimFs::new();
    let (mut j, states) = journal(&fs, 9);
    let (last, want) = states.last().unwrap().clone();
    let mut v = view(&fs, &j, last);
    fold_through(&fs, &mut j, 6);
    assert_reads(&mut v, &want, "after the fold");
}

/// Proves an index built from a copy of the journal's entries that a fold overtook
/// (the copy still names frames whose segments are gone) skips the folded frames and
/// reads its point exactly, an older point as well as the newest.
#[test]
fn index_from_entries_a_fold_overtook() {
    for pid in [8u64, 12] {
        let fs = SimFs::new();
        let (mut j, states) = journal(&fs, 21);
        let want = states.iter().find(|(p, _)| *p == pid).unwrap().1.clone();
        let stale = entries_through(&j, pid);
        fold_through(&fs, &mut j, 5);
        let (idx, stats) =
            PointIndex::build(&fs, &p("/mt/journal"), "g", &stale, &view_disks()).unwrap();
        assert!(stats.folded_frames > 0, "point {pid}: {stats:?}");
        assert!(stats.data_frames > 0, "point {pid}: {stats:?}");
        let reps: Vec<PathBuf> = DISKS.iter().map(|d| replica_path(d)).collect();
        let mut v = PointView::new(idx, Arc::new(fs.clone()), &reps).unwrap();
        assert_reads(
            &mut v,
            &want,
            &format!("at point {pid}, index built after the fold"),
        );
    }
}

/// Proves a RangeMap keeps the newest source of each byte.
#[test]
fn range_map_newest_wins() {
    let src = |seq| Src {
        seq,
        extent: 0,
        extent_offset: 0,
        zero: false,
    };
    let mut m = RangeMap::default();
    m.insert(10, 50, src(1));
    m.insert(20, 30, src(2));
    m.insert(0, 15, src(3));
    m.insert(45, 60, src(4));
    let got: Vec<(u64, u64, Option<u64>)> = m
        .pieces(0, 70)
        .into_iter()
        .map(|(a, b, s)| (a, b, s.map(|s| s.seq)))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, 15, Some(3)),
            (15, 20, Some(1)),
            (20, 30, Some(2)),
            (30, 45, Some(1)),
            (45, 60, Some(4)),
            (60, 70, None)
        ]
    );
    // A slice that starts inside a range.
    let got: Vec<_> = m
        .pieces(25, 47)
        .into_iter()
        .map(|(a, b, s)| (a, b, s.map(|s| s.seq)))
        .collect();
    assert_eq!(
        got,
        vec![(25, 30, Some(2)), (30, 45, Some(1)), (45, 47, Some(4))]
    );
    m.insert(0, 100, src(5));
    assert_eq!(m.len(), 1);
}

/// Proves a view extended point by point with the frames after each reads exactly as
/// the disks at each point, like a view built at once (how a master target keeps its
/// latest state up to date as frames arrive).
#[test]
fn extended_view_follows_every_point() {
    for seed in 1..=3u64 {
        let fs = SimFs::new();
        let (j, states) = journal(&fs, seed);
        let reps: Vec<PathBuf> = DISKS.iter().map(|d| replica_path(d)).collect();
        let (idx, _) = PointIndex::build(&fs, &p("/mt/journal"), "g", &[], &view_disks()).unwrap();
        assert!(!idx.touches(0) && !idx.touches(1));
        let mut v = PointView::new(idx, Arc::new(fs.clone()), &reps).unwrap();
        let mut through = j.base_seq();
        for (id, disks) in &states {
            let upto = j.point_by_id(*id).unwrap().seq;
            let more: Vec<FrameEntry> =
                (through + 1..=upto).map(|s| *j.entry(s).unwrap()).collect();
            v.index_mut().extend(&fs, &more).unwrap();
            through = upto;
            for (d, want) in disks.iter().enumerate() {
                let mut got = vec![0u8; DISK_BYTES as usize];
                v.read(d, 0, &mut got).unwrap();
                assert!(&got == want, "seed {seed}: point {id} disk {d} differs");
            }
        }
        assert!(v.index().touches(0) || v.index().touches(1));
    }
}

/// The journal's segment files, oldest first.
fn segments(fs: &SimFs) -> Vec<u64> {
    let mut s: Vec<u64> = fs
        .list_dir(&p("/mt/journal"))
        .unwrap()
        .iter()
        .filter_map(|n| {
            n.strip_prefix("journal-")?
                .strip_suffix(".seg")?
                .parse()
                .ok()
        })
        .collect();
    s.sort_unstable();
    s
}

fn index_path(first_seq: u64) -> PathBuf {
    p("/mt/journal").join(segindex::index_name(first_seq))
}

/// Replaces (or creates) a file's contents durably.
fn put(fs: &SimFs, path: &Path, bytes: &[u8]) {
    let f = fs.open(path, OpenMode::Create).unwrap();
    f.set_len(0).unwrap();
    f.write_all_at(bytes, 0).unwrap();
    f.sync_data().unwrap();
}

fn build_at(fs: &SimFs, entries: &[FrameEntry]) -> (PointIndex, IndexStats) {
    PointIndex::build(fs, &p("/mt/journal"), "g", entries, &view_disks()).unwrap()
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(12))]

    /// Proves, over random journals, that the index a point gets from the segments'
    /// index files is the one its frames give (every point, the sealed segments'
    /// tables taken from the files), and that unusable files (cut short) are ignored
    /// and give that same index.
    #[test]
    fn index_files_give_the_index_the_frames_give(seed in proptest::prelude::any::<u64>()) {
        let fs = SimFs::new();
        let (j, states) = journal(&fs, seed);
        let segs = segments(&fs);
        proptest::prop_assert!(segs.len() >= 3, "the journal must seal segments");
        let mut from_files = Vec::new();
        for (pid, _) in &states {
            let (idx, stats) = build_at(&fs, &entries_through(&j, *pid));
            proptest::prop_assert_eq!(stats.indexed_frames + stats.peeked_frames, stats.data_frames);
            proptest::prop_assert_eq!(stats.indexes_ignored, 0);
            from_files.push((idx, stats));
        }
        proptest::prop_assert!(from_files.last().unwrap().1.indexed_frames > 0);
        for &s in &segs[..segs.len() - 1] {
            let mut b = storage::read_whole(&fs, &index_path(s)).unwrap().unwrap();
            b.truncate(b.len() - 1);
            put(&fs, &index_path(s), &b);
        }
        for ((pid, _), (want, stats)) in states.iter().zip(&from_files) {
            let (idx, st) = build_at(&fs, &entries_through(&j, *pid));
            proptest::prop_assert_eq!(st.indexed_frames, 0);
            proptest::prop_assert_eq!(st.peeked_frames, st.data_frames);
            proptest::prop_assert_eq!(st.data_frames, stats.data_frames);
            proptest::prop_assert!(idx == *want, "point {}: the frames give another index", pid);
        }
    }
}

/// Re-encodes data frame `seq` of `j` with its extents moved by `delta` bytes or on
/// disk `disk`: the same length, other contents.
fn forged(j: &Journal, seq: u64, delta: i64, disk: &str) -> Vec<u8> {
    let bytes = j.read(seq, seq).unwrap().next().unwrap().unwrap().1;
    let f = Decoder::new().decode_data(&bytes).unwrap();
    let extents: Vec<(u64, ExtentData<'_>)> = f
        .extents()
        .map(|(o, d)| (o.checked_add_signed(delta).unwrap(), d))
        .collect();
    let meta = DataFrameMeta {
        disk: disk.into(),
        ..f.meta.clone()
    };
    let mut out = Vec::new();
    Encoder::new(1)
        .encode_data(&meta, seq, &extents, &mut out)
        .unwrap();
    assert_eq!(
        out.len(),
        bytes.len(),
        "the forgery keeps the frame's length"
    );
    out
}

/// Proves an index file that lies about a frame yet is whole and agrees with its
/// segment (crcs right, lengths, header and last frame as they are) never decides a
/// byte: a read of what it claims reads the frame, finds it elsewhere or of another
/// disk, and fails naming the frame, instead of serving its bytes.
#[test]
fn a_lying_index_file_is_caught_on_read() {
    let fs = SimFs::new();
    let (j, _) = journal(&fs, 5);
    let segs = segments(&fs);
    let all: Vec<FrameEntry> = (1..=j.write_seq()).map(|s| *j.entry(s).unwrap()).collect();
    // A data frame of a sealed segment, not its last frame (whose header is checked).
    let seg_of = |s: u64| all.iter().filter(move |e| e.segment == s);
    let (seg, x) = segs[..segs.len() - 1]
        .iter()
        .find_map(|&s| {
            let n = seg_of(s).count();
            let x = seg_of(s).take(n - 1).find(|e| e.kind == FrameKind::Data)?;
            Some((s, *x))
        })
        .expect("a sealed segment with a data frame before its last");
    let bytes = j.read(x.seq, x.seq).unwrap().next().unwrap().unwrap().1;
    let info = frame::peek_data(&bytes).unwrap();
    let d = DISKS.iter().position(|n| *n == info.meta.disk).unwrap();
    let last_end = info.entries.last().unwrap().end();
    let delta: i64 = if last_end + 512 <= DISK_BYTES {
        512
    } else {
        -512
    };
    let other = DISKS[1 - d];
    for (what, lie, read_disk, shift) in [
        (
            "moved extents",
            forged(&j, x.seq, delta, DISKS[d]),
            d,
            delta,
        ),
        ("another disk", forged(&j, x.seq, 0, other), 1 - d, 0),
    ] {
        let mut b = crate::journal::segindex::IndexBuilder::default();
        for e in seg_of(seg) {
            let f = if e.seq == x.seq {
                lie.clone()
            } else {
                j.read(e.seq, e.seq).unwrap().next().unwrap().unwrap().1
            };
            b.push(&f, &frame::verify(&f).unwrap());
        }
        let seg_len = fs
            .open(
                &p("/mt/journal").join(segment_name(seg)),
                OpenMode::ReadOnly,
            )
            .unwrap()
            .len()
            .unwrap();
        put(&fs, &index_path(seg), &b.encode("g", seg, seg_len));
        let through: Vec<FrameEntry> = all.iter().take_while(|e| e.seq <= x.seq).copied().collect();
        let (idx, stats) = build_at(&fs, &through);
        assert!(
            stats.indexed_frames > 0,
            "{what}: the file was used: {stats:?}"
        );
        let reps: Vec<PathBuf> = DISKS.iter().map(|d| replica_path(d)).collect();
        let mut v = PointView::new(idx, Arc::new(fs.clone()), &reps).unwrap();
        let e = &info.entries[0];
        let mut buf = vec![0u8; e.len as usize];
        let r = v.read(
            read_disk,
            e.offset.checked_add_signed(shift).unwrap(),
            &mut buf,
        );
        assert!(
            matches!(r, Err(PointViewError::IndexMismatch { seq, .. }) if seq == x.seq),
            "{what}: {r:?}"
        );
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

    /// Proves laying many ranges at once over a map (one sweep) gives exactly the map
    /// that inserting them one after the other gives, over a map that already holds
    /// split ranges, with ranges that nest, touch, repeat and are empty.
    #[test]
    fn insert_all_is_inserting_in_turn(
        held in proptest::collection::vec((0u64..2000, 0u64..300), 0..60),
        items in proptest::collection::vec((0u64..2000, 0u64..300), 0..400),
    ) {
        let mut one_by_one: RangeMap<u32> = RangeMap::default();
        for (i, (s, l)) in held.iter().enumerate() {
            one_by_one.insert(*s, s + l, i as u32);
        }
        let mut at_once = one_by_one.clone();
        let items: Vec<(u64, u64, u32)> = items
            .iter()
            .enumerate()
            .map(|(i, (s, l))| (*s, s + l, 1000 + i as u32))
            .collect();
        for (s, e, v) in &items {
            one_by_one.insert(*s, *e, *v);
        }
        at_once.insert_all(items);
        proptest::prop_assert_eq!(at_once, one_by_one);
    }
}
