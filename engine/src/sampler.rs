//! Token sampling on the worker: logits in, one token (plus its logprob and the top-n
//! alternatives) out. Logits never leave the worker.
//!
//! Pipeline, in this order (the order of Hugging Face's logits processors and vLLM):
//! 1. **penalties**: repetition (HF/CTRL style: a positive logit is divided by the
//!    penalty, a negative one multiplied) over every token of the prompt *and* the
//!    generated tokens, as HF does; presence and frequency (OpenAI style:
//!    `logit -= presence * [count > 0] + frequency * count`) over the generated tokens
//!    only, as vLLM does. Tokens a migrated request generated earlier count as generated.
//! 2. **logit bias** (OpenAI's `logit_bias`) added to the logits of the tokens it names;
//!    then the **token filter**: tokens outside a constraint's allowed set (structured
//!    outputs) and banned tokens (EOS / stop ids while under `min_tokens`) → `-inf`.
//! 3. **greedy** when temperature is 0 (ties → lowest id); otherwise divide by
//!    temperature, then keep the top-k, then the top-p nucleus, then drop tokens whose
//!    probability is under `min_p` × the top probability.
//! 4. draw with a uniform number that is a pure function of `(seed, i)` for output token
//!    `i` ([`uniform`]): a sequence samples the same tokens whatever shares its batch and
//!    on whichever worker it continues after a migration.
//!
//! Logprobs are the log-softmax of the *unmodified* logits (vLLM's default), so they
//! describe the model, not the sampling settings. NaN logits count as `-inf`.

use std::cmp::Ordering;
use std::collections::HashMap;

/// Sampling settings of one sequence (validated copy of the proto's `SamplingParams`).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 or ≥ 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub top_k: u32,
    /// 0 disables.
    pub min_p: f32,
    /// 1 disables.
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: u64,
    /// Added to the logits of these tokens before anything else (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
            logit_bias: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplerError {
    #[error("{field} must be {expected}, got {value}")]
    InvalidParam {
        field: &'static str,
        expected: &'static str,
        value: f32,
    },
    #[error("no token can be sampled: every logit is NaN, -inf or banned")]
    NoCandidate,
    #[error("logits row has {got} entries, expected the vocabulary size {expected}")]
    BadRow { got: usize, expected: usize },
}

impl SamplingConfig {
    /// Rejects values no sampler can honour (NaN, negative temperature, ...).
    pub fn validate(&self) -> Result<(), SamplerError> {
        let check = |field, ok: bool, expected, value| {
            if ok {
                Ok(())
            } else {
                Err(SamplerError::InvalidParam {
                    field,
                    expected,
                    value,
                })
            }
        };
        let t = self.temperature;
        check(
            "temperature",
            t.is_finite() && t >= 0.0,
            "finite and >= 0",
            t,
        )?;
        let p = self.top_p;
        check("top_p", (0.0..=1.0).contains(&p), "in [0, 1]", p)?;
        let m = self.min_p;
        check("min_p", (0.0..=1.0).contains(&m), "in [0, 1]", m)?;
        let r = self.repetition_penalty;
        check(
            "repetition_penalty",
            r.is_finite() && r > 0.0,
            "finite and > 0",
            r,
        )?;
        let pp = self.presence_penalty;
        check("presence_penalty", pp.is_finite(), "finite", pp)?;
        let f = self.frequency_penalty;
        check("frequency_penalty", f.is_finite(), "finite", f)?;
        for &(_, bias) in &self.logit_bias {
            check("logit_bias", bias.is_finite(), "finite", bias)?;
        }
        Ok(())
    }

    fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }
}

/// What the penalties look at, kept up to date as tokens are generated.
#[derive(Debug, Clone, Default)]
pub struct PenaltyState {
    /// Every token of prompt + generated (repetition penalty).
    seen: HashMap<u32, ()>,
    /// Occurrences among generated tokens (presence / frequency penalties).
    generated: HashMap<u32, u32>,
}

impl PenaltyState {
    /// `prompt` is the whole prompt; its last `num_generated` tokens were generated earlier
    /// (a migrated request) and count as generated.
    pub fn new(prompt: &[u32], num_generated: usize) -> Self {
        let mut state = Self::default();
        let split = prompt.len().saturating_sub(num_generated);
        for &t in &prompt[..split] {
            state.seen.insert(t, ());
        }
        for &t in &prompt[split..] {
            state.push_generated(t);
        }
        state
    }

    pub fn push_generated(&mut self, token: u32) {
        self.seen.insert(token, ());
        *self.generated.entry(token).or_insert(0) += 1;
    }

    fn apply(&self, cfg: &SamplingConfig, logits: &mut [f32]) {
        if cfg.repetition_penalty != 1.0 {
            for &t in self.seen.keys() {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / cfg.repetition_penalty
                    } else {
                        *l * cfg.repetition_penalty
                    };
                }
            }
        }
        if cfg.presence_penalty != 0.0 || cfg.frequency_penalty != 0.0 {
            for (&t, &n) in &self.generated {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= cfg.presence_penalty + cfg.frequency_penalty * n as f32;
                }
            }
        }
    }
}

/// Which tokens a draw may pick, besides what the logits say.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenFilter<'a> {
    /// Never drawn (EOS and stop ids while under `min_tokens`).
    pub banned: &'a [u32],
    /// When set, only these may be drawn: bit `t % 32` of word `t / 32` allows token `t`
    /// (a constraint's mask; tokens past its end are not allowed).
    pub allowed: Option<&'a [u32]>,
}

impl<'a> TokenFilter<'a> {
    pub fn banning(banned: &'a [u32]) -> Self {
        Self {
            banned,
            allowed: None,
        }
    }

    fn is_empty(&self) -> bool {
        self.banned.is_empty() && self.allowed.is_none()
    }

    fn apply(&self, logits: &mut [f32]) {
        if let Some(words) = self.allowed {
            for (w, chunk) in logits.chunks_mut(32).enumerate() {
                let word = words.get(w).copied().unwrap_or(0);
                if word == u32::MAX {
                    continue;
                }
                for (bit, l) in chunk.iter_mut().enumerate() {
                    if word & (1 << bit) == 0 {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
        }
        for &t in self.banned {
            if let Some(x) = logits.get_mut(t as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

/// The sampled token and its logprobs (from the unmodified logits).
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
    /// The `top_n` most likely tokens, most likely first (ties → lower id first).
    pub top: Vec<(u32, f32)>,
}

/// A uniform number in `[0, 1)` that depends only on `(seed, index)`: SplitMix64 over the
/// pair, 53 high bits as the mantissa.
pub fn uniform(seed: u64, index: u64) -> f64 {
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

fn clean(x: f32) -> f32 {
    if x.is_nan() { f32::NEG_INFINITY } else { x }
}

/// Descending by value, then ascending by id: a total, deterministic order.
fn by_value_desc(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// `log(sum(exp(x)))` over the finite entries; `-inf` if there are none.
fn log_sum_exp(xs: &[f32]) -> f32 {
    let max = xs
        .iter()
        .copied()
        .map(clean)
        .fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return f32::NEG_INFINITY;
    }
    let sum: f64 = xs.iter().map(|&x| ((clean(x) - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

/// The `n` largest entries of `xs`, in [`by_value_desc`] order.
fn top_n(xs: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut all: Vec<(u32, f32)> = xs
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, clean(x)))
        .collect();
    let n = n.min(all.len());
    if n == 0 {
        return Vec::new();
    }
    if n < all.len() {
        all.select_nth_unstable_by(n - 1, by_value_desc);
        all.truncate(n);
    }
    all.sort_unstable_by(by_value_desc);
    all
}

/// Samples output token number `index` (counted from the original request's first output
/// token) of a sequence; `filter` says which tokens may not (or only may) be drawn.
/// `logprobs`: the token's logprob and this many top alternatives, or `None` for neither
/// (the logprob reads 0): a log-sum-exp over the whole row costs more than a greedy pick.
pub fn sample(
    raw: &[f32],
    cfg: &SamplingConfig,
    penalties: &PenaltyState,
    filter: &TokenFilter,
    index: u64,
    logprobs: Option<usize>,
) -> Result<Sampled, SamplerError> {
    // Greedy under a constraint (the usual structured output): the best allowed token,
    // read in place; no copy of the row.
    if cfg.temperature == 0.0
        && !cfg.has_penalties()
        && cfg.logit_bias.is_empty()
        && let Some(words) = filter.allowed
    {
        let token = greedy_allowed(raw, words, filter.banned)?;
        let (logprob, top) = scored(raw, token, logprobs);
        return Ok(Sampled {
            token,
            logprob,
            top,
        });
    }
    // Copy the row only when something modifies it (greedy on raw logits is the hot path).
    let modified;
    let logits: &[f32] = if cfg.has_penalties() || !cfg.logit_bias.is_empty() || !filter.is_empty()
    {
        let mut l: Vec<f32> = raw.iter().copied().map(clean).collect();
        if cfg.has_penalties() {
            penalties.apply(cfg, &mut l);
        }
        for &(t, bias) in &cfg.logit_bias {
            if let Some(x) = l.get_mut(t as usize) {
                *x += bias;
            }
        }
        filter.apply(&mut l);
        modified = l;
        &modified
    } else {
        raw
    };
    let token = if cfg.temperature == 0.0 {
        greedy(logits)?
    } else {
        draw(logits, cfg, uniform(cfg.seed, index))?
    };
    let (logprob, top) = scored(raw, token, logprobs);
    Ok(Sampled {
        token,
        logprob,
        top,
    })
}

/// [`logprobs`] when wanted, else 0 and none.
fn scored(raw: &[f32], token: u32, wanted: Option<usize>) -> (f32, Vec<(u32, f32)>) {
    wanted.map_or((0.0, Vec::new()), |n| logprobs(raw, token, n))
}

/// The logprob of `token` and the `top_n` best alternatives under the log-softmax of
/// `raw` (NaN counts as `-inf`). `token` must be inside `raw`.
pub fn logprobs(raw: &[f32], token: u32, top_n_count: usize) -> (f32, Vec<(u32, f32)>) {
    let lse = log_sum_exp(raw);
    let logprob = clean(raw[token as usize]) - lse;
    let top = top_n(raw, top_n_count)
        .into_iter()
        .map(|(t, l)| (t, l - lse))
        .collect();
    (logprob, top)
}

/// The id of the largest logit (ties → lowest id; NaN and −∞ never win).
pub fn greedy(logits: &[f32]) -> Result<u32, SamplerError> {
    let mut best: Option<(u32, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if l > f32::NEG_INFINITY && best.is_none_or(|(_, b)| l > b) {
            best = Some((i as u32, l));
        }
    }
    best.map(|(i, _)| i).ok_or(SamplerError::NoCandidate)
}

/// [`greedy`] over the tokens `allowed` sets and `banned` does not name, in place.
fn greedy_allowed(raw: &[f32], allowed: &[u32], banned: &[u32]) -> Result<u32, SamplerError> {
    let mut best: Option<(u32, f32)> = None;
    for (w, &word) in allowed.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let t = (w * 32) as u32 + bits.trailing_zeros();
            bits &= bits - 1;
            let Some(&l) = raw.get(t as usize) else {
                return best.map(|(i, _)| i).ok_or(SamplerError::NoCandidate);
            };
            if l > f32::NEG_INFINITY && best.is_none_or(|(_, b)| l > b) && !banned.contains(&t) {
                best = Some((t, l));
            }
        }
    }
    best.map(|(i, _)| i).ok_or(SamplerError::NoCandidate)
}

/// How many of the best tokens [`draw`] sorts before falling back to the whole vocabulary
/// for a top-p nucleus.
const NUCLEUS_GUESS: usize = 256;

/// Temperature, top-k, top-p, min-p, then inverse-CDF with `u`.
fn draw(logits: &[f32], cfg: &SamplingConfig, u: f64) -> Result<u32, SamplerError> {
    let inv_t = 1.0 / cfg.temperature;
    let max = logits
        .iter()
        .copied()
        .map(clean)
        .fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return Err(SamplerError::NoCandidate);
    }
    // Unnormalised probabilities relative to the best token (which gets 1).
    let weight = |l: f32| (((clean(l) - max) * inv_t) as f64).exp();
    let top_k = cfg.top_k as usize;
    let nucleus = cfg.top_p > 0.0 && cfg.top_p < 1.0;
    let mut candidates: Vec<(u32, f32)> = if top_k > 0 && top_k < logits.len() {
        top_n(logits, top_k)
    } else if nucleus {
        // Most nuclei are small: try the best NUCLEUS_GUESS tokens before sorting all.
        let full: f64 = logits.iter().map(|&l| weight(l)).sum();
        let guess = top_n(logits, NUCLEUS_GUESS);
        let mass: f64 = guess.iter().map(|&(_, l)| weight(l)).sum();
        if mass >= cfg.top_p as f64 * full {
            guess
        } else {
            top_n(logits, logits.len())
        }
    } else {
        // No ordering needed: walk the vocabulary in id order (still deterministic).
        logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect()
    };
    candidates.retain(|&(_, l)| l > f32::NEG_INFINITY);
    let mut weights: Vec<f64> = candidates.iter().map(|&(_, l)| weight(l)).collect();
    if nucleus {
        // `candidates` is sorted here and its total is the mass top-p is relative to:
        // after top-k that is the kept mass; otherwise the whole vocabulary's.
        let total: f64 = if top_k > 0 && top_k < logits.len() {
            weights.iter().sum()
        } else {
            logits.iter().map(|&l| weight(l)).sum()
        };
        let mut acc = 0.0;
        let mut keep = weights.len();
        for (i, w) in weights.iter().enumerate() {
            acc += w;
            if acc >= cfg.top_p as f64 * total {
                keep = i + 1;
                break;
            }
        }
        candidates.truncate(keep);
        weights.truncate(keep);
    }
    if cfg.min_p > 0.0 {
        // The best token's weight is 1 (or it was cut by nothing above), so the
        // threshold is relative to the top probability.
        let best = weights.iter().copied().fold(0.0, f64::max);
        let threshold = cfg.min_p as f64 * best;
        let mut i = 0;
        candidates.retain(|_| {
            let keep = weights[i] >= threshold;
            i += 1;
            keep
        });
        weights.retain(|&w| w >= threshold);
    }
    let total: f64 = weights.iter().sum();
    if candidates.is_empty() || !total.is_finite() || total <= 0.0 {
        return Err(SamplerError::NoCandidate);
    }
    let target = u * total;
    let mut acc = 0.0;
    for (&(t, _), w) in candidates.iter().zip(&weights) {
        acc += w;
        if target < acc {
            return Ok(t);
        }
    }
    // Rounding: u*total landed on the very end.
    Ok(candidates[candidates.len() - 1].0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(temperature: f32) -> SamplingConfig {
        SamplingConfig {
            temperature,
            ..SamplingConfig::default()
        }
    }

    fn none() -> PenaltyState {
        PenaltyState::default()
    }

    #[test]
    fn greedy_picks_argmax_lowest_id_on_ties_and_ignores_nan() {
        let s = sample(
            &[1.0, f32::NAN, 3.0, 3.0],
            &cfg(0.0),
            &none(),
            &TokenFilter::default(),
            0,
            Some(0),
        )
        .unwrap();
        assert_eq!(s.token, 2);
        assert!(s.top.is_empty());
    }

    #[test]
    fn logprobs_are_log_softmax_of_raw_logits() {
        // ln(e^0 + e^ln2 + e^ln5) = ln 8
        let raw = [0.0, 2f32.ln(), 5f32.ln()];
        let s = sample(
            &raw,
            &cfg(0.0),
            &none(),
            &TokenFilter::default(),
            0,
            Some(2),
        )
        .unwrap();
        assert_eq!(s.token, 2);
        assert!((s.logprob - (5.0f32 / 8.0).ln()).abs() < 1e-6);
        assert_eq!(s.top.len(), 2);
        assert_eq!(s.top[0].0, 2);
        assert_eq!(s.top[1].0, 1);
        assert!((s.top[1].1 - (2.0f32 / 8.0).ln()).abs() < 1e-6);
    }

    #[test]
    fn logprob_ignores_penalties_and_temperature() {
        let raw = [1.0, 2.0];
        let mut c = cfg(0.0);
        c.repetition_penalty = 4.0; // token 1: 2.0 -> 0.5, so token 0 wins
        let pen = PenaltyState::new(&[1], 0);
        let s = sample(&raw, &c, &pen, &TokenFilter::default(), 0, Some(0)).unwrap();
        assert_eq!(s.token, 0);
        let lse = (1f32.exp() + 2f32.exp()).ln();
        assert!((s.logprob - (1.0 - lse)).abs() < 1e-6);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let mut l = vec![2.0, -2.0, 1.0];
        let c = SamplingConfig {
            repetition_penalty: 2.0,
            ..SamplingConfig::default()
        };
        PenaltyState::new(&[0, 1], 0).apply(&c, &mut l);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn presence_and_frequency_count_generated_tokens_only() {
        let mut l = vec![0.0; 4];
        let c = SamplingConfig {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..SamplingConfig::default()
        };
        // prompt [3, 1, 1] whose last 2 tokens (1, 1) were generated before a migration
        let mut p = PenaltyState::new(&[3, 1, 1], 2);
        p.push_generated(2);
        p.apply(&c, &mut l);
        assert_eq!(l, vec![0.0, -(0.5 + 0.5), -(0.5 + 0.25), 0.0]);
    }

    #[test]
    fn banned_tokens_are_never_drawn() {
        let s = sample(
            &[5.0, 1.0],
            &cfg(0.0),
            &none(),
            &TokenFilter::banning(&[0]),
            0,
            Some(0),
        )
        .unwrap();
        assert_eq!(s.token, 1);
        for i in 0..50 {
            let s = sample(
                &[5.0, 1.0],
                &cfg(1.0),
                &none(),
                &TokenFilter::banning(&[0]),
                i,
                Some(0),
            )
            .unwrap();
            assert_eq!(s.token, 1);
        }
    }

    #[test]
    fn logit_bias_moves_the_draw_but_not_the_logprobs() {
        let raw = [3.0, 1.0, 2.0];
        let c = SamplingConfig {
            logit_bias: vec![(1, 100.0)],
            ..cfg(0.0)
        };
        let s = sample(&raw, &c, &none(), &TokenFilter::default(), 0, Some(0)).unwrap();
        assert_eq!(s.token, 1);
        let (lp, _) = logprobs(&raw, 1, 0);
        assert_eq!(s.logprob, lp, "logprobs describe the model, not the bias");
        // -100 keeps a token out even when sampling.
        let c = SamplingConfig {
            logit_bias: vec![(0, -100.0)],
            ..cfg(1.0)
        };
        for i in 0..50 {
            let s = sample(&raw, &c, &none(), &TokenFilter::default(), i, Some(0)).unwrap();
            assert_ne!(s.token, 0);
        }
        // Ids past the row are ignored (the worker validated them against the vocabulary).
        let c = SamplingConfig {
            logit_bias: vec![(7, 5.0)],
            ..cfg(0.0)
        };
        assert_eq!(
            sample(&raw, &c, &none(), &TokenFilter::default(), 0, Some(0))
                .unwrap()
                .token,
            0
        );
    }

    #[test]
    fn only_allowed_tokens_are_drawn_greedy_or_sampled() {
        // 40 tokens: two mask words; allow 3 and 33 only.
        let raw: Vec<f32> = (0..40).map(|i| i as f32 * 0.1).collect();
        let words = [1u32 << 3, 1u32 << 1];
        let filter = TokenFilter {
            banned: &[],
            allowed: Some(&words),
        };
        let s = sample(&raw, &cfg(0.0), &none(), &filter, 0, Some(2)).unwrap();
        assert_eq!(s.token, 33);
        assert_eq!(s.top[0].0, 39, "top logprobs come from the unmasked row");
        for i in 0..100 {
            let t = sample(&raw, &cfg(1.0), &none(), &filter, i, Some(0))
                .unwrap()
                .token;
            assert!(t == 3 || t == 33, "{t}");
        }
        // Banned wins over allowed; a mask that leaves nothing is an error.
        let filter = TokenFilter {
            banned: &[33],
            allowed: Some(&words),
        };
        assert_eq!(
            sample(&raw, &cfg(0.0), &none(), &filter, 0, Some(0))
                .unwrap()
                .token,
            3
        );
        let nothing = [0u32, 0];
        let filter = TokenFilter {
            banned: &[],
            allowed: Some(&nothing),
        };
        assert_eq!(
            sample(&raw, &cfg(0.0), &none(), &filter, 0, Some(0)).unwrap_err(),
            SamplerError::NoCandidate
        );
    }

    #[test]
    fn masked_greedy_in_place_equals_the_copying_path() {
        // The copying path runs when a bias is set; a zero bias changes nothing.
        let zero_bias = SamplingConfig {
            logit_bias: vec![(0, 0.0)],
            ..cfg(0.0)
        };
        for seed in 0..200u64 {
            let raw: Vec<f32> = (0..70)
                .map(|i| match (uniform(seed, i) * 20.0) as u32 {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    v => v as f32 * 0.37,
                })
                .collect();
            let words: Vec<u32> = (0..3)
                .map(|w| (uniform(seed ^ 77, w) * u32::MAX as f64) as u32)
                .collect();
            let banned = [(seed % 70) as u32];
            let filter = TokenFilter {
                banned: &banned,
                allowed: Some(&words),
            };
            let fast = sample(&raw, &cfg(0.0), &none(), &filter, 0, Some(0));
            let slow = sample(&raw, &zero_bias, &none(), &filter, 0, Some(0));
            assert_eq!(fast.map(|s| s.token), slow.map(|s| s.token), "seed {seed}");
        }
    }

    #[test]
    fn all_nan_or_banned_is_an_error_not_a_panic() {
        let err = sample(
            &[f32::NAN, f32::NAN],
            &cfg(0.0),
            &none(),
            &TokenFilter::default(),
            0,
            Some(1),
        )
        .unwrap_err();
        assert_eq!(err, SamplerError::NoCandidate);
        let err = sample(
            &[1.0],
            &cfg(0.7),
            &none(),
            &TokenFilter::banning(&[0]),
            0,
            Some(1),
        )
        .unwrap_err();
        assert_eq!(err, SamplerError::NoCandidate);
        // NaN never wins, with or without a nucleus.
        let mut c = cfg(1.0);
        for i in 0..50 {
            assert_ne!(
                sample(
                    &[f32::NAN, 1.0, 2.0],
                    &c,
                    &none(),
                    &TokenFilter::default(),
                    i,
                    Some(0)
                )
                .unwrap()
                .token,
                0
            );
        }
        c.top_p = 0.9;
        for i in 0..50 {
            assert_ne!(
                sample(
                    &[f32::NAN, 1.0, 2.0],
                    &c,
                    &none(),
                    &TokenFilter::default(),
                    i,
                    Some(0)
                )
                .unwrap()
                .token,
                0
            );
        }
    }

    #[test]
    fn draw_is_inverse_cdf_in_id_order() {
        // probs at T=1: [0.25, 0.25, 0.5] (logits ln1, ln1, ln2)
        let l = [0.0, 0.0, 2f32.ln()];
        let c = cfg(1.0);
        assert_eq!(draw(&l, &c, 0.1).unwrap(), 0);
        assert_eq!(draw(&l, &c, 0.3).unwrap(), 1);
        assert_eq!(draw(&l, &c, 0.6).unwrap(), 2);
        assert_eq!(draw(&l, &c, 0.999_999).unwrap(), 2);
    }

    #[test]
    fn top_k_top_p_min_p_cut_the_tail() {
        // probs: 0.5, 0.3, 0.15, 0.05
        let l: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let mut c = cfg(1.0);
        c.top_k = 1;
        assert_eq!(draw(&l, &c, 0.99).unwrap(), 0);
        let mut c = cfg(1.0);
        c.top_p = 0.75; // nucleus {0, 1}: 0.5 + 0.3 >= 0.75
        assert_eq!(draw(&l, &c, 0.99).unwrap(), 1);
        // sorted order: u*0.8 = 0.45 < 0.5 -> token 0 (kept mass 0.8)
        assert_eq!(draw(&l, &c, 0.5624).unwrap(), 0);
        let mut c = cfg(1.0);
        c.min_p = 0.5; // keep p >= 0.25: {0, 1}
        assert_eq!(draw(&l, &c, 0.99).unwrap(), 1);
    }

    #[test]
    fn large_nucleus_falls_back_to_a_full_sort() {
        // 1000 equal logits: the 0.5 nucleus is ids 0..500 (ties sort by id).
        let l = vec![0.0f32; 1000];
        let mut c = cfg(1.0);
        c.top_p = 0.5;
        for u in [0.0, 0.3, 0.999] {
            assert!(draw(&l, &c, u).unwrap() < 500);
        }
        assert_eq!(draw(&l, &c, 0.999).unwrap(), 499);
    }

    #[test]
    fn low_temperature_sharpens() {
        // T = 0.5 squares the ratios: weights 1 and 1/4 -> token 0 for u < 0.8
        let l = [0.0, -(2f32.ln())];
        assert_eq!(draw(&l, &cfg(0.5), 0.79).unwrap(), 0);
        assert_eq!(draw(&l, &cfg(0.5), 0.81).unwrap(), 1);
    }

    #[test]
    fn uniform_is_a_pure_function_in_unit_interval() {
        assert_eq!(uniform(42, 7), uniform(42, 7));
        assert_ne!(uniform(42, 7), uniform(42, 8));
        assert_ne!(uniform(42, 7), uniform(43, 7));
        let mean: f64 = (0..10_000).map(|i| uniform(1, i)).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
        assert!((0..10_000).all(|i| (0.0..1.0).contains(&uniform(9, i))));
    }

    #[test]
    fn seeded_sampling_is_reproducible() {
        let l: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let c = SamplingConfig {
            temperature: 0.9,
            top_p: 0.95,
            seed: 1234,
            ..SamplingConfig::default()
        };
        let a: Vec<u32> = (0..20)
            .map(|i| {
                sample(&l, &c, &none(), &TokenFilter::default(), i, Some(0))
                    .unwrap()
                    .token
            })
            .collect();
        let b: Vec<u32> = (0..20)
            .map(|i| {
                sample(&l, &c, &none(), &TokenFilter::default(), i, Some(0))
                    .unwrap()
                    .token
            })
            .collect();
        assert_eq!(a, b);
        assert!(
            a.iter().any(|&t| t != a[0]),
            "should not be constant: {a:?}"
        );
    }

    #[test]
    fn validation_rejects_bad_values() {
        let bad = [
            SamplingConfig {
                temperature: -1.0,
                ..SamplingConfig::default()
            },
            SamplingConfig {
                temperature: f32::NAN,
                ..SamplingConfig::default()
            },
            SamplingConfig {
                top_p: 1.5,
                ..SamplingConfig::default()
            },
            SamplingConfig {
                min_p: -0.1,
                ..SamplingConfig::default()
            },
            SamplingConfig {
                repetition_penalty: 0.0,
                ..SamplingConfig::default()
            },
            SamplingConfig {
                frequency_penalty: f32::INFINITY,
                ..SamplingConfig::default()
            },
            SamplingConfig {
                logit_bias: vec![(1, f32::NAN)],
                ..SamplingConfig::default()
            },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
        }
        assert!(SamplingConfig::default().validate().is_ok());
    }
}
