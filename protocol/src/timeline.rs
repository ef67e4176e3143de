//! Timeline history files (`NNNNNNNN.history`), parsed as `readTimeLineHistory` does.

use crate::error::FormatError;
use crate::lsn::{Lsn, TimelineId};

/// One line of a history file: timeline `tli` ended at `switchpoint`, where its child began.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimelineSwitch {
    pub tli: TimelineId,
    /// First LSN that belongs to the next timeline.
    pub switchpoint: Lsn,
    pub reason: String,
}

/// The ancestry of timeline `tli`: every switch that led to it, oldest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimelineHistory {
    pub tli: TimelineId,
    pub switches: Vec<TimelineSwitch>,
}

impl TimelineHistory {
    /// Parses the contents of `<tli>.history`.
    pub fn parse(tli: TimelineId, content: &[u8]) -> Result<Self, FormatError> {
        let text = std::str::from_utf8(content).map_err(|_| {
            FormatError::new(format!("history file of timeline {tli} is not UTF-8"))
        })?;
        let mut switches: Vec<TimelineSwitch> = Vec::new();
        for (lineno, line) in text.lines().enumerate() {
            let line = line.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |what: &str| {
                FormatError::new(format!(
                    "history file of timeline {tli}, line {}: {what}: {line:?}",
                    lineno + 1
                ))
            };
            let mut fields = line.splitn(3, |c: char| c.is_ascii_whitespace());
            let parent: u32 = fields
                .next()
                .and_then(|f| f.parse().ok())
                .ok_or_else(|| bad("expected a numeric timeline id"))?;
            let parent = TimelineId::new(parent).map_err(|_| bad("timeline 0"))?;
            let switchpoint: Lsn = fields
                .next()
                .map(str::trim)
                .and_then(|f| f.parse().ok())
                .ok_or_else(|| bad("expected a switchpoint 'X/X'"))?;
            if let Some(prev) = switches.last() {
                if parent <= prev.tli {
                    return Err(bad("timeline ids must increase"));
                }
                if switchpoint < prev.switchpoint {
                    return Err(bad("switchpoints must not decrease"));
                }
            }
            if parent >= tli {
                return Err(bad("parent timeline is not older than the file's timeline"));
            }
            let reason = fields.next().unwrap_or("").trim().to_string();
            switches.push(TimelineSwitch {
                tli: parent,
                switchpoint,
                reason,
            });
        }
        Ok(TimelineHistory { tli, switches })
    }

    /// The timeline that wrote `lsn` in this history (`tliOfPointInHistory`).
    pub fn timeline_of(&self, lsn: Lsn) -> TimelineId {
        self.switches
            .iter()
            .find(|s| lsn < s.switchpoint)
            .map_or(self.tli, |s| s.tli)
    }

    /// Where timeline `tli` ended in this history (`tliSwitchPoint`); `None` for the newest.
    pub fn switchpoint_of(&self, tli: TimelineId) -> Option<Lsn> {
        self.switches
            .iter()
            .find(|s| s.tli == tli)
            .map(|s| s.switchpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T3: &str = "1\t0/3000000\tno recovery target specified\n\n# comment\n2\t0/5000098\tbefore 2026-01-01 00:00:00+00\n";

    #[test]
    fn parses_and_answers_lookups() {
        let h = TimelineHistory::parse(TimelineId(3), T3.as_bytes()).unwrap();
        assert_eq!(h.switches.len(), 2);
        assert_eq!(h.switches[1].switchpoint, Lsn(0x500_0098));
        assert_eq!(h.switches[0].reason, "no recovery target specified");
        assert_eq!(h.timeline_of(Lsn(0x2FF_FFFF)), TimelineId(1));
        assert_eq!(h.timeline_of(Lsn(0x300_0000)), TimelineId(2));
        assert_eq!(h.timeline_of(Lsn(0x500_0098)), TimelineId(3));
        assert_eq!(h.switchpoint_of(TimelineId(1)), Some(Lsn(0x300_0000)));
        assert_eq!(h.switchpoint_of(TimelineId(3)), None);
    }

    #[test]
    fn rejects_malformed_lines() {
        for bad in [
            "x\t0/1\n",
            "1\tnope\n",
            "1\n",
            "2\t0/1\n1\t0/2\n",
            "3\t0/1\n",
            "0\t0/1\n",
            "1\t0/5\n2\t0/4\n",
        ] {
            let err = TimelineHistory::parse(TimelineId(3), bad.as_bytes());
            assert!(err.is_err(), "{bad:?} accepted");
        }
        assert!(TimelineHistory::parse(TimelineId(3), &[0xff, 0xfe]).is_err());
    }
}
