//! The plain-HTTP endpoint of `--metrics-listen`: `GET /metrics` answers the process's
//! Prometheus metrics (ferrovol_node::metrics), `GET /healthz` answers 200 once the process
//! is ready (the flag Probe reports) and 503 before; any other path is 404. It stops
//! accepting, and closes its connections, on the shutdown signal that stops the gRPC servers.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferrovol_node::metrics::{Format, Metrics};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ACCEPT, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const TEXT: &str = "text/plain; charset=utf-8";

/// How long a client may take to send its request head (a stalled client holds a task).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `addr` and serves `metrics` and the health check on it until `stopped()` resolves.
/// The returned task ends when the listener is closed.
pub async fn start<S, F>(
    addr: SocketAddr,
    metrics: Metrics,
    ready: Arc<AtomicBool>,
    stopped: S,
) -> std::io::Result<JoinHandle<()>>
where
    S: Fn() -> F + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(address = %local, "serving /metrics and /healthz");
    let metrics = Arc::new(metrics);
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
            let (metrics, ready) = (Arc::clone(&metrics), Arc::clone(&ready));
            let service = service_fn(move |req| answer(req, Arc::clone(&metrics), Arc::clone(&ready)));
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

async fn answer(
    req: Request<Incoming>,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
) -> Result<Response<Full<Bytes>>, Infallible> {
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
        return Ok(if ready.load(Ordering::Acquire) {
            response(StatusCode::OK, TEXT, "ok\n")
        } else {
            response(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                "not ready: the start-up reconcile of this node's volumes is still running\n",
            )
        });
    }
    let format = Format::negotiate(req.headers().get(ACCEPT).and_then(|a| a.to_str().ok()));
    // The collectors read the data dir and maybe LVM: blocking work, off the async workers.
    Ok(match tokio::task::spawn_blocking(move || metrics.encode(format)).await {
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
