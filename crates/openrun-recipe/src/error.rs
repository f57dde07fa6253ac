//! What can go wrong while planning.

/// A repository's file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// Larger than [`crate::tree::MAX_READ`].
    #[error("{path} is larger than {limit} bytes")]
    TooLarge {
        /// The file.
        path: String,
        /// The limit.
        limit: u64,
    },
    /// An I/O error.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The archive is not a valid tar.
    #[error("the repository archive is not a valid tar: {0}")]
    BadArchive(String),
}

/// Why no plan could be made. Each names the file (and for a syntax error, where in it).
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// Nothing recognisable.
    #[error("no recognizable project: found no .devcontainer/devcontainer.json, .devcontainer.json, Dockerfile or manifest of a supported language (Cargo.toml, pyproject.toml, setup.py, requirements.txt, Pipfile, package.json, go.mod, pom.xml, build.gradle, Gemfile, CMakeLists.txt, Makefile)")]
    NoProject,
    /// A file is not valid: syntax (with line and column) or meaning.
    #[error("{file}{}: {message}", location(*line, *column))]
    Invalid {
        /// The file, relative to the repository.
        file: String,
        /// 1-based line, when known.
        line: Option<usize>,
        /// 1-based column, when known.
        column: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// A file could not be read.
    #[error(transparent)]
    Tree(#[from] TreeError),
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

impl PlanError {
    /// An invalid file without a position.
    pub fn invalid(file: &str, message: impl Into<String>) -> Self {
        PlanError::Invalid {
            file: file.to_string(),
            line: None,
            column: None,
            message: message.into(),
        }
    }

    /// The error code an up reports for it (the same on the server and in the CLI):
    /// `no_project`; `invalid_config` for a file that is not valid, too large or unreadable
    /// (the error names it); `invalid_repository` for an archive that is not a valid tar or
    /// is over a limit.
    pub fn code(&self) -> &'static str {
        match self {
            PlanError::NoProject => "no_project",
            PlanError::Invalid { .. }
            | PlanError::Tree(TreeError::TooLarge { .. } | TreeError::Io { .. }) => {
                "invalid_config"
            }
            PlanError::Tree(TreeError::BadArchive(_)) => "invalid_repository",
        }
    }

    /// The file the error is about, if one.
    pub fn file(&self) -> Option<&str> {
        match self {
            PlanError::Invalid { file, .. } => Some(file),
            PlanError::Tree(TreeError::TooLarge { path, .. } | TreeError::Io { path, .. }) => {
                Some(path)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_name_the_kind_of_failure() {
        assert_eq!(PlanError::NoProject.code(), "no_project");
        let invalid = PlanError::invalid("package.json", "bad");
        assert_eq!(
            (invalid.code(), invalid.file()),
            ("invalid_config", Some("package.json"))
        );
        let large = PlanError::Tree(TreeError::TooLarge {
            path: "Cargo.lock".into(),
            limit: 1,
        });
        assert_eq!(
            (large.code(), large.file()),
            ("invalid_config", Some("Cargo.lock"))
        );
        let io = PlanError::Tree(TreeError::Io {
            path: "go.mod".into(),
            source: std::io::Error::other("x"),
        });
        assert_eq!((io.code(), io.file()), ("invalid_config", Some("go.mod")));
        let bad = PlanError::Tree(TreeError::BadArchive("x".into()));
        assert_eq!((bad.code(), bad.file()), ("invalid_repository", None));
    }
}
