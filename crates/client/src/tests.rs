//! The client over real HTTP against a scripted stand-in server: what goes on the wire (paths,
//! headers, bodies) and how answers are read (202 against 200, error bodies, a Server-Sent
//! Events body cut into pieces). The real server is exercised by batchd-testkit's tests.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;

use crate::{BatchStatus, Client, ClientError, EventType, NewBatch};

/// One scripted answer: the pieces written, in order, before the connection is closed.
type Answer = Vec<Vec<u8>>;

/// Answers one connection per scripted answer, in order, and records each request.
struct StandIn {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
    thread: JoinHandle<()>,
}

impl StandIn {
    fn start(answers: Vec<Answer>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
        let url = format!("http://{}", listener.local_addr().expect("an address"));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        let thread = std::thread::spawn(move || {
            for answer in answers {
                let (mut stream, _) = listener.accept().expect("the client connects");
                let request = read_request(&mut stream);
                recorded.lock().expect("not poisoned").push(request);
                for piece in answer {
                    stream.write_all(&piece).expect("the answer is written");
                    stream.flush().expect("the answer is flushed");
                }
            }
        });
        Self { url, requests, thread }
    }

    fn client(&self) -> Client {
        Client::new(&self.url).expect("a valid URL")
    }

    /// Every request it received, head and body; waits for the script to finish.
    fn finish(self) -> Vec<String> {
        self.thread.join().expect("the stand-in did not panic");
        let requests = self.requests.lock().expect("not poisoned");
        requests.clone()
    }
}

/// The request head and its `Content-Length` body, as text.
fn read_request(stream: &mut TcpStream) -> String {
    let mut bytes = Vec::new();
    let mut buf = [0_u8; 4096];
    let head_end = loop {
        if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let n = stream.read(&mut buf).expect("the request is read");
        assert!(n > 0, "the client closed before the request ended");
        bytes.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&bytes[..head_end]).to_string();
    let length = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    while bytes.len() < head_end + length {
        let n = stream.read(&mut buf).expect("the body is read");
        assert!(n > 0, "the client closed before the body ended");
        bytes.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&bytes).to_string()
}

fn json_answer(status: &str, body: &serde_json::Value) -> Answer {
    let body = body.to_string();
    vec![
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\nx-request-id: req-{}\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            status.split(' ').next().unwrap_or("0"),
            body.len()
        )
        .into_bytes(),
    ]
}

fn submit_response(id: &str) -> serde_json::Value {
    json!({
        "id": id, "status": "pending", "queue": "default", "total_items": 1,
        "item_ids": ["i-1"], "status_url": format!("/v1/batches/{id}"),
        "events_url": format!("/v1/batches/{id}/events"), "created_at": "2026-01-31T12:00:00Z"
    })
}

fn batch_view(id: &str, status: &str) -> serde_json::Value {
    json!({
        "id": id, "queue": "default", "session_id": null, "status": status, "mode": "parallel",
        "on_item_failure": "continue", "priority": 0, "run_at": null,
        "counts": {"total": 1, "pending": 0, "running": 0, "completed": 1, "failed": 0,
                   "cancelled": 0, "needs_input": 0},
        "progress": 1.0, "current": null, "message": null, "error": null, "result": null,
        "metadata": null, "config": {}, "webhook": null, "created_at": "2026-01-31T12:00:00Z",
        "started_at": null, "updated_at": "2026-01-31T12:00:00Z", "completed_at": null
    })
}

fn event_json(seq: i64, event_type: &str) -> String {
    json!({
        "seq": seq, "batch_id": "b-1", "item_id": null, "item_index": null, "type": event_type,
        "step": null, "message": null, "data": {"text": "line one\nline two"},
        "at": "2026-01-31T12:00:00Z"
    })
    .to_string()
}

fn header<'a>(request: &'a str, name: &str) -> Option<&'a str> {
    request.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

#[tokio::test]
async fn submit_sends_the_body_key_and_token_and_tells_new_from_replayed() {
    let server = StandIn::start(vec![
        json_answer("202 Accepted", &submit_response("b-1")),
        json_answer("200 OK", &submit_response("b-1")),
    ]);
    let client = server.client().with_token("t0ken");
    let batch = NewBatch::new("default")
        .item(json!({"sleep_ms": 5}))
        .idempotency_key("k-1");
    let first = client.submit(&batch).await.expect("accepted");
    assert!(!first.replayed);
    assert_eq!(first.batch.id, "b-1");
    assert_eq!(first.batch.status, BatchStatus::Pending);
    let again = client.submit(&batch).await.expect("replayed");
    assert!(again.replayed);
    assert_eq!(again.batch, first.batch);

    let requests = server.finish();
    let request = &requests[0];
    assert!(request.starts_with("POST /v1/batches HTTP/1.1\r\n"), "{request}");
    assert_eq!(header(request, "authorization"), Some("Bearer t0ken"));
    assert_eq!(header(request, "idempotency-key"), Some("k-1"));
    assert_eq!(header(request, "content-type"), Some("application/json"));
    let body = request.split("\r\n\r\n").nth(1).expect("a body");
    let body: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
    assert_eq!(body, json!({"queue": "default", "items": [{"input": {"sleep_ms": 5}}]}));
}

#[tokio::test]
async fn an_error_answer_is_an_api_error_with_its_request_id() {
    let error_body = json!({"error": {"code": "not_found", "message": "no batch nope", "issues": []}});
    let server = StandIn::start(vec![json_answer("404 Not Found", &error_body)]);
    let error = server.client().batch("nope").await.expect_err("not found");
    assert!(
        matches!(&error, ClientError::Api { status: 404, request_id: Some(id), .. } if id == "req-404"),
        "{error:?}"
    );
    assert_eq!(error.code(), Some("not_found"));
    let requests = server.finish();
    assert!(
        requests[0].starts_with("GET /v1/batches/nope HTTP/1.1"),
        "{}",
        requests[0]
    );
    assert_eq!(header(&requests[0], "authorization"), None, "no token, no header");
}

#[tokio::test]
async fn the_event_stream_reads_frames_cut_anywhere_and_ends_with_the_body() {
    let mut body = String::new();
    body.push_str(": connected\n\n");
    for (seq, event_type) in [(6, "item.completed"), (7, "batch.completed")] {
        body.push_str(&format!(
            "id: {seq}\nevent: {event_type}\ndata: {}\n\n",
            event_json(seq, event_type)
        ));
    }
    // A frame's data over two lines, cut between two JSON tokens: the joining `\n` is
    // whitespace to JSON.
    let split = event_json(8, "item.log");
    let cut = split.find(",\"item_id\"").expect("the field is there") + 1;
    let (first, second) = split.split_at(cut);
    body.push_str(&format!(
        "id: 8\r\nevent: item.log\r\ndata: {first}\r\ndata: {second}\r\n\r\n"
    ));
    let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n".to_vec();
    let mut answer = vec![head];
    answer.extend(body.as_bytes().chunks(7).map(<[u8]>::to_vec));
    let server = StandIn::start(vec![answer]);

    let mut stream = server.client().with_token("t").events_stream("b-1", Some(5));
    let mut seen = Vec::new();
    while let Some(event) = stream.next().await {
        let event = event.expect("a valid event");
        seen.push((event.seq, event.event_type));
    }
    assert_eq!(
        seen,
        vec![
            (6, EventType::ItemCompleted),
            (7, EventType::BatchCompleted),
            (8, EventType::ItemLog),
        ]
    );
    assert!(stream.next().await.is_none(), "an ended stream stays ended");
    let requests = server.finish();
    let request = &requests[0];
    assert!(
        request.starts_with("GET /v1/batches/b-1/events/stream HTTP/1.1"),
        "{request}"
    );
    assert_eq!(header(request, "last-event-id"), Some("5"));
    assert_eq!(header(request, "accept"), Some("text/event-stream"));
    assert_eq!(header(request, "authorization"), Some("Bearer t"));
}

#[tokio::test]
async fn a_refused_event_stream_yields_the_error_then_ends() {
    let error_body = json!({"error": {"code": "not_found", "message": "no batch b-9", "issues": []}});
    let server = StandIn::start(vec![json_answer("404 Not Found", &error_body)]);
    let mut stream = server.client().events_stream("b-9", None);
    let error = stream
        .next()
        .await
        .expect("one item")
        .expect_err("the stream was refused");
    assert_eq!(error.code(), Some("not_found"));
    assert!(stream.next().await.is_none());
    let requests = server.finish();
    assert_eq!(header(&requests[0], "last-event-id"), None);
}

#[tokio::test]
async fn wait_until_done_polls_until_a_terminal_status() {
    let server = StandIn::start(vec![
        json_answer("200 OK", &batch_view("b-1", "pending")),
        json_answer("200 OK", &batch_view("b-1", "running")),
        json_answer("200 OK", &batch_view("b-1", "completed")),
    ]);
    let batch = server
        .client()
        .wait_until_done("b-1", Duration::from_secs(10))
        .await
        .expect("the batch ends");
    assert_eq!(batch.status, BatchStatus::Completed);
    assert_eq!(server.finish().len(), 3);
}

#[tokio::test]
async fn wait_until_done_gives_up_at_the_deadline_with_the_last_status() {
    let answers = (0..40)
        .map(|_| json_answer("200 OK", &batch_view("b-1", "running")))
        .collect();
    let server = StandIn::start(answers);
    let error = server
        .client()
        .wait_until_done("b-1", Duration::from_millis(120))
        .await
        .expect_err("it never ends");
    let ClientError::Timeout {
        batch_id,
        waited,
        last_status,
    } = &error
    else {
        panic!("not a timeout: {error:?}");
    };
    assert_eq!((batch_id.as_str(), *last_status), ("b-1", BatchStatus::Running));
    assert!(*waited >= Duration::from_millis(120), "{waited:?}");
    assert!(error.to_string().contains("did not finish"), "{error}");
}

#[tokio::test]
async fn a_2xx_body_of_the_wrong_shape_is_a_decode_error() {
    let server = StandIn::start(vec![json_answer("200 OK", &json!({"id": 1}))]);
    let error = server.client().batch("b-1").await.expect_err("not a batch");
    assert!(matches!(error, ClientError::Decode { status: 200, .. }), "{error:?}");
    assert_eq!(error.request_id(), Some("req-200"));
}
