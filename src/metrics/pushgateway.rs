//! A Prometheus Pushgateway: the metrics POSTed in the text format to
//! `<endpoint>/metrics/job/<job>/instance/<instance>`, as pghoard's `PushgatewayClient`,
//! whose instance is each metric's `site` label unless `instance` is configured (the host
//! name for metrics of no site).

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use hyper::Method;

use crate::config::PushGatewayConfig;

use super::prometheus::render;
use super::Sample;

/// Where the Pushgateway listens: `http://host[:port][/path]` (plain HTTP only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing `/`.
    pub path: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let Some(rest) = url.strip_prefix("http://") else {
            return Err(format!(
                "{url:?}: only http:// endpoints are supported (put a TLS proxy in front for https)"
            ));
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("{url:?}: {p:?} is not a port"))?,
            ),
            _ => (authority, 80),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{url:?} names no host"));
        }
        Ok(Endpoint {
            host: host.to_string(),
            port,
            path: format!("/{}", path.trim_end_matches('/'))
                .trim_end_matches('/')
                .to_string(),
        })
    }
}

/// A Pushgateway destination.
pub struct Pushgateway {
    config: PushGatewayConfig,
    endpoint: Endpoint,
}

impl Pushgateway {
    pub fn new(config: PushGatewayConfig) -> Result<Pushgateway> {
        let endpoint = Endpoint::parse(&config.endpoint)
            .map_err(|e| anyhow::anyhow!("push_gateway.endpoint: {e}"))?;
        Ok(Pushgateway { config, endpoint })
    }

    /// POSTs the samples, one request per instance.
    pub async fn send(&self, samples: &[Sample]) -> Result<()> {
        let mut groups: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
        for s in samples {
            let instance = match &self.config.instance {
                Some(i) => i.clone(),
                None => s
                    .labels
                    .iter()
                    .find(|(k, _)| *k == "site")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_else(crate::settings::hostname),
            };
            groups.entry(instance).or_default().push(s.clone());
        }
        for (instance, group) in groups {
            let path = format!(
                "{}/metrics/job/{}/instance/{}",
                self.endpoint.path, self.config.job, instance
            );
            let body = render(&group, &self.config.tags);
            let (status, answer) = crate::api_client::request_with_body(
                &self.endpoint.host,
                self.endpoint.port,
                Method::POST,
                &path,
                &[("content-type", super::prometheus::CONTENT_TYPE.to_string())],
                body.into(),
            )
            .await?;
            if !status.is_success() {
                bail!("Pushgateway POST {path}: {status}: {}", answer.trim());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let e = Endpoint::parse("http://gw:9091").unwrap();
        assert_eq!((e.host.as_str(), e.port, e.path.as_str()), ("gw", 9091, ""));
        let e = Endpoint::parse("http://[::1]:9/p/").unwrap();
        assert_eq!((e.host.as_str(), e.port, e.path.as_str()), ("::1", 9, "/p"));
        assert_eq!(Endpoint::parse("http://gw").unwrap().port, 80);
        assert!(Endpoint::parse("https://gw").is_err());
        assert!(Endpoint::parse("http://gw:x").is_err());
    }
}
