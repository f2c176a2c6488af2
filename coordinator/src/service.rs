//! The front-end-neutral entry point: validate → admit → route → queue, returning a
//! [`Generation`] to stream from. HTTP and gRPC both go through [`Service::start`].

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::admission::Admission;
use crate::config::Config;
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
        let admission = Admission::new(config.clone(), groups.clone(), metrics.clone());
        Service {
            config,
            groups,
            admission,
            metrics,
        }
    }

    /// Starts a request; errors are immediate (bad input, over a limit, no group).
    pub fn start(
        &self,
        id: String,
        params: GenerateParams,
        tenant: Option<&Tenant>,
    ) -> Result<Generation, ApiError> {
        let model = self.groups.model().inspect_err(|_| {
            self.metrics.rejected.with_label_values(&["no_group"]).inc();
        })?;
        if let Some(tenant) = tenant {
            let names = [served_name(&self.config, &model), model.model_id.clone()];
            authorize(tenant, &params, &names).inspect_err(|_| {
                self.metrics
                    .rejected
                    .with_label_values(&["forbidden"])
                    .inc();
            })?;
        }
        let request = validate(id, params, &self.config, &model).inspect_err(|_| {
            self.metrics.rejected.with_label_values(&["invalid"]).inc();
        })?;
        let blocks = shardline_proto::worker::kv_blocks_demand(
            request.prompt.len(),
            &request.params,
            model.context_length,
            model.block_size as usize,
        );
        let permit = self
            .admission
            .admit(tenant, request.prompt.len() as u32, blocks as u32)?;
        tracing::debug!(
            id = %request.id,
            prompt_tokens = request.prompt.len(),
            max_tokens = request.max_tokens,
            priority = ?request.priority,
            tenant = tenant.map(|t| t.name.as_str()).unwrap_or(""),
            "request admitted"
        );
        let request = Arc::new(request);
        let (tx, rx) = mpsc::unbounded_channel();
        self.groups.submit(Entry::new(request.clone(), tx))?;
        Ok(Generation::new(
            request,
            rx,
            model,
            self.metrics.clone(),
            permit,
        ))
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
