//! Writes that stream: a new (or truncated) file's bytes are buffered up to the part size,
//! each full part is uploaded as a multipart-upload part while writing goes on (at most
//! `MAX_PARTS_IN_FLIGHT` at a time, so a writer holds at most that many parts plus one),
//! and the object is committed when the file is flushed or released: a small file with one
//! PutObject, a large one by completing the upload. Writes must be sequential.

use std::collections::VecDeque;
use std::sync::Arc;

use aws_sdk_s3::types::CompletedPart;
use bytes::{Bytes, BytesMut};
use tokio::task::JoinHandle;

use super::s3::S3Ctx;
use super::FsError;

/// Parts being uploaded at once per writer.
pub const MAX_PARTS_IN_FLIGHT: usize = 2;

/// What a writer has become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Committed with this many bytes.
    Committed(u64),
}

/// The write side of one open file.
#[derive(Debug)]
pub struct Writer {
    key: String,
    part_size: usize,
    buf: BytesMut,
    written: u64,
    upload_id: Option<String>,
    next_part: i32,
    done: Vec<CompletedPart>,
    in_flight: VecDeque<JoinHandle<Result<CompletedPart, FsError>>>,
    /// The first failure: every later write and the commit return it.
    failed: Option<FsError>,
    committed: bool,
}

impl Writer {
    pub fn new(key: String, part_size: usize) -> Self {
        Writer {
            key,
            part_size: part_size.max(5 << 20),
            buf: BytesMut::new(),
            written: 0,
            upload_id: None,
            next_part: 1,
            done: Vec::new(),
            in_flight: VecDeque::new(),
            failed: None,
            committed: false,
        }
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    pub fn is_committed(&self) -> bool {
        self.committed
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
        if self.committed {
            return Err(FsError::new(libc::EINVAL, format!("{} was already committed (closed)", self.key)));
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

    /// Takes `data` (after [`Writer::check`]); uploads every full part.
    pub async fn write(&mut self, ctx: &Arc<S3Ctx>, data: &[u8]) -> Result<(), FsError> {
        self.buf.extend_from_slice(data);
        self.written += data.len() as u64;
        while self.buf.len() >= self.part_size {
            let part = self.buf.split_to(self.part_size).freeze();
            if let Err(e) = self.send_part(ctx, part).await {
                self.fail(e.clone());
                return Err(e);
            }
        }
        Ok(())
    }

    async fn send_part(&mut self, ctx: &Arc<S3Ctx>, part: Bytes) -> Result<(), FsError> {
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
        self.in_flight.push_back(tokio::spawn(async move { ctx.upload_part(&key, &id, n, part).await }));
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
        self.discard(ctx).await;
        *self = Writer::new(std::mem::take(&mut self.key), self.part_size);
    }

    async fn discard(&mut self, ctx: &S3Ctx) {
        for h in self.in_flight.drain(..) {
            h.abort();
        }
        if let Some(id) = self.upload_id.take() {
            ctx.abort_upload(&self.key, &id).await;
        }
        self.buf.clear();
    }

    /// Commits the object: afterwards it is visible to everyone. A failed writer (or a
    /// failed commit) aborts its upload and returns the failure; nothing is then visible.
    pub async fn commit(&mut self, ctx: &Arc<S3Ctx>) -> Result<Outcome, FsError> {
        if self.committed {
            return Ok(Outcome::Committed(self.written));
        }
        if let Some(e) = self.failed.clone() {
            self.discard(ctx).await;
            self.committed = true;
            return Err(e);
        }
        let r = self.finish(ctx).await;
        self.committed = true;
        match r {
            Ok(()) => Ok(Outcome::Committed(self.written)),
            Err(e) => {
                self.failed = Some(e.clone());
                self.discard(ctx).await;
                Err(e)
            }
        }
    }

    async fn finish(&mut self, ctx: &Arc<S3Ctx>) -> Result<(), FsError> {
        let rest = self.buf.split().freeze();
        let Some(id) = self.upload_id.clone() else {
            return ctx.put(&self.key, rest).await;
        };
        if !rest.is_empty() {
            self.send_part(ctx, rest).await?;
        }
        while !self.in_flight.is_empty() {
            self.wait_oldest().await?;
        }
        let mut parts = std::mem::take(&mut self.done);
        parts.sort_by_key(|p| p.part_number());
        ctx.complete_upload(&self.key, &id, parts, self.written).await?;
        self.upload_id = None;
        Ok(())
    }
}
