//! The storage conformance suite: every test function runs against SQLite and against
//! PostgreSQL (when `BATCHD_TEST_DATABASE_URL` names a server; under CI it must). Each run
//! gets its own fresh database and a clock the test moves by hand.

mod support;

mod batches;
mod claims;
mod concurrency;
mod control;
mod crash;
mod positions;
mod runtimes;
mod upgrade;
mod webhooks;
