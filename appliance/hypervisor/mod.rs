//! Hypervisor subsystem: everything NovaCron asks of libvirt.
//!
//! The core talks to a [`Hypervisor`] trait object; [`libvirt::Libvirt`] is
//! the real implementation (any libvirt URI: `qemu:///system` on hosts,
//! `test:///default` for fast lifecycle tests). Calls block, so async callers
//! run them on the blocking pool.

pub mod disks;
pub mod libvirt;
pub mod xml;

use tokio::sync::mpsc::UnboundedSender;
use uuid::Uuid;

/// What libvirt says a domain is doing, reduced to the states NovaCron shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainState {
    Running,
    Paused,
    ShuttingDown,
    Stopped,
    Crashed,
    Suspended,
    Unknown,
}

/// One libvirt domain as listed by the hypervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    pub uuid: Uuid,
    pub name: String,
    pub state: DomainState,
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// Versions and identity of the hypervisor stack.
#[derive(Debug, Clone, Default)]
pub struct HypervisorInfo {
    pub uri: String,
    /// libvirt library version, "11.3.0".
    pub libvirt_version: String,
    /// Hypervisor (QEMU) version as reported by the driver, "10.0.0".
    pub hypervisor_version: String,
}

/// A lifecycle change reported by libvirt's event API.
#[derive(Debug, Clone)]
pub struct LifecycleEvent {
    pub uuid: Uuid,
    pub name: String,
    pub kind: LifecycleKind,
}

/// What happened to the domain (libvirt's `virDomainEventType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifecycleKind {
    Defined,
    Undefined,
    Started,
    Suspended,
    Resumed,
    Stopped,
    Shutdown,
    PmSuspended,
    Crashed,
    /// A type added to libvirt after this code was written.
    Other(i32),
}

/// One libvirt virtual network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInfo {
    pub name: String,
    pub active: bool,
    /// Host bridge device; `None` for network types without one.
    pub bridge: Option<String>,
}

/// A DHCP lease handed out by a libvirt network's dnsmasq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpLease {
    pub mac: String,
    pub ip: String,
}

/// One libvirt snapshot of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    pub description: String,
    /// Creation time, unix seconds.
    pub created: i64,
    /// The domain state the snapshot recorded (what a revert returns to).
    pub state: DomainState,
    /// True for a full system checkpoint (RAM included).
    pub has_memory: bool,
}

/// An open serial console of a running domain.
///
/// Guest output is delivered on the channel given to
/// [`Hypervisor::open_console`]; that channel closes when the session ends
/// (guest stopped, another session forced this one off, or [`Console::close`]
/// / drop). Output is driven by libvirt's event loop, never by the caller.
pub trait Console: Send + Sync {
    /// Queues bytes for the guest's serial port; never blocks on the guest.
    /// Fails once the session has ended.
    fn send(&self, data: &[u8]) -> Result<()>;
    /// Ends the session; also done on drop.
    fn close(&self);
}

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// libvirt cannot be reached (daemon down, socket missing).
    #[error("libvirt is not reachable at {uri}: {reason}")]
    Unavailable { uri: String, reason: String },
    /// The domain does not exist in libvirt.
    #[error("domain {0} is not defined in libvirt")]
    NoDomain(Uuid),
    /// The libvirt network does not exist.
    #[error("network {0} is not defined in libvirt")]
    NoNetwork(String),
    /// The domain has no snapshot with this name.
    #[error("snapshot {0} does not exist")]
    NoSnapshot(String),
    /// The domain is not in a state that allows the operation.
    #[error("domain is in the wrong state for this operation: {0}")]
    WrongState(String),
    /// Any other libvirt failure, with libvirt's own message.
    #[error("libvirt: {0}")]
    Libvirt(String),
    /// Creating or removing a disk image failed.
    #[error("disk: {0}")]
    Disk(String),
}

pub type Result<T> = std::result::Result<T, HypervisorError>;

/// The operations the core needs from a hypervisor. Every call is blocking.
pub trait Hypervisor: Send + Sync {
    fn info(&self) -> Result<HypervisorInfo>;
    /// True when a connection is open and answers; reconnects if it is not.
    fn ping(&self) -> bool;
    /// Defines (or redefines, keeping the UUID) a persistent domain.
    fn define(&self, xml: &str) -> Result<()>;
    /// Removes the persistent definition. The domain must not be running.
    fn undefine(&self, uuid: Uuid) -> Result<()>;
    fn start(&self, uuid: Uuid) -> Result<()>;
    /// Asks the guest to power off via ACPI; returns at once.
    fn shutdown(&self, uuid: Uuid) -> Result<()>;
    /// Forces the domain off (pulls the plug).
    fn destroy(&self, uuid: Uuid) -> Result<()>;
    fn reboot(&self, uuid: Uuid) -> Result<()>;
    fn suspend(&self, uuid: Uuid) -> Result<()>;
    fn resume(&self, uuid: Uuid) -> Result<()>;
    /// State of one domain; `Ok(None)` when it is not defined.
    fn state(&self, uuid: Uuid) -> Result<Option<DomainState>>;
    /// The node NovaCron's metadata in the domain names (the node that
    /// defined it); `Ok(None)` when there is no such domain or metadata.
    fn defined_by(&self, uuid: Uuid) -> Result<Option<Uuid>>;
    /// All domains libvirt knows, running or defined.
    fn list(&self) -> Result<Vec<DomainInfo>>;
    /// Registers for lifecycle events; each event is sent on `tx`. Survives
    /// reconnects (re-registers on the new connection).
    fn subscribe(&self, tx: UnboundedSender<LifecycleEvent>) -> Result<()>;

    /// Defines (or redefines) a persistent network, marks it autostart and
    /// starts it if it is not running.
    fn network_define(&self, xml: &str) -> Result<()>;
    /// Stops (if running) and undefines a network.
    fn network_remove(&self, name: &str) -> Result<()>;
    fn network_list(&self) -> Result<Vec<NetworkInfo>>;
    /// Current leases of a libvirt-managed (NAT) network's DHCP server.
    fn dhcp_leases(&self, network: &str) -> Result<Vec<DhcpLease>>;

    /// Takes an internal (qcow2) snapshot. A running domain needs
    /// `with_memory` (QEMU internal snapshots of a running VM always include
    /// RAM); a stopped one needs `!with_memory`. Otherwise `WrongState`.
    fn snapshot_create(&self, uuid: Uuid, name: &str, description: &str, with_memory: bool) -> Result<()>;
    /// Oldest first.
    fn snapshot_list(&self, uuid: Uuid) -> Result<Vec<SnapshotInfo>>;
    /// Returns the domain to the snapshot: for a memory snapshot running
    /// (`resume`) or paused, for a disk-only one stopped (stopping it if
    /// needed).
    fn snapshot_revert(&self, uuid: Uuid, name: &str, resume: bool) -> Result<()>;
    fn snapshot_delete(&self, uuid: Uuid, name: &str) -> Result<()>;

    /// Grows a disk of a running domain to `bytes` (guest-visible size).
    fn block_resize(&self, uuid: Uuid, target_dev: &str, bytes: u64) -> Result<()>;
    /// Adds a qcow2 disk to the persistent definition and, with `live`, to
    /// the running guest.
    fn attach_disk(&self, uuid: Uuid, source: &xml::DiskSource, target_dev: &str, live: bool) -> Result<()>;
    /// Removes a disk from the definition and, with `live`, from the running
    /// guest (the guest finishes the unplug asynchronously).
    fn detach_disk(&self, uuid: Uuid, target_dev: &str, live: bool) -> Result<()>;

    /// Attaches to the serial console of a running domain, taking it over
    /// from any earlier session. A stopped domain gives `WrongState`.
    fn open_console(&self, uuid: Uuid, output: UnboundedSender<Vec<u8>>) -> Result<Box<dyn Console>>;
}
