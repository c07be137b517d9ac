//! Conversions between the core types and the agent API's messages. Everything that comes
//! off the wire is checked again as if it came from a request: IDs, names and parameters
//! parse through the same core types the CSI adapters use.

use std::collections::{BTreeMap, HashMap};

use ferrovol_core::agent::{CapacityReport, NewVolume, Source};
use ferrovol_core::error::{Error, Result};
use ferrovol_core::ids::{printable, LocalName, SnapshotId, VolumeId};
use ferrovol_core::params::VolumeParams;
use ferrovol_core::volume::{CapacityRange, Condition, ContentSource, FsType, SnapshotRecord, VolumeRecord};
use ferrovol_proto::agent::v1 as pb;

pub fn range_to(r: &CapacityRange) -> pb::CapacityRange {
    pb::CapacityRange { required_bytes: r.required.unwrap_or(0), limit_bytes: r.limit.unwrap_or(0) }
}

/// A range off the wire, checked as a request's would be (required ≤ limit).
pub fn range_from(r: Option<&pb::CapacityRange>) -> Result<CapacityRange> {
    let Some(r) = r else { return Ok(CapacityRange::default()) };
    let big =
        |v: u64| i64::try_from(v).map_err(|_| Error::invalid("capacity_range", format!("{v} bytes is too large")));
    CapacityRange::from_request(big(r.required_bytes)?, big(r.limit_bytes)?)
}

pub fn new_volume_to(v: &NewVolume) -> pb::CreateVolumeRequest {
    use pb::create_volume_request::Source as S;
    pb::CreateVolumeRequest {
        name: v.name.clone(),
        local_name: v.local.as_str().to_string(),
        capacity: Some(range_to(&v.capacity)),
        parameters: v.params.recorded.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        source: v.source.as_ref().map(|s| match s {
            Source::Snapshot(id) => S::SourceSnapshotId(id.to_string()),
            Source::Volume(id) => S::SourceVolumeId(id.to_string()),
        }),
    }
}

pub fn new_volume_from(r: pb::CreateVolumeRequest) -> Result<NewVolume> {
    use pb::create_volume_request::Source as S;
    let local = LocalName::parse(&r.local_name).ok_or_else(|| {
        Error::invalid("local_name", format!("{:?} is not a valid local name", printable(&r.local_name)))
    })?;
    let params = VolumeParams::parse(&r.parameters)?;
    let source = match r.source {
        None => None,
        Some(S::SourceSnapshotId(id)) => Some(Source::Snapshot(SnapshotId::parse(&id)?)),
        Some(S::SourceVolumeId(id)) => Some(Source::Volume(VolumeId::parse(&id)?)),
    };
    Ok(NewVolume { name: r.name, local, capacity: range_from(r.capacity.as_ref())?, params, source })
}

pub fn volume_to(v: &VolumeRecord) -> pb::VolumeRecord {
    use pb::volume_record::Source as S;
    pb::VolumeRecord {
        id: v.id.clone(),
        name: v.name.clone(),
        capacity_bytes: v.capacity_bytes,
        fs_type: v.fs_type.as_str().to_string(),
        source: v.source.as_ref().map(|s| match s {
            ContentSource::Snapshot(id) => S::SourceSnapshotId(id.clone()),
            ContentSource::Volume(id) => S::SourceVolumeId(id.clone()),
        }),
        parameters: v.parameters.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        created_unix: v.created_unix,
        published_nodes: v.published_nodes.clone(),
    }
}

pub fn volume_from(v: pb::VolumeRecord) -> Result<VolumeRecord> {
    use pb::volume_record::Source as S;
    Ok(VolumeRecord {
        fs_type: FsType::parse(&v.fs_type, "fs_type")?,
        id: v.id,
        name: v.name,
        capacity_bytes: v.capacity_bytes,
        source: v.source.map(|s| match s {
            S::SourceSnapshotId(id) => ContentSource::Snapshot(id),
            S::SourceVolumeId(id) => ContentSource::Volume(id),
        }),
        parameters: v.parameters.into_iter().collect::<BTreeMap<_, _>>(),
        created_unix: v.created_unix,
        published_nodes: v.published_nodes,
    })
}

pub fn condition_to(c: &Condition) -> pb::Condition {
    pb::Condition { abnormal: c.abnormal, message: c.message.clone() }
}

pub fn condition_from(c: Option<pb::Condition>) -> Condition {
    c.map(|c| Condition { abnormal: c.abnormal, message: c.message })
        .unwrap_or_else(|| Condition::abnormal("the node agent reported no condition"))
}

pub fn status_to(v: &VolumeRecord, c: &Condition) -> pb::VolumeStatus {
    pb::VolumeStatus { volume: Some(volume_to(v)), condition: Some(condition_to(c)) }
}

pub fn status_from(s: pb::VolumeStatus) -> Result<(VolumeRecord, Condition)> {
    let v = s.volume.ok_or_else(|| Error::system("read the node agent's answer", "volume", "no volume in it"))?;
    Ok((volume_from(v)?, condition_from(s.condition)))
}

pub fn snapshot_to(s: &SnapshotRecord) -> pb::SnapshotRecord {
    pb::SnapshotRecord {
        id: s.id.clone(),
        name: s.name.clone(),
        source_volume_id: s.source_volume_id.clone(),
        size_bytes: s.size_bytes,
        fs_type: s.fs_type.as_str().to_string(),
        created_unix: s.created_unix,
        created_nanos: s.created_nanos,
    }
}

pub fn snapshot_from(s: pb::SnapshotRecord) -> Result<SnapshotRecord> {
    Ok(SnapshotRecord {
        fs_type: FsType::parse(&s.fs_type, "fs_type")?,
        id: s.id,
        name: s.name,
        source_volume_id: s.source_volume_id,
        size_bytes: s.size_bytes,
        created_unix: s.created_unix,
        created_nanos: s.created_nanos,
    })
}

pub fn params_to(p: &VolumeParams) -> HashMap<String, String> {
    p.recorded.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

pub fn capacity_to(c: &CapacityReport) -> pb::CapacityReport {
    pb::CapacityReport { available_bytes: c.available, maximum_volume_size: c.maximum_volume_size }
}

pub fn capacity_from(c: pb::CapacityReport) -> CapacityReport {
    CapacityReport { available: c.available_bytes, maximum_volume_size: c.maximum_volume_size }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrovol_core::ids::{Family, NodeId};

    #[test]
    fn records_round_trip() {
        let v = VolumeRecord {
            id: "loop.vol:n1:pvc-1".into(),
            name: "pvc-1".into(),
            capacity_bytes: 1 << 30,
            fs_type: FsType::Xfs,
            source: Some(ContentSource::Snapshot("loop.snap:n1:s".into())),
            parameters: BTreeMap::from([("type".into(), "loop".into())]),
            created_unix: 17,
            published_nodes: vec!["n1".into()],
        };
        assert_eq!(volume_from(volume_to(&v)).expect("back"), v);
        let s = SnapshotRecord {
            id: "loop.snap:n1:s".into(),
            name: "s".into(),
            source_volume_id: v.id.clone(),
            size_bytes: 5,
            fs_type: FsType::Ext4,
            created_unix: 3,
            created_nanos: 9,
        };
        assert_eq!(snapshot_from(snapshot_to(&s)).expect("back"), s);
        let c = Condition::abnormal("pool full");
        let (v2, c2) = status_from(status_to(&v, &c)).expect("back");
        assert_eq!((v2, c2), (v, c));
    }

    #[test]
    fn new_volumes_round_trip_and_are_checked_again() {
        let params = VolumeParams::parse(&HashMap::from([("fsType".to_string(), "xfs".to_string())])).expect("params");
        let nv = NewVolume {
            name: "pvc-2".into(),
            local: LocalName::from_co_name("pvc-2"),
            capacity: CapacityRange { required: Some(5), limit: None },
            params,
            source: Some(Source::Volume(VolumeId::new(
                Family::Loop,
                NodeId::parse("n2").expect("node"),
                LocalName::from_co_name("src"),
            ))),
        };
        let back = new_volume_from(new_volume_to(&nv)).expect("back");
        assert_eq!(back.name, nv.name);
        assert_eq!(back.local, nv.local);
        assert_eq!(back.capacity, nv.capacity);
        assert_eq!(back.params, nv.params);
        assert_eq!(back.source, nv.source);

        let mut bad = new_volume_to(&nv);
        bad.local_name = "../../etc".into();
        assert!(new_volume_from(bad).is_err(), "a path-like local name is refused");
        let mut bad = new_volume_to(&nv);
        bad.parameters.insert("nope".into(), "x".into());
        assert!(new_volume_from(bad).is_err(), "unknown parameters are refused on the node too");
    }
}
