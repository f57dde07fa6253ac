//! See [the module index](super).

use axum::Router;

use crate::api::Shared;

/// The routes of this module.
pub(super) fn routes() -> Router<Shared> {
    Router::new()
}
