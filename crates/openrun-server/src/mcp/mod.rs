//! MCP (Model Context Protocol) over Streamable HTTP at `/mcp`, for agents: tools over the same
//! core calls as `/v1`. `openrun mcp` bridges stdio to it.

use axum::Router;

use crate::api::Shared;

/// The `/mcp` route.
pub(crate) fn router(state: Shared) -> Router<Shared> {
    let _ = state;
    Router::new()
}
