//! The Controller service routes `type: s3` and S3 IDs to the S3 family before any node
//! routing, checks their requests (mount only, any access mode, secrets named), and
//! merges S3 entries into ListVolumes and ListSnapshots: against a real S3 server.
#![cfg(feature = "s3-tests")]

use std::collections::HashMap;
use std::sync::Arc;

use ferrovol_controller::ControllerService;
use ferrovol_core::agent::{CapacityReport, NewVolume, NodeAgent};
use ferrovol_core::error::{Error, Result};
use ferrovol_core::ids::{LocalName, NodeId, SnapshotId, VolumeId};
use ferrovol_core::params::VolumeParams;
use ferrovol_core::volume::{CapacityRange, Condition, FsType, SnapshotRecord, VolumeRecord, GIB, MIB};
use ferrovol_proto::csi::v1 as csi;
use ferrovol_s3::testing::S3Server;
use tonic::{Code, Request};

use csi::controller_server::Controller;
use csi::volume_capability::access_mode::Mode;

/// A node agent that holds one loop volume and nothing else.
#[derive(Debug)]
struct OneLoopVolume(NodeId);

fn loop_record() -> VolumeRecord {
    VolumeRecord {
        id: "loop.vol:node-1:pvc-loop".into(),
        name: "pvc-loop".into(),
        capacity_bytes: GIB,
        fs_type: FsType::Ext4,
        source: None,
        parameters: Default::default(),
        created_unix: 0,
        published_nodes: vec![],
    }
}

fn refused() -> Error {
    Error::Unavailable { reason: "the stub agent serves no S3 call".into() }
}

#[async_trait::async_trait]
impl NodeAgent for OneLoopVolume {
    fn node_id(&self) -> &NodeId {
        &self.0
    }
    async fn create_volume(&self, _: NewVolume) -> Result<VolumeRecord> {
        Err(refused())
    }
    async fn delete_volume(&self, _: &VolumeId) -> Result<()> {
        Err(refused())
    }
    async fn get_volume(&self, _: &VolumeId) -> Result<(VolumeRecord, Condition)> {
        Err(refused())
    }
    async fn list_volumes(&self) -> Result<Vec<(VolumeRecord, Condition)>> {
        Ok(vec![(loop_record(), Condition::healthy())])
    }
    async fn expand_volume(&self, _: &VolumeId, _: CapacityRange) -> Result<u64> {
        Err(refused())
    }
    async fn publish_volume(&self, _: &VolumeId, _: &NodeId) -> Result<()> {
        Err(refused())
    }
    async fn unpublish_volume(&self, _: &VolumeId, _: &NodeId) -> Result<()> {
        Err(refused())
    }
    async fn create_snapshot(&self, _: &str, _: LocalName, _: &VolumeId) -> Result<SnapshotRecord> {
        Err(refused())
    }
    async fn delete_snapshot(&self, _: &SnapshotId) -> Result<()> {
        Err(refused())
    }
    async fn get_snapshot(&self, _: &SnapshotId) -> Result<SnapshotRecord> {
        Err(refused())
    }
    async fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        Ok(vec![])
    }
    async fn capacity(&self, _: &VolumeParams) -> Result<CapacityReport> {
        Err(refused())
    }
}

fn service() -> ControllerService {
    ControllerService::new(Arc::new(OneLoopVolume(NodeId::parse("node-1").expect("node"))))
        .with_s3_timeouts(ferrovol_s3::Timeouts::within(std::time::Duration::from_secs(5)))
}

fn mount(mode: Mode, fs: &str) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
        access_type: Some(csi::volume_capability::AccessType::Mount(csi::volume_capability::MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        })),
    }
}

fn block() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(csi::volume_capability::AccessMode { mode: Mode::SingleNodeWriter as i32 }),
        access_type: Some(csi::volume_capability::AccessType::Block(Default::default())),
    }
}

fn create(name: &str, params: &[(&str, &str)], secrets: &HashMap<String, String>) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: (64 * MIB) as i64, limit_bytes: 0 }),
        volume_capabilities: vec![mount(Mode::MultiNodeMultiWriter, "ext4"), mount(Mode::SingleNodeSingleWriter, "")],
        parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        secrets: secrets.clone(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_rpcs_are_routed_checked_and_merged() {
    let server = S3Server::start();
    let svc = service();
    let secrets = server.secrets();
    let shared = server.bucket.clone();

    // Mount only; a capability's fs_type is ignored; any access mode.
    let mut bad = create("pvc-blk", &[("type", "s3")], &secrets);
    bad.volume_capabilities.push(block());
    let e = svc.create_volume(Request::new(bad)).await.expect_err("block");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("s3 volumes are mount only"), "{}", e.message());

    // Secrets missing keys: INVALID_ARGUMENT naming them, nothing created.
    let mut partial = secrets.clone();
    partial.remove("accessKeyID");
    let e = svc.create_volume(Request::new(create("pvc-x", &[("type", "s3")], &partial))).await.expect_err("secret");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("accessKeyID"), "{}", e.message());

    let own = svc
        .create_volume(Request::new(create("pvc-s3-own", &[("type", "s3")], &secrets)))
        .await
        .expect("own bucket")
        .into_inner()
        .volume
        .expect("volume");
    assert_eq!(own.volume_id, "s3.vol:fv-pvc-s3-own:pvc-s3-own");
    assert_eq!(own.capacity_bytes, (64 * MIB) as i64);
    assert!(own.accessible_topology.is_empty(), "reachable from every node");
    assert_eq!(own.volume_context.get("type").map(String::as_str), Some("s3"));
    assert_eq!(own.volume_context.get("bucket").map(String::as_str), Some("fv-pvc-s3-own"));
    let sh = svc
        .create_volume(Request::new(create("pvc-s3-sh", &[("type", "s3"), ("bucket", &shared)], &secrets)))
        .await
        .expect("shared bucket")
        .into_inner()
        .volume
        .expect("volume");
    assert_eq!(sh.volume_context.get("bucket"), Some(&shared));

    // Publish to any node, even one no agent serves.
    let publish = |id: &str, node: &str| csi::ControllerPublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        volume_capability: Some(mount(Mode::MultiNodeMultiWriter, "")),
        secrets: secrets.clone(),
        ..Default::default()
    };
    for n in ["node-1", "elsewhere-7"] {
        svc.controller_publish_volume(Request::new(publish(&sh.volume_id, n))).await.expect("publish");
    }
    // The same node with an incompatible capability (read-only this time) is ALREADY_EXISTS.
    let e = svc
        .controller_publish_volume(Request::new(csi::ControllerPublishVolumeRequest {
            readonly: true,
            ..publish(&sh.volume_id, "node-1")
        }))
        .await
        .expect_err("readonly differs");
    assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
    svc.controller_publish_volume(Request::new(publish(&sh.volume_id, "node-1"))).await.expect("compatible repeat");
    let got = svc
        .controller_get_volume(Request::new(csi::ControllerGetVolumeRequest { volume_id: sh.volume_id.clone() }))
        .await
        .expect("get")
        .into_inner();
    let status = got.status.expect("status");
    assert_eq!(status.published_node_ids, vec!["elsewhere-7", "node-1"]);
    assert!(!status.volume_condition.expect("condition").abnormal);

    // ListVolumes merges the node's and S3's volumes, sorted by ID, paginated.
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let page = svc
            .list_volumes(Request::new(csi::ListVolumesRequest { max_entries: 2, starting_token: token.clone() }))
            .await
            .expect("list")
            .into_inner();
        ids.extend(page.entries.iter().filter_map(|e| e.volume.as_ref()).map(|v| v.volume_id.clone()));
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(ids, vec!["loop.vol:node-1:pvc-loop".to_string(), own.volume_id.clone(), sh.volume_id.clone()]);

    // Validate, capacity, expand.
    let v = svc
        .validate_volume_capabilities(Request::new(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: sh.volume_id.clone(),
            volume_capabilities: vec![mount(Mode::MultiNodeReaderOnly, "xfs")],
            secrets: secrets.clone(),
            ..Default::default()
        }))
        .await
        .expect("validate")
        .into_inner();
    assert!(v.confirmed.is_some(), "{}", v.message);
    let v = svc
        .validate_volume_capabilities(Request::new(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: sh.volume_id.clone(),
            volume_capabilities: vec![block()],
            secrets: secrets.clone(),
            ..Default::default()
        }))
        .await
        .expect("validate block")
        .into_inner();
    assert!(v.confirmed.is_none() && v.message.contains("mount only"), "{}", v.message);
    let cap = svc
        .get_capacity(Request::new(csi::GetCapacityRequest {
            parameters: HashMap::from([("type".to_string(), "s3".to_string())]),
            ..Default::default()
        }))
        .await
        .expect("capacity")
        .into_inner();
    assert_eq!(cap.available_capacity, i64::MAX);
    let grown = svc
        .controller_expand_volume(Request::new(csi::ControllerExpandVolumeRequest {
            volume_id: sh.volume_id.clone(),
            capacity_range: Some(csi::CapacityRange { required_bytes: (128 * MIB) as i64, limit_bytes: 0 }),
            secrets: secrets.clone(),
            ..Default::default()
        }))
        .await
        .expect("expand")
        .into_inner();
    assert_eq!(grown.capacity_bytes, (128 * MIB) as i64);
    assert!(grown.node_expansion_required, "the mounter re-reads the quota");

    // Snapshots: create, get, list (merged), delete.
    let snap = svc
        .create_snapshot(Request::new(csi::CreateSnapshotRequest {
            source_volume_id: own.volume_id.clone(),
            name: "snap-s3".into(),
            secrets: secrets.clone(),
            ..Default::default()
        }))
        .await
        .expect("snapshot")
        .into_inner()
        .snapshot
        .expect("snapshot");
    assert!(snap.ready_to_use);
    assert_eq!(snap.snapshot_id, "s3.snap:fv-pvc-s3-own:snap-s3");
    let listed = svc
        .list_snapshots(Request::new(csi::ListSnapshotsRequest::default()))
        .await
        .expect("list snapshots")
        .into_inner();
    assert_eq!(listed.entries.len(), 1);
    let one = svc
        .list_snapshots(Request::new(csi::ListSnapshotsRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        }))
        .await
        .expect("list one")
        .into_inner();
    assert_eq!(one.entries.len(), 1);
    let got = svc
        .get_snapshot(Request::new(csi::GetSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        }))
        .await
        .expect("get snapshot (remembered endpoint)")
        .into_inner();
    assert_eq!(got.snapshot.map(|s| s.snapshot_id), Some(snap.snapshot_id.clone()));
    // A controller that has seen no secrets for the snapshot's bucket cannot find it:
    // ListSnapshots by its ID answers an empty list (CSI's answer for an unknown ID), not
    // an error; GetSnapshot says which secrets it needs.
    let fresh = service();
    let none = fresh
        .list_snapshots(Request::new(csi::ListSnapshotsRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        }))
        .await
        .expect("empty list, not an error")
        .into_inner();
    assert!(none.entries.is_empty());
    let e = fresh
        .get_snapshot(Request::new(csi::GetSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        }))
        .await
        .expect_err("no secrets");
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("accessKeyID"), "{}", e.message());

    // A published volume is not deleted; unpublished, it is.
    let e = svc
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: sh.volume_id.clone(),
            secrets: secrets.clone(),
        }))
        .await
        .expect_err("published");
    assert_eq!(e.code(), Code::FailedPrecondition);
    svc.controller_unpublish_volume(Request::new(csi::ControllerUnpublishVolumeRequest {
        volume_id: sh.volume_id.clone(),
        node_id: String::new(),
        secrets: secrets.clone(),
    }))
    .await
    .expect("unpublish everywhere");
    for id in [&sh.volume_id, &own.volume_id] {
        svc.delete_volume(Request::new(csi::DeleteVolumeRequest { volume_id: id.clone(), secrets: secrets.clone() }))
            .await
            .expect("delete");
    }
    svc.delete_snapshot(Request::new(csi::DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        secrets: secrets.clone(),
    }))
    .await
    .expect("delete snapshot");
    let e = svc
        .controller_get_volume(Request::new(csi::ControllerGetVolumeRequest { volume_id: own.volume_id.clone() }))
        .await
        .expect_err("gone");
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
}
