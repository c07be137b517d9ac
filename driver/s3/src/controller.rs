//! The controller's S3 operations: volumes as a bucket of their own or a prefix of a shared
//! bucket, snapshots and clones as server-side copies, quotas and publications in records
//! and marker objects beside the data (the rules are in docs/S3.md).
//!
//! Every operation takes the endpoint and credentials of the request's secrets; the
//! controller remembers, in memory only, the last endpoint seen for each bucket, so that
//! ControllerGetVolume and ListVolumes (which CSI gives no secrets) can still look. Each
//! change runs detached from the RPC that asked for it, under an in-flight guard: a CO
//! that gives up on a slow copy gets ABORTED on its retry while the copy goes on, then the
//! finished volume. All S3 calls are bounded by the client's [`Timeouts`].

mod snapshots;
pub mod store;
mod volumes;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use ferrovol_core::error::{Error, Result};
use ferrovol_core::guard::{InFlight, InFlightGuard};
use ferrovol_core::ids::{Family, LocalName, NodeId, SnapshotId, VolumeId};
use ferrovol_core::volume::Condition;
use tokio::task::{JoinError, JoinSet};

use crate::client::{build_client, Timeouts};
use crate::endpoint::S3Endpoint;
use crate::error::{Kind, S3Failure};
use crate::record::{S3SnapshotRecord, S3VolumeRecord};
use store::Store;

pub use snapshots::S3Snapshot;
pub use volumes::{S3Volume, S3VolumeStatus};

/// Objects larger than this are copied as multipart copies (UploadPartCopy), so that no
/// single call copies more than [`COPY_PART_BYTES`] (CopyObject's own limit is 5 GiB).
pub const MULTIPART_COPY_ABOVE: u64 = 256 << 20;
/// The part size of a multipart copy.
pub const COPY_PART_BYTES: u64 = 64 << 20;
/// UploadPartCopy calls in flight for one object.
pub const COPY_PARTS_IN_FLIGHT: usize = 4;
/// The least time one attempt of a copy call (CopyObject of up to
/// [`MULTIPART_COPY_ABOVE`], UploadPartCopy of [`COPY_PART_BYTES`], or the completion) may
/// take, whatever `--s3-timeout` says: the server copies the bytes before it answers, and
/// 120 s lets a 64 MiB part through at about 0.5 MiB/s (a 256 MiB object at about 2 MiB/s),
/// even with 16 objects × 4 parts copying at once on a busy server.
pub const COPY_ATTEMPT_MIN: std::time::Duration = std::time::Duration::from_secs(120);
/// How many more times an object whose source changed during its copy is copied again.
pub const COPY_SOURCE_RETRIES: u32 = 3;

/// How much the controller does at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Objects copied at once during a snapshot, restore or clone.
    pub copy_parallel: usize,
    /// DeleteObjects calls (of 1000 keys each) in flight during a delete.
    pub delete_in_flight: usize,
    /// Objects larger than this are copied as multipart copies.
    pub multipart_copy_above: u64,
    /// The part size of a multipart copy.
    pub copy_part_bytes: u64,
    /// UploadPartCopy calls in flight for one object.
    pub copy_parts_in_flight: usize,
    /// The least per-attempt bound of a copy call ([`Timeouts::for_copies`]).
    pub copy_attempt_min: std::time::Duration,
    /// Copies again from the start of an object whose source changed meanwhile.
    pub copy_source_retries: u32,
    /// Record reads in flight while listing volumes and snapshots.
    pub list_parallel: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            copy_parallel: 16,
            delete_in_flight: 4,
            multipart_copy_above: MULTIPART_COPY_ABOVE,
            copy_part_bytes: COPY_PART_BYTES,
            copy_parts_in_flight: COPY_PARTS_IN_FLIGHT,
            copy_attempt_min: COPY_ATTEMPT_MIN,
            copy_source_retries: COPY_SOURCE_RETRIES,
            list_parallel: 16,
        }
    }
}

/// The S3 side of the CSI controller. Cheap to clone; clones share their state.
#[derive(Clone)]
pub struct S3Controller {
    inner: Arc<Inner>,
}

struct Inner {
    timeouts: Timeouts,
    tuning: Tuning,
    /// bucket → the endpoint of the last request with secrets whose S3 call on that
    /// bucket succeeded. Memory only.
    known: Mutex<HashMap<String, S3Endpoint>>,
    /// One client per distinct endpoint and credentials (connection reuse).
    clients: Mutex<Vec<(S3Endpoint, aws_sdk_s3::Client)>>,
    inflight: InFlight,
}

impl std::fmt::Debug for S3Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let buckets: Vec<String> = self.known().keys().cloned().collect();
        f.debug_struct("S3Controller")
            .field("timeouts", &self.inner.timeouts)
            .field("known_buckets", &buckets)
            .finish_non_exhaustive()
    }
}

/// Clients kept at most (distinct endpoint and credential pairs).
const MAX_CLIENTS: usize = 64;

impl S3Controller {
    pub fn new(timeouts: Timeouts) -> Self {
        Self::with_tuning(timeouts, Tuning::default())
    }

    pub fn with_tuning(timeouts: Timeouts, tuning: Tuning) -> Self {
        S3Controller {
            inner: Arc::new(Inner {
                timeouts,
                tuning,
                known: Mutex::default(),
                clients: Mutex::default(),
                inflight: InFlight::default(),
            }),
        }
    }

    pub fn timeouts(&self) -> Timeouts {
        self.inner.timeouts
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<String, S3Endpoint>> {
        self.inner.known.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers that `ep` reaches `bucket` (memory only; never persisted or logged). The
    /// controller calls it only after an S3 call on `bucket` with `ep` succeeded.
    pub fn remember(&self, bucket: &str, ep: &S3Endpoint) {
        let mut known = self.known();
        if known.get(bucket) != Some(ep) {
            known.insert(bucket.to_owned(), ep.clone());
        }
    }

    /// The endpoint last seen for `bucket`.
    pub fn known_endpoint(&self, bucket: &str) -> Option<S3Endpoint> {
        self.known().get(bucket).cloned()
    }

    /// The endpoint of a request's secrets: a missing key is INVALID_ARGUMENT naming it.
    /// Nothing is remembered until an S3 call on the bucket with it succeeds.
    pub fn endpoint(&self, secrets: &HashMap<String, String>) -> Result<S3Endpoint> {
        S3Endpoint::from_secrets("secrets", secrets)
    }

    /// The request's secrets if it carries any, else the endpoint remembered for `bucket`;
    /// neither is INVALID_ARGUMENT naming the missing keys (for calls a CO may send
    /// without secrets: GetSnapshot, ListSnapshots, ValidateVolumeCapabilities).
    pub fn endpoint_or_known(&self, bucket: &str, secrets: &HashMap<String, String>) -> Result<S3Endpoint> {
        if secrets.is_empty() {
            if let Some(ep) = self.known_endpoint(bucket) {
                return Ok(ep);
            }
            return Err(Error::invalid(
                "secrets",
                format!(
                    "the request carries no S3 secret (accessKeyID, secretAccessKey, endpoint) and none was seen for bucket {bucket} since the controller started"
                ),
            ));
        }
        self.endpoint(secrets)
    }

    fn client(&self, ep: &S3Endpoint) -> aws_sdk_s3::Client {
        let mut clients = self.inner.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, c)) = clients.iter().find(|(e, _)| e == ep) {
            return c.clone();
        }
        if clients.len() >= MAX_CLIENTS {
            clients.remove(0);
        }
        let c = build_client(ep, self.inner.timeouts);
        clients.push((ep.clone(), c.clone()));
        c
    }

    /// A client for `ep` on `bucket`.
    pub fn store(&self, ep: &S3Endpoint, bucket: &str) -> Store {
        Store::new(self.client(ep), bucket, &ep.secret_access_key)
    }

    fn guard(&self, keys: &[String], what: impl FnOnce() -> String) -> Result<Vec<InFlightGuard>> {
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        self.inner.inflight.try_acquire_all(&refs, what)
    }

    /// Runs `work` on a task of its own holding `guards`, so that it finishes even if the
    /// RPC that started it is cancelled.
    async fn detached<T: Send + 'static>(
        &self,
        guards: Vec<InFlightGuard>,
        what: String,
        work: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let handle = tokio::spawn(async move {
            let _guards = guards;
            work.await
        });
        handle.await.map_err(|e| Error::system("S3 operation", what, e))?
    }

    /// The endpoints of every bucket known now, and the buckets with each.
    fn known_pairs(&self) -> Vec<(String, S3Endpoint)> {
        let mut v: Vec<_> = self.known().iter().map(|(b, e)| (b.clone(), e.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The buckets to look into for a listing: every known one, and the driver's own buckets
    /// (`fv-*` holding our marker `ferrovol/bucket.json`) that ListBuckets shows to each
    /// known endpoint and to `extra`; a bucket found this way is remembered once its marker
    /// was read. An endpoint whose ListBuckets is refused contributes
    /// only its known buckets (logged at debug); one that does not answer contributes none
    /// (logged at warn), so that a dead endpoint costs a listing one timeout, not one per
    /// bucket.
    async fn listing_buckets(&self, extra: Option<&S3Endpoint>) -> Vec<(String, S3Endpoint)> {
        let mut pairs = self.known_pairs();
        let mut endpoints: Vec<S3Endpoint> = Vec::new();
        for ep in pairs.iter().map(|(_, e)| e).chain(extra) {
            if !endpoints.contains(ep) {
                endpoints.push(ep.clone());
            }
        }
        let me = self.clone();
        let found = parallel(endpoints, 8, |ep| {
            let store = me.store(&ep, "");
            async move {
                let r = store.list_buckets("fv-").await;
                (ep, r)
            }
        })
        .await;
        let mut candidates: Vec<(String, S3Endpoint)> = Vec::new();
        for r in found {
            let (ep, r) = match r {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(error = %e, "a ListBuckets task failed; its endpoint's own buckets are left out");
                    continue;
                }
            };
            match r {
                Ok(names) => {
                    for n in names {
                        if !pairs.iter().chain(&candidates).any(|(b, _)| *b == n)
                            && ferrovol_core::params::is_bucket_name(&n)
                        {
                            candidates.push((n, ep.clone()));
                        }
                    }
                }
                Err(f) if f.kind == Kind::Unreachable => {
                    tracing::warn!(endpoint = %ep.endpoint, error = %f.message, "S3 endpoint unreachable; its buckets are left out of the listing");
                    pairs.retain(|(_, e)| *e != ep);
                }
                Err(f) => {
                    tracing::debug!(endpoint = %ep.endpoint, error = %f.message, "ListBuckets refused; listing known buckets only")
                }
            }
        }
        // Only buckets that hold our marker are ours: anyone may name a bucket fv-*.
        let marked = parallel(candidates, 8, |(bucket, ep)| {
            let store = me.store(&ep, &bucket);
            async move {
                let r = store.get_json::<crate::record::BucketMarker>(crate::layout::BUCKET_MARKER).await;
                (bucket, ep, r)
            }
        })
        .await;
        for r in marked {
            match r {
                Ok((bucket, ep, Ok(Some(_)))) => {
                    self.remember(&bucket, &ep);
                    pairs.push((bucket, ep));
                }
                Ok((bucket, _, Ok(None))) => {
                    tracing::debug!(bucket = %bucket, "bucket fv-* without our marker left out of the listing")
                }
                Ok((bucket, _, Err(f))) => {
                    tracing::debug!(bucket = %bucket, error = %f.message, "cannot read the marker of an fv-* bucket; left out of the listing")
                }
                Err(e) => tracing::error!(error = %e, "a marker check failed; its bucket is left out of the listing"),
            }
        }
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        pairs
    }

    /// How this controller copies one object.
    pub(crate) fn copy_plan(&self) -> store::CopyPlan {
        let t = self.inner.tuning;
        store::CopyPlan {
            multipart_above: t.multipart_copy_above,
            part_bytes: t.copy_part_bytes,
            parts_in_flight: t.copy_parts_in_flight,
            timeouts: self.inner.timeouts.for_copies(t.copy_attempt_min),
            source_retries: t.copy_source_retries,
        }
    }
}

/// The driver error for an S3 failure met while working on `object`.
pub(crate) fn fail(f: S3Failure) -> Error {
    f.into_error()
}

/// The volume ID of `local` in `bucket`.
pub(crate) fn volume_id(bucket: &str, local: &LocalName) -> Result<VolumeId> {
    Ok(VolumeId::new(Family::S3, bucket_node(bucket)?, local.clone()))
}

/// The snapshot ID of `local` in `bucket`.
pub(crate) fn snapshot_id(bucket: &str, local: &LocalName) -> Result<SnapshotId> {
    Ok(SnapshotId::new(Family::S3, bucket_node(bucket)?, local.clone()))
}

fn bucket_node(bucket: &str) -> Result<NodeId> {
    NodeId::parse(bucket)
        .map_err(|_| Error::invalid("parameters", format!("bucket {bucket:?} cannot be part of an ID")))
}

/// Seconds and nanoseconds since the epoch.
pub(crate) fn now() -> (i64, i32) {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos() as i32)
}

/// Runs `f` on each item, each on a task of its own, with at most `n` at once; answers the
/// results in input order, a task that panicked as its JoinError (never dropped).
pub(crate) async fn parallel<I, T, F, Fut>(items: Vec<I>, n: usize, f: F) -> Vec<std::result::Result<T, JoinError>>
where
    I: Send + 'static,
    T: Send + 'static,
    F: Fn(I) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    let mut index: HashMap<tokio::task::Id, usize> = HashMap::new();
    let mut out: Vec<Option<std::result::Result<T, JoinError>>> = Vec::with_capacity(items.len());
    out.resize_with(items.len(), || None);
    for (i, item) in items.into_iter().enumerate() {
        while tasks.len() >= n.max(1) {
            if let Some(r) = tasks.join_next().await {
                settle(r, &index, &mut out);
            }
        }
        let fut = f(item);
        let handle = tasks.spawn(async move { (i, fut.await) });
        index.insert(handle.id(), i);
    }
    while let Some(r) = tasks.join_next().await {
        settle(r, &index, &mut out);
    }
    out.into_iter().flatten().collect()
}

/// Puts a task's result (or its JoinError) at its input's place.
fn settle<T>(
    r: std::result::Result<(usize, T), JoinError>,
    index: &HashMap<tokio::task::Id, usize>,
    out: &mut [Option<std::result::Result<T, JoinError>>],
) {
    let (i, v) = match r {
        Ok((i, v)) => (Some(i), Ok(v)),
        Err(e) => (index.get(&e.id()).copied(), Err(e)),
    };
    if let Some(slot) = i.and_then(|i| out.get_mut(i)) {
        *slot = Some(v);
    }
}

/// A copy job: the source object, the destination key, and what is there already.
struct CopyJob {
    src: store::Listed,
    dst_key: String,
    existing: Option<store::Listed>,
}

impl S3Controller {
    /// Copies every object under `src_prefix` of `src` to `dst_prefix` of `dst` on the
    /// server, `copy_parallel` objects at a time, each tied to the version listed. Objects
    /// already at the destination as copies of the same source version (an earlier,
    /// interrupted attempt: same size, and same ETag or the source ETag the copy recorded)
    /// are not copied again, and objects at the destination the source does not have are
    /// removed. Answers the bytes the destination holds. Any object that could not be
    /// copied (a task that panicked included) fails the whole copy.
    pub(crate) async fn copy_prefix(
        &self,
        src: &Store,
        src_prefix: &str,
        dst: &Store,
        dst_prefix: &str,
    ) -> Result<u64> {
        let source = src.list(src_prefix).await.map_err(fail)?;
        let existing = dst.list(dst_prefix).await.map_err(fail)?;
        let mut jobs: Vec<CopyJob> = Vec::new();
        for o in &source {
            let Some(rest) = o.key.strip_prefix(src_prefix) else { continue };
            let dst_key = format!("{dst_prefix}{rest}");
            let there = existing.iter().find(|e| e.key == dst_key).cloned();
            jobs.push(CopyJob { src: o.clone(), dst_key, existing: there });
        }
        let extra: Vec<String> =
            existing.iter().filter(|e| !jobs.iter().any(|j| j.dst_key == e.key)).map(|e| e.key.clone()).collect();
        let (t, plan) = (self.inner.tuning, self.copy_plan());
        let src_bucket = src.bucket.clone();
        let results = parallel(jobs, t.copy_parallel, |job| {
            let dst = dst.clone();
            let sb = src_bucket.clone();
            async move {
                if let Some(there) = &job.existing {
                    if dst.is_copy_of(there, &job.src).await? {
                        return Ok(there.size);
                    }
                }
                dst.copy(&sb, &job.src, &job.dst_key, &plan).await
            }
        })
        .await;
        let mut total = 0u64;
        for r in results {
            match r {
                Ok(Ok(bytes)) => total += bytes,
                Ok(Err(f)) => return Err(fail(f)),
                Err(e) => return Err(Error::system("S3 copy", format!("an object of bucket {}", dst.bucket), e)),
            }
        }
        for chunk in extra.chunks(store::DELETE_BATCH) {
            dst.delete_batch(chunk.to_vec()).await.map_err(fail)?;
        }
        Ok(total)
    }
}

/// The condition of a volume whose record says `state`.
pub(crate) fn state_condition(rec: &S3VolumeRecord) -> Condition {
    match rec.state {
        crate::record::VolumeState::Ready => Condition::healthy(),
        crate::record::VolumeState::Creating => Condition::abnormal(
            "the volume's content copy (restore or clone) did not finish; repeat CreateVolume or delete it",
        ),
        crate::record::VolumeState::Deleting => {
            Condition::abnormal("DeleteVolume began removing the volume's objects and did not finish; repeat it")
        }
    }
}

/// Whether a failure means the thing is simply not there.
pub(crate) fn is_not_found(f: &S3Failure) -> bool {
    f.kind == Kind::NotFound
}

/// Re-exported for callers that hold snapshot records.
pub type SnapshotRecord = S3SnapshotRecord;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parallel_keeps_order_and_reports_a_panicked_task() {
        let out = parallel((0..20u32).collect(), 3, |i| async move {
            tokio::time::sleep(std::time::Duration::from_millis(u64::from(20 - i))).await;
            assert!(i != 7, "task 7 panics");
            i * 2
        })
        .await;
        assert_eq!(out.len(), 20, "no task is dropped");
        for (i, r) in out.iter().enumerate() {
            match r {
                Ok(v) => assert_eq!(*v, i as u32 * 2),
                Err(e) => assert!(i == 7 && e.is_panic(), "{i}: {e}"),
            }
        }
        assert!(out[7].is_err(), "the panic is reported at its place");
    }
}
