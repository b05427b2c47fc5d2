//! Times in SQLite: whole microseconds since the Unix epoch, in an `INTEGER`.
//!
//! diesel's `TimestamptzSqlite` stores a time as text, `2026-12-06 19:39:57.403801+00:00`:
//! 32 bytes in each row and index entry, where an integer takes 8, and read back by
//! trying a dozen formats in turn. Every time column of the SQLite schema has this SQL type
//! instead (migration `2026-12-07-000007_integer_times`). Microseconds are what PostgreSQL's
//! `timestamptz` keeps, and what the store's clock hands out.

use diesel::deserialize::{self, FromSql};
use diesel::expression::AsExpression;
use diesel::internal::derives::as_expression::Bound;
use diesel::serialize::{self, IsNull, Output, ToSql};
use diesel::sql_types::{BigInt, Nullable};
use diesel::sqlite::{Sqlite, SqliteValue};
use time::OffsetDateTime;

/// The SQL type of a time column: microseconds since 1970-01-01 00:00:00 UTC.
#[derive(Debug, Clone, Copy, Default, diesel::sql_types::SqlType, diesel::query_builder::QueryId)]
#[diesel(sqlite_type(name = "Long"))]
pub struct UnixMicros;

impl diesel::sql_types::SqlOrd for UnixMicros {}

/// `t` in whole microseconds since the epoch, rounded down (so times before 1970 order the
/// same way too).
pub fn micros(t: OffsetDateTime) -> i64 {
    // `OffsetDateTime` spans ±9999 years: about 3.2e17 µs, well inside an i64.
    t.unix_timestamp_nanos().div_euclid(1_000) as i64
}

/// The time `m` microseconds after the epoch, if `time` can hold it.
pub fn from_micros(m: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(m) * 1_000).ok()
}

impl ToSql<UnixMicros, Sqlite> for OffsetDateTime {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Sqlite>) -> serialize::Result {
        out.set_value(micros(*self));
        Ok(IsNull::No)
    }
}

impl FromSql<UnixMicros, Sqlite> for OffsetDateTime {
    fn from_sql(value: SqliteValue<'_, '_, '_>) -> deserialize::Result<Self> {
        let m = <i64 as FromSql<BigInt, Sqlite>>::from_sql(value)?;
        from_micros(m).ok_or_else(|| format!("a stored time out of range: {m} µs since 1970").into())
    }
}

/// A time bound to a time column in the query builder. (diesel's blanket implementations
/// leave no room to bind an `OffsetDateTime` itself to this crate's SQL type: the store's
/// shared code binds `db_time(t)`, which is `t` itself on PostgreSQL.)
#[derive(Debug, Clone, Copy, diesel::expression::AsExpression)]
#[diesel(sql_type = UnixMicros)]
pub struct Micros(pub OffsetDateTime);

impl From<OffsetDateTime> for Micros {
    fn from(t: OffsetDateTime) -> Self {
        Self(t)
    }
}

impl ToSql<UnixMicros, Sqlite> for Micros {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Sqlite>) -> serialize::Result {
        out.set_value(micros(self.0));
        Ok(IsNull::No)
    }
}

/// A time or none, bound to a nullable time column by a row written with the query builder
/// (`#[diesel(serialize_as = DbMaybeTime)]`).
#[derive(Debug, Clone, Copy)]
pub struct MaybeMicros(pub Option<OffsetDateTime>);

impl From<Option<OffsetDateTime>> for MaybeMicros {
    fn from(t: Option<OffsetDateTime>) -> Self {
        Self(t)
    }
}

impl AsExpression<Nullable<UnixMicros>> for MaybeMicros {
    type Expression = Bound<Nullable<UnixMicros>, Self>;

    fn as_expression(self) -> Self::Expression {
        Bound::new(self)
    }
}

impl ToSql<Nullable<UnixMicros>, Sqlite> for MaybeMicros {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Sqlite>) -> serialize::Result {
        match self.0 {
            Some(t) => {
                out.set_value(micros(t));
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn microseconds_round_trip(
            seconds in -62_135_596_800i64..=253_402_300_799,
            micros_part in 0i64..1_000_000,
        ) {
            let t = OffsetDateTime::from_unix_timestamp(seconds).expect("in range")
                + time::Duration::microseconds(micros_part);
            proptest::prop_assert_eq!(from_micros(micros(t)), Some(t));
        }

        #[test]
        fn microseconds_keep_the_order_of_times(a in -1_000_000_000_000i128..1_000_000_000_000, b in -1_000_000_000_000i128..1_000_000_000_000) {
            let (ta, tb) = (
                OffsetDateTime::from_unix_timestamp_nanos(a).expect("in range"),
                OffsetDateTime::from_unix_timestamp_nanos(b).expect("in range"),
            );
            if ta < tb {
                proptest::prop_assert!(micros(ta) <= micros(tb));
            }
        }
    }

    #[test]
    fn nanoseconds_round_down() {
        let t = time::macros::datetime!(1969-12-31 23:59:59.999_999_5 UTC);
        assert_eq!(micros(t), -1);
        assert_eq!(micros(time::macros::datetime!(1970-01-01 00:00:00.000_001_9 UTC)), 1);
    }
}
