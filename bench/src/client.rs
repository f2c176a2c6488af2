//! The streaming OpenAI client: sends one request, reads the SSE stream and records the
//! arrival instant of every chunk that carries output, on the client's monotonic clock.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::metrics::{FailReason, RequestRecord};
use crate::workload::RequestSpec;

/// Which OpenAI endpoint to call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Endpoint {
    /// `POST /v1/completions` with a text prompt.
    Completions,
    /// `POST /v1/chat/completions` with messages.
    Chat,
}

/// What every request shares.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub base_url: String,
    pub model: String,
    pub api_key: Option<String>,
    pub endpoint: Endpoint,
    /// Send `ignore_eos` and `min_tokens` so the output length is exactly `max_tokens`.
    pub ignore_eos: bool,
    /// Merged into every request body.
    pub extra_body: Option<Value>,
    pub timeout: Duration,
}

/// Splits an SSE byte stream into `data:` payloads. Lines may arrive split across reads.
#[derive(Default)]
pub struct SseParser {
    buf: Vec<u8>,
}

impl SseParser {
    /// Feed bytes; returns the complete `data:` payloads they finished.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\r', '\n']);
            if let Some(data) = line.strip_prefix("data:") {
                out.push(data.trim_start().to_string());
            }
        }
        out
    }
}

/// The output text of one streamed chunk (completions `text` or chat `delta.content`).
fn chunk_text(v: &Value) -> Option<&str> {
    let choice = v.get("choices")?.get(0)?;
    choice
        .get("text")
        .and_then(Value::as_str)
        .or_else(|| choice.get("delta")?.get("content")?.as_str())
        .or_else(|| choice.get("delta")?.get("reasoning_content")?.as_str())
}

impl ClientConfig {
    fn url(&self) -> String {
        let base = self.base_url.trim_end_matches('/');
        let base = base.strip_suffix("/v1").unwrap_or(base);
        match self.endpoint {
            Endpoint::Completions => format!("{base}/v1/completions"),
            Endpoint::Chat => format!("{base}/v1/chat/completions"),
        }
    }

    /// The JSON body for one request.
    pub fn body(&self, spec: &RequestSpec) -> Value {
        let mut body = json!({
            "model": self.model,
            "max_tokens": spec.output_len,
            "stream": true,
            "stream_options": {"include_usage": true},
            "temperature": 0.0,
        });
        match self.endpoint {
            Endpoint::Completions => {
                let prompt = match &spec.system {
                    Some(sys) => format!("{sys} {}", spec.prompt),
                    None => spec.prompt.clone(),
                };
                body["prompt"] = json!(prompt);
            }
            Endpoint::Chat => {
                let mut msgs = vec![];
                if let Some(sys) = &spec.system {
                    msgs.push(json!({"role": "system", "content": sys}));
                }
                msgs.push(json!({"role": "user", "content": spec.prompt}));
                body["messages"] = json!(msgs);
            }
        }
        if self.ignore_eos {
            body["ignore_eos"] = json!(true);
            body["min_tokens"] = json!(spec.output_len);
        }
        if let Some(Value::Object(extra)) = &self.extra_body {
            for (k, v) in extra {
                body[k] = v.clone();
            }
        }
        body
    }

    /// Send one request and stream its answer. Never fails: failures are in the record.
    /// When `cancel` fires first, the request is dropped and the record says
    /// [`FailReason::Cancelled`], keeping the chunks that had arrived.
    pub async fn send(
        &self,
        http: &reqwest::Client,
        spec: &RequestSpec,
        cancel: &CancellationToken,
    ) -> RequestRecord {
        let start = Instant::now();
        let mut rec = RequestRecord {
            prompt_tokens: spec.input_len,
            ..Default::default()
        };
        let outcome = tokio::select! {
            // Checked first, so a request cancelled before it started is not sent.
            biased;
            _ = cancel.cancelled() => None,
            r = tokio::time::timeout(self.timeout, self.stream(http, spec, start, &mut rec)) => Some(r),
        };
        rec.end = start.elapsed();
        match outcome {
            None => {
                // What had streamed so far (`stream` keeps the count up to date).
                fail(
                    &mut rec,
                    FailReason::Cancelled,
                    "interrupted while in flight".into(),
                )
            }
            Some(Err(_)) => fail(&mut rec, FailReason::Timeout, "request timed out".into()),
            Some(Ok(Err((reason, msg)))) => fail(&mut rec, reason, msg),
            Some(Ok(Ok(()))) if rec.chunk_arrivals.is_empty() => {
                fail(&mut rec, FailReason::Empty, "no output token".into())
            }
            Some(Ok(Ok(()))) => {}
        }
        rec
    }

    async fn stream(
        &self,
        http: &reqwest::Client,
        spec: &RequestSpec,
        start: Instant,
        rec: &mut RequestRecord,
    ) -> Result<(), (FailReason, String)> {
        let mut req = http.post(self.url()).json(&self.body(spec));
        if let Some(key) = &self.api_key {
            req = req.bearer_auth(key);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| (FailReason::Connect, e.to_string()))?;
        let status = resp.status();
        if status.as_u16() == 429 {
            rec.retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(std::time::Duration::from_secs);
        }
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            let reason = match status.as_u16() {
                429 => FailReason::RateLimited,
                code => FailReason::Http(code),
            };
            return Err((reason, body.chars().take(300).collect()));
        }
        let mut parser = SseParser::default();
        let mut bytes = resp.bytes_stream();
        let mut usage_tokens = None;
        while let Some(piece) = bytes.next().await {
            let piece = piece.map_err(|e| (FailReason::Stream, e.to_string()))?;
            // One arrival instant per network read: chunks in one read arrived together.
            let now = start.elapsed();
            for data in parser.feed(&piece) {
                if data == "[DONE]" {
                    rec.output_tokens = usage_tokens.unwrap_or(rec.output_tokens);
                    return Ok(());
                }
                let v: Value = serde_json::from_str(&data)
                    .map_err(|e| (FailReason::Stream, format!("bad SSE JSON: {e}")))?;
                if let Some(err) = v.get("error") {
                    return Err((FailReason::Stream, err.to_string()));
                }
                if let Some(n) = v
                    .get("usage")
                    .and_then(|u| u.get("completion_tokens"))
                    .and_then(Value::as_u64)
                {
                    usage_tokens = Some(n as u32);
                }
                if let Some(n) = v
                    .get("usage")
                    .and_then(|u| u.get("prompt_tokens"))
                    .and_then(Value::as_u64)
                {
                    rec.prompt_tokens = n as u32;
                }
                if chunk_text(&v).is_some_and(|t| !t.is_empty()) {
                    rec.chunk_arrivals.push(now);
                    // Our own count until the server's usage says otherwise; kept
                    // current so a cancelled request keeps what had streamed.
                    rec.output_tokens += 1;
                }
            }
        }
        // The stream ended without [DONE]: accept it if output arrived.
        rec.output_tokens = usage_tokens.unwrap_or(rec.output_tokens);
        Ok(())
    }
}

fn fail(rec: &mut RequestRecord, reason: FailReason, msg: String) {
    rec.failure = Some(reason);
    rec.error = Some(msg);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_parser_handles_split_lines_and_crlf() {
        let mut p = SseParser::default();
        assert!(p.feed(b"data: {\"a\"").is_empty());
        assert_eq!(
            p.feed(b":1}\r\n\r\n: comment\ndata:[DONE]\n"),
            vec!["{\"a\":1}", "[DONE]"]
        );
        assert!(p.feed(b"event: x\n").is_empty());
    }

    #[test]
    fn chunk_text_reads_both_endpoints() {
        let c = json!({"choices": [{"text": "hi"}]});
        let chat = json!({"choices": [{"delta": {"content": "yo"}}]});
        let usage = json!({"choices": [], "usage": {"completion_tokens": 3}});
        assert_eq!(chunk_text(&c), Some("hi"));
        assert_eq!(chunk_text(&chat), Some("yo"));
        assert_eq!(chunk_text(&usage), None);
    }

    #[test]
    fn body_controls_output_length() {
        let cfg = ClientConfig {
            base_url: "http://x/v1/".into(),
            model: "m".into(),
            api_key: None,
            endpoint: Endpoint::Chat,
            ignore_eos: true,
            extra_body: Some(json!({"top_k": 1})),
            timeout: Duration::from_secs(1),
        };
        let spec = RequestSpec {
            system: Some("sys".into()),
            prompt: "q".into(),
            input_len: 2,
            output_len: 7,
            at: None,
        };
        let b = cfg.body(&spec);
        assert_eq!(cfg.url(), "http://x/v1/chat/completions");
        assert_eq!(b["max_tokens"], 7);
        assert_eq!(b["min_tokens"], 7);
        assert_eq!(b["ignore_eos"], true);
        assert_eq!(b["top_k"], 1);
        assert_eq!(b["messages"][0]["role"], "system");
    }
}
