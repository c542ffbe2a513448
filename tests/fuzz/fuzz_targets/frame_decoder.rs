//! The peer-link frame decoder on arbitrary bytes: splitting frames off a
//! buffer and decoding them must return a message or an error, never panic,
//! and never allocate for a body the length limit refuses. A decoded
//! message must survive its own round trip.
//!
//! Seeds: with NOVACRON_FUZZ_SEEDS=DIR (tests/fuzz/run.sh sets it), the
//! target first writes a frame of every `Message` variant, encoded by the
//! current code, into DIR (and one buffer of them all, a bulk Hello, and
//! the handshake of another wire version), so that a run starts from valid frames of the
//! wire version it fuzzes instead of from nothing or an older corpus.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use novacron::cluster::frame::{split, Channel, Message, WIRE_VERSION};
use uuid::Uuid;

/// One message of every variant.
fn samples() -> Vec<Message> {
    let id = |n: u8| Uuid::from_bytes([n; 16]);
    let sha = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".to_string();
    vec![
        Message::Hello { protocol_version: 3, node_id: id(1), name: "a".into(), channel: Channel::Control },
        Message::HelloOk { protocol_version: 3, node_id: id(2), name: "b".into() },
        Message::Refused { reason: "protocol version mismatch".into() },
        Message::Heartbeat { seq: 7, sent_at: 300_000 },
        Message::HeartbeatAck { seq: 7, sent_at: 300_000 },
        Message::Changes { origin: id(1), seq: 130, entries: vec![(129, vec![2, 9, 9]), (130, vec![2])] },
        Message::Ack { origin: id(1), seq: 130 },
        Message::NeedSnapshot { origin: id(2) },
        Message::SnapshotChunk { origin: id(2), seq: 5, index: 1, last: true, data: vec![0xFF; 40] },
        Message::SnapshotAck { origin: id(2), seq: 5, index: 1 },
        Message::Resend { origin: id(1), after: 129 },
        Message::ImageFetch { sha256: sha.clone(), offset: 0 },
        Message::ImageData { sha256: sha.clone(), offset: 262_144, last: true, data: vec![7; 64] },
        Message::ImageAck { sha256: sha.clone(), offset: 262_208 },
        Message::ImageUnavailable { sha256: sha, reason: "not verified".into() },
    ]
}

/// The variant's index. Exhaustive on purpose: a new variant does not
/// compile here until it has an arm, and then `write_seeds` refuses to
/// run until `samples` has one of it.
fn variant(m: &Message) -> usize {
    match m {
        Message::Hello { .. } => 0,
        Message::HelloOk { .. } => 1,
        Message::Refused { .. } => 2,
        Message::Heartbeat { .. } => 3,
        Message::HeartbeatAck { .. } => 4,
        Message::Changes { .. } => 5,
        Message::Ack { .. } => 6,
        Message::NeedSnapshot { .. } => 7,
        Message::SnapshotChunk { .. } => 8,
        Message::SnapshotAck { .. } => 9,
        Message::Resend { .. } => 10,
        Message::ImageFetch { .. } => 11,
        Message::ImageData { .. } => 12,
        Message::ImageAck { .. } => 13,
        Message::ImageUnavailable { .. } => 14,
    }
}
const VARIANTS: usize = 15;

fn write_seeds(dir: &std::path::Path) {
    let samples = samples();
    let mut frames: Vec<(String, Vec<u8>)> =
        samples.iter().map(|m| (format!("v{WIRE_VERSION}-{}", m.kind()), m.encode())).collect();
    let bulk = Message::Hello {
        protocol_version: 4,
        node_id: Uuid::nil(),
        name: "a".into(),
        channel: Channel::Bulk,
    };
    frames.push((format!("v{WIRE_VERSION}-hello_bulk"), bulk.encode()));
    // The frozen handshake as a node of another wire version sends it.
    frames.extend(samples[..3].iter().map(|m| (format!("v2-{}", m.kind()), m.encode_as(2))));
    common::write_seeds(dir, samples.iter().map(variant).collect(), VARIANTS, &frames, WIRE_VERSION);
}

fuzz_target!(
    init: {
        if let Some(dir) = std::env::var_os("NOVACRON_FUZZ_SEEDS") {
            write_seeds(std::path::Path::new(&dir));
        }
    },
    |data: &[u8]| {
        common::split_all(data, split, Message::encode);
        let _ = Message::decode(data);
    }
);
