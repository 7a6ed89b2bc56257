//! The records agents keep in etcd, as `edgeplane registry get` reads them: every value decodes
//! and validates or is rejected; a valid record re-encodes to itself and renders as JSON. The
//! agent's own encoder, given made-up contents, writes a record that decodes to them.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use edgeplane::{
    kernel::attach::Hook,
    registry::record::{self, AgentRecord, Identity, RulesRejection, RulesState},
    runtime::status::AttachedProgram,
};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    match record::decode(data) {
        Ok(r) => {
            let again =
                record::decode(&r.encode_to_vec()).expect("a valid record re-encodes valid");
            assert_eq!(again, r);
            serde_json::to_string(&r).expect("a record renders as JSON");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    let _ = encode_then_decode(&mut Unstructured::new(data));
});

fn encode_then_decode(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let id = Identity {
        service_name: String::arbitrary(u)?,
        vin: String::arbitrary(u)?,
        spiffe_id: String::arbitrary(u)?,
        kernel_release: String::arbitrary(u)?,
        start_time_unix_ms: u64::arbitrary(u)?,
        http_endpoints: Vec::arbitrary(u)?,
    };
    let mut programs = Vec::new();
    for _ in 0..u.int_in_range(0..=3)? {
        programs.push(AttachedProgram {
            name: String::arbitrary(u)?,
            kind: *u.choose(&[Hook::Xdp, Hook::Tc, Hook::TcEgress])?,
            attach_point: String::arbitrary(u)?,
            id: u32::arbitrary(u)?,
            tag: u64::arbitrary(u)?,
        });
    }
    let rules = RulesState {
        applied_revision: i64::arbitrary(u)?,
        rejection: if bool::arbitrary(u)? {
            Some(RulesRejection {
                revision: i64::arbitrary(u)?,
                error: String::arbitrary(u)?,
                time_unix_ms: u64::arbitrary(u)?,
            })
        } else {
            None
        },
    };
    let r = AgentRecord::decode(record::encode(&id, &programs, &rules).as_slice())
        .expect("the agent's record decodes");
    assert_eq!(
        (r.service_name, r.vin, r.spiffe_id, r.kernel_release),
        (id.service_name, id.vin, id.spiffe_id, id.kernel_release)
    );
    assert_eq!(
        (r.start_time_unix_ms, r.http_endpoints),
        (id.start_time_unix_ms, id.http_endpoints)
    );
    assert_eq!(r.programs.len(), programs.len());
    for (got, p) in r.programs.iter().zip(&programs) {
        assert_eq!(
            (&got.name, &got.attach_point, got.id),
            (&p.name, &p.attach_point, p.id)
        );
        assert_eq!(
            (got.kind.as_str(), got.tag.clone()),
            (p.kind.to_string().as_str(), format!("{:016x}", p.tag))
        );
    }
    assert_eq!(r.rules_revision, rules.applied_revision);
    assert_eq!(r.last_rules_rejection, rules.rejection);
    Ok(())
}
