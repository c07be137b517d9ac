//! Every S3 call the filesystem makes, each bounded by the mount's timeout (the whole call,
//! body included: a paused server fails it with EIO at the bound; CopyObject, whose server
//! copies bytes, gets the longer bound of [`Timeouts::for_copies`]), classified into an
//! errno, and recorded in the mount's health.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, DateTime};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use ferrovol_s3::client::timeout_config;
use ferrovol_s3::controller::store::{multipart_etag, same_etag, unreadable_success};
use ferrovol_s3::error::{classify, Kind};
use ferrovol_s3::Timeouts;

use super::FsError;

/// An object's size, modification time and ETag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjMeta {
    pub size: u64,
    pub mtime: SystemTime,
    pub etag: Option<String>,
}

/// How long one attempt of a CopyObject may take at least: the server copies the bytes
/// before it answers (renames copy objects of up to `FsConfig::rename_copy_max`).
pub const COPY_ATTEMPT: Duration = Duration::from_secs(120);

type HttpResponse = aws_sdk_s3::config::http::HttpResponse;

/// The HTTP status of a failed call, if it got an answer.
fn status<E>(err: &SdkError<E, HttpResponse>) -> Option<u16> {
    err.raw_response().map(|r| r.status().as_u16())
}

/// Whether a CompleteMultipartUpload whose answer could not be read may be taken as done:
/// the object there now must carry the multipart ETag of exactly the parts completed (the
/// MD5 of their binary MD5s, `-N`), which an older object, even one of the same size,
/// cannot have.
pub fn completed_object_matches(head_etag: Option<&str>, part_etags: &[String]) -> bool {
    match (head_etag, multipart_etag(part_etags)) {
        (Some(got), Some(want)) => same_etag(got, &want),
        _ => false,
    }
}

/// One page of a listing.
#[derive(Debug, Default)]
pub struct Page {
    pub objects: Vec<(String, ObjMeta)>,
    pub prefixes: Vec<String>,
    pub next: Option<String>,
}

/// Whether the last S3 calls worked, and the last failure.
#[derive(Debug, Default)]
pub struct Health {
    inner: Mutex<HealthState>,
}

#[derive(Debug, Default)]
struct HealthState {
    failing: bool,
    last_error: Option<(String, SystemTime)>,
}

impl Health {
    fn ok(&self) {
        if let Ok(mut h) = self.inner.lock() {
            h.failing = false;
        }
    }

    fn fail(&self, message: &str) {
        if let Ok(mut h) = self.inner.lock() {
            h.failing = true;
            h.last_error = Some((message.to_owned(), SystemTime::now()));
        }
    }

    /// `(healthy, message)`: the message names the last failure and how long ago it was.
    pub fn report(&self) -> (bool, String) {
        let Ok(h) = self.inner.lock() else { return (false, "the health record is poisoned".into()) };
        let ago = |at: &SystemTime| SystemTime::now().duration_since(*at).unwrap_or_default().as_secs();
        match (&h.last_error, h.failing) {
            (Some((m, at)), true) => (false, format!("{m} ({} s ago)", ago(at))),
            _ => (true, String::new()),
        }
    }
}

/// The S3 side of one mount.
#[derive(Debug)]
pub struct S3Ctx {
    pub client: aws_sdk_s3::Client,
    pub bucket: String,
    /// The bound on any one call.
    pub bound: Duration,
    /// The SDK's bounds of a CopyObject (see [`COPY_ATTEMPT`]).
    pub copy_timeouts: Timeouts,
    pub health: Health,
}

fn to_time(t: Option<&DateTime>) -> SystemTime {
    t.map(|t| UNIX_EPOCH + Duration::from_secs(t.secs().max(0) as u64)).unwrap_or(UNIX_EPOCH)
}

impl S3Ctx {
    /// The S3 side of a mount whose calls are bounded by `bound`.
    pub fn new(client: aws_sdk_s3::Client, bucket: &str, bound: Duration) -> Self {
        S3Ctx {
            client,
            bucket: bucket.to_owned(),
            bound,
            copy_timeouts: Timeouts::within(bound).for_copies(COPY_ATTEMPT),
            health: Health::default(),
        }
    }

    fn what(&self, key: &str) -> String {
        format!("{}/{key}", self.bucket)
    }

    /// The errno of an S3 failure, recording it in the health when it says the server or
    /// the credentials are at fault.
    fn failed<E, R>(&self, op: &str, key: &str, err: &SdkError<E, R>) -> FsError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug + 'static,
    {
        let f = classify(op, &self.what(key), err);
        let errno = match f.kind {
            Kind::NotFound => libc::ENOENT,
            Kind::Denied => libc::EACCES,
            Kind::Unreachable | Kind::Conflict | Kind::Refused => libc::EIO,
        };
        if matches!(f.kind, Kind::Denied | Kind::Unreachable) {
            self.health.fail(&f.message);
        } else {
            self.health.ok();
        }
        FsError::new(errno, f.message)
    }

    fn timed_out(&self, op: &str, key: &str) -> FsError {
        let m = format!("S3 {op} on {} did not finish within the mount's bound of {:?}", self.what(key), self.bound);
        self.health.fail(&m);
        FsError::new(libc::EIO, m)
    }

    async fn bounded<T>(
        &self,
        op: &str,
        key: &str,
        fut: impl std::future::Future<Output = Result<T, FsError>>,
    ) -> Result<T, FsError> {
        self.bounded_by(self.bound, op, key, fut).await
    }

    async fn bounded_by<T>(
        &self,
        bound: Duration,
        op: &str,
        key: &str,
        fut: impl std::future::Future<Output = Result<T, FsError>>,
    ) -> Result<T, FsError> {
        match tokio::time::timeout(bound, fut).await {
            Ok(Ok(v)) => {
                self.health.ok();
                Ok(v)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(self.timed_out(op, key)),
        }
    }

    /// The object's size and time; `None` when there is no such object.
    pub async fn head(&self, key: &str) -> Result<Option<ObjMeta>, FsError> {
        let r = self
            .bounded("HeadObject", key, async {
                match self.client.head_object().bucket(&self.bucket).key(key).send().await {
                    Ok(o) => Ok(Some(ObjMeta {
                        size: o.content_length().unwrap_or(0).max(0) as u64,
                        mtime: to_time(o.last_modified()),
                        etag: o.e_tag().map(str::to_owned),
                    })),
                    Err(e) => {
                        let f = self.failed("HeadObject", key, &e);
                        if f.errno == libc::ENOENT {
                            Ok(None)
                        } else {
                            Err(f)
                        }
                    }
                }
            })
            .await;
        r
    }

    /// One page of the listing of `prefix` (with `/` as delimiter when `delimited`).
    pub async fn list_page(
        &self,
        prefix: &str,
        delimited: bool,
        token: Option<String>,
        max_keys: Option<i32>,
    ) -> Result<Page, FsError> {
        self.bounded("ListObjectsV2", prefix, async {
            let mut req = self.client.list_objects_v2().bucket(&self.bucket).prefix(prefix);
            if delimited {
                req = req.delimiter("/");
            }
            if let Some(t) = token {
                req = req.continuation_token(t);
            }
            if let Some(m) = max_keys {
                req = req.max_keys(m);
            }
            let out = req.send().await.map_err(|e| self.failed("ListObjectsV2", prefix, &e))?;
            Ok(Page {
                objects: out
                    .contents()
                    .iter()
                    .filter_map(|o| {
                        let key = o.key()?.to_owned();
                        let meta = ObjMeta {
                            size: o.size().unwrap_or(0).max(0) as u64,
                            mtime: to_time(o.last_modified()),
                            etag: o.e_tag().map(str::to_owned),
                        };
                        Some((key, meta))
                    })
                    .collect(),
                prefixes: out.common_prefixes().iter().filter_map(|p| p.prefix().map(str::to_owned)).collect(),
                next: if out.is_truncated() == Some(true) {
                    out.next_continuation_token().map(str::to_owned)
                } else {
                    None
                },
            })
        })
        .await
    }

    /// The whole listing of `prefix`, page by page (each page bounded).
    pub async fn list_all(&self, prefix: &str, delimited: bool) -> Result<Page, FsError> {
        let mut all = Page::default();
        let mut token = None;
        loop {
            let page = self.list_page(prefix, delimited, token, None).await?;
            all.objects.extend(page.objects);
            all.prefixes.extend(page.prefixes);
            match page.next {
                Some(t) => token = Some(t),
                None => return Ok(all),
            }
        }
    }

    /// Bytes `[start, end)` of the object, of the version with ETag `if_match` when given
    /// (another version answers 412: EIO saying the object changed).
    pub async fn get_range(&self, key: &str, start: u64, end: u64, if_match: Option<&str>) -> Result<Bytes, FsError> {
        if end <= start {
            return Ok(Bytes::new());
        }
        self.bounded("GetObject", key, async {
            let out = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .range(format!("bytes={start}-{}", end - 1))
                .set_if_match(if_match.map(str::to_owned))
                .send()
                .await
                .map_err(|e| {
                    if status(&e) == Some(412) {
                        FsError::new(
                            libc::EIO,
                            format!(
                                "{} was replaced while it was open for reading (its ETag is no longer {}): reading on would mix versions",
                                self.what(key),
                                if_match.unwrap_or_default()
                            ),
                        )
                    } else {
                        self.failed("GetObject", key, &e)
                    }
                })?;
            // Straight into one buffer of the range's size: collecting the frames first
            // would hold the chunk twice.
            let mut body = out.body;
            let mut buf = bytes::BytesMut::with_capacity((end - start) as usize);
            loop {
                match body.next().await {
                    Some(Ok(b)) => buf.extend_from_slice(&b),
                    Some(Err(e)) => {
                        let m = format!("S3 GetObject on {}: reading the body failed: {e}", self.what(key));
                        self.health.fail(&m);
                        return Err(FsError::new(libc::EIO, m));
                    }
                    None => break,
                }
            }
            Ok(buf.freeze())
        })
        .await
    }

    /// The whole object.
    pub async fn get(&self, key: &str) -> Result<Bytes, FsError> {
        self.bounded("GetObject", key, async {
            let out = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| self.failed("GetObject", key, &e))?;
            let body = out.body.collect().await.map_err(|e| {
                FsError::new(libc::EIO, format!("S3 GetObject on {}: reading the body failed: {e}", self.what(key)))
            })?;
            Ok(body.into_bytes())
        })
        .await
    }

    /// Writes the object; with `exclusive`, only if there is none (`If-None-Match: *`: an
    /// object there answers 412, EEXIST). Answers the new object's ETag.
    pub async fn put(&self, key: &str, body: Bytes, exclusive: bool) -> Result<Option<String>, FsError> {
        self.bounded("PutObject", key, async {
            let out = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .body(ByteStream::from(body))
                .set_if_none_match(exclusive.then(|| "*".to_owned()))
                .send()
                .await
                .map_err(|e| self.write_failed("PutObject", key, &e))?;
            Ok(out.e_tag().map(str::to_owned))
        })
        .await
    }

    /// A failed conditional write: 412 is EEXIST (the object exists), the rest as usual.
    fn write_failed<E>(&self, op: &str, key: &str, err: &SdkError<E, HttpResponse>) -> FsError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        if status(err) == Some(412) {
            self.health.ok();
            return FsError::new(
                libc::EEXIST,
                format!("{} was created by someone else meanwhile (O_EXCL)", self.what(key)),
            );
        }
        self.failed(op, key, err)
    }

    pub async fn delete(&self, key: &str) -> Result<(), FsError> {
        self.bounded("DeleteObject", key, async {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| self.failed("DeleteObject", key, &e))?;
            Ok(())
        })
        .await
    }

    /// Copies `from` to `to` on the server, within the longer bounds of copies.
    pub async fn copy(&self, from: &str, to: &str) -> Result<(), FsError> {
        let t = self.copy_timeouts;
        self.bounded_by(t.operation, "CopyObject", to, async {
            self.client
                .copy_object()
                .bucket(&self.bucket)
                .key(to)
                .copy_source(super::paths::copy_source(&self.bucket, from))
                .customize()
                .config_override(aws_sdk_s3::config::Builder::default().timeout_config(timeout_config(t)))
                .send()
                .await
                .map_err(|e| self.failed("CopyObject", to, &e))?;
            Ok(())
        })
        .await
    }

    pub async fn create_upload(&self, key: &str) -> Result<String, FsError> {
        self.bounded("CreateMultipartUpload", key, async {
            let out = self
                .client
                .create_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| self.failed("CreateMultipartUpload", key, &e))?;
            out.upload_id().map(str::to_owned).ok_or_else(|| {
                FsError::new(libc::EIO, format!("S3 CreateMultipartUpload on {} returned no upload ID", self.what(key)))
            })
        })
        .await
    }

    pub async fn upload_part(&self, key: &str, upload_id: &str, n: i32, body: Bytes) -> Result<CompletedPart, FsError> {
        self.bounded("UploadPart", key, async {
            let out = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(n)
                .body(ByteStream::from(body))
                .send()
                .await
                .map_err(|e| self.failed("UploadPart", key, &e))?;
            Ok(CompletedPart::builder().part_number(n).set_e_tag(out.e_tag().map(str::to_owned)).build())
        })
        .await
    }

    /// Completes an upload (with `exclusive`, only if no object is there: 412 is EEXIST) and
    /// answers the object's ETag. Some servers (moto) answer a successful completion with XML
    /// the SDK cannot read (a 200 whose root element is `CompleteMultipartUploadResponse`,
    /// with no error code); only such an answer makes us ask the object, and it counts as
    /// success only when the object carries the multipart ETag of exactly these parts
    /// ([`completed_object_matches`]). A 200 carrying an `<Error>` with a code
    /// (InternalError) is a failure.
    pub async fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
        exclusive: bool,
    ) -> Result<Option<String>, FsError> {
        let etags: Vec<String> = parts.iter().map(|p| p.e_tag().unwrap_or_default().to_owned()).collect();
        let r = self
            .bounded("CompleteMultipartUpload", key, async {
                match self
                    .client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(upload_id)
                    .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
                    .set_if_none_match(exclusive.then(|| "*".to_owned()))
                    .send()
                    .await
                {
                    Ok(o) => Ok(Some(o.e_tag().map(str::to_owned))),
                    Err(e) if status(&e) == Some(200) && unreadable_success(200, e.code()) => Ok(None),
                    Err(e) => Err(self.write_failed("CompleteMultipartUpload", key, &e)),
                }
            })
            .await?;
        if let Some(etag) = r {
            return Ok(etag);
        }
        let head = self.head(key).await?;
        let got = head.as_ref().and_then(|m| m.etag.as_deref());
        if completed_object_matches(got, &etags) {
            return Ok(got.map(str::to_owned));
        }
        Err(FsError::new(
            libc::EIO,
            format!(
                "S3 CompleteMultipartUpload on {} answered 200 with a body that could not be read, and the object there is not the one completed (ETag {:?}, expected {:?})",
                self.what(key),
                got.unwrap_or("none: no object"),
                multipart_etag(&etags).unwrap_or_else(|| "unknown: a part's ETag is not an MD5".into())
            ),
        ))
    }

    /// Aborts an upload; a failure is only logged (the bucket's lifecycle rules or the
    /// next abort clean up what is left).
    pub async fn abort_upload(&self, key: &str, upload_id: &str) {
        let r = self
            .bounded("AbortMultipartUpload", key, async {
                self.client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(upload_id)
                    .send()
                    .await
                    .map_err(|e| self.failed("AbortMultipartUpload", key, &e))?;
                Ok(())
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "an unfinished multipart upload could not be aborted");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrovol_s3::md5;

    #[test]
    fn an_unreadable_completion_is_taken_only_from_the_object_it_made() {
        let parts = vec![format!("\"{}\"", md5::hex_digest(b"part one")), format!("\"{}\"", md5::hex_digest(b"two"))];
        let mut joined = md5::digest(b"part one").to_vec();
        joined.extend_from_slice(&md5::digest(b"two"));
        let made = format!("\"{}-2\"", md5::hex_digest(&joined));
        assert!(completed_object_matches(Some(&made), &parts), "the object completed from these parts");
        // An older object of the same size (a PutObject: a plain MD5, or another upload's).
        let older = format!("\"{}\"", md5::hex_digest(b"part onetwo"));
        assert!(!completed_object_matches(Some(&older), &parts), "an older object is not the completed one");
        assert!(!completed_object_matches(Some(&format!("\"{}-2\"", md5::hex_digest(b"x"))), &parts));
        assert!(!completed_object_matches(None, &parts), "no object");
        assert!(!completed_object_matches(Some(&made), &["not-an-md5".to_owned()]), "unknown part ETags");
        // Only a 200 without an error code is asked about (moto's unreadable success); a 200
        // carrying <Error><Code>InternalError</Code> is a failure.
        assert!(unreadable_success(200, None));
        assert!(!unreadable_success(200, Some("InternalError")));
    }

    #[test]
    fn copies_are_bounded_longer_than_other_calls() {
        let client = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::Config::builder().behavior_version(aws_sdk_s3::config::BehaviorVersion::latest()).build(),
        );
        let ctx = S3Ctx::new(client, "b", Duration::from_secs(10));
        assert_eq!(ctx.copy_timeouts.attempt, COPY_ATTEMPT);
        assert!(ctx.copy_timeouts.operation >= COPY_ATTEMPT, "{:?}", ctx.copy_timeouts);
        assert_eq!(
            ctx.copy_timeouts.connect,
            Timeouts::within(ctx.bound).connect,
            "an unreachable server still fails fast"
        );
    }
}
