//! StorageClass parameters and volume-context sizes: the one parser every RPC and every
//! example in deploy/ goes through, so code and documentation cannot drift apart.

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, Result};
use crate::ids::{printable, Family};
use crate::volume::FsType;

/// Keys under this prefix belong to the orchestrator (PVC name, namespace, ...): accepted,
/// kept for tags and logs, never rejected.
pub const CO_PREFIX: &str = "csi.storage.k8s.io/";

/// Every parameter key the driver accepts, with what it means. deploy/ examples and docs
/// are checked against this list.
pub const KNOWN_PARAMETERS: &[(&str, &str)] = &[
    ("type", "storage family: `loop` (the default)"),
    ("fsType", "filesystem for mount volumes: `ext4` (the default) or `xfs`"),
];

/// Parsed StorageClass parameters of a new volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeParams {
    pub family: Family,
    pub fs_type: FsType,
    /// The accepted parameters, as recorded with the volume (orchestrator keys included).
    pub recorded: BTreeMap<String, String>,
}

impl VolumeParams {
    /// Parses CreateVolume's parameters; an unknown key is an error that names it.
    pub fn parse(params: &HashMap<String, String>) -> Result<Self> {
        let mut family = Family::Loop;
        let mut fs_type = FsType::Ext4;
        let mut recorded = BTreeMap::new();
        for (k, v) in params {
            match k.as_str() {
                "type" => {
                    family = match v.as_str() {
                        "loop" => Family::Loop,
                        other => {
                            return Err(Error::invalid(
                                "parameters",
                                format!(
                                    "type {:?} is not a storage family this driver serves (known: loop)",
                                    printable(other)
                                ),
                            ))
                        }
                    }
                }
                "fsType" => fs_type = FsType::parse(v, "parameter fsType")?,
                _ if k.starts_with(CO_PREFIX) => {}
                _ => {
                    return Err(Error::UnknownParameter {
                        key: printable(k),
                        known: KNOWN_PARAMETERS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", "),
                    })
                }
            }
            recorded.insert(k.clone(), v.clone());
        }
        Ok(VolumeParams { family, fs_type, recorded })
    }

    /// The parameters that decide what the volume is; orchestrator keys are left out, so
    /// a repeated CreateVolume with other PVC metadata is still the same volume.
    pub fn identity(&self) -> BTreeMap<String, String> {
        self.recorded.iter().filter(|(k, _)| !k.starts_with(CO_PREFIX)).map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// Parses a Kubernetes-style quantity (`64Mi`, `1Gi`, `500M`, `1073741824`) into bytes.
pub fn parse_quantity(s: &str, field: &'static str) -> Result<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| Error::invalid(field, format!("{:?} is not a size such as 64Mi or 1Gi", printable(s))))?;
    let mult: u64 = match unit {
        "" => 1,
        "k" | "K" => 1000,
        "M" => 1000_u64.pow(2),
        "G" => 1000_u64.pow(3),
        "T" => 1000_u64.pow(4),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => {
            return Err(Error::invalid(
                field,
                format!("{:?} has an unknown unit (use Ki, Mi, Gi, Ti, k, M, G, T)", printable(s)),
            ))
        }
    };
    n.checked_mul(mult).ok_or_else(|| Error::invalid(field, format!("{:?} is too large", printable(s))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;

    fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_and_known_keys() {
        let p = VolumeParams::parse(&HashMap::new()).expect("empty");
        assert_eq!((p.family, p.fs_type), (Family::Loop, FsType::Ext4));
        let p =
            VolumeParams::parse(&map(&[("type", "loop"), ("fsType", "xfs"), ("csi.storage.k8s.io/pvc/name", "data")]))
                .expect("ok");
        assert_eq!(p.fs_type, FsType::Xfs);
        assert_eq!(p.identity().len(), 2, "orchestrator keys are not part of identity");
    }

    #[test]
    fn unknown_keys_and_values_are_named() {
        let e = VolumeParams::parse(&map(&[("fstype", "ext4")])).expect_err("unknown");
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.to_string().contains("\"fstype\""), "{e}");
        let e = VolumeParams::parse(&map(&[("fsType", "ntfs")])).expect_err("fs");
        assert!(e.to_string().contains("ntfs"), "{e}");
        let e = VolumeParams::parse(&map(&[("type", "nfs")])).expect_err("type");
        assert!(e.to_string().contains("nfs"), "{e}");
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("64Mi", "size").expect("Mi"), 64 << 20);
        assert_eq!(parse_quantity("1G", "size").expect("G"), 1_000_000_000);
        assert_eq!(parse_quantity("4096", "size").expect("plain"), 4096);
        assert!(parse_quantity("1.5Gi", "size").is_err());
        assert!(parse_quantity("99999999999999Ti", "size").is_err());
        assert!(parse_quantity("", "size").is_err());
    }
}
