//! Serial console sessions: a non-blocking libvirt stream pumped by
//! libvirt's event loop into the caller's channel. The stream is only
//! touched on the event thread; callers hand input over and poke a timer.

use std::os::raw::c_int;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc::UnboundedSender;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::Error as VirError;
use virt::sys;

use super::conn::lock;
use super::ffi::{self, Stream, StreamHandler, TimerHandler};

struct SessionState {
    /// `None` once torn down.
    stream: Option<Stream>,
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

/// The caller's side of a console session.
pub(super) struct ConsoleSession(Arc<Session>);

/// Opens `dom`'s console on a non-blocking stream whose output is
/// pumped into `output` by libvirt's event loop.
pub(super) fn open_console(
    conn: &Connect,
    dom: &Domain,
    output: UnboundedSender<Vec<u8>>,
) -> Result<ConsoleSession, VirError> {
    let stream = Stream::open_console(conn, dom)?;
    let session = Arc::new(Session {
        state: Mutex::new(SessionState {
            stream: Some(stream),
            output: Some(output),
            pending: Vec::new(),
            closing: false,
        }),
        timer: AtomicI32::new(-1),
    });
    // Disabled until poked.
    let timer = match ffi::add_timer(session.clone()) {
        Ok(timer) => timer,
        Err(e) => {
            // Teardown drops the sender so nothing waits on it.
            teardown(&mut lock(&session.state), false);
            return Err(e);
        }
    };
    session.timer.store(timer, Ordering::SeqCst);
    let added = {
        let st = lock(&session.state);
        let stream = st.stream.as_ref().expect("no callback can have torn the stream down yet");
        stream.add_callback(READ_EVENTS, session.clone())
    };
    if let Err(e) = added {
        teardown(&mut lock(&session.state), false);
        ffi::remove_timer(timer);
        return Err(e);
    }
    Ok(ConsoleSession(session))
}

impl ConsoleSession {
    /// Runs `on_timer` on the event thread as soon as possible.
    fn poke(&self) {
        ffi::update_timer(self.0.timer.load(Ordering::SeqCst), 0);
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
    if let Some(stream) = st.stream.take() {
        stream.close(clean_eof);
    }
    st.output = None;
    st.pending.clear();
}

/// Sends queued input; asks for WRITABLE events while some is left.
fn flush(st: &mut SessionState) {
    while !st.pending.is_empty() {
        let Some(stream) = &st.stream else { return };
        match stream.send(&st.pending) {
            Ok(None) => return stream.watch(WRITE_EVENTS),
            Ok(Some(n)) => {
                st.pending.drain(..n);
            }
            Err(e) => {
                tracing::debug!("libvirt console send: {e}");
                return teardown(st, false);
            }
        }
    }
    if let Some(stream) = &st.stream {
        stream.watch(READ_EVENTS);
    }
}

/// Reads everything available and forwards it.
fn drain(st: &mut SessionState) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Some(stream) = &st.stream {
        match stream.recv(&mut buf) {
            Ok(None) => return,
            Ok(Some(0)) => return teardown(st, true),
            Ok(Some(n)) => {
                let sent = st.output.as_ref().is_some_and(|tx| tx.send(buf[..n].to_vec()).is_ok());
                if !sent {
                    // Nobody listens any more.
                    return teardown(st, false);
                }
            }
            Err(e) => {
                tracing::debug!("libvirt console recv: {e}");
                return teardown(st, false);
            }
        }
    }
}

impl StreamHandler for Session {
    fn on_stream(&self, events: sys::virStreamEventType) {
        let mut st = lock(&self.state);
        if st.closing {
            return teardown(&mut st, false);
        }
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
    }
}

impl TimerHandler for Session {
    fn on_timer(&self, timer: c_int) {
        let mut st = lock(&self.state);
        let done = if st.closing || st.stream.is_none() {
            teardown(&mut st, false);
            true
        } else {
            flush(&mut st);
            st.stream.is_none()
        };
        if done {
            ffi::remove_timer(timer);
        } else {
            ffi::update_timer(timer, -1);
        }
    }
}
