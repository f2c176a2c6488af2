//! Hardened limits of the HTTP front end: slow clients cannot hold the server, an
//! oversized upload gets its 413 while still uploading, slow bodies get 408, header
//! floods get 431, and connections beyond the limit are closed.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::json;
use shardline_coordinator::Config;
use shardline_coordinator::config::ServerLimits;
use shardline_engine::testing::TestWorkerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(server: ServerLimits) -> Config {
    Config {
        max_body_bytes: 1024,
        server,
        ..Config::default()
    }
}

/// Reads until the peer closes (or `limit` passes); what arrived.
async fn read_all(stream: &mut TcpStream, limit: Duration) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn completion(c: &Cluster) -> u16 {
    c.http
        .post(format!("{}/v1/completions", c.base))
        .json(&json!({"prompt": "hello", "max_tokens": 2}))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("the normal client is answered")
        .status()
        .as_u16()
}

#[tokio::test]
async fn slow_clients_do_not_stop_a_normal_client() {
    let c = one_worker(
        config(ServerLimits {
            header_read_timeout: Duration::from_secs(2),
            ..ServerLimits::default()
        }),
        TestWorkerConfig::default(),
    )
    .await;
    let addr = c.coordinator.http_addr;
    // 300 connections sending their headers one byte every 20 ms (slowloris).
    let slow: Vec<_> = (0..300)
        .map(|_| {
            tokio::spawn(async move {
                let start = tokio::time::Instant::now();
                let mut s = TcpStream::connect(addr).await.unwrap();
                let head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nx-slow: ";
                for byte in head.iter().chain(std::iter::repeat(&b'a')) {
                    if s.write_all(&[*byte]).await.is_err() {
                        // Closed by the server: what the header read timeout does.
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if start.elapsed() > Duration::from_secs(60) {
                        return false;
                    }
                }
                false
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..5 {
        assert_eq!(completion(&c).await, 200);
    }
    for task in slow {
        let closed = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("slow connections are closed by the header read timeout")
            .unwrap();
        assert!(closed);
    }
    assert_eq!(completion(&c).await, 200);
}

async fn raw_post(addr: SocketAddr, content_length: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {content_length}\r\nconnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

#[tokio::test]
async fn an_oversized_upload_gets_413_while_uploading() {
    let c = one_worker(
        config(ServerLimits {
            body_drain_bytes: 1 << 20,
            ..ServerLimits::default()
        }),
        TestWorkerConfig::default(),
    )
    .await;
    let addr = c.coordinator.http_addr;
    // 256 KiB declared and sent in 8 KiB pieces: the server reads it all (within the
    // drain cap) and answers 413; the client's writes never fail.
    let s = raw_post(addr, 256 * 1024).await;
    let (mut read, mut write) = s.into_split();
    let writer = tokio::spawn(async move {
        for _ in 0..32 {
            write.write_all(&[b' '; 8192]).await?;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        std::io::Result::Ok(write)
    });
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), read.read_to_end(&mut response)).await;
    let response = String::from_utf8_lossy(&response);
    assert!(writer.await.unwrap().is_ok(), "the upload was not cut off");
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("request_too_large"), "{response}");

    // Chunked, no length: the same once the limit is crossed.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..4 {
        s.write_all(format!("{:x}\r\n{}\r\n", 600, " ".repeat(600)).as_bytes())
            .await
            .unwrap();
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let response = read_all(&mut s, Duration::from_secs(10)).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");

    // Beyond the drain cap: 413 at once, the connection closed.
    let mut s = raw_post(addr, 64 << 20).await;
    let response = read_all(&mut s, Duration::from_secs(10)).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(
        response.to_ascii_lowercase().contains("connection: close"),
        "{response}"
    );
    assert_eq!(completion(&c).await, 200, "the server serves on");
}

#[tokio::test]
async fn slow_bodies_get_408_and_header_floods_431() {
    let c = one_worker(
        config(ServerLimits {
            body_read_timeout: Duration::from_secs(1),
            max_headers: 20,
            ..ServerLimits::default()
        }),
        TestWorkerConfig::default(),
    )
    .await;
    let addr = c.coordinator.http_addr;
    let mut s = raw_post(addr, 100).await;
    s.write_all(b"{\"prompt\"").await.unwrap();
    let response = read_all(&mut s, Duration::from_secs(10)).await;
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(response.contains("--body-read-timeout-s"), "{response}");

    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut head = String::from("GET /v1/models HTTP/1.1\r\nhost: x\r\n");
    for i in 0..40 {
        head.push_str(&format!("x-h{i}: v\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let response = read_all(&mut s, Duration::from_secs(10)).await;
    assert!(response.starts_with("HTTP/1.1 431"), "{response}");
    assert_eq!(completion(&c).await, 200);
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed() {
    let c = one_worker(
        config(ServerLimits {
            max_connections: 4,
            ..ServerLimits::default()
        }),
        TestWorkerConfig::default(),
    )
    .await;
    let addr = c.coordinator.http_addr;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /livez HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    let mut extra = TcpStream::connect(addr).await.unwrap();
    let _ = extra
        .write_all(b"GET /livez HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    let response = read_all(&mut extra, Duration::from_secs(10)).await;
    assert_eq!(response, "", "the fifth connection is closed unanswered");
    drop(held);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let _ = s
            .write_all(b"GET /livez HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await;
        if read_all(&mut s, Duration::from_secs(5))
            .await
            .starts_with("HTTP/1.1 200")
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "slots come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
