//! Names of LVM volume groups and logical volumes, and LVM tags, checked against lvm2's own
//! rules before lvm sees them, so a bad name is an argument error here and never a half-done
//! lvm command or a volume that exists but cannot be activated.
//!
//! The rules are lvm2's (`lib/misc/lvm-string.c`, lvm(8) "VALID NAMES"), checked against
//! lvm 2.03.16: the charset `[A-Za-z0-9+_.-]`, no leading `-`, not `.` or `..`, at most
//! 127 bytes (`NAME_LEN` 128 counts the NUL), and for LVs the reserved prefixes and
//! substrings of LVM's internal volumes. Where we are stricter than lvm it is said why.

use std::fmt;

/// lvm2's `NAME_LEN`: a buffer size, so it counts the terminating NUL.
const LVM_NAME_LEN: usize = 128;

/// The longest VG or LV name lvm accepts, in bytes.
pub const MAX_NAME_BYTES: usize = LVM_NAME_LEN - 1;

/// The longest suffix LVM appends to an LV's name for the volumes it makes inside it:
/// `_tdata`/`_tmeta` for a thin pool's data and metadata, `-tpool` for the pool's
/// device-mapper layer. Every combined-length limit keeps this much room, so that the same
/// check serves thin pools, thin volumes and linear volumes alike.
pub const COMPONENT_SUFFIX_BYTES: usize = 6;

/// The longest `vg` + `lv` (byte lengths added) accepted for a new LV.
///
/// lvcreate refuses `strlen(vg) + strlen(lv) + 3 >= NAME_LEN` ("Internal error: LV name
/// "vg/lv" length N is not supported"; found on lvm 2.03.16: with a 6-byte VG, a 118-byte
/// LV is accepted and 119 refused), so lvm's own limit is 124; we keep
/// [`COMPONENT_SUFFIX_BYTES`] more for a thin pool's `_tdata`/`_tmeta` volumes.
pub const MAX_FULL_NAME_BYTES: usize = LVM_NAME_LEN - 4 - COMPONENT_SUFFIX_BYTES;

/// The longest device-mapper name (`DM_NAME_LEN` 128 counts the NUL).
///
/// An LV's device-mapper name is `vg-lv` with every `-` inside either name doubled. lvcreate
/// does not check its length (lvm 2.03.16 created `vg/d-d-…` with a 184-byte dm name), so a
/// too-long one would only fail at activation; [`check_full_name`] refuses it up front.
pub const MAX_DM_NAME_BYTES: usize = 127;

/// The longest tag we accept, in bytes.
///
/// lvm 2.03.16 sets no limit (`validate_tag` has a FIXME about it; a 1025-byte tag was
/// accepted). Older lvm2 capped tags at `NAME_LEN` (doc/tagging.txt: 128), and every tag is
/// written into the VG's metadata area (1 MiB by default) for each LV carrying it, so tags
/// stay short: 128 bytes.
pub const MAX_TAG_BYTES: usize = 128;

/// LV names LVM refuses when they start with these (it names its own volumes so).
const RESERVED_LV_PREFIXES: [&str; 2] = ["pvmove", "snapshot"];

/// LV names LVM refuses when they contain these: the suffixes of its internal volumes.
/// Checked on lvm 2.03.16, which refuses all but `_vpool`; `_vpool` (the VDO pool layer) is
/// refused here too because newer lvm2 may reserve it and we never need it in a name.
const RESERVED_LV_SUBSTRINGS: [&str; 18] = [
    "_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_imeta", "_iorig", "_mimage", "_mlog", "_pmspare", "_rimage",
    "_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin", "_vpool", "_wcorig",
];

/// What kind of name was being checked, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    VolumeGroup,
    LogicalVolume,
    Tag,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::VolumeGroup => "volume group name",
            NameKind::LogicalVolume => "logical volume name",
            NameKind::Tag => "LVM tag",
        })
    }
}

/// Why a name is not one LVM accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{kind} is empty")]
    Empty { kind: NameKind },
    #[error("{kind} {name:?} is {len} bytes long; at most {max} are allowed")]
    TooLong { kind: NameKind, name: String, len: usize, max: usize },
    #[error("{kind} {name:?} starts with '-'")]
    LeadingHyphen { kind: NameKind, name: String },
    #[error("{kind} {name:?} is '.' or '..'")]
    Dots { kind: NameKind, name: String },
    #[error("{kind} {name:?} contains {found:?}; allowed are {allowed}")]
    Character { kind: NameKind, name: String, found: char, allowed: &'static str },
    #[error("logical volume name {name:?} starts with {prefix:?}, which LVM reserves for its own volumes")]
    ReservedPrefix { name: String, prefix: &'static str },
    #[error("logical volume name {name:?} contains {reserved:?}, which LVM reserves for its own volumes")]
    ReservedSubstring { name: String, reserved: &'static str },
    #[error("{vg}/{lv} is too long: the two names add up to {len} bytes; at most {max} are allowed")]
    FullNameTooLong { vg: String, lv: String, len: usize, max: usize },
    #[error(
        "{vg}/{lv} is too long: its device-mapper name {dm_name:?} would be {len} bytes; at most {max} are allowed"
    )]
    DeviceNameTooLong { vg: String, lv: String, dm_name: String, len: usize, max: usize },
}

const NAME_CHARSET: &str = "A-Z a-z 0-9 + _ . -";
const TAG_CHARSET: &str = "A-Z a-z 0-9 + _ . - / = ! : # &";

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '+' | '_' | '.' | '-')
}

fn is_tag_char(c: char) -> bool {
    is_name_char(c) || matches!(c, '/' | '=' | '!' | ':' | '#' | '&')
}

/// The checks VG and LV names share (lvm2's `validate_name`).
fn check_name(kind: NameKind, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if name.starts_with('-') {
        // lvm parses `vg-lv` device-mapper names at the hyphen; a leading one is ambiguous.
        return Err(NameError::LeadingHyphen { kind, name: name.to_owned() });
    }
    if name == "." || name == ".." {
        return Err(NameError::Dots { kind, name: name.to_owned() });
    }
    if let Some(found) = name.chars().find(|&c| !is_name_char(c)) {
        return Err(NameError::Character { kind, name: name.to_owned(), found, allowed: NAME_CHARSET });
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong { kind, name: name.to_owned(), len: name.len(), max: MAX_NAME_BYTES });
    }
    Ok(())
}

/// A volume group name lvm accepts.
///
/// lvm also refuses a new VG named like an entry of `/dev` (it makes `/dev/<vg>`); that
/// depends on the machine at creation time and is left to vgcreate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VgName(String);

impl VgName {
    pub fn parse(name: &str) -> Result<Self, NameError> {
        check_name(NameKind::VolumeGroup, name)?;
        Ok(VgName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VgName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A logical volume name lvm accepts for a new LV.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LvName(String);

impl LvName {
    pub fn parse(name: &str) -> Result<Self, NameError> {
        check_name(NameKind::LogicalVolume, name)?;
        if let Some(prefix) = RESERVED_LV_PREFIXES.into_iter().find(|p| name.starts_with(p)) {
            return Err(NameError::ReservedPrefix { name: name.to_owned(), prefix });
        }
        if let Some(reserved) = RESERVED_LV_SUBSTRINGS.into_iter().find(|s| name.contains(s)) {
            return Err(NameError::ReservedSubstring { name: name.to_owned(), reserved });
        }
        Ok(LvName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LvName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The device-mapper name of `vg/lv`: `vg-lv`, each name's own hyphens doubled.
pub fn dm_name(vg: &VgName, lv: &LvName) -> String {
    format!("{}-{}", vg.as_str().replace('-', "--"), lv.as_str().replace('-', "--"))
}

/// Checks that `lv` can be created in `vg` and activated: that lvm accepts the two names
/// together and that the device-mapper names of the LV and of the volumes LVM makes inside
/// it fit ([`MAX_FULL_NAME_BYTES`], [`MAX_DM_NAME_BYTES`]).
pub fn check_full_name(vg: &VgName, lv: &LvName) -> Result<(), NameError> {
    let len = vg.as_str().len() + lv.as_str().len();
    if len > MAX_FULL_NAME_BYTES {
        return Err(NameError::FullNameTooLong {
            vg: vg.to_string(),
            lv: lv.to_string(),
            len,
            max: MAX_FULL_NAME_BYTES,
        });
    }
    let dm_name = dm_name(vg, lv);
    let max = MAX_DM_NAME_BYTES - COMPONENT_SUFFIX_BYTES;
    if dm_name.len() > max {
        return Err(NameError::DeviceNameTooLong {
            vg: vg.to_string(),
            lv: lv.to_string(),
            len: dm_name.len(),
            dm_name,
            max,
        });
    }
    Ok(())
}

/// An LVM tag, as `--addtag`/`--deltag` take it.
///
/// Tags are the durable state LVM keeps for each LV, so they are checked as strictly as
/// names. lvm 2.03.16 itself takes a leading `-` from `--addtag`, but the lvm docs forbid
/// it and such a tag could not be given as a positional `@tag`; a leading `@` would be
/// stripped by lvm (the tag-reference marker), so it is outside the charset.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn parse(tag: &str) -> Result<Self, NameError> {
        let kind = NameKind::Tag;
        if tag.is_empty() {
            return Err(NameError::Empty { kind });
        }
        if tag.starts_with('-') {
            return Err(NameError::LeadingHyphen { kind, name: tag.to_owned() });
        }
        if let Some(found) = tag.chars().find(|&c| !is_tag_char(c)) {
            return Err(NameError::Character { kind, name: tag.to_owned(), found, allowed: TAG_CHARSET });
        }
        if tag.len() > MAX_TAG_BYTES {
            return Err(NameError::TooLong { kind, name: tag.to_owned(), len: tag.len(), max: MAX_TAG_BYTES });
        }
        Ok(Tag(tag.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn vg(name: &str) -> VgName {
        VgName::parse(name).unwrap()
    }

    fn lv(name: &str) -> LvName {
        LvName::parse(name).unwrap()
    }

    #[test]
    fn accepts_names_lvm_accepts() {
        for name in ["vg0", "ferrovol", "a", "A+b_c.d-e", "0", "...", ".a", "a..", "x-"] {
            assert_eq!(VgName::parse(name).unwrap().as_str(), name);
            assert_eq!(LvName::parse(name).unwrap().to_string(), name);
        }
        assert!(LvName::parse("pvc-0c4e5d1a-8a1b-4b5e-9a53-2f3c1a7f0b11").is_ok());
        // Reserved words only count as prefixes or as the listed substrings.
        for name in ["xpvmove", "my_snapshot", "x_tpool", "x_real", "x_cow", "tdata", "x_idata"] {
            assert!(LvName::parse(name).is_ok(), "{name}");
        }
        // VG names have no reserved words.
        assert!(VgName::parse("snapshot").is_ok());
        assert!(VgName::parse("x_tmeta").is_ok());
    }

    #[test]
    fn rejects_what_lvm_rejects() {
        for kind_parse in [|s: &str| VgName::parse(s).map(|_| ()), |s: &str| LvName::parse(s).map(|_| ())] {
            assert!(matches!(kind_parse(""), Err(NameError::Empty { .. })));
            assert!(matches!(kind_parse("-a"), Err(NameError::LeadingHyphen { .. })));
            assert!(matches!(kind_parse("."), Err(NameError::Dots { .. })));
            assert!(matches!(kind_parse(".."), Err(NameError::Dots { .. })));
            for bad in ["a b", "a/b", "a@b", "a:b", "a=b", "é", "a\n", "a,b"] {
                assert!(matches!(kind_parse(bad), Err(NameError::Character { .. })), "{bad:?}");
            }
        }
        let err = LvName::parse("a b").unwrap_err();
        assert_eq!(err.to_string(), "logical volume name \"a b\" contains ' '; allowed are A-Z a-z 0-9 + _ . -");
    }

    #[test]
    fn length_limit_is_127_bytes() {
        let ok = "b".repeat(127);
        assert!(VgName::parse(&ok).is_ok());
        assert!(LvName::parse(&ok).is_ok());
        let long = "b".repeat(128);
        assert_eq!(
            LvName::parse(&long).unwrap_err(),
            NameError::TooLong { kind: NameKind::LogicalVolume, name: long.clone(), len: 128, max: 127 }
        );
        assert!(matches!(VgName::parse(&long), Err(NameError::TooLong { .. })));
    }

    #[test]
    fn reserved_lv_names() {
        for name in ["snapshot", "snapshot1", "pvmove", "pvmove0"] {
            assert!(matches!(LvName::parse(name), Err(NameError::ReservedPrefix { .. })), "{name}");
        }
        // Each one lvm 2.03.16 answered with 'Names including "…" are reserved', plus _vpool.
        for reserved in RESERVED_LV_SUBSTRINGS {
            let name = format!("x{reserved}y");
            assert_eq!(
                LvName::parse(&name).unwrap_err(),
                NameError::ReservedSubstring { name: name.clone(), reserved },
                "{name}"
            );
        }
        assert!(LvName::parse("pool_tdata").unwrap_err().to_string().contains("\"_tdata\""));
    }

    #[test]
    fn full_name_limits() {
        assert_eq!(MAX_FULL_NAME_BYTES, 118);
        let vg6 = vg("lvmexp");
        assert!(check_full_name(&vg6, &lv(&"e".repeat(112))).is_ok());
        assert_eq!(
            check_full_name(&vg6, &lv(&"e".repeat(113))).unwrap_err(),
            NameError::FullNameTooLong { vg: "lvmexp".into(), lv: "e".repeat(113), len: 119, max: 118 }
        );
        // Hyphens double in the device-mapper name.
        assert_eq!(dm_name(&vg("my-vg"), &lv("pvc-1")), "my--vg-pvc--1");
        let hyphens = lv(&"d-".repeat(40));
        assert_eq!(dm_name(&vg6, &hyphens).len(), 6 + 1 + 120);
        assert!(matches!(
            check_full_name(&vg6, &hyphens),
            Err(NameError::DeviceNameTooLong { len: 127, max: 121, .. })
        ));
        assert!(check_full_name(&vg6, &lv(&"d-".repeat(38))).is_ok());
        // A CSI-style name fits with room to spare.
        assert!(check_full_name(&vg("ferrovol"), &lv("pvc-0c4e5d1a-8a1b-4b5e-9a53-2f3c1a7f0b11")).is_ok());
    }

    #[test]
    fn tags() {
        for tag in ["ferrovol", "ferrovol.volume=pvc-1", "a/b=c!d:e#f&g+h_i.j-k", "A9", "x-"] {
            assert_eq!(Tag::parse(tag).unwrap().as_str(), tag);
        }
        assert!(Tag::parse(&"t".repeat(128)).is_ok());
        assert!(matches!(Tag::parse(&"t".repeat(129)), Err(NameError::TooLong { len: 129, max: 128, .. })));
        assert!(matches!(Tag::parse(""), Err(NameError::Empty { kind: NameKind::Tag })));
        assert!(matches!(Tag::parse("-a"), Err(NameError::LeadingHyphen { .. })));
        // ',' separates tags in lvm's reports; '@' marks a tag reference on the command line.
        for bad in ["a,b", "@a", "a b", "a\"b", "a;b", "a*", "ü"] {
            assert!(matches!(Tag::parse(bad), Err(NameError::Character { .. })), "{bad:?}");
        }
        assert_eq!(
            Tag::parse("a,b").unwrap_err().to_string(),
            "LVM tag \"a,b\" contains ','; allowed are A-Z a-z 0-9 + _ . - / = ! : # &"
        );
    }
}
