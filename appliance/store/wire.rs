//! The encoding of a [`Change`](super::Change) on disk and on the peer link.
//!
//! postcard writes fields in declaration order and enum variants by index,
//! with no names. So the encoded form must not depend on the API's types
//! (`crate::types`), which are edited for API reasons: these are the
//! store's own copies, converted with `From`. Changing anything here
//! (a field, its type, the order, a variant) changes the bytes: the golden
//! tests in `store/golden.rs` fail, and the change needs a new
//! [`CHANGE_FORMAT`] plus a frozen copy of these types to decode the old one.
//!
//! Formats 1 (the first release) and 2 decode with the frozen copies in
//! `wire_v2.rs`, format 3 with those in `wire_v3.rs`. Whoever defines
//! format 5 freezes this module's types as the decoder of format 4 first.

use crate::types;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Format version of an encoded change: its first byte. 3: `Vm.replication`.
/// 4: `Vm.autostart_priority`.
pub const CHANGE_FORMAT: u8 = 4;
/// Decoded with `wire_v3`.
pub const CHANGE_FORMAT_V3: u8 = 3;
/// Decoded with `wire_v2`.
pub const CHANGE_FORMAT_V2: u8 = 2;
/// The first release's format, still decoded (rows already on disk).
pub const CHANGE_FORMAT_V1: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub device: String,
    pub path: String,
    pub size_bytes: u64,
    pub image: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Boot {
    pub kernel: String,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    pub network: String,
    pub mac: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudInit {
    pub user_data: String,
    pub meta_data: Option<String>,
    pub network_config: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Stopped,
    Running,
    Paused,
    ShuttingDown,
    Crashed,
    Suspended,
    Missing,
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetworkKind {
    Nat,
    Bridge,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub id: Uuid,
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disks: Vec<Disk>,
    pub boot: Option<Boot>,
    pub nics: Vec<Nic>,
    pub cloud_init: Option<CloudInit>,
    pub shutdown_timeout_secs: Option<u64>,
    pub autostart: bool,
    pub owner_node: Uuid,
    pub epoch: u64,
    pub state: VmState,
    pub created_at: i64,
    pub updated_at: i64,
    pub replication: Option<Replication>,
    pub autostart_priority: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicationMode {
    Sync,
    Async,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replication {
    pub mode: ReplicationMode,
    pub max_lag_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub hash: [u8; 32],
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub name: String,
    pub path: String,
    pub format: String,
    pub virtual_size: u64,
    pub file_size: u64,
    pub sha256: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub name: String,
    pub kind: NetworkKind,
    pub bridge: String,
    pub prefix: u8,
    pub gateway: Option<String>,
    pub dhcp_start: Option<String>,
    pub dhcp_end: Option<String>,
    pub vlan: Option<u16>,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub vm_id: Uuid,
    pub name: String,
    pub description: String,
    pub memory: bool,
    pub vm_state: VmState,
    pub created_at: i64,
}

/// Variant order is the encoding: append only in a new format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    VmPut(Vm),
    VmState { id: Uuid, state: VmState, at: i64 },
    VmDelete { id: Uuid },
    TokenPut(Token),
    TokenDelete { id: String },
    ImagePut(Image),
    ImageDelete { name: String },
    NetworkPut(Network),
    NetworkDelete { name: String },
    SnapshotPut(Snapshot),
    SnapshotDelete { vm_id: Uuid, name: String },
}

/// Encodes a wire value (cannot fail for these plain types).
pub(crate) fn to_bytes<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("postcard encoding of a store wire type")
}

/// Same-named fields, converted one by one, both directions.
macro_rules! both_ways {
    ($api:ty, $wire:ty { $($f:ident),* } $(each { $($e:ident),* } opt { $($o:ident),* })?) => {
        impl From<$api> for $wire {
            fn from(v: $api) -> $wire {
                Self { $($f: v.$f.into(),)* $($($e: v.$e.into_iter().map(Into::into).collect(),)* $($o: v.$o.map(Into::into),)*)? }
            }
        }
        impl From<$wire> for $api {
            fn from(v: $wire) -> $api {
                Self { $($f: v.$f.into(),)* $($($e: v.$e.into_iter().map(Into::into).collect(),)* $($o: v.$o.map(Into::into),)*)? }
            }
        }
    };
}

macro_rules! enum_both_ways {
    ($api:ty, $wire:ty { $($v:ident),* }) => {
        impl From<$api> for $wire {
            fn from(v: $api) -> $wire {
                match v { $(<$api>::$v => <$wire>::$v),* }
            }
        }
        impl From<$wire> for $api {
            fn from(v: $wire) -> $api {
                match v { $(<$wire>::$v => <$api>::$v),* }
            }
        }
    };
}

enum_both_ways!(types::Role, Role { Viewer, Operator, Admin });
enum_both_ways!(types::NetworkKind, NetworkKind { Nat, Bridge });
enum_both_ways!(
    types::VmState,
    VmState { Stopped, Running, Paused, ShuttingDown, Crashed, Suspended, Missing, Unknown }
);
both_ways!(types::Disk, Disk { device, path, size_bytes, image });
both_ways!(types::BootSpec, Boot { kernel, initrd, cmdline });
both_ways!(types::Nic, Nic { network, mac });
both_ways!(types::CloudInit, CloudInit { user_data, meta_data, network_config });
enum_both_ways!(types::ReplicationMode, ReplicationMode { Sync, Async, Off });
both_ways!(types::ReplicationSpec, Replication { mode, max_lag_seconds });

// `each`: Vecs and `opt`: Options, converted element by element.
both_ways!(
    super::VmRecord,
    Vm {
        id, name, vcpus, memory_mib, shutdown_timeout_secs, autostart, owner_node, epoch, state, created_at,
        updated_at, autostart_priority
    } each { disks, nics } opt { boot, cloud_init, replication }
);
both_ways!(super::TokenRecord, Token { id, name, role, hash, created_at });
both_ways!(super::ImageRecord, Image { name, path, format, virtual_size, file_size, sha256, created_at });
both_ways!(
    super::NetworkRecord,
    Network { name, kind, bridge, prefix, gateway, dhcp_start, dhcp_end, vlan, created_at }
);
both_ways!(super::SnapshotRecord, Snapshot { vm_id, name, description, memory, vm_state, created_at });

impl From<super::Change> for Change {
    fn from(c: super::Change) -> Change {
        use super::Change as D;
        match c {
            D::VmPut(v) => Change::VmPut(v.into()),
            D::VmState { id, state, at } => Change::VmState { id, state: state.into(), at },
            D::VmDelete { id } => Change::VmDelete { id },
            D::TokenPut(t) => Change::TokenPut(t.into()),
            D::TokenDelete { id } => Change::TokenDelete { id },
            D::ImagePut(i) => Change::ImagePut(i.into()),
            D::ImageDelete { name } => Change::ImageDelete { name },
            D::NetworkPut(n) => Change::NetworkPut(n.into()),
            D::NetworkDelete { name } => Change::NetworkDelete { name },
            D::SnapshotPut(s) => Change::SnapshotPut(s.into()),
            D::SnapshotDelete { vm_id, name } => Change::SnapshotDelete { vm_id, name },
        }
    }
}

impl From<Change> for super::Change {
    fn from(c: Change) -> super::Change {
        use super::Change as D;
        match c {
            Change::VmPut(v) => D::VmPut(v.into()),
            Change::VmState { id, state, at } => D::VmState { id, state: state.into(), at },
            Change::VmDelete { id } => D::VmDelete { id },
            Change::TokenPut(t) => D::TokenPut(t.into()),
            Change::TokenDelete { id } => D::TokenDelete { id },
            Change::ImagePut(i) => D::ImagePut(i.into()),
            Change::ImageDelete { name } => D::ImageDelete { name },
            Change::NetworkPut(n) => D::NetworkPut(n.into()),
            Change::NetworkDelete { name } => D::NetworkDelete { name },
            Change::SnapshotPut(s) => D::SnapshotPut(s.into()),
            Change::SnapshotDelete { vm_id, name } => D::SnapshotDelete { vm_id, name },
        }
    }
}
