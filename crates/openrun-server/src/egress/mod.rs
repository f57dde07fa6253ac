//! Network policy, the egress proxy and secrets at the boundary.
//!
//! A sandbox has no network of its own (a loopback-only namespace). Every connection a
//! program inside opens to `127.0.0.1:3128` (its `HTTP(S)_PROXY`, set at create) is carried
//! by the agent's egress relay ([`crate::relay`]) to [`serve_connection`] here, which decides
//! it against the sandbox's policy ([`policy`]), records it on the timeline ([`events`]) and
//! tunnels or forwards it ([`proxy`]). Secrets bound to a host are added to requests by the
//! proxy, over TLS by interception with a per-server CA ([`tls`]), so their values never enter
//! the sandbox. Policies are stored in the database ([`store`]) and served by
//! `GET`/`PUT /v1/sandboxes/{id}/network` ([`routes`]).

mod events;
pub(crate) mod policy;
mod proxy;
pub(crate) mod routes;
pub(crate) mod sandbox_files;
mod store;
mod tls;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

pub use tls::EgressSetupError;

use crate::api::AppState;
use crate::error::DbError;
use policy::Policy;

/// Header naming why the proxy refused a request.
pub(crate) const DENIED_HEADER: &str = "x-openrun-denied";
/// Policies kept in memory before the cache starts over.
const MAX_CACHED: usize = 4096;
/// Client connections one sandbox may have open through the proxy at once (`CONNECT` tunnels
/// and interceptions included, for as long as they last): beyond them its requests get 429,
/// so one sandbox cannot take the server's file descriptors from the others.
pub(crate) const MAX_CONNECTIONS: usize = 256;
/// Client connections all sandboxes together may have open through the proxy (each holds
/// up to two descriptors, its upstream included): beyond them every sandbox's new
/// connections get 429 until some close.
pub(crate) const MAX_SERVER_CONNECTIONS: usize = 4096;

/// What the operator configured for the proxy (`openrun serve --egress-*`).
#[derive(Debug, Clone, Default)]
pub struct EgressOptions {
    /// Fixed resolutions, like curl's `--resolve`: these names resolve to these addresses
    /// without asking DNS, and the addresses are taken as the operator gave them (the ranges
    /// that are otherwise never reached, loopback included, do not apply to them).
    pub resolve: Vec<(String, IpAddr)>,
    /// PEM file of extra CA certificates trusted for intercepted (secret-bound) hosts.
    pub ca_file: Option<PathBuf>,
    /// Whether network mode `open` may be asked for (`openrun serve --allow-open-network`).
    /// `open` connects a sandbox's namespace to the host's network with pasta: it reaches
    /// everything the host reaches, cloud metadata services and private networks included,
    /// so it is off unless the operator turns it on.
    pub allow_open_network: bool,
}

/// Parses `NAME:IP` (as `--egress-resolve` takes it; IPv6 addresses need no brackets).
pub fn parse_resolve(text: &str) -> Result<(String, IpAddr), String> {
    let (name, ip) = text
        .split_once(':')
        .ok_or_else(|| format!("expected NAME:IP, not {text:?}"))?;
    let name =
        policy::normalize_domain(name).map_err(|why| format!("invalid name {name:?}: {why}"))?;
    let ip = ip
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| format!("invalid IP address {ip:?}"))?;
    Ok((name, ip))
}

/// The proxy's shared state (a field of [`AppState`]).
pub(crate) struct Egress {
    resolve: HashMap<String, Vec<IpAddr>>,
    pub(crate) tls: Arc<tls::Tls>,
    /// Whether mode `open` may be asked for ([`EgressOptions::allow_open_network`]).
    allow_open_network: bool,
    policies: RwLock<HashMap<String, Arc<Policy>>>,
    /// Bumped (under the cache's lock) whenever a policy is stored or a sandbox forgotten: a
    /// policy read from the database is cached only if nothing changed since the read began,
    /// so an older read never replaces what a `PUT` stored.
    generation: AtomicU64,
    server_addr: OnceLock<SocketAddr>,
    /// The host's own interface addresses, read at start: never reached (any port) unless a
    /// CIDR of that one address allows it.
    host_addrs: Vec<IpAddr>,
    events: events::Limiter,
    /// One lock per sandbox whose policy is being changed, held from check to cache, so the
    /// cache and the runtime end as the database does.
    updates: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Open client connections per sandbox.
    connections: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
    /// Open client connections of all sandboxes.
    all_connections: Arc<tokio::sync::Semaphore>,
}

/// The right of one client connection to be served: held by the connection and by the tunnel
/// or interception it turns into, until all of them end.
pub(crate) struct ConnectionSlot {
    _sandbox: tokio::sync::OwnedSemaphorePermit,
    _server: tokio::sync::OwnedSemaphorePermit,
}

impl Egress {
    /// Sets up the proxy: its CA in `data_dir` (made the first time) and the trusted roots.
    pub(crate) fn open(data_dir: &Path, options: &EgressOptions) -> Result<Self, EgressSetupError> {
        let tls = tls::Tls::open(data_dir, options.ca_file.as_deref())?;
        let mut resolve: HashMap<String, Vec<IpAddr>> = HashMap::new();
        for (name, ip) in &options.resolve {
            let name = policy::normalize_domain(name)
                .map_err(|why| EgressSetupError::Resolve(format!("{name}: {why}")))?;
            resolve.entry(name).or_default().push(*ip);
        }
        Ok(Self {
            resolve,
            tls: Arc::new(tls),
            allow_open_network: options.allow_open_network,
            policies: RwLock::default(),
            generation: AtomicU64::new(0),
            server_addr: OnceLock::new(),
            host_addrs: host_addresses(),
            events: events::Limiter::default(),
            updates: std::sync::Mutex::default(),
            connections: std::sync::Mutex::default(),
            all_connections: Arc::new(tokio::sync::Semaphore::new(MAX_SERVER_CONNECTIONS)),
        })
    }

    /// Records the API's own address, which no sandbox may reach through the proxy.
    pub(crate) fn set_server_addr(&self, addr: SocketAddr) {
        let _ = self.server_addr.set(addr);
    }

    fn server_addr(&self) -> Option<SocketAddr> {
        self.server_addr.get().copied()
    }

    /// Refuses `policy` when it asks for mode `open` and the operator did not allow it.
    pub(crate) fn check_mode_allowed(&self, policy: &Policy) -> Result<(), crate::error::ApiError> {
        if policy.mode() == policy::Mode::Open && !self.allow_open_network {
            return Err(crate::error::ApiError::OpenNetworkDisabled);
        }
        Ok(())
    }

    /// The host's own interface addresses (as read at start).
    fn host_addrs(&self) -> &[IpAddr] {
        &self.host_addrs
    }

    /// The operator's fixed addresses of `name`, if any.
    fn pinned(&self, name: &str) -> Option<&[IpAddr]> {
        self.resolve.get(name).map(Vec::as_slice)
    }

    /// The current policy of `sandbox` (cached; read from the database on a miss).
    pub(crate) async fn policy(
        &self,
        state: &AppState,
        sandbox: &str,
    ) -> Result<Arc<Policy>, DbError> {
        if let Some(policy) = self.read_cache().get(sandbox) {
            return Ok(policy.clone());
        }
        let generation = self.generation.load(Ordering::SeqCst);
        let key = sandbox.to_string();
        let policy = Arc::new(state.db.call(move |c| store::load(c, &key)).await?);
        self.cache_loaded(sandbox, policy.clone(), generation);
        Ok(policy)
    }

    /// Caches `policy`, read from the database when the generation was `generation`, unless
    /// a policy was stored or a sandbox forgotten since (it may be older than the cache's) or
    /// the cache already holds one for `sandbox`.
    fn cache_loaded(&self, sandbox: &str, policy: Arc<Policy>, generation: u64) {
        let mut cache = self.policies.write().unwrap_or_else(|p| p.into_inner());
        if self.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        if cache.len() >= MAX_CACHED && !cache.contains_key(sandbox) {
            cache.clear();
        }
        cache.entry(sandbox.to_string()).or_insert(policy);
    }

    /// Makes `policy` the one of `sandbox` for every new request (after it was stored).
    pub(crate) fn remember(&self, sandbox: &str, policy: Arc<Policy>) {
        let mut cache = self.policies.write().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, Ordering::SeqCst);
        if cache.len() >= MAX_CACHED && !cache.contains_key(sandbox) {
            cache.clear();
        }
        cache.insert(sandbox.to_string(), policy);
    }

    /// Drops `sandbox`'s policy (secret values included) from memory: called when the
    /// sandbox ends (stopped, failed, deleted), as the database erases it then.
    pub(crate) fn forget(&self, sandbox: &str) {
        let mut cache = self.policies.write().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, Ordering::SeqCst);
        cache.remove(sandbox);
    }

    /// Waits for the turn to change `sandbox`'s policy.
    pub(crate) async fn update_turn(&self, sandbox: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.updates.lock().unwrap_or_else(|p| p.into_inner());
            // Locks nobody holds or waits for are dropped.
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
            locks.entry(sandbox.to_string()).or_default().clone()
        };
        lock.lock_owned().await
    }

    /// A slot for one more client connection of `sandbox`, if it has fewer than
    /// [`MAX_CONNECTIONS`] open and the server fewer than [`MAX_SERVER_CONNECTIONS`]; else why
    /// not.
    fn connection_slot(&self, sandbox: &str) -> Result<ConnectionSlot, String> {
        let slots = {
            let mut all = self.connections.lock().unwrap_or_else(|p| p.into_inner());
            if all.len() >= MAX_CACHED {
                // Sandboxes with no open connection (no permit holds their semaphore).
                all.retain(|_, slots| Arc::strong_count(slots) > 1);
            }
            all.entry(sandbox.to_string())
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)))
                .clone()
        };
        let sandbox_permit = slots.try_acquire_owned().map_err(|_| {
            format!("too many connections through the proxy: at most {MAX_CONNECTIONS} per sandbox")
        })?;
        let server_permit = self.all_connections.clone().try_acquire_owned().map_err(|_| {
            format!(
                "too many connections through the proxy: the server's limit of {MAX_SERVER_CONNECTIONS} is reached"
            )
        })?;
        Ok(ConnectionSlot {
            _sandbox: sandbox_permit,
            _server: server_permit,
        })
    }

    fn read_cache(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Policy>>> {
        self.policies.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// The host's interface addresses, from `/proc/net/fib_trie` and `/proc/net/if_inet6` (an
/// unreadable file gives none of its family, logged).
fn host_addresses() -> Vec<IpAddr> {
    let read = |path: &str| {
        std::fs::read_to_string(path).unwrap_or_else(|e| {
            tracing::warn!(path, error = %e, "cannot read the host's addresses");
            String::new()
        })
    };
    policy::parse_host_addresses(&read("/proc/net/fib_trie"), &read("/proc/net/if_inet6"))
}

/// Serves one proxied client connection of sandbox `sandbox_id` (HTTP `CONNECT` and plain
/// absolute-URI HTTP) according to the sandbox's current policy. Called by the egress relay
/// supervisor ([`crate::relay`]) for each connection a program inside opens.
pub(crate) async fn serve_connection<S>(
    state: crate::api::Shared,
    sandbox_id: String,
    tenant: String,
    stream: S,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let slot = state.egress.connection_slot(&sandbox_id);
    let (slot, refusal) = match slot {
        Ok(slot) => (Some(slot), None),
        Err(reason) => (None, Some(reason)),
    };
    // The client holds the slot; the tunnel or interception a CONNECT turns into holds the
    // client, so the slot is free only once all of them are over.
    let client = Arc::new(proxy::Client {
        state,
        sandbox: sandbox_id,
        tenant,
        _slot: slot,
    });
    match refusal {
        None => proxy::serve(client, stream).await,
        Some(reason) => proxy::refuse(client, stream, reason).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowlist(host: &str) -> Arc<Policy> {
        let body: policy::PolicyBody =
            serde_json::from_value(serde_json::json!({"mode": "allowlist", "allow": [host]}))
                .unwrap();
        Arc::new(Policy::compile(body).unwrap())
    }

    #[test]
    fn an_older_read_never_replaces_a_stored_policy_and_ended_sandboxes_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let egress = Egress::open(dir.path(), &EgressOptions::default()).unwrap();
        let cached = |id: &str| egress.read_cache().get(id).cloned();
        // A miss began reading (generation noted), then a PUT stored and cached a new policy.
        let read_began = egress.generation.load(Ordering::SeqCst);
        let new = allowlist("new.test");
        egress.remember("a", new.clone());
        egress.cache_loaded("a", allowlist("old.test"), read_began);
        assert!(Arc::ptr_eq(&cached("a").unwrap(), &new));
        // Even once the PUT's entry is gone, the stale read is not cached.
        egress.forget("a");
        egress.cache_loaded("a", allowlist("old.test"), read_began);
        assert!(cached("a").is_none());
        // A read with nothing changed meanwhile is cached, but does not replace an entry.
        let read_began = egress.generation.load(Ordering::SeqCst);
        let loaded = allowlist("loaded.test");
        egress.cache_loaded("a", loaded.clone(), read_began);
        assert!(Arc::ptr_eq(&cached("a").unwrap(), &loaded));
        egress.cache_loaded("a", allowlist("other.test"), read_began);
        assert!(Arc::ptr_eq(&cached("a").unwrap(), &loaded));
        egress.forget("a");
        assert!(cached("a").is_none());
    }

    #[test]
    fn resolve_options_parse() {
        assert_eq!(
            parse_resolve("Upstream.test:127.0.0.1").unwrap(),
            ("upstream.test".to_string(), "127.0.0.1".parse().unwrap())
        );
        assert_eq!(
            parse_resolve("v6.test:::1").unwrap().1,
            "::1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            parse_resolve("v6.test:[::1]").unwrap().1,
            "::1".parse::<IpAddr>().unwrap()
        );
        assert!(parse_resolve("nothing").is_err());
        assert!(parse_resolve("a b:127.0.0.1").is_err());
        assert!(parse_resolve("x.test:localhost").is_err());
    }
}
