//! The E2B-compatible surface: the official `e2b` and `e2b-code-interpreter` Python SDKs work
//! unmodified against `openrun serve` (`E2B_API_URL` and `E2B_SANDBOX_URL` set to the server's
//! URL, `E2B_API_KEY` to an openrun key). Fact sheet: `shared/protocols/e2b.md`.
//!
//! Every handler here is a thin adapter over the same core calls as `/v1` (sandboxes in
//! [`crate::api`], files in [`crate::files`], processes in [`crate::processes`] and
//! [`crate::exec`]): only the wire format is E2B's.
//!
//! | module | what |
//! |---|---|
//! | [`rest`] | the control plane: `/v2/sandboxes`, `/sandboxes/{id}...` (`X-API-KEY`) |
//! | [`envd_http`] | envd's plain HTTP: `/health`, `/files` |
//! | [`connect`] | the Connect protocol (JSON codec): unary calls, enveloped streams, errors |
//! | [`process`] | `process.Process/*` |
//! | [`filesystem`] | `filesystem.Filesystem/*` but watchers |
//! | [`watch`] | `filesystem.Filesystem/{CreateWatcher,GetWatcherEvents,RemoveWatcher,WatchDir}` |
//! | [`interpreter`] | the code interpreter (port 49999): `/execute`, `/contexts` |

mod connect;
mod envd_http;
mod filesystem;
mod interpreter;
mod process;
mod rest;
mod watch;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;

use crate::api::{Caller, Shared};

/// The envd version this server reports (`envdVersion`): the SDK gates features on it
/// (fact sheet §5.5).
pub(crate) const ENVD_VERSION: &str = "0.5.7";

/// Port of envd in E2B's sandboxes (`E2b-Sandbox-Port`).
pub(crate) const ENVD_PORT: u16 = 49983;

/// Port of the code interpreter in E2B's sandboxes.
pub(crate) const INTERPRETER_PORT: u16 = 49999;

/// What a request of sandbox traffic is about, put in its extensions by [`sandbox_traffic`]
/// once its access token was checked.
#[derive(Debug, Clone)]
pub(crate) struct SandboxCtx {
    /// The owner of the sandbox: the calls below are made on its behalf.
    pub caller: Caller,
    /// The sandbox.
    pub sandbox_id: String,
    /// `E2b-Sandbox-Port`: [`ENVD_PORT`] or [`INTERPRETER_PORT`].
    pub port: u16,
    /// Run-as user from `Authorization: Basic base64("<user>:")`; `None`: the image's.
    pub user: Option<String>,
}

/// The control-plane routes (`X-API-KEY`).
pub(crate) fn api_routes(state: Shared) -> Router<Shared> {
    rest::routes(state)
}

/// The routes of sandbox traffic (envd and the interpreter), behind [`sandbox_traffic`].
fn sandbox_routes() -> Router<Shared> {
    envd_http::routes()
        .merge(process::routes())
        .merge(filesystem::routes())
        .merge(watch::routes())
        .merge(interpreter::routes())
}

/// Middleware: a request of sandbox traffic goes to the sandbox routes; anything else goes on.
pub(crate) async fn sandbox_traffic(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let _ = (&s, sandbox_routes);
    next.run(req).await
}
