//! `walhoard verify`: is the archive restorable, and to where?
//!
//! - [`backups`]: each basebackup's control object and chunks (exist, stored size, decrypt,
//!   decompress, plain size and SHA-1, tar well formed), streamed, nothing written to disk.
//! - [`archive`]: the WAL the archive holds and the chain of segments a restore from each
//!   backup reads, timeline history files followed.
//! - [`wal`]: every segment of those chains fetched and walked record by record (`--wal`).
//! - [`partials`]: the partial objects of segments not yet complete (issue 16): they tile
//!   each segment from offset 0, each reads back; a restore reaches the end of their run.
//!
//! Every problem is reported with the object key it concerns; each backup gets the LSN it is
//! restorable to (the end of the good WAL that follows it without a gap or error), or none
//! when that is before its own end. See docs/verify-and-info.md.

pub mod archive;
pub mod backups;
pub mod chain;
pub mod partials;
pub mod wal;

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use anyhow::{bail, Result};
use serde::Serialize;
use walhoard_protocol::{Lsn, SegmentId, SegmentSize, TimelineId};

use crate::restore::chunks::spawn_progress;
use crate::restore::RestoreSite;
use archive::WalIndex;
use partials::{PartialIndex, PartialReport};
use wal::{StepOutcome, WalkTotals};

/// One thing found wrong, with the object it is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Object key relative to the site's prefix.
    pub key: String,
    pub problem: String,
}

impl Problem {
    pub fn new(key: &str, problem: String) -> Self {
        Problem {
            key: key.to_string(),
            problem,
        }
    }
}

/// Which basebackups to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    All,
    Named(String),
}

impl Selection {
    /// `--basebackup` as given: `all` (or nothing) means every backup.
    pub fn parse(arg: Option<&str>) -> Self {
        match arg {
            None | Some("all") => Selection::All,
            Some(n) => Selection::Named(n.to_string()),
        }
    }
}

/// How much of the WAL is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalDepth {
    /// The chains from the listing only: gaps, missing history files.
    Listing,
    /// Every segment of the chains fetched, decoded and walked record by record (`--wal`).
    Records,
}

/// What `walhoard verify` found for one backup.
#[derive(Debug, Clone, Serialize)]
pub struct BackupReport {
    pub name: String,
    pub format: String,
    pub start_lsn: String,
    pub end_lsn: String,
    pub start_timeline: u32,
    /// The timeline a restore of it follows (`recovery_target_timeline = 'latest'`).
    pub target_timeline: u32,
    pub chunks: usize,
    /// Where the good WAL after the backup ends; `None` when before the backup's end.
    pub restorable_to: Option<String>,
    pub problems: Vec<Problem>,
}

/// What `walhoard verify` found in the WAL.
#[derive(Debug, Clone, Serialize)]
pub struct WalReport {
    /// Whether segments were fetched and walked (`--wal`), or only listed.
    pub records_checked: bool,
    pub segments: usize,
    pub records: u64,
    pub problems: Vec<Problem>,
}

/// The whole answer for one site.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub site: String,
    pub ok: bool,
    pub backups: Vec<BackupReport>,
    pub wal: WalReport,
    /// The partial objects (`xlog_partial/`).
    pub partial: PartialReport,
}

/// Verifies `site` as `selection` and `depth` say, `parallel` fetches at a time, with
/// progress on stderr.
pub async fn run(
    site: &RestoreSite,
    selection: &Selection,
    depth: WalDepth,
    parallel: usize,
) -> Result<Report> {
    let listed = site.list_all().await?;
    let chosen: Vec<_> = match selection {
        Selection::All => listed.iter().collect(),
        Selection::Named(n) => vec![crate::restore::choose(
            &listed,
            Some(n),
            &crate::restore::Target::Latest,
        )?],
    };
    let chosen = chain::with_parents(&listed, chosen);
    let mut reports = Vec::new();
    let mut described = Vec::new();
    for b in chosen {
        let report = BackupReport {
            name: b.name.clone(),
            format: b.format.clone(),
            start_lsn: b.start_lsn.clone(),
            end_lsn: b.end_lsn.clone(),
            start_timeline: b.start_timeline,
            target_timeline: b.start_timeline,
            chunks: 0,
            restorable_to: None,
            problems: Vec::new(),
        };
        match backups::describe(site, b).await {
            Ok(d) => described.push((reports.len(), d)),
            Err(p) => {
                let mut r = report.clone();
                r.problems.push(p);
                reports.push(r);
                continue;
            }
        }
        reports.push(report);
    }

    let sources = site.wal_sources();
    let stores: Vec<_> = sources.iter().map(|(s, _)| *s).collect();
    let index = WalIndex::load(&stores).await?;
    let mut wal_problems = Vec::new();
    let histories = wal::load_histories(&sources, &index, &mut wal_problems).await;
    let (own_store, own_keys) = sources[0];
    let parts = PartialIndex::load(own_store, &index).await?;
    eprintln!(
        "verify: {} segment(s) with partial WAL objects",
        parts.segments.len()
    );
    let (partial, part_ends) = partials::verify(own_store, own_keys, &parts, index.seg_size).await;
    // One chain per target timeline, from the oldest start of the backups that follow it.
    let mut plans: BTreeMap<TimelineId, (Lsn, TimelineId)> = BTreeMap::new();
    let mut places = Vec::new();
    for (i, d) in &described {
        let Some((start, tli)) = backup_start(d) else {
            reports[*i].problems.push(Problem::new(
                &format!("basebackup/{}", d.listing.name),
                format!(
                    "no start position: start-lsn {:?}, timeline {}",
                    d.meta.start_lsn, d.meta.start_timeline
                ),
            ));
            continue;
        };
        let (target, _) = index.target_timeline(tli, start, &histories);
        reports[*i].target_timeline = target.get();
        reports[*i].chunks = d.meta.chunks.len();
        let e = plans.entry(target).or_insert((start, tli));
        if start < e.0 {
            *e = (start, tli);
        }
        places.push((
            *i,
            start,
            target,
            // At least the segment the backup starts in.
            needed_to(d, start, index.seg_size).max(start + 1),
            d.meta.wal_included,
        ));
    }
    // Each chain, and the segments whose parts may continue it (read by restore when the
    // archive lacks the segment complete). A chain that is only its first segment, held by
    // parts alone, is no gap: those parts are all it has.
    let mut tails: BTreeMap<TimelineId, Vec<SegmentId>> = BTreeMap::new();
    let chains: Vec<_> = plans
        .iter()
        .map(|(target, (start, _))| {
            let h = histories.get(target);
            let mut steps = index.chain(*start, h, *target);
            let tail = match steps.as_slice() {
                [only] if only.object.is_none() && part_ends.contains_key(&only.id) => {
                    let id = only.id;
                    steps.clear();
                    vec![id]
                }
                _ => steps
                    .last()
                    .map(|s| next_segments(s.id, *target, index.seg_size))
                    .unwrap_or_default(),
            };
            tails.insert(*target, tail);
            (*target, steps)
        })
        .collect();

    let progress = Arc::new(AtomicU64::new(0));
    let mut total: u64 = described
        .iter()
        .map(|(_, d)| d.meta.chunks.iter().map(|c| c.input_size).sum::<u64>())
        .sum();
    if depth == WalDepth::Records {
        total += chains
            .iter()
            .map(|(_, steps)| steps.iter().filter(|s| s.object.is_some()).count() as u64)
            .sum::<u64>()
            * index.seg_size.bytes();
    }
    let reporter = spawn_progress("verify", progress.clone(), total);
    for (i, d) in &described {
        eprintln!(
            "verify: basebackup {} ({} chunks)",
            d.listing.name,
            d.meta.chunks.len()
        );
        let found = backups::check_chunks(d, parallel, &progress).await;
        reports[*i].problems.extend(found);
    }
    let mut totals = WalkTotals::default();
    let mut outcomes: BTreeMap<TimelineId, Vec<StepOutcome>> = BTreeMap::new();
    let walk = wal::Walk {
        sources: sources.clone(),
        seg: index.seg_size,
        content: depth == WalDepth::Records,
        parallel,
        progress: progress.clone(),
    };
    for (target, steps) in &chains {
        eprintln!(
            "verify: WAL chain of timeline {target}: {} segments from {}",
            steps.len(),
            steps.first().map(|s| s.id.to_string()).unwrap_or_default()
        );
        let o = walk.chain(steps, &mut wal_problems, &mut totals).await;
        outcomes.insert(*target, o);
    }
    reporter.abort();

    for (i, start, target, end, wal_included) in places {
        let r = &mut reports[i];
        let steps = outcomes.get(&target).map(Vec::as_slice).unwrap_or(&[]);
        let reach = restorable_to(steps, start, index.seg_size);
        let tail = tails.get(&target).map(Vec::as_slice).unwrap_or(&[]);
        let reach = with_parts(reach, steps, start, index.seg_size, tail, &part_ends);
        match reach {
            Some(to) if to >= end => r.restorable_to = Some(to.to_string()),
            // A standalone backup carries the WAL to its own end (standalone_hot_backup).
            _ if wal_included => r.restorable_to = Some(end.to_string()),
            _ => {
                let broken = reach.unwrap_or(start);
                r.problems.push(Problem::new(
                    &format!("basebackup/{}", r.name),
                    format!(
                        "not restorable: the WAL it needs from {start} to {end} is missing or broken from {broken} (see the WAL problems)"
                    ),
                ));
            }
        }
    }
    for (i, p) in chain::problems(&listed, &reports) {
        reports[i].restorable_to = None;
        reports[i].problems.push(p);
    }
    wal_problems.sort_by(|a, b| a.key.cmp(&b.key));
    wal_problems.dedup();
    let ok = wal_problems.is_empty()
        && partial.problems.is_empty()
        && reports.iter().all(|r| r.problems.is_empty());
    Ok(Report {
        site: site.name.clone(),
        ok,
        backups: reports,
        wal: WalReport {
            records_checked: depth == WalDepth::Records,
            segments: totals.segments,
            records: totals.records,
            problems: wal_problems,
        },
        partial,
    })
}

/// The segment after `id` on the target timeline, then on `id`'s own.
fn next_segments(id: SegmentId, target: TimelineId, seg: SegmentSize) -> Vec<SegmentId> {
    let Ok(n) = id.segno(seg) else {
        return Vec::new();
    };
    let mut v = vec![SegmentId::from_segno(target, n + 1, seg)];
    if id.tli != target {
        v.push(SegmentId::from_segno(id.tli, n + 1, seg));
    }
    v
}

/// `reach` continued by partial objects: when the chain is good to its end (or empty), the
/// checked run of parts of the segment after it (`tail`, the first that has one) ends the
/// WAL a restore replays.
fn with_parts(
    reach: Option<Lsn>,
    steps: &[StepOutcome],
    start: Lsn,
    seg: SegmentSize,
    tail: &[SegmentId],
    part_ends: &BTreeMap<SegmentId, Lsn>,
) -> Option<Lsn> {
    let chain_end = steps
        .last()
        .and_then(|s| s.id.start_lsn(seg).ok())
        .map(|l| l + seg.bytes());
    if reach != chain_end {
        return reach;
    }
    match tail.iter().find_map(|id| part_ends.get(id)) {
        Some(end) if *end > start => Some(*end),
        _ => reach,
    }
}

/// The position and timeline a restore of the backup starts replaying from.
fn backup_start(d: &backups::Described) -> Option<(Lsn, TimelineId)> {
    let start: Lsn = d.listing.start_lsn.parse().ok()?;
    let tli = TimelineId::new(d.listing.start_timeline).ok()?;
    Some((start, tli))
}

/// How far the WAL must reach for the backup to be consistent: its `end-lsn`; pghoard's
/// backups record only the end segment (local-tar) or nothing (basic), so the start of that
/// segment, or the backup's start.
fn needed_to(d: &backups::Described, start: Lsn, seg: SegmentSize) -> Lsn {
    if let Ok(end) = d.listing.end_lsn.parse::<Lsn>() {
        return end;
    }
    match d
        .listing
        .end_wal_segment
        .parse::<walhoard_protocol::WalSegmentName>()
    {
        Ok(walhoard_protocol::WalSegmentName::Segment(id)) => {
            id.start_lsn(seg).unwrap_or(start).max(start)
        }
        _ => start,
    }
}

/// Where the good WAL from `start` ends: at the first segment that is not good to its end,
/// or at the end of the last one. `None` when the chain does not reach `start`'s segment.
fn restorable_to(steps: &[StepOutcome], start: Lsn, seg: SegmentSize) -> Option<Lsn> {
    let mut reach = None;
    for s in steps {
        let Ok(seg_start) = s.id.start_lsn(seg) else {
            return reach;
        };
        let seg_end = seg_start + seg.bytes();
        if seg_end <= start {
            continue;
        }
        if s.ok_until < seg_end {
            return Some(s.ok_until.max(start));
        }
        reach = Some(seg_end);
    }
    reach
}

/// `text`, or `instead` when it is empty (what pghoard's backups do not record).
pub(crate) fn or<'a>(text: &'a str, instead: &'a str) -> &'a str {
    if text.is_empty() {
        instead
    } else {
        text
    }
}

/// The human report.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "site {}: {}",
        r.site,
        if r.ok { "OK" } else { "PROBLEMS FOUND" }
    );
    for b in &r.backups {
        let _ = writeln!(
            s,
            "  basebackup {} ({}, {} chunks, {} .. {}, timeline {} -> {}): {}",
            b.name,
            or(&b.format, "pghoard basic"),
            b.chunks,
            b.start_lsn,
            or(&b.end_lsn, "?"),
            b.start_timeline,
            b.target_timeline,
            match &b.restorable_to {
                Some(l) => format!("restorable to LSN {l}"),
                None => "NOT restorable".to_string(),
            }
        );
        for p in &b.problems {
            let _ = writeln!(s, "    PROBLEM {}: {}", p.key, p.problem);
        }
    }
    let _ = writeln!(
        s,
        "  WAL: {}",
        if r.wal.records_checked {
            format!(
                "{} segments fetched, {} records checked",
                r.wal.segments, r.wal.records
            )
        } else {
            "chains checked from the listing (--wal fetches and walks every segment)".to_string()
        }
    );
    for p in &r.wal.problems {
        let _ = writeln!(s, "    PROBLEM {}: {}", p.key, p.problem);
    }
    let pr = &r.partial;
    if !pr.segments.is_empty() || !pr.leftovers.is_empty() || !pr.problems.is_empty() {
        let _ = writeln!(s, "  partial WAL objects:");
    }
    for seg in &pr.segments {
        let _ = writeln!(
            s,
            "    {}: {} part(s), durable to {}",
            seg.segment,
            seg.parts,
            seg.durable_to
                .as_deref()
                .unwrap_or("(nothing from offset 0)")
        );
    }
    if !pr.leftovers.is_empty() {
        let _ = writeln!(
            s,
            "    {} leftover part(s) of segments archived complete (deleted at the daemon's next start or by retention): {}",
            pr.leftovers.len(),
            pr.leftovers.join(", ")
        );
    }
    for p in &pr.problems {
        let _ = writeln!(s, "    PROBLEM {}: {}", p.key, p.problem);
    }
    s
}

/// Fails unless every report is OK (the exit status of `walhoard verify`).
pub fn outcome(reports: &[Report]) -> Result<()> {
    let bad: Vec<&str> = reports
        .iter()
        .filter(|r| !r.ok)
        .map(|r| r.site.as_str())
        .collect();
    if !bad.is_empty() {
        bail!("verify found problems in site {}", bad.join(", "));
    }
    Ok(())
}

/// `walhoard verify` as the command line gives it: prints the report (JSON or text) and fails
/// when anything is wrong.
pub async fn cli(
    config: &std::path::Path,
    site: Option<&str>,
    basebackup: Option<&str>,
    wal: bool,
    json: bool,
) -> Result<()> {
    let parallel = crate::settings::transfer_threads(&crate::config::Config::load(config)?);
    let site = RestoreSite::open(config, site)?;
    let depth = if wal {
        WalDepth::Records
    } else {
        WalDepth::Listing
    };
    let report = run(&site, &Selection::parse(basebackup), depth, parallel).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    outcome(std::slice::from_ref(&report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use walhoard_protocol::SegmentId;

    fn step(segno: u64, ok_until: u64) -> StepOutcome {
        StepOutcome {
            id: SegmentId::from_segno(TimelineId(1), segno, SegmentSize::DEFAULT),
            ok_until: Lsn(ok_until),
        }
    }

    #[test]
    fn restorable_to_stops_at_the_first_bad_segment() {
        let seg = SegmentSize::DEFAULT;
        let m = seg.bytes();
        let start = Lsn(2 * m + 0x28);
        // Segments 2..=4 good: to the end of 4.
        let good = [step(2, 3 * m), step(3, 4 * m), step(4, 5 * m)];
        assert_eq!(restorable_to(&good, start, seg), Some(Lsn(5 * m)));
        // A record broken in 3: to the end of the record before it.
        let broken = [step(2, 3 * m), step(3, 3 * m + 0x1234), step(4, 5 * m)];
        assert_eq!(
            restorable_to(&broken, start, seg),
            Some(Lsn(3 * m + 0x1234))
        );
        // Segment 2 missing: nothing past the start.
        let gap = [step(2, 2 * m), step(3, 4 * m)];
        assert_eq!(restorable_to(&gap, start, seg), Some(start));
        // Steps before the backup's segment (a chain shared with an older backup) are skipped,
        // even when bad.
        let older = [step(1, m), step(2, 3 * m)];
        assert_eq!(restorable_to(&older, start, seg), Some(Lsn(3 * m)));
        assert_eq!(restorable_to(&[], start, seg), None);
    }
}
