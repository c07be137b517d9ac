//! Failure paths of `NodeOps` against the fake kernel and a scripted runner: whatever a failed
//! call did is undone, nothing is recorded for it, and the error names the volume. The same
//! operations run on the real kernel in the e2e suites.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ferrovol_core::error::{Code, Error};
use ferrovol_core::guard::InFlight;
use ferrovol_core::ids::{Family, LocalName, NodeId, VolumeId};
use ferrovol_core::volume::{AccessMode, AccessType, Capability, FsType, VolumeRecord};

use super::NodeOps;
use crate::command::{CommandError, Output, Runner};
use crate::fs::Probe;
use crate::kernel::fake::{FakeKernel, Op};
use crate::kernel::Kernel;
use crate::ledger::SpaceLedger;
use crate::store::{records, LoopStore, NodeState, Shelf};

/// Records every command and succeeds without running anything, except the programs it is
/// told to fail (as a non-zero exit).
#[derive(Debug, Default)]
struct ScriptedRunner {
    calls: Mutex<Vec<String>>,
    failing: Mutex<HashSet<String>>,
}

impl ScriptedRunner {
    fn fail(&self, program: &str) {
        self.failing.lock().unwrap().insert(program.to_owned());
    }

    fn ran(&self, program: &str) -> bool {
        self.calls.lock().unwrap().iter().any(|c| c.split(' ').next() == Some(program))
    }
}

impl Runner for ScriptedRunner {
    fn run(&self, program: &str, args: &[&str]) -> Result<Output, CommandError> {
        self.calls.lock().unwrap().push(format!("{program} {}", args.join(" ")));
        if self.failing.lock().unwrap().contains(program) {
            return Err(CommandError::Exit {
                program: program.to_owned(),
                status: "exit status: 1".into(),
                code: Some(1),
                stderr: "injected failure".into(),
            });
        }
        Ok(Output::default())
    }
}

/// One data dir with one ext4 volume, served by `NodeOps` over the fakes.
struct Rig {
    dir: tempfile::TempDir,
    store: LoopStore,
    kernel: Arc<FakeKernel>,
    runner: Arc<ScriptedRunner>,
    ops: NodeOps,
    rt: tokio::runtime::Runtime,
    local: LocalName,
    id: String,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let store = LoopStore::open(&dir.path().join("data")).unwrap();
        let node = NodeId::parse("node-1").unwrap();
        let local = LocalName::from_co_name("pvc-a");
        let id = VolumeId::new(Family::Loop, node.clone(), local.clone()).to_string();
        let work = store.work_dir("create").unwrap();
        let rec = VolumeRecord {
            id: id.clone(),
            name: "pvc-a".into(),
            capacity_bytes: 64 << 20,
            fs_type: FsType::Ext4,
            source: None,
            parameters: Default::default(),
            created_unix: 0,
            published_nodes: vec![],
        };
        work.write_record(records::VOLUME, &rec).unwrap();
        std::fs::File::create(work.path().join(records::IMAGE)).unwrap().set_len(64 << 20).unwrap();
        store.commit_volume(work, Shelf::Volumes, &local).unwrap();
        let kernel = Arc::new(FakeKernel::default());
        let runner = Arc::new(ScriptedRunner::default());
        let kubelet = dir.path().join("kubelet");
        std::fs::create_dir_all(&kubelet).unwrap();
        let ops = NodeOps::new(
            node,
            store.clone(),
            InFlight::default(),
            Arc::new(SpaceLedger::default()),
            Arc::clone(&runner) as Arc<dyn Runner>,
            Arc::clone(&kernel) as Arc<dyn Kernel>,
            vec![kubelet],
        );
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        Rig { dir, store, kernel, runner, ops, rt, local, id }
    }

    fn staging(&self) -> PathBuf {
        self.dir.path().join("kubelet/staging/pvc-a")
    }

    fn target(&self) -> PathBuf {
        self.dir.path().join("kubelet/pods/p1/mount")
    }

    fn image(&self) -> PathBuf {
        self.store.volume_image(Shelf::Volumes, &self.local)
    }

    fn state(&self) -> NodeState {
        self.store.read_node_state(Shelf::Volumes, &self.local).unwrap()
    }

    fn stage(&self) -> Result<(), Error> {
        self.rt.block_on(self.ops.stage(self.id.clone(), self.staging(), mount_cap()))
    }

    fn unstage(&self) -> Result<(), Error> {
        self.rt.block_on(self.ops.unstage(self.id.clone(), self.staging()))
    }

    fn publish(&self) -> Result<(), Error> {
        self.rt.block_on(self.ops.publish(self.id.clone(), self.staging(), self.target(), mount_cap(), false))
    }

    /// A failed stage left no device, no mount and no record, and said which volume failed.
    fn assert_stage_left_nothing(&self, e: &Error, code: Code) {
        assert_eq!(e.code(), code, "{e}");
        assert!(e.to_string().contains(&self.id), "the error names the volume: {e}");
        assert!(self.kernel.attached().is_empty(), "devices left: {:?}", self.kernel.attached());
        assert!(self.kernel.mounts().is_empty(), "mounts left: {:?}", self.kernel.mounts());
        assert_eq!(self.state().staged, None);
    }
}

fn mount_cap() -> Capability {
    Capability {
        access_type: AccessType::Mount { fs_type: None, mount_flags: vec![] },
        access_mode: AccessMode::SingleNodeWriter,
    }
}

#[test]
fn a_failed_mount_detaches_the_device_the_stage_attached() {
    let rig = Rig::new();
    rig.kernel.fail(Op::MountFs);
    let e = rig.stage().unwrap_err();
    rig.assert_stage_left_nothing(&e, Code::Internal);
    assert_eq!(rig.kernel.calls(Op::Attach), 1);
    assert_eq!(rig.kernel.calls(Op::Detach), 1);
    // The failure is not sticky: once the kernel mounts, the same call succeeds.
    rig.kernel.heal(Op::MountFs);
    rig.stage().unwrap();
    assert_eq!(rig.kernel.attached().len(), 1);
    assert_eq!(rig.kernel.mounts_at(&rig.staging()), 1);
    assert!(rig.state().staged.is_some());
}

#[test]
fn a_failed_mkfs_detaches_the_device_and_records_nothing() {
    let rig = Rig::new();
    rig.runner.fail("mkfs.ext4");
    let e = rig.stage().unwrap_err();
    rig.assert_stage_left_nothing(&e, Code::Internal);
    assert!(rig.runner.ran("mkfs.ext4"));
    assert_eq!(rig.kernel.calls(Op::MountFs), 0, "nothing is mounted after a failed mkfs");
}

#[test]
fn a_failed_attach_records_nothing() {
    let rig = Rig::new();
    rig.kernel.fail(Op::Attach);
    let e = rig.stage().unwrap_err();
    rig.assert_stage_left_nothing(&e, Code::Internal);
    assert!(!rig.runner.ran("mkfs.ext4"));
}

#[test]
fn a_foreign_signature_is_never_formatted() {
    let rig = Rig::new();
    rig.kernel.set_content(&rig.image(), Probe::Found("xfs".into()));
    let e = rig.stage().unwrap_err();
    rig.assert_stage_left_nothing(&e, Code::FailedPrecondition);
    assert!(e.to_string().contains("xfs signature"), "{e}");
    assert!(rig.runner.calls.lock().unwrap().is_empty(), "no program ran: {:?}", rig.runner.calls.lock().unwrap());
    assert_eq!(rig.kernel.calls(Op::MountFs), 0);
}

#[test]
fn a_failed_bind_records_no_publication() {
    let rig = Rig::new();
    rig.stage().unwrap();
    rig.kernel.fail(Op::Bind);
    let e = rig.publish().unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e}");
    assert!(e.to_string().contains(&rig.id), "{e}");
    let st = rig.state();
    assert!(st.published.is_empty(), "{:?}", st.published);
    assert!(st.staged.is_some(), "the stage itself is untouched");
    assert_eq!(rig.kernel.mounts_at(&rig.target()), 0);
    rig.kernel.heal(Op::Bind);
    rig.publish().unwrap();
    assert_eq!(rig.state().published.len(), 1);
    assert_eq!(rig.kernel.mounts_at(&rig.target()), 1);
}

#[test]
fn unstage_refuses_while_a_publication_is_mounted() {
    let rig = Rig::new();
    rig.stage().unwrap();
    rig.publish().unwrap();
    let devices = rig.kernel.attached();
    let e = rig.unstage().unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.to_string().contains(&rig.target().display().to_string()), "the error names the target: {e}");
    assert_eq!(rig.kernel.attached(), devices, "the device stays attached");
    assert_eq!(rig.kernel.mounts_at(&rig.staging()), 1, "the staging mount stays");
    assert!(rig.state().staged.is_some());
    assert_eq!(rig.kernel.calls(Op::Unmount), 0);
    assert_eq!(rig.kernel.calls(Op::Detach), 0);
}

#[test]
fn a_repeated_stage_after_a_crash_adopts_the_existing_mount() {
    let rig = Rig::new();
    // A crash between mount and record: the device is attached, the filesystem made and
    // mounted at the staging path, and node.json says nothing.
    let dev = rig.kernel.attach(&rig.image(), false).unwrap();
    rig.kernel.set_content(&rig.image(), Probe::Found("ext4".into()));
    std::fs::create_dir_all(rig.staging()).unwrap();
    rig.kernel.mount_fs(&dev.path(), &rig.staging(), "ext4", nix::mount::MsFlags::empty(), "").unwrap();
    assert_eq!(rig.state().staged, None);

    rig.stage().unwrap();
    assert_eq!(rig.kernel.attached(), vec![(dev, rig.image())], "no second device");
    assert_eq!(rig.kernel.mounts_at(&rig.staging()), 1, "no second mount");
    assert_eq!(rig.kernel.calls(Op::MountFs), 1, "only the crash's mount");
    assert!(!rig.runner.ran("mkfs.ext4"));
    let staged = rig.state().staged.unwrap();
    assert_eq!(staged.path, rig.staging());
    // And the adopted stage unwinds like any other.
    rig.unstage().unwrap();
    assert!(rig.kernel.attached().is_empty());
    assert!(rig.kernel.mounts().is_empty());
    assert_eq!(rig.state().staged, None);
}

#[test]
fn unpublish_then_unstage_takes_everything_down() {
    let rig = Rig::new();
    rig.stage().unwrap();
    rig.publish().unwrap();
    rig.rt.block_on(rig.ops.unpublish(rig.id.clone(), rig.target())).unwrap();
    assert!(!Path::new(&rig.target()).exists());
    rig.unstage().unwrap();
    assert!(rig.kernel.attached().is_empty());
    assert!(rig.kernel.mounts().is_empty());
    assert_eq!(rig.state(), NodeState::default());
}
