//! A remembered setup: the devcontainer.json that reproduces a plan, and the key that says
//! whether a repository is unchanged for it.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::error::PlanError;
use crate::plan::{BaseImage, Command, Phase, Plan, Step};
use crate::tree::{hex, RepoTree};

/// Where the generated devcontainer.json is meant to be committed; its paths (a Dockerfile's)
/// are relative to this file's folder.
pub const PATH: &str = ".devcontainer/devcontainer.json";

/// The version of [`recipe_key`]'s format: a change to it (or to what a plan means) makes
/// every stored recipe stale.
const KEY_VERSION: &str = "openrun-recipe-key/1";

/// A JSON value whose objects keep their order (serde_json's maps are sorted here).
enum Json {
    String(String),
    Number(u64),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    fn string(s: impl Into<String>) -> Json {
        Json::String(s.into())
    }

    fn strings<S: AsRef<str>>(items: &[S]) -> Json {
        Json::Array(items.iter().map(|s| Json::string(s.as_ref())).collect())
    }

    fn map(map: &BTreeMap<String, String>) -> Json {
        Json::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), Json::string(v)))
                .collect(),
        )
    }

    /// Whether it prints on one line (scalars and short arrays of scalars).
    fn inline(&self) -> Option<String> {
        match self {
            Json::String(s) => Some(quote(s)),
            Json::Number(n) => Some(n.to_string()),
            Json::Array(items) if items.is_empty() => Some("[]".into()),
            Json::Object(entries) if entries.is_empty() => Some("{}".into()),
            Json::Array(items) => {
                let words: Option<Vec<String>> = items
                    .iter()
                    .map(|i| match i {
                        Json::String(_) | Json::Number(_) => i.inline(),
                        _ => None,
                    })
                    .collect();
                let line = format!("[{}]", words?.join(", "));
                (line.len() <= 72).then_some(line)
            }
            Json::Object(_) => None,
        }
    }

    fn write(&self, out: &mut String, indent: usize) {
        if let Some(line) = self.inline() {
            out.push_str(&line);
            return;
        }
        let pad = "  ".repeat(indent + 1);
        let (open, close) = match self {
            Json::Array(_) => ('[', ']'),
            _ => ('{', '}'),
        };
        out.push(open);
        out.push('\n');
        let count = match self {
            Json::Array(items) => items.len(),
            Json::Object(entries) => entries.len(),
            _ => 0,
        };
        for i in 0..count {
            out.push_str(&pad);
            match self {
                Json::Array(items) => items[i].write(out, indent + 1),
                Json::Object(entries) => {
                    out.push_str(&quote(&entries[i].0));
                    out.push_str(": ");
                    entries[i].1.write(out, indent + 1);
                }
                _ => {}
            }
            if i + 1 < count {
                out.push(',');
            }
            out.push('\n');
        }
        out.push_str(&"  ".repeat(indent));
        out.push(close);
    }
}

/// A lifecycle command's entry: its key in the object form (`None`: the whole command), and
/// the command.
type Entry = (Option<String>, Json);

/// `s` as a JSON string.
fn quote(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// A command in devcontainer.json's form: a string (shell) or an array (no shell).
fn command(command: &Command) -> Json {
    match command {
        Command::Shell(line) => Json::string(line),
        Command::Exec(argv) => Json::strings(argv),
    }
}

/// A step's alternatives as one command: the first if alone, else a shell line trying each
/// in turn (`a || b`; each grouped in a subshell when it has shell syntax of its own).
fn step_command(step: &Step) -> Option<Json> {
    match step.commands.as_slice() {
        [] => None,
        [only] => Some(command(only)),
        several => {
            let parts: Vec<String> = several
                .iter()
                .map(|c| match c {
                    Command::Shell(line) if line.contains([';', '&', '|', '\n', '(', ')', '#']) => {
                        format!("({line})")
                    }
                    other => other.to_string(),
                })
                .collect();
            Some(Json::string(parts.join(" || ")))
        }
    }
}

/// The lifecycle key a step goes under, and its key in that command's object form (`None`:
/// the step is the whole command).
fn lifecycle_of(step: &Step) -> (&'static str, Option<String>) {
    let key = match step.phase {
        Phase::Start => "postStartCommand",
        Phase::Setup => [
            "onCreateCommand",
            "updateContentCommand",
            "postCreateCommand",
        ]
        .into_iter()
        .find(|k| step.name == *k || step.name.starts_with(&format!("{k}:")))
        .unwrap_or("onCreateCommand"),
    };
    let sub = if step.name == key {
        None
    } else if let Some(sub) = step.name.strip_prefix(&format!("{key}:")) {
        Some(sub.to_string())
    } else {
        Some(step.name.clone())
    };
    (key, sub)
}

/// `4G` (a limit) as `hostRequirements`' `4gb`.
fn host_size(limit: &str) -> Option<String> {
    let (number, unit) = limit.split_at(limit.len().checked_sub(1)?);
    let unit = match unit {
        "T" | "t" => "tb",
        "G" | "g" => "gb",
        "M" | "m" => "mb",
        "K" | "k" => "kb",
        _ => return None,
    };
    (!number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()))
        .then(|| format!("{number}{unit}"))
}

/// A devcontainer.json (plain JSON, 2-space indented) that [`crate::devcontainer::plan`]
/// reads back as this plan, meant for [`PATH`]: the base (`image` `debian:SUITE` or the
/// store's image name; a Dockerfile as `build`), the environment, user, workspace, ports
/// and `hostRequirements`, the steps under their lifecycle commands (detected steps under
/// `onCreateCommand`'s object form, by name, in order; a step's alternatives joined with
/// `||`; start steps under `postStartCommand`), and the packages, languages, test, start
/// command and hosts under `customizations.openrun`. Notes and unsupported keys are not
/// carried: the file says what is done, not what was left out.
///
/// openrun runs an object form's entries one after the other in the file's order; other
/// devcontainer tools run them in parallel, so a file meant for them too may need its
/// dependent entries joined with `&&`.
pub fn devcontainer_json(plan: &Plan) -> String {
    let mut top: Vec<(String, Json)> = Vec::new();
    let mut put = |key: &str, value: Json| top.push((key.to_string(), value));
    let name = plan.workspace.rsplit('/').next().unwrap_or("workspace");
    put("name", Json::string(name));
    match &plan.base {
        BaseImage::Debian { suite } => put("image", Json::string(format!("debian:{suite}"))),
        BaseImage::Image { name } => put("image", Json::string(name)),
        BaseImage::Dockerfile {
            dockerfile,
            context,
            args,
        } => {
            // Paths relative to `.devcontainer/`.
            let relative = |path: &str| match path {
                "" | "." => "..".to_string(),
                _ => format!("../{path}"),
            };
            let mut build = vec![
                ("dockerfile".to_string(), Json::string(relative(dockerfile))),
                ("context".to_string(), Json::string(relative(context))),
            ];
            if !args.is_empty() {
                build.push(("args".into(), Json::map(args)));
            }
            put("build", Json::Object(build));
        }
    }
    put("workspaceFolder", Json::string(&plan.workspace));
    if !plan.env.is_empty() {
        put("containerEnv", Json::map(&plan.env));
    }
    if !plan.remote_env.is_empty() {
        put("remoteEnv", Json::map(&plan.remote_env));
    }
    if let Some(user) = &plan.user {
        put("remoteUser", Json::string(user));
    }
    if !plan.ports.is_empty() {
        let ports = plan.ports.iter().map(|p| Json::Number(u64::from(*p)));
        put("forwardPorts", Json::Array(ports.collect()));
    }
    let r = &plan.resources;
    let mut host = Vec::new();
    if let Some(cpus) = r.cpus.as_deref().and_then(|c| c.parse::<u64>().ok()) {
        host.push(("cpus".to_string(), Json::Number(cpus)));
    }
    if let Some(memory) = r.memory.as_deref().and_then(host_size) {
        host.push(("memory".to_string(), Json::string(memory)));
    }
    if let Some(disk) = r.disk.as_deref().and_then(host_size) {
        host.push(("storage".to_string(), Json::string(disk)));
    }
    if !host.is_empty() {
        put("hostRequirements", Json::Object(host));
    }

    // Steps grouped under their lifecycle command, keeping the plan's order.
    let mut groups: Vec<(&'static str, Vec<Entry>)> = Vec::new();
    for step in &plan.steps {
        let Some(value) = step_command(step) else {
            continue;
        };
        let (key, sub) = lifecycle_of(step);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, entries)) => entries.push((sub, value)),
            None => groups.push((key, vec![(sub, value)])),
        }
    }
    let order = |key: &str| {
        crate::devcontainer::LIFECYCLE
            .iter()
            .position(|(k, _)| *k == key)
            .unwrap_or(usize::MAX)
    };
    groups.sort_by_key(|(key, _)| order(key));
    for (key, mut entries) in groups {
        if entries.len() == 1 && entries[0].0.is_none() {
            if let Some((_, value)) = entries.pop() {
                put(key, value);
            }
            continue;
        }
        let mut object: Vec<(String, Json)> = Vec::new();
        for (sub, value) in entries.drain(..) {
            let base = sub.unwrap_or_else(|| "main".to_string());
            let mut name = base.clone();
            let mut n = 2;
            while object.iter().any(|(k, _)| *k == name) {
                name = format!("{base}-{n}");
                n += 1;
            }
            object.push((name, value));
        }
        put(key, Json::Object(object));
    }

    let mut openrun = Vec::new();
    if !plan.languages.is_empty() {
        openrun.push(("languages".to_string(), Json::strings(&plan.languages)));
    }
    if !plan.system_packages.is_empty() {
        openrun.push(("packages".to_string(), Json::strings(&plan.system_packages)));
    }
    if !plan.network.is_empty() {
        openrun.push(("network".to_string(), Json::strings(&plan.network)));
    }
    if let Some(test) = &plan.test {
        openrun.push(("test".to_string(), command(test)));
    }
    if let Some(start) = &plan.start {
        openrun.push(("start".to_string(), command(start)));
    }
    if !openrun.is_empty() {
        let openrun = Json::Object(vec![("openrun".to_string(), Json::Object(openrun))]);
        put("customizations", openrun);
    }

    let mut out = String::new();
    Json::Object(top).write(&mut out, 0);
    out.push('\n');
    out
}

/// The key of a repository's recipe: SHA-256 (hex) over the key format's version, `repo`
/// (the repository's identity: its URL, or `local:<host>:<path>`), the plan's JSON, and each
/// of the plan's inputs (sorted, without duplicates) with the SHA-256 of its contents (or a
/// marker when absent). Any change to the plan or to one of its inputs gives another key;
/// other files do not matter (the workspace is synced on a cached open).
pub fn recipe_key(plan: &Plan, tree: &dyn RepoTree, repo: &str) -> Result<String, PlanError> {
    let mut hasher = Sha256::new();
    // Every field is length-prefixed, so no two different sequences hash the same bytes.
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    field(KEY_VERSION.as_bytes());
    field(repo.as_bytes());
    let mut inputs = plan.inputs.clone();
    inputs.sort();
    inputs.dedup();
    let canonical = Plan {
        inputs: inputs.clone(),
        ..plan.clone()
    };
    let json = serde_json::to_vec(&canonical)
        .map_err(|e| PlanError::invalid("plan", format!("cannot serialize the plan: {e}")))?;
    field(&json);
    for input in &inputs {
        field(input.as_bytes());
        match tree.read(input)? {
            Some(contents) => field(hex(&Sha256::digest(&contents)).as_bytes()),
            None => field(b"absent"),
        }
    }
    Ok(hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devcontainer;
    use crate::plan::{PlanSource, Resources};
    use crate::tree::MemTree;

    fn step(name: &str, phase: Phase, commands: &[Command]) -> Step {
        Step {
            name: name.into(),
            phase,
            commands: commands.to_vec(),
            file: "package-lock.json".into(),
        }
    }

    fn shell(line: &str) -> Command {
        Command::Shell(line.into())
    }

    /// A plan as detection makes them (Debian, a toolchain, install steps with alternatives).
    fn detected() -> Plan {
        let tc = crate::detect::toolchain("node").unwrap_or_default();
        let mut packages = tc.packages.clone();
        packages.push("jq".into());
        packages.sort();
        packages.dedup();
        Plan {
            source: PlanSource::Detected,
            config_file: None,
            languages: vec!["node".into()],
            base: BaseImage::Debian {
                suite: "bookworm".into(),
            },
            system_packages: packages,
            env: tc.env.clone(),
            remote_env: BTreeMap::from([("DEBUG".into(), "1".into())]),
            user: None,
            workspace: "/workspaces/app".into(),
            steps: vec![
                step(
                    "install",
                    Phase::Setup,
                    &[shell("npm ci"), shell("npm install && npm run prepare")],
                ),
                step(
                    "build",
                    Phase::Setup,
                    &[Command::Exec(vec![
                        "npm".into(),
                        "run".into(),
                        "build it".into(),
                    ])],
                ),
                step("serve", Phase::Start, &[shell("npm start &")]),
            ],
            test: Some(shell("npm test")),
            start: Some(Command::Exec(vec!["node".into(), "server.js".into()])),
            ports: vec![3000, 9229],
            network: tc.network.clone(),
            resources: Resources {
                cpus: Some("2".into()),
                memory: Some("4G".into()),
                disk: Some("10G".into()),
            },
            inputs: vec!["package-lock.json".into(), "package.json".into()],
            unsupported: Vec::new(),
            notes: vec!["a note".into()],
        }
    }

    /// `json` read back through devcontainer.json's planning.
    fn read_back(json: &str, extra: &[(&str, &str)]) -> Plan {
        let mut files = vec![(PATH, json)];
        files.extend_from_slice(extra);
        devcontainer::plan(&MemTree::new(&files), PATH, "app").unwrap()
    }

    /// Each step's commands as the one shell line the file holds.
    fn lines(plan: &Plan) -> Vec<(Phase, String)> {
        plan.steps
            .iter()
            .map(|s| {
                let json = step_command(s).and_then(|j| j.inline()).unwrap_or_default();
                (s.phase, json)
            })
            .collect()
    }

    #[test]
    fn a_detected_plan_round_trips() {
        let plan = detected();
        let json = devcontainer_json(&plan);
        serde_json::from_str::<serde_json::Value>(&json).unwrap();
        let back = read_back(&json, &[]);
        assert_eq!(back.base, plan.base);
        assert_eq!(back.system_packages, plan.system_packages);
        assert_eq!(back.env, plan.env);
        assert_eq!(back.remote_env, plan.remote_env);
        assert_eq!(back.network, plan.network);
        assert_eq!(back.languages, plan.languages);
        assert_eq!(back.workspace, plan.workspace);
        assert_eq!(back.test, plan.test);
        assert_eq!(back.start, plan.start);
        assert_eq!(back.ports, plan.ports);
        assert_eq!(back.resources, plan.resources);
        assert_eq!(lines(&back), lines(&plan));
        let names: Vec<&str> = back.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "onCreateCommand:install",
                "onCreateCommand:build",
                "postStartCommand:serve"
            ]
        );
        assert_eq!(
            back.steps[0].commands,
            [shell("npm ci || (npm install && npm run prepare)")]
        );
        assert!(back.unsupported.is_empty(), "{:?}", back.unsupported);
        // And it is stable from there on.
        assert_eq!(devcontainer_json(&back), json);
    }

    #[test]
    fn a_devcontainer_plan_round_trips() {
        let original = r#"{
            "image": "mcr.microsoft.com/devcontainers/python:3.12",
            "containerEnv": {"A": "1"},
            "remoteUser": "root",
            "onCreateCommand": ["pip", "install", "-e", "."],
            "postCreateCommand": {"db": "./init-db", "web": "make assets"},
            "updateContentCommand": "make deps",
            "postStartCommand": {"a": "x", "b": ["y"]},
            "forwardPorts": [8000],
            "customizations": {"openrun": {"test": ["pytest", "-q"]}}
        }"#;
        let plan = read_back(original, &[]);
        let json = devcontainer_json(&plan);
        let back = read_back(&json, &[]);
        assert_eq!(back.base, plan.base);
        assert_eq!(back.system_packages, plan.system_packages);
        assert_eq!(back.env, plan.env);
        assert_eq!(back.user, plan.user);
        assert_eq!(back.test, plan.test);
        assert_eq!(back.ports, plan.ports);
        assert_eq!(back.steps, plan.steps);
    }

    #[test]
    fn a_dockerfile_plan_round_trips() {
        let mut plan = detected();
        plan.base = BaseImage::Dockerfile {
            dockerfile: "docker/Dockerfile.dev".into(),
            context: ".".into(),
            args: BTreeMap::from([("V".into(), "1".into())]),
        };
        plan.system_packages.clear();
        plan.env.clear();
        plan.network.clear();
        let json = devcontainer_json(&plan);
        let back = read_back(&json, &[("docker/Dockerfile.dev", "FROM debian")]);
        assert_eq!(back.base, plan.base);
        assert_eq!(back.languages, plan.languages);
        assert!(back.system_packages.is_empty() && back.env.is_empty());

        plan.base = BaseImage::Image {
            name: "ghcr.io/acme/dev:1".into(),
        };
        let back = read_back(&devcontainer_json(&plan), &[]);
        assert_eq!(back.base, plan.base);
    }

    #[test]
    fn the_key_follows_the_inputs_only() {
        let plan = detected();
        let tree = |lock: &str, readme: &str| {
            MemTree::new(&[
                ("package.json", "{}"),
                ("package-lock.json", lock),
                ("README.md", readme),
            ])
        };
        let key = recipe_key(&plan, &tree("v1", "a"), "local:h:/src/app").unwrap();
        assert_eq!(key.len(), 64);
        assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(
            key,
            recipe_key(&plan, &tree("v1", "b"), "local:h:/src/app").unwrap()
        );
        assert_ne!(
            key,
            recipe_key(&plan, &tree("v2", "a"), "local:h:/src/app").unwrap()
        );
        assert_ne!(
            key,
            recipe_key(&plan, &tree("v1", "a"), "local:h:/src/other").unwrap()
        );
        let absent = MemTree::new(&[("package.json", "{}")]);
        assert_ne!(key, recipe_key(&plan, &absent, "local:h:/src/app").unwrap());
        let mut other = plan.clone();
        other.system_packages.push("zip".into());
        assert_ne!(
            key,
            recipe_key(&other, &tree("v1", "a"), "local:h:/src/app").unwrap()
        );
        // Input order and duplicates do not matter.
        let mut shuffled = plan.clone();
        shuffled.inputs = vec![
            "package.json".into(),
            "package-lock.json".into(),
            "package.json".into(),
        ];
        let a = recipe_key(&shuffled, &tree("v1", "a"), "r").unwrap();
        shuffled.inputs = vec!["package-lock.json".into(), "package.json".into()];
        assert_eq!(a, recipe_key(&shuffled, &tree("v1", "a"), "r").unwrap());
    }

    #[test]
    fn sizes_and_quotes() {
        assert_eq!(host_size("4G").as_deref(), Some("4gb"));
        assert_eq!(host_size("512M").as_deref(), Some("512mb"));
        assert_eq!(host_size("G"), None);
        assert_eq!(host_size(""), None);
        assert_eq!(host_size("1.5G"), None);
        assert_eq!(quote("a\"b\n"), r#""a\"b\n""#);
    }
}
