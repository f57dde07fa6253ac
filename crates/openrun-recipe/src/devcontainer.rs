//! devcontainer.json (the Development Containers specification) to a plan.
