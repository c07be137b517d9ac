//! Running external programs (mkfs, resize2fs, blkid, ...) behind a small seam, so that
//! logic can be unit-tested with a fake and the real runner is used everywhere else.
//! A program that cannot be started and one that exits non-zero are different errors:
//! the first is a broken installation, the second a refusal whose stderr explains it.

use std::fmt;
use std::process::Command;

/// Why a command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The program could not be started (missing from PATH, not executable).
    #[error("could not start {program}: {source} (is it installed?)")]
    Spawn { program: String, source: std::io::Error },
    /// The program ran and exited non-zero.
    #[error("{program} exited with {status}: {stderr}")]
    Exit { program: String, status: String, code: Option<i32>, stderr: String },
}

impl CommandError {
    /// The exit code, for programs whose codes carry meaning (blkid's 2 = nothing found).
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            CommandError::Spawn { .. } => None,
            CommandError::Exit { code, .. } => *code,
        }
    }
}

/// Captured standard output of a successful command.
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub stdout: String,
}

/// Runs a program with arguments and waits for it.
pub trait Runner: Send + Sync + fmt::Debug {
    fn run(&self, program: &str, args: &[&str]) -> Result<Output, CommandError>;
}

/// Environment variables the real runner passes on from the driver's own environment.
const PASSED_THROUGH: [&str; 2] = ["LVM_SYSTEM_DIR", "DM_DISABLE_UDEV"];

/// The real runner: `std::process::Command`, with a fixed, minimal environment so a
/// caller's locale or PATH cannot change what the tools print.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemRunner;

impl Runner for SystemRunner {
    fn run(&self, program: &str, args: &[&str]) -> Result<Output, CommandError> {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LC_ALL", "C")
            // lvm warns on stderr about every descriptor it inherits (tokio's among them).
            .env("LVM_SUPPRESS_FD_WARNINGS", "1");
        // Where lvm finds its configuration, and whether libdevmapper waits for udev: an
        // operator's choice for hosts and containers without udev, so it passes through.
        for key in PASSED_THROUGH {
            if let Some(v) = std::env::var_os(key) {
                cmd.env(key, v);
            }
        }
        let out = cmd.output().map_err(|source| CommandError::Spawn { program: program.to_owned(), source })?;
        if out.status.success() {
            return Ok(Output { stdout: String::from_utf8_lossy(&out.stdout).into_owned() });
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(CommandError::Exit {
            program: program.to_owned(),
            status: out.status.to_string(),
            code: out.status.code(),
            stderr: stderr.trim().chars().take(2000).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawn_failure_and_exit_failure_differ() {
        let r = SystemRunner;
        let e = r.run("/nonexistent/ferrovol-no-such-tool", &[]).expect_err("spawn");
        assert!(matches!(e, CommandError::Spawn { .. }), "{e}");
        let e = r.run("sh", &["-c", "echo oops >&2; exit 3"]).expect_err("exit");
        assert_eq!(e.exit_code(), Some(3));
        assert!(e.to_string().contains("oops"), "{e}");
        assert_eq!(r.run("sh", &["-c", "echo hi"]).expect("ok").stdout, "hi\n");
    }
}
