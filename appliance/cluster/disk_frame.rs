//! Disk frames: the wire format between the data planes of the two nodes,
//! on a TCP+TLS connection of their own (not the peer link), so replicated
//! guest writes never queue behind the state stream or heartbeats.
//!
//! Same framing as the peer link ([`super::frame`]): `[u32 big-endian
//! length][u8 wire version][postcard DiskMsg]`, the length limit checked on
//! the 4-byte header before the body is allocated. The handshake variants
//! (`Hello`, `HelloOk`, `Refused`: indices 0-2) are frozen, so two data
//! planes of different versions can still tell each other why they refuse.
//!
//! The decoder checks structure only. What a frame asks of a replica (its
//! disk, epoch, range, order) is checked by the replica
//! (`dataplane::replica`), which answers `Rejected` without touching the
//! file. Offsets and lengths are bytes, multiples of [`SECTOR`].

use super::frame::{encode_frame, exact, split_frame};
use super::ClusterError;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Encoding of the frame body; bump on any change to [`DiskMsg`] (the
/// frozen handshake variants excepted). Also the `wire` of `Hello`: both
/// data planes must speak the same one.
pub const DISK_WIRE_VERSION: u8 = 2;

/// Largest guest data in one `Data` frame.
pub const MAX_CHUNK: usize = 1 << 20;

/// Largest frame body (version byte + message): a full chunk plus room for
/// the disk reference, sequence number and offset.
pub const MAX_DISK_FRAME: usize = MAX_CHUNK + 4096;

/// Offsets and lengths of disk data are multiples of this.
pub const SECTOR: u64 = 512;

pub use super::frame::{body_len, HEADER};

/// One replicated disk: the VM and its device name (`vda`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskRef {
    pub vm: Uuid,
    pub device: String,
}

/// A replica's own durable state, DRBD's disk states. Only `UpToDate` may
/// be promoted without `force`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    /// Holds every write the primary acknowledged.
    UpToDate,
    /// A delta resync is being applied; the pre-resync image is
    /// recoverable from the undo log.
    Syncing,
    /// Consistent but older than the primary (a point in its past).
    Outdated,
    /// Not a consistent image (a full sync never completed).
    Inconsistent,
}

impl ReplicaState {
    /// The name the API, metrics and logs use.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::UpToDate => "up_to_date",
            ReplicaState::Syncing => "syncing",
            ReplicaState::Outdated => "outdated",
            ReplicaState::Inconsistent => "inconsistent",
        }
    }
}

impl std::fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a secondary refused a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    UnknownDisk,
    /// The sender's epoch is lower than the one this replica holds.
    StaleEpoch,
    /// The range ends beyond the disk.
    OutOfRange,
    /// More than [`MAX_CHUNK`] bytes.
    Oversized,
    /// A sequence number that does not increase, or a message out of the
    /// protocol's order (data outside a sync of a replica that is not up
    /// to date).
    BadOrder,
    /// Data before `Attach`.
    NotAttached,
    /// The secondary failed to read or write its files.
    Io,
    /// An offset or length that is not a multiple of [`SECTOR`].
    Misaligned,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncKind {
    /// Every allocated extent; the replica is inconsistent until `SyncEnd`.
    Full,
    /// Only the blocks dirty while the peer was away; the replica keeps
    /// an undo log so that a broken resync can fall back to the old image.
    Delta,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskMsg {
    // -- frozen: never change these three or their order --
    /// First frame of the dialing data plane.
    Hello { wire: u32, node_id: Uuid },
    /// The accepting side agrees.
    HelloOk { node_id: Uuid },
    /// Either side refuses the handshake and closes.
    Refused { reason: String },
    // -- versioned by DISK_WIRE_VERSION --
    /// Primary -> secondary: "I am primary of this disk at this epoch";
    /// `generation` is the primary's data generation (see `Attached`).
    Attach { disk: DiskRef, epoch: u64, size_bytes: u64, generation: u64 },
    /// Secondary's answer: its own durable state and the generation it
    /// last completed a sync of (which tells the primary whether a delta
    /// resync can bring it up to date).
    Attached { disk: DiskRef, state: ReplicaState, generation: u64 },
    /// The secondary refused a frame (`disk`/`seq` when it had them) and
    /// applied nothing of it.
    Rejected { disk: Option<DiskRef>, seq: Option<u64>, reason: RejectReason, message: String },
    /// A sync of `total_bytes` begins.
    SyncBegin { disk: DiskRef, kind: SyncKind, total_bytes: u64 },
    /// Guest data at `offset` (at most [`MAX_CHUNK`] bytes). `seq`
    /// increases strictly over `Data`, `Flush` and `SyncEnd` of a disk
    /// from its `Attach` on.
    Data {
        disk: DiskRef,
        seq: u64,
        offset: u64,
        #[serde(with = "raw_bytes")]
        data: Vec<u8>,
    },
    /// Make everything up to `seq` durable and say so.
    Flush { disk: DiskRef, seq: u64 },
    /// The sync is complete with everything up to `seq`.
    SyncEnd { disk: DiskRef, seq: u64 },
    /// Cumulative: everything up to `seq` is applied; `durable`: and
    /// fdatasync'd.
    Ack { disk: DiskRef, seq: u64, durable: bool },
    /// The primary stops replicating this disk on this connection.
    Detach { disk: DiskRef },
    /// Secondary -> primary, before its `Attached`: ranges (offset,
    /// length) this node wrote while it was the disk's primary that the
    /// new primary may not hold (a failback). The resync covers them too,
    /// which discards them here. Several frames when there are many.
    Diverged { disk: DiskRef, ranges: Vec<(u64, u64)> },
}

/// Ranges in one `Diverged` frame: at most 20 bytes each encoded, so a
/// frame stays far below [`MAX_DISK_FRAME`].
pub const MAX_DIVERGED_RANGES: usize = 32 * 1024;

/// The frozen prefix of [`DiskMsg`]: decodes a handshake of any version.
#[derive(Deserialize)]
enum Frozen {
    Hello { wire: u32, node_id: Uuid },
    HelloOk { node_id: Uuid },
    Refused { reason: String },
}

/// `Vec<u8>` as postcard bytes: the same encoding as a sequence of `u8`
/// (a varint length, then the bytes) but decoded with one copy instead of
/// byte by byte, which matters for 1 MiB chunks.
mod raw_bytes {
    use serde::{de, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(Bytes)
    }

    struct Bytes;

    impl<'de> de::Visitor<'de> for Bytes {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
    }
}

impl DiskMsg {
    /// The whole frame: header, version byte, body.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_as(DISK_WIRE_VERSION)
    }

    /// A frame stamped with another wire version (tests, and what a node
    /// of another version sends).
    pub fn encode_as(&self, version: u8) -> Vec<u8> {
        encode_frame(self, version)
    }

    /// Decodes a frame body (version byte + message). A body of another
    /// wire version decodes only if it is a frozen handshake message.
    pub fn decode(body: &[u8]) -> Result<DiskMsg, ClusterError> {
        let (&version, rest) =
            body.split_first().ok_or_else(|| ClusterError::Malformed("empty frame".into()))?;
        if version == DISK_WIRE_VERSION {
            return exact(rest);
        }
        match exact::<Frozen>(rest) {
            Ok(Frozen::Hello { wire, node_id }) => Ok(DiskMsg::Hello { wire, node_id }),
            Ok(Frozen::HelloOk { node_id }) => Ok(DiskMsg::HelloOk { node_id }),
            Ok(Frozen::Refused { reason }) => Ok(DiskMsg::Refused { reason }),
            Err(_) => Err(ClusterError::WireVersion { ours: DISK_WIRE_VERSION, theirs: version }),
        }
    }

    /// The disk a message is about (`None` for the handshake).
    pub fn disk(&self) -> Option<&DiskRef> {
        match self {
            DiskMsg::Hello { .. } | DiskMsg::HelloOk { .. } | DiskMsg::Refused { .. } => None,
            DiskMsg::Rejected { disk, .. } => disk.as_ref(),
            DiskMsg::Attach { disk, .. }
            | DiskMsg::Attached { disk, .. }
            | DiskMsg::SyncBegin { disk, .. }
            | DiskMsg::Data { disk, .. }
            | DiskMsg::Flush { disk, .. }
            | DiskMsg::SyncEnd { disk, .. }
            | DiskMsg::Ack { disk, .. }
            | DiskMsg::Detach { disk }
            | DiskMsg::Diverged { disk, .. } => Some(disk),
        }
    }

    /// The sequence number of a sequenced message (`Data`, `Flush`,
    /// `SyncEnd`).
    pub fn seq(&self) -> Option<u64> {
        match self {
            DiskMsg::Data { seq, .. } | DiskMsg::Flush { seq, .. } | DiskMsg::SyncEnd { seq, .. } => {
                Some(*seq)
            }
            _ => None,
        }
    }

    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            DiskMsg::Hello { .. } => "hello",
            DiskMsg::HelloOk { .. } => "hello_ok",
            DiskMsg::Refused { .. } => "refused",
            DiskMsg::Attach { .. } => "attach",
            DiskMsg::Attached { .. } => "attached",
            DiskMsg::Rejected { .. } => "rejected",
            DiskMsg::SyncBegin { .. } => "sync_begin",
            DiskMsg::Data { .. } => "data",
            DiskMsg::Flush { .. } => "flush",
            DiskMsg::SyncEnd { .. } => "sync_end",
            DiskMsg::Ack { .. } => "ack",
            DiskMsg::Detach { .. } => "detach",
            DiskMsg::Diverged { .. } => "diverged",
        }
    }
}

/// Splits the first complete frame off `buf`: `Ok(None)` while it is
/// incomplete, else the message and the bytes it used. The limit
/// (normally [`MAX_DISK_FRAME`]) is checked on the header alone, so an
/// oversized frame is refused before its body arrives.
pub fn split(buf: &[u8], limit: usize) -> Result<Option<(DiskMsg, usize)>, ClusterError> {
    split_frame(buf, limit, DiskMsg::decode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::frame::checks;
    use crate::cluster::SeededRng;

    fn id(n: u8) -> Uuid {
        Uuid::from_bytes([n; 16])
    }

    fn vda() -> DiskRef {
        DiskRef { vm: id(0xC3), device: "vda".into() }
    }

    /// One of each message, with fixed values; the golden bytes below are
    /// their encodings.
    fn samples() -> Vec<DiskMsg> {
        vec![
            DiskMsg::Hello { wire: 1, node_id: id(0xA1) },
            DiskMsg::HelloOk { node_id: id(0xB2) },
            DiskMsg::Refused { reason: "no".into() },
            DiskMsg::Attach { disk: vda(), epoch: 3, size_bytes: 1 << 20, generation: 300 },
            DiskMsg::Attached { disk: vda(), state: ReplicaState::Outdated, generation: 299 },
            DiskMsg::Rejected {
                disk: Some(vda()),
                seq: Some(9),
                reason: RejectReason::OutOfRange,
                message: "x".into(),
            },
            DiskMsg::SyncBegin { disk: vda(), kind: SyncKind::Delta, total_bytes: 4096 },
            DiskMsg::Data { disk: vda(), seq: 130, offset: 512, data: vec![7, 8] },
            DiskMsg::Flush { disk: vda(), seq: 131 },
            DiskMsg::SyncEnd { disk: vda(), seq: 132 },
            DiskMsg::Ack { disk: vda(), seq: 132, durable: true },
            DiskMsg::Detach { disk: vda() },
            DiskMsg::Diverged { disk: vda(), ranges: vec![(4096, 8192)] },
        ]
    }

    fn golden() -> Vec<String> {
        let a1 = "10a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";
        let b2 = "10b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2";
        // DiskRef: uuid (length 16 + bytes), device "vda".
        let d = "10c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3 03766461";
        vec![
            format!("0000001402 00 01 {a1}"),
            format!("0000001302 01 {b2}"),
            "0000000502 02 026e6f".into(),
            // Attach: epoch 3, size 1 MiB (varint 808040), generation 300 (ac02).
            format!("0000001d02 03 {d} 03 808040 ac02"),
            // Attached: Outdated is variant 2.
            format!("0000001a02 04 {d} 02 ab02"),
            // Rejected: Some(disk), Some(9), OutOfRange (2), "x".
            format!("0000001d02 05 01 {d} 01 09 02 0178"),
            format!("0000001a02 06 {d} 01 8020"),
            // Data: seq 130 (8201), offset 512 (8004), 2 bytes.
            format!("0000001e02 07 {d} 8201 8004 02 0708"),
            format!("0000001902 08 {d} 8301"),
            format!("0000001902 09 {d} 8401"),
            format!("0000001a02 0a {d} 8401 01"),
            format!("0000001702 0b {d}"),
            // Diverged: one range (4096 = 8020, 8192 = 8040).
            format!("0000001c02 0c {d} 01 8020 8040"),
        ]
    }

    #[test]
    fn golden_bytes_of_every_message() {
        checks::golden(&samples(), &golden(), DiskMsg::encode, split, MAX_DISK_FRAME);
    }

    #[test]
    fn data_bytes_encode_like_a_sequence_of_u8() {
        // raw_bytes must not change the encoding postcard gives a Vec<u8>:
        // only the decoding gets faster.
        #[derive(Serialize)]
        struct Plain(Vec<u8>);
        let data: Vec<u8> = (0..=255).cycle().take(3000).collect();
        let m = DiskMsg::Data { disk: vda(), seq: 1, offset: 0, data: data.clone() };
        let plain = postcard::to_allocvec(&Plain(data)).unwrap();
        assert!(m.encode().ends_with(&plain));
    }

    #[test]
    fn a_full_chunk_fits_the_frame_limit() {
        let disk = DiskRef { vm: id(1), device: "d".repeat(255) };
        let m = DiskMsg::Data { disk, seq: u64::MAX, offset: u64::MAX, data: vec![1; MAX_CHUNK] };
        let frame = m.encode();
        assert!(frame.len() - HEADER <= MAX_DISK_FRAME, "{} bytes", frame.len());
        assert_eq!(split(&frame, MAX_DISK_FRAME).unwrap().unwrap().0, m);
    }

    #[test]
    fn handshake_of_another_version_still_decodes() {
        let hello = DiskMsg::Hello { wire: 9, node_id: id(1) };
        assert_eq!(split(&hello.encode_as(9), MAX_DISK_FRAME).unwrap().unwrap().0, hello);
        let ok = DiskMsg::HelloOk { node_id: id(2) };
        assert_eq!(split(&ok.encode_as(0), MAX_DISK_FRAME).unwrap().unwrap().0, ok);
        let refused = DiskMsg::Refused { reason: "old".into() };
        assert_eq!(split(&refused.encode_as(1), MAX_DISK_FRAME).unwrap().unwrap().0, refused);
        let flush = DiskMsg::Flush { disk: vda(), seq: 1 }.encode_as(1);
        let e = split(&flush, MAX_DISK_FRAME).unwrap_err();
        assert!(matches!(e, ClusterError::WireVersion { ours: 2, theirs: 1 }), "{e}");
    }

    #[test]
    fn oversized_frames_are_refused_on_the_header() {
        checks::oversized_refused_on_the_header(split, MAX_DISK_FRAME);
        // A chunk over MAX_CHUNK cannot arrive in a frame of the limit.
        let big = DiskMsg::Data { disk: vda(), seq: 1, offset: 0, data: vec![0; MAX_DISK_FRAME] }.encode();
        assert!(matches!(split(&big, MAX_DISK_FRAME), Err(ClusterError::FrameTooLarge { .. })));
    }

    #[test]
    fn incomplete_trailing_and_empty_frames() {
        let frame = DiskMsg::Ack { disk: vda(), seq: 1, durable: false }.encode();
        checks::incomplete_trailing_and_empty(&frame, DISK_WIRE_VERSION, split, MAX_DISK_FRAME);
        // A data length beyond the body is refused, not allocated.
        let mut lying = DiskMsg::Data { disk: vda(), seq: 1, offset: 0, data: vec![] }.encode();
        lying.pop();
        lying.extend([0xff, 0xff, 0xff, 0x07]);
        let len = (lying.len() - HEADER) as u32;
        lying[..HEADER].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(split(&lying, MAX_DISK_FRAME), Err(ClusterError::Malformed(_))));
    }

    fn random_message(rng: &mut SeededRng) -> DiskMsg {
        let bytes = |rng: &mut SeededRng, max: u64| {
            (0..rng.below(max)).map(|_| rng.next_u64() as u8).collect::<Vec<u8>>()
        };
        let text = |rng: &mut SeededRng| String::from_utf8_lossy(&bytes(rng, 40)).into_owned();
        let uuid = |rng: &mut SeededRng| Uuid::from_u64_pair(rng.next_u64(), rng.next_u64());
        let disk = |rng: &mut SeededRng| DiskRef { vm: uuid(rng), device: text(rng) };
        let state = |rng: &mut SeededRng| {
            [
                ReplicaState::UpToDate,
                ReplicaState::Syncing,
                ReplicaState::Outdated,
                ReplicaState::Inconsistent,
            ][rng.below(4) as usize]
        };
        match rng.below(12) {
            0 => DiskMsg::Hello { wire: rng.next_u64() as u32, node_id: uuid(rng) },
            1 => DiskMsg::HelloOk { node_id: uuid(rng) },
            2 => DiskMsg::Refused { reason: text(rng) },
            3 => DiskMsg::Attach {
                disk: disk(rng),
                epoch: rng.next_u64(),
                size_bytes: rng.next_u64(),
                generation: rng.next_u64(),
            },
            4 => DiskMsg::Attached { disk: disk(rng), state: state(rng), generation: rng.next_u64() },
            5 => DiskMsg::Rejected {
                disk: (rng.below(2) == 0).then(|| disk(rng)),
                seq: (rng.below(2) == 0).then(|| rng.next_u64()),
                reason: RejectReason::Io,
                message: text(rng),
            },
            6 => DiskMsg::SyncBegin {
                disk: disk(rng),
                kind: if rng.below(2) == 0 { SyncKind::Full } else { SyncKind::Delta },
                total_bytes: rng.next_u64(),
            },
            7 => DiskMsg::Flush { disk: disk(rng), seq: rng.next_u64() },
            8 => DiskMsg::SyncEnd { disk: disk(rng), seq: rng.next_u64() },
            9 => DiskMsg::Ack { disk: disk(rng), seq: rng.next_u64(), durable: rng.below(2) == 0 },
            10 => DiskMsg::Detach { disk: disk(rng) },
            _ => DiskMsg::Data {
                disk: disk(rng),
                seq: rng.next_u64(),
                offset: rng.next_u64(),
                data: bytes(rng, 5000),
            },
        }
    }

    #[test]
    fn seeded_round_trips_and_mutations() {
        checks::seeded_round_trips_and_mutations(random_message, DiskMsg::encode, split, MAX_DISK_FRAME);
    }
}
