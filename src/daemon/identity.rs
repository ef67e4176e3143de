//! Whose archive is this: the system identifier of the cluster that wrote a site's WAL, read
//! from the long page header (XLogLongPageHeaderData's `xlp_sysid`, which AdvanceXLInsertBuffer
//! puts on the first page of every segment) of the newest WAL object under the site's prefix.
//!
//! A daemon attached to another cluster than the one whose WAL the prefix holds would replace
//! that cluster's segments with its own (same names from 0/1000000 on) or skip its own first
//! segments because the archive "has" them: both lose data. So the daemon compares this with
//! the primary's IDENTIFY_SYSTEM before it streams, and `walhoard check` does the same.

use std::io::Read;
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};
use walhoard_protocol::{WalSegmentName, XLogPageHeader};

use super::archiver::{wal_key, Archiver};
use super::status::{Alerts, SiteStatus};
use crate::pipeline::encryption::KeyRing;
use crate::pipeline::transfer::download_with;
use crate::storage::meta::ObjectMeta;
use crate::storage::ObjectStore;

/// The first page of a segment (XLOG_BLCKSZ is 8 kB in every build we read).
const FIRST_PAGE: usize = 8192;

/// The newest WAL object of an archive and the system identifier its first page carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveIdentity {
    /// The object the identifier was read from, e.g. `xlog/000000010000000000000008`.
    pub key: String,
    pub system_id: u64,
}

/// The alert file of a site whose archive belongs to another cluster.
pub fn foreign_archive_alert(site: &str) -> String {
    format!("foreign_archive_{site}")
}

/// What the daemon logs, writes in the alert file and state, and `walhoard check` prints.
pub fn mismatch_message(site: &str, archive: &ArchiveIdentity, primary: u64) -> String {
    format!(
        "site {site}: the archive holds WAL of another cluster: {} has system identifier {}, the primary's is {primary}; refusing to archive into it (nothing was uploaded or deleted; point the site at its own prefix, or move the old archive away)",
        archive.key, archive.system_id
    )
}

/// The identity of the archive's newest WAL segment (or `.partial`), `None` when it holds no
/// WAL: the system identifier walhoard recorded in its metadata
/// ([`crate::storage::meta::SYSTEM_IDENTIFIER`]), else read off its first page. Only the
/// object's first page is decoded: the download is dropped after 8 kB (a pghoard
/// `pghoa1` object is read whole once first: its MAC is checked before any plaintext is used).
pub async fn archive_identity(
    store: &ObjectStore,
    keys: &KeyRing,
) -> Result<Option<ArchiveIdentity>> {
    let listed = store.list("xlog").await.context("list the archive's WAL")?;
    let newest = listed
        .iter()
        .filter_map(|o| match o.key.trim_start_matches("xlog/").parse() {
            Ok(WalSegmentName::Segment(id) | WalSegmentName::Partial(id)) => Some(id),
            _ => None,
        })
        .max_by_key(|id| (id.tli, id.log, id.seg));
    let Some(id) = newest else {
        return Ok(None);
    };
    // A `.partial` and a complete segment of the same name hold the same first page.
    let complete = wal_key(&WalSegmentName::Segment(id));
    let key = if listed.iter().any(|o| o.key == complete) {
        complete
    } else {
        wal_key(&WalSegmentName::Partial(id))
    };
    // WAL the daemon streamed records whose it is in its metadata: no download, and no
    // private key needed (a daemon that only encrypts still tells whose archive it is).
    let recorded = store
        .metadata(&key)
        .await
        .with_context(|| format!("read the metadata of {key}"))?;
    if let Some(system_id) = ObjectMeta::parse(&key, &recorded)?.system_identifier {
        return Ok(Some(ArchiveIdentity { key, system_id }));
    }
    // The consumer hands the page out through this slot: a consumer that stops reading early
    // makes the transfer report a broken pipe, which is no failure here.
    let (page_tx, page_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(1);
    // Only to compare an identifier, never to restore: an object stored without encryption in
    // a site that encrypts (pghoard's archive before encryption was turned on) is read here.
    // Someone who can write the bucket can at worst make the daemon refuse, which deleting the
    // archive would do as well.
    let keys = keys.clone().require_encrypted(false);
    let result = download_with(store, &key, &keys, move |_, r| {
        let mut page = Vec::with_capacity(FIRST_PAGE);
        r.take(FIRST_PAGE as u64).read_to_end(&mut page)?;
        let _ = page_tx.send(page);
        Ok(())
    })
    .await;
    let page = match (page_rx.try_recv(), result) {
        (Ok(page), _) => page,
        (Err(_), Err(e)) => {
            return Err(anyhow::Error::new(e).context(format!("read the first page of {key}")))
        }
        (Err(_), Ok(_)) => anyhow::bail!("{key}: the download gave no first page"),
    };
    let header = XLogPageHeader::parse(&page).with_context(|| format!("{key}: first page"))?;
    let long = header.long.with_context(|| {
        format!("{key}: the first page has no long header (no system identifier)")
    })?;
    Ok(Some(ArchiveIdentity {
        key,
        system_id: long.system_id,
    }))
}

/// Lets a site stream only into an archive of the primary's own cluster.
#[derive(Clone)]
pub struct ArchiveGuard {
    site: String,
    /// Private keys to read the archive's newest WAL object with.
    keys: KeyRing,
    status: Arc<SiteStatus>,
    alerts: Alerts,
    /// The primary's system identifier once the archive was found to be its own (or empty):
    /// checked once per start, then every connection is compared with this.
    verified: Arc<OnceLock<u64>>,
}

impl ArchiveGuard {
    pub fn new(site: &str, keys: KeyRing, status: Arc<SiteStatus>, alerts: Alerts) -> Self {
        ArchiveGuard {
            site: site.to_string(),
            keys,
            status,
            alerts,
            verified: Arc::new(OnceLock::new()),
        }
    }

    /// Refuses (the message) when the archive's newest WAL object carries another system
    /// identifier than the primary's. An archive whose identity cannot be read (the store is
    /// down, or its newest object was written without the recorded identifier — by pghoard or
    /// an older walhoard — and no private key decrypts it) is not refused: that is logged.
    pub async fn check(&self, archiver: &Archiver, primary: u64) -> Result<(), String> {
        if let Some(known) = self.verified.get() {
            if *known == primary {
                return Ok(());
            }
            return Err(self.refuse(&format!(
                    "site {}: the primary's system identifier changed from {known} (whose WAL the archive holds) to {primary}; refusing to archive another cluster's WAL into it",
                self.site
            )));
        }
        let store = &archiver.context().store;
        match archive_identity(store, &self.keys).await {
            Ok(None) => {
                tracing::info!(site = %self.site, system_id = primary, "the archive holds no WAL yet: it becomes this cluster's");
            }
            Ok(Some(a)) if a.system_id == primary => {
                tracing::info!(site = %self.site, system_id = primary, object = %a.key, "the archive's WAL is this cluster's");
            }
            Ok(Some(a)) => return Err(self.refuse(&mismatch_message(&self.site, &a, primary))),
            Err(e) => {
                tracing::warn!(site = %self.site, error = format!("{e:#}"), "cannot tell whose WAL the archive holds; streaming anyway");
                return Ok(());
            }
        }
        let _ = self.verified.set(primary);
        let _ = archiver.context().system_id.set(primary);
        self.alerts.clear(&foreign_archive_alert(&self.site));
        Ok(())
    }

    /// Says it loudly: ERROR log, alert file, state file and `/status`.
    fn refuse(&self, detail: &str) -> String {
        tracing::error!(site = %self.site, "{detail}");
        self.alerts
            .raise(&foreign_archive_alert(&self.site), detail);
        self.status.set_foreign_archive(detail.to_string());
        self.status.set_error(detail.to_string());
        detail.to_string()
    }
}
