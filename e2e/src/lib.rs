//! Harness for the end-to-end tests: starts the real `ferrovol` binary and checks it over gRPC.
//!
//! Each test gets its own [`Driver`]: a child process on its own socket with its own data
//! directory inside a private temporary [`Sandbox`]. Scenarios are written once against a
//! storage [`Family`] and instantiated per family with [`family_tests!`], so the lvm,
//! lvm-thin and s3 families will run the same suite with their own parameters.
//!
//! Tests that drive the kernel live behind the `kernel-tests` feature and need root:
//! `cargo build --bins && cargo test -p ferrovol-e2e --features kernel-tests`.

pub mod assertions;
pub mod binary;
pub mod cluster;
pub mod data;
pub mod driver;
pub mod family;
pub mod independent;
pub mod kernel;
pub mod lvm;
pub mod netns;
pub mod requests;
#[cfg(feature = "s3-tests")]
pub mod s3;
pub mod sandbox;
pub mod steps;

pub use ferrovol_proto::csi::v1 as csi;
pub use tonic::Code;

pub use assertions::{expect_code, expect_code_in, expect_ok};
pub use cluster::{Cluster, ClusterOptions};
pub use driver::{Driver, DriverOptions, LogFormat, Transport};
pub use family::{Family, FamilyKind, FsType, Split};
pub use netns::Net;
pub use requests::{Access, Vol, GIB, MIB};
pub use sandbox::Sandbox;

/// Instantiates scenarios for one storage family.
///
/// Each scenario is an `async fn(&Family)` in the calling module; the macro makes a module
/// named after the family with one `#[tokio::test]` per scenario, so a failing test names
/// both the family and the scenario (`loop_family::create_volume_is_idempotent`).
///
/// ```text
/// ferrovol_e2e::family_tests!(loop_family => ferrovol_e2e::Family::loop_family();
///     create_volume_is_idempotent, delete_volume_rules);
/// ```
///
/// Several families with one list of scenarios:
///
/// ```text
/// ferrovol_e2e::family_tests!([in_vm_lvm_linear => Family::lvm_linear(), in_vm_lvm_thin => Family::lvm_thin()];
///     create_volume_is_idempotent, delete_volume_rules);
/// ```
#[macro_export]
macro_rules! family_tests {
    ([]; $($scenario:ident),+ $(,)?) => {};
    ([$module:ident => $family:expr $(, $more:ident => $more_family:expr)* $(,)?]; $($scenario:ident),+ $(,)?) => {
        $crate::family_tests!($module => $family; $($scenario),+);
        $crate::family_tests!([$($more => $more_family),*]; $($scenario),+);
    };
    ($module:ident => $family:expr; $($scenario:ident),+ $(,)?) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    let family = $family;
                    super::$scenario(&family).await;
                }
            )+
        }
    };
}
