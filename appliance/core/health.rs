//! `GET /v1/health/details` (`novacron health`): one report with a status
//! per check, for monitoring systems (Nagios-style ok/warning/critical).

use super::Core;
use crate::types::{CheckStatus, HealthCheck, HealthReport, VmState};
use std::path::Path;
use std::sync::atomic::Ordering;

/// Free space of the data dir's file system, as a share of its size.
pub const DISK_WARN_FREE: f64 = 0.15;
pub const DISK_CRIT_FREE: f64 = 0.05;
/// Days left on the API certificate.
pub const CERT_WARN_DAYS: i64 = 30;
pub const CERT_CRIT_DAYS: i64 = 7;

/// (free bytes for unprivileged users, size bytes) of the file system
/// holding `path`.
// statvfs field types differ between platforms (u32 on some 32-bit ones).
#[allow(clippy::unnecessary_cast)]
pub fn fs_space(path: &Path) -> Option<(u64, u64)> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    let frag = s.fragment_size() as u64;
    Some((s.blocks_available() as u64 * frag, s.blocks() as u64 * frag))
}

fn check(name: &str, status: CheckStatus, message: impl Into<String>) -> HealthCheck {
    HealthCheck { name: name.into(), status, message: message.into() }
}

pub fn disk_check(space: Option<(u64, u64)>, dir: &Path) -> HealthCheck {
    let Some((free, size)) = space.filter(|s| s.1 > 0) else {
        return check("disk", CheckStatus::Critical, format!("cannot stat {}", dir.display()));
    };
    let share = free as f64 / size as f64;
    let status = if share < DISK_CRIT_FREE {
        CheckStatus::Critical
    } else if share < DISK_WARN_FREE {
        CheckStatus::Warning
    } else {
        CheckStatus::Ok
    };
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    check(
        "disk",
        status,
        format!(
            "{:.1} GiB of {:.1} GiB free ({:.0}%) in {}",
            gib(free),
            gib(size),
            share * 100.0,
            dir.display()
        ),
    )
}

pub fn cert_check(not_after: Option<i64>, now_secs: i64) -> HealthCheck {
    let Some(t) = not_after else {
        // Read from the certificate at every start: unknown means it could
        // not be parsed, and nothing would warn before it expires.
        return check(
            "certificate",
            CheckStatus::Warning,
            "expiry unknown: cannot read the certificate's validity",
        );
    };
    let days = (t - now_secs).div_euclid(86_400);
    let when = crate::util::rfc3339(t * 1000);
    if t <= now_secs {
        check("certificate", CheckStatus::Critical, format!("expired at {when}"))
    } else if days < CERT_CRIT_DAYS {
        check("certificate", CheckStatus::Critical, format!("expires in {days} days ({when})"))
    } else if days < CERT_WARN_DAYS {
        check("certificate", CheckStatus::Warning, format!("expires in {days} days ({when})"))
    } else {
        check("certificate", CheckStatus::Ok, format!("expires in {days} days ({when})"))
    }
}

/// A file the node needs, for the `files` check.
pub struct NeededFile {
    /// What it is, for the message: `VM web disk vda`, `image debian12`.
    pub what: String,
    pub path: String,
    /// A VM cannot run without it (else only new VMs need it).
    pub critical: bool,
}

/// The `files` check: critical when a VM's disk, base image, kernel or
/// initrd is missing, warning when only image files are.
pub fn files_check(needed: &[NeededFile], exists: impl Fn(&str) -> bool) -> HealthCheck {
    let missing: Vec<&NeededFile> = needed.iter().filter(|f| !exists(&f.path)).collect();
    if missing.is_empty() {
        return check(
            "files",
            CheckStatus::Ok,
            format!("{} disk, image and boot files present", needed.len()),
        );
    }
    let status =
        if missing.iter().any(|f| f.critical) { CheckStatus::Critical } else { CheckStatus::Warning };
    let shown: Vec<String> = missing.iter().take(5).map(|f| format!("{} ({})", f.what, f.path)).collect();
    let more = if missing.len() > 5 { format!(" and {} more", missing.len() - 5) } else { String::new() };
    check("files", status, format!("missing: {}{more}", shown.join(", ")))
}

/// Name conflicts between the two nodes shown by the `conflicts` check.
const CONFLICTS_SHOWN: usize = 5;
/// A resolved conflict warns for this long (someone holds a renamed token
/// or VM and should know), then only counts.
pub const CONFLICT_WARN_MS: i64 = 7 * 24 * 3600 * 1000;

/// The `conflicts` check: the newest name conflicts resolved when applying
/// the peer's changes (`conflicts` newest first).
pub fn conflicts_check(conflicts: &[crate::store::ConflictRecord], now_ms: i64) -> HealthCheck {
    let Some(newest) = conflicts.first() else {
        return check("conflicts", CheckStatus::Ok, "no name conflicts between the nodes");
    };
    let shown: Vec<String> = conflicts
        .iter()
        .take(CONFLICTS_SHOWN)
        .map(|c| format!("{} {:?} {}", c.kind, c.name, c.outcome))
        .collect();
    let more = if conflicts.len() > CONFLICTS_SHOWN { " and older ones" } else { "" };
    let status = if now_ms - newest.at < CONFLICT_WARN_MS { CheckStatus::Warning } else { CheckStatus::Ok };
    check("conflicts", status, format!("resolved: {}{more}", shown.join("; ")))
}

/// A bulk connection may take a moment to come up after the link, or to
/// come back after a failure (its backoff); down longer than this, with the
/// link up, image copies (and later disk data) are held up: a warning.
const BULK_GRACE_MS: u64 = 10_000;

/// The peer check's fault for a link whose bulk connection stays down.
pub fn bulk_fault(link: &crate::cluster::link::LinkStatus) -> Option<String> {
    let down = link.bulk_down_ms.filter(|ms| *ms >= BULK_GRACE_MS)?;
    let why = link.bulk_error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default();
    Some(format!("the bulk connection has been down for {} s{why}: image copies wait", down / 1000))
}

/// The `peer` check: fine alone or paired with the link up; a warning when
/// paired and the link is down (the node still runs its own guests, but
/// the pair cannot fail over and changes are not replicated), or when a
/// join waits for the inviter's answer. `link` is the link as
/// `GET /v1/peer` shows it. With the link up, each of `faults` is a
/// warning too: a stalled state replication (the last thing that stopped
/// the stream), a bulk connection that stays down (see [`bulk_fault`]).
pub fn peer_check(
    peer: Option<&crate::store::PeerRecord>,
    link: Option<&crate::types::PeerLink>,
    faults: &[String],
) -> HealthCheck {
    use crate::store::PeerState;
    match (peer, link) {
        (None, _) => check("peer", CheckStatus::Ok, "not paired"),
        (Some(p), _) if p.state == PeerState::Joining => check(
            "peer",
            CheckStatus::Warning,
            format!("pairing with {} is not finished: waiting for its answer", p.node.name),
        ),
        (Some(p), Some(l)) if l.state == "up" => {
            let rtt = l.rtt_ms.map(|r| format!(", rtt {r:.1} ms")).unwrap_or_default();
            let up = format!("paired with {}, link {}{rtt}", p.node.name, l.detail);
            if faults.is_empty() {
                check("peer", CheckStatus::Ok, up)
            } else {
                check("peer", CheckStatus::Warning, format!("{up}; {}", faults.join("; ")))
            }
        }
        (Some(p), l) => {
            let why = l.map(|l| l.detail.as_str()).unwrap_or("not running");
            check("peer", CheckStatus::Warning, format!("paired with {}, link down: {why}", p.node.name))
        }
    }
}

/// How long a replicated disk's watched copy (the peer's on the owner, the
/// replica on the peer) may stay outdated or inconsistent before its check
/// is critical: long enough for a link flap or a restart of either node's
/// data plane to heal on its own (ack timeout 2 s, redial within 5 s, then
/// a delta resync), short enough that a node failure would not find a copy
/// missing many minutes of writes. The `NovacronDiskReplicaNotUpToDate`
/// alert uses the same duration.
pub const REPLICA_GRACE: std::time::Duration = std::time::Duration::from_secs(300);

fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{} KiB", b.div_ceil(1024)),
    }
}

fn human_duration(d: std::time::Duration) -> String {
    match d.as_secs() {
        s if s >= 3600 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// The check of one replicated disk, named `replica:<vm>/<device>`: ok when
/// the watched copy is up to date and connected; a warning while it syncs,
/// while the link is down, while async lag exceeds max_lag_seconds, and for
/// the first [`REPLICA_GRACE`] of an outdated or inconsistent copy;
/// critical after that, or when the data plane does not say.
pub fn replica_check(r: &super::disk_watch::ReplicatedDisk) -> HealthCheck {
    let d = &r.disk;
    let name = format!("replica:{}/{}", r.vm_name, d.device);
    let mode = r.spec.mode.as_str();
    // The copy that matters: the peer's for this node's VM, this node's
    // for a replica it holds.
    let (whose, state) = if r.primary {
        ("the peer's copy", d.peer.as_deref().unwrap_or("unknown"))
    } else {
        ("this node's replica", d.local.as_str())
    };
    let detail = if d.detail.is_empty() { String::new() } else { format!(" ({})", d.detail) };
    if d.local == "unknown" || state == "unknown" {
        return check(&name, CheckStatus::Critical, format!("replication state unknown{detail}"));
    }
    let link = if d.connected { "link up" } else { "link to the peer down" };
    match state {
        "up_to_date" if !d.connected => check(
            &name,
            CheckStatus::Warning,
            format!(
                "{whose} is up to date as of the last write it got, but the link to the peer is down: \
                 it falls behind with the next write ({mode}){detail}"
            ),
        ),
        "up_to_date"
            if r.spec.mode == crate::types::ReplicationMode::Async
                && d.lag_seconds > r.spec.max_lag_seconds as f64 =>
        {
            check(
                &name,
                CheckStatus::Warning,
                format!(
                    "{whose} lags {:.0} s behind ({} unacknowledged), more than max_lag_seconds {}: \
                     check the link's bandwidth and the peer's disk",
                    d.lag_seconds,
                    human_bytes(d.lag_bytes),
                    r.spec.max_lag_seconds
                ),
            )
        }
        "up_to_date" => {
            let lag = if r.spec.mode == crate::types::ReplicationMode::Async {
                format!(", lag {:.1} s of {} s allowed", d.lag_seconds, r.spec.max_lag_seconds)
            } else {
                String::new()
            };
            check(&name, CheckStatus::Ok, format!("{whose} is up to date ({mode}, {link}{lag})"))
        }
        "syncing" => {
            let progress = d.sync.as_ref().map_or(String::new(), |s| {
                let pct = (s.bytes_done * 100).checked_div(s.bytes_total).unwrap_or(0);
                let eta = s.eta_seconds.map_or(String::new(), |e| format!(", about {e:.0} s left"));
                format!(": {} {pct}% of {}{eta}", s.kind, human_bytes(s.bytes_total))
            });
            check(
                &name,
                CheckStatus::Warning,
                format!("{whose} is being synced{progress}; the VM is not protected until it is done"),
            )
        }
        _ => {
            let why = if state == "inconsistent" {
                "a full sync has not completed, so it is no usable copy"
            } else {
                "it lacks the writes made since the link was lost"
            };
            let (status, is) = match r.not_current_for {
                Some(t) if t >= REPLICA_GRACE => {
                    (CheckStatus::Critical, format!("has been {state} for {}", human_duration(t)))
                }
                Some(t) => (CheckStatus::Warning, format!("has been {state} for {}", human_duration(t))),
                None => (CheckStatus::Warning, format!("is {state}")),
            };
            let backlog = if d.dirty_bytes > 0 {
                format!(", {} to resync", human_bytes(d.dirty_bytes))
            } else {
                String::new()
            };
            check(
                &name,
                status,
                format!(
                    "{whose} {is}: {why} ({link}{backlog}); a failover now would lose data: \
                     check `novacron peer status` and the network to the peer{detail}"
                ),
            )
        }
    }
}

impl Core {
    /// Every file a managed VM or an image record refers to.
    fn needed_files(&self) -> Vec<NeededFile> {
        let mut out = Vec::new();
        let need =
            |what: String, path: &str, critical: bool| NeededFile { what, path: path.into(), critical };
        for vm in self.vms.read().unwrap().values() {
            // An interrupted create has no files yet; reconciliation makes
            // them. A replica's disks live on its owner.
            if vm.state == VmState::Missing || !self.owns(vm) {
                continue;
            }
            for d in &vm.disks {
                out.push(need(format!("VM {} disk {}", vm.name, d.device), &d.path, true));
                if let Some(base) = &d.image {
                    out.push(need(format!("VM {} base image of {}", vm.name, d.device), base, true));
                }
            }
            if let Some(b) = &vm.boot {
                out.push(need(format!("VM {} kernel", vm.name), &b.kernel, true));
                if let Some(i) = &b.initrd {
                    out.push(need(format!("VM {} initrd", vm.name), i, true));
                }
            }
        }
        for img in self.images.read().unwrap().values() {
            out.push(need(format!("image {}", img.name), &img.path, false));
        }
        out.sort_by(|a, b| a.what.cmp(&b.what));
        out
    }

    pub(super) async fn health_report(&self) -> HealthReport {
        let mut checks =
            vec![check("daemon", CheckStatus::Ok, format!("serving, version {}", crate::VERSION))];

        let hv = self.hv.clone();
        let lv = tokio::task::spawn_blocking(move || hv.ping()).await.unwrap_or(false);
        self.metrics.libvirt_connected.store(lv, Ordering::Relaxed);
        checks.push(if lv {
            check("libvirt", CheckStatus::Ok, format!("connected to {}", self.cfg.hypervisor.uri))
        } else {
            check("libvirt", CheckStatus::Critical, format!("{} does not answer", self.cfg.hypervisor.uri))
        });

        let store = self.store.clone();
        let qc = tokio::task::spawn_blocking(move || store.quick_check()).await;
        checks.push(match qc {
            Ok(Ok(s)) if s == "ok" => check("store", CheckStatus::Ok, "quick_check ok"),
            Ok(Ok(s)) => check("store", CheckStatus::Critical, format!("quick_check: {s}")),
            Ok(Err(e)) => check("store", CheckStatus::Critical, e.to_string()),
            Err(e) => check("store", CheckStatus::Critical, e.to_string()),
        });

        checks.push(disk_check(fs_space(&self.paths.data_dir), &self.paths.data_dir));
        checks.push(cert_check(self.tls_not_after.get().copied(), crate::store::now_ms() / 1000));
        let needed = self.needed_files();
        checks.push(
            tokio::task::spawn_blocking(move || files_check(&needed, |p| Path::new(p).is_file()))
                .await
                .unwrap_or_else(|e| check("files", CheckStatus::Critical, e.to_string())),
        );

        let mut crashed: Vec<String> = self
            .vms
            .read()
            .unwrap()
            .values()
            .filter(|v| v.state == VmState::Crashed)
            .map(|v| v.name.clone())
            .collect();
        crashed.sort();
        checks.push(if crashed.is_empty() {
            check("vms", CheckStatus::Ok, format!("{} managed, none crashed", self.vm_count()))
        } else {
            check("vms", CheckStatus::Critical, format!("crashed: {}", crashed.join(", ")))
        });

        // The latest host update, once there is one: a rollback or a failed
        // install needs a look (the node runs, on its previous version).
        if let Some(u) = self.update_record() {
            use crate::types::UpdateState as U;
            let msg = format!("{} to {}: {}", u.version, u.target_slot, u.message.as_deref().unwrap_or(""));
            let status = match u.state {
                U::RolledBack | U::Failed => CheckStatus::Warning,
                _ => CheckStatus::Ok,
            };
            let word = match u.state {
                U::RolledBack => "rolled back",
                U::Failed => "failed",
                U::Succeeded => "succeeded",
                _ => "in progress",
            };
            checks.push(check("update", status, format!("{word}: {}", msg.trim_end_matches([' ', ':']))));
        }

        let peer = self.peer_record();
        let link = peer.as_ref().map(|p| self.link_view(p));
        let repl = self.replication.read().unwrap().as_ref().and_then(|r| r.fault.clone());
        let bulk = self.peer_link_status().and_then(|st| bulk_fault(&st.link));
        let faults: Vec<String> =
            repl.map(|f| format!("state replication: {f}")).into_iter().chain(bulk).collect();
        checks.push(peer_check(peer.as_ref(), link.as_ref(), &faults));

        checks.push(match self.conflicts(CONFLICTS_SHOWN + 1).await {
            Ok(c) => conflicts_check(&c, crate::store::now_ms()),
            Err(e) => check("conflicts", CheckStatus::Warning, format!("cannot read: {e}")),
        });
        checks.extend(self.replicated_disks().0.iter().map(replica_check));

        let status = checks.iter().map(|c| c.status).max().unwrap_or(CheckStatus::Ok);
        HealthReport { status, node: self.node.id, version: crate::VERSION.into(), checks }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        let d = Path::new("/d");
        assert_eq!(disk_check(Some((50, 100)), d).status, CheckStatus::Ok);
        assert_eq!(disk_check(Some((10, 100)), d).status, CheckStatus::Warning);
        assert_eq!(disk_check(Some((4, 100)), d).status, CheckStatus::Critical);
        assert_eq!(disk_check(None, d).status, CheckStatus::Critical);
        let now = 1_000_000_000;
        assert_eq!(cert_check(Some(now + 90 * 86_400), now).status, CheckStatus::Ok);
        assert_eq!(cert_check(Some(now + 20 * 86_400), now).status, CheckStatus::Warning);
        assert_eq!(cert_check(Some(now + 3 * 86_400), now).status, CheckStatus::Critical);
        assert_eq!(cert_check(Some(now - 1), now).status, CheckStatus::Critical);
        assert_eq!(cert_check(None, now).status, CheckStatus::Warning);
        assert!(CheckStatus::Critical > CheckStatus::Warning && CheckStatus::Warning > CheckStatus::Ok);
        assert_eq!(CheckStatus::Warning.exit_code(), 1);
    }

    #[test]
    fn a_stalled_stream_warns_while_the_link_is_up() {
        let peer = crate::store::PeerRecord {
            node: crate::types::NodeInfo {
                node_id: uuid::Uuid::from_u128(2),
                name: "edge-2".into(),
                addresses: Vec::new(),
                api_port: 8443,
                link_port: 8444,
                fingerprint: "AA".into(),
            },
            pair_key: Vec::new(),
            state: crate::store::PeerState::Paired,
            paired_at: 0,
        };
        let link = crate::types::PeerLink {
            state: "up".into(),
            detail: "up over 10.0.0.2:8444 (this node dials)".into(),
            address: None,
            last_heartbeat: None,
            rtt_ms: Some(0.3),
            bulk: "up".into(),
        };
        let ok = peer_check(Some(&peer), Some(&link), &[]);
        assert_eq!(
            (ok.status, ok.message.as_str()),
            (CheckStatus::Ok, "paired with edge-2, link up over 10.0.0.2:8444 (this node dials), rtt 0.3 ms")
        );
        let stalled = peer_check(
            Some(&peer),
            Some(&link),
            &["state replication: applying the peer's changes after 7: disk full".into()],
        );
        assert_eq!(stalled.status, CheckStatus::Warning);
        assert!(
            stalled.message.ends_with("; state replication: applying the peer's changes after 7: disk full"),
            "{}",
            stalled.message
        );
    }

    #[test]
    fn a_bulk_connection_down_past_its_grace_is_a_warning() {
        use crate::cluster::link::{LinkState, LinkStatus, Role};
        let link = |down: Option<u64>| LinkStatus {
            state: LinkState::Up,
            role: Role::Dialer,
            address: None,
            rtt_ms: None,
            last_heartbeat_age_ms: None,
            last_error: None,
            ups: 1,
            downs: 0,
            handshake_failures: 0,
            bulk: if down.is_some() { LinkState::Backoff } else { LinkState::Up },
            bulk_error: down.map(|_| "bulk connection lost: reset".into()),
            bulk_down_ms: down,
        };
        assert_eq!(bulk_fault(&link(None)), None);
        // Coming up, or between retries: not yet.
        assert_eq!(bulk_fault(&link(Some(9_999))), None);
        assert_eq!(
            bulk_fault(&link(Some(12_500))).as_deref(),
            Some(
                "the bulk connection has been down for 12 s (bulk connection lost: reset): image copies wait"
            )
        );
    }

    #[test]
    fn conflicts_warn_for_a_week() {
        let c = |at| crate::store::ConflictRecord {
            at,
            kind: "token".into(),
            name: "admin".into(),
            kept: "a".into(),
            loser: "b".into(),
            outcome: "renamed to admin-bbbbbb".into(),
        };
        assert_eq!(conflicts_check(&[], 0).status, CheckStatus::Ok);
        let fresh = conflicts_check(&[c(100)], 200);
        assert_eq!(fresh.status, CheckStatus::Warning);
        assert_eq!(fresh.message, "resolved: token \"admin\" renamed to admin-bbbbbb");
        assert_eq!(conflicts_check(&[c(0)], CONFLICT_WARN_MS).status, CheckStatus::Ok);
        assert!(conflicts_check(&vec![c(0); 6], 1).message.ends_with("and older ones"));
    }

    #[test]
    fn missing_files() {
        let f =
            |what: &str, path: &str, critical| NeededFile { what: what.into(), path: path.into(), critical };
        let needed = [f("VM web disk vda", "/d/vda", true), f("image deb", "/i/deb", false)];
        assert_eq!(files_check(&needed, |_| true).status, CheckStatus::Ok);
        let c = files_check(&needed, |p| p != "/i/deb");
        assert_eq!((c.status, c.message.as_str()), (CheckStatus::Warning, "missing: image deb (/i/deb)"));
        assert_eq!(files_check(&needed, |p| p != "/d/vda").status, CheckStatus::Critical);
        assert_eq!(files_check(&[], |_| false).status, CheckStatus::Ok);
    }

    #[test]
    fn replicated_disks_map_to_ok_warning_critical() {
        use super::super::disk_watch::ReplicatedDisk;
        use crate::types::{DiskReplica, ReplicationMode, ReplicationSpec, SyncProgress};
        use std::time::Duration;
        let disk = |local: &str, peer: Option<&str>, connected| DiskReplica {
            device: "vda".into(),
            local: local.into(),
            peer: peer.map(Into::into),
            connected,
            sync: None,
            lag_bytes: 0,
            lag_seconds: 0.0,
            dirty_bytes: 0,
            sync_bytes_total: 0,
            detail: String::new(),
        };
        let r = |mode, d: DiskReplica, bad: Option<u64>| ReplicatedDisk {
            vm_id: uuid::Uuid::from_u128(1),
            vm_name: "web".into(),
            primary: d.peer.is_some(),
            spec: ReplicationSpec { mode, max_lag_seconds: 30 },
            disk: d,
            write_wait: None,
            not_current_for: bad.map(Duration::from_secs),
        };
        let sync = ReplicationMode::Sync;
        let ok = replica_check(&r(sync, disk("up_to_date", Some("up_to_date"), true), None));
        assert_eq!(
            (ok.name.as_str(), ok.status, ok.message.as_str()),
            ("replica:web/vda", CheckStatus::Ok, "the peer's copy is up to date (sync, link up)")
        );
        // Cut: the link first, then the outdated mark; critical past the grace.
        let c = replica_check(&r(sync, disk("up_to_date", Some("up_to_date"), false), None));
        assert_eq!(c.status, CheckStatus::Warning, "{}", c.message);
        let mut d = disk("up_to_date", Some("outdated"), false);
        d.dirty_bytes = 3 << 20;
        let c = replica_check(&r(sync, d.clone(), Some(40)));
        assert_eq!(c.status, CheckStatus::Warning);
        assert_eq!(
            c.message,
            "the peer's copy has been outdated for 40 s: it lacks the writes made since the link was lost \
             (link to the peer down, 3.0 MiB to resync); a failover now would lose data: \
             check `novacron peer status` and the network to the peer"
        );
        let c = replica_check(&r(sync, d, Some(REPLICA_GRACE.as_secs() + 60)));
        assert_eq!(c.status, CheckStatus::Critical);
        assert!(c.message.contains("for 6 min"), "{}", c.message);
        // A resync is a warning however long the outage was.
        let mut d = disk("up_to_date", Some("syncing"), true);
        d.sync = Some(SyncProgress {
            kind: "delta".into(),
            bytes_done: 1 << 20,
            bytes_total: 4 << 20,
            rate_bytes_per_sec: 1e6,
            eta_seconds: Some(3.2),
        });
        let c = replica_check(&r(sync, d, Some(3600)));
        assert_eq!(c.status, CheckStatus::Warning);
        assert!(c.message.contains("being synced: delta 25% of 4.0 MiB, about 3 s left"), "{}", c.message);
        // Async: lag past max_lag_seconds warns.
        let mut d = disk("up_to_date", Some("up_to_date"), true);
        d.lag_seconds = 45.0;
        let c = replica_check(&r(ReplicationMode::Async, d.clone(), None));
        assert_eq!(c.status, CheckStatus::Warning);
        assert!(c.message.contains("more than max_lag_seconds 30"), "{}", c.message);
        d.lag_seconds = 2.0;
        assert_eq!(replica_check(&r(ReplicationMode::Async, d, None)).status, CheckStatus::Ok);
        // A replica held for the peer: its own copy counts.
        let c = replica_check(&r(sync, disk("up_to_date", None, true), None));
        assert_eq!(
            (c.status, c.message.as_str()),
            (CheckStatus::Ok, "this node's replica is up to date (sync, link up)")
        );
        let c = replica_check(&r(sync, disk("inconsistent", None, false), Some(600)));
        assert_eq!(c.status, CheckStatus::Critical);
        assert!(
            c.message.starts_with("this node's replica has been inconsistent for 10 min: a full sync"),
            "{}",
            c.message
        );
        // The data plane does not answer.
        let mut d = disk("unknown", None, false);
        d.detail = "the data plane does not answer".into();
        let c = replica_check(&r(sync, d, None));
        assert_eq!(
            (c.status, c.message.as_str()),
            (CheckStatus::Critical, "replication state unknown (the data plane does not answer)")
        );
    }
}
