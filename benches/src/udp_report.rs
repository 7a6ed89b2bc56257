//! The UDP suite's part of the report: the engines' table with their ratios to tokio, to the
//! kernel's own forwarding (`linux-nat`) and to the minimal XDP program (`limit`), a warning
//! row for any engine the sender did not saturate, where the forwarding CPU's time went, and
//! where the offered datagrams were lost.

use crate::{
    report::{Row, fmt, ratio},
    table::markdown,
};

/// The sender saturated a forwarder if it offered this much more than was forwarded.
const SATURATED: f64 = 1.05;

/// The engines the ratios are to, in column order.
const BASES: [&str; 3] = ["tokio", "linux-nat", "limit"];

pub fn markdown_tables(rows: &[&Row]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let base = |name: &str| rows.iter().find(|r| r.engine == name);
    let missing: Vec<String> = BASES
        .iter()
        .filter(|b| base(b).is_none())
        .map(|b| format!("`{b}`"))
        .collect();
    // What the forwarding core would forward if forwarding were all it did.
    let capacity = |r: &Row| {
        r.forwarder_cpu_ns_per_packet
            .filter(|&ns| ns > 0.0)
            .map(|ns| 1e9 / ns)
    };
    let mut table = Vec::new();
    for r in rows {
        let mut row = vec![r.engine.clone(), fmt(r.pps, 0)];
        row.extend(BASES.map(|b| ratio(r.pps, base(b).and_then(|b| b.pps))));
        row.extend([
            fmt(r.sender_pps, 0),
            fmt(r.forwarder_cpu_ns_per_packet, 0),
            fmt(capacity(r), 0),
            ratio(capacity(r), base("tokio").and_then(|b| capacity(b))),
            ratio(capacity(r), base("linux-nat").and_then(|b| capacity(b))),
            ratio(capacity(r), base("limit").and_then(|b| capacity(b))),
            fmt(r.p50_us, 1),
            fmt(r.p99_us, 1),
            ratio(r.p99_us, base("tokio").and_then(|b| b.p99_us)),
            fmt(r.p999_us, 1),
            fmt(r.cpu_ns_per_packet, 0),
            fmt(r.process_cpu_ns_per_packet, 0),
            r.rss_bytes.map_or("-".into(), |b| {
                format!("{:.1}", b as f64 / (1 << 20) as f64)
            }),
        ]);
        table.push(row);
    }
    const HEADER: [&str; 18] = [
        "engine",
        "pps (one forwarding core)",
        "÷ tokio",
        "÷ linux-nat",
        "÷ limit",
        "sender pps",
        "forwarding CPU ns/pkt",
        "core capacity pps (1e9 / ns)",
        "capacity ÷ tokio",
        "capacity ÷ linux-nat",
        "capacity ÷ limit",
        "p50 µs",
        "p99 µs",
        "p99 ÷ tokio",
        "p99.9 µs",
        "CPU ns/pkt (all)",
        "CPU ns/pkt (forwarder process)",
        "RSS MiB",
    ];
    for r in rows {
        if let (Some(pps), Some(offered)) = (r.pps, r.sender_pps)
            && offered < pps * SATURATED
        {
            let mut row = vec![
                format!("⚠ {}", r.engine),
                format!(
                    "the sender offered {offered:.0}/s, less than {:.0}% over the {pps:.0}/s forwarded: this figure is the sender's bound, not the forwarder's",
                    (SATURATED - 1.0) * 100.0
                ),
            ];
            row.resize(HEADER.len(), String::new());
            table.push(row);
        }
    }
    let mut out = format!(
        "### UDP forwarding, veth sender → gateway → receiver, one forwarding core\n\n\
         pps: datagrams the gateway sent on per second at saturation, from one CPU (the other \
         sends and receives). forwarding CPU ns/pkt: CPU time of the gateway's ingress NAPI \
         kthread and the forwarding process per datagram sent on; core capacity: what one core \
         doing only that would forward. Ratios are of pps, of capacity, and of p99.{}\n\n{}\n",
        if missing.is_empty() {
            String::new()
        } else {
            format!(" No {} row in this run.", missing.join(", "))
        },
        markdown(&HEADER, &table)
    );
    let notes: Vec<Vec<String>> = rows
        .iter()
        .map(|r| vec![r.engine.clone(), r.note.clone().unwrap_or_default()])
        .collect();
    out += &format!(
        "Where the CPUs' time went at saturation (the median round; % of the phase's wall time):\n\n{}\n",
        markdown(&["engine", "isolation"], &notes)
    );
    out += &loss_table(rows);
    out
}

/// Every engine's stages and drops, with their share of what the sender offered.
fn loss_table(rows: &[&Row]) -> String {
    let mut table = Vec::new();
    for r in rows {
        let Some(counts) = &r.loss else { continue };
        let offered = counts
            .iter()
            .find(|c| c.place == "sender" && !c.lost)
            .map_or(0, |c| c.count);
        for c in counts {
            table.push(vec![
                r.engine.clone(),
                c.place.clone(),
                c.counter.clone(),
                if c.lost { "lost" } else { "passed" }.into(),
                c.count.to_string(),
                if offered > 0 {
                    format!("{:.1}%", 100.0 * c.count as f64 / offered as f64)
                } else {
                    "-".into()
                },
            ]);
        }
    }
    if table.is_empty() {
        return String::new();
    }
    format!(
        "Where the offered datagrams went at saturation (the median round; every counter on the \
         path that moved; `passed` rows are stages in path order):\n\n{}\n",
        markdown(
            &["engine", "where", "counter", "kind", "count", "of offered"],
            &table
        )
    )
}
