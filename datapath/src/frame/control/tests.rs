use super::*;
use crate::extent::ExtentData;
use crate::frame::{
    DataFrameMeta, Decoder, Encoder, Frame, HEADER_BYTES, PointKind, PointRecord, decode,
    encode_point, verify,
};

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn hello() -> Hello {
    Hello {
        version_min: 1,
        version_max: 1,
        role: Role::ProcessServer,
        node: "ps1".into(),
        groups: vec![HelloGroup {
            id: "g1".into(),
            disks: vec![
                HelloDisk {
                    id: "d0".into(),
                    size_bytes: 1 << 30,
                },
                HelloDisk {
                    id: "d1".into(),
                    size_bytes: 4096,
                },
            ],
        }],
    }
}

fn ack() -> Ack {
    Ack {
        group: "g1".into(),
        durable_seq: 42,
    }
}

fn error() -> ErrorFrame {
    ErrorFrame::new(ErrorFrame::UNKNOWN_DISK, "no disk")
}

fn hash_list() -> HashListFrame {
    HashListFrame {
        request_id: 7,
        group: "g1".into(),
        disk: "d0".into(),
        block_size_bytes: 65536,
        first_block: 10,
        point_id: 5,
        status: HashStatus::Hashes,
        hashes: vec![[0xaa; 32], [0xbb; 32]],
    }
}

fn hash_list_v1() -> HashListV1 {
    HashListV1 {
        disk: "d0".into(),
        block_size_bytes: 65536,
        first_block: 10,
        hashes: vec![[0xaa; 32], [0xbb; 32]],
    }
}

fn hash_request() -> HashRequest {
    HashRequest {
        request_id: 7,
        group: "g1".into(),
        disk: "d0".into(),
        block_size_bytes: 65536,
        first_block: 10,
        count: 2,
        of: HashOf::ConsistentPoint,
    }
}

/// Every control frame of the tests, encoded.
fn encoded() -> Vec<Vec<u8>> {
    let mut frames = vec![Vec::new(); 5];
    encode_hello(&hello(), &mut frames[0]).unwrap();
    encode_ack(&ack(), &mut frames[1]).unwrap();
    encode_error(&error(), &mut frames[2]).unwrap();
    encode_hash_list(&hash_list(), &mut frames[3]).unwrap();
    encode_hash_request(&hash_request(), &mut frames[4]).unwrap();
    frames
}

/// Recomputes the header of a frame whose body a test changed.
fn reseal(frame: &mut [u8]) {
    let kind = FrameKind::from_u8(frame[6]).unwrap();
    let seq = u64::from_le_bytes(frame[16..24].try_into().unwrap());
    seal(frame, kind, seq);
}

/// Changes frame `which` of [`encoded`] with `f`, reseals it, and decodes it.
fn corrupt(which: usize, f: impl FnOnce(&mut Vec<u8>)) -> FrameError {
    let mut frame = encoded().swap_remove(which);
    f(&mut frame);
    reseal(&mut frame);
    decode(&frame, &mut Decoder::new()).expect_err("corrupted frame was accepted")
}

fn field(e: FrameError) -> &'static str {
    match e {
        FrameError::Invalid { field, .. }
        | FrameError::TooLarge { field, .. }
        | FrameError::Truncated { field, .. }
        | FrameError::Reserved(field) => field,
        e => panic!("no field in {e:?}"),
    }
}

/// Proves hello, ack, error and hash list frames round-trip and their layouts are
/// pinned byte for byte (computed independently with Python struct + zlib.crc32).
#[test]
fn control_golden_and_round_trip() {
    let f = encoded();
    assert_eq!(
        hex(&f[0]),
        "42524652010003002700000000000000000000000000000000000000309dd694\
         010001000100010003707331020002673100000040000000000264300010000000000000026431"
    );
    assert_eq!(
        hex(&f[1]),
        "42524652010004000b000000000000000000000000000000000000009d0152b5\
         2a00000000000000026731"
    );
    assert_eq!(
        hex(&f[2]),
        "42524652010005000b00000000000000000000000000000000000000af099944\
         050007006e6f206469736b"
    );
    assert_eq!(
        hex(&f[3][..HEADER_BYTES + 42]),
        "42524652010006006a0000000000000000000000000000000000000094e46e97\
         07000000000000000a00000000000000020000000000010005000000000000000000000002673102\
         6430"
    );
    assert_eq!(&f[3][HEADER_BYTES + 42..HEADER_BYTES + 74], &[0xaa; 32]);
    assert_eq!(&f[3][HEADER_BYTES + 74..], &[0xbb; 32]);
    assert_eq!(
        hex(&f[4]),
        "425246520100090022000000000000000000000000000000000000006803784307000000000000\
         000a00000000000000020000000000010001000000026731026430"
    );
    assert_eq!(decode_hello(&f[0]).unwrap(), hello());
    assert_eq!(decode_ack(&f[1]).unwrap(), ack());
    assert_eq!(decode_error(&f[2]).unwrap(), error());
    assert_eq!(decode_hash_list(&f[3]).unwrap(), hash_list());
    assert_eq!(decode_hash_request(&f[4]).unwrap(), hash_request());

    // The frozen hash list layout 1, pinned as it was.
    let mut v1 = Vec::new();
    encode_hash_list_v1(&hash_list_v1(), &mut v1).unwrap();
    assert_eq!(
        hex(&v1[..HEADER_BYTES + 19]),
        "425246520100060053000000000000000000000000000000000000006743b913\
         00000100020000000a00000000000000026430"
    );
    assert_eq!(&v1[HEADER_BYTES + 19..HEADER_BYTES + 51], &[0xaa; 32]);
    assert_eq!(&v1[HEADER_BYTES + 51..], &[0xbb; 32]);
    assert_eq!(decode_hash_list_v1(&v1).unwrap(), hash_list_v1());
    // The two layouts do not read as each other.
    assert!(decode_hash_list(&v1).is_err());
    assert!(decode_hash_list_v1(&f[3]).is_err());
    // Answers without hashes.
    for status in [HashStatus::NoCopy, HashStatus::NoPoint, HashStatus::Failed] {
        let none = HashListFrame {
            status,
            hashes: vec![],
            ..hash_list()
        };
        let mut out = Vec::new();
        encode_hash_list(&none, &mut out).unwrap();
        assert_eq!(decode_hash_list(&out).unwrap(), none);
    }

    // A master target's hello with no groups, a long version range, and an empty list.
    let target = Hello {
        version_min: 1,
        version_max: 7,
        role: Role::MasterTarget,
        node: "mt-0".into(),
        groups: vec![],
    };
    let mut out = Vec::new();
    encode_hello(&target, &mut out).unwrap();
    assert_eq!(decode_hello(&out).unwrap(), target);
    assert_eq!(hello().negotiate(&target), Some(1));
    let newer = Hello {
        version_min: 2,
        ..target.clone()
    };
    assert_eq!(hello().negotiate(&newer), None);
    let empty = HashListFrame {
        hashes: vec![],
        ..hash_list()
    };
    encode_hash_list(&empty, &mut out).unwrap();
    assert_eq!(decode_hash_list(&out).unwrap(), empty);
    // The largest hash list the bound allows.
    let full = HashListFrame {
        hashes: vec![[7; 32]; MAX_HASHES as usize],
        ..hash_list()
    };
    encode_hash_list(&full, &mut out).unwrap();
    assert_eq!(decode_hash_list(&out).unwrap(), full);
}

/// Proves cut request and cut done frames round-trip with pinned bytes (computed
/// independently with Python struct + zlib.crc32), dispatch through [`decode`], and
/// refuse every truncation, every bit flip, a non-zero seq and unknown flags.
#[test]
fn cut_frames() {
    let req = CutRequest { group: "g1".into() };
    let done = CutDone {
        group: "g1".into(),
        point_id: 42,
        consistent: true,
    };
    let (mut a, mut b) = (Vec::new(), Vec::new());
    encode_cut_request(&req, &mut a).unwrap();
    encode_cut_done(&done, &mut b).unwrap();
    assert_eq!(
        hex(&a),
        "425246520100070003000000000000000000000000000000000000008f3c7657026731"
    );
    assert_eq!(
        hex(&b),
        "42524652010008000c0000000000000000000000000000000000000004d760682a0000000000000001026731"
    );
    assert_eq!(decode_cut_request(&a).unwrap(), req);
    assert_eq!(decode_cut_done(&b).unwrap(), done);
    let mut dec = Decoder::new();
    assert_eq!(
        decode(&a, &mut dec).unwrap(),
        Frame::CutRequest(req.clone())
    );
    assert_eq!(decode(&b, &mut dec).unwrap(), Frame::CutDone(done.clone()));
    for f in [&a, &b] {
        for n in 0..f.len() {
            assert!(decode(&f[..n], &mut dec).is_err(), "cut to {n}");
        }
        for i in 0..f.len() * 8 {
            let mut c = f.clone();
            c[i / 8] ^= 1 << (i % 8);
            assert!(decode(&c, &mut dec).is_err(), "bit {i}");
        }
    }
    // Fields a crc cannot catch: resealed with a seq, or with an unknown flag.
    let mut c = b.clone();
    seal(&mut c, FrameKind::CutDone, 5);
    assert_eq!(field(decode_cut_done(&c).unwrap_err()), "seq");
    let mut c = b.clone();
    c[HEADER_BYTES + 8] = 3;
    seal(&mut c, FrameKind::CutDone, 0);
    assert_eq!(field(decode_cut_done(&c).unwrap_err()), "flags");
    assert!(encode_cut_request(&CutRequest { group: "G!".into() }, &mut a).is_err());
}

/// Proves [`decode`] returns each kind, data and point included, as its own decoder does.
#[test]
fn decode_dispatches_every_kind() {
    let mut dec = Decoder::new();
    let f = encoded();
    assert_eq!(decode(&f[0], &mut dec).unwrap(), Frame::Hello(hello()));
    assert_eq!(decode(&f[1], &mut dec).unwrap(), Frame::Ack(ack()));
    assert_eq!(decode(&f[2], &mut dec).unwrap(), Frame::Error(error()));
    assert_eq!(
        decode(&f[3], &mut dec).unwrap(),
        Frame::HashList(hash_list())
    );
    assert_eq!(
        decode(&f[4], &mut dec).unwrap(),
        Frame::HashRequest(hash_request())
    );
    let p = PointRecord {
        point_id: 3,
        epoch: 2,
        time_unix_ms: 1,
        kind: PointKind::Crash,
        consistent: true,
        group: "g1".into(),
    };
    let mut out = Vec::new();
    encode_point(&p, 11, &mut out);
    assert_eq!(
        decode(&out, &mut dec).unwrap(),
        Frame::Point(verify(&out).unwrap(), p)
    );
    let data = vec![9u8; 4096];
    let meta = DataFrameMeta {
        group: "g1".into(),
        disk: "d0".into(),
        epoch: 2,
    };
    Encoder::default()
        .encode_data(&meta, 12, &[(512, ExtentData::Bytes(&data))], &mut out)
        .unwrap();
    let Frame::Data(d) = decode(&out, &mut dec).unwrap() else {
        panic!("not a data frame");
    };
    assert_eq!(d.seq, 12);
    assert_eq!(d.meta, meta);
    assert_eq!(
        d.extents().next(),
        Some((512, ExtentData::Bytes(&data[..])))
    );
    // A typed decoder refuses another kind.
    assert!(matches!(
        decode_ack(&f[0]),
        Err(FrameError::WrongKind {
            expected: FrameKind::Ack,
            found: FrameKind::Hello
        })
    ));
}

/// Proves every truncation and every single-bit flip of each control frame is refused,
/// by its own decoder and by [`decode`].
#[test]
fn control_every_truncation_and_bit_flip_refused() {
    let mut dec = Decoder::new();
    let typed: [fn(&[u8]) -> bool; 5] = [
        |b| decode_hello(b).is_err(),
        |b| decode_ack(b).is_err(),
        |b| decode_error(b).is_err(),
        |b| decode_hash_list(b).is_err(),
        |b| decode_hash_request(b).is_err(),
    ];
    for (k, frame) in encoded().into_iter().enumerate() {
        for n in 0..frame.len() {
            assert!(typed[k](&frame[..n]), "frame {k} truncated to {n}");
            assert!(decode(&frame[..n], &mut dec).is_err());
        }
        for i in 0..frame.len() * 8 {
            let mut b = frame.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(typed[k](&b), "frame {k} bit {i} flipped");
            assert!(decode(&b, &mut dec).is_err());
        }
    }
}

const B: usize = HEADER_BYTES;

/// Proves each control body check refuses its corruption under a valid crc, naming the
/// field at fault.
#[test]
fn control_resealed_corruptions_refused() {
    // Hello (node "ps1": the first group starts at B + 12).
    assert_eq!(field(corrupt(0, |f| f[B..B + 2].fill(0))), "version_min");
    assert_eq!(field(corrupt(0, |f| f[B] = 2)), "version_min");
    assert_eq!(field(corrupt(0, |f| f[B + 4] = 3)), "role");
    assert_eq!(field(corrupt(0, |f| f[B + 5] = 1)), "hello.reserved");
    assert_eq!(
        field(corrupt(0, |f| f[B + 6..B + 8]
            .copy_from_slice(&257u16.to_le_bytes()))),
        "group_count"
    );
    assert_eq!(
        field(corrupt(0, |f| f[B + 6..B + 8].copy_from_slice(&2u16.to_le_bytes()))),
        "disk_count"
    );
    assert_eq!(
        field(corrupt(0, |f| f[B + 12..B + 14]
            .copy_from_slice(&257u16.to_le_bytes()))),
        "disk_count"
    );
    assert_eq!(field(corrupt(0, |f| f[B + 12] = 3)), "size_bytes");
    assert_eq!(field(corrupt(0, |f| f[B + 9] = b'P')), "node");
    assert_eq!(field(corrupt(0, |f| f.push(0))), "hello body");
    // Duplicate disk: the second disk's id "d1" becomes "d0"; misaligned size of it.
    let last = encoded()[0].len() - 1;
    assert_eq!(field(corrupt(0, |f| f[last] = b'0')), "disk");
    assert_eq!(field(corrupt(0, |f| f[last - 10] = 1)), "size_bytes");
    // Duplicate group: two groups "g1", each with no disks.
    let dup = Hello {
        groups: vec![
            HelloGroup {
                id: "g1".into(),
                disks: vec![],
            },
            HelloGroup {
                id: "g2".into(),
                disks: vec![],
            },
        ],
        ..hello()
    };
    let mut out = Vec::new();
    encode_hello(&dup, &mut out).unwrap();
    let at = out.len() - 1;
    out[at] = b'1';
    reseal(&mut out);
    assert_eq!(field(decode_hello(&out).unwrap_err()), "group");

    // Ack.
    assert_eq!(field(corrupt(1, |f| f.push(0))), "ack body");
    assert_eq!(field(corrupt(1, |f| f[B + 8] = 0)), "group");

    // Error.
    assert_eq!(field(corrupt(2, |f| f[B..B + 2].fill(0))), "code");
    assert_eq!(
        field(corrupt(2, |f| f[B + 2..B + 4].copy_from_slice(
            &(MAX_ERROR_MESSAGE_BYTES + 1).to_le_bytes()
        ))),
        "message_len"
    );
    assert_eq!(field(corrupt(2, |f| f[B + 2] = 8)), "message");
    assert_eq!(field(corrupt(2, |f| f[B + 2] = 6)), "error body");
    assert_eq!(field(corrupt(2, |f| f[B + 4] = 0xff)), "message");

    // Hash list (layout 2): request_id 0..8, first_block 8..16, count 16..20,
    // block_size_bytes 20..24, point_id 24..32, status 32, reserved 33..36, ids, hashes.
    assert_eq!(
        field(corrupt(3, |f| f[B + 20..B + 24].fill(0))),
        "block_size_bytes"
    );
    assert_eq!(field(corrupt(3, |f| f[B + 20] = 1)), "block_size_bytes");
    assert_eq!(
        field(corrupt(3, |f| f[B + 20..B + 24]
            .copy_from_slice(&(MAX_HASH_BLOCK_BYTES + 512).to_le_bytes()))),
        "block_size_bytes"
    );
    assert_eq!(
        field(corrupt(3, |f| f[B + 16..B + 20]
            .copy_from_slice(&(MAX_HASHES + 1).to_le_bytes()))),
        "count"
    );
    assert_eq!(field(corrupt(3, |f| f[B + 16] = 3)), "count");
    assert_eq!(field(corrupt(3, |f| f.push(0))), "count");
    assert_eq!(
        field(corrupt(3, |f| f[B + 8..B + 16]
            .copy_from_slice(&(u64::MAX - 1).to_le_bytes()))),
        "first_block"
    );
    assert_eq!(field(corrupt(3, |f| f[B + 32] = 4)), "status");
    // A status without hashes that carries some.
    assert_eq!(field(corrupt(3, |f| f[B + 32] = 1)), "count");
    assert_eq!(field(corrupt(3, |f| f[B + 34] = 1)), "hash_list.reserved");
    assert_eq!(field(corrupt(3, |f| f[B + 37] = b'G')), "group");
    assert_eq!(field(corrupt(3, |f| f[B + 40] = b'D')), "disk");

    // Hash request: request_id 0..8, first_block 8..16, count 16..20,
    // block_size_bytes 20..24, of 24, reserved 25..28, group, disk.
    assert_eq!(field(corrupt(4, |f| f[B + 16..B + 20].fill(0))), "count");
    assert_eq!(
        field(corrupt(4, |f| f[B + 16..B + 20]
            .copy_from_slice(&(MAX_HASHES + 1).to_le_bytes()))),
        "count"
    );
    assert_eq!(
        field(corrupt(4, |f| f[B + 20..B + 24].fill(0))),
        "block_size_bytes"
    );
    assert_eq!(
        field(corrupt(4, |f| f[B + 8..B + 16]
            .copy_from_slice(&(u64::MAX - 1).to_le_bytes()))),
        "first_block"
    );
    assert_eq!(field(corrupt(4, |f| f[B + 24] = 2)), "of");
    assert_eq!(
        field(corrupt(4, |f| f[B + 27] = 1)),
        "hash_request.reserved"
    );
    assert_eq!(field(corrupt(4, |f| f[B + 28] = 0)), "group");
    assert_eq!(field(corrupt(4, |f| f[B + 32] = 70)), "disk");
    assert_eq!(field(corrupt(4, |f| f.push(0))), "hash request body");

    // A sequence in a control frame's header.
    for which in 0..5 {
        let mut f = encoded().swap_remove(which);
        let kind = FrameKind::from_u8(f[6]).unwrap();
        seal(&mut f, kind, 1);
        assert_eq!(field(decode(&f, &mut Decoder::new()).unwrap_err()), "seq");
    }
}

/// Proves the encoders refuse what the decoders would refuse, and that
/// `ErrorFrame::new` cuts a long message at a character boundary.
#[test]
fn control_encoders_refuse_invalid() {
    let mut out = Vec::new();
    let bad = |h: Hello| field(encode_hello(&h, &mut Vec::new()).unwrap_err());
    assert_eq!(
        bad(Hello {
            node: "Bad".into(),
            ..hello()
        }),
        "node"
    );
    assert_eq!(
        bad(Hello {
            version_min: 3,
            version_max: 2,
            ..hello()
        }),
        "version_min"
    );
    let many = Hello {
        groups: (0..=MAX_HELLO_GROUPS)
            .map(|i| HelloGroup {
                id: format!("g{i}"),
                disks: vec![],
            })
            .collect(),
        ..hello()
    };
    assert_eq!(bad(many), "group_count");
    let mut h = hello();
    h.groups[0].disks[1].size_bytes = 0;
    assert_eq!(bad(h), "size_bytes");
    assert_eq!(
        field(
            encode_ack(
                &Ack {
                    group: "".into(),
                    durable_seq: 0
                },
                &mut out
            )
            .unwrap_err()
        ),
        "group"
    );
    let long = ErrorFrame {
        code: ErrorFrame::INTERNAL,
        message: "x".repeat(MAX_ERROR_MESSAGE_BYTES as usize + 1),
    };
    assert_eq!(
        field(encode_error(&long, &mut out).unwrap_err()),
        "message_len"
    );
    let cut = ErrorFrame::new(ErrorFrame::INTERNAL, &"é".repeat(600));
    assert_eq!(cut.message.len(), 1024);
    encode_error(&cut, &mut out).unwrap();
    assert_eq!(decode_error(&out).unwrap(), cut);
    assert_eq!(
        ErrorFrame::code_name(ErrorFrame::UNKNOWN_DISK),
        "unknown disk"
    );
    assert_eq!(
        ErrorFrame::code_name(ErrorFrame::NOT_PROTECTED),
        "not protected"
    );
    assert_eq!(ErrorFrame::code_name(13), "unknown");
    let np = ErrorFrame::new(ErrorFrame::NOT_PROTECTED, "group g1 failed back");
    encode_error(&np, &mut out).unwrap();
    assert_eq!(decode_error(&out).unwrap(), np);
    let too_many = HashListFrame {
        hashes: vec![[0; 32]; MAX_HASHES as usize + 1],
        ..hash_list()
    };
    assert_eq!(
        field(encode_hash_list(&too_many, &mut out).unwrap_err()),
        "count"
    );
    let stray = HashListFrame {
        status: HashStatus::NoCopy,
        ..hash_list()
    };
    assert_eq!(
        field(encode_hash_list(&stray, &mut out).unwrap_err()),
        "count"
    );
    let bad_req = |q: HashRequest| field(encode_hash_request(&q, &mut Vec::new()).unwrap_err());
    assert_eq!(
        bad_req(HashRequest {
            count: 0,
            ..hash_request()
        }),
        "count"
    );
    assert_eq!(
        bad_req(HashRequest {
            block_size_bytes: 100,
            ..hash_request()
        }),
        "block_size_bytes"
    );
    assert_eq!(
        bad_req(HashRequest {
            disk: "D".into(),
            ..hash_request()
        }),
        "disk"
    );
}
