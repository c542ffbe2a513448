//! vhost-user-blk over a `BlockDevice`, on rust-vmm's vhost-user-backend.
//!
//! Completion is strictly in order per virtqueue: each queue's thread pops
//! every request available (up to `BATCH`), runs them concurrently, and
//! only when all of them have ended puts them in the used ring, in the
//! order it popped them. That is what makes a backend restart safe without
//! INFLIGHT_SHMFD (which vhost-user-backend 0.24 does not implement, and
//! offering it kills every connection): after a reconnect QEMU rewinds the
//! ring to the used index and resubmits everything after it, which is
//! exactly the requests that had not completed. With out-of-order
//! completion it would resubmit some that had. Running a batch together is
//! allowed because the guest has them all in flight at once: virtio-blk
//! orders nothing between outstanding requests (a flush covers only writes
//! completed before it was submitted).

use super::device::{AlignedBuf, BlockDevice};
use super::DataplaneError;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tracing::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

type Mem = GuestMemoryMmap<()>;
type AtomicMem = GuestMemoryAtomic<Mem>;
type Vring = VringRwLock<AtomicMem>;

const SECTOR: u64 = 512;
/// The guest's logical block size: requests then are whole aligned 4 KiB
/// blocks and O_DIRECT needs no read-modify-write.
pub const BLK_SIZE: u32 = 4096;
/// Ring size offered to QEMU (libvirt's queue_size may ask for less).
pub const QUEUE_SIZE: usize = 256;
/// Data segments per request: the 256-entry queue minus header and status,
/// so that a 1 MiB guest write (256 pages, or fewer when contiguous) is one
/// request instead of two run one after the other.
const SEG_MAX: u32 = 254;
/// Requests of one queue run at once, at most: sync replication spends a
/// write's time waiting for the peer, and these waits overlap.
const BATCH: usize = 32;
/// Threads (with a bounce buffer each) that run one batch.
const WORKERS: usize = 8;
/// Largest piece of a request handed to the device at once; longer
/// requests go through the bounce buffer in pieces of this size.
const CHUNK: usize = 1 << 20;
/// The serial (GET_ID) is at most this long.
const ID_LEN: usize = 20;

/// Counters of one export, shared by its serving thread, its worker
/// threads and `status`.
#[derive(Debug, Default)]
pub struct ExportStats {
    pub connected: AtomicBool,
    pub connections: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub errors: AtomicU64,
    /// Requests completed per virtqueue.
    pub per_queue: Vec<AtomicU64>,
    pub last_error: Mutex<Option<String>>,
}

impl ExportStats {
    pub fn new(queues: u16) -> Self {
        ExportStats { per_queue: (0..queues).map(|_| AtomicU64::new(0)).collect(), ..Default::default() }
    }

    pub fn set_error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Counts a failed request; logs the 1st, 2nd, 4th, 8th... so a guest
    /// sending garbage cannot flood the journal.
    fn failed(&self, name: &str, why: &str) {
        let n = self.errors.fetch_add(1, Ordering::Relaxed) + 1;
        self.set_error(why.to_string());
        if n.is_power_of_two() {
            warn!(disk = name, errors = n, "request failed: {why}");
        }
    }
}

/// One piece of guest memory a request points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    pub addr: u64,
    pub len: u32,
}

/// A descriptor of a chain: where, how long, and whether the device writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub seg: Seg,
    pub write_only: bool,
}

/// A chain split the way virtio 1.x frames it: device-readable bytes
/// first, then device-writable ones, in any descriptor layout.
#[derive(Debug, PartialEq, Eq)]
struct Framing {
    readable: Vec<Seg>,
    writable: Vec<Seg>,
}

fn total(segs: &[Seg]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// The first `n` bytes of `segs` and the rest (`None`: fewer than `n`).
fn split_at(segs: &[Seg], n: u64) -> Option<(Vec<Seg>, Vec<Seg>)> {
    let (mut head, mut tail, mut left) = (Vec::new(), Vec::new(), n);
    for s in segs {
        let len = u64::from(s.len);
        if left >= len {
            if len > 0 {
                head.push(*s);
            }
            left -= len;
        } else if left > 0 {
            head.push(Seg { addr: s.addr, len: left as u32 });
            tail.push(Seg { addr: s.addr.checked_add(left)?, len: s.len - left as u32 });
            left = 0;
        } else if len > 0 {
            tail.push(*s);
        }
    }
    (left == 0).then_some((head, tail))
}

/// Readable before writable, or the chain is malformed; returns the
/// framing and, for a malformed chain, still the writable part so the
/// status byte can say IOERR.
fn frame(descs: &[Desc]) -> Result<Framing, Vec<Seg>> {
    let first_w = descs.iter().position(|d| d.write_only).unwrap_or(descs.len());
    let readable: Vec<Seg> = descs[..first_w].iter().map(|d| d.seg).collect();
    let writable: Vec<Seg> = descs[first_w..].iter().filter(|d| d.write_only).map(|d| d.seg).collect();
    if descs[first_w..].iter().any(|d| !d.write_only) {
        return Err(writable);
    }
    Ok(Framing { readable, writable })
}

/// A request after its header was checked against the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    In { offset: u64, len: u64 },
    Out { offset: u64, len: u64 },
    Flush,
    GetId { len: u64 },
}

/// Checks a request header (type u32, reserved u32, sector u64, little
/// endian). `readable` / `writable` are the data bytes around it (header and
/// status byte excluded). Errors are the virtio status to answer with.
pub fn parse_request(hdr: &[u8; 16], readable: u64, writable: u64, capacity: u64) -> Result<Request, u8> {
    let rtype = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
    let ioerr = VIRTIO_BLK_S_IOERR as u8;
    let range = |len: u64| -> Result<(u64, u64), u8> {
        let offset = sector.checked_mul(SECTOR).ok_or(ioerr)?;
        let end = offset.checked_add(len).ok_or(ioerr)?;
        if len % SECTOR != 0 || end > capacity {
            return Err(ioerr);
        }
        Ok((offset, len))
    };
    match rtype {
        VIRTIO_BLK_T_IN if readable == 0 => range(writable).map(|(offset, len)| Request::In { offset, len }),
        VIRTIO_BLK_T_OUT if writable == 0 => {
            range(readable).map(|(offset, len)| Request::Out { offset, len })
        }
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => Err(ioerr),
        VIRTIO_BLK_T_FLUSH => Ok(Request::Flush),
        VIRTIO_BLK_T_GET_ID if writable > 0 => Ok(Request::GetId { len: writable.min(ID_LEN as u64) }),
        VIRTIO_BLK_T_GET_ID => Err(ioerr),
        _ => Err(VIRTIO_BLK_S_UNSUPP as u8),
    }
}

/// Copies `data` into the guest bytes `segs` describe, starting `skip`
/// bytes into them.
fn to_guest(mem: &Mem, segs: &[Seg], skip: u64, data: &[u8]) -> Result<(), ()> {
    let (_, rest) = split_at(segs, skip).ok_or(())?;
    let (part, _) = split_at(&rest, data.len() as u64).ok_or(())?;
    let mut pos = 0;
    for s in part {
        let n = s.len as usize;
        mem.write_slice(&data[pos..pos + n], GuestAddress(s.addr)).map_err(|_| ())?;
        pos += n;
    }
    Ok(())
}

/// Fills `buf` from the guest bytes `segs` describe, from `skip` on.
fn from_guest(mem: &Mem, segs: &[Seg], skip: u64, buf: &mut [u8]) -> Result<(), ()> {
    let (_, rest) = split_at(segs, skip).ok_or(())?;
    let (part, _) = split_at(&rest, buf.len() as u64).ok_or(())?;
    let mut pos = 0;
    for s in part {
        let n = s.len as usize;
        mem.read_slice(&mut buf[pos..pos + n], GuestAddress(s.addr)).map_err(|_| ())?;
        pos += n;
    }
    Ok(())
}

/// What one export serves, fixed for its lifetime.
pub struct Disk {
    pub name: String,
    pub dev: Arc<dyn BlockDevice>,
    pub serial: String,
    pub queues: u16,
    pub stats: Arc<ExportStats>,
}

impl Disk {
    /// Runs one request chain to its end; returns the number of bytes
    /// written into the guest (for the used ring). Never panics on guest input.
    pub fn process(&self, mem: &Mem, descs: &[Desc], bounce: &mut AlignedBuf) -> u32 {
        let (framing, status_ok) = match frame(descs) {
            Ok(f) => (f, true),
            Err(writable) => (Framing { readable: Vec::new(), writable }, false),
        };
        let wtotal = total(&framing.writable);
        let Some((wdata, status)) = wtotal.checked_sub(1).and_then(|n| split_at(&framing.writable, n)) else {
            // No byte to put a status in: nothing can be reported.
            self.stats.failed(&self.name, "request without a status byte");
            return 0;
        };
        let status = status[0];
        let answer = |code: u8, written: u64| -> u32 {
            if mem.write_slice(&[code], GuestAddress(status.addr)).is_err() {
                return 0;
            }
            (written + 1).min(u64::from(u32::MAX)) as u32
        };
        if !status_ok {
            self.stats.failed(&self.name, "device-readable descriptor after a writable one");
            return answer(VIRTIO_BLK_S_IOERR as u8, 0);
        }
        let mut hdr = [0u8; 16];
        let Some((_, rdata)) = split_at(&framing.readable, 16) else {
            self.stats.failed(&self.name, "request header shorter than 16 bytes");
            return answer(VIRTIO_BLK_S_IOERR as u8, 0);
        };
        if from_guest(mem, &framing.readable, 0, &mut hdr).is_err() {
            self.stats.failed(&self.name, "request header outside guest memory");
            return answer(VIRTIO_BLK_S_IOERR as u8, 0);
        }
        let req = match parse_request(&hdr, total(&rdata), total(&wdata), self.dev.size()) {
            Ok(r) => r,
            Err(code) => {
                let rtype = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
                let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
                self.stats.failed(&self.name, &format!("bad request: type {rtype} sector {sector}"));
                return answer(code, 0);
            }
        };
        match self.execute(req, mem, &rdata, &wdata, bounce) {
            Ok(written) => answer(VIRTIO_BLK_S_OK as u8, written),
            Err(why) => {
                self.stats.failed(&self.name, &format!("{req:?}: {why}"));
                answer(VIRTIO_BLK_S_IOERR as u8, 0)
            }
        }
    }

    fn execute(
        &self,
        req: Request,
        mem: &Mem,
        rdata: &[Seg],
        wdata: &[Seg],
        bounce: &mut AlignedBuf,
    ) -> Result<u64, String> {
        let guest = |()| "buffer outside guest memory".to_string();
        let s = &self.stats;
        match req {
            Request::In { offset, len } => {
                s.reads.fetch_add(1, Ordering::Relaxed);
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(bounce.len() as u64) as usize;
                    let buf = &mut bounce.as_mut_slice()[..n];
                    self.dev.read_at(buf, offset + done).map_err(|e| e.to_string())?;
                    to_guest(mem, wdata, done, buf).map_err(guest)?;
                    done += n as u64;
                }
                Ok(len)
            }
            Request::Out { offset, len } => {
                s.writes.fetch_add(1, Ordering::Relaxed);
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(bounce.len() as u64) as usize;
                    let buf = &mut bounce.as_mut_slice()[..n];
                    from_guest(mem, rdata, done, buf).map_err(guest)?;
                    self.dev.write_at(buf, offset + done, false).map_err(|e| e.to_string())?;
                    done += n as u64;
                }
                Ok(0)
            }
            Request::Flush => {
                s.flushes.fetch_add(1, Ordering::Relaxed);
                self.dev.flush().map_err(|e| e.to_string())?;
                Ok(0)
            }
            Request::GetId { len } => {
                // NUL-padded when shorter than the buffer.
                let mut id = [0u8; ID_LEN];
                let serial = self.serial.as_bytes();
                let n = serial.len().min(ID_LEN);
                id[..n].copy_from_slice(&serial[..n]);
                to_guest(mem, wdata, 0, &id[..len as usize]).map_err(guest)?;
                Ok(len)
            }
        }
    }

    /// Runs the chains of `batch` at once (see the module's comment) on up
    /// to `WORKERS` threads, each with a buffer of `bounce` (grown as
    /// needed); their used lengths, in `batch`'s order.
    fn process_batch(&self, mem: &Mem, batch: &[(u16, Vec<Desc>)], bounce: &mut Vec<AlignedBuf>) -> Vec<u32> {
        if let [(_, descs)] = batch {
            return vec![self.process(mem, descs, &mut bounce[0])];
        }
        let workers = batch.len().min(WORKERS);
        while bounce.len() < workers {
            bounce.push(AlignedBuf::new(CHUNK));
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let used: Vec<std::sync::atomic::AtomicU32> = batch.iter().map(|_| Default::default()).collect();
        let work = |buf: &mut AlignedBuf| loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some((_, descs)) = batch.get(i) else { return };
            used[i].store(self.process(mem, descs, buf), Ordering::Relaxed);
        };
        std::thread::scope(|s| {
            let (mine, others) = bounce[..workers].split_first_mut().expect("at least one buffer");
            for buf in others {
                s.spawn(|| work(buf));
            }
            work(mine);
        });
        used.into_iter().map(|u| u.into_inner()).collect()
    }

    /// `struct virtio_blk_config` (little endian) with the fields offered.
    fn config_space(&self) -> [u8; 64] {
        let mut c = [0u8; 64];
        c[0..8].copy_from_slice(&(self.dev.size() / SECTOR).to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&BLK_SIZE.to_le_bytes());
        c[34..36].copy_from_slice(&self.queues.to_le_bytes());
        c
    }
}

/// The vhost-user backend of one connection (a fresh one per connection,
/// so nothing of a gone QEMU's memory or rings outlives it).
#[derive(Clone)]
struct Backend(Arc<Conn>);

struct Conn {
    disk: Arc<Disk>,
    event_idx: AtomicBool,
    mem: AtomicMem,
    /// Bounce buffers of each queue (up to `WORKERS`, made as needed); a
    /// queue's thread is their only user.
    bounce: Vec<Mutex<Vec<AlignedBuf>>>,
}

impl Backend {
    fn drain(&self, vring: &Vring, queue: usize) -> io::Result<()> {
        let mem = self.0.mem.memory();
        let event_idx = self.0.event_idx.load(Ordering::Relaxed);
        let mut bounce = self.0.bounce[queue].lock().unwrap_or_else(|p| p.into_inner());
        let mut st = vring.get_mut();
        loop {
            if event_idx {
                st.disable_notification().map_err(io::Error::other)?;
            }
            loop {
                let mut batch: Vec<(u16, Vec<Desc>)> = Vec::new();
                while batch.len() < BATCH {
                    let Some(chain) = st.get_queue_mut().pop_descriptor_chain(mem.clone()) else { break };
                    let head = chain.head_index();
                    // The iterator follows NEXT links and indirect tables, and
                    // stops at a loop or a chain longer than the queue.
                    let descs = chain
                        .map(|d| Desc {
                            seg: Seg { addr: d.addr().0, len: d.len() },
                            write_only: d.is_write_only(),
                        })
                        .collect();
                    batch.push((head, descs));
                }
                if batch.is_empty() {
                    break;
                }
                let used = self.0.disk.process_batch(&mem, &batch, &mut bounce);
                if let Some(c) = self.0.disk.stats.per_queue.get(queue) {
                    c.fetch_add(batch.len() as u64, Ordering::Relaxed);
                }
                for ((head, _), used) in batch.iter().zip(used) {
                    st.add_used(*head, used).map_err(io::Error::other)?;
                }
                if st.needs_notification().map_err(io::Error::other)? {
                    st.signal_used_queue()?;
                }
            }
            // With EVENT_IDX, re-check after re-enabling: the driver may have
            // added buffers between the last pop and the enable.
            if !event_idx || !st.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
    }
}

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.0.disk.queues)
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.0.disk.queues > 1 {
            f |= 1 << VIRTIO_BLK_F_MQ;
        }
        f
    }

    fn acked_features(&self, features: u64) {
        debug!(disk = self.0.disk.name, "features acked: {features:#x}");
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // Not INFLIGHT_SHMFD: see the module comment.
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.0.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.0.disk.config_space();
        let start = (offset as usize).min(c.len());
        let end = (offset as usize).saturating_add(size as usize).min(c.len());
        let mut out = c[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn update_memory(&self, _mem: AtomicMem) -> io::Result<()> {
        // The daemon updates the GuestMemoryAtomic this backend holds.
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without it the worker threads never leave epoll_wait, and dropping
        // the daemon after a disconnect would join them forever.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread per queue: per-queue order for free.
        (0..self.0.disk.queues).map(|q| 1u64 << q).collect()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected events {evset:?}")));
        }
        // `vrings` and `device_event` are this thread's own (index within its
        // queue mask); with one queue per thread the queue is the thread's index.
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or_else(|| io::Error::other(format!("no queue {device_event} in thread {thread}")))?;
        self.drain(vring, thread)
    }
}

/// Who owns the socket file (QEMU's user), mode 0600.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketOwner {
    pub uid: u32,
    pub gid: u32,
}

/// A running export: a listening socket and the thread serving it, one
/// QEMU connection after the other.
pub struct Export {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    /// Wakes the serving thread out of its poll for a connection.
    wake: UnixStream,
    conn: Arc<Mutex<Option<ShutdownHandle>>>,
    thread: Option<JoinHandle<()>>,
}

impl Export {
    /// Binds `socket` (replacing a stale file), gives it to `owner` with
    /// mode 0600 and starts serving `disk` on it.
    pub fn start(disk: Disk, socket: &Path, owner: Option<SocketOwner>) -> Result<Export, DataplaneError> {
        let err = |e: io::Error| DataplaneError::Socket(socket.to_path_buf(), e);
        match std::fs::remove_file(socket) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let listener = UnixListener::bind(socket).map_err(err)?;
        let setup = (|| {
            // Mode first: once it belongs to QEMU's user, changing it
            // would need CAP_FOWNER.
            std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
            if let Some(o) = owner {
                std::os::unix::fs::chown(socket, Some(o.uid), Some(o.gid))?;
            }
            listener.try_clone()
        })();
        let poll_fd = match setup {
            Ok(fd) => fd,
            Err(e) => {
                let _ = std::fs::remove_file(socket);
                return Err(err(e));
            }
        };
        let (wake, wake_rx) = UnixStream::pair().map_err(err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let conn = Arc::new(Mutex::new(None));
        let serving = Serving {
            disk: Arc::new(disk),
            listener: Listener::from(listener),
            poll_fd,
            wake_rx,
            stop: stop.clone(),
            conn: conn.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("vhost-{}", serving.disk.serial))
            .spawn(move || serving.run())
            .map_err(err)?;
        Ok(Export { socket: socket.to_path_buf(), stop, wake, conn, thread: Some(thread) })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops listening, ends the connection (requests in flight finish
    /// first), joins every thread of the export and removes the socket.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::io::Write::write_all(&mut &self.wake, b"x");
        if let Some(h) = self.conn.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            h.shutdown();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Serving {
    disk: Arc<Disk>,
    listener: Listener,
    poll_fd: UnixListener,
    wake_rx: UnixStream,
    stop: Arc<AtomicBool>,
    conn: Arc<Mutex<Option<ShutdownHandle>>>,
}

impl Serving {
    fn run(mut self) {
        let name = self.disk.name.clone();
        info!(disk = name, "vhost-user export listening");
        while !self.stop.load(Ordering::SeqCst) {
            match self.wait_for_client() {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    warn!(disk = name, "poll: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
            if let Err(e) = self.one_connection() {
                self.disk.stats.set_error(e.clone());
                warn!(disk = name, "connection ended: {e}");
                // Not a busy loop when something keeps failing at once.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        info!(disk = name, "vhost-user export stopped");
    }

    /// True when a client is waiting, false when asked to stop.
    fn wait_for_client(&self) -> io::Result<bool> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [
            PollFd::new(self.poll_fd.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.wake_rx.as_fd(), PollFlags::POLLIN),
        ];
        loop {
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let woken = fds[1].revents().is_some_and(|r| !r.is_empty());
        Ok(!woken && !self.stop.load(Ordering::SeqCst))
    }

    fn one_connection(&mut self) -> Result<(), String> {
        let disk = &self.disk;
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
        let backend = Backend(Arc::new(Conn {
            disk: disk.clone(),
            event_idx: AtomicBool::new(false),
            mem: mem.clone(),
            bounce: (0..disk.queues).map(|_| Mutex::new(vec![AlignedBuf::new(CHUNK)])).collect(),
        }));
        let mut daemon = VhostUserDaemon::new(disk.serial.clone(), backend, mem)
            .map_err(|e| format!("vhost-user setup: {e}"))?;
        // The listener is readable: this accept does not block.
        daemon.start(&mut self.listener).map_err(|e| format!("accept: {e}"))?;
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = daemon.shutdown_handle();
        if self.stop.load(Ordering::SeqCst) {
            daemon.request_shutdown();
        }
        disk.stats.connections.fetch_add(1, Ordering::Relaxed);
        disk.stats.connected.store(true, Ordering::Relaxed);
        info!(disk = disk.name, "QEMU connected");
        let ended = daemon.wait();
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
        disk.stats.connected.store(false, Ordering::Relaxed);
        // Dropping the daemon stops and joins the worker threads and drops
        // the last reference to the guest's memory mappings.
        drop(daemon);
        match ended {
            Ok(()) => {
                info!(disk = disk.name, "QEMU disconnected");
                Ok(())
            }
            Err(vhost_user_backend::Error::HandleRequest(vhost::vhost_user::Error::Disconnected))
            | Err(vhost_user_backend::Error::HandleRequest(vhost::vhost_user::Error::PartialMessage)) => {
                info!(disk = disk.name, "QEMU disconnected");
                Ok(())
            }
            Err(e) => Err(format!("vhost-user: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::device::tests::{raw_file, scratch};
    use super::super::device::LocalFile;
    use super::*;

    const CAP: u64 = 1 << 20;

    fn hdr(rtype: u32, sector: u64) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&rtype.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    }

    #[test]
    fn parse_accepts_in_range_requests() {
        assert_eq!(
            parse_request(&hdr(VIRTIO_BLK_T_IN, 8), 0, 4096, CAP),
            Ok(Request::In { offset: 4096, len: 4096 })
        );
        assert_eq!(
            parse_request(&hdr(VIRTIO_BLK_T_OUT, 2040), 4096, 0, CAP),
            Ok(Request::Out { offset: CAP - 4096, len: 4096 })
        );
        assert_eq!(parse_request(&hdr(VIRTIO_BLK_T_FLUSH, 0), 0, 0, CAP), Ok(Request::Flush));
        assert_eq!(parse_request(&hdr(VIRTIO_BLK_T_GET_ID, 0), 0, 64, CAP), Ok(Request::GetId { len: 20 }));
    }

    #[test]
    fn parse_refuses_bad_requests_with_ioerr() {
        let ioerr = Err(VIRTIO_BLK_S_IOERR as u8);
        // Past the end, by one sector and by overflow.
        assert_eq!(parse_request(&hdr(VIRTIO_BLK_T_OUT, 2041), 4096, 0, CAP), ioerr);
        assert_eq!(parse_request(&hdr(VIRTIO_BLK_T_IN, u64::MAX / 256), 0, 4096, CAP), ioerr);
        assert_eq!(parse_request(&hdr(VIRTIO_BLK_T_IN, u64::MAX), 0, 512, CAP), ioerr);
        // Not whole sectors.
        assert_eq!(parse_request(&hdr(VIRTIO_BLK_T_OUT, 0), 100, 0, CAP), ioerr);
        // Data in the wrong direction.
        assert_eq!(parse_request(&hdr(VIRTIO_BLK_T_OUT, 0), 4096, 4096, CAP), ioerr);
        assert_eq!(parse_request(&hdr(VIRTIO_BLK_T_IN, 0), 512, 4096, CAP), ioerr);
        assert_eq!(parse_request(&hdr(VIRTIO_BLK_T_GET_ID, 0), 0, 0, CAP), ioerr);
        assert_eq!(parse_request(&hdr(99, 0), 0, 0, CAP), Err(VIRTIO_BLK_S_UNSUPP as u8));
    }

    #[test]
    fn split_and_frame_handle_any_layout() {
        let segs = [Seg { addr: 100, len: 10 }, Seg { addr: 200, len: 6 }];
        let (h, t) = split_at(&segs, 12).unwrap();
        assert_eq!(h, vec![Seg { addr: 100, len: 10 }, Seg { addr: 200, len: 2 }]);
        assert_eq!(t, vec![Seg { addr: 202, len: 4 }]);
        assert!(split_at(&segs, 17).is_none());
        let r = |addr, len| Desc { seg: Seg { addr, len }, write_only: false };
        let w = |addr, len| Desc { seg: Seg { addr, len }, write_only: true };
        assert!(frame(&[r(0, 16), w(16, 1)]).is_ok());
        assert_eq!(frame(&[r(0, 16), w(16, 1), r(32, 4)]), Err(vec![Seg { addr: 16, len: 1 }]));
    }

    /// Guest memory at 0..1 MiB, a disk file of 1 MiB, requests placed in
    /// that memory as a driver would.
    struct Rig {
        mem: Mem,
        disk: Disk,
        bounce: AlignedBuf,
        dir: PathBuf,
    }

    impl Rig {
        fn new(tag: &str) -> Rig {
            let dir = scratch(tag);
            let dev = LocalFile::open(&raw_file(&dir, CAP)).unwrap();
            let disk = Disk {
                name: "t/vda".into(),
                dev: Arc::new(dev),
                serial: "vda-12345678".into(),
                queues: 1,
                stats: Arc::new(ExportStats::new(1)),
            };
            // A small bounce buffer, so requests go through it in pieces.
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
            Rig { mem, disk, bounce: AlignedBuf::new(8192), dir }
        }

        /// Header at 0, data at 0x1000.., status at 0x800; returns (status, used).
        fn run(&mut self, rtype: u32, sector: u64, data_len: u32, split: bool) -> (u8, u32) {
            self.mem.write_slice(&hdr(rtype, sector), GuestAddress(0)).unwrap();
            self.mem.write_slice(&[0xff], GuestAddress(0x800)).unwrap();
            let write_only = rtype != VIRTIO_BLK_T_OUT;
            let mut descs = vec![Desc { seg: Seg { addr: 0, len: 16 }, write_only: false }];
            if data_len > 0 {
                let parts = if split {
                    vec![(0x1000, 1000), (0x3000, data_len - 1000)]
                } else {
                    vec![(0x1000, data_len)]
                };
                descs
                    .extend(parts.into_iter().map(|(addr, len)| Desc { seg: Seg { addr, len }, write_only }));
            }
            descs.push(Desc { seg: Seg { addr: 0x800, len: 1 }, write_only: true });
            let used = self.disk.process(&self.mem, &descs, &mut self.bounce);
            let mut st = [0u8];
            self.mem.read_slice(&mut st, GuestAddress(0x800)).unwrap();
            (st[0], used)
        }
    }

    /// A batch runs on several threads but answers each chain on its own
    /// and in the order popped: 10 writes, a read of one of them, a bad
    /// request and a GET_ID.
    #[test]
    fn a_batch_answers_every_chain_in_order() {
        let rig = Rig::new("batch");
        let mut batch = Vec::new();
        let base = |i: usize| 0x10000 + i as u64 * 0x2000;
        let req = |i: usize, rtype: u32, sector: u64, len: u32, write_only: bool| {
            rig.mem.write_slice(&hdr(rtype, sector), GuestAddress(base(i))).unwrap();
            rig.mem.write_slice(&[0xff], GuestAddress(base(i) + 0x100)).unwrap();
            let mut d = vec![Desc { seg: Seg { addr: base(i), len: 16 }, write_only: false }];
            if len > 0 {
                d.push(Desc { seg: Seg { addr: base(i) + 0x1000, len }, write_only });
            }
            d.push(Desc { seg: Seg { addr: base(i) + 0x100, len: 1 }, write_only: true });
            (i as u16, d)
        };
        for i in 0..10 {
            rig.mem.write_slice(&[i as u8 + 1; 4096], GuestAddress(base(i) + 0x1000)).unwrap();
            batch.push(req(i, VIRTIO_BLK_T_OUT, 8 * i as u64, 4096, false));
        }
        batch.push(req(10, VIRTIO_BLK_T_OUT, CAP / 512, 4096, false));
        batch.push(req(11, VIRTIO_BLK_T_GET_ID, 0, 20, true));
        let mut bounce = vec![AlignedBuf::new(8192)];
        let used = rig.disk.process_batch(&rig.mem, &batch, &mut bounce);
        assert_eq!(used, [vec![1; 10], vec![1, 21]].concat());
        assert_eq!(bounce.len(), WORKERS);
        let status = |i: usize| {
            let mut st = [0u8];
            rig.mem.read_slice(&mut st, GuestAddress(base(i) + 0x100)).unwrap();
            st[0]
        };
        assert!((0..10).all(|i| status(i) == VIRTIO_BLK_S_OK as u8));
        assert_eq!((status(10), status(11)), (VIRTIO_BLK_S_IOERR as u8, VIRTIO_BLK_S_OK as u8));
        let file = std::fs::read(rig.dir.join("disk.raw")).unwrap();
        for i in 0..10 {
            assert!(file[i * 4096..(i + 1) * 4096].iter().all(|&b| b == i as u8 + 1), "block {i}");
        }
        let mut id = [0u8; 20];
        rig.mem.read_slice(&mut id, GuestAddress(base(11) + 0x1000)).unwrap();
        assert_eq!(&id[..12], b"vda-12345678");
    }

    #[test]
    fn requests_reach_the_file_and_come_back() {
        let mut rig = Rig::new("req");
        let pattern: Vec<u8> = (0..20480u32).map(|i| (i * 7 % 256) as u8).collect();
        rig.mem.write_slice(&pattern[..1000], GuestAddress(0x1000)).unwrap();
        rig.mem.write_slice(&pattern[1000..], GuestAddress(0x3000)).unwrap();
        // 20 KiB at sector 16, split over two guest buffers, through an 8 KiB bounce buffer.
        assert_eq!(rig.run(VIRTIO_BLK_T_OUT, 16, 20480, true), (VIRTIO_BLK_S_OK as u8, 1));
        assert_eq!(rig.run(VIRTIO_BLK_T_FLUSH, 0, 0, false), (VIRTIO_BLK_S_OK as u8, 1));
        let file = std::fs::read(rig.dir.join("disk.raw")).unwrap();
        assert_eq!(&file[8192..8192 + 20480], &pattern[..]);
        assert!(file[..8192].iter().all(|&b| b == 0));

        rig.mem.write_slice(&[0u8; 24576], GuestAddress(0x1000)).unwrap();
        assert_eq!(rig.run(VIRTIO_BLK_T_IN, 16, 20480, false), (VIRTIO_BLK_S_OK as u8, 20481));
        let mut back = vec![0u8; 20480];
        rig.mem.read_slice(&mut back, GuestAddress(0x1000)).unwrap();
        assert_eq!(back, pattern);

        assert_eq!(rig.run(VIRTIO_BLK_T_GET_ID, 0, 20, false), (VIRTIO_BLK_S_OK as u8, 21));
        let mut id = [0u8; 20];
        rig.mem.read_slice(&mut id, GuestAddress(0x1000)).unwrap();
        assert_eq!(&id[..12], b"vda-12345678");
        assert!(id[12..].iter().all(|&b| b == 0));
        let s = &rig.disk.stats;
        let counts = [&s.reads, &s.writes, &s.flushes, &s.errors].map(|c| c.load(Ordering::Relaxed));
        assert_eq!(counts, [1, 1, 1, 0]);
        std::fs::remove_dir_all(&rig.dir).unwrap();
    }

    #[test]
    fn bad_requests_get_ioerr_and_touch_nothing() {
        let mut rig = Rig::new("bad");
        rig.mem.write_slice(&[0xabu8; 4096], GuestAddress(0x1000)).unwrap();
        let ioerr = (VIRTIO_BLK_S_IOERR as u8, 1);
        // Out of range: the last sector plus one block.
        assert_eq!(rig.run(VIRTIO_BLK_T_OUT, CAP / 512 - 1, 4096, false), ioerr);
        assert_eq!(rig.run(VIRTIO_BLK_T_IN, CAP / 512, 4096, false), ioerr);
        // Not a whole sector.
        assert_eq!(rig.run(VIRTIO_BLK_T_OUT, 0, 100, false), ioerr);
        assert_eq!(rig.run(1234, 0, 0, false), (VIRTIO_BLK_S_UNSUPP as u8, 1));
        // A header shorter than 16 bytes.
        let descs = [
            Desc { seg: Seg { addr: 0, len: 8 }, write_only: false },
            Desc { seg: Seg { addr: 0x800, len: 1 }, write_only: true },
        ];
        assert_eq!(rig.disk.process(&rig.mem, &descs, &mut rig.bounce), 1);
        // Data outside guest memory.
        let descs = [
            Desc { seg: Seg { addr: 0, len: 16 }, write_only: false },
            Desc { seg: Seg { addr: 4 << 20, len: 4096 }, write_only: false },
            Desc { seg: Seg { addr: 0x800, len: 1 }, write_only: true },
        ];
        rig.mem.write_slice(&hdr(VIRTIO_BLK_T_OUT, 0), GuestAddress(0)).unwrap();
        assert_eq!(rig.disk.process(&rig.mem, &descs, &mut rig.bounce), 1);
        let mut st = [0u8];
        rig.mem.read_slice(&mut st, GuestAddress(0x800)).unwrap();
        assert_eq!(st[0], VIRTIO_BLK_S_IOERR as u8);
        // No status byte at all: nothing to answer, nothing used.
        let descs = [Desc { seg: Seg { addr: 0, len: 16 }, write_only: false }];
        assert_eq!(rig.disk.process(&rig.mem, &descs, &mut rig.bounce), 0);
        assert_eq!(rig.disk.process(&rig.mem, &[], &mut rig.bounce), 0);
        assert_eq!(rig.disk.stats.errors.load(Ordering::Relaxed), 8);
        assert!(rig.disk.stats.last_error().is_some());
        let file = std::fs::read(rig.dir.join("disk.raw")).unwrap();
        assert!(file.iter().all(|&b| b == 0), "a refused write reached the file");
        std::fs::remove_dir_all(&rig.dir).unwrap();
    }

    #[test]
    fn config_space_describes_the_disk() {
        let rig = Rig::new("cfg");
        let c = Backend(Arc::new(Conn {
            disk: Arc::new(rig.disk),
            event_idx: AtomicBool::new(false),
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            bounce: Vec::new(),
        }));
        let cfg = c.get_config(0, 60);
        assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().unwrap()), CAP / 512);
        assert_eq!(u32::from_le_bytes(cfg[20..24].try_into().unwrap()), BLK_SIZE);
        assert_eq!(c.get_config(200, 4), vec![0; 4]);
        assert_eq!(c.features() & (1 << VIRTIO_BLK_F_MQ), 0);
        assert!(!c.protocol_features().contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
        std::fs::remove_dir_all(&rig.dir).unwrap();
    }
}
