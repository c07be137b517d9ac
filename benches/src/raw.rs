//! The operations the driver wraps, done directly: a sparse image file, `losetup`,
//! `mkfs.ext4` with the driver's options, mount and bind mount. Each kernel object is held by
//! a guard that undoes it if the bench stops half-way.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::stats::timed;
use crate::{Context, Result};

/// The options the driver gives `mkfs.ext4` (node/src/fs.rs).
pub const MKFS_EXT4_OPTIONS: &[&str] = &["-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", "-m", "0"];

/// Runs a program to completion; a spawn failure or non-zero exit is an error with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).output().context(|| format!("running {program}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Creates a sparse file of `bytes` (as CreateVolume does).
pub fn sparse_image(path: &Path, bytes: u64) -> Result<()> {
    let f = File::create_new(path).context(|| format!("creating {}", path.display()))?;
    f.set_len(bytes).context(|| format!("sizing {}", path.display()))
}

/// Makes an ext4 filesystem on `dev` the way the driver does.
pub fn mkfs_ext4(dev: &Path) -> Result<()> {
    let dev = dev.to_string_lossy();
    let mut args = MKFS_EXT4_OPTIONS.to_vec();
    args.push(&dev);
    run("mkfs.ext4", &args).map(|_| ())
}

/// A loop device this bench attached; detached on drop unless [`LoopDev::detach`] ran.
#[derive(Debug)]
pub struct LoopDev {
    dev: PathBuf,
    attached: bool,
}

impl LoopDev {
    /// `losetup --direct-io=on -f --show IMAGE`.
    pub fn attach(image: &Path) -> Result<LoopDev> {
        let out = run("losetup", &["--direct-io=on", "-f", "--show", &image.to_string_lossy()])?;
        Ok(LoopDev { dev: PathBuf::from(out.trim()), attached: true })
    }

    pub fn path(&self) -> &Path {
        &self.dev
    }

    /// `losetup -d`.
    pub fn detach(mut self) -> Result<()> {
        self.attached = false;
        run("losetup", &["-d", &self.dev.to_string_lossy()]).map(|_| ())
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        if self.attached {
            if let Err(e) = run("losetup", &["-d", &self.dev.to_string_lossy()]) {
                eprintln!("ferrovol-bench: cleanup: {e}");
            }
        }
    }
}

/// A mount this bench made; unmounted on drop unless [`Mounted::unmount`] ran.
#[derive(Debug)]
pub struct Mounted {
    target: PathBuf,
    mounted: bool,
}

impl Mounted {
    /// Mounts the ext4 filesystem on `dev` at `target`, making the directory first.
    pub fn ext4(dev: &Path, target: &Path) -> Result<Mounted> {
        fs::create_dir_all(target).context(|| format!("creating {}", target.display()))?;
        mount(Some(dev), target, Some("ext4"), MsFlags::empty(), None::<&str>)
            .context(|| format!("mounting {} on {}", dev.display(), target.display()))?;
        Ok(Mounted { target: target.to_path_buf(), mounted: true })
    }

    /// Bind-mounts `source` at `target`, making the directory first.
    pub fn bind(source: &Path, target: &Path) -> Result<Mounted> {
        fs::create_dir_all(target).context(|| format!("creating {}", target.display()))?;
        mount(Some(source), target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .context(|| format!("bind-mounting {} on {}", source.display(), target.display()))?;
        Ok(Mounted { target: target.to_path_buf(), mounted: true })
    }

    /// Unmounts, and removes the mount point directory if asked (the driver's unpublish
    /// removes its target directory, its unstage leaves the staging directory).
    pub fn unmount(mut self, remove_dir: bool) -> Result<()> {
        self.mounted = false;
        umount2(&self.target, MntFlags::empty()).context(|| format!("unmounting {}", self.target.display()))?;
        if remove_dir {
            fs::remove_dir(&self.target).context(|| format!("removing {}", self.target.display()))?;
        }
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(e) = umount2(&self.target, MntFlags::MNT_DETACH) {
                eprintln!("ferrovol-bench: cleanup: unmounting {}: {e}", self.target.display());
            }
        }
    }
}

/// A volume staged by hand: image, loop device, ext4 mounted at the staging path.
#[derive(Debug)]
pub struct RawStaged {
    pub image: PathBuf,
    // Field order is drop order: unmount before detaching.
    pub mount: Mounted,
    pub dev: LoopDev,
}

/// Times of the parts of a raw stage, in ms.
#[derive(Debug, Clone, Copy)]
pub struct StageParts {
    pub losetup: f64,
    /// `blkid -p`, which the driver runs before mkfs so it never formats data; only timed
    /// when asked, and not part of the raw operation.
    pub blkid: Option<f64>,
    pub mkfs: f64,
    pub mount: f64,
}

impl StageParts {
    /// The raw operation's own time (without the informational blkid).
    pub fn total(&self) -> f64 {
        self.losetup + self.mkfs + self.mount
    }
}

/// Held around `losetup -f` by concurrent raw workers. Two `losetup -f` that race for the
/// same free device make the loser sleep 200 ms before it retries (util-linux `create_loop`),
/// which would measure that sleep rather than the work; a script would serialise with flock.
static LOSETUP: Mutex<()> = Mutex::new(());

/// The raw NodeStage of a fresh image: attach, mkfs, mount; with `probe`, also time the
/// `blkid -p` the driver runs between attach and mkfs. The attach time includes any wait
/// for another thread's `losetup`.
pub fn stage(image: &Path, staging: &Path, probe: bool) -> Result<(RawStaged, StageParts)> {
    let (dev, losetup) = timed(|| {
        let _one_at_a_time = LOSETUP.lock().unwrap_or_else(|p| p.into_inner());
        LoopDev::attach(image)
    });
    let dev = dev?;
    let blkid = if probe { Some(timed(|| blkid_probe(dev.path())).1) } else { None };
    let (made, mkfs) = timed(|| mkfs_ext4(dev.path()));
    made?;
    let (mount, t_mount) = timed(|| Mounted::ext4(dev.path(), staging));
    let mount = mount?;
    Ok((RawStaged { image: image.to_path_buf(), mount, dev }, StageParts { losetup, blkid, mkfs, mount: t_mount }))
}

/// `blkid -p -o export DEV` as the driver runs it; exit 2 (nothing found) is the expected
/// answer on a fresh device, so the outcome is ignored.
fn blkid_probe(dev: &Path) {
    let _ = Command::new("blkid").args(["-p", "-o", "export"]).arg(dev).output();
}

impl RawStaged {
    /// Unmount, detach and remove the image: the raw unstage and delete.
    pub fn teardown(self) -> Result<()> {
        let RawStaged { image, mount, dev } = self;
        mount.unmount(false)?;
        dev.detach()?;
        fs::remove_file(&image).context(|| format!("removing {}", image.display()))
    }
}
