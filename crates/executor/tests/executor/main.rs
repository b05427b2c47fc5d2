//! The executor against real storage: every test runs on SQLite and on PostgreSQL.

mod support;

mod control;
mod limits;
mod recovery;
mod sequential;
