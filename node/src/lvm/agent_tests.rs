//! Unit tests of the LVM agent's decisions against a scripted lvm: which commands a call
//! runs (and how many), and what it refuses before running any. The real thing is tested
//! in the VM tier (e2e/tests/lvm.rs and the shared suites).

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ferrovol_core::agent::{NewVolume, NodeAgent};
use ferrovol_core::error::Code;
use ferrovol_core::guard::InFlight;
use ferrovol_core::ids::{Family, LocalName, NodeId, VolumeId};
use ferrovol_core::params::VolumeParams;
use ferrovol_core::volume::{CapacityRange, MIB};

use super::LvmAgent;
use crate::command::{CommandError, Output, Runner};
use crate::lvm::cli::LvmCli;
use crate::lvm::groups::VolumeGroups;
use crate::lvm::names::VgName;
use crate::lvm::tags::Owner;
use crate::store::LoopStore;

const REPORT: &str = include_str!("testdata/fullreport-active-handwritten.json");

/// lvm as a script: `fullreport` answers `report` (or refuses VGs listed in `missing`),
/// every other command succeeds; every argv is recorded.
#[derive(Debug, Default)]
struct ScriptedLvm {
    report: Mutex<String>,
    missing: Vec<String>,
    calls: Mutex<Vec<Vec<String>>>,
    /// How long an `lvchange` takes, and whether it fails.
    lvchange_ms: u64,
    lvchange_fails: bool,
}

impl Runner for ScriptedLvm {
    fn run(&self, program: &str, args: &[&str]) -> Result<Output, CommandError> {
        assert_eq!(program, "lvm");
        self.calls.lock().unwrap().push(args.iter().map(|a| a.to_string()).collect());
        if args.first() == Some(&"fullreport") {
            if let Some(m) = self.missing.iter().find(|m| args.contains(&m.as_str())) {
                return Err(CommandError::Exit {
                    program: "lvm".into(),
                    status: "exit status: 5".into(),
                    code: Some(5),
                    stderr: format!("Volume group \"{m}\" not found\nCannot process volume group {m}"),
                });
            }
            return Ok(Output { stdout: self.report.lock().unwrap().clone() });
        }
        if args.first() == Some(&"lvchange") {
            std::thread::sleep(std::time::Duration::from_millis(self.lvchange_ms));
            if self.lvchange_fails {
                return Err(CommandError::Exit {
                    program: "lvm".into(),
                    status: "exit status: 5".into(),
                    code: Some(5),
                    stderr: "Failed to update metadata".into(),
                });
            }
        }
        Ok(Output::default())
    }
}

impl ScriptedLvm {
    fn subcommands(&self) -> Vec<String> {
        self.calls.lock().unwrap().iter().map(|c| c[0].clone()).collect()
    }
}

fn agent(script: Arc<ScriptedLvm>, served: &[&str]) -> (LvmAgent, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = LoopStore::open(dir.path()).unwrap();
    let node = NodeId::parse("node-1").unwrap();
    let groups = VolumeGroups::new(
        LvmCli::new(script),
        Owner { driver: "csi.ferrovol.dev".into(), node: "node-1".into() },
        served.iter().map(|v| VgName::parse(v).unwrap()).collect(),
        90.0,
    );
    (LvmAgent::new(node, Arc::new(groups), store, InFlight::default()), dir)
}

fn thin_request(name: &str, bytes: u64) -> NewVolume {
    let params: HashMap<String, String> = [("type", "lvm-thin"), ("volumeGroup", "ferrovol"), ("thinPool", "pool")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    NewVolume {
        name: name.into(),
        local: LocalName::from_co_name(name),
        capacity: CapacityRange { required: Some(bytes), limit: None },
        params: VolumeParams::parse(&params).unwrap(),
        source: None,
    }
}

#[tokio::test]
async fn a_thin_create_costs_two_lvm_commands() {
    let script = Arc::new(ScriptedLvm { report: Mutex::new(REPORT.into()), ..Default::default() });
    let (agent, _dir) = agent(Arc::clone(&script), &["ferrovol"]);
    for name in ["pvc-a", "pvc-b", "pvc-c"] {
        let before = script.subcommands().len();
        let rec = agent.create_volume(thin_request(name, 100 * MIB)).await.unwrap();
        assert_eq!(rec.capacity_bytes, 100 * MIB, "whole 4 MiB extents");
        let ran = &script.subcommands()[before..];
        assert_eq!(ran, ["fullreport", "lvcreate"], "{name}: one fresh report of the pool's use, one lvcreate");
    }
    let last = script.calls.lock().unwrap().last().unwrap().clone();
    assert!(last.contains(&"--thinpool".to_string()) && last.contains(&"pool".to_string()), "{last:?}");
    assert!(last.iter().any(|a| a == "fv.node=node-1"), "the LV carries its owner: {last:?}");
    assert!(!last.iter().any(|a| a == "fv.creating"), "a thin volume from nothing is whole at once: {last:?}");
}

#[tokio::test]
async fn a_full_thin_pool_is_refused_before_lvcreate() {
    let full = REPORT.replace("\"data_percent\":\"12.50\"", "\"data_percent\":\"93.00\"");
    assert_ne!(full, REPORT, "the fixture names the pool's data use");
    let script = Arc::new(ScriptedLvm { report: Mutex::new(full), ..Default::default() });
    let (agent, _dir) = agent(Arc::clone(&script), &["ferrovol"]);
    let e = agent.create_volume(thin_request("pvc-full", 64 * MIB)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.to_string().contains("ferrovol/pool") && e.to_string().contains("93.0%"), "{e}");
    assert!(!script.subcommands().contains(&"lvcreate".to_string()));
    let params = thin_request("x", MIB).params;
    assert_eq!(agent.capacity(&params).await.unwrap().available, 0, "GetCapacity offers nothing");
}

#[tokio::test]
async fn thin_capacity_is_pool_size_times_ratio_minus_promises() {
    let script = Arc::new(ScriptedLvm { report: Mutex::new(REPORT.into()), ..Default::default() });
    let (agent, _dir) = agent(Arc::clone(&script), &["ferrovol"]);
    let report = crate::lvm::report::Report::from_fullreport_json(REPORT).unwrap();
    let pool = report.lv("ferrovol", "pool").unwrap().size_bytes;
    let promised: u64 = report.lvs.iter().filter(|l| l.pool.as_deref() == Some("pool")).map(|l| l.size_bytes).sum();
    let params = thin_request("x", MIB).params;
    let got = agent.capacity(&params).await.unwrap().available;
    assert_eq!(got, (2 * pool - promised) / (4 * MIB) * (4 * MIB), "default ratio 2, whole extents");
}

#[tokio::test]
async fn requests_naming_what_is_not_there_are_refused_by_name() {
    let script =
        Arc::new(ScriptedLvm { report: Mutex::new(REPORT.into()), missing: vec!["gone".into()], ..Default::default() });
    let (agent, _dir) = agent(Arc::clone(&script), &["ferrovol", "gone"]);
    let mut req = thin_request("pvc-1x", 64 * MIB);
    req.params.lvm.as_mut().unwrap().volume_group = "gone".into();
    let e = agent.create_volume(req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.to_string().contains("\"gone\" does not exist"), "{e}");
    let mut req = thin_request("pvc-2x", 64 * MIB);
    req.params.lvm.as_mut().unwrap().volume_group = "other".into();
    let e = agent.create_volume(req).await.unwrap_err();
    assert!(e.to_string().contains("not a volume group this node serves"), "{e}");
    let mut req = thin_request("pvc-3x", 64 * MIB);
    req.params.lvm.as_mut().unwrap().thin_pool = Some("nopool".into());
    let e = agent.create_volume(req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.to_string().contains("nopool"), "{e}");
    assert!(!script.subcommands().contains(&"lvcreate".to_string()), "nothing was created");
    // The served VG that exists still works while the other is missing.
    agent.create_volume(thin_request("pvc-ok", 64 * MIB)).await.unwrap();
}

#[tokio::test]
async fn unknown_and_foreign_ids_touch_nothing() {
    let script = Arc::new(ScriptedLvm { report: Mutex::new(REPORT.into()), ..Default::default() });
    let (agent, _dir) = agent(Arc::clone(&script), &["ferrovol"]);
    let node = NodeId::parse("node-1").unwrap();
    // `pvc-1` exists in the fixture but carries no tags of ours.
    let id = VolumeId::new(Family::Lvm, node, LocalName::from_co_name("pvc-1"));
    agent.delete_volume(&id).await.unwrap();
    assert_eq!(agent.get_volume(&id).await.unwrap_err().code(), Code::NotFound);
    let other = VolumeId::new(Family::Lvm, NodeId::parse("node-2").unwrap(), LocalName::from_co_name("pvc-1"));
    agent.delete_volume(&other).await.unwrap();
    assert!(script.subcommands().iter().all(|c| c == "fullreport"), "{:?}", script.subcommands());
}

fn groups(script: Arc<ScriptedLvm>) -> Arc<VolumeGroups> {
    Arc::new(VolumeGroups::new(
        LvmCli::new(script),
        Owner { driver: "csi.ferrovol.dev".into(), node: "node-1".into() },
        vec![VgName::parse("ferrovol").unwrap()],
        90.0,
    ))
}

fn finish_all(groups: &Arc<VolumeGroups>, n: usize) -> Vec<Result<(), String>> {
    let vg = VgName::parse("ferrovol").unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (groups, vg) = (Arc::clone(groups), vg.clone());
                s.spawn(move || {
                    let lv = crate::lvm::names::LvName::parse(&format!("fv-pvc-{i}")).unwrap();
                    groups.finish_creating(&vg, &lv).map_err(|e| e.to_string())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn finishing_creates_share_one_lvchange() {
    let script = Arc::new(ScriptedLvm { report: Mutex::new(REPORT.into()), lvchange_ms: 100, ..Default::default() });
    let groups = groups(Arc::clone(&script));
    let outcomes = finish_all(&groups, 8);
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    let lvchanges: Vec<Vec<String>> =
        script.calls.lock().unwrap().iter().filter(|c| c[0] == "lvchange").cloned().collect();
    assert!(lvchanges.len() < 8, "8 finishing creates took {} lvchange runs", lvchanges.len());
    for i in 0..8 {
        let lv = format!("ferrovol/fv-pvc-{i}");
        let n = lvchanges.iter().filter(|c| c.contains(&lv)).count();
        assert_eq!(n, 1, "{lv} was in {n} lvchange runs: {lvchanges:?}");
    }
    assert!(lvchanges.iter().all(|c| c.iter().any(|a| a == "fv.creating")), "{lvchanges:?}");
}

#[test]
fn a_failed_batch_fails_every_create_in_it() {
    let script = Arc::new(ScriptedLvm {
        report: Mutex::new(REPORT.into()),
        lvchange_ms: 50,
        lvchange_fails: true,
        ..Default::default()
    });
    let outcomes = finish_all(&groups(script), 4);
    assert!(
        outcomes.iter().all(|o| o.as_ref().is_err_and(|e| e.contains("Failed to update metadata"))),
        "{outcomes:?}"
    );
}

#[tokio::test]
async fn ids_with_words_lvm_reserves_are_simply_not_ours() {
    let script = Arc::new(ScriptedLvm { report: Mutex::new(REPORT.into()), ..Default::default() });
    let (agent, _dir) = agent(Arc::clone(&script), &["ferrovol"]);
    let id = VolumeId::parse("lvm.vol:node-1:a_tmeta").unwrap();
    agent.delete_volume(&id).await.unwrap();
    assert_eq!(agent.get_volume(&id).await.unwrap_err().code(), Code::NotFound);
    agent.unpublish_volume(&id, &NodeId::parse("node-1").unwrap()).await.unwrap();
}

#[tokio::test]
async fn a_missing_volume_group_makes_absence_unknowable() {
    let script =
        Arc::new(ScriptedLvm { report: Mutex::new(REPORT.into()), missing: vec!["gone".into()], ..Default::default() });
    let (agent, _dir) = agent(Arc::clone(&script), &["ferrovol", "gone"]);
    let id = VolumeId::new(Family::Lvm, NodeId::parse("node-1").unwrap(), LocalName::from_co_name("pvc-maybe"));
    // The volume may be on the VG whose disk is missing: a delete must not answer OK.
    let e = agent.delete_volume(&id).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(e.to_string().contains("gone"), "{e}");
    assert!(!script.subcommands().contains(&"lvremove".to_string()));
}
