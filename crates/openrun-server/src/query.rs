//! Query strings (`?path=/x&parents=true`), decoded with `percent-encoding` into [`Query`]: every failure is a
//! 400 [`ApiError`] naming the parameter, and unknown parameters are refused.

use std::collections::BTreeMap;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::error::ApiError;

/// The decoded parameters of a request's query string.
#[derive(Debug, Default)]
pub struct Query(BTreeMap<String, String>);

/// Decodes one percent-encoded component (`+` is a space), refusing non-UTF-8.
fn decode(text: &str) -> Result<String, ApiError> {
    let spaced = text.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| {
            ApiError::InvalidArgument(format!(
                "query parameter {text:?} is not valid UTF-8 once decoded"
            ))
        })
}

impl<S: Send + Sync> FromRequestParts<S> for Query {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Query::parse(parts.uri.query().unwrap_or(""))
    }
}

impl Query {
    /// Parses `a=1&b=2` (percent-encoded, `+` is a space); a parameter given twice, or one
    /// that does not decode to UTF-8, is refused (never replaced lossily: it may be a path).
    pub fn parse(query: &str) -> Result<Self, ApiError> {
        let mut map = BTreeMap::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let k = decode(k)?;
            if map.insert(k.clone(), decode(v)?).is_some() {
                return Err(ApiError::InvalidArgument(format!(
                    "query parameter {k:?} given twice"
                )));
            }
        }
        Ok(Self(map))
    }

    /// Like [`Query::parse`], but the parameter `repeatable` may be given any number of times:
    /// its values come back apart, in order.
    pub fn parse_repeated(query: &str, repeatable: &str) -> Result<(Self, Vec<String>), ApiError> {
        let mut values = Vec::new();
        let mut rest = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if decode(k)? == repeatable {
                values.push(decode(v)?);
            } else {
                rest.push(pair);
            }
        }
        Ok((Self::parse(&rest.join("&"))?, values))
    }

    /// An optional parameter's value as given.
    pub fn string(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }

    /// Refuses any parameter not in `known`.
    pub fn only(&self, known: &[&str]) -> Result<(), ApiError> {
        match self.0.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(ApiError::InvalidArgument(format!(
                "unknown query parameter {k:?}: expected one of {known:?}"
            ))),
            None => Ok(()),
        }
    }

    /// A required parameter (a path: non-empty, no NUL).
    pub fn path(&self, name: &str) -> Result<String, ApiError> {
        match self.0.get(name) {
            Some(p) if !p.is_empty() && !p.contains('\0') => Ok(p.clone()),
            Some(_) => Err(ApiError::InvalidArgument(format!(
                "query parameter {name:?} must be a non-empty path without NUL"
            ))),
            None => Err(ApiError::InvalidArgument(format!(
                "query parameter {name:?} is required"
            ))),
        }
    }

    /// An optional parameter as given.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// An optional parameter parsed with `parse`.
    fn parsed<T>(
        &self,
        name: &str,
        what: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>, ApiError> {
        self.0
            .get(name)
            .map(|v| {
                parse(v).ok_or_else(|| {
                    ApiError::InvalidArgument(format!(
                        "query parameter {name:?} must be {what}, not {v:?}"
                    ))
                })
            })
            .transpose()
    }

    /// An optional unsigned number.
    pub fn u64(&self, name: &str) -> Result<Option<u64>, ApiError> {
        self.parsed(name, "a non-negative integer", |v| v.parse().ok())
    }

    /// An optional octal permission mode (`644`, `0755`).
    pub fn mode(&self, name: &str) -> Result<Option<u32>, ApiError> {
        self.parsed(name, "octal permission bits like 644", parse_mode)
    }

    /// An optional flag: `true` or `false` (missing is `false`).
    pub fn flag(&self, name: &str) -> Result<bool, ApiError> {
        Ok(self
            .parsed(name, "true or false", |v| match v {
                "true" | "1" => Some(true),
                "false" | "0" => Some(false),
                _ => None,
            })?
            .unwrap_or(false))
    }
}

/// Octal permission bits like `644`, `0755` or `0o755` (at most `7777`).
pub(crate) fn parse_mode(text: &str) -> Option<u32> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return None;
    }
    u32::from_str_radix(digits, 8).ok().filter(|m| *m <= 0o7777)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode_and_refuse_bad_values() {
        let q = Query::parse("path=%2Fa%20b+c&mode=0755&parents=true").unwrap();
        assert_eq!(q.path("path").unwrap(), "/a b c");
        assert_eq!(q.mode("mode").unwrap(), Some(0o755));
        assert!(q.flag("parents").unwrap());
        assert!(!q.flag("eof").unwrap());
        assert!(q.only(&["path", "mode"]).is_err());
        assert!(q.path("missing").is_err());
        // Invalid escapes pass through literally, as browsers and the URL standard do.
        assert_eq!(
            Query::parse("path=%zz").unwrap().path("path").unwrap(),
            "%zz"
        );
        // Bytes that are not UTF-8 are refused.
        assert!(Query::parse("path=%ff").is_err());
        assert!(Query::parse("a=1&a=2").is_err());
        assert!(Query::parse("mode=999").unwrap().mode("mode").is_err());
        assert!(Query::parse("n=-1").unwrap().u64("n").is_err());
        let (q, labels) =
            Query::parse_repeated("label=a%3Db&limit=2&label=c=d+e", "label").unwrap();
        assert_eq!(labels, ["a=b", "c=d e"]);
        assert_eq!(q.u64("limit").unwrap(), Some(2));
        assert!(Query::parse_repeated("limit=1&limit=2", "label").is_err());
    }
}
