//! The replica files this node keeps for the peer's VMs, and when they
//! go. A replica may be the only consistent copy of a disk (its owner may
//! be dead), so a file is removed only when a change said so: the owner
//! deleted the VM or detached the disk, a clean unpair dropped the peer's
//! VMs, or an operator deleted a kept replica. Such a change leaves a
//! marker `<replica>.removed` beside the file, written before the change
//! is applied here (and again after); the data plane sync deletes a marked
//! file once no record names it and the data plane no longer serves it.
//! Files without a marker are never touched.

use super::Core;
use crate::store::{Change, VmRecord};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use uuid::Uuid;

const MARKER: &str = ".removed";

fn marker_of(replica: &Path) -> PathBuf {
    let mut name = replica.file_name().unwrap_or_default().to_os_string();
    name.push(MARKER);
    replica.with_file_name(name)
}

impl Core {
    /// A VM record changed in the view (`old` -> `new`, None: deleted):
    /// marks the replicas held here of the disks it no longer has. Only
    /// for a VM another node owns (this node's own files are removed by
    /// the command that changed them), and never for a VM handed to this
    /// node (its replica becomes its disk).
    pub(super) fn mark_removed_replicas(&self, old: Option<&VmRecord>, new: Option<&VmRecord>) {
        let Some(old) = old.filter(|o| o.owner_node != self.node.id && o.replication.is_some()) else {
            return;
        };
        if new.is_some_and(|n| n.owner_node == self.node.id) {
            return;
        }
        for d in &old.disks {
            if new.is_some_and(|n| n.disks.iter().any(|x| x.device == d.device)) {
                continue;
            }
            let replica = self.replica_path(old.id, d);
            let meta = crate::dataplane::meta::meta_path(&replica);
            if !replica.exists() && !meta.exists() {
                continue;
            }
            match std::fs::write(marker_of(&replica), b"") {
                Ok(()) => tracing::info!(VM_ID = %old.id, device = %d.device, "replica marked for removal"),
                Err(e) => tracing::warn!(VM_ID = %old.id, path = %replica.display(), error = %e,
                    "cannot mark a replica for removal: it stays"),
            }
        }
    }

    /// Like [`Core::mark_removed_replicas`], before the peer's `changes`
    /// are applied: the marker is on disk before the record is gone, so a
    /// crash right after the apply leaves no unmarked orphan. A change the
    /// store then refuses leaves the record naming the file, and the sync
    /// drops that marker (the file stays).
    pub(super) fn premark_removed_replicas<'a>(&self, changes: impl IntoIterator<Item = &'a Change>) {
        let mut seen: HashMap<Uuid, Option<VmRecord>> = HashMap::new();
        for c in changes {
            let (id, new) = match c {
                Change::VmPut(v) => (v.id, Some(v.clone())),
                Change::VmDelete { id } => (*id, None),
                _ => continue,
            };
            let old = seen.remove(&id).unwrap_or_else(|| self.vms.read().unwrap().get(&id).cloned());
            self.mark_removed_replicas(old.as_ref(), new.as_ref());
            seen.insert(id, new);
        }
    }

    /// Deletes the marked replicas that nothing names any more: the file,
    /// its `.meta` and `.undo`, the marker, and the VM's folder once empty.
    /// `config`: the paths of the data plane's config as just applied;
    /// `open`: the paths its status still reports (a reload not done yet).
    /// A marked path that a VM record or the config names again keeps its
    /// file and loses its marker: a disk attached anew under the same
    /// device name (its generation differs, so the primary's first sync is
    /// a full one), or a change the store refused. One the data plane still
    /// serves keeps both until it no longer does.
    pub(super) fn remove_marked_replicas(&self, config: &[PathBuf], open: &[PathBuf]) {
        let Ok(vms) = std::fs::read_dir(&self.paths.disks) else { return };
        let named: HashSet<PathBuf> = self
            .vms
            .read()
            .unwrap()
            .values()
            .flat_map(|v| {
                v.disks.iter().map(move |d| match v.owner_node == self.node.id {
                    true => PathBuf::from(&d.path),
                    false => self.replica_path(v.id, d),
                })
            })
            .chain(config.iter().cloned())
            .collect();
        for dir in vms.flatten().map(|e| e.path()).filter(|p| p.is_dir()) {
            let Ok(files) = std::fs::read_dir(&dir) else { continue };
            let mut removed_any = false;
            for marker in files.flatten().map(|e| e.path()) {
                let Some(name) = marker.file_name().and_then(|n| n.to_str()) else { continue };
                let Some(target) = name.strip_suffix(MARKER) else { continue };
                let replica = dir.join(target);
                if named.contains(&replica) {
                    let _ = std::fs::remove_file(&marker);
                    continue;
                }
                if open.contains(&replica) {
                    continue;
                }
                let meta = crate::dataplane::meta::meta_path(&replica);
                let undo = crate::dataplane::replica::undo_path(&replica);
                let mut gone = true;
                for f in [&replica, &meta, &undo] {
                    match std::fs::remove_file(f) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            tracing::warn!(path = %f.display(), error = %e, "cannot remove a replica file");
                            gone = false;
                        }
                        _ => {}
                    }
                }
                if gone {
                    // Else the marker stays: tried again at the next sync.
                    tracing::info!(path = %replica.display(), "replica removed");
                    let _ = std::fs::remove_file(&marker);
                    removed_any = true;
                }
            }
            if removed_any {
                // Only an empty folder goes (other files: not ours to judge).
                let _ = std::fs::remove_dir(&dir);
            }
        }
    }

    /// A replica of a VM whose owner is no longer this node's peer (a
    /// forced unpair kept it: it may be the only copy).
    pub(super) fn is_kept_replica(&self, vm: &VmRecord) -> bool {
        vm.owner_node != self.node.id
            && vm.replication.is_some()
            && !self.peer_record().is_some_and(|p| p.node.node_id == vm.owner_node)
    }

    /// After a clean unpair (the peer took the request, so it holds its
    /// VMs and their consistent disks): the peer's VM records go, and with
    /// them the replicas held here. A forced unpair keeps both: the peer
    /// may be dead and a replica the only copy (`is_kept_replica`).
    pub(super) async fn forget_peer_vms(&self, peer: Uuid) {
        let theirs: Vec<VmRecord> =
            self.vms.read().unwrap().values().filter(|v| v.owner_node == peer).cloned().collect();
        for vm in theirs {
            let id = vm.id;
            self.mark_removed_replicas(Some(&vm), None);
            // Never sent: the link ends with the pairing, and a peer would
            // ignore the deletion of a VM it owns.
            match self.commit(Change::VmDelete { id }).await {
                Ok(()) => tracing::info!(VM_ID = %id, PEER_ID = %peer, "the unpaired peer's VM forgotten"),
                Err(e) => tracing::warn!(VM_ID = %id, error = %e, "cannot forget the unpaired peer's VM"),
            }
        }
        if let Err(e) = self.sync_dataplane().await {
            tracing::debug!(error = %e, "data plane sync after the unpair");
        }
    }

    /// Deletes a replica a forced unpair kept (with `force` only: it may
    /// be the only copy of the VM's disks): the record, then its files.
    pub(super) async fn delete_kept_replica(&self, vm: VmRecord, force: bool) -> super::Result<()> {
        if !force {
            return Err(super::CoreError::WrongState {
                vm: vm.name,
                state: "a replica kept after a forced unpair",
                action: "delete it without force (it may be the only copy of its disks; delete with force)",
            });
        }
        let _guard = self.lock_vm(vm.id, &vm.name).await?;
        self.mark_removed_replicas(Some(&vm), None);
        self.commit(Change::VmDelete { id: vm.id }).await?;
        if let Err(e) = self.sync_dataplane().await {
            tracing::warn!(VM_ID = %vm.id, error = %e, "the kept replica's files go at the next data plane sync");
        }
        tracing::info!(VM_ID = %vm.id, VM_NAME = %vm.name, owner = %vm.owner_node, "kept replica deleted");
        Ok(())
    }

    /// A kept replica's view: `protection` `kept_replica`, each disk's
    /// state read from its metadata (the data plane no longer holds it).
    pub(super) fn kept_replica_view(
        &self,
        vm: &VmRecord,
        mut view: crate::types::VmReplication,
    ) -> crate::types::VmReplication {
        if !self.is_kept_replica(vm) {
            return view;
        }
        view.protection = "kept_replica".into();
        for (d, r) in vm.disks.iter().zip(view.disks.iter_mut()) {
            let replica = self.replica_path(vm.id, d);
            let meta = crate::dataplane::meta::meta_path(&replica);
            r.local = match crate::dataplane::meta::peek(&meta) {
                Ok(h) => h.state.as_str().into(),
                Err(_) => "unknown".into(),
            };
            r.peer = None;
            r.connected = false;
            r.detail = format!(
                "replica kept after a forced unpair from node {} (it may be the only copy): \
                 {}; delete it with `novacron vm delete {} --force`",
                vm.owner_node,
                replica.display(),
                vm.name
            );
        }
        view
    }
}

#[cfg(test)]
mod tests {
    use super::super::owner_tests::{open, replica, test_config};
    use super::*;
    use crate::types::{Disk, ReplicationMode, ReplicationSpec, VmState};

    fn disk(device: &str) -> Disk {
        Disk {
            device: device.into(),
            path: format!("/elsewhere/{device}.raw"),
            size_bytes: 1 << 20,
            image: None,
        }
    }

    fn files(core: &Core, vm: Uuid) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(core.paths.disks.join(vm.to_string()))
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Replica files go only after a change that removed their disk was
    /// applied, never for a change the store refused, never while the data
    /// plane still reports them open, never without a marker.
    #[tokio::test]
    async fn a_replica_is_removed_only_after_its_removal_was_applied() {
        let b = open(&test_config("replica-files"));
        let peer = Uuid::new_v4();
        let mut v = replica("r", peer, VmState::Stopped);
        v.replication = Some(ReplicationSpec { mode: ReplicationMode::Sync, max_lag_seconds: 30 });
        v.disks = vec![disk("vda"), disk("vdb")];
        b.apply_remote(peer, 1, Change::VmPut(v.clone()).encode()).await.unwrap();
        for d in &v.disks {
            let p = b.replica_path(v.id, d);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, b"data").unwrap();
            std::fs::write(crate::dataplane::meta::meta_path(&p), b"meta").unwrap();
        }
        // A stray file nobody marked.
        std::fs::write(b.paths.disks.join(v.id.to_string()).join("vdz.raw"), b"?").unwrap();
        let all = ["vda.raw", "vda.raw.meta", "vdb.raw", "vdb.raw.meta", "vdz.raw"];

        // An older epoch without vdb: premarked, refused by the store, so
        // the record still names vdb and its file stays.
        let stale = VmRecord { epoch: 2, disks: vec![disk("vda")], ..v.clone() };
        b.apply_remote(peer, 2, Change::VmPut(stale).encode()).await.unwrap();
        assert_eq!(b.find_record(&v.id.to_string()).unwrap().disks.len(), 2);
        b.remove_marked_replicas(&[], &[]);
        assert_eq!(files(&b, v.id), all);

        // The owner detached vdb: marked; kept while the data plane still
        // has it open; then removed with its metadata.
        let detached = VmRecord { disks: vec![disk("vda")], updated_at: v.updated_at + 1, ..v.clone() };
        b.apply_remote(peer, 3, Change::VmPut(detached).encode()).await.unwrap();
        let vdb = b.replica_path(v.id, &disk("vdb"));
        b.remove_marked_replicas(&[], std::slice::from_ref(&vdb));
        assert!(vdb.exists() && marker_of(&vdb).exists());
        b.remove_marked_replicas(&[], &[]);
        assert_eq!(files(&b, v.id), ["vda.raw", "vda.raw.meta", "vdz.raw"]);

        // The VM deleted: its replicas go; the unmarked file, and so the
        // folder, stay.
        b.apply_remote(peer, 4, Change::VmDelete { id: v.id }.encode()).await.unwrap();
        b.remove_marked_replicas(&[], &[]);
        assert_eq!(files(&b, v.id), ["vdz.raw"]);
        let _ = std::fs::remove_dir_all(&b.paths.data_dir);
    }
}
