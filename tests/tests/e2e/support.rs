//! The harness: find (build) the real binary, run it in a temp dir, talk to it over HTTP,
//! stop it with a signal, and wait for it with deadlines.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long a server may take to become ready (the first start may create a database).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a one-shot command (`migrate`, `config check`) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a signalled child may take to exit. A clean stop takes milliseconds, and the
/// server's own bound is its shutdown grace (30 s by default) plus a margin; this deadline
/// only catches a hang. It is generous because a shared machine can stall a process for
/// seconds (a short deadline here once failed a run in which the server logged nothing at
/// all for 10 s after its accept thread stopped).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// The pause between two polls.
const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// The `batchd` executable: `BATCHD_BIN`, else built once per test run (see the README).
pub fn batchd_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match std::env::var_os("BATCHD_BIN") {
        Some(path) => PathBuf::from(path),
        None => build_batchd(),
    })
}

/// Builds the binary with the profile and target directory of this test executable, which
/// lives at `<target-dir>/<profile-dir>/deps/e2e-<hash>`, and returns the path cargo reports.
fn build_batchd() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary knows its path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary is in <profile>/deps");
    let target_dir = profile_dir.parent().expect("the profile dir is in the target dir");
    let profile = match profile_dir.file_name().and_then(|name| name.to_str()) {
        Some("debug") | None => "dev".to_owned(),
        Some(other) => other.to_owned(),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "build",
            "--quiet",
            "-p",
            "batchd",
            "--bin",
            "batchd",
            "--message-format=json",
        ])
        .arg("--profile")
        .arg(&profile)
        .arg("--target-dir")
        .arg(target_dir)
        .output()
        .expect("cargo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "cargo build -p batchd failed:\n{}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact" && message["target"]["name"] == "batchd")
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .expect("cargo reports the batchd executable")
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// `batchd <args>` in `dir`, with no inherited batchd settings in its environment.
pub fn batchd(dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(batchd_bin());
    command.current_dir(dir).args(args).stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        let inherited_setting = key
            .to_str()
            .is_some_and(|key| key.starts_with("BATCHD__") || key == "DATABASE_URL");
        if inherited_setting {
            command.env_remove(key);
        }
    }
    command
}

/// Where a child's stdout and stderr go: fresh files in its working directory.
struct Logs {
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Logs {
    fn attach(dir: &Path, command: &mut Command) -> Logs {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let logs = Logs {
            stdout: dir.join(format!("batchd-{n}.stdout")),
            stderr: dir.join(format!("batchd-{n}.stderr")),
        };
        command
            .stdout(File::create(&logs.stdout).expect("a stdout file"))
            .stderr(File::create(&logs.stderr).expect("a stderr file"));
        logs
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

/// A child that is killed if it is still running when this is dropped.
struct Process {
    child: Child,
    logs: Logs,
}

impl Process {
    fn spawn(dir: &Path, mut command: Command) -> Process {
        let logs = Logs::attach(dir, &mut command);
        let child = command.spawn().expect("batchd starts");
        Process { child, logs }
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("the child can be waited for")
    }

    /// Waits for the child to exit; `None` when it is still running at the deadline.
    async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn describe(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}{}",
            self.logs.stdout(),
            self.logs.stderr(),
            threads(self.child.id())
        )
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // Best effort: the child may exit between the check and the kill.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Where each thread of a running child is (`/proc/<pid>/task`: name, state, kernel wait
/// channel), so a child that misses a deadline shows whether it was blocked, waiting or
/// running; empty once the child has exited.
fn threads(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return String::new();
    };
    let read = |path: PathBuf| std::fs::read_to_string(path).unwrap_or_default().trim().to_owned();
    let mut lines: Vec<String> = tasks
        .flatten()
        .map(|task| {
            let dir = task.path();
            let stat = read(dir.join("stat"));
            // The state follows the parenthesised name, which may itself hold spaces.
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split(' ').next())
                .unwrap_or("?")
                .to_owned();
            format!(
                "{} {} state={} wchan={}",
                task.file_name().to_string_lossy(),
                read(dir.join("comm")),
                state,
                read(dir.join("wchan"))
            )
        })
        .collect();
    lines.sort();
    format!("\n--- threads ---\n{}", lines.join("\n"))
}

/// What a finished one-shot command left.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a command to its end (with a deadline) and collects its output.
pub async fn run(dir: &Path, command: Command) -> Finished {
    let mut process = Process::spawn(dir, command);
    let status = process
        .wait_exit(COMMAND_TIMEOUT)
        .await
        .unwrap_or_else(|| panic!("batchd did not exit within {COMMAND_TIMEOUT:?}\n{}", process.describe()));
    Finished {
        status,
        stdout: process.logs.stdout(),
        stderr: process.logs.stderr(),
    }
}

/// A `batchd serve` child and an HTTP client for it.
pub struct Server {
    process: Process,
    pub addr: SocketAddr,
    http: reqwest::Client,
}

/// One HTTP reply.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: serde_json::Value,
}

impl Server {
    /// Starts `command` (a `serve` that listens on `addr`) in `dir`.
    pub fn spawn(dir: &Path, command: Command, addr: SocketAddr) -> Server {
        let http = reqwest::Client::builder()
            // No idle connections: a kept-alive connection would hold up a graceful stop.
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(60))
            .build()
            .expect("an HTTP client");
        Server {
            process: Process::spawn(dir, command),
            addr,
            http,
        }
    }

    /// `batchd serve --bind 127.0.0.1:<free port> <args>` in `dir`, plus environment `env`.
    pub fn serve(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let bind = addr.to_string();
        let mut all_args = vec!["serve", "--bind", bind.as_str()];
        all_args.extend_from_slice(args);
        let mut command = batchd(dir, &all_args);
        command.envs(env.iter().copied());
        Server::spawn(dir, command, addr)
    }

    /// GET a path; `None` when nothing answers (yet).
    pub async fn try_get(&self, path: &str) -> Option<Reply> {
        let response = self.http.get(format!("http://{}{path}", self.addr)).send().await.ok()?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.ok()?;
        let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Some(Reply { status, headers, body })
    }

    /// GET a path whose body is text.
    pub async fn get_text(&self, path: &str) -> String {
        let response = self
            .http
            .get(format!("http://{}{path}", self.addr))
            .send()
            .await
            .expect("an answer");
        response.text().await.expect("a text body")
    }

    /// POST a JSON body to a path.
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> Reply {
        let sent = self
            .http
            .post(format!("http://{}{path}", self.addr))
            .json(body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(error) => panic!("POST {path} failed: {error}\n{}", self.process.describe()),
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("a body");
        let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Reply { status, headers, body }
    }

    /// Polls `GET path` until `done` holds for its body; panics with the server's output at
    /// the deadline.
    pub async fn wait_until(&mut self, path: &str, done: impl Fn(&serde_json::Value) -> bool) -> Reply {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let reply = self.get(path).await;
            if done(&reply.body) {
                return reply;
            }
            assert!(
                Instant::now() < deadline,
                "{path} never got there; last {:?}\n{}",
                reply.body,
                self.process.describe()
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        match self.try_get(path).await {
            Some(reply) => reply,
            None => panic!("GET {path} got no answer\n{}", self.process.describe()),
        }
    }

    /// Polls `path` until it answers `status`; panics with the server's output if the server
    /// exits or the deadline passes.
    pub async fn wait_for(&mut self, path: &str, status: u16) -> Reply {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = None;
        loop {
            if let Some(exit) = self.process.exited() {
                panic!(
                    "batchd exited with {exit} before {path} answered {status}\n{}",
                    self.process.describe()
                );
            }
            if let Some(reply) = self.try_get(path).await {
                if reply.status == status {
                    return reply;
                }
                last = Some(reply);
            }
            assert!(
                Instant::now() < deadline,
                "{path} did not answer {status} within {READY_TIMEOUT:?}; last reply {last:?}\n{}",
                self.process.describe()
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self) -> Reply {
        self.wait_for("/readyz", 200).await
    }

    pub fn signal(&self, signal: Signal) {
        let pid = i32::try_from(self.process.child.id()).expect("a pid fits in i32");
        kill(Pid::from_raw(pid), signal).expect("the signal is sent");
    }

    /// Waits for the server to exit; panics with its output at the deadline.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.process.wait_exit(timeout).await {
            Some(status) => status,
            None => panic!("batchd did not exit within {timeout:?}\n{}", self.process.describe()),
        }
    }

    /// What the server wrote to stderr (its logs) so far.
    pub fn logs(&self) -> String {
        self.process.logs.stderr()
    }
}

/// A long-running child that is not a server (`batchd worker`, a Python worker), killed if it
/// is still running when dropped.
pub struct Background {
    process: Process,
}

impl Background {
    pub fn spawn(dir: &Path, command: Command) -> Background {
        Background {
            process: Process::spawn(dir, command),
        }
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.process.exited()
    }

    /// Waits for it to exit; panics with its output at the deadline.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.process.wait_exit(timeout).await {
            Some(status) => status,
            None => panic!("the child did not exit within {timeout:?}\n{}", self.process.describe()),
        }
    }

    pub fn signal(&self, signal: Signal) {
        let pid = i32::try_from(self.process.child.id()).expect("a pid fits in i32");
        kill(Pid::from_raw(pid), signal).expect("the signal is sent");
    }

    /// Its stdout and stderr so far, for a failure message.
    pub fn describe(&self) -> String {
        self.process.describe()
    }
}
