//! The verbs as a client of `openrun serve`: the same arguments as the local verbs
//! ([`crate::cli`]), turned into API calls. [`config`] picks the server and key, [`http`] talks
//! to it, [`exec`] runs commands and terminals, [`cp`] copies files with [`archive`].

mod archive;
mod config;
mod cp;
mod exec;
pub(crate) mod http;
mod images;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use reqwest::Method;
use serde_json::{json, Value};

pub use config::{Target, LOCAL_FILE};
use http::{sandbox_path, Client};

use crate::cli::{Command, CreateArgs, EnvArgs, EventsArgs, LsArgs, RmArgs};
use crate::output;

/// The error of a verb that only a server can do, saying how to name one.
pub fn needs_server(verb: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "`openrun {verb}` needs a server: give --server URL (or set OPENRUN_SERVER, or \
         \"server\" in the config file ~/.config/openrun/config.json)"
    )
}

/// Runs one sandbox verb against the server; returns the exit code.
pub fn dispatch(target: Target, command: Command) -> Result<i32> {
    let client = Client::new(target)?;
    let rt = crate::session::tokio_runtime()?;
    let code = rt.block_on(run(&client, command));
    // A stdin read may still be parked on its blocking thread: do not wait for it.
    rt.shutdown_background();
    code
}

async fn run(client: &Client, command: Command) -> Result<i32> {
    match command {
        Command::Create(args) => create(client, args).await,
        Command::Exec(args) => exec::exec(client, args).await,
        Command::Shell(args) => exec::shell(client, args).await,
        Command::Ps(args) => ls(client, args).await,
        Command::Rm(args) => rm(client, args).await,
        Command::Inspect(args) => {
            let resource: Value = client.get(&sandbox_path(&args.id, "")).await?;
            output::print(&format!("{}\n", serde_json::to_string_pretty(&resource)?));
            Ok(0)
        }
        Command::Cp(args) => cp::cp(client, args).await,
        Command::Logs(args) => exec::logs(client, args).await,
        Command::Events(args) => events(client, args).await,
        Command::Env(args) => env(client, args).await,
        Command::Snapshot(args) => images::snapshot(client, args).await,
        Command::Fork(args) => images::fork(client, args).await,
        Command::Diff(args) => images::diff(client, args).await,
        Command::Run(_)
        | Command::Serve(_)
        | Command::Key(_)
        | Command::Image(_)
        | Command::Mcp(_)
        | Command::Up(_)
        | Command::CreateHelper { .. }
        | Command::Teardown { .. } => {
            anyhow::bail!("this verb always runs locally")
        }
    }
}

/// The body of `POST /v1/sandboxes`: limits as the API's strings (bytes, CPUs, a duration).
fn create_body(args: &CreateArgs) -> Result<Value> {
    let sandbox = &args.sandbox;
    if let Some(dir) = &sandbox.rootfs {
        anyhow::bail!(
            "--rootfs {} is a directory on this machine: a server runs images only (--image)",
            dir.display()
        );
    }
    if sandbox.storage.is_some() {
        anyhow::bail!("--storage is not chosen by a server's clients (sandboxes are on its disk)");
    }
    let mut body = json!({
        "image": sandbox.image,
        "memory": sandbox.memory.map(|b| b.to_string()),
        "cpus": sandbox.cpus.map(|m| format!("{}.{:03}", m / 1000, m % 1000)),
        "pids": sandbox.pids,
        "disk": sandbox.disk.map(|b| b.to_string()),
        "open_files": sandbox.open_files,
        "ttl": duration(args.ttl),
        "env": args.env.iter().cloned().collect::<BTreeMap<_, _>>(),
    });
    if !args.labels.is_empty() {
        body["labels"] = json!(args.labels.iter().cloned().collect::<BTreeMap<_, _>>());
    }
    Ok(body)
}

/// A duration as the API writes them (whole milliseconds, at least 1).
fn duration(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

async fn create(client: &Client, args: CreateArgs) -> Result<i32> {
    let body = create_body(&args)?;
    let resource: Value = client
        .json(Method::POST, "/v1/sandboxes", Some(&body))
        .await?;
    if args.json {
        output::print(&format!("{}\n", serde_json::to_string_pretty(&resource)?));
    } else {
        let id = resource["id"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("the server's sandbox has no id: {resource}"))?;
        output::print(&format!("{id}\n"));
    }
    Ok(0)
}

/// Every sandbox matching the label filter, following `X-Next-Cursor` page by page.
async fn list(client: &Client, labels: &[(String, String)]) -> Result<Vec<Value>> {
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut query: Vec<(&str, String)> = labels
            .iter()
            .map(|(k, v)| ("label", format!("{k}={v}")))
            .collect();
        if let Some(c) = &cursor {
            query.push(("cursor", c.clone()));
        }
        let req = client.request(Method::GET, "/v1/sandboxes")?.query(&query);
        let res = client.send(req).await?;
        let next = res
            .headers()
            .get("x-next-cursor")
            .and_then(|v| v.to_str().ok())
            .filter(|c| !c.is_empty())
            .map(str::to_owned);
        let page: Vec<Value> = res.json().await.map_err(|e| {
            anyhow::anyhow!("the server's sandbox list is not the expected JSON: {e}")
        })?;
        all.extend(page);
        match next {
            Some(c) if cursor.as_ref() != Some(&c) => cursor = Some(c),
            _ => return Ok(all),
        }
    }
}

async fn ls(client: &Client, args: LsArgs) -> Result<i32> {
    let sandboxes = list(client, &args.labels).await?;
    if args.json {
        output::print(&format!("{}\n", serde_json::to_string_pretty(&sandboxes)?));
        return Ok(0);
    }
    let now = openrun_runtime::state::now_ms();
    let text = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let rows: Vec<Vec<String>> = sandboxes
        .iter()
        .map(|s| {
            let created = output::parse_rfc3339(s["created_at"].as_str().unwrap_or(""))
                .map(|t| format!("{} ago", output::format_ms(now.saturating_sub(t))))
                .unwrap_or_else(|| text(&s["created_at"]));
            let expires_at = s["expires_at"].as_str().and_then(output::parse_rfc3339);
            let labels = s["labels"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            vec![
                text(&s["id"]),
                text(&s["image"]),
                text(&s["state"]),
                created,
                output::expires_in(expires_at, now),
                labels,
            ]
        })
        .collect();
    output::print(&output::table(
        &["ID", "IMAGE", "STATE", "CREATED", "EXPIRES", "LABELS"],
        &rows,
    ));
    Ok(0)
}

async fn rm(client: &Client, args: RmArgs) -> Result<i32> {
    let mut code = 0;
    let mut removed = Vec::new();
    for id in &args.ids {
        let result = match client.request(Method::DELETE, &sandbox_path(id, "")) {
            Ok(req) => client.send(req).await.map(drop),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => removed.push(id.clone()),
            Err(e) if args.force && http::has_code(&e, "not_found") => {}
            Err(e) => {
                eprintln!("openrun: {}", crate::cli::describe_error(&e));
                code = crate::cli::ERROR_EXIT_CODE;
            }
        }
    }
    output::print_ids(&removed, args.json)?;
    Ok(code)
}

/// One timeline event as a line of the events table.
fn event_row(event: &Value) -> String {
    let time = event["time"].as_str().unwrap_or("-");
    format!(
        "{:<6} {:<24} {:<6} {:<16} {}\n",
        event["seq"].to_string(),
        time,
        event["actor"].as_str().unwrap_or("-"),
        event["kind"].as_str().unwrap_or("-"),
        event
            .get("payload")
            .map(Value::to_string)
            .unwrap_or_default()
    )
}

const EVENTS_HEADER: &str = "SEQ    TIME                     ACTOR  KIND             DETAILS\n";

async fn events(client: &Client, args: EventsArgs) -> Result<i32> {
    let path = sandbox_path(&args.id, "/events");
    if !args.follow {
        let events: Vec<Value> = client.get(&path).await?;
        if args.json {
            output::print(&format!("{}\n", serde_json::to_string_pretty(&events)?));
        } else {
            let rows: String = events.iter().map(event_row).collect();
            output::print(&format!("{EVENTS_HEADER}{rows}"));
        }
        return Ok(0);
    }
    let req = client
        .request(Method::GET, &path)?
        .query(&[("follow", "true")]);
    let mut lines = client.lines(req).await?;
    if !args.json {
        output::print(EVENTS_HEADER);
    }
    while let Some(text) = lines.next_text().await? {
        if args.json {
            output::print(&format!("{text}\n"));
        } else {
            let event: Value = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("the server sent an event that is not JSON: {e}"))?;
            output::print(&event_row(&event));
        }
    }
    Ok(0)
}

async fn env(client: &Client, args: EnvArgs) -> Result<i32> {
    let env: Value = client.get(&sandbox_path(&args.id, "/environment")).await?;
    if args.json {
        output::print(&format!("{}\n", serde_json::to_string_pretty(&env)?));
        return Ok(0);
    }
    output::print(&environment_text(&env));
    Ok(0)
}

/// The environment manifest as two tables: facts, then tools.
fn environment_text(env: &Value) -> String {
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let limits = &env["limits"];
    let memory = limits["memory_bytes"]
        .as_u64()
        .map(|b| format!("{} MiB", b >> 20))
        .unwrap_or_else(|| "unlimited".into());
    let cpus = limits["cpu_millis"]
        .as_u64()
        .map(|m| {
            format!("{}.{:03}", m / 1000, m % 1000)
                .trim_end_matches('0')
                .trim_end_matches('.')
                .to_string()
        })
        .unwrap_or_else(|| "unlimited".into());
    let os = env["os"]["pretty_name"]
        .as_str()
        .or_else(|| env["os"]["name"].as_str())
        .unwrap_or("-");
    let network = match env["network"].as_object() {
        Some(net) => net
            .iter()
            .map(|(k, v)| format!("{k}={}", s(v)))
            .collect::<Vec<_>>()
            .join(" "),
        None => s(&env["network"]),
    };
    let path = env["path"]
        .as_array()
        .map(|dirs| dirs.iter().map(&s).collect::<Vec<_>>().join(":"))
        .unwrap_or_else(|| s(&env["path"]));
    let facts = vec![
        vec!["OS".into(), os.to_string()],
        vec!["ARCH".into(), s(&env["arch"])],
        vec!["KERNEL".into(), s(&env["kernel"])],
        vec!["HOSTNAME".into(), s(&env["hostname"])],
        vec!["USER".into(), s(&env["user"])],
        vec!["MEMORY".into(), memory],
        vec!["CPUS".into(), cpus],
        vec!["PIDS".into(), s(&limits["pids"])],
        vec!["NETWORK".into(), network],
        vec!["PATH".into(), path],
    ];
    let tools: Vec<Vec<String>> = env["tools"]
        .as_array()
        .map(|tools| {
            tools
                .iter()
                .map(|t| vec![s(&t["name"]), s(&t["version"]), s(&t["path"])])
                .collect()
        })
        .unwrap_or_default();
    let mut out = output::table(&["WHAT", "VALUE"], &facts);
    out.push('\n');
    out.push_str(&output::table(&["TOOL", "VERSION", "PATH"], &tools));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn create_bodies_use_the_apis_units() {
        let cli = crate::cli::Cli::try_parse_from([
            "openrun", "create", "--memory", "64M", "--cpus", "1.5", "--pids", "32", "--ttl",
            "90s", "-e", "A=1", "--label", "team=ml",
        ])
        .unwrap();
        let Command::Create(args) = cli.command else {
            panic!("not create")
        };
        let body = create_body(&args).unwrap();
        assert_eq!(body["memory"], "67108864");
        assert_eq!(body["cpus"], "1.500");
        assert_eq!(body["pids"], 32);
        assert_eq!(body["ttl"], "90000ms");
        assert_eq!(body["env"]["A"], "1");
        assert_eq!(body["labels"]["team"], "ml");
        // Every value the client sends parses back to what clap checked.
        use openrun_runtime::limits;
        assert_eq!(limits::parse_memory("67108864").unwrap(), 64 << 20);
        assert_eq!(limits::parse_cpus("1.500").unwrap(), 1500);
        assert_eq!(
            limits::parse_duration("90000ms").unwrap(),
            Duration::from_secs(90)
        );
        let cli =
            crate::cli::Cli::try_parse_from(["openrun", "create", "--rootfs", "/srv/r"]).unwrap();
        let Command::Create(args) = cli.command else {
            panic!("not create")
        };
        assert!(create_body(&args)
            .unwrap_err()
            .to_string()
            .contains("/srv/r"));
    }

    #[test]
    fn event_rows_line_up_under_the_header() {
        let row = event_row(&json!({
            "seq": 7, "time": "2026-01-02T03:04:05.678Z", "actor": "agent",
            "kind": "process.exit", "payload": {"code": 0}
        }));
        assert_eq!(
            row,
            "7      2026-01-02T03:04:05.678Z agent  process.exit     {\"code\":0}\n"
        );
        let header_kind = EVENTS_HEADER.find("KIND").unwrap();
        assert_eq!(row.find("process.exit"), Some(header_kind));
    }

    #[test]
    fn environment_tables() {
        let text = environment_text(&json!({
            "os": {"pretty_name": "Debian GNU/Linux 12 (bookworm)"},
            "arch": "x86_64", "limits": {"memory_bytes": 536870912, "cpu_millis": 1500, "pids": 64},
            "network": {"policy": "none"}, "path": ["/usr/bin", "/bin"],
            "tools": [{"name": "python3", "version": "3.11.2", "path": "/usr/bin/python3"}]
        }));
        assert!(
            text.contains("OS         Debian GNU/Linux 12 (bookworm)\n"),
            "{text}"
        );
        assert!(text.contains("MEMORY     512 MiB\n"), "{text}");
        assert!(text.contains("CPUS       1.5\n"), "{text}");
        assert!(text.contains("NETWORK    policy=none\n"), "{text}");
        assert!(text.contains("PATH       /usr/bin:/bin\n"), "{text}");
        assert!(
            text.contains("python3   3.11.2    /usr/bin/python3\n"),
            "{text}"
        );
        assert!(text.contains("KERNEL     -\n"), "{text}");
    }
}
