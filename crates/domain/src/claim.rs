//! Where a pending item waits to be claimed, and which items run under a range lease.
//!
//! A parallel batch is claimed through a cursor, `next_index`: a claim takes the next
//! pending items at or after the cursor, moves the cursor past them and leases them as one
//! range, without writing their rows. So a row that says `pending`, of an item that never
//! started, below the cursor, is an item running under a range lease. Every other pending
//! item (one that ran before, and every item of a sequential batch) waits in the queue of
//! items claimed one by one.

/// A batch's claim cursor, as its locked row holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimCursor {
    /// Sequential batches have no cursor: their items are claimed one by one, in order.
    pub sequential: bool,
    /// Every item below this index has been claimed once, or had ended when the cursor
    /// passed it.
    pub next_index: i32,
}

/// Where a pending item waits to be claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// At or after its batch's cursor: the next range claim of the batch takes it.
    AtCursor,
    /// In the queue of items claimed one by one.
    InQueue,
}

impl ClaimCursor {
    /// Whether an item whose row says `pending` is running under a range lease.
    ///
    /// # Preconditions
    /// `row_pending` is what the item's row says, read with the batch row locked (or in the
    /// same snapshot); `started` is whether the row has a `started_at`.
    ///
    /// # Returns
    /// True for an item of a parallel batch that never started and that the cursor has
    /// passed: a range claim took it and nothing has written its row since.
    pub fn runs_under_range(&self, row_pending: bool, started: bool, index: i32) -> bool {
        !self.sequential && row_pending && !started && index < self.next_index
    }

    /// Where an item that becomes (or is) pending waits.
    ///
    /// # Preconditions
    /// The item does not run under a range lease (see [`ClaimCursor::runs_under_range`]).
    ///
    /// # Returns
    /// `AtCursor` for an item of a parallel batch that never started and that the cursor
    /// has not passed; `InQueue` for every other one. `None` for an item that never started
    /// but lies below the cursor: such an item would read as running under a range lease,
    /// so it cannot be made pending where it is.
    pub fn waiting(&self, started: bool, index: i32) -> Option<Waiting> {
        if self.sequential || started {
            Some(Waiting::InQueue)
        } else if index >= self.next_index {
            Some(Waiting::AtCursor)
        } else {
            None
        }
    }
}

/// The lease token of an item in a range lease: the lease, its secret and the item's index,
/// so a token names one item and cannot be guessed from another range's tokens.
pub fn range_lease_token(lease_id: i64, secret: &str, index: i32) -> String {
    RangeTokens::new(lease_id, secret).token(index)
}

/// The lease tokens of one range lease's items: the part they share is formatted once (a
/// claim mints a token for each item it takes, inside its transaction).
#[derive(Debug, Clone)]
pub struct RangeTokens {
    prefix: String,
}

impl RangeTokens {
    pub fn new(lease_id: i64, secret: &str) -> Self {
        Self {
            prefix: format!("{lease_id}.{secret}."),
        }
    }

    /// The token of the item at `index`, as [`range_lease_token`].
    pub fn token(&self, index: i32) -> String {
        use std::fmt::Write;
        let mut token = String::with_capacity(self.prefix.len() + 11);
        token.push_str(&self.prefix);
        let _ = write!(token, "{index}");
        token
    }
}

/// The parts of a range lease token: (lease id, secret, item index). `None` for any other
/// token (an item claimed one by one has a random token of its own, without dots).
pub fn parse_range_token(token: &str) -> Option<(i64, &str, i32)> {
    let mut parts = token.splitn(3, '.');
    let lease_id = parts.next()?.parse().ok()?;
    let secret = parts.next()?;
    let index = parts.next()?.parse().ok()?;
    Some((lease_id, secret, index))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARALLEL: ClaimCursor = ClaimCursor {
        sequential: false,
        next_index: 10,
    };
    const SEQUENTIAL: ClaimCursor = ClaimCursor {
        sequential: true,
        next_index: 0,
    };

    #[test]
    fn only_unstarted_pending_rows_below_the_cursor_run_under_a_range() {
        assert!(PARALLEL.runs_under_range(true, false, 9));
        assert!(
            !PARALLEL.runs_under_range(true, false, 10),
            "at the cursor: not claimed yet"
        );
        assert!(
            !PARALLEL.runs_under_range(true, true, 3),
            "started before: claimed one by one"
        );
        assert!(
            !PARALLEL.runs_under_range(false, false, 3),
            "its row was written when it ended"
        );
        assert!(!SEQUENTIAL.runs_under_range(true, false, 0));
    }

    #[test]
    fn pending_items_wait_at_the_cursor_or_in_the_queue() {
        assert_eq!(PARALLEL.waiting(false, 10), Some(Waiting::AtCursor));
        assert_eq!(PARALLEL.waiting(true, 3), Some(Waiting::InQueue));
        assert_eq!(PARALLEL.waiting(true, 12), Some(Waiting::InQueue));
        assert_eq!(PARALLEL.waiting(false, 3), None);
        assert_eq!(SEQUENTIAL.waiting(false, 0), Some(Waiting::InQueue));
    }

    #[test]
    fn range_tokens_name_the_lease_and_the_item() {
        assert_eq!(range_lease_token(12, "abc", 7), "12.abc.7");
        assert_ne!(range_lease_token(12, "abc", 7), range_lease_token(12, "abc", 8));
        assert_eq!(parse_range_token("12.abc.7"), Some((12, "abc", 7)));
        assert_eq!(parse_range_token(&range_lease_token(-1, "s", 0)), Some((-1, "s", 0)));
        let tokens = RangeTokens::new(i64::MAX, "secret");
        assert_eq!(tokens.token(i32::MAX), format!("{}.secret.{}", i64::MAX, i32::MAX));
        assert_eq!(tokens.token(0), "9223372036854775807.secret.0");
    }

    #[test]
    fn other_tokens_are_not_range_tokens() {
        assert_eq!(parse_range_token("0f3a9c0d6b2e4f8a9d1c2b3a4e5f6a7b"), None);
        assert_eq!(parse_range_token("x.abc.7"), None);
        assert_eq!(parse_range_token("12.abc.y"), None);
        assert_eq!(parse_range_token("12.abc"), None);
        assert_eq!(parse_range_token(""), None);
    }
}
