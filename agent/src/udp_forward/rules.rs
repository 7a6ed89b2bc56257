//! Compiling rules from the config into rule-map keys and actions.

use std::{collections::HashMap, net::IpAddr};

use edgeplane_common::udp_forward::{
    FAMILY_IPV4, FAMILY_IPV6, UdpForwardAction, UdpIngress, UdpMatchKey, field, ip_words, rewrite,
};

use crate::config::{Family, UdpForwardRule};

/// A rule as the kernel sees it, before it has a stats slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledRule {
    pub name: String,
    pub ingress: String,
    pub ingress_ifindex: u32,
    pub egress: String,
    pub egress_ifindex: u32,
    /// One key per family the rule applies to.
    pub keys: Vec<UdpMatchKey>,
    /// `slot` is filled in when the rule is installed.
    pub action: UdpForwardAction,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("rule `{rule}`: interface `{iface}` does not exist on this host (see `ip link`)")]
pub struct UnknownInterface {
    pub rule: String,
    pub iface: String,
}

/// Compiles one validated rule, resolving interface names with `index`.
pub fn compile(
    rule: &UdpForwardRule,
    index: &dyn Fn(&str) -> Option<u32>,
) -> Result<CompiledRule, UnknownInterface> {
    let resolve = |iface: &str| {
        index(iface).ok_or_else(|| UnknownInterface {
            rule: rule.name.clone(),
            iface: iface.to_owned(),
        })
    };
    let ingress_ifindex = resolve(&rule.ingress)?;
    let egress_ifindex = resolve(&rule.to.iface)?;

    let m = &rule.matches;
    let mut fields = 0;
    for (bit, present) in [
        (field::DST_PORT, m.dst_port.is_some()),
        (field::SRC_PORT, m.src_port.is_some()),
        (field::DST_IP, m.dst_ip.is_some()),
        (field::SRC_IP, m.src_ip.is_some()),
    ] {
        if present {
            fields |= bit;
        }
    }
    let keys = rule
        .families()
        .into_iter()
        .map(|family| UdpMatchKey {
            ifindex: ingress_ifindex,
            fields,
            family: match family {
                Family::V4 => FAMILY_IPV4,
                Family::V6 => FAMILY_IPV6,
            },
            _pad: [0; 2],
            src_port: m.src_port.map_or(0, u16::to_be),
            dst_port: m.dst_port.map_or(0, u16::to_be),
            src_ip: m.src_ip.map_or([0; 8], |ip| words(&ip)),
            dst_ip: m.dst_ip.map_or([0; 8], |ip| words(&ip)),
        })
        .collect();

    let t = &rule.to;
    let mut action = UdpForwardAction {
        egress_ifindex,
        ..Default::default()
    };
    if let Some(ip) = t.dst_ip {
        action.rewrite |= rewrite::DST_IP;
        action.dst_ip = words(&ip);
    }
    if let Some(ip) = t.src_ip {
        action.rewrite |= rewrite::SRC_IP;
        action.src_ip = words(&ip);
    }
    if let Some(port) = t.dst_port {
        action.rewrite |= rewrite::DST_PORT;
        action.dst_port = port.to_be();
    }
    if let Some(port) = t.src_port {
        action.rewrite |= rewrite::SRC_PORT;
        action.src_port = port.to_be();
    }
    Ok(CompiledRule {
        name: rule.name.clone(),
        ingress: rule.ingress.clone(),
        ingress_ifindex,
        egress: rule.to.iface.clone(),
        egress_ifindex,
        keys,
        action,
    })
}

fn words(ip: &IpAddr) -> [u16; 8] {
    match ip {
        IpAddr::V4(v4) => ip_words(&v4.octets()),
        IpAddr::V6(v6) => ip_words(&v6.octets()),
    }
}

/// The rule and ingress map contents for a set of rules with slots.
#[derive(Debug, Default, PartialEq)]
pub struct MapContents {
    pub rules: HashMap<UdpMatchKey, UdpForwardAction>,
    /// Ingress ifindex -> shapes in use and stats slot.
    pub ingress: HashMap<u32, UdpIngress>,
}

impl MapContents {
    pub fn build(
        rules: &[CompiledRule],
        rule_slot: impl Fn(&str) -> u32,
        ingress_slot: impl Fn(&str) -> u32,
    ) -> Self {
        let mut out = Self::default();
        for r in rules {
            let action = UdpForwardAction {
                slot: rule_slot(&r.name),
                ..r.action
            };
            let ingress = out
                .ingress
                .entry(r.ingress_ifindex)
                .or_insert_with(|| UdpIngress {
                    slot: ingress_slot(&r.ingress),
                    ..Default::default()
                });
            for key in &r.keys {
                ingress.shapes |= 1 << key.fields;
                out.rules.insert(*key, action);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    fn rules(text: &str) -> Vec<UdpForwardRule> {
        Config::parse(text, Path::new("t.toml"))
            .unwrap()
            .udp
            .forward
    }

    fn ifindex(name: &str) -> Option<u32> {
        match name {
            "eth0" => Some(2),
            "eth1" => Some(3),
            _ => None,
        }
    }

    #[test]
    fn every_match_field_lands_in_the_key_in_wire_order() {
        let r = &rules(
            r#"[[udp.forward]]
               name = "all"
               ingress = "eth0"
               match = { dst_port = 5000, src_port = 4000, dst_ip = "192.0.2.1", src_ip = "198.51.100.7" }
               to = { iface = "eth1", dst_ip = "192.0.2.10", dst_port = 6000, src_ip = "192.0.2.254", src_port = 7000 }"#,
        )[0];
        let c = compile(r, &ifindex).unwrap();
        assert_eq!(c.keys.len(), 1);
        let k = c.keys[0];
        assert_eq!((k.ifindex, k.family), (2, FAMILY_IPV4));
        assert_eq!(
            k.fields,
            field::DST_PORT | field::SRC_PORT | field::DST_IP | field::SRC_IP
        );
        // Ports are stored as the bytes on the wire.
        assert_eq!(k.dst_port.to_ne_bytes(), 5000u16.to_be_bytes());
        assert_eq!(k.src_port.to_ne_bytes(), 4000u16.to_be_bytes());
        let bytes = |w: &[u16]| w.iter().flat_map(|x| x.to_ne_bytes()).collect::<Vec<u8>>();
        assert_eq!(bytes(&k.dst_ip[..2]), [192, 0, 2, 1]);
        assert_eq!(bytes(&k.src_ip[..2]), [198, 51, 100, 7]);
        assert_eq!(&k.dst_ip[2..], &[0; 6]);

        let a = c.action;
        assert_eq!(a.egress_ifindex, 3);
        assert_eq!(
            a.rewrite,
            rewrite::DST_IP | rewrite::DST_PORT | rewrite::SRC_IP | rewrite::SRC_PORT
        );
        assert_eq!(bytes(&a.dst_ip[..2]), [192, 0, 2, 10]);
        assert_eq!(bytes(&a.src_ip[..2]), [192, 0, 2, 254]);
        assert_eq!(a.dst_port.to_ne_bytes(), 6000u16.to_be_bytes());
        assert_eq!(a.src_port.to_ne_bytes(), 7000u16.to_be_bytes());
    }

    #[test]
    fn rules_without_addresses_get_a_key_per_family() {
        let r = &rules(
            r#"[[udp.forward]]
               name = "ports"
               ingress = "eth0"
               match = { dst_port = 5000 }
               to = { iface = "eth1", dst_port = 6000 }"#,
        )[0];
        let c = compile(r, &ifindex).unwrap();
        let families: Vec<u8> = c.keys.iter().map(|k| k.family).collect();
        assert_eq!(families, [FAMILY_IPV4, FAMILY_IPV6]);
        assert!(
            c.keys
                .iter()
                .all(|k| k.fields == field::DST_PORT && k.src_ip == [0; 8])
        );
        assert_eq!(c.action.rewrite, rewrite::DST_PORT);
    }

    #[test]
    fn ipv6_addresses_fill_all_words() {
        let r = &rules(
            r#"[[udp.forward]]
               name = "v6"
               ingress = "eth0"
               match = { dst_ip = "2001:db8::1" }
               to = { iface = "eth1", dst_ip = "2001:db8:1::2" }"#,
        )[0];
        let c = compile(r, &ifindex).unwrap();
        assert_eq!(c.keys[0].family, FAMILY_IPV6);
        let bytes: Vec<u8> = c
            .action
            .dst_ip
            .iter()
            .flat_map(|x| x.to_ne_bytes())
            .collect();
        assert_eq!(
            bytes,
            "2001:db8:1::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
    }

    #[test]
    fn unknown_interfaces_are_named() {
        let r = &rules(
            r#"[[udp.forward]]
               name = "x"
               ingress = "eth0"
               to = { iface = "eth9" }"#,
        )[0];
        assert_eq!(
            compile(r, &ifindex),
            Err(UnknownInterface {
                rule: "x".into(),
                iface: "eth9".into()
            })
        );
    }

    #[test]
    fn map_contents_collect_shapes_per_ingress() {
        let rs = rules(
            r#"[[udp.forward]]
               name = "a"
               ingress = "eth0"
               match = { dst_port = 5000 }
               to = { iface = "eth1", dst_ip = "192.0.2.10" }
               [[udp.forward]]
               name = "b"
               ingress = "eth0"
               match = { dst_port = 5000, src_ip = "198.51.100.1" }
               to = { iface = "eth1", dst_ip = "192.0.2.11" }
               [[udp.forward]]
               name = "c"
               ingress = "eth1"
               to = { iface = "eth0", dst_port = 9 }"#,
        );
        let compiled: Vec<CompiledRule> =
            rs.iter().map(|r| compile(r, &ifindex).unwrap()).collect();
        let slot = |n: &str| match n {
            "a" => 0,
            "b" => 1,
            _ => 2,
        };
        let m = MapContents::build(&compiled, slot, |i| if i == "eth0" { 4096 } else { 4097 });
        assert_eq!(m.rules.len(), 4); // a (v4), b (v4), c (v4 + v6)
        assert_eq!(
            m.ingress[&2].shapes,
            (1 << field::DST_PORT) | (1 << (field::DST_PORT | field::SRC_IP))
        );
        assert_eq!(m.ingress[&2].slot, 4096);
        assert_eq!(m.ingress[&3].shapes, 1 << 0);
        assert_eq!(m.rules[&compiled[1].keys[0]].slot, 1);
    }
}
