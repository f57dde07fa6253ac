//! JSON with comments and trailing commas (devcontainer.json's format), with positions in
//! errors.
//!
//! Parsing is dprint's `jsonc-parser` (the scanner VS Code-style tools use in Rust), limited to
//! what devcontainer.json allows: `//` and `/* */` comments and trailing commas. Its other
//! JSON5-like extensions (unquoted keys, single quotes, hexadecimal numbers, missing commas...)
//! are refused, so a file accepted here is accepted by the other devcontainer tools.

use jsonc_parser::ast::Value as Ast;
use jsonc_parser::ParseOptions;
use jsonc_parser::{CollectOptions, CommentCollectionStrategy};

/// A syntax error, with its 1-based position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{line}:{column}: {message}")]
pub struct JsoncError {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

/// The options: JSON plus comments and trailing commas, nothing else.
fn options() -> ParseOptions {
    ParseOptions {
        allow_comments: true,
        allow_trailing_commas: true,
        allow_loose_object_property_names: false,
        allow_missing_commas: false,
        allow_single_quoted_strings: false,
        allow_hexadecimal_numbers: false,
        allow_unary_plus_numbers: false,
        allow_bare_decimal_point_numbers: false,
        allow_non_finite_numbers: false,
        allow_extended_string_escapes: false,
    }
}

fn error(e: jsonc_parser::errors::ParseError) -> JsoncError {
    JsoncError {
        line: e.line_display(),
        column: e.column_display(),
        message: e.kind().to_string().to_lowercase(),
    }
}

/// Parses `text` (an empty text is `null`). Of duplicate keys the last one counts, as in
/// JavaScript.
pub fn parse(text: &str) -> Result<serde_json::Value, JsoncError> {
    jsonc_parser::parse_to_serde_value(text, &options()).map_err(error)
}

/// The keys of the object at `path` (keys from the top-level object down), in the order the
/// text has them (a [`serde_json::Value`]'s objects are sorted); empty when there is no such
/// object or the text is invalid.
pub fn keys_in_order(text: &str, path: &[&str]) -> Vec<String> {
    let collect = CollectOptions {
        comments: CommentCollectionStrategy::Off,
        tokens: false,
    };
    let Ok(parsed) = jsonc_parser::parse_to_ast(text, &collect, &options()) else {
        return Vec::new();
    };
    let mut value = parsed.value.as_ref();
    for key in path {
        value = match value {
            Some(Ast::Object(object)) => object
                .properties
                .iter()
                .rev()
                .find(|p| p.name.as_str() == *key)
                .map(|p| &p.value),
            _ => None,
        };
    }
    let Some(Ast::Object(object)) = value else {
        return Vec::new();
    };
    let mut keys: Vec<String> = Vec::new();
    for property in &object.properties {
        let name = property.name.as_str();
        if !keys.iter().any(|k| k == name) {
            keys.push(name.to_string());
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn comments_and_trailing_commas() {
        let text = r#"// a devcontainer
{
    /* the image */ "image": "debian:bookworm", // trailing comment
    "forwardPorts": [3000, 8080,],
    "containerEnv": {
        "URL": "http://example.com/a//b", // a string with // inside
        "GLOB": "/* not a comment */",
    },
}
"#;
        assert_eq!(
            parse(text).unwrap(),
            json!({
                "image": "debian:bookworm",
                "forwardPorts": [3000, 8080],
                "containerEnv": {"URL": "http://example.com/a//b", "GLOB": "/* not a comment */"}
            })
        );
    }

    #[test]
    fn plain_json_and_empty_text() {
        assert_eq!(
            parse(r#"{"a": [1, 2.5, true, null]}"#).unwrap(),
            json!({"a": [1, 2.5, true, null]})
        );
        assert_eq!(parse("  // nothing\n").unwrap(), serde_json::Value::Null);
        assert_eq!(parse(r#"{"a": 1, "a": 2}"#).unwrap(), json!({"a": 2}));
        assert_eq!(
            parse(r#"{"s": "é\u00e9\n"}"#).unwrap(),
            json!({"s": "éé\n"})
        );
    }

    #[test]
    fn errors_have_positions() {
        let err = parse("{\n  \"image\": \"x\"\n  \"name\": 1\n}").unwrap_err();
        // The comma is missing right after `"x"`.
        assert_eq!((err.line, err.column), (2, 15), "{err}");
        let err = parse("{\n  \"a\": [1, 2\n").unwrap_err();
        assert_eq!((err.line, err.column), (3, 1), "{err}");
        let err = parse("{\"a\": 1} /* open").unwrap_err();
        assert!(err.message.contains("comment"), "{err}");
        let err = parse("{\n    \"é\": tru }").unwrap_err();
        assert_eq!((err.line, err.column), (2, 10), "{err}");
        let err = parse("{\"a\": 1}{}").unwrap_err();
        assert_eq!((err.line, err.column), (1, 9), "{err}");
    }

    #[test]
    fn json5_extensions_are_refused() {
        for text in [
            "{a: 1}",
            "{'a': 1}",
            r#"{"a": 0x10}"#,
            r#"{"a": +1}"#,
            r#"{"a": .5}"#,
            r#"{"a": NaN}"#,
            r#"{"a": 1 "b": 2}"#,
        ] {
            assert!(parse(text).is_err(), "{text}");
        }
    }

    #[test]
    fn keys_keep_the_text_order() {
        let text = r#"{
            // setup
            "postCreateCommand": {"z": "1", "a": "2", /* c */ "m": ["3"], "a": "4",},
        }"#;
        assert_eq!(keys_in_order(text, &["postCreateCommand"]), ["z", "a", "m"]);
        assert!(keys_in_order(text, &["nothing"]).is_empty());
        assert!(keys_in_order("{", &[]).is_empty());
        assert_eq!(keys_in_order(text, &[]), ["postCreateCommand"]);
    }
}
