//! Disk commands (attach, detach, resize) and VM cloning.

use super::vm::{PlannedDisk, GIB, MAX_DISKS, MAX_DISK_GIB};
use super::{Core, CoreError, Result};
use crate::hypervisor::xml::disk_target;
use crate::hypervisor::HypervisorError;
use crate::store::{now_ms, Change, VmRecord};
use crate::types::{valid_name, Disk, DiskResize, DiskSpec, Nic, Vm, VmClone, VmState};

/// How long a guest may take to release a hot-unplugged data-plane disk.
const UNPLUG_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
use std::path::{Path, PathBuf};
use std::sync::Arc;
use uuid::Uuid;

fn disk_err(e: impl std::fmt::Display) -> HypervisorError {
    HypervisorError::Disk(e.to_string())
}

impl Core {
    pub(super) async fn attach_disk(self: &Arc<Self>, r: &str, spec: DiskSpec) -> Result<Vm> {
        // Checked before the (slow) plan, so a replica is refused at once.
        let found = self.find_owned(r)?;
        let replicated = found.replication.is_some();
        let plan = {
            let core = self.clone();
            tokio::task::spawn_blocking(move || core.plan_disk("disk", &spec))
                .await
                .map_err(|e| CoreError::Internal(e.to_string()))??
        };
        // A data-plane disk is a raw file, a full copy of its image.
        let plan = PlannedDisk { copy: plan.copy || (replicated && plan.base.is_some()), ..plan };
        let (_guard, vm) = self.owned_vm(r).await?;
        if vm.replication.is_some() != replicated {
            return Err(CoreError::Busy(vm.name));
        }
        if vm.disks.len() >= MAX_DISKS {
            return Err(CoreError::invalid("disk", format!("a VM has at most {MAX_DISKS} disks")));
        }
        let device =
            (0..).map(disk_target).find(|d| !vm.disks.iter().any(|x| &x.device == d)).expect("a free name");
        let ext = if replicated { "raw" } else { "qcow2" };
        let path = self.paths.disks.join(vm.id.to_string()).join(format!("{device}.{ext}"));
        let disk = Disk {
            device: device.clone(),
            path: path.display().to_string(),
            size_bytes: plan.size,
            image: plan.base.as_ref().filter(|_| !plan.copy).map(|(b, _)| b.display().to_string()),
        };
        let mut with_disk = vm.clone();
        with_disk.disks.push(disk.clone());
        if replicated {
            return self.attach_dataplane_disk(vm, with_disk, plan).await;
        }
        let live = self.refresh_state(vm.id).await?.is_active();
        // A stopped VM is simply redefined with the new disk; a running one
        // gets it hot-plugged (and in its saved definition).
        let xml = crate::hypervisor::xml::domain_xml(&self.domain_spec(&with_disk));
        let (id, p, dev) = (vm.id, path.clone(), device.clone());
        let (single, seed) = (VmRecord { disks: vec![disk.clone()], ..vm.clone() }, self.seed_path(vm.id));
        let result = self
            .hv_call(move |hv| {
                Core::make_disks(&single, &[plan], &seed)?;
                if live {
                    hv.attach_disk(id, &crate::hypervisor::xml::DiskSource::File(p), &dev, true)
                } else {
                    hv.define(&xml)
                }
            })
            .await;
        if let Err(e) = result {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        with_disk.updated_at = now_ms();
        self.commit(Change::VmPut(with_disk.clone())).await?;
        Ok(self.view(&with_disk))
    }

    pub(super) async fn detach_disk(self: &Arc<Self>, r: &str, device: &str) -> Result<Vm> {
        let (_guard, mut vm) = self.owned_vm(r).await?;
        let idx = vm
            .disks
            .iter()
            .position(|d| d.device == device)
            .ok_or_else(|| CoreError::NotFound(format!("disk {device:?} of VM {}", vm.name)))?;
        let live = self.refresh_state(vm.id).await?.is_active();
        let disk = vm.disks.remove(idx);
        let xml = crate::hypervisor::xml::domain_xml(&self.domain_spec(&vm));
        let (id, dev) = (vm.id, device.to_string());
        self.hv_call(move |hv| if live { hv.detach_disk(id, &dev, true) } else { hv.define(&xml) }).await?;
        if live && vm.replication.is_some() {
            self.await_unplug(&vm, &disk).await?;
        }
        vm.updated_at = now_ms();
        self.commit(Change::VmPut(vm.clone())).await?;
        let mut files = vec![PathBuf::from(&disk.path)];
        if vm.replication.is_some() {
            // The export goes before its file; the peer removes its replica
            // when this record reaches it.
            if let Err(e) = self.sync_dataplane().await {
                tracing::warn!(VM_ID = %vm.id, error = %e, "the data plane did not drop the detached disk");
            }
            let p = Path::new(&disk.path);
            files.push(crate::dataplane::meta::meta_path(p));
        }
        for f in files {
            if let Err(e) = std::fs::remove_file(&f) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(VM_ID = %vm.id, path = %f.display(), error = %e, "cannot remove a detached disk");
                }
            }
        }
        tracing::info!(VM_ID = %vm.id, device, "disk detached");
        Ok(self.view(&vm))
    }

    /// Grows a disk: live through libvirt when the VM runs, with qemu-img
    /// when it is stopped. Shrinking would destroy data and is refused.
    pub(super) async fn resize_disk(self: &Arc<Self>, r: &str, device: &str, req: DiskResize) -> Result<Vm> {
        if req.size_gib == 0 || req.size_gib > MAX_DISK_GIB {
            return Err(CoreError::invalid("size_gib", format!("must be between 1 and {MAX_DISK_GIB}")));
        }
        let (_guard, mut vm) = self.owned_vm(r).await?;
        self.stopped_for_dataplane_disks(
            &vm,
            "resize a disk of a replicated VM while it runs (stop it first)",
        )
        .await?;
        let replicated = vm.replication.is_some();
        let (id, name) = (vm.id, vm.name.clone());
        let disk = vm
            .disks
            .iter_mut()
            .find(|d| d.device == device)
            .ok_or_else(|| CoreError::NotFound(format!("disk {device:?} of VM {name}")))?;
        let bytes = req.size_gib * GIB;
        if bytes <= disk.size_bytes {
            return Err(CoreError::invalid(
                "size_gib",
                format!("disks only grow: {device} is already {}", gib_text(disk.size_bytes)),
            ));
        }
        let live = self.refresh_state(id).await?.is_active();
        let (dev, path) = (device.to_string(), disk.path.clone());
        self.hv_call(move |hv| {
            if replicated {
                // A raw file grows sparse; the data plane grows the replica
                // when the primary attaches with the new size.
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(bytes).and_then(|()| f.sync_all()))
                    .map_err(|e| disk_err(format!("{path}: {e}")))
            } else if live {
                hv.block_resize(id, &dev, bytes)
            } else {
                crate::hypervisor::disks::resize(Path::new(&path), bytes)
            }
        })
        .await?;
        disk.size_bytes = bytes;
        vm.updated_at = now_ms();
        self.commit(Change::VmPut(vm.clone())).await?;
        if replicated {
            if let Err(e) = self.sync_dataplane().await {
                tracing::warn!(VM_ID = %vm.id, error = %e, "the data plane did not take the new disk size yet");
            }
        }
        Ok(self.view(&vm))
    }

    /// Clones a stopped VM: new UUID and MACs, disks as full copies or as
    /// overlays. For overlays, each source disk is frozen into a shared,
    /// read-only base and both VMs continue on fresh overlays of it, so
    /// neither can change what the other sees.
    pub(super) async fn clone_vm(self: &Arc<Self>, r: &str, req: VmClone) -> Result<Vm> {
        valid_name(&req.name).map_err(|m| CoreError::invalid("name", m))?;
        self.refuse_on_dataplane_disks(&self.find_owned(r)?, "cloning")?;
        let _create = self.create_lock.lock().await;
        if self.vms.read().unwrap().values().any(|v| v.name == req.name)
            || self.unmanaged.read().unwrap().iter().any(|d| d.name == req.name)
        {
            return Err(CoreError::NameTaken(req.name));
        }
        let (_guard, mut src) = self.owned_vm(r).await?;
        let state = self.refresh_state(src.id).await?;
        if state != VmState::Stopped {
            return Err(CoreError::WrongState {
                vm: src.name,
                state: state.as_str(),
                action: "clone (stop it first)",
            });
        }
        if !req.copy && self.snapshots.read().unwrap().iter().any(|s| s.vm_id == src.id) {
            return Err(CoreError::WrongState {
                vm: src.name,
                state: "snapshotted",
                action: "clone as overlays (its snapshots live in its disks); clone with copy",
            });
        }
        let id = Uuid::new_v4();
        let dir = self.paths.disks.join(id.to_string());
        let now = now_ms();
        let mut clone = VmRecord {
            id,
            name: req.name.clone(),
            disks: src
                .disks
                .iter()
                .map(|d| Disk {
                    device: d.device.clone(),
                    path: dir.join(format!("{}.qcow2", d.device)).display().to_string(),
                    size_bytes: d.size_bytes,
                    image: None,
                })
                .collect(),
            nics: src
                .nics
                .iter()
                .map(|n| Nic { network: n.network.clone(), mac: crate::hypervisor::xml::random_mac() })
                .collect(),
            autostart: false,
            epoch: 1,
            state: VmState::Missing,
            created_at: now,
            updated_at: now,
            ..src.clone()
        };
        let bases_dir = self.paths.disks.join("bases");
        let copy = req.copy;
        let (src_disks, clone_disks) = (src.disks.clone(), clone.disks.clone());
        // Files first; the records are written only when every file exists.
        let new_bases =
            tokio::task::spawn_blocking(move || -> std::result::Result<Vec<PathBuf>, HypervisorError> {
                crate::util::create_vm_dir(&bases_dir).map_err(disk_err)?;
                let mut bases = Vec::new();
                for (s, c) in src_disks.iter().zip(&clone_disks) {
                    let (sp, cp) = (Path::new(&s.path), Path::new(&c.path));
                    crate::util::create_vm_dir(cp.parent().expect("disk has a folder")).map_err(disk_err)?;
                    if copy {
                        crate::images::copy_to_qcow2(sp, "qcow2", cp).map_err(disk_err)?;
                    } else {
                        let base = bases_dir.join(format!("{}.qcow2", Uuid::new_v4()));
                        std::fs::rename(sp, &base).map_err(disk_err)?;
                        let frozen = crate::hypervisor::disks::create_overlay(sp, &base)
                            .and_then(|_| crate::hypervisor::disks::create_overlay(cp, &base));
                        if let Err(e) = frozen {
                            let _ = std::fs::remove_file(sp);
                            let _ = std::fs::rename(&base, sp);
                            return Err(e);
                        }
                        crate::images::share_with_qemu(&base, 0o440).map_err(disk_err)?;
                        bases.push(base);
                    }
                }
                Ok(bases)
            })
            .await
            .map_err(|e| CoreError::Internal(e.to_string()))?;
        let new_bases = match new_bases {
            Ok(b) => b,
            Err(e) => {
                Self::remove_disks(&dir);
                return Err(e.into());
            }
        };
        if !copy {
            for (d, base) in src.disks.iter_mut().zip(&new_bases) {
                d.image = Some(base.display().to_string());
            }
            for (d, base) in clone.disks.iter_mut().zip(&new_bases) {
                d.image = Some(base.display().to_string());
            }
            src.updated_at = now;
            self.commit(Change::VmPut(src.clone())).await?;
        }
        // The disk files exist already: no plan, only the seed is made.
        self.define_new(&mut clone, Vec::new()).await?;
        tracing::info!(VM_ID = %id, VM_NAME = %clone.name, source = %src.name, copy, "VM cloned");
        Ok(self.view(&clone))
    }

    /// Resize of a data-plane disk waits until its VM is stopped: a
    /// vhost-user disk has no QEMU block node to resize live (its capacity
    /// comes from the backend at connect), and telling a running guest of
    /// a new capacity is not built (see docs/design/replication.md).
    async fn stopped_for_dataplane_disks(&self, vm: &VmRecord, action: &'static str) -> Result<()> {
        if vm.replication.is_none() {
            return Ok(());
        }
        let state = self.refresh_state(vm.id).await?;
        if state.is_active() {
            return Err(CoreError::WrongState { vm: vm.name.clone(), state: state.as_str(), action });
        }
        Ok(())
    }

    /// A hot unplug ends in the guest: the data plane serves the disk
    /// until QEMU let go of its socket. A guest that does not release it in
    /// time keeps it (it is put back in the saved definition too).
    async fn await_unplug(&self, vm: &VmRecord, disk: &Disk) -> Result<()> {
        let deadline = tokio::time::Instant::now() + UNPLUG_TIMEOUT;
        loop {
            self.refresh_dataplane_status().await;
            if !self.dataplane_disk(vm.id, &disk.device).is_some_and(|s| s.connected) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let (id, dev, source) = (vm.id, disk.device.clone(), self.disk_source(vm, disk));
                if let Err(e) = self.hv_call(move |hv| hv.attach_disk(id, &source, &dev, false)).await {
                    tracing::warn!(VM_ID = %vm.id, error = %e, "cannot put the disk back in the definition");
                }
                return Err(CoreError::WrongState {
                    vm: vm.name.clone(),
                    state: "running",
                    action: "detach the disk: the guest did not release it within 30 s (it stays attached; \
                             stop the VM and detach it then)",
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Attaches a new raw disk to a data-plane VM: the file, then the
    /// record (the data plane's config and the peer's replica follow it),
    /// then the data plane's export, then the definition, or a hot plug
    /// of the export's socket into the running guest (libvirt accepts
    /// `vhostuser` disks there). A failure undoes all of it.
    async fn attach_dataplane_disk(
        &self,
        vm: VmRecord,
        mut with_disk: VmRecord,
        plan: PlannedDisk,
    ) -> Result<Vm> {
        let disk = with_disk.disks.last().cloned().expect("the new disk");
        let path = PathBuf::from(&disk.path);
        let (single, seed) = (VmRecord { disks: vec![disk.clone()], ..vm.clone() }, self.seed_path(vm.id));
        let made = tokio::task::spawn_blocking(move || Core::make_disks(&single, &[plan], &seed))
            .await
            .map_err(|e| CoreError::Internal(e.to_string()))?;
        if let Err(e) = made {
            let _ = std::fs::remove_file(&path);
            return Err(e.into());
        }
        with_disk.updated_at = now_ms();
        self.commit(Change::VmPut(with_disk.clone())).await?;
        let live = self.refresh_state(vm.id).await.map(|s| s.is_active());
        let served = self.sync_dataplane().await;
        let xml = crate::hypervisor::xml::domain_xml(&self.domain_spec(&with_disk));
        let (id, dev, source) = (vm.id, disk.device.clone(), self.disk_source(&with_disk, &disk));
        let was_live = live.as_ref().is_ok_and(|l| *l);
        let result = match (live, served) {
            (Err(e), _) => Err(e),
            // The guest connects at once: the socket must be there.
            (Ok(true), Err(e)) => Err(e),
            (Ok(true), Ok(())) => self.hv_call(move |hv| hv.attach_disk(id, &source, &dev, true)).await,
            (Ok(false), served) => {
                if let Err(e) = served {
                    // A stopped VM's start syncs the data plane again.
                    tracing::warn!(VM_ID = %vm.id, error = %e, "the data plane does not serve the new disk yet");
                }
                self.hv_call(move |hv| hv.define(&xml)).await
            }
        };
        if let Err(e) = result {
            let mut back = vm.clone();
            back.updated_at = now_ms();
            let _ = self.commit(Change::VmPut(back)).await;
            let _ = self.sync_dataplane().await;
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(crate::dataplane::meta::meta_path(&path));
            return Err(e);
        }
        tracing::info!(VM_ID = %vm.id, device = %disk.device, live = was_live, "disk attached");
        Ok(self.view(&with_disk))
    }

    /// Removes frozen clone bases no disk refers to any more.
    pub(super) fn collect_bases(&self) {
        let Ok(entries) = std::fs::read_dir(self.paths.disks.join("bases")) else { return };
        let used: std::collections::HashSet<String> = self
            .vms
            .read()
            .unwrap()
            .values()
            .flat_map(|v| v.disks.iter().filter_map(|d| d.image.clone()))
            .collect();
        for e in entries.flatten() {
            let p = e.path().display().to_string();
            if !used.contains(&p) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// A disk size in the unit requests give it (`size_gib`), with the exact
/// bytes when it is not a whole number of GiB (disks from images).
fn gib_text(bytes: u64) -> String {
    if bytes % GIB == 0 {
        format!("{} GiB", bytes / GIB)
    } else {
        format!("{:.2} GiB ({bytes} bytes)", bytes as f64 / GIB as f64)
    }
}
