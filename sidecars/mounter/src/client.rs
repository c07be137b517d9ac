//! The node plugin's side of the protocol: one connection per request, one JSON line each
//! way, with a time limit. An absent mounter is UNAVAILABLE; the mounter's errors come back
//! as the core's errors with the mounter's code and message.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferrovol_core::error::{Code, Error, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::wire::{Envelope, MountSpec, MountStats, Request, Response, PROTOCOL_VERSION};

/// The limit on calls other than Mount.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// What Mount may take beyond the spec's S3 bound (the FUSE mount itself, the listing).
const MOUNT_EXTRA: Duration = Duration::from_secs(10);

/// Talks to the mounter at a socket.
#[derive(Debug, Clone)]
pub struct MounterClient {
    socket: PathBuf,
}

/// The core error for the mounter's error answer: the code is kept, and the message (which
/// names the volume or target and the cause) is shown as it is.
pub fn error_from(code: Code, object: &str, message: String) -> Error {
    match code {
        Code::InvalidArgument => Error::InvalidArgument { field: "mount request", reason: message },
        Code::NotFound => Error::VolumeNotFound { volume: object.to_owned(), reason: message },
        Code::AlreadyExists => {
            Error::PublishedIncompatible { volume: object.to_owned(), path: String::new(), reason: message }
        }
        Code::ResourceExhausted => Error::PoolExhausted { object: object.to_owned(), reason: message },
        Code::FailedPrecondition => Error::Precondition { object: object.to_owned(), reason: message },
        Code::Aborted => Error::InProgress { what: format!("{object} ({message})") },
        Code::OutOfRange => Error::CapacityOutOfRange { volume: object.to_owned(), reason: message },
        Code::Internal => {
            Error::System { operation: "the S3 mounter".into(), object: object.to_owned(), cause: message }
        }
        Code::Unavailable => Error::Unavailable { reason: message },
    }
}

impl MounterClient {
    pub fn new(socket: PathBuf) -> Self {
        MounterClient { socket }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn unavailable(&self, why: impl std::fmt::Display) -> Error {
        Error::Unavailable { reason: format!("the S3 mounter at {} is not answering: {why}", self.socket.display()) }
    }

    async fn call(&self, request: Request, limit: Duration) -> Result<Response> {
        let mut line = serde_json::to_string(&Envelope { version: PROTOCOL_VERSION, request })
            .map_err(|e| Error::system("encode a mounter request", "the S3 mounter", e))?;
        line.push('\n');
        let exchange = async {
            let mut s = UnixStream::connect(&self.socket).await.map_err(|e| self.unavailable(e))?;
            s.write_all(line.as_bytes()).await.map_err(|e| self.unavailable(e))?;
            let mut answer = String::new();
            let mut r = BufReader::new(s);
            let n = r.read_line(&mut answer).await.map_err(|e| self.unavailable(e))?;
            if n == 0 {
                return Err(self.unavailable("it closed the connection without an answer"));
            }
            serde_json::from_str::<Response>(&answer)
                .map_err(|e| self.unavailable(format!("its answer does not parse: {e}")))
        };
        tokio::time::timeout(limit, exchange)
            .await
            .map_err(|_| self.unavailable(format!("no answer within {} s", limit.as_secs())))?
    }

    fn unexpected(&self, r: &Response) -> Error {
        Error::system("the S3 mounter", self.socket.display(), format!("unexpected answer {r:?}"))
    }

    pub async fn mount(&self, spec: &MountSpec) -> Result<()> {
        let limit = Duration::from_secs(spec.timeout_secs) + MOUNT_EXTRA;
        match self.call(Request::Mount { spec: spec.clone() }, limit).await? {
            Response::Ok => Ok(()),
            Response::Error { code, message } => Err(error_from(code, &spec.volume_id, message)),
            r => Err(self.unexpected(&r)),
        }
    }

    pub async fn unmount(&self, target: &Path) -> Result<()> {
        match self.call(Request::Unmount { target: target.to_owned() }, CALL_TIMEOUT).await? {
            Response::Ok => Ok(()),
            Response::Error { code, message } => Err(error_from(code, &target.display().to_string(), message)),
            r => Err(self.unexpected(&r)),
        }
    }

    pub async fn stats(&self, target: &Path) -> Result<MountStats> {
        match self.call(Request::Stats { target: target.to_owned() }, CALL_TIMEOUT).await? {
            Response::Stats { stats } => Ok(stats),
            Response::Error { code, message } => Err(error_from(code, &target.display().to_string(), message)),
            r => Err(self.unexpected(&r)),
        }
    }

    pub async fn refresh_quota(&self, target: &Path) -> Result<u64> {
        match self.call(Request::RefreshQuota { target: target.to_owned() }, CALL_TIMEOUT).await? {
            Response::Quota { quota_bytes } => Ok(quota_bytes),
            Response::Error { code, message } => Err(error_from(code, &target.display().to_string(), message)),
            r => Err(self.unexpected(&r)),
        }
    }

    pub async fn list(&self) -> Result<Vec<MountStats>> {
        self.list_within(CALL_TIMEOUT).await
    }

    /// [`MounterClient::list`], answering UNAVAILABLE after `limit` (a health look that
    /// must not wait for a stopped mounter as long as a change may).
    pub async fn list_within(&self, limit: Duration) -> Result<Vec<MountStats>> {
        match self.call(Request::List, limit).await? {
            Response::Mounts { mounts } => Ok(mounts),
            Response::Error { code, message } => Err(error_from(code, "the S3 mounter", message)),
            r => Err(self.unexpected(&r)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_survives_the_trip() {
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists,
            Code::ResourceExhausted,
            Code::FailedPrecondition,
            Code::Aborted,
            Code::OutOfRange,
            Code::Internal,
            Code::Unavailable,
        ] {
            let e = error_from(code, "s3.vol:b:pvc-1", "the reason".into());
            assert_eq!(e.code(), code);
            assert!(e.to_string().contains("the reason"), "{e}");
        }
    }

    #[tokio::test]
    async fn an_absent_mounter_is_unavailable_naming_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("absent.sock");
        let e = MounterClient::new(sock.clone()).list().await.expect_err("nobody listens");
        assert_eq!(e.code(), Code::Unavailable);
        let msg = e.to_string();
        assert!(msg.contains("the S3 mounter at") && msg.contains(&sock.display().to_string()), "{msg}");
    }
}
