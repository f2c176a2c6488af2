//! The coordinator's request-path error, classified once where it arises and mapped to
//! an HTTP response (OpenAI's error JSON) and to a gRPC status here, in one place each.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// OpenAI's error response body (also the event a failed stream ends with).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

/// Why a request failed. Every variant knows its HTTP status and gRPC code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or a parameter is out of range; `param` names the field.
    #[error("{message}")]
    Invalid {
        param: Option<String>,
        message: String,
    },
    /// The requested model is not served here.
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    /// The body exceeds the size limit.
    #[error("request body too large (limit {limit} bytes)")]
    TooLarge { limit: usize },
    /// Missing or wrong API key.
    #[error("invalid or missing API key: send `Authorization: Bearer <key>`")]
    Unauthorized,
    /// A valid key whose tenant may not do this (model, priority).
    #[error("{0}")]
    Forbidden(String),
    /// Over an admission limit; retry after `retry_after_s`.
    #[error("{message}")]
    Overloaded {
        reason: &'static str,
        message: String,
        retry_after_s: u64,
    },
    /// The request's deadline passed before it finished.
    #[error("request deadline exceeded{0}")]
    DeadlineExceeded(&'static str),
    /// No worker group can serve right now (none ready, or migrations exhausted).
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected worker answer.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            param: Some(param.into()),
            message: message.into(),
        }
    }

    pub fn overloaded(reason: &'static str, message: impl Into<String>) -> Self {
        ApiError::Overloaded {
            reason,
            message: message.into(),
            retry_after_s: 1,
        }
    }

    /// HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid { .. } => StatusCode::BAD_REQUEST,
            ApiError::ModelNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `type` and `code` for this error.
    fn kind(&self) -> (&'static str, Option<&'static str>) {
        match self {
            ApiError::Invalid { .. } => ("invalid_request_error", None),
            ApiError::ModelNotFound(_) => ("invalid_request_error", Some("model_not_found")),
            ApiError::TooLarge { .. } => ("invalid_request_error", Some("request_too_large")),
            ApiError::Unauthorized => ("invalid_request_error", Some("invalid_api_key")),
            ApiError::Forbidden(_) => ("permission_error", Some("permission_denied")),
            ApiError::Overloaded { .. } => ("rate_limit_error", Some("rate_limit_exceeded")),
            ApiError::DeadlineExceeded(_) => ("timeout_error", Some("deadline_exceeded")),
            ApiError::Unavailable(_) => ("server_error", Some("unavailable")),
            ApiError::Internal(_) => ("server_error", None),
        }
    }

    /// The OpenAI error object: `{"error": {"message", "type", "param", "code"}}`.
    pub fn to_body(&self) -> ErrorBody {
        let (kind, code) = self.kind();
        let param = match self {
            ApiError::Invalid { param, .. } => param.clone(),
            ApiError::ModelNotFound(_) => Some("model".to_string()),
            _ => None,
        };
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind,
                param,
                code,
            },
        }
    }

    /// gRPC status of this error.
    pub fn to_status(&self) -> tonic::Status {
        let message = self.to_string();
        let mut status = match self {
            ApiError::Invalid { .. } | ApiError::TooLarge { .. } => {
                tonic::Status::invalid_argument(message)
            }
            ApiError::ModelNotFound(_) => tonic::Status::not_found(message),
            ApiError::Unauthorized => tonic::Status::unauthenticated(message),
            ApiError::Forbidden(_) => tonic::Status::permission_denied(message),
            ApiError::Overloaded { .. } => tonic::Status::resource_exhausted(message),
            ApiError::DeadlineExceeded(_) => tonic::Status::deadline_exceeded(message),
            ApiError::Unavailable(_) => tonic::Status::unavailable(message),
            ApiError::Internal(_) => tonic::Status::internal(message),
        };
        if let ApiError::Overloaded { retry_after_s, .. } = self
            && let Ok(v) = retry_after_s.to_string().parse()
        {
            status.metadata_mut().insert("retry-after", v);
        }
        status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), axum::Json(self.to_body())).into_response();
        if let ApiError::Overloaded { retry_after_s, .. } = &self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overloaded_maps_to_429_with_retry_after() {
        let response = ApiError::overloaded("queue_full", "queue full").into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let status = ApiError::overloaded("queue_full", "queue full").to_status();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn invalid_names_the_field() {
        let json = serde_json::to_value(ApiError::invalid("temperature", "bad").to_body()).unwrap();
        assert_eq!(json["error"]["param"], "temperature");
        assert_eq!(json["error"]["type"], "invalid_request_error");
    }
}
