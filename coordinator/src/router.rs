//! Routing a request to a group: the group with the most free KV capacity (blocks not
//! reserved by its running batch nor wanted by its queue). Groups within 1/16 of the best
//! count as tied. Among tied groups prefix affinity wins (a group that recently got a
//! request with the same first prompt block probably holds those blocks in its prefix
//! cache), else the one with the fewest requests, else the next in turn: idle groups
//! take turns, so a group that just joined gets work at once even when the others are
//! idle too.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

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

/// Index of the chosen candidate: see the module doc. `turn` rotates the last tie-break
/// (a counter the caller bumps per request); `candidates` come in a stable order.
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

    #[test]
    fn prefix_hash_looks_at_first_block() {
        assert_eq!(
            prefix_hash(&[1, 2, 3, 4, 5], 4),
            prefix_hash(&[1, 2, 3, 4, 9], 4)
        );
        assert_ne!(prefix_hash(&[1, 2, 3, 4], 4), prefix_hash(&[1, 2, 3, 5], 4));
    }
}
