//! batchd-webhook's integration tests, one binary (linking is the slow part).

mod standardwebhooks_py;
