//! Helpers for shardline's end-to-end tests, which run real processes: the `shardline`
//! binary (coordinator, workers), etcd, and the Python `openai` client.
//!
//! - [`free_port`]: a loopback port nobody listens on right now.
//! - [`Proc`]: a child process killed (by pid) when dropped, with its output kept in a
//!   log file for failure messages.
//! - [`model_path`]: the default model, or a panic saying how to get it.
//! - [`wait_until`]: poll a condition with a deadline instead of sleeping blindly.
//! - [`etcd::EtcdServer`]: a real etcd on free loopback ports, stoppable and restartable.
//! - [`http`]: an HTTP client with a timeout, sums over `/metrics`.
//! - [`load`]: numbered greedy completions, plain or streamed, to compare texts.
//! - [`worker`]: a worker group's `Health`.
//! - [`otlp`]: an in-process OTLP trace receiver.
//! - [`podman`]: the container image and `podman kube play` of the Helm chart.
//! - [`pki`]: a test CA and the certificates it signs.

pub mod cluster;
pub mod etcd;
pub mod http;
pub mod load;
pub mod otlp;
pub mod pki;
pub mod podman;
pub mod worker;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Path of the default model (SmolLM2-135M-Instruct Q4_1 GGUF). `SHARDLINE_MODEL`
/// overrides it. Panics with instructions when it is missing: tests never skip.
pub fn model_path() -> PathBuf {
    let path = std::env::var_os("SHARDLINE_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(
        path.is_file(),
        "model not found at {}: run deploy/fetch-model.sh (or deploy/setup.sh) first",
        path.display()
    );
    path
}

/// A child process that is killed when dropped. stdout and stderr go to a log file.
pub struct Proc {
    child: Child,
    name: String,
    log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with its output captured in `<tmp>/<name>-<pid>.log`.
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        let log = std::env::temp_dir().join(format!(
            "shardline-{name}-{}-{}.log",
            std::process::id(),
            free_port()
        ));
        let out = std::fs::File::create(&log).expect("create log file");
        let err = out.try_clone().expect("clone log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({cmd:?}): {e}"));
        Proc {
            child,
            name: name.to_string(),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal (e.g. `"TERM"`, `"KILL"`) by pid.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {} failed", self.name);
    }

    /// Whether the process has exited; returns its exit code if so.
    pub fn try_exit_code(&mut self) -> Option<Option<i32>> {
        self.child.try_wait().expect("try_wait").map(|s| s.code())
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<Option<i32>> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(code) = self.try_exit_code() {
                return Some(code);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Panics with the process's output unless it is still running.
    pub fn assert_running(&mut self) {
        if let Some(code) = self.try_exit_code() {
            panic!(
                "{} exited early ({code:?}); its output:\n{}",
                self.name,
                self.output()
            );
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The value of `key=VALUE` on the first output line containing `line`, waiting up to
    /// `timeout` for it. Processes started on port 0 log the address they bound this way,
    /// so a test never races another for a port. Panics with the output if it never comes
    /// or the process exits first.
    pub fn logged(&mut self, line: &str, key: &str, timeout: Duration) -> String {
        // Text logs say ` key=value`, JSON logs (`--log-format json`) `"key":"value"`.
        let needle = format!(" {key}=");
        let json_needle = format!("\"{key}\":\"");
        let found = wait_until(timeout, || {
            let out = self.output();
            let value = out.lines().filter(|l| l.contains(line)).find_map(|l| {
                if let Some((_, rest)) = l.split_once(&json_needle) {
                    return Some(rest.split('"').next().unwrap_or("").to_string());
                }
                let (_, rest) = l.split_once(&needle)?;
                Some(rest.split_whitespace().next().unwrap_or("").to_string())
            });
            if value.is_none() {
                self.assert_running();
            }
            value
        });
        found.unwrap_or_else(|| {
            panic!(
                "{} never logged {key}= on a line with {line:?}; its output:\n{}",
                self.name,
                self.output()
            )
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- output of {} ----\n{}", self.name, self.output());
        }
    }
}

/// Polls `cond` every 20 ms until it returns `Some` or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, mut cond: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `promtool check metrics` over a Prometheus exposition (`what`: where it came
/// from, for the message); panics with its complaints, or with how to get promtool.
pub fn promtool_check(what: &str, text: &str) {
    use std::io::Write as _;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("promtool not found ({e}): install Debian's `prometheus` (deploy/setup.sh)")
        });
    child
        .stdin
        .take()
        .expect("promtool's stdin is piped")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool check metrics {what}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
