//! The router's guesses of which blocks a worker holds, each with a time to live.
//!
//! - For a worker that sends no KV events (design doc §6, Dynamo's "approximate" indexer) they are all there is:
//!   the router assumes a worker holds the blocks of every prompt it routed there, for `--approx-kv-ttl`.
//! - For a worker that does, they cover the gap between routing a prompt and the worker's `Stored` events for its
//!   blocks (its queue and prefill): without them, requests of one prefix that arrive together are spread over
//!   several workers, none of which holds the prefix yet. Events confirm guesses ([`ApproxBlocks::confirm`]); an
//!   unconfirmed guess expires after a short TTL (the request failed, or went elsewhere in the worker's cache).
//!
//! The guess is stored in the same [`crate::kv_index::KvIndex`] as event-fed entries, so the cost function needs no
//! second path; this module only remembers when each guessed hash expires. Routing the same prefix again refreshes
//! it. Expiry is amortized O(1): hashes wait in a queue in routing order (the TTL is fixed, so that is expiry order),
//! and a popped hash is dropped only if it was not refreshed since.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Which hashes a router guesses one worker holds, and until when.
#[derive(Debug, Default)]
pub struct ApproxBlocks {
    /// Hash → its latest expiry.
    expiry: HashMap<u64, Instant>,
    /// (expiry, hash) in the order they were routed; stale pairs (refreshed since) are skipped when popped.
    queue: VecDeque<(Instant, u64)>,
}

impl ApproxBlocks {
    /// The worker was sent a prompt with these block hashes at `now`: they count as held until `now + ttl`.
    pub fn touch(&mut self, hashes: &[u64], now: Instant, ttl: Duration) {
        let until = now + ttl;
        for &h in hashes {
            self.expiry.insert(h, until);
            self.queue.push_back((until, h));
        }
    }

    /// The worker reported these hashes itself (stored or removed): they are no longer guesses, and their expiry
    /// must not touch them.
    pub fn confirm(&mut self, hashes: &[u64]) {
        if self.expiry.is_empty() {
            return;
        }
        for h in hashes {
            self.expiry.remove(h);
        }
    }

    /// Removes and returns the hashes whose time to live has passed at `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<u64> {
        let mut gone = Vec::new();
        while let Some(&(until, h)) = self.queue.front() {
            if until > now {
                break;
            }
            self.queue.pop_front();
            if self.expiry.get(&h) == Some(&until) {
                self.expiry.remove(&h);
                gone.push(h);
            }
        }
        gone
    }

    /// Forgets everything (the worker restarted or could not be reached).
    pub fn clear(&mut self) {
        self.expiry.clear();
        self.queue.clear();
    }

    /// How many hashes are guessed held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.expiry.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.expiry.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_expire_after_their_ttl_unless_routed_again() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut a = ApproxBlocks::default();
        a.touch(&[1, 2, 3], t0, ttl);
        a.touch(&[1, 4], t0 + Duration::from_secs(5), ttl); // 1 is refreshed, 4 is new
        assert_eq!(a.len(), 4);
        assert!(a.expire(t0 + Duration::from_secs(9)).is_empty(), "nothing is due before its TTL");
        let mut gone = a.expire(t0 + Duration::from_secs(10));
        gone.sort_unstable();
        assert_eq!(gone, vec![2, 3], "1 was refreshed at t0+5: it stays");
        assert_eq!(a.len(), 2);
        let mut gone = a.expire(t0 + Duration::from_secs(15));
        gone.sort_unstable();
        assert_eq!(gone, vec![1, 4]);
        assert!(a.is_empty() && a.queue.is_empty(), "stale queue entries are dropped too");
    }

    #[test]
    fn confirmed_hashes_never_expire_as_guesses() {
        let t0 = Instant::now();
        let mut a = ApproxBlocks::default();
        a.touch(&[1, 2, 3], t0, Duration::from_secs(1));
        a.confirm(&[2, 9]);
        let mut gone = a.expire(t0 + Duration::from_secs(1));
        gone.sort_unstable();
        assert_eq!(gone, vec![1, 3]);
    }

    #[test]
    fn clear_forgets_everything() {
        let t0 = Instant::now();
        let mut a = ApproxBlocks::default();
        a.touch(&[7, 8], t0, Duration::from_secs(1));
        a.clear();
        assert!(a.is_empty());
        assert!(a.expire(t0 + Duration::from_secs(2)).is_empty());
    }
}
