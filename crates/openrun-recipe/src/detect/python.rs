//! Python: `pyproject.toml` (PEP 621, Poetry, uv, PDM), `requirements*.txt`, `setup.py`,
//! `setup.cfg`, `Pipfile`; lockfiles `uv.lock`, `poetry.lock`, `Pipfile.lock`, `pdm.lock`.
//!
//! Everything installs into a virtual environment at `<workspace>/.venv`, made by Debian's
//! Python and active for every process (`VIRTUAL_ENV`, `PATH`). Poetry, uv and pipenv are
//! installed from PyPI into the system's Python (not the project's environment, where their own
//! dependencies could clash with the project's) and told to use `.venv`.

use std::collections::BTreeSet;

use super::{venv_env, version_numbers, Found, Repo};
use crate::error::PlanError;
use crate::plan::quote;

/// The Python of Debian bookworm.
const DEBIAN_PYTHON: [u64; 2] = [3, 11];

/// Requirement files installed with `-r`, in order, when present.
const REQUIREMENT_FILES: [&str; 16] = [
    "requirements.txt",
    "requirements-dev.txt",
    "requirements_dev.txt",
    "dev-requirements.txt",
    "requirements-test.txt",
    "requirements_test.txt",
    "test-requirements.txt",
    "requirements-tests.txt",
    "requirements/base.txt",
    "requirements/requirements.txt",
    "requirements/dev.txt",
    "requirements/development.txt",
    "requirements/test.txt",
    "requirements/tests.txt",
    "requirements/testing.txt",
    "requirements/ci.txt",
];

/// Extras and dependency groups that hold a project's test tools.
const TEST_EXTRAS: [&str; 4] = ["dev", "test", "testing", "tests"];

/// Projects that build against a system library (no wheel, or a source build), and the
/// Debian packages they need.
const NATIVE: [(&str, &[&str]); 7] = [
    ("mysqlclient", &["default-libmysqlclient-dev", "pkg-config"]),
    ("psycopg2", &["libpq-dev"]),
    ("pyaudio", &["portaudio19-dev"]),
    ("pycairo", &["libcairo2-dev", "pkg-config"]),
    (
        "pygobject",
        &["libcairo2-dev", "libgirepository1.0-dev", "pkg-config"],
    ),
    ("python-ldap", &["libldap2-dev", "libsasl2-dev"]),
    ("pyodbc", &["unixodbc-dev"]),
];

/// Installs a Python tool into Debian's Python (not the project's environment).
const SYSTEM_PIP: &str =
    "/usr/bin/python3 -m pip install --break-system-packages --root-user-action=ignore";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Manager {
    Pip,
    Poetry,
    Uv,
    Pipenv,
}

pub(super) fn detect(repo: &Repo) -> Result<Option<Found>, PlanError> {
    let pyproject = repo.toml("pyproject.toml")?;
    let pipfile = repo.toml("Pipfile")?;
    let requirements: Vec<&str> = REQUIREMENT_FILES
        .iter()
        .copied()
        .filter(|p| repo.file(p))
        .collect();
    let setup_py = repo.file("setup.py");
    let setup_cfg = repo.file("setup.cfg");
    // A pyproject.toml holding only tools' settings (black, ruff...) makes a Python project
    // when Python code is there too.
    let pyproject_counts = pyproject.as_ref().is_some_and(|t| {
        ["project", "build-system", "dependency-groups"]
            .iter()
            .any(|k| t.contains_key(*k))
            || t.get("tool").is_some_and(|tool| {
                ["poetry", "pdm", "uv", "pytest"]
                    .iter()
                    .any(|k| tool.get(*k).is_some())
            })
            || ["", "src"]
                .iter()
                .any(|d| repo.list(d).iter().any(|n| n.ends_with(".py")))
    });
    let nothing = !pyproject_counts && pipfile.is_none() && requirements.is_empty() && !setup_py;
    // A setup.cfg alone is often only flake8's or isort's configuration.
    if nothing && !(setup_cfg && repo.text_or_empty("setup.cfg")?.contains("[metadata]")) {
        return Ok(None);
    }
    let empty = toml::Table::new();
    let pyproject_t = pyproject.as_ref().unwrap_or(&empty);
    let project = pyproject_t.get("project").and_then(|v| v.as_table());
    let tool = pyproject_t.get("tool").and_then(|v| v.as_table());
    let poetry = tool
        .and_then(|t| t.get("poetry"))
        .and_then(|v| v.as_table());

    let manager = if repo.file("uv.lock") {
        Manager::Uv
    } else if repo.file("poetry.lock") || (poetry.is_some() && project.is_none()) {
        Manager::Poetry
    } else if pipfile.is_some() && project.is_none() && !setup_py {
        Manager::Pipenv
    } else {
        Manager::Pip
    };

    let mut f = Found::new("python");
    f.inputs(
        repo,
        &[
            "pyproject.toml",
            "setup.py",
            "setup.cfg",
            "Pipfile",
            "Pipfile.lock",
            "poetry.lock",
            "uv.lock",
            "pdm.lock",
        ],
    );
    f.inputs(repo, &requirements);
    // Files they include (`-r base.txt`, `-c constraints.txt`) key the recipe too.
    for included in included_files(repo, &requirements)? {
        if !f.inputs.contains(&included) {
            f.inputs.push(included);
        }
    }
    for (k, v) in venv_env(repo.workspace) {
        f.env.insert(k, v);
    }

    // Every requirement the repository declares, by normalised name (to find pytest and web
    // frameworks), and those the install step installs.
    let mut declared = BTreeSet::new();
    let mut installed = BTreeSet::new();
    let mut git = false;
    // A requirements file that installs the project itself (`-e .`, `.[dev]`).
    let mut project_required = false;
    for file in &requirements {
        let text = repo.text_or_empty(file)?;
        for line in text.lines() {
            let line = line.trim();
            git |= line.contains("git+");
            let target = line
                .strip_prefix("-e")
                .or_else(|| line.strip_prefix("--editable"))
                .unwrap_or(line)
                .trim_start_matches([' ', '='])
                .trim_start_matches("./");
            project_required |=
                target == "." || target.starts_with(".[") || target.starts_with(". ");
            if let Some(name) = requirement_name(line) {
                declared.insert(name.clone());
                installed.insert(name);
            }
        }
    }
    let extras_available = extras(repo, project)?;
    let extras_used: Vec<String> = extras_available
        .iter()
        .filter(|e| TEST_EXTRAS.contains(&e.as_str()))
        .cloned()
        .collect();
    if let Some(project) = project {
        for req in strings(project.get("dependencies")) {
            add_name(&mut declared, &mut installed, &req, true);
        }
        if let Some(optional) = project
            .get("optional-dependencies")
            .and_then(|v| v.as_table())
        {
            for (extra, reqs) in optional {
                let used = extras_used.contains(extra);
                for req in strings(Some(reqs)) {
                    add_name(&mut declared, &mut installed, &req, used);
                }
            }
        }
    }
    // PEP 735 groups, PDM's and uv's development dependencies: installed as plain
    // requirements by pip (the venv's pip predates `--group`); uv installs its own.
    let mut group_requirements = Vec::new();
    let mut groups = Vec::new();
    if let Some(dep_groups) = pyproject_t
        .get("dependency-groups")
        .and_then(|v| v.as_table())
    {
        for (group, reqs) in dep_groups {
            let used = TEST_EXTRAS.contains(&group.as_str());
            if used {
                groups.push(group.clone());
            }
            for req in strings(Some(reqs)) {
                add_name(&mut declared, &mut installed, &req, used);
                if used {
                    group_requirements.push(req);
                }
            }
        }
    }
    if let Some(pdm) = tool
        .and_then(|t| t.get("pdm"))
        .and_then(|p| p.get("dev-dependencies"))
        .and_then(|v| v.as_table())
    {
        for reqs in pdm.values() {
            for req in strings(Some(reqs)) {
                add_name(&mut declared, &mut installed, &req, true);
                group_requirements.push(req);
            }
        }
    }
    if let Some(uv_dev) = tool
        .and_then(|t| t.get("uv"))
        .and_then(|u| u.get("dev-dependencies"))
    {
        for req in strings(Some(uv_dev)) {
            add_name(&mut declared, &mut installed, &req, true);
            group_requirements.push(req);
        }
    }
    if let Some(poetry) = poetry {
        for key in ["dependencies", "dev-dependencies"] {
            if let Some(deps) = poetry.get(key).and_then(|v| v.as_table()) {
                for name in deps.keys() {
                    add_name(&mut declared, &mut installed, name, true);
                }
            }
        }
        if let Some(groups) = poetry.get("group").and_then(|v| v.as_table()) {
            for group in groups.values() {
                let optional = group
                    .get("optional")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false);
                if let Some(deps) = group.get("dependencies").and_then(|v| v.as_table()) {
                    for name in deps.keys() {
                        add_name(&mut declared, &mut installed, name, !optional);
                    }
                }
            }
        }
    }
    if let Some(pipfile) = &pipfile {
        for key in ["packages", "dev-packages"] {
            if let Some(deps) = pipfile.get(key).and_then(|v| v.as_table()) {
                for name in deps.keys() {
                    add_name(&mut declared, &mut installed, name, true);
                }
            }
        }
    }
    let setup_text = if setup_py {
        repo.text_or_empty("setup.py")?
    } else {
        String::new()
    };
    let cfg_text = if setup_cfg {
        repo.text_or_empty("setup.cfg")?
    } else {
        String::new()
    };
    for text in [&setup_text, &cfg_text] {
        for name in ["pytest", "django", "flask", "fastapi", "uvicorn"] {
            if mentions(text, name) {
                declared.insert(name.to_string());
            }
        }
    }

    // pytest: declared anywhere, or configured.
    let tox = repo.text_or_empty("tox.ini")?;
    let pytest_configured = repo.file("pytest.ini")
        || repo.file("conftest.py")
        || repo.file("tests/conftest.py")
        || repo.file("test/conftest.py")
        || tool.is_some_and(|t| t.contains_key("pytest"))
        || cfg_text.contains("[tool:pytest]")
        || tox.contains("[pytest]");
    // A plugin (pytest-cov, pytest-django...) brings pytest along.
    let is_pytest = |n: &String| n == "pytest" || n.starts_with("pytest-");
    let django = repo.file("manage.py")
        && (declared.contains("django") || repo.text_or_empty("manage.py")?.contains("django"));
    // pytest also runs unittest's TestCases, and plain `def test_...` functions unittest
    // would skip (passing with nothing run): test files are pytest's, save Django's.
    let pytest =
        declared.iter().any(is_pytest) || pytest_configured || (!django && has_test_files(repo));
    let add_pytest = pytest && !installed.iter().any(is_pytest);

    // The project itself is installable with a pyproject.toml that says how to build it, or
    // a setup.py.
    let installable = setup_py
        || pyproject_t.contains_key("build-system")
        || project.is_some()
        || poetry.is_some();

    // Python version: requires-python, Poetry's `python` dependency, `.python-version`.
    let wanted = [
        (
            "pyproject.toml",
            project
                .and_then(|p| p.get("requires-python"))
                .and_then(|v| v.as_str())
                .map(str::to_string),
        ),
        (
            "pyproject.toml",
            poetry
                .and_then(|p| p.get("dependencies"))
                .and_then(|d| d.get("python"))
                .and_then(|v| v.as_str())
                .map(str::to_string),
        ),
        (
            ".python-version",
            repo.text(".python-version")?
                .and_then(|t| t.lines().next().map(|l| format!("=={}", l.trim()))),
        ),
    ];
    for (file, spec) in wanted {
        let Some(spec) = spec else { continue };
        if minimum_python(&spec).is_some_and(|min| min > DEBIAN_PYTHON) {
            let spec = spec.trim_start_matches("==");
            f.notes.push(format!(
                "{file} asks for Python {spec}; Debian bookworm has {}.{}",
                DEBIAN_PYTHON[0], DEBIAN_PYTHON[1]
            ));
        }
    }
    if git {
        f.package("git");
    }
    for (name, packages) in NATIVE {
        if declared.contains(name) {
            for package in packages {
                f.package(package);
            }
        }
    }

    let manifest = repo
        .first(&["pyproject.toml", "setup.py", "Pipfile"])
        .or(requirements.first().copied())
        .unwrap_or("setup.cfg");
    f.step("venv", manifest, &["python3 -m venv .venv".into()]);
    match manager {
        Manager::Uv => {
            f.env.insert(
                "UV_PROJECT_ENVIRONMENT".into(),
                format!("{}/.venv", repo.workspace),
            );
            f.env.insert("UV_PYTHON_DOWNLOADS".into(), "never".into());
            f.env.insert("UV_LINK_MODE".into(), "copy".into());
            let mut sync = "uv sync --frozen".to_string();
            for extra in &extras_used {
                sync.push_str(&format!(" --extra {}", quote(extra)));
            }
            for group in &groups {
                if group != "dev" {
                    sync.push_str(&format!(" --group {}", quote(group)));
                }
            }
            let mut command = format!("{SYSTEM_PIP} uv && {sync}");
            if add_pytest {
                command.push_str(" && uv pip install pytest");
            }
            f.step("install", "uv.lock", &[command]);
        }
        Manager::Poetry => {
            f.env
                .insert("POETRY_VIRTUALENVS_IN_PROJECT".into(), "true".into());
            f.env.insert("POETRY_NO_INTERACTION".into(), "1".into());
            let mut install = "poetry install".to_string();
            let mut poetry_extras: BTreeSet<&String> = extras_available
                .iter()
                .filter(|_| project.is_some())
                .collect();
            if let Some(extras) = poetry
                .and_then(|p| p.get("extras"))
                .and_then(|v| v.as_table())
            {
                poetry_extras.extend(extras.keys());
            }
            for extra in poetry_extras
                .into_iter()
                .filter(|e| TEST_EXTRAS.contains(&e.as_str()))
            {
                install.push_str(&format!(" -E {}", quote(extra)));
            }
            let mut command = format!("{SYSTEM_PIP} poetry && {install}");
            if add_pytest {
                command.push_str(" && pip install pytest");
            }
            let file = if repo.file("poetry.lock") {
                "poetry.lock"
            } else {
                "pyproject.toml"
            };
            f.step("install", file, &[command]);
        }
        Manager::Pipenv => {
            f.env.insert("PIPENV_VENV_IN_PROJECT".into(), "1".into());
            let pytest_tail = if add_pytest {
                " && pip install pytest"
            } else {
                ""
            };
            if repo.file("Pipfile.lock") {
                f.step(
                    "install",
                    "Pipfile.lock",
                    &[
                        format!("{SYSTEM_PIP} pipenv && pipenv sync --dev{pytest_tail}"),
                        format!(
                            "{SYSTEM_PIP} pipenv && pipenv requirements --dev \
                             > /tmp/requirements.txt && pip install -r /tmp/requirements.txt\
                             {pytest_tail}"
                        ),
                    ],
                );
            } else {
                f.step(
                    "install",
                    "Pipfile",
                    &[format!(
                        "{SYSTEM_PIP} pipenv && pipenv install --dev{pytest_tail}"
                    )],
                );
            }
        }
        Manager::Pip => {
            let mut args: Vec<String> = Vec::new();
            for file in &requirements {
                args.push(format!("-r {}", quote(file)));
            }
            for req in &group_requirements {
                args.push(quote(req));
            }
            if add_pytest {
                args.push("pytest".into());
            }
            let project_spec = if extras_used.is_empty() {
                ".".to_string()
            } else {
                format!(".[{}]", extras_used.join(","))
            };
            let file = if installable && !project_required {
                repo.first(&["pyproject.toml", "setup.py"])
                    .unwrap_or("pyproject.toml")
            } else {
                requirements.first().copied().unwrap_or(manifest)
            };
            if installable && !project_required {
                let editable =
                    format!("pip install {} -e {}", args.join(" "), quote(&project_spec));
                let plain = format!("pip install {} {}", args.join(" "), quote(&project_spec));
                f.step("install", file, &[squeeze(&editable), squeeze(&plain)]);
            } else if !args.is_empty() {
                f.step(
                    "install",
                    file,
                    &[format!("pip install {}", args.join(" "))],
                );
            }
        }
    }

    // Test.
    if pytest {
        f.test("python3 -m pytest", true);
    } else if django {
        f.test("python3 manage.py test", true);
    } else {
        let (command, strong) = unittest(repo);
        f.test(&command, strong);
    }

    // Start.
    if django {
        f.start("python3 manage.py runserver 0.0.0.0:8000", Some(8000));
    } else if declared.contains("fastapi") && declared.contains("uvicorn") {
        for module in ["main", "app"] {
            let file = format!("{module}.py");
            if repo.text_or_empty(&file)?.contains("FastAPI(") {
                f.start(
                    &format!("uvicorn {module}:app --host 0.0.0.0 --port 8000"),
                    Some(8000),
                );
                break;
            }
        }
    } else if declared.contains("flask") {
        for module in ["app", "main", "wsgi"] {
            let file = format!("{module}.py");
            if repo.text_or_empty(&file)?.contains("Flask(") {
                f.start(
                    &format!("flask --app {module} run --host 0.0.0.0 --port 5000"),
                    Some(5000),
                );
                break;
            }
        }
    }
    Ok(Some(f))
}

/// `pip install  -e .` → `pip install -e .` (no empty argument list).
fn squeeze(command: &str) -> String {
    command.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The repository's files that requirement files include with `-r`/`-c` (transitively; paths
/// relative to the including file; at most 64).
fn included_files(repo: &Repo, roots: &[&str]) -> Result<Vec<String>, PlanError> {
    let mut seen: Vec<String> = roots.iter().map(|r| r.to_string()).collect();
    let mut queue = seen.clone();
    let mut out = Vec::new();
    while let Some(file) = queue.pop() {
        let text = repo.text_or_empty(&file)?;
        let dir = file.rsplit_once('/').map_or("", |(d, _)| d);
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let target = match words.next() {
                Some("-r" | "--requirement" | "-c" | "--constraint") => words.next(),
                Some(w) => ["-r", "--requirement=", "-c", "--constraint="]
                    .iter()
                    .find_map(|p| w.strip_prefix(p).filter(|t| !t.is_empty())),
                None => None,
            };
            let Some(target) = target else { continue };
            let Some(path) = join(dir, target) else {
                continue;
            };
            if out.len() < 64 && !seen.contains(&path) && repo.file(&path) {
                seen.push(path.clone());
                queue.push(path.clone());
                out.push(path);
            }
        }
    }
    Ok(out)
}

/// `target` relative to the directory `dir`, as a path of the tree; none if it leaves it or is
/// absolute or a URL.
fn join(dir: &str, target: &str) -> Option<String> {
    if target.starts_with('/') || target.contains("://") {
        return None;
    }
    let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

/// Whether test modules (`test_*.py`, `*_test.py`) are at the root or under `tests/` or
/// `test/` (three levels deep at most).
fn has_test_files(repo: &Repo) -> bool {
    fn is_test(name: &str) -> bool {
        name.ends_with(".py") && (name.starts_with("test_") || name.ends_with("_test.py"))
    }
    fn walk(repo: &Repo, dir: &str, depth: usize, budget: &mut usize) -> bool {
        for name in repo.list(dir) {
            if *budget == 0 {
                return false;
            }
            *budget -= 1;
            let path = format!("{dir}/{name}");
            if is_test(&name) && repo.file(&path) {
                return true;
            }
            if depth > 1 && repo.dir(&path) && walk(repo, &path, depth - 1, budget) {
                return true;
            }
        }
        false
    }
    let mut budget = 2000;
    repo.list("").iter().any(|n| is_test(n) && repo.file(n))
        || ["tests", "test"]
            .iter()
            .any(|d| repo.dir(d) && walk(repo, d, 3, &mut budget))
}

/// unittest's discovery where the tests are; whether test files were seen.
fn unittest(repo: &Repo) -> (String, bool) {
    for dir in ["tests", "test"] {
        if repo.dir(dir) {
            let strong = repo
                .list(dir)
                .iter()
                .any(|n| n.starts_with("test") && n.ends_with(".py"));
            let command = if repo.file(&format!("{dir}/__init__.py")) {
                format!("python3 -m unittest discover -s {dir} -t .")
            } else {
                format!("python3 -m unittest discover -s {dir}")
            };
            return (command, strong);
        }
    }
    let strong = repo
        .list("")
        .iter()
        .any(|n| n.starts_with("test") && n.ends_with(".py"));
    ("python3 -m unittest discover".into(), strong)
}

/// The extras the project declares (pyproject's `optional-dependencies`, setup.cfg's
/// `[options.extras_require]`, keys of setup.py's `extras_require` seen as `"test":`).
fn extras(repo: &Repo, project: Option<&toml::Table>) -> Result<BTreeSet<String>, PlanError> {
    let mut out = BTreeSet::new();
    if let Some(optional) = project
        .and_then(|p| p.get("optional-dependencies"))
        .and_then(|v| v.as_table())
    {
        out.extend(optional.keys().cloned());
    }
    if project.is_none() {
        let cfg = repo.text_or_empty("setup.cfg")?;
        let mut in_extras = false;
        for line in cfg.lines() {
            let trimmed = line.trim();
            if trimmed.starts_with('[') {
                in_extras = trimmed == "[options.extras_require]";
            } else if in_extras && !line.starts_with(char::is_whitespace) {
                if let Some((key, _)) = trimmed.split_once('=') {
                    out.insert(key.trim().to_string());
                }
            }
        }
        let setup = repo.text_or_empty("setup.py")?;
        if setup.contains("extras_require") {
            for extra in TEST_EXTRAS {
                if setup.contains(&format!("\"{extra}\":"))
                    || setup.contains(&format!("'{extra}':"))
                {
                    out.insert(extra.to_string());
                }
            }
        }
    }
    Ok(out)
}

/// The strings of a TOML array (other items, e.g. PEP 735 `{include-group = ...}`, skipped).
fn strings(value: Option<&toml::Value>) -> Vec<String> {
    value
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn add_name(
    declared: &mut BTreeSet<String>,
    installed: &mut BTreeSet<String>,
    requirement: &str,
    is_installed: bool,
) {
    if let Some(name) = requirement_name(requirement) {
        declared.insert(name.clone());
        if is_installed {
            installed.insert(name);
        }
    }
}

/// The normalised project name a requirement line starts with (`Django>=4` → `django`); none
/// for options (`-r x`), comments and URLs.
fn requirement_name(line: &str) -> Option<String> {
    let line = line.trim();
    let name: String = line
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
        .collect();
    if name.is_empty() || !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return None;
    }
    let rest = &line[name.len()..];
    if rest.starts_with(':') {
        return None; // a URL (`https://...`)
    }
    Some(name.to_ascii_lowercase().replace(['_', '.'], "-"))
}

/// Whether `text` (setup.py, setup.cfg) names the package `name` as a word.
fn mentions(text: &str, name: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    lower.match_indices(name).any(|(i, _)| {
        let before = lower[..i].chars().next_back();
        let after = lower[i + name.len()..].chars().next();
        !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            && !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    })
}

/// The lowest Python a specifier allows (`>=3.12`, `~=3.12`, `==3.12.*`, Poetry's `^3.12` →
/// 3.12); none when it has no lower bound.
fn minimum_python(spec: &str) -> Option<[u64; 2]> {
    spec.split([',', ' '])
        .filter_map(|clause| {
            let clause = clause.trim();
            let bound = clause
                .strip_prefix(">=")
                .or_else(|| clause.strip_prefix("~="))
                .or_else(|| clause.strip_prefix("=="))
                .or_else(|| clause.strip_prefix('>'))
                .or_else(|| clause.strip_prefix('^'))
                .or_else(|| clause.strip_prefix('~'))?;
            let v = version_numbers(bound);
            (v.len() >= 2).then(|| [v[0], v[1]])
        })
        .max()
}
