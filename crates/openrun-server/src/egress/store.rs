//! The stored network policies (table `network_policies`, migration 3): one row per sandbox
//! that was given a policy; no row means mode `none`. The JSON holds secret values: the
//! database is owner-only (0600) in an owner-only data dir, and nothing here is logged.

use rusqlite::{params, Connection, OptionalExtension};

use super::policy::{Policy, PolicyBody};
use crate::db::{self, NewEvent};
use crate::error::DbError;

/// The stored policy of `sandbox` (the default, mode `none`, when it has none).
pub(crate) fn load(conn: &Connection, sandbox: &str) -> Result<Policy, DbError> {
    let json: Option<String> = conn
        .query_row(
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
    tx.execute(
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
