//! statsd over UDP, in pghoard's two line formats (`StatsClient._send`): telegraf's
//! `name,tag=value:1|c` and datadog's `name:1|c|#tag:value`, tags sorted, the configured
//! `tags` under each metric's own. One datagram per metric.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use tokio::net::UdpSocket;

use crate::config::{StatsdConfig, StatsdFormat, TagValue};

use super::prometheus::value;
use super::{Def, Kind, Labels};

/// One line: `kind` is `c` for a counter's increase, `g` for a gauge.
pub fn line(
    format: StatsdFormat,
    def: &Def,
    labels: &Labels,
    tags: &BTreeMap<String, TagValue>,
    v: f64,
) -> String {
    let kind = match def.kind {
        Kind::Counter => "c",
        Kind::Gauge | Kind::Age => "g",
    };
    let mut all: BTreeMap<String, String> = tags
        .iter()
        .map(|(k, v)| (k.clone(), v.to_string()))
        .collect();
    for (k, v) in labels {
        all.insert(k.to_string(), v.clone());
    }
    let name = def.name;
    let v = value(v);
    match format {
        StatsdFormat::Telegraf => {
            let tags: String = all.iter().map(|(k, v)| format!(",{k}={v}")).collect();
            format!("{name}{tags}:{v}|{kind}")
        }
        StatsdFormat::Datadog => {
            let tags: Vec<String> = all.iter().map(|(k, v)| format!("{k}:{v}")).collect();
            if tags.is_empty() {
                format!("{name}:{v}|{kind}")
            } else {
                format!("{name}:{v}|{kind}|#{}", tags.join(","))
            }
        }
    }
}

/// A statsd destination.
pub struct Statsd {
    config: StatsdConfig,
}

impl Statsd {
    pub fn new(config: StatsdConfig) -> Statsd {
        Statsd { config }
    }

    /// Sends each `(metric, labels, value)` as a datagram.
    pub async fn send(&self, items: &[(&'static Def, Labels, f64)]) -> Result<()> {
        let (host, port) = (self.config.host.as_str(), self.config.port);
        let to = tokio::net::lookup_host((host, port))
            .await
            .with_context(|| format!("statsd.host {host:?}"))?
            .next()
            .with_context(|| format!("statsd.host {host:?} has no address"))?;
        let bind = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
        let socket = UdpSocket::bind(bind).await.context("statsd socket")?;
        for (def, labels, v) in items {
            let l = line(self.config.format, def, labels, &self.config.tags, *v);
            socket
                .send_to(l.as_bytes(), to)
                .await
                .with_context(|| format!("send to statsd at {to}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{BACKUP_TIME, UPLOAD_SIZE};

    #[test]
    fn pghoards_formats() {
        let labels = vec![("site", "main".to_string()), ("type", "xlog".to_string())];
        let tags = BTreeMap::from([("env".to_string(), TagValue::Text("prod".into()))]);
        assert_eq!(
            line(StatsdFormat::Telegraf, UPLOAD_SIZE, &labels, &tags, 5.0),
            "pghoard.upload_size,env=prod,site=main,type=xlog:5|c"
        );
        assert_eq!(
            line(StatsdFormat::Datadog, UPLOAD_SIZE, &labels, &tags, 5.0),
            "pghoard.upload_size:5|c|#env:prod,site:main,type:xlog"
        );
        assert_eq!(
            line(
                StatsdFormat::Datadog,
                BACKUP_TIME,
                &vec![],
                &BTreeMap::new(),
                0.5
            ),
            "pghoard.backup_time:0.5|g"
        );
    }
}
