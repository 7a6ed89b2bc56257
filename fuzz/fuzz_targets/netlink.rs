//! Replies and notifications from the kernel's rtnetlink: an RTM_GETLINK dump (host metrics),
//! a can-gw job dump and acknowledgement, link notifications. Every datagram is read or
//! refused with a typed error; a can-gw job read from a dump, or made up, goes through the
//! request the agent sends and reads back the same.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use edgeplane::{
    can::gateway::{CGW_FLAGS_CAN_FD, Crc8, Job, Modification, Op},
    fuzzing,
};
use edgeplane_common::can::CAN_MAX_DLEN;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = fuzzing::host_stats_batch(data) {
        let _ = e.to_string();
    }
    if let Err(e) = fuzzing::link_events(data) {
        let _ = e.to_string();
    }
    let _ = fuzzing::can_gw_ack(data);
    match fuzzing::can_gw_dump(data) {
        Ok((_, jobs)) => {
            for (_, job) in jobs {
                assert_eq!(
                    read_back(&job),
                    job,
                    "a dumped job changed through its request"
                );
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    if let Ok(job) = made_up_job(&mut Unstructured::new(data)) {
        assert_eq!(
            read_back(&job),
            as_sent(job),
            "a job changed through its request"
        );
    }
});

/// The job, through the request that adds it and the dump parser.
fn read_back(job: &Job) -> Job {
    let (done, jobs) =
        fuzzing::can_gw_dump(&fuzzing::can_gw_add_request(job)).expect("our request parses");
    assert!(!done);
    let [(counters, back)] = &jobs[..] else {
        panic!("one request, {} jobs", jobs.len())
    };
    assert_eq!(counters.uid, job.uid);
    back.clone()
}

fn made_up_job(u: &mut Unstructured<'_>) -> arbitrary::Result<Job> {
    let mut job = Job {
        uid: u32::arbitrary(u)?,
        src_ifindex: u32::arbitrary(u)?,
        dst_ifindex: u32::arbitrary(u)?,
        filter_id: u32::arbitrary(u)?,
        filter_mask: u32::arbitrary(u)?,
        flags: u16::arbitrary(u)?,
        hops: u8::arbitrary(u)?,
        mods: Vec::new(),
        xor: Option::arbitrary(u)?,
        crc8: None,
    };
    for _ in 0..u.int_in_range(0..=4)? {
        job.mods.push(Modification {
            op: *u.choose(&[Op::And, Op::Or, Op::Xor, Op::Set])?,
            fields: u8::arbitrary(u)?,
            values: edgeplane_fuzz::frame(u)?,
        });
    }
    if bool::arbitrary(u)? {
        job.crc8 = Some(Crc8 {
            from: i8::arbitrary(u)?,
            to: i8::arbitrary(u)?,
            result: i8::arbitrary(u)?,
            init: u8::arbitrary(u)?,
            final_xor: u8::arbitrary(u)?,
            table: <[u8; 256]>::arbitrary(u)?,
            profile: u8::arbitrary(u)?,
            profile_data: <[u8; 20]>::arbitrary(u)?,
        });
    }
    Ok(job)
}

/// What of a job its request carries: a classic job's modifications take a struct can_frame,
/// whose data stops after 8 bytes (the reserved bytes go as they are).
fn as_sent(mut job: Job) -> Job {
    if job.flags & CGW_FLAGS_CAN_FD == 0 {
        for m in &mut job.mods {
            m.values.data[usize::from(CAN_MAX_DLEN)..].fill(0);
        }
    }
    job
}
