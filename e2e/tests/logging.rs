//! Secrets never reach the driver's log: every RPC that carries `secrets` is called with
//! distinctive values at `--log-level trace`, in text and JSON formats, and the captured
//! output (and every error message) is searched for them.
#![cfg(feature = "kernel-tests")]
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use ferrovol_e2e::assertions::expect_ok_or;
use ferrovol_e2e::csi::{GetSnapshotRequest, ListSnapshotsRequest, ValidateVolumeCapabilitiesRequest};
use ferrovol_e2e::requests::{create_request, unique_name};
use ferrovol_e2e::{expect_code, expect_ok, steps, Access, Code, Driver, DriverOptions, Family, LogFormat, MIB};
use tonic::Status;

ferrovol_e2e::family_tests!(loop_family => ferrovol_e2e::Family::loop_family();
    secrets_stay_out_of_text_logs,
    secrets_stay_out_of_json_logs,
);

/// Secret values, one per RPC, that cannot appear in a log by accident.
struct Secrets {
    values: Vec<String>,
}

impl Secrets {
    fn new() -> Secrets {
        Secrets { values: Vec::new() }
    }

    /// A fresh secrets map for `rpc` (two keys, as a username/password pair would be).
    fn for_rpc(&mut self, rpc: &str) -> HashMap<String, String> {
        let user = format!("Zq7user{rpc}X{}K", std::process::id());
        let password = format!("Pw9{}{rpc}Vj3secret", std::process::id() * 7 + 13);
        self.values.push(user.clone());
        self.values.push(password.clone());
        HashMap::from([("username".to_owned(), user), ("password".to_owned(), password)])
    }

    #[track_caller]
    fn assert_absent(&self, text: &str, what: &str) {
        for value in &self.values {
            assert!(!text.contains(value.as_str()), "{what} contains the secret value {value:?}");
        }
    }

    #[track_caller]
    fn assert_not_in_status(&self, status: &Status, what: &str) {
        self.assert_absent(status.message(), &format!("the error message of {what}"));
    }
}

async fn secrets_stay_out_of_logs(family: &Family, format: LogFormat) {
    let driver = Driver::start(
        family,
        DriverOptions { log_format: Some(format), log_level: Some("trace".to_owned()), ..DriverOptions::default() },
    )
    .await;
    let mut secrets = Secrets::new();
    let fs = *family.fs_types.first().expect("a filesystem");
    let access = Access::Mount(fs);
    let name = unique_name("pvc", "secrets");

    // A failing call: error paths must redact too.
    let mut bad = create_request(family, &unique_name("pvc", "bad"), access, fs.small_bytes());
    bad.parameters.insert("colour".to_owned(), "blue".to_owned());
    bad.secrets = secrets.for_rpc("CreateVolumeBad");
    let status = expect_code(
        driver.controller().create_volume(bad).await,
        Code::InvalidArgument,
        "CreateVolume with an unknown parameter",
    );
    secrets.assert_not_in_status(&status, "CreateVolume");

    let mut request = create_request(family, &name, access, fs.small_bytes());
    request.secrets = secrets.for_rpc("CreateVolume");
    let mut vol = steps::create_volume(family, &driver, request, access).await;

    let validate = ValidateVolumeCapabilitiesRequest {
        volume_id: vol.id.clone(),
        volume_capabilities: vec![vol.capability.clone()],
        secrets: secrets.for_rpc("Validate"),
        ..Default::default()
    };
    expect_ok(driver.controller().validate_volume_capabilities(validate).await, "ValidateVolumeCapabilities");

    let mut publish = vol.controller_publish_request(driver.node_id());
    publish.secrets = secrets.for_rpc("ControllerPublish");
    vol.publish_context =
        expect_ok(driver.controller().controller_publish_volume(publish).await, "ControllerPublishVolume")
            .publish_context;

    let staging = driver.staging_dir(&name);
    let mut stage = vol.stage_request(&staging);
    stage.secrets = secrets.for_rpc("NodeStage");
    expect_ok(driver.node().node_stage_volume(stage).await, "NodeStageVolume");

    let target = driver.target_path(&name);
    let mut node_publish = vol.publish_request(&staging, &target, false);
    node_publish.secrets = secrets.for_rpc("NodePublish");
    expect_ok(driver.node().node_publish_volume(node_publish).await, "NodePublishVolume");

    // A failing node call with secrets: the same target, now read-only (ALREADY_EXISTS).
    let mut wrong = vol.publish_request(&staging, &target, true);
    wrong.secrets = secrets.for_rpc("NodePublishBad");
    let refused = driver.node().node_publish_volume(wrong).await;
    let status = refused.expect_err("a second NodePublishVolume with other arguments is refused");
    secrets.assert_not_in_status(&status, "a refused NodePublishVolume");

    let mut snapshot = vol.snapshot_request(&unique_name("snapshot", "secrets"));
    snapshot.secrets = secrets.for_rpc("CreateSnapshot");
    let snap =
        expect_ok(driver.controller().create_snapshot(snapshot).await, "CreateSnapshot").snapshot.expect("snapshot");
    expect_ok(
        driver
            .controller()
            .list_snapshots(ListSnapshotsRequest {
                snapshot_id: snap.snapshot_id.clone(),
                secrets: secrets.for_rpc("ListSnapshots"),
                ..Default::default()
            })
            .await,
        "ListSnapshots",
    );
    expect_ok(
        driver
            .controller()
            .get_snapshot(GetSnapshotRequest {
                snapshot_id: snap.snapshot_id.clone(),
                secrets: secrets.for_rpc("GetSnapshot"),
            })
            .await,
        "GetSnapshot",
    );

    let grown = vol.capacity + 16 * MIB;
    let mut expand = vol.controller_expand_request(grown);
    expand.secrets = secrets.for_rpc("ControllerExpand");
    expect_ok(driver.controller().controller_expand_volume(expand).await, "ControllerExpandVolume");
    let mut node_expand = vol.node_expand_request(&target, &staging, grown);
    node_expand.secrets = secrets.for_rpc("NodeExpand");
    // Only the logging matters here: success and failure paths must both redact.
    if let Err(status) = driver.node().node_expand_volume(node_expand).await {
        secrets.assert_not_in_status(&status, "NodeExpandVolume");
    }

    steps::unpublish(&driver, &vol, &target).await;
    steps::unstage(&driver, &vol, &staging).await;
    let mut unpublish = vol.controller_unpublish_request(driver.node_id());
    unpublish.secrets = secrets.for_rpc("ControllerUnpublish");
    expect_ok(driver.controller().controller_unpublish_volume(unpublish).await, "ControllerUnpublishVolume");

    let mut delete_snapshot = ferrovol_e2e::requests::delete_snapshot_request(&snap.snapshot_id);
    delete_snapshot.secrets = secrets.for_rpc("DeleteSnapshot");
    expect_ok(driver.controller().delete_snapshot(delete_snapshot).await, "DeleteSnapshot");
    let mut delete = vol.delete_request();
    delete.secrets = secrets.for_rpc("DeleteVolume");
    expect_ok(driver.controller().delete_volume(delete.clone()).await, "DeleteVolume");
    expect_ok_or(driver.controller().delete_volume(delete).await, &[], "DeleteVolume repeated");
    driver.assert_no_leaks();

    // Give buffered log writers a moment, then read everything the process wrote.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let log = driver.log_text();
    assert!(
        log.lines().filter(|line| !line.trim().is_empty()).count() >= 5,
        "the trace-level log is (nearly) empty, so the secrets check proves nothing:\n{log}"
    );
    assert!(
        log.contains(&name) || log.contains(&vol.id),
        "the trace-level log never names the volume it worked on, so the requests were not logged:\n{}",
        driver.log_tail(40)
    );
    secrets.assert_absent(&log, "the driver's log");
    if format == LogFormat::Json {
        for line in driver.stderr_text().lines().filter(|line| !line.trim().is_empty()) {
            let parsed: Result<serde_json::Value, _> = serde_json::from_str(line);
            assert!(
                matches!(parsed, Ok(serde_json::Value::Object(_))),
                "--log-format json wrote a line that is not a JSON object: {line}"
            );
        }
    }
}

async fn secrets_stay_out_of_text_logs(family: &Family) {
    secrets_stay_out_of_logs(family, LogFormat::Text).await;
}

async fn secrets_stay_out_of_json_logs(family: &Family) {
    secrets_stay_out_of_logs(family, LogFormat::Json).await;
}
