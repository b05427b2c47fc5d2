#![doc = include_str!("../README.md")]

mod demo;
mod handler;
mod http;
mod limiter;
mod pool;

pub use demo::DemoHandler;
pub use handler::{
    BatchContext, BatchInfo, Completion, Handler, HandlerError, HandlerRegistry, ItemContext, ReportError, Retry,
};
pub use http::{HttpHandler, HttpHandlerError};
pub use pool::{Executor, ExecutorConfig, ExecutorError, ExecutorHandle, ExecutorObserver, QueueConfig};
