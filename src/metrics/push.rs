//! The daemon's task that sends metrics to statsd and the Pushgateway every
//! `metrics_push_interval` seconds (10 by default, as pghoard's `transmit_metrics`), and once
//! more when it stops. statsd gets each counter's increase since the last send (`|c`) and each
//! gauge's value (`|g`); the Pushgateway gets the whole exposition.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Result;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::daemon::Sites;

use super::pushgateway::Pushgateway;
use super::statsd::Statsd;
use super::{collect, Def, Kind, Labels, Sample};

/// Default of `metrics_push_interval`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// Where metrics go, and the counters' values at the last statsd send.
pub struct Pusher {
    statsd: Option<Statsd>,
    gateway: Option<Pushgateway>,
    sent: BTreeMap<(&'static str, Labels), f64>,
    interval: Duration,
}

impl Pusher {
    /// `None` when neither `statsd` nor `push_gateway` is configured.
    pub fn from_config(config: &Config) -> Result<Option<Pusher>> {
        if config.statsd.is_none() && config.push_gateway.is_none() {
            return Ok(None);
        }
        Ok(Some(Pusher {
            statsd: config.statsd.clone().map(Statsd::new),
            gateway: config
                .push_gateway
                .clone()
                .map(Pushgateway::new)
                .transpose()?,
            sent: BTreeMap::new(),
            interval: config
                .metrics_push_interval
                .map_or(DEFAULT_INTERVAL, Duration::from_secs_f64),
        }))
    }

    /// statsd's items: counters as their increase since the last send (those that did not
    /// move are left out), gauges as they are.
    fn statsd_items(&mut self, samples: &[Sample]) -> Vec<(&'static Def, Labels, f64)> {
        let mut items = Vec::new();
        for s in samples {
            if s.def.kind == Kind::Counter {
                let last = self
                    .sent
                    .insert((s.def.name, s.labels.clone()), s.value)
                    .unwrap_or(0.0);
                if s.value > last {
                    items.push((s.def, s.labels.clone(), s.value - last));
                }
            } else {
                items.push((s.def, s.labels.clone(), s.value));
            }
        }
        items
    }

    async fn push(&mut self, sites: &RwLock<Sites>) {
        let sites = sites.read().unwrap_or_else(|p| p.into_inner()).clone();
        let samples = collect(&sites);
        if self.statsd.is_some() {
            let items = self.statsd_items(&samples);
            if let Some(statsd) = &self.statsd {
                if let Err(e) = statsd.send(&items).await {
                    tracing::warn!(error = format!("{e:#}"), "cannot send metrics to statsd");
                }
            }
        }
        if let Some(gateway) = &self.gateway {
            if let Err(e) = gateway.send(&samples).await {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "cannot push metrics to the Pushgateway"
                );
            }
        }
    }

    /// Sends every interval until `cancel`, then once more.
    pub async fn run(mut self, sites: Arc<RwLock<Sites>>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => self.push(&sites).await,
            }
        }
        self.push(&sites).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{BACKUP_TIME, UPLOAD_SIZE};

    #[test]
    fn counters_sent_as_increases() {
        let mut p = Pusher {
            statsd: None,
            gateway: None,
            sent: BTreeMap::new(),
            interval: DEFAULT_INTERVAL,
        };
        let s = |def, value| Sample {
            def,
            labels: vec![],
            value,
        };
        let first = p.statsd_items(&[s(UPLOAD_SIZE, 10.0), s(BACKUP_TIME, 2.0)]);
        assert_eq!(first.len(), 2);
        assert_eq!(first[0].2, 10.0);
        let second = p.statsd_items(&[s(UPLOAD_SIZE, 15.0), s(BACKUP_TIME, 2.0)]);
        assert_eq!(second[0].2, 5.0);
        let third = p.statsd_items(&[s(UPLOAD_SIZE, 15.0), s(BACKUP_TIME, 3.0)]);
        assert_eq!(third.len(), 1, "an unchanged counter is not sent");
        assert_eq!(third[0].2, 3.0);
    }
}
