//! Peer-link frames: `[u32 big-endian length][u8 wire version][postcard
//! Message]`, with a hard length limit checked on the 4-byte header, before
//! anything is allocated for the body.
//!
//! postcard encodes by field order and variant index, so the golden-bytes
//! tests below fail when an encoding changes by accident. The handshake
//! variants (`Hello`, `HelloOk`, `Refused`: indices 0-2) are frozen: their
//! layout never changes, and a frame of another wire version is still
//! decoded if it is one of them, so two nodes of different versions can
//! tell each other why they refuse instead of seeing garbage.

use super::ClusterError;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Encoding of the frame body. Bump on any change to [`Message`] (the
/// frozen handshake variants excepted, which never change).
/// 2: `SnapshotAck` and `Resend` (state replication's window and repair).
/// 3: `ImageFetch`, `ImageData`, `ImageAck`, `ImageUnavailable` (base image
/// files copied by content hash).
pub const WIRE_VERSION: u8 = 3;

/// The link protocol a node speaks, exchanged in `Hello`/`HelloOk`; both
/// sides must speak the same one. 2: state replication (the window of
/// snapshot chunks, `Resend`); bumped with the wire version so a node of
/// protocol 1 is refused in the handshake instead of failing on a frame.
/// 3: image files copied by content hash. 4: the bulk connection (image
/// files move there from the control connection). 5: change format 3
/// (`Vm.replication`), which a node of protocol 4 cannot decode. 6: change
/// format 4 (`Vm.autostart_priority`), likewise for protocol 5.
pub const PROTOCOL_VERSION: u32 = 6;

/// Largest frame body (version byte + message). A change record is at most
/// about the API's 1 MiB body; batches and snapshot chunks are cut far
/// below this (see [`MAX_BATCH_BYTES`]).
pub const MAX_FRAME: usize = 4 << 20;

/// Target size of a `Changes` batch or a snapshot chunk: small enough that a
/// heartbeat queued behind one waits milliseconds, not seconds.
pub const MAX_BATCH_BYTES: usize = 256 << 10;

/// Bytes before the body: the length.
pub const HEADER: usize = 4;

/// Which traffic a connection carries. Each class has its own TCP
/// connection, so bulk data (disk replication, issue 10) never queues in
/// front of heartbeats and the state stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Channel {
    /// Handshake, heartbeats, the state stream.
    Control,
    /// Image files (and disk replication, issue 10): opened by the dialer
    /// while the control connection is up, closed with it.
    Bulk,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    // -- frozen: never change these three or their order --
    /// First frame of the dialing side.
    Hello {
        protocol_version: u32,
        node_id: Uuid,
        name: String,
        channel: Channel,
    },
    /// The accepting side agrees; the link is up.
    HelloOk {
        protocol_version: u32,
        node_id: Uuid,
        name: String,
    },
    /// Either side refuses the handshake and closes.
    Refused {
        reason: String,
    },
    // -- versioned by WIRE_VERSION --
    /// `sent_at` is the sender's own clock (microseconds since its link
    /// started), echoed back verbatim in the ack: only the sender reads it.
    Heartbeat {
        seq: u64,
        sent_at: u64,
    },
    HeartbeatAck {
        seq: u64,
        sent_at: u64,
    },
    /// Changes of `origin`, oldest first, each `(seq, encoded change)` (the
    /// store's encoding, its format version byte first: opaque here). `seq`
    /// is the origin's newest seq when the batch was cut, so the receiver
    /// knows how far behind it is.
    Changes {
        origin: Uuid,
        seq: u64,
        entries: Vec<(u64, Vec<u8>)>,
    },
    /// Everything of `origin` up to `seq` is applied (and durable) here.
    /// Also sent right after the handshake: where to resume.
    Ack {
        origin: Uuid,
        seq: u64,
    },
    /// The receiver cannot continue from a tail (it is behind the sender's
    /// pruned point, or has nothing): send a snapshot of `origin`.
    NeedSnapshot {
        origin: Uuid,
    },
    /// Part `index` of a snapshot of `origin`'s state as of `seq`; the tail
    /// after `seq` follows as `Changes`. `last` closes the snapshot.
    SnapshotChunk {
        origin: Uuid,
        seq: u64,
        index: u32,
        last: bool,
        data: Vec<u8>,
    },
    /// Chunk `index` of the snapshot as of `seq` arrived: the sender's
    /// window of chunks moves on.
    SnapshotAck {
        origin: Uuid,
        seq: u64,
        index: u32,
    },
    /// A batch of `origin` did not follow what is applied here (`after` is
    /// the mark): send again from `after + 1`.
    Resend {
        origin: Uuid,
        after: u64,
    },
    /// Send the image file whose SHA-256 (lower-case hex) is `sha256`, from
    /// byte `offset` on (the receiver restarts a cut copy from 0).
    ImageFetch {
        sha256: String,
        offset: u64,
    },
    /// `data` of that file at `offset` (at most [`MAX_BATCH_BYTES`]);
    /// `last` ends the file.
    ImageData {
        sha256: String,
        offset: u64,
        last: bool,
        data: Vec<u8>,
    },
    /// The receiver holds the file's first `offset` bytes: the sender's
    /// window moves on.
    ImageAck {
        sha256: String,
        offset: u64,
    },
    /// The sender has no file of that content (deleted, or not verified).
    ImageUnavailable {
        sha256: String,
        reason: String,
    },
}

/// The frozen prefix of [`Message`]: decodes a handshake of any wire version.
#[derive(Deserialize)]
enum Frozen {
    Hello { protocol_version: u32, node_id: Uuid, name: String, channel: Channel },
    HelloOk { protocol_version: u32, node_id: Uuid, name: String },
    Refused { reason: String },
}

impl Message {
    /// The whole frame: header, version byte, body.
    pub fn encode(&self) -> Vec<u8> {
        Self::encode_as(self, WIRE_VERSION)
    }

    /// A frame stamped with another wire version: what an older or newer
    /// node would send (tests and the handshake's mismatch path).
    pub fn encode_as(&self, version: u8) -> Vec<u8> {
        encode_frame(self, version)
    }

    /// Decodes a frame body (version byte + message). A body of another
    /// wire version decodes only if it is a frozen handshake message.
    pub fn decode(body: &[u8]) -> Result<Message, ClusterError> {
        let (&version, rest) =
            body.split_first().ok_or_else(|| ClusterError::Malformed("empty frame".into()))?;
        if version == WIRE_VERSION {
            return exact(rest);
        }
        match exact::<Frozen>(rest) {
            Ok(Frozen::Hello { protocol_version, node_id, name, channel }) => {
                Ok(Message::Hello { protocol_version, node_id, name, channel })
            }
            Ok(Frozen::HelloOk { protocol_version, node_id, name }) => {
                Ok(Message::HelloOk { protocol_version, node_id, name })
            }
            Ok(Frozen::Refused { reason }) => Ok(Message::Refused { reason }),
            Err(_) => Err(ClusterError::WireVersion { ours: WIRE_VERSION, theirs: version }),
        }
    }

    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::HelloOk { .. } => "hello_ok",
            Message::Refused { .. } => "refused",
            Message::Heartbeat { .. } => "heartbeat",
            Message::HeartbeatAck { .. } => "heartbeat_ack",
            Message::Changes { .. } => "changes",
            Message::Ack { .. } => "ack",
            Message::NeedSnapshot { .. } => "need_snapshot",
            Message::SnapshotChunk { .. } => "snapshot_chunk",
            Message::SnapshotAck { .. } => "snapshot_ack",
            Message::Resend { .. } => "resend",
            Message::ImageFetch { .. } => "image_fetch",
            Message::ImageData { .. } => "image_data",
            Message::ImageAck { .. } => "image_ack",
            Message::ImageUnavailable { .. } => "image_unavailable",
        }
    }
}

/// `[length][version][postcard body]` of any message type (the disk
/// frames share this framing).
pub(super) fn encode_frame<T: Serialize>(msg: &T, version: u8) -> Vec<u8> {
    let mut out = vec![0; HEADER];
    out.push(version);
    // Serializing plain data into a Vec cannot fail.
    out.extend(postcard::to_allocvec(msg).expect("postcard encoding of a frame"));
    let len = (out.len() - HEADER) as u32;
    out[..HEADER].copy_from_slice(&len.to_be_bytes());
    out
}

/// postcard, refusing trailing bytes (a frame is exactly one message).
pub(super) fn exact<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ClusterError> {
    let (value, rest) =
        postcard::take_from_bytes(bytes).map_err(|e| ClusterError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ClusterError::Malformed(format!("{} trailing bytes", rest.len())));
    }
    Ok(value)
}

/// The body length announced by a frame header, refused if over `limit`.
pub fn body_len(header: [u8; HEADER], limit: usize) -> Result<usize, ClusterError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > limit {
        return Err(ClusterError::FrameTooLarge { len, limit });
    }
    if len == 0 {
        return Err(ClusterError::Malformed("empty frame".into()));
    }
    Ok(len)
}

/// Splits the first complete frame off `buf`: `Ok(None)` while it is
/// incomplete, else the message and the bytes it used. The limit is checked
/// on the header alone, so an oversized frame is refused before its body
/// arrives.
pub fn split(buf: &[u8], limit: usize) -> Result<Option<(Message, usize)>, ClusterError> {
    split_frame(buf, limit, Message::decode)
}

/// [`split`] with the body decoder as a parameter (shared with the disk
/// frames).
pub(super) fn split_frame<T>(
    buf: &[u8],
    limit: usize,
    decode: impl FnOnce(&[u8]) -> Result<T, ClusterError>,
) -> Result<Option<(T, usize)>, ClusterError> {
    let Some(header) = buf.get(..HEADER) else { return Ok(None) };
    let len = body_len(header.try_into().expect("4 bytes"), limit)?;
    match buf.get(HEADER..HEADER + len) {
        Some(body) => Ok(Some((decode(body)?, HEADER + len))),
        None => Ok(None),
    }
}

/// Checks shared by the tests of every framed message type (peer-link and
/// disk frames), generic over its split function.
#[cfg(test)]
pub(super) mod checks {
    use super::ClusterError;
    use crate::cluster::SeededRng;
    use std::fmt::Debug;

    pub type Split<T> = fn(&[u8], usize) -> Result<Option<(T, usize)>, ClusterError>;

    /// Each sample encodes to its golden hex (spaces ignored) and decodes
    /// back from it.
    pub fn golden<T: PartialEq + Debug>(
        samples: &[T],
        golden: &[String],
        encode: fn(&T) -> Vec<u8>,
        split: Split<T>,
        limit: usize,
    ) {
        assert_eq!(samples.len(), golden.len());
        for (m, g) in samples.iter().zip(golden) {
            let want = g.replace(' ', "");
            assert_eq!(hex::encode(encode(m)), want, "{m:?} changed its encoding");
            let (back, used) = split(&hex::decode(&want).unwrap(), limit).unwrap().unwrap();
            assert_eq!(&back, m);
            assert_eq!(used, want.len() / 2);
        }
    }

    /// Only the header is there: a refusal cannot have read a body.
    pub fn oversized_refused_on_the_header<T: Debug>(split: Split<T>, limit: usize) {
        let e = split(&u32::MAX.to_be_bytes(), limit).unwrap_err();
        assert!(matches!(e, ClusterError::FrameTooLarge { len, .. } if len == u32::MAX as usize), "{e}");
        let e = split(&(limit as u32 + 1).to_be_bytes(), limit).unwrap_err();
        assert!(matches!(e, ClusterError::FrameTooLarge { .. }));
        assert!(split(&(limit as u32).to_be_bytes(), limit).unwrap().is_none());
    }

    /// `frame` cut anywhere is incomplete; with a byte too many it is
    /// refused for the trailing byte; empty bodies are malformed.
    pub fn incomplete_trailing_and_empty<T: Debug>(frame: &[u8], version: u8, split: Split<T>, limit: usize) {
        for cut in 0..frame.len() {
            assert!(split(&frame[..cut], limit).unwrap().is_none(), "cut at {cut}");
        }
        let mut longer = frame.to_vec();
        longer[3] += 1;
        longer.push(0);
        let e = split(&longer, limit).unwrap_err();
        assert!(matches!(&e, ClusterError::Malformed(m) if m.contains("trailing")), "{e}");
        assert!(matches!(split(&[0, 0, 0, 0], limit), Err(ClusterError::Malformed(_))));
        assert!(matches!(split(&[0, 0, 0, 1, version], limit), Err(ClusterError::Malformed(_))));
    }

    /// Seeded round trips, several frames in one buffer; then the same
    /// frames with random bytes flipped, cut or inserted must give a
    /// message or an error, never a panic (the fuzz targets in tests/fuzz
    /// explore this much further).
    pub fn seeded_round_trips_and_mutations<T: PartialEq + Debug>(
        random: fn(&mut SeededRng) -> T,
        encode: fn(&T) -> Vec<u8>,
        split: Split<T>,
        limit: usize,
    ) {
        for seed in 0..300 {
            let mut rng = SeededRng::new(seed);
            let msgs: Vec<T> = (0..5).map(|_| random(&mut rng)).collect();
            let mut buf: Vec<u8> = msgs.iter().flat_map(encode).collect();
            let mut at = 0;
            for m in &msgs {
                let (back, used) = split(&buf[at..], limit).unwrap().unwrap();
                assert_eq!(&back, m, "seed {seed}");
                at += used;
            }
            assert_eq!(at, buf.len());
            for _ in 0..20 {
                let i = rng.below(buf.len() as u64) as usize;
                match rng.below(3) {
                    0 => buf[i] ^= 1 << rng.below(8),
                    1 => buf.truncate(i.max(1)),
                    _ => buf.insert(i, rng.next_u64() as u8),
                }
                let mut rest = &buf[..];
                while let Ok(Some((_, used))) = split(rest, 64 << 10) {
                    rest = &rest[used..];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::SeededRng;

    fn id(n: u8) -> Uuid {
        Uuid::from_bytes([n; 16])
    }

    /// One of each message, with fixed values; the golden bytes below are
    /// their encodings.
    fn samples() -> Vec<Message> {
        vec![
            Message::Hello {
                protocol_version: 1,
                node_id: id(0xA1),
                name: "a".into(),
                channel: Channel::Control,
            },
            Message::HelloOk { protocol_version: 1, node_id: id(0xB2), name: "b".into() },
            Message::Refused { reason: "no".into() },
            Message::Heartbeat { seq: 7, sent_at: 300 },
            Message::HeartbeatAck { seq: 7, sent_at: 300 },
            Message::Changes { origin: id(0xA1), seq: 130, entries: vec![(129, vec![2, 9]), (130, vec![2])] },
            Message::Ack { origin: id(0xA1), seq: 130 },
            Message::NeedSnapshot { origin: id(0xB2) },
            Message::SnapshotChunk { origin: id(0xB2), seq: 5, index: 1, last: true, data: vec![0xFF] },
            Message::SnapshotAck { origin: id(0xB2), seq: 5, index: 1 },
            Message::Resend { origin: id(0xA1), after: 129 },
            Message::ImageFetch { sha256: "ab".into(), offset: 0 },
            Message::ImageData { sha256: "ab".into(), offset: 300, last: true, data: vec![7, 8] },
            Message::ImageAck { sha256: "ab".into(), offset: 302 },
            Message::ImageUnavailable { sha256: "ab".into(), reason: "x".into() },
        ]
    }

    fn golden() -> Vec<String> {
        let a1 = "10a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";
        let b2 = "10b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2";
        vec![
            // Hello: variant 0, protocol 1, uuid (length 16 + bytes), "a", Control.
            format!("0000001703 00 01 {a1} 0161 00"),
            format!("0000001603 01 01 {b2} 0162"),
            "0000000503 02 026e6f".into(),
            "0000000503 03 07 ac02".into(),
            "0000000503 04 07 ac02".into(),
            // Changes: origin, seq 130 (varint 8201), 2 entries.
            format!("0000001f03 05 {a1} 8201 02 8101 02 0209 8201 01 02"),
            format!("0000001503 06 {a1} 8201"),
            format!("0000001303 07 {b2}"),
            format!("0000001803 08 {b2} 05 01 01 01 ff"),
            format!("0000001503 09 {b2} 05 01"),
            format!("0000001503 0a {a1} 8101"),
            // Image messages: the hash as a string ("ab" here), offsets as varints.
            "0000000603 0b 026162 00".into(),
            "0000000b03 0c 026162 ac02 01 02 0708".into(),
            "0000000703 0d 026162 ae02".into(),
            "0000000703 0e 026162 0178".into(),
        ]
    }

    #[test]
    fn golden_bytes_of_every_message() {
        checks::golden(&samples(), &golden(), Message::encode, split, MAX_FRAME);
    }

    #[test]
    fn handshake_of_another_version_still_decodes() {
        let hello = Message::Hello {
            protocol_version: 9,
            node_id: id(1),
            name: "x".into(),
            channel: Channel::Control,
        };
        let frame = hello.encode_as(9);
        assert_eq!(split(&frame, MAX_FRAME).unwrap().unwrap().0, hello);
        let refused = Message::Refused { reason: "old".into() };
        assert_eq!(split(&refused.encode_as(0), MAX_FRAME).unwrap().unwrap().0, refused);
        // Anything else of another version is refused by its version.
        let hb = Message::Heartbeat { seq: 1, sent_at: 2 }.encode_as(4);
        let e = split(&hb, MAX_FRAME).unwrap_err();
        assert!(matches!(e, ClusterError::WireVersion { ours: 3, theirs: 4 }), "{e}");
    }

    #[test]
    fn oversized_frames_are_refused_on_the_header() {
        checks::oversized_refused_on_the_header(split, MAX_FRAME);
    }

    #[test]
    fn incomplete_trailing_and_empty_frames() {
        let frame = Message::Ack { origin: id(3), seq: 1 }.encode();
        checks::incomplete_trailing_and_empty(&frame, WIRE_VERSION, split, MAX_FRAME);
    }

    fn random_message(rng: &mut SeededRng) -> Message {
        let bytes = |rng: &mut SeededRng, max: u64| {
            (0..rng.below(max)).map(|_| rng.next_u64() as u8).collect::<Vec<u8>>()
        };
        let text = |rng: &mut SeededRng| String::from_utf8_lossy(&bytes(rng, 40)).into_owned();
        let uuid = |rng: &mut SeededRng| Uuid::from_u64_pair(rng.next_u64(), rng.next_u64());
        let channel = |rng: &mut SeededRng| if rng.below(2) == 0 { Channel::Control } else { Channel::Bulk };
        let sha = |rng: &mut SeededRng| hex::encode(bytes(rng, 32));
        match rng.below(15) {
            0 => Message::Hello {
                protocol_version: rng.next_u64() as u32,
                node_id: uuid(rng),
                name: text(rng),
                channel: channel(rng),
            },
            1 => Message::HelloOk {
                protocol_version: rng.next_u64() as u32,
                node_id: uuid(rng),
                name: text(rng),
            },
            2 => Message::Refused { reason: text(rng) },
            3 => Message::Heartbeat { seq: rng.next_u64(), sent_at: rng.next_u64() },
            4 => Message::HeartbeatAck { seq: rng.next_u64(), sent_at: rng.next_u64() },
            5 => Message::Changes {
                origin: uuid(rng),
                seq: rng.next_u64(),
                entries: (0..rng.below(20)).map(|_| (rng.next_u64(), bytes(rng, 300))).collect(),
            },
            6 => Message::Ack { origin: uuid(rng), seq: rng.next_u64() },
            7 => Message::NeedSnapshot { origin: uuid(rng) },
            8 => {
                Message::SnapshotAck { origin: uuid(rng), seq: rng.next_u64(), index: rng.next_u64() as u32 }
            }
            9 => Message::Resend { origin: uuid(rng), after: rng.next_u64() },
            10 => Message::ImageFetch { sha256: sha(rng), offset: rng.next_u64() },
            11 => Message::ImageData {
                sha256: sha(rng),
                offset: rng.next_u64(),
                last: rng.below(2) == 1,
                data: bytes(rng, 2000),
            },
            12 => Message::ImageAck { sha256: sha(rng), offset: rng.next_u64() },
            13 => Message::ImageUnavailable { sha256: sha(rng), reason: text(rng) },
            _ => Message::SnapshotChunk {
                origin: uuid(rng),
                seq: rng.next_u64(),
                index: rng.next_u64() as u32,
                last: rng.below(2) == 1,
                data: bytes(rng, 2000),
            },
        }
    }

    #[test]
    fn seeded_round_trips_and_mutations() {
        checks::seeded_round_trips_and_mutations(random_message, Message::encode, split, MAX_FRAME);
    }
}
