//! Hypervisor subsystem: everything NovaCron asks of libvirt.
//!
//! The core talks to a [`Hypervisor`] trait object; [`libvirt::Libvirt`] is
//! the real implementation (any libvirt URI: `qemu:///system` on hosts,
//! `test:///default` for fast lifecycle tests). Calls block, so async callers
//! run them on the blocking pool.

pub mod disks;
pub mod libvirt;
pub mod xml;

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
}

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// libvirt cannot be reached (daemon down, socket missing).
    #[error("libvirt is not reachable at {uri}: {reason}")]
    Unavailable { uri: String, reason: String },
    /// The domain does not exist in libvirt.
    #[error("domain {0} is not defined in libvirt")]
    NoDomain(Uuid),
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
    /// All domains libvirt knows, running or defined.
    fn list(&self) -> Result<Vec<DomainInfo>>;
    /// Registers for lifecycle events; each event is sent on `tx`. Survives
    /// reconnects (re-registers on the new connection).
    fn subscribe(&self, tx: tokio::sync::mpsc::UnboundedSender<LifecycleEvent>) -> Result<()>;
}
