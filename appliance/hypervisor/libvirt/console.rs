//! Serial console sessions: a non-blocking libvirt stream pumped by
//! libvirt's event loop into the caller's channel.

use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc::UnboundedSender;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::Error as VirError;
use virt::sys;

use super::conn::lock;

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

const READ_EVENTS: c_int =
    (sys::VIR_STREAM_EVENT_READABLE | sys::VIR_STREAM_EVENT_ERROR | sys::VIR_STREAM_EVENT_HANGUP) as c_int;
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
                let sent = st.output.as_ref().is_some_and(|tx| tx.send(buf[..n as usize].to_vec()).is_ok());
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
