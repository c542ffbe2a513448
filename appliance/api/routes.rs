//! Routing: `(method, path, query)` becomes a [`Matched`] route, and with
//! its body a typed [`Command`]. Nothing here touches state.

use super::ApiError;
use crate::core::{Command, VmAction};
use hyper::Method;

/// What a request asks for, before its body is read.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    /// A complete command that takes no body.
    Ready(Command),
    CreateVm,
    UpdateVm(String),
    CloneVm(String),
    AttachDisk(String),
    ResizeDisk(String, String),
    CreateSnapshot(String),
    ImportImage,
    CreateNetwork,
    CreateToken,
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

#[derive(Debug, Clone, PartialEq)]
pub struct Matched {
    /// Path template, for metrics labels: `/v1/vms/{id}`.
    pub template: &'static str,
    /// Action name, as in [`Command::name`].
    pub action: &'static str,
    pub route: Route,
}

impl Matched {
    fn new(template: &'static str, action: &'static str, route: Route) -> Matched {
        Matched { template, action, route }
    }

    /// Routes whose JSON body is parsed into the command.
    pub fn needs_body(&self) -> bool {
        matches!(
            self.route,
            Route::CreateVm
                | Route::UpdateVm(_)
                | Route::CloneVm(_)
                | Route::AttachDisk(_)
                | Route::ResizeDisk(..)
                | Route::CreateSnapshot(_)
                | Route::ImportImage
                | Route::CreateNetwork
                | Route::CreateToken
        )
    }

    /// Builds the command, parsing `body` strictly.
    pub fn into_command(self, body: &[u8]) -> Result<Command, ApiError> {
        fn parse(b: &[u8]) -> Result<&[u8], ApiError> {
            if b.is_empty() {
                return Err(ApiError::MalformedJson("the request body is empty".into()));
            }
            Ok(b)
        }
        fn json<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, ApiError> {
            serde_json::from_slice(parse(b)?).map_err(ApiError::from_json)
        }
        Ok(match self.route {
            Route::Ready(cmd) => cmd,
            Route::CreateVm => Command::CreateVm(json(body)?),
            Route::UpdateVm(vm) => Command::UpdateVm(vm, json(body)?),
            Route::CloneVm(vm) => Command::CloneVm(vm, json(body)?),
            Route::AttachDisk(vm) => Command::AttachDisk(vm, json(body)?),
            Route::ResizeDisk(vm, device) => Command::ResizeDisk { vm, device, req: json(body)? },
            Route::CreateSnapshot(vm) => Command::CreateSnapshot(vm, json(body)?),
            Route::ImportImage => Command::ImportImage(json(body)?),
            Route::CreateNetwork => Command::CreateNetwork(json(body)?),
            Route::CreateToken => Command::CreateToken(json(body)?),
            Route::UploadImage(_)
            | Route::UploadUpdate { .. }
            | Route::Console(_)
            | Route::Events
            | Route::OpenApi => return Err(ApiError::NoRoute("this route has no JSON body".into())),
        })
    }
}

/// Query parameters, refusing any the route does not know.
struct Query<'a> {
    pairs: Vec<(&'a str, &'a str)>,
}

impl<'a> Query<'a> {
    fn parse(q: Option<&'a str>, allowed: &[&str]) -> Result<Query<'a>, ApiError> {
        let mut pairs = Vec::new();
        for part in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            if !allowed.contains(&k) {
                return Err(ApiError::InvalidQuery {
                    name: k.to_string(),
                    message: "unknown parameter".into(),
                });
            }
            pairs.push((k, v));
        }
        Ok(Query { pairs })
    }

    fn get(&self, name: &str) -> Option<&'a str> {
        self.pairs.iter().rev().find(|(k, _)| *k == name).map(|(_, v)| *v)
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

fn not_allowed(method: &Method, path: &str) -> ApiError {
    ApiError::MethodNotAllowed { method: method.to_string(), path: path.to_string() }
}

/// Maps a request line to a route.
pub fn route(method: &Method, path: &str, query: Option<&str>) -> Result<Matched, ApiError> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let no_query = |m: Matched| -> Result<Matched, ApiError> {
        Query::parse(query, &[])?;
        Ok(m)
    };
    let get_only =
        |m: Matched| if method == Method::GET { no_query(m) } else { Err(not_allowed(method, path)) };
    match segs.as_slice() {
        ["metrics"] => get_only(Matched::new("/metrics", "metrics", Route::Ready(Command::Metrics))),
        ["v1", "health"] => get_only(Matched::new("/v1/health", "health", Route::Ready(Command::Health))),
        ["v1", "health", "details"] => get_only(Matched::new(
            "/v1/health/details",
            "health.details",
            Route::Ready(Command::HealthReport),
        )),
        ["v1", "ready"] => get_only(Matched::new("/v1/ready", "ready", Route::Ready(Command::Ready))),
        ["v1", "host"] => get_only(Matched::new("/v1/host", "host.info", Route::Ready(Command::HostInfo))),
        ["v1", "host", "update"] => match *method {
            Method::GET => no_query(Matched::new(
                "/v1/host/update",
                "host.update.status",
                Route::Ready(Command::UpdateStatus),
            )),
            Method::POST => {
                let q = Query::parse(query, &["tries"])?;
                let tries = q.number("tries", 9, "boot attempts")?.unwrap_or(3) as u32;
                Ok(Matched::new("/v1/host/update", "host.update", Route::UploadUpdate { tries }))
            }
            _ => Err(not_allowed(method, path)),
        },
        ["v1", "openapi.json"] => get_only(Matched::new("/v1/openapi.json", "openapi", Route::OpenApi)),
        ["v1", "vms"] => match *method {
            Method::GET => no_query(Matched::new("/v1/vms", "vm.list", Route::Ready(Command::ListVms))),
            Method::POST => no_query(Matched::new("/v1/vms", "vm.create", Route::CreateVm)),
            _ => Err(not_allowed(method, path)),
        },
        ["v1", "vms", id] if !id.is_empty() => {
            let id = id.to_string();
            match *method {
                Method::GET => {
                    no_query(Matched::new("/v1/vms/{id}", "vm.get", Route::Ready(Command::GetVm(id))))
                }
                Method::PATCH => no_query(Matched::new("/v1/vms/{id}", "vm.update", Route::UpdateVm(id))),
                Method::DELETE => {
                    let q = Query::parse(query, &["force"])?;
                    let cmd = Command::DeleteVm { vm: id, force: q.bool("force")? };
                    Ok(Matched::new("/v1/vms/{id}", "vm.delete", Route::Ready(cmd)))
                }
                _ => Err(not_allowed(method, path)),
            }
        }
        ["v1", "vms", id, action]
            if !id.is_empty() && !matches!(*action, "snapshots" | "disks" | "console") =>
        {
            let (template, action) = match *action {
                "start" => ("/v1/vms/{id}/start", VmAction::Start),
                "stop" => ("/v1/vms/{id}/stop", VmAction::Stop),
                "reboot" => ("/v1/vms/{id}/reboot", VmAction::Reboot),
                "pause" => ("/v1/vms/{id}/pause", VmAction::Pause),
                "resume" => ("/v1/vms/{id}/resume", VmAction::Resume),
                "clone" => {
                    if *method != Method::POST {
                        return Err(not_allowed(method, path));
                    }
                    let m = Matched::new("/v1/vms/{id}/clone", "vm.clone", Route::CloneVm(id.to_string()));
                    return no_query(m);
                }
                "shutdown" => {
                    let q = Query::parse(query, &["wait", "timeout"])?;
                    let act = VmAction::Shutdown {
                        wait: q.number("wait", 3600, "seconds")?,
                        timeout: q.number("timeout", 86_400, "seconds")?,
                    };
                    if *method != Method::POST {
                        return Err(not_allowed(method, path));
                    }
                    let cmd = Command::VmAction { vm: id.to_string(), action: act };
                    return Ok(Matched::new("/v1/vms/{id}/shutdown", act.name(), Route::Ready(cmd)));
                }
                _ => return Err(ApiError::NoRoute(path.to_string())),
            };
            if *method != Method::POST {
                return Err(not_allowed(method, path));
            }
            let cmd = Command::VmAction { vm: id.to_string(), action };
            no_query(Matched::new(template, action.name(), Route::Ready(cmd)))
        }
        ["v1", "vms", id, "console"] if !id.is_empty() => {
            let m = Matched::new("/v1/vms/{id}/console", "vm.console", Route::Console(id.to_string()));
            get_only(m)
        }
        ["v1", "vms", id, "console", "log"] if !id.is_empty() => {
            if *method != Method::GET {
                return Err(not_allowed(method, path));
            }
            let q = Query::parse(query, &["bytes"])?;
            let bytes = q.number("bytes", 1 << 20, "bytes")?.unwrap_or(64 * 1024);
            let cmd = Command::ConsoleLog { vm: id.to_string(), bytes };
            Ok(Matched::new("/v1/vms/{id}/console/log", "vm.console.log", Route::Ready(cmd)))
        }
        ["v1", "vms", id, "snapshots"] if !id.is_empty() => match *method {
            Method::GET => no_query(Matched::new(
                "/v1/vms/{id}/snapshots",
                "vm.snapshot.list",
                Route::Ready(Command::ListSnapshots(id.to_string())),
            )),
            Method::POST => no_query(Matched::new(
                "/v1/vms/{id}/snapshots",
                "vm.snapshot.create",
                Route::CreateSnapshot(id.to_string()),
            )),
            _ => Err(not_allowed(method, path)),
        },
        ["v1", "vms", id, "snapshots", snap] if !id.is_empty() && !snap.is_empty() => match *method {
            Method::DELETE => no_query(Matched::new(
                "/v1/vms/{id}/snapshots/{snapshot}",
                "vm.snapshot.delete",
                Route::Ready(Command::DeleteSnapshot { vm: id.to_string(), name: snap.to_string() }),
            )),
            _ => Err(not_allowed(method, path)),
        },
        ["v1", "vms", id, "snapshots", snap, "revert"] if !id.is_empty() && !snap.is_empty() => {
            if *method != Method::POST {
                return Err(not_allowed(method, path));
            }
            no_query(Matched::new(
                "/v1/vms/{id}/snapshots/{snapshot}/revert",
                "vm.snapshot.revert",
                Route::Ready(Command::RevertSnapshot { vm: id.to_string(), name: snap.to_string() }),
            ))
        }
        ["v1", "vms", id, "disks"] if !id.is_empty() => match *method {
            Method::POST => no_query(Matched::new(
                "/v1/vms/{id}/disks",
                "vm.disk.attach",
                Route::AttachDisk(id.to_string()),
            )),
            _ => Err(not_allowed(method, path)),
        },
        ["v1", "vms", id, "disks", dev] if !id.is_empty() && !dev.is_empty() => match *method {
            Method::DELETE => no_query(Matched::new(
                "/v1/vms/{id}/disks/{device}",
                "vm.disk.detach",
                Route::Ready(Command::DetachDisk { vm: id.to_string(), device: dev.to_string() }),
            )),
            _ => Err(not_allowed(method, path)),
        },
        ["v1", "vms", id, "disks", dev, "resize"] if !id.is_empty() && !dev.is_empty() => {
            if *method != Method::POST {
                return Err(not_allowed(method, path));
            }
            no_query(Matched::new(
                "/v1/vms/{id}/disks/{device}/resize",
                "vm.disk.resize",
                Route::ResizeDisk(id.to_string(), dev.to_string()),
            ))
        }
        ["v1", "images"] => match *method {
            Method::GET => {
                no_query(Matched::new("/v1/images", "image.list", Route::Ready(Command::ListImages)))
            }
            Method::POST => no_query(Matched::new("/v1/images", "image.import", Route::ImportImage)),
            _ => Err(not_allowed(method, path)),
        },
        ["v1", "images", name] if !name.is_empty() => match *method {
            Method::GET => no_query(Matched::new(
                "/v1/images/{name}",
                "image.get",
                Route::Ready(Command::GetImage(name.to_string())),
            )),
            Method::PUT => no_query(Matched::new(
                "/v1/images/{name}",
                "image.upload",
                Route::UploadImage(name.to_string()),
            )),
            Method::DELETE => no_query(Matched::new(
                "/v1/images/{name}",
                "image.delete",
                Route::Ready(Command::DeleteImage(name.to_string())),
            )),
            _ => Err(not_allowed(method, path)),
        },
        ["v1", "networks"] => match *method {
            Method::GET => {
                no_query(Matched::new("/v1/networks", "network.list", Route::Ready(Command::ListNetworks)))
            }
            Method::POST => no_query(Matched::new("/v1/networks", "network.create", Route::CreateNetwork)),
            _ => Err(not_allowed(method, path)),
        },
        ["v1", "networks", name] if !name.is_empty() => match *method {
            Method::DELETE => no_query(Matched::new(
                "/v1/networks/{name}",
                "network.delete",
                Route::Ready(Command::DeleteNetwork(name.to_string())),
            )),
            _ => Err(not_allowed(method, path)),
        },
        ["v1", "events"] => {
            if *method != Method::GET {
                return Err(not_allowed(method, path));
            }
            Query::parse(query, &["after"])?;
            Ok(Matched::new("/v1/events", "event.list", Route::Events))
        }
        ["v1", "tokens"] => match *method {
            Method::GET => {
                no_query(Matched::new("/v1/tokens", "token.list", Route::Ready(Command::ListTokens)))
            }
            Method::POST => no_query(Matched::new("/v1/tokens", "token.create", Route::CreateToken)),
            _ => Err(not_allowed(method, path)),
        },
        ["v1", "tokens", id] if !id.is_empty() => match *method {
            Method::DELETE => no_query(Matched::new(
                "/v1/tokens/{id}",
                "token.revoke",
                Route::Ready(Command::RevokeToken(id.to_string())),
            )),
            _ => Err(not_allowed(method, path)),
        },
        ["v1", "audit"] => {
            if *method != Method::GET {
                return Err(not_allowed(method, path));
            }
            let q = Query::parse(query, &["limit"])?;
            let limit = q.number("limit", 10_000, "entries")?.unwrap_or(100) as usize;
            Ok(Matched::new("/v1/audit", "audit.list", Route::Ready(Command::ListAudit { limit })))
        }
        _ => Err(ApiError::NoRoute(path.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_map_to_commands() {
        let m = route(&Method::POST, "/v1/vms/web/shutdown", Some("wait=5")).unwrap();
        assert_eq!(
            m.route,
            Route::Ready(Command::VmAction {
                vm: "web".into(),
                action: VmAction::Shutdown { wait: Some(5), timeout: None }
            })
        );
        let m = route(&Method::DELETE, "/v1/vms/web", Some("force=true")).unwrap();
        assert_eq!(m.route, Route::Ready(Command::DeleteVm { vm: "web".into(), force: true }));
        assert_eq!(route(&Method::GET, "/v1/vms/", None).unwrap().action, "vm.list");
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
    }
}
