//! CSI endpoints as operators write them (`unix:///run/ferrovol/csi.sock`, `tcp://127.0.0.1:10000`),
//! and a client channel to one.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Uri};

/// A checked endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(format!(
                    "{s:?}: a unix endpoint needs an absolute path, e.g. unix:///run/ferrovol/csi.sock"
                ));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = s.strip_prefix("tcp://") {
            return addr
                .parse()
                .map(Endpoint::Tcp)
                .map_err(|e| format!("{s:?}: {e} (expected tcp://HOST:PORT with a numeric address)"));
        }
        Err(format!("{s:?}: expected unix:///PATH or tcp://HOST:PORT"))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

impl Endpoint {
    /// Connects a gRPC channel to the endpoint.
    pub async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        match self {
            Endpoint::Tcp(addr) => {
                // A SocketAddr always formats as a valid authority, so from_shared cannot fail;
                // fall back to an unroutable URI rather than panic if it ever did.
                let ep = Channel::from_shared(format!("http://{addr}"))
                    .unwrap_or_else(|_| tonic::transport::Endpoint::from_static("http://0.0.0.0:1"));
                ep.connect().await
            }
            Endpoint::Unix(path) => {
                let path = path.clone();
                // The URI is required by the API but unused: the connector dials the socket.
                tonic::transport::Endpoint::from_static("http://localhost")
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
                    }))
                    .await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!("unix:///run/x.sock".parse::<Endpoint>().expect("unix"), Endpoint::Unix("/run/x.sock".into()));
        assert_eq!("tcp://127.0.0.1:10000".parse::<Endpoint>().expect("tcp").to_string(), "tcp://127.0.0.1:10000");
        assert!("unix://relative".parse::<Endpoint>().is_err());
        assert!("http://x".parse::<Endpoint>().is_err());
        assert!("tcp://nohost".parse::<Endpoint>().is_err());
    }
}
