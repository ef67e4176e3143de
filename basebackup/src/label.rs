//! The `backup_label` file PostgreSQL writes for a backup (do_pg_backup_start in xlog.c).

use walhoard_protocol::{Lsn, TimelineId};

/// What a backup_label says about where recovery starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupLabel {
    /// `START WAL LOCATION`: replay starts at or before this LSN.
    pub start_lsn: Lsn,
    /// The WAL file holding `start_lsn`, as written in the label.
    pub start_wal_segment: String,
    pub checkpoint_lsn: Option<Lsn>,
    /// `START TIMELINE` (PostgreSQL 11+).
    pub start_timeline: Option<TimelineId>,
    /// `START TIME`, as the server wrote it (its time zone).
    pub start_time: Option<String>,
    pub label: Option<String>,
}

/// Parses backup_label text; an error names the line that is missing or malformed.
pub fn parse_backup_label(text: &str) -> Result<BackupLabel, String> {
    let mut start = None;
    let mut checkpoint = None;
    let mut timeline = None;
    let mut time = None;
    let mut label = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("START WAL LOCATION: ") {
            // "0/2000028 (file 000000010000000000000002)"
            let (lsn, file) = rest
                .split_once(" (file ")
                .ok_or_else(|| format!("backup_label: bad START WAL LOCATION line {line:?}"))?;
            let lsn: Lsn = lsn
                .parse()
                .map_err(|e| format!("backup_label: START WAL LOCATION {lsn:?}: {e}"))?;
            start = Some((lsn, file.trim_end_matches(')').to_string()));
        } else if let Some(rest) = line.strip_prefix("CHECKPOINT LOCATION: ") {
            checkpoint = rest.parse().ok();
        } else if let Some(rest) = line.strip_prefix("START TIMELINE: ") {
            timeline = rest
                .trim()
                .parse::<u32>()
                .ok()
                .and_then(|t| TimelineId::new(t).ok());
        } else if let Some(rest) = line.strip_prefix("START TIME: ") {
            time = Some(rest.to_string());
        } else if let Some(rest) = line.strip_prefix("LABEL: ") {
            label = Some(rest.to_string());
        }
    }
    let (start_lsn, start_wal_segment) =
        start.ok_or("backup_label has no START WAL LOCATION line")?;
    Ok(BackupLabel {
        start_lsn,
        start_wal_segment,
        checkpoint_lsn: checkpoint,
        start_timeline: timeline,
        start_time: time,
        label,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_pg15_label() {
        let text = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
                    CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\n\
                    START TIME: 2024-05-01 10:00:00 UTC\nLABEL: walhoard\nSTART TIMELINE: 1\n";
        let l = parse_backup_label(text).unwrap();
        assert_eq!(l.start_lsn, Lsn(0x2000028));
        assert_eq!(l.start_wal_segment, "000000010000000000000002");
        assert_eq!(l.checkpoint_lsn, Some(Lsn(0x2000060)));
        assert_eq!(l.start_timeline.map(|t| t.get()), Some(1));
        assert_eq!(l.start_time.as_deref(), Some("2024-05-01 10:00:00 UTC"));
        assert_eq!(l.label.as_deref(), Some("walhoard"));
        assert!(parse_backup_label("LABEL: x\n").is_err());
        assert!(parse_backup_label("START WAL LOCATION: zz (file x)\n").is_err());
    }
}
