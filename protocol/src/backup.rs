//! BASE_BACKUP over a replication connection, as a stream of typed events.
//!
//! PostgreSQL 15+ sends one CopyOut whose CopyData payloads are typed ('n' new archive, 'd'
//! data, 'p' progress, 'm' manifest). PostgreSQL 13 and 14 send one CopyOut per tablespace,
//! in the order of the tablespace header, then one for the manifest. Both are presented as
//! the same [`BaseBackupEvent`]s. See SendBaseBackup in basebackup.c and pg_basebackup.c.

use bytes::Bytes;

use crate::conn::Connection;
use crate::error::{Error, Result};
use crate::lsn::{Lsn, TimelineId};
use crate::message::{frontend_msg, BackendMessage};
use crate::replmsg::{parse_backup_copy, BackupCopyMessage};

/// What to ask BASE_BACKUP for.
#[derive(Debug, Clone)]
pub struct BaseBackupOptions {
    pub label: String,
    /// Ask for size estimates and progress reports.
    pub progress: bool,
    /// Request an immediate checkpoint instead of a spread one.
    pub fast_checkpoint: bool,
    /// Include the WAL needed for consistency in the base archive.
    pub wal: bool,
    /// Wait for the WAL to be archived by archive_command (PostgreSQL's default).
    pub wait_for_archive: bool,
    pub manifest: bool,
    /// `CRC32C` (default), `SHA256`, ... or `NONE`.
    pub manifest_checksums: Option<String>,
    pub tablespace_map: bool,
    /// kB/s.
    pub max_rate: Option<u32>,
    /// Server-side compression method on PostgreSQL 15+ (`gzip`, `lz4`, `zstd`).
    pub compression: Option<String>,
    /// e.g. `level=1` or `level=1,workers=2`.
    pub compression_detail: Option<String>,
    /// `INCREMENTAL` (PostgreSQL 17+): only blocks changed since the backup whose manifest was
    /// sent with [`crate::ReplicationClient::upload_manifest`] on the same connection.
    pub incremental: bool,
}

impl Default for BaseBackupOptions {
    fn default() -> Self {
        BaseBackupOptions {
            label: "walhoard".into(),
            progress: true,
            fast_checkpoint: true,
            wal: false,
            wait_for_archive: false,
            manifest: true,
            manifest_checksums: None,
            tablespace_map: true,
            max_rate: None,
            compression: None,
            compression_detail: None,
            incremental: false,
        }
    }
}

fn quote(s: &str) -> Result<String> {
    if s.contains('\0') {
        return Err(Error::Config(
            "BASE_BACKUP option contains a NUL byte".into(),
        ));
    }
    Ok(format!("'{}'", s.replace('\'', "''")))
}

impl BaseBackupOptions {
    /// The BASE_BACKUP command for a server of major version `major`.
    pub fn command(&self, major: u32) -> Result<String> {
        if self.incremental && major < 17 {
            return Err(Error::Config(format!(
                "incremental backups need PostgreSQL 17+, server is {major}"
            )));
        }
        if major >= 15 {
            let mut o = vec![format!("LABEL {}", quote(&self.label)?)];
            if self.progress {
                o.push("PROGRESS".into());
            }
            o.push(format!(
                "CHECKPOINT {}",
                if self.fast_checkpoint {
                    "'fast'"
                } else {
                    "'spread'"
                }
            ));
            o.push(format!("WAIT {}", self.wait_for_archive));
            if self.wal {
                o.push("WAL".into());
            }
            o.push(format!(
                "MANIFEST {}",
                if self.manifest { "'yes'" } else { "'no'" }
            ));
            if let Some(c) = &self.manifest_checksums {
                o.push(format!("MANIFEST_CHECKSUMS {}", quote(c)?));
            }
            if self.tablespace_map {
                o.push("TABLESPACE_MAP".into());
            }
            if let Some(r) = self.max_rate {
                o.push(format!("MAX_RATE {r}"));
            }
            if let Some(c) = &self.compression {
                o.push(format!("COMPRESSION {}", quote(c)?));
                if let Some(d) = &self.compression_detail {
                    o.push(format!("COMPRESSION_DETAIL {}", quote(d)?));
                }
            }
            if self.incremental {
                o.push("INCREMENTAL".into());
            }
            Ok(format!("BASE_BACKUP ({})", o.join(", ")))
        } else {
            if self.compression.is_some() {
                return Err(Error::Config(format!(
                    "server-side compression needs PostgreSQL 15+, server is {major}"
                )));
            }
            let mut c = format!("BASE_BACKUP LABEL {}", quote(&self.label)?);
            if self.progress {
                c.push_str(" PROGRESS");
            }
            if self.fast_checkpoint {
                c.push_str(" FAST");
            }
            if self.wal {
                c.push_str(" WAL");
            }
            if !self.wait_for_archive {
                c.push_str(" NOWAIT");
            }
            if let Some(r) = self.max_rate {
                c.push_str(&format!(" MAX_RATE {r}"));
            }
            if self.tablespace_map {
                c.push_str(" TABLESPACE_MAP");
            }
            c.push_str(if self.manifest {
                " MANIFEST 'yes'"
            } else {
                " MANIFEST 'no'"
            });
            if let Some(m) = &self.manifest_checksums {
                c.push_str(&format!(" MANIFEST_CHECKSUMS {}", quote(m)?));
            }
            Ok(c)
        }
    }
}

/// One row of the tablespace header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablespaceInfo {
    /// `None` for the main data directory.
    pub oid: Option<u32>,
    /// `None` for the main data directory.
    pub location: Option<String>,
    /// Estimated size in kB (with PROGRESS).
    pub size_kb: Option<u64>,
}

/// What the stream yields, in order: for each archive an `Archive` then its data; then the
/// manifest; then `Finished`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseBackupEvent {
    /// A tar archive begins: `base.tar` for the data directory, `<oid>.tar` for a tablespace.
    Archive {
        name: String,
        tablespace_location: Option<String>,
    },
    ArchiveData(Bytes),
    ManifestStart,
    ManifestData(Bytes),
    /// Bytes sent so far (PostgreSQL 15+ with PROGRESS).
    Progress(u64),
    /// The backup is complete and the connection idle again.
    Finished {
        end_lsn: Lsn,
        end_tli: TimelineId,
    },
}

/// A running BASE_BACKUP.
pub struct BaseBackupStream<'a> {
    conn: &'a mut Connection,
    legacy: bool,
    manifest_requested: bool,
    pub start_lsn: Lsn,
    pub start_tli: TimelineId,
    pub tablespaces: Vec<TablespaceInfo>,
    copies_seen: usize,
    in_manifest: bool,
    in_end_result: bool,
    end: Option<(Lsn, TimelineId)>,
    finished: bool,
}

fn col_text(cols: &[Option<Bytes>], i: usize) -> Result<Option<String>> {
    cols.get(i)
        .cloned()
        .flatten()
        .map(|b| {
            String::from_utf8(b.to_vec())
                .map_err(|_| Error::protocol("BASE_BACKUP result is not UTF-8"))
        })
        .transpose()
}

fn position_row(cols: &[Option<Bytes>]) -> Result<(Lsn, TimelineId)> {
    let lsn = col_text(cols, 0)?.ok_or_else(|| Error::protocol("BASE_BACKUP position is NULL"))?;
    let tli = col_text(cols, 1)?.ok_or_else(|| Error::protocol("BASE_BACKUP timeline is NULL"))?;
    Ok((
        lsn.parse()
            .map_err(|e| Error::protocol(format!("BASE_BACKUP position: {e}")))?,
        tli.parse::<u32>()
            .ok()
            .and_then(|t| TimelineId::new(t).ok())
            .ok_or_else(|| Error::protocol(format!("bad BASE_BACKUP timeline {tli:?}")))?,
    ))
}

impl<'a> BaseBackupStream<'a> {
    pub(crate) async fn start(
        conn: &'a mut Connection,
        major: u32,
        opts: &BaseBackupOptions,
    ) -> Result<Self> {
        let cmd = opts.command(major)?;
        frontend_msg::query(&cmd, conn.write_buffer())?;
        conn.flush().await?;
        // Two result sets before the data: start position, then the tablespace list.
        let mut results: Vec<Vec<Vec<Option<Bytes>>>> = Vec::new();
        let mut current: Option<Vec<Vec<Option<Bytes>>>> = None;
        while results.len() < 2 {
            match conn.read_message().await? {
                BackendMessage::RowDescription(_) => current = Some(Vec::new()),
                BackendMessage::DataRow(r) => current
                    .as_mut()
                    .ok_or_else(|| Error::protocol("DataRow before RowDescription"))?
                    .push(r),
                BackendMessage::CommandComplete { .. } => {
                    results.push(current.take().unwrap_or_default())
                }
                BackendMessage::ErrorResponse(e) => {
                    let _ = conn.drain_until_ready().await;
                    return Err(Error::Server(e));
                }
                other => {
                    return Err(Error::protocol(format!(
                        "unexpected message in BASE_BACKUP header: {other:?}"
                    )))
                }
            }
        }
        let start = results[0]
            .first()
            .ok_or_else(|| Error::protocol("BASE_BACKUP sent no start position"))?;
        let (start_lsn, start_tli) = position_row(start)?;
        let mut tablespaces = Vec::new();
        for row in &results[1] {
            tablespaces.push(TablespaceInfo {
                oid: col_text(row, 0)?
                    .map(|o| {
                        o.parse()
                            .map_err(|_| Error::protocol(format!("bad tablespace oid {o:?}")))
                    })
                    .transpose()?,
                location: col_text(row, 1)?,
                size_kb: col_text(row, 2)?.and_then(|s| s.parse().ok()),
            });
        }
        Ok(BaseBackupStream {
            conn,
            legacy: major < 15,
            manifest_requested: opts.manifest,
            start_lsn,
            start_tli,
            tablespaces,
            copies_seen: 0,
            in_manifest: false,
            in_end_result: false,
            end: None,
            finished: false,
        })
    }

    /// The next event; `Ok(None)` after `Finished`.
    pub async fn next(&mut self) -> Result<Option<BaseBackupEvent>> {
        if self.finished {
            return Ok(None);
        }
        loop {
            match self.conn.read_message().await? {
                BackendMessage::CopyOutResponse => {
                    self.copies_seen += 1;
                    if !self.legacy {
                        continue;
                    }
                    let idx = self.copies_seen - 1;
                    if let Some(ts) = self.tablespaces.get(idx) {
                        let name = match ts.oid {
                            Some(oid) if ts.location.is_some() => format!("{oid}.tar"),
                            _ => "base.tar".to_string(),
                        };
                        return Ok(Some(BaseBackupEvent::Archive {
                            name,
                            tablespace_location: ts.location.clone(),
                        }));
                    }
                    if self.manifest_requested && !self.in_manifest {
                        self.in_manifest = true;
                        return Ok(Some(BaseBackupEvent::ManifestStart));
                    }
                    return Err(Error::protocol(
                        "more COPY streams than tablespaces in BASE_BACKUP",
                    ));
                }
                BackendMessage::CopyData(payload) => {
                    if self.legacy {
                        return Ok(Some(if self.in_manifest {
                            BaseBackupEvent::ManifestData(payload)
                        } else {
                            BaseBackupEvent::ArchiveData(payload)
                        }));
                    }
                    return Ok(Some(match parse_backup_copy(payload)? {
                        BackupCopyMessage::NewArchive {
                            name,
                            tablespace_location,
                        } => BaseBackupEvent::Archive {
                            name,
                            tablespace_location: (!tablespace_location.is_empty())
                                .then_some(tablespace_location),
                        },
                        BackupCopyMessage::Data(d) if self.in_manifest => {
                            BaseBackupEvent::ManifestData(d)
                        }
                        BackupCopyMessage::Data(d) => BaseBackupEvent::ArchiveData(d),
                        BackupCopyMessage::Progress(p) => BaseBackupEvent::Progress(p),
                        BackupCopyMessage::ManifestStart => {
                            self.in_manifest = true;
                            BaseBackupEvent::ManifestStart
                        }
                    }));
                }
                BackendMessage::CopyDone => {}
                BackendMessage::RowDescription(_) => self.in_end_result = true,
                BackendMessage::DataRow(cols) if self.in_end_result => {
                    self.end = Some(position_row(&cols)?)
                }
                BackendMessage::CommandComplete { .. } => {}
                BackendMessage::ReadyForQuery { .. } => {
                    self.finished = true;
                    let (end_lsn, end_tli) = self.end.ok_or_else(|| {
                        Error::protocol("BASE_BACKUP ended without an end position")
                    })?;
                    return Ok(Some(BaseBackupEvent::Finished { end_lsn, end_tli }));
                }
                BackendMessage::ErrorResponse(e) => {
                    self.finished = true;
                    let _ = self.conn.drain_until_ready().await;
                    return Err(Error::Server(e));
                }
                other => {
                    return Err(Error::protocol(format!(
                        "unexpected message during BASE_BACKUP: {other:?}"
                    )))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_per_version() {
        let mut o = BaseBackupOptions {
            label: "it's".into(),
            ..Default::default()
        };
        assert_eq!(
            o.command(15).unwrap(),
            "BASE_BACKUP (LABEL 'it''s', PROGRESS, CHECKPOINT 'fast', WAIT false, MANIFEST 'yes', TABLESPACE_MAP)"
        );
        assert_eq!(
            o.command(13).unwrap(),
            "BASE_BACKUP LABEL 'it''s' PROGRESS FAST NOWAIT TABLESPACE_MAP MANIFEST 'yes'"
        );
        o.wal = true;
        o.compression = Some("zstd".into());
        o.compression_detail = Some("level=1".into());
        o.manifest_checksums = Some("SHA256".into());
        assert_eq!(
            o.command(16).unwrap(),
            "BASE_BACKUP (LABEL 'it''s', PROGRESS, CHECKPOINT 'fast', WAIT false, WAL, MANIFEST 'yes', MANIFEST_CHECKSUMS 'SHA256', TABLESPACE_MAP, COMPRESSION 'zstd', COMPRESSION_DETAIL 'level=1')"
        );
        assert!(o.command(14).is_err(), "compression before 15");
        o.compression = None;
        o.incremental = true;
        assert!(o.command(16).is_err(), "incremental before 17");
        assert_eq!(
            o.command(17).unwrap(),
            "BASE_BACKUP (LABEL 'it''s', PROGRESS, CHECKPOINT 'fast', WAIT false, WAL, MANIFEST 'yes', MANIFEST_CHECKSUMS 'SHA256', TABLESPACE_MAP, INCREMENTAL)"
        );
        o.label = "a\0b".into();
        assert!(o.command(15).is_err());
    }
}
