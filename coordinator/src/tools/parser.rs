//! Reading tool calls out of generated text, incrementally: the text arrives in pieces and
//! comes out as [`Delta`]s — assistant content, the start of a call (its id and function
//! name) and fragments of its JSON arguments — the way OpenAI streams `tool_calls`. The
//! non-streaming answer is the same deltas, concatenated, so both agree by construction.
//!
//! Two formats ([`ToolFormat`]):
//! - **Hermes** (Qwen 2.5, Hermes, and shardline's fallback prompt for templates without
//!   tools): each call is a JSON object `{"name": ..., "arguments": {...}}` between
//!   `<tool_call>` and `</tool_call>`, on its own lines; text outside calls is content. A
//!   `<tool_call>` whose body is not a call is content.
//! - **Llama 3 JSON** (Llama 3.1 / 3.2 templates): an answer that is a call is a JSON
//!   object `{"name": ..., "parameters": {...}}` from its first character (after an
//!   optional `<|python_tag|>`), several separated by `;`; any other answer is content.
//!
//! Arguments stream as soon as the call's name is known (the name comes first in what the
//! constrained grammar produces and in what models trained on these formats write); a call
//! that puts its arguments first is emitted whole once it is complete.
//!
//! The scanning is hand-written (about a hundred lines over byte offsets) because what
//! it needs — where the arguments value starts and ends in an *incomplete* object, to
//! forward its raw text — is not what JSON parsers (serde_json, or partial parsers that
//! repair and re-serialize) offer; complete bodies are checked with serde_json.

/// Opens a call in the Hermes format.
pub const OPEN: &str = "<tool_call>";
/// Closes a call.
pub const CLOSE: &str = "</tool_call>";
/// What Llama 3 writes before a call (when special tokens are kept in the text).
pub const PYTHON_TAG: &str = "<|python_tag|>";

/// How a model writes its tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    Hermes,
    Llama3Json,
}

/// A piece of parsed output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    /// Assistant text outside tool calls.
    Content(String),
    /// Tool call number `index` begins: its id and function name.
    CallStart {
        index: usize,
        id: String,
        name: String,
    },
    /// More of call `index`'s arguments (raw JSON text; all fragments of a call
    /// concatenated are its arguments).
    CallArguments { index: usize, fragment: String },
}

#[derive(Debug)]
enum Mode {
    /// Outside a call; `buf` may end with a partial `<tool_call>`.
    Text,
    /// Llama 3 JSON: before a call (at the start, or after one when `after_call`), until
    /// the first character tells a call (`{`) from content.
    Sniff { after_call: bool },
    /// Llama 3 JSON: the answer is content; it all passes through.
    Plain,
    /// Inside a call: `buf` is the body after `<tool_call>`.
    Call {
        /// The call's index once its start was emitted.
        started: Option<usize>,
        /// Bytes of the arguments value (from its start) already emitted.
        sent: usize,
    },
    /// Parallel calls are off and one call is complete: the rest is dropped.
    Done,
}

/// Incremental parser of one choice's output.
#[derive(Debug)]
pub struct ToolCallParser {
    format: ToolFormat,
    mode: Mode,
    buf: String,
    /// Whitespace held back: it is content only if more content follows (whitespace
    /// around calls is layout, not an answer).
    held: String,
    calls: usize,
    parallel: bool,
    new_id: fn() -> String,
}

/// A fresh OpenAI-style call id.
pub fn call_id() -> String {
    format!(
        "call_{:016x}{:08x}",
        rand::random::<u64>(),
        rand::random::<u32>()
    )
}

impl ToolCallParser {
    /// `parallel`: more than one call may be returned (`parallel_tool_calls`).
    pub fn new(format: ToolFormat, parallel: bool) -> Self {
        Self::with_ids(format, parallel, call_id)
    }

    fn with_ids(format: ToolFormat, parallel: bool, new_id: fn() -> String) -> Self {
        Self {
            format,
            mode: match format {
                ToolFormat::Hermes => Mode::Text,
                ToolFormat::Llama3Json => Mode::Sniff { after_call: false },
            },
            buf: String::new(),
            held: String::new(),
            calls: 0,
            parallel,
            new_id,
        }
    }

    /// Whether any tool call was emitted.
    pub fn called(&self) -> bool {
        self.calls > 0
    }

    /// Feeds the next piece of text.
    pub fn push(&mut self, text: &str) -> Vec<Delta> {
        let mut out = Vec::new();
        if matches!(self.mode, Mode::Done) {
            return out;
        }
        self.buf.push_str(text);
        self.advance(&mut out, false);
        out
    }

    /// The text ended: whatever is pending becomes final.
    pub fn finish(&mut self) -> Vec<Delta> {
        let mut out = Vec::new();
        self.advance(&mut out, true);
        if matches!(self.mode, Mode::Call { .. }) {
            // An unclosed call: complete it if its body is a whole call, else it is text.
            let end = self.buf.len();
            self.close_call(&mut out, end, end);
        }
        if matches!(self.mode, Mode::Text | Mode::Plain | Mode::Sniff { .. }) {
            let rest = std::mem::take(&mut self.buf);
            if matches!(self.mode, Mode::Sniff { after_call: true }) {
                // What follows the last call: a `;` or layout is not content.
                let rest = rest.trim_start().trim_start_matches(';');
                self.content(&mut out, rest);
            } else {
                self.content(&mut out, &rest);
            }
        }
        if self.calls == 0 && !self.held.is_empty() {
            out.push(Delta::Content(std::mem::take(&mut self.held)));
        }
        out
    }

    fn advance(&mut self, out: &mut Vec<Delta>, at_end: bool) {
        loop {
            match self.mode {
                Mode::Done => {
                    self.buf.clear();
                    return;
                }
                Mode::Text => {
                    if let Some(i) = self.buf.find(OPEN) {
                        let before: String = self.buf.drain(..i + OPEN.len()).collect();
                        self.content(out, &before[..i]);
                        self.held.clear();
                        self.mode = Mode::Call {
                            started: None,
                            sent: 0,
                        };
                        continue;
                    }
                    // Keep a tail that may be the start of `<tool_call>`.
                    let keep = if at_end {
                        0
                    } else {
                        partial_suffix(&self.buf, OPEN)
                    };
                    let text: String = self.buf.drain(..self.buf.len() - keep).collect();
                    self.content(out, &text);
                    return;
                }
                Mode::Plain => {
                    let text = std::mem::take(&mut self.buf);
                    self.content(out, &text);
                    return;
                }
                Mode::Sniff { after_call } => {
                    let mut start = self.buf.len() - self.buf.trim_start().len();
                    if after_call && self.buf[start..].starts_with(';') {
                        start += 1;
                        start += self.buf[start..].len() - self.buf[start..].trim_start().len();
                    }
                    let rest = &self.buf[start..];
                    if let Some(after) = rest.strip_prefix(PYTHON_TAG) {
                        start += PYTHON_TAG.len() + after.len() - after.trim_start().len();
                    }
                    let rest = &self.buf[start..];
                    if rest.is_empty() || (!at_end && PYTHON_TAG.starts_with(rest)) {
                        return; // nothing telling yet
                    }
                    if rest.starts_with('{') {
                        self.buf.drain(..start);
                        self.held.clear();
                        self.mode = Mode::Call {
                            started: None,
                            sent: 0,
                        };
                    } else if after_call {
                        // Text after the calls: content (without the separator).
                        self.buf.drain(..start);
                        self.mode = Mode::Plain;
                    } else {
                        self.mode = Mode::Plain;
                    }
                }
                Mode::Call { .. } => {
                    self.stream_call(out);
                    let Some((end, skip)) = self.call_end() else {
                        return;
                    };
                    self.close_call(out, end, skip);
                }
            }
        }
    }

    /// Where the open call's body ends and how much of `buf` it takes with its closing.
    fn call_end(&self) -> Option<(usize, usize)> {
        match self.format {
            ToolFormat::Hermes => self.buf.find(CLOSE).map(|e| (e, e + CLOSE.len())),
            ToolFormat::Llama3Json => {
                let b = self.buf.as_bytes();
                value_end(b, skip_ws(b, 0)).map(|e| (e, e))
            }
        }
    }

    /// Content outside calls, with trailing whitespace held back.
    fn content(&mut self, out: &mut Vec<Delta>, text: &str) {
        if text.is_empty() {
            return;
        }
        let body = text.trim_end();
        if body.is_empty() {
            self.held.push_str(text);
            return;
        }
        let mut piece = std::mem::take(&mut self.held);
        piece.push_str(body);
        self.held.push_str(&text[body.len()..]);
        out.push(Delta::Content(piece));
    }

    /// Emits the start and the arguments so far of the open call, when its name is known.
    fn stream_call(&mut self, out: &mut Vec<Delta>) {
        let Mode::Call { started, sent } = &mut self.mode else {
            return;
        };
        let scan = scan_call(&self.buf);
        let (Some(name), Some(args)) = (scan.name, scan.args_start) else {
            return;
        };
        let index = match started {
            Some(i) => *i,
            None => {
                let index = self.calls;
                self.calls += 1;
                *started = Some(index);
                out.push(Delta::CallStart {
                    index,
                    id: (self.new_id)(),
                    name,
                });
                index
            }
        };
        let end = scan.args_end.unwrap_or(self.buf.len());
        if args + *sent < end {
            out.push(Delta::CallArguments {
                index,
                fragment: self.buf[args + *sent..end].to_string(),
            });
            *sent = end - args;
        }
    }

    /// Ends the open call whose body is `buf[..end]`; `buf[..skip]` goes with it (the
    /// body and its closing tag).
    fn close_call(&mut self, out: &mut Vec<Delta>, end: usize, skip: usize) {
        let Mode::Call { started, sent } = self.mode else {
            return;
        };
        let body = &self.buf[..end];
        match started {
            Some(index) => {
                // Streamed already; send whatever of the arguments is still pending.
                let scan = scan_call(body);
                if let Some(args) = scan.args_start {
                    let stop = scan.args_end.unwrap_or(body.len());
                    if args + sent < stop {
                        out.push(Delta::CallArguments {
                            index,
                            fragment: body[args + sent..stop].to_string(),
                        });
                    }
                }
            }
            None => match complete_call(body) {
                Some((name, arguments)) => {
                    let index = self.calls;
                    self.calls += 1;
                    out.push(Delta::CallStart {
                        index,
                        id: (self.new_id)(),
                        name,
                    });
                    out.push(Delta::CallArguments {
                        index,
                        fragment: arguments,
                    });
                }
                None => {
                    // Not a call after all: it was text.
                    let text = match self.format {
                        ToolFormat::Hermes => format!("{OPEN}{}", &self.buf[..skip]),
                        ToolFormat::Llama3Json => self.buf[..skip].to_string(),
                    };
                    self.held.clear();
                    self.content(out, &text);
                }
            },
        }
        self.buf.drain(..skip.min(self.buf.len()));
        self.mode = match self.format {
            _ if self.calls > 0 && !self.parallel => Mode::Done,
            ToolFormat::Hermes => Mode::Text,
            ToolFormat::Llama3Json => Mode::Sniff { after_call: true },
        };
    }
}

/// The length of the longest suffix of `text` that is a proper prefix of `marker`.
fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

/// What is known so far about a (possibly incomplete) call body.
#[derive(Debug, Default, PartialEq)]
struct CallScan {
    /// The function name, once its string is complete and it came before the arguments.
    name: Option<String>,
    /// Byte offset where the arguments value starts (once the name is known).
    args_start: Option<usize>,
    /// Byte offset just past the arguments value, once it is complete.
    args_end: Option<usize>,
}

/// Scans the top level of a call object `{"name": ..., "arguments": ...}` as far as
/// `body` goes. `parameters` is accepted for `arguments` (Llama-style calls).
fn scan_call(body: &str) -> CallScan {
    let b = body.as_bytes();
    let mut scan = CallScan::default();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return scan;
    }
    i += 1;
    loop {
        i = skip_ws(b, i);
        match b.get(i) {
            Some(b'"') => {}
            Some(b',') => {
                i += 1;
                continue;
            }
            _ => return scan,
        }
        let Some(key_end) = string_end(b, i) else {
            return scan;
        };
        let key: Option<String> = serde_json::from_str(&body[i..key_end]).ok();
        i = skip_ws(b, key_end);
        if b.get(i) != Some(&b':') {
            return scan;
        }
        i = skip_ws(b, i + 1);
        if i >= b.len() {
            return scan;
        }
        let value_end = value_end(b, i);
        match key.as_deref() {
            Some("name") => {
                let Some(end) = value_end else {
                    return scan;
                };
                scan.name = serde_json::from_str(&body[i..end]).ok();
                i = end;
            }
            Some("arguments" | "parameters") if scan.name.is_some() => {
                scan.args_start = Some(i);
                scan.args_end = value_end;
                return scan;
            }
            _ => match value_end {
                Some(end) => i = end,
                None => return scan,
            },
        }
    }
}

/// A complete call body: its name and its arguments as JSON text.
fn complete_call(body: &str) -> Option<(String, String)> {
    let value: serde_json::Value = serde_json::from_str(body.trim()).ok()?;
    let object = value.as_object()?;
    let name = object.get("name")?.as_str()?.to_string();
    let arguments = object
        .get("arguments")
        .or_else(|| object.get("parameters"))?;
    let arguments = match arguments {
        // Some models write the arguments as a JSON string, as OpenAI returns them.
        serde_json::Value::String(s) if serde_json::from_str::<serde_json::Value>(s).is_ok() => {
            s.clone()
        }
        other => other.to_string(),
    };
    Some((name, arguments))
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// Just past the string starting at `b[i] == '"'`, if it is complete.
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    }
    None
}

/// Just past the JSON value starting at `b[i]`, if it is complete.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => string_end(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = string_end(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            // A scalar ends at a delimiter; at the end of the text it may go on.
            let j = (i..b.len())
                .find(|&j| matches!(b[j], b',' | b'}' | b']') || b[j].is_ascii_whitespace())?;
            Some(j)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> String {
        "call_x".into()
    }

    /// Feeds `text` in pieces of `step` bytes (on char boundaries) and returns the
    /// content, the calls `(name, arguments)` and every delta.
    fn run(text: &str, step: usize, parallel: bool) -> (String, Vec<(String, String)>, Vec<Delta>) {
        run_as(ToolFormat::Hermes, text, step, parallel)
    }

    fn run_as(
        format: ToolFormat,
        text: &str,
        step: usize,
        parallel: bool,
    ) -> (String, Vec<(String, String)>, Vec<Delta>) {
        let mut p = ToolCallParser::with_ids(format, parallel, ids);
        let mut deltas = Vec::new();
        let mut start = 0;
        while start < text.len() {
            let mut end = (start + step).min(text.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            deltas.extend(p.push(&text[start..end]));
            start = end;
        }
        deltas.extend(p.finish());
        let mut content = String::new();
        let mut calls: Vec<(String, String)> = Vec::new();
        for d in &deltas {
            match d {
                Delta::Content(t) => content.push_str(t),
                Delta::CallStart { index, name, .. } => {
                    assert_eq!(*index, calls.len());
                    calls.push((name.clone(), String::new()));
                }
                Delta::CallArguments { index, fragment } => calls[*index].1.push_str(fragment),
            }
        }
        (content, calls, deltas)
    }

    const TWO_CALLS: &str = "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris \\\"FR\\\"\", \"days\": [1, 2]}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>\n";

    #[test]
    fn calls_and_content_are_the_same_whatever_the_pieces() {
        for step in [1, 2, 3, 5, 7, 13, 1000] {
            let (content, calls, _) = run(TWO_CALLS, step, true);
            assert_eq!(content, "Let me look.", "step {step}");
            assert_eq!(
                calls,
                vec![
                    (
                        "get_weather".to_string(),
                        r#"{"city": "Paris \"FR\"", "days": [1, 2]}"#.to_string()
                    ),
                    ("get_time".to_string(), "{}".to_string()),
                ],
                "step {step}"
            );
            for (_, args) in &calls {
                serde_json::from_str::<serde_json::Value>(args).unwrap();
            }
        }
    }

    #[test]
    fn arguments_stream_in_fragments_before_the_call_closes() {
        let (_, _, deltas) = run(TWO_CALLS, 4, true);
        let fragments = deltas
            .iter()
            .filter(|d| matches!(d, Delta::CallArguments { index: 0, .. }))
            .count();
        assert!(fragments > 3, "{deltas:?}");
        let start = deltas
            .iter()
            .find(|d| matches!(d, Delta::CallStart { .. }))
            .unwrap();
        assert!(
            matches!(start, Delta::CallStart { index: 0, name, id } if name == "get_weather" && id == "call_x")
        );
    }

    #[test]
    fn plain_text_passes_through_unchanged_even_with_angle_brackets() {
        for text in [
            "Hello <world>, 1 < 2 and <tool_cal",
            "trailing space \n",
            "<tool",
        ] {
            for step in [1, 3, 100] {
                let (content, calls, _) = run(text, step, true);
                assert_eq!(content, text);
                assert!(calls.is_empty());
            }
        }
    }

    #[test]
    fn only_the_first_call_without_parallel_calls() {
        let (content, calls, _) = run(TWO_CALLS, 6, false);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].0, "get_weather");
        assert_eq!(content, "Let me look.");
    }

    #[test]
    fn a_call_with_arguments_first_comes_out_whole_at_its_close() {
        let text = "<tool_call>{\"arguments\": {\"a\": 1}, \"name\": \"f\"}</tool_call>";
        for step in [1, 4, 100] {
            let (content, calls, _) = run(text, step, true);
            assert_eq!(content, "");
            assert_eq!(calls, vec![("f".into(), r#"{"a":1}"#.into())]);
        }
    }

    #[test]
    fn an_unclosed_call_at_the_end_is_completed_when_whole() {
        let (_, calls, _) = run(
            "<tool_call>\n{\"name\": \"f\", \"parameters\": {\"x\": [1]}}",
            3,
            true,
        );
        assert_eq!(calls, vec![("f".into(), r#"{"x": [1]}"#.into())]);
        // Cut off inside the arguments (length): what was generated is what is returned.
        let (_, calls, _) = run(
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": [1",
            3,
            true,
        );
        assert_eq!(calls, vec![("f".into(), r#"{"x": [1"#.into())]);
    }

    #[test]
    fn a_body_that_is_not_a_call_is_content() {
        let text = "<tool_call>not json</tool_call> ok";
        let (content, calls, _) = run(text, 2, true);
        assert!(calls.is_empty());
        assert_eq!(content, text);
    }

    #[test]
    fn llama3_json_calls_and_plain_answers() {
        let calls = "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}; {\"name\": \"get_time\", \"parameters\": {}}";
        for step in [1, 3, 8, 1000] {
            let (content, got, _) = run_as(ToolFormat::Llama3Json, calls, step, true);
            assert_eq!(content, "", "step {step}");
            assert_eq!(
                got,
                vec![
                    ("get_weather".to_string(), r#"{"city": "Oslo"}"#.to_string()),
                    ("get_time".to_string(), "{}".to_string()),
                ],
                "step {step}"
            );
            let (_, one, _) = run_as(ToolFormat::Llama3Json, calls, step, false);
            assert_eq!(one.len(), 1);
            for plain in [
                "It is sunny. {not a call}",
                "  <|python",
                "Sure; {\"a\": 1}",
            ] {
                let (content, got, _) = run_as(ToolFormat::Llama3Json, plain, step, true);
                assert_eq!(content, plain, "step {step}");
                assert!(got.is_empty());
            }
        }
        // An object that is not a call is content.
        let (content, got, _) = run_as(ToolFormat::Llama3Json, r#"{"answer": 4}"#, 2, true);
        assert_eq!(content, r#"{"answer": 4}"#);
        assert!(got.is_empty());
    }

    #[test]
    fn scan_finds_name_then_arguments_span() {
        let body = r#" {"name": "f", "arguments": {"s": "}"}, "x": 1}"#;
        let scan = scan_call(body);
        assert_eq!(scan.name.as_deref(), Some("f"));
        let (a, b) = (scan.args_start.unwrap(), scan.args_end.unwrap());
        assert_eq!(&body[a..b], r#"{"s": "}"}"#);
        assert_eq!(scan_call(r#"{"na"#), CallScan::default());
        assert_eq!(partial_suffix("ab<tool", OPEN), 5);
        assert_eq!(partial_suffix("ab", OPEN), 0);
        assert_eq!(partial_suffix("é<", OPEN), 1);
    }
}
