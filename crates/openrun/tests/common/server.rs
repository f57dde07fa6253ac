//! An `openrun serve` child process and a small HTTP client for the server tests.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use reqwest::blocking::{Client, RequestBuilder, Response};
use serde_json::{json, Value};

use super::{assert_ok, stdout, Env};

/// A running `openrun serve`, killed when dropped.
pub struct Server {
    pub child: Child,
    pub url: String,
    pub _stdout: BufReader<ChildStdout>,
}

impl Server {
    pub fn start(env: &Env) -> Self {
        Self::start_with(env, &["--listen", "127.0.0.1:0"])
    }

    /// `openrun serve` without a warm pool: for tests that count every live sandbox as an API
    /// sandbox, or that time creates against the admission limits.
    pub fn start_cold(env: &Env) -> Self {
        Self::start_with(env, &["--listen", "127.0.0.1:0", "--warm-pool", "0"])
    }

    /// `openrun serve ARGS…`, once it prints its address.
    pub fn start_with(env: &Env, args: &[&str]) -> Self {
        let mut child = env
            .cmd(std::iter::once("serve").chain(args.iter().copied()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn openrun serve");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read the first line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("first line is not `listening on ADDR`: {line:?}"))
            .to_string();
        Self {
            child,
            url: format!("http://{addr}"),
            _stdout: stdout,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGTERM, then asserts a clean exit within 10 s.
    pub fn stop(mut self) {
        let pid = rustix::process::Pid::from_raw(self.pid()).expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "serve exited with {status:?} on SIGTERM");
                return;
            }
            assert!(Instant::now() < deadline, "serve ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `openrun key create --name NAME`, returning the printed key.
pub fn key(env: &Env, name: &str) -> String {
    let out = env.output(["key", "create", "--name", name]);
    assert_ok(&out);
    let key = stdout(&out).trim().to_string();
    assert!(key.starts_with("or_") && key.len() == 67, "{key:?}");
    key
}

pub struct Api {
    pub http: Client,
    pub url: String,
    pub key: String,
}

impl Api {
    pub fn new(server: &Server, key: &str) -> Self {
        Self {
            http: Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("http client"),
            url: server.url.clone(),
            key: key.to_string(),
        }
    }

    pub fn req(&self, method: reqwest::Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.key)
    }

    pub fn get(&self, path: &str) -> Response {
        self.req(reqwest::Method::GET, path).send().expect("GET")
    }

    pub fn post(&self, path: &str, body: &str) -> Response {
        self.req(reqwest::Method::POST, path)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .expect("POST")
    }

    pub fn delete(&self, path: &str) -> Response {
        self.req(reqwest::Method::DELETE, path)
            .send()
            .expect("DELETE")
    }

    pub fn create(&self, body: Value) -> Value {
        let res = self.post("/v1/sandboxes", &body.to_string());
        assert_eq!(res.status(), 201);
        res.json().expect("sandbox resource")
    }

    /// Runs `sh -c script`; returns every NDJSON line.
    pub fn exec(&self, id: &str, script: &str) -> Vec<Value> {
        let res = self.post(
            &format!("/v1/sandboxes/{id}/exec"),
            &json!({ "cmd": ["sh", "-c", script] }).to_string(),
        );
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.headers()["content-type"].to_str().unwrap(),
            "application/x-ndjson"
        );
        ndjson(&res.text().expect("body"))
    }

    pub fn ids(&self) -> Vec<String> {
        let res = self.get("/v1/sandboxes");
        assert_eq!(res.status(), 200);
        let list: Vec<Value> = res.json().expect("list");
        list.iter()
            .map(|s| s["id"].as_str().expect("id").to_string())
            .collect()
    }

    pub fn event_kinds(&self, id: &str) -> Vec<String> {
        let res = self.get(&format!("/v1/sandboxes/{id}/events"));
        assert_eq!(res.status(), 200);
        let events: Vec<Value> = res.json().expect("events");
        events
            .iter()
            .map(|e| e["kind"].as_str().expect("kind").to_string())
            .collect()
    }
}

pub fn ndjson(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

/// Concatenated bytes of one stream, checking that offsets are contiguous.
pub fn stream(lines: &[Value], kind: &str) -> String {
    let mut out = Vec::new();
    for line in lines.iter().filter(|l| l["type"] == kind) {
        assert_eq!(line["offset"].as_u64(), Some(out.len() as u64), "{line}");
        let data = line["data_b64"].as_str().expect("data_b64");
        out.extend(
            base64::engine::general_purpose::STANDARD
                .decode(data)
                .expect("base64"),
        );
    }
    String::from_utf8(out).expect("utf-8")
}

pub fn exit_line(lines: &[Value]) -> &Value {
    let last = lines.last().expect("no lines");
    assert_eq!(last["type"], "exit", "{lines:?}");
    last
}

/// Asserts `res` is an error with `status` and `code`; returns its message.
pub fn error(res: Response, status: u16, code: &str) -> String {
    assert_eq!(res.status(), status);
    let body: Value = res.json().expect("JSON error body");
    assert_eq!(body["code"], code, "{body}");
    body["message"].as_str().expect("message").to_string()
}

/// Zombie children of `pid`.
pub fn zombies_of(pid: i32) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let fields: Vec<_> = rest.split_whitespace().collect();
        if fields.first() == Some(&"Z") && fields.get(1) == Some(&pid.to_string().as_str()) {
            found.push(stat);
        }
    }
    found
}

impl Api {
    pub fn put(&self, path: &str, body: Vec<u8>) -> Response {
        self.req(reqwest::Method::PUT, path)
            .body(body)
            .send()
            .expect("PUT")
    }

    /// Starts `cmd` in the background; returns its pid.
    pub fn background(&self, id: &str, body: Value) -> i64 {
        let res = self.post(&format!("/v1/sandboxes/{id}/exec"), &body.to_string());
        assert_eq!(res.status(), 201);
        res.json::<Value>().unwrap()["pid"].as_i64().expect("pid")
    }

    /// Polls a process until it has exited; returns its status entry.
    pub fn wait_exited(&self, id: &str, pid: i64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let res = self.get(&format!("/v1/sandboxes/{id}/processes/{pid}"));
            assert_eq!(res.status(), 200);
            let info: Value = res.json().unwrap();
            if info["state"] == "exited" {
                return info;
            }
            assert!(Instant::now() < deadline, "still running: {info}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Bytes of one stream whose first chunk starts at `start`, checking contiguous offsets.
pub fn bytes_from(lines: &[Value], kind: &str, start: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for line in lines.iter().filter(|l| l["type"] == kind) {
        assert_eq!(
            line["offset"].as_u64(),
            Some(start + out.len() as u64),
            "{line}"
        );
        out.extend(
            base64::engine::general_purpose::STANDARD
                .decode(line["data_b64"].as_str().expect("data_b64"))
                .expect("base64"),
        );
    }
    out
}

pub fn enc(path: &str) -> String {
    path.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
