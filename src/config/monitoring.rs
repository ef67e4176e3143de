//! The keys of pghoard's monitoring clients (`statsd`, `push_gateway`, `prometheus`) and the
//! HTTP API's password, typed once.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

/// A password: never printed by `Debug` (configurations are logged at debug level).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A tag value as pghoard's clients print it (`str()` of a JSON scalar).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TagValue {
    Text(String),
    Number(serde_json::Number),
    Bool(bool),
}

impl fmt::Display for TagValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TagValue::Text(s) => f.write_str(s),
            TagValue::Number(n) => write!(f, "{n}"),
            // Python's str(True).
            TagValue::Bool(true) => f.write_str("True"),
            TagValue::Bool(false) => f.write_str("False"),
        }
    }
}

/// statsd's line format (pghoard's `format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatsdFormat {
    /// `name,tag=value:1|c`
    #[default]
    Telegraf,
    /// `name:1|c|#tag:value`
    Datadog,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsdConfig {
    #[serde(default = "StatsdConfig::default_host")]
    pub host: String,
    #[serde(default = "StatsdConfig::default_port")]
    pub port: u16,
    #[serde(default)]
    pub format: StatsdFormat,
    #[serde(default)]
    pub tags: BTreeMap<String, TagValue>,
}

impl StatsdConfig {
    fn default_host() -> String {
        "127.0.0.1".into()
    }
    fn default_port() -> u16 {
        8125
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushGatewayConfig {
    /// `http://host:port`; metrics go to `<endpoint>/metrics/job/<job>/instance/<instance>`.
    pub endpoint: String,
    /// (default `pghoard`, as pghoard's).
    #[serde(default = "PushGatewayConfig::default_job")]
    pub job: String,
    /// (default: each site's name, as pghoard's).
    pub instance: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, TagValue>,
}

impl PushGatewayConfig {
    fn default_job() -> String {
        "pghoard".into()
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrometheusConfig {
    /// Labels added to every sample.
    #[serde(default)]
    pub tags: BTreeMap<String, TagValue>,
}
