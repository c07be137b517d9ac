//! Volume and snapshot IDs: they encode the family and the node, so any call can be routed
//! without a lookup table, and their local part is checked so strictly that it is always a
//! safe single path component. IDs come from requests and are untrusted: parsing is the
//! only way to get one, and a parse failure never touches the filesystem.
//!
//! Format: `<family>.vol:<node>:<local>` for volumes, `<family>.snap:<node>:<local>` for
//! snapshots, e.g. `loop.vol:worker-1:pvc-0b7e…`.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The CSI spec's limit on string fields such as IDs.
pub const MAX_ID_BYTES: usize = 128;
/// Node IDs are host names or DNS labels; we accept the safe subset of at most 63 bytes.
pub const MAX_NODE_ID_BYTES: usize = 63;
const MAX_LOCAL_BYTES: usize = 63;

/// The storage family a volume belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// A sparse image file attached as a loop device (the embedded default).
    Loop,
    /// A logical volume in an LVM volume group, linear or thin (`type: lvm` / `lvm-thin`).
    Lvm,
    /// Objects under a prefix of an S3 bucket, mounted through our FUSE filesystem
    /// (`type: s3`). Its IDs carry the bucket where other families carry the node:
    /// `s3.vol:<bucket>:<local>`.
    S3,
}

impl Family {
    /// The family's name as it appears in IDs and the `type` parameter.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Loop => "loop",
            Family::Lvm => "lvm",
            Family::S3 => "s3",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "loop" => Some(Family::Loop),
            "lvm" => Some(Family::Lvm),
            "s3" => Some(Family::S3),
            _ => None,
        }
    }
}

/// A node ID: letters, digits, `.`, `-`, `_`, at most 63 bytes, not starting with `.`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct NodeId(String);

impl NodeId {
    /// Checks a node ID.
    pub fn parse(s: &str) -> Result<Self> {
        let ok = !s.is_empty()
            && s.len() <= MAX_NODE_ID_BYTES
            && !s.starts_with('.')
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        if ok {
            Ok(NodeId(s.to_owned()))
        } else {
            Err(Error::invalid(
                "node_id",
                format!(
                    "{s:?} is not a valid node ID (1-{MAX_NODE_ID_BYTES} of [A-Za-z0-9._-], not starting with '.')"
                ),
            ))
        }
    }

    /// The ID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The node-local part of an ID: always one safe path component (`[a-z0-9_-]`, no dots).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct LocalName(String);

impl LocalName {
    /// Derives the local name from a CO-supplied name. A DNS-label-like name (`pvc-<uuid>`,
    /// `snapshot-<uuid>`) is kept as it is, so operators recognise it on disk; anything else
    /// becomes `h_` plus 32 hex digits of its SHA-256. `_` never occurs in a kept name, so
    /// the two forms cannot collide.
    pub fn from_co_name(name: &str) -> Self {
        let b = name.as_bytes();
        let label = !b.is_empty()
            && b.len() <= MAX_LOCAL_BYTES
            && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-';
        if label {
            return LocalName(name.to_owned());
        }
        let digest = Sha256::digest(name.as_bytes());
        let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
        LocalName(format!("h_{hex}"))
    }

    /// Checks a name read back from disk or a report: `None` unless it is a valid local
    /// name as it stands (no hashing).
    pub fn parse(s: &str) -> Option<Self> {
        let ok = !s.is_empty()
            && s.len() <= MAX_LOCAL_BYTES
            && s.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_');
        ok.then(|| LocalName(s.to_owned()))
    }

    /// The name as text; safe to use as a single path component.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LocalName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an ID names: volumes and snapshots share the format but not the namespace.
pub trait IdKind: fmt::Debug + Clone + Copy + Default + PartialEq + Eq + std::hash::Hash {
    /// The tag after the family, e.g. `vol` in `loop.vol:…`.
    const TAG: &'static str;
    /// The request field that carries it, for messages.
    const FIELD: &'static str;
    /// The error for an ID that names nothing of ours.
    fn not_found(id: String, reason: String) -> Error;
}

/// Marker for volume IDs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Vol;
/// Marker for snapshot IDs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Snap;

impl IdKind for Vol {
    const TAG: &'static str = "vol";
    const FIELD: &'static str = "volume_id";
    fn not_found(volume: String, reason: String) -> Error {
        Error::VolumeNotFound { volume, reason }
    }
}

impl IdKind for Snap {
    const TAG: &'static str = "snap";
    const FIELD: &'static str = "snapshot_id";
    fn not_found(snapshot: String, reason: String) -> Error {
        Error::SnapshotNotFound { snapshot, reason }
    }
}

/// A checked ID of a volume (`Id<Vol>`) or snapshot (`Id<Snap>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Id<K: IdKind> {
    family: Family,
    node: NodeId,
    local: LocalName,
    kind: K,
}

/// A checked volume ID.
pub type VolumeId = Id<Vol>;
/// A checked snapshot ID.
pub type SnapshotId = Id<Snap>;

impl<K: IdKind> Id<K> {
    /// Builds the ID of an object this driver creates.
    pub fn new(family: Family, node: NodeId, local: LocalName) -> Self {
        Id { family, node, local, kind: K::default() }
    }

    /// Parses an untrusted ID. Anything that is not exactly one of our IDs of this kind is
    /// "not found": the spec's answer for an ID this plugin does not know.
    pub fn parse(s: &str) -> Result<Self> {
        if s.is_empty() {
            return Err(Error::invalid(K::FIELD, "must not be empty"));
        }
        Self::parse_parts(s).ok_or_else(|| K::not_found(printable(s), format!("not a {} of this driver", K::FIELD)))
    }

    fn parse_parts(s: &str) -> Option<Self> {
        if s.len() > MAX_ID_BYTES {
            return None;
        }
        let mut it = s.split(':');
        let (head, node, local) = (it.next()?, it.next()?, it.next()?);
        if it.next().is_some() {
            return None;
        }
        let (family, tag) = head.split_once('.')?;
        if tag != K::TAG {
            return None;
        }
        let family = Family::parse(family)?;
        // An S3 ID carries a bucket where the others carry a node: it must be a bucket name.
        if family == Family::S3 && !crate::params::is_bucket_name(node) {
            return None;
        }
        Some(Id::new(family, NodeId::parse(node).ok()?, LocalName::parse(local)?))
    }
}

impl<K: IdKind> Id<K> {
    pub fn family(&self) -> Family {
        self.family
    }
    pub fn node(&self) -> &NodeId {
        &self.node
    }
    pub fn local(&self) -> &LocalName {
        &self.local
    }
}

impl<K: IdKind> fmt::Display for Id<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}:{}:{}", self.family.as_str(), K::TAG, self.node, self.local)
    }
}

/// An untrusted string made safe to put in a message: control characters escaped, and
/// cut to a length an operator can read.
pub fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(160).flat_map(char::escape_default).collect();
    if s.chars().count() > 160 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;

    fn node() -> NodeId {
        NodeId::parse("worker-1").expect("node")
    }

    #[test]
    fn ids_round_trip() {
        let id = VolumeId::new(Family::Loop, node(), LocalName::from_co_name("pvc-1234"));
        assert_eq!(id.to_string(), "loop.vol:worker-1:pvc-1234");
        assert_eq!(VolumeId::parse(&id.to_string()).expect("parse"), id);
        let sid = SnapshotId::new(Family::Loop, node(), LocalName::from_co_name("snapshot-9"));
        assert_eq!(sid.to_string(), "loop.snap:worker-1:snapshot-9");
        assert_eq!(SnapshotId::parse(&sid.to_string()).expect("parse"), sid);
    }

    #[test]
    fn a_snapshot_id_is_not_a_volume_id() {
        assert_eq!(VolumeId::parse("loop.snap:worker-1:x").expect_err("kind").code(), Code::NotFound);
        assert_eq!(SnapshotId::parse("loop.vol:worker-1:x").expect_err("kind").code(), Code::NotFound);
    }

    #[test]
    fn an_s3_id_needs_a_bucket_name_where_others_have_a_node() {
        assert!(VolumeId::parse("s3.vol:my-bucket:pvc-1").is_ok());
        assert!(SnapshotId::parse("s3.snap:my.bucket-2:snap-1").is_ok());
        for bad in ["s3.vol:My_Bucket:pvc-1", "s3.vol:ab:pvc-1", "s3.vol:-bucket:pvc-1", "s3.vol:10.0.0.1:pvc-1"] {
            assert_eq!(VolumeId::parse(bad).expect_err(bad).code(), Code::NotFound, "{bad}");
        }
        // The node slot of other families keeps its own rules.
        assert!(VolumeId::parse("loop.vol:Worker_1:pvc-1").is_ok());
    }

    #[test]
    fn hostile_ids_are_not_found() {
        for bad in [
            "../../etc/passwd",
            "/etc/passwd",
            "loop.vol:worker-1:..",
            "loop.vol:worker-1:../x",
            "loop.vol:worker-1:a/b",
            "loop.vol:worker-1:a\0b",
            "loop.vol:../x:pvc",
            "loop.vol:worker-1:pvc:extra",
            "loop.vol:worker-1:.hidden",
            "loop.vol:worker-1:",
            "lvm-thin.vol:worker-1:pvc",
            "loop.vol:.worker:pvc",
            "loop.vol:worker-1:PVC",
        ] {
            let e = VolumeId::parse(bad).expect_err(bad);
            assert_eq!(e.code(), Code::NotFound, "{bad}");
        }
        let long = format!("loop.vol:worker-1:{}", "a".repeat(200));
        assert_eq!(VolumeId::parse(&long).expect_err("long").code(), Code::NotFound);
        assert_eq!(VolumeId::parse("").expect_err("empty").code(), Code::InvalidArgument);
    }

    #[test]
    fn co_names_map_to_safe_local_names() {
        assert_eq!(LocalName::from_co_name("pvc-0b7e").as_str(), "pvc-0b7e");
        for odd in ["../x", "Upper", "a/b", "with space", "-lead", "trail-", "x".repeat(64).as_str(), "a.b", "a_b"] {
            let l = LocalName::from_co_name(odd);
            assert!(l.as_str().starts_with("h_"), "{odd} -> {l}");
            assert_eq!(l.as_str().len(), 34);
            assert!(LocalName::parse(l.as_str()).is_some());
        }
        assert_ne!(LocalName::from_co_name("A"), LocalName::from_co_name("B"));
        assert_eq!(LocalName::from_co_name("A"), LocalName::from_co_name("A"));
    }

    #[test]
    fn messages_escape_untrusted_text() {
        let e = VolumeId::parse("bad\nid\0").expect_err("bad");
        let msg = e.to_string();
        assert!(!msg.contains('\n') && !msg.contains('\0'), "{msg}");
    }
}
