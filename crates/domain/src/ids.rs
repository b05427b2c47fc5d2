//! Ids: batch ids (UUIDv7 or a client's own), item ids, lease tokens, and name syntax.

/// A new server-chosen batch id: a UUIDv7, so ids sort by creation time.
pub fn new_batch_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// A new item id: a UUIDv7.
pub fn new_item_id() -> String {
    uuid::Uuid::now_v7().to_string()
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
    fn queue_names() {
        assert!(is_valid_queue_name("default"));
        assert!(is_valid_queue_name("emails.v2"));
        assert!(!is_valid_queue_name("a/b"));
        assert!(!is_valid_queue_name(""));
    }
}
