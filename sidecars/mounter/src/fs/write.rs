//! Writes that stream: a new (or truncated) file's bytes are buffered up to the part size,
//! each full part is uploaded as a multipart-upload part while writing goes on (at most
//! `MAX_PARTS_IN_FLIGHT` at a time, so a writer holds at most that many parts plus one,
//! every byte of it taken from the process-wide [`Budget`]), and the object is committed
//! when the file is closed: a small file with one PutObject, a large one by completing the
//! upload (with `If-None-Match: *` when the file was created with `O_EXCL`). Writes must be
//! sequential. A failed commit is remembered: every later close of the file reports it.

use std::collections::VecDeque;
use std::sync::Arc;

use aws_sdk_s3::types::CompletedPart;
use bytes::{Bytes, BytesMut};
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinHandle;

use super::budget::Budget;
use super::s3::S3Ctx;
use super::FsError;

/// Parts being uploaded at once per writer.
pub const MAX_PARTS_IN_FLIGHT: usize = 2;

/// What a writer has become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Committed with this many bytes, and the object's ETag when the server said it.
    Committed(u64, Option<String>),
}

/// Where a writer is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Open,
    Committed(Option<String>),
    /// The commit failed (or the writer was discarded): nothing was stored.
    Failed(FsError),
}

/// The write side of one open file.
#[derive(Debug)]
pub struct Writer {
    key: String,
    part_size: usize,
    /// Commit only if no object is there (`O_EXCL`).
    exclusive: bool,
    budget: Budget,
    buf: BytesMut,
    /// The budget the buffered bytes hold.
    held: Option<OwnedSemaphorePermit>,
    written: u64,
    upload_id: Option<String>,
    next_part: i32,
    done: Vec<CompletedPart>,
    in_flight: VecDeque<JoinHandle<Result<CompletedPart, FsError>>>,
    /// The first failure: every later write and the commit return it.
    failed: Option<FsError>,
    phase: Phase,
}

impl Writer {
    pub fn new(key: String, part_size: usize, exclusive: bool, budget: Budget) -> Self {
        Writer {
            key,
            part_size: part_size.max(5 << 20),
            exclusive,
            budget,
            buf: BytesMut::new(),
            held: None,
            written: 0,
            upload_id: None,
            next_part: 1,
            done: Vec::new(),
            in_flight: VecDeque::new(),
            failed: None,
            phase: Phase::Open,
        }
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Whether the commit was tried (it worked or it failed).
    pub fn is_committed(&self) -> bool {
        self.phase != Phase::Open
    }

    /// The result of the commit once it was tried: every later close answers it again.
    pub fn outcome(&self) -> Option<Result<Outcome, FsError>> {
        match &self.phase {
            Phase::Open => None,
            Phase::Committed(etag) => Some(Ok(Outcome::Committed(self.written, etag.clone()))),
            Phase::Failed(e) => Some(Err(e.clone())),
        }
    }

    /// Whether a write failed (the commit will abort and report it).
    pub fn has_failed(&self) -> bool {
        self.failed.is_some()
    }

    /// The upload under way, if a part was sent: tests.
    pub fn upload_id(&self) -> Option<&str> {
        self.upload_id.as_deref()
    }

    /// Marks the writer failed (a refused write): its commit aborts the upload.
    pub fn fail(&mut self, e: FsError) {
        if self.failed.is_none() {
            self.failed = Some(e);
        }
    }

    /// Checks that a write of `len` bytes at `offset` can be taken.
    pub fn check(&self, offset: u64) -> Result<(), FsError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match &self.phase {
            Phase::Open => {}
            Phase::Failed(e) => return Err(e.clone()),
            Phase::Committed(_) => {
                return Err(FsError::new(libc::EINVAL, format!("{} was already committed (closed)", self.key)))
            }
        }
        if offset != self.written {
            return Err(FsError::new(
                libc::EINVAL,
                format!(
                    "a write at offset {offset} of {}: only sequential writes are supported (next offset {})",
                    self.key, self.written
                ),
            ));
        }
        Ok(())
    }

    /// Takes `data` (after [`Writer::check`]); uploads every full part. The bytes are taken
    /// from the budget first (waiting at most the mount's bound).
    pub async fn write(&mut self, ctx: &Arc<S3Ctx>, data: &[u8]) -> Result<(), FsError> {
        let permit = match self.budget.take(data.len() as u64, ctx.bound).await {
            Ok(p) => p,
            Err(e) => {
                self.fail(e.clone());
                return Err(e);
            }
        };
        match &mut self.held {
            Some(h) => h.merge(permit),
            None => self.held = Some(permit),
        }
        self.buf.extend_from_slice(data);
        self.written += data.len() as u64;
        while self.buf.len() >= self.part_size {
            let part = self.buf.split_to(self.part_size).freeze();
            let permit = self.held.as_mut().and_then(|h| h.split(part.len()));
            if let Err(e) = self.send_part(ctx, part, permit).await {
                self.fail(e.clone());
                return Err(e);
            }
        }
        Ok(())
    }

    async fn send_part(
        &mut self,
        ctx: &Arc<S3Ctx>,
        part: Bytes,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Result<(), FsError> {
        let id = match &self.upload_id {
            Some(id) => id.clone(),
            None => {
                let id = ctx.create_upload(&self.key).await?;
                self.upload_id = Some(id.clone());
                id
            }
        };
        while self.in_flight.len() >= MAX_PARTS_IN_FLIGHT {
            self.wait_oldest().await?;
        }
        let (ctx, key, n) = (ctx.clone(), self.key.clone(), self.next_part);
        self.next_part += 1;
        self.in_flight.push_back(tokio::spawn(async move {
            let r = ctx.upload_part(&key, &id, n, part).await;
            drop(permit);
            r
        }));
        Ok(())
    }

    async fn wait_oldest(&mut self) -> Result<(), FsError> {
        if let Some(h) = self.in_flight.pop_front() {
            let part = h
                .await
                .map_err(|e| FsError::new(libc::EIO, format!("uploading a part of {} failed: {e}", self.key)))??;
            self.done.push(part);
        }
        Ok(())
    }

    /// Drops everything written so far (truncation to 0 of a file being written).
    pub async fn reset(&mut self, ctx: &S3Ctx) {
        self.abort(ctx).await;
        *self = Writer::new(std::mem::take(&mut self.key), self.part_size, self.exclusive, self.budget.clone());
    }

    async fn abort(&mut self, ctx: &S3Ctx) {
        for h in self.in_flight.drain(..) {
            h.abort();
        }
        if let Some(id) = self.upload_id.take() {
            ctx.abort_upload(&self.key, &id).await;
        }
        self.buf = BytesMut::new();
        self.held = None;
    }

    /// Gives the writer up without committing anything (unmount): its upload is aborted,
    /// and a later close reports `why`.
    pub async fn discard(&mut self, ctx: &S3Ctx, why: FsError) {
        if self.phase == Phase::Open {
            self.abort(ctx).await;
            self.phase = Phase::Failed(why);
        }
    }

    /// Commits the object: afterwards it is visible to everyone. A failed writer (or a
    /// failed commit) aborts its upload and returns the failure; nothing is then visible.
    /// Once tried, every later call answers the same.
    pub async fn commit(&mut self, ctx: &Arc<S3Ctx>) -> Result<Outcome, FsError> {
        if let Some(r) = self.outcome() {
            return r;
        }
        let r = match self.failed.clone() {
            Some(e) => Err(e),
            None => self.finish(ctx).await,
        };
        match r {
            Ok(etag) => {
                self.phase = Phase::Committed(etag);
            }
            Err(e) => {
                self.failed.get_or_insert(e.clone());
                self.abort(ctx).await;
                self.phase = Phase::Failed(e);
            }
        }
        self.held = None;
        self.outcome().unwrap_or_else(|| Err(FsError::new(libc::EIO, "a commit left no outcome")))
    }

    async fn finish(&mut self, ctx: &Arc<S3Ctx>) -> Result<Option<String>, FsError> {
        let rest = self.buf.split().freeze();
        let permit = self.held.take();
        let Some(id) = self.upload_id.clone() else {
            let r = ctx.put(&self.key, rest, self.exclusive).await;
            drop(permit);
            return r;
        };
        if !rest.is_empty() {
            self.send_part(ctx, rest, permit).await?;
        }
        while !self.in_flight.is_empty() {
            self.wait_oldest().await?;
        }
        let mut parts = std::mem::take(&mut self.done);
        parts.sort_by_key(|p| p.part_number());
        let etag = ctx.complete_upload(&self.key, &id, parts, self.exclusive).await?;
        self.upload_id = None;
        Ok(etag)
    }
}
