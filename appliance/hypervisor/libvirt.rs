//! The libvirt implementation of [`super::Hypervisor`].
//!
//! One shared connection, opened lazily and replaced when it dies (libvirtd
//! restart). Calls clone the connection handle and run without holding the
//! lock, so slow operations (starting a guest) do not serialise the rest.
//!
//! crate `virt` 0.5 has no domain-event API and its `Drop` impls panic when
//! the C free fails, so a small [`ffi`] module fills those gaps.

use std::os::raw::c_int;
use std::sync::{Arc, Mutex, MutexGuard, Once};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use uuid::Uuid;
use virt::connect::Connect;
use virt::domain::{Domain, DomainState as VirState};
use virt::enumutil::Enum;
use virt::error::{Error as VirError, ErrorNumber};

use super::{DomainInfo, DomainState, Hypervisor, HypervisorError, HypervisorInfo, LifecycleEvent, Result};

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
}

/// The libvirt calls crate `virt` 0.5 does not wrap (domain events) or wraps
/// with a panicking `Drop` (close/free). Symbols come from libvirt.so, which
/// `virt-sys` already links. Pointers are passed as `c_void` because the
/// `virt_sys` types are not reachable without a direct dependency.
#[allow(unsafe_code)]
mod ffi {
    use std::os::raw::{c_char, c_int, c_uchar, c_void};
    use std::sync::Arc;

    use uuid::Uuid;
    use virt::connect::Connect;
    use virt::domain::Domain;
    use virt::error::Error as VirError;

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
            network: None,
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
}
