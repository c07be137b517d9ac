//! The filesystem core against a real S3 server (moto, or garage with
//! FERROVOL_TEST_S3=garage), without FUSE: listings of nested prefixes, multipart writes read
//! back through the prefetcher, the quota, rename, rmdir, read-only mounts, truncation, and
//! a paused server failing an operation with EIO within the bound.
#![cfg(feature = "s3-tests")]

use std::ffi::OsStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrovol_mounter::fs::{FsConfig, FsError, Kind, S3Fs, ROOT_INO};
use ferrovol_s3::testing::S3Server;
use ferrovol_s3::{build_client, Timeouts};

static N: AtomicU32 = AtomicU32::new(0);

fn prefix(test: &str) -> String {
    format!("ferrovol/volumes/{test}-{}-{}/fs/", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

fn client(s: &S3Server) -> aws_sdk_s3::Client {
    build_client(&s.endpoint, Timeouts::default())
}

fn config(s: &S3Server, prefix: &str, bound: Duration) -> FsConfig {
    let mut c = FsConfig::new("s3.vol:test:pvc-1", &s.bucket, prefix, bound);
    c.uid = 1000;
    c.gid = 2000;
    c.file_mode = 0o640;
    c.dir_mode = 0o750;
    c
}

async fn fs_with(s: &S3Server, cfg: FsConfig, quota: u64) -> Arc<S3Fs> {
    let fs = S3Fs::new(build_client(&s.endpoint, Timeouts::within(cfg.timeout)), cfg, quota);
    fs.scan_usage().await.expect("scan usage");
    fs
}

async fn put(s: &S3Server, key: &str, body: &[u8]) {
    client(s).put_object().bucket(&s.bucket).key(key).body(body.to_vec().into()).send().await.expect("put");
}

async fn ino_of(fs: &S3Fs, path: &str) -> Result<u64, FsError> {
    let mut ino = ROOT_INO;
    for c in path.split('/').filter(|c| !c.is_empty()) {
        ino = fs.lookup(ino, OsStr::new(c)).await?.ino;
    }
    Ok(ino)
}

async fn write_file(fs: &S3Fs, parent: u64, name: &str, data: &[u8], step: usize) -> Result<(), FsError> {
    let (_, fh) = fs.create(parent, OsStr::new(name), 0, 1).await?;
    let mut off = 0;
    for piece in data.chunks(step.max(1)) {
        if let Err(e) = fs.write(fh, off, piece).await {
            let _ = fs.release(fh).await;
            return Err(e);
        }
        off += piece.len() as u64;
    }
    fs.release(fh).await
}

async fn read_file(fs: &S3Fs, ino: u64, step: u32) -> Vec<u8> {
    let fh = fs.open(ino, libc::O_RDONLY, 1).await.expect("open for reading");
    let mut out = Vec::new();
    loop {
        let b = fs.read(fh, out.len() as u64, step).await.expect("read");
        if b.is_empty() {
            break;
        }
        out.extend_from_slice(&b);
    }
    fs.release(fh).await.expect("release");
    out
}

fn names(entries: &[ferrovol_mounter::fs::DirEntry]) -> Vec<(String, Kind)> {
    entries.iter().map(|e| (e.name.clone(), e.kind)).collect()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 31 + i / 4096) % 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nested_prefixes_list_and_look_up_as_directories() {
    let s = S3Server::start();
    let p = prefix("nested");
    for (k, v) in
        [("a/b/c.txt", &b"hello"[..]), ("a/d.txt", b"0123456789"), ("top.txt", b"t"), ("m/", b""), ("x//y", b"z")]
    {
        put(&s, &format!("{p}{k}"), v).await;
    }
    let fs = fs_with(&s, config(&s, &p, Duration::from_secs(10)), 1 << 30).await;
    let root = fs.readdir(ROOT_INO).await.expect("readdir /");
    assert_eq!(
        names(&root),
        vec![("a".into(), Kind::Dir), ("m".into(), Kind::Dir), ("top.txt".into(), Kind::File), ("x".into(), Kind::Dir)]
    );
    let a = fs.lookup(ROOT_INO, OsStr::new("a")).await.expect("lookup a");
    assert_eq!((a.kind, a.perm, a.uid, a.gid), (Kind::Dir, 0o750, 1000, 2000));
    assert_eq!(
        names(&fs.readdir(a.ino).await.expect("readdir a")),
        vec![("b".into(), Kind::Dir), ("d.txt".into(), Kind::File)]
    );
    let c = fs.getattr(ino_of(&fs, "a/b/c.txt").await.expect("a/b/c.txt")).await.expect("getattr");
    assert_eq!((c.kind, c.size, c.perm), (Kind::File, 5, 0o640));
    assert_eq!(read_file(&fs, c.ino, 4096).await, b"hello");
    assert!(fs.readdir(ino_of(&fs, "m").await.expect("m")).await.expect("readdir m").is_empty(), "an empty marker dir");
    assert!(
        fs.readdir(ino_of(&fs, "x").await.expect("x")).await.expect("readdir x").is_empty(),
        "x//y has no name to show"
    );
    assert_eq!(fs.lookup(a.ino, OsStr::new("nope")).await.expect_err("missing").errno, libc::ENOENT);
    assert_eq!(fs.usage().used_bytes, 5 + 10 + 1 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_multipart_file_reads_back_byte_exact_with_prefetch() {
    let s = S3Server::start();
    let p = prefix("multipart");
    let fs = fs_with(&s, config(&s, &p, Duration::from_secs(30)), 1 << 30).await;
    let data = pattern(20 * 1024 * 1024 + 12345); // three 8 MiB parts, the last short
    let t = Instant::now();
    write_file(&fs, ROOT_INO, "big.bin", &data, 1 << 20).await.expect("write big.bin");
    let wrote = t.elapsed();
    let head = client(&s).head_object().bucket(&s.bucket).key(format!("{p}big.bin")).send().await.expect("head");
    assert_eq!(head.content_length(), Some(data.len() as i64));
    assert!(head.e_tag().unwrap_or_default().contains('-'), "a multipart ETag: {:?}", head.e_tag());
    assert_eq!(fs.usage().used_bytes, data.len() as u64);

    let ino = ino_of(&fs, "big.bin").await.expect("lookup");
    let t = Instant::now();
    let back = read_file(&fs, ino, 128 * 1024).await;
    let read = t.elapsed();
    assert!(back == data, "the file read back differs (len {} vs {})", back.len(), data.len());
    eprintln!("20 MiB on {}: written in {wrote:?}, read back in {read:?}", s.server.name());

    // A random read is served by a ranged GET of exactly what it asks.
    let fh = fs.open(ino, libc::O_RDONLY, 1).await.expect("open");
    let off = 13 * 1024 * 1024 + 7;
    let b = fs.read(fh, off as u64, 4096).await.expect("random read");
    assert_eq!(&b[..], &data[off..off + 4096]);
    let tail = fs.read(fh, (data.len() - 10) as u64, 4096).await.expect("read at the end");
    assert_eq!(&tail[..], &data[data.len() - 10..]);
    fs.release(fh).await.expect("release");

    // Writes must be sequential.
    let (_, fh) = fs.create(ROOT_INO, OsStr::new("seq.bin"), 0, 1).await.expect("create");
    fs.write(fh, 0, b"abc").await.expect("first write");
    assert_eq!(fs.write(fh, 10, b"def").await.expect_err("a gap").errno, libc::EINVAL);
    let _ = fs.release(fh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_past_the_quota_fail_with_enospc_and_leave_nothing_behind() {
    let s = S3Server::start();
    let p = prefix("quota");
    let quota = 12 * 1024 * 1024;
    let fs = fs_with(&s, config(&s, &p, Duration::from_secs(30)), quota).await;
    write_file(&fs, ROOT_INO, "small", &pattern(1024 * 1024), 65536).await.expect("1 MiB fits");
    // 16 MiB: the first part is uploaded, then the quota stops it.
    let e = write_file(&fs, ROOT_INO, "big", &pattern(16 * 1024 * 1024), 1 << 20).await.expect_err("over the quota");
    assert_eq!(e.errno, libc::ENOSPC, "{e}");
    assert!(e.message.contains("quota"), "{e}");
    assert_eq!(fs.lookup(ROOT_INO, OsStr::new("big")).await.expect_err("nothing committed").errno, libc::ENOENT);
    let uploads = client(&s).list_multipart_uploads().bucket(&s.bucket).prefix(&p).send().await.expect("list uploads");
    assert!(uploads.uploads().is_empty(), "the partial upload was aborted: {:?}", uploads.uploads());
    let u = fs.usage();
    assert_eq!((u.used_bytes, u.quota_bytes), (1024 * 1024, quota));
    let st = fs.statfs();
    assert_eq!(st.blocks * st.bsize as u64, quota);
    assert_eq!(st.bfree * st.bsize as u64, quota - 1024 * 1024);
    // A larger quota lets it through.
    fs.set_quota(64 * 1024 * 1024);
    write_file(&fs, ROOT_INO, "big", &pattern(16 * 1024 * 1024), 1 << 20).await.expect("fits now");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rename_moves_files_and_refuses_directories() {
    let s = S3Server::start();
    let p = prefix("rename");
    let fs = fs_with(&s, config(&s, &p, Duration::from_secs(10)), 1 << 30).await;
    let d = fs.mkdir(ROOT_INO, OsStr::new("d")).await.expect("mkdir d");
    write_file(&fs, ROOT_INO, "f", b"content of f", 4).await.expect("write f");
    write_file(&fs, d.ino, "g", b"old g", 4).await.expect("write d/g");
    let used = fs.usage().used_bytes;
    fs.rename(ROOT_INO, OsStr::new("f"), d.ino, OsStr::new("g"), false).await.expect("rename f over d/g");
    assert_eq!(fs.lookup(ROOT_INO, OsStr::new("f")).await.expect_err("f is gone").errno, libc::ENOENT);
    let g = ino_of(&fs, "d/g").await.expect("d/g");
    assert_eq!(read_file(&fs, g, 4096).await, b"content of f");
    assert_eq!(fs.usage().used_bytes, used - 5, "the replaced d/g no longer counts");
    assert_eq!(
        fs.rename(ROOT_INO, OsStr::new("d"), ROOT_INO, OsStr::new("e"), false).await.expect_err("a directory").errno,
        libc::EXDEV
    );
    write_file(&fs, ROOT_INO, "h", b"h", 1).await.expect("write h");
    assert_eq!(
        fs.rename(ROOT_INO, OsStr::new("h"), d.ino, OsStr::new("g"), true).await.expect_err("noreplace").errno,
        libc::EEXIST
    );
    assert_eq!(
        fs.rename(ROOT_INO, OsStr::new("nope"), ROOT_INO, OsStr::new("x"), false).await.expect_err("missing").errno,
        libc::ENOENT
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rmdir_of_a_non_empty_directory_is_enotempty() {
    let s = S3Server::start();
    let p = prefix("rmdir");
    let fs = fs_with(&s, config(&s, &p, Duration::from_secs(10)), 1 << 30).await;
    let d = fs.mkdir(ROOT_INO, OsStr::new("d")).await.expect("mkdir");
    assert_eq!(fs.mkdir(ROOT_INO, OsStr::new("d")).await.expect_err("exists").errno, libc::EEXIST);
    write_file(&fs, d.ino, "f", b"x", 1).await.expect("write d/f");
    assert_eq!(fs.rmdir(ROOT_INO, OsStr::new("d")).await.expect_err("not empty").errno, libc::ENOTEMPTY);
    assert_eq!(fs.unlink(ROOT_INO, OsStr::new("d")).await.expect_err("a dir").errno, libc::EISDIR);
    fs.unlink(d.ino, OsStr::new("f")).await.expect("unlink d/f");
    // The marker keeps the directory after its last file goes.
    assert_eq!(fs.lookup(ROOT_INO, OsStr::new("d")).await.expect("d stays").kind, Kind::Dir);
    fs.rmdir(ROOT_INO, OsStr::new("d")).await.expect("rmdir");
    assert_eq!(fs.lookup(ROOT_INO, OsStr::new("d")).await.expect_err("gone").errno, libc::ENOENT);
    let left = client(&s).list_objects_v2().bucket(&s.bucket).prefix(&p).send().await.expect("list");
    assert!(left.contents().is_empty(), "nothing left: {:?}", left.contents());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn truncation_rewrites_and_in_place_changes_are_refused() {
    let s = S3Server::start();
    let p = prefix("trunc");
    let fs = fs_with(&s, config(&s, &p, Duration::from_secs(10)), 1 << 30).await;
    write_file(&fs, ROOT_INO, "f", b"first version", 5).await.expect("write");
    let ino = ino_of(&fs, "f").await.expect("f");
    assert_eq!(fs.open(ino, libc::O_WRONLY, 1).await.expect_err("no O_TRUNC").errno, libc::EOPNOTSUPP);
    let fh = fs.open(ino, libc::O_WRONLY | libc::O_TRUNC, 1).await.expect("O_TRUNC");
    fs.write(fh, 0, b"second").await.expect("write");
    fs.release(fh).await.expect("commit");
    assert_eq!(read_file(&fs, ino, 4096).await, b"second");
    assert_eq!(fs.usage().used_bytes, 6);
    assert_eq!(fs.setattr(ino, Some(3), None).await.expect_err("shrink to 3").errno, libc::EOPNOTSUPP);
    assert_eq!(fs.setattr(ino, Some(0), None).await.expect("truncate to 0").size, 0);
    assert_eq!(fs.usage().used_bytes, 0);
    // An empty file can be opened for writing without O_TRUNC.
    let fh = fs.open(ino, libc::O_WRONLY, 1).await.expect("empty file");
    fs.write(fh, 0, b"third").await.expect("write");
    fs.release(fh).await.expect("commit");
    assert_eq!(read_file(&fs, ino, 4096).await, b"third");
    // Mode, owner and times are fixed by the mount: setattr without a size is a no-op.
    assert_eq!(fs.setattr(ino, None, None).await.expect("chmod").perm, 0o640);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_only_mount_refuses_every_change() {
    let s = S3Server::start();
    let p = prefix("ro");
    let rw = fs_with(&s, config(&s, &p, Duration::from_secs(10)), 1 << 30).await;
    rw.mkdir(ROOT_INO, OsStr::new("d")).await.expect("mkdir");
    write_file(&rw, ROOT_INO, "f", b"data", 4).await.expect("write");
    let mut cfg = config(&s, &p, Duration::from_secs(10));
    cfg.read_only = true;
    let ro = fs_with(&s, cfg, 1 << 30).await;
    let f = ino_of(&ro, "f").await.expect("f");
    assert_eq!(read_file(&ro, f, 4096).await, b"data", "reads work");
    let errs = [
        ro.create(ROOT_INO, OsStr::new("new"), 0, 1).await.map(|_| ()).expect_err("create"),
        ro.mkdir(ROOT_INO, OsStr::new("e")).await.map(|_| ()).expect_err("mkdir"),
        ro.unlink(ROOT_INO, OsStr::new("f")).await.expect_err("unlink"),
        ro.rmdir(ROOT_INO, OsStr::new("d")).await.expect_err("rmdir"),
        ro.rename(ROOT_INO, OsStr::new("f"), ROOT_INO, OsStr::new("g"), false).await.expect_err("rename"),
        ro.open(f, libc::O_WRONLY | libc::O_TRUNC, 1).await.map(|_| ()).expect_err("open for writing"),
        ro.setattr(f, Some(0), None).await.map(|_| ()).expect_err("truncate"),
    ];
    for e in errs {
        assert_eq!(e.errno, libc::EROFS, "{e}");
    }
    let f = ino_of(&rw, "f").await.expect("f");
    assert_eq!(read_file(&rw, f, 4096).await, b"data", "nothing changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_server_fails_an_operation_with_eio_within_the_bound() {
    let s = S3Server::start();
    let p = prefix("paused");
    let bound = Duration::from_secs(3);
    let fs = fs_with(&s, config(&s, &p, bound), 1 << 30).await;
    write_file(&fs, ROOT_INO, "f", b"data", 4).await.expect("write");
    assert!(fs.usage().healthy);
    s.pause();
    // SIGSTOP takes effect when the server's threads are next scheduled: let it settle.
    std::thread::sleep(Duration::from_millis(300));
    fs.drop_caches();
    let t = Instant::now();
    let e = fs.lookup(ROOT_INO, OsStr::new("f")).await.expect_err("paused");
    let took = t.elapsed();
    let e2 = fs.readdir(ROOT_INO).await.expect_err("paused readdir");
    let took2 = t.elapsed() - took;
    s.resume();
    assert_eq!(e.errno, libc::EIO, "{e}");
    assert_eq!(e2.errno, libc::EIO, "{e2}");
    assert!(took < bound + Duration::from_secs(2), "lookup took {took:?} with a bound of {bound:?}");
    assert!(took2 < bound + Duration::from_secs(2), "readdir took {took2:?} with a bound of {bound:?}");
    let u = fs.usage();
    assert!(!u.healthy && !u.message.is_empty(), "{u:?}");
    assert!(!u.message.contains(&s.endpoint.secret_access_key), "no secret in {u:?}");
    // Once the server answers again, so does the filesystem.
    assert_eq!(fs.lookup(ROOT_INO, OsStr::new("f")).await.expect("resumed").size, 4);
    assert!(fs.usage().healthy);
}

async fn object(s: &S3Server, key: &str) -> Option<Vec<u8>> {
    match client(s).get_object().bucket(&s.bucket).key(key).send().await {
        Ok(o) => Some(o.body.collect().await.expect("body").into_bytes().to_vec()),
        Err(_) => None,
    }
}

async fn uploads(s: &S3Server, p: &str) -> usize {
    let u = client(s).list_multipart_uploads().bucket(&s.bucket).prefix(p).send().await.expect("list uploads");
    u.uploads().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_openers_close_commits_and_a_failed_commit_is_reported_by_every_close() {
    // Boxed: the whole future would not fit on the test thread's stack in debug builds.
    Box::pin(only_the_openers_close_commits_and_a_failed_commit_is_reported_by_every_close_body()).await;
}

async fn only_the_openers_close_commits_and_a_failed_commit_is_reported_by_every_close_body() {
    let s = S3Server::start();
    let p = prefix("close");
    let fs = fs_with(&s, config(&s, &p, Duration::from_secs(10)), 4 << 20).await;
    // Opened by process 100; process 200 (a child that inherited the descriptor) closes
    // its copy: nothing is committed, and writing goes on.
    let (_, fh) = fs.create(ROOT_INO, OsStr::new("out.log"), 0, 100).await.expect("create");
    // A shell opens, dup2s and closes the original before writing: that close commits nothing.
    fs.flush(fh, 100).await.expect("the opener's close before any write");
    assert_eq!(object(&s, &format!("{p}out.log")).await, None, "nothing committed before a write");
    fs.write(fh, 0, b"one\n").await.expect("write one");
    fs.flush(fh, 200).await.expect("another process's close");
    assert_eq!(object(&s, &format!("{p}out.log")).await, None, "not committed by another process's close");
    fs.write(fh, 4, b"two\n").await.expect("write two after the child's close");
    fs.flush(fh, 100).await.expect("the opener's close commits");
    assert_eq!(object(&s, &format!("{p}out.log")).await.as_deref(), Some(&b"one\ntwo\n"[..]));
    fs.flush(fh, 100).await.expect("a later close of a dup answers the commit again");
    fs.release(fh).await.expect("release");

    // A commit that fails (past the quota) is reported by every close, and by release.
    let (_, fh) = fs.create(ROOT_INO, OsStr::new("big"), 0, 100).await.expect("create");
    let data = pattern(1 << 20);
    let mut off = 0;
    let mut refused = None;
    for _ in 0..6 {
        match fs.write(fh, off, &data).await {
            Ok(n) => off += n as u64,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    assert_eq!(refused.expect("the quota stops a write").errno, libc::ENOSPC);
    fs.flush(fh, 200).await.expect("another process's close commits nothing and reports nothing yet");
    assert_eq!(fs.flush(fh, 100).await.expect_err("the opener's close").errno, libc::ENOSPC);
    assert_eq!(fs.flush(fh, 100).await.expect_err("a later close of a dup").errno, libc::ENOSPC);
    assert_eq!(fs.flush(fh, 200).await.expect_err("any later close").errno, libc::ENOSPC);
    assert_eq!(fs.release(fh).await.expect_err("release").errno, libc::ENOSPC);
    assert_eq!(object(&s, &format!("{p}big")).await, None);

    // A commit that fails at the server (paused past the bound) is reported the same way.
    let fs = fs_with(&s, config(&s, &p, Duration::from_secs(2)), 1 << 30).await;
    let (_, fh) = fs.create(ROOT_INO, OsStr::new("late"), 0, 100).await.expect("create");
    fs.write(fh, 0, b"data").await.expect("write");
    s.pause();
    std::thread::sleep(Duration::from_millis(300));
    let e = fs.flush(fh, 100).await.expect_err("the commit fails");
    s.resume();
    assert_eq!(e.errno, libc::EIO, "{e}");
    assert_eq!(fs.flush(fh, 100).await.expect_err("again").errno, libc::EIO);
    assert_eq!(fs.release(fh).await.expect_err("release").errno, libc::EIO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_replaced_while_open_fails_reads_with_eio_and_a_file_being_written_cannot_be_read() {
    // Boxed: the whole future would not fit on the test thread's stack in debug builds.
    Box::pin(a_file_replaced_while_open_fails_reads_with_eio_and_a_file_being_written_cannot_be_read_body()).await;
}

async fn a_file_replaced_while_open_fails_reads_with_eio_and_a_file_being_written_cannot_be_read_body() {
    let s = S3Server::start();
    let p = prefix("torn");
    let fs = fs_with(&s, config(&s, &p, Duration::from_secs(10)), 1 << 30).await;
    let chunk = fs.config().read_chunk as usize;
    let data = pattern(6 * chunk);
    write_file(&fs, ROOT_INO, "f", &data, 1 << 20).await.expect("write f");
    let ino = ino_of(&fs, "f").await.expect("f");
    let fh = fs.open(ino, libc::O_RDONLY, 1).await.expect("open");
    assert_eq!(&fs.read(fh, 0, 4096).await.expect("first read")[..], &data[..4096]);
    // Another client replaces it with an object of the same size.
    let other: Vec<u8> = data.iter().map(|b| b.wrapping_add(1)).collect();
    put(&s, &format!("{p}f"), &other).await;
    // A read of a chunk not yet fetched names the version opened: 412, EIO.
    let e = fs.read(fh, (5 * chunk) as u64, 4096).await.expect_err("the object changed");
    assert_eq!(e.errno, libc::EIO, "{e}");
    assert!(e.message.contains("replaced"), "{e}");
    fs.release(fh).await.expect("release");
    // Opened again (after the cached entry expires or is dropped), it reads the new version.
    fs.drop_caches();
    assert_eq!(read_file(&fs, ino, 1 << 20).await, other);

    // A file being written through this mount cannot be opened for reading.
    let (a, wfh) = fs.create(ROOT_INO, OsStr::new("w"), 0, 1).await.expect("create w");
    fs.write(wfh, 0, b"partial").await.expect("write");
    assert_eq!(fs.open(a.ino, libc::O_RDONLY, 1).await.expect_err("being written").errno, libc::EBUSY);
    let e = fs.rename(ROOT_INO, OsStr::new("w"), ROOT_INO, OsStr::new("x"), false).await.expect_err("rename");
    assert_eq!(e.errno, libc::EBUSY);
    assert_eq!(fs.unlink(ROOT_INO, OsStr::new("w")).await.expect_err("unlink").errno, libc::EBUSY);
    fs.release(wfh).await.expect("commit");
    assert_eq!(read_file(&fs, a.ino, 4096).await, b"partial");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inodes_are_forgotten_and_caches_and_buffers_stay_bounded() {
    // Boxed: the whole future would not fit on the test thread's stack in debug builds.
    Box::pin(inodes_are_forgotten_and_caches_and_buffers_stay_bounded_body()).await;
}

async fn inodes_are_forgotten_and_caches_and_buffers_stay_bounded_body() {
    let s = S3Server::start();
    let p = prefix("bounded");
    for i in 0..150 {
        put(&s, &format!("{p}f{i:03}"), b"0123456789").await;
    }
    let mut cfg = config(&s, &p, Duration::from_secs(10));
    cfg.cache_max = 64;
    let chunk = cfg.read_chunk;
    cfg.budget = ferrovol_mounter::fs::budget::Budget::new(2 * chunk as usize);
    let budget = cfg.budget.clone();
    let fs = fs_with(&s, cfg, 1 << 30).await;
    assert_eq!(fs.usage().used_bytes, 1500, "the scan sums the sizes");
    let listed = fs.readdir(ROOT_INO).await.expect("readdir");
    assert_eq!(listed.len(), 150);
    assert!(fs.cached_entries() <= 64, "the stat cache holds at most its bound: {}", fs.cached_entries());
    assert_eq!(fs.inodes_held(), 0, "a listing hands out numbers without holding inodes");
    let mut inos = Vec::new();
    for e in &listed {
        let a = fs.lookup(ROOT_INO, OsStr::new(&e.name)).await.expect("lookup");
        assert_eq!(a.ino, e.ino, "the listing and the lookup agree on the number");
        inos.push(a.ino);
    }
    assert_eq!(fs.inodes_held(), 150);
    fs.lookup(ROOT_INO, OsStr::new("f000")).await.expect("a second lookup");
    for ino in &inos {
        fs.forget(*ino, 1);
    }
    assert_eq!(fs.inodes_held(), 1, "f000 still has a lookup");
    fs.forget(inos[0], 1);
    assert_eq!(fs.inodes_held(), 0, "every forgotten inode is gone");
    assert_eq!(fs.getattr(inos[0]).await.expect_err("forgotten").errno, libc::ENOENT);

    // Prefetch takes chunks ahead only within the budget (2 chunks here) and drops them
    // (cancelling their GETs) when reading turns random and when the file is closed.
    let data = pattern(8 * chunk as usize);
    write_file(&fs, ROOT_INO, "big", &data, 1 << 20).await.expect("write big");
    assert_eq!(budget.available(), budget.total(), "the writer gave its buffers back");
    let ino = ino_of(&fs, "big").await.expect("big");
    let fh = fs.open(ino, libc::O_RDONLY, 1).await.expect("open");
    let mut off = 0u64;
    while off < 3 * chunk {
        let b = fs.read(fh, off, 1 << 20).await.expect("sequential read");
        assert_eq!(&b[..], &data[off as usize..off as usize + b.len()]);
        off += b.len() as u64;
        assert!(fs.chunks_held(fh) <= 3, "at most the budget's 2 chunks and the one read: {}", fs.chunks_held(fh));
    }
    let b = fs.read(fh, 7 * chunk, 4096).await.expect("a random read");
    assert_eq!(&b[..], &data[7 * chunk as usize..7 * chunk as usize + 4096]);
    assert_eq!(fs.chunks_held(fh), 0, "the prefetched chunks were dropped");
    assert_eq!(budget.available(), budget.total());
    fs.read(fh, 7 * chunk + 4096, 1 << 20).await.expect("sequential from there");
    assert!(fs.chunks_held(fh) > 0, "a new stream prefetches");
    fs.release(fh).await.expect("release");
    assert_eq!(budget.available(), budget.total(), "closing gives the chunks back");
    // A write larger than the budget still goes through: it waits for parts to upload.
    let data = pattern(3 * chunk as usize + 5);
    write_file(&fs, ROOT_INO, "big2", &data, 1 << 20).await.expect("write past the budget's size");
    assert_eq!(read_file(&fs, ino_of(&fs, "big2").await.expect("big2"), 1 << 20).await, data);
    assert_eq!(budget.available(), budget.total());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unmount_discards_open_writers_and_aborts_their_uploads() {
    let s = S3Server::start();
    let p = prefix("discard");
    let fs = fs_with(&s, config(&s, &p, Duration::from_secs(10)), 1 << 30).await;
    let (_, fh) = fs.create(ROOT_INO, OsStr::new("open"), 0, 1).await.expect("create");
    let part = pattern(fs.config().part_size + 1);
    fs.write(fh, 0, &part).await.expect("one part uploaded");
    assert_eq!(uploads(&s, &p).await, 1, "a multipart upload is under way");
    assert_eq!(fs.settle_writers(false).await, 1);
    assert_eq!(uploads(&s, &p).await, 0, "the upload was aborted");
    assert_eq!(fs.release(fh).await.expect_err("nothing was stored").errno, libc::EIO);
    assert_eq!(object(&s, &format!("{p}open")).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_renames_are_exdev_and_a_rename_keeps_both_names_busy() {
    // Boxed: the whole future would not fit on the test thread's stack in debug builds.
    Box::pin(large_renames_are_exdev_and_a_rename_keeps_both_names_busy_body()).await;
}

async fn large_renames_are_exdev_and_a_rename_keeps_both_names_busy_body() {
    let s = S3Server::start();
    let p = prefix("rename2");
    let mut cfg = config(&s, &p, Duration::from_secs(10));
    cfg.rename_copy_max = 1 << 20;
    let fs = fs_with(&s, cfg, 1 << 30).await;
    write_file(&fs, ROOT_INO, "large", &pattern((1 << 20) + 1), 1 << 20).await.expect("write");
    let e = fs.rename(ROOT_INO, OsStr::new("large"), ROOT_INO, OsStr::new("moved"), false).await.expect_err("large");
    assert_eq!(e.errno, libc::EXDEV, "{e}");
    write_file(&fs, ROOT_INO, "small", b"small", 5).await.expect("write");

    // While a rename is under way (the server is paused under it), both names are busy.
    s.pause();
    std::thread::sleep(Duration::from_millis(300));
    let fs2 = fs.clone();
    let renaming =
        tokio::spawn(
            async move { fs2.rename(ROOT_INO, OsStr::new("small"), ROOT_INO, OsStr::new("target"), false).await },
        );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let busy_from = fs.create(ROOT_INO, OsStr::new("small"), 0, 1).await.map(|_| ()).expect_err("from is busy");
    let busy_to = fs.create(ROOT_INO, OsStr::new("target"), 0, 1).await.map(|_| ()).expect_err("to is busy");
    s.resume();
    assert_eq!((busy_from.errno, busy_to.errno), (libc::EBUSY, libc::EBUSY), "{busy_from} / {busy_to}");
    renaming.await.expect("join").expect("the rename finishes");
    let t = ino_of(&fs, "target").await.expect("target");
    assert_eq!(read_file(&fs, t, 4096).await, b"small");
    assert_eq!(fs.lookup(ROOT_INO, OsStr::new("small")).await.expect_err("moved").errno, libc::ENOENT);
    // Done: the names can be written again.
    write_file(&fs, ROOT_INO, "small", b"again", 5).await.expect("write after the rename");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn o_excl_commits_only_if_no_object_appeared_and_long_names_are_refused() {
    // Boxed: the whole future would not fit on the test thread's stack in debug builds.
    Box::pin(o_excl_commits_only_if_no_object_appeared_and_long_names_are_refused_body()).await;
}

async fn o_excl_commits_only_if_no_object_appeared_and_long_names_are_refused_body() {
    let s = S3Server::start();
    let p = prefix("excl");
    let fs = fs_with(&s, config(&s, &p, Duration::from_secs(10)), 1 << 30).await;
    // The success path, small (PutObject) and multipart, on every server.
    let (_, fh) = fs.create(ROOT_INO, OsStr::new("new"), libc::O_EXCL, 1).await.expect("create O_EXCL");
    fs.write(fh, 0, b"mine").await.expect("write");
    fs.release(fh).await.expect("commit");
    assert_eq!(object(&s, &format!("{p}new")).await.as_deref(), Some(&b"mine"[..]));
    let big = pattern(fs.config().part_size + 3);
    let (_, fh) = fs.create(ROOT_INO, OsStr::new("newbig"), libc::O_EXCL, 1).await.expect("create O_EXCL");
    fs.write(fh, 0, &big).await.expect("write");
    fs.release(fh).await.expect("commit multipart");
    assert_eq!(object(&s, &format!("{p}newbig")).await, Some(big));
    assert_eq!(
        fs.create(ROOT_INO, OsStr::new("new"), libc::O_EXCL, 1).await.map(|_| ()).expect_err("exists").errno,
        libc::EEXIST
    );
    // Another client creates the name while it is open: the commit is EEXIST and theirs
    // stays. Only on moto: garage accepts If-None-Match: * on an existing key (S3-TESTING.md).
    if s.server == ferrovol_s3::testing::Server::Moto {
        let (_, fh) = fs.create(ROOT_INO, OsStr::new("race"), libc::O_EXCL, 1).await.expect("create O_EXCL");
        fs.write(fh, 0, b"mine").await.expect("write");
        put(&s, &format!("{p}race"), b"theirs").await;
        assert_eq!(fs.release(fh).await.expect_err("someone else's object is there").errno, libc::EEXIST);
        assert_eq!(object(&s, &format!("{p}race")).await.as_deref(), Some(&b"theirs"[..]));
    }
    // Names of more than 255 bytes are refused, as statfs says.
    let long = "n".repeat(256);
    assert_eq!(
        fs.create(ROOT_INO, OsStr::new(&long), 0, 1).await.map(|_| ()).expect_err("long").errno,
        libc::ENAMETOOLONG
    );
    assert_eq!(fs.lookup(ROOT_INO, OsStr::new(&long)).await.expect_err("long").errno, libc::ENAMETOOLONG);
    assert_eq!(fs.statfs().namelen, 255);
    assert!(fs.create(ROOT_INO, OsStr::new(&"n".repeat(255)), 0, 1).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_directory_hides_a_file_of_the_same_name() {
    let s = S3Server::start();
    let p = prefix("shadow");
    put(&s, &format!("{p}a"), b"the file").await;
    put(&s, &format!("{p}a/b"), b"inside").await;
    let fs = fs_with(&s, config(&s, &p, Duration::from_secs(10)), 1 << 30).await;
    assert_eq!(
        names(&fs.readdir(ROOT_INO).await.expect("readdir /")),
        vec![("a".into(), Kind::Dir)],
        "one entry, a directory"
    );
    let a = fs.lookup(ROOT_INO, OsStr::new("a")).await.expect("lookup a");
    assert_eq!(a.kind, Kind::Dir);
    assert_eq!(names(&fs.readdir(a.ino).await.expect("readdir a")), vec![("b".into(), Kind::File)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rewrite_with_o_trunc_does_not_count_the_old_size() {
    let s = S3Server::start();
    let p = prefix("retrunc");
    let quota = 10 * 1024 * 1024;
    let fs = fs_with(&s, config(&s, &p, Duration::from_secs(30)), quota).await;
    write_file(&fs, ROOT_INO, "f", &pattern(6 * 1024 * 1024), 1 << 20).await.expect("6 MiB of 10");
    // 6 MiB again over the same file: 12 MiB if the old size still counted.
    let ino = ino_of(&fs, "f").await.expect("f");
    let fh = fs.open(ino, libc::O_WRONLY | libc::O_TRUNC, 1).await.expect("O_TRUNC");
    let new = pattern(6 * 1024 * 1024 + 1);
    for (i, piece) in new.chunks(1 << 20).enumerate() {
        fs.write(fh, (i << 20) as u64, piece).await.expect("the rewrite fits in the quota");
    }
    fs.release(fh).await.expect("commit");
    assert_eq!(fs.usage().used_bytes, new.len() as u64);
    assert_eq!(read_file(&fs, ino, 1 << 20).await, new);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn objects_of_other_clients_count_at_the_next_mount() {
    let s = S3Server::start();
    let p = prefix("others");
    let fs = fs_with(&s, config(&s, &p, Duration::from_secs(10)), 1 << 30).await;
    write_file(&fs, ROOT_INO, "mine", &pattern(1000), 1000).await.expect("write");
    put(&s, &format!("{p}theirs"), &pattern(5000)).await;
    assert_eq!(fs.usage().used_bytes, 1000, "not counted while mounted");
    let again = fs_with(&s, config(&s, &p, Duration::from_secs(10)), 1 << 30).await;
    assert_eq!(again.usage().used_bytes, 6000, "counted at the next mount");
}
