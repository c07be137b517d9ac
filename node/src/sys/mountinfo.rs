//! The mount table as the kernel states it in /proc/self/mountinfo, parsed into entries.
//!
//! Line format (proc(5)):
//! `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`:
//! mount id, parent id, major:minor, root, mount point, mount options, optional fields up to a
//! lone `-`, then filesystem type, source and superblock options. Fields are separated by single
//! spaces; the kernel escapes space, tab, newline and backslash inside a field as `\ooo`.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use super::{with_context, Context};

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// One mount, as one line of mountinfo describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    pub parent_id: u32,
    /// Device numbers of the mounted filesystem (an anonymous device for tmpfs, overlay, ...).
    pub major: u32,
    pub minor: u32,
    /// The directory of the filesystem that is mounted here (not "/" for a bind of a subtree).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options: `rw`/`ro`, `nosuid`, `noatime`, ...
    pub options: String,
    /// Propagation and other tagged fields: `shared:N`, `master:N`, `propagate_from:N`, ...
    pub optional_fields: Vec<String>,
    pub fs_type: String,
    pub source: String,
    /// Options of the filesystem instance, shared by every mount of it.
    pub super_options: String,
}

/// Parses mountinfo text. Lines that do not have the kernel's shape are skipped.
pub fn parse(text: &str) -> Vec<MountEntry> {
    parse_bytes(text.as_bytes())
}

/// Mount points are bytes, not necessarily UTF-8, so the file is parsed as bytes.
fn parse_bytes(text: &[u8]) -> Vec<MountEntry> {
    text.split(|&b| b == b'\n').filter(|line| !line.is_empty()).filter_map(parse_line).collect()
}

fn parse_line(line: &[u8]) -> Option<MountEntry> {
    let mut fields = line.split(|&b| b == b' ');
    let mount_id = number(fields.next()?)?;
    let parent_id = number(fields.next()?)?;
    let (major, minor) = {
        let dev = std::str::from_utf8(fields.next()?).ok()?;
        let (major, minor) = dev.split_once(':')?;
        (major.parse().ok()?, minor.parse().ok()?)
    };
    let root = path(fields.next()?);
    let mount_point = path(fields.next()?);
    let options = text(fields.next()?);
    let mut optional_fields = Vec::new();
    loop {
        let field = fields.next()?;
        if field == b"-" {
            break;
        }
        optional_fields.push(text(field));
    }
    let fs_type = text(fields.next()?);
    let source = text(fields.next()?);
    let super_options = text(fields.next()?);
    Some(MountEntry {
        mount_id,
        parent_id,
        major,
        minor,
        root,
        mount_point,
        options,
        optional_fields,
        fs_type,
        source,
        super_options,
    })
}

fn number(field: &[u8]) -> Option<u32> {
    std::str::from_utf8(field).ok()?.parse().ok()
}

fn path(field: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(unescape(field)))
}

fn text(field: &[u8]) -> String {
    String::from_utf8_lossy(&unescape(field)).into_owned()
}

/// Decodes the kernel's `\ooo` octal escapes; a backslash not followed by three octal digits
/// is kept as it is.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' {
            if let Some(byte) = field.get(i + 1..i + 4).and_then(octal_byte) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

fn octal_byte(digits: &[u8]) -> Option<u8> {
    let mut value: u32 = 0;
    for &d in digits {
        if !(b'0'..=b'7').contains(&d) {
            return None;
        }
        value = value * 8 + u32::from(d - b'0');
    }
    u8::try_from(value).ok()
}

/// Reads and parses this process's mount table.
pub fn read() -> io::Result<Vec<MountEntry>> {
    let bytes = fs::read(MOUNTINFO).context(|| format!("read {MOUNTINFO}"))?;
    Ok(parse_bytes(&bytes))
}

/// The mount at exactly `path` (compared as given: pass a canonical path). When several mounts
/// are stacked on one point, the last one listed is the one on top, the one that is visible.
pub fn find_by_mount_point<'a>(entries: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    entries.iter().rev().find(|entry| entry.mount_point == path)
}

/// Every mount of the filesystem on device `major:minor` (the first mount and its binds).
pub fn mounts_of_device(entries: &[MountEntry], major: u32, minor: u32) -> Vec<&MountEntry> {
    entries.iter().filter(|entry| entry.major == major && entry.minor == minor).collect()
}

/// Whether something is mounted at `path`.
///
/// The mount table is the authority: comparing device numbers with the parent directory
/// misses a bind mount of a directory of the same filesystem. `path` itself is not resolved
/// when it is not a symlink, so a mount whose filesystem stopped answering (a dead FUSE
/// server: ENOTCONN on every stat) still reads as a mount point and can be unmounted.
pub fn is_mount_point(path: &Path) -> io::Result<bool> {
    let resolved = resolve_without_touching(path)?;
    Ok(find_by_mount_point(&read()?, &resolved).is_some())
}

fn resolve_without_touching(path: &Path) -> io::Result<PathBuf> {
    let describe = || format!("resolve {}", path.display());
    let follow = match fs::symlink_metadata(path) {
        Ok(meta) => meta.file_type().is_symlink(),
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Err(with_context(err, describe())),
        // The entry exists but cannot be inspected: most likely a broken mount on it.
        Err(_) => false,
    };
    match (follow, path.parent(), path.file_name()) {
        (false, Some(parent), Some(name)) => {
            let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
            Ok(fs::canonicalize(parent).context(describe)?.join(name))
        }
        _ => fs::canonicalize(path).context(describe),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
24 22 0:5 / /dev rw,nosuid,relatime shared:2 - devtmpfs udev rw,size=4046k,mode=755
40 22 7:3 / /var/lib/kubelet/plugins/kubernetes.io/csi/ferrovol/ab12/globalmount rw,relatime shared:30 - ext4 /dev/loop3 rw
41 22 7:3 /data /var/lib/kubelet/pods/uid/volumes/kubernetes.io~csi/pvc-1/mount ro,nosuid,relatime shared:30 master:7 - ext4 /dev/loop3 rw
42 22 0:50 / /mnt/with\\040space\\011tab rw,relatime - tmpfs  rw,size=1024k
43 22 0:51 / /mnt/stacked rw - tmpfs first rw
44 43 0:52 / /mnt/stacked rw - tmpfs second rw
45 22 0:53 / /mnt/back\\134slash\\012nl rw - fuse.s3 s3\\040bucket rw,user_id=0
garbage line
46 22 0:54 / /mnt/short rw - tmpfs
";

    #[test]
    fn parses_every_field() {
        let entries = parse(SAMPLE);
        assert_eq!(entries.len(), 9, "the two malformed lines are skipped");
        let root = &entries[0];
        assert_eq!(
            root,
            &MountEntry {
                mount_id: 22,
                parent_id: 1,
                major: 252,
                minor: 1,
                root: PathBuf::from("/"),
                mount_point: PathBuf::from("/"),
                options: "rw,relatime".into(),
                optional_fields: vec!["shared:1".into()],
                fs_type: "ext4".into(),
                source: "/dev/vda1".into(),
                super_options: "rw,errors=remount-ro".into(),
            }
        );
    }

    #[test]
    fn optional_fields_are_collected_up_to_the_separator() {
        let entries = parse(SAMPLE);
        let publish = &entries[4];
        assert_eq!(publish.optional_fields, vec!["shared:30", "master:7"]);
        assert_eq!(publish.root, PathBuf::from("/data"));
        assert_eq!(publish.options, "ro,nosuid,relatime");
        assert_eq!(publish.fs_type, "ext4");
        assert_eq!(publish.source, "/dev/loop3");
        let no_optional = &entries[6];
        assert!(no_optional.optional_fields.is_empty());
        assert_eq!(no_optional.source, "first");
    }

    #[test]
    fn escapes_are_decoded() {
        let entries = parse(SAMPLE);
        assert_eq!(entries[5].mount_point, PathBuf::from("/mnt/with space\ttab"));
        assert_eq!(entries[5].source, "", "an empty source is an empty field");
        assert_eq!(entries[5].super_options, "rw,size=1024k");
        assert_eq!(entries[8].mount_point, PathBuf::from("/mnt/back\\slash\nnl"));
        assert_eq!(entries[8].source, "s3 bucket");
        assert_eq!(entries[8].fs_type, "fuse.s3");
    }

    #[test]
    fn unescape_keeps_what_is_not_an_escape() {
        assert_eq!(unescape(b"a\\040b"), b"a b");
        assert_eq!(unescape(b"a\\04"), b"a\\04");
        assert_eq!(unescape(b"a\\089"), b"a\\089");
        assert_eq!(unescape(b"\\"), b"\\");
        assert_eq!(unescape(b"\\777"), b"\\777", "not a byte");
    }

    #[test]
    fn non_utf8_mount_points_survive() {
        let line = b"50 22 0:60 / /mnt/\xff\xfe rw - tmpfs tmpfs rw\n";
        let entries = parse_bytes(line);
        assert_eq!(entries[0].mount_point, PathBuf::from(OsString::from_vec(b"/mnt/\xff\xfe".to_vec())));
    }

    #[test]
    fn last_stacked_mount_wins() {
        let entries = parse(SAMPLE);
        let top = find_by_mount_point(&entries, Path::new("/mnt/stacked")).unwrap();
        assert_eq!(top.mount_id, 44);
        assert_eq!(top.source, "second");
        assert!(find_by_mount_point(&entries, Path::new("/mnt")).is_none());
        assert!(find_by_mount_point(&entries, Path::new("/mnt/stacked/")).is_some());
    }

    #[test]
    fn mounts_of_a_device_include_its_binds() {
        let entries = parse(SAMPLE);
        let ids: Vec<u32> = mounts_of_device(&entries, 7, 3).iter().map(|e| e.mount_id).collect();
        assert_eq!(ids, vec![40, 41]);
        assert!(mounts_of_device(&entries, 7, 4).is_empty());
    }

    #[test]
    fn reads_this_process_table() {
        let entries = read().unwrap();
        assert!(find_by_mount_point(&entries, Path::new("/")).is_some());
        assert!(is_mount_point(Path::new("/")).unwrap());
        assert!(is_mount_point(Path::new("/proc")).unwrap());
        assert!(!is_mount_point(Path::new("/proc/self")).unwrap());
        let err = is_mount_point(Path::new("/no/such/ferrovol/path")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("/no/such/ferrovol/path"), "{err}");
    }
}
