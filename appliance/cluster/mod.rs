//! The pair: the peer link (frames, the link state machine, the TLS
//! transport), and on top of it pairing, state replication and the image
//! copy.
//!
//! Protocol logic is sans-IO (`link.rs`, `replication.rs`, `imagecopy.rs`,
//! `pairing.rs`: inputs and the time in, outputs out); the tokio drivers
//! around them (`transport.rs`, `drivers/`) only move bytes and timers and
//! reach the node through the narrow `drivers::NodeCore` interface. See
//! docs/design/peer-link.md.

pub mod disk_frame;
pub mod disk_repl;
pub mod drivers;
pub mod frame;
pub mod imagecopy;
pub mod link;
pub mod pairing;
pub mod replication;
pub mod transport;

// The peer link's default port lives with the other defaults.
pub use crate::config::DEFAULT_LINK_PORT;
/// A replica's consistency state (disk frames, the data plane, the API).
pub use disk_frame::ReplicaState;

use std::net::SocketAddr;
use uuid::Uuid;

/// Whom the link talks to: what pairing persisted about the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTarget {
    pub node_id: Uuid,
    /// Tried in order; the second and later are redundant paths (a second
    /// NIC, a crossover cable) used when the first fails.
    pub addresses: Vec<SocketAddr>,
    /// SHA-256 of the peer's certificate, `AB:CD:...`: the only certificate
    /// the link accepts, as server and as client.
    pub fingerprint: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A frame header announced more than the limit; nothing was read.
    #[error("frame of {len} bytes is over the limit of {limit}")]
    FrameTooLarge { len: usize, limit: usize },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("frame of wire version {theirs}; this node speaks {ours}")]
    WireVersion { ours: u8, theirs: u8 },
    #[error("the peer link is down")]
    LinkDown,
    #[error("TLS: {0}")]
    Tls(String),
    /// A batch of the peer's changes does not follow what is applied here.
    #[error("{0}")]
    Gap(String),
    /// This node failed at something the cluster asked of it (its store).
    #[error("{0}")]
    Local(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A small seeded generator (SplitMix64) for backoff jitter and seeded
/// tests: reproducible from its seed, not for secrets.
#[derive(Debug, Clone)]
pub struct SeededRng(u64);

impl SeededRng {
    pub fn new(seed: u64) -> SeededRng {
        SeededRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0); the modulo bias is negligible
    /// for the small ranges used here.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}
