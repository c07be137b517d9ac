//! Prometheus metrics of every S3 call a process makes: an SDK interceptor ([`Metered`]),
//! installed by [`crate::build_client`] on every client, counts each call by operation and
//! outcome, times it, counts its retries and the body bytes it sent and received. The
//! driver (the controller's bucket work) and the mounter (the data path) both serve them.
//!
//! Labels name S3 operations (GetObject, PutObject, ...) and outcomes, never buckets,
//! keys or volumes: a series per object would grow without bound.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Instant;

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeSerializationInterceptorContextRef, BeforeTransmitInterceptorContextRef, FinalizerInterceptorContextRef,
};
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::{ConfigBag, Storable, StoreReplace};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Upper bounds, in seconds, of the call latency buckets: from 1 ms (a HeadObject on a
/// near server) to 60 s (a server-side copy of a large object).
pub const BUCKETS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpOutcome {
    op: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Op {
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpDirection {
    op: String,
    direction: &'static str,
}

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// Counts, latencies, retries and bytes of S3 calls. Clones share their values.
#[derive(Debug, Clone)]
pub struct S3Metrics {
    requests: Family<OpOutcome, Counter>,
    duration: Family<Op, Histogram, fn() -> Histogram>,
    retries: Family<Op, Counter>,
    bytes: Family<OpDirection, Counter>,
}

impl Default for S3Metrics {
    fn default() -> Self {
        S3Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(histogram),
            retries: Family::default(),
            bytes: Family::default(),
        }
    }
}

/// How a call ended, as the `outcome` label says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The server answered with this HTTP status (2xx is success, anything else a refusal).
    Status(u16),
    /// The call ran out of its time bound (a timeout of an attempt or the whole call).
    Timeout,
    /// No answer: the connection could not be made or broke.
    Connection,
    /// The caller gave up on the call before it ended (its future was dropped).
    Cancelled,
    /// Anything else: a request that could not be built or signed, an unreadable answer.
    Error,
}

impl Outcome {
    fn label(&self) -> String {
        match self {
            Outcome::Status(code) => code.to_string(),
            Outcome::Timeout => "timeout".into(),
            Outcome::Connection => "connection".into(),
            Outcome::Cancelled => "cancelled".into(),
            Outcome::Error => "error".into(),
        }
    }
}

impl S3Metrics {
    /// Records one finished call of `op`.
    pub fn record(&self, op: &str, outcome: &Outcome, seconds: f64) {
        self.requests.get_or_create(&OpOutcome { op: op.to_owned(), outcome: outcome.label() }).inc();
        self.duration.get_or_create(&Op { op: op.to_owned() }).observe(seconds);
    }

    /// How many calls of `op` ended with `outcome` so far.
    pub fn count(&self, op: &str, outcome: &Outcome) -> u64 {
        self.requests.get(&OpOutcome { op: op.to_owned(), outcome: outcome.label() }).map_or(0, |c| c.get())
    }

    /// Body bytes of `op` so far, `sent` or `received`.
    pub fn bytes(&self, op: &str, direction: &'static str) -> u64 {
        self.bytes.get(&OpDirection { op: op.to_owned(), direction }).map_or(0, |c| c.get())
    }

    /// Retried attempts of `op` so far.
    pub fn retries(&self, op: &str) -> u64 {
        self.retries.get(&Op { op: op.to_owned() }).map_or(0, |c| c.get())
    }

    fn add_bytes(&self, op: &str, direction: &'static str, n: u64) {
        if n > 0 {
            self.bytes.get_or_create(&OpDirection { op: op.to_owned(), direction }).inc_by(n);
        }
    }

    /// Adds these metrics to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ferrovol_s3_requests",
            "S3 calls made, by operation and outcome (the HTTP status, or timeout, connection, cancelled, error)",
            self.requests.clone(),
        );
        registry.register_with_unit(
            "ferrovol_s3_request_duration",
            "Time an S3 call took, retries included, by operation",
            Unit::Seconds,
            self.duration.clone(),
        );
        registry.register(
            "ferrovol_s3_retries",
            "Attempts of S3 calls beyond each call's first, by operation",
            self.retries.clone(),
        );
        registry.register_with_unit(
            "ferrovol_s3_body",
            "Body bytes of S3 calls by operation and direction (sent, received), retries included, as the requests' and answers' Content-Length give them",
            Unit::Bytes,
            self.bytes.clone(),
        );
    }
}

static S3: LazyLock<S3Metrics> = LazyLock::new(S3Metrics::default);

/// The process's S3 metrics, which every client [`crate::build_client`] builds records into.
pub fn s3() -> &'static S3Metrics {
    &S3
}

/// One call in flight, kept in the call's config bag. If the call's future is dropped
/// before it ends, the bag drops it too, and the call is recorded as cancelled.
#[derive(Debug)]
struct Call {
    /// The operation's name, known once the operation's own configuration is in the bag
    /// (after the client interceptors' first hook).
    op: OnceLock<String>,
    start: Instant,
    attempts: AtomicU32,
    /// The request is a HEAD: the Content-Length of its answer is the object's, not a body's.
    head: AtomicBool,
    done: AtomicBool,
}

impl Call {
    fn new() -> Call {
        Call {
            op: OnceLock::new(),
            start: Instant::now(),
            attempts: AtomicU32::new(0),
            head: AtomicBool::new(false),
            done: AtomicBool::new(false),
        }
    }

    fn op(&self) -> &str {
        self.op.get().map_or("unknown", String::as_str)
    }

    /// Learns the operation's name from the bag, if not yet known.
    fn name_from(&self, cfg: &ConfigBag) {
        if self.op.get().is_none() {
            if let Some(m) = cfg.load::<Metadata>() {
                let _ = self.op.set(m.name().to_owned());
            }
        }
    }

    fn finish(&self, outcome: &Outcome) {
        if !self.done.swap(true, Ordering::AcqRel) {
            s3().record(self.op(), outcome, self.start.elapsed().as_secs_f64());
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(&Outcome::Cancelled);
    }
}

#[derive(Debug, Clone)]
struct InFlight(Arc<Call>);

impl Storable for InFlight {
    type Storer = StoreReplace<Self>;
}

/// The interceptor that records every call in [`s3()`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Metered;

impl Intercept for Metered {
    fn name(&self) -> &'static str {
        "ferrovol-s3-metrics"
    }

    fn read_before_execution(
        &self,
        _context: &BeforeSerializationInterceptorContextRef<'_>,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        cfg.interceptor_state().store_put(InFlight(Arc::new(Call::new())));
        Ok(())
    }

    fn read_before_serialization(
        &self,
        _context: &BeforeSerializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(InFlight(call)) = cfg.load::<InFlight>() {
            call.name_from(cfg);
        }
        Ok(())
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(InFlight(call)) = cfg.load::<InFlight>() {
            call.name_from(cfg);
            if call.attempts.fetch_add(1, Ordering::AcqRel) > 0 {
                s3().retries.get_or_create(&Op { op: call.op().to_owned() }).inc();
            }
            call.head.store(context.request().method().eq_ignore_ascii_case("HEAD"), Ordering::Release);
            s3().add_bytes(call.op(), "sent", context.request().body().content_length().unwrap_or(0));
        }
        Ok(())
    }

    fn read_after_attempt(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let (Some(InFlight(call)), Some(response)) = (cfg.load::<InFlight>(), context.response()) {
            if call.head.load(Ordering::Acquire) {
                return Ok(());
            }
            let length = response.headers().get("content-length").and_then(|v| v.trim().parse::<u64>().ok());
            s3().add_bytes(call.op(), "received", length.unwrap_or(0));
        }
        Ok(())
    }

    fn read_after_execution(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let Some(InFlight(call)) = cfg.load::<InFlight>() else { return Ok(()) };
        call.name_from(cfg);
        let outcome = match (context.response(), context.output_or_error()) {
            (Some(response), _) => Outcome::Status(response.status().as_u16()),
            (None, Some(Err(e))) if e.is_timeout_error() => Outcome::Timeout,
            (None, Some(Err(e))) if e.is_connector_error() => {
                if e.as_connector_error().is_some_and(|c| c.is_timeout()) {
                    Outcome::Timeout
                } else {
                    Outcome::Connection
                }
            }
            _ => Outcome::Error,
        };
        call.finish(&outcome);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_call_is_encoded_by_operation_and_outcome() {
        let m = S3Metrics::default();
        m.record("GetObject", &Outcome::Status(206), 0.004);
        m.record("GetObject", &Outcome::Status(206), 0.02);
        m.record("GetObject", &Outcome::Timeout, 15.0);
        m.add_bytes("GetObject", "received", 4096);
        m.add_bytes("GetObject", "received", 0);
        let mut registry = Registry::default();
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let value =
            |series: &str| text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse::<f64>().ok());
        assert_eq!(value(r#"ferrovol_s3_requests_total{op="GetObject",outcome="206"}"#), Some(2.0), "{text}");
        assert_eq!(value(r#"ferrovol_s3_requests_total{op="GetObject",outcome="timeout"}"#), Some(1.0), "{text}");
        assert_eq!(value(r#"ferrovol_s3_request_duration_seconds_count{op="GetObject"}"#), Some(3.0), "{text}");
        assert_eq!(
            value(r#"ferrovol_s3_request_duration_seconds_bucket{le="0.005",op="GetObject"}"#),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            value(r#"ferrovol_s3_body_bytes_total{op="GetObject",direction="received"}"#),
            Some(4096.0),
            "{text}"
        );
        assert!(!text.contains(r#"direction="sent""#), "nothing was sent: {text}");
        assert_eq!(m.count("GetObject", &Outcome::Status(206)), 2);
        assert_eq!(m.count("PutObject", &Outcome::Status(200)), 0);
    }

    #[test]
    fn a_call_dropped_before_it_ends_counts_as_cancelled() {
        let call = Call::new();
        call.op.set("test.DroppedCall".into()).unwrap();
        drop(InFlight(Arc::new(call)));
        assert_eq!(s3().count("test.DroppedCall", &Outcome::Cancelled), 1);

        let finished = Call::new();
        finished.op.set("test.FinishedCall".into()).unwrap();
        finished.finish(&Outcome::Status(200));
        drop(finished);
        assert_eq!(s3().count("test.FinishedCall", &Outcome::Status(200)), 1);
        assert_eq!(s3().count("test.FinishedCall", &Outcome::Cancelled), 0, "a finished call is recorded once");
    }
}
