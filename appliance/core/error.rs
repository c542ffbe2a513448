use crate::hypervisor::HypervisorError;
use crate::store::StoreError;

/// Everything a command can fail with. Status codes are chosen from this at
/// the API edge only.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A request value is invalid; `field` names it.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("{0} not found")]
    NotFound(String),
    #[error("the role {have} may not {action}; it needs {need}")]
    Forbidden { action: &'static str, have: &'static str, need: &'static str },
    #[error("the name {0:?} is already taken")]
    NameTaken(String),
    #[error("VM {vm} is {state}; cannot {action}")]
    WrongState { vm: String, state: &'static str, action: &'static str },
    #[error("another operation on VM {0} is still running; try again")]
    Busy(String),
    #[error("{0} is not managed by NovaCron and is never changed by it")]
    Unmanaged(String),
    #[error("starting {vm} needs {need_mib} MiB but only {available_mib} MiB is available with {reserve_mib} MiB kept for the host")]
    InsufficientMemory { vm: String, need_mib: u64, available_mib: u64, reserve_mib: u64 },
    /// A new network's subnet collides with one that exists.
    #[error("{0}")]
    Overlap(String),
    #[error("{what} is in use by {users}")]
    InUse { what: String, users: String },
    #[error(transparent)]
    Image(#[from] crate::images::ImageError),
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    #[error("{0}; wait for it to finish (GET /v1/host/update)")]
    UpdateInProgress(String),
    #[error("not ready: {0}")]
    NotReady(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl CoreError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> CoreError {
        CoreError::Invalid { field: field.into(), message: message.into() }
    }

    /// Stable machine-readable code for the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            CoreError::Invalid { .. } => "invalid_value",
            CoreError::NotFound(_) => "not_found",
            CoreError::Forbidden { .. } => "forbidden",
            CoreError::NameTaken(_) => "name_taken",
            CoreError::WrongState { .. } => "wrong_state",
            CoreError::Busy(_) => "busy",
            CoreError::Unmanaged(_) => "unmanaged",
            CoreError::InsufficientMemory { .. } => "insufficient_memory",
            CoreError::NotReady(_) => "not_ready",
            CoreError::InUse { .. } => "in_use",
            CoreError::Overlap(_) => "subnet_overlap",
            CoreError::Image(e) => match e {
                crate::images::ImageError::TooLarge { .. } => "payload_too_large",
                crate::images::ImageError::ChecksumMismatch { .. } => "checksum_mismatch",
                crate::images::ImageError::BadChecksum => "invalid_value",
                crate::images::ImageError::Truncated(_) => "truncated",
                crate::images::ImageError::Io(_) => "image_storage",
                _ => "invalid_image",
            },
            CoreError::Store(StoreError::Conflict(_)) => "conflict",
            CoreError::Store(StoreError::NotFound(_)) => "not_found",
            CoreError::Store(_) => "store_error",
            CoreError::Hypervisor(HypervisorError::Unavailable { .. }) => "libvirt_unavailable",
            CoreError::Hypervisor(HypervisorError::WrongState(_)) => "wrong_state",
            CoreError::Hypervisor(HypervisorError::Disk(_)) => "disk_error",
            CoreError::Hypervisor(HypervisorError::NoNetwork(_) | HypervisorError::NoSnapshot(_)) => {
                "not_found"
            }
            CoreError::Hypervisor(_) => "libvirt_error",
            CoreError::Host(e) => match e {
                crate::host::HostError::NotAppliance(_) => "not_appliance",
                crate::host::HostError::Bundle(_) => "invalid_bundle",
                crate::host::HostError::Checksum { .. } => "checksum_mismatch",
                crate::host::HostError::Seed(_) => "invalid_value",
                crate::host::HostError::Proc(_) | crate::host::HostError::Io(_) => "host_error",
            },
            CoreError::UpdateInProgress(_) => "update_in_progress",
            CoreError::Internal(_) => "internal",
        }
    }
}
