//! Go: `go.mod` (and `go.sum`, `vendor/modules.txt`).

use super::{version_numbers, Found, Repo};
use crate::error::PlanError;

/// The Go of Debian bookworm.
const DEBIAN_GO: [u64; 2] = [1, 19];

pub(super) fn detect(repo: &Repo) -> Result<Option<Found>, PlanError> {
    let Some(text) = repo.text("go.mod")? else {
        return Ok(None);
    };
    let mut module = false;
    let mut requires = false;
    let mut go_version = None;
    let mut toolchain_line = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.split("//").next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        match words.next() {
            Some("module") => module = true,
            Some("require") => requires = true,
            Some("go") => go_version = words.next().map(|v| (v.to_string(), i + 1)),
            Some("toolchain") => toolchain_line = Some(i + 1),
            _ => {}
        }
    }
    if !module {
        return Err(PlanError::invalid("go.mod", "no module directive"));
    }
    let mut f = Found::new("go");
    f.inputs(
        repo,
        &[
            "go.mod",
            "go.sum",
            "vendor/modules.txt",
            "go.work",
            "go.work.sum",
        ],
    );
    if repo.file("vendor/modules.txt") {
        // Vendored: everything is in the tree.
    } else if requires {
        let file = if repo.file("go.sum") {
            "go.sum"
        } else {
            "go.mod"
        };
        f.step("install", file, &["go mod download".into()]);
    }
    f.step("build", "go.mod", &["go build ./...".into()]);
    f.test("go test ./...", true);
    if let Some((version, line)) = go_version {
        let v = version_numbers(&version);
        if v.len() >= 2 && v[..2] > DEBIAN_GO[..] {
            f.notes.push(format!(
                "go.mod:{line} asks for Go {version}; Debian bookworm has Go {}.{}",
                DEBIAN_GO[0], DEBIAN_GO[1]
            ));
        }
        if v.len() >= 3 {
            f.notes.push(format!(
                "go.mod:{line}: Go {}.{} cannot read a three-part go directive ({version})",
                DEBIAN_GO[0], DEBIAN_GO[1]
            ));
        }
    }
    if let Some(line) = toolchain_line {
        f.notes.push(format!(
            "go.mod:{line}: Go {}.{} does not know the toolchain directive",
            DEBIAN_GO[0], DEBIAN_GO[1]
        ));
    }
    Ok(Some(f))
}
