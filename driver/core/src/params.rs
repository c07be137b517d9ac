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
    (
        "type",
        "storage family: `loop` (the default), `lvm` (linear logical volumes), `lvm-thin` (thin volumes) or `s3` (a bucket or a prefix of one, mounted through FUSE)",
    ),
    ("fsType", "filesystem for mount volumes: `ext4` (the default) or `xfs`"),
    ("volumeGroup", "`lvm` and `lvm-thin`: the LVM volume group to allocate from (required)"),
    ("thinPool", "`lvm-thin`: the thin pool in `volumeGroup` (required)"),
    (
        "thinPoolOverprovisionRatio",
        "`lvm-thin`: how many times its size the pool may promise in virtual sizes, e.g. `2` or `2.5` (default 2)",
    ),
    (
        "bucket",
        "`s3`: an existing bucket that holds each volume under its own prefix; without it every volume gets a bucket of its own",
    ),
];

/// The thin-pool overprovisioning ratio when the StorageClass names none, in thousandths:
/// a pool may promise twice its size. Conservative on purpose: running a thin pool out of
/// space fails writes on every volume in it, the top complaint against thin provisioning.
pub const DEFAULT_OVERPROVISION_MILLI: u32 = 2000;

/// Where an LVM volume is allocated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LvmParams {
    /// The volume group (checked to LVM's name syntax; the node checks it is one it serves).
    pub volume_group: String,
    /// The thin pool for `lvm-thin`; `None` for linear volumes.
    pub thin_pool: Option<String>,
    /// Overprovisioning ratio of the thin pool, in thousandths (2000 = 2×).
    pub overprovision_milli: u32,
}

/// Where an `s3` volume goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Params {
    /// An existing bucket shared by volumes (each under its own prefix); `None`: a bucket
    /// per volume, made by CreateVolume and removed by DeleteVolume.
    pub bucket: Option<String>,
}

/// Parsed StorageClass parameters of a new volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeParams {
    pub family: Family,
    pub fs_type: FsType,
    /// Where an `lvm` / `lvm-thin` volume goes; `None` for other families.
    pub lvm: Option<LvmParams>,
    /// Where an `s3` volume goes; `None` for other families.
    pub s3: Option<S3Params>,
    /// The accepted parameters, as recorded with the volume (orchestrator keys included).
    pub recorded: BTreeMap<String, String>,
}

impl VolumeParams {
    /// Parses CreateVolume's parameters; an unknown key is an error that names it.
    pub fn parse(params: &HashMap<String, String>) -> Result<Self> {
        let mut family = Family::Loop;
        let mut thin = false;
        let mut fs_type = FsType::Ext4;
        let (mut vg, mut pool, mut ratio, mut bucket) = (None, None, None, None);
        let mut recorded = BTreeMap::new();
        for (k, v) in params {
            match k.as_str() {
                "type" => {
                    (family, thin) = match v.as_str() {
                        "loop" => (Family::Loop, false),
                        "lvm" => (Family::Lvm, false),
                        "lvm-thin" => (Family::Lvm, true),
                        "s3" => (Family::S3, false),
                        other => {
                            return Err(Error::invalid(
                                "parameters",
                                format!(
                                "type {:?} is not a storage family this driver serves (known: loop, lvm, lvm-thin, s3)",
                                printable(other)
                            ),
                            ))
                        }
                    }
                }
                "fsType" => fs_type = FsType::parse(v, "parameter fsType")?,
                "volumeGroup" => vg = Some(lvm_name("volumeGroup", v)?),
                "thinPool" => pool = Some(lvm_name("thinPool", v)?),
                "thinPoolOverprovisionRatio" => ratio = Some(parse_ratio(v)?),
                "bucket" => bucket = Some(bucket_name("bucket", v)?),
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
        if family != Family::S3 && bucket.is_some() {
            return Err(Error::invalid("parameters", "bucket applies only to type s3"));
        }
        let lvm = match (family, thin) {
            (Family::Lvm, _) => {
                let volume_group = vg
                    .ok_or_else(|| Error::invalid("parameters", "volumeGroup is required for type lvm and lvm-thin"))?;
                if thin && pool.is_none() {
                    return Err(Error::invalid("parameters", "thinPool is required for type lvm-thin"));
                }
                if !thin && (pool.is_some() || ratio.is_some()) {
                    return Err(Error::invalid(
                        "parameters",
                        "thinPool and thinPoolOverprovisionRatio apply only to type lvm-thin",
                    ));
                }
                Some(LvmParams {
                    volume_group,
                    thin_pool: pool,
                    overprovision_milli: ratio.unwrap_or(DEFAULT_OVERPROVISION_MILLI),
                })
            }
            (Family::Loop | Family::S3, _) => {
                if vg.is_some() || pool.is_some() || ratio.is_some() {
                    return Err(Error::invalid(
                        "parameters",
                        "volumeGroup, thinPool and thinPoolOverprovisionRatio apply only to types lvm and lvm-thin",
                    ));
                }
                None
            }
        };
        let s3 = (family == Family::S3).then_some(S3Params { bucket });
        if s3.is_some() && recorded.contains_key("fsType") {
            return Err(Error::invalid("parameters", "fsType does not apply to type s3 (it is mounted through FUSE)"));
        }
        Ok(VolumeParams { family, fs_type, lvm, s3, recorded })
    }

    /// The parameters that decide what the volume is; orchestrator keys are left out, so
    /// a repeated CreateVolume with other PVC metadata is still the same volume.
    pub fn identity(&self) -> BTreeMap<String, String> {
        self.recorded.iter().filter(|(k, _)| !k.starts_with(CO_PREFIX)).map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// Checks a volume group or thin pool name against LVM's syntax (letters, digits, `+_.-`,
/// not starting with `-`, at most 127 bytes); whether it exists is the node's question.
fn lvm_name(key: &'static str, v: &str) -> Result<String> {
    let ok = !v.is_empty()
        && v.len() <= 127
        && !v.starts_with('-')
        && v != "."
        && v != ".."
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'_' | b'.' | b'-'));
    if ok {
        Ok(v.to_owned())
    } else {
        Err(Error::invalid(
            "parameters",
            format!("{key} {:?} is not a valid LVM name (letters, digits, + _ . -; not starting with -)", printable(v)),
        ))
    }
}

/// Checks an S3 bucket name against the rules every S3 server shares: 3-63 bytes of
/// lowercase letters, digits, `.` and `-`, beginning and ending with a letter or digit, no
/// `..`, and not shaped like an IP address.
pub fn bucket_name(key: &'static str, v: &str) -> Result<String> {
    if is_bucket_name(v) {
        Ok(v.to_owned())
    } else {
        Err(Error::invalid(
            "parameters",
            format!(
                "{key} {:?} is not a valid S3 bucket name (3-63 of a-z 0-9 . -, starting and ending with a letter or digit)",
                printable(v)
            ),
        ))
    }
}

/// Whether `v` is a valid S3 bucket name (see [`bucket_name`]).
pub fn is_bucket_name(v: &str) -> bool {
    let b = v.as_bytes();
    (3..=63).contains(&b.len())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'.' || *c == b'-')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && !v.contains("..")
        && !v.contains(".-")
        && !v.contains("-.")
        && v.parse::<std::net::Ipv4Addr>().is_err()
}

/// Parses `thinPoolOverprovisionRatio` (a decimal from 1 to 100, at most 3 decimals) into
/// thousandths.
fn parse_ratio(v: &str) -> Result<u32> {
    let bad = || {
        Error::invalid(
            "parameters",
            format!("thinPoolOverprovisionRatio {:?} is not a ratio from 1 to 100 such as 2 or 2.5", printable(v)),
        )
    };
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if int.is_empty() || frac.len() > 3 || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let whole: u32 = int.parse().map_err(|_| bad())?;
    let milli = format!("{frac:0<3}").parse::<u32>().map_err(|_| bad())?;
    let total = whole.checked_mul(1000).and_then(|w| w.checked_add(milli)).ok_or_else(bad)?;
    if !(1000..=100_000).contains(&total) {
        return Err(bad());
    }
    Ok(total)
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
    fn lvm_parameters() {
        let p = VolumeParams::parse(&map(&[("type", "lvm"), ("volumeGroup", "vg0")])).expect("lvm");
        assert_eq!(p.family, Family::Lvm);
        assert_eq!(p.lvm.as_ref().map(|l| (l.volume_group.as_str(), l.thin_pool.is_none())), Some(("vg0", true)));
        let p = VolumeParams::parse(&map(&[
            ("type", "lvm-thin"),
            ("volumeGroup", "vg0"),
            ("thinPool", "pool0"),
            ("thinPoolOverprovisionRatio", "2.5"),
        ]))
        .expect("thin");
        let l = p.lvm.expect("lvm params");
        assert_eq!((l.thin_pool.as_deref(), l.overprovision_milli), (Some("pool0"), 2500));
        let d = VolumeParams::parse(&map(&[("type", "lvm-thin"), ("volumeGroup", "v"), ("thinPool", "p")]))
            .expect("default ratio");
        assert_eq!(d.lvm.map(|l| l.overprovision_milli), Some(DEFAULT_OVERPROVISION_MILLI));
        for (bad, needle) in [
            (vec![("type", "lvm")], "volumeGroup is required"),
            (vec![("type", "lvm-thin"), ("volumeGroup", "vg")], "thinPool is required"),
            (vec![("type", "lvm"), ("volumeGroup", "vg"), ("thinPool", "p")], "only to type lvm-thin"),
            (vec![("volumeGroup", "vg")], "only to types lvm"),
            (vec![("type", "lvm"), ("volumeGroup", "../etc")], "not a valid LVM name"),
            (vec![("type", "lvm"), ("volumeGroup", "-x")], "not a valid LVM name"),
            (
                vec![
                    ("type", "lvm-thin"),
                    ("volumeGroup", "v"),
                    ("thinPool", "p"),
                    ("thinPoolOverprovisionRatio", "0.5"),
                ],
                "ratio",
            ),
            (
                vec![
                    ("type", "lvm-thin"),
                    ("volumeGroup", "v"),
                    ("thinPool", "p"),
                    ("thinPoolOverprovisionRatio", "2.0001"),
                ],
                "ratio",
            ),
            (
                vec![
                    ("type", "lvm-thin"),
                    ("volumeGroup", "v"),
                    ("thinPool", "p"),
                    ("thinPoolOverprovisionRatio", "x"),
                ],
                "ratio",
            ),
        ] {
            let e = VolumeParams::parse(&map(&bad)).expect_err(needle);
            assert_eq!(e.code(), Code::InvalidArgument);
            assert!(e.to_string().contains(needle), "{bad:?}: {e}");
        }
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
