//! The node agent's side of registration: register with the controller, heartbeat at the
//! interval it asks for, and register again whenever it answers that it does not know this
//! node (it restarted, or the lease ran out while the link was cut). Failures are retried
//! every second and logged once per outage, not once per attempt.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferrovol_core::agent::NodeAgent;
use ferrovol_core::params::VolumeParams;

use ferrovol_proto::agent::v1 as pb;
use pb::registry_client::RegistryClient;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// What the agent announces.
#[derive(Debug, Clone)]
pub struct Announcement {
    pub node_id: String,
    /// host:port where the controller reaches this agent.
    pub address: String,
    pub topology: HashMap<String, String>,
    pub families: Vec<String>,
}

const RETRY: Duration = Duration::from_secs(1);
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A channel to the controller's Registry at `address` (host:port).
pub fn channel(address: &str, tls: ClientTlsConfig) -> Result<Channel, String> {
    Ok(Endpoint::from_shared(format!("https://{address}"))
        .and_then(|e| e.tls_config(tls))
        .map_err(|e| format!("--controller-address {address:?}: {e}"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(CALL_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy())
}

/// This node's free capacity for a default volume, as registration reports it.
async fn capacity(agent: &Arc<dyn NodeAgent>) -> Option<pb::CapacityReport> {
    let params = VolumeParams::parse(&HashMap::new()).ok()?;
    agent.capacity(&params).await.ok().map(|c| crate::wire::capacity_to(&c))
}

/// Registers and heartbeats until the future is dropped.
pub async fn run(channel: Channel, me: Announcement, agent: Arc<dyn NodeAgent>) {
    let mut client = RegistryClient::new(channel);
    let mut interval = Duration::from_secs(2);
    let mut registered = false;
    let mut failing: Option<String> = None;
    loop {
        let outcome = if registered {
            let hb = pb::HeartbeatRequest {
                node_id: me.node_id.clone(),
                address: me.address.clone(),
                capacity: capacity(&agent).await,
            };
            match client.heartbeat(hb).await {
                Ok(_) => Ok(()),
                Err(s) if s.code() == tonic::Code::NotFound => {
                    tracing::info!(
                        "the controller does not know this node (it restarted or the lease ran out); registering again"
                    );
                    registered = false;
                    continue;
                }
                Err(s) => Err(format!("heartbeat: {}", s.message())),
            }
        } else {
            let req = pb::RegisterRequest {
                node_id: me.node_id.clone(),
                address: me.address.clone(),
                topology: me.topology.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                families: me.families.clone(),
                capacity: capacity(&agent).await,
            };
            match client.register(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    if r.heartbeat_interval_ms > 0 {
                        interval = Duration::from_millis(r.heartbeat_interval_ms);
                    }
                    registered = true;
                    tracing::info!(address = %me.address, heartbeat = ?interval, "registered with the controller");
                    Ok(())
                }
                Err(s) => Err(format!("register: {} ({:?})", s.message(), s.code())),
            }
        };
        match outcome {
            Ok(()) => {
                if failing.take().is_some() {
                    tracing::info!("the controller answers again");
                }
                tokio::time::sleep(interval).await;
            }
            Err(e) => {
                let retry = RETRY.min(interval);
                if failing.is_none() {
                    tracing::warn!("cannot reach the controller, retrying every {retry:?}: {e}");
                }
                failing = Some(e);
                tokio::time::sleep(retry).await;
            }
        }
    }
}
