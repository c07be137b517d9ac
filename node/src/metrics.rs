//! Prometheus metrics of a ferrovol process: the RPC counters and latency histogram that
//! [`crate::rpc::call`] records for every CSI and agent call, and collectors that read
//! capacity (the loop data dir, LVM volume groups and thin pools) when scraped. The driver
//! serves a [`Metrics`] registry on `/metrics` (driver/src/metrics.rs, over the endpoint of
//! driver/metrics); docs/METRICS.md lists every metric.
//!
//! Labels name methods, result codes, volume groups and pools, never volumes or snapshots:
//! a series per volume would grow without bound.

use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use ferrovol_core::volume::MIB;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

pub use ferrovol_metrics::Format;

use crate::ledger::SpaceLedger;
use crate::lvm::groups::VolumeGroups;
use crate::store::LoopStore;

/// Upper bounds, in seconds, of the RPC latency buckets: from 0.1 ms (Probe and the
/// capability calls) to 60 s (a large snapshot copy; the CO's sidecars time out near there).
pub const RPC_BUCKETS: [f64; 19] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0,
    60.0,
];

/// The name of a gRPC status code as the gRPC spec (doc/statuscodes.md) spells it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodCode {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodOnly {
    method: &'static str,
}

fn rpc_histogram() -> Histogram {
    Histogram::new(RPC_BUCKETS)
}

/// Counts and latencies of the RPCs a process served. Clones share their values.
#[derive(Debug, Clone)]
pub struct RpcMetrics {
    requests: Family<MethodCode, Counter>,
    duration: Family<MethodOnly, Histogram, fn() -> Histogram>,
}

impl Default for RpcMetrics {
    fn default() -> Self {
        RpcMetrics { requests: Family::default(), duration: Family::new_with_constructor(rpc_histogram) }
    }
}

impl RpcMetrics {
    /// Records one finished RPC.
    pub fn record(&self, method: &'static str, code: tonic::Code, elapsed: Duration) {
        self.requests.get_or_create(&MethodCode { method, code: code_name(code) }).inc();
        self.duration.get_or_create(&MethodOnly { method }).observe(elapsed.as_secs_f64());
    }

    /// How many calls of `method` ended with `code` so far.
    pub fn count(&self, method: &'static str, code: tonic::Code) -> u64 {
        self.requests.get(&MethodCode { method, code: code_name(code) }).map_or(0, |c| c.get())
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "ferrovol_rpc_requests",
            "CSI and agent RPCs served, by method and gRPC result code",
            self.requests.clone(),
        );
        registry.register_with_unit(
            "ferrovol_rpc_duration",
            "Time from the start of an RPC's handler to its answer, by method",
            Unit::Seconds,
            self.duration.clone(),
        );
    }
}

static RPC: LazyLock<RpcMetrics> = LazyLock::new(RpcMetrics::default);

/// The process's RPC metrics, which [`crate::rpc::call`] records into.
pub fn rpc() -> &'static RpcMetrics {
    &RPC
}

/// Times one RPC and records it in [`rpc()`] when it ends. An RPC dropped before it ended
/// (its client went away, so tonic dropped the handler) is recorded as CANCELLED.
#[derive(Debug)]
pub struct RpcTimer {
    method: &'static str,
    start: Instant,
    finished: bool,
}

impl RpcTimer {
    /// Starts timing `method`.
    pub fn start(method: &'static str) -> Self {
        RpcTimer { method, start: Instant::now(), finished: false }
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Records the RPC as ended with `code`.
    pub fn finish(mut self, code: tonic::Code) {
        self.finished = true;
        rpc().record(self.method, code, self.start.elapsed());
    }
}

impl Drop for RpcTimer {
    fn drop(&mut self) {
        if !self.finished {
            rpc().record(self.method, tonic::Code::Cancelled, self.start.elapsed());
        }
    }
}

/// The registry one process serves: build info, the RPC metrics, and the collectors of the
/// roles it runs.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// A registry with `ferrovol_build_info`, the process's RPC metrics and its S3 calls
    /// (the controller's bucket work).
    pub fn new(version: &str) -> Self {
        let mut registry = Registry::default();
        ferrovol_metrics::register_build_info(&mut registry, version);
        rpc().register(&mut registry);
        ferrovol_s3::metrics::s3().register(&mut registry);
        Metrics { registry }
    }

    /// Adds the loop family's capacity, read from the data dir at each scrape.
    pub fn watch_loop(&mut self, store: LoopStore, ledger: Arc<SpaceLedger>) {
        self.registry.register_collector(Box::new(LoopCapacity { store, ledger }));
    }

    /// Adds the size and free space of the served volume groups and the use of their thin
    /// pools, from the groups' cached LVM report.
    pub fn watch_lvm(&mut self, groups: Arc<VolumeGroups>) {
        self.registry.register_collector(Box::new(LvmCapacity { groups }));
    }

    /// Adds a gauge without labels whose value `read` gives at each scrape. `help` is one
    /// sentence without its final period.
    pub fn gauge_fn(&mut self, name: &'static str, help: &'static str, read: impl Fn() -> i64 + Send + Sync + 'static) {
        self.registry.register_collector(Box::new(GaugeFn { name, help, read: Box::new(read) }));
    }

    /// Encodes every metric. The collectors read the data dir and may run `lvm fullreport`
    /// (at most once per report TTL): call this on a blocking thread, not an async worker.
    pub fn encode(&self, format: Format) -> Result<String, fmt::Error> {
        ferrovol_metrics::encode(&self.registry, format)
    }
}

/// Writes one gauge per label set under one descriptor.
fn gauges<L: EncodeLabelSet, V: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    values: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, value) in values {
        ConstGauge::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The loop family's capacity: what a new volume can get (as GetCapacity answers it) and
/// the size of the data dir's filesystem.
#[derive(Debug)]
struct LoopCapacity {
    store: LoopStore,
    ledger: Arc<SpaceLedger>,
}

impl Collector for LoopCapacity {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let root = self.store.root();
        // As LoopAgent::capacity: free space less what existing images were promised and
        // creates in progress reserved, in whole MiB.
        let available = match self.ledger.available(&self.store) {
            Ok(b) => b / MIB * MIB,
            Err(e) => {
                tracing::warn!(data_dir = %root.display(), "metrics: cannot read the loop capacity: {e}");
                return Ok(());
            }
        };
        let total = match crate::fs::usage(root) {
            Ok(u) => u.total_bytes,
            Err(e) => {
                tracing::warn!(data_dir = %root.display(), "metrics: cannot statvfs the data dir: {e}");
                return Ok(());
            }
        };
        gauges(
            &mut encoder,
            "ferrovol_loop_capacity",
            "Loop family: bytes a new volume can still get (available, as GetCapacity reports it) and the size of the data dir's filesystem (total).",
            Some(&Unit::Bytes),
            [([("kind", "available")], available), ([("kind", "total")], total)],
        )
    }
}

/// Volume groups and thin pools of the LVM family, from the cached report.
#[derive(Debug)]
struct LvmCapacity {
    groups: Arc<VolumeGroups>,
}

impl Collector for LvmCapacity {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        // The cached report while it is younger than its TTL; else lvm is read once, and the
        // agent's next call uses that report too.
        let report = match self.groups.report() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("metrics: cannot read the LVM report: {e}");
                return Ok(());
            }
        };
        let vg = |name: &str| [("vg", name.to_owned())];
        gauges(
            &mut encoder,
            "ferrovol_lvm_vg_size",
            "Size of a served LVM volume group.",
            Some(&Unit::Bytes),
            report.vgs.iter().map(|v| (vg(&v.name), v.size_bytes)),
        )?;
        gauges(
            &mut encoder,
            "ferrovol_lvm_vg_free",
            "Unallocated space of a served LVM volume group (what new linear volumes can take).",
            Some(&Unit::Bytes),
            report.vgs.iter().map(|v| (vg(&v.name), v.free_bytes)),
        )?;
        let pools: Vec<_> = report.lvs.iter().filter(|l| l.is_thin_pool()).collect();
        let pool = |vg: &str, pool: &str| [("vg", vg.to_owned()), ("pool", pool.to_owned())];
        gauges(
            &mut encoder,
            "ferrovol_lvm_thin_pool_data_percent",
            "Data use of a thin pool in a served volume group, in percent (new thin volumes are refused from --thin-pool-full-percent on).",
            None,
            pools.iter().filter_map(|p| Some((pool(&p.vg, &p.name), p.data_percent?))),
        )?;
        gauges(
            &mut encoder,
            "ferrovol_lvm_thin_pool_metadata_percent",
            "Metadata use of a thin pool in a served volume group, in percent (new thin volumes are refused from --thin-pool-full-percent on).",
            None,
            pools.iter().filter_map(|p| Some((pool(&p.vg, &p.name), p.metadata_percent?))),
        )
    }
}

/// A gauge computed by a function at each scrape.
struct GaugeFn {
    name: &'static str,
    help: &'static str,
    read: Box<dyn Fn() -> i64 + Send + Sync>,
}

impl fmt::Debug for GaugeFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GaugeFn").field("name", &self.name).finish_non_exhaustive()
    }
}

impl Collector for GaugeFn {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let value = (self.read)();
        let metric = encoder.encode_descriptor(self.name, &format!("{}.", self.help), None, MetricType::Gauge)?;
        ConstGauge::new(value).encode(metric)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::command::{CommandError, Output, Runner};
    use crate::lvm::cli::LvmCli;
    use crate::lvm::names::VgName;
    use crate::lvm::tags::Owner;
    use crate::rpc::{call, Noise};
    use ferrovol_core::error::Error;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use ferrovol_metrics::sample;

    #[test]
    fn code_names_are_the_grpc_spec_names() {
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(code_name(tonic::Code::NotFound), "NOT_FOUND");
        assert_eq!(code_name(tonic::Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(tonic::Code::Unauthenticated), "UNAUTHENTICATED");
        // Every code has its own name, matching tonic's from_i32 numbering.
        let names: std::collections::BTreeSet<_> = (0..=16).map(|i| code_name(tonic::Code::from_i32(i))).collect();
        assert_eq!(names.len(), 17);
    }

    #[test]
    fn a_recorded_rpc_is_encoded_with_its_labels() {
        let m = RpcMetrics::default();
        m.record("CreateVolume", tonic::Code::Ok, Duration::from_millis(3));
        m.record("CreateVolume", tonic::Code::Ok, Duration::from_millis(30));
        m.record("CreateVolume", tonic::Code::ResourceExhausted, Duration::from_micros(50));
        let mut registry = Registry::default();
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();

        assert!(text.contains("# TYPE ferrovol_rpc_requests counter\n"), "{text}");
        let ok = r#"ferrovol_rpc_requests_total{method="CreateVolume",code="OK"}"#;
        let full = r#"ferrovol_rpc_requests_total{method="CreateVolume",code="RESOURCE_EXHAUSTED"}"#;
        assert_eq!(sample(&text, ok), Some(2.0), "{text}");
        assert_eq!(sample(&text, full), Some(1.0), "{text}");
        assert!(text.contains("# TYPE ferrovol_rpc_duration_seconds histogram\n"), "{text}");
        assert!(text.contains("# UNIT ferrovol_rpc_duration_seconds seconds\n"), "{text}");
        let count = r#"ferrovol_rpc_duration_seconds_count{method="CreateVolume"}"#;
        assert_eq!(sample(&text, count), Some(3.0), "{text}");
        let under_1ms = r#"ferrovol_rpc_duration_seconds_bucket{le="0.001",method="CreateVolume"}"#;
        let under_5ms = r#"ferrovol_rpc_duration_seconds_bucket{le="0.005",method="CreateVolume"}"#;
        let under_60s = r#"ferrovol_rpc_duration_seconds_bucket{le="60.0",method="CreateVolume"}"#;
        let all = r#"ferrovol_rpc_duration_seconds_bucket{le="+Inf",method="CreateVolume"}"#;
        assert_eq!(sample(&text, under_1ms), Some(1.0), "{text}");
        assert_eq!(sample(&text, under_5ms), Some(2.0), "{text}");
        assert_eq!(sample(&text, under_60s), Some(3.0), "{text}");
        assert_eq!(sample(&text, all), Some(3.0), "{text}");
        assert_eq!(m.count("CreateVolume", tonic::Code::Ok), 2);
        assert_eq!(m.count("DeleteVolume", tonic::Code::Ok), 0);
    }

    #[tokio::test]
    async fn call_records_every_outcome_in_the_process_metrics() {
        let ok = call("test.MetricsOk", "vol-1", Noise::Query, async { Ok(()) }).await;
        assert!(ok.is_ok());
        let missing = call("test.MetricsNotFound", "vol-1", Noise::Query, async {
            Err::<(), _>(Error::VolumeNotFound { volume: "vol-1".into(), reason: String::new() })
        })
        .await;
        assert_eq!(missing.unwrap_err().code(), tonic::Code::NotFound);
        assert_eq!(rpc().count("test.MetricsOk", tonic::Code::Ok), 1);
        assert_eq!(rpc().count("test.MetricsNotFound", tonic::Code::NotFound), 1);
        assert_eq!(rpc().count("test.MetricsNotFound", tonic::Code::Ok), 0);

        // A call whose future is dropped before it ends (the client hung up) is CANCELLED.
        let pending =
            call("test.MetricsDropped", "", Noise::Change, std::future::pending::<ferrovol_core::Result<()>>());
        let timed_out = tokio::time::timeout(Duration::from_millis(5), pending).await;
        assert!(timed_out.is_err());
        assert_eq!(rpc().count("test.MetricsDropped", tonic::Code::Cancelled), 1);

        // The object (a volume ID) is in no label.
        let text = Metrics::new("0.0.0-test").encode(Format::OpenMetrics).unwrap();
        assert!(!text.contains("vol-1"), "{text}");
        let line = r#"ferrovol_rpc_requests_total{method="test.MetricsNotFound",code="NOT_FOUND"}"#;
        assert_eq!(sample(&text, line), Some(1.0), "{text}");
    }

    #[test]
    fn the_registry_carries_build_info() {
        let om = Metrics::new("1.2.3").encode(Format::OpenMetrics).unwrap();
        assert_eq!(sample(&om, r#"ferrovol_build_info{version="1.2.3"}"#), Some(1.0), "{om}");
    }

    #[test]
    fn loop_capacity_is_read_at_scrape_time() {
        let d = tempfile::tempdir().unwrap();
        let store = LoopStore::open(d.path()).unwrap();
        let ledger = Arc::new(SpaceLedger::default());
        let mut m = Metrics::new("test");
        m.watch_loop(store.clone(), Arc::clone(&ledger));
        let text = m.encode(Format::OpenMetrics).unwrap();
        let available = sample(&text, r#"ferrovol_loop_capacity_bytes{kind="available"}"#).unwrap();
        let total = sample(&text, r#"ferrovol_loop_capacity_bytes{kind="total"}"#).unwrap();
        assert!(total > 0.0 && available <= total, "{text}");
        assert_eq!(available as u64, ledger.available(&store).unwrap() / MIB * MIB);
        assert!(text.contains("# UNIT ferrovol_loop_capacity_bytes bytes\n"), "{text}");
    }

    #[test]
    fn gauge_fn_is_called_at_each_scrape() {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&calls);
        let mut m = Metrics::new("test");
        m.gauge_fn("ferrovol_test_nodes", "Test nodes", move || seen.fetch_add(1, Ordering::SeqCst) as i64 + 3);
        let first = m.encode(Format::OpenMetrics).unwrap();
        let second = m.encode(Format::OpenMetrics).unwrap();
        assert_eq!(sample(&first, "ferrovol_test_nodes"), Some(3.0), "{first}");
        assert_eq!(sample(&second, "ferrovol_test_nodes"), Some(4.0), "{second}");
        assert!(first.contains("# HELP ferrovol_test_nodes Test nodes.\n"), "{first}");
    }

    /// lvm answering every `fullreport` with one fixed report, counting them.
    #[derive(Debug, Default)]
    struct FixedReport {
        reports: AtomicUsize,
    }

    impl Runner for FixedReport {
        fn run(&self, program: &str, args: &[&str]) -> std::result::Result<Output, CommandError> {
            assert_eq!((program, args.first().copied()), ("lvm", Some("fullreport")), "{args:?}");
            self.reports.fetch_add(1, Ordering::SeqCst);
            Ok(Output { stdout: include_str!("lvm/testdata/fullreport-active-handwritten.json").to_owned() })
        }
    }

    #[test]
    fn lvm_gauges_come_from_the_cached_report() {
        let lvm = Arc::new(FixedReport::default());
        let groups = Arc::new(VolumeGroups::new(
            LvmCli::new(Arc::clone(&lvm) as Arc<dyn Runner>),
            Owner { driver: "csi.ferrovol.dev".into(), node: "node-1".into() },
            vec![VgName::parse("ferrovol").unwrap()],
            90.0,
        ));
        let mut m = Metrics::new("test");
        m.watch_lvm(Arc::clone(&groups));
        let text = m.encode(Format::OpenMetrics).unwrap();
        let report = groups.report().unwrap();
        let vg = report.vg("ferrovol").unwrap();
        assert_eq!(sample(&text, r#"ferrovol_lvm_vg_size_bytes{vg="ferrovol"}"#), Some(vg.size_bytes as f64), "{text}");
        assert_eq!(sample(&text, r#"ferrovol_lvm_vg_free_bytes{vg="ferrovol"}"#), Some(vg.free_bytes as f64), "{text}");
        let (data, meta) = VolumeGroups::pool_use(&report, "ferrovol", "pool").unwrap();
        assert_eq!(sample(&text, r#"ferrovol_lvm_thin_pool_data_percent{vg="ferrovol",pool="pool"}"#), Some(data));
        assert_eq!(sample(&text, r#"ferrovol_lvm_thin_pool_metadata_percent{vg="ferrovol",pool="pool"}"#), Some(meta));
        // Only thin pools are pools; thin volumes and linear LVs have no series.
        assert_eq!(text.matches("ferrovol_lvm_thin_pool_data_percent{").count(), 1, "{text}");
        // Scrapes within the report's TTL reuse the cached report.
        m.encode(Format::OpenMetrics).unwrap();
        assert_eq!(lvm.reports.load(Ordering::SeqCst), 1, "one lvm fullreport for two scrapes and a report()");
    }
}
