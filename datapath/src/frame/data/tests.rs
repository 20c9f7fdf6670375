use super::*;
use crate::frame::{FrameKind, HEADER_BYTES, MAX_BODY_BYTES, PointKind, PointRecord};
use proptest::prelude::*;

/// A small deterministic generator (xorshift64*) so failures reproduce from the seed.
use crate::testutil::Rng;

/// Text-like bytes that zstd shrinks well.
fn compressible(n: usize, seed: u64) -> Vec<u8> {
    let words: [&[u8]; 5] = [b"block ", b"replica ", b"journal ", b"epoch ", b"frame "];
    let mut rng = Rng(seed | 1);
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        v.extend_from_slice(words[(rng.next() % 5) as usize]);
    }
    v.truncate(n);
    v
}

fn meta() -> DataFrameMeta {
    DataFrameMeta {
        group: "g1".into(),
        disk: "d0".into(),
        epoch: 5,
    }
}

/// The 1024 bytes `i % 251` whose blake3 is pinned by the official BLAKE3 test vectors.
fn pattern_1024() -> Vec<u8> {
    (0..1024).map(|i| (i % 251) as u8).collect()
}

/// The frame of `data_golden_raw_and_zero_extent`: one raw extent and one zero extent.
fn frame_a() -> Vec<u8> {
    let data = pattern_1024();
    let mut out = Vec::new();
    Encoder::uncompressed()
        .encode_data(
            &meta(),
            9,
            &[
                (0, ExtentData::Bytes(&data)),
                (4096, ExtentData::Zero(2048)),
            ],
            &mut out,
        )
        .unwrap();
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// Recomputes the header (body length, crc) of a frame whose body a test changed.
fn reseal(frame: &mut [u8]) {
    let kind = FrameKind::from_u8(frame[6]).unwrap();
    let seq = u64::from_le_bytes(frame[16..24].try_into().unwrap());
    seal(frame, kind, seq);
}

/// Builds frame A, lets `f` change it, reseals it and returns the decoder's refusal.
fn corrupt_a(f: impl FnOnce(&mut Vec<u8>)) -> FrameError {
    let mut frame = frame_a();
    f(&mut frame);
    reseal(&mut frame);
    Decoder::new()
        .decode_data(&frame)
        .expect_err("corrupted frame was accepted")
}

fn put_u32(frame: &mut [u8], at: usize, v: u32) {
    frame[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(frame: &mut [u8], at: usize, v: u64) {
    frame[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

// Offsets in frame A (ids "g1" and "d0"), from the layout table.
const A_COUNT: usize = HEADER_BYTES + 8;
const A_ENCODING: usize = HEADER_BYTES + 12;
const A_RESERVED: usize = HEADER_BYTES + 13;
const A_PLAIN: usize = HEADER_BYTES + 16;
const A_PAYLOAD_LEN: usize = HEADER_BYTES + 20;
const A_GROUP: usize = HEADER_BYTES + 24;
const A_E0: usize = HEADER_BYTES + 30;
const A_E1: usize = A_E0 + EXTENT_ENTRY_BYTES;
const A_PAYLOAD: usize = A_E1 + EXTENT_ENTRY_BYTES;

/// The expected decoding of `extents`: all-zero bytes come back as zero extents.
fn model(extents: &[(u64, ExtentData<'_>)]) -> Vec<(u64, Option<Vec<u8>>, u64)> {
    extents
        .iter()
        .map(|(o, d)| match d {
            ExtentData::Bytes(b) if b.iter().any(|&x| x != 0) => (*o, Some(b.to_vec()), d.len()),
            _ => (*o, None, d.len()),
        })
        .collect()
}

fn decoded(f: &DataFrame) -> Vec<(u64, Option<Vec<u8>>, u64)> {
    f.extents()
        .map(|(o, d)| match d {
            ExtentData::Bytes(b) => (o, Some(b.to_vec()), d.len()),
            ExtentData::Zero(n) => (o, None, n),
        })
        .collect()
}

/// Proves a data frame round-trips through each payload encoding (raw, zstd, none) and
/// the stats say what was stored.
#[test]
fn data_round_trip_each_payload_kind() {
    let mut rng = Rng(7);
    let random = rng.bytes(64 << 10);
    let text = compressible(256 << 10, 3);
    let zeros = vec![0u8; 8192];
    let cases: Vec<(Vec<(u64, ExtentData<'_>)>, PayloadEncoding)> = vec![
        (vec![(0, ExtentData::Bytes(&random))], PayloadEncoding::Raw),
        (
            vec![
                (0, ExtentData::Bytes(&text[..4096])),
                (1 << 20, ExtentData::Bytes(&text)),
            ],
            PayloadEncoding::Zstd,
        ),
        (
            vec![
                (512, ExtentData::Zero(1 << 30)),
                ((2 << 30) + 512, ExtentData::Bytes(&zeros)),
            ],
            PayloadEncoding::None,
        ),
        (
            vec![
                (0, ExtentData::Bytes(&random[..4096])),
                (4096, ExtentData::Bytes(&zeros)),
                (65536, ExtentData::Zero(512)),
                (70000 / 512 * 512 + 512, ExtentData::Bytes(&text[..512])),
            ],
            PayloadEncoding::Zstd,
        ),
    ];
    let mut enc = Encoder::default();
    let mut dec = Decoder::new();
    let mut out = Vec::new();
    for (i, (extents, encoding)) in cases.iter().enumerate() {
        let stats = enc
            .encode_data(&meta(), 100 + i as u64, extents, &mut out)
            .unwrap();
        assert_eq!(stats.encoding, *encoding, "case {i}");
        let f = dec.decode_data(&out).unwrap();
        assert_eq!(f.seq, 100 + i as u64);
        assert_eq!(f.meta, meta());
        assert_eq!(decoded(&f), model(extents), "case {i}");
        assert_eq!(f.plain_bytes(), stats.plain_bytes);
        assert_eq!(f.zero_bytes(), stats.zero_bytes);
        assert_eq!(f.payload_bytes(), stats.payload_bytes);
        assert_eq!(f.encoding(), stats.encoding);
        let total: u64 = extents.iter().map(|(_, d)| d.len()).sum();
        assert_eq!(stats.plain_bytes + stats.zero_bytes, total);
        match stats.encoding {
            PayloadEncoding::Raw => assert_eq!(stats.payload_bytes, stats.plain_bytes),
            PayloadEncoding::Zstd => assert!(stats.payload_bytes < stats.plain_bytes),
            PayloadEncoding::None => assert_eq!(stats.payload_bytes, 0),
        }
        let info = peek_data(&out).unwrap();
        assert_eq!(info.entries, f.entries());
        assert_eq!(info.plain_bytes, f.plain_bytes());
        assert_eq!(
            encoded_plain_bytes(&out).map(u64::from),
            Some(f.plain_bytes())
        );
        dec.recycle(f);
    }
}

/// Proves the data frame layout (raw payload plus a zero extent) is pinned byte for byte.
#[test]
fn data_golden_raw_and_zero_extent() {
    let out = frame_a();
    // Pinned: a change here is a format change and needs a new version. Computed
    // independently from the layout table (Python struct + zlib.crc32); the blake3 is the
    // official BLAKE3 test vector for 1024 bytes of `i % 251`.
    assert_eq!(
        hex(&out[..out.len() - 1024]),
        "42524652010001008e040000000000000900000000000000000000007fc20e84\
         0500000000000000020000000100000000040000000400000267310264300000\
         0000000000000004000000000000000000000000000042214739f095a406f3fc\
         83deb889744ac00df831c10daa55189b5d121c855af700100000000000000008\
         0000000000000100000000000000000000000000000000000000000000000000\
         0000000000000000000000000000",
        "data frame layout changed"
    );
    assert_eq!(&out[out.len() - 1024..], &pattern_1024()[..]);
    let f = Decoder::new().decode_data(&out).unwrap();
    assert_eq!(f.seq, 9);
    assert_eq!(f.encoding(), PayloadEncoding::Raw);
    let got: Vec<_> = f.extents().collect();
    assert_eq!(
        got,
        vec![
            (0, ExtentData::Bytes(&pattern_1024())),
            (4096, ExtentData::Zero(2048))
        ]
    );
}

/// Proves a frame of zero extents only (one given as all-zero bytes) has no payload and
/// its layout is pinned byte for byte.
#[test]
fn data_golden_zero_only() {
    let zeros = vec![0u8; 512];
    let mut out = Vec::new();
    let m = DataFrameMeta { epoch: 7, ..meta() };
    let stats = Encoder::default()
        .encode_data(
            &m,
            3,
            &[
                (1 << 20, ExtentData::Bytes(&zeros)),
                (2 << 20, ExtentData::Zero(4096)),
            ],
            &mut out,
        )
        .unwrap();
    assert_eq!(stats.encoding, PayloadEncoding::None);
    assert_eq!((stats.plain_bytes, stats.zero_bytes), (0, 4608));
    // Pinned, computed independently (Python struct + zlib.crc32) from the layout table.
    assert_eq!(
        hex(&out),
        "42524652010001008e00000000000000030000000000000000000000fa311d85\
         0700000000000000020000000000000000000000000000000267310264300000\
         1000000000000002000000000000010000000000000000000000000000000000\
         0000000000000000000000000000000000000000000000002000000000000010\
         0000000000000100000000000000000000000000000000000000000000000000\
         0000000000000000000000000000",
        "data frame layout changed"
    );
    let f = Decoder::new().decode_data(&out).unwrap();
    assert_eq!(f.meta, m);
    assert_eq!(f.plain_bytes(), 0);
    assert_eq!(f.zero_bytes(), 4608);
}

/// Proves that sampling decides: random bytes are stored raw, and a payload whose
/// samples are random is stored raw even if zstd could shrink the rest, while one
/// whose samples compress is compressed.
#[test]
fn incompressible_detected_by_samples() {
    let mut rng = Rng(11);
    let n = 1 << 20;
    let random = rng.bytes(n);
    let mut enc = Encoder::default();
    let mut out = Vec::new();
    let s = enc
        .encode_data(&meta(), 1, &[(0, ExtentData::Bytes(&random))], &mut out)
        .unwrap();
    assert_eq!(s.encoding, PayloadEncoding::Raw);
    assert_eq!(s.payload_bytes, n as u64);

    // Random where the three samples lie (start, middle, end), compressible elsewhere.
    let mut mixed = compressible(n, 5);
    let mid = (n - SAMPLE_BYTES) / 2;
    for at in [0, mid, n - SAMPLE_BYTES] {
        mixed[at..at + SAMPLE_BYTES].copy_from_slice(&rng.bytes(SAMPLE_BYTES));
    }
    let s = enc
        .encode_data(&meta(), 2, &[(0, ExtentData::Bytes(&mixed))], &mut out)
        .unwrap();
    assert_eq!(
        s.encoding,
        PayloadEncoding::Raw,
        "samples said incompressible"
    );

    // The reverse: compressible samples, random elsewhere; zstd still shrinks it a bit
    // or falls back to raw, and either way it decodes.
    let mut text_samples = random.clone();
    let text = compressible(SAMPLE_BYTES, 9);
    for at in [0, mid, n - SAMPLE_BYTES] {
        text_samples[at..at + SAMPLE_BYTES].copy_from_slice(&text);
    }
    enc.encode_data(
        &meta(),
        3,
        &[(0, ExtentData::Bytes(&text_samples))],
        &mut out,
    )
    .unwrap();
    let f = Decoder::new().decode_data(&out).unwrap();
    assert_eq!(
        f.extents().next(),
        Some((0, ExtentData::Bytes(&text_samples[..])))
    );

    // Split over several extents, the samples are gathered across them.
    let parts = chunks_with_gaps(&mixed);
    let s = enc.encode_data(&meta(), 4, &parts, &mut out).unwrap();
    assert_eq!(s.encoding, PayloadEncoding::Raw);
    let text = compressible(n, 13);
    let s = enc
        .encode_data(
            &meta(),
            5,
            &[
                (0, ExtentData::Bytes(&text[..n / 2])),
                (n as u64, ExtentData::Bytes(&text[n / 2..])),
            ],
            &mut out,
        )
        .unwrap();
    assert_eq!(s.encoding, PayloadEncoding::Zstd);
    assert_eq!(decoded(&Decoder::new().decode_data(&out).unwrap()).len(), 2);
}

/// Splits `b` into 64 KiB extents with 512-byte gaps.
fn chunks_with_gaps(b: &[u8]) -> Vec<(u64, ExtentData<'_>)> {
    b.chunks(64 << 10)
        .enumerate()
        .map(|(i, c)| ((i as u64) * ((64 << 10) + 512), ExtentData::Bytes(c)))
        .collect()
}

/// Proves the encoder refuses extents that break the frame rules, naming the field.
#[test]
fn encoder_refuses_bad_extents() {
    let mut enc = Encoder::default();
    let mut out = Vec::new();
    let b = vec![1u8; 1024];
    let mut field_of = |m: &DataFrameMeta, ex: &[(u64, ExtentData<'_>)]| -> &'static str {
        match enc.encode_data(m, 1, ex, &mut out).unwrap_err() {
            FrameError::Invalid { field, .. } | FrameError::TooLarge { field, .. } => field,
            e => panic!("unexpected {e:?}"),
        }
    };
    let m = meta();
    assert_eq!(field_of(&m, &[]), "extent_count");
    assert_eq!(
        field_of(&m, &[(100, ExtentData::Bytes(&b))]),
        "extent.offset"
    );
    assert_eq!(
        field_of(&m, &[(0, ExtentData::Bytes(&b[..1000]))]),
        "extent.len"
    );
    assert_eq!(field_of(&m, &[(0, ExtentData::Zero(0))]), "extent.len");
    let overlap = [(0, ExtentData::Bytes(&b)), (512, ExtentData::Zero(512))];
    assert_eq!(field_of(&m, &overlap), "extent.offset");
    let descending = [(4096, ExtentData::Zero(512)), (0, ExtentData::Bytes(&b))];
    assert_eq!(field_of(&m, &descending), "extent.offset");
    let overflow = [(u64::MAX - 511, ExtentData::Zero(1024))];
    assert_eq!(field_of(&m, &overflow), "extent.len");
    let many: Vec<_> = (0..=MAX_EXTENTS as u64)
        .map(|i| (i * 512, ExtentData::Zero(512)))
        .collect();
    assert_eq!(field_of(&m, &many), "extent_count");
    let big = vec![1u8; MAX_PLAIN_BYTES as usize + 512];
    assert_eq!(field_of(&m, &[(0, ExtentData::Bytes(&big))]), "plain_bytes");
    let huge_zero = [(0, ExtentData::Zero(MAX_ZERO_BYTES + 512))];
    assert_eq!(field_of(&m, &huge_zero), "zero extents");
    let bad_group = DataFrameMeta {
        group: "G".into(),
        ..meta()
    };
    assert_eq!(field_of(&bad_group, &[(0, ExtentData::Bytes(&b))]), "group");
    let bad_disk = DataFrameMeta {
        disk: "".into(),
        ..meta()
    };
    assert_eq!(field_of(&bad_disk, &[(0, ExtentData::Bytes(&b))]), "disk");
    // Exactly at the bounds is fine.
    let at_bound = vec![1u8; MAX_PLAIN_BYTES as usize];
    let s = enc
        .encode_data(&m, 1, &[(0, ExtentData::Bytes(&at_bound))], &mut out)
        .unwrap();
    assert_eq!(s.plain_bytes, u64::from(MAX_PLAIN_BYTES));
    assert_eq!(
        Decoder::new().decode_data(&out).unwrap().plain_bytes(),
        s.plain_bytes
    );
}

/// Proves every truncation and every single-bit flip of a small data frame is refused.
#[test]
fn data_every_truncation_and_bit_flip_refused() {
    let text = compressible(2048, 1);
    let mut small = Vec::new();
    Encoder::default()
        .encode_data(
            &meta(),
            1,
            &[(0, ExtentData::Bytes(&text)), (8192, ExtentData::Zero(512))],
            &mut small,
        )
        .unwrap();
    let mut dec = Decoder::new();
    for frame in [frame_a(), small] {
        dec.decode_data(&frame).unwrap();
        for n in 0..frame.len() {
            assert!(dec.decode_data(&frame[..n]).is_err(), "truncated to {n}");
        }
        for i in 0..frame.len() * 8 {
            let mut b = frame.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(dec.decode_data(&b).is_err(), "bit {i} flipped");
        }
    }
}

/// Proves each body check refuses its corruption even under a valid crc, naming the
/// field at fault.
#[test]
fn resealed_body_corruptions_refused() {
    use FrameError::*;
    let invalid = |e: FrameError| match e {
        Invalid { field, .. } => field,
        e => panic!("expected Invalid, got {e:?}"),
    };
    let too_large = |e: FrameError| match e {
        TooLarge { field, .. } => field,
        e => panic!("expected TooLarge, got {e:?}"),
    };
    // Extent order, overlap and alignment.
    assert_eq!(
        invalid(corrupt_a(|f| put_u64(f, A_E0, 8192))),
        "extent.offset"
    );
    assert_eq!(
        invalid(corrupt_a(|f| put_u64(f, A_E1, 512))),
        "extent.offset"
    );
    assert_eq!(
        invalid(corrupt_a(|f| put_u64(f, A_E0, 100))),
        "extent.offset"
    );
    assert_eq!(
        invalid(corrupt_a(|f| put_u64(f, A_E1 + 8, 1000))),
        "extent.len"
    );
    assert_eq!(
        invalid(corrupt_a(|f| put_u64(f, A_E1 + 8, 0))),
        "extent.len"
    );
    assert_eq!(
        invalid(corrupt_a(|f| put_u64(f, A_E1, u64::MAX - 511))),
        "extent.len"
    );
    // Counts over their bounds, or not matching the bytes.
    assert_eq!(
        too_large(corrupt_a(|f| put_u32(f, A_COUNT, MAX_EXTENTS + 1))),
        "extent_count"
    );
    assert_eq!(
        invalid(corrupt_a(|f| put_u32(f, A_COUNT, 0))),
        "extent_count"
    );
    assert_eq!(invalid(corrupt_a(|f| put_u32(f, A_COUNT, 3))), "data body");
    assert_eq!(invalid(corrupt_a(|f| put_u32(f, A_COUNT, 1))), "data body");
    assert_eq!(
        too_large(corrupt_a(|f| put_u32(f, A_PLAIN, MAX_PLAIN_BYTES + 1))),
        "plain_bytes"
    );
    assert_eq!(
        too_large(corrupt_a(|f| put_u32(
            f,
            A_PAYLOAD_LEN,
            MAX_PLAIN_BYTES + 1
        ))),
        "payload_bytes"
    );
    assert_eq!(
        too_large(corrupt_a(|f| put_u64(f, A_E1 + 8, MAX_ZERO_BYTES + 512))),
        "zero extents"
    );
    assert_eq!(invalid(corrupt_a(|f| f.push(0))), "data body");
    // Wrong plain length: extents hold more, or less, than plain_bytes says.
    assert_eq!(
        invalid(corrupt_a(|f| put_u32(f, A_E1 + 16, 0))),
        "plain_bytes"
    );
    assert_eq!(
        invalid(corrupt_a(|f| {
            put_u32(f, A_PLAIN, 1536);
            put_u32(f, A_PAYLOAD_LEN, 1536);
            f.extend_from_slice(&[0; 512]);
        })),
        "plain_bytes"
    );
    // Encoding and payload length must agree.
    assert_eq!(invalid(corrupt_a(|f| f[A_ENCODING] = 3)), "encoding");
    assert_eq!(invalid(corrupt_a(|f| f[A_ENCODING] = 2)), "payload_bytes");
    assert_eq!(invalid(corrupt_a(|f| f[A_ENCODING] = 0)), "payload_bytes");
    assert_eq!(
        invalid(corrupt_a(|f| put_u32(f, A_PAYLOAD_LEN, 512))),
        "payload_bytes"
    );
    // Reserved fields and flags.
    assert_eq!(
        corrupt_a(|f| f[A_RESERVED + 1] = 1),
        Reserved("data.reserved")
    );
    assert_eq!(
        corrupt_a(|f| put_u32(f, A_E0 + 16, 2)),
        Reserved("extent.flags")
    );
    assert_eq!(
        corrupt_a(|f| put_u32(f, A_E1 + 16, 1 | 1 << 31)),
        Reserved("extent.flags")
    );
    assert_eq!(
        corrupt_a(|f| put_u32(f, A_E0 + 20, 1)),
        Reserved("extent.reserved")
    );
    assert_eq!(invalid(corrupt_a(|f| f[A_E1 + 24] = 1)), "extent.blake3");
    // Ids.
    assert_eq!(invalid(corrupt_a(|f| f[A_GROUP + 1] = b'G')), "group");
    // Hash mismatch under a valid crc: a payload byte, or the stored hash.
    assert_eq!(
        corrupt_a(|f| f[A_PAYLOAD + 700] ^= 1),
        HashMismatch { index: 0 }
    );
    assert_eq!(
        corrupt_a(|f| f[A_E0 + 24] ^= 0x80),
        HashMismatch { index: 0 }
    );
}

/// Builds a zstd frame of `plain` compressible bytes, then swaps in another payload.
fn zstd_frame_with_payload(plain: usize, payload: Option<Vec<u8>>) -> FrameError {
    let text = compressible(plain, 21);
    let mut frame = Vec::new();
    let s = Encoder::default()
        .encode_data(&meta(), 1, &[(0, ExtentData::Bytes(&text))], &mut frame)
        .unwrap();
    assert_eq!(s.encoding, PayloadEncoding::Zstd);
    let payload_at = frame.len() - s.payload_bytes as usize;
    match payload {
        Some(p) => {
            frame.truncate(payload_at);
            // payload_bytes sits at a fixed offset, whatever the ids.
            put_u32(&mut frame, A_PAYLOAD_LEN, p.len() as u32);
            frame.extend_from_slice(&p);
        }
        None => {
            for b in &mut frame[payload_at..] {
                *b = !*b;
            }
        }
    }
    reseal(&mut frame);
    Decoder::new().decode_data(&frame).unwrap_err()
}

/// Proves garbage zstd, a zstd payload of the wrong plain length (shorter or longer),
/// and a zstd payload whose bytes differ are each refused under a valid crc.
#[test]
fn zstd_payload_corruptions_refused() {
    let e = zstd_frame_with_payload(8192, None);
    assert!(
        matches!(
            e,
            FrameError::Decompress(_)
                | FrameError::HashMismatch { .. }
                | FrameError::Invalid {
                    field: "payload",
                    ..
                }
        ),
        "{e:?}"
    );
    let shorter = zstd::bulk::compress(&compressible(4096, 2), 1).unwrap();
    assert!(matches!(
        zstd_frame_with_payload(8192, Some(shorter)),
        FrameError::Invalid {
            field: "payload",
            ..
        }
    ));
    let longer = zstd::bulk::compress(&compressible(16384, 2), 1).unwrap();
    assert!(longer.len() < 8192);
    assert!(matches!(
        zstd_frame_with_payload(8192, Some(longer)),
        FrameError::Invalid {
            field: "payload",
            ..
        }
    ));
    // A zstd frame that does not declare its size (streamed) is refused before any
    // buffer is sized for it.
    let unsized_payload = zstd::stream::encode_all(&compressible(8192, 2)[..], 1).unwrap();
    assert!(
        zstd::zstd_safe::get_frame_content_size(&unsized_payload)
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        zstd_frame_with_payload(8192, Some(unsized_payload)),
        FrameError::Invalid {
            field: "payload",
            ..
        }
    ));
    // A 1-byte payload claiming 16 MiB of plain data: refused by its header alone.
    let e = zstd_frame_with_payload(16 << 20, Some(vec![0]));
    assert!(
        matches!(
            e,
            FrameError::Invalid {
                field: "payload",
                ..
            }
        ),
        "{e:?}"
    );
    let other = zstd::bulk::compress(&compressible(8192, 99), 1).unwrap();
    assert_eq!(
        zstd_frame_with_payload(8192, Some(other)),
        FrameError::HashMismatch { index: 0 }
    );
}

/// Proves random bodies under a valid header and crc are refused by every decoder, never
/// panicking (fuzz-style loop, fixed seed).
#[test]
fn random_bodies_with_valid_crc_refused() {
    let mut rng = Rng(0x5eed);
    let mut dec = Decoder::new();
    for round in 0..3000 {
        let len = 16 + (rng.next() % 600) as usize;
        let mut frame = vec![0u8; HEADER_BYTES];
        frame.extend_from_slice(&rng.bytes(len));
        if round % 2 == 0 {
            // Plausible counts and encodings, so the parse gets deeper.
            frame[A_COUNT..A_COUNT + 4].copy_from_slice(&((rng.next() % 4) as u32).to_le_bytes());
            frame[A_ENCODING] = (rng.next() % 3) as u8;
            frame[A_RESERVED..A_RESERVED + 3].fill(0);
        }
        let kind = FrameKind::from_u8(1 + (round % 6) as u8).unwrap();
        let seq = if kind == FrameKind::Data || kind == FrameKind::Point {
            round as u64
        } else {
            0
        };
        seal(&mut frame, kind, seq);
        assert!(
            crate::frame::decode(&frame, &mut dec).is_err(),
            "round {round}: random {kind:?} body accepted"
        );
        assert!(dec.decode_data(&frame).is_err());
    }
}

/// Proves a header claiming a body over MAX_BODY_BYTES is refused from the header alone,
/// and one claiming a large body that is absent is refused as a length mismatch.
#[test]
fn oversized_body_len_refused_without_allocating() {
    let mut frame = frame_a();
    put_u32(&mut frame, 8, MAX_BODY_BYTES + 1);
    let e = Decoder::new().decode_data(&frame).unwrap_err();
    assert!(
        matches!(
            e,
            FrameError::TooLarge {
                field: "body_len",
                ..
            }
        ),
        "{e:?}"
    );
    put_u32(&mut frame, 8, MAX_BODY_BYTES);
    let e = Decoder::new().decode_data(&frame).unwrap_err();
    assert!(matches!(e, FrameError::LengthMismatch { .. }), "{e:?}");
    let e = Decoder::new()
        .decode_data(&frame[..HEADER_BYTES])
        .unwrap_err();
    assert!(matches!(e, FrameError::LengthMismatch { .. }), "{e:?}");
}

/// Proves a decoder is reusable after successes, recycled buffers and refusals, and
/// refuses frames of another kind.
#[test]
fn decoder_reuse_and_wrong_kind() {
    let mut dec = Decoder::new();
    let mut enc = Encoder::default();
    let mut out = Vec::new();
    let text = compressible(100 << 10, 4);
    let mut rng = Rng(3);
    let random = rng.bytes(8192);
    for round in 0..6 {
        let data: &[u8] = if round % 2 == 0 { &text } else { &random };
        enc.encode_data(&meta(), round, &[(0, ExtentData::Bytes(data))], &mut out)
            .unwrap();
        let f = dec.decode_data(&out).unwrap();
        assert_eq!(f.extents().next(), Some((0, ExtentData::Bytes(data))));
        dec.recycle(f);
        let mut bad = out.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        reseal(&mut bad);
        assert!(dec.decode_data(&bad).is_err());
    }
    let mut point = Vec::new();
    crate::frame::encode_point(
        &PointRecord {
            point_id: 1,
            epoch: 1,
            time_unix_ms: 0,
            kind: PointKind::Crash,
            consistent: true,
            group: "g1".into(),
        },
        1,
        &mut point,
    );
    assert_eq!(
        dec.decode_data(&point).unwrap_err(),
        FrameError::WrongKind {
            expected: FrameKind::Data,
            found: FrameKind::Point
        }
    );
    assert!(peek_data(&point).is_err());
    assert_eq!(encoded_plain_bytes(&point), None);
    assert_eq!(encoded_plain_bytes(&point[..7]), None);
}

/// One extent for the property test, before placement.
#[derive(Clone, Debug)]
enum Gen {
    Random(usize, u64),
    ZeroBytes(usize),
    Zero(usize),
    Text(usize, u64),
}

fn gen_extent() -> impl Strategy<Value = (u64, Gen)> {
    let sectors = 1usize..=64;
    (
        0u64..8,
        prop_oneof![
            (sectors.clone(), any::<u64>()).prop_map(|(s, seed)| Gen::Random(s, seed)),
            sectors.clone().prop_map(Gen::ZeroBytes),
            sectors.clone().prop_map(Gen::Zero),
            (sectors, any::<u64>()).prop_map(|(s, seed)| Gen::Text(s, seed)),
        ],
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Proves random extent lists (random, zero and compressible data, gaps or none)
    /// round-trip through encode and decode as the model says, with the same stats.
    #[test]
    fn data_round_trip_matches_model(spec in prop::collection::vec(gen_extent(), 1..24)) {
        let mut bufs: Vec<Vec<u8>> = Vec::new();
        let mut placed: Vec<(u64, usize, bool)> = Vec::new(); // offset, buf index or len, is zero
        let mut at = 0u64;
        for (gap, g) in &spec {
            at += gap * 512;
            let (len, zero) = match g {
                Gen::Random(s, seed) => { bufs.push(Rng(seed | 1).bytes(s * 512)); (s * 512, false) }
                Gen::ZeroBytes(s) => { bufs.push(vec![0; s * 512]); (s * 512, false) }
                Gen::Text(s, seed) => { bufs.push(compressible(s * 512, *seed)); (s * 512, false) }
                Gen::Zero(s) => (s * 512, true),
            };
            placed.push((at, if zero { len } else { bufs.len() - 1 }, zero));
            at += len as u64;
        }
        let extents: Vec<(u64, ExtentData<'_>)> = placed
            .iter()
            .map(|&(o, i, zero)| if zero { (o, ExtentData::Zero(i as u64)) } else { (o, ExtentData::Bytes(&bufs[i])) })
            .collect();
        let mut out = Vec::new();
        let stats = Encoder::default().encode_data(&meta(), 77, &extents, &mut out).unwrap();
        let f = Decoder::new().decode_data(&out).unwrap();
        prop_assert_eq!(decoded(&f), model(&extents));
        prop_assert_eq!(f.seq, 77);
        prop_assert_eq!(f.plain_bytes(), stats.plain_bytes);
        prop_assert_eq!(f.zero_bytes(), stats.zero_bytes);
        prop_assert_eq!(f.encoding(), stats.encoding);
        prop_assert!(stats.payload_bytes <= stats.plain_bytes);
        // The uncompressed encoder agrees on everything but the payload.
        let mut raw = Vec::new();
        Encoder::uncompressed().encode_data(&meta(), 77, &extents, &mut raw).unwrap();
        let g = Decoder::new().decode_data(&raw).unwrap();
        prop_assert_eq!(decoded(&g), decoded(&f));
        prop_assert_eq!(g.entries(), f.entries());
    }
}

/// Proves `peek_data_head` reads the same table as `peek_data` from any prefix that
/// holds the table (the whole frame, the table's end, `DATA_HEAD_BYTES_MAX`), says
/// Truncated for a shorter one, and never panics on a prefix of any length or on
/// random bytes.
#[test]
fn peek_head_from_prefixes() {
    let f = frame_a();
    let full = peek_data(&f).unwrap();
    assert_eq!(peek_data_head(&f).unwrap(), full);
    let table_end = HEADER_BYTES
        + DATA_FIXED_BYTES
        + 2
        + meta().group.len()
        + meta().disk.len()
        + full.entries.len() * EXTENT_ENTRY_BYTES;
    assert_eq!(peek_data_head(&f[..table_end]).unwrap(), full);
    assert!(matches!(
        peek_data_head(&f[..table_end - 1]),
        Err(FrameError::Truncated { .. })
    ));
    for n in 0..f.len() {
        let _ = peek_data_head(&f[..n]);
    }
    let mut rng = crate::testutil::Rng(99);
    for _ in 0..2000 {
        let n = rng.below(600) as usize;
        let mut b: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
        if b.len() >= 8 && rng.below(2) == 0 {
            b[..8].copy_from_slice(&f[..8]);
        }
        let _ = peek_data_head(&b);
    }
    // A body length that disagrees with the table is refused, prefix or not.
    let mut g = f.clone();
    put_u32(&mut g, 8, full_body_len(&f) + 1);
    assert!(peek_data_head(&g[..table_end]).is_err());
}

fn full_body_len(f: &[u8]) -> u32 {
    u32::from_le_bytes(f[8..12].try_into().unwrap())
}
