//! CSI conformance of the real binary: the MUST/SHALL rules and error codes of every RPC
//! ferrovol serves (spec v1.12.0 and the driver's contract), each successful call repeated
//! to prove idempotency, per family, in mount (each filesystem) and block access types.
#![cfg(feature = "kernel-tests")]
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use ferrovol_e2e::assertions::{assert_message_mentions, expect_ok_or, Mismatches};
use ferrovol_e2e::csi::controller_service_capability::rpc::Type as ControllerCap;
use ferrovol_e2e::csi::node_service_capability::rpc::Type as NodeCap;
use ferrovol_e2e::csi::plugin_capability::service::Type as ServiceType;
use ferrovol_e2e::csi::plugin_capability::volume_expansion::Type as ExpansionType;
use ferrovol_e2e::csi::volume_capability::access_mode::Mode;
use ferrovol_e2e::csi::volume_usage::Unit;
use ferrovol_e2e::csi::{
    controller_service_capability, node_service_capability, plugin_capability, ControllerExpandVolumeRequest,
    ControllerGetCapabilitiesRequest, ControllerGetVolumeRequest, ControllerPublishVolumeRequest,
    ControllerUnpublishVolumeRequest, CreateSnapshotRequest, CreateVolumeRequest, DeleteSnapshotRequest,
    DeleteVolumeRequest, GetCapacityRequest, GetPluginCapabilitiesRequest, GetPluginInfoRequest, GetSnapshotRequest,
    ListSnapshotsRequest, ListVolumesRequest, NodeExpandVolumeRequest, NodeGetCapabilitiesRequest, NodeGetInfoRequest,
    NodeGetVolumeStatsRequest, NodePublishVolumeRequest, NodeStageVolumeRequest, NodeUnpublishVolumeRequest,
    NodeUnstageVolumeRequest, ProbeRequest, Snapshot, Topology, TopologyRequirement, ValidateVolumeCapabilitiesRequest,
    VolumeCapability, VolumeContentSource,
};
use ferrovol_e2e::requests::{
    self, accesses, block_capability, capability, create_request, mount_capability, path_string, range,
    snapshot_source, unique_name, volume_source,
};
use ferrovol_e2e::{
    data, expect_code, expect_ok, kernel, steps, Access, Code, Driver, DriverOptions, Family, FsType, Sandbox,
    Transport, Vol, GIB, MIB,
};

ferrovol_e2e::family_tests!(loop_family => ferrovol_e2e::Family::loop_family();
    identity_service,
    capabilities_and_node_info,
    endpoint_lifecycle,
    tcp_endpoint,
    sigterm_finishes_in_flight_call,
    create_volume_is_idempotent,
    create_volume_incompatible_repeat,
    create_volume_missing_fields,
    create_volume_unsupported_requests,
    capacity_rules,
    topology_requirements,
    delete_volume_rules,
    delete_volume_in_use,
    controller_publish_rules,
    validate_volume_capabilities_rules,
    list_volumes_pagination,
    get_capacity_rules,
    snapshot_rules,
    snapshots_outlive_their_volume,
    create_from_source_rules,
    controller_expand_rules,
    node_stage_rules,
    mount_flags,
    node_publish_rules,
    single_node_access_modes,
    readonly_publish,
    node_stats_rules,
    node_expand_rules,
    capability_fs_type_is_honoured,
    ephemeral_inline_volume,
    parallel_create_same_name,
    parallel_node_calls_same_volume,
    path_escape_ids_are_not_found,
);

// The LVM families run every scenario that depends on the family (not the identity and
// endpoint ones, nor inline ephemeral volumes, which are image files whatever the family),
// inside the test VM: `scripts/test` runs them there with e2e/vm/run.
#[cfg(feature = "lvm-tests")]
ferrovol_e2e::family_tests!([
    in_vm_lvm_linear => ferrovol_e2e::Family::lvm_linear(),
    in_vm_lvm_thin => ferrovol_e2e::Family::lvm_thin(),
];
    create_volume_is_idempotent,
    create_volume_incompatible_repeat,
    create_volume_missing_fields,
    create_volume_unsupported_requests,
    capacity_rules,
    topology_requirements,
    delete_volume_rules,
    delete_volume_in_use,
    controller_publish_rules,
    validate_volume_capabilities_rules,
    list_volumes_pagination,
    get_capacity_rules,
    snapshot_rules,
    snapshots_outlive_their_volume,
    create_from_source_rules,
    controller_expand_rules,
    node_stage_rules,
    mount_flags,
    node_publish_rules,
    single_node_access_modes,
    readonly_publish,
    node_stats_rules,
    node_expand_rules,
    capability_fs_type_is_honoured,
    parallel_create_same_name,
    parallel_node_calls_same_volume,
    path_escape_ids_are_not_found,
);

// The family-dependent scenarios (the LVM list) once more against a split cluster: one
// `--roles controller` process and three `--roles node` processes over mutual TLS, each node
// in its own network namespace (src/cluster.rs). The driver view talks to the controller for
// the Controller service and to node 0 for Identity and Node; requests pin new volumes to
// node 0. Where the cluster answers differently from the all-in-one driver by design (an ID
// of a node that is not registered is UNAVAILABLE, not NOT_FOUND), the scenario asserts the
// cluster's answer.
ferrovol_e2e::family_tests!(split_loop => ferrovol_e2e::Family::loop_family().split(3);
    create_volume_is_idempotent,
    create_volume_incompatible_repeat,
    create_volume_missing_fields,
    create_volume_unsupported_requests,
    capacity_rules,
    topology_requirements,
    delete_volume_rules,
    delete_volume_in_use,
    controller_publish_rules,
    validate_volume_capabilities_rules,
    list_volumes_pagination,
    get_capacity_rules,
    snapshot_rules,
    snapshots_outlive_their_volume,
    create_from_source_rules,
    controller_expand_rules,
    node_stage_rules,
    mount_flags,
    node_publish_rules,
    single_node_access_modes,
    readonly_publish,
    node_stats_rules,
    node_expand_rules,
    capability_fs_type_is_honoured,
    parallel_create_same_name,
    parallel_node_calls_same_volume,
    path_escape_ids_are_not_found,
);

/// One exabyte: more than any test machine has free.
const HUGE: i64 = 1 << 60;

fn first_fs(family: &Family) -> FsType {
    *family.fs_types.first().expect("the family supports at least one filesystem")
}

/// An inline ephemeral volume's tombstone: an empty `<name>.gone` file.
fn is_tombstone((path, size): &(PathBuf, u64)) -> bool {
    *size == 0 && path.to_string_lossy().ends_with(".gone")
}

/// Regular files in the data dir, to prove a failed call left nothing behind.
fn data_files(driver: &Driver) -> std::collections::BTreeMap<PathBuf, u64> {
    data::files(&driver.data_dir())
}

#[track_caller]
fn assert_data_files_unchanged(driver: &Driver, before: &std::collections::BTreeMap<PathBuf, u64>, what: &str) {
    let after = data_files(driver);
    assert_eq!(&after, before, "{what}: failed calls changed files in the data dir");
}

async fn list_volume_ids(driver: &Driver) -> Vec<String> {
    let list = expect_ok(driver.controller().list_volumes(ListVolumesRequest::default()).await, "ListVolumes");
    assert!(list.next_token.is_empty(), "ListVolumes without max_entries must answer everything in one page");
    list.entries
        .iter()
        .map(|entry| entry.volume.as_ref().expect("ListVolumes entry without a volume (REQUIRED)").volume_id.clone())
        .collect()
}

/// CreateVolume that must fail. A volume made anyway is recorded as a mismatch and deleted,
/// so it does not spoil the checks that follow.
async fn refused_create(driver: &Driver, m: &mut Mismatches, request: CreateVolumeRequest, codes: &[Code], what: &str) {
    let result = driver.controller().create_volume(request).await;
    if let Ok(response) = &result {
        if let Some(volume) = &response.get_ref().volume {
            let request = DeleteVolumeRequest { volume_id: volume.volume_id.clone(), secrets: HashMap::new() };
            let _ = driver.controller().delete_volume(request).await;
        }
    }
    m.code(result, codes, what);
}

/// CreateSnapshot that must fail; a snapshot made anyway is recorded and deleted.
async fn refused_snapshot(
    driver: &Driver,
    m: &mut Mismatches,
    request: CreateSnapshotRequest,
    codes: &[Code],
    what: &str,
) {
    let result = driver.controller().create_snapshot(request).await;
    if let Ok(response) = &result {
        if let Some(snapshot) = &response.get_ref().snapshot {
            let request = requests::delete_snapshot_request(&snapshot.snapshot_id);
            let _ = driver.controller().delete_snapshot(request).await;
        }
    }
    m.code(result, codes, what);
}

/// The node a well-formed volume or snapshot ID of `driver`'s family names, when `driver` is
/// a split cluster in which that node is not registered. Such an ID cannot be judged by the
/// controller (the node may only be down), so the cluster answers UNAVAILABLE where the
/// all-in-one driver answers NOT_FOUND (or OK for deletions); see `unavailable_or`.
fn unregistered_node_of(driver: &Driver, id: &str) -> Option<String> {
    let cluster = driver.cluster()?;
    let mut parts = id.splitn(3, ':');
    let (kind, node, local) = (parts.next()?, parts.next()?, parts.next()?);
    let tag = cluster.family().id_tag;
    if kind != format!("{tag}.vol") && kind != format!("{tag}.snap") {
        return None;
    }
    let node_ok = !node.is_empty()
        && node.len() <= 63
        && !node.starts_with('.')
        && node.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    let local_ok = !local.is_empty()
        && local.len() <= 63
        && local.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    (node_ok && local_ok && !cluster.node_ids().iter().any(|n| n == node)).then(|| node.to_owned())
}

/// The code the controller answers for a call on `id` where the all-in-one driver answers
/// `code`: the same, except UNAVAILABLE in a split cluster for an ID of a node that is not
/// registered (the cluster's documented answer: that node may just be down).
fn unavailable_or(driver: &Driver, id: &str, code: Code) -> Code {
    if unregistered_node_of(driver, id).is_some() {
        Code::Unavailable
    } else {
        code
    }
}

/// A controller call that answers OK for an unknown ID all-in-one (DeleteVolume,
/// DeleteSnapshot, ListSnapshots by ID): OK, or in a split cluster UNAVAILABLE for an ID of a
/// node that is not registered. Answers the response when OK.
#[track_caller]
fn expect_ok_for_id<T: std::fmt::Debug>(
    driver: &Driver,
    id: &str,
    result: Result<tonic::Response<T>, tonic::Status>,
    what: &str,
) -> Option<T> {
    match unregistered_node_of(driver, id) {
        Some(node) => {
            let status = expect_code(result, Code::Unavailable, &format!("{what} (split: node {node} unregistered)"));
            assert_message_mentions(&status, &node, what);
            None
        }
        None => Some(expect_ok(result, what)),
    }
}

fn plugin_name_is_valid(name: &str) -> bool {
    let bytes = name.as_bytes();
    !name.is_empty()
        && name.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'.')
}

// ---------------------------------------------------------------------------------------
// Identity service and the endpoint
// ---------------------------------------------------------------------------------------

async fn identity_service(family: &Family) {
    let driver = Driver::start(family, DriverOptions::default()).await;
    let info = expect_ok(driver.identity().get_plugin_info(GetPluginInfoRequest {}).await, "GetPluginInfo");
    assert_eq!(info.name, "csi.ferrovol.dev", "default driver name");
    assert!(plugin_name_is_valid(&info.name), "GetPluginInfo name {:?} breaks the spec's domain-name rules", info.name);
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"), "vendor_version must be the crate version");
    let again = expect_ok(driver.identity().get_plugin_info(GetPluginInfoRequest {}).await, "GetPluginInfo repeated");
    assert_eq!(again, info, "GetPluginInfo must not change between calls");

    let caps = expect_ok(
        driver.identity().get_plugin_capabilities(GetPluginCapabilitiesRequest {}).await,
        "GetPluginCapabilities",
    );
    let mut services = BTreeSet::new();
    let mut expansion = BTreeSet::new();
    for cap in &caps.capabilities {
        match cap.r#type {
            Some(plugin_capability::Type::Service(service)) => {
                services.insert(ServiceType::try_from(service.r#type).expect("a known service"));
            }
            Some(plugin_capability::Type::VolumeExpansion(exp)) => {
                expansion.insert(ExpansionType::try_from(exp.r#type).expect("a known expansion"));
            }
            None => panic!("GetPluginCapabilities: a capability without a type"),
        }
    }
    assert_eq!(
        services,
        BTreeSet::from([ServiceType::ControllerService, ServiceType::VolumeAccessibilityConstraints]),
        "plugin service capabilities"
    );
    assert_eq!(
        expansion,
        BTreeSet::from([ExpansionType::Online, ExpansionType::Offline]),
        "plugin volume expansion capabilities"
    );
    let caps_again = expect_ok(
        driver.identity().get_plugin_capabilities(GetPluginCapabilitiesRequest {}).await,
        "GetPluginCapabilities repeated",
    );
    assert_eq!(caps_again, caps, "GetPluginCapabilities must be stable");

    for round in 0..2 {
        let probe = expect_ok(driver.identity().probe(ProbeRequest {}).await, &format!("Probe #{round}"));
        assert_eq!(probe.ready, Some(true), "Probe must answer ready=true once started");
    }

    let named = Driver::start(
        family,
        DriverOptions { driver_name: Some("e2e.example.org".to_owned()), ..DriverOptions::default() },
    )
    .await;
    let info =
        expect_ok(named.identity().get_plugin_info(GetPluginInfoRequest {}).await, "GetPluginInfo with --driver-name");
    assert_eq!(info.name, "e2e.example.org", "--driver-name must set the plugin name");
}

async fn capabilities_and_node_info(family: &Family) {
    let driver = Driver::start(family, DriverOptions::default()).await;
    let caps = expect_ok(
        driver.controller().controller_get_capabilities(ControllerGetCapabilitiesRequest {}).await,
        "ControllerGetCapabilities",
    );
    let controller: BTreeSet<ControllerCap> = caps
        .capabilities
        .iter()
        .map(|cap| match cap.r#type {
            Some(controller_service_capability::Type::Rpc(rpc)) => {
                ControllerCap::try_from(rpc.r#type).expect("a known controller capability")
            }
            None => panic!("ControllerGetCapabilities: a capability without a type"),
        })
        .collect();
    assert_eq!(
        controller,
        BTreeSet::from([
            ControllerCap::CreateDeleteVolume,
            ControllerCap::PublishUnpublishVolume,
            ControllerCap::ListVolumes,
            ControllerCap::GetCapacity,
            ControllerCap::CreateDeleteSnapshot,
            ControllerCap::ListSnapshots,
            ControllerCap::CloneVolume,
            ControllerCap::ExpandVolume,
            ControllerCap::ListVolumesPublishedNodes,
            ControllerCap::VolumeCondition,
            ControllerCap::GetVolume,
            ControllerCap::SingleNodeMultiWriter,
            ControllerCap::GetSnapshot,
        ]),
        "controller capabilities"
    );
    let again = expect_ok(
        driver.controller().controller_get_capabilities(ControllerGetCapabilitiesRequest {}).await,
        "ControllerGetCapabilities repeated",
    );
    assert_eq!(again, caps);

    let caps =
        expect_ok(driver.node().node_get_capabilities(NodeGetCapabilitiesRequest {}).await, "NodeGetCapabilities");
    let node: BTreeSet<NodeCap> = caps
        .capabilities
        .iter()
        .map(|cap| match cap.r#type {
            Some(node_service_capability::Type::Rpc(rpc)) => {
                NodeCap::try_from(rpc.r#type).expect("a known node capability")
            }
            None => panic!("NodeGetCapabilities: a capability without a type"),
        })
        .collect();
    assert_eq!(
        node,
        BTreeSet::from([
            NodeCap::StageUnstageVolume,
            NodeCap::GetVolumeStats,
            NodeCap::ExpandVolume,
            NodeCap::VolumeCondition,
            NodeCap::SingleNodeMultiWriter,
        ]),
        "node capabilities"
    );

    for round in 0..2 {
        let info =
            expect_ok(driver.node().node_get_info(NodeGetInfoRequest {}).await, &format!("NodeGetInfo #{round}"));
        assert_eq!(info.node_id, driver.node_id(), "NodeGetInfo node_id");
        assert!(info.node_id.len() <= 256, "node_id over the spec's 256 bytes");
        assert!(
            info.max_volumes_per_node > 0,
            "max_volumes_per_node must be positive, got {}",
            info.max_volumes_per_node
        );
        let topology = info.accessible_topology.expect("NodeGetInfo accessible_topology for a node-local family");
        assert_eq!(
            Some(topology.segments.clone()),
            family.node_topology(driver.node_id()),
            "NodeGetInfo accessible_topology"
        );
        for (key, value) in &topology.segments {
            let (prefix, name) = key.rsplit_once('/').unwrap_or(("", key));
            assert!(
                !name.is_empty() && name.len() <= 63 && prefix.len() <= 63,
                "topology key {key:?} breaks the spec's length rules"
            );
            assert!(
                prefix.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'),
                "topology key prefix {prefix:?} must be lower-case domain notation"
            );
            assert!(
                value.len() <= 63
                    && value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'),
                "topology value {value:?} breaks the spec's rules"
            );
        }
    }
}

async fn endpoint_lifecycle(family: &Family) {
    let sandbox = Sandbox::new();
    // A socket file left by a crashed run must not stop the start.
    drop(std::os::unix::net::UnixListener::bind(sandbox.socket_path()).expect("bind a stale socket"));
    assert!(sandbox.socket_path().exists(), "the stale socket file stays after close");
    let mut driver = Driver::start_in(sandbox, family, DriverOptions::default()).await;
    expect_ok(
        driver.identity().get_plugin_info(GetPluginInfoRequest {}).await,
        "GetPluginInfo over a socket that replaced a stale one",
    );

    // Spec (Filesystem): plugins SHALL NOT create files or directories next to the socket.
    let beside: Vec<String> = std::fs::read_dir(driver.sandbox.socket_dir())
        .expect("list the socket dir")
        .map(|entry| entry.expect("dir entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(beside, vec!["csi.sock".to_owned()], "files beside the socket");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(driver.socket_path()).expect("stat the socket").permissions(),
    );
    assert_eq!(mode & 0o002, 0, "the socket must not be world-writable (mode {mode:o})");

    driver.stop().await;
    driver.restart().await;
    expect_ok(driver.identity().probe(ProbeRequest {}).await, "Probe after a clean restart");
    driver.stop().await;
}

async fn tcp_endpoint(family: &Family) {
    let mut driver =
        Driver::start(family, DriverOptions { transport: Transport::Tcp, ..DriverOptions::default() }).await;
    let info = expect_ok(driver.identity().get_plugin_info(GetPluginInfoRequest {}).await, "GetPluginInfo over TCP");
    assert_eq!(info.name, "csi.ferrovol.dev");
    expect_ok(
        driver.controller().controller_get_capabilities(ControllerGetCapabilitiesRequest {}).await,
        "ControllerGetCapabilities over TCP",
    );
    expect_ok(driver.node().node_get_info(NodeGetInfoRequest {}).await, "NodeGetInfo over TCP");
    driver.stop().await;
}

async fn sigterm_finishes_in_flight_call(family: &Family) {
    // The slowest node call at hand: staging a blank volume runs mkfs.
    let fs = *family.fs_types.last().expect("a filesystem");
    let mut driver = Driver::start(family, DriverOptions::default()).await;
    let name = unique_name("pvc", "sigterm");
    let mut vol = steps::create_simple(family, &driver, &name, Access::Mount(fs), fs.small_bytes()).await;
    steps::controller_publish(&driver, &mut vol).await;
    let staging = driver.staging_dir(&name);
    let mut node = driver.node();
    let request = vol.stage_request(&staging);
    let call = tokio::spawn(async move { node.node_stage_volume(request).await });
    // Wait until the call is visibly under way (its loop device exists), then SIGTERM.
    let data_dir = driver.data_dir();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while kernel::loop_devices_under(&data_dir).is_empty()
        && !call.is_finished()
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    driver.stop().await;
    let result = call.await.expect("the staging task ran");
    expect_ok(result, "NodeStageVolume in flight when SIGTERM arrived");
    steps::check_staged(&vol, &staging, "NodeStageVolume finished during shutdown");

    driver.restart().await;
    steps::unstage(&driver, &vol, &staging).await;
    steps::controller_unpublish(&driver, &vol).await;
    steps::delete_volume(&driver, &vol).await;
    driver.assert_no_leaks();
}

// ---------------------------------------------------------------------------------------
// CreateVolume, DeleteVolume, ControllerGetVolume
// ---------------------------------------------------------------------------------------

async fn create_volume_is_idempotent(family: &Family) {
    let mut m = Mismatches::new();
    let driver = Driver::start(family, DriverOptions::default()).await;
    for access in accesses(family) {
        let name = unique_name("pvc", access.label());
        let vol = steps::create_simple(family, &driver, &name, access, access.small_bytes(family)).await;
        let what = format!("{} volume {}", access.label(), vol.id);

        for round in 0..2 {
            let got = expect_ok(
                driver
                    .controller()
                    .controller_get_volume(ControllerGetVolumeRequest { volume_id: vol.id.clone() })
                    .await,
                &format!("ControllerGetVolume #{round} of {what}"),
            );
            assert_eq!(
                got.volume.as_ref(),
                Some(&vol.volume),
                "ControllerGetVolume must answer the volume CreateVolume answered ({what})"
            );
            let status = got.status.expect("ControllerGetVolume status is REQUIRED");
            assert!(
                status.published_node_ids.is_empty(),
                "{what}: not published yet, but published_node_ids = {:?}",
                status.published_node_ids
            );
            let condition =
                status.volume_condition.expect("volume_condition MUST be set with the VOLUME_CONDITION capability");
            assert!(!condition.abnormal, "{what}: fresh volume reported abnormal: {condition:?}");
            assert!(!condition.message.is_empty(), "{what}: volume_condition message is REQUIRED");
        }

        assert!(list_volume_ids(&driver).await.contains(&vol.id), "ListVolumes must list {what}");
        let validated = expect_ok(
            driver
                .controller()
                .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                    volume_id: vol.id.clone(),
                    volume_context: vol.context.clone(),
                    volume_capabilities: vec![vol.capability.clone()],
                    parameters: requests::parameters(family, access),
                    ..Default::default()
                })
                .await,
            &format!("ValidateVolumeCapabilities of {what}"),
        );
        let confirmed = validated
            .confirmed
            .unwrap_or_else(|| panic!("{what}: its own capability was not confirmed: {}", validated.message));
        assert_eq!(confirmed.volume_capabilities, vec![vol.capability.clone()]);

        steps::delete_volume(&driver, &vol).await;
        m.code(
            driver.controller().controller_get_volume(ControllerGetVolumeRequest { volume_id: vol.id.clone() }).await,
            &[Code::NotFound],
            &format!("ControllerGetVolume of deleted {what}"),
        );
        assert!(!list_volume_ids(&driver).await.contains(&vol.id), "ListVolumes still lists deleted {what}");
    }

    // Several capabilities at once: the volume must serve any of them.
    let fs = first_fs(family);
    let mut request = create_request(family, &unique_name("pvc", "multicap"), Access::Mount(fs), fs.small_bytes());
    request.volume_capabilities = vec![
        mount_capability(fs.name(), Mode::SingleNodeWriter),
        mount_capability(fs.name(), Mode::SingleNodeReaderOnly),
        mount_capability(fs.name(), Mode::SingleNodeMultiWriter),
    ];
    let vol = steps::create_volume(family, &driver, request, Access::Mount(fs)).await;
    steps::delete_volume(&driver, &vol).await;

    // `type` is optional for the default family; `fsType` defaults too.
    if family.parameters.get("type").map(String::as_str) == Some("loop") {
        let mut request =
            create_request(family, &unique_name("pvc", "defaults"), Access::Mount(FsType::Ext4), 32 * MIB);
        request.parameters.remove("type");
        request.parameters.remove("fsType");
        request.volume_capabilities = vec![mount_capability("", Mode::SingleNodeWriter)];
        let vol = steps::create_volume(family, &driver, request, Access::Mount(FsType::Ext4)).await;
        steps::delete_volume(&driver, &vol).await;
    }
    assert!(list_volume_ids(&driver).await.is_empty(), "volumes left after deleting all");
    family.assert_no_leftover_storage(&driver);
    m.assert_none();
}

async fn create_volume_incompatible_repeat(family: &Family) {
    let mut m = Mismatches::new();
    let driver = Driver::start(family, DriverOptions::default()).await;
    let fs = first_fs(family);
    let access = Access::Mount(fs);
    let name = unique_name("pvc", "repeat");
    let base = create_request(family, &name, access, fs.small_bytes());
    let vol = steps::create_volume(family, &driver, base.clone(), access).await;
    let source = steps::create_simple(family, &driver, &unique_name("pvc", "src"), access, fs.small_bytes()).await;
    let snap = steps::snapshot(family, &driver, &source, &unique_name("snapshot", "src")).await;
    let before = data_files(&driver);

    // Compatible: a smaller requirement without a limit is satisfied by the existing volume.
    let mut smaller = base.clone();
    smaller.capacity_range = range(fs.minimum_bytes(), 0);
    let answer = expect_ok(
        driver.controller().create_volume(smaller).await,
        "CreateVolume repeated with a smaller required_bytes (compatible)",
    );
    assert_eq!(
        answer.volume.map(|v| v.volume_id),
        Some(vol.id.clone()),
        "a compatible repeat must answer the existing volume"
    );

    let mut bigger = base.clone();
    bigger.capacity_range = range(vol.capacity + 32 * MIB, 0);
    refused_create(&driver, &mut m, bigger, &[Code::AlreadyExists], "CreateVolume same name, larger required_bytes")
        .await;
    let mut limited = base.clone();
    limited.capacity_range = range(0, vol.capacity - MIB);
    refused_create(
        &driver,
        &mut m,
        limited,
        &[Code::AlreadyExists],
        "CreateVolume same name, limit_bytes below the existing size",
    )
    .await;
    if let Some(other_fs) = family.fs_types.iter().find(|other| **other != fs) {
        let mut other = create_request(family, &name, Access::Mount(*other_fs), fs.small_bytes());
        other.capacity_range = base.capacity_range;
        refused_create(
            &driver,
            &mut m,
            other,
            &[Code::AlreadyExists],
            "CreateVolume same name, different fsType parameter",
        )
        .await;
    }
    let mut sourced = base.clone();
    sourced.volume_content_source = snapshot_source(&snap.snapshot_id);
    refused_create(
        &driver,
        &mut m,
        sourced,
        &[Code::AlreadyExists],
        "CreateVolume same name, now with a snapshot source",
    )
    .await;
    let mut cloned = base.clone();
    cloned.volume_content_source = volume_source(&source.id);
    refused_create(&driver, &mut m, cloned, &[Code::AlreadyExists], "CreateVolume same name, now with a volume source")
        .await;
    assert_data_files_unchanged(&driver, &before, "incompatible CreateVolume repeats");

    let ids: HashSet<String> = list_volume_ids(&driver).await.into_iter().collect();
    assert_eq!(ids, HashSet::from([vol.id.clone(), source.id.clone()]), "volumes after the repeats");
    steps::delete_snapshot(&driver, &snap.snapshot_id).await;
    steps::delete_volume(&driver, &vol).await;
    steps::delete_volume(&driver, &source).await;
    m.assert_none();
}

async fn create_volume_missing_fields(family: &Family) {
    let mut m = Mismatches::new();
    let driver = Driver::start(family, DriverOptions::default()).await;
    let fs = first_fs(family);
    let access = Access::Mount(fs);
    let valid = || create_request(family, &unique_name("pvc", "invalid"), access, fs.small_bytes());
    let before = data_files(&driver);

    let mut cases: Vec<(&str, CreateVolumeRequest)> = Vec::new();
    let mut r = valid();
    r.name = String::new();
    cases.push(("no name", r));
    let mut r = valid();
    r.volume_capabilities.clear();
    cases.push(("no volume_capabilities", r));
    let mut r = valid();
    r.volume_capabilities[0].access_type = None;
    cases.push(("a capability without access type", r));
    let mut r = valid();
    r.volume_capabilities[0].access_mode = None;
    cases.push(("a capability without access mode", r));
    let mut r = valid();
    r.volume_capabilities = vec![capability(access, Mode::Unknown)];
    cases.push(("access mode UNKNOWN", r));
    let mut r = valid();
    r.name = format!("pvc-control-\u{1}-{}", std::process::id());
    cases.push(("a name with a banned control character", r));
    let mut r = valid();
    r.volume_content_source = Some(VolumeContentSource { r#type: None });
    cases.push(("a content source without a type", r));
    let mut r = valid();
    r.volume_content_source = snapshot_source("");
    cases.push(("a snapshot source without snapshot_id", r));
    let mut r = valid();
    r.volume_content_source = volume_source("");
    cases.push(("a volume source without volume_id", r));
    let mut r = valid();
    r.accessibility_requirements = Some(TopologyRequirement::default());
    cases.push(("a topology requirement with neither requisite nor preferred", r));

    for (what, request) in cases {
        refused_create(&driver, &mut m, request, &[Code::InvalidArgument], &format!("CreateVolume with {what}")).await;
    }
    let mut negative = valid();
    negative.capacity_range = range(-MIB, 0);
    refused_create(
        &driver,
        &mut m,
        negative,
        &[Code::InvalidArgument, Code::OutOfRange],
        "CreateVolume with negative required_bytes",
    )
    .await;
    let mut negative = valid();
    negative.capacity_range = range(0, -MIB);
    refused_create(
        &driver,
        &mut m,
        negative,
        &[Code::InvalidArgument, Code::OutOfRange],
        "CreateVolume with negative limit_bytes",
    )
    .await;
    assert_data_files_unchanged(&driver, &before, "CreateVolume with missing or invalid fields");
    assert!(list_volume_ids(&driver).await.is_empty(), "a failed CreateVolume made a volume");
    m.assert_none();
}

async fn create_volume_unsupported_requests(family: &Family) {
    let mut m = Mismatches::new();
    let driver = Driver::start(family, DriverOptions::default()).await;
    let fs = first_fs(family);
    let before = data_files(&driver);
    let multi_node = [Mode::MultiNodeReaderOnly, Mode::MultiNodeSingleWriter, Mode::MultiNodeMultiWriter];
    for access in accesses(family) {
        for mode in multi_node {
            let mut request = create_request(family, &unique_name("pvc", "multi"), access, access.small_bytes(family));
            request.volume_capabilities = vec![capability(access, mode)];
            refused_create(
                &driver,
                &mut m,
                request,
                &[Code::InvalidArgument],
                &format!("CreateVolume {} with {}", access.label(), mode.as_str_name()),
            )
            .await;
        }
        // Every listed capability must be supported, not just one of them.
        let mut request = create_request(family, &unique_name("pvc", "mixed"), access, access.small_bytes(family));
        request.volume_capabilities =
            vec![capability(access, Mode::SingleNodeWriter), capability(access, Mode::MultiNodeMultiWriter)];
        refused_create(
            &driver,
            &mut m,
            request,
            &[Code::InvalidArgument],
            &format!("CreateVolume {} with SINGLE_NODE_WRITER and MULTI_NODE_MULTI_WRITER", access.label()),
        )
        .await;
    }

    let mut request = create_request(family, &unique_name("pvc", "btrfs"), Access::Mount(fs), fs.small_bytes());
    request.volume_capabilities = vec![mount_capability("btrfs", Mode::SingleNodeWriter)];
    refused_create(&driver, &mut m, request, &[Code::InvalidArgument], "CreateVolume with capability fs_type btrfs")
        .await;
    let mut request = create_request(family, &unique_name("pvc", "vfat"), Access::Mount(fs), fs.small_bytes());
    request.parameters.insert("fsType".to_owned(), "vfat".to_owned());
    request.volume_capabilities = vec![mount_capability("", Mode::SingleNodeWriter)];
    let status = expect_code(
        driver.controller().create_volume(request).await,
        Code::InvalidArgument,
        "CreateVolume with parameter fsType=vfat",
    );
    assert_message_mentions(&status, "fsType", "CreateVolume with parameter fsType=vfat");
    let mut request = create_request(family, &unique_name("pvc", "colour"), Access::Mount(fs), fs.small_bytes());
    request.parameters.insert("colour".to_owned(), "blue".to_owned());
    let status = expect_code(
        driver.controller().create_volume(request).await,
        Code::InvalidArgument,
        "CreateVolume with unknown parameter colour",
    );
    assert_message_mentions(&status, "colour", "CreateVolume with unknown parameter colour");
    let mut request = create_request(family, &unique_name("pvc", "floppy"), Access::Mount(fs), fs.small_bytes());
    request.parameters.insert("type".to_owned(), "floppy".to_owned());
    refused_create(&driver, &mut m, request, &[Code::InvalidArgument], "CreateVolume with parameter type=floppy").await;
    assert_data_files_unchanged(&driver, &before, "unsupported CreateVolume requests");
    assert!(list_volume_ids(&driver).await.is_empty(), "an unsupported CreateVolume made a volume");

    // The orchestrator's own keys are accepted, whatever they are.
    let mut request = create_request(family, &unique_name("pvc", "k8s-keys"), Access::Mount(fs), fs.small_bytes());
    request.parameters.insert("csi.storage.k8s.io/some-future-key".to_owned(), "x".to_owned());
    request.parameters.insert("csi.storage.k8s.io/fstype".to_owned(), fs.name().to_owned());
    let vol = steps::create_volume(family, &driver, request, Access::Mount(fs)).await;
    steps::delete_volume(&driver, &vol).await;

    // All single-node modes are supported, in both access types.
    for access in accesses(family) {
        for mode in [
            Mode::SingleNodeWriter,
            Mode::SingleNodeReaderOnly,
            Mode::SingleNodeSingleWriter,
            Mode::SingleNodeMultiWriter,
        ] {
            let mut request = create_request(family, &unique_name("pvc", "mode"), access, access.small_bytes(family));
            request.volume_capabilities = vec![capability(access, mode)];
            let vol = steps::create_volume(family, &driver, request, access).await;
            steps::delete_volume(&driver, &vol).await;
        }
    }
    m.assert_none();
}

async fn capacity_rules(family: &Family) {
    let mut m = Mismatches::new();
    let driver = Driver::start(family, DriverOptions::default()).await;
    for access in accesses(family) {
        let minimum = match access {
            Access::Mount(fs) => fs.minimum_bytes(),
            Access::Block => family.block_minimum_bytes,
        };
        let label = access.label();
        let create = |required: i64, limit: i64| {
            let mut request = create_request(family, &unique_name("pvc", label), access, 0);
            request.capacity_range = range(required, limit);
            request
        };
        let mut made = Vec::new();

        let mut request = create(0, 0);
        request.capacity_range = None;
        let vol = steps::create_volume(family, &driver, request, access).await;
        assert_eq!(vol.capacity, GIB, "{label}: no capacity_range gives 1 GiB");
        made.push(vol);

        let vol = steps::create_volume(family, &driver, create(MIB, 0), access).await;
        assert_eq!(vol.capacity, minimum, "{label}: 1 MiB is raised to the minimum");
        made.push(vol);

        let odd = minimum + 4 * MIB + 1;
        let vol = steps::create_volume(family, &driver, create(odd, 0), access).await;
        assert_eq!(vol.capacity, family.round_up(odd), "{label}: sizes round up to whole MiB (whole extents for LVM)");
        made.push(vol);

        let exact = minimum + 16 * MIB;
        let vol = steps::create_volume(family, &driver, create(exact, exact), access).await;
        assert_eq!(vol.capacity, exact, "{label}: required == limit gives exactly that size");
        made.push(vol);

        let vol = steps::create_volume(family, &driver, create(0, minimum + 32 * MIB), access).await;
        assert!(
            vol.capacity >= minimum && vol.capacity <= minimum + 32 * MIB,
            "{label}: a limit alone gives a size between the minimum and the limit, got {}",
            vol.capacity
        );
        made.push(vol);

        let before = data_files(&driver);
        for (what, request, code) in [
            ("limit_bytes < required_bytes", create(minimum + 32 * MIB, minimum + 16 * MIB), Code::OutOfRange),
            ("limit_bytes below the minimum size", create(0, minimum - MIB), Code::OutOfRange),
            ("limit_bytes below the rounded size", create(odd, odd), Code::OutOfRange),
            ("more than the node has free", create(HUGE, 0), Code::ResourceExhausted),
        ] {
            refused_create(&driver, &mut m, request, &[code], &format!("CreateVolume {label} with {what}")).await;
        }
        assert_data_files_unchanged(&driver, &before, &format!("CreateVolume {label} with bad capacity"));
        for vol in &made {
            steps::delete_volume(&driver, vol).await;
        }
    }
    assert!(list_volume_ids(&driver).await.is_empty());
    family.assert_no_leftover_storage(&driver);
    m.assert_none();
}

async fn topology_requirements(family: &Family) {
    let mut m = Mismatches::new();
    let driver = Driver::start(family, DriverOptions::default()).await;
    let key = family.topology_key.expect("this scenario is for node-local families");
    let fs = first_fs(family);
    let ours = Topology { segments: HashMap::from([(key.to_owned(), driver.node_id().to_owned())]) };
    let other = Topology { segments: HashMap::from([(key.to_owned(), "some-other-node".to_owned())]) };
    let requirement = |requisite: Vec<Topology>, preferred: Vec<Topology>| {
        let mut request = create_request(family, &unique_name("pvc", "topo"), Access::Mount(fs), fs.small_bytes());
        request.accessibility_requirements = Some(TopologyRequirement { requisite, preferred });
        request
    };
    for (what, request) in [
        ("requisite = our node", requirement(vec![ours.clone()], vec![])),
        ("preferred = our node", requirement(vec![], vec![ours.clone()])),
        (
            "requisite = other node and ours, preferred = ours (WaitForFirstConsumer)",
            requirement(vec![other.clone(), ours.clone()], vec![ours.clone()]),
        ),
    ] {
        let vol = steps::create_volume(family, &driver, request, Access::Mount(fs)).await;
        assert_eq!(vol.volume.accessible_topology, vec![ours.clone()], "CreateVolume with {what}: topology");
        steps::delete_volume(&driver, &vol).await;
    }
    let before = data_files(&driver);
    // A split cluster cannot tell a node that does not exist from one that is down: a
    // requisite naming only nodes that are not registered is UNAVAILABLE (retried by the CO)
    // rather than a final refusal.
    let another_node_only: &[Code] =
        if driver.is_split() { &[Code::Unavailable] } else { &[Code::ResourceExhausted, Code::InvalidArgument] };
    for (what, request, codes) in [
        ("requisite = another node only", requirement(vec![other.clone()], vec![]), another_node_only),
        (
            "requisite = an unknown topology key only",
            requirement(vec![Topology { segments: HashMap::from([("zone".to_owned(), "z1".to_owned())]) }], vec![]),
            &[Code::ResourceExhausted, Code::InvalidArgument],
        ),
    ] {
        // The spec: the SP MUST fail when it cannot provision in any requisite topology.
        refused_create(&driver, &mut m, request, codes, &format!("CreateVolume with {what}")).await;
    }
    assert_data_files_unchanged(&driver, &before, "CreateVolume outside our topology");
    m.assert_none();
}

fn malformed_volume_ids(family: &Family, node: &str) -> Vec<String> {
    let prefix = family.volume_id_prefix(node);
    vec![
        "garbage".to_owned(),
        format!("{}.vol", family.id_tag),
        format!("{}.vol:", family.id_tag),
        format!("{}.vol:{node}", family.id_tag),
        prefix.clone(),
        format!("{}x", family.snapshot_id_prefix(node)),
        format!("{}.vol:some-other-node:abc", family.id_tag),
        format!("{prefix}.."),
        format!("{prefix}../abc"),
        format!("{prefix}a/b"),
        format!("{prefix}a\0b"),
        format!("{prefix}{}", "a".repeat(4096)),
    ]
}

async fn delete_volume_rules(family: &Family) {
    let mut m = Mismatches::new();
    let driver = Driver::start(family, DriverOptions::default()).await;
    let fs = first_fs(family);
    let keeper =
        steps::create_simple(family, &driver, &unique_name("pvc", "keeper"), Access::Mount(fs), fs.small_bytes()).await;
    m.code(
        driver.controller().delete_volume(DeleteVolumeRequest::default()).await,
        &[Code::InvalidArgument],
        "DeleteVolume without volume_id",
    );
    let mut ids = vec![family.unknown_volume_id(driver.node_id())];
    ids.extend(malformed_volume_ids(family, driver.node_id()));
    for id in ids {
        for round in 0..2 {
            expect_ok_for_id(
                &driver,
                &id,
                driver
                    .controller()
                    .delete_volume(DeleteVolumeRequest { volume_id: id.clone(), secrets: HashMap::new() })
                    .await,
                &format!("DeleteVolume #{round} of unknown or malformed ID {:?}", short(&id)),
            );
        }
    }
    assert_eq!(list_volume_ids(&driver).await, vec![keeper.id.clone()], "deleting unknown IDs removed a real volume");
    steps::delete_volume(&driver, &keeper).await;
    m.assert_none();
}

/// A printable, bounded form of an ID for failure messages.
fn short(id: &str) -> String {
    let escaped = id.escape_debug().to_string();
    if escaped.len() > 80 {
        format!("{}...({} bytes)", &escaped[..80], id.len())
    } else {
        escaped
    }
}

async fn delete_volume_in_use(family: &Family) {
    let driver = Driver::start(family, DriverOptions::default()).await;
    for access in accesses(family) {
        let label = access.label();
        let name = unique_name("pvc", &format!("inuse-{label}"));
        let used = steps::provision_and_publish(family, &driver, &name, access, access.small_bytes(family)).await;
        let payload = data::pattern(61, 64 * 1024);
        match access {
            Access::Mount(_) => data::write_synced(&used.target.join("inuse.bin"), &payload),
            Access::Block => data::write_at_synced(&used.target, 0, &payload),
        }
        // The spec's DeleteVolume table: a volume in use MUST get FAILED_PRECONDITION.
        expect_code(
            driver.controller().delete_volume(used.vol.delete_request()).await,
            Code::FailedPrecondition,
            &format!("DeleteVolume of a published {label} volume"),
        );
        assert!(list_volume_ids(&driver).await.contains(&used.vol.id), "{label}: the volume in use vanished");
        steps::check_published(&used.vol, &used.target, false, "after a refused DeleteVolume");
        match access {
            Access::Mount(_) => data::assert_content(&used.target.join("inuse.bin"), &payload, "data in use"),
            Access::Block => assert_eq!(data::read_at(&used.target, 0, payload.len()), payload, "block data in use"),
        }
        steps::teardown(&driver, &used).await;
    }
    driver.assert_no_leaks();
    family.assert_no_leftover_storage(&driver);
}

// ---------------------------------------------------------------------------------------
// ControllerPublish/Unpublish, ValidateVolumeCapabilities, ListVolumes, GetCapacity
// ---------------------------------------------------------------------------------------

async fn published_nodes(driver: &Driver, vol: &Vol) -> (Vec<String>, Vec<String>) {
    let got = expect_ok(
        driver.controller().controller_get_volume(ControllerGetVolumeRequest { volume_id: vol.id.clone() }).await,
        "ControllerGetVolume",
    );
    let from_get = got.status.expect("ControllerGetVolume status is REQUIRED").published_node_ids;
    let list = expect_ok(driver.controller().list_volumes(ListVolumesRequest::default()).await, "ListVolumes");
    let entry = list
        .entries
        .into_iter()
        .find(|entry| entry.volume.as_ref().map(|v| v.volume_id.as_str()) == Some(vol.id.as_str()))
        .unwrap_or_else(|| panic!("ListVolumes does not list {}", vol.id));
    let from_list =
        entry.status.expect("ListVolumes status MUST be set with LIST_VOLUMES_PUBLISHED_NODES").published_node_ids;
    (from_get, from_list)
}

async fn controller_publish_rules(family: &Family) {
    let mut m = Mismatches::new();
    let driver = Driver::start(family, DriverOptions::default()).await;
    let node = driver.node_id().to_owned();
    for access in accesses(family) {
        let label = access.label();
        let mut vol =
            steps::create_simple(family, &driver, &unique_name("pvc", label), access, access.small_bytes(family)).await;
        let valid = vol.controller_publish_request(&node);
        let mut cases: Vec<(&str, ControllerPublishVolumeRequest, &[Code])> = Vec::new();
        let mut r = valid.clone();
        r.volume_id.clear();
        cases.push(("no volume_id", r, &[Code::InvalidArgument]));
        let mut r = valid.clone();
        r.node_id.clear();
        cases.push(("no node_id", r, &[Code::InvalidArgument]));
        let mut r = valid.clone();
        r.volume_capability = None;
        cases.push(("no volume_capability", r, &[Code::InvalidArgument]));
        let mut r = valid.clone();
        r.volume_id = family.unknown_volume_id(&node);
        cases.push(("an unknown volume", r, &[Code::NotFound]));
        let mut r = valid.clone();
        r.volume_id = format!("{}.vol:some-other-node:abc", family.id_tag);
        let code: &[Code] = if driver.is_split() { &[Code::Unavailable] } else { &[Code::NotFound] };
        cases.push(("a volume ID of another node", r, code));
        let mut r = valid.clone();
        r.node_id = "no-such-node".to_owned();
        // A split cluster cannot tell a node that does not exist from one that is down; a
        // local volume cannot be attached to any node but its own either way.
        let code: &[Code] = if driver.is_split() { &[Code::FailedPrecondition] } else { &[Code::NotFound] };
        cases.push(("an unknown node", r, code));
        let mut r = valid.clone();
        r.volume_capability = Some(capability(access, Mode::MultiNodeMultiWriter));
        cases.push(("an unsupported access mode", r, &[Code::InvalidArgument, Code::FailedPrecondition]));
        for (what, request, codes) in cases {
            let to_unknown_node = request.node_id == "no-such-node";
            let result = driver.controller().controller_publish_volume(request).await;
            if let (true, Err(status)) = (driver.is_split() && to_unknown_node, &result) {
                m.check(
                    status.message().contains(&node) && status.message().contains("no-such-node"),
                    format!(
                        "ControllerPublishVolume {label} with {what}: the message must name both nodes: {status:?}"
                    ),
                );
            }
            m.code(result, codes, &format!("ControllerPublishVolume {label} with {what}"));
        }

        steps::controller_publish(&driver, &mut vol).await;
        let (from_get, from_list) = published_nodes(&driver, &vol).await;
        assert_eq!(from_get, vec![node.clone()], "ControllerGetVolume published_node_ids");
        assert_eq!(from_list, vec![node.clone()], "ListVolumes published_node_ids");

        m.code(
            driver
                .controller()
                .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                    node_id: node.clone(),
                    ..Default::default()
                })
                .await,
            &[Code::InvalidArgument],
            "ControllerUnpublishVolume without volume_id",
        );
        // Unknown volume or node: the spec allows OK (safely unpublished) or NOT_FOUND.
        expect_ok_or(
            driver
                .controller()
                .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                    volume_id: family.unknown_volume_id(&node),
                    node_id: node.clone(),
                    ..Default::default()
                })
                .await,
            &[Code::NotFound],
            "ControllerUnpublishVolume of an unknown volume",
        );
        expect_ok_or(
            driver.controller().controller_unpublish_volume(vol.controller_unpublish_request("no-such-node")).await,
            &[Code::NotFound],
            "ControllerUnpublishVolume from an unknown node",
        );
        let (from_get, _) = published_nodes(&driver, &vol).await;
        assert_eq!(from_get, vec![node.clone()], "unpublishing from another node changed ours");

        steps::controller_unpublish(&driver, &vol).await;
        let (from_get, from_list) = published_nodes(&driver, &vol).await;
        assert!(from_get.is_empty() && from_list.is_empty(), "still published after unpublish");

        // An empty node_id unpublishes from every node.
        steps::controller_publish(&driver, &mut vol).await;
        for round in 0..2 {
            expect_ok(
                driver.controller().controller_unpublish_volume(vol.controller_unpublish_request("")).await,
                &format!("ControllerUnpublishVolume #{round} without node_id"),
            );
        }
        let (from_get, _) = published_nodes(&driver, &vol).await;
        assert!(from_get.is_empty(), "still published after unpublish from all nodes");
        steps::delete_volume(&driver, &vol).await;
    }
    m.assert_none();
}

async fn validate_volume_capabilities_rules(family: &Family) {
    let mut m = Mismatches::new();
    let driver = Driver::start(family, DriverOptions::default()).await;
    for access in accesses(family) {
        let label = access.label();
        let vol =
            steps::create_simple(family, &driver, &unique_name("pvc", label), access, access.small_bytes(family)).await;
        let validate = |caps: Vec<VolumeCapability>| ValidateVolumeCapabilitiesRequest {
            volume_id: vol.id.clone(),
            volume_context: vol.context.clone(),
            volume_capabilities: caps,
            ..Default::default()
        };
        for mode in [
            Mode::SingleNodeWriter,
            Mode::SingleNodeReaderOnly,
            Mode::SingleNodeSingleWriter,
            Mode::SingleNodeMultiWriter,
        ] {
            let caps = vec![capability(access, mode)];
            let first = expect_ok(
                driver.controller().validate_volume_capabilities(validate(caps.clone())).await,
                &format!("ValidateVolumeCapabilities {label} {}", mode.as_str_name()),
            );
            let confirmed = first
                .confirmed
                .clone()
                .unwrap_or_else(|| panic!("{label} {} not confirmed: {}", mode.as_str_name(), first.message));
            assert_eq!(confirmed.volume_capabilities, caps, "confirmed capabilities");
            let second = expect_ok(
                driver.controller().validate_volume_capabilities(validate(caps)).await,
                "ValidateVolumeCapabilities repeated",
            );
            assert_eq!(second, first, "ValidateVolumeCapabilities must be idempotent");
        }
        for caps in [
            vec![capability(access, Mode::MultiNodeMultiWriter)],
            vec![capability(access, Mode::MultiNodeReaderOnly)],
            vec![capability(access, Mode::SingleNodeWriter), capability(access, Mode::MultiNodeSingleWriter)],
        ] {
            let answer = expect_ok(
                driver.controller().validate_volume_capabilities(validate(caps.clone())).await,
                &format!("ValidateVolumeCapabilities {label} with a multi-node mode"),
            );
            assert!(answer.confirmed.is_none(), "{label}: unsupported capabilities {caps:?} were confirmed");
            assert!(!answer.message.is_empty(), "{label}: an unconfirmed answer should say why (message)");
        }
        let mut r = validate(vec![capability(access, Mode::SingleNodeWriter)]);
        r.volume_id.clear();
        m.code(
            driver.controller().validate_volume_capabilities(r).await,
            &[Code::InvalidArgument],
            "ValidateVolumeCapabilities without volume_id",
        );
        m.code(
            driver.controller().validate_volume_capabilities(validate(vec![])).await,
            &[Code::InvalidArgument],
            "ValidateVolumeCapabilities without capabilities",
        );
        let mut cap = capability(access, Mode::SingleNodeWriter);
        cap.access_mode = None;
        m.code(
            driver.controller().validate_volume_capabilities(validate(vec![cap])).await,
            &[Code::InvalidArgument],
            "ValidateVolumeCapabilities with a capability without access mode",
        );
        let mut ids = vec![family.unknown_volume_id(driver.node_id())];
        ids.extend(malformed_volume_ids(family, driver.node_id()));
        for id in ids {
            let mut r = validate(vec![capability(access, Mode::SingleNodeWriter)]);
            r.volume_id = id.clone();
            m.code(
                driver.controller().validate_volume_capabilities(r).await,
                &[unavailable_or(&driver, &id, Code::NotFound)],
                &format!("ValidateVolumeCapabilities of {:?}", short(&id)),
            );
        }
        steps::delete_volume(&driver, &vol).await;
    }
    m.assert_none();
}

async fn list_volumes_pagination(family: &Family) {
    let mut m = Mismatches::new();
    let driver = Driver::start(family, DriverOptions::default()).await;
    let empty =
        expect_ok(driver.controller().list_volumes(ListVolumesRequest::default()).await, "ListVolumes on a fresh node");
    assert!(empty.entries.is_empty() && empty.next_token.is_empty(), "fresh node lists volumes");

    let access = accesses(family)[0];
    let mut vols = Vec::new();
    for i in 0..5 {
        let name = unique_name("pvc", &format!("list{i}"));
        vols.push(steps::create_simple(family, &driver, &name, access, access.small_bytes(family)).await);
    }
    let all = expect_ok(driver.controller().list_volumes(ListVolumesRequest::default()).await, "ListVolumes");
    assert_eq!(all.entries.len(), 5, "ListVolumes lists every volume");
    for entry in &all.entries {
        let volume = entry.volume.as_ref().expect("entry volume is REQUIRED");
        let made = vols
            .iter()
            .find(|vol| vol.id == volume.volume_id)
            .unwrap_or_else(|| panic!("ListVolumes lists unknown {}", volume.volume_id));
        assert_eq!(volume.capacity_bytes, made.capacity, "listed capacity");
        assert_eq!(volume.volume_context, made.context, "listed volume_context");
        assert_eq!(volume.accessible_topology, made.volume.accessible_topology, "listed topology");
        let status = entry.status.as_ref().expect("status MUST be set with LIST_VOLUMES_PUBLISHED_NODES");
        let condition = status.volume_condition.as_ref().expect("volume_condition MUST be set with VOLUME_CONDITION");
        assert!(!condition.abnormal, "fresh volume listed abnormal: {condition:?}");
    }

    for page_size in [1, 2, 3] {
        let mut seen = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let page = expect_ok(
                driver
                    .controller()
                    .list_volumes(ListVolumesRequest { max_entries: page_size, starting_token: token.clone() })
                    .await,
                &format!("ListVolumes page {pages} of size {page_size}"),
            );
            pages += 1;
            assert!(
                page.entries.len() <= usize::try_from(page_size).expect("positive"),
                "ListVolumes answered {} entries for max_entries {page_size}",
                page.entries.len()
            );
            seen.extend(
                page.entries.iter().map(|entry| entry.volume.as_ref().expect("entry volume").volume_id.clone()),
            );
            if seen.len() < 5 {
                assert!(
                    !page.next_token.is_empty(),
                    "ListVolumes must set next_token while entries remain (page {pages}, size {page_size})"
                );
            }
            if page.next_token.is_empty() {
                break;
            }
            token = page.next_token;
            assert!(pages <= 10, "ListVolumes pagination does not end");
        }
        let unique: HashSet<&String> = seen.iter().collect();
        assert_eq!(seen.len(), 5, "pages of {page_size} listed {seen:?}");
        assert_eq!(unique.len(), 5, "pages of {page_size} repeated a volume: {seen:?}");
    }
    m.code(
        driver
            .controller()
            .list_volumes(ListVolumesRequest { max_entries: 2, starting_token: "not-a-token".to_owned() })
            .await,
        &[Code::Aborted],
        "ListVolumes with an invalid starting_token",
    );
    m.code(
        driver.controller().list_volumes(ListVolumesRequest { max_entries: -1, starting_token: String::new() }).await,
        &[Code::InvalidArgument],
        "ListVolumes with negative max_entries",
    );
    for vol in &vols {
        steps::delete_volume(&driver, vol).await;
    }
    assert!(list_volume_ids(&driver).await.is_empty());
    m.assert_none();
}

async fn get_capacity_rules(family: &Family) {
    let driver = Driver::start(family, DriverOptions::default()).await;
    let plain = expect_ok(driver.controller().get_capacity(GetCapacityRequest::default()).await, "GetCapacity");
    assert!(plain.available_capacity > 0, "available_capacity must be positive");
    let maximum = plain.maximum_volume_size.expect("GetCapacity maximum_volume_size");
    assert!(maximum > 0, "maximum_volume_size must be positive");
    if let Some(minimum) = plain.minimum_volume_size {
        assert!(minimum >= 0 && minimum <= maximum, "minimum_volume_size {minimum} > maximum {maximum}");
    }
    for access in accesses(family) {
        let answer = expect_ok(
            driver
                .controller()
                .get_capacity(GetCapacityRequest {
                    volume_capabilities: vec![capability(access, Mode::SingleNodeWriter)],
                    parameters: requests::parameters(family, access),
                    accessible_topology: family.node_topology(driver.node_id()).map(|segments| Topology { segments }),
                })
                .await,
            &format!("GetCapacity for {} on our node", access.label()),
        );
        assert!(answer.available_capacity > 0, "{}: no capacity on our node", access.label());
        assert!(answer.maximum_volume_size.unwrap_or(1) > 0);
    }
    if let Some(key) = family.topology_key {
        // Nothing can be provisioned on another node through this one.
        let other = driver
            .controller()
            .get_capacity(GetCapacityRequest {
                accessible_topology: Some(Topology {
                    segments: HashMap::from([(key.to_owned(), "some-other-node".to_owned())]),
                }),
                ..Default::default()
            })
            .await;
        if let Some(answer) = expect_ok_or(other, &[Code::NotFound], "GetCapacity for another node") {
            assert_eq!(
                answer.available_capacity, 0,
                "GetCapacity must not offer our space for another node's topology"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Snapshots and volumes from sources
// ---------------------------------------------------------------------------------------

async fn list_snapshots(driver: &Driver, request: ListSnapshotsRequest, what: &str) -> Vec<Snapshot> {
    let answer = expect_ok(driver.controller().list_snapshots(request).await, what);
    assert!(answer.next_token.is_empty(), "{what}: unexpected next_token");
    answer
        .entries
        .into_iter()
        .map(|entry| entry.snapshot.unwrap_or_else(|| panic!("{what}: entry without snapshot")))
        .collect()
}

fn malformed_snapshot_ids(family: &Family, node: &str) -> Vec<String> {
    let prefix = family.snapshot_id_prefix(node);
    vec![
        "garbage".to_owned(),
        format!("{}.snap:", family.id_tag),
        prefix.clone(),
        format!("{}x", family.volume_id_prefix(node)),
        format!("{}.snap:some-other-node:abc", family.id_tag),
        format!("{prefix}.."),
        format!("{prefix}../abc"),
        format!("{prefix}a/b"),
        format!("{prefix}a\0b"),
        format!("{prefix}{}", "a".repeat(4096)),
    ]
}

async fn snapshot_rules(family: &Family) {
    let mut m = Mismatches::new();
    let driver = Driver::start(family, DriverOptions::default()).await;
    let node = driver.node_id().to_owned();
    let access = accesses(family)[0];
    let a =
        steps::create_simple(family, &driver, &unique_name("pvc", "snap-a"), access, access.small_bytes(family)).await;
    let b =
        steps::create_simple(family, &driver, &unique_name("pvc", "snap-b"), access, access.small_bytes(family)).await;
    let name = unique_name("snapshot", "one");
    let one = steps::snapshot(family, &driver, &a, &name).await;

    let mut other_source = b.snapshot_request(&name);
    other_source.name = name.clone();
    refused_snapshot(
        &driver,
        &mut m,
        other_source,
        &[Code::AlreadyExists],
        "CreateSnapshot with the same name and another source",
    )
    .await;
    let mut cases: Vec<(&str, CreateSnapshotRequest, Code)> = vec![
        ("no name", a.snapshot_request(""), Code::InvalidArgument),
        ("a name with a banned control character", a.snapshot_request("snapshot-\u{7}-bell"), Code::InvalidArgument),
    ];
    let mut r = a.snapshot_request(&unique_name("snapshot", "nosource"));
    r.source_volume_id.clear();
    cases.push(("no source_volume_id", r, Code::InvalidArgument));
    let mut ids = vec![family.unknown_volume_id(&node)];
    ids.extend(malformed_volume_ids(family, &node));
    for id in &ids {
        let mut r = a.snapshot_request(&unique_name("snapshot", "badsource"));
        r.source_volume_id = id.clone();
        cases.push(("an unknown or malformed source volume", r, unavailable_or(&driver, id, Code::NotFound)));
    }
    for (what, request, code) in cases {
        let source = short(&request.source_volume_id);
        refused_snapshot(&driver, &mut m, request, &[code], &format!("CreateSnapshot with {what} ({source})")).await;
    }

    for round in 0..2 {
        let got = expect_ok(
            driver
                .controller()
                .get_snapshot(GetSnapshotRequest { snapshot_id: one.snapshot_id.clone(), secrets: HashMap::new() })
                .await,
            &format!("GetSnapshot #{round}"),
        );
        assert_eq!(got.snapshot.as_ref(), Some(&one), "GetSnapshot answers the snapshot");
    }
    m.code(
        driver.controller().get_snapshot(GetSnapshotRequest::default()).await,
        &[Code::InvalidArgument],
        "GetSnapshot without snapshot_id",
    );
    let mut bad_snapshots = vec![family.unknown_snapshot_id(&node)];
    bad_snapshots.extend(malformed_snapshot_ids(family, &node));
    for id in &bad_snapshots {
        m.code(
            driver
                .controller()
                .get_snapshot(GetSnapshotRequest { snapshot_id: id.clone(), secrets: HashMap::new() })
                .await,
            &[unavailable_or(&driver, id, Code::NotFound)],
            &format!("GetSnapshot of {:?}", short(id)),
        );
    }

    let by_id = |id: &str| ListSnapshotsRequest { snapshot_id: id.to_owned(), ..Default::default() };
    let by_source = |id: &str| ListSnapshotsRequest { source_volume_id: id.to_owned(), ..Default::default() };
    assert_eq!(list_snapshots(&driver, by_id(&one.snapshot_id), "ListSnapshots by id").await, vec![one.clone()]);
    assert_eq!(list_snapshots(&driver, by_source(&a.id), "ListSnapshots by source").await, vec![one.clone()]);
    assert!(list_snapshots(&driver, by_source(&b.id), "ListSnapshots by a source without snapshots").await.is_empty());
    for id in &bad_snapshots {
        if unregistered_node_of(&driver, id).is_some() {
            expect_ok_for_id(
                &driver,
                id,
                driver.controller().list_snapshots(by_id(id)).await,
                "ListSnapshots by a snapshot id of an unregistered node",
            );
            continue;
        }
        assert!(
            list_snapshots(&driver, by_id(id), "ListSnapshots by an unknown snapshot id").await.is_empty(),
            "ListSnapshots by unknown id {:?} must answer an empty list",
            short(id)
        );
    }
    assert!(list_snapshots(&driver, by_source(&family.unknown_volume_id(&node)), "ListSnapshots by an unknown source")
        .await
        .is_empty());

    // Pagination over several snapshots.
    let mut all = vec![one.clone()];
    for i in 0..3 {
        all.push(steps::snapshot(family, &driver, &b, &unique_name("snapshot", &format!("page{i}"))).await);
    }
    let listed = list_snapshots(&driver, ListSnapshotsRequest::default(), "ListSnapshots").await;
    assert_eq!(listed.len(), 4, "ListSnapshots lists every snapshot");
    for page_size in [1, 3] {
        let mut seen = Vec::new();
        let mut token = String::new();
        for pages in 0.. {
            assert!(pages <= 10, "ListSnapshots pagination does not end");
            let page = expect_ok(
                driver
                    .controller()
                    .list_snapshots(ListSnapshotsRequest {
                        max_entries: page_size,
                        starting_token: token.clone(),
                        ..Default::default()
                    })
                    .await,
                "ListSnapshots page",
            );
            assert!(page.entries.len() <= usize::try_from(page_size).expect("positive"));
            seen.extend(page.entries.iter().map(|e| e.snapshot.as_ref().expect("snapshot").snapshot_id.clone()));
            if seen.len() < 4 {
                assert!(!page.next_token.is_empty(), "ListSnapshots must set next_token while entries remain");
            }
            if page.next_token.is_empty() {
                break;
            }
            token = page.next_token;
        }
        let expected: HashSet<String> = all.iter().map(|s| s.snapshot_id.clone()).collect();
        assert_eq!(seen.len(), 4, "pages of {page_size}: {seen:?}");
        assert_eq!(seen.into_iter().collect::<HashSet<_>>(), expected);
    }
    m.code(
        driver
            .controller()
            .list_snapshots(ListSnapshotsRequest {
                max_entries: 1,
                starting_token: "not-a-token".to_owned(),
                ..Default::default()
            })
            .await,
        &[Code::Aborted],
        "ListSnapshots with an invalid starting_token",
    );
    m.code(
        driver.controller().list_snapshots(ListSnapshotsRequest { max_entries: -1, ..Default::default() }).await,
        &[Code::InvalidArgument],
        "ListSnapshots with negative max_entries",
    );

    m.code(
        driver.controller().delete_snapshot(DeleteSnapshotRequest::default()).await,
        &[Code::InvalidArgument],
        "DeleteSnapshot without snapshot_id",
    );
    for id in &bad_snapshots {
        expect_ok_for_id(
            &driver,
            id,
            driver.controller().delete_snapshot(requests::delete_snapshot_request(id)).await,
            &format!("DeleteSnapshot of unknown or malformed {:?}", short(id)),
        );
    }
    for snapshot in &all {
        steps::delete_snapshot(&driver, &snapshot.snapshot_id).await;
        m.code(
            driver
                .controller()
                .get_snapshot(GetSnapshotRequest { snapshot_id: snapshot.snapshot_id.clone(), secrets: HashMap::new() })
                .await,
            &[Code::NotFound],
            "GetSnapshot of a deleted snapshot",
        );
    }
    assert!(list_snapshots(&driver, ListSnapshotsRequest::default(), "ListSnapshots after deleting all")
        .await
        .is_empty());
    steps::delete_volume(&driver, &a).await;
    steps::delete_volume(&driver, &b).await;
    family.assert_no_leftover_storage(&driver);
    m.assert_none();
}

async fn snapshots_outlive_their_volume(family: &Family) {
    let driver = Driver::start(family, DriverOptions::default()).await;
    let fs = first_fs(family);
    let access = Access::Mount(fs);
    let name = unique_name("pvc", "outlive");
    let used = steps::provision_and_publish(family, &driver, &name, access, fs.small_bytes()).await;
    let payload = data::pattern(7, 256 * 1024);
    data::write_synced(&used.target.join("kept.bin"), &payload);
    let snap = steps::snapshot(family, &driver, &used.vol, &unique_name("snapshot", "outlive")).await;
    steps::unpublish(&driver, &used.vol, &used.target).await;
    steps::unstage(&driver, &used.vol, &used.staging).await;
    steps::controller_unpublish(&driver, &used.vol).await;

    // The spec: either snapshots are independent (then they stay fully usable), or
    // DeleteVolume answers FAILED_PRECONDITION and leaves the volume as it was.
    let deleted = expect_ok_or(
        driver.controller().delete_volume(used.vol.delete_request()).await,
        &[Code::FailedPrecondition],
        "DeleteVolume of a volume with a snapshot",
    );
    if deleted.is_some() {
        let listed = list_snapshots(
            &driver,
            ListSnapshotsRequest { snapshot_id: snap.snapshot_id.clone(), ..Default::default() },
            "ListSnapshots after the source was deleted",
        )
        .await;
        assert_eq!(listed, vec![snap.clone()], "the snapshot must stay listed");
        let mut request = create_request(family, &unique_name("pvc", "from-orphan"), access, fs.small_bytes());
        request.volume_content_source = snapshot_source(&snap.snapshot_id);
        let restored = steps::create_volume(family, &driver, request, access).await;
        let mut restored_vol = restored;
        steps::controller_publish(&driver, &mut restored_vol).await;
        let staging = driver.staging_dir("from-orphan");
        let target = driver.target_path("from-orphan");
        steps::stage(&driver, &restored_vol, &staging).await;
        steps::publish(&driver, &restored_vol, &staging, &target, false).await;
        data::assert_content(&target.join("kept.bin"), &payload, "restore from a snapshot of a deleted volume");
        steps::unpublish(&driver, &restored_vol, &target).await;
        steps::unstage(&driver, &restored_vol, &staging).await;
        steps::controller_unpublish(&driver, &restored_vol).await;
        steps::delete_volume(&driver, &restored_vol).await;
        steps::delete_snapshot(&driver, &snap.snapshot_id).await;
    } else {
        assert!(list_volume_ids(&driver).await.contains(&used.vol.id), "a refused DeleteVolume must leave the volume");
        steps::delete_snapshot(&driver, &snap.snapshot_id).await;
        steps::delete_volume(&driver, &used.vol).await;
    }
    driver.assert_no_leaks();
    family.assert_no_leftover_storage(&driver);
}

async fn create_from_source_rules(family: &Family) {
    let mut m = Mismatches::new();
    let driver = Driver::start(family, DriverOptions::default()).await;
    let node = driver.node_id().to_owned();
    for access in accesses(family) {
        let label = access.label();
        let size = access.small_bytes(family);
        let source = steps::create_simple(family, &driver, &unique_name("pvc", label), access, size).await;
        let snap = steps::snapshot(family, &driver, &source, &unique_name("snapshot", label)).await;
        let mut made = Vec::new();
        let from = |content: Option<VolumeContentSource>, required: i64, limit: i64| {
            let mut request = create_request(family, &unique_name("pvc", "from"), access, 0);
            request.capacity_range = range(required, limit);
            request.volume_content_source = content;
            request
        };

        for (what, content) in [("snapshot", snapshot_source(&snap.snapshot_id)), ("volume", volume_source(&source.id))]
        {
            let same = steps::create_volume(family, &driver, from(content.clone(), size, 0), access).await;
            assert_eq!(same.capacity, source.capacity, "{label}: from {what} at the same size");
            made.push(same);
            let larger = steps::create_volume(family, &driver, from(content.clone(), size + 16 * MIB, 0), access).await;
            assert!(larger.capacity >= size + 16 * MIB, "{label}: from {what}, larger");
            made.push(larger);
            let mut no_range = from(content.clone(), 0, 0);
            no_range.capacity_range = None;
            let no_range_vol = steps::create_volume(family, &driver, no_range, access).await;
            assert!(
                no_range_vol.capacity >= source.capacity,
                "{label}: from {what} without capacity_range must hold the source ({} < {})",
                no_range_vol.capacity,
                source.capacity
            );
            made.push(no_range_vol);

            // required_bytes below the source without a limit: the source's size satisfies
            // it, so OK (holding the whole source) or OUT_OF_RANGE are both spec answers.
            let smaller = expect_ok_or(
                driver.controller().create_volume(from(content.clone(), size - MIB, 0)).await,
                &[Code::OutOfRange],
                &format!("CreateVolume {label} from {what} with required_bytes below the source"),
            );
            if let Some(answer) = smaller {
                let volume = answer.volume.expect("CreateVolume answers a volume");
                assert!(
                    volume.capacity_bytes >= source.capacity,
                    "{label}: a volume from {what} is smaller ({}) than its source ({})",
                    volume.capacity_bytes,
                    source.capacity
                );
                made.push(Vol::new(&volume, access, Mode::SingleNodeWriter));
            }
            let before = data_files(&driver);
            refused_create(
                &driver,
                &mut m,
                from(content.clone(), 0, size - MIB),
                &[Code::OutOfRange],
                &format!("CreateVolume {label} from {what} with limit_bytes below the source"),
            )
            .await;
            assert_data_files_unchanged(&driver, &before, &format!("CreateVolume {label} from {what} too small"));
        }

        let before = data_files(&driver);
        let mut missing = vec![family.unknown_snapshot_id(&node), source.id.clone()];
        missing.extend(malformed_snapshot_ids(family, &node));
        for id in &missing {
            refused_create(
                &driver,
                &mut m,
                from(snapshot_source(id), size, 0),
                &[unavailable_or(&driver, id, Code::NotFound)],
                &format!("CreateVolume {label} from missing snapshot {:?}", short(id)),
            )
            .await;
        }
        let mut missing = vec![family.unknown_volume_id(&node), snap.snapshot_id.clone()];
        missing.extend(malformed_volume_ids(family, &node));
        for id in &missing {
            refused_create(
                &driver,
                &mut m,
                from(volume_source(id), size, 0),
                &[unavailable_or(&driver, id, Code::NotFound)],
                &format!("CreateVolume {label} from missing volume {:?}", short(id)),
            )
            .await;
        }
        assert_data_files_unchanged(&driver, &before, &format!("CreateVolume {label} from missing sources"));

        // Volumes are independent of their sources: deleting the snapshot and the source
        // volume first either works and leaves the new volumes, or is refused as in use.
        let snapshot_gone = expect_ok_or(
            driver.controller().delete_snapshot(requests::delete_snapshot_request(&snap.snapshot_id)).await,
            &[Code::FailedPrecondition],
            &format!("DeleteSnapshot {label} with volumes restored from it"),
        )
        .is_some();
        let source_gone = expect_ok_or(
            driver.controller().delete_volume(source.delete_request()).await,
            &[Code::FailedPrecondition],
            &format!("DeleteVolume {label} with clones of it"),
        )
        .is_some();
        let listed = list_volume_ids(&driver).await;
        for vol in &made {
            assert!(listed.contains(&vol.id), "{label}: {} vanished with its source", vol.id);
        }
        for vol in &made {
            steps::delete_volume(&driver, vol).await;
        }
        if !snapshot_gone {
            steps::delete_snapshot(&driver, &snap.snapshot_id).await;
        }
        if !source_gone {
            steps::delete_volume(&driver, &source).await;
        }
    }
    family.assert_no_leftover_storage(&driver);
    m.assert_none();
}

async fn controller_expand_rules(family: &Family) {
    let mut m = Mismatches::new();
    let driver = Driver::start(family, DriverOptions::default()).await;
    let node = driver.node_id().to_owned();
    for access in accesses(family) {
        let label = access.label();
        let vol =
            steps::create_simple(family, &driver, &unique_name("pvc", label), access, access.small_bytes(family)).await;
        let grown = vol.capacity + 32 * MIB;
        let first = expect_ok(
            driver.controller().controller_expand_volume(vol.controller_expand_request(grown)).await,
            &format!("ControllerExpandVolume {label}"),
        );
        assert!(first.capacity_bytes >= grown, "{label}: expanded to {} < {grown}", first.capacity_bytes);
        assert_eq!(first.capacity_bytes % MIB, 0, "{label}: expanded size not in whole MiB");
        if !access.is_block() {
            assert!(first.node_expansion_required, "{label}: a mount volume needs node expansion");
        }
        let second = expect_ok(
            driver.controller().controller_expand_volume(vol.controller_expand_request(grown)).await,
            &format!("ControllerExpandVolume {label} repeated"),
        );
        assert_eq!(second.capacity_bytes, first.capacity_bytes, "{label}: repeat changed the size");
        let got = expect_ok(
            driver.controller().controller_get_volume(ControllerGetVolumeRequest { volume_id: vol.id.clone() }).await,
            "ControllerGetVolume after expansion",
        );
        assert_eq!(
            got.volume.map(|v| v.capacity_bytes),
            Some(first.capacity_bytes),
            "{label}: ControllerGetVolume must report the new size"
        );
        // Already at least as big: the spec says SHOULD reply OK.
        let smaller = expect_ok(
            driver.controller().controller_expand_volume(vol.controller_expand_request(vol.capacity)).await,
            &format!("ControllerExpandVolume {label} to less than its size"),
        );
        assert_eq!(smaller.capacity_bytes, first.capacity_bytes, "{label}: a smaller request shrank it");

        let mut cases: Vec<(&str, ControllerExpandVolumeRequest, Vec<Code>)> = Vec::new();
        let mut r = vol.controller_expand_request(vol.capacity);
        r.capacity_range = range(vol.capacity, vol.capacity);
        cases.push(("a limit below the current size (shrinking)", r, vec![Code::OutOfRange]));
        let mut r = vol.controller_expand_request(grown + 64 * MIB);
        r.capacity_range = range(grown + 64 * MIB, grown + 32 * MIB);
        cases.push(("limit_bytes < required_bytes", r, vec![Code::OutOfRange]));
        let mut r = vol.controller_expand_request(grown);
        r.volume_id.clear();
        cases.push(("no volume_id", r, vec![Code::InvalidArgument]));
        let mut r = vol.controller_expand_request(grown);
        r.capacity_range = None;
        cases.push(("no capacity_range", r, vec![Code::InvalidArgument]));
        let mut r = vol.controller_expand_request(grown);
        r.volume_capability = Some(capability(access, Mode::MultiNodeMultiWriter));
        cases.push(("a capability the volume does not support", r, vec![Code::InvalidArgument]));
        cases.push((
            "more than the node has free",
            vol.controller_expand_request(HUGE),
            vec![Code::OutOfRange, Code::ResourceExhausted],
        ));
        let mut ids = vec![family.unknown_volume_id(&node)];
        ids.extend(malformed_volume_ids(family, &node));
        for id in ids {
            let mut r = vol.controller_expand_request(grown);
            let code = unavailable_or(&driver, &id, Code::NotFound);
            r.volume_id = id;
            cases.push(("an unknown or malformed volume", r, vec![code]));
        }
        for (what, request, codes) in cases {
            let id = short(&request.volume_id);
            m.code(
                driver.controller().controller_expand_volume(request).await,
                &codes,
                &format!("ControllerExpandVolume {label} with {what} ({id})"),
            );
        }
        steps::delete_volume(&driver, &vol).await;
    }
    m.assert_none();
}

// ---------------------------------------------------------------------------------------
// Node service
// ---------------------------------------------------------------------------------------

/// The other access type's capability, for "same path, different capability" checks.
fn flipped_capability(vol: &Vol) -> VolumeCapability {
    match vol.access {
        Access::Mount(_) => block_capability(Mode::SingleNodeWriter),
        Access::Block => mount_capability("ext4", Mode::SingleNodeWriter),
    }
}

async fn node_stage_rules(family: &Family) {
    let mut m = Mismatches::new();
    let driver = Driver::start(family, DriverOptions::default()).await;
    let node = driver.node_id().to_owned();
    for access in accesses(family) {
        let label = access.label();
        let name = unique_name("pvc", label);
        let mut vol = steps::create_simple(family, &driver, &name, access, access.small_bytes(family)).await;
        steps::controller_publish(&driver, &mut vol).await;
        let staging = driver.staging_dir(&name);
        let valid = vol.stage_request(&staging);

        let mut cases: Vec<(String, NodeStageVolumeRequest, Vec<Code>)> = Vec::new();
        let mut r = valid.clone();
        r.volume_id.clear();
        cases.push(("no volume_id".into(), r, vec![Code::InvalidArgument]));
        let mut r = valid.clone();
        r.staging_target_path.clear();
        cases.push(("no staging_target_path".into(), r, vec![Code::InvalidArgument]));
        let mut r = valid.clone();
        r.volume_capability = None;
        cases.push(("no volume_capability".into(), r, vec![Code::InvalidArgument]));
        let mut r = valid.clone();
        if let Some(cap) = r.volume_capability.as_mut() {
            cap.access_mode = None;
        }
        cases.push(("a capability without access mode".into(), r, vec![Code::InvalidArgument]));
        let mut r = valid.clone();
        r.staging_target_path = "relative/globalmount".to_owned();
        cases.push(("a relative staging path".into(), r, vec![Code::InvalidArgument]));
        let mut ids = vec![family.unknown_volume_id(&node)];
        ids.extend(malformed_volume_ids(family, &node));
        for id in ids {
            let mut r = valid.clone();
            r.volume_id = id.clone();
            cases.push((format!("volume {:?}", short(&id)), r, vec![Code::NotFound]));
        }
        for (what, request, codes) in cases {
            m.code(
                driver.node().node_stage_volume(request).await,
                &codes,
                &format!("NodeStageVolume {label} with {what}"),
            );
        }
        driver.assert_no_leaks();

        // The CO makes the staging directory; a driver may refuse a missing one or make it.
        let never_made = driver.sandbox.missing_staging_dir(&format!("{name}-never-made"));
        let lenient = expect_ok_or(
            driver.node().node_stage_volume(vol.stage_request(&never_made)).await,
            &[Code::InvalidArgument, Code::FailedPrecondition],
            &format!("NodeStageVolume {label} at a staging path that does not exist"),
        );
        if lenient.is_some() {
            steps::check_staged(&vol, &never_made, "NodeStageVolume at a path it created");
            steps::unstage(&driver, &vol, &never_made).await;
        }
        driver.assert_no_leaks();

        steps::stage(&driver, &vol, &staging).await;
        let mut incompatible = valid.clone();
        incompatible.volume_capability = Some(flipped_capability(&vol));
        m.code(
            driver.node().node_stage_volume(incompatible).await,
            &[Code::AlreadyExists],
            &format!("NodeStageVolume {label} again at the same path with another access type"),
        );
        steps::check_staged(&vol, &staging, "after an incompatible NodeStageVolume");

        let mut cases: Vec<(String, NodeUnstageVolumeRequest, Code)> = Vec::new();
        let mut r = vol.unstage_request(&staging);
        r.volume_id.clear();
        cases.push(("no volume_id".into(), r, Code::InvalidArgument));
        let mut r = vol.unstage_request(&staging);
        r.staging_target_path.clear();
        cases.push(("no staging_target_path".into(), r, Code::InvalidArgument));
        let mut r = vol.unstage_request(&staging);
        r.volume_id = family.unknown_volume_id(&node);
        cases.push(("an unknown volume".into(), r, Code::NotFound));
        for (what, request, code) in cases {
            m.code(
                driver.node().node_unstage_volume(request).await,
                &[code],
                &format!("NodeUnstageVolume {label} with {what}"),
            );
        }
        steps::check_staged(&vol, &staging, "after failed NodeUnstageVolume calls");
        // Not staged at that path: the spec says OK.
        let elsewhere = driver.staging_dir(&format!("{name}-elsewhere"));
        m.ok(
            driver.node().node_unstage_volume(vol.unstage_request(&elsewhere)).await,
            &format!("NodeUnstageVolume {label} at a path where it is not staged"),
        );
        steps::check_staged(&vol, &staging, "after unstaging from another path");

        steps::unstage(&driver, &vol, &staging).await;
        steps::controller_unpublish(&driver, &vol).await;
        steps::delete_volume(&driver, &vol).await;
    }
    driver.assert_no_leaks();
    m.assert_none();
}

async fn node_publish_rules(family: &Family) {
    let mut m = Mismatches::new();
    let driver = Driver::start(family, DriverOptions::default()).await;
    let node = driver.node_id().to_owned();
    for access in accesses(family) {
        let label = access.label();
        let name = unique_name("pvc", label);
        let mut vol = steps::create_simple(family, &driver, &name, access, access.small_bytes(family)).await;
        steps::controller_publish(&driver, &mut vol).await;
        let staging = driver.staging_dir(&name);
        steps::stage(&driver, &vol, &staging).await;
        let target = driver.target_path(&name);
        let valid = vol.publish_request(&staging, &target, false);

        let mut cases: Vec<(String, NodePublishVolumeRequest, Code)> = Vec::new();
        let mut r = valid.clone();
        r.volume_id.clear();
        cases.push(("no volume_id".into(), r, Code::InvalidArgument));
        let mut r = valid.clone();
        r.target_path.clear();
        cases.push(("no target_path".into(), r, Code::InvalidArgument));
        let mut r = valid.clone();
        r.volume_capability = None;
        cases.push(("no volume_capability".into(), r, Code::InvalidArgument));
        let mut r = valid.clone();
        r.target_path = "relative/mount".to_owned();
        cases.push(("a relative target path".into(), r, Code::InvalidArgument));
        let mut r = valid.clone();
        r.staging_target_path.clear();
        cases.push(("no staging_target_path".into(), r, Code::FailedPrecondition));
        let mut ids = vec![family.unknown_volume_id(&node)];
        ids.extend(malformed_volume_ids(family, &node));
        for id in ids {
            let mut r = valid.clone();
            r.volume_id = id.clone();
            cases.push((format!("volume {:?}", short(&id)), r, Code::NotFound));
        }
        for (what, request, code) in cases {
            m.code(
                driver.node().node_publish_volume(request).await,
                &[code],
                &format!("NodePublishVolume {label} with {what}"),
            );
            assert!(kernel::mounts_at(&target).is_empty(), "a failed NodePublishVolume mounted the target");
        }

        steps::publish(&driver, &vol, &staging, &target, false).await;
        match access {
            Access::Mount(_) => {
                let payload = data::pattern(11, 64 * 1024);
                data::write_synced(&target.join("hello.bin"), &payload);
                data::assert_content(&target.join("hello.bin"), &payload, "write through the published path");
            }
            Access::Block => {
                let payload = data::pattern(12, 64 * 1024);
                data::write_at_synced(&target, MIB as u64, &payload);
                assert_eq!(data::read_at(&target, MIB as u64, payload.len()), payload, "block round trip");
            }
        }

        // The table for a second NodePublishVolume of a non-MULTI_NODE volume.
        let mut readonly = valid.clone();
        readonly.readonly = true;
        m.code(
            driver.node().node_publish_volume(readonly).await,
            &[Code::AlreadyExists],
            &format!("NodePublishVolume {label} at the same target, now readonly"),
        );
        let mut other_cap = valid.clone();
        other_cap.volume_capability = Some(flipped_capability(&vol));
        // The publish table says ALREADY_EXISTS; the text above it says a second publish
        // with a different volume_capability SHOULD get FAILED_PRECONDITION.
        m.code(
            driver.node().node_publish_volume(other_cap).await,
            &[Code::AlreadyExists, Code::FailedPrecondition],
            &format!("NodePublishVolume {label} at the same target with another access type"),
        );
        // SINGLE_NODE_WRITER at a second target: the spec's table says the plugin SHOULD
        // answer FAILED_PRECONDITION, but Kubernetes' ReadWriteOnce lets several pods of one
        // node share the volume, so OK is accepted too and must then be a real publish.
        let second = driver.target_path(&format!("{name}-second"));
        let shared = expect_ok_or(
            driver.node().node_publish_volume(vol.publish_request(&staging, &second, false)).await,
            &[Code::FailedPrecondition],
            &format!("NodePublishVolume {label} (SINGLE_NODE_WRITER) at a second target"),
        );
        if shared.is_some() {
            steps::check_published(&vol, &second, false, "SINGLE_NODE_WRITER at a second target");
            steps::unpublish(&driver, &vol, &second).await;
        } else {
            assert!(kernel::mounts_at(&second).is_empty(), "a refused publish mounted the second target");
        }
        steps::check_published(&vol, &target, false, "after a second publish");

        let mut cases: Vec<(String, NodeUnpublishVolumeRequest, Code)> = Vec::new();
        let mut r = vol.unpublish_request(&target);
        r.volume_id.clear();
        cases.push(("no volume_id".into(), r, Code::InvalidArgument));
        let mut r = vol.unpublish_request(&target);
        r.target_path.clear();
        cases.push(("no target_path".into(), r, Code::InvalidArgument));
        let mut r = vol.unpublish_request(&target);
        r.volume_id = family.unknown_volume_id(&node);
        cases.push(("an unknown volume".into(), r, Code::NotFound));
        for (what, request, code) in cases {
            m.code(
                driver.node().node_unpublish_volume(request).await,
                &[code],
                &format!("NodeUnpublishVolume {label} with {what}"),
            );
        }
        steps::check_published(&vol, &target, false, "after failed NodeUnpublishVolume calls");
        expect_ok(
            driver.node().node_unpublish_volume(vol.unpublish_request(&second)).await,
            &format!("NodeUnpublishVolume {label} of a target it was never published at"),
        );

        steps::unpublish(&driver, &vol, &target).await;
        // Once the first target is gone, another one is fine.
        steps::publish(&driver, &vol, &staging, &second, false).await;
        if let Access::Mount(_) = access {
            data::assert_content(&second.join("hello.bin"), &data::pattern(11, 64 * 1024), "data at the new target");
        }
        steps::unpublish(&driver, &vol, &second).await;
        steps::unstage(&driver, &vol, &staging).await;
        steps::controller_unpublish(&driver, &vol).await;
        steps::delete_volume(&driver, &vol).await;
    }
    driver.assert_no_leaks();
    m.assert_none();
}

async fn single_node_access_modes(family: &Family) {
    let mut m = Mismatches::new();
    let driver = Driver::start(family, DriverOptions::default()).await;
    let fs = first_fs(family);
    let access = Access::Mount(fs);
    let with_mode = |name: &str, mode: Mode| {
        let mut request = create_request(family, name, access, fs.small_bytes());
        request.volume_capabilities = vec![capability(access, mode)];
        request
    };

    // SINGLE_NODE_SINGLE_WRITER: one target only.
    let name = unique_name("pvc", "snsw");
    let mut vol = steps::create_volume(family, &driver, with_mode(&name, Mode::SingleNodeSingleWriter), access).await;
    steps::controller_publish(&driver, &mut vol).await;
    let staging = driver.staging_dir(&name);
    steps::stage(&driver, &vol, &staging).await;
    let first = driver.target_path(&format!("{name}-1"));
    let second = driver.target_path(&format!("{name}-2"));
    steps::publish(&driver, &vol, &staging, &first, false).await;
    m.code(
        driver.node().node_publish_volume(vol.publish_request(&staging, &second, false)).await,
        &[Code::FailedPrecondition],
        "NodePublishVolume SINGLE_NODE_SINGLE_WRITER at a second target",
    );
    steps::unpublish(&driver, &vol, &first).await;
    steps::unstage(&driver, &vol, &staging).await;
    steps::controller_unpublish(&driver, &vol).await;
    steps::delete_volume(&driver, &vol).await;

    // SINGLE_NODE_MULTI_WRITER: several targets share the data.
    let name = unique_name("pvc", "snmw");
    let mut vol = steps::create_volume(family, &driver, with_mode(&name, Mode::SingleNodeMultiWriter), access).await;
    steps::controller_publish(&driver, &mut vol).await;
    let staging = driver.staging_dir(&name);
    steps::stage(&driver, &vol, &staging).await;
    let first = driver.target_path(&format!("{name}-1"));
    let second = driver.target_path(&format!("{name}-2"));
    let third = driver.target_path(&format!("{name}-3"));
    steps::publish(&driver, &vol, &staging, &first, false).await;
    steps::publish(&driver, &vol, &staging, &second, false).await;
    steps::publish(&driver, &vol, &staging, &third, true).await;
    let payload = data::pattern(21, 32 * 1024);
    data::write_synced(&first.join("shared.bin"), &payload);
    data::assert_content(&second.join("shared.bin"), &payload, "SINGLE_NODE_MULTI_WRITER second target");
    data::assert_content(&third.join("shared.bin"), &payload, "SINGLE_NODE_MULTI_WRITER readonly target");
    for target in [&first, &second, &third] {
        steps::unpublish(&driver, &vol, target).await;
    }
    steps::unstage(&driver, &vol, &staging).await;
    steps::controller_unpublish(&driver, &vol).await;
    steps::delete_volume(&driver, &vol).await;

    // SINGLE_NODE_READER_ONLY published readonly.
    let name = unique_name("pvc", "snro");
    let mut vol = steps::create_volume(family, &driver, with_mode(&name, Mode::SingleNodeReaderOnly), access).await;
    steps::controller_publish(&driver, &mut vol).await;
    let staging = driver.staging_dir(&name);
    steps::stage(&driver, &vol, &staging).await;
    let target = driver.target_path(&name);
    steps::publish(&driver, &vol, &staging, &target, true).await;
    let err = std::fs::write(target.join("nope"), b"x").expect_err("writing to a readonly publish must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "readonly publish: {err}");
    steps::unpublish(&driver, &vol, &target).await;
    steps::unstage(&driver, &vol, &staging).await;
    steps::controller_unpublish(&driver, &vol).await;
    steps::delete_volume(&driver, &vol).await;
    driver.assert_no_leaks();
    m.assert_none();
}

async fn readonly_publish(family: &Family) {
    let driver = Driver::start(family, DriverOptions::default()).await;
    for access in accesses(family) {
        let label = access.label();
        let name = unique_name("pvc", label);
        let mut vol = steps::create_simple(family, &driver, &name, access, access.small_bytes(family)).await;
        steps::controller_publish(&driver, &mut vol).await;
        let staging = driver.staging_dir(&name);
        steps::stage(&driver, &vol, &staging).await;
        let writable = driver.target_path(&format!("{name}-rw"));
        steps::publish(&driver, &vol, &staging, &writable, false).await;
        let payload = data::pattern(31, 8192);
        match access {
            Access::Mount(_) => data::write_synced(&writable.join("before.bin"), &payload),
            Access::Block => data::write_at_synced(&writable, 0, &payload),
        }
        steps::unpublish(&driver, &vol, &writable).await;

        let readonly = driver.target_path(&format!("{name}-ro"));
        steps::publish(&driver, &vol, &staging, &readonly, true).await;
        match access {
            Access::Mount(_) => {
                data::assert_content(&readonly.join("before.bin"), &payload, "readonly publish shows the data");
                let err = std::fs::write(readonly.join("after.bin"), b"x")
                    .expect_err("writing to a readonly publish must fail");
                assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{label}: {err}");
            }
            Access::Block => {
                assert_eq!(data::read_at(&readonly, 0, payload.len()), payload, "readonly block shows the data");
                // The spec: readonly means the SP MUST publish in readonly mode. A read-only
                // bind mount alone does not stop writes to a device node.
                let attempt = std::fs::OpenOptions::new().write(true).open(&readonly).and_then(|file| {
                    std::os::unix::fs::FileExt::write_all_at(&file, b"overwrite", 0)?;
                    file.sync_all()
                });
                assert!(attempt.is_err(), "{label}: a block volume published readonly accepted a write");
                assert_eq!(data::read_at(&readonly, 0, payload.len()), payload, "readonly block data changed");
            }
        }
        steps::unpublish(&driver, &vol, &readonly).await;
        steps::unstage(&driver, &vol, &staging).await;
        steps::controller_unpublish(&driver, &vol).await;
        steps::delete_volume(&driver, &vol).await;
    }
    driver.assert_no_leaks();
}

async fn node_stats_rules(family: &Family) {
    let mut m = Mismatches::new();
    let driver = Driver::start(family, DriverOptions::default()).await;
    let node = driver.node_id().to_owned();
    for access in accesses(family) {
        let label = access.label();
        let name = unique_name("pvc", label);
        let used = steps::provision_and_publish(family, &driver, &name, access, access.small_bytes(family)).await;
        let vol = &used.vol;
        let mut paths = vec![used.target.clone()];
        if !access.is_block() {
            paths.push(used.staging.clone());
        }
        for path in &paths {
            let stats = expect_ok(
                driver.node().node_get_volume_stats(vol.stats_request(path, &used.staging)).await,
                &format!("NodeGetVolumeStats {label} at {}", path.display()),
            );
            let condition = stats
                .volume_condition
                .as_ref()
                .expect("volume_condition MUST be set with the VOLUME_CONDITION node capability");
            assert!(!condition.abnormal, "{label}: healthy volume reported abnormal: {condition:?}");
            assert!(!condition.message.is_empty(), "{label}: volume_condition message is REQUIRED");
            let bytes = stats
                .usage
                .iter()
                .find(|usage| usage.unit == Unit::Bytes as i32)
                .unwrap_or_else(|| panic!("{label}: no BYTES usage in {stats:?}"));
            assert!(bytes.total > 0 && bytes.used >= 0 && bytes.available >= 0, "{label}: {bytes:?}");
            match access {
                Access::Mount(_) => {
                    assert!(bytes.total <= vol.capacity, "{label}: more bytes than the volume: {bytes:?}");
                    assert!(bytes.used + bytes.available <= bytes.total, "{label}: {bytes:?}");
                    let inodes = stats
                        .usage
                        .iter()
                        .find(|usage| usage.unit == Unit::Inodes as i32)
                        .unwrap_or_else(|| panic!("{label}: no INODES usage in {stats:?}"));
                    assert!(inodes.total > 0 && inodes.used > 0, "{label}: {inodes:?}");
                }
                Access::Block => assert_eq!(bytes.total, vol.capacity, "{label}: block total"),
            }
        }
        if let Access::Mount(_) = access {
            let before = expect_ok(
                driver.node().node_get_volume_stats(vol.stats_request(&used.target, &used.staging)).await,
                "NodeGetVolumeStats",
            );
            data::write_synced(&used.target.join("filler.bin"), &data::pattern(41, 4 * MIB as usize));
            let after = expect_ok(
                driver.node().node_get_volume_stats(vol.stats_request(&used.target, &used.staging)).await,
                "NodeGetVolumeStats after writing 4 MiB",
            );
            let used_bytes = |stats: &ferrovol_e2e::csi::NodeGetVolumeStatsResponse| {
                stats.usage.iter().find(|u| u.unit == Unit::Bytes as i32).map(|u| u.used).unwrap_or(0)
            };
            assert!(
                used_bytes(&after) >= used_bytes(&before) + 3 * MIB,
                "{label}: used bytes did not grow after writing 4 MiB"
            );
        }

        let unrelated = driver.staging_dir(&format!("{name}-unrelated"));
        let mut cases: Vec<(String, NodeGetVolumeStatsRequest, Code)> = Vec::new();
        let mut r = vol.stats_request(&used.target, &used.staging);
        r.volume_id.clear();
        cases.push(("no volume_id".into(), r, Code::InvalidArgument));
        let mut r = vol.stats_request(&used.target, &used.staging);
        r.volume_path.clear();
        cases.push(("no volume_path".into(), r, Code::InvalidArgument));
        cases.push((
            "a path where the volume is not".into(),
            vol.stats_request(&unrelated, &used.staging),
            Code::NotFound,
        ));
        cases.push((
            "a path that does not exist".into(),
            vol.stats_request(&driver.sandbox.work_dir().join("no/such/path"), &used.staging),
            Code::NotFound,
        ));
        let mut ids = vec![family.unknown_volume_id(&node)];
        ids.extend(malformed_volume_ids(family, &node));
        for id in ids {
            let mut r = vol.stats_request(&used.target, &used.staging);
            r.volume_id = id.clone();
            cases.push((format!("volume {:?}", short(&id)), r, Code::NotFound));
        }
        for (what, request, code) in cases {
            m.code(
                driver.node().node_get_volume_stats(request).await,
                &[code],
                &format!("NodeGetVolumeStats {label} with {what}"),
            );
        }
        steps::teardown(&driver, &used).await;
    }
    driver.assert_no_leaks();
    m.assert_none();
}

async fn node_expand_rules(family: &Family) {
    let mut m = Mismatches::new();
    let driver = Driver::start(family, DriverOptions::default()).await;
    let node = driver.node_id().to_owned();
    let fs = first_fs(family);
    let access = Access::Mount(fs);
    let name = unique_name("pvc", "nodeexpand");
    let used = steps::provision_and_publish(family, &driver, &name, access, fs.small_bytes()).await;
    let vol = &used.vol;
    // Already big enough: the spec says SHOULD reply OK.
    let answer = expect_ok(
        driver.node().node_expand_volume(vol.node_expand_request(&used.target, &used.staging, vol.capacity)).await,
        "NodeExpandVolume to the current size",
    );
    assert!(
        answer.capacity_bytes == 0 || answer.capacity_bytes >= vol.capacity,
        "NodeExpandVolume answered {} for a {}-byte volume",
        answer.capacity_bytes,
        vol.capacity
    );
    let valid = vol.node_expand_request(&used.target, &used.staging, vol.capacity);
    let mut cases: Vec<(String, NodeExpandVolumeRequest, Vec<Code>)> = Vec::new();
    let mut r = valid.clone();
    r.volume_id.clear();
    cases.push(("no volume_id".into(), r, vec![Code::InvalidArgument]));
    let mut r = valid.clone();
    r.volume_path.clear();
    cases.push(("no volume_path".into(), r, vec![Code::InvalidArgument]));
    let mut r = valid.clone();
    r.volume_capability = Some(capability(access, Mode::MultiNodeMultiWriter));
    cases.push(("a capability the volume does not support".into(), r, vec![Code::InvalidArgument]));
    let mut r = valid.clone();
    r.capacity_range = range(vol.capacity + 64 * MIB, vol.capacity + 32 * MIB);
    cases.push(("limit_bytes < required_bytes".into(), r, vec![Code::OutOfRange]));
    let mut ids = vec![family.unknown_volume_id(&node)];
    ids.extend(malformed_volume_ids(family, &node));
    for id in ids {
        let mut r = valid.clone();
        r.volume_id = id.clone();
        cases.push((format!("volume {:?}", short(&id)), r, vec![Code::NotFound]));
    }
    for (what, request, codes) in cases {
        m.code(driver.node().node_expand_volume(request).await, &codes, &format!("NodeExpandVolume with {what}"));
    }
    steps::teardown(&driver, &used).await;
    driver.assert_no_leaks();
    m.assert_none();
}

async fn capability_fs_type_is_honoured(family: &Family) {
    let driver = Driver::start(family, DriverOptions::default()).await;
    let mut cases: Vec<(String, CreateVolumeRequest, FsType)> = Vec::new();
    for fs in &family.fs_types {
        // Kubernetes passes the StorageClass fstype in the capability, not in parameters.
        let name = unique_name("pvc", &format!("cap-{}", fs.name()));
        let mut request = create_request(family, &name, Access::Mount(*fs), fs.small_bytes());
        request.parameters.remove("fsType");
        cases.push((name, request, *fs));
    }
    // Neither parameter nor capability: ext4.
    let name = unique_name("pvc", "default-fs");
    let mut request = create_request(family, &name, Access::Mount(FsType::Ext4), FsType::Ext4.small_bytes());
    request.parameters.remove("fsType");
    request.volume_capabilities = vec![mount_capability("", Mode::SingleNodeWriter)];
    cases.push((name, request, FsType::Ext4));

    for (name, request, fs) in cases {
        let cap = request.volume_capabilities[0].clone();
        let mut vol = steps::create_volume(family, &driver, request, Access::Mount(fs)).await;
        vol.capability = cap;
        steps::controller_publish(&driver, &mut vol).await;
        let staging = driver.staging_dir(&name);
        steps::stage(&driver, &vol, &staging).await;
        let mounted = kernel::mount_at(&staging).expect("staged");
        assert_eq!(mounted.fs_type, fs.name(), "{name}: staged with the wrong filesystem");
        steps::unstage(&driver, &vol, &staging).await;
        steps::controller_unpublish(&driver, &vol).await;
        steps::delete_volume(&driver, &vol).await;
    }
    driver.assert_no_leaks();
}

async fn ephemeral_inline_volume(family: &Family) {
    let mut m = Mismatches::new();
    let driver = Driver::start(family, DriverOptions::default()).await;
    let before = data_files(&driver);
    let fs = FsType::Ext4;
    let volume_id = format!("csi-{:016x}{:08x}", 0x5eed_u64 * u64::from(std::process::id()), 7);
    let target = driver.target_path("inline");
    let context = HashMap::from([
        ("csi.storage.k8s.io/ephemeral".to_owned(), "true".to_owned()),
        ("csi.storage.k8s.io/pod.name".to_owned(), "web-0".to_owned()),
        ("csi.storage.k8s.io/pod.namespace".to_owned(), "e2e".to_owned()),
        ("csi.storage.k8s.io/pod.uid".to_owned(), "0a1b2c3d-0000-4000-8000-000000000000".to_owned()),
        ("csi.storage.k8s.io/serviceAccount.name".to_owned(), "default".to_owned()),
        ("size".to_owned(), "64Mi".to_owned()),
        ("fsType".to_owned(), fs.name().to_owned()),
    ]);
    let request = NodePublishVolumeRequest {
        volume_id: volume_id.clone(),
        target_path: path_string(&target),
        volume_capability: Some(mount_capability(fs.name(), Mode::SingleNodeWriter)),
        volume_context: context.clone(),
        ..Default::default()
    };
    expect_ok(driver.node().node_publish_volume(request.clone()).await, "NodePublishVolume of an inline volume");
    expect_ok(
        driver.node().node_publish_volume(request.clone()).await,
        "NodePublishVolume of an inline volume repeated",
    );
    let mounts = kernel::mounts_at(&target);
    assert_eq!(mounts.len(), 1, "inline volume mounts at the target: {mounts:#?}");
    assert_eq!(mounts[0].fs_type, fs.name());
    let total = data::fs_total_bytes(&target);
    assert!(total <= 64 * MIB as u64 && total > 32 * MIB as u64, "inline volume of 64Mi holds {total} bytes");
    let payload = data::pattern(51, 128 * 1024);
    data::write_synced(&target.join("inline.bin"), &payload);
    data::assert_content(&target.join("inline.bin"), &payload, "inline volume data");
    expect_ok(
        driver
            .node()
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: volume_id.clone(),
                volume_path: path_string(&target),
                staging_target_path: String::new(),
            })
            .await,
        "NodeGetVolumeStats of an inline volume",
    );
    let unpublish = NodeUnpublishVolumeRequest { volume_id: volume_id.clone(), target_path: path_string(&target) };
    expect_ok(driver.node().node_unpublish_volume(unpublish.clone()).await, "NodeUnpublishVolume of an inline volume");
    // Idempotent: a retry (say, after a lost answer) must also succeed.
    m.ok(driver.node().node_unpublish_volume(unpublish).await, "NodeUnpublishVolume of an inline volume repeated");
    assert!(std::fs::symlink_metadata(&target).is_err(), "inline target path left behind");
    driver.assert_no_leaks();
    family.assert_no_leftover_storage(&driver);
    // What stays is only the day-long tombstone that lets a repeated unpublish answer OK.
    let (tombstones, rest): (Vec<_>, Vec<_>) = data_files(&driver).into_iter().partition(is_tombstone);
    assert_eq!(tombstones.len(), 1, "one tombstone for the deleted inline volume: {tombstones:?}");
    assert_eq!(
        rest.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
        before,
        "an inline volume left files after NodeUnpublishVolume"
    );

    let mut bad = request.clone();
    bad.volume_id = format!("{volume_id}-bad");
    bad.target_path = path_string(&driver.target_path("inline-bad"));
    bad.volume_context.insert("size".to_owned(), "64Potatoes".to_owned());
    m.code(
        driver.node().node_publish_volume(bad).await,
        &[Code::InvalidArgument],
        "NodePublishVolume of an inline volume with size 64Potatoes",
    );
    driver.assert_no_leaks();
    let after: std::collections::BTreeMap<_, _> =
        data_files(&driver).into_iter().filter(|f| !is_tombstone(f)).collect();
    assert_eq!(after, before, "a failed inline publish left files");
    m.assert_none();
}

// ---------------------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------------------

async fn parallel_create_same_name(family: &Family) {
    let driver = Driver::start(family, DriverOptions::default()).await;
    let access = accesses(family)[0];
    let name = unique_name("pvc", "race");
    let request = create_request(family, &name, access, access.small_bytes(family));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let mut controller = driver.controller();
        let request = request.clone();
        tasks.spawn(async move { controller.create_volume(request).await });
    }
    let mut ids = HashSet::new();
    while let Some(result) = tasks.join_next().await {
        if let Some(answer) =
            expect_ok_or(result.expect("task ran"), &[Code::Aborted], "parallel CreateVolume with one name")
        {
            ids.insert(answer.volume.expect("volume").volume_id);
        }
    }
    assert!(ids.len() <= 1, "parallel CreateVolume with one name made several volumes: {ids:?}");
    let vol = steps::create_volume(family, &driver, request, access).await;
    if let Some(id) = ids.iter().next() {
        assert_eq!(id, &vol.id, "the winner of the race and the retry name different volumes");
    }
    assert_eq!(list_volume_ids(&driver).await, vec![vol.id.clone()], "exactly one volume exists");

    // Different names in parallel all succeed.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..6 {
        let mut controller = driver.controller();
        let request =
            create_request(family, &unique_name("pvc", &format!("par{i}")), access, access.small_bytes(family));
        tasks.spawn(async move { controller.create_volume(request).await });
    }
    let mut made = vec![vol];
    while let Some(result) = tasks.join_next().await {
        let answer = expect_ok(result.expect("task ran"), "parallel CreateVolume with different names");
        let volume = answer.volume.expect("volume");
        made.push(Vol::new(&volume, access, Mode::SingleNodeWriter));
    }
    assert_eq!(list_volume_ids(&driver).await.len(), 7, "seven volumes exist");
    for vol in &made {
        steps::delete_volume(&driver, vol).await;
    }
    assert!(list_volume_ids(&driver).await.is_empty());
    family.assert_no_leftover_storage(&driver);
}

async fn parallel_node_calls_same_volume(family: &Family) {
    let driver = Driver::start(family, DriverOptions::default()).await;
    let fs = first_fs(family);
    let access = Access::Mount(fs);
    let name = unique_name("pvc", "nodes-race");
    let mut vol = steps::create_simple(family, &driver, &name, access, fs.small_bytes()).await;
    steps::controller_publish(&driver, &mut vol).await;
    let staging = driver.staging_dir(&name);
    let target = driver.target_path(&name);

    async fn race<F, Fut, T>(what: &str, n: usize, call: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>> + Send + 'static,
        T: Send + 'static,
    {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            tasks.spawn(call());
        }
        while let Some(result) = tasks.join_next().await {
            expect_ok_or(result.expect("task ran"), &[Code::Aborted], what);
        }
    }

    race("parallel NodeStageVolume", 6, || {
        let mut node = driver.node();
        let request = vol.stage_request(&staging);
        async move { node.node_stage_volume(request).await }
    })
    .await;
    steps::stage(&driver, &vol, &staging).await; // also asserts a single mount
    race("parallel NodePublishVolume", 6, || {
        let mut node = driver.node();
        let request = vol.publish_request(&staging, &target, false);
        async move { node.node_publish_volume(request).await }
    })
    .await;
    steps::publish(&driver, &vol, &staging, &target, false).await;
    race("parallel NodeUnpublishVolume", 6, || {
        let mut node = driver.node();
        let request = vol.unpublish_request(&target);
        async move { node.node_unpublish_volume(request).await }
    })
    .await;
    steps::unpublish(&driver, &vol, &target).await;
    race("parallel NodeUnstageVolume", 6, || {
        let mut node = driver.node();
        let request = vol.unstage_request(&staging);
        async move { node.node_unstage_volume(request).await }
    })
    .await;
    steps::unstage(&driver, &vol, &staging).await;
    steps::controller_unpublish(&driver, &vol).await;
    steps::delete_volume(&driver, &vol).await;
    driver.assert_no_leaks();
}

// ---------------------------------------------------------------------------------------
// IDs that try to escape the data dir
// ---------------------------------------------------------------------------------------

/// Plants files a driver must never touch in the directories around the data dir.
fn plant_victims(driver: &Driver) -> Vec<PathBuf> {
    let mut planted = Vec::new();
    for dir in driver.sandbox.fence_dirs() {
        for name in ["victim", "victim.img", "victim.json", "victim.meta"] {
            let path = dir.join(name);
            std::fs::write(&path, b"do not touch").expect("plant a victim file");
            planted.push(path);
        }
        let inner = dir.join("victim.d");
        std::fs::create_dir_all(&inner).expect("plant a victim dir");
        std::fs::write(inner.join("inner"), b"do not touch").expect("plant a victim file");
        planted.push(inner);
    }
    planted
}

/// Local parts that resolve outside the volume store if joined to a path unchecked. They
/// climb at most four levels, which stays inside the sandbox (see `Sandbox::data_dir`).
fn escaping_locals(driver: &Driver) -> Vec<String> {
    let mut locals = vec![".".to_owned(), "..".to_owned(), "../..".to_owned()];
    for depth in 1..=4 {
        for name in ["victim", "victim.img", "victim.d", "victim.d/inner"] {
            locals.push(format!("{}{name}", "../".repeat(depth)));
        }
    }
    for dir in driver.sandbox.fence_dirs() {
        locals.push(path_string(&dir.join("victim")));
        locals.push(path_string(&dir.join("victim.img")));
        locals.push(path_string(&dir.join("victim.d")));
    }
    locals.push("victim\0.img".to_owned());
    locals.push("a/../../victim".to_owned());
    locals.push("..\\..\\victim".to_owned());
    locals.push("x".repeat(5000));
    locals
}

async fn path_escape_ids_are_not_found(family: &Family) {
    let mut m = Mismatches::new();
    let driver = Driver::start(family, DriverOptions::default()).await;
    let node = driver.node_id().to_owned();
    let fs = first_fs(family);
    let access = Access::Mount(fs);
    // Real objects that a confused driver might hit through `.` or `..`.
    let keeper = steps::create_simple(family, &driver, &unique_name("pvc", "keeper"), access, fs.small_bytes()).await;
    let kept_snapshot = steps::snapshot(family, &driver, &keeper, &unique_name("snapshot", "keeper")).await;
    plant_victims(&driver);
    let root = driver.sandbox.root().to_path_buf();
    let excluded =
        vec![driver.data_dir(), driver.sandbox.log_dir(), driver.sandbox.socket_dir(), driver.sandbox.work_dir()];
    let before = data::tree(&root, &excluded);

    let mut volume_ids = malformed_volume_ids(family, &node);
    let mut snapshot_ids = malformed_snapshot_ids(family, &node);
    for local in escaping_locals(&driver) {
        volume_ids.push(format!("{}{local}", family.volume_id_prefix(&node)));
        snapshot_ids.push(format!("{}{local}", family.snapshot_id_prefix(&node)));
        volume_ids.push(local.clone());
        snapshot_ids.push(local);
    }
    volume_ids.push(format!("{}.vol:..:victim", family.id_tag));
    volume_ids.push(format!("{}.vol:../..:victim", family.id_tag));
    snapshot_ids.push(format!("{}.snap:..:victim", family.id_tag));

    let staging = driver.staging_dir("escape");
    let cap = capability(access, Mode::SingleNodeWriter);
    for (n, id) in volume_ids.iter().enumerate() {
        let label = short(id);
        let not_found = |what: &str| format!("{what} of volume {label:?}");
        // What the controller answers (UNAVAILABLE in a split cluster for an ID of a node
        // that is not registered); the node service judges IDs locally either way.
        let controller_code = unavailable_or(&driver, id, Code::NotFound);
        let mut controller = driver.controller();
        let mut node_client = driver.node();
        expect_ok_for_id(
            &driver,
            id,
            controller.delete_volume(DeleteVolumeRequest { volume_id: id.clone(), secrets: HashMap::new() }).await,
            &not_found("DeleteVolume (unknown IDs answer OK)"),
        );
        m.code(
            controller
                .controller_publish_volume(ControllerPublishVolumeRequest {
                    volume_id: id.clone(),
                    node_id: node.clone(),
                    volume_capability: Some(cap.clone()),
                    ..Default::default()
                })
                .await,
            &[controller_code],
            &not_found("ControllerPublishVolume"),
        );
        let unpublished = controller
            .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: id.clone(),
                node_id: node.clone(),
                ..Default::default()
            })
            .await;
        if controller_code == Code::Unavailable {
            m.code(unpublished, &[Code::Unavailable], &not_found("ControllerUnpublishVolume"));
        } else {
            expect_ok_or(unpublished, &[Code::NotFound], &not_found("ControllerUnpublishVolume"));
        }
        m.code(
            controller
                .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                    volume_id: id.clone(),
                    volume_capabilities: vec![cap.clone()],
                    ..Default::default()
                })
                .await,
            &[controller_code],
            &not_found("ValidateVolumeCapabilities"),
        );
        m.code(
            controller.controller_get_volume(ControllerGetVolumeRequest { volume_id: id.clone() }).await,
            &[controller_code],
            &not_found("ControllerGetVolume"),
        );
        m.code(
            controller
                .controller_expand_volume(ControllerExpandVolumeRequest {
                    volume_id: id.clone(),
                    capacity_range: range(64 * MIB, 0),
                    ..Default::default()
                })
                .await,
            &[controller_code],
            &not_found("ControllerExpandVolume"),
        );
        refused_snapshot(
            &driver,
            &mut m,
            CreateSnapshotRequest {
                source_volume_id: id.clone(),
                name: format!("snapshot-escape-{n}"),
                ..Default::default()
            },
            &[controller_code],
            &not_found("CreateSnapshot"),
        )
        .await;
        let mut clone = create_request(family, &format!("pvc-escape-{n}"), access, fs.small_bytes());
        clone.volume_content_source = volume_source(id);
        refused_create(&driver, &mut m, clone, &[controller_code], &not_found("CreateVolume cloned")).await;
        let listed = expect_ok(
            controller
                .list_snapshots(ListSnapshotsRequest { source_volume_id: id.clone(), ..Default::default() })
                .await,
            &not_found("ListSnapshots by source"),
        );
        assert!(listed.entries.is_empty(), "{}", not_found("ListSnapshots by source listed something"));
        m.code(
            node_client
                .node_stage_volume(NodeStageVolumeRequest {
                    volume_id: id.clone(),
                    staging_target_path: path_string(&staging),
                    volume_capability: Some(cap.clone()),
                    ..Default::default()
                })
                .await,
            &[Code::NotFound],
            &not_found("NodeStageVolume"),
        );
        let target = driver.target_path(&format!("escape-{n}"));
        m.code(
            node_client
                .node_publish_volume(NodePublishVolumeRequest {
                    volume_id: id.clone(),
                    staging_target_path: path_string(&staging),
                    target_path: path_string(&target),
                    volume_capability: Some(cap.clone()),
                    ..Default::default()
                })
                .await,
            &[Code::NotFound],
            &not_found("NodePublishVolume"),
        );
        m.code(
            node_client
                .node_unpublish_volume(NodeUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: path_string(&target),
                })
                .await,
            &[Code::NotFound],
            &not_found("NodeUnpublishVolume"),
        );
        m.code(
            node_client
                .node_unstage_volume(NodeUnstageVolumeRequest {
                    volume_id: id.clone(),
                    staging_target_path: path_string(&staging),
                })
                .await,
            &[Code::NotFound],
            &not_found("NodeUnstageVolume"),
        );
        m.code(
            node_client
                .node_get_volume_stats(NodeGetVolumeStatsRequest {
                    volume_id: id.clone(),
                    volume_path: path_string(&staging),
                    staging_target_path: path_string(&staging),
                })
                .await,
            &[Code::NotFound],
            &not_found("NodeGetVolumeStats"),
        );
        m.code(
            node_client
                .node_expand_volume(NodeExpandVolumeRequest {
                    volume_id: id.clone(),
                    volume_path: path_string(&staging),
                    staging_target_path: path_string(&staging),
                    capacity_range: range(64 * MIB, 0),
                    ..Default::default()
                })
                .await,
            &[Code::NotFound],
            &not_found("NodeExpandVolume"),
        );
    }
    for (n, id) in snapshot_ids.iter().enumerate() {
        let label = short(id);
        let controller_code = unavailable_or(&driver, id, Code::NotFound);
        let mut controller = driver.controller();
        expect_ok_for_id(
            &driver,
            id,
            controller.delete_snapshot(requests::delete_snapshot_request(id)).await,
            &format!("DeleteSnapshot of {label:?} (unknown IDs answer OK)"),
        );
        m.code(
            controller.get_snapshot(GetSnapshotRequest { snapshot_id: id.clone(), secrets: HashMap::new() }).await,
            &[controller_code],
            &format!("GetSnapshot of {label:?}"),
        );
        let by_id = ListSnapshotsRequest { snapshot_id: id.clone(), ..Default::default() };
        if let Some(listed) = expect_ok_for_id(
            &driver,
            id,
            controller.list_snapshots(by_id).await,
            &format!("ListSnapshots by id {label:?}"),
        ) {
            assert!(listed.entries.is_empty(), "ListSnapshots by id {label:?} listed something");
        }
        let mut restore = create_request(family, &format!("pvc-escape-snap-{n}"), access, fs.small_bytes());
        restore.volume_content_source = snapshot_source(id);
        refused_create(&driver, &mut m, restore, &[controller_code], &format!("CreateVolume restored from {label:?}"))
            .await;
    }

    let after = data::tree(&root, &excluded);
    assert_eq!(after, before, "calls with escaping IDs touched files outside the data dir");
    let attached = kernel::loop_devices_under(&root);
    assert!(attached.is_empty(), "calls with escaping IDs attached loop devices: {attached:?}");
    assert!(kernel::mounts_under(&root).is_empty(), "calls with escaping IDs mounted something");
    assert_eq!(list_volume_ids(&driver).await, vec![keeper.id.clone()], "the real volume must survive");
    let listed = list_snapshots(&driver, ListSnapshotsRequest::default(), "ListSnapshots").await;
    assert_eq!(listed, vec![kept_snapshot.clone()], "the real snapshot must survive");
    steps::delete_snapshot(&driver, &kept_snapshot.snapshot_id).await;
    steps::delete_volume(&driver, &keeper).await;
    m.assert_none();
}

/// Sets the mount flags of a mount capability.
fn with_mount_flags(vol: &Vol, flags: &[&str]) -> Vol {
    let mut v = vol.clone();
    if let Some(ferrovol_e2e::csi::volume_capability::AccessType::Mount(m)) = v.capability.access_type.as_mut() {
        m.mount_flags = flags.iter().map(|f| (*f).to_owned()).collect();
    }
    v
}

/// Mount flags from the capability reach both the staging mount and the publication; flags
/// the driver refuses, and options the filesystem refuses, are INVALID_ARGUMENT and leave no
/// loop device, no mount and no staged state behind.
async fn mount_flags(family: &Family) {
    let mut m = Mismatches::new();
    let driver = Driver::start(family, DriverOptions::default()).await;
    for fs in family.fs_types.clone() {
        let access = Access::Mount(fs);
        let name = unique_name("pvc", &format!("flags-{}", fs.name()));
        let mut vol = steps::create_simple(family, &driver, &name, access, access.small_bytes(family)).await;
        steps::controller_publish(&driver, &mut vol).await;
        let staging = driver.staging_dir(&name);
        let refused: [(&[&str], &str); 4] = [
            (&["bind"], "bind (would expose a host path)"),
            (&["noatime,exec"], "two options smuggled into one"),
            (&["bad option"], "whitespace"),
            (&["nosuchoption"], "an option the filesystem does not know"),
        ];
        for (flags, what) in refused {
            let bad = with_mount_flags(&vol, flags);
            m.code(
                driver.node().node_stage_volume(bad.stage_request(&staging)).await,
                &[Code::InvalidArgument],
                &format!("NodeStageVolume {} with mount flag {what}", fs.name()),
            );
            driver.assert_no_leaks();
        }

        let flagged = with_mount_flags(&vol, &["noatime", "noexec"]);
        steps::stage(&driver, &flagged, &staging).await;
        let staged = kernel::mount_at(&staging).expect("staging mount");
        for flag in ["noatime", "noexec"] {
            m.check(
                staged.mount_options.split(',').any(|o| o == flag),
                format!("{}: the staging mount lacks {flag}: {:?}", fs.name(), staged.mount_options),
            );
        }
        let target = driver.target_path(&name);
        steps::publish(&driver, &flagged, &staging, &target, false).await;
        let published = kernel::mount_at(&target).expect("target mount");
        for flag in ["noatime", "noexec"] {
            m.check(
                published.mount_options.split(',').any(|o| o == flag),
                format!("{}: the published mount lacks {flag}: {:?}", fs.name(), published.mount_options),
            );
        }
        steps::unpublish(&driver, &flagged, &target).await;
        steps::unstage(&driver, &flagged, &staging).await;
        steps::controller_unpublish(&driver, &flagged).await;
        steps::delete_volume(&driver, &flagged).await;
    }
    driver.assert_no_leaks();
    m.assert_none();
}
