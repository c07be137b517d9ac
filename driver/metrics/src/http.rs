//! The plain-HTTP endpoint of a process's `--metrics-listen`: `GET /metrics` answers what
//! its [`Source`] encodes, `GET /healthz` answers 200 once the source is ready and 503 with
//! the reason before; any other path is 404. It stops accepting, and closes its connections,
//! on the shutdown signal the caller passes (the one that stops the process's servers).

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ACCEPT, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::Format;

/// What an endpoint serves.
pub trait Source: Send + Sync + 'static {
    /// Encodes every metric in `format`. Runs on a blocking thread: collectors may read
    /// files or run commands.
    fn encode(&self, format: Format) -> Result<String, fmt::Error>;

    /// `None` once the process is ready; before, why not (one line for `/healthz`).
    fn not_ready(&self) -> Option<String>;
}

const TEXT: &str = "text/plain; charset=utf-8";

/// How long a client may take to send its request head (a stalled client holds a task).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `addr` and serves `source`'s metrics and health on it until `stopped()` resolves.
/// The returned task ends when the listener is closed.
pub async fn start<S, F>(addr: SocketAddr, source: Arc<dyn Source>, stopped: S) -> std::io::Result<JoinHandle<()>>
where
    S: Fn() -> F + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(address = %local, "serving /metrics and /healthz");
    Ok(tokio::spawn(async move {
        let stop = stopped();
        tokio::pin!(stop);
        loop {
            let stream = tokio::select! {
                () = &mut stop => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _peer)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: pause instead of spinning.
                        tracing::warn!("metrics endpoint: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let source = Arc::clone(&source);
            let service = service_fn(move |req| answer(req, Arc::clone(&source)));
            let conn_stop = stopped();
            tokio::spawn(async move {
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::pin!(conn);
                let result = tokio::select! {
                    r = conn.as_mut() => r,
                    () = conn_stop => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(e) = result {
                    tracing::debug!("metrics endpoint: connection ended: {e}");
                }
            });
        }
        tracing::debug!("metrics endpoint stopped");
    }))
}

fn response(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

async fn answer(req: Request<Incoming>, source: Arc<dyn Source>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    if path != "/metrics" && path != "/healthz" {
        return Ok(response(StatusCode::NOT_FOUND, TEXT, "not found: this endpoint serves /metrics and /healthz\n"));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = response(StatusCode::METHOD_NOT_ALLOWED, TEXT, "only GET and HEAD\n");
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    if path == "/healthz" {
        return Ok(match source.not_ready() {
            None => response(StatusCode::OK, TEXT, "ok\n"),
            Some(why) => response(StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("not ready: {why}\n")),
        });
    }
    let format = Format::negotiate(req.headers().get(ACCEPT).and_then(|a| a.to_str().ok()));
    // Collectors may read files or run commands: blocking work, off the async workers.
    Ok(match tokio::task::spawn_blocking(move || source.encode(format)).await {
        Ok(Ok(text)) => response(StatusCode::OK, format.content_type(), text),
        Ok(Err(e)) => {
            tracing::warn!("metrics endpoint: encoding failed: {e}");
            response(StatusCode::INTERNAL_SERVER_ERROR, TEXT, "encoding the metrics failed\n")
        }
        Err(e) => {
            tracing::warn!("metrics endpoint: the encoding task failed: {e}");
            response(StatusCode::INTERNAL_SERVER_ERROR, TEXT, "encoding the metrics failed\n")
        }
    })
}
