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
