//! The change stream: every mutation of replicated state is one [`Change`].
//!
//! Applying a change is the only way state tables are written, so replaying
//! the stream on an empty store rebuilds the same state — the property the
//! peer replication (a later subsystem) relies on.

use super::wire;
use crate::types::{BootSpec, CloudInit, Disk, NetworkKind, Nic, Role, VmState};
use uuid::Uuid;

pub use wire::{CHANGE_FORMAT, CHANGE_FORMAT_V1, CHANGE_FORMAT_V2, CHANGE_FORMAT_V3};

#[derive(Debug, Clone, PartialEq)]
pub struct VmRecord {
    pub id: Uuid,
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disks: Vec<Disk>,
    pub boot: Option<BootSpec>,
    pub nics: Vec<Nic>,
    pub cloud_init: Option<CloudInit>,
    /// Per-VM graceful shutdown limit; the daemon default when `None`.
    pub shutdown_timeout_secs: Option<u64>,
    pub autostart: bool,
    pub owner_node: Uuid,
    /// Bumped whenever ownership moves; fences a stale owner after failover.
    pub epoch: u64,
    pub state: VmState,
    /// Unix milliseconds.
    pub created_at: i64,
    pub updated_at: i64,
    /// Some: the disks are raw files served by the data plane.
    pub replication: Option<crate::types::ReplicationSpec>,
    /// Start order at boot and in a takeover: higher first, then by name.
    pub autostart_priority: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub role: Role,
    /// SHA-256 of the secret; the secret itself is never stored.
    pub hash: [u8; 32],
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    pub name: String,
    /// Absolute path under the data dir's `images/`.
    pub path: String,
    pub format: String,
    pub virtual_size: u64,
    pub file_size: u64,
    pub sha256: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkRecord {
    pub name: String,
    pub kind: NetworkKind,
    /// Host bridge: created by libvirt for NAT, existing for bridge networks.
    pub bridge: String,
    /// NAT only: prefix length and addresses, dotted quads.
    pub prefix: u8,
    pub gateway: Option<String>,
    pub dhcp_start: Option<String>,
    pub dhcp_end: Option<String>,
    pub vlan: Option<u16>,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub vm_id: Uuid,
    pub name: String,
    pub description: String,
    /// Asked for with `memory`: reverting resumes the saved memory. (A
    /// snapshot of a running VM holds memory either way; see `vm_state`.)
    pub memory: bool,
    pub vm_state: VmState,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Insert or replace a VM with all its disks.
    VmPut(VmRecord),
    /// The observed state of a VM changed.
    VmState {
        id: Uuid,
        state: VmState,
        at: i64,
    },
    VmDelete {
        id: Uuid,
    },
    TokenPut(TokenRecord),
    TokenDelete {
        id: String,
    },
    ImagePut(ImageRecord),
    ImageDelete {
        name: String,
    },
    NetworkPut(NetworkRecord),
    NetworkDelete {
        name: String,
    },
    SnapshotPut(SnapshotRecord),
    SnapshotDelete {
        vm_id: Uuid,
        name: String,
    },
}

impl Change {
    /// The format version byte, then the postcard encoding of the store's
    /// own wire types (`store/wire.rs`).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![CHANGE_FORMAT];
        out.extend(wire::to_bytes(&wire::Change::from(self.clone())));
        out
    }

    /// Decodes any format: 4; 3 with the frozen `wire_v3` types; 1 and 2
    /// (rows written by earlier releases, one layout) with the frozen
    /// `wire_v2` types, through format 3's. Trailing bytes are refused: a
    /// record is exactly one change.
    pub fn decode(bytes: &[u8]) -> Result<Change, String> {
        fn whole<'a, T: serde::Deserialize<'a>>(rest: &'a [u8]) -> Result<T, String> {
            let (c, tail) = postcard::take_from_bytes::<T>(rest).map_err(|e| e.to_string())?;
            if !tail.is_empty() {
                return Err(format!("{} bytes after the change", tail.len()));
            }
            Ok(c)
        }
        match bytes.split_first() {
            Some((&CHANGE_FORMAT, rest)) => Ok(whole::<wire::Change>(rest)?.into()),
            Some((&CHANGE_FORMAT_V3, rest)) => {
                Ok(wire::Change::from(whole::<super::wire_v3::Change>(rest)?).into())
            }
            Some((&(CHANGE_FORMAT_V2 | CHANGE_FORMAT_V1), rest)) => {
                let v3 = super::wire_v3::Change::from(whole::<super::wire_v2::Change>(rest)?);
                Ok(wire::Change::from(v3).into())
            }
            Some((v, _)) => Err(format!("unsupported change format version {v}")),
            None => Err("empty change record".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_version_check() {
        let c = Change::VmState { id: Uuid::new_v4(), state: VmState::Running, at: 42 };
        let bytes = c.encode();
        assert_eq!(bytes[0], CHANGE_FORMAT);
        assert_eq!(Change::decode(&bytes).unwrap(), c);
        let mut future = bytes.clone();
        future[0] = 99;
        assert!(Change::decode(&future).unwrap_err().contains("version 99"));
    }
}
