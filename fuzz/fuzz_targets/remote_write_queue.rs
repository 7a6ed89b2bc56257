//! The remote-write queue's segment files, as the agent reads them back after a restart or a
//! crash: any bytes scan to valid records and a tail (never a panic, never an allocation the
//! file cannot back), every record the scan accepts reads back whole, a payload decodes or is
//! rejected, and cutting the file anywhere keeps every record before the cut.

#![no_main]

use edgeplane::export::queue::format::{self, Tail};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let scan = format::scan(data);
    assert!(scan.valid_len as usize <= data.len());
    if scan.tail == Tail::Clean {
        assert_eq!(scan.valid_len as usize, data.len());
    }
    for r in &scan.records {
        let bytes = &data[r.offset as usize..(r.offset + r.size()) as usize];
        let payload = format::verified_payload(bytes, r).expect("a scanned record verifies");
        if let Ok(wr) = format::decode(payload) {
            let _ = wr.timeseries.len();
        }
    }
    // A crash could have cut the file anywhere: what came before stays.
    let cut = data.len() / 2;
    let shorter = format::scan(&data[..cut]);
    let before = scan
        .records
        .iter()
        .filter(|r| r.offset + r.size() <= cut as u64)
        .count();
    assert_eq!(shorter.records[..], scan.records[..before]);
    // The agent's own records scan back as written.
    let mut file = format::MAGIC.to_vec();
    file.extend(format::encode(data.len() as u32, -1, data));
    let again = format::scan(&file);
    assert_eq!((again.tail, again.records.len()), (Tail::Clean, 1));
});
