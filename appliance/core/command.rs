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
    /// Refused for the last admin token unless `force`.
    RevokeToken {
        token: String,
        force: bool,
    },
    ListAudit {
        limit: usize,
    },
    /// Slots, running version and the latest host update.
    UpdateStatus,
    /// A one-time join code for a second node.
    PeerInvite(crate::types::PeerInvite),
    /// Pair with the node whose code this is.
    PeerJoin(crate::types::PeerJoin),
    /// A step of the node-to-node handshake (no token: proven by HMAC).
    PeerHandshake(crate::cluster::pairing::Handshake),
    PeerStatus,
    /// Unpair on both nodes; alone with `force` when the peer does not answer.
    PeerUnpair {
        force: bool,
    },
    /// Take the (dead) peer's VMs over here.
    PeerTakeover(crate::types::PeerTakeover),
    /// Planned move of a VM to the peer.
    VmMove(String),
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
    pub fn action(self) -> Action {
        match self {
            VmAction::Start => Action::VmStart,
            VmAction::Stop => Action::VmStop,
            VmAction::Shutdown { .. } => Action::VmShutdown,
            VmAction::Reboot => Action::VmReboot,
            VmAction::Pause => Action::VmPause,
            VmAction::Resume => Action::VmResume,
        }
    }

    pub fn name(self) -> &'static str {
        self.action().name()
    }
}

/// Declares [`Action`] once: each action's variant, stable name, weakest
/// role (`None`: no authentication), whether it is audited, and its HTTP
/// route (method and path template). The API's router, its role check, the
/// OpenAPI test and the CLI all read this table; `api::routes` adds how each
/// route's command is built.
macro_rules! actions {
    ($($variant:ident = $name:literal, $role:expr, $audited:literal, $method:ident $path:literal;)*) => {
        /// Every action the API offers, one route each.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Action {
            $($variant,)*
        }

        impl Action {
            pub const ALL: &'static [Action] = &[$(Action::$variant,)*];

            /// Stable name, used in routes, the audit log, metrics and the
            /// OpenAPI `x-action`.
            pub fn name(self) -> &'static str {
                match self {
                    $(Action::$variant => $name,)*
                }
            }

            /// The weakest role allowed to run the action; `None` for actions
            /// that need no authentication.
            pub fn required_role(self) -> Option<Role> {
                match self {
                    $(Action::$variant => $role,)*
                }
            }

            /// The HTTP method of the action's route.
            pub fn method(self) -> &'static str {
                match self {
                    $(Action::$variant => stringify!($method),)*
                }
            }

            /// The route's path template: `/v1/vms/{id}`; also the label
            /// of the request metrics.
            pub fn template(self) -> &'static str {
                match self {
                    $(Action::$variant => $path,)*
                }
            }

            /// Audited, with `operation.*` events. The console counts: it can
            /// change the guest.
            pub fn is_mutation(self) -> bool {
                match self {
                    $(Action::$variant => $audited,)*
                }
            }
        }
    };
}

impl Action {
    /// The action's path with `params` filled into its template in order,
    /// each percent-encoded so a name can never add a path segment.
    pub fn path(self, params: &[&str]) -> String {
        let mut params = params.iter();
        let mut out = String::new();
        for seg in self.template().split('/').skip(1) {
            out.push('/');
            if seg.starts_with('{') {
                let p = params.next().unwrap_or_else(|| panic!("{}: a value for {seg}", self.template()));
                for b in p.bytes() {
                    if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                        out.push(b as char);
                    } else {
                        out.push_str(&format!("%{b:02X}"));
                    }
                }
            } else {
                out.push_str(seg);
            }
        }
        assert!(params.next().is_none(), "{}: more parameters than the template has", self.template());
        out
    }
}

const NONE: Option<Role> = None;
const VIEWER: Option<Role> = Some(Role::Viewer);
// The console (and its log) can show secrets: operator, like lifecycle.
const OPERATOR: Option<Role> = Some(Role::Operator);
// Tokens, audit, host networks and host updates.
const ADMIN: Option<Role> = Some(Role::Admin);

actions! {
    Health = "health", NONE, false, GET "/v1/health";
    OpenApi = "openapi", NONE, false, GET "/v1/openapi.json";
    HealthDetails = "health.details", VIEWER, false, GET "/v1/health/details";
    Ready = "ready", VIEWER, false, GET "/v1/ready";
    HostInfo = "host.info", VIEWER, false, GET "/v1/host";
    Metrics = "metrics", VIEWER, false, GET "/metrics";
    VmList = "vm.list", VIEWER, false, GET "/v1/vms";
    VmGet = "vm.get", VIEWER, false, GET "/v1/vms/{id}";
    VmCreate = "vm.create", OPERATOR, true, POST "/v1/vms";
    VmUpdate = "vm.update", OPERATOR, true, PATCH "/v1/vms/{id}";
    VmDelete = "vm.delete", OPERATOR, true, DELETE "/v1/vms/{id}";
    VmStart = "vm.start", OPERATOR, true, POST "/v1/vms/{id}/start";
    VmStop = "vm.stop", OPERATOR, true, POST "/v1/vms/{id}/stop";
    VmShutdown = "vm.shutdown", OPERATOR, true, POST "/v1/vms/{id}/shutdown";
    VmReboot = "vm.reboot", OPERATOR, true, POST "/v1/vms/{id}/reboot";
    VmPause = "vm.pause", OPERATOR, true, POST "/v1/vms/{id}/pause";
    VmResume = "vm.resume", OPERATOR, true, POST "/v1/vms/{id}/resume";
    VmClone = "vm.clone", OPERATOR, true, POST "/v1/vms/{id}/clone";
    VmMove = "vm.move", OPERATOR, true, POST "/v1/vms/{id}/move";
    VmDiskAttach = "vm.disk.attach", OPERATOR, true, POST "/v1/vms/{id}/disks";
    VmDiskDetach = "vm.disk.detach", OPERATOR, true, DELETE "/v1/vms/{id}/disks/{device}";
    VmDiskResize = "vm.disk.resize", OPERATOR, true, POST "/v1/vms/{id}/disks/{device}/resize";
    VmSnapshotList = "vm.snapshot.list", VIEWER, false, GET "/v1/vms/{id}/snapshots";
    VmSnapshotCreate = "vm.snapshot.create", OPERATOR, true, POST "/v1/vms/{id}/snapshots";
    VmSnapshotRevert = "vm.snapshot.revert", OPERATOR, true, POST "/v1/vms/{id}/snapshots/{snapshot}/revert";
    VmSnapshotDelete = "vm.snapshot.delete", OPERATOR, true, DELETE "/v1/vms/{id}/snapshots/{snapshot}";
    VmConsoleLog = "vm.console.log", OPERATOR, false, GET "/v1/vms/{id}/console/log";
    VmConsole = "vm.console", OPERATOR, true, GET "/v1/vms/{id}/console";
    ImageList = "image.list", VIEWER, false, GET "/v1/images";
    ImageGet = "image.get", VIEWER, false, GET "/v1/images/{name}";
    ImageUpload = "image.upload", OPERATOR, true, PUT "/v1/images/{name}";
    ImageImport = "image.import", OPERATOR, true, POST "/v1/images";
    ImageDelete = "image.delete", OPERATOR, true, DELETE "/v1/images/{name}";
    NetworkList = "network.list", VIEWER, false, GET "/v1/networks";
    NetworkCreate = "network.create", ADMIN, true, POST "/v1/networks";
    NetworkDelete = "network.delete", ADMIN, true, DELETE "/v1/networks/{name}";
    EventList = "event.list", VIEWER, false, GET "/v1/events";
    TokenList = "token.list", ADMIN, false, GET "/v1/tokens";
    TokenCreate = "token.create", ADMIN, true, POST "/v1/tokens";
    TokenRevoke = "token.revoke", ADMIN, true, DELETE "/v1/tokens/{id}";
    AuditList = "audit.list", ADMIN, false, GET "/v1/audit";
    HostUpdateStatus = "host.update.status", VIEWER, false, GET "/v1/host/update";
    HostUpdate = "host.update", ADMIN, true, POST "/v1/host/update";
    PeerGet = "peer.get", VIEWER, false, GET "/v1/peer";
    PeerUnpair = "peer.unpair", ADMIN, true, DELETE "/v1/peer";
    PeerTakeover = "peer.takeover", ADMIN, true, POST "/v1/peer/takeover";
    PeerInvite = "peer.invite", ADMIN, true, POST "/v1/peer/invite";
    PeerJoin = "peer.join", ADMIN, true, POST "/v1/peer/join";
    // Not audited per request (anyone may send one); the steps that change
    // state are audited in core/peer.rs.
    PeerHandshake = "peer.handshake", NONE, false, POST "/v1/peer/handshake";
}

impl Command {
    pub fn action(&self) -> Action {
        match self {
            Command::Health => Action::Health,
            Command::HealthReport => Action::HealthDetails,
            Command::Ready => Action::Ready,
            Command::HostInfo => Action::HostInfo,
            Command::Metrics => Action::Metrics,
            Command::ListVms => Action::VmList,
            Command::GetVm(_) => Action::VmGet,
            Command::CreateVm(_) => Action::VmCreate,
            Command::UpdateVm(..) => Action::VmUpdate,
            Command::DeleteVm { .. } => Action::VmDelete,
            Command::VmAction { action, .. } => action.action(),
            Command::CloneVm(..) => Action::VmClone,
            Command::AttachDisk(..) => Action::VmDiskAttach,
            Command::DetachDisk { .. } => Action::VmDiskDetach,
            Command::ResizeDisk { .. } => Action::VmDiskResize,
            Command::ListSnapshots(_) => Action::VmSnapshotList,
            Command::CreateSnapshot(..) => Action::VmSnapshotCreate,
            Command::RevertSnapshot { .. } => Action::VmSnapshotRevert,
            Command::DeleteSnapshot { .. } => Action::VmSnapshotDelete,
            Command::ConsoleLog { .. } => Action::VmConsoleLog,
            Command::Console(_) => Action::VmConsole,
            Command::ListImages => Action::ImageList,
            Command::GetImage(_) => Action::ImageGet,
            Command::UploadImage { .. } => Action::ImageUpload,
            Command::ImportImage(_) => Action::ImageImport,
            Command::DeleteImage(_) => Action::ImageDelete,
            Command::ListNetworks => Action::NetworkList,
            Command::CreateNetwork(_) => Action::NetworkCreate,
            Command::DeleteNetwork(_) => Action::NetworkDelete,
            Command::Events { .. } => Action::EventList,
            Command::ListTokens => Action::TokenList,
            Command::CreateToken(_) => Action::TokenCreate,
            Command::RevokeToken { .. } => Action::TokenRevoke,
            Command::ListAudit { .. } => Action::AuditList,
            Command::UpdateStatus => Action::HostUpdateStatus,
            Command::ApplyUpdate { .. } => Action::HostUpdate,
            Command::PeerInvite(_) => Action::PeerInvite,
            Command::PeerJoin(_) => Action::PeerJoin,
            Command::PeerHandshake(_) => Action::PeerHandshake,
            Command::PeerStatus => Action::PeerGet,
            Command::PeerUnpair { .. } => Action::PeerUnpair,
            Command::PeerTakeover(_) => Action::PeerTakeover,
            Command::VmMove(_) => Action::VmMove,
        }
    }

    /// Stable action name, used in the audit log and metrics.
    pub fn name(&self) -> &'static str {
        self.action().name()
    }

    /// Mutations are audited.
    pub fn is_mutation(&self) -> bool {
        self.action().is_mutation()
    }

    /// What the command acts on, for the audit log.
    pub fn target(&self) -> String {
        match self {
            Command::CreateVm(spec) => spec.name.clone(),
            Command::GetVm(vm)
            | Command::UpdateVm(vm, _)
            | Command::DeleteVm { vm, .. }
            | Command::VmAction { vm, .. }
            | Command::VmMove(vm) => vm.clone(),
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
            Command::RevokeToken { token, .. } => token.clone(),
            Command::PeerHandshake(h) => h.step().to_string(),
            _ => String::new(),
        }
    }
}

/// An open serial console: output chunks arrive on `output`; input goes
/// through `input`. Dropping both ends the session, which the API does
/// when `ends` resolves (the caller's token was revoked).
pub struct ConsoleSession {
    pub output: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    pub input: tokio::sync::mpsc::Sender<Vec<u8>>,
    pub ends: super::Revoked,
}

/// A live event feed: what was missed, then what comes, until `ends`
/// resolves. Without `audit_detail`, events are shown as
/// [`super::events::Event::without_audit_detail`] makes them.
pub struct EventFeed {
    pub backlog: Vec<super::events::Event>,
    pub live: tokio::sync::broadcast::Receiver<super::events::Event>,
    pub audit_detail: bool,
    pub ends: super::Revoked,
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
    PeerInvitation(crate::types::PeerInvitation),
    Peer(Box<crate::types::PeerView>),
    PeerHandshake(crate::cluster::pairing::HandshakeReply),
    PeerUnpaired(crate::types::PeerUnpaired),
    Takeover(crate::types::TakeoverReport),
    VmMoved(Box<crate::types::VmMoved>),
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
