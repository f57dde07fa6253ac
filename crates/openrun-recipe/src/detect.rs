//! The order of sources: devcontainer.json, then a Dockerfile, then languages.

use crate::error::PlanError;
use crate::plan::Plan;
use crate::tree::RepoTree;

/// The plan for the repository `tree`, named `name` (its directory or the URL's last part,
/// which names the workspace `/workspaces/<name>`).
pub fn plan_for(tree: &dyn RepoTree, name: &str) -> Result<Plan, PlanError> {
    let _ = (tree, name);
    Err(PlanError::NoProject)
}
