//! The mounter's Prometheus metrics, served on `--metrics-listen`: the S3 calls of its
//! filesystems (ferrovol_s3::metrics), what applications read and wrote through them, the
//! errors the filesystem answered them with, the sessions held and the buffer budget.
//!
//! Labels name filesystem operations and errno names, never volumes, paths or buckets.

use std::fmt;
use std::sync::{Arc, LazyLock};

use ferrovol_metrics::http::Source;
use ferrovol_metrics::Format;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::fs::budget::Budget;
use crate::server::Mounter;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpErrno {
    op: &'static str,
    errno: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Direction {
    direction: &'static str,
}

/// What the filesystems answered applications. Clones share their values.
#[derive(Debug, Clone, Default)]
pub struct FsMetrics {
    errors: Family<OpErrno, Counter>,
    bytes: Family<Direction, Counter>,
}

impl FsMetrics {
    /// Counts an error answer to a FUSE `op`.
    pub fn error(&self, op: &'static str, errno: i32) {
        self.errors.get_or_create(&OpErrno { op, errno: errno_name(errno) }).inc();
    }

    /// Counts `n` bytes handed to applications by read.
    pub fn read(&self, n: usize) {
        self.bytes.get_or_create(&Direction { direction: "read" }).inc_by(n as u64);
    }

    /// Counts `n` bytes taken from applications by write.
    pub fn written(&self, n: u32) {
        self.bytes.get_or_create(&Direction { direction: "written" }).inc_by(u64::from(n));
    }

    /// Errors answered to `op` with `errno` so far.
    pub fn errors(&self, op: &'static str, errno: i32) -> u64 {
        self.errors.get(&OpErrno { op, errno: errno_name(errno) }).map_or(0, |c| c.get())
    }

    /// Bytes moved in `direction` ("read" or "written") so far.
    pub fn bytes(&self, direction: &'static str) -> u64 {
        self.bytes.get(&Direction { direction }).map_or(0, |c| c.get())
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "ferrovol_mounter_fs_errors",
            "Filesystem calls of applications answered with an error, by FUSE operation and errno",
            self.errors.clone(),
        );
        registry.register_with_unit(
            "ferrovol_mounter_fs",
            "Bytes applications read from and wrote to S3 volumes, by direction",
            Unit::Bytes,
            self.bytes.clone(),
        );
    }
}

static FS: LazyLock<FsMetrics> = LazyLock::new(FsMetrics::default);

/// The process's filesystem metrics, which the FUSE layer records into.
pub fn fs() -> &'static FsMetrics {
    &FS
}

/// The name of an errno value as errno(3) spells it, for the errors the filesystem answers.
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::ENOENT => "ENOENT",
        libc::EEXIST => "EEXIST",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::EROFS => "EROFS",
        libc::EIO => "EIO",
        libc::ENOSPC => "ENOSPC",
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        libc::EBUSY => "EBUSY",
        libc::EBADF => "EBADF",
        libc::EINVAL => "EINVAL",
        libc::EISDIR => "EISDIR",
        libc::ENOTDIR => "ENOTDIR",
        libc::EXDEV => "EXDEV",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTSUP => "ENOTSUP",
        libc::EFBIG => "EFBIG",
        libc::EAGAIN => "EAGAIN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EINTR => "EINTR",
        libc::ENOMEM => "ENOMEM",
        _ => "other",
    }
}

/// The sessions held and the buffer budget, read at each scrape.
#[derive(Debug)]
struct Held {
    mounter: Arc<Mounter>,
    budget: Budget,
}

impl Collector for Held {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let mounts = i64::try_from(self.mounter.mount_count()).unwrap_or(i64::MAX);
        let m = encoder.encode_descriptor(
            "ferrovol_mounter_mounts",
            "FUSE sessions of S3 volumes this mounter holds.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(mounts).encode(m)?;
        let mut m = encoder.encode_descriptor(
            "ferrovol_mounter_buffer",
            "The byte budget of read-ahead and write buffers of all mounts (--buffer-budget-mib), and how much of it is taken.",
            Some(&Unit::Bytes),
            MetricType::Gauge,
        )?;
        let total = self.budget.total();
        let taken = total.saturating_sub(self.budget.available());
        for (kind, value) in [("budget", total), ("taken", taken)] {
            let v = i64::try_from(value).unwrap_or(i64::MAX);
            ConstGauge::new(v).encode(m.encode_family(&Kind { kind })?)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: &'static str,
}

/// The registry the mounter serves.
#[derive(Debug)]
pub struct MounterSource {
    registry: Registry,
}

impl MounterSource {
    /// Build info, the S3 call metrics, the filesystem metrics, and `mounter`'s sessions and
    /// buffers.
    pub fn new(mounter: Arc<Mounter>) -> Self {
        let mut registry = Registry::default();
        ferrovol_metrics::register_build_info(&mut registry, env!("CARGO_PKG_VERSION"));
        ferrovol_s3::metrics::s3().register(&mut registry);
        fs().register(&mut registry);
        registry.register_collector(Box::new(Held { mounter, budget: Budget::global() }));
        MounterSource { registry }
    }
}

impl Source for MounterSource {
    fn encode(&self, format: Format) -> Result<String, fmt::Error> {
        ferrovol_metrics::encode(&self.registry, format)
    }

    /// The endpoint starts once the socket is bound: from then on the mounter serves.
    fn not_ready(&self) -> Option<String> {
        None
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ferrovol_metrics::sample;

    #[test]
    fn errors_bytes_mounts_and_budget_are_encoded() {
        let m = FsMetrics::default();
        m.error("lookup", libc::ENOENT);
        m.error("read", libc::EIO);
        m.error("read", libc::EIO);
        m.error("write", 9999);
        m.read(4096);
        m.written(100);
        let mut registry = Registry::default();
        m.register(&mut registry);
        registry
            .register_collector(Box::new(Held { mounter: Arc::new(Mounter::default()), budget: Budget::new(1 << 20) }));
        let text = ferrovol_metrics::encode(&registry, Format::Prometheus).unwrap();
        assert_eq!(sample(&text, r#"ferrovol_mounter_fs_errors_total{op="read",errno="EIO"}"#), Some(2.0), "{text}");
        assert_eq!(
            sample(&text, r#"ferrovol_mounter_fs_errors_total{op="lookup",errno="ENOENT"}"#),
            Some(1.0),
            "{text}"
        );
        assert_eq!(sample(&text, r#"ferrovol_mounter_fs_errors_total{op="write",errno="other"}"#), Some(1.0), "{text}");
        assert_eq!(sample(&text, r#"ferrovol_mounter_fs_bytes_total{direction="read"}"#), Some(4096.0), "{text}");
        assert_eq!(sample(&text, r#"ferrovol_mounter_fs_bytes_total{direction="written"}"#), Some(100.0), "{text}");
        assert_eq!(sample(&text, "ferrovol_mounter_mounts"), Some(0.0), "{text}");
        assert_eq!(sample(&text, r#"ferrovol_mounter_buffer_bytes{kind="budget"}"#), Some(1048576.0), "{text}");
        assert_eq!(sample(&text, r#"ferrovol_mounter_buffer_bytes{kind="taken"}"#), Some(0.0), "{text}");
    }
}
