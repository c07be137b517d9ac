//! The durable state of an LVM volume or snapshot, kept as tags on its logical volume:
//! there is no database to lose, and the state goes wherever the LV goes. Only LVs that carry
//! our driver tag are ours; every other LV in a volume group is never touched.
//!
//! Tags (LVM allows `[A-Za-z0-9_+.-/=!:#&]`):
//! - `fv.driver=<driver name>` and `fv.node=<node ID>` mark an LV as ours (a VG on shared
//!   storage may be seen by several nodes; each node owns only what it made);
//! - `fv.kind=vol` or `fv.kind=snap` says what it is;
//! - `fv.rec.<n>=<base64url>` carry the JSON record (CO name, parameters, source, times),
//!   cut into chunks because one tag holds at most a few hundred bytes on older lvm2;
//! - `fv.creating` is present from `lvcreate` until the LV's content is complete (a head
//!   zeroed, a copy finished): an LV still carrying it when no call is working on it is the
//!   debris of a crash and is removed;
//! - `fv.pub=<node>` per node the volume is ControllerPublished to.
//!
//! The size is never recorded: the LV's own size is the truth, so `lvextend` needs no
//! second command to keep a record in step.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ferrovol_core::volume::{SnapshotRecord, VolumeRecord};

use super::names::Tag;

const DRIVER: &str = "fv.driver=";
const NODE: &str = "fv.node=";
const KIND: &str = "fv.kind=";
const RECORD: &str = "fv.rec.";
/// Present while the LV's content is being made.
pub const CREATING: &str = "fv.creating";
const PUBLISHED: &str = "fv.pub=";
/// Base64 characters of the record per tag: with the `fv.rec.NNN=` prefix a tag stays within
/// 128 bytes, the limit of older lvm2 releases, so the format does not depend on the version.
const CHUNK: usize = 110;

/// What an LV of ours holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Volume(VolumeRecord),
    Snapshot(SnapshotRecord),
    /// Our driver tag is there but the record cannot be read: reported at start-up, never
    /// removed by the clean-up of half-made LVs.
    Unreadable(String),
}

/// The state an LV's tags carry, for an LV of ours.
#[derive(Debug, Clone, PartialEq)]
pub struct Owned {
    pub content: Content,
    pub creating: bool,
    pub published: Vec<String>,
}

fn tag(s: String) -> Tag {
    // Every tag built here is made of the charset above: the driver and node names are
    // checked when the process starts, base64url and the fixed prefixes are within it.
    Tag::parse(&s).unwrap_or_else(|e| unreachable!("tag {s:?} built from checked parts is invalid: {e}"))
}

/// Whose an LV is: the driver instance and the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub driver: String,
    pub node: String,
}

fn encode(owner: &Owner, kind: &str, json: &[u8], creating: bool) -> Vec<Tag> {
    let mut tags = vec![
        tag(format!("{DRIVER}{}", owner.driver)),
        tag(format!("{NODE}{}", owner.node)),
        tag(format!("{KIND}{kind}")),
    ];
    let b64 = URL_SAFE_NO_PAD.encode(json);
    for (i, chunk) in b64.as_bytes().chunks(CHUNK).enumerate() {
        tags.push(tag(format!("{RECORD}{i:03}={}", String::from_utf8_lossy(chunk))));
    }
    if creating {
        tags.push(tag(CREATING.to_owned()));
    }
    tags
}

/// Tags of a new volume LV.
pub fn volume_tags(owner: &Owner, rec: &VolumeRecord, creating: bool) -> Vec<Tag> {
    let json = serde_json::to_vec(rec).unwrap_or_default();
    encode(owner, "vol", &json, creating)
}

/// Tags of a new snapshot LV.
pub fn snapshot_tags(owner: &Owner, rec: &SnapshotRecord, creating: bool) -> Vec<Tag> {
    let json = serde_json::to_vec(rec).unwrap_or_default();
    encode(owner, "snap", &json, creating)
}

/// The tag that records a ControllerPublish to `node`.
pub fn published_tag(node: &str) -> Tag {
    tag(format!("{PUBLISHED}{node}"))
}

/// The `fv.creating` tag.
pub fn creating_tag() -> Tag {
    tag(CREATING.to_owned())
}

/// Whether checked text can be put in a tag (driver and node names are, when valid).
pub fn is_tag_safe(s: &str) -> bool {
    !s.is_empty() && Tag::parse(&format!("{DRIVER}{s}")).is_ok()
}

/// Reads an LV's tags: `None` if the LV is not `owner`'s.
pub fn decode(owner: &Owner, tags: &[String]) -> Option<Owned> {
    let has = |prefix: &str, value: &str| tags.iter().any(|t| t.strip_prefix(prefix) == Some(value));
    if !has(DRIVER, &owner.driver) || !has(NODE, &owner.node) {
        return None;
    }
    let kind = tags.iter().find_map(|t| t.strip_prefix(KIND)).unwrap_or("");
    let mut chunks: Vec<(u32, &str)> = tags
        .iter()
        .filter_map(|t| {
            let (idx, data) = t.strip_prefix(RECORD)?.split_once('=')?;
            Some((idx.parse().ok()?, data))
        })
        .collect();
    chunks.sort_by_key(|(i, _)| *i);
    let contiguous = chunks.iter().enumerate().all(|(n, (i, _))| *i as usize == n);
    let b64: String = chunks.iter().map(|(_, d)| *d).collect();
    let content = if !contiguous || chunks.is_empty() {
        Content::Unreadable("its record tags are missing or incomplete".into())
    } else {
        match URL_SAFE_NO_PAD.decode(b64.as_bytes()) {
            Err(e) => Content::Unreadable(format!("its record tags are not base64: {e}")),
            Ok(json) => match kind {
                "vol" => serde_json::from_slice(&json)
                    .map(Content::Volume)
                    .unwrap_or_else(|e| Content::Unreadable(format!("its volume record is invalid: {e}"))),
                "snap" => serde_json::from_slice(&json)
                    .map(Content::Snapshot)
                    .unwrap_or_else(|e| Content::Unreadable(format!("its snapshot record is invalid: {e}"))),
                other => Content::Unreadable(format!("its kind tag {other:?} is unknown")),
            },
        }
    };
    let published = tags.iter().filter_map(|t| t.strip_prefix(PUBLISHED)).map(str::to_owned).collect();
    Some(Owned { content, creating: tags.iter().any(|t| t == CREATING), published })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ferrovol_core::volume::{ContentSource, FsType};

    fn record() -> VolumeRecord {
        VolumeRecord {
            id: "lvm.vol:node-1:pvc-1".into(),
            name: "pvc-1 with unicode ✓ and \"quotes\"".into(),
            capacity_bytes: 1 << 30,
            fs_type: FsType::Xfs,
            source: Some(ContentSource::Snapshot("lvm.snap:node-1:s".into())),
            parameters: [("csi.storage.k8s.io/pvc/name".to_string(), "x".repeat(300))].into_iter().collect(),
            created_unix: 17,
            published_nodes: vec![],
        }
    }

    fn me() -> Owner {
        Owner { driver: "csi.ferrovol.dev".into(), node: "node-1".into() }
    }

    fn strings(tags: &[Tag]) -> Vec<String> {
        tags.iter().map(|t| t.as_str().to_owned()).collect()
    }

    #[test]
    fn a_record_survives_the_round_trip_through_many_tags() {
        let tags = strings(&volume_tags(&me(), &record(), true));
        assert!(tags.len() > 5, "a long record needs several tags: {tags:?}");
        assert!(tags.iter().all(|t| t.len() <= 128), "every tag fits old lvm2's limit");
        let owned = decode(&me(), &tags).unwrap();
        assert_eq!(owned.content, Content::Volume(record()));
        assert!(owned.creating);
        let mut shuffled = tags.clone();
        shuffled.reverse();
        shuffled.retain(|t| t != CREATING);
        shuffled.push(published_tag("node-2").as_str().to_owned());
        let owned = decode(&me(), &shuffled).unwrap();
        assert_eq!(owned.content, Content::Volume(record()), "order of tags does not matter");
        assert!(!owned.creating);
        assert_eq!(owned.published, vec!["node-2".to_string()]);
    }

    #[test]
    fn lvs_of_others_are_not_ours() {
        let tags = strings(&volume_tags(&me(), &record(), false));
        assert!(decode(&Owner { driver: "other.driver".into(), node: "node-1".into() }, &tags).is_none());
        assert!(decode(&Owner { driver: "csi.ferrovol.dev".into(), node: "node-2".into() }, &tags).is_none());
        assert!(decode(&me(), &["fv.kind=vol".into()]).is_none());
        assert!(decode(&me(), &[]).is_none());
    }

    #[test]
    fn damaged_records_are_unreadable_not_lost() {
        let mut tags = strings(&volume_tags(&me(), &record(), false));
        let idx = tags.iter().position(|t| t.starts_with("fv.rec.001")).unwrap();
        tags.remove(idx);
        let owned = decode(&me(), &tags).unwrap();
        assert!(matches!(owned.content, Content::Unreadable(ref r) if r.contains("incomplete")), "{owned:?}");
    }

    #[test]
    fn checked_names_are_tag_safe() {
        assert!(is_tag_safe("csi.ferrovol.dev"));
        assert!(is_tag_safe("worker-1.example_2"));
        assert!(!is_tag_safe("has space"));
        assert!(!is_tag_safe(""));
    }
}
