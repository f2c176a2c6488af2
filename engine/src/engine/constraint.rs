//! Structured outputs in the engine: each constrained sequence carries a
//! [`ConstraintState`] (llguidance, through [`shardline_constraint`]); every step
//! the engine needs the allowed-token mask of each such sequence that samples.
//!
//! A mask depends only on the tokens a sequence has already produced, never on this
//! step's logits, so the masks of the whole batch are computed on a helper thread while
//! the forward runs ([`beside_forward`]); sampling then finds them ready. A migrated or
//! preempted sequence rebuilds its state by advancing a fresh one over the tokens it had
//! generated (the `num_generated` tail of its prompt), so it continues exactly where it
//! was in its grammar.

use shardline_constraint::{ConstraintCompiler, ConstraintState};
use shardline_proto::worker::v1 as pb;

/// The engine's constraint compiler for its model, or why there is none.
pub(crate) struct Constraints {
    compiler: Result<ConstraintCompiler, String>,
}

impl Constraints {
    /// Builds the token trie from the tokenizer the worker ships (`tokenizer_json`),
    /// `vocab_size` wide (the logits row). A model without a usable tokenizer serves,
    /// but refuses constrained sequences with the reason.
    pub fn new(tokenizer_json: &str, eos_token_ids: &[u32], vocab_size: usize) -> Self {
        let compiler = if tokenizer_json.is_empty() {
            Err("the worker has no tokenizer to compile constraints with".to_string())
        } else {
            ConstraintCompiler::new(tokenizer_json, eos_token_ids, vocab_size)
                .map_err(|e| e.to_string())
        };
        if let Err(e) = &compiler {
            tracing::warn!(error = %e, "structured outputs unavailable");
        }
        Self { compiler }
    }

    /// A sequence's state in `constraint`, advanced over the `earlier` tokens it
    /// generated before a migration or preemption.
    pub fn start(
        &self,
        constraint: &pb::Constraint,
        earlier: &[u32],
    ) -> Result<ConstraintState, String> {
        let compiler = self.compiler.as_ref().map_err(Clone::clone)?;
        let mut state = compiler.compile(constraint).map_err(|e| e.to_string())?;
        state.advance(earlier).map_err(|e| {
            format!("the tokens generated before this placement do not fit the constraint: {e}")
        })?;
        Ok(state)
    }
}

/// Runs `forward` on this thread while the masks of `states` are computed on a helper
/// thread; returns what `forward` returned once both are done. Without states nothing is
/// spawned. A mask that failed is computed again (and its error reported) at sampling.
pub(crate) fn beside_forward<T>(
    states: Vec<&mut ConstraintState>,
    forward: impl FnOnce() -> T,
) -> T {
    if states.is_empty() {
        return forward();
    }
    std::thread::scope(|scope| {
        let masks = std::thread::Builder::new()
            .name("shardline-masks".into())
            .spawn_scoped(scope, move || {
                for state in states {
                    let _ = state.allowed_tokens();
                }
            });
        let out = forward();
        match masks {
            // llguidance catches its own panics; a panic here is ours.
            Ok(handle) => {
                if handle.join().is_err() {
                    tracing::error!("the mask thread panicked; masks are computed at sampling");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot start the mask thread"),
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use shardline_constraint::testing::{byte_tokenizer_json, bytes};
    use shardline_constraint::{json_schema, regex};

    use super::*;

    fn constraints() -> Constraints {
        Constraints::new(&byte_tokenizer_json(), &[0], 259)
    }

    #[test]
    fn a_rebuilt_state_continues_where_the_sequence_was() {
        let c = constraints();
        let schema = json_schema(
            &serde_json::json!({"type": "array", "items": {"type": "integer"},
            "x-guidance": {"whitespace_flexible": false}}),
        );
        let mut fresh = c.start(&schema, &[]).unwrap();
        assert!(fresh.allowed_tokens().unwrap().allows(bytes("[")[0]));
        let mut moved = c.start(&schema, &bytes("[1,2")).unwrap();
        let m = moved.allowed_tokens().unwrap();
        assert!(m.allows(bytes(",")[0]) && m.allows(bytes("]")[0]));
        assert!(!m.allows(bytes("[")[0]));
        let err = c.start(&schema, &bytes("{")).unwrap_err();
        assert!(err.contains("do not fit"), "{err}");
    }

    #[test]
    fn without_a_tokenizer_constraints_are_refused_with_the_reason() {
        let c = Constraints::new("", &[0], 10);
        let err = c.start(&regex("a"), &[]).unwrap_err();
        assert!(err.contains("no tokenizer"), "{err}");
    }

    #[test]
    fn masks_are_ready_after_the_forward() {
        let c = constraints();
        let mut states: Vec<ConstraintState> = (0..4)
            .map(|_| c.start(&regex("[ab]+"), &[]).unwrap())
            .collect();
        let out = beside_forward(states.iter_mut().collect(), || 7);
        assert_eq!(out, 7);
        for s in &mut states {
            assert_eq!(s.allowed_tokens().unwrap().count(), 2);
        }
        assert_eq!(beside_forward(Vec::new(), || 8), 8);
    }
}
