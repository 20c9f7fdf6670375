use super::*;
use crate::frame::{DataFrameMeta, Encoder, Frame, PointKind, PointRecord};
use crate::journal::{Journal, JournalConfig, RecoveryMode};
use crate::storage::{OpenMode, SimFs};
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
            PointIndex::build(&fs, &p("/mt/journal"), &stale, &view_disks()).unwrap();
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
        let (idx, _) = PointIndex::build(&fs, &p("/mt/journal"), &[], &view_disks()).unwrap();
        assert!(!idx.touches(0) && !idx.touches(1));
        let mut v = PointView::new(idx, Arc::new(fs.clone()), &reps).unwrap();
        let mut through = j.base_seq();
        for (id, disks) in &states {
            let upto = j.point_by_id(*id).unwrap().seq;
            let more: Vec<FrameEntry> =
                (through + 1..=upto).map(|s| *j.entry(s).unwrap()).collect();
            v.index_mut().extend(&fs, &p("/mt/journal"), &more).unwrap();
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
