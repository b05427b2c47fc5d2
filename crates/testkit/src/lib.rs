#![doc = include_str!("../README.md")]

mod server;

pub use batchd_server::{QueueSettings, Settings};
pub use server::{Backend, TestServer, TestServerBuilder};
