//! The front-end-neutral entry point: validate → admit → route → queue, returning a
//! [`Generation`] to stream from. HTTP and gRPC both go through [`Service::start`].

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::admission::Admission;
use crate::config::{Config, KvAdmission};
use crate::error::ApiError;
use crate::generation::Generation;
use crate::groups::GroupSet;
use crate::metrics::Metrics;
use crate::request::Entry;
use crate::validate::{GenerateParams, validate};

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
        tenant: Option<&str>,
    ) -> Result<Generation, ApiError> {
        let model = self.groups.model().inspect_err(|_| {
            self.metrics.rejected.with_label_values(&["no_group"]).inc();
        })?;
        let request = validate(id, params, &self.config, &model).inspect_err(|_| {
            self.metrics.rejected.with_label_values(&["invalid"]).inc();
        })?;
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
        let permit = self.admission.admit(tenant, blocks as u32)?;
        tracing::debug!(
            id = %request.id,
            prompt_tokens = request.prompt.len(),
            max_tokens = request.max_tokens,
            priority = ?request.priority,
            tenant = tenant.unwrap_or(""),
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
