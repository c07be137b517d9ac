//! Reads that stream: a handle's reads are sequential when each starts in or next to the
//! chunk the last one ended in; then the chunks ahead are fetched by parallel ranged GETs
//! (`depth` chunks of `chunk` bytes in flight at most, so a handle holds at most
//! `(depth + 2) * chunk` bytes, and chunks ahead of the read only while the process-wide
//! [`Budget`] has room). Any other read is one ranged GET of exactly what it asks. Every GET
//! names the version opened (`If-Match` with its ETag): an object replaced while open fails
//! the read with EIO instead of mixing versions. Prefetches still running are cancelled when
//! their chunk is dropped: when reading turns non-sequential and when the handle is closed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::sync::{OnceCell, OwnedSemaphorePermit};

use super::budget::Budget;
use super::s3::S3Ctx;
use super::FsError;

/// The chunks `[first, last]` that bytes `[offset, offset + len)` of a file of `size`
/// bytes touch, or `None` when the read is past the end.
pub fn chunk_span(offset: u64, len: u64, size: u64, chunk: u64) -> Option<(u64, u64)> {
    let end = offset.saturating_add(len).min(size);
    if offset >= end || chunk == 0 {
        return None;
    }
    Some((offset / chunk, (end - 1) / chunk))
}

/// The bytes chunk `i` covers: `[start, end)`.
pub fn chunk_range(i: u64, size: u64, chunk: u64) -> (u64, u64) {
    let start = i.saturating_mul(chunk).min(size);
    (start, start.saturating_add(chunk).min(size))
}

/// Whether a read starting in chunk `first` continues a stream whose last read ended in
/// chunk `last` (kernel readahead sends reads slightly out of order, so the chunk before
/// and the chunk after count too). The first read of a handle is sequential at offset 0.
pub fn is_sequential(last: Option<u64>, first: u64) -> bool {
    match last {
        None => first == 0,
        Some(l) => first + 1 >= l && first <= l + 1,
    }
}

/// The chunks to have in flight for a sequential read of `[first, last]`.
pub fn window(first: u64, last: u64, depth: u64, size: u64, chunk: u64) -> std::ops::RangeInclusive<u64> {
    let max = if size == 0 { 0 } else { (size - 1) / chunk };
    first..=(last.saturating_add(depth)).min(max)
}

type Cell = Arc<OnceCell<Result<Bytes, FsError>>>;

/// One chunk: its bytes once fetched, the task fetching it ahead (cancelled when the chunk
/// is dropped) and its share of the budget.
#[derive(Debug)]
struct Slot {
    cell: Cell,
    task: Option<tokio::task::AbortHandle>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// The read side of one open file.
#[derive(Debug)]
pub struct Reader {
    key: String,
    size: u64,
    /// The version opened.
    etag: Option<String>,
    chunk: u64,
    depth: u64,
    budget: Budget,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    last: Option<u64>,
    chunks: BTreeMap<u64, Slot>,
    /// The last failure: the kernel retries a failed readahead at once with a plain read,
    /// which would wait out the bound a second time; within `RETRY_FAST` it fails at once.
    failed: Option<(FsError, std::time::Instant)>,
}

/// How long after a failed read the same handle's reads fail at once.
pub const RETRY_FAST: std::time::Duration = std::time::Duration::from_secs(2);

async fn fetch(ctx: &S3Ctx, key: &str, etag: Option<&str>, i: u64, size: u64, chunk: u64) -> Result<Bytes, FsError> {
    let (start, end) = chunk_range(i, size, chunk);
    let b = ctx.get_range(key, start, end, etag).await?;
    if b.len() as u64 != end - start {
        return Err(FsError::new(
            libc::EIO,
            format!(
                "S3 GetObject on {}/{key} returned {} bytes for {start}..{end}: the object changed while open",
                ctx.bucket,
                b.len()
            ),
        ));
    }
    Ok(b)
}

impl Reader {
    /// The reader of version `etag` (when known) of `key`, `size` bytes.
    pub fn new(key: String, size: u64, etag: Option<String>, chunk: u64, depth: u64, budget: Budget) -> Self {
        Reader { key, size, etag, chunk: chunk.max(1), depth, budget, state: Mutex::new(State::default()) }
    }

    fn note_failure(&self, e: &FsError) {
        if let Ok(mut st) = self.state.lock() {
            st.failed = Some((e.clone(), std::time::Instant::now()));
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Chunks held (fetched or being fetched): tests.
    pub fn chunks_held(&self) -> usize {
        self.state.lock().map(|st| st.chunks.len()).unwrap_or(0)
    }

    /// Up to `len` bytes from `offset` (fewer at the end of the file).
    pub async fn read(&self, ctx: &Arc<S3Ctx>, offset: u64, len: u64) -> Result<Bytes, FsError> {
        let Some((first, last)) = chunk_span(offset, len, self.size, self.chunk) else {
            return Ok(Bytes::new());
        };
        let end = offset.saturating_add(len).min(self.size);
        let cells: Option<Vec<(u64, Cell)>> = {
            let mut st = self.state.lock().map_err(|_| FsError::new(libc::EIO, "a read handle's state is poisoned"))?;
            if let Some((e, at)) = &st.failed {
                if at.elapsed() < RETRY_FAST {
                    return Err(e.clone());
                }
                st.failed = None;
            }
            let seq = is_sequential(st.last, first);
            st.last = Some(last);
            if seq {
                let keep_from = first.saturating_sub(1);
                st.chunks.retain(|i, _| *i >= keep_from);
                for i in window(first, last, self.depth, self.size, self.chunk) {
                    if st.chunks.contains_key(&i) {
                        continue;
                    }
                    let (cs, ce) = chunk_range(i, self.size, self.chunk);
                    let permit = self.budget.try_take(ce - cs);
                    if permit.is_none() && i > last {
                        // The budget is spent: no reading ahead.
                        break;
                    }
                    let cell: Cell = Arc::new(OnceCell::new());
                    let (ctx, key, etag, size, chunk) =
                        (ctx.clone(), self.key.clone(), self.etag.clone(), self.size, self.chunk);
                    let c = cell.clone();
                    let task = tokio::spawn(async move {
                        c.get_or_init(|| async { fetch(&ctx, &key, etag.as_deref(), i, size, chunk).await }).await;
                    });
                    st.chunks.insert(i, Slot { cell, task: Some(task.abort_handle()), _permit: permit });
                }
                Some((first..=last).filter_map(|i| st.chunks.get(&i).map(|s| (i, s.cell.clone()))).collect())
            } else {
                // Cancels the prefetches of the stream that ended.
                st.chunks.clear();
                None
            }
        };
        let Some(cells) = cells else {
            return ctx
                .get_range(&self.key, offset, end, self.etag.as_deref())
                .await
                .inspect_err(|e| self.note_failure(e));
        };
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        for (i, cell) in cells {
            let (key, etag, size, chunk) = (&self.key, self.etag.as_deref(), self.size, self.chunk);
            let data = cell.get_or_init(|| async { fetch(ctx, key, etag, i, size, chunk).await }).await;
            let data = match data {
                Ok(d) => d,
                Err(e) => {
                    // A failed chunk is forgotten, so that the next read tries again.
                    if let Ok(mut st) = self.state.lock() {
                        st.chunks.remove(&i);
                    }
                    self.note_failure(e);
                    return Err(e.clone());
                }
            };
            let (cs, ce) = chunk_range(i, size, chunk);
            let from = offset.max(cs) - cs;
            let to = end.min(ce) - cs;
            out.extend_from_slice(&data[from as usize..to as usize]);
        }
        Ok(out.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: u64 = 8 << 20;

    #[test]
    fn spans_cover_exactly_the_chunks_touched() {
        assert_eq!(chunk_span(0, 4096, 100, C), Some((0, 0)));
        assert_eq!(chunk_span(100, 10, 100, C), None, "at the end");
        assert_eq!(chunk_span(C - 1, 2, 3 * C, C), Some((0, 1)));
        assert_eq!(chunk_span(C, C, 3 * C, C), Some((1, 1)));
        assert_eq!(chunk_span(2 * C, 10 * C, 3 * C, C), Some((2, 2)), "clipped at the size");
        assert_eq!(chunk_range(2, 2 * C + 5, C), (2 * C, 2 * C + 5));
        assert_eq!(chunk_range(0, 10, C), (0, 10));
    }

    #[test]
    fn sequential_streams_are_recognised_despite_small_reordering() {
        assert!(is_sequential(None, 0));
        assert!(!is_sequential(None, 5), "a first read in the middle is random");
        assert!(is_sequential(Some(3), 3));
        assert!(is_sequential(Some(3), 4));
        assert!(is_sequential(Some(3), 2), "readahead out of order");
        assert!(!is_sequential(Some(3), 9));
        assert!(!is_sequential(Some(9), 3));
    }

    #[test]
    fn the_window_is_bounded_by_depth_and_size() {
        assert_eq!(window(0, 0, 3, 100 * C, C), 0..=3);
        assert_eq!(window(5, 6, 3, 100 * C, C), 5..=9);
        assert_eq!(window(0, 0, 3, 2 * C, C), 0..=1, "a 2-chunk file");
        assert_eq!(window(0, 0, 3, 10, C), 0..=0);
    }
}
