//! Conversions between CSI protobuf messages and the core's checked types, shared by the
//! Node and Controller adapters. Every check of a request's shape happens here, so the
//! services below never see an unchecked capability.

use ferrovol_core::error::{Error, Result};
use ferrovol_core::volume::{AccessMode, AccessType, Capability, FsType};
use ferrovol_proto::csi::v1 as csi;

use csi::volume_capability::access_mode::Mode;

/// Checks one volume capability.
pub fn capability(field: &'static str, cap: &csi::VolumeCapability) -> Result<Capability> {
    let mode = cap.access_mode.as_ref().ok_or_else(|| Error::invalid(field, "access_mode is missing"))?;
    let access_mode = match Mode::try_from(mode.mode) {
        Ok(Mode::SingleNodeWriter) => AccessMode::SingleNodeWriter,
        Ok(Mode::SingleNodeReaderOnly) => AccessMode::SingleNodeReaderOnly,
        Ok(Mode::SingleNodeSingleWriter) => AccessMode::SingleNodeSingleWriter,
        Ok(Mode::SingleNodeMultiWriter) => AccessMode::SingleNodeMultiWriter,
        Ok(Mode::MultiNodeReaderOnly) => AccessMode::MultiNodeReaderOnly,
        Ok(Mode::MultiNodeSingleWriter) => AccessMode::MultiNodeSingleWriter,
        Ok(Mode::MultiNodeMultiWriter) => AccessMode::MultiNodeMultiWriter,
        Ok(Mode::Unknown) | Err(_) => {
            return Err(Error::invalid(field, format!("access mode {} is unknown", mode.mode)))
        }
    };
    let access_type = match &cap.access_type {
        None => return Err(Error::invalid(field, "access_type (mount or block) is missing")),
        Some(csi::volume_capability::AccessType::Block(_)) => AccessType::Block,
        Some(csi::volume_capability::AccessType::Mount(m)) => {
            if !m.volume_mount_group.is_empty() {
                return Err(Error::UnsupportedCapability {
                    reason: "volume_mount_group is not supported (the driver does not advertise VOLUME_MOUNT_GROUP)"
                        .into(),
                });
            }
            let fs_type = match m.fs_type.as_str() {
                "" => None,
                other => Some(FsType::parse(other, "volume_capability.mount.fs_type")?),
            };
            AccessType::Mount { fs_type, mount_flags: m.mount_flags.clone() }
        }
    };
    Ok(Capability { access_type, access_mode })
}

/// Checks a non-empty list of capabilities.
pub fn capabilities(caps: &[csi::VolumeCapability]) -> Result<Vec<Capability>> {
    if caps.is_empty() {
        return Err(Error::invalid("volume_capabilities", "at least one capability is required"));
    }
    caps.iter().map(|c| capability("volume_capabilities", c)).collect()
}

/// Checks a required single capability.
pub fn required_capability(cap: &Option<csi::VolumeCapability>) -> Result<Capability> {
    capability("volume_capability", cap.as_ref().ok_or_else(|| Error::invalid("volume_capability", "is required"))?)
}

/// A condition as the protobuf message.
pub fn condition(c: &ferrovol_core::volume::Condition) -> csi::VolumeCondition {
    csi::VolumeCondition { abnormal: c.abnormal, message: c.message.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrovol_core::error::Code;

    fn mount(fs: &str, mode: Mode) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
            access_type: Some(csi::volume_capability::AccessType::Mount(csi::volume_capability::MountVolume {
                fs_type: fs.into(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn checks_shape_and_values() {
        let c = capability("c", &mount("xfs", Mode::SingleNodeSingleWriter)).expect("ok");
        assert_eq!(c.access_mode, AccessMode::SingleNodeSingleWriter);
        assert_eq!(
            capability("c", &mount("ntfs", Mode::SingleNodeWriter)).expect_err("fs").code(),
            Code::InvalidArgument
        );
        assert_eq!(capability("c", &mount("", Mode::Unknown)).expect_err("mode").code(), Code::InvalidArgument);
        let mut none = mount("", Mode::SingleNodeWriter);
        none.access_type = None;
        assert_eq!(capability("c", &none).expect_err("type").code(), Code::InvalidArgument);
        assert_eq!(capabilities(&[]).expect_err("empty").code(), Code::InvalidArgument);
    }
}
