//! The plan: everything `openrun up` will do to a repository, as data. Its JSON form is part of
//! the API (`POST /v1/up` streams it, `openrun up --plan --json` prints it).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a plan came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanSource {
    /// `.devcontainer/devcontainer.json` or `.devcontainer.json`.
    Devcontainer,
    /// A `Dockerfile` at the repository's root.
    Dockerfile,
    /// Language detection (manifests and lockfiles).
    Detected,
}

/// The image a plan starts from, before its system packages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BaseImage {
    /// A minimal Debian made with debootstrap (`openrun image build --debian SUITE`).
    Debian {
        /// The suite, e.g. `bookworm`.
        suite: String,
    },
    /// An image of the server's store, by `name[:tag]`.
    Image {
        /// Its name.
        name: String,
    },
    /// A Dockerfile of the repository, built with `openrun image build`.
    Dockerfile {
        /// The Dockerfile, relative to the repository's root.
        dockerfile: String,
        /// The build context, relative to the repository's root (`.` for the root).
        context: String,
        /// Build arguments.
        #[serde(default)]
        args: BTreeMap<String, String>,
    },
}

/// A command in one of devcontainer.json's two forms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Command {
    /// Run by `/bin/sh -c`.
    Shell(String),
    /// Run as is, no shell.
    Exec(Vec<String>),
}

impl Command {
    /// The argv that runs it.
    pub fn argv(&self) -> Vec<String> {
        match self {
            Command::Shell(line) => vec!["/bin/sh".into(), "-c".into(), line.clone()],
            Command::Exec(argv) => argv.clone(),
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Shell(line) => f.write_str(line),
            Command::Exec(argv) => {
                let words: Vec<String> = argv.iter().map(|w| quote(w)).collect();
                f.write_str(&words.join(" "))
            }
        }
    }
}

/// `word` as a POSIX shell reads it back (single quotes where needed).
pub fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// When a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Once, when the environment is made (onCreate, updateContent, postCreate, installs):
    /// its effects are in the recipe's snapshot.
    Setup,
    /// At every open, cached ones included (postStart).
    Start,
}

/// One step of the setup. Before it runs, the sandbox is snapshotted; if it fails, the
/// sandbox goes back to that snapshot and the next alternative (if any) runs from there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// Its name: `install`, `onCreateCommand`, `postCreateCommand:db` (an object form's key)...
    pub name: String,
    /// When it runs.
    pub phase: Phase,
    /// What it runs; the first that succeeds ends the step (each from the same clean state).
    pub commands: Vec<Command>,
    /// The file this step comes from (`package-lock.json`, `.devcontainer/devcontainer.json`),
    /// named in its error when it fails.
    pub file: String,
}

/// Limits for the sandbox (devcontainer.json's `hostRequirements`), as `POST /v1/sandboxes`
/// takes them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    /// CPUs, e.g. `2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<String>,
    /// Memory, e.g. `4G`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// Quota of the writable layer, e.g. `32G`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
}

/// Everything `openrun up` does to a repository.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Where it came from.
    pub source: PlanSource,
    /// The file it came from (`.devcontainer/devcontainer.json`, `Dockerfile`), if one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_file: Option<String>,
    /// Languages found: `rust`, `python`, `node`, `go`, `java`, `ruby`, `c++`.
    #[serde(default)]
    pub languages: Vec<String>,
    /// The image it starts from.
    pub base: BaseImage,
    /// Debian packages installed on the base (one cached layer per base and package set).
    #[serde(default)]
    pub system_packages: Vec<String>,
    /// Environment of every process (devcontainer.json's `containerEnv`, toolchain paths).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Environment of the steps and of `openrun shell` (devcontainer.json's `remoteEnv`).
    #[serde(default)]
    pub remote_env: BTreeMap<String, String>,
    /// The user steps and shells run as (`remoteUser`), if not the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Where the repository is inside the sandbox (`workspaceFolder`; default
    /// `/workspaces/<name>`).
    pub workspace: String,
    /// The steps, in order.
    #[serde(default)]
    pub steps: Vec<Step>,
    /// The test suite (the default readiness check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<Command>,
    /// How to start the application, if known (shown, not run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<Command>,
    /// Ports the application listens on (`forwardPorts`, detected frameworks).
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Hosts the steps need (package registries), as an egress allowlist.
    #[serde(default)]
    pub network: Vec<String>,
    /// Limits (`hostRequirements`).
    #[serde(default)]
    pub resources: Resources,
    /// Files whose contents key the recipe: manifests, lockfiles, devcontainer.json,
    /// Dockerfile. A change to one makes the next open set up again.
    #[serde(default)]
    pub inputs: Vec<String>,
    /// devcontainer.json keys this plan does not carry out, by name (with why).
    #[serde(default)]
    pub unsupported: Vec<String>,
    /// What a reader should know (an image approximated, a toolchain version not met).
    #[serde(default)]
    pub notes: Vec<String>,
}

impl Plan {
    /// A plan of `source` with nothing in it yet: Debian [`crate::detect::SUITE`], the
    /// repository at `workspace`.
    pub fn empty(source: PlanSource, workspace: &str) -> Self {
        Plan {
            source,
            config_file: None,
            languages: Vec::new(),
            base: BaseImage::Debian {
                suite: crate::detect::SUITE.into(),
            },
            system_packages: Vec::new(),
            env: BTreeMap::new(),
            remote_env: BTreeMap::new(),
            user: None,
            workspace: workspace.to_string(),
            steps: Vec::new(),
            test: None,
            start: None,
            ports: Vec::new(),
            network: Vec::new(),
            resources: Resources::default(),
            inputs: Vec::new(),
            unsupported: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// A human-readable rendering (what `openrun up --plan` prints).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let source = match self.source {
            PlanSource::Devcontainer => "devcontainer.json",
            PlanSource::Dockerfile => "Dockerfile",
            PlanSource::Detected => "detected",
        };
        let from = self
            .config_file
            .as_deref()
            .map(|f| format!(" ({f})"))
            .unwrap_or_default();
        out.push_str(&format!("plan:      {source}{from}\n"));
        if !self.languages.is_empty() {
            out.push_str(&format!("languages: {}\n", self.languages.join(", ")));
        }
        let base = match &self.base {
            BaseImage::Debian { suite } => format!("debian {suite}"),
            BaseImage::Image { name } => format!("image {name}"),
            BaseImage::Dockerfile {
                dockerfile,
                context,
                ..
            } => format!("Dockerfile {dockerfile} (context {context})"),
        };
        out.push_str(&format!("base:      {base}\n"));
        if !self.system_packages.is_empty() {
            out.push_str(&format!("packages:  {}\n", self.system_packages.join(" ")));
        }
        out.push_str(&format!("workspace: {}\n", self.workspace));
        if let Some(user) = &self.user {
            out.push_str(&format!("user:      {user}\n"));
        }
        for (k, v) in &self.env {
            out.push_str(&format!("env:       {k}={v}\n"));
        }
        for step in &self.steps {
            let phase = match step.phase {
                Phase::Setup => "",
                Phase::Start => " (every start)",
            };
            for (i, command) in step.commands.iter().enumerate() {
                let label = if i == 0 { "step" } else { "  or" };
                out.push_str(&format!("{label}:      {}{phase}: {command}\n", step.name));
            }
        }
        if let Some(test) = &self.test {
            out.push_str(&format!("test:      {test}\n"));
        }
        if let Some(start) = &self.start {
            out.push_str(&format!("start:     {start}\n"));
        }
        if !self.ports.is_empty() {
            let ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
            out.push_str(&format!("ports:     {}\n", ports.join(", ")));
        }
        if !self.network.is_empty() {
            out.push_str(&format!("network:   {}\n", self.network.join(", ")));
        }
        let r = &self.resources;
        let limits: Vec<String> = [("cpus", &r.cpus), ("memory", &r.memory), ("disk", &r.disk)]
            .into_iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k} {v}")))
            .collect();
        if !limits.is_empty() {
            out.push_str(&format!("resources: {}\n", limits.join(", ")));
        }
        for key in &self.unsupported {
            out.push_str(&format!("ignored:   {key}\n"));
        }
        for note in &self.notes {
            out.push_str(&format!("note:      {note}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_keep_both_devcontainer_forms() {
        let shell: Command = serde_json::from_str(r#""npm ci""#).unwrap();
        assert_eq!(shell, Command::Shell("npm ci".into()));
        assert_eq!(shell.argv(), ["/bin/sh", "-c", "npm ci"]);
        let exec: Command = serde_json::from_str(r#"["pip","install","a b"]"#).unwrap();
        assert_eq!(exec.to_string(), "pip install 'a b'");
        assert_eq!(
            serde_json::to_string(&exec).unwrap(),
            r#"["pip","install","a b"]"#
        );
    }

    #[test]
    fn quoting_reads_back() {
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("a/b-c"), "a/b-c");
    }
}
