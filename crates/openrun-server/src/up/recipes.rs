//! Recipes: a finished setup remembered per tenant and key. A recipe is three things that
//! live and die together: a row of table `recipes`, the tenant's snapshot image
//! `up-recipe-<key16>` that holds the setup's effects, and the files
//! `<data-dir>/recipes/<tenant hash>/<key>/{devcontainer.json,recipe.json}` (the generated
//! devcontainer.json that reproduces the plan elsewhere, and the plan with its key).
//!
//! The row also keeps the repository's file list and tar digest the snapshot was made from:
//! a cached open ([`super::open_repo`]) extracts the new tree over the workspace only when the
//! digest changed, and removes the files the recipe's tree had that the new one lacks
//! ([`sync_removals`]).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use openrun_image::{ImageError, ImageRef, Store};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::api::{blocking, Caller, Shared};
use crate::error::{ApiError, DbError};

/// One stored recipe.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RecipeRow {
    /// The tenant it belongs to.
    pub tenant: String,
    /// Its key (`openrun_recipe::recipe::recipe_key`, hex).
    pub key: String,
    /// The repository's identity (`local:<host>:<path>`, a git URL).
    pub repo: String,
    /// The repository's name (the workspace's last component).
    pub name: String,
    /// The snapshot image, as the tenant names it (`up-recipe-<key16>`).
    pub image: String,
    /// The generated devcontainer.json.
    pub devcontainer: String,
    /// The plan, JSON.
    pub plan_json: String,
    /// The repository's files (relative paths) the snapshot was made from, JSON array.
    pub sources_json: String,
    /// The digest of the repository's tar the snapshot was made from.
    pub source_digest: String,
    /// When it was made (ms since the epoch).
    pub created_at: i64,
    /// When an open last used it (ms since the epoch).
    pub used_at: i64,
}

/// A recipe as `GET /v1/recipes` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct RecipeInfo {
    /// Its key.
    pub key: String,
    /// The repository's identity.
    pub repo: String,
    /// The repository's name.
    pub name: String,
    /// The snapshot image holding the setup.
    pub image: String,
    /// When it was made (RFC 3339).
    pub created_at: String,
    /// When an open last used it (RFC 3339).
    pub used_at: String,
}

impl From<&RecipeRow> for RecipeInfo {
    fn from(row: &RecipeRow) -> Self {
        RecipeInfo {
            key: row.key.clone(),
            repo: row.repo.clone(),
            name: row.name.clone(),
            image: row.image.clone(),
            created_at: crate::time::rfc3339(row.created_at),
            used_at: crate::time::rfc3339(row.used_at),
        }
    }
}

/// The first 16 characters of a key (enough to tell recipes apart in image names).
pub(crate) fn key16(key: &str) -> &str {
    key.get(..16).unwrap_or(key)
}

/// The tenant's name of the recipe image of `key`.
pub(crate) fn recipe_image(key: &str) -> String {
    format!("up-recipe-{}", key16(key))
}

/// The tenant's name of the snapshot taken before setup step `n` (from 1) of `key`.
pub(crate) fn step_image(key: &str, n: usize) -> String {
    format!("up-{}-{n}", key16(key))
}

/// Whether `key` can be a recipe key: 16 to 128 lowercase hex digits (so it is safe as a
/// directory name and an image name).
pub(crate) fn valid_key(key: &str) -> bool {
    (16..=128).contains(&key.len()) && key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `<data-dir>/recipes/<first 16 hex of sha256(tenant)>`: the tenant's recipe files.
pub(crate) fn tenant_dir(data_dir: &Path, tenant: &str) -> PathBuf {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(tenant.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    data_dir.join("recipes").join(hex)
}

/// The directory of one recipe's files.
pub(crate) fn recipe_dir(data_dir: &Path, tenant: &str, key: &str) -> PathBuf {
    tenant_dir(data_dir, tenant).join(key)
}

/// Writes `devcontainer.json` and `recipe.json` into `dir` (each to a temporary file, then
/// renamed over the old one); returns the devcontainer.json's path.
pub(crate) fn write_files(
    dir: &Path,
    devcontainer: &str,
    recipe_json: &str,
) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let write = |name: &str, text: &str| -> std::io::Result<PathBuf> {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        if !text.ends_with('\n') {
            file.write_all(b"\n")?;
        }
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    };
    write("recipe.json", recipe_json)?;
    write("devcontainer.json", devcontainer)
}

/// A path to remove from the workspace before the new tree is extracted over it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Removal {
    /// Relative to the workspace.
    pub path: String,
    /// A directory (the new tree has a file where the old one had a directory).
    pub recursive: bool,
}

/// What to remove from a workspace made from the tree `old` (its files, relative paths) so
/// that extracting the tree `new` over it leaves `new`'s files: every file of `old` that `new`
/// lacks, and every directory of `old` where `new` has a file (extracting a file cannot
/// replace a directory). Files under a directory removed whole are not listed again.
pub(crate) fn sync_removals(old: &[String], new: &[String]) -> Vec<Removal> {
    let new_set: BTreeSet<&str> = new.iter().map(String::as_str).collect();
    let old_set: BTreeSet<&str> = old.iter().map(String::as_str).collect();
    // Directories of the old tree (every proper prefix of its files).
    let mut old_dirs: BTreeSet<&str> = BTreeSet::new();
    for path in &old_set {
        let mut rest = *path;
        while let Some((dir, _)) = rest.rsplit_once('/') {
            if !old_dirs.insert(dir) {
                break;
            }
            rest = dir;
        }
    }
    let mut whole: Vec<&str> = new_set
        .iter()
        .copied()
        .filter(|p| old_dirs.contains(p))
        .collect();
    whole.sort_unstable();
    let under_whole = |path: &str| {
        whole.iter().any(|dir| {
            path.len() > dir.len() && path.starts_with(dir) && path.as_bytes()[dir.len()] == b'/'
        })
    };
    let mut out: Vec<Removal> = whole
        .iter()
        .map(|dir| Removal {
            path: dir.to_string(),
            recursive: true,
        })
        .collect();
    for path in old_set {
        if !new_set.contains(path) && !under_whole(path) {
            out.push(Removal {
                path: path.to_string(),
                recursive: false,
            });
        }
    }
    out
}

fn row_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<RecipeRow> {
    Ok(RecipeRow {
        tenant: r.get(0)?,
        key: r.get(1)?,
        repo: r.get(2)?,
        name: r.get(3)?,
        image: r.get(4)?,
        devcontainer: r.get(5)?,
        plan_json: r.get(6)?,
        sources_json: r.get(7)?,
        source_digest: r.get(8)?,
        created_at: r.get(9)?,
        used_at: r.get(10)?,
    })
}

const COLUMNS: &str = "tenant, key, repo, name, image, devcontainer, plan_json, sources_json, \
                       source_digest, created_at, used_at";

/// The tenant's recipe `key`, if stored.
pub(crate) fn get(
    conn: &Connection,
    tenant: &str,
    key: &str,
) -> Result<Option<RecipeRow>, DbError> {
    Ok(conn
        .query_row(
            &format!("SELECT {COLUMNS} FROM recipes WHERE tenant = ?1 AND key = ?2"),
            params![tenant, key],
            row_of,
        )
        .optional()?)
}

/// Stores `row`, replacing a recipe of the same tenant and key.
pub(crate) fn put(conn: &Connection, row: &RecipeRow) -> Result<(), DbError> {
    conn.execute(
        &format!(
            "INSERT OR REPLACE INTO recipes ({COLUMNS})
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
        ),
        params![
            row.tenant,
            row.key,
            row.repo,
            row.name,
            row.image,
            row.devcontainer,
            row.plan_json,
            row.sources_json,
            row.source_digest,
            row.created_at,
            row.used_at
        ],
    )?;
    Ok(())
}

/// Records that an open used the tenant's recipe `key` at `now`.
pub(crate) fn touch(conn: &Connection, tenant: &str, key: &str, now: i64) -> Result<(), DbError> {
    conn.execute(
        "UPDATE recipes SET used_at = ?3 WHERE tenant = ?1 AND key = ?2",
        params![tenant, key, now],
    )?;
    Ok(())
}

/// The tenant's recipes, most recently used first.
pub(crate) fn list(conn: &Connection, tenant: &str) -> Result<Vec<RecipeRow>, DbError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {COLUMNS} FROM recipes WHERE tenant = ?1 ORDER BY used_at DESC, key"
    ))?;
    let rows = stmt
        .query_map([tenant], row_of)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// Deletes the tenant's recipe `key`; whether there was one.
pub(crate) fn delete(conn: &Connection, tenant: &str, key: &str) -> Result<bool, DbError> {
    Ok(conn.execute(
        "DELETE FROM recipes WHERE tenant = ?1 AND key = ?2",
        params![tenant, key],
    )? > 0)
}

/// Removes the caller's own image `name` (a snapshot of theirs: never a server-wide image of
/// that name) and its owner record. A missing one is not an error.
pub(crate) async fn remove_image(s: &Shared, caller: &Caller, name: &str) -> Result<(), ApiError> {
    let stored = match crate::images::resolve(s, caller, name).await? {
        Ok(stored) => stored,
        Err(ImageError::NotFound(_)) => return Ok(()),
        Err(e) => {
            return Err(ApiError::internal(
                format!("cannot resolve image {name}"),
                e,
            ))
        }
    };
    // Only the caller's own (prefixed) images: a server-wide one keeps the name as given.
    if stored == name || !stored.starts_with("tenants/") {
        return Ok(());
    }
    let r = ImageRef::parse(&stored)
        .map_err(|e| ApiError::internal(format!("cannot parse image name {stored}"), e))?;
    let data_dir = s.runtime.data_dir().to_path_buf();
    let removed = blocking(move || Store::open(&data_dir)?.remove(&r)).await?;
    match removed {
        Ok(()) | Err(ImageError::NotFound(_)) => {}
        Err(e) => return Err(ApiError::internal(format!("cannot remove image {name}"), e)),
    }
    s.db.call(move |c| {
        c.execute("DELETE FROM image_owners WHERE name = ?1", [&stored])?;
        Ok(())
    })
    .await?;
    tracing::debug!(image = name, tenant = caller.tenant, "up image removed");
    Ok(())
}

/// Deletes the caller's recipe `key`: its row, its files and its image; `NotFound` when the
/// caller has no such recipe.
pub(crate) async fn delete_recipe(s: &Shared, caller: &Caller, key: &str) -> Result<(), ApiError> {
    let missing = || ApiError::NotFound(format!("no such recipe: {key}"));
    if !valid_key(key) {
        return Err(missing());
    }
    let (tenant, k) = (caller.tenant.clone(), key.to_string());
    let row =
        s.db.call(move |c| get(c, &tenant, &k))
            .await?
            .ok_or_else(missing)?;
    remove_image(s, caller, &row.image).await?;
    let dir = recipe_dir(s.runtime.data_dir(), &caller.tenant, key);
    blocking(move || match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    })
    .await?
    .map_err(|e| ApiError::internal("cannot remove the recipe's files", e))?;
    let (tenant, k) = (caller.tenant.clone(), key.to_string());
    s.db.call(move |c| delete(c, &tenant, &k)).await?;
    tracing::info!(key, tenant = caller.tenant, "recipe deleted");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn removals_are_the_files_the_new_tree_lacks() {
        let old = strings(&["a.txt", "src/lib.rs", "src/old.rs", "docs/x/y.md"]);
        let new = strings(&["a.txt", "src/lib.rs", "README"]);
        assert_eq!(
            sync_removals(&old, &new),
            vec![
                Removal {
                    path: "docs/x/y.md".into(),
                    recursive: false
                },
                Removal {
                    path: "src/old.rs".into(),
                    recursive: false
                },
            ]
        );
        assert!(sync_removals(&new, &new).is_empty());
    }

    #[test]
    fn a_directory_that_became_a_file_goes_whole() {
        let old = strings(&["a/b", "a/c/d", "ab", "keep"]);
        let new = strings(&["a", "keep"]);
        assert_eq!(
            sync_removals(&old, &new),
            vec![
                Removal {
                    path: "a".into(),
                    recursive: true
                },
                Removal {
                    path: "ab".into(),
                    recursive: false
                },
            ]
        );
    }

    #[test]
    fn names_and_keys() {
        let key = "0123456789abcdef0123456789abcdef";
        assert_eq!(recipe_image(key), "up-recipe-0123456789abcdef");
        assert_eq!(step_image(key, 2), "up-0123456789abcdef-2");
        assert!(valid_key(key));
        assert!(!valid_key("../../etc"));
        assert!(!valid_key("0123456789ABCDEF"));
        assert!(!valid_key("0123"));
        assert!(ImageRef::parse(&recipe_image(key)).is_ok());
        let a = tenant_dir(Path::new("/d"), "t1");
        assert!(a.starts_with("/d/recipes"));
        assert_eq!(a.file_name().map(|n| n.len()), Some(16));
        assert_ne!(a, tenant_dir(Path::new("/d"), "t2"));
    }

    #[test]
    fn rows_round_trip_and_list_per_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::Db::open(&dir.path().join("openrun.db")).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let row = RecipeRow {
                tenant: "t1".into(),
                key: "00ff".repeat(8),
                repo: "local:h:/r".into(),
                name: "r".into(),
                image: "up-recipe-00ff00ff00ff00ff".into(),
                devcontainer: "{}".into(),
                plan_json: "{}".into(),
                sources_json: "[\"a\"]".into(),
                source_digest: "d".into(),
                created_at: 1,
                used_at: 1,
            };
            let stored = row.clone();
            db.call(move |c| put(c, &stored)).await.unwrap();
            let key = row.key.clone();
            db.call(move |c| touch(c, "t1", &key, 5)).await.unwrap();
            let key = row.key.clone();
            let got = db.call(move |c| get(c, "t1", &key)).await.unwrap().unwrap();
            assert_eq!(got.used_at, 5);
            assert_eq!(got.sources_json, row.sources_json);
            let key = row.key.clone();
            assert!(db
                .call(move |c| get(c, "t2", &key))
                .await
                .unwrap()
                .is_none());
            assert_eq!(db.call(|c| list(c, "t1")).await.unwrap().len(), 1);
            assert!(db.call(|c| list(c, "t2")).await.unwrap().is_empty());
            let key = row.key.clone();
            assert!(db.call(move |c| delete(c, "t1", &key)).await.unwrap());
            let key = row.key.clone();
            assert!(!db.call(move |c| delete(c, "t1", &key)).await.unwrap());
        });
    }

    #[test]
    fn files_are_written_under_the_recipe_dir() {
        let dir = tempfile::tempdir().unwrap();
        let target = recipe_dir(dir.path(), "t", "abc");
        let path = write_files(&target, "{\"name\":\"x\"}", "{}").unwrap();
        assert_eq!(path, target.join("devcontainer.json"));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"name\":\"x\"}\n"
        );
        assert!(target.join("recipe.json").is_file());
    }
}
