//! The volume group the LVM families are tested on: made once per test process on a scratch
//! disk (`FERROVOL_TEST_PV`, e.g. the VM's `/dev/vda`) or on a loop device over a sparse
//! file, with a thin pool for `lvm-thin`. It needs device-mapper, so it only works inside the
//! test VM (`e2e/vm/run`); anywhere else the first LVM test fails saying so.
//!
//! Every driver in the process shares the VG; each tags its LVs with its own node ID, so
//! leftovers are counted per driver.

use std::process::Command;
use std::sync::OnceLock;

/// The shared test VG.
#[derive(Debug)]
pub struct TestVolumeGroup {
    pub name: String,
    pub thin_pool: String,
}

/// Size of the thin pool; the rest of the PV is for linear volumes.
const THIN_POOL_BYTES: u64 = 3 << 30;

fn lvm(args: &[&str]) -> String {
    let out = Command::new("lvm")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run lvm {args:?}: {e} (is lvm2 installed?)"));
    assert!(
        out.status.success(),
        "lvm {args:?} failed: {}\nLVM tests need device-mapper: run them inside the test VM (e2e/vm/run, as scripts/test does)",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn physical_volume() -> String {
    if let Ok(pv) = std::env::var("FERROVOL_TEST_PV") {
        return pv;
    }
    let dir = std::env::temp_dir().join(format!("ferrovol-test-pv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let img = dir.join("pv.img");
    let f = std::fs::File::create(&img).unwrap_or_else(|e| panic!("{}: {e}", img.display()));
    f.set_len(8 << 30).unwrap_or_else(|e| panic!("{}: {e}", img.display()));
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&img)
        .output()
        .unwrap_or_else(|e| panic!("losetup: {e}"));
    assert!(out.status.success(), "losetup {}: {}", img.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The process's test VG, made on first use.
pub fn test_volume_group() -> &'static TestVolumeGroup {
    static VG: OnceLock<TestVolumeGroup> = OnceLock::new();
    VG.get_or_init(|| {
        let pv = physical_volume();
        let name = format!("fvtest{}", std::process::id());
        lvm(&["pvcreate", "--yes", "--force", &pv]);
        lvm(&["vgcreate", "--yes", &name, &pv]);
        let pool = "pool0".to_owned();
        lvm(&[
            "lvcreate",
            "--yes",
            "--type",
            "thin-pool",
            "--size",
            &format!("{THIN_POOL_BYTES}b"),
            "--name",
            &pool,
            &name,
        ]);
        TestVolumeGroup { name, thin_pool: pool }
    })
}

/// Names of LVs in the test VG that carry `node`'s tag.
pub fn lvs_of_node(node: &str) -> Vec<String> {
    let vg = test_volume_group();
    let json = lvm(&["lvs", "--reportformat", "json", "-o", "lv_name,lv_tags", &vg.name]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("lvs JSON: {e}: {json}"));
    let tag = format!("fv.node={node}");
    v["report"][0]["lv"]
        .as_array()
        .map(|lvs| {
            lvs.iter()
                .filter(|lv| lv["lv_tags"].as_str().unwrap_or("").split(',').any(|t| t == tag))
                .filter_map(|lv| lv["lv_name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs an lvm command for a test (e.g. filling a thin pool), panicking on failure.
pub fn run(args: &[&str]) -> String {
    lvm(args)
}
