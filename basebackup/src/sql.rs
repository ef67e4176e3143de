//! The SQL side of a local-tar backup: non-exclusive `pg_backup_start` / `pg_backup_stop`
//! (`pg_start_backup` / `pg_stop_backup` before PostgreSQL 15) on one session, and the list of
//! tablespaces. The session must stay open from start to stop: closing it aborts the backup
//! on the server, which is what we want when the backup fails.

use std::path::{Path, PathBuf};

use walhoard_protocol::{Connection, Lsn};

use crate::walk::Tablespace;

/// What the server returns when a backup stops.
#[derive(Debug, Clone)]
pub struct StoppedBackup {
    /// The end of the WAL the backup needs to be consistent.
    pub end_lsn: Lsn,
    /// The contents of `backup_label` for the restored data directory.
    pub backup_label: String,
    /// The contents of `tablespace_map` (empty without user tablespaces).
    pub tablespace_map: String,
}

fn quote(s: &str) -> Result<String, walhoard_protocol::Error> {
    if s.contains('\0') {
        return Err(walhoard_protocol::Error::Config(
            "backup label contains a NUL byte".into(),
        ));
    }
    Ok(format!("'{}'", s.replace('\'', "''")))
}

/// Starts a non-exclusive backup; returns the start LSN.
pub async fn start_backup(
    conn: &mut Connection,
    label: &str,
    fast_checkpoint: bool,
) -> Result<Lsn, walhoard_protocol::Error> {
    let sql = if conn.server_major()? >= 15 {
        format!(
            "SELECT pg_backup_start({}, {fast_checkpoint}) AS lsn",
            quote(label)?
        )
    } else {
        format!(
            "SELECT pg_start_backup({}, {fast_checkpoint}, false) AS lsn",
            quote(label)?
        )
    };
    let r = conn.query_one_result(&sql).await?;
    r.lsn(0, "lsn")?
        .ok_or_else(|| walhoard_protocol::Error::protocol("backup start returned no LSN"))
}

/// Stops the backup started on this session. Does not wait for WAL archiving: walhoard's
/// archive is fed by its own receiver, and the caller knows the end LSN it needs.
pub async fn stop_backup(conn: &mut Connection) -> Result<StoppedBackup, walhoard_protocol::Error> {
    let sql = if conn.server_major()? >= 15 {
        "SELECT lsn, labelfile, spcmapfile FROM pg_backup_stop(false)"
    } else {
        "SELECT lsn, labelfile, spcmapfile FROM pg_stop_backup(false, false)"
    };
    let r = conn.query_one_result(sql).await?;
    Ok(StoppedBackup {
        end_lsn: r
            .lsn(0, "lsn")?
            .ok_or_else(|| walhoard_protocol::Error::protocol("backup stop returned no LSN"))?,
        backup_label: r.required(0, "labelfile")?,
        tablespace_map: r.text(0, "spcmapfile")?.unwrap_or_default(),
    })
}

/// User tablespaces, with their directories resolved through `pgdata/pg_tblspc/<oid>`.
pub async fn tablespaces(conn: &mut Connection, pgdata: &Path) -> Result<Vec<Tablespace>, String> {
    let r = conn
        .query_one_result(
            "SELECT oid, spcname FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY oid",
        )
        .await
        .map_err(|e| format!("list tablespaces: {e}"))?;
    let mut out = Vec::new();
    for row in 0..r.rows.len() {
        let oid: u32 = r
            .required(row, "oid")
            .map_err(|e| e.to_string())?
            .parse()
            .map_err(|e| format!("tablespace oid: {e}"))?;
        let name = r.required(row, "spcname").map_err(|e| e.to_string())?;
        let link = pgdata.join("pg_tblspc").join(oid.to_string());
        let path: PathBuf = std::fs::read_link(&link)
            .map_err(|e| format!("tablespace {name}: read link {}: {e}", link.display()))?;
        out.push(Tablespace { oid, name, path });
    }
    Ok(out)
}
