//! Routing a request to a group: the group with the most free KV capacity (blocks not
//! reserved by its running batch nor wanted by its queue), with prefix affinity as the
//! tie-breaker: a group that recently got a request with the same first prompt block
//! probably holds those blocks in its prefix cache.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// What the router knows of a group when it picks.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub key: String,
    /// Free capacity in blocks (may be negative when the queue wants more than exists).
    pub free: i64,
    pub total: i64,
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

/// Index of the chosen candidate. Groups within 1/16 of the best free capacity count as
/// tied; among them the affinity group wins, else the freest.
pub fn pick(candidates: &[Candidate], affinity: Option<&str>) -> Option<usize> {
    let best = candidates.iter().enumerate().max_by_key(|(_, c)| c.free)?;
    if let Some(key) = affinity
        && let Some((i, c)) = candidates.iter().enumerate().find(|(_, c)| c.key == key)
    {
        let slack = (best.1.total / 16).max(1);
        if c.free >= best.1.free - slack {
            return Some(i);
        }
    }
    Some(best.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(key: &str, free: i64) -> Candidate {
        Candidate {
            key: key.into(),
            free,
            total: 160,
        }
    }

    #[test]
    fn most_free_capacity_wins() {
        assert_eq!(pick(&[c("a", 10), c("b", 50)], None), Some(1));
        assert_eq!(pick(&[], None), None);
    }

    #[test]
    fn affinity_breaks_near_ties_only() {
        assert_eq!(pick(&[c("a", 45), c("b", 50)], Some("a")), Some(0));
        assert_eq!(pick(&[c("a", 10), c("b", 50)], Some("a")), Some(1));
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
