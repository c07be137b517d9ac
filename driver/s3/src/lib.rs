//! ferrovol's S3 family: where a volume's objects live ([`layout`]), how the credentials in
//! a CSI request's secrets become a client ([`endpoint`], [`client`]), and how S3's refusals
//! become the driver's errors ([`error`]), and what every S3 call is measured by ([`metrics`]). The controller's bucket and prefix operations and
//! the mounter's FUSE filesystem both build on these.

pub mod client;
pub mod controller;
pub mod endpoint;
pub mod error;
pub mod layout;
pub mod md5;
pub mod metrics;
pub mod record;
#[cfg(feature = "testing")]
pub mod testing;

pub use client::{build_client, Timeouts};
pub use controller::S3Controller;
pub use endpoint::S3Endpoint;
