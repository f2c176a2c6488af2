//! Admission control, before anything is queued: global concurrency and queue-length
//! limits; per tenant (see [`crate::keys`]) concurrency, a request-rate token bucket and
//! a tokens-per-minute budget. A refusal is immediate
//! (429 / RESOURCE_EXHAUSTED with `Retry-After`); an admitted request holds a [`Permit`]
//! until it finishes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::Config;
use crate::error::ApiError;
use crate::groups::GroupSet;
use crate::keys::{Tenant, TenantLimits};

/// A classic token bucket: `rate` tokens per second, at most `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(burst: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token, or says how many seconds until one is there.
    pub fn take(&mut self, rate: f64, burst: f64, now: Instant) -> Result<(), f64> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err((1.0 - self.tokens) / rate)
        }
    }
}

/// Tokens per minute as a level that refills continuously up to one minute's worth and
/// may go into debt: a request is admitted while the level is positive and pays for its
/// prompt at once and for its generated tokens when it ends.
#[derive(Debug, Clone)]
struct TokenBudget {
    level: f64,
    last: Instant,
}

impl TokenBudget {
    fn refill(&mut self, per_minute: u64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.level = (self.level + elapsed * per_minute as f64 / 60.0).min(per_minute as f64);
    }

    /// Seconds until the level is positive again.
    fn wait(&self, per_minute: u64) -> f64 {
        (-self.level).max(0.0) / (per_minute as f64 / 60.0)
    }
}

#[derive(Debug)]
struct TenantState {
    bucket: TokenBucket,
    tokens: TokenBudget,
    active: usize,
}

impl TenantState {
    fn new(limits: &TenantLimits, now: Instant) -> TenantState {
        TenantState {
            bucket: TokenBucket::new(limits.burst, now),
            tokens: TokenBudget {
                level: limits.tokens_per_minute as f64,
                last: now,
            },
            active: 0,
        }
    }
}

/// Where a tenant stands against its limits, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitStatus {
    /// Requests per minute the rate allows (`None`: no request rate limit).
    pub limit_requests: Option<u64>,
    pub remaining_requests: u64,
    /// Seconds until the request bucket is full again.
    pub reset_requests_s: f64,
    /// Tokens per minute (`None`: no token limit).
    pub limit_tokens: Option<u64>,
    pub remaining_tokens: u64,
    /// Seconds until the token budget is full again.
    pub reset_tokens_s: f64,
}

struct Inner {
    config: Arc<Config>,
    groups: GroupSet,
    concurrent: AtomicUsize,
    /// By tenant name: survives key reloads, so in-flight requests keep counting.
    tenants: Mutex<HashMap<String, TenantState>>,
}

/// Cloneable admission controller.
#[derive(Clone)]
pub struct Admission {
    inner: Arc<Inner>,
}

/// Held by an admitted request; releases its slots when dropped.
pub struct Permit {
    inner: Arc<Inner>,
    /// The tenant whose slot and token budget this request holds.
    tenant: Option<String>,
    /// Generated tokens, charged to the tenant's token budget on drop.
    generated: u64,
}

impl Permit {
    /// Counts `n` generated tokens against the tenant's tokens per minute.
    pub fn generated(&mut self, n: u64) {
        self.generated += n;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.inner.concurrent.fetch_sub(1, Ordering::AcqRel);
        if let Some(t) = &self.tenant
            && let Some(state) = self
                .inner
                .tenants
                .lock()
                .expect("lock poisoned; this is a bug")
                .get_mut(t)
        {
            state.active = state.active.saturating_sub(1);
            state.tokens.level -= self.generated as f64;
        }
    }
}

impl Admission {
    pub fn new(config: Arc<Config>, groups: GroupSet) -> Admission {
        Admission {
            inner: Arc::new(Inner {
                config,
                groups,
                concurrent: AtomicUsize::new(0),
                tenants: Mutex::default(),
            }),
        }
    }

    pub fn concurrent(&self) -> usize {
        self.inner.concurrent.load(Ordering::Acquire)
    }

    /// A refusal; the caller counts it (it knows the request's tenant and priority).
    fn reject(&self, reason: &'static str, message: String, retry_after_s: u64) -> ApiError {
        ApiError::Overloaded {
            reason,
            message,
            retry_after_s: retry_after_s.max(1),
        }
    }

    /// Admits a request with `prompt_tokens` needing `kv_blocks`, for `tenant` (whose
    /// limits apply), or refuses it at once.
    pub fn admit(
        &self,
        tenant: Option<&Tenant>,
        prompt_tokens: u32,
        kv_blocks: u32,
    ) -> Result<Permit, ApiError> {
        let config = &self.inner.config;
        let previous = self.inner.concurrent.fetch_add(1, Ordering::AcqRel);
        // From here on the slot is taken: the permit gives it back on every path.
        let mut permit = Permit {
            inner: self.inner.clone(),
            tenant: None,
            generated: 0,
        };
        if previous >= config.max_concurrent_requests {
            return Err(self.reject(
                "max_concurrent_requests",
                format!(
                    "server busy: {} requests in flight (--max-concurrent-requests)",
                    config.max_concurrent_requests
                ),
                1,
            ));
        }
        if self.inner.groups.total_waiting() >= config.max_queued_requests as i64 {
            return Err(self.reject(
                "queue_full",
                format!(
                    "server busy: {} requests queued (--max-queued-requests)",
                    config.max_queued_requests
                ),
                1,
            ));
        }
        if !self
            .inner
            .groups
            .kv_room(kv_blocks, config.max_kv_demand_ratio)
        {
            return Err(self.reject(
                "kv_budget",
                format!(
                    "server busy: queued requests already want {}x the KV cache (--max-kv-demand-ratio)",
                    config.max_kv_demand_ratio
                ),
                1,
            ));
        }
        let Some(tenant) = tenant.filter(|t| !t.name.is_empty() && t.limits.counted()) else {
            return Ok(permit);
        };
        let limits = &tenant.limits;
        let name = tenant.name.as_str();
        let mut tenants = self
            .inner
            .tenants
            .lock()
            .expect("lock poisoned; this is a bug");
        if tenants.len() > 100_000 {
            tenants.retain(|_, t| t.active > 0);
        }
        let now = Instant::now();
        let state = tenants
            .entry(name.to_string())
            .or_insert_with(|| TenantState::new(limits, now));
        if limits.max_concurrent > 0 && state.active >= limits.max_concurrent {
            drop(tenants);
            return Err(self.reject(
                "tenant_concurrency",
                format!(
                    "tenant `{name}` has {} requests in flight (its limit)",
                    limits.max_concurrent
                ),
                1,
            ));
        }
        if limits.tokens_per_minute > 0 {
            state.tokens.refill(limits.tokens_per_minute, now);
            if state.tokens.level <= 0.0 {
                let wait = state.tokens.wait(limits.tokens_per_minute);
                drop(tenants);
                return Err(self.reject(
                    "tenant_tokens",
                    format!(
                        "tenant `{name}` is over its limit of {} tokens per minute",
                        limits.tokens_per_minute
                    ),
                    wait.ceil() as u64,
                ));
            }
        }
        if limits.requests_per_second > 0.0
            && let Err(wait) = state
                .bucket
                .take(limits.requests_per_second, limits.burst, now)
        {
            drop(tenants);
            return Err(self.reject(
                "tenant_rate",
                format!(
                    "tenant `{name}` is over its rate limit of {} requests/s",
                    limits.requests_per_second
                ),
                wait.ceil() as u64,
            ));
        }
        if limits.tokens_per_minute > 0 {
            state.tokens.level -= f64::from(prompt_tokens);
        }
        state.active += 1;
        drop(tenants);
        permit.tenant = Some(name.to_string());
        Ok(permit)
    }

    /// Where `tenant` stands against its request and token rates.
    pub fn status(&self, tenant: &Tenant) -> RateLimitStatus {
        let limits = &tenant.limits;
        let now = Instant::now();
        let mut tenants = self
            .inner
            .tenants
            .lock()
            .expect("lock poisoned; this is a bug");
        let state = tenants
            .entry(tenant.name.clone())
            .or_insert_with(|| TenantState::new(limits, now));
        let rate = limits.requests_per_second;
        let (remaining_requests, reset_requests_s) = if rate > 0.0 {
            let elapsed = now
                .saturating_duration_since(state.bucket.last)
                .as_secs_f64();
            let tokens = (state.bucket.tokens + elapsed * rate).min(limits.burst);
            (tokens.floor() as u64, (limits.burst - tokens) / rate)
        } else {
            (0, 0.0)
        };
        let tpm = limits.tokens_per_minute;
        let (remaining_tokens, reset_tokens_s) = if tpm > 0 {
            state.tokens.refill(tpm, now);
            (
                state.tokens.level.max(0.0) as u64,
                (tpm as f64 - state.tokens.level) / (tpm as f64 / 60.0),
            )
        } else {
            (0, 0.0)
        };
        RateLimitStatus {
            limit_requests: (rate > 0.0).then(|| (rate * 60.0).round() as u64),
            remaining_requests,
            reset_requests_s,
            limit_tokens: (tpm > 0).then_some(tpm),
            remaining_tokens,
            reset_tokens_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::metrics::Metrics;

    fn admission(config: Config) -> Admission {
        let config = Arc::new(config);
        let metrics = Metrics::new();
        let groups = GroupSet::new(
            config.clone(),
            metrics.clone(),
            tokio_util::sync::CancellationToken::new(),
        );
        Admission::new(config, groups)
    }

    #[test]
    fn concurrency_limit_is_released_by_dropping_the_permit() {
        let a = admission(Config {
            max_concurrent_requests: 2,
            ..Config::default()
        });
        let p1 = a.admit(None, 0, 0).unwrap();
        let _p2 = a.admit(None, 0, 0).unwrap();
        let e = a.admit(None, 0, 0).err().unwrap();
        assert!(matches!(
            e,
            ApiError::Overloaded {
                reason: "max_concurrent_requests",
                ..
            }
        ));
        assert_eq!(a.concurrent(), 2, "a refusal gives its slot back");
        drop(p1);
        assert!(a.admit(None, 0, 0).is_ok());
    }

    #[test]
    fn tenant_concurrency_is_per_tenant() {
        let a = admission(Config::default());
        let limits = TenantLimits {
            max_concurrent: 1,
            ..TenantLimits::default()
        };
        let (t1, t2) = (tenant("t1", limits.clone()), tenant("t2", limits));
        let p = a.admit(Some(&t1), 0, 0).unwrap();
        assert!(a.admit(Some(&t1), 0, 0).is_err());
        assert!(a.admit(Some(&t2), 0, 0).is_ok());
        drop(p);
        assert!(a.admit(Some(&t1), 0, 0).is_ok());
    }

    fn tenant(name: &str, limits: TenantLimits) -> Tenant {
        Tenant {
            name: name.into(),
            limits,
            trusted_gateway: false,
        }
    }

    #[test]
    fn tokens_per_minute_count_prompt_and_generated_tokens() {
        let a = admission(Config::default());
        let t = tenant(
            "t",
            TenantLimits {
                tokens_per_minute: 600,
                ..TenantLimits::default()
            },
        );
        let mut p = a.admit(Some(&t), 500, 0).unwrap();
        assert_eq!(a.status(&t).remaining_tokens, 100);
        p.generated(150);
        drop(p);
        let status = a.status(&t);
        assert_eq!(status.remaining_tokens, 0, "in debt by 50 tokens");
        assert_eq!(status.limit_tokens, Some(600));
        let e = a.admit(Some(&t), 1, 0).err().unwrap();
        let ApiError::Overloaded {
            reason,
            retry_after_s,
            ..
        } = e
        else {
            panic!("{e:?}")
        };
        assert_eq!(reason, "tenant_tokens");
        assert_eq!(retry_after_s, 5, "50 tokens at 10/s");
    }

    #[test]
    fn status_reports_the_request_bucket() {
        let a = admission(Config::default());
        let t = tenant(
            "t",
            TenantLimits {
                requests_per_second: 1.0,
                burst: 3.0,
                ..TenantLimits::default()
            },
        );
        let _p = a.admit(Some(&t), 0, 0).unwrap();
        let status = a.status(&t);
        assert_eq!(status.limit_requests, Some(60));
        assert_eq!(status.remaining_requests, 2);
        assert!(status.reset_requests_s > 0.9 && status.reset_requests_s <= 1.0);
        assert_eq!(status.limit_tokens, None);
    }

    #[test]
    fn bucket_refills_at_rate_up_to_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2.0, t0);
        assert!(b.take(1.0, 2.0, t0).is_ok());
        assert!(b.take(1.0, 2.0, t0).is_ok());
        let wait = b.take(1.0, 2.0, t0).unwrap_err();
        assert!((wait - 1.0).abs() < 1e-9);
        assert!(b.take(1.0, 2.0, t0 + Duration::from_millis(1500)).is_ok());
        assert!(b.take(1.0, 2.0, t0 + Duration::from_secs(100)).is_ok());
        assert!(b.take(1.0, 2.0, t0 + Duration::from_secs(100)).is_ok());
        assert!(
            b.take(1.0, 2.0, t0 + Duration::from_secs(100)).is_err(),
            "burst caps the refill"
        );
    }
}
