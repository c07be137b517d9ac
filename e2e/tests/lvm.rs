//! What only the LVM families have: parameters naming volume groups and thin pools, LVs
//! that are not ours left alone, extent rounding, thin-pool exhaustion refused and
//! reported, half-made LVs of a killed driver cleaned up and frozen filesystems thawed at
//! start-up. Runs inside the
//! test VM (real device-mapper); `scripts/test` starts it there.
#![cfg(feature = "lvm-tests")]
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use ferrovol_e2e::csi::{ControllerGetVolumeRequest, CreateVolumeRequest, GetCapacityRequest, ListVolumesRequest};
use ferrovol_e2e::lvm::{self, test_volume_group};
use ferrovol_e2e::requests::{create_request, unique_name};
use ferrovol_e2e::{data, expect_code, expect_ok, steps, Access, Code, Driver, DriverOptions, Family, FsType, MIB};

fn lvm_family_with(params: &[(&str, &str)]) -> Family {
    let mut f = Family::lvm_linear();
    f.parameters = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    f
}

async fn delete(driver: &Driver, volume_id: &str) {
    let req = ferrovol_e2e::csi::DeleteVolumeRequest { volume_id: volume_id.to_owned(), ..Default::default() };
    expect_ok(driver.controller().delete_volume(req).await, "DeleteVolume");
}

fn message(status: &tonic::Status) -> String {
    status.message().to_owned()
}

/// A thin pool of its own for one test, removed at the end.
struct ScratchPool {
    vg: String,
    name: String,
}

impl ScratchPool {
    fn new(label: &str, bytes: u64) -> Self {
        let vg = test_volume_group().name.clone();
        let name = format!("{label}{}", std::process::id());
        lvm::run(&["lvcreate", "--yes", "--type", "thin-pool", "--size", &format!("{bytes}b"), "--name", &name, &vg]);
        ScratchPool { vg, name }
    }
}

impl Drop for ScratchPool {
    fn drop(&mut self) {
        let _ = std::process::Command::new("lvm")
            .args(["lvremove", "--yes", &format!("{}/{}", self.vg, self.name)])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_vm_lvm_parameters_name_what_is_wrong() {
    let family = Family::lvm_linear();
    let driver = Driver::start(&family, DriverOptions::default()).await;
    let vg = test_volume_group().name.clone();
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![("type", "lvm")], "volumeGroup is required"),
        (vec![("type", "lvm"), ("volumeGroup", "not-served-vg")], "not-served-vg"),
        (vec![("type", "lvm-thin"), ("volumeGroup", &vg)], "thinPool is required"),
        (vec![("type", "lvm-thin"), ("volumeGroup", &vg), ("thinPool", "no-such-pool")], "no-such-pool"),
        (vec![("type", "lvm"), ("volumeGroup", &vg), ("stripes", "2")], "stripes"),
        (vec![("type", "lvm"), ("volumeGroup", "../../dev/sda")], "not a valid LVM name"),
    ];
    for (params, needle) in cases {
        let mut req = create_request(&family, &unique_name("pvc", "param"), Access::Block, 16 * MIB);
        req.parameters = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let status = expect_code(driver.controller().create_volume(req).await, Code::InvalidArgument, needle);
        assert!(message(&status).contains(needle), "{params:?}: {status:?}");
    }
    // A VG the node serves but that does not exist.
    let ghost = lvm_family_with(&[("type", "lvm"), ("volumeGroup", "ghostvg")]);
    let driver2 = Driver::start(
        &ghost,
        DriverOptions { extra_args: vec!["--lvm-volume-group".into(), "ghostvg".into()], ..Default::default() },
    )
    .await;
    let req = create_request(&ghost, &unique_name("pvc", "ghost"), Access::Block, 16 * MIB);
    let status = expect_code(driver2.controller().create_volume(req).await, Code::InvalidArgument, "missing VG");
    assert!(message(&status).contains("ghostvg") && message(&status).contains("does not exist"), "{status:?}");
    family.assert_no_leftover_storage(&driver);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_vm_lvm_lvs_not_made_by_the_driver_are_left_alone() {
    let family = Family::lvm_linear();
    let driver = Driver::start(&family, DriverOptions::default()).await;
    let vg = test_volume_group().name.clone();
    let name = unique_name("pvc", "foreign");
    let lv = format!("fv-{name}");
    lvm::run(&["lvcreate", "--yes", "--size", "8m", "--name", &lv, &vg]);
    let req = create_request(&family, &name, Access::Block, 16 * MIB);
    let status = expect_code(driver.controller().create_volume(req).await, Code::AlreadyExists, "foreign LV");
    assert!(message(&status).contains("not made by this driver"), "{status:?}");
    let listed = expect_ok(driver.controller().list_volumes(ListVolumesRequest::default()).await, "ListVolumes");
    assert!(listed.entries.is_empty(), "a foreign LV is listed: {:?}", listed.entries);
    // DeleteVolume of the ID that name would have: OK (nothing of ours), and nothing touched.
    delete(&driver, &format!("lvm.vol:{}:{name}", driver.node_id())).await;
    let still = lvm::run(&["lvs", "--noheadings", "-o", "lv_name", &format!("{vg}/{lv}")]);
    assert!(still.contains(&lv), "the foreign LV was removed");
    lvm::run(&["lvremove", "--yes", &format!("{vg}/{lv}")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_vm_lvm_sizes_are_whole_extents() {
    // The test VG has 4 MiB extents (LVM's default): 17 MiB becomes 20 MiB.
    let family = Family::lvm_linear();
    let driver = Driver::start(&family, DriverOptions::default()).await;
    let req = create_request(&family, &unique_name("pvc", "extent"), Access::Block, 17 * MIB);
    let vol = expect_ok(driver.controller().create_volume(req.clone()).await, "CreateVolume").volume.unwrap();
    assert_eq!(vol.capacity_bytes, 20 * MIB);
    let again = expect_ok(driver.controller().create_volume(req).await, "repeat").volume.unwrap();
    assert_eq!(again, vol);
    let mut limited = create_request(&family, &unique_name("pvc", "extent-limit"), Access::Block, 17 * MIB);
    limited.capacity_range.as_mut().unwrap().limit_bytes = 18 * MIB;
    expect_code(driver.controller().create_volume(limited).await, Code::OutOfRange, "limit below whole extents");
    delete(&driver, &vol.volume_id).await;
    family.assert_no_leftover_storage(&driver);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_vm_lvm_thin_pool_exhaustion_is_refused_and_reported() {
    let pool = ScratchPool::new("full", 64 * MIB as u64);
    let mut family = Family::lvm_thin();
    family.parameters.insert("thinPool".into(), pool.name.clone());
    family.parameters.insert("thinPoolOverprovisionRatio".into(), "4".into());
    let driver = Driver::start(&family, DriverOptions::default()).await;
    let capacity = |family: &Family| GetCapacityRequest { parameters: family.parameters.clone(), ..Default::default() };
    let before = expect_ok(driver.controller().get_capacity(capacity(&family)).await, "GetCapacity").available_capacity;
    assert_eq!(before, 4 * 64 * MIB, "pool size × overprovisioning ratio");

    let name = unique_name("pvc", "fill");
    let in_use = steps::provision_and_publish(&family, &driver, &name, Access::Block, 64 * MIB).await;
    // Fill the pool past the 90% threshold through the volume.
    data::write_at_synced(&in_use.target, 0, &vec![0x5a; 62 * MIB as usize]);
    let after = expect_ok(driver.controller().get_capacity(capacity(&family)).await, "GetCapacity").available_capacity;
    assert_eq!(after, 0, "a pool past its threshold offers nothing");
    let req = create_request(&family, &unique_name("pvc", "refused"), Access::Block, 16 * MIB);
    let status = expect_code(driver.controller().create_volume(req).await, Code::ResourceExhausted, "full pool");
    assert!(message(&status).contains(&pool.name) && message(&status).contains("full"), "{status:?}");

    // The report is cached for up to 15 s; then conditions say the pool is nearly full.
    tokio::time::sleep(Duration::from_secs(16)).await;
    let got = expect_ok(
        driver
            .controller()
            .controller_get_volume(ControllerGetVolumeRequest { volume_id: in_use.vol.id.clone() })
            .await,
        "ControllerGetVolume",
    );
    let cond = got.status.unwrap().volume_condition.unwrap();
    assert!(cond.abnormal && cond.message.contains(&pool.name), "{cond:?}");
    let stats = expect_ok(
        driver.node().node_get_volume_stats(in_use.vol.stats_request(&in_use.target, &in_use.staging)).await,
        "NodeGetVolumeStats",
    );
    let cond = stats.volume_condition.unwrap();
    assert!(cond.abnormal && cond.message.contains("full"), "{cond:?}");
    steps::teardown(&driver, &in_use).await;
    family.assert_no_leftover_storage(&driver);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_vm_lvm_half_made_lvs_are_removed_at_start_up() {
    let family = Family::lvm_linear();
    let mut driver = Driver::start(&family, DriverOptions::default()).await;
    let vg = test_volume_group().name.clone();
    let name = unique_name("pvc", "debris");
    let req: CreateVolumeRequest = create_request(&family, &name, Access::Mount(FsType::Ext4), 16 * MIB);
    let vol = expect_ok(driver.controller().create_volume(req.clone()).await, "CreateVolume").volume.unwrap();
    // As if the driver had been killed between lvcreate and the end of the volume's fill.
    driver.kill_9();
    lvm::run(&["lvchange", "--addtag", "fv.creating", &format!("{vg}/fv-{name}")]);
    driver.restart().await;
    assert!(lvm::lvs_of_node(driver.node_id()).is_empty(), "the half-made LV is still there");
    assert!(driver.log_text().contains("half-made"), "start-up did not report what it removed");
    // The CO repeats the CreateVolume it never got an answer for: a fresh volume.
    let again = expect_ok(driver.controller().create_volume(req).await, "repeat").volume.unwrap();
    assert_eq!(again.volume_id, vol.volume_id);
    delete(&driver, &again.volume_id).await;
    family.assert_no_leftover_storage(&driver);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_vm_lvm_names_are_one_namespace_across_families() {
    let linear = Family::lvm_linear();
    let driver = Driver::start(&linear, DriverOptions::default()).await;
    let name = unique_name("pvc", "cross");
    let vol = expect_ok(
        driver.controller().create_volume(create_request(&linear, &name, Access::Block, 16 * MIB)).await,
        "CreateVolume lvm",
    )
    .volume
    .unwrap();
    let loop_family = Family::loop_family();
    let params: HashMap<String, String> = loop_family.parameters.clone();
    let mut req = create_request(&loop_family, &name, Access::Block, 16 * MIB);
    req.parameters = params;
    expect_code(driver.controller().create_volume(req).await, Code::AlreadyExists, "same name, other family");
    delete(&driver, &vol.volume_id).await;
    linear.assert_no_leftover_storage(&driver);
}

/// A driver killed while an LVM volume's filesystem is frozen (a linear snapshot or a clone
/// copies from a frozen source) leaves it frozen; start-up thaws it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_vm_lvm_frozen_filesystem_is_thawed_at_start_up() {
    let family = Family::lvm_linear();
    let mut driver = Driver::start(&family, DriverOptions::default()).await;
    let name = unique_name("pvc", "frozen");
    let access = Access::Mount(FsType::Ext4);
    let mut vol = steps::create_simple(&family, &driver, &name, access, 16 * MIB).await;
    steps::controller_publish(&driver, &mut vol).await;
    let staging = driver.staging_dir(&name);
    steps::stage(&driver, &vol, &staging).await;
    // As if the driver had been killed in the middle of copying from the volume.
    driver.kill_9();
    let frozen = std::process::Command::new("fsfreeze").arg("--freeze").arg(&staging).status().unwrap();
    assert!(frozen.success(), "fsfreeze --freeze {}", staging.display());
    driver.restart().await;
    data::assert_writable_within(&staging, Duration::from_secs(10), "the staged volume after start-up");
    assert!(driver.log_text().contains("thawed volume"), "start-up did not report the thaw");
    steps::unstage(&driver, &vol, &staging).await;
    steps::controller_unpublish(&driver, &vol).await;
    delete(&driver, &vol.id).await;
    family.assert_no_leftover_storage(&driver);
}
