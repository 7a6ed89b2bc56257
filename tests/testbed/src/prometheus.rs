//! A real Prometheus server (Debian's `prometheus`, installed by `cargo xtask setup`) in a
//! namespace, with its data in a directory of its own, and its HTTP query API.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use crate::{http, netns::Netns};

/// Stopped (and its directory removed) on drop.
pub struct Prometheus {
    child: Option<Child>,
    ns: String,
    pub listen: SocketAddr,
    pub dir: PathBuf,
    args: Vec<String>,
}

impl Prometheus {
    /// Starts `prometheus` in `ns` on `listen` with `scrape_configs` (YAML under that key,
    /// empty for none) and `args` added to its command line.
    pub fn start(ns: &Netns, listen: SocketAddr, scrape_configs: &str, args: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("{}-prometheus", ns.name));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 500ms\n  scrape_timeout: 400ms\n\
                 scrape_configs:{scrape_configs}\n"
            ),
        )
        .unwrap();
        let mut p = Self {
            child: None,
            ns: ns.name.clone(),
            listen,
            dir,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        };
        p.resume();
        p
    }

    /// Starts it again on the same data (after [`Self::stop`]); returns once it answers.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("prometheus.log"))
            .unwrap();
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns, "prometheus"])
            .arg(format!(
                "--config.file={}",
                self.dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                self.dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={}", self.listen))
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting prometheus (Debian package prometheus; `cargo xtask setup`)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        // Behind TLS (a web config) it is ready for this test bed when it accepts connections.
        let tls = self.args.iter().any(|a| a.starts_with("--web.config.file"));
        let ready = |p: &Self| match tls {
            true => {
                let _in = crate::netns::enter(&p.ns).unwrap();
                std::net::TcpStream::connect(p.listen).is_ok()
            }
            false => p.get("/-/ready").map(|(c, _)| c) == Some(200),
        };
        while !ready(self) {
            assert!(
                Instant::now() < deadline,
                "prometheus not ready in 30 s\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, and wait for it to exit (its data stays).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        crate::terminate(&mut child, Duration::from_secs(20)).unwrap();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        let _in = crate::netns::enter(&self.ns).ok()?;
        http::get(self.listen, path).ok()
    }

    /// The `data.result` of an instant query at `time` (seconds; now when `None`).
    pub fn query_result(&self, promql: &str, time: Option<f64>) -> Option<Vec<serde_json::Value>> {
        let mut path = format!("/api/v1/query?query={}", percent_encode(promql));
        if let Some(t) = time {
            path += &format!("&time={t:.3}");
        }
        let (code, body) = self.get(&path)?;
        if code != 200 {
            return None;
        }
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        json["data"]["result"].as_array().cloned()
    }

    /// The value of an instant query's single sample, or None while the server has none.
    pub fn query(&self, promql: &str) -> Option<f64> {
        self.query_at(promql, None)
    }

    /// [`Self::query`] at `time` (seconds since the epoch).
    pub fn query_at(&self, promql: &str, time: Option<f64>) -> Option<f64> {
        match self.query_result(promql, time)?.as_slice() {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }

    /// The raw samples `(timestamp_ms, value)` of a range selector with a single series,
    /// e.g. `x{a="b"}[5m]`, at `time`.
    pub fn samples(&self, selector: &str, time: Option<f64>) -> Vec<(i64, f64)> {
        let Some(result) = self.query_result(selector, time) else {
            return vec![];
        };
        let Some(one) = result.first() else {
            return vec![];
        };
        one["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| {
                let t = v[0].as_f64()?;
                Some(((t * 1000.0).round() as i64, v[1].as_str()?.parse().ok()?))
            })
            .collect()
    }

    /// The raw samples of every series a range selector picks (e.g. `{job="x"}[1m]`) at
    /// `time`: `(series labels as JSON, timestamp_ms)`. Counting them needs no PromQL function,
    /// which would drop `__name__` and make series collide.
    pub fn raw_samples(&self, selector: &str, time: Option<f64>) -> Vec<(String, i64)> {
        self.query_result(selector, time)
            .into_iter()
            .flatten()
            .flat_map(|series| {
                let labels = series["metric"].to_string();
                series["values"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(move |v| {
                        Some((labels.clone(), (v[0].as_f64()? * 1000.0).round() as i64))
                    })
            })
            .collect()
    }

    /// Polls `promql` until it equals `want` or `limit` passes; returns the last value.
    pub fn wait_for(&self, promql: &str, want: f64, limit: Duration) -> Option<f64> {
        let start = Instant::now();
        loop {
            let v = self.query(promql);
            if v == Some(want) || start.elapsed() > limit {
                return v;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
