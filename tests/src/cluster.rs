//! A local cluster for end-to-end tests: `shardline up` (coordinator + in-process worker
//! groups) as a child process on free loopback ports, ready when `/health` says so.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::{Proc, free_port, model_path, wait_until};

/// A running `shardline up`.
pub struct Cluster {
    pub proc: Proc,
    /// `http://127.0.0.1:PORT` of the OpenAI-compatible API.
    pub http: String,
    /// `http://127.0.0.1:PORT` of the public gRPC API.
    pub grpc: String,
    /// `http://127.0.0.1:PORT` of the first worker group's gRPC endpoint.
    pub worker: String,
}

impl Cluster {
    /// Starts `shardline up` on the default model with `extra` flags and waits (up to
    /// two minutes: the first start compiles nothing but loads the model) until ready.
    /// Ports are picked free just before the start, so another test can take one in
    /// between; a start that fails on "Address already in use" is retried on new ports.
    pub fn start(bin: &Path, extra: &[&str]) -> Cluster {
        const ATTEMPTS: usize = 4;
        for attempt in 1..=ATTEMPTS {
            match Self::try_start(bin, extra) {
                Ok(cluster) => return cluster,
                Err(out) if attempt < ATTEMPTS && out.contains("Address already in use") => {
                    eprintln!("shardline up lost a port race (attempt {attempt}); retrying");
                }
                Err(out) => panic!("shardline up exited before it was ready:\n{out}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// One start; `Err(output)` if the process exits before it is ready.
    fn try_start(bin: &Path, extra: &[&str]) -> Result<Cluster, String> {
        let (http, grpc, worker) = (free_port(), free_port(), free_port());
        let mut cmd = Command::new(bin);
        cmd.arg("up")
            .arg("--model")
            .arg(model_path())
            .args(["--http-listen", &format!("127.0.0.1:{http}")])
            .args(["--grpc-listen", &format!("127.0.0.1:{grpc}")])
            .args(["--worker-listen", &format!("127.0.0.1:{worker}")])
            .args(extra)
            .env("RUST_LOG", "info");
        let mut proc = Proc::spawn("shardline-up", cmd);
        let http = format!("http://127.0.0.1:{http}");
        let health = format!("{http}/health");
        let mut exited = false;
        let ready = wait_until(Duration::from_secs(120), || {
            if proc.try_exit_code().is_some() {
                exited = true;
                return Some(());
            }
            (http_get_status(&health) == Some(200)).then_some(())
        });
        if exited {
            return Err(proc.output());
        }
        assert!(
            ready.is_some(),
            "shardline up never became ready:\n{}",
            proc.output()
        );
        Ok(Cluster {
            proc,
            http,
            grpc: format!("http://127.0.0.1:{grpc}"),
            worker: format!("http://127.0.0.1:{worker}"),
        })
    }
}

/// Status code of a plain `GET`, or `None` when nothing answers. Blocking and
/// dependency-free so it can run inside `wait_until`.
pub fn http_get_status(url: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut stream = std::net::TcpStream::connect(host).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = [0u8; 32];
    let n = stream.read(&mut buf).ok()?;
    let line = std::str::from_utf8(&buf[..n]).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}
