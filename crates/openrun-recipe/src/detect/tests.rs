//! Plans of small in-memory repositories, one or more per language and lockfile.

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::error::TreeError;

/// A repository in memory: path → contents.
#[derive(Default)]
struct Mem(BTreeMap<String, Vec<u8>>);

impl Mem {
    fn new(files: &[(&str, &str)]) -> Self {
        Mem(files
            .iter()
            .map(|(p, c)| (p.to_string(), c.as_bytes().to_vec()))
            .collect())
    }
}

impl RepoTree for Mem {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, TreeError> {
        Ok(self.0.get(path).cloned())
    }
    fn is_file(&self, path: &str) -> bool {
        self.0.contains_key(path)
    }
    fn is_dir(&self, path: &str) -> bool {
        path.is_empty() || self.0.keys().any(|k| k.starts_with(&format!("{path}/")))
    }
    fn list(&self, path: &str) -> Vec<String> {
        let prefix = if path.is_empty() {
            String::new()
        } else {
            format!("{path}/")
        };
        let names: BTreeSet<String> = self
            .0
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix))
            .map(|rest| rest.split('/').next().unwrap_or(rest).to_string())
            .collect();
        names.into_iter().collect()
    }
}

fn plan(files: &[(&str, &str)]) -> Plan {
    match plan_for(&Mem::new(files), "demo") {
        Ok(plan) => plan,
        Err(e) => panic!("no plan: {e}"),
    }
}

fn error(files: &[(&str, &str)]) -> PlanError {
    match plan_for(&Mem::new(files), "demo") {
        Ok(plan) => panic!("a plan: {}", plan.render()),
        Err(e) => e,
    }
}

/// Each step as `name [file]: first | alternative`.
fn steps(plan: &Plan) -> Vec<String> {
    plan.steps
        .iter()
        .map(|s| {
            let commands: Vec<String> = s.commands.iter().map(|c| c.to_string()).collect();
            format!("{} [{}]: {}", s.name, s.file, commands.join(" | "))
        })
        .collect()
}

fn test(plan: &Plan) -> String {
    plan.test
        .as_ref()
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn start(plan: &Plan) -> String {
    plan.start
        .as_ref()
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn has(list: &[String], item: &str) -> bool {
    list.iter().any(|i| i == item)
}

const CARGO: &str = "[package]\nname = \"demo\"\nversion = \"0.1.0\"\nedition = \"2021\"\n";

#[test]
fn nothing_is_no_project() {
    assert!(matches!(error(&[]), PlanError::NoProject));
    assert!(matches!(
        error(&[("README.md", "hi")]),
        PlanError::NoProject
    ));
    // apt.txt alone is not a project.
    assert!(matches!(
        error(&[("apt.txt", "curl\n")]),
        PlanError::NoProject
    ));
}

#[test]
fn rust_with_lockfile() {
    let lock = "version = 4\n\n[[package]]\nname = \"openssl-sys\"\nversion = \"0.9.1\"\n";
    let p = plan(&[
        ("Cargo.toml", CARGO),
        ("Cargo.lock", lock),
        ("src/main.rs", ""),
    ]);
    assert_eq!(p.source, PlanSource::Detected);
    assert_eq!(p.languages, ["rust"]);
    assert_eq!(
        p.base,
        BaseImage::Debian {
            suite: "bookworm".into()
        }
    );
    assert_eq!(p.workspace, "/workspaces/demo");
    assert_eq!(
        p.system_packages,
        [
            "build-essential",
            "ca-certificates",
            "cargo-web",
            "libssl-dev",
            "pkg-config",
            "rustc-web"
        ]
    );
    assert_eq!(
        steps(&p),
        [
            "install [Cargo.lock]: cargo fetch --locked",
            "build [Cargo.toml]: cargo build --all-targets --locked"
        ]
    );
    assert_eq!(test(&p), "cargo test");
    assert_eq!(
        p.network,
        ["crates.io", "index.crates.io", "static.crates.io"]
    );
    assert_eq!(p.inputs, ["Cargo.lock", "Cargo.toml"]);
}

#[test]
fn rust_without_lockfile_workspace_and_toolchain_note() {
    let p = plan(&[
        (
            "Cargo.toml",
            "[workspace]\nmembers = [\"a\"]\n[workspace.package]\nrust-version = \"1.90\"\n",
        ),
        (
            "rust-toolchain.toml",
            "[toolchain]\nchannel = \"nightly\"\n",
        ),
    ]);
    assert_eq!(
        steps(&p),
        [
            "install [Cargo.toml]: cargo fetch",
            "build [Cargo.toml]: cargo build --all-targets"
        ]
    );
    assert!(p.notes.iter().any(|n| n.contains("rust-toolchain.toml")));
    assert!(p.notes.iter().any(|n| n.contains("1.90")));
    assert_eq!(p.inputs, ["Cargo.toml", "rust-toolchain.toml"]);
}

#[test]
fn malformed_cargo_toml_names_file_line_and_column() {
    let e = error(&[("Cargo.toml", "[package]\nname = \"x\nversion = 1\n")]);
    match &e {
        PlanError::Invalid {
            file, line, column, ..
        } => {
            assert_eq!(file, "Cargo.toml");
            assert_eq!(*line, Some(2));
            assert!(column.is_some());
        }
        other => panic!("{other}"),
    }
    assert!(e.to_string().starts_with("Cargo.toml:2:"), "{e}");
    let e = error(&[("Cargo.toml", "[dependencies]\n")]);
    assert!(e.to_string().contains("[package]"), "{e}");
}

#[test]
fn python_requirements_with_pytest() {
    let p = plan(&[
        ("requirements.txt", "requests==2.31\n"),
        ("requirements-dev.txt", "-r requirements.txt\npytest>=7\n"),
        ("tests/test_a.py", ""),
    ]);
    assert_eq!(p.languages, ["python"]);
    assert_eq!(
        steps(&p),
        [
            "venv [requirements.txt]: python3 -m venv .venv",
            "install [requirements.txt]: pip install -r requirements.txt -r requirements-dev.txt"
        ]
    );
    assert_eq!(test(&p), "python3 -m pytest");
    assert_eq!(p.env["VIRTUAL_ENV"], "/workspaces/demo/.venv");
    assert_eq!(
        p.env["PATH"],
        "/workspaces/demo/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    );
    assert!(has(&p.system_packages, "python3-venv"));
    assert_eq!(p.network, ["files.pythonhosted.org", "pypi.org"]);
    assert_eq!(p.inputs, ["requirements-dev.txt", "requirements.txt"]);
}

#[test]
fn python_included_requirement_files_are_inputs() {
    let p = plan(&[
        (
            "requirements.txt",
            "-r requirements/prod.txt\n-c constraints.txt\n",
        ),
        (
            "requirements/prod.txt",
            "-r ../requirements/common.txt\n-r /etc/passwd\n-r ../../x\n",
        ),
        ("requirements/common.txt", "--requirement=prod.txt\nattrs\n"),
        ("constraints.txt", "attrs<24\n"),
    ]);
    assert_eq!(
        p.inputs,
        [
            "constraints.txt",
            "requirements.txt",
            "requirements/common.txt",
            "requirements/prod.txt"
        ]
    );
}

#[test]
fn python_pyproject_with_test_extra_and_configured_pytest() {
    let pyproject = r#"
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "demo"
version = "0.1"
requires-python = ">=3.12"
dependencies = ["attrs"]

[project.optional-dependencies]
test = ["pytest", "hypothesis"]
docs = ["sphinx"]
"#;
    let p = plan(&[("pyproject.toml", pyproject)]);
    assert_eq!(
        steps(&p),
        [
            "venv [pyproject.toml]: python3 -m venv .venv",
            "install [pyproject.toml]: pip install -e '.[test]' | pip install '.[test]'"
        ]
    );
    assert_eq!(test(&p), "python3 -m pytest");
    assert!(
        p.notes.iter().any(|n| n.contains(">=3.12")),
        "{:?}",
        p.notes
    );

    // pytest configured but not declared: the install adds it.
    let p = plan(&[(
        "pyproject.toml",
        "[project]\nname = \"d\"\nversion = \"1\"\n[tool.pytest.ini_options]\n",
    )]);
    assert_eq!(
        steps(&p)[1],
        "install [pyproject.toml]: pip install pytest -e . | pip install pytest ."
    );
    assert_eq!(test(&p), "python3 -m pytest");
}

#[test]
fn python_dependency_groups_become_requirements() {
    let p = plan(&[(
        "pyproject.toml",
        "[project]\nname = \"d\"\nversion = \"1\"\n[dependency-groups]\ntest = [\"pytest>=8\", {include-group = \"x\"}]\n",
    )]);
    assert_eq!(
        steps(&p)[1],
        "install [pyproject.toml]: pip install 'pytest>=8' -e . | pip install 'pytest>=8' ."
    );
}

#[test]
fn python_poetry() {
    let pyproject = r#"
[tool.poetry]
name = "demo"
version = "0.1.0"

[tool.poetry.dependencies]
python = "^3.10"

[tool.poetry.group.dev.dependencies]
pytest = "^8"
"#;
    let p = plan(&[("pyproject.toml", pyproject), ("poetry.lock", "# lock\n")]);
    assert_eq!(
        steps(&p)[1],
        "install [poetry.lock]: /usr/bin/python3 -m pip install --break-system-packages \
         --root-user-action=ignore poetry && poetry install"
    );
    assert_eq!(p.env["POETRY_VIRTUALENVS_IN_PROJECT"], "true");
    assert_eq!(test(&p), "python3 -m pytest");
    assert_eq!(p.inputs, ["poetry.lock", "pyproject.toml"]);
}

#[test]
fn python_uv() {
    let pyproject =
        "[project]\nname = \"d\"\nversion = \"1\"\n[dependency-groups]\ndev = [\"pytest\"]\n";
    let p = plan(&[("pyproject.toml", pyproject), ("uv.lock", "version = 1\n")]);
    assert_eq!(
        steps(&p)[1],
        "install [uv.lock]: /usr/bin/python3 -m pip install --break-system-packages \
         --root-user-action=ignore uv && uv sync --frozen"
    );
    assert_eq!(p.env["UV_PROJECT_ENVIRONMENT"], "/workspaces/demo/.venv");
    assert_eq!(p.env["UV_PYTHON_DOWNLOADS"], "never");
    assert_eq!(test(&p), "python3 -m pytest");
}

#[test]
fn python_pipenv_with_and_without_lock() {
    let pipfile = "[packages]\nrequests = \"*\"\n\n[dev-packages]\npytest = \"*\"\n";
    let p = plan(&[("Pipfile", pipfile), ("Pipfile.lock", "{}")]);
    let s = steps(&p);
    assert!(s[1].starts_with("install [Pipfile.lock]: "), "{s:?}");
    assert!(s[1].contains("pipenv sync --dev | "), "{s:?}");
    assert!(s[1].contains("pipenv requirements --dev"), "{s:?}");
    assert_eq!(test(&p), "python3 -m pytest");
    assert_eq!(p.inputs, ["Pipfile", "Pipfile.lock"]);
    let p = plan(&[("Pipfile", pipfile)]);
    assert!(
        steps(&p)[1].ends_with("pipenv install --dev"),
        "{:?}",
        steps(&p)
    );
    // A Pipfile is TOML: a syntax error names it.
    let e = error(&[("Pipfile", "[packages\n")]);
    assert_eq!(e.file(), Some("Pipfile"));
}

#[test]
fn python_setup_py_unittest_and_django() {
    let p = plan(&[
        (
            "setup.py",
            "from setuptools import setup\nsetup(name='d')\n",
        ),
        ("tests/__init__.py", ""),
        ("tests/test_x.py", ""),
    ]);
    // Test files without pytest declared: pytest (it runs unittest's tests too), installed.
    assert_eq!(
        steps(&p)[1],
        "install [setup.py]: pip install pytest -e . | pip install pytest ."
    );
    assert_eq!(test(&p), "python3 -m pytest");
    // A requirements file that installs the project: not twice.
    let p = plan(&[
        ("setup.py", ""),
        ("requirements-dev.txt", "-e .[dev]\npytest\n"),
    ]);
    assert_eq!(
        steps(&p)[1],
        "install [requirements-dev.txt]: pip install -r requirements-dev.txt"
    );
    // No test files: unittest's discovery, a weak test.
    let p = plan(&[("setup.py", ""), ("tests/__init__.py", "")]);
    assert_eq!(
        steps(&p)[1],
        "install [setup.py]: pip install -e . | pip install ."
    );
    assert_eq!(test(&p), "python3 -m unittest discover -s tests -t .");
    let p = plan(&[
        ("requirements.txt", "psycopg2\n"),
        ("test/unit/deep/test_a.py", ""),
    ]);
    assert_eq!(test(&p), "python3 -m pytest");
    assert!(has(&p.system_packages, "libpq-dev"));

    let p = plan(&[
        ("requirements.txt", "Django>=4.2\n"),
        ("manage.py", "import django\n"),
    ]);
    assert_eq!(test(&p), "python3 manage.py test");
    // A pytest plugin brings pytest: nothing added.
    let p = plan(&[
        ("requirements.txt", "pytest-django\nDjango\n"),
        ("manage.py", ""),
    ]);
    assert_eq!(test(&p), "python3 -m pytest");
    assert_eq!(
        steps(&p)[1],
        "install [requirements.txt]: pip install -r requirements.txt"
    );
    assert_eq!(start(&p), "python3 manage.py runserver 0.0.0.0:8000");
    assert_eq!(p.ports, [8000]);

    let p = plan(&[
        ("requirements.txt", "flask\n"),
        ("app.py", "from flask import Flask\napp = Flask(__name__)\n"),
    ]);
    assert_eq!(start(&p), "flask --app app run --host 0.0.0.0 --port 5000");
    assert_eq!(p.ports, [5000]);
}

#[test]
fn malformed_pyproject_is_invalid_with_position() {
    let e = error(&[("pyproject.toml", "[project]\nname = \n")]);
    match e {
        PlanError::Invalid {
            file, line, column, ..
        } => {
            assert_eq!(file, "pyproject.toml");
            assert_eq!(line, Some(2));
            assert!(column.is_some());
        }
        other => panic!("{other}"),
    }
}

const PACKAGE_JSON: &str = r#"{
  "name": "demo",
  "scripts": {"test": "node --test", "start": "vite --port 4000"},
  "dependencies": {"left-pad": "1.3.0"}
}"#;

#[test]
fn node_npm_lockfile_and_none() {
    let p = plan(&[("package.json", PACKAGE_JSON), ("package-lock.json", "{}")]);
    assert_eq!(p.languages, ["node"]);
    assert_eq!(steps(&p), ["install [package-lock.json]: npm ci"]);
    assert_eq!(test(&p), "npm test");
    assert_eq!(start(&p), "npm start");
    assert_eq!(p.ports, [4000]);
    assert_eq!(p.network, ["registry.npmjs.org"]);
    assert_eq!(p.system_packages, ["ca-certificates", "nodejs", "npm"]);
    assert_eq!(p.inputs, ["package-lock.json", "package.json"]);

    let p = plan(&[("package.json", PACKAGE_JSON)]);
    assert_eq!(steps(&p), ["install [package.json]: npm install"]);

    // npm init's placeholder is no test; no dependencies, no install.
    let p = plan(&[(
        "package.json",
        r#"{"scripts": {"test": "echo \"Error: no test specified\" && exit 1", "dev": "next dev"}}"#,
    )]);
    assert_eq!(p.test, None);
    assert!(p.steps.is_empty());
    assert_eq!(start(&p), "npm run dev");
    assert_eq!(p.ports, [3000]);
    // No test script, a runner in devDependencies.
    let p = plan(&[("package.json", r#"{"devDependencies": {"vitest": "^1"}}"#)]);
    assert_eq!(test(&p), "npx --no-install vitest run");
}

#[test]
fn node_pnpm_and_yarn() {
    let p = plan(&[
        ("package.json", PACKAGE_JSON),
        ("pnpm-lock.yaml", "lockfileVersion: '9.0'\n"),
    ]);
    assert_eq!(
        steps(&p),
        ["install [pnpm-lock.yaml]: npm install -g pnpm@9 && pnpm install --frozen-lockfile"]
    );
    assert_eq!(test(&p), "pnpm test");

    let pinned = r#"{"packageManager": "pnpm@8.15.1+sha512.abc", "scripts": {"test": "jest"}}"#;
    let p = plan(&[
        ("package.json", pinned),
        ("pnpm-lock.yaml", "lockfileVersion: '6.0'\n"),
    ]);
    assert!(steps(&p)[0].contains("pnpm@8.15.1 &&"), "{:?}", steps(&p));

    let p = plan(&[
        ("package.json", PACKAGE_JSON),
        ("yarn.lock", "# yarn lockfile v1\n"),
    ]);
    assert_eq!(
        steps(&p),
        ["install [yarn.lock]: npm install -g yarn@1 && yarn install --frozen-lockfile"]
    );
    assert_eq!(test(&p), "yarn test");

    let p = plan(&[
        ("package.json", PACKAGE_JSON),
        ("yarn.lock", "__metadata:\n  version: 8\n"),
    ]);
    assert_eq!(
        steps(&p),
        ["install [yarn.lock]: npm install -g @yarnpkg/cli-dist@4 && yarn install --immutable"]
    );
    assert!(has(&p.network, "registry.yarnpkg.com"));
    let p = plan(&[
        ("package.json", r#"{"packageManager": "yarn@3.6.4"}"#),
        ("yarn.lock", "__metadata:\n  version: 6\n"),
    ]);
    assert!(
        steps(&p)[0].contains("@yarnpkg/cli-dist@3.6.4 &&"),
        "{:?}",
        steps(&p)
    );
    let p = plan(&[
        ("package.json", "{}"),
        ("yarn.lock", "__metadata:\n  version: 6\n"),
    ]);
    assert!(
        steps(&p)[0].contains("@yarnpkg/cli-dist@3 &&"),
        "{:?}",
        steps(&p)
    );
}

#[test]
fn malformed_package_json_names_line_and_column() {
    let e = error(&[(
        "package.json",
        "{\n  \"name\": \"x\",\n  \"scripts\": {,}\n}\n",
    )]);
    match &e {
        PlanError::Invalid {
            file, line, column, ..
        } => {
            assert_eq!(file, "package.json");
            assert_eq!(*line, Some(3));
            assert_eq!(*column, Some(15));
        }
        other => panic!("{other}"),
    }
    assert!(!e.to_string().contains("at line"), "{e}");
    let e = error(&[("package.json", "[1]")]);
    assert_eq!(e.file(), Some("package.json"));
}

#[test]
fn a_byte_order_mark_is_not_content() {
    let p = plan(&[(
        "package.json",
        "\u{feff}{\"scripts\": {\"test\": \"jest\"}}",
    )]);
    assert_eq!(test(&p), "npm test");
}

#[test]
fn not_utf8_is_invalid_with_position() {
    let mut tree = Mem::default();
    tree.0
        .insert("package.json".into(), b"{\n  \"a\": \"\xff\"}".to_vec());
    let e = plan_for(&tree, "demo").err().map(|e| e.to_string());
    assert_eq!(e.as_deref(), Some("package.json:2:9: not valid UTF-8"));
}

#[test]
fn go_module() {
    let p = plan(&[
        (
            "go.mod",
            "module example.com/demo\n\ngo 1.21.0\n\nrequire github.com/x/y v1.0.0\n",
        ),
        ("go.sum", ""),
    ]);
    assert_eq!(p.languages, ["go"]);
    assert_eq!(
        steps(&p),
        [
            "install [go.sum]: go mod download",
            "build [go.mod]: go build ./..."
        ]
    );
    assert_eq!(test(&p), "go test ./...");
    assert_eq!(p.network, ["proxy.golang.org", "sum.golang.org"]);
    assert!(
        p.notes.iter().any(|n| n.contains("three-part")),
        "{:?}",
        p.notes
    );
    // No requirements, or vendored: nothing to download.
    let p = plan(&[("go.mod", "module demo\ngo 1.19\n")]);
    assert_eq!(steps(&p), ["build [go.mod]: go build ./..."]);
    assert!(p.notes.is_empty());
    let p = plan(&[
        ("go.mod", "module demo\nrequire x v1\n"),
        ("vendor/modules.txt", ""),
    ]);
    assert_eq!(steps(&p), ["build [go.mod]: go build ./..."]);
    assert!(error(&[("go.mod", "go 1.19\n")])
        .to_string()
        .contains("module"));
}

#[test]
fn java_maven_and_gradle() {
    let p = plan(&[("pom.xml", "<project/>"), ("src/test/java/ATest.java", "")]);
    assert_eq!(p.languages, ["java"]);
    assert_eq!(
        steps(&p),
        ["install [pom.xml]: mvn -B -ntp test-compile | mvn -B -ntp -o -Daether.offline.protocols=file test-compile"]
    );
    assert_eq!(test(&p), "mvn -B -ntp test");
    assert!(has(&p.system_packages, "maven"));
    assert!(has(&p.system_packages, "default-jdk-headless"));

    let p = plan(&[
        ("build.gradle.kts", ""),
        ("gradlew", "#!/bin/sh\n"),
        ("gradle/wrapper/gradle-wrapper.properties", ""),
    ]);
    assert_eq!(
        steps(&p),
        ["install [gradle/wrapper/gradle-wrapper.properties]: chmod +x gradlew && ./gradlew --no-daemon testClasses"]
    );
    assert_eq!(test(&p), "./gradlew --no-daemon test");
    assert!(!has(&p.system_packages, "maven"));
    assert!(has(&p.network, "services.gradle.org"));

    let p = plan(&[("build.gradle", "")]);
    assert!(has(&p.system_packages, "gradle"));
    assert_eq!(test(&p), "gradle --no-daemon test");
}

#[test]
fn ruby_bundler() {
    let p = plan(&[
        (
            "Gemfile",
            "source 'https://rubygems.org'\ngem 'minitest'\ngem 'rake'\n",
        ),
        (
            "Gemfile.lock",
            "GEM\n  specs:\n    minitest (5.15.0)\n\nBUNDLED WITH\n   2.5.3\n",
        ),
        (
            "Rakefile",
            "require 'rake/testtask'\nRake::TestTask.new(:test)\n",
        ),
    ]);
    assert_eq!(p.languages, ["ruby"]);
    assert_eq!(
        steps(&p),
        ["install [Gemfile.lock]: bundle install --local | bundle install"]
    );
    assert_eq!(test(&p), "bundle exec rake test");
    assert!(p.notes.iter().any(|n| n.contains("2.5.3")), "{:?}", p.notes);
    assert_eq!(p.network, ["index.rubygems.org", "rubygems.org"]);

    let p = plan(&[("Gemfile", "gem \"rspec\"\n")]);
    assert_eq!(test(&p), "bundle exec rspec");
    assert_eq!(
        steps(&p),
        ["install [Gemfile]: bundle install --local | bundle install"]
    );
}

#[test]
fn cpp_cmake_make_and_autotools() {
    let p = plan(&[(
        "CMakeLists.txt",
        "cmake_minimum_required(VERSION 3.20)\nproject(d CXX)\nfind_package(GTest REQUIRED)\nenable_testing()\nadd_test(NAME t COMMAND t)\n",
    )]);
    assert_eq!(p.languages, ["c++"]);
    assert_eq!(
        steps(&p),
        [
            "configure [CMakeLists.txt]: cmake -S . -B build",
            "build [CMakeLists.txt]: cmake --build build -j2"
        ]
    );
    assert_eq!(test(&p), "ctest --test-dir build --output-on-failure");
    assert_eq!(
        p.system_packages,
        [
            "build-essential",
            "ca-certificates",
            "cmake",
            "libgtest-dev"
        ]
    );

    let p = plan(&[("Makefile", "all:\n\tcc -o x x.c\ncheck: all\n\t./x\n")]);
    assert_eq!(steps(&p), ["build [Makefile]: make -j2"]);
    assert_eq!(test(&p), "make check");
    assert_eq!(p.system_packages, ["build-essential", "ca-certificates"]);

    let p = plan(&[("Makefile", "test:\n\t./t\nCC := gcc\n")]);
    assert_eq!(test(&p), "make test");

    let p = plan(&[("configure", "#!/bin/sh\n"), ("Makefile.am", "TESTS = t\n")]);
    assert_eq!(
        steps(&p),
        [
            "configure [configure]: sh ./configure",
            "build [configure]: make -j2"
        ]
    );
    assert_eq!(test(&p), "make check");
}

#[test]
fn a_pyproject_of_tool_settings_alone_is_not_python() {
    let black = "[tool.black]\nline-length = 100\n";
    let p = plan(&[("pyproject.toml", black), ("package.json", PACKAGE_JSON)]);
    assert_eq!(p.languages, ["node"]);
    let p = plan(&[("pyproject.toml", black), ("src/app.py", "")]);
    assert_eq!(p.languages, ["python"]);
    assert!(matches!(
        error(&[("pyproject.toml", black)]),
        PlanError::NoProject
    ));
}

#[test]
fn a_makefile_beside_another_language_is_not_cpp() {
    let p = plan(&[
        ("Makefile", "test:\n\tpytest\n"),
        ("requirements.txt", "pytest\n"),
    ]);
    assert_eq!(p.languages, ["python"]);
}

#[test]
fn apt_txt_and_aptfile_add_packages() {
    let p = plan(&[
        (
            "apt.txt",
            "# tools\nlibpq-dev\n\n  graphviz   # for docs\nlibpq-dev\n",
        ),
        ("Aptfile", "g++\n"),
        ("go.mod", "module d\n"),
    ]);
    assert!(has(&p.system_packages, "libpq-dev"));
    assert!(has(&p.system_packages, "graphviz"));
    assert!(has(&p.system_packages, "g++"));
    assert!(has(&p.inputs, "apt.txt") && has(&p.inputs, "Aptfile"));
    let sorted: Vec<String> = {
        let mut s = p.system_packages.clone();
        s.sort();
        s.dedup();
        s
    };
    assert_eq!(p.system_packages, sorted);
}

#[test]
fn apt_txt_errors_name_file_line_and_column() {
    let e = error(&[("apt.txt", "curl\n  Bad_Name\n"), ("go.mod", "module d\n")]);
    assert!(
        e.to_string()
            .starts_with("apt.txt:2:3: \"Bad_Name\" is not a Debian package name"),
        "{e}"
    );
    let e = error(&[
        ("Aptfile", ":repo:deb http://x y main\n"),
        ("go.mod", "module d\n"),
    ]);
    assert!(e.to_string().starts_with("Aptfile:1:1:"), "{e}");
    let e = error(&[("apt.txt", "x\n"), ("go.mod", "module d\n")]);
    assert!(e.to_string().starts_with("apt.txt:1:1:"), "{e}");
    assert!(apt::valid_package("libstdc++6"));
    assert!(apt::valid_package("0ad"));
    assert!(!apt::valid_package("curl=7.88"));
    assert!(!apt::valid_package("-x"));
}

#[test]
fn languages_combine_and_the_test_suite_picks_the_primary() {
    // Python without tests and Node with a test script: Node's test.
    let p = plan(&[
        ("requirements.txt", "requests\n"),
        ("package.json", PACKAGE_JSON),
        ("package-lock.json", "{}"),
    ]);
    assert_eq!(p.languages, ["python", "node"]);
    assert_eq!(test(&p), "npm test");
    assert_eq!(
        steps(&p),
        [
            "venv:python [requirements.txt]: python3 -m venv .venv",
            "install:python [requirements.txt]: pip install -r requirements.txt",
            "install:node [package-lock.json]: npm ci"
        ]
    );
    assert!(has(&p.system_packages, "nodejs") && has(&p.system_packages, "python3"));
    assert_eq!(
        p.network,
        ["files.pythonhosted.org", "pypi.org", "registry.npmjs.org"]
    );
    assert!(has(&p.notes, "test: node's"));

    // Rust has a test suite: first in the order wins.
    let p = plan(&[("Cargo.toml", CARGO), ("package.json", PACKAGE_JSON)]);
    assert_eq!(p.languages, ["rust", "node"]);
    assert_eq!(test(&p), "cargo test");
}

#[test]
fn a_dockerfile_builds_the_environment() {
    let p = plan(&[
        ("Dockerfile", "FROM debian\n"),
        ("package.json", PACKAGE_JSON),
        ("package-lock.json", "{}"),
        ("apt.txt", "curl\n"),
    ]);
    assert_eq!(p.source, PlanSource::Dockerfile);
    assert_eq!(p.config_file.as_deref(), Some("Dockerfile"));
    assert_eq!(
        p.base,
        BaseImage::Dockerfile {
            dockerfile: "Dockerfile".into(),
            context: ".".into(),
            args: BTreeMap::new()
        }
    );
    assert!(p.steps.is_empty());
    assert!(p.system_packages.is_empty());
    assert!(has(
        &p.notes,
        "apt.txt is not applied: the Dockerfile makes the environment"
    ));
    assert_eq!(p.languages, ["node"]);
    assert_eq!(test(&p), "npm test");
    assert_eq!(
        p.inputs,
        ["Dockerfile", "apt.txt", "package-lock.json", "package.json"]
    );

    let p = plan(&[("Containerfile", "FROM debian\n")]);
    assert_eq!(p.config_file.as_deref(), Some("Containerfile"));
    assert_eq!(p.inputs, ["Containerfile"]);
    // A Dockerfile alone is a project; a broken manifest beside it costs only the test.
    let p = plan(&[("Dockerfile", "FROM debian\n")]);
    assert_eq!(p.test, None);
    let p = plan(&[("Dockerfile", "FROM debian\n"), ("package.json", "{")]);
    assert_eq!(p.test, None);
    assert!(
        p.notes.iter().any(|n| n.contains("package.json")),
        "{:?}",
        p.notes
    );
}

#[test]
fn plans_are_deterministic_and_serialize() {
    let files = [
        (
            "pyproject.toml",
            "[project]\nname = \"d\"\nversion = \"1\"\ndependencies = [\"pytest\"]\n",
        ),
        ("package.json", PACKAGE_JSON),
        ("apt.txt", "zlib1g-dev\ncurl\n"),
    ];
    let a = plan(&files);
    let b = plan(&files);
    assert_eq!(a, b);
    let json = serde_json::to_string(&a).unwrap_or_default();
    let back: Plan = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(back, a);
    for list in [&a.system_packages, &a.network, &a.inputs] {
        let mut sorted = list.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(list, &sorted);
    }
}

#[test]
fn toolchains_cover_every_language() {
    for language in ["rust", "python", "node", "go", "java", "ruby", "c++"] {
        let tc = toolchain(language).unwrap_or_else(|| panic!("{language}"));
        assert!(has(&tc.packages, "ca-certificates"), "{language}");
        let mut sorted = tc.packages.clone();
        sorted.sort();
        assert_eq!(tc.packages, sorted, "{language}");
    }
    assert_eq!(toolchain("typescript"), toolchain("node"));
    assert_eq!(toolchain("cobol"), None);
}

#[test]
fn a_devcontainer_wins_and_detection_fills_its_test() {
    let dc = r#"{
  // comments are fine
  "image": "mcr.microsoft.com/devcontainers/python:3.11",
  "postCreateCommand": "pip install -r requirements.txt",
}"#;
    let p = plan(&[
        (".devcontainer/devcontainer.json", dc),
        ("requirements.txt", "pytest\n"),
        ("package.json", PACKAGE_JSON),
        ("Dockerfile", "FROM debian\n"),
    ]);
    assert_eq!(p.source, PlanSource::Devcontainer);
    assert_eq!(test(&p), "python3 -m pytest");
    assert!(
        has(&p.languages, "python") && has(&p.languages, "node"),
        "{:?}",
        p.languages
    );
    // Detection adds no steps of its own to a devcontainer's plan.
    assert!(p
        .steps
        .iter()
        .all(|s| s.file == ".devcontainer/devcontainer.json"));

    // Its own test stays.
    let dc =
        r#"{"image": "debian:bookworm", "customizations": {"openrun": {"test": "make check"}}}"#;
    let p = plan(&[(".devcontainer.json", dc), ("requirements.txt", "pytest\n")]);
    assert_eq!(test(&p), "make check");

    // A broken manifest beside it costs only the detected test.
    let p = plan(&[
        (".devcontainer.json", r#"{"image": "debian:bookworm"}"#),
        ("Cargo.toml", "["),
    ]);
    assert_eq!(p.test, None);
    assert!(
        p.notes.iter().any(|n| n.contains("Cargo.toml")),
        "{:?}",
        p.notes
    );

    // Its own errors are the plan's.
    let e = error(&[
        (".devcontainer.json", "{\n  \"image\": 1,,\n}"),
        ("go.mod", "module d\n"),
    ]);
    assert_eq!(e.file(), Some(".devcontainer.json"));
}

#[test]
fn versions_debian_does_not_have_are_noted() {
    let notes = |files: &[(&str, &str)]| plan(files).notes;
    let n = notes(&[
        (
            "pyproject.toml",
            "[tool.poetry]\nname = \"d\"\n[tool.poetry.dependencies]\npython = \"^3.12\"\n",
        ),
        (".python-version", "3.13.1\n"),
    ]);
    assert!(
        has(
            &n,
            "pyproject.toml asks for Python ^3.12; Debian bookworm has 3.11"
        ),
        "{n:?}"
    );
    assert!(
        has(
            &n,
            ".python-version asks for Python 3.13.1; Debian bookworm has 3.11"
        ),
        "{n:?}"
    );
    assert!(notes(&[("requirements.txt", ""), (".python-version", "3.11\n")]).is_empty());
    let n = notes(&[("package.json", "{}"), (".nvmrc", "v20.11.0\n")]);
    assert!(
        has(
            &n,
            ".nvmrc asks for Node.js v20.11.0; Debian bookworm has Node.js 18"
        ),
        "{n:?}"
    );
    let n = notes(&[("Gemfile", ""), (".ruby-version", "3.3.0\n")]);
    assert!(
        has(
            &n,
            ".ruby-version asks for Ruby 3.3.0; Debian bookworm has 3.1"
        ),
        "{n:?}"
    );
    let n = notes(&[(
        "CMakeLists.txt",
        "cmake_minimum_required(VERSION 3.28...3.30)\n",
    )]);
    assert!(
        has(
            &n,
            "CMakeLists.txt asks for CMake 3.28; Debian bookworm has 3.25"
        ),
        "{n:?}"
    );
    assert!(notes(&[("CMakeLists.txt", "cmake_minimum_required(VERSION 3.10)\n")]).is_empty());
}

/// Whatever a manifest holds, planning answers (a plan or an error), never panics: odd bytes,
/// truncations, deep nesting.
#[test]
fn odd_manifests_never_panic() {
    let manifests = [
        "Cargo.toml",
        "Cargo.lock",
        "pyproject.toml",
        "Pipfile",
        "requirements.txt",
        "setup.py",
        "setup.cfg",
        "package.json",
        "pnpm-lock.yaml",
        "yarn.lock",
        "go.mod",
        "pom.xml",
        "Gemfile",
        "Gemfile.lock",
        "CMakeLists.txt",
        "Makefile",
        "apt.txt",
        ".python-version",
        ".nvmrc",
    ];
    let deep_json = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_toml = format!("a = {}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_table = format!("a = {}{}", "{b = ".repeat(10_000), "}".repeat(10_000));
    let mut contents: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"{".to_vec(),
        b"[".to_vec(),
        b"\0\0\0".to_vec(),
        b"\xef\xbb\xbf".to_vec(),
        b"\xff\xfe".to_vec(),
        "é\u{301}\n#\t\r\n".as_bytes().to_vec(),
        b"[package]\nrust-version = 1\n".to_vec(),
        b"[project]\nrequires-python = \">=\"\noptional-dependencies = 3\n".to_vec(),
        b"{\"scripts\": [], \"engines\": {\"node\": \">=\"}, \"packageManager\": \"pnpm@\"}"
            .to_vec(),
        b"module\ngo\ngo 1.\ntoolchain\n".to_vec(),
        b"cmake_minimum_required(VERSION\nfind_package(".to_vec(),
        b"BUNDLED WITH\n".to_vec(),
        b"lockfileVersion:\n__metadata:\n  version:".to_vec(),
        deep_json.into_bytes(),
        deep_toml.into_bytes(),
        deep_table.into_bytes(),
    ];
    // Pseudo-random bytes (a fixed LCG: the same every run).
    const ALPHABET: &[u8] = b"{}[]=\"',.:-_ \n\tabcz019#@^~<>/\\";
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..16 {
        let bytes = (0..512)
            .map(|_| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                ALPHABET[(x >> 33) as usize % ALPHABET.len()]
            })
            .collect();
        contents.push(bytes);
    }
    for manifest in manifests {
        for content in &contents {
            let mut tree = Mem::default();
            tree.0.insert(manifest.to_string(), content.clone());
            let _ = plan_for(&tree, "demo");
            // With a neighbour of another language too.
            tree.0.insert("go.mod".into(), b"module d\n".to_vec());
            let _ = plan_for(&tree, "demo");
        }
    }
}

#[test]
fn nested_manifests_are_inputs_and_change_the_key() {
    let gradle = |deps: &str| {
        Mem::new(&[
            (
                "settings.gradle.kts",
                "rootProject.name = \"demo\"\ninclude(\"app\")\n",
            ),
            ("gradlew", "#!/bin/sh\n"),
            ("app/build.gradle.kts", deps),
            ("app/src/main/java/App.java", "class App {}"),
            ("node_modules/x/package.json", "{}"),
            ("a/b/c/d/e/Cargo.toml", "[package]"),
            ("a/b/c/d/e/f/Cargo.toml", "[package]"),
        ])
    };
    let tree = gradle("dependencies { implementation(\"a:b:1\") }");
    let plan = plan_for(&tree, "demo").unwrap();
    assert!(
        plan.inputs.iter().any(|i| i == "app/build.gradle.kts"),
        "{:?}",
        plan.inputs
    );
    // Dependencies and what is too deep are not searched.
    assert!(!plan.inputs.iter().any(|i| i.starts_with("node_modules/")));
    assert!(plan.inputs.iter().any(|i| i == "a/b/c/d/e/Cargo.toml"));
    assert!(!plan.inputs.iter().any(|i| i == "a/b/c/d/e/f/Cargo.toml"));
    let key = crate::recipe::recipe_key(&plan, &tree, "r").unwrap();
    let changed = gradle("dependencies { implementation(\"a:b:2\") }");
    let plan2 = plan_for(&changed, "demo").unwrap();
    assert_ne!(
        key,
        crate::recipe::recipe_key(&plan2, &changed, "r").unwrap()
    );

    // A Cargo workspace without a lockfile: a member's Cargo.toml is an input.
    let cargo = |member: &str| {
        Mem::new(&[
            ("Cargo.toml", "[workspace]\nmembers = [\"crates/a\"]\n"),
            ("crates/a/Cargo.toml", member),
            ("crates/a/src/lib.rs", ""),
            ("crates/a/requirements-dev.txt", "x"),
            ("crates/a/a.gemspec", "x"),
        ])
    };
    let tree = cargo("[package]\nname = \"a\"\n");
    let plan = plan_for(&tree, "w").unwrap();
    for input in [
        "crates/a/Cargo.toml",
        "crates/a/requirements-dev.txt",
        "crates/a/a.gemspec",
    ] {
        assert!(plan.inputs.iter().any(|i| i == input), "{:?}", plan.inputs);
    }
    let key = crate::recipe::recipe_key(&plan, &tree, "r").unwrap();
    let changed = cargo("[package]\nname = \"a\"\n[dependencies]\nserde = \"1\"\n");
    let plan2 = plan_for(&changed, "w").unwrap();
    assert_ne!(
        key,
        crate::recipe::recipe_key(&plan2, &changed, "r").unwrap()
    );
}

/// A root with one manifest and `wide/`, a directory of many entries, then `zz/package.json`.
struct Wide;

impl RepoTree for Wide {
    fn read(&self, _: &str) -> Result<Option<Vec<u8>>, TreeError> {
        Ok(Some(b"{}".to_vec()))
    }
    fn is_file(&self, path: &str) -> bool {
        path.ends_with(".json") || path.starts_with("wide/")
    }
    fn is_dir(&self, path: &str) -> bool {
        matches!(path, "" | "wide" | "zz")
    }
    fn list(&self, path: &str) -> Vec<String> {
        match path {
            "" => vec!["package.json".into(), "wide".into(), "zz".into()],
            "wide" => (0..MANIFEST_VISITS).map(|i| format!("f{i}")).collect(),
            "zz" => vec!["package.json".into()],
            _ => Vec::new(),
        }
    }
}

#[test]
fn the_manifest_walk_is_bounded() {
    // The root's files come first; zz/ is reached only after wide/'s entries, past the bound.
    assert_eq!(manifests(&Wide), ["package.json"]);
}

#[test]
fn plans_over_the_limits_are_refused_naming_the_file() {
    const DC: &str = ".devcontainer/devcontainer.json";
    let commands: Vec<String> = (0..=MAX_STEPS)
        .map(|i| format!("\"s{i}\": \"true\""))
        .collect();
    let json = format!(
        r#"{{"image": "debian:12", "postCreateCommand": {{{}}}}}"#,
        commands.join(",")
    );
    let e = error(&[(DC, &json)]);
    assert_eq!(e.file(), Some(DC));
    assert!(e.to_string().contains("at most 64"), "{e}");
    let commands: Vec<String> = (0..MAX_STEPS)
        .map(|i| format!("\"s{i}\": \"true\""))
        .collect();
    let json = format!(
        r#"{{"image": "debian:12", "postCreateCommand": {{{}}}}}"#,
        commands.join(",")
    );
    assert_eq!(plan(&[(DC, &json)]).steps.len(), MAX_STEPS);

    let long = "x".repeat(MAX_COMMAND + 1);
    let json = format!(r#"{{"image": "debian:12", "postCreateCommand": "{long}"}}"#);
    let e = error(&[(DC, &json)]);
    assert_eq!(e.file(), Some(DC));
    assert!(e.to_string().contains("at most 65536"), "{e}");

    let packages: String = (0..=MAX_PACKAGES).map(|i| format!("p{i}\n")).collect();
    let e = error(&[("apt.txt", &packages), ("Makefile", "all:\n")]);
    assert_eq!(e.file(), Some("apt.txt"));
    assert!(e.to_string().contains("at most 500"), "{e}");

    let ports: Vec<String> = (1..=65).map(|p| p.to_string()).collect();
    let json = format!(
        r#"{{"image": "debian:12", "forwardPorts": [{}]}}"#,
        ports.join(",")
    );
    let e = error(&[(DC, &json)]);
    assert!(
        e.to_string().contains("forwardPorts: 65 ports, at most 64"),
        "{e}"
    );
}
