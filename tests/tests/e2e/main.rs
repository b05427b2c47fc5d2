//! End-to-end tests: the real `batchd` binary, started as a child process. One test binary
//! for the whole crate; each module is one area.

mod batches;
mod cli;
mod client;
mod serve;
mod support;
mod webhooks;
mod worker;
