//! Ownership: which node may change, define and run a VM.
//!
//! Every VM record carries its owner node and an epoch (bumped whenever
//! ownership moves). A paired node holds a replica of the peer's VMs: it
//! lists them, but only the owner ever defines, starts, edits or deletes
//! one. Every VM operation goes through [`Core::owned_vm`], and the start and
//! define paths check [`Core::still_owned`] right before libvirt is told to
//! run anything, so a replica is never brought up by accident, and an owner
//! fenced by a newer epoch stops at its next operation.

use super::{Core, CoreError, Result};
use crate::store::VmRecord;
use tokio::sync::OwnedMutexGuard;

/// Held for the length of one operation on one VM (see `Core::lock_vm`).
pub(super) type VmGuard = OwnedMutexGuard<()>;

impl Core {
    /// True when this node owns `vm` (its record names this node).
    pub(super) fn owns(&self, vm: &VmRecord) -> bool {
        vm.owner_node == self.node.id
    }

    fn check_owner(&self, vm: &VmRecord) -> Result<()> {
        if self.owns(vm) {
            Ok(())
        } else {
            Err(CoreError::NotOwner { vm: vm.name.clone(), owner: vm.owner_node, epoch: vm.epoch })
        }
    }

    /// Finds a managed VM by UUID or name and checks this node owns it,
    /// without taking its lock (for operations that only attach to it, like
    /// the console).
    pub(super) fn find_owned(&self, r: &str) -> Result<VmRecord> {
        let vm = self.find_record(r)?;
        self.check_owner(&vm)?;
        Ok(vm)
    }

    /// The prelude of every VM operation: finds the VM by UUID or name,
    /// takes its operation lock, reads the record again under the lock (it
    /// may have changed or gone while we waited) and checks that this node
    /// owns it. The record returned is the one to act on.
    pub(super) async fn owned_vm(&self, r: &str) -> Result<(VmGuard, VmRecord)> {
        let found = self.find_owned(r)?;
        let guard = self.lock_vm(found.id, &found.name).await?;
        let vm = self.find_record(&found.id.to_string())?;
        self.check_owner(&vm)?;
        Ok((guard, vm))
    }

    /// Checks, right before an irreversible step (define, start), that `vm`
    /// (as read when the operation began) is still owned by this node at
    /// the same epoch. A change from the peer is applied without the VM's
    /// operation lock, so a takeover can arrive while an operation waits on
    /// libvirt or the disk; the lease (a later subsystem) is the final
    /// fence, this keeps the core from acting on a record it knows is stale.
    pub(super) fn still_owned(&self, vm: &VmRecord) -> Result<()> {
        let now = self.find_record(&vm.id.to_string())?;
        self.check_owner(&now)?;
        if now.epoch != vm.epoch {
            return Err(CoreError::StaleEpoch { vm: vm.name.clone(), had: vm.epoch, now: now.epoch });
        }
        Ok(())
    }
}
