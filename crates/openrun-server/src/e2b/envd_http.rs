//! envd's plain HTTP, over the file core calls of [`crate::files`]:
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /health` | 204 while the sandbox's agent answers |
//! | `GET /files?path=[&username=]` | 200 the bytes (streamed in 16 MiB reads; gzip when asked); 404 `{code,message}` for a missing file |
//! | `POST /files[?path=][&username=]` multipart (one `file` part per file, its filename the destination) or octet-stream (`?path=` required, optional `Content-Encoding: gzip`) | 200 `[{"name","path","type":"file"}]` |
//!
//! Relative paths resolve against the run-as user's home, as in the Connect RPCs. Parent
//! directories are made; an existing file is replaced atomically: a body of up to 16 MiB in
//! one write, a larger one written to a temporary name beside it in 16 MiB appends (with the
//! replaced file's mode) and moved into place. Bodies are streamed, never held whole; a gzip
//! body is decoded a few MiB at a time ([`Gunzip`]); above [`MAX_UPLOAD`] (before or after
//! decoding) the answer is 413; a body that stops for [`UPLOAD_IDLE`] is cut off. An upload
//! that does not complete keeps the old file and removes its temporary one.

use std::io::Write;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use futures_util::StreamExt;
use openrun_protocol::MAX_DATA_LEN;

use super::connect::{Code, ConnectError};
use super::{sandbox_error, SandboxCtx};
use crate::api::Shared;
use crate::error::ApiError;
use crate::files;
use crate::query::Query;

/// Largest upload (all files of one request, after gzip decoding): 1 GiB.
pub(crate) const MAX_UPLOAD: u64 = 1 << 30;

/// Room for a multipart body's boundaries and part headers above [`MAX_UPLOAD`].
const MULTIPART_SLACK: u64 = 1 << 20;

/// Bytes per agent read or write (the agent's largest data frame).
const CHUNK: usize = MAX_DATA_LEN;

/// The routes of this module.
pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/health", get(health))
        .route(
            "/files",
            get(download)
                .post(upload)
                .layer(DefaultBodyLimit::disable()),
        )
        .route_layer(middleware::from_fn(super::e2b_errors))
}

/// `GET /health`: 204 while the sandbox's agent answers (502 "was not found" otherwise).
async fn health(State(s): State<Shared>, Extension(ctx): Extension<SandboxCtx>) -> Response {
    match files::stat_path(&s, &ctx.caller, &ctx.sandbox_id, "/".into()).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => sandbox_error(&ctx, e),
    }
}

/// The run-as user of a request: `?username=`, else `Authorization: Basic`.
fn user_of(query: &Query, ctx: &SandboxCtx) -> Option<String> {
    query
        .string("username")
        .filter(|u| !u.is_empty())
        .or_else(|| ctx.user.clone())
}

/// `path` made absolute for the run-as `user` (a relative one is taken from the user's home),
/// as the Connect RPCs do ([`super::filesystem::resolve_path`]).
async fn resolve_path(
    s: &Shared,
    ctx: &SandboxCtx,
    user: Option<&str>,
    path: &str,
) -> Result<String, ApiError> {
    let mut ctx = ctx.clone();
    if let Some(user) = user {
        ctx.user = Some(user.to_string());
    }
    super::filesystem::resolve_path(s, &ctx, path)
        .await
        .map_err(|e: ConnectError| match e.code {
            Code::InvalidArgument => ApiError::InvalidArgument(e.message),
            Code::Unavailable | Code::NotFound => ApiError::NotRunning(ctx.sandbox_id.clone()),
            _ => ApiError::internal("cannot resolve the path", e.message),
        })
}

/// Whether the client accepts a gzip answer.
fn wants_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .is_some_and(|q| q.trim().parse::<f32>().is_ok_and(|q| q == 0.0))
            });
            name.eq_ignore_ascii_case("gzip") && !refused
        })
}

/// Compresses a stream of chunks as one gzip member.
struct Gzip(Option<flate2::write::GzEncoder<Vec<u8>>>);

impl Gzip {
    fn new() -> Self {
        Self(Some(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        )))
    }

    /// The compressed bytes of `data` so far.
    fn push(&mut self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        match &mut self.0 {
            Some(encoder) => {
                encoder.write_all(data)?;
                Ok(std::mem::take(encoder.get_mut()))
            }
            None => Ok(Vec::new()),
        }
    }

    /// The rest of the stream (its trailer).
    fn finish(&mut self) -> std::io::Result<Vec<u8>> {
        match self.0.take() {
            Some(encoder) => encoder.finish(),
            None => Ok(Vec::new()),
        }
    }
}

/// `GET /files?path=`: the file's bytes.
async fn download(
    State(s): State<Shared>,
    Extension(ctx): Extension<SandboxCtx>,
    headers: HeaderMap,
    query: Result<Query, ApiError>,
) -> Response {
    match download_inner(&s, &ctx, &headers, query).await {
        Ok(response) => response,
        Err(e) => sandbox_error(&ctx, e),
    }
}

async fn download_inner(
    s: &Shared,
    ctx: &SandboxCtx,
    headers: &HeaderMap,
    query: Result<Query, ApiError>,
) -> Result<Response, ApiError> {
    let query = query?;
    query.only(&["path", "username", "signature", "signature_expiration"])?;
    let path = query
        .string("path")
        .ok_or_else(|| ApiError::InvalidArgument("query parameter \"path\" is required".into()))?;
    let user = user_of(&query, ctx);
    let path = resolve_path(s, ctx, user.as_deref(), &path).await?;
    let first = files::read_file(
        s,
        &ctx.caller,
        &ctx.sandbox_id,
        path.clone(),
        0,
        Some(CHUNK as u64),
    )
    .await?;
    let gzip = wants_gzip(headers);
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream");
    if gzip {
        builder = builder.header(header::CONTENT_ENCODING, "gzip");
    }
    let size = first.size;
    let whole = first.data.len() as u64 >= size;
    if whole && !gzip {
        builder = builder.header(header::CONTENT_LENGTH, first.data.len());
        return builder
            .body(Body::from(first.data))
            .map_err(|e| ApiError::internal("cannot answer", e));
    }
    // Read on in chunks while the client takes them (a client that leaves drops the stream).
    struct Reader {
        s: Shared,
        ctx: SandboxCtx,
        path: String,
        offset: u64,
        size: u64,
        pending: Option<Vec<u8>>,
        gzip: Option<Gzip>,
        done: bool,
    }
    let reader = Reader {
        s: s.clone(),
        ctx: ctx.clone(),
        path,
        offset: first.data.len() as u64,
        size,
        pending: Some(first.data),
        gzip: gzip.then(Gzip::new),
        done: false,
    };
    let stream = futures_util::stream::unfold(reader, |mut r| async move {
        if r.done {
            return None;
        }
        let data = match r.pending.take() {
            Some(data) => data,
            None if r.offset >= r.size => Vec::new(),
            None => match files::read_file(
                &r.s,
                &r.ctx.caller,
                &r.ctx.sandbox_id,
                r.path.clone(),
                r.offset,
                Some(CHUNK as u64),
            )
            .await
            {
                Ok(chunk) => {
                    r.offset += chunk.data.len() as u64;
                    if chunk.data.is_empty() {
                        // The file shrank meanwhile: what there was is sent.
                        r.size = r.offset;
                    }
                    chunk.data
                }
                Err(e) => {
                    tracing::warn!(id = r.ctx.sandbox_id, error = %e, "a file download broke off");
                    r.done = true;
                    return Some((Err(std::io::Error::other(e.to_string())), r));
                }
            },
        };
        let last = data.is_empty() || r.offset >= r.size;
        let out = match &mut r.gzip {
            None => Ok(data),
            Some(gz) => gz.push(&data).and_then(|mut out| {
                if last {
                    out.extend(gz.finish()?);
                }
                Ok(out)
            }),
        };
        r.done = last;
        Some((out.map(Bytes::from), r))
    });
    builder
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::internal("cannot answer", e))
}

/// One file being uploaded to `dest` in [`CHUNK`] writes: a body that fits in one write
/// replaces the file at once (the agent keeps an existing file's mode and owner); a larger
/// one goes to a temporary name beside it, with the existing file's mode, moved into place at
/// the end (its owner becomes the agent's: there is no core call to give a file away). An
/// upload dropped before [`Upload::finish`] or [`Upload::abort`] (its client left, the
/// handler was dropped) removes its temporary file in a task of its own.
struct Upload {
    s: Shared,
    ctx: SandboxCtx,
    dest: String,
    buf: Vec<u8>,
    tmp: Option<String>,
    /// Mode of the temporary file: the existing destination's, if it is a regular file.
    mode: Option<u32>,
}

impl Upload {
    fn new(s: &Shared, ctx: &SandboxCtx, dest: String) -> Self {
        Self {
            s: s.clone(),
            ctx: ctx.clone(),
            dest,
            buf: Vec::new(),
            tmp: None,
            mode: None,
        }
    }

    /// Takes `data`, writing whole chunks out.
    async fn push(&mut self, mut data: &[u8]) -> Result<(), ApiError> {
        while !data.is_empty() {
            let take = (CHUNK - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == CHUNK {
                let chunk = std::mem::take(&mut self.buf);
                self.write_chunk(chunk).await?;
            }
        }
        Ok(())
    }

    /// Appends one chunk to the temporary file (made by the first, with the mode of the file
    /// it replaces).
    async fn write_chunk(&mut self, chunk: Vec<u8>) -> Result<(), ApiError> {
        let (tmp, append) = match &self.tmp {
            Some(tmp) => (tmp.clone(), true),
            None => {
                self.mode = match files::stat_path(
                    &self.s,
                    &self.ctx.caller,
                    &self.ctx.sandbox_id,
                    self.dest.clone(),
                )
                .await
                {
                    Ok(st) if st.kind == openrun_protocol::FileKind::File => Some(st.mode),
                    _ => None,
                };
                let tmp = temporary_name(&self.dest);
                self.tmp = Some(tmp.clone());
                (tmp, false)
            }
        };
        let mode = if append { None } else { self.mode };
        files::write_file(
            &self.s,
            &self.ctx.caller,
            &self.ctx.sandbox_id,
            tmp,
            chunk,
            mode,
            true,
            append,
        )
        .await
    }

    /// Puts the file in place.
    async fn finish(mut self) -> Result<(), ApiError> {
        let Some(tmp) = self.tmp.clone() else {
            let data = std::mem::take(&mut self.buf);
            return files::write_file(
                &self.s,
                &self.ctx.caller,
                &self.ctx.sandbox_id,
                self.dest.clone(),
                data,
                None,
                true,
                false,
            )
            .await;
        };
        let result = async {
            if !self.buf.is_empty() {
                let data = std::mem::take(&mut self.buf);
                files::write_file(
                    &self.s,
                    &self.ctx.caller,
                    &self.ctx.sandbox_id,
                    tmp.clone(),
                    data,
                    None,
                    false,
                    true,
                )
                .await?;
            }
            files::move_path(
                &self.s,
                &self.ctx.caller,
                &self.ctx.sandbox_id,
                tmp.clone(),
                self.dest.clone(),
            )
            .await
        }
        .await;
        match result {
            Ok(()) => self.tmp = None,
            Err(_) => self.abort().await,
        }
        result
    }

    /// Removes the temporary file of an upload that failed.
    async fn abort(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            remove_temporary(&self.s, &self.ctx, tmp).await;
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let (s, ctx) = (self.s.clone(), self.ctx.clone());
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { remove_temporary(&s, &ctx, tmp).await });
            }
        }
    }
}

/// Removes the temporary file `tmp` of an upload that did not finish.
async fn remove_temporary(s: &Shared, ctx: &SandboxCtx, tmp: String) {
    if let Err(e) = files::remove_path(s, &ctx.caller, &ctx.sandbox_id, tmp.clone(), false).await {
        tracing::warn!(id = ctx.sandbox_id, tmp, error = %e, "cannot remove a failed upload");
    }
}

/// Bytes of a gzip body decoded at a time: the output of one step is at most about a
/// thousand times that (deflate's largest ratio), so a small body that inflates hugely is
/// decoded a few MiB at a time, written out and counted against [`MAX_UPLOAD`] as it goes.
const GZIP_STEP: usize = 4096;

/// Decodes a gzip body in bounded steps.
struct Gunzip(flate2::write::GzDecoder<Vec<u8>>);

impl Gunzip {
    fn new() -> Self {
        Self(flate2::write::GzDecoder::new(Vec::new()))
    }

    /// Decodes at most [`GZIP_STEP`] bytes of `input`: how many were taken, and what they
    /// decoded to.
    fn step(&mut self, input: &[u8]) -> std::io::Result<(usize, Vec<u8>)> {
        let n = input.len().min(GZIP_STEP);
        self.0.write_all(&input[..n])?;
        Ok((n, std::mem::take(self.0.get_mut())))
    }

    /// The end of the stream: an error when it is cut short (no complete trailer).
    fn finish(self) -> std::io::Result<Vec<u8>> {
        self.0.finish()
    }
}

/// How long an upload may go without a byte of its body before it is cut off (its temporary
/// file removed, the old file kept).
const UPLOAD_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// The next item of an upload's body, unless none comes within `idle`.
async fn within<T>(
    idle: std::time::Duration,
    next: impl std::future::Future<Output = T>,
) -> Result<T, ApiError> {
    tokio::time::timeout(idle, next).await.map_err(|_| {
        ApiError::InvalidArgument(format!(
            "the upload stalled: no data for {} s, it was cut off",
            idle.as_secs()
        ))
    })
}

/// A temporary name beside `dest` (same directory, so the final move is a rename).
fn temporary_name(dest: &str) -> String {
    let (dir, name) = dest.rsplit_once('/').unwrap_or(("", dest));
    format!(
        "{dir}/.{name}.openrun-upload-{}",
        openrun_runtime::state::new_id()
    )
}

/// Counts bytes against [`MAX_UPLOAD`].
fn count(total: &mut u64, n: usize) -> Result<(), ApiError> {
    *total = total.saturating_add(n as u64);
    if *total > MAX_UPLOAD {
        return Err(ApiError::TooLarge {
            limit: MAX_UPLOAD as usize,
        });
    }
    Ok(())
}

/// An entry of the upload answer.
#[derive(Debug, serde::Serialize)]
struct WriteInfo {
    name: String,
    path: String,
    #[serde(rename = "type")]
    kind: &'static str,
}

impl WriteInfo {
    fn new(path: String) -> Self {
        let name = path.rsplit('/').next().unwrap_or(&path).to_string();
        Self {
            name,
            path,
            kind: "file",
        }
    }
}

/// `POST /files`: writes the files of a multipart or octet-stream body.
async fn upload(
    State(s): State<Shared>,
    Extension(ctx): Extension<SandboxCtx>,
    req: Request,
) -> Response {
    match upload_inner(&s, &ctx, req).await {
        Ok(written) => Json(written).into_response(),
        Err(e) => sandbox_error(&ctx, e),
    }
}

async fn upload_inner(
    s: &Shared,
    ctx: &SandboxCtx,
    req: Request,
) -> Result<Vec<WriteInfo>, ApiError> {
    let query = Query::parse(req.uri().query().unwrap_or(""))?;
    query.only(&["path", "username", "signature", "signature_expiration"])?;
    // A body announced too large is refused before anything is written (a chunked one is
    // counted as it comes).
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_UPLOAD + MULTIPART_SLACK) {
        return Err(ApiError::TooLarge {
            limit: MAX_UPLOAD as usize,
        });
    }
    let user = user_of(&query, ctx);
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if content_type.starts_with("multipart/form-data") {
        return upload_multipart(s, ctx, req, query.string("path"), user).await;
    }
    if !(content_type.is_empty() || content_type.starts_with("application/octet-stream")) {
        return Err(ApiError::InvalidArgument(format!(
            "unsupported Content-Type {content_type:?}: send multipart/form-data or \
             application/octet-stream"
        )));
    }
    let path = query.string("path").ok_or_else(|| {
        ApiError::InvalidArgument(
            "query parameter \"path\" is required for an application/octet-stream upload".into(),
        )
    })?;
    let gzip = match req
        .headers()
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase())
    {
        None => false,
        Some(e) if e == "identity" => false,
        Some(e) if e == "gzip" => true,
        Some(other) => {
            return Err(ApiError::InvalidArgument(format!(
                "unsupported Content-Encoding {other:?}: gzip or identity"
            )))
        }
    };
    let dest = resolve_path(s, ctx, user.as_deref(), &path).await?;
    let mut upload = Upload::new(s, ctx, dest.clone());
    let mut decoder = gzip.then(Gunzip::new);
    let (mut received, mut total) = (0u64, 0u64);
    let mut body = req.into_body().into_data_stream();
    let result = async {
        while let Some(chunk) = within(UPLOAD_IDLE, body.next()).await? {
            let chunk = chunk.map_err(|e| {
                ApiError::InvalidArgument(format!("cannot read the request body: {e}"))
            })?;
            count(&mut received, chunk.len())?;
            let Some(d) = &mut decoder else {
                count(&mut total, chunk.len())?;
                upload.push(&chunk).await?;
                continue;
            };
            let mut rest = &chunk[..];
            while !rest.is_empty() {
                let (taken, data) = d.step(rest).map_err(bad_gzip)?;
                rest = &rest[taken..];
                count(&mut total, data.len())?;
                upload.push(&data).await?;
            }
        }
        if let Some(d) = decoder.take() {
            let rest = d.finish().map_err(bad_gzip)?;
            count(&mut total, rest.len())?;
            upload.push(&rest).await?;
        }
        Ok::<_, ApiError>(())
    }
    .await;
    if let Err(e) = result {
        upload.abort().await;
        return Err(e);
    }
    upload.finish().await?;
    Ok(vec![WriteInfo::new(dest)])
}

fn bad_gzip(e: std::io::Error) -> ApiError {
    ApiError::InvalidArgument(format!("the gzip body does not decode: {e}"))
}

/// The files of a multipart body: each part named `file`, its filename the destination
/// (taken as sent, not sanitised); with one part, `?path=` wins when given.
async fn upload_multipart(
    s: &Shared,
    ctx: &SandboxCtx,
    req: Request,
    path: Option<String>,
    user: Option<String>,
) -> Result<Vec<WriteInfo>, ApiError> {
    let mut multipart = Multipart::from_request(req, &()).await.map_err(|e| {
        ApiError::InvalidArgument(format!("invalid multipart body: {}", e.body_text()))
    })?;
    let bad = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge {
                limit: MAX_UPLOAD as usize,
            }
        } else {
            ApiError::InvalidArgument(format!("invalid multipart body: {}", e.body_text()))
        }
    };
    let mut written = Vec::new();
    let mut total = 0u64;
    let mut first = true;
    while let Some(mut field) = within(UPLOAD_IDLE, multipart.next_field())
        .await?
        .map_err(bad)?
    {
        if field.name() != Some("file") {
            return Err(ApiError::InvalidArgument(format!(
                "unexpected multipart part {:?}: each file is a part named \"file\"",
                field.name().unwrap_or("")
            )));
        }
        let target = match (first, &path) {
            (true, Some(path)) => path.clone(),
            _ => field
                .file_name()
                .filter(|f| !f.is_empty())
                .map(str::to_string)
                .ok_or_else(|| {
                    ApiError::InvalidArgument(
                        "a multipart file part needs a filename (its destination path)".into(),
                    )
                })?,
        };
        first = false;
        let dest = resolve_path(s, ctx, user.as_deref(), &target).await?;
        let mut upload = Upload::new(s, ctx, dest.clone());
        let result = async {
            while let Some(chunk) = within(UPLOAD_IDLE, field.chunk()).await?.map_err(bad)? {
                count(&mut total, chunk.len())?;
                upload.push(&chunk).await?;
            }
            Ok::<_, ApiError>(())
        }
        .await;
        if let Err(e) = result {
            upload.abort().await;
            return Err(e);
        }
        upload.finish().await?;
        written.push(WriteInfo::new(dest));
    }
    if written.is_empty() {
        return Err(ApiError::InvalidArgument(
            "the multipart body has no file part".into(),
        ));
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn gzip_is_asked_for_by_accept_encoding() {
        let mut h = HeaderMap::new();
        assert!(!wants_gzip(&h));
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        assert!(wants_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("br, GZIP;q=0.5"),
        );
        assert!(wants_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip;q=0, br"),
        );
        assert!(!wants_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        assert!(!wants_gzip(&h));
    }

    #[test]
    fn streamed_gzip_decodes_to_the_input() {
        let mut gz = Gzip::new();
        let mut out = gz.push(b"hello ").unwrap();
        out.extend(gz.push(b"world").unwrap());
        out.extend(gz.finish().unwrap());
        let mut text = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&out[..]), &mut text)
            .unwrap();
        assert_eq!(text, "hello world");
    }

    #[test]
    fn a_gzip_bomb_is_decoded_a_little_at_a_time() {
        // 64 MiB of zeros in about 64 KiB: one step never decodes more than a few MiB.
        let mut packer = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        for _ in 0..64 {
            packer.write_all(&vec![0u8; 1 << 20]).unwrap();
        }
        let bomb = packer.finish().unwrap();
        let mut gz = Gunzip::new();
        let (mut rest, mut total, mut largest) = (&bomb[..], 0usize, 0usize);
        while !rest.is_empty() {
            let (taken, out) = gz.step(rest).unwrap();
            assert!(taken > 0 && taken <= GZIP_STEP);
            rest = &rest[taken..];
            total += out.len();
            largest = largest.max(out.len());
        }
        total += gz.finish().unwrap().len();
        assert_eq!(total, 64 << 20);
        assert!(
            largest <= GZIP_STEP * 1100,
            "one step decoded {largest} bytes"
        );
    }

    #[test]
    fn a_cut_gzip_body_does_not_decode() {
        let mut packer = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        packer.write_all(b"some text that is long enough").unwrap();
        let whole = packer.finish().unwrap();
        let mut gz = Gunzip::new();
        let (taken, _) = gz.step(&whole[..whole.len() - 6]).unwrap();
        assert_eq!(taken, whole.len() - 6);
        assert!(
            gz.finish().is_err(),
            "a gzip body without its trailer is refused"
        );
    }

    #[tokio::test]
    async fn a_stalled_body_is_cut_off() {
        let idle = std::time::Duration::from_millis(20);
        let err = within(idle, std::future::pending::<()>())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("stalled"), "{err}");
        assert_eq!(within(idle, async { 7 }).await.unwrap(), 7);
    }

    #[test]
    fn uploads_are_counted_against_the_limit() {
        let mut total = 0;
        assert!(count(&mut total, 10).is_ok());
        total = MAX_UPLOAD - 10;
        assert!(count(&mut total, 10).is_ok());
        let err = count(&mut total, 1).unwrap_err();
        assert!(matches!(err, ApiError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn temporary_names_sit_beside_the_destination() {
        let tmp = temporary_name("/home/u/data.bin");
        assert!(
            tmp.starts_with("/home/u/.data.bin.openrun-upload-"),
            "{tmp}"
        );
        assert_eq!(WriteInfo::new("/a/b.txt".into()).name, "b.txt");
    }
}
