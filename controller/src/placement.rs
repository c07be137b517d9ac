//! Where a new volume goes: the node agents the accessibility requirements admit, in the
//! order the CO prefers them, each asked in turn until one has the capacity; and the rules
//! that keep a repeated CreateVolume from making a second volume on another node.
//!
//! The decisions, in order:
//! 1. The directory must be settled (after a controller start, one lease for the live agents
//!    to register again): otherwise a repeat could miss the volume a first attempt made.
//! 2. A name whose creation on some node has an unknown outcome (that node stopped answering
//!    mid-call) is not placed anywhere else until that node is back.
//! 3. With more than one live agent, every agent is asked whether it already holds the
//!    volume (its ID is known: family, node and the name's local part); a repeat goes to
//!    that node, and an agent that cannot answer makes the call UNAVAILABLE, not a guess.
//! 4. Candidates are the agents a requisite segment admits (all agents without requisite),
//!    ordered by the preferred segments first, then by a rendezvous hash of the name, so a
//!    retry picks the same node as long as the membership is the same.
//! 5. Each candidate is asked to create the volume; one that lacks the capacity (or does not
//!    serve the family) passes the request to the next. All refusals are reported.

use std::collections::BTreeMap;
use std::sync::Arc;

use ferrovol_core::agent::{Member, NewVolume, NodeAgent};
use ferrovol_core::error::{Code, Error, Result};
use ferrovol_core::ids::{printable, NodeId, VolumeId};
use ferrovol_core::volume::VolumeRecord;
use ferrovol_core::TOPOLOGY_NODE_KEY;
use ferrovol_proto::csi::v1 as csi;
use sha2::{Digest, Sha256};

use crate::service::ControllerService;

/// Whether a topology segment admits a node with these segments: every key it names must
/// be one the node has, with the same value.
pub(crate) fn admits(segment: &csi::Topology, topology: &BTreeMap<String, String>) -> bool {
    segment.segments.iter().all(|(k, v)| topology.get(k) == Some(v))
}

/// A stable pseudo-random rank of `node` for `name` (rendezvous hashing): the same name
/// ranks the same nodes in the same order whatever else is registered.
fn rank(name: &str, node: &NodeId) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([0]);
    h.update(node.as_str().as_bytes());
    h.finalize().into()
}

/// The candidates in the order they are asked.
pub(crate) fn order(name: &str, members: Vec<Member>, req: Option<&csi::TopologyRequirement>) -> Vec<Member> {
    let mut rest: Vec<Member> = match req {
        Some(t) if !t.requisite.is_empty() => {
            members.into_iter().filter(|m| t.requisite.iter().any(|s| admits(s, &m.topology))).collect()
        }
        _ => members,
    };
    rest.sort_by_key(|m| rank(name, m.node()));
    let mut ordered = Vec::with_capacity(rest.len());
    if let Some(t) = req {
        for seg in &t.preferred {
            let (now, later): (Vec<Member>, Vec<Member>) = rest.into_iter().partition(|m| admits(seg, &m.topology));
            ordered.extend(now);
            rest = later;
        }
    }
    ordered.extend(rest);
    ordered
}

/// The nodes a requisite names by our node key that are not registered now.
fn unregistered_nodes(members: &[Member], req: Option<&csi::TopologyRequirement>) -> Vec<String> {
    let Some(t) = req else { return Vec::new() };
    let mut named: Vec<String> = t
        .requisite
        .iter()
        .filter_map(|s| s.segments.get(TOPOLOGY_NODE_KEY))
        .filter(|n| !members.iter().any(|m| m.node().as_str() == n.as_str()))
        .map(|n| printable(n))
        .collect();
    named.sort();
    named.dedup();
    named
}

impl ControllerService {
    /// Places a new volume (see the module's rules) and creates it; answers the record and
    /// the node that holds it.
    pub(crate) async fn place_and_create(
        &self,
        new: NewVolume,
        req: Option<&csi::TopologyRequirement>,
    ) -> Result<(VolumeRecord, NodeId)> {
        let volume = printable(&new.name);
        self.directory.ready_to_place()?;
        let members = self.directory.members();
        if members.is_empty() {
            return Err(Error::Unavailable {
                reason: format!("no node agent is registered, so {volume:?} cannot be placed yet"),
            });
        }
        let pending = self.uncertain().get(&new.name).cloned();
        if let Some(node) = &pending {
            if !members.iter().any(|m| m.node() == node) {
                return Err(Error::Unavailable {
                    reason: format!(
                        "an earlier attempt to create {volume:?} on node {node} has an unknown outcome; \
                         waiting for node {node} to register again before placing it anywhere"
                    ),
                });
            }
        }
        // A source pins the volume to the source's node: restores and clones are local copies.
        let source_node = match &new.source {
            Some(ferrovol_core::agent::Source::Snapshot(id)) => Some(id.node().clone()),
            Some(ferrovol_core::agent::Source::Volume(id)) => Some(id.node().clone()),
            None => None,
        };
        let existing = if members.len() > 1 { self.holder(&new, &members).await? } else { None };
        let mut candidates = match (existing, &source_node, pending) {
            (Some(m), _, _) => {
                // The spec: a repeat is OK only if the existing volume is accessible from the
                // requirements; one on a node the requisite excludes is not compatible.
                if let Some(t) = req.filter(|t| !t.requisite.is_empty()) {
                    if !t.requisite.iter().any(|s| admits(s, &m.topology)) {
                        return Err(Error::NameConflict {
                            kind: "volume",
                            name: volume,
                            reason: format!(
                                "it exists on node {}, which no requisite topology segment admits",
                                m.node()
                            ),
                        });
                    }
                }
                vec![m]
            }
            (None, Some(node), _) => {
                let Some(agent) = self.directory.agent(node)? else {
                    // All-in-one and a source of a node not served here: the agent answers
                    // NOT_FOUND for the source.
                    return self.create_on(members.into_iter().next(), new).await;
                };
                let member = members.iter().find(|m| m.node() == node).cloned().unwrap_or_else(|| Member::of(agent));
                if let Some(t) = req.filter(|t| !t.requisite.is_empty()) {
                    if !t.requisite.iter().any(|s| admits(s, &member.topology)) {
                        return Err(Error::TopologyUnreachable {
                            volume,
                            reason: format!(
                                "its source lies on node {node}, which no requisite topology segment admits; \
                                 restores and clones are made on the source's node"
                            ),
                        });
                    }
                }
                vec![member]
            }
            (None, None, Some(node)) => members.iter().filter(|m| m.node() == &node).cloned().collect(),
            (None, None, None) => order(&new.name, members.clone(), req),
        };
        if candidates.is_empty() {
            let missing = unregistered_nodes(&members, req);
            if self.directory.is_cluster() && !missing.is_empty() {
                return Err(Error::Unavailable {
                    reason: format!(
                        "the requisite topology names node {}, which is not registered with the controller now",
                        missing.join(", ")
                    ),
                });
            }
            let served: Vec<&str> = members.iter().map(|m| m.node().as_str()).collect();
            return Err(Error::TopologyUnreachable {
                volume,
                reason: format!(
                    "no requisite topology segment admits a node this driver serves ({})",
                    served.join(", ")
                ),
            });
        }
        if candidates.len() == 1 {
            return self.create_on(candidates.pop(), new).await;
        }
        let mut refusals = Vec::new();
        let mut first_refusal: Option<Error> = None;
        for m in candidates {
            match self.create_on(Some(m.clone()), new.clone()).await {
                Ok(done) => return Ok(done),
                Err(e) if matches!(e.code(), Code::ResourceExhausted | Code::InvalidArgument) => {
                    refusals.push(format!("{}: {e}", m.node()));
                    if first_refusal.as_ref().is_none_or(|f| f.code() != Code::ResourceExhausted) {
                        first_refusal = Some(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        match first_refusal {
            Some(e) if e.code() == Code::ResourceExhausted => Err(Error::PoolExhausted {
                object: format!("volume {volume:?}"),
                reason: format!("no candidate node can hold it: {}", refusals.join("; ")),
            }),
            Some(e) => Err(e),
            None => Err(Error::Unavailable { reason: format!("no node agent could be asked to create {volume:?}") }),
        }
    }

    /// Creates on one member, keeping track of outcomes that are unknown.
    async fn create_on(&self, member: Option<Member>, new: NewVolume) -> Result<(VolumeRecord, NodeId)> {
        let Some(member) = member else {
            return Err(Error::Unavailable { reason: "no node agent is registered".into() });
        };
        let node = member.node().clone();
        let name = new.name.clone();
        match member.agent.create_volume(new).await {
            Ok(rec) => {
                self.uncertain().remove(&name);
                Ok((rec, node))
            }
            Err(e) => {
                if self.directory.is_cluster() && e.code() == Code::Unavailable {
                    self.uncertain().insert(name, node);
                } else {
                    self.uncertain().remove(&name);
                }
                Err(e)
            }
        }
    }

    /// The member that already holds a volume of this name, asking every member at once.
    async fn holder(&self, new: &NewVolume, members: &[Member]) -> Result<Option<Member>> {
        let mut asks = tokio::task::JoinSet::new();
        for m in members {
            let agent: Arc<dyn NodeAgent> = Arc::clone(&m.agent);
            let id = VolumeId::new(new.params.family, m.node().clone(), new.local.clone());
            let member = m.clone();
            asks.spawn(async move { (member, agent.get_volume(&id).await) });
        }
        let mut found = None;
        while let Some(joined) = asks.join_next().await {
            let (member, answer) =
                joined.map_err(|e| Error::system("look up the volume on every node", &new.name, e))?;
            match answer {
                Ok(_) => found = Some(member),
                Err(e) if e.code() == Code::NotFound => {}
                Err(e) => {
                    return Err(Error::Unavailable {
                        reason: format!(
                            "cannot tell whether node {} already holds {:?} ({e}); not placing it elsewhere",
                            member.node(),
                            printable(&new.name)
                        ),
                    })
                }
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Debug)]
    struct Stub(NodeId);

    #[async_trait::async_trait]
    impl NodeAgent for Stub {
        fn node_id(&self) -> &NodeId {
            &self.0
        }
        async fn create_volume(&self, _: NewVolume) -> Result<VolumeRecord> {
            unreachable!()
        }
        async fn delete_volume(&self, _: &VolumeId) -> Result<()> {
            unreachable!()
        }
        async fn get_volume(&self, _: &VolumeId) -> Result<(VolumeRecord, ferrovol_core::volume::Condition)> {
            unreachable!()
        }
        async fn list_volumes(&self) -> Result<Vec<(VolumeRecord, ferrovol_core::volume::Condition)>> {
            unreachable!()
        }
        async fn expand_volume(&self, _: &VolumeId, _: ferrovol_core::volume::CapacityRange) -> Result<u64> {
            unreachable!()
        }
        async fn publish_volume(&self, _: &VolumeId, _: &NodeId) -> Result<()> {
            unreachable!()
        }
        async fn unpublish_volume(&self, _: &VolumeId, _: &NodeId) -> Result<()> {
            unreachable!()
        }
        async fn create_snapshot(
            &self,
            _: &str,
            _: ferrovol_core::ids::LocalName,
            _: &VolumeId,
        ) -> Result<ferrovol_core::volume::SnapshotRecord> {
            unreachable!()
        }
        async fn delete_snapshot(&self, _: &ferrovol_core::ids::SnapshotId) -> Result<()> {
            unreachable!()
        }
        async fn get_snapshot(
            &self,
            _: &ferrovol_core::ids::SnapshotId,
        ) -> Result<ferrovol_core::volume::SnapshotRecord> {
            unreachable!()
        }
        async fn list_snapshots(&self) -> Result<Vec<ferrovol_core::volume::SnapshotRecord>> {
            unreachable!()
        }
        async fn capacity(
            &self,
            _: &ferrovol_core::params::VolumeParams,
        ) -> Result<ferrovol_core::agent::CapacityReport> {
            unreachable!()
        }
    }

    fn members(names: &[&str]) -> Vec<Member> {
        names.iter().map(|n| Member::of(Arc::new(Stub(NodeId::parse(n).expect("node id"))))).collect()
    }

    fn seg(node: &str) -> csi::Topology {
        csi::Topology { segments: HashMap::from([(TOPOLOGY_NODE_KEY.to_string(), node.to_string())]) }
    }

    fn names(ms: &[Member]) -> Vec<&str> {
        ms.iter().map(|m| m.node().as_str()).collect()
    }

    #[test]
    fn preferred_first_in_order_then_stable_rank() {
        let req = csi::TopologyRequirement {
            requisite: vec![seg("a"), seg("b"), seg("c")],
            preferred: vec![seg("c"), seg("a")],
        };
        let got = order("pvc-1", members(&["a", "b", "c", "d"]), Some(&req));
        assert_eq!(names(&got), ["c", "a", "b"], "d is not requisite; c then a are preferred");
    }

    #[test]
    fn without_requirements_the_rank_is_stable_and_membership_independent() {
        let all = order("pvc-x", members(&["a", "b", "c", "d"]), None);
        let again = order("pvc-x", members(&["d", "c", "b", "a"]), None);
        assert_eq!(names(&all), names(&again));
        let first = names(&all)[0].to_string();
        let others: Vec<&str> = ["a", "b", "c", "d"].into_iter().filter(|n| *n != first.as_str()).collect();
        let fewer = order("pvc-x", members(&others), None);
        let mut expected = names(&all)[1..].to_vec();
        expected.sort_by_key(|n| names(&all).iter().position(|m| m == n));
        assert_eq!(names(&fewer), expected, "removing the first choice keeps the others' order");
    }

    #[test]
    fn segments_with_foreign_keys_admit_nothing() {
        let t: BTreeMap<String, String> = BTreeMap::from([(TOPOLOGY_NODE_KEY.to_string(), "a".to_string())]);
        assert!(admits(&seg("a"), &t));
        assert!(!admits(&seg("b"), &t));
        let zone = csi::Topology { segments: HashMap::from([("zone".to_string(), "z1".to_string())]) };
        assert!(!admits(&zone, &t));
    }

    #[test]
    fn unregistered_requisite_nodes_are_named() {
        let req = csi::TopologyRequirement { requisite: vec![seg("a"), seg("gone")], preferred: vec![] };
        assert_eq!(unregistered_nodes(&members(&["a"]), Some(&req)), ["gone"]);
    }
}
