//! S3's answers as the driver's errors: every message says which call failed on which
//! bucket (and key), and what S3 said, so an operator sees at once whether the
//! credentials, the bucket or the network is at fault.

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use ferrovol_core::error::Error;

/// What kind of failure an S3 call met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The bucket or key does not exist.
    NotFound,
    /// The credentials were refused (unknown key, bad signature, access denied).
    Denied,
    /// The server could not be reached or did not answer in time.
    Unreachable,
    /// A conditional request's condition failed, or the bucket already exists.
    Conflict,
    /// Anything else the server refused.
    Refused,
}

/// An S3 call's failure, classified, with the message to show.
#[derive(Debug, Clone)]
pub struct S3Failure {
    pub kind: Kind,
    /// S3's error code (`NoSuchBucket`, `AccessDenied`, ...), or empty.
    pub code: String,
    /// Who failed where and why, ready for an error message.
    pub message: String,
}

/// Classifies the error of S3 call `op` on `what` (`bucket b` or `b/key`).
pub fn classify<E, R>(op: &str, what: &str, err: &SdkError<E, R>) -> S3Failure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    let status = match err {
        SdkError::ServiceError(s) => Some(status_of(s.raw())),
        _ => None,
    };
    match err {
        SdkError::TimeoutError(_) => {
            S3Failure { kind: Kind::Unreachable, code: String::new(), message: format!("S3 {op} on {what} timed out") }
        }
        SdkError::DispatchFailure(_) => S3Failure {
            kind: Kind::Unreachable,
            code: String::new(),
            message: format!("S3 {op} on {what} could not reach the server: {}", chain(err)),
        },
        SdkError::ResponseError(_) => S3Failure {
            kind: Kind::Unreachable,
            code: String::new(),
            message: format!("S3 {op} on {what}: the server's answer could not be read: {}", chain(err)),
        },
        SdkError::ServiceError(s) => {
            let e = s.err();
            let code = e.code().unwrap_or_default().to_owned();
            let text = e.message().unwrap_or_default();
            let kind = match (code.as_str(), status) {
                ("NoSuchBucket" | "NoSuchKey" | "NotFound" | "NoSuchUpload", _) | (_, Some(404)) => Kind::NotFound,
                (
                    "AccessDenied"
                    | "InvalidAccessKeyId"
                    | "SignatureDoesNotMatch"
                    | "InvalidToken"
                    | "ExpiredToken"
                    | "AllAccessDisabled",
                    _,
                )
                | (_, Some(401 | 403)) => Kind::Denied,
                (
                    "PreconditionFailed"
                    | "BucketAlreadyExists"
                    | "BucketAlreadyOwnedByYou"
                    | "ConditionalRequestConflict",
                    _,
                )
                | (_, Some(409 | 412)) => Kind::Conflict,
                (_, Some(500..=599)) => Kind::Unreachable,
                _ => Kind::Refused,
            };
            let said = match (code.is_empty(), text.is_empty()) {
                (true, true) => match status {
                    // HEAD answers carry no body, so no reason.
                    Some(403) => "HTTP 403 Forbidden (the credentials or their permissions were refused)".to_owned(),
                    Some(404) => "HTTP 404 Not Found".to_owned(),
                    s => format!("HTTP {}", s.unwrap_or_default()),
                },
                (false, true) => code.clone(),
                (true, false) => text.to_owned(),
                (false, false) => format!("{code}: {text}"),
            };
            S3Failure { kind, code, message: format!("S3 refused {op} on {what}: {said}") }
        }
        _ => S3Failure {
            kind: Kind::Refused,
            code: String::new(),
            message: format!("S3 {op} on {what} failed: {}", chain(err)),
        },
    }
}

fn status_of<R: std::fmt::Debug>(raw: &R) -> u16 {
    // The raw response's Debug carries its status; the typed accessor differs per response
    // type, and this is read only to classify an error that has no code.
    let text = format!("{raw:?}");
    text.split("StatusCode(")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        cur = s.source();
    }
    out
}

impl S3Failure {
    /// The driver error for this failure, for the object named `object` (a volume or
    /// snapshot ID, for NOT_FOUND).
    pub fn into_error(self) -> Error {
        match self.kind {
            Kind::Unreachable => Error::Unavailable { reason: self.message },
            Kind::Denied => Error::Precondition {
                object: "the S3 credentials".into(),
                reason: format!("{} (check accessKeyID, secretAccessKey and region in the secret)", self.message),
            },
            Kind::NotFound | Kind::Conflict | Kind::Refused => {
                Error::System { operation: "S3".into(), object: String::new(), cause: self.message }
            }
        }
    }
}
