//! `edgeplane events`: stream a running agent's slow-frame events (frames above
//! `latency.slow_threshold_us`) as they happen.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::Value;

#[derive(clap::Args)]
pub struct Args {
    /// The agent's HTTP address (`[http] listen`).
    #[arg(long, default_value = "127.0.0.1:9464")]
    agent: SocketAddr,
    /// Print each event as a JSON line.
    #[arg(long)]
    json: bool,
    /// Exit after this many events.
    #[arg(long)]
    count: Option<u64>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut s = TcpStream::connect_timeout(&args.agent, Duration::from_secs(2))
        .with_context(|| format!("connecting to the agent at {} (is it running?)", args.agent))?;
    write!(
        s,
        "GET /events HTTP/1.1\r\nHost: {}\r\nAccept: application/x-ndjson\r\n\r\n",
        args.agent
    )?;
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status)?;
    let code = status.split_whitespace().nth(1).unwrap_or("");
    let mut chunked = false;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        chunked |= h
            .to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked");
    }
    if code != "200" {
        let mut body = String::new();
        let _ = r.read_to_string(&mut body);
        bail!("the agent answered {code}: {}", body.trim());
    }
    if !args.json {
        eprintln!("streaming slow frames from {} (Ctrl-C stops)", args.agent);
    }
    let mut seen = 0;
    let mut pending = Vec::new();
    let mut out = std::io::stdout().lock();
    loop {
        let data = if chunked {
            chunk(&mut r)?
        } else {
            line(&mut r)?
        };
        let Some(data) = data else {
            bail!("the agent closed the stream (it stopped?)");
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let text: Vec<u8> = pending.drain(..=end).collect();
            let text = String::from_utf8_lossy(&text);
            let v: Value = serde_json::from_str(text.trim()).context("a malformed event")?;
            if args.json {
                writeln!(out, "{}", text.trim())?;
            } else {
                writeln!(out, "{}", human(&v))?;
            }
            out.flush()?;
            if v.get("missed").is_none() {
                seen += 1;
            }
            if args.count.is_some_and(|c| seen >= c) {
                return Ok(());
            }
        }
    }
}

fn chunk(r: &mut impl std::io::BufRead) -> anyhow::Result<Option<Vec<u8>>> {
    let mut size = String::new();
    if r.read_line(&mut size)? == 0 {
        return Ok(None);
    }
    let n = usize::from_str_radix(size.trim(), 16).context("bad chunk size")?;
    if n == 0 {
        return Ok(None);
    }
    let mut buf = vec![0; n + 2];
    r.read_exact(&mut buf)?;
    buf.truncate(n);
    Ok(Some(buf))
}

fn line(r: &mut impl std::io::BufRead) -> anyhow::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    Ok((r.read_until(b'\n', &mut buf)? > 0).then_some(buf))
}

fn ms(v: &Value, key: &str) -> Option<String> {
    v.get(key)?
        .as_f64()
        .map(|us| format!("{:.3} ms", us / 1000.0))
}

/// `udp_delivery  udp:7000  203.412 ms  rx→hook 0.051 ms  hook→done 203.361 ms  198.18.1.2:4000 -> :7000 (g0)`
fn human(v: &Value) -> String {
    if let Some(n) = v.get("missed") {
        return format!("... {n} events missed (this client was too slow)");
    }
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
    let f = &v["flow"];
    let fs = |k: &str| f.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let flow = if let Some(id) = f.get("id").and_then(Value::as_str) {
        format!("id {id}")
    } else {
        format!(
            "{}:{} -> {}:{}",
            fs("src"),
            f["src_port"],
            fs("dst"),
            f["dst_port"]
        )
    };
    let iface = fs("iface");
    format!(
        "{:<13} {:<16} {:>12}  rx→hook {:>11}  hook→done {:>11}  {flow}{}",
        s("kind"),
        s("target"),
        ms(v, "latency_us").unwrap_or_default(),
        ms(v, "rx_to_hook_us").unwrap_or_else(|| "-".into()),
        ms(v, "hook_to_done_us").unwrap_or_else(|| "-".into()),
        if iface.is_empty() {
            String::new()
        } else {
            format!(" ({iface})")
        }
    )
}
