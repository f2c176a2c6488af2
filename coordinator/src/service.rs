//! The front-end-neutral entry point: validate → admit → route → queue, returning a
//! [`Generation`] to stream from. HTTP and gRPC both go through [`Service::start`].

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::admission::Admission;
use crate::config::{Config, KvAdmission};
use crate::error::ApiError;
use crate::generation::Generation;
use crate::groups::GroupSet;
use crate::keys::Tenant;
use crate::metrics::Metrics;
use crate::request::Entry;
use crate::request::Priority;
use crate::validate::{GenerateParams, served_name, validate};

/// Shared state of the front ends.
#[derive(Clone)]
pub struct Service {
    pub config: Arc<Config>,
    pub groups: GroupSet,
    pub admission: Admission,
    pub metrics: Metrics,
}

/// A random request id with a prefix (`cmpl-…`, `chatcmpl-…`).
pub fn request_id(prefix: &str) -> String {
    format!(
        "{prefix}-{:016x}{:08x}",
        rand::random::<u64>(),
        rand::random::<u32>()
    )
}

impl Service {
    pub fn new(config: Arc<Config>, groups: GroupSet, metrics: Metrics) -> Service {
        let admission = Admission::new(config.clone(), groups.clone());
        Service {
            config,
            groups,
            admission,
            metrics,
        }
    }

    /// Starts a request of one choice; errors are immediate (bad input, over a limit, no
    /// group).
    ///
    /// The current span is the request's (the front ends open it, see [`crate::trace`]):
    /// validation and admission are its children, and the request keeps it to the end.
    pub fn start(
        &self,
        id: String,
        mut params: GenerateParams,
        tenant: Option<&Tenant>,
    ) -> Result<Generation, ApiError> {
        params.n = None;
        let mut all = self.start_choices(id, params, tenant)?;
        Ok(all.remove(0))
    }

    /// Starts a request's `n` choices (one generation each, in choice order). Choice `i`
    /// samples with seed `seed + i` (vLLM's rule), so a seeded request is reproducible
    /// choice by choice. All choices are admitted together or none is; the first is
    /// queued now, the others once its prompt is computed (see [`Generation::follow`]).
    pub fn start_choices(
        &self,
        id: String,
        params: GenerateParams,
        tenant: Option<&Tenant>,
    ) -> Result<Vec<Generation>, ApiError> {
        let span = tracing::Span::current();
        span.record("request_id", id.as_str());
        span.record("tenant", tenant.map(|t| t.name.as_str()).unwrap_or(""));
        span.record("priority", params.priority.as_str());
        let result = self.start_in(id, params, tenant, &span);
        if let Err(e) = &result {
            span.record("otel.status_code", "ERROR");
            span.record("error", tracing::field::display(e));
        }
        result
    }

    fn start_in(
        &self,
        id: String,
        params: GenerateParams,
        tenant: Option<&Tenant>,
        span: &tracing::Span,
    ) -> Result<Vec<Generation>, ApiError> {
        let exporting = shardline_telemetry::exporting();
        let tenant_label = self.metrics.tenant_label(tenant.map(|t| t.name.as_str()));
        let priority = params.priority.as_str();
        let rejected = |reason: &str| {
            self.metrics
                .rejected
                .with_label_values(&[reason, &tenant_label, priority])
                .inc();
        };
        let model = self.groups.model().inspect_err(|_| rejected("no_group"))?;
        if let Some(tenant) = tenant {
            let names = [served_name(&self.config, &model), model.model_id.clone()];
            authorize(tenant, &params, &names).inspect_err(|_| rejected("forbidden"))?;
        }
        let validating = exporting.then(|| {
            tracing::info_span!(target: shardline_telemetry::TRACE_ONLY, "validate").entered()
        });
        let mut request = validate(id, params, &self.config, &model).inspect_err(|e| {
            rejected("invalid");
            if exporting {
                tracing::info!(error = %e, "invalid request");
            }
        })?;
        drop(validating);
        request.span = span.clone();
        request.tenant_label = tenant_label.clone();
        span.record("prompt_tokens", request.prompt.len());
        // What the request adds to a group's KV demand: its worst case, or on demand the
        // blocks its prompt fills (see `--kv-admission`).
        let blocks = match self.config.kv_admission {
            KvAdmission::WorstCase => shardline_proto::worker::kv_blocks_demand(
                request.prompt.len(),
                &request.params,
                model.context_length,
                model.block_size as usize,
            ),
            KvAdmission::OnDemand => {
                (request.prompt.len() + 1).div_ceil(model.block_size.max(1) as usize)
            }
        };
        let admitting = exporting.then(|| {
            tracing::info_span!(
                target: shardline_telemetry::TRACE_ONLY,
                "admission",
                kv_blocks = blocks,
                outcome = tracing::field::Empty,
                reason = tracing::field::Empty
            )
            .entered()
        });
        // The prompt is computed once (the other choices reuse its cached blocks): its
        // tokens are charged to the tenant with the first choice only.
        let prompt_tokens = request.prompt.len() as u32;
        let admitted = (0..request.n)
            .map(|i| {
                let charged = if i == 0 { prompt_tokens } else { 0 };
                self.admission.admit(tenant, charged, blocks as u32)
            })
            .collect::<Result<Vec<_>, _>>();
        if let Err(ApiError::Overloaded { reason, .. }) = &admitted {
            rejected(reason);
        }
        if let Some(admission) = &admitting {
            match &admitted {
                Ok(_) => {
                    admission.record("outcome", "admitted");
                }
                Err(e) => {
                    let reason = match e {
                        ApiError::Overloaded { reason, .. } => *reason,
                        _ => "error",
                    };
                    admission.record("outcome", "refused");
                    admission.record("reason", reason);
                    tracing::info!(reason, error = %e, "admission refused the request");
                }
            }
        }
        drop(admitting);
        let permits = admitted?;
        tracing::debug!(
            id = %request.id,
            prompt_tokens = request.prompt.len(),
            max_tokens = request.max_tokens,
            priority = ?request.priority,
            tenant = tenant.map(|t| t.name.as_str()).unwrap_or(""),
            "request admitted"
        );
        let mut generations: Vec<Generation> = Vec::with_capacity(permits.len());
        let mut leader = None;
        for (i, permit) in permits.into_iter().enumerate() {
            let mut choice = request.clone();
            if let Some(s) = &mut choice.params.sampling {
                s.seed = s.seed.wrapping_add(i as u64);
            }
            let choice = Arc::new(choice);
            let (tx, rx) = mpsc::unbounded_channel();
            let entry = Entry::new(choice.clone(), tx).stream_interval(self.config.stream_interval);
            let mut generation =
                Generation::new(choice, rx, model.clone(), self.metrics.clone(), permit);
            match &leader {
                None => {
                    self.groups.submit(entry)?;
                    if request.n > 1 {
                        leader = Some(generation.prefilled());
                    }
                }
                Some(prefilled) => {
                    generation.follow(entry, self.groups.clone(), prefilled.clone());
                }
            }
            generations.push(generation);
        }
        Ok(generations)
    }
}

/// What a tenant's key allows: the model and the priority class. `names` are the served
/// model's names (the served name, the model id); a request that names none of them is
/// left to validation's 404.
pub fn authorize(
    tenant: &Tenant,
    params: &GenerateParams,
    names: &[String],
) -> Result<(), ApiError> {
    let limits = &tenant.limits;
    let model = params
        .model
        .as_deref()
        .filter(|m| !m.is_empty())
        .unwrap_or(&names[0]);
    let served = names.iter().any(|n| n == model);
    if served && !limits.models.is_empty() && !limits.models.iter().any(|m| names.contains(m)) {
        return Err(ApiError::Forbidden(format!(
            "tenant `{}` may not use the model `{model}`",
            tenant.name
        )));
    }
    if params.priority < limits.max_priority {
        return Err(ApiError::Forbidden(format!(
            "tenant `{}` may not use priority `{}` (its highest is `{}`)",
            tenant.name,
            priority_name(params.priority),
            priority_name(limits.max_priority)
        )));
    }
    Ok(())
}

fn priority_name(p: Priority) -> &'static str {
    match p {
        Priority::High => "high",
        Priority::Normal => "normal",
        Priority::Low => "low",
    }
}
