//! API keys and the tenants they belong to.
//!
//! A keys file (TOML, `--api-keys-file`; a Kubernetes Secret mounts as one) maps keys to
//! tenants, each with its own limits. Keys are stored as SHA-256 hashes (`sha256:<hex>`),
//! so the file is no secret worth stealing; a presented key is hashed and compared with
//! every stored hash in constant time. The old single `--api-key` is one more tenant,
//! `default`. [`Keys`] is the live set: [`Keys::reload`] swaps in a new file atomically
//! (requests in flight keep the tenant they were admitted under), and [`spawn_reloader`]
//! calls it on SIGHUP and whenever the file's content changes.
//!
//! ```toml
//! # Limits of every tenant that does not set its own (all optional; 0 = unlimited).
//! [defaults]
//! requests_per_second = 10.0
//!
//! [tenants.team-a]
//! keys = ["sha256:2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"]
//! requests_per_second = 5.0    # token bucket rate ...
//! burst = 10                   # ... and size
//! tokens_per_minute = 60000    # prompt + generated tokens
//! max_concurrent = 4           # requests in flight
//! max_priority = "normal"      # highest priority class it may ask for
//! models = ["SmolLM2-135M-Instruct"]   # absent = every served model
//! ```
//!
//! A tenant with `trusted_gateway = true` (an API gateway that authenticates end users
//! itself) may name another tenant of the file in `x-shardline-tenant`; that tenant's
//! limits then apply. Every other client-sent tenant header is ignored once keys exist.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::request::Priority;

/// The name of the tenant that `--api-key` authenticates.
pub const API_KEY_TENANT: &str = "default";

/// How often [`spawn_reloader`] looks at the keys file for a change.
pub const RELOAD_POLL: Duration = Duration::from_secs(2);

/// What one tenant may do. Zero means unlimited.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantLimits {
    /// Requests per second (token bucket rate).
    pub requests_per_second: f64,
    /// Token bucket size: requests allowed at once after a quiet period.
    pub burst: f64,
    /// Prompt plus generated tokens per minute.
    pub tokens_per_minute: u64,
    /// Requests admitted at once.
    pub max_concurrent: usize,
    /// The most urgent priority class it may ask for.
    pub max_priority: Priority,
    /// Model names it may use; empty = all.
    pub models: Vec<String>,
}

impl TenantLimits {
    /// Whether admission has anything to count for this tenant (a rate, a token budget or
    /// a concurrency limit); without, it keeps no state for the tenant's name.
    pub fn counted(&self) -> bool {
        self.requests_per_second > 0.0 || self.tokens_per_minute > 0 || self.max_concurrent > 0
    }
}

impl Default for TenantLimits {
    fn default() -> Self {
        TenantLimits {
            requests_per_second: 0.0,
            burst: 1.0,
            tokens_per_minute: 0,
            max_concurrent: 0,
            max_priority: Priority::High,
            models: Vec::new(),
        }
    }
}

/// A tenant: the unit limits and usage are counted in.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    pub name: String,
    pub limits: TenantLimits,
    /// May name another tenant in `x-shardline-tenant` (see the module docs).
    pub trusted_gateway: bool,
}

/// Why a keys file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read the keys file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("keys file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// A SHA-256 digest of an API key.
type KeyHash = [u8; 32];

/// The SHA-256 of `key`, as the keys file stores it (`sha256:<hex>`).
pub fn hash_key(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn parse_hash(s: &str) -> Option<KeyHash> {
    let hex = s.trim().strip_prefix("sha256:")?;
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// One immutable generation of the key table.
#[derive(Debug, Default)]
pub struct KeySet {
    keys: Vec<(KeyHash, Arc<Tenant>)>,
    tenants: HashMap<String, Arc<Tenant>>,
}

impl KeySet {
    /// The tenant a presented key belongs to. Every stored hash is compared, in constant
    /// time, whatever matches: how long this takes says nothing about the stored keys.
    pub fn lookup(&self, key: &str) -> Option<Arc<Tenant>> {
        let digest: KeyHash = Sha256::digest(key.as_bytes()).into();
        let mut found = None;
        for (hash, tenant) in &self.keys {
            if bool::from(hash.ct_eq(&digest)) {
                found = Some(tenant.clone());
            }
        }
        found
    }

    /// A tenant by name (what a trusted gateway's `x-shardline-tenant` names).
    pub fn tenant(&self, name: &str) -> Option<Arc<Tenant>> {
        self.tenants.get(name).cloned()
    }

    pub fn tenant_names(&self) -> impl Iterator<Item = &str> {
        self.tenants.keys().map(String::as_str)
    }

    fn add(&mut self, tenant: Tenant, hashes: Vec<KeyHash>) -> Result<(), String> {
        if self.tenants.contains_key(&tenant.name) {
            return Err(format!("tenant `{}` is defined twice", tenant.name));
        }
        let tenant = Arc::new(tenant);
        for hash in hashes {
            if let Some((_, other)) = self.keys.iter().find(|(h, _)| *h == hash) {
                return Err(format!(
                    "the same key belongs to tenants `{}` and `{}`",
                    other.name, tenant.name
                ));
            }
            self.keys.push((hash, tenant.clone()));
        }
        self.tenants.insert(tenant.name.clone(), tenant);
        Ok(())
    }
}

/// The keys file as written; every field is checked, unknown ones are errors.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    #[serde(default)]
    defaults: LimitsFormat,
    #[serde(default)]
    tenants: std::collections::BTreeMap<String, TenantFormat>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFormat {
    requests_per_second: Option<f64>,
    burst: Option<f64>,
    tokens_per_minute: Option<u64>,
    max_concurrent: Option<usize>,
    max_priority: Option<String>,
    models: Option<Vec<String>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantFormat {
    keys: Vec<String>,
    #[serde(default)]
    trusted_gateway: bool,
    #[serde(flatten)]
    limits: LimitsFormat,
}

impl LimitsFormat {
    /// `self` over `base`, checked.
    fn apply(&self, base: &TenantLimits) -> Result<TenantLimits, String> {
        let mut limits = base.clone();
        if let Some(rate) = self.requests_per_second {
            if !rate.is_finite() || rate < 0.0 {
                return Err(format!("requests_per_second = {rate}: must be >= 0"));
            }
            limits.requests_per_second = rate;
            if self.burst.is_none() {
                limits.burst = rate.max(1.0);
            }
        }
        if let Some(burst) = self.burst {
            if !burst.is_finite() || burst < 1.0 {
                return Err(format!("burst = {burst}: must be >= 1"));
            }
            limits.burst = burst;
        }
        if let Some(tpm) = self.tokens_per_minute {
            limits.tokens_per_minute = tpm;
        }
        if let Some(n) = self.max_concurrent {
            limits.max_concurrent = n;
        }
        if let Some(p) = &self.max_priority {
            limits.max_priority = Priority::parse(p).ok_or_else(|| {
                format!("max_priority = \"{p}\": use \"high\", \"normal\" or \"low\"")
            })?;
        }
        if let Some(models) = &self.models {
            limits.models = models.clone();
        }
        Ok(limits)
    }
}

/// Parses a keys file's text over the limits the flags give (`defaults`).
pub fn parse(text: &str, defaults: &TenantLimits) -> Result<KeySet, String> {
    let file: FileFormat = toml::from_str(text).map_err(|e| e.to_string())?;
    let defaults = file
        .defaults
        .apply(defaults)
        .map_err(|e| format!("[defaults]: {e}"))?;
    let mut set = KeySet::default();
    for (name, tenant) in file.tenants {
        if tenant.keys.is_empty() {
            return Err(format!("[tenants.{name}]: `keys` is empty"));
        }
        let hashes = tenant
            .keys
            .iter()
            .map(|k| {
                parse_hash(k).ok_or_else(|| {
                    format!(
                        "[tenants.{name}]: `{k}` is not `sha256:` and 64 hex digits \
                         (store the key's hash, e.g. `shardline hash-key`)"
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let limits = tenant
            .limits
            .apply(&defaults)
            .map_err(|e| format!("[tenants.{name}]: {e}"))?;
        set.add(
            Tenant {
                name: name.clone(),
                limits,
                trusted_gateway: tenant.trusted_gateway,
            },
            hashes,
        )?;
    }
    Ok(set)
}

/// The tenant of a request: its `Authorization: Bearer <key>` value looked up in `set`,
/// and for a trusted gateway's key the tenant its `x-shardline-tenant` names.
pub fn authenticate(
    set: &KeySet,
    authorization: Option<&str>,
    tenant_header: Option<&str>,
) -> Result<Arc<Tenant>, ApiError> {
    let key = authorization
        .and_then(|v| {
            let (scheme, key) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
        })
        .filter(|k| !k.is_empty())
        .ok_or(ApiError::Unauthorized)?;
    let tenant = set.lookup(key).ok_or(ApiError::Unauthorized)?;
    match tenant_header.map(str::trim).filter(|t| !t.is_empty()) {
        Some(name) if tenant.trusted_gateway => set.tenant(name).ok_or_else(|| {
            ApiError::Forbidden(format!(
                "x-shardline-tenant names `{name}`, which is not a tenant of the keys file"
            ))
        }),
        // Any other client's tenant header is ignored: the key decides.
        _ => Ok(tenant),
    }
}

/// Where the key table comes from: the flags, kept to rebuild it on every reload.
#[derive(Debug, Clone, Default)]
pub struct KeySource {
    /// `--api-keys-file`.
    pub file: Option<PathBuf>,
    /// `--api-key`, the `default` tenant.
    pub api_key: Option<String>,
    /// Limits from the `--tenant-*` flags: the base every tenant builds on.
    pub defaults: TenantLimits,
}

impl KeySource {
    fn load(&self) -> Result<(KeySet, Option<Vec<u8>>), KeysError> {
        let (mut set, content) = match &self.file {
            None => (KeySet::default(), None),
            Some(path) => {
                let content = std::fs::read(path).map_err(|source| KeysError::Read {
                    path: path.clone(),
                    source,
                })?;
                let invalid = |message: String| KeysError::Invalid {
                    path: path.clone(),
                    message,
                };
                let text =
                    std::str::from_utf8(&content).map_err(|_| invalid("not UTF-8 text".into()))?;
                (parse(text, &self.defaults).map_err(invalid)?, Some(content))
            }
        };
        if let Some(key) = &self.api_key {
            let tenant = Tenant {
                name: API_KEY_TENANT.into(),
                limits: self.defaults.clone(),
                trusted_gateway: false,
            };
            let hash = Sha256::digest(key.as_bytes()).into();
            set.add(tenant, vec![hash])
                .map_err(|message| KeysError::Invalid {
                    path: self.file.clone().unwrap_or_default(),
                    message: format!("{message} (--api-key)"),
                })?;
        }
        Ok((set, content))
    }
}

struct Live {
    set: Arc<KeySet>,
    /// The file's bytes the set was built from: a poll that reads the same skips work.
    content: Option<Vec<u8>>,
}

/// The live key table, shared by both front ends. Without `--api-key` and
/// `--api-keys-file` it is disabled: the API is open and tenants come from the client.
#[derive(Clone)]
pub struct Keys {
    source: Arc<KeySource>,
    live: Option<Arc<RwLock<Live>>>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("file", &self.source.file)
            .field("api_key", &self.source.api_key.as_ref().map(|_| "<set>"))
            .field("enabled", &self.enabled())
            .finish()
    }
}

impl Default for Keys {
    fn default() -> Self {
        Keys::disabled()
    }
}

impl Keys {
    /// No keys: the API is open.
    pub fn disabled() -> Keys {
        Keys {
            source: Arc::default(),
            live: None,
        }
    }

    /// Loads the keys the flags name; disabled when they name none.
    pub fn load(source: KeySource) -> Result<Keys, KeysError> {
        if source.file.is_none() && source.api_key.is_none() {
            return Ok(Keys::disabled());
        }
        let (set, content) = source.load()?;
        Ok(Keys {
            source: Arc::new(source),
            live: Some(Arc::new(RwLock::new(Live {
                set: Arc::new(set),
                content,
            }))),
        })
    }

    /// Only `key`, as the `default` tenant with `limits` (what `--api-key` gives).
    pub fn single(key: &str, limits: TenantLimits) -> Keys {
        Keys::load(KeySource {
            file: None,
            api_key: Some(key.to_string()),
            defaults: limits,
        })
        .expect("one key cannot conflict with itself; this is a bug")
    }

    pub fn enabled(&self) -> bool {
        self.live.is_some()
    }

    /// The current table (`None` when keys are disabled).
    pub fn current(&self) -> Option<Arc<KeySet>> {
        let live = self.live.as_ref()?;
        Some(
            live.read()
                .expect("keys lock poisoned; this is a bug")
                .set
                .clone(),
        )
    }

    pub fn file(&self) -> Option<&Path> {
        self.source.file.as_deref()
    }

    /// Re-reads the keys file and swaps the table in when it changed. Returns whether
    /// it did. A file that cannot be used leaves the current table in place.
    pub fn reload(&self) -> Result<bool, KeysError> {
        let Some(live) = &self.live else {
            return Ok(false);
        };
        if let Some(path) = &self.source.file {
            // Cheap check first: polling every few seconds must not reparse.
            let content = std::fs::read(path).map_err(|source| KeysError::Read {
                path: path.clone(),
                source,
            })?;
            let guard = live.read().expect("keys lock poisoned; this is a bug");
            if guard.content.as_deref() == Some(content.as_slice()) {
                return Ok(false);
            }
        }
        let (set, content) = self.source.load()?;
        let mut guard = live.write().expect("keys lock poisoned; this is a bug");
        guard.set = Arc::new(set);
        guard.content = content;
        Ok(true)
    }
}

/// Reloads `keys` on SIGHUP and when the file changes (polled every [`RELOAD_POLL`];
/// a Kubernetes Secret update swaps a symlink, which polling the path sees), until
/// `shutdown`. Errors are logged and the current keys stay.
pub fn spawn_reloader(keys: Keys, shutdown: CancellationToken) {
    spawn_reloader_polling(keys, RELOAD_POLL, shutdown);
}

/// [`spawn_reloader`] polling every `every`. The SIGHUP handler is in place when this
/// returns (a SIGHUP before it would end the process).
pub fn spawn_reloader_polling(keys: Keys, every: Duration, shutdown: CancellationToken) {
    if keys.file().is_none() {
        return;
    }
    #[cfg(unix)]
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler; the keys file is still polled");
            None
        }
    };
    tokio::spawn(async move {
        let mut poll = tokio::time::interval(every);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            #[cfg(unix)]
            let hup = async {
                match hangup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hup = std::future::pending::<Option<()>>();
            let trigger = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = hup => "SIGHUP",
                _ = poll.tick() => "file change",
            };
            let keys = keys.clone();
            match tokio::task::spawn_blocking(move || keys.reload()).await {
                Ok(Ok(true)) => tracing::info!(trigger, "API keys reloaded"),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, trigger, "API keys not reloaded; the previous keys stay in force")
                }
                Err(e) => tracing::error!(error = %e, "keys reload task failed"),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(tenants: &str) -> String {
        format!("[defaults]\nrequests_per_second = 2.0\n{tenants}")
    }

    #[test]
    fn keys_map_to_tenants_with_their_limits() {
        let text = file(&format!(
            "[tenants.a]\nkeys = [\"{}\"]\nmax_concurrent = 3\nmodels = [\"m\"]\n\
             [tenants.b]\nkeys = [\"{}\", \"{}\"]\nmax_priority = \"low\"\ntrusted_gateway = true\n",
            hash_key("key-a"),
            hash_key("key-b1"),
            hash_key("key-b2"),
        ));
        let set = parse(&text, &TenantLimits::default()).unwrap();
        let a = set.lookup("key-a").unwrap();
        assert_eq!(a.name, "a");
        assert_eq!(a.limits.max_concurrent, 3);
        assert_eq!(a.limits.requests_per_second, 2.0, "from [defaults]");
        assert_eq!(a.limits.burst, 2.0);
        assert_eq!(a.limits.models, vec!["m".to_string()]);
        assert_eq!(set.lookup("key-b2").unwrap().name, "b");
        assert!(set.lookup("key-b2").unwrap().trusted_gateway);
        assert_eq!(
            set.lookup("key-b1").unwrap().limits.max_priority,
            Priority::Low
        );
        assert!(set.lookup("key-c").is_none());
        assert!(set.lookup("").is_none());
        assert!(set.tenant("a").is_some());
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let limits = TenantLimits::default();
        let err = |text: &str| parse(text, &limits).unwrap_err();
        assert!(err("[tenants.a]\nkeys = [\"plain-key\"]\n").contains("sha256:"));
        assert!(err("[tenants.a]\nkeys = []\n").contains("empty"));
        let h = hash_key("k");
        assert!(
            err(&format!(
                "[tenants.a]\nkeys = [\"{h}\"]\n[tenants.b]\nkeys = [\"{h}\"]\n"
            ))
            .contains("same key")
        );
        assert!(
            err(&format!("[tenants.a]\nkeys = [\"{h}\"]\nrate = 3\n")).contains("rate"),
            "a misspelt limit is an error, not silently unlimited"
        );
        assert!(
            err(&format!(
                "[tenants.a]\nkeys = [\"{h}\"]\nmax_priority = \"urgent\"\n"
            ))
            .contains("max_priority")
        );
        assert!(
            err(&format!(
                "[tenants.a]\nkeys = [\"{h}\"]\nrequests_per_second = -1\n"
            ))
            .contains(">= 0")
        );
    }

    #[test]
    fn bearer_keys_and_trusted_gateways() {
        let text = format!(
            "[tenants.a]\nkeys = [\"{}\"]\n[tenants.gw]\nkeys = [\"{}\"]\ntrusted_gateway = true\n",
            hash_key("ka"),
            hash_key("kg"),
        );
        let set = parse(&text, &TenantLimits::default()).unwrap();
        let auth =
            |v: Option<&str>, t: Option<&str>| authenticate(&set, v, t).map(|t| t.name.clone());
        assert!(matches!(auth(None, None), Err(ApiError::Unauthorized)));
        assert!(matches!(
            auth(Some("Bearer "), None),
            Err(ApiError::Unauthorized)
        ));
        assert!(matches!(
            auth(Some("Basic ka"), None),
            Err(ApiError::Unauthorized)
        ));
        assert!(matches!(
            auth(Some("Bearer kb"), None),
            Err(ApiError::Unauthorized)
        ));
        assert_eq!(auth(Some("Bearer ka"), None).unwrap(), "a");
        assert_eq!(auth(Some("bearer  ka "), None).unwrap(), "a");
        assert_eq!(
            auth(Some("Bearer ka"), Some("gw")).unwrap(),
            "a",
            "an ordinary key cannot pick its tenant"
        );
        assert_eq!(auth(Some("Bearer kg"), None).unwrap(), "gw");
        assert_eq!(auth(Some("Bearer kg"), Some("a")).unwrap(), "a");
        assert!(matches!(
            auth(Some("Bearer kg"), Some("nobody")),
            Err(ApiError::Forbidden(_))
        ));
    }

    #[test]
    fn hash_is_sha256_hex() {
        // `printf %s abc | sha256sum`
        assert_eq!(
            hash_key("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    /// SIGHUP reloads at once (the poll here is an hour away).
    #[cfg(unix)]
    #[tokio::test]
    async fn sighup_reloads_the_keys_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let write = |key: &str| {
            std::fs::write(
                &path,
                format!("[tenants.t]\nkeys = [\"{}\"]\n", hash_key(key)),
            )
            .unwrap()
        };
        write("one");
        let keys = Keys::load(KeySource {
            file: Some(path.clone()),
            ..KeySource::default()
        })
        .unwrap();
        let shutdown = CancellationToken::new();
        let _stop = shutdown.clone().drop_guard();
        spawn_reloader_polling(keys.clone(), Duration::from_secs(3600), shutdown.clone());
        // Let the first (immediate) poll tick pass.
        tokio::time::sleep(Duration::from_millis(100)).await;
        write("two");
        let status = std::process::Command::new("kill")
            .args(["-HUP", &std::process::id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        let mut waited = 0;
        while keys.current().unwrap().lookup("two").is_none() {
            assert!(waited < 200, "SIGHUP did not reload the keys");
            tokio::time::sleep(Duration::from_millis(50)).await;
            waited += 1;
        }
        assert!(keys.current().unwrap().lookup("one").is_none());
    }

    #[test]
    fn reload_swaps_the_table_and_keeps_it_on_a_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let write = |key: &str| {
            std::fs::write(
                &path,
                format!("[tenants.t]\nkeys = [\"{}\"]\n", hash_key(key)),
            )
            .unwrap()
        };
        write("one");
        let keys = Keys::load(KeySource {
            file: Some(path.clone()),
            api_key: Some("legacy".into()),
            defaults: TenantLimits::default(),
        })
        .unwrap();
        let before = keys.current().unwrap();
        assert_eq!(before.lookup("one").unwrap().name, "t");
        assert_eq!(before.lookup("legacy").unwrap().name, API_KEY_TENANT);
        assert!(!keys.reload().unwrap(), "unchanged file: nothing to do");
        write("two");
        assert!(keys.reload().unwrap());
        let after = keys.current().unwrap();
        assert!(after.lookup("one").is_none(), "revoked");
        assert_eq!(after.lookup("two").unwrap().name, "t");
        assert!(
            after.lookup("legacy").is_some(),
            "--api-key survives reloads"
        );
        assert!(
            before.lookup("one").is_some(),
            "a table already handed out is unchanged"
        );
        std::fs::write(&path, "not toml [").unwrap();
        assert!(keys.reload().is_err());
        assert!(keys.current().unwrap().lookup("two").is_some());
    }
}
