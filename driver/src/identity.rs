//! The CSI Identity service: plugin name and version, capabilities, and readiness (Probe
//! answers ready only once the start-up reconcile has finished).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ferrovol_node::rpc::{call, Noise};
use ferrovol_proto::csi::v1 as csi;
use tonic::{Request, Response, Status};

use csi::plugin_capability::{service::Type as Service, volume_expansion::Type as Expansion};

/// The Identity service.
#[derive(Debug, Clone)]
pub struct IdentityService {
    name: String,
    ready: Arc<AtomicBool>,
}

impl IdentityService {
    pub fn new(name: String, ready: Arc<AtomicBool>) -> Self {
        IdentityService { name, ready }
    }
}

fn service(t: Service) -> csi::PluginCapability {
    csi::PluginCapability {
        r#type: Some(csi::plugin_capability::Type::Service(csi::plugin_capability::Service { r#type: t as i32 })),
    }
}

fn expansion(t: Expansion) -> csi::PluginCapability {
    csi::PluginCapability {
        r#type: Some(csi::plugin_capability::Type::VolumeExpansion(csi::plugin_capability::VolumeExpansion {
            r#type: t as i32,
        })),
    }
}

#[tonic::async_trait]
impl csi::identity_server::Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _req: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        call("GetPluginInfo", "", Noise::Query, async {
            Ok(csi::GetPluginInfoResponse {
                name: self.name.clone(),
                vendor_version: env!("CARGO_PKG_VERSION").to_string(),
                manifest: Default::default(),
            })
        })
        .await
    }

    async fn get_plugin_capabilities(
        &self,
        _req: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        call("GetPluginCapabilities", "", Noise::Query, async {
            Ok(csi::GetPluginCapabilitiesResponse {
                capabilities: vec![
                    service(Service::ControllerService),
                    service(Service::VolumeAccessibilityConstraints),
                    expansion(Expansion::Online),
                    expansion(Expansion::Offline),
                ],
            })
        })
        .await
    }

    async fn probe(&self, _req: Request<csi::ProbeRequest>) -> Result<Response<csi::ProbeResponse>, Status> {
        call("Probe", "", Noise::Query, async {
            Ok(csi::ProbeResponse { ready: Some(self.ready.load(Ordering::Acquire)) })
        })
        .await
    }
}
