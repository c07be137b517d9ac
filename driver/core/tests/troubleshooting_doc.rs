//! Keeps docs/TROUBLESHOOTING.md in step with the driver's one error type: every variant of
//! `ferrovol_core::error::Error` must be named there in a table row that also gives the gRPC
//! code the variant maps to. `variant_name` has no wildcard arm, so a new variant does not
//! compile here until someone names it, adds a sample of it, and documents it.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use ferrovol_core::error::{Code, Error};

/// The variant's name as the documentation writes it. No wildcard arm: adding a variant to
/// `Error` breaks this build until the variant is named here (and in the documentation).
fn variant_name(e: &Error) -> &'static str {
    match e {
        Error::InvalidArgument { .. } => "InvalidArgument",
        Error::UnknownParameter { .. } => "UnknownParameter",
        Error::UnsupportedCapability { .. } => "UnsupportedCapability",
        Error::VolumeNotFound { .. } => "VolumeNotFound",
        Error::SnapshotNotFound { .. } => "SnapshotNotFound",
        Error::NodeNotFound { .. } => "NodeNotFound",
        Error::NameConflict { .. } => "NameConflict",
        Error::PublishedIncompatible { .. } => "PublishedIncompatible",
        Error::InProgress { .. } => "InProgress",
        Error::CapacityOutOfRange { .. } => "CapacityOutOfRange",
        Error::InsufficientCapacity { .. } => "InsufficientCapacity",
        Error::PoolExhausted { .. } => "PoolExhausted",
        Error::TopologyUnreachable { .. } => "TopologyUnreachable",
        Error::Precondition { .. } => "Precondition",
        Error::BadToken { .. } => "BadToken",
        Error::Unavailable { .. } => "Unavailable",
        Error::System { .. } => "System",
        Error::Remote { .. } => "Remote",
    }
}

/// One value of every variant. `Remote` passes the node's code on; the documentation gives
/// UNAVAILABLE for it (a node agent that cannot be reached or refuses the controller), so
/// that is the sample's code.
fn one_of_each() -> Vec<Error> {
    let s = || String::from("x");
    vec![
        Error::InvalidArgument { field: "name", reason: s() },
        Error::UnknownParameter { key: s(), known: s() },
        Error::UnsupportedCapability { reason: s() },
        Error::VolumeNotFound { volume: s(), reason: s() },
        Error::SnapshotNotFound { snapshot: s(), reason: s() },
        Error::NodeNotFound { node: s(), reason: s() },
        Error::NameConflict { kind: "volume", name: s(), reason: s() },
        Error::PublishedIncompatible { volume: s(), path: s(), reason: s() },
        Error::InProgress { what: s() },
        Error::CapacityOutOfRange { volume: s(), reason: s() },
        Error::InsufficientCapacity { volume: s(), requested: 2, available: 1 },
        Error::PoolExhausted { object: s(), reason: s() },
        Error::TopologyUnreachable { volume: s(), reason: s() },
        Error::Precondition { object: s(), reason: s() },
        Error::BadToken { token: s(), reason: s() },
        Error::Unavailable { reason: s() },
        Error::System { operation: s(), object: s(), cause: s() },
        Error::Remote { node: s(), code: Code::Unavailable, message: s() },
    ]
}

/// The code as the CSI spec and the documentation spell it.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(relative: &str) -> String {
    let path = repo_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// `text` without its string literals and comments, so that braces inside `#[error("...")]`
/// formats do not count as the enum's own.
fn strip_strings_and_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        '\n' => out.push('\n'),
                        _ => {}
                    }
                }
            }
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// The variant identifiers declared in driver/core/src/error.rs's `pub enum Error { ... }`:
/// identifiers that start a line at brace depth one (attributes and doc comments skipped).
fn declared_variants() -> Vec<String> {
    let source = read("driver/core/src/error.rs");
    let start = source.find("pub enum Error {").expect("driver/core/src/error.rs declares `pub enum Error {`");
    let body = strip_strings_and_comments(&source[start + "pub enum Error ".len()..]);
    let mut depth = 0usize;
    let mut variants = Vec::new();
    'lines: for line in body.lines() {
        let trimmed = line.trim_start();
        if depth == 1 && trimmed.starts_with(|c: char| c.is_ascii_uppercase()) {
            variants.push(trimmed.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect());
        }
        for c in line.chars() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        break 'lines;
                    }
                }
                _ => {}
            }
        }
    }
    variants
}

#[test]
fn the_samples_cover_every_declared_variant() {
    let mut declared = declared_variants();
    assert!(declared.len() >= 10, "parsed too few variants from error.rs: {declared:?}");
    let mut sampled: Vec<String> = one_of_each().iter().map(|e| variant_name(e).to_owned()).collect();
    declared.sort();
    sampled.sort();
    assert_eq!(sampled, declared, "one_of_each() must hold exactly one value of every variant of Error");
}

#[test]
fn troubleshooting_names_every_variant_with_its_code() {
    let doc = read("docs/TROUBLESHOOTING.md");
    let rows: Vec<&str> = doc.lines().filter(|l| l.trim_start().starts_with('|')).collect();
    let mut missing = Vec::new();
    for e in one_of_each() {
        let name = format!("`{}`", variant_name(&e));
        let code = code_name(e.code());
        if !rows.iter().any(|row| row.contains(&name) && row.contains(code)) {
            missing.push(format!("{name} with {code}"));
        }
    }
    assert!(
        missing.is_empty(),
        "docs/TROUBLESHOOTING.md has no table row naming these variants of ferrovol_core::error::Error \
         together with their gRPC code: {missing:?}"
    );
}
