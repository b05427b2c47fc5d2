#![doc = include_str!("../README.md")]

mod client;
mod error;
mod request;
mod sse;
#[cfg(test)]
mod tests;
mod worker;

pub use batchd_domain::wire;
pub use batchd_domain::{
    BatchStatus, Counts, DeliveryStatus, EventType, Issue, ItemStatus, JsonMap, Mode, OnItemFailure,
};
pub use client::{Client, EventStream, Submitted};
pub use error::ClientError;
pub use request::{BatchQuery, ItemQuery, NewBatch, NewItem, NewWebhook, RecentItemsQuery};
pub use worker::{ClaimOptions, Heartbeat};
