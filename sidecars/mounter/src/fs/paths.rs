//! How the filesystem's paths map to S3 keys: a file `a/b` is the object `<prefix>a/b`, a
//! directory `a` is every key under `<prefix>a/` (and its marker object `<prefix>a/`).
//! Paths are kept relative to the volume's root, without leading or trailing `/`; the root
//! is the empty path.

use super::FsError;

/// The longest key S3 accepts, in bytes.
pub const MAX_KEY_LEN: usize = 1024;

/// The longest name of one entry, in bytes (`statfs` reports it as `namemax`).
pub const MAX_NAME_LEN: usize = 255;

/// The path of `name` inside directory `parent`.
pub fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}/{name}")
    }
}

/// The directory holding `path` and the last component.
pub fn split(path: &str) -> (&str, &str) {
    match path.rsplit_once('/') {
        Some((dir, name)) => (dir, name),
        None => ("", path),
    }
}

/// Checks one name the kernel hands in (never `.`/`..`, never with `/`): S3 keys are UTF-8,
/// a name has at most [`MAX_NAME_LEN`] bytes (FUSE lets up to 1024 through), and the key it
/// makes must fit S3's limit.
pub fn check_name(prefix: &str, parent: &str, name: &std::ffi::OsStr) -> Result<String, FsError> {
    let Some(name) = name.to_str() else {
        return Err(FsError::new(libc::EINVAL, "the name is not UTF-8, which S3 keys must be"));
    };
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(FsError::new(libc::EINVAL, format!("{name:?} is not a file name")));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(FsError::new(
            libc::ENAMETOOLONG,
            format!("a name of {} bytes: names have at most {MAX_NAME_LEN}", name.len()),
        ));
    }
    let path = join(parent, name);
    // +1 for the trailing `/` a directory's marker carries.
    if prefix.len() + path.len() + 1 > MAX_KEY_LEN {
        return Err(FsError::new(
            libc::ENAMETOOLONG,
            format!("the key of {path:?} would pass S3's {MAX_KEY_LEN} bytes"),
        ));
    }
    Ok(path)
}

/// The key of file `path`.
pub fn file_key(prefix: &str, path: &str) -> String {
    format!("{prefix}{path}")
}

/// The prefix of directory `path`'s entries, which is also its marker object's key.
pub fn dir_prefix(prefix: &str, path: &str) -> String {
    if path.is_empty() {
        prefix.to_owned()
    } else {
        format!("{prefix}{path}/")
    }
}

/// The entry name a listed key or common prefix shows in the directory listed with
/// `dir_prefix`; `None` for names a filesystem cannot show (empty from `a//b`, `.`, `..`)
/// and for the directory's own marker.
pub fn entry_name<'a>(dir_prefix: &str, key: &'a str) -> Option<&'a str> {
    let rest = key.strip_prefix(dir_prefix)?;
    let name = rest.strip_suffix('/').unwrap_or(rest);
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return None;
    }
    Some(name)
}

/// `bucket/key` percent-encoded as CopyObject's `x-amz-copy-source` wants it.
pub fn copy_source(bucket: &str, key: &str) -> String {
    let mut out = String::with_capacity(bucket.len() + key.len() + 8);
    for b in bucket.bytes().chain(std::iter::once(b'/')).chain(key.bytes()) {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    const P: &str = "ferrovol/volumes/pvc-1/fs/";

    #[test]
    fn paths_map_to_keys_under_the_prefix() {
        assert_eq!(join("", "a"), "a");
        assert_eq!(join("a/b", "c"), "a/b/c");
        assert_eq!(split("a/b/c"), ("a/b", "c"));
        assert_eq!(split("a"), ("", "a"));
        assert_eq!(file_key(P, "a/b"), "ferrovol/volumes/pvc-1/fs/a/b");
        assert_eq!(dir_prefix(P, ""), P);
        assert_eq!(dir_prefix(P, "a"), "ferrovol/volumes/pvc-1/fs/a/");
    }

    #[test]
    fn listed_keys_become_entry_names() {
        let d = dir_prefix(P, "a");
        assert_eq!(entry_name(&d, &format!("{d}x.txt")), Some("x.txt"));
        assert_eq!(entry_name(&d, &format!("{d}sub/")), Some("sub"));
        assert_eq!(entry_name(&d, &d), None, "the directory's own marker");
        assert_eq!(entry_name(&d, &format!("{d}/")), None, "a//b");
        assert_eq!(entry_name(&d, &format!("{d}../")), None);
        assert_eq!(entry_name(&d, "elsewhere/x"), None);
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(check_name(P, "a", OsStr::new("b")).expect("ok"), "a/b");
        assert_eq!(check_name(P, "", OsStr::new("..")).expect_err("dotdot").errno, libc::EINVAL);
        let long = "x".repeat(MAX_KEY_LEN);
        assert_eq!(check_name(P, "", OsStr::new(&long)).expect_err("long").errno, libc::ENAMETOOLONG);
        let name = "n".repeat(MAX_NAME_LEN);
        assert!(check_name(P, "", OsStr::new(&name)).is_ok(), "255 bytes is the limit");
        let name = "n".repeat(MAX_NAME_LEN + 1);
        assert_eq!(check_name(P, "", OsStr::new(&name)).expect_err("256").errno, libc::ENAMETOOLONG);
        // A path of names that each fit can still make a key past S3's limit.
        let dir = vec!["d".repeat(200); 5].join("/");
        assert_eq!(check_name(P, &dir, OsStr::new("f")).expect_err("key").errno, libc::ENAMETOOLONG);
        use std::os::unix::ffi::OsStrExt;
        assert_eq!(check_name(P, "", OsStr::from_bytes(b"\xff")).expect_err("utf8").errno, libc::EINVAL);
    }

    #[test]
    fn copy_sources_are_percent_encoded() {
        assert_eq!(copy_source("b", "p/a b+c.txt"), "b/p/a%20b%2Bc.txt");
        assert_eq!(copy_source("b", "é"), "b/%C3%A9");
    }
}
