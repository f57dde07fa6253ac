//! The order of sources: devcontainer.json, then a Dockerfile, then languages.

use std::collections::BTreeMap;

use crate::error::PlanError;
use crate::plan::Plan;
use crate::tree::RepoTree;

/// What a language needs on a Debian base: packages, environment and the hosts its package
/// manager downloads from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Toolchain {
    /// Debian packages.
    pub packages: Vec<String>,
    /// Environment (e.g. `CARGO_HOME`, `PATH` additions).
    pub env: BTreeMap<String, String>,
    /// Egress allowlist entries of its registries.
    pub network: Vec<String>,
}

/// The toolchain of `language` (`rust`, `python`, `node`, `go`, `java`, `ruby`, `c++`), or
/// `None` for a language this module does not know.
pub fn toolchain(language: &str) -> Option<Toolchain> {
    let _ = language;
    None
}

/// The plan for the repository `tree`, named `name` (its directory or the URL's last part,
/// which names the workspace `/workspaces/<name>`).
pub fn plan_for(tree: &dyn RepoTree, name: &str) -> Result<Plan, PlanError> {
    let _ = (tree, name);
    Err(PlanError::NoProject)
}
