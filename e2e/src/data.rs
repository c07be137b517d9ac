//! Data written through published volumes and facts read back from files and filesystems.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// `len` pseudo-random bytes determined by `seed` (xorshift64*), so a test can write a
/// pattern and later check it without keeping a copy.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `data` to a new file and makes it durable (file and directory entry fsync'd).
pub fn write_synced(path: &Path, data: &[u8]) {
    let mut file = File::create(path).unwrap_or_else(|err| panic!("create {}: {err}", path.display()));
    file.write_all(data).unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
    file.sync_all().unwrap_or_else(|err| panic!("fsync {}: {err}", path.display()));
    let parent = path.parent().expect("a file has a parent directory");
    File::open(parent).and_then(|dir| dir.sync_all()).unwrap_or_else(|err| panic!("fsync {}: {err}", parent.display()));
}

pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|err| panic!("read {}: {err}", path.display()))
}

/// Asserts `path` holds exactly `expected` (without printing megabytes on failure).
#[track_caller]
pub fn assert_content(path: &Path, expected: &[u8], what: &str) {
    let actual = read(path);
    assert!(
        actual.len() == expected.len() && actual == expected,
        "{what}: {} does not hold the data written before ({} bytes, expected {})",
        path.display(),
        actual.len(),
        expected.len()
    );
}

/// Writes `data` at `offset` of a block device (or file) and fsyncs it.
pub fn write_at_synced(path: &Path, offset: u64, data: &[u8]) {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|err| panic!("open {} for writing: {err}", path.display()));
    file.write_all_at(data, offset).unwrap_or_else(|err| panic!("write {} at {offset}: {err}", path.display()));
    file.sync_all().unwrap_or_else(|err| panic!("fsync {}: {err}", path.display()));
}

pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let file = File::open(path).unwrap_or_else(|err| panic!("open {}: {err}", path.display()));
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset).unwrap_or_else(|err| panic!("read {} at {offset}: {err}", path.display()));
    buf
}

/// Whether `path` is a block device node.
pub fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path).map(|meta| meta.file_type().is_block_device()).unwrap_or(false)
}

/// The size in bytes of the block device at `path` (from sysfs, by its device number).
pub fn block_device_bytes(path: &Path) -> u64 {
    let meta = std::fs::metadata(path).unwrap_or_else(|err| panic!("stat {}: {err}", path.display()));
    assert!(meta.file_type().is_block_device(), "{} is not a block device", path.display());
    let rdev = meta.rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let sysfs = format!("/sys/dev/block/{major}:{minor}/size");
    let sectors: u64 = std::fs::read_to_string(&sysfs)
        .unwrap_or_else(|err| panic!("read {sysfs}: {err}"))
        .trim()
        .parse()
        .unwrap_or_else(|err| panic!("parse {sysfs}: {err}"));
    sectors * 512
}

/// Total bytes of the filesystem holding `path` (statvfs blocks × fragment size).
pub fn fs_total_bytes(path: &Path) -> u64 {
    let stat = nix::sys::statvfs::statvfs(path).unwrap_or_else(|err| panic!("statvfs {}: {err}", path.display()));
    stat.blocks() * stat.fragment_size()
}

/// What the tree snapshot records about one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileFacts {
    pub is_file: bool,
    pub is_dir: bool,
    pub len: u64,
    pub modified: Option<SystemTime>,
}

/// Every path under `dir` (not following symlinks, not entering `exclude`d paths) with its
/// type, size and modification time.
pub fn tree(dir: &Path, exclude: &[PathBuf]) -> BTreeMap<PathBuf, FileFacts> {
    let mut out = BTreeMap::new();
    walk(dir, exclude, &mut out);
    out
}

fn walk(dir: &Path, exclude: &[PathBuf], out: &mut BTreeMap<PathBuf, FileFacts>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if exclude.iter().any(|skip| path.starts_with(skip)) {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        out.insert(
            path.clone(),
            FileFacts {
                is_file: meta.is_file(),
                is_dir: meta.is_dir(),
                len: if meta.is_file() { meta.len() } else { 0 },
                modified: meta.modified().ok(),
            },
        );
        if meta.is_dir() {
            walk(&path, exclude, out);
        }
    }
}

/// The set of paths under `dir` with type and size, ignoring times (for "left nothing
/// behind" checks where directory times may change).
pub fn tree_shape(dir: &Path) -> BTreeMap<PathBuf, (bool, u64)> {
    tree(dir, &[]).into_iter().map(|(path, facts)| (path, (facts.is_dir, facts.len))).collect()
}

/// The regular files under `dir` with their sizes (for "a failed call left no file
/// behind" checks; directories the driver lays out lazily do not count).
pub fn files(dir: &Path) -> BTreeMap<PathBuf, u64> {
    tree(dir, &[]).into_iter().filter(|(_, facts)| !facts.is_dir).map(|(path, facts)| (path, facts.len)).collect()
}

/// Asserts a small file can be written and fsync'd under `dir` within `patience` (a frozen
/// filesystem blocks the write; the thread is left to finish once it is thawed).
#[track_caller]
pub fn assert_writable_within(dir: &Path, patience: std::time::Duration, what: &str) {
    let path = dir.join(".e2e-writable-probe");
    let (done, finished) = std::sync::mpsc::channel();
    let probe = path.clone();
    std::thread::spawn(move || {
        let result = File::create(&probe).and_then(|mut file| {
            file.write_all(b"probe")?;
            file.sync_all()
        });
        let _ = done.send(result);
    });
    match finished.recv_timeout(patience) {
        Ok(Ok(())) => {
            let _ = std::fs::remove_file(&path);
        }
        Ok(Err(err)) => panic!("{what}: writing under {} failed: {err}", dir.display()),
        Err(_) => panic!(
            "{what}: a write under {} did not finish within {patience:?} (is the filesystem frozen?)",
            dir.display()
        ),
    }
}
