//! batchd-webhook's integration tests, one binary (linking is the slow part).

mod dispatchers;
mod standardwebhooks_py;
