//! Assertions on gRPC results that also check the spec's rules for every error status.

use std::fmt::Debug;

use tonic::{Code, Response, Status};

/// Unwraps a successful call, or panics naming the call, the code and the message.
#[track_caller]
pub fn expect_ok<T>(result: Result<Response<T>, Status>, what: &str) -> T {
    match result {
        Ok(response) => response.into_inner(),
        Err(status) => panic!("{what}: expected OK, got {:?}: {}", status.code(), status.message()),
    }
}

/// Asserts the call failed with `expected` and that the status follows the error scheme
/// (a human-readable message, empty details). Answers the status for more checks.
#[track_caller]
pub fn expect_code<T: Debug>(result: Result<Response<T>, Status>, expected: Code, what: &str) -> Status {
    expect_code_in(result, &[expected], what)
}

/// Like [`expect_code`] when the spec allows more than one code.
#[track_caller]
pub fn expect_code_in<T: Debug>(result: Result<Response<T>, Status>, expected: &[Code], what: &str) -> Status {
    match result {
        Ok(response) => panic!("{what}: expected {expected:?}, got OK: {:?}", response.get_ref()),
        Err(status) => {
            assert!(
                expected.contains(&status.code()),
                "{what}: expected {expected:?}, got {:?}: {}",
                status.code(),
                status.message()
            );
            assert_error_scheme(&status, what);
            status
        }
    }
}

/// OK, or one of the `allowed` errors (answering `None` then).
#[track_caller]
pub fn expect_ok_or<T>(result: Result<Response<T>, Status>, allowed: &[Code], what: &str) -> Option<T> {
    match result {
        Ok(response) => Some(response.into_inner()),
        Err(status) => {
            assert!(
                allowed.contains(&status.code()),
                "{what}: expected OK or {allowed:?}, got {:?}: {}",
                status.code(),
                status.message()
            );
            assert_error_scheme(&status, what);
            None
        }
    }
}

/// The spec's error scheme: a non-OK status has a human-readable message and no details.
#[track_caller]
pub fn assert_error_scheme(status: &Status, what: &str) {
    assert!(
        !status.message().trim().is_empty(),
        "{what}: {:?} without a message (the spec requires a human-readable description)",
        status.code()
    );
    assert!(
        status.details().is_empty(),
        "{what}: {:?} carries status details, which the spec requires to be empty",
        status.code()
    );
}

/// Asserts the status message mentions `needle` (case-insensitive).
#[track_caller]
pub fn assert_message_mentions(status: &Status, needle: &str, what: &str) {
    assert!(
        status.message().to_lowercase().contains(&needle.to_lowercase()),
        "{what}: the message should name {needle:?}, got: {}",
        status.message()
    );
}

/// Collects mismatches of independent checks (rows of an error table), so one wrong answer
/// does not hide the others; [`Mismatches::assert_none`] fails the test listing them all.
#[derive(Debug, Default)]
pub struct Mismatches {
    found: Vec<String>,
}

impl Mismatches {
    pub fn new() -> Mismatches {
        Mismatches::default()
    }

    /// Records a mismatch unless the call failed with one of `expected` following the
    /// error scheme.
    pub fn code<T: Debug>(&mut self, result: Result<Response<T>, Status>, expected: &[Code], what: &str) {
        match result {
            Ok(response) => self.found.push(format!("{what}: expected {expected:?}, got OK: {:?}", response.get_ref())),
            Err(status) if !expected.contains(&status.code()) => {
                self.found.push(format!("{what}: expected {expected:?}, got {:?}: {}", status.code(), status.message()))
            }
            Err(status) if status.message().trim().is_empty() || !status.details().is_empty() => self.found.push(
                format!("{what}: {:?} breaks the error scheme (empty message or non-empty details)", status.code()),
            ),
            Err(_) => {}
        }
    }

    /// Records a mismatch unless the call succeeded; answers the response if it did.
    pub fn ok<T>(&mut self, result: Result<Response<T>, Status>, what: &str) -> Option<T> {
        match result {
            Ok(response) => Some(response.into_inner()),
            Err(status) => {
                self.found.push(format!("{what}: expected OK, got {:?}: {}", status.code(), status.message()));
                None
            }
        }
    }

    /// Records `message` unless `condition` holds.
    pub fn check(&mut self, condition: bool, message: impl Into<String>) {
        if !condition {
            self.found.push(message.into());
        }
    }

    /// Fails the test listing every mismatch recorded.
    #[track_caller]
    pub fn assert_none(&mut self) {
        let found = std::mem::take(&mut self.found);
        assert!(found.is_empty(), "{} mismatch(es):\n  - {}", found.len(), found.join("\n  - "));
    }
}

impl Drop for Mismatches {
    fn drop(&mut self) {
        if !self.found.is_empty() && std::thread::panicking() {
            eprintln!(
                "{} mismatch(es) recorded before the test failed:\n  - {}",
                self.found.len(),
                self.found.join("\n  - ")
            );
            return;
        }
        if !self.found.is_empty() {
            let found = std::mem::take(&mut self.found);
            panic!("{} mismatch(es) never asserted:\n  - {}", found.len(), found.join("\n  - "));
        }
    }
}
