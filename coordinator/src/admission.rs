//! Admission control, before anything is queued: global concurrency and queue-length
//! limits, per-tenant concurrency and a per-tenant token bucket. A refusal is immediate
//! (429 / RESOURCE_EXHAUSTED with `Retry-After`); an admitted request holds a [`Permit`]
//! until it finishes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::Config;
use crate::error::ApiError;
use crate::groups::GroupSet;

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

#[derive(Debug)]
struct Tenant {
    bucket: TokenBucket,
    active: usize,
}

struct Inner {
    config: Arc<Config>,
    groups: GroupSet,
    concurrent: AtomicUsize,
    tenants: Mutex<HashMap<String, Tenant>>,
}

/// Cloneable admission controller.
#[derive(Clone)]
pub struct Admission {
    inner: Arc<Inner>,
}

/// Held by an admitted request; releases its slots when dropped.
pub struct Permit {
    inner: Arc<Inner>,
    tenant: Option<String>,
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

    /// Admits a request needing `kv_blocks` or refuses it at once.
    pub fn admit(&self, tenant: Option<&str>, kv_blocks: u32) -> Result<Permit, ApiError> {
        let config = &self.inner.config;
        let previous = self.inner.concurrent.fetch_add(1, Ordering::AcqRel);
        // From here on the slot is taken: the permit gives it back on every path.
        let mut permit = Permit {
            inner: self.inner.clone(),
            tenant: None,
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
        let Some(tenant) = tenant.filter(|t| !t.is_empty()) else {
            return Ok(permit);
        };
        if config.tenant_rate <= 0.0 && config.tenant_max_concurrent == 0 {
            return Ok(permit);
        }
        let mut tenants = self
            .inner
            .tenants
            .lock()
            .expect("lock poisoned; this is a bug");
        if tenants.len() > 100_000 {
            tenants.retain(|_, t| t.active > 0);
        }
        let now = Instant::now();
        let state = tenants.entry(tenant.to_string()).or_insert_with(|| Tenant {
            bucket: TokenBucket::new(config.tenant_burst, now),
            active: 0,
        });
        if config.tenant_max_concurrent > 0 && state.active >= config.tenant_max_concurrent {
            drop(tenants);
            return Err(self.reject(
                "tenant_concurrency",
                format!(
                    "tenant `{tenant}` has {} requests in flight (limit)",
                    config.tenant_max_concurrent
                ),
                1,
            ));
        }
        if config.tenant_rate > 0.0
            && let Err(wait) = state
                .bucket
                .take(config.tenant_rate, config.tenant_burst, now)
        {
            drop(tenants);
            return Err(self.reject(
                "tenant_rate",
                format!(
                    "tenant `{tenant}` is over its rate limit of {} requests/s",
                    config.tenant_rate
                ),
                wait.ceil() as u64,
            ));
        }
        state.active += 1;
        permit.tenant = Some(tenant.to_string());
        Ok(permit)
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
        let p1 = a.admit(None, 0).unwrap();
        let _p2 = a.admit(None, 0).unwrap();
        let e = a.admit(None, 0).err().unwrap();
        assert!(matches!(
            e,
            ApiError::Overloaded {
                reason: "max_concurrent_requests",
                ..
            }
        ));
        assert_eq!(a.concurrent(), 2, "a refusal gives its slot back");
        drop(p1);
        assert!(a.admit(None, 0).is_ok());
    }

    #[test]
    fn tenant_concurrency_is_per_tenant() {
        let a = admission(Config {
            tenant_max_concurrent: 1,
            ..Config::default()
        });
        let p = a.admit(Some("t1"), 0).unwrap();
        assert!(a.admit(Some("t1"), 0).is_err());
        assert!(a.admit(Some("t2"), 0).is_ok());
        drop(p);
        assert!(a.admit(Some("t1"), 0).is_ok());
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
