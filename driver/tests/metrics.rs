//! End-to-end check of `--metrics-listen`: runs the built `ferrovol run` all-in-one on a
//! temporary data dir, waits for `/healthz`, makes CSI calls with the binary's own client
//! subcommands, and reads the RPC counters and the loop capacity back from `/metrics`.
//! Needs root (the driver attaches loop devices), so it runs with `--features kernel-tests`.
#![cfg(feature = "kernel-tests")]

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferrovol_metrics::sample;
use ferrovol_metrics::testing::{free_local_addr, http_get, Reply};

/// Overrides which binary runs, as in the e2e crate.
const BINARY_ENV: &str = "FERROVOL_BIN";

/// `$FERROVOL_BIN`, else the `ferrovol` binary cargo built for this test.
fn binary() -> PathBuf {
    match std::env::var_os(BINARY_ENV) {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_BIN_EXE_ferrovol")),
    }
}

/// The driver process: stopped with SIGTERM (SIGKILL after 10 s) when dropped, so every
/// path out of the test, a failed assertion included, ends it before the temp dir goes.
struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("ferrovol run exited early with {status}; its log:\n{}", self.log());
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a client subcommand of the binary against `endpoint`; panics with its output on failure.
fn client(endpoint: &str, args: &[&str], driver: &Running) -> String {
    let out: Output = Command::new(binary())
        .args(args)
        .args(["--endpoint", endpoint])
        .output()
        .unwrap_or_else(|e| panic!("running ferrovol {args:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "ferrovol {args:?} failed ({}):\n{stdout}{}\ndriver log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        driver.log()
    );
    stdout
}

fn start(dir: &Path, metrics: SocketAddr, endpoint: &str) -> Running {
    let log = dir.join("driver.log");
    let log_file = std::fs::File::create(&log).expect("create the driver log");
    let child = Command::new(binary())
        .arg("run")
        .args(["--endpoint", endpoint])
        .args(["--node-id", "metrics-test"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--kubelet-dir")
        .arg(dir.join("kubelet"))
        .args(["--metrics-listen", &metrics.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", binary().display()));
    Running { child, log }
}

#[test]
fn metrics_endpoint_counts_csi_calls_and_reports_loop_capacity() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the kernel tests need root (the driver uses loop devices); run them as root or without --features kernel-tests"
    );
    let tmp = tempfile::tempdir().expect("a temp dir");
    let addr = free_local_addr();
    let endpoint = format!("unix://{}", tmp.path().join("csi.sock").display());
    // Declared after `tmp`, so dropped (the process stopped) before the dir is removed.
    let mut driver = start(tmp.path(), addr, &endpoint);

    // Ready: /healthz answers 200 once the start-up reconcile is done.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        driver.check_alive();
        match http_get(addr, "/healthz", "*/*") {
            Ok(Reply { status: 200, body, .. }) => {
                assert_eq!(body, "ok\n");
                break;
            }
            Ok(Reply { status: 503, body, .. }) => assert!(body.starts_with("not ready"), "{body}"),
            Ok(other) => panic!("/healthz answered {other:?}"),
            Err(_) => {} // not listening yet
        }
        assert!(Instant::now() < deadline, "/healthz not 200 within 30 s; driver log:\n{}", driver.log());
        std::thread::sleep(Duration::from_millis(100));
    }

    client(&endpoint, &["probe"], &driver);
    let created = client(&endpoint, &["create", "pvc-metrics-test", "--size", "64Mi"], &driver);
    let volume_id = created
        .split_whitespace()
        .nth(1)
        .filter(|_| created.starts_with("created "))
        .unwrap_or_else(|| panic!("unexpected `ferrovol create` output: {created}"))
        .to_owned();
    client(&endpoint, &["delete", &volume_id], &driver);

    let om = http_get(addr, "/metrics", "application/openmetrics-text;version=1.0.0,*/*;q=0.1").expect("GET /metrics");
    let text = om.body;
    assert_eq!(om.status, 200, "{text}");
    assert_eq!(om.content_type.as_deref(), Some("application/openmetrics-text; version=1.0.0; charset=utf-8"));
    assert!(text.ends_with("# EOF\n"), "{text}");
    for method in ["GetPluginInfo", "Probe", "NodeGetInfo", "CreateVolume", "DeleteVolume"] {
        let series = format!("ferrovol_rpc_requests_total{{method=\"{method}\",code=\"OK\"}}");
        assert_eq!(sample(&text, &series), Some(1.0), "{series} in:\n{text}");
        let count = format!("ferrovol_rpc_duration_seconds_count{{method=\"{method}\"}}");
        assert_eq!(sample(&text, &count), Some(1.0), "{count} in:\n{text}");
    }
    assert!(!text.contains(&volume_id) && !text.contains("pvc-metrics-test"), "a volume in a label:\n{text}");
    let available = sample(&text, "ferrovol_loop_capacity_bytes{kind=\"available\"}").unwrap_or(0.0);
    let total = sample(&text, "ferrovol_loop_capacity_bytes{kind=\"total\"}").unwrap_or(0.0);
    assert!(available > 0.0 && total >= available, "loop capacity missing or zero:\n{text}");
    let version = format!("ferrovol_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"));
    assert_eq!(sample(&text, &version), Some(1.0), "{text}");

    // Without an OpenMetrics Accept header: the classic text format.
    let plain = http_get(addr, "/metrics", "*/*").expect("GET /metrics");
    assert_eq!(plain.status, 200);
    assert_eq!(plain.content_type.as_deref(), Some("text/plain; version=0.0.4; charset=utf-8"));
    let series = "ferrovol_rpc_requests_total{method=\"CreateVolume\",code=\"OK\"}";
    assert!(sample(&plain.body, series).is_some(), "{}", plain.body);

    assert_eq!(http_get(addr, "/nothing-here", "*/*").expect("GET /nothing-here").status, 404);

    // SIGTERM stops the metrics endpoint with the gRPC servers.
    drop(driver);
    assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(), "the metrics port is still open");
}
