//! Host subsystem: what the running daemon knows of this machine (facts
//! from procfs, KVM) and admission. The tools that change the host (firmware
//! preflight, Redfish, first-boot setup, the A/B installer) are in `ops`.

use std::path::Path;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostFacts {
    pub hostname: String,
    pub cpus: u32,
    pub memory_total_mib: u64,
    pub memory_available_mib: u64,
    pub load: [f64; 3],
    pub kvm_usable: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot read host facts from /proc: {0}")]
    Proc(String),
}

pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Reads memory, CPU count and load from procfs.
pub fn facts() -> Result<HostFacts, HostError> {
    use procfs::Current;
    let mem = procfs::Meminfo::current().map_err(|e| HostError::Proc(e.to_string()))?;
    let load = procfs::LoadAverage::current().map_err(|e| HostError::Proc(e.to_string()))?;
    let cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    Ok(HostFacts {
        hostname: hostname(),
        cpus,
        memory_total_mib: mem.mem_total / (1024 * 1024),
        memory_available_mib: mem.mem_available.unwrap_or(mem.mem_free) / (1024 * 1024),
        load: [load.one as f64, load.five as f64, load.fifteen as f64],
        kvm_usable: kvm_usable(Path::new("/dev/kvm")),
    })
}

/// `/dev/kvm` exists and this process may open it read-write, which is what
/// QEMU needs for hardware acceleration.
pub fn kvm_usable(dev: &Path) -> bool {
    std::fs::OpenOptions::new().read(true).write(true).open(dev).is_ok()
}

/// Whether a guest of `memory_mib` fits: it must leave `reserve_mib` of the
/// host's available memory untouched. Returns the available memory on
/// refusal.
pub fn admit(memory_mib: u64, reserve_mib: u64) -> Result<(), (u64, u64)> {
    let available = facts().map(|f| f.memory_available_mib).unwrap_or(0);
    check_admission(memory_mib, reserve_mib, available)
}

pub fn check_admission(memory_mib: u64, reserve_mib: u64, available_mib: u64) -> Result<(), (u64, u64)> {
    if available_mib.saturating_sub(reserve_mib) >= memory_mib {
        Ok(())
    } else {
        Err((available_mib, reserve_mib))
    }
}

/// CPUs the host has online. Guests share all of them: QEMU runs under
/// libvirtd, outside the daemon's cgroup and CPU affinity.
pub fn online_cpus() -> u32 {
    use nix::unistd::{sysconf, SysconfVar};
    match sysconf(SysconfVar::_NPROCESSORS_ONLN) {
        Ok(Some(n)) if n > 0 => n as u32,
        _ => std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
    }
}

/// Whether a VM of `vcpus` fits this host: at most `overcommit` vCPUs per
/// host CPU. Returns the largest allowed count on refusal.
pub fn admit_vcpus(vcpus: u32, overcommit: u32) -> Result<(), u32> {
    check_vcpus(vcpus, online_cpus(), overcommit)
}

pub fn check_vcpus(vcpus: u32, host_cpus: u32, overcommit: u32) -> Result<(), u32> {
    let max = host_cpus.saturating_mul(overcommit.max(1));
    if vcpus <= max {
        Ok(())
    } else {
        Err(max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_are_plausible() {
        let f = facts().unwrap();
        assert!(f.cpus >= 1);
        assert!(f.memory_total_mib >= f.memory_available_mib && f.memory_total_mib > 0);
    }

    #[test]
    fn admission_keeps_the_reserve() {
        assert!(check_admission(512, 1024, 2048).is_ok());
        assert_eq!(check_admission(1025, 1024, 2048), Err((2048, 1024)));
        assert!(check_admission(1, 4096, 1024).is_err());
    }

    #[test]
    fn vcpus_stay_within_host_cpus_times_overcommit() {
        assert!(check_vcpus(2, 2, 1).is_ok());
        assert_eq!(check_vcpus(3, 2, 1), Err(2));
        assert_eq!(check_vcpus(64, 2, 1), Err(2));
        assert!(check_vcpus(8, 2, 4).is_ok());
        assert_eq!(check_vcpus(9, 2, 4), Err(8));
        assert!(online_cpus() >= 1);
    }
}
