//! A minimal Redfish client for a BMC's BIOS settings: find the system's
//! Bios resource, diff its attributes against a firmware profile, and PATCH
//! the differing ones into the pending settings (`@Redfish.Settings`), which
//! the firmware applies at the next reboot.
//!
//! HTTP/1.1 with hyper over TCP or TLS, one connection per request, as the
//! CLI's API client does. BMCs ship self-signed certificates and many speak
//! only TLS 1.2, so HTTPS either pins the certificate's SHA-256 fingerprint
//! or, with `insecure`, accepts any certificate (signatures are still
//! checked).

use super::firmware::{AttrValue, Profile};
use super::OpsError;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::Serialize;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(30);

/// A BMC's Redfish service.
#[derive(Clone)]
pub struct Bmc {
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    authorization: Option<String>,
}

impl std::fmt::Debug for Bmc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bmc({})", self.describe())
    }
}

/// Standard base64 (RFC 4648) for the Basic authorization header.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Splits `scheme://host[:port][/...]` into (https, host, port).
fn parse_url(url: &str) -> Result<(bool, String, u16), OpsError> {
    let bad = || OpsError::BmcUrl(url.to_string());
    let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(bad());
    };
    let hostport = rest.split('/').next().unwrap_or_default();
    if hostport.is_empty() || hostport.contains('@') {
        return Err(bad());
    }
    let default = if https { 443 } else { 80 };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(bad)?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad())?,
            None if after.is_empty() => default,
            None => return Err(bad()),
        };
        (h.to_string(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad())?),
            None => (hostport.to_string(), default),
        }
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok((https, host, port))
}

/// The message of a Redfish error body, or the body itself.
fn error_message(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        let e = &v["error"];
        let mut parts: Vec<String> = e["message"].as_str().map(|s| vec![s.to_string()]).unwrap_or_default();
        if let Some(info) = e["@Message.ExtendedInfo"].as_array() {
            parts.extend(info.iter().filter_map(|i| i["Message"].as_str().map(str::to_string)));
        }
        if !parts.is_empty() {
            return parts.join("; ");
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "(empty body)".into()
    } else {
        text.chars().take(500).collect()
    }
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Io for T {}

impl Bmc {
    /// A client for `url`. `user`/`password` give HTTP Basic auth; for
    /// https, `fingerprint` pins the certificate, `insecure` accepts any.
    pub fn new(
        url: &str,
        user: Option<&str>,
        password: Option<&str>,
        insecure: bool,
        fingerprint: Option<&str>,
    ) -> Result<Bmc, OpsError> {
        let (https, host, port) = parse_url(url)?;
        let tls = if https {
            if fingerprint.is_none() && !insecure {
                return Err(OpsError::BmcNoTrust);
            }
            let fingerprint = match fingerprint {
                Some(fp) => Some(
                    crate::tls::parse_fingerprint(fp).ok_or_else(|| OpsError::BmcFingerprint(fp.into()))?,
                ),
                None => None,
            };
            // Many BMCs speak nothing newer than TLS 1.2.
            let tls = crate::tls::pinned_client_config(fingerprint.as_deref(), true, &[b"http/1.1"])
                .map_err(|e| OpsError::BmcConnect { target: url.into(), reason: e.to_string() })?;
            Some(tls)
        } else {
            None
        };
        let authorization = user
            .map(|u| format!("Basic {}", base64(format!("{u}:{}", password.unwrap_or_default()).as_bytes())));
        Ok(Bmc { host, port, tls, authorization })
    }

    pub fn describe(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}", self.host, self.port)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }

    async fn connect(&self) -> Result<Box<dyn Io>, OpsError> {
        let target = format!("{}:{}", self.host, self.port);
        let conn_err = |reason: String| OpsError::BmcConnect { target: target.clone(), reason };
        let tcp =
            tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect((self.host.as_str(), self.port)))
                .await
                .map_err(|_| conn_err("timed out".into()))?
                .map_err(|e| conn_err(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => Ok(Box::new(tcp)),
            Some(tls) => {
                let name = ServerName::try_from(self.host.clone()).map_err(|e| conn_err(e.to_string()))?;
                let stream = tokio::time::timeout(
                    TIMEOUT,
                    tokio_rustls::TlsConnector::from(tls.clone()).connect(name, tcp),
                )
                .await
                .map_err(|_| conn_err("TLS handshake timed out".into()))?
                .map_err(|e| conn_err(e.to_string()))?;
                Ok(Box::new(stream))
            }
        }
    }

    /// One request on a new connection; returns status and body.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Bytes), OpsError> {
        let http_err =
            |reason: String| OpsError::BmcHttp { method: method.to_string(), path: path.to_string(), reason };
        let host = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(hyper::header::HOST, host)
            .header(hyper::header::ACCEPT, "application/json")
            .header("OData-Version", "4.0");
        if let Some(a) = &self.authorization {
            req = req.header(hyper::header::AUTHORIZATION, a);
        }
        let payload = match body {
            Some(v) => {
                req = req.header(hyper::header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(v).map_err(|e| http_err(e.to_string()))?)
            }
            None => Bytes::new(),
        };
        let req = req.body(Full::new(payload)).map_err(|e| http_err(e.to_string()))?;
        let io = TokioIo::new(self.connect().await?);
        let exchange = async {
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(io).await.map_err(|e| http_err(e.to_string()))?;
            tokio::spawn(conn);
            let resp = sender.send_request(req).await.map_err(|e| http_err(e.to_string()))?;
            let status = resp.status();
            let body = resp.into_body().collect().await.map_err(|e| http_err(e.to_string()))?.to_bytes();
            Ok::<_, OpsError>((status, body))
        };
        tokio::time::timeout(TIMEOUT, exchange).await.map_err(|_| http_err("timed out".into()))?
    }

    /// GETs a resource that must answer 200 with a JSON object.
    pub async fn get_json(&self, path: &str) -> Result<Value, OpsError> {
        let (status, body) = self.request(Method::GET, path, None).await?;
        if !status.is_success() {
            return Err(OpsError::BmcStatus {
                method: "GET".into(),
                path: path.into(),
                status: status.as_u16(),
                message: error_message(&body),
            });
        }
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| OpsError::BmcShape { path: path.into(), reason: format!("not JSON: {e}") })?;
        if !v.is_object() {
            return Err(OpsError::BmcShape { path: path.into(), reason: "not a JSON object".into() });
        }
        Ok(v)
    }
}

fn odata_id<'a>(v: &'a Value, path: &str, what: &str) -> Result<&'a str, OpsError> {
    v["@odata.id"]
        .as_str()
        .filter(|s| s.starts_with('/'))
        .ok_or_else(|| OpsError::BmcShape { path: path.into(), reason: format!("no {what} link") })
}

#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub name: String,
    /// The current value on the BMC.
    pub from: Value,
    pub to: Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct NotExposed {
    pub name: String,
    pub value: Value,
    /// Optional attributes are alternative spellings: not an error.
    pub optional: bool,
}

/// What `firmware apply` found and (unless a dry run) did.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub bmc: String,
    pub profile: String,
    pub system: String,
    pub bios: String,
    /// Where changes are PATCHed: the SettingsObject, else the Bios URI.
    pub settings: String,
    /// Attributes set (or, in a dry run, to set).
    pub changes: Vec<Change>,
    /// Already staged in the pending settings, waiting for a reboot.
    pub pending: Vec<String>,
    /// Already at the profile's value.
    pub unchanged: Vec<String>,
    /// Not in this BMC's BIOS attributes; never sent.
    pub not_exposed: Vec<NotExposed>,
    pub applied: bool,
    pub dry_run: bool,
    /// Whether the host must be rebooted for staged settings to apply.
    pub reboot_required: bool,
}

impl Plan {
    /// Required attributes the BMC does not have, or a profile none of
    /// whose attributes it has.
    pub fn incomplete(&self) -> bool {
        self.not_exposed.iter().any(|n| !n.optional)
            || (self.changes.is_empty()
                && self.pending.is_empty()
                && self.unchanged.is_empty()
                && !self.not_exposed.is_empty())
    }
}

/// Reads the first system's BIOS and works out what `profile` changes.
pub async fn plan(bmc: &Bmc, profile: &Profile) -> Result<Plan, OpsError> {
    let systems_path = "/redfish/v1/Systems";
    let systems = bmc.get_json(systems_path).await?;
    let first = systems["Members"].as_array().and_then(|m| m.first()).ok_or_else(|| OpsError::BmcShape {
        path: systems_path.into(),
        reason: "no systems in Members".into(),
    })?;
    let system_path = odata_id(first, systems_path, "system")?.to_string();
    let system = bmc.get_json(&system_path).await?;
    let bios_path = odata_id(&system["Bios"], &system_path, "Bios")?.to_string();
    let bios = bmc.get_json(&bios_path).await?;
    let current = bios["Attributes"].as_object().cloned().ok_or_else(|| OpsError::BmcShape {
        path: bios_path.clone(),
        reason: "no Attributes object".into(),
    })?;
    let settings_path = bios["@Redfish.Settings"]["SettingsObject"]["@odata.id"]
        .as_str()
        .filter(|s| s.starts_with('/'))
        .unwrap_or(&bios_path)
        .to_string();
    // What is already staged for the next boot.
    let pending = if settings_path != bios_path {
        match bmc.get_json(&settings_path).await {
            Ok(s) => s["Attributes"].as_object().cloned().unwrap_or_default(),
            Err(_) => Default::default(),
        }
    } else {
        Default::default()
    };
    let mut plan = Plan {
        bmc: bmc.describe(),
        profile: profile.name.clone(),
        system: system_path,
        bios: bios_path,
        settings: settings_path,
        changes: vec![],
        pending: vec![],
        unchanged: vec![],
        not_exposed: vec![],
        applied: false,
        dry_run: false,
        reboot_required: false,
    };
    for attr in &profile.bios {
        let want: &AttrValue = &attr.value;
        match current.get(&attr.name) {
            None => plan.not_exposed.push(NotExposed {
                name: attr.name.clone(),
                value: want.to_json(),
                optional: attr.optional,
            }),
            Some(cur) if want.matches(cur) => plan.unchanged.push(attr.name.clone()),
            Some(_) if pending.get(&attr.name).is_some_and(|p| want.matches(p)) => {
                plan.pending.push(attr.name.clone())
            }
            Some(cur) => {
                plan.changes.push(Change { name: attr.name.clone(), from: cur.clone(), to: want.to_json() })
            }
        }
    }
    plan.reboot_required = !plan.pending.is_empty();
    Ok(plan)
}

/// PATCHes the plan's changes into the settings resource.
pub async fn apply(bmc: &Bmc, plan: &mut Plan) -> Result<(), OpsError> {
    if plan.changes.is_empty() {
        return Ok(());
    }
    let attrs: serde_json::Map<String, Value> =
        plan.changes.iter().map(|c| (c.name.clone(), c.to.clone())).collect();
    let body = serde_json::json!({ "Attributes": attrs });
    let (status, resp) = bmc.request(Method::PATCH, &plan.settings, Some(&body)).await?;
    if !status.is_success() {
        return Err(OpsError::BmcStatus {
            method: "PATCH".into(),
            path: plan.settings.clone(),
            status: status.as_u16(),
            message: error_message(&resp),
        });
    }
    plan.applied = true;
    plan.reboot_required = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        assert_eq!(parse_url("http://127.0.0.1:8000").unwrap(), (false, "127.0.0.1".into(), 8000));
        assert_eq!(parse_url("https://bmc.example/redfish/v1").unwrap(), (true, "bmc.example".into(), 443));
        assert_eq!(parse_url("https://[fe80::1]:8443/").unwrap(), (true, "fe80::1".into(), 8443));
        assert_eq!(parse_url("http://[::1]").unwrap(), (false, "::1".into(), 80));
        for bad in ["ftp://x", "http://", "http://user:pw@host", "http://h:port", "bmc:443"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn https_needs_trust() {
        assert!(matches!(Bmc::new("https://h", None, None, false, None), Err(OpsError::BmcNoTrust)));
        assert!(Bmc::new("https://h", None, None, true, None).is_ok());
        // A fingerprint that can never match is a typo, said at once.
        assert!(matches!(
            Bmc::new("https://h", None, None, false, Some("AB:CD")),
            Err(OpsError::BmcFingerprint(f)) if f == "AB:CD"
        ));
        let fp = crate::tls::fingerprint(b"bmc");
        assert!(Bmc::new("https://h", None, None, false, Some(&fp.to_lowercase())).is_ok());
        assert_eq!(
            Bmc::new("http://[::1]:81", None, None, false, None).unwrap().describe(),
            "http://[::1]:81"
        );
    }

    #[test]
    fn basic_auth_is_base64() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"root:calvin"), "cm9vdDpjYWx2aW4=");
    }

    #[test]
    fn redfish_errors_are_readable() {
        let body = br#"{"error":{"code":"Base.1.0.GeneralError","message":"A general error has occurred.",
            "@Message.ExtendedInfo":[{"Message":"The property Foo is not in the list of valid properties."}]}}"#;
        assert_eq!(
            error_message(body),
            "A general error has occurred.; The property Foo is not in the list of valid properties."
        );
        assert_eq!(error_message(b"  oops "), "oops");
    }
}
