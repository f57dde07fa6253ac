//! A remembered setup: the devcontainer.json that reproduces a plan, and the key that says
//! whether a repository is unchanged for it.
