//! Upload slots: how many WAL uploads run at once (`transfer.thread_count`), shared by every
//! site of the daemon and shared fairly.
//!
//! Each site takes a slot of its own semaphore first, then one of the daemon's. A site's own
//! semaphore holds one slot fewer than the daemon's when the daemon has several sites, so one
//! site draining a backlog (or retrying uploads to a store that refuses them) never holds
//! every slot: another site's upload starts as soon as it is queued. Both semaphores hand out
//! slots first come first served, and a site asks for one slot at a time
//! (`Archiver::archive` waits for it before taking the next segment), so a site that becomes
//! busy waits for at most one upload per other site, never for another site's backlog.

use std::sync::Arc;

use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

/// One site's way to the daemon's upload slots. Cloning shares both semaphores.
#[derive(Debug, Clone)]
pub struct UploadSlots {
    all: Arc<Semaphore>,
    site: Arc<Semaphore>,
}

/// A running upload's slot; released when dropped.
#[derive(Debug)]
pub struct UploadSlot {
    _all: OwnedSemaphorePermit,
    _site: OwnedSemaphorePermit,
}

impl UploadSlots {
    /// `count` slots for one site alone.
    pub fn new(count: usize) -> Self {
        UploadSlots {
            all: Arc::new(Semaphore::new(count)),
            site: Arc::new(Semaphore::new(count)),
        }
    }

    /// A site's slots among `sites` sites sharing `all`: every slot when it is the only one,
    /// else one fewer than the daemon has (at least one).
    pub fn for_site(all: &Arc<Semaphore>, sites: usize) -> Self {
        let total = all.available_permits();
        let own = if sites > 1 {
            total.saturating_sub(1)
        } else {
            total
        };
        UploadSlots {
            all: all.clone(),
            site: Arc::new(Semaphore::new(own.max(1))),
        }
    }

    /// Waits for a slot: the site's own, then the daemon's.
    pub async fn acquire(&self) -> Result<UploadSlot, AcquireError> {
        let site = self.site.clone().acquire_owned().await?;
        let all = self.all.clone().acquire_owned().await?;
        Ok(UploadSlot {
            _all: all,
            _site: site,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With two sites sharing two slots, a site holding one cannot take the other: the other
    /// site's upload gets it at once.
    #[tokio::test]
    async fn one_site_never_holds_every_slot() {
        let all = Arc::new(Semaphore::new(2));
        let (busy, quiet) = (
            UploadSlots::for_site(&all, 2),
            UploadSlots::for_site(&all, 2),
        );
        let held = busy.acquire().await.unwrap();
        // Polled once: ready only if a slot is there now.
        tokio::select! {
            biased;
            _ = busy.acquire() => panic!("a site took every slot of the daemon"),
            _ = std::future::ready(()) => {}
        }
        let q = tokio::select! {
            biased;
            q = quiet.acquire() => q.unwrap(),
            _ = std::future::ready(()) => panic!("the quiet site waits for the busy one"),
        };
        drop(q);
        drop(held);
        // Alone, a site may use them all.
        let alone = UploadSlots::new(2);
        let _a = alone.acquire().await.unwrap();
        let _b = alone.acquire().await.unwrap();
    }
}
