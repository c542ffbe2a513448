//! The core's typed command interface. The API and the local socket parse
//! requests into a [`Command`]; the core answers with a [`Reply`]. One name
//! per action is used everywhere: route, command, audit entry, metric.

use crate::types::{
    AuditList, DiskResize, DiskSpec, Health, HealthReport, HostInfo, Image, ImageImport, ImageList, Network,
    NetworkCreate, NetworkList, Role, Snapshot, SnapshotCreate, SnapshotList, TokenCreate, TokenCreated,
    TokenList, Vm, VmClone, VmCreate, VmPatch,
};
use bytes::Bytes;
use std::sync::Arc;

/// A request body streamed into the core (image uploads), chunk by chunk;
/// an `Err` means the client went away or the transfer broke. Nothing is
/// read from the client until the core calls [`BodyStream::start`], so a
/// request refused up front is answered before any data is sent (and a
/// client using `Expect: 100-continue` never sends it).
#[derive(Clone)]
pub struct BodyStream {
    pub chunks: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Result<Bytes, String>>>>,
    pub go: Arc<tokio::sync::Notify>,
}

impl BodyStream {
    pub fn start(&self) {
        self.go.notify_one();
    }
}

impl std::fmt::Debug for BodyStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BodyStream")
    }
}

impl PartialEq for BodyStream {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.chunks, &other.chunks)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Health,
    /// Every health check with its status (`novacron health`).
    HealthReport,
    Ready,
    HostInfo,
    Metrics,
    ListVms,
    GetVm(String),
    CreateVm(VmCreate),
    UpdateVm(String, VmPatch),
    DeleteVm {
        vm: String,
        force: bool,
    },
    VmAction {
        vm: String,
        action: VmAction,
    },
    CloneVm(String, VmClone),
    AttachDisk(String, DiskSpec),
    DetachDisk {
        vm: String,
        device: String,
    },
    ResizeDisk {
        vm: String,
        device: String,
        req: DiskResize,
    },
    ListSnapshots(String),
    CreateSnapshot(String, SnapshotCreate),
    RevertSnapshot {
        vm: String,
        name: String,
    },
    DeleteSnapshot {
        vm: String,
        name: String,
    },
    /// The newest `bytes` of the serial console log.
    ConsoleLog {
        vm: String,
        bytes: u64,
    },
    /// An interactive serial console session.
    Console(String),
    ListImages,
    GetImage(String),
    UploadImage {
        name: String,
        checksum: Option<String>,
        length: Option<u64>,
        body: BodyStream,
    },
    ImportImage(ImageImport),
    DeleteImage(String),
    ListNetworks,
    CreateNetwork(NetworkCreate),
    DeleteNetwork(String),
    /// Events after sequence number `after`, then live.
    Events {
        after: u64,
    },
    ListTokens,
    CreateToken(TokenCreate),
    RevokeToken(String),
    ListAudit {
        limit: usize,
    },
    /// Slots, running version and the latest host update.
    UpdateStatus,
    /// A host update bundle (`novacron update apply`).
    ApplyUpdate {
        checksum: Option<String>,
        length: Option<u64>,
        /// Boot attempts of the new slot before falling back.
        tries: u32,
        body: BodyStream,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmAction {
    Start,
    /// Force off.
    Stop,
    /// ACPI power button. `wait`: block up to that many seconds for the guest
    /// to stop; `timeout`: force it off if it has not stopped by then.
    Shutdown {
        wait: Option<u64>,
        timeout: Option<u64>,
    },
    Reboot,
    Pause,
    Resume,
}

impl VmAction {
    pub fn name(self) -> &'static str {
        match self {
            VmAction::Start => "vm.start",
            VmAction::Stop => "vm.stop",
            VmAction::Shutdown { .. } => "vm.shutdown",
            VmAction::Reboot => "vm.reboot",
            VmAction::Pause => "vm.pause",
            VmAction::Resume => "vm.resume",
        }
    }
}

impl Command {
    /// Stable action name, used in the audit log and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Health => "health",
            Command::HealthReport => "health.details",
            Command::Ready => "ready",
            Command::HostInfo => "host.info",
            Command::Metrics => "metrics",
            Command::ListVms => "vm.list",
            Command::GetVm(_) => "vm.get",
            Command::CreateVm(_) => "vm.create",
            Command::UpdateVm(..) => "vm.update",
            Command::DeleteVm { .. } => "vm.delete",
            Command::VmAction { action, .. } => action.name(),
            Command::CloneVm(..) => "vm.clone",
            Command::AttachDisk(..) => "vm.disk.attach",
            Command::DetachDisk { .. } => "vm.disk.detach",
            Command::ResizeDisk { .. } => "vm.disk.resize",
            Command::ListSnapshots(_) => "vm.snapshot.list",
            Command::CreateSnapshot(..) => "vm.snapshot.create",
            Command::RevertSnapshot { .. } => "vm.snapshot.revert",
            Command::DeleteSnapshot { .. } => "vm.snapshot.delete",
            Command::ConsoleLog { .. } => "vm.console.log",
            Command::Console(_) => "vm.console",
            Command::ListImages => "image.list",
            Command::GetImage(_) => "image.get",
            Command::UploadImage { .. } => "image.upload",
            Command::ImportImage(_) => "image.import",
            Command::DeleteImage(_) => "image.delete",
            Command::ListNetworks => "network.list",
            Command::CreateNetwork(_) => "network.create",
            Command::DeleteNetwork(_) => "network.delete",
            Command::Events { .. } => "event.list",
            Command::ListTokens => "token.list",
            Command::CreateToken(_) => "token.create",
            Command::RevokeToken(_) => "token.revoke",
            Command::ListAudit { .. } => "audit.list",
            Command::UpdateStatus => "host.update.status",
            Command::ApplyUpdate { .. } => "host.update",
        }
    }

    /// The weakest role allowed to run this command; `None` for commands
    /// that need no authentication.
    pub fn required_role(&self) -> Option<Role> {
        required_role(self.name())
    }

    /// Mutations are audited. The console counts: it can change the guest.
    pub fn is_mutation(&self) -> bool {
        matches!(
            self,
            Command::CreateVm(_)
                | Command::UpdateVm(..)
                | Command::DeleteVm { .. }
                | Command::VmAction { .. }
                | Command::CloneVm(..)
                | Command::AttachDisk(..)
                | Command::DetachDisk { .. }
                | Command::ResizeDisk { .. }
                | Command::CreateSnapshot(..)
                | Command::RevertSnapshot { .. }
                | Command::DeleteSnapshot { .. }
                | Command::Console(_)
                | Command::UploadImage { .. }
                | Command::ImportImage(_)
                | Command::DeleteImage(_)
                | Command::CreateNetwork(_)
                | Command::DeleteNetwork(_)
                | Command::CreateToken(_)
                | Command::RevokeToken(_)
                | Command::ApplyUpdate { .. }
        )
    }

    /// What the command acts on, for the audit log.
    pub fn target(&self) -> String {
        match self {
            Command::CreateVm(spec) => spec.name.clone(),
            Command::GetVm(vm)
            | Command::UpdateVm(vm, _)
            | Command::DeleteVm { vm, .. }
            | Command::VmAction { vm, .. } => vm.clone(),
            Command::CloneVm(vm, c) => format!("{vm} -> {}", c.name),
            Command::AttachDisk(vm, _)
            | Command::ListSnapshots(vm)
            | Command::CreateSnapshot(vm, _)
            | Command::ConsoleLog { vm, .. }
            | Command::Console(vm) => vm.clone(),
            Command::DetachDisk { vm, device } | Command::ResizeDisk { vm, device, .. } => {
                format!("{vm}/{device}")
            }
            Command::RevertSnapshot { vm, name } | Command::DeleteSnapshot { vm, name } => {
                format!("{vm}@{name}")
            }
            Command::GetImage(n) | Command::DeleteImage(n) | Command::DeleteNetwork(n) => n.clone(),
            Command::UploadImage { name, .. } => name.clone(),
            Command::ImportImage(i) => i.name.clone(),
            Command::CreateNetwork(n) => n.name.clone(),
            Command::CreateToken(t) => t.name.clone(),
            Command::RevokeToken(id) => id.clone(),
            _ => String::new(),
        }
    }
}

/// The weakest role allowed to run the action named `action` (see
/// [`Command::name`]); `None` for actions that need no authentication. Keyed
/// by name so the API can check it before reading a request body.
pub fn required_role(action: &str) -> Option<Role> {
    match action {
        "health" | "openapi" => None,
        "ready" | "health.details" | "host.info" | "metrics" | "vm.list" | "vm.get" | "vm.snapshot.list"
        | "image.list" | "image.get" | "network.list" | "event.list" | "host.update.status" => {
            Some(Role::Viewer)
        }
        // The console (and its log) can show secrets: operator, like lifecycle.
        a if a.starts_with("vm.") || a.starts_with("image.") => Some(Role::Operator),
        // Tokens, audit, host networks and anything new: admin until decided
        // otherwise.
        _ => Some(Role::Admin),
    }
}

/// An open serial console: output chunks arrive on `output`; input goes
/// through `input`. Dropping both ends the session.
pub struct ConsoleSession {
    pub output: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    pub input: tokio::sync::mpsc::Sender<Vec<u8>>,
}

/// A live event feed: what was missed, then what comes.
pub struct EventFeed {
    pub backlog: Vec<super::events::Event>,
    pub live: tokio::sync::broadcast::Receiver<super::events::Event>,
}

pub enum Reply {
    Health(Health),
    HealthReport(Box<HealthReport>),
    Ready,
    Host(Box<HostInfo>),
    Metrics(String),
    /// The VM list with the generation it was built at, so the API can reuse
    /// its serialized form until the list changes.
    Vms {
        generation: u64,
        vms: Arc<Vec<Vm>>,
    },
    Vm(Box<Vm>),
    Created(Box<Vm>),
    /// The operation was started and goes on in the background.
    Accepted(Box<Vm>),
    Deleted,
    Tokens(TokenList),
    TokenCreated(TokenCreated),
    Audit(AuditList),
    Snapshots(SnapshotList),
    SnapshotCreated(Snapshot),
    Images(ImageList),
    Image(Image),
    ImageCreated(Image),
    Networks(NetworkList),
    NetworkCreated(Network),
    ConsoleLog(Bytes),
    Console(ConsoleSession),
    Events(EventFeed),
    Update(Box<crate::types::UpdateView>),
    /// An update was verified and handed to the installer.
    UpdateAccepted(Box<crate::types::UpdateView>),
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reply")
    }
}

/// Who is asking: resolved by the API from a token or the socket peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Token name, or `local:uid=N` for the Unix socket.
    pub name: String,
    pub token_id: Option<String>,
    pub role: Role,
}

impl Caller {
    pub fn anonymous() -> Caller {
        Caller { name: "anonymous".into(), token_id: None, role: Role::Viewer }
    }
}
