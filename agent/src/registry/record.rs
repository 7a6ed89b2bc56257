//! The record an agent keeps in etcd (proto/edgeplane/registry.proto), built from what the
//! agent is and what the data plane runs now.

use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message as _;

use crate::{config, runtime::status::AttachedProgram};

#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("edgeplane.registry.v1");
}

pub use pb::{AgentRecord, RulesRejection};

/// What does not change while the agent runs.
#[derive(Debug, Clone)]
pub struct Identity {
    pub service_name: String,
    pub vin: String,
    pub spiffe_id: String,
    pub kernel_release: String,
    pub start_time_unix_ms: u64,
    pub http_endpoints: Vec<String>,
}

/// The state of pushed rule sets, as the agent's reload path reports it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RulesState {
    /// etcd revision of the pushed rule set in force; 0 for the config file's.
    pub applied_revision: i64,
    /// The last push that was rejected, until a later one is applied.
    pub rejection: Option<RulesRejection>,
}

/// The encoded record.
pub fn encode(id: &Identity, programs: &[AttachedProgram], rules: &RulesState) -> Vec<u8> {
    AgentRecord {
        service_name: id.service_name.clone(),
        vin: id.vin.clone(),
        spiffe_id: id.spiffe_id.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        kernel_release: id.kernel_release.clone(),
        start_time_unix_ms: id.start_time_unix_ms,
        http_endpoints: id.http_endpoints.clone(),
        programs: programs
            .iter()
            .map(|p| pb::AttachedProgram {
                name: p.name.clone(),
                kind: p.kind.to_string(),
                attach_point: p.attach_point.clone(),
                id: p.id,
                tag: format!("{:016x}", p.tag),
            })
            .collect(),
        rules_revision: rules.applied_revision,
        last_rules_rejection: rules.rejection.clone(),
        updated_unix_ms: unix_ms(SystemTime::now()),
    }
    .encode_to_vec()
}

/// Why the value under an agent's key is not a record an agent wrote.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("not protobuf of an AgentRecord: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("service_name: {0}")]
    ServiceName(String),
    #[error("vin: {0}")]
    Vin(String),
    #[error("spiffe_id: {0}")]
    SpiffeId(String),
    #[error("programs[{index}].tag `{tag}` is not 16 lowercase hex digits")]
    Tag { index: usize, tag: String },
}

/// Decodes a record read from etcd and checks what every agent's record has: the names its key
/// is made of, an identity if any, and program tags as the kernel's (as [`encode`] writes them).
/// Fields a newer agent adds are skipped, as protobuf does.
pub fn decode(value: &[u8]) -> Result<AgentRecord, RecordError> {
    let r = AgentRecord::decode(value)?;
    config::check_service_name(&r.service_name).map_err(RecordError::ServiceName)?;
    config::check_vin(&r.vin).map_err(RecordError::Vin)?;
    if !r.spiffe_id.is_empty() {
        config::check_spiffe_id(&r.spiffe_id).map_err(RecordError::SpiffeId)?;
    }
    for (index, p) in r.programs.iter().enumerate() {
        let hex = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
        if p.tag.len() != 16 || !p.tag.chars().all(hex) {
            return Err(RecordError::Tag {
                index,
                tag: p.tag.clone(),
            });
        }
    }
    Ok(r)
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `uname -r`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::attach::Hook;

    #[test]
    fn round_trips_through_protobuf() {
        let id = Identity {
            service_name: "gw".into(),
            vin: "WVWZZZ1JZXW000001".into(),
            spiffe_id: "spiffe://fleet.example/gw".into(),
            kernel_release: kernel_release(),
            start_time_unix_ms: 1,
            http_endpoints: vec!["http://127.0.0.1:9464".into()],
        };
        let programs = [AttachedProgram {
            name: "udp_forward_tc".into(),
            kind: Hook::Tc,
            attach_point: "eth0".into(),
            id: 42,
            tag: 0x0123_4567_89ab_cdef,
        }];
        let rules = RulesState {
            applied_revision: 0,
            rejection: Some(RulesRejection {
                revision: 7,
                error: "bad".into(),
                time_unix_ms: 2,
            }),
        };
        let r = decode(&encode(&id, &programs, &rules)).unwrap();
        assert_eq!(r.vin, id.vin);
        assert!(!r.kernel_release.is_empty());
        assert_eq!(r.programs[0].tag, "0123456789abcdef");
        assert_eq!(r.programs[0].kind, "tc");
        assert_eq!(r.last_rules_rejection.as_ref().unwrap().revision, 7);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["programs"][0]["attach_point"], "eth0");
    }

    #[test]
    fn records_no_agent_wrote_are_rejected() {
        let good = AgentRecord {
            service_name: "gw".into(),
            vin: "WVWZZZ1JZXW000001".into(),
            programs: vec![pb::AttachedProgram {
                tag: "0123456789abcdef".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(decode(&good.encode_to_vec()).is_ok());
        assert!(matches!(
            decode(b"not protobuf \xff\xff"),
            Err(RecordError::Decode(_))
        ));
        let bad = |change: fn(&mut AgentRecord)| {
            let mut r = good.clone();
            change(&mut r);
            decode(&r.encode_to_vec()).unwrap_err()
        };
        assert!(matches!(
            bad(|r| r.service_name.clear()),
            RecordError::ServiceName(_)
        ));
        assert!(matches!(bad(|r| r.vin = "IOQ".into()), RecordError::Vin(_)));
        assert!(matches!(
            bad(|r| r.spiffe_id = "http://x".into()),
            RecordError::SpiffeId(_)
        ));
        assert!(matches!(
            bad(|r| r.programs[0].tag = "0123456789ABCDEF".into()),
            RecordError::Tag { index: 0, .. }
        ));
    }
}
