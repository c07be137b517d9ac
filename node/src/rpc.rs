//! The one wrapper every CSI RPC goes through: a tracing span named after the method with
//! the volume (or snapshot) it concerns, one log line with the outcome and duration, the
//! RPC's count and latency in the process metrics (crate::metrics), and the conversion of
//! core errors into gRPC statuses. Requests themselves are never logged:
//! prost's derived Debug would print their `secrets` maps.

use std::future::Future;

use ferrovol_core::error::Result;
use ferrovol_core::ids::printable;
use tonic::{Response, Status};
use tracing::Instrument;

use crate::metrics::RpcTimer;

/// How loudly an RPC's outcome is logged when it succeeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Noise {
    /// Calls that change state: logged at info.
    Change,
    /// Probes, capability and list calls that the CO repeats constantly: logged at debug.
    Query,
}

/// Runs one RPC body inside its span and converts the outcome.
pub async fn call<T>(
    method: &'static str,
    object: &str,
    noise: Noise,
    body: impl Future<Output = Result<T>>,
) -> Result<Response<T>, Status> {
    let span = tracing::info_span!("rpc", method, object = %printable(object));
    async move {
        // Records CANCELLED if this future is dropped before the body ends.
        let timer = RpcTimer::start(method);
        let result = body.await;
        let ms = timer.elapsed().as_secs_f64() * 1000.0;
        match result {
            Ok(v) => {
                timer.finish(tonic::Code::Ok);
                match noise {
                    Noise::Change => tracing::info!(ms, "ok"),
                    Noise::Query => tracing::debug!(ms, "ok"),
                }
                Ok(Response::new(v))
            }
            Err(e) => {
                let status = Status::from(e);
                timer.finish(status.code());
                // A query for something that does not exist is an answer, not a fault (the
                // controller asks every node whether it holds a name before placing it).
                if noise == Noise::Query && status.code() == tonic::Code::NotFound {
                    tracing::debug!(ms, code = ?status.code(), error = %status.message(), "not found");
                } else {
                    tracing::warn!(ms, code = ?status.code(), error = %status.message(), "failed");
                }
                Err(status)
            }
        }
    }
    .instrument(span)
    .await
}
