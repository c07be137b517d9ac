//! Volumes: create (empty, restore, clone), delete, expand, publish, look up and list.

use std::collections::HashMap;

use ferrovol_core::agent::{NewVolume, Source};
use ferrovol_core::error::{Error, Result};
use ferrovol_core::ids::{printable, NodeId, VolumeId};
use ferrovol_core::volume::{CapacityRange, Condition, MIB};

use super::store::{no_bucket, Store};
use super::{fail, is_not_found, now, parallel, state_condition, volume_id, S3Controller};
use crate::endpoint::S3Endpoint;
use crate::error::Kind;
use crate::layout;
use crate::record::{BucketMarker, PublishMarker, S3VolumeRecord, VolumeState, VERSION};

/// A volume as the controller answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Volume {
    pub id: VolumeId,
    pub bucket: String,
    pub record: S3VolumeRecord,
    /// Nodes it is ControllerPublished to, sorted.
    pub published: Vec<String>,
}

/// A volume with its health, as GetVolume and ListVolumes answer it. `record` is `None`
/// when it could not be read (no credentials known, or S3 unreachable): the condition
/// says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3VolumeStatus {
    pub id: VolumeId,
    pub bucket: String,
    pub record: Option<S3VolumeRecord>,
    pub published: Vec<String>,
    pub condition: Condition,
}

/// The smallest quota a volume gets.
pub const MIN_QUOTA: u64 = MIB;

fn source_string(s: &Option<Source>) -> Option<String> {
    s.as_ref().map(|s| match s {
        Source::Snapshot(id) => id.to_string(),
        Source::Volume(id) => id.to_string(),
    })
}

/// Why an existing record is not the volume a repeated CreateVolume asks for.
fn incompatibility(rec: &S3VolumeRecord, new: &NewVolume) -> Option<String> {
    let params = new.params.identity();
    if rec.name != new.name {
        return Some(format!("its prefix holds volume {:?}", printable(&rec.name)));
    }
    if rec.parameters != params {
        return Some(format!("it was created with parameters {:?}, this request has {:?}", rec.parameters, params));
    }
    let source = source_string(&new.source);
    if rec.source != source {
        return Some(format!(
            "it was created from {}, this request asks for {}",
            rec.source.as_deref().unwrap_or("nothing"),
            source.as_deref().unwrap_or("nothing")
        ));
    }
    if !new.capacity.admits(rec.capacity_bytes) {
        return Some(format!(
            "its capacity {} bytes is outside the requested range (required {:?}, limit {:?})",
            rec.capacity_bytes, new.capacity.required, new.capacity.limit
        ));
    }
    None
}

impl S3Controller {
    /// CreateVolume of an `s3` volume with the request's secrets.
    pub async fn create_volume(&self, new: NewVolume, secrets: &HashMap<String, String>) -> Result<S3Volume> {
        let s3 = new.params.s3.clone().ok_or_else(|| Error::invalid("parameters", "type is not s3"))?;
        let (bucket, own) = match s3.bucket {
            Some(b) => (b, false),
            None => (layout::own_bucket(&new.local), true),
        };
        let ep = self.endpoint(secrets)?;
        let id = volume_id(&bucket, &new.local)?;
        let mut keys = vec![format!("s3-name:{}", new.name), format!("s3-vol:{id}")];
        match &new.source {
            Some(Source::Volume(v)) => keys.push(format!("s3-vol:{v}")),
            Some(Source::Snapshot(s)) => keys.push(format!("s3-snap:{s}")),
            None => {}
        }
        let guards = self.guard(&keys, || format!("volume {:?}", printable(&new.name)))?;
        let me = self.clone();
        self.detached(guards, id.to_string(), async move { me.create_inner(new, ep, bucket, own, id).await }).await
    }

    async fn create_inner(
        &self,
        new: NewVolume,
        ep: S3Endpoint,
        bucket: String,
        own: bool,
        id: VolumeId,
    ) -> Result<S3Volume> {
        let store = self.store(&ep, &bucket);
        let record_key = layout::volume_record_key(&new.local);
        // Reading the record also tells whether the bucket exists (NoSuchBucket).
        let existing = match store.get_json::<S3VolumeRecord>(&record_key).await {
            Ok(r) => {
                self.remember(&bucket, &ep);
                r
            }
            Err(f) if own && no_bucket(&f) => None,
            Err(f) if no_bucket(&f) => {
                return Err(Error::invalid(
                    "parameters",
                    format!("bucket {bucket} does not exist (volume {:?}): create it first", printable(&new.name)),
                ))
            }
            Err(f) => return Err(fail(f)),
        };
        if let Some(rec) = &existing {
            if let Some(reason) = incompatibility(rec, &new) {
                return Err(Error::NameConflict { kind: "volume", name: printable(&new.name), reason });
            }
            match rec.state {
                VolumeState::Ready => {
                    let published = self.published(&store, &new.local).await?;
                    return Ok(S3Volume { id, bucket, record: rec.clone(), published });
                }
                VolumeState::Deleting => {
                    return Err(Error::InProgress {
                        what: format!(
                            "the deletion of volume {id} (repeat DeleteVolume; the name is free once it ends)"
                        ),
                    })
                }
                VolumeState::Creating => {}
            }
        }
        // What the content comes from, and the least the quota must hold.
        let (source, floor) = match &new.source {
            None => (None, 0),
            Some(src) => {
                let (s, bytes) = self.resolve_source(&ep, src).await?;
                (Some(s), bytes)
            }
        };
        let record = match existing {
            Some(rec) => rec,
            None => {
                let capacity = new.capacity.pick(floor.max(MIN_QUOTA), &id.to_string())?;
                let made = if own { self.own_bucket(&store, &ep, &id, &new.name).await? } else { false };
                if own {
                    self.remember(&bucket, &ep);
                }
                let (created_unix, _) = now();
                let rec = S3VolumeRecord {
                    version: VERSION,
                    name: new.name.clone(),
                    id: id.to_string(),
                    capacity_bytes: capacity,
                    own_bucket: own,
                    state: if source.is_some() { VolumeState::Creating } else { VolumeState::Ready },
                    source: source_string(&new.source),
                    parameters: new.params.identity(),
                    created_unix,
                };
                if let Err(f) = store.put_json(&record_key, &rec, true).await {
                    if made {
                        self.remove_own_bucket_if_empty(&store).await;
                    }
                    return Err(fail(f));
                }
                rec
            }
        };
        let Some((src_store, src_prefix)) = source else {
            return Ok(S3Volume { id, bucket, record, published: Vec::new() });
        };
        let copied = self.copy_prefix(&src_store, &src_prefix, &store, &layout::volume_data_prefix(&new.local)).await;
        let done = match copied {
            Ok(bytes) if bytes > record.capacity_bytes => Err(Error::CapacityOutOfRange {
                volume: id.to_string(),
                reason: format!(
                    "the source now holds {bytes} bytes, more than the volume's capacity {}",
                    record.capacity_bytes
                ),
            }),
            Ok(_) => {
                let ready = S3VolumeRecord { state: VolumeState::Ready, ..record };
                store.put_json(&record_key, &ready, false).await.map(|()| ready).map_err(fail)
            }
            Err(e) => Err(e),
        };
        match done {
            Ok(record) => Ok(S3Volume { id, bucket, record, published: Vec::new() }),
            Err(e) => {
                // Leave no half-made volume: remove what the copy made, the record, and the
                // bucket if it was made for it. If S3 cannot be reached now, the record stays
                // `creating`, and a repeat (or DeleteVolume) finishes the job.
                if let Err(c) = self.remove_volume(&store, &id).await {
                    tracing::warn!(volume = %id, error = %c, "could not remove the half-made volume; a repeat of CreateVolume or DeleteVolume will");
                }
                Err(e)
            }
        }
    }

    /// The store and prefix to copy a source from, and the bytes it holds.
    async fn resolve_source(&self, ep: &S3Endpoint, src: &Source) -> Result<((Store, String), u64)> {
        match src {
            Source::Snapshot(sid) => {
                let store = self.store(ep, layout::snapshot_bucket(sid));
                let not_found =
                    |reason: &str| Error::SnapshotNotFound { snapshot: sid.to_string(), reason: reason.into() };
                let rec = match store
                    .get_json::<crate::record::S3SnapshotRecord>(&layout::snapshot_record_key(sid.local()))
                    .await
                {
                    Ok(Some(r)) => {
                        self.remember(&store.bucket, ep);
                        r
                    }
                    Ok(None) => return Err(not_found("no such snapshot in its bucket")),
                    Err(f) if no_bucket(&f) => return Err(not_found("its bucket does not exist")),
                    Err(f) => return Err(fail(f)),
                };
                if !rec.ready {
                    return Err(Error::precondition(
                        format!("snapshot {sid}"),
                        "it is not ready yet (its copy did not finish)",
                    ));
                }
                Ok(((store, layout::snapshot_data_prefix(sid.local())), rec.size_bytes))
            }
            Source::Volume(vid) => {
                let store = self.store(ep, layout::volume_bucket(vid));
                let not_found = |reason: &str| Error::VolumeNotFound { volume: vid.to_string(), reason: reason.into() };
                let rec = match store.get_json::<S3VolumeRecord>(&layout::volume_record_key(vid.local())).await {
                    Ok(Some(r)) => {
                        self.remember(&store.bucket, ep);
                        r
                    }
                    Ok(None) => return Err(not_found("no such volume in its bucket")),
                    Err(f) if no_bucket(&f) => return Err(not_found("its bucket does not exist")),
                    Err(f) => return Err(fail(f)),
                };
                if rec.state != VolumeState::Ready {
                    return Err(Error::precondition(
                        format!("volume {vid}"),
                        "it is not ready (being created or deleted)",
                    ));
                }
                let prefix = layout::volume_data_prefix(vid.local());
                let bytes = store.list(&prefix).await.map_err(fail)?.iter().map(|o| o.size).sum();
                Ok(((store, prefix), bytes))
            }
        }
    }

    /// Makes (or takes back) the bucket of a volume of its own and marks it. Answers
    /// whether the bucket may be removed if the create fails (made or found empty here).
    async fn own_bucket(&self, store: &Store, ep: &S3Endpoint, id: &VolumeId, name: &str) -> Result<bool> {
        let conflict = |reason: String| Error::NameConflict { kind: "volume", name: printable(name), reason };
        match store.create_bucket(&ep.region).await {
            Ok(_) => {}
            Err(f) if f.kind == Kind::Conflict => {
                return Err(conflict(format!(
                    "bucket {} exists and belongs to another S3 account ({})",
                    store.bucket, f.message
                )))
            }
            Err(f) => return Err(fail(f)),
        }
        match store.get_json::<BucketMarker>(layout::BUCKET_MARKER).await.map_err(fail)? {
            Some(m) if m.volume_id == id.to_string() && m.name == name => return Ok(false),
            Some(m) => {
                return Err(conflict(format!(
                    "bucket {} was made by ferrovol for volume {:?}",
                    store.bucket,
                    printable(&m.name)
                )))
            }
            None => {}
        }
        // No marker: the bucket is ours to take only if it is empty (made by this call, or
        // by an attempt that died before marking it). Anything in it is someone's data.
        if !store.list_some("", 1).await.map_err(fail)?.is_empty() {
            return Err(conflict(format!(
                "bucket {} exists, holds objects, and was not made by ferrovol (no {})",
                store.bucket,
                layout::BUCKET_MARKER
            )));
        }
        let (created_unix, _) = now();
        let marker = BucketMarker { version: VERSION, name: name.to_owned(), volume_id: id.to_string(), created_unix };
        store.put_json(layout::BUCKET_MARKER, &marker, true).await.map_err(fail)?;
        Ok(true)
    }

    /// Removes an own bucket (marker and bucket) if nothing but its marker is left in it.
    /// Best effort: failures are logged, the bucket stays.
    pub(crate) async fn remove_own_bucket_if_empty(&self, store: &Store) {
        let result = async {
            let Some(_) = store.get_json::<BucketMarker>(layout::BUCKET_MARKER).await? else { return Ok(false) };
            let left = store.list_some("", 2).await?;
            if left.iter().any(|o| o.key != layout::BUCKET_MARKER) {
                return Ok(false);
            }
            store.delete(layout::BUCKET_MARKER).await?;
            store.delete_bucket().await?;
            Ok(true)
        }
        .await;
        match result {
            Ok(true) => tracing::info!(bucket = %store.bucket, "removed the volume's own bucket"),
            Ok(false) => {}
            Err(f) if no_bucket(&f) => {}
            Err(f) => {
                tracing::warn!(bucket = %store.bucket, error = %f.message, "could not remove the volume's own bucket")
            }
        }
    }

    /// Removes every object of a volume (record last, state `deleting` first so that an
    /// interrupted delete is resumed), then its own bucket if nothing else is in it.
    async fn remove_volume(&self, store: &Store, id: &VolumeId) -> Result<()> {
        let local = id.local();
        let record_key = layout::volume_record_key(local);
        match store.get_json::<S3VolumeRecord>(&record_key).await {
            Ok(Some(rec)) if rec.state != VolumeState::Deleting => {
                let deleting = S3VolumeRecord { state: VolumeState::Deleting, ..rec };
                store.put_json(&record_key, &deleting, false).await.map_err(fail)?;
            }
            Ok(_) => {}
            Err(f) if no_bucket(&f) => return Ok(()),
            Err(f) => return Err(fail(f)),
        }
        let n = store
            .delete_prefix(&layout::volume_prefix(local), Some(&record_key), self.inner.tuning.delete_in_flight)
            .await
            .map_err(fail)?;
        store.delete(&record_key).await.map_err(fail)?;
        tracing::debug!(volume = %id, objects = n, "removed the volume's objects");
        if store.bucket == layout::own_bucket(local) {
            self.remove_own_bucket_if_empty(store).await;
        }
        Ok(())
    }

    /// DeleteVolume: an unknown volume or a missing bucket is OK; a ControllerPublished
    /// volume is FAILED_PRECONDITION naming the nodes. Once past that check (under the
    /// volume's guard), every object under the volume's prefix goes, publication markers
    /// included: a publish racing the delete removes its own marker when it finds the
    /// record `deleting` or gone ([`S3Controller::publish_volume`]).
    pub async fn delete_volume(&self, id: &VolumeId, secrets: &HashMap<String, String>) -> Result<()> {
        let bucket = layout::volume_bucket(id).to_owned();
        let ep = self.endpoint(secrets)?;
        let guards = self.guard(&[format!("s3-vol:{id}")], || format!("volume {id}"))?;
        let me = self.clone();
        let id = id.clone();
        self.detached(guards, id.to_string(), async move {
            let store = me.store(&ep, &bucket);
            let record = store.get_json::<S3VolumeRecord>(&layout::volume_record_key(id.local())).await;
            if record.is_ok() {
                me.remember(&bucket, &ep);
            }
            match record {
                Ok(Some(rec)) if rec.state != VolumeState::Deleting => {
                    let published = me.published(&store, id.local()).await?;
                    if !published.is_empty() {
                        return Err(Error::precondition(
                            format!("volume {id}"),
                            format!(
                                "it is ControllerPublished to node(s) {}; unpublish it first",
                                published.join(", ")
                            ),
                        ));
                    }
                }
                Ok(_) => {}
                Err(f) if no_bucket(&f) => return Ok(()),
                Err(f) => return Err(fail(f)),
            }
            me.remove_volume(&store, &id).await
        })
        .await
    }

    /// The record of an existing volume: NOT_FOUND if it or its bucket does not exist.
    async fn existing(&self, store: &Store, id: &VolumeId) -> Result<S3VolumeRecord> {
        match store.get_json::<S3VolumeRecord>(&layout::volume_record_key(id.local())).await {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(Error::VolumeNotFound { volume: id.to_string(), reason: "no record in its bucket".into() }),
            Err(f) if no_bucket(&f) => Err(Error::VolumeNotFound {
                volume: id.to_string(),
                reason: format!("bucket {} does not exist", store.bucket),
            }),
            Err(f) => Err(fail(f)),
        }
    }

    /// ControllerExpandVolume: raises the quota; never shrinks; answers the quota.
    pub async fn expand_volume(
        &self,
        id: &VolumeId,
        range: CapacityRange,
        secrets: &HashMap<String, String>,
    ) -> Result<u64> {
        let bucket = layout::volume_bucket(id).to_owned();
        let ep = self.endpoint(secrets)?;
        let guards = self.guard(&[format!("s3-vol:{id}")], || format!("volume {id}"))?;
        let me = self.clone();
        let id = id.clone();
        self.detached(guards, id.to_string(), async move {
            let store = me.store(&ep, &bucket);
            let rec = me.existing(&store, &id).await?;
            me.remember(&bucket, &ep);
            if rec.state != VolumeState::Ready {
                return Err(Error::precondition(format!("volume {id}"), "it is being created or deleted"));
            }
            if let Some(limit) = range.limit {
                if rec.capacity_bytes > limit {
                    return Err(Error::CapacityOutOfRange {
                        volume: id.to_string(),
                        reason: format!("it holds {} bytes already, above limit_bytes {limit}", rec.capacity_bytes),
                    });
                }
            }
            let Some(required) = range.required.filter(|r| *r > rec.capacity_bytes) else {
                return Ok(rec.capacity_bytes);
            };
            let mut size = required.div_ceil(MIB).saturating_mul(MIB);
            if range.limit.is_some_and(|l| size > l) {
                size = required;
            }
            let grown = S3VolumeRecord { capacity_bytes: size, ..rec };
            store.put_json(&layout::volume_record_key(id.local()), &grown, false).await.map_err(fail)?;
            Ok(size)
        })
        .await
    }

    /// The nodes a volume is published to (marker objects), sorted.
    async fn published(&self, store: &Store, local: &ferrovol_core::ids::LocalName) -> Result<Vec<String>> {
        let prefix = format!("{}published/", layout::volume_prefix(local));
        let mut nodes: Vec<String> = store
            .list(&prefix)
            .await
            .map_err(fail)?
            .into_iter()
            .filter_map(|o| o.key.strip_prefix(&prefix).map(str::to_owned))
            .filter(|n| NodeId::parse(n).is_ok())
            .collect();
        nodes.sort();
        Ok(nodes)
    }

    /// ControllerPublishVolume: records the node (any node: S3 is reachable from all) in
    /// the marker `published/<node>`, whose body says whether it is read-only. A repeat for
    /// the same node with the other read-only setting is ALREADY_EXISTS. Publish takes no
    /// guard (publications of an RWX volume to many nodes run at once), so after writing
    /// its marker it reads the record again: a volume gone or `deleting` meanwhile (a
    /// DeleteVolume that passed its "not published" check) gets its marker removed and is
    /// NOT_FOUND, so no stray marker outlives the volume.
    pub async fn publish_volume(
        &self,
        id: &VolumeId,
        node: &NodeId,
        readonly: bool,
        secrets: &HashMap<String, String>,
    ) -> Result<()> {
        let bucket = layout::volume_bucket(id);
        let ep = self.endpoint(secrets)?;
        let store = self.store(&ep, bucket);
        let rec = self.existing(&store, id).await?;
        self.remember(bucket, &ep);
        if rec.state != VolumeState::Ready {
            return Err(Error::precondition(format!("volume {id}"), "it is being created or deleted"));
        }
        let key = format!("{}published/{node}", layout::volume_prefix(id.local()));
        if let Some(body) = store.get_bytes(&key).await.map_err(fail)? {
            // An empty marker is one written before markers had a body: compatible.
            if let Ok(m) = serde_json::from_slice::<PublishMarker>(&body) {
                if m.readonly != readonly {
                    return Err(Error::PublishedIncompatible {
                        volume: id.to_string(),
                        path: format!("node {node}"),
                        reason: format!(
                            "it is published there with readonly {}, this request asks for {readonly}",
                            m.readonly
                        ),
                    });
                }
            }
        }
        let marker = PublishMarker { version: VERSION, readonly };
        store.put_json(&key, &marker, false).await.map_err(fail)?;
        let gone = match store.get_json::<S3VolumeRecord>(&layout::volume_record_key(id.local())).await {
            Ok(Some(r)) if r.state != VolumeState::Deleting => None,
            Ok(Some(_)) => Some("it is being deleted"),
            Ok(None) => Some("no record in its bucket (deleted meanwhile)"),
            Err(f) if no_bucket(&f) => Some("its bucket was deleted meanwhile"),
            Err(f) => return Err(fail(f)),
        };
        if let Some(reason) = gone {
            store.delete(&key).await.map_err(fail)?;
            return Err(Error::VolumeNotFound { volume: id.to_string(), reason: reason.into() });
        }
        Ok(())
    }

    /// ControllerUnpublishVolume: forgets the node (every node when `None`); an unknown
    /// volume or bucket is OK.
    pub async fn unpublish_volume(
        &self,
        id: &VolumeId,
        node: Option<&NodeId>,
        secrets: &HashMap<String, String>,
    ) -> Result<()> {
        let bucket = layout::volume_bucket(id);
        let ep = self.endpoint(secrets)?;
        let store = self.store(&ep, bucket);
        let prefix = format!("{}published/", layout::volume_prefix(id.local()));
        let result = match node {
            Some(n) => store.delete(&format!("{prefix}{n}")).await,
            None => store.delete_prefix(&prefix, None, 1).await.map(|_| ()),
        };
        match result {
            Err(f) if !no_bucket(&f) => Err(fail(f)),
            _ => Ok(()),
        }
    }

    /// The volume as it is now, with the request's secrets (ValidateVolumeCapabilities).
    pub async fn volume(&self, id: &VolumeId, ep: &S3Endpoint) -> Result<S3Volume> {
        let bucket = layout::volume_bucket(id);
        let store = self.store(ep, bucket);
        let record = self.existing(&store, id).await?;
        self.remember(bucket, ep);
        let published = self.published(&store, id.local()).await?;
        Ok(S3Volume { id: id.clone(), bucket: bucket.to_owned(), record, published })
    }

    /// ControllerGetVolume, which carries no secrets: with the endpoint last seen for the
    /// bucket, the bucket is checked (HeadBucket) and the record read; a refusal or an
    /// unreachable server is an abnormal condition naming the call. A bucket or record
    /// that does not exist is NOT_FOUND. Without a known endpoint nothing can be checked:
    /// the volume is answered with an unknown capacity and a condition saying so.
    pub async fn get_volume(&self, id: &VolumeId) -> Result<S3VolumeStatus> {
        let bucket = layout::volume_bucket(id).to_owned();
        let unchecked = |condition: Condition| S3VolumeStatus {
            id: id.clone(),
            bucket: bucket.clone(),
            record: None,
            published: Vec::new(),
            condition,
        };
        let Some(ep) = self.known_endpoint(&bucket) else {
            return Ok(unchecked(Condition {
                abnormal: false,
                message: format!("not checked: no credentials for bucket {bucket} seen since the controller started"),
            }));
        };
        let store = self.store(&ep, &bucket);
        if let Err(f) = store.head_bucket().await {
            if is_not_found(&f) {
                return Err(Error::VolumeNotFound {
                    volume: id.to_string(),
                    reason: format!("bucket {bucket} does not exist"),
                });
            }
            return Ok(unchecked(Condition::abnormal(fail(f).to_string())));
        }
        match self.status(&store, id).await {
            Ok(Some(s)) => Ok(s),
            Ok(None) => Err(Error::VolumeNotFound { volume: id.to_string(), reason: "no record in its bucket".into() }),
            Err(e) => Ok(unchecked(Condition::abnormal(e.to_string()))),
        }
    }

    /// A volume's record, publications and condition; `None` if it has no record.
    async fn status(&self, store: &Store, id: &VolumeId) -> Result<Option<S3VolumeStatus>> {
        let Some(rec) = store.get_json::<S3VolumeRecord>(&layout::volume_record_key(id.local())).await.map_err(fail)?
        else {
            return Ok(None);
        };
        let published = self.published(store, id.local()).await?;
        Ok(Some(S3VolumeStatus {
            id: id.clone(),
            bucket: store.bucket.clone(),
            condition: state_condition(&rec),
            record: Some(rec),
            published,
        }))
    }

    /// ListVolumes, which carries no secrets: the volumes of every bucket whose endpoint
    /// is known, and of the own buckets (`fv-*`) ListBuckets shows to those endpoints. A
    /// bucket that cannot be listed is left out and logged.
    pub async fn list_volumes(&self) -> Vec<S3VolumeStatus> {
        let mut out = Vec::new();
        for (bucket, ep) in self.listing_buckets(None).await {
            let store = self.store(&ep, &bucket);
            let prefix = format!("{}volumes/", layout::ROOT);
            let locals = match store.list_dirs(&prefix).await {
                Ok(l) => l,
                Err(f) => {
                    if !no_bucket(&f) {
                        tracing::warn!(bucket = %bucket, error = %f.message, "cannot list the bucket's volumes; ListVolumes leaves them out");
                    }
                    continue;
                }
            };
            let ids: Vec<VolumeId> = locals
                .iter()
                .filter_map(|l| ferrovol_core::ids::LocalName::parse(l))
                .filter_map(|l| volume_id(&bucket, &l).ok())
                .collect();
            let me = self.clone();
            let found = parallel(ids, self.inner.tuning.list_parallel, |id| {
                let (me, store) = (me.clone(), store.clone());
                async move { me.status(&store, &id).await }
            })
            .await;
            for r in found {
                match r.map_err(|e| Error::system("reading a volume's record", &bucket, e)).and_then(|r| r) {
                    Ok(Some(s)) => out.push(s),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(bucket = %bucket, error = %e, "cannot read a volume's record; ListVolumes leaves it out")
                    }
                }
            }
        }
        out.sort_by_key(|s| s.id.to_string());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrovol_core::ids::LocalName;

    fn new(name: &str, bucket: Option<&str>, required: Option<u64>, source: Option<Source>) -> NewVolume {
        let mut p = HashMap::from([("type".to_string(), "s3".to_string())]);
        if let Some(b) = bucket {
            p.insert("bucket".into(), b.into());
        }
        p.insert("csi.storage.k8s.io/pvc/name".into(), "data".into());
        NewVolume {
            name: name.into(),
            local: LocalName::from_co_name(name),
            capacity: CapacityRange { required, limit: None },
            params: ferrovol_core::params::VolumeParams::parse(&p).expect("params"),
            source,
        }
    }

    fn record(n: &NewVolume, capacity: u64) -> S3VolumeRecord {
        S3VolumeRecord {
            version: VERSION,
            name: n.name.clone(),
            id: "s3.vol:b:v".into(),
            capacity_bytes: capacity,
            own_bucket: false,
            state: VolumeState::Ready,
            source: source_string(&n.source),
            parameters: n.params.identity(),
            created_unix: 0,
        }
    }

    #[test]
    fn repeats_are_compared_on_name_parameters_source_and_capacity() {
        let first = new("pvc-1", Some("bkt"), Some(GIB_TEST), None);
        let rec = record(&first, GIB_TEST);
        assert_eq!(incompatibility(&rec, &new("pvc-1", Some("bkt"), Some(MIB), None)), None, "smaller request fits");
        assert!(incompatibility(&rec, &new("pvc-1", Some("bkt"), Some(2 * GIB_TEST), None))
            .is_some_and(|r| r.contains("capacity")));
        assert!(
            incompatibility(&rec, &new("pvc-1", Some("other"), None, None)).is_some_and(|r| r.contains("parameters"))
        );
        let snap = ferrovol_core::ids::SnapshotId::parse("s3.snap:bkt:s1").expect("id");
        assert!(incompatibility(&rec, &new("pvc-1", Some("bkt"), None, Some(Source::Snapshot(snap))))
            .is_some_and(|r| r.contains("created from nothing")));
        assert!(
            incompatibility(&rec, &new("pvc-2", Some("bkt"), None, None)).is_some_and(|r| r.contains("holds volume"))
        );
    }

    const GIB_TEST: u64 = 1 << 30;
}
