//! What the driver's `--metrics-listen` endpoint (ferrovol_metrics::http) serves: the
//! process's registry (ferrovol_node::metrics) and, for `/healthz`, the ready flag that
//! Probe reports, set once the start-up reconcile of the node's volumes is done.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ferrovol_metrics::http::Source;
use ferrovol_metrics::Format;
use ferrovol_node::metrics::Metrics;

/// The driver's metrics and readiness.
#[derive(Debug)]
pub struct DriverSource {
    pub metrics: Metrics,
    pub ready: Arc<AtomicBool>,
}

impl Source for DriverSource {
    fn encode(&self, format: Format) -> Result<String, fmt::Error> {
        self.metrics.encode(format)
    }

    fn not_ready(&self) -> Option<String> {
        (!self.ready.load(Ordering::Acquire))
            .then(|| "the start-up reconcile of this node's volumes is still running".to_owned())
    }
}
