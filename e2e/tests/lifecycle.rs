//! Volume lifecycles in the order Kubernetes drives them (provision, attach, stage,
//! publish, write, snapshot, restore, expand, unpublish, unstage, detach, delete), with the
//! data checked at every step and no kernel resource left at the end.
#![cfg(feature = "kernel-tests")]
#![allow(clippy::unwrap_used)]

use std::path::Path;

use ferrovol_e2e::csi::volume_usage::Unit;
use ferrovol_e2e::independent::run_each;
use ferrovol_e2e::requests::{create_request, snapshot_source, unique_name, volume_source};
use ferrovol_e2e::steps::{self, InUse};
use ferrovol_e2e::{data, expect_ok, Access, Driver, DriverOptions, Family, FsType, Vol, MIB};

ferrovol_e2e::family_tests!(loop_family => ferrovol_e2e::Family::loop_family();
    kubernetes_order_mount,
    clone_from_volume,
    block_mode,
    offline_expansion,
);

// The same lifecycles against a split cluster (a controller and three node agents over
// mutual TLS; the driver view is node 0, to which requests pin new volumes).
ferrovol_e2e::family_tests!(split_loop => ferrovol_e2e::Family::loop_family().split(3);
    kubernetes_order_mount,
    clone_from_volume,
    block_mode,
    offline_expansion,
);

// In the VM also split: a controller and three node agents sharing the test VG, so LVM goes
// through the agent API and the controller's placement too.
#[cfg(feature = "lvm-tests")]
ferrovol_e2e::family_tests!([
    in_vm_lvm_linear => ferrovol_e2e::Family::lvm_linear(),
    in_vm_lvm_thin => ferrovol_e2e::Family::lvm_thin(),
    in_vm_split_lvm_thin => ferrovol_e2e::Family::lvm_thin().split(3),
];
    kubernetes_order_mount,
    clone_from_volume,
    block_mode,
    offline_expansion,
);

fn first_fs(family: &Family) -> FsType {
    *family.fs_types.first().expect("a filesystem")
}

/// Files every test writes and checks: a large one and a small one in a nested directory.
struct Payload {
    big: Vec<u8>,
    small: Vec<u8>,
}

impl Payload {
    fn new(seed: u64) -> Payload {
        Payload { big: data::pattern(seed, 3 * MIB as usize + 4321), small: data::pattern(seed + 1, 1000) }
    }

    fn write(&self, root: &Path) {
        data::write_synced(&root.join("big.bin"), &self.big);
        std::fs::create_dir_all(root.join("nested/dir")).expect("mkdir in the volume");
        data::write_synced(&root.join("nested/dir/small.bin"), &self.small);
    }

    #[track_caller]
    fn check(&self, root: &Path, what: &str) {
        data::assert_content(&root.join("big.bin"), &self.big, what);
        data::assert_content(&root.join("nested/dir/small.bin"), &self.small, what);
    }
}

/// Takes a volume made from a source through ControllerPublish, NodeStage and NodePublish.
async fn attach_and_publish(driver: &Driver, mut vol: Vol, name: &str) -> InUse {
    steps::controller_publish(driver, &mut vol).await;
    let staging = driver.staging_dir(name);
    steps::stage(driver, &vol, &staging).await;
    let target = driver.target_path(name);
    steps::publish(driver, &vol, &staging, &target, false).await;
    InUse { vol, staging, target }
}

fn fs_bytes(path: &Path) -> i64 {
    i64::try_from(data::fs_total_bytes(path)).expect("filesystem size fits i64")
}

async fn stats_total_bytes(driver: &Driver, used: &InUse) -> i64 {
    let stats = expect_ok(
        driver.node().node_get_volume_stats(used.vol.stats_request(&used.target, &used.staging)).await,
        "NodeGetVolumeStats",
    );
    stats.usage.iter().find(|usage| usage.unit == Unit::Bytes as i32).map(|usage| usage.total).expect("BYTES usage")
}

async fn kubernetes_order_mount(family: &Family) {
    run_each(family.fs_types.clone(), |fs| {
        let family = family.clone();
        async move {
            let mut driver = Driver::start(&family, DriverOptions::default()).await;
            mount_lifecycle(&family, &driver, fs).await;
            driver.assert_no_leaks();
            family.assert_no_leftover_storage(&driver);
            driver.stop().await;
        }
    })
    .await;
}

async fn mount_lifecycle(family: &Family, driver: &Driver, fs: FsType) {
    let access = Access::Mount(fs);
    let size = fs.small_bytes();
    let name_a = unique_name("pvc", &format!("{}-a", fs.name()));
    let a = steps::provision_and_publish(family, driver, &name_a, access, size).await;
    let payload = Payload::new(1);
    payload.write(&a.target);
    payload.check(&a.staging, "the staging mount shows what the target wrote");
    let a_bytes = fs_bytes(&a.target);

    let snap = steps::snapshot(family, driver, &a.vol, &unique_name("snapshot", fs.name())).await;
    let late = data::pattern(99, 4096);
    data::write_synced(&a.target.join("after-snapshot.bin"), &late);

    // Restore into a larger volume and use it beside the original.
    let name_b = unique_name("pvc", &format!("{}-b", fs.name()));
    let larger = size + 32 * MIB;
    let mut request = create_request(family, &name_b, access, larger);
    request.volume_content_source = snapshot_source(&snap.snapshot_id);
    let b = steps::create_volume(family, driver, request, access).await;
    assert!(b.capacity >= larger, "restored volume is {} bytes, asked {larger}", b.capacity);
    let b = attach_and_publish(driver, b, &name_b).await;
    payload.check(&b.target, "restored volume holds the snapshot's data");
    assert!(
        !b.target.join("after-snapshot.bin").exists(),
        "the restored volume holds a file written after the snapshot"
    );
    let b_bytes = fs_bytes(&b.target);
    assert!(
        b_bytes > a_bytes + (b.vol.capacity - a.vol.capacity) / 2,
        "{}: the restored filesystem was not grown to the larger volume \
         ({b_bytes} bytes vs {a_bytes} for the source; volume {} vs {})",
        fs.name(),
        b.vol.capacity,
        a.vol.capacity
    );
    let b_file = data::pattern(7, 2 * MIB as usize);
    data::write_synced(&b.target.join("b-only.bin"), &b_file);
    assert!(!a.target.join("b-only.bin").exists(), "restored volume shares storage with its source");

    // Online expansion of the original while published.
    let grown = a.vol.capacity + 64 * MIB;
    let stats_before = stats_total_bytes(driver, &a).await;
    let expanded = expect_ok(
        driver.controller().controller_expand_volume(a.vol.controller_expand_request(grown)).await,
        "ControllerExpandVolume while published",
    );
    assert!(expanded.capacity_bytes >= grown, "expanded to {} < {grown}", expanded.capacity_bytes);
    assert!(expanded.node_expansion_required, "a mount volume needs NodeExpandVolume");
    if steps::grows_online(&a.vol) {
        for round in 0..2 {
            let node = expect_ok(
                driver.node().node_expand_volume(a.vol.node_expand_request(&a.target, &a.staging, grown)).await,
                &format!("NodeExpandVolume #{round} while published"),
            );
            assert!(
                node.capacity_bytes >= grown,
                "NodeExpandVolume answered capacity_bytes {} < {grown}",
                node.capacity_bytes
            );
        }
    } else {
        steps::grow_offline_after_refusal(driver, &a.vol, &a.staging, &a.target, grown).await;
    }
    let a_grown = fs_bytes(&a.target);
    assert!(
        a_grown > a_bytes + 32 * MIB,
        "{}: the filesystem did not grow online ({a_bytes} -> {a_grown} bytes)",
        fs.name()
    );
    assert_eq!(fs_bytes(&a.staging), a_grown, "staging and target disagree on the size");
    assert!(
        stats_total_bytes(driver, &a).await > stats_before + 32 * MIB,
        "NodeGetVolumeStats does not show the growth"
    );
    payload.check(&a.target, "data after online expansion");
    data::assert_content(&a.target.join("after-snapshot.bin"), &late, "data after online expansion");
    // The new space is usable.
    let fill = data::pattern(5, 40 * MIB as usize);
    data::write_synced(&a.target.join("fill.bin"), &fill);
    data::assert_content(&a.target.join("fill.bin"), &fill, "data written into the new space");

    // Tear down in Kubernetes' order.
    steps::unpublish(driver, &a.vol, &a.target).await;
    steps::unpublish(driver, &b.vol, &b.target).await;
    steps::unstage(driver, &a.vol, &a.staging).await;
    steps::unstage(driver, &b.vol, &b.staging).await;
    steps::controller_unpublish(driver, &a.vol).await;
    steps::controller_unpublish(driver, &b.vol).await;
    steps::delete_snapshot(driver, &snap.snapshot_id).await;
    steps::delete_volume(driver, &a.vol).await;
    steps::delete_volume(driver, &b.vol).await;
}

async fn clone_from_volume(family: &Family) {
    run_each(family.fs_types.clone(), |fs| {
        let family = family.clone();
        async move { clone_lifecycle(&family, fs).await }
    })
    .await;
}

async fn clone_lifecycle(family: &Family, fs: FsType) {
    let mut driver = Driver::start(family, DriverOptions::default()).await;
    {
        let access = Access::Mount(fs);
        let size = fs.small_bytes();
        let name_a = unique_name("pvc", &format!("{}-src", fs.name()));
        let a = steps::provision_and_publish(family, &driver, &name_a, access, size).await;
        let payload = Payload::new(10);
        payload.write(&a.target);
        let a_bytes = fs_bytes(&a.target);

        let name_b = unique_name("pvc", &format!("{}-clone", fs.name()));
        let mut request = create_request(family, &name_b, access, size + 32 * MIB);
        request.volume_content_source = volume_source(&a.vol.id);
        let b = steps::create_volume(family, &driver, request, access).await;
        let b = attach_and_publish(&driver, b, &name_b).await;
        payload.check(&b.target, "the clone holds the source's data");
        assert!(
            fs_bytes(&b.target) > a_bytes + 16 * MIB,
            "{}: the clone's filesystem was not grown to its larger size",
            fs.name()
        );
        // The two are independent from now on.
        data::write_synced(&a.target.join("a-after.bin"), b"source only");
        data::write_synced(&b.target.join("b-after.bin"), b"clone only");
        assert!(!b.target.join("a-after.bin").exists(), "the clone sees later writes to its source");
        assert!(!a.target.join("b-after.bin").exists(), "the source sees writes to its clone");
        payload.check(&a.target, "the source is unchanged by cloning");

        steps::teardown(&driver, &b).await;
        // Deleting the clone leaves the source intact.
        payload.check(&a.target, "the source after its clone was deleted");
        steps::teardown(&driver, &a).await;
        driver.assert_no_leaks();
    }
    family.assert_no_leftover_storage(&driver);
    driver.stop().await;
}

async fn block_mode(family: &Family) {
    let mut driver = Driver::start(family, DriverOptions::default()).await;
    let access = Access::Block;
    let size = access.small_bytes(family);
    let name_a = unique_name("pvc", "block-a");
    let a = steps::provision_and_publish(family, &driver, &name_a, access, size).await;
    let cap = u64::try_from(a.vol.capacity).expect("positive");
    let chunk = 256 * 1024;
    let offsets = [0, MIB as u64 + 512, cap - chunk as u64];
    for (i, offset) in offsets.iter().enumerate() {
        data::write_at_synced(&a.target, *offset, &data::pattern(100 + i as u64, chunk));
    }
    let snap = steps::snapshot(family, &driver, &a.vol, &unique_name("snapshot", "block")).await;
    data::write_at_synced(&a.target, 0, &data::pattern(999, chunk));

    let name_b = unique_name("pvc", "block-b");
    let larger = size + 16 * MIB;
    let mut request = create_request(family, &name_b, access, larger);
    request.volume_content_source = snapshot_source(&snap.snapshot_id);
    let b = steps::create_volume(family, &driver, request, access).await;
    let b = attach_and_publish(&driver, b, &name_b).await;
    for (i, offset) in offsets.iter().enumerate() {
        assert_eq!(
            data::read_at(&b.target, *offset, chunk),
            data::pattern(100 + i as u64, chunk),
            "the restored block volume differs at offset {offset}"
        );
    }

    // Grow the restored volume while published.
    let grown = b.vol.capacity + 32 * MIB;
    let expanded = expect_ok(
        driver.controller().controller_expand_volume(b.vol.controller_expand_request(grown)).await,
        "ControllerExpandVolume of a published block volume",
    );
    assert!(expanded.capacity_bytes >= grown);
    if expanded.node_expansion_required {
        expect_ok(
            driver.node().node_expand_volume(b.vol.node_expand_request(&b.target, &b.staging, grown)).await,
            "NodeExpandVolume of a published block volume",
        );
    }
    assert_eq!(
        data::block_device_bytes(&b.target),
        u64::try_from(expanded.capacity_bytes).expect("positive"),
        "the published block device did not grow"
    );
    let at_end = u64::try_from(expanded.capacity_bytes).expect("positive") - chunk as u64;
    data::write_at_synced(&b.target, at_end, &data::pattern(7, chunk));
    assert_eq!(data::read_at(&b.target, at_end, chunk), data::pattern(7, chunk), "the new space works");
    for (i, offset) in offsets.iter().enumerate() {
        assert_eq!(
            data::read_at(&b.target, *offset, chunk),
            data::pattern(100 + i as u64, chunk),
            "block data changed by expansion at offset {offset}"
        );
    }

    steps::teardown(&driver, &b).await;
    steps::delete_snapshot(&driver, &snap.snapshot_id).await;
    steps::teardown(&driver, &a).await;
    driver.assert_no_leaks();
    family.assert_no_leftover_storage(&driver);
    driver.stop().await;
}

async fn offline_expansion(family: &Family) {
    let mut driver = Driver::start(family, DriverOptions::default()).await;
    let fs = first_fs(family);
    let access = Access::Mount(fs);
    let name = unique_name("pvc", "offline");
    let used = steps::provision_and_publish(family, &driver, &name, access, fs.small_bytes()).await;
    let payload = Payload::new(20);
    payload.write(&used.target);
    let before = fs_bytes(&used.target);
    steps::unpublish(&driver, &used.vol, &used.target).await;
    steps::unstage(&driver, &used.vol, &used.staging).await;
    steps::controller_unpublish(&driver, &used.vol).await;

    let grown = used.vol.capacity + 64 * MIB;
    let expanded = expect_ok(
        driver.controller().controller_expand_volume(used.vol.controller_expand_request(grown)).await,
        "ControllerExpandVolume of a detached volume",
    );
    assert!(expanded.capacity_bytes >= grown);
    assert!(expanded.node_expansion_required, "a mount volume needs NodeExpandVolume");

    let mut vol = used.vol.clone();
    vol.capacity = expanded.capacity_bytes;
    steps::controller_publish(&driver, &mut vol).await;
    steps::stage(&driver, &vol, &used.staging).await;
    // Kubelet expands after staging, before publishing.
    expect_ok(
        driver.node().node_expand_volume(vol.node_expand_request(&used.staging, &used.staging, grown)).await,
        "NodeExpandVolume at the staging path",
    );
    steps::publish(&driver, &vol, &used.staging, &used.target, false).await;
    let after = fs_bytes(&used.target);
    assert!(after > before + 32 * MIB, "offline expansion did not grow the filesystem ({before} -> {after})");
    payload.check(&used.target, "data after offline expansion");

    steps::unpublish(&driver, &vol, &used.target).await;
    steps::unstage(&driver, &vol, &used.staging).await;
    steps::controller_unpublish(&driver, &vol).await;
    steps::delete_volume(&driver, &vol).await;
    driver.assert_no_leaks();
    family.assert_no_leftover_storage(&driver);
    driver.stop().await;
}
