//! devcontainer.json (the Development Containers specification) to a plan.
//!
//! What is carried out: `image` (Debian images as they are; Microsoft's devcontainer images and
//! Docker Hub's language images approximated by Debian bookworm with the language's Debian
//! toolchain, said in a note), `build` (a Dockerfile, paths relative to the file's folder),
//! `containerEnv`, `remoteEnv`, `remoteUser`/`containerUser`, `workspaceFolder`,
//! `forwardPorts`, `hostRequirements`, the lifecycle commands `onCreateCommand`,
//! `updateContentCommand`, `postCreateCommand` (set-up steps, snapshotted) and
//! `postStartCommand` (every start), well-known language Features (as Debian toolchains), and
//! our own block `customizations.openrun` (`packages`, `test`, `start`, `network`,
//! `languages`). Every other key is listed in [`Plan::unsupported`] with the reason, never
//! dropped silently; Docker Compose configurations are refused.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::detect::{toolchain, SUITE};
use crate::error::PlanError;
use crate::jsonc;
use crate::plan::{BaseImage, Command, Phase, Plan, PlanSource, Step};
use crate::tree::RepoTree;

/// Where a devcontainer.json is looked for, in order.
pub const FILES: [&str; 2] = [".devcontainer/devcontainer.json", ".devcontainer.json"];

/// Whether `folder` (without a trailing `/`) can hold the workspace: absolute, normalised
/// (no empty, `.` or `..` component), not `/`, and not in a system directory (the tree is
/// extracted there, and files it lacks are removed there on a cached open) nor in `/tmp`
/// (the sandbox's own tmpfs, not kept in snapshots, so a recipe would lose it).
fn workspace_folder(folder: &str) -> Result<(), &'static str> {
    let Some(rest) = folder.strip_prefix('/') else {
        return Err("expected an absolute path");
    };
    if rest.is_empty() {
        return Err("expected an absolute path below /, not / itself");
    }
    if rest
        .split('/')
        .any(|p| p.is_empty() || p == "." || p == "..")
    {
        return Err("expected a normalised path (no //, . or .. components)");
    }
    let top = rest.split('/').next().unwrap_or(rest);
    if top == "tmp" {
        return Err("/tmp is the sandbox's tmpfs, which snapshots do not keep: use a directory like /workspaces/NAME");
    }
    const SYSTEM: [&str; 8] = ["proc", "sys", "dev", "etc", "usr", "bin", "sbin", "boot"];
    if SYSTEM.contains(&top) || top.starts_with("lib") {
        return Err("expected a directory outside the system's (/proc, /sys, /dev, /etc, /usr, /bin, /sbin, /boot, /lib*)");
    }
    Ok(())
}

/// Most `forwardPorts` a devcontainer.json may list.
pub const MAX_PORTS: usize = 64;

/// `PATH` of a Debian root shell (`${containerEnv:PATH}` before the sandbox runs).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The lifecycle commands openrun runs, in order, with their phase.
pub const LIFECYCLE: [(&str, Phase); 4] = [
    ("onCreateCommand", Phase::Setup),
    ("updateContentCommand", Phase::Setup),
    ("postCreateCommand", Phase::Setup),
    ("postStartCommand", Phase::Start),
];

/// The repository's devcontainer.json, if it has one.
pub fn find(tree: &dyn RepoTree) -> Option<&'static str> {
    FILES.into_iter().find(|f| tree.is_file(f))
}

/// The plan of the devcontainer.json `file` of `tree`, a repository named `name` (the default
/// workspace is `/workspaces/<name>`, `${localWorkspaceFolderBasename}` is `name`).
pub fn plan(tree: &dyn RepoTree, file: &str, name: &str) -> Result<Plan, PlanError> {
    let bytes = tree
        .read(file)?
        .ok_or_else(|| PlanError::invalid(file, "not found (or not a regular file)"))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        PlanError::invalid(
            file,
            format!("not UTF-8 (byte {})", e.utf8_error().valid_up_to()),
        )
    })?;
    let value = jsonc::parse(&text).map_err(|e| PlanError::Invalid {
        file: file.to_string(),
        line: Some(e.line),
        column: Some(e.column),
        message: e.message,
    })?;
    let Value::Object(config) = value else {
        return Err(PlanError::invalid(
            file,
            "expected an object at the top level",
        ));
    };
    Reader::new(tree, file, &text, name).read(&config)
}

/// The state of one reading.
struct Reader<'a> {
    tree: &'a dyn RepoTree,
    file: &'a str,
    text: &'a str,
    name: &'a str,
    /// The folder of the file, relative to the repository (`""` for the root).
    dir: String,
    plan: Plan,
    /// Whether the image is approximated (its users do not exist on the Debian base).
    approximated: bool,
}

/// A JSON type's name, for errors.
fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl<'a> Reader<'a> {
    fn new(tree: &'a dyn RepoTree, file: &'a str, text: &'a str, name: &'a str) -> Self {
        let dir = file.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        Reader {
            tree,
            file,
            text,
            name,
            dir: dir.to_string(),
            plan: Plan {
                config_file: Some(file.to_string()),
                inputs: vec![file.to_string()],
                ..Plan::empty(PlanSource::Devcontainer, &format!("/workspaces/{name}"))
            },
            approximated: false,
        }
    }

    fn invalid(&self, message: impl Into<String>) -> PlanError {
        PlanError::invalid(self.file, message)
    }

    fn note(&mut self, note: String) {
        if !self.plan.notes.contains(&note) {
            self.plan.notes.push(note);
        }
    }

    fn unsupported(&mut self, key: &str, why: &str) {
        self.plan.unsupported.push(format!("{key}: {why}"));
    }

    /// `value` as a string, or an error naming `key`.
    fn string<'v>(&self, key: &str, value: &'v Value) -> Result<&'v str, PlanError> {
        value.as_str().ok_or_else(|| {
            self.invalid(format!(
                "{key}: expected a string, found {}",
                type_name(value)
            ))
        })
    }

    /// `value` as an object, or an error naming `key`.
    fn object<'v>(&self, key: &str, value: &'v Value) -> Result<&'v Map<String, Value>, PlanError> {
        value.as_object().ok_or_else(|| {
            self.invalid(format!(
                "{key}: expected an object, found {}",
                type_name(value)
            ))
        })
    }

    /// `value` as an array of strings, or an error naming `key`.
    fn strings(&self, key: &str, value: &Value) -> Result<Vec<String>, PlanError> {
        let error = || self.invalid(format!("{key}: expected an array of strings"));
        let items = value.as_array().ok_or_else(error)?;
        items
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(error))
            .collect()
    }

    fn read(mut self, config: &Map<String, Value>) -> Result<Plan, PlanError> {
        if config.contains_key("dockerComposeFile") {
            return Err(self.invalid(
                "dockerComposeFile: Docker Compose configurations are not supported (openrun runs one sandbox, there is no compose); use \"image\" or \"build.dockerfile\"",
            ));
        }
        // The workspace first: the other values may refer to it.
        if let Some(value) = config.get("workspaceFolder") {
            let folder = self.string("workspaceFolder", value)?;
            let folder = self.substitute(folder);
            let folder = folder.trim_end_matches('/');
            if let Err(why) = workspace_folder(folder) {
                return Err(self.invalid(format!("workspaceFolder: {why}, found {folder:?}")));
            }
            self.plan.workspace = folder.to_string();
        }
        self.base(config)?;
        if let Some(features) = config.get("features") {
            self.features(features)?;
        }
        if let Some(customizations) = config.get("customizations") {
            self.customizations(customizations)?;
        }
        // The toolchains' environment first: containerEnv overrides it.
        let mut toolchain_env = BTreeMap::new();
        self.toolchains(&mut toolchain_env);
        self.plan.env = toolchain_env;
        if let Some(value) = config.get("containerEnv") {
            for (k, v) in self.env_map("containerEnv", value)? {
                self.plan.env.insert(k, v);
            }
        }
        if let Some(value) = config.get("remoteEnv") {
            self.plan.remote_env = self.env_map("remoteEnv", value)?;
        }
        self.user(config)?;
        if let Some(value) = config.get("forwardPorts") {
            self.ports(value)?;
        }
        if let Some(value) = config.get("hostRequirements") {
            self.host_requirements(value)?;
        }
        for (key, phase) in LIFECYCLE {
            if let Some(value) = config.get(key) {
                self.lifecycle(key, phase, value)?;
            }
        }
        for (key, value) in config {
            if let Some(why) = unsupported_key(key, value) {
                self.unsupported(key, &why);
            }
        }
        let plan = &mut self.plan;
        plan.system_packages.sort();
        plan.system_packages.dedup();
        plan.network.sort();
        plan.network.dedup();
        plan.ports.sort_unstable();
        plan.ports.dedup();
        plan.inputs.sort();
        plan.inputs.dedup();
        Ok(self.plan)
    }

    /// `image`, `build` or the legacy `dockerFile`/`context`.
    fn base(&mut self, config: &Map<String, Value>) -> Result<(), PlanError> {
        let build = match config.get("build") {
            Some(value) => Some(self.object("build", value)?),
            None => None,
        };
        let dockerfile_key = if build.is_some_and(|b| b.contains_key("dockerfile")) {
            Some("build.dockerfile")
        } else if config.contains_key("dockerFile") {
            Some("dockerFile")
        } else {
            None
        };
        if let Some(key) = dockerfile_key {
            let dockerfile = match key {
                "dockerFile" => config.get("dockerFile"),
                _ => build.and_then(|b| b.get("dockerfile")),
            };
            let dockerfile = self.string(key, dockerfile.unwrap_or(&Value::Null))?;
            let dockerfile = self.substitute(dockerfile);
            let dockerfile = self.repo_path(key, &dockerfile)?;
            if !self.tree.is_file(&dockerfile) {
                return Err(self.invalid(format!(
                    "{key}: {dockerfile} is not a file of the repository"
                )));
            }
            let context = match (build.and_then(|b| b.get("context")), config.get("context")) {
                (Some(value), _) => Some(("build.context", value)),
                (None, Some(value)) => Some(("context", value)),
                (None, None) => None,
            };
            let context = match context {
                Some((key, value)) => {
                    let context = self.string(key, value)?;
                    let context = self.substitute(context);
                    let context = self.repo_path(key, &context)?;
                    if !context.is_empty() && !self.tree.is_dir(&context) {
                        return Err(self.invalid(format!(
                            "{key}: {context} is not a directory of the repository"
                        )));
                    }
                    context
                }
                None => self.dir.clone(),
            };
            let mut args = BTreeMap::new();
            if let Some(value) = build.and_then(|b| b.get("args")) {
                for (k, v) in self.object("build.args", value)? {
                    let v = self.string(&format!("build.args.{k}"), v)?;
                    args.insert(k.clone(), self.substitute(v));
                }
            }
            self.plan.inputs.push(dockerfile.clone());
            self.plan.base = BaseImage::Dockerfile {
                dockerfile,
                context: if context.is_empty() {
                    ".".into()
                } else {
                    context
                },
                args,
            };
            if config.contains_key("image") {
                self.unsupported("image", &format!("not used: {key} is built instead"));
            }
        } else if let Some(value) = config.get("image") {
            let image = self.string("image", value)?;
            let image = self.substitute(image);
            self.image(&image);
            if build.is_some() {
                self.unsupported(
                    "build",
                    "not used without build.dockerfile (the image is used)",
                );
            }
            if config.contains_key("context") {
                self.unsupported("context", "not used without dockerFile (the image is used)");
            }
        } else {
            return Err(self.invalid(
                "expected \"image\", \"build.dockerfile\" (or \"dockerFile\"); found neither",
            ));
        }
        if let Some(build) = build {
            for key in build.keys() {
                if !matches!(key.as_str(), "dockerfile" | "context" | "args") {
                    let why = match key.as_str() {
                        "target" => {
                            "build targets are not supported: the whole Dockerfile is built"
                        }
                        "cacheFrom" => "no registry cache: images build from the Dockerfile",
                        "options" => "docker build options do not apply",
                        _ => "unknown key, not used",
                    };
                    self.unsupported(&format!("build.{key}"), why);
                }
            }
        }
        Ok(())
    }

    /// A path of the file (relative to its folder) as a path of the repository; an error if it
    /// is absolute or leaves the repository.
    fn repo_path(&self, key: &str, path: &str) -> Result<String, PlanError> {
        let leaves = || self.invalid(format!("{key}: {path} is outside the repository"));
        if path.starts_with('/') {
            return Err(leaves());
        }
        let mut parts: Vec<&str> = self.dir.split('/').filter(|p| !p.is_empty()).collect();
        for part in path.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    parts.pop().ok_or_else(leaves)?;
                }
                _ => parts.push(part),
            }
        }
        Ok(parts.join("/"))
    }

    /// Maps an image to a base (and toolchains).
    fn image(&mut self, image: &str) {
        match map_image(image) {
            Mapped::Debian {
                suite,
                packages,
                note,
            } => {
                self.plan.base = BaseImage::Debian { suite };
                self.plan
                    .system_packages
                    .extend(packages.iter().map(|p| p.to_string()));
                if let Some(note) = note {
                    self.note(note);
                }
            }
            Mapped::Approximated { languages, extra } => {
                self.approximated = true;
                self.plan.base = BaseImage::Debian {
                    suite: SUITE.into(),
                };
                let mut with = Vec::new();
                for language in &languages {
                    self.add_language(language);
                    with.push(format!("{language} ({})", debian_version(language)));
                }
                let with = if with.is_empty() {
                    "nothing more".to_string()
                } else {
                    format!("Debian's toolchain for {}", with.join(", "))
                };
                self.note(format!(
                    "image {image} is approximated by Debian {SUITE} with {with}{extra}"
                ));
            }
            Mapped::Image => {
                self.plan.base = BaseImage::Image {
                    name: image.to_string(),
                }
            }
        }
    }

    fn add_language(&mut self, language: &str) {
        let language = canonical_language(language);
        if !self.plan.languages.iter().any(|l| l == &language) {
            self.plan.languages.push(language);
        }
    }

    /// Packages, network and environment of the plan's languages' toolchains.
    /// Only on a Debian base: an image or a Dockerfile is expected to bring its languages
    /// (`languages` only records them).
    fn toolchains(&mut self, env: &mut BTreeMap<String, String>) {
        if !matches!(self.plan.base, BaseImage::Debian { .. }) {
            return;
        }
        for language in self.plan.languages.clone() {
            match toolchain(&language) {
                Some(tc) => {
                    self.plan.system_packages.extend(tc.packages);
                    self.plan.network.extend(tc.network);
                    env.extend(tc.env);
                }
                None => self.note(format!("no Debian toolchain is known for {language}")),
            }
        }
    }

    /// `features`: on a Debian base, well-known language Features become toolchains; the
    /// others are listed.
    fn features(&mut self, value: &Value) -> Result<(), PlanError> {
        let features = self.object("features", value)?;
        let mut skipped = Vec::new();
        let debian = matches!(self.plan.base, BaseImage::Debian { .. });
        for id in features.keys() {
            match feature_language(id).filter(|_| debian) {
                Some(language) => {
                    self.add_language(language);
                    self.note(format!(
                        "feature {id} is approximated by Debian's toolchain for {language} ({})",
                        debian_version(language)
                    ));
                }
                None => skipped.push(id.as_str()),
            }
        }
        if !skipped.is_empty() {
            self.unsupported(
                "features",
                &format!(
                    "not installed: {} (Features are not supported; list the Debian packages they provide in customizations.openrun.packages)",
                    skipped.join(", ")
                ),
            );
        }
        Ok(())
    }

    fn customizations(&mut self, value: &Value) -> Result<(), PlanError> {
        let customizations = self.object("customizations", value)?;
        for (tool, value) in customizations {
            match tool.as_str() {
                "openrun" => self.openrun(value)?,
                "vscode" | "codespaces" | "jetbrains" => self.unsupported(
                    &format!("customizations.{tool}"),
                    "editor settings, not used",
                ),
                _ => self.unsupported(
                    &format!("customizations.{tool}"),
                    "settings of another tool, not used",
                ),
            }
        }
        Ok(())
    }

    /// `customizations.openrun`: our own block.
    fn openrun(&mut self, value: &Value) -> Result<(), PlanError> {
        const KEY: &str = "customizations.openrun";
        let block = self.object(KEY, value)?;
        for (key, value) in block {
            let path = format!("{KEY}.{key}");
            match key.as_str() {
                "packages" => {
                    for package in self.strings(&path, value)? {
                        if !is_package_name(&package) {
                            return Err(self.invalid(format!(
                                "{path}: {package:?} is not a Debian package name"
                            )));
                        }
                        self.plan.system_packages.push(package);
                    }
                }
                "network" => {
                    for host in self.strings(&path, value)? {
                        if !is_host(&host) {
                            return Err(self.invalid(format!(
                                "{path}: {host:?} is not a host name or address"
                            )));
                        }
                        self.plan.network.push(host);
                    }
                }
                "languages" => {
                    for language in self.strings(&path, value)? {
                        let known = ["rust", "python", "node", "go", "java", "ruby", "c++"];
                        if !known.contains(&canonical_language(&language).as_str()) {
                            return Err(self.invalid(format!(
                                "{path}: unknown language {language:?} (known: rust, python, node, go, java, ruby, c++)"
                            )));
                        }
                        self.add_language(&language);
                    }
                }
                "test" => self.plan.test = self.command(&path, value)?,
                "start" => self.plan.start = self.command(&path, value)?,
                _ => self.unsupported(&path, "unknown key, not used"),
            }
        }
        Ok(())
    }

    /// An object of strings (`containerEnv`, `remoteEnv`), substituted. `null` values
    /// (remoteEnv's "unset") are skipped.
    fn env_map(&mut self, key: &str, value: &Value) -> Result<BTreeMap<String, String>, PlanError> {
        let mut out = BTreeMap::new();
        for (name, v) in self.object(key, value)? {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(self.invalid(format!("{key}: {name:?} is not a variable name")));
            }
            if v.is_null() {
                continue;
            }
            let v = self.string(&format!("{key}.{name}"), v)?;
            let v = self.substitute(v);
            out.insert(name.clone(), v);
        }
        Ok(out)
    }

    /// `remoteUser` over `containerUser`.
    fn user(&mut self, config: &Map<String, Value>) -> Result<(), PlanError> {
        let mut user = None;
        for key in ["containerUser", "remoteUser"] {
            if let Some(value) = config.get(key) {
                let name = self.string(key, value)?;
                let name = self.substitute(name);
                if let Some((previous, _)) = &user {
                    if previous != &name {
                        self.note(format!(
                            "containerUser {previous}: processes run as remoteUser {name}"
                        ));
                    }
                }
                user = Some((name, key));
            }
        }
        let Some((user, key)) = user else {
            return Ok(());
        };
        if user.is_empty() || user.contains(['/', ':', '\0', ' ']) {
            return Err(self.invalid(format!("{key}: {user:?} is not a user name")));
        }
        if self.approximated && user != "root" && user != "0" {
            self.note(format!(
                "{key} {user} is a user of the approximated image, not of Debian: steps and shells run as root"
            ));
        } else {
            self.plan.user = Some(user);
        }
        Ok(())
    }

    fn ports(&mut self, value: &Value) -> Result<(), PlanError> {
        let items = value
            .as_array()
            .ok_or_else(|| self.invalid("forwardPorts: expected an array of ports"))?;
        if items.len() > MAX_PORTS {
            return Err(self.invalid(format!(
                "forwardPorts: {} ports, at most {MAX_PORTS}",
                items.len()
            )));
        }
        for (i, item) in items.iter().enumerate() {
            let port = match item {
                Value::Number(n) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
                Value::String(s) => {
                    let port = s.rsplit_once(':').map(|(host, port)| (Some(host), port));
                    let (host, port) = port.unwrap_or((None, s));
                    let host_ok = host.is_none_or(|h| !h.is_empty() && is_host(h));
                    if host_ok && !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
                        port.parse::<u16>().ok()
                    } else {
                        None
                    }
                }
                _ => None,
            };
            match port {
                Some(port) if port > 0 => self.plan.ports.push(port),
                _ => {
                    return Err(self.invalid(format!(
                    "forwardPorts[{i}]: expected a port (1-65535) or \"host:port\", found {item}"
                )))
                }
            }
        }
        Ok(())
    }

    fn host_requirements(&mut self, value: &Value) -> Result<(), PlanError> {
        const KEY: &str = "hostRequirements";
        for (key, value) in self.object(KEY, value)? {
            let path = format!("{KEY}.{key}");
            match key.as_str() {
                "cpus" => match value.as_u64() {
                    Some(n) if n > 0 => self.plan.resources.cpus = Some(n.to_string()),
                    _ => {
                        return Err(self.invalid(format!(
                            "{path}: expected a whole number of CPUs, found {value}"
                        )))
                    }
                },
                "memory" | "storage" => {
                    let text = self.string(&path, value)?;
                    let size = size(text).ok_or_else(|| {
                        self.invalid(format!(
                            "{path}: expected a size like \"4gb\" (tb, gb, mb or kb), found {text:?}"
                        ))
                    })?;
                    if key == "memory" {
                        self.plan.resources.memory = Some(size);
                    } else {
                        self.plan.resources.disk = Some(size);
                    }
                }
                "gpu" | "gpus" => self.unsupported(&path, "sandboxes have no GPU"),
                _ => self.unsupported(&path, "unknown key, not used"),
            }
        }
        Ok(())
    }

    /// A command in its string or array form; `None` when empty.
    fn command(&mut self, key: &str, value: &Value) -> Result<Option<Command>, PlanError> {
        let file = self.file;
        let error = || {
            PlanError::invalid(
                file,
                format!("{key}: expected a string or an array of strings"),
            )
        };
        match value {
            Value::String(line) if line.trim().is_empty() => Ok(None),
            Value::String(line) => Ok(Some(Command::Shell(self.substitute(line)))),
            Value::Array(items) => {
                let mut argv = Vec::new();
                for item in items {
                    let word = item.as_str().ok_or_else(error)?;
                    argv.push(self.substitute(word));
                }
                Ok((!argv.is_empty()).then_some(Command::Exec(argv)))
            }
            _ => Err(error()),
        }
    }

    /// A lifecycle command: one step, or one per key of its object form (in the file's order).
    fn lifecycle(&mut self, key: &str, phase: Phase, value: &Value) -> Result<(), PlanError> {
        match value {
            Value::Null => {}
            Value::Object(entries) => {
                let mut order = jsonc::keys_in_order(self.text, &[key]);
                order.retain(|k| entries.contains_key(k));
                for k in entries.keys() {
                    if !order.contains(k) {
                        order.push(k.clone());
                    }
                }
                for sub in order {
                    let Some(value) = entries.get(&sub) else {
                        continue;
                    };
                    if let Some(command) = self.command(&format!("{key}.{sub}"), value)? {
                        self.push_step(format!("{key}:{sub}"), phase, command);
                    }
                }
            }
            Value::String(_) | Value::Array(_) => {
                if let Some(command) = self.command(key, value)? {
                    self.push_step(key.to_string(), phase, command);
                }
            }
            _ => {
                return Err(self.invalid(format!(
                    "{key}: expected a string, an array of strings or an object"
                )))
            }
        }
        Ok(())
    }

    fn push_step(&mut self, name: String, phase: Phase, command: Command) {
        self.plan.steps.push(Step {
            name,
            phase,
            commands: vec![command],
            file: self.file.to_string(),
        });
    }

    /// `text` with the specification's `${...}` variables replaced; unknown ones are kept.
    fn substitute(&mut self, text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                rest = &rest[start..];
                break;
            };
            match self.variable(&after[..end]) {
                Some(value) => out.push_str(&value),
                None => out.push_str(&rest[start..start + end + 3]),
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        out
    }

    fn variable(&mut self, variable: &str) -> Option<String> {
        let workspace = self.plan.workspace.clone();
        let basename = |path: &str| path.rsplit('/').next().unwrap_or("").to_string();
        let (kind, args) = variable.split_once(':').unwrap_or((variable, ""));
        let (name, default) = args.split_once(':').unwrap_or((args, ""));
        match kind {
            "localWorkspaceFolderBasename" => Some(self.name.to_string()),
            "containerWorkspaceFolder" => Some(workspace),
            "containerWorkspaceFolderBasename" => Some(basename(&workspace)),
            "localWorkspaceFolder" => {
                self.note(format!(
                    "${{localWorkspaceFolder}} is taken as the workspace {workspace}: the repository is copied there"
                ));
                Some(workspace)
            }
            "localEnv" | "env" if !name.is_empty() => {
                self.note(format!(
                    "${{{variable}}} is taken as {default:?}: the environment of the machine running openrun up is not passed"
                ));
                Some(default.to_string())
            }
            "containerEnv" if !name.is_empty() => {
                if let Some(value) = self.plan.env.get(name) {
                    return Some(value.clone());
                }
                if name == "PATH" {
                    return Some(DEFAULT_PATH.to_string());
                }
                self.note(format!(
                    "${{{variable}}} is taken as {default:?}: the image does not set it as far as openrun knows"
                ));
                Some(default.to_string())
            }
            _ => None,
        }
    }
}

/// Why a top-level key is not carried out (`None` for the ones that are, or that need no
/// action).
fn unsupported_key(key: &str, value: &Value) -> Option<String> {
    let why = match key {
        "name" | "$schema" | "image" | "build" | "dockerFile" | "context" | "workspaceFolder"
        | "containerEnv" | "remoteEnv" | "remoteUser" | "containerUser" | "forwardPorts"
        | "hostRequirements" | "onCreateCommand" | "updateContentCommand"
        | "postCreateCommand" | "postStartCommand" | "customizations" | "features" => {
            return None
        }
        "initializeCommand" => {
            "runs on the host machine before the container is created: openrun never runs a repository's commands outside its sandbox"
        }
        "postAttachCommand" => "runs when an editor attaches; openrun has no attach (run it in openrun shell)",
        "mounts" | "workspaceMount" => "no bind mounts or volumes: the repository is copied into the workspace",
        "runArgs" => "docker run arguments do not apply to sandboxes",
        "privileged" | "capAdd" | "securityOpt" | "init" => {
            "sandboxes take no extra privileges, capabilities or init"
        }
        "appPort" => "published ports do not apply; list the ports in forwardPorts",
        "portsAttributes" | "otherPortsAttributes" => "port display settings, not used",
        "shutdownAction" => "sandboxes stop by their ttl or openrun rm",
        "overrideCommand" => "sandboxes run no image command",
        "waitFor" => "openrun waits for every set-up step",
        "userEnvProbe" => "no shell environment probing: the environment is containerEnv and remoteEnv",
        "updateRemoteUserUID" => "no bind mounts, so no user id mapping",
        "service" | "runServices" | "dockerComposeFile" => "Docker Compose is not supported",
        "overrideFeatureInstallOrder" => "Features are not installed",
        "extensions" | "settings" | "devPort" => "editor settings, not used",
        _ if value.is_null() => return None,
        _ => "unknown key, not used",
    };
    Some(why.to_string())
}

/// What an image maps to.
#[derive(Debug, PartialEq, Eq)]
enum Mapped {
    /// A Debian suite as it is (plus the packages of a `buildpack-deps` variant).
    Debian {
        suite: String,
        packages: &'static [&'static str],
        note: Option<String>,
    },
    /// Debian bookworm with languages' toolchains (`extra`: more for the note).
    Approximated {
        languages: Vec<&'static str>,
        extra: String,
    },
    /// An image of the server's store.
    Image,
}

/// Debian's suites by name and major version.
const SUITES: [(&str, &str); 6] = [
    ("buster", "10"),
    ("bullseye", "11"),
    ("bookworm", "12"),
    ("trixie", "13"),
    ("forky", "14"),
    ("sid", "unstable"),
];

/// The suite a Docker Hub `debian` tag names (`12`, `bookworm-slim`, `12.5`,
/// `bookworm-20240101`).
fn suite_of(tag: &str) -> Option<&'static str> {
    let head = tag.split('-').next().unwrap_or("");
    let major = head.split('.').next().unwrap_or("");
    SUITES
        .iter()
        .find(|(name, number)| *name == head || *number == major || (*number == head))
        .map(|(name, _)| *name)
}

/// `image` split into (repository path without Docker Hub's registry and `library/`, tag).
fn split_image(image: &str) -> (String, String) {
    let image = image.split('@').next().unwrap_or(image);
    let (path, tag) = match image.rsplit_once(':') {
        Some((path, tag)) if !tag.contains('/') => (path, tag),
        _ => (image, ""),
    };
    let mut path = path.to_ascii_lowercase();
    for prefix in ["docker.io/", "index.docker.io/", "registry-1.docker.io/"] {
        if let Some(rest) = path.strip_prefix(prefix) {
            path = rest.to_string();
        }
    }
    if let Some(rest) = path.strip_prefix("library/") {
        path = rest.to_string();
    }
    (path, tag.to_ascii_lowercase())
}

fn map_image(image: &str) -> Mapped {
    let (path, tag) = split_image(image);
    let approximated = |languages: &[&'static str]| Mapped::Approximated {
        languages: languages.to_vec(),
        extra: String::new(),
    };
    if let Some(family) = path
        .strip_prefix("mcr.microsoft.com/devcontainers/")
        .or_else(|| path.strip_prefix("mcr.microsoft.com/vscode/devcontainers/"))
    {
        return match family {
            "base" => approximated(&[]),
            "python" | "anaconda" | "miniconda" => approximated(&["python"]),
            "javascript-node" | "typescript-node" => approximated(&["node"]),
            "rust" => approximated(&["rust"]),
            "go" => approximated(&["go"]),
            "java" => approximated(&["java"]),
            "ruby" | "jekyll" => approximated(&["ruby"]),
            "cpp" => approximated(&["c++"]),
            "universal" => Mapped::Approximated {
                languages: vec!["python", "node", "c++"],
                extra: " (universal's other languages are not installed: add them to customizations.openrun.languages)".into(),
            },
            _ => Mapped::Image,
        };
    }
    let language: Option<&'static str> = match path.as_str() {
        "python" | "pypy" => Some("python"),
        "node" => Some("node"),
        "rust" => Some("rust"),
        "golang" => Some("go"),
        "ruby" => Some("ruby"),
        "eclipse-temurin" | "openjdk" | "maven" | "gradle" | "amazoncorretto" => Some("java"),
        "gcc" => Some("c++"),
        _ => None,
    };
    if let Some(language) = language {
        return approximated(&[language]);
    }
    match path.as_str() {
        "debian" => match suite_of(&tag) {
            Some(suite) => Mapped::Debian {
                suite: suite.into(),
                packages: &[],
                note: None,
            },
            None if tag.is_empty() || tag == "latest" || tag.starts_with("stable") => {
                Mapped::Debian {
                    suite: SUITE.into(),
                    packages: &[],
                    note: Some(format!("image {image} is taken as debian:{SUITE}")),
                }
            }
            None => Mapped::Image,
        },
        "buildpack-deps" => {
            let packages: &'static [&'static str] = if tag.ends_with("-curl") {
                &["ca-certificates", "curl", "gnupg", "netbase", "wget"]
            } else if tag.ends_with("-scm") {
                &[
                    "ca-certificates",
                    "curl",
                    "git",
                    "gnupg",
                    "netbase",
                    "openssh-client",
                    "wget",
                ]
            } else {
                &[
                    "autoconf",
                    "automake",
                    "build-essential",
                    "ca-certificates",
                    "curl",
                    "git",
                    "gnupg",
                    "libtool",
                    "netbase",
                    "openssh-client",
                    "pkg-config",
                    "wget",
                ]
            };
            match suite_of(&tag) {
                Some(suite) => Mapped::Debian {
                    suite: suite.into(),
                    packages,
                    note: Some(format!(
                        "image {image} is approximated by debian:{suite} with its main build tools (not every -dev library)"
                    )),
                },
                None => Mapped::Debian {
                    suite: SUITE.into(),
                    packages,
                    note: Some(format!(
                        "image {image} is approximated by debian:{SUITE} with its main build tools (not every -dev library)"
                    )),
                },
            }
        }
        "ubuntu" => approximated(&[]),
        _ => Mapped::Image,
    }
}

/// The version of `language` Debian bookworm has, for notes.
fn debian_version(language: &str) -> &'static str {
    match language {
        "python" => "Python 3.11",
        "node" => "Node.js 18",
        "rust" => "Rust 1.85",
        "go" => "Go 1.19",
        "java" => "Java 17, Maven 3.8",
        "ruby" => "Ruby 3.1",
        "c++" => "GCC 12, CMake 3.25",
        _ => "Debian's version",
    }
}

/// The language of a well-known Feature id (`ghcr.io/devcontainers/features/node:1`).
fn feature_language(id: &str) -> Option<&'static str> {
    let name = id.rsplit('/').next().unwrap_or(id);
    let name = name.split([':', '@']).next().unwrap_or(name);
    if !id.starts_with("ghcr.io/devcontainers/features/") && id.contains('/') {
        return None;
    }
    match name {
        "python" => Some("python"),
        "node" => Some("node"),
        "rust" => Some("rust"),
        "go" => Some("go"),
        "java" => Some("java"),
        "ruby" => Some("ruby"),
        _ => None,
    }
}

/// The plan's name for a language or one of its aliases.
fn canonical_language(language: &str) -> String {
    let lower = language.to_ascii_lowercase();
    match lower.as_str() {
        "python3" => "python",
        "nodejs" | "javascript" | "typescript" => "node",
        "golang" => "go",
        "kotlin" => "java",
        "cpp" | "c" => "c++",
        other => other,
    }
    .to_string()
}

/// Whether `name` is a Debian package name (`[a-z0-9][a-z0-9+.-]+`, optionally `:arch`
/// and `=version`): nothing a shell or apt would read as an option.
fn is_package_name(name: &str) -> bool {
    let (name, version) = name.split_once('=').unwrap_or((name, ""));
    let (name, arch) = name.split_once(':').unwrap_or((name, ""));
    let mut bytes = name.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    first_ok
        && name.len() >= 2
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+.-".contains(&b))
        && arch
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".+~:-".contains(&b))
}

/// Whether `host` looks like a host name, an address or a `*.` wildcard of one.
fn is_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && !host.starts_with('-')
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-*:_[]/".contains(&b))
}

/// `hostRequirements`' size (`4gb`, `512mb`, `1.5 GB`) as a limit (`4G`, `512M`, `1536M`).
fn size(text: &str) -> Option<String> {
    let lower = text.trim().to_ascii_lowercase();
    let units = [("tb", 'T'), ("gb", 'G'), ("mb", 'M'), ("kb", 'K')];
    let (index, number) = units
        .iter()
        .enumerate()
        .find_map(|(i, (suffix, _))| lower.strip_suffix(suffix).map(|n| (i, n.trim())))?;
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    if !(value > 0.0 && value.is_finite()) {
        return None;
    }
    // A fraction goes down to the next unit (1.5gb is 1536M); kilobytes round up.
    let mut index = index;
    let mut value = value;
    while value.fract() != 0.0 && index + 1 < units.len() {
        value *= 1024.0;
        index += 1;
    }
    let value = value.ceil();
    if value > 1e15 {
        return None;
    }
    Some(format!("{}{}", value as u64, units[index].1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::MemTree;

    const FILE: &str = ".devcontainer/devcontainer.json";

    fn plan_of(json: &str) -> Result<Plan, PlanError> {
        let tree = MemTree::new(&[(FILE, json), (".devcontainer/Dockerfile", "FROM x")]);
        plan(&tree, FILE, "app")
    }

    fn message(result: Result<Plan, PlanError>) -> String {
        match result {
            Err(e @ PlanError::Invalid { .. }) => {
                assert_eq!(e.file(), Some(FILE));
                e.to_string()
            }
            other => panic!("expected an invalid file, got {other:?}"),
        }
    }

    #[test]
    fn finds_the_file_in_order() {
        let both = MemTree::new(&[(FILE, "{}"), (".devcontainer.json", "{}")]);
        assert_eq!(find(&both), Some(FILE));
        let root = MemTree::new(&[(".devcontainer.json", "{}")]);
        assert_eq!(find(&root), Some(".devcontainer.json"));
        assert_eq!(find(&MemTree::new(&[("x", "")])), None);
    }

    #[test]
    fn a_full_file() {
        let plan = plan_of(
            r#"{
            // comments and trailing commas are allowed
            "name": "demo",
            "image": "debian:bookworm-slim",
            "containerEnv": {"A": "1", "WS": "${containerWorkspaceFolder}/x",},
            "remoteEnv": {"PATH": "${containerEnv:PATH}:/opt/bin", "B": "${containerEnv:A}", "C": null},
            "containerUser": "root",
            "remoteUser": "dev",
            "forwardPorts": [8080, "db:5432", 3000, 8080],
            "hostRequirements": {"cpus": 2, "memory": "4gb", "storage": "32GB", "gpu": true},
            "onCreateCommand": "apt-get update",
            "updateContentCommand": ["make", "deps"],
            "postCreateCommand": {"web": "npm ci", "db": ["./db.sh", "init"]},
            "postStartCommand": "./serve &",
            "postAttachCommand": "echo hi",
            "initializeCommand": "touch /tmp/x",
            "mounts": ["source=/,target=/host,type=bind"],
            "customizations": {
                "vscode": {"extensions": ["x"]},
                "openrun": {"packages": ["curl", "git"], "test": "make test", "start": ["./serve"], "network": ["example.com"]}
            },
        }"#,
        )
        .unwrap();
        assert_eq!(plan.source, PlanSource::Devcontainer);
        assert_eq!(plan.config_file.as_deref(), Some(FILE));
        assert_eq!(
            plan.base,
            BaseImage::Debian {
                suite: "bookworm".into()
            }
        );
        assert_eq!(plan.workspace, "/workspaces/app");
        assert_eq!(plan.env["A"], "1");
        assert_eq!(plan.env["WS"], "/workspaces/app/x");
        assert_eq!(plan.remote_env["PATH"], format!("{DEFAULT_PATH}:/opt/bin"));
        assert_eq!(plan.remote_env["B"], "1");
        assert!(!plan.remote_env.contains_key("C"));
        assert_eq!(plan.user.as_deref(), Some("dev"));
        assert_eq!(plan.ports, [3000, 5432, 8080]);
        assert_eq!(plan.resources.cpus.as_deref(), Some("2"));
        assert_eq!(plan.resources.memory.as_deref(), Some("4G"));
        assert_eq!(plan.resources.disk.as_deref(), Some("32G"));
        let steps: Vec<(&str, Phase, String)> = plan
            .steps
            .iter()
            .map(|s| (s.name.as_str(), s.phase, s.commands[0].to_string()))
            .collect();
        assert_eq!(
            steps,
            [
                (
                    "onCreateCommand",
                    Phase::Setup,
                    "apt-get update".to_string()
                ),
                ("updateContentCommand", Phase::Setup, "make deps".into()),
                ("postCreateCommand:web", Phase::Setup, "npm ci".into()),
                ("postCreateCommand:db", Phase::Setup, "./db.sh init".into()),
                ("postStartCommand", Phase::Start, "./serve &".into()),
            ]
        );
        assert!(plan.steps.iter().all(|s| s.file == FILE));
        assert_eq!(
            plan.steps[1].commands[0],
            Command::Exec(vec!["make".into(), "deps".into()])
        );
        assert_eq!(plan.test, Some(Command::Shell("make test".into())));
        assert_eq!(plan.start, Some(Command::Exec(vec!["./serve".into()])));
        assert_eq!(plan.system_packages, ["curl", "git"]);
        assert_eq!(plan.network, ["example.com"]);
        assert_eq!(plan.inputs, [FILE]);
        let unsupported = plan.unsupported.join("\n");
        for key in [
            "postAttachCommand:",
            "initializeCommand: runs on the host",
            "mounts:",
            "hostRequirements.gpu:",
            "customizations.vscode: editor settings, not used",
        ] {
            assert!(unsupported.contains(key), "{key} missing in {unsupported}");
        }
        assert!(!unsupported.contains("name:"));
    }

    #[test]
    fn variables() {
        let plan = plan_of(
            r#"{"image": "debian:12", "workspaceFolder": "/src/${localWorkspaceFolderBasename}/",
                "containerEnv": {"H": "${localEnv:HOME}", "D": "${localEnv:NOPE:fallback}", "K": "${devcontainerId}", "U": "${unclosed"},
                "postCreateCommand": "echo ${containerWorkspaceFolderBasename} ${localWorkspaceFolder} $HOME ${HOME}"}"#,
        )
        .unwrap();
        assert_eq!(plan.workspace, "/src/app");
        assert_eq!(plan.env["H"], "");
        assert_eq!(plan.env["D"], "fallback");
        assert_eq!(plan.env["K"], "${devcontainerId}");
        assert_eq!(plan.env["U"], "${unclosed");
        assert_eq!(
            plan.steps[0].commands[0],
            Command::Shell("echo app /src/app $HOME ${HOME}".into())
        );
        assert!(
            plan.notes.iter().any(|n| n.contains("localEnv:HOME")),
            "{:?}",
            plan.notes
        );
    }

    #[test]
    fn dockerfile_paths_are_relative_to_the_file() {
        let tree = MemTree::new(&[
            (
                FILE,
                r#"{"build": {"dockerfile": "Dockerfile", "context": "..", "args": {"V": "${localWorkspaceFolderBasename}"}, "target": "dev"}}"#,
            ),
            (".devcontainer/Dockerfile", "FROM debian"),
        ]);
        let plan = plan(&tree, FILE, "app").unwrap();
        assert_eq!(
            plan.base,
            BaseImage::Dockerfile {
                dockerfile: ".devcontainer/Dockerfile".into(),
                context: ".".into(),
                args: BTreeMap::from([("V".to_string(), "app".to_string())]),
            }
        );
        assert_eq!(plan.inputs, [".devcontainer/Dockerfile", FILE]);
        assert!(plan
            .unsupported
            .iter()
            .any(|u| u.starts_with("build.target:")));

        // The legacy keys; the context defaults to the file's folder.
        let plan = plan_of(r#"{"dockerFile": "Dockerfile"}"#).unwrap();
        assert!(
            matches!(plan.base, BaseImage::Dockerfile { ref context, .. } if context == ".devcontainer")
        );

        for (json, expected) in [
            (
                r#"{"build": {"dockerfile": "../../Dockerfile"}}"#,
                "build.dockerfile: ../../Dockerfile is outside the repository",
            ),
            (
                r#"{"build": {"dockerfile": "/etc/Dockerfile"}}"#,
                "outside the repository",
            ),
            (
                r#"{"build": {"dockerfile": "Dockerfile", "context": "../.."}}"#,
                "build.context: ../.. is outside",
            ),
            (
                r#"{"build": {"dockerfile": "missing"}}"#,
                "build.dockerfile: .devcontainer/missing is not a file",
            ),
            (r#"{"dockerFile": 3}"#, "dockerFile: expected a string"),
        ] {
            let m = message(plan_of(json));
            assert!(m.contains(expected), "{json}: {m}");
        }
    }

    #[test]
    fn images() {
        let base = |image: &str| plan_of(&format!(r#"{{"image": "{image}"}}"#)).unwrap();
        for (image, suite) in [
            ("debian:12", "bookworm"),
            ("debian:bullseye-slim", "bullseye"),
            ("docker.io/library/debian:13.1", "trixie"),
            ("debian", "bookworm"),
            ("buildpack-deps:bookworm-scm", "bookworm"),
        ] {
            assert_eq!(
                base(image).base,
                BaseImage::Debian {
                    suite: suite.into()
                },
                "{image}"
            );
        }
        assert!(base("buildpack-deps:bookworm")
            .system_packages
            .contains(&"build-essential".to_string()));

        for (image, languages) in [
            (
                "mcr.microsoft.com/devcontainers/python:3.11",
                &["python"][..],
            ),
            (
                "mcr.microsoft.com/vscode/devcontainers/javascript-node:20-bookworm",
                &["node"],
            ),
            ("mcr.microsoft.com/devcontainers/rust:1", &["rust"]),
            ("mcr.microsoft.com/devcontainers/base:bookworm", &[]),
            ("python:3.11-slim", &["python"]),
            ("node:20", &["node"]),
            ("rust:1", &["rust"]),
            ("golang:1.21", &["go"]),
            ("ruby:3", &["ruby"]),
            ("eclipse-temurin:17", &["java"]),
            ("maven:3-eclipse-temurin-17", &["java"]),
            ("gcc:13", &["c++"]),
        ] {
            let plan = base(image);
            assert_eq!(
                plan.base,
                BaseImage::Debian {
                    suite: "bookworm".into()
                },
                "{image}"
            );
            assert_eq!(plan.languages, languages, "{image}");
            assert!(
                plan.notes
                    .iter()
                    .any(|n| n
                        .contains(&format!("image {image} is approximated by Debian bookworm"))),
                "{image}: {:?}",
                plan.notes
            );
            for language in languages {
                if let Some(tc) = toolchain(language) {
                    for package in tc.packages {
                        assert!(
                            plan.system_packages.contains(&package),
                            "{image}: {package}"
                        );
                    }
                    for host in tc.network {
                        assert!(plan.network.contains(&host), "{image}: {host}");
                    }
                    for (k, v) in tc.env {
                        assert_eq!(plan.env.get(&k), Some(&v), "{image}");
                    }
                }
            }
        }
        for image in [
            "ghcr.io/acme/dev:1",
            "mcr.microsoft.com/devcontainers/dotnet:8",
            "debian:experimental",
            "alpine:3",
        ] {
            assert_eq!(
                base(image).base,
                BaseImage::Image { name: image.into() },
                "{image}"
            );
        }
        // An approximated image's own user does not exist on Debian.
        let plan = plan_of(
            r#"{"image": "mcr.microsoft.com/devcontainers/python:3", "remoteUser": "vscode"}"#,
        )
        .unwrap();
        assert_eq!(plan.user, None);
        assert!(plan.notes.iter().any(|n| n.contains("remoteUser vscode")));
    }

    #[test]
    fn features_and_languages() {
        let plan = plan_of(
            r#"{"image": "debian:bookworm",
                "features": {"ghcr.io/devcontainers/features/node:1": {"version": "20"}, "ghcr.io/devcontainers/features/docker-in-docker:2": {}},
                "customizations": {"openrun": {"languages": ["golang"], "future": 1}, "jetbrains": {}}}"#,
        )
        .unwrap();
        assert_eq!(plan.languages, ["node", "go"]);
        let unsupported = plan.unsupported.join("\n");
        assert!(
            unsupported.contains(
                "features: not installed: ghcr.io/devcontainers/features/docker-in-docker:2"
            ),
            "{unsupported}"
        );
        assert!(unsupported.contains("customizations.openrun.future: unknown key"));
        assert!(unsupported.contains("customizations.jetbrains: editor settings"));
        assert!(!unsupported.contains("node:1"));
    }

    #[test]
    fn languages_on_an_image_are_only_recorded() {
        let plan = plan_of(
            r#"{"build": {"dockerfile": "Dockerfile"}, "features": {"ghcr.io/devcontainers/features/node:1": {}},
                "customizations": {"openrun": {"languages": ["rust"]}}}"#,
        )
        .unwrap();
        assert_eq!(plan.languages, ["rust"]);
        assert!(plan.system_packages.is_empty() && plan.network.is_empty() && plan.env.is_empty());
        assert!(plan
            .unsupported
            .iter()
            .any(|u| u.contains("features/node:1")));
    }

    #[test]
    fn object_commands_keep_the_file_order() {
        let plan = plan_of(
            r#"{"image": "debian:12", "postStartCommand": {"z": "a", "b": ["b"], "m": ""}}"#,
        )
        .unwrap();
        let names: Vec<&str> = plan.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["postStartCommand:z", "postStartCommand:b"]);
        assert!(plan.steps.iter().all(|s| s.phase == Phase::Start));
    }

    #[test]
    fn sizes() {
        assert_eq!(size("4gb").as_deref(), Some("4G"));
        assert_eq!(size("32GB").as_deref(), Some("32G"));
        assert_eq!(size("1.5gb").as_deref(), Some("1536M"));
        assert_eq!(size("512 mb").as_deref(), Some("512M"));
        assert_eq!(size("1tb").as_deref(), Some("1T"));
        assert_eq!(size("0.5kb").as_deref(), Some("1K"));
        for bad in ["4", "gb", "-1gb", "0gb", "4 GiB", "1e3gb", "4pb"] {
            assert_eq!(size(bad), None, "{bad}");
        }
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let m = message(plan_of(
            "{\n  \"image\": \"debian:12\",\n  \"forwardPorts\": [3000\n}",
        ));
        assert!(m.starts_with(&format!("{FILE}:4:1: ")), "{m}");
        for (json, expected) in [
            (
                r#"{"image": "debian:12", "forwardPorts": "x"}"#,
                "forwardPorts: expected an array",
            ),
            (
                r#"{"image": "debian:12", "forwardPorts": [0]}"#,
                "forwardPorts[0]: expected a port",
            ),
            (
                r#"{"image": "debian:12", "forwardPorts": [3000, 70000]}"#,
                "forwardPorts[1]",
            ),
            (
                r#"{"image": "debian:12", "forwardPorts": ["db:x"]}"#,
                "forwardPorts[0]",
            ),
            (
                r#"{"image": "debian:12", "postCreateCommand": {"db": 1}}"#,
                "postCreateCommand.db: expected a string or an array of strings",
            ),
            (
                r#"{"image": "debian:12", "postCreateCommand": {"db": ["a", 1]}}"#,
                "postCreateCommand.db: expected a string or an array of strings",
            ),
            (
                r#"{"image": "debian:12", "onCreateCommand": 1}"#,
                "onCreateCommand: expected a string, an array of strings or an object",
            ),
            (
                r#"{"image": "debian:12", "containerEnv": {"A": 1}}"#,
                "containerEnv.A: expected a string",
            ),
            (
                r#"{"image": "debian:12", "remoteEnv": []}"#,
                "remoteEnv: expected an object",
            ),
            (
                r#"{"image": "debian:12", "workspaceFolder": "src"}"#,
                "workspaceFolder: expected an absolute path",
            ),
            (
                r#"{"image": "debian:12", "workspaceFolder": "/"}"#,
                "workspaceFolder: expected an absolute path",
            ),
            (
                r#"{"image": "debian:12", "workspaceFolder": "/."}"#,
                "workspaceFolder: expected a normalised path",
            ),
            (
                r#"{"image": "debian:12", "workspaceFolder": "/w/../etc"}"#,
                "workspaceFolder: expected a normalised path",
            ),
            (
                r#"{"image": "debian:12", "workspaceFolder": "/w//x"}"#,
                "workspaceFolder: expected a normalised path",
            ),
            (
                r#"{"image": "debian:12", "workspaceFolder": "/etc/app"}"#,
                "workspaceFolder: expected a directory outside the system's",
            ),
            (
                r#"{"image": "debian:12", "workspaceFolder": "/proc"}"#,
                "workspaceFolder: expected a directory outside the system's",
            ),
            (
                r#"{"image": "debian:12", "workspaceFolder": "/lib64/x"}"#,
                "workspaceFolder: expected a directory outside the system's",
            ),
            (
                r#"{"image": "debian:12", "workspaceFolder": "/tmp/w"}"#,
                "workspaceFolder: /tmp is the sandbox's tmpfs",
            ),
            (
                r#"{"image": "debian:12", "hostRequirements": {"memory": "lots"}}"#,
                "hostRequirements.memory: expected a size",
            ),
            (
                r#"{"image": "debian:12", "hostRequirements": {"cpus": 1.5}}"#,
                "hostRequirements.cpus",
            ),
            (
                r#"{"image": "debian:12", "customizations": {"openrun": {"packages": ["-o=evil"]}}}"#,
                "not a Debian package name",
            ),
            (
                r#"{"image": "debian:12", "customizations": {"openrun": {"languages": ["cobol"]}}}"#,
                "unknown language \"cobol\"",
            ),
            (
                r#"{"image": "debian:12", "customizations": {"openrun": {"test": {}}}}"#,
                "customizations.openrun.test: expected a string or an array",
            ),
            (
                r#"{"dockerComposeFile": "compose.yml", "service": "app"}"#,
                "Docker Compose configurations are not supported",
            ),
            (r#"{"name": "x"}"#, "expected \"image\""),
            ("[]", "expected an object at the top level"),
            ("", "expected an object at the top level"),
        ] {
            let m = message(plan_of(json));
            assert!(m.contains(expected), "{json}: {m}");
        }
    }
}
