//! The S3 calls the controller makes on one bucket, each classified into an [`S3Failure`]
//! that names the call, the bucket and the key, with the secret key scrubbed from every
//! message. Keys are always built by the caller from [`crate::layout`] and checked names.

use std::collections::HashMap;

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    BucketLocationConstraint, CompletedMultipartUpload, CompletedPart, CreateBucketConfiguration, Delete,
    MetadataDirective, ObjectIdentifier,
};
use tokio::task::JoinSet;

use crate::client::{timeout_config, Timeouts};
use crate::error::{classify, Kind, S3Failure};

/// The most keys one DeleteObjects call takes (S3's limit).
pub const DELETE_BATCH: usize = 1000;

/// The user metadata (`x-amz-meta-ferrovol-source-etag`) in which a copy records the ETag
/// of the source version it was made from: a repeat recognises its earlier copies by it.
pub const SOURCE_ETAG_META: &str = "ferrovol-source-etag";

/// S3's smallest part (all but the last).
const MIN_PART: u64 = 5 << 20;

/// How one object is copied on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyPlan {
    /// Objects larger than this go as a multipart copy (UploadPartCopy).
    pub multipart_above: u64,
    /// The part size of a multipart copy (at least 5 MiB).
    pub part_bytes: u64,
    /// UploadPartCopy calls in flight for one object.
    pub parts_in_flight: usize,
    /// The bounds of CopyObject, UploadPartCopy and CompleteMultipartUpload
    /// ([`Timeouts::for_copies`]).
    pub timeouts: Timeouts,
    /// How many more times an object whose source changed during its copy is copied again.
    pub source_retries: u32,
}

/// What HeadObject says of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub size: u64,
    pub etag: String,
    /// [`SOURCE_ETAG_META`], for an object the controller copied.
    pub source_etag: Option<String>,
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    pub etag: String,
}

/// A client bound to one bucket.
#[derive(Clone)]
pub struct Store {
    pub client: aws_sdk_s3::Client,
    pub bucket: String,
    /// The secret key, only to scrub it from messages (S3 never echoes it, but a proxy might).
    secret: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("bucket", &self.bucket).finish_non_exhaustive()
    }
}

/// Whether a failure says the bucket itself does not exist.
pub fn no_bucket(f: &S3Failure) -> bool {
    f.kind == Kind::NotFound && f.code == "NoSuchBucket"
}

/// Percent-encodes a `bucket/key` for the x-amz-copy-source header (`/` kept).
pub fn copy_source(bucket: &str, key: &str) -> String {
    let mut out = String::with_capacity(bucket.len() + key.len() + 8);
    out.push_str(bucket);
    out.push('/');
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Store {
    pub fn new(client: aws_sdk_s3::Client, bucket: impl Into<String>, secret: &str) -> Self {
        Store { client, bucket: bucket.into(), secret: secret.to_owned() }
    }

    /// The same client on another bucket.
    pub fn on(&self, bucket: &str) -> Store {
        Store { client: self.client.clone(), bucket: bucket.to_owned(), secret: self.secret.clone() }
    }

    fn fail<E, R>(&self, op: &str, key: Option<&str>, err: &aws_sdk_s3::error::SdkError<E, R>) -> S3Failure
    where
        E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug + 'static,
    {
        let what = match key {
            Some(k) => format!("{}/{}", self.bucket, k),
            None => format!("bucket {}", self.bucket),
        };
        self.scrub(classify(op, &what, err))
    }

    /// Removes the secret key from a failure's message.
    pub fn scrub(&self, mut f: S3Failure) -> S3Failure {
        if self.secret.len() >= 4 && f.message.contains(&self.secret) {
            f.message = f.message.replace(&self.secret, "<redacted>");
        }
        f
    }

    pub async fn head_bucket(&self) -> Result<(), S3Failure> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let mut f = self.fail("HeadBucket", None, &e);
                // HEAD answers carry no error code: a 404 on a bucket is NoSuchBucket.
                if f.kind == Kind::NotFound {
                    f.code = "NoSuchBucket".into();
                }
                Err(f)
            }
        }
    }

    /// Creates the bucket; `Ok(false)` if it already exists and is ours (the server says
    /// BucketAlreadyOwnedByYou). A bucket of another account is a Conflict failure.
    pub async fn create_bucket(&self, region: &str) -> Result<bool, S3Failure> {
        let mut req = self.client.create_bucket().bucket(&self.bucket);
        if region != crate::endpoint::DEFAULT_REGION {
            req = req.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(region))
                    .build(),
            );
        }
        match req.send().await {
            Ok(_) => Ok(true),
            Err(e) => {
                let f = self.fail("CreateBucket", None, &e);
                if f.code == "BucketAlreadyOwnedByYou" {
                    Ok(false)
                } else {
                    Err(f)
                }
            }
        }
    }

    pub async fn delete_bucket(&self) -> Result<(), S3Failure> {
        match self.client.delete_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let f = self.fail("DeleteBucket", None, &e);
                if no_bucket(&f) {
                    Ok(())
                } else {
                    Err(f)
                }
            }
        }
    }

    /// Reads a JSON object; `None` if the key does not exist (a missing bucket is an error
    /// with code NoSuchBucket, see [`no_bucket`]).
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, S3Failure> {
        let out = match self.client.get_object().bucket(&self.bucket).key(key).send().await {
            Ok(o) => o,
            Err(e) => {
                let f = self.fail("GetObject", Some(key), &e);
                if f.kind == Kind::NotFound && f.code != "NoSuchBucket" {
                    return Ok(None);
                }
                return Err(f);
            }
        };
        let bytes = out.body.collect().await.map_err(|e| S3Failure {
            kind: Kind::Unreachable,
            code: String::new(),
            message: format!("S3 GetObject on {}/{key}: reading the body failed: {e}", self.bucket),
        })?;
        serde_json::from_slice(&bytes.into_bytes()).map(Some).map_err(|e| S3Failure {
            kind: Kind::Refused,
            code: String::new(),
            message: format!("{}/{key} is not a record this driver can read: {e}", self.bucket),
        })
    }

    /// Writes a JSON object; with `only_new`, refuses (Conflict) if the key exists.
    pub async fn put_json<T: serde::Serialize>(&self, key: &str, value: &T, only_new: bool) -> Result<(), S3Failure> {
        let body = serde_json::to_vec_pretty(value).map_err(|e| S3Failure {
            kind: Kind::Refused,
            code: String::new(),
            message: format!("encoding {}/{key}: {e}", self.bucket),
        })?;
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/json")
            .body(ByteStream::from(body));
        if only_new {
            req = req.if_none_match("*");
        }
        req.send().await.map(|_| ()).map_err(|e| self.fail("PutObject", Some(key), &e))
    }

    /// Writes an empty object (a marker).
    pub async fn put_empty(&self, key: &str) -> Result<(), S3Failure> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(ByteStream::from(Vec::new()))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.fail("PutObject", Some(key), &e))
    }

    /// Deletes one object; a missing one (or bucket) is fine.
    pub async fn delete(&self, key: &str) -> Result<(), S3Failure> {
        match self.client.delete_object().bucket(&self.bucket).key(key).send().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let f = self.fail("DeleteObject", Some(key), &e);
                if f.kind == Kind::NotFound {
                    Ok(())
                } else {
                    Err(f)
                }
            }
        }
    }

    /// One page of a listing: the objects and the token of the next page.
    async fn list_page(
        &self,
        prefix: &str,
        token: Option<String>,
        max_keys: Option<i32>,
    ) -> Result<(Vec<Listed>, Option<String>), S3Failure> {
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .set_continuation_token(token)
            .set_max_keys(max_keys)
            .send()
            .await
            .map_err(|e| self.fail("ListObjectsV2", Some(prefix), &e))?;
        let items = out
            .contents()
            .iter()
            .filter_map(|o| {
                Some(Listed {
                    key: o.key()?.to_owned(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    etag: o.e_tag().unwrap_or_default().to_owned(),
                })
            })
            .collect();
        let next =
            if out.is_truncated() == Some(true) { out.next_continuation_token().map(str::to_owned) } else { None };
        Ok((items, next))
    }

    /// Every object under `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>, S3Failure> {
        let mut all = Vec::new();
        let mut token = None;
        loop {
            let (items, next) = self.list_page(prefix, token, None).await?;
            all.extend(items);
            match next {
                Some(t) => token = Some(t),
                None => return Ok(all),
            }
        }
    }

    /// At most `n` objects under `prefix` (one call).
    pub async fn list_some(&self, prefix: &str, n: i32) -> Result<Vec<Listed>, S3Failure> {
        Ok(self.list_page(prefix, None, Some(n)).await?.0)
    }

    /// The names of the "directories" right under `prefix` (ListObjectsV2 with `/`).
    pub async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, S3Failure> {
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let out = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .delimiter("/")
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.fail("ListObjectsV2", Some(prefix), &e))?;
            all.extend(
                out.common_prefixes()
                    .iter()
                    .filter_map(|p| p.prefix()?.strip_prefix(prefix)?.strip_suffix('/').map(str::to_owned)),
            );
            match (out.is_truncated(), out.next_continuation_token()) {
                (Some(true), Some(t)) => token = Some(t.to_owned()),
                _ => return Ok(all),
            }
        }
    }

    /// Deletes up to 1000 keys in one call.
    pub async fn delete_batch(&self, keys: Vec<String>) -> Result<(), S3Failure> {
        if keys.is_empty() {
            return Ok(());
        }
        let bad = |message: String| S3Failure { kind: Kind::Refused, code: String::new(), message };
        let objects = keys
            .iter()
            .map(|k| ObjectIdentifier::builder().key(k).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("building DeleteObjects on bucket {}: {e}", self.bucket)))?;
        let delete = Delete::builder()
            .set_objects(Some(objects))
            .quiet(true)
            .build()
            .map_err(|e| bad(format!("building DeleteObjects on bucket {}: {e}", self.bucket)))?;
        let out = self
            .client
            .delete_objects()
            .bucket(&self.bucket)
            .delete(delete)
            .send()
            .await
            .map_err(|e| self.fail("DeleteObjects", None, &e))?;
        let refused: Vec<_> = out.errors().iter().filter(|e| e.code() != Some("NoSuchKey")).collect();
        if let Some(first) = refused.first() {
            let code = first.code().unwrap_or_default().to_owned();
            let kind = match code.as_str() {
                "AccessDenied" => Kind::Denied,
                "InternalError" | "SlowDown" | "ServiceUnavailable" => Kind::Unreachable,
                _ => Kind::Refused,
            };
            return Err(self.scrub(S3Failure {
                kind,
                message: format!(
                    "S3 refused DeleteObjects on bucket {} for {} of {} keys, first {}: {}: {}",
                    self.bucket,
                    refused.len(),
                    keys.len(),
                    first.key().unwrap_or_default(),
                    code,
                    first.message().unwrap_or_default()
                ),
                code,
            }));
        }
        Ok(())
    }

    /// Deletes every object under `prefix` except `keep`, listing page by page (1000 keys)
    /// and deleting each page in one DeleteObjects call with up to `in_flight` calls at
    /// once, then aborts the unfinished multipart uploads under it. Answers how many
    /// objects it asked to delete.
    pub async fn delete_prefix(&self, prefix: &str, keep: Option<&str>, in_flight: usize) -> Result<u64, S3Failure> {
        let mut tasks: JoinSet<Result<(), S3Failure>> = JoinSet::new();
        let mut token = None;
        let mut count = 0u64;
        let mut first_err: Option<S3Failure> = None;
        loop {
            let (items, next) = match self.list_page(prefix, token, Some(DELETE_BATCH as i32)).await {
                Ok(p) => p,
                Err(e) => {
                    first_err = Some(e);
                    break;
                }
            };
            let keys: Vec<String> = items.into_iter().map(|o| o.key).filter(|k| Some(k.as_str()) != keep).collect();
            count += keys.len() as u64;
            for chunk in keys.chunks(DELETE_BATCH) {
                while tasks.len() >= in_flight.max(1) {
                    if let Some(Err(e)) = tasks.join_next().await.map(flatten) {
                        first_err.get_or_insert(e);
                    }
                }
                let me = self.clone();
                let chunk = chunk.to_vec();
                tasks.spawn(async move { me.delete_batch(chunk).await });
            }
            if first_err.is_some() {
                break;
            }
            match next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = flatten(r) {
                first_err.get_or_insert(e);
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        self.abort_uploads(prefix).await?;
        Ok(count)
    }

    /// Aborts every unfinished multipart upload under `prefix`: the parts of a file a
    /// mounter was writing when it died, or of a copy the controller was making when it
    /// died, which no listing of objects shows and which cost storage until aborted.
    /// Answers how many it aborted.
    pub async fn abort_uploads(&self, prefix: &str) -> Result<u64, S3Failure> {
        let mut count = 0u64;
        let (mut key_marker, mut id_marker) = (None, None);
        loop {
            let out = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_key_marker(key_marker)
                .set_upload_id_marker(id_marker)
                .send()
                .await
                .map_err(|e| self.fail("ListMultipartUploads", Some(prefix), &e))?;
            for u in out.uploads() {
                let (Some(key), Some(id)) = (u.key(), u.upload_id()) else { continue };
                // Listed by prefix, but checked: nothing outside `prefix` is touched.
                if !key.starts_with(prefix) {
                    continue;
                }
                let r = self.client.abort_multipart_upload().bucket(&self.bucket).key(key).upload_id(id).send().await;
                match r {
                    Ok(_) => count += 1,
                    Err(e) => {
                        let f = self.fail("AbortMultipartUpload", Some(key), &e);
                        if f.kind != Kind::NotFound {
                            return Err(f);
                        }
                    }
                }
            }
            if out.is_truncated() != Some(true) {
                return Ok(count);
            }
            key_marker = out.next_key_marker().map(str::to_owned);
            id_marker = out.next_upload_id_marker().map(str::to_owned);
            if key_marker.is_none() && id_marker.is_none() {
                return Ok(count);
            }
        }
    }

    /// Reads an object's bytes; `None` if the key does not exist (a missing bucket is an
    /// error with code NoSuchBucket).
    pub async fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>, S3Failure> {
        let out = match self.client.get_object().bucket(&self.bucket).key(key).send().await {
            Ok(o) => o,
            Err(e) => {
                let f = self.fail("GetObject", Some(key), &e);
                if f.kind == Kind::NotFound && f.code != "NoSuchBucket" {
                    return Ok(None);
                }
                return Err(f);
            }
        };
        let bytes = out.body.collect().await.map_err(|e| S3Failure {
            kind: Kind::Unreachable,
            code: String::new(),
            message: format!("S3 GetObject on {}/{key}: reading the body failed: {e}", self.bucket),
        })?;
        Ok(Some(bytes.into_bytes().to_vec()))
    }

    /// Writes an object with `body`.
    pub async fn put_bytes(&self, key: &str, body: Vec<u8>) -> Result<(), S3Failure> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(ByteStream::from(body))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.fail("PutObject", Some(key), &e))
    }

    /// HeadObject: the object's size, ETag and the source ETag a copy recorded in its
    /// metadata; `None` if the key does not exist.
    pub async fn head(&self, key: &str) -> Result<Option<Head>, S3Failure> {
        match self.client.head_object().bucket(&self.bucket).key(key).send().await {
            Ok(h) => Ok(Some(Head {
                size: h.content_length().unwrap_or(0).max(0) as u64,
                etag: h.e_tag().unwrap_or_default().to_owned(),
                source_etag: h.metadata().and_then(|m| m.get(SOURCE_ETAG_META)).cloned(),
            })),
            Err(e) => {
                let f = self.fail("HeadObject", Some(key), &e);
                if f.kind == Kind::NotFound {
                    return Ok(None);
                }
                Err(f)
            }
        }
    }

    /// Whether `dst_key` of this bucket (listed as `dst`) is already a copy of `src`: the
    /// same size, and the same ETag or (a multipart copy's ETag differs from its source's
    /// on most servers) the source's ETag recorded in its metadata by the copy.
    pub async fn is_copy_of(&self, dst: &Listed, src: &Listed) -> Result<bool, S3Failure> {
        if dst.size != src.size || src.etag.is_empty() {
            return Ok(false);
        }
        if same_etag(&dst.etag, &src.etag) {
            return Ok(true);
        }
        Ok(self
            .head(&dst.key)
            .await?
            .is_some_and(|h| h.size == src.size && h.source_etag.is_some_and(|s| same_etag(&s, &src.etag))))
    }

    /// Overrides the client's bounds for one call that copies on the server.
    fn copy_config(plan: &CopyPlan) -> aws_sdk_s3::config::Builder {
        aws_sdk_s3::config::Builder::default().timeout_config(timeout_config(plan.timeouts))
    }

    /// Copies `src_bucket/src.key` to `dst_key` in this bucket on the server: objects
    /// above `plan.multipart_above` as a multipart copy. Every copy call names the version
    /// listed (`x-amz-copy-source-if-match` with `src.etag`); a source that changed
    /// meanwhile (412) is read again and copied from the start, at most
    /// `plan.source_retries` more times. Answers the bytes of the version copied.
    pub async fn copy(&self, src_bucket: &str, src: &Listed, dst_key: &str, plan: &CopyPlan) -> Result<u64, S3Failure> {
        let (mut size, mut etag) = (src.size, src.etag.clone());
        let mut changed = 0u32;
        loop {
            match self.copy_version(src_bucket, &src.key, size, &etag, dst_key, plan).await {
                Err(f) if source_changed(&f) => {
                    changed += 1;
                    if changed > plan.source_retries {
                        return Err(self.scrub(S3Failure {
                            kind: Kind::Conflict,
                            code: f.code,
                            message: format!(
                                "{src_bucket}/{} changed during each of {changed} attempts to copy it to {}/{dst_key} (the last: {}); repeat the call",
                                src.key, self.bucket, f.message
                            ),
                        }));
                    }
                    tracing::debug!(source = %format!("{src_bucket}/{}", src.key), attempt = changed, "the source changed during its copy; copying it again from the start");
                    match self.on(src_bucket).head(&src.key).await? {
                        Some(h) => (size, etag) = (h.size, h.etag),
                        None => {
                            return Err(S3Failure {
                                kind: Kind::NotFound,
                                code: "NoSuchKey".into(),
                                message: format!(
                                    "{src_bucket}/{} was deleted during its copy to {}/{dst_key}",
                                    src.key, self.bucket
                                ),
                            })
                        }
                    }
                }
                Ok(()) => return Ok(size),
                Err(mut f) => {
                    f.message = format!("{} (copying {src_bucket}/{})", f.message, src.key);
                    return Err(f);
                }
            }
        }
    }

    /// One attempt of [`Store::copy`] of the source version `etag` (of `size` bytes).
    async fn copy_version(
        &self,
        src_bucket: &str,
        src_key: &str,
        size: u64,
        etag: &str,
        dst_key: &str,
        plan: &CopyPlan,
    ) -> Result<(), S3Failure> {
        let source = copy_source(src_bucket, src_key);
        let if_match = (!etag.is_empty()).then(|| etag.to_owned());
        let meta = (!etag.is_empty()).then(|| HashMap::from([(SOURCE_ETAG_META.to_owned(), unquote(etag).to_owned())]));
        if size <= plan.multipart_above {
            return self
                .client
                .copy_object()
                .bucket(&self.bucket)
                .key(dst_key)
                .copy_source(source)
                .set_copy_source_if_match(if_match)
                .metadata_directive(MetadataDirective::Replace)
                .set_metadata(meta)
                .customize()
                .config_override(Self::copy_config(plan))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| self.fail("CopyObject", Some(dst_key), &e));
        }
        let up = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(dst_key)
            .set_metadata(meta)
            .send()
            .await
            .map_err(|e| self.fail("CreateMultipartUpload", Some(dst_key), &e))?;
        let upload_id = up.upload_id().unwrap_or_default().to_owned();
        if upload_id.is_empty() {
            return Err(S3Failure {
                kind: Kind::Refused,
                code: String::new(),
                message: format!("S3 CreateMultipartUpload on {}/{dst_key} answered no upload ID", self.bucket),
            });
        }
        let source = MultipartSource { copy_source: source, if_match, size };
        let result = self.copy_parts(&source, dst_key, &upload_id, plan).await;
        if result.is_err() {
            self.abort_upload(dst_key, &upload_id).await;
        }
        result
    }

    /// AbortMultipartUpload, best effort (logged): parts left behind cost storage until a
    /// lifecycle rule removes them.
    async fn abort_upload(&self, dst_key: &str, upload_id: &str) {
        let r =
            self.client.abort_multipart_upload().bucket(&self.bucket).key(dst_key).upload_id(upload_id).send().await;
        if let Err(e) = r {
            let f = self.fail("AbortMultipartUpload", Some(dst_key), &e);
            if f.kind != Kind::NotFound {
                tracing::warn!(bucket = %self.bucket, key = %dst_key, error = %f.message, "could not abort a failed multipart copy; its parts stay until a lifecycle rule removes them");
            }
        }
    }

    /// The parts of a multipart copy, `plan.parts_in_flight` at a time, then its completion.
    async fn copy_parts(
        &self,
        source: &MultipartSource,
        dst_key: &str,
        upload_id: &str,
        plan: &CopyPlan,
    ) -> Result<(), S3Failure> {
        let part = plan.part_bytes.max(MIN_PART);
        let mut ranges = Vec::new();
        let mut offset = 0u64;
        while offset < source.size {
            let end = (offset + part).min(source.size) - 1;
            ranges.push((ranges.len() as i32 + 1, offset, end));
            offset = end + 1;
        }
        let mut etags: Vec<Option<String>> = vec![None; ranges.len()];
        let mut tasks: JoinSet<Result<(i32, String), S3Failure>> = JoinSet::new();
        let mut first_err: Option<S3Failure> = None;
        for (number, start, end) in ranges {
            while tasks.len() >= plan.parts_in_flight.max(1) && first_err.is_none() {
                settle(tasks.join_next().await, &mut etags, &mut first_err);
            }
            if first_err.is_some() {
                break;
            }
            let (me, dst_key, upload_id, plan) = (self.clone(), dst_key.to_owned(), upload_id.to_owned(), *plan);
            let (copy_source, if_match) = (source.copy_source.clone(), source.if_match.clone());
            tasks.spawn(async move {
                let out = me
                    .client
                    .upload_part_copy()
                    .bucket(&me.bucket)
                    .key(&dst_key)
                    .upload_id(upload_id)
                    .part_number(number)
                    .copy_source(copy_source)
                    .copy_source_range(format!("bytes={start}-{end}"))
                    .set_copy_source_if_match(if_match)
                    .customize()
                    .config_override(Self::copy_config(&plan))
                    .send()
                    .await
                    .map_err(|e| me.fail("UploadPartCopy", Some(&dst_key), &e))?;
                let etag = out.copy_part_result().and_then(|r| r.e_tag()).unwrap_or_default().to_owned();
                if etag.is_empty() {
                    return Err(S3Failure {
                        kind: Kind::Refused,
                        code: String::new(),
                        message: format!(
                            "S3 UploadPartCopy on {}/{dst_key} answered no ETag for part {number}",
                            me.bucket
                        ),
                    });
                }
                Ok((number, etag))
            });
        }
        if first_err.is_some() {
            tasks.abort_all();
        }
        while let Some(r) = tasks.join_next().await {
            if !matches!(&r, Err(e) if e.is_cancelled()) {
                settle(Some(r), &mut etags, &mut first_err);
            }
        }
        if let Some(f) = first_err {
            return Err(f);
        }
        let Some(etags) = etags.into_iter().collect::<Option<Vec<String>>>() else {
            return Err(S3Failure {
                kind: Kind::Refused,
                code: String::new(),
                message: format!("a part of the multipart copy to {}/{dst_key} did not finish", self.bucket),
            });
        };
        let parts = etags
            .iter()
            .enumerate()
            .map(|(i, e)| CompletedPart::builder().part_number(i as i32 + 1).e_tag(e).build())
            .collect();
        let done = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(dst_key)
            .upload_id(upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .customize()
            .config_override(Self::copy_config(plan))
            .send()
            .await;
        match done {
            Ok(_) => Ok(()),
            // A 200 whose body the SDK cannot read as a result nor as an error (moto names
            // its root element CompleteMultipartUploadResponse). A 200 carrying an <Error>
            // (InternalError: the completion failed) has a code and is a failure. The object
            // is accepted only if it is the one just completed: its ETag is the multipart
            // ETag of exactly these parts, which an older object cannot have.
            Err(SdkError::ServiceError(ref s)) if unreadable_success(s.raw().status().as_u16(), s.err().code()) => {
                let expected = multipart_etag(&etags);
                let head = self.head(dst_key).await?;
                let got = head.as_ref().map(|h| h.etag.as_str());
                if expected.as_deref().is_some_and(|want| got.is_some_and(|g| same_etag(g, want))) {
                    Ok(())
                } else {
                    Err(S3Failure {
                        kind: Kind::Refused,
                        code: String::new(),
                        message: format!(
                            "S3 CompleteMultipartUpload on {}/{dst_key} answered 200 with a body that could not be read, and the object there is not the one completed (ETag {:?}, expected {:?})",
                            self.bucket,
                            got.unwrap_or("none: no object"),
                            expected.as_deref().unwrap_or("unknown: a part's ETag is not an MD5")
                        ),
                    })
                }
            }
            Err(e) => Err(self.fail("CompleteMultipartUpload", Some(dst_key), &e)),
        }
    }

    /// The bucket names this client's credentials can see that start with `prefix`.
    pub async fn list_buckets(&self, prefix: &str) -> Result<Vec<String>, S3Failure> {
        let mut names = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let out = self
                .client
                .list_buckets()
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.scrub(classify("ListBuckets", "the account", &e)))?;
            names.extend(
                out.buckets().iter().filter_map(|b| b.name()).filter(|n| n.starts_with(prefix)).map(str::to_owned),
            );
            match out.continuation_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_owned()),
                _ => return Ok(names),
            }
        }
    }
}

/// The source of a multipart copy.
struct MultipartSource {
    /// The x-amz-copy-source header.
    copy_source: String,
    /// The ETag every part is copied from (x-amz-copy-source-if-match), if known.
    if_match: Option<String>,
    size: u64,
}

/// A part copy task's result: its number and ETag.
type PartResult = Result<Result<(i32, String), S3Failure>, tokio::task::JoinError>;

/// Records a finished part (its ETag) or the first failure (a panicked part is one).
fn settle(r: Option<PartResult>, etags: &mut [Option<String>], first_err: &mut Option<S3Failure>) {
    match r.map(flatten) {
        Some(Ok((n, etag))) => {
            if let Some(slot) = usize::try_from(n - 1).ok().and_then(|i| etags.get_mut(i)) {
                *slot = Some(etag);
            }
        }
        Some(Err(f)) => {
            first_err.get_or_insert(f);
        }
        None => {}
    }
}

/// Whether a copy failed because its source is no longer the version named
/// (x-amz-copy-source-if-match answered 412 Precondition Failed).
pub fn source_changed(f: &S3Failure) -> bool {
    f.kind == Kind::Conflict && (f.code == "PreconditionFailed" || f.code.is_empty())
}

/// An ETag without its quotes.
pub fn unquote(etag: &str) -> &str {
    etag.trim().trim_matches('"')
}

/// Whether two ETags are the same (quotes and hex case aside).
pub fn same_etag(a: &str, b: &str) -> bool {
    let (a, b) = (unquote(a), unquote(b));
    !a.is_empty() && a.eq_ignore_ascii_case(b)
}

/// The ETag S3 gives an object completed from parts with these ETags: the MD5 of the
/// concatenated binary MD5s of the parts, in hex, then `-` and the number of parts (the
/// form AWS, moto and garage use). `None` if a part's ETag is not a hex MD5.
pub fn multipart_etag(parts: &[String]) -> Option<String> {
    let mut joined = Vec::with_capacity(parts.len() * 16);
    for p in parts {
        let bytes = crate::md5::unhex(unquote(p)).filter(|b| b.len() == 16)?;
        joined.extend_from_slice(&bytes);
    }
    Some(format!("{}-{}", crate::md5::hex_digest(&joined), parts.len()))
}

/// Whether a CompleteMultipartUpload error is a 200 whose body is neither a result nor an
/// `<Error>` with a code: the only case where the object itself is asked whether the
/// completion worked. A 200 with an error code (S3 answers InternalError this way) is a
/// failure.
pub fn unreadable_success(status: u16, code: Option<&str>) -> bool {
    status == 200 && code.is_none_or(str::is_empty)
}

/// A task's result with a panic turned into a failure.
pub fn flatten<T>(r: Result<Result<T, S3Failure>, tokio::task::JoinError>) -> Result<T, S3Failure> {
    r.unwrap_or_else(|e| {
        Err(S3Failure { kind: Kind::Refused, code: String::new(), message: format!("an S3 task failed: {e}") })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_sources_are_percent_encoded() {
        assert_eq!(copy_source("b", "ferrovol/volumes/v/fs/a b+c"), "b/ferrovol/volumes/v/fs/a%20b%2Bc");
        assert_eq!(copy_source("b", "x/é"), "b/x/%C3%A9");
        assert_eq!(copy_source("b", "k?x=1&y#z"), "b/k%3Fx%3D1%26y%23z");
    }

    #[test]
    fn multipart_etags_are_the_md5_of_the_part_md5s() {
        // Two parts whose MD5s are those of "a" and "b".
        let parts = vec![format!("\"{}\"", crate::md5::hex_digest(b"a")), crate::md5::hex_digest(b"b")];
        let mut joined = crate::md5::digest(b"a").to_vec();
        joined.extend_from_slice(&crate::md5::digest(b"b"));
        assert_eq!(multipart_etag(&parts), Some(format!("{}-2", crate::md5::hex_digest(&joined))));
        assert_eq!(multipart_etag(&["\"not-an-md5\"".to_string()]), None);
        assert!(same_etag("\"ABC-2\"", "abc-2"));
        assert!(!same_etag("", ""));
    }

    #[test]
    fn only_a_codeless_200_asks_the_object() {
        assert!(unreadable_success(200, None), "moto's unreadable success");
        assert!(unreadable_success(200, Some("")));
        assert!(!unreadable_success(200, Some("InternalError")), "an <Error> in a 200 is a failure");
        assert!(!unreadable_success(500, None));
        assert!(!unreadable_success(400, Some("InvalidPart")));
    }
}
