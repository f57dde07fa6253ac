//! See [the module index](super).

use axum::Router;

use crate::api::Shared;

/// The control-plane routes.
pub(super) fn routes(state: Shared) -> Router<Shared> {
    let _ = state;
    Router::new()
}
