//! One test's private temporary directory: socket, data dir, logs, staging and target paths.

use std::path::{Path, PathBuf};

use tempfile::TempDir;

/// Environment variable naming the directory the sandboxes are made in (default: the
/// system temp dir). It must be on a filesystem that holds sparse files and loop images.
pub const SANDBOX_BASE_ENV: &str = "FERROVOL_E2E_TMPDIR";
/// Set to keep every sandbox after its test, for debugging.
pub const KEEP_ENV: &str = "FERROVOL_E2E_KEEP";

/// The data dir sits this many directories below the sandbox root, so that a volume ID
/// with a few `../` components still resolves inside the sandbox if a driver bug lets it
/// through: the tests can then see what was touched without risking the machine.
const DATA_DIR_NESTING: [&str; 3] = ["fence1", "fence2", "fence3"];

/// A test's temporary directory. On drop it unmounts and detaches whatever is left under
/// it (and only that), then removes it; if something cannot be released it keeps the
/// directory rather than delete through a live mount.
#[derive(Debug)]
pub struct Sandbox {
    dir: Option<TempDir>,
    root: PathBuf,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let base = std::env::var_os(SANDBOX_BASE_ENV).map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::Builder::new()
            .prefix("fv-e2e-")
            .tempdir_in(&base)
            .unwrap_or_else(|err| panic!("make a sandbox in {}: {err}", base.display()));
        // The kernel reports canonical paths in mountinfo and sysfs.
        let root = dir.path().canonicalize().expect("canonical sandbox path");
        let sandbox = Sandbox { dir: Some(dir), root };
        for dir in [sandbox.socket_dir(), sandbox.data_dir(), sandbox.log_dir(), sandbox.work_dir()] {
            std::fs::create_dir_all(&dir).unwrap_or_else(|err| panic!("create {}: {err}", dir.display()));
        }
        sandbox
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory holding only the driver's socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.root.join("sock")
    }

    pub fn socket_path(&self) -> PathBuf {
        self.socket_dir().join("csi.sock")
    }

    /// The driver's `--data-dir`.
    pub fn data_dir(&self) -> PathBuf {
        let mut dir = self.root.clone();
        dir.extend(DATA_DIR_NESTING);
        dir.join("data")
    }

    /// The directories between the root and the data dir, outermost first (where the
    /// path-escape tests plant files a driver must never touch).
    pub fn fence_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = vec![self.root.clone()];
        let mut dir = self.root.clone();
        for part in DATA_DIR_NESTING {
            dir = dir.join(part);
            dirs.push(dir.clone());
        }
        dirs
    }

    pub fn log_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// Where the driver's standard error goes (appended across restarts).
    pub fn stderr_log(&self) -> PathBuf {
        self.log_dir().join("stderr.log")
    }

    /// Where the driver's standard output goes (appended across restarts).
    pub fn stdout_log(&self) -> PathBuf {
        self.log_dir().join("stdout.log")
    }

    /// Where staging and target paths live.
    pub fn work_dir(&self) -> PathBuf {
        self.root.join("work")
    }

    /// A staging directory, created as the CO would (kubelet's `.../globalmount`).
    pub fn staging_dir(&self, name: &str) -> PathBuf {
        let dir = self.work_dir().join("plugins").join(name).join("globalmount");
        std::fs::create_dir_all(&dir).unwrap_or_else(|err| panic!("create staging dir {}: {err}", dir.display()));
        dir
    }

    /// A staging path whose directory does not exist.
    pub fn missing_staging_dir(&self, name: &str) -> PathBuf {
        self.work_dir().join("plugins").join(name).join("globalmount")
    }

    /// A target path for NodePublishVolume: its parent exists (the CO's job), the path
    /// itself does not (creating it is the plugin's job).
    pub fn target_path(&self, name: &str) -> PathBuf {
        let parent = self.work_dir().join("pods").join(name);
        std::fs::create_dir_all(&parent)
            .unwrap_or_else(|err| panic!("create target parent {}: {err}", parent.display()));
        parent.join("mount")
    }

    /// Releases whatever is still mounted or attached under this sandbox.
    pub fn release(&self) -> crate::kernel::Leftovers {
        crate::kernel::release(&self.root, &self.data_dir())
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox::new()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let left = self.release();
        let keep = std::env::var_os(KEEP_ENV).is_some();
        if !left.is_empty() || keep {
            if let Some(dir) = self.dir.take() {
                let path = dir.keep();
                if !left.is_empty() {
                    eprintln!("sandbox {} kept: could not release {:?}", path.display(), left);
                }
            }
        }
    }
}
