//! Moving VMs between the two nodes: a planned move (the owner hands a
//! stopped VM over), an operator's takeover of a dead peer's VMs, and the
//! return of an old owner. Who may run a VM is its record's owner at its
//! epoch (see `owner.rs`); every hand-over bumps the epoch, and the data
//! plane turns the disks around from the record (a replica is promoted on
//! the new owner, the old owner's copy demoted and resynced by delta).
//!
//! Automatic failover (a witness, leases, fencing) is not built: a takeover
//! is the operator's word that the peer is off.

use super::autostart::{in_start_order, start_order};
use super::{Core, CoreError, Result, VmAction};
use crate::cluster::pairing::{self, HandshakeReply, VmEpoch, VmPeerOp};
use crate::cluster::ReplicaState;
use crate::store::{Change, VmRecord};
use crate::types::{PeerTakeover, ReplicationMode, TakenOver, TakeoverReport, VmMoved, VmState};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// How long a move waits for the replica to be up to date after the guest
/// stopped (the last writes' acknowledgements, a short resync).
const MOVE_SYNC_WAIT: Duration = Duration::from_secs(60);
/// How long the receiving node waits for a handed-over record to arrive
/// by the state stream before it refuses to start the VM.
const RECORD_WAIT: Duration = Duration::from_secs(10);

/// Whether the peer's `epochs` leave `vm` to this node: false (and logged)
/// when the peer holds it at a newer epoch, or at the same one as another
/// owner.
pub(super) fn peer_allows(epochs: &[VmEpoch], vm: &VmRecord) -> bool {
    match epochs.iter().find(|e| e.vm == vm.id) {
        Some(e) if e.epoch > vm.epoch || (e.epoch == vm.epoch && e.owner != vm.owner_node) => {
            tracing::error!(VM_ID = %vm.id, VM_NAME = %vm.name, ours = vm.epoch, theirs = e.epoch, owner = %e.owner, "the peer holds this VM at a newer epoch: not starting it here");
            false
        }
        _ => true,
    }
}

/// Promotion order of replica states, best first: a VM is as good as its
/// worst disk.
fn rank(s: ReplicaState) -> u8 {
    match s {
        ReplicaState::UpToDate => 0,
        ReplicaState::Syncing => 1,
        ReplicaState::Outdated => 2,
        ReplicaState::Inconsistent => 3,
    }
}

impl Core {
    /// A signed `vm` request to the paired node.
    async fn peer_vm_call(&self, op: VmPeerOp) -> Result<HandshakeReply> {
        let p = self
            .peer_record()
            .filter(|p| p.state == crate::store::PeerState::Paired)
            .ok_or(pairing::PairError::NotPaired)?;
        let req = pairing::peer_vm_request(
            op,
            &p.pair_key,
            self.node.id,
            p.node.node_id,
            crate::util::now_ms() as u64,
            crate::util::random_bytes(),
        );
        Ok(super::peer::call(&p.node.addresses, p.node.api_port, &p.node.fingerprint, &req).await?)
    }

    /// The paired node's `vm` request, its proof already checked.
    pub(super) async fn peer_vm_op(self: &Arc<Self>, op: VmPeerOp) -> Result<HandshakeReply> {
        let reply = |epochs| HandshakeReply { paired: true, inviter: None, proof: None, epochs };
        match op {
            VmPeerOp::Epochs => {
                let vms = self.vms.read().unwrap();
                let epochs = vms.values().map(|v| VmEpoch { vm: v.id, owner: v.owner_node, epoch: v.epoch });
                Ok(reply(Some(epochs.collect())))
            }
            VmPeerOp::Start { vm, epoch } => {
                self.start_handed_over(vm, epoch).await?;
                Ok(reply(None))
            }
        }
    }

    /// The worst local replica state of `vm`'s disks as the data plane
    /// reports them, with the reason when it cannot tell.
    fn replica_state(&self, vm: &VmRecord) -> std::result::Result<ReplicaState, String> {
        let mut worst = ReplicaState::UpToDate;
        for d in &vm.disks {
            let st = self
                .dataplane_disk(vm.id, &d.device)
                .ok_or_else(|| format!("the data plane does not report disk {}", d.device))?;
            let r = st.replica.ok_or_else(|| format!("disk {} is not replicated here", d.device))?;
            if rank(r.local) > rank(worst) {
                worst = r.local;
            }
        }
        Ok(worst)
    }

    /// The record as this node owns it from now on, at `epoch`: owner this
    /// node, disks at this node's replica paths (the files the data plane
    /// holds here).
    fn owned_here(&self, vm: &VmRecord, epoch: u64) -> VmRecord {
        let mut rec = vm.clone();
        rec.owner_node = self.node.id;
        rec.epoch = epoch;
        for d in &mut rec.disks {
            d.path = self.replica_path(vm.id, d).display().to_string();
        }
        rec.state = VmState::Stopped;
        rec.updated_at = crate::util::now_ms();
        rec
    }

    /// Defines a VM that just became this node's (its domain never
    /// existed here) so that it can start.
    async fn define_here(&self, vm: &VmRecord) -> Result<()> {
        let xml = crate::hypervisor::xml::domain_xml(&self.domain_spec(vm));
        let (record, seed) = (vm.clone(), self.seed_path(vm.id));
        self.hv_call(move |hv| {
            Core::ensure_disks(&record, &seed)?;
            hv.define(&xml)
        })
        .await?;
        self.record_state(vm.id, VmState::Stopped).await
    }

    /// `POST /v1/vms/{id}/move`: shut the VM down here, wait until the
    /// peer's copy of every disk is up to date, hand the record to the peer
    /// at the next epoch, and have the peer start it.
    pub(super) async fn vm_move(self: &Arc<Self>, r: &str) -> Result<VmMoved> {
        let (guard, vm) = self.owned_vm(r).await?;
        let peer = self
            .peer_record()
            .filter(|p| p.state == crate::store::PeerState::Paired)
            .ok_or(pairing::PairError::NotPaired)?;
        let mode = vm.replication.map(|r| r.mode);
        if !matches!(mode, Some(ReplicationMode::Sync | ReplicationMode::Async)) {
            return Err(CoreError::Unsupported(format!(
                "VM {:?} is not replicated (replication {}): the peer has no copy of its disks to start from",
                vm.name,
                mode.map_or("none", |m| m.as_str())
            )));
        }
        // Refused before the guest is touched when the peer cannot take it.
        self.refresh_dataplane_status().await;
        self.peer_copy_ready(&vm)?;
        let id = vm.id;
        let was_running = self.refresh_state(id).await?.is_active();
        let begun = Instant::now();
        if was_running {
            self.stop_for_move(&vm).await?;
        }
        let shutdown_ms = begun.elapsed().as_millis() as u64;
        let stopped = Instant::now();
        // The last writes reach the peer; a guest that cannot move starts
        // again here.
        let deadline = Instant::now() + MOVE_SYNC_WAIT;
        loop {
            self.refresh_dataplane_status().await;
            match self.peer_copy_ready(&vm) {
                Ok(()) => break,
                Err(e) if Instant::now() >= deadline => {
                    drop(guard);
                    if was_running {
                        let _ = self
                            .vm_action(&id.to_string(), VmAction::Start)
                            .await
                            .inspect_err(|e| tracing::error!(VM_ID = %id, error = %e, "cannot start the VM again after a failed move"));
                    }
                    return Err(CoreError::ReplicaNotReady(format!(
                        "the move of {:?} was abandoned after {} s: {e}; it {} here",
                        vm.name,
                        MOVE_SYNC_WAIT.as_secs(),
                        if was_running { "was started again" } else { "stays" }
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        // The hand-over: from this commit on, only the peer may start it.
        let epoch = vm.epoch + 1;
        let mut handed = vm.clone();
        handed.owner_node = peer.node.node_id;
        handed.epoch = epoch;
        handed.state = VmState::Stopped;
        handed.updated_at = crate::util::now_ms();
        self.still_owned(&vm)?;
        self.commit(Change::VmPut(handed)).await?;
        let undefined = self
            .hv_call(move |hv| match hv.undefine(id) {
                Ok(()) | Err(crate::hypervisor::HypervisorError::NoDomain(_)) => Ok(()),
                Err(e) => Err(e),
            })
            .await;
        if let Err(e) = undefined {
            tracing::warn!(VM_ID = %id, error = %e, "cannot undefine the moved VM's domain here");
        }
        drop(guard);
        // This node's copy becomes the replica before the peer's is promoted.
        if let Err(e) = self.sync_dataplane().await {
            tracing::warn!(VM_ID = %id, error = %e, "the data plane did not take the move yet");
        }
        tracing::info!(VM_ID = %id, VM_NAME = %vm.name, PEER_ID = %peer.node.node_id, epoch, "VM handed to the peer (planned move)");
        let (downtime_ms, message) = if was_running {
            match self.peer_vm_call(VmPeerOp::Start { vm: id, epoch }).await {
                Ok(_) => {
                    let d = stopped.elapsed().as_millis() as u64;
                    (
                        Some(d),
                        format!(
                            "moved to {} and started there; down {d} ms after its shutdown",
                            peer.node.name
                        ),
                    )
                }
                Err(e) => (
                    None,
                    format!(
                        "moved to {} (epoch {epoch}), but it did not start there: {e}; start it on {} \
                         (novacron vm start {})",
                        peer.node.name, peer.node.name, vm.name
                    ),
                ),
            }
        } else {
            (None, format!("moved to {} (stopped, as it was here)", peer.node.name))
        };
        self.events.publish(
            "vm.moved",
            serde_json::json!({"id": id, "name": vm.name, "to": peer.node.node_id, "epoch": epoch, "downtime_ms": downtime_ms}),
        );
        Ok(VmMoved {
            id,
            name: vm.name,
            from: self.node.id,
            to: peer.node.node_id,
            epoch,
            started: downtime_ms.is_some(),
            shutdown_ms,
            downtime_ms,
            message,
        })
    }

    /// ACPI shutdown, forced after the VM's limit.
    async fn stop_for_move(&self, vm: &VmRecord) -> Result<()> {
        let id = vm.id;
        self.hv_call(move |hv| hv.shutdown(id)).await?;
        let deadline = Instant::now() + Duration::from_secs(self.shutdown_timeout(vm));
        while Instant::now() < deadline {
            if !self.refresh_state(id).await?.is_active() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::warn!(VM_ID = %id, "the guest did not shut down in time for the move; forcing it off");
        match self.hv_call(move |hv| hv.destroy(id)).await {
            Ok(()) | Err(CoreError::Hypervisor(crate::hypervisor::HypervisorError::WrongState(_))) => {}
            Err(e) => return Err(e),
        }
        self.refresh_state(id).await.map(drop)
    }

    /// The peer's copy of every disk is up to date and connected.
    fn peer_copy_ready(&self, vm: &VmRecord) -> Result<()> {
        for d in &vm.disks {
            let why = match self.dataplane_disk(vm.id, &d.device).and_then(|s| s.replica) {
                None => Some("the data plane does not report it".to_string()),
                Some(r) if !r.connected => Some("the peer's data plane is not connected".into()),
                Some(r) if r.peer != Some(ReplicaState::UpToDate) || r.pending_bytes > 0 => Some(format!(
                    "the peer's copy is {} ({} bytes to resync)",
                    r.peer.map_or("unknown", |p| p.as_str()),
                    r.pending_bytes
                )),
                Some(_) => None,
            };
            if let Some(why) = why {
                return Err(CoreError::ReplicaNotReady(format!("disk {} of {:?}: {why}", d.device, vm.name)));
            }
        }
        Ok(())
    }

    /// The peer handed `vm` over at `epoch` (a planned move): once the
    /// record is here, take the disks (the data plane promotes them) and
    /// start it.
    async fn start_handed_over(self: &Arc<Self>, id: Uuid, epoch: u64) -> Result<()> {
        let deadline = Instant::now() + RECORD_WAIT;
        let vm = loop {
            let now = self.vms.read().unwrap().get(&id).cloned();
            match now {
                Some(v) if v.epoch == epoch && self.owns(&v) => break v,
                Some(v) if v.epoch > epoch => {
                    return Err(CoreError::StaleEpoch { vm: v.name, had: epoch, now: v.epoch })
                }
                _ if Instant::now() >= deadline => {
                    return Err(CoreError::NotReady(format!(
                        "VM {id} at epoch {epoch} has not reached this node within {} s",
                        RECORD_WAIT.as_secs()
                    )))
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let vm = self.take_here(vm).await?;
        self.vm_action(&vm.id.to_string(), VmAction::Start).await.map(drop)
    }

    /// A record that names this node at its epoch: rewritten to this
    /// node's disk paths (committed, so the peer learns them) and defined
    /// in libvirt. Its disks are promoted by the data plane at the start.
    async fn take_here(&self, vm: VmRecord) -> Result<VmRecord> {
        let _guard = self.lock_vm(vm.id, &vm.name).await?;
        let rec = self.owned_here(&vm, vm.epoch);
        if rec.disks != vm.disks {
            self.commit(Change::VmPut(rec.clone())).await?;
        }
        self.define_here(&rec).await?;
        Ok(rec)
    }

    /// `POST /v1/peer/takeover`: promote the peer's VMs here. A VM whose
    /// replicas are all up to date is taken; others only when named in
    /// `include` (outdated, or syncing: rolled back to the pre-resync copy
    /// first), never an inconsistent one. Autostart VMs are started in
    /// start order (priority, then name), each after the previous start
    /// returned; the report lists every VM in that order.
    pub(super) async fn peer_takeover(self: &Arc<Self>, req: PeerTakeover) -> Result<TakeoverReport> {
        if !req.force {
            return Err(CoreError::invalid(
                "force",
                "a takeover must be forced: it is your confirmation that the peer is off \
                 (automatic failover is not configured)",
            ));
        }
        let peer = self
            .peer_record()
            .filter(|p| p.state == crate::store::PeerState::Paired)
            .ok_or(pairing::PairError::NotPaired)?;
        let theirs = in_start_order(
            self.vms
                .read()
                .unwrap()
                .values()
                .filter(|v| v.owner_node == peer.node.node_id)
                .cloned()
                .collect(),
        );
        for name in &req.include {
            if !theirs.iter().any(|v| v.name == *name || v.id.to_string() == *name) {
                return Err(CoreError::NotFound(format!("VM {name} of the peer")));
            }
        }
        self.refresh_dataplane_status().await;
        let mut report = Vec::new();
        let mut taken = Vec::new();
        for vm in theirs {
            let named = req.include.iter().any(|n| *n == vm.name || *n == vm.id.to_string());
            let entry = |result: &str, replica: &str, epoch, detail: String| TakenOver {
                id: vm.id,
                name: vm.name.clone(),
                result: result.into(),
                replica: replica.into(),
                epoch,
                autostart_priority: vm.autostart_priority,
                detail,
            };
            let replicated = vm.replication.is_some_and(|r| r.mode != ReplicationMode::Off);
            if !replicated || vm.disks.is_empty() {
                report.push(entry(
                    "left",
                    "none",
                    vm.epoch,
                    "not replicated: this node has no copy of its disks".into(),
                ));
                continue;
            }
            let state = match self.replica_state(&vm) {
                Ok(s) => s,
                Err(why) => {
                    report.push(entry("left", "unknown", vm.epoch, why));
                    continue;
                }
            };
            let refuse = match state {
                ReplicaState::UpToDate => None,
                ReplicaState::Inconsistent => {
                    Some("inconsistent (its first sync never completed): there is no consistent copy here".to_string())
                }
                s if !named => Some(format!(
                    "{s}: it may lack writes the peer acknowledged; name it in include to promote it anyway{}",
                    if s == ReplicaState::Syncing { " (rolled back to its copy from before the resync)" } else { "" }
                )),
                _ => None,
            };
            if let Some(why) = refuse {
                report.push(entry("left", state.as_str(), vm.epoch, why));
                continue;
            }
            let epoch = vm.epoch + 1;
            if state != ReplicaState::UpToDate {
                self.dataplane_status.force_promote.lock().unwrap().insert(vm.id);
            }
            let rec = self.owned_here(&vm, epoch);
            if let Err(e) = self.commit(Change::VmPut(rec.clone())).await {
                report.push(entry(
                    "left",
                    state.as_str(),
                    vm.epoch,
                    format!("cannot record the takeover: {e}"),
                ));
                continue;
            }
            tracing::warn!(VM_ID = %vm.id, VM_NAME = %vm.name, PEER_ID = %peer.node.node_id, epoch, replica = state.as_str(), forced = named, "VM taken over from the peer");
            taken.push((rec, state));
        }
        // The data plane promotes the replicas (one config for all).
        let synced = self.sync_dataplane().await;
        for (rec, state) in taken {
            let detail = |d: String| d;
            let defined = match &synced {
                Ok(()) => self.define_here(&rec).await,
                Err(e) => Err(CoreError::Dataplane(e.to_string())),
            };
            self.dataplane_status.force_promote.lock().unwrap().remove(&rec.id);
            let (result, d) = match defined {
                Err(e) => ("taken_over", detail(format!("owned here now, but not ready to start: {e}"))),
                Ok(()) if !rec.autostart => {
                    ("taken_over", "owned here now; not autostart, so not started".into())
                }
                // Awaited: the next VM starts only after this start returned.
                Ok(()) => match self.vm_action(&rec.id.to_string(), VmAction::Start).await {
                    Ok(_) => {
                        tracing::info!(VM_ID = %rec.id, VM_NAME = %rec.name, priority = rec.autostart_priority, "started after the takeover");
                        ("started", "owned and running here now".to_string())
                    }
                    Err(e) => ("taken_over", format!("owned here now; its start failed: {e}")),
                },
            };
            report.push(TakenOver {
                id: rec.id,
                name: rec.name.clone(),
                result: result.into(),
                replica: state.as_str().into(),
                epoch: rec.epoch,
                autostart_priority: rec.autostart_priority,
                detail: d,
            });
        }
        report.sort_by(|a, b| start_order((a.autostart_priority, &a.name), (b.autostart_priority, &b.name)));
        let n = report.iter().filter(|t| t.result != "left").count();
        let left = report.len() - n;
        self.events.publish(
            "peer.takeover",
            serde_json::json!({"peer": peer.node.node_id, "taken": n, "left": left}),
        );
        tracing::warn!(PEER_ID = %peer.node.node_id, taken = n, left, "takeover of the peer's VMs");
        Ok(TakeoverReport {
            message: format!(
                "{n} VM(s) of {} taken over here, {left} left alone; when {} comes back it learns the new \
                 epochs, stops any VM it still runs and becomes the standby",
                peer.node.name, peer.node.name
            ),
            vms: report,
        })
    }

    /// The paired node's view of every VM's owner and epoch.
    pub(super) async fn peer_epochs(&self) -> Result<Vec<VmEpoch>> {
        Ok(self.peer_vm_call(VmPeerOp::Epochs).await?.epochs.unwrap_or_default())
    }

    /// VMs this node owns that the peer may have taken over (replicated
    /// ones) start only after the peer said it does not own them at a
    /// newer epoch. `Ok(true)`: may start; `Ok(false)`: the peer holds it.
    /// An error: the peer did not answer.
    pub(super) async fn peer_allows_start(&self, vm: &VmRecord) -> Result<bool> {
        Ok(peer_allows(&self.peer_epochs().await?, vm))
    }

    /// A domain running here for a VM the peer now owns (this node was cut
    /// off or frozen while the peer took it over): destroyed at once and
    /// undefined, so the stale guest writes no more.
    pub(super) async fn stop_stale(&self, vm: &VmRecord) {
        let (id, me) = (vm.id, self.node.id);
        let result = self
            .hv_call(move |hv| {
                // Only a domain this node defined: where two daemons share
                // one libvirt (tests), the other's is not ours to stop.
                if hv.defined_by(id)? != Some(me) {
                    return Ok(false);
                }
                match hv.destroy(id) {
                    Ok(()) | Err(crate::hypervisor::HypervisorError::WrongState(_)) => {}
                    Err(e) => return Err(e),
                }
                match hv.undefine(id) {
                    Ok(()) | Err(crate::hypervisor::HypervisorError::NoDomain(_)) => Ok(true),
                    Err(e) => Err(e),
                }
            })
            .await;
        match result {
            Ok(false) => {}
            Ok(true) => {
                tracing::error!(VM_ID = %id, VM_NAME = %vm.name, PEER_ID = %vm.owner_node, epoch = vm.epoch, "stopped a VM that ran here with a stale epoch: the peer owns it now");
                self.events.publish(
                    "vm.stale_stopped",
                    serde_json::json!({"id": id, "name": vm.name, "owner": vm.owner_node, "epoch": vm.epoch}),
                );
            }
            Err(e) => {
                tracing::error!(VM_ID = %id, error = %e, "cannot stop a VM running here with a stale epoch")
            }
        }
    }
}
