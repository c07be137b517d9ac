//! The S3 controller against a real S3 server (moto by default, garage with
//! FERROVOL_TEST_S3=garage): creates in own and shared buckets with their repeats and
//! conflicts, secrets, deletes in batches and after a crash, expansion, snapshots,
//! restores, clones, publications and the volume condition.
#![cfg(feature = "s3-tests")]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ferrovol_core::agent::{NewVolume, Source};
use ferrovol_core::error::Code;
use ferrovol_core::ids::{LocalName, NodeId};
use ferrovol_core::params::VolumeParams;
use ferrovol_core::volume::{CapacityRange, GIB, MIB};
use ferrovol_s3::controller::store::{self, CopyPlan, Listed, Store};
use ferrovol_s3::controller::Tuning;
use ferrovol_s3::record::{S3VolumeRecord, VolumeState};
use ferrovol_s3::testing::{S3Server, Server};
use ferrovol_s3::{build_client, layout, S3Controller, Timeouts};
use tokio::task::JoinSet;

fn controller() -> S3Controller {
    S3Controller::new(Timeouts::within(Duration::from_secs(5)))
}

fn params(kv: &[(&str, &str)]) -> VolumeParams {
    let mut m: HashMap<String, String> = kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    m.insert("type".into(), "s3".into());
    VolumeParams::parse(&m).expect("parameters")
}

fn new_volume(name: &str, kv: &[(&str, &str)], required: u64, source: Option<Source>) -> NewVolume {
    NewVolume {
        name: name.into(),
        local: LocalName::from_co_name(name),
        capacity: CapacityRange { required: (required > 0).then_some(required), limit: None },
        params: params(kv),
        source,
    }
}

fn client(server: &S3Server) -> aws_sdk_s3::Client {
    build_client(&server.endpoint, Timeouts::default())
}

async fn put(c: &aws_sdk_s3::Client, bucket: &str, key: &str, body: Vec<u8>) {
    c.put_object()
        .bucket(bucket)
        .key(key)
        .body(body.into())
        .send()
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e:?}"));
}

async fn put_many(c: &aws_sdk_s3::Client, bucket: &str, prefix: &str, n: usize) {
    let mut set = JoinSet::new();
    for i in 0..n {
        while set.len() >= 32 {
            set.join_next().await.expect("task").expect("join");
        }
        let (c, bucket, key) = (c.clone(), bucket.to_owned(), format!("{prefix}f{i:05}"));
        set.spawn(async move { put(&c, &bucket, &key, format!("content {i}").into_bytes()).await });
    }
    while let Some(r) = set.join_next().await {
        r.expect("join");
    }
}

async fn keys(c: &aws_sdk_s3::Client, bucket: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut token = None;
    loop {
        let r = c
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .set_continuation_token(token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("list {bucket}/{prefix}: {e:?}"));
        out.extend(r.contents().iter().filter_map(|o| o.key().map(str::to_owned)));
        match r.next_continuation_token() {
            Some(t) if r.is_truncated() == Some(true) => token = Some(t.to_owned()),
            _ => return out,
        }
    }
}

async fn get(c: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Vec<u8> {
    let o = c.get_object().bucket(bucket).key(key).send().await.unwrap_or_else(|e| panic!("get {key}: {e:?}"));
    o.body.collect().await.expect("body").into_bytes().to_vec()
}

async fn bucket_exists(c: &aws_sdk_s3::Client, bucket: &str) -> bool {
    c.head_bucket().bucket(bucket).send().await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_bucket_volumes_create_repeat_conflict_and_delete() {
    let server = S3Server::start();
    let (ctl, c, secrets) = (controller(), client(&server), server.secrets());
    let v = ctl.create_volume(new_volume("pvc-own-1", &[], 0, None), &secrets).await.expect("create");
    assert_eq!(v.id.to_string(), "s3.vol:fv-pvc-own-1:pvc-own-1");
    assert_eq!(v.bucket, "fv-pvc-own-1");
    assert_eq!(v.record.capacity_bytes, GIB, "the default quota");
    assert!(v.record.own_bucket);
    assert_eq!(v.record.state, VolumeState::Ready);
    let mut made = keys(&c, "fv-pvc-own-1", "").await;
    made.sort();
    assert_eq!(made, vec!["ferrovol/bucket.json", "ferrovol/volumes/pvc-own-1/volume.json"]);

    // A repeat is the same volume; an incompatible one is ALREADY_EXISTS.
    let again = ctl.create_volume(new_volume("pvc-own-1", &[], 512 * MIB, None), &secrets).await.expect("repeat");
    assert_eq!(again.record, v.record);
    let e = ctl.create_volume(new_volume("pvc-own-1", &[], 2 * GIB, None), &secrets).await.expect_err("bigger");
    assert_eq!(e.code(), Code::AlreadyExists, "{e}");
    assert!(e.to_string().contains("capacity"), "{e}");

    // A bucket of that name that someone else filled is not taken.
    c.create_bucket().bucket("fv-pvc-taken").send().await.expect("foreign bucket");
    put(&c, "fv-pvc-taken", "their-data", b"x".to_vec()).await;
    let e = ctl.create_volume(new_volume("pvc-taken", &[], 0, None), &secrets).await.expect_err("foreign");
    assert_eq!(e.code(), Code::AlreadyExists, "{e}");
    assert!(e.to_string().contains("not made by ferrovol"), "{e}");
    assert_eq!(keys(&c, "fv-pvc-taken", "").await, vec!["their-data"], "nothing touched");

    // An empty bucket of that name (an attempt that died before marking it) is taken over.
    c.create_bucket().bucket("fv-pvc-half").send().await.expect("half-made bucket");
    ctl.create_volume(new_volume("pvc-half", &[], 0, None), &secrets).await.expect("takes over the empty bucket");

    ctl.delete_volume(&v.id, &secrets).await.expect("delete");
    assert!(!bucket_exists(&c, "fv-pvc-own-1").await, "the own bucket goes with the volume");
    ctl.delete_volume(&v.id, &secrets).await.expect("delete again is OK");
    let unknown = ferrovol_core::ids::VolumeId::parse("s3.vol:fv-nothing:nothing").expect("id");
    ctl.delete_volume(&unknown, &secrets).await.expect("unknown bucket is OK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_bucket_volumes_create_repeat_conflict_and_missing_bucket() {
    let server = S3Server::start();
    let (ctl, c, secrets) = (controller(), client(&server), server.secrets());
    let shared = server.bucket.clone();
    let kv = [("bucket", shared.as_str())];
    let v = ctl.create_volume(new_volume("pvc-sh-1", &kv, 100 * MIB, None), &secrets).await.expect("create");
    assert_eq!(v.id.to_string(), format!("s3.vol:{shared}:pvc-sh-1"));
    assert!(!v.record.own_bucket);
    assert_eq!(v.record.capacity_bytes, 100 * MIB);
    assert_eq!(keys(&c, &shared, "ferrovol/").await, vec!["ferrovol/volumes/pvc-sh-1/volume.json"]);
    let again = ctl.create_volume(new_volume("pvc-sh-1", &kv, 100 * MIB, None), &secrets).await.expect("repeat");
    assert_eq!(again.id, v.id);
    assert_eq!(again.record, v.record);
    let e = ctl.create_volume(new_volume("pvc-sh-1", &kv, 200 * MIB, None), &secrets).await.expect_err("conflict");
    assert_eq!(e.code(), Code::AlreadyExists, "{e}");

    let e = ctl
        .create_volume(new_volume("pvc-sh-2", &[("bucket", "no-such-bucket")], 0, None), &secrets)
        .await
        .expect_err("missing bucket");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.to_string().contains("no-such-bucket"), "{e}");

    // Deleting a shared-bucket volume leaves the bucket and other volumes.
    ctl.create_volume(new_volume("pvc-sh-3", &kv, 0, None), &secrets).await.expect("another");
    ctl.delete_volume(&v.id, &secrets).await.expect("delete");
    assert!(bucket_exists(&c, &shared).await);
    assert_eq!(keys(&c, &shared, "ferrovol/").await, vec!["ferrovol/volumes/pvc-sh-3/volume.json"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_secrets_are_invalid_argument_naming_the_keys() {
    let server = S3Server::start();
    let ctl = controller();
    let mut secrets = server.secrets();
    secrets.remove("secretAccessKey");
    secrets.remove("endpoint");
    let e = ctl.create_volume(new_volume("pvc-nosecret", &[], 0, None), &secrets).await.expect_err("missing");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("secretAccessKey") && msg.contains("endpoint"), "{msg}");
    assert!(!msg.contains(&server.endpoint.access_key_id) || msg.contains("accessKeyID"), "{msg}");
    let id = ferrovol_core::ids::VolumeId::parse(&format!("s3.vol:{}:x", server.bucket)).expect("id");
    let e = ctl.delete_volume(&id, &HashMap::new()).await.expect_err("no secrets");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.to_string().contains("accessKeyID"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_key_names_the_refused_call_and_never_the_secret() {
    let mut server = S3Server::start();
    server.require_auth();
    let ctl = controller();
    // The right key works.
    let ok = ctl
        .create_volume(new_volume("pvc-auth-ok", &[("bucket", &server.bucket)], 0, None), &server.secrets())
        .await
        .expect("the right credentials");
    assert_eq!(ok.record.state, VolumeState::Ready);
    let wrong = "Wr0ngSecretKeyThatMustNeverAppear0123456789";
    let mut secrets = server.secrets();
    secrets.insert("secretAccessKey".into(), wrong.into());
    for own in [false, true] {
        let kv: Vec<(&str, &str)> = if own { vec![] } else { vec![("bucket", server.bucket.as_str())] };
        let e = ctl.create_volume(new_volume("pvc-auth-bad", &kv, 0, None), &secrets).await.expect_err("wrong secret");
        let msg = e.to_string();
        assert_eq!(e.code(), Code::FailedPrecondition, "{msg}");
        let bucket = if own { "fv-pvc-auth-bad" } else { server.bucket.as_str() };
        let call =
            ["HeadBucket", "GetObject", "CreateBucket"].iter().any(|c| msg.contains(&format!("S3 refused {c} on")));
        // What S3 said: moto and AWS say SignatureDoesNotMatch, garage AccessDenied "Invalid signature".
        let said = msg.contains("SignatureDoesNotMatch") || msg.contains("Invalid signature");
        assert!(call && msg.contains(bucket) && said, "{msg}");
        assert!(msg.contains("credentials"), "{msg}");
        assert!(!msg.contains(wrong), "the secret leaked: {msg}");
        assert!(!msg.contains(&server.endpoint.secret_access_key), "the real secret leaked: {msg}");
    }
    let e = ctl.delete_volume(&ok.id, &secrets).await.expect_err("delete with the wrong secret");
    assert!(e.to_string().contains("GetObject") && !e.to_string().contains(wrong), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_every_object_in_batches_and_the_own_bucket() {
    let server = S3Server::start();
    let (ctl, c, secrets) = (controller(), client(&server), server.secrets());
    let v = ctl.create_volume(new_volume("pvc-many", &[], 0, None), &secrets).await.expect("create");
    let data = layout::volume_data_prefix(v.id.local());
    put_many(&c, &v.bucket, &data, 2500).await;
    assert_eq!(keys(&c, &v.bucket, &data).await.len(), 2500);
    ctl.delete_volume(&v.id, &secrets).await.expect("delete");
    assert!(!bucket_exists(&c, &v.bucket).await, "bucket removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_resumes_after_a_crash_mid_way() {
    let server = S3Server::start();
    let (ctl, c, secrets) = (controller(), client(&server), server.secrets());
    let shared = server.bucket.clone();
    let v =
        ctl.create_volume(new_volume("pvc-crash", &[("bucket", &shared)], 0, None), &secrets).await.expect("create");
    let record_key = layout::volume_record_key(v.id.local());
    // As a delete killed mid-way leaves it: record `deleting`, some objects still there.
    let rec: S3VolumeRecord = serde_json::from_slice(&get(&c, &shared, &record_key).await).expect("record");
    let deleting = S3VolumeRecord { state: VolumeState::Deleting, ..rec };
    put(&c, &shared, &record_key, serde_json::to_vec(&deleting).expect("json")).await;
    put_many(&c, &shared, &layout::volume_data_prefix(v.id.local()), 30).await;
    put(&c, &shared, &format!("{}published/node-a", layout::volume_prefix(v.id.local())), vec![]).await;

    // The volume shows as abnormal until the delete is repeated.
    let st = ctl.get_volume(&v.id).await.expect("get");
    assert!(st.condition.abnormal, "{:?}", st.condition);
    // A create of the same name waits for the delete instead of reviving half a volume.
    let e = ctl
        .create_volume(new_volume("pvc-crash", &[("bucket", &shared)], 0, None), &secrets)
        .await
        .expect_err("mid-delete");
    assert_eq!(e.code(), Code::Aborted, "{e}");
    ctl.delete_volume(&v.id, &secrets).await.expect("the repeat resumes");
    assert!(keys(&c, &shared, &layout::volume_prefix(v.id.local())).await.is_empty());
    assert_eq!(ctl.get_volume(&v.id).await.expect_err("gone").code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expand_raises_the_quota_and_never_shrinks() {
    let server = S3Server::start();
    let (ctl, c, secrets) = (controller(), client(&server), server.secrets());
    let v = ctl
        .create_volume(new_volume("pvc-grow", &[("bucket", &server.bucket)], 64 * MIB, None), &secrets)
        .await
        .expect("create");
    let grow = |req: u64, lim: u64| CapacityRange { required: Some(req), limit: (lim > 0).then_some(lim) };
    assert_eq!(ctl.expand_volume(&v.id, grow(100 * MIB + 1, 0), &secrets).await.expect("grow"), 101 * MIB);
    let rec: S3VolumeRecord =
        serde_json::from_slice(&get(&c, &server.bucket, &layout::volume_record_key(v.id.local())).await)
            .expect("record");
    assert_eq!(rec.capacity_bytes, 101 * MIB, "the mounter reads the quota from the record");
    assert_eq!(ctl.expand_volume(&v.id, grow(10 * MIB, 0), &secrets).await.expect("smaller"), 101 * MIB);
    assert_eq!(
        ctl.expand_volume(&v.id, grow(10 * MIB, 50 * MIB), &secrets).await.expect_err("limit").code(),
        Code::OutOfRange
    );
    let unknown = ferrovol_core::ids::VolumeId::parse(&format!("s3.vol:{}:nope", server.bucket)).expect("id");
    assert_eq!(ctl.expand_volume(&unknown, grow(MIB, 0), &secrets).await.expect_err("unknown").code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restore_and_clone_copy_every_object() {
    let server = S3Server::start();
    // Small multipart threshold so that one object takes the multipart copy path.
    let tuning = Tuning { multipart_copy_above: 6 * MIB, copy_part_bytes: 5 * MIB, ..Tuning::default() };
    let ctl = S3Controller::with_tuning(Timeouts::within(Duration::from_secs(10)), tuning);
    let (c, secrets) = (client(&server), server.secrets());
    let src = ctl.create_volume(new_volume("pvc-src", &[], 64 * MIB, None), &secrets).await.expect("source");
    let data = layout::volume_data_prefix(src.id.local());
    let big: Vec<u8> = (0..(12 * MIB as usize)).map(|i| (i % 251) as u8).collect();
    let mut files: Vec<(String, Vec<u8>)> =
        (0..40).map(|i| (format!("dir {i}/file+{i}.txt"), format!("file {i} ").repeat(i + 1).into_bytes())).collect();
    files.push(("big.bin".into(), big.clone()));
    files.push(("empty".into(), Vec::new()));
    for (k, body) in &files {
        put(&c, &src.bucket, &format!("{data}{k}"), body.clone()).await;
    }
    let total: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();

    let snap =
        ctl.create_snapshot("snap-1", LocalName::from_co_name("snap-1"), &src.id, &secrets).await.expect("snapshot");
    assert_eq!(snap.id.to_string(), "s3.snap:fv-pvc-src:snap-1");
    assert!(snap.record.ready);
    assert_eq!(snap.record.size_bytes, total);
    let again =
        ctl.create_snapshot("snap-1", LocalName::from_co_name("snap-1"), &src.id, &secrets).await.expect("repeat");
    assert_eq!(again.record, snap.record, "the same snapshot, same creation time");
    // Same name, another source in the same bucket.
    let shared = server.bucket.clone();
    let a = ctl.create_volume(new_volume("pvc-a", &[("bucket", &shared)], 0, None), &secrets).await.expect("a");
    let b = ctl.create_volume(new_volume("pvc-b", &[("bucket", &shared)], 0, None), &secrets).await.expect("b");
    ctl.create_snapshot("snap-ab", LocalName::from_co_name("snap-ab"), &a.id, &secrets).await.expect("snap a");
    let e = ctl.create_snapshot("snap-ab", LocalName::from_co_name("snap-ab"), &b.id, &secrets).await.expect_err("b");
    assert_eq!(e.code(), Code::AlreadyExists, "{e}");

    // Restore into a larger volume: every object byte-equal under the new volume's prefix.
    let too_small = NewVolume {
        capacity: CapacityRange { required: Some(MIB), limit: Some(2 * MIB) },
        ..new_volume("pvc-small", &[], 0, Some(Source::Snapshot(snap.id.clone())))
    };
    let e = ctl.create_volume(too_small, &secrets).await.expect_err("smaller than the snapshot");
    assert_eq!(e.code(), Code::OutOfRange, "{e}");
    assert!(e.to_string().contains("pvc-small"), "{e}");
    assert!(!bucket_exists(&c, "fv-pvc-small").await, "nothing left behind");
    let restored = ctl
        .create_volume(new_volume("pvc-restored", &[], 128 * MIB, Some(Source::Snapshot(snap.id.clone()))), &secrets)
        .await
        .expect("restore");
    assert_eq!(restored.record.state, VolumeState::Ready);
    assert_eq!(restored.record.capacity_bytes, 128 * MIB);
    let rdata = layout::volume_data_prefix(restored.id.local());
    for (k, body) in &files {
        assert_eq!(&get(&c, &restored.bucket, &format!("{rdata}{k}")).await, body, "{k}");
    }
    assert_eq!(keys(&c, &restored.bucket, &rdata).await.len(), files.len());
    let rep = ctl
        .create_volume(new_volume("pvc-restored", &[], 128 * MIB, Some(Source::Snapshot(snap.id.clone()))), &secrets)
        .await
        .expect("repeat restore");
    assert_eq!(rep.record, restored.record);

    // A clone of a shared-bucket volume into its own bucket.
    put(&c, &shared, &format!("{}x/y", layout::volume_data_prefix(a.id.local())), b"clone me".to_vec()).await;
    let clone = ctl
        .create_volume(new_volume("pvc-clone", &[], 0, Some(Source::Volume(a.id.clone()))), &secrets)
        .await
        .expect("clone");
    assert_eq!(
        get(&c, &clone.bucket, &format!("{}x/y", layout::volume_data_prefix(clone.id.local()))).await,
        b"clone me"
    );
    assert_eq!(clone.record.source.as_deref(), Some(a.id.to_string().as_str()));

    // A restore interrupted mid-copy (record `creating`, part of the objects) is finished
    // by the repeat.
    let interrupted = restored.record.clone();
    let key = layout::volume_record_key(restored.id.local());
    put(
        &c,
        &restored.bucket,
        &key,
        serde_json::to_vec(&S3VolumeRecord { state: VolumeState::Creating, ..interrupted }).expect("json"),
    )
    .await;
    c.delete_object().bucket(&restored.bucket).key(format!("{rdata}big.bin")).send().await.expect("drop one");
    put(&c, &restored.bucket, &format!("{rdata}stray"), b"not in the snapshot".to_vec()).await;
    let resumed = ctl
        .create_volume(new_volume("pvc-restored", &[], 128 * MIB, Some(Source::Snapshot(snap.id.clone()))), &secrets)
        .await
        .expect("resume");
    assert_eq!(resumed.record.state, VolumeState::Ready);
    assert_eq!(get(&c, &restored.bucket, &format!("{rdata}big.bin")).await, big);
    assert_eq!(keys(&c, &restored.bucket, &rdata).await.len(), files.len(), "the stray object is gone");

    // A copy that fails after it began (here: the snapshot's record under-states its
    // size, so the copied bytes overflow the quota) leaves nothing behind.
    let liar =
        ctl.create_snapshot("snap-liar", LocalName::from_co_name("snap-liar"), &src.id, &secrets).await.expect("liar");
    let liar_key = layout::snapshot_record_key(liar.id.local());
    let understated = ferrovol_s3::record::S3SnapshotRecord { size_bytes: 1, ..liar.record.clone() };
    put(&c, &src.bucket, &liar_key, serde_json::to_vec(&understated).expect("json")).await;
    let small = NewVolume {
        capacity: CapacityRange { required: Some(MIB), limit: Some(MIB) },
        ..new_volume("pvc-liar", &[], 0, Some(Source::Snapshot(liar.id.clone())))
    };
    let e = ctl.create_volume(small, &secrets).await.expect_err("overflows its quota");
    assert_eq!(e.code(), Code::OutOfRange, "{e}");
    assert!(!bucket_exists(&c, "fv-pvc-liar").await, "the half-made volume and its bucket are removed");
    ctl.delete_snapshot(&liar.id, &secrets).await.expect("delete liar");

    // The snapshot outlives its source volume, keeps the source's own bucket, and the
    // bucket goes with the snapshot's deletion.
    ctl.delete_volume(&src.id, &secrets).await.expect("delete the source");
    assert!(bucket_exists(&c, &src.bucket).await, "the snapshot keeps the bucket");
    let got = ctl.get_snapshot(&snap.id, &server.endpoint).await.expect("still there");
    assert_eq!(got.record.size_bytes, total);
    let listed = ctl.list_snapshots(None).await;
    assert!(listed.iter().any(|s| s.id == snap.id), "{listed:?}");
    let again = ctl
        .create_volume(new_volume("pvc-restored-2", &[], 0, Some(Source::Snapshot(snap.id.clone()))), &secrets)
        .await
        .expect("restore after the source is gone");
    assert_eq!(get(&c, &again.bucket, &format!("{}big.bin", layout::volume_data_prefix(again.id.local()))).await, big);
    ctl.delete_snapshot(&snap.id, &secrets).await.expect("delete the snapshot");
    assert!(!bucket_exists(&c, &src.bucket).await, "the last object took the bucket");
    ctl.delete_snapshot(&snap.id, &secrets).await.expect("again OK");
    assert_eq!(ctl.get_snapshot(&snap.id, &server.endpoint).await.expect_err("gone").code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publications_are_marker_objects_and_block_deletion() {
    let server = S3Server::start();
    let (ctl, c, secrets) = (controller(), client(&server), server.secrets());
    let v = ctl
        .create_volume(new_volume("pvc-pub", &[("bucket", &server.bucket)], 0, None), &secrets)
        .await
        .expect("create");
    for n in ["node-b", "node-a"] {
        ctl.publish_volume(&v.id, &NodeId::parse(n).expect("node"), false, &secrets).await.expect("publish");
    }
    ctl.publish_volume(&v.id, &NodeId::parse("node-a").expect("node"), false, &secrets).await.expect("repeat");
    let prefix = format!("{}published/", layout::volume_prefix(v.id.local()));
    let mut markers = keys(&c, &server.bucket, &prefix).await;
    markers.sort();
    assert_eq!(markers, vec![format!("{prefix}node-a"), format!("{prefix}node-b")]);
    // The marker says whether the publication is read-only; the same node with the other
    // setting is ALREADY_EXISTS, and the marker is left as it was.
    let marker: ferrovol_s3::record::PublishMarker =
        serde_json::from_slice(&get(&c, &server.bucket, &format!("{prefix}node-a")).await).expect("marker body");
    assert!(!marker.readonly);
    let e = ctl
        .publish_volume(&v.id, &NodeId::parse("node-a").expect("node"), true, &secrets)
        .await
        .expect_err("other readonly");
    assert_eq!(e.code(), Code::AlreadyExists, "{e}");
    assert!(e.to_string().contains("node-a") && e.to_string().contains("readonly"), "{e}");
    // A marker written before markers had a body (empty) is compatible, and gets one.
    put(&c, &server.bucket, &format!("{prefix}node-old"), Vec::new()).await;
    ctl.publish_volume(&v.id, &NodeId::parse("node-old").expect("node"), true, &secrets).await.expect("old marker");
    let marker: ferrovol_s3::record::PublishMarker =
        serde_json::from_slice(&get(&c, &server.bucket, &format!("{prefix}node-old")).await).expect("marker body");
    assert!(marker.readonly);
    ctl.unpublish_volume(&v.id, Some(&NodeId::parse("node-old").expect("node")), &secrets).await.expect("unpublish");
    let st = ctl.get_volume(&v.id).await.expect("get");
    assert_eq!(st.published, vec!["node-a", "node-b"]);
    assert!(!st.condition.abnormal);
    let listed = ctl.list_volumes().await;
    let mine = listed.iter().find(|s| s.id == v.id).expect("listed");
    assert_eq!(mine.published, vec!["node-a", "node-b"]);

    let e = ctl.delete_volume(&v.id, &secrets).await.expect_err("published");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.to_string().contains("node-a"), "{e}");
    ctl.unpublish_volume(&v.id, Some(&NodeId::parse("node-b").expect("node")), &secrets).await.expect("unpublish");
    ctl.unpublish_volume(&v.id, Some(&NodeId::parse("node-b").expect("node")), &secrets).await.expect("repeat");
    ctl.unpublish_volume(&v.id, None, &secrets).await.expect("all");
    assert!(keys(&c, &server.bucket, &prefix).await.is_empty());
    let unknown = ferrovol_core::ids::VolumeId::parse(&format!("s3.vol:{}:nope", server.bucket)).expect("id");
    let node = NodeId::parse("node-a").expect("node");
    assert_eq!(ctl.publish_volume(&unknown, &node, false, &secrets).await.expect_err("unknown").code(), Code::NotFound);
    ctl.unpublish_volume(&unknown, Some(&node), &secrets).await.expect("unknown is OK");
    ctl.delete_volume(&v.id, &secrets).await.expect("delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_volume_condition_without_credentials_healthy_and_paused() {
    let server = S3Server::start();
    let secrets = server.secrets();
    let creator = controller();
    let v = creator.create_volume(new_volume("pvc-cond", &[], 0, None), &secrets).await.expect("create");

    // A controller that has seen no secrets for the bucket cannot check, and says so.
    let fresh = S3Controller::new(Timeouts::within(Duration::from_secs(2)));
    let st = fresh.get_volume(&v.id).await.expect("unchecked");
    assert!(!st.condition.abnormal);
    assert!(
        st.condition.message.contains("not checked") && st.condition.message.contains("fv-pvc-cond"),
        "{:?}",
        st.condition
    );
    assert!(st.record.is_none());
    assert!(fresh.list_volumes().await.is_empty(), "no credentials known, nothing listed");

    // Once it has seen the secrets (any call for the bucket), it checks; ListVolumes finds
    // own buckets through ListBuckets with the known credentials.
    fresh.remember("some-other-bucket", &server.endpoint);
    let listed = fresh.list_volumes().await;
    assert!(listed.iter().any(|s| s.id == v.id), "own bucket found by ListBuckets: {listed:?}");
    let st = fresh.get_volume(&v.id).await.expect("checked");
    assert!(!st.condition.abnormal, "{:?}", st.condition);
    assert_eq!(st.record.map(|r| r.capacity_bytes), Some(GIB));

    // A paused server: abnormal (or UNAVAILABLE) within the bound, never a hang.
    server.pause();
    let t = Instant::now();
    let r = fresh.get_volume(&v.id).await;
    let took = t.elapsed();
    server.resume();
    match r {
        Ok(st) => {
            assert!(st.condition.abnormal, "{:?}", st.condition);
            assert!(
                st.condition.message.contains("HeadBucket") && st.condition.message.contains("fv-pvc-cond"),
                "{:?}",
                st.condition
            );
        }
        Err(e) => assert_eq!(e.code(), Code::Unavailable, "{e}"),
    }
    assert!(took < Duration::from_secs(5), "took {took:?} with a 2 s bound");

    // A listing leaves an unreachable endpoint's buckets out after one bounded call.
    server.pause();
    let t = Instant::now();
    let listed = fresh.list_volumes().await;
    let took = t.elapsed();
    server.resume();
    assert!(listed.is_empty(), "{listed:?}");
    assert!(took < Duration::from_secs(5), "listing took {took:?}");

    // Calls that change things answer UNAVAILABLE naming the call and bucket.
    server.pause();
    let t = Instant::now();
    let e = fresh
        .expand_volume(&v.id, CapacityRange { required: Some(2 * GIB), limit: None }, &secrets)
        .await
        .expect_err("paused");
    let took = t.elapsed();
    server.resume();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(e.to_string().contains("fv-pvc-cond"), "{e}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

/// A copy plan with small parts, so that a few MiB take the multipart path.
fn small_plan(source_retries: u32) -> CopyPlan {
    CopyPlan {
        multipart_above: 6 * MIB,
        part_bytes: 5 * MIB,
        parts_in_flight: 2,
        timeouts: Timeouts::within(Duration::from_secs(10)).for_copies(Duration::from_secs(20)),
        source_retries,
    }
}

async fn listed(store: &Store, key: &str) -> Listed {
    store.list(key).await.expect("list").into_iter().find(|o| o.key == key).expect("listed")
}

async fn uploads(c: &aws_sdk_s3::Client, bucket: &str) -> Vec<String> {
    let out = c.list_multipart_uploads().bucket(bucket).send().await.expect("ListMultipartUploads");
    out.uploads().iter().filter_map(|u| u.key().map(str::to_owned)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_copies_are_confirmed_by_etag_tied_to_one_version_and_aborted_on_failure() {
    let server = S3Server::start();
    let (ctl, c) = (controller(), client(&server));
    let store = ctl.store(&server.endpoint, &server.bucket);
    let big: Vec<u8> = (0..(12 * MIB as usize)).map(|i| (i % 241) as u8).collect();
    put(&c, &server.bucket, "src/big", big.clone()).await;
    let src = listed(&store, "src/big").await;
    // An older object of the same size at the destination: the copy must replace it, and
    // a completion whose answer cannot be read (moto) is accepted only for the new object.
    put(&c, &server.bucket, "dst/big", vec![7u8; big.len()]).await;

    let n = store.copy(&server.bucket, &src, "dst/big", &small_plan(0)).await.expect("multipart copy");
    assert_eq!(n, big.len() as u64);
    assert_eq!(get(&c, &server.bucket, "dst/big").await, big);
    // The server's ETag of the completed object is the MD5 of the parts' MD5s, `-3`: what
    // the controller compares a HeadObject with when a completion's answer is unreadable.
    let parts: Vec<String> = big.chunks(5 * MIB as usize).map(ferrovol_s3::md5::hex_digest).collect();
    let expected = store::multipart_etag(&parts).expect("etag");
    assert!(expected.ends_with("-3"), "{expected}");
    let head = store.head("dst/big").await.expect("head").expect("exists");
    assert!(store::same_etag(&head.etag, &expected), "{} on {}: expected {expected}", head.etag, server.server.name());
    // The copy records the source version it was made from; a repeat recognises it.
    assert_eq!(head.source_etag.as_deref(), Some(store::unquote(&src.etag)));
    assert!(store.is_copy_of(&listed(&store, "dst/big").await, &src).await.expect("is copy"));

    // A multipart copy that fails (here: its source does not exist) is aborted.
    let missing = Listed { key: "src/missing".into(), ..src.clone() };
    let e = store.copy(&server.bucket, &missing, "dst/missing", &small_plan(3)).await.expect_err("no source");
    assert!(e.message.contains("src/missing"), "{}", e.message);
    assert!(uploads(&c, &server.bucket).await.is_empty(), "the failed multipart copy was aborted");
    assert!(store.head("dst/missing").await.expect("head").is_none(), "nothing made");

    // A source that changed since it was listed (here: a listing's ETag that is not the
    // object's) fails each copy call with 412 Precondition Failed: with no retry left the
    // copy fails naming the source (the multipart upload aborted); with retries the source
    // is read again and copied whole from the start. moto (5.2) ignores
    // x-amz-copy-source-if-match, so there the stale ETag is simply not checked.
    put(&c, &server.bucket, "src/small", b"small object".to_vec()).await;
    let small = listed(&store, "src/small").await;
    let zero = format!("\"{}\"", "0".repeat(32));
    for (src, dst, bytes) in [(&src, "dst/stale", &big[..]), (&small, "dst/small", &b"small object"[..])] {
        let stale = Listed { etag: zero.clone(), ..src.clone() };
        if server.server == Server::Moto {
            store.copy(&server.bucket, &stale, dst, &small_plan(0)).await.expect("moto does not check the condition");
        } else {
            let e = store.copy(&server.bucket, &stale, dst, &small_plan(0)).await.expect_err("stale version");
            assert!(e.message.contains(&src.key) && e.message.contains("changed"), "{}", e.message);
            assert!(uploads(&c, &server.bucket).await.is_empty(), "the failed multipart copy was aborted");
            assert!(store.head(dst).await.expect("head").is_none(), "nothing made");
            let n = store.copy(&server.bucket, &stale, dst, &small_plan(2)).await.expect("retried copy");
            assert_eq!(n, bytes.len() as u64);
        }
        assert_eq!(get(&c, &server.bucket, dst).await, bytes);
        let head = store.head(dst).await.expect("head").expect("exists");
        // What the copy names as its source: the version copied (on moto, the one asked for).
        let named = if server.server == Server::Moto { &zero } else { &src.etag };
        assert_eq!(head.source_etag.as_deref(), Some(store::unquote(named)));
    }
    assert!(uploads(&c, &server.bucket).await.is_empty());
    // A source deleted since it was listed fails naming it.
    c.delete_object().bucket(&server.bucket).key("src/small").send().await.expect("delete");
    let e = store.copy(&server.bucket, &small, "dst/gone", &small_plan(3)).await.expect_err("deleted source");
    assert!(e.message.contains("src/small"), "{}", e.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_calls_have_their_own_bound_longer_than_the_call_bound() {
    let server = S3Server::start();
    // Every other call fails within 1 s; copies may take 8 s per attempt.
    let tuning = Tuning { copy_attempt_min: Duration::from_secs(8), ..Tuning::default() };
    let ctl = S3Controller::with_tuning(Timeouts::within(Duration::from_secs(1)), tuning);
    let c = client(&server);
    let store = ctl.store(&server.endpoint, &server.bucket);
    put(&c, &server.bucket, "slow/src", vec![1u8; MIB as usize]).await;
    let src = listed(&store, "slow/src").await;
    let plan = CopyPlan {
        timeouts: Timeouts::within(Duration::from_secs(1)).for_copies(Duration::from_secs(8)),
        ..small_plan(0)
    };
    assert_eq!(plan.timeouts.connect, Timeouts::within(Duration::from_secs(1)).connect, "connect stays short");

    // A server that takes 2.5 s to answer fails an ordinary call...
    server.pause();
    let t = Instant::now();
    let e = store.head("slow/src").await.expect_err("paused");
    assert_eq!(e.kind, ferrovol_s3::error::Kind::Unreachable, "{}", e.message);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    server.resume();
    // ...but not a copy.
    let (s2, sb, src2) = (store.clone(), server.bucket.clone(), src.clone());
    let copy = tokio::spawn(async move { s2.copy(&sb, &src2, "slow/dst", &plan).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.pause();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    server.resume();
    let n = copy.await.expect("task").expect("the copy outlasts the ordinary bound");
    assert_eq!(n, MIB);
    assert_eq!(get(&c, &server.bucket, "slow/dst").await, vec![1u8; MIB as usize]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeats_recognise_earlier_copies_by_the_recorded_source_etag() {
    let server = S3Server::start();
    let (ctl, c, secrets) = (controller(), client(&server), server.secrets());
    let src = ctl.create_volume(new_volume("pvc-rsrc", &[], 0, None), &secrets).await.expect("source");
    let data = layout::volume_data_prefix(src.id.local());
    for k in ["a", "b", "c"] {
        put(&c, &src.bucket, &format!("{data}{k}"), format!("content of {k}").into_bytes()).await;
    }
    let snap = ctl.create_snapshot("snap-r", LocalName::from_co_name("snap-r"), &src.id, &secrets).await.expect("snap");
    let restored = ctl
        .create_volume(new_volume("pvc-rdst", &[], 0, Some(Source::Snapshot(snap.id.clone()))), &secrets)
        .await
        .expect("restore");
    let rdata = layout::volume_data_prefix(restored.id.local());
    let sdata = layout::snapshot_data_prefix(snap.id.local());
    let sstore = ctl.store(&server.endpoint, &src.bucket);
    let snap_a = listed(&sstore, &format!("{sdata}a")).await;

    // As a server whose copies get other ETags (AWS's multipart copies) leaves them: the
    // same size, another ETag. `a` carries the source ETag the copy recorded, `b` none.
    let record_key = layout::volume_record_key(restored.id.local());
    let rec: S3VolumeRecord = serde_json::from_slice(&get(&c, &restored.bucket, &record_key).await).expect("rec");
    put(
        &c,
        &restored.bucket,
        &record_key,
        serde_json::to_vec(&S3VolumeRecord { state: VolumeState::Creating, ..rec }).expect("json"),
    )
    .await;
    c.put_object()
        .bucket(&restored.bucket)
        .key(format!("{rdata}a"))
        .metadata(store::SOURCE_ETAG_META, store::unquote(&snap_a.etag))
        .body(b"CONTENT OF A".to_vec().into())
        .send()
        .await
        .expect("put a");
    put(&c, &restored.bucket, &format!("{rdata}b"), b"CONTENT OF B".to_vec()).await;
    let again = ctl
        .create_volume(new_volume("pvc-rdst", &[], 0, Some(Source::Snapshot(snap.id.clone()))), &secrets)
        .await
        .expect("repeat");
    assert_eq!(again.record.state, VolumeState::Ready);
    assert_eq!(get(&c, &restored.bucket, &format!("{rdata}a")).await, b"CONTENT OF A", "recognised: not copied again");
    assert_eq!(get(&c, &restored.bucket, &format!("{rdata}b")).await, b"content of b", "not recognised: copied");
    assert_eq!(get(&c, &restored.bucket, &format!("{rdata}c")).await, b"content of c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_are_remembered_only_after_a_call_with_them_succeeded() {
    let home = S3Server::start();
    let other = S3Server::start();
    let ctl = controller();
    let v = ctl.create_volume(new_volume("pvc-home", &[], 0, None), &home.secrets()).await.expect("create");
    assert_eq!(ctl.known_endpoint(&v.bucket), Some(home.endpoint.clone()));
    let snap = ctl
        .create_snapshot("snap-home", LocalName::from_co_name("snap-home"), &v.id, &home.secrets())
        .await
        .expect("snap");

    // A restore of that snapshot with another endpoint's secrets fails there (the bucket is
    // not on it), and does not make the controller look for the bucket there afterwards.
    let e = ctl
        .create_volume(new_volume("pvc-away", &[], 0, Some(Source::Snapshot(snap.id.clone()))), &other.secrets())
        .await
        .expect_err("not on that endpoint");
    assert_eq!(e.code(), Code::NotFound, "{e}");
    assert_eq!(ctl.known_endpoint(&v.bucket), Some(home.endpoint.clone()), "still the endpoint that worked");
    let st = ctl.get_volume(&v.id).await.expect("still found");
    assert!(!st.condition.abnormal && st.record.is_some(), "{:?}", st.condition);
    // A delete with secrets that cannot reach the bucket does not either.
    let mut wrong = other.secrets();
    wrong.insert("endpoint".into(), "http://127.0.0.1:9".into());
    ctl.delete_snapshot(&snap.id, &wrong).await.expect_err("unreachable");
    assert_eq!(ctl.known_endpoint(&v.bucket), Some(home.endpoint.clone()));

    // ListBuckets' fv-* buckets are ours only with our marker.
    let c = client(&home);
    c.create_bucket().bucket("fv-not-ours").send().await.expect("foreign bucket");
    put(&c, "fv-not-ours", "ferrovol/volumes/x/volume.json", b"{}".to_vec()).await;
    let fresh = controller();
    fresh.remember(&home.bucket, &home.endpoint);
    let listed = fresh.list_volumes().await;
    assert!(listed.iter().any(|s| s.id == v.id), "{listed:?}");
    assert_eq!(fresh.known_endpoint(&v.bucket), Some(home.endpoint.clone()), "marked bucket remembered");
    assert_eq!(fresh.known_endpoint("fv-not-ours"), None, "unmarked bucket not remembered");
    assert!(listed.iter().all(|s| s.bucket != "fv-not-ours"), "{listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_racing_a_delete_leaves_no_stray_marker() {
    let server = S3Server::start();
    let (ctl, c, secrets) = (controller(), client(&server), server.secrets());
    let kv = [("bucket", server.bucket.as_str())];
    let node = NodeId::parse("node-r").expect("node");
    let prefix = |v: &ferrovol_core::ids::VolumeId| layout::volume_prefix(v.local());
    let (mut deleted, mut refused) = (0, 0);
    for i in 0..16 {
        let v = ctl.create_volume(new_volume("pvc-race", &kv, 0, None), &secrets).await.expect("create");
        // Let the publish start a little before, at, or after the delete.
        let (c1, c2, id1, id2, s1, s2, n) =
            (ctl.clone(), ctl.clone(), v.id.clone(), v.id.clone(), secrets.clone(), secrets.clone(), node.clone());
        let lag = Duration::from_millis((i / 2 % 4) * 20);
        let (publish_lag, delete_lag) = if i % 2 == 0 { (lag, Duration::ZERO) } else { (Duration::ZERO, lag) };
        let publish = tokio::spawn(async move {
            tokio::time::sleep(publish_lag).await;
            c1.publish_volume(&id1, &n, false, &s1).await
        });
        let delete = tokio::spawn(async move {
            tokio::time::sleep(delete_lag).await;
            c2.delete_volume(&id2, &s2).await
        });
        let (p, d) = (publish.await.expect("task"), delete.await.expect("task"));
        let left = keys(&c, &server.bucket, &prefix(&v.id)).await;
        match d {
            Ok(()) => {
                deleted += 1;
                assert!(left.is_empty(), "delete succeeded (publish {p:?}) but left {left:?}");
                if let Err(e) = p {
                    assert!(
                        matches!(e.code(), Code::NotFound | Code::FailedPrecondition),
                        "publish after the delete began: {e}"
                    );
                }
            }
            Err(e) => {
                refused += 1;
                // Refused because the publish got there first (or a concurrent call).
                assert!(matches!(e.code(), Code::FailedPrecondition | Code::Aborted), "{e}");
                if e.code() == Code::FailedPrecondition {
                    p.expect("the publish that blocked the delete succeeded");
                }
                ctl.unpublish_volume(&v.id, None, &secrets).await.expect("unpublish");
                ctl.delete_volume(&v.id, &secrets).await.expect("delete after unpublish");
                assert!(keys(&c, &server.bucket, &prefix(&v.id)).await.is_empty());
            }
        }
    }
    eprintln!("{deleted} deletes won, {refused} were refused");
    // The name is reusable: a new volume of it is deleted without a stray marker in the way.
    let v = ctl.create_volume(new_volume("pvc-race", &kv, 0, None), &secrets).await.expect("create");
    ctl.delete_volume(&v.id, &secrets).await.expect("no stray marker blocks the delete");

    // A publish of a volume being deleted writes nothing.
    let v = ctl.create_volume(new_volume("pvc-race-2", &kv, 0, None), &secrets).await.expect("create");
    let record_key = layout::volume_record_key(v.id.local());
    let rec: S3VolumeRecord = serde_json::from_slice(&get(&c, &server.bucket, &record_key).await).expect("record");
    put(
        &c,
        &server.bucket,
        &record_key,
        serde_json::to_vec(&S3VolumeRecord { state: VolumeState::Deleting, ..rec }).expect("json"),
    )
    .await;
    ctl.publish_volume(&v.id, &node, false, &secrets).await.expect_err("being deleted");
    assert_eq!(keys(&c, &server.bucket, &prefix(&v.id)).await, vec![record_key]);
    ctl.delete_volume(&v.id, &secrets).await.expect("delete");
}

/// Starts a multipart upload of `key` with one part and leaves it unfinished, as a mounter
/// killed while writing a file does.
async fn abandoned_upload(c: &aws_sdk_s3::Client, bucket: &str, key: &str) {
    let id = c
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .expect("CreateMultipartUpload")
        .upload_id
        .expect("an upload ID");
    c.upload_part()
        .bucket(bucket)
        .key(key)
        .upload_id(id)
        .part_number(1)
        .body(vec![3u8; 5 * MIB as usize].into())
        .send()
        .await
        .expect("UploadPart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_aborts_the_unfinished_uploads_of_the_volume_and_no_others() {
    let server = S3Server::start();
    let (ctl, c, secrets) = (controller(), client(&server), server.secrets());
    let shared = server.bucket.clone();
    let kv = [("bucket", shared.as_str())];
    let gone = ctl.create_volume(new_volume("pvc-up-1", &kv, 0, None), &secrets).await.expect("create");
    let kept = ctl.create_volume(new_volume("pvc-up-10", &kv, 0, None), &secrets).await.expect("create");
    let gone_key = format!("{}half-written.bin", layout::volume_data_prefix(gone.id.local()));
    let kept_key = format!("{}being-written.bin", layout::volume_data_prefix(kept.id.local()));
    abandoned_upload(&c, &shared, &gone_key).await;
    abandoned_upload(&c, &shared, &kept_key).await;
    // An own-bucket volume's uploads go with its bucket.
    let own = ctl.create_volume(new_volume("pvc-up-own", &[], 0, None), &secrets).await.expect("create");
    abandoned_upload(&c, &own.bucket, &format!("{}f", layout::volume_data_prefix(own.id.local()))).await;

    ctl.delete_volume(&gone.id, &secrets).await.expect("delete");
    assert_eq!(uploads(&c, &shared).await, vec![kept_key.clone()], "only the deleted volume's upload is aborted");
    ctl.delete_volume(&own.id, &secrets).await.expect("delete the own-bucket volume");
    assert!(!bucket_exists(&c, &own.bucket).await, "its bucket is removed with its upload");
    ctl.delete_volume(&kept.id, &secrets).await.expect("delete");
    assert!(uploads(&c, &shared).await.is_empty());
}
