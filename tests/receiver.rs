//! End-to-end tests of the master target's receiver: the real `master-target serve`
//! binary on loopback, driven by a small blocking client that builds frames with
//! `datapath::frame`, and the journal read back with `datapath::journal`.

mod common;
#[path = "common/wire.rs"]
mod wire;

use datapath::frame::{ErrorFrame, HEADER_BYTES, MAX_BODY_BYTES, PROTOCOL_VERSION};
use serde_json::Value;
use wire::{DISK_BYTES, Got, Server, Setup};

/// Proves the happy path: hello, resume ack 0, three epochs of data and points are
/// acknowledged, `points --json` lists the three points, and the journal holds exactly
/// the bytes that were sent.
#[test]
fn happy_path_journals_acks_and_lists_points() {
    let setup = Setup::new();
    let server = Server::start(&setup);
    let mut c = server.connect();
    let acks = c.hello_ok(&["g1"]);
    assert_eq!(acks.len(), 1);
    assert_eq!((acks[0].group.as_str(), acks[0].durable_seq), ("g1", 0));
    let frames = wire::epochs("g1", 1, 3, 1);
    assert_eq!(frames.len(), 9);
    for f in &frames {
        c.send(f);
    }
    c.wait_ack("g1", 9);
    drop(c);
    server.kill();

    let out = setup.run_cli(&["points", "--group", "g1", "--json"]);
    let pts: Value = serde_json::from_str(&out).expect("points --json is JSON");
    let pts = pts.as_array().expect("an array");
    assert_eq!(pts.len(), 3, "{out}");
    for (i, p) in pts.iter().enumerate() {
        let id = i as u64 + 1;
        assert_eq!(p["id"], id);
        assert_eq!(p["seq"], id * 3);
        assert_eq!(p["time_unix_ms"], 1_700_000_000_000 + id * 1000);
        assert_eq!(
            p["kind"],
            if id.is_multiple_of(2) { "app" } else { "crash" }
        );
        assert_eq!(p["consistent"], true);
        assert_eq!(p["time"], format!("2023-11-14T22:13:2{id}.000Z"));
    }
    let text = setup.run_cli(&["points", "--group", "g1"]);
    assert_eq!(text.lines().count(), 4, "{text}");
    let status: Value =
        serde_json::from_str(&setup.run_cli(&["status", "--json"])).expect("status --json");
    let groups = status["groups"].as_array().expect("groups");
    assert_eq!(groups[0]["durable_seq"], 9);
    assert_eq!(groups[0]["points"], 3);
    assert_eq!(groups[0]["newest_point"]["id"], 3);
    let journal_bytes = groups[0]["journal_bytes"].as_u64().expect("journal_bytes");
    assert!(journal_bytes > frames.iter().map(|f| f.len() as u64).sum::<u64>());
    assert_eq!(groups[1]["durable_seq"], 0);
    assert!(groups[1]["newest_point"].is_null());
    assert_eq!(status["disks"].as_array().map(Vec::len), Some(4));

    assert_eq!(setup.journal_frames("g1"), frames);
    assert!(setup.journal_frames("g2").is_empty());
}

/// Proves resume: a reconnect is told the durable seq, resent frames already journaled
/// are skipped (acked, not journaled twice), and new ones are appended after them.
#[test]
fn reconnect_resumes_and_skips_resent_frames() {
    let setup = Setup::new();
    let server = Server::start(&setup);
    let first = wire::epochs("g1", 1, 2, 1);
    let more = wire::epochs("g1", 3, 2, 7);
    let mut c = server.connect();
    c.hello_ok(&["g1"]);
    for f in &first {
        c.send(f);
    }
    c.wait_ack("g1", 6);
    drop(c);

    let mut c = server.connect();
    let acks = c.hello_ok(&["g1"]);
    assert_eq!(acks[0].durable_seq, 6, "resume point");
    // Resend the last epoch (already durable), then the new frames.
    for f in first[3..].iter().chain(&more) {
        c.send(f);
    }
    c.wait_ack("g1", 12);
    drop(c);
    server.kill();
    let all: Vec<Vec<u8>> = first.into_iter().chain(more).collect();
    assert_eq!(setup.journal_frames("g1"), all);
}

/// Proves durability of acks: after kill -9 right after an ack, a restarted server
/// resumes at least at the acked seq, and every acked frame is in the journal byte for
/// byte.
#[test]
fn kill9_after_ack_loses_no_acked_frame() {
    let setup = Setup::new();
    let mut sent: Vec<Vec<u8>> = Vec::new();
    for round in 0..3u64 {
        let server = Server::start(&setup);
        let mut c = server.connect();
        let acks = c.hello_ok(&["g1", "g2"]);
        let resume = acks[0].durable_seq;
        assert_eq!(resume, sent.len() as u64, "round {round} resume");
        assert_eq!(acks[1].durable_seq, 0);
        let frames = wire::epochs("g1", round * 2 + 1, 2, resume + 1);
        for f in &frames {
            c.send(f);
        }
        let last = resume + frames.len() as u64;
        c.wait_ack("g1", last);
        server.kill();
        sent.extend(frames);
        assert_eq!(setup.journal_frames("g1"), sent, "round {round}");
    }
}

/// Proves that bad input on the port gets an Error frame with the right code (or a
/// close for garbage), that a stalled peer and a busy group do not stop the server, that
/// a well-behaved client is served afterwards, and that nothing from the bad clients is
/// journaled.
#[test]
fn bad_input_is_refused_and_others_are_served() {
    let setup = Setup::new();
    let server = Server::start(&setup);
    let disks: &[(&str, u64)] = &[("disk0", DISK_BYTES), ("disk1", DISK_BYTES)];

    // A peer that stalls inside a frame header for the whole test.
    let mut stalled = server.connect();
    stalled.send(&wire::hello_frame(1, 1, &[("g1", disks)])[..10]);

    let code_of = |bytes: &[u8], shutdown: bool| -> Option<u16> {
        let mut c = server.connect();
        c.send_lossy(bytes);
        if shutdown {
            c.shutdown_write();
        }
        match c.read() {
            Got::Frame(datapath::frame::Frame::Error(e)) => Some(e.code),
            Got::Closed => None,
            other => panic!("expected an Error or a close, got {other:?}"),
        }
    };

    // Garbage: an Error (BAD_FRAME) or a plain close.
    let garbage: Vec<u8> = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(4);
    let code = code_of(&garbage, false);
    assert!(
        matches!(code, None | Some(ErrorFrame::BAD_FRAME)),
        "{code:?}"
    );

    // A truncated hello, then the peer closes its side.
    let hello = wire::hello_frame(1, PROTOCOL_VERSION, &[("g1", disks)]);
    let code = code_of(&hello[..hello.len() - 5], true);
    assert!(
        matches!(code, None | Some(ErrorFrame::BAD_FRAME)),
        "{code:?}"
    );

    // A hello with a bad crc.
    let mut bad = hello.clone();
    *bad.last_mut().unwrap() ^= 1;
    assert_eq!(code_of(&bad, false), Some(ErrorFrame::BAD_FRAME));

    // An oversized body_len: refused from the header alone, no body sent.
    let mut big = hello[..HEADER_BYTES].to_vec();
    big[8..12].copy_from_slice(&(MAX_BODY_BYTES + 1).to_le_bytes());
    assert_eq!(code_of(&big, false), Some(ErrorFrame::BAD_FRAME));

    // A frame header of an unknown version.
    let mut v2 = hello.clone();
    v2[4..6].copy_from_slice(&2u16.to_le_bytes());
    wire::reseal(&mut v2);
    assert_eq!(code_of(&v2, false), Some(ErrorFrame::UNSUPPORTED_VERSION));

    // No common protocol version in the hello.
    let h = wire::hello_frame(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 2, &[("g1", disks)]);
    assert_eq!(code_of(&h, false), Some(ErrorFrame::UNSUPPORTED_VERSION));

    // A data frame before the hello.
    let data1 = wire::data_frame("g1", "disk0", 1, 1, 0);
    assert_eq!(wire::kind_of(&data1), datapath::frame::FrameKind::Data);
    assert_eq!(code_of(&data1, false), Some(ErrorFrame::BAD_FRAME));

    // Unknown group, unknown disk, wrong disk size: refused in the hello, by name.
    let hello_refusal = |groups: &[(&str, &[(&str, u64)])]| -> ErrorFrame {
        let mut c = server.connect();
        let e = c.hello(groups).expect_err("hello must be refused");
        assert!(matches!(c.read(), Got::Closed));
        e
    };
    let e = hello_refusal(&[("nope", disks)]);
    assert_eq!(e.code, ErrorFrame::UNKNOWN_GROUP);
    assert!(e.message.contains("nope"), "{e:?}");
    let e = hello_refusal(&[("g1", &[("disk9", DISK_BYTES)])]);
    assert_eq!(e.code, ErrorFrame::UNKNOWN_DISK);
    assert!(e.message.contains("disk9"), "{e:?}");
    let e = hello_refusal(&[("g1", &[("disk0", DISK_BYTES * 2)])]);
    assert_eq!(e.code, ErrorFrame::SIZE_MISMATCH);
    assert!(e.message.contains("disk0"), "{e:?}");

    // After a good hello: each bad frame is refused with its code, nothing journaled.
    let after_hello = |f: &[u8]| -> ErrorFrame {
        let mut c = server.connect();
        let acks = c.hello_ok(&["g1"]);
        assert_eq!(acks[0].durable_seq, 0);
        c.send_lossy(f);
        c.expect_error()
    };
    // An extent beyond the disk.
    let e = after_hello(&wire::data_frame("g1", "disk0", 1, 1, DISK_BYTES - 8192));
    assert_eq!(e.code, ErrorFrame::OUT_OF_RANGE, "{e:?}");
    // A bad crc mid-stream.
    let mut f = data1.clone();
    let n = f.len();
    f[n - 1] ^= 0x40;
    let e = after_hello(&f);
    assert_eq!(e.code, ErrorFrame::BAD_FRAME, "{e:?}");
    assert!(e.message.contains("crc"), "{e:?}");
    // A good crc over data that no longer matches its blake3 (stored raw, so the
    // change survives decoding and only the hash can catch it).
    let mut f = wire::data_frame_with(
        datapath::frame::Encoder::uncompressed(),
        "g1",
        "disk0",
        1,
        1,
        0,
    );
    let n = f.len();
    f[n - 1] ^= 0x40;
    wire::reseal(&mut f);
    let e = after_hello(&f);
    assert_eq!(e.code, ErrorFrame::BAD_FRAME, "{e:?}");
    assert!(e.message.contains("blake3"), "{e:?}");
    // An oversized body_len mid-stream, refused from the header alone.
    let mut big = data1[..HEADER_BYTES].to_vec();
    big[8..12].copy_from_slice(&(MAX_BODY_BYTES + 1).to_le_bytes());
    let e = after_hello(&big);
    assert_eq!(e.code, ErrorFrame::BAD_FRAME, "{e:?}");
    assert!(e.message.contains("body_len"), "{e:?}");
    // A gap in the sequence.
    let e = after_hello(&wire::data_frame("g1", "disk0", 1, 5, 0));
    assert_eq!(e.code, ErrorFrame::SEQUENCE, "{e:?}");
    // A group not named in this connection's hello.
    let e = after_hello(&wire::data_frame("g2", "disk0", 1, 1, 0));
    assert_eq!(e.code, ErrorFrame::UNKNOWN_GROUP, "{e:?}");
    // A disk of another name than the hello's.
    let e = after_hello(&wire::data_frame("g1", "disk7", 1, 1, 0));
    assert_eq!(e.code, ErrorFrame::UNKNOWN_DISK, "{e:?}");
    // A second Hello mid-stream.
    let e = after_hello(&hello);
    assert_eq!(e.code, ErrorFrame::BAD_FRAME, "{e:?}");

    // A well-behaved client, while a connection of another node for its group is
    // refused as busy.
    let mut good = server.connect();
    assert_eq!(good.hello_ok(&["g1"])[0].durable_seq, 0);
    let mut other = server.connect();
    let e = other
        .hello_as("ps-other", &[("g1", disks)])
        .expect_err("busy");
    assert_eq!(e.code, ErrorFrame::BUSY);
    assert!(
        e.message.contains("busy") && e.message.contains("g1"),
        "{e:?}"
    );
    let frames = wire::epochs("g1", 1, 1, 1);
    for f in &frames {
        good.send(f);
    }
    good.wait_ack("g1", 3);

    // The stalled peer is still connected and still waiting.
    stalled.s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(
        std::io::Read::read(&mut stalled.s, &mut b),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
    ));
    drop(good);
    drop(stalled);
    let log = server.log();
    server.kill();
    assert_eq!(setup.journal_frames("g1"), frames, "server log:\n{log}");
    assert!(setup.journal_frames("g2").is_empty());
}

/// Proves that a refusal mid-batch still commits and acknowledges the good frames
/// before it, and that the refused frame does not reach the journal.
#[test]
fn refusal_mid_batch_keeps_the_frames_before_it() {
    let setup = Setup::new();
    let server = Server::start(&setup);
    let mut c = server.connect();
    c.hello_ok(&["g1"]);
    let frames = wire::epochs("g1", 1, 1, 1);
    let mut bytes: Vec<u8> = frames.concat();
    let mut bad = wire::data_frame("g1", "disk0", 2, 4, 0);
    let n = bad.len();
    bad[n - 1] ^= 1;
    bytes.extend_from_slice(&bad);
    // One write, so that the server most likely sees all four frames in one batch.
    c.send(&bytes);
    let mut acked = 0;
    let e = loop {
        match c.read() {
            Got::Frame(datapath::frame::Frame::Ack(a)) => acked = a.durable_seq,
            Got::Frame(datapath::frame::Frame::Error(e)) => break e,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(acked, 3);
    assert_eq!(e.code, ErrorFrame::BAD_FRAME);
    assert!(
        e.message.contains("seq 4") || e.message.contains("crc"),
        "{e:?}"
    );
    drop(c);
    server.kill();
    assert_eq!(setup.journal_frames("g1"), frames);
}

/// Proves `serve` refuses plain TCP off loopback, that `points` asks a running server
/// instead of opening the journal it holds, and that without the server's socket the
/// group lock still keeps `points` off that journal.
#[test]
fn serve_refuses_non_loopback_and_points_asks_a_running_server() {
    let setup = Setup::new();
    let server = Server::start(&setup);
    let points = || {
        std::process::Command::new(common::bin_path("master-target"))
            .args(["points", "--group", "g1", "--json", "--config"])
            .arg(&setup.config)
            .output()
            .unwrap()
    };
    let out = points();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    let socket = setup.config.parent().unwrap().join("data/control.sock");
    std::fs::remove_file(&socket).expect("remove the control socket");
    let out = points();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{out:?}"
    );
    server.kill();

    let text = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace("127.0.0.1:0", "0.0.0.0:0");
    std::fs::write(&setup.config, text).unwrap();
    let out = std::process::Command::new(common::bin_path("master-target"))
        .args(["serve", "--config"])
        .arg(&setup.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("loopback") && err.contains("mt.toml"), "{err}");
}

/// Proves takeover: a newer connection of the same node takes a group over from an
/// older one that never closed (as a half-open connection after a network failure
/// would), is told a durable seq that covers every frame the old one got acked, and
/// continues from there without a gap or a duplicate in the journal.
#[test]
fn newer_connection_of_the_same_node_takes_over() {
    let setup = Setup::new();
    let server = Server::start(&setup);
    let frames = wire::epochs("g1", 1, 3, 1);
    let mut old = server.connect();
    old.hello_ok(&["g1"]);
    for f in &frames[..3] {
        old.send(f);
    }
    old.wait_ack("g1", 3);
    // Frames 4..=6 are in flight, unacknowledged, when the newer connection arrives.
    for f in &frames[3..6] {
        old.send(f);
    }
    let mut new = server.connect();
    let resume = new.hello_ok(&["g1"])[0].durable_seq;
    assert!((3..=6).contains(&resume), "resume {resume}");
    let e = old.expect_error();
    assert_eq!(e.code, ErrorFrame::BUSY);
    assert!(e.message.contains("superseded"), "{e:?}");
    for f in &frames[resume as usize..] {
        new.send(f);
    }
    new.wait_ack("g1", 9);
    drop(new);
    server.kill();
    assert_eq!(setup.journal_frames("g1"), frames);
}

/// Proves hash requests (protocol 3) are answered: "no copy" for a blank replica that
/// no frame wrote, "no point" before the first consistent point, then the hashes of
/// the latest journaled state (frames over the replica, a request sent right behind a
/// frame sees that frame, after its ack) and of the newest consistent point, each
/// equal to the hashes of the bytes the frames wrote; and that bad requests (an
/// unknown disk or group, blocks past the end, another block size, a connection that
/// negotiated protocol 2) are refused by name, the connection closed.
#[test]
fn hash_requests_are_answered_and_bad_ones_refused() {
    use datapath::frame::{
        Frame, HashListFrame, HashOf, HashRequest, HashStatus, encode_hash_request,
    };
    use datapath::hashing::hash_buffer;

    let setup = Setup::new();
    let server = Server::start(&setup);
    let req = |id: u64, group: &str, disk: &str, of: HashOf, first: u64, count: u32| {
        let q = HashRequest {
            request_id: id,
            group: group.into(),
            disk: disk.into(),
            block_size_bytes: 65536,
            first_block: first,
            count,
            of,
        };
        let mut out = Vec::new();
        encode_hash_request(&q, &mut out).unwrap();
        out
    };
    let answer = |c: &mut wire::Client| -> HashListFrame {
        loop {
            match c.read() {
                Got::Frame(Frame::HashList(l)) => return l,
                Got::Frame(Frame::Ack(_)) => {}
                other => panic!(
                    "expected a hash list, got {other:?}; log:\n{}",
                    server.log()
                ),
            }
        }
    };
    let mut c = server.connect();
    c.hello_ok(&["g1"]);
    c.send(&req(1, "g1", "disk0", HashOf::Latest, 0, 16));
    let l = answer(&mut c);
    assert_eq!((l.request_id, l.status), (1, HashStatus::NoCopy), "{l:?}");
    assert!(l.hashes.is_empty());
    c.send(&req(2, "g1", "disk0", HashOf::ConsistentPoint, 0, 16));
    assert_eq!(answer(&mut c).status, HashStatus::NoPoint);

    // Epoch 1 (data on both disks, point 1), then a frame of epoch 2 and, right
    // behind it in the same write, a request for the latest state.
    for f in wire::epochs("g1", 1, 1, 1) {
        c.send(&f);
    }
    c.wait_ack("g1", 3);
    let mut both = wire::data_frame("g1", "disk0", 2, 4, 65536);
    both.extend_from_slice(&req(3, "g1", "disk0", HashOf::Latest, 0, 16));
    c.send(&both);
    c.wait_ack("g1", 4);
    let l = answer(&mut c);
    let mut disk0 = vec![0u8; DISK_BYTES as usize];
    disk0[16384..24576].copy_from_slice(&wire::pattern(1, 8192));
    let at_point_1 = disk0.clone();
    disk0[65536..73728].copy_from_slice(&wire::pattern(4, 8192));
    assert_eq!(
        (l.request_id, l.status, l.point_id),
        (3, HashStatus::Hashes, 0)
    );
    assert_eq!(
        l.hashes,
        hash_buffer(&disk0).hashes,
        "latest state of disk0"
    );
    // The newest consistent point is 1: without seq 4. A part of the disk.
    c.send(&req(4, "g1", "disk0", HashOf::ConsistentPoint, 1, 3));
    let l = answer(&mut c);
    assert_eq!(
        (l.status, l.point_id, l.first_block),
        (HashStatus::Hashes, 1, 1)
    );
    assert_eq!(l.hashes, hash_buffer(&at_point_1).hashes[1..4]);
    let mut disk1 = vec![0u8; DISK_BYTES as usize];
    disk1[16384..24576].copy_from_slice(&wire::pattern(2, 8192));
    c.send(&req(5, "g1", "disk1", HashOf::Latest, 0, 16));
    assert_eq!(answer(&mut c).hashes, hash_buffer(&disk1).hashes);
    drop(c);

    // Bad requests, each on a fresh connection.
    let refused = |bytes: Vec<u8>, protocol_max: u16| -> ErrorFrame {
        let mut c = server.connect();
        let disks: &[(&str, u64)] = &[("disk0", DISK_BYTES), ("disk1", DISK_BYTES)];
        c.send(&wire::hello_frame(1, protocol_max, &[("g1", disks)]));
        c.send(&bytes);
        c.expect_error()
    };
    let e = refused(
        req(6, "g1", "disk9", HashOf::Latest, 0, 1),
        PROTOCOL_VERSION,
    );
    assert_eq!(e.code, ErrorFrame::UNKNOWN_DISK, "{e:?}");
    assert!(e.message.contains("disk9"), "{e:?}");
    let e = refused(
        req(7, "g1", "disk0", HashOf::Latest, 10, 7),
        PROTOCOL_VERSION,
    );
    assert_eq!(e.code, ErrorFrame::OUT_OF_RANGE, "{e:?}");
    let e = refused(
        req(8, "g2", "disk0", HashOf::Latest, 0, 1),
        PROTOCOL_VERSION,
    );
    assert_eq!(e.code, ErrorFrame::UNKNOWN_GROUP, "{e:?}");
    let mut small = req(9, "g1", "disk0", HashOf::Latest, 0, 1);
    small[HEADER_BYTES + 20..HEADER_BYTES + 24].copy_from_slice(&4096u32.to_le_bytes());
    wire::reseal(&mut small);
    let e = refused(small, PROTOCOL_VERSION);
    assert_eq!(e.code, ErrorFrame::BAD_FRAME, "{e:?}");
    assert!(e.message.contains("65536"), "{e:?}");
    let e = refused(req(10, "g1", "disk0", HashOf::Latest, 0, 1), 2);
    assert_eq!(e.code, ErrorFrame::BAD_FRAME, "{e:?}");
    assert!(e.message.contains("protocol 3"), "{e:?}");
    let mut garbled = req(11, "g1", "disk0", HashOf::Latest, 0, 1);
    garbled[HEADER_BYTES + 24] = 9;
    wire::reseal(&mut garbled);
    let e = refused(garbled, PROTOCOL_VERSION);
    assert_eq!(e.code, ErrorFrame::BAD_FRAME, "{e:?}");
    // The server still serves.
    let mut c = server.connect();
    c.hello_ok(&["g1"]);
}
