//! The S3 family's test stack: a real S3 server, the real `ferrovol-mounter` process, and
//! the driver pointed at the mounter with `--mounter-socket`. Fields drop in order: the
//! driver (and its sandbox, which unmounts everything under it while the mounter still
//! answers), then the mounter, then the server.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferrovol_s3::testing::S3Server;
use tempfile::TempDir;

use crate::{Driver, DriverOptions, Family, Sandbox};

/// The mounter binary: `$FERROVOL_MOUNTER_BIN`, else beside the `ferrovol` binary.
pub fn mounter_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("FERROVOL_MOUNTER_BIN") {
        return PathBuf::from(p);
    }
    let bin = crate::binary::ferrovol_binary();
    let candidate = bin.with_file_name("ferrovol-mounter");
    assert!(
        candidate.is_file(),
        "the ferrovol-mounter binary is missing at {}: run `cargo build --bins` first",
        candidate.display()
    );
    candidate
}

/// A running `ferrovol-mounter`.
#[derive(Debug)]
pub struct Mounter {
    child: Option<Child>,
    dir: TempDir,
    pub log_level: String,
    /// Where it serves /metrics and /healthz (the same port across restarts).
    pub metrics: SocketAddr,
}

impl Mounter {
    /// Starts a mounter on a socket of its own and waits until it listens.
    pub fn start(log_level: &str) -> Mounter {
        let dir = tempfile::Builder::new().prefix("fv-mounter-").tempdir().expect("mounter dir");
        let metrics = ferrovol_metrics::testing::free_local_addr();
        let mut m = Mounter { child: None, dir, log_level: log_level.to_owned(), metrics };
        m.spawn();
        m
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("mounter.sock")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("mounter.log")
    }

    /// Everything the mounter logged so far (all runs).
    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.log_path()).unwrap_or_default()).into_owned()
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("mounter log");
        let child = Command::new(mounter_binary())
            .arg("--socket")
            .arg(self.socket())
            .args(["--log-level", &self.log_level])
            .args(["--metrics-listen", &self.metrics.to_string()])
            .env_remove("AWS_CA_BUNDLE")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start ferrovol-mounter");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("ferrovol-mounter exited at start ({status}):\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("ferrovol-mounter did not listen within 20 s:\n{}", self.log_text());
    }

    /// Kills the mounter with SIGKILL: its FUSE mounts stop answering (ENOTCONN).
    pub fn kill_9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the mounter again on the same socket.
    pub fn restart(&mut self) {
        self.kill_9();
        self.spawn();
    }

    /// Stops the mounter (SIGSTOP): alive but answering nothing. [`Mounter::resume`] undoes it.
    /// Returns once every thread of it is stopped: a thread that had not yet been scheduled
    /// to take the signal could still answer a request (seen on a loaded machine).
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
        let Some(pid) = self.pid() else { return };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let stopped = std::fs::read_dir(format!("/proc/{pid}/task")).map(|tasks| {
                tasks.flatten().all(|t| {
                    std::fs::read_to_string(t.path().join("stat"))
                        .ok()
                        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('T')))
                        .unwrap_or(true)
                })
            });
            if stopped.unwrap_or(true) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("ferrovol-mounter (pid {pid}) did not stop within 10 s of SIGSTOP");
    }

    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(c) = &self.child {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(c.id()).unwrap_or(i32::MAX)), sig);
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Mounter {
    fn drop(&mut self) {
        self.resume();
        if let Some(c) = &self.child {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(c.id()).unwrap_or(i32::MAX)),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                    self.child = None;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill_9();
        if std::thread::panicking() {
            eprintln!("---- ferrovol-mounter log ----\n{}\n---- end ----", self.log_text());
        }
    }
}

/// Driver, mounter and S3 server for one test.
#[derive(Debug)]
pub struct S3Stack {
    pub driver: Driver,
    pub mounter: Mounter,
    pub server: S3Server,
    /// Where the driver serves /metrics and /healthz.
    pub driver_metrics: SocketAddr,
}

impl S3Stack {
    /// Starts all three; the driver at `log_level` (None: the default).
    pub async fn start(log_level: Option<&str>) -> S3Stack {
        Self::start_with(log_level, false).await
    }

    /// As [`S3Stack::start`]; `check_credentials` makes moto refuse wrong keys (garage
    /// always does). moto then also refuses some correctly signed ListObjectsV2 calls
    /// (SignatureDoesNotMatch), so only tests of refused credentials ask for it.
    pub async fn start_with(log_level: Option<&str>, check_credentials: bool) -> S3Stack {
        let mut server = S3Server::start();
        if check_credentials {
            server.require_auth();
        }
        let mounter = Mounter::start(log_level.unwrap_or("info"));
        let mut family = Family::loop_family();
        let driver_metrics = ferrovol_metrics::testing::free_local_addr();
        family.driver_args.extend([
            "--mounter-socket".to_owned(),
            mounter.socket().display().to_string(),
            "--metrics-listen".to_owned(),
            driver_metrics.to_string(),
        ]);
        let options = DriverOptions { log_level: log_level.map(str::to_owned), ..DriverOptions::default() };
        let driver = Driver::start_in(Sandbox::new(), &family, options).await;
        S3Stack { driver, mounter, server, driver_metrics }
    }

    /// The secrets every S3 request carries.
    pub fn secrets(&self) -> HashMap<String, String> {
        self.server.secrets()
    }

    /// StorageClass parameters: a bucket per volume, or volumes under prefixes of the
    /// server's shared bucket.
    pub fn parameters(&self, shared_bucket: bool) -> HashMap<String, String> {
        let mut p = HashMap::from([("type".to_owned(), "s3".to_owned())]);
        if shared_bucket {
            p.insert("bucket".to_owned(), self.server.bucket.clone());
        }
        p
    }

    /// An S3 client as a raw user of the server.
    pub fn client(&self) -> aws_sdk_s3::Client {
        ferrovol_s3::build_client(&self.server.endpoint, ferrovol_s3::Timeouts::default())
    }

    /// Every key in `bucket` under `prefix`.
    pub async fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let client = self.client();
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page =
                match client.list_objects_v2().bucket(bucket).prefix(prefix).set_continuation_token(token).send().await
                {
                    Ok(p) => p,
                    Err(e) => {
                        let f = ferrovol_s3::error::classify("ListObjectsV2", bucket, &e);
                        if f.kind == ferrovol_s3::error::Kind::NotFound {
                            return out;
                        }
                        panic!("{}", f.message);
                    }
                };
            out.extend(page.contents().iter().filter_map(|o| o.key().map(str::to_owned)));
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => return out,
            }
        }
    }

    /// Whether `bucket` exists.
    pub async fn bucket_exists(&self, bucket: &str) -> bool {
        self.client().head_bucket().bucket(bucket).send().await.is_ok()
    }
}

impl Drop for S3Stack {
    /// A stopped mounter is set going again before the driver's sandbox unmounts
    /// everything (a failed assertion may leave it stopped).
    fn drop(&mut self) {
        self.mounter.resume();
    }
}

/// Whether `path` is a FUSE mount of ours (per /proc/self/mountinfo).
pub fn is_ferrovol_fuse(path: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = path.display().to_string();
    text.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.len() > 4 && f[4] == want && l.contains(" - fuse.ferrovol ")
    })
}
