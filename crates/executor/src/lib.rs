#![doc = include_str!("../README.md")]

mod demo;
mod handler;
mod limiter;
mod pool;

pub use demo::DemoHandler;
pub use handler::{
    BatchContext, BatchInfo, Completion, Handler, HandlerError, HandlerRegistry, ItemContext, ReportError, Retry,
};
pub use pool::{Executor, ExecutorConfig, ExecutorError, ExecutorHandle, ExecutorObserver, QueueConfig};
