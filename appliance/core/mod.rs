//! The core: executes [`Command`]s against the store and the hypervisor.
//!
//! It owns the in-memory view of VMs and tokens (loaded from the store at
//! start, updated after every commit), so reads never touch SQLite, and it
//! serializes operations per VM with one async mutex each.

mod command;
mod error;
mod reconcile;
mod tokens;
mod vm;

pub use command::{required_role, Caller, Command, Reply, VmAction};
pub use error::CoreError;

use crate::config::Config;
use crate::hypervisor::{DomainInfo, Hypervisor, HypervisorInfo};
use crate::store::{NodeRecord, Store, TokenRecord, VmRecord};
use crate::telemetry::metrics::Metrics;
use crate::types::{AuditList, Health, HostInfo, Vm};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;
use uuid::Uuid;

pub type Result<T> = std::result::Result<T, CoreError>;

/// Folders under the data dir.
#[derive(Debug, Clone)]
pub struct Paths {
    pub data_dir: PathBuf,
    pub db: PathBuf,
    pub disks: PathBuf,
    pub boot: PathBuf,
    pub images: PathBuf,
    pub logs: PathBuf,
    pub tls: PathBuf,
}

impl Paths {
    pub fn new(data_dir: &std::path::Path) -> Paths {
        Paths {
            data_dir: data_dir.into(),
            db: data_dir.join("state.db"),
            disks: data_dir.join("disks"),
            boot: data_dir.join("boot"),
            images: data_dir.join("images"),
            logs: data_dir.join("logs"),
            tls: data_dir.join("tls"),
        }
    }

    /// Creates the folders. Disks and logs must be reachable by QEMU, which
    /// may run as another user, so they are traversable but not listable.
    pub fn create(&self) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        for (dir, mode) in [
            (&self.data_dir, 0o711),
            (&self.disks, 0o711),
            (&self.boot, 0o755),
            (&self.images, 0o755),
            (&self.logs, 0o711),
            (&self.tls, 0o700),
        ] {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    }
}

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
    vm_locks: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
    /// Serializes VM creation so name checks and inserts cannot interleave.
    create_lock: tokio::sync::Mutex<()>,
    /// VMs with an ACPI shutdown in flight: shown as shutting_down.
    shutting_down: Mutex<HashMap<Uuid, ()>>,
    hv_info: Mutex<Option<HypervisorInfo>>,
    tls_fingerprint: OnceLock<String>,
    tls_not_after: OnceLock<i64>,
    last_seq: AtomicU64,
}

impl Core {
    /// Opens the store under `cfg.data_dir` and loads state. Does not talk
    /// to libvirt yet: the daemon must come up even when libvirt is down.
    pub fn open(cfg: Config, hv: Arc<dyn Hypervisor>, metrics: Arc<Metrics>) -> Result<Arc<Core>> {
        let paths = Paths::new(&cfg.data_dir);
        paths
            .create()
            .map_err(|e| CoreError::Internal(format!("cannot create {}: {e}", paths.data_dir.display())))?;
        let store = Arc::new(Store::open(&paths.db)?);
        let default_name = cfg.node.name.clone().unwrap_or_else(crate::host::hostname);
        let node = store.node_identity(&default_name)?;
        let vms = store.vms()?.into_iter().map(|v| (v.id, v)).collect();
        let tokens = store.tokens()?.into_iter().map(|t| (t.id.clone(), t)).collect();
        let last_seq = store.last_seq()? as u64;
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
            vm_locks: Mutex::new(HashMap::new()),
            create_lock: tokio::sync::Mutex::new(()),
            shutting_down: Mutex::new(HashMap::new()),
            hv_info: Mutex::new(None),
            tls_fingerprint: OnceLock::new(),
            tls_not_after: OnceLock::new(),
            last_seq: AtomicU64::new(last_seq),
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
        if let Some(need) = cmd.required_role() {
            if caller.role < need {
                let err = CoreError::Forbidden {
                    action: cmd.name(),
                    have: caller.role.as_str(),
                    need: need.as_str(),
                };
                if cmd.is_mutation() {
                    self.audit(caller, &cmd, &Err(&err)).await;
                }
                return Err(err);
            }
        }
        if !cmd.is_mutation() {
            return self.query(cmd).await;
        }
        let audit_cmd = cmd.clone();
        let result = self.mutate(caller, cmd).await;
        self.metrics.count_operation(audit_cmd.name(), result.is_ok());
        self.audit(caller, &audit_cmd, &result.as_ref().map(|_| ())).await;
        result
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

    async fn query(self: &Arc<Self>, cmd: Command) -> Result<Reply> {
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
            Command::Metrics => Ok(Reply::Metrics(self.render_metrics())),
            Command::ListVms => {
                let (generation, vms) = self.vm_list();
                Ok(Reply::Vms { generation, vms })
            }
            Command::GetVm(r) => Ok(Reply::Vm(Box::new(self.find_vm(&r)?))),
            Command::ListTokens => Ok(Reply::Tokens(self.list_tokens())),
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
            Command::RevokeToken(id) => self.revoke_token(caller, &id).await.map(|_| Reply::Deleted),
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

    /// Commits a change to the store, then to the in-memory view.
    async fn commit(&self, change: crate::store::Change) -> Result<()> {
        let store = self.store.clone();
        let c = change.clone();
        let seq = tokio::task::spawn_blocking(move || store.commit(&c))
            .await
            .map_err(|e| CoreError::Internal(e.to_string()))??;
        self.last_seq.fetch_max(seq as u64, Ordering::Relaxed);
        self.apply_to_cache(&change);
        Ok(())
    }

    fn apply_to_cache(&self, change: &crate::store::Change) {
        use crate::store::Change;
        match change {
            Change::VmPut(vm) => {
                self.vms.write().unwrap().insert(vm.id, vm.clone());
            }
            Change::VmState { id, state, at } => {
                if let Some(vm) = self.vms.write().unwrap().get_mut(id) {
                    vm.state = *state;
                    vm.updated_at = *at;
                }
            }
            Change::VmDelete { id } => {
                self.vms.write().unwrap().remove(id);
            }
            Change::TokenPut(t) => {
                self.tokens.write().unwrap().insert(t.id.clone(), t.clone());
                return;
            }
            Change::TokenDelete { id } => {
                self.tokens.write().unwrap().remove(id);
                return;
            }
        }
        self.generation.fetch_add(1, Ordering::Release);
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
        let snap = crate::telemetry::metrics::Snapshot {
            vms_by_state: &counts,
            unmanaged_domains: self.unmanaged.read().unwrap().len() as u64,
            host_memory_total_bytes: facts.memory_total_mib * 1024 * 1024,
            host_memory_available_bytes: facts.memory_available_mib * 1024 * 1024,
            host_load1: facts.load[0],
            host_cpus: facts.cpus,
            change_seq: self.last_seq.load(Ordering::Relaxed) as i64,
            tls_cert_not_after: self.tls_not_after.get().copied(),
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

    /// Number of managed VMs.
    pub fn vm_count(&self) -> usize {
        self.vms.read().unwrap().len()
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// A caller for the admin on the local socket.
    pub fn local_admin(uid: u32) -> Caller {
        Caller { name: format!("local:uid={uid}"), token_id: None, role: crate::types::Role::Admin }
    }
}
