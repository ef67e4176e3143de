//! Pacing of retries: capped exponential backoff with jitter. One type for every loop that waits
//! before trying again: the receiver's reconnects, WAL uploads, storage requests.

use std::time::Duration;

/// Waits that double from `initial` up to `max`, each spread by up to ±20 % so that many sites
/// (or daemons) that failed together do not retry in step against the same server or store.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    step: Duration,
    /// xorshift state for the jitter (no need for a cryptographic source).
    seed: u64,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as u64);
        Backoff {
            initial,
            max: max.max(initial),
            step: initial,
            seed: (nanos ^ (u64::from(std::process::id()) << 32)) | 1,
        }
    }

    /// The wait before the next attempt (the current step, jittered, never above `max`); the
    /// step then doubles, up to `max`.
    pub fn next_wait(&mut self) -> Duration {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        // A factor in [0.8, 1.2).
        let factor = 0.8 + (self.seed % 4096) as f64 / 4096.0 * 0.4;
        let wait = self.step.mul_f64(factor).min(self.max);
        self.step = (self.step * 2).min(self.max);
        wait
    }

    /// After a success (or progress): the next wait is the initial one again.
    pub fn reset(&mut self) {
        self.step = self.initial;
    }

    /// The largest wait.
    pub fn max(&self) -> Duration {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_bounded_jitter_and_resets() {
        let (initial, max) = (Duration::from_millis(100), Duration::from_millis(1000));
        let mut b = Backoff::new(initial, max);
        let steps = [100u64, 200, 400, 800, 1000, 1000];
        for step in steps {
            let w = b.next_wait().as_secs_f64() * 1000.0;
            let step = step as f64;
            assert!(w >= step * 0.8 - 1e-6, "{w} below {step}");
            assert!(w <= (step * 1.2).min(1000.0) + 1e-6, "{w} above {step}");
        }
        b.reset();
        let w = b.next_wait();
        assert!(
            w >= Duration::from_millis(80) && w < Duration::from_millis(120),
            "{w:?}"
        );
        // The waits are spread, not all the same.
        let mut b = Backoff::new(max, max);
        let waits: std::collections::BTreeSet<_> = (0..20).map(|_| b.next_wait()).collect();
        assert!(waits.len() > 1);
        assert!(waits.iter().all(|w| *w <= max));
    }
}
