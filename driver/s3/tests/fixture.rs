//! The test S3 server fixture works: a real server starts, takes a put, returns it, and
//! the client's timeouts make a paused server fail a call within the bound.
#![cfg(feature = "s3-tests")]

use std::time::{Duration, Instant};

use ferrovol_s3::testing::S3Server;
use ferrovol_s3::{build_client, Timeouts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_server_round_trips_an_object_and_a_paused_one_fails_in_bounded_time() {
    let server = S3Server::start();
    let client = build_client(&server.endpoint, Timeouts::default());
    client.put_object().bucket(&server.bucket).key("a/b.txt").body(b"hello".to_vec().into()).send().await.expect("put");
    let got = client.get_object().bucket(&server.bucket).key("a/b.txt").send().await.expect("get");
    let bytes = got.body.collect().await.expect("body").into_bytes();
    assert_eq!(&bytes[..], b"hello");

    server.pause();
    let bounded = build_client(&server.endpoint, Timeouts::within(Duration::from_secs(2)));
    let t = Instant::now();
    let err = bounded.head_object().bucket(&server.bucket).key("a/b.txt").send().await.expect_err("paused");
    let took = t.elapsed();
    server.resume();
    let f = ferrovol_s3::error::classify("HeadObject", "a/b.txt", &err);
    assert_eq!(f.kind, ferrovol_s3::error::Kind::Unreachable, "{}", f.message);
    assert!(took < Duration::from_secs(4), "a paused server took {took:?} to fail a call bounded at 2 s");
}
