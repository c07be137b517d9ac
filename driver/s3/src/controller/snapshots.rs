//! Snapshots: server-side copies of a volume's objects under `ferrovol/snapshots/<local>/`
//! in the source volume's bucket, independent of the volume once made.

use std::collections::HashMap;

use ferrovol_core::error::{Error, Result};
use ferrovol_core::ids::{printable, LocalName, SnapshotId, VolumeId};

use super::store::{no_bucket, Store};
use super::{fail, now, parallel, snapshot_id, S3Controller};
use crate::endpoint::S3Endpoint;
use crate::layout;
use crate::record::{S3SnapshotRecord, S3VolumeRecord, VolumeState, VERSION};

/// A snapshot as the controller answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Snapshot {
    pub id: SnapshotId,
    pub record: S3SnapshotRecord,
}

impl S3Controller {
    /// CreateSnapshot: copies the volume's objects (16 at a time) under the snapshot's
    /// prefix, with its record `ready: false` during the copy. A repeat of the same name
    /// and source answers the same snapshot (finishing an interrupted copy); the same name
    /// for another source in the bucket is ALREADY_EXISTS.
    pub async fn create_snapshot(
        &self,
        name: &str,
        local: LocalName,
        source: &VolumeId,
        secrets: &HashMap<String, String>,
    ) -> Result<S3Snapshot> {
        let bucket = layout::volume_bucket(source).to_owned();
        let ep = self.endpoint(secrets)?;
        let id = snapshot_id(&bucket, &local)?;
        let keys = [format!("s3-snapname:{name}"), format!("s3-snap:{id}"), format!("s3-vol:{source}")];
        let guards = self.guard(&keys, || format!("snapshot {:?}", printable(name)))?;
        let (me, name, source) = (self.clone(), name.to_owned(), source.clone());
        self.detached(guards, id.to_string(), async move { me.snapshot_inner(&name, id, &source, ep).await }).await
    }

    async fn snapshot_inner(
        &self,
        name: &str,
        id: SnapshotId,
        source: &VolumeId,
        ep: S3Endpoint,
    ) -> Result<S3Snapshot> {
        let store = self.store(&ep, &id.node().to_string());
        let key = layout::snapshot_record_key(id.local());
        let vol_missing = |reason: String| Error::VolumeNotFound { volume: source.to_string(), reason };
        let existing = match store.get_json::<S3SnapshotRecord>(&key).await {
            Ok(r) => {
                self.remember(&store.bucket, &ep);
                r
            }
            Err(f) if no_bucket(&f) => return Err(vol_missing(format!("bucket {} does not exist", store.bucket))),
            Err(f) => return Err(fail(f)),
        };
        if let Some(rec) = &existing {
            if rec.name != name || rec.source_volume_id != source.to_string() {
                return Err(Error::NameConflict {
                    kind: "snapshot",
                    name: printable(name),
                    reason: format!("it is a snapshot of {} (named {:?})", rec.source_volume_id, printable(&rec.name)),
                });
            }
            if rec.ready {
                return Ok(S3Snapshot { id, record: rec.clone() });
            }
        }
        let vol =
            match store.get_json::<S3VolumeRecord>(&layout::volume_record_key(source.local())).await.map_err(fail)? {
                Some(v) => v,
                None => return Err(vol_missing("no record in its bucket".into())),
            };
        if vol.state != VolumeState::Ready {
            return Err(Error::precondition(format!("volume {source}"), "it is being created or deleted"));
        }
        let record = match existing {
            Some(rec) => rec,
            None => {
                let (created_unix, created_nanos) = now();
                let rec = S3SnapshotRecord {
                    version: VERSION,
                    name: name.to_owned(),
                    id: id.to_string(),
                    source_volume_id: source.to_string(),
                    size_bytes: 0,
                    ready: false,
                    created_unix,
                    created_nanos,
                };
                store.put_json(&key, &rec, true).await.map_err(fail)?;
                rec
            }
        };
        let copied = self
            .copy_prefix(
                &store,
                &layout::volume_data_prefix(source.local()),
                &store,
                &layout::snapshot_data_prefix(id.local()),
            )
            .await;
        let done = match copied {
            Ok(size_bytes) => {
                let ready = S3SnapshotRecord { ready: true, size_bytes, ..record };
                store.put_json(&key, &ready, false).await.map(|()| ready).map_err(fail)
            }
            Err(e) => Err(e),
        };
        match done {
            Ok(record) => Ok(S3Snapshot { id, record }),
            Err(e) => {
                if let Err(c) = self.remove_snapshot(&store, &id).await {
                    tracing::warn!(snapshot = %id, error = %c, "could not remove the half-made snapshot; a repeat of CreateSnapshot or DeleteSnapshot will");
                }
                Err(e)
            }
        }
    }

    /// Removes a snapshot's objects, its record last, then an own bucket left empty.
    async fn remove_snapshot(&self, store: &Store, id: &SnapshotId) -> Result<()> {
        let key = layout::snapshot_record_key(id.local());
        store
            .delete_prefix(&layout::snapshot_prefix(id.local()), Some(&key), self.inner.tuning.delete_in_flight)
            .await
            .map_err(fail)?;
        store.delete(&key).await.map_err(fail)?;
        self.remove_own_bucket_if_empty(store).await;
        Ok(())
    }

    /// DeleteSnapshot: unknown or in a missing bucket is OK. The last object of a volume's
    /// own bucket going takes the bucket with it.
    pub async fn delete_snapshot(&self, id: &SnapshotId, secrets: &HashMap<String, String>) -> Result<()> {
        let bucket = layout::snapshot_bucket(id).to_owned();
        let ep = self.endpoint(secrets)?;
        let guards = self.guard(&[format!("s3-snap:{id}")], || format!("snapshot {id}"))?;
        let (me, id) = (self.clone(), id.clone());
        self.detached(guards, id.to_string(), async move {
            let store = me.store(&ep, &bucket);
            match store.head_bucket().await {
                Err(f) if no_bucket(&f) => return Ok(()),
                Err(f) => return Err(fail(f)),
                Ok(()) => me.remember(&bucket, &ep),
            }
            me.remove_snapshot(&store, &id).await
        })
        .await
    }

    /// One snapshot: NOT_FOUND if it or its bucket does not exist.
    pub async fn get_snapshot(&self, id: &SnapshotId, ep: &S3Endpoint) -> Result<S3Snapshot> {
        let store = self.store(ep, layout::snapshot_bucket(id));
        let not_found = |reason: String| Error::SnapshotNotFound { snapshot: id.to_string(), reason };
        match store.get_json::<S3SnapshotRecord>(&layout::snapshot_record_key(id.local())).await {
            Ok(Some(record)) => {
                self.remember(&store.bucket, ep);
                Ok(S3Snapshot { id: id.clone(), record })
            }
            Ok(None) => Err(not_found("no record in its bucket".into())),
            Err(f) if no_bucket(&f) => Err(not_found(format!("bucket {} does not exist", store.bucket))),
            Err(f) => Err(fail(f)),
        }
    }

    /// Every snapshot of the buckets known now (and the own buckets ListBuckets shows to
    /// their endpoints and to `extra`, the request's secrets if any), sorted by ID.
    pub async fn list_snapshots(&self, extra: Option<&S3Endpoint>) -> Vec<S3Snapshot> {
        let mut out = Vec::new();
        for (bucket, ep) in self.listing_buckets(extra).await {
            let store = self.store(&ep, &bucket);
            let prefix = format!("{}snapshots/", layout::ROOT);
            let locals = match store.list_dirs(&prefix).await {
                Ok(l) => l,
                Err(f) => {
                    if !no_bucket(&f) {
                        tracing::warn!(bucket = %bucket, error = %f.message, "cannot list the bucket's snapshots; ListSnapshots leaves them out");
                    }
                    continue;
                }
            };
            let ids: Vec<SnapshotId> = locals
                .iter()
                .filter_map(|l| LocalName::parse(l))
                .filter_map(|l| snapshot_id(&bucket, &l).ok())
                .collect();
            let me = self.clone();
            let found = parallel(ids, self.inner.tuning.list_parallel, |id| {
                let (me, ep) = (me.clone(), ep.clone());
                async move { me.get_snapshot(&id, &ep).await }
            })
            .await;
            for r in found {
                match r.map_err(|e| Error::system("reading a snapshot's record", &bucket, e)).and_then(|r| r) {
                    Ok(s) => out.push(s),
                    Err(e) if e.code() == ferrovol_core::error::Code::NotFound => {}
                    Err(e) => {
                        tracing::warn!(bucket = %bucket, error = %e, "cannot read a snapshot's record; ListSnapshots leaves it out")
                    }
                }
            }
        }
        out.sort_by_key(|s| s.id.to_string());
        out
    }
}
