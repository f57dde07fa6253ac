//! The order of sources: devcontainer.json, then a Dockerfile, then languages.
//!
//! Language detection reads manifests and lockfiles at the repository's root (one module per
//! language under `detect/`) and plans a Debian bookworm environment: the language's Debian
//! packages, the steps that install the dependencies (each naming the file it comes from), the
//! test suite, and how to start the application when that is clear. Several languages combine:
//! packages, environment, steps and hosts are merged, and the test is the first language's (in
//! the order Rust, Python, Node, Go, Java, Ruby, C/C++) that has a real test suite. C/C++ (CMake,
//! Make, autotools) counts only when no other language is found: a Makefile next to a
//! `package.json` is a convenience, not the project. `apt.txt` or `Aptfile` (repo2docker's and
//! Heroku's convention) adds Debian packages.
//!
//! Everything here is deterministic: the same tree gives the same plan (packages, hosts and
//! inputs sorted and without duplicates), since the plan keys the recipe.

mod apt;
mod cpp;
mod go;
mod java;
mod node;
mod python;
mod ruby;
mod rust;

use std::collections::{BTreeMap, BTreeSet};

use crate::error::PlanError;
use crate::plan::{BaseImage, Command, Phase, Plan, PlanSource, Step};
use crate::tree::RepoTree;

/// The Debian suite detected plans start from.
pub const SUITE: &str = "bookworm";

/// The `PATH` of a Debian root shell, which toolchains prepend to.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What a language needs on a Debian base: packages, environment and the hosts its package
/// manager downloads from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Toolchain {
    /// Debian packages.
    pub packages: Vec<String>,
    /// Environment (e.g. `CARGO_HOME`, `PATH` additions).
    pub env: BTreeMap<String, String>,
    /// Egress allowlist entries of its registries.
    pub network: Vec<String>,
}

/// The toolchain of `language` (`rust`, `python`, `node`, `go`, `java`, `ruby`, `c++`), or
/// `None` for a language this module does not know. A few common aliases are accepted
/// (`javascript`, `typescript`, `golang`, `cpp`, `c`, `kotlin`...).
///
/// Every toolchain has `ca-certificates` (the registries are HTTPS and several clients use
/// the system's trust store). Python's sets `PIP_BREAK_SYSTEM_PACKAGES=1` so that a
/// devcontainer's `pip install` works on Debian's Python as it does in the devcontainer images
/// (detected plans install into a virtual environment instead).
pub fn toolchain(language: &str) -> Option<Toolchain> {
    type Spec = (
        &'static [&'static str],
        &'static [(&'static str, &'static str)],
        &'static [&'static str],
    );
    let (packages, env, network): Spec = match language.to_ascii_lowercase().as_str() {
        "rust" => (
            // cargo-web/rustc-web: Debian's newer Rust (1.85, /usr/bin/cargo); the plain
            // `cargo` package (0.66) cannot use crates.io's sparse index.
            &["build-essential", "cargo-web", "pkg-config", "rustc-web"],
            &[],
            &["crates.io", "index.crates.io", "static.crates.io"],
        ),
        "python" | "python3" => (
            &[
                "build-essential",
                "python-is-python3",
                "python3",
                "python3-dev",
                "python3-pip",
                "python3-venv",
            ],
            &[
                ("PIP_BREAK_SYSTEM_PACKAGES", "1"),
                ("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
            ],
            &["files.pythonhosted.org", "pypi.org"],
        ),
        "node" | "nodejs" | "javascript" | "typescript" => (
            &["nodejs", "npm"],
            &[("NPM_CONFIG_UPDATE_NOTIFIER", "false")],
            &["registry.npmjs.org"],
        ),
        "go" | "golang" => (&["golang-go"], &[], &["proxy.golang.org", "sum.golang.org"]),
        "java" | "kotlin" => (
            &["default-jdk-headless", "maven"],
            &[],
            &["repo.maven.apache.org", "repo1.maven.org"],
        ),
        "ruby" => (
            &["build-essential", "bundler", "ruby", "ruby-dev"],
            &[],
            &["index.rubygems.org", "rubygems.org"],
        ),
        "c++" | "cpp" | "c" => (&["build-essential", "cmake"], &[], &[]),
        _ => return None,
    };
    let mut packages: Vec<String> = packages.iter().map(|p| p.to_string()).collect();
    packages.push("ca-certificates".into());
    packages.sort();
    Some(Toolchain {
        packages,
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        network: network.iter().map(|h| h.to_string()).collect(),
    })
}

/// The plan for the repository `tree`, named `name` (its directory or the URL's last part,
/// which names the workspace `/workspaces/<name>`).
///
/// A devcontainer.json wins; when it names no test, the detected languages' test fills it.
/// Then a root `Dockerfile` (or `Containerfile`): it builds the environment (no packages, no
/// steps); the test, start command, ports and hosts come from detection. Then detection alone
/// on Debian bookworm; nothing recognisable is [`PlanError::NoProject`]. In the first two
/// cases a manifest that cannot be read only costs the detected test (a note says why); in the
/// last it is the error.
pub fn plan_for(tree: &dyn RepoTree, name: &str) -> Result<Plan, PlanError> {
    let mut plan = plan_from_sources(tree, name)?;
    check_limits(&plan)?;
    plan.inputs.extend(manifests(tree));
    plan.inputs.sort();
    plan.inputs.dedup();
    Ok(plan)
}

/// Most steps a plan may have (each takes a snapshot before it runs).
pub const MAX_STEPS: usize = 64;

/// Most Debian packages a plan may install.
pub const MAX_PACKAGES: usize = 500;

/// Longest command (bytes; an exec form's arguments together) a plan may run.
pub const MAX_COMMAND: usize = 64 * 1024;

/// A plan over [`MAX_STEPS`], [`MAX_PACKAGES`] or [`MAX_COMMAND`] is refused, naming the file
/// it comes from and the limit: what a repository asks must stay within what a server runs.
fn check_limits(plan: &Plan) -> Result<(), PlanError> {
    let config = plan.config_file.as_deref();
    if let Some(step) = plan.steps.get(MAX_STEPS) {
        return Err(PlanError::invalid(
            config.unwrap_or(&step.file),
            format!(
                "{} setup steps: at most {MAX_STEPS} are run",
                plan.steps.len()
            ),
        ));
    }
    if plan.system_packages.len() > MAX_PACKAGES {
        let file = config.or_else(|| {
            ["apt.txt", "Aptfile"]
                .into_iter()
                .find(|f| plan.inputs.iter().any(|i| i == f))
        });
        return Err(PlanError::invalid(
            file.unwrap_or("apt.txt"),
            format!(
                "{} system packages: at most {MAX_PACKAGES} are installed",
                plan.system_packages.len()
            ),
        ));
    }
    let size = |command: &Command| match command {
        Command::Shell(text) => text.len(),
        Command::Exec(args) => args.iter().map(|a| a.len() + 1).sum(),
    };
    let too_long = |file: &str, what: &str, command: &Command| {
        let n = size(command);
        (n > MAX_COMMAND).then(|| {
            PlanError::invalid(
                file,
                format!("{what}: the command is {n} bytes, at most {MAX_COMMAND} are run"),
            )
        })
    };
    for step in &plan.steps {
        for command in &step.commands {
            if let Some(e) = too_long(&step.file, &step.name, command) {
                return Err(e);
            }
        }
    }
    let file = config.unwrap_or("plan");
    for (what, command) in [("test", &plan.test), ("start", &plan.start)] {
        if let Some(e) = command.as_ref().and_then(|c| too_long(file, what, c)) {
            return Err(e);
        }
    }
    Ok(())
}

/// Names of the manifests and lockfiles of every supported language (and of `apt.txt`):
/// wherever one is in the tree, it is an input of the plan.
const MANIFESTS: &[&str] = &[
    "Cargo.toml",
    "Cargo.lock",
    "pom.xml",
    "build.gradle",
    "build.gradle.kts",
    "settings.gradle",
    "settings.gradle.kts",
    "gradle.lockfile",
    "package.json",
    "package-lock.json",
    "npm-shrinkwrap.json",
    "yarn.lock",
    "pnpm-lock.yaml",
    "pnpm-workspace.yaml",
    "go.mod",
    "go.sum",
    "go.work",
    "pyproject.toml",
    "setup.py",
    "setup.cfg",
    "Pipfile",
    "Pipfile.lock",
    "poetry.lock",
    "uv.lock",
    "Gemfile",
    "Gemfile.lock",
    "CMakeLists.txt",
    "Makefile",
    "apt.txt",
    "Aptfile",
];

/// Directories [`manifests`] does not look into: dependencies, build output, VCS data.
const NOT_SEARCHED: &[&str] = &[
    "node_modules",
    "vendor",
    ".git",
    "target",
    "build",
    "dist",
    ".venv",
];

/// How deep [`manifests`] looks (the root's files are depth 1).
const MANIFEST_DEPTH: usize = 6;

/// How many directory entries [`manifests`] looks at, at most.
const MANIFEST_VISITS: usize = 50_000;

/// Whether `name` is a manifest or lockfile's name.
fn is_manifest(name: &str) -> bool {
    MANIFESTS.contains(&name)
        || name.ends_with(".gemspec")
        || (name.starts_with("requirements") && name.ends_with(".txt"))
}

/// Every manifest and lockfile in the tree, at most [`MANIFEST_DEPTH`] deep, outside
/// [`NOT_SEARCHED`] directories, sorted. A nested one (a Gradle `app/build.gradle.kts`, a
/// workspace member's `Cargo.toml`, a Maven module's `pom.xml`) is read by the setup's
/// tools, so a change to it must change the recipe's key. The walk looks at no more than
/// [`MANIFEST_VISITS`] entries (breadth first, so shallow files come first).
fn manifests(tree: &dyn RepoTree) -> Vec<String> {
    let mut found = BTreeSet::new();
    let mut queue = std::collections::VecDeque::from([(String::new(), 1usize)]);
    let mut visits = 0usize;
    while let Some((dir, depth)) = queue.pop_front() {
        for name in tree.list(&dir) {
            visits += 1;
            if visits > MANIFEST_VISITS {
                return found.into_iter().collect();
            }
            let path = if dir.is_empty() {
                name.clone()
            } else {
                format!("{dir}/{name}")
            };
            if is_manifest(&name) && tree.is_file(&path) {
                found.insert(path);
            } else if depth < MANIFEST_DEPTH
                && !NOT_SEARCHED.contains(&name.as_str())
                && tree.is_dir(&path)
            {
                queue.push_back((path, depth + 1));
            }
        }
    }
    found.into_iter().collect()
}

/// [`plan_for`] without the nested manifests: the plan its source (devcontainer.json,
/// Dockerfile or detection) makes.
fn plan_from_sources(tree: &dyn RepoTree, name: &str) -> Result<Plan, PlanError> {
    let workspace = format!("/workspaces/{name}");
    if let Some(file) = crate::devcontainer::find(tree) {
        let mut plan = crate::devcontainer::plan(tree, file, name)?;
        if plan.test.is_none() {
            let repo = Repo::new(tree, &plan.workspace);
            match detect_all(&repo) {
                Ok(found) if !found.is_empty() => {
                    let primary = primary(&found);
                    for f in &found {
                        if !plan.languages.iter().any(|l| l == f.language) {
                            plan.languages.push(f.language.to_string());
                        }
                    }
                    plan.test = found[primary].test.as_ref().map(|t| t.command.clone());
                }
                Ok(_) => {}
                Err(e) => plan.notes.push(format!("no test detected: {e}")),
            }
        }
        return Ok(plan);
    }
    // Podman's name for the same file.
    let dockerfile = ["Dockerfile", "Containerfile"]
        .into_iter()
        .find(|f| tree.is_file(f));
    if let Some(dockerfile) = dockerfile {
        let repo = Repo::new(tree, &workspace);
        let mut plan = Plan::empty(PlanSource::Dockerfile, &workspace);
        plan.config_file = Some(dockerfile.into());
        plan.base = BaseImage::Dockerfile {
            dockerfile: dockerfile.into(),
            context: ".".into(),
            args: BTreeMap::new(),
        };
        let mut inputs = BTreeSet::from([dockerfile.to_string()]);
        match detect_all(&repo) {
            Ok(found) if !found.is_empty() => {
                let primary = primary(&found);
                plan.languages = found.iter().map(|f| f.language.to_string()).collect();
                plan.test = found[primary].test.as_ref().map(|t| t.command.clone());
                plan.start = found[primary].start.clone();
                let mut ports = BTreeSet::new();
                let mut network = BTreeSet::new();
                for f in &found {
                    ports.extend(f.ports.iter().copied());
                    network.extend(f.network.iter().cloned());
                    inputs.extend(f.inputs.iter().cloned());
                }
                plan.ports = ports.into_iter().collect();
                plan.network = network.into_iter().collect();
            }
            Ok(_) => {}
            Err(e) => plan.notes.push(format!("no test detected: {e}")),
        }
        for file in ["apt.txt", "Aptfile"] {
            if tree.is_file(file) {
                plan.notes.push(format!(
                    "{file} is not applied: the Dockerfile makes the environment"
                ));
            }
        }
        plan.inputs = inputs.into_iter().collect();
        return Ok(plan);
    }
    detected_plan(tree, &workspace)
}

/// Detection alone: Debian, the languages' packages and steps, `apt.txt`.
fn detected_plan(tree: &dyn RepoTree, workspace: &str) -> Result<Plan, PlanError> {
    let repo = Repo::new(tree, workspace);
    let found = detect_all(&repo)?;
    if found.is_empty() {
        return Err(PlanError::NoProject);
    }
    let extra = apt::read(&repo)?;
    let primary = primary(&found);
    let mut plan = Plan::empty(PlanSource::Detected, workspace);
    let mut packages: BTreeSet<String> = extra.packages.into_iter().collect();
    let mut network = BTreeSet::new();
    let mut inputs: BTreeSet<String> = extra.files.into_iter().collect();
    let mut ports = BTreeSet::new();
    let several = found.len() > 1;
    for f in &found {
        plan.languages.push(f.language.to_string());
        packages.extend(f.packages.iter().cloned());
        network.extend(f.network.iter().cloned());
        inputs.extend(f.inputs.iter().cloned());
        ports.extend(f.ports.iter().copied());
        for (k, v) in &f.env {
            plan.env.insert(k.clone(), v.clone());
        }
        for step in &f.steps {
            let mut step = step.clone();
            if several {
                step.name = format!("{}:{}", step.name, f.language);
            }
            plan.steps.push(step);
        }
        plan.notes.extend(f.notes.iter().cloned());
    }
    let main = &found[primary];
    plan.test = main.test.as_ref().map(|t| t.command.clone());
    plan.start = main.start.clone();
    if several && plan.test.is_some() {
        plan.notes.push(format!("test: {}'s", main.language));
    }
    plan.system_packages = packages.into_iter().collect();
    plan.network = network.into_iter().collect();
    plan.inputs = inputs.into_iter().collect();
    plan.ports = ports.into_iter().collect();
    Ok(plan)
}

/// One language's detection: `None` when its manifests are absent.
type Detector = fn(&Repo) -> Result<Option<Found>, PlanError>;

/// Every language found, in the detection order; C/C++ only when nothing else is.
fn detect_all(repo: &Repo) -> Result<Vec<Found>, PlanError> {
    let detectors: [Detector; 6] = [
        rust::detect,
        python::detect,
        node::detect,
        go::detect,
        java::detect,
        ruby::detect,
    ];
    let mut found = Vec::new();
    for detect in detectors {
        if let Some(f) = detect(repo)? {
            found.push(f);
        }
    }
    if found.is_empty() {
        if let Some(f) = cpp::detect(repo)? {
            found.push(f);
        }
    }
    Ok(found)
}

/// The language whose test the plan runs: the first with a real test suite, else the first
/// with any test command, else the first.
fn primary(found: &[Found]) -> usize {
    found
        .iter()
        .position(|f| f.test.as_ref().is_some_and(|t| t.strong))
        .or_else(|| found.iter().position(|f| f.test.is_some()))
        .unwrap_or(0)
}

/// A detected test command.
#[derive(Debug, Clone)]
struct Test {
    command: Command,
    /// Whether the repository says it has tests (a test script, a test framework in its
    /// dependencies, a test directory), rather than a fallback that may find none.
    strong: bool,
}

/// What one language contributes to a plan.
#[derive(Debug, Clone)]
struct Found {
    language: &'static str,
    packages: Vec<String>,
    env: BTreeMap<String, String>,
    network: Vec<String>,
    steps: Vec<Step>,
    test: Option<Test>,
    start: Option<Command>,
    ports: Vec<u16>,
    inputs: Vec<String>,
    notes: Vec<String>,
}

impl Found {
    /// `language` with its [`toolchain`].
    fn new(language: &'static str) -> Self {
        let tc = toolchain(language).unwrap_or_default();
        Found {
            language,
            packages: tc.packages,
            env: tc.env,
            network: tc.network,
            steps: Vec::new(),
            test: None,
            start: None,
            ports: Vec::new(),
            inputs: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// A setup step: `commands` are alternatives, tried in order.
    fn step(&mut self, name: &str, file: &str, commands: &[String]) {
        self.steps.push(Step {
            name: name.to_string(),
            phase: Phase::Setup,
            commands: commands.iter().map(|c| Command::Shell(c.clone())).collect(),
            file: file.to_string(),
        });
    }

    fn test(&mut self, command: &str, strong: bool) {
        self.test = Some(Test {
            command: Command::Shell(command.to_string()),
            strong,
        });
    }

    fn start(&mut self, command: &str, port: Option<u16>) {
        self.start = Some(Command::Shell(command.to_string()));
        self.ports.extend(port);
    }

    fn package(&mut self, package: &str) {
        if !self.packages.iter().any(|p| p == package) {
            self.packages.push(package.to_string());
            self.packages.sort();
        }
    }

    fn host(&mut self, host: &str) {
        if !self.network.iter().any(|h| h == host) {
            self.network.push(host.to_string());
            self.network.sort();
        }
    }

    /// Records the files of `paths` that exist as inputs.
    fn inputs(&mut self, repo: &Repo, paths: &[&str]) {
        for p in paths {
            if repo.file(p) && !self.inputs.iter().any(|i| i == p) {
                self.inputs.push(p.to_string());
            }
        }
    }
}

/// The repository as detection reads it: files decoded, parse errors with positions.
struct Repo<'a> {
    tree: &'a dyn RepoTree,
    workspace: &'a str,
}

impl<'a> Repo<'a> {
    fn new(tree: &'a dyn RepoTree, workspace: &'a str) -> Self {
        Repo { tree, workspace }
    }

    fn file(&self, path: &str) -> bool {
        self.tree.is_file(path)
    }

    fn dir(&self, path: &str) -> bool {
        self.tree.is_dir(path)
    }

    fn list(&self, path: &str) -> Vec<String> {
        self.tree.list(path)
    }

    /// The first of `paths` that is a file.
    fn first<'p>(&self, paths: &[&'p str]) -> Option<&'p str> {
        paths.iter().copied().find(|p| self.file(p))
    }

    /// A text file; not UTF-8 is an error naming it.
    fn text(&self, path: &str) -> Result<Option<String>, PlanError> {
        let Some(bytes) = self.tree.read(path)? else {
            return Ok(None);
        };
        match String::from_utf8(bytes) {
            // A byte order mark (editors on Windows write one) is not content.
            Ok(text) => Ok(Some(match text.strip_prefix('\u{feff}') {
                Some(rest) => rest.to_string(),
                None => text,
            })),
            Err(e) => {
                let (line, column) = position(e.as_bytes(), e.utf8_error().valid_up_to());
                Err(PlanError::Invalid {
                    file: path.to_string(),
                    line: Some(line),
                    column: Some(column),
                    message: "not valid UTF-8".into(),
                })
            }
        }
    }

    /// A text file, or "" when it is absent (for files only searched in).
    fn text_or_empty(&self, path: &str) -> Result<String, PlanError> {
        Ok(self.text(path)?.unwrap_or_default())
    }

    /// A TOML file as a table; a syntax error names the file, line and column.
    fn toml(&self, path: &str) -> Result<Option<toml::Table>, PlanError> {
        let Some(text) = self.text(path)? else {
            return Ok(None);
        };
        match toml::from_str::<toml::Table>(&text) {
            Ok(table) => Ok(Some(table)),
            Err(e) => {
                let (line, column) = match e.span() {
                    Some(span) => {
                        let (l, c) = position(text.as_bytes(), span.start);
                        (Some(l), Some(c))
                    }
                    None => (None, None),
                };
                Err(PlanError::Invalid {
                    file: path.to_string(),
                    line,
                    column,
                    message: format!("invalid TOML: {}", e.message().trim()),
                })
            }
        }
    }

    /// A JSON file; a syntax error names the file, line and column.
    fn json(&self, path: &str) -> Result<Option<serde_json::Value>, PlanError> {
        let Some(text) = self.text(path)? else {
            return Ok(None);
        };
        match serde_json::from_str(&text) {
            Ok(value) => Ok(Some(value)),
            Err(e) => Err(PlanError::Invalid {
                file: path.to_string(),
                line: Some(e.line()),
                column: Some(e.column()),
                message: format!("invalid JSON: {}", strip_position(&e.to_string())),
            }),
        }
    }
}

/// serde_json's message without its " at line L column C" suffix (the error carries them).
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// 1-based line and column (in characters) of byte `offset` of `text`.
fn position(text: &[u8], offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let column = String::from_utf8_lossy(&before[start..]).chars().count() + 1;
    (line, column)
}

/// The environment that makes `<workspace>/.venv` the active Python.
fn venv_env(workspace: &str) -> [(String, String); 2] {
    let venv = format!("{workspace}/.venv");
    [
        ("PATH".into(), format!("{venv}/bin:{DEFAULT_PATH}")),
        ("VIRTUAL_ENV".into(), venv),
    ]
}

/// A `major.minor[.patch]` version's numbers (leading `v`, `^`, `~`, `>=`, `=` skipped; up to
/// the first character that is neither digit nor dot).
fn version_numbers(text: &str) -> Vec<u64> {
    let text = text.trim_start_matches(|c: char| !c.is_ascii_digit());
    text.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()
        .unwrap_or("")
        .split('.')
        .map_while(|n| n.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests;
