//! The client commands of the binary: `submit`, `status`, `events`, `cancel`, `pause`,
//! `resume`, `retry` and `queues`. Each one is a thin layer over batchd-client: it reads its
//! input, makes the calls, and prints what came back, for people by default and as JSON with
//! `--json`. Progress displays go to stderr so stdout stays what a script reads.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use batchd_client::wire::{BatchView, EventView, QueueView, SubmitResponse};
use batchd_client::{BatchStatus, Client, ClientError, Counts, Mode, OnItemFailure};
use clap::Args;
use futures_util::StreamExt;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// How often `--watch` asks for the batch.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);
/// Cells of the progress bar.
const BAR_WIDTH: usize = 30;
/// Events asked for per page by `batchd events`.
const EVENTS_PAGE: u32 = 1000;
/// Failed connections in a row after which `events --follow` gives up.
const FOLLOW_RETRIES: u32 = 5;

/// Where the server is and how to authenticate; shared by every client command.
#[derive(Debug, Args)]
pub(crate) struct ServerArgs {
    /// The batchd server
    #[arg(
        long,
        value_name = "URL",
        env = "BATCHD_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    server: String,
    /// An API key or a JWT (sent as `Authorization: Bearer`)
    #[arg(long, value_name = "TOKEN", env = "BATCHD_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl ServerArgs {
    fn client(&self) -> anyhow::Result<Client> {
        let client = Client::new(&self.server).context("--server")?;
        Ok(match self.token.as_deref().filter(|token| !token.is_empty()) {
            Some(token) => client.with_token(token),
            None => client,
        })
    }
}

#[derive(Debug, Args)]
pub(crate) struct SubmitArgs {
    /// The items: a JSON file (an array of items, one item, or a whole submit body with
    /// `items`) or JSON Lines (one item per line); `-` reads stdin. An item is
    /// `{"input": …, "custom_id"?: …, "config"?: …}`; any other value is the input itself.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// The queue (default: the file's `queue`, else `default`)
    #[arg(long, value_name = "QUEUE")]
    queue: Option<String>,
    /// A batch id of your choosing (1-128 of `A-Za-z0-9._:-`); submitting it again is a no-op
    #[arg(long, value_name = "ID")]
    id: Option<String>,
    /// Sent as the `Idempotency-Key` header
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    /// Groups batches, e.g. of one chat session
    #[arg(long, value_name = "ID")]
    session_id: Option<String>,
    /// parallel or sequential
    #[arg(long, value_name = "MODE")]
    mode: Option<Mode>,
    /// continue or fail_batch
    #[arg(long, value_name = "POLICY")]
    on_item_failure: Option<OnItemFailure>,
    /// Higher runs first
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    priority: Option<i32>,
    /// Follow the batch until it ends, as `status --watch` does
    #[arg(long)]
    watch: bool,
    /// Print the server's JSON instead of text
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// The batch id
    #[arg(value_name = "ID")]
    id: String,
    /// Show progress until the batch ends; exit 0 if it completed, 2 if it failed or was cancelled
    #[arg(long)]
    watch: bool,
    /// Print the batch as JSON
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Args)]
pub(crate) struct EventsArgs {
    /// The batch id
    #[arg(value_name = "ID")]
    id: String,
    /// Only events after this sequence number
    #[arg(long, value_name = "SEQ")]
    after: Option<i64>,
    /// Stream new events live until the batch ends
    #[arg(long, short = 'f')]
    follow: bool,
    /// One JSON object per event (JSON Lines)
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Args)]
pub(crate) struct ControlArgs {
    /// The batch id
    #[arg(value_name = "ID")]
    id: String,
    /// Print the batch as JSON
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Args)]
pub(crate) struct QueuesArgs {
    /// Print the server's JSON
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArgs,
}

/// What `cancel`, `pause`, `resume` and `retry` ask for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Control {
    Cancel,
    Pause,
    Resume,
    Retry,
}

/// A watched batch ended other than `completed`: the binary exits with code 2 (the batch
/// has been printed already, so there is nothing more to say).
#[derive(Debug, thiserror::Error)]
#[error("batch {id} ended {status}")]
pub(crate) struct NotCompleted {
    pub(crate) id: String,
    pub(crate) status: BatchStatus,
}

pub(crate) async fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    let text = read_input(&args.file)?;
    let mut body = batch_body(&text).with_context(|| format!("{}", args.file.display()))?;
    let fields = body.as_object_mut().context("the body is an object")?;
    let mut set = |key: &str, value: Option<Value>| {
        if let Some(value) = value {
            fields.insert(key.to_owned(), value);
        }
    };
    set("queue", args.queue.map(Value::from));
    set("id", args.id.map(Value::from));
    set("session_id", args.session_id.map(Value::from));
    set("mode", args.mode.map(|mode| Value::from(mode.as_str())));
    set(
        "on_item_failure",
        args.on_item_failure.map(|policy| Value::from(policy.as_str())),
    );
    set("priority", args.priority.map(Value::from));

    let client = args.server.client()?;
    let submitted = client.submit_json(&body, args.idempotency_key.as_deref()).await?;
    let batch = &submitted.batch;
    if args.json {
        print_json(batch)?;
    } else {
        println!("{}", batch.id);
        eprintln!("{}", describe_submitted(batch, submitted.replayed));
    }
    if args.watch {
        let id = batch.id.clone();
        watch(&client, &id, args.json).await?;
    }
    Ok(())
}

pub(crate) async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let client = args.server.client()?;
    if args.watch {
        return watch(&client, &args.id, args.json).await;
    }
    let batch = client.batch(&args.id).await?;
    print_batch(&batch, args.json)
}

pub(crate) async fn events(args: EventsArgs) -> anyhow::Result<()> {
    let client = args.server.client()?;
    let mut stdout = std::io::stdout().lock();
    let mut after = args.after;
    if !args.follow {
        loop {
            let page = client.batch_events(&args.id, after, Some(EVENTS_PAGE)).await?;
            let Some(last) = page.events.last() else {
                return Ok(());
            };
            after = Some(last.seq);
            for event in &page.events {
                write_event(&mut stdout, event, args.json)?;
            }
        }
    }
    let mut failures = 0;
    loop {
        let mut stream = client.events_stream(&args.id, after);
        let mut broken = None;
        while let Some(next) = stream.next().await {
            match next {
                Ok(event) => {
                    failures = 0;
                    after = Some(event.seq);
                    write_event(&mut stdout, &event, args.json)?;
                }
                // An answer from batchd (not found, unauthorised) will not change.
                Err(error @ ClientError::Api { .. }) => return Err(error.into()),
                Err(error) => broken = Some(error),
            }
        }
        match broken {
            Some(error) => {
                failures += 1;
                if failures >= FOLLOW_RETRIES {
                    return Err(error.into());
                }
                tracing::warn!(error = %error, "the event stream broke; resuming after event {after:?}");
            }
            // The server closes the stream once the batch has ended, and when it stops.
            None if client.batch(&args.id).await?.status.is_terminal() => return Ok(()),
            None => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

pub(crate) async fn control(action: Control, args: ControlArgs) -> anyhow::Result<()> {
    let client = args.server.client()?;
    let batch = match action {
        Control::Cancel => client.cancel_batch(&args.id).await?,
        Control::Pause => client.pause_batch(&args.id).await?,
        Control::Resume => client.resume_batch(&args.id).await?,
        Control::Retry => client.retry_batch(&args.id).await?,
    };
    print_batch(&batch, args.json)
}

pub(crate) async fn queues(args: QueuesArgs) -> anyhow::Result<()> {
    let list = args.server.client()?.queues().await?;
    if args.json {
        return print_json(&list);
    }
    print!("{}", queues_table(&list.queues));
    Ok(())
}

/// Polls the batch until it ends, drawing its progress on stderr (in place on a terminal,
/// a line per change otherwise), then prints it; [`NotCompleted`] unless it completed.
async fn watch(client: &Client, id: &str, json: bool) -> anyhow::Result<()> {
    let terminal = std::io::stderr().is_terminal();
    let mut last_line = String::new();
    let batch = loop {
        let batch = client.batch(id).await?;
        let line = progress_line(&batch);
        if line != last_line {
            let mut stderr = std::io::stderr().lock();
            if terminal {
                // Clear what a longer line left behind.
                write!(stderr, "\r\x1b[2K{line}")?;
            } else {
                writeln!(stderr, "{line}")?;
            }
            stderr.flush()?;
            last_line = line;
        }
        if batch.status.is_terminal() {
            if terminal {
                eprintln!();
            }
            break batch;
        }
        tokio::time::sleep(WATCH_INTERVAL).await;
    };
    print_batch(&batch, json)?;
    if batch.status == BatchStatus::Completed {
        Ok(())
    } else {
        Err(NotCompleted {
            id: batch.id,
            status: batch.status,
        }
        .into())
    }
}

fn read_input(path: &Path) -> anyhow::Result<String> {
    if path == Path::new("-") {
        return std::io::read_to_string(std::io::stdin()).context("cannot read stdin");
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// The submit body a file describes: a whole body (an object with `items`), an array of
/// items, one item, or JSON Lines of items. Blank lines are skipped.
fn batch_body(text: &str) -> anyhow::Result<Value> {
    if text.trim().is_empty() {
        bail!("no items: the file is empty");
    }
    let items = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(body)) if body.contains_key("items") => return Ok(Value::Object(body)),
        Ok(Value::Array(items)) => items.into_iter().map(item).collect(),
        Ok(one) => vec![item(one)],
        Err(_) => {
            let mut items = Vec::new();
            for (n, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let value: Value = serde_json::from_str(line).with_context(|| format!("line {}: not JSON", n + 1))?;
                items.push(item(value));
            }
            items
        }
    };
    if items.is_empty() {
        bail!("no items: the array is empty");
    }
    Ok(json!({ "items": items }))
}

/// An item as the API takes it: an object with `input` and no keys but `input`,
/// `custom_id` and `config` already is one; any other value is an item's input.
fn item(value: Value) -> Value {
    let is_item = value.as_object().is_some_and(|fields| {
        fields.contains_key("input")
            && fields
                .keys()
                .all(|key| matches!(key.as_str(), "input" | "custom_id" | "config"))
    });
    if is_item {
        value
    } else {
        let mut fields = Map::new();
        fields.insert("input".to_owned(), value);
        Value::Object(fields)
    }
}

fn describe_submitted(batch: &SubmitResponse, replayed: bool) -> String {
    let items = plural(batch.total_items, "item");
    if replayed {
        format!(
            "batch {} already exists ({items} on queue {}, {}); nothing new was submitted",
            batch.id, batch.queue, batch.status
        )
    } else {
        format!("submitted batch {}: {items} on queue {}", batch.id, batch.queue)
    }
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value).context("cannot print JSON")?);
    Ok(())
}

fn print_batch(batch: &BatchView, json: bool) -> anyhow::Result<()> {
    if json {
        print_json(batch)
    } else {
        print!("{}", batch_summary(batch));
        Ok(())
    }
}

/// `[#######.......]  50%  10/20 ended`: ended items over the total.
fn progress_bar(counts: &Counts) -> String {
    let ended = counts.completed + counts.failed + counts.cancelled;
    let total = counts.total.max(0);
    let (filled, percent) = if total == 0 {
        (0, 0)
    } else {
        let ended = ended.clamp(0, total);
        (
            usize::try_from(ended * BAR_WIDTH as i64 / total).unwrap_or(0),
            ended * 100 / total,
        )
    };
    format!(
        "[{}{}] {percent:>3}%  {ended}/{total} ended",
        "#".repeat(filled),
        "-".repeat(BAR_WIDTH - filled)
    )
}

/// The non-zero counts, in the order items move: `2 pending, 1 running, 7 completed`.
fn counts_text(counts: &Counts) -> String {
    let parts: Vec<String> = [
        ("pending", counts.pending),
        ("running", counts.running),
        ("needs_input", counts.needs_input),
        ("completed", counts.completed),
        ("failed", counts.failed),
        ("cancelled", counts.cancelled),
    ]
    .into_iter()
    .filter(|(_, n)| *n != 0)
    .map(|(name, n)| format!("{n} {name}"))
    .collect();
    if parts.is_empty() {
        "no items".to_owned()
    } else {
        parts.join(", ")
    }
}

/// One line for `--watch`: the bar, the status and the counts.
fn progress_line(batch: &BatchView) -> String {
    format!(
        "{} {}  {}  ({})",
        batch.id,
        batch.status,
        progress_bar(&batch.counts),
        counts_text(&batch.counts)
    )
}

fn batch_summary(batch: &BatchView) -> String {
    let mut lines = vec![
        format!("batch     {}", batch.id),
        format!("status    {}", batch.status),
        format!("queue     {}", batch.queue),
        format!("progress  {}", progress_bar(&batch.counts)),
        format!("items     {}", counts_text(&batch.counts)),
    ];
    if let Some(current) = &batch.current {
        let mut line = format!("current   item {} ({})", current.index, current.item_id);
        if let Some(step) = &current.step {
            line.push_str(&format!(" step {step}"));
        }
        if let Some(progress) = &current.progress {
            match progress.total {
                Some(total) => line.push_str(&format!(" {}/{total}", progress.current)),
                None => line.push_str(&format!(" {}", progress.current)),
            }
        }
        if let Some(message) = &current.message {
            line.push_str(&format!(": {message}"));
        }
        lines.push(line);
    }
    if let Some(message) = &batch.message {
        lines.push(format!("message   {message}"));
    }
    if let Some(error) = &batch.error {
        lines.push(format!("error     {error}"));
    }
    if let Some(session) = &batch.session_id {
        lines.push(format!("session   {session}"));
    }
    lines.push(format!("created   {}", rfc3339(batch.created_at)));
    if let Some(at) = batch.started_at {
        lines.push(format!("started   {}", rfc3339(at)));
    }
    if let Some(at) = batch.completed_at {
        lines.push(format!("ended     {}", rfc3339(at)));
    }
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

fn write_event(out: &mut impl Write, event: &EventView, json: bool) -> anyhow::Result<()> {
    if json {
        serde_json::to_writer(&mut *out, event).context("cannot print an event")?;
        writeln!(out)?;
    } else {
        writeln!(out, "{}", event_line(event))?;
    }
    out.flush()?;
    Ok(())
}

/// `  12  2026-01-02T03:04:05Z  item.step             item 3  step=write  writing  {"k":1}`.
fn event_line(event: &EventView) -> String {
    let mut line = format!(
        "{:>4}  {}  {:<20}",
        event.seq,
        rfc3339(event.at),
        event.event_type.as_str()
    );
    if let Some(index) = event.item_index {
        line.push_str(&format!("  item {index}"));
    }
    if let Some(step) = &event.step {
        line.push_str(&format!("  step={step}"));
    }
    if let Some(message) = &event.message {
        line.push_str(&format!("  {message}"));
    }
    if let Some(data) = event.data.as_ref().filter(|data| !data.is_null()) {
        line.push_str(&format!("  {data}"));
    }
    line.truncate(line.trim_end().len());
    line
}

fn queues_table(queues: &[QueueView]) -> String {
    let header = [
        "QUEUE",
        "HANDLER",
        "PAUSED",
        "PENDING",
        "RUNNING",
        "NEEDS_INPUT",
        "DONE/MIN",
        "OLDEST",
    ];
    let mut rows = vec![header.map(str::to_owned).to_vec()];
    for queue in queues {
        rows.push(vec![
            queue.name.clone(),
            queue.handler.clone().unwrap_or_else(|| "-".to_owned()),
            if queue.paused { "yes" } else { "no" }.to_owned(),
            queue.depth.to_string(),
            queue.running.to_string(),
            queue.needs_input.to_string(),
            queue.throughput_per_minute.to_string(),
            queue
                .oldest_pending_age_seconds
                .map_or_else(|| "-".to_owned(), |age| format!("{age:.0}s")),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|column| rows.iter().map(|row| row[column].len()).max().unwrap_or(0))
        .collect();
    let mut text = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        text.push_str(cells.join("  ").trim_end());
        text.push('\n');
    }
    text
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_else(|_| at.to_string())
}

fn plural(n: i64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_are_one_item_each_and_bare_values_become_inputs() {
        let text = "{\"input\": {\"n\": 1}, \"custom_id\": \"a\"}\n\n{\"n\": 2}\n\"text\"\n";
        let body = batch_body(text).expect("parses");
        assert_eq!(
            body,
            json!({"items": [
                {"input": {"n": 1}, "custom_id": "a"},
                {"input": {"n": 2}},
                {"input": "text"},
            ]})
        );
    }

    #[test]
    fn an_object_with_input_and_other_keys_is_an_input() {
        let body = batch_body("{\"input\": 1, \"prompt\": \"x\"}").expect("parses");
        assert_eq!(body, json!({"items": [{"input": {"input": 1, "prompt": "x"}}]}));
    }

    #[test]
    fn a_json_array_or_a_whole_body_is_taken_as_it_is() {
        let body = batch_body("[\n  {\"input\": 1},\n  2\n]").expect("parses");
        assert_eq!(body, json!({"items": [{"input": 1}, {"input": 2}]}));
        let whole = json!({"queue": "emails", "mode": "sequential", "items": [{"input": 1}]});
        assert_eq!(batch_body(&whole.to_string()).expect("parses"), whole);
    }

    #[test]
    fn a_bad_line_is_named_and_an_empty_file_refused() {
        let error = batch_body("{\"n\": 1}\n{\"n\": 2}\n{oops\n").expect_err("line 3 is not JSON");
        assert!(format!("{error:#}").starts_with("line 3: not JSON"), "{error:#}");
        assert!(batch_body(" \n").is_err());
        assert!(batch_body("[]").is_err());
    }

    fn counts(total: i64, completed: i64, failed: i64, running: i64) -> Counts {
        Counts {
            total,
            pending: total - completed - failed - running,
            running,
            completed,
            failed,
            cancelled: 0,
            needs_input: 0,
        }
    }

    #[test]
    fn the_progress_bar_counts_ended_items() {
        let half = progress_bar(&counts(20, 8, 2, 3));
        assert_eq!(
            half,
            format!("[{}{}]  50%  10/20 ended", "#".repeat(15), "-".repeat(15))
        );
        let done = progress_bar(&counts(3, 3, 0, 0));
        assert_eq!(done, format!("[{}] 100%  3/3 ended", "#".repeat(BAR_WIDTH)));
        assert!(progress_bar(&counts(0, 0, 0, 0)).starts_with("[------"));
        assert_eq!(
            counts_text(&counts(20, 8, 2, 3)),
            "7 pending, 3 running, 8 completed, 2 failed"
        );
    }

    #[test]
    fn an_event_line_shows_what_the_event_has() {
        let at = OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("a time");
        let mut event = EventView {
            seq: 12,
            batch_id: "b".to_owned(),
            item_id: Some("i".to_owned()),
            item_index: Some(3),
            event_type: batchd_client::EventType::ItemStep,
            step: Some("write".to_owned()),
            message: Some("writing".to_owned()),
            data: Some(json!({"k": 1})),
            at,
        };
        assert_eq!(
            event_line(&event),
            "  12  2023-11-14T22:13:20Z  item.step             item 3  step=write  writing  {\"k\":1}"
        );
        event.item_index = None;
        event.step = None;
        event.message = None;
        event.data = None;
        event.event_type = batchd_client::EventType::BatchCompleted;
        assert_eq!(event_line(&event), "  12  2023-11-14T22:13:20Z  batch.completed");
    }

    #[test]
    fn queues_print_as_an_aligned_table() {
        let queue = |name: &str, depth| QueueView {
            name: name.to_owned(),
            handler: Some("demo".to_owned()),
            paused: false,
            depth,
            running: 1,
            needs_input: 0,
            throughput_per_minute: 12,
            oldest_pending_age_seconds: Some(4.4),
        };
        let table = queues_table(&[queue("default", 3), queue("long-queue-name", 1000)]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(
            lines[0].starts_with("QUEUE            HANDLER  PAUSED  PENDING"),
            "{table}"
        );
        assert!(lines[1].starts_with("default          demo     no      3 "), "{table}");
        assert!(lines[2].ends_with("12        4s"), "{table}");
    }
}
