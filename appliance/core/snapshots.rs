//! Snapshot commands (libvirt internal snapshots of the qcow2 disks) and
//! the serial console.

use super::{ConsoleSession, Core, CoreError, Result};
use crate::store::{now_ms, Change, SnapshotRecord};
use crate::types::{valid_name, Snapshot, SnapshotCreate, SnapshotList, VmState};
use crate::util::rfc3339;
use std::sync::Arc;

fn view(s: &SnapshotRecord) -> Snapshot {
    Snapshot {
        name: s.name.clone(),
        description: s.description.clone(),
        memory: s.memory || s.vm_state.is_active(),
        restores_memory: s.memory,
        vm_state: s.vm_state,
        created_at: rfc3339(s.created_at),
    }
}

impl Core {
    pub(super) fn list_snapshots(&self, r: &str) -> Result<SnapshotList> {
        let vm = self.find_record(r)?;
        let snaps = self.snapshots.read().unwrap();
        Ok(SnapshotList { snapshots: snaps.iter().filter(|s| s.vm_id == vm.id).map(view).collect() })
    }

    fn find_snapshot(&self, vm: uuid::Uuid, name: &str) -> Result<SnapshotRecord> {
        self.snapshots
            .read()
            .unwrap()
            .iter()
            .find(|s| s.vm_id == vm && s.name == name)
            .cloned()
            .ok_or_else(|| CoreError::NotFound(format!("snapshot {name:?}")))
    }

    pub(super) async fn create_snapshot(self: &Arc<Self>, r: &str, req: SnapshotCreate) -> Result<Snapshot> {
        // QEMU does not hold these disks: a snapshot must be taken in the
        // data plane (issue 11), never half-done by libvirt.
        self.refuse_on_dataplane_disks(&self.find_owned(r)?, "a snapshot")?;
        valid_name(&req.name).map_err(|m| CoreError::invalid("name", m))?;
        // Characters, as the message (and the OpenAPI maxLength) say, not bytes.
        if req.description.chars().count() > 1024
            || req.description.chars().any(|c| c.is_control() && c != '\n')
        {
            return Err(CoreError::invalid("description", "must be at most 1024 printable characters"));
        }
        let (_guard, found) = self.owned_vm(r).await?;
        let id = found.id;
        if self.find_snapshot(id, &req.name).is_ok() {
            return Err(CoreError::NameTaken(format!("snapshot {}", req.name)));
        }
        let state = self.refresh_state(id).await?;
        // QEMU's internal snapshot of a running guest always saves its
        // memory too (libvirt refuses a disk-only internal snapshot of a
        // running VM). Without `memory` it is still taken that way (and
        // shown so), and a revert brings back the disks only: the VM is
        // reverted paused and then switched off, so the guest never runs
        // on the restored RAM.
        let with_memory = match (state, req.memory) {
            (VmState::Running | VmState::Paused, _) => true,
            (VmState::Stopped, true) => {
                return Err(CoreError::invalid("memory", "a stopped VM has no memory state to save"))
            }
            (VmState::Stopped, false) => false,
            (other, _) => {
                return Err(CoreError::WrongState {
                    vm: found.name,
                    state: other.as_str(),
                    action: "snapshot",
                })
            }
        };
        let (name, desc) = (req.name.clone(), req.description.clone());
        self.hv_call(move |hv| hv.snapshot_create(id, &name, &desc, with_memory)).await?;
        let record = SnapshotRecord {
            vm_id: id,
            name: req.name,
            description: req.description,
            memory: req.memory,
            vm_state: state,
            created_at: now_ms(),
        };
        if let Err(e) = self.commit(Change::SnapshotPut(record.clone())).await {
            let name = record.name.clone();
            let _ = self.hv_call(move |hv| hv.snapshot_delete(id, &name)).await;
            return Err(e);
        }
        Ok(view(&record))
    }

    /// Puts the VM back to the snapshot: disks (and memory, if asked for) as
    /// they were. A memory snapshot comes back running, a disk snapshot
    /// stopped.
    pub(super) async fn revert_snapshot(self: &Arc<Self>, r: &str, name: &str) -> Result<crate::types::Vm> {
        let (_guard, found) = self.owned_vm(r).await?;
        let id = found.id;
        let snap = self.find_snapshot(id, name)?;
        let n = name.to_string();
        // A disk snapshot of a running VM carries RAM it must not resume.
        let disk_only_of_running = !snap.memory && snap.vm_state.is_active();
        self.hv_call(move |hv| {
            hv.snapshot_revert(id, &n, !disk_only_of_running)?;
            if disk_only_of_running {
                hv.destroy(id)?;
            }
            Ok(())
        })
        .await?;
        self.shutting_down.lock().unwrap().remove(&id);
        self.refresh_state(id).await?;
        self.publish_snapshot("snapshot.reverted", id, name);
        Ok(self.view(&self.find_record(&id.to_string())?))
    }

    pub(super) async fn delete_snapshot(self: &Arc<Self>, r: &str, name: &str) -> Result<()> {
        let (_guard, found) = self.owned_vm(r).await?;
        let id = found.id;
        self.find_snapshot(id, name)?;
        let n = name.to_string();
        match self.hv_call(move |hv| hv.snapshot_delete(id, &n)).await {
            Ok(()) | Err(CoreError::Hypervisor(crate::hypervisor::HypervisorError::NoSnapshot(_))) => {}
            Err(e) => return Err(e),
        }
        self.commit(Change::SnapshotDelete { vm_id: id, name: name.to_string() }).await
    }

    /// Opens the serial console of a running VM. Output flows until the
    /// session ends; input is typed into the guest.
    pub(super) async fn open_console(self: &Arc<Self>, r: &str) -> Result<ConsoleSession> {
        let vm = self.find_owned(r)?;
        let id = vm.id;
        let state = self.refresh_state(id).await?;
        if !state.is_active() {
            return Err(CoreError::WrongState {
                vm: vm.name,
                state: state.as_str(),
                action: "open the console",
            });
        }
        let (out_tx, output) = tokio::sync::mpsc::unbounded_channel();
        let console = self.hv_call(move |hv| hv.open_console(id, out_tx)).await?;
        let (input, mut in_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
        tokio::spawn(async move {
            while let Some(data) = in_rx.recv().await {
                if console.send(&data).is_err() {
                    break;
                }
            }
            console.close();
        });
        Ok(ConsoleSession { output, input, ends: Default::default() })
    }
}
