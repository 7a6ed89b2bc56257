//! `edgeplane top`: the busiest rules, routes, ports and CAN interfaces of a running agent with
//! their rate and latency (p50, p99, max), refreshed every second from its /metrics.

use std::{
    collections::BTreeMap,
    io::{IsTerminal as _, Write as _},
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::bail;

use super::client;

#[derive(clap::Args)]
pub struct Args {
    /// The agent's HTTP address (`[http] listen`).
    #[arg(long, default_value = "127.0.0.1:9464")]
    agent: SocketAddr,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Rows shown, busiest first.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Print one view (after one interval) and exit.
    #[arg(long)]
    once: bool,
}

/// Histogram families shown, with the column that names a row.
const FAMILIES: [(&str, &str); 3] = [
    ("edgeplane_udp_forward_latency_seconds", "udp rule"),
    ("edgeplane_can_forward_latency_seconds", "can route"),
    ("edgeplane_socket_delivery_latency_seconds", "delivery"),
];

/// One histogram series: cumulative (upper bound, count) pairs and the total.
#[derive(Debug, Clone, Default, PartialEq)]
struct Series {
    buckets: Vec<(f64, f64)>,
    count: f64,
}

type Scrape = BTreeMap<(String, String), Series>;

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.interval.is_nan() || args.interval <= 0.0 {
        bail!("--interval must be positive");
    }
    let interval = Duration::from_secs_f64(args.interval);
    let mut before = scrape(args.agent)?;
    let mut at = Instant::now();
    let tty = std::io::stdout().is_terminal();
    loop {
        std::thread::sleep(interval);
        let now = scrape(args.agent)?;
        let elapsed = at.elapsed().as_secs_f64();
        at = Instant::now();
        let view = render(&before, &now, elapsed, args.limit);
        let mut out = std::io::stdout().lock();
        if tty && !args.once {
            write!(out, "\x1b[2J\x1b[H")?;
        }
        writeln!(
            out,
            "edgeplane top — {} — every {:.1} s",
            args.agent, args.interval
        )?;
        write!(out, "{view}")?;
        out.flush()?;
        if args.once {
            return Ok(());
        }
        before = now;
    }
}

fn scrape(agent: SocketAddr) -> anyhow::Result<Scrape> {
    let (code, body) = client::get(agent, "/metrics", Duration::from_secs(2))?;
    if code != 200 {
        bail!("the agent answered {code} on /metrics");
    }
    Ok(parse(&body))
}

/// The latency histograms in a Prometheus text exposition, by (family, labels without `le`).
fn parse(text: &str) -> Scrape {
    let mut out = Scrape::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        for (family, _) in FAMILIES {
            let Some(suffix) = name.strip_prefix(family) else {
                continue;
            };
            let mut le = None;
            let rest: Vec<&str> = split_labels(labels)
                .into_iter()
                .filter(|l| match l.strip_prefix("le=") {
                    Some(v) => {
                        le = Some(v.trim_matches('"'));
                        false
                    }
                    None => true,
                })
                .collect();
            let s = out.entry((family.to_owned(), rest.join(","))).or_default();
            match suffix {
                "_bucket" => {
                    let bound = match le {
                        Some("+Inf") | None => f64::INFINITY,
                        Some(b) => b.parse().unwrap_or(f64::INFINITY),
                    };
                    s.buckets.push((bound, value));
                }
                "_count" => s.count = value,
                _ => {}
            }
        }
    }
    out
}

/// Splits `a="x",b="y,z"` at the commas between labels.
fn split_labels(labels: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in labels.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&labels[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < labels.len() {
        out.push(&labels[start..]);
    }
    out
}

/// The bound below which `q` of the counts in `buckets` (cumulative) lie.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(b, _)| *b)
}

/// The upper bound of the highest bucket that gained counts.
fn max_bound(buckets: &[(f64, f64)]) -> Option<f64> {
    let mut prev = 0.0;
    let mut max = None;
    for (b, c) in buckets {
        if *c > prev {
            max = Some(*b);
        }
        prev = *c;
    }
    max
}

fn delta(before: Option<&Series>, now: &Series) -> Series {
    let Some(before) = before else {
        return now.clone();
    };
    Series {
        buckets: now
            .buckets
            .iter()
            .map(|(b, c)| {
                let old = before
                    .buckets
                    .iter()
                    .find(|(ob, _)| ob == b)
                    .map_or(0.0, |(_, c)| *c);
                (*b, (c - old).max(0.0))
            })
            .collect(),
        count: (now.count - before.count).max(0.0),
    }
}

fn time(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s.is_infinite() => "> 68 s".into(),
        Some(s) if s < 1e-3 => format!("≤{:.1} µs", s * 1e6),
        Some(s) if s < 1.0 => format!("≤{:.2} ms", s * 1e3),
        Some(s) => format!("≤{s:.2} s"),
    }
}

fn render(before: &Scrape, now: &Scrape, elapsed: f64, limit: usize) -> String {
    let mut rows: Vec<(f64, [String; 7])> = now
        .iter()
        .map(|((family, labels), s)| {
            let d = delta(before.get(&(family.clone(), labels.clone())), s);
            let kind = FAMILIES
                .iter()
                .find(|(f, _)| f == family)
                .map_or("", |(_, k)| *k);
            let rate = d.count / elapsed;
            (
                rate,
                [
                    kind.to_owned(),
                    labels.replace('"', ""),
                    format!("{rate:.1}"),
                    time(quantile(&d.buckets, 0.5)),
                    time(quantile(&d.buckets, 0.99)),
                    time(max_bound(&d.buckets)),
                    format!("{}", s.count),
                ],
            )
        })
        .collect();
    rows.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1[1].cmp(&b.1[1])));
    rows.truncate(limit);
    let header = ["KIND", "SERIES", "FRAMES/S", "P50", "P99", "MAX", "TOTAL"];
    let mut widths = header.map(str::len);
    for (_, r) in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            let pad = w.saturating_sub(c.chars().count());
            if i >= 2 {
                out.push_str(&" ".repeat(pad));
                out.push_str(c);
            } else {
                out.push_str(c);
                out.push_str(&" ".repeat(pad));
            }
            out.push_str("  ");
        }
        out.push('\n');
    };
    line(&header.map(str::to_owned));
    for (_, r) in &rows {
        line(r);
    }
    if rows.is_empty() {
        out.push_str("(no latency histograms: is [latency] enabled, with rules or ports?)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# TYPE edgeplane_udp_forward_latency_seconds histogram
edgeplane_udp_forward_latency_seconds_sum{rule="a"} 0.001
edgeplane_udp_forward_latency_seconds_count{rule="a"} 10
edgeplane_udp_forward_latency_seconds_bucket{rule="a",le="0.000001"} 2
edgeplane_udp_forward_latency_seconds_bucket{rule="a",le="0.000002"} 9
edgeplane_udp_forward_latency_seconds_bucket{rule="a",le="0.000004"} 10
edgeplane_udp_forward_latency_seconds_bucket{rule="a",le="+Inf"} 10
edgeplane_socket_delivery_latency_seconds_count{proto="udp",port="7000",stage="read"} 0
"#;

    #[test]
    fn quantiles_and_max_come_from_bucket_bounds() {
        let s = parse(TEXT);
        let a = &s[&(FAMILIES[0].0.to_owned(), "rule=\"a\"".to_owned())];
        assert_eq!(a.count, 10.0);
        assert_eq!(quantile(&a.buckets, 0.5), Some(0.000002));
        assert_eq!(quantile(&a.buckets, 0.99), Some(0.000004));
        assert_eq!(max_bound(&a.buckets), Some(0.000004));
        let view = render(&Scrape::new(), &s, 1.0, 10);
        assert!(view.lines().nth(1).unwrap().contains("rule=a"), "{view}");
        assert!(view.contains("port=7000,stage=read"), "{view}");
    }

    #[test]
    fn rates_are_differences_between_scrapes() {
        let before = parse(TEXT);
        let now = parse(&TEXT.replace("} 10\n", "} 30\n"));
        let key = (FAMILIES[0].0.to_owned(), "rule=\"a\"".to_owned());
        let d = delta(before.get(&key), &now[&key]);
        assert_eq!(d.count, 20.0);
        assert_eq!(max_bound(&d.buckets), Some(0.000004));
    }
}
