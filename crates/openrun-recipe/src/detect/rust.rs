//! Rust: `Cargo.toml` (a package or a workspace) and `Cargo.lock`.

use super::{version_numbers, Found, Repo};
use crate::error::PlanError;

/// The Rust of Debian bookworm's `rustc-web`.
const DEBIAN_RUST: [u64; 2] = [1, 85];

/// Crates of `Cargo.lock` that build against a system library, and its Debian package.
const NATIVE: [(&str, &str); 10] = [
    ("alsa-sys", "libasound2-dev"),
    ("clang-sys", "libclang-dev"),
    ("cmake", "cmake"),
    ("libdbus-sys", "libdbus-1-dev"),
    ("libsqlite3-sys", "libsqlite3-dev"),
    ("libudev-sys", "libudev-dev"),
    ("openssl-sys", "libssl-dev"),
    ("pq-sys", "libpq-dev"),
    ("prost-build", "protobuf-compiler"),
    ("yeslogic-fontconfig-sys", "libfontconfig1-dev"),
];

pub(super) fn detect(repo: &Repo) -> Result<Option<Found>, PlanError> {
    let Some(manifest) = repo.toml("Cargo.toml")? else {
        return Ok(None);
    };
    if !manifest.contains_key("package") && !manifest.contains_key("workspace") {
        return Err(PlanError::invalid(
            "Cargo.toml",
            "neither a [package] nor a [workspace] table",
        ));
    }
    let mut f = Found::new("rust");
    f.inputs(
        repo,
        &[
            "Cargo.toml",
            "Cargo.lock",
            "rust-toolchain",
            "rust-toolchain.toml",
        ],
    );
    let lock = repo.text("Cargo.lock")?;
    if let Some(lock) = &lock {
        for (krate, package) in NATIVE {
            if lock.contains(&format!("name = \"{krate}\"\n")) {
                f.package(package);
            }
        }
        if lock.contains("source = \"git+") {
            f.package("git");
            f.notes.push(
                "Cargo.lock has git dependencies: their hosts are not in the network allowlist"
                    .into(),
            );
        }
    }
    let locked = if lock.is_some() { " --locked" } else { "" };
    let lockfile = if lock.is_some() {
        "Cargo.lock"
    } else {
        "Cargo.toml"
    };
    f.step("install", lockfile, &[format!("cargo fetch{locked}")]);
    f.step(
        "build",
        "Cargo.toml",
        &[format!("cargo build --all-targets{locked}")],
    );
    f.test("cargo test", true);
    if let Some(file) = repo.first(&["rust-toolchain.toml", "rust-toolchain"]) {
        f.notes.push(format!(
            "{file} is not followed: the plan uses Debian's Rust {}.{}",
            DEBIAN_RUST[0], DEBIAN_RUST[1]
        ));
    }
    let rust_version = manifest
        .get("package")
        .and_then(|p| p.get("rust-version"))
        .or_else(|| {
            manifest
                .get("workspace")
                .and_then(|w| w.get("package"))
                .and_then(|p| p.get("rust-version"))
        })
        .and_then(|v| v.as_str());
    if let Some(wanted) = rust_version {
        let v = version_numbers(wanted);
        if v.len() >= 2 && v[..2] > DEBIAN_RUST[..] {
            f.notes.push(format!(
                "Cargo.toml asks for Rust {wanted}; Debian bookworm has {}.{}",
                DEBIAN_RUST[0], DEBIAN_RUST[1]
            ));
        }
    }
    Ok(Some(f))
}
