//! Autostart: the VMs marked `autostart` start once per host boot, one
//! after the other in start order (`autostart_priority` descending, then
//! name); a takeover (`failover.rs`) starts the peer's VMs in the same
//! order.

use super::failover::peer_allows;
use super::{Command, Core, VmAction};
use crate::cluster::pairing::VmEpoch;
use crate::store::VmRecord;
use crate::types::VmState;
use std::cmp::Ordering;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// How often autostart asks the peer again while it does not answer.
const PEER_RETRY: Duration = Duration::from_secs(5);

/// Start order of two VMs given as (`autostart_priority`, name): the
/// higher priority first, ties by name (names are unique across the pair,
/// so the order is total).
pub(super) fn start_order((prio_a, name_a): (i32, &str), (prio_b, name_b): (i32, &str)) -> Ordering {
    prio_b.cmp(&prio_a).then_with(|| name_a.cmp(name_b))
}

/// `vms` in start order.
pub(super) fn in_start_order(mut vms: Vec<VmRecord>) -> Vec<VmRecord> {
    vms.sort_by(|a, b| start_order((a.autostart_priority, &a.name), (b.autostart_priority, &b.name)));
    vms
}

impl Core {
    /// Starts the VMs marked autostart once per host boot. The boot is
    /// identified by the kernel's boot id, remembered in the data dir, so a
    /// daemon restart does not restart guests someone stopped on purpose.
    pub async fn autostart_after_boot(self: &Arc<Self>) {
        let Ok(boot_id) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") else { return };
        let marker = self.paths.data_dir.join("autostart-boot-id");
        if std::fs::read_to_string(&marker).is_ok_and(|seen| seen.trim() == boot_id.trim()) {
            return;
        }
        let due = in_start_order(
            self.vms
                .read()
                .unwrap()
                .values()
                .filter(|v| v.autostart && v.state == VmState::Stopped && self.owns(v))
                .cloned()
                .collect(),
        );
        if due.iter().any(|v| self.waits_for_peer(v)) {
            // Asking the peer can take seconds (or fail): the starts go on
            // beside the daemon's own start.
            let core = self.clone();
            let due = due.into_iter().map(|v| v.id).collect();
            tokio::spawn(async move { core.autostart_in_order(due).await });
        } else {
            self.autostart_in_order(due.into_iter().map(|v| v.id).collect()).await;
        }
        if let Err(e) = std::fs::write(&marker, boot_id.trim()) {
            tracing::warn!(error = %e, "cannot record the autostart boot id");
        }
    }

    /// A replicated VM on a paired node: the peer may have taken it over
    /// while this node was away, so it starts only on the peer's word.
    fn waits_for_peer(&self, vm: &VmRecord) -> bool {
        vm.replication.is_some()
            && self.peer_record().is_some_and(|p| p.state == crate::store::PeerState::Paired)
    }

    /// Starts `due` (in start order) one after the other. A VM that waits
    /// for the peer's word while the peer does not answer does not hold up
    /// the ones after it: such VMs are tried again, in their order, every
    /// few seconds until the peer answers.
    async fn autostart_in_order(self: &Arc<Self>, due: Vec<Uuid>) {
        let waiting = self.autostart_pass(due, true).await;
        if waiting.is_empty() {
            return;
        }
        let core = self.clone();
        tokio::spawn(async move {
            let mut waiting = waiting;
            while !waiting.is_empty() {
                tokio::time::sleep(PEER_RETRY).await;
                waiting = core.autostart_pass(waiting, false).await;
            }
        });
    }

    /// One pass over `due`: each start has returned before the next one
    /// begins. The peer is asked once per pass, at the first VM that needs
    /// its word. Returns the VMs still waiting for it.
    async fn autostart_pass(self: &Arc<Self>, due: Vec<Uuid>, first: bool) -> Vec<Uuid> {
        let mut peer: Option<std::result::Result<Vec<VmEpoch>, String>> = None;
        let mut waiting = Vec::new();
        for id in due {
            let Some(vm) = self.vms.read().unwrap().get(&id).cloned() else { continue };
            if !self.owns(&vm) || vm.state != VmState::Stopped {
                continue;
            }
            if self.waits_for_peer(&vm) {
                if peer.is_none() {
                    peer = Some(self.peer_epochs().await.map_err(|e| e.to_string()));
                }
                match peer.as_ref() {
                    Some(Ok(epochs)) if !peer_allows(epochs, &vm) => continue,
                    Some(Ok(_)) | None => {}
                    Some(Err(e)) => {
                        if first {
                            tracing::warn!(VM_ID = %id, error = %e, "not autostarting this replicated VM until the peer answers: it may have taken it over");
                        }
                        waiting.push(id);
                        continue;
                    }
                }
            }
            let cmd = Command::VmAction { vm: id.to_string(), action: VmAction::Start };
            match self.execute(&Core::local_admin(0), cmd).await {
                Ok(_) => {
                    tracing::info!(VM_ID = %id, VM_NAME = %vm.name, priority = vm.autostart_priority, "autostarted")
                }
                Err(e) => tracing::warn!(VM_ID = %id, error = %e, "autostart failed"),
            }
        }
        waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(vms: &[(i32, &str)]) -> Vec<String> {
        let mut v = vms.to_vec();
        v.sort_by(|a, b| start_order(*a, *b));
        v.into_iter().map(|(p, n)| format!("{n}:{p}")).collect()
    }

    #[test]
    fn higher_priority_first_then_by_name() {
        let got = order(&[(0, "web"), (10, "db"), (-5, "batch"), (0, "app"), (10, "cache"), (1000, "dns")]);
        assert_eq!(got, ["dns:1000", "cache:10", "db:10", "app:0", "web:0", "batch:-5"]);
        // The order does not depend on where a VM came from (a HashMap's
        // iteration order, say).
        let mut rev = [(0, "web"), (10, "db"), (-5, "batch"), (0, "app"), (10, "cache"), (1000, "dns")];
        rev.reverse();
        assert_eq!(order(&rev), got);
        // The extremes do not overflow a subtraction.
        assert_eq!(order(&[(i32::MIN, "a"), (i32::MAX, "b")]), ["b:2147483647", "a:-2147483648"]);
    }

    #[test]
    fn records_are_sorted_into_start_order() {
        let rec = |name: &str, p: i32| VmRecord {
            autostart_priority: p,
            name: name.into(),
            ..super::super::owner_tests::replica("x", Uuid::nil(), VmState::Stopped)
        };
        let vms = in_start_order(vec![rec("b", 0), rec("a", 0), rec("c", 5)]);
        assert_eq!(vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["c", "a", "b"]);
    }
}
