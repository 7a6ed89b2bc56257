//! Criterion benchmarks of the userspace hot paths: the cannelloni tunnel codec, the userspace
//! UDP engine's rule lookup, and /metrics rendering with 1,000 userspace rules. No root and no
//! kernel needed. `cargo xtask bench` runs them and puts their means in the report.

use std::{
    hint::black_box,
    net::SocketAddr,
    sync::{Arc, RwLock},
};

use criterion::{Criterion, criterion_group, criterion_main};
use edgeplane::{
    can::tunnel::codec::{Encoder, TunnelFrame, decode},
    config::Config,
    metrics::{self, AgentMetrics},
    udp_forward::stats::UdpCollector,
    userspace::{
        UdpCounters, UdpRuleView, UserspaceView,
        udp_rules::{self, RuleTable},
    },
};
use edgeplane_common::can::CanFrame;

/// Classic 8-byte frames filling a default 1400-byte datagram (13 bytes each).
fn frames() -> Vec<TunnelFrame> {
    (0..107u32)
        .map(|i| {
            let mut f = CanFrame {
                can_id: 0x100 + i,
                len: 8,
                ..CanFrame::default()
            };
            f.data[..8].copy_from_slice(&u64::from(i).to_be_bytes());
            TunnelFrame {
                frame: f,
                fd: false,
            }
        })
        .collect()
}

fn codec(c: &mut Criterion) {
    let frames = frames();
    let mut g = c.benchmark_group("tunnel_codec");
    g.bench_function("encode 107 classic frames", |b| {
        b.iter(|| {
            let mut e = Encoder::new(1400);
            for f in &frames {
                assert!(e.push(black_box(f)));
            }
            black_box(e.finish(7))
        })
    });
    let mut e = Encoder::new(1400);
    for f in &frames {
        e.push(f);
    }
    let datagram = e.finish(7);
    g.bench_function("decode 107 classic frames", |b| {
        b.iter(|| black_box(decode(black_box(&datagram), u16::MAX).expect("valid")))
    });
    g.finish();
}

/// 1,000 rules on one listener: 250 of each source shape, as a busy gateway port might have.
fn rules_toml(n: u32) -> String {
    let mut t = String::from("[udp]\nmode = \"userspace\"\n");
    for i in 0..n {
        let m = match i % 4 {
            0 => format!("src_port = {}", 1000 + i),
            1 => format!("src_ip = \"10.{}.{}.1\"", i / 256, i % 256),
            2 => format!(
                "src_ip = \"10.{}.{}.2\", src_port = {}",
                i / 256,
                i % 256,
                1000 + i
            ),
            _ => format!("src_ip = \"10.{}.{}.3\", src_port = 9", i / 256, i % 256),
        };
        t += &format!(
            "[[udp.forward]]\nname = \"r{i}\"\ningress = \"eth0\"\nmatch = {{ dst_port = 5000, {m} }}\nto = {{ iface = \"eth1\", dst_ip = \"192.0.2.1\" }}\n"
        );
    }
    t
}

fn lookup(c: &mut Criterion) {
    let config = Config::parse(&rules_toml(1000), std::path::Path::new("bench")).expect("valid");
    let listeners = udp_rules::listeners(&config.udp.forward);
    let spec = listeners.values().next().expect("one listener");
    let table = RuleTable::new(&spec.routes);
    let mut g = c.benchmark_group("userspace_rule_lookup");
    // Rule 902: source address and port, the most specific shape.
    let hit: SocketAddr = "10.3.134.2:1902".parse().expect("addr");
    let miss: SocketAddr = "203.0.113.1:7".parse().expect("addr");
    assert!(table.lookup(&hit).is_some() && table.lookup(&miss).is_none());
    g.bench_function("1000 rules, most specific shape", |b| {
        b.iter(|| black_box(table.lookup(black_box(&hit))))
    });
    g.bench_function("1000 rules, no rule (every shape probed)", |b| {
        b.iter(|| black_box(table.lookup(black_box(&miss))))
    });
    g.finish();
}

fn render(c: &mut Criterion) {
    let view = UserspaceView {
        udp: (0..1000)
            .map(|i| UdpRuleView {
                rule: format!("rule-{i}"),
                ingress: "eth0".into(),
                engine: "tokio",
                counters: Arc::new(UdpCounters::default()),
            })
            .collect(),
        ..UserspaceView::default()
    };
    let registry = metrics::registry(
        &AgentMetrics::default(),
        vec![Box::new(UdpCollector {
            stats: None,
            view: Arc::default(),
            userspace: Arc::new(RwLock::new(view)),
        })],
    );
    c.bench_function("metrics_render/1000 userspace rules", |b| {
        b.iter(|| black_box(metrics::render(&registry)))
    });
}

criterion_group!(benches, codec, lookup, render);
criterion_main!(benches);
