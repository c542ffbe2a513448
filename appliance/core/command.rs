//! The core's typed command interface. The API and the local socket parse
//! requests into a [`Command`]; the core answers with a [`Reply`]. One name
//! per action is used everywhere: route, command, audit entry, metric.

use crate::types::{
    AuditList, Health, HostInfo, Role, TokenCreate, TokenCreated, TokenList, Vm, VmCreate, VmPatch,
};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Health,
    Ready,
    HostInfo,
    Metrics,
    ListVms,
    GetVm(String),
    CreateVm(VmCreate),
    UpdateVm(String, VmPatch),
    DeleteVm { vm: String, force: bool },
    VmAction { vm: String, action: VmAction },
    ListTokens,
    CreateToken(TokenCreate),
    RevokeToken(String),
    ListAudit { limit: usize },
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
            Command::Ready => "ready",
            Command::HostInfo => "host.info",
            Command::Metrics => "metrics",
            Command::ListVms => "vm.list",
            Command::GetVm(_) => "vm.get",
            Command::CreateVm(_) => "vm.create",
            Command::UpdateVm(..) => "vm.update",
            Command::DeleteVm { .. } => "vm.delete",
            Command::VmAction { action, .. } => action.name(),
            Command::ListTokens => "token.list",
            Command::CreateToken(_) => "token.create",
            Command::RevokeToken(_) => "token.revoke",
            Command::ListAudit { .. } => "audit.list",
        }
    }

    /// The weakest role allowed to run this command; `None` for commands
    /// that need no authentication.
    pub fn required_role(&self) -> Option<Role> {
        required_role(self.name())
    }

    /// Mutations are audited.
    pub fn is_mutation(&self) -> bool {
        matches!(
            self,
            Command::CreateVm(_)
                | Command::UpdateVm(..)
                | Command::DeleteVm { .. }
                | Command::VmAction { .. }
                | Command::CreateToken(_)
                | Command::RevokeToken(_)
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
        "ready" | "host.info" | "metrics" | "vm.list" | "vm.get" => Some(Role::Viewer),
        a if a.starts_with("vm.") => Some(Role::Operator),
        // Tokens, audit and anything new: admin until decided otherwise.
        _ => Some(Role::Admin),
    }
}

#[derive(Debug, Clone)]
pub enum Reply {
    Health(Health),
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
