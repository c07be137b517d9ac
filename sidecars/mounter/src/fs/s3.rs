//! Every S3 call the filesystem makes, each bounded by the mount's timeout (the whole call,
//! body included: a paused server fails it with EIO at the bound), classified into an errno,
//! and recorded in the mount's health.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, DateTime};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use ferrovol_s3::error::{classify, Kind};

use super::FsError;

/// An object's size and modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjMeta {
    pub size: u64,
    pub mtime: SystemTime,
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
    pub health: Health,
}

fn to_time(t: Option<&DateTime>) -> SystemTime {
    t.map(|t| UNIX_EPOCH + Duration::from_secs(t.secs().max(0) as u64)).unwrap_or(UNIX_EPOCH)
}

impl S3Ctx {
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
        match tokio::time::timeout(self.bound, fut).await {
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
                        let meta =
                            ObjMeta { size: o.size().unwrap_or(0).max(0) as u64, mtime: to_time(o.last_modified()) };
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

    /// Bytes `[start, end)` of the object.
    pub async fn get_range(&self, key: &str, start: u64, end: u64) -> Result<Bytes, FsError> {
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
                .send()
                .await
                .map_err(|e| self.failed("GetObject", key, &e))?;
            let body = out.body.collect().await.map_err(|e| {
                let m = format!("S3 GetObject on {}: reading the body failed: {e}", self.what(key));
                self.health.fail(&m);
                FsError::new(libc::EIO, m)
            })?;
            Ok(body.into_bytes())
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

    pub async fn put(&self, key: &str, body: Bytes) -> Result<(), FsError> {
        self.bounded("PutObject", key, async {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .body(ByteStream::from(body))
                .send()
                .await
                .map_err(|e| self.failed("PutObject", key, &e))?;
            Ok(())
        })
        .await
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

    pub async fn copy(&self, from: &str, to: &str) -> Result<(), FsError> {
        self.bounded("CopyObject", to, async {
            self.client
                .copy_object()
                .bucket(&self.bucket)
                .key(to)
                .copy_source(super::paths::copy_source(&self.bucket, from))
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

    /// Completes an upload of `size` bytes. Some servers (moto) answer a successful
    /// completion with XML the SDK cannot parse (a 200 whose root element is
    /// `CompleteMultipartUploadResponse`); such an answer counts as success when the object
    /// is then there with the expected size.
    pub async fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
        size: u64,
    ) -> Result<(), FsError> {
        let r = self
            .bounded("CompleteMultipartUpload", key, async {
                match self
                    .client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(upload_id)
                    .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
                    .send()
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 200) => Ok(false),
                    Err(e) => Err(self.failed("CompleteMultipartUpload", key, &e)),
                }
            })
            .await?;
        if r {
            return Ok(());
        }
        match self.head(key).await? {
            Some(m) if m.size == size => Ok(()),
            other => Err(FsError::new(
                libc::EIO,
                format!(
                    "S3 CompleteMultipartUpload on {}: the answer did not parse and the object is not there with {size} bytes ({other:?})",
                    self.what(key)
                ),
            )),
        }
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
