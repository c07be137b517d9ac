//! Storage families under test and what the suite needs to know about each.

use std::collections::HashMap;
use std::path::Path;

/// Which backend a family exercises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FamilyKind {
    /// Sparse image files in the node's data dir, attached as loop devices.
    Loop,
    /// Linear logical volumes in the test volume group.
    Lvm,
    /// Thin logical volumes in the test volume group's thin pool.
    LvmThin,
}

/// A filesystem the driver can put on a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    /// The name used in `fsType` parameters, capabilities and `/proc/self/mountinfo`.
    pub fn name(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }

    /// The smallest volume the driver makes for this filesystem.
    pub fn minimum_bytes(self) -> i64 {
        match self {
            FsType::Ext4 => 16 * crate::MIB,
            FsType::Xfs => 300 * crate::MIB,
        }
    }

    /// A small size that keeps tests fast but leaves room for data.
    pub fn small_bytes(self) -> i64 {
        match self {
            FsType::Ext4 => 32 * crate::MIB,
            FsType::Xfs => 300 * crate::MIB,
        }
    }
}

/// A storage family: the StorageClass parameters that select it and what it supports.
#[derive(Clone, Debug)]
pub struct Family {
    /// Short name used in test names and volume names.
    pub name: &'static str,
    pub kind: FamilyKind,
    /// The family tag at the start of volume and snapshot IDs (`loop` in `loop.vol:...`).
    pub id_tag: &'static str,
    /// StorageClass parameters every CreateVolume of this family carries.
    pub parameters: HashMap<String, String>,
    /// Filesystems to test in mount access type.
    pub fs_types: Vec<FsType>,
    /// Whether volumes can be used in block access type.
    pub block: bool,
    /// Topology key of node-local volumes; `None` for volumes reachable from every node.
    pub topology_key: Option<&'static str>,
    /// The smallest block volume.
    pub block_minimum_bytes: i64,
    /// Extra arguments for `ferrovol run` (for example an S3 endpoint).
    pub driver_args: Vec<String>,
    /// Sizes are whole multiples of this (1 MiB; an LVM extent, 4 MiB, for LVM).
    pub size_unit: i64,
    /// Set by [`Family::split`]: the scenarios run against a cluster of split processes.
    pub split: Option<Split>,
}

/// A family served "split": [`crate::Driver::start`] starts a [`crate::cluster::Cluster`] of
/// `--roles controller` and `--roles node` processes, and the driver is a view of it (the
/// controller's socket for the Controller service, the focus node's for Identity and Node).
/// The node IDs are chosen up front so that requests can be pinned to the focus node when
/// they are built (see [`crate::requests::create_request`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    /// One per node.
    pub node_ids: Vec<String>,
    /// The node the driver view talks to (its index in `node_ids`).
    pub focus: usize,
}

impl Split {
    /// The focus node's ID.
    pub fn focus_id(&self) -> &str {
        &self.node_ids[self.focus]
    }
}

impl Family {
    /// The embedded default family: sparse image files attached as loop devices.
    pub fn loop_family() -> Self {
        Family {
            name: "loop",
            kind: FamilyKind::Loop,
            id_tag: "loop",
            parameters: HashMap::from([("type".to_owned(), "loop".to_owned())]),
            fs_types: vec![FsType::Ext4, FsType::Xfs],
            block: true,
            topology_key: Some("topology.ferrovol.dev/node"),
            block_minimum_bytes: 16 * crate::MIB,
            driver_args: Vec::new(),
            size_unit: crate::MIB,
            split: None,
        }
    }

    /// Linear LVM volumes in the process's test VG (inside the test VM only).
    pub fn lvm_linear() -> Self {
        Family::lvm(FamilyKind::Lvm, "lvm", &[])
    }

    /// Thin LVM volumes in the test VG's thin pool (inside the test VM only).
    pub fn lvm_thin() -> Self {
        let pool = crate::lvm::test_volume_group().thin_pool.clone();
        Family::lvm(FamilyKind::LvmThin, "lvm-thin", &[("thinPool", &pool), ("thinPoolOverprovisionRatio", "10")])
    }

    fn lvm(kind: FamilyKind, type_name: &'static str, extra: &[(&str, &str)]) -> Self {
        let vg = crate::lvm::test_volume_group();
        let mut parameters =
            HashMap::from([("type".to_owned(), type_name.to_owned()), ("volumeGroup".to_owned(), vg.name.clone())]);
        parameters.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Family {
            name: type_name,
            kind,
            id_tag: "lvm",
            parameters,
            fs_types: vec![FsType::Ext4, FsType::Xfs],
            block: true,
            topology_key: Some("topology.ferrovol.dev/node"),
            block_minimum_bytes: 16 * crate::MIB,
            driver_args: vec!["--lvm-volume-group".to_owned(), vg.name.clone()],
            size_unit: 4 * crate::MIB,
            split: None,
        }
    }

    /// This family served by a cluster of `nodes` split processes (one controller, `nodes`
    /// node agents), the driver view focused on node 0 (see [`Split`]).
    pub fn split(mut self, nodes: usize) -> Self {
        assert!(nodes > 0, "a cluster needs at least one node");
        assert!(self.topology_key.is_some(), "a split family pins volumes to a node: it needs a topology key");
        self.split = Some(Split { node_ids: (0..nodes).map(|_| crate::driver::unique_node_id()).collect(), focus: 0 });
        self
    }

    /// Whether the scenarios run against a split cluster.
    pub fn is_split(&self) -> bool {
        self.split.is_some()
    }

    /// The topology segment new volumes are pinned to in a split family (the focus node's).
    pub fn pinned_topology(&self) -> Option<crate::csi::Topology> {
        let split = self.split.as_ref()?;
        let segments = self.node_topology(split.focus_id())?;
        Some(crate::csi::Topology { segments })
    }

    /// `bytes` rounded up to a whole size unit: the capacity a request for `bytes` gets.
    pub fn round_up(&self, bytes: i64) -> i64 {
        (bytes + self.size_unit - 1) / self.size_unit * self.size_unit
    }

    /// The prefix of every volume ID made on `node`.
    pub fn volume_id_prefix(&self, node: &str) -> String {
        format!("{}.vol:{node}:", self.id_tag)
    }

    /// The prefix of every snapshot ID made on `node`.
    pub fn snapshot_id_prefix(&self, node: &str) -> String {
        format!("{}.snap:{node}:", self.id_tag)
    }

    /// A well-formed volume ID on `node` that names no volume.
    pub fn unknown_volume_id(&self, node: &str) -> String {
        format!("{}no-such-volume-7f3a", self.volume_id_prefix(node))
    }

    /// A well-formed snapshot ID on `node` that names no snapshot.
    pub fn unknown_snapshot_id(&self, node: &str) -> String {
        format!("{}no-such-snapshot-7f3a", self.snapshot_id_prefix(node))
    }

    /// The topology segments a node-local volume of `node` reports.
    pub fn node_topology(&self, node: &str) -> Option<HashMap<String, String>> {
        self.topology_key.map(|key| HashMap::from([(key.to_owned(), node.to_owned())]))
    }

    /// Asserts that no volume or snapshot storage of this family is left behind by `driver`
    /// (after every volume and snapshot was deleted).
    pub fn assert_no_leftover_storage(&self, driver: &crate::Driver) {
        // A split driver's volumes may only live on its focus node, but nothing may be left
        // on any node.
        let nodes: Vec<(String, std::path::PathBuf)> = match driver.cluster() {
            Some(cluster) => (0..cluster.len()).map(|i| (cluster.node_id(i).to_owned(), cluster.data_dir(i))).collect(),
            None => vec![(driver.node_id().to_owned(), driver.data_dir())],
        };
        for (node, data_dir) in &nodes {
            self.assert_no_leftover_storage_of(node, data_dir);
        }
    }

    fn assert_no_leftover_storage_of(&self, node: &str, data_dir: &Path) {
        match self.kind {
            FamilyKind::Lvm | FamilyKind::LvmThin => {
                let left = crate::lvm::lvs_of_node(node);
                assert!(left.is_empty(), "logical volumes left after everything was deleted: {left:?}");
            }
            FamilyKind::Loop => {
                // Any image is at least the 16 MiB minimum in apparent size, sparse or not.
                let big: Vec<String> = crate::data::tree(data_dir, &[])
                    .into_iter()
                    .filter(|(_, facts)| facts.is_file && facts.len >= crate::MIB as u64)
                    .map(|(path, facts)| format!("{} ({} bytes)", path.display(), facts.len))
                    .collect();
                assert!(big.is_empty(), "image files left in the data dir after everything was deleted: {big:?}");
            }
        }
    }
}
