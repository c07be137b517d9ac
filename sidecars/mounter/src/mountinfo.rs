//! The few facts the mounter needs from `/proc/self/mountinfo`: which paths are mount
//! points, with which filesystem type and source (so it finds its own `fuse.ferrovol`
//! mounts, live or left behind by a mounter that died).

use std::path::{Path, PathBuf};

/// The filesystem type our mounts show.
pub const FSTYPE: &str = "fuse.ferrovol";

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') as u32 * 64 + (b[i + 2] - b'0') as u32 * 8 + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text; lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let source = r.next().unwrap_or_default();
            Some(Mount {
                mount_point: PathBuf::from(unescape(mount_point)),
                fstype: unescape(fstype),
                source: unescape(source),
            })
        })
        .collect()
}

/// The mounts of this process's namespace now.
pub fn read() -> std::io::Result<Vec<Mount>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// The mount at `path`, the last one when several are stacked.
pub fn at(mounts: &[Mount], path: &Path) -> Option<Mount> {
    mounts.iter().rev().find(|m| m.mount_point == path).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_with_escapes() {
        let text =
            "36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - fuse.ferrovol ferrovol:s3.vol:b:pvc-1 rw,user_id=0\n\
                    37 35 0:5 / /proc rw - proc proc rw\n\
                    garbage\n";
        let m = parse(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/a b"));
        assert_eq!(m[0].fstype, FSTYPE);
        assert_eq!(m[0].source, "ferrovol:s3.vol:b:pvc-1");
        assert_eq!(at(&m, Path::new("/proc")).map(|m| m.fstype), Some("proc".to_string()));
        assert_eq!(at(&m, Path::new("/nope")), None);
    }
}
