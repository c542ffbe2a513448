//! The core: executes [`Command`]s against the store and the hypervisor.
//!
//! It owns the in-memory view of VMs and tokens (loaded from the store at
//! start, updated after every commit), so reads never touch SQLite, and it
//! serializes operations per VM with one async mutex each.

mod autostart;
mod command;
mod dataplane;
mod disk_watch;
mod disks;
mod error;
pub mod events;
mod failover;
mod health;
mod images;
mod networks;
mod owner;
#[cfg(test)]
mod owner_tests;
mod peer;
mod peer_link;
mod reconcile;
pub mod replica;
mod replica_files;
#[cfg(test)]
mod replica_tests;
mod snapshots;
mod tokens;
mod update;
mod vm;

pub use command::{Action, BodyStream, Caller, Command, ConsoleSession, EventFeed, Reply, VmAction};
pub use error::{CoreError, ErrorKind};
pub use tokens::Revoked;

use crate::config::Config;
use crate::hypervisor::{DomainInfo, Hypervisor, HypervisorInfo};
use crate::store::{ImageRecord, NetworkRecord, NodeRecord, SnapshotRecord, Store, TokenRecord, VmRecord};
use crate::telemetry::metrics::Metrics;
use crate::types::{AuditList, Health, HostInfo, Vm};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;
use uuid::Uuid;

pub type Result<T> = std::result::Result<T, CoreError>;

/// The data dir's layout lives with the store (backups need it too).
pub use crate::store::Paths;

pub struct Core {
    pub cfg: Config,
    pub paths: Paths,
    pub node: NodeRecord,
    pub metrics: Arc<Metrics>,
    store: Arc<Store>,
    hv: Arc<dyn Hypervisor>,
    /// Managed VMs, by id. The source of every read.
    vms: RwLock<HashMap<Uuid, VmRecord>>,
    /// libvirt domains NovaCron did not create, from the last reconcile.
    unmanaged: RwLock<Vec<DomainInfo>>,
    /// Bumped on every change to `vms` or `unmanaged`.
    generation: AtomicU64,
    list_cache: Mutex<Option<(u64, Arc<Vec<Vm>>)>>,
    tokens: RwLock<HashMap<String, TokenRecord>>,
    /// Ids of tokens revoked since start; open streams watch it.
    revoked: tokio::sync::watch::Sender<std::collections::HashSet<String>>,
    images: RwLock<std::collections::BTreeMap<String, ImageRecord>>,
    networks: RwLock<std::collections::BTreeMap<String, NetworkRecord>>,
    snapshots: RwLock<Vec<SnapshotRecord>>,
    pub events: events::EventBus,
    vm_locks: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
    /// Serializes VM creation so name checks and inserts cannot interleave;
    /// also token revocations, so two cannot both see another admin left.
    create_lock: tokio::sync::Mutex<()>,
    /// Serializes recording observed VM states: a lifecycle event and the
    /// operation that caused it both see the change, and only one may
    /// record (and announce) it.
    state_lock: tokio::sync::Mutex<()>,
    /// VMs with an ACPI shutdown in flight: shown as shutting_down.
    shutting_down: Mutex<HashMap<Uuid, ()>>,
    /// Wakes the reconciler at once (a VM was handed to the peer).
    reconcile_now: tokio::sync::Notify,
    hv_info: Mutex<Option<HypervisorInfo>>,
    /// MAC -> address from the DHCP leases of NovaCron's NAT networks,
    /// refreshed by reconciliation.
    leases: RwLock<HashMap<String, String>>,
    tls_fingerprint: OnceLock<String>,
    tls_not_after: OnceLock<i64>,
    last_seq: AtomicU64,
    /// The number of this node's newest change, for the peer link.
    local_seq: tokio::sync::watch::Sender<u64>,
    /// Held from a store commit (or a peer change's apply) until the cache
    /// follows it, so the cache sees changes in the store's order.
    commit_lock: tokio::sync::Mutex<()>,
    /// One host update upload at a time.
    update_lock: tokio::sync::Mutex<()>,
    /// Set at shutdown, once nothing else may write: commits are refused.
    closed: std::sync::atomic::AtomicBool,
    /// Image names with an upload or import in flight: a second one for the
    /// same name is refused at once instead of after its whole body.
    images_pending: Mutex<std::collections::HashSet<String>>,
    /// Pairing: outstanding invitations and the peer row.
    peer: peer::PeerSide,
    /// State replication's lag and counters while it runs (written by
    /// `replicator`).
    pub replication: crate::cluster::drivers::StatusCell,
    /// The image copy's progress (written by `image_copy`).
    pub image_files: crate::cluster::drivers::FilesCell,
    /// The data plane's files, and its last status.
    dataplane: dataplane::DataplanePaths,
    dataplane_status: dataplane::DataplaneCache,
}

impl Core {
    /// Opens the store under `cfg.data_dir` and loads state. Does not talk
    /// to libvirt yet: the daemon must come up even when libvirt is down.
    pub fn open(cfg: Config, hv: Arc<dyn Hypervisor>, metrics: Arc<Metrics>) -> Result<Arc<Core>> {
        let paths = Paths::new(&cfg.data_dir);
        let cfg_data_dir = cfg.data_dir.clone();
        paths
            .create()
            .map_err(|e| CoreError::Internal(format!("cannot create {}: {e}", paths.data_dir.display())))?;
        // Nothing writes images before the API and the link are up.
        crate::images::remove_leftovers(&paths.images);
        let store = Arc::new(Store::open(&paths.db)?);
        let default_name = cfg.node.name.clone().unwrap_or_else(crate::host::hostname);
        let node = store.node_identity(&default_name)?;
        let vms = store.vms()?.into_iter().map(|v| (v.id, v)).collect();
        let tokens = store.tokens()?.into_iter().map(|t| (t.id.clone(), t)).collect();
        let images = store.images()?.into_iter().map(|i| (i.name.clone(), i)).collect();
        let networks = store.networks()?.into_iter().map(|n| (n.name.clone(), n)).collect();
        let snapshots = store.snapshots()?;
        let peer_row = store.peer()?;
        metrics.peer_paired.store(
            peer_row.as_ref().is_some_and(|p| p.state == crate::store::PeerState::Paired),
            Ordering::Relaxed,
        );
        let last_seq = store.last_seq()? as u64;
        let event_seq = store.reserve_event_seqs(events::SEQ_BLOCK)?;
        let seq_store = store.clone();
        let events = events::EventBus::resume(
            event_seq,
            event_seq + events::SEQ_BLOCK,
            Box::new(move |upto| seq_store.set_event_seq(upto).map_err(|e| e.to_string())),
        );
        let core = Core {
            cfg,
            paths,
            node,
            metrics,
            store,
            hv,
            vms: RwLock::new(vms),
            unmanaged: RwLock::new(Vec::new()),
            generation: AtomicU64::new(1),
            list_cache: Mutex::new(None),
            tokens: RwLock::new(tokens),
            revoked: tokio::sync::watch::Sender::new(Default::default()),
            images: RwLock::new(images),
            networks: RwLock::new(networks),
            snapshots: RwLock::new(snapshots),
            events,
            state_lock: tokio::sync::Mutex::new(()),
            vm_locks: Mutex::new(HashMap::new()),
            create_lock: tokio::sync::Mutex::new(()),
            shutting_down: Mutex::new(HashMap::new()),
            reconcile_now: tokio::sync::Notify::new(),
            hv_info: Mutex::new(None),
            leases: RwLock::new(HashMap::new()),
            tls_fingerprint: OnceLock::new(),
            tls_not_after: OnceLock::new(),
            last_seq: AtomicU64::new(last_seq),
            local_seq: tokio::sync::watch::Sender::new(last_seq),
            commit_lock: tokio::sync::Mutex::new(()),
            update_lock: tokio::sync::Mutex::new(()),
            images_pending: Mutex::default(),
            closed: Default::default(),
            peer: peer::PeerSide::load(peer_row),
            replication: Default::default(),
            image_files: Default::default(),
            dataplane: dataplane::DataplanePaths::new(&cfg_data_dir),
            dataplane_status: Default::default(),
        };
        Ok(Arc::new(core))
    }

    pub fn set_tls_identity(&self, fingerprint: String, not_after: Option<i64>) {
        let _ = self.tls_fingerprint.set(fingerprint);
        if let Some(t) = not_after {
            let _ = self.tls_not_after.set(t);
        }
    }

    pub fn tls_fingerprint(&self) -> &str {
        self.tls_fingerprint.get().map(String::as_str).unwrap_or("")
    }

    /// Runs one command for `caller`: authorization, execution, audit.
    pub async fn execute(self: &Arc<Self>, caller: &Caller, cmd: Command) -> Result<Reply> {
        self.authorize(caller, cmd.action()).await?;
        if !cmd.is_mutation() {
            return self.query(caller, cmd).await;
        }
        let audit_cmd = cmd.clone();
        let op =
            serde_json::json!({"op": audit_cmd.name(), "target": audit_cmd.target(), "actor": caller.name});
        self.events.publish("operation.started", op.clone());
        let result = self.mutate(caller, cmd).await;
        self.metrics.count_operation(audit_cmd.name(), result.is_ok());
        match &result {
            Ok(_) => self.events.publish("operation.finished", op),
            Err(e) => {
                let mut op = op;
                op["error"] = serde_json::json!({"code": e.code(), "message": e.to_string()});
                self.events.publish("operation.failed", op);
            }
        }
        self.audit(caller, &audit_cmd, &result.as_ref().map(|_| ())).await;
        result
    }

    /// Checks that `caller` may run `action`; a refusal of anything beyond
    /// reading is audited. The API calls this before it reads a request
    /// body, `execute` again for every command.
    pub async fn authorize(&self, caller: &Caller, action: Action) -> Result<()> {
        let Some(need) = action.required_role() else { return Ok(()) };
        let action = action.name();
        if caller.role >= need {
            return Ok(());
        }
        if need > crate::types::Role::Viewer {
            tracing::warn!(OP = action, ACTOR = %caller.name, "refused: role too weak");
            let store = self.store.clone();
            let actor = caller.name.clone();
            let _ = tokio::task::spawn_blocking(move || store.record_audit(&actor, action, "", "forbidden"))
                .await;
        }
        Err(CoreError::Forbidden { action, have: caller.role.as_str(), need: need.as_str() })
    }

    async fn audit(&self, caller: &Caller, cmd: &Command, result: &std::result::Result<(), &CoreError>) {
        let outcome = match result {
            Ok(()) => "ok".to_string(),
            Err(e) => e.code().to_string(),
        };
        match result {
            Ok(()) => {
                tracing::info!(OP = cmd.name(), ACTOR = %caller.name, TARGET = %cmd.target(), "operation succeeded")
            }
            Err(e) => {
                tracing::warn!(OP = cmd.name(), ACTOR = %caller.name, TARGET = %cmd.target(), error = %e, "operation failed")
            }
        }
        let store = self.store.clone();
        let (actor, action, target) = (caller.name.clone(), cmd.name(), cmd.target());
        let res =
            tokio::task::spawn_blocking(move || store.record_audit(&actor, action, &target, &outcome)).await;
        if let Ok(Err(e)) = res {
            tracing::error!(error = %e, "cannot write the audit log");
        }
    }

    async fn query(self: &Arc<Self>, caller: &Caller, cmd: Command) -> Result<Reply> {
        match cmd {
            Command::Health => Ok(Reply::Health(Health {
                status: "ok".into(),
                version: crate::VERSION.into(),
                node: self.node.id,
            })),
            Command::Ready => {
                let store = self.store.clone();
                let hv = self.hv.clone();
                let (db, lv) = tokio::task::spawn_blocking(move || (store.ping(), hv.ping()))
                    .await
                    .map_err(|e| CoreError::Internal(e.to_string()))?;
                self.metrics.libvirt_connected.store(lv, Ordering::Relaxed);
                match (db, lv) {
                    (true, true) => Ok(Reply::Ready),
                    (false, _) => Err(CoreError::NotReady("the state store does not answer".into())),
                    (_, false) => Err(CoreError::NotReady(format!(
                        "libvirt at {} does not answer",
                        self.cfg.hypervisor.uri
                    ))),
                }
            }
            Command::HostInfo => Ok(Reply::Host(Box::new(self.host_info().await))),
            Command::HealthReport => Ok(Reply::HealthReport(Box::new(self.health_report().await))),
            Command::Metrics => Ok(Reply::Metrics(self.render_metrics())),
            Command::ListVms => {
                let (generation, vms) = self.vm_list();
                Ok(Reply::Vms { generation, vms })
            }
            Command::GetVm(r) => {
                // Fresh leases, so a NIC's address shows as soon as it has one.
                if self.find_record(&r).is_ok_and(|v| !v.nics.is_empty()) {
                    self.refresh_leases().await;
                }
                Ok(Reply::Vm(Box::new(self.find_vm(&r)?)))
            }
            Command::ListTokens => Ok(Reply::Tokens(self.list_tokens())),
            Command::ListImages => Ok(Reply::Images(self.list_images())),
            Command::ListNetworks => Ok(Reply::Networks(self.list_networks().await?)),
            Command::ListSnapshots(vm) => Ok(Reply::Snapshots(self.list_snapshots(&vm)?)),
            Command::GetImage(name) => Ok(Reply::Image(self.get_image(&name)?)),
            Command::ConsoleLog { vm, bytes } => Ok(Reply::ConsoleLog(self.console_tail(&vm, bytes)?)),
            Command::Events { after } => {
                let (backlog, live) = self.events.subscribe(after);
                // Who did what is audit data: admin-only, like /v1/audit.
                let audit_detail = caller.role >= crate::types::Role::Admin;
                Ok(Reply::Events(EventFeed { backlog, live, audit_detail, ends: self.until_revoked(caller) }))
            }
            Command::UpdateStatus => Ok(Reply::Update(Box::new(self.update_view().await))),
            Command::PeerStatus => Ok(Reply::Peer(Box::new(self.peer_view()))),
            // Not audited per request; see core/peer.rs.
            Command::PeerHandshake(req) => self.peer_handshake(req).await.map(Reply::PeerHandshake),
            Command::ListAudit { limit } => {
                let store = self.store.clone();
                let entries = tokio::task::spawn_blocking(move || store.audit(limit))
                    .await
                    .map_err(|e| CoreError::Internal(e.to_string()))??;
                Ok(Reply::Audit(AuditList { entries }))
            }
            other => Err(CoreError::Internal(format!("{} is not a query", other.name()))),
        }
    }

    async fn mutate(self: &Arc<Self>, caller: &Caller, cmd: Command) -> Result<Reply> {
        match cmd {
            Command::CreateVm(spec) => self.create_vm(spec).await.map(|v| Reply::Created(Box::new(v))),
            Command::UpdateVm(r, patch) => self.update_vm(&r, patch).await.map(|v| Reply::Vm(Box::new(v))),
            Command::DeleteVm { vm, force } => self.delete_vm(&vm, force).await.map(|_| Reply::Deleted),
            Command::VmAction { vm, action } => self.vm_action(&vm, action).await,
            Command::CreateToken(req) => self.create_token(req).await.map(Reply::TokenCreated),
            Command::PeerInvite(req) => self.peer_invite(req).await.map(Reply::PeerInvitation),
            Command::PeerJoin(req) => self.peer_join(req).await.map(|v| Reply::Peer(Box::new(v))),
            Command::PeerUnpair { force } => self.peer_unpair(force).await.map(Reply::PeerUnpaired),
            Command::PeerTakeover(req) => self.peer_takeover(req).await.map(Reply::Takeover),
            Command::VmMove(vm) => self.vm_move(&vm).await.map(|m| Reply::VmMoved(Box::new(m))),
            Command::UploadImage { name, checksum, length, body } => {
                self.upload_image(&name, checksum, length, body).await.map(Reply::ImageCreated)
            }
            Command::ImportImage(req) => self.import_image(req).await.map(Reply::ImageCreated),
            Command::CreateNetwork(req) => self.create_network(req).await.map(Reply::NetworkCreated),
            Command::DeleteNetwork(name) => self.delete_network(&name).await.map(|_| Reply::Deleted),
            Command::CreateSnapshot(vm, req) => {
                self.create_snapshot(&vm, req).await.map(Reply::SnapshotCreated)
            }
            Command::RevertSnapshot { vm, name } => {
                self.revert_snapshot(&vm, &name).await.map(|v| Reply::Vm(Box::new(v)))
            }
            Command::DeleteSnapshot { vm, name } => {
                self.delete_snapshot(&vm, &name).await.map(|_| Reply::Deleted)
            }
            Command::Console(vm) => {
                let session = self.open_console(&vm).await?;
                Ok(Reply::Console(ConsoleSession { ends: self.until_revoked(caller), ..session }))
            }
            Command::CloneVm(vm, req) => self.clone_vm(&vm, req).await.map(|v| Reply::Created(Box::new(v))),
            Command::AttachDisk(vm, spec) => {
                self.attach_disk(&vm, spec).await.map(|v| Reply::Vm(Box::new(v)))
            }
            Command::DetachDisk { vm, device } => {
                self.detach_disk(&vm, &device).await.map(|v| Reply::Vm(Box::new(v)))
            }
            Command::ResizeDisk { vm, device, req } => {
                self.resize_disk(&vm, &device, req).await.map(|v| Reply::Vm(Box::new(v)))
            }
            Command::DeleteImage(name) => self.delete_image(&name).await.map(|_| Reply::Deleted),
            Command::RevokeToken { token, force } => {
                self.revoke_token(caller, &token, force).await.map(|_| Reply::Deleted)
            }
            Command::ApplyUpdate { checksum, length, tries, body } => self
                .apply_update(checksum, length, tries, body)
                .await
                .map(|v| Reply::UpdateAccepted(Box::new(v))),
            other => Err(CoreError::Internal(format!("{} is not a mutation", other.name()))),
        }
    }

    /// Runs a blocking hypervisor call on the blocking pool.
    async fn hv_call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Hypervisor) -> crate::hypervisor::Result<T> + Send + 'static,
    ) -> Result<T> {
        let hv = self.hv.clone();
        tokio::task::spawn_blocking(move || f(hv.as_ref()))
            .await
            .map_err(|e| CoreError::Internal(e.to_string()))?
            .map_err(CoreError::from)
    }

    /// Runs a blocking store call on the blocking pool.
    async fn store_call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> crate::store::Result<T> + Send + 'static,
    ) -> Result<T> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| CoreError::Internal(e.to_string()))?
            .map_err(CoreError::from)
    }

    /// Commits a change to the store, then to the in-memory view.
    async fn commit(&self, change: crate::store::Change) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(CoreError::NotReady("the daemon is stopping".into()));
        }
        let store = self.store.clone();
        let c = change.clone();
        let _order = self.commit_lock.lock().await;
        let seq = tokio::task::spawn_blocking(move || store.commit(&c))
            .await
            .map_err(|e| CoreError::Internal(e.to_string()))??;
        self.last_seq.fetch_max(seq as u64, Ordering::Relaxed);
        self.apply_to_cache(&change);
        self.local_seq.send_replace(seq as u64);
        Ok(())
    }

    /// Applies a committed change (local, or the peer's as applied here) to
    /// the in-memory view and announces it.
    fn apply_to_cache(&self, change: &crate::store::Change) {
        use crate::store::Change;
        use serde_json::json;
        match change {
            Change::VmPut(vm) => {
                let old = self.vms.write().unwrap().insert(vm.id, vm.clone());
                self.mark_removed_replicas(old.as_ref(), Some(vm));
            }
            Change::VmState { id, state, at } => {
                let mut vms = self.vms.write().unwrap();
                if let Some(vm) = vms.get_mut(id) {
                    let shown = self.shown_state(vm);
                    vm.state = *state;
                    vm.updated_at = *at;
                    // "Running with an ACPI shutdown pending" and libvirt's
                    // own "in shutdown" look alike to a client: one event.
                    if self.shown_state(vm) != shown {
                        self.publish_state(vm);
                    }
                }
            }
            Change::VmDelete { id } => {
                let old = self.vms.write().unwrap().remove(id);
                self.mark_removed_replicas(old.as_ref(), None);
                self.snapshots.write().unwrap().retain(|s| s.vm_id != *id);
            }
            Change::TokenPut(t) => {
                self.tokens.write().unwrap().insert(t.id.clone(), t.clone());
                return;
            }
            Change::TokenDelete { id } => {
                self.tokens.write().unwrap().remove(id);
                // Open streams of the token end, wherever it was revoked.
                self.revoked.send_modify(|ids| {
                    ids.insert(id.clone());
                });
                return;
            }
            Change::ImagePut(i) => {
                self.images.write().unwrap().insert(i.name.clone(), i.clone());
                self.events.publish("image.created", json!({"name": i.name, "format": i.format}));
                return;
            }
            Change::ImageDelete { name } => {
                self.images.write().unwrap().remove(name);
                self.events.publish("image.deleted", json!({"name": name}));
                return;
            }
            Change::NetworkPut(n) => {
                self.networks.write().unwrap().insert(n.name.clone(), n.clone());
                self.events.publish("network.created", json!({"name": n.name}));
                return;
            }
            Change::NetworkDelete { name } => {
                self.networks.write().unwrap().remove(name);
                self.events.publish("network.deleted", json!({"name": name}));
                return;
            }
            Change::SnapshotPut(sn) => {
                self.snapshots.write().unwrap().push(sn.clone());
                self.publish_snapshot("snapshot.created", sn.vm_id, &sn.name);
                return;
            }
            Change::SnapshotDelete { vm_id, name } => {
                self.snapshots.write().unwrap().retain(|s| !(s.vm_id == *vm_id && s.name == *name));
                self.publish_snapshot("snapshot.deleted", *vm_id, name);
                return;
            }
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// How every event names a VM: `{"id", "name"}` under `vm`.
    fn vm_ref(id: Uuid, name: &str) -> serde_json::Value {
        serde_json::json!({"id": id, "name": name})
    }

    /// Announces the state `vm` is shown in (`GET /v1/vms` agrees).
    fn publish_state(&self, vm: &VmRecord) {
        let data =
            serde_json::json!({"vm": Self::vm_ref(vm.id, &vm.name), "state": self.shown_state(vm).as_str()});
        self.events.publish("vm.state", data);
    }

    fn publish_snapshot(&self, kind: &'static str, vm_id: Uuid, snapshot: &str) {
        let name = self.vms.read().unwrap().get(&vm_id).map(|v| v.name.clone()).unwrap_or_default();
        self.events
            .publish(kind, serde_json::json!({"vm": Self::vm_ref(vm_id, &name), "snapshot": snapshot}));
    }

    async fn host_info(&self) -> HostInfo {
        let facts = crate::host::facts().unwrap_or_default();
        let connected = {
            let hv = self.hv.clone();
            tokio::task::spawn_blocking(move || hv.ping()).await.unwrap_or(false)
        };
        let info = if connected {
            let cached = self.hv_info.lock().unwrap().clone();
            match cached {
                Some(i) => Some(i),
                None => {
                    let fresh = self.hv_call(|hv| hv.info()).await.ok();
                    *self.hv_info.lock().unwrap() = fresh.clone();
                    fresh
                }
            }
        } else {
            None
        };
        HostInfo {
            node_id: self.node.id,
            node_name: self.node.name.clone(),
            hostname: facts.hostname,
            cpus: facts.cpus,
            memory_total_mib: facts.memory_total_mib,
            memory_available_mib: facts.memory_available_mib,
            memory_reserve_mib: self.cfg.hypervisor.memory_reserve_mib,
            load: facts.load,
            kvm_usable: facts.kvm_usable,
            libvirt_uri: self.cfg.hypervisor.uri.clone(),
            libvirt_connected: connected,
            libvirt_version: info.as_ref().map(|i| i.libvirt_version.clone()),
            qemu_version: info.as_ref().map(|i| i.hypervisor_version.clone()),
            domain_type: self.cfg.hypervisor.domain_type.clone(),
            version: crate::VERSION.into(),
            tls_fingerprint: self.tls_fingerprint().to_string(),
        }
    }

    fn render_metrics(&self) -> String {
        use crate::types::VmState;
        let mut counts: Vec<(&'static str, u64)> = VmState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        for vm in self.vms.read().unwrap().values() {
            if let Some(c) = counts.iter_mut().find(|c| c.0 == self.shown_state(vm).as_str()) {
                c.1 += 1;
            }
        }
        let facts = crate::host::facts().unwrap_or_default();
        let (replicated, protection) = self.replicated_disks();
        let (replica_disks, vm_protection) = disk_watch::samples(&replicated, &protection);
        let snap = crate::telemetry::metrics::Snapshot {
            replica_disks: &replica_disks,
            vm_protection: &vm_protection,
            vms_by_state: &counts,
            unmanaged_domains: self.unmanaged.read().unwrap().len() as u64,
            host_memory_total_bytes: facts.memory_total_mib * 1024 * 1024,
            host_memory_available_bytes: facts.memory_available_mib * 1024 * 1024,
            host_load1: facts.load[0],
            host_cpus: facts.cpus,
            change_seq: self.last_seq.load(Ordering::Relaxed) as i64,
            tls_cert_not_after: self.tls_not_after.get().copied(),
            data_dir_space: health::fs_space(&self.paths.data_dir),
            last_backup: crate::store::backup::last_backup(&self.paths.data_dir),
            replication_lag: self
                .replication
                .read()
                .unwrap()
                .as_ref()
                .map_or((None, None), |r| (r.lag_records, r.lag_seconds_at(crate::util::now_ms()))),
            image_bytes_copied: self.image_files.read().unwrap().status.bytes_copied,
            peer_link: self.peer_link_status().map(|st| {
                let up = st.link.state == crate::cluster::link::LinkState::Up;
                crate::telemetry::metrics::PeerLinkSample {
                    up,
                    bulk_up: up && st.link.bulk == crate::cluster::link::LinkState::Up,
                    rtt_seconds: st.link.rtt_ms.filter(|_| up).map(|ms| ms / 1000.0),
                    heartbeat_age_seconds: st.link.last_heartbeat_age_ms.map(|ms| ms as f64 / 1000.0),
                    downs: st.link.downs,
                    refused: st.refused_connections,
                    handshake_failures: st.link.handshake_failures,
                }
            }),
        };
        self.metrics.render(&snap)
    }

    /// Per-VM operation lock. Waits up to 30 s, then reports the VM busy.
    async fn lock_vm(&self, id: Uuid, name: &str) -> Result<tokio::sync::OwnedMutexGuard<()>> {
        let m = self.vm_locks.lock().unwrap().entry(id).or_default().clone();
        tokio::time::timeout(Duration::from_secs(30), m.lock_owned())
            .await
            .map_err(|_| CoreError::Busy(name.to_string()))
    }

    pub(crate) fn lease_for(&self, mac: &str) -> Option<String> {
        self.leases.read().unwrap().get(mac).cloned()
    }

    /// Number of managed VMs.
    pub fn vm_count(&self) -> usize {
        self.vms.read().unwrap().len()
    }

    /// True when the state store answers a query (the watchdog's test).
    pub async fn store_answers(&self) -> bool {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.ping()).await.unwrap_or(false)
    }

    /// The last step of a shutdown, after every task that writes has
    /// stopped: later commits (a request still in flight on an open
    /// connection) are refused, and the store's log is checkpointed.
    pub async fn close_store(&self) -> Result<()> {
        self.closed.store(true, Ordering::SeqCst);
        // A state being recorded finishes first.
        let _serial = self.state_lock.lock().await;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.checkpoint())
            .await
            .map_err(|e| CoreError::Internal(e.to_string()))??;
        Ok(())
    }

    /// A caller for the admin on the local socket.
    pub fn local_admin(uid: u32) -> Caller {
        Caller { name: format!("local:uid={uid}"), token_id: None, role: crate::types::Role::Admin }
    }
}
