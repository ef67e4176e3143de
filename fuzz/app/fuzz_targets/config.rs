//! Arbitrary bytes as a configuration file: `Config::parse` (JSON, key paths, validation,
//! node connection strings) and the typed settings built from what it accepts must return a
//! configuration or an error naming a key path, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walhoard::config::Config;

fuzz_target!(|data: &[u8]| {
    // A configuration file is read as UTF-8 text; invalid bytes become U+FFFD, which still
    // reaches every parser below.
    let text = String::from_utf8_lossy(data);
    let Ok(config) = Config::parse(&text, "fuzz.json") else {
        return;
    };
    let _ = walhoard::settings::compression_settings(&config);
    let _ = walhoard::settings::retry_policy(&config);
    let _ = walhoard::settings::transfer_threads(&config);
    let _ = config.alert_dir();
    for (name, site) in &config.backup_sites {
        let _ = config.site_prefix(name);
        let _ = walhoard::settings::upload_encryption(name, site);
        for node in &site.nodes {
            let _ = node.connect_params();
        }
    }
});
