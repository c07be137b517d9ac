//! Mounting and unmounting through mount(2), and turning the CO's untrusted mount options into flags and a data string.

use std::io;
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::statvfs::{statvfs, FsFlags};

use super::{with_context, Context};

/// The longest single option we pass on; real ones are far shorter.
const MAX_OPTION_LEN: usize = 256;
/// The kernel copies at most one page of mount data and cuts the rest silently.
const MAX_DATA_LEN: usize = 4095;

/// Flags that mount(8) spells as options, and what each one does to the flag set.
const FLAG_OPTIONS: &[(&str, FlagChange)] = &[
    ("ro", FlagChange::Set(MsFlags::MS_RDONLY)),
    ("rw", FlagChange::Clear(MsFlags::MS_RDONLY)),
    ("nosuid", FlagChange::Set(MsFlags::MS_NOSUID)),
    ("suid", FlagChange::Clear(MsFlags::MS_NOSUID)),
    ("nodev", FlagChange::Set(MsFlags::MS_NODEV)),
    ("dev", FlagChange::Clear(MsFlags::MS_NODEV)),
    ("noexec", FlagChange::Set(MsFlags::MS_NOEXEC)),
    ("exec", FlagChange::Clear(MsFlags::MS_NOEXEC)),
    ("sync", FlagChange::Set(MsFlags::MS_SYNCHRONOUS)),
    ("async", FlagChange::Clear(MsFlags::MS_SYNCHRONOUS)),
    ("dirsync", FlagChange::Set(MsFlags::MS_DIRSYNC)),
    ("lazytime", FlagChange::Set(MsFlags::MS_LAZYTIME)),
    ("nolazytime", FlagChange::Clear(MsFlags::MS_LAZYTIME)),
    ("nodiratime", FlagChange::Set(MsFlags::MS_NODIRATIME)),
    ("diratime", FlagChange::Clear(MsFlags::MS_NODIRATIME)),
    ("noatime", FlagChange::Atime(MsFlags::MS_NOATIME)),
    ("relatime", FlagChange::Atime(MsFlags::MS_RELATIME)),
    ("strictatime", FlagChange::Atime(MsFlags::MS_STRICTATIME)),
    ("atime", FlagChange::Clear(MsFlags::MS_NOATIME)),
];

/// Options that turn a mount into another operation on existing mounts.
const REFUSED_OPTIONS: &[(&str, &str)] = &[
    ("bind", "a bind mount would expose a host path instead of the volume"),
    ("rbind", "a bind mount would expose a host path instead of the volume"),
    ("remount", "a remount would change a mount that already exists"),
    ("move", "a move would relocate a mount that already exists"),
];

#[derive(Debug, Clone, Copy)]
enum FlagChange {
    Set(MsFlags),
    Clear(MsFlags),
    /// The atime modes exclude each other; as with mount(8), the last one given wins.
    Atime(MsFlags),
}

fn atime_modes() -> MsFlags {
    MsFlags::MS_NOATIME | MsFlags::MS_RELATIME | MsFlags::MS_STRICTATIME
}

/// Splits the CO's `mount_flags` into mount(2) flags and the filesystem's data string.
///
/// The options are untrusted: each must be one option (no `,` smuggling a second one in),
/// printable, without whitespace, with a non-empty key before any `=`, and at most 256 bytes.
/// `bind`, `rbind`, `remount` and `move` are refused. Options that are not flags go to the
/// filesystem unchanged, in order, which rejects those it does not know.
pub fn parse_options(opts: &[String]) -> Result<(MsFlags, String), String> {
    let mut flags = MsFlags::empty();
    let mut data: Vec<&str> = Vec::new();
    for opt in opts {
        check_option(opt)?;
        if let Some((_, why)) = REFUSED_OPTIONS.iter().find(|(name, _)| *name == opt) {
            return Err(format!("mount option {opt:?} is not allowed: {why}"));
        }
        match FLAG_OPTIONS.iter().find(|(name, _)| *name == opt) {
            Some((_, FlagChange::Set(flag))) => flags.insert(*flag),
            Some((_, FlagChange::Clear(flag))) => flags.remove(*flag),
            Some((_, FlagChange::Atime(mode))) => {
                flags.remove(atime_modes());
                flags.insert(*mode);
            }
            None => data.push(opt),
        }
    }
    let data = data.join(",");
    if data.len() > MAX_DATA_LEN {
        return Err(format!(
            "mount options for the filesystem are {} bytes long; the kernel takes at most {MAX_DATA_LEN}",
            data.len()
        ));
    }
    Ok((flags, data))
}

fn check_option(opt: &str) -> Result<(), String> {
    let problem = if opt.is_empty() {
        Some("it is empty")
    } else if opt.len() > MAX_OPTION_LEN {
        Some("it is longer than 256 bytes")
    } else if opt.contains(',') {
        Some("it contains ',' (give each option separately)")
    } else if opt.contains('\0') {
        Some("it contains a NUL byte")
    } else if opt.chars().any(char::is_whitespace) {
        Some("it contains whitespace")
    } else if opt.chars().any(char::is_control) {
        Some("it contains a control character")
    } else if opt.starts_with('=') {
        Some("it has an empty name before '='")
    } else {
        None
    };
    match problem {
        Some(why) => {
            // Cut what we echo back: the option is untrusted and may be huge.
            let shown: String = opt.chars().take(64).collect();
            Err(format!("invalid mount option {shown:?}: {why}"))
        }
        None => Ok(()),
    }
}

/// Mounts the filesystem on `source` at `target`.
pub fn mount_fs(source: &Path, target: &Path, fs_type: &str, flags: MsFlags, data: &str) -> io::Result<()> {
    let data = (!data.is_empty()).then_some(data);
    mount(Some(source), target, Some(fs_type), flags, data).context(|| {
        format!(
            "mount {fs_type} {} on {} (flags {flags:?}, options {:?})",
            source.display(),
            target.display(),
            option_names(data.unwrap_or(""))
        )
    })
}

/// The data string with values masked: error messages reach logs, and a value may be a
/// credential (`password=`, `key=`).
fn option_names(data: &str) -> String {
    data.split(',')
        .filter(|opt| !opt.is_empty())
        .map(|opt| match opt.split_once('=') {
            Some((key, _)) => format!("{key}=…"),
            None => opt.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Bind-mounts `source` at `target`, read-only and with `extra` per-mount flags if asked.
/// Not recursive: mounts below `source` do not appear under `target`.
///
/// The kernel ignores every flag but MS_REC on the bind itself, so flags need a second
/// MS_REMOUNT|MS_BIND call. That call replaces the per-mount flags wholesale, so the flags
/// the new mount inherited from its source (ro, nosuid, nodev, noexec) are kept: a bind never
/// grants more than its source. Superblock flags (sync, dirsync, lazytime) cannot change per
/// mount and are ignored by the kernel here. If the remount fails, the bind is taken away
/// again, so a caller never gets a writable mount where it asked for a read-only one.
pub fn bind(source: &Path, target: &Path, read_only: bool, extra: MsFlags) -> io::Result<()> {
    mount(Some(source), target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .context(|| format!("bind {} on {}", source.display(), target.display()))?;

    let mut wanted = extra;
    if read_only {
        wanted |= MsFlags::MS_RDONLY;
    }
    if wanted.is_empty() {
        return Ok(());
    }
    let remount = || -> io::Result<()> {
        let inherited =
            statvfs(target).context(|| format!("read the flags of the new bind mount {}", target.display()))?.flags();
        let flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | wanted | restrictions_of(inherited);
        mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
            .context(|| format!("remount the bind of {} on {} with {flags:?}", source.display(), target.display()))
    };
    remount().inspect_err(|_| {
        // Lazy: nobody can have started using a mount made a moment ago, and the undo must
        // not fail half-way.
        let _ = umount2(target, MntFlags::MNT_DETACH);
    })
}

fn restrictions_of(inherited: FsFlags) -> MsFlags {
    let mut flags = MsFlags::empty();
    for (st, ms) in [
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
    ] {
        if inherited.contains(st) {
            flags |= ms;
        }
    }
    flags
}

/// Unmounts whatever is mounted on top at `target`.
///
/// Returns `Ok(false)` when `target` is not a mount point (EINVAL), which makes repeated calls
/// safe. A busy mount is an error: forcing or detaching it would hide open files from the
/// caller, who has to decide.
pub fn unmount(target: &Path) -> io::Result<bool> {
    // NOFOLLOW: a symlink swapped in at the target cannot redirect the unmount elsewhere.
    match umount2(target, MntFlags::UMOUNT_NOFOLLOW) {
        Ok(()) => Ok(true),
        Err(Errno::EINVAL) => Ok(false),
        Err(Errno::EBUSY) => Err(with_context(
            Errno::EBUSY,
            format!(
                "unmount {}: the mount is in use (open files, a working directory or mounts below it)",
                target.display()
            ),
        )),
        Err(err) => Err(with_context(err, format!("unmount {}", target.display()))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn opts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn known_flags_become_ms_flags_and_the_rest_data() {
        let (flags, data) = parse_options(&opts(&[
            "ro",
            "noatime",
            "nosuid",
            "nodev",
            "noexec",
            "sync",
            "dirsync",
            "lazytime",
            "nodiratime",
            "errors=remount-ro",
            "discard",
        ]))
        .unwrap();
        assert_eq!(
            flags,
            MsFlags::MS_RDONLY
                | MsFlags::MS_NOATIME
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC
                | MsFlags::MS_SYNCHRONOUS
                | MsFlags::MS_DIRSYNC
                | MsFlags::MS_LAZYTIME
                | MsFlags::MS_NODIRATIME
        );
        assert_eq!(data, "errors=remount-ro,discard");
    }

    #[test]
    fn empty_list_is_no_flags_no_data() {
        assert_eq!(parse_options(&[]).unwrap(), (MsFlags::empty(), String::new()));
    }

    #[test]
    fn later_options_override_earlier_ones() {
        let (flags, _) = parse_options(&opts(&["ro", "rw"])).unwrap();
        assert!(!flags.contains(MsFlags::MS_RDONLY));
        let (flags, _) = parse_options(&opts(&["rw", "ro"])).unwrap();
        assert!(flags.contains(MsFlags::MS_RDONLY));
        let (flags, _) = parse_options(&opts(&["noatime", "relatime"])).unwrap();
        assert_eq!(flags, MsFlags::MS_RELATIME);
        let (flags, _) = parse_options(&opts(&["relatime", "strictatime"])).unwrap();
        assert_eq!(flags, MsFlags::MS_STRICTATIME);
        let (flags, _) = parse_options(&opts(&["noexec", "exec", "nosuid", "suid"])).unwrap();
        assert_eq!(flags, MsFlags::empty());
    }

    #[test]
    fn refuses_mount_operations_with_a_reason() {
        for op in ["bind", "rbind", "remount", "move"] {
            let err = parse_options(&opts(&["ro", op])).unwrap_err();
            assert!(err.contains(&format!("{op:?}")), "{err}");
            assert!(err.contains("not allowed"), "{err}");
        }
    }

    #[test]
    fn refuses_malformed_options_naming_them() {
        let cases = [
            ("a,b", "','"),
            ("uid=0\0", "NUL"),
            ("no atime", "whitespace"),
            ("tab\there", "whitespace"),
            ("=value", "empty name"),
            ("", "empty"),
            ("bell\u{7}", "control"),
        ];
        for (opt, why) in cases {
            let err = parse_options(&opts(&["noatime", opt])).unwrap_err();
            assert!(err.contains(why), "{opt:?}: {err}");
            assert!(err.starts_with("invalid mount option"), "{err}");
        }
        let long = "x".repeat(257);
        let err = parse_options(&[long]).unwrap_err();
        assert!(err.contains("longer than 256"), "{err}");
        assert!(err.len() < 200, "a huge option is not echoed whole: {err}");
        assert!(parse_options(&["x".repeat(256)]).is_ok());
    }

    #[test]
    fn keys_with_values_and_lookalikes_go_to_data() {
        let (flags, data) =
            parse_options(&opts(&["ro=1", "bind=x", "context=system_u:object_r:x_t:s0", "a="])).unwrap();
        assert_eq!(flags, MsFlags::empty());
        assert_eq!(data, "ro=1,bind=x,context=system_u:object_r:x_t:s0,a=");
    }

    #[test]
    fn refuses_data_beyond_one_page() {
        let many: Vec<String> = (0..20).map(|i| format!("opt{i}={}", "v".repeat(240))).collect();
        let err = parse_options(&many).unwrap_err();
        assert!(err.contains("4095"), "{err}");
    }

    #[test]
    fn error_messages_mask_option_values() {
        assert_eq!(option_names("discard,password=hunter2,errors=remount-ro"), "discard,password=…,errors=…");
        assert_eq!(option_names(""), "");
    }

    #[test]
    fn inherited_restrictions_are_mapped() {
        let flags = restrictions_of(FsFlags::ST_NOSUID | FsFlags::ST_NODEV | FsFlags::ST_NOATIME);
        assert_eq!(flags, MsFlags::MS_NOSUID | MsFlags::MS_NODEV);
    }
}

#[cfg(all(test, feature = "kernel-tests"))]
#[allow(clippy::unwrap_used)]
mod kernel_tests {
    use std::fs;

    use super::*;
    use crate::sys::errno;
    use crate::sys::mountinfo::{self, is_mount_point};
    use crate::sys::test_fixtures::{mkfs, sparse_image, AttachedLoop, Mounted, ScratchFs, MIB};

    #[test]
    fn ext4_on_loop_with_a_read_only_bind() {
        let dir = tempfile::tempdir().unwrap();
        let image = sparse_image(dir.path(), "vol.img", 64 * MIB);
        let device = AttachedLoop::attach(&image, false);
        mkfs("ext4", &device.dev.path());

        let stage = dir.path().join("stage");
        let publish = dir.path().join("publish");
        fs::create_dir(&stage).unwrap();
        fs::create_dir(&publish).unwrap();
        assert!(!is_mount_point(&stage).unwrap());

        let (flags, data) = parse_options(&["noatime".into(), "errors=remount-ro".into()]).unwrap();
        mount_fs(&device.dev.path(), &stage, "ext4", flags, &data).unwrap();
        let staged = Mounted::adopt(&stage);
        assert!(is_mount_point(&stage).unwrap());
        fs::write(stage.join("hello"), b"world").unwrap();

        bind(&stage, &publish, true, MsFlags::empty()).unwrap();
        let published = Mounted::adopt(&publish);
        assert!(is_mount_point(&publish).unwrap());
        assert_eq!(fs::read(publish.join("hello")).unwrap(), b"world");
        let err = fs::write(publish.join("denied"), b"x").unwrap_err();
        assert_eq!(errno(&err), Some(libc::EROFS), "{err}");
        // The staging mount stays writable.
        fs::write(stage.join("allowed"), b"x").unwrap();

        let table = mountinfo::read().unwrap();
        let entry = mountinfo::find_by_mount_point(&table, &fs::canonicalize(&publish).unwrap()).unwrap();
        assert_eq!(entry.fs_type, "ext4");
        assert!(entry.options.split(',').any(|o| o == "ro"), "{entry:?}");
        let (major, minor) = block_numbers(&device.dev.path());
        assert_eq!(mountinfo::mounts_of_device(&table, major, minor).len(), 2);

        published.forget();
        assert!(unmount(&publish).unwrap());
        assert!(!unmount(&publish).unwrap(), "second unmount finds nothing");
        assert!(!is_mount_point(&publish).unwrap());
        staged.forget();
        assert!(unmount(&stage).unwrap());
        assert!(!is_mount_point(&stage).unwrap());
    }

    #[test]
    fn bind_keeps_the_restrictions_of_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let scratch =
            ScratchFs::with_flags(dir.path(), "nosuid", "ext4", 32 * MIB, MsFlags::MS_NOSUID | MsFlags::MS_NODEV);
        let publish = dir.path().join("publish");
        fs::create_dir(&publish).unwrap();

        bind(scratch.root(), &publish, false, MsFlags::MS_NOEXEC).unwrap();
        let _published = Mounted::adopt(&publish);
        let flags = statvfs(&publish).unwrap().flags();
        assert!(flags.contains(FsFlags::ST_NOEXEC));
        assert!(flags.contains(FsFlags::ST_NOSUID), "{flags:?}");
        assert!(flags.contains(FsFlags::ST_NODEV), "{flags:?}");
        assert!(!flags.contains(FsFlags::ST_RDONLY));
    }

    #[test]
    fn unmount_of_a_busy_mount_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = ScratchFs::new(dir.path(), "busy", "ext4", 32 * MIB);
        let open = fs::File::create(scratch.root().join("held-open")).unwrap();

        let err = unmount(scratch.root()).unwrap_err();
        assert_eq!(errno(&err), Some(libc::EBUSY));
        assert!(err.to_string().contains(&scratch.root().display().to_string()), "{err}");
        drop(open);
        assert!(is_mount_point(scratch.root()).unwrap());
    }

    #[test]
    fn mount_errors_name_source_and_target() {
        let dir = tempfile::tempdir().unwrap();
        let image = sparse_image(dir.path(), "blank.img", 16 * MIB);
        let device = AttachedLoop::attach(&image, false);
        let target = dir.path().join("mnt");
        fs::create_dir(&target).unwrap();

        // No filesystem on the device yet.
        let err = mount_fs(&device.dev.path(), &target, "ext4", MsFlags::empty(), "journal_checksum,stripe=secret-ish")
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("stripe=…"), "{text}");
        assert!(!text.contains("secret-ish"), "{text}");
        assert!(text.contains(&device.dev.path().display().to_string()), "{text}");
        assert!(text.contains("mnt"), "{text}");
        assert!(!is_mount_point(&target).unwrap());

        let missing = dir.path().join("missing");
        let err = unmount(&missing).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("missing"), "{err}");
    }

    fn block_numbers(path: &Path) -> (u32, u32) {
        use std::os::unix::fs::MetadataExt;
        let rdev = fs::metadata(path).unwrap().rdev();
        (u32::try_from(nix::sys::stat::major(rdev)).unwrap(), u32::try_from(nix::sys::stat::minor(rdev)).unwrap())
    }
}
