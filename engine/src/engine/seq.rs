//! One sequence as the engine tracks it: its validated parameters, how much of its prompt
//! is in the KV cache, what it has generated, and when it must stop.

use shardline_constraint::ConstraintState;
use shardline_proto::worker::v1 as pb;

use crate::sampler::{PenaltyState, SamplingConfig};

/// Validated `SequenceParams`.
#[derive(Debug, Clone)]
pub(crate) struct SeqConfig {
    pub sampling: SamplingConfig,
    /// 0 = bounded by the context length only.
    pub max_new_tokens: usize,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub min_tokens: usize,
    /// Each sampled token's logprob and this many top alternatives; `None`: no logprob
    /// is computed (the client asked for none).
    pub logprobs: Option<usize>,
    pub prompt_logprobs: bool,
    /// Trailing prompt tokens generated before a migration.
    pub num_generated: usize,
    /// Scheduling class (0 = most important), for choosing preemption victims.
    pub priority: u32,
    /// The grammar the output follows (compiled when the sequence registers).
    pub constraint: Option<pb::Constraint>,
}

/// Largest `logit_bias` magnitude (OpenAI's bound).
pub(crate) const MAX_LOGIT_BIAS: f32 = 100.0;

/// Most alternatives a step returns per token (as OpenAI's API caps `top_logprobs`).
pub(crate) const MAX_TOP_LOGPROBS: u32 = 20;

impl SeqConfig {
    /// Checks a first chunk's parameters against its prompt and the model.
    pub fn from_proto(
        params: &pb::SequenceParams,
        prompt_len: usize,
        vocab_size: usize,
    ) -> Result<Self, String> {
        let s = params.sampling.unwrap_or_default();
        let sampling = SamplingConfig {
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k,
            min_p: s.min_p,
            // proto3 default 0 means "not set": the neutral value is 1.
            repetition_penalty: if s.repetition_penalty == 0.0 {
                1.0
            } else {
                s.repetition_penalty
            },
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            seed: s.seed,
            logit_bias: logit_bias(params, vocab_size)?,
        };
        sampling.validate().map_err(|e| e.to_string())?;
        if params.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(format!(
                "top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {}",
                params.top_logprobs
            ));
        }
        let num_generated = params.num_generated as usize;
        if num_generated > prompt_len {
            return Err(format!(
                "num_generated ({num_generated}) exceeds the prompt length ({prompt_len})"
            ));
        }
        let max_new_tokens = params.max_new_tokens as usize;
        if max_new_tokens > 0 && num_generated >= max_new_tokens {
            return Err(format!(
                "num_generated ({num_generated}) leaves nothing to generate under max_new_tokens ({max_new_tokens})"
            ));
        }
        if let Some(&bad) = params
            .stop_token_ids
            .iter()
            .find(|&&t| t as usize >= vocab_size)
        {
            return Err(format!(
                "stop token id {bad} is outside the vocabulary ({vocab_size})"
            ));
        }
        Ok(Self {
            sampling,
            max_new_tokens,
            stop_token_ids: params.stop_token_ids.clone(),
            ignore_eos: params.ignore_eos,
            min_tokens: params.min_tokens as usize,
            logprobs: (!params.skip_logprob || params.top_logprobs > 0)
                .then_some(params.top_logprobs as usize),
            prompt_logprobs: params.prompt_logprobs,
            num_generated,
            priority: params.priority,
            constraint: params.constraint.clone(),
        })
    }
}

/// `logit_bias` as the sampler takes it, sorted by token id; ids must be in the
/// vocabulary and biases in [-100, 100].
fn logit_bias(params: &pb::SequenceParams, vocab_size: usize) -> Result<Vec<(u32, f32)>, String> {
    let mut bias: Vec<(u32, f32)> = params.logit_bias.iter().map(|(&t, &b)| (t, b)).collect();
    bias.sort_unstable_by_key(|&(t, _)| t);
    for &(token, b) in &bias {
        if token as usize >= vocab_size {
            return Err(format!(
                "logit_bias token id {token} is outside the vocabulary ({vocab_size})"
            ));
        }
        if !b.is_finite() || b.abs() > MAX_LOGIT_BIAS {
            return Err(format!(
                "logit_bias of token {token} must be in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], got {b}"
            ));
        }
    }
    Ok(bias)
}

/// Engine-side state of one live sequence.
#[derive(Debug)]
pub(crate) struct Sequence {
    pub prompt: Vec<u32>,
    pub cfg: SeqConfig,
    /// Prompt tokens in the KV cache (cached prefix included).
    pub computed: usize,
    /// Of which came from the prefix cache.
    pub cached: usize,
    /// Tokens this worker sampled; the last one is not in the KV cache yet.
    pub generated: Vec<u32>,
    pub penalties: PenaltyState,
    /// Logprobs of prompt tokens `1..computed+1`, gathered over the prefill chunks.
    pub prompt_logprobs: Vec<pb::TokenLogprob>,
    /// Registration order on this worker (later = preempted first among equals).
    pub started: u64,
    /// When a step last named this sequence (see [`EngineState::release_idle`]).
    ///
    /// [`EngineState::release_idle`]: super::EngineState::release_idle
    pub touched: std::time::Instant,
    /// Where the output stands in `cfg.constraint`'s grammar (already advanced over the
    /// tokens generated before a migration).
    pub constraint: Option<ConstraintState>,
}

impl Sequence {
    pub fn new(
        prompt: Vec<u32>,
        cfg: SeqConfig,
        cached: usize,
        started: u64,
        constraint: Option<ConstraintState>,
    ) -> Self {
        let penalties = PenaltyState::new(&prompt, cfg.num_generated);
        Self {
            prompt,
            cfg,
            computed: cached,
            cached,
            generated: Vec::new(),
            penalties,
            prompt_logprobs: Vec::new(),
            started,
            touched: std::time::Instant::now(),
            constraint,
        }
    }

    pub fn prefilled(&self) -> bool {
        self.computed == self.prompt.len()
    }

    /// Output tokens of the request so far, migrated ones included.
    pub fn total_generated(&self) -> usize {
        self.cfg.num_generated + self.generated.len()
    }

    fn is_eos(&self, token: u32, eos: &[u32]) -> bool {
        !self.cfg.ignore_eos && eos.contains(&token)
    }

    /// Tokens that may not be sampled now: EOS and stop ids while under `min_tokens`.
    pub fn banned(&self, eos: &[u32]) -> Vec<u32> {
        if self.total_generated() >= self.cfg.min_tokens {
            return Vec::new();
        }
        let mut banned = self.cfg.stop_token_ids.clone();
        if !self.cfg.ignore_eos {
            banned.extend_from_slice(eos);
        }
        banned
    }

    /// Records a sampled token; returns why the sequence ends now, if it does. A
    /// constraint moves past the token; a grammar that is complete ends the output.
    pub fn push(
        &mut self,
        token: u32,
        eos: &[u32],
        context_length: usize,
    ) -> Result<Option<pb::FinishReason>, String> {
        self.generated.push(token);
        self.penalties.push_generated(token);
        if self.cfg.stop_token_ids.contains(&token) || self.is_eos(token, eos) {
            return Ok(Some(pb::FinishReason::Stop));
        }
        if let Some(constraint) = &mut self.constraint {
            constraint.advance(&[token]).map_err(|e| e.to_string())?;
            if constraint.is_finished() {
                return Ok(Some(pb::FinishReason::Stop));
            }
        }
        let max = self.cfg.max_new_tokens;
        if max > 0 && self.total_generated() >= max {
            return Ok(Some(pb::FinishReason::Length));
        }
        // The next decode would write position prompt + generated - 1; a sequence holds
        // at most `context_length` tokens, prompt and output together.
        if self.prompt.len() + self.generated.len() >= context_length {
            return Ok(Some(pb::FinishReason::Length));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> pb::SequenceParams {
        pb::SequenceParams {
            max_new_tokens: 4,
            ..Default::default()
        }
    }

    #[test]
    fn zero_repetition_penalty_means_unset() {
        let c = SeqConfig::from_proto(&params(), 3, 10).unwrap();
        assert_eq!(c.sampling.repetition_penalty, 1.0);
    }

    #[test]
    fn rejects_inconsistent_params() {
        let mut p = params();
        p.num_generated = 4;
        assert!(
            SeqConfig::from_proto(&p, 5, 10)
                .unwrap_err()
                .contains("max_new_tokens")
        );
        p.num_generated = 6;
        assert!(
            SeqConfig::from_proto(&p, 5, 10)
                .unwrap_err()
                .contains("prompt length")
        );
        let mut p = params();
        p.stop_token_ids = vec![10];
        assert!(
            SeqConfig::from_proto(&p, 5, 10)
                .unwrap_err()
                .contains("vocabulary")
        );
        let mut p = params();
        p.logit_bias = [(10, 1.0)].into();
        assert!(
            SeqConfig::from_proto(&p, 5, 10)
                .unwrap_err()
                .contains("logit_bias")
        );
        p.logit_bias = [(3, 100.5)].into();
        assert!(
            SeqConfig::from_proto(&p, 5, 10)
                .unwrap_err()
                .contains("[-100")
        );
        p.logit_bias = [(3, f32::NAN)].into();
        assert!(SeqConfig::from_proto(&p, 5, 10).is_err());
        p.logit_bias = [(3, -100.0), (1, 2.5)].into();
        assert_eq!(
            SeqConfig::from_proto(&p, 5, 10)
                .unwrap()
                .sampling
                .logit_bias,
            vec![(1, 2.5), (3, -100.0)]
        );
        let mut p = params();
        p.top_logprobs = 21;
        assert!(SeqConfig::from_proto(&p, 5, 10).is_err());
        let mut p = params();
        p.sampling = Some(pb::SamplingParams {
            temperature: -1.0,
            ..Default::default()
        });
        assert!(
            SeqConfig::from_proto(&p, 5, 10)
                .unwrap_err()
                .contains("temperature")
        );
    }

    #[test]
    fn finish_reasons() {
        let cfg = SeqConfig::from_proto(&params(), 2, 10).unwrap();
        let mut s = Sequence::new(vec![5, 6], cfg.clone(), 0, 0, None);
        assert_eq!(s.push(7, &[9], 100).unwrap(), None);
        assert_eq!(s.push(9, &[9], 100).unwrap(), Some(pb::FinishReason::Stop));
        let mut s = Sequence::new(vec![5, 6], cfg.clone(), 0, 0, None);
        for _ in 0..3 {
            assert_eq!(s.push(7, &[9], 100).unwrap(), None);
        }
        assert_eq!(
            s.push(7, &[9], 100).unwrap(),
            Some(pb::FinishReason::Length)
        );
        // context: 2 prompt + 2 generated = 4
        let mut s = Sequence::new(vec![5, 6], cfg, 0, 0, None);
        assert_eq!(s.push(7, &[9], 4).unwrap(), None);
        assert_eq!(s.push(7, &[9], 4).unwrap(), Some(pb::FinishReason::Length));
    }

    #[test]
    fn min_tokens_bans_eos_and_stop_ids() {
        let mut p = params();
        p.min_tokens = 2;
        p.stop_token_ids = vec![3];
        let cfg = SeqConfig::from_proto(&p, 2, 10).unwrap();
        let mut s = Sequence::new(vec![5, 6], cfg, 0, 0, None);
        assert_eq!(s.banned(&[9]), vec![3, 9]);
        s.push(1, &[9], 100).unwrap();
        s.push(1, &[9], 100).unwrap();
        assert!(s.banned(&[9]).is_empty());
    }
}
