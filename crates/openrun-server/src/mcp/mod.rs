//! MCP (Model Context Protocol) for agents: `/mcp`, Streamable HTTP, served by rmcp (the
//! official Rust SDK) at protocol revision 2025-11-25 (older revisions are negotiated down to).
//! `openrun mcp` bridges stdio to it, so there is one implementation.
//!
//! - Authentication: `Authorization: Bearer <key>` on every request, checked by the `/v1`
//!   middleware [`crate::api::auth`] before rmcp sees the request (401 with the API's JSON error
//!   otherwise). The [`Caller`] goes into the request's extensions; rmcp hands the request's
//!   [`axum::http::request::Parts`] to each tool call, so every tool acts as the key of *its own*
//!   request (a session id is no credential) and only ever sees that key's tenant.
//! - Tools ([`tools`]) are thin adapters over the core calls `/v1` uses (sandboxes, exec,
//!   processes, files, images, environment, previews): same checks, same timeline events.
//! - Errors: a tool that ran and failed (no such sandbox, file or command, a sandbox that
//!   stopped, a bad value, arguments that do not fit its schema) answers a result with
//!   `isError: true` and a message saying what to do next, as MCP 2025-11-25 asks (a model can
//!   correct its call); protocol misuse (an unknown tool or method, a malformed request) is a
//!   JSON-RPC error.
//! - Sessions: rmcp's in-memory session manager (`Mcp-Session-Id`). A session belongs to the
//!   tenant of the key that opened it: [`sessions`] answers 404 to any other tenant, bounds
//!   sessions per tenant and in all, and closes those idle (nothing in flight) for
//!   [`sessions::IDLE`]; rmcp's own limit, [`SESSION_IDLE`], is only a backstop. Host-header checks (rmcp's DNS-rebinding guard) are off: every request
//!   needs an API key, which a rebinding page does not have, and the server may be reached by
//!   any name.

use std::borrow::Cow;
use std::sync::Arc;

use axum::http::HeaderMap;
use axum::middleware;
use axum::Router;
use rmcp::handler::server::common::{AsRequestContext, FromContextPart};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ProtocolVersion, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{tool_handler, ErrorData, RoleServer, ServerHandler};

use crate::api::{Caller, Shared};
use crate::error::ApiError;

mod sessions;
mod text;
mod tools;

/// The protocol revision served: the newest with an `initialize` handshake that rmcp
/// supports. Clients asking for an older one get theirs.
pub(crate) const PROTOCOL_VERSION: ProtocolVersion = ProtocolVersion::V_2025_11_25;

/// Largest JSON-RPC message accepted (a `write_file` carries the file: 16 MiB as base64 fits).
const MAX_MESSAGE: usize = 24 * 1024 * 1024;

/// How long a session lives without a message: longer than the longest `run_command`
/// (rmcp's default, 5 minutes, would end a session while a long command runs).
const SESSION_IDLE: std::time::Duration =
    std::time::Duration::from_secs(tools::MAX_TIMEOUT_SECS + 10 * 60);

/// What the server tells a model about itself at `initialize`.
const INSTRUCTIONS: &str = "openrun runs commands in isolated Linux sandboxes (own filesystem, \
processes, network; no access to the host). Typical use: create_sandbox (image \"host\" has the \
host's userland: sh, bash, python3, coreutils), then run_command / write_file / read_file / \
edit_file with its sandbox_id; start_process + read_process_output for servers and long jobs; \
diff shows what changed; destroy_sandbox when done (sandboxes also expire after their ttl, 15m \
by default). The network is off unless create_sandbox asks for an allowlist.";

/// The `/mcp` route: rmcp's Streamable HTTP service behind the API-key check.
pub(crate) fn router(state: Shared) -> Router<Shared> {
    let tools = Arc::new(OpenrunMcp::tool_router());
    let edits = Arc::new(tools::EditLocks::default());
    let factory_state = state.clone();
    let config = StreamableHttpServerConfig::default()
        .disable_allowed_hosts()
        .with_max_request_body_bytes(MAX_MESSAGE);
    let manager = Arc::new(session_manager());
    let service = StreamableHttpService::new(
        move || {
            Ok(OpenrunMcp {
                state: factory_state.clone(),
                tools: tools.clone(),
                edits: edits.clone(),
            })
        },
        manager.clone(),
        config,
    );
    let sessions = sessions::Sessions::new(manager);
    sessions::Sessions::start_sweeper(&sessions);
    Router::new()
        .route_service("/mcp", service)
        // Innermost: sessions belong to the tenant of the key that opened them.
        .route_layer(middleware::from_fn_with_state(sessions, sessions::guard))
        // As on /v1: the caller's key on the request log line, inside authentication.
        .route_layer(middleware::from_fn(crate::metrics::tag_caller))
        .route_layer(middleware::from_fn_with_state(state, crate::api::auth))
}

/// rmcp's in-memory sessions, closed after [`SESSION_IDLE`] without a message. rmcp counts a
/// session idle while one of its tool calls runs, so the limit outlasts the longest call.
fn session_manager() -> LocalSessionManager {
    let mut manager = LocalSessionManager::default();
    manager.session_config.keep_alive = Some(SESSION_IDLE);
    manager
}

/// The MCP server of one session: the tools over the shared state.
#[derive(Clone)]
pub(crate) struct OpenrunMcp {
    state: Shared,
    tools: Arc<ToolRouter<OpenrunMcp>>,
    /// `edit_file`/`write_file` of one file wait for each other (shared by all sessions).
    edits: Arc<tools::EditLocks>,
}

#[tool_handler(router = self.tools)]
impl ServerHandler for OpenrunMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_protocol_version(PROTOCOL_VERSION)
            .with_server_info(
                Implementation::new("openrun", env!("CARGO_PKG_VERSION"))
                    .with_title("openrun sandboxes"),
            )
            .with_instructions(INSTRUCTIONS)
    }

    fn supported_protocol_versions(&self) -> Cow<'static, [ProtocolVersion]> {
        Cow::Borrowed(ProtocolVersion::known_up_to(&PROTOCOL_VERSION))
    }

    /// An unknown tool is a JSON-RPC error naming it (rmcp's says only "tool not found").
    /// Arguments that do not fit a tool's schema are a tool error (`isError`, naming the field),
    /// as MCP 2025-11-25 asks for input validation errors, so a model can correct them.
    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        if !self.tools.has_route(&request.name) {
            return Err(ErrorData::invalid_params(
                format!(
                    "unknown tool {:?}: tools/list shows this server's tools",
                    request.name
                ),
                None,
            ));
        }
        let call = ToolCallContext::new(self, request, context);
        self.tools.call(call).await
    }
}

/// The authenticated caller of the request a tool call came in, and the request's headers
/// (the host a preview URL is made for). A tool parameter.
pub(crate) struct Who {
    caller: Caller,
    headers: HeaderMap,
}

impl<C: AsRequestContext> FromContextPart<C> for Who {
    fn from_context_part(context: &mut C) -> Result<Self, ErrorData> {
        let parts = context
            .as_request_context()
            .extensions
            .get::<axum::http::request::Parts>();
        let caller = parts.and_then(|p| p.extensions.get::<Caller>());
        match (parts, caller) {
            (Some(parts), Some(caller)) => Ok(Who {
                caller: caller.clone(),
                headers: parts.headers.clone(),
            }),
            // The middleware of [`router`] puts it there before rmcp sees the request.
            _ => Err(ErrorData::internal_error(
                "the request carries no authenticated caller",
                None,
            )),
        }
    }
}

/// A failed core call as a tool result a model can act on: `isError`, the message, the
/// stable code, and what to do about it. Server faults are logged with their cause (the model
/// gets only the safe context, as a REST client does).
pub(crate) fn tool_error(e: ApiError) -> CallToolResult {
    let (_, code) = e.status_and_code();
    let mut result = refuse(code, e.reported());
    if let ApiError::TooManyRequests {
        retry_after_secs, ..
    } = e
    {
        result.content.push(ContentBlock::text(format!(
            "Retry in {retry_after_secs} s."
        )));
    }
    result
}

/// A tool error with its stable `code` (the API's codes) and message, and a hint of what to
/// do when there is one.
pub(crate) fn refuse(code: &str, message: impl Into<String>) -> CallToolResult {
    let message = message.into();
    let mut text = format!("Error ({code}): {message}");
    if let Some(hint) = hint(code, &message) {
        text.push('\n');
        text.push_str(hint);
    }
    let mut result = CallToolResult::error(vec![ContentBlock::text(text)]);
    result.structured_content = Some(serde_json::json!({
        "error": { "code": code, "message": message }
    }));
    result
}

/// What to do about an error, when there is more to say than its message.
fn hint(code: &str, message: &str) -> Option<&'static str> {
    Some(match code {
        "not_found" if message.starts_with("no such sandbox") => {
            "Call list_sandboxes to see your sandboxes, or create_sandbox to make a new one."
        }
        "not_found" => "Check the path: list_files shows what a directory holds.",
        "command_not_found" => {
            "The program is not installed in the sandbox or not on its PATH: the environment tool \
             lists the tools found; give an absolute path, or use another image."
        }
        "no_such_process" => {
            "No process with that pid (it may have been released after it ended): start_process \
             returns the pid to use, list_processes shows them."
        }
        "sandbox_not_running" => {
            "The sandbox has stopped (its ttl may have run out): create_sandbox makes a new one."
        }
        "sandbox_paused" => "The sandbox is paused: resume it (openrun CLI or REST) first.",
        "internal" | "agent_lost" => "This is a server-side failure; retrying may help.",
        "insufficient_storage" => {
            "The server's disk is full: retrying will not help until its operator frees space."
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_errors_say_what_to_do() {
        let result = tool_error(ApiError::NotFound("no such sandbox: abc".into()));
        assert_eq!(result.is_error, Some(true));
        let text = serde_json::to_string(&result.content).unwrap();
        assert!(text.contains("no such sandbox: abc"), "{text}");
        assert!(text.contains("list_sandboxes"), "{text}");
        assert_eq!(
            result.structured_content.unwrap()["error"]["code"],
            "not_found"
        );
        let internal = tool_error(ApiError::internal("cannot do it", "secret detail"));
        let text = serde_json::to_string(&internal.content).unwrap();
        assert!(!text.contains("secret detail"), "{text}");
    }

    #[test]
    fn the_tools_have_schemas_and_descriptions() {
        let tools = OpenrunMcp::tool_router().list_all();
        let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
        for name in [
            "create_sandbox",
            "list_sandboxes",
            "destroy_sandbox",
            "run_command",
            "start_process",
            "read_process_output",
            "kill_process",
            "write_process_stdin",
            "read_file",
            "write_file",
            "list_files",
            "edit_file",
            "environment",
            "snapshot",
            "fork",
            "diff",
            "preview_url",
            "timeline",
            "up",
        ] {
            assert!(names.contains(&name), "{name} missing from {names:?}");
        }
        for tool in &tools {
            let description = tool.description.as_deref().unwrap_or("");
            assert!(description.len() > 40, "{}: {description:?}", tool.name);
            assert_eq!(
                tool.input_schema.get("type").and_then(|v| v.as_str()),
                Some("object"),
                "{}",
                tool.name
            );
        }
    }
}
