//! Port previews end to end: a real `openrun serve` on loopback, real sandboxes running small
//! Python servers (stdlib only) on their own loopback, and HTTP / WebSocket through the server
//! by path and by host, with the API key and with preview tokens. Also the egress relay: a
//! program inside reaches the egress proxy at 127.0.0.1:3128.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::server::*;
use common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tungstenite::client::IntoClientRequest;
use tungstenite::Message;

/// Port of the HTTP echo server inside (unusual, so a host listener on it would stand out).
const HTTP_PORT: u16 = 18473;
/// Port of the WebSocket echo server inside.
const WS_PORT: u16 = 18474;
/// Port of an HTTP server inside that listens on `[::1]` only.
const V6_PORT: u16 = 18476;
/// A port nothing listens on inside.
const CLOSED_PORT: u16 = 18475;
/// Preview domain of the test server.
const DOMAIN: &str = "preview.test";

/// An HTTP server that answers every method with JSON describing the request (method, path,
/// headers, body length and SHA-256; bodies with Content-Length or chunked), and `/bytes?n=N`
/// with N bytes of 0..255 repeated.
const HTTP_APP: &str = r#"
import hashlib, json, socket, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def body(self):
        h = hashlib.sha256()
        n = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                left = size
                while left:
                    chunk = self.rfile.read(min(left, 65536))
                    h.update(chunk); n += len(chunk); left -= len(chunk)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                chunk = self.rfile.read(min(left, 65536))
                h.update(chunk); n += len(chunk); left -= len(chunk)
        return n, h.hexdigest()
    def answer(self):
        n, digest = self.body()
        if self.path.startswith("/bytes"):
            count = int(self.path.split("n=")[1])
            data = bytes(i % 256 for i in range(count))
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        out = json.dumps({
            "method": self.command,
            "path": self.path,
            "headers": [[k.lower(), v] for k, v in self.headers.items()],
            "body_len": n,
            "body_sha256": digest,
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.send_header("Set-Cookie", "openrun_token=planted; Path=/")
        self.send_header("Set-Cookie", "app=1; Path=/")
        if self.path.startswith("/hostile"):
            self.send_header("Service-Worker-Allowed", "/")
            self.send_header("Content-Security-Policy", "img-src 'self'")
            # Our cookie behind a byte that is not UTF-8, in another case, and a cookie for
            # the whole preview domain (every other preview host).
            self.send_header("Set-Cookie", "openrun_token=evil; Path=/; X=\xff")
            self.send_header("Set-Cookie", "OpenRun_Token=evil; Path=/")
            self.send_header("Set-Cookie", "wide=1; Domain=preview.test; Path=/")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)
    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = answer

class V6(ThreadingHTTPServer):
    address_family = socket.AF_INET6

host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
(V6 if ":" in host else ThreadingHTTPServer)((host, int(sys.argv[1])), H).serve_forever()
"#;

/// A WebSocket echo server (RFC 6455, the parts a client needs): text and binary frames come
/// back as they were sent; a close is answered and ends the connection.
const WS_APP: &str = r#"
import base64, hashlib, socket, struct, sys, threading

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

def read_exact(c, n):
    data = b""
    while len(data) < n:
        more = c.recv(n - len(data))
        if not more:
            raise EOFError
        data += more
    return data

def serve(c):
    try:
        head = b""
        while b"\r\n\r\n" not in head:
            more = c.recv(4096)
            if not more:
                return
            head += more
        key = None
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"sec-websocket-key:"):
                key = line.split(b":", 1)[1].strip()
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        while True:
            b0, b1 = read_exact(c, 2)
            opcode, length = b0 & 0x0F, b1 & 0x7F
            if length == 126:
                length = struct.unpack(">H", read_exact(c, 2))[0]
            elif length == 127:
                length = struct.unpack(">Q", read_exact(c, 8))[0]
            mask = read_exact(c, 4) if b1 & 0x80 else b"\0\0\0\0"
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(read_exact(c, length)))
            if length < 126:
                header = bytes([0x80 | opcode, length])
            elif length < 65536:
                header = bytes([0x80 | opcode, 126]) + struct.pack(">H", length)
            else:
                header = bytes([0x80 | opcode, 127]) + struct.pack(">Q", length)
            c.sendall(header + payload)
            if opcode == 8:
                return
    except EOFError:
        pass
    finally:
        c.close()

s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(16)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// A server with a preview domain, a key, and a sandbox running both apps.
struct Setup {
    _env: Env,
    server: Server,
    api: Api,
    id: String,
}

fn setup() -> Setup {
    let env = Env::new();
    let key = key(&env, "previews");
    let server = Server::start_with(
        &env,
        &["--listen", "127.0.0.1:0", "--preview-domain", DOMAIN],
    );
    let api = Api::new(&server, &key);
    let id = api.create(json!({}))["id"].as_str().unwrap().to_string();
    for (path, app, port) in [
        ("/tmp/http_app.py", HTTP_APP, HTTP_PORT),
        ("/tmp/ws_app.py", WS_APP, WS_PORT),
    ] {
        let res = api
            .req(
                reqwest::Method::PUT,
                &format!("/v1/sandboxes/{id}/files?path={path}"),
            )
            .body(app)
            .send()
            .unwrap();
        assert_eq!(res.status(), 204, "write {path}");
        let res = api.post(
            &format!("/v1/sandboxes/{id}/exec"),
            &json!({ "cmd": ["python3", path, port.to_string()], "background": true }).to_string(),
        );
        assert_eq!(res.status(), 201, "start {path}");
    }
    // Both listen once a request through the preview gets an answer.
    let deadline = Instant::now() + Duration::from_secs(20);
    for port in [HTTP_PORT, WS_PORT] {
        loop {
            let res = api.get(&format!("/v1/sandboxes/{id}/ports/{port}/ready"));
            // The WebSocket server closes on a plain GET (a 502 `bad_gateway`): it listens.
            let closed = res.status() == 502
                && res
                    .json::<Value>()
                    .is_ok_and(|b| b["code"] == "port_closed");
            if !closed {
                break;
            }
            assert!(Instant::now() < deadline, "port {port} never listened");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Setup {
        _env: env,
        server,
        api,
        id,
    }
}

impl Setup {
    fn addr(&self) -> &str {
        self.server.url.trim_start_matches("http://")
    }

    /// A client that does not follow redirects and sends no key.
    fn anonymous(&self) -> reqwest::blocking::Client {
        reqwest::blocking::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap()
    }

    fn preview_url(&self, port: u16, rest: &str) -> String {
        format!(
            "{}/v1/sandboxes/{}/ports/{port}{rest}",
            self.server.url, self.id
        )
    }

    /// Mints a token for `port` (with `ttl` when given).
    fn token(&self, port: u16, ttl: Option<&str>) -> Value {
        let body = ttl.map_or(json!({}), |t| json!({ "ttl": t }));
        let res = self.api.post(
            &format!("/v1/sandboxes/{}/ports/{port}/preview", self.id),
            &body.to_string(),
        );
        assert_eq!(res.status(), 200);
        res.json().unwrap()
    }
}

/// The echoed request's header `name` (lower case), if it was sent.
fn header<'a>(echo: &'a Value, name: &str) -> Option<&'a str> {
    echo["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h[0] == name)
        .and_then(|h| h[1].as_str())
}

/// A raw HTTP/1.1 request to `addr` with `Connection: close`; returns the status line's code,
/// the header block and the body.
fn raw(addr: &str, request: &str) -> (u16, String, Vec<u8>) {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    tcp.write_all(request.as_bytes()).unwrap();
    let mut all = Vec::new();
    tcp.read_to_end(&mut all).unwrap();
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    let status = head[9..12].parse().unwrap();
    (status, head, all[split + 4..].to_vec())
}

#[test]
fn previews_by_path_carry_methods_queries_and_binary_bodies() {
    let s = setup();
    // GET with the key: path and query arrive as sent, the key does not.
    let res = s.api.get(&format!(
        "/v1/sandboxes/{}/ports/{HTTP_PORT}/a/b%20c?x=1&y=%2F",
        s.id
    ));
    assert_eq!(res.status(), 200);
    let cookies: Vec<_> = res
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(
        cookies,
        ["app=1; Path=/"],
        "the app cannot plant our cookie"
    );
    let echo: Value = res.json().unwrap();
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["path"], "/a/b%20c?x=1&y=%2F");
    assert_eq!(header(&echo, "authorization"), None);
    assert!(
        !echo.to_string().contains(&s.api.key),
        "the key reached the sandbox"
    );
    assert_eq!(
        header(&echo, "x-forwarded-prefix"),
        Some(format!("/v1/sandboxes/{}/ports/{HTTP_PORT}", s.id).as_str())
    );
    assert_eq!(header(&echo, "x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(header(&echo, "x-forwarded-host"), Some(s.addr()));

    // A path preview shares the server's origin: its answers are sandboxed (added to the app's
    // own policy) and a service worker's scope cannot be widened to the whole origin.
    let res = s
        .api
        .get(&format!("/v1/sandboxes/{}/ports/{HTTP_PORT}/hostile", s.id));
    assert_eq!(res.status(), 200);
    assert!(res.headers().get("service-worker-allowed").is_none());
    let cookies: Vec<_> = res
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    assert_eq!(
        cookies,
        ["app=1; Path=/", "wide=1; Path=/"],
        "our cookie is dropped however it is written, other cookies lose their Domain"
    );
    let policies: Vec<_> = res
        .headers()
        .get_all("content-security-policy")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(
        policies,
        [
            "img-src 'self'",
            "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads"
        ]
    );

    // The bare and the slash forms are the app's `/`.
    for rest in ["", "/"] {
        let res = s
            .api
            .get(&format!("/v1/sandboxes/{}/ports/{HTTP_PORT}{rest}", s.id));
        assert_eq!(res.status(), 200);
        assert_eq!(res.json::<Value>().unwrap()["path"], "/");
    }
    // `/preview` is the app's own for every method but POST (the token route).
    let res = s.api.get(&format!(
        "/v1/sandboxes/{}/ports/{HTTP_PORT}/preview?q",
        s.id
    ));
    assert_eq!(res.json::<Value>().unwrap()["path"], "/preview?q");

    // Binary bodies, both ways, unchanged; a streamed (chunked) upload of several MB.
    let res = s.api.get(&format!(
        "/v1/sandboxes/{}/ports/{HTTP_PORT}/bytes?n=3000000",
        s.id
    ));
    assert_eq!(res.status(), 200);
    let bytes = res.bytes().unwrap();
    assert_eq!(bytes.len(), 3_000_000);
    assert!(bytes.iter().enumerate().all(|(i, b)| *b == (i % 256) as u8));
    let upload: Vec<u8> = (0..6_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let digest = hex(&Sha256::digest(&upload));
    let res = s
        .api
        .req(
            reqwest::Method::POST,
            &format!("/v1/sandboxes/{}/ports/{HTTP_PORT}/upload", s.id),
        )
        .body(reqwest::blocking::Body::new(std::io::Cursor::new(
            upload.clone(),
        )))
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    let echo: Value = res.json().unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["body_len"], 6_000_000);
    assert_eq!(echo["body_sha256"], digest);
    assert_eq!(header(&echo, "transfer-encoding"), Some("chunked"));
    // A server on the IPv6 loopback only is reached too (127.0.0.1 refuses, then [::1]).
    let res = s.api.post(
        &format!("/v1/sandboxes/{}/exec", s.id),
        &json!({ "cmd": ["python3", "/tmp/http_app.py", V6_PORT.to_string(), "::1"], "background": true })
            .to_string(),
    );
    assert_eq!(res.status(), 201);
    let deadline = Instant::now() + Duration::from_secs(20);
    let echo: Value = loop {
        let res = s
            .api
            .get(&format!("/v1/sandboxes/{}/ports/{V6_PORT}/v6", s.id));
        if res.status() == 200 {
            break res.json().unwrap();
        }
        assert!(Instant::now() < deadline, "[::1]:{V6_PORT} never answered");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(echo["path"], "/v6");
    // A sized body, another method.
    let res = s
        .api
        .req(
            reqwest::Method::PUT,
            &format!("/v1/sandboxes/{}/ports/{HTTP_PORT}/put", s.id),
        )
        .body(vec![0u8, 255, 1, 254])
        .send()
        .unwrap();
    let echo: Value = res.json().unwrap();
    assert_eq!(
        (echo["method"].as_str(), echo["body_len"].as_u64()),
        (Some("PUT"), Some(4))
    );
}

#[test]
fn tokens_open_a_preview_without_the_key_and_only_that_one() {
    let s = setup();
    let minted = s.token(HTTP_PORT, None);
    let token = minted["token"].as_str().unwrap().to_string();
    assert!(minted["path_url"]
        .as_str()
        .unwrap()
        .starts_with(&s.preview_url(HTTP_PORT, "/?openrun_token=")));
    assert_eq!(
        minted["host_url"].as_str().unwrap(),
        format!(
            "http://{HTTP_PORT}-{}.{DOMAIN}:{}/?openrun_token={token}",
            s.id,
            s.addr().rsplit(':').next().unwrap()
        )
    );
    assert!(s
        .api
        .event_kinds(&s.id)
        .contains(&"preview.token".to_string()));
    let events: Vec<Value> = s
        .api
        .get(&format!("/v1/sandboxes/{}/events", s.id))
        .json()
        .unwrap();
    assert!(
        !serde_json::to_string(&events).unwrap().contains(&token),
        "the timeline never holds a token"
    );

    let http = s.anonymous();
    // No credentials at all.
    let res = http.get(s.preview_url(HTTP_PORT, "/")).send().unwrap();
    error(res, 401, "unauthorized");
    // ?openrun_token= on a GET: a cookie scoped to this preview, and the URL without it.
    let res = http
        .get(s.preview_url(HTTP_PORT, &format!("/page?a=1&openrun_token={token}&b=2")))
        .send()
        .unwrap();
    assert_eq!(res.status(), 302);
    let location = res.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(
        location,
        format!("/v1/sandboxes/{}/ports/{HTTP_PORT}/page?a=1&b=2", s.id)
    );
    let cookie = res.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.starts_with(&format!("openrun_token={token};")),
        "{cookie}"
    );
    for part in [
        "HttpOnly",
        "SameSite=Lax",
        &format!("Path=/v1/sandboxes/{}/ports/{HTTP_PORT}", s.id),
    ] {
        assert!(cookie.contains(part), "{cookie} lacks {part}");
    }
    // The cookie opens it; neither our cookie nor the token reaches the app, its own do.
    let res = http
        .get(format!("{}{location}", s.server.url))
        .header("cookie", format!("theme=dark; openrun_token={token}"))
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    let echo: Value = res.json().unwrap();
    assert_eq!(echo["path"], "/page?a=1&b=2");
    assert_eq!(header(&echo, "cookie"), Some("theme=dark"));
    assert!(!echo.to_string().contains(&token));
    // The header works too, and a POST with the token in the query is served (no redirect),
    // without the token.
    let res = http
        .get(s.preview_url(HTTP_PORT, "/h"))
        .header("x-openrun-token", &token)
        .header("authorization", "Basic YXBwOnB3")
        .send()
        .unwrap();
    let echo: Value = res.json().unwrap();
    assert_eq!(header(&echo, "x-openrun-token"), None);
    assert_eq!(
        header(&echo, "authorization"),
        Some("Basic YXBwOnB3"),
        "an app's own credentials pass"
    );
    let res = http
        .post(s.preview_url(HTTP_PORT, &format!("/form?openrun_token={token}")))
        .body("x=1")
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    let echo: Value = res.json().unwrap();
    assert_eq!(
        (echo["path"].as_str(), echo["body_len"].as_u64()),
        (Some("/form"), Some(3))
    );
    // An API key shaped credential never passes, even when a token let the request in.
    let res = http
        .get(s.preview_url(HTTP_PORT, "/k"))
        .header("x-openrun-token", &token)
        .header("authorization", "Bearer or_0000000000")
        .send()
        .unwrap();
    assert_eq!(header(&res.json::<Value>().unwrap(), "authorization"), None);

    // The token opens this port only; forged and expired ones are refused.
    let res = http
        .get(s.preview_url(WS_PORT, "/"))
        .header("x-openrun-token", &token)
        .send()
        .unwrap();
    let message = error(res, 401, "unauthorized");
    assert!(message.contains(&WS_PORT.to_string()), "{message}");
    let mut forged = token.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    let res = http
        .get(s.preview_url(HTTP_PORT, "/"))
        .header("x-openrun-token", &forged)
        .send()
        .unwrap();
    error(res, 401, "unauthorized");
    let short = s.token(HTTP_PORT, Some("1s"));
    std::thread::sleep(Duration::from_millis(1500));
    let res = http
        .get(s.preview_url(HTTP_PORT, "/"))
        .header("x-openrun-token", short["token"].as_str().unwrap())
        .send()
        .unwrap();
    let message = error(res, 401, "unauthorized");
    assert!(message.contains("expired"), "{message}");
    // Tokens are checked too: a bad lifetime is a 400.
    let res = s.api.post(
        &format!("/v1/sandboxes/{}/ports/{HTTP_PORT}/preview", s.id),
        r#"{"ttl":"30d"}"#,
    );
    error(res, 400, "invalid_argument");
}

#[test]
fn previews_by_host_with_the_key_and_a_token() {
    let s = setup();
    let host = format!("{HTTP_PORT}-{}.{DOMAIN}", s.id);
    let (status, _, body) = raw(
        s.addr(),
        &format!(
            "GET /v1/health?z=9 HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {}\r\n\
             Connection: close\r\n\r\n",
            s.api.key
        ),
    );
    assert_eq!(status, 200);
    let echo: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        echo["path"], "/v1/health?z=9",
        "the whole path is the app's"
    );
    assert_eq!(header(&echo, "authorization"), None);
    assert_eq!(header(&echo, "x-forwarded-prefix"), None);
    // A host preview is its own origin: the app's policy is left alone, a worker's scope
    // still cannot be widened.
    let (status, head, _) = raw(
        s.addr(),
        &format!(
            "GET /hostile HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {}\r\n\
             Connection: close\r\n\r\n",
            s.api.key
        ),
    );
    assert_eq!(status, 200);
    let lower = head.to_ascii_lowercase();
    assert!(!lower.contains("service-worker-allowed"), "{head}");
    let cookies: Vec<&str> = lower
        .lines()
        .filter_map(|l| l.strip_prefix("set-cookie: "))
        .collect();
    assert_eq!(cookies, ["app=1; path=/", "wide=1; path=/"], "{head}");
    assert!(
        lower.contains("content-security-policy: img-src 'self'") && !lower.contains("sandbox"),
        "{head}"
    );
    // A token in the query becomes a host cookie.
    let token = s.token(HTTP_PORT, None)["token"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, head, _) = raw(
        s.addr(),
        &format!(
            "GET /x?openrun_token={token} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(status, 302);
    assert!(
        head.to_ascii_lowercase().contains("\r\nlocation: /x\r\n"),
        "{head}"
    );
    assert!(head.contains("Path=/;"), "{head}");
    // The redirect never leaves the host: `//evil.com/` would be another host to a browser.
    for (path, expected) in [
        ("//evil.com/", Some("/evil.com/")),
        ("///evil.com/a?b=1&", Some("/evil.com/a?b=1")),
        ("/\\evil.com/", None),
    ] {
        let (status, head, _) = raw(
            s.addr(),
            &format!(
                "GET {path}{}openrun_token={token} HTTP/1.1\r\nHost: {host}\r\n\
                 Connection: close\r\n\r\n",
                if path.contains('?') { "" } else { "?" }
            ),
        );
        let location = head.lines().find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("location: ")
                .map(str::to_string)
        });
        if let Some(expected) = expected {
            assert_eq!(status, 302, "{path}: {head}");
            assert_eq!(location.as_deref(), Some(expected), "{path}: {head}");
        }
        // Refused by the HTTP parser or redirected: never to another host.
        if let Some(location) = location {
            assert!(
                location.starts_with('/') && !location[1..].starts_with(['/', '\\']),
                "{path}: {head}"
            );
        }
    }
    let (status, _, body) = raw(
        s.addr(),
        &format!(
            "GET /x HTTP/1.1\r\nHost: {host}\r\nCookie: openrun_token={token}\r\n\
             Connection: close\r\n\r\n"
        ),
    );
    assert_eq!(status, 200);
    let echo: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(header(&echo, "cookie"), None);
    // Without credentials a preview host is closed; a bad port is named.
    let (status, _, _) = raw(
        s.addr(),
        &format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 401);
    let (status, _, body) = raw(
        s.addr(),
        &format!(
            "GET / HTTP/1.1\r\nHost: 70000-{}.{DOMAIN}\r\nConnection: close\r\n\r\n",
            s.id
        ),
    );
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("70000"));
    // The domain itself (and any other host) is the API.
    let (status, _, body) = raw(
        s.addr(),
        &format!("GET /v1/health HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["status"],
        "ok"
    );
}

/// Opens a WebSocket through the preview at `path` with extra `headers`.
fn websocket(
    addr: &str,
    host: Option<&str>,
    path: &str,
    headers: &[(&'static str, String)],
) -> tungstenite::WebSocket<TcpStream> {
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(*name, value.parse().unwrap());
    }
    if let Some(host) = host {
        request.headers_mut().insert("host", host.parse().unwrap());
    }
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    match tungstenite::client(request, stream) {
        Ok((socket, _)) => socket,
        Err(e) => panic!("WebSocket handshake through the preview failed: {e}"),
    }
}

fn echo_round_trip(socket: &mut tungstenite::WebSocket<TcpStream>) {
    socket
        .send(Message::text("hello through the preview"))
        .unwrap();
    assert_eq!(
        socket.read().unwrap(),
        Message::text("hello through the preview")
    );
    let binary: Vec<u8> = (0..200_000u32).map(|i| (i % 256) as u8).collect();
    socket.send(Message::binary(binary.clone())).unwrap();
    assert_eq!(socket.read().unwrap(), Message::binary(binary));
    socket.close(None).unwrap();
    loop {
        match socket.read() {
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

#[test]
fn websockets_pass_through_previews() {
    let s = setup();
    let path = format!("/v1/sandboxes/{}/ports/{WS_PORT}/socket", s.id);
    let mut socket = websocket(
        s.addr(),
        None,
        &path,
        &[("authorization", format!("Bearer {}", s.api.key))],
    );
    echo_round_trip(&mut socket);
    // With a token in the query (browsers cannot set headers on WebSockets): no redirect.
    let token = s.token(WS_PORT, None)["token"]
        .as_str()
        .unwrap()
        .to_string();
    let mut socket = websocket(
        s.addr(),
        None,
        &format!("{path}?openrun_token={token}"),
        &[],
    );
    echo_round_trip(&mut socket);
    // By host.
    let host = format!("{WS_PORT}-{}.{DOMAIN}", s.id);
    let mut socket = websocket(
        s.addr(),
        Some(&host),
        "/socket",
        &[("cookie", format!("openrun_token={token}"))],
    );
    echo_round_trip(&mut socket);
}

/// Inodes of the TCP sockets listening in this (the host's) network namespace.
fn host_listeners() -> BTreeSet<(u16, u64)> {
    let mut out = BTreeSet::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[3] == "0A" {
                let port = f[1]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    .unwrap_or(0);
                out.insert((port, f[9].parse().unwrap_or(0)));
            }
        }
    }
    out
}

/// Socket inodes the process `pid` holds.
fn socket_inodes(pid: i32) -> BTreeSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

#[test]
fn refusals_are_clear_and_nothing_listens_on_the_host() {
    let s = setup();
    let own = socket_inodes(s.server.pid());
    let server_listeners = |all: &BTreeSet<(u16, u64)>| -> Vec<u16> {
        let own = socket_inodes(s.server.pid());
        all.iter()
            .filter(|(_, inode)| own.contains(inode))
            .map(|(port, _)| *port)
            .collect()
    };
    let api_port: u16 = s.addr().rsplit(':').next().unwrap().parse().unwrap();
    assert!(!own.is_empty());
    // Previews in use (setup made several) and the server still listens on its port only;
    // the ports inside are nowhere on the host.
    let all = host_listeners();
    assert_eq!(server_listeners(&all), [api_port]);
    for port in [HTTP_PORT, WS_PORT] {
        assert!(
            !all.iter().any(|(p, _)| *p == port),
            "port {port} listens on the host"
        );
    }

    // Ports out of range name themselves.
    for bad in ["70000", "0", "http", "-1"] {
        let message = error(
            s.api.get(&format!("/v1/sandboxes/{}/ports/{bad}/", s.id)),
            400,
            "invalid_argument",
        );
        assert!(message.contains(bad), "{message}");
        let message = error(
            s.api
                .post(&format!("/v1/sandboxes/{}/ports/{bad}/preview", s.id), "{}"),
            400,
            "invalid_argument",
        );
        assert!(message.contains(bad), "{message}");
    }
    // Nothing listening: a 502 that says so.
    let message = error(
        s.api
            .get(&format!("/v1/sandboxes/{}/ports/{CLOSED_PORT}/", s.id)),
        502,
        "port_closed",
    );
    assert!(message.contains(&CLOSED_PORT.to_string()), "{message}");
    // The egress relay's port (something listens there: the agent's relay) is never a preview:
    // it would enter the egress proxy as the sandbox.
    let message = error(
        s.api.get(&format!("/v1/sandboxes/{}/ports/3128/", s.id)),
        403,
        "forbidden",
    );
    assert!(
        message.contains("3128") && message.contains("egress"),
        "{message}"
    );
    // Another tenant sees nothing, key or token route alike; unknown sandboxes neither.
    let other = Api::new(&s.server, &key(&s._env, "other"));
    error(
        other.get(&format!("/v1/sandboxes/{}/ports/{HTTP_PORT}/", s.id)),
        404,
        "not_found",
    );
    error(
        other.post(
            &format!("/v1/sandboxes/{}/ports/{HTTP_PORT}/preview", s.id),
            "{}",
        ),
        404,
        "not_found",
    );
    error(
        s.api
            .get(&format!("/v1/sandboxes/000000000000/ports/{HTTP_PORT}/")),
        404,
        "not_found",
    );
    // A paused sandbox is a 409 (its agent is frozen), and works again after the resume.
    let token = s.token(HTTP_PORT, None)["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        s.api
            .post(&format!("/v1/sandboxes/{}/pause", s.id), "")
            .status(),
        200
    );
    error(
        s.api
            .get(&format!("/v1/sandboxes/{}/ports/{HTTP_PORT}/", s.id)),
        409,
        "sandbox_paused",
    );
    let res = s
        .anonymous()
        .get(s.preview_url(HTTP_PORT, "/"))
        .header("x-openrun-token", &token)
        .send()
        .unwrap();
    error(res, 409, "sandbox_paused");
    assert_eq!(
        s.api
            .post(&format!("/v1/sandboxes/{}/resume", s.id), "")
            .status(),
        200
    );
    assert_eq!(
        s.api
            .get(&format!("/v1/sandboxes/{}/ports/{HTTP_PORT}/", s.id))
            .status(),
        200
    );
    // A deleted sandbox's token opens nothing.
    assert_eq!(
        s.api.delete(&format!("/v1/sandboxes/{}", s.id)).status(),
        204
    );
    let res = s
        .anonymous()
        .get(s.preview_url(HTTP_PORT, "/"))
        .header("x-openrun-token", &token)
        .send()
        .unwrap();
    error(res, 404, "not_found");
    assert_eq!(server_listeners(&host_listeners()), [api_port]);
}

/// From inside: a request to the egress proxy address, answered through the relay.
fn proxy_answer(api: &Api, id: &str) -> String {
    let script = "import socket\n\
        s = socket.create_connection(('127.0.0.1', 3128), timeout=10)\n\
        s.sendall(b'GET http://example.com/ HTTP/1.1\\r\\nHost: example.com\\r\\nConnection: close\\r\\n\\r\\n')\n\
        print(s.recv(200).decode(errors='replace').splitlines()[0])\n";
    let lines = api.exec(id, &format!("python3 -c \"{script}\" 2>&1"));
    stream(&lines, "stdout")
}

/// [`proxy_answer`] once the relay answers with HTTP, tried for up to 10 s (the relay's
/// supervisor starts just after a create or a server start); the last answer if it never does.
fn first_proxy_answer(api: &Api, id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut answer = proxy_answer(api, id);
    while !answer.starts_with("HTTP/1.1 ") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        answer = proxy_answer(api, id);
    }
    answer
}

#[test]
fn programs_inside_reach_the_egress_proxy_through_the_relay() {
    let env = Env::new();
    let key = key(&env, "egress-relay");
    let server = Server::start(&env);
    let api = Api::new(&server, &key);
    let id = api.create(json!({}))["id"].as_str().unwrap().to_string();
    // The supervisor starts right after the create: give it a moment.
    let answer = first_proxy_answer(&api, &id);
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    // Across a pause and a resume the relay keeps working.
    assert_eq!(
        api.post(&format!("/v1/sandboxes/{id}/pause"), "").status(),
        200
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        api.post(&format!("/v1/sandboxes/{id}/resume"), "").status(),
        200
    );
    assert!(proxy_answer(&api, &id).starts_with("HTTP/1.1 403"));
    // A restarted server relays again for the sandboxes it finds.
    server.stop();
    let server = Server::start(&env);
    let api = Api::new(&server, &key);
    let answer = first_proxy_answer(&api, &id);
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert_eq!(api.delete(&format!("/v1/sandboxes/{id}")).status(), 204);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
