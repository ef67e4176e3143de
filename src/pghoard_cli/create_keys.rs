//! `pghoard_create_keys`: pghoard's output form, and `--config` storing the key into the
//! configuration file as pghoard does (pghoard/create_keys.py `save_keys`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::{CreateKeysFlags, Dispatch};

pub(super) fn create_keys(f: CreateKeysFlags) -> Dispatch {
    let _ = f.debug;
    let config = f.site.config_or_env();
    let done = (|| -> Result<()> {
        if f.key_id.is_empty() || f.key_id.len() > 255 {
            bail!("--key-id must be 1 to 255 bytes");
        }
        let (public, private) = walhoard::pipeline::encryption::generate_key_pair(f.bits)?;
        let keys = serde_json::json!({ &f.key_id: { "public": public, "private": private } });
        match config {
            Some(path) => save_keys(&path, f.site.site.as_deref(), &f.key_id, keys),
            None => {
                let Some(site) = f.site.site else {
                    bail!("--site must be given when no --config (or PGHOARD_CONFIG) is");
                };
                let v = serde_json::json!({ "backup_sites": { site: {
                    "encryption_key_id": f.key_id,
                    "encryption_keys": keys,
                } } });
                println!("{}", serde_json::to_string_pretty(&v)?);
                Ok(())
            }
        }
    })();
    match done {
        Ok(()) => Dispatch::Exit(0),
        Err(e) => {
            eprintln!("walhoard: {e:#}");
            Dispatch::Exit(1)
        }
    }
}

/// pghoard_create_keys --config: the new key becomes the site's `encryption_key_id`; an id
/// already defined is refused. The file is replaced atomically, with its permissions kept
/// (it holds private keys).
fn save_keys(path: &Path, site: Option<&str>, key_id: &str, keys: serde_json::Value) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut cfg: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a JSON configuration", path.display()))?;
    let sites = cfg
        .get_mut("backup_sites")
        .and_then(|s| s.as_object_mut())
        .with_context(|| format!("{}: no backup_sites object", path.display()))?;
    let site = match site {
        Some(s) => s.to_string(),
        None if sites.len() == 1 => sites.keys().next().cloned().unwrap_or_default(),
        None => bail!(
            "{}: {} backup sites; name one with --site",
            path.display(),
            sites.len()
        ),
    };
    let Some(site_cfg) = sites.get_mut(&site).and_then(|s| s.as_object_mut()) else {
        bail!("{}: no backup site {site:?}", path.display());
    };
    let ring = site_cfg
        .entry("encryption_keys")
        .or_insert_with(|| serde_json::json!({}));
    let Some(ring) = ring.as_object_mut() else {
        bail!(
            "{}: backup_sites.{site}.encryption_keys is not an object",
            path.display()
        );
    };
    if ring.contains_key(key_id) {
        bail!(
            "key_id {key_id:?} already defined for site {site:?} in {}",
            path.display()
        );
    }
    if let Some(new) = keys.get(key_id) {
        ring.insert(key_id.to_string(), new.clone());
    }
    site_cfg.insert("encryption_key_id".into(), key_id.into());
    replace_file(path, serde_json::to_string_pretty(&cfg)?.as_bytes())?;
    println!(
        "Saved new key_id {key_id:?} for site {site:?} in {}",
        path.display()
    );
    println!(
        "NOTE: the daemon does not need the 'private' key in its configuration file; \
         restore does"
    );
    Ok(())
}

/// Writes `bytes` beside `path` with its permissions, fsyncs, renames over it, fsyncs the
/// directory: a crash leaves the old file or the new one, never a torn one.
fn replace_file(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mode = std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .permissions()
        .mode();
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".walhoard-tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode & 0o7777)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("replace {}", path.display()));
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    std::fs::File::open(dir.unwrap_or(Path::new(".")))
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync the directory of {}", path.display()))
}
