//! What the core makes of the data plane's per-disk replication status:
//! the `/metrics` samples, one health check per replicated disk, and a
//! `disk.replication` event whenever a disk's copy or link changes. All of
//! it from the status the keeper already fetches every few seconds
//! (`refresh_dataplane_status`): nothing here asks the data plane itself.

use super::Core;
use crate::cluster::ReplicaState;
use crate::dataplane::config::{DiskRole, DiskStatus, WaitHistogram};
use crate::types::{DiskReplica, ReplicationMode, ReplicationSpec};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// A replicated disk as last seen in the data plane's status.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub role: DiskRole,
    /// The copy that matters: the peer's on a primary, this node's on a
    /// secondary.
    pub state: ReplicaState,
    pub connected: bool,
    /// Since when that copy has not been up to date (None: it is). Kept
    /// across syncing and outdated, so a resync that keeps breaking off
    /// does not restart the clock.
    pub not_current_since: Option<Instant>,
}

pub type SeenMap = HashMap<(Uuid, String), Seen>;

/// A change of a disk's watched copy or link: (vm, device, before, now).
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub vm: Uuid,
    pub device: String,
    /// None: first seen (since this daemon started, or since it replicates).
    pub before: Option<Seen>,
    pub now: Seen,
}

/// Folds one status into `seen` and returns what changed. Disks gone from
/// the status (or no longer replicated) are forgotten.
pub fn fold(seen: &mut SeenMap, disks: &HashMap<(Uuid, String), DiskStatus>, now: Instant) -> Vec<Change> {
    let mut changes = Vec::new();
    seen.retain(|k, _| disks.get(k).is_some_and(|d| d.replica.is_some()));
    for (k, d) in disks {
        let Some(r) = &d.replica else { continue };
        let state = match d.role {
            DiskRole::Primary => r.peer.unwrap_or(r.local),
            DiskRole::Secondary => r.local,
        };
        let before = seen.get(k).cloned();
        let not_current_since = match (state, before.as_ref().and_then(|b| b.not_current_since)) {
            (ReplicaState::UpToDate, _) => None,
            (_, Some(t)) => Some(t),
            (_, None) => Some(now),
        };
        let next = Seen { role: d.role, state, connected: r.connected, not_current_since };
        let changed = before.as_ref().map_or(true, |b| (b.state, b.connected) != (state, r.connected));
        seen.insert(k.clone(), next.clone());
        if changed {
            changes.push(Change { vm: k.0, device: k.1.clone(), before, now: next });
        }
    }
    changes.sort_by(|a, b| (a.vm, &a.device).cmp(&(b.vm, &b.device)));
    changes
}

/// One replicated disk for `/metrics` and the health checks.
#[derive(Debug, Clone)]
pub struct ReplicatedDisk {
    pub vm_id: Uuid,
    pub vm_name: String,
    /// This node's VM (else a replica held for the peer).
    pub primary: bool,
    pub spec: ReplicationSpec,
    pub disk: DiskReplica,
    pub write_wait: Option<WaitHistogram>,
    /// How long the watched copy has not been up to date, as far as this
    /// daemon has seen (it does not know what came before its start).
    pub not_current_for: Option<Duration>,
}

impl Core {
    /// Called with each status the data plane gives: remembers each disk's
    /// state and publishes `disk.replication` on a change.
    pub(super) fn note_dataplane_status(&self, disks: &HashMap<(Uuid, String), DiskStatus>) {
        let changes = fold(&mut self.dataplane_status.seen.lock().unwrap(), disks, Instant::now());
        for c in changes {
            // The first sight is not a change anyone saw happen.
            let Some(before) = &c.before else { continue };
            let name = self.vms.read().unwrap().get(&c.vm).map(|v| v.name.clone()).unwrap_or_default();
            let (role, copy) = match c.now.role {
                DiskRole::Primary => ("primary", "peer"),
                DiskRole::Secondary => ("secondary", "local"),
            };
            self.events.publish(
                "disk.replication",
                serde_json::json!({
                    "vm": {"id": c.vm, "name": name},
                    "device": c.device,
                    "role": role,
                    "copy": copy,
                    "state": c.now.state.as_str(),
                    "connected": c.now.connected,
                    "was": {"state": before.state.as_str(), "connected": before.connected},
                }),
            );
        }
    }

    /// Every replicated disk this node serves or holds a replica of, and
    /// each such VM's protection (`replication.protection`).
    pub(super) fn replicated_disks(&self) -> (Vec<ReplicatedDisk>, Vec<(Uuid, String, String)>) {
        let now = Instant::now();
        let seen = self.dataplane_status.seen.lock().unwrap().clone();
        let vms: Vec<crate::store::VmRecord> = self
            .vms
            .read()
            .unwrap()
            .values()
            .filter(|v| v.replication.is_some_and(|r| r.mode != ReplicationMode::Off))
            .cloned()
            .collect();
        let mut disks = Vec::new();
        let mut protection = Vec::new();
        for vm in vms {
            let Some(spec) = vm.replication else { continue };
            let primary = vm.owner_node == self.node.id;
            // A peer's VM counts once this node holds its replica.
            if !primary && !vm.disks.iter().any(|d| self.dataplane_disk(vm.id, &d.device).is_some()) {
                continue;
            }
            let view = self.replication_view(&vm, spec);
            protection.push((vm.id, vm.name.clone(), view.protection.clone()));
            for d in view.disks {
                let key = (vm.id, d.device.clone());
                disks.push(ReplicatedDisk {
                    vm_id: vm.id,
                    vm_name: vm.name.clone(),
                    primary,
                    spec,
                    write_wait: self
                        .dataplane_disk(vm.id, &d.device)
                        .and_then(|s| s.replica)
                        .and_then(|r| r.write_wait),
                    not_current_for: seen
                        .get(&key)
                        .and_then(|s| s.not_current_since)
                        .map(|t| now.saturating_duration_since(t)),
                    disk: d,
                });
            }
        }
        disks.sort_by(|a, b| {
            (&a.vm_name, a.vm_id, &a.disk.device).cmp(&(&b.vm_name, b.vm_id, &b.disk.device))
        });
        protection.sort_by(|a, b| (&a.1, a.0).cmp(&(&b.1, b.0)));
        (disks, protection)
    }
}

/// The `/metrics` form of the disks and protections.
pub fn samples(
    disks: &[ReplicatedDisk],
    protection: &[(Uuid, String, String)],
) -> (Vec<crate::telemetry::metrics::ReplicaDiskSample>, Vec<crate::telemetry::metrics::VmProtectionSample>) {
    use crate::telemetry::metrics::{ReplicaDiskSample, VmProtectionSample};
    let d = disks
        .iter()
        .map(|r| ReplicaDiskSample {
            vm_id: r.vm_id.to_string(),
            vm_name: r.vm_name.clone(),
            device: r.disk.device.clone(),
            role: if r.primary { "primary" } else { "secondary" },
            local: r.disk.local.clone(),
            peer: r.disk.peer.clone(),
            connected: r.disk.connected,
            sync: r.disk.sync.as_ref().map(|s| (s.bytes_done, s.bytes_total, s.rate_bytes_per_sec)),
            lag_bytes: r.disk.lag_bytes,
            lag_seconds: r.disk.lag_seconds,
            dirty_bytes: r.disk.dirty_bytes,
            synced_bytes: r.disk.sync_bytes_total,
            max_lag_seconds: r.spec.max_lag_seconds,
            write_wait: r.write_wait.clone(),
        })
        .collect();
    let p = protection
        .iter()
        .map(|(id, name, p)| VmProtectionSample {
            vm_id: id.to_string(),
            vm_name: name.clone(),
            protection: p.clone(),
        })
        .collect();
    (d, p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::config::ReplicaView;

    fn status(
        role: DiskRole,
        local: ReplicaState,
        peer: Option<ReplicaState>,
        connected: bool,
    ) -> DiskStatus {
        DiskStatus {
            vm: Uuid::from_u128(7),
            device: "vda".into(),
            path: "/d/vda.raw".into(),
            role,
            size_bytes: 1 << 30,
            socket: None,
            connected: false,
            connections: 0,
            reads: 0,
            writes: 0,
            flushes: 0,
            errors: 0,
            per_queue: vec![0],
            last_error: None,
            replica: Some(ReplicaView { peer, connected, ..ReplicaView::secondary(local) }),
        }
    }

    fn one(s: DiskStatus) -> HashMap<(Uuid, String), DiskStatus> {
        HashMap::from([((s.vm, s.device.clone()), s)])
    }

    #[test]
    fn changes_are_reported_once_and_the_outage_clock_survives_a_resync() {
        use ReplicaState::*;
        let mut seen = SeenMap::new();
        let t0 = Instant::now();
        let p = |peer, up| one(status(DiskRole::Primary, UpToDate, Some(peer), up));
        let first = fold(&mut seen, &p(UpToDate, true), t0);
        assert_eq!(first.len(), 1);
        assert!(first[0].before.is_none());
        assert!(fold(&mut seen, &p(UpToDate, true), t0 + Duration::from_secs(2)).is_empty());
        // The link goes, then the copy is marked outdated.
        let c = fold(&mut seen, &p(UpToDate, false), t0 + Duration::from_secs(3));
        assert_eq!((c[0].now.state, c[0].now.connected), (UpToDate, false));
        let c = fold(&mut seen, &p(Outdated, false), t0 + Duration::from_secs(5));
        assert_eq!(c[0].before.as_ref().map(|b| b.state), Some(UpToDate));
        assert_eq!(c[0].now.not_current_since, Some(t0 + Duration::from_secs(5)));
        // A resync keeps the clock; only up to date stops it.
        let c = fold(&mut seen, &p(Syncing, true), t0 + Duration::from_secs(60));
        assert_eq!(c[0].now.not_current_since, Some(t0 + Duration::from_secs(5)));
        let c = fold(&mut seen, &p(Outdated, false), t0 + Duration::from_secs(70));
        assert_eq!(c[0].now.not_current_since, Some(t0 + Duration::from_secs(5)));
        let c = fold(&mut seen, &p(UpToDate, true), t0 + Duration::from_secs(90));
        assert_eq!(c[0].now.not_current_since, None);
        // A secondary is watched by its own copy; a disk gone is forgotten.
        let c = fold(&mut seen, &one(status(DiskRole::Secondary, Syncing, None, true)), t0);
        assert_eq!((c[0].now.role, c[0].now.state), (DiskRole::Secondary, Syncing));
        assert!(fold(&mut seen, &HashMap::new(), t0).is_empty());
        assert!(seen.is_empty());
    }
}
