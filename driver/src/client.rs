//! Operator client subcommands (in the spirit of gocsi's `csc`): create, delete, list,
//! inspect, publish, unpublish, snapshot, expand, stats and probe against any CSI endpoint.
//! `publish` and `unpublish` make the whole sequence a CO would (ControllerPublish, NodeStage,
//! NodePublish and back), so a volume can be used by hand without Kubernetes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use ferrovol_core::params::parse_quantity;
use ferrovol_proto::csi::v1 as csi;
use tonic::transport::Channel;

use crate::endpoint::Endpoint;
use csi::controller_client::ControllerClient;
use csi::identity_client::IdentityClient;
use csi::node_client::NodeClient;

#[derive(Debug, Args)]
pub struct Target {
    /// The driver's endpoint.
    #[arg(long, env = "CSI_ENDPOINT", default_value = crate::DEFAULT_ENDPOINT, global = true)]
    endpoint: Endpoint,
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Ask whether the driver is ready, with its name, version and node.
    Probe {
        #[command(flatten)]
        target: Target,
    },
    /// Create a volume (CreateVolume).
    Create {
        /// The volume's name (the idempotency key), e.g. pvc-demo.
        name: String,
        /// Size, e.g. 1Gi or 512Mi.
        #[arg(long, default_value = "1Gi")]
        size: String,
        /// Filesystem for mount access (the driver's default, ext4, if not given; a restore
        /// or clone keeps its source's).
        #[arg(long)]
        fs_type: Option<String>,
        /// Create it for raw block access.
        #[arg(long)]
        block: bool,
        /// Restore from this snapshot ID.
        #[arg(long, conflicts_with = "from_volume")]
        from_snapshot: Option<String>,
        /// Clone this volume ID.
        #[arg(long)]
        from_volume: Option<String>,
        /// Extra StorageClass parameters, KEY=VALUE (repeatable).
        #[arg(long = "param", value_parser = parse_kv)]
        params: Vec<(String, String)>,
        #[command(flatten)]
        target: Target,
    },
    /// Delete a volume (DeleteVolume).
    Delete {
        volume_id: String,
        #[command(flatten)]
        target: Target,
    },
    /// List volumes, or snapshots with --snapshots.
    List {
        #[arg(long)]
        snapshots: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Show one volume with its status (ControllerGetVolume).
    Inspect {
        volume_id: String,
        #[command(flatten)]
        target: Target,
    },
    /// Attach, stage and publish a volume at a path on this node.
    Publish {
        volume_id: String,
        /// Where the volume appears (a directory, or a file for --block).
        #[arg(long)]
        target_path: PathBuf,
        /// Staging directory (default: TARGET_PATH.staging).
        #[arg(long)]
        staging_path: Option<PathBuf>,
        #[arg(long)]
        block: bool,
        #[arg(long)]
        readonly: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Unpublish, unstage and detach a volume.
    Unpublish {
        volume_id: String,
        #[arg(long)]
        target_path: PathBuf,
        #[arg(long)]
        staging_path: Option<PathBuf>,
        #[command(flatten)]
        target: Target,
    },
    /// Snapshot a volume (CreateSnapshot).
    Snapshot {
        volume_id: String,
        /// The snapshot's name, e.g. snapshot-demo.
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Delete a snapshot (DeleteSnapshot).
    DeleteSnapshot {
        snapshot_id: String,
        #[command(flatten)]
        target: Target,
    },
    /// Grow a volume (ControllerExpandVolume, then NodeExpandVolume when --path is given).
    Expand {
        volume_id: String,
        #[arg(long)]
        size: String,
        /// Where the volume is staged or published, to grow its filesystem online.
        #[arg(long)]
        path: Option<PathBuf>,
        #[command(flatten)]
        target: Target,
    },
    /// Usage and condition of a staged or published volume (NodeGetVolumeStats).
    Stats {
        volume_id: String,
        #[arg(long)]
        path: PathBuf,
        #[command(flatten)]
        target: Target,
    },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

fn capability(block: bool, fs_type: &str) -> csi::VolumeCapability {
    use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
    csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32 }),
        access_type: Some(if block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume { fs_type: fs_type.to_string(), ..Default::default() })
        }),
    }
}

fn size_bytes(s: &str) -> Result<i64, String> {
    let n = parse_quantity(s, "size").map_err(|e| e.to_string())?;
    i64::try_from(n).map_err(|_| format!("{s} is too large"))
}

fn staging_for(target: &std::path::Path, given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| {
        let mut s = target.as_os_str().to_owned();
        s.push(".staging");
        PathBuf::from(s)
    })
}

fn describe_volume(v: &csi::Volume) -> String {
    let source = match v.content_source.as_ref().and_then(|s| s.r#type.as_ref()) {
        Some(csi::volume_content_source::Type::Snapshot(s)) => format!(" from snapshot {}", s.snapshot_id),
        Some(csi::volume_content_source::Type::Volume(s)) => format!(" cloned from {}", s.volume_id),
        None => String::new(),
    };
    format!("{} {} bytes{source}", v.volume_id, v.capacity_bytes)
}

/// Runs a client command; prints what happened, one line per step.
pub async fn execute(cmd: ClientCommand) -> ExitCode {
    match run(cmd).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrovol: {e}");
            ExitCode::FAILURE
        }
    }
}

fn status(what: &str) -> impl Fn(tonic::Status) -> String + '_ {
    move |s| format!("{what}: {:?}: {}", s.code(), s.message())
}

async fn channel(t: &Target) -> Result<Channel, String> {
    t.endpoint.connect().await.map_err(|e| format!("cannot connect to {}: {e}", t.endpoint))
}

async fn run(cmd: ClientCommand) -> Result<(), String> {
    match cmd {
        ClientCommand::Probe { target } => {
            let ch = channel(&target).await?;
            let mut id = IdentityClient::new(ch.clone());
            let info =
                id.get_plugin_info(csi::GetPluginInfoRequest {}).await.map_err(status("GetPluginInfo"))?.into_inner();
            let ready =
                id.probe(csi::ProbeRequest {}).await.map_err(status("Probe"))?.into_inner().ready.unwrap_or(true);
            let node = NodeClient::new(ch)
                .node_get_info(csi::NodeGetInfoRequest {})
                .await
                .map_err(status("NodeGetInfo"))?
                .into_inner();
            println!("{} {} node={} ready={ready}", info.name, info.vendor_version, node.node_id);
            if !ready {
                return Err("the driver is not ready yet".into());
            }
        }
        ClientCommand::Create { name, size, fs_type, block, from_snapshot, from_volume, params, target } => {
            use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
            let mut parameters: HashMap<String, String> = params.into_iter().collect();
            if let (false, Some(fs)) = (block, fs_type) {
                parameters.entry("fsType".into()).or_insert(fs);
            }
            let source = match (from_snapshot, from_volume) {
                (Some(s), _) => {
                    Some(csi::VolumeContentSource { r#type: Some(Type::Snapshot(SnapshotSource { snapshot_id: s })) })
                }
                (None, Some(v)) => {
                    Some(csi::VolumeContentSource { r#type: Some(Type::Volume(VolumeSource { volume_id: v })) })
                }
                (None, None) => None,
            };
            let req = csi::CreateVolumeRequest {
                name,
                capacity_range: Some(csi::CapacityRange { required_bytes: size_bytes(&size)?, limit_bytes: 0 }),
                volume_capabilities: vec![capability(block, "")],
                parameters,
                volume_content_source: source,
                ..Default::default()
            };
            let v = ControllerClient::new(channel(&target).await?)
                .create_volume(req)
                .await
                .map_err(status("CreateVolume"))?
                .into_inner();
            let v = v.volume.ok_or("CreateVolume answered no volume")?;
            println!("created {}", describe_volume(&v));
        }
        ClientCommand::Delete { volume_id, target } => {
            ControllerClient::new(channel(&target).await?)
                .delete_volume(csi::DeleteVolumeRequest { volume_id: volume_id.clone(), ..Default::default() })
                .await
                .map_err(status("DeleteVolume"))?;
            println!("deleted {volume_id}");
        }
        ClientCommand::List { snapshots, target } => {
            let mut c = ControllerClient::new(channel(&target).await?);
            if snapshots {
                let r = c
                    .list_snapshots(csi::ListSnapshotsRequest::default())
                    .await
                    .map_err(status("ListSnapshots"))?
                    .into_inner();
                for e in r.entries.into_iter().filter_map(|e| e.snapshot) {
                    println!(
                        "{} of {} {} bytes ready={}",
                        e.snapshot_id, e.source_volume_id, e.size_bytes, e.ready_to_use
                    );
                }
            } else {
                let r = c
                    .list_volumes(csi::ListVolumesRequest::default())
                    .await
                    .map_err(status("ListVolumes"))?
                    .into_inner();
                for e in r.entries {
                    let v = e.volume.unwrap_or_default();
                    let st = e.status.unwrap_or_default();
                    let cond = st.volume_condition.map(|c| {
                        if c.abnormal {
                            format!("ABNORMAL: {}", c.message)
                        } else {
                            "healthy".into()
                        }
                    });
                    println!(
                        "{} published-to=[{}] {}",
                        describe_volume(&v),
                        st.published_node_ids.join(","),
                        cond.unwrap_or_default()
                    );
                }
            }
        }
        ClientCommand::Inspect { volume_id, target } => {
            let r = ControllerClient::new(channel(&target).await?)
                .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id })
                .await
                .map_err(status("ControllerGetVolume"))?
                .into_inner();
            let v = r.volume.unwrap_or_default();
            let st = r.status.unwrap_or_default();
            println!("{}", describe_volume(&v));
            println!("  context: {:?}", v.volume_context);
            println!("  topology: {:?}", v.accessible_topology.iter().map(|t| &t.segments).collect::<Vec<_>>());
            println!("  published to: [{}]", st.published_node_ids.join(", "));
            if let Some(c) = st.volume_condition {
                println!("  condition: {}{}", if c.abnormal { "ABNORMAL " } else { "" }, c.message);
            }
        }
        ClientCommand::Publish { volume_id, target_path, staging_path, block, readonly, target } => {
            let ch = channel(&target).await?;
            let mut node = NodeClient::new(ch.clone());
            let node_id = node
                .node_get_info(csi::NodeGetInfoRequest {})
                .await
                .map_err(status("NodeGetInfo"))?
                .into_inner()
                .node_id;
            let vol = ControllerClient::new(ch.clone())
                .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: volume_id.clone() })
                .await
                .map_err(status("ControllerGetVolume"))?
                .into_inner();
            let fs = vol.volume.and_then(|v| v.volume_context.get("fsType").cloned()).unwrap_or_default();
            let cap = capability(block, &fs);
            let ctx = ControllerClient::new(ch)
                .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                    volume_id: volume_id.clone(),
                    node_id: node_id.clone(),
                    volume_capability: Some(cap.clone()),
                    readonly,
                    ..Default::default()
                })
                .await
                .map_err(status("ControllerPublishVolume"))?
                .into_inner()
                .publish_context;
            println!("attached {volume_id} to node {node_id}");
            let staging = staging_for(&target_path, staging_path);
            std::fs::create_dir_all(&staging).map_err(|e| format!("creating {}: {e}", staging.display()))?;
            node.node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: volume_id.clone(),
                publish_context: ctx.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await
            .map_err(status("NodeStageVolume"))?;
            println!("staged {volume_id} at {}", staging.display());
            node.node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: volume_id.clone(),
                publish_context: ctx,
                staging_target_path: staging.display().to_string(),
                target_path: target_path.display().to_string(),
                volume_capability: Some(cap),
                readonly,
                ..Default::default()
            })
            .await
            .map_err(status("NodePublishVolume"))?;
            println!("published {volume_id} at {}", target_path.display());
        }
        ClientCommand::Unpublish { volume_id, target_path, staging_path, target } => {
            let ch = channel(&target).await?;
            let mut node = NodeClient::new(ch.clone());
            let node_id = node
                .node_get_info(csi::NodeGetInfoRequest {})
                .await
                .map_err(status("NodeGetInfo"))?
                .into_inner()
                .node_id;
            node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: volume_id.clone(),
                target_path: target_path.display().to_string(),
            })
            .await
            .map_err(status("NodeUnpublishVolume"))?;
            println!("unpublished {volume_id} from {}", target_path.display());
            let staging = staging_for(&target_path, staging_path);
            node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: volume_id.clone(),
                staging_target_path: staging.display().to_string(),
            })
            .await
            .map_err(status("NodeUnstageVolume"))?;
            println!("unstaged {volume_id} from {}", staging.display());
            ControllerClient::new(ch)
                .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                    volume_id: volume_id.clone(),
                    node_id: node_id.clone(),
                    ..Default::default()
                })
                .await
                .map_err(status("ControllerUnpublishVolume"))?;
            println!("detached {volume_id} from node {node_id}");
        }
        ClientCommand::Snapshot { volume_id, name, target } => {
            let s = ControllerClient::new(channel(&target).await?)
                .create_snapshot(csi::CreateSnapshotRequest { source_volume_id: volume_id, name, ..Default::default() })
                .await
                .map_err(status("CreateSnapshot"))?
                .into_inner()
                .snapshot
                .ok_or("CreateSnapshot answered no snapshot")?;
            println!(
                "snapshot {} of {} ({} bytes, ready={})",
                s.snapshot_id, s.source_volume_id, s.size_bytes, s.ready_to_use
            );
        }
        ClientCommand::DeleteSnapshot { snapshot_id, target } => {
            ControllerClient::new(channel(&target).await?)
                .delete_snapshot(csi::DeleteSnapshotRequest { snapshot_id: snapshot_id.clone(), ..Default::default() })
                .await
                .map_err(status("DeleteSnapshot"))?;
            println!("deleted snapshot {snapshot_id}");
        }
        ClientCommand::Expand { volume_id, size, path, target } => {
            let ch = channel(&target).await?;
            let bytes = size_bytes(&size)?;
            let r = ControllerClient::new(ch.clone())
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: volume_id.clone(),
                    capacity_range: Some(csi::CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
                    ..Default::default()
                })
                .await
                .map_err(status("ControllerExpandVolume"))?
                .into_inner();
            println!(
                "expanded {volume_id} to {} bytes (node expansion required: {})",
                r.capacity_bytes, r.node_expansion_required
            );
            if let (Some(p), true) = (path, r.node_expansion_required) {
                let n = NodeClient::new(ch)
                    .node_expand_volume(csi::NodeExpandVolumeRequest {
                        volume_id: volume_id.clone(),
                        volume_path: p.display().to_string(),
                        capacity_range: Some(csi::CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
                        ..Default::default()
                    })
                    .await
                    .map_err(status("NodeExpandVolume"))?
                    .into_inner();
                println!("grew the filesystem of {volume_id} online at {} ({} bytes)", p.display(), n.capacity_bytes);
            }
        }
        ClientCommand::Stats { volume_id, path, target } => {
            let r = NodeClient::new(channel(&target).await?)
                .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                    volume_id,
                    volume_path: path.display().to_string(),
                    ..Default::default()
                })
                .await
                .map_err(status("NodeGetVolumeStats"))?
                .into_inner();
            for u in r.usage {
                let unit = if u.unit == csi::volume_usage::Unit::Inodes as i32 { "inodes" } else { "bytes" };
                println!("{unit}: total={} used={} available={}", u.total, u.used, u.available);
            }
            if let Some(c) = r.volume_condition {
                println!("condition: {}{}", if c.abnormal { "ABNORMAL " } else { "" }, c.message);
            }
        }
    }
    Ok(())
}
