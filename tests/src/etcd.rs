//! A real single-member etcd for tests: Debian's `etcd` binary on free loopback ports with a
//! temporary data dir, stopped by pid and restartable on the same ports and data.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long etcd may take to answer `/health` after a (re)start.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running etcd; killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct EtcdServer {
    child: Option<Child>,
    client: SocketAddr,
    peer: SocketAddr,
    /// Holds the data dir and the log; removed on drop.
    dir: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts etcd and waits until it answers. Panics with how to install etcd when the
    /// binary is missing, and with etcd's log when it does not come up.
    pub async fn start() -> Self {
        match Command::new("etcd").arg("--version").output() {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                panic!("etcd not found: apt-get install etcd-server (see .ci/run)")
            }
            Err(e) => panic!("cannot run etcd: {e}"),
        }
        let dir = tempfile::Builder::new()
            .prefix("shardline-etcd-")
            .tempdir()
            .expect("cannot create a temp dir for etcd");
        let mut server = Self {
            child: None,
            client: free_addr(),
            peer: free_addr(),
            dir,
        };
        // Ports are picked free just before the start, so another test can take one in
        // between: a start that fails on "address already in use" retries on new ports.
        const ATTEMPTS: usize = 4;
        for attempt in 1..=ATTEMPTS {
            match server.spawn().await {
                Ok(()) => return server,
                Err(log) if attempt < ATTEMPTS && log.contains("address already in use") => {
                    eprintln!("etcd lost a port race (attempt {attempt}); retrying");
                    server.client = free_addr();
                    server.peer = free_addr();
                    let _ = std::fs::remove_dir_all(server.dir.path().join("data"));
                }
                Err(log) => panic!("etcd exited before answering:\n{log}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// The client URL, e.g. `http://127.0.0.1:40123`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.client)
    }

    /// The etcd process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills etcd (SIGKILL by pid) and waits for it to exit. Data stays for `restart`.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        }
    }

    /// Starts etcd again on the same ports with the same data dir and waits until it
    /// answers. Stops it first if it runs.
    pub async fn restart(&mut self) {
        self.stop().await;
        if let Err(log) = self.spawn().await {
            panic!("etcd exited before answering after a restart:\n{log}");
        }
    }

    /// Runs `etcdctl --endpoints <endpoint> <args>` and returns its stdout; panics with
    /// stderr when it fails.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let output = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.endpoint())
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run etcdctl ({e}): apt-get install etcd-client (see .ci/run)")
            });
        assert!(
            output.status.success(),
            "etcdctl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Starts etcd and waits until it answers; `Err(log tail)` if it exits first.
    async fn spawn(&mut self) -> Result<(), String> {
        let data = self.dir.path().join("data");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("cannot open the etcd log");
        let client = format!("http://{}", self.client);
        let peer = format!("http://{}", self.peer);
        let child = Command::new("etcd")
            .arg("--name=test")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cannot share the etcd log"))
            .stderr(log)
            .spawn()
            .expect("cannot start etcd");
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if healthy(self.client) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!("{status}:\n{}", log_tail(&self.log_path())));
            }
            if Instant::now() > deadline {
                panic!(
                    "etcd did not answer on {} within {READY_TIMEOUT:?}:\n{}",
                    self.client,
                    log_tail(&self.log_path())
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A loopback address nobody listens on right now.
fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], crate::free_port()))
}

/// etcd answers `GET /health` on its client port with `{"health":"true"}` once it serves.
fn healthy(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.contains("\"health\":\"true\"")
}

fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let mut start = log.len().saturating_sub(4000);
    while !log.is_char_boundary(start) {
        start += 1;
    }
    log[start..].to_owned()
}
