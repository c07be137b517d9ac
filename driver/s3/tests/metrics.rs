//! The S3 call metrics against a real S3 server (moto by default, garage with
//! FERROVOL_TEST_S3=garage): every outcome a client built by `build_client` can meet is
//! counted by operation, with its body bytes and retries, and nothing names a bucket or key.
//! One test in its own binary: the metrics are the process's.
#![cfg(feature = "s3-tests")]

use std::time::Duration;

use ferrovol_s3::metrics::{s3, Outcome};
use ferrovol_s3::testing::S3Server;
use ferrovol_s3::{build_client, S3Endpoint, Timeouts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_counted_by_operation_outcome_and_bytes() {
    let server = S3Server::start();
    let c = build_client(&server.endpoint, Timeouts::default());
    let bucket = format!("fv-metrics-{}", std::process::id());
    let key = "secret-looking-key/object";
    let m = s3();

    let created = m.count("CreateBucket", &Outcome::Status(200));
    c.create_bucket().bucket(&bucket).send().await.expect("create bucket");
    assert_eq!(m.count("CreateBucket", &Outcome::Status(200)), created + 1);

    // A PUT of 100 KiB: its body is counted as sent.
    let body = vec![7u8; 100 * 1024];
    let (put_ok, sent) = (m.count("PutObject", &Outcome::Status(200)), m.bytes("PutObject", "sent"));
    c.put_object().bucket(&bucket).key(key).body(body.clone().into()).send().await.expect("put");
    assert_eq!(m.count("PutObject", &Outcome::Status(200)), put_ok + 1);
    assert_eq!(m.bytes("PutObject", "sent") - sent, body.len() as u64);

    // A GET of it: received, and a ranged GET is counted under its own status.
    let received = m.bytes("GetObject", "received");
    let got = c.get_object().bucket(&bucket).key(key).send().await.expect("get");
    let data = got.body.collect().await.expect("body").into_bytes();
    assert_eq!(data.len(), body.len());
    let ranged = m.count("GetObject", &Outcome::Status(206));
    let part = c.get_object().bucket(&bucket).key(key).range("bytes=0-1023").send().await.expect("ranged get");
    assert_eq!(part.body.collect().await.expect("body").into_bytes().len(), 1024);
    assert_eq!(m.count("GetObject", &Outcome::Status(206)), ranged + 1);
    assert_eq!(m.bytes("GetObject", "received") - received, body.len() as u64 + 1024);

    // A HEAD of it: the object's length in its answer is no body received.
    let head_received = m.bytes("HeadObject", "received");
    c.head_object().bucket(&bucket).key(key).send().await.expect("head");
    assert_eq!(m.bytes("HeadObject", "received"), head_received);

    // A refusal is counted under its status.
    let missing = m.count("HeadObject", &Outcome::Status(404));
    let e = c.head_object().bucket(&bucket).key("no-such-key").send().await;
    assert!(e.is_err(), "HEAD of a missing key must fail");
    assert_eq!(m.count("HeadObject", &Outcome::Status(404)), missing + 1);

    // Nothing listens: a connection failure, retried.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_port = closed.local_addr().expect("addr").port();
    drop(closed);
    let nowhere = S3Endpoint { endpoint: format!("http://127.0.0.1:{dead_port}"), ..server.endpoint.clone() };
    let dead = build_client(&nowhere, Timeouts::within(Duration::from_secs(3)));
    let (failed, retries) = (m.count("ListBuckets", &Outcome::Connection), m.retries("ListBuckets"));
    assert!(dead.list_buckets().send().await.is_err(), "nothing listens there");
    assert_eq!(m.count("ListBuckets", &Outcome::Connection), failed + 1);
    assert!(m.retries("ListBuckets") > retries, "a refused connection is retried");

    // A server that never answers: the call ends at its bound as a timeout.
    let slow = build_client(&server.endpoint, Timeouts::within(Duration::from_secs(2)));
    server.pause();
    let timeouts = m.count("GetBucketLocation", &Outcome::Timeout);
    assert!(slow.get_bucket_location().bucket(&bucket).send().await.is_err(), "the server is paused");
    assert_eq!(m.count("GetBucketLocation", &Outcome::Timeout), timeouts + 1);

    // A caller that gives up first: cancelled.
    let cancelled = m.count("GetBucketAcl", &Outcome::Cancelled);
    let gave_up = tokio::time::timeout(Duration::from_millis(300), slow.get_bucket_acl().bucket(&bucket).send()).await;
    assert!(gave_up.is_err(), "the server is paused, the caller's bound ends it");
    assert_eq!(m.count("GetBucketAcl", &Outcome::Cancelled), cancelled + 1);
    server.resume();

    // The exposition names operations and outcomes, never the bucket or the key.
    let mut registry = prometheus_client::registry::Registry::default();
    m.register(&mut registry);
    let text = ferrovol_metrics::encode(&registry, ferrovol_metrics::Format::Prometheus).expect("encode");
    assert!(text.contains(r#"ferrovol_s3_requests_total{op="PutObject",outcome="200"}"#), "{text}");
    assert!(!text.contains(&bucket) && !text.contains("secret-looking-key"), "{text}");

    let listed = c.list_objects_v2().bucket(&bucket).send().await.expect("list");
    for o in listed.contents() {
        c.delete_object().bucket(&bucket).key(o.key().unwrap_or_default()).send().await.expect("delete");
    }
    c.delete_bucket().bucket(&bucket).send().await.expect("delete bucket");
}
