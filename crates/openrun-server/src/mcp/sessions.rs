//! Who owns each MCP session, and how many there may be.
//!
//! rmcp's session manager serves any request that carries a known `Mcp-Session-Id`, whatever
//! key it comes with. This layer, inside authentication, records the tenant of the key that
//! opened each session (when rmcp's answer to a session-less POST sets `Mcp-Session-Id`) and
//! answers any GET, POST or DELETE naming a session of another tenant — or a session it never
//! saw — with rmcp's own 404 "session not found", so a session id is never a credential.
//!
//! It also bounds sessions: at most [`PER_TENANT`] per tenant and [`GLOBAL`] in all. At the
//! limit a new session first closes the oldest idle one (of that tenant, else of anyone); when
//! every one is busy the `initialize` gets 429. A session with no request in flight (a
//! request's SSE stream counts until it ends) for [`IDLE`] is closed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::session::SessionManager;
use tokio::time::Instant;

use crate::api::Caller;
use crate::error::ApiError;

/// Sessions one tenant may hold at once.
pub(crate) const PER_TENANT: usize = 32;
/// Sessions the server holds at once.
pub(crate) const GLOBAL: usize = 1024;
/// How long a session with nothing in flight lives.
pub(crate) const IDLE: Duration = Duration::from_secs(10 * 60);
/// How often idle sessions are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// The header naming a session.
const SESSION_HEADER: &str = "mcp-session-id";

/// One session's owner and use.
#[derive(Debug)]
struct Entry {
    tenant: String,
    last_seen: Instant,
    in_flight: usize,
}

/// The sessions' owners, next to rmcp's session manager.
pub(crate) struct Sessions {
    manager: Arc<LocalSessionManager>,
    owners: Mutex<HashMap<String, Entry>>,
    per_tenant: usize,
    global: usize,
    idle: Duration,
}

impl Sessions {
    /// Owners of the sessions of `manager`, with the default limits.
    pub(crate) fn new(manager: Arc<LocalSessionManager>) -> Arc<Self> {
        Arc::new(Self {
            manager,
            owners: Mutex::new(HashMap::new()),
            per_tenant: PER_TENANT,
            global: GLOBAL,
            idle: IDLE,
        })
    }

    fn owners(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.owners.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes idle sessions every [`SWEEP_EVERY`] while `sessions` lives (needs a runtime;
    /// without one, sessions are swept when new ones open).
    pub(crate) fn start_sweeper(sessions: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak: Weak<Self> = Arc::downgrade(sessions);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(SWEEP_EVERY).await;
                let Some(sessions) = weak.upgrade() else {
                    return;
                };
                sessions.sweep().await;
            }
        });
    }

    /// Forgets sessions rmcp ended, and closes those idle for longer than the limit.
    async fn sweep(&self) {
        let live: std::collections::HashSet<String> = self
            .manager
            .sessions
            .read()
            .await
            .keys()
            .map(|id| id.to_string())
            .collect();
        let idle: Vec<String> = {
            let mut owners = self.owners();
            owners.retain(|id, _| live.contains(id));
            owners
                .iter()
                .filter(|(_, e)| e.in_flight == 0 && e.last_seen.elapsed() >= self.idle)
                .map(|(id, _)| id.clone())
                .collect()
        };
        for id in idle {
            self.close(&id).await;
        }
    }

    /// Ends a session in rmcp and forgets it.
    async fn close(&self, id: &str) {
        self.owners().remove(id);
        if let Err(e) = self.manager.close_session(&Arc::from(id)).await {
            tracing::debug!(session = id, error = %e, "cannot close an MCP session");
        }
    }

    /// Makes room for one more session of `tenant`: at a limit, the oldest idle session (of
    /// the tenant for its own limit) is closed; with none idle, 429.
    async fn make_room(&self, tenant: &str) -> Result<(), ApiError> {
        self.sweep().await;
        loop {
            let victim = victim(&self.owners(), tenant, self.per_tenant, self.global)?;
            let Some(victim) = victim else {
                return Ok(());
            };
            tracing::info!(session = %victim, "closing the oldest idle MCP session to open a new one");
            self.close(&victim).await;
        }
    }

    /// Marks a request of `tenant` on session `id` as in flight; `None` when the session is
    /// not the tenant's (or not known).
    fn enter(self: &Arc<Self>, id: &str, tenant: &str) -> Option<InFlight> {
        let mut owners = self.owners();
        let entry = owners.get_mut(id).filter(|e| e.tenant == tenant)?;
        entry.in_flight += 1;
        entry.last_seen = Instant::now();
        Some(InFlight {
            sessions: self.clone(),
            id: id.to_string(),
        })
    }
}

/// The session to close before `tenant` opens one: `None` when under both limits; at the
/// tenant's limit its oldest idle session, at the global limit anyone's; 429 when every
/// session that could go is busy.
fn victim(
    owners: &HashMap<String, Entry>,
    tenant: &str,
    per_tenant: usize,
    global: usize,
) -> Result<Option<String>, ApiError> {
    let mine = owners.values().filter(|e| e.tenant == tenant).count();
    let own = if mine >= per_tenant {
        true
    } else if owners.len() >= global {
        false
    } else {
        return Ok(None);
    };
    let oldest_idle = owners
        .iter()
        .filter(|(_, e)| e.in_flight == 0 && (!own || e.tenant == tenant))
        .min_by_key(|(_, e)| e.last_seen)
        .map(|(id, _)| id.clone());
    match oldest_idle {
        Some(id) => Ok(Some(id)),
        None => Err(ApiError::TooManyRequests {
            message: if own {
                format!(
                    "this key has {mine} MCP sessions open, all busy (at most {per_tenant}): end \
                     one (DELETE /mcp with its Mcp-Session-Id) or wait for one to finish"
                )
            } else {
                format!("the server has {global} MCP sessions open, all busy: retry later")
            },
            retry_after_secs: 10,
        }),
    }
}

/// A request in flight on a session: its end (the end of its answer's body) counts as use.
struct InFlight {
    sessions: Arc<Sessions>,
    id: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(entry) = self.sessions.owners().get_mut(&self.id) {
            entry.in_flight = entry.in_flight.saturating_sub(1);
            entry.last_seen = Instant::now();
        }
    }
}

/// rmcp's answer to a session it does not know, given for another tenant's sessions too.
fn session_not_found() -> Response {
    (StatusCode::NOT_FOUND, "Not Found: Session not found").into_response()
}

/// The layer of `/mcp` (inside authentication): see the module documentation.
pub(crate) async fn guard(
    State(sessions): State<Arc<Sessions>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(caller) = req.extensions().get::<Caller>().cloned() else {
        return ApiError::Unauthorized("no API key was checked for this request".into())
            .into_response();
    };
    let session = req
        .headers()
        .get(SESSION_HEADER)
        .map(|v| v.to_str().map(str::to_owned));
    match session {
        Some(Err(_)) => session_not_found(),
        Some(Ok(id)) => {
            let Some(in_flight) = sessions.enter(&id, &caller.tenant) else {
                return session_not_found();
            };
            let delete = req.method() == Method::DELETE;
            let response = next.run(req).await;
            if delete && response.status().is_success() {
                drop(in_flight);
                sessions.owners().remove(&id);
                return response;
            }
            // The request is in flight until its answer (maybe an SSE stream) has been sent.
            let (parts, body) = response.into_parts();
            let body = Body::from_stream(body.into_data_stream().map(move |chunk| {
                let _ = &in_flight;
                chunk
            }));
            Response::from_parts(parts, body)
        }
        None => {
            if req.method() == Method::POST {
                if let Err(e) = sessions.make_room(&caller.tenant).await {
                    return e.into_response();
                }
            }
            let response = next.run(req).await;
            let opened = response
                .headers()
                .get(SESSION_HEADER)
                .and_then(|v| v.to_str().ok());
            if let Some(id) = opened {
                sessions.owners().insert(
                    id.to_string(),
                    Entry {
                        tenant: caller.tenant,
                        last_seen: Instant::now(),
                        in_flight: 0,
                    },
                );
            }
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tenant: &str, in_flight: usize) -> Entry {
        Entry {
            tenant: tenant.into(),
            last_seen: Instant::now(),
            in_flight,
        }
    }

    #[tokio::test]
    async fn sessions_belong_to_their_tenant() {
        let s = Sessions::new(Arc::new(LocalSessionManager::default()));
        s.owners().insert("a1".into(), entry("a", 0));
        assert!(s.enter("a1", "b").is_none(), "tenant b used a's session");
        assert!(s.enter("nope", "a").is_none());
        let in_flight = s.enter("a1", "a").expect("a's own session");
        assert_eq!(s.owners()["a1"].in_flight, 1);
        drop(in_flight);
        assert_eq!(s.owners()["a1"].in_flight, 0);
    }

    #[test]
    fn at_a_limit_the_oldest_idle_session_goes_and_busy_ones_stay() {
        let mut owners = HashMap::new();
        owners.insert("a1".to_string(), entry("a", 0));
        std::thread::sleep(Duration::from_millis(5));
        owners.insert("a2".to_string(), entry("a", 0));
        owners.insert("b1".to_string(), entry("b", 0));
        assert_eq!(victim(&owners, "a", 3, 10).unwrap(), None);
        assert_eq!(victim(&owners, "a", 2, 10).unwrap().as_deref(), Some("a1"));
        // The global limit: anyone's oldest idle session.
        assert_eq!(victim(&owners, "c", 2, 3).unwrap().as_deref(), Some("a1"));
        owners.get_mut("a1").unwrap().in_flight = 1;
        assert_eq!(victim(&owners, "a", 2, 10).unwrap().as_deref(), Some("a2"));
        owners.get_mut("a2").unwrap().in_flight = 2;
        let refused = victim(&owners, "a", 2, 10).unwrap_err();
        assert!(
            matches!(refused, ApiError::TooManyRequests { .. }),
            "{refused}"
        );
        // b's session does not count against a's own limit.
        assert_eq!(victim(&owners, "b", 2, 10).unwrap(), None);
    }
}
