//! The route table: each row maps a method and path template to one
//! [`Action`] and builds its [`Command`]. The router, the 405 `Allow`
//! header, the OpenAPI check and the CLI's paths all read [`ROUTES`]; the
//! action's name and role come from [`Action`]. Nothing here touches state.

use super::ApiError;
use crate::core::{Action, Command, VmAction};
use hyper::Method;

/// One row of the route table; the method and path come from the action.
pub struct RouteSpec {
    pub action: Action,
    /// Query parameters the route accepts; any other is a 400.
    pub query: &'static [&'static str],
    pub build: Build,
}

/// How a row turns path parameters, query and body into what the API runs.
#[derive(Clone, Copy)]
pub enum Build {
    /// A complete command from the path and query.
    Ready(fn(&Args) -> Result<Command, ApiError>),
    /// A command that needs the JSON body, parsed strictly.
    Json(fn(&Args, &[u8]) -> Result<Command, ApiError>),
    /// A streaming edge the API bridges itself.
    Edge(fn(&Args) -> Result<Edge, ApiError>),
}

/// Routes whose bodies or answers are streams, not JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum Edge {
    /// Streams its body into the core (not bound by the JSON body limit).
    UploadImage(String),
    /// A host update bundle, streamed; boot attempts from `?tries=`.
    UploadUpdate {
        tries: u32,
    },
    /// Upgrades to a WebSocket.
    Console(String),
    /// Server-Sent Events; resumes after `Last-Event-ID`.
    Events,
    OpenApi,
}

/// What a request asks for, before its body is read.
#[derive(Debug, Clone)]
pub enum Route {
    /// Boxed: a command is far larger than the other variants.
    Ready(Box<Command>),
    Json(Args, fn(&Args, &[u8]) -> Result<Command, ApiError>),
    Edge(Edge),
}

#[derive(Debug, Clone)]
pub struct Matched {
    pub template: &'static str,
    pub action: Action,
    pub route: Route,
}

impl Matched {
    /// Routes whose JSON body is parsed into the command.
    pub fn needs_body(&self) -> bool {
        matches!(self.route, Route::Json(..))
    }

    /// Builds the command, parsing `body` strictly.
    pub fn into_command(self, body: &[u8]) -> Result<Command, ApiError> {
        match self.route {
            Route::Ready(cmd) => Ok(*cmd),
            Route::Json(args, build) => build(&args, body),
            Route::Edge(_) => Err(ApiError::NoRoute("this route has no JSON body".into())),
        }
    }
}

/// A request's path parameters (in template order) and query.
#[derive(Debug, Clone, Default)]
pub struct Args {
    params: Vec<String>,
    query: Vec<(String, String)>,
}

impl Args {
    fn param(&self, i: usize) -> String {
        self.params[i].clone()
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.query.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn bool(&self, name: &str) -> Result<bool, ApiError> {
        match self.get(name) {
            None | Some("false") | Some("0") => Ok(false),
            Some("true") | Some("1") | Some("") => Ok(true),
            Some(_) => {
                Err(ApiError::InvalidQuery { name: name.into(), message: "must be true or false".into() })
            }
        }
    }

    /// A whole number from 0 to `max`; `unit` names what it counts.
    fn number(&self, name: &str, max: u64, unit: &str) -> Result<Option<u64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => match v.parse::<u64>() {
                Ok(n) if n <= max => Ok(Some(n)),
                _ => Err(ApiError::InvalidQuery {
                    name: name.into(),
                    message: format!("must be a whole number of {unit} from 0 to {max}"),
                }),
            },
        }
    }
}

fn json<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, ApiError> {
    if b.is_empty() {
        return Err(ApiError::MalformedJson("the request body is empty".into()));
    }
    serde_json::from_slice(b).map_err(ApiError::from_json)
}

fn vm_action(a: &Args, action: VmAction) -> Result<Command, ApiError> {
    Ok(Command::VmAction { vm: a.param(0), action })
}

impl RouteSpec {
    pub fn method(&self) -> &'static str {
        self.action.method()
    }

    /// Path template, also the metrics label: `/v1/vms/{id}`.
    pub fn template(&self) -> &'static str {
        self.action.template()
    }
}

const fn row(action: Action, query: &'static [&'static str], build: Build) -> RouteSpec {
    RouteSpec { action, query, build }
}

use Build::{Edge as E, Json as J, Ready as R};

/// Every route, one row each.
#[rustfmt::skip]
pub static ROUTES: &[RouteSpec] = &[
    row(Action::Metrics, &[], R(|_| Ok(Command::Metrics))),
    row(Action::Health, &[], R(|_| Ok(Command::Health))),
    row(Action::HealthDetails, &[], R(|_| Ok(Command::HealthReport))),
    row(Action::Ready, &[], R(|_| Ok(Command::Ready))),
    row(Action::HostInfo, &[], R(|_| Ok(Command::HostInfo))),
    row(Action::HostUpdateStatus, &[], R(|_| Ok(Command::UpdateStatus))),
    row(Action::HostUpdate, &["tries"], E(|a| {
        let tries = a.number("tries", 9, "boot attempts")?.unwrap_or(3) as u32;
        Ok(Edge::UploadUpdate { tries })
    })),
    row(Action::OpenApi, &[], E(|_| Ok(Edge::OpenApi))),
    row(Action::VmList, &[], R(|_| Ok(Command::ListVms))),
    row(Action::VmCreate, &[], J(|_, b| Ok(Command::CreateVm(json(b)?)))),
    row(Action::VmGet, &[], R(|a| Ok(Command::GetVm(a.param(0))))),
    row(Action::VmUpdate, &[], J(|a, b| Ok(Command::UpdateVm(a.param(0), json(b)?)))),
    row(Action::VmDelete, &["force"], R(|a| {
        Ok(Command::DeleteVm { vm: a.param(0), force: a.bool("force")? })
    })),
    row(Action::VmStart, &[], R(|a| vm_action(a, VmAction::Start))),
    row(Action::VmStop, &[], R(|a| vm_action(a, VmAction::Stop))),
    row(Action::VmReboot, &[], R(|a| vm_action(a, VmAction::Reboot))),
    row(Action::VmPause, &[], R(|a| vm_action(a, VmAction::Pause))),
    row(Action::VmResume, &[], R(|a| vm_action(a, VmAction::Resume))),
    row(Action::VmShutdown, &["wait", "timeout"], R(|a| {
        let wait = a.number("wait", 3600, "seconds")?;
        let timeout = a.number("timeout", 86_400, "seconds")?;
        vm_action(a, VmAction::Shutdown { wait, timeout })
    })),
    row(Action::VmClone, &[], J(|a, b| Ok(Command::CloneVm(a.param(0), json(b)?)))),
    row(Action::VmConsole, &[], E(|a| Ok(Edge::Console(a.param(0))))),
    row(Action::VmConsoleLog, &["bytes"], R(|a| {
        let bytes = a.number("bytes", 1 << 20, "bytes")?.unwrap_or(64 * 1024);
        Ok(Command::ConsoleLog { vm: a.param(0), bytes })
    })),
    row(Action::VmSnapshotList, &[], R(|a| Ok(Command::ListSnapshots(a.param(0))))),
    row(Action::VmSnapshotCreate, &[], J(|a, b| {
        Ok(Command::CreateSnapshot(a.param(0), json(b)?))
    })),
    row(Action::VmSnapshotDelete, &[], R(|a| {
        Ok(Command::DeleteSnapshot { vm: a.param(0), name: a.param(1) })
    })),
    row(Action::VmSnapshotRevert, &[], R(|a| {
        Ok(Command::RevertSnapshot { vm: a.param(0), name: a.param(1) })
    })),
    row(Action::VmMove, &[], R(|a| Ok(Command::VmMove(a.param(0))))),
    row(Action::VmDiskAttach, &[], J(|a, b| Ok(Command::AttachDisk(a.param(0), json(b)?)))),
    row(Action::VmDiskDetach, &[], R(|a| {
        Ok(Command::DetachDisk { vm: a.param(0), device: a.param(1) })
    })),
    row(Action::VmDiskResize, &[], J(|a, b| {
        Ok(Command::ResizeDisk { vm: a.param(0), device: a.param(1), req: json(b)? })
    })),
    row(Action::ImageList, &[], R(|_| Ok(Command::ListImages))),
    row(Action::ImageImport, &[], J(|_, b| Ok(Command::ImportImage(json(b)?)))),
    row(Action::ImageGet, &[], R(|a| Ok(Command::GetImage(a.param(0))))),
    row(Action::ImageUpload, &[], E(|a| Ok(Edge::UploadImage(a.param(0))))),
    row(Action::ImageDelete, &[], R(|a| Ok(Command::DeleteImage(a.param(0))))),
    row(Action::NetworkList, &[], R(|_| Ok(Command::ListNetworks))),
    row(Action::NetworkCreate, &[], J(|_, b| Ok(Command::CreateNetwork(json(b)?)))),
    row(Action::NetworkDelete, &[], R(|a| Ok(Command::DeleteNetwork(a.param(0))))),
    // `after` is read with Last-Event-ID in `api::last_event_id`.
    row(Action::EventList, &["after"], E(|_| Ok(Edge::Events))),
    row(Action::TokenList, &[], R(|_| Ok(Command::ListTokens))),
    row(Action::TokenCreate, &[], J(|_, b| Ok(Command::CreateToken(json(b)?)))),
    row(Action::TokenRevoke, &["force"], R(|a| {
        Ok(Command::RevokeToken { token: a.param(0), force: a.bool("force")? })
    })),
    row(Action::PeerGet, &[], R(|_| Ok(Command::PeerStatus))),
    row(Action::PeerUnpair, &["force"], R(|a| Ok(Command::PeerUnpair { force: a.bool("force")? }))),
    row(Action::PeerTakeover, &[], J(|_, b| Ok(Command::PeerTakeover(json(b)?)))),
    row(Action::PeerInvite, &[], J(|_, b| Ok(Command::PeerInvite(json(b)?)))),
    row(Action::PeerJoin, &[], J(|_, b| Ok(Command::PeerJoin(json(b)?)))),
    row(Action::PeerHandshake, &[], J(|_, b| Ok(Command::PeerHandshake(json(b)?)))),
    row(Action::AuditList, &["limit"], R(|a| {
        let limit = a.number("limit", 10_000, "entries")?.unwrap_or(100) as usize;
        Ok(Command::ListAudit { limit })
    })),
];

/// The path parameters if `segs` (a path split at `/`) fits `template`;
/// parameters match one non-empty segment.
fn bind<'a>(template: &str, segs: &[&'a str]) -> Option<Vec<&'a str>> {
    let mut params = Vec::new();
    let mut t = template.split('/').skip(1);
    for seg in segs {
        let want = t.next()?;
        if want.starts_with('{') {
            if seg.is_empty() {
                return None;
            }
            params.push(*seg);
        } else if want != *seg {
            return None;
        }
    }
    t.next().is_none().then_some(params)
}

fn segments(path: &str) -> Vec<&str> {
    path.trim_end_matches('/').split('/').skip(1).collect()
}

/// The methods the route table has for `path`, as an `Allow` header lists them.
pub fn allowed_methods(path: &str) -> Vec<&'static str> {
    let segs = segments(path);
    ROUTES.iter().filter(|r| bind(r.template(), &segs).is_some()).map(|r| r.method()).collect()
}

/// Query parameters, refusing any the route does not know.
fn parse_query(q: Option<&str>, allowed: &[&str]) -> Result<Vec<(String, String)>, ApiError> {
    let mut pairs = Vec::new();
    for part in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        if !allowed.contains(&k) {
            return Err(ApiError::InvalidQuery { name: k.to_string(), message: "unknown parameter".into() });
        }
        pairs.push((k.to_string(), v.to_string()));
    }
    Ok(pairs)
}

/// Maps a request line to a route.
pub fn route(method: &Method, path: &str, query: Option<&str>) -> Result<Matched, ApiError> {
    let segs = segments(path);
    let mut path_known = false;
    for spec in ROUTES {
        let Some(params) = bind(spec.template(), &segs) else { continue };
        if spec.method() != method.as_str() {
            path_known = true;
            continue;
        }
        let args = Args {
            params: params.into_iter().map(String::from).collect(),
            query: parse_query(query, spec.query)?,
        };
        let route = match spec.build {
            Build::Ready(build) => Route::Ready(Box::new(build(&args)?)),
            Build::Json(build) => Route::Json(args, build),
            Build::Edge(build) => Route::Edge(build(&args)?),
        };
        return Ok(Matched { template: spec.template(), action: spec.action, route });
    }
    if path_known {
        return Err(ApiError::MethodNotAllowed {
            method: method.to_string(),
            path: path.to_string(),
            allow: allowed_methods(path).join(", "),
        });
    }
    Err(ApiError::NoRoute(path.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(m: Method, path: &str, query: Option<&str>) -> Command {
        route(&m, path, query).unwrap().into_command(b"").unwrap()
    }

    #[test]
    fn routes_map_to_commands() {
        assert_eq!(
            command(Method::POST, "/v1/vms/web/shutdown", Some("wait=5")),
            Command::VmAction {
                vm: "web".into(),
                action: VmAction::Shutdown { wait: Some(5), timeout: None }
            }
        );
        assert_eq!(
            command(Method::DELETE, "/v1/vms/web", Some("force=true")),
            Command::DeleteVm { vm: "web".into(), force: true }
        );
        assert_eq!(route(&Method::GET, "/v1/vms/", None).unwrap().action, Action::VmList);
        assert_eq!(
            command(Method::POST, "/v1/vms/a/snapshots/s1/revert", None),
            Command::RevertSnapshot { vm: "a".into(), name: "s1".into() }
        );
    }

    #[test]
    fn bad_requests_are_refused() {
        assert!(matches!(route(&Method::PUT, "/v1/vms", None), Err(ApiError::MethodNotAllowed { .. })));
        assert!(matches!(route(&Method::GET, "/v1/nope", None), Err(ApiError::NoRoute(_))));
        assert!(matches!(route(&Method::GET, "/v1/vms", Some("x=1")), Err(ApiError::InvalidQuery { .. })));
        assert!(matches!(
            route(&Method::DELETE, "/v1/vms/a", Some("force=maybe")),
            Err(ApiError::InvalidQuery { .. })
        ));
        assert!(matches!(route(&Method::POST, "/v1/vms/a/explode", None), Err(ApiError::NoRoute(_))));
        assert!(matches!(route(&Method::POST, "/v1/vms//start", None), Err(ApiError::NoRoute(_))));
    }

    #[test]
    fn not_allowed_lists_the_paths_methods() {
        match route(&Method::PUT, "/v1/vms/web", None) {
            Err(ApiError::MethodNotAllowed { allow, .. }) => assert_eq!(allow, "GET, PATCH, DELETE"),
            other => panic!("{other:?}"),
        }
        assert_eq!(allowed_methods("/v1/images/x"), ["GET", "PUT", "DELETE"]);
    }

    #[test]
    fn one_route_per_action_and_no_overlaps() {
        for action in Action::ALL {
            assert_eq!(ROUTES.iter().filter(|r| r.action == *action).count(), 1, "{action:?}");
        }
        assert_eq!(ROUTES.len(), Action::ALL.len());
        // A path built from each template routes back to that row, so no
        // row shadows another.
        for spec in ROUTES {
            let n = spec.template().matches('{').count();
            let path = spec.action.path(&vec!["p"; n]);
            let method = Method::from_bytes(spec.method().as_bytes()).unwrap();
            let m = route(&method, &path, None).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(m.action, spec.action, "{path}");
            assert_eq!(m.template, spec.template());
        }
    }

    #[test]
    fn paths_fill_the_template_encoded() {
        assert_eq!(Action::VmDiskResize.path(&["web", "vdb"]), "/v1/vms/web/disks/vdb/resize");
        assert_eq!(Action::VmList.path(&[]), "/v1/vms");
        // A name cannot reach another route: `/` and `?` stay inside the segment.
        let path = Action::VmGet.path(&["../tokens?x"]);
        assert_eq!(path, "/v1/vms/..%2Ftokens%3Fx");
        assert_eq!(route(&Method::GET, &path, None).unwrap().action, Action::VmGet);
    }
}
