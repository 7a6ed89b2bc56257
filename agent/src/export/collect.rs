//! One collection: exactly what `/metrics` serves (the registry rendered, in the Prometheus
//! text format), as remote-write series with one timestamp and the configured extra labels.

use prometheus_client::registry::Registry;

use super::proto::{Label, Sample, TimeSeries, WriteRequest};
use crate::metrics;

/// The registry's samples now, as a WriteRequest, and how many there are.
pub fn collect(registry: &Registry, extra: &[(String, String)], timestamp_ms: i64) -> WriteRequest {
    let text = metrics::to_prometheus_text(&metrics::render(registry));
    from_text(&text, extra, timestamp_ms)
}

/// The samples of Prometheus text (as the agent renders it: no timestamps, no exemplars).
/// A line that does not parse is skipped: it is the agent's own output, so that is a bug,
/// logged, never a reason to lose the rest.
pub fn from_text(text: &str, extra: &[(String, String)], timestamp_ms: i64) -> WriteRequest {
    let mut timeseries = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((mut labels, value)) = parse_line(line) else {
            tracing::warn!(
                line,
                "remote write: a line of /metrics did not parse; skipped"
            );
            continue;
        };
        for (name, value) in extra {
            if !labels.iter().any(|l| l.name == *name) {
                labels.push(Label {
                    name: name.clone(),
                    value: value.clone(),
                });
            }
        }
        labels.sort_by(|a, b| a.name.cmp(&b.name));
        timeseries.push(TimeSeries {
            labels,
            samples: vec![Sample {
                value,
                timestamp: timestamp_ms,
            }],
        });
    }
    WriteRequest { timeseries }
}

/// `name{a="x",b="y"} value` into its labels (`__name__` first) and value.
fn parse_line(line: &str) -> Option<(Vec<Label>, f64)> {
    let name_end = line.find(['{', ' '])?;
    let mut labels = vec![Label {
        name: "__name__".into(),
        value: line[..name_end].to_owned(),
    }];
    let mut rest = &line[name_end..];
    if let Some(mut inner) = rest.strip_prefix('{') {
        loop {
            inner = inner.trim_start_matches(',');
            if let Some(after) = inner.strip_prefix('}') {
                rest = after;
                break;
            }
            let (name, after) = inner.split_once("=\"")?;
            let (value, after) = unescape_value(after)?;
            labels.push(Label {
                name: name.to_owned(),
                value,
            });
            inner = after;
        }
    }
    let value = rest.trim().split(' ').next()?;
    Some((labels, value.parse().ok()?))
}

/// A label value up to its closing quote, unescaped, and what follows the quote.
fn unescape_value(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => out.push('\n'),
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::AgentMetrics;

    #[test]
    fn every_line_of_metrics_becomes_one_series_with_sorted_labels() {
        let text = "# HELP a_total x\n# TYPE a_total counter\na_total{rule=\"lidar\",iface=\"g0\"} 3\n\
                    h_bucket{le=\"+Inf\"} 7\nb 2.5\nq{v=\"a \\\"b\\\" \\\\ c\\n\"} NaN\n";
        let wr = from_text(
            text,
            &[("vin".into(), "V1".into()), ("rule".into(), "no".into())],
            9,
        );
        let series: Vec<(Vec<(&str, &str)>, f64)> = wr
            .timeseries
            .iter()
            .map(|t| {
                assert_eq!(t.samples[0].timestamp, 9);
                (
                    t.labels
                        .iter()
                        .map(|l| (l.name.as_str(), l.value.as_str()))
                        .collect(),
                    t.samples[0].value,
                )
            })
            .collect();
        assert_eq!(
            series[..3],
            [
                (
                    vec![
                        ("__name__", "a_total"),
                        ("iface", "g0"),
                        ("rule", "lidar"),
                        ("vin", "V1")
                    ],
                    3.0
                ),
                (
                    vec![
                        ("__name__", "h_bucket"),
                        ("le", "+Inf"),
                        ("rule", "no"),
                        ("vin", "V1")
                    ],
                    7.0
                ),
                (vec![("__name__", "b"), ("rule", "no"), ("vin", "V1")], 2.5),
            ]
        );
        assert_eq!(series[3].0[2], ("v", "a \"b\" \\ c\n"));
        assert!(series[3].1.is_nan());
    }

    #[test]
    fn a_collection_has_every_sample_metrics_serves() {
        let registry = metrics::registry(&AgentMetrics::default(), vec![]);
        let served = metrics::to_prometheus_text(&metrics::render(&registry));
        let lines = served.lines().filter(|l| !l.starts_with('#')).count();
        let wr = collect(&registry, &[], 1);
        assert_eq!(wr.timeseries.len(), lines);
        assert!(
            wr.timeseries
                .iter()
                .any(|t| t.labels[0].value == "edgeplane_build_info")
        );
    }
}
