//! A real S3 server for tests: moto (`moto_server` from PyPI) by default, or garage when
//! `FERROVOL_TEST_S3=garage`. Each fixture starts its own server on a free loopback port
//! and stops it when dropped, so parallel test binaries never share state. A server that
//! cannot be started fails the test with the command that was tried: never a skip.

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::endpoint::S3Endpoint;

/// Which server a fixture runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    Moto,
    Garage,
}

impl Server {
    /// The server `FERROVOL_TEST_S3` names (`moto`, the default, or `garage`).
    pub fn from_env() -> Server {
        match std::env::var("FERROVOL_TEST_S3").as_deref() {
            Ok("garage") => Server::Garage,
            Ok("moto") | Ok("") | Err(_) => Server::Moto,
            Ok(other) => panic!("FERROVOL_TEST_S3={other:?}: expected moto or garage"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Server::Moto => "moto",
            Server::Garage => "garage",
        }
    }
}

/// A running S3 server and credentials for it.
#[derive(Debug)]
pub struct S3Server {
    pub server: Server,
    pub addr: SocketAddr,
    /// Credentials that the server accepts.
    pub endpoint: S3Endpoint,
    /// A bucket that exists from the start (garage's default bucket; created on moto).
    pub bucket: String,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

const ACCESS_KEY: &str = "GK0123456789abcdef01234567";
const SECRET_KEY: &str = "9f3c1e7b5a2d4f6e8c0b1a3d5f7e9c2b4a6d8f0e1c3b5a7d9f2e4c6b8a0d1f3e";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free loopback port")
}

impl S3Server {
    /// Starts the server `FERROVOL_TEST_S3` names.
    pub fn start() -> S3Server {
        Self::start_kind(Server::from_env())
    }

    /// Starts a server of kind `server`.
    pub fn start_kind(server: Server) -> S3Server {
        Self::start_with_env(server, &[])
    }

    /// Starts a server of kind `server` with extra environment variables for its process
    /// (benchmarks start garage with an `LD_PRELOAD` shim this way).
    pub fn start_with_env(server: Server, env: &[(&str, &str)]) -> S3Server {
        let dir = tempfile::Builder::new().prefix("fvs3-").tempdir().expect("a temp dir for the S3 server");
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let bucket = "fv-test-shared".to_string();
        let log = std::fs::File::create(dir.path().join("server.log")).expect("server log");
        let mut cmd = match server {
            Server::Moto => {
                let mut c = Command::new("moto_server");
                c.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
                c
            }
            Server::Garage => {
                let rpc = free_port();
                let conf = dir.path().join("garage.toml");
                let mut f = std::fs::File::create(&conf).expect("garage config");
                write!(
                    f,
                    "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
                     replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                     rpc_secret = \"4425f5c26c5e11581d3223904324dcb5b5d5dfb14e5e7f35e38c595424f5f1e6\"\n[s3_api]\ns3_region = \"us-east-1\"\napi_bind_addr = \"{addr}\"\n",
                    d = dir.path().display(),
                )
                .expect("write garage config");
                let mut c = Command::new(std::env::var("FERROVOL_GARAGE").unwrap_or_else(|_| "garage".into()));
                c.arg("-c").arg(&conf).args(["server", "--single-node", "--default-bucket"]);
                c.env("GARAGE_DEFAULT_ACCESS_KEY", ACCESS_KEY)
                    .env("GARAGE_DEFAULT_SECRET_KEY", SECRET_KEY)
                    .env("GARAGE_DEFAULT_BUCKET", &bucket);
                c
            }
        };
        // The machine's AWS settings must not leak into the server (or the client).
        cmd.env_remove("AWS_CA_BUNDLE")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start the {} S3 server ({cmd:?}): {e}; see scripts/s3-servers", server.name())
        });
        let mut me = S3Server {
            server,
            addr,
            endpoint: S3Endpoint {
                endpoint: format!("http://{addr}"),
                region: "us-east-1".into(),
                path_style: true,
                access_key_id: ACCESS_KEY.into(),
                secret_access_key: SECRET_KEY.into(),
            },
            bucket,
            child: Some(child),
            _dir: dir,
        };
        me.wait_ready();
        if server == Server::Moto {
            me.create_bucket_blocking(&me.bucket.clone());
        }
        me
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("the {} S3 server exited at start ({status}): {}", self.server.name(), self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the {} S3 server did not listen on {} within 30 s: {}", self.server.name(), self.addr, self.log());
    }

    /// Creates a bucket from a thread of its own, so that the fixture can be started from
    /// inside a test's runtime as well as outside one.
    fn create_bucket_blocking(&self, bucket: &str) {
        let (endpoint, bucket) = (self.endpoint.clone(), bucket.to_owned());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            let client = crate::build_client(&endpoint, crate::Timeouts::default());
            rt.block_on(async {
                client.create_bucket().bucket(&bucket).send().await.expect("create the shared test bucket");
            });
        })
        .join()
        .expect("bucket creation thread");
    }

    /// Makes the server check credentials. garage always does; moto accepts anything
    /// until told otherwise, so a user with an allow-all policy and an access key is made
    /// (unauthenticated IAM calls), the fixture switches to that key, and moto is told to
    /// authenticate every request from then on. Afterwards a wrong secret key is refused
    /// with SignatureDoesNotMatch and an unknown key with InvalidAccessKeyId.
    pub fn require_auth(&mut self) {
        if self.server != Server::Moto {
            return;
        }
        let iam = |body: &str| self.post("/", body, true);
        iam("Action=CreateUser&UserName=ferrovol&Version=2010-05-08");
        let policy = "%7B%22Version%22%3A%222012-10-17%22%2C%22Statement%22%3A%5B%7B%22Effect%22%3A%22Allow%22%2C%22Action%22%3A%22%2A%22%2C%22Resource%22%3A%22%2A%22%7D%5D%7D";
        iam(&format!(
            "Action=PutUserPolicy&UserName=ferrovol&PolicyName=all&PolicyDocument={policy}&Version=2010-05-08"
        ));
        let out = iam("Action=CreateAccessKey&UserName=ferrovol&Version=2010-05-08");
        let field = |name: &str| {
            out.split(&format!("<{name}>"))
                .nth(1)
                .and_then(|r| r.split(&format!("</{name}>")).next())
                .unwrap_or_else(|| panic!("moto's CreateAccessKey answer lacks {name}: {out}"))
                .to_owned()
        };
        self.endpoint.access_key_id = field("AccessKeyId");
        self.endpoint.secret_access_key = field("SecretAccessKey");
        self.post("/moto-api/reset-auth", "0", false);
    }

    /// A plain HTTP POST to the server (moto's IAM and control API); answers the body.
    fn post(&self, path: &str, body: &str, iam: bool) -> String {
        use std::io::Read;
        let mut s = TcpStream::connect(self.addr).expect("connect to the S3 server");
        let auth = if iam {
            "Authorization: AWS4-HMAC-SHA256 Credential=AKIAFERROVOL/20240101/us-east-1/iam/aws4_request, SignedHeaders=host, Signature=00\r\n"
        } else {
            ""
        };
        // moto's control API reads the raw body, which a form content type would consume.
        let ctype = if iam { "application/x-www-form-urlencoded" } else { "text/plain" };
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: {}\r\n{auth}Content-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        )
        .expect("write the request");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read the answer");
        assert!(out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200"), "POST {path} {body}: {out}");
        out
    }

    /// The server process's ID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("server.log")).unwrap_or_default()
    }

    /// The secrets a CSI request carries to reach this server.
    pub fn secrets(&self) -> HashMap<String, String> {
        HashMap::from([
            ("accessKeyID".to_string(), self.endpoint.access_key_id.clone()),
            ("secretAccessKey".to_string(), self.endpoint.secret_access_key.clone()),
            ("endpoint".to_string(), self.endpoint.endpoint.clone()),
            ("region".to_string(), self.endpoint.region.clone()),
        ])
    }

    /// Stops the server (to test unreachability); [`S3Server::restart`] brings it back on
    /// the same port with the same data (garage) or empty (moto keeps state in memory).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Pauses the server (SIGSTOP): connections are accepted by the kernel but never
    /// answered, the hardest case for a client's timeouts. [`S3Server::resume`] undoes it.
    pub fn pause(&self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").args(["-STOP", &c.id().to_string()]).status();
            // A request already read before the signal landed may still be answered.
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
    }

    pub fn resume(&self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").args(["-CONT", &c.id().to_string()]).status();
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.resume();
        self.stop();
    }
}
