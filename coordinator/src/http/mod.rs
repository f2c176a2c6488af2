//! The OpenAI-compatible HTTP API (axum): `/v1/completions`, `/v1/chat/completions`
//! (JSON or SSE), `/v1/models`, vLLM's `/tokenize` and `/detokenize`, `/health`
//! (ready: a worker group is), `/livez` (the process serves), `/metrics`. Bodies are
//! parsed by hand so every malformed input gets an OpenAI-style error naming the
//! problem; responses are the typed bodies of [`responses`]. With API keys configured
//! every route but the probes and `/metrics` needs one ([`routes`] says which); the key
//! decides the tenant.

mod chat;
mod chat_types;
mod choices;
mod completions;
mod responses;
mod server;
mod tokenize;
mod types;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use serde::de::DeserializeOwned;
use tracing::Instrument as _;

use crate::admission::RateLimitStatus;
use crate::config::Config;
use crate::error::ApiError;
use crate::generation::Generation;
use crate::keys::{self, Tenant};
use crate::request::Priority;
use crate::service::Service;
use crate::validate::{GenerateParams, served_name};
use responses::{Health, ModelCard, ModelList};
use server::read_body;
pub use server::serve;
use types::Common;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Probes and Prometheus: Kubernetes calls them without keys.
    Public,
    /// Needs an API key when keys are configured.
    Key,
}

/// One route of the API.
#[derive(Debug, Clone)]
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
}

/// Every route with its handler. [`router`] is built from this list and nothing else, so
/// the test that walks [`routes`] sees every route there is.
fn table() -> Vec<(Route, MethodRouter<Service>)> {
    let key = |method, path, handler| {
        let access = Access::Key;
        (
            Route {
                method,
                path,
                access,
            },
            handler,
        )
    };
    let public = |path, handler| {
        let access = Access::Public;
        (
            Route {
                method: Method::GET,
                path,
                access,
            },
            handler,
        )
    };
    vec![
        key(Method::POST, "/v1/completions", post(completions::handle)),
        key(Method::POST, "/v1/chat/completions", post(chat::handle)),
        key(Method::GET, "/v1/models", get(models)),
        key(Method::POST, "/tokenize", post(tokenize::tokenize)),
        key(Method::POST, "/detokenize", post(tokenize::detokenize)),
        public("/health", get(health)),
        public("/livez", get(livez)),
        public("/metrics", get(metrics)),
    ]
}

/// The routes of the HTTP API and who may call them.
pub fn routes() -> Vec<Route> {
    table().into_iter().map(|(route, _)| route).collect()
}

/// The HTTP router over `service`. Everything but the public routes, unknown paths
/// included, goes through [`auth`].
pub fn router(service: Service) -> axum::Router {
    let limit = service.config.max_body_bytes;
    let mut api = axum::Router::new();
    let mut open = axum::Router::new();
    for (route, handler) in table() {
        match route.access {
            Access::Key => api = api.route(route.path, handler),
            Access::Public => open = open.route(route.path, handler),
        }
    }
    // `auth` runs first: a client without a key gets its 401 before any body is read.
    let api = api
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(service.clone(), read_body))
        .layer(middleware::from_fn_with_state(service.clone(), auth))
        // Outermost: a refused request (no key, body too large) is traced too.
        .layer(middleware::from_fn(traced));
    open.merge(api)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(service)
}

tokio::task_local! {
    /// The tenant the API key of the request being handled belongs to: [`auth`] sets it
    /// around the handler, [`start`] and [`models`] read it. (A task-local rather than a
    /// handler argument keeps the handlers' signatures about the API alone.)
    static TENANT: Arc<Tenant>;
}

/// With keys configured: the key must name a tenant (401 otherwise), which the handler
/// runs as; the response carries the tenant's `x-ratelimit-*` headers.
async fn auth(State(service): State<Service>, request: Request, next: Next) -> Response {
    let Some(keys) = service.config.keys.current() else {
        return next.run(request).await;
    };
    let headers = request.headers();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let tenant = match keys::authenticate(
        &keys,
        header(header::AUTHORIZATION.as_str()),
        header(TENANT_HEADER),
    ) {
        Ok(tenant) => tenant,
        Err(e) => return e.into_response(),
    };
    let mut response = TENANT.scope(tenant.clone(), next.run(request)).await;
    rate_limit_headers(&service.admission.status(&tenant), response.headers_mut());
    response
}

/// OpenAI's rate-limit headers; a limit the tenant does not have is left out.
fn rate_limit_headers(status: &RateLimitStatus, headers: &mut HeaderMap) {
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    };
    let reset = |s: f64| format!("{:.3}s", s.max(0.0));
    if let Some(limit) = status.limit_requests {
        set("x-ratelimit-limit-requests", limit.to_string());
        set(
            "x-ratelimit-remaining-requests",
            status.remaining_requests.to_string(),
        );
        set("x-ratelimit-reset-requests", reset(status.reset_requests_s));
    }
    if let Some(limit) = status.limit_tokens {
        set("x-ratelimit-limit-tokens", limit.to_string());
        set(
            "x-ratelimit-remaining-tokens",
            status.remaining_tokens.to_string(),
        );
        set("x-ratelimit-reset-tokens", reset(status.reset_tokens_s));
    }
}

/// Header naming the tenant: honoured without keys, or from a trusted gateway's key.
const TENANT_HEADER: &str = "x-shardline-tenant";

/// Opens the request's span (continuing a client's `traceparent`), runs the handler in
/// it, and names the trace in the `x-trace-id` response header.
async fn traced(request: Request, next: Next) -> Response {
    // `{method} {route}`, or the method alone for a path that is no route (OpenTelemetry's
    // HTTP span names: a client's made-up paths do not name spans).
    static PATHS: std::sync::LazyLock<Vec<&'static str>> =
        std::sync::LazyLock::new(|| routes().into_iter().map(|r| r.path).collect());
    let path = request.uri().path();
    let name = if PATHS.contains(&path) {
        format!("{} {path}", request.method())
    } else {
        request.method().to_string()
    };
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
    let allowed = |model: &crate::groups::ModelInfo| {
        TENANT
            .try_with(|t| {
                let models = &t.limits.models;
                models.is_empty()
                    || models
                        .iter()
                        .any(|m| *m == model.model_id || *m == served_name(&service.config, model))
            })
            .unwrap_or(true)
    };
    let data = match service.groups.model() {
        Ok(model) if !allowed(&model) => Vec::new(),
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
    let tenant = if service.config.keys.enabled() {
        // Set by `auth` for every keyed route; its absence would be a routing bug, and
        // is answered as a missing key rather than served open.
        Some(
            TENANT
                .try_with(Arc::clone)
                .map_err(|_| ApiError::Unauthorized)?,
        )
    } else {
        client_tenant(&service.config, tenant(headers, shape.user.as_deref()))
    };
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

/// Without keys, a tenant the client named gets the `--tenant-*` limits (admission keeps
/// no state for it when those limit nothing) and its metric label.
pub(crate) fn client_tenant(config: &Config, name: Option<String>) -> Option<Arc<Tenant>> {
    let limits = config.tenant_defaults();
    Some(Arc::new(Tenant {
        name: name.filter(|n| !n.is_empty())?,
        limits,
        trusted_gateway: false,
    }))
}

/// The tenant a client names (used without keys): the `x-shardline-tenant` header, else
/// the body's `user`.
pub(crate) fn tenant(headers: &HeaderMap, user: Option<&str>) -> Option<String> {
    headers
        .get(TENANT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| user.map(str::to_string))
}

/// An SSE response from a stream of events (each one `data:` line of JSON, from
/// [`event_json`]), ending with `data: [DONE]`.
pub(crate) fn sse<S>(events: S) -> Response
where
    S: futures::Stream<Item = String> + Send + 'static,
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
                    Some(json) => frame.push_str(&json),
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

/// One SSE event's JSON, serialized straight from the response type (no intermediate
/// `serde_json::Value`: this runs once per streamed token); an event that cannot be
/// serialized becomes an error event.
pub(crate) fn event_json(event: &impl serde::Serialize) -> String {
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
            tx.send(event_json(&serde_json::json!({ "i": i }))).unwrap();
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
        tx.send(event_json(&serde_json::json!({ "i": 3 }))).unwrap();
        drop(tx);
        let rest = body.next().await.unwrap().unwrap();
        assert_eq!(rest, "data: {\"i\":3}\n\ndata: [DONE]\n\n");
        assert!(body.next().await.is_none());
    }
}
