//! Firmware profiles: what a host's firmware and kernel must provide for
//! NovaCron Edge, per platform, and the Redfish BIOS attributes that set it.
//!
//! The profiles in `firmware-config/` are embedded in the binary, so
//! `novacron preflight` and `novacron firmware apply` work on a bare host;
//! `--profile-file` loads one from a path instead. The schema is strict
//! (`deny_unknown_fields`): a misspelt key is an error, not a silent default.

use super::OpsError;
use serde::Deserialize;
use std::path::Path;

/// The profiles shipped in `firmware-config/`, by name.
pub const EMBEDDED: &[(&str, &str)] = &[
    ("generic-intel", include_str!("../../firmware-config/generic-intel.toml")),
    ("generic-amd", include_str!("../../firmware-config/generic-amd.toml")),
    ("dell-poweredge-r650", include_str!("../../firmware-config/dell-poweredge-r650.toml")),
    ("hpe-proliant-dl360-gen10", include_str!("../../firmware-config/hpe-proliant-dl360-gen10.toml")),
];

/// The CPU vendor a profile is for; preflight auto-selects on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuVendor {
    Intel,
    Amd,
}

impl CpuVendor {
    /// The `vendor_id` in /proc/cpuinfo.
    pub fn from_vendor_id(id: &str) -> Option<CpuVendor> {
        match id.trim() {
            "GenuineIntel" => Some(CpuVendor::Intel),
            "AuthenticAMD" => Some(CpuVendor::Amd),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Must match the file name without `.toml`.
    pub name: String,
    pub description: String,
    pub vendor: CpuVendor,
    pub cpu: CpuReq,
    pub iommu: IommuReq,
    pub kernel: KernelReq,
    pub watchdog: WatchdogReq,
    pub memory: MemoryReq,
    pub disk: DiskReq,
    /// Redfish BIOS attributes `firmware apply` sets.
    #[serde(default)]
    pub bios: Vec<BiosAttr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuReq {
    /// The /proc/cpuinfo flag of the virtualization extension: vmx or svm.
    pub flag: String,
    /// Its marketing name for messages: "Intel VT-x", "AMD-V".
    pub feature: String,
    /// The KVM module whose `nested` parameter is checked (kvm_intel, kvm_amd).
    pub kvm_module: String,
    /// Whether nested virtualization is wanted (a warning when off).
    #[serde(default)]
    pub nested: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IommuReq {
    /// Fail (true) or only warn (false) when there is no IOMMU.
    pub required: bool,
    /// Its marketing name: "Intel VT-d", "AMD-Vi".
    pub feature: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelReq {
    /// Parameters the running kernel's command line must contain, exactly
    /// as words (`intel_iommu=on`, `iommu=pt`).
    pub cmdline: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchdogReq {
    /// Fail (true) or only warn (false) without a hardware watchdog.
    pub required: bool,
    /// How to get a watchdog device on this platform (the fix text).
    pub fix: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryReq {
    pub min_mib: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskReq {
    /// Free space needed on the file system of the data directory.
    pub min_free_gib: u64,
    /// The data directory checked when the command is given none.
    pub data_dir: String,
}

/// What a BIOS attribute provides; preflight names it in its fixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Provides {
    Virtualization,
    Iommu,
    Sriov,
    Watchdog,
    Boot,
    Other,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BiosAttr {
    /// The attribute name exactly as the BMC's Bios resource spells it.
    pub name: String,
    pub value: AttrValue,
    pub provides: Provides,
    /// An alternative spelling that not every BMC has: skipped (and
    /// reported) when the BMC does not expose it, instead of an error.
    #[serde(default)]
    pub optional: bool,
}

/// A BIOS attribute value: Redfish attributes are strings, integers or
/// booleans.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum AttrValue {
    Bool(bool),
    Int(i64),
    Str(String),
}

impl AttrValue {
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            AttrValue::Bool(b) => serde_json::Value::Bool(*b),
            AttrValue::Int(i) => serde_json::Value::from(*i),
            AttrValue::Str(s) => serde_json::Value::String(s.clone()),
        }
    }

    /// Whether the BMC's current value is this one. Some BMCs report every
    /// value as a string, so `"true"`/`"8"` match `true`/`8`.
    pub fn matches(&self, current: &serde_json::Value) -> bool {
        if *current == self.to_json() {
            return true;
        }
        match (self, current) {
            (AttrValue::Str(_), _) => false,
            (_, serde_json::Value::String(s)) => s.eq_ignore_ascii_case(&self.to_string()),
            _ => false,
        }
    }
}

impl std::fmt::Display for AttrValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttrValue::Bool(b) => write!(f, "{b}"),
            AttrValue::Int(i) => write!(f, "{i}"),
            AttrValue::Str(s) => f.write_str(s),
        }
    }
}

impl Profile {
    /// Parses and validates a profile; `name` is used in errors.
    pub fn parse(name: &str, text: &str) -> Result<Profile, OpsError> {
        let invalid = |reason: String| OpsError::InvalidProfile { name: name.to_string(), reason };
        let p: Profile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if !matches!(p.cpu.flag.as_str(), "vmx" | "svm") {
            return Err(invalid(format!("cpu.flag must be vmx or svm, not {:?}", p.cpu.flag)));
        }
        if p.cpu.kvm_module.is_empty() || p.cpu.kvm_module.contains('/') {
            return Err(invalid("cpu.kvm_module must be a module name".into()));
        }
        if p.kernel.cmdline.iter().any(|w| w.is_empty() || w.contains(char::is_whitespace)) {
            return Err(invalid("kernel.cmdline entries must be single words".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for a in &p.bios {
            if a.name.is_empty() || !seen.insert(a.name.as_str()) {
                return Err(invalid(format!("BIOS attribute {:?} is empty or listed twice", a.name)));
            }
        }
        Ok(p)
    }

    /// The BIOS attributes that provide `what`, as `A=V, B=W` for fixes.
    pub fn bios_hint(&self, what: Provides) -> Option<String> {
        let attrs: Vec<String> = self
            .bios
            .iter()
            .filter(|a| a.provides == what)
            .map(|a| format!("{}={}", a.name, a.value))
            .collect();
        if attrs.is_empty() {
            None
        } else {
            let word = if attrs.len() == 1 { "attribute" } else { "attributes" };
            Some(format!("BIOS {word} {}", attrs.join(", ")))
        }
    }
}

/// The names of the embedded profiles.
pub fn names() -> Vec<&'static str> {
    EMBEDDED.iter().map(|(n, _)| *n).collect()
}

/// An embedded profile by name.
pub fn embedded(name: &str) -> Result<Profile, OpsError> {
    let (n, text) =
        EMBEDDED.iter().find(|(n, _)| *n == name).ok_or_else(|| OpsError::UnknownProfile(name.into()))?;
    let p = Profile::parse(n, text)?;
    if p.name != *n {
        return Err(OpsError::InvalidProfile { name: name.into(), reason: format!("name is {:?}", p.name) });
    }
    Ok(p)
}

/// A profile from a file.
pub fn load_file(path: &Path) -> Result<Profile, OpsError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| OpsError::ReadProfile { path: path.display().to_string(), reason: e.to_string() })?;
    Profile::parse(&path.display().to_string(), &text)
}

/// The generic profile for a CPU vendor.
pub fn generic_for(vendor: CpuVendor) -> &'static str {
    match vendor {
        CpuVendor::Intel => "generic-intel",
        CpuVendor::Amd => "generic-amd",
    }
}

/// Resolves `--profile`/`--profile-file`; with neither, the generic profile
/// for the CPU vendor in `cpuinfo` (the text of /proc/cpuinfo).
pub fn resolve(
    profile: Option<&str>,
    profile_file: Option<&Path>,
    cpuinfo: Option<&str>,
) -> Result<Profile, OpsError> {
    match (profile, profile_file) {
        (_, Some(path)) => load_file(path),
        (Some(name), None) => embedded(name),
        (None, None) => {
            let vendor = cpuinfo.and_then(vendor_of).ok_or_else(|| OpsError::InvalidProfile {
                name: "auto".into(),
                reason: "cannot tell the CPU vendor from /proc/cpuinfo; pass --profile".into(),
            })?;
            embedded(generic_for(vendor))
        }
    }
}

/// The CPU vendor named by the first `vendor_id` line of /proc/cpuinfo.
pub fn vendor_of(cpuinfo: &str) -> Option<CpuVendor> {
    cpuinfo
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim() == "vendor_id"))
        .and_then(|(_, v)| CpuVendor::from_vendor_id(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_embedded_profile_parses() {
        for name in names() {
            let p = embedded(name).unwrap();
            assert_eq!(p.name, name);
            assert!(p.memory.min_mib > 0 && p.disk.min_free_gib > 0);
            assert!(!p.bios.is_empty(), "{name} sets no BIOS attributes");
            assert!(p.bios_hint(Provides::Virtualization).is_some(), "{name}");
        }
        assert_eq!(embedded("generic-intel").unwrap().cpu.flag, "vmx");
        assert_eq!(embedded("generic-amd").unwrap().cpu.flag, "svm");
    }

    #[test]
    fn unknown_keys_and_profiles_are_refused() {
        let text = EMBEDDED[0].1.replace("[memory]", "[memory]\nmin_gib = 4");
        assert!(matches!(Profile::parse("x", &text), Err(OpsError::InvalidProfile { .. })));
        assert!(matches!(embedded("nope"), Err(OpsError::UnknownProfile(_))));
        let twice = format!(
            "{}\n[[bios]]\nname = \"X\"\nvalue = 1\nprovides = \"other\"\n[[bios]]\nname = \"X\"\nvalue = 2\nprovides = \"other\"\n",
            EMBEDDED[0].1
        );
        assert!(Profile::parse("x", &twice).is_err());
    }

    #[test]
    fn vendor_auto_selection() {
        let intel = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t: fpu vmx\n";
        let amd = "processor\t: 0\nvendor_id\t: AuthenticAMD\n";
        assert_eq!(resolve(None, None, Some(intel)).unwrap().name, "generic-intel");
        assert_eq!(resolve(None, None, Some(amd)).unwrap().name, "generic-amd");
        assert!(resolve(None, None, Some("vendor_id : HygonGenuine\n")).is_err());
        assert_eq!(
            resolve(Some("dell-poweredge-r650"), None, Some(amd)).unwrap().name,
            "dell-poweredge-r650"
        );
    }

    #[test]
    fn values_compare_like_bmcs_report_them() {
        assert!(AttrValue::Str("Enabled".into()).matches(&serde_json::json!("Enabled")));
        assert!(!AttrValue::Str("Enabled".into()).matches(&serde_json::json!("Disabled")));
        assert!(AttrValue::Bool(true).matches(&serde_json::json!("True")));
        assert!(AttrValue::Int(8).matches(&serde_json::json!("8")));
        assert!(!AttrValue::Int(8).matches(&serde_json::json!(9)));
    }
}
