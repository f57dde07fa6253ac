//! The stored network policies (table `network_policies`, migration 3): one row per sandbox
//! that was given a policy; no row means mode `none`. The JSON holds secret values: the
//! database is owner-only (0600) in an owner-only data dir, nothing here is logged, and the
//! row goes when its sandbox ends (a trigger, migration 4).

use rusqlite::{params, Connection, OptionalExtension};

use super::policy::{Policy, PolicyBody};
use crate::db::{self, NewEvent};
use crate::error::DbError;

/// The stored policy of `sandbox` (the default, mode `none`, when it has none).
pub(crate) fn load(conn: &Connection, sandbox: &str) -> Result<Policy, DbError> {
    let json: Option<String> = db::query_row(
        conn,
        "SELECT policy_json FROM network_policies WHERE sandbox_id = ?1",
        [sandbox],
        |r| r.get(0),
    )
    .optional()?;
    let Some(json) = json else {
        return Ok(Policy::default());
    };
    // Checked before it was stored: failing now means a hand-edited database. The error names
    // neither the JSON nor a value.
    let body: PolicyBody = serde_json::from_str(&json)
        .map_err(|e| DbError::Corrupt(format!("network policy of {sandbox}: {e}")))?;
    Policy::compile(body).map_err(|e| DbError::Corrupt(format!("network policy of {sandbox}: {e}")))
}

/// Stores `policy` for `sandbox` (replacing any), with `event` when given, in one transaction.
pub(crate) fn save(
    conn: &mut Connection,
    sandbox: &str,
    policy: &Policy,
    event: Option<&NewEvent>,
) -> Result<(), DbError> {
    let json = serde_json::to_string(policy.stored())
        .map_err(|e| DbError::Corrupt(format!("cannot encode a network policy: {e}")))?;
    let tx = conn.transaction()?;
    db::execute(
        &tx,
        "INSERT INTO network_policies (sandbox_id, policy_json, updated_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (sandbox_id) DO UPDATE SET policy_json = ?2, updated_at = ?3",
        params![sandbox, json, crate::time::now_ms()],
    )?;
    if let Some(event) = event {
        db::append_event(&tx, event)?;
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{Db, SandboxRow};

    #[test]
    fn a_policy_with_its_secrets_ends_with_its_sandbox() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("openrun.db");
        let _db = Db::open(&path).unwrap();
        let mut conn = Connection::open(&path).unwrap();
        let policy = Policy::compile(
            serde_json::from_value(serde_json::json!({
                "mode": "allowlist", "allow": ["a.test"],
                "secrets": [{"name": "T", "value": "v4lue", "hosts": ["a.test"]}]
            }))
            .unwrap(),
        )
        .unwrap();
        for id in ["aaa", "bbb"] {
            let row = SandboxRow {
                id: id.into(),
                tenant: "t".into(),
                owner: "o".into(),
                image: "host".into(),
                limits_json: "{}".into(),
                labels: Default::default(),
                env: Default::default(),
                state: "running".into(),
                created_at: 1,
                expires_at: None,
            };
            db::insert_sandbox(&conn, &row).unwrap();
            save(&mut conn, id, &policy, None).unwrap();
        }
        assert!(load(&conn, "aaa").unwrap().has_secrets());
        let event = |id: &str| NewEvent {
            sandbox_id: id.into(),
            tenant: "t".into(),
            actor: "system".into(),
            kind: "sandbox.delete",
            payload: serde_json::json!({}),
        };
        db::stop_sandbox(&mut conn, "aaa", true, &event("aaa")).unwrap();
        assert_eq!(
            load(&conn, "aaa").unwrap().mode(),
            super::super::policy::Mode::None
        );
        let left: i64 = conn
            .query_row(
                "SELECT count(*) FROM network_policies WHERE policy_json LIKE '%v4lue%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(left, 1, "only the live sandbox keeps its secret");
        db::stop_sandbox(&mut conn, "bbb", false, &event("bbb")).unwrap();
        assert!(!load(&conn, "bbb").unwrap().has_secrets());
    }
}
