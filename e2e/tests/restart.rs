//! Crash recovery: the driver is killed with SIGKILL during or after each step of a volume's
//! life and restarted on the same data dir and socket; repeating the interrupted call must
//! converge to OK, fsync'd data must survive, and nothing may leak at the end.
#![cfg(feature = "kernel-tests")]
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::time::Duration;

use ferrovol_e2e::csi::{ControllerGetVolumeRequest, ListSnapshotsRequest, ListVolumesRequest};
use ferrovol_e2e::independent::run_each;
use ferrovol_e2e::requests::{self, accesses, create_request, unique_name};
use ferrovol_e2e::{data, expect_ok, Access, Driver, DriverOptions, Family, FamilyKind, Vol, MIB};
use tonic::{Response, Status};

ferrovol_e2e::family_tests!(loop_family => ferrovol_e2e::Family::loop_family();
    kill_after_each_step_mount,
    kill_after_each_step_block,
    kill_during_each_step_mount,
    kill_during_each_step_block,
    reboot_with_volumes_staged,
);

#[cfg(feature = "lvm-tests")]
ferrovol_e2e::family_tests!(in_vm_lvm_linear => ferrovol_e2e::Family::lvm_linear();
    kill_after_each_step_mount,
    kill_after_each_step_block,
    kill_during_each_step_mount,
    kill_during_each_step_block,
    reboot_with_volumes_staged,
);
#[cfg(feature = "lvm-tests")]
ferrovol_e2e::family_tests!(in_vm_lvm_thin => ferrovol_e2e::Family::lvm_thin();
    kill_after_each_step_mount,
    kill_during_each_step_mount,
    reboot_with_volumes_staged,
);

/// When the driver dies relative to a call.
#[derive(Clone, Copy, Debug)]
enum Crash {
    /// The call completed; then SIGKILL.
    After,
    /// SIGKILL this long after the call was sent (it may or may not have finished).
    During(Duration),
}

/// Makes the call (as `make` builds it) and crashes the driver as `how` says, then
/// restarts it. The caller then repeats the call, which must converge.
async fn crash_around<T, Fut, Make>(driver: &mut Driver, how: Crash, what: &str, make: Make)
where
    Make: Fn(&Driver) -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>> + Send + 'static,
    T: Send + 'static,
{
    match how {
        Crash::After => {
            expect_ok(make(driver).await, &format!("{what} before the crash"));
            driver.restart().await;
        }
        Crash::During(delay) => {
            let call = tokio::spawn(make(driver));
            tokio::time::sleep(delay).await;
            driver.kill_9();
            // Whatever it answered (or not) before dying does not matter: the retry must.
            let _ = call.await;
            driver.restart().await;
        }
    }
}

/// Data written through the published volume and checked after every crash.
struct Written {
    bytes: Vec<u8>,
}

impl Written {
    fn write(vol: &Vol, target: &std::path::Path) -> Written {
        let bytes = data::pattern(77, 2 * MIB as usize + 99);
        match vol.access {
            Access::Mount(_) => data::write_synced(&target.join("durable.bin"), &bytes),
            Access::Block => data::write_at_synced(target, MIB as u64, &bytes),
        }
        Written { bytes }
    }

    #[track_caller]
    fn check(&self, vol: &Vol, target: &std::path::Path, what: &str) {
        match vol.access {
            Access::Mount(_) => data::assert_content(&target.join("durable.bin"), &self.bytes, what),
            Access::Block => assert!(
                data::read_at(target, MIB as u64, self.bytes.len()) == self.bytes,
                "{what}: the fsync'd block data changed"
            ),
        }
    }
}

async fn volume_count(driver: &Driver) -> usize {
    expect_ok(driver.controller().list_volumes(ListVolumesRequest::default()).await, "ListVolumes").entries.len()
}

async fn snapshot_count(driver: &Driver) -> usize {
    expect_ok(driver.controller().list_snapshots(ListSnapshotsRequest::default()).await, "ListSnapshots").entries.len()
}

/// One volume's whole life with a crash around every step.
async fn crashing_lifecycle(
    family: &Family,
    driver: &mut Driver,
    access: Access,
    crashes: &mut (dyn Iterator<Item = Crash> + Send),
) {
    let name = unique_name("pvc", &format!("crash-{}", access.label()));
    let request = create_request(family, &name, access, access.small_bytes(family));

    let how = crashes.next().expect("crash plan");
    crash_around(driver, how, "CreateVolume", |d| {
        let mut controller = d.controller();
        let request = request.clone();
        async move { controller.create_volume(request).await }
    })
    .await;
    let mut vol = ferrovol_e2e::steps::create_volume(family, driver, request.clone(), access).await;
    assert_eq!(volume_count(driver).await, 1, "CreateVolume after a crash ({how:?}) made a second volume");

    let how = crashes.next().expect("crash plan");
    crash_around(driver, how, "ControllerPublishVolume", |d| {
        let mut controller = d.controller();
        let request = vol.controller_publish_request(d.node_id());
        async move { controller.controller_publish_volume(request).await }
    })
    .await;
    ferrovol_e2e::steps::controller_publish(driver, &mut vol).await;
    driver.restart().await;
    let status = expect_ok(
        driver.controller().controller_get_volume(ControllerGetVolumeRequest { volume_id: vol.id.clone() }).await,
        "ControllerGetVolume after a crash",
    )
    .status
    .expect("ControllerGetVolume status is REQUIRED");
    assert_eq!(
        status.published_node_ids,
        vec![driver.node_id().to_owned()],
        "a restart forgot that the volume is controller-published"
    );

    let staging = driver.staging_dir(&name);
    let how = crashes.next().expect("crash plan");
    crash_around(driver, how, "NodeStageVolume", |d| {
        let mut node = d.node();
        let request = vol.stage_request(&staging);
        async move { node.node_stage_volume(request).await }
    })
    .await;
    ferrovol_e2e::steps::stage(driver, &vol, &staging).await;

    let target = driver.target_path(&name);
    let how = crashes.next().expect("crash plan");
    crash_around(driver, how, "NodePublishVolume", |d| {
        let mut node = d.node();
        let request = vol.publish_request(&staging, &target, false);
        async move { node.node_publish_volume(request).await }
    })
    .await;
    ferrovol_e2e::steps::publish(driver, &vol, &staging, &target, false).await;

    let written = Written::write(&vol, &target);
    driver.restart().await;
    written.check(&vol, &target, "after a crash with the volume published");
    ferrovol_e2e::steps::check_published(&vol, &target, false, "after a crash");
    expect_ok(
        driver.node().node_get_volume_stats(vol.stats_request(&target, &staging)).await,
        "NodeGetVolumeStats after a crash",
    );

    let snapshot_name = unique_name("snapshot", &format!("crash-{}", access.label()));
    let how = crashes.next().expect("crash plan");
    crash_around(driver, how, "CreateSnapshot", |d| {
        let mut controller = d.controller();
        let request = vol.snapshot_request(&snapshot_name);
        async move { controller.create_snapshot(request).await }
    })
    .await;
    if let Access::Mount(_) = access {
        data::assert_writable_within(
            &target,
            Duration::from_secs(10),
            &format!("after a crash ({how:?}) around CreateSnapshot"),
        );
    }
    let snapshot = ferrovol_e2e::steps::snapshot(family, driver, &vol, &snapshot_name).await;
    assert_eq!(snapshot_count(driver).await, 1, "CreateSnapshot after a crash ({how:?}) made a second snapshot");
    written.check(&vol, &target, "after a crash around CreateSnapshot");

    let grown = vol.capacity + 32 * MIB;
    let size_before = match access {
        Access::Mount(_) => data::fs_total_bytes(&target),
        Access::Block => data::block_device_bytes(&target),
    };
    let how = crashes.next().expect("crash plan");
    crash_around(driver, how, "ControllerExpandVolume", |d| {
        let mut controller = d.controller();
        let request = vol.controller_expand_request(grown);
        async move { controller.controller_expand_volume(request).await }
    })
    .await;
    let mut node_expansion = false;
    for round in 0..2 {
        let answer = expect_ok(
            driver.controller().controller_expand_volume(vol.controller_expand_request(grown)).await,
            &format!("ControllerExpandVolume #{round} after a crash ({how:?})"),
        );
        assert!(answer.capacity_bytes >= grown, "expanded to {} < {grown}", answer.capacity_bytes);
        node_expansion = answer.node_expansion_required;
    }
    if node_expansion && !ferrovol_e2e::steps::grows_online(&vol) {
        ferrovol_e2e::steps::grow_offline_after_refusal(driver, &vol, &staging, &target, grown).await;
    } else if node_expansion {
        let how = crashes.next().expect("crash plan");
        crash_around(driver, how, "NodeExpandVolume", |d| {
            let mut node = d.node();
            let request = vol.node_expand_request(&target, &staging, grown);
            async move { node.node_expand_volume(request).await }
        })
        .await;
        for round in 0..2 {
            expect_ok(
                driver.node().node_expand_volume(vol.node_expand_request(&target, &staging, grown)).await,
                &format!("NodeExpandVolume #{round} after a crash ({how:?})"),
            );
        }
    }
    match access {
        Access::Mount(_) => {
            let total = data::fs_total_bytes(&target);
            assert!(
                total >= size_before + 16 * MIB as u64,
                "the filesystem did not grow after expansion with crashes ({size_before} -> {total} bytes)"
            );
        }
        Access::Block => assert!(
            data::block_device_bytes(&target) >= u64::try_from(grown).expect("positive"),
            "the block device did not grow after expansion with crashes ({size_before} bytes before)"
        ),
    }
    written.check(&vol, &target, "after crashes around expansion");

    let how = crashes.next().expect("crash plan");
    crash_around(driver, how, "NodeUnpublishVolume", |d| {
        let mut node = d.node();
        let request = vol.unpublish_request(&target);
        async move { node.node_unpublish_volume(request).await }
    })
    .await;
    ferrovol_e2e::steps::unpublish(driver, &vol, &target).await;

    let how = crashes.next().expect("crash plan");
    crash_around(driver, how, "NodeUnstageVolume", |d| {
        let mut node = d.node();
        let request = vol.unstage_request(&staging);
        async move { node.node_unstage_volume(request).await }
    })
    .await;
    ferrovol_e2e::steps::unstage(driver, &vol, &staging).await;

    let how = crashes.next().expect("crash plan");
    crash_around(driver, how, "ControllerUnpublishVolume", |d| {
        let mut controller = d.controller();
        let request = vol.controller_unpublish_request(d.node_id());
        async move { controller.controller_unpublish_volume(request).await }
    })
    .await;
    ferrovol_e2e::steps::controller_unpublish(driver, &vol).await;

    let how = crashes.next().expect("crash plan");
    crash_around(driver, how, "DeleteSnapshot", |d| {
        let mut controller = d.controller();
        let request = requests::delete_snapshot_request(&snapshot.snapshot_id);
        async move { controller.delete_snapshot(request).await }
    })
    .await;
    ferrovol_e2e::steps::delete_snapshot(driver, &snapshot.snapshot_id).await;
    assert_eq!(snapshot_count(driver).await, 0, "a snapshot is left after DeleteSnapshot with a crash");

    let how = crashes.next().expect("crash plan");
    crash_around(driver, how, "DeleteVolume", |d| {
        let mut controller = d.controller();
        let request = vol.delete_request();
        async move { controller.delete_volume(request).await }
    })
    .await;
    ferrovol_e2e::steps::delete_volume(driver, &vol).await;
    assert_eq!(volume_count(driver).await, 0, "a volume is left after DeleteVolume with a crash");
    driver.assert_no_leaks();
}

/// Each access type runs with its own driver, so one failing does not hide the others.
async fn run(family: &Family, chosen: Vec<Access>, plan: fn() -> Box<dyn Iterator<Item = Crash> + Send>) {
    run_each(chosen, |access| {
        let family = family.clone();
        async move {
            let mut driver = Driver::start(&family, DriverOptions::default()).await;
            let mut crashes = plan();
            crashing_lifecycle(&family, &mut driver, access, &mut crashes).await;
            family.assert_no_leftover_storage(&driver);
            driver.stop().await;
        }
    })
    .await;
}

fn mount_accesses(family: &Family) -> Vec<Access> {
    accesses(family).into_iter().filter(|access| !access.is_block()).collect()
}

/// A kill after every step.
fn after_plan() -> Box<dyn Iterator<Item = Crash> + Send> {
    Box::new(std::iter::repeat(Crash::After))
}

/// Kill delays cycled over the steps: early (request barely arrived), mid-way (mkfs,
/// copies, mounts under way) and late.
fn during_plan() -> Box<dyn Iterator<Item = Crash> + Send> {
    Box::new([1u64, 15, 60, 150].into_iter().cycle().map(|ms| Crash::During(Duration::from_millis(ms))))
}

async fn kill_after_each_step_mount(family: &Family) {
    run(family, mount_accesses(family), after_plan).await;
}

async fn kill_after_each_step_block(family: &Family) {
    run(family, vec![Access::Block], after_plan).await;
}

async fn kill_during_each_step_mount(family: &Family) {
    run(family, mount_accesses(family), during_plan).await;
}

async fn kill_during_each_step_block(family: &Family) {
    run(family, vec![Access::Block], during_plan).await;
}

/// A reboot takes every mount and loop device away while the records stay. Each access type
/// has one volume staged and published; after the "reboot" the driver's start-up reconcile
/// must re-attach the loop devices and re-mount the staged filesystems before Probe says
/// ready, and the kubelet's repeated NodeStage and NodePublish must bring the volumes back
/// with their fsync'd data. Then everything is torn down without leaks.
async fn reboot_with_volumes_staged(family: &Family) {
    let mut driver = Driver::start(family, DriverOptions::default()).await;
    let mut in_use = Vec::new();
    for access in accesses(family) {
        let name = unique_name("pvc", &format!("reboot-{}", access.label()));
        let used =
            ferrovol_e2e::steps::provision_and_publish(family, &driver, &name, access, access.small_bytes(family))
                .await;
        let written = Written::write(&used.vol, &used.target);
        in_use.push((used, written));
    }

    driver.kill_9();
    let attached = ferrovol_e2e::kernel::loop_devices_under(&driver.data_dir()).len();
    if family.kind == FamilyKind::Loop {
        assert_eq!(attached, in_use.len(), "each staged volume has its loop device before the reboot");
    }
    let stuck = driver.release_kernel_resources();
    assert!(stuck.is_empty(), "the simulated reboot could not take away {stuck:#?}");
    assert!(ferrovol_e2e::kernel::loop_devices_under(&driver.data_dir()).is_empty());
    if family.kind != FamilyKind::Loop {
        // A node that boots without LVM autoactivation: the LVs come back inactive.
        let vg = ferrovol_e2e::lvm::test_volume_group().name.clone();
        for lv in ferrovol_e2e::lvm::lvs_of_node(driver.node_id()) {
            ferrovol_e2e::lvm::run(&["lvchange", "--activate", "n", &format!("{vg}/{lv}")]);
        }
    }
    for (used, _) in &in_use {
        assert!(ferrovol_e2e::kernel::mounts_at(&used.staging).is_empty(), "staging still mounted after the reboot");
    }
    driver.restart().await;

    for (used, written) in &in_use {
        // Reconcile alone (before any kubelet call) brings back what staging needs.
        if let Access::Mount(_) = used.vol.access {
            ferrovol_e2e::steps::check_staged(&used.vol, &used.staging, "after a reboot, before any call");
            written.check(&used.vol, &used.staging, "through the re-mounted staging path after a reboot");
        }
        ferrovol_e2e::steps::stage(&driver, &used.vol, &used.staging).await;
        ferrovol_e2e::steps::publish(&driver, &used.vol, &used.staging, &used.target, false).await;
        written.check(&used.vol, &used.target, "after a reboot and the kubelet's repeated calls");
    }
    for (used, _) in &in_use {
        ferrovol_e2e::steps::teardown(&driver, used).await;
    }
    driver.assert_no_leaks();
    family.assert_no_leftover_storage(&driver);
    driver.stop().await;
}
