//! Loop devices under our own control: attach an image file, detach, resize, and find what is attached, through the kernel's loop ioctls and sysfs.
//!
//! The ioctl numbers and structures below are the kernel's UAPI (`linux/loop.h`, `linux/fs.h`);
//! the libc crate does not carry them.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use nix::sys::stat::{makedev, mknod, Mode, SFlag};

use super::{check_syscall, errno, with_context, Context};

const LOOP_CONTROL: &str = "/dev/loop-control";
/// The loop driver's block major; used only when sysfs cannot tell us the real numbers.
const LOOP_MAJOR: u64 = 7;

const LOOP_CLR_FD: libc::Ioctl = 0x4C01;
const LOOP_GET_STATUS64: libc::Ioctl = 0x4C05;
const LOOP_SET_CAPACITY: libc::Ioctl = 0x4C07;
const LOOP_CONFIGURE: libc::Ioctl = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::Ioctl = 0x4C82;

const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;

/// `BLKGETSIZE64` is declared with `size_t` in the kernel, so its size field follows `usize`.
const BLKGETSIZE64: libc::Ioctl = nix::request_code_read!(0x12, 114, std::mem::size_of::<usize>()) as libc::Ioctl;

/// How often `attach` asks for another free device when a concurrent attacher won the race.
/// Other processes attaching at the same time (another driver's tests, losetup, a CI job)
/// can win many rounds in a row, so this is generous; with the jittered pauses below it
/// spans about a third of a second.
const ATTACH_ATTEMPTS: u32 = 64;

/// `struct loop_info64` from `linux/loop.h`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdev: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` from `linux/loop.h` (LOOP_CONFIGURE, Linux 5.8).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

impl LoopInfo64 {
    const ZERO: Self = Self {
        lo_device: 0,
        lo_inode: 0,
        lo_rdev: 0,
        lo_offset: 0,
        lo_sizelimit: 0,
        lo_number: 0,
        lo_encrypt_type: 0,
        lo_encrypt_key_size: 0,
        lo_flags: 0,
        lo_file_name: [0; LO_NAME_SIZE],
        lo_crypt_name: [0; LO_NAME_SIZE],
        lo_encrypt_key: [0; 32],
        lo_init: [0; 2],
    };
}

// The kernel copies these structs by size; a layout slip would pass garbage silently.
const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

/// A loop block device, `/dev/loop<number>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LoopDevice {
    pub number: u32,
}

impl LoopDevice {
    /// The device node, `/dev/loopN`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/loop{}", self.number))
    }

    fn sysfs_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/block/loop{}", self.number))
    }
}

/// Serializes this process's attaches (see [`attach_with`]).
static ATTACH_TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Attaches `image` to a free loop device with direct I/O and without autoclear.
///
/// Direct I/O keeps the image's data from being cached twice in host memory (once for the
/// filesystem on the loop device, once for the image file). Where the image's filesystem
/// cannot do direct I/O, the kernel either refuses the flag with EINVAL, and the device is
/// attached again without it, or switches it off by itself; [`direct_io`] tells which mode
/// the device got.
///
/// No autoclear, so the device stays attached when this process exits: a restarted node
/// plugin must find its devices still serving mounted volumes. Attaching one image twice
/// gives two devices; look for an existing one first ([`find_by_backing`]).
pub fn attach(image: &Path, read_only: bool) -> io::Result<LoopDevice> {
    attach_with(image, read_only, configure)
}

/// `attach` with the LOOP_CONFIGURE step passed in, so tests can stage the kernel's refusals.
fn attach_with(
    image: &Path,
    read_only: bool,
    mut configure: impl FnMut(&File, &File, &Path, u32) -> io::Result<()>,
) -> io::Result<LoopDevice> {
    // std opens with O_CLOEXEC. No O_DIRECT here: with LO_FLAGS_DIRECT_IO the loop driver
    // switches its own I/O on this file to direct.
    let backing = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(image)
        .context(|| format!("open loop image {}", image.display()))?;
    let control =
        OpenOptions::new().read(true).write(true).open(LOOP_CONTROL).context(|| format!("open {LOOP_CONTROL}"))?;

    let mut flags = LO_FLAGS_DIRECT_IO | if read_only { LO_FLAGS_READ_ONLY } else { 0 };
    // LOOP_CTL_GET_FREE answers the same device to everyone until one configures it, so
    // parallel attaches in this process would mostly race each other into EBUSY. Taking
    // turns here costs ~1 ms per attach; the retries below are left for other processes.
    let _turn = ATTACH_TURN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for attempt in 0..ATTACH_ATTEMPTS {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument; `control` is an open fd we own.
        let number = check_syscall(unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) })
            .context(|| format!("find a free loop device ({LOOP_CONTROL} LOOP_CTL_GET_FREE)"))?;
        let device = LoopDevice { number: number.unsigned_abs() };
        let node = open_node(&device)?;

        let mut result = configure(&node, &backing, image, flags);
        if flags & LO_FLAGS_DIRECT_IO != 0 && result.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::EINVAL)
        {
            // A property of the image's filesystem: no use asking again on the next device.
            flags &= !LO_FLAGS_DIRECT_IO;
            result = configure(&node, &backing, image, flags);
        }
        match result {
            Ok(()) => return Ok(device),
            // Another process configured the same free device between our GET_FREE and
            // CONFIGURE; ask again for the next free one.
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {
                // Jittered by process, so two processes that collided do not collide again
                // in lockstep.
                let jitter = u64::from(std::process::id().wrapping_add(attempt * 7) % 10);
                thread::sleep(Duration::from_millis(1 + jitter));
            }
            Err(err) => {
                return Err(with_context(
                    err,
                    format!("attach {} to {} (LOOP_CONFIGURE)", image.display(), device.path().display()),
                ))
            }
        }
    }
    Err(with_context(
        io::Error::from_raw_os_error(libc::EBUSY),
        format!(
            "attach {}: every free loop device was taken by another process ({ATTACH_ATTEMPTS} tries)",
            image.display()
        ),
    ))
}

fn configure(node: &File, backing: &File, image: &Path, flags: u32) -> io::Result<()> {
    let mut file_name = [0u8; LO_NAME_SIZE];
    // Informational only (old losetup shows it); keep the NUL terminator.
    let bytes = image.as_os_str().as_encoded_bytes();
    let len = bytes.len().min(LO_NAME_SIZE - 1);
    file_name[..len].copy_from_slice(&bytes[..len]);

    let config = LoopConfig {
        fd: backing.as_raw_fd().unsigned_abs(),
        // 0 lets the kernel pick: the backing device's logical block size under direct I/O.
        block_size: 0,
        info: LoopInfo64 { lo_flags: flags, lo_file_name: file_name, ..LoopInfo64::ZERO },
        reserved: [0; 8],
    };
    // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which `LoopConfig` mirrors
    // (size checked at compile time); `config` outlives the call and both fds are open.
    check_syscall(unsafe { libc::ioctl(node.as_raw_fd(), LOOP_CONFIGURE, &config as *const LoopConfig) })?;
    Ok(())
}

/// Detaches the device from its image. A device that is not attached is fine (ENXIO).
///
/// The kernel does not refuse this on a busy device: while anyone else holds it open (a
/// mounted filesystem, a process reading it) it only sets autoclear and returns success, and
/// the image is released at the last close, e.g. when the filesystem is unmounted. So a
/// successful return means "will be released", not "released"; [`image_id`] or
/// [`backing_file`] show when it actually is. Unmount first to get an immediate detach.
///
/// A device number is handed out again as soon as its device is released, so a number kept
/// from earlier may by now serve another image. To detach the device of a given image, use
/// [`detach_if_attached_to`].
pub fn detach(dev: &LoopDevice) -> io::Result<()> {
    let node = match open_node(dev) {
        Ok(node) => node,
        Err(err) if errno(&err) == Some(libc::ENXIO) => return Ok(()),
        Err(err) => return Err(err),
    };
    match clear(&node) {
        Ok(()) => Ok(()),
        Err(err) if err.raw_os_error() == Some(libc::ENXIO) => Ok(()),
        Err(err) => Err(with_context(err, format!("detach {} (LOOP_CLR_FD)", dev.path().display()))),
    }
}

/// The identity of an image file: its filesystem's device and its inode. Unlike its path it
/// survives renames and unlinking, and it cannot be taken over by a new file at the same path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageId {
    pub dev_major: u64,
    pub dev_minor: u64,
    pub inode: u64,
}

impl ImageId {
    /// The identity of the file at `path` now.
    pub fn of(path: &Path) -> io::Result<Self> {
        let meta = fs::metadata(path).context(|| format!("stat loop image {}", path.display()))?;
        Ok(Self {
            dev_major: nix::sys::stat::major(meta.dev()),
            dev_minor: nix::sys::stat::minor(meta.dev()),
            inode: meta.ino(),
        })
    }

    /// Decodes `lo_device`, which the kernel stores in its own 32-bit encoding.
    fn from_loop_info(info: &LoopInfo64) -> Self {
        let dev = info.lo_device;
        Self {
            dev_major: (dev & 0xf_ff00) >> 8,
            dev_minor: (dev & 0xff) | ((dev >> 12) & 0xf_ff00),
            inode: info.lo_inode,
        }
    }
}

/// Detaches `dev` only if it is attached to `image`; tells whether it did.
///
/// The check and the detach go through one open of the device, and while that is open the
/// binding cannot change: another process's detach waits for our close, and a bound device
/// refuses a new image. So this never detaches a device that was reused meanwhile.
pub fn detach_if_attached_to(dev: &LoopDevice, image: ImageId) -> io::Result<bool> {
    let describe = || format!("detach {} if it serves {image:?}", dev.path().display());
    let node = match open_node(dev) {
        Ok(node) => node,
        Err(err) if errno(&err) == Some(libc::ENXIO) => return Ok(false),
        Err(err) => return Err(with_context(err, describe())),
    };
    if status(&node).context(describe)? != Some(image) {
        return Ok(false);
    }
    clear(&node).context(describe)?;
    Ok(true)
}

/// The identity of the image `dev` is attached to; `None` when it is not attached (or does
/// not exist).
pub fn image_id(dev: &LoopDevice) -> io::Result<Option<ImageId>> {
    match open_node(dev) {
        Ok(node) => status(&node).context(|| format!("status of {} (LOOP_GET_STATUS64)", dev.path().display())),
        Err(err) if errno(&err) == Some(libc::ENXIO) => Ok(None),
        Err(err) => Err(err),
    }
}

fn status(node: &File) -> io::Result<Option<ImageId>> {
    let mut info = LoopInfo64::ZERO;
    // SAFETY: LOOP_GET_STATUS64 writes one `struct loop_info64`, which `LoopInfo64` mirrors
    // (size checked at compile time), into `info`; `node` is an open fd.
    let result =
        check_syscall(unsafe { libc::ioctl(node.as_raw_fd(), LOOP_GET_STATUS64, &mut info as *mut LoopInfo64) });
    match result {
        Ok(_) => Ok(Some(ImageId::from_loop_info(&info))),
        Err(err) if err.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(err) => Err(err),
    }
}

fn clear(node: &File) -> io::Result<()> {
    // SAFETY: LOOP_CLR_FD takes no argument; `node` is an open fd.
    check_syscall(unsafe { libc::ioctl(node.as_raw_fd(), LOOP_CLR_FD, 0) })?;
    Ok(())
}

/// Makes the device's size follow its image after the image file grew.
pub fn set_capacity(dev: &LoopDevice) -> io::Result<()> {
    let node = open_node(dev)?;
    // SAFETY: LOOP_SET_CAPACITY takes no argument; `node` is an open fd we own.
    check_syscall(unsafe { libc::ioctl(node.as_raw_fd(), LOOP_SET_CAPACITY, 0) })
        .context(|| format!("resize {} (LOOP_SET_CAPACITY)", dev.path().display()))?;
    Ok(())
}

/// The image a device is attached to, as the kernel names it; `None` when it is not attached.
///
/// An image that was unlinked while attached reads as `"<path> (deleted)"`.
pub fn backing_file(dev: &LoopDevice) -> Option<PathBuf> {
    let mut bytes = fs::read(dev.sysfs_dir().join("loop/backing_file")).ok()?;
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
    }
    if bytes.is_empty() {
        return None;
    }
    Some(PathBuf::from(OsString::from_vec(bytes)))
}

/// Whether the device does direct I/O to its image; false when it is not attached.
pub fn direct_io(dev: &LoopDevice) -> bool {
    fs::read_to_string(dev.sysfs_dir().join("loop/dio")).is_ok_and(|text| text.trim() == "1")
}

/// Every attached loop device with its image, ordered by device number.
pub fn list_attached() -> io::Result<Vec<(LoopDevice, PathBuf)>> {
    let mut attached = Vec::new();
    for entry in fs::read_dir("/sys/block").context(|| "list /sys/block")? {
        let entry = entry.context(|| "list /sys/block")?;
        let name = entry.file_name();
        let Some(number) = name.to_str().and_then(|n| n.strip_prefix("loop")).and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let device = LoopDevice { number };
        if let Some(image) = backing_file(&device) {
            attached.push((device, image));
        }
    }
    attached.sort();
    Ok(attached)
}

/// The loop device attached to `image`, if any.
///
/// Paths are compared after canonicalizing `image`; the kernel already shows a resolved path.
/// A device whose image was unlinked (shown with a `" (deleted)"` suffix) never matches: a file
/// now at that path is a different file.
pub fn find_by_backing(image: &Path) -> io::Result<Option<LoopDevice>> {
    let wanted = match fs::canonicalize(image) {
        Ok(path) => path,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(with_context(err, format!("resolve loop image path {}", image.display()))),
    };
    Ok(list_attached()?
        .into_iter()
        .find(|(device, backing)| *backing == wanted && !read_only(device))
        .map(|(device, _)| device))
}

/// Whether the device is marked to release its image at its last close
/// (`/sys/block/loopN/loop/autoclear`). We attach without autoclear, so on our devices this
/// means a detach was asked for while someone still held the device open (udev's probe after
/// an unmount, typically) and the release is pending.
pub fn autoclear(dev: &LoopDevice) -> bool {
    fs::read_to_string(dev.sysfs_dir().join("loop/autoclear")).is_ok_and(|s| s.trim() == "1")
}

/// Waits up to `patience` for the image's pending release (see [`autoclear`]): true when no
/// writable device serves the image any more.
pub fn wait_released(image: &Path, patience: std::time::Duration) -> io::Result<bool> {
    let deadline = std::time::Instant::now() + patience;
    loop {
        match find_by_backing(image)? {
            None => return Ok(true),
            Some(dev) if !autoclear(&dev) => return Ok(false),
            Some(_) if std::time::Instant::now() >= deadline => return Ok(false),
            Some(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}

/// Whether the device was attached read-only (`/sys/block/loopN/ro`). Read-only devices are
/// extra views of an image (read-only raw block publications), never its staged device, so
/// [`find_by_backing`] skips them.
pub fn read_only(dev: &LoopDevice) -> bool {
    fs::read_to_string(dev.sysfs_dir().join("ro")).is_ok_and(|s| s.trim() == "1")
}

/// The size in bytes of a block device.
pub fn device_size(path: &Path) -> io::Result<u64> {
    let device = File::open(path).context(|| format!("open {}", path.display()))?;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 to the pointer, which points at `size`.
    check_syscall(unsafe { libc::ioctl(device.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) })
        .context(|| format!("size of block device {} (BLKGETSIZE64)", path.display()))?;
    Ok(size)
}

/// Opens `/dev/loopN` read-write, creating the node when the kernel made a device that has none.
///
/// Only a few nodes exist at boot, and in a container /dev may not get new ones; the real
/// major:minor come from sysfs because `max_part` shifts the minors. Read-write matters:
/// LOOP_CONFIGURE through a read-only open makes a read-only device.
fn open_node(dev: &LoopDevice) -> io::Result<File> {
    let path = dev.path();
    let open = || OpenOptions::new().read(true).write(true).open(&path);
    match open() {
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            let (major, minor) = device_numbers(dev)?;
            create_block_node(&path, major, minor)?;
            open()
        }
        other => other,
    }
    .context(|| format!("open {}", path.display()))
}

fn device_numbers(dev: &LoopDevice) -> io::Result<(u64, u64)> {
    let file = dev.sysfs_dir().join("dev");
    let text = match fs::read_to_string(&file) {
        Ok(text) => text,
        // No sysfs entry: the device does not exist; say so the way the kernel would.
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(with_context(
                io::Error::from_raw_os_error(libc::ENXIO),
                format!("loop device {} does not exist", dev.path().display()),
            ))
        }
        Err(_) => return Ok((LOOP_MAJOR, u64::from(dev.number))),
    };
    parse_dev_numbers(&text).ok_or_else(|| {
        with_context(
            io::Error::from(io::ErrorKind::InvalidData),
            format!("unreadable major:minor {:?} in {}", text.trim(), file.display()),
        )
    })
}

fn parse_dev_numbers(text: &str) -> Option<(u64, u64)> {
    let (major, minor) = text.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Creates a block device node; a node that appeared meanwhile (devtmpfs) is fine.
fn create_block_node(path: &Path, major: u64, minor: u64) -> io::Result<()> {
    match mknod(path, SFlag::S_IFBLK, Mode::from_bits_truncate(0o660), makedev(major, minor)) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(err) => Err(with_context(err, format!("create block node {} ({major}:{minor})", path.display()))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn device_path_and_numbers() {
        assert_eq!(LoopDevice { number: 12 }.path(), PathBuf::from("/dev/loop12"));
        assert_eq!(parse_dev_numbers("7:12\n"), Some((7, 12)));
        assert_eq!(parse_dev_numbers("259:0"), Some((259, 0)));
        assert_eq!(parse_dev_numbers("7"), None);
        assert_eq!(parse_dev_numbers("x:1"), None);
    }

    #[test]
    fn loop_info_device_numbers_are_decoded() {
        // The kernel's new_encode_dev(259, 300).
        let info = LoopInfo64 {
            lo_device: (300 & 0xff) | (259 << 8) | ((300 & !0xff) << 12),
            lo_inode: 42,
            ..LoopInfo64::ZERO
        };
        assert_eq!(ImageId::from_loop_info(&info), ImageId { dev_major: 259, dev_minor: 300, inode: 42 });
    }
}

#[cfg(all(test, feature = "kernel-tests"))]
#[allow(clippy::unwrap_used)]
mod kernel_tests {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    use super::*;
    use crate::sys::errno;
    use crate::sys::test_fixtures::{mkfs, sparse_image, wait_until_detached, AttachedLoop, Mounted, MIB};

    #[test]
    fn attach_reports_backing_file_dio_and_size_then_detaches() {
        let dir = tempfile::tempdir().unwrap();
        let image = sparse_image(dir.path(), "attach.img", 16 * MIB);
        let device = AttachedLoop::attach(&image, false);
        let dev = device.dev;

        assert!(fs::metadata(dev.path()).unwrap().file_type().is_block_device());
        assert_eq!(backing_file(&dev), Some(fs::canonicalize(&image).unwrap()));
        assert!(direct_io(&dev), "direct I/O is off: does the temp dir's filesystem support O_DIRECT?");
        assert_eq!(device_size(&dev.path()).unwrap(), 16 * MIB);

        // Data written through the device lands in the image.
        let mut node = OpenOptions::new().write(true).open(dev.path()).unwrap();
        node.seek(SeekFrom::Start(MIB)).unwrap();
        node.write_all(&[0xAB; 4096]).unwrap();
        node.sync_all().unwrap();
        drop(node);
        let mut in_image = [0u8; 4096];
        let mut file = File::open(&image).unwrap();
        file.seek(SeekFrom::Start(MIB)).unwrap();
        file.read_exact(&mut in_image).unwrap();
        assert_eq!(in_image, [0xAB; 4096]);

        let id = ImageId::of(&image).unwrap();
        assert_eq!(image_id(&dev).unwrap(), Some(id));
        device.detach();
        // The number may already serve another process's image, so only ours is checked.
        assert_ne!(image_id(&dev).unwrap(), Some(id));
        assert_eq!(find_by_backing(&image).unwrap(), None);
        assert!(!detach_if_attached_to(&dev, id).unwrap());
    }

    #[test]
    fn detach_if_attached_to_checks_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let ours = sparse_image(dir.path(), "ours.img", 8 * MIB);
        let other = sparse_image(dir.path(), "other.img", 8 * MIB);
        let device = AttachedLoop::attach(&ours, false);

        assert!(!detach_if_attached_to(&device.dev, ImageId::of(&other).unwrap()).unwrap());
        assert!(backing_file(&device.dev).is_some());
        assert!(detach_if_attached_to(&device.dev, ImageId::of(&ours).unwrap()).unwrap());
        wait_until_detached(&device.dev, ImageId::of(&ours).unwrap());
    }

    #[test]
    fn image_without_direct_io_support_attaches_buffered() {
        let dir = tempfile::tempdir().unwrap();
        // ramfs has no direct I/O at all.
        let ramfs = dir.path().join("ramfs");
        fs::create_dir(&ramfs).unwrap();
        let _mounted = Mounted::new(Path::new("ramfs"), &ramfs, "ramfs", nix::mount::MsFlags::empty(), "");
        let image = sparse_image(&ramfs, "buffered.img", 8 * MIB);
        let device = AttachedLoop::attach(&image, false);

        assert!(!direct_io(&device.dev));
        assert_eq!(backing_file(&device.dev), Some(image.clone()));
        assert_eq!(device_size(&device.dev.path()).unwrap(), 8 * MIB);
        device.detach();
    }

    #[test]
    fn refused_direct_io_is_retried_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let image = sparse_image(dir.path(), "refused-dio.img", 8 * MIB);
        let mut flags_tried = Vec::new();
        let attached = attach_with(&image, false, |node, backing, path, flags| {
            flags_tried.push(flags);
            if flags & LO_FLAGS_DIRECT_IO != 0 {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            configure(node, backing, path, flags)
        });
        let device = AttachedLoop::adopt(attached.unwrap(), &image);

        // More than one buffered try when another process took a device meanwhile.
        assert_eq!(flags_tried[..2], [LO_FLAGS_DIRECT_IO, 0]);
        assert!(flags_tried[2..].iter().all(|&flags| flags == 0), "{flags_tried:?}");
        assert!(!direct_io(&device.dev));
        assert_eq!(backing_file(&device.dev), Some(fs::canonicalize(&image).unwrap()));
    }

    #[test]
    fn a_device_taken_meanwhile_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let image = sparse_image(dir.path(), "mine.img", 8 * MIB);
        let competitor = sparse_image(dir.path(), "theirs.img", 8 * MIB);
        let competitor_file = OpenOptions::new().read(true).write(true).open(&competitor).unwrap();
        let mut raced = false;
        // The competitor configures the device between our GET_FREE and our CONFIGURE, so
        // the kernel answers EBUSY to ours. (Should a third party, another test process,
        // take the device first, the competitor's own EBUSY makes attach try the next one.)
        let attached = attach_with(&image, false, |node, backing, path, flags| {
            if !raced {
                configure(node, &competitor_file, &competitor, flags)?;
                raced = true;
            }
            configure(node, backing, path, flags)
        });
        let theirs = find_by_backing(&competitor).unwrap().map(|dev| AttachedLoop::adopt(dev, &competitor));
        let mine = AttachedLoop::adopt(attached.unwrap(), &image);

        let theirs = theirs.unwrap();
        assert_ne!(mine.dev, theirs.dev);
        assert_eq!(backing_file(&mine.dev), Some(fs::canonicalize(&image).unwrap()));
        assert_eq!(backing_file(&theirs.dev), Some(fs::canonicalize(&competitor).unwrap()));
    }

    #[test]
    fn set_capacity_follows_a_grown_image() {
        let dir = tempfile::tempdir().unwrap();
        let image = sparse_image(dir.path(), "grow.img", 16 * MIB);
        let device = AttachedLoop::attach(&image, false);

        File::options().write(true).open(&image).unwrap().set_len(48 * MIB).unwrap();
        // The device keeps its old size until told.
        assert_eq!(device_size(&device.dev.path()).unwrap(), 16 * MIB);
        set_capacity(&device.dev).unwrap();
        assert_eq!(device_size(&device.dev.path()).unwrap(), 48 * MIB);
    }

    #[test]
    fn read_only_attach_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let image = sparse_image(dir.path(), "ro.img", 8 * MIB);
        let device = AttachedLoop::attach(&image, true);

        let ro = fs::read_to_string(device.dev.sysfs_dir().join("ro")).unwrap();
        assert_eq!(ro.trim(), "1");
        // Depending on the kernel the open for writing or the write itself is refused.
        let refused = OpenOptions::new()
            .write(true)
            .open(device.dev.path())
            .and_then(|mut node| node.write_all(&[1; 4096]).and_then(|()| node.sync_all()))
            .unwrap_err();
        assert!(matches!(errno(&refused), Some(libc::EPERM) | Some(libc::EROFS) | Some(libc::EACCES)), "{refused}");
        assert_eq!(fs::read(&image).unwrap(), vec![0u8; 8 * MIB as usize], "the image is unchanged");
    }

    #[test]
    fn list_and_find_by_backing() {
        let dir = tempfile::tempdir().unwrap();
        let first_image = sparse_image(dir.path(), "list-a.img", 8 * MIB);
        let second_image = sparse_image(dir.path(), "list-b.img", 8 * MIB);
        let never_attached = sparse_image(dir.path(), "list-c.img", 8 * MIB);
        let first = AttachedLoop::attach(&first_image, false);
        let second = AttachedLoop::attach(&second_image, false);
        assert_ne!(first.dev, second.dev);

        let attached = list_attached().unwrap();
        assert!(attached.contains(&(first.dev, fs::canonicalize(&first_image).unwrap())));
        assert!(attached.contains(&(second.dev, fs::canonicalize(&second_image).unwrap())));

        assert_eq!(find_by_backing(&first_image).unwrap(), Some(first.dev));
        // A path with a detour through ".." still resolves to the same image.
        let detour = dir.path().join("..").join(dir.path().file_name().unwrap());
        assert_eq!(find_by_backing(&detour.join("list-b.img")).unwrap(), Some(second.dev));
        assert_eq!(find_by_backing(&never_attached).unwrap(), None);
        assert_eq!(find_by_backing(&dir.path().join("missing.img")).unwrap(), None);

        second.detach();
        assert_eq!(find_by_backing(&second_image).unwrap(), None);
    }

    #[test]
    fn unlinked_image_is_not_found_by_its_old_path() {
        let dir = tempfile::tempdir().unwrap();
        let image = sparse_image(dir.path(), "unlinked.img", 8 * MIB);
        let id = ImageId::of(&image).unwrap();
        let device = AttachedLoop::attach(&image, false);

        fs::remove_file(&image).unwrap();
        let shown = backing_file(&device.dev).unwrap();
        assert!(shown.to_string_lossy().ends_with(" (deleted)"), "{}", shown.display());
        assert_eq!(find_by_backing(&image).unwrap(), None);

        // A new file at the same path is not the attached one either.
        sparse_image(dir.path(), "unlinked.img", 8 * MIB);
        assert_eq!(find_by_backing(&image).unwrap(), None);
        assert!(!detach_if_attached_to(&device.dev, ImageId::of(&image).unwrap()).unwrap());

        // The identity taken before the unlink still finds it.
        assert!(detach_if_attached_to(&device.dev, id).unwrap());
        wait_until_detached(&device.dev, id);
    }

    #[test]
    fn concurrent_attaches_get_distinct_devices() {
        let dir = tempfile::tempdir().unwrap();
        let images: Vec<PathBuf> =
            (0..4).map(|i| sparse_image(dir.path(), &format!("race-{i}.img"), 8 * MIB)).collect();
        let devices: Vec<AttachedLoop> = thread::scope(|scope| {
            let handles: Vec<_> =
                images.iter().map(|image| scope.spawn(move || AttachedLoop::attach(image, false))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut numbers: Vec<u32> = devices.iter().map(|d| d.dev.number).collect();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), images.len());
        for (device, image) in devices.iter().zip(&images) {
            assert_eq!(backing_file(&device.dev), Some(fs::canonicalize(image).unwrap()));
        }
    }

    #[test]
    fn detach_of_a_mounted_device_is_deferred_until_unmount() {
        let dir = tempfile::tempdir().unwrap();
        let image = sparse_image(dir.path(), "busy.img", 32 * MIB);
        let device = AttachedLoop::attach(&image, false);
        mkfs("ext4", &device.dev.path());
        let target = dir.path().join("mnt");
        fs::create_dir(&target).unwrap();
        let mounted = Mounted::ext4(&device.dev.path(), &target);

        detach(&device.dev).unwrap();
        // Still attached: the mounted filesystem holds the device open.
        assert!(backing_file(&device.dev).is_some());
        fs::write(target.join("still-works"), b"yes").unwrap();

        mounted.unmount();
        wait_until_detached(&device.dev, ImageId::of(&image).unwrap());
        assert_eq!(find_by_backing(&image).unwrap(), None);
    }

    #[test]
    fn a_device_that_does_not_exist() {
        // Far above anything this machine has; no node, no sysfs entry.
        let ghost = LoopDevice { number: 1_000_000 };
        assert!(!ghost.path().exists());
        detach(&ghost).unwrap();
        assert_eq!(backing_file(&ghost), None);
        let err = set_capacity(&ghost).unwrap_err();
        assert_eq!(errno(&err), Some(libc::ENXIO), "{err}");
        assert!(err.to_string().contains("/dev/loop1000000"), "{err}");
        assert!(!ghost.path().exists(), "no node is made for a missing device");
    }

    #[test]
    fn missing_node_is_created_with_the_given_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("loop-node");
        create_block_node(&node, LOOP_MAJOR, 4242).unwrap();
        // A second call finds the node there and leaves it.
        create_block_node(&node, LOOP_MAJOR, 4242).unwrap();
        let meta = fs::metadata(&node).unwrap();
        assert!(meta.file_type().is_block_device());
        assert_eq!(meta.rdev(), makedev(LOOP_MAJOR, 4242));
    }

    #[test]
    fn device_size_of_a_regular_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let image = sparse_image(dir.path(), "not-a-device.img", MIB);
        let err = device_size(&image).unwrap_err();
        assert!(err.to_string().contains("not-a-device.img"), "{err}");
        assert_eq!(errno(&err), Some(libc::ENOTTY));
    }
}
