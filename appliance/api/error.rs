//! The one place where errors become HTTP status codes and JSON bodies.

use crate::core::{CoreError, ErrorKind};
use crate::types::{ErrorBody, ErrorDetail};
use hyper::StatusCode;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no route for {0}")]
    NoRoute(String),
    /// `allow`: the path's methods, for the `Allow` header.
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String, allow: String },
    #[error("a valid bearer token is required")]
    Unauthorized,
    /// `retry_after`: whole seconds until the next request may pass.
    #[error("too many requests for this token; slow down")]
    RateLimited { retry_after: u64 },
    #[error("too many failed authentications from this address; retry in {retry_after} s")]
    AuthRateLimited { retry_after: u64 },
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the request body must be application/json")]
    UnsupportedMediaType,
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("{0}")]
    InvalidBody(String),
    #[error("query parameter {name}: {message}")]
    InvalidQuery { name: String, message: String },
    #[error("cannot read the request body: {0}")]
    Body(String),
    /// hyper refused the request head (HTTP/1.1), see `conn::JsonHeadErrors`.
    #[error("the request head is malformed: its request line or a header (such as Content-Length) cannot be parsed")]
    MalformedHead,
    #[error(transparent)]
    Core(#[from] CoreError),
    /// Start-up only: the TLS identity cannot be loaded or created.
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
}

impl ApiError {
    pub fn from_json(e: serde_json::Error) -> ApiError {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => ApiError::InvalidBody(e.to_string()),
            Category::Syntax | Category::Eof | Category::Io => ApiError::MalformedJson(e.to_string()),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NoRoute(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::RateLimited { .. } | ApiError::AuthRateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::MalformedJson(_) | ApiError::InvalidBody(_) | ApiError::InvalidQuery { .. } => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Body(_) | ApiError::MalformedHead => StatusCode::BAD_REQUEST,
            ApiError::Tls(_) | ApiError::Listen { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Core(e) => match e.kind() {
                ErrorKind::Invalid => StatusCode::BAD_REQUEST,
                ErrorKind::Forbidden => StatusCode::FORBIDDEN,
                ErrorKind::NotFound => StatusCode::NOT_FOUND,
                ErrorKind::Conflict => StatusCode::CONFLICT,
                ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                ErrorKind::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
                ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::NoRoute(_) => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::Unauthorized => "unauthorized",
            ApiError::RateLimited { .. } | ApiError::AuthRateLimited { .. } => "rate_limited",
            ApiError::TooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::MalformedJson(_) => "malformed_json",
            ApiError::InvalidBody(_) => "invalid_value",
            ApiError::InvalidQuery { .. } => "invalid_query",
            ApiError::Body(_) => "bad_body",
            ApiError::MalformedHead => "malformed_request",
            ApiError::Tls(_) | ApiError::Listen { .. } => "internal",
            ApiError::Core(e) => e.code(),
        }
    }

    /// Headers the answer carries besides the JSON body.
    pub fn headers(&self) -> Vec<(hyper::header::HeaderName, String)> {
        match self {
            ApiError::MethodNotAllowed { allow, .. } => vec![(hyper::header::ALLOW, allow.clone())],
            ApiError::RateLimited { retry_after } | ApiError::AuthRateLimited { retry_after } => {
                vec![(hyper::header::RETRY_AFTER, retry_after.to_string())]
            }
            _ => Vec::new(),
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody { error: ErrorDetail { code: self.code().into(), message: self.to_string() } }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_errors_name_the_field() {
        let e = serde_json::from_str::<crate::types::VmCreate>(r#"{"name":"a","vcpus":"x","memory_mib":1}"#)
            .unwrap_err();
        let api = ApiError::from_json(e);
        assert_eq!(api.status(), StatusCode::BAD_REQUEST);
        assert_eq!(api.code(), "invalid_value");
        let e = serde_json::from_str::<crate::types::VmCreate>("{\"name\":").unwrap_err();
        assert_eq!(ApiError::from_json(e).code(), "malformed_json");
    }

    #[test]
    fn state_conflicts_are_409() {
        let e = ApiError::Core(CoreError::WrongState { vm: "a".into(), state: "running", action: "delete" });
        assert_eq!(e.status(), StatusCode::CONFLICT);
        assert_eq!(e.body().error.code, "wrong_state");
    }

    #[test]
    fn a_replica_is_409_naming_its_owner() {
        let owner = uuid::Uuid::new_v4();
        let e = ApiError::Core(CoreError::NotOwner { vm: "web".into(), owner, epoch: 4 });
        assert_eq!(e.status(), StatusCode::CONFLICT);
        let body = e.body().error;
        assert_eq!(body.code, "not_owner");
        assert!(
            body.message.contains(&owner.to_string()) && body.message.contains("epoch 4"),
            "{}",
            body.message
        );
    }
}
