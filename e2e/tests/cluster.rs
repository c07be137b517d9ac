//! Multi-node behaviour of the split roles on a three-node cluster of the loop family:
//! registration and re-registration, placement by topology and capacity, volumes used on
//! every node, IDs of other and unknown nodes, faults (a node agent killed or cut off
//! mid-call, the controller restarted mid-call) converging without orphans or double
//! creation, and the mutual TLS that keeps strangers off the internal ports.
#![cfg(feature = "kernel-tests")]
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferrovol_e2e::assertions::assert_message_mentions;
use ferrovol_e2e::cluster::{generate_certs, ClusterOptions, DEFAULT_HEARTBEAT};
use ferrovol_e2e::csi::volume_capability::access_mode::Mode;
use ferrovol_e2e::csi::{
    ControllerGetVolumeRequest, CreateVolumeRequest, DeleteVolumeRequest, GetCapacityRequest, ListVolumesRequest,
    NodeGetInfoRequest, Snapshot, Topology, TopologyRequirement,
};
use ferrovol_e2e::netns::existing_namespaces;
use ferrovol_e2e::requests::{create_request, delete_snapshot_request, snapshot_source, unique_name, volume_source};
use ferrovol_e2e::{data, expect_code, expect_ok, Access, Cluster, Code, Family, FsType, Vol, MIB};
use ferrovol_proto::agent::v1 as agent;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::{Response, Status};

const NODES: usize = 3;
const FS: FsType = FsType::Ext4;
/// The chunk the slow sources are written in.
const CHUNK: usize = 8 * MIB as usize;
/// How many chunks a slow source holds: enough that copying it (a restore) takes a while.
const CHUNKS: u64 = 64;

fn family() -> Family {
    Family::loop_family()
}

async fn start() -> Cluster {
    Cluster::start(&family(), NODES).await
}

/// The node part of a volume or snapshot ID (`loop.vol:<node>:<local>`).
fn node_of(id: &str) -> &str {
    id.split(':').nth(1).unwrap_or_else(|| panic!("{id:?} is not a ferrovol ID"))
}

/// The local part of a volume or snapshot ID.
fn local_of(id: &str) -> &str {
    id.split(':').nth(2).unwrap_or_else(|| panic!("{id:?} is not a ferrovol ID"))
}

fn requirement(cluster: &Cluster, requisite: &[usize], preferred: &[usize]) -> Option<TopologyRequirement> {
    Some(TopologyRequirement {
        requisite: requisite.iter().map(|&i| cluster.segment(i)).collect(),
        preferred: preferred.iter().map(|&i| cluster.segment(i)).collect(),
    })
}

/// A CreateVolume with the given requisite and preferred nodes.
fn request(
    cluster: &Cluster,
    name: &str,
    access: Access,
    bytes: i64,
    requisite: &[usize],
    preferred: &[usize],
) -> CreateVolumeRequest {
    let mut r = create_request(cluster.family(), name, access, bytes);
    r.accessibility_requirements = requirement(cluster, requisite, preferred);
    r
}

/// Creates a volume and checks that it landed on node `on` (ID and topology).
async fn create_expecting(cluster: &Cluster, r: CreateVolumeRequest, access: Access, on: usize, what: &str) -> Vol {
    let answer = expect_ok(cluster.controller().create_volume(r).await, what);
    let volume = answer.volume.unwrap_or_else(|| panic!("{what}: no volume in the answer"));
    assert_eq!(
        node_of(&volume.volume_id),
        cluster.node_id(on),
        "{what}: placed on the wrong node ({})",
        volume.volume_id
    );
    assert_eq!(volume.accessible_topology, vec![cluster.segment(on)], "{what}: accessible_topology");
    Vol::new(&volume, access, Mode::SingleNodeWriter)
}

/// Creates a volume pinned to node `i` as Kubernetes does for WaitForFirstConsumer.
async fn create_on(cluster: &Cluster, name: &str, access: Access, bytes: i64, i: usize) -> Vol {
    let r = request(cluster, name, access, bytes, &[i], &[i]);
    create_expecting(cluster, r, access, i, &format!("CreateVolume {name:?} pinned to node {i}")).await
}

async fn delete_volume(cluster: &Cluster, id: &str) {
    let request = DeleteVolumeRequest { volume_id: id.to_owned(), secrets: HashMap::new() };
    expect_ok(cluster.controller().delete_volume(request.clone()).await, &format!("DeleteVolume {id}"));
    expect_ok(cluster.controller().delete_volume(request).await, &format!("DeleteVolume {id} repeated"));
}

async fn delete_snapshot(cluster: &Cluster, id: &str) {
    expect_ok(cluster.controller().delete_snapshot(delete_snapshot_request(id)).await, &format!("DeleteSnapshot {id}"));
}

/// Every volume ID the cluster lists (all registered nodes, one page).
async fn list_volume_ids(cluster: &Cluster) -> Vec<String> {
    let list = expect_ok(cluster.controller().list_volumes(ListVolumesRequest::default()).await, "ListVolumes");
    assert!(list.next_token.is_empty(), "ListVolumes without max_entries must answer everything");
    list.entries.iter().map(|entry| entry.volume.as_ref().expect("entry volume").volume_id.clone()).collect()
}

/// The listed volumes whose local part is `local`, whichever node holds them. (A CO name
/// that is a DNS label, as every name here is, is its own local part.)
async fn listed_with_local(cluster: &Cluster, local: &str) -> Vec<String> {
    list_volume_ids(cluster).await.into_iter().filter(|id| local_of(id) == local).collect()
}

/// Regular files of at least 1 MiB (volume and snapshot images) in node `i`'s data dir.
fn images(cluster: &Cluster, i: usize) -> Vec<PathBuf> {
    data::tree(&cluster.data_dir(i), &[])
        .into_iter()
        .filter(|(_, facts)| facts.is_file && facts.len >= MIB as u64)
        .map(|(path, _)| path)
        .collect()
}

#[track_caller]
fn assert_no_images(cluster: &Cluster) {
    for i in 0..cluster.len() {
        let left = images(cluster, i);
        assert!(left.is_empty(), "node {}: images left after everything was deleted: {left:?}", cluster.node_id(i));
    }
}

/// A volume attached, staged and published on node `i`, as kubelet on that node does.
struct Attached {
    vol: Vol,
    node: usize,
    staging: PathBuf,
    target: PathBuf,
}

async fn attach(cluster: &Cluster, mut vol: Vol, i: usize, name: &str) -> Attached {
    let node = cluster.node_id(i).to_owned();
    let published = expect_ok(
        cluster.controller().controller_publish_volume(vol.controller_publish_request(&node)).await,
        "ControllerPublishVolume",
    );
    assert_eq!(published.publish_context.get("ferrovol.dev/node"), Some(&node), "publish_context names the node");
    vol.publish_context = published.publish_context;
    let staging = cluster.sandbox(i).staging_dir(name);
    expect_ok(
        cluster.node(i).node_stage_volume(vol.stage_request(&staging)).await,
        &format!("NodeStageVolume on node {i}"),
    );
    let target = cluster.sandbox(i).target_path(name);
    expect_ok(
        cluster.node(i).node_publish_volume(vol.publish_request(&staging, &target, false)).await,
        &format!("NodePublishVolume on node {i}"),
    );
    Attached { vol, node: i, staging, target }
}

async fn detach(cluster: &Cluster, a: &Attached) {
    let i = a.node;
    expect_ok(cluster.node(i).node_unpublish_volume(a.vol.unpublish_request(&a.target)).await, "NodeUnpublishVolume");
    expect_ok(cluster.node(i).node_unstage_volume(a.vol.unstage_request(&a.staging)).await, "NodeUnstageVolume");
    expect_ok(
        cluster.controller().controller_unpublish_volume(a.vol.controller_unpublish_request(cluster.node_id(i))).await,
        "ControllerUnpublishVolume",
    );
}

/// The chunk written at `index` of a slow source: a pattern whose first bytes are the index.
fn chunk(index: u64) -> Vec<u8> {
    let mut bytes = data::pattern(4242, CHUNK);
    bytes[..8].copy_from_slice(&index.to_le_bytes());
    bytes
}

/// A block volume on node `i` filled with [`CHUNKS`] chunks of non-zero data, and a snapshot
/// of it: restoring that snapshot copies them all, which takes long enough to act mid-call.
async fn slow_source(cluster: &Cluster, i: usize, label: &str) -> (Vol, Snapshot) {
    let name = unique_name("pvc", &format!("{label}-src"));
    let bytes = i64::try_from(CHUNKS).unwrap() * CHUNK as i64 + 32 * MIB;
    let vol = create_on(cluster, &name, Access::Block, bytes, i).await;
    let a = attach(cluster, vol, i, &name).await;
    let device = std::fs::OpenOptions::new().write(true).open(&a.target).unwrap();
    for index in 0..CHUNKS {
        device.write_all_at(&chunk(index), index * CHUNK as u64).unwrap();
    }
    device.sync_all().unwrap();
    drop(device);
    detach(cluster, &a).await;
    let snapshot_name = unique_name("snapshot", label);
    let answer = expect_ok(
        cluster.controller().create_snapshot(a.vol.snapshot_request(&snapshot_name)).await,
        "CreateSnapshot of the slow source",
    );
    let snapshot = answer.snapshot.expect("a snapshot");
    assert_eq!(node_of(&snapshot.snapshot_id), cluster.node_id(i), "the snapshot lies on its volume's node");
    (a.vol, snapshot)
}

/// Checks that a block volume restored from a [`slow_source`] holds its first and last chunk.
async fn check_restored(cluster: &Cluster, vol: Vol, i: usize, name: &str) {
    let a = attach(cluster, vol, i, name).await;
    for index in [0, CHUNKS / 2, CHUNKS - 1] {
        let read = data::read_at(&a.target, index * CHUNK as u64, CHUNK);
        assert!(read == chunk(index), "the restored volume differs from its source in chunk {index}");
    }
    detach(cluster, &a).await;
}

/// Files under `dir` (path → size).
fn files(dir: &Path) -> BTreeMap<PathBuf, u64> {
    data::files(dir)
}

/// Waits until a file appears in `dir` that was not in `before` (a create under way), or the
/// call finished; answers whether a new file appeared.
async fn wait_new_file(
    dir: &Path,
    before: &BTreeMap<PathBuf, u64>,
    call: &tokio::task::JoinHandle<impl Sized>,
) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && !call.is_finished() {
        if files(dir).keys().any(|path| !before.contains_key(path)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    false
}

/// Repeats `make` until it answers OK, allowing `allowed` meanwhile (at most `patience`);
/// answers the OK response and how many refusals came first.
async fn retry_until_ok<T, F, Fut>(what: &str, allowed: &[Code], patience: Duration, make: F) -> (T, usize)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Response<T>, Status>>,
{
    let deadline = Instant::now() + patience;
    let mut refusals = 0;
    loop {
        match make().await {
            Ok(response) => return (response.into_inner(), refusals),
            Err(status) => {
                assert!(
                    allowed.contains(&status.code()),
                    "{what}: expected OK or {allowed:?} while converging, got {:?}: {}",
                    status.code(),
                    status.message()
                );
                assert!(
                    Instant::now() < deadline,
                    "{what}: still {:?} after {patience:?}: {}",
                    status.code(),
                    status.message()
                );
                refusals += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Registration
// ---------------------------------------------------------------------------------------

/// With the driver's default heartbeat (2 s), as in production: every node registers, and
/// after a controller restart every node is registered again within a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registration_and_controller_restart() {
    let options = ClusterOptions { heartbeat: DEFAULT_HEARTBEAT, wait_settled: false, ..ClusterOptions::new(NODES) };
    let mut cluster = Cluster::start_with(&family(), options).await;
    for i in 0..NODES {
        let capacity = cluster.capacity_of(i).await.unwrap();
        assert!(capacity > 0, "node {} offers no capacity after registering", cluster.node_id(i));
        let info = expect_ok(cluster.node(i).node_get_info(NodeGetInfoRequest {}).await, "NodeGetInfo");
        assert_eq!(info.node_id, cluster.node_id(i), "NodeGetInfo node_id of node {i}");
        assert_eq!(
            info.accessible_topology.map(|t| t.segments),
            Some(cluster.segment(i).segments),
            "NodeGetInfo topology of node {i}"
        );
    }
    let unknown = Topology {
        segments: HashMap::from([("topology.ferrovol.dev/node".to_owned(), "never-registered".to_owned())]),
    };
    let answer = expect_ok(
        cluster
            .controller()
            .get_capacity(GetCapacityRequest { accessible_topology: Some(unknown), ..Default::default() })
            .await,
        "GetCapacity for a node that never registered",
    );
    assert_eq!(answer.available_capacity, 0, "a node that is not registered offers nothing");

    cluster.kill_controller();
    let restarted = Instant::now();
    cluster.start_controller().await;
    let all: Vec<usize> = (0..NODES).collect();
    cluster.wait_registered(&all).await;
    let reregistered = restarted.elapsed();
    eprintln!(
        "FIGURE re-registration after a controller restart (heartbeat {DEFAULT_HEARTBEAT:?}): all {NODES} nodes \
         registered again {reregistered:?} after the restart began"
    );
    assert!(reregistered < Duration::from_secs(5), "nodes took {reregistered:?} to register again (limit 5 s)");

    let settled = cluster.wait_settled().await;
    eprintln!(
        "FIGURE placement after a controller restart (heartbeat {DEFAULT_HEARTBEAT:?}): CreateVolume places volumes \
         again {settled:?} after the controller started (settle window {:?})",
        cluster.settle_window()
    );
    let name = unique_name("pvc", "after-restart");
    let all_nodes: Vec<usize> = (0..NODES).collect();
    let answer = expect_ok(
        cluster
            .controller()
            .create_volume(request(&cluster, &name, Access::Mount(FS), FS.small_bytes(), &all_nodes, &[2]))
            .await,
        "CreateVolume after the controller restart",
    );
    let id = answer.volume.unwrap().volume_id;
    assert_eq!(node_of(&id), cluster.node_id(2), "placed on preferred[0]");
    delete_volume(&cluster, &id).await;
    assert_no_images(&cluster);
}

// ---------------------------------------------------------------------------------------
// Placement and capacity
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn placement_follows_topology() {
    let cluster = start().await;
    let access = Access::Mount(FS);
    let size = FS.small_bytes();
    let mut made = Vec::new();

    // WaitForFirstConsumer: requisite = preferred = the selected node.
    for i in 0..NODES {
        made.push(create_on(&cluster, &unique_name("pvc", &format!("wffc{i}")), access, size, i).await);
    }

    // Immediate binding: requisite = every node, preferred = all of them in some order.
    for preferred in [[2, 0, 1], [1, 2, 0], [0, 1, 2]] {
        let name = unique_name("pvc", "immediate");
        let r = request(&cluster, &name, access, size, &[0, 1, 2], &preferred);
        let what = format!("CreateVolume with requisite all nodes, preferred {preferred:?}");
        let vol = create_expecting(&cluster, r, access, preferred[0], &what).await;

        // A repeat with another preferred order answers the same volume, made once.
        let mut again = request(&cluster, &name, access, size, &[0, 1, 2], &[preferred[2], preferred[1], preferred[0]]);
        again.accessibility_requirements.as_mut().unwrap().requisite.reverse();
        let repeated =
            expect_ok(cluster.controller().create_volume(again).await, &format!("{what}, repeated in another order"));
        assert_eq!(repeated.volume.as_ref(), Some(&vol.volume), "{what}: a repeat must answer the same volume");
        let listed = listed_with_local(&cluster, local_of(&vol.id)).await;
        assert_eq!(listed, vec![vol.id.clone()], "{what}: exactly one volume of that name in the cluster");
        made.push(vol);
    }

    // No preference at all: some registered node, the same one on every repeat.
    let name = unique_name("pvc", "anywhere");
    let mut r = create_request(cluster.family(), &name, access, size);
    r.accessibility_requirements = None;
    let first = expect_ok(cluster.controller().create_volume(r.clone()).await, "CreateVolume without topology");
    let first = first.volume.unwrap();
    let on = cluster.index_of(node_of(&first.volume_id)).expect("placed on a node of the cluster");
    for round in 0..2 {
        let again =
            expect_ok(cluster.controller().create_volume(r.clone()).await, "CreateVolume without topology repeated");
        assert_eq!(again.volume.as_ref(), Some(&first), "repeat #{round} without topology answered another volume");
    }
    assert_eq!(listed_with_local(&cluster, local_of(&first.volume_id)).await.len(), 1, "one volume without topology");
    made.push(Vol::new(&first, access, Mode::SingleNodeWriter));
    assert_eq!(images(&cluster, on).len(), made.iter().filter(|v| node_of(&v.id) == cluster.node_id(on)).count());

    // A requisite naming only a node that is not registered: UNAVAILABLE, nothing made.
    let before: Vec<_> = (0..NODES).map(|i| files(&cluster.data_dir(i))).collect();
    let mut r = create_request(cluster.family(), &unique_name("pvc", "ghost"), access, size);
    let ghost =
        Topology { segments: HashMap::from([("topology.ferrovol.dev/node".to_owned(), "ghost-node".to_owned())]) };
    r.accessibility_requirements = Some(TopologyRequirement { requisite: vec![ghost.clone()], preferred: vec![ghost] });
    let status = expect_code(
        cluster.controller().create_volume(r).await,
        Code::Unavailable,
        "CreateVolume with requisite = a node that is not registered",
    );
    assert_message_mentions(&status, "ghost-node", "CreateVolume with requisite = a node that is not registered");
    for (i, files_before) in before.iter().enumerate() {
        assert_eq!(&files(&cluster.data_dir(i)), files_before, "a refused CreateVolume changed node {i}'s data dir");
    }

    let listed = list_volume_ids(&cluster).await;
    let mut expected: Vec<String> = made.iter().map(|v| v.id.clone()).collect();
    expected.sort();
    assert_eq!(listed, expected, "ListVolumes lists every volume of every node, sorted by ID");
    for vol in &made {
        delete_volume(&cluster, &vol.id).await;
    }
    assert!(list_volume_ids(&cluster).await.is_empty());
    assert_no_images(&cluster);
}

/// A repeated CreateVolume whose requisite excludes the node that holds the volume of that
/// name: the spec answers OK only for a volume "accessible from accessibility_requirements",
/// and ALREADY_EXISTS for one incompatible with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeat_outside_the_requisite_is_already_exists() {
    let cluster = start().await;
    let name = unique_name("pvc", "moved");
    let vol = create_on(&cluster, &name, Access::Mount(FS), FS.small_bytes(), 0).await;
    let r = request(&cluster, &name, Access::Mount(FS), FS.small_bytes(), &[1], &[1]);
    let result = cluster.controller().create_volume(r).await;
    delete_volume(&cluster, &vol.id).await;
    let status = expect_code(result, Code::AlreadyExists, "CreateVolume repeated with a requisite excluding its node");
    assert_message_mentions(&status, cluster.node_id(0), "the refusal names the node that holds the volume");
    assert_no_images(&cluster);
}

/// Reads per-node capacities and the total until two rounds agree (other tests change the
/// shared filesystem's free space meanwhile); answers them.
async fn stable_capacities(cluster: &Cluster) -> (Vec<i64>, i64) {
    let mut last = String::new();
    for _ in 0..40 {
        let mut first = Vec::new();
        for i in 0..cluster.len() {
            first.push(cluster.capacity_of(i).await.unwrap());
        }
        let total = expect_ok(cluster.controller().get_capacity(GetCapacityRequest::default()).await, "GetCapacity")
            .available_capacity;
        let mut second = Vec::new();
        for i in 0..cluster.len() {
            second.push(cluster.capacity_of(i).await.unwrap());
        }
        if first == second && first.iter().sum::<i64>() == total {
            return (first, total);
        }
        last = format!("per node {first:?} then {second:?}, total {total}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("GetCapacity without topology never equalled the sum of the nodes' capacities: {last}");
}

/// What node `i`'s agent itself reports (Agent.Capacity with the controller's certificate,
/// from inside the controller's namespace).
async fn agent_capacity(cluster: &Cluster, i: usize) -> u64 {
    let tls = client_tls(&cluster.certs_dir(), "controller", "ferrovol-node");
    let address = Cluster::agent_address(i);
    cluster
        .net()
        .run_in(cluster.net().controller_ns(), move || async move {
            let channel = connect(address, Some(tls)).await.unwrap_or_else(|err| panic!("connect to {address}: {err}"));
            let mut client = agent::agent_client::AgentClient::new(channel);
            client.capacity(agent::CapacityRequest::default()).await.unwrap().into_inner().available_bytes
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn capacity_per_node_and_exhaustion() {
    let cluster = start().await;
    let (per_node, total) = stable_capacities(&cluster).await;
    assert!(per_node.iter().all(|c| *c > 0), "every node offers capacity: {per_node:?}");
    eprintln!("capacities per node {per_node:?}, total {total}");

    // Per segment, the controller answers what that node's agent reports.
    for i in 0..NODES {
        let mut last = (0, 0);
        let agreed = 'agree: {
            for _ in 0..40 {
                let by_controller = cluster.capacity_of(i).await.unwrap();
                let by_agent = i64::try_from(agent_capacity(&cluster, i).await).unwrap();
                if by_controller == by_agent {
                    break 'agree true;
                }
                last = (by_controller, by_agent);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        };
        assert!(agreed, "GetCapacity for node {i}'s segment ({}) is not what its agent reports ({})", last.0, last.1);
    }

    // Fill node 0 with a sparse volume promised nearly all of its capacity.
    let access = Access::Block;
    let filler_bytes = (cluster.capacity_of(0).await.unwrap() - 2 * 1024 * MIB) / MIB * MIB;
    assert!(filler_bytes > 0, "node 0 has too little room for this test");
    let filler = create_on(&cluster, &unique_name("pvc", "filler"), access, filler_bytes, 0).await;
    let left = cluster.capacity_of(0).await.unwrap();
    assert!(left <= 3 * 1024 * MIB, "node 0 still offers {left} bytes after a {filler_bytes}-byte volume");

    // Requisite every node, node 0 preferred: node 0 cannot hold it, the next preferred does.
    let big = 16 * 1024 * MIB;
    let before = cluster.capacity_of(1).await.unwrap();
    assert!(before >= big, "node 1 offers {before} bytes, too little for this test's {big}-byte volume");
    let name = unique_name("pvc", "spills");
    let r = request(&cluster, &name, access, big, &[0, 1, 2], &[0, 1, 2]);
    let spilled = create_expecting(&cluster, r, access, 1, "CreateVolume that node 0 (preferred) cannot hold").await;
    assert!(spilled.capacity >= big);
    // The node that took it now promises it away. The nodes share this machine's disk and
    // other tests write to it meanwhile, hence the slack.
    let bound = before - spilled.capacity + 2 * 1024 * MIB;
    let mut after = cluster.capacity_of(1).await.unwrap();
    for _ in 0..40 {
        if after <= bound {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = cluster.capacity_of(1).await.unwrap();
    }
    assert!(
        after <= bound,
        "node 1 offered {before} bytes before a {}-byte volume and {after} after: the volume is not counted",
        spilled.capacity
    );

    // More than any node has: RESOURCE_EXHAUSTED naming every candidate node.
    let r = request(&cluster, &unique_name("pvc", "huge"), access, 1 << 60, &[0, 1, 2], &[2]);
    let status =
        expect_code(cluster.controller().create_volume(r).await, Code::ResourceExhausted, "CreateVolume of 1 EiB");
    for i in 0..NODES {
        assert_message_mentions(&status, cluster.node_id(i), "CreateVolume of 1 EiB names every refusing node");
    }
    // Only a node that is not among the requisite ones could hold it: exhausted as well.
    let r = request(&cluster, &unique_name("pvc", "only0"), access, big, &[0], &[0]);
    let status = expect_code(
        cluster.controller().create_volume(r).await,
        Code::ResourceExhausted,
        "CreateVolume on full node 0",
    );
    assert_message_mentions(&status, "not enough", "CreateVolume on full node 0");

    delete_volume(&cluster, &spilled.id).await;
    delete_volume(&cluster, &filler.id).await;
    let (after, _) = stable_capacities(&cluster).await;
    assert!(after[0] > filler_bytes / 2, "node 0 got its capacity back after the delete: {after:?}");
    assert_no_images(&cluster);
}

// ---------------------------------------------------------------------------------------
// Volumes on every node
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lifecycle_on_every_node() {
    let cluster = start().await;
    let access = Access::Mount(FS);
    let size = FS.small_bytes();
    for i in 0..NODES {
        let name = unique_name("pvc", &format!("life{i}"));
        let vol = create_on(&cluster, &name, access, size, i).await;
        let a = attach(&cluster, vol, i, &name).await;
        let payload = data::pattern(100 + i as u64, 3 * MIB as usize);
        data::write_synced(&a.target.join("data.bin"), &payload);
        let snapshot_name = unique_name("snapshot", &format!("life{i}"));
        let snap = expect_ok(
            cluster.controller().create_snapshot(a.vol.snapshot_request(&snapshot_name)).await,
            "CreateSnapshot",
        )
        .snapshot
        .unwrap();
        assert_eq!(node_of(&snap.snapshot_id), cluster.node_id(i), "the snapshot lies on the volume's node");
        detach(&cluster, &a).await;

        // A restore lands on the snapshot's node whatever the CO prefers.
        let restored_name = unique_name("pvc", &format!("life{i}-restored"));
        let others: Vec<usize> = (0..NODES).filter(|n| *n != i).collect();
        let mut r = request(&cluster, &restored_name, access, size, &[0, 1, 2], &others);
        r.volume_content_source = snapshot_source(&snap.snapshot_id);
        let restored = create_expecting(&cluster, r, access, i, "CreateVolume from a snapshot").await;
        // ... and a clone on its source's node.
        let clone_name = unique_name("pvc", &format!("life{i}-clone"));
        let mut r = request(&cluster, &clone_name, access, size, &[0, 1, 2], &others);
        r.volume_content_source = volume_source(&a.vol.id);
        let clone = create_expecting(&cluster, r, access, i, "CreateVolume cloned from a volume").await;
        delete_volume(&cluster, &clone.id).await;
        // A requisite that excludes the source's node cannot be met: a copy is made locally.
        let mut r = request(&cluster, &unique_name("pvc", "elsewhere"), access, size, &others, &others);
        r.volume_content_source = snapshot_source(&snap.snapshot_id);
        let status = expect_code(
            cluster.controller().create_volume(r).await,
            Code::ResourceExhausted,
            "CreateVolume from a snapshot with a requisite excluding the snapshot's node",
        );
        assert_message_mentions(&status, cluster.node_id(i), "the refusal names the snapshot's node");

        // Offline expansion, then use on the node.
        let grown = restored.capacity + 32 * MIB;
        let expanded = expect_ok(
            cluster.controller().controller_expand_volume(restored.controller_expand_request(grown)).await,
            "ControllerExpandVolume",
        );
        assert!(expanded.capacity_bytes >= grown);
        let got = expect_ok(
            cluster
                .controller()
                .controller_get_volume(ControllerGetVolumeRequest { volume_id: restored.id.clone() })
                .await,
            "ControllerGetVolume after expansion",
        );
        assert_eq!(got.volume.unwrap().capacity_bytes, expanded.capacity_bytes);
        let restored = Vol { capacity: expanded.capacity_bytes, ..restored };
        let b = attach(&cluster, restored, i, &restored_name).await;
        data::assert_content(&b.target.join("data.bin"), &payload, "the restored volume holds the snapshot's data");
        let total = data::fs_total_bytes(&b.target);
        assert!(total > u64::try_from(size).unwrap(), "the restored filesystem was grown ({total} bytes)");
        detach(&cluster, &b).await;

        delete_snapshot(&cluster, &snap.snapshot_id).await;
        delete_volume(&cluster, &b.vol.id).await;
        delete_volume(&cluster, &a.vol.id).await;
    }
    assert!(list_volume_ids(&cluster).await.is_empty(), "volumes left");
    cluster.assert_no_leaks();
    assert_no_images(&cluster);
}

/// Attaching a node's volume to another node, and IDs that are forged or name other nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ids_and_attachment_across_nodes() {
    let mut cluster = start().await;
    let access = Access::Mount(FS);
    let vol = create_on(&cluster, &unique_name("pvc", "local"), access, FS.small_bytes(), 0).await;
    let (a, b) = (cluster.node_id(0).to_owned(), cluster.node_id(1).to_owned());
    for round in 0..2 {
        let status = expect_code(
            cluster.controller().controller_publish_volume(vol.controller_publish_request(&b)).await,
            Code::FailedPrecondition,
            &format!("ControllerPublishVolume #{round} of node 0's volume to node 1"),
        );
        assert_message_mentions(&status, &a, "the refusal names the volume's node");
        assert_message_mentions(&status, &b, "the refusal names the requested node");
    }
    let got = expect_ok(
        cluster.controller().controller_get_volume(ControllerGetVolumeRequest { volume_id: vol.id.clone() }).await,
        "ControllerGetVolume",
    );
    assert!(got.status.unwrap().published_node_ids.is_empty(), "a refused publish recorded the node");

    let get = |id: &str| ControllerGetVolumeRequest { volume_id: id.to_owned() };
    let delete = |id: &str| DeleteVolumeRequest { volume_id: id.to_owned(), secrets: HashMap::new() };
    for forged in ["garbage", "loop.vol:", "loop.vol:x", "loop.vol:../..:victim", "lvm.snap:a:b"] {
        expect_code(
            cluster.controller().controller_get_volume(get(forged)).await,
            Code::NotFound,
            &format!("ControllerGetVolume {forged:?}"),
        );
        expect_ok(cluster.controller().delete_volume(delete(forged)).await, &format!("DeleteVolume {forged:?}"));
    }
    let missing = format!("loop.vol:{a}:nonexistent");
    expect_code(
        cluster.controller().controller_get_volume(get(&missing)).await,
        Code::NotFound,
        "ControllerGetVolume of a missing volume on a registered node",
    );
    expect_ok(
        cluster.controller().delete_volume(delete(&missing)).await,
        "DeleteVolume of a missing volume on a registered node",
    );
    let foreign = "loop.vol:not-in-this-cluster:x";
    let status = expect_code(
        cluster.controller().controller_get_volume(get(foreign)).await,
        Code::Unavailable,
        "ControllerGetVolume of a volume on a node that is not registered",
    );
    assert_message_mentions(&status, "not-in-this-cluster", "ControllerGetVolume of an unregistered node's volume");
    expect_code(
        cluster.controller().delete_volume(delete(foreign)).await,
        Code::Unavailable,
        "DeleteVolume of a volume on a node that is not registered",
    );

    // A node that was registered and is gone: its volumes are UNAVAILABLE, not NOT_FOUND,
    // until it is back.
    cluster.kill_node(0);
    cluster.wait_unregistered(0, Duration::from_secs(10)).await;
    let status = expect_code(
        cluster.controller().controller_get_volume(get(&vol.id)).await,
        Code::Unavailable,
        "ControllerGetVolume while the volume's node is down",
    );
    assert_message_mentions(&status, &a, "ControllerGetVolume while the volume's node is down");
    expect_code(
        cluster.controller().delete_volume(vol.delete_request()).await,
        Code::Unavailable,
        "DeleteVolume while the volume's node is down",
    );
    cluster.start_node(0).await;
    expect_ok(
        cluster.controller().controller_get_volume(get(&vol.id)).await,
        "ControllerGetVolume once the node is back",
    );
    delete_volume(&cluster, &vol.id).await;
    assert_no_images(&cluster);

    // Dropping the cluster takes down every process and namespace it made.
    let namespaces = cluster.net().name_prefix();
    assert_eq!(existing_namespaces(&namespaces).len(), NODES + 1, "one namespace per node and the controller's");
    let pids: Vec<u32> = std::iter::once(cluster.controller_pid())
        .chain((0..NODES).map(|i| cluster.node_pid(i)))
        .map(|pid| pid.expect("every process runs"))
        .collect();
    drop(cluster);
    assert!(existing_namespaces(&namespaces).is_empty(), "namespaces left: {:?}", existing_namespaces(&namespaces));
    for pid in pids {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "process {pid} of the dropped cluster still exists");
    }
}

// ---------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------

/// The node holding a restore's source is killed while the copy runs: retries are refused
/// (never placed elsewhere) until it is back, then converge on exactly one volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_killed_mid_create() {
    let mut cluster = start().await;
    let (source, snap) = slow_source(&cluster, 0, "nodekill").await;
    let name = unique_name("pvc", "nodekill-restored");
    let mut r = request(&cluster, &name, Access::Block, source.capacity, &[0, 1, 2], &[1, 2, 0]);
    r.volume_content_source = snapshot_source(&snap.snapshot_id);
    let before: Vec<_> = (0..NODES).map(|i| files(&cluster.data_dir(i))).collect();

    let mut controller = cluster.controller();
    let in_flight = r.clone();
    let call = tokio::spawn(async move { controller.create_volume(in_flight).await });
    assert!(
        wait_new_file(&cluster.data_dir(0), &before[0], &call).await,
        "the restore never started copying on node 0"
    );
    cluster.kill_node(0);
    let killed = Instant::now();
    let outcome = call.await.unwrap();
    let status = outcome.expect_err("the restore was cut short by the kill, yet answered OK (the copy was too quick)");
    assert_eq!(status.code(), Code::Unavailable, "the call whose node died: {status:?}");

    // While node 0 is down (first within its lease, then forgotten), every retry is refused.
    let mut refusals = 0;
    while killed.elapsed() < cluster.lease() + Duration::from_secs(1) || refusals < 3 {
        let status = expect_code(
            cluster.controller().create_volume(r.clone()).await,
            Code::Unavailable,
            "CreateVolume retried while the source's node is down",
        );
        assert_message_mentions(&status, cluster.node_id(0), "the refusal names the node it waits for");
        refusals += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (i, files_before) in before.iter().enumerate().skip(1) {
        assert_eq!(&files(&cluster.data_dir(i)), files_before, "node {i} got files while node 0 was down");
    }
    assert!(listed_with_local(&cluster, &name).await.is_empty(), "a volume of that name exists on another node");

    cluster.start_node(0).await;
    let (answer, _) = retry_until_ok(
        "CreateVolume retried after node 0 is back",
        &[Code::Unavailable, Code::Aborted],
        Duration::from_secs(60),
        || {
            let mut controller = cluster.controller();
            let r = r.clone();
            async move { controller.create_volume(r).await }
        },
    )
    .await;
    let volume = answer.volume.unwrap();
    assert_eq!(node_of(&volume.volume_id), cluster.node_id(0), "the restore lands on the source's node");
    assert_eq!(
        listed_with_local(&cluster, local_of(&volume.volume_id)).await,
        vec![volume.volume_id.clone()],
        "exactly one volume of that name"
    );
    check_restored(&cluster, Vol::new(&volume, Access::Block, Mode::SingleNodeWriter), 0, &name).await;

    delete_volume(&cluster, &volume.volume_id).await;
    delete_snapshot(&cluster, &snap.snapshot_id).await;
    delete_volume(&cluster, &source.id).await;
    assert!(list_volume_ids(&cluster).await.is_empty());
    cluster.assert_no_leaks();
    assert_no_images(&cluster);
}

/// A plain create whose node stops answering mid-call (its data dir frozen, then its link
/// cut): the outcome is unknown, so the name is not placed on another node until that node
/// is back, and then the volume it made is the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn create_with_unknown_outcome_is_not_placed_elsewhere() {
    let mut cluster = start().await;
    // Node 1's data dir on a filesystem of its own, so that it can be frozen.
    cluster.kill_node(1);
    let data_dir = cluster.data_dir(1);
    let image = cluster.sandbox(1).root().join("datadir.img");
    let file = std::fs::File::create(&image).unwrap();
    file.set_len(1024 * MIB as u64).unwrap();
    drop(file);
    run(&["mkfs.ext4", "-q", "-F", image.to_str().unwrap()]);
    run(&["mount", "-o", "loop,noatime", image.to_str().unwrap(), data_dir.to_str().unwrap()]);
    let mut frozen = Frozen { mount: data_dir.clone(), frozen: false };
    cluster.start_node(1).await;

    let name = unique_name("pvc", "unknown");
    let r = request(&cluster, &name, Access::Mount(FS), FS.small_bytes(), &[0, 1, 2], &[1, 0, 2]);
    frozen.freeze();
    let mut controller = cluster.controller();
    let in_flight = r.clone();
    let call = tokio::spawn(async move { controller.create_volume(in_flight).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!call.is_finished(), "the create on node 1 finished although its data dir is frozen");
    cluster.cut_link(1);
    let cut = Instant::now();
    let status = call.await.unwrap().expect_err("the create whose node stopped answering");
    eprintln!("FIGURE a create whose node stopped answering failed after {:?} ({:?})", cut.elapsed(), status.code());
    assert!(
        matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded),
        "the create whose node stopped answering: {status:?}"
    );

    // Node 1 may or may not have made it: nobody else may.
    let before0 = files(&cluster.data_dir(0));
    let before2 = files(&cluster.data_dir(2));
    cluster.wait_unregistered(1, Duration::from_secs(30)).await;
    for round in 0..3 {
        let status = expect_code(
            cluster.controller().create_volume(r.clone()).await,
            Code::Unavailable,
            &format!("CreateVolume #{round} retried while the outcome on node 1 is unknown"),
        );
        assert_message_mentions(&status, cluster.node_id(1), "the refusal names the node whose answer is missing");
    }
    assert_eq!(files(&cluster.data_dir(0)), before0, "node 0 got files while the outcome on node 1 was unknown");
    assert_eq!(files(&cluster.data_dir(2)), before2, "node 2 got files while the outcome on node 1 was unknown");
    assert!(listed_with_local(&cluster, &name).await.is_empty(), "a volume of that name exists on another node");

    frozen.thaw();
    cluster.restore_link(1);
    cluster.wait_registered(&[1]).await;
    let (answer, _) = retry_until_ok(
        "CreateVolume retried after node 1 is back",
        &[Code::Unavailable, Code::Aborted],
        Duration::from_secs(60),
        || {
            let mut controller = cluster.controller();
            let r = r.clone();
            async move { controller.create_volume(r).await }
        },
    )
    .await;
    let volume = answer.volume.unwrap();
    assert_eq!(node_of(&volume.volume_id), cluster.node_id(1), "the create lands where the first attempt went");
    assert_eq!(
        listed_with_local(&cluster, local_of(&volume.volume_id)).await,
        vec![volume.volume_id.clone()],
        "exactly one volume of that name"
    );
    delete_volume(&cluster, &volume.volume_id).await;
    assert_no_images(&cluster);
    cluster.stop_node(1).await;
    drop(frozen);
    cluster.assert_no_leaks();
}

/// The node of a volume is killed during (or right after) its DeleteVolume: refused while
/// the node is down, OK once it is back, and the volume is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_killed_mid_delete() {
    let mut cluster = start().await;
    let vol = create_on(&cluster, &unique_name("pvc", "delkill"), Access::Mount(FS), FS.small_bytes(), 1).await;
    let mut controller = cluster.controller();
    let request = vol.delete_request();
    let call = tokio::spawn(async move { controller.delete_volume(request).await });
    tokio::time::sleep(Duration::from_millis(1)).await;
    cluster.kill_node(1);
    match call.await.unwrap() {
        Ok(_) => eprintln!("the DeleteVolume finished before the kill"),
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "the DeleteVolume whose node died: {status:?}"),
    }
    let killed = Instant::now();
    while killed.elapsed() < cluster.lease() + Duration::from_secs(1) {
        let status = expect_code(
            cluster.controller().delete_volume(vol.delete_request()).await,
            Code::Unavailable,
            "DeleteVolume retried while its node is down",
        );
        assert_message_mentions(&status, cluster.node_id(1), "the refusal names the node");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.start_node(1).await;
    delete_volume(&cluster, &vol.id).await;
    assert!(!list_volume_ids(&cluster).await.contains(&vol.id), "the deleted volume is still listed");
    expect_code(
        cluster.controller().controller_get_volume(ControllerGetVolumeRequest { volume_id: vol.id.clone() }).await,
        Code::NotFound,
        "ControllerGetVolume of the deleted volume",
    );
    assert_no_images(&cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_link_and_restore() {
    let mut cluster = start().await;
    let access = Access::Mount(FS);
    let name = unique_name("pvc", "cut");
    let vol = create_on(&cluster, &name, access, FS.small_bytes(), 1).await;
    let get = || ControllerGetVolumeRequest { volume_id: vol.id.clone() };

    cluster.cut_link(1);
    let cut = Instant::now();
    // A call made right after the cut, while the node's lease still runs: the controller
    // tries the node over a connection that no longer carries anything.
    let mut controller = cluster.controller();
    let in_flight = get();
    let first = tokio::spawn(async move {
        let result = tokio::time::timeout(Duration::from_secs(60), controller.controller_get_volume(in_flight)).await;
        (result, cut.elapsed())
    });
    let left = cluster.wait_unregistered(1, Duration::from_secs(30)).await;
    eprintln!("FIGURE a cut-off node left GetCapacity {left:?} after the cut (lease {:?})", cluster.lease());
    let (first, failed_after) = first.await.unwrap();
    let status = first
        .expect("ControllerGetVolume of a cut-off node's volume must fail, not hang")
        .expect_err("ControllerGetVolume of a cut-off node's volume");
    eprintln!(
        "FIGURE a call for a cut-off node's volume made right after the cut failed after {failed_after:?} ({:?}: {})",
        status.code(),
        status.message()
    );
    assert!(matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded), "{status:?}");
    assert!(failed_after <= Duration::from_secs(20), "the call took {failed_after:?} to fail (limit 20 s)");

    let quick = Instant::now();
    let status = expect_code(
        cluster.controller().controller_get_volume(get()).await,
        Code::Unavailable,
        "ControllerGetVolume after the lease ran out",
    );
    assert!(quick.elapsed() < Duration::from_secs(2), "once the node is forgotten, calls fail at once");
    assert_message_mentions(&status, cluster.node_id(1), "ControllerGetVolume after the lease ran out");
    let r = request(&cluster, &unique_name("pvc", "cut-new"), access, FS.small_bytes(), &[1], &[1]);
    expect_code(
        cluster.controller().create_volume(r).await,
        Code::Unavailable,
        "CreateVolume pinned to the cut-off node",
    );
    // The other nodes keep working.
    let other = create_on(&cluster, &unique_name("pvc", "cut-other"), access, FS.small_bytes(), 2).await;
    delete_volume(&cluster, &other.id).await;

    cluster.restore_link(1);
    let back = cluster.wait_registered(&[1]).await;
    eprintln!("FIGURE a node re-registered {back:?} after its link was restored");
    expect_ok(cluster.controller().controller_get_volume(get()).await, "ControllerGetVolume after the link is back");
    let a = attach(&cluster, vol, 1, &name).await;
    data::write_synced(&a.target.join("after.bin"), b"after the cut");
    detach(&cluster, &a).await;
    delete_volume(&cluster, &a.vol.id).await;
    cluster.assert_no_leaks();
    assert_no_images(&cluster);
}

/// The controller is killed while a slow restore runs and started again: retries converge
/// on exactly one volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn controller_restarted_mid_create() {
    let mut cluster = start().await;
    let (source, snap) = slow_source(&cluster, 2, "ctlkill").await;
    let name = unique_name("pvc", "ctlkill-restored");
    let mut r = request(&cluster, &name, Access::Block, source.capacity, &[0, 1, 2], &[0, 1, 2]);
    r.volume_content_source = snapshot_source(&snap.snapshot_id);
    // An attachment made before the restart: the controller keeps no state, so it must learn
    // it from the node again.
    let node2 = cluster.node_id(2).to_owned();
    expect_ok(
        cluster.controller().controller_publish_volume(source.controller_publish_request(&node2)).await,
        "ControllerPublishVolume of the source before the restart",
    );
    let before = files(&cluster.data_dir(2));
    let mut controller = cluster.controller();
    let in_flight = r.clone();
    let call = tokio::spawn(async move { controller.create_volume(in_flight).await });
    assert!(wait_new_file(&cluster.data_dir(2), &before, &call).await, "the restore never started copying on node 2");
    cluster.kill_controller();
    let outcome = call.await.unwrap();
    let status = outcome.expect_err("the call to a killed controller");
    assert!(
        matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled),
        "the call to a killed controller: {status:?}"
    );
    cluster.start_controller().await;
    let (answer, refusals) = retry_until_ok(
        "CreateVolume retried after the controller restart",
        &[Code::Unavailable, Code::Aborted],
        Duration::from_secs(60),
        || {
            let mut controller = cluster.controller();
            let r = r.clone();
            async move { controller.create_volume(r).await }
        },
    )
    .await;
    assert!(refusals > 0, "the restarted controller placed a volume inside its settle window");
    let volume = answer.volume.unwrap();
    assert_eq!(node_of(&volume.volume_id), cluster.node_id(2), "the restore lands on the source's node");
    assert_eq!(
        listed_with_local(&cluster, local_of(&volume.volume_id)).await,
        vec![volume.volume_id.clone()],
        "exactly one volume of that name"
    );
    let again = expect_ok(cluster.controller().create_volume(r.clone()).await, "CreateVolume repeated once more");
    assert_eq!(again.volume.as_ref(), Some(&volume));
    check_restored(&cluster, Vol::new(&volume, Access::Block, Mode::SingleNodeWriter), 2, &name).await;
    let got = expect_ok(
        cluster.controller().controller_get_volume(ControllerGetVolumeRequest { volume_id: source.id.clone() }).await,
        "ControllerGetVolume of the source after the restart",
    );
    assert_eq!(got.status.unwrap().published_node_ids, vec![node2.clone()], "the attachment survived the restart");
    expect_ok(
        cluster.controller().controller_unpublish_volume(source.controller_unpublish_request(&node2)).await,
        "ControllerUnpublishVolume of the source after the restart",
    );

    delete_volume(&cluster, &volume.volume_id).await;
    delete_snapshot(&cluster, &snap.snapshot_id).await;
    delete_volume(&cluster, &source.id).await;
    assert!(list_volume_ids(&cluster).await.is_empty());
    cluster.assert_no_leaks();
    assert_no_images(&cluster);
}

// ---------------------------------------------------------------------------------------
// Mutual TLS on the internal ports
// ---------------------------------------------------------------------------------------

/// How a call from a test client ended.
#[derive(Debug)]
enum Outcome {
    Ok,
    Refused(Code, String),
    ConnectFailed(String),
}

impl Outcome {
    fn of<T>(result: Result<Response<T>, Status>) -> Outcome {
        match result {
            Ok(_) => Outcome::Ok,
            Err(status) => Outcome::Refused(status.code(), status.message().to_owned()),
        }
    }
}

/// A TLS client configuration trusting `certs`' CA, presenting `role`'s certificate from
/// `identity_certs` (if any), expecting the server to be `server_name`.
fn tls_config(certs: &Path, identity: Option<(&Path, &str)>, server_name: &str) -> ClientTlsConfig {
    let read = |path: PathBuf| std::fs::read(&path).unwrap_or_else(|err| panic!("read {}: {err}", path.display()));
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(certs.join("ca.crt"))))
        .domain_name(server_name);
    if let Some((dir, role)) = identity {
        tls = tls
            .identity(Identity::from_pem(read(dir.join(role).join("tls.crt")), read(dir.join(role).join("tls.key"))));
    }
    tls
}

fn client_tls(certs: &Path, role: &str, server_name: &str) -> ClientTlsConfig {
    tls_config(certs, Some((certs, role)), server_name)
}

async fn connect(address: SocketAddr, tls: Option<ClientTlsConfig>) -> Result<tonic::transport::Channel, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|err| format!("{err:?}"))?;
    }
    endpoint.connect().await.map_err(|err| format!("{err:?}"))
}

/// Registry.Register of a made-up node.
async fn register(address: SocketAddr, tls: Option<ClientTlsConfig>) -> Outcome {
    let channel = match connect(address, tls).await {
        Ok(channel) => channel,
        Err(err) => return Outcome::ConnectFailed(err),
    };
    let request = agent::RegisterRequest {
        node_id: "intruder".to_owned(),
        address: "10.77.0.99:9471".to_owned(),
        topology: HashMap::new(),
        version: "0".to_owned(),
        families: vec!["loop".to_owned()],
        ..Default::default()
    };
    Outcome::of(agent::registry_client::RegistryClient::new(channel).register(request).await)
}

/// Registry.Heartbeat of a real node.
async fn heartbeat(
    address: SocketAddr,
    tls: Option<ClientTlsConfig>,
    node_id: String,
    node_address: String,
) -> Outcome {
    let channel = match connect(address, tls).await {
        Ok(channel) => channel,
        Err(err) => return Outcome::ConnectFailed(err),
    };
    let request = agent::HeartbeatRequest { node_id, address: node_address, ..Default::default() };
    Outcome::of(agent::registry_client::RegistryClient::new(channel).heartbeat(request).await)
}

/// Agent calls: Health, ListVolumes and CreateVolume (of `name`), stopping at the first that
/// fails; answers each call's outcome.
async fn agent_calls(address: SocketAddr, tls: Option<ClientTlsConfig>, name: String) -> Vec<(&'static str, Outcome)> {
    let channel = match connect(address, tls).await {
        Ok(channel) => channel,
        Err(err) => return vec![("connect", Outcome::ConnectFailed(err))],
    };
    let mut client = agent::agent_client::AgentClient::new(channel);
    let health = Outcome::of(client.health(agent::Empty {}).await);
    let list = Outcome::of(client.list_volumes(agent::Empty {}).await);
    let create = agent::CreateVolumeRequest {
        name: name.clone(),
        local_name: name,
        capacity: Some(agent::CapacityRange { required_bytes: 32 * MIB as u64, limit_bytes: 0 }),
        parameters: HashMap::from([("type".to_owned(), "loop".to_owned()), ("fsType".to_owned(), "ext4".to_owned())]),
        source: None,
    };
    let created = Outcome::of(client.create_volume(create).await);
    vec![("Health", health), ("ListVolumes", list), ("CreateVolume", created)]
}

impl Outcome {
    /// One line for the test's output.
    fn describe(&self) -> String {
        match self {
            Outcome::Ok => "OK".to_owned(),
            Outcome::Refused(code, message) => format!("{code:?}: {message}"),
            Outcome::ConnectFailed(error) => format!("connection failed: {error}"),
        }
    }
}

#[track_caller]
fn assert_refused(outcome: &Outcome, what: &str) {
    assert!(!matches!(outcome, Outcome::Ok), "{what}: the call was accepted");
    eprintln!("refused as expected: {what}: {}", outcome.describe());
}

/// A refusal by role: PERMISSION_DENIED (or UNAUTHENTICATED) whose message names the role
/// the caller should have had.
#[track_caller]
fn assert_wrong_role(outcome: &Outcome, needed: &str, what: &str) {
    match outcome {
        Outcome::Refused(Code::PermissionDenied | Code::Unauthenticated, message) => {
            assert!(message.contains(needed), "{what}: the refusal should say that only {needed} may call: {message}");
            eprintln!("refused as expected: {what}: {}", outcome.describe());
        }
        other => panic!("{what}: expected PERMISSION_DENIED or UNAUTHENTICATED, got {}", other.describe()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn internal_ports_refuse_strangers() {
    let cluster = start().await;
    let ours = cluster.certs_dir();
    let foreign_sandbox = ferrovol_e2e::Sandbox::new();
    let foreign = foreign_sandbox.root().join("another-ca");
    generate_certs(&foreign);
    let registry = Cluster::registry_address();
    let agent1 = Cluster::agent_address(1);
    let ns = cluster.net().controller_ns().to_owned();
    let net = cluster.net();
    let data_before = files(&cluster.data_dir(1));

    // Controls: the right certificates get through from where the test dials.
    let (node_id, node_address) = (cluster.node_id(0).to_owned(), Cluster::agent_address(0).to_string());
    let tls = client_tls(&ours, "node", "ferrovol-controller");
    let outcome = net.run_in(&ns, move || heartbeat(registry, Some(tls), node_id, node_address)).await;
    assert!(matches!(outcome, Outcome::Ok), "a node's heartbeat with the node certificate: {outcome:?}");
    let tls = client_tls(&ours, "controller", "ferrovol-node");
    let outcome = net.run_in(&ns, move || async move { connect(agent1, Some(tls)).await.map(|_| ()) }).await;
    assert!(outcome.is_ok(), "the controller certificate connects to an agent: {outcome:?}");

    // No client certificate.
    let tls = tls_config(&ours, None, "ferrovol-controller");
    let outcome = net.run_in(&ns, move || register(registry, Some(tls))).await;
    assert_refused(&outcome, "Registry.Register without a client certificate");
    let tls = tls_config(&ours, None, "ferrovol-node");
    for (call, outcome) in net.run_in(&ns, move || agent_calls(agent1, Some(tls), "nocert".to_owned())).await {
        assert_refused(&outcome, &format!("Agent.{call} without a client certificate"));
    }

    // A certificate of another CA (the client still trusts our CA, so only the server's
    // check of the client certificate can refuse it).
    let tls = tls_config(&ours, Some((&foreign, "node")), "ferrovol-controller");
    let outcome = net.run_in(&ns, move || register(registry, Some(tls))).await;
    assert_refused(&outcome, "Registry.Register with a node certificate of another CA");
    let tls = tls_config(&ours, Some((&foreign, "controller")), "ferrovol-node");
    for (call, outcome) in net.run_in(&ns, move || agent_calls(agent1, Some(tls), "foreignca".to_owned())).await {
        assert_refused(&outcome, &format!("Agent.{call} with a controller certificate of another CA"));
    }

    // Our CA, the wrong role: a node may not act as the controller, nor the controller as a node.
    let tls = client_tls(&ours, "node", "ferrovol-node");
    let outcomes = net.run_in(&ns, move || agent_calls(agent1, Some(tls), "wrongrole".to_owned())).await;
    assert_eq!(outcomes.len(), 3, "the node certificate connects (its refusal is per call): {outcomes:?}");
    for (call, outcome) in &outcomes {
        assert_wrong_role(outcome, "controller", &format!("Agent.{call} with the node certificate"));
    }
    let tls = client_tls(&ours, "controller", "ferrovol-controller");
    let outcome = net.run_in(&ns, move || register(registry, Some(tls))).await;
    assert_wrong_role(&outcome, "node", "Registry.Register with the controller certificate");

    // Plain text.
    let outcome = net.run_in(&ns, move || register(registry, None)).await;
    assert_refused(&outcome, "Registry.Register in plain text");
    for (call, outcome) in net.run_in(&ns, move || agent_calls(agent1, None, "plain".to_owned())).await {
        assert_refused(&outcome, &format!("Agent.{call} in plain text"));
    }

    // Nothing got in: no volume was made, no intruder registered, and the cluster works.
    assert_eq!(files(&cluster.data_dir(1)), data_before, "a refused Agent.CreateVolume changed node 1's data dir");
    assert!(list_volume_ids(&cluster).await.is_empty(), "a refused Agent.CreateVolume made a volume");
    let intruder =
        Topology { segments: HashMap::from([("topology.ferrovol.dev/node".to_owned(), "intruder".to_owned())]) };
    let answer = expect_ok(
        cluster
            .controller()
            .get_capacity(GetCapacityRequest { accessible_topology: Some(intruder), ..Default::default() })
            .await,
        "GetCapacity for the intruder's segment",
    );
    assert_eq!(answer.available_capacity, 0, "the intruder got registered");
    let vol = create_on(&cluster, &unique_name("pvc", "after-attacks"), Access::Mount(FS), FS.small_bytes(), 1).await;
    delete_volume(&cluster, &vol.id).await;
    assert_no_images(&cluster);
}

// ---------------------------------------------------------------------------------------
// Helpers for the frozen data dir
// ---------------------------------------------------------------------------------------

fn run(args: &[&str]) {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|err| panic!("run {args:?}: {err}"));
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A mounted filesystem the test freezes; thawed and unmounted on drop, panic or not.
struct Frozen {
    mount: PathBuf,
    frozen: bool,
}

impl Frozen {
    fn freeze(&mut self) {
        run(&["fsfreeze", "--freeze", self.mount.to_str().unwrap()]);
        self.frozen = true;
    }

    fn thaw(&mut self) {
        run(&["fsfreeze", "--unfreeze", self.mount.to_str().unwrap()]);
        self.frozen = false;
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if self.frozen {
            let _ = std::process::Command::new("fsfreeze").arg("--unfreeze").arg(&self.mount).status();
        }
        let _ = nix::mount::umount2(&self.mount, nix::mount::MntFlags::MNT_DETACH);
    }
}
