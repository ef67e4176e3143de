//! The flush position reported to the server: how far the archive (and, inside the first
//! segment it lacks, the spool) holds WAL durably, and why that is safe for the slot.

use walhoard_protocol::{Lsn, SegmentSize};

/// The contiguous range of WAL the spool holds durably (fdatasync'd, renames fsync'd).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SpoolDurable {
    range: Option<(Lsn, Lsn)>,
}

impl SpoolDurable {
    /// `from..to` is durable now: it extends the range when it continues it, else replaces it
    /// (what lay between was never made durable).
    pub(crate) fn extend(&mut self, from: Lsn, to: Lsn) {
        self.range = match self.range {
            Some((f, t)) if from <= t => Some((f, t.max(to))),
            _ => Some((from, to)),
        };
    }
}

/// The flush position to report to the server, given the archive's end `archived`, what the
/// spool holds durably and the slot's restart_lsn when the session began (`floor`).
///
/// The slot's restart_lsn follows the flush position we report (ProcessStandbyReplyMessage →
/// PhysicalConfirmReceivedLocation), and the server keeps the whole segment holding the
/// restart_lsn (KeepLogSeg works in segments, XLByteToSeg). So a flush position inside the first
/// segment the archive does not hold releases nothing the archive lacks, and it lets the
/// walsender finish at shutdown: WalSndDone waits until the flush reported equals what it sent,
/// which at a segment boundary would wait for a segment that is not finished. Hence: the
/// archive's end, raised to what the spool holds durably in continuation of it, but never past
/// the last byte of that first unarchived segment. Below `floor` nothing is reported (an
/// invalid flush the server ignores): reporting less would move the slot back.
///
/// `durable` is the archive's end counting partial objects (the archive's end itself when
/// there are none): bytes held there count as the spool's do, under the same cap.
pub(crate) fn flush_position(
    archived: Lsn,
    durable: Lsn,
    spool: &SpoolDurable,
    floor: Lsn,
    seg: SegmentSize,
) -> Lsn {
    let mut flush = archived;
    if archived.is_valid() {
        let last_byte = archived.segment_start(seg) + (seg.bytes() - 1);
        if let Some((from, to)) = spool.range {
            if from <= archived && to > archived {
                flush = to.min(last_byte);
            }
        }
        if durable > archived {
            flush = flush.max(durable.min(last_byte));
        }
    }
    if flush < floor {
        Lsn::INVALID
    } else {
        flush
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    fn spool(from: u64, to: u64) -> SpoolDurable {
        let mut s = SpoolDurable::default();
        s.extend(Lsn(from), Lsn(to));
        s
    }

    /// Issue 14 item 1: the flush reported stayed at the archive's segment boundary while the
    /// last segment was unfinished, so the walsender (WalSndDone) never saw its WAL flushed
    /// and `pg_ctl stop -m fast` hung. It may now enter the first unarchived segment, as far
    /// as the spool holds it durably, and never leave it.
    #[test]
    fn flush_position_primary_can_shut_down_while_attached() {
        let seg = SegmentSize::DEFAULT;
        let floor = Lsn(3 * SEG);
        // Written inside the first unarchived segment, durable in the spool: all of it.
        let s = spool(3 * SEG, 3 * SEG + 0x1234);
        assert_eq!(
            flush_position(Lsn(3 * SEG), Lsn(3 * SEG), &s, floor, seg),
            Lsn(3 * SEG + 0x1234)
        );
        // Several segments behind: at most the last byte of the first unarchived segment,
        // so the server keeps that whole segment (KeepLogSeg).
        let s = spool(3 * SEG, 6 * SEG + 10);
        let f = flush_position(Lsn(3 * SEG), Lsn(3 * SEG), &s, floor, seg);
        assert_eq!(f, Lsn(4 * SEG - 1));
        assert_eq!(f.segment_start(seg), Lsn(3 * SEG));
        // Nothing archived yet (the archive's end unknown): nothing past it is reported.
        assert_eq!(
            flush_position(Lsn::INVALID, Lsn::INVALID, &s, Lsn::INVALID, seg),
            Lsn::INVALID
        );
        // Nothing durable in the spool (a cache only): the archive's end.
        assert_eq!(
            flush_position(
                Lsn(4 * SEG),
                Lsn(4 * SEG),
                &SpoolDurable::default(),
                floor,
                seg
            ),
            Lsn(4 * SEG)
        );
        // Durable spool bytes that do not continue the archive do not count.
        let s = spool(5 * SEG, 5 * SEG + 100);
        assert_eq!(
            flush_position(Lsn(4 * SEG), Lsn(4 * SEG), &s, floor, seg),
            Lsn(4 * SEG)
        );
        // The archive ahead of the spool: the archive's end.
        let s = spool(3 * SEG, 3 * SEG + 100);
        assert_eq!(
            flush_position(Lsn(4 * SEG), Lsn(4 * SEG), &s, floor, seg),
            Lsn(4 * SEG)
        );
        // Below the slot's restart_lsn: none, which would move the slot back.
        let s = spool(3 * SEG, 3 * SEG + 100);
        assert_eq!(
            flush_position(Lsn(3 * SEG), Lsn(3 * SEG), &s, Lsn(3 * SEG + 200), seg),
            Lsn::INVALID
        );
        // Exactly at a segment's end: the archive must hold that segment first.
        let s = spool(3 * SEG, 4 * SEG);
        assert_eq!(
            flush_position(Lsn(3 * SEG), Lsn(3 * SEG), &s, floor, seg),
            Lsn(4 * SEG - 1)
        );
        assert_eq!(
            flush_position(Lsn(4 * SEG), Lsn(4 * SEG), &s, floor, seg),
            Lsn(4 * SEG)
        );
    }

    /// Issue 16: bytes held in partial objects count like durable spool bytes: inside the
    /// first unarchived segment, never past its last byte, never below the slot's floor.
    #[test]
    fn flush_position_counts_partial_objects_inside_the_first_unarchived_segment() {
        let seg = SegmentSize::DEFAULT;
        let floor = Lsn(3 * SEG);
        let none = SpoolDurable::default();
        let a = Lsn(3 * SEG);
        assert_eq!(
            flush_position(a, Lsn(3 * SEG + 500), &none, floor, seg),
            Lsn(3 * SEG + 500)
        );
        // The larger of the spool's and the partials' durable ends.
        let s = spool(3 * SEG, 3 * SEG + 900);
        assert_eq!(
            flush_position(a, Lsn(3 * SEG + 500), &s, floor, seg),
            Lsn(3 * SEG + 900)
        );
        assert_eq!(
            flush_position(a, Lsn(3 * SEG + 1000), &s, floor, seg),
            Lsn(3 * SEG + 1000)
        );
        // Capped at the first unarchived segment's last byte.
        assert_eq!(
            flush_position(a, Lsn(5 * SEG), &none, floor, seg),
            Lsn(4 * SEG - 1)
        );
        // Nothing archived yet: nothing reported.
        assert_eq!(
            flush_position(Lsn::INVALID, Lsn(3 * SEG + 5), &none, Lsn::INVALID, seg),
            Lsn::INVALID
        );
    }

    #[test]
    fn spool_durable_range_is_contiguous() {
        let mut s = spool(0x100, 0x200);
        s.extend(Lsn(0x200), Lsn(0x300));
        assert_eq!(s.range, Some((Lsn(0x100), Lsn(0x300))));
        // A gap: what lay between was never durable, the range starts again.
        s.extend(Lsn(0x400), Lsn(0x500));
        assert_eq!(s.range, Some((Lsn(0x400), Lsn(0x500))));
    }
}
