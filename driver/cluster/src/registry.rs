//! The controller's registry of node agents: the Registry gRPC service they register and
//! heartbeat with, and the [`Directory`] the Controller service routes through.
//!
//! It is memory only (the controller keeps no durable state): after a controller restart
//! the agents' next heartbeat is answered NOT_FOUND and they register again, within one
//! heartbeat interval. Until `settle` has passed since start, new volumes are not placed
//! (see `ferrovol_controller`'s placement rules); calls for a node that is not registered
//! answer UNAVAILABLE, which the CSI sidecars retry.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ferrovol_core::agent::{Directory, Member, NodeAgent};
use ferrovol_core::error::{Error, Result};
use ferrovol_core::ids::{printable, NodeId};
use ferrovol_core::TOPOLOGY_NODE_KEY;
use ferrovol_proto::agent::v1 as pb;
use tonic::transport::ClientTlsConfig;
use tonic::{Request, Response, Status};

use crate::remote::RemoteAgent;

/// How the registry times registrations.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How often agents are asked to heartbeat.
    pub heartbeat: Duration,
    /// How long a registration lives without a heartbeat.
    pub lease: Duration,
    /// How long after start the registry waits before new volumes are placed.
    pub settle: Duration,
}

impl Timing {
    /// Lease of five heartbeats; settle of two heartbeats and a second.
    pub fn from_heartbeat(heartbeat: Duration) -> Self {
        Timing { heartbeat, lease: heartbeat * 5, settle: heartbeat * 2 + Duration::from_secs(1) }
    }
}

#[derive(Debug)]
struct Entry {
    member: Member,
    remote: Arc<RemoteAgent>,
    last_seen: Instant,
    /// Free bytes for a default volume, as the agent last reported.
    reported_available: Option<u64>,
}

#[derive(Debug)]
struct Inner {
    nodes: Mutex<BTreeMap<NodeId, Entry>>,
    started: Instant,
    timing: Timing,
    tls: ClientTlsConfig,
}

/// The registry: clone it freely, all clones share one table.
#[derive(Debug, Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

impl Registry {
    /// `tls` is the controller's client configuration for calling agents.
    pub fn new(timing: Timing, tls: ClientTlsConfig) -> Self {
        Registry { inner: Arc::new(Inner { nodes: Mutex::default(), started: Instant::now(), timing, tls }) }
    }

    fn nodes(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, Entry>> {
        self.inner.nodes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn live(&self, e: &Entry) -> bool {
        e.last_seen.elapsed() <= self.inner.timing.lease
    }

    /// Forgets registrations whose lease ran out, logging each; answers how many.
    pub fn expire(&self) -> usize {
        let lease = self.inner.timing.lease;
        let mut nodes = self.nodes();
        let before = nodes.len();
        nodes.retain(|node, e| {
            let keep = e.last_seen.elapsed() <= lease;
            if !keep {
                tracing::warn!(%node, address = e.remote.address(), "node agent lease expired: no heartbeat for {lease:?}");
            }
            keep
        });
        before - nodes.len()
    }

    /// Registers (or re-registers) an agent.
    fn register(&self, r: &pb::RegisterRequest) -> Result<()> {
        let node = NodeId::parse(&r.node_id)?;
        check_address(&r.address)?;
        if let Some(v) = r.topology.get(TOPOLOGY_NODE_KEY) {
            if v != node.as_str() {
                return Err(Error::invalid(
                    "topology",
                    format!("{TOPOLOGY_NODE_KEY}={:?} contradicts node_id {node}", printable(v)),
                ));
            }
        }
        let mut topology: BTreeMap<String, String> = r.topology.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        topology.insert(TOPOLOGY_NODE_KEY.to_string(), node.to_string());
        let mut nodes = self.nodes();
        let reuse = nodes
            .get(&node)
            .filter(|e| e.remote.address() == r.address && e.member.topology == topology)
            .map(|e| Arc::clone(&e.remote));
        let remote = match reuse {
            Some(remote) => remote,
            None => {
                let remote = Arc::new(RemoteAgent::connect(node.clone(), &r.address, self.inner.tls.clone())?);
                tracing::info!(
                    %node,
                    address = %r.address,
                    version = %printable(&r.version),
                    available = r.capacity.as_ref().map(|c| c.available_bytes),
                    "node agent registered"
                );
                remote
            }
        };
        let agent: Arc<dyn NodeAgent> = remote.clone();
        let reported_available = r.capacity.as_ref().map(|c| c.available_bytes);
        nodes.insert(
            node,
            Entry { member: Member { agent, topology }, remote, last_seen: Instant::now(), reported_available },
        );
        Ok(())
    }

    /// Refreshes a registration; NOT_FOUND when the node is unknown or moved.
    fn heartbeat(&self, r: &pb::HeartbeatRequest) -> Result<(), Status> {
        let node = NodeId::parse(&r.node_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut nodes = self.nodes();
        match nodes.get_mut(&node) {
            Some(e) if e.remote.address() == r.address && e.last_seen.elapsed() <= self.inner.timing.lease => {
                e.last_seen = Instant::now();
                if let Some(c) = &r.capacity {
                    e.reported_available = Some(c.available_bytes);
                }
                Ok(())
            }
            _ => Err(Status::not_found(format!("node {node} is not registered with this controller; register again"))),
        }
    }

    /// The gRPC service agents call (wrap it in a role check: only node certificates).
    pub fn grpc(&self) -> RegistryService {
        RegistryService { registry: self.clone() }
    }

    /// Registered, live nodes with the free bytes each last reported (for logs and tests).
    pub fn live_nodes(&self) -> Vec<(NodeId, Option<u64>)> {
        self.nodes().iter().filter(|(_, e)| self.live(e)).map(|(n, e)| (n.clone(), e.reported_available)).collect()
    }
}

/// An address must be `host:port`, with an IP host: the controller dials exactly what the
/// agent says, and a name would make it depend on a resolver inside the cluster network.
fn check_address(a: &str) -> Result<()> {
    a.parse::<SocketAddr>()
        .map(|_| ())
        .map_err(|_| Error::invalid("address", format!("{:?} is not an IP:port the controller can call", printable(a))))
}

impl Directory for Registry {
    fn agent(&self, node: &NodeId) -> Result<Option<Arc<dyn NodeAgent>>> {
        let nodes = self.nodes();
        match nodes.get(node) {
            Some(e) if self.live(e) => Ok(Some(Arc::clone(&e.member.agent))),
            Some(e) => Err(Error::Unavailable {
                reason: format!(
                    "node {node} has not sent a heartbeat for {:.0?}; its agent is down or cut off",
                    e.last_seen.elapsed()
                ),
            }),
            None => Err(Error::Unavailable {
                reason: format!(
                    "node {node} is not registered with the controller (started {:.0?} ago)",
                    self.inner.started.elapsed()
                ),
            }),
        }
    }

    fn members(&self) -> Vec<Member> {
        self.nodes().values().filter(|e| self.live(e)).map(|e| e.member.clone()).collect()
    }

    fn ready_to_place(&self) -> Result<()> {
        let up = self.inner.started.elapsed();
        if up < self.inner.timing.settle {
            return Err(Error::Unavailable {
                reason: format!(
                    "the controller started {up:.1?} ago and waits {:?} for node agents to register before placing \
                     new volumes",
                    self.inner.timing.settle
                ),
            });
        }
        Ok(())
    }

    fn is_cluster(&self) -> bool {
        true
    }
}

/// The Registry gRPC service.
#[derive(Debug, Clone)]
pub struct RegistryService {
    registry: Registry,
}

#[tonic::async_trait]
impl pb::registry_server::Registry for RegistryService {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let r = req.into_inner();
        self.registry.register(&r).map_err(Status::from)?;
        let t = self.registry.inner.timing;
        Ok(Response::new(pb::RegisterResponse {
            heartbeat_interval_ms: t.heartbeat.as_millis() as u64,
            lease_ms: t.lease.as_millis() as u64,
        }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.registry.heartbeat(&req.into_inner())?;
        Ok(Response::new(pb::HeartbeatResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn registry(heartbeat_ms: u64) -> Registry {
        let mut t = Timing::from_heartbeat(Duration::from_millis(heartbeat_ms));
        t.settle = Duration::from_millis(heartbeat_ms);
        Registry::new(t, ClientTlsConfig::new())
    }

    fn reg(node: &str, address: &str) -> pb::RegisterRequest {
        pb::RegisterRequest { node_id: node.into(), address: address.into(), ..Default::default() }
    }

    #[tokio::test]
    async fn register_heartbeat_and_expiry() {
        let r = registry(20);
        let n1 = NodeId::parse("n1").expect("id");
        assert!(r.agent(&n1).is_err_and(|e| e.code() == ferrovol_core::error::Code::Unavailable));
        assert!(r.ready_to_place().is_err(), "not settled right after start");
        r.register(&reg("n1", "10.0.0.1:9471")).expect("register");
        assert!(r.agent(&n1).expect("live").is_some());
        assert_eq!(r.members().len(), 1);
        assert_eq!(r.members()[0].topology.get(TOPOLOGY_NODE_KEY).map(String::as_str), Some("n1"));
        let hb = |node: &str, address: &str, available: u64| pb::HeartbeatRequest {
            node_id: node.into(),
            address: address.into(),
            capacity: Some(pb::CapacityReport { available_bytes: available, maximum_volume_size: available }),
        };
        r.heartbeat(&hb("n1", "10.0.0.1:9471", 77)).expect("hb");
        assert_eq!(r.live_nodes(), [(n1.clone(), Some(77))], "the heartbeat's capacity is kept");
        let moved = r.heartbeat(&hb("n1", "10.0.0.9:9471", 1));
        assert_eq!(moved.expect_err("moved").code(), tonic::Code::NotFound);
        let unknown = r.heartbeat(&hb("n2", "10.0.0.2:9471", 1));
        assert_eq!(unknown.expect_err("unknown").code(), tonic::Code::NotFound);
        tokio::time::sleep(Duration::from_millis(130)).await;
        assert!(r.ready_to_place().is_ok());
        assert!(r.members().is_empty(), "lease ran out");
        let e = r.agent(&n1).expect_err("down");
        assert!(e.to_string().contains("heartbeat"), "{e}");
        assert_eq!(r.expire(), 1);
    }

    #[test]
    fn bad_registrations_are_refused() {
        let r = registry(1000);
        assert!(r.register(&reg("../x", "10.0.0.1:1")).is_err());
        assert!(r.register(&reg("n1", "example.com:1")).is_err());
        assert!(r.register(&reg("n1", "10.0.0.1")).is_err());
        let mut lying = reg("n1", "10.0.0.1:1");
        lying.topology = HashMap::from([(TOPOLOGY_NODE_KEY.to_string(), "n2".to_string())]);
        assert!(r.register(&lying).is_err());
        assert!(r.members().is_empty());
    }
}
