//! The disk-frame decoder (data plane to data plane) on arbitrary bytes:
//! splitting frames off a buffer and decoding them must return a message or
//! an error, never panic, and never allocate for a body the length limit
//! refuses. A decoded message must survive its own round trip.
//!
//! Seeds: with NOVACRON_FUZZ_SEEDS=DIR (tests/fuzz/run.sh sets it), the
//! target first writes a frame of every `DiskMsg` variant, encoded by the
//! current code, into DIR (and one buffer of them all, and the handshake of
//! another wire version), so that a run starts from valid frames of the wire
//! version it fuzzes.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use novacron::cluster::disk_frame::{
    split, DiskMsg, DiskRef, RejectReason, ReplicaState, SyncKind, DISK_WIRE_VERSION,
};
use uuid::Uuid;

/// One message of every variant.
fn samples() -> Vec<DiskMsg> {
    let id = |n: u8| Uuid::from_bytes([n; 16]);
    let disk = DiskRef { vm: id(3), device: "vda".into() };
    vec![
        DiskMsg::Hello { wire: DISK_WIRE_VERSION as u32, node_id: id(1) },
        DiskMsg::HelloOk { node_id: id(2) },
        DiskMsg::Refused { reason: "wire version mismatch".into() },
        DiskMsg::Attach { disk: disk.clone(), epoch: 4, size_bytes: 1 << 30, generation: 17 },
        DiskMsg::Attached { disk: disk.clone(), state: ReplicaState::Outdated, generation: 16 },
        DiskMsg::Rejected {
            disk: Some(disk.clone()),
            seq: Some(40),
            reason: RejectReason::StaleEpoch,
            message: "epoch 3 is older than 4".into(),
        },
        DiskMsg::SyncBegin { disk: disk.clone(), kind: SyncKind::Delta, total_bytes: 1 << 20 },
        DiskMsg::Data { disk: disk.clone(), seq: 41, offset: 4096, data: vec![0xA5; 512] },
        DiskMsg::Flush { disk: disk.clone(), seq: 42 },
        DiskMsg::SyncEnd { disk: disk.clone(), seq: 43 },
        DiskMsg::Ack { disk: disk.clone(), seq: 43, durable: true },
        DiskMsg::Detach { disk: disk.clone() },
        DiskMsg::Diverged { disk, ranges: vec![(0, 4096), (1 << 20, 8192)] },
    ]
}

/// The variant's index. Exhaustive on purpose: a new variant does not
/// compile here until it has an arm, and then `write_seeds` refuses to
/// run until `samples` has one of it.
fn variant(m: &DiskMsg) -> usize {
    match m {
        DiskMsg::Hello { .. } => 0,
        DiskMsg::HelloOk { .. } => 1,
        DiskMsg::Refused { .. } => 2,
        DiskMsg::Attach { .. } => 3,
        DiskMsg::Attached { .. } => 4,
        DiskMsg::Rejected { .. } => 5,
        DiskMsg::SyncBegin { .. } => 6,
        DiskMsg::Data { .. } => 7,
        DiskMsg::Flush { .. } => 8,
        DiskMsg::SyncEnd { .. } => 9,
        DiskMsg::Ack { .. } => 10,
        DiskMsg::Detach { .. } => 11,
        DiskMsg::Diverged { .. } => 12,
    }
}
const VARIANTS: usize = 13;

fn write_seeds(dir: &std::path::Path) {
    let samples = samples();
    let mut frames: Vec<(String, Vec<u8>)> =
        samples.iter().map(|m| (format!("v{DISK_WIRE_VERSION}-{}", m.kind()), m.encode())).collect();
    // The frozen handshake as a node of another wire version sends it.
    let other = DISK_WIRE_VERSION.wrapping_add(1);
    frames.extend(samples[..3].iter().map(|m| (format!("v{other}-{}", m.kind()), m.encode_as(other))));
    common::write_seeds(dir, samples.iter().map(variant).collect(), VARIANTS, &frames, DISK_WIRE_VERSION);
}

fuzz_target!(
    init: {
        if let Some(dir) = std::env::var_os("NOVACRON_FUZZ_SEEDS") {
            write_seeds(std::path::Path::new(&dir));
        }
    },
    |data: &[u8]| {
        common::split_all(data, split, DiskMsg::encode);
        let _ = DiskMsg::decode(data);
    }
);
