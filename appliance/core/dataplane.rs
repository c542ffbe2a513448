//! The data plane as the core sees it. VMs with `replication` set have raw
//! disks that the data plane process serves to QEMU over vhost-user; this
//! side decides which disks it serves (its config file, rebuilt from the
//! store), starts it where no systemd does, and shows what it reports.
//!
//! The data plane is a process of its own so that guest I/O outlives the
//! API daemon: a restart, an update or a crash of this daemon never touches
//! a guest's disk.

use super::{Core, CoreError, Result};
use crate::cluster::ReplicaState;
use crate::dataplane::config::{
    ControlRequest, ControlResponse, DataplaneConfig, DiskExport, DiskRole, DiskStatus, PeerEndpoint,
    TlsFiles, CONFIG_VERSION,
};
use crate::hypervisor::xml::DiskSource;
use crate::store::VmRecord;
use crate::types::Disk;
use crate::types::{DiskReplica, ReplicationMode, ReplicationSpec, SyncProgress, VmReplication};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use uuid::Uuid;

/// How long the core waits for an answer on the control socket.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the keeper checks the data plane and refreshes its status.
const WATCH_PERIOD: Duration = Duration::from_secs(2);
/// How long a spawned data plane may take to answer.
const SPAWN_TIMEOUT: Duration = Duration::from_secs(10);

/// The data plane's files, from the daemon's config.
#[derive(Debug, Clone)]
pub struct DataplanePaths {
    pub config: PathBuf,
    pub control: PathBuf,
    pub sockets: PathBuf,
    pub log: PathBuf,
}

impl DataplanePaths {
    pub fn new(data_dir: &Path) -> DataplanePaths {
        DataplanePaths {
            config: data_dir.join("dataplane.json"),
            control: data_dir.join("dataplane.sock"),
            // QEMU (libvirt-qemu) must traverse to it: see `Paths::create`.
            sockets: data_dir.join("vhost"),
            log: data_dir.join("logs").join("dataplane.log"),
        }
    }
}

/// The last status the data plane gave, per (vm, device).
#[derive(Default)]
pub struct DataplaneCache {
    /// One config write, reload or start at a time.
    sync: tokio::sync::Mutex<()>,
    disks: std::sync::RwLock<Option<HashMap<(Uuid, String), DiskStatus>>>,
    /// Wakes the keeper before its next tick (a peer VM's disks changed).
    pub(super) kick: tokio::sync::Notify,
    /// VMs a forced takeover named: their replicas are promoted even when
    /// not up to date. In memory: a crash before the promotion makes the
    /// operator name them again, never promotes them silently.
    pub(super) force_promote: std::sync::Mutex<std::collections::HashSet<Uuid>>,
    /// Each replicated disk's state when last seen (core/disk_watch.rs).
    pub(super) seen: std::sync::Mutex<super::disk_watch::SeenMap>,
}

impl Core {
    /// The data plane's keeper: brings its config in line with the store
    /// (a crash between a commit and the config write is repaired here),
    /// restarts it where this daemon is its keeper, and keeps its status
    /// fresh for the views.
    pub fn spawn_dataplane_keeper(self: &std::sync::Arc<Self>, tasks: &crate::tasks::Supervisor) {
        use crate::tasks::{Policy, Stage};
        let core = self.clone();
        tasks.spawn(Stage::Core, "core.dataplane", Policy::Restart, move |mut stop| {
            let core = core.clone();
            async move {
                let mut tick = tokio::time::interval(WATCH_PERIOD);
                let mut warned = false;
                loop {
                    tokio::select! {
                        _ = stop.wait() => return Ok(()),
                        _ = tick.tick() => {}
                        _ = core.dataplane_status.kick.notified() => {}
                    }
                    match core.sync_dataplane().await {
                        Ok(()) => warned = false,
                        Err(e) if !warned => {
                            tracing::warn!(error = %e, "the data plane is not serving the replicated disks");
                            warned = true;
                        }
                        Err(_) => {}
                    }
                }
            }
        });
    }

    /// Where a disk's blocks come from for QEMU.
    pub(super) fn disk_source(&self, vm: &VmRecord, d: &Disk) -> DiskSource {
        match vm.replication {
            Some(_) => DiskSource::VhostUser(self.export_of(vm, d).socket_path(&self.dataplane.sockets)),
            None => DiskSource::File(PathBuf::from(&d.path)),
        }
    }

    fn export_of(&self, vm: &VmRecord, d: &Disk) -> DiskExport {
        let spec = vm.replication.unwrap_or(ReplicationSpec {
            mode: ReplicationMode::Off,
            max_lag_seconds: crate::types::DEFAULT_MAX_LAG_SECONDS,
        });
        let primary = vm.owner_node == self.node.id;
        DiskExport {
            vm: vm.id,
            device: d.device.clone(),
            // A replica lives under this node's own data dir, whatever
            // the owner's layout.
            path: if primary { PathBuf::from(&d.path) } else { self.replica_path(vm.id, d) },
            role: if primary { DiskRole::Primary } else { DiskRole::Secondary },
            epoch: vm.epoch,
            replication: spec.mode,
            max_lag_seconds: spec.max_lag_seconds,
            size_bytes: d.size_bytes,
            queues: 1,
            force_promote: primary && self.dataplane_status.force_promote.lock().unwrap().contains(&vm.id),
        }
    }

    /// Where this node keeps its replica of a peer VM's disk.
    pub(super) fn replica_path(&self, vm: Uuid, d: &Disk) -> PathBuf {
        self.paths.disks.join(vm.to_string()).join(format!("{}.raw", d.device))
    }

    /// The paired node's data plane, if paired: its addresses at the peer
    /// link's port + 1.
    fn dataplane_peer(&self) -> Option<PeerEndpoint> {
        let p = self.peer_record().filter(|p| p.state == crate::store::PeerState::Paired)?;
        Some(PeerEndpoint {
            node_id: p.node.node_id,
            addresses: p
                .node
                .addresses
                .iter()
                .map(|ip| std::net::SocketAddr::new(*ip, p.node.link_port.wrapping_add(1)))
                .collect(),
            fingerprint: p.node.fingerprint,
        })
    }

    /// The data plane's config for the VMs as they are now: every disk of
    /// every VM with `replication` that this node owns. (Replicas of the
    /// peer's VMs join when disk replication lands.)
    fn dataplane_config(&self) -> DataplaneConfig {
        let peer = self.dataplane_peer();
        let vms = self.vms.read().unwrap();
        // Our own VMs' disks (served and, with a mode, shipped), and the
        // replicas of the peer's replicated VMs.
        let mut disks: Vec<DiskExport> = vms
            .values()
            .filter(|v| match v.replication {
                None => false,
                Some(_) if v.owner_node == self.node.id => true,
                Some(r) => {
                    r.mode != ReplicationMode::Off && peer.as_ref().is_some_and(|p| p.node_id == v.owner_node)
                }
            })
            .flat_map(|v| v.disks.iter().map(|d| self.export_of(v, d)))
            .collect();
        disks.sort_by(|a, b| (a.vm, &a.device).cmp(&(b.vm, &b.device)));
        DataplaneConfig {
            version: CONFIG_VERSION,
            node_id: self.node.id,
            socket_dir: self.dataplane.sockets.clone(),
            control_socket: self.dataplane.control.clone(),
            socket_owner: self.cfg.dataplane.socket_owner.clone(),
            // This daemon's own group when it is not root, so it can use
            // the root data plane's control socket.
            control_group: (!nix::unistd::geteuid().is_root())
                .then(|| nix::unistd::Group::from_gid(nix::unistd::getegid()).ok().flatten().map(|g| g.name))
                .flatten(),
            listen: match peer {
                Some(_) => self
                    .cfg
                    .cluster
                    .listen
                    .iter()
                    .map(|a| std::net::SocketAddr::new(a.ip(), a.port().wrapping_add(1)))
                    .collect(),
                None => Vec::new(),
            },
            tls: Some(TlsFiles {
                cert: self.cfg.api.tls_cert.clone().unwrap_or_else(|| self.paths.tls.join("cert.pem")),
                key: self.cfg.api.tls_key.clone().unwrap_or_else(|| self.paths.tls.join("key.pem")),
            }),
            peer,
            sync_rate_bytes_per_sec: self.cfg.dataplane.sync_rate_mib << 20,
            disks,
        }
    }

    /// Writes the data plane's config from the current VMs and has it
    /// reload, starting it first where this daemon is its keeper. Called
    /// before a replicated VM starts (its socket must be there), after a VM
    /// with data-plane disks is deleted, and every few seconds by the keeper.
    pub(super) async fn sync_dataplane(&self) -> Result<()> {
        let _one = self.dataplane_status.sync.lock().await;
        let cfg = self.dataplane_config();
        let path = self.dataplane.config.clone();
        let changed =
            std::fs::read(&path).ok().and_then(|b| DataplaneConfig::parse(&b).ok()) != Some(cfg.clone());
        let empty = cfg.disks.is_empty();
        let served: Vec<PathBuf> = cfg.disks.iter().map(|d| d.path.clone()).collect();
        if changed {
            tokio::task::spawn_blocking(move || cfg.write_atomic(&path))
                .await
                .map_err(|e| CoreError::Internal(e.to_string()))?
                .map_err(|e| CoreError::Dataplane(e.to_string()))?;
        }
        if empty && !self.dataplane_running().await {
            // Nothing to serve and nothing running: no process to start.
            self.remove_marked_replicas(&served, &[]);
            return Ok(());
        }
        // A data plane started now reads the new config by itself.
        let started = self.ensure_dataplane().await?;
        if changed && !started {
            if let ControlResponse::Error { error } =
                control(&self.dataplane.control, &ControlRequest::RELOAD).await?
            {
                return Err(CoreError::Dataplane(error.message));
            }
        }
        self.refresh_dataplane_status().await;
        // After the reload: what it dropped is closed (what the data plane
        // still reports serving waits).
        let open: Vec<PathBuf> = match self.dataplane_status.disks.read().unwrap().as_ref() {
            Some(d) => d.values().map(|s| s.path.clone()).collect(),
            None => Vec::new(),
        };
        self.remove_marked_replicas(&served, &open);
        Ok(())
    }

    async fn dataplane_running(&self) -> bool {
        control(&self.dataplane.control, &ControlRequest::STATUS).await.is_ok()
    }

    /// Starts the data plane when it does not answer and this daemon is its
    /// keeper. Under systemd (`INVOCATION_ID` set) it is its own unit and is
    /// never started from here: a child would live in novacron.service's
    /// cgroup and be killed with every restart of the API daemon.
    async fn ensure_dataplane(&self) -> Result<bool> {
        if self.dataplane_running().await {
            return Ok(false);
        }
        if std::env::var_os("INVOCATION_ID").is_some() || !self.cfg.dataplane.spawn {
            return Err(CoreError::Dataplane(format!(
                "the data plane does not answer on {} (systemctl status novacron-dataplane)",
                self.dataplane.control.display()
            )));
        }
        let exe = std::env::current_exe().map_err(|e| CoreError::Internal(e.to_string()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.dataplane.log)
            .map_err(|e| CoreError::Internal(format!("{}: {e}", self.dataplane.log.display())))?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("dataplane")
            .arg("--config")
            .arg(&self.dataplane.config)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(|e| CoreError::Internal(e.to_string()))?)
            .stderr(log);
        // Its own session: a signal to the daemon's process group (Ctrl-C,
        // a kill of the group) does not reach the data plane.
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        let child =
            cmd.spawn().map_err(|e| CoreError::Dataplane(format!("cannot start the data plane: {e}")))?;
        tracing::info!(pid = child.id(), "data plane started");
        // Not waited for: it outlives this daemon by design.
        drop(child);
        let deadline = tokio::time::Instant::now() + SPAWN_TIMEOUT;
        while tokio::time::Instant::now() < deadline {
            if self.dataplane_running().await {
                return Ok(true);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(CoreError::Dataplane(format!(
            "the data plane did not answer within {} s; see {}",
            SPAWN_TIMEOUT.as_secs(),
            self.dataplane.log.display()
        )))
    }

    /// Asks the data plane for its status and caches it; a data plane that
    /// does not answer empties the cache (shown as `unknown`).
    pub(super) async fn refresh_dataplane_status(&self) {
        let disks = match control(&self.dataplane.control, &ControlRequest::STATUS).await {
            Ok(ControlResponse::Status { status, .. }) => {
                Some(status.disks.into_iter().map(|d| ((d.vm, d.device.clone()), d)).collect())
            }
            _ => None,
        };
        if let Some(d) = &disks {
            self.note_dataplane_status(d);
        }
        *self.dataplane_status.disks.write().unwrap() = disks;
    }

    /// The data plane's status of one disk, from the cache.
    pub(super) fn dataplane_disk(&self, vm: Uuid, device: &str) -> Option<DiskStatus> {
        self.dataplane_status.disks.read().unwrap().as_ref()?.get(&(vm, device.to_string())).cloned()
    }

    pub(super) fn replication_view(&self, vm: &VmRecord, spec: ReplicationSpec) -> VmReplication {
        let answered = self.dataplane_status.disks.read().unwrap().is_some();
        let max_lag = spec.max_lag_seconds as f64;
        let mut protected = spec.mode != ReplicationMode::Off;
        let disks: Vec<DiskReplica> = vm
            .disks
            .iter()
            .map(|d| {
                let st = self.dataplane_disk(vm.id, &d.device);
                let r = st.as_ref().and_then(|s| s.replica.clone());
                let detail = match (&st, &r) {
                    (None, _) if answered => "not served by the data plane".to_string(),
                    (None, _) => "the data plane does not answer".to_string(),
                    (Some(s), _) if s.last_error.is_some() => s.last_error.clone().unwrap_or_default(),
                    (_, Some(r)) if !r.detail.is_empty() => r.detail.clone(),
                    (Some(s), _) if s.socket.is_some() && s.connected => "served, guest connected".into(),
                    (Some(s), _) if s.socket.is_some() => "served".into(),
                    (Some(_), _) => "replica of the peer's disk".into(),
                };
                let ok = match &r {
                    Some(r) => match (spec.mode, r.peer) {
                        (ReplicationMode::Sync, Some(p)) => p == ReplicaState::UpToDate,
                        (ReplicationMode::Async, Some(p)) => {
                            p == ReplicaState::UpToDate && r.lag_seconds <= max_lag && r.connected
                        }
                        // A replica held here: protected when it is current.
                        (_, None) => r.local == ReplicaState::UpToDate,
                        (ReplicationMode::Off, _) => false,
                    },
                    None => false,
                };
                protected &= ok;
                DiskReplica {
                    device: d.device.clone(),
                    local: match (&st, &r) {
                        (_, Some(r)) => r.local.as_str().into(),
                        // Not replicated: the one copy, always current.
                        (Some(_), None) => "up_to_date".into(),
                        (None, _) => "unknown".into(),
                    },
                    peer: r.as_ref().and_then(|r| r.peer).map(|p| p.as_str().to_string()),
                    connected: r.as_ref().is_some_and(|r| r.connected),
                    sync: r.as_ref().and_then(|r| r.sync.as_ref()).map(|p| SyncProgress {
                        kind: if p.full { "full" } else { "delta" }.into(),
                        bytes_done: p.done,
                        bytes_total: p.total,
                        rate_bytes_per_sec: p.rate_bytes_per_sec,
                        eta_seconds: p.eta_seconds,
                    }),
                    lag_bytes: r.as_ref().map_or(0, |r| r.lag_bytes),
                    lag_seconds: r.as_ref().map_or(0.0, |r| r.lag_seconds),
                    dirty_bytes: r.as_ref().map_or(0, |r| r.pending_bytes),
                    sync_bytes_total: r.as_ref().map_or(0, |r| r.sync_bytes),
                    detail,
                }
            })
            .collect();
        let protection = match spec.mode {
            _ if !answered => "unknown",
            ReplicationMode::Off => "unprotected",
            _ if protected => "protected",
            _ => "degraded",
        };
        VmReplication {
            mode: spec.mode,
            max_lag_seconds: spec.max_lag_seconds,
            protection: protection.into(),
            disks,
        }
    }

    /// `replication` of a new VM: as given, or `sync` on a paired node.
    /// Sync and async need a peer to ship to.
    pub(super) fn plan_replication(&self, r: Option<ReplicationSpec>) -> Result<Option<ReplicationSpec>> {
        let paired = self.dataplane_peer().is_some();
        match r {
            None if paired => Ok(Some(ReplicationSpec {
                mode: self.cfg.dataplane.default_mode,
                max_lag_seconds: crate::types::DEFAULT_MAX_LAG_SECONDS,
            })
            .filter(|_| self.cfg.dataplane.default_mode != ReplicationMode::Off)),
            Some(r) if r.max_lag_seconds == 0 || r.max_lag_seconds > 86_400 => {
                Err(CoreError::invalid("replication.max_lag_seconds", "must be between 1 and 86400"))
            }
            Some(ReplicationSpec { mode: m @ (ReplicationMode::Sync | ReplicationMode::Async), .. })
                if !paired =>
            {
                Err(CoreError::Unsupported(format!(
                    "replication mode {}: this node is not paired, so there is no peer to replicate to \
                     (pair first: novacron peer invite; or use mode off)",
                    m.as_str()
                )))
            }
            other => Ok(other),
        }
    }

    /// Refuses snapshots and clones of data-plane disks, with the reason:
    /// the data plane owns the raw file (QEMU's qcow2 snapshots cannot live
    /// in it), and a consistent point in the backend comes with backups.
    pub(super) fn refuse_on_dataplane_disks(&self, vm: &VmRecord, action: &'static str) -> Result<()> {
        if vm.replication.is_some() {
            return Err(CoreError::Unsupported(format!(
                "{action} is not supported for VM {:?}: its disks are raw files owned by the data plane \
                 (replication {}), which has no consistent point-in-time copy yet (that comes with \
                 backups of replicated disks); see docs/replication.md",
                vm.name,
                vm.replication.map_or("off", |r| r.mode.as_str())
            )));
        }
        Ok(())
    }
}

/// One request on the control socket and its answer.
async fn control(sock: &Path, req: &ControlRequest) -> Result<ControlResponse> {
    let fail = |e: String| CoreError::Dataplane(format!("control socket {}: {e}", sock.display()));
    let exchange = async {
        let stream = tokio::net::UnixStream::connect(sock).await.map_err(|e| fail(e.to_string()))?;
        let (r, mut w) = stream.into_split();
        let mut line = serde_json::to_vec(req).expect("control request serializes");
        line.push(b'\n');
        w.write_all(&line).await.map_err(|e| fail(e.to_string()))?;
        let mut answer = String::new();
        BufReader::new(r).read_line(&mut answer).await.map_err(|e| fail(e.to_string()))?;
        serde_json::from_str::<ControlResponse>(&answer).map_err(|e| fail(format!("bad answer: {e}")))
    };
    tokio::time::timeout(CONTROL_TIMEOUT, exchange).await.map_err(|_| fail("no answer".into()))?
}
