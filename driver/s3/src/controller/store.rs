//! The S3 calls the controller makes on one bucket, each classified into an [`S3Failure`]
//! that names the call, the bucket and the key, with the secret key scrubbed from every
//! message. Keys are always built by the caller from [`crate::layout`] and checked names.

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    BucketLocationConstraint, CompletedMultipartUpload, CompletedPart, CreateBucketConfiguration, Delete,
    ObjectIdentifier,
};
use tokio::task::JoinSet;

use crate::error::{classify, Kind, S3Failure};

/// The most keys one DeleteObjects call takes (S3's limit).
pub const DELETE_BATCH: usize = 1000;

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
    /// once. Answers how many objects it asked to delete.
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
        match first_err {
            Some(e) => Err(e),
            None => Ok(count),
        }
    }

    /// Copies `src_bucket/src_key` (of `size` bytes) to `dst_key` in this bucket on the
    /// server; objects larger than `part_above` go as a multipart copy in `part` pieces.
    pub async fn copy(
        &self,
        src_bucket: &str,
        src_key: &str,
        size: u64,
        dst_key: &str,
        part_above: u64,
        part: u64,
    ) -> Result<(), S3Failure> {
        let source = copy_source(src_bucket, src_key);
        if size <= part_above {
            return self
                .client
                .copy_object()
                .bucket(&self.bucket)
                .key(dst_key)
                .copy_source(source)
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
            .send()
            .await
            .map_err(|e| self.fail("CreateMultipartUpload", Some(dst_key), &e))?;
        let upload_id = up.upload_id().unwrap_or_default().to_owned();
        let result = self.copy_parts(&source, size, dst_key, &upload_id, part.max(5 << 20)).await;
        if result.is_err() {
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(dst_key)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result
    }

    async fn copy_parts(
        &self,
        source: &str,
        size: u64,
        dst_key: &str,
        upload_id: &str,
        part: u64,
    ) -> Result<(), S3Failure> {
        let mut parts = Vec::new();
        let mut offset = 0u64;
        let mut number = 1i32;
        while offset < size {
            let end = (offset + part).min(size) - 1;
            let out = self
                .client
                .upload_part_copy()
                .bucket(&self.bucket)
                .key(dst_key)
                .upload_id(upload_id)
                .part_number(number)
                .copy_source(source)
                .copy_source_range(format!("bytes={offset}-{end}"))
                .send()
                .await
                .map_err(|e| self.fail("UploadPartCopy", Some(dst_key), &e))?;
            let etag = out.copy_part_result().and_then(|r| r.e_tag()).unwrap_or_default().to_owned();
            parts.push(CompletedPart::builder().part_number(number).e_tag(etag).build());
            offset = end + 1;
            number += 1;
        }
        let done = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(dst_key)
            .upload_id(upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send()
            .await;
        match done {
            Ok(_) => Ok(()),
            // A 200 whose body the SDK cannot read (moto names its root element
            // CompleteMultipartUploadResponse): the object says whether it worked.
            Err(aws_sdk_s3::error::SdkError::ServiceError(ref s)) if s.raw().status().as_u16() == 200 => {
                let head = self
                    .client
                    .head_object()
                    .bucket(&self.bucket)
                    .key(dst_key)
                    .send()
                    .await
                    .map_err(|e| self.fail("HeadObject", Some(dst_key), &e))?;
                if head.content_length() == Some(size as i64) {
                    Ok(())
                } else {
                    Err(S3Failure {
                        kind: Kind::Refused,
                        code: String::new(),
                        message: format!(
                            "S3 CompleteMultipartUpload on {}/{dst_key} answered 200 with an unreadable body and the object is not whole",
                            self.bucket
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
}
