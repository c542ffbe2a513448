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

use super::conn::{lock, Subscribers};
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
