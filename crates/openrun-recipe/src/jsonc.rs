//! JSON with comments and trailing commas (devcontainer.json's format), with positions in
//! errors.
