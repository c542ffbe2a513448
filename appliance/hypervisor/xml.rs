//! Domain XML generation. Every value that comes from a user is escaped.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// XML namespace of the `<metadata>` element NovaCron writes into each domain.
pub const METADATA_NS: &str = "https://novacron.dev/xmlns/vm/1";

/// The `node` of NovaCron's `<metadata>` element in a domain's XML as
/// libvirt gives it back (libvirt may pick its own prefix and quotes).
pub fn metadata_node(xml: &str) -> Option<uuid::Uuid> {
    let at = xml.find(METADATA_NS)?;
    let start = xml[..at].rfind('<')?;
    let end = at + xml[at..].find('>')?;
    let tag = &xml[start..end];
    let i = tag.find("node=")? + 5;
    let quote = tag[i..].chars().next()?;
    let rest = &tag[i + 1..];
    uuid::Uuid::parse_str(&rest[..rest.find(quote)?]).ok()
}

/// One virtio NIC on a libvirt network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// libvirt network name.
    pub network: String,
    /// Fixed MAC (`52:54:00:xx:xx:xx`), stored by the core so the guest keeps
    /// its DHCP lease and interface naming across redefines.
    pub mac: String,
}

/// Everything needed to render one domain definition.
#[derive(Debug, Clone)]
pub struct DomainSpec {
    pub uuid: Uuid,
    pub name: String,
    /// libvirt domain type: `kvm` on real hosts, `qemu` (TCG) in CI.
    pub domain_type: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Attached as virtio disks vda, vdb, ...
    pub disks: Vec<DiskSource>,
    /// One virtio NIC each, in order.
    pub nics: Vec<Nic>,
    /// Read-only CD-ROM, e.g. a cloud-init `cidata` seed ISO.
    pub cdrom: Option<PathBuf>,
    /// Direct kernel boot.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    /// Everything the guest prints on its serial console is appended here.
    pub serial_log: PathBuf,
    /// The owning node, recorded in the domain's metadata.
    pub node_id: Uuid,
}

/// Where a virtio disk's blocks come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// A qcow2 file QEMU opens itself.
    File(PathBuf),
    /// A vhost-user-blk socket of the data plane (a raw file it serves and
    /// replicates). QEMU reconnects by itself after the data plane restarts,
    /// and the guest's requests wait meanwhile instead of failing.
    VhostUser(PathBuf),
}

/// Seconds between QEMU's attempts to reconnect a lost vhost-user socket:
/// the guest's I/O waits about this long after the data plane comes back.
pub const VHOST_RECONNECT_SECS: u32 = 1;

/// Target of the CD-ROM: machine 'pc' (i440fx) has IDE but no AHCI, and
/// hdc (secondary master) keeps hda/hdb free.
pub const CDROM_TARGET: &str = "hdc";

/// A random locally administered unicast MAC under QEMU's 52:54:00 prefix.
pub fn random_mac() -> String {
    let mut b = [0u8; 3];
    // getrandom only fails when the OS has no entropy source at all, which
    // the daemon cannot run without anyway.
    getrandom::getrandom(&mut b).expect("OS random source unavailable");
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

/// Escapes text for use both in element content and in attribute values
/// (either quote style), so callers never have to think about the context.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Paths are rendered lossily: libvirt XML is UTF-8, and the core only
/// builds paths from UTF-8 config values and UUIDs.
fn escape_path(p: &Path) -> String {
    escape(&p.to_string_lossy())
}

/// libvirt's disk naming: 0 -> "vda", 25 -> "vdz", 26 -> "vdaa", ...
pub fn disk_target(index: usize) -> String {
    let mut suffix = Vec::new();
    let mut n = index + 1;
    while n > 0 {
        n -= 1;
        suffix.push(b'a' + (n % 26) as u8);
        n /= 26;
    }
    suffix.reverse();
    format!("vd{}", String::from_utf8(suffix).unwrap_or_default())
}

/// Renders a persistent libvirt domain definition for `spec`.
///
/// `write!` into a `String` cannot fail, hence the ignored results.
pub fn domain_xml(spec: &DomainSpec) -> String {
    let mut x = String::with_capacity(2048);
    let _ = writeln!(x, "<domain type='{}'>", escape(&spec.domain_type));
    let _ = writeln!(x, "  <name>{}</name>", escape(&spec.name));
    // The UUID comes from the spec, so a redefine updates the same domain.
    let _ = writeln!(x, "  <uuid>{}</uuid>", spec.uuid.hyphenated());
    let _ = writeln!(x, "  <metadata>");
    let _ =
        writeln!(x, "    <novacron:vm xmlns:novacron='{METADATA_NS}' node='{}'/>", spec.node_id.hyphenated());
    let _ = writeln!(x, "  </metadata>");
    let _ = writeln!(x, "  <memory unit='MiB'>{}</memory>", spec.memory_mib);
    let _ = writeln!(x, "  <currentMemory unit='MiB'>{}</currentMemory>", spec.memory_mib);
    let _ = writeln!(x, "  <vcpu placement='static'>{}</vcpu>", spec.vcpus);
    if spec.disks.iter().any(|d| matches!(d, DiskSource::VhostUser(_))) {
        // vhost-user backends map guest memory: it must be a shareable fd.
        let _ = writeln!(
            x,
            "  <memoryBacking>\n    <source type='memfd'/>\n    <access mode='shared'/>\n  </memoryBacking>"
        );
    }

    let _ = writeln!(x, "  <os>");
    let _ = writeln!(x, "    <type arch='x86_64' machine='pc'>hvm</type>");
    if let Some(kernel) = &spec.kernel {
        let _ = writeln!(x, "    <kernel>{}</kernel>", escape_path(kernel));
        if let Some(initrd) = &spec.initrd {
            let _ = writeln!(x, "    <initrd>{}</initrd>", escape_path(initrd));
        }
        if let Some(cmdline) = &spec.cmdline {
            let _ = writeln!(x, "    <cmdline>{}</cmdline>", escape(cmdline));
        }
    } else {
        // Without a kernel, boot from the first disk.
        let _ = writeln!(x, "    <boot dev='hd'/>");
    }
    let _ = writeln!(x, "  </os>");
    // ACPI is what makes virDomainShutdown work; with type='qemu' libvirt
    // does not enable it implicitly.
    let _ = writeln!(x, "  <features>\n    <acpi/>\n  </features>");
    let _ = writeln!(x, "  <on_poweroff>destroy</on_poweroff>");
    let _ = writeln!(x, "  <on_reboot>restart</on_reboot>");
    let _ = writeln!(x, "  <on_crash>destroy</on_crash>");

    let _ = writeln!(x, "  <devices>");
    for (i, disk) in spec.disks.iter().enumerate() {
        x.push_str(&disk_xml(disk, &disk_target(i)));
    }
    if let Some(iso) = &spec.cdrom {
        // snapshot='no': internal snapshots skip the read-only raw ISO
        // (raw images cannot hold internal snapshots).
        let _ = writeln!(x, "    <disk type='file' device='cdrom' snapshot='no'>");
        let _ = writeln!(x, "      <driver name='qemu' type='raw'/>");
        let _ = writeln!(x, "      <source file='{}'/>", escape_path(iso));
        let _ = writeln!(x, "      <target dev='{CDROM_TARGET}' bus='ide'/>");
        let _ = writeln!(x, "      <readonly/>");
        let _ = writeln!(x, "    </disk>");
    }
    for nic in &spec.nics {
        let _ = writeln!(x, "    <interface type='network'>");
        let _ = writeln!(x, "      <mac address='{}'/>", escape(&nic.mac));
        let _ = writeln!(x, "      <source network='{}'/>", escape(&nic.network));
        let _ = writeln!(x, "      <model type='virtio'/>");
        let _ = writeln!(x, "    </interface>");
    }
    // A pty (not a file) so virDomainOpenConsole can attach; the <log>
    // still appends everything the guest prints to the same file.
    let log = escape_path(&spec.serial_log);
    let _ = writeln!(x, "    <serial type='pty'>");
    let _ = writeln!(x, "      <log file='{log}' append='on'/>");
    let _ = writeln!(x, "      <target port='0'/>");
    let _ = writeln!(x, "    </serial>");
    // A console whose target is 'serial' is folded by libvirt into the
    // serial device above.
    let _ = writeln!(x, "    <console type='pty'>");
    let _ = writeln!(x, "      <log file='{log}' append='on'/>");
    let _ = writeln!(x, "      <target type='serial' port='0'/>");
    let _ = writeln!(x, "    </console>");
    let _ = writeln!(x, "    <memballoon model='virtio'/>");
    let _ = writeln!(x, "  </devices>");
    let _ = writeln!(x, "</domain>");
    x
}

/// One virtio disk, as used both in [`domain_xml`] and for hotplug.
pub fn disk_xml(source: &DiskSource, target: &str) -> String {
    let path = match source {
        DiskSource::File(p) => p,
        DiskSource::VhostUser(sock) => return vhost_disk_xml(sock, target),
    };
    let mut x = String::with_capacity(256);
    let _ = writeln!(x, "    <disk type='file' device='disk'>");
    // cache='none' (O_DIRECT) keeps guest writes out of the host page
    // cache so a host crash cannot lose acknowledged writes; checked to
    // work on the appliance's ext4 data dir.
    let _ = writeln!(x, "      <driver name='qemu' type='qcow2' cache='none' discard='unmap'/>");
    let _ = writeln!(x, "      <source file='{}'/>", escape_path(path));
    let _ = writeln!(x, "      <target dev='{}' bus='virtio'/>", escape(target));
    let _ = writeln!(x, "    </disk>");
    x
}

fn vhost_disk_xml(sock: &Path, target: &str) -> String {
    let mut x = String::with_capacity(320);
    // No cache or io attributes: the data plane opens the file (O_DIRECT)
    // and honours flushes; QEMU only forwards the guest's requests.
    let _ = writeln!(x, "    <disk type='vhostuser' device='disk' snapshot='no'>");
    let _ = writeln!(x, "      <driver name='qemu' type='raw'/>");
    let _ = writeln!(x, "      <source type='unix' path='{}'>", escape_path(sock));
    let _ = writeln!(x, "        <reconnect enabled='yes' timeout='{VHOST_RECONNECT_SECS}'/>");
    let _ = writeln!(x, "      </source>");
    let _ = writeln!(x, "      <target dev='{}' bus='virtio'/>", escape(target));
    let _ = writeln!(x, "    </disk>");
    x
}

/// A libvirt virtual network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkSpec {
    /// A libvirt-managed bridge with dnsmasq DHCP, NATed to the host's uplink.
    Nat {
        name: String,
        bridge: String,
        gateway: Ipv4Addr,
        prefix: u8,
        dhcp_start: Ipv4Addr,
        dhcp_end: Ipv4Addr,
    },
    /// An existing host bridge that libvirt only plugs guests into.
    ///
    /// `vlan` tags the guests' ports. With `openvswitch` libvirt sets the
    /// tag on the OVS port; on a Linux bridge libvirt 11 uses kernel bridge
    /// VLAN filtering, which needs `CONFIG_BRIDGE_VLAN_FILTERING` and the
    /// bridge's `vlan_filtering` on (see [`bridge_vlan_filtering`]),
    /// otherwise guests fail to start or the tag is not enforced.
    Bridge { name: String, bridge: String, vlan: Option<u16>, openvswitch: bool },
}

impl NetworkSpec {
    pub fn name(&self) -> &str {
        match self {
            NetworkSpec::Nat { name, .. } | NetworkSpec::Bridge { name, .. } => name,
        }
    }
}

/// Renders a persistent libvirt network definition for `spec`.
pub fn network_xml(spec: &NetworkSpec) -> String {
    let mut x = String::with_capacity(512);
    let _ = writeln!(x, "<network>");
    let _ = writeln!(x, "  <name>{}</name>", escape(spec.name()));
    match spec {
        NetworkSpec::Nat { bridge, gateway, prefix, dhcp_start, dhcp_end, .. } => {
            let _ = writeln!(x, "  <forward mode='nat'/>");
            let _ = writeln!(x, "  <bridge name='{}' stp='on' delay='0'/>", escape(bridge));
            let _ = writeln!(x, "  <ip address='{gateway}' prefix='{prefix}'>");
            let _ = writeln!(x, "    <dhcp>");
            let _ = writeln!(x, "      <range start='{dhcp_start}' end='{dhcp_end}'/>");
            let _ = writeln!(x, "    </dhcp>");
            let _ = writeln!(x, "  </ip>");
        }
        NetworkSpec::Bridge { bridge, vlan, openvswitch, .. } => {
            let _ = writeln!(x, "  <forward mode='bridge'/>");
            let _ = writeln!(x, "  <bridge name='{}'/>", escape(bridge));
            if *openvswitch {
                let _ = writeln!(x, "  <virtualport type='openvswitch'/>");
            }
            if let Some(tag) = vlan {
                let _ = writeln!(x, "  <vlan>\n    <tag id='{tag}'/>\n  </vlan>");
            }
        }
    }
    let _ = writeln!(x, "</network>");
    x
}

/// Whether the Linux bridge `bridge` enforces VLAN tags: `None` when the
/// bridge does not exist or the kernel has no bridge VLAN filtering (libvirt
/// then fails guest start with "error adding vlan filter ... Operation not
/// supported"), `Some(false)` when it is off (a tag would be set on the port
/// but not enforced), `Some(true)` when tags isolate guests.
pub fn bridge_vlan_filtering(bridge: &str) -> Option<bool> {
    if bridge.is_empty() || bridge.contains('/') || bridge.starts_with('.') {
        return None;
    }
    let v = std::fs::read_to_string(Path::new("/sys/class/net").join(bridge).join("bridge/vlan_filtering"))
        .ok()?;
    Some(v.trim() == "1")
}

/// Snapshot definition for `virDomainSnapshotCreateXML`. Which state is
/// captured (disks only, or disks plus RAM) is decided by the domain's state
/// and flags, not here.
pub fn snapshot_xml(name: &str, description: &str) -> String {
    format!(
        "<domainsnapshot>\n  <name>{}</name>\n  <description>{}</description>\n</domainsnapshot>\n",
        escape(name),
        escape(description)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec() -> DomainSpec {
        DomainSpec {
            uuid: Uuid::new_v4(),
            name: format!("nc-xml-{}", Uuid::new_v4().simple()),
            domain_type: "test".into(),
            vcpus: 2,
            memory_mib: 256,
            disks: vec![
                DiskSource::File("/var/lib/novacron/disks/a.qcow2".into()),
                DiskSource::File("/var/lib/novacron/disks/b.qcow2".into()),
            ],
            nics: vec![Nic { network: "default".into(), mac: "52:54:00:12:34:56".into() }],
            cdrom: Some("/var/lib/novacron/seeds/seed.iso".into()),
            kernel: Some("/var/lib/novacron/images/vmlinuz".into()),
            initrd: Some("/var/lib/novacron/images/initrd.img".into()),
            cmdline: Some("console=ttyS0 root=/dev/vda".into()),
            serial_log: "/var/lib/novacron/logs/serial.log".into(),
            node_id: Uuid::new_v4(),
        }
    }

    const HOSTILE: &str = "a\"b<c>&'d";
    const HOSTILE_ESCAPED: &str = "a&quot;b&lt;c&gt;&amp;&apos;d";

    #[test]
    fn escape_covers_all_five() {
        assert_eq!(escape(HOSTILE), HOSTILE_ESCAPED);
        assert_eq!(escape("plain"), "plain");
        assert_eq!(escape("&amp;"), "&amp;amp;");
    }

    #[test]
    fn hostile_values_are_escaped_everywhere() {
        let mut s = spec();
        s.name = HOSTILE.into();
        s.disks = vec![DiskSource::File(format!("/d/{HOSTILE}.qcow2").into())];
        s.kernel = Some(format!("/k/{HOSTILE}").into());
        s.initrd = Some(format!("/i/{HOSTILE}").into());
        s.cmdline = Some(HOSTILE.into());
        s.nics = vec![Nic { network: HOSTILE.into(), mac: HOSTILE.into() }];
        s.cdrom = Some(format!("/c/{HOSTILE}.iso").into());
        s.serial_log = format!("/l/{HOSTILE}").into();
        let xml = domain_xml(&s);
        assert!(!xml.contains(HOSTILE), "raw value leaked:\n{xml}");
        assert!(xml.contains(&format!("<name>{HOSTILE_ESCAPED}</name>")));
        assert!(xml.contains(&format!("<cmdline>{HOSTILE_ESCAPED}</cmdline>")));
        assert!(xml.contains(&format!("<source network='{HOSTILE_ESCAPED}'/>")));
        assert!(xml.contains(&format!("<source file='/d/{HOSTILE_ESCAPED}.qcow2'/>")));
        assert!(xml.contains(&format!("<kernel>/k/{HOSTILE_ESCAPED}</kernel>")));
        assert!(xml.contains(&format!("<mac address='{HOSTILE_ESCAPED}'/>")));
        assert!(xml.contains(&format!("<source file='/c/{HOSTILE_ESCAPED}.iso'/>")));
        assert!(xml.contains(&format!("<log file='/l/{HOSTILE_ESCAPED}' append='on'/>")));

        let net = network_xml(&NetworkSpec::Bridge {
            name: HOSTILE.into(),
            bridge: HOSTILE.into(),
            vlan: None,
            openvswitch: false,
        });
        assert!(!net.contains(HOSTILE), "raw value leaked:\n{net}");
        assert!(net.contains(&format!("<name>{HOSTILE_ESCAPED}</name>")));
        assert!(net.contains(&format!("<bridge name='{HOSTILE_ESCAPED}'/>")));
        let snap = snapshot_xml(HOSTILE, HOSTILE);
        assert!(!snap.contains(HOSTILE), "raw value leaked:\n{snap}");
        assert!(snap.contains(&format!("<description>{HOSTILE_ESCAPED}</description>")));
    }

    #[test]
    fn kernel_boot_present_and_absent() {
        let s = spec();
        let xml = domain_xml(&s);
        assert!(xml.contains("<kernel>/var/lib/novacron/images/vmlinuz</kernel>"));
        assert!(xml.contains("<initrd>/var/lib/novacron/images/initrd.img</initrd>"));
        assert!(xml.contains("<cmdline>console=ttyS0 root=/dev/vda</cmdline>"));
        assert!(!xml.contains("<boot "));

        let s = DomainSpec { kernel: None, initrd: None, cmdline: None, ..spec() };
        let xml = domain_xml(&s);
        assert!(!xml.contains("<kernel>"));
        assert!(!xml.contains("<initrd>"));
        assert!(!xml.contains("<cmdline>"));
        assert!(xml.contains("<boot dev='hd'/>"));
    }

    #[test]
    fn nics_with_macs() {
        let mut s = spec();
        s.nics.push(Nic { network: "lan".into(), mac: "52:54:00:ab:cd:ef".into() });
        let xml = domain_xml(&s);
        assert_eq!(xml.matches("<interface type='network'>").count(), 2);
        assert_eq!(xml.matches("<model type='virtio'/>").count(), 2);
        // In order, each MAC right before its network.
        let first =
            xml.find("<mac address='52:54:00:12:34:56'/>\n      <source network='default'/>").unwrap();
        let second = xml.find("<mac address='52:54:00:ab:cd:ef'/>\n      <source network='lan'/>").unwrap();
        assert!(first < second);

        let xml = domain_xml(&DomainSpec { nics: vec![], ..spec() });
        assert!(!xml.contains("<interface"));
    }

    #[test]
    fn random_macs() {
        let a = random_mac();
        assert_eq!(a.len(), 17);
        assert!(a.starts_with("52:54:00:"), "{a}");
        assert!(a.bytes().all(|c| c == b':' || c.is_ascii_hexdigit() && !c.is_ascii_uppercase()), "{a}");
        // 24 random bits: eight draws colliding means the source is broken.
        let many: std::collections::HashSet<String> = (0..8).map(|_| random_mac()).collect();
        assert!(many.len() > 1);
    }

    #[test]
    fn cdrom_present_and_absent() {
        let xml = domain_xml(&spec());
        let cd = "    <disk type='file' device='cdrom' snapshot='no'>\n      <driver name='qemu' type='raw'/>\n      \
                  <source file='/var/lib/novacron/seeds/seed.iso'/>\n      <target dev='hdc' bus='ide'/>\n      \
                  <readonly/>\n    </disk>\n";
        assert!(xml.contains(cd), "{xml}");
        let xml = domain_xml(&DomainSpec { cdrom: None, ..spec() });
        assert!(!xml.contains("cdrom"));
    }

    #[test]
    fn pty_serial_with_log() {
        let xml = domain_xml(&spec());
        let log = "<log file='/var/lib/novacron/logs/serial.log' append='on'/>";
        assert!(xml
            .contains(&format!("<serial type='pty'>\n      {log}\n      <target port='0'/>\n    </serial>")));
        assert!(xml.contains(&format!(
            "<console type='pty'>\n      {log}\n      <target type='serial' port='0'/>\n    </console>"
        )));
        assert!(!xml.contains("type='file'>\n      <source path"));
    }

    #[test]
    fn shared_disk_xml() {
        let d = disk_xml(&DiskSource::File("/d/x.qcow2".into()), "vdc");
        assert_eq!(
            d,
            "    <disk type='file' device='disk'>\n      \
             <driver name='qemu' type='qcow2' cache='none' discard='unmap'/>\n      \
             <source file='/d/x.qcow2'/>\n      <target dev='vdc' bus='virtio'/>\n    </disk>\n"
        );
        assert!(domain_xml(&spec())
            .contains(&disk_xml(&DiskSource::File("/var/lib/novacron/disks/b.qcow2".into()), "vdb")));
        assert!(!domain_xml(&spec()).contains("memoryBacking"));
    }

    #[test]
    fn vhost_user_disks_share_guest_memory() {
        let mut s = spec();
        s.disks = vec![DiskSource::VhostUser(format!("/run/{HOSTILE}.sock").into())];
        let x = domain_xml(&s);
        assert!(x.contains("<source type='memfd'/>\n    <access mode='shared'/>"), "{x}");
        assert!(x.contains("<disk type='vhostuser' device='disk' snapshot='no'>"), "{x}");
        assert!(x.contains("<reconnect enabled='yes' timeout='1'/>"), "{x}");
        assert!(!x.contains(HOSTILE), "user text must be escaped: {x}");
    }

    #[test]
    fn nat_network_xml() {
        let xml = network_xml(&NetworkSpec::Nat {
            name: "nc-nat".into(),
            bridge: "ncbr0".into(),
            gateway: Ipv4Addr::new(10, 213, 7, 1),
            prefix: 24,
            dhcp_start: Ipv4Addr::new(10, 213, 7, 100),
            dhcp_end: Ipv4Addr::new(10, 213, 7, 199),
        });
        assert_eq!(
            xml,
            "<network>\n  <name>nc-nat</name>\n  <forward mode='nat'/>\n  \
             <bridge name='ncbr0' stp='on' delay='0'/>\n  <ip address='10.213.7.1' prefix='24'>\n    \
             <dhcp>\n      <range start='10.213.7.100' end='10.213.7.199'/>\n    </dhcp>\n  </ip>\n</network>\n"
        );
    }

    #[test]
    fn bridge_network_xml() {
        let plain = |vlan, openvswitch| {
            network_xml(&NetworkSpec::Bridge { name: "lan".into(), bridge: "br0".into(), vlan, openvswitch })
        };
        assert_eq!(
            plain(None, false),
            "<network>\n  <name>lan</name>\n  <forward mode='bridge'/>\n  <bridge name='br0'/>\n</network>\n"
        );
        let ovs = plain(Some(42), true);
        assert!(ovs.contains("<virtualport type='openvswitch'/>\n  <vlan>\n    <tag id='42'/>\n  </vlan>\n"));
        let linux = plain(Some(7), false);
        assert!(linux.contains("<tag id='7'/>") && !linux.contains("virtualport"));
        assert!(!plain(None, true).contains("<vlan>"));
    }

    #[test]
    fn vlan_filtering_probe() {
        assert_eq!(bridge_vlan_filtering("../../etc"), None);
        assert_eq!(bridge_vlan_filtering(""), None);
        assert_eq!(bridge_vlan_filtering("nc-no-such-bridge"), None);
    }

    #[test]
    fn fixed_parts() {
        let s = spec();
        let xml = domain_xml(&s);
        assert!(xml.starts_with("<domain type='test'>"));
        assert!(xml.contains(&format!("<uuid>{}</uuid>", s.uuid)));
        assert!(xml.contains(&format!("node='{}'", s.node_id)));
        assert!(xml.contains("<memory unit='MiB'>256</memory>"));
        assert!(xml.contains("<vcpu placement='static'>2</vcpu>"));
        assert!(xml.contains("<acpi/>"));
        assert!(xml.contains("<target dev='vda' bus='virtio'/>"));
        assert!(xml.contains("<target dev='vdb' bus='virtio'/>"));
        assert!(!xml.contains("<graphics"));
    }

    #[test]
    fn disk_targets() {
        assert_eq!(disk_target(0), "vda");
        assert_eq!(disk_target(25), "vdz");
        assert_eq!(disk_target(26), "vdaa");
        assert_eq!(disk_target(27), "vdab");
        assert_eq!(disk_target(701), "vdzz");
        assert_eq!(disk_target(702), "vdaaa");
    }

    /// libvirt's own parser is the real judge: the test driver validates the
    /// schema-level structure on define, and reads back what it understood.
    #[test]
    fn test_driver_accepts_xml() {
        use virt::connect::Connect;
        let mut s = spec();
        s.name = format!("nc-{HOSTILE}-{}", Uuid::new_v4().simple());
        s.cmdline = Some(format!("console=ttyS0 x={HOSTILE}"));
        let xml = domain_xml(&s);
        let conn = Connect::open(Some("test:///default")).expect("open test driver");
        let dom = conn.define_domain_xml(&xml).expect("define");
        assert_eq!(dom.name().unwrap(), s.name);
        assert_eq!(dom.uuid().unwrap(), s.uuid);
        let back = dom.xml_desc(0).unwrap();
        assert!(back.contains(&s.node_id.to_string()), "metadata lost:\n{back}");
        assert_eq!(metadata_node(&back), Some(s.node_id), "{back}");
        assert_eq!(metadata_node(&xml), Some(s.node_id));
        assert_eq!(metadata_node("<domain/>"), None);
        assert!(back.contains("<acpi/>"));
        assert!(back.contains("append='on'"));
        assert!(back.contains("<mac address='52:54:00:12:34:56'/>"), "{back}");
        assert!(back.contains("device='cdrom'"), "{back}");
        // Redefining with the same UUID updates in place.
        s.memory_mib = 512;
        let dom2 = conn.define_domain_xml(&domain_xml(&s)).expect("redefine");
        assert_eq!(dom2.max_memory().unwrap(), 512 * 1024);
        dom2.undefine().unwrap();
        drop(dom);
        drop(dom2);
        drop(conn);
    }
}
