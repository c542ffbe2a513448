//! The frozen decoder of change formats 1 and 2 (before `Vm.replication`).
//!
//! These are exact copies of the wire types as they were in format 2:
//! never edit them. Rows of formats 1 and 2 on disk (and a peer's records
//! sent in them) decode with these types and are converted to format 3's
//! (`wire_v3`), and from those to the current ones; VMs of those
//! formats were not replicated (`replication: None`).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

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

impl From<Change> for super::wire_v3::Change {
    fn from(c: Change) -> super::wire_v3::Change {
        use super::wire_v3 as w;
        let vm_state = |s: VmState| match s {
            VmState::Stopped => w::VmState::Stopped,
            VmState::Running => w::VmState::Running,
            VmState::Paused => w::VmState::Paused,
            VmState::ShuttingDown => w::VmState::ShuttingDown,
            VmState::Crashed => w::VmState::Crashed,
            VmState::Suspended => w::VmState::Suspended,
            VmState::Missing => w::VmState::Missing,
            VmState::Unknown => w::VmState::Unknown,
        };
        match c {
            Change::VmPut(v) => w::Change::VmPut(w::Vm {
                id: v.id,
                name: v.name,
                vcpus: v.vcpus,
                memory_mib: v.memory_mib,
                disks: v
                    .disks
                    .into_iter()
                    .map(|d| w::Disk {
                        device: d.device,
                        path: d.path,
                        size_bytes: d.size_bytes,
                        image: d.image,
                    })
                    .collect(),
                boot: v.boot.map(|b| w::Boot { kernel: b.kernel, initrd: b.initrd, cmdline: b.cmdline }),
                nics: v.nics.into_iter().map(|n| w::Nic { network: n.network, mac: n.mac }).collect(),
                cloud_init: v.cloud_init.map(|c| w::CloudInit {
                    user_data: c.user_data,
                    meta_data: c.meta_data,
                    network_config: c.network_config,
                }),
                shutdown_timeout_secs: v.shutdown_timeout_secs,
                autostart: v.autostart,
                owner_node: v.owner_node,
                epoch: v.epoch,
                state: vm_state(v.state),
                created_at: v.created_at,
                updated_at: v.updated_at,
                replication: None,
            }),
            Change::VmState { id, state, at } => w::Change::VmState { id, state: vm_state(state), at },
            Change::VmDelete { id } => w::Change::VmDelete { id },
            Change::TokenPut(t) => w::Change::TokenPut(w::Token {
                id: t.id,
                name: t.name,
                role: match t.role {
                    Role::Viewer => w::Role::Viewer,
                    Role::Operator => w::Role::Operator,
                    Role::Admin => w::Role::Admin,
                },
                hash: t.hash,
                created_at: t.created_at,
            }),
            Change::TokenDelete { id } => w::Change::TokenDelete { id },
            Change::ImagePut(i) => w::Change::ImagePut(w::Image {
                name: i.name,
                path: i.path,
                format: i.format,
                virtual_size: i.virtual_size,
                file_size: i.file_size,
                sha256: i.sha256,
                created_at: i.created_at,
            }),
            Change::ImageDelete { name } => w::Change::ImageDelete { name },
            Change::NetworkPut(n) => w::Change::NetworkPut(w::Network {
                name: n.name,
                kind: match n.kind {
                    NetworkKind::Nat => w::NetworkKind::Nat,
                    NetworkKind::Bridge => w::NetworkKind::Bridge,
                },
                bridge: n.bridge,
                prefix: n.prefix,
                gateway: n.gateway,
                dhcp_start: n.dhcp_start,
                dhcp_end: n.dhcp_end,
                vlan: n.vlan,
                created_at: n.created_at,
            }),
            Change::NetworkDelete { name } => w::Change::NetworkDelete { name },
            Change::SnapshotPut(s) => w::Change::SnapshotPut(w::Snapshot {
                vm_id: s.vm_id,
                name: s.name,
                description: s.description,
                memory: s.memory,
                vm_state: vm_state(s.vm_state),
                created_at: s.created_at,
            }),
            Change::SnapshotDelete { vm_id, name } => w::Change::SnapshotDelete { vm_id, name },
        }
    }
}
