//! Which server the CLI talks to, and with which key.
//!
//! The server: `--server` / `OPENRUN_SERVER`, else the config file's `server`. The config file
//! is `$OPENRUN_CONFIG`, else `$XDG_CONFIG_HOME/openrun/config.json`, else
//! `~/.config/openrun/config.json`: `{"server": "http://host:7878", "api_key": "or_..."}`.
//!
//! The key: `--api-key` / `OPENRUN_API_KEY`, else the config file's `api_key` when the server
//! is the config file's, else — for a loopback server only — the key `openrun serve` wrote to
//! `<data-dir>/local.json`. A key is never sent to a server it was not configured for.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use reqwest::Url;

/// Name of the file `openrun serve` writes in its data dir with a key for local use.
pub const LOCAL_FILE: &str = "local.json";

/// Why the server configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file exists but cannot be read.
    #[error("cannot read the config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A config file is not the expected JSON.
    #[error(
        "invalid config file {path}: {source} (expected {{\"server\": URL, \"api_key\": KEY}})"
    )]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// The server address is not an http URL.
    #[error("invalid server address {0:?}: expected http://HOST:PORT")]
    Url(String),
}

/// The server the CLI uses and its key.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    /// Base URL (`http://host:port`, no trailing slash).
    pub url: Url,
    /// API key to send, if any (without one the server answers 401).
    pub api_key: Option<String>,
}

/// Shows whether there is a key, never the key (a `{:?}` in a log line must not leak it).
impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("url", &self.url.as_str())
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Contents of a config file or of `local.json`.
#[derive(Debug, Default, serde::Deserialize)]
struct FileConfig {
    server: Option<String>,
    api_key: Option<String>,
}

impl Target {
    /// The settings of every HTTP client of the CLI that talks to an openrun server (and
    /// carries its key): straight to the server, never through a proxy of the environment
    /// (`HTTP_PROXY` would get the key), never following a redirect elsewhere; a connect
    /// timeout.
    pub fn client_builder() -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .user_agent(concat!("openrun/", env!("CARGO_PKG_VERSION")))
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
    }

    /// The local server of `<data_dir>/local.json` at `url` with its key, only when `url` is
    /// where that file's server listens and the listener is the file owner's (see
    /// [`Target::resolve`]); `None` for a stale address or another program.
    pub fn local(url: &Url, data_dir: &Path) -> Option<Target> {
        local_key(url, data_dir).map(|key| Target {
            url: url.clone(),
            api_key: Some(key),
        })
    }

    /// The configured server, or `None` when there is none (the verbs then work locally).
    /// `server` and `api_key` are the flags (clap has already read their variables).
    pub fn resolve(
        server: Option<String>,
        api_key: Option<String>,
        data_dir: &Path,
    ) -> Result<Option<Target>, ConfigError> {
        let nonempty = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
        let (server, api_key) = (nonempty(server), nonempty(api_key));
        let file = match config_path() {
            Some((path, explicit)) => read_config(&path, explicit)?,
            None => FileConfig::default(),
        };
        let file_server = nonempty(file.server).map(|s| parse_url(&s)).transpose()?;
        let url = match server {
            Some(s) => parse_url(&s)?,
            None => match &file_server {
                Some(url) => url.clone(),
                None => return Ok(None),
            },
        };
        let key = api_key
            .or_else(|| {
                // The file's key belongs to the file's server (or to any, if it names none).
                let same = file_server.as_ref().is_none_or(|s| *s == url);
                nonempty(file.api_key.clone()).filter(|_| same)
            })
            .or_else(|| local_key(&url, data_dir));
        Ok(Some(Target { url, api_key: key }))
    }
}

/// `$OPENRUN_CONFIG` (and `true`: it was named explicitly), else the XDG location, else
/// `~/.config/openrun/config.json`.
fn config_path() -> Option<(PathBuf, bool)> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(path) = var("OPENRUN_CONFIG") {
        return Some((PathBuf::from(path), true));
    }
    let base = var("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some((base.join("openrun").join("config.json"), false))
}

/// Reads a config file. A missing default file is an empty config; a missing file that
/// `$OPENRUN_CONFIG` named is an error.
fn read_config(path: &Path, explicit: bool) -> Result<FileConfig, ConfigError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            Ok(FileConfig::default())
        }
        Err(source) => Err(ConfigError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The key of `<data-dir>/local.json` when `url` is a loopback address on the port the file
/// names (where the server that wrote it listens: another local program on another port
/// never gets the key); unreadable or absent files give none (the server then answers 401).
fn local_key(url: &Url, data_dir: &Path) -> Option<String> {
    if !is_loopback(url) {
        return None;
    }
    let path = data_dir.join(LOCAL_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "no local key");
            return None;
        }
    };
    match serde_json::from_slice::<FileConfig>(&bytes) {
        Ok(local) => {
            let written = local.server.as_deref().and_then(|s| parse_url(s).ok());
            let same = written.is_some_and(|w| {
                is_loopback(&w) && w.port_or_known_default() == url.port_or_known_default()
            });
            if !same {
                tracing::debug!(path = %path.display(), "the local key is for another address");
                return None;
            }
            // The address may be stale (that server stopped) and the port now another
            // program's: the key goes only to a socket of the file's owner.
            let owner = match std::fs::metadata(&path) {
                Ok(meta) => std::os::unix::fs::MetadataExt::uid(&meta),
                Err(_) => return None,
            };
            let port = url.port_or_known_default()?;
            match listener_uids(port) {
                Ok(uids) if !uids.is_empty() && uids.iter().all(|&uid| uid == owner) => {}
                Ok(uids) => {
                    tracing::warn!(
                        port,
                        owner,
                        ?uids,
                        "not sending the key of {}: the program listening on port {port} is not \
                         the server that wrote it (owner uid {owner})",
                        path.display()
                    );
                    return None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot check who listens on port {port}: not sending the local key");
                    return None;
                }
            }
            local.api_key.filter(|k| !k.is_empty())
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring an invalid local key file");
            None
        }
    }
}

/// The uids owning the listening TCP sockets on `port` (IPv4 and IPv6) of this network
/// namespace, from `/proc/net/tcp{,6}`.
fn listener_uids(port: u16) -> std::io::Result<Vec<u32>> {
    let mut uids = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        match std::fs::read_to_string(table) {
            Ok(text) => uids.extend(listeners_on(&text, port)),
            // No IPv6 in this kernel.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && table.ends_with('6') => {}
            Err(e) => return Err(e),
        }
    }
    Ok(uids)
}

/// The uids of the LISTEN sockets on `port` in one `/proc/net/tcp*` table.
fn listeners_on(table: &str, port: u16) -> Vec<u32> {
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:tm retrnsmt uid ...
            let local = fields.get(1)?;
            let state = fields.get(3)?;
            let uid = fields.get(7)?.parse::<u32>().ok()?;
            let (_, hex_port) = local.rsplit_once(':')?;
            let listening = *state == LISTEN && u16::from_str_radix(hex_port, 16).ok()? == port;
            listening.then_some(uid)
        })
        .collect()
}

/// `http://HOST:PORT[/]`; a bare `HOST:PORT` gets `http://`.
fn parse_url(text: &str) -> Result<Url, ConfigError> {
    let text = text.trim();
    let full = if text.contains("://") {
        text.to_string()
    } else {
        format!("http://{text}")
    };
    let url = Url::parse(&full).map_err(|_| ConfigError::Url(text.to_string()))?;
    let plain = url.path() == "/" && url.query().is_none() && url.fragment().is_none();
    if url.scheme() != "http" || url.host().is_none() || !plain || !url.username().is_empty() {
        return Err(ConfigError::Url(text.to_string()));
    }
    Ok(url)
}

/// Whether the URL's host is this machine (`localhost`, 127.0.0.0/8, `::1`).
pub fn is_loopback(url: &Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_key_goes_only_to_its_servers_port() {
        let dir = tempfile::tempdir().unwrap();
        let url = |s: &str| parse_url(s).unwrap();
        assert_eq!(local_key(&url("127.0.0.1:7878"), dir.path()), None);
        std::fs::write(
            dir.path().join(LOCAL_FILE),
            r#"{"server":"http://127.0.0.1:7878","api_key":"or_k"}"#,
        )
        .unwrap();
        // (Whether the listener is the file owner's: the next test.)
        assert_eq!(local_key(&url("127.0.0.1:7879"), dir.path()), None);
        assert_eq!(local_key(&url("10.1.2.3:7878"), dir.path()), None);
        std::fs::write(dir.path().join(LOCAL_FILE), "not json").unwrap();
        assert_eq!(local_key(&url("127.0.0.1:7878"), dir.path()), None);
    }

    #[test]
    fn listeners_are_read_from_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1EC6 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0100007F:1EC7 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 2 1
   2: 0100007F:1EC6 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000        0 3 1
";
        assert_eq!(listeners_on(table, 7878), [0]);
        assert_eq!(listeners_on(table, 7879), [1000]);
        assert!(listeners_on(table, 80).is_empty());
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1EC6 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000   42        0 9 1
";
        assert_eq!(listeners_on(v6, 7878), [42]);
    }

    #[test]
    fn the_local_key_goes_only_to_a_listener_of_the_files_owner() {
        // A listener of ours (this test's uid owns the file it writes).
        let dir = tempfile::tempdir().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::fs::write(
            dir.path().join(LOCAL_FILE),
            format!(r#"{{"server":"http://127.0.0.1:{port}","api_key":"or_k"}}"#),
        )
        .unwrap();
        let url = parse_url(&format!("127.0.0.1:{port}")).unwrap();
        assert_eq!(local_key(&url, dir.path()).as_deref(), Some("or_k"));
        // Nobody listens any more: the address is stale, the key stays home.
        drop(listener);
        assert_eq!(local_key(&url, dir.path()), None);
        // A file owned by someone else than the listener: refused.
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        let me = rustix::process::getuid().as_raw();
        if me == 0 {
            std::os::unix::fs::chown(dir.path().join(LOCAL_FILE), Some(4242), None).unwrap();
            assert_eq!(local_key(&url, dir.path()), None);
        }
        drop(listener);
    }

    #[test]
    fn debug_output_hides_the_key() {
        let target = Target {
            url: parse_url("127.0.0.1:1").unwrap(),
            api_key: Some("or_secret".into()),
        };
        let shown = format!("{target:?}");
        assert!(
            !shown.contains("or_secret") && shown.contains("redacted"),
            "{shown}"
        );
    }

    #[test]
    fn server_addresses() {
        assert_eq!(
            parse_url("127.0.0.1:7878").unwrap().as_str(),
            "http://127.0.0.1:7878/"
        );
        assert_eq!(
            parse_url("http://[::1]:80/").unwrap().as_str(),
            "http://[::1]/"
        );
        for bad in [
            "https://x",
            "http://x/v1",
            "ftp://x",
            "http://u@x",
            "http://",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        for (url, local) in [
            ("http://localhost:1", true),
            ("http://127.3.2.1:1", true),
            ("http://[::1]:1", true),
            ("http://10.0.0.1:1", false),
            ("http://example.org:1", false),
        ] {
            assert_eq!(is_loopback(&parse_url(url).unwrap()), local, "{url}");
        }
    }
}
