//! A minimal HTTP/1.0 GET, enough to scrape the agent (no client library to build).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, bail};

/// Returns (status code, body).
pub fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no header end")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status")?;
    Ok((code, body.to_owned()))
}

/// The value of one sample in Prometheus text, e.g. `metric(&text, "x_total{rule=\"a\"}")`.
/// Labels may be given in any order.
pub fn metric(text: &str, series: &str) -> anyhow::Result<f64> {
    let want = parse_series(series);
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((s, v)) = line.rsplit_once(' ') else {
            continue;
        };
        if parse_series(s) == want {
            return Ok(v.trim().parse()?);
        }
    }
    let name = series.split('{').next().unwrap_or(series);
    let similar: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(name))
        .take(20)
        .collect();
    bail!(
        "series {series} not found; samples of {name}:\n{}",
        similar.join("\n")
    )
}

/// A series' name and its labels, sorted.
fn parse_series(s: &str) -> (String, Vec<(String, String)>) {
    let Some((name, rest)) = s.split_once('{') else {
        return (s.trim().to_owned(), Vec::new());
    };
    let mut labels: Vec<(String, String)> = rest
        .trim_end_matches('}')
        .split("\",")
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim_matches('"').to_owned()))
        })
        .collect();
    labels.sort();
    (name.to_owned(), labels)
}

/// Asserts that `promtool check metrics` (Debian package prometheus, installed by
/// `cargo xtask setup`) accepts an exposition.
pub fn promtool_accepts(metrics: &str) {
    use std::{
        io::Write as _,
        process::{Command, Stdio},
    };
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus, installed by `cargo xtask setup`)");
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(metrics.as_bytes())
        .expect("writing to promtool");
    let out = child.wait_with_output().expect("waiting for promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_match_in_any_order() {
        let text = "# TYPE h histogram\nh_bucket{le=\"0.5\",iface=\"a0\",id=\"123\"} 7\nh_bucket{le=\"1\",iface=\"a0\",id=\"123\"} 9\n";
        assert_eq!(
            metric(text, "h_bucket{iface=\"a0\",id=\"123\",le=\"0.5\"}").unwrap(),
            7.0
        );
        assert!(metric(text, "h_bucket{iface=\"a1\",id=\"123\",le=\"0.5\"}").is_err());
    }
}
