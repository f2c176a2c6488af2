//! Streaming detokenization: turns token ids into text deltas that never split a UTF-8
//! character (prefix-offset / read-offset method: decode a small window, emit only
//! what became final), and matches stop strings across token boundaries.

use tokenizers::Tokenizer;

/// Incremental decoder for one sequence.
#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Start of the window decoded for context (so merges with earlier tokens decode right).
    prefix_offset: usize,
    /// End of what was already emitted.
    read_offset: usize,
}

fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> String {
    tokenizer.decode(ids, true).unwrap_or_default()
}

impl Detokenizer {
    /// Adds one token and returns the text that became final (maybe empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let prefix = decode(tokenizer, &self.ids[self.prefix_offset..self.read_offset]);
        let full = decode(tokenizer, &self.ids[self.prefix_offset..]);
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.starts_with(prefix.as_str())
        {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            delta
        } else {
            String::new()
        }
    }

    /// Whatever is still held back (an incomplete character at the very end).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> String {
        let prefix = decode(tokenizer, &self.ids[self.prefix_offset..self.read_offset]);
        let full = decode(tokenizer, &self.ids[self.prefix_offset..]);
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        full.strip_prefix(prefix.as_str())
            .map(str::to_string)
            .unwrap_or_default()
    }
}

/// Holds back text that could be the start of a stop string; reports a match.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
    stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> StopMatcher {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Default::default()
        }
    }

    /// Feeds new text; returns `(text safe to emit, matched a stop string)`. After a
    /// match the rest is discarded.
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.pending.push_str(delta);
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            let out = self.pending[..pos].to_string();
            self.pending.clear();
            return (out, true);
        }
        let hold = self.held_suffix_len();
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// Longest suffix of `pending` that is a proper prefix of a stop string.
    fn held_suffix_len(&self) -> usize {
        let mut best = 0;
        for stop in &self.stops {
            let max = stop.len().saturating_sub(1).min(self.pending.len());
            for len in (best + 1..=max).rev() {
                let start = self.pending.len() - len;
                if self.pending.is_char_boundary(start) && stop.starts_with(&self.pending[start..])
                {
                    best = len;
                    break;
                }
            }
        }
        best
    }

    /// End of stream: the held text is final.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_string_split_across_deltas_is_removed() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("hello E"), ("hello ".to_string(), false));
        assert_eq!(m.push("N"), (String::new(), false));
        assert_eq!(m.push("Dx"), (String::new(), true));
    }

    #[test]
    fn false_stop_prefix_is_released() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("EN"), (String::new(), false));
        assert_eq!(m.push("o"), ("ENo".to_string(), false));
        assert_eq!(m.push("E"), (String::new(), false));
        assert_eq!(m.finish(), "E");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut m = StopMatcher::new(vec!["b".into(), "ab".into()]);
        assert_eq!(m.push("xxab"), ("xx".to_string(), true));
    }

    #[test]
    fn multibyte_stop_prefix_respects_char_boundaries() {
        let mut m = StopMatcher::new(vec!["éx".into()]);
        assert_eq!(m.push("aé"), ("a".to_string(), false));
        assert_eq!(m.push("y"), ("éy".to_string(), false));
    }

    #[test]
    fn detokenizer_never_splits_utf8() {
        let tokenizer = shardline_engine::testing::test_tokenizer();
        let text = "aé€😀b";
        let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        assert!(
            ids.len() > text.chars().count(),
            "byte-level tokens split characters"
        );
        let mut d = Detokenizer::default();
        let mut out = String::new();
        for id in ids {
            let delta = d.push(&tokenizer, id);
            assert!(!delta.contains('\u{FFFD}'), "broken char in {delta:?}");
            out.push_str(&delta);
        }
        out.push_str(&d.flush(&tokenizer));
        assert_eq!(out, text);
    }
}
