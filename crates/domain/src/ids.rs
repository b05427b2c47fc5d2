//! Ids: batch ids (UUIDv7 or a client's own), item ids, lease tokens, and name syntax.

/// A new server-chosen batch id: a UUIDv7, so ids sort by creation time.
pub fn new_batch_id() -> String {
    new_v7()
}

/// A new item id: a UUIDv7.
pub fn new_item_id() -> String {
    new_v7()
}

/// A UUIDv7: the time in milliseconds, a counter within the millisecond (so the ids this
/// process makes sort in the order it made them), then random bits from the thread's
/// generator. The `uuid` crate's own asks the operating system for randomness for every id:
/// a system call per id, and a batch has up to 10,000 ids.
fn new_v7() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let (millis, counter) = next_v7_stamp(now);
    let mut bits: [u8; 10] = rand::random();
    // The 12 bits after the version nibble hold the counter.
    bits[0] = (counter >> 8) as u8 & 0x0f;
    bits[1] = counter as u8;
    uuid::Builder::from_unix_timestamp_millis(millis, &bits)
        .into_uuid()
        .to_string()
}

/// Ids per millisecond before the stamp moves on to the next one (12 bits).
const V7_COUNTER_SPAN: u64 = 1 << 12;

/// The last stamp handed out: milliseconds times `V7_COUNTER_SPAN`, plus the counter.
static LAST_V7_STAMP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The (milliseconds, counter) of the next id: `now` with counter 0, or just after the last
/// stamp when that is not earlier (ids made in the same millisecond, or a clock that stepped
/// back), running into the next millisecond when a millisecond's counter is used up.
fn next_v7_stamp(now: u64) -> (u64, u64) {
    use std::sync::atomic::Ordering;
    let mut last = LAST_V7_STAMP.load(Ordering::Relaxed);
    loop {
        let next = (now * V7_COUNTER_SPAN).max(last + 1);
        match LAST_V7_STAMP.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return (next / V7_COUNTER_SPAN, next % V7_COUNTER_SPAN),
            Err(seen) => last = seen,
        }
    }
}

/// A new lease token: random, so it cannot be guessed from an item id.
pub fn new_lease_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A client-chosen batch id: 1–128 characters of `[A-Za-z0-9._:-]`.
pub fn is_valid_client_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// A queue name: 1–64 characters of `[A-Za-z0-9._-]`, so it is safe in a URL path.
pub fn is_valid_queue_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_follow_the_documented_syntax() {
        assert!(is_valid_client_id("job-2024.01:a_b"));
        assert!(is_valid_client_id(&"a".repeat(128)));
        assert!(!is_valid_client_id(""));
        assert!(!is_valid_client_id(&"a".repeat(129)));
        assert!(!is_valid_client_id("has space"));
        assert!(!is_valid_client_id("slash/no"));
        assert!(!is_valid_client_id("é"));
    }

    #[test]
    fn generated_ids_are_unique_and_ordered() {
        let a = new_batch_id();
        let b = new_batch_id();
        assert_ne!(a, b);
        assert!(a < b, "UUIDv7 ids sort by creation time");
        assert_ne!(new_lease_token(), new_lease_token());
        assert!(is_valid_client_id(&a), "a generated id is also a valid client id");
    }

    #[test]
    fn ids_of_one_millisecond_sort_in_the_order_they_were_made() {
        let ids: Vec<String> = (0..10_000).map(|_| new_item_id()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "10,000 ids in order");
        for id in &ids {
            let parsed = uuid::Uuid::parse_str(id).expect("a UUID");
            assert_eq!(parsed.get_version_num(), 7);
        }
        let (a, b) = (next_v7_stamp(5), next_v7_stamp(5));
        assert!(b > a);
        // A millisecond's counter used up runs into the next millisecond.
        let mut stamps: Vec<(u64, u64)> = (0..V7_COUNTER_SPAN + 2).map(|_| next_v7_stamp(0)).collect();
        stamps.dedup();
        assert_eq!(stamps.len() as u64, V7_COUNTER_SPAN + 2);
    }

    #[test]
    fn queue_names() {
        assert!(is_valid_queue_name("default"));
        assert!(is_valid_queue_name("emails.v2"));
        assert!(!is_valid_queue_name("a/b"));
        assert!(!is_valid_queue_name(""));
    }
}
