//! Every unsafe call into libvirt: what crate `virt` 0.5 does not wrap
//! (domain events, DHCP leases), wraps leakily (interface addresses) or
//! wraps with a panicking `Drop` (close/free, streams). The older functions
//! declare their own `c_void` prototypes; newer ones use the bindings `virt`
//! re-exports as `virt::sys`.

use std::os::raw::{c_char, c_int, c_uchar, c_void};
use std::sync::Arc;

use uuid::Uuid;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::domain_snapshot::DomainSnapshot;
use virt::error::Error as VirError;
use virt::network::Network;
use virt::sys;

use super::conn::{lock, Handle, Subscribers};
use crate::hypervisor::LifecycleEvent;

/// VIR_DOMAIN_EVENT_ID_LIFECYCLE.
const EVENT_ID_LIFECYCLE: c_int = 0;
/// VIR_UUID_BUFLEN.
const UUID_BUFLEN: usize = 16;

/// virConnectDomainEventCallback, the lifecycle callback type. libvirt
/// takes it as the generic callback type; both are plain C function
/// pointers, so declaring the parameter with this type is ABI-identical
/// to the VIR_DOMAIN_EVENT_CALLBACK() cast C code does.
type LifecycleCallback = unsafe extern "C" fn(*mut c_void, *mut c_void, c_int, c_int, *mut c_void) -> c_int;
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
}

/// Implements [`Handle`] for a `virt` type with the C function that
/// releases one reference to it.
macro_rules! release_with {
    ($ty:ty, $free:path, $what:literal) => {
        impl Handle for $ty {
            fn release(self) {
                // SAFETY: `self` owns one reference to a valid libvirt
                // object. We take the pointer, forget the wrapper so its
                // Drop does not release the same reference again, and
                // release it exactly once here.
                let rc = unsafe {
                    let ptr = self.as_ptr();
                    std::mem::forget(self);
                    $free(ptr)
                };
                if rc < 0 {
                    tracing::warn!(concat!("libvirt: ", $what, " failed: {}"), VirError::last_error());
                }
            }
        }
    };
}

release_with!(Connect, sys::virConnectClose, "closing connection");
release_with!(Domain, sys::virDomainFree, "freeing domain");
release_with!(Network, sys::virNetworkFree, "freeing network");
release_with!(DomainSnapshot, sys::virDomainSnapshotFree, "freeing snapshot");

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
    event: c_int,
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
        (subs, LifecycleEvent { uuid: Uuid::from_bytes(raw), name, kind: super::lifecycle_kind(event) })
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

/// virStreamRecv/Send: the non-blocking stream has nothing to give/take.
const WOULD_BLOCK: c_int = -2;

/// A non-blocking libvirt stream (a console) that we hold the only
/// reference to; [`Stream::close`] releases it.
pub(super) struct Stream(sys::virStreamPtr);

// SAFETY: the pointer is only dereferenced by libvirt, under the console
// session's mutex, and libvirt stream objects are not tied to a thread.
unsafe impl Send for Stream {}

impl Stream {
    /// Opens `dom`'s first console on a new non-blocking stream, taking it
    /// over from any earlier session.
    pub(super) fn open_console(conn: &Connect, dom: &Domain) -> Result<Stream, VirError> {
        // SAFETY: `conn` is live; the new stream (one reference, ours) is
        // freed on the failure path below or by `close`.
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
        Ok(Stream(st))
    }

    /// Sends what the stream accepts of `data`: `Ok(None)` when it would
    /// block.
    pub(super) fn send(&self, data: &[u8]) -> Result<Option<usize>, VirError> {
        // SAFETY: the stream is live (ours until `close`) and `data` is a
        // valid buffer of the given length.
        let n = unsafe { sys::virStreamSend(self.0, data.as_ptr().cast(), data.len()) };
        match n {
            WOULD_BLOCK => Ok(None),
            n if n < 0 => Err(VirError::last_error()),
            n => Ok(Some(n as usize)),
        }
    }

    /// Reads into `buf`: `Ok(Some(0))` at end of stream, `Ok(None)` when
    /// nothing is available.
    pub(super) fn recv(&self, buf: &mut [u8]) -> Result<Option<usize>, VirError> {
        // SAFETY: live stream; `buf` is writable for its length.
        let n = unsafe { sys::virStreamRecv(self.0, buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            WOULD_BLOCK => Ok(None),
            n if n < 0 => Err(VirError::last_error()),
            n => Ok(Some(n as usize)),
        }
    }

    /// Calls `handler.on_stream` on libvirt's event thread for `events`.
    /// On failure the handler's `Arc` is leaked (as in
    /// `register_lifecycle`).
    pub(super) fn add_callback<T: StreamHandler>(
        &self,
        events: c_int,
        handler: Arc<T>,
    ) -> Result<(), VirError> {
        // SAFETY: the opaque is one leaked Arc<T>, reclaimed by
        // `release_arc::<T>` when libvirt drops the callback;
        // `on_stream::<T>` matches virStreamEventCallback and the stream is
        // live.
        let rc = unsafe {
            sys::virStreamEventAddCallback(
                self.0,
                events,
                Some(on_stream::<T>),
                Arc::into_raw(handler) as *mut c_void,
                Some(release_arc::<T>),
            )
        };
        if rc < 0 {
            return Err(VirError::last_error());
        }
        Ok(())
    }

    /// Changes the events the registered callback is called for.
    pub(super) fn watch(&self, events: c_int) {
        // SAFETY: live stream with a registered callback.
        unsafe { sys::virStreamEventUpdateCallback(self.0, events) };
    }

    /// Unregisters the callback and releases the stream: FINISH after a
    /// clean EOF, ABORT otherwise.
    pub(super) fn close(self, clean_eof: bool) {
        // SAFETY: the stream is live and ours; its callback (if any) is
        // removed first so libvirt calls nothing more on it, then our
        // single reference is released. Errors here leave nothing to undo.
        unsafe {
            sys::virStreamEventRemoveCallback(self.0);
            if clean_eof {
                sys::virStreamFinish(self.0);
            } else {
                sys::virStreamAbort(self.0);
            }
            sys::virStreamFree(self.0);
        }
    }
}

/// What libvirt's event thread calls for a stream registered with
/// [`Stream::add_callback`].
pub(super) trait StreamHandler: Send + Sync {
    fn on_stream(&self, events: sys::virStreamEventType);
}

/// What libvirt's event thread calls for a timer added with [`add_timer`].
pub(super) trait TimerHandler: Send + Sync {
    fn on_timer(&self, timer: c_int);
}

/// Adds a disabled event-loop timer (enable it with [`update_timer`]) that
/// calls `handler.on_timer`. Returns its id. On failure the handler's
/// `Arc` is leaked (as in `register_lifecycle`).
pub(super) fn add_timer<T: TimerHandler>(handler: Arc<T>) -> Result<c_int, VirError> {
    // SAFETY: the opaque is one leaked Arc<T>, reclaimed by
    // `release_arc::<T>` when libvirt drops the timer; `on_timer::<T>`
    // matches virEventTimeoutCallback. -1 = disabled.
    let timer = unsafe {
        sys::virEventAddTimeout(
            -1,
            Some(on_timer::<T>),
            Arc::into_raw(handler) as *mut c_void,
            Some(release_arc::<T>),
        )
    };
    if timer < 0 {
        return Err(VirError::last_error());
    }
    Ok(timer)
}

/// Sets a timer's period: 0 fires as soon as possible, -1 disables it.
pub(super) fn update_timer(timer: c_int, ms: c_int) {
    // SAFETY: thread-safe libvirt call on an id from virEventAddTimeout;
    // ids are never reused, so a removed timer is simply not found.
    unsafe { sys::virEventUpdateTimeout(timer, ms) };
}

/// Removes a timer; libvirt then releases its handler.
pub(super) fn remove_timer(timer: c_int) {
    // SAFETY: as in `update_timer`.
    unsafe { sys::virEventRemoveTimeout(timer) };
}

unsafe extern "C" fn on_stream<T: StreamHandler>(
    _stream: sys::virStreamPtr,
    events: c_int,
    opaque: *mut c_void,
) {
    // SAFETY: `opaque` is the Arc<T> leaked for this callback, alive until
    // `release_arc` runs after the callback is removed.
    let handler = unsafe { &*(opaque as *const T) };
    // Unwinding out of an extern "C" fn aborts (see `on_lifecycle`).
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        handler.on_stream(events as sys::virStreamEventType)
    }));
}

unsafe extern "C" fn on_timer<T: TimerHandler>(timer: c_int, opaque: *mut c_void) {
    // SAFETY: as in `on_stream`, for the timer's Arc<T>.
    let handler = unsafe { &*(opaque as *const T) };
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.on_timer(timer)));
}

unsafe extern "C" fn release_arc<T>(opaque: *mut c_void) {
    // SAFETY: `opaque` is one Arc<T> from Arc::into_raw in `add_callback`
    // or `add_timer`; libvirt calls this once per registration.
    drop(unsafe { Arc::from_raw(opaque as *const T) });
}
