//! What a sandbox gets so that its programs use the proxy: proxy variables in its environment
//! (every server-created sandbox), and for interception the proxy's CA certificate, written
//! through the agent (never from the host side) with a bundle of the image's own roots, the
//! roots the proxy trusts upstream (the host's trust store and `--egress-ca-file`) and that CA,
//! named by the usual variables. The host's roots are there because what the proxy tunnels
//! leaves through the host's network: where that network inspects TLS with a CA the host
//! trusts (a corporate proxy), the sandbox must trust it as well, or no registry works.
//!
//! The environment of a sandbox is fixed at create, so the CA variables are set when the
//! policy at create is not `none` (a sandbox that may use the network may be given secrets
//! later); the files are written at create then, and again by a `PUT .../network` that has
//! secrets. A sandbox created with `none` that gets secrets later has the files but not the
//! variables: its programs must be pointed at [`BUNDLE_PATH`] by hand.

use std::collections::BTreeMap;

use openrun_protocol::{ErrorCode, Request, Response as AgentResponse};
use openrun_runtime::{AgentClient, ClientError};

use super::policy::{Mode, Policy};
use crate::error::ApiError;

/// The proxy's CA certificate inside a sandbox.
pub(crate) const CA_PATH: &str = "/etc/openrun/ca.crt";
/// The image's roots, the proxy's upstream roots and the proxy's CA, inside a sandbox.
pub(crate) const BUNDLE_PATH: &str = "/etc/openrun/ca-bundle.crt";
/// Where Debian-like images keep their roots.
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Largest system bundle read (they are ~200 KiB).
const MAX_SYSTEM_BUNDLE: u64 = 8 << 20;

/// Variables pointing TLS clients at a bundle file (OpenSSL, Python requests and pip, curl,
/// git, cargo, whose libcurl ignores `SSL_CERT_FILE`); Node.js adds the bundle to its own roots
/// (`NODE_EXTRA_CA_CERTS`).
const BUNDLE_VARS: &[&str] = &[
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "PIP_CERT",
    "CARGO_HTTP_CAINFO",
    "NODE_EXTRA_CA_CERTS",
];

/// The proxy's address as seen from inside a sandbox (the agent's egress relay).
fn proxy_url() -> String {
    format!("http://127.0.0.1:{}", openrun_protocol::EGRESS_PROXY_PORT)
}

/// Whether a sandbox created with `policy` gets the CA variables and files.
pub(crate) fn wants_ca(policy: &Policy) -> bool {
    policy.mode() != Mode::None || policy.has_secrets()
}

/// Adds the proxy variables (and, with `ca`, the CA ones) to a sandbox's environment; a
/// variable the caller or the image set is kept.
pub(crate) fn add_env(env: &mut BTreeMap<String, String>, ca: bool) {
    let url = proxy_url();
    let mut set = |k: &str, v: &str| {
        env.entry(k.to_string()).or_insert_with(|| v.to_string());
    };
    for var in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"] {
        set(var, &url);
    }
    for var in ["NO_PROXY", "no_proxy"] {
        set(var, "localhost,127.0.0.1,::1");
    }
    if ca {
        for var in BUNDLE_VARS {
            set(var, BUNDLE_PATH);
        }
    }
}

/// Longest wait for the agent while writing the CA files.
const AGENT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Writes [`CA_PATH`] and [`BUNDLE_PATH`] through the sandbox's agent, within [`AGENT_WAIT`].
pub(crate) async fn install_ca(
    client: &mut AgentClient,
    tls: &super::tls::Tls,
) -> Result<(), ApiError> {
    tokio::time::timeout(AGENT_WAIT, write_ca(client, tls.ca_pem(), tls.roots_pem()))
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::internal(
                "cannot write the proxy's CA into the sandbox",
                format!("its agent did not answer within {AGENT_WAIT:?}"),
            ))
        })
}

async fn write_ca(client: &mut AgentClient, ca_pem: &str, roots_pem: &str) -> Result<(), ApiError> {
    let failed =
        |e: ClientError| ApiError::from_client("cannot write the proxy's CA into the sandbox", e);
    let system = match client
        .call(Request::ReadFile {
            path: SYSTEM_BUNDLE.into(),
            offset: 0,
            limit: Some(MAX_SYSTEM_BUNDLE),
        })
        .await
    {
        Ok(frame) => match frame.header {
            AgentResponse::FileData { .. } => frame.data,
            other => {
                return Err(ApiError::internal(
                    "cannot read the sandbox's CA bundle",
                    format!("unexpected answer: {other:?}"),
                ))
            }
        },
        Err(ClientError::Agent(e))
            if matches!(
                e.code,
                ErrorCode::NotFound | ErrorCode::IsADirectory | ErrorCode::PermissionDenied
            ) =>
        {
            Vec::new()
        }
        Err(e) => return Err(failed(e)),
    };
    let bundle = bundle(system, roots_pem, ca_pem);
    for (path, data) in [(CA_PATH, ca_pem.as_bytes().to_vec()), (BUNDLE_PATH, bundle)] {
        let frame = client
            .call_with_data(
                Request::WriteFile {
                    path: path.into(),
                    mode: Some(0o644),
                    parents: true,
                    append: false,
                },
                data,
            )
            .await
            .map_err(failed)?;
        if !matches!(frame.header, AgentResponse::Done) {
            return Err(ApiError::internal(
                "cannot write the proxy's CA into the sandbox",
                format!("unexpected answer: {:?}", frame.header),
            ));
        }
    }
    Ok(())
}

/// The sandbox's bundle: the image's roots, then the upstream roots, then the proxy's CA.
fn bundle(mut system: Vec<u8>, roots_pem: &str, ca_pem: &str) -> Vec<u8> {
    for part in [roots_pem, ca_pem] {
        if !system.is_empty() && !system.ends_with(b"\n") {
            system.push(b'\n');
        }
        system.extend_from_slice(part.as_bytes());
    }
    system
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_variables_are_added_without_overriding_the_callers() {
        let mut env = BTreeMap::from([("NO_PROXY".to_string(), "internal".to_string())]);
        add_env(&mut env, false);
        assert_eq!(env["HTTPS_PROXY"], "http://127.0.0.1:3128");
        assert_eq!(env["http_proxy"], "http://127.0.0.1:3128");
        assert_eq!(env["NO_PROXY"], "internal");
        assert_eq!(env["no_proxy"], "localhost,127.0.0.1,::1");
        assert!(!env.contains_key("SSL_CERT_FILE"));
        add_env(&mut env, true);
        assert_eq!(env["SSL_CERT_FILE"], BUNDLE_PATH);
        assert_eq!(env["NODE_EXTRA_CA_CERTS"], BUNDLE_PATH);
        assert_eq!(env["CARGO_HTTP_CAINFO"], BUNDLE_PATH);
    }

    #[test]
    fn the_bundle_holds_the_images_roots_the_upstream_roots_and_the_ca() {
        let b = bundle(b"IMAGE".to_vec(), "UPSTREAM\n", "CA\n");
        assert_eq!(b, b"IMAGE\nUPSTREAM\nCA\n");
        assert_eq!(bundle(Vec::new(), "", "CA\n"), b"CA\n");
    }
}
