//! TLS of the egress proxy, used only for hosts bound to a secret: the per-server CA that
//! signs a leaf certificate per intercepted host, and the client side that verifies the real
//! host.
//!
//! The CA is made once, in `<data-dir>/egress/` (`ca.key` mode 0600 in a 0700 directory,
//! `ca.crt`), and reused across restarts so sandboxes keep trusting it. Its key never leaves
//! the server; sandboxes get only the certificate (see [`super::sandbox_files`]). Leaf
//! certificates are short-lived (7 days), made on first use and kept in memory.
//!
//! Upstream connections verify the host against the system's roots (`rustls-native-certs`:
//! the host's own trust store, which its administrator keeps up to date, rather than a bundle
//! frozen into the binary) plus an optional extra CA file (`--egress-ca-file`).

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Directory of the CA in the data dir.
const DIR: &str = "egress";
/// How long a leaf certificate is valid.
const LEAF_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
/// A cached leaf is replaced after this long (well before it expires).
const LEAF_REUSE: Duration = Duration::from_secs(24 * 3600);
/// Most leaf configurations kept; the cache starts over beyond it.
const MAX_LEAVES: usize = 1024;

/// Why the proxy's TLS could not be set up (at server start).
#[derive(Debug, thiserror::Error)]
pub enum EgressSetupError {
    /// A file of the CA or the extra CA file could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The CA could not be made or loaded.
    #[error("egress CA in {path}: {message}")]
    Ca {
        /// Its directory.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// An `--egress-resolve` name is not a domain name.
    #[error("--egress-resolve {0}")]
    Resolve(String),
    /// The extra CA file holds no usable certificate.
    #[error("--egress-ca-file {path}: {message}")]
    ExtraCa {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Why one intercepted connection could not get TLS.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    /// The leaf certificate could not be made.
    #[error("cannot make a certificate for {host}: {message}")]
    Leaf {
        /// The host.
        host: String,
        /// Why.
        message: String,
    },
}

/// The proxy's TLS material.
pub(crate) struct Tls {
    ca_pem: String,
    /// The upstream roots (the system's and `--egress-ca-file`'s) as PEM: sandboxes trust
    /// them too, since what the proxy tunnels for them leaves with the host's network.
    roots_pem: String,
    issuer: Issuer<'static, KeyPair>,
    leaves: Mutex<HashMap<String, (Instant, Arc<rustls::ServerConfig>)>>,
    upstream: Arc<rustls::ClientConfig>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

/// Appends `cert` to `out` as a PEM block.
fn push_pem(out: &mut String, cert: &CertificateDer<'_>) {
    use base64::Engine;
    let text = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in text.as_bytes().chunks(64) {
        // Base64 is ASCII, so every chunk is valid UTF-8.
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
}

/// The CA's fixed parameters: the same name and usages each time, so a certificate made again
/// from the stored key is the same trust anchor.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "openrun egress proxy CA");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "openrun");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

impl Tls {
    /// Loads (or makes, the first time) the CA in `data_dir` and the upstream trust roots.
    pub(crate) fn open(data_dir: &Path, extra_ca: Option<&Path>) -> Result<Self, EgressSetupError> {
        let dir = data_dir.join(DIR);
        let (issuer, ca_pem) = load_or_make_ca(&dir)?;
        // ring rather than aws-lc-rs: no C toolchain beyond cc and no CMake build. rustls
        // deprecates it for lacking post-quantum key exchange, which is acceptable here.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::warn!(error = %e, "cannot read some of the system's CA certificates");
        }
        let mut roots_pem = String::new();
        for cert in &native.certs {
            push_pem(&mut roots_pem, cert);
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        tracing::debug!(
            added,
            ignored,
            "system CA certificates for the egress proxy"
        );
        if let Some(path) = extra_ca {
            let text = fs::read(path).map_err(|source| EgressSetupError::Io {
                what: "cannot read the extra CA file",
                path: path.to_path_buf(),
                source,
            })?;
            let extra_err = |message: String| EgressSetupError::ExtraCa {
                path: path.to_path_buf(),
                message,
            };
            let certs = CertificateDer::pem_slice_iter(&text)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| extra_err(format!("not PEM certificates: {e}")))?;
            if certs.is_empty() {
                return Err(extra_err("holds no certificate".into()));
            }
            for cert in certs {
                push_pem(&mut roots_pem, &cert);
                roots
                    .add(cert)
                    .map_err(|e| extra_err(format!("unusable certificate: {e}")))?;
            }
        }
        if roots.is_empty() {
            tracing::warn!(
                "no trusted CA certificates: connections to hosts bound to a secret will fail \
                 (install the system's CA certificates or pass --egress-ca-file)"
            );
        }
        let mut upstream = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| EgressSetupError::Ca {
                path: dir.clone(),
                message: e.to_string(),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        upstream.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            ca_pem,
            roots_pem,
            issuer,
            leaves: Mutex::new(HashMap::new()),
            upstream: Arc::new(upstream),
            provider,
        })
    }

    /// The CA certificate (PEM), what sandboxes trust.
    pub(crate) fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The upstream trust roots (PEM), which sandboxes trust as well.
    pub(crate) fn roots_pem(&self) -> &str {
        &self.roots_pem
    }

    /// Client configuration for the real hosts.
    pub(crate) fn upstream(&self) -> Arc<rustls::ClientConfig> {
        self.upstream.clone()
    }

    /// Server configuration presenting a certificate for `host` (HTTP/1.1 only).
    pub(crate) fn for_host(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut leaves = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((made, config)) = leaves.get(host) {
            if made.elapsed() < LEAF_REUSE {
                return Ok(config.clone());
            }
        }
        let config = Arc::new(self.make_leaf(host)?);
        if leaves.len() >= MAX_LEAVES {
            leaves.clear();
        }
        leaves.insert(host.to_string(), (Instant::now(), config.clone()));
        Ok(config)
    }

    fn make_leaf(&self, host: &str) -> Result<rustls::ServerConfig, TlsError> {
        let fail = |message: String| TlsError::Leaf {
            host: host.to_string(),
            message,
        };
        let mut params =
            CertificateParams::new(vec![host.to_string()]).map_err(|e| fail(e.to_string()))?;
        params.distinguished_name.push(DnType::CommonName, host);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + LEAF_VALIDITY;
        let key = KeyPair::generate().map_err(|e| fail(e.to_string()))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| fail(e.to_string()))?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| fail(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key_der)
            .map_err(|e| fail(e.to_string()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// Reads the CA from `dir`, or makes it there (key 0600, directory 0700).
fn load_or_make_ca(dir: &Path) -> Result<(Issuer<'static, KeyPair>, String), EgressSetupError> {
    let ca_err = |message: String| EgressSetupError::Ca {
        path: dir.to_path_buf(),
        message,
    };
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| EgressSetupError::Io { what, path, source }
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io("cannot create", dir))?;
    // Created by an older umask or by hand: the key's directory is the server's alone.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(io("cannot restrict", dir))?;
    let key_path = dir.join("ca.key");
    let cert_path = dir.join("ca.crt");
    let key = match fs::read_to_string(&key_path) {
        Ok(pem) => KeyPair::from_pem(&pem).map_err(|e| ca_err(format!("ca.key: {e}")))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = KeyPair::generate().map_err(|e| ca_err(e.to_string()))?;
            write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
            tracing::info!(path = %key_path.display(), "made the egress proxy CA");
            key
        }
        Err(source) => {
            return Err(EgressSetupError::Io {
                what: "cannot read",
                path: key_path,
                source,
            })
        }
    };
    let ca_pem = match fs::read_to_string(&cert_path) {
        Ok(pem) if pem.contains("BEGIN CERTIFICATE") => pem,
        Ok(_) => make_ca_cert(&key, &cert_path).map_err(|e| ca_err(e.to_string()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            make_ca_cert(&key, &cert_path).map_err(|e| ca_err(e.to_string()))?
        }
        Err(source) => {
            return Err(EgressSetupError::Io {
                what: "cannot read",
                path: cert_path,
                source,
            })
        }
    };
    Ok((Issuer::new(ca_params(), key), ca_pem))
}

fn make_ca_cert(key: &KeyPair, path: &Path) -> Result<String, Box<dyn std::error::Error>> {
    let pem = ca_params().self_signed(key)?.pem();
    write_new(path, pem.as_bytes(), 0o644)?;
    Ok(pem)
}

/// Writes `data` to `path` through a temporary file (created with `mode`) and a rename.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), EgressSetupError> {
    let tmp = path.with_extension("tmp");
    let io = |what, source| EgressSetupError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io("cannot create", e))?;
    file.write_all(data)
        .and_then(|()| file.sync_all())
        .map_err(|e| io("cannot write", e))?;
    fs::rename(&tmp, path).map_err(|e| io("cannot rename into", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_made_once_private_and_signs_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let tls = Tls::open(dir.path(), None).unwrap();
        let key = dir.path().join("egress/ca.key");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&dir.path().join("egress")), 0o700);
        assert!(tls.ca_pem().contains("BEGIN CERTIFICATE"));
        let again = Tls::open(dir.path(), None).unwrap();
        assert_eq!(
            tls.ca_pem(),
            again.ca_pem(),
            "the CA is kept across restarts"
        );
        let config = tls.for_host("api.example.com").unwrap();
        assert_eq!(config.alpn_protocols, [b"http/1.1".to_vec()]);
        let cached = tls.for_host("api.example.com").unwrap();
        assert!(Arc::ptr_eq(&config, &cached));
        let bad = dir.path().join("bad.pem");
        fs::write(&bad, "not a certificate").unwrap();
        assert!(matches!(
            Tls::open(dir.path(), Some(&bad)),
            Err(EgressSetupError::ExtraCa { .. })
        ));
    }
}
