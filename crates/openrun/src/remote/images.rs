//! `openrun snapshot`, `fork` and `diff` against a server: `POST .../snapshot`,
//! `POST .../fork` and `GET .../diff`, printed like the local verbs
//! ([`crate::snapshot_cmd`]).

use anyhow::Result;
use reqwest::Method;
use serde_json::{json, Value};

use super::http::{sandbox_path, Client};
use crate::output;
use crate::snapshot_cmd::{print_diff, print_snapshot, DiffArgs, ForkArgs, SnapshotArgs};

/// `openrun snapshot ID [-t NAME]`.
pub async fn snapshot(client: &Client, args: SnapshotArgs) -> Result<i32> {
    let body = json!({ "name": args.tag });
    let snap = client
        .json(
            Method::POST,
            &sandbox_path(&args.id, "/snapshot"),
            Some(&body),
        )
        .await?;
    print_snapshot(&snap, args.json)?;
    Ok(0)
}

/// `openrun fork ID [-n N]`: prints the new ids (or their resources with --json).
pub async fn fork(client: &Client, args: ForkArgs) -> Result<i32> {
    let body = json!({
        "count": args.count,
        "name": args.tag,
        "ttl": super::duration(args.ttl),
    });
    let forks: Vec<Value> = client
        .json(Method::POST, &sandbox_path(&args.id, "/fork"), Some(&body))
        .await?;
    if args.json {
        output::print(&format!("{}\n", serde_json::to_string_pretty(&forks)?));
        return Ok(0);
    }
    let ids = forks
        .iter()
        .map(|f| {
            f["id"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| anyhow::anyhow!("the server's fork has no id: {f}"))
        })
        .collect::<Result<Vec<_>>>()?;
    output::print_ids(&ids, false)?;
    Ok(0)
}

/// `openrun diff ID [PATH] [--against IMAGE]`.
pub async fn diff(client: &Client, args: DiffArgs) -> Result<i32> {
    let mut query: Vec<(&str, &str)> = Vec::new();
    if let Some(path) = &args.path {
        query.push(("path", path));
    }
    if let Some(against) = &args.against {
        query.push(("against", against));
    }
    let req = client
        .request(Method::GET, &sandbox_path(&args.id, "/diff"))?
        .query(&query);
    let report = client
        .send(req)
        .await?
        .json()
        .await
        .map_err(|e| anyhow::anyhow!("the server's diff is not the expected JSON: {e}"))?;
    print_diff(&report, &args)?;
    Ok(0)
}
