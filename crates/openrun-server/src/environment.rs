//! `GET /v1/sandboxes/{id}/environment[?refresh=true]`: what a program in the sandbox finds
//! there, so an agent can plan without probing by trial and error:
//!
//! ```text
//! {"os":{"id":"debian","name":"Debian GNU/Linux","version_id":"12","pretty_name":"..."},
//!  "arch":"x86_64","kernel":"6.1.0-18-amd64","hostname":"3f9a1c0b7e21","user":"root",
//!  "limits":{"memory_bytes":536870912,"cpu_millis":null,"pids":4096},
//!  "network":{"policy":"none","loopback":true},
//!  "path":["/usr/local/bin","/usr/bin","/bin"],
//!  "tools":[{"name":"python3","path":"/usr/bin/python3","version":"3.11.2"},...]}
//! ```
//!
//! Everything about the inside is learnt inside: `os` from the sandbox's `/etc/os-release` (or
//! `/usr/lib/os-release`) read through the agent, the rest from one probe script run by the
//! exec driver (so the timeline shows it as a `process.exec`), given [`PROBE_TIMEOUT`] and
//! parsed here. A tool is a program on the sandbox's `PATH`; its version is the first dotted
//! number its version banner prints (`null` when it prints none, as `dash` does). `limits`
//! come from the sandbox's record and `network` from its policy (`PUT .../network`; a private
//! loopback in every mode). The answer is cached per sandbox in memory (`network` excepted);
//! `refresh=true` probes again (after installing something, say).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::{Extension, Json};
use openrun_protocol::{ErrorCode, ExecRequest, Request, Response as AgentResponse};
use openrun_runtime::{AgentClient, ClientError, Limits};

use crate::api::{find, Caller, Shared};
use crate::error::ApiError;
use crate::exec::{open_running, start, Line};
use crate::openapi::ErrorAnswers;
use crate::query::Query;

/// How long the probe script may run.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most probe output read (anything after it is ignored).
const MAX_PROBE_OUTPUT: usize = 64 * 1024;
/// Largest os-release file read.
const MAX_OS_RELEASE: u64 = 64 * 1024;
/// Sandboxes whose answer is kept; the oldest is forgotten first.
const CACHE_ENTRIES: usize = 1024;
/// Where the os-release file may be, in order.
const OS_RELEASE_FILES: [&str; 2] = ["/etc/os-release", "/usr/lib/os-release"];
/// Programs looked for on the sandbox's `PATH`.
const TOOLS: &[&str] = &[
    "python3", "pip3", "uv", "node", "npm", "deno", "bun", "go", "rustc", "cargo", "gcc", "g++",
    "cc", "clang", "java", "ruby", "perl", "php", "git", "make", "cmake", "bash", "sh", "curl",
    "wget",
];

/// The probe: one line per fact, `key<TAB>value`, and `tool<TAB>name<TAB>path<TAB>banner`
/// for each tool found. Each version banner gets 3 seconds when `timeout` exists.
fn probe_script() -> String {
    format!(
        r#"printf 'arch\t%s\n' "$(uname -m 2>/dev/null)"
printf 'kernel\t%s\n' "$(uname -r 2>/dev/null)"
printf 'hostname\t%s\n' "$(uname -n 2>/dev/null)"
printf 'user\t%s\n' "$(id -un 2>/dev/null)"
printf 'path\t%s\n' "$PATH"
if command -v timeout >/dev/null 2>&1; then t="timeout 3"; else t=""; fi
for name in {tools}; do
  p=$(command -v "$name" 2>/dev/null) || continue
  case $p in /*) ;; *) continue ;; esac
  case $name in
    go) v=$($t "$p" version 2>&1 </dev/null | head -n 1) ;;
    java) v=$($t "$p" -version 2>&1 </dev/null | head -n 1) ;;
    perl) v=$($t "$p" -e 'print $^V' 2>&1 </dev/null | head -n 1) ;;
    *) v=$($t "$p" --version 2>&1 </dev/null | head -n 1) ;;
  esac
  printf 'tool\t%s\t%s\t%s\n' "$name" "$p" "$v"
done
"#,
        tools = TOOLS.join(" ")
    )
}

/// The sandbox's operating system, from its os-release file.
#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
pub struct Os {
    /// `ID`, e.g. `debian`.
    id: Option<String>,
    /// `NAME`.
    name: Option<String>,
    /// `VERSION_ID`, e.g. `12`.
    version_id: Option<String>,
    /// `PRETTY_NAME`.
    pretty_name: Option<String>,
}

/// The sandbox's network.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Network {
    /// The mode of its network policy: `none` (no route out), `allowlist` (through the egress
    /// proxy at `127.0.0.1:3128`) or `open`.
    policy: &'static str,
    /// It has its own loopback interface.
    loopback: bool,
}

/// A program found on the sandbox's `PATH`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Tool {
    /// Name it is run by.
    name: String,
    /// Where it is.
    path: String,
    /// Its version, when it reports one.
    version: Option<String>,
}

/// Answer of `GET .../environment`.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Environment {
    /// Operating system of the sandbox's root filesystem.
    os: Os,
    /// Machine architecture (`uname -m`).
    arch: Option<String>,
    /// Kernel release (`uname -r`; the host's kernel, shared).
    kernel: Option<String>,
    /// Host name inside the sandbox.
    hostname: Option<String>,
    /// User commands run as by default.
    user: Option<String>,
    /// Resource limits.
    #[schema(value_type = crate::openapi::LimitsSchema)]
    limits: Limits,
    /// Network policy.
    network: Network,
    /// Directories of `PATH`, in order.
    path: Vec<String>,
    /// Programs found on `PATH`.
    tools: Vec<Tool>,
}

/// Answers already probed, per sandbox id.
#[derive(Debug, Default)]
pub struct Cache {
    inner: Mutex<(HashMap<String, Environment>, VecDeque<String>)>,
}

impl Cache {
    fn get(&self, id: &str) -> Option<Environment> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.0.get(id).cloned()
    }

    fn put(&self, id: &str, environment: Environment) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (map, order) = &mut *inner;
        if map.insert(id.to_string(), environment).is_none() {
            order.push_back(id.to_string());
        }
        while order.len() > CACHE_ENTRIES {
            if let Some(oldest) = order.pop_front() {
                map.remove(&oldest);
            }
        }
    }
}

/// `GET /v1/sandboxes/{id}/environment[?refresh=true]`.
#[utoipa::path(get, operation_id = "environment",
    path = "/v1/sandboxes/{id}/environment",
    tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id"), ("refresh" = Option<bool>, Query, description = "Probe again instead of answering from the cache")),
    responses((status = 200, description = "The environment programs find in the sandbox", body = Environment), ErrorAnswers))]
pub async fn environment(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Query,
) -> Result<Json<Environment>, ApiError> {
    query.only(&["refresh"])?;
    let refresh = query.flag("refresh")?;
    Ok(Json(describe(&s, &caller, &id, refresh).await?))
}

/// The environment of the caller's running sandbox `id` (`GET .../environment` and MCP's
/// `environment`): from the cache unless `refresh`, else probed (and cached if the probe
/// finished).
pub(crate) async fn describe(
    s: &Shared,
    caller: &Caller,
    id: &str,
    refresh: bool,
) -> Result<Environment, ApiError> {
    let row = find(s, caller, id).await?;
    let (sandbox, mut client) = open_running(s, &row).await?;
    if !refresh {
        if let Some(mut cached) = s.environments.get(&row.id) {
            // The policy may have changed since the probe: it is never cached.
            cached.network.policy = s.egress.policy(s, &row.id).await?.mode().as_str();
            return Ok(cached);
        }
    }
    let limits: Limits = serde_json::from_str(&row.limits_json)
        .map_err(|e| ApiError::internal("a stored sandbox record is corrupt", e))?;
    let os = os_release(&mut client).await?;
    let request = ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), probe_script()],
        timeout_ms: Some(PROBE_TIMEOUT.as_millis() as u64),
        attach: true,
        tag: Some("environment-probe".into()),
        ..Default::default()
    };
    let mut lines = start(s, caller, &row, (sandbox, client), request, None).await?;
    let mut output = Vec::new();
    let mut complete = false;
    while let Some(line) = lines.recv().await {
        match line {
            Line::Stdout { data, .. } => {
                let room = MAX_PROBE_OUTPUT.saturating_sub(output.len());
                output.extend_from_slice(&data[..data.len().min(room)]);
            }
            Line::Exit {
                code, timed_out, ..
            } => complete = code == Some(0) && !timed_out,
            Line::Error { code, message } => {
                // A root filesystem without /bin/sh: report what the file told.
                tracing::debug!(code, message, "the environment probe did not run");
            }
            Line::Started { .. } | Line::Stderr { .. } => {}
        }
    }
    let probe = parse_probe(&String::from_utf8_lossy(&output));
    let environment = Environment {
        os,
        arch: probe.arch,
        kernel: probe.kernel,
        hostname: probe.hostname,
        user: probe.user,
        limits,
        network: Network {
            policy: s.egress.policy(s, &row.id).await?.mode().as_str(),
            loopback: true,
        },
        path: probe.path,
        tools: probe.tools,
    };
    if complete {
        s.environments.put(&row.id, environment.clone());
    }
    Ok(environment)
}

/// The sandbox's os-release (empty when it has none).
async fn os_release(client: &mut AgentClient) -> Result<Os, ApiError> {
    for path in OS_RELEASE_FILES {
        let request = Request::ReadFile {
            path: path.into(),
            offset: 0,
            limit: Some(MAX_OS_RELEASE),
        };
        match client.call(request).await {
            Ok(frame) => match frame.header {
                AgentResponse::FileData { .. } => {
                    return Ok(parse_os_release(&String::from_utf8_lossy(&frame.data)))
                }
                other => {
                    return Err(ApiError::internal(
                        "the sandbox agent failed",
                        format!("unexpected answer: {other:?}"),
                    ))
                }
            },
            // Missing, or not a readable file: try the next one.
            Err(ClientError::Agent(e))
                if matches!(
                    e.code,
                    ErrorCode::NotFound | ErrorCode::IsADirectory | ErrorCode::PermissionDenied
                ) => {}
            Err(e) => return Err(ApiError::from_client("the sandbox agent failed", e)),
        }
    }
    Ok(Os::default())
}

/// Parses os-release: `KEY=value` lines, values optionally quoted (shell style).
fn parse_os_release(text: &str) -> Os {
    let mut os = Os::default();
    for line in text.lines() {
        let Some((key, value)) = line.trim().split_once('=') else {
            continue;
        };
        let slot = match key {
            "ID" => &mut os.id,
            "NAME" => &mut os.name,
            "VERSION_ID" => &mut os.version_id,
            "PRETTY_NAME" => &mut os.pretty_name,
            _ => continue,
        };
        *slot = Some(unquote(value));
    }
    os
}

/// A shell-quoted os-release value: `"a \"b\""`, `'a b'` or `plain`.
fn unquote(value: &str) -> String {
    let value = value.trim();
    if let Some(inner) = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
        return inner.to_string();
    }
    let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else {
        return value.to_string();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

/// What the probe script reported.
#[derive(Debug, Default, PartialEq)]
struct Probe {
    arch: Option<String>,
    kernel: Option<String>,
    hostname: Option<String>,
    user: Option<String>,
    path: Vec<String>,
    tools: Vec<Tool>,
}

/// Parses the probe's output; lines it does not know are ignored.
fn parse_probe(text: &str) -> Probe {
    let mut probe = Probe::default();
    let value = |v: &str| Some(v.trim().to_string()).filter(|v| !v.is_empty());
    for line in text.lines() {
        let mut fields = line.splitn(4, '\t');
        match (fields.next(), fields.next()) {
            (Some("arch"), Some(v)) => probe.arch = value(v),
            (Some("kernel"), Some(v)) => probe.kernel = value(v),
            (Some("hostname"), Some(v)) => probe.hostname = value(v),
            (Some("user"), Some(v)) => probe.user = value(v),
            (Some("path"), Some(v)) => {
                probe.path = v
                    .split(':')
                    .filter(|d| !d.is_empty())
                    .map(str::to_string)
                    .collect();
            }
            (Some("tool"), Some(name)) if TOOLS.contains(&name) => {
                let Some(path) = fields.next().and_then(value) else {
                    continue;
                };
                if probe.tools.iter().any(|t| t.name == name) {
                    continue;
                }
                probe.tools.push(Tool {
                    name: name.to_string(),
                    version: fields.next().and_then(version_of),
                    path,
                });
            }
            _ => {}
        }
    }
    probe
}

/// The first dotted version number in a version banner: `Python 3.11.2` → `3.11.2`,
/// `go version go1.22.0 linux/amd64` → `1.22.0`, `GNU bash, version 5.2.15(1)-release` →
/// `5.2.15`. Words are split at spaces and punctuation; one may start with `v` or `go`, and a
/// number ends at its first character that is neither digit nor dot.
fn version_of(banner: &str) -> Option<String> {
    banner
        .split(|c: char| c.is_whitespace() || "()[],;:\"'/-_+".contains(c))
        .filter_map(|word| {
            let word = word
                .strip_prefix("go")
                .or_else(|| word.strip_prefix('v'))
                .unwrap_or(word);
            if !word.starts_with(|c: char| c.is_ascii_digit()) {
                return None;
            }
            let end = word
                .find(|c: char| !c.is_ascii_digit() && c != '.')
                .unwrap_or(word.len());
            let number = word[..end].trim_end_matches('.');
            number.contains('.').then(|| number.to_string())
        })
        .next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_come_out_of_common_banners() {
        let cases = [
            ("Python 3.11.2", Some("3.11.2")),
            ("v18.19.0", Some("18.19.0")),
            ("go version go1.22.0 linux/amd64", Some("1.22.0")),
            ("rustc 1.85.0 (4d91de4e4 2025-02-17)", Some("1.85.0")),
            ("gcc (Debian 12.2.0-14) 12.2.0", Some("12.2.0")),
            ("openjdk version \"17.0.2\" 2022-01-18", Some("17.0.2")),
            (
                "GNU bash, version 5.2.15(1)-release (x86_64-pc-linux-gnu)",
                Some("5.2.15"),
            ),
            (
                "ruby 3.1.2p20 (2022-04-12 revision 4491bb740a) [x86_64-linux-gnu]",
                Some("3.1.2"),
            ),
            ("v5.36.0", Some("5.36.0")),
            (
                "pip 23.0.1 from /usr/lib/python3/dist-packages/pip (python 3.11)",
                Some("23.0.1"),
            ),
            ("sh: 0: Illegal option --", None),
            ("/usr/bin/dash", None),
            ("python3: error while loading libpython3.11.so.1.0", None),
            ("", None),
        ];
        for (banner, want) in cases {
            assert_eq!(version_of(banner).as_deref(), want, "{banner:?}");
        }
    }

    #[test]
    fn os_release_values_are_unquoted() {
        let os = parse_os_release(
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME='Debian GNU/Linux'\n\
             VERSION_ID=\"12\"\nID=debian\n# comment\nHOME_URL=\"x\"\nBAD\n\
             ID_LIKE=\"a \\\"b\\\"\"\n",
        );
        assert_eq!(os.id.as_deref(), Some("debian"));
        assert_eq!(os.name.as_deref(), Some("Debian GNU/Linux"));
        assert_eq!(os.version_id.as_deref(), Some("12"));
        assert_eq!(
            os.pretty_name.as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
        assert_eq!(unquote(r#""a \"b\"""#), "a \"b\"");
    }

    #[test]
    fn probe_output_is_parsed_and_junk_ignored() {
        let probe = parse_probe(
            "arch\tx86_64\nkernel\t6.1.0\nhostname\tabc\nuser\troot\n\
             path\t/usr/bin::/bin\ntool\tpython3\t/usr/bin/python3\tPython 3.11.2\n\
             tool\tsh\t/usr/bin/sh\t/usr/bin/dash\ntool\tevil\t/x\t1.0\n\
             tool\tpython3\t/other\t9.9\ntool\tnode\t\t\ngarbage line\n",
        );
        assert_eq!(probe.arch.as_deref(), Some("x86_64"));
        assert_eq!(probe.path, ["/usr/bin", "/bin"]);
        assert_eq!(
            probe.tools,
            [
                Tool {
                    name: "python3".into(),
                    path: "/usr/bin/python3".into(),
                    version: Some("3.11.2".into())
                },
                Tool {
                    name: "sh".into(),
                    path: "/usr/bin/sh".into(),
                    version: None
                },
            ]
        );
    }
}
