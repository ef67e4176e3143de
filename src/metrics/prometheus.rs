//! Prometheus' text exposition format (version 0.0.4), for `GET /metrics` and the
//! Pushgateway. Names are pghoard's with `.` and `-` turned into `_` (as pghoard's
//! `PrometheusClient._update`), so `pghoard.upload_size` is `pghoard_upload_size`.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::config::TagValue;

use super::{Kind, Sample};

/// The content type of the format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A dotted metric name as Prometheus spells it.
pub fn metric_name(name: &str) -> String {
    name.replace(['.', '-'], "_")
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('"', "\\\"")
}

/// A value as the format writes it (Go's ParseFloat reads it back).
pub fn value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// `{a="1",b="2"}` of the sample's labels over `tags` (the sample's win), or nothing.
pub fn label_set(sample: &Sample, tags: &BTreeMap<String, TagValue>) -> String {
    let mut all: BTreeMap<String, String> = tags
        .iter()
        .map(|(k, v)| (k.clone(), v.to_string()))
        .collect();
    for (k, v) in &sample.labels {
        all.insert(k.to_string(), v.clone());
    }
    if all.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = all
        .iter()
        .map(|(k, v)| format!("{}=\"{}\"", metric_name(k), escape_label(v)))
        .collect();
    format!("{{{}}}", parts.join(","))
}

/// The samples as one exposition: each family once, with its HELP and TYPE lines.
pub fn render(samples: &[Sample], tags: &BTreeMap<String, TagValue>) -> String {
    let mut families: BTreeMap<&str, Vec<&Sample>> = BTreeMap::new();
    for s in samples {
        families.entry(s.def.name).or_default().push(s);
    }
    let mut out = String::new();
    for group in families.values() {
        let def = group[0].def;
        let name = metric_name(def.name);
        let kind = match def.kind {
            Kind::Counter => "counter",
            Kind::Gauge | Kind::Age => "gauge",
        };
        let _ = writeln!(out, "# HELP {name} {}", def.help);
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for s in group {
            let _ = writeln!(out, "{name}{} {}", label_set(s, tags), value(s.value));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{BACKUP_TIME, UPLOAD_SIZE};

    #[test]
    fn exposition_lines() {
        let samples = vec![
            Sample {
                def: UPLOAD_SIZE,
                labels: vec![("site", "a\"b".into()), ("type", "xlog".into())],
                value: 3.0,
            },
            Sample {
                def: BACKUP_TIME,
                labels: vec![],
                value: 1.25,
            },
        ];
        let tags = BTreeMap::from([("env".to_string(), TagValue::Text("prod".into()))]);
        let text = render(&samples, &tags);
        assert!(
            text.contains("# TYPE pghoard_upload_size counter\n"),
            "{text}"
        );
        assert!(
            text.contains("pghoard_upload_size{env=\"prod\",site=\"a\\\"b\",type=\"xlog\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("pghoard_backup_time{env=\"prod\"} 1.25\n"),
            "{text}"
        );
    }
}
