//! How long the oldest WAL byte not yet in the archive has waited: the data-loss window in
//! seconds (`archive_lag_seconds`), beside `archive_lag_bytes`.

use std::collections::VecDeque;

use walhoard_protocol::Lsn;

/// Marks kept at most: at one per second, over an hour of lag; past that the oldest mark
/// stays and the age is overstated, never understated.
const MAX_MARKS: usize = 4096;

/// When the receive position passed each point: `(position, time)` means the bytes from
/// `position` up to the next mark's position arrived at `time` (Unix seconds).
#[derive(Debug, Default)]
pub struct LagClock {
    marks: VecDeque<(Lsn, f64)>,
    received: Lsn,
}

impl LagClock {
    /// The receive position moved to `received` at `now`.
    pub fn received(&mut self, received: Lsn, now: f64) {
        if received < self.received {
            // A reconnect restarts below what was received: what is above is received again.
            self.marks.clear();
        }
        if received > self.received {
            // One mark a second is precise enough and bounds the marks by time, not traffic.
            let fresh = self.marks.back().is_none_or(|&(_, t)| now - t >= 1.0);
            if fresh && self.marks.len() < MAX_MARKS {
                self.marks.push_back((self.received, now));
            }
        }
        self.received = received;
    }

    /// The archive holds everything before `archived`: marks wholly below it go.
    pub fn archived(&mut self, archived: Lsn) {
        while self.marks.len() > 1 && self.marks[1].0 <= archived {
            self.marks.pop_front();
        }
        if archived >= self.received {
            self.marks.clear();
        }
    }

    /// Seconds the byte at `archived` has waited since it was received; 0 when the archive
    /// holds everything received.
    pub fn lag_seconds(&self, archived: Lsn, now: f64) -> f64 {
        if !archived.is_valid() || archived >= self.received {
            return 0.0;
        }
        self.marks
            .iter()
            .take_while(|(at, _)| *at <= archived)
            .last()
            .or(self.marks.front())
            .map_or(0.0, |&(_, t)| (now - t).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_the_age_of_the_first_unarchived_byte() {
        let mut c = LagClock::default();
        let l = Lsn::from;
        c.received(l(100), 10.0);
        c.archived(l(100));
        assert_eq!(c.lag_seconds(l(100), 11.0), 0.0);
        c.received(l(200), 20.0); // bytes 100..200 at 20
        c.received(l(300), 25.0); // bytes 200..300 at 25
        c.archived(l(100));
        assert_eq!(c.lag_seconds(l(100), 30.0), 10.0);
        c.archived(l(250));
        assert_eq!(c.lag_seconds(l(250), 30.0), 5.0);
        c.archived(l(300));
        assert_eq!(c.lag_seconds(l(300), 30.0), 0.0);
        // Within one second: one mark, the older time.
        c.received(l(400), 40.0);
        c.received(l(500), 40.5);
        assert_eq!(c.lag_seconds(l(450), 41.0), 1.0);
        // A reconnect below the received position starts over.
        c.received(l(300), 50.0);
        c.received(l(350), 51.0);
        assert_eq!(c.lag_seconds(l(300), 52.0), 1.0);
    }
}
