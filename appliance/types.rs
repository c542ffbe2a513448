//! Request and response types shared by the API, the CLI and the store.
//!
//! Requests are strict (`deny_unknown_fields`): a typo in a field name is a
//! 400 that names the field, never a silently ignored setting.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Body of `POST /v1/vms`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmCreate {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    #[serde(default)]
    pub autostart: bool,
    /// Order of the starts at boot and in a takeover: higher first, ties by
    /// name. [`AUTOSTART_PRIORITIES`]; 0 when unset.
    #[serde(default)]
    pub autostart_priority: i32,
    /// NoCloud seed attached as a read-only CD-ROM labelled `cidata`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInit>,
    /// How long a graceful shutdown may take before it is forced (seconds);
    /// the daemon's `hypervisor.shutdown_timeout_secs` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_timeout_secs: Option<u64>,
    /// Disk replication to the peer. Unset: `sync` on a paired node (the
    /// daemon's `replication.default_mode`), none on a single node. Any
    /// value (`off` included) serves the disks through the data plane as
    /// raw files; unset on a single node keeps plain qcow2 files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationSpec>,
}

/// How a VM's disks are replicated to the peer.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ReplicationMode {
    /// A write completes when both nodes hold it; a flush when both made it
    /// durable (RPO 0; DRBD protocol C).
    Sync,
    /// Writes complete locally and are shipped in order; the peer lags.
    Async,
    /// Served by the data plane, not replicated.
    Off,
}

impl ReplicationMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicationMode::Sync => "sync",
            ReplicationMode::Async => "async",
            ReplicationMode::Off => "off",
        }
    }
}

/// `replication` of a VM.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReplicationSpec {
    pub mode: ReplicationMode,
    /// Async: beyond this lag the VM's protection is reported degraded, and
    /// a replica further behind is not promoted without `force`.
    #[serde(default = "default_max_lag")]
    pub max_lag_seconds: u64,
}

pub const DEFAULT_MAX_LAG_SECONDS: u64 = 10;

/// The values `autostart_priority` may take (as Incus's
/// `boot.autostart.priority`, higher starts first).
pub const AUTOSTART_PRIORITIES: std::ops::RangeInclusive<i32> = -1000..=1000;

fn default_max_lag() -> u64 {
    DEFAULT_MAX_LAG_SECONDS
}

/// cloud-init NoCloud data. `meta_data` defaults to an instance-id (the VM's
/// UUID) and the VM's name as hostname.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CloudInit {
    pub user_data: String,
    // Stored with postcard too: every field always present.
    #[serde(default)]
    pub meta_data: Option<String>,
    #[serde(default)]
    pub network_config: Option<String>,
}

/// A NIC: one virtio interface on a NovaCron network, with a MAC that stays
/// the same for the VM's life.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Nic {
    pub network: String,
    pub mac: String,
}

/// A NIC as shown, with the address its DHCP lease gave it (NAT networks).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NicView {
    pub network: String,
    pub mac: String,
    pub ip: Option<String>,
}

/// One disk of a new VM: either a blank disk of `size_gib`, or an overlay
/// on `image` (a file under the data dir's `images/`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_gib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// With `image`: a full, independent copy instead of an overlay.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub copy: bool,
}

/// Direct kernel boot. Paths must resolve inside the data dir's `boot/` or
/// `images/` folders.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BootSpec {
    pub kernel: String,
    // No skip_serializing_if: this type is also stored with postcard, which
    // needs every field present.
    #[serde(default)]
    pub initrd: Option<String>,
    #[serde(default)]
    pub cmdline: Option<String>,
}

/// Body of `PATCH /v1/vms/{id}`; only allowed while the VM is stopped.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmPatch {
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "not_null")]
    pub vcpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "not_null")]
    pub memory_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "not_null")]
    pub autostart: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "not_null")]
    pub autostart_priority: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "not_null")]
    pub shutdown_timeout_secs: Option<u64>,
}

/// A PATCH field that is present must have a value: `null` could mean
/// "reset to the default", which PATCH does not do, so it is refused instead
/// of being read as "leave it" (an omitted field, `#[serde(default)]`).
fn not_null<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// Body of `POST /v1/vms/{id}/clone`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmClone {
    pub name: String,
    /// Full copies of the disks instead of overlays on them.
    #[serde(default)]
    pub copy: bool,
}

/// Body of `POST /v1/vms/{id}/disks/{dev}/resize`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiskResize {
    pub size_gib: u64,
}

/// Body of `POST /v1/vms/{id}/snapshots`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Include the guest's memory (running VMs only): revert resumes it.
    #[serde(default)]
    pub memory: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Snapshot {
    pub name: String,
    pub description: String,
    /// The snapshot holds the guest's memory: always for a VM that was
    /// running or paused (QEMU's internal snapshots cannot leave it out).
    pub memory: bool,
    /// Reverting resumes the guest from that memory; otherwise only the
    /// disks come back and the VM is left stopped.
    pub restores_memory: bool,
    /// The VM's state when the snapshot was taken.
    pub vm_state: VmState,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotList {
    pub snapshots: Vec<Snapshot>,
}

/// A base image in the data dir's `images/`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Image {
    pub name: String,
    /// `raw` or `qcow2`, detected by `qemu-img`, never taken from the client.
    pub format: String,
    pub virtual_size: u64,
    pub file_size: u64,
    pub sha256: String,
    /// Disks layered on this image (it cannot be deleted while any exist).
    pub used_by: Vec<String>,
    pub created_at: String,
    /// This node's file: `present` (its SHA-256 matches), `copying` (from
    /// the peer) or `missing` (absent or another content; fetched from the
    /// peer while paired).
    #[serde(default)]
    pub file: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageList {
    pub images: Vec<Image>,
}

/// Body of `POST /v1/images`: import a file already on the host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImageImport {
    pub name: String,
    pub path: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NetworkKind {
    /// A private subnet behind NAT, with DHCP from libvirt's dnsmasq.
    Nat,
    /// Guests join an existing host bridge.
    Bridge,
}

/// Body of `POST /v1/networks`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkCreate {
    pub name: String,
    pub kind: NetworkKind,
    /// NAT: the subnet, `10.20.0.0/24`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    /// NAT: the host's address in it; the first usable address by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// NAT: DHCP range; the upper half of the subnet by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp_start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp_end: Option<String>,
    /// Bridge: the existing host bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// Bridge: 802.1Q tag for the guests' ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Network {
    pub name: String,
    pub kind: NetworkKind,
    pub bridge: String,
    pub subnet: Option<String>,
    pub gateway: Option<String>,
    pub dhcp_start: Option<String>,
    pub dhcp_end: Option<String>,
    pub vlan: Option<u16>,
    pub active: bool,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkList {
    pub networks: Vec<Network>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Stopped,
    Running,
    Paused,
    ShuttingDown,
    Crashed,
    Suspended,
    /// In the store but not (yet) defined in libvirt.
    Missing,
    Unknown,
}

impl VmState {
    pub const ALL: [VmState; 8] = [
        VmState::Stopped,
        VmState::Running,
        VmState::Paused,
        VmState::ShuttingDown,
        VmState::Crashed,
        VmState::Suspended,
        VmState::Missing,
        VmState::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Stopped => "stopped",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::ShuttingDown => "shutting_down",
            VmState::Crashed => "crashed",
            VmState::Suspended => "suspended",
            VmState::Missing => "missing",
            VmState::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Option<VmState> {
        VmState::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// True when QEMU is running for this VM (it holds memory and disks).
    pub fn is_active(self) -> bool {
        matches!(self, VmState::Running | VmState::Paused | VmState::ShuttingDown | VmState::Suspended)
    }
}

/// A disk as stored and shown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Disk {
    /// Device name in the guest: vda, vdb, ...
    pub device: String,
    pub path: String,
    pub size_bytes: u64,
    /// The image this disk is an overlay of, if any.
    pub image: Option<String>,
}

/// A VM as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Vm {
    pub id: Uuid,
    pub name: String,
    pub state: VmState,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disks: Vec<Disk>,
    pub boot: Option<BootSpec>,
    pub nics: Vec<NicView>,
    pub cloud_init: bool,
    pub autostart: bool,
    /// Higher starts first at boot and in a takeover; ties by name.
    pub autostart_priority: i32,
    pub shutdown_timeout_secs: u64,
    /// False for libvirt domains NovaCron did not create: shown, never touched.
    pub managed: bool,
    pub owner_node: Option<Uuid>,
    pub epoch: u64,
    /// None: plain disk files, not served by the data plane.
    pub replication: Option<VmReplication>,
    /// RFC 3339 UTC.
    pub created_at: String,
    pub updated_at: String,
}

/// A VM's disk replication as shown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmReplication {
    pub mode: ReplicationMode,
    pub max_lag_seconds: u64,
    /// `protected` (every replica up to date or, for async, within the lag
    /// limit), `degraded`, `unprotected` (mode off), `unknown` (the data
    /// plane does not answer) or `kept_replica` (a replica kept here after
    /// a forced unpair).
    pub protection: String,
    pub disks: Vec<DiskReplica>,
}

/// One disk's replica, as the data plane reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiskReplica {
    pub device: String,
    /// This node's copy: `up_to_date`, `syncing`, `outdated`, `inconsistent`.
    pub local: String,
    /// The peer's copy as this node knows it; None with mode off.
    pub peer: Option<String>,
    /// Whether the data plane holds a connection to the peer's for it.
    pub connected: bool,
    pub sync: Option<SyncProgress>,
    /// Async: bytes written here not yet acknowledged by the peer, and the
    /// age of the oldest of them.
    pub lag_bytes: u64,
    pub lag_seconds: f64,
    /// Bytes marked changed since the peer last held them (resync backlog).
    pub dirty_bytes: u64,
    /// Bytes sent by syncs (initial and delta) since the data plane started.
    pub sync_bytes_total: u64,
    pub detail: String,
}

/// Progress of an initial sync or a resync.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SyncProgress {
    /// `full` (initial sync: allocated extents) or `delta` (changed blocks).
    pub kind: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub rate_bytes_per_sec: f64,
    pub eta_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmList {
    pub vms: Vec<Vm>,
}

/// Token roles, weakest first: each role can do everything the ones before
/// it can.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// Body of `POST /v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    pub name: String,
    pub role: Role,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Token {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created_at: String,
}

/// Answer to `POST /v1/tokens`: the only time the secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenCreated {
    #[serde(flatten)]
    pub token: Token,
    pub secret: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenList {
    pub tokens: Vec<Token>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub node: Uuid,
}

/// Outcome of one health check; ordered so the worst one is the maximum.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    Ok,
    Warning,
    Critical,
}

impl CheckStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Ok => "ok",
            CheckStatus::Warning => "warning",
            CheckStatus::Critical => "critical",
        }
    }

    /// The Nagios-style exit code: 0 ok, 1 warning, 2 critical.
    pub fn exit_code(self) -> i32 {
        self as i32
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HealthCheck {
    /// `daemon`, `libvirt`, `store`, `disk`, `certificate`, `vms`, `peer`.
    pub name: String,
    pub status: CheckStatus,
    pub message: String,
}

/// Answer to `GET /v1/health/details`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HealthReport {
    /// The worst status of all checks.
    pub status: CheckStatus,
    pub node: Uuid,
    pub version: String,
    pub checks: Vec<HealthCheck>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HostInfo {
    pub node_id: Uuid,
    pub node_name: String,
    pub hostname: String,
    pub cpus: u32,
    pub memory_total_mib: u64,
    pub memory_available_mib: u64,
    pub memory_reserve_mib: u64,
    pub load: [f64; 3],
    pub kvm_usable: bool,
    pub libvirt_uri: String,
    pub libvirt_connected: bool,
    pub libvirt_version: Option<String>,
    pub qemu_version: Option<String>,
    pub domain_type: String,
    pub version: String,
    pub tls_fingerprint: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditEntry {
    pub seq: i64,
    pub at: String,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub result: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditList {
    pub entries: Vec<AuditEntry>,
}

/// The JSON error body every failed request gets.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// Names of VMs and tokens: 1-63 characters of `[A-Za-z0-9._-]`, starting
/// with a letter or digit. They end up in file names and libvirt XML, so
/// the rule is strict rather than escaped everywhere.
pub fn valid_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err("must be 1 to 63 characters long".into());
    }
    let first = name.as_bytes()[0];
    if !first.is_ascii_alphanumeric() {
        return Err("must start with a letter or digit".into());
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(format!("must not contain {c:?}; use letters, digits, '-', '_' and '.'"));
    }
    if name.contains("..") {
        return Err("must not contain '..'".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("web-1.site_a").is_ok());
        for bad in ["", "-x", ".x", "a/b", "a..b", "a\"b", "a<b", "é", &"x".repeat(64)] {
            assert!(valid_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = serde_json::from_str::<VmCreate>(r#"{"name":"a","vcpus":1,"memory_mib":64,"colour":1}"#)
            .unwrap_err();
        assert!(e.to_string().contains("colour"));
    }

    #[test]
    fn patch_refuses_null_and_keeps_omitted_fields() {
        let p: VmPatch = serde_json::from_str(r#"{"autostart":true}"#).unwrap();
        assert_eq!(p, VmPatch { autostart: Some(true), ..VmPatch::default() });
        for field in ["vcpus", "memory_mib", "autostart", "autostart_priority", "shutdown_timeout_secs"] {
            let e = serde_json::from_str::<VmPatch>(&format!(r#"{{"{field}":null}}"#)).unwrap_err();
            assert!(e.to_string().contains("null"), "{field}: {e}");
        }
    }

    #[test]
    fn roles_order() {
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
    }
}

/// Where a host update is. Persisted in the data dir (`update/status.json`)
/// so it survives the reboot it causes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UpdateState {
    /// The root installer is writing the other slot.
    Installing,
    /// The slot is written; running guests are being shut down.
    StoppingGuests,
    /// Guests are down; the host reboots into the new slot.
    Rebooting,
    /// The new slot booted and the daemon came up there.
    Succeeded,
    /// The new slot did not come up; systemd-boot went back to the old one.
    RolledBack,
    /// Nothing was changed on the boot disk that would be booted.
    Failed,
}

impl UpdateState {
    pub fn in_progress(self) -> bool {
        matches!(self, UpdateState::Installing | UpdateState::StoppingGuests | UpdateState::Rebooting)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpdateRecord {
    /// On-disk format of this record.
    pub format: u32,
    pub state: UpdateState,
    pub version: String,
    pub from_slot: String,
    pub from_version: Option<String>,
    pub target_slot: String,
    pub tries: u32,
    pub message: Option<String>,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    /// Kernel boot id when the reboot was asked for: a different one later
    /// means the reboot happened.
    pub boot_id: Option<String>,
    /// Guests that were running and are started again after the reboot.
    pub resume_vms: Vec<Uuid>,
}

/// `GET /v1/host/update`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpdateView {
    /// Booted from an appliance image with A/B root slots.
    pub appliance: bool,
    /// Why not, when `appliance` is false.
    pub reason: Option<String>,
    pub booted_slot: Option<String>,
    pub booted_version: Option<String>,
    /// The latest update, if any.
    pub update: Option<UpdateRecord>,
}

/// `POST /v1/peer/invite` (`novacron peer invite`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerInvite {
    /// How long the code is valid, seconds (default 600, at most 86400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_secs: Option<u64>,
}

/// A one-time join code, shown once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerInvitation {
    pub code: String,
    pub expires_at: String,
    /// What the code tells the joiner to connect to (`IP:port`).
    pub addresses: Vec<String>,
    /// This node's certificate, which the joiner pins.
    pub fingerprint: String,
}

/// `POST /v1/peer/join` (`novacron peer join CODE`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerJoin {
    pub code: String,
}

/// The paired node as this one pins it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerNode {
    pub node_id: Uuid,
    pub name: String,
    pub addresses: Vec<String>,
    pub api_port: u16,
    pub link_port: u16,
    pub fingerprint: String,
    pub paired_at: String,
}

/// A node as the other one pins it: what pairing exchanges (in the
/// handshake) and what the peer row stores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeInfo {
    pub node_id: Uuid,
    pub name: String,
    /// Addresses the other node reaches it at, first preferred.
    pub addresses: Vec<std::net::IpAddr>,
    pub api_port: u16,
    pub link_port: u16,
    /// SHA-256 of its API certificate, `AB:CD:...`.
    pub fingerprint: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerLink {
    /// `up` or `down`.
    pub state: String,
    /// What the link is doing (connecting, waiting for the peer) and why it
    /// is down.
    pub detail: String,
    /// The peer address the link runs over: the one this node dialed, or on
    /// the accepting node where the peer's connection came from. None while
    /// down.
    pub address: Option<String>,
    /// When a heartbeat (or its answer) last came from the peer.
    pub last_heartbeat: Option<String>,
    /// Smoothed heartbeat round-trip time; None while down.
    pub rtt_ms: Option<f64>,
    /// The bulk connection beside the link (image files, later disk
    /// data): `up` or `down`.
    pub bulk: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerReplication {
    /// Changes made here that the peer has not acknowledged; unknown while
    /// the link is down.
    pub lag_records: Option<u64>,
    pub lag_seconds: Option<f64>,
}

/// A replicated disk's state (disk replication comes with issue 10).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicatedDisk {
    pub vm: String,
    pub device: String,
    pub state: String,
}

/// `GET /v1/peer` (`novacron peer status`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerView {
    pub paired: bool,
    /// `not_paired`, `joining` (a join waits for the inviter's answer) or `paired`.
    pub state: String,
    pub peer: Option<PeerNode>,
    pub link: Option<PeerLink>,
    pub replication: Option<PeerReplication>,
    pub disks: Vec<ReplicatedDisk>,
    /// How a failure of the peer is handled: plainly, that automatic
    /// failover is not configured and what the operator does instead.
    pub failover: String,
}

/// `POST /v1/peer/takeover`: this node takes over the paired node's VMs
/// after the operator confirmed that node is off.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerTakeover {
    /// Must be true: the operator confirms the peer is off (no automatic
    /// failover, no witness yet: nothing else can tell).
    pub force: bool,
    /// VMs (names or ids) whose replicas are promoted although they are
    /// not up to date (outdated, or a broken resync rolled back).
    #[serde(default)]
    pub include: Vec<String>,
}

/// The answer to a takeover: one entry per VM of the peer's, in start
/// order (`autostart_priority` descending, then name).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TakeoverReport {
    pub vms: Vec<TakenOver>,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TakenOver {
    pub id: Uuid,
    pub name: String,
    /// `started`, `taken_over` (owned here now, not started: not autostart,
    /// or its start failed) or `left` (still the peer's).
    pub result: String,
    /// The replica's state before the takeover, worst disk first.
    pub replica: String,
    pub epoch: u64,
    pub autostart_priority: i32,
    pub detail: String,
}

/// `POST /v1/vms/{id}/move`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmMoved {
    pub id: Uuid,
    pub name: String,
    pub from: Uuid,
    pub to: Uuid,
    pub epoch: u64,
    /// Whether it was running here (then it runs on the peer now).
    pub started: bool,
    /// Graceful shutdown here (then forced after its limit).
    pub shutdown_ms: u64,
    /// From the guest stopped here to the peer's start returned.
    pub downtime_ms: Option<u64>,
    pub message: String,
}

/// `DELETE /v1/peer`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerUnpaired {
    pub peer: PeerNode,
    /// False when the peer did not take the request (unpaired with force):
    /// it still lists this node until it is unpaired there too.
    pub peer_notified: bool,
    pub message: String,
}

/// A fixed-bucket histogram as the data plane counts it: `counts[i]`
/// writes took at most `bounds[i]` seconds (and more than the bound
/// before); `count - sum(counts)` took longer than the last bound. The
/// bounds travel with the counts, so a reader never assumes another build's.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WaitHistogram {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub count: u64,
    pub sum_seconds: f64,
}
