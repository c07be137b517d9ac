//! The S3 family end to end: the real driver, the real `ferrovol-mounter` with our FUSE
//! filesystem, and a real S3 server (moto; garage with FERROVOL_TEST_S3=garage). The CSI
//! rules as they apply to S3 volumes, the Kubernetes-order lifecycle with data checked at
//! every step, a node-plugin restart under continuous I/O, a mounter that dies, an
//! unreachable server, and secrets kept out of every log.
#![cfg(feature = "s3-tests")]
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrovol_e2e::assertions::Mismatches;
use ferrovol_e2e::csi::volume_capability::access_mode::Mode;
use ferrovol_e2e::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use ferrovol_e2e::csi::volume_usage::Unit;
use ferrovol_e2e::csi::{
    CapacityRange, ControllerExpandVolumeRequest, ControllerGetVolumeRequest, ControllerPublishVolumeRequest,
    CreateSnapshotRequest, CreateVolumeRequest, DeleteSnapshotRequest, DeleteVolumeRequest, ListVolumesRequest,
    NodeExpandVolumeRequest, NodeGetVolumeStatsRequest, NodePublishVolumeRequest, NodeStageVolumeRequest,
    NodeUnpublishVolumeRequest, NodeUnstageVolumeRequest, ValidateVolumeCapabilitiesRequest, Volume, VolumeCapability,
};
use ferrovol_e2e::requests::{snapshot_source, unique_name, volume_source};
use ferrovol_e2e::s3::{is_ferrovol_fuse, S3Stack};
use ferrovol_e2e::{data, expect_code, expect_ok, Code, MIB};

fn mount_cap(mode: Mode, flags: &[&str]) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: String::new(),
            mount_flags: flags.iter().map(|s| s.to_string()).collect(),
            volume_mount_group: String::new(),
        })),
    }
}

fn block_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

fn create_req(stack: &S3Stack, name: &str, bytes: i64, shared: bool) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter, &[])],
        parameters: stack.parameters(shared),
        secrets: stack.secrets(),
        ..Default::default()
    }
}

async fn create(stack: &S3Stack, req: CreateVolumeRequest) -> Volume {
    let what = format!("CreateVolume {}", req.name);
    expect_ok(stack.driver.controller().create_volume(req).await, &what).volume.unwrap()
}

async fn stage(stack: &S3Stack, id: &str, staging: &Path, cap: VolumeCapability) {
    let req = NodeStageVolumeRequest {
        volume_id: id.to_owned(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap),
        secrets: stack.secrets(),
        ..Default::default()
    };
    expect_ok(stack.driver.node().node_stage_volume(req).await, &format!("NodeStage {id}"));
}

fn publish_req(
    id: &str,
    staging: &Path,
    target: &Path,
    cap: VolumeCapability,
    readonly: bool,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: id.to_owned(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap),
        readonly,
        ..Default::default()
    }
}

async fn publish(stack: &S3Stack, id: &str, staging: &Path, target: &Path, readonly: bool) {
    let req = publish_req(id, staging, target, mount_cap(Mode::MultiNodeMultiWriter, &[]), readonly);
    expect_ok(stack.driver.node().node_publish_volume(req).await, &format!("NodePublish {id}"));
}

async fn unpublish(stack: &S3Stack, id: &str, target: &Path) {
    let req = NodeUnpublishVolumeRequest { volume_id: id.to_owned(), target_path: target.display().to_string() };
    expect_ok(stack.driver.node().node_unpublish_volume(req).await, &format!("NodeUnpublish {id}"));
}

async fn unstage(stack: &S3Stack, id: &str, staging: &Path) {
    let req = NodeUnstageVolumeRequest { volume_id: id.to_owned(), staging_target_path: staging.display().to_string() };
    expect_ok(stack.driver.node().node_unstage_volume(req).await, &format!("NodeUnstage {id}"));
}

async fn delete(stack: &S3Stack, id: &str) {
    let req = DeleteVolumeRequest { volume_id: id.to_owned(), secrets: stack.secrets() };
    expect_ok(stack.driver.controller().delete_volume(req).await, &format!("DeleteVolume {id}"));
}

/// Files a test writes and checks: a nested directory, a file of several multipart parts'
/// worth, and a small one.
fn write_payload(root: &Path, seed: u64) -> HashMap<String, Vec<u8>> {
    let files = HashMap::from([
        ("dir/sub/big.bin".to_owned(), data::pattern(seed, 3 * MIB as usize + 4321)),
        ("small.txt".to_owned(), data::pattern(seed + 1, 1000)),
    ]);
    std::fs::create_dir_all(root.join("dir/sub")).unwrap();
    for (name, content) in &files {
        let mut f = std::fs::File::create(root.join(name)).unwrap();
        f.write_all(content).unwrap();
        f.sync_all().unwrap();
    }
    files
}

fn check_payload(root: &Path, files: &HashMap<String, Vec<u8>>, what: &str) {
    for (name, content) in files {
        data::assert_content(&root.join(name), content, &format!("{what}: {name}"));
    }
}

fn statfs_total(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).unwrap();
    st.blocks() as u64 * st.fragment_size() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lifecycle_in_kubernetes_order() {
    let stack = S3Stack::start(None).await;
    let d = &stack.driver;
    for shared in [false, true] {
        let label = if shared { "shared bucket" } else { "own bucket" };
        let name = unique_name("pvc", "s3");
        let vol = create(&stack, create_req(&stack, &name, 64 * MIB, shared)).await;
        assert!(vol.volume_id.starts_with("s3.vol:"), "{label}: {}", vol.volume_id);
        assert!(vol.accessible_topology.is_empty(), "{label}: s3 volumes are reachable from every node");
        assert_eq!(vol.capacity_bytes, 64 * MIB, "{label}: the quota");
        let id = vol.volume_id.clone();
        let bucket = id.split(':').nth(1).unwrap().to_owned();
        assert!(stack.bucket_exists(&bucket).await, "{label}: bucket {bucket}");

        let publish_ctl = ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: d.node_id().to_owned(),
            volume_capability: Some(mount_cap(Mode::MultiNodeMultiWriter, &[])),
            secrets: stack.secrets(),
            ..Default::default()
        };
        expect_ok(d.controller().controller_publish_volume(publish_ctl).await, "ControllerPublish");

        let (staging, target) = (d.staging_dir(&format!("st-{name}")), d.target_path(&format!("tg-{name}")));
        stage(&stack, &id, &staging, mount_cap(Mode::MultiNodeMultiWriter, &[])).await;
        assert!(is_ferrovol_fuse(&staging), "{label}: staged through FUSE at {}", staging.display());
        stage(&stack, &id, &staging, mount_cap(Mode::MultiNodeMultiWriter, &[])).await; // repeat: OK
        publish(&stack, &id, &staging, &target, false).await;
        publish(&stack, &id, &staging, &target, false).await; // repeat: OK
        let files = write_payload(&target, 7);
        check_payload(&target, &files, label);
        // The files are objects under the volume's data prefix.
        let keys = stack.keys(&bucket, "ferrovol/volumes/").await;
        assert!(keys.iter().any(|k| k.ends_with("/fs/dir/sub/big.bin")), "{label}: objects {keys:?}");

        let stats = expect_ok(
            d.node()
                .node_get_volume_stats(NodeGetVolumeStatsRequest {
                    volume_id: id.clone(),
                    volume_path: target.display().to_string(),
                    staging_target_path: staging.display().to_string(),
                })
                .await,
            "NodeGetVolumeStats",
        );
        let bytes = stats.usage.iter().find(|u| u.unit == Unit::Bytes as i32).unwrap();
        assert_eq!(bytes.total, 64 * MIB, "{label}: total is the quota");
        assert!(bytes.used >= 3 * MIB + 5321, "{label}: used {} counts the files", bytes.used);
        assert!(!stats.volume_condition.unwrap().abnormal, "{label}: healthy");

        // Snapshot, then restore into a larger volume.
        let snap = expect_ok(
            d.controller()
                .create_snapshot(CreateSnapshotRequest {
                    source_volume_id: id.clone(),
                    name: unique_name("snapshot", "s3"),
                    secrets: stack.secrets(),
                    parameters: HashMap::new(),
                })
                .await,
            "CreateSnapshot",
        )
        .snapshot
        .unwrap();
        assert!(snap.ready_to_use && snap.size_bytes >= 3 * MIB + 5321, "{label}: snapshot {snap:?}");
        let mut restore_req = create_req(&stack, &unique_name("pvc", "s3r"), 128 * MIB, shared);
        restore_req.volume_content_source = snapshot_source(&snap.snapshot_id);
        let restored = create(&stack, restore_req).await;
        let mut clone_req = create_req(&stack, &unique_name("pvc", "s3c"), 64 * MIB, shared);
        clone_req.volume_content_source = volume_source(&id);
        let cloned = create(&stack, clone_req).await;
        for (copy, what) in [(&restored, "restore"), (&cloned, "clone")] {
            let (st, tg) = (d.staging_dir(&format!("st-{what}-{name}")), d.target_path(&format!("tg-{what}-{name}")));
            stage(&stack, &copy.volume_id, &st, mount_cap(Mode::MultiNodeMultiWriter, &[])).await;
            publish(&stack, &copy.volume_id, &st, &tg, false).await;
            check_payload(&tg, &files, &format!("{label} {what}"));
            unpublish(&stack, &copy.volume_id, &tg).await;
            unstage(&stack, &copy.volume_id, &st).await;
            delete(&stack, &copy.volume_id).await;
        }
        assert_eq!(statfs_total(&target), 64 * MIB as u64, "{label}: statfs shows the quota");

        // Expansion: the controller raises the quota, the node has the mounter read it.
        let expanded = expect_ok(
            d.controller()
                .controller_expand_volume(ControllerExpandVolumeRequest {
                    volume_id: id.clone(),
                    capacity_range: Some(CapacityRange { required_bytes: 96 * MIB, limit_bytes: 0 }),
                    secrets: stack.secrets(),
                    volume_capability: Some(mount_cap(Mode::MultiNodeMultiWriter, &[])),
                })
                .await,
            "ControllerExpandVolume",
        );
        assert_eq!(expanded.capacity_bytes, 96 * MIB);
        assert!(expanded.node_expansion_required, "the node must tell the mounter");
        let node_expanded = expect_ok(
            d.node()
                .node_expand_volume(NodeExpandVolumeRequest {
                    volume_id: id.clone(),
                    volume_path: target.display().to_string(),
                    capacity_range: Some(CapacityRange { required_bytes: 96 * MIB, limit_bytes: 0 }),
                    staging_target_path: staging.display().to_string(),
                    volume_capability: Some(mount_cap(Mode::MultiNodeMultiWriter, &[])),
                    secrets: HashMap::new(),
                })
                .await,
            "NodeExpandVolume",
        );
        assert_eq!(node_expanded.capacity_bytes, 96 * MIB);
        assert_eq!(statfs_total(&target), 96 * MIB as u64, "{label}: statfs shows the new quota");

        unpublish(&stack, &id, &target).await;
        unpublish(&stack, &id, &target).await; // repeat: OK
        unstage(&stack, &id, &staging).await;
        unstage(&stack, &id, &staging).await; // repeat: OK
        assert!(!is_ferrovol_fuse(&staging), "{label}: unmounted");
        let unpublish_ctl = ferrovol_e2e::csi::ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: d.node_id().to_owned(),
            secrets: stack.secrets(),
        };
        expect_ok(d.controller().controller_unpublish_volume(unpublish_ctl).await, "ControllerUnpublish");
        delete(&stack, &id).await;
        delete(&stack, &id).await; // repeat: OK
        let del_snap = DeleteSnapshotRequest { snapshot_id: snap.snapshot_id.clone(), secrets: stack.secrets() };
        expect_ok(d.controller().delete_snapshot(del_snap).await, "DeleteSnapshot");
        if shared {
            let left = stack.keys(&bucket, "ferrovol/volumes/").await;
            assert!(left.is_empty(), "{label}: objects left behind: {left:?}");
        } else {
            assert!(!stack.bucket_exists(&bucket).await, "{label}: the volume's own bucket {bucket} is gone");
        }
    }
    d.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn csi_rules_for_s3_volumes() {
    let stack = S3Stack::start(None).await;
    let d = &stack.driver;
    let c = || d.controller();

    // Idempotent create; an incompatible repeat is ALREADY_EXISTS.
    let name = unique_name("pvc", "rules");
    let vol = create(&stack, create_req(&stack, &name, 32 * MIB, true)).await;
    let again = create(&stack, create_req(&stack, &name, 32 * MIB, true)).await;
    assert_eq!(vol.volume_id, again.volume_id, "a repeat answers the same volume");
    expect_code(c().create_volume(create_req(&stack, &name, 64 * MIB, true)).await, Code::AlreadyExists, "other size");

    // Secrets: missing keys are named; a wrong secret names the refused call, never the secret.
    let mut no_secrets = create_req(&stack, &unique_name("pvc", "nosec"), 32 * MIB, true);
    no_secrets.secrets.clear();
    let st = expect_code(c().create_volume(no_secrets).await, Code::InvalidArgument, "no secrets");
    assert!(st.message().contains("accessKeyID") && st.message().contains("secretAccessKey"), "{}", st.message());

    // Requests S3 volumes cannot serve.
    let mut block = create_req(&stack, &unique_name("pvc", "block"), 32 * MIB, true);
    block.volume_capabilities = vec![block_cap()];
    expect_code(c().create_volume(block).await, Code::InvalidArgument, "block access");
    let mut no_bucket = create_req(&stack, &unique_name("pvc", "nob"), 32 * MIB, true);
    no_bucket.parameters.insert("bucket".into(), "no-such-bucket-here".into());
    let st = expect_code(c().create_volume(no_bucket).await, Code::InvalidArgument, "missing bucket");
    assert!(st.message().contains("no-such-bucket-here"), "{}", st.message());
    let mut fs = create_req(&stack, &unique_name("pvc", "fs"), 32 * MIB, true);
    fs.parameters.insert("fsType".into(), "ext4".into());
    expect_code(c().create_volume(fs).await, Code::InvalidArgument, "fsType on s3");

    // Every access mode of a mount volume is confirmed; block is not.
    for mode in
        [Mode::SingleNodeWriter, Mode::SingleNodeSingleWriter, Mode::MultiNodeReaderOnly, Mode::MultiNodeMultiWriter]
    {
        let v = expect_ok(
            c().validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_id: vol.volume_id.clone(),
                volume_capabilities: vec![mount_cap(mode, &[])],
                secrets: stack.secrets(),
                ..Default::default()
            })
            .await,
            "ValidateVolumeCapabilities",
        );
        assert!(v.confirmed.is_some(), "{mode:?} confirmed: {}", v.message);
    }
    let v = expect_ok(
        c().validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: vol.volume_id.clone(),
            volume_capabilities: vec![block_cap()],
            secrets: stack.secrets(),
            ..Default::default()
        })
        .await,
        "ValidateVolumeCapabilities block",
    );
    assert!(v.confirmed.is_none(), "block is not confirmed");

    // ListVolumes and ControllerGetVolume see it, healthy.
    let listed = expect_ok(c().list_volumes(ListVolumesRequest::default()).await, "ListVolumes");
    assert!(
        listed.entries.iter().any(|e| e.volume.as_ref().is_some_and(|v| v.volume_id == vol.volume_id)),
        "ListVolumes lists {}",
        vol.volume_id
    );
    let got = expect_ok(
        c().controller_get_volume(ControllerGetVolumeRequest { volume_id: vol.volume_id.clone() }).await,
        "ControllerGetVolume",
    );
    let cond = got.status.unwrap().volume_condition.unwrap();
    assert!(!cond.abnormal, "healthy: {}", cond.message);

    // Node: secrets are required; mount flags are checked; read-only publications refuse writes.
    let (staging, target, ro_target) =
        (d.staging_dir("rules-st"), d.target_path("rules-tg"), d.target_path("rules-ro"));
    let mut no_sec = NodeStageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(mount_cap(Mode::MultiNodeMultiWriter, &[])),
        ..Default::default()
    };
    let st =
        expect_code(d.node().node_stage_volume(no_sec.clone()).await, Code::InvalidArgument, "stage without secrets");
    assert!(st.message().contains(&vol.volume_id), "the message names the volume: {}", st.message());
    no_sec.secrets = stack.secrets();
    no_sec.volume_capability = Some(mount_cap(Mode::MultiNodeMultiWriter, &["noatime"]));
    let st = expect_code(d.node().node_stage_volume(no_sec.clone()).await, Code::InvalidArgument, "unknown flag");
    assert!(st.message().contains("noatime"), "{}", st.message());
    no_sec.volume_capability = Some(block_cap());
    expect_code(d.node().node_stage_volume(no_sec).await, Code::InvalidArgument, "stage as block");
    assert!(!is_ferrovol_fuse(&staging), "nothing mounted by refused stages");

    stage(
        &stack,
        &vol.volume_id,
        &staging,
        mount_cap(Mode::MultiNodeMultiWriter, &["uid=1234", "gid=2345", "file_mode=0640", "dir_mode=0750"]),
    )
    .await;
    publish(&stack, &vol.volume_id, &staging, &target, false).await;
    std::fs::create_dir(target.join("d")).unwrap();
    std::fs::write(target.join("d/f"), b"x").unwrap();
    use std::os::unix::fs::MetadataExt;
    let (dm, fm) = (std::fs::metadata(target.join("d")).unwrap(), std::fs::metadata(target.join("d/f")).unwrap());
    assert_eq!((fm.uid(), fm.gid(), fm.mode() & 0o7777), (1234, 2345, 0o640), "file owner and mode");
    assert_eq!(dm.mode() & 0o7777, 0o750, "directory mode");
    publish(&stack, &vol.volume_id, &staging, &ro_target, true).await;
    let err = std::fs::write(ro_target.join("nope"), b"x").expect_err("a read-only publication refuses writes");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    // The same target with another read-only setting is ALREADY_EXISTS.
    let st = d
        .node()
        .node_publish_volume(publish_req(
            &vol.volume_id,
            &staging,
            &ro_target,
            mount_cap(Mode::MultiNodeMultiWriter, &[]),
            false,
        ))
        .await;
    expect_code(st, Code::AlreadyExists, "republish read-write over read-only");

    // Quota: writing past it fails with ENOSPC.
    let mut f = std::fs::File::create(target.join("too-big")).unwrap();
    let chunk = vec![7u8; MIB as usize];
    let mut res = Ok(());
    for _ in 0..40 {
        res = f.write_all(&chunk);
        if res.is_err() {
            break;
        }
    }
    let res = res.and_then(|()| f.sync_all());
    drop(f);
    let err = res.expect_err("writing 40 MiB into a 32 MiB quota must fail");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    let _ = std::fs::remove_file(target.join("too-big"));

    for t in [&target, &ro_target] {
        unpublish(&stack, &vol.volume_id, t).await;
    }
    unstage(&stack, &vol.volume_id, &staging).await;
    delete(&stack, &vol.volume_id).await;

    // Deleting an unknown S3 volume is OK; staging a deleted one is NOT_FOUND.
    let gone = NodeStageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(mount_cap(Mode::MultiNodeMultiWriter, &[])),
        secrets: stack.secrets(),
        ..Default::default()
    };
    expect_code(d.node().node_stage_volume(gone).await, Code::NotFound, "stage a deleted volume");
    delete(&stack, &format!("s3.vol:{}:pvc-never-made", stack.server.bucket)).await;
    d.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_secret_is_refused_naming_the_call_and_never_the_secret() {
    let stack = S3Stack::start_with(None, true).await;
    let wrong_name = unique_name("pvc", "wrong");
    let mut wrong = create_req(&stack, &wrong_name, 32 * MIB, true);
    wrong.secrets.insert("secretAccessKey".into(), "NotTheSecretAtAll0123456789".into());
    let st = expect_code(
        stack.driver.controller().create_volume(wrong).await,
        Code::FailedPrecondition,
        "a wrong secret key must be refused",
    );
    assert!(!st.message().contains("NotTheSecretAtAll0123456789"), "the wrong secret leaked: {}", st.message());
    assert!(!st.message().contains(&stack.server.endpoint.secret_access_key), "the secret leaked: {}", st.message());
    assert!(st.message().contains("S3 refused"), "the message names the call S3 refused: {}", st.message());
    // Nothing was made: the volume's record is not there (a HEAD, which moto signs right).
    let record = format!("ferrovol/volumes/{}/volume.json", wrong_name);
    let head = stack.client().head_object().bucket(&stack.server.bucket).key(&record).send().await;
    assert!(head.is_err(), "a refused create left its record {record}");
}

/// Runs reads and writes on `dir` until `stop`; counts operations and failures.
fn churn(
    dir: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
) {
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let name = dir.join(format!("churn-{}", i % 8));
        let content = data::pattern(i, 64 * 1024);
        let r = (|| -> std::io::Result<()> {
            let mut f = std::fs::File::create(&name)?;
            f.write_all(&content)?;
            f.sync_all()?;
            drop(f);
            let mut back = Vec::new();
            std::fs::File::open(&name)?.read_to_end(&mut back)?;
            if back != content {
                return Err(std::io::Error::other("read back other bytes than written"));
            }
            std::fs::read_dir(&dir)?.count();
            Ok(())
        })();
        match r {
            Ok(()) => {
                ops.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => failures.lock().unwrap().push(format!("op {i}: {e}")),
        }
        i += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_plugin_restart_under_io_fails_no_operation() {
    let mut stack = S3Stack::start(None).await;
    let vol = create(&stack, create_req(&stack, &unique_name("pvc", "restart"), 64 * MIB, false)).await;
    let (staging, target) = (stack.driver.staging_dir("rs-st"), stack.driver.target_path("rs-tg"));
    stage(&stack, &vol.volume_id, &staging, mount_cap(Mode::MultiNodeMultiWriter, &[])).await;
    publish(&stack, &vol.volume_id, &staging, &target, false).await;

    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let worker = {
        let (dir, stop, ops, failures) = (target.clone(), stop.clone(), ops.clone(), failures.clone());
        std::thread::spawn(move || churn(dir, stop, ops, failures))
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = ops.load(Ordering::Relaxed);
    for _ in 0..2 {
        stack.driver.kill_9();
        tokio::time::sleep(Duration::from_millis(500)).await;
        stack.driver.restart().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    worker.join().unwrap();
    let total = ops.load(Ordering::Relaxed);
    let failed = failures.lock().unwrap().clone();
    assert!(failed.is_empty(), "{} operations failed across node-plugin restarts: {failed:?}", failed.len());
    assert!(total > before + 5, "operations went on during the restarts ({before} before, {total} in all)");
    eprintln!("node plugin killed and restarted twice under I/O: {total} operations, 0 failed");

    // The restarted plugin still serves the volume it did not mount itself.
    unpublish(&stack, &vol.volume_id, &target).await;
    unstage(&stack, &vol.volume_id, &staging).await;
    delete(&stack, &vol.volume_id).await;
    stack.driver.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_mounter_is_reported_and_the_next_stage_and_publish_mount_again() {
    let mut stack = S3Stack::start(None).await;
    let vol = create(&stack, create_req(&stack, &unique_name("pvc", "dead"), 64 * MIB, true)).await;
    let (staging, target) = (stack.driver.staging_dir("dm-st"), stack.driver.target_path("dm-tg"));
    stage(&stack, &vol.volume_id, &staging, mount_cap(Mode::MultiNodeMultiWriter, &[])).await;
    publish(&stack, &vol.volume_id, &staging, &target, false).await;
    let files = write_payload(&target, 11);

    stack.mounter.kill_9();
    let err = std::fs::read_dir(&target).expect_err("a dead mount does not answer");
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    let stats_req = NodeGetVolumeStatsRequest {
        volume_id: vol.volume_id.clone(),
        volume_path: target.display().to_string(),
        staging_target_path: staging.display().to_string(),
    };
    let stats = expect_ok(stack.driver.node().node_get_volume_stats(stats_req.clone()).await, "stats of a dead mount");
    let cond = stats.volume_condition.unwrap();
    assert!(cond.abnormal && cond.message.contains("mounter"), "reported abnormal: {}", cond.message);

    stack.mounter.restart();
    // A new pod on the node: the kubelet calls only NodePublish (it considers the volume
    // staged). The node plugin mounts the dead staging mount again from what NodeStage gave.
    let second = stack.driver.target_path("dm-tg2");
    publish(&stack, &vol.volume_id, &staging, &second, false).await;
    check_payload(&second, &files, "a new publication after the mounter came back");
    // The old pod's dead bind is replaced by its next NodePublish, and a repeated
    // NodeStage finds the live mount.
    publish(&stack, &vol.volume_id, &staging, &target, false).await;
    check_payload(&target, &files, "the old publication after the mounter came back");
    stage(&stack, &vol.volume_id, &staging, mount_cap(Mode::MultiNodeMultiWriter, &[])).await;
    unpublish(&stack, &vol.volume_id, &second).await;
    let stats = expect_ok(stack.driver.node().node_get_volume_stats(stats_req).await, "stats again");
    assert!(!stats.volume_condition.unwrap().abnormal, "healthy again");

    unpublish(&stack, &vol.volume_id, &target).await;
    unstage(&stack, &vol.volume_id, &staging).await;
    delete(&stack, &vol.volume_id).await;
    stack.driver.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_mounter_does_not_stall_the_node_plugin() {
    let stack = S3Stack::start(None).await;
    let vol = create(&stack, create_req(&stack, &unique_name("pvc", "stuck"), 64 * MIB, true)).await;
    let (staging, target) = (stack.driver.staging_dir("sk-st"), stack.driver.target_path("sk-tg"));
    stage(&stack, &vol.volume_id, &staging, mount_cap(Mode::MultiNodeMultiWriter, &[])).await;
    publish(&stack, &vol.volume_id, &staging, &target, false).await;

    stack.mounter.pause();
    // More stats calls at once than the driver has worker threads: none may hold one.
    let started = Instant::now();
    let calls: Vec<_> = (0..12)
        .map(|_| {
            let mut node = stack.driver.node();
            let req = NodeGetVolumeStatsRequest {
                volume_id: vol.volume_id.clone(),
                volume_path: target.display().to_string(),
                staging_target_path: String::new(),
            };
            tokio::spawn(async move { node.node_get_volume_stats(req).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let info_started = Instant::now();
    expect_ok(stack.driver.node().node_get_info(ferrovol_e2e::csi::NodeGetInfoRequest {}).await, "NodeGetInfo");
    let info_took = info_started.elapsed();
    let mut answers = Vec::new();
    for c in calls {
        answers.push(c.await.unwrap());
    }
    let took = started.elapsed();
    stack.mounter.resume();
    for a in answers {
        let stats = expect_ok(a, "stats of a stopped mounter's volume");
        let cond = stats.volume_condition.unwrap();
        assert!(cond.abnormal && cond.message.contains("does not answer"), "{}", cond.message);
    }
    assert!(info_took < Duration::from_secs(2), "NodeGetInfo waited {info_took:?} behind a stopped mounter");
    assert!(took < Duration::from_secs(12), "12 stats calls took {took:?} (bound 5 s each, in parallel)");

    unpublish(&stack, &vol.volume_id, &target).await;
    unstage(&stack, &vol.volume_id, &staging).await;
    delete(&stack, &vol.volume_id).await;
    stack.driver.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_server_fails_file_operations_within_the_bound() {
    let stack = S3Stack::start(None).await;
    let vol = create(&stack, create_req(&stack, &unique_name("pvc", "unreach"), 64 * MIB, true)).await;
    let (staging, target) = (stack.driver.staging_dir("ur-st"), stack.driver.target_path("ur-tg"));
    stage(&stack, &vol.volume_id, &staging, mount_cap(Mode::MultiNodeMultiWriter, &[])).await;
    publish(&stack, &vol.volume_id, &staging, &target, false).await;
    std::fs::write(target.join("f"), b"hello").unwrap();

    stack.server.pause();
    // Past the stat cache's TTL, so the listing and the read must reach the server.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let t = target.clone();
    let started = Instant::now();
    let op = std::thread::spawn(move || {
        let ls = std::fs::read_dir(t.join("never-listed-dir")).map(|r| r.count());
        let cat = std::fs::read(t.join("f-not-cached"));
        (ls.err().and_then(|e| e.raw_os_error()), cat.err().and_then(|e| e.raw_os_error()))
    });
    while !op.is_finished() && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();
    assert!(op.is_finished(), "file operations hung past 60 s on an unreachable server");
    let (ls, cat) = op.join().unwrap();
    stack.server.resume();
    assert!(took < Duration::from_secs(2 * 15 + 5), "two operations took {took:?} (bound 15 s each)");
    assert_eq!(ls, Some(libc::EIO), "ls on an unreachable server");
    assert_eq!(cat, Some(libc::EIO), "cat on an unreachable server");
    eprintln!("unreachable server: ls and cat failed with EIO in {took:?}");

    let stats = expect_ok(
        stack
            .driver
            .node()
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: vol.volume_id.clone(),
                volume_path: target.display().to_string(),
                staging_target_path: String::new(),
            })
            .await,
        "stats after the failures",
    );
    let cond = stats.volume_condition.unwrap();
    assert!(cond.abnormal, "the failures make the volume abnormal: {}", cond.message);

    unpublish(&stack, &vol.volume_id, &target).await;
    unstage(&stack, &vol.volume_id, &staging).await;
    delete(&stack, &vol.volume_id).await;
    stack.driver.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secrets_never_reach_a_log() {
    let stack = S3Stack::start(Some("trace")).await;
    let secret = stack.server.endpoint.secret_access_key.clone();
    let vol = create(&stack, create_req(&stack, &unique_name("pvc", "sec"), 32 * MIB, false)).await;
    let (staging, target) = (stack.driver.staging_dir("sec-st"), stack.driver.target_path("sec-tg"));
    stage(&stack, &vol.volume_id, &staging, mount_cap(Mode::MultiNodeMultiWriter, &[])).await;
    publish(&stack, &vol.volume_id, &staging, &target, false).await;
    std::fs::write(target.join("f"), b"x").unwrap();
    let mut bad = create_req(&stack, &unique_name("pvc", "sec-bad"), 32 * MIB, true);
    bad.secrets.insert("secretAccessKey".into(), format!("{secret}-wrong"));
    let _ = stack.driver.controller().create_volume(bad).await;
    unpublish(&stack, &vol.volume_id, &target).await;
    unstage(&stack, &vol.volume_id, &staging).await;
    delete(&stack, &vol.volume_id).await;
    let (driver_log, mounter_log) = (stack.driver.log_text(), stack.mounter.log_text());
    assert!(driver_log.lines().count() > 20, "the driver logged at trace level:\n{driver_log}");
    assert!(mounter_log.lines().count() > 3, "the mounter logged:\n{mounter_log}");
    assert!(!driver_log.contains(&secret), "the secret key is in the driver's log");
    assert!(!mounter_log.contains(&secret), "the secret key is in the mounter's log");
    stack.driver.assert_no_leaks();
}

/// Scrapes `addr`'s /metrics in the Prometheus text format.
fn scrape(addr: std::net::SocketAddr, who: &str) -> String {
    let reply = ferrovol_metrics::testing::http_get(addr, "/metrics", "*/*")
        .unwrap_or_else(|e| panic!("GET /metrics of the {who} at {addr}: {e}"));
    assert_eq!(reply.status, 200, "GET /metrics of the {who}: {}", reply.body);
    reply.body
}

/// The sum of every sample of `name` whose labels contain all of `labels`.
fn total(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_mounter_and_the_driver_serve_metrics_of_their_s3_calls() {
    let stack = S3Stack::start(None).await;
    let health = ferrovol_metrics::testing::http_get(stack.mounter.metrics, "/healthz", "*/*").unwrap();
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"), "the mounter's /healthz");
    let before = scrape(stack.mounter.metrics, "mounter");
    assert_eq!(ferrovol_metrics::sample(&before, "ferrovol_mounter_mounts"), Some(0.0), "{before}");

    let vol = create(&stack, create_req(&stack, &unique_name("pvc", "metrics"), 64 * MIB, false)).await;
    let bucket = vol.volume_id.split(':').nth(1).unwrap().to_owned();
    let (staging, target) = (stack.driver.staging_dir("met-st"), stack.driver.target_path("met-tg"));
    stage(&stack, &vol.volume_id, &staging, mount_cap(Mode::MultiNodeMultiWriter, &[])).await;
    publish(&stack, &vol.volume_id, &staging, &target, false).await;

    let payload = data::pattern(41, 3 * MIB as usize + 17);
    std::fs::write(target.join("big.bin"), &payload).unwrap();
    assert_eq!(std::fs::read(target.join("big.bin")).unwrap(), payload, "read back");
    assert!(std::fs::metadata(target.join("not-there")).is_err(), "a missing file");

    let text = scrape(stack.mounter.metrics, "mounter");
    let n = payload.len() as f64;
    assert_eq!(ferrovol_metrics::sample(&text, "ferrovol_mounter_mounts"), Some(1.0), "{text}");
    assert!(
        ferrovol_metrics::sample(&text, r#"ferrovol_mounter_fs_bytes_total{direction="written"}"#) >= Some(n),
        "{text}"
    );
    assert!(
        ferrovol_metrics::sample(&text, r#"ferrovol_mounter_fs_bytes_total{direction="read"}"#) >= Some(n),
        "{text}"
    );
    assert!(total(&text, "ferrovol_mounter_fs_errors_total", &[r#"errno="ENOENT""#]) >= 1.0, "{text}");
    // The file's bytes went up and came back through S3 calls, counted with their outcome.
    assert!(total(&text, "ferrovol_s3_body_bytes_total", &[r#"direction="sent""#]) >= n, "{text}");
    assert!(
        total(&text, "ferrovol_s3_body_bytes_total", &[r#"op="GetObject""#, r#"direction="received""#]) >= n,
        "{text}"
    );
    assert!(total(&text, "ferrovol_s3_requests_total", &[r#"op="GetObject""#, r#"outcome="20"#]) >= 1.0, "{text}");
    assert!(total(&text, "ferrovol_s3_request_duration_seconds_count", &[]) >= 3.0, "{text}");
    assert!(!text.contains(&bucket) && !text.contains("big.bin"), "no bucket or file in a label:\n{text}");

    // The driver counts the controller's S3 calls (it made the bucket) next to its RPCs.
    let driver = scrape(stack.driver_metrics, "driver");
    assert!(
        total(&driver, "ferrovol_s3_requests_total", &[r#"op="CreateBucket""#, r#"outcome="200""#]) >= 1.0,
        "{driver}"
    );
    assert!(!driver.contains(&bucket), "no bucket in a label:\n{driver}");

    unpublish(&stack, &vol.volume_id, &target).await;
    unstage(&stack, &vol.volume_id, &staging).await;
    let after = scrape(stack.mounter.metrics, "mounter");
    assert_eq!(ferrovol_metrics::sample(&after, "ferrovol_mounter_mounts"), Some(0.0), "{after}");
    assert_eq!(
        ferrovol_metrics::sample(&after, r#"ferrovol_mounter_buffer_bytes{kind="taken"}"#),
        Some(0.0),
        "{after}"
    );
    delete(&stack, &vol.volume_id).await;
    stack.driver.assert_no_leaks();
}

/// Volume IDs of the S3 family that are malformed or try to leave the driver's objects:
/// none may reach S3 as a bucket or key.
fn malformed_s3_ids(bucket: &str, tag: &str) -> Vec<String> {
    vec![
        "garbage".to_owned(),
        format!("s3.{tag}"),
        format!("s3.{tag}:"),
        format!("s3.{tag}:{bucket}"),
        format!("s3.{tag}:{bucket}:"),
        format!("s3.{tag}:../etc:abc"),
        format!("s3.{tag}:Not_A_Bucket:abc"),
        format!("s3.{tag}:{bucket}:.."),
        format!("s3.{tag}:{bucket}:../abc"),
        format!("s3.{tag}:{bucket}:a/b"),
        format!("s3.{tag}:{bucket}:a\0b"),
        format!("s3.{tag}:{bucket}:{}", "a".repeat(4096)),
        format!("s3.{tag}:{bucket}:abc:def"),
    ]
}

/// The CSI spec's error codes and repeat rules as they apply to S3 volumes, the checks the
/// block and filesystem families' conformance suite makes (e2e/tests/conformance.rs) that
/// mean something for a bucket or a prefix: missing fields, malformed and escaping IDs,
/// snapshots, expansion, node calls out of order and repeated, and racing creates.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn csi_error_codes_and_repeats_for_s3_volumes() {
    let stack = S3Stack::start(None).await;
    let d = &stack.driver;
    let c = || d.controller();
    let mut m = Mismatches::new();
    let bucket = stack.server.bucket.clone();
    let keeper = create(&stack, create_req(&stack, &unique_name("pvc", "keeper"), 32 * MIB, true)).await;
    let objects_before = stack.keys(&bucket, "").await;

    // Missing required fields: INVALID_ARGUMENT.
    let mut r = create_req(&stack, "", 32 * MIB, true);
    m.code(c().create_volume(r.clone()).await, &[Code::InvalidArgument], "CreateVolume without a name");
    r.name = unique_name("pvc", "nocaps");
    r.volume_capabilities.clear();
    m.code(c().create_volume(r).await, &[Code::InvalidArgument], "CreateVolume without capabilities");
    let mut r = create_req(&stack, &unique_name("pvc", "range"), 64 * MIB, true);
    r.capacity_range = Some(CapacityRange { required_bytes: 64 * MIB, limit_bytes: 32 * MIB });
    m.code(c().create_volume(r).await, &[Code::OutOfRange, Code::InvalidArgument], "limit below required");
    let delete_req = DeleteVolumeRequest { volume_id: String::new(), secrets: stack.secrets() };
    m.code(c().delete_volume(delete_req).await, &[Code::InvalidArgument], "DeleteVolume without an ID");
    let expand = |id: &str, bytes: i64| ControllerExpandVolumeRequest {
        volume_id: id.to_owned(),
        capacity_range: (bytes > 0).then_some(CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        secrets: stack.secrets(),
        ..Default::default()
    };
    m.code(c().controller_expand_volume(expand("", 64 * MIB)).await, &[Code::InvalidArgument], "expand without an ID");
    m.code(
        c().controller_expand_volume(expand(&keeper.volume_id, 0)).await,
        &[Code::InvalidArgument],
        "expand without a capacity range",
    );
    let snap_req = |name: &str, source: &str| CreateSnapshotRequest {
        source_volume_id: source.to_owned(),
        name: name.to_owned(),
        secrets: stack.secrets(),
        parameters: HashMap::new(),
    };
    m.code(c().create_snapshot(snap_req("", &keeper.volume_id)).await, &[Code::InvalidArgument], "snapshot w/o name");
    m.code(c().create_snapshot(snap_req("snap-x", "")).await, &[Code::InvalidArgument], "snapshot w/o source");
    let (staging, target) = (d.staging_dir("codes-st"), d.target_path("codes-tg"));
    let stage_req = |id: &str, staging: &str| NodeStageVolumeRequest {
        volume_id: id.to_owned(),
        staging_target_path: staging.to_owned(),
        volume_capability: Some(mount_cap(Mode::MultiNodeMultiWriter, &[])),
        secrets: stack.secrets(),
        ..Default::default()
    };
    m.code(d.node().node_stage_volume(stage_req(&keeper.volume_id, "")).await, &[Code::InvalidArgument], "no staging");
    m.code(
        d.node().node_stage_volume(stage_req("", &staging.display().to_string())).await,
        &[Code::InvalidArgument],
        "stage without an ID",
    );
    let mut p = publish_req(&keeper.volume_id, &staging, &target, mount_cap(Mode::MultiNodeMultiWriter, &[]), false);
    p.target_path.clear();
    m.code(d.node().node_publish_volume(p).await, &[Code::InvalidArgument], "publish without a target");
    let stats = |id: &str, path: &Path| NodeGetVolumeStatsRequest {
        volume_id: id.to_owned(),
        volume_path: path.display().to_string(),
        staging_target_path: String::new(),
    };
    m.code(
        d.node().node_get_volume_stats(stats(&keeper.volume_id, Path::new(""))).await,
        &[Code::InvalidArgument],
        "stats w/o path",
    );

    // Malformed and escaping IDs: nothing to delete (OK, twice), nothing to find
    // (NOT_FOUND), and no object of the bucket touched.
    for id in malformed_s3_ids(&bucket, "vol") {
        let what = |call: &str| format!("{call} of malformed ID {:?}", &id[..id.len().min(60)]);
        for _ in 0..2 {
            let r = DeleteVolumeRequest { volume_id: id.clone(), secrets: stack.secrets() };
            m.ok(c().delete_volume(r).await, &what("DeleteVolume"));
        }
        let get = ControllerGetVolumeRequest { volume_id: id.clone() };
        m.code(c().controller_get_volume(get).await, &[Code::NotFound], &what("ControllerGetVolume"));
        m.code(c().controller_expand_volume(expand(&id, 64 * MIB)).await, &[Code::NotFound], &what("expand"));
        m.code(
            c().create_snapshot(snap_req(&unique_name("snap", "bad"), &id)).await,
            &[Code::NotFound],
            &what("snapshot"),
        );
        let staging_path = staging.display().to_string();
        m.code(d.node().node_stage_volume(stage_req(&id, &staging_path)).await, &[Code::NotFound], &what("NodeStage"));
        let mut from = create_req(&stack, &unique_name("pvc", "from-bad"), 32 * MIB, true);
        from.volume_content_source = volume_source(&id);
        m.code(c().create_volume(from).await, &[Code::NotFound], &what("CreateVolume from"));
    }
    for id in malformed_s3_ids(&bucket, "snap") {
        let r = DeleteSnapshotRequest { snapshot_id: id.clone(), secrets: stack.secrets() };
        m.ok(c().delete_snapshot(r).await, &format!("DeleteSnapshot of malformed ID {:?}", &id[..id.len().min(60)]));
        let mut from = create_req(&stack, &unique_name("pvc", "from-bad-snap"), 32 * MIB, true);
        from.volume_content_source = snapshot_source(&id);
        m.code(
            c().create_volume(from).await,
            &[Code::NotFound],
            &format!("CreateVolume from snapshot {:?}", &id[..id.len().min(60)]),
        );
    }
    assert_eq!(stack.keys(&bucket, "").await, objects_before, "malformed IDs touched the bucket's objects");

    // Snapshots: a repeat answers the same snapshot, another source under the name is
    // ALREADY_EXISTS, the lists find it, deletes repeat, a deleted source is NOT_FOUND.
    let name = unique_name("snap", "rules");
    let s1 =
        expect_ok(c().create_snapshot(snap_req(&name, &keeper.volume_id)).await, "CreateSnapshot").snapshot.unwrap();
    let s2 = expect_ok(c().create_snapshot(snap_req(&name, &keeper.volume_id)).await, "repeat").snapshot.unwrap();
    assert_eq!(
        (s1.snapshot_id.as_str(), s1.ready_to_use),
        (s2.snapshot_id.as_str(), true),
        "a repeat answers the same ready snapshot"
    );
    let other = create(&stack, create_req(&stack, &unique_name("pvc", "other"), 32 * MIB, true)).await;
    m.code(
        c().create_snapshot(snap_req(&name, &other.volume_id)).await,
        &[Code::AlreadyExists],
        "same name, other source",
    );
    let by_id = expect_ok(
        c().list_snapshots(ferrovol_e2e::csi::ListSnapshotsRequest {
            snapshot_id: s1.snapshot_id.clone(),
            secrets: stack.secrets(),
            ..Default::default()
        })
        .await,
        "ListSnapshots by ID",
    );
    assert_eq!(by_id.entries.len(), 1, "ListSnapshots by ID finds it once");
    let unknown = format!("s3.snap:{bucket}:snap-never-made");
    let none = expect_ok(
        c().list_snapshots(ferrovol_e2e::csi::ListSnapshotsRequest {
            snapshot_id: unknown,
            secrets: stack.secrets(),
            ..Default::default()
        })
        .await,
        "ListSnapshots of an unknown ID",
    );
    assert!(none.entries.is_empty(), "an unknown snapshot ID lists nothing");
    for _ in 0..2 {
        let r = DeleteSnapshotRequest { snapshot_id: s1.snapshot_id.clone(), secrets: stack.secrets() };
        expect_ok(c().delete_snapshot(r).await, "DeleteSnapshot (and its repeat)");
    }
    let mut from = create_req(&stack, &unique_name("pvc", "from-gone"), 32 * MIB, true);
    from.volume_content_source = snapshot_source(&s1.snapshot_id);
    m.code(c().create_volume(from).await, &[Code::NotFound], "CreateVolume from a deleted snapshot");

    // Expansion: never shrinks, repeats answer the same.
    let grown = expect_ok(c().controller_expand_volume(expand(&other.volume_id, 48 * MIB)).await, "expand");
    assert!(grown.capacity_bytes >= 48 * MIB && grown.node_expansion_required, "{grown:?}");
    let again = expect_ok(c().controller_expand_volume(expand(&other.volume_id, 48 * MIB)).await, "expand repeat");
    assert_eq!(again.capacity_bytes, grown.capacity_bytes, "a repeat answers the same capacity");
    let smaller = expect_ok(c().controller_expand_volume(expand(&other.volume_id, 16 * MIB)).await, "expand smaller");
    assert_eq!(smaller.capacity_bytes, grown.capacity_bytes, "asking for less never shrinks the quota");

    // Node calls out of order and repeated.
    let staging_s = staging.display().to_string();
    m.code(
        d.node()
            .node_publish_volume(publish_req(
                &keeper.volume_id,
                &staging,
                &target,
                mount_cap(Mode::MultiNodeMultiWriter, &[]),
                false,
            ))
            .await,
        &[Code::FailedPrecondition],
        "NodePublish before NodeStage",
    );
    m.code(
        d.node().node_get_volume_stats(stats(&keeper.volume_id, &target)).await,
        &[Code::NotFound],
        "stats of an unpublished path",
    );
    let unpub = || NodeUnpublishVolumeRequest {
        volume_id: keeper.volume_id.clone(),
        target_path: target.display().to_string(),
    };
    let unstg =
        || NodeUnstageVolumeRequest { volume_id: keeper.volume_id.clone(), staging_target_path: staging_s.clone() };
    expect_ok(d.node().node_unpublish_volume(unpub()).await, "NodeUnpublish of a target never published");
    expect_ok(d.node().node_unstage_volume(unstg()).await, "NodeUnstage of a volume never staged");
    for _ in 0..2 {
        expect_ok(d.node().node_stage_volume(stage_req(&keeper.volume_id, &staging_s)).await, "NodeStage (and repeat)");
    }
    for _ in 0..2 {
        publish(&stack, &keeper.volume_id, &staging, &target, false).await;
    }
    expect_ok(d.node().node_get_volume_stats(stats(&keeper.volume_id, &target)).await, "stats of the published volume");
    m.code(
        d.node().node_get_volume_stats(stats(&other.volume_id, &target)).await,
        &[Code::NotFound],
        "stats of another volume's path",
    );
    for _ in 0..2 {
        expect_ok(d.node().node_unpublish_volume(unpub()).await, "NodeUnpublish (and repeat)");
    }
    for _ in 0..2 {
        expect_ok(d.node().node_unstage_volume(unstg()).await, "NodeUnstage (and repeat)");
    }
    assert!(!is_ferrovol_fuse(&staging) && !is_ferrovol_fuse(&target), "nothing stays mounted");

    // Eight creates of one name at once: one volume; each answer is it, or ABORTED.
    let racer = unique_name("pvc", "race");
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let (mut client, req) = (d.controller(), create_req(&stack, &racer, 32 * MIB, true));
            tokio::spawn(async move { client.create_volume(req).await })
        })
        .collect();
    let mut ids = HashSet::new();
    for call in calls {
        match call.await.unwrap() {
            Ok(r) => {
                ids.insert(r.into_inner().volume.unwrap().volume_id);
            }
            Err(st) => assert_eq!(st.code(), Code::Aborted, "a racing create: {st:?}"),
        }
    }
    let settled = create(&stack, create_req(&stack, &racer, 32 * MIB, true)).await;
    assert!(ids.len() <= 1 && ids.iter().all(|i| *i == settled.volume_id), "racing creates made {ids:?}");

    for id in [&settled.volume_id, &other.volume_id, &keeper.volume_id] {
        delete(&stack, id).await;
    }
    assert!(stack.keys(&bucket, "ferrovol/volumes/").await.is_empty(), "every volume's objects are gone");
    m.assert_none();
    d.assert_no_leaks();
}
