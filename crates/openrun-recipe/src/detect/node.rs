//! Node.js: `package.json`; the lockfile picks the package manager (`package-lock.json` or
//! `npm-shrinkwrap.json` → `npm ci`, `pnpm-lock.yaml` → pnpm, `yarn.lock` → yarn classic or
//! berry), else `packageManager`, else `npm install`.

use serde_json::{Map, Value};

use super::{version_numbers, Found, Repo};
use crate::error::PlanError;
use crate::plan::quote;

/// The Node.js of Debian bookworm.
const DEBIAN_NODE: u64 = 18;

/// npm's placeholder test script (`npm init`).
const NO_TEST: &str = "no test specified";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Manager {
    Npm,
    Pnpm,
    Yarn,
    YarnBerry,
}

pub(super) fn detect(repo: &Repo) -> Result<Option<Found>, PlanError> {
    let Some(manifest) = repo.json("package.json")? else {
        return Ok(None);
    };
    let Some(manifest) = manifest.as_object() else {
        return Err(PlanError::invalid("package.json", "not a JSON object"));
    };
    let mut f = Found::new("node");
    f.inputs(
        repo,
        &[
            "package.json",
            "package-lock.json",
            "npm-shrinkwrap.json",
            "pnpm-lock.yaml",
            "pnpm-workspace.yaml",
            "yarn.lock",
            ".yarnrc.yml",
            ".npmrc",
            ".nvmrc",
            ".node-version",
        ],
    );
    let scripts = string_map(manifest.get("scripts"));
    let script = |name: &str| {
        scripts
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    // "pnpm@8.15.1+sha512.…" → ("pnpm", "8.15.1")
    let package_manager = manifest
        .get("packageManager")
        .and_then(Value::as_str)
        .and_then(|pm| pm.split_once('@'))
        .map(|(name, version)| {
            let version = version.split('+').next().unwrap_or(version);
            (name.to_string(), version.to_string())
        });
    let pinned = |tool: &str| {
        package_manager
            .as_ref()
            .filter(|(name, version)| name == tool && !version.is_empty())
            .map(|(_, version)| version.clone())
    };

    let lockfile = repo.first(&[
        "pnpm-lock.yaml",
        "yarn.lock",
        "package-lock.json",
        "npm-shrinkwrap.json",
    ]);
    let manager = match lockfile {
        Some("pnpm-lock.yaml") => Manager::Pnpm,
        Some("yarn.lock") => {
            if repo.text_or_empty("yarn.lock")?.contains("__metadata:") {
                Manager::YarnBerry
            } else {
                Manager::Yarn
            }
        }
        Some(_) => Manager::Npm,
        None => match package_manager.as_ref().map(|(n, v)| (n.as_str(), v)) {
            Some(("pnpm", _)) => Manager::Pnpm,
            Some(("yarn", v)) if version_numbers(v).first().is_some_and(|&m| m >= 2) => {
                Manager::YarnBerry
            }
            Some(("yarn", _)) => Manager::Yarn,
            _ => Manager::Npm,
        },
    };
    let has_dependencies = [
        "dependencies",
        "devDependencies",
        "optionalDependencies",
        "peerDependencies",
    ]
    .iter()
    .any(|k| {
        manifest
            .get(*k)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
    }) || manifest.contains_key("workspaces");
    let file = lockfile.unwrap_or("package.json");
    let frozen = lockfile.is_some();
    match manager {
        Manager::Npm => {
            if frozen {
                f.step("install", file, &["npm ci".into()]);
            } else if has_dependencies {
                f.step("install", file, &["npm install".into()]);
            }
        }
        Manager::Pnpm => {
            let version = pinned("pnpm").unwrap_or_else(|| pnpm_for_lockfile(repo));
            let install = if frozen {
                "pnpm install --frozen-lockfile"
            } else {
                "pnpm install"
            };
            f.step(
                "install",
                file,
                &[format!(
                    "npm install -g {} && {install}",
                    quote(&format!("pnpm@{version}"))
                )],
            );
        }
        Manager::Yarn => {
            let install = if frozen {
                "yarn install --frozen-lockfile"
            } else {
                "yarn install"
            };
            f.step(
                "install",
                file,
                &[format!("npm install -g yarn@1 && {install}")],
            );
            f.host("registry.yarnpkg.com");
        }
        Manager::YarnBerry => {
            // Yarn 2+ from the npm registry (no corepack: it fetches from elsewhere and
            // verifies signatures a registry mirror may not carry).
            let version = pinned("yarn").unwrap_or_else(|| berry_for_lockfile(repo));
            let install = if frozen {
                "yarn install --immutable"
            } else {
                "yarn install"
            };
            f.step(
                "install",
                file,
                &[format!(
                    "npm install -g {} && {install}",
                    quote(&format!("@yarnpkg/cli-dist@{version}"))
                )],
            );
            f.env.insert("YARN_ENABLE_TELEMETRY".into(), "0".into());
            f.host("registry.yarnpkg.com");
        }
    }
    let run = match manager {
        Manager::Npm => "npm",
        Manager::Pnpm => "pnpm",
        Manager::Yarn | Manager::YarnBerry => "yarn",
    };

    if script("test").is_some_and(|t| !t.contains(NO_TEST)) {
        f.test(&format!("{run} test"), true);
    } else {
        // No test script, but a test runner among the dependencies.
        let exec = match run {
            "npm" => "npx --no-install",
            "pnpm" => "pnpm exec",
            _ => "yarn",
        };
        let dev = |name: &str| {
            ["devDependencies", "dependencies"].iter().any(|k| {
                manifest
                    .get(*k)
                    .and_then(Value::as_object)
                    .is_some_and(|m| m.contains_key(name))
            })
        };
        let runners = [
            ("vitest", "vitest run"),
            ("jest", "jest"),
            ("mocha", "mocha"),
        ];
        if let Some((_, command)) = runners.iter().find(|(name, _)| dev(name)) {
            f.test(&format!("{exec} {command}"), true);
        }
    }
    let (start, script_text) = if let Some(text) = script("start") {
        (Some(format!("{run} start")), text)
    } else if let Some(text) = script("dev") {
        let command = if run == "npm" {
            "npm run dev".to_string()
        } else {
            format!("{run} dev")
        };
        (Some(command), text)
    } else {
        (None, "")
    };
    if let Some(start) = start {
        f.start(&start, port(script_text));
    }

    if let Some(engines) = manifest
        .get("engines")
        .and_then(|e| e.get("node"))
        .and_then(Value::as_str)
    {
        let minimum = engines
            .split("||")
            .filter_map(|alt| version_numbers(alt).first().copied())
            .min();
        if minimum.is_some_and(|m| m > DEBIAN_NODE) {
            f.notes.push(format!(
                "package.json's engines.node is {engines:?}; \
                 Debian bookworm has Node.js {DEBIAN_NODE}"
            ));
        }
    }
    for file in [".nvmrc", ".node-version"] {
        let Some(text) = repo.text(file)? else {
            continue;
        };
        let wanted = text.lines().next().unwrap_or("").trim().to_string();
        if version_numbers(&wanted)
            .first()
            .is_some_and(|&m| m > DEBIAN_NODE)
        {
            f.notes.push(format!(
                "{file} asks for Node.js {wanted}; Debian bookworm has Node.js {DEBIAN_NODE}"
            ));
        }
    }
    Ok(Some(f))
}

/// The Yarn that writes the lockfile's format (`__metadata: version: 8` → 4, 6 → 3).
fn berry_for_lockfile(repo: &Repo) -> String {
    let text = repo.text("yarn.lock").ok().flatten().unwrap_or_default();
    let version = text
        .lines()
        .skip_while(|l| !l.starts_with("__metadata:"))
        .find_map(|l| l.trim().strip_prefix("version:"))
        .map(|v| version_numbers(v.trim()))
        .unwrap_or_default();
    match version.first() {
        Some(4..=6) => "3",
        _ => "4",
    }
    .to_string()
}

/// The pnpm that writes the lockfile's format (`lockfileVersion: '9.0'` → 9).
fn pnpm_for_lockfile(repo: &Repo) -> String {
    let text = repo
        .text("pnpm-lock.yaml")
        .ok()
        .flatten()
        .unwrap_or_default();
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("lockfileVersion:"))
        .map(|v| version_numbers(v.trim().trim_matches(['\'', '"'])))
        .unwrap_or_default();
    match version.first() {
        Some(9..) => "9",
        Some(6) => "8",
        Some(5) => "7",
        _ => "8",
    }
    .to_string()
}

/// The port a start/dev script's server listens on: an explicit `--port N`, `-p N` or
/// `PORT=N`, else the framework's default.
fn port(script: &str) -> Option<u16> {
    let words: Vec<&str> = script.split_whitespace().collect();
    for (i, word) in words.iter().enumerate() {
        if let Some(n) = word
            .strip_prefix("--port=")
            .or_else(|| word.strip_prefix("PORT="))
        {
            if let Ok(p) = n.parse() {
                return Some(p);
            }
        }
        if (*word == "--port" || *word == "-p") && i + 1 < words.len() {
            if let Ok(p) = words[i + 1].parse() {
                return Some(p);
            }
        }
    }
    let defaults: [(&str, u16); 8] = [
        ("next", 3000),
        ("react-scripts", 3000),
        ("nuxt", 3000),
        ("vite", 5173),
        ("astro", 4321),
        ("ng serve", 4200),
        ("webpack serve", 8080),
        ("webpack-dev-server", 8080),
    ];
    defaults
        .iter()
        .find(|(tool, _)| {
            script.split("&&").any(|part| {
                part.trim_start().starts_with(tool) || part.contains(&format!(" {tool}"))
            })
        })
        .map(|(_, p)| *p)
}

/// An object's string values, in order (others skipped).
fn string_map(value: Option<&Value>) -> Vec<(String, String)> {
    value
        .and_then(Value::as_object)
        .map(|m: &Map<String, Value>| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default()
}
