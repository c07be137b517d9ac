//! Conversion of core errors into tonic statuses, for the gRPC adapters only.

use crate::error::{Code, Error};

impl From<Code> for tonic::Code {
    fn from(code: Code) -> Self {
        match code {
            Code::InvalidArgument => tonic::Code::InvalidArgument,
            Code::NotFound => tonic::Code::NotFound,
            Code::AlreadyExists => tonic::Code::AlreadyExists,
            Code::ResourceExhausted => tonic::Code::ResourceExhausted,
            Code::FailedPrecondition => tonic::Code::FailedPrecondition,
            Code::Aborted => tonic::Code::Aborted,
            Code::OutOfRange => tonic::Code::OutOfRange,
            Code::Internal => tonic::Code::Internal,
            Code::Unavailable => tonic::Code::Unavailable,
        }
    }
}

impl Code {
    /// The core code for a status a peer answered. Codes the CSI spec does not use for a
    /// node agent's answers become UNAVAILABLE when the peer could not be reached or refused
    /// us (the CO retries; an operator fixes the certificates) and INTERNAL otherwise.
    pub fn from_tonic(code: tonic::Code) -> Code {
        match code {
            tonic::Code::InvalidArgument => Code::InvalidArgument,
            tonic::Code::NotFound => Code::NotFound,
            tonic::Code::AlreadyExists => Code::AlreadyExists,
            tonic::Code::ResourceExhausted => Code::ResourceExhausted,
            tonic::Code::FailedPrecondition => Code::FailedPrecondition,
            tonic::Code::Aborted => Code::Aborted,
            tonic::Code::OutOfRange => Code::OutOfRange,
            tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated => Code::Unavailable,
            tonic::Code::Ok
            | tonic::Code::Unknown
            | tonic::Code::Unimplemented
            | tonic::Code::Internal
            | tonic::Code::DataLoss => Code::Internal,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        tonic::Status::new(err.code().into(), err.to_string())
    }
}
