//! C and C++: CMake (`CMakeLists.txt`), autotools (`configure`) or a plain Makefile. Only
//! consulted when no other language is found.

use super::{version_numbers, Found, Repo};
use crate::error::PlanError;

/// The CMake of Debian bookworm.
const DEBIAN_CMAKE: [u64; 2] = [3, 25];

/// `find_package(X)` names and the Debian package that provides them.
const FIND_PACKAGE: [(&str, &str); 14] = [
    ("benchmark", "libbenchmark-dev"),
    ("boost", "libboost-dev"),
    ("catch2", "catch2"),
    ("curl", "libcurl4-openssl-dev"),
    ("eigen3", "libeigen3-dev"),
    ("fmt", "libfmt-dev"),
    ("gtest", "libgtest-dev"),
    ("googletest", "libgtest-dev"),
    ("nlohmann_json", "nlohmann-json3-dev"),
    ("openssl", "libssl-dev"),
    ("pkgconfig", "pkg-config"),
    ("spdlog", "libspdlog-dev"),
    ("sqlite3", "libsqlite3-dev"),
    ("zlib", "zlib1g-dev"),
];

pub(super) fn detect(repo: &Repo) -> Result<Option<Found>, PlanError> {
    if let Some(cmake) = repo.text("CMakeLists.txt")? {
        let mut f = Found::new("c++");
        f.inputs(
            repo,
            &[
                "CMakeLists.txt",
                "CMakePresets.json",
                "vcpkg.json",
                "conanfile.txt",
            ],
        );
        let lower = cmake.to_ascii_lowercase();
        for (name, package) in FIND_PACKAGE {
            let mut rest = lower.as_str();
            while let Some(i) = rest.find("find_package(") {
                rest = &rest[i + "find_package(".len()..];
                let word: String = rest
                    .trim_start()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if word == name {
                    f.package(package);
                }
            }
        }
        if let Some(i) = lower.find("cmake_minimum_required(") {
            let args = &lower[i + "cmake_minimum_required(".len()..];
            let args = args.split(')').next().unwrap_or("");
            let minimum = args
                .split_whitespace()
                .skip_while(|w| *w != "version")
                .nth(1)
                .map(|v| version_numbers(v.split("...").next().unwrap_or(v)));
            if let Some(v) = minimum.filter(|v| v.len() >= 2 && v[..2] > DEBIAN_CMAKE[..]) {
                f.notes.push(format!(
                    "CMakeLists.txt asks for CMake {}.{}; Debian bookworm has {}.{}",
                    v[0], v[1], DEBIAN_CMAKE[0], DEBIAN_CMAKE[1]
                ));
            }
        }
        if lower.contains("fetchcontent") {
            f.notes.push(
                "CMakeLists.txt uses FetchContent: its hosts are not in the network allowlist"
                    .into(),
            );
        }
        f.step(
            "configure",
            "CMakeLists.txt",
            &["cmake -S . -B build".into()],
        );
        f.step(
            "build",
            "CMakeLists.txt",
            &["cmake --build build -j2".into()],
        );
        let tests = [
            "add_test",
            "enable_testing",
            "include(ctest)",
            "_discover_tests",
        ];
        if tests.iter().any(|t| lower.contains(t)) {
            f.test("ctest --test-dir build --output-on-failure", true);
        }
        return Ok(Some(f));
    }
    let makefile = repo.first(&["GNUmakefile", "makefile", "Makefile"]);
    let configure = repo.file("configure");
    if makefile.is_none() && !configure {
        return Ok(None);
    }
    let mut f = Found::new("c++");
    f.packages.retain(|p| p != "cmake");
    f.inputs(repo, &["configure", "GNUmakefile", "makefile", "Makefile"]);
    let mut targets = String::new();
    if configure && makefile.is_none() {
        f.step("configure", "configure", &["sh ./configure".into()]);
        targets.push_str(&repo.text_or_empty("Makefile.in")?);
        targets.push_str(&repo.text_or_empty("Makefile.am")?);
    }
    if let Some(file) = makefile {
        targets.push_str(&repo.text_or_empty(file)?);
    }
    let file = makefile.unwrap_or("configure");
    f.step("build", file, &["make -j2".into()]);
    let has_target = |name: &str| {
        targets.lines().any(|l| {
            l.strip_prefix(name).is_some_and(|rest| {
                rest.trim_start().starts_with(':') && !rest.trim_start().starts_with(":=")
            })
        })
    };
    if has_target("test") {
        f.test("make test", true);
    } else if has_target("check") || (configure && makefile.is_none() && targets.contains("TESTS"))
    {
        f.test("make check", true);
    }
    Ok(Some(f))
}
