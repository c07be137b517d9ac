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
        }
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
        let data_dir: &Path = &driver.data_dir();
        match self.kind {
            FamilyKind::Lvm | FamilyKind::LvmThin => {
                let left = crate::lvm::lvs_of_node(driver.node_id());
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
