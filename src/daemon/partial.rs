//! Partial WAL objects (issue 16): the bytes of the segment being received, uploaded before the
//! segment is complete, so that the archive loses at most `partial_wal_upload_interval`
//! seconds of WAL instead of up to a whole segment (unbounded in time on a quiet database).
//!
//! Layout (docs/formats.md): `xlog_partial/<segment>/<from>-<to>`, offsets within the segment
//! as 8 upper-case hex digits, each object holding only the bytes `from..to` that no earlier
//! object of the segment holds, through the same compression + encryption pipeline and with
//! the same metadata as a segment (hash of the plain bytes, sizes, codec, key id) plus the
//! LSN range (`start-lsn`, `end-lsn`) and the segment size. Objects are immutable: a range
//! already stored is compared by its recorded hash and never written again; other bytes for
//! it stop the segment's partial uploads and raise `wal_overwrite_<site>`. Once the complete
//! segment (or a timeline's `.partial`) is stored its partial objects are deleted; leftovers
//! are deleted at start and by retention. Only keys in this layout are ever deleted.
//!
//! One batch at a time per site ([`walhoard_walreceiver::InFlight`]), serialized with the
//! deletions by one lock, so a batch for a segment that has just been archived is dropped
//! instead of leaving an object behind.

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use walhoard_protocol::{Lsn, SegmentId, SegmentSize};
use walhoard_walreceiver::{Batch, BatchSink, InFlight, PartialUploads};

use super::archiver::{wal_overwrite_alert, UploadContext};
use super::status::{Alerts, SiteStatus};
use crate::pipeline::transfer::{upload, upload_made_into, Source, StoreMade, Upload};
use crate::storage::meta::{ObjectMeta, WALHOARD_WRITER_VALUE};
use crate::storage::retry::with_retries;
use crate::storage::StorageError;

mod layout;
pub mod log;

pub use layout::*;

/// When the bytes of the segment being received go up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cadence {
    /// `partial_wal_upload_interval`.
    Every(std::time::Duration),
    /// `synchronous_archive`: as soon as they arrive and the previous batch is stored; the
    /// flush position reported to the server then counts only what the store holds.
    OnArrival,
}

impl Cadence {
    /// A site's cadence, `None` when partial uploads are off.
    pub fn of_site(site: &crate::config::SiteConfig) -> Option<Cadence> {
        if site.synchronous_archive {
            Some(Cadence::OnArrival)
        } else {
            site.partial_wal_upload_interval.get().map(Cadence::Every)
        }
    }
}

/// A stored part of the segment being uploaded, and whether its bytes were compared with ours.
#[derive(Debug)]
struct Known {
    part: Part,
    checked: bool,
}

#[derive(Debug, Default)]
struct State {
    /// The segment last uploaded to and its stored parts.
    current: Option<(SegmentId, Vec<Known>)>,
    /// Segments this run stored parts of, by their end: deleted once the archive passes it
    /// (both timelines' copies of a segment a timeline switch falls in end alike).
    written: BTreeSet<(Lsn, SegmentId)>,
    /// Segments whose stored parts hold other bytes: no more parts for them.
    refused: BTreeSet<SegmentId>,
    /// Segments with parts found at start, not archived then: added to `written` once the
    /// segment size is known.
    leftover: BTreeSet<SegmentId>,
}

/// Where the contiguous run from offset 0 of `parts` (sorted) ends: [`chain_from_zero`]'s
/// end without collecting the run. Every batch asks, and a synchronous site's segment has a
/// part per commit: copying them all to ask cost every commit an allocation per part so far
/// (issue 16).
fn chain_end<'a>(parts: impl IntoIterator<Item = &'a Part>) -> u64 {
    let mut end = 0;
    for p in parts {
        if p.range.from == end {
            end = p.range.to;
        } else if p.range.from > end || p.range.to > end {
            break;
        }
    }
    end
}

/// Where the part log records among `known` end (`None` when there are none).
fn log_records_end(known: &[Known]) -> Option<u64> {
    known
        .iter()
        .filter(|k| k.part.record.is_some())
        .map(|k| k.part.range.to)
        .max()
}

/// A site's partial uploads. Cloning shares it.
#[derive(Clone)]
pub struct PartialArchiver {
    ctx: Arc<UploadContext>,
    status: Arc<SiteStatus>,
    alerts: Alerts,
    archived: watch::Receiver<Lsn>,
    durable: Arc<watch::Sender<Lsn>>,
    state: Arc<Mutex<State>>,
    /// The server's segment size, once connected.
    seg: Arc<std::sync::OnceLock<SegmentSize>>,
    /// The last of the receiver's sessions (`Connected` events) the site loop checked, or
    /// [`CLOSED`] once it stopped: batches handed straight to the archiver
    /// ([`PartialArchiver::sink`]) wait for their session's check, as those going through
    /// the site loop come after it.
    vetted: Arc<watch::Sender<u64>>,
    /// A synchronous site on local storage: its parts go into the segment's part log
    /// ([`log`]), whose open writer (the current segment's) this holds.
    log: Option<Arc<std::sync::Mutex<Option<log::LogWriter>>>>,
}

/// [`PartialArchiver::vetted`]: no more batches.
const CLOSED: u64 = u64::MAX;

impl PartialArchiver {
    /// `archived` is the archive's end (complete segments); `durable` is told the end
    /// including partial objects.
    pub fn new(
        ctx: Arc<UploadContext>,
        status: Arc<SiteStatus>,
        alerts: Alerts,
        archived: watch::Receiver<Lsn>,
        durable: watch::Sender<Lsn>,
    ) -> Self {
        PartialArchiver {
            ctx,
            status,
            alerts,
            archived,
            durable: Arc::new(durable),
            state: Arc::new(Mutex::new(State::default())),
            seg: Arc::default(),
            vetted: Arc::new(watch::channel(0).0),
            log: None,
        }
    }

    /// Stores parts as records of each segment's part log ([`log`]) on local storage
    /// (objects on any other store). For the synchronous mode: one `pwrite` and
    /// `fdatasync` per commit batch instead of two new files, their renames and a directory
    /// sync.
    pub fn with_part_log(mut self) -> Self {
        if self.ctx.store.kind() == crate::storage::StorageKind::Local {
            self.log = Some(Arc::default());
        }
        self
    }

    /// The writer slot of a part log, or `None` when parts are objects.
    fn log_slot(&self) -> Option<&Arc<std::sync::Mutex<Option<log::LogWriter>>>> {
        self.log.as_ref()
    }

    /// For a site with partial uploads at `cadence`: the receiver's half (the durable end it
    /// reads) and the archiver.
    pub fn for_site(
        cadence: Cadence,
        ctx: Arc<UploadContext>,
        status: Arc<SiteStatus>,
        alerts: Alerts,
        archived: watch::Receiver<Lsn>,
    ) -> (PartialUploads, Self) {
        let (durable_tx, durable) = watch::channel(Lsn::INVALID);
        let receiver = match cadence {
            Cadence::Every(interval) => PartialUploads::Every { interval, durable },
            Cadence::OnArrival => PartialUploads::OnArrival {
                durable,
                sink: None,
            },
        };
        let archiver = PartialArchiver::new(ctx, status, alerts, archived, durable_tx);
        let archiver = match cadence {
            Cadence::OnArrival => archiver.with_part_log(),
            Cadence::Every(_) => archiver,
        };
        (receiver, archiver)
    }

    /// On `tracker` until `abort`: leftovers of earlier runs first, then, each time the
    /// archive's end moves, the parts of the segments it now holds complete are deleted.
    pub fn follow_archive(&self, tracker: &TaskTracker, abort: &CancellationToken) {
        let (this, abort) = (self.clone(), abort.clone());
        let mut archived = self.archived.clone();
        tracker.spawn(async move {
            let follow = async {
                this.clean_leftovers().await;
                loop {
                    let at = *archived.borrow_and_update();
                    this.archived_moved(at).await;
                    if archived.changed().await.is_err() {
                        return;
                    }
                }
            };
            tokio::select! {
                _ = abort.cancelled() => {}
                _ = follow => {}
            }
        });
    }

    /// Stores a batch the receiver handed on ([`PartialArchiver::upload`]) on `tracker`;
    /// `in_flight` is dropped only then, so the receiver hands on the next batch after it.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn_batch(
        &self,
        tracker: &TaskTracker,
        abort: &CancellationToken,
        id: SegmentId,
        start: Lsn,
        seg: SegmentSize,
        offset: u64,
        data: Bytes,
        in_flight: InFlight,
    ) {
        let (this, abort) = (self.clone(), abort.clone());
        tracker.spawn(async move {
            this.upload(id, start, seg, offset, data, &abort).await;
            drop(in_flight);
        });
    }

    /// The server's segment size (a connection reported it); `session` is the receiver's
    /// `Connected` event the site loop checked: its batches may be stored.
    pub fn connected(&self, seg: SegmentSize, session: u64) {
        let _ = self.seg.set(seg);
        self.vetted.send_if_modified(|v| {
            let later = *v != CLOSED && session > *v;
            if later {
                *v = session;
            }
            later
        });
    }

    /// The site loop stopped: batches waiting for their session's check are dropped.
    pub fn close(&self) {
        self.vetted.send_replace(CLOSED);
    }

    /// Where a synchronous receiver on a thread of its own ([`super::own_thread`]) hands its
    /// batches: each is spawned there (on `tracker` and `batches`), waits for its session to
    /// be checked ([`PartialArchiver::connected`]), and is stored with its write in place
    /// ([`crate::pipeline::blocking`]); the token is dropped only then. Nothing of a
    /// connection is stored before the site loop checked whose cluster it reached.
    pub fn sink(
        &self,
        tracker: &TaskTracker,
        batches: &TaskTracker,
        abort: &CancellationToken,
    ) -> BatchSink {
        let (this, tracker, batches, abort) = (
            self.clone(),
            tracker.clone(),
            batches.clone(),
            abort.clone(),
        );
        BatchSink(Arc::new(move |batch: Batch| {
            let (this, abort) = (this.clone(), abort.clone());
            let Batch {
                session,
                seg,
                id,
                start,
                offset,
                data,
                in_flight,
            } = batch;
            tracker.spawn(batches.track_future(async move {
                let mut vetted = this.vetted.subscribe();
                let checked = tokio::select! {
                    _ = abort.cancelled() => false,
                    v = vetted.wait_for(|v| *v >= session) => v.is_ok_and(|v| *v != CLOSED),
                };
                if checked {
                    let upload = this.upload(id, start, seg, offset, data, &abort);
                    crate::pipeline::blocking::may_block(upload).await;
                }
                drop(in_flight);
            }));
        }))
    }

    fn publish(&self, durable: Lsn) {
        self.durable.send_if_modified(|d| {
            let raised = durable > *d;
            if raised {
                *d = durable;
            }
            raised
        });
        self.status.set_durable(durable);
    }

    /// Stores the bytes `data` of segment `id` (starting at `start`) from `offset` on: the
    /// part of them no stored object holds, after comparing the stored ones they cover.
    /// Retries until stored or `cancel` fires.
    pub async fn upload(
        &self,
        id: SegmentId,
        start: Lsn,
        seg: SegmentSize,
        offset: u64,
        data: Bytes,
        cancel: &CancellationToken,
    ) {
        let site = &self.ctx.site;
        let mut st = self.state.lock().await;
        let seg_end = start + seg.bytes();
        let archived = *self.archived.borrow();
        // Complete already; or not the first segment the archive lacks (the receiver hands
        // on none of those): parts would extend nothing.
        if archived >= seg_end || archived < start || st.refused.contains(&id) {
            return;
        }
        if st.current.as_ref().is_none_or(|(c, _)| *c != id) {
            let Some(known) = self.list_known(id, &mut st, cancel).await else {
                return;
            };
            st.current = Some((id, known));
        }
        // The log's own end, its writer opened (after any append still running for a batch
        // whose connection was cancelled): records the listing does not know are listed.
        if let Some(log_end) = self.log_end(id, seg).await {
            let known_end = st.current.as_ref().and_then(|(_, k)| log_records_end(k));
            match log_end {
                Ok(e) if e == known_end => {}
                Ok(_) => {
                    let Some(known) = self.list_known(id, &mut st, cancel).await else {
                        return;
                    };
                    st.current = Some((id, known));
                }
                Err(e) => {
                    tracing::warn!(%site, segment = %id, error = %e, "cannot open the segment's part log; trying with the next batch");
                    return;
                }
            }
        }
        let _ = self.seg.set(seg);
        let end = offset + data.len() as u64;
        let has_parts = st.current.as_ref().is_some_and(|(_, k)| !k.is_empty());
        if has_parts {
            // Stored by an earlier run or session: deleted with this run's.
            st.written.insert((seg_end, id));
        }
        let Some((_, known)) = st.current.as_mut() else {
            return;
        };
        let chain_end = chain_end(known.iter().map(|k| &k.part));
        if offset > chain_end {
            tracing::warn!(%site, segment = %id, offset, chain_end, "these bytes do not continue the segment's partial objects; waiting for the complete segment");
            return;
        }
        // Stored parts these bytes cover whole: the same bytes, or a refusal.
        for k in known.iter_mut().filter(|k| !k.checked) {
            let r = k.part.range;
            if r.from < offset || r.to > end {
                continue;
            }
            let ours = data.slice((r.from - offset) as usize..(r.to - offset) as usize);
            match self.compare(&k.part, ours).await {
                Ok(None) => k.checked = true,
                Ok(Some(why)) => {
                    let detail = format!("site {site}: partial WAL object {} is already stored with other content ({why}); refusing to replace it: no more partial objects of segment {id}, which is archived when complete", k.part.label());
                    tracing::error!(%site, object = %k.part.key, "{detail}");
                    self.status.set_error(detail.clone());
                    self.alerts.raise(&wal_overwrite_alert(site), &detail);
                    st.refused.insert(id);
                    return;
                }
                Err(e) => {
                    tracing::warn!(%site, object = %k.part.key, error = %e, "cannot compare with the stored partial object; trying with the next batch");
                    return;
                }
            }
        }
        let mut durable_to = chain_end;
        if end > chain_end {
            let key = partial_key(&id, chain_end, end);
            let metadata = ObjectMeta {
                start_lsn: Some(start + chain_end),
                end_lsn: Some(start + end),
                wal_segment_size: Some(seg.bytes()),
                ..self.ctx.wal_metadata()
            };
            let new = data.slice((chain_end - offset) as usize..);
            let range = PartRange {
                from: chain_end,
                to: end,
            };
            // Into the part log when there is one and its records end where these bytes
            // start (a segment begun as objects, before the site turned synchronous, goes
            // on as objects).
            let log_end = log_records_end(known);
            let into_log = (self.log_slot().is_some() && log_end.is_none_or(|e| e == chain_end))
                .then_some((id, seg, range));
            let key = match into_log {
                Some(_) => log::log_key(&id),
                None => key,
            };
            if !self
                .put_until_stored(&key, new, metadata, into_log, cancel)
                .await
            {
                return;
            }
            tracing::debug!(%site, object = %key, "partial WAL stored");
            self.status.partial_uploaded(end - chain_end);
            let record = into_log.and_then(|_| {
                let slot = self.log_slot()?.lock().unwrap_or_else(|p| p.into_inner());
                let (at, len) = slot.as_ref()?.last_record()?;
                Some(InLog {
                    at,
                    len,
                    damage: None,
                })
            });
            known.push(Known {
                part: Part { range, key, record },
                checked: true,
            });
            st.written.insert((seg_end, id));
            durable_to = end;
        }
        drop(st);
        self.publish(start + durable_to);
    }

    /// Lists segment `id`'s stored parts, none of them compared yet; `None` (after a
    /// warning) when that failed or was cancelled, or when a part log of it is damaged (the
    /// segment is then refused: archived when complete, no more parts).
    async fn list_known(
        &self,
        id: SegmentId,
        st: &mut State,
        cancel: &CancellationToken,
    ) -> Option<Vec<Known>> {
        let site = &self.ctx.site;
        let listed = tokio::select! {
            _ = cancel.cancelled() => return None,
            l = with_retries(&self.ctx.retry, PARTIAL_DIR, || list_parts(&self.ctx.store, Some(&id))) => l,
        };
        let parts = match listed {
            Ok(mut l) => l.remove(&id).unwrap_or_default(),
            Err(e) => {
                tracing::warn!(%site, segment = %id, error = %e, "cannot list the segment's partial objects; trying with the next batch");
                return None;
            }
        };
        if let Some(bad) = parts.iter().find_map(|p| {
            p.record
                .as_ref()
                .and_then(|r| r.damage.as_ref())
                .map(|why| (p.label(), why))
        }) {
            let detail = format!("site {site}: partial WAL of segment {id} is damaged ({}: {}); no more parts of it are stored, it is archived when complete", bad.0, bad.1);
            tracing::error!(%site, segment = %id, "{detail}");
            self.status.set_error(detail.clone());
            self.alerts.raise(&wal_overwrite_alert(site), &detail);
            st.refused.insert(id);
            return None;
        }
        Some(
            parts
                .into_iter()
                .map(|part| Known {
                    part,
                    checked: false,
                })
                .collect(),
        )
    }

    /// With a part log: the end of segment `id`'s log records (`None` when it holds none),
    /// its writer opened (finding the end) or the log created first when needed, under the
    /// writer's lock. `None` when parts are objects.
    async fn log_end(
        &self,
        id: SegmentId,
        seg: SegmentSize,
    ) -> Option<Result<Option<u64>, StorageError>> {
        let slot = self.log_slot()?.clone();
        // The writer open and idle (every batch but a segment's first): no hand-off to a
        // blocking thread, which every synchronous commit would wait for.
        if let Ok(g) = slot.try_lock() {
            if let Some(w) = g.as_ref().filter(|w| w.segment() == id) {
                return Some(Ok(w.last_to()));
            }
        }
        let key = log::log_key(&id);
        let (path, tmp) = match self.ctx.store.local_file(&key) {
            Ok(Some(x)) => x,
            Ok(None) => return None,
            Err(e) => return Some(Err(e)),
        };
        let opened = tokio::task::spawn_blocking(move || {
            let mut g = slot.lock().unwrap_or_else(|p| p.into_inner());
            if g.as_ref().is_none_or(|w| w.segment() != id) {
                *g = None;
                *g = Some(log::LogWriter::open(
                    &path,
                    &tmp,
                    id,
                    seg,
                    WALHOARD_WRITER_VALUE,
                )?);
            }
            Ok(g.as_ref().and_then(|w| w.last_to()))
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
        .and_then(|r| r);
        Some(opened.map_err(|source| StorageError::Io {
            action: "open the part log",
            key,
            source,
        }))
    }

    /// `None` when the stored part records the hash of `ours`; else why not.
    async fn compare(&self, part: &Part, ours: Bytes) -> Result<Option<String>, StorageError> {
        let stored = match &part.record {
            None => self.ctx.store.object_meta(&part.key).await?,
            Some(_) => {
                let rec = open_log_record(&self.ctx.store, part).await?;
                record_meta(part, &rec.meta)?
            }
        };
        let Some(hash) = stored.hash.as_deref() else {
            return Ok(Some("it records no hash to compare with".into()));
        };
        let algorithm = stored.hash_algorithm_or_default();
        let mut h = algorithm.hasher();
        h.update(&ours);
        let mine = h.finish_hex();
        Ok((!mine.eq_ignore_ascii_case(hash))
            .then(|| format!("its {algorithm} is {hash}, the WAL received is {mine}")))
    }

    /// Uploads one part until it is stored (the daemon's one retry loop,
    /// [`UploadContext::retry_until_stored`]): as an object at `key`, or with `into_log` as a
    /// record of the segment's part log; false when cancelled first.
    async fn put_until_stored(
        &self,
        key: &str,
        data: Bytes,
        metadata: ObjectMeta,
        into_log: Option<(SegmentId, SegmentSize, PartRange)>,
        cancel: &CancellationToken,
    ) -> bool {
        let ctx = &self.ctx;
        let len = data.len() as u64;
        ctx.retry_until_stored(
            key,
            || len,
            &self.status,
            cancel,
            || {
                let wal = Upload::wal(
                    key,
                    Source::bytes(data.clone()),
                    ctx.compression,
                    ctx.encryption.clone(),
                    ctx.hash_algorithm,
                );
                let upload_one = Upload {
                    metadata: metadata.clone(),
                    ..wal
                };
                let sink = into_log.and_then(|(id, seg, range)| self.log_sink(id, seg, range));
                async move {
                    let result = match sink {
                        Some(sink) => upload_made_into(&ctx.store, upload_one, sink).await,
                        None => upload(&ctx.store, upload_one).await,
                    };
                    // Counted as WAL uploads (pghoard.upload_size, type xlog): what the store gets.
                    let ty = crate::metrics::FileType::of_key(key);
                    crate::metrics::upload(
                        &ctx.site,
                        ty,
                        ctx.compression.algorithm.name(),
                        &result,
                    );
                    result.map(|_| ())
                }
            },
        )
        .await
    }

    /// Appends a made part to segment `id`'s part log, on the blocking thread that made it:
    /// the log opened (its end found) or created when the writer holds another segment's
    /// or none; after a failed append the writer is dropped, so the next attempt finds the
    /// log's end anew.
    fn log_sink(&self, id: SegmentId, seg: SegmentSize, range: PartRange) -> Option<StoreMade> {
        let slot = self.log_slot()?.clone();
        let key = log::log_key(&id);
        let (path, tmp) = self.ctx.store.local_file(&key).ok()??;
        Some(Box::new(move |object: &[u8], meta: &ObjectMeta| {
            let io = |action: &'static str, key: &str| {
                let key = key.to_string();
                move |source| StorageError::Io {
                    action,
                    key,
                    source,
                }
            };
            let json =
                serde_json::to_vec(&meta.to_map()).map_err(|e| StorageError::BadMetadata {
                    key: key.clone(),
                    message: e.to_string(),
                })?;
            let mut g = slot.lock().unwrap_or_else(|p| p.into_inner());
            if g.as_ref().is_none_or(|w| w.segment() != id) {
                *g = None;
                let w = log::LogWriter::open(&path, &tmp, id, seg, WALHOARD_WRITER_VALUE)
                    .map_err(io("open the part log", &key))?;
                *g = Some(w);
            }
            let w = g.as_mut().expect("opened above");
            w.append(range, &json, object).map_err(|e| {
                *g = None;
                io("append to", &key)(e)
            })
        }))
    }

    /// Closes the part log of segment `id` when it is the one open.
    fn close_log(&self, id: &SegmentId) {
        if let Some(slot) = self.log_slot() {
            let mut g = slot.lock().unwrap_or_else(|p| p.into_inner());
            if g.as_ref().is_some_and(|w| w.segment() == *id) {
                *g = None;
            }
        }
    }

    /// The archive's end moved to `archived`: the durable end follows, and the partial
    /// objects of segments now complete in the archive are deleted.
    ///
    /// The deletions run without the state lock: a segment takes one part per commit in the
    /// synchronous mode (a thousand and more), and while they were deleted under the lock the
    /// next segment's batches, which every commit waits for, waited too (issue 16: commits
    /// stalled 1-2 s after each segment). Without the lock nothing else touches these
    /// segments: their entries are gone from the state before it is released, and [`upload`]
    /// reads the archive's end (already moved) under the lock and stores no part of a segment
    /// the archive holds complete.
    ///
    /// [`upload`]: PartialArchiver::upload
    pub async fn archived_moved(&self, archived: Lsn) {
        self.publish(archived);
        for id in self.take_archived(archived).await {
            self.delete_if_complete(&id).await;
        }
    }

    /// Takes out of the state the segments written to whose end `archived` reached (and the
    /// leftovers of earlier runs, once the segment size is known): whose parts are to go.
    async fn take_archived(&self, archived: Lsn) -> Vec<SegmentId> {
        let mut st = self.state.lock().await;
        if let Some(seg) = self.seg.get().copied() {
            for id in std::mem::take(&mut st.leftover) {
                if let Ok(start) = id.start_lsn(seg) {
                    st.written.insert((start + seg.bytes(), id));
                }
            }
        }
        let done: Vec<(Lsn, SegmentId)> = st
            .written
            .iter()
            .take_while(|(end, _)| *end <= archived)
            .copied()
            .collect();
        let mut ids = Vec::with_capacity(done.len());
        for (end, id) in done {
            st.written.remove(&(end, id));
            if st.current.as_ref().is_some_and(|(c, _)| *c == id) {
                st.current = None;
            }
            self.close_log(&id);
            ids.push(id);
        }
        ids
    }

    /// Deletes segment `id`'s partial objects when the archive holds it complete; whether
    /// it did.
    async fn delete_if_complete(&self, id: &SegmentId) -> bool {
        let store = &self.ctx.store;
        let site = &self.ctx.site;
        match complete_in_archive(store, id).await {
            Ok(true) => match delete_parts(store, id).await {
                Ok(n) => {
                    if n > 0 {
                        tracing::info!(%site, segment = %id, objects = n, "deleted partial WAL objects of an archived segment");
                    }
                    true
                }
                Err(e) => {
                    tracing::warn!(%site, segment = %id, error = %e, "cannot delete partial WAL objects; retention or the next start deletes them");
                    false
                }
            },
            Ok(false) => false,
            Err(e) => {
                tracing::warn!(%site, segment = %id, error = %e, "cannot tell whether the segment is archived; its partial objects are kept");
                false
            }
        }
    }

    /// At start: deletes the partial objects of every segment the archive holds complete
    /// (left by a run that stopped between storing a segment and deleting its parts).
    pub async fn clean_leftovers(&self) {
        let listed = match segments_with_parts(&self.ctx.store).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(site = %self.ctx.site, error = %e, "cannot list partial WAL objects; leftovers stay until retention");
                return;
            }
        };
        let mut st = self.state.lock().await;
        for id in &listed {
            if !self.delete_if_complete(id).await {
                st.leftover.insert(*id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg_id(name: &str) -> SegmentId {
        match name.parse() {
            Ok(walhoard_protocol::WalSegmentName::Segment(id)) => id,
            other => panic!("{other:?}"),
        }
    }

    /// A partial archiver on `ctx` with a fresh status and its alerts under `dir`.
    fn archiver(
        ctx: UploadContext,
        dir: &std::path::Path,
        archived: watch::Receiver<Lsn>,
        durable: watch::Sender<Lsn>,
    ) -> PartialArchiver {
        let alerts = Alerts {
            dir: dir.join("alerts"),
        };
        PartialArchiver::new(
            Arc::new(ctx),
            Arc::new(SiteStatus::default()),
            alerts,
            archived,
            durable,
        )
    }

    /// Leftovers: at start the parts of segments archived complete (or as a timeline's
    /// `.partial`) go, those of a segment not archived stay (they are its only copy);
    /// retention deletes parts before the oldest backup. Keys outside the layout, and parts
    /// without walhoard's `walhoard-writer` mark, stay.
    #[tokio::test]
    async fn leftovers_and_retention_delete_only_walhoards_parts() {
        use crate::storage::Metadata;
        let dir = tempfile::tempdir().unwrap();
        let ctx = crate::daemon::archiver::tests::local_context(&dir.path().join("archive"));
        let store = ctx.store.clone();
        let m = Metadata::new();
        // What walhoard stores carries its mark; a part without it was not written by walhoard.
        let ours = ctx.wal_metadata().to_map();
        let (done, tl_end, open) = (
            seg_id("000000010000000000000001"),
            seg_id("000000010000000000000002"),
            seg_id("000000010000000000000005"),
        );
        for id in [done, tl_end, open] {
            for (a, b) in [(0, 0x100), (0x100, 0x300)] {
                store
                    .put_bytes(&partial_key(&id, a, b), b"x", &ours)
                    .await
                    .unwrap();
            }
        }
        let foreign = format!("{}/notes.txt", partial_dir(&done));
        store.put_bytes(&foreign, b"mine", &ours).await.unwrap();
        let unmarked = partial_key(&done, 0x300, 0x400);
        store.put_bytes(&unmarked, b"y", &m).await.unwrap();
        store
            .put_bytes("xlog/000000010000000000000001", b"s", &m)
            .await
            .unwrap();
        store
            .put_bytes("xlog/000000010000000000000002.partial", b"p", &m)
            .await
            .unwrap();
        let (_atx, archived) = watch::channel(Lsn::INVALID);
        let (durable, _drx) = watch::channel(Lsn::INVALID);
        let p = archiver(ctx, dir.path(), archived, durable);
        p.clean_leftovers().await;
        let left = list_parts(&store, None).await.unwrap();
        assert_eq!(left.keys().copied().collect::<Vec<_>>(), vec![done, open]);
        assert_eq!(
            left[&done].len(),
            1,
            "only the unmarked part stays: {left:?}"
        );
        assert!(store.stat(&foreign).await.unwrap().is_some());
        assert_eq!(delete_parts_before(&store, &open).await.unwrap(), 0);
        let next = seg_id("000000020000000000000006");
        assert_eq!(delete_parts_before(&store, &next).await.unwrap(), 2);
        let left = list_parts(&store, None).await.unwrap();
        assert_eq!(left.keys().copied().collect::<Vec<_>>(), vec![done]);
        assert!(store.stat(&foreign).await.unwrap().is_some());
        assert!(store.stat(&unmarked).await.unwrap().is_some());
    }

    /// `chain_end` agrees with `chain_from_zero` (which restore uses) on runs with gaps,
    /// overlaps and parts inside the run.
    #[test]
    fn chain_end_is_chain_from_zeros_end() {
        let part = |from, to| Part {
            range: PartRange { from, to },
            key: partial_key(&seg_id("000000010000000000000001"), from, to),
            record: None,
        };
        for parts in [
            vec![],
            vec![part(0, 10), part(10, 30), part(30, 31)],
            vec![part(0, 10), part(20, 30)],
            vec![part(5, 10)],
            vec![part(0, 10), part(0, 5), part(10, 12)],
            vec![part(0, 10), part(5, 15), part(15, 20)],
        ] {
            assert_eq!(chain_end(&parts), chain_from_zero(&parts).1, "{parts:?}");
        }
    }

    /// Issue 16: batches handed straight to the archiver by a synchronous receiver on its own
    /// thread are stored only once the site loop checked their session (whose cluster the
    /// connection reached), as those going through the site loop come after that check; the
    /// token goes only once the batch is stored; batches still waiting when the site loop
    /// stops are dropped, stored nowhere. Fails when the sink stores before the check.
    #[tokio::test]
    async fn sink_batches_wait_for_their_sessions_check() {
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let ctx = crate::daemon::archiver::tests::local_context(&dir.path().join("archive"));
        let store = ctx.store.clone();
        let seg = SegmentSize::DEFAULT;
        let id = seg_id("000000010000000000000003");
        let start = id.start_lsn(seg).unwrap();
        let (_atx, archived) = watch::channel(start);
        let (durable, mut durable_rx) = watch::channel(Lsn::INVALID);
        let p = archiver(ctx, dir.path(), archived, durable);
        let (tracker, batches, abort) = (
            TaskTracker::new(),
            TaskTracker::new(),
            CancellationToken::new(),
        );
        let sink = p.sink(&tracker, &batches, &abort);
        let done = Arc::new(tokio::sync::Notify::new());
        let batch = |session, offset: u64, len: usize| Batch {
            session,
            seg,
            id,
            start,
            offset,
            data: Bytes::from(vec![9u8; len]),
            in_flight: InFlight::standalone(done.clone()),
        };
        let stored = || async { list_parts(&store, Some(&id)).await.unwrap() };
        (sink.0)(batch(1, 0, 512));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            stored().await.is_empty(),
            "stored before its session was checked"
        );
        assert_eq!(*durable_rx.borrow(), Lsn::INVALID);
        let landed = done.notified();
        p.connected(seg, 1);
        tokio::time::timeout(Duration::from_secs(10), landed)
            .await
            .expect("the token goes once the batch is stored");
        assert_eq!(stored().await[&id].len(), 1);
        durable_rx
            .wait_for(|d| *d == start + 512)
            .await
            .expect("durable end published");
        // A later session, never checked: the site loop stops, the batch goes nowhere.
        let dropped = done.notified();
        (sink.0)(batch(2, 512, 256));
        tokio::time::sleep(Duration::from_millis(100)).await;
        p.close();
        tokio::time::timeout(Duration::from_secs(10), dropped)
            .await
            .expect("the token goes when the site loop stops");
        assert_eq!(stored().await[&id].len(), 1);
        batches.close();
        batches.wait().await;
    }

    /// Issue 16: the parts of a segment the archive now holds complete are deleted without
    /// the state lock, so the next segment's batch (which every synchronous commit waits for)
    /// is stored while they go, not after a thousand deletions. Fails when the deletions hold
    /// the lock: the batch is stored only once every part is gone.
    #[tokio::test]
    async fn parts_of_an_archived_segment_go_while_the_next_segment_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = crate::daemon::archiver::tests::local_context(&dir.path().join("archive"));
        let store = ctx.store.clone();
        let ours = ctx.wal_metadata().to_map();
        let seg = SegmentSize::DEFAULT;
        let (done, next) = (
            seg_id("000000010000000000000001"),
            seg_id("000000010000000000000002"),
        );
        const PARTS: u64 = 1500;
        for i in 0..PARTS {
            store
                .put_bytes(&partial_key(&done, i * 16, (i + 1) * 16), b"x", &ours)
                .await
                .unwrap();
        }
        let (archived_tx, archived) = watch::channel(Lsn::INVALID);
        let (durable, durable_rx) = watch::channel(Lsn::INVALID);
        let p = archiver(ctx, dir.path(), archived, durable);
        // Not complete yet: its parts stay, remembered as a leftover.
        p.clean_leftovers().await;
        assert_eq!(
            list_parts(&store, Some(&done)).await.unwrap()[&done].len(),
            PARTS as usize
        );
        p.connected(seg, 1);
        store
            .put_bytes("xlog/000000010000000000000001", b"s", &ours)
            .await
            .unwrap();
        let next_start = next.start_lsn(seg).unwrap();
        archived_tx.send(next_start).unwrap();
        let deleting = tokio::spawn({
            let p = p.clone();
            async move { p.archived_moved(next_start).await }
        });
        // Wait until the deletions are under way.
        loop {
            let left = list_parts(&store, Some(&done)).await.unwrap();
            if left.get(&done).map_or(0, |v| v.len()) < PARTS as usize {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let cancel = CancellationToken::new();
        p.upload(
            next,
            next_start,
            seg,
            0,
            Bytes::from_static(&[7u8; 256]),
            &cancel,
        )
        .await;
        assert_eq!(*durable_rx.borrow(), next_start + 256);
        let left = list_parts(&store, Some(&done)).await.unwrap();
        assert!(
            left.get(&done).is_some_and(|v| !v.is_empty()),
            "the next segment's batch waited for every deletion"
        );
        deleting.await.unwrap();
        assert!(list_parts(&store, Some(&done))
            .await
            .unwrap()
            .get(&done)
            .is_none_or(|v| v.is_empty()));
        assert_eq!(
            list_parts(&store, Some(&next)).await.unwrap()[&next].len(),
            1
        );
    }

    /// A synchronous site on local storage: parts are records of the segment's part log, no
    /// objects. A record the state does not know (a batch whose connection was cancelled
    /// while its append ran on, finished after) is found when the next batch comes, compared
    /// by its recorded hash and not written again; the batch's new bytes follow it. Fails
    /// (times out) when the state's stale end is appended at: the log refuses a record that
    /// does not continue it, for ever.
    #[tokio::test]
    async fn a_part_log_record_the_state_missed_is_compared_not_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = crate::daemon::archiver::tests::local_context(&dir.path().join("archive"));
        let store = ctx.store.clone();
        let (hash_algorithm, mark) = (ctx.hash_algorithm, ctx.wal_metadata());
        let seg = SegmentSize::DEFAULT;
        let id = seg_id("000000010000000000000002");
        let start = id.start_lsn(seg).unwrap();
        let (_archived_tx, archived) = watch::channel(start);
        let (durable, durable_rx) = watch::channel(Lsn::INVALID);
        let p = archiver(ctx, dir.path(), archived, durable).with_part_log();
        let data = Bytes::from((0..768u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        let cancel = CancellationToken::new();
        p.upload(id, start, seg, 0, data.slice(..256), &cancel)
            .await;
        assert_eq!(*durable_rx.borrow(), start + 256);
        {
            let mut h = hash_algorithm.hasher();
            h.update(&data[256..512]);
            let meta = ObjectMeta {
                hash: Some(h.finish_hex()),
                hash_algorithm: Some(hash_algorithm),
                ..mark
            };
            let json = serde_json::to_vec(&meta.to_map()).unwrap();
            let mut slot = p.log_slot().unwrap().lock().unwrap();
            let range = PartRange { from: 256, to: 512 };
            slot.as_mut()
                .unwrap()
                .append(range, &json, b"made")
                .unwrap();
        }
        tokio::time::timeout(
            std::time::Duration::from_secs(20),
            p.upload(id, start, seg, 0, data.clone(), &cancel),
        )
        .await
        .expect("the batch after a record the state missed was never stored");
        assert_eq!(*durable_rx.borrow(), start + 768);
        let parts = list_parts(&store, Some(&id))
            .await
            .unwrap()
            .remove(&id)
            .unwrap();
        let ranges: Vec<(u64, u64)> = parts.iter().map(|p| (p.range.from, p.range.to)).collect();
        assert_eq!(ranges, [(0, 256), (256, 512), (512, 768)]);
        assert!(parts.iter().all(|p| p.record.is_some()), "{parts:?}");
        let keys: Vec<String> = store
            .list(&partial_dir(&id))
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(keys, [log::log_key(&id)]);
        // Complete in the archive: the log goes with the parts.
        store
            .put_bytes(
                "xlog/000000010000000000000002",
                b"s",
                &ObjectMeta::default().to_map(),
            )
            .await
            .unwrap();
        assert!(p.delete_if_complete(&id).await);
        assert!(store.list(&partial_dir(&id)).await.unwrap().is_empty());
    }

    /// A segment begun as part objects (asynchronous mode) goes on in a part log once the
    /// site is synchronous: the stored object is compared, the new bytes become the log's
    /// first record (at a non-zero offset), and readers merge both into one run from 0. The
    /// log's record is made by the streaming compressor (snappy: no one-shot path) and reads
    /// back through restore's checks.
    #[tokio::test]
    async fn a_segment_begun_as_objects_goes_on_in_a_part_log_and_reads_back_whole() {
        use crate::pipeline::compression::{Algorithm, CompressionSettings};
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("archive");
        let seg = SegmentSize::DEFAULT;
        let id = seg_id("000000010000000000000002");
        let start = id.start_lsn(seg).unwrap();
        let data = Bytes::from((0..4096u32).map(|i| (i % 253) as u8).collect::<Vec<u8>>());
        let cancel = CancellationToken::new();
        let (_archived_tx, archived) = watch::channel(start);
        let (durable, durable_rx) = watch::channel(Lsn::INVALID);
        let ctx = crate::daemon::archiver::tests::local_context(&archive);
        let store = ctx.store.clone();
        let objects = archiver(ctx, dir.path(), archived.clone(), durable);
        objects
            .upload(id, start, seg, 0, data.slice(..1000), &cancel)
            .await;
        assert_eq!(*durable_rx.borrow(), start + 1000);
        let mut ctx = crate::daemon::archiver::tests::local_context(&archive);
        ctx.compression = CompressionSettings::new(Algorithm::Snappy);
        let (durable, durable_rx) = watch::channel(Lsn::INVALID);
        let logged = archiver(ctx, dir.path(), archived, durable).with_part_log();
        logged
            .upload(id, start, seg, 0, data.clone(), &cancel)
            .await;
        assert_eq!(*durable_rx.borrow(), start + 4096);
        let parts = list_parts(&store, Some(&id))
            .await
            .unwrap()
            .remove(&id)
            .unwrap();
        let kinds: Vec<(u64, u64, bool)> = parts
            .iter()
            .map(|p| (p.range.from, p.range.to, p.record.is_some()))
            .collect();
        assert_eq!(kinds, [(0, 1000, false), (1000, 4096, true)]);
        let (chain, end) = chain_from_zero(&parts);
        assert_eq!((chain.len(), end), (2, 4096));
        let keys = crate::pipeline::encryption::KeyRing::default();
        let mut whole = Vec::new();
        for p in &parts {
            let (s, out) = crate::restore::partial::read_part(&store, &keys, &id, p, Vec::new())
                .await
                .unwrap();
            assert_eq!(s, seg);
            whole.extend(out);
        }
        assert_eq!(whole, data.to_vec());
    }

    /// Part logs are deleted as part objects are (at start once their segment is archived
    /// complete, by retention before the oldest backup), and only those whose header
    /// carries walhoard's mark: a log with another writer's stays.
    #[tokio::test]
    async fn leftover_part_logs_go_only_when_walhoards() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = crate::daemon::archiver::tests::local_context(&dir.path().join("archive"));
        let store = ctx.store.clone();
        let seg = SegmentSize::DEFAULT;
        let (done, foreign, open) = (
            seg_id("000000010000000000000001"),
            seg_id("000000010000000000000002"),
            seg_id("000000010000000000000005"),
        );
        for (id, mark) in [
            (done, WALHOARD_WRITER_VALUE),
            (foreign, "someone else"),
            (open, WALHOARD_WRITER_VALUE),
        ] {
            let (path, tmp) = store.local_file(&log::log_key(&id)).unwrap().unwrap();
            let mut w = log::LogWriter::open(&path, &tmp, id, seg, mark).unwrap();
            w.append(PartRange { from: 0, to: 16 }, b"{}", b"x")
                .unwrap();
        }
        let m = ObjectMeta::default().to_map();
        for name in ["000000010000000000000001", "000000010000000000000002"] {
            store
                .put_bytes(&format!("xlog/{name}"), b"s", &m)
                .await
                .unwrap();
        }
        let (_atx, archived) = watch::channel(Lsn::INVALID);
        let (durable, _drx) = watch::channel(Lsn::INVALID);
        let p = archiver(ctx, dir.path(), archived, durable);
        p.clean_leftovers().await;
        let left = segments_with_parts(&store).await.unwrap();
        assert_eq!(left.into_iter().collect::<Vec<_>>(), vec![foreign, open]);
        let next = seg_id("000000010000000000000006");
        assert_eq!(delete_parts_before(&store, &next).await.unwrap(), 1);
        let left = segments_with_parts(&store).await.unwrap();
        assert_eq!(left.into_iter().collect::<Vec<_>>(), vec![foreign]);
    }
}
