//! The connection and handle-ownership layer under [`super::Libvirt`]:
//! one shared connection, opened lazily and replaced when it dies
//! (libvirtd restart), libvirt's event loop, owners that release libvirt
//! handles without panicking, and the mapping of libvirt errors to ours.

use std::os::raw::c_int;
use std::sync::{Mutex, MutexGuard, Once};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use uuid::Uuid;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::domain_snapshot::DomainSnapshot;
use virt::enumutil::Enum;
use virt::error::{Error as VirError, ErrorNumber};
use virt::network::Network;

use super::{ffi, Libvirt};
use crate::hypervisor::{HypervisorError, LifecycleEvent, Result};

/// Keepalive for remote URIs: a dead libvirtd is noticed after ~20 s even
/// when no call is in flight (needs the event loop below).
const KEEPALIVE_INTERVAL_S: i32 = 5;
const KEEPALIVE_COUNT: u32 = 3;

pub(super) type Subscribers = Mutex<Vec<UnboundedSender<LifecycleEvent>>>;

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the hypervisor down with it; the
    // guarded data stays consistent across every critical section here.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(super) static EVENT_LOOP: Once = Once::new();

/// Registers libvirt's default event implementation and starts the thread
/// that drives it, once per process. Must run before the first connection is
/// opened: the remote driver only wires events/keepalive into connections
/// opened after an event implementation exists.
pub(super) fn init_event_loop() {
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

/// A libvirt object that [`Owned`] releases: one reference, given back
/// exactly once (the implementations are in [`ffi`]).
pub(super) trait Handle {
    /// Releases the reference, logging a failure instead of panicking.
    fn release(self);
}

/// Owns one reference to a libvirt object (connection, domain, network,
/// snapshot) and releases it explicitly on drop, so a failing free is
/// logged instead of panicking like the `virt` types' own `Drop`. Domain,
/// network and snapshot handles are always scoped inside the closure that
/// holds their connection.
pub(super) struct Owned<H: Handle>(Option<H>);

impl<H: Handle> Owned<H> {
    pub(super) fn new(handle: H) -> Self {
        Owned(Some(handle))
    }
}

impl<H: Handle> std::ops::Deref for Owned<H> {
    type Target = H;
    fn deref(&self) -> &H {
        // Only `drop` takes the value out.
        self.0.as_ref().expect("libvirt handle already released")
    }
}

impl<H: Handle> Drop for Owned<H> {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.release();
        }
    }
}

/// The shared connection plus its lifecycle-callback registration.
pub(super) struct Conn {
    pub(super) conn: Owned<Connect>,
    pub(super) callback_id: Option<c_int>,
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

pub(super) struct Inner {
    pub(super) conn: Option<Conn>,
    /// Bumped on every (re)connect so a failed call only discards the
    /// connection it actually used, not a newer one.
    pub(super) generation: u64,
}

impl Libvirt {
    pub(super) fn unavailable(&self, reason: impl std::fmt::Display) -> HypervisorError {
        HypervisorError::Unavailable { uri: self.uri.clone(), reason: reason.to_string() }
    }

    pub(super) fn open(&self) -> Result<Conn> {
        let conn = Owned::new(Connect::open(Some(&self.uri)).map_err(|e| self.unavailable(e.message()))?);
        // Only remote URIs support keepalive; local drivers answer NoSupport.
        if let Err(e) = conn.set_keep_alive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT) {
            tracing::debug!("libvirt {}: keepalive not enabled: {}", self.uri, e.message());
        }
        tracing::info!("libvirt: connected to {}", self.uri);
        Ok(Conn { conn, callback_id: None })
    }

    /// Registers the lifecycle callback on `conn` if anyone subscribed and it
    /// is not registered yet. Failures are logged and retried on the next call.
    pub(super) fn ensure_callback(&self, conn: &mut Conn) -> std::result::Result<(), VirError> {
        if conn.callback_id.is_some() || lock(&self.subscribers).is_empty() {
            return Ok(());
        }
        conn.callback_id = Some(ffi::register_lifecycle(&conn.conn, self.subscribers.clone())?);
        Ok(())
    }

    /// Returns a handle on a live connection, (re)connecting when there is
    /// none or the current one died.
    pub(super) fn connection(&self) -> Result<(Owned<Connect>, u64)> {
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
        Ok((Owned::new((*conn.conn).clone()), generation))
    }

    pub(super) fn discard_connection(&self, generation: u64) {
        let mut inner = lock(&self.inner);
        if inner.generation == generation {
            inner.conn = None;
        }
    }

    /// Runs `op` on a live connection. If it fails with a connection-level
    /// error and the connection is indeed dead, reconnects and runs it once
    /// more. A retried non-idempotent call (e.g. start) may then report
    /// `WrongState` if the first attempt had reached libvirtd.
    pub(super) fn with_conn<T, E: Into<CallError>>(
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
    pub(super) fn with_domain<T, E: Into<CallError>>(
        &self,
        uuid: Uuid,
        mut op: impl FnMut(&Domain) -> std::result::Result<T, E>,
    ) -> Result<T> {
        self.with_conn(Some(uuid), |c| {
            let dom = Owned::new(c.lookup_domain_by_uuid(uuid)?);
            op(&dom).map_err(Into::<CallError>::into)
        })
    }

    /// Runs `op` on the network called `name`; a missing one is `NoNetwork`.
    pub(super) fn with_network<T>(
        &self,
        name: &str,
        mut op: impl FnMut(&Network) -> std::result::Result<T, VirError>,
    ) -> Result<T> {
        self.with_conn(None, |c| {
            let net =
                Owned::new(c.lookup_network_by_name(name).map_err(|e| not_found(e, || no_network(name)))?);
            op(&net).map_err(CallError::Virt)
        })
    }

    /// Runs `op` on the snapshot `name` of domain `uuid`.
    pub(super) fn with_snapshot<T>(
        &self,
        uuid: Uuid,
        name: &str,
        mut op: impl FnMut(&Domain, &DomainSnapshot) -> std::result::Result<T, CallError>,
    ) -> Result<T> {
        self.with_domain(uuid, |dom| {
            let snap = Domain::lookup_snapshot_by_name(dom, name, 0)
                .map_err(|e| not_found(e, || HypervisorError::NoSnapshot(name.to_string())))?;
            op(dom, &Owned::new(snap))
        })
    }
}

pub(super) fn no_network(name: &str) -> HypervisorError {
    HypervisorError::NoNetwork(name.to_string())
}

/// Turns libvirt's "no such network/snapshot" into our error, keeping any
/// other failure for the usual classification.
pub(super) fn not_found(e: VirError, ours: impl FnOnce() -> HypervisorError) -> CallError {
    if code_is(&e, ErrorNumber::NoNetwork) || code_is(&e, ErrorNumber::NoDomainSnapshot) {
        CallError::Hv(ours())
    } else {
        CallError::Virt(e)
    }
}

/// What an operation closure can fail with: a libvirt error (classified and
/// mapped by `with_conn`) or a check of our own.
pub(super) enum CallError {
    Virt(VirError),
    Hv(HypervisorError),
}

impl From<VirError> for CallError {
    fn from(e: VirError) -> Self {
        CallError::Virt(e)
    }
}

pub(super) fn code_is(e: &VirError, n: ErrorNumber) -> bool {
    e.code() == Enum::Known(n)
}

/// Errors a dead connection produces. Each of them can also have other
/// causes, so callers confirm with `is_alive()` before reconnecting.
pub(super) fn is_connection_error(e: &VirError) -> bool {
    [ErrorNumber::SystemError, ErrorNumber::NoConnect, ErrorNumber::InternalError, ErrorNumber::Rpc]
        .into_iter()
        .any(|n| code_is(e, n))
}

pub(super) fn map_error(uuid: Option<Uuid>, e: VirError) -> HypervisorError {
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
