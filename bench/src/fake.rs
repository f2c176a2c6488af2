//! A fake OpenAI-compatible server: streams `max_tokens` chunks with configured delays
//! (zero by default). It serves the bench's own tests and measures where one bench process
//! saturates (`shardline bench fake-server`, see README).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How the fake behaves.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FakeConfig {
    /// Delay before the first token, in milliseconds.
    #[arg(long, env = "SHARDLINE_FAKE_TTFT_MS", default_value_t = 0)]
    pub ttft_ms: u64,
    /// Delay between tokens, in milliseconds.
    #[arg(long, env = "SHARDLINE_FAKE_ITL_MS", default_value_t = 0)]
    pub itl_ms: u64,
    /// Answer every Nth request with HTTP 429 (0 = never).
    #[arg(long, env = "SHARDLINE_FAKE_REJECT_EVERY", default_value_t = 0)]
    pub reject_every: u64,
}

struct FakeState {
    cfg: FakeConfig,
    requests: AtomicU64,
}

/// Serve the fake on `listener` until `shutdown`.
pub async fn serve_fake(
    listener: TcpListener,
    cfg: FakeConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let state = Arc::new(FakeState {
        cfg,
        requests: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/v1/completions", post(complete))
        .route("/v1/chat/completions", post(complete))
        .route(
            "/v1/models",
            get(|| async {
                axum::Json(json!({"object": "list", "data": [{"id": "fake", "object": "model"}]}))
            }),
        )
        .route("/metrics", get(metrics))
        .with_state(state);
    // Without TCP_NODELAY, Nagle + delayed ACKs hold small SSE writes back ~40 ms.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Bind `127.0.0.1:0`, serve in the background; returns the address.
pub async fn spawn_fake(
    cfg: FakeConfig,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = serve_fake(listener, cfg, shutdown).await {
            tracing::error!("fake server: {e}");
        }
    });
    Ok(addr)
}

async fn metrics(State(s): State<Arc<FakeState>>) -> String {
    let n = s.requests.load(Ordering::Relaxed);
    format!(
        "# TYPE shardline_kv_cache_usage_perc gauge\nshardline_kv_cache_usage_perc{{group=\"fake\"}} 0.5\n\
         shardline_num_requests_running{{group=\"fake\"}} 1\nshardline_batch_size_sum {}\nshardline_batch_size_count {}\n",
        n * 2,
        n
    )
}

async fn complete(
    State(s): State<Arc<FakeState>>,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    let n = s.requests.fetch_add(1, Ordering::Relaxed) + 1;
    if s.cfg.reject_every > 0 && n % s.cfg.reject_every == 0 {
        let err = json!({"error": {"message": "over capacity", "type": "rate_limit", "code": 429}});
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "1")],
            axum::Json(err),
        )
            .into_response();
    }
    let chat = body.get("messages").is_some();
    let max_tokens = body
        .get("max_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(16)
        .max(1);
    let prompt_tokens = body
        .get("prompt")
        .and_then(Value::as_str)
        .map_or(1, |p| p.split_whitespace().count());
    let chunk = move |i: u64| {
        let choice = if chat {
            json!({"index": 0, "delta": {"content": format!(" t{i}")}, "finish_reason": Value::Null})
        } else {
            json!({"index": 0, "text": format!(" t{i}"), "finish_reason": Value::Null})
        };
        format!(
            "data: {}\n\n",
            json!({"id": "fake", "object": "chunk", "model": "fake", "choices": [choice]})
        )
    };
    if body.get("stream").and_then(Value::as_bool) != Some(true) {
        let text: String = (0..max_tokens).map(|i| format!(" t{i}")).collect();
        return axum::Json(
            json!({"choices": [{"index": 0, "text": text, "finish_reason": "length"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens}}),
        )
        .into_response();
    }
    let (ttft, itl) = (
        Duration::from_millis(s.cfg.ttft_ms),
        Duration::from_millis(s.cfg.itl_ms),
    );
    let stream = futures::stream::unfold(0u64, move |i| async move {
        let text = match i {
            i if i < max_tokens => {
                let delay = if i == 0 { ttft } else { itl };
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                chunk(i)
            }
            i if i == max_tokens => format!(
                "data: {}\n\ndata: [DONE]\n\n",
                json!({"id": "fake", "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens}})
            ),
            _ => return None,
        };
        Some((Ok::<_, std::io::Error>(text), i + 1))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
