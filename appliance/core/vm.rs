//! VM commands: create, update, delete and lifecycle actions.

use super::{Core, CoreError, Reply, Result, VmAction};
use crate::hypervisor::xml::{disk_target, DomainSpec};
use crate::hypervisor::{disks, DomainState};
use crate::store::{now_ms, Change, VmRecord};
use crate::types::{valid_name, Disk, Nic, NicView, Vm, VmCreate, VmPatch, VmState, AUTOSTART_PRIORITIES};
use crate::util::rfc3339;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

const MAX_VCPUS: u32 = 256;
const MIN_MEMORY_MIB: u64 = 16;
const MAX_MEMORY_MIB: u64 = 4 * 1024 * 1024;
pub(super) const MAX_DISK_GIB: u64 = 64 * 1024;
pub(super) const MAX_DISKS: usize = 16;
const MAX_CMDLINE: usize = 4096;
pub(super) const GIB: u64 = 1024 * 1024 * 1024;
/// cloud-init user-data, meta-data and network-config together.
const MAX_CLOUD_INIT: usize = 64 * 1024;
const MAX_SHUTDOWN_TIMEOUT: u64 = 86_400;

/// A validated create request: each disk's size and optional base image,
/// and the boot spec with its paths resolved.
type CreatePlan = (Vec<PlannedDisk>, Option<crate::types::BootSpec>);

/// One disk to make: blank of `size`, an overlay on `base`, or (`copy`) a
/// full copy of `base`.
#[derive(Debug, Clone)]
pub(super) struct PlannedDisk {
    pub size: u64,
    pub base: Option<(PathBuf, String)>,
    pub copy: bool,
}

/// The limits shared by create and edit; `None` means "not given".
fn check_limits(
    vcpus: Option<u32>,
    memory_mib: Option<u64>,
    shutdown_timeout: Option<u64>,
    autostart_priority: Option<i32>,
) -> Result<()> {
    if vcpus.is_some_and(|v| v == 0 || v > MAX_VCPUS) {
        return Err(CoreError::invalid("vcpus", format!("must be between 1 and {MAX_VCPUS}")));
    }
    if memory_mib.is_some_and(|m| !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&m)) {
        return Err(CoreError::invalid(
            "memory_mib",
            format!("must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}"),
        ));
    }
    if shutdown_timeout.is_some_and(|t| t == 0 || t > MAX_SHUTDOWN_TIMEOUT) {
        return Err(CoreError::invalid(
            "shutdown_timeout_secs",
            format!("must be between 1 and {MAX_SHUTDOWN_TIMEOUT}"),
        ));
    }
    if autostart_priority.is_some_and(|p| !AUTOSTART_PRIORITIES.contains(&p)) {
        return Err(CoreError::invalid(
            "autostart_priority",
            format!(
                "must be between {} and {} (higher starts first)",
                AUTOSTART_PRIORITIES.start(),
                AUTOSTART_PRIORITIES.end()
            ),
        ));
    }
    Ok(())
}

pub(super) fn vm_state(s: DomainState) -> VmState {
    match s {
        DomainState::Running => VmState::Running,
        DomainState::Paused => VmState::Paused,
        DomainState::ShuttingDown => VmState::ShuttingDown,
        DomainState::Stopped => VmState::Stopped,
        DomainState::Crashed => VmState::Crashed,
        DomainState::Suspended => VmState::Suspended,
        DomainState::Unknown => VmState::Unknown,
    }
}

impl Core {
    /// The state to show: a running VM with an ACPI shutdown in flight is
    /// shutting down.
    pub(super) fn shown_state(&self, vm: &VmRecord) -> VmState {
        if vm.state == VmState::Running && self.shutting_down.lock().unwrap().contains_key(&vm.id) {
            VmState::ShuttingDown
        } else {
            vm.state
        }
    }

    /// The graceful shutdown limit for `vm`.
    pub(super) fn shutdown_timeout(&self, vm: &VmRecord) -> u64 {
        vm.shutdown_timeout_secs.unwrap_or(self.cfg.hypervisor.shutdown_timeout_secs)
    }

    pub(super) fn view(&self, vm: &VmRecord) -> Vm {
        Vm {
            id: vm.id,
            name: vm.name.clone(),
            state: self.shown_state(vm),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            disks: vm.disks.clone(),
            boot: vm.boot.clone(),
            nics: vm
                .nics
                .iter()
                .map(|n| NicView {
                    network: n.network.clone(),
                    mac: n.mac.clone(),
                    ip: self.lease_for(&n.mac),
                })
                .collect(),
            cloud_init: vm.cloud_init.is_some(),
            autostart: vm.autostart,
            autostart_priority: vm.autostart_priority,
            shutdown_timeout_secs: self.shutdown_timeout(vm),
            managed: true,
            owner_node: Some(vm.owner_node),
            epoch: vm.epoch,
            replication: vm.replication.map(|r| self.kept_replica_view(vm, self.replication_view(vm, r))),
            created_at: rfc3339(vm.created_at),
            updated_at: rfc3339(vm.updated_at),
        }
    }

    fn unmanaged_view(d: &crate::hypervisor::DomainInfo) -> Vm {
        Vm {
            id: d.uuid,
            name: d.name.clone(),
            state: vm_state(d.state),
            vcpus: d.vcpus,
            memory_mib: d.memory_mib,
            disks: Vec::new(),
            boot: None,
            nics: Vec::new(),
            cloud_init: false,
            autostart: false,
            autostart_priority: 0,
            shutdown_timeout_secs: 0,
            managed: false,
            owner_node: None,
            epoch: 0,
            replication: None,
            created_at: rfc3339(0),
            updated_at: rfc3339(0),
        }
    }

    /// All VMs, managed first, sorted by name; rebuilt only when the
    /// generation moved.
    pub(super) fn vm_list(&self) -> (u64, Arc<Vec<Vm>>) {
        let generation = self.generation.load(Ordering::Acquire);
        if let Some((g, list)) = self.list_cache.lock().unwrap().as_ref() {
            if *g == generation {
                return (*g, list.clone());
            }
        }
        let mut vms: Vec<Vm> = self.vms.read().unwrap().values().map(|v| self.view(v)).collect();
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        let mut unmanaged: Vec<Vm> =
            self.unmanaged.read().unwrap().iter().map(Self::unmanaged_view).collect();
        unmanaged.sort_by(|a, b| a.name.cmp(&b.name));
        vms.extend(unmanaged);
        let list = Arc::new(vms);
        *self.list_cache.lock().unwrap() = Some((generation, list.clone()));
        (generation, list)
    }

    /// Finds a managed VM by UUID or name.
    pub(super) fn find_record(&self, r: &str) -> Result<VmRecord> {
        let vms = self.vms.read().unwrap();
        let found = match Uuid::parse_str(r) {
            Ok(id) => vms.get(&id).cloned(),
            Err(_) => vms.values().find(|v| v.name == r).cloned(),
        };
        match found {
            Some(vm) => Ok(vm),
            None if self.find_unmanaged(r).is_some() => Err(CoreError::Unmanaged(r.to_string())),
            None => Err(CoreError::NotFound(format!("VM {r:?}"))),
        }
    }

    fn find_unmanaged(&self, r: &str) -> Option<crate::hypervisor::DomainInfo> {
        let id = Uuid::parse_str(r).ok();
        self.unmanaged.read().unwrap().iter().find(|d| Some(d.uuid) == id || d.name == r).cloned()
    }

    pub(super) fn find_vm(&self, r: &str) -> Result<Vm> {
        match self.find_record(r) {
            Ok(vm) => Ok(self.view(&vm)),
            Err(CoreError::Unmanaged(_)) => {
                Ok(Self::unmanaged_view(&self.find_unmanaged(r).expect("just found")))
            }
            Err(e) => Err(e),
        }
    }

    /// Resolves a host path from a VM spec. It must name a regular file
    /// that, after following links, lies inside one of `allowed`: libvirt
    /// relabels what it hands to QEMU, so an arbitrary path would let any
    /// operator take over host files. Every refusal has the same answer, so
    /// that it tells nothing about files outside the folders (whether they
    /// exist, are folders, or are the target of a link).
    pub(super) fn resolve_host_file(&self, field: &str, value: &str, allowed: &[&Path]) -> Result<PathBuf> {
        let dirs: Vec<String> = allowed.iter().map(|d| d.display().to_string()).collect();
        let refused =
            || CoreError::invalid(field, format!("must name an existing file inside {}", dirs.join(" or ")));
        if value.is_empty() || value.contains('\0') {
            return Err(refused());
        }
        let p = Path::new(value);
        let p = if p.is_absolute() { p.to_path_buf() } else { allowed[0].join(p) };
        let real = std::fs::canonicalize(&p).map_err(|_| refused())?;
        let inside =
            allowed.iter().filter_map(|dir| std::fs::canonicalize(dir).ok()).any(|dir| real.starts_with(dir));
        if !inside || !real.is_file() {
            return Err(refused());
        }
        Ok(real)
    }

    /// Checks one disk request and works out what to make.
    pub(super) fn plan_disk(&self, field: &str, d: &crate::types::DiskSpec) -> Result<PlannedDisk> {
        match (d.size_gib, &d.image) {
            (Some(size), None) => {
                if size == 0 || size > MAX_DISK_GIB {
                    return Err(CoreError::invalid(
                        format!("{field}.size_gib"),
                        format!("must be between 1 and {MAX_DISK_GIB}"),
                    ));
                }
                if d.copy {
                    return Err(CoreError::invalid(format!("{field}.copy"), "only applies to image disks"));
                }
                Ok(PlannedDisk { size: size * GIB, base: None, copy: false })
            }
            (None, Some(image)) => {
                let field = format!("{field}.image");
                let (path, format, size) = match self.image_record(image) {
                    Some(rec) => (PathBuf::from(&rec.path), rec.format, rec.virtual_size),
                    None => {
                        // A file placed under images/ by hand gets the same
                        // checks as an upload.
                        let path = self.resolve_host_file(&field, image, &[&self.paths.images])?;
                        let (format, size) = crate::images::inspect(&path)
                            .map_err(|e| CoreError::invalid(&field, e.to_string()))?;
                        (path, format, size)
                    }
                };
                Ok(PlannedDisk { size, base: Some((path, format)), copy: d.copy })
            }
            _ => Err(CoreError::invalid(field, "give exactly one of size_gib or image")),
        }
    }

    /// Makes the planned disk files of `vm` (copies first; blanks and
    /// overlays through `ensure_disks`).
    pub(super) fn make_disks(
        vm: &VmRecord,
        plan: &[PlannedDisk],
        seed: &Path,
    ) -> crate::hypervisor::Result<()> {
        for (disk, p) in vm.disks.iter().zip(plan) {
            if let (true, Some((base, format))) = (p.copy, &p.base) {
                let path = Path::new(&disk.path);
                if let Some(dir) = path.parent() {
                    crate::util::create_vm_dir(dir)
                        .map_err(|e| crate::hypervisor::HypervisorError::Disk(e.to_string()))?;
                }
                let copied = match vm.replication {
                    Some(_) => crate::images::copy_to_raw(base, format, path),
                    None => crate::images::copy_to_qcow2(base, format, path),
                };
                copied.map_err(|e| crate::hypervisor::HypervisorError::Disk(e.to_string()))?;
            }
        }
        Core::ensure_disks(vm, seed)
    }

    /// More vCPUs than the host has CPUs (times the configured overcommit)
    /// only make a guest slower: refused at create and edit.
    fn check_vcpus(&self, vcpus: Option<u32>) -> Result<()> {
        let Some(vcpus) = vcpus else { return Ok(()) };
        crate::host::admit_vcpus(vcpus, self.cfg.hypervisor.vcpu_overcommit).map_err(|max| {
            CoreError::invalid(
                "vcpus",
                format!(
                    "must be at most {max}: this host has {} CPUs and hypervisor.vcpu_overcommit is {}",
                    crate::host::online_cpus(),
                    self.cfg.hypervisor.vcpu_overcommit
                ),
            )
        })
    }

    /// Checks a create request completely before anything is changed.
    fn validate_create(&self, spec: &VmCreate) -> Result<CreatePlan> {
        valid_name(&spec.name).map_err(|m| CoreError::invalid("name", m))?;
        check_limits(
            Some(spec.vcpus),
            Some(spec.memory_mib),
            spec.shutdown_timeout_secs,
            Some(spec.autostart_priority),
        )?;
        self.check_vcpus(Some(spec.vcpus))?;
        if spec.disks.len() > MAX_DISKS {
            return Err(CoreError::invalid("disks", format!("at most {MAX_DISKS} disks")));
        }
        let mut disks = Vec::new();
        for (i, d) in spec.disks.iter().enumerate() {
            disks.push(self.plan_disk(&format!("disks[{i}]"), d)?);
        }
        let boot = match &spec.boot {
            None => None,
            Some(b) => {
                let dirs: [&Path; 2] = [&self.paths.boot, &self.paths.images];
                let kernel = self.resolve_host_file("boot.kernel", &b.kernel, &dirs)?;
                let initrd = match &b.initrd {
                    Some(i) => Some(self.resolve_host_file("boot.initrd", i, &dirs)?),
                    None => None,
                };
                if let Some(c) = &b.cmdline {
                    if c.len() > MAX_CMDLINE || c.chars().any(|ch| ch.is_control()) {
                        return Err(CoreError::invalid(
                            "boot.cmdline",
                            format!("must be at most {MAX_CMDLINE} printable characters"),
                        ));
                    }
                }
                Some(crate::types::BootSpec {
                    kernel: kernel.display().to_string(),
                    initrd: initrd.map(|p| p.display().to_string()),
                    cmdline: b.cmdline.clone(),
                })
            }
        };
        if let Some(n) = &spec.network {
            valid_name(n).map_err(|m| CoreError::invalid("network", m))?;
        }
        if let Some(ci) = &spec.cloud_init {
            let size = ci.user_data.len()
                + ci.meta_data.as_ref().map_or(0, String::len)
                + ci.network_config.as_ref().map_or(0, String::len);
            if size > MAX_CLOUD_INIT {
                return Err(CoreError::invalid(
                    "cloud_init",
                    format!("is {size} bytes; at most {MAX_CLOUD_INIT} bytes in all"),
                ));
            }
            if ci.user_data.contains('\0') {
                return Err(CoreError::invalid("cloud_init.user_data", "must be text"));
            }
        }
        Ok((disks, boot))
    }

    pub(super) fn domain_spec(&self, vm: &VmRecord) -> DomainSpec {
        DomainSpec {
            uuid: vm.id,
            name: vm.name.clone(),
            domain_type: self.cfg.hypervisor.domain_type.clone(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            disks: vm.disks.iter().map(|d| self.disk_source(vm, d)).collect(),
            nics: vm
                .nics
                .iter()
                .map(|n| crate::hypervisor::xml::Nic { network: n.network.clone(), mac: n.mac.clone() })
                .collect(),
            cdrom: vm.cloud_init.as_ref().map(|_| self.seed_path(vm.id)),
            kernel: vm.boot.as_ref().map(|b| PathBuf::from(&b.kernel)),
            initrd: vm.boot.as_ref().and_then(|b| b.initrd.as_ref().map(PathBuf::from)),
            cmdline: vm.boot.as_ref().and_then(|b| b.cmdline.clone()),
            serial_log: self.console_log(vm),
            node_id: self.node.id,
        }
    }

    /// The newest `bytes` of a VM's serial console log.
    pub(super) fn console_tail(&self, r: &str, bytes: u64) -> Result<bytes::Bytes> {
        use std::io::{Read, Seek, SeekFrom};
        let vm = self.find_record(r)?;
        let mut f = match std::fs::File::open(self.console_log(&vm)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(bytes::Bytes::new()),
            Err(e) => return Err(CoreError::Internal(format!("console log: {e}"))),
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let start = len.saturating_sub(bytes);
        f.seek(SeekFrom::Start(start)).map_err(|e| CoreError::Internal(e.to_string()))?;
        let mut buf = Vec::with_capacity((len - start) as usize);
        f.take(bytes).read_to_end(&mut buf).map_err(|e| CoreError::Internal(e.to_string()))?;
        Ok(bytes::Bytes::from(buf))
    }

    /// The cloud-init NoCloud seed ISO of a VM.
    pub fn seed_path(&self, id: Uuid) -> PathBuf {
        self.paths.disks.join(id.to_string()).join("cidata.iso")
    }

    /// Writes the seed ISO for `vm`'s cloud-init data. The default
    /// meta-data names the VM and uses its UUID as instance-id, so a clone
    /// (new UUID) runs cloud-init afresh.
    pub(super) fn build_seed(vm: &VmRecord, dest: &Path) -> crate::hypervisor::Result<()> {
        let Some(ci) = &vm.cloud_init else { return Ok(()) };
        let meta = ci
            .meta_data
            .clone()
            .unwrap_or_else(|| format!("instance-id: {}\nlocal-hostname: {}\n", vm.id, vm.name));
        let mut files: Vec<(&str, &[u8])> =
            vec![("user-data", ci.user_data.as_bytes()), ("meta-data", meta.as_bytes())];
        if let Some(n) = &ci.network_config {
            files.push(("network-config", n.as_bytes()));
        }
        if let Some(dir) = dest.parent() {
            crate::util::create_vm_dir(dir)
                .map_err(|e| crate::hypervisor::HypervisorError::Disk(e.to_string()))?;
        }
        crate::images::build_seed(dest, &files)
            .map_err(|e| crate::hypervisor::HypervisorError::Disk(e.to_string()))
    }

    /// `logs/NAME.UUID.console.log`: the name first, so that
    /// `tail -f logs/NAME.*` finds it; the UUID keeps a later VM of the same
    /// name from appending to it.
    pub fn console_log(&self, vm: &VmRecord) -> PathBuf {
        self.paths.logs.join(format!("{}.{}.console.log", vm.name, vm.id))
    }

    /// Moves a log from before VMs' names were in the file name
    /// (`UUID.console.log`) to its current name; called while the VM is
    /// stopped, so nothing writes to it.
    fn adopt_old_console_log(&self, vm: &VmRecord) {
        let old = self.paths.logs.join(format!("{}.console.log", vm.id));
        let new = self.console_log(vm);
        if old.exists() && !new.exists() {
            if let Err(e) = std::fs::rename(&old, &new) {
                tracing::warn!(VM_ID = %vm.id, error = %e, "cannot rename the console log");
            }
        }
    }

    /// Creates any disk file of `vm` that does not exist yet, and its
    /// cloud-init seed.
    pub(super) fn ensure_disks(vm: &VmRecord, seed: &Path) -> crate::hypervisor::Result<()> {
        if vm.cloud_init.is_some() && !seed.exists() {
            Core::build_seed(vm, seed)?;
        }
        for d in &vm.disks {
            let path = Path::new(&d.path);
            if path.exists() {
                continue;
            }
            if let Some(dir) = path.parent() {
                crate::util::create_vm_dir(dir)
                    .map_err(|e| crate::hypervisor::HypervisorError::Disk(e.to_string()))?;
            }
            match (&d.image, vm.replication) {
                (Some(base), _) => disks::create_overlay(path, Path::new(base))?,
                (None, Some(_)) => disks::create_blank_raw(path, d.size_bytes)?,
                (None, None) => disks::create_blank(path, d.size_bytes)?,
            }
        }
        Ok(())
    }

    pub(super) fn remove_disks(dir: &Path) {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %dir.display(), error = %e, "cannot remove VM disks");
            }
        }
    }

    pub(super) async fn create_vm(self: &Arc<Self>, spec: VmCreate) -> Result<Vm> {
        let core = self.clone();
        let spec2 = spec.clone();
        let (disk_plan, boot) = tokio::task::spawn_blocking(move || core.validate_create(&spec2))
            .await
            .map_err(|e| CoreError::Internal(e.to_string()))??;
        if let Some(n) = &spec.network {
            if !self.network_exists(n).await? {
                return Err(CoreError::NotFound(format!("network {n:?}")));
            }
        }
        let _create = self.create_lock.lock().await;
        let taken = self.vms.read().unwrap().values().any(|v| v.name == spec.name)
            || self.unmanaged.read().unwrap().iter().any(|d| d.name == spec.name);
        if taken {
            return Err(CoreError::NameTaken(spec.name));
        }
        let id = Uuid::new_v4();
        let _guard = self.lock_vm(id, &spec.name).await?;
        let dir = self.paths.disks.join(id.to_string());
        let replication = self.plan_replication(spec.replication)?;
        // Data-plane disks are raw files, always full copies of an image.
        let ext = if replication.is_some() { "raw" } else { "qcow2" };
        let disk_plan: Vec<PlannedDisk> = match replication {
            Some(_) => disk_plan.into_iter().map(|p| PlannedDisk { copy: p.base.is_some(), ..p }).collect(),
            None => disk_plan,
        };
        let now = now_ms();
        let mut vm = VmRecord {
            id,
            name: spec.name.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            disks: disk_plan
                .iter()
                .enumerate()
                .map(|(i, p)| Disk {
                    device: disk_target(i),
                    path: dir.join(format!("{}.{ext}", disk_target(i))).display().to_string(),
                    size_bytes: p.size,
                    // A copy does not depend on its image afterwards.
                    image: p.base.as_ref().filter(|_| !p.copy).map(|(b, _)| b.display().to_string()),
                })
                .collect(),
            boot,
            nics: spec
                .network
                .iter()
                .map(|n| Nic { network: n.clone(), mac: crate::hypervisor::xml::random_mac() })
                .collect(),
            cloud_init: spec.cloud_init.clone(),
            shutdown_timeout_secs: spec.shutdown_timeout_secs,
            autostart: spec.autostart,
            autostart_priority: spec.autostart_priority,
            owner_node: self.node.id,
            epoch: 1,
            replication,
            // Recorded first as an intent: if the daemon dies before libvirt
            // has the domain, reconciliation finishes the job.
            state: VmState::Missing,
            created_at: now,
            updated_at: now,
        };
        self.define_new(&mut vm, disk_plan).await?;
        tracing::info!(VM_ID = %id, VM_NAME = %vm.name, "VM created");
        Ok(self.view(&vm))
    }

    /// Records a new VM (first as an intent, state `missing`, so an
    /// interrupted create is finished by reconciliation), makes its disk
    /// files and defines it in libvirt. Undoes everything on failure.
    pub(super) async fn define_new(&self, vm: &mut VmRecord, plan: Vec<PlannedDisk>) -> Result<()> {
        let id = vm.id;
        self.commit(Change::VmPut(vm.clone())).await?;
        let xml = crate::hypervisor::xml::domain_xml(&self.domain_spec(vm));
        let (record, seed) = (vm.clone(), self.seed_path(id));
        let made = self
            .hv_call(move |hv| {
                Core::make_disks(&record, &plan, &seed)?;
                hv.define(&xml)
            })
            .await;
        if let Err(e) = made {
            Self::remove_disks(&self.paths.disks.join(id.to_string()));
            let _ = self.commit(Change::VmDelete { id }).await;
            return Err(e);
        }
        vm.state = VmState::Stopped;
        self.record_state(id, vm.state).await?;
        vm.updated_at = self.vms.read().unwrap().get(&id).map_or(vm.updated_at, |v| v.updated_at);
        Ok(())
    }

    pub(super) async fn update_vm(self: &Arc<Self>, r: &str, patch: VmPatch) -> Result<Vm> {
        check_limits(patch.vcpus, patch.memory_mib, patch.shutdown_timeout_secs, patch.autostart_priority)?;
        self.check_vcpus(patch.vcpus)?;
        let (_guard, mut vm) = self.owned_vm(r).await?;
        let resizes = patch.vcpus.is_some_and(|v| v != vm.vcpus)
            || patch.memory_mib.is_some_and(|m| m != vm.memory_mib);
        if resizes && vm.state.is_active() {
            return Err(CoreError::WrongState {
                vm: vm.name,
                state: vm.state.as_str(),
                action: "change vcpus or memory",
            });
        }
        vm.vcpus = patch.vcpus.unwrap_or(vm.vcpus);
        vm.memory_mib = patch.memory_mib.unwrap_or(vm.memory_mib);
        vm.autostart = patch.autostart.unwrap_or(vm.autostart);
        vm.autostart_priority = patch.autostart_priority.unwrap_or(vm.autostart_priority);
        vm.shutdown_timeout_secs = patch.shutdown_timeout_secs.or(vm.shutdown_timeout_secs);
        vm.updated_at = now_ms();
        if resizes {
            let xml = crate::hypervisor::xml::domain_xml(&self.domain_spec(&vm));
            self.hv_call(move |hv| hv.define(&xml)).await?;
        }
        self.commit(Change::VmPut(vm.clone())).await?;
        Ok(self.view(&vm))
    }

    pub(super) async fn delete_vm(self: &Arc<Self>, r: &str, force: bool) -> Result<()> {
        let found = self.find_record(r)?;
        if self.is_kept_replica(&found) {
            return self.delete_kept_replica(found, force).await;
        }
        let (_guard, vm) = self.owned_vm(r).await?;
        let id = vm.id;
        let live = self.hv_call(move |hv| hv.state(id)).await?;
        let active = live.map(vm_state).is_some_and(VmState::is_active);
        if active && !force {
            return Err(CoreError::WrongState {
                vm: vm.name,
                state: vm_state(live.unwrap()).as_str(),
                action: "delete (stop it first or use force)",
            });
        }
        self.hv_call(move |hv| {
            if active {
                match hv.destroy(id) {
                    Ok(()) | Err(crate::hypervisor::HypervisorError::WrongState(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            match hv.undefine(id) {
                Ok(()) | Err(crate::hypervisor::HypervisorError::NoDomain(_)) => Ok(()),
                Err(e) => Err(e),
            }
        })
        .await?;
        self.commit(Change::VmDelete { id }).await?;
        if vm.replication.is_some() {
            // The export goes before its file. A data plane that does not
            // answer is reconciled later: the export of a missing file
            // only reports an error.
            if let Err(e) = self.sync_dataplane().await {
                tracing::warn!(VM_ID = %id, error = %e, "the data plane did not drop the VM's disks");
            }
        }
        Self::remove_disks(&self.paths.disks.join(id.to_string()));
        self.collect_bases();
        let _ = std::fs::remove_file(self.console_log(&vm));
        self.vm_locks.lock().unwrap().remove(&id);
        self.shutting_down.lock().unwrap().remove(&id);
        tracing::info!(VM_ID = %id, VM_NAME = %vm.name, "VM deleted");
        Ok(())
    }

    /// Reads the domain's state from libvirt and records it if it changed.
    pub(super) async fn refresh_state(&self, id: Uuid) -> Result<VmState> {
        // Asked under the lock too: a state read before an operation
        // recorded a newer one must not be recorded after it (a late
        // lifecycle event announced a start again after the stop).
        let _serial = self.state_lock.lock().await;
        let live = self.hv_call(move |hv| hv.state(id)).await?;
        let state = live.map(vm_state).unwrap_or(VmState::Missing);
        self.record_state_locked(id, state).await?;
        Ok(state)
    }

    /// Records an observed state of a managed VM unless it is already the
    /// recorded one. Checked and committed under `state_lock`, so a change
    /// seen twice at once (the operation and its libvirt event) is recorded
    /// and announced once.
    pub(super) async fn record_state(&self, id: Uuid, state: VmState) -> Result<()> {
        let _serial = self.state_lock.lock().await;
        self.record_state_locked(id, state).await
    }

    async fn record_state_locked(&self, id: Uuid, state: VmState) -> Result<()> {
        if !state.is_active() {
            self.shutting_down.lock().unwrap().remove(&id);
        }
        let current = self.vms.read().unwrap().get(&id).map(|v| v.state);
        if current.is_some() && current != Some(state) {
            self.commit(Change::VmState { id, state, at: now_ms() }).await?;
        }
        Ok(())
    }

    pub(super) async fn vm_action(self: &Arc<Self>, r: &str, action: VmAction) -> Result<Reply> {
        let (guard, found) = self.owned_vm(r).await?;
        let id = found.id;
        let name = found.name.clone();
        let state = self.refresh_state(id).await?;
        let wrong = |state: VmState| CoreError::WrongState {
            vm: name.clone(),
            state: state.as_str(),
            action: action.name().trim_start_matches("vm."),
        };
        match action {
            VmAction::Start => {
                if state.is_active() {
                    return Err(wrong(state));
                }
                if state == VmState::Missing {
                    return Err(CoreError::NotReady(format!("VM {name} is not defined in libvirt yet")));
                }
                crate::host::admit(found.memory_mib, self.cfg.hypervisor.memory_reserve_mib).map_err(
                    |(available_mib, reserve_mib)| CoreError::InsufficientMemory {
                        vm: name.clone(),
                        need_mib: found.memory_mib,
                        available_mib,
                        reserve_mib,
                    },
                )?;
                self.adopt_old_console_log(&found);
                self.still_owned(&found)?;
                if found.replication.is_some() && self.peer_link_up() {
                    // The peer may hold it at a newer epoch that has not
                    // reached this node yet (it took the VM over).
                    match self.peer_allows_start(&found).await {
                        Ok(false) => {
                            let now = found.epoch + 1;
                            return Err(CoreError::StaleEpoch { vm: name.clone(), had: found.epoch, now });
                        }
                        Ok(true) => {}
                        Err(e) => {
                            tracing::warn!(VM_ID = %id, error = %e, "the peer did not say whether it holds this VM; starting it")
                        }
                    }
                }
                if found.replication.is_some() {
                    // Its disks must be served before QEMU opens them.
                    Core::ensure_disks(&found, &self.seed_path(id))?;
                    self.sync_dataplane().await?;
                }
                // Redefine first so the domain always matches the spec.
                let xml = crate::hypervisor::xml::domain_xml(&self.domain_spec(&found));
                let record = found.clone();
                let seed = self.seed_path(id);
                self.hv_call(move |hv| {
                    Core::ensure_disks(&record, &seed)?;
                    hv.define(&xml)?;
                    hv.start(id)
                })
                .await?;
            }
            VmAction::Stop => {
                if !state.is_active() {
                    return Err(wrong(state));
                }
                self.hv_call(move |hv| hv.destroy(id)).await?;
            }
            VmAction::Reboot => {
                if state != VmState::Running {
                    return Err(wrong(state));
                }
                self.hv_call(move |hv| hv.reboot(id)).await?;
            }
            VmAction::Pause => {
                if state != VmState::Running {
                    return Err(wrong(state));
                }
                self.hv_call(move |hv| hv.suspend(id)).await?;
            }
            VmAction::Resume => {
                if state != VmState::Paused {
                    return Err(wrong(state));
                }
                self.hv_call(move |hv| hv.resume(id)).await?;
            }
            VmAction::Shutdown { wait, timeout } => {
                if !matches!(state, VmState::Running | VmState::ShuttingDown) {
                    return Err(wrong(state));
                }
                self.hv_call(move |hv| hv.shutdown(id)).await?;
                self.set_shutting_down(id, true);
                drop(guard);
                // The VM's own graceful-shutdown limit applies when the
                // request names none.
                let timeout = timeout.or(found.shutdown_timeout_secs).map(Duration::from_secs);
                // The deadline is durable before the request is answered: a
                // restarted daemon still forces the guest off (resume_shutdowns).
                if let Some(t) = timeout {
                    let force_at = crate::util::now_ms() + t.as_millis() as i64;
                    self.store_call(move |s| s.set_pending_shutdown(id, force_at)).await?;
                }
                let watcher = tokio::spawn(self.clone().follow_shutdown(id, timeout));
                if let Some(wait) = wait {
                    let deadline = Instant::now() + Duration::from_secs(wait);
                    while Instant::now() < deadline {
                        if !self.refresh_state(id).await?.is_active() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                let vm = self.find_record(&id.to_string())?;
                drop(watcher);
                return Ok(if vm.state.is_active() {
                    Reply::Accepted(Box::new(self.view(&vm)))
                } else {
                    Reply::Vm(Box::new(self.view(&vm)))
                });
            }
        }
        self.refresh_state(id).await?;
        let vm = self.find_record(&id.to_string())?;
        drop(guard);
        Ok(Reply::Vm(Box::new(self.view(&vm))))
    }

    /// Marks `vm` as shutting down (shown instead of running) or not, and
    /// announces the change.
    pub(super) fn set_shutting_down(&self, id: Uuid, on: bool) {
        let changed = {
            let mut set = self.shutting_down.lock().unwrap();
            if on {
                set.insert(id, ()).is_none()
            } else {
                set.remove(&id).is_some()
            }
        };
        if changed {
            self.generation.fetch_add(1, Ordering::Release);
            if let Some(vm) = self.vms.read().unwrap().get(&id) {
                self.publish_state(vm);
            }
        }
    }

    /// [`Core::watch_shutdown`], then drops the durable deadline (the guest
    /// is off, was forced off, or is gone).
    async fn follow_shutdown(self: Arc<Self>, id: Uuid, timeout: Option<Duration>) {
        self.clone().watch_shutdown(id, timeout).await;
        if timeout.is_some() {
            if let Err(e) = self.store_call(move |s| s.clear_pending_shutdown(id)).await {
                tracing::warn!(VM_ID = %id, "cannot clear the forced shutdown: {e}");
            }
        }
    }

    /// Resumes the forced shutdowns a stopped or crashed daemon left due:
    /// a guest still on is shown shutting down again and forced off at its
    /// deadline (at once when that passed); the others are dropped.
    pub async fn resume_shutdowns(self: &Arc<Self>) {
        let due = match self.store_call(|s| s.pending_shutdowns()).await {
            Ok(due) => due,
            Err(e) => return tracing::warn!("cannot read the forced shutdowns due: {e}"),
        };
        let now = crate::util::now_ms();
        for (id, force_at) in due {
            let active = self.refresh_state(id).await.is_ok_and(|s| s.is_active());
            let owned = self.vms.read().unwrap().get(&id).is_some_and(|vm| self.owns(vm));
            if !(active && owned) {
                let _ = self.store_call(move |s| s.clear_pending_shutdown(id)).await;
                continue;
            }
            let left = Duration::from_millis(force_at.saturating_sub(now).max(0) as u64);
            tracing::info!(VM_ID = %id, seconds_left = left.as_secs(), "forced shutdown still due: following it again");
            self.set_shutting_down(id, true);
            tokio::spawn(self.clone().follow_shutdown(id, Some(left)));
        }
    }

    /// Follows an ACPI shutdown until the guest is off; forces it off after
    /// `timeout` if one was given, else gives up following after
    /// `hypervisor.shutdown_timeout_secs`. Pausing and resuming the VM in
    /// between (as `backup create --pause-running` does) changes neither.
    async fn watch_shutdown(self: Arc<Self>, id: Uuid, timeout: Option<Duration>) {
        let started = Instant::now();
        let give_up = Duration::from_secs(self.cfg.hypervisor.shutdown_timeout_secs);
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            match self.refresh_state(id).await {
                Ok(s) if !s.is_active() => return,
                Err(CoreError::NotFound(_)) => return,
                _ => {}
            }
            if !self.shutting_down.lock().unwrap().contains_key(&id) {
                return;
            }
            match timeout {
                Some(t) if started.elapsed() >= t => {
                    let (_guard, vm) = match self.owned_vm(&id.to_string()).await {
                        Ok(owned) => owned,
                        Err(CoreError::Busy(_)) => continue,
                        // Gone, or no longer ours: nothing to force.
                        Err(_) => return,
                    };
                    tracing::warn!(VM_ID = %id, VM_NAME = %vm.name, "guest did not shut down in time; forcing it off");
                    if let Err(e) = self.hv_call(move |hv| hv.destroy(id)).await {
                        tracing::error!(VM_ID = %id, VM_NAME = %vm.name, error = %e, "cannot force the guest off");
                    }
                    let _ = self.refresh_state(id).await;
                    return;
                }
                // The forced shutdown is due later: keep following, however
                // long that is.
                Some(_) => {}
                // Without a timeout the guest may ignore the request; stop
                // showing it as shutting down after the configured wait.
                None if started.elapsed() > give_up => {
                    self.set_shutting_down(id, false);
                    return;
                }
                None => {}
            }
        }
    }
}
