//! `openrun up`'s planning, pure and testable without sandboxes: a repository (seen through
//! [`tree::RepoTree`], a directory on the client or the tar the server received) becomes a
//! [`plan::Plan`]: base image, system packages, setup steps, test and start commands, ports,
//! resources. Its sources, in order: `.devcontainer/devcontainer.json` or `.devcontainer.json`
//! ([`devcontainer`]), a `Dockerfile`, then language detection ([`detect`]). A plan that set
//! up a sandbox is remembered as a recipe ([`recipe`]): a generated devcontainer.json and a key
//! over the repository and the digests of the files the plan depends on.

pub mod detect;
pub mod devcontainer;
pub mod error;
pub mod jsonc;
pub mod plan;
pub mod recipe;
pub mod tree;

pub use detect::plan_for;
pub use error::PlanError;
pub use plan::{BaseImage, Command, Phase, Plan, PlanSource, Resources, Step};
pub use tree::RepoTree;
