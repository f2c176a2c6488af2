//! The OpenAI-compatible HTTP API (axum): `/v1/completions`, `/v1/chat/completions`
//! (JSON or SSE), `/v1/models`, vLLM's `/tokenize` and `/detokenize`, `/health`
//! (ready: a worker group is), `/livez` (the process serves), `/metrics`. Bodies are
//! parsed by hand so every malformed input gets an OpenAI-style error naming the
//! problem; responses are the typed bodies of [`responses`].

mod chat;
mod chat_types;
mod choices;
mod completions;
mod responses;
mod tokenize;
mod types;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::error::ApiError;
use crate::generation::Generation;
use crate::request::Priority;
use crate::service::Service;
use crate::validate::{GenerateParams, served_name};
use responses::{Health, ModelCard, ModelList};
use types::Common;

/// The HTTP router over `service`.
pub fn router(service: Service) -> axum::Router {
    let limit = service.config.max_body_bytes;
    let api = axum::Router::new()
        .route("/v1/completions", post(completions::handle))
        .route("/v1/chat/completions", post(chat::handle))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route_layer(middleware::from_fn_with_state(service.clone(), auth))
        .route_layer(middleware::from_fn(traced));
    axum::Router::new()
        .merge(api)
        .route("/health", get(health))
        .route("/livez", get(livez))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(service)
}

/// Serves the HTTP API on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    service: Service,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Each SSE event is a small write: without TCP_NODELAY it can wait ~40 ms for the
    // client's delayed ACK (Nagle), which shows up directly in TTFT and ITL.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    });
    axum::serve(listener, router(service))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn auth(State(service): State<Service>, request: Request, next: Next) -> Response {
    if let Some(key) = &service.config.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(request).await
}

/// Opens the request's span (continuing a client's `traceparent`), runs the handler in
/// it, and names the trace in the `x-trace-id` response header.
async fn traced(request: Request, next: Next) -> Response {
    let name = format!("{} {}", request.method(), request.uri().path());
    let span = crate::trace::request_span(&name, "http");
    let headers = request.headers();
    let trace_id = crate::trace::continue_trace(&span, |k| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    });
    let mut response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    if let Some(id) = trace_id.and_then(|id| header::HeaderValue::from_str(&id).ok()) {
        response
            .headers_mut()
            .insert(crate::trace::TRACE_ID_HEADER, id);
    }
    response
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(ApiError::invalid("path", "no such endpoint").to_body()),
    )
        .into_response()
}

async fn health(State(service): State<Service>) -> Response {
    let ready = *service.groups.ready_count().borrow();
    if ready > 0 {
        let body = Health {
            status: "ok",
            groups: Some(ready),
        };
        (StatusCode::OK, axum::Json(body)).into_response()
    } else {
        let body = Health {
            status: "no worker group ready",
            groups: None,
        };
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response()
    }
}

/// Liveness: answers while the HTTP server does, whatever the worker groups' state (a
/// liveness probe on `/health` would restart every coordinator while no group is up).
async fn livez() -> Response {
    (StatusCode::OK, "ok\n").into_response()
}

async fn metrics(State(service): State<Service>) -> Response {
    service.metrics.set_totals(service.groups.totals());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        service.metrics.render(),
    )
        .into_response()
}

async fn models(State(service): State<Service>) -> Response {
    let data = match service.groups.model() {
        Ok(model) => vec![ModelCard {
            id: served_name(&service.config, &model),
            object: "model",
            created: unix_now(),
            owned_by: "shardline",
            max_model_len: model.context_length,
        }],
        Err(_) => Vec::new(),
    };
    axum::Json(ModelList {
        object: "list",
        data,
    })
    .into_response()
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Parses a JSON body into `T`, with errors that say what is wrong and where.
pub(crate) fn parse_body<T: DeserializeOwned + Default>(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<T, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge { limit }
        } else {
            ApiError::Invalid {
                param: None,
                message: format!("cannot read the request body: {rejection}"),
            }
        }
    })?;
    let text = std::str::from_utf8(&body).map_err(|e| ApiError::Invalid {
        param: None,
        message: format!(
            "the request body is not valid UTF-8 (at byte {})",
            e.valid_up_to()
        ),
    })?;
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| ApiError::Invalid {
        param: None,
        message: format!("malformed JSON in the request body: {e}"),
    })?;
    let serde_json::Value::Object(map) = &value else {
        return Err(ApiError::Invalid {
            param: None,
            message: "the request body must be a JSON object".into(),
        });
    };
    serde_json::from_value::<T>(value.clone()).map_err(|e| {
        // Find the field at fault: deserialize it alone (every field is optional).
        for (key, field) in map {
            let single =
                serde_json::Value::Object([(key.clone(), field.clone())].into_iter().collect());
            if let Err(field_error) = serde_json::from_value::<T>(single) {
                return ApiError::invalid(
                    key.clone(),
                    format!("invalid value for `{key}`: {field_error}"),
                );
            }
        }
        ApiError::Invalid {
            param: None,
            message: format!("invalid request body: {e}"),
        }
    })
}

/// Applies the shardline extensions from headers and body: priority, timeout, tenant.
pub(crate) fn extensions(
    headers: &HeaderMap,
    params: &mut GenerateParams,
    priority: Option<String>,
    timeout: Option<f64>,
) -> Result<(), ApiError> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (priority, priority_field) = match header("x-shardline-priority") {
        Some(p) => (Some(p), "x-shardline-priority"),
        None => (priority, "priority"),
    };
    if let Some(p) = priority {
        params.priority = Priority::parse(&p).ok_or_else(|| {
            ApiError::invalid(
                priority_field,
                format!("unknown priority `{p}`; use high, normal or low"),
            )
        })?;
    }
    let timeout = match header("x-shardline-timeout") {
        Some(t) => Some(t.trim().parse::<f64>().map_err(|_| {
            ApiError::invalid("x-shardline-timeout", "must be a number of seconds")
        })?),
        None => timeout,
    };
    if let Some(t) = timeout {
        if !t.is_finite() || t <= 0.0 || t > 86_400.0 * 7.0 {
            return Err(ApiError::invalid(
                "timeout",
                "`timeout` must be a positive number of seconds",
            ));
        }
        params.timeout = Some(Duration::from_secs_f64(t));
    }
    Ok(())
}

/// What both endpoints take from the shared request fields before the body is turned into
/// [`GenerateParams`] (which consumes it).
pub(crate) struct RequestShape {
    stream: bool,
    include_usage: bool,
    priority: Option<String>,
    timeout: Option<f64>,
    /// The tenant when no header names one: `user`, else `safety_identifier`.
    user: Option<String>,
}

impl RequestShape {
    pub(crate) fn of(common: &Common) -> RequestShape {
        RequestShape {
            stream: common.wants_stream(),
            include_usage: common.include_usage(),
            priority: common.priority.clone(),
            timeout: common.timeout,
            user: common.user.clone(),
        }
    }
}

/// A started request (its choices, in order) and what its response needs to name it.
pub(crate) struct Started {
    pub generations: Vec<Generation>,
    pub id: String,
    pub model: String,
    pub created: u64,
    pub stream: bool,
    pub include_usage: bool,
}

/// The path both endpoints share after parsing: shardline extensions (headers and body),
/// tenant, admission and start; `id_prefix` is `cmpl` or `chatcmpl`.
pub(crate) fn start(
    service: &Service,
    headers: &HeaderMap,
    shape: RequestShape,
    mut params: GenerateParams,
    id_prefix: &str,
) -> Result<Started, ApiError> {
    extensions(headers, &mut params, shape.priority, shape.timeout)?;
    let tenant = tenant(headers, shape.user.as_deref());
    let id = crate::service::request_id(id_prefix);
    let generations = service.start_choices(id.clone(), params, tenant.as_deref())?;
    let model = service
        .groups
        .model()
        .map(|m| served_name(&service.config, &m))
        .unwrap_or_default();
    Ok(Started {
        generations,
        id,
        model,
        created: unix_now(),
        stream: shape.stream,
        include_usage: shape.include_usage,
    })
}

/// The tenant: the `x-shardline-tenant` header, else the body's `user`.
pub(crate) fn tenant(headers: &HeaderMap, user: Option<&str>) -> Option<String> {
    headers
        .get("x-shardline-tenant")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| user.map(str::to_string))
}

/// An SSE response from a stream of events (each serialized as one `data:` line),
/// ending with `data: [DONE]`.
pub(crate) fn sse<S, T>(events: S) -> Response
where
    S: futures::Stream<Item = T> + Send + 'static,
    T: serde::Serialize + Send + 'static,
{
    use futures::StreamExt;
    // Every event ready when the body is polled goes out in one frame (one write): a
    // stream that fell behind its steps catches up in one syscall, not one per token.
    let frames = events
        .map(Some)
        .chain(futures::stream::once(async { None }))
        .ready_chunks(SSE_COALESCE_MAX)
        .map(|events| {
            let mut frame = String::new();
            for event in events {
                frame.push_str("data: ");
                match event {
                    Some(v) => frame.push_str(&serialized(&v)),
                    None => frame.push_str("[DONE]"),
                }
                frame.push_str("\n\n");
            }
            Bytes::from(frame)
        });
    // A comment line after SSE_KEEP_ALIVE without an event keeps proxies from closing a
    // stream that waits in the queue (what axum's `KeepAlive` default did).
    let body = tokio_stream::StreamExt::timeout_repeating(
        frames,
        tokio::time::interval_at(tokio::time::Instant::now() + SSE_KEEP_ALIVE, SSE_KEEP_ALIVE),
    )
    .map(|frame| {
        Ok::<_, std::convert::Infallible>(frame.unwrap_or_else(|_| Bytes::from_static(b":\n\n")))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// One event's JSON; an event that cannot be serialized becomes an error event.
fn serialized(event: &impl serde::Serialize) -> String {
    serde_json::to_string(event).unwrap_or_else(|e| {
        let error = ApiError::Internal(format!("response not serializable: {e}"));
        serde_json::to_string(&error.to_body()).unwrap_or_default()
    })
}

/// Most events coalesced into one SSE frame.
const SSE_COALESCE_MAX: usize = 64;
/// Idle time after which an SSE stream gets a keep-alive comment.
const SSE_KEEP_ALIVE: Duration = Duration::from_secs(15);

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    /// Events that are ready together leave in one frame (one write), `[DONE]` included;
    /// one that comes later gets its own.
    #[tokio::test]
    async fn ready_sse_events_are_coalesced_into_one_frame() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..3 {
            tx.send(serde_json::json!({ "i": i })).unwrap();
        }
        let events = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        let response = sse(events);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/event-stream"
        );
        let mut body = response.into_body().into_data_stream();
        let first = body.next().await.unwrap().unwrap();
        assert_eq!(
            first,
            "data: {\"i\":0}\n\ndata: {\"i\":1}\n\ndata: {\"i\":2}\n\n"
        );
        tx.send(serde_json::json!({ "i": 3 })).unwrap();
        drop(tx);
        let rest = body.next().await.unwrap().unwrap();
        assert_eq!(rest, "data: {\"i\":3}\n\ndata: [DONE]\n\n");
        assert!(body.next().await.is_none());
    }
}
