//! Where a volume's and a snapshot's objects live. One layout for both kinds of volume: in
//! a bucket of its own or in a shared bucket, a volume's files are the objects under
//! `ferrovol/volumes/<local>/fs/`, and its record is `ferrovol/volumes/<local>/volume.json`;
//! a snapshot's copies and record sit under `ferrovol/snapshots/<local>/` in the source's
//! bucket. Keys are built only from checked local names, so no request can name a key
//! outside its own volume.

use ferrovol_core::ids::{LocalName, SnapshotId, VolumeId};
use sha2::{Digest, Sha256};

/// The top prefix of everything the driver keeps in a bucket.
pub const ROOT: &str = "ferrovol/";
/// The object that marks a bucket this driver made (for a volume of its own).
pub const BUCKET_MARKER: &str = "ferrovol/bucket.json";

/// The prefix of volume `local`: `ferrovol/volumes/<local>/`.
pub fn volume_prefix(local: &LocalName) -> String {
    format!("{ROOT}volumes/{local}/")
}

/// The prefix under which the volume's files are: what the filesystem shows as `/`.
pub fn volume_data_prefix(local: &LocalName) -> String {
    format!("{}fs/", volume_prefix(local))
}

/// The record of volume `local`.
pub fn volume_record_key(local: &LocalName) -> String {
    format!("{}volume.json", volume_prefix(local))
}

/// The prefix of snapshot `local`.
pub fn snapshot_prefix(local: &LocalName) -> String {
    format!("{ROOT}snapshots/{local}/")
}

/// Where a snapshot's copies of the files are.
pub fn snapshot_data_prefix(local: &LocalName) -> String {
    format!("{}fs/", snapshot_prefix(local))
}

/// The record of snapshot `local`.
pub fn snapshot_record_key(local: &LocalName) -> String {
    format!("{}snapshot.json", snapshot_prefix(local))
}

/// The bucket of a volume's ID (S3 IDs carry the bucket where others carry the node).
pub fn volume_bucket(id: &VolumeId) -> &str {
    id.node().as_str()
}

/// The bucket of a snapshot's ID.
pub fn snapshot_bucket(id: &SnapshotId) -> &str {
    id.node().as_str()
}

/// The bucket made for a volume of its own: `fv-` and the local name, or a hash of it
/// where the name would not fit a bucket name's 63 bytes or alphabet.
pub fn own_bucket(local: &LocalName) -> String {
    let name = format!("fv-{local}");
    if name.len() <= 63 && ferrovol_core::params::is_bucket_name(&name) {
        return name;
    }
    let digest = Sha256::digest(local.as_str().as_bytes());
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("fv-h-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_stay_under_the_volume_prefix() {
        let l = LocalName::from_co_name("pvc-1");
        assert_eq!(volume_data_prefix(&l), "ferrovol/volumes/pvc-1/fs/");
        assert_eq!(volume_record_key(&l), "ferrovol/volumes/pvc-1/volume.json");
        assert_eq!(snapshot_record_key(&l), "ferrovol/snapshots/pvc-1/snapshot.json");
    }

    #[test]
    fn own_buckets_are_valid_names() {
        for name in ["pvc-0b7e5c3a-1f7e-4b8e-9a4c-3d2f1e0a9b8c", "Odd_Name", &"x".repeat(63)] {
            let b = own_bucket(&LocalName::from_co_name(name));
            assert!(ferrovol_core::params::is_bucket_name(&b), "{name} -> {b}");
        }
        assert_eq!(own_bucket(&LocalName::from_co_name("pvc-1")), "fv-pvc-1");
    }
}
