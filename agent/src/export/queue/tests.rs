use super::*;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("edgeplane-queue-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    d
}

fn stats(q: &Queue) -> QueueStats {
    q.stats().lock().unwrap().clone()
}

fn timestamps(q: &mut Queue) -> Vec<i64> {
    let Some(b) = q.peek(u64::MAX).unwrap() else {
        return vec![];
    };
    b.payloads
        .iter()
        .map(|p| i64::from_le_bytes(p[..8].try_into().unwrap()))
        .collect()
}

/// A payload that names its collection, so reads can be checked.
fn payload(ts: i64) -> Vec<u8> {
    let mut p = ts.to_le_bytes().to_vec();
    p.extend_from_slice(&[0xab; 100]);
    p
}

#[test]
fn appended_records_survive_reopening_until_acknowledged() {
    let d = dir("reopen");
    let mut q = Queue::open(&d, 1 << 20).unwrap();
    for ts in 1..=5 {
        q.append(10, ts, &payload(ts)).unwrap();
    }
    let b = q.peek(20).unwrap().unwrap();
    assert_eq!((b.payloads.len(), b.samples), (2, 20));
    q.ack(b.last, true).unwrap();
    drop(q);
    let mut q = Queue::open(&d, 1 << 20).unwrap();
    assert_eq!(timestamps(&mut q), [3, 4, 5]);
    assert_eq!(inspect(&d).unwrap(), [(3, 10), (4, 10), (5, 10)]);
    let s = stats(&q);
    assert_eq!((s.samples, s.oldest_ms), (30, 3));
    // Everything acknowledged, then more appended: the head must not hide the new ones.
    let b = q.peek(u64::MAX).unwrap().unwrap();
    q.ack(b.last, true).unwrap();
    q.append(10, 6, &payload(6)).unwrap();
    drop(q);
    let mut q = Queue::open(&d, 1 << 20).unwrap();
    assert_eq!(timestamps(&mut q), [6]);
    fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_torn_tail_is_cut_on_open_and_appending_goes_on_after_it() {
    let d = dir("torn");
    let mut q = Queue::open(&d, 1 << 20).unwrap();
    for ts in 1..=3 {
        q.append(10, ts, &payload(ts)).unwrap();
    }
    drop(q);
    let seg = segment_path(&d, 0);
    let len = fs::metadata(&seg).unwrap().len();
    // A crash in the middle of the third record.
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 50)
        .unwrap();
    let mut q = Queue::open(&d, 1 << 20).unwrap();
    let s = stats(&q);
    assert_eq!(s.cut_torn_bytes_total, format::HEADER as u64 + 108 - 50);
    assert_eq!(s.samples, 20);
    q.append(10, 4, &payload(4)).unwrap();
    assert_eq!(timestamps(&mut q), [1, 2, 4]);
    drop(q);
    let mut q = Queue::open(&d, 1 << 20).unwrap();
    assert_eq!(timestamps(&mut q), [1, 2, 4]);
    assert_eq!(stats(&q).cut_torn_bytes_total, 0);
    fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_corrupted_record_is_detected_and_counted() {
    let d = dir("corrupt");
    let mut q = Queue::open(&d, 1 << 20).unwrap();
    for ts in 1..=3 {
        q.append(10, ts, &payload(ts)).unwrap();
    }
    // Bit rot in the second record after it was written: found when it is read to be sent.
    let seg = segment_path(&d, 0);
    let mut bytes = fs::read(&seg).unwrap();
    let second = format::scan(&bytes).records[1];
    bytes[second.offset as usize + 30] ^= 1;
    fs::write(&seg, &bytes).unwrap();
    assert_eq!(timestamps(&mut q), [1, 3]);
    assert_eq!(stats(&q).cut_corrupt_bytes_total, second.size());
    drop(q);
    // On open, it ends what is read of the (last) segment.
    let mut q = Queue::open(&d, 1 << 20).unwrap();
    assert_eq!(timestamps(&mut q), [1]);
    assert_eq!(stats(&q).cut_corrupt_bytes_total, 2 * second.size());
    fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_full_queue_drops_the_oldest_and_counts_them() {
    let d = dir("full");
    let record = format::HEADER as u64 + 108;
    let mut q = Queue::open(&d, 10 * record).unwrap();
    for ts in 1..=25 {
        q.append(3, ts, &payload(ts)).unwrap();
    }
    let s = stats(&q);
    assert_eq!((s.bytes, s.samples), (10 * record, 30));
    assert_eq!((s.queued_total, s.dropped_full_total), (75, 45));
    assert_eq!(timestamps(&mut q), (16..=25).collect::<Vec<_>>());
    // Segments wholly dropped are deleted: the files stay near max_bytes.
    let on_disk: u64 = fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(on_disk <= 10 * record + q.segment_bytes + 100, "{on_disk}");
    // Records dropped while their batch was in flight were sent after all, once it is taken.
    let b = q.peek(6).unwrap().unwrap();
    q.append(3, 26, &payload(26)).unwrap();
    assert_eq!(stats(&q).dropped_full_total, 48);
    q.ack(b.last, true).unwrap();
    let s = stats(&q);
    assert_eq!((s.sent_total, s.dropped_full_total, s.samples), (6, 45, 27));
    assert_eq!(
        s.queued_total,
        s.sent_total + s.dropped_full_total + s.samples
    );
    fs::remove_dir_all(&d).unwrap();
}
