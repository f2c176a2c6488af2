//! The dynamic set of worker groups. A group is added by address (today from
//! `--worker`, later from the etcd watch) and removed the same way. Each group gets a
//! lifecycle task: connect with backoff, fetch `Info` (tokenizer, chat template, KV
//! geometry), run a scheduler, and when that scheduler fails hand its requests to
//! another group (migration) and reconnect.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use shardline_constraint::ConstraintCompiler;
use shardline_proto::worker::v1::worker_client::WorkerClient;
use shardline_proto::worker::v1::{HealthRequest, InfoRequest};
use tokenizers::Tokenizer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::chat_template::ChatTemplate;
use crate::config::Config;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::queue::Limits;
use crate::request::{Entry, SeqEvent};
use crate::router::{self, Affinity, Candidate, Costed, PrefixIndex, Routing};
use crate::scheduler::{self, SchedulerHandle, SchedulerTask};

/// A request moves to another group at most this often before it fails with 503.
pub const MAX_MIGRATIONS: u32 = 3;

/// What the coordinator learns about the model from a worker's `Info`.
pub struct ModelInfo {
    pub model_id: String,
    pub tokenizer: Tokenizer,
    pub chat_template: ChatTemplate,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub add_bos: bool,
    pub context_length: usize,
    pub block_size: u32,
    pub total_blocks: u32,
    pub max_num_seqs: u32,
    /// Width of the model's logits (token ids below it are valid).
    pub vocab_size: usize,
    /// What decides the group's arithmetic: the model, its weights' element type and its
    /// KV cache's. Groups that agree compute the same tokens for the same sequence, so a
    /// request that moves keeps its text byte-identical only between them.
    pub numerics: Arc<str>,
    /// Compiles structured-output constraints to validate requests; `Err` says why this
    /// model's tokenizer cannot (its requests for structured outputs get a 400).
    pub constraints: Result<ConstraintCompiler, String>,
}

impl std::fmt::Debug for ModelInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelInfo")
            .field("model_id", &self.model_id)
            .field("context_length", &self.context_length)
            .finish()
    }
}

/// A ready group.
#[derive(Debug, Clone)]
pub struct Group {
    /// Address it was added under (the set's key).
    pub key: String,
    /// The worker's own group id (metric label).
    pub id: String,
    pub info: Arc<ModelInfo>,
    pub handle: SchedulerHandle,
}

/// Why connecting to a worker failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid worker address {0}: {1}")]
    Address(String, String),
    #[error("connect: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("Info RPC: {0}")]
    Info(#[from] tonic::Status),
    #[error("worker sent an unusable tokenizer: {0}")]
    Tokenizer(String),
    #[error("worker sent an unusable chat template: {0}")]
    Template(String),
    #[error("Health RPC: {0}")]
    Health(tonic::Status),
    /// The worker answers but must not get requests: draining, or its engine failed.
    #[error("worker is not ready: {0}")]
    NotReady(String),
}

/// What the group set knows, under one lock: routing reads the ready groups, the
/// draining marks and the affinity table together, so one lock keeps them consistent
/// (and never taken in two orders). Held only for map operations, never across an await.
#[derive(Default)]
struct State {
    /// Every added group's lifecycle token, by address.
    slots: HashMap<String, CancellationToken>,
    ready: HashMap<String, Group>,
    affinity: Affinity,
    /// What each group probably caches (`--routing prefix`).
    prefix: PrefixIndex,
    /// Addresses of groups that take no new requests (membership says DRAINING).
    draining: HashSet<String>,
}

struct Inner {
    config: Arc<Config>,
    metrics: Metrics,
    state: Mutex<State>,
    ready_tx: watch::Sender<usize>,
    /// Bumped per routed request: rotates the router's last tie-break.
    turn: AtomicUsize,
    shutdown: CancellationToken,
}

/// Cloneable handle to the group set.
#[derive(Clone)]
pub struct GroupSet {
    inner: Arc<Inner>,
}

impl GroupSet {
    pub fn new(config: Arc<Config>, metrics: Metrics, shutdown: CancellationToken) -> GroupSet {
        let (ready_tx, _) = watch::channel(0);
        GroupSet {
            inner: Arc::new(Inner {
                config,
                metrics,
                state: Mutex::default(),
                ready_tx,
                turn: AtomicUsize::new(0),
                shutdown,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .expect("lock poisoned; this is a bug")
    }

    /// Starts serving the group at `address` (idempotent).
    pub fn add(&self, address: &str) {
        self.add_with(address, true)
    }

    /// Like [`Self::add`]. With `reconnect` false a group whose step fails stays gone
    /// until added again (membership from etcd: it comes back by re-registering).
    pub fn add_with(&self, address: &str, reconnect: bool) {
        let mut state = self.state();
        if state.slots.contains_key(address) {
            return;
        }
        let token = self.inner.shutdown.child_token();
        state.slots.insert(address.to_string(), token.clone());
        drop(state);
        tokio::spawn(lifecycle(
            self.clone(),
            address.to_string(),
            token,
            reconnect,
        ));
    }

    /// Stops using the group at `address`; its requests continue on other groups.
    pub fn remove(&self, address: &str) {
        let token = self.state().slots.remove(address);
        if let Some(token) = token {
            token.cancel();
        }
    }

    /// Addresses of every added group (ready or still connecting).
    pub fn addresses(&self) -> Vec<String> {
        self.state().slots.keys().cloned().collect()
    }

    /// Marks the group at `address` as draining (no new requests are routed there; its
    /// queued and running ones stay) or not.
    pub fn set_draining(&self, address: &str, draining: bool) {
        let mut state = self.state();
        if draining {
            state.draining.insert(address.to_string());
        } else {
            state.draining.remove(address);
        }
    }

    pub fn is_draining(&self, address: &str) -> bool {
        self.state().draining.contains(address)
    }

    /// Number of ready groups, observable.
    pub fn ready_count(&self) -> watch::Receiver<usize> {
        self.inner.ready_tx.subscribe()
    }

    pub fn ready_groups(&self) -> Vec<Group> {
        self.state().ready.values().cloned().collect()
    }

    /// The model as a ready group describes it.
    pub fn model(&self) -> Result<Arc<ModelInfo>, ApiError> {
        let state = self.state();
        let mut groups: Vec<&Group> = state.ready.values().collect();
        groups.sort_by(|a, b| a.key.cmp(&b.key));
        groups.first().map(|g| g.info.clone()).ok_or_else(no_group)
    }

    /// This coordinator's load over its ready groups (the endpoint picker's gauges).
    pub fn totals(&self) -> crate::metrics::Totals {
        let state = self.state();
        let mut t = crate::metrics::Totals::default();
        for g in state.ready.values() {
            let load = &g.handle.load;
            let total = i64::from(g.info.total_blocks);
            t.waiting += load.waiting.load(Ordering::Relaxed);
            t.running += load.running.load(Ordering::Relaxed);
            t.kv_blocks_total += total;
            t.kv_blocks_used += (total - load.kv_blocks_free.load(Ordering::Relaxed)).max(0);
            t.block_size = g.info.block_size;
        }
        t
    }

    /// Requests queued in all groups.
    pub fn total_waiting(&self) -> i64 {
        self.state()
            .ready
            .values()
            .map(|g| g.handle.load.waiting.load(Ordering::Relaxed))
            .sum()
    }

    /// Whether some ready group can still take `blocks` more KV demand within `ratio`
    /// times its cache (reserved + queued + this request).
    pub fn kv_room(&self, blocks: u32, ratio: f64) -> bool {
        let state = self.state();
        // No group at all is a different error (503), reported by the caller.
        state.ready.is_empty()
            || state.ready.values().any(|g| {
                let load = &g.handle.load;
                let total = load.total_blocks.load(Ordering::Relaxed) as f64;
                let demand = total - load.free_capacity() as f64 + blocks as f64;
                demand <= total * ratio
            })
    }

    /// Routes and queues a request.
    pub fn submit(&self, mut entry: Entry) -> Result<(), ApiError> {
        for _ in 0..4 {
            let group = self.route(&entry).ok_or_else(no_group)?;
            if entry.numerics.is_none() {
                entry.numerics = Some(group.info.numerics.clone());
            }
            match group.handle.submit(entry) {
                Ok(()) => return Ok(()),
                Err(back) => entry = back, // that scheduler just stopped; pick again
            }
        }
        Err(no_group())
    }

    fn route(&self, entry: &Entry) -> Option<Group> {
        let mut state = self.state();
        let State {
            ready,
            affinity,
            prefix,
            draining,
            ..
        } = &mut *state;
        let mut groups: Vec<&Group> = ready
            .values()
            .filter(|g| !draining.contains(&g.key))
            .collect();
        // A request that already ran somewhere continues where the arithmetic is the
        // same, so its text stays what it would have been; elsewhere only when no such
        // group is left (a different continuation beats a failed request).
        if let Some(numerics) = &entry.numerics
            && !groups.is_empty()
        {
            let same: Vec<&Group> = groups
                .iter()
                .copied()
                .filter(|g| g.info.numerics == *numerics)
                .collect();
            if same.is_empty() {
                tracing::warn!(
                    request_id = %entry.request.id,
                    was = %numerics,
                    "no group left computes like the one this request started on; it continues on another (its text may differ from an uninterrupted run)"
                );
            } else {
                groups = same;
            }
        }
        // A stable order, so that taking turns visits every group.
        groups.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        let block_size = groups.first()?.info.block_size;
        let turn = self.inner.turn.fetch_add(1, Ordering::Relaxed);
        let config = &self.inner.config;
        if config.routing == Routing::Prefix {
            let prompt = &entry.request.prompt;
            let hashes = router::block_hashes(prompt, block_size);
            let prompt_blocks = prompt.len().div_ceil(block_size.max(1) as usize) as i64;
            let candidates: Vec<Costed> = groups
                .iter()
                .map(|g| {
                    let load = &g.handle.load;
                    Costed {
                        key: g.key.clone(),
                        prefill_blocks: prompt_blocks - prefix.matched(&g.key, &hashes) as i64,
                        load_blocks: load.total_blocks.load(Ordering::Relaxed)
                            - load.free_capacity(),
                        active: load.waiting.load(Ordering::Relaxed)
                            + load.running.load(Ordering::Relaxed),
                    }
                })
                .collect();
            let chosen = router::pick_by_cost(&candidates, config.route_prefix_weight, turn)?;
            let g = groups[chosen];
            prefix.record(&g.key, &hashes, g.info.total_blocks as usize);
            return Some(g.clone());
        }
        let candidates: Vec<Candidate> = groups
            .iter()
            .map(|g| Candidate {
                key: g.key.clone(),
                free: g.handle.load.free_capacity(),
                total: g.info.total_blocks as i64,
                active: g.handle.load.waiting.load(Ordering::Relaxed)
                    + g.handle.load.running.load(Ordering::Relaxed),
            })
            .collect();
        let hash = router::prefix_hash(&entry.request.prompt, block_size);
        let chosen = router::pick(&candidates, affinity.get(hash), turn)?;
        affinity.record(hash, &groups[chosen].key);
        Some(groups[chosen].clone())
    }

    /// Continues requests of a failed or removed group elsewhere; `why` the group went
    /// goes into each request's trace.
    fn migrate(&self, group_id: &str, why: &str, entries: Vec<Entry>) {
        for mut entry in entries {
            if entry.is_cancelled() {
                continue;
            }
            entry.phases.end(Some("migrated"));
            entry.migrations += 1;
            entry.request.span.record("migrations", entry.migrations);
            if entry.migrations > MAX_MIGRATIONS {
                entry
                    .out
                    .send(SeqEvent::Error(ApiError::Unavailable(format!(
                        "request failed on {MAX_MIGRATIONS} worker groups in a row"
                    ))));
                continue;
            }
            self.inner
                .metrics
                .migrations
                .with_label_values(&[group_id])
                .inc();
            // In the request's span: its trace shows the migration, the log line its ids.
            tracing::info!(
                parent: &entry.request.span,
                from = %group_id,
                reason = why,
                migration = entry.migrations,
                tokens_sent = entry.generated.len(),
                "migrating a request to another group"
            );
            entry.seq_id = crate::request::next_seq_id();
            let tx = entry.out.sender();
            if let Err(e) = self.submit(entry) {
                let _ = tx.send(SeqEvent::Error(e));
            }
        }
    }

    fn set_ready(&self, group: Option<Group>, key: &str) {
        let mut state = self.state();
        match group {
            Some(g) => state.ready.insert(key.to_string(), g),
            None => {
                // A group that comes back starts with an empty prefix cache.
                state.prefix.forget(key);
                state.ready.remove(key)
            }
        };
        self.inner.ready_tx.send_replace(state.ready.len());
    }
}

fn no_group() -> ApiError {
    ApiError::Unavailable("no worker group is ready".into())
}

/// Normalises `host:port` to `http://host:port`.
pub fn worker_url(address: &str) -> String {
    if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    }
}

/// Connects to the worker at `address`; with `tls`, over mutual TLS, the worker's
/// certificate checked against the host of `address` (what etcd or `--worker` said).
async fn connect(
    address: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<(WorkerClient<Channel>, ModelInfo, String), ConnectError> {
    let url = worker_url(address);
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| ConnectError::Address(address.to_string(), e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let channel = match tls {
        None => endpoint.connect().await?,
        Some(tls) => {
            let uri = endpoint.uri().clone();
            let host = uri
                .host()
                .ok_or_else(|| ConnectError::Address(address.to_string(), "no host".into()))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(80);
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| ConnectError::Address(address.to_string(), e.to_string()))?;
            let connector = tokio_rustls::TlsConnector::from(tls);
            endpoint
                .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                    let (connector, name, host) = (connector.clone(), name.clone(), host.clone());
                    async move {
                        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                        tcp.set_nodelay(true)?;
                        let tls = connector.connect(name, tcp).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
                    }
                }))
                .await?
        }
    };
    let mut client = WorkerClient::new(channel)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    let info = client.info(InfoRequest {}).await?.into_inner();
    // A worker whose engine failed still answers Info; it gets no requests until its
    // Health says it is ready (it may be on its way out of the membership).
    let health = client
        .health(HealthRequest {})
        .await
        .map_err(ConnectError::Health)?
        .into_inner();
    if !health.ready {
        return Err(ConnectError::NotReady(health.message));
    }
    let tokenizer: Tokenizer = info
        .tokenizer_json
        .parse()
        .map_err(|e: tokenizers::Error| ConnectError::Tokenizer(e.to_string()))?;
    let chat_template = ChatTemplate::new(
        &info.chat_template,
        Some(&info.bos_token),
        Some(&info.eos_token),
    )
    .map_err(|e| ConnectError::Template(e.to_string()))?;
    let bos_token_id = (!info.bos_token.is_empty())
        .then(|| tokenizer.token_to_id(&info.bos_token))
        .flatten();
    // Walking the vocabulary takes a moment: off the runtime's threads.
    let (json, eos, vocab) = (
        info.tokenizer_json.clone(),
        info.eos_token_ids.clone(),
        (info.vocab_size as usize).max(tokenizer.get_vocab_size(true)),
    );
    let constraints = tokio::task::spawn_blocking(move || {
        ConstraintCompiler::new(&json, &eos, vocab).map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(format!("building the constraint compiler failed: {e}")));
    if let Err(e) = &constraints {
        tracing::warn!(worker = %address, error = %e, "structured outputs unavailable for this model");
    }
    let group_id = if info.group_id.is_empty() {
        address.to_string()
    } else {
        info.group_id.clone()
    };
    let numerics = format!(
        "{} (weights {}, KV cache {})",
        info.model_id, info.dtype, info.kv_cache_dtype
    );
    let model = ModelInfo {
        numerics: numerics.into(),
        model_id: info.model_id,
        tokenizer,
        chat_template,
        eos_token_ids: info.eos_token_ids,
        bos_token_id,
        add_bos: info.add_bos,
        context_length: info.context_length as usize,
        block_size: info.kv_block_size.max(1),
        total_blocks: info.kv_blocks_total,
        max_num_seqs: info.max_num_seqs,
        vocab_size: vocab,
        constraints,
    };
    Ok((client, model, group_id))
}

async fn lifecycle(set: GroupSet, address: String, token: CancellationToken, reconnect: bool) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let connected = tokio::select! {
            _ = token.cancelled() => return,
            c = connect(&address, set.inner.config.worker_tls.clone()) => c,
        };
        let (client, info, id) = match connected {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(worker = %address, error = %e, retry_in = ?backoff, "worker not reachable yet");
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let config = &set.inner.config;
        let limits = Limits {
            max_num_seqs: match info.max_num_seqs as usize {
                0 => config.max_num_seqs,
                n => n.min(config.max_num_seqs),
            },
            max_batched_tokens: config.max_num_batched_tokens,
            block_size: info.block_size,
            context_length: info.context_length,
            // A worker that does not report its KV size is not budgeted here.
            total_blocks: if info.total_blocks == 0 {
                u32::MAX / 2
            } else {
                info.total_blocks
            },
            kv_admission: config.kv_admission,
            watermark_blocks: (f64::from(info.total_blocks) * config.kv_watermark).ceil() as u32,
        };
        let scheduler_token = token.child_token();
        let (handle, join) = scheduler::spawn(SchedulerTask {
            group: id.clone(),
            limits,
            client,
            metrics: set.inner.metrics.clone(),
            step_timeout: config.step_timeout,
            cancel: scheduler_token.clone(),
        });
        tracing::info!(worker = %address, group = %id, model = %info.model_id, "worker group ready");
        // The group's migration counter exists (at zero) before its first migration.
        let _ = set
            .inner
            .metrics
            .migrations
            .with_label_values(&[id.as_str()]);
        set.set_ready(
            Some(Group {
                key: address.clone(),
                id: id.clone(),
                info: Arc::new(info),
                handle,
            }),
            &address,
        );
        let (leftover, error) = join.await.unwrap_or_default();
        set.set_ready(None, &address);
        match &error {
            Some(e) => {
                tracing::error!(worker = %address, group = %id, error = %e, requests = leftover.len(), "worker group failed; migrating its requests")
            }
            None => tracing::info!(worker = %address, group = %id, "worker group removed"),
        }
        if set.inner.shutdown.is_cancelled() {
            for mut entry in leftover {
                entry.out.send(SeqEvent::Error(ApiError::Unavailable(
                    "coordinator shutting down".into(),
                )));
            }
            return;
        }
        let why = match &error {
            Some(e) => e.to_string(),
            None => "the group was removed".to_string(),
        };
        set.migrate(&id, &why, leftover);
        if token.is_cancelled() {
            return; // `remove` already forgot the slot
        }
        if !reconnect {
            // Forget our slot so a later `add` starts afresh (nobody else could have
            // added this address while the slot existed).
            set.state().slots.remove(&address);
            return;
        }
    }
}
