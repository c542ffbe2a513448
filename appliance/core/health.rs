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
        return check("certificate", CheckStatus::Ok, "expiry unknown (certificate from the configuration)");
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

impl Core {
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

        // Two-node HA (peer link, witness, replication) is not built yet.
        checks.push(check("peer", CheckStatus::Ok, "not paired"));

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
        assert_eq!(cert_check(None, now).status, CheckStatus::Ok);
        assert!(CheckStatus::Critical > CheckStatus::Warning && CheckStatus::Warning > CheckStatus::Ok);
        assert_eq!(CheckStatus::Warning.exit_code(), 1);
    }
}
