//! The OpenAPI 3.1 document of the API, generated from the handlers' `#[utoipa::path]`
//! annotations as the router is built (see [`crate::api::router`]) and served at
//! `GET /v1/openapi.json`.
//!
//! Conventions the annotations follow: every authenticated operation inherits the global
//! `api_key` (HTTP bearer) requirement; error answers reference [`ErrorBody`]; raw-byte bodies
//! are `application/octet-stream` and streams `application/x-ndjson`.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// Name of the security scheme in the document (spelled out in [`ApiDoc`]'s attribute too).
pub const SECURITY_SCHEME: &str = "api_key";

/// The document's fixed parts: info, security, shared schemas and tags. Paths are added by
/// the router.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "openrun",
        description = "Isolated Linux sandboxes for AI coding agents: sandboxes, processes, \
                       files and their timeline. Every operation but `GET /v1/health` and \
                       `GET /v1/openapi.json` needs `Authorization: Bearer <key>`."
    ),
    modifiers(&BearerAuth),
    security(("api_key" = [])),
    components(schemas(ErrorBody, LimitsSchema)),
    tags(
        (name = "meta", description = "Health and this document"),
        (name = "sandboxes", description = "Sandbox lifecycle and timeline"),
        (name = "processes", description = "Commands and their output"),
        (name = "files", description = "Files inside a sandbox"),
        (name = "images", description = "Snapshots, forks and diffs of sandboxes"),
        (name = "previews", description = "HTTP and WebSocket into a port inside a sandbox \
                                           (the API key, or a preview token)"),
        (name = "up", description = "A repository to a ready sandbox (openrun up) and its \
                                     remembered setups (recipes)"),
    )
)]
pub struct ApiDoc;

/// Registers the bearer scheme every operation requires.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            SECURITY_SCHEME,
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Body of every error answer.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct ErrorBody {
    /// Machine-readable code, e.g. `invalid_argument`, `not_found`, `sandbox_not_running`.
    code: String,
    /// What went wrong, for humans.
    message: String,
}

/// The error answers an authenticated operation can give, documented once for all of them.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum ErrorAnswers {
    /// The request is malformed or asks for something impossible (`invalid_argument`, ...).
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No API key, or an unknown one (`unauthorized`).
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// A path that leaves the sandbox or is not permitted (`forbidden`).
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// No such sandbox for this key (another tenant's ids included), process or file.
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// The sandbox is not running, or the target already exists / is still running.
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// The body is larger than accepted (`body_too_large`).
    #[response(status = 413)]
    TooLarge(ErrorBody),
}

/// Resource limits of a sandbox (`null`: not limited beyond the host's defaults).
#[derive(Debug, ToSchema)]
#[schema(as = Limits)]
#[allow(dead_code)]
pub struct LimitsSchema {
    /// Memory limit in bytes.
    memory_bytes: Option<u64>,
    /// CPU limit in thousandths of a CPU (1500 = 1.5 CPUs).
    cpu_millis: Option<u64>,
    /// Maximum number of processes and threads.
    pids: Option<u64>,
    /// Quota of the writable layer in bytes (writes past it fail with `EDQUOT`).
    disk_bytes: Option<u64>,
    /// Open files per process (`RLIMIT_NOFILE`); 65536 when null.
    open_files: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_documented_and_errors_use_the_error_schema() {
        let doc = crate::api::openapi_document();
        let json = serde_json::to_value(&doc).expect("document serializes");
        assert_eq!(json["openapi"].as_str().map(|v| &v[..2]), Some("3."));
        let paths = json["paths"].as_object().expect("paths");
        let mut operation_ids = std::collections::BTreeSet::new();
        for expected in [
            "/v1/health",
            "/v1/openapi.json",
            "/v1/sandboxes",
            "/v1/sandboxes/{id}",
            "/v1/sandboxes/{id}/exec",
            "/v1/sandboxes/{id}/events",
            "/v1/sandboxes/{id}/files",
            "/v1/sandboxes/{id}/processes/{pid}/output",
        ] {
            assert!(paths.contains_key(expected), "{expected} is not documented");
        }
        for (path, item) in paths {
            for (method, op) in item.as_object().expect("path item") {
                let id = op["operationId"].as_str().expect("operationId").to_string();
                assert!(
                    operation_ids.insert(id.clone()),
                    "operationId {id} is not unique"
                );
                let responses = op["responses"].as_object().expect("responses");
                assert!(!responses.is_empty(), "{method} {path} has no responses");
                for (status, answer) in responses {
                    if status.starts_with('4') {
                        let schema = &answer["content"]["application/json"]["schema"]["$ref"];
                        assert_eq!(
                            schema, "#/components/schemas/ErrorBody",
                            "{method} {path} {status}"
                        );
                    }
                }
                if path != "/v1/health" && path != "/v1/openapi.json" {
                    assert!(
                        op.get("security").is_none(),
                        "{method} {path} overrides the bearer requirement"
                    );
                    assert!(
                        responses.contains_key("401"),
                        "{method} {path} does not document 401"
                    );
                }
            }
        }
        let scheme = &json["components"]["securitySchemes"][SECURITY_SCHEME];
        assert_eq!(scheme["scheme"], "bearer");
    }
}
