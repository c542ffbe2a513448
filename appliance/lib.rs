//! NovaCron Edge: one daemon per host that runs KVM guests through libvirt,
//! keeps its state in SQLite and serves an HTTPS API and a CLI.
//!
//! Layout: `api` (HTTP edge) → `core` (typed commands) → `store` (SQLite)
//! and `hypervisor` (libvirt); `host` (procfs, admission), `ops` (preflight,
//! Redfish, setup, the A/B installer), `dataplane` (the vhost-user-blk
//! process that serves guest disks), `telemetry` (logs,
//! metrics, sd_notify), `tasks` (supervised background tasks), `tls`
//! (fingerprints and pinning) and `cli` (the client side of the same
//! binary).

pub mod api;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod core;
pub mod daemon;
pub mod dataplane;
pub mod host;
pub mod hypervisor;
pub mod images;
pub mod ops;
pub mod store;
pub mod tasks;
pub mod telemetry;
pub mod tls;
pub mod types;
pub mod util;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const GIT_COMMIT: &str = env!("NOVACRON_GIT_COMMIT");
pub const VERSION_LONG: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("NOVACRON_GIT_COMMIT"),
    ", built ",
    env!("NOVACRON_BUILD_DATE"),
    ")"
);
