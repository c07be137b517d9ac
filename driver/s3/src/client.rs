//! Builds an S3 client from an [`S3Endpoint`]: static credentials and region only (no
//! environment, profile or instance-metadata lookups), and timeouts on every attempt and
//! operation, so an unreachable server fails a call within a bound instead of hanging.

use std::time::Duration;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;

use crate::endpoint::S3Endpoint;

/// Time bounds of S3 calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP (and TLS) connect.
    pub connect: Duration,
    /// One attempt of one call.
    pub attempt: Duration,
    /// A whole call, retries included: the bound on how long anything waits for S3.
    pub operation: Duration,
    /// Attempts per call (1 = no retry).
    pub attempts: u32,
}

impl Default for Timeouts {
    /// A call fails within 15 s whatever the server does: 3 s to connect, 7 s per attempt,
    /// at most 3 attempts inside the 15 s.
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(3),
            attempt: Duration::from_secs(7),
            operation: Duration::from_secs(15),
            attempts: 3,
        }
    }
}

impl Timeouts {
    /// The default bounds scaled to fail within `bound` (at least 1 s).
    pub fn within(bound: Duration) -> Self {
        let bound = bound.max(Duration::from_secs(1));
        Timeouts {
            connect: (bound / 5).max(Duration::from_millis(500)),
            attempt: bound / 2,
            operation: bound,
            attempts: 3,
        }
    }

    /// The bounds of the calls whose server copies bytes (CopyObject, UploadPartCopy,
    /// CompleteMultipartUpload): the same connect bound (an unreachable server still fails
    /// fast), but each attempt may take `least` or the whole-call bound, whichever is
    /// longer, and the call as many attempts of that.
    pub fn for_copies(self, least: Duration) -> Self {
        let attempt = self.operation.max(least);
        Timeouts {
            connect: self.connect,
            attempt,
            operation: attempt.saturating_mul(self.attempts.max(1)),
            attempts: self.attempts,
        }
    }
}

/// The SDK's timeout configuration of `t`.
pub fn timeout_config(t: Timeouts) -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(t.connect)
        .read_timeout(t.attempt)
        .operation_attempt_timeout(t.attempt)
        .operation_timeout(t.operation)
        .build()
}

/// The HTTP(S) client every S3 client shares: hyper with rustls on ring, trusting the
/// system's CA certificates (the image ships ca-certificates). Built once: it holds the
/// connection pool.
fn https_client() -> aws_smithy_runtime_api::client::http::SharedHttpClient {
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
    static CLIENT: std::sync::OnceLock<aws_smithy_runtime_api::client::http::SharedHttpClient> =
        std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| {
            aws_smithy_http_client::Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring)).build_https()
        })
        .clone()
}

/// The configuration of a client for `ep`, without the metrics interceptor: what
/// [`build_client`] builds on, and the benchmarks' raw baseline.
pub fn config(ep: &S3Endpoint, t: Timeouts) -> aws_sdk_s3::config::Builder {
    let creds = Credentials::new(&ep.access_key_id, &ep.secret_access_key, None, None, "ferrovol-csi-secret");
    aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .http_client(https_client())
        .region(Region::new(ep.region.clone()))
        .endpoint_url(&ep.endpoint)
        .force_path_style(ep.path_style)
        .credentials_provider(creds)
        .timeout_config(timeout_config(t))
        .retry_config(RetryConfig::standard().with_max_attempts(t.attempts.max(1)))
        // Checksums on every request only where the operation requires them: S3-compatible
        // servers differ in what they accept, and multipart parts are checked by ETag.
        .request_checksum_calculation(aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired)
}

/// An S3 client for `ep`, every call of which is counted in [`crate::metrics::s3()`].
pub fn build_client(ep: &S3Endpoint, t: Timeouts) -> aws_sdk_s3::Client {
    aws_sdk_s3::Client::from_conf(config(ep, t).interceptor(crate::metrics::Metered).build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_get_a_long_attempt_and_keep_the_short_connect() {
        let t = Timeouts::within(Duration::from_secs(15));
        let c = t.for_copies(Duration::from_secs(120));
        assert_eq!(c.connect, t.connect);
        assert_eq!(c.attempt, Duration::from_secs(120));
        assert_eq!(c.operation, Duration::from_secs(360));
        let long = Timeouts::within(Duration::from_secs(600)).for_copies(Duration::from_secs(120));
        assert_eq!(long.attempt, Duration::from_secs(600), "never shorter than --s3-timeout");
    }
}
