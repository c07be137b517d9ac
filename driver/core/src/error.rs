//! The one error type of the core, and its exhaustive mapping to the CSI spec's gRPC codes.
//!
//! Every variant says what failed, on which object, and why. `code()` has no wildcard arm,
//! so a new variant does not compile until someone decides which code the spec wants for it.

use std::fmt;

/// A result whose error is the core [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The gRPC status codes the CSI spec uses, named without depending on tonic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Code {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Internal,
    Unavailable,
}

/// Everything that can go wrong in a CSI operation, by cause.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is missing or malformed.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// A StorageClass parameter the driver does not know.
    #[error("unknown parameter {key:?} (known: {known})")]
    UnknownParameter { key: String, known: String },
    /// A capability (access mode, access type, fs type) this volume or driver cannot give.
    #[error("unsupported volume capability: {reason}")]
    UnsupportedCapability { reason: String },
    /// No volume with this ID exists here.
    #[error("volume {volume:?} not found{}", detail(.reason))]
    VolumeNotFound { volume: String, reason: String },
    /// No snapshot with this ID exists here.
    #[error("snapshot {snapshot:?} not found{}", detail(.reason))]
    SnapshotNotFound { snapshot: String, reason: String },
    /// The node named in the request is not one this driver serves.
    #[error("node {node:?} not found: {reason}")]
    NodeNotFound { node: String, reason: String },
    /// A volume or snapshot with this name exists with other properties.
    #[error("{kind} named {name:?} already exists but is incompatible: {reason}")]
    NameConflict { kind: &'static str, name: String, reason: String },
    /// The volume is already published (or staged) at this path with other properties.
    #[error("volume {volume:?} is already published at {path:?} with other properties: {reason}")]
    PublishedIncompatible { volume: String, path: String, reason: String },
    /// Another call on the same volume, snapshot or name is still running.
    #[error("an operation on {what} is already in progress; retry later")]
    InProgress { what: String },
    /// The requested capacity range cannot be satisfied.
    #[error("capacity out of range for {volume:?}: {reason}")]
    CapacityOutOfRange { volume: String, reason: String },
    /// Not enough space on the node for this request.
    #[error("not enough capacity for {volume:?}: requested {requested} bytes, {available} bytes available")]
    InsufficientCapacity { volume: String, requested: u64, available: u64 },
    /// A storage pool cannot take the request (a volume group out of extents, a thin pool
    /// at its fill threshold or overprovisioning limit); the reason names the pool.
    #[error("not enough capacity for {object}: {reason}")]
    PoolExhausted { object: String, reason: String },
    /// The accessibility requirements exclude every node that could hold the volume.
    #[error("cannot provision {volume:?} in the requested topology: {reason}")]
    TopologyUnreachable { volume: String, reason: String },
    /// The object is in a state that does not allow the call (in use, published elsewhere).
    #[error("{object}: {reason}")]
    Precondition { object: String, reason: String },
    /// A pagination token the driver did not hand out.
    #[error("invalid starting_token {token:?}: {reason}")]
    BadToken { token: String, reason: String },
    /// The driver is not ready yet (start-up reconcile still running) or a peer is unreachable.
    #[error("{reason}")]
    Unavailable { reason: String },
    /// A system operation failed: the operation, the object it acted on, and the cause.
    #[error("{operation} failed for {object}: {cause}")]
    System { operation: String, object: String, cause: String },
    /// A node agent answered a call with an error: its code and its message (which already
    /// names the object and the cause) are passed on unchanged.
    #[error("node {node}: {message}")]
    Remote { node: String, code: Code, message: String },
}

fn detail(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(": {reason}")
    }
}

impl Error {
    /// The gRPC code the CSI spec prescribes for this error.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::UnknownParameter { .. } => Code::InvalidArgument,
            Error::UnsupportedCapability { .. } => Code::InvalidArgument,
            Error::VolumeNotFound { .. } => Code::NotFound,
            Error::SnapshotNotFound { .. } => Code::NotFound,
            Error::NodeNotFound { .. } => Code::NotFound,
            Error::NameConflict { .. } => Code::AlreadyExists,
            Error::PublishedIncompatible { .. } => Code::AlreadyExists,
            Error::InProgress { .. } => Code::Aborted,
            Error::CapacityOutOfRange { .. } => Code::OutOfRange,
            Error::InsufficientCapacity { .. } => Code::ResourceExhausted,
            Error::PoolExhausted { .. } => Code::ResourceExhausted,
            Error::TopologyUnreachable { .. } => Code::ResourceExhausted,
            Error::Precondition { .. } => Code::FailedPrecondition,
            Error::BadToken { .. } => Code::Aborted,
            Error::Unavailable { .. } => Code::Unavailable,
            Error::System { .. } => Code::Internal,
            Error::Remote { code, .. } => *code,
        }
    }

    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { field, reason: reason.into() }
    }

    /// Shorthand for [`Error::System`], taking any displayable cause.
    pub fn system(operation: impl Into<String>, object: impl fmt::Display, cause: impl fmt::Display) -> Self {
        Error::System { operation: operation.into(), object: object.to_string(), cause: cause.to_string() }
    }

    /// Shorthand for [`Error::Precondition`].
    pub fn precondition(object: impl fmt::Display, reason: impl Into<String>) -> Self {
        Error::Precondition { object: object.to_string(), reason: reason.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_object_and_the_cause() {
        let e = Error::system("attach loop device", "volume \"loop.vol:n1:pvc-1\"", "EBUSY");
        assert_eq!(e.to_string(), "attach loop device failed for volume \"loop.vol:n1:pvc-1\": EBUSY");
        assert_eq!(e.code(), Code::Internal);
        let e = Error::VolumeNotFound { volume: "x".into(), reason: String::new() };
        assert_eq!(e.to_string(), "volume \"x\" not found");
        assert_eq!(e.code(), Code::NotFound);
    }

    #[test]
    fn bad_token_is_aborted_as_the_spec_says() {
        let e = Error::BadToken { token: "zz".into(), reason: "not a number".into() };
        assert_eq!(e.code(), Code::Aborted);
    }
}
