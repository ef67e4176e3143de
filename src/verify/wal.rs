//! The WAL half of `walhoard verify`: history files parsed, and each chain of segments fetched
//! (in parallel, at most `parallel` at a time), decrypted, decompressed, checked against its
//! size and hash metadata and its page headers, then walked record by record in order
//! ([`RecordWalker`]: every record's CRC-32C, continuation records across pages and segments).

use std::collections::{BTreeMap, VecDeque};
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use walhoard_protocol::xlog::{major_for_page_magic, validate_pages, PageExpectation, XLOG_BLCKSZ};
use walhoard_protocol::xlogrecord::RecordWalker;
use walhoard_protocol::{
    Lsn, SegmentId, SegmentSize, TimelineHistory, TimelineId, WalSegmentName, XLogPageHeader,
};

use super::archive::{Step, WalIndex};
use super::Problem;
use crate::daemon::archiver::wal_key;
use crate::pipeline::encryption::KeyRing;
use crate::pipeline::transfer::{copy_checked, download_with};
use crate::storage::ObjectStore;

/// At most this many plaintext segments are held at once (as the daemon's segment buffers):
/// fewer fetches run in parallel with large segments.
const SEGMENT_BYTES_IN_FLIGHT: u64 = 256 << 20;
/// Record errors reported per segment; the rest are counted only.
const ERRORS_PER_SEGMENT: usize = 5;

/// Fetches and parses every history file; a broken one is a problem, left out of the map.
pub async fn load_histories(
    sources: &[(&ObjectStore, &KeyRing)],
    index: &WalIndex,
    problems: &mut Vec<Problem>,
) -> BTreeMap<TimelineId, TimelineHistory> {
    let mut out = BTreeMap::new();
    for (tli, stored) in &index.histories {
        let (store, keys) = sources[stored.source];
        let key = wal_key(&WalSegmentName::History(*tli));
        let fetched = download_with(store, &key, keys, |m, r| {
            // A history file is a few lines per timeline: 1 MiB is far more than any has.
            let mut text = Vec::new();
            copy_checked(m, &mut r.take(1 << 20), &mut text)?;
            Ok(text)
        })
        .await;
        match fetched
            .map_err(anyhow::Error::new)
            .and_then(|(_, text)| Ok(TimelineHistory::parse(*tli, &text)?))
        {
            Ok(h) => {
                out.insert(*tli, h);
            }
            Err(e) => problems.push(Problem::new(&key, format!("{e:#}"))),
        }
    }
    // A later timeline's segments without its history: a restore cannot follow it.
    for tli in index.segments.keys() {
        if tli.get() > 1 && !index.histories.contains_key(tli) {
            problems.push(Problem::new(
                &wal_key(&WalSegmentName::History(*tli)),
                format!("missing: the archive holds segments of timeline {tli} but not its history file"),
            ));
        }
    }
    out
}

/// How far the WAL of one segment of a chain is good.
#[derive(Debug, Clone, Copy)]
pub struct StepOutcome {
    pub id: SegmentId,
    /// The segment's end when all of it checked; else where the good WAL stops (the
    /// segment's start when it is missing or unreadable).
    pub ok_until: Lsn,
}

/// Totals of a walk.
#[derive(Debug, Default, Clone, Copy)]
pub struct WalkTotals {
    pub segments: usize,
    pub records: u64,
}

/// Fetches one segment's plaintext: size and recorded hash checked, at most `seg` bytes held.
async fn fetch_segment(
    store: ObjectStore,
    keys: KeyRing,
    key: String,
    seg: SegmentSize,
) -> Result<Vec<u8>> {
    let len = seg.bytes();
    let (_, data) = download_with(&store, &key, &keys, move |m, r| {
        let mut buf = Vec::with_capacity(len as usize);
        copy_checked(m, &mut r.take(len + 1), &mut buf)?;
        Ok(buf)
    })
    .await
    .with_context(|| format!("fetch {key}"))?;
    if data.len() as u64 != len {
        anyhow::bail!(
            "{key}: {} bytes of WAL, not a whole {len}-byte segment",
            data.len()
        );
    }
    Ok(data)
}

/// A plaintext segment being fetched.
type Fetch = tokio::task::JoinHandle<Result<Vec<u8>>>;

/// How chains are walked: where from, how deep, how many fetches at once.
pub struct Walk<'a> {
    /// Where each [`Step`]'s object is ([`super::archive::Stored::source`]).
    pub sources: Vec<(&'a ObjectStore, &'a KeyRing)>,
    pub seg: SegmentSize,
    /// Fetch and walk each segment; without it only whether each exists is looked at.
    pub content: bool,
    pub parallel: usize,
    pub progress: Arc<AtomicU64>,
}

impl Walk<'_> {
    /// Walks `steps` in order, fetching ahead in parallel.
    pub async fn chain(
        &self,
        steps: &[Step],
        problems: &mut Vec<Problem>,
        totals: &mut WalkTotals,
    ) -> Vec<StepOutcome> {
        let (seg, content) = (self.seg, self.content);
        let parallel = self
            .parallel
            .min((SEGMENT_BYTES_IN_FLIGHT / seg.bytes()).max(1) as usize)
            .max(1);
        let mut walker = RecordWalker::new(seg);
        let mut out = Vec::with_capacity(steps.len());
        let mut pending: VecDeque<(&Step, Option<Fetch>)> = VecDeque::new();
        let mut next = steps.iter();
        loop {
            while pending.iter().filter(|(_, h)| h.is_some()).count() < parallel {
                let Some(step) = next.next() else { break };
                let handle = step.object.as_ref().filter(|_| content).map(|o| {
                    let (store, keys) = self.sources[o.source];
                    tokio::spawn(fetch_segment(store.clone(), keys.clone(), step.key(), seg))
                });
                pending.push_back((step, handle));
            }
            let Some((step, handle)) = pending.pop_front() else {
                break;
            };
            let start = step.id.start_lsn(seg).unwrap_or_default();
            let end = start + seg.bytes();
            let key = step.key();
            let ok_until = match (&step.object, handle) {
                (None, _) => {
                    problems.push(Problem::new(
                        &key,
                        "missing: a gap in the WAL chain (restore stops before it)".to_string(),
                    ));
                    walker.reset();
                    start
                }
                (Some(_), None) => end,
                (Some(_), Some(h)) => {
                    totals.segments += 1;
                    let fetched = match h.await {
                        Ok(r) => r,
                        Err(e) => Err(anyhow::anyhow!("verify task failed: {e}")),
                    };
                    let ok = match fetched {
                        Ok(data) => {
                            // CPU work (CRC over the whole segment): off the async workers,
                            // the walker moved there and back.
                            let (id, k) = (step.id, key.clone());
                            let mut w = std::mem::replace(&mut walker, RecordWalker::new(seg));
                            let walked = tokio::task::spawn_blocking(move || {
                                let mut found = Vec::new();
                                let ok =
                                    walk_segment(&mut w, id, start, seg, &data, &k, &mut found);
                                (w, ok, found)
                            })
                            .await;
                            match walked {
                                Ok((w, ok, found)) => {
                                    walker = w;
                                    problems.extend(found);
                                    ok
                                }
                                Err(e) => {
                                    problems.push(Problem::new(&key, format!("walk failed: {e}")));
                                    start
                                }
                            }
                        }
                        Err(e) => {
                            problems.push(Problem::new(&key, format!("{e:#}")));
                            walker.reset();
                            start
                        }
                    };
                    self.progress.fetch_add(seg.bytes(), Ordering::Relaxed);
                    ok
                }
            };
            out.push(StepOutcome {
                id: step.id,
                ok_until,
            });
        }
        totals.records += walker.records;
        out
    }
}

/// Checks one segment's pages and records; returns where its good WAL ends.
fn walk_segment(
    walker: &mut RecordWalker,
    id: SegmentId,
    start: Lsn,
    seg: SegmentSize,
    data: &[u8],
    key: &str,
    problems: &mut Vec<Problem>,
) -> Lsn {
    let headers = XLogPageHeader::parse(data)
        .map_err(anyhow::Error::new)
        .and_then(|h| {
            major_for_page_magic(h.magic)
                .with_context(|| format!("first page magic {:#06X} is no PostgreSQL's", h.magic))?;
            let expect = PageExpectation {
                magic: h.magic,
                seg_size: seg,
                system_id: None,
                max_tli: Some(id.tli),
            };
            // Zero pages may end a segment after an XLOG_SWITCH record.
            Ok(validate_pages(data, start, &expect, true)?)
        });
    if let Err(e) = headers {
        problems.push(Problem::new(key, format!("{e:#}")));
        walker.reset();
        return start;
    }
    let mut ok_until = None;
    let mut errors = 0usize;
    for (i, page) in data.chunks(XLOG_BLCKSZ).enumerate() {
        let addr = start + (i * XLOG_BLCKSZ) as u64;
        let good_before = walker.valid_end();
        if let Err(e) = walker.page(addr, page) {
            ok_until.get_or_insert(good_before.filter(|l| *l >= start).unwrap_or(start));
            errors += 1;
            if errors <= ERRORS_PER_SEGMENT {
                problems.push(Problem::new(key, e.to_string()));
            }
        }
    }
    if errors > ERRORS_PER_SEGMENT {
        problems.push(Problem::new(
            key,
            format!("{} more record errors", errors - ERRORS_PER_SEGMENT),
        ));
    }
    if let Some(at) = walker.ended_at() {
        // A complete segment ends in records or after an XLOG_SWITCH record, never early.
        problems.push(Problem::new(
            key,
            format!(
                "the WAL ends at {at}, inside a complete segment without an XLOG_SWITCH record"
            ),
        ));
        ok_until.get_or_insert(at);
    }
    ok_until.unwrap_or(start + seg.bytes())
}
