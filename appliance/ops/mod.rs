//! Host operations outside the daemon, run as root by the CLI: firmware
//! preflight and profiles, BIOS settings over Redfish, the appliance's
//! first-boot setup, and the A/B root-slot installer. The daemon itself
//! only uses `update`'s file protocol (request, install report, status)
//! to hand an update to the installer. Runtime facts about the host and
//! admission stay in `host`.

pub mod firmware;
pub mod preflight;
pub mod redfish;
pub mod setup;
pub mod update;

/// Everything the host operations fail with: firmware profiles, the
/// Redfish client, first-boot setup and updates.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("unknown firmware profile {0:?} (known: {known})", known = firmware::names().join(", "))]
    UnknownProfile(String),
    /// A profile file given by path cannot be read.
    #[error("cannot read {path}: {reason}")]
    ReadProfile { path: String, reason: String },
    #[error("invalid firmware profile {name}: {reason}")]
    InvalidProfile { name: String, reason: String },
    #[error("invalid BMC URL {0:?}: use http://HOST[:PORT] or https://HOST[:PORT]")]
    BmcUrl(String),
    #[error("an https BMC needs --fingerprint (SHA-256 of its certificate) or --insecure")]
    BmcNoTrust,
    #[error("invalid --fingerprint {0:?}: give the BMC certificate's SHA-256 as 32 hex bytes (AB:CD:...)")]
    BmcFingerprint(String),
    #[error("cannot connect to the BMC at {target}: {reason}")]
    BmcConnect { target: String, reason: String },
    /// A request to the BMC failed after connecting.
    #[error("{method} {path}: {reason}")]
    BmcHttp { method: String, path: String, reason: String },
    #[error("{method} {path}: HTTP {status}: {message}")]
    BmcStatus { method: String, path: String, status: u16, message: String },
    #[error("unexpected Redfish answer from {path}: {reason}")]
    BmcShape { path: String, reason: String },
    /// Updates need the appliance's A/B root slots.
    #[error("this host was not booted from a NovaCron appliance image: {0}")]
    NotAppliance(String),
    #[error("invalid update bundle: {0}")]
    Bundle(String),
    #[error("{what}: SHA-256 mismatch (expected {expected}, got {actual})")]
    Checksum { what: String, expected: String, actual: String },
    /// A file in the ESP's `seed/` folder is unusable.
    #[error("invalid seed: {0}")]
    Seed(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl OpsError {
    /// The BMC did not answer at all (the CLI's exit code 6), as opposed to
    /// answering with an error.
    pub fn is_connect(&self) -> bool {
        matches!(self, OpsError::BmcConnect { .. })
    }
}
