//! Image names: `name[:tag]`.
//!
//! A name is 1 to 128 characters of `a-z 0-9 . _ / -`, starting with a letter or digit, made
//! of `/`-separated components that are neither empty nor start with a dot (so no `..`, no
//! hidden directories) and do not end in `.json` (a name is a directory of the store and a tag
//! its `<tag>.json` file). A tag is 1 to 128 characters of `A-Z a-z 0-9 . _ -` starting with a
//! letter, digit or `_` (Docker's rule); it defaults to `latest`. `host` is the built-in image.

use std::fmt;

use crate::error::{ImageError, Result};

/// The tag of a name given without one.
pub const DEFAULT_TAG: &str = "latest";
/// The built-in image backed by the host's own userland (never in the store).
pub const HOST: &str = "host";
/// Longest name (and longest tag).
pub const MAX_NAME: usize = 128;

/// A parsed and checked `name:tag`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ImageRef {
    /// The name (may contain `/`).
    pub name: String,
    /// The tag.
    pub tag: String,
}

impl ImageRef {
    /// Parses `name[:tag]`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |reason: &str| ImageError::InvalidName {
            name: s.to_string(),
            reason: reason.to_string(),
        };
        let (name, tag) = match s.rsplit_once(':') {
            Some((n, t)) => (n, t),
            None => (s, DEFAULT_TAG),
        };
        check_name(name).map_err(|r| bad(&r))?;
        check_tag(tag).map_err(|r| bad(&r))?;
        Ok(Self {
            name: name.to_string(),
            tag: tag.to_string(),
        })
    }

    /// Whether this is the built-in `host` image.
    pub fn is_host(&self) -> bool {
        self.name == HOST
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.tag)
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    if name.len() > MAX_NAME {
        return Err(format!("longer than {MAX_NAME} characters"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '/' | '-'))
    {
        return Err(format!(
            "{c:?} is not allowed (use a-z, 0-9, '.', '_', '/', '-')"
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("it must start with a letter or digit".into());
    }
    for component in name.split('/') {
        if component.is_empty() {
            return Err("empty path component".into());
        }
        if component.starts_with('.') {
            return Err(format!("component {component:?} starts with a dot"));
        }
        if component.ends_with(".json") {
            return Err(format!("component {component:?} ends with .json"));
        }
    }
    Ok(())
}

fn check_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() {
        return Err("the tag is empty".into());
    }
    if tag.len() > MAX_NAME {
        return Err(format!("the tag is longer than {MAX_NAME} characters"));
    }
    if !tag.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
        return Err("the tag must start with a letter, digit or '_'".into());
    }
    if let Some(c) = tag
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{c:?} is not allowed in a tag (use A-Z, a-z, 0-9, '.', '_', '-')"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_tags() {
        let r = ImageRef::parse("busybox").unwrap();
        assert_eq!((r.name.as_str(), r.tag.as_str()), ("busybox", "latest"));
        let r = ImageRef::parse("team/py-3.12:v1.0_rc").unwrap();
        assert_eq!(r.to_string(), "team/py-3.12:v1.0_rc");
        assert!(ImageRef::parse("host").unwrap().is_host());
        for bad in [
            "",
            ":x",
            "Upper",
            "a b",
            "../x",
            "a/../b",
            "a//b",
            "a/",
            "/a",
            "a/.hidden",
            "-a",
            "a:",
            "a:-x",
            "a:x/y",
            "a/latest.json",
            "a:b:c",
        ] {
            let err = ImageRef::parse(bad).unwrap_err();
            assert!(err.is_user_error(), "{bad}");
            assert!(err.to_string().contains("invalid image name"), "{err}");
        }
        assert!(ImageRef::parse(&"a".repeat(129)).is_err());
        assert!(ImageRef::parse(&"a".repeat(128)).is_ok());
    }
}
