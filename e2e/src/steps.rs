//! The successful calls of a volume's life, each made twice to prove idempotency and each
//! followed by the checks the spec requires of its result.

use std::path::Path;

use crate::assertions::expect_ok;
use crate::csi::volume_capability::access_mode::Mode;
use crate::csi::{CreateVolumeRequest, Snapshot, Volume};
use crate::data;
use crate::driver::Driver;
use crate::family::{Family, FsType};
use crate::kernel;
use crate::requests::{self, Access, Vol, MIB};

/// Checks what every CreateVolume answer must hold (ID form, size, topology).
pub fn check_volume(family: &Family, driver: &Driver, request: &CreateVolumeRequest, volume: &Volume) {
    let what = format!("CreateVolume {:?}", request.name);
    assert!(
        volume.volume_id.starts_with(&family.volume_id_prefix(driver.node_id())),
        "{what}: volume_id {:?} does not start with {:?}",
        volume.volume_id,
        family.volume_id_prefix(driver.node_id())
    );
    assert!(
        volume.volume_id.len() <= 128,
        "{what}: volume_id is {} bytes, over the spec's 128-byte string limit",
        volume.volume_id.len()
    );
    let range = request.capacity_range.unwrap_or_default();
    assert!(volume.capacity_bytes > 0, "{what}: capacity_bytes is not set");
    assert!(
        volume.capacity_bytes >= range.required_bytes,
        "{what}: capacity {} is below required_bytes {}",
        volume.capacity_bytes,
        range.required_bytes
    );
    if range.limit_bytes > 0 {
        assert!(
            volume.capacity_bytes <= range.limit_bytes,
            "{what}: capacity {} is above limit_bytes {}",
            volume.capacity_bytes,
            range.limit_bytes
        );
    }
    assert_eq!(
        volume.capacity_bytes % MIB,
        0,
        "{what}: capacity {} is not rounded to whole MiB",
        volume.capacity_bytes
    );
    if let Some(segments) = family.node_topology(driver.node_id()) {
        let topology: Vec<_> = volume.accessible_topology.iter().map(|topology| topology.segments.clone()).collect();
        assert_eq!(topology, vec![segments], "{what}: accessible_topology must name the volume's node");
    }
    assert_eq!(
        volume.content_source, request.volume_content_source,
        "{what}: content_source must echo the request's volume_content_source"
    );
}

/// CreateVolume, twice with the same request: both OK with the same answer.
pub async fn create_volume(family: &Family, driver: &Driver, request: CreateVolumeRequest, access: Access) -> Vol {
    let what = format!("CreateVolume {:?}", request.name);
    let first = expect_ok(driver.controller().create_volume(request.clone()).await, &what);
    let volume = first.volume.clone().unwrap_or_else(|| panic!("{what}: no volume in the answer"));
    check_volume(family, driver, &request, &volume);
    let second = expect_ok(driver.controller().create_volume(request.clone()).await, &format!("{what} repeated"));
    assert_eq!(second, first, "{what}: a repeated call must give the same answer");
    let mode = request
        .volume_capabilities
        .first()
        .and_then(|cap| cap.access_mode)
        .map(|mode| Mode::try_from(mode.mode).unwrap_or(Mode::SingleNodeWriter))
        .unwrap_or(Mode::SingleNodeWriter);
    Vol::new(&volume, access, mode)
}

/// CreateVolume of a fresh volume named `name` with the family's parameters.
pub async fn create_simple(family: &Family, driver: &Driver, name: &str, access: Access, required_bytes: i64) -> Vol {
    let request = requests::create_request(family, name, access, required_bytes);
    create_volume(family, driver, request, access).await
}

/// ControllerPublishVolume to the driver's node, twice; stores the publish context.
pub async fn controller_publish(driver: &Driver, vol: &mut Vol) {
    let what = format!("ControllerPublishVolume {}", vol.id);
    let request = vol.controller_publish_request(driver.node_id());
    let first = expect_ok(driver.controller().controller_publish_volume(request.clone()).await, &what);
    let second = expect_ok(driver.controller().controller_publish_volume(request).await, &format!("{what} repeated"));
    assert_eq!(second, first, "{what}: a repeated call must give the same publish_context");
    vol.publish_context = first.publish_context;
}

/// ControllerUnpublishVolume from the driver's node, twice.
pub async fn controller_unpublish(driver: &Driver, vol: &Vol) {
    let what = format!("ControllerUnpublishVolume {}", vol.id);
    let request = vol.controller_unpublish_request(driver.node_id());
    expect_ok(driver.controller().controller_unpublish_volume(request.clone()).await, &what);
    expect_ok(driver.controller().controller_unpublish_volume(request).await, &format!("{what} repeated"));
}

/// NodeStageVolume, twice; a mount volume is then mounted exactly once at `staging`.
pub async fn stage(driver: &Driver, vol: &Vol, staging: &Path) {
    let what = format!("NodeStageVolume {} at {}", vol.id, staging.display());
    expect_ok(driver.node().node_stage_volume(vol.stage_request(staging)).await, &what);
    expect_ok(driver.node().node_stage_volume(vol.stage_request(staging)).await, &format!("{what} repeated"));
    check_staged(vol, staging, &what);
}

/// What a staged volume looks like from outside.
pub fn check_staged(vol: &Vol, staging: &Path, what: &str) {
    if let Access::Mount(fs) = vol.access {
        let mounts = kernel::mounts_at(staging);
        assert_eq!(mounts.len(), 1, "{what}: expected exactly one mount at the staging path, found {mounts:#?}");
        assert_eq!(mounts[0].fs_type, fs.name(), "{what}: the staged filesystem has the wrong type");
    }
}

/// NodePublishVolume, twice; then checks the target as a workload would see it.
pub async fn publish(driver: &Driver, vol: &Vol, staging: &Path, target: &Path, readonly: bool) {
    let what = format!("NodePublishVolume {} at {}", vol.id, target.display());
    let request = vol.publish_request(staging, target, readonly);
    expect_ok(driver.node().node_publish_volume(request.clone()).await, &what);
    expect_ok(driver.node().node_publish_volume(request).await, &format!("{what} repeated"));
    check_published(vol, target, readonly, &what);
}

/// What a published volume looks like from outside.
pub fn check_published(vol: &Vol, target: &Path, readonly: bool, what: &str) {
    let mounts = kernel::mounts_at(target);
    assert_eq!(mounts.len(), 1, "{what}: expected exactly one mount at the target path, found {mounts:#?}");
    assert_eq!(mounts[0].read_only(), readonly, "{what}: the target mount's read-only flag is wrong: {:?}", mounts[0]);
    match vol.access {
        Access::Mount(fs) => {
            assert!(target.is_dir(), "{what}: the target is not a directory");
            assert_eq!(mounts[0].fs_type, fs.name(), "{what}: wrong filesystem type");
            let total = data::fs_total_bytes(target);
            let capacity = u64::try_from(vol.capacity).expect("a positive capacity");
            assert!(
                total <= capacity && total > capacity / 2,
                "{what}: the filesystem holds {total} bytes for a {capacity}-byte volume"
            );
        }
        Access::Block => {
            assert!(data::is_block_device(target), "{what}: the target is not a block device");
            assert_eq!(
                data::block_device_bytes(target),
                u64::try_from(vol.capacity).expect("a positive capacity"),
                "{what}: the block device size differs from the volume capacity"
            );
        }
    }
}

/// NodeUnpublishVolume, twice; the target is unmounted and the path it created removed.
pub async fn unpublish(driver: &Driver, vol: &Vol, target: &Path) {
    let what = format!("NodeUnpublishVolume {} at {}", vol.id, target.display());
    expect_ok(driver.node().node_unpublish_volume(vol.unpublish_request(target)).await, &what);
    expect_ok(driver.node().node_unpublish_volume(vol.unpublish_request(target)).await, &format!("{what} repeated"));
    assert!(kernel::mounts_at(target).is_empty(), "{what}: the target is still mounted");
    assert!(
        std::fs::symlink_metadata(target).is_err(),
        "{what}: the target path the plugin created is still there (the spec says the SP MUST delete it)"
    );
}

/// NodeUnstageVolume, twice; nothing is mounted at the staging path afterwards.
pub async fn unstage(driver: &Driver, vol: &Vol, staging: &Path) {
    let what = format!("NodeUnstageVolume {} at {}", vol.id, staging.display());
    expect_ok(driver.node().node_unstage_volume(vol.unstage_request(staging)).await, &what);
    expect_ok(driver.node().node_unstage_volume(vol.unstage_request(staging)).await, &format!("{what} repeated"));
    assert!(kernel::mounts_at(staging).is_empty(), "{what}: the staging path is still mounted");
}

/// DeleteVolume, twice.
pub async fn delete_volume(driver: &Driver, vol: &Vol) {
    let what = format!("DeleteVolume {}", vol.id);
    expect_ok(driver.controller().delete_volume(vol.delete_request()).await, &what);
    expect_ok(driver.controller().delete_volume(vol.delete_request()).await, &format!("{what} repeated"));
}

/// CreateSnapshot, twice with the same name: same answer, ready, sized like the volume.
pub async fn snapshot(family: &Family, driver: &Driver, vol: &Vol, name: &str) -> Snapshot {
    let what = format!("CreateSnapshot {name:?} of {}", vol.id);
    let first = expect_ok(driver.controller().create_snapshot(vol.snapshot_request(name)).await, &what);
    let snapshot = first.snapshot.clone().unwrap_or_else(|| panic!("{what}: no snapshot in the answer"));
    check_snapshot(family, driver, &snapshot, vol, &what);
    let second =
        expect_ok(driver.controller().create_snapshot(vol.snapshot_request(name)).await, &format!("{what} repeated"));
    assert_eq!(second, first, "{what}: a repeated call must give the same answer");
    snapshot
}

/// What every snapshot answer must hold.
pub fn check_snapshot(family: &Family, driver: &Driver, snapshot: &Snapshot, vol: &Vol, what: &str) {
    assert!(
        snapshot.snapshot_id.starts_with(&family.snapshot_id_prefix(driver.node_id())),
        "{what}: snapshot_id {:?} does not start with {:?}",
        snapshot.snapshot_id,
        family.snapshot_id_prefix(driver.node_id())
    );
    assert_eq!(snapshot.source_volume_id, vol.id, "{what}: wrong source_volume_id");
    assert!(snapshot.ready_to_use, "{what}: ready_to_use is false");
    assert_eq!(snapshot.size_bytes, vol.capacity, "{what}: size_bytes must be the volume's size");
    let time = snapshot.creation_time.unwrap_or_else(|| panic!("{what}: creation_time is REQUIRED"));
    assert!(time.seconds > 1_600_000_000, "{what}: implausible creation_time {time:?}");
    assert!(snapshot.group_snapshot_id.is_empty(), "{what}: unexpected group_snapshot_id");
}

/// DeleteSnapshot, twice.
pub async fn delete_snapshot(driver: &Driver, snapshot_id: &str) {
    let what = format!("DeleteSnapshot {snapshot_id}");
    expect_ok(driver.controller().delete_snapshot(requests::delete_snapshot_request(snapshot_id)).await, &what);
    expect_ok(
        driver.controller().delete_snapshot(requests::delete_snapshot_request(snapshot_id)).await,
        &format!("{what} repeated"),
    );
}

/// A volume taken through CreateVolume, ControllerPublish, NodeStage and NodePublish.
#[derive(Debug)]
pub struct InUse {
    pub vol: Vol,
    pub staging: std::path::PathBuf,
    pub target: std::path::PathBuf,
}

/// Creates, attaches, stages and publishes a fresh volume as Kubernetes would.
pub async fn provision_and_publish(
    family: &Family,
    driver: &Driver,
    name: &str,
    access: Access,
    required_bytes: i64,
) -> InUse {
    let mut vol = create_simple(family, driver, name, access, required_bytes).await;
    controller_publish(driver, &mut vol).await;
    let staging = driver.staging_dir(name);
    stage(driver, &vol, &staging).await;
    let target = driver.target_path(name);
    publish(driver, &vol, &staging, &target, false).await;
    InUse { vol, staging, target }
}

/// Undoes [`provision_and_publish`] in Kubernetes' order and deletes the volume.
pub async fn teardown(driver: &Driver, in_use: &InUse) {
    unpublish(driver, &in_use.vol, &in_use.target).await;
    unstage(driver, &in_use.vol, &in_use.staging).await;
    controller_unpublish(driver, &in_use.vol).await;
    delete_volume(driver, &in_use.vol).await;
}

/// Whether this process may grow a mounted ext4 filesystem: the kernel's online resize needs
/// CAP_SYS_RESOURCE (bit 24 of CapEff), which some sandboxes withhold even from root.
pub fn ext4_grows_online() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let caps = status.lines().find_map(|l| l.strip_prefix("CapEff:")).expect("CapEff in /proc/self/status");
    let caps = u64::from_str_radix(caps.trim(), 16).expect("CapEff is hex");
    caps & (1 << 24) != 0
}

/// Whether NodeExpandVolume can grow this volume's filesystem while it is mounted, here.
pub fn grows_online(vol: &Vol) -> bool {
    !matches!(vol.access, Access::Mount(FsType::Ext4)) || ext4_grows_online()
}

/// For a published ext4 volume on a machine without CAP_SYS_RESOURCE: NodeExpandVolume must
/// refuse and say why, and the growth then happens offline, at the next NodeStageVolume —
/// the volume is unpublished, unstaged, staged and published again, as a pod restart would.
pub async fn grow_offline_after_refusal(driver: &Driver, vol: &Vol, staging: &Path, target: &Path, grown: i64) {
    let refused = driver
        .node()
        .node_expand_volume(vol.node_expand_request(target, staging, grown))
        .await
        .expect_err("online ext4 growth without CAP_SYS_RESOURCE cannot succeed");
    assert!(
        refused.message().contains("CAP_SYS_RESOURCE"),
        "NodeExpandVolume's refusal does not say what is missing: {refused:?}"
    );
    unpublish(driver, vol, target).await;
    unstage(driver, vol, staging).await;
    let grown_vol = Vol { capacity: grown, ..vol.clone() };
    stage(driver, &grown_vol, staging).await;
    publish(driver, &grown_vol, staging, target, false).await;
}
