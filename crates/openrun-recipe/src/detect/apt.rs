//! Extra Debian packages: `apt.txt` (repo2docker) or `Aptfile` (Heroku), one package a line,
//! `#` starting a comment.

use super::Repo;
use crate::error::PlanError;

/// The files read, in order.
const FILES: [&str; 2] = ["apt.txt", "Aptfile"];

/// Packages named by the repository, and the files that named them.
#[derive(Debug, Default)]
pub(super) struct Extra {
    pub(super) packages: Vec<String>,
    pub(super) files: Vec<String>,
}

/// The packages of `apt.txt` and `Aptfile`. A word that is not a Debian package name (an
/// Aptfile's `:repo:` line or `.deb` URL, a version pin) is an error naming the file and line.
pub(super) fn read(repo: &Repo) -> Result<Extra, PlanError> {
    let mut extra = Extra::default();
    for file in FILES {
        let Some(text) = repo.text(file)? else {
            continue;
        };
        extra.files.push(file.to_string());
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("");
            let mut column = 1;
            let mut rest = line;
            while let Some(start) = rest.find(|c: char| !c.is_whitespace()) {
                column += rest[..start].chars().count();
                let word_len = rest[start..]
                    .find(char::is_whitespace)
                    .unwrap_or(rest.len() - start);
                let word = &rest[start..start + word_len];
                if !valid_package(word) {
                    return Err(PlanError::Invalid {
                        file: file.to_string(),
                        line: Some(i + 1),
                        column: Some(column),
                        message: format!(
                            "{word:?} is not a Debian package name (lower-case letters, digits, \
                             '+', '-', '.'; at least two characters, starting with a letter or \
                             digit)"
                        ),
                    });
                }
                extra.packages.push(word.to_string());
                column += word.chars().count();
                rest = &rest[start + word_len..];
            }
        }
    }
    extra.packages.sort();
    extra.packages.dedup();
    Ok(extra)
}

/// Debian policy's package name syntax: `[a-z0-9][a-z0-9+.-]+`.
pub(super) fn valid_package(name: &str) -> bool {
    let bytes = name.as_bytes();
    bytes.len() >= 2
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes[1..]
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+.-".contains(b))
}
