//! The gRPC front end: `shardline.v1.Inference` (`Generate`, `GenerateStream`), the
//! standard health service (serving while at least one group is ready) and server
//! reflection. Streams are fed by a spawned task through a bounded channel, so a failed
//! send means the client left; the task then drops its generation, which releases the
//! sequence on the worker.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use shardline_proto::v1::inference_server::{Inference, InferenceServer};
use shardline_proto::v1::{
    FinishReason, GenerateRequest, GenerateResponse, GenerateStreamResponse,
    Priority as PbPriority, TokenInfo, Usage,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::chat_template::Message;
use crate::error::ApiError;
use crate::generation::{self, Chunk, TokenOut};
use crate::keys::{self, Keys, Tenant};
use crate::request::{Finish, Priority};
use crate::service::{Service, request_id};
use crate::validate::{ChatInput, GenerateParams, Input};

/// The `shardline.v1.Inference` implementation.
pub struct InferenceService {
    service: Service,
}

fn finish_pb(f: Option<Finish>) -> i32 {
    match f {
        None => FinishReason::Unspecified as i32,
        Some(Finish::Stop) => FinishReason::Stop as i32,
        Some(Finish::Length) => FinishReason::Length as i32,
    }
}

fn usage_pb(u: generation::Usage) -> Usage {
    Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        total_tokens: u.total(),
        cached_tokens: u.cached_tokens,
    }
}

fn tokens_pb(tokens: &[TokenOut]) -> Vec<TokenInfo> {
    tokens
        .iter()
        .map(|t| TokenInfo {
            id: t.id,
            text: t.text.clone(),
            logprob: t.logprob.unwrap_or(0.0),
        })
        .collect()
}

fn params(r: GenerateRequest) -> Result<GenerateParams, ApiError> {
    let input = match (r.prompt.is_empty(), r.messages.is_empty()) {
        (false, true) => Input::Text(r.prompt),
        (true, false) => Input::Chat(ChatInput::new(
            r.messages
                .into_iter()
                .map(|m| Message::new(m.role, m.content))
                .collect(),
        )),
        (true, true) => {
            return Err(ApiError::invalid(
                "prompt",
                "one of `prompt` or `messages` is required",
            ));
        }
        (false, false) => {
            return Err(ApiError::invalid(
                "messages",
                "give `prompt` or `messages`, not both",
            ));
        }
    };
    let priority = match PbPriority::try_from(r.priority) {
        Ok(PbPriority::High) => Priority::High,
        Ok(PbPriority::Low) => Priority::Low,
        Ok(_) => Priority::Normal,
        Err(_) => {
            return Err(ApiError::invalid(
                "priority",
                format!("unknown priority {}", r.priority),
            ));
        }
    };
    Ok(GenerateParams {
        model: Some(r.model).filter(|m| !m.is_empty()),
        input: Some(input),
        max_tokens: r.max_tokens.map(i64::from),
        max_tokens_field: "max_tokens",
        temperature: r.temperature.map(f64::from),
        top_p: r.top_p.map(f64::from),
        top_k: r.top_k.map(i64::from),
        min_p: r.min_p.map(f64::from),
        seed: r.seed,
        stop: r.stop,
        presence_penalty: r.presence_penalty.map(f64::from),
        frequency_penalty: r.frequency_penalty.map(f64::from),
        repetition_penalty: r.repetition_penalty.map(f64::from),
        logprobs: (r.logprobs || r.top_logprobs > 0).then_some(i64::from(r.top_logprobs)),
        echo: false,
        ignore_eos: r.ignore_eos,
        min_tokens: Some(i64::from(r.min_tokens)),
        n: None,
        priority,
        timeout: (r.timeout_ns > 0).then(|| Duration::from_nanos(r.timeout_ns)),
        logit_bias: Vec::new(),
        structured: None,
    })
}

impl InferenceService {
    /// Starts a request in its own span (continuing the client's `traceparent` metadata);
    /// the generation and the trace id for the response metadata.
    fn start(
        &self,
        method: &str,
        request: Request<GenerateRequest>,
    ) -> Result<(generation::Generation, Option<String>), Status> {
        let span = crate::trace::request_span(method, "grpc");
        let trace_id = crate::trace::continue_trace(&span, |k| {
            request
                .metadata()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        });
        span.in_scope(|| self.start_in(request))
            .map(|generation| (generation, trace_id))
            .inspect_err(|status| {
                span.record("otel.status_code", "ERROR");
                span.record("error", status.message());
            })
    }

    fn start_in(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<generation::Generation, Status> {
        let keyed = request.extensions().get::<Arc<Tenant>>().cloned();
        let metadata_tenant = request
            .metadata()
            .get("x-shardline-tenant")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let r = request.into_inner();
        let tenant = if self.service.config.keys.enabled() {
            // The interceptor put it there; without it the request is refused, not served
            // open.
            Some(keyed.ok_or_else(|| ApiError::Unauthorized.to_status())?)
        } else {
            let named = Some(r.tenant.clone())
                .filter(|t| !t.is_empty())
                .or(metadata_tenant)
                .or_else(|| Some(r.user.clone()).filter(|u| !u.is_empty()));
            crate::http::client_tenant(&self.service.config, named)
        };
        let params = params(r).map_err(|e| e.to_status())?;
        self.service
            .start(request_id("gen"), params, tenant.as_deref())
            .map_err(|e| e.to_status())
    }
}

type StreamOf<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for InferenceService {
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let (generation, trace_id) = self.start("shardline.v1.Inference/Generate", request)?;
        let id = generation.request.id.clone();
        let out = generation.collect().await.map_err(|e| e.to_status())?;
        Ok(with_trace_id(
            Response::new(GenerateResponse {
                id,
                text: out.text,
                finish_reason: finish_pb(out.finish),
                usage: Some(usage_pb(out.usage)),
                tokens: tokens_pb(&out.tokens),
            }),
            trace_id,
        ))
    }

    type GenerateStreamStream = StreamOf<GenerateStreamResponse>;

    async fn generate_stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let (mut generation, trace_id) =
            self.start("shardline.v1.Inference/GenerateStream", request)?;
        let id = generation.request.id.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    // Client gone: stop waiting for tokens; dropping `generation` releases it.
                    _ = tx.closed() => return,
                    next = generation.next() => match next {
                        None => return,
                        Some(Err(e)) => Err(e.to_status()),
                        Some(Ok(Chunk { text, tokens, finish })) => Ok(GenerateStreamResponse {
                            id: id.clone(),
                            text,
                            tokens: tokens_pb(&tokens),
                            finish_reason: finish_pb(finish),
                            usage: finish.map(|_| usage_pb(generation.usage())),
                        }),
                    },
                };
                if tx.send(message).await.is_err() {
                    return;
                }
            }
        });
        Ok(with_trace_id(
            Response::new(Box::pin(ReceiverStream::new(rx))),
            trace_id,
        ))
    }
}

/// The interceptor of every keyed gRPC service: with keys configured, the `authorization:
/// Bearer <key>` metadata must name a tenant (UNAUTHENTICATED otherwise), which travels
/// on in the request's extensions.
pub fn key_check(keys: Keys) -> impl tonic::service::Interceptor + Clone {
    move |mut request: Request<()>| {
        let Some(set) = keys.current() else {
            return Ok(request);
        };
        let metadata = |name| request.metadata().get(name).and_then(|v| v.to_str().ok());
        let tenant = keys::authenticate(
            &set,
            metadata("authorization"),
            metadata("x-shardline-tenant"),
        )
        .map_err(|e| e.to_status())?;
        request.extensions_mut().insert(tenant);
        Ok(request)
    }
}

/// Names the request's trace in the response metadata (`x-trace-id`).
fn with_trace_id<T>(mut response: Response<T>, trace_id: Option<String>) -> Response<T> {
    if let Some(id) = trace_id.and_then(|id| id.parse().ok()) {
        response
            .metadata_mut()
            .insert(crate::trace::TRACE_ID_HEADER, id);
    }
    response
}

/// Serves gRPC on `listener` until `shutdown`: inference, health and reflection, over
/// the connections [`crate::listen`] accepts (TLS when configured; h2c otherwise).
pub async fn serve(
    listener: TcpListener,
    service: Service,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(shardline_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor set is valid; this is a bug");
    let mut ready = service.groups.ready_count();
    let token = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let serving = *ready.borrow_and_update() > 0;
            let status = if serving {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            reporter.set_service_status("", status).await;
            reporter
                .set_service_status("shardline.v1.Inference", status)
                .await;
            tokio::select! {
                _ = token.cancelled() => return,
                changed = ready.changed() => if changed.is_err() { return },
            }
        }
    });
    let service_limits = service.config.server.clone();
    let tls = service.config.tls.clone();
    let check = key_check(service.config.keys.clone());
    let inference = InferenceServer::with_interceptor(InferenceService { service }, check.clone());
    // Reflection describes the API: it needs a key too. Health is for probes: open.
    let reflection = InterceptedService::new(reflection, check);
    let limits = service_limits.clone();
    let incoming = crate::listen::incoming(listener, tls, limits.conn(), "grpc", shutdown.clone());
    tonic::transport::Server::builder()
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .http2_max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .add_service(health)
        .add_service(reflection)
        .add_service(inference)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
}
