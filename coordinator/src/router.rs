//! Routing a request to a group (`--routing`).
//!
//! **`prefix`** (the default; the cost Dynamo's KV router and llm-d's prefix scorer
//! weigh): every group costs `--route-prefix-weight` × the prompt blocks it would have to
//! prefill (those not in its prefix cache) + the KV blocks it already has in use or
//! queued. What a group caches is tracked here from what was sent where ([`PrefixIndex`]:
//! chained hashes of each prompt's full blocks, per group, least recently used dropped
//! beyond the group's cache size), so a request with a common system prompt goes where
//! that prompt is cached — until that group's load outweighs the saved prefill, and the
//! prefix spreads. The cheapest group wins; groups within [`TIE_BLOCKS`] of it are tied,
//! and ties go to the fewest requests, then to the next in turn.
//!
//! **`first-block`** (the earlier policy, kept for comparison): the group with the most
//! free KV capacity; groups within 1/16 of the best are tied; among tied groups the one
//! that last got a request with the same first prompt block wins, else the fewest
//! requests, else the next in turn.
//!
//! Either way idle groups take turns, so a group that just joined gets work at once even
//! when the others are idle too.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// Costs (in blocks) this close to the cheapest count as tied.
pub const TIE_BLOCKS: i64 = 1;
/// Leading prompt blocks hashed for routing (longer prefixes are rare and cost little
/// more to match than to skip).
const MAX_ROUTED_BLOCKS: usize = 512;

/// See the module doc and `--routing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Routing {
    #[default]
    Prefix,
    FirstBlock,
}

/// What the router knows of a group when it picks.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub key: String,
    /// Free capacity in blocks (may be negative when the queue wants more than exists).
    pub free: i64,
    pub total: i64,
    /// Requests queued or running there.
    pub active: i64,
}

/// Hash of the prompt's first block: the affinity key.
pub fn prefix_hash(prompt: &[u32], block_size: u32) -> u64 {
    let n = prompt.len().min(block_size.max(1) as usize);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    prompt[..n].hash(&mut h);
    h.finish()
}

/// Remembers which group last served each prefix (bounded; cleared when full).
#[derive(Debug, Default)]
pub struct Affinity {
    map: HashMap<u64, String>,
}

const AFFINITY_CAPACITY: usize = 65_536;

impl Affinity {
    pub fn get(&self, hash: u64) -> Option<&str> {
        self.map.get(&hash).map(String::as_str)
    }

    pub fn record(&mut self, hash: u64, key: &str) {
        if self.map.len() >= AFFINITY_CAPACITY {
            self.map.clear();
        }
        self.map.insert(hash, key.to_string());
    }
}

/// Chained hashes of the prompt's full blocks (block `i`'s hash covers blocks `0..=i`), as
/// a prefix cache keys them; at most [`MAX_ROUTED_BLOCKS`].
pub fn block_hashes(prompt: &[u32], block_size: u32) -> Vec<u64> {
    shardline_proto::worker::block_hashes(prompt, block_size as usize)
        .take(MAX_ROUTED_BLOCKS)
        .collect()
}

/// What each group probably holds in its prefix cache: the block hashes of the prompts
/// sent there, each with when it was last sent; beyond a group's cache size the least
/// recently sent are forgotten (the worker evicts them too, least recently used first).
#[derive(Debug, Default)]
pub struct PrefixIndex {
    groups: HashMap<String, GroupBlocks>,
    tick: u64,
}

#[derive(Debug, Default)]
struct GroupBlocks {
    last_sent: HashMap<u64, u64>,
}

impl PrefixIndex {
    /// Leading blocks of `hashes` that the group `key` holds.
    pub fn matched(&self, key: &str, hashes: &[u64]) -> usize {
        let Some(g) = self.groups.get(key) else {
            return 0;
        };
        hashes
            .iter()
            .take_while(|h| g.last_sent.contains_key(h))
            .count()
    }

    /// Records that `hashes` were sent to `key`, a group of `capacity` blocks.
    pub fn record(&mut self, key: &str, hashes: &[u64], capacity: usize) {
        self.tick += 1;
        let tick = self.tick;
        let g = self.groups.entry(key.to_string()).or_default();
        for &h in hashes {
            g.last_sent.insert(h, tick);
        }
        let capacity = capacity.max(1);
        if g.last_sent.len() > 2 * capacity {
            // Keep the `capacity` most recently sent (amortised: at most every
            // `capacity` insertions).
            let mut ticks: Vec<u64> = g.last_sent.values().copied().collect();
            let cut = ticks.len() - capacity;
            let (_, &mut oldest_kept, _) = ticks.select_nth_unstable(cut);
            g.last_sent.retain(|_, &mut t| t >= oldest_kept);
        }
    }

    /// Forgets a group (it left or failed: a new one under the same key starts empty).
    pub fn forget(&mut self, key: &str) {
        self.groups.remove(key);
    }
}

/// A candidate for [`pick_by_cost`].
#[derive(Debug, Clone)]
pub struct Costed {
    pub key: String,
    /// Prompt blocks this group would prefill (not in its prefix cache).
    pub prefill_blocks: i64,
    /// KV blocks in use or wanted by its queue.
    pub load_blocks: i64,
    /// Requests queued or running there.
    pub active: i64,
}

/// Index of the cheapest candidate: `prefix_weight` × prefill blocks + load blocks; ties
/// (within [`TIE_BLOCKS`]) go to the fewest requests, then to the next in turn.
pub fn pick_by_cost(candidates: &[Costed], prefix_weight: f64, turn: usize) -> Option<usize> {
    let cost =
        |c: &Costed| (prefix_weight * c.prefill_blocks as f64).round() as i64 + c.load_blocks;
    let best = candidates.iter().map(cost).min()?;
    let n = candidates.len();
    (0..n)
        .map(|k| (turn + k) % n)
        .filter(|&i| cost(&candidates[i]) <= best + TIE_BLOCKS)
        .min_by_key(|&i| candidates[i].active)
}

/// Index of the chosen candidate under `first-block` routing: see the module doc. `turn`
/// rotates the last tie-break (a counter the caller bumps per request); `candidates` come
/// in a stable order.
pub fn pick(candidates: &[Candidate], affinity: Option<&str>, turn: usize) -> Option<usize> {
    let best = candidates.iter().map(|c| c.free).max()?;
    let slack = |c: &Candidate| (c.total / 16).max(1);
    let tied = |c: &Candidate| c.free >= best - slack(c);
    if let Some(key) = affinity
        && let Some(i) = candidates.iter().position(|c| c.key == key && tied(c))
    {
        return Some(i);
    }
    let n = candidates.len();
    (0..n)
        .map(|k| (turn + k) % n)
        .filter(|&i| tied(&candidates[i]))
        .min_by_key(|&i| candidates[i].active)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(key: &str, free: i64) -> Candidate {
        busy(key, free, 0)
    }

    fn busy(key: &str, free: i64, active: i64) -> Candidate {
        Candidate {
            key: key.into(),
            free,
            total: 160,
            active,
        }
    }

    #[test]
    fn most_free_capacity_wins() {
        for turn in 0..4 {
            assert_eq!(pick(&[c("a", 10), c("b", 50)], None, turn), Some(1));
        }
        assert_eq!(pick(&[], None, 0), None);
    }

    #[test]
    fn affinity_breaks_near_ties_only() {
        for turn in 0..4 {
            assert_eq!(pick(&[c("a", 45), c("b", 50)], Some("a"), turn), Some(0));
            assert_eq!(pick(&[c("a", 10), c("b", 50)], Some("a"), turn), Some(1));
        }
    }

    #[test]
    fn near_ties_go_to_the_least_busy_group() {
        for turn in 0..4 {
            let groups = [busy("a", 50, 3), busy("b", 46, 1), busy("c", 50, 2)];
            assert_eq!(pick(&groups, None, turn), Some(1));
        }
    }

    /// An idle cluster spreads requests: a group that just joined next to an idle one
    /// gets every other request instead of waiting for the first to be busy.
    #[test]
    fn idle_groups_take_turns() {
        let groups = [c("a", 160), c("b", 160)];
        let picks: Vec<_> = (0..4).map(|t| pick(&groups, None, t).unwrap()).collect();
        assert_eq!(picks, [0, 1, 0, 1]);
    }

    fn costed(key: &str, prefill_blocks: i64, load_blocks: i64) -> Costed {
        Costed {
            key: key.into(),
            prefill_blocks,
            load_blocks,
            active: 0,
        }
    }

    #[test]
    fn the_group_holding_the_prefix_wins_until_its_load_outweighs_it() {
        // 32 prompt blocks; "a" holds 30 of them.
        let a = |load| costed("a", 2, load);
        let b = |load| costed("b", 32, load);
        for turn in 0..4 {
            assert_eq!(pick_by_cost(&[a(0), b(0)], 1.0, turn), Some(0));
            assert_eq!(pick_by_cost(&[a(25), b(0)], 1.0, turn), Some(0));
            assert_eq!(pick_by_cost(&[a(40), b(0)], 1.0, turn), Some(1), "spreads");
            // A heavier prefix weight keeps it longer.
            assert_eq!(pick_by_cost(&[a(40), b(0)], 2.0, turn), Some(0));
        }
        // Idle groups without the prefix take turns.
        let picks: Vec<_> = (0..4)
            .map(|t| pick_by_cost(&[b(0), costed("c", 32, 0)], 1.0, t).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 0, 1]);
    }

    #[test]
    fn prefix_index_matches_leading_blocks_and_forgets_the_oldest() {
        let prompt: Vec<u32> = (0..40).collect();
        let h = block_hashes(&prompt, 8);
        assert_eq!(h.len(), 5, "full blocks only");
        let mut other = prompt.clone();
        other[20] = 999; // block 2 differs: blocks 2.. of the chain differ
        let h2 = block_hashes(&other, 8);
        assert_eq!(h[..2], h2[..2]);
        assert_ne!(h[2], h2[2]);
        assert_ne!(h[4], h2[4], "a chained hash covers every block before it");
        let mut index = PrefixIndex::default();
        index.record("a", &h, 100);
        assert_eq!(index.matched("a", &h), 5);
        assert_eq!(index.matched("a", &h2), 2);
        assert_eq!(index.matched("b", &h), 0);
        // A small group forgets the least recently sent blocks.
        for i in 0..10u32 {
            let p: Vec<u32> = (0..40).map(|t| t + 1000 * (i + 1)).collect();
            index.record("a", &block_hashes(&p, 8), 8);
        }
        assert_eq!(index.matched("a", &h), 0);
        index.forget("a");
        assert_eq!(index.matched("a", &h2), 0);
    }

    #[test]
    fn prefix_hash_looks_at_first_block() {
        assert_eq!(
            prefix_hash(&[1, 2, 3, 4, 5], 4),
            prefix_hash(&[1, 2, 3, 4, 9], 4)
        );
        assert_ne!(prefix_hash(&[1, 2, 3, 4], 4), prefix_hash(&[1, 2, 3, 5], 4));
    }
}
