//! Firmware preflight: checks that the running host provides what a
//! [`Profile`] asks for (CPU virtualization, a usable /dev/kvm, an IOMMU,
//! the kernel command line, a hardware watchdog, memory, disk), and says
//! for each finding exactly how to fix it.
//!
//! The host is read through a [`Root`] (procfs, sysfs and /dev roots), so
//! tests point the checks at fake trees.

use super::firmware::{Profile, Provides};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Where the checks read the host from: `/proc`, `/sys` and `/dev` on a
/// real host.
#[derive(Debug, Clone)]
pub struct Root {
    pub proc: PathBuf,
    pub sys: PathBuf,
    pub dev: PathBuf,
}

impl Root {
    pub fn host() -> Root {
        Root { proc: "/proc".into(), sys: "/sys".into(), dev: "/dev".into() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// Stable id: cpu_virtualization, kvm_device, nested_virtualization,
    /// iommu, kernel_cmdline, watchdog, memory, disk.
    pub id: &'static str,
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// The exact action that fixes it; absent when the check passed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub profile: String,
    /// The worst status of all findings.
    pub status: Status,
    pub findings: Vec<Finding>,
}

impl Report {
    /// Nagios-like: 0 all ok, 1 warnings, 2 failures.
    pub fn exit_code(&self) -> i32 {
        match self.status {
            Status::Ok => 0,
            Status::Warn => 1,
            Status::Fail => 2,
        }
    }
}

fn ok(id: &'static str, detail: String) -> Finding {
    Finding { id, status: Status::Ok, detail, fix: None }
}

fn bad(id: &'static str, status: Status, detail: String, fix: String) -> Finding {
    Finding { id, status, detail, fix: Some(fix) }
}

/// "enable Intel VT-x (BIOS attribute ProcVirtualization=Enabled) in firmware"
fn enable_in_firmware(profile: &Profile, feature: &str, what: Provides) -> String {
    match profile.bios_hint(what) {
        Some(hint) => format!("enable {feature} ({hint}) in firmware"),
        None => format!("enable {feature} in firmware setup"),
    }
}

/// Runs every check of `profile` against `root`; `data_dir` is where the
/// disk check measures free space.
pub fn run(profile: &Profile, root: &Root, data_dir: &Path) -> Report {
    let cpuinfo = std::fs::read_to_string(root.proc.join("cpuinfo")).unwrap_or_default();
    let mut findings = vec![cpu_virtualization(profile, &cpuinfo)];
    findings.push(kvm_device(profile, root, &cpuinfo));
    findings.extend(nested(profile, root));
    let iommu = iommu(profile, root);
    let iommu_active = iommu.status == Status::Ok;
    findings.push(iommu);
    findings.push(kernel_cmdline(profile, root, iommu_active));
    findings.push(watchdog(profile, root));
    findings.push(memory(profile, root));
    findings.push(disk(profile, data_dir));
    let status = findings.iter().map(|f| f.status).max().unwrap_or(Status::Ok);
    Report { profile: profile.name.clone(), status, findings }
}

fn cpu_flags(cpuinfo: &str) -> Vec<&str> {
    cpuinfo
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim() == "flags"))
        .map(|(_, v)| v.split_whitespace().collect())
        .unwrap_or_default()
}

fn cpu_virtualization(profile: &Profile, cpuinfo: &str) -> Finding {
    let flags = cpu_flags(cpuinfo);
    let flag = profile.cpu.flag.as_str();
    if flags.contains(&flag) {
        return ok("cpu_virtualization", format!("{} available (cpu flag {flag})", profile.cpu.feature));
    }
    let detail = if flags.is_empty() {
        "no cpu flags in /proc/cpuinfo".to_string()
    } else {
        format!("cpu flag {flag} missing: {} is off or absent", profile.cpu.feature)
    };
    let fix = if flags.contains(&"hypervisor") {
        format!(
            "this host is itself a virtual machine: enable nested virtualization for it on the outer \
             hypervisor; on bare metal, {}",
            enable_in_firmware(profile, &profile.cpu.feature, Provides::Virtualization)
        )
    } else {
        enable_in_firmware(profile, &profile.cpu.feature, Provides::Virtualization)
    };
    bad("cpu_virtualization", Status::Fail, detail, fix)
}

fn kvm_device(profile: &Profile, root: &Root, cpuinfo: &str) -> Finding {
    let dev = root.dev.join("kvm");
    if crate::host::kvm_usable(&dev) {
        return ok("kvm_device", format!("{} opens read-write", dev.display()));
    }
    let module = &profile.cpu.kvm_module;
    match std::fs::metadata(&dev) {
        Err(_) => {
            let fix = if cpu_flags(cpuinfo).contains(&profile.cpu.flag.as_str()) {
                format!("load KVM: modprobe {module} (and check `dmesg | grep -i kvm` if it refuses)")
            } else {
                format!(
                    "{}, then load KVM: modprobe {module}",
                    enable_in_firmware(profile, &profile.cpu.feature, Provides::Virtualization)
                )
            };
            bad("kvm_device", Status::Fail, format!("{} does not exist", dev.display()), fix)
        }
        Ok(_) => bad(
            "kvm_device",
            Status::Fail,
            format!("{} exists but cannot be opened read-write by this user", dev.display()),
            format!("run as root, or add the user to the group owning {} (usually kvm)", dev.display()),
        ),
    }
}

fn nested(profile: &Profile, root: &Root) -> Option<Finding> {
    let module = &profile.cpu.kvm_module;
    let param = root.sys.join("module").join(module).join("parameters/nested");
    let value = std::fs::read_to_string(&param).ok().map(|v| v.trim().to_string());
    let on = matches!(value.as_deref(), Some("Y" | "y" | "1"));
    match (on, profile.cpu.nested) {
        (true, _) => Some(ok("nested_virtualization", format!("{module} nested=on"))),
        (false, false) => None,
        (false, true) => Some(bad(
            "nested_virtualization",
            Status::Warn,
            match value {
                Some(v) => format!("{module} nested={v}"),
                None => format!("{} not found ({module} not loaded)", param.display()),
            },
            format!(
                "echo 'options {module} nested=1' > /etc/modprobe.d/novacron-nested.conf, then \
                 modprobe -r {module} && modprobe {module} (with no guests running)"
            ),
        )),
    }
}

fn non_empty_dir(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.filter_map(Result::ok).count()).unwrap_or(0)
}

fn cmdline_fix(params: &[&str]) -> String {
    format!("add {} to GRUB_CMDLINE_LINUX in /etc/default/grub, run update-grub and reboot", params.join(" "))
}

fn iommu(profile: &Profile, root: &Root) -> Finding {
    let units = non_empty_dir(&root.sys.join("class/iommu"));
    let groups = non_empty_dir(&root.sys.join("kernel/iommu_groups"));
    if units > 0 || groups > 0 {
        return ok(
            "iommu",
            format!("{} active: {units} IOMMU unit(s), {groups} IOMMU group(s)", profile.iommu.feature),
        );
    }
    let status = if profile.iommu.required { Status::Fail } else { Status::Warn };
    let params: Vec<&str> = profile.kernel.cmdline.iter().map(String::as_str).collect();
    let mut fix = enable_in_firmware(profile, &profile.iommu.feature, Provides::Iommu);
    if !params.is_empty() {
        fix = format!("{fix}, and {}", cmdline_fix(&params));
    }
    bad(
        "iommu",
        status,
        "no IOMMU: /sys/class/iommu and /sys/kernel/iommu_groups are empty (no device passthrough, no \
         DMA isolation)"
            .into(),
        fix,
    )
}

fn kernel_cmdline(profile: &Profile, root: &Root, iommu_active: bool) -> Finding {
    let cmdline = std::fs::read_to_string(root.proc.join("cmdline")).unwrap_or_default();
    let words: Vec<&str> = cmdline.split_whitespace().collect();
    let missing: Vec<&str> =
        profile.kernel.cmdline.iter().map(String::as_str).filter(|p| !words.contains(p)).collect();
    if missing.is_empty() {
        let have = if profile.kernel.cmdline.is_empty() {
            "nothing required".to_string()
        } else {
            profile.kernel.cmdline.join(" ")
        };
        return ok("kernel_cmdline", format!("kernel command line has {have}"));
    }
    // Without the IOMMU it needs, a missing parameter is the likely cause.
    let status = if !iommu_active && profile.iommu.required { Status::Fail } else { Status::Warn };
    bad(
        "kernel_cmdline",
        status,
        format!("kernel command line lacks {}", missing.join(" ")),
        cmdline_fix(&missing),
    )
}

fn watchdog(profile: &Profile, root: &Root) -> Finding {
    let status = if profile.watchdog.required { Status::Fail } else { Status::Warn };
    let mut devices: Vec<String> = std::fs::read_dir(&root.dev)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("watchdog"))
                .collect()
        })
        .unwrap_or_default();
    devices.sort();
    let mut identities: Vec<(String, String)> = std::fs::read_dir(root.sys.join("class/watchdog"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let id = std::fs::read_to_string(e.path().join("identity")).unwrap_or_default();
                    (name, id.trim().to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    identities.sort();
    if devices.is_empty() || identities.is_empty() {
        return bad(
            "watchdog",
            status,
            "no watchdog device (/dev/watchdog*, /sys/class/watchdog empty)".into(),
            profile.watchdog.fix.clone(),
        );
    }
    let described: Vec<String> = identities.iter().map(|(n, id)| format!("{n} ({id})")).collect();
    let hardware: Vec<&(String, String)> = identities
        .iter()
        .filter(|(_, id)| !id.is_empty() && !id.eq_ignore_ascii_case("Software Watchdog"))
        .collect();
    if hardware.is_empty() {
        return bad(
            "watchdog",
            status,
            format!(
                "only a software watchdog: {} (softdog cannot reset a hung kernel or a stuck host)",
                described.join(", ")
            ),
            profile.watchdog.fix.clone(),
        );
    }
    ok("watchdog", format!("hardware watchdog: {}", described.join(", ")))
}

fn memory(profile: &Profile, root: &Root) -> Finding {
    use procfs::FromRead;
    let min = profile.memory.min_mib;
    match procfs::Meminfo::from_file(root.proc.join("meminfo")) {
        Ok(m) => {
            let total = m.mem_total / (1024 * 1024);
            if total >= min {
                ok("memory", format!("{total} MiB of RAM (profile minimum {min} MiB)"))
            } else {
                bad(
                    "memory",
                    Status::Fail,
                    format!("{total} MiB of RAM, below the profile minimum of {min} MiB"),
                    format!("fit at least {} MiB more RAM (the profile needs {min} MiB)", min - total),
                )
            }
        }
        Err(e) => bad(
            "memory",
            Status::Fail,
            format!("cannot read {}: {e}", root.proc.join("meminfo").display()),
            "mount procfs on /proc".into(),
        ),
    }
}

fn disk(profile: &Profile, data_dir: &Path) -> Finding {
    let min = profile.disk.min_free_gib;
    // The data dir may not exist before the first start: measure the
    // nearest existing ancestor, which is where it will be created.
    let existing = data_dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    match nix::sys::statvfs::statvfs(existing) {
        Ok(st) => {
            let free_gib = st.blocks_available().saturating_mul(st.fragment_size()) >> 30;
            if free_gib >= min {
                ok(
                    "disk",
                    format!("{free_gib} GiB free at {} (profile minimum {min} GiB)", existing.display()),
                )
            } else {
                bad(
                    "disk",
                    Status::Fail,
                    format!(
                        "{free_gib} GiB free at {}, below the profile minimum of {min} GiB",
                        existing.display()
                    ),
                    format!(
                        "free at least {} GiB on the file system of {}, or put the data directory \
                         (data_dir in /etc/novacron/novacron.toml) on a disk with {min} GiB free",
                        min - free_gib,
                        existing.display()
                    ),
                )
            }
        }
        Err(e) => bad(
            "disk",
            Status::Fail,
            format!("cannot statvfs {}: {e}", existing.display()),
            format!("create the data directory {}", data_dir.display()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::firmware;
    use std::fs;

    struct Fake {
        dir: PathBuf,
        root: Root,
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    fn fake(name: &str) -> Fake {
        let dir = std::env::temp_dir().join(format!("novacron-preflight-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let root = Root { proc: dir.join("proc"), sys: dir.join("sys"), dev: dir.join("dev") };
        for d in [&root.proc, &root.sys, &root.dev] {
            fs::create_dir_all(d).unwrap();
        }
        Fake { dir, root }
    }

    fn write(path: PathBuf, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    /// This host's /proc/meminfo (procfs needs every field) with MemTotal
    /// replaced.
    fn meminfo(total_kib: u64) -> String {
        let real = fs::read_to_string("/proc/meminfo").unwrap();
        real.lines()
            .map(|l| {
                if l.starts_with("MemTotal:") {
                    format!("MemTotal:       {total_kib} kB")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    }

    /// A host that has everything generic-intel wants.
    fn good_intel(f: &Fake) {
        let r = &f.root;
        write(
            r.proc.join("cpuinfo"),
            "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme vmx sse2\n",
        );
        write(
            r.proc.join("cmdline"),
            "BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro intel_iommu=on iommu=pt quiet\n",
        );
        write(r.proc.join("meminfo"), &meminfo(32 << 20));
        write(r.dev.join("kvm"), "");
        write(r.dev.join("watchdog"), "");
        write(r.dev.join("watchdog0"), "");
        write(r.sys.join("class/watchdog/watchdog0/identity"), "iTCO_wdt\n");
        fs::create_dir_all(r.sys.join("class/iommu/dmar0")).unwrap();
        fs::create_dir_all(r.sys.join("kernel/iommu_groups/0")).unwrap();
    }

    fn profile(min_free_gib: u64) -> Profile {
        let mut p = firmware::embedded("generic-intel").unwrap();
        p.disk.min_free_gib = min_free_gib;
        p
    }

    fn finding<'a>(r: &'a Report, id: &str) -> &'a Finding {
        r.findings.iter().find(|f| f.id == id).unwrap_or_else(|| panic!("no finding {id}: {r:?}"))
    }

    #[test]
    fn a_complete_host_passes() {
        let f = fake("good");
        good_intel(&f);
        let r = run(&profile(0), &f.root, &f.dir);
        assert_eq!(r.status, Status::Ok, "{r:#?}");
        assert_eq!(r.exit_code(), 0);
        assert!(r.findings.iter().all(|f| f.fix.is_none()));
        assert!(finding(&r, "watchdog").detail.contains("iTCO_wdt"));
        // Nested is not wanted by generic-intel and the parameter is absent.
        assert!(r.findings.iter().all(|f| f.id != "nested_virtualization"));
    }

    #[test]
    fn missing_vtx_fails_with_the_firmware_fix() {
        let f = fake("novmx");
        good_intel(&f);
        write(f.root.proc.join("cpuinfo"), "vendor_id\t: GenuineIntel\nflags\t\t: fpu sse2\n");
        fs::remove_file(f.root.dev.join("kvm")).unwrap();
        let r = run(&profile(0), &f.root, &f.dir);
        assert_eq!(r.exit_code(), 2);
        let cpu = finding(&r, "cpu_virtualization");
        assert_eq!(cpu.status, Status::Fail);
        assert_eq!(
            cpu.fix.as_deref(),
            Some("enable Intel VT-x (BIOS attribute ProcVirtualization=Enabled) in firmware")
        );
        let kvm = finding(&r, "kvm_device");
        assert_eq!(kvm.status, Status::Fail);
        assert!(kvm.fix.as_deref().unwrap().contains("modprobe kvm_intel"), "{kvm:?}");
    }

    #[test]
    fn a_guest_is_told_about_nested_virtualization() {
        let f = fake("guest");
        good_intel(&f);
        write(f.root.proc.join("cpuinfo"), "vendor_id\t: GenuineIntel\nflags\t\t: fpu hypervisor\n");
        let r = run(&profile(0), &f.root, &f.dir);
        assert!(finding(&r, "cpu_virtualization").fix.as_deref().unwrap().contains("outer hypervisor"));
    }

    #[test]
    fn no_iommu_and_no_cmdline_fail() {
        let f = fake("noiommu");
        good_intel(&f);
        fs::remove_dir_all(f.root.sys.join("class/iommu")).unwrap();
        fs::remove_dir_all(f.root.sys.join("kernel/iommu_groups/0")).unwrap();
        write(f.root.proc.join("cmdline"), "root=/dev/sda1 ro quiet\n");
        let r = run(&profile(0), &f.root, &f.dir);
        let iommu = finding(&r, "iommu");
        assert_eq!(iommu.status, Status::Fail);
        let fix = iommu.fix.as_deref().unwrap();
        assert!(
            fix.starts_with("enable Intel VT-d (BIOS attribute IntelProcVtd=Enabled) in firmware"),
            "{fix}"
        );
        assert!(fix.contains("intel_iommu=on iommu=pt"), "{fix}");
        let cmd = finding(&r, "kernel_cmdline");
        assert_eq!(cmd.status, Status::Fail);
        assert_eq!(cmd.detail, "kernel command line lacks intel_iommu=on iommu=pt");
    }

    #[test]
    fn missing_cmdline_word_with_an_active_iommu_only_warns() {
        let f = fake("cmdwarn");
        good_intel(&f);
        write(f.root.proc.join("cmdline"), "root=/dev/sda1 intel_iommu=on\n");
        let r = run(&profile(0), &f.root, &f.dir);
        assert_eq!(r.status, Status::Warn);
        assert_eq!(r.exit_code(), 1);
        assert_eq!(finding(&r, "kernel_cmdline").detail, "kernel command line lacks iommu=pt");
    }

    #[test]
    fn softdog_is_not_a_hardware_watchdog() {
        let f = fake("softdog");
        good_intel(&f);
        write(f.root.sys.join("class/watchdog/watchdog0/identity"), "Software Watchdog\n");
        let r = run(&profile(0), &f.root, &f.dir);
        let w = finding(&r, "watchdog");
        assert_eq!(w.status, Status::Fail);
        assert!(w.detail.contains("only a software watchdog"));
        assert!(w.fix.as_deref().unwrap().contains("iTCO_wdt"));
        fs::remove_dir_all(f.root.sys.join("class/watchdog")).unwrap();
        let r = run(&profile(0), &f.root, &f.dir);
        assert!(finding(&r, "watchdog").detail.starts_with("no watchdog device"));
    }

    #[test]
    fn small_memory_and_disk_fail() {
        let f = fake("small");
        good_intel(&f);
        write(f.root.proc.join("meminfo"), &meminfo(4 << 20));
        let r = run(&profile(u64::MAX >> 31), &f.root, &f.dir.join("not/yet/created"));
        let m = finding(&r, "memory");
        assert_eq!(m.status, Status::Fail);
        assert_eq!(m.detail, "4096 MiB of RAM, below the profile minimum of 8192 MiB");
        let d = finding(&r, "disk");
        assert_eq!(d.status, Status::Fail, "{d:?}");
        // Measured on the nearest existing ancestor.
        assert!(d.detail.contains(&f.dir.display().to_string()), "{d:?}");
    }

    #[test]
    fn nested_warns_only_when_the_profile_wants_it() {
        let f = fake("nested");
        good_intel(&f);
        write(f.root.sys.join("module/kvm_intel/parameters/nested"), "N\n");
        let mut p = profile(0);
        assert!(run(&p, &f.root, &f.dir).findings.iter().all(|f| f.id != "nested_virtualization"));
        p.cpu.nested = true;
        let r = run(&p, &f.root, &f.dir);
        let n = finding(&r, "nested_virtualization");
        assert_eq!(n.status, Status::Warn);
        assert!(n.fix.as_deref().unwrap().contains("options kvm_intel nested=1"));
        write(f.root.sys.join("module/kvm_intel/parameters/nested"), "Y\n");
        assert_eq!(finding(&run(&p, &f.root, &f.dir), "nested_virtualization").status, Status::Ok);
    }

    #[test]
    fn the_report_serializes_for_json() {
        let f = fake("json");
        good_intel(&f);
        let r = run(&profile(0), &f.root, &f.dir);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["profile"], "generic-intel");
        assert_eq!(v["status"], "ok");
        assert_eq!(v["findings"][0]["id"], "cpu_virtualization");
        assert!(v["findings"][0].get("fix").is_none());
    }
}
