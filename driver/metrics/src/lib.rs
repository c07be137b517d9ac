//! Prometheus exposition shared by ferrovol's processes (the driver and the S3 mounter):
//! which text format a scraper asked for, the `ferrovol_build_info` gauge, and the
//! plain-HTTP endpoint that serves `/metrics` and `/healthz` ([`http`]).
//!
//! What each process measures lives with the code that measures it (ferrovol_node::metrics,
//! ferrovol_s3::metrics, the mounter); docs/METRICS.md lists every metric.

pub mod http;
#[cfg(feature = "testing")]
pub mod testing;

use std::fmt;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The exposition formats `/metrics` can answer in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text, which Prometheus asks for.
    OpenMetrics,
    /// The classic Prometheus text format 0.0.4, for anything that does not ask for OpenMetrics.
    Prometheus,
}

impl Format {
    /// The Content-Type of an answer in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        }
    }

    /// The format an HTTP `Accept` header asks for: OpenMetrics when it names it.
    pub fn negotiate(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }
}

/// Encodes every metric of `registry` in `format`.
pub fn encode(registry: &Registry, format: Format) -> Result<String, fmt::Error> {
    let mut out = String::with_capacity(8 * 1024);
    match format {
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, registry)?,
        Format::Prometheus => prometheus_client::encoding::prometheus_text::encode(&mut out, registry)?,
    }
    Ok(out)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Version {
    version: String,
}

/// Registers `ferrovol_build_info`: always 1, labelled with the running `version`.
pub fn register_build_info(registry: &mut Registry, version: &str) {
    let info: Family<Version, Gauge> = Family::default();
    info.get_or_create(&Version { version: version.to_owned() }).set(1);
    registry.register("ferrovol_build_info", "Always 1; its label is the version of ferrovol running", info);
}

/// The value of the first sample whose line starts with `series` (name and labels exactly
/// as encoded) in an exposition `text`. For tests of what a registry encodes.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn build_info_and_both_formats() {
        let mut registry = Registry::default();
        register_build_info(&mut registry, "1.2.3");
        let om = encode(&registry, Format::OpenMetrics).unwrap();
        assert_eq!(sample(&om, r#"ferrovol_build_info{version="1.2.3"}"#), Some(1.0), "{om}");
        assert!(om.ends_with("# EOF\n"), "{om}");
        let prom = encode(&registry, Format::Prometheus).unwrap();
        assert_eq!(sample(&prom, r#"ferrovol_build_info{version="1.2.3"}"#), Some(1.0), "{prom}");
        assert!(!prom.contains("# EOF"), "{prom}");
    }

    #[test]
    fn the_format_follows_the_accept_header() {
        assert_eq!(Format::negotiate(None), Format::Prometheus);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Prometheus);
        let prometheus_accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus_accept)), Format::OpenMetrics);
        assert!(Format::OpenMetrics.content_type().starts_with("application/openmetrics-text; version=1.0.0"));
    }

    #[test]
    fn sample_reads_only_the_exact_series() {
        let text = "a_total{x=\"1\"} 3\na_total{x=\"10\"} 7\n";
        assert_eq!(sample(text, r#"a_total{x="1"}"#), Some(3.0));
        assert_eq!(sample(text, r#"a_total{x="10"}"#), Some(7.0));
        assert_eq!(sample(text, r#"a_total{x="2"}"#), None);
    }
}
