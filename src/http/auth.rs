//! HTTP Basic authentication of the daemon's API (pghoard's `webserver_username` /
//! `webserver_password`, checked on every route as pghoard's `_authentication_check`), and the
//! rule that keeps an unauthenticated API on loopback.

use std::net::IpAddr;

use aws_lc_rs::digest;

use crate::api_client::basic_header;
use crate::config::Config;

/// What a request must carry, resolved once from the configuration.
#[derive(Clone)]
pub struct Auth {
    /// SHA-256 of the one `Authorization` header value accepted; `None`: no authentication.
    expected: Option<digest::Digest>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("required", &self.expected.is_some())
            .finish()
    }
}

impl Auth {
    pub fn from_config(config: &Config) -> Auth {
        let expected = match (&config.webserver_username, &config.webserver_password) {
            (Some(user), Some(password)) => Some(digest::digest(
                &digest::SHA256,
                basic_header(user, &password.0).as_bytes(),
            )),
            _ => None,
        };
        Auth { expected }
    }

    /// Whether a request with this `Authorization` header (if any) may proceed. Both sides
    /// are hashed first so that the comparison takes the same time whatever the header's
    /// length and wherever it first differs.
    pub fn allows(&self, header: Option<&[u8]>) -> bool {
        let Some(expected) = &self.expected else {
            return true;
        };
        let Some(given) = header else { return false };
        let given = digest::digest(&digest::SHA256, given);
        #[allow(deprecated)]
        aws_lc_rs::constant_time::verify_slices_are_equal(given.as_ref(), expected.as_ref()).is_ok()
    }

    pub fn required(&self) -> bool {
        self.expected.is_some()
    }
}

/// Whether `address` (an `http_address`) is reachable only from this machine.
pub fn is_loopback(address: &str) -> bool {
    if address.eq_ignore_ascii_case("localhost") {
        return true;
    }
    address
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// Refuses an API that anyone on the network could use: a non-loopback `http_address`
/// needs `webserver_username`/`webserver_password`, unless the operator said otherwise
/// with `http_allow_unauthenticated_remote`.
pub fn check_exposure(config: &Config) -> Result<(), String> {
    if is_loopback(&config.http_address)
        || Auth::from_config(config).required()
        || config.http_allow_unauthenticated_remote
    {
        return Ok(());
    }
    Err(format!(
        "http_address {:?} is not a loopback address and webserver_username / \
         webserver_password are not set: anyone who can reach it could read and write the \
         archive through the API. Set webserver_username and webserver_password, or set \
         http_allow_unauthenticated_remote to true to accept that",
        config.http_address
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::parse(
            &format!(
                r#"{{{extra} "backup_sites": {{"s": {{"active_backup_mode": "archive_command",
                "object_storage": {{"storage_type": "local", "directory": "/nonexistent"}}}}}}}}"#
            ),
            "t.json",
        )
        .unwrap()
    }

    #[test]
    fn basic_credentials_checked() {
        let auth = Auth::from_config(&config(
            r#""webserver_username": "u", "webserver_password": "p:w","#,
        ));
        assert!(auth.required());
        assert!(auth.allows(Some(basic_header("u", "p:w").as_bytes())));
        assert!(!auth.allows(None));
        assert!(!auth.allows(Some(basic_header("u", "p:W").as_bytes())));
        assert!(!auth.allows(Some(basic_header("v", "p:w").as_bytes())));
        assert!(!auth.allows(Some(b"Basic")));
        let open = Auth::from_config(&config(""));
        assert!(open.allows(None));
        // The password is not in the Debug output.
        assert!(!format!(
            "{:?}",
            config(r#""webserver_username": "u", "webserver_password": "sekrit","#)
        )
        .contains("sekrit"));
    }

    #[test]
    fn exposure_rule() {
        for a in ["127.0.0.1", "::1", "[::1]", "localhost", "127.1.2.3"] {
            assert!(is_loopback(a), "{a}");
        }
        for a in ["", "0.0.0.0", "::", "192.0.2.1", "db.example"] {
            assert!(!is_loopback(a), "{a}");
        }
        let e = check_exposure(&config(r#""http_address": "0.0.0.0","#)).unwrap_err();
        assert!(e.contains("webserver_password"), "{e}");
        check_exposure(&config(
            r#""http_address": "0.0.0.0", "webserver_username": "u", "webserver_password": "p","#,
        ))
        .unwrap();
        check_exposure(&config(
            r#""http_address": "0.0.0.0", "http_allow_unauthenticated_remote": true,"#,
        ))
        .unwrap();
        let e = Config::parse(
            r#"{"webserver_username": "u", "backup_sites": {}}"#,
            "t.json",
        )
        .unwrap_err();
        assert_eq!(e.path, "webserver_password");
    }
}
