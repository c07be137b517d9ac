//! The lvm2 command line as typed calls: one method per lvm invocation, names and tags
//! already checked ([`super::names`]), sizes in exact bytes, never a prompt, and errors that
//! tell a broken install (lvm could not start) from a refusal (lvm said no, and why).
//!
//! Every command runs as `lvm <subcommand> ...`, so there is one binary to find. Each
//! command's argument vector is built in one place, `LvmCommand::argv`, which the tests
//! check word for word.
//!
//! No lock is taken here: lvm serializes commands on one VG itself, with flock(2) on files in
//! its `global/locking_dir` (`/run/lock/lvm`, made by lvm when missing). Processes that run
//! lvm against the same disks must see the same locking dir (a container must share it with
//! the host).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use super::names::{self, LvName, NameError, Tag, VgName};
use super::report::{Report, ReportError, LV_COLUMNS, SEG_COLUMNS, VG_COLUMNS};
use crate::command::{CommandError, Output, Runner};

/// The one lvm binary; every subcommand is its first argument.
const LVM: &str = "lvm";

/// Pinned on every report, so the host's lvm.conf cannot change the JSON's shape:
/// `compact_output`/`compact_output_cols` would drop columns that are empty in every row,
/// `list_item_separator` splits `lv_tags`, and `report_command_log` would move error messages
/// from stderr into the JSON. Given last in the `--config` string, it wins over the
/// operator's config (lvm takes the last value of a setting given twice, with a warning).
const REPORT_CONFIG: &str =
    r#"report/compact_output=0 report/compact_output_cols="" report/list_item_separator="," log/report_command_log=0"#;

/// Why an lvm command did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum LvmError {
    /// lvm could not be started: it is not installed or not on PATH.
    #[error("{command}: could not start lvm: {source} (is lvm2 installed?)")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// lvm ran and refused; its stderr (trimmed) says why. See [`LvmError::refusal`].
    #[error("{command}: lvm exited with {}: {}", exit_status(*.code), stderr_text(.stderr))]
    Exit { command: String, code: Option<i32>, stderr: String },
    /// lvm succeeded but printed a report that could not be read.
    #[error("{command}: could not read lvm's report: {reason}")]
    Parse {
        command: String,
        #[source]
        reason: ReportError,
    },
    /// The names are each valid but too long together; nothing was run.
    #[error("{command}: {source}")]
    Name {
        command: String,
        #[source]
        source: NameError,
    },
}

fn exit_status(code: Option<i32>) -> String {
    match code {
        Some(code) => format!("code {code}"),
        None => "a signal".to_owned(),
    }
}

fn stderr_text(stderr: &str) -> &str {
    if stderr.is_empty() {
        "(no message)"
    } else {
        stderr
    }
}

/// What lvm refused for, read from its stderr. lvm exits 5 for all of these (3 is a command
/// line it could not parse); only the message tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `Volume group "vg0" not found`.
    VgNotFound,
    /// `Failed to find logical volume "vg0/lv"`, `Logical volume lv not found in volume group
    /// vg0.` (lvextend), `Snapshot origin LV lv not found in Volume group vg0.`, `Pool pool not
    /// found in Volume group vg0.` and the like.
    LvNotFound,
    /// `No device found for /dev/x.` (pvcreate, pvremove).
    DeviceNotFound,
    /// `Logical Volume "lv" already exists in volume group "vg0"`, `A volume group called vg0
    /// already exists.`
    AlreadyExists,
    /// `Volume group "vg0" has insufficient free space (226 extents): 1024 required.`,
    /// `Insufficient free space: ...` (lvextend), `Cannot create new thin volume, free space in
    /// thin pool vg0/pool reached threshold.`
    NoSpace,
    /// `Logical volume vg0/lv contains a filesystem in use.`, `... in use.`, `... is used by
    /// another device.`
    InUse,
    /// lvextend to the current size or smaller: `New size (2 extents) matches existing size
    /// (2 extents).`, `New size given (1 extents) not larger than existing size (2 extents)`.
    SizeNotLarger,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::VgNotFound => "volume group not found",
            Refusal::LvNotFound => "logical volume not found",
            Refusal::DeviceNotFound => "device not found",
            Refusal::AlreadyExists => "already exists",
            Refusal::NoSpace => "not enough free space",
            Refusal::InUse => "in use",
            Refusal::SizeNotLarger => "new size not larger than the current one",
        })
    }
}

impl Refusal {
    /// The refusal one line of lvm's stderr states, if any.
    fn of_line(line: &str) -> Option<Refusal> {
        let line = line.trim();
        let lower = line.to_ascii_lowercase();
        if line.starts_with("Volume group \"") && (line.ends_with("\" not found") || line.ends_with("\" not found.")) {
            Some(Refusal::VgNotFound)
        } else if line.starts_with("Failed to find logical volume \"") || lower.contains(" not found in volume group ")
        {
            Some(Refusal::LvNotFound)
        } else if line.starts_with("No device found for ") {
            Some(Refusal::DeviceNotFound)
        } else if line.contains("\" already exists in volume group \"")
            || (line.starts_with("A volume group called ") && line.ends_with(" already exists."))
        {
            Some(Refusal::AlreadyExists)
        } else if line.contains(" has insufficient free space (")
            || line.starts_with("Insufficient free space")
            || line.starts_with("Insufficient suitable ")
            || (line.contains("free space in thin pool") && line.contains("reached threshold"))
        {
            Some(Refusal::NoSpace)
        } else if line.starts_with("Logical volume ")
            && (line.ends_with(" in use.") || line.ends_with(" is used by another device."))
        {
            Some(Refusal::InUse)
        } else if line.starts_with("New size")
            && (line.contains("matches existing size") || line.contains("not larger than existing size"))
        {
            Some(Refusal::SizeNotLarger)
        } else {
            None
        }
    }

    /// The first refusal stated in `stderr`: lvm says the cause first and its consequences
    /// ("Cannot process volume group vg0") after.
    fn of_stderr(stderr: &str) -> Option<Refusal> {
        stderr.lines().find_map(Refusal::of_line)
    }
}

impl LvmError {
    /// What lvm refused for, when it ran and said so in a message we know.
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            LvmError::Exit { stderr, .. } => Refusal::of_stderr(stderr),
            LvmError::Spawn { .. } | LvmError::Parse { .. } | LvmError::Name { .. } => None,
        }
    }

    /// lvm said the VG or the LV (or the pool or origin named) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self.refusal(), Some(Refusal::VgNotFound | Refusal::LvNotFound))
    }

    /// lvm's exit code, when it ran and failed.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            LvmError::Exit { code, .. } => *code,
            LvmError::Spawn { .. } | LvmError::Parse { .. } | LvmError::Name { .. } => None,
        }
    }

    /// The short description of the command that failed, e.g. "lvcreate vg0/pvc-1".
    pub fn command(&self) -> &str {
        match self {
            LvmError::Spawn { command, .. }
            | LvmError::Exit { command, .. }
            | LvmError::Parse { command, .. }
            | LvmError::Name { command, .. } => command,
        }
    }
}

/// One lvm invocation.
#[derive(Debug, Clone, Copy)]
enum LvmCommand<'a> {
    Report { vgs: &'a [VgName] },
    CreateLinear { vg: &'a VgName, lv: &'a LvName, size_bytes: u64, tags: &'a [Tag] },
    CreateThinPool { vg: &'a VgName, pool: &'a LvName, size_bytes: u64 },
    CreateThin { vg: &'a VgName, pool: &'a LvName, lv: &'a LvName, virtual_size_bytes: u64, tags: &'a [Tag] },
    CreateThinSnapshot { vg: &'a VgName, origin: &'a LvName, lv: &'a LvName, tags: &'a [Tag] },
    Extend { vg: &'a VgName, lv: &'a LvName, size_bytes: u64 },
    Remove { vg: &'a VgName, lv: &'a LvName },
    Activate { vg: &'a VgName, lv: &'a LvName },
    Deactivate { vg: &'a VgName, lv: &'a LvName },
    AddTags { vg: &'a VgName, lv: &'a LvName, tags: &'a [Tag] },
    DeleteTags { vg: &'a VgName, lv: &'a LvName, tags: &'a [Tag] },
    DeleteTagsFromMany { vg: &'a VgName, lvs: &'a [LvName], tags: &'a [Tag] },
    PvCreate { device: &'a Path },
    PvRemove { device: &'a Path },
    VgCreate { vg: &'a VgName, devices: &'a [&'a Path] },
    VgRemove { vg: &'a VgName },
}

/// `vg/lv`, as lvm names an LV on its command line.
fn lv_path(vg: &VgName, lv: &LvName) -> String {
    format!("{vg}/{lv}")
}

/// A size in bytes as lvm takes it: lower-case `b` is bytes (lvm refuses sizes that are not
/// a multiple of 512 and rounds up to whole extents).
fn bytes(size: u64) -> String {
    format!("{size}b")
}

fn device(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn push_tags(argv: &mut Vec<String>, option: &str, tags: &[Tag]) {
    for tag in tags {
        argv.push(option.to_owned());
        argv.push(tag.to_string());
    }
}

impl LvmCommand<'_> {
    fn subcommand(&self) -> &'static str {
        match self {
            LvmCommand::Report { .. } => "fullreport",
            LvmCommand::CreateLinear { .. }
            | LvmCommand::CreateThinPool { .. }
            | LvmCommand::CreateThin { .. }
            | LvmCommand::CreateThinSnapshot { .. } => "lvcreate",
            LvmCommand::Extend { .. } => "lvextend",
            LvmCommand::Remove { .. } => "lvremove",
            LvmCommand::Activate { .. }
            | LvmCommand::Deactivate { .. }
            | LvmCommand::AddTags { .. }
            | LvmCommand::DeleteTags { .. }
            | LvmCommand::DeleteTagsFromMany { .. } => "lvchange",
            LvmCommand::PvCreate { .. } => "pvcreate",
            LvmCommand::PvRemove { .. } => "pvremove",
            LvmCommand::VgCreate { .. } => "vgcreate",
            LvmCommand::VgRemove { .. } => "vgremove",
        }
    }

    /// A short human description for errors and logs, e.g. "lvcreate vg0/pvc-1".
    fn describe(&self) -> String {
        let sub = self.subcommand();
        match *self {
            LvmCommand::Report { vgs } => {
                let names: Vec<&str> = vgs.iter().map(VgName::as_str).collect();
                format!("{sub} {}", names.join(" "))
            }
            LvmCommand::CreateLinear { vg, lv, .. }
            | LvmCommand::Extend { vg, lv, .. }
            | LvmCommand::Remove { vg, lv } => {
                format!("{sub} {}", lv_path(vg, lv))
            }
            LvmCommand::CreateThinPool { vg, pool, .. } => format!("{sub} thin pool {}", lv_path(vg, pool)),
            LvmCommand::CreateThin { vg, lv, .. } => format!("{sub} thin {}", lv_path(vg, lv)),
            LvmCommand::CreateThinSnapshot { vg, origin, lv, .. } => {
                format!("{sub} snapshot {} of {}", lv_path(vg, lv), lv_path(vg, origin))
            }
            LvmCommand::Activate { vg, lv } => format!("{sub} -ay {}", lv_path(vg, lv)),
            LvmCommand::Deactivate { vg, lv } => format!("{sub} -an {}", lv_path(vg, lv)),
            LvmCommand::AddTags { vg, lv, .. } => format!("{sub} --addtag {}", lv_path(vg, lv)),
            LvmCommand::DeleteTags { vg, lv, .. } => format!("{sub} --deltag {}", lv_path(vg, lv)),
            LvmCommand::DeleteTagsFromMany { vg, lvs, .. } => {
                let names: Vec<String> = lvs.iter().map(|lv| lv_path(vg, lv)).collect();
                format!("{sub} --deltag {}", names.join(" "))
            }
            LvmCommand::PvCreate { device: path } | LvmCommand::PvRemove { device: path } => {
                format!("{sub} {}", device(path))
            }
            LvmCommand::VgCreate { vg, .. } | LvmCommand::VgRemove { vg } => format!("{sub} {vg}"),
        }
    }

    /// The arguments of `lvm`, subcommand first. `config` is the operator's `--config` string;
    /// lvm takes one `--config` only, so a report's pinned settings are appended to it.
    fn argv(&self, config: Option<&str>) -> Vec<String> {
        let mut argv = vec![self.subcommand().to_owned()];
        let config = match (self, config) {
            (LvmCommand::Report { .. }, Some(config)) => Some(format!("{config} {REPORT_CONFIG}")),
            (LvmCommand::Report { .. }, None) => Some(REPORT_CONFIG.to_owned()),
            (_, config) => config.map(str::to_owned),
        };
        if let Some(config) = config {
            argv.extend(["--config".to_owned(), config]);
        }
        let words = |words: &[&str]| words.iter().map(|w| (*w).to_owned()).collect::<Vec<_>>();
        match *self {
            LvmCommand::Report { vgs } => {
                argv.extend(words(&["--reportformat", "json", "--units", "b", "--nosuffix"]));
                // fullreport prints all five subreports; pv and pvseg get one cheap column each.
                for (subreport, columns) in [
                    ("vg", VG_COLUMNS),
                    ("pv", "pv_name"),
                    ("lv", LV_COLUMNS),
                    ("pvseg", "pvseg_start"),
                    ("seg", SEG_COLUMNS),
                ] {
                    argv.extend(words(&["--configreport", subreport, "-o", columns]));
                }
                argv.extend(vgs.iter().map(VgName::to_string));
            }
            LvmCommand::CreateLinear { vg, lv, size_bytes, tags } => {
                // A new linear LV gets extents a removed one may have used: wipe the
                // signatures lvm finds and zero its first 4 KiB, so no old filesystem shows.
                argv.extend(words(&["--yes", "--activate", "y", "--wipesignatures", "y", "--zero", "y"]));
                argv.extend(["--name".to_owned(), lv.to_string(), "--size".to_owned(), bytes(size_bytes)]);
                push_tags(&mut argv, "--addtag", tags);
                argv.push(vg.to_string());
            }
            LvmCommand::CreateThinPool { vg, pool, size_bytes } => {
                // --zero y: the pool zeroes each chunk it hands out, so a new thin volume can
                // never read a removed one's data.
                argv.extend(words(&["--yes", "--activate", "y", "--type", "thin-pool", "--zero", "y"]));
                argv.extend(["--name".to_owned(), pool.to_string(), "--size".to_owned(), bytes(size_bytes)]);
                argv.push(vg.to_string());
            }
            LvmCommand::CreateThin { vg, pool, lv, virtual_size_bytes, tags } => {
                argv.extend(words(&["--yes", "--activate", "y", "--type", "thin"]));
                argv.extend(["--thinpool".to_owned(), pool.to_string()]);
                argv.extend(["--virtualsize".to_owned(), bytes(virtual_size_bytes)]);
                argv.extend(["--name".to_owned(), lv.to_string()]);
                push_tags(&mut argv, "--addtag", tags);
                argv.push(vg.to_string());
            }
            LvmCommand::CreateThinSnapshot { vg, origin, lv, tags } => {
                // `--type thin` with an LV argument is a thin snapshot of it (and refused for
                // a non-thin origin, never a copy-on-write snapshot). Without
                // --setactivationskip n it would be skipped by plain activation.
                argv.extend(words(&["--yes", "--activate", "n", "--type", "thin", "--setactivationskip", "n"]));
                argv.extend(["--name".to_owned(), lv.to_string()]);
                push_tags(&mut argv, "--addtag", tags);
                argv.push(lv_path(vg, origin));
            }
            LvmCommand::Extend { vg, lv, size_bytes } => {
                // No --resizefs: the filesystem is grown by the node, on the device.
                argv.extend(words(&["--yes", "--size"]));
                argv.push(bytes(size_bytes));
                argv.push(lv_path(vg, lv));
            }
            LvmCommand::Remove { vg, lv } => {
                argv.push("--yes".to_owned());
                argv.push(lv_path(vg, lv));
            }
            LvmCommand::Activate { vg, lv } => {
                argv.extend(words(&["--yes", "--activate", "y", "--ignoreactivationskip"]));
                argv.push(lv_path(vg, lv));
            }
            LvmCommand::Deactivate { vg, lv } => {
                argv.extend(words(&["--yes", "--activate", "n"]));
                argv.push(lv_path(vg, lv));
            }
            LvmCommand::AddTags { vg, lv, tags } => {
                argv.push("--yes".to_owned());
                push_tags(&mut argv, "--addtag", tags);
                argv.push(lv_path(vg, lv));
            }
            LvmCommand::DeleteTags { vg, lv, tags } => {
                argv.push("--yes".to_owned());
                push_tags(&mut argv, "--deltag", tags);
                argv.push(lv_path(vg, lv));
            }
            LvmCommand::DeleteTagsFromMany { vg, lvs, tags } => {
                argv.push("--yes".to_owned());
                push_tags(&mut argv, "--deltag", tags);
                argv.extend(lvs.iter().map(|lv| lv_path(vg, lv)));
            }
            LvmCommand::PvCreate { device: path } | LvmCommand::PvRemove { device: path } => {
                argv.push("--yes".to_owned());
                argv.push(device(path));
            }
            LvmCommand::VgCreate { vg, devices } => {
                argv.push("--yes".to_owned());
                argv.push(vg.to_string());
                argv.extend(devices.iter().map(|path| device(path)));
            }
            LvmCommand::VgRemove { vg } => {
                argv.push("--yes".to_owned());
                argv.push(vg.to_string());
            }
        }
        argv
    }
}

/// The lvm2 command line, run through a [`Runner`].
#[derive(Debug, Clone)]
pub struct LvmCli {
    runner: Arc<dyn Runner>,
    config: Option<String>,
}

impl LvmCli {
    pub fn new(runner: Arc<dyn Runner>) -> Self {
        LvmCli { runner, config: None }
    }

    /// Passes `config` as `--config` to every command, e.g. `devices/use_devicesfile=0` so a
    /// host whose lvm uses a devices file (the default on RHEL 9) still sees the node's
    /// disks. Settings are separated by spaces; the last value of a setting wins.
    pub fn with_config(mut self, config: impl Into<String>) -> Self {
        self.config = Some(config.into());
        self
    }

    fn run(&self, command: LvmCommand<'_>) -> Result<Output, LvmError> {
        let argv = command.argv(self.config.as_deref());
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        // One line per command at debug level: what operators (and the benchmark, which
        // counts them) see of the driver's lvm traffic.
        tracing::debug!(command = %command.describe(), "lvm command");
        self.runner.run(LVM, &args).map_err(|err| match err {
            CommandError::Spawn { source, .. } => LvmError::Spawn { command: command.describe(), source },
            CommandError::Exit { code, stderr, .. } => {
                LvmError::Exit { command: command.describe(), code, stderr: stderr.trim().to_owned() }
            }
        })
    }

    fn check_full_name(command: LvmCommand<'_>, vg: &VgName, lv: &LvName) -> Result<(), LvmError> {
        names::check_full_name(vg, lv).map_err(|source| LvmError::Name { command: command.describe(), source })
    }

    /// The given VGs, even those without LVs, and their visible LVs, in one `lvm fullreport`.
    /// A VG that does not exist fails the whole report ([`Refusal::VgNotFound`]). No VGs
    /// asked for is an empty report, without running lvm (fullreport would list every VG).
    pub fn report(&self, vgs: &[VgName]) -> Result<Report, LvmError> {
        if vgs.is_empty() {
            return Ok(Report::default());
        }
        let command = LvmCommand::Report { vgs };
        let output = self.run(command)?;
        Report::from_fullreport_json(&output.stdout)
            .map_err(|reason| LvmError::Parse { command: command.describe(), reason })
    }

    /// Creates and activates a linear LV of at least `size_bytes` (rounded up to extents).
    pub fn create_linear(&self, vg: &VgName, lv: &LvName, size_bytes: u64, tags: &[Tag]) -> Result<(), LvmError> {
        let command = LvmCommand::CreateLinear { vg, lv, size_bytes, tags };
        Self::check_full_name(command, vg, lv)?;
        self.run(command).map(drop)
    }

    /// Creates a thin pool whose data holds `size_bytes`; lvm sizes its metadata.
    pub fn create_thin_pool(&self, vg: &VgName, pool: &LvName, size_bytes: u64) -> Result<(), LvmError> {
        let command = LvmCommand::CreateThinPool { vg, pool, size_bytes };
        Self::check_full_name(command, vg, pool)?;
        self.run(command).map(drop)
    }

    /// Creates and activates a thin volume of `virtual_size_bytes` in `pool`.
    pub fn create_thin(
        &self,
        vg: &VgName,
        pool: &LvName,
        lv: &LvName,
        virtual_size_bytes: u64,
        tags: &[Tag],
    ) -> Result<(), LvmError> {
        let command = LvmCommand::CreateThin { vg, pool, lv, virtual_size_bytes, tags };
        Self::check_full_name(command, vg, lv)?;
        self.run(command).map(drop)
    }

    /// Creates `new`, a thin snapshot of the thin volume `origin`, left inactive: a snapshot
    /// kept as a backup needs no device; [`LvmCli::activate`] gives it one (e.g. for a volume
    /// cloned from it). Freeze the origin's filesystem first for a consistent snapshot.
    pub fn create_thin_snapshot(
        &self,
        vg: &VgName,
        origin: &LvName,
        new: &LvName,
        tags: &[Tag],
    ) -> Result<(), LvmError> {
        let command = LvmCommand::CreateThinSnapshot { vg, origin, lv: new, tags };
        Self::check_full_name(command, vg, new)?;
        self.run(command).map(drop)
    }

    /// Grows `lv` to at least `new_size_bytes` (a thin volume's virtual size). Not the
    /// filesystem on it. The current size or less is refused ([`Refusal::SizeNotLarger`]).
    pub fn extend(&self, vg: &VgName, lv: &LvName, new_size_bytes: u64) -> Result<(), LvmError> {
        self.run(LvmCommand::Extend { vg, lv, size_bytes: new_size_bytes }).map(drop)
    }

    /// Removes `lv`, deactivating it first; refused while it is open ([`Refusal::InUse`]).
    pub fn remove(&self, vg: &VgName, lv: &LvName) -> Result<(), LvmError> {
        self.run(LvmCommand::Remove { vg, lv }).map(drop)
    }

    /// Activates `lv` (and its thin pool), snapshots flagged to skip activation included.
    pub fn activate(&self, vg: &VgName, lv: &LvName) -> Result<(), LvmError> {
        self.run(LvmCommand::Activate { vg, lv }).map(drop)
    }

    pub fn deactivate(&self, vg: &VgName, lv: &LvName) -> Result<(), LvmError> {
        self.run(LvmCommand::Deactivate { vg, lv }).map(drop)
    }

    /// Adds `tags` to `lv`; tags it already has are fine. No tags runs nothing.
    pub fn add_tags(&self, vg: &VgName, lv: &LvName, tags: &[Tag]) -> Result<(), LvmError> {
        if tags.is_empty() {
            return Ok(());
        }
        self.run(LvmCommand::AddTags { vg, lv, tags }).map(drop)
    }

    /// Deletes `tags` from `lv`; tags it does not have are fine. No tags runs nothing.
    pub fn delete_tags(&self, vg: &VgName, lv: &LvName, tags: &[Tag]) -> Result<(), LvmError> {
        if tags.is_empty() {
            return Ok(());
        }
        self.run(LvmCommand::DeleteTags { vg, lv, tags }).map(drop)
    }

    /// Deletes `tags` from every LV of `lvs` in one command (lvchange takes many LVs); tags
    /// an LV does not have are fine. A missing LV fails the command (the others are still
    /// changed). Nothing to do runs nothing.
    pub fn delete_tags_from_many(&self, vg: &VgName, lvs: &[LvName], tags: &[Tag]) -> Result<(), LvmError> {
        if tags.is_empty() || lvs.is_empty() {
            return Ok(());
        }
        self.run(LvmCommand::DeleteTagsFromMany { vg, lvs, tags }).map(drop)
    }

    /// Makes `device` a physical volume. `--yes` wipes any signature lvm finds on it
    /// (a filesystem, a partition table) without asking: for test and setup tooling.
    pub fn pvcreate(&self, device: &Path) -> Result<(), LvmError> {
        self.run(LvmCommand::PvCreate { device }).map(drop)
    }

    pub fn pvremove(&self, device: &Path) -> Result<(), LvmError> {
        self.run(LvmCommand::PvRemove { device }).map(drop)
    }

    pub fn vgcreate(&self, vg: &VgName, devices: &[&Path]) -> Result<(), LvmError> {
        self.run(LvmCommand::VgCreate { vg, devices }).map(drop)
    }

    /// Removes `vg` and, because of `--yes`, every LV in it: for test and setup tooling.
    pub fn vgremove(&self, vg: &VgName) -> Result<(), LvmError> {
        self.run(LvmCommand::VgRemove { vg }).map(drop)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::VecDeque;
    use std::path::PathBuf;
    use std::sync::Mutex;

    use super::*;

    /// Records every call and answers from a script; with the script empty, succeeds with no
    /// output.
    #[derive(Debug, Default)]
    struct RecordingRunner {
        calls: Mutex<Vec<Vec<String>>>,
        answers: Mutex<VecDeque<Result<Output, CommandError>>>,
    }

    impl RecordingRunner {
        fn answering(answer: Result<Output, CommandError>) -> Arc<Self> {
            let runner = RecordingRunner::default();
            runner.answers.lock().unwrap().push_back(answer);
            Arc::new(runner)
        }

        /// Each call as `lvm` and its arguments.
        fn calls(&self) -> Vec<Vec<String>> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl Runner for RecordingRunner {
        fn run(&self, program: &str, args: &[&str]) -> Result<Output, CommandError> {
            let mut call = vec![program.to_owned()];
            call.extend(args.iter().map(|a| (*a).to_owned()));
            self.calls.lock().unwrap().push(call);
            self.answers.lock().unwrap().pop_front().unwrap_or_else(|| Ok(Output::default()))
        }
    }

    fn exit(code: i32, stderr: &str) -> Result<Output, CommandError> {
        Err(CommandError::Exit {
            program: "lvm".into(),
            status: format!("exit status: {code}"),
            code: Some(code),
            stderr: stderr.into(),
        })
    }

    fn vg(name: &str) -> VgName {
        VgName::parse(name).unwrap()
    }

    fn lv(name: &str) -> LvName {
        LvName::parse(name).unwrap()
    }

    fn tag(name: &str) -> Tag {
        Tag::parse(name).unwrap()
    }

    /// Runs `call` on a CLI over a recording runner and returns the one argv it ran.
    fn argv_of(config: Option<&str>, call: impl FnOnce(&LvmCli) -> Result<(), LvmError>) -> String {
        let runner = Arc::new(RecordingRunner::default());
        let mut cli = LvmCli::new(runner.clone());
        if let Some(config) = config {
            cli = cli.with_config(config);
        }
        call(&cli).unwrap();
        let calls = runner.calls();
        assert_eq!(calls.len(), 1, "{calls:?}");
        calls[0].join(" ")
    }

    #[test]
    fn argv_of_each_command() {
        let (vg0, pvc, pool, snap) = (vg("vg0"), lv("pvc-1"), lv("pool"), lv("snap-1"));
        let tags = [tag("ferrovol.volume=pvc-1"), tag("ferrovol")];
        let loop0 = PathBuf::from("/dev/loop0");
        let loop1 = PathBuf::from("/dev/loop1");
        let cases: Vec<(String, &str)> = vec![
            (
                argv_of(None, |c| c.create_linear(&vg0, &pvc, 1 << 30, &tags)),
                "lvm lvcreate --yes --activate y --wipesignatures y --zero y --name pvc-1 --size 1073741824b \
                 --addtag ferrovol.volume=pvc-1 --addtag ferrovol vg0",
            ),
            (
                argv_of(None, |c| c.create_thin_pool(&vg0, &pool, 8 << 30)),
                "lvm lvcreate --yes --activate y --type thin-pool --zero y --name pool --size 8589934592b vg0",
            ),
            (
                argv_of(None, |c| c.create_thin(&vg0, &pool, &pvc, 4096 * 512, &tags[..1])),
                "lvm lvcreate --yes --activate y --type thin --thinpool pool --virtualsize 2097152b --name pvc-1 \
                 --addtag ferrovol.volume=pvc-1 vg0",
            ),
            (
                argv_of(None, |c| c.create_thin_snapshot(&vg0, &pvc, &snap, &[tag("ferrovol.snapshot=snap-1")])),
                "lvm lvcreate --yes --activate n --type thin --setactivationskip n --name snap-1 \
                 --addtag ferrovol.snapshot=snap-1 vg0/pvc-1",
            ),
            (argv_of(None, |c| c.extend(&vg0, &pvc, 2 << 30)), "lvm lvextend --yes --size 2147483648b vg0/pvc-1"),
            (argv_of(None, |c| c.remove(&vg0, &pvc)), "lvm lvremove --yes vg0/pvc-1"),
            (
                argv_of(None, |c| c.activate(&vg0, &snap)),
                "lvm lvchange --yes --activate y --ignoreactivationskip vg0/snap-1",
            ),
            (argv_of(None, |c| c.deactivate(&vg0, &pvc)), "lvm lvchange --yes --activate n vg0/pvc-1"),
            (
                argv_of(None, |c| c.add_tags(&vg0, &pvc, &tags)),
                "lvm lvchange --yes --addtag ferrovol.volume=pvc-1 --addtag ferrovol vg0/pvc-1",
            ),
            (
                argv_of(None, |c| c.delete_tags(&vg0, &pvc, &tags)),
                "lvm lvchange --yes --deltag ferrovol.volume=pvc-1 --deltag ferrovol vg0/pvc-1",
            ),
            (argv_of(None, |c| c.pvcreate(&loop0)), "lvm pvcreate --yes /dev/loop0"),
            (argv_of(None, |c| c.pvremove(&loop0)), "lvm pvremove --yes /dev/loop0"),
            (
                argv_of(None, |c| c.vgcreate(&vg0, &[loop0.as_path(), loop1.as_path()])),
                "lvm vgcreate --yes vg0 /dev/loop0 /dev/loop1",
            ),
            (argv_of(None, |c| c.vgremove(&vg0)), "lvm vgremove --yes vg0"),
        ];
        for (got, want) in cases {
            let want = want.split_whitespace().collect::<Vec<_>>().join(" ");
            assert_eq!(got, want);
        }
    }

    #[test]
    fn operator_config_goes_on_every_command_as_one_argument() {
        let runner = Arc::new(RecordingRunner::default());
        let cli = LvmCli::new(runner.clone()).with_config("devices/use_devicesfile=0");
        cli.remove(&vg("vg0"), &lv("pvc-1")).unwrap();
        assert_eq!(
            runner.calls()[0],
            ["lvm", "lvremove", "--config", "devices/use_devicesfile=0", "--yes", "vg0/pvc-1"]
        );
    }

    const REPORT_ARGS: [&str; 25] = [
        "--reportformat",
        "json",
        "--units",
        "b",
        "--nosuffix",
        "--configreport",
        "vg",
        "-o",
        "vg_name,vg_size,vg_free,vg_extent_size",
        "--configreport",
        "pv",
        "-o",
        "pv_name",
        "--configreport",
        "lv",
        "-o",
        "vg_name,lv_name,lv_uuid,lv_size,lv_attr,lv_tags,pool_lv,origin,data_percent,metadata_percent,lv_active,\
         lv_path,lv_dm_path",
        "--configreport",
        "pvseg",
        "-o",
        "pvseg_start",
        "--configreport",
        "seg",
        "-o",
        "lv_uuid,segtype",
    ];

    #[test]
    fn report_argv_pins_the_json_shape_and_names_the_vgs() {
        let runner = RecordingRunner::answering(Ok(Output {
            stdout: include_str!("testdata/fullreport-empty-vg.json").to_owned(),
        }));
        let report = LvmCli::new(runner.clone()).report(&[vg("lvmexp_empty"), vg("vg1")]).unwrap();
        assert_eq!(report.vgs[0].name, "lvmexp_empty");

        let mut want = vec!["lvm", "fullreport", "--config", REPORT_CONFIG];
        want.extend(REPORT_ARGS);
        want.extend(["lvmexp_empty", "vg1"]);
        assert_eq!(runner.calls(), [want]);
        assert_eq!(
            REPORT_CONFIG,
            "report/compact_output=0 report/compact_output_cols=\"\" report/list_item_separator=\",\" \
             log/report_command_log=0"
        );

        // The operator's config comes first, so the pinned settings win.
        let runner = RecordingRunner::answering(Ok(Output { stdout: "{\"report\": []}".into() }));
        LvmCli::new(runner.clone()).with_config("devices/use_devicesfile=0").report(&[vg("vg0")]).unwrap();
        assert_eq!(runner.calls()[0][3], format!("devices/use_devicesfile=0 {REPORT_CONFIG}"));
    }

    #[test]
    fn nothing_to_do_runs_nothing() {
        let runner = Arc::new(RecordingRunner::default());
        let cli = LvmCli::new(runner.clone());
        assert_eq!(cli.report(&[]).unwrap(), Report::default());
        cli.add_tags(&vg("vg0"), &lv("a"), &[]).unwrap();
        cli.delete_tags(&vg("vg0"), &lv("a"), &[]).unwrap();
        assert!(runner.calls().is_empty());
    }

    #[test]
    fn names_too_long_together_are_refused_before_running() {
        let runner = Arc::new(RecordingRunner::default());
        let cli = LvmCli::new(runner.clone());
        let (vg0, long) = (vg(&"v".repeat(60)), lv(&"l".repeat(60)));
        let err = cli.create_linear(&vg0, &long, 1 << 20, &[]).unwrap_err();
        assert!(matches!(&err, LvmError::Name { source: NameError::FullNameTooLong { .. }, .. }), "{err}");
        assert!(err.to_string().starts_with(&format!("lvcreate {vg0}/{long}: ")), "{err}");
        assert!(cli.create_thin(&vg0, &lv("pool"), &long, 1 << 20, &[]).is_err());
        assert!(cli.create_thin_pool(&vg0, &long, 1 << 20).is_err());
        assert!(cli.create_thin_snapshot(&vg0, &lv("a"), &long, &[]).is_err());
        assert!(runner.calls().is_empty());
    }

    #[test]
    fn spawn_exit_and_parse_errors_differ() {
        let runner = RecordingRunner::answering(Err(CommandError::Spawn {
            program: "lvm".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        }));
        let err = LvmCli::new(runner).remove(&vg("vg0"), &lv("pvc-1")).unwrap_err();
        assert!(matches!(err, LvmError::Spawn { .. }), "{err}");
        assert_eq!(err.command(), "lvremove vg0/pvc-1");
        assert_eq!((err.exit_code(), err.refusal(), err.is_not_found()), (None, None, false));
        assert!(err.to_string().starts_with("lvremove vg0/pvc-1: could not start lvm: "), "{err}");

        let runner = RecordingRunner::answering(exit(5, "  Failed to find logical volume \"vg0/pvc-1\"\n"));
        let err = LvmCli::new(runner).remove(&vg("vg0"), &lv("pvc-1")).unwrap_err();
        assert!(
            matches!(&err, LvmError::Exit { stderr, .. } if stderr == "Failed to find logical volume \"vg0/pvc-1\"")
        );
        assert_eq!(err.exit_code(), Some(5));
        assert!(err.is_not_found());
        assert_eq!(
            err.to_string(),
            "lvremove vg0/pvc-1: lvm exited with code 5: Failed to find logical volume \"vg0/pvc-1\""
        );

        let runner = RecordingRunner::answering(Err(CommandError::Exit {
            program: "lvm".into(),
            status: "signal: 9 (SIGKILL)".into(),
            code: None,
            stderr: String::new(),
        }));
        let err = LvmCli::new(runner).activate(&vg("vg0"), &lv("pvc-1")).unwrap_err();
        assert_eq!(err.to_string(), "lvchange -ay vg0/pvc-1: lvm exited with a signal: (no message)");

        let runner = RecordingRunner::answering(Ok(Output { stdout: "  WARNING: not json\n".into() }));
        let err = LvmCli::new(runner).report(&[vg("vg0"), vg("vg1")]).unwrap_err();
        assert!(matches!(err, LvmError::Parse { reason: ReportError::Json(_), .. }), "{err}");
        assert_eq!(err.command(), "fullreport vg0 vg1");
        assert_eq!((err.exit_code(), err.refusal()), (None, None));
    }

    #[test]
    fn refusals_from_real_lvm_messages() {
        // stderr of lvm 2.03.16 (exit code 5), as SystemRunner keeps it: trimmed. Where the
        // dev host's missing device-mapper added lines, they are kept: they must not confuse.
        let dm_noise = "File descriptor 10 (/dev/null) leaked on lvm invocation. Parent PID 11970: /usr/bin/ferrovol\n\
                        /dev/mapper/control: open failed: No such device\n  Failure to communicate with kernel \
                        device-mapper driver.\n  Check that device-mapper is available in the kernel.\n  \
                        Incompatible libdevmapper 1.02.185 (2022-05-18) and kernel driver (unknown version).";
        let cases = [
            ("Volume group \"nosuchvg\" not found\n  Cannot process volume group nosuchvg", Refusal::VgNotFound),
            ("Failed to find logical volume \"lvmexp/nosuchlv\"", Refusal::LvNotFound),
            ("Logical volume nosuchlv not found in volume group lvmexp.", Refusal::LvNotFound),
            (
                "WARNING: Activation disabled. No device-mapper interaction will be attempted.\n  \
                 Snapshot origin LV nosuch not found in Volume group lvmexp.",
                Refusal::LvNotFound,
            ),
            ("Pool nosuchpool not found in Volume group lvmexp.", Refusal::LvNotFound),
            ("No device found for /dev/nosuchdev.", Refusal::DeviceNotFound),
            ("Logical Volume \"lin1\" already exists in volume group \"lvmexp\"", Refusal::AlreadyExists),
            ("A volume group called lvmexp already exists.", Refusal::AlreadyExists),
            ("Volume group \"lvmexp\" has insufficient free space (226 extents): 1024 required.", Refusal::NoSpace),
            ("New size (2 extents) matches existing size (2 extents).", Refusal::SizeNotLarger),
            ("New size given (1 extents) not larger than existing size (2 extents)", Refusal::SizeNotLarger),
            // From the messages in lvm 2.03.16's library, not seen on the dev host.
            ("Insufficient free space: 256 extents needed, but only 10 available", Refusal::NoSpace),
            ("Cannot create new thin volume, free space in thin pool vg0/pool reached threshold.", Refusal::NoSpace),
            ("Logical volume vg0/pvc-1 contains a filesystem in use.", Refusal::InUse),
            ("Logical volume vg0/pvc-1 in use.", Refusal::InUse),
            ("Logical volume vg0/pvc-1 is used by another device.", Refusal::InUse),
        ];
        for (stderr, want) in cases {
            let err = LvmError::Exit { command: "x".into(), code: Some(5), stderr: stderr.into() };
            assert_eq!(err.refusal(), Some(want), "{stderr}");
            assert_eq!(err.is_not_found(), matches!(want, Refusal::VgNotFound | Refusal::LvNotFound), "{stderr}");
            let after_noise =
                LvmError::Exit { command: "x".into(), code: Some(5), stderr: format!("{dm_noise}\n  {stderr}") };
            assert_eq!(after_noise.refusal(), Some(want), "{stderr}");
        }
        for stderr in [
            "",
            dm_noise,
            "striped: Required device-mapper target(s) not detected in your kernel.\n  Run `lvcreate --help' for more \
             information.",
            "Names including \"_tmeta\" are reserved. Please choose a different LV name.",
            "Invalid argument for --addtag: bad tag\n  Error during parsing of command line.",
            "Volume group \"vg0\" not found, is inconsistent or has PVs missing.",
            "Logical volume lvmexp/lin1 is not a thin volume. Thin snapshot supports only thin origins.",
        ] {
            let err = LvmError::Exit { command: "x".into(), code: Some(5), stderr: stderr.into() };
            assert_eq!(err.refusal(), None, "{stderr}");
            assert!(!err.is_not_found());
        }
    }
}

/// Against the real lvm on the host: VG-level commands only, because creating an LV needs
/// device-mapper, which the dev host's kernel lacks (the VM suites cover LVs).
#[cfg(all(test, feature = "kernel-tests"))]
#[allow(clippy::unwrap_used)]
mod kernel_tests {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::command::SystemRunner;
    use crate::sys::loopdev::{self, ImageId, LoopDevice};

    const MIB: u64 = 1 << 20;

    /// lvm without its metadata backups: each change to a VG would otherwise leave a file in
    /// /etc/lvm/archive, which outlives the test's VG.
    const NO_BACKUPS: &str = "backup/backup=0 backup/archive=0";

    fn cli() -> LvmCli {
        LvmCli::new(Arc::new(SystemRunner)).with_config(NO_BACKUPS)
    }

    /// A name no other test, process or leftover uses.
    fn unique_vg_name() -> VgName {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        VgName::parse(&format!("ferrovol-test-{}-{n}", std::process::id())).unwrap()
    }

    /// A VG on a loop device over a sparse file. Dropping it removes whatever of it was made
    /// (VG, PV, loop device, file), however the test ended.
    struct ScratchVg {
        vg: VgName,
        device: LoopDevice,
        image: ImageId,
        vg_made: bool,
        pv_made: bool,
        _dir: tempfile::TempDir,
    }

    impl ScratchVg {
        fn new(size_bytes: u64) -> ScratchVg {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("pv.img");
            std::fs::File::create(&path).unwrap().set_len(size_bytes).unwrap();
            let device = loopdev::attach(&path, false).unwrap();
            let mut scratch = ScratchVg {
                vg: unique_vg_name(),
                device,
                image: ImageId::of(&path).unwrap(),
                vg_made: false,
                pv_made: false,
                _dir: dir,
            };
            let cli = cli();
            cli.pvcreate(&scratch.device_path()).unwrap();
            scratch.pv_made = true;
            cli.vgcreate(&scratch.vg, &[scratch.device_path().as_path()]).unwrap();
            scratch.vg_made = true;
            scratch
        }

        fn device_path(&self) -> PathBuf {
            self.device.path()
        }
    }

    impl Drop for ScratchVg {
        fn drop(&mut self) {
            // Errors are printed, not raised: a panic here during a failed test's unwinding
            // would abort the whole test binary.
            let cli = cli();
            if self.vg_made {
                if let Err(err) = cli.vgremove(&self.vg) {
                    eprintln!("cleanup: {err}");
                }
            }
            if self.pv_made {
                if let Err(err) = cli.pvremove(&self.device_path()) {
                    eprintln!("cleanup: {err}");
                }
            }
            if let Err(err) = loopdev::detach_if_attached_to(&self.device, self.image) {
                eprintln!("cleanup: detach {}: {err}", self.device_path().display());
            }
        }
    }

    #[test]
    fn report_lists_a_new_vg_with_its_size_and_no_lvs() {
        let scratch = ScratchVg::new(64 * MIB);
        let report = cli().report(std::slice::from_ref(&scratch.vg)).unwrap();
        assert_eq!(report.vgs.len(), 1, "{report:?}");
        let vg = &report.vgs[0];
        assert_eq!(vg.name, scratch.vg.as_str());
        // lvm's defaults: 4 MiB extents, data from 1 MiB on; so 15 whole extents of 63 MiB.
        assert_eq!(vg.extent_size_bytes, 4 * MIB);
        assert_eq!(vg.size_bytes % vg.extent_size_bytes, 0, "{vg:?}");
        assert!(vg.size_bytes <= 63 * MIB && vg.size_bytes > 63 * MIB - vg.extent_size_bytes, "{vg:?}");
        assert_eq!(vg.free_bytes, vg.size_bytes);
        assert!(report.lvs.is_empty(), "{report:?}");
    }

    #[test]
    fn report_of_a_missing_vg_is_not_found() {
        let missing = unique_vg_name();
        let err = cli().report(std::slice::from_ref(&missing)).unwrap_err();
        assert_eq!(err.refusal(), Some(Refusal::VgNotFound), "{err}");
        assert!(err.is_not_found());
        assert_eq!(err.exit_code(), Some(5));
        // Exactly lvm's refusal: warnings (udev, devices file) would show up here first. Only
        // lvm's note on file descriptors the test harness leaked to it is let through: it
        // depends on who started `cargo test`, not on lvm.
        let want = format!("Volume group \"{missing}\" not found\n  Cannot process volume group {missing}");
        let LvmError::Exit { stderr, .. } = &err else { panic!("{err}") };
        let rest: Vec<&str> = stderr.lines().filter(|l| !l.contains(" leaked on lvm invocation.")).collect();
        assert_eq!(rest.join("\n").trim(), want, "{err}");

        // One missing VG fails the report even when the others exist.
        let scratch = ScratchVg::new(16 * MIB);
        let err = cli().report(&[scratch.vg.clone(), missing]).unwrap_err();
        assert_eq!(err.refusal(), Some(Refusal::VgNotFound), "{err}");
    }

    #[test]
    fn refusals_of_vg_commands() {
        let scratch = ScratchVg::new(16 * MIB);
        let err = cli().vgcreate(&scratch.vg, &[Path::new("/dev/null")]).unwrap_err();
        assert_eq!(err.refusal(), Some(Refusal::AlreadyExists), "{err}");

        let err = cli().pvcreate(Path::new("/dev/ferrovol-no-such-device")).unwrap_err();
        assert_eq!(err.refusal(), Some(Refusal::DeviceNotFound), "{err}");

        let err = cli().vgremove(&unique_vg_name()).unwrap_err();
        assert!(err.is_not_found(), "{err}");
    }

    /// `lvs` of one LV as JSON values, read past `LvmCli` (whose report refuses the
    /// "unknown" activation state lvm shows with activation disabled).
    fn lv_columns(vg: &VgName, lv: &LvName, columns: &str) -> serde_json::Value {
        let path = format!("{vg}/{lv}");
        let args = ["lvs", "--config", "global/activation=0", "--reportformat", "json", "--units", "b", "--nosuffix"];
        let out = SystemRunner.run("lvm", &[&args[..], &["-o", columns, &path]].concat()).unwrap();
        let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        json["report"][0]["lv"][0].clone()
    }

    /// LV commands with `global/activation=0`: lvm then only edits the VG's metadata and never
    /// touches device-mapper (nothing is activated, zeroed or wiped), so they run on a host
    /// without it. Thin pools, thin volumes and snapshots need device-mapper even so.
    #[test]
    fn lv_commands_against_metadata_only_lvm() {
        let scratch = ScratchVg::new(64 * MIB);
        let lvm = LvmCli::new(Arc::new(SystemRunner)).with_config(format!("{NO_BACKUPS} global/activation=0"));
        let vg = &scratch.vg;
        let pvc = LvName::parse("pvc-1").unwrap();
        let (t1, t2) = (Tag::parse("ferrovol.volume=pvc-1").unwrap(), Tag::parse("ferrovol.b").unwrap());

        lvm.create_linear(vg, &pvc, 6 * MIB, std::slice::from_ref(&t1)).unwrap();
        let err = lvm.create_linear(vg, &pvc, 6 * MIB, &[]).unwrap_err();
        assert_eq!(err.refusal(), Some(Refusal::AlreadyExists), "{err}");
        let err = lvm.create_linear(vg, &LvName::parse("big").unwrap(), 1 << 30, &[]).unwrap_err();
        assert_eq!(err.refusal(), Some(Refusal::NoSpace), "{err}");
        // Rounded up to whole 4 MiB extents.
        assert_eq!(lv_columns(vg, &pvc, "lv_size")["lv_size"], "8388608");

        lvm.extend(vg, &pvc, 12 * MIB).unwrap();
        for size in [12 * MIB, 4 * MIB] {
            let err = lvm.extend(vg, &pvc, size).unwrap_err();
            assert_eq!(err.refusal(), Some(Refusal::SizeNotLarger), "{err}");
        }
        assert_eq!(lv_columns(vg, &pvc, "lv_size")["lv_size"], "12582912");

        // Adding a tag twice and deleting one that is gone are both fine.
        lvm.add_tags(vg, &pvc, &[t2.clone(), t1.clone()]).unwrap();
        lvm.add_tags(vg, &pvc, std::slice::from_ref(&t2)).unwrap();
        lvm.delete_tags(vg, &pvc, std::slice::from_ref(&t1)).unwrap();
        lvm.delete_tags(vg, &pvc, std::slice::from_ref(&t1)).unwrap();
        assert_eq!(lv_columns(vg, &pvc, "lv_tags")["lv_tags"], "ferrovol.b");

        let err = lvm.report(std::slice::from_ref(vg)).unwrap_err();
        assert!(
            matches!(&err, LvmError::Parse { reason: ReportError::Field { field: "lv_active", value, .. }, .. } if value == "unknown"),
            "{err}"
        );

        let missing = LvName::parse("missing").unwrap();
        let pool = LvName::parse("pool").unwrap();
        for err in [
            lvm.extend(vg, &missing, 8 * MIB).unwrap_err(),
            lvm.add_tags(vg, &missing, std::slice::from_ref(&t1)).unwrap_err(),
            lvm.create_thin_snapshot(vg, &missing, &LvName::parse("snap").unwrap(), &[]).unwrap_err(),
            lvm.create_thin(vg, &pool, &LvName::parse("thin").unwrap(), 8 * MIB, &[]).unwrap_err(),
        ] {
            assert_eq!(err.refusal(), Some(Refusal::LvNotFound), "{err}");
        }

        lvm.remove(vg, &pvc).unwrap();
        let err = lvm.remove(vg, &pvc).unwrap_err();
        assert_eq!(err.refusal(), Some(Refusal::LvNotFound), "{err}");
        let report = cli().report(std::slice::from_ref(vg)).unwrap();
        assert!(report.lvs.is_empty(), "{report:?}");
    }
}
