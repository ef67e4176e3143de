//! One connection's handshake: identify the server, find or create the slot, and pick where
//! streaming starts (the archive's end, the slot's position, a timeline's switchpoint).

use walhoard_protocol::xlog::page_magic_for;
use walhoard_protocol::{
    Error as PgError, Lsn, PageExpectation, ReplicationClient, WalSegmentName,
};

use crate::receiver::{Session, SessionEnd, StreamEnd};
use crate::spool::write_durable;
use crate::{ReceiverError, ReceiverEvent, SpoolSync, StartPosition};

impl Session {
    /// Fetches timeline `tli`'s history file (TIMELINE_HISTORY), checks it, writes it into
    /// the spool and hands it to the archiver.
    async fn spool_history(
        &mut self,
        client: &mut ReplicationClient,
        tli: walhoard_protocol::TimelineId,
    ) -> Result<(), ReceiverError> {
        let (name, content) = client.timeline_history(tli).await?;
        let parsed: WalSegmentName = name
            .parse()
            .map_err(|e| PgError::protocol(format!("history file name: {e}")))?;
        if parsed != WalSegmentName::History(tli) {
            return Err(
                PgError::protocol(format!("TIMELINE_HISTORY {tli} returned {name}")).into(),
            );
        }
        walhoard_protocol::TimelineHistory::parse(tli, &content)
            .map_err(|e| ReceiverError::BadWal(e.to_string()))?;
        let path = write_durable(&self.cfg.spool_dir, &name, &content)?;
        self.send(ReceiverEvent::History { name: parsed, path })
            .await?;
        Ok(())
    }

    pub(crate) async fn session(&mut self) -> Result<SessionEnd, ReceiverError> {
        let mut client = ReplicationClient::connect(&self.cfg.conn).await?;
        let id = client.identify_system().await?;
        let seg = client.wal_segment_size().await?;
        self.seg = seg;
        let major = client.server_major()?;
        let magic = page_magic_for(major).ok_or(ReceiverError::Unsupported(major))?;
        let durable = match self.cfg.spool_sync {
            SpoolSync::Always => true,
            SpoolSync::Auto => match client.show("max_slot_wal_keep_size").await {
                // -1: the slot keeps WAL for as long as it is not confirmed.
                Ok(v) => v.trim() != "-1",
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read max_slot_wal_keep_size; keeping the spool durable");
                    true
                }
            },
        };
        if durable != self.durable {
            tracing::info!(slot = %self.cfg.slot, durable, "spool durability");
            self.durable = durable;
        }
        let slot = self.cfg.slot.clone();
        let slot = slot.as_str();
        let mut info = client.read_replication_slot(slot).await?;
        let created_slot = info.is_none() && self.cfg.create_slot;
        if created_slot {
            client.create_physical_slot(slot, true).await?;
            tracing::info!(%slot, "created physical replication slot");
            info = client.read_replication_slot(slot).await?;
        }
        let info = info.ok_or_else(|| {
            PgError::Config(format!(
                "replication slot {slot:?} does not exist and create_slot is off"
            ))
        })?;
        let restart = info.restart_lsn;
        let (mut pos, known_tli) = match self.next {
            Some(p) => (p.lsn, p.tli),
            None => (restart.unwrap_or(id.xlogpos), info.restart_tli),
        };
        // Always stream whole segments: a segment in the archive is complete or absent.
        pos = pos.segment_start(seg);
        if let Some(r) = restart {
            if pos < r.segment_start(seg) {
                // START_REPLICATION on a physical slot does not check the slot's restart_lsn
                // (StartReplication in walsender.c): the server streams what it still has and
                // fails with 58P01 where it has not (handled below).
                tracing::warn!(%slot, wanted = %pos, slot_at = %r, "the slot starts after the archive's end (was it dropped and created again?): streaming from the archive's end while the primary still has that WAL");
            }
        }
        let first_session = self.next.is_none();
        let mut tli = match known_tli {
            Some(t) => t,
            // Which timeline wrote `pos`: the server's history says (tliOfPointInHistory).
            None if id.timeline.get() > 1 => {
                let (_, content) = client.timeline_history(id.timeline).await?;
                walhoard_protocol::TimelineHistory::parse(id.timeline, &content)
                    .map_err(|e| ReceiverError::BadWal(e.to_string()))?
                    .timeline_of(pos)
            }
            None => id.timeline,
        };
        if first_session {
            if let Some(hook) = &self.cfg.resume {
                let verdict = hook(
                    StartPosition {
                        lsn: pos,
                        tli: Some(tli),
                    },
                    seg,
                    id.system_id,
                )
                .await;
                let mut at = match verdict {
                    Ok(at) => at,
                    Err(why) => {
                        // A slot nobody will ever read would hold the primary's WAL forever.
                        if created_slot {
                            if let Err(e) = client.drop_slot(slot, false).await {
                                tracing::warn!(%slot, error = %e, "cannot drop the slot this session created");
                            } else {
                                tracing::info!(%slot, "dropped the slot this session created: nothing will stream");
                            }
                        }
                        client.close().await.ok();
                        return Err(ReceiverError::Refused(why));
                    }
                };
                if tli != id.timeline {
                    // Never skip past the end of an old timeline: the segment holding the
                    // switchpoint must be streamed so that it ends in a `.partial`.
                    let (_, content) = client.timeline_history(id.timeline).await?;
                    let history = walhoard_protocol::TimelineHistory::parse(id.timeline, &content)
                        .map_err(|e| ReceiverError::BadWal(e.to_string()))?;
                    if let Some(end) = history.switchpoint_of(tli) {
                        at = at.min(end.segment_start(seg));
                    }
                }
                if at > pos {
                    tracing::info!(%slot, slot_at = %pos, resume_at = %at, "segments from the slot's position on are already held; skipping them");
                    pos = at.segment_start(seg);
                } else if at.is_valid() && at < pos {
                    tracing::warn!(%slot, slot_at = %pos, resume_at = %at, "the archive ends before the slot's position: streaming from the archive's end while the primary still has that WAL");
                    pos = at.segment_start(seg);
                }
            }
            if id.timeline.get() > 1 {
                // The server's timeline began before this daemon ran (a promoted restore, as
                // when switching from pghoard, or a failover while the daemon was down): no
                // timeline switch will hand its history file over, yet recovery through this
                // timeline (readTimeLineHistory, as recovery_target_timeline = 'latest' does)
                // needs it in the archive. The archiver skips a copy it already holds.
                self.spool_history(&mut client, id.timeline).await?;
            }
            // The hook ran (and may have queued work): later sessions continue from here.
            self.next = Some(StartPosition {
                lsn: pos,
                tli: Some(tli),
            });
        }
        // Reporting a flush position below the slot's restart_lsn would move the slot back;
        // until the archive passes it, report none (the server ignores an invalid flush).
        self.flush_floor = restart.unwrap_or(Lsn::INVALID);
        loop {
            let expect = PageExpectation {
                magic,
                seg_size: seg,
                system_id: Some(id.system_id),
                max_tli: Some(tli),
            };
            self.sessions += 1;
            self.send(ReceiverEvent::Connected {
                system_id: id.system_id,
                seg_size: seg,
                server_tli: id.timeline,
                start: pos,
                start_tli: tli,
                session: self.sessions,
            })
            .await?;
            tracing::info!(%slot, start = %pos, timeline = %tli, "streaming");
            let streamed = self.stream(&mut client, pos, tli, seg, &expect).await;
            let streamed = match streamed {
                Err(ReceiverError::Pg(PgError::Server(e))) if e.is_wal_removed() => {
                    // Where streaming would resume: what the primary no longer has.
                    let from = self.next.map_or(pos, |p| p.lsn).segment_start(seg);
                    let to = restart.map(|r| r.segment_start(seg));
                    match to {
                        Some(to) if from < to => {
                            let error = format!("{}: {}", e.code, e.message);
                            tracing::error!(%slot, from = %from, to = %to, timeline = %tli, %error, "WAL the archive lacks is gone from the primary: continuing at the slot's position");
                            self.send(ReceiverEvent::WalGap {
                                from,
                                to,
                                tli,
                                error,
                            })
                            .await?;
                            self.next = Some(StartPosition {
                                lsn: to,
                                tli: Some(tli),
                            });
                        }
                        _ => {}
                    }
                    return Err(PgError::Server(e).into());
                }
                other => other?,
            };
            match streamed {
                StreamEnd::Cancelled => return Ok(SessionEnd::Cancelled),
                StreamEnd::Paused => {
                    client.close().await.ok();
                    return Ok(SessionEnd::Paused);
                }
                StreamEnd::Switch {
                    next_tli,
                    next_start,
                } => {
                    self.spool_history(&mut client, next_tli).await?;
                    tracing::info!(%slot, from = %tli, to = %next_tli, at = %next_start, "timeline switch");
                    // Continue from the start of the segment holding the switchpoint, as
                    // pg_receivewal does: the new timeline's copy of that segment is complete.
                    tli = next_tli;
                    pos = next_start.segment_start(seg);
                    self.next = Some(StartPosition {
                        lsn: pos,
                        tli: Some(tli),
                    });
                }
            }
        }
    }
}
