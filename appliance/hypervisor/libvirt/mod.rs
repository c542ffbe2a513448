//! The libvirt implementation of [`super::Hypervisor`].
//!
//! One shared connection, opened lazily and replaced when it dies (libvirtd
//! restart; see [`conn`]). Calls clone the connection handle and run without
//! holding the lock, so slow operations (starting a guest) do not serialise
//! the rest.
//!
//! crate `virt` 0.5 has no domain-event API and its `Drop` impls panic when
//! the C free fails, so a small [`ffi`] module fills those gaps; it is the
//! only file allowed `unsafe`.

mod conn;
mod console;
#[allow(unsafe_code)]
mod ffi;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc::UnboundedSender;
use uuid::Uuid;
use virt::connect::Connect;
use virt::domain::{Domain, DomainState as VirState};
use virt::domain_snapshot::DomainSnapshot;
use virt::enumutil::Enum;
use virt::error::{Error as VirError, ErrorNumber};
use virt::network::Network;
use virt::sys;

use self::conn::{code_is, init_event_loop, lock, map_error, CallError, Inner, Owned, Subscribers};
use super::xml::{disk_xml, snapshot_xml, DiskSource};
use super::{
    Console, DhcpLease, DomainInfo, DomainState, Hypervisor, HypervisorError, HypervisorInfo, LifecycleEvent,
    LifecycleKind, NetworkInfo, Result, SnapshotInfo,
};

// virDomainUndefineFlagsValues (libvirt-domain.h).
const UNDEFINE_MANAGED_SAVE: u32 = 1 << 0;
const UNDEFINE_SNAPSHOTS_METADATA: u32 = 1 << 1;
const UNDEFINE_NVRAM: u32 = 1 << 2;
const UNDEFINE_CHECKPOINTS_METADATA: u32 = 1 << 4;
const UNDEFINE_TPM: u32 = 1 << 5;

/// [`Hypervisor`] over libvirt, for any URI (`qemu:///system`,
/// `test:///default`, `qemu+ssh://...`).
pub struct Libvirt {
    uri: String,
    inner: Mutex<Inner>,
    subscribers: Arc<Subscribers>,
}

impl Libvirt {
    /// Creates the client without connecting: libvirt may be down when the
    /// daemon starts. The first call (or [`Hypervisor::ping`]) connects.
    pub fn new(uri: &str) -> Libvirt {
        init_event_loop();
        Libvirt {
            uri: uri.to_string(),
            inner: Mutex::new(Inner { conn: None, generation: 0 }),
            subscribers: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// The libvirt URI this client talks to.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Adds or removes a disk in the definition, and live with `live`.
    fn change_disk(&self, uuid: Uuid, xml: &str, live: bool, attach: bool) -> Result<()> {
        let mut flags = sys::VIR_DOMAIN_AFFECT_CONFIG;
        if live {
            flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
        }
        self.with_domain(uuid, |dom| {
            if attach {
                dom.attach_device_flags(xml, flags)
            } else {
                dom.detach_device_flags(xml, flags)
            }
        })
    }
}

/// Reads what [`SnapshotInfo`] needs from a snapshot's XML. Only the part
/// before the embedded `<domain>` is the snapshot's own.
fn parse_snapshot(name: String, xml: &str) -> SnapshotInfo {
    let cut = [xml.find("<domain "), xml.find("<domain>")].into_iter().flatten().min();
    let own = &xml[..cut.unwrap_or(xml.len())];
    let element = |tag: &str| {
        let open = format!("<{tag}>");
        let start = own.find(&open)? + open.len();
        let len = own[start..].find(&format!("</{tag}>"))?;
        Some(&own[start..start + len])
    };
    let state = match element("state").unwrap_or("") {
        "running" | "blocked" => DomainState::Running,
        "paused" => DomainState::Paused,
        "shutdown" => DomainState::ShuttingDown,
        // "disk-snapshot" is an external disk-only snapshot: reverting to
        // it leaves the domain off.
        "shutoff" | "disk-snapshot" => DomainState::Stopped,
        "crashed" => DomainState::Crashed,
        "pmsuspended" => DomainState::Suspended,
        _ => DomainState::Unknown,
    };
    SnapshotInfo {
        name,
        description: element("description").map(unescape).unwrap_or_default(),
        created: element("creationTime").and_then(|t| t.trim().parse().ok()).unwrap_or(0),
        state,
        has_memory: own.contains("<memory snapshot='internal'")
            || own.contains("<memory snapshot='external'"),
    }
}

/// libvirt gives network XML without a `<uuid>` a fresh one and then refuses
/// it as a duplicate of an existing network with that name; so a redefine
/// carries the existing network's UUID over.
fn with_existing_network_uuid(c: &Connect, xml: &str) -> String {
    let name = || {
        let start = xml.find("<name>")? + "<name>".len();
        let len = xml[start..].find("</name>")?;
        Some(unescape(&xml[start..start + len]))
    };
    let open_end = || Some(xml.find("<network")? + xml[xml.find("<network")?..].find('>')? + 1);
    if xml.contains("<uuid>") {
        return xml.to_string();
    }
    let (Some(name), Some(at)) = (name(), open_end()) else { return xml.to_string() };
    let Ok(existing) = c.lookup_network_by_name(&name) else { return xml.to_string() };
    let existing = Owned::new(existing);
    match existing.uuid() {
        Ok(uuid) => format!("{}\n  <uuid>{}</uuid>{}", &xml[..at], uuid.hyphenated(), &xml[at..]),
        Err(_) => xml.to_string(),
    }
}

/// Reverses the five entities libvirt escapes on output.
fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

fn map_state(s: virt::domain::DomainStateEnum) -> DomainState {
    match s {
        Enum::Known(VirState::Running | VirState::Blocked) => DomainState::Running,
        Enum::Known(VirState::Paused) => DomainState::Paused,
        Enum::Known(VirState::Shutdown) => DomainState::ShuttingDown,
        Enum::Known(VirState::Shutoff) => DomainState::Stopped,
        Enum::Known(VirState::Crashed) => DomainState::Crashed,
        Enum::Known(VirState::PMSuspended) => DomainState::Suspended,
        _ => DomainState::Unknown,
    }
}

/// libvirt's `virDomainEventType` as ours.
fn lifecycle_kind(event: i32) -> LifecycleKind {
    match u32::try_from(event) {
        Ok(sys::VIR_DOMAIN_EVENT_DEFINED) => LifecycleKind::Defined,
        Ok(sys::VIR_DOMAIN_EVENT_UNDEFINED) => LifecycleKind::Undefined,
        Ok(sys::VIR_DOMAIN_EVENT_STARTED) => LifecycleKind::Started,
        Ok(sys::VIR_DOMAIN_EVENT_SUSPENDED) => LifecycleKind::Suspended,
        Ok(sys::VIR_DOMAIN_EVENT_RESUMED) => LifecycleKind::Resumed,
        Ok(sys::VIR_DOMAIN_EVENT_STOPPED) => LifecycleKind::Stopped,
        Ok(sys::VIR_DOMAIN_EVENT_SHUTDOWN) => LifecycleKind::Shutdown,
        Ok(sys::VIR_DOMAIN_EVENT_PMSUSPENDED) => LifecycleKind::PmSuspended,
        Ok(sys::VIR_DOMAIN_EVENT_CRASHED) => LifecycleKind::Crashed,
        _ => LifecycleKind::Other(event),
    }
}

/// libvirt encodes versions as major * 1_000_000 + minor * 1000 + micro.
fn version_string(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000)
}

/// Reads one domain's summary. Uses `virDomainGetInfo`, not `Domain::state`,
/// because virt 0.5's `state()` swallows errors and reports them as a state.
fn domain_info(dom: &Domain) -> std::result::Result<DomainInfo, VirError> {
    let info = dom.info()?;
    Ok(DomainInfo {
        uuid: dom.uuid()?,
        name: dom.name()?,
        state: map_state(info.state),
        vcpus: info.nr_virt_cpu,
        memory_mib: info.max_mem / 1024,
    })
}

impl Hypervisor for Libvirt {
    fn info(&self) -> Result<HypervisorInfo> {
        let (lib, hyp) = self.with_conn(None, |c| Ok::<_, VirError>((c.lib_version()?, c.hyp_version()?)))?;
        Ok(HypervisorInfo {
            uri: self.uri.clone(),
            libvirt_version: version_string(lib),
            hypervisor_version: version_string(hyp),
        })
    }

    fn ping(&self) -> bool {
        // lib_version is a real round trip on remote URIs, unlike is_alive.
        match self.with_conn(None, |c| c.lib_version()) {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!("libvirt ping failed: {e}");
                false
            }
        }
    }

    fn define(&self, xml: &str) -> Result<()> {
        self.with_conn(None, |c| c.define_domain_xml(xml).map(|d| drop(Owned::new(d))))
    }

    fn undefine(&self, uuid: Uuid) -> Result<()> {
        self.with_domain(uuid, |dom| {
            if dom.is_active()? {
                // Undefining a running domain would make it transient and it
                // would vanish at its next stop; the trait forbids it.
                return Err(CallError::Hv(HypervisorError::WrongState(
                    "domain is running; stop it before undefining".into(),
                )));
            }
            // NovaCron owns the whole domain: drop its managed save, snapshot
            // and checkpoint metadata, NVRAM and TPM state with it. Drivers
            // that reject some flags (test driver, older libvirt) get fewer.
            let attempts = [
                UNDEFINE_MANAGED_SAVE
                    | UNDEFINE_SNAPSHOTS_METADATA
                    | UNDEFINE_CHECKPOINTS_METADATA
                    | UNDEFINE_NVRAM
                    | UNDEFINE_TPM,
                UNDEFINE_MANAGED_SAVE | UNDEFINE_SNAPSHOTS_METADATA | UNDEFINE_NVRAM,
                UNDEFINE_MANAGED_SAVE | UNDEFINE_SNAPSHOTS_METADATA,
            ];
            for flags in attempts {
                match dom.undefine_flags(flags) {
                    Err(e) if code_is(&e, ErrorNumber::InvalidArg) || code_is(&e, ErrorNumber::NoSupport) => {
                        continue
                    }
                    other => return Ok(other?),
                }
            }
            Ok(dom.undefine()?)
        })
    }

    fn start(&self, uuid: Uuid) -> Result<()> {
        self.with_domain(uuid, |d| d.create())
    }

    fn shutdown(&self, uuid: Uuid) -> Result<()> {
        self.with_domain(uuid, |d| d.shutdown())
    }

    fn destroy(&self, uuid: Uuid) -> Result<()> {
        self.with_domain(uuid, |d| d.destroy())
    }

    fn reboot(&self, uuid: Uuid) -> Result<()> {
        self.with_domain(uuid, |d| d.reboot(0))
    }

    fn suspend(&self, uuid: Uuid) -> Result<()> {
        self.with_domain(uuid, |d| d.suspend())
    }

    fn resume(&self, uuid: Uuid) -> Result<()> {
        self.with_domain(uuid, |d| d.resume())
    }

    fn state(&self, uuid: Uuid) -> Result<Option<DomainState>> {
        self.with_conn(Some(uuid), |c| match c.lookup_domain_by_uuid(uuid) {
            Ok(d) => {
                let dom = Owned::new(d);
                Ok(Some(map_state(dom.info()?.state)))
            }
            Err(e) if code_is(&e, ErrorNumber::NoDomain) => Ok(None),
            Err(e) => Err(e),
        })
    }

    fn defined_by(&self, uuid: Uuid) -> Result<Option<Uuid>> {
        self.with_conn(Some(uuid), |c| match c.lookup_domain_by_uuid(uuid) {
            Ok(d) => {
                let dom = Owned::new(d);
                Ok(crate::hypervisor::xml::metadata_node(&dom.xml_desc(0)?))
            }
            Err(e) if code_is(&e, ErrorNumber::NoDomain) => Ok(None),
            Err(e) => Err(e),
        })
    }

    fn list(&self) -> Result<Vec<DomainInfo>> {
        self.with_conn(None, |c| {
            // flags 0 = active and inactive.
            let doms: Vec<Owned<Domain>> = c.list_all_domains(0)?.into_iter().map(Owned::new).collect();
            let mut out = Vec::with_capacity(doms.len());
            for dom in &doms {
                match domain_info(dom) {
                    Ok(i) => out.push(i),
                    // Undefined between listing and reading: skip it.
                    Err(e) if code_is(&e, ErrorNumber::NoDomain) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(out)
        })
    }

    fn subscribe(&self, tx: UnboundedSender<LifecycleEvent>) -> Result<()> {
        lock(&self.subscribers).push(tx.clone());
        // Connecting registers the callback (see `connection`); if libvirt is
        // down the subscription stays and takes effect on the next connect.
        let registered = match self.connection() {
            Ok(_) => {
                let mut inner = lock(&self.inner);
                match inner.conn.as_mut() {
                    Some(conn) => self.ensure_callback(conn).map_err(|e| map_error(None, e)),
                    None => Ok(()),
                }
            }
            Err(e) => {
                tracing::warn!("libvirt: events subscribed while disconnected: {e}");
                Ok(())
            }
        };
        if registered.is_err() {
            // Let the caller retry without ending up subscribed twice.
            lock(&self.subscribers).retain(|s| !s.same_channel(&tx));
        }
        registered
    }

    fn network_define(&self, xml: &str) -> Result<()> {
        self.with_conn(None, |c| {
            let xml = with_existing_network_uuid(c, xml);
            let net = Owned::new(c.define_network_xml(&xml)?);
            net.set_autostart(true)?;
            if !net.is_active()? {
                net.create()?;
            }
            Ok::<_, VirError>(())
        })
    }

    fn network_remove(&self, name: &str) -> Result<()> {
        self.with_network(name, |net| {
            if net.is_active()? {
                net.destroy()?;
            }
            // A transient network is gone once destroyed.
            if net.is_persistent().unwrap_or(true) {
                match net.undefine() {
                    Err(e) if code_is(&e, ErrorNumber::NoNetwork) => {}
                    other => other?,
                }
            }
            Ok(())
        })
    }

    fn network_list(&self) -> Result<Vec<NetworkInfo>> {
        self.with_conn(None, |c| {
            // flags 0 = active and inactive.
            let nets: Vec<Owned<Network>> = c.list_all_networks(0)?.into_iter().map(Owned::new).collect();
            let mut out = Vec::with_capacity(nets.len());
            for net in &nets {
                let name = match net.name() {
                    Ok(n) => n,
                    Err(e) if code_is(&e, ErrorNumber::NoNetwork) => continue,
                    Err(e) => return Err(e),
                };
                // Types without a bridge (hostdev, macvtap) answer an error.
                let bridge = net.bridge_name().ok().filter(|b| !b.is_empty());
                out.push(NetworkInfo { name, active: net.is_active()?, bridge });
            }
            Ok(out)
        })
    }

    fn dhcp_leases(&self, network: &str) -> Result<Vec<DhcpLease>> {
        self.with_network(network, |net| {
            Ok(ffi::dhcp_leases(net)?.into_iter().map(|(mac, ip)| DhcpLease { mac, ip }).collect())
        })
    }

    fn snapshot_create(&self, uuid: Uuid, name: &str, description: &str, with_memory: bool) -> Result<()> {
        let xml = snapshot_xml(name, description);
        self.with_domain(uuid, |dom| {
            // QEMU internal snapshots are all-or-nothing: a running VM's
            // always include RAM ("internal snapshot of a running VM must
            // include the memory state"), a stopped VM has none to include.
            let running = dom.is_active()?;
            if running && !with_memory {
                return Err(CallError::Hv(HypervisorError::WrongState(
                    "a snapshot of a running VM always includes its memory; stop the VM for a disk-only snapshot"
                        .into(),
                )));
            }
            if !running && with_memory {
                return Err(CallError::Hv(HypervisorError::WrongState(
                    "the VM is stopped, so there is no memory state to snapshot".into(),
                )));
            }
            // ATOMIC: a failed snapshot leaves no half-made metadata behind.
            let snap = dom.create_snapshot_xml(&xml, sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)?;
            drop(Owned::new(snap));
            Ok(())
        })
    }

    fn snapshot_list(&self, uuid: Uuid) -> Result<Vec<SnapshotInfo>> {
        let mut list = self.with_domain(uuid, |dom| {
            let snaps: Vec<Owned<DomainSnapshot>> =
                dom.list_all_snapshots(0)?.into_iter().map(Owned::new).collect();
            let mut out = Vec::with_capacity(snaps.len());
            for snap in &snaps {
                match snap.name().and_then(|n| Ok((n, snap.xml_desc(0)?))) {
                    Ok((name, xml)) => out.push(parse_snapshot(name, &xml)),
                    // Deleted between listing and reading: skip it.
                    Err(e) if code_is(&e, ErrorNumber::NoDomainSnapshot) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(out)
        })?;
        list.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.name.cmp(&b.name)));
        Ok(list)
    }

    fn snapshot_revert(&self, uuid: Uuid, name: &str, resume: bool) -> Result<()> {
        self.with_snapshot(uuid, name, |_, snap| {
            let info = parse_snapshot(name.to_string(), &snap.xml_desc(0)?);
            // Explicit target state instead of "whatever was recorded": a
            // checkpoint comes back running (or paused when the caller wants
            // to stop it without letting the guest run). Disk-only snapshots
            // revert to shut off (libvirt stops a running domain).
            let flags = match (info.has_memory, resume) {
                (true, true) => sys::VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING,
                (true, false) => sys::VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED,
                (false, _) => 0,
            };
            Ok(snap.revert(flags)?)
        })
    }

    fn snapshot_delete(&self, uuid: Uuid, name: &str) -> Result<()> {
        // flags 0: only this snapshot; its children are re-parented.
        self.with_snapshot(uuid, name, |_, snap| Ok(snap.delete(0)?))
    }

    fn block_resize(&self, uuid: Uuid, target_dev: &str, bytes: u64) -> Result<()> {
        self.with_domain(uuid, |dom| dom.block_resize(target_dev, bytes, sys::VIR_DOMAIN_BLOCK_RESIZE_BYTES))
    }

    fn attach_disk(&self, uuid: Uuid, source: &DiskSource, target_dev: &str, live: bool) -> Result<()> {
        self.change_disk(uuid, &disk_xml(source, target_dev), live, true)
    }

    fn detach_disk(&self, uuid: Uuid, target_dev: &str, live: bool) -> Result<()> {
        // libvirt matches the disk to remove by its target alone.
        let xml = format!(
            "<disk type='file' device='disk'><target dev='{}' bus='virtio'/></disk>",
            super::xml::escape(target_dev)
        );
        self.change_disk(uuid, &xml, live, false)
    }

    fn open_console(&self, uuid: Uuid, output: UnboundedSender<Vec<u8>>) -> Result<Box<dyn Console>> {
        self.with_conn(Some(uuid), |c| {
            let dom = Owned::new(c.lookup_domain_by_uuid(uuid)?);
            if !dom.is_active()? {
                return Err(CallError::Hv(HypervisorError::WrongState(
                    "the VM is not running, so it has no console".into(),
                )));
            }
            let console = console::open_console(c, &dom, output.clone())?;
            Ok(Box::new(console) as Box<dyn Console>)
        })
    }
}
