"""Fixture repositories for `openrun up`, written into a directory by the tests (and by bench/up).

Each `make_<kind>(dir)` writes a small but real project: real dependencies from the registries a
sandbox can reach (crates.io, PyPI, npm, Debian) and a real test suite that must pass. Lockfiles
are made here with the host's own tools (cargo, npm), like a developer would commit them.

    python3 tests/python/up/up_fixtures.py KIND DIR     writes one fixture (for manual runs)
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path


def write(root: Path, files: dict[str, str]) -> Path:
    """Writes `files` (relative path -> text, dedented) under `root`."""
    root = Path(root)
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
    return root


def run(argv: list[str], cwd: Path, timeout: int = 300) -> str:
    """Runs a host tool in `cwd`; its output on failure."""
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} in {cwd} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


# --- Rust -------------------------------------------------------------------------------------

def make_rust(root: Path) -> Path:
    """A library using itoa and semver from crates.io (versions that build on Debian's rustc 1.85),
    a Cargo.lock made by the host's `cargo generate-lockfile`, and #[test]s using both."""
    write(root, {
        "Cargo.toml": """
            [package]
            name = "upfixture"
            version = "0.1.0"
            edition = "2021"

            [dependencies]
            itoa = "=1.0.11"
            semver = "=1.0.23"
        """,
        "src/lib.rs": """
            //! Formats numbers with itoa and compares versions with semver.

            /// `n` in decimal.
            pub fn decimal(n: u64) -> String {
                let mut buf = itoa::Buffer::new();
                buf.format(n).to_string()
            }

            /// Whether `version` satisfies `requirement`.
            pub fn satisfies(requirement: &str, version: &str) -> bool {
                let req = semver::VersionReq::parse(requirement).unwrap();
                req.matches(&semver::Version::parse(version).unwrap())
            }

            #[cfg(test)]
            mod tests {
                #[test]
                fn formats_with_itoa() {
                    assert_eq!(super::decimal(1234567890), "1234567890");
                }

                #[test]
                fn matches_with_semver() {
                    assert!(super::satisfies("^1.2", "1.4.0"));
                    assert!(!super::satisfies("^1.2", "2.0.0"));
                }
            }
        """,
        ".gitignore": "/target\n",
    })
    run(["cargo", "generate-lockfile"], root)
    return root


# --- Python -----------------------------------------------------------------------------------

PY_TEST = """
    import attr
    from packaging.version import Version


    @attr.s(frozen=True)
    class Point:
        x = attr.ib()
        y = attr.ib()


    def test_attrs():
        assert Point(1, 2) == Point(1, 2)
        assert attr.asdict(Point(1, 2)) == {"x": 1, "y": 2}


    def test_packaging():
        assert Version("1.10") > Version("1.9")
"""


def make_python(root: Path) -> Path:
    """requirements.txt pinning attrs, packaging and pytest (PyPI) and a pytest suite using them."""
    return write(root, {
        "requirements.txt": """
            attrs==23.2.0
            packaging==24.1
            pytest==8.3.3
        """,
        "tests/test_deps.py": PY_TEST,
        "app.py": """
            GREETING = "v1"
        """,
        "notes.txt": "a file a re-open after its deletion must not show\n",
    })


def make_python_pyproject(root: Path) -> Path:
    """A PEP 621 pyproject.toml (setuptools) with dependencies and a `test` extra holding pytest."""
    return write(root, {
        "pyproject.toml": """
            [build-system]
            requires = ["setuptools>=61"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "upfixture"
            version = "0.1.0"
            requires-python = ">=3.9"
            dependencies = ["attrs==23.2.0", "packaging==24.1"]

            [project.optional-dependencies]
            test = ["pytest==8.3.3"]

            [tool.setuptools]
            py-modules = ["upfixture"]
        """,
        "upfixture.py": """
            def answer():
                return 42
        """,
        "tests/test_deps.py": PY_TEST + """

    def test_own_module():
        import upfixture
        assert upfixture.answer() == 42
""",
    })


# --- Node -------------------------------------------------------------------------------------

def make_node(root: Path) -> Path:
    """package.json with is-number (npm), a package-lock.json made by the host's npm, and a
    `test` script running node's built-in test runner (node 18 in Debian)."""
    write(root, {
        "package.json": """
            {
              "name": "upfixture",
              "version": "1.0.0",
              "private": true,
              "dependencies": {
                "is-number": "7.0.0"
              },
              "scripts": {
                "test": "node --test test/"
              }
            }
        """,
        "index.js": """
            const isNumber = require("is-number");
            module.exports = { double: (x) => (isNumber(x) ? 2 * Number(x) : NaN) };
        """,
        "test/double.test.js": """
            const test = require("node:test");
            const assert = require("node:assert");
            const isNumber = require("is-number");
            const { double } = require("..");

            test("is-number is installed", () => {
              assert.strictEqual(isNumber("5"), true);
              assert.strictEqual(isNumber("five"), false);
            });

            test("double", () => {
              assert.strictEqual(double("21"), 42);
            });
        """,
        ".gitignore": "node_modules/\n",
    })
    run(["npm", "install", "--package-lock-only", "--no-audit", "--no-fund"], root)
    return root


def make_node_unresolvable(root: Path) -> Path:
    """A package-lock.json naming a version of is-number that does not exist: `npm ci` fails."""
    make_node(root)
    lock = (root / "package-lock.json").read_text()
    lock = lock.replace("is-number/-/is-number-7.0.0.tgz", "is-number/-/is-number-99.99.99.tgz")
    lock = lock.replace('"version": "7.0.0"', '"version": "99.99.99"')
    (root / "package-lock.json").write_text(lock)
    pkg = (root / "package.json").read_text().replace('"7.0.0"', '"99.99.99"')
    (root / "package.json").write_text(pkg)
    return root


# --- Go ---------------------------------------------------------------------------------------

GO_CMP_VERSION = "v0.5.9"


@functools.lru_cache(maxsize=None)
def go_cmp_source() -> Path:
    """The go-cmp module's source from Debian's golang-github-google-go-cmp-dev (downloaded once
    with `apt-get download`; the Go module proxy is not reachable from here)."""
    cache = Path(tempfile.gettempdir()) / "openrun-up-go-cmp"
    src = cache / "root/usr/share/gocode/src/github.com/google/go-cmp"
    if (src / "cmp/compare.go").is_file():
        return src
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    try:
        run(["apt-get", "download", "golang-github-google-go-cmp-dev"], cache)
    except RuntimeError:
        run(["apt-get", "update", "-qq"], cache, timeout=600)
        run(["apt-get", "download", "golang-github-google-go-cmp-dev"], cache)
    deb = next(cache.glob("golang-github-google-go-cmp-dev_*.deb"))
    run(["dpkg-deb", "-x", str(deb), "root"], cache)
    return src


def make_go(root: Path) -> Path:
    """go.mod (go 1.19, Debian's) requiring go-cmp, vendored from Debian's package (the cmp
    package tree only, no tests), and a _test.go using cmp.Diff."""
    src = go_cmp_source()
    vendor = root / "vendor/github.com/google/go-cmp"
    packages = []
    for dirpath, _, names in sorted(os.walk(src / "cmp")):
        d = Path(dirpath)
        rel = d.relative_to(src)
        if "cmpopts" in rel.parts or "testprotos" in rel.parts or "teststructs" in rel.parts:
            continue
        go = [n for n in names if n.endswith(".go") and not n.endswith("_test.go")]
        if not go:
            continue
        (vendor / rel).mkdir(parents=True, exist_ok=True)
        for n in go:
            shutil.copyfile(d / n, vendor / rel / n)
        packages.append("github.com/google/go-cmp/" + str(rel))
    modules = f"# github.com/google/go-cmp {GO_CMP_VERSION}\n## explicit; go 1.13\n"
    modules += "".join(p + "\n" for p in sorted(packages))
    (root / "vendor/modules.txt").write_text(modules)
    return write(root, {
        "go.mod": f"""
            module example.com/upfixture

            go 1.19

            require github.com/google/go-cmp {GO_CMP_VERSION}
        """,
        "shapes.go": """
            package upfixture

            // Point is a point.
            type Point struct{ X, Y int }

            // Move returns p moved by d.
            func Move(p Point, d int) Point { return Point{p.X + d, p.Y + d} }
        """,
        "shapes_test.go": """
            package upfixture

            import (
            	"testing"

            	"github.com/google/go-cmp/cmp"
            )

            func TestMove(t *testing.T) {
            	if diff := cmp.Diff(Point{3, 4}, Move(Point{1, 2}, 2)); diff != "" {
            		t.Fatalf("Move (-want +got):\\n%s", diff)
            	}
            	if cmp.Diff(Point{1, 1}, Point{1, 2}) == "" {
            		t.Fatal("cmp.Diff saw no difference")
            	}
            }
        """,
    })


# --- Java -------------------------------------------------------------------------------------

def make_java(root: Path) -> Path:
    """A Maven project compiling and running JUnit 4 tests offline from Debian's Maven repository
    (/usr/share/maven-repo, filled by the packages in apt.txt): the file repository takes Central's
    id (so Maven never asks the network), plugin versions are pinned to the ones Debian ships."""
    return write(root, {
        "pom.xml": """
            <?xml version="1.0" encoding="UTF-8"?>
            <project xmlns="http://maven.apache.org/POM/4.0.0"
                     xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
                     xsi:schemaLocation="http://maven.apache.org/POM/4.0.0 http://maven.apache.org/xsd/maven-4.0.0.xsd">
              <modelVersion>4.0.0</modelVersion>
              <groupId>com.example</groupId>
              <artifactId>upfixture</artifactId>
              <version>1.0</version>
              <packaging>jar</packaging>

              <properties>
                <project.build.sourceEncoding>UTF-8</project.build.sourceEncoding>
                <maven.compiler.release>17</maven.compiler.release>
              </properties>

              <repositories>
                <repository>
                  <id>central</id>
                  <url>file:///usr/share/maven-repo</url>
                  <releases><checksumPolicy>ignore</checksumPolicy></releases>
                </repository>
              </repositories>
              <pluginRepositories>
                <pluginRepository>
                  <id>central</id>
                  <url>file:///usr/share/maven-repo</url>
                  <releases><checksumPolicy>ignore</checksumPolicy></releases>
                </pluginRepository>
              </pluginRepositories>

              <dependencies>
                <dependency>
                  <groupId>junit</groupId>
                  <artifactId>junit</artifactId>
                  <version>4.13.2</version>
                  <scope>test</scope>
                </dependency>
              </dependencies>

              <build>
                <plugins>
                  <plugin>
                    <groupId>org.apache.maven.plugins</groupId>
                    <artifactId>maven-resources-plugin</artifactId>
                    <version>3.3.0</version>
                  </plugin>
                  <plugin>
                    <groupId>org.apache.maven.plugins</groupId>
                    <artifactId>maven-compiler-plugin</artifactId>
                    <version>3.10.1</version>
                  </plugin>
                  <plugin>
                    <groupId>org.apache.maven.plugins</groupId>
                    <artifactId>maven-surefire-plugin</artifactId>
                    <version>2.22.3</version>
                  </plugin>
                </plugins>
              </build>
            </project>
        """,
        "apt.txt": """
            junit4
            libsurefire-java
            libmaven-compiler-plugin-java
            libmaven-resources-plugin-java
        """,
        "src/main/java/com/example/Calc.java": """
            package com.example;

            /** Arithmetic. */
            public final class Calc {
                private Calc() {}

                /** a + b. */
                public static int add(int a, int b) {
                    return a + b;
                }
            }
        """,
        "src/test/java/com/example/CalcTest.java": """
            package com.example;

            import static org.junit.Assert.assertEquals;

            import org.junit.Test;

            public class CalcTest {
                @Test
                public void adds() {
                    assertEquals(5, Calc.add(2, 3));
                }
            }
        """,
    })


# --- Ruby -------------------------------------------------------------------------------------

def make_ruby(root: Path) -> Path:
    """A Gemfile with minitest and rake (Debian ships both with ruby: `bundle install --local`
    resolves them offline), its Gemfile.lock, a Rakefile with a test task and a minitest test."""
    return write(root, {
        "Gemfile": """
            source "https://rubygems.org"

            gem "minitest", "~> 5.15"
            gem "rake", "~> 13.0"
        """,
        "Gemfile.lock": """
            GEM
              remote: https://rubygems.org/
              specs:
                minitest (5.15.0)
                rake (13.0.6)

            PLATFORMS
              ruby

            DEPENDENCIES
              minitest (~> 5.15)
              rake (~> 13.0)

            BUNDLED WITH
               2.3.7
        """,
        "Rakefile": """
            require "rake/testtask"

            Rake::TestTask.new(:test) do |t|
              t.libs << "lib"
              t.test_files = FileList["test/*_test.rb"]
            end

            task default: :test
        """,
        "lib/greeter.rb": """
            module Greeter
              def self.greet(name) = "hello, #{name}"
            end
        """,
        "test/greeter_test.rb": """
            require "minitest/autorun"
            require "greeter"

            class GreeterTest < Minitest::Test
              def test_greet
                assert_equal "hello, up", Greeter.greet("up")
              end
            end
        """,
    })


# --- C++ --------------------------------------------------------------------------------------

def make_cpp(root: Path) -> Path:
    """CMake with libfmt from Debian (apt.txt) via find_package and a ctest test."""
    return write(root, {
        "CMakeLists.txt": """
            cmake_minimum_required(VERSION 3.18)
            project(upfixture CXX)
            set(CMAKE_CXX_STANDARD 17)
            find_package(fmt REQUIRED)
            enable_testing()
            add_library(greet greet.cpp)
            target_link_libraries(greet PUBLIC fmt::fmt)
            add_executable(greet_test greet_test.cpp)
            target_link_libraries(greet_test greet)
            add_test(NAME greet COMMAND greet_test)
        """,
        "apt.txt": "libfmt-dev\n",
        "greet.hpp": """
            #pragma once
            #include <string>
            std::string greet(const std::string& name, int n);
        """,
        "greet.cpp": """
            #include "greet.hpp"
            #include <fmt/format.h>
            std::string greet(const std::string& name, int n) { return fmt::format("hello {} #{:03}", name, n); }
        """,
        "greet_test.cpp": """
            #include "greet.hpp"
            #include <cstdio>
            int main() {
                std::string got = greet("up", 7);
                if (got != "hello up #007") { std::printf("got %s\\n", got.c_str()); return 1; }
                std::puts("ok");
                return 0;
            }
        """,
    })


# --- devcontainer.json ------------------------------------------------------------------------

DEVCONTAINER_JSON = """
// The devcontainer fixture: comments, trailing commas, every lifecycle form.
{
  /* Approximated by Debian with python3 (the plan says so in its notes). */
  "name": "up-devcontainer",
  "image": "mcr.microsoft.com/devcontainers/python:3.11",
  "containerEnv": {
    "FIXTURE_CONTAINER": "from-containerEnv", // trailing comma next
  },
  "remoteEnv": {
    "FIXTURE_REMOTE": "from-remoteEnv",
  },
  "forwardPorts": [8000, 5432,],
  "hostRequirements": { "memory": "1gb", "cpus": 1 },  // the default is 2 GiB
  // Not carried out by openrun up: reported by name.
  "features": { "ghcr.io/devcontainers/features/docker-in-docker:2": {} },
  "postAttachCommand": "echo attached",
  "onCreateCommand": "echo onCreate >> /var/tmp/lifecycle.log && touch /var/tmp/marker-onCreate",
  "updateContentCommand": ["sh", "-c", "echo updateContent >> /var/tmp/lifecycle.log && touch /var/tmp/marker-updateContent"],
  "postCreateCommand": {
    "first": "echo postCreate:first >> /var/tmp/lifecycle.log && touch /var/tmp/marker-postCreate-first",
    "second": ["sh", "-c", "echo postCreate:second >> /var/tmp/lifecycle.log && touch /var/tmp/marker-postCreate-second"],
  },
  "postStartCommand": "echo postStart >> /var/tmp/lifecycle.log && touch /var/tmp/marker-postStart && env > /var/tmp/poststart.env",
}
"""


def make_devcontainer(root: Path) -> Path:
    """.devcontainer/devcontainer.json (JSON with comments and trailing commas) with env, ports,
    hostRequirements, unsupported keys (a Feature, postAttachCommand) and all four lifecycle commands in their
    string, array and object forms, each appending to /var/tmp/lifecycle.log; plus a tiny Python
    test the check runs."""
    return write(root, {
        ".devcontainer/devcontainer.json": DEVCONTAINER_JSON,
        "check.py": """
            import os
            assert os.environ.get("FIXTURE_CONTAINER") == "from-containerEnv"
            print("devcontainer check ok")
        """,
    })


def make_invalid_devcontainer(root: Path) -> Path:
    """A devcontainer.json with a syntax error on line 4 (a missing comma)."""
    return write(root, {
        ".devcontainer/devcontainer.json": '{\n  // broken\n  "image": "debian:bookworm"\n  "name": "x"\n}\n',
    })


# --- broken -----------------------------------------------------------------------------------

def make_python_broken(root: Path) -> Path:
    """requirements.txt pinning a version of attrs that does not exist: `pip install` fails. Before
    it fails, pip prepares the local package ./halfway, whose setup.py leaves a marker
    (/var/tmp/halfway-prepared): a step's effect that a rollback must take away."""
    return write(root, {
        "requirements.txt": "./halfway\nattrs==0.0.0\npytest==8.3.3\n",
        "halfway/setup.py": """
            # Leaves a marker when pip prepares it, before pip finds that attrs==0.0.0 does not exist.
            import pathlib
            from setuptools import setup

            pathlib.Path("/var/tmp/halfway-prepared").write_text("pip ran setup.py\\n")
            setup(name="halfway", version="1.0", py_modules=[])
        """,
        "tests/test_nothing.py": "def test_nothing():\n    pass\n",
    })


def make_empty(root: Path) -> Path:
    """No recognizable project: a README only."""
    return write(root, {"README.txt": "nothing to build here\n"})


MAKERS = {
    "rust": make_rust,
    "python": make_python,
    "python-pyproject": make_python_pyproject,
    "node": make_node,
    "node-unresolvable": make_node_unresolvable,
    "go": make_go,
    "java": make_java,
    "ruby": make_ruby,
    "cpp": make_cpp,
    "devcontainer": make_devcontainer,
    "devcontainer-invalid": make_invalid_devcontainer,
    "python-broken": make_python_broken,
    "empty": make_empty,
}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in MAKERS:
        sys.exit(f"usage: up_fixtures.py {{{'|'.join(MAKERS)}}} DIR")
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    MAKERS[sys.argv[1]](out)
    print(out)
