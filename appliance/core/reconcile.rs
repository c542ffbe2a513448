//! Reconciliation: the store follows what libvirt reports.
//!
//! Runs at start-up, on every libvirt lifecycle event, and on a slow timer
//! (which also notices libvirtd coming back after a restart).

use super::vm::vm_state;
use super::{Core, Result};
use crate::hypervisor::LifecycleEvent;
use crate::tasks::{Policy, Stage, Stop, Supervisor};
use crate::types::VmState;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

const PERIOD: Duration = Duration::from_secs(10);
/// How often change rows past the retention are deleted (see
/// `store::Retention`): a scan of the table, so not on every tick.
const PRUNE_PERIOD: Duration = Duration::from_secs(600);

impl Core {
    /// Brings every managed VM in line with libvirt and refreshes the list
    /// of unmanaged domains.
    pub async fn reconcile_all(self: &Arc<Self>) -> Result<()> {
        let domains = self.hv_call(|hv| hv.list()).await?;
        self.reconcile_networks().await;
        self.refresh_leases().await;
        self.metrics.libvirt_connected.store(true, Ordering::Relaxed);
        let managed: Vec<_> = self.vms.read().unwrap().values().cloned().collect();
        let managed_ids: HashSet<_> = managed.iter().map(|v| v.id).collect();
        for vm in &managed {
            // A replica of the peer's VM: its state is the owner's to
            // report, and defining it here would run it twice.
            if !self.owns(vm) {
                // Here with a stale epoch: the peer took it over or it
                // moved while this node was cut off or frozen.
                if vm.replication.is_some() && domains.iter().any(|d| d.uuid == vm.id) {
                    self.stop_stale(vm).await;
                }
                continue;
            }
            match domains.iter().find(|d| d.uuid == vm.id) {
                Some(d) => {
                    let state = vm_state(d.state);
                    if state != vm.state {
                        tracing::info!(VM_ID = %vm.id, VM_NAME = %vm.name, from = vm.state.as_str(), to = state.as_str(), "state follows libvirt");
                    }
                    self.record_state(vm.id, state).await?;
                }
                None => self.redefine(vm.id).await,
            }
        }
        let unmanaged: Vec<_> = domains.into_iter().filter(|d| !managed_ids.contains(&d.uuid)).collect();
        let changed = {
            let mut current = self.unmanaged.write().unwrap();
            let changed = *current != unmanaged;
            *current = unmanaged;
            changed
        };
        if changed {
            self.generation.fetch_add(1, Ordering::Release);
        }
        Ok(())
    }

    /// Defines a VM of this node's that is in the store but missing from
    /// libvirt (an interrupted create, or someone ran `virsh undefine`).
    /// Skips VMs with an operation in flight (that operation has them) and
    /// replicas of the peer's VMs.
    async fn redefine(self: &Arc<Self>, id: uuid::Uuid) {
        let m = self.vm_locks.lock().unwrap().entry(id).or_default().clone();
        let Ok(_guard) = m.try_lock_owned() else { return };
        let Some(vm) = self.vms.read().unwrap().get(&id).cloned() else { return };
        if self.still_owned(&vm).is_err() {
            return;
        }
        let xml = crate::hypervisor::xml::domain_xml(&self.domain_spec(&vm));
        let record = vm.clone();
        let seed = self.seed_path(id);
        let result = self
            .hv_call(move |hv| {
                Core::ensure_disks(&record, &seed)?;
                hv.define(&xml)
            })
            .await;
        match result {
            Ok(()) => {
                tracing::warn!(VM_ID = %id, VM_NAME = %vm.name, "VM was missing from libvirt; redefined it");
                let _ = self.record_state(id, VmState::Stopped).await;
            }
            Err(e) => {
                tracing::error!(VM_ID = %id, VM_NAME = %vm.name, error = %e, "cannot redefine missing VM");
                let _ = self.record_state(id, VmState::Missing).await;
            }
        }
    }

    /// Starts event following and periodic reconciliation as a supervised
    /// core task. Restarted after a panic or error (with backoff): every
    /// pass re-reads libvirt, so a fresh start loses nothing, and one odd
    /// domain must not take the API down with it.
    pub fn spawn_reconciler(self: &Arc<Self>, tasks: &Supervisor) {
        let core = self.clone();
        tasks.spawn(Stage::Core, "core.reconciler", Policy::Restart, move |stop| {
            core.clone().reconciler(stop)
        });
        // Its own task: a scan of the change table must not hold up
        // following libvirt, and a failure of either leaves the other.
        let core = self.clone();
        tasks.spawn(Stage::Core, "core.prune", Policy::Restart, move |mut stop| {
            let core = core.clone();
            async move {
                let mut prune = tokio::time::interval(PRUNE_PERIOD);
                loop {
                    tokio::select! {
                        _ = stop.wait() => return Ok(()),
                        _ = prune.tick() => {}
                    }
                    match core.prune_changes().await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(rows = n, "pruned replicated change rows"),
                        Err(e) => tracing::warn!(error = %e, "cannot prune the change stream"),
                    }
                }
            }
        });
    }

    async fn reconciler(self: Arc<Self>, mut stop: Stop) -> std::result::Result<(), String> {
        // A fresh channel per run; libvirt drops the dead sender of a
        // previous run at its next event.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<LifecycleEvent>();
        let mut subscribed = false;
        let mut tick = tokio::time::interval(PERIOD);
        loop {
            tokio::select! {
                _ = stop.wait() => return Ok(()),
                _ = self.reconcile_now.notified() => {
                    if let Err(e) = self.reconcile_all().await {
                        tracing::warn!(error = %e, "reconciliation failed");
                    }
                }
                _ = tick.tick() => {
                    if !subscribed {
                        let tx = tx.clone();
                        subscribed = self.hv_call(move |hv| hv.subscribe(tx)).await.is_ok();
                    }
                    if let Err(e) = self.reconcile_all().await {
                        self.metrics.libvirt_connected.store(false, Ordering::Relaxed);
                        tracing::warn!(error = %e, "reconciliation failed");
                    }
                }
                Some(ev) = rx.recv() => {
                    self.metrics.lifecycle_events.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(VM_ID = %ev.uuid, VM_NAME = %ev.name, "libvirt lifecycle event");
                    let known = self.vms.read().unwrap().get(&ev.uuid).map(|v| self.owns(v));
                    let result = if known == Some(false) {
                        // A domain of a VM the peer owns: not ours to follow.
                        tracing::warn!(VM_ID = %ev.uuid, VM_NAME = %ev.name, "lifecycle event for a VM another node owns; ignored");
                        Ok(())
                    } else if known == Some(true) {
                        self.refresh_state(ev.uuid).await.map(|_| ())
                    } else {
                        self.reconcile_all().await
                    };
                    if let Err(e) = result {
                        tracing::warn!(VM_ID = %ev.uuid, error = %e, "cannot follow lifecycle event");
                    }
                }
            }
        }
    }
}
