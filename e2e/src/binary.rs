//! Finds the `ferrovol` binary under test.

use std::path::PathBuf;

/// Environment variable that overrides where the binary is looked for.
pub const BINARY_ENV: &str = "FERROVOL_BIN";

/// The `ferrovol` binary: `$FERROVOL_BIN`, else `ferrovol` in the directory above the one
/// holding the running test executable (cargo puts tests in `target/<profile>/deps/` and
/// binaries in `target/<profile>/`).
///
/// Panics with instructions when it is missing: a test that cannot run must fail loudly.
pub fn ferrovol_binary() -> PathBuf {
    if let Some(path) = std::env::var_os(BINARY_ENV) {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "{BINARY_ENV} points at {}, which is not a file", path.display());
        return path;
    }
    let exe = std::env::current_exe().expect("the path of the running test executable");
    let deps = exe.parent().expect("the test executable lives in a directory");
    let candidate = deps.join("..").join("ferrovol");
    assert!(
        candidate.is_file(),
        "the ferrovol binary is missing at {}: run `cargo build --bins` first \
         (or point {BINARY_ENV} at the binary)",
        candidate.display()
    );
    candidate.canonicalize().expect("canonical path of the ferrovol binary")
}
