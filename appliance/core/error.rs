use crate::hypervisor::HypervisorError;
use crate::store::StoreError;

/// What kind of failure an error is; the API turns each kind into one HTTP
/// status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or a value is out of range.
    Invalid,
    Forbidden,
    NotFound,
    /// The request conflicts with the current state; retrying later may work.
    Conflict,
    TooLarge,
    /// Well-formed but unusable content (an update bundle).
    Unprocessable,
    /// A dependency (libvirt, the store) does not answer.
    Unavailable,
    Internal,
}

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
    /// The VM is a replica of another node's: only its owner changes or
    /// starts it.
    #[error("VM {vm} is owned by node {owner} (epoch {epoch}); this node holds only a replica of it")]
    NotOwner { vm: String, owner: uuid::Uuid, epoch: u64 },
    /// Ownership moved on while the operation ran.
    #[error("the ownership of VM {vm} moved from epoch {had} to {now} during the operation; try again")]
    StaleEpoch { vm: String, had: u64, now: u64 },
    #[error("starting {vm} needs {need_mib} MiB but only {available_mib} MiB is available with {reserve_mib} MiB kept for the host")]
    InsufficientMemory { vm: String, need_mib: u64, available_mib: u64, reserve_mib: u64 },
    /// A new network's subnet collides with one that exists.
    #[error("{0}")]
    Overlap(String),
    #[error("{what} is in use by {users}")]
    InUse { what: String, users: String },
    /// Without an admin token only root on the host can administer the node.
    #[error("token {0} is the last admin token; revoking it leaves only root on the host's socket as admin (use force)")]
    LastAdmin(String),
    #[error(transparent)]
    Image(#[from] crate::images::ImageError),
    #[error(transparent)]
    Ops(#[from] crate::ops::OpsError),
    #[error("{0}; wait for it to finish (GET /v1/host/update)")]
    UpdateInProgress(String),
    #[error("not ready: {0}")]
    NotReady(String),
    #[error(transparent)]
    Pair(#[from] crate::cluster::pairing::PairError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    /// The data plane (the process serving replicated disks) failed or does
    /// not answer.
    #[error("data plane: {0}")]
    Dataplane(String),
    /// A replica may not be promoted or moved in its state; the message
    /// says what it is and what would allow it.
    #[error("{0}")]
    ReplicaNotReady(String),
    /// The operation is not available for this VM; the message says why.
    #[error("{0}")]
    Unsupported(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl CoreError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> CoreError {
        CoreError::Invalid { field: field.into(), message: message.into() }
    }

    /// The kind of failure and its stable machine-readable code (the JSON
    /// error body's `code`). The one place nested subsystem errors are
    /// classified; the API maps the kind to a status.
    pub fn classify(&self) -> (ErrorKind, &'static str) {
        use crate::images::ImageError;
        use crate::ops::OpsError;
        use ErrorKind::*;
        match self {
            CoreError::Invalid { .. } => (Invalid, "invalid_value"),
            CoreError::NotFound(_) => (NotFound, "not_found"),
            CoreError::Forbidden { .. } => (Forbidden, "forbidden"),
            CoreError::NameTaken(_) => (Conflict, "name_taken"),
            CoreError::WrongState { .. } => (Conflict, "wrong_state"),
            CoreError::Busy(_) => (Conflict, "busy"),
            CoreError::Unmanaged(_) => (Conflict, "unmanaged"),
            CoreError::NotOwner { .. } => (Conflict, "not_owner"),
            CoreError::StaleEpoch { .. } => (Conflict, "stale_epoch"),
            CoreError::InsufficientMemory { .. } => (Conflict, "insufficient_memory"),
            CoreError::NotReady(_) => (Unavailable, "not_ready"),
            CoreError::Dataplane(_) => (Unavailable, "dataplane_unavailable"),
            CoreError::Unsupported(_) => (Conflict, "unsupported"),
            CoreError::ReplicaNotReady(_) => (Conflict, "replica_not_ready"),
            CoreError::InUse { .. } => (Conflict, "in_use"),
            CoreError::LastAdmin(_) => (Conflict, "last_admin"),
            CoreError::Overlap(_) => (Conflict, "subnet_overlap"),
            CoreError::Image(e) => match e {
                ImageError::TooLarge { .. } => (TooLarge, "payload_too_large"),
                ImageError::ChecksumMismatch { .. } => (Invalid, "checksum_mismatch"),
                ImageError::BadChecksum => (Invalid, "invalid_value"),
                ImageError::Truncated(_) => (Invalid, "truncated"),
                ImageError::Io(_) => (Internal, "image_storage"),
                _ => (Invalid, "invalid_image"),
            },
            CoreError::Store(e) => match e {
                StoreError::Conflict(_) => (Conflict, "conflict"),
                StoreError::NotFound(_) => (NotFound, "not_found"),
                StoreError::NotOwner(_) => (Conflict, "not_owner"),
                _ => (Internal, "store_error"),
            },
            CoreError::Hypervisor(e) => match e {
                HypervisorError::Unavailable { .. } => (Unavailable, "libvirt_unavailable"),
                HypervisorError::WrongState(_) => (Conflict, "wrong_state"),
                HypervisorError::NoNetwork(_) | HypervisorError::NoSnapshot(_) => (NotFound, "not_found"),
                // The record exists but libvirt lost the domain: a state
                // conflict, not a missing resource.
                HypervisorError::NoDomain(_) => (Conflict, "libvirt_error"),
                HypervisorError::Disk(_) => (Internal, "disk_error"),
                HypervisorError::Libvirt(_) => (Internal, "libvirt_error"),
            },
            CoreError::Ops(e) => match e {
                OpsError::NotAppliance(_) => (Conflict, "not_appliance"),
                OpsError::Bundle(_) => (Unprocessable, "invalid_bundle"),
                OpsError::Checksum { .. } => (Unprocessable, "checksum_mismatch"),
                OpsError::Seed(_) => (Invalid, "invalid_value"),
                OpsError::Io(_) => (Internal, "host_error"),
                // The CLI's own (firmware profiles, the BMC); the core never
                // returns them.
                OpsError::UnknownProfile(_)
                | OpsError::ReadProfile { .. }
                | OpsError::InvalidProfile { .. }
                | OpsError::BmcUrl(_)
                | OpsError::BmcNoTrust
                | OpsError::BmcFingerprint(_)
                | OpsError::BmcConnect { .. }
                | OpsError::BmcHttp { .. }
                | OpsError::BmcStatus { .. }
                | OpsError::BmcShape { .. } => (Internal, "host_error"),
            },
            CoreError::UpdateInProgress(_) => (Conflict, "update_in_progress"),
            CoreError::Pair(e) => (pair_kind(e.code()), e.code()),
            CoreError::Internal(_) => (Internal, "internal"),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.classify().0
    }

    pub fn code(&self) -> &'static str {
        self.classify().1
    }
}

/// The kind of a pairing error by its code, so a refusal relayed from the
/// other node keeps its status too.
fn pair_kind(code: &str) -> ErrorKind {
    match code {
        "malformed_code" | "unsupported_code_version" | "invalid_value" | "protocol_version" => {
            ErrorKind::Invalid
        }
        // The code is well-formed but does not get this node paired.
        "invite_expired"
        | "invite_used"
        | "invite_unknown"
        | "wrong_secret"
        | "inviter_proof"
        | "fingerprint_mismatch"
        | "peer_refused" => ErrorKind::Unprocessable,
        "already_paired" | "pair_self" | "not_paired" | "pairing_incomplete" => ErrorKind::Conflict,
        "not_peer" => ErrorKind::Forbidden,
        "peer_unreachable" => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    }
}
