//! The libvirt implementation of [`super::Hypervisor`].
//!
//! One shared connection, opened lazily and replaced when it dies (libvirtd
//! restart). Calls clone the connection handle and run without holding the
//! lock, so slow operations (starting a guest) do not serialise the rest.
//!
//! crate `virt` 0.5 has no domain-event API and its `Drop` impls panic when
//! the C free fails, so a small [`ffi`] module fills those gaps.

use std::os::raw::c_int;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, Once};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use uuid::Uuid;
use virt::connect::Connect;
use virt::domain::{Domain, DomainState as VirState};
use virt::domain_snapshot::DomainSnapshot;
use virt::enumutil::Enum;
use virt::error::{Error as VirError, ErrorNumber};
use virt::network::Network;
use virt::sys;

use super::xml::{disk_xml, snapshot_xml};
use super::{
    Console, DhcpLease, DomainInfo, DomainState, Hypervisor, HypervisorError, HypervisorInfo, LifecycleEvent,
    NetworkInfo, Result, SnapshotInfo,
};

// virDomainUndefineFlagsValues (libvirt-domain.h).
const UNDEFINE_MANAGED_SAVE: u32 = 1 << 0;
const UNDEFINE_SNAPSHOTS_METADATA: u32 = 1 << 1;
const UNDEFINE_NVRAM: u32 = 1 << 2;
const UNDEFINE_CHECKPOINTS_METADATA: u32 = 1 << 4;
const UNDEFINE_TPM: u32 = 1 << 5;

/// Keepalive for remote URIs: a dead libvirtd is noticed after ~20 s even
/// when no call is in flight (needs the event loop below).
const KEEPALIVE_INTERVAL_S: i32 = 5;
const KEEPALIVE_COUNT: u32 = 3;

type Subscribers = Mutex<Vec<UnboundedSender<LifecycleEvent>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the hypervisor down with it; the
    // guarded data stays consistent across every critical section here.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

static EVENT_LOOP: Once = Once::new();

/// Registers libvirt's default event implementation and starts the thread
/// that drives it, once per process. Must run before the first connection is
/// opened: the remote driver only wires events/keepalive into connections
/// opened after an event implementation exists.
fn init_event_loop() {
    EVENT_LOOP.call_once(|| {
        // libvirt prints every error to stderr by default; errors are
        // returned to callers and logged there instead.
        virt::error::clear_error_callback();
        if let Err(e) = virt::event::event_register_default_impl() {
            tracing::error!("libvirt: cannot register the event implementation: {e}");
            return;
        }
        let spawned = std::thread::Builder::new().name("libvirt-events".into()).spawn(|| loop {
            if let Err(e) = virt::event::event_run_default_impl() {
                tracing::warn!("libvirt event loop: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        if let Err(e) = spawned {
            tracing::error!("libvirt: cannot start the event thread: {e}");
        }
    });
}

/// An owned connection reference, closed explicitly so a failing close is
/// logged instead of panicking like `Connect`'s own `Drop`.
struct ConnRef(Option<Connect>);

impl std::ops::Deref for ConnRef {
    type Target = Connect;
    fn deref(&self) -> &Connect {
        // Only `drop` takes the value out.
        self.0.as_ref().expect("connection already closed")
    }
}

impl Drop for ConnRef {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            ffi::close_connect(c);
        }
    }
}

/// An owned domain reference, freed explicitly (see [`ConnRef`]). Always
/// scoped inside the closure that holds its connection.
struct DomRef(Option<Domain>);

impl std::ops::Deref for DomRef {
    type Target = Domain;
    fn deref(&self) -> &Domain {
        self.0.as_ref().expect("domain already freed")
    }
}

impl Drop for DomRef {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            ffi::free_domain(d);
        }
    }
}

/// An owned network reference, freed explicitly (see [`ConnRef`]).
struct NetRef(Option<Network>);

impl std::ops::Deref for NetRef {
    type Target = Network;
    fn deref(&self) -> &Network {
        self.0.as_ref().expect("network already freed")
    }
}

impl Drop for NetRef {
    fn drop(&mut self) {
        if let Some(n) = self.0.take() {
            ffi::free_network(n);
        }
    }
}

/// An owned snapshot reference, freed explicitly (see [`ConnRef`]).
struct SnapRef(Option<DomainSnapshot>);

impl std::ops::Deref for SnapRef {
    type Target = DomainSnapshot;
    fn deref(&self) -> &DomainSnapshot {
        self.0.as_ref().expect("snapshot already freed")
    }
}

impl Drop for SnapRef {
    fn drop(&mut self) {
        if let Some(n) = self.0.take() {
            ffi::free_snapshot(n);
        }
    }
}

/// The shared connection plus its lifecycle-callback registration.
struct Conn {
    conn: ConnRef,
    callback_id: Option<c_int>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(id) = self.callback_id.take() {
            // On a dead connection the remote call fails but libvirt still
            // drops the callback locally; nothing more to do.
            if let Err(e) = ffi::deregister_lifecycle(&self.conn, id) {
                tracing::debug!("libvirt: deregistering lifecycle callback: {e}");
            }
        }
    }
}

struct Inner {
    conn: Option<Conn>,
    /// Bumped on every (re)connect so a failed call only discards the
    /// connection it actually used, not a newer one.
    generation: u64,
}

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

    fn unavailable(&self, reason: impl std::fmt::Display) -> HypervisorError {
        HypervisorError::Unavailable { uri: self.uri.clone(), reason: reason.to_string() }
    }

    fn open(&self) -> Result<Conn> {
        let conn = ConnRef(Some(Connect::open(Some(&self.uri)).map_err(|e| self.unavailable(e.message()))?));
        // Only remote URIs support keepalive; local drivers answer NoSupport.
        if let Err(e) = conn.set_keep_alive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT) {
            tracing::debug!("libvirt {}: keepalive not enabled: {}", self.uri, e.message());
        }
        tracing::info!("libvirt: connected to {}", self.uri);
        Ok(Conn { conn, callback_id: None })
    }

    /// Registers the lifecycle callback on `conn` if anyone subscribed and it
    /// is not registered yet. Failures are logged and retried on the next call.
    fn ensure_callback(&self, conn: &mut Conn) -> std::result::Result<(), VirError> {
        if conn.callback_id.is_some() || lock(&self.subscribers).is_empty() {
            return Ok(());
        }
        conn.callback_id = Some(ffi::register_lifecycle(&conn.conn, self.subscribers.clone())?);
        Ok(())
    }

    /// Returns a handle on a live connection, (re)connecting when there is
    /// none or the current one died.
    fn connection(&self) -> Result<(ConnRef, u64)> {
        let mut inner = lock(&self.inner);
        if let Some(c) = &inner.conn {
            if !c.conn.is_alive().unwrap_or(false) {
                tracing::warn!("libvirt: connection to {} is dead, reconnecting", self.uri);
                inner.conn = None;
            }
        }
        if inner.conn.is_none() {
            inner.conn = Some(self.open()?);
            inner.generation += 1;
        }
        let generation = inner.generation;
        let conn = inner.conn.as_mut().expect("connection just ensured");
        if let Err(e) = self.ensure_callback(conn) {
            tracing::warn!("libvirt: cannot register lifecycle events: {}", e.message());
        }
        // Clone = virConnectRef, which only fails (and `virt` then panics)
        // on an invalid pointer; ours is owned and live.
        Ok((ConnRef(Some((*conn.conn).clone())), generation))
    }

    fn discard_connection(&self, generation: u64) {
        let mut inner = lock(&self.inner);
        if inner.generation == generation {
            inner.conn = None;
        }
    }

    /// Runs `op` on a live connection. If it fails with a connection-level
    /// error and the connection is indeed dead, reconnects and runs it once
    /// more. A retried non-idempotent call (e.g. start) may then report
    /// `WrongState` if the first attempt had reached libvirtd.
    fn with_conn<T, E: Into<CallError>>(
        &self,
        uuid: Option<Uuid>,
        mut op: impl FnMut(&Connect) -> std::result::Result<T, E>,
    ) -> Result<T> {
        let mut retried = false;
        loop {
            let (conn, generation) = self.connection()?;
            match op(&conn).map_err(Into::into) {
                Ok(v) => return Ok(v),
                Err(CallError::Hv(e)) => return Err(e),
                Err(CallError::Virt(e)) if is_connection_error(&e) && !conn.is_alive().unwrap_or(false) => {
                    drop(conn);
                    self.discard_connection(generation);
                    if retried {
                        return Err(self.unavailable(e.message()));
                    }
                    tracing::warn!(
                        "libvirt: lost connection to {} ({}), retrying once",
                        self.uri,
                        e.message()
                    );
                    retried = true;
                }
                Err(CallError::Virt(e)) => return Err(map_error(uuid, e)),
            }
        }
    }

    /// Runs `op` on the domain with `uuid`; the domain handle never outlives
    /// the connection handle it came from.
    fn with_domain<T, E: Into<CallError>>(
        &self,
        uuid: Uuid,
        mut op: impl FnMut(&Domain) -> std::result::Result<T, E>,
    ) -> Result<T> {
        self.with_conn(Some(uuid), |c| {
            let dom = DomRef(Some(c.lookup_domain_by_uuid(uuid)?));
            op(&dom).map_err(Into::<CallError>::into)
        })
    }

    /// Runs `op` on the network called `name`; a missing one is `NoNetwork`.
    fn with_network<T>(
        &self,
        name: &str,
        mut op: impl FnMut(&Network) -> std::result::Result<T, VirError>,
    ) -> Result<T> {
        self.with_conn(None, |c| {
            let net =
                NetRef(Some(c.lookup_network_by_name(name).map_err(|e| not_found(e, || no_network(name)))?));
            op(&net).map_err(CallError::Virt)
        })
    }

    /// Runs `op` on the snapshot `name` of domain `uuid`.
    fn with_snapshot<T>(
        &self,
        uuid: Uuid,
        name: &str,
        mut op: impl FnMut(&Domain, &DomainSnapshot) -> std::result::Result<T, CallError>,
    ) -> Result<T> {
        self.with_domain(uuid, |dom| {
            let snap = Domain::lookup_snapshot_by_name(dom, name, 0)
                .map_err(|e| not_found(e, || HypervisorError::NoSnapshot(name.to_string())))?;
            op(dom, &SnapRef(Some(snap)))
        })
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

fn no_network(name: &str) -> HypervisorError {
    HypervisorError::NoNetwork(name.to_string())
}

/// Turns libvirt's "no such network/snapshot" into our error, keeping any
/// other failure for the usual classification.
fn not_found(e: VirError, ours: impl FnOnce() -> HypervisorError) -> CallError {
    if code_is(&e, ErrorNumber::NoNetwork) || code_is(&e, ErrorNumber::NoDomainSnapshot) {
        CallError::Hv(ours())
    } else {
        CallError::Virt(e)
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
    let existing = NetRef(Some(existing));
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

/// What an operation closure can fail with: a libvirt error (classified and
/// mapped by `with_conn`) or a check of our own.
enum CallError {
    Virt(VirError),
    Hv(HypervisorError),
}

impl From<VirError> for CallError {
    fn from(e: VirError) -> Self {
        CallError::Virt(e)
    }
}

fn code_is(e: &VirError, n: ErrorNumber) -> bool {
    e.code() == Enum::Known(n)
}

/// Errors a dead connection produces. Each of them can also have other
/// causes, so callers confirm with `is_alive()` before reconnecting.
fn is_connection_error(e: &VirError) -> bool {
    [ErrorNumber::SystemError, ErrorNumber::NoConnect, ErrorNumber::InternalError, ErrorNumber::Rpc]
        .into_iter()
        .any(|n| code_is(e, n))
}

fn map_error(uuid: Option<Uuid>, e: VirError) -> HypervisorError {
    if code_is(&e, ErrorNumber::NoDomain) {
        if let Some(uuid) = uuid {
            return HypervisorError::NoDomain(uuid);
        }
    }
    let msg = e.message().to_string();
    // Some drivers report state conflicts as internal errors (the test
    // driver's "domain 'x' not paused"), so the message is checked too.
    const STATE_PHRASES: [&str; 3] = ["not running", "already running", "not paused"];
    if code_is(&e, ErrorNumber::OperationInvalid) || STATE_PHRASES.iter().any(|p| msg.contains(p)) {
        return HypervisorError::WrongState(msg);
    }
    HypervisorError::Libvirt(msg)
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
        self.with_conn(None, |c| c.define_domain_xml(xml).map(|d| drop(DomRef(Some(d)))))
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
                let dom = DomRef(Some(d));
                Ok(Some(map_state(dom.info()?.state)))
            }
            Err(e) if code_is(&e, ErrorNumber::NoDomain) => Ok(None),
            Err(e) => Err(e),
        })
    }

    fn list(&self) -> Result<Vec<DomainInfo>> {
        self.with_conn(None, |c| {
            // flags 0 = active and inactive.
            let doms: Vec<DomRef> = c.list_all_domains(0)?.into_iter().map(|d| DomRef(Some(d))).collect();
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
            let net = NetRef(Some(c.define_network_xml(&xml)?));
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
            let nets: Vec<NetRef> = c.list_all_networks(0)?.into_iter().map(|n| NetRef(Some(n))).collect();
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
            drop(SnapRef(Some(snap)));
            Ok(())
        })
    }

    fn snapshot_list(&self, uuid: Uuid) -> Result<Vec<SnapshotInfo>> {
        let mut list = self.with_domain(uuid, |dom| {
            let snaps: Vec<SnapRef> =
                dom.list_all_snapshots(0)?.into_iter().map(|s| SnapRef(Some(s))).collect();
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

    fn attach_disk(&self, uuid: Uuid, path: &Path, target_dev: &str, live: bool) -> Result<()> {
        self.change_disk(uuid, &disk_xml(path, target_dev), live, true)
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
            let dom = DomRef(Some(c.lookup_domain_by_uuid(uuid)?));
            if !dom.is_active()? {
                return Err(CallError::Hv(HypervisorError::WrongState(
                    "the VM is not running, so it has no console".into(),
                )));
            }
            let console = ffi::open_console(c, &dom, output.clone())?;
            Ok(Box::new(console) as Box<dyn Console>)
        })
    }
}

/// The libvirt calls crate `virt` 0.5 does not wrap (domain events, DHCP
/// leases), wraps leakily (interface addresses) or wraps with a panicking
/// `Drop` (close/free, streams). The older functions declare their own
/// `c_void` prototypes; newer ones use the bindings `virt` re-exports as
/// `virt::sys`.
#[allow(unsafe_code)]
mod ffi {
    use std::os::raw::{c_char, c_int, c_uchar, c_void};
    use std::sync::atomic::{AtomicI32, Ordering};
    use std::sync::{Arc, Mutex};

    use tokio::sync::mpsc::UnboundedSender;
    use uuid::Uuid;
    use virt::connect::Connect;
    use virt::domain::Domain;
    use virt::domain_snapshot::DomainSnapshot;
    use virt::error::Error as VirError;
    use virt::network::Network;
    use virt::sys;

    use super::{lock, LifecycleEvent, Subscribers};

    /// VIR_DOMAIN_EVENT_ID_LIFECYCLE.
    const EVENT_ID_LIFECYCLE: c_int = 0;
    /// VIR_UUID_BUFLEN.
    const UUID_BUFLEN: usize = 16;

    /// virConnectDomainEventCallback, the lifecycle callback type. libvirt
    /// takes it as the generic callback type; both are plain C function
    /// pointers, so declaring the parameter with this type is ABI-identical
    /// to the VIR_DOMAIN_EVENT_CALLBACK() cast C code does.
    type LifecycleCallback =
        unsafe extern "C" fn(*mut c_void, *mut c_void, c_int, c_int, *mut c_void) -> c_int;
    type FreeCallback = unsafe extern "C" fn(*mut c_void);

    #[link(name = "virt")]
    extern "C" {
        fn virConnectDomainEventRegisterAny(
            conn: *mut c_void,
            dom: *mut c_void,
            event_id: c_int,
            cb: LifecycleCallback,
            opaque: *mut c_void,
            freecb: Option<FreeCallback>,
        ) -> c_int;
        fn virConnectDomainEventDeregisterAny(conn: *mut c_void, callback_id: c_int) -> c_int;
        fn virDomainGetUUID(dom: *mut c_void, uuid: *mut c_uchar) -> c_int;
        fn virDomainGetName(dom: *mut c_void) -> *const c_char;
        fn virConnectClose(conn: *mut c_void) -> c_int;
        fn virDomainFree(dom: *mut c_void) -> c_int;
    }

    /// Releases one connection reference, logging instead of panicking.
    pub(super) fn close_connect(conn: Connect) {
        // SAFETY: `conn` owns one reference to a valid virConnectPtr. We take
        // the pointer, forget the wrapper so its Drop does not release the
        // same reference again, and release it exactly once here.
        let rc = unsafe {
            let ptr = conn.as_ptr().cast::<c_void>();
            std::mem::forget(conn);
            virConnectClose(ptr)
        };
        if rc < 0 {
            tracing::warn!("libvirt: closing connection failed: {}", VirError::last_error());
        }
    }

    /// Releases one domain reference, logging instead of panicking.
    pub(super) fn free_domain(dom: Domain) {
        // SAFETY: as in `close_connect`, for the virDomainPtr `dom` owns.
        let rc = unsafe {
            let ptr = dom.as_ptr().cast::<c_void>();
            std::mem::forget(dom);
            virDomainFree(ptr)
        };
        if rc < 0 {
            tracing::warn!("libvirt: freeing domain failed: {}", VirError::last_error());
        }
    }

    /// Registers a lifecycle callback for all domains on `conn` that fans
    /// events out to `subs`. Returns libvirt's callback id.
    pub(super) fn register_lifecycle(conn: &Connect, subs: Arc<Subscribers>) -> Result<c_int, VirError> {
        let opaque = Box::into_raw(Box::new(subs)).cast::<c_void>();
        // SAFETY: `conn` is a live connection for the duration of the call.
        // `opaque` is a leaked Box<Arc<Subscribers>> that libvirt hands back
        // to `on_lifecycle` and finally to `free_opaque`, which reclaims it;
        // both functions match the C callback signatures.
        let id = unsafe {
            virConnectDomainEventRegisterAny(
                conn.as_ptr().cast::<c_void>(),
                std::ptr::null_mut(),
                EVENT_ID_LIFECYCLE,
                on_lifecycle,
                opaque,
                Some(free_opaque),
            )
        };
        if id < 0 {
            // Whether libvirt already ran `free_opaque` on this failure path
            // differs between drivers, so the box is deliberately leaked (one
            // Arc) rather than risking a double free.
            return Err(VirError::last_error());
        }
        Ok(id)
    }

    pub(super) fn deregister_lifecycle(conn: &Connect, id: c_int) -> Result<(), VirError> {
        // SAFETY: `conn` is live and `id` came from a registration on it;
        // libvirt then calls `free_opaque` for the registration's box.
        let rc = unsafe { virConnectDomainEventDeregisterAny(conn.as_ptr().cast::<c_void>(), id) };
        if rc < 0 {
            return Err(VirError::last_error());
        }
        Ok(())
    }

    unsafe extern "C" fn free_opaque(opaque: *mut c_void) {
        // SAFETY: `opaque` is the Box<Arc<Subscribers>> leaked in
        // `register_lifecycle`; libvirt calls this exactly once per
        // successful registration.
        drop(unsafe { Box::from_raw(opaque.cast::<Arc<Subscribers>>()) });
    }

    unsafe extern "C" fn on_lifecycle(
        _conn: *mut c_void,
        dom: *mut c_void,
        _event: c_int,
        _detail: c_int,
        opaque: *mut c_void,
    ) -> c_int {
        // SAFETY: libvirt passes back the opaque pointer from registration,
        // still alive because `free_opaque` only runs after the callback is
        // removed, and a domain pointer valid for the duration of the call.
        let (subs, event) = unsafe {
            let subs = &*opaque.cast::<Arc<Subscribers>>();
            let mut raw = [0u8; UUID_BUFLEN];
            if virDomainGetUUID(dom, raw.as_mut_ptr()) < 0 {
                return 0;
            }
            let name = virDomainGetName(dom);
            let name = if name.is_null() {
                String::new()
            } else {
                std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned()
            };
            (subs, LifecycleEvent { uuid: Uuid::from_bytes(raw), name })
        };
        // Unwinding out of an extern "C" fn aborts; nothing below should
        // panic, but a daemon-wide abort is too high a price to bet on it.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // Senders whose receiver is gone are dropped here.
            lock(subs).retain(|tx| tx.send(event.clone()).is_ok());
        }));
        0
    }

    /// Turns a C string libvirt owns into a `String` (lossy; empty if null).
    ///
    /// # Safety
    /// `p` must be null or a valid NUL-terminated string.
    unsafe fn c_string(p: *const c_char) -> String {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: non-null and NUL-terminated per this function's contract.
            unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    }

    pub(super) fn free_network(net: Network) {
        // SAFETY: as in `close_connect`, for the virNetworkPtr `net` owns.
        let rc = unsafe {
            let ptr = net.as_ptr();
            std::mem::forget(net);
            sys::virNetworkFree(ptr)
        };
        if rc < 0 {
            tracing::warn!("libvirt: freeing network failed: {}", VirError::last_error());
        }
    }

    pub(super) fn free_snapshot(snap: DomainSnapshot) {
        // SAFETY: as in `close_connect`, for the snapshot pointer `snap` owns.
        let rc = unsafe {
            let ptr = snap.as_ptr();
            std::mem::forget(snap);
            sys::virDomainSnapshotFree(ptr)
        };
        if rc < 0 {
            tracing::warn!("libvirt: freeing snapshot failed: {}", VirError::last_error());
        }
    }

    /// `(mac, ip)` of every current lease of `net` (virNetworkGetDHCPLeases).
    pub(super) fn dhcp_leases(net: &Network) -> Result<Vec<(String, String)>, VirError> {
        let mut leases: *mut sys::virNetworkDHCPLeasePtr = std::ptr::null_mut();
        // SAFETY: `net` is a live network; a null MAC asks for all leases;
        // libvirt allocates the array and stores it in `leases`.
        let n = unsafe { sys::virNetworkGetDHCPLeases(net.as_ptr(), std::ptr::null(), &mut leases, 0) };
        if n < 0 {
            return Err(VirError::last_error());
        }
        let mut out = Vec::with_capacity(n as usize);
        // SAFETY: on success `leases` holds `n` valid lease pointers. Each is
        // read, then freed once with virNetworkDHCPLeaseFree, then the array
        // itself with free(), as the API documents.
        unsafe {
            for i in 0..n as usize {
                let lease = *leases.add(i);
                out.push((c_string((*lease).mac), c_string((*lease).ipaddr)));
                sys::virNetworkDHCPLeaseFree(lease);
            }
            if !leases.is_null() {
                nix::libc::free(leases.cast());
            }
        }
        Ok(out)
    }

    /// A console stream pointer. Only ever used by libvirt calls on the
    /// event-loop thread once the session is set up.
    struct StreamPtr(sys::virStreamPtr);
    // SAFETY: the pointer is only dereferenced by libvirt, under the
    // session mutex, and libvirt stream objects are not tied to a thread.
    unsafe impl Send for StreamPtr {}

    struct SessionState {
        /// `None` once torn down.
        stream: Option<StreamPtr>,
        /// Dropped on teardown so the receiver sees the end.
        output: Option<UnboundedSender<Vec<u8>>>,
        /// Input not yet accepted by the stream.
        pending: Vec<u8>,
        closing: bool,
    }

    struct Session {
        state: Mutex<SessionState>,
        /// Event-loop timer used to hop from caller threads onto the event
        /// thread, so the stream is only touched there.
        timer: AtomicI32,
    }

    const READ_EVENTS: c_int = (sys::VIR_STREAM_EVENT_READABLE
        | sys::VIR_STREAM_EVENT_ERROR
        | sys::VIR_STREAM_EVENT_HANGUP) as c_int;
    const WRITE_EVENTS: c_int = READ_EVENTS | sys::VIR_STREAM_EVENT_WRITABLE as c_int;
    /// virStreamRecv/Send: the non-blocking stream has nothing to give/take.
    const WOULD_BLOCK: c_int = -2;

    /// The caller's side of a console session.
    pub(super) struct ConsoleSession(Arc<Session>);

    /// Opens `dom`'s console on a non-blocking stream whose output is
    /// pumped into `output` by libvirt's event loop.
    pub(super) fn open_console(
        conn: &Connect,
        dom: &Domain,
        output: UnboundedSender<Vec<u8>>,
    ) -> Result<ConsoleSession, VirError> {
        // SAFETY: `conn` is live; the new stream (one reference, ours) is
        // freed on every failure path below or by `teardown`.
        let st = unsafe { sys::virStreamNew(conn.as_ptr(), sys::VIR_STREAM_NONBLOCK) };
        if st.is_null() {
            return Err(VirError::last_error());
        }
        // FORCE: a stale session (a crashed client) must not lock us out.
        // SAFETY: `dom` and `st` are live; a null device means the first
        // console.
        let rc = unsafe {
            sys::virDomainOpenConsole(dom.as_ptr(), std::ptr::null(), st, sys::VIR_DOMAIN_CONSOLE_FORCE)
        };
        if rc < 0 {
            let e = VirError::last_error();
            // SAFETY: releases the reference taken by virStreamNew.
            unsafe { sys::virStreamFree(st) };
            return Err(e);
        }
        let session = Arc::new(Session {
            state: Mutex::new(SessionState {
                stream: Some(StreamPtr(st)),
                output: Some(output),
                pending: Vec::new(),
                closing: false,
            }),
            timer: AtomicI32::new(-1),
        });
        // SAFETY: the opaque is one leaked Arc<Session>, reclaimed by
        // `release_session` when libvirt drops the timer; `on_timer` matches
        // virEventTimeoutCallback. -1 = disabled until poked.
        let timer = unsafe {
            sys::virEventAddTimeout(
                -1,
                Some(on_timer),
                Arc::into_raw(session.clone()) as *mut c_void,
                Some(release_session),
            )
        };
        if timer < 0 {
            let e = VirError::last_error();
            // The opaque Arc is leaked (as in `register_lifecycle`);
            // teardown drops the sender so nothing waits on it.
            teardown(&mut lock(&session.state), false);
            return Err(e);
        }
        session.timer.store(timer, Ordering::SeqCst);
        // SAFETY: as for the timer; `on_stream` matches
        // virStreamEventCallback and `st` is live.
        let rc = unsafe {
            sys::virStreamEventAddCallback(
                st,
                READ_EVENTS,
                Some(on_stream),
                Arc::into_raw(session.clone()) as *mut c_void,
                Some(release_session),
            )
        };
        if rc < 0 {
            let e = VirError::last_error();
            teardown(&mut lock(&session.state), false);
            // SAFETY: `timer` is our live timer id.
            unsafe { sys::virEventRemoveTimeout(timer) };
            return Err(e);
        }
        Ok(ConsoleSession(session))
    }

    impl ConsoleSession {
        /// Runs `on_timer` on the event thread as soon as possible.
        fn poke(&self) {
            let timer = self.0.timer.load(Ordering::SeqCst);
            // SAFETY: thread-safe libvirt call on an id from
            // virEventAddTimeout; ids are never reused, so a removed timer
            // is simply not found.
            unsafe { sys::virEventUpdateTimeout(timer, 0) };
        }
    }

    impl crate::hypervisor::Console for ConsoleSession {
        fn send(&self, data: &[u8]) -> crate::hypervisor::Result<()> {
            {
                let mut st = lock(&self.0.state);
                if st.stream.is_none() || st.closing {
                    return Err(crate::hypervisor::HypervisorError::WrongState(
                        "the console session has ended".into(),
                    ));
                }
                st.pending.extend_from_slice(data);
            }
            self.poke();
            Ok(())
        }

        fn close(&self) {
            lock(&self.0.state).closing = true;
            self.poke();
        }
    }

    impl Drop for ConsoleSession {
        fn drop(&mut self) {
            use crate::hypervisor::Console as _;
            self.close();
        }
    }

    /// Ends the session: unregisters and releases the stream (FINISH after a
    /// clean EOF, ABORT otherwise) and drops the output sender. Event thread
    /// only, except on the setup failure paths before callbacks exist.
    fn teardown(st: &mut SessionState, clean_eof: bool) {
        if let Some(StreamPtr(stream)) = st.stream.take() {
            // SAFETY: `stream` is live and ours; its callback (if any) is
            // removed first so libvirt calls nothing more on it, then our
            // single reference is released. Errors here leave nothing to undo.
            unsafe {
                sys::virStreamEventRemoveCallback(stream);
                if clean_eof {
                    sys::virStreamFinish(stream);
                } else {
                    sys::virStreamAbort(stream);
                }
                sys::virStreamFree(stream);
            }
        }
        st.output = None;
        st.pending.clear();
    }

    /// Sends queued input; asks for WRITABLE events while some is left.
    fn flush(st: &mut SessionState) {
        let Some(StreamPtr(stream)) = st.stream.as_ref().map(|s| StreamPtr(s.0)) else { return };
        while !st.pending.is_empty() {
            // SAFETY: `stream` is live (still in the state) and `pending`
            // is a valid buffer of the given length.
            let n = unsafe { sys::virStreamSend(stream, st.pending.as_ptr().cast(), st.pending.len()) };
            if n == WOULD_BLOCK {
                // SAFETY: live stream with a registered callback.
                unsafe { sys::virStreamEventUpdateCallback(stream, WRITE_EVENTS) };
                return;
            }
            if n < 0 {
                tracing::debug!("libvirt console send: {}", VirError::last_error());
                teardown(st, false);
                return;
            }
            st.pending.drain(..n as usize);
        }
        // SAFETY: as above.
        unsafe { sys::virStreamEventUpdateCallback(stream, READ_EVENTS) };
    }

    /// Reads everything available and forwards it.
    fn drain(st: &mut SessionState) {
        let mut buf = vec![0u8; 64 * 1024];
        while let Some(StreamPtr(stream)) = st.stream.as_ref().map(|s| StreamPtr(s.0)) {
            // SAFETY: live stream; `buf` is writable for its length.
            let n = unsafe { sys::virStreamRecv(stream, buf.as_mut_ptr().cast(), buf.len()) };
            match n {
                WOULD_BLOCK => return,
                0 => return teardown(st, true),
                n if n < 0 => {
                    tracing::debug!("libvirt console recv: {}", VirError::last_error());
                    return teardown(st, false);
                }
                n => {
                    let sent =
                        st.output.as_ref().is_some_and(|tx| tx.send(buf[..n as usize].to_vec()).is_ok());
                    if !sent {
                        // Nobody listens any more.
                        return teardown(st, false);
                    }
                }
            }
        }
    }

    unsafe extern "C" fn on_stream(_stream: sys::virStreamPtr, events: c_int, opaque: *mut c_void) {
        // SAFETY: `opaque` is the Arc<Session> leaked for this callback,
        // alive until `release_session` runs after the callback is removed.
        let session = unsafe { &*(opaque as *const Session) };
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut st = lock(&session.state);
            if st.closing {
                return teardown(&mut st, false);
            }
            let events = events as sys::virStreamEventType;
            if events & sys::VIR_STREAM_EVENT_READABLE != 0 {
                drain(&mut st);
            }
            if events & sys::VIR_STREAM_EVENT_WRITABLE != 0 {
                flush(&mut st);
            }
            if events & (sys::VIR_STREAM_EVENT_ERROR | sys::VIR_STREAM_EVENT_HANGUP) != 0 {
                // Forward whatever arrived before the hangup, then end.
                drain(&mut st);
                teardown(&mut st, false);
            }
        }));
    }

    unsafe extern "C" fn on_timer(timer: c_int, opaque: *mut c_void) {
        // SAFETY: as in `on_stream`, for the timer's Arc<Session>.
        let session = unsafe { &*(opaque as *const Session) };
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut st = lock(&session.state);
            let done = if st.closing || st.stream.is_none() {
                teardown(&mut st, false);
                true
            } else {
                flush(&mut st);
                st.stream.is_none()
            };
            // SAFETY: our own timer id, called on the event thread.
            unsafe {
                if done {
                    sys::virEventRemoveTimeout(timer);
                } else {
                    sys::virEventUpdateTimeout(timer, -1);
                }
            }
        }));
    }

    unsafe extern "C" fn release_session(opaque: *mut c_void) {
        // SAFETY: `opaque` is one Arc<Session> from Arc::into_raw in
        // `open_console`; libvirt calls this once per registration.
        drop(unsafe { Arc::from_raw(opaque as *const Session) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::disks;
    use crate::hypervisor::xml::{domain_xml, DomainSpec};
    use std::path::PathBuf;
    use std::time::Instant;
    use tokio::sync::mpsc;

    const TEST_URI: &str = "test:///default";

    fn spec(domain_type: &str, dir: &std::path::Path) -> DomainSpec {
        let uuid = Uuid::new_v4();
        DomainSpec {
            uuid,
            name: format!("nc-test-{}", uuid.simple()),
            domain_type: domain_type.into(),
            vcpus: 1,
            memory_mib: 64,
            disks: vec![],
            nics: vec![],
            cdrom: None,
            kernel: None,
            initrd: None,
            cmdline: None,
            serial_log: dir.join("serial.log"),
            node_id: Uuid::new_v4(),
        }
    }

    fn find(hv: &Libvirt, uuid: Uuid) -> Option<DomainInfo> {
        hv.list().unwrap().into_iter().find(|d| d.uuid == uuid)
    }

    #[test]
    fn versions_and_ping() {
        let hv = Libvirt::new(TEST_URI);
        assert!(hv.ping());
        let info = hv.info().unwrap();
        assert_eq!(info.uri, TEST_URI);
        assert_eq!(info.libvirt_version.split('.').count(), 3, "{info:?}");
        assert_eq!(info.hypervisor_version.split('.').count(), 3, "{info:?}");
        assert_eq!(version_string(11_003_000), "11.3.0");
        assert_eq!(version_string(10_000_002), "10.0.2");
    }

    #[test]
    fn unreachable_libvirt_is_unavailable_not_fatal() {
        let hv = Libvirt::new("qemu+unix:///system?socket=/nonexistent/libvirt-sock");
        assert!(!hv.ping());
        assert!(matches!(hv.list(), Err(HypervisorError::Unavailable { .. })));
        // Subscribing while down is accepted and applied on the next connect.
        let (tx, _rx) = mpsc::unbounded_channel();
        hv.subscribe(tx).unwrap();
    }

    #[test]
    fn lifecycle_on_test_driver() {
        let hv = Libvirt::new(TEST_URI);
        let s = spec("test", &std::env::temp_dir());
        let uuid = s.uuid;
        hv.define(&domain_xml(&s)).unwrap();

        let listed = find(&hv, uuid).expect("defined domain is listed");
        assert_eq!(listed.name, s.name);
        assert_eq!(listed.state, DomainState::Stopped);
        assert_eq!(listed.vcpus, 1);
        assert_eq!(listed.memory_mib, 64);
        // The test driver's predefined domain "test" is there too.
        assert!(hv.list().unwrap().iter().any(|d| d.name == "test"));

        // Redefine keeps the UUID and updates the definition.
        hv.define(&domain_xml(&DomainSpec { memory_mib: 128, ..s.clone() })).unwrap();
        assert_eq!(find(&hv, uuid).unwrap().memory_mib, 128);

        hv.start(uuid).unwrap();
        assert_eq!(hv.state(uuid).unwrap(), Some(DomainState::Running));
        assert!(matches!(hv.start(uuid), Err(HypervisorError::WrongState(_))));
        assert!(matches!(hv.undefine(uuid), Err(HypervisorError::WrongState(_))));
        hv.suspend(uuid).unwrap();
        assert_eq!(hv.state(uuid).unwrap(), Some(DomainState::Paused));
        hv.resume(uuid).unwrap();
        assert_eq!(hv.state(uuid).unwrap(), Some(DomainState::Running));
        hv.reboot(uuid).unwrap();
        assert_eq!(hv.state(uuid).unwrap(), Some(DomainState::Running));
        hv.destroy(uuid).unwrap();
        assert_eq!(hv.state(uuid).unwrap(), Some(DomainState::Stopped));
        assert!(matches!(hv.resume(uuid), Err(HypervisorError::WrongState(_))));
        assert!(matches!(hv.destroy(uuid), Err(HypervisorError::WrongState(_))));

        // The test driver powers off at once on shutdown.
        hv.start(uuid).unwrap();
        hv.shutdown(uuid).unwrap();
        assert_eq!(hv.state(uuid).unwrap(), Some(DomainState::Stopped));

        hv.undefine(uuid).unwrap();
        assert_eq!(hv.state(uuid).unwrap(), None);
        assert!(find(&hv, uuid).is_none());
    }

    #[test]
    fn unknown_uuid_is_no_domain() {
        let hv = Libvirt::new(TEST_URI);
        let uuid = Uuid::new_v4();
        assert_eq!(hv.state(uuid).unwrap(), None);
        for r in [hv.start(uuid), hv.shutdown(uuid), hv.destroy(uuid), hv.undefine(uuid), hv.suspend(uuid)] {
            match r {
                Err(HypervisorError::NoDomain(u)) => assert_eq!(u, uuid),
                other => panic!("expected NoDomain, got {other:?}"),
            }
        }
    }

    #[test]
    fn bad_xml_is_a_libvirt_error() {
        let hv = Libvirt::new(TEST_URI);
        assert!(matches!(hv.define("<domain"), Err(HypervisorError::Libvirt(_))));
    }

    fn wait_for_event(rx: &mut mpsc::UnboundedReceiver<LifecycleEvent>, uuid: Uuid) -> LifecycleEvent {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match rx.try_recv() {
                // Other tests share the test driver; skip their events.
                Ok(ev) if ev.uuid == uuid => return ev,
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        panic!("no lifecycle event for {uuid}");
    }

    #[test]
    fn lifecycle_events() {
        let hv = Libvirt::new(TEST_URI);
        let (tx, mut rx) = mpsc::unbounded_channel();
        hv.subscribe(tx).unwrap();
        let s = spec("test", &std::env::temp_dir());
        hv.define(&domain_xml(&s)).unwrap();
        let ev = wait_for_event(&mut rx, s.uuid); // "defined"
        assert_eq!(ev.name, s.name);
        hv.start(s.uuid).unwrap();
        wait_for_event(&mut rx, s.uuid); // "started"
        hv.destroy(s.uuid).unwrap();
        wait_for_event(&mut rx, s.uuid); // "stopped"
        hv.undefine(s.uuid).unwrap();
        wait_for_event(&mut rx, s.uuid); // "undefined"
    }

    #[test]
    fn dropped_connection_is_reopened_and_events_reregistered() {
        let hv = Libvirt::new(TEST_URI);
        let (tx, mut rx) = mpsc::unbounded_channel();
        hv.subscribe(tx).unwrap();
        // A second handle keeps the in-memory test driver (and our domain)
        // alive while the client's own connection is thrown away.
        let keep = Libvirt::new(TEST_URI);
        assert!(keep.ping());
        let s = spec("test", &std::env::temp_dir());
        hv.define(&domain_xml(&s)).unwrap();
        wait_for_event(&mut rx, s.uuid);

        let generation = lock(&hv.inner).generation;
        hv.discard_connection(generation);
        assert!(lock(&hv.inner).conn.is_none());

        // The next call reconnects and re-registers the callback.
        hv.start(s.uuid).unwrap();
        assert_eq!(lock(&hv.inner).generation, generation + 1);
        assert!(lock(&hv.inner).conn.as_ref().unwrap().callback_id.is_some());
        wait_for_event(&mut rx, s.uuid);
        hv.destroy(s.uuid).unwrap();
        hv.undefine(s.uuid).unwrap();
    }

    /// Real QEMU (TCG) through libvirtd (started by tests/setup-host.sh).
    /// NOVACRON_SKIP_QEMU=1 skips it on machines without libvirtd.
    #[test]
    fn qemu_system_lifecycle() {
        if std::env::var_os("NOVACRON_SKIP_QEMU").is_some() {
            eprintln!("skipping qemu_system_lifecycle: NOVACRON_SKIP_QEMU is set");
            return;
        }
        let dir: PathBuf = std::env::temp_dir().join(format!("novacron-qemu-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("root.qcow2");
        disks::create_blank(&disk, 64 * 1024 * 1024).unwrap();
        let mut s = spec("qemu", &dir);
        s.disks = vec![disk.clone()];

        let hv = Libvirt::new("qemu:///system");
        let (tx, mut rx) = mpsc::unbounded_channel();
        hv.subscribe(tx).unwrap();
        let info = hv.info().unwrap();
        eprintln!("libvirt {} / qemu {}", info.libvirt_version, info.hypervisor_version);

        hv.define(&domain_xml(&s)).unwrap();
        // Assertions run under catch_unwind so the guest and files are
        // cleaned up before a failure is reported.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<()> {
            assert_eq!(hv.state(s.uuid)?, Some(DomainState::Stopped));
            hv.start(s.uuid)?;
            assert_eq!(hv.state(s.uuid)?, Some(DomainState::Running));
            wait_for_event(&mut rx, s.uuid);
            let listed = find(&hv, s.uuid).unwrap();
            assert_eq!((listed.state, listed.vcpus, listed.memory_mib), (DomainState::Running, 1, 64));
            hv.suspend(s.uuid)?;
            assert_eq!(hv.state(s.uuid)?, Some(DomainState::Paused));
            hv.resume(s.uuid)?;
            hv.destroy(s.uuid)?;
            assert_eq!(hv.state(s.uuid)?, Some(DomainState::Stopped));
            Ok(())
        }));
        let _ = hv.destroy(s.uuid);
        let undefined = hv.undefine(s.uuid);
        let _ = std::fs::remove_dir_all(&dir);
        match result {
            Ok(r) => r.unwrap(),
            Err(panic) => std::panic::resume_unwind(panic),
        }
        undefined.unwrap();
        assert_eq!(hv.state(s.uuid).unwrap(), None);
    }

    #[test]
    fn snapshot_xml_parsing() {
        let xml = "<domainsnapshot>\n  <name>s1</name>\n  <description>a &lt;b&gt; &amp;amp; &apos;c&quot;</description>\n  \
                   <state>running</state>\n  <creationTime>1700000000</creationTime>\n  <memory snapshot='internal'/>\n  \
                   <domain type='qemu'>\n    <name>vm</name>\n    <description>other</description>\n    \
                   <memory unit='KiB'>131072</memory>\n  </domain>\n</domainsnapshot>\n";
        let info = parse_snapshot("s1".into(), xml);
        assert_eq!(
            info,
            SnapshotInfo {
                name: "s1".into(),
                description: "a <b> &amp; 'c\"".into(),
                created: 1_700_000_000,
                state: DomainState::Running,
                has_memory: true,
            }
        );
        let off = "<domainsnapshot><name>s2</name><state>shutoff</state><creationTime>5</creationTime>\
                   <memory snapshot='no'/><domain><description>x</description></domain></domainsnapshot>";
        let info = parse_snapshot("s2".into(), off);
        assert_eq!(
            (info.state, info.has_memory, info.created, info.description.as_str()),
            (DomainState::Stopped, false, 5, "")
        );
    }

    #[test]
    fn snapshots_on_test_driver() {
        let hv = Libvirt::new(TEST_URI);
        let s = spec("test", &std::env::temp_dir());
        let uuid = s.uuid;
        hv.define(&domain_xml(&s)).unwrap();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            assert!(matches!(
                hv.snapshot_create(uuid, "cold", "", true),
                Err(HypervisorError::WrongState(_))
            ));
            hv.snapshot_create(uuid, "cold", "stopped <one>", false).unwrap();
            hv.start(uuid).unwrap();
            assert!(matches!(
                hv.snapshot_create(uuid, "hot", "", false),
                Err(HypervisorError::WrongState(_))
            ));
            hv.snapshot_create(uuid, "hot", "", true).unwrap();
            let list = hv.snapshot_list(uuid).unwrap();
            let summary: Vec<_> = list.iter().map(|i| (i.name.as_str(), i.state, i.has_memory)).collect();
            assert_eq!(summary, [("cold", DomainState::Stopped, false), ("hot", DomainState::Running, true)]);
            assert_eq!(list[0].description, "stopped <one>");
            assert!(list[0].created > 1_600_000_000);

            hv.snapshot_revert(uuid, "cold", true).unwrap();
            assert_eq!(hv.state(uuid).unwrap(), Some(DomainState::Stopped));
            hv.snapshot_revert(uuid, "hot", true).unwrap();
            assert_eq!(hv.state(uuid).unwrap(), Some(DomainState::Running));
            match hv.snapshot_revert(uuid, "nope", true) {
                Err(HypervisorError::NoSnapshot(n)) => assert_eq!(n, "nope"),
                other => panic!("expected NoSnapshot, got {other:?}"),
            }
            hv.snapshot_delete(uuid, "hot").unwrap();
            assert!(matches!(hv.snapshot_delete(uuid, "hot"), Err(HypervisorError::NoSnapshot(_))));
            assert_eq!(hv.snapshot_list(uuid).unwrap().len(), 1);
            hv.destroy(uuid).unwrap();
            // Snapshot metadata does not block undefine.
            hv.undefine(uuid).unwrap();
            assert_eq!(hv.state(uuid).unwrap(), None);
        }));
        let _ = hv.destroy(uuid);
        let _ = hv.undefine(uuid);
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }

    #[test]
    fn networks_on_test_driver() {
        use crate::hypervisor::xml::{network_xml, NetworkSpec};
        let hv = Libvirt::new(TEST_URI);
        let name = format!("nc-net-{}", &Uuid::new_v4().simple().to_string()[..8]);
        let spec = NetworkSpec::Bridge {
            name: name.clone(),
            bridge: "br-nc-test".into(),
            vlan: None,
            openvswitch: false,
        };
        hv.network_define(&network_xml(&spec)).unwrap();
        let listed = hv.network_list().unwrap();
        let ours = listed.iter().find(|n| n.name == name).expect("defined network is listed");
        assert!(ours.active);
        assert_eq!(ours.bridge.as_deref(), Some("br-nc-test"));
        // Redefining an active network is accepted.
        hv.network_define(&network_xml(&spec)).unwrap();
        hv.network_remove(&name).unwrap();
        assert!(!hv.network_list().unwrap().iter().any(|n| n.name == name));
        for r in [hv.network_remove(&name), hv.dhcp_leases(&name).map(drop)] {
            match r {
                Err(HypervisorError::NoNetwork(n)) => assert_eq!(n, name),
                other => panic!("expected NoNetwork, got {other:?}"),
            }
        }
    }

    #[test]
    fn console_of_stopped_domain_is_wrong_state() {
        let hv = Libvirt::new(TEST_URI);
        let s = spec("test", &std::env::temp_dir());
        hv.define(&domain_xml(&s)).unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        let r = hv.open_console(s.uuid, tx);
        hv.undefine(s.uuid).unwrap();
        assert!(matches!(r, Err(HypervisorError::WrongState(_))), "{:?}", r.map(drop));
        let (tx, _rx) = mpsc::unbounded_channel();
        assert!(matches!(hv.open_console(Uuid::new_v4(), tx), Err(HypervisorError::NoDomain(_))));
    }
}

/// Real-guest tests on qemu:///system (TCG), with the tiny guest from
/// tests/guest/build-guest.sh. NOVACRON_SKIP_QEMU=1 skips them.
#[cfg(test)]
mod guest_tests {
    use super::*;
    use crate::hypervisor::disks;
    use crate::hypervisor::xml::{domain_xml, network_xml, random_mac, DomainSpec, NetworkSpec, Nic};
    use std::net::Ipv4Addr;
    use std::path::PathBuf;
    use std::process::Command;
    use std::time::Instant;
    use tokio::sync::mpsc;

    const URI: &str = "qemu:///system";
    const MIB: u64 = 1024 * 1024;

    fn skip(name: &str) -> bool {
        let skip = std::env::var_os("NOVACRON_SKIP_QEMU").is_some();
        if skip {
            eprintln!("skipping {name}: NOVACRON_SKIP_QEMU is set");
        }
        skip
    }

    /// Builds (or reuses) the test guest under /var/tmp, which user
    /// libvirt-qemu can read.
    fn guest_dir() -> PathBuf {
        let dir = PathBuf::from("/var/tmp/novacron-test-guest");
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/guest/build-guest.sh");
        let out = Command::new(&script).arg(&dir).output().expect("run build-guest.sh");
        assert!(out.status.success(), "build-guest.sh failed: {}", String::from_utf8_lossy(&out.stderr));
        dir
    }

    /// Removes everything a test made, also when it panics.
    struct Cleanup {
        hv: Libvirt,
        domain: Option<Uuid>,
        network: Option<String>,
        dir: PathBuf,
    }

    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Some(uuid) = self.domain {
                let _ = self.hv.destroy(uuid);
                if let Err(e) = self.hv.undefine(uuid) {
                    if !matches!(e, HypervisorError::NoDomain(_)) {
                        eprintln!("cleanup: undefine {uuid}: {e}");
                    }
                }
            }
            if let Some(net) = &self.network {
                let _ = self.hv.network_remove(net);
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Collects console output and waits for text in it.
    struct Output {
        rx: mpsc::UnboundedReceiver<Vec<u8>>,
        seen: String,
    }

    impl Output {
        fn wait_for(&mut self, needle: &str, timeout: Duration) -> bool {
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                if self.seen.contains(needle) {
                    return true;
                }
                match self.rx.try_recv() {
                    Ok(chunk) => self.seen.push_str(&String::from_utf8_lossy(&chunk)),
                    Err(mpsc::error::TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(50)),
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                }
            }
            self.seen.contains(needle)
        }

        /// Waits for the channel to close (session ended).
        fn wait_closed(&mut self, timeout: Duration) -> bool {
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                match self.rx.try_recv() {
                    Ok(chunk) => self.seen.push_str(&String::from_utf8_lossy(&chunk)),
                    Err(mpsc::error::TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(50)),
                    Err(mpsc::error::TryRecvError::Disconnected) => return true,
                }
            }
            false
        }
    }

    fn console(hv: &Libvirt, uuid: Uuid) -> (Box<dyn Console>, Output) {
        let (tx, rx) = mpsc::unbounded_channel();
        let c = hv.open_console(uuid, tx).expect("open console");
        (c, Output { rx, seen: String::new() })
    }

    /// Runs a shell command on the guest console and waits for `expect`.
    /// Arithmetic in the command keeps the terminal's echo of the input
    /// from matching.
    fn run(c: &dyn Console, out: &mut Output, cmd: &str, expect: &str) {
        out.seen.clear();
        c.send(format!("{cmd}\n").as_bytes()).unwrap();
        assert!(
            out.wait_for(expect, Duration::from_secs(20)),
            "no {expect:?} after {cmd:?}; got:\n{}",
            out.seen
        );
    }

    /// Runs one qemu-io command on a stopped guest's disk.
    fn qemu_io(disk: &Path, cmd: &str) -> bool {
        let out = Command::new("qemu-io").args(["-f", "qcow2", "-c", cmd]).arg(disk).output().unwrap();
        // qemu-io exits 0 even when a pattern check fails; it says so.
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed")
    }

    fn seed_iso(dir: &Path, first_line: &str) -> PathBuf {
        let src = dir.join("seed");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("user-data"), format!("{first_line}\n")).unwrap();
        std::fs::write(src.join("meta-data"), "instance-id: nc-test\n").unwrap();
        let iso = dir.join("seed.iso");
        let out = Command::new("genisoimage")
            .args(["-quiet", "-output"])
            .arg(&iso)
            .args(["-volid", "cidata", "-joliet", "-rock", "user-data", "meta-data"])
            .current_dir(&src)
            .output()
            .expect("genisoimage (apt-get install genisoimage)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        iso
    }

    /// One guest, exercising NAT network + DHCP lease, cloud-init CD-ROM,
    /// console, live resize, disk hotplug and snapshots, in one boot cycle
    /// to keep TCG boot time down.
    #[test]
    fn qemu_guest_features() {
        if skip("qemu_guest_features") {
            return;
        }
        let guest = guest_dir();
        let id = Uuid::new_v4();
        let short = &id.simple().to_string()[..6];
        let dir = PathBuf::from(format!("/var/tmp/novacron-hv-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cleanup = Cleanup { hv: Libvirt::new(URI), domain: None, network: None, dir: dir.clone() };
        let hv = Libvirt::new(URI);

        // A private NAT subnet that stays on this host's libvirt bridge.
        // The third octet varies so parallel runs do not collide.
        let octet = 10 + (id.as_bytes()[0] % 200);
        let net = format!("nc-test-{short}");
        let spec = NetworkSpec::Nat {
            name: net.clone(),
            bridge: format!("ncbr{short}"),
            gateway: Ipv4Addr::new(10, 213, octet, 1),
            prefix: 24,
            dhcp_start: Ipv4Addr::new(10, 213, octet, 100),
            dhcp_end: Ipv4Addr::new(10, 213, octet, 150),
        };
        cleanup.network = Some(net.clone());
        hv.network_define(&network_xml(&spec)).unwrap();
        let listed = hv.network_list().unwrap();
        let info = listed.iter().find(|n| n.name == net).expect("network listed");
        assert!(info.active);
        assert_eq!(info.bridge.as_deref(), Some(format!("ncbr{short}").as_str()));

        let root = dir.join("root.qcow2");
        disks::create_blank(&root, 64 * MIB).unwrap();
        let extra = dir.join("extra.qcow2");
        disks::create_blank(&extra, 16 * MIB).unwrap();
        let marker = format!("m{short}");
        let mac = random_mac();
        let s = DomainSpec {
            uuid: id,
            name: format!("nc-hv-{short}"),
            domain_type: "qemu".into(),
            vcpus: 1,
            memory_mib: 128,
            disks: vec![root.clone()],
            nics: vec![Nic { network: net.clone(), mac: mac.clone() }],
            cdrom: Some(seed_iso(&dir, &format!("#cloud-config {marker}"))),
            kernel: Some(guest.join("vmlinuz")),
            initrd: Some(guest.join("initramfs.gz")),
            cmdline: Some(format!("console=ttyS0 panic=-1 quiet novacron.marker={marker}")),
            serial_log: dir.join("serial.log"),
            node_id: Uuid::new_v4(),
        };
        hv.define(&domain_xml(&s)).unwrap();
        cleanup.domain = Some(id);

        // Console of a stopped domain.
        let (tx, _rx) = mpsc::unbounded_channel();
        assert!(matches!(hv.open_console(id, tx), Err(HypervisorError::WrongState(_))));

        let t0 = Instant::now();
        hv.start(id).unwrap();
        let (con, mut out) = console(&hv, id);
        assert!(out.wait_for("NOVACRON-GUEST-UP", Duration::from_secs(90)), "no boot:\n{}", out.seen);
        let booted = t0.elapsed();
        assert!(
            out.wait_for(&format!("NOVACRON-CIDATA=#cloud-config {marker}"), Duration::from_secs(30)),
            "{}",
            out.seen
        );
        assert!(out.wait_for("NOVACRON-IP=", Duration::from_secs(60)), "no DHCP lease:\n{}", out.seen);
        // The address may arrive split across chunks: wait for its line end.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !out.seen.split("NOVACRON-IP=").nth(1).unwrap().contains('\n') && Instant::now() < deadline {
            out.wait_for("\u{0}", Duration::from_millis(100));
        }
        let ip_line = out.seen.split("NOVACRON-IP=").nth(1).unwrap();
        let ip: String = ip_line.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
        assert!(ip.starts_with(&format!("10.213.{octet}.")), "{ip}");
        eprintln!("guest up after {booted:?}, lease {ip} for {mac} after {:?}", t0.elapsed());

        // The same lease, seen by libvirt.
        let leases = hv.dhcp_leases(&net).unwrap();
        assert!(leases.contains(&DhcpLease { mac: mac.clone(), ip: ip.clone() }), "{leases:?}");

        // Console input round trip.
        run(&*con, &mut out, "echo hello-$((40000+2))", "hello-40002");

        // Live resize: qemu-img and the guest both see the new size.
        hv.block_resize(id, "vda", 96 * MIB).unwrap();
        assert_eq!(disks::info(&root).unwrap().virtual_size, 96 * MIB);
        run(&*con, &mut out, "echo size-$(cat /sys/block/vda/size)", &format!("size-{}", 96 * MIB / 512));
        assert!(matches!(hv.block_resize(id, "vdz", MIB), Err(HypervisorError::Libvirt(_))));

        // Disk hotplug in and out.
        hv.attach_disk(id, &extra, "vdb", true).unwrap();
        run(
            &*con,
            &mut out,
            "sleep 1; echo vdb-$(cat /sys/block/vdb/size)",
            &format!("vdb-{}", 16 * MIB / 512),
        );
        hv.with_domain(id, |d| {
            let (live, config) = (d.xml_desc(0)?, d.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)?);
            assert!(live.contains("<target dev='vdb'") && config.contains("<target dev='vdb'"));
            Ok::<_, VirError>(())
        })
        .unwrap();
        hv.detach_disk(id, "vdb", true).unwrap();
        run(
            &*con,
            &mut out,
            "for i in 1 2 3 4 5 6 7 8 9 10; do [ -e /sys/block/vdb ] || break; sleep 1; done; echo gone-$((5+5))-$(ls /sys/block | grep -c vdb)",
            "gone-10-0",
        );
        hv.with_domain(id, |d| {
            assert!(!d.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)?.contains("<target dev='vdb'"));
            Ok::<_, VirError>(())
        })
        .unwrap();

        // Memory snapshot of the running guest: RAM state comes back.
        run(&*con, &mut out, "echo before > /tmp/m; echo w-$((1+1))", "w-2");
        assert!(matches!(hv.snapshot_create(id, "hot", "", false), Err(HypervisorError::WrongState(_))));
        let t = Instant::now();
        hv.snapshot_create(id, "hot", "running with RAM", true).unwrap();
        eprintln!("memory snapshot took {:?}", t.elapsed());
        run(&*con, &mut out, "echo after > /tmp/m; echo w-$((1+2))", "w-3");
        let t = Instant::now();
        hv.snapshot_revert(id, "hot", true).unwrap();
        eprintln!("memory revert took {:?}", t.elapsed());
        assert_eq!(hv.state(id).unwrap(), Some(DomainState::Running));
        drop(con);
        let (con, mut out) = console(&hv, id);
        run(&*con, &mut out, "echo m-$(cat /tmp/m)-$((2+2))", "m-before-4");

        // A second session takes the console over (FORCE) and the first
        // one's output channel closes.
        let (con2, mut out2) = console(&hv, id);
        assert!(out.wait_closed(Duration::from_secs(10)), "first session still open");
        assert!(con.send(b"x").is_err() || out.wait_closed(Duration::from_secs(1)));
        run(&*con2, &mut out2, "echo s-$((3+4))", "s-7");
        // Stopping the guest ends the session: the output channel closes.
        hv.destroy(id).unwrap();
        assert!(out2.wait_closed(Duration::from_secs(10)), "console still open after destroy");
        assert!(con2.send(b"x").is_err());
        drop(con2);

        // Disk snapshot of the stopped guest: disk content comes back.
        hv.snapshot_create(id, "cold", "", false).unwrap();
        assert!(qemu_io(&root, "read -P 0 0 64k"));
        assert!(qemu_io(&root, "write -P 0xab 0 64k"));
        assert!(qemu_io(&root, "read -P 0xab 0 64k"));
        hv.snapshot_revert(id, "cold", true).unwrap();
        assert_eq!(hv.state(id).unwrap(), Some(DomainState::Stopped));
        assert!(qemu_io(&root, "read -P 0 0 64k"), "disk content not restored");
        assert!(!qemu_io(&root, "read -P 0xab 0 64k"));

        let list = hv.snapshot_list(id).unwrap();
        let summary: Vec<_> = list.iter().map(|i| (i.name.as_str(), i.state, i.has_memory)).collect();
        assert_eq!(summary, [("hot", DomainState::Running, true), ("cold", DomainState::Stopped, false)]);
        assert_eq!(list[0].description, "running with RAM");

        // From stopped back to the running checkpoint.
        hv.snapshot_revert(id, "hot", true).unwrap();
        assert_eq!(hv.state(id).unwrap(), Some(DomainState::Running));
        hv.destroy(id).unwrap();
        hv.snapshot_delete(id, "cold").unwrap();
        assert_eq!(hv.snapshot_list(id).unwrap().len(), 1);

        // Everything the guest printed is in the serial log too.
        let log = std::fs::read_to_string(&s.serial_log).unwrap();
        for needle in ["NOVACRON-GUEST-UP", &format!("NOVACRON-MARKER={marker}"), "hello-40002", "m-before-4"]
        {
            assert!(log.contains(needle), "{needle} missing from serial log:\n{log}");
        }

        // A domain with snapshots still undefines.
        hv.undefine(id).unwrap();
        assert_eq!(hv.state(id).unwrap(), None);
        cleanup.domain = None;
        hv.network_remove(&net).unwrap();
        assert!(!hv.network_list().unwrap().iter().any(|n| n.name == net));
        assert!(matches!(hv.network_remove(&net), Err(HypervisorError::NoNetwork(_))));
        cleanup.network = None;
    }
}
