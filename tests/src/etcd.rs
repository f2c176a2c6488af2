//! A real single-member etcd for tests: Debian's `etcd` binary on free loopback ports with a
//! temporary data dir, stopped by pid and restartable on the same ports and data; plain or
//! TLS (certificates from a test CA, client certificates required if asked).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long etcd may take to answer `/health` after a (re)start.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How a test etcd runs.
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    /// Serve clients over TLS only (`https://`), with a certificate of a test CA.
    pub tls: bool,
    /// With `tls`: require client certificates signed by the test CA
    /// (`--client-cert-auth`); etcdctl then presents one with common name `root`.
    pub client_cert_auth: bool,
    /// More etcd flags, e.g. `--auth-token-ttl=2`.
    pub args: Vec<String>,
}

/// The certificates of a TLS etcd, as files.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// The CA that signed etcd's certificate (and the client certificates it accepts).
    pub ca: PathBuf,
    /// A client certificate of that CA with common name `root` (etcd's user `root` when
    /// auth is on).
    pub client: crate::pki::LeafFiles,
    /// Keeps the CA to sign more client certificates.
    ca_pem: std::sync::Arc<crate::pki::Ca>,
}

impl EtcdTls {
    /// Another client certificate of etcd's CA, with common name `common_name`, written
    /// next to the others.
    pub fn client_cert(&self, common_name: &str) -> crate::pki::LeafFiles {
        let dir = self.ca.parent().expect("the certificates' folder");
        self.ca_pem
            .leaf_named(common_name, &[common_name])
            .write(dir, &format!("client-{common_name}"))
    }
}

/// A running etcd; killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct EtcdServer {
    child: Option<Child>,
    client: SocketAddr,
    peer: SocketAddr,
    options: EtcdOptions,
    tls: Option<EtcdTls>,
    /// etcdctl's `--user` once auth is on.
    ctl_user: std::sync::Mutex<Option<String>>,
    /// Holds the data dir and the log; removed on drop.
    dir: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts a plain etcd and waits until it answers. Panics with how to install etcd
    /// when the binary is missing, and with etcd's log when it does not come up.
    pub async fn start() -> Self {
        Self::start_with(EtcdOptions::default()).await
    }

    /// Starts etcd as `options` say and waits until it answers (see [`start`](Self::start)).
    pub async fn start_with(options: EtcdOptions) -> Self {
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
        let tls = options.tls.then(|| {
            let ca = crate::pki::Ca::new("etcd test CA");
            let server = ca.leaf(&["localhost", "127.0.0.1"]);
            server.write(dir.path(), "server");
            let client = ca
                .leaf_named("root", &["root"])
                .write(dir.path(), "client-root");
            EtcdTls {
                ca: ca.write(dir.path(), "ca"),
                client,
                ca_pem: std::sync::Arc::new(ca),
            }
        });
        let mut server = Self {
            child: None,
            client: free_addr(),
            peer: free_addr(),
            options,
            tls,
            ctl_user: std::sync::Mutex::new(None),
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

    /// The client URL, e.g. `http://127.0.0.1:40123` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.client)
    }

    /// The certificates of a TLS etcd.
    pub fn tls(&self) -> Option<&EtcdTls> {
        self.tls.as_ref()
    }

    /// Turns etcd's auth on: user `root` (password `root-pw`, all rights) and `user`
    /// with `password`, allowed to read and write keys under `prefix` only. etcdctl
    /// runs as `root` from then on.
    pub fn enable_auth(&self, user: &str, password: &str, prefix: &str) {
        self.etcdctl(&["user", "add", "root:root-pw"]);
        self.etcdctl(&["user", "add", &format!("{user}:{password}")]);
        self.etcdctl(&["role", "add", user]);
        self.etcdctl(&[
            "role",
            "grant-permission",
            user,
            "--prefix=true",
            "readwrite",
            prefix,
        ]);
        self.etcdctl(&["user", "grant-role", user, user]);
        self.etcdctl(&["auth", "enable"]);
        *self.ctl_user.lock().expect("etcdctl user") = Some("root:root-pw".into());
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
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.endpoint());
        if let Some(tls) = &self.tls {
            cmd.arg("--cacert").arg(&tls.ca);
            if self.options.client_cert_auth {
                cmd.arg("--cert").arg(&tls.client.cert);
                cmd.arg("--key").arg(&tls.client.key);
            }
        }
        if let Some(user) = self.ctl_user.lock().expect("etcdctl user").as_deref() {
            cmd.arg("--user").arg(user);
        }
        let output = cmd.args(args).output().unwrap_or_else(|e| {
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
        let client = self.endpoint();
        let peer = format!("http://{}", self.peer);
        let ready_before = ready_lines(&self.log_path());
        let mut cmd = Command::new("etcd");
        if self.tls.is_some() {
            let dir = self.dir.path();
            cmd.arg(format!("--cert-file={}", dir.join("server.crt").display()))
                .arg(format!("--key-file={}", dir.join("server.key").display()));
            if self.options.client_cert_auth {
                cmd.arg("--client-cert-auth").arg(format!(
                    "--trusted-ca-file={}",
                    dir.join("ca.crt").display()
                ));
            }
        }
        let child = cmd
            .args(&self.options.args)
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
        self.wait_ready(ready_before).await
    }

    /// Until etcd serves: `/health` over plain HTTP, or (TLS) its log saying it is ready
    /// once more than the `ready_before` times it said so before this start.
    async fn wait_ready(&mut self, ready_before: usize) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let ready = if self.tls.is_some() {
                ready_lines(&self.log_path()) > ready_before
            } else {
                healthy(self.client)
            };
            if ready {
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

/// How often etcd's log says it serves clients.
fn ready_lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .matches("ready to serve client requests")
        .count()
}

fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let mut start = log.len().saturating_sub(4000);
    while !log.is_char_boundary(start) {
        start += 1;
    }
    log[start..].to_owned()
}
