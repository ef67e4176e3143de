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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;
use walhoard_protocol::{Backoff, Lsn, SegmentId, SegmentSize, WalSegmentName};

use super::archiver::{wal_key, wal_overwrite_alert, UploadContext};
use super::status::{Alerts, SiteStatus};
use crate::pipeline::transfer::{upload, Source, Upload};
use crate::storage::meta::ObjectMeta;
use crate::storage::retry::with_retries;
use crate::storage::{ObjectStore, StorageError};

/// The directory (key prefix) of all partial WAL objects of a site.
pub const PARTIAL_DIR: &str = "xlog_partial";

/// The key prefix of segment `id`'s partial objects.
pub fn partial_dir(id: &SegmentId) -> String {
    format!("{PARTIAL_DIR}/{}", WalSegmentName::Segment(*id))
}

/// The key of the partial object holding bytes `from..to` of segment `id`.
pub fn partial_key(id: &SegmentId, from: u64, to: u64) -> String {
    format!("{}/{from:08X}-{to:08X}", partial_dir(id))
}

/// The bytes `from..to` of a segment that one partial object holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PartRange {
    pub from: u64,
    pub to: u64,
}

impl PartRange {
    /// Parses the last part of a partial object's key (`0000A000-0000B000`); `None` for
    /// anything else, which is never read or deleted.
    pub fn parse(name: &str) -> Option<Self> {
        let (a, b) = name.split_once('-')?;
        let hex = |s: &str| {
            (s.len() == 8
                && s.bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase()))
            .then(|| u64::from_str_radix(s, 16).ok())
            .flatten()
        };
        let (from, to) = (hex(a)?, hex(b)?);
        (from < to).then_some(PartRange { from, to })
    }

    pub fn bytes(&self) -> u64 {
        self.to - self.from
    }
}

/// One stored partial object.
#[derive(Debug, Clone)]
pub struct Part {
    pub range: PartRange,
    pub key: String,
}

/// The partial objects in the store, by segment (only keys in the layout), each segment's in
/// order of offset. `only` restricts the listing to one segment.
pub async fn list_parts(
    store: &ObjectStore,
    only: Option<&SegmentId>,
) -> Result<BTreeMap<SegmentId, Vec<Part>>, StorageError> {
    let dir = only.map_or_else(|| PARTIAL_DIR.to_string(), partial_dir);
    let mut out: BTreeMap<SegmentId, Vec<Part>> = BTreeMap::new();
    for o in store.list(&dir).await? {
        let Some(rest) = o
            .key
            .strip_prefix(PARTIAL_DIR)
            .and_then(|r| r.strip_prefix('/'))
        else {
            continue;
        };
        let Some((seg, name)) = rest.split_once('/') else {
            continue;
        };
        let (Ok(WalSegmentName::Segment(id)), Some(range)) = (seg.parse(), PartRange::parse(name))
        else {
            continue;
        };
        out.entry(id).or_default().push(Part { range, key: o.key });
    }
    for parts in out.values_mut() {
        parts.sort_by_key(|p| p.range);
    }
    Ok(out)
}

/// The contiguous run of `parts` (sorted) from offset 0, and where it ends. A part that starts
/// inside the run without continuing it exactly (never written by walhoard) ends the run.
pub fn chain_from_zero(parts: &[Part]) -> (Vec<&Part>, u64) {
    let mut end = 0;
    let mut chain = Vec::new();
    for p in parts {
        if p.range.from == end {
            end = p.range.to;
            chain.push(p);
        } else if p.range.from > end || p.range.to > end {
            break;
        }
    }
    (chain, end)
}

/// Deletes the partial objects of segment `id` (only keys in the layout); returns how many.
pub async fn delete_parts(store: &ObjectStore, id: &SegmentId) -> Result<usize, StorageError> {
    let parts = list_parts(store, Some(id)).await?;
    let mut n = 0;
    for p in parts.get(id).into_iter().flatten() {
        store.delete(&p.key).await?;
        n += 1;
    }
    Ok(n)
}

/// Whether the archive holds segment `id` complete, or as its timeline's last `.partial`.
async fn complete_in_archive(store: &ObjectStore, id: &SegmentId) -> Result<bool, StorageError> {
    for name in [WalSegmentName::Segment(*id), WalSegmentName::Partial(*id)] {
        if store.stat(&wal_key(&name)).await?.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Retention: deletes the partial objects of segments before `first` (the oldest kept
/// basebackup's start segment, compared by position whatever the timeline); returns how many.
pub async fn delete_parts_before(
    store: &ObjectStore,
    first: &SegmentId,
) -> Result<usize, StorageError> {
    let mut n = 0;
    for (id, parts) in list_parts(store, None).await? {
        if (id.log, id.seg) < (first.log, first.seg) {
            for p in parts {
                store.delete(&p.key).await?;
                n += 1;
            }
        }
    }
    Ok(n)
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
}

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
        }
    }

    /// The server's segment size (a connection reported it).
    pub fn connected(&self, seg: SegmentSize) {
        let _ = self.seg.set(seg);
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
            let listed = tokio::select! {
                _ = cancel.cancelled() => return,
                l = with_retries(&self.ctx.retry, PARTIAL_DIR, || list_parts(&self.ctx.store, Some(&id))) => l,
            };
            let parts = match listed {
                Ok(mut l) => l.remove(&id).unwrap_or_default(),
                Err(e) => {
                    tracing::warn!(%site, segment = %id, error = %e, "cannot list the segment's partial objects; trying with the next batch");
                    return;
                }
            };
            let known = parts
                .into_iter()
                .map(|part| Known {
                    part,
                    checked: false,
                })
                .collect();
            st.current = Some((id, known));
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
        let parts: Vec<Part> = known.iter().map(|k| k.part.clone()).collect();
        let (_, chain_end) = chain_from_zero(&parts);
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
            match self.compare(&k.part.key, ours).await {
                Ok(None) => k.checked = true,
                Ok(Some(why)) => {
                    let detail = format!("site {site}: partial WAL object {} is already stored with other content ({why}); refusing to replace it: no more partial objects of segment {id}, which is archived when complete", k.part.key);
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
                ..self.ctx.base_metadata.clone()
            };
            let new = data.slice((chain_end - offset) as usize..);
            if !self.put_until_stored(&key, new, metadata, cancel).await {
                return;
            }
            tracing::debug!(%site, object = %key, "partial WAL stored");
            self.status.partial_uploaded(end - chain_end);
            known.push(Known {
                part: Part {
                    range: PartRange {
                        from: chain_end,
                        to: end,
                    },
                    key,
                },
                checked: true,
            });
            st.written.insert((seg_end, id));
            durable_to = end;
        }
        drop(st);
        self.publish(start + durable_to);
    }

    /// `None` when the object at `key` records the hash of `ours`; else why not.
    async fn compare(&self, key: &str, ours: Bytes) -> Result<Option<String>, StorageError> {
        let stored = self.ctx.store.object_meta(key).await?;
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

    /// Uploads one part, retrying (the site's retry policy, then backoff on other errors)
    /// until it is stored; false when cancelled first.
    async fn put_until_stored(
        &self,
        key: &str,
        data: Bytes,
        metadata: ObjectMeta,
        cancel: &CancellationToken,
    ) -> bool {
        let ctx = &self.ctx;
        let mut backoff = Backoff::new(ctx.retry.initial_backoff, ctx.retry.max_backoff);
        loop {
            let attempt = with_retries(&ctx.retry, key, || {
                let wal = Upload::wal(
                    key,
                    Source::bytes(data.clone()),
                    ctx.compression,
                    ctx.encryption.clone(),
                    ctx.hash_algorithm,
                );
                upload(
                    &ctx.store,
                    Upload {
                        metadata: metadata.clone(),
                        ..wal
                    },
                )
            });
            let e = tokio::select! {
                _ = cancel.cancelled() => return false,
                r = attempt => match r {
                    Ok(_) => return true,
                    Err(e) => e,
                },
            };
            let wait = backoff.next_wait();
            tracing::error!(site = %ctx.site, object = key, error = %e, retry_in = ?wait, "cannot store partial WAL; the WAL stays in the spool and the slot");
            self.status.set_error(format!("archive {key}: {e}"));
            tokio::select! {
                _ = cancel.cancelled() => return false,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The archive's end moved to `archived`: the durable end follows, and the partial
    /// objects of segments now complete in the archive are deleted.
    pub async fn archived_moved(&self, archived: Lsn) {
        self.publish(archived);
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
        for (end, id) in done {
            st.written.remove(&(end, id));
            if st.current.as_ref().is_some_and(|(c, _)| *c == id) {
                st.current = None;
            }
            self.delete_if_complete(&id).await;
        }
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
        let listed = match list_parts(&self.ctx.store, None).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(site = %self.ctx.site, error = %e, "cannot list partial WAL objects; leftovers stay until retention");
                return;
            }
        };
        let mut st = self.state.lock().await;
        for id in listed.keys() {
            if !self.delete_if_complete(id).await {
                st.leftover.insert(*id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(from: u64, to: u64) -> Part {
        Part {
            range: PartRange { from, to },
            key: format!("k{from}"),
        }
    }

    fn seg_id(name: &str) -> SegmentId {
        match name.parse() {
            Ok(WalSegmentName::Segment(id)) => id,
            other => panic!("{other:?}"),
        }
    }

    /// Leftovers: at start the parts of segments archived complete (or as a timeline's
    /// `.partial`) go, those of a segment not archived stay (they are its only copy);
    /// retention deletes parts before the oldest backup. Keys outside the layout stay.
    #[tokio::test]
    async fn leftovers_and_retention_delete_only_walhoards_parts() {
        use crate::storage::Metadata;
        let dir = tempfile::tempdir().unwrap();
        let ctx = crate::daemon::archiver::tests::local_context(&dir.path().join("archive"));
        let store = ctx.store.clone();
        let m = Metadata::new();
        let (done, tl_end, open) = (
            seg_id("000000010000000000000001"),
            seg_id("000000010000000000000002"),
            seg_id("000000010000000000000005"),
        );
        for id in [done, tl_end, open] {
            for (a, b) in [(0, 0x100), (0x100, 0x300)] {
                store
                    .put_bytes(&partial_key(&id, a, b), b"x", &m)
                    .await
                    .unwrap();
            }
        }
        let foreign = format!("{}/notes.txt", partial_dir(&done));
        store.put_bytes(&foreign, b"mine", &m).await.unwrap();
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
        let alerts = Alerts {
            dir: dir.path().join("alerts"),
        };
        let p = PartialArchiver::new(
            Arc::new(ctx),
            Arc::new(SiteStatus::default()),
            alerts,
            archived,
            durable,
        );
        p.clean_leftovers().await;
        let left = list_parts(&store, None).await.unwrap();
        assert_eq!(left.keys().copied().collect::<Vec<_>>(), vec![open]);
        assert!(store.stat(&foreign).await.unwrap().is_some());
        assert_eq!(delete_parts_before(&store, &open).await.unwrap(), 0);
        let next = seg_id("000000020000000000000006");
        assert_eq!(delete_parts_before(&store, &next).await.unwrap(), 2);
        assert!(list_parts(&store, None).await.unwrap().is_empty());
        assert!(store.stat(&foreign).await.unwrap().is_some());
    }

    #[test]
    fn part_names_parse_only_the_layout() {
        let id: SegmentId = match "000000010000000000000003".parse() {
            Ok(WalSegmentName::Segment(id)) => id,
            other => panic!("{other:?}"),
        };
        let key = partial_key(&id, 0x2000, 0x1F000);
        assert_eq!(
            key,
            "xlog_partial/000000010000000000000003/00002000-0001F000"
        );
        let name = key.rsplit('/').next().unwrap();
        assert_eq!(
            PartRange::parse(name),
            Some(PartRange {
                from: 0x2000,
                to: 0x1F000
            })
        );
        for bad in [
            "00002000-00001000",
            "2000-3000",
            "0000200a-0000300b",
            "x",
            "00002000-00002000",
        ] {
            assert_eq!(PartRange::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn chain_is_the_contiguous_run_from_zero() {
        let parts = [part(0, 100), part(100, 250), part(400, 500)];
        let (chain, end) = chain_from_zero(&parts);
        assert_eq!(end, 250);
        assert_eq!(chain.len(), 2);
        let lone = [part(100, 200)];
        let (chain, end) = chain_from_zero(&lone);
        assert!(chain.is_empty());
        assert_eq!(end, 0);
        // A part straddling the run's end was not written by walhoard: the run ends there.
        let (_, end) = chain_from_zero(&[part(0, 100), part(50, 300)]);
        assert_eq!(end, 100);
    }
}
