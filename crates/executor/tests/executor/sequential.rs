//! Sequential batches: strict index order, one at a time, one shared context opened before
//! the first item and released after the last or after an item that asks for it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use batchd_domain::{BatchStatus, Mode};
use batchd_executor::{BatchContext, BatchInfo, Completion, Handler, HandlerError, HandlerRegistry, ItemContext};
use serde_json::json;

use crate::support::{Backend, Harness, both_backends, queue};

both_backends!(items_run_in_order_sharing_one_context);

/// Logs every open, close and run, with the context each run saw.
#[derive(Clone, Default)]
struct Recorder {
    log: Arc<Mutex<Vec<String>>>,
    opened: Arc<Mutex<u32>>,
}

impl Recorder {
    fn push(&self, line: String) {
        self.log.lock().expect("log").push(line);
    }
}

#[async_trait]
impl Handler for Recorder {
    async fn run(&self, item: ItemContext) -> Result<Completion, HandlerError> {
        let context = item.batch_context().and_then(|c| c.downcast_ref::<u32>()).copied();
        self.push(format!("start {} ctx {:?}", item.index, context));
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.push(format!("end {}", item.index));
        Ok(Completion::Completed(json!(item.index)))
    }

    async fn open_batch_context(&self, _batch: &BatchInfo) -> Result<Option<BatchContext>, HandlerError> {
        let n = {
            let mut opened = self.opened.lock().expect("counter");
            *opened += 1;
            *opened
        };
        self.push(format!("open {n}"));
        Ok(Some(Arc::new(n)))
    }

    async fn close_batch_context(&self, _batch: &BatchInfo, context: BatchContext) {
        self.push(format!("close {:?}", context.downcast_ref::<u32>()));
    }
}

async fn items_run_in_order_sharing_one_context(backend: Backend) {
    let Some(mut h) = Harness::open(backend).await else {
        return;
    };
    let recorder = Recorder::default();
    let mut registry = HandlerRegistry::default();
    registry.register("recorder", recorder.clone());
    h.start(registry, vec![queue("seq", "recorder", 4)], |_| {});
    let inputs = vec![json!({}), json!({"release_context": true}), json!({}), json!({})];
    let (id, _) = h.submit("seq", Mode::Sequential, inputs).await;
    let batch = h.wait_until_ended(&id).await;
    assert_eq!(batch.status, BatchStatus::Completed);
    // The close after the last item happens right after its finish commits; wait for it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while recorder.log.lock().expect("log").len() < 12 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let log = recorder.log.lock().expect("log").clone();
    assert_eq!(
        log,
        vec![
            "open 1",
            "start 0 ctx Some(1)",
            "end 0",
            "start 1 ctx Some(1)",
            "end 1",
            "close Some(1)",
            "open 2",
            "start 2 ctx Some(2)",
            "end 2",
            "start 3 ctx Some(2)",
            "end 3",
            "close Some(2)",
        ],
        "strict order, no overlap, one context until released"
    );
    h.shutdown().await;
}
