//! The HTTP and WebSocket client of the server's API: bearer key on every request, the
//! server's `{"code","message"}` errors as [`ApiError`], NDJSON streams line by line.

use anyhow::{Context, Result};
use reqwest::{Method, RequestBuilder, Response, Url};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio_tungstenite::tungstenite;

use super::config::{is_loopback, Target};

/// Longest NDJSON line accepted from the server (exec lines carry at most 64 KiB of base64).
const MAX_LINE: usize = 16 << 20;

/// An error answer of the server: shown as `message (code)`.
#[derive(Debug, thiserror::Error)]
#[error("{message} ({code})")]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// The server's stable code, e.g. `not_found`.
    pub code: String,
    /// The server's message.
    pub message: String,
}

impl ApiError {
    /// The error of a non-2xx answer's body: the server's JSON, or the status and the text.
    fn from_body(status: u16, body: &[u8]) -> Self {
        #[derive(serde::Deserialize)]
        struct Body {
            code: String,
            message: String,
        }
        match serde_json::from_slice::<Body>(body) {
            Ok(b) => ApiError {
                status,
                code: b.code,
                message: b.message,
            },
            Err(_) => {
                let text = String::from_utf8_lossy(body);
                let text: String = text.trim().chars().take(200).collect();
                ApiError {
                    status,
                    code: format!("http_{status}"),
                    message: if text.is_empty() {
                        format!("the server answered {status}")
                    } else {
                        text
                    },
                }
            }
        }
    }
}

/// Whether `err` is the server's answer with this `code`.
pub fn has_code(err: &anyhow::Error, code: &str) -> bool {
    err.downcast_ref::<ApiError>()
        .is_some_and(|e| e.code == code)
}

/// A connection to one server.
pub struct Client {
    http: reqwest::Client,
    base: Url,
    key: Option<String>,
}

impl Client {
    /// A client for `target` (no request is sent yet). Requests go straight to the server:
    /// never through a proxy of the environment (`HTTP_PROXY`, which would get the key, and
    /// which the WebSocket verbs do not use either), never following a redirect elsewhere.
    /// A key for a server that is not this machine is sent in clear text (the client speaks
    /// plain HTTP only): that is said on stderr, once.
    pub fn new(target: Target) -> Result<Self> {
        if let Some(warning) = cleartext_warning(&target) {
            eprintln!("openrun: warning: {warning}");
        }
        let http = Target::client_builder()
            .build()
            .context("cannot set up the HTTP client")?;
        Ok(Self {
            http,
            base: target.url,
            key: target.api_key,
        })
    }

    /// The full URL of an API path (`/v1/...`).
    fn url(&self, path: &str) -> Result<Url> {
        self.base
            .join(path)
            .with_context(|| format!("invalid request path {path:?}"))
    }

    /// A request with the key.
    pub fn request(&self, method: Method, path: &str) -> Result<RequestBuilder> {
        let req = self.http.request(method, self.url(path)?);
        Ok(match &self.key {
            Some(key) => req.bearer_auth(key),
            None => req,
        })
    }

    /// Sends; a non-2xx answer becomes its [`ApiError`].
    pub async fn send(&self, req: RequestBuilder) -> Result<Response> {
        let res = req
            .send()
            .await
            .with_context(|| format!("cannot reach the server at {}", self.base))?;
        let status = res.status();
        if status.is_success() {
            return Ok(res);
        }
        let body = res.bytes().await.unwrap_or_default();
        let mut error = ApiError::from_body(status.as_u16(), &body);
        if status == reqwest::StatusCode::UNAUTHORIZED && self.key.is_none() {
            error.message.push_str(
                "; no API key was given: use --api-key, OPENRUN_API_KEY or the config file",
            );
        }
        Err(error.into())
    }

    /// A request whose answer is JSON.
    pub async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T> {
        let mut req = self.request(method, path)?;
        if let Some(body) = body {
            req = req.json(body);
        }
        let res = self.send(req).await?;
        res.json()
            .await
            .with_context(|| format!("the server's answer to {path} is not the expected JSON"))
    }

    /// `GET path` as JSON.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.json(Method::GET, path, None).await
    }

    /// A request whose answer is an NDJSON stream.
    pub async fn lines(&self, req: RequestBuilder) -> Result<Lines> {
        Ok(Lines::new(self.send(req).await?))
    }

    /// Opens a WebSocket on an API path (with its query), authenticated like every request.
    pub async fn websocket(&self, path_and_query: &str) -> Result<WebSocket> {
        use tungstenite::client::IntoClientRequest;
        let mut url = self.url(path_and_query)?;
        url.set_scheme("ws")
            .map_err(|()| anyhow::anyhow!("cannot make a WebSocket address of {url}"))?;
        let mut request = url
            .as_str()
            .into_client_request()
            .context("invalid WebSocket request")?;
        if let Some(key) = &self.key {
            let value = format!("Bearer {key}")
                .parse()
                .context("the API key is not a valid header value")?;
            request.headers_mut().insert("authorization", value);
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok((socket, _)) => Ok(socket),
            Err(tungstenite::Error::Http(res)) => {
                let body = res.body().as_deref().unwrap_or_default();
                Err(ApiError::from_body(res.status().as_u16(), body).into())
            }
            Err(e) => Err(e).with_context(|| format!("cannot reach the server at {}", self.base)),
        }
    }
}

/// What to say when `target`'s key would cross the network unencrypted (a server that is not
/// a loopback address; the client speaks plain HTTP only).
fn cleartext_warning(target: &Target) -> Option<String> {
    (target.api_key.is_some() && !is_loopback(&target.url)).then(|| {
        format!(
            "the API key is sent unencrypted to {} (plain HTTP to another machine): reach a \
             remote server through an SSH tunnel or a private network",
            target.url
        )
    })
}

/// A WebSocket to the server.
pub type WebSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// An NDJSON answer, one JSON value a line as it arrives.
pub struct Lines {
    res: Response,
    buf: Vec<u8>,
    done: bool,
}

impl Lines {
    fn new(res: Response) -> Self {
        Self {
            res,
            buf: Vec::new(),
            done: false,
        }
    }

    /// The next line's text (without its newline), or `None` at the end of the stream.
    pub async fn next_text(&mut self) -> Result<Option<String>> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let text = String::from_utf8(line[..end].to_vec())
                    .context("the server sent a line that is not UTF-8")?;
                if text.trim().is_empty() {
                    continue;
                }
                return Ok(Some(text));
            }
            if self.done {
                if self.buf.iter().all(u8::is_ascii_whitespace) {
                    return Ok(None);
                }
                let text = String::from_utf8(std::mem::take(&mut self.buf))
                    .context("the server sent a line that is not UTF-8")?;
                return Ok(Some(text));
            }
            match self
                .res
                .chunk()
                .await
                .context("lost the connection to the server")?
            {
                Some(chunk) => {
                    self.buf.extend_from_slice(&chunk);
                    anyhow::ensure!(
                        self.buf.len() <= MAX_LINE,
                        "the server sent a line over {MAX_LINE} bytes"
                    );
                }
                None => self.done = true,
            }
        }
    }
}

/// `/v1/sandboxes/{id}` + `rest`, with the id percent-encoded.
pub fn sandbox_path(id: &str, rest: &str) -> String {
    format!("/v1/sandboxes/{}{rest}", encode(id))
}

/// Percent-encodes a path segment or query value (everything but unreserved characters).
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_keep_code_and_message() {
        let e = ApiError::from_body(
            404,
            br#"{"code":"not_found","message":"no such sandbox: x"}"#,
        );
        assert_eq!(e.to_string(), "no such sandbox: x (not_found)");
        let e = ApiError::from_body(502, b"bad gateway\n");
        assert_eq!(e.to_string(), "bad gateway (http_502)");
        let e = ApiError::from_body(500, b"");
        assert_eq!(e.to_string(), "the server answered 500 (http_500)");
    }

    #[test]
    fn paths_are_encoded() {
        assert_eq!(
            sandbox_path("a/b?c", "/exec"),
            "/v1/sandboxes/a%2Fb%3Fc/exec"
        );
        assert_eq!(encode("/tmp/a b"), "%2Ftmp%2Fa%20b");
    }

    #[test]
    fn a_key_for_another_machine_is_warned_about() {
        let target = |url: &str, key: Option<&str>| Target {
            url: Url::parse(url).unwrap(),
            api_key: key.map(str::to_owned),
        };
        let warning = cleartext_warning(&target("http://10.0.0.1:7878", Some("or_secret")));
        let warning = warning.unwrap();
        assert!(warning.contains("http://10.0.0.1:7878/"), "{warning}");
        assert!(!warning.contains("or_secret"), "{warning}");
        assert_eq!(
            cleartext_warning(&target("http://10.0.0.1:7878", None)),
            None
        );
        assert_eq!(
            cleartext_warning(&target("http://127.0.0.1:7878", Some("k"))),
            None
        );
        assert_eq!(
            cleartext_warning(&target("http://localhost:7878", Some("k"))),
            None
        );
    }
}
