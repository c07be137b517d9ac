//! Runs one scenario over several variants so that a failing variant does not hide the rest.

use std::fmt::Debug;
use std::future::Future;

/// Runs `scenario` for each variant in turn, each in its own task: a panic in one variant
/// is recorded (its message is printed by the panic hook) and the next variant still runs.
/// Panics at the end naming every variant that failed.
pub async fn run_each<T, F, Fut>(variants: Vec<T>, scenario: F)
where
    T: Debug + Send + 'static,
    F: Fn(T) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut failed = Vec::new();
    for variant in variants {
        let label = format!("{variant:?}");
        if tokio::spawn(scenario(variant)).await.is_err() {
            failed.push(label);
        }
    }
    assert!(failed.is_empty(), "the scenario failed for {failed:?} (their panic messages are above)");
}
