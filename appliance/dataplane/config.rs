//! The data plane's configuration file (written by the API daemon, read at
//! start and on `reload`) and the control socket's wire types. JSON, strict,
//! versioned: a file of another version is refused, never half-understood.

use super::DataplaneError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// The one config version this build reads and writes.
pub const CONFIG_VERSION: u32 = 1;
/// Version of the control socket's JSON answers (2: `ReplicaView.write_wait`).
pub const STATUS_VERSION: u32 = 2;
/// Virtqueues per disk accepted in `queues`.
pub const MAX_QUEUES: u16 = 16;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DataplaneConfig {
    pub version: u32,
    pub node_id: Uuid,
    /// Where the vhost-user sockets of primary disks are created.
    pub socket_dir: PathBuf,
    /// The control socket (`reload`, `status`): root only (0600), or
    /// root and `control_group` (0660).
    pub control_socket: PathBuf,
    /// Group that may use the control socket: the API daemon's (`novacron`),
    /// which does not run as root.
    #[serde(default)]
    pub control_group: Option<String>,
    /// User QEMU runs as (libvirt-qemu); sockets are chowned to it, mode 0600.
    #[serde(default)]
    pub socket_owner: Option<String>,
    /// Where the peer's data plane connects (the peer-link addresses, port
    /// + 1); empty: replicas are not accepted.
    #[serde(default)]
    pub listen: Vec<std::net::SocketAddr>,
    /// This node's certificate and key (PEM): its identity to the peer.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// The paired node; None: nothing is replicated.
    #[serde(default)]
    pub peer: Option<PeerEndpoint>,
    /// Syncs to the peer at most this fast (bytes/s, all disks); 0: unpaced.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sync_rate_bytes_per_sec: u64,
    pub disks: Vec<DiskExport>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerEndpoint {
    pub node_id: Uuid,
    /// Its data plane's addresses, first preferred.
    pub addresses: Vec<std::net::SocketAddr>,
    /// SHA-256 of its certificate (the one pairing pinned).
    pub fingerprint: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiskExport {
    pub vm: Uuid,
    /// Guest device name (vda); part of the socket name and the serial.
    pub device: String,
    /// Raw image file.
    pub path: PathBuf,
    pub role: DiskRole,
    pub epoch: u64,
    pub replication: ReplicationMode,
    pub max_lag_seconds: u64,
    /// The disk's size: a secondary creates its replica file with it and
    /// refuses a primary that claims another.
    #[serde(default)]
    pub size_bytes: u64,
    /// Virtqueues offered to the guest (it uses at most one per vCPU).
    #[serde(default = "one_queue")]
    pub queues: u16,
    /// A primary whose files are still a replica here is promoted even
    /// when not up to date (an operator's forced takeover named it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force_promote: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn one_queue() -> u16 {
    1
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DiskRole {
    Primary,
    Secondary,
}

/// The API's own type: the config says what the VM record says.
pub use crate::types::ReplicationMode;

impl DiskExport {
    /// The vhost-user socket of this disk when it is primary:
    /// `socket_dir/<vm>-<device>.sock`.
    pub fn socket_path(&self, socket_dir: &Path) -> PathBuf {
        socket_dir.join(format!("{}-{}.sock", self.vm, self.device))
    }

    /// The disk's serial (virtio-blk GET_ID, at most 20 bytes): device and
    /// the first 8 hex digits of the VM id, e.g. `vda-1b4e28ba`.
    pub fn serial(&self) -> String {
        let vm = self.vm.simple().to_string();
        let mut s = format!("{}-{}", self.device, &vm[..8]);
        s.truncate(20);
        s
    }

    /// "vm/device", how logs and errors name the disk.
    pub fn name(&self) -> String {
        format!("{}/{}", self.vm, self.device)
    }
}

impl DataplaneConfig {
    /// Reads and validates the file.
    pub fn load(path: &Path) -> Result<Self, DataplaneError> {
        let text = std::fs::read(path).map_err(|e| DataplaneError::ReadConfig(path.to_path_buf(), e))?;
        Self::parse(&text).map_err(|e| match e {
            DataplaneError::InvalidConfig(why) => {
                DataplaneError::InvalidConfig(format!("{}: {why}", path.display()))
            }
            other => other,
        })
    }

    /// Parses and validates a config document.
    pub fn parse(text: &[u8]) -> Result<Self, DataplaneError> {
        // The version first, so a newer file says so instead of failing on
        // whatever field it added.
        #[derive(Deserialize)]
        struct Version {
            version: Option<u32>,
        }
        let v: Version =
            serde_json::from_slice(text).map_err(|e| DataplaneError::InvalidConfig(e.to_string()))?;
        match v.version {
            Some(CONFIG_VERSION) => {}
            Some(other) => return Err(DataplaneError::ConfigVersion(other)),
            None => return Err(DataplaneError::InvalidConfig("no version".into())),
        }
        let cfg: DataplaneConfig =
            serde_json::from_slice(text).map_err(|e| DataplaneError::InvalidConfig(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), DataplaneError> {
        let bad = |why: String| Err(DataplaneError::InvalidConfig(why));
        for (what, p) in [("socket_dir", &self.socket_dir), ("control_socket", &self.control_socket)] {
            if !p.is_absolute() {
                return bad(format!("{what} {} is not an absolute path", p.display()));
            }
        }
        let mut seen = BTreeSet::new();
        for d in &self.disks {
            // The device name becomes part of a file name.
            let valid_device = !d.device.is_empty()
                && d.device.len() <= 16
                && d.device.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid_device {
                return bad(format!(
                    "disk {}: device {:?} is not a short [A-Za-z0-9_-] name",
                    d.vm, d.device
                ));
            }
            if !d.path.is_absolute() {
                return bad(format!("disk {}: path {} is not absolute", d.name(), d.path.display()));
            }
            if d.queues == 0 || d.queues > MAX_QUEUES {
                return bad(format!("disk {}: queues {} is not in 1..={MAX_QUEUES}", d.name(), d.queues));
            }
            if !seen.insert((d.vm, d.device.as_str())) {
                return bad(format!("disk {} is listed twice", d.name()));
            }
        }
        Ok(())
    }

    /// Writes the file so that a reader sees the old or the new version,
    /// never a torn one, also across a power loss: temporary file, fsync,
    /// rename, fsync of the folder. Mode 0600.
    pub fn write_atomic(&self, path: &Path) -> Result<(), DataplaneError> {
        use std::os::unix::fs::OpenOptionsExt;
        let err = |e: std::io::Error| DataplaneError::WriteConfig(path.to_path_buf(), e);
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let name = path.file_name().ok_or_else(|| err(std::io::ErrorKind::InvalidInput.into()))?;
        let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
        let mut text = serde_json::to_vec_pretty(self).expect("config serializes");
        text.push(b'\n');
        let written = (|| {
            let mut f =
                std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            std::fs::File::open(dir)?.sync_all()
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.map_err(err)
    }
}

/// A request on the control socket, one JSON object per line:
/// `{"op":"reload"}` or `{"op":"status"}`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ControlRequest {
    pub op: ControlOp,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ControlOp {
    /// Re-read the config file; start, stop or restart exports whose entry
    /// was added, removed or changed. Unchanged exports are not touched.
    Reload,
    Status,
}

impl ControlRequest {
    pub const RELOAD: ControlRequest = ControlRequest { op: ControlOp::Reload };
    pub const STATUS: ControlRequest = ControlRequest { op: ControlOp::Status };
}

/// `{"ok":true, ...}` answer to `status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataplaneStatus {
    pub version: u32,
    pub node_id: Uuid,
    pub pid: u32,
    pub disks: Vec<DiskStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiskStatus {
    pub vm: Uuid,
    pub device: String,
    pub path: PathBuf,
    pub role: DiskRole,
    /// 0 while the file could not be opened.
    pub size_bytes: u64,
    /// The vhost-user socket; `None` when the disk is not served here.
    pub socket: Option<PathBuf>,
    /// A QEMU is connected right now.
    pub connected: bool,
    /// vhost-user connections accepted since the export started.
    pub connections: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    /// Requests answered with VIRTIO_BLK_S_IOERR or UNSUPP.
    pub errors: u64,
    /// Requests completed on each virtqueue.
    pub per_queue: Vec<u64>,
    /// Why the export is not serving, or the last failed request.
    pub last_error: Option<String>,
    /// Replication of this disk; None: not replicated.
    #[serde(default)]
    pub replica: Option<ReplicaView>,
}

/// A replicated disk's state as the data plane knows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReplicaView {
    /// This node's copy.
    pub local: crate::cluster::ReplicaState,
    /// The peer's copy as this (primary) node knows it.
    pub peer: Option<crate::cluster::ReplicaState>,
    pub connected: bool,
    /// Blocks the peer lacks (resync backlog).
    pub pending_bytes: u64,
    /// Shipped, not yet durable on the peer, and the oldest's age.
    pub lag_bytes: u64,
    pub lag_seconds: f64,
    pub sync: Option<SyncView>,
    /// Bytes sent by syncs since the data plane started (primary).
    pub sync_bytes: u64,
    pub detail: String,
    /// What waiting for the peer added to guest writes (primary, sync
    /// mode): from the local write's completion to the peer's answer.
    #[serde(default)]
    pub write_wait: Option<WaitHistogram>,
}

impl ReplicaView {
    /// A replica's view, not connected: only its own copy's state; the
    /// rest is the primary's to report.
    pub fn secondary(local: crate::cluster::ReplicaState) -> ReplicaView {
        ReplicaView {
            local,
            peer: None,
            connected: false,
            pending_bytes: 0,
            lag_bytes: 0,
            lag_seconds: 0.0,
            sync: None,
            sync_bytes: 0,
            detail: String::new(),
            write_wait: None,
        }
    }
}

/// The histogram type is the API's own (types.rs): telemetry reads it too.
pub use crate::types::WaitHistogram;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SyncView {
    pub full: bool,
    pub done: u64,
    pub total: u64,
    pub rate_bytes_per_sec: f64,
    pub eta_seconds: Option<f64>,
}

/// `{"ok":true, ...}` answer to `reload`: disk names ("vm/device").
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReloadSummary {
    /// New entries.
    pub started: Vec<String>,
    /// Entries gone from the file: export stopped, socket removed.
    pub stopped: Vec<String>,
    /// Changed entries (the guest reconnects, ~1 s), and unchanged ones
    /// that had failed to start (tried again).
    pub restarted: Vec<String>,
    /// Left alone: the guest does not notice the reload.
    pub unchanged: Vec<String>,
}

/// `{"error": {...}}` answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ControlError {
    pub code: String,
    pub message: String,
}

/// Any answer on the control socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ControlResponse {
    Status { ok: bool, status: DataplaneStatus },
    Reload { ok: bool, reload: ReloadSummary },
    Error { error: ControlError },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> serde_json::Value {
        serde_json::json!({
            "version": 1,
            "node_id": "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
            "socket_dir": "/run/novacron/vhost",
            "control_socket": "/run/novacron/dataplane.sock",
            "control_group": "novacron",
            "socket_owner": "libvirt-qemu",
            "disks": [{
                "vm": "6ba7b810-9dad-11d1-80b4-00c04fd430c8", "device": "vda",
                "path": "/var/lib/novacron/disks/a.raw", "role": "primary", "epoch": 3,
                "replication": "off", "max_lag_seconds": 0
            }]
        })
    }

    fn parse(v: &serde_json::Value) -> Result<DataplaneConfig, DataplaneError> {
        DataplaneConfig::parse(v.to_string().as_bytes())
    }

    #[test]
    fn parses_the_documented_shape() {
        let c = parse(&sample()).unwrap();
        assert_eq!(c.disks[0].role, DiskRole::Primary);
        assert_eq!(c.disks[0].replication, ReplicationMode::Off);
        assert_eq!(c.disks[0].queues, 1);
        assert_eq!(
            c.disks[0].socket_path(&c.socket_dir),
            Path::new("/run/novacron/vhost/6ba7b810-9dad-11d1-80b4-00c04fd430c8-vda.sock")
        );
        assert_eq!(c.disks[0].serial(), "vda-6ba7b810");
    }

    #[test]
    fn unknown_fields_are_refused_at_every_level() {
        let mut v = sample();
        v["witness"] = serde_json::json!(null);
        assert!(matches!(parse(&v), Err(DataplaneError::InvalidConfig(m)) if m.contains("witness")));
        let mut v = sample();
        v["peer"] =
            serde_json::json!({"node_id": Uuid::nil(), "addresses": [], "fingerprint": "AB", "port": 1});
        assert!(matches!(parse(&v), Err(DataplaneError::InvalidConfig(m)) if m.contains("port")));
        let mut v = sample();
        v["disks"][0]["cache"] = "none".into();
        assert!(matches!(parse(&v), Err(DataplaneError::InvalidConfig(m)) if m.contains("cache")));
        let mut v = sample();
        v["disks"][0]["role"] = "Primary".into();
        assert!(parse(&v).is_err());
    }

    #[test]
    fn other_versions_are_refused_by_name() {
        let mut v = sample();
        v["version"] = 2.into();
        // A v2 file may have fields v1 does not know: the version is the error.
        v["peer"] = serde_json::json!({"addr": "x"});
        let e = parse(&v).unwrap_err();
        assert!(matches!(e, DataplaneError::ConfigVersion(2)), "{e}");
        assert!(e.to_string().contains("version 2"), "{e}");
        let mut v = sample();
        v.as_object_mut().unwrap().remove("version");
        assert!(parse(&v).is_err());
    }

    #[test]
    fn invalid_disks_are_refused() {
        for (field, value) in [
            ("device", serde_json::json!("../x")),
            ("device", serde_json::json!("")),
            ("path", serde_json::json!("rel.raw")),
            ("queues", serde_json::json!(0)),
            ("queues", serde_json::json!(17)),
        ] {
            let mut v = sample();
            v["disks"][0][field] = value.clone();
            assert!(parse(&v).is_err(), "{field} = {value} accepted");
        }
        let mut v = sample();
        let d = v["disks"][0].clone();
        v["disks"].as_array_mut().unwrap().push(d);
        assert!(matches!(parse(&v), Err(DataplaneError::InvalidConfig(m)) if m.contains("twice")));
    }

    #[test]
    fn write_atomic_round_trips_and_leaves_no_temporary() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("nc-dpcfg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dataplane.json");
        let mut c = parse(&sample()).unwrap();
        c.write_atomic(&path).unwrap();
        c.disks.clear();
        c.write_atomic(&path).unwrap();
        assert_eq!(DataplaneConfig::load(&path).unwrap(), c);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("dataplane.json")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn control_wire_round_trips() {
        assert_eq!(
            serde_json::from_str::<ControlRequest>(r#"{"op":"reload"}"#).unwrap(),
            ControlRequest::RELOAD
        );
        assert_eq!(serde_json::to_string(&ControlRequest::STATUS).unwrap(), r#"{"op":"status"}"#);
        assert!(serde_json::from_str::<ControlRequest>(r#"{"op":"status","x":1}"#).is_err());
        assert!(serde_json::from_str::<ControlRequest>(r#"{"op":"stop"}"#).is_err());
        let e = ControlResponse::Error {
            error: ControlError { code: "bad_request".into(), message: "m".into() },
        };
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(text, r#"{"error":{"code":"bad_request","message":"m"}}"#);
        assert_eq!(serde_json::from_str::<ControlResponse>(&text).unwrap(), e);
    }
}
