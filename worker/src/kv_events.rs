//! The worker's KV event log: the prefix-cache index changes (`Stored`/`Removed` block hashes) the engine publishes,
//! numbered and kept in a bounded ring so a router that reconnects resumes where it stopped (`KvEvents` in
//! `common/proto/worker.proto`).
//!
//! - The block pool records the changes ([`BlockEvent`]); the engine core hands them over with each step; the engine
//!   thread calls [`KvEventLog::publish`], which takes a mutex for the time of a `VecDeque` append and bumps a
//!   `watch` so subscribers wake up. No await, no IO: the engine thread never waits on a subscriber.
//! - Every block hash takes one sequence number, from 1. The ring keeps the last `capacity` of them (65,536 by
//!   default); older ones fall off the front.
//! - Beside the ring, the log keeps the set of hashes live after its last event, so a full dump (`Cleared` + one
//!   `Stored` of that set) is consistent with a sequence number and never needs the engine thread.
//! - [`KvEventLog::read`] answers a subscriber: the events after the sequence number it last applied, or a
//!   [`KvRead::Resync`] when that number has fallen off the ring or is ahead of the log (a restarted worker);
//!   [`KvEventLog::dump`] is the resync a `since_seq` of 0 asks for.
//!   The gRPC stream (`crate::service`) turns reads into `KvEventBatch`es with [`batch`].

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use ferrite_common::proto::worker as pb;
use tokio::sync::watch;

pub use crate::engine::step::BlockEvent;

/// Events the ring keeps by default (about 64 k, the figure of the design doc).
pub const DEFAULT_CAPACITY: usize = 65_536;

/// See the module docs. Shared (`Arc`) by the engine thread, which publishes, and the gRPC streams, which read.
#[derive(Debug)]
pub struct KvEventLog {
    ring: Mutex<Ring>,
    /// The last sequence number published (0: none yet); subscribers wait on it.
    last_seq: watch::Sender<u64>,
    /// This log's identity (random, never 0): sequence numbers mean nothing across instances.
    instance: u64,
}

#[derive(Debug)]
struct Ring {
    capacity: usize,
    events: VecDeque<BlockEvent>,
    /// Sequence number of `events[0]` (of the next event when empty).
    first_seq: u64,
    /// The hashes stored and not removed since, after the last event: what a full dump sends.
    live: HashSet<u64>,
}

impl Ring {
    fn last_seq(&self) -> u64 {
        self.first_seq + self.events.len() as u64 - 1
    }
}

/// What a subscriber gets from [`KvEventLog::read`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvRead {
    /// The events after the requested sequence number, the first numbered `first_seq` (empty: nothing new).
    Events { first_seq: u64, events: Vec<BlockEvent> },
    /// The requested number is not in the ring: every hash held after event `last_seq`, in no particular order.
    Resync { last_seq: u64, hashes: Vec<u64> },
}

impl KvEventLog {
    /// An empty log whose ring keeps the last `capacity` events (at least 1).
    pub fn new(capacity: usize) -> Self {
        let ring = Ring { capacity: capacity.max(1), events: VecDeque::new(), first_seq: 1, live: HashSet::new() };
        Self { ring: Mutex::new(ring), last_seq: watch::Sender::new(0), instance: rand::random::<u64>() | 1 }
    }

    /// This log's identity (`WorkerInfo.instance_id`).
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// Appends events (numbered on from the last one) and wakes subscribers; does nothing for none.
    pub fn publish(&self, events: impl IntoIterator<Item = BlockEvent>) {
        let last = {
            let mut r = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            let before = r.last_seq();
            for e in events {
                match e {
                    BlockEvent::Stored(h) => r.live.insert(h),
                    BlockEvent::Removed(h) => r.live.remove(&h),
                };
                if r.events.len() == r.capacity {
                    r.events.pop_front();
                    r.first_seq += 1;
                }
                r.events.push_back(e);
            }
            let last = r.last_seq();
            if last == before {
                return;
            }
            last
        };
        self.last_seq.send_replace(last);
    }

    /// Wakes the subscribers without new events: the engine's load changed (a request ended and its blocks went
    /// back to the pool), so each sends a fresh load report now rather than at the next tick. A router that saw the
    /// ended request's blocks as used would otherwise steer the next request of the same prefix away from the
    /// worker that caches it.
    pub fn touch(&self) {
        self.last_seq.send_modify(|_| {});
    }

    /// The last sequence number published (0: none yet).
    pub fn last_seq(&self) -> u64 {
        *self.last_seq.borrow()
    }

    /// A receiver that changes whenever events are published.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.last_seq.subscribe()
    }

    /// The events after `since_seq` (the last one the subscriber applied; 0: none), at most `max` of them; or a
    /// resync when `since_seq` has fallen off the ring or is ahead of the log.
    pub fn read(&self, since_seq: u64, max: usize) -> KvRead {
        let r = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let last = r.last_seq();
        if since_seq > last || since_seq + 1 < r.first_seq {
            return KvRead::Resync { last_seq: last, hashes: r.live.iter().copied().collect() };
        }
        let skip = (since_seq + 1 - r.first_seq) as usize;
        KvRead::Events { first_seq: since_seq + 1, events: r.events.iter().skip(skip).take(max).copied().collect() }
    }

    /// A full dump: every hash held after the last event (what a `since_seq` of 0 asks for).
    pub fn dump(&self) -> KvRead {
        let r = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        KvRead::Resync { last_seq: r.last_seq(), hashes: r.live.iter().copied().collect() }
    }
}

/// Proto events for `events`, runs of the same kind merged into one `Stored` or `Removed`.
pub fn to_proto(events: &[BlockEvent]) -> Vec<pb::KvEvent> {
    use pb::kv_event::E;
    let mut out: Vec<pb::KvEvent> = Vec::new();
    for e in events {
        match (e, out.last_mut().and_then(|k| k.e.as_mut())) {
            (BlockEvent::Stored(h), Some(E::Stored(s))) => s.block_hashes.push(*h),
            (BlockEvent::Removed(h), Some(E::Removed(r))) => r.block_hashes.push(*h),
            (BlockEvent::Stored(h), _) => out.push(pb::KvEvent { e: Some(E::Stored(pb::Stored { block_hashes: vec![*h] })) }),
            (BlockEvent::Removed(h), _) => out.push(pb::KvEvent { e: Some(E::Removed(pb::Removed { block_hashes: vec![*h] })) }),
        }
    }
    out
}

/// The batch for a read, and the sequence number the subscriber is at after applying it.
pub fn batch(read: KvRead, load: Option<pb::LoadReport>) -> (pb::KvEventBatch, u64) {
    use pb::kv_event::E;
    match read {
        KvRead::Events { first_seq, events } => {
            let at = first_seq + events.len() as u64 - 1;
            (pb::KvEventBatch { first_seq, events: to_proto(&events), load, resync: false }, at)
        }
        KvRead::Resync { last_seq, hashes } => {
            let events = vec![
                pb::KvEvent { e: Some(E::Cleared(pb::Cleared {})) },
                pb::KvEvent { e: Some(E::Stored(pb::Stored { block_hashes: hashes })) },
            ];
            (pb::KvEventBatch { first_seq: last_seq + 1, events, load, resync: true }, last_seq)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::BlockEvent::{Removed, Stored};
    use super::*;

    fn sorted(mut v: Vec<u64>) -> Vec<u64> {
        v.sort_unstable();
        v
    }

    #[test]
    fn replays_from_a_sequence_number_in_the_ring() {
        let log = KvEventLog::new(8);
        assert_eq!(log.dump(), KvRead::Resync { last_seq: 0, hashes: vec![] });
        assert_eq!(log.read(0, 100), KvRead::Events { first_seq: 1, events: vec![] }, "after an empty dump: nothing new");
        log.publish([Stored(1), Stored(2), Removed(1)]);
        log.publish([]);
        assert_eq!(log.last_seq(), 3, "publishing nothing takes no number");
        assert_eq!(log.read(1, 100), KvRead::Events { first_seq: 2, events: vec![Stored(2), Removed(1)] });
        assert_eq!(log.read(1, 1), KvRead::Events { first_seq: 2, events: vec![Stored(2)] }, "at most max");
        assert_eq!(log.read(3, 100), KvRead::Events { first_seq: 4, events: vec![] }, "up to date");
        assert_eq!(log.read(0, 100), KvRead::Events { first_seq: 1, events: vec![Stored(1), Stored(2), Removed(1)] });
        assert_eq!(log.dump(), KvRead::Resync { last_seq: 3, hashes: vec![2] });
    }

    #[test]
    fn a_gap_or_a_number_ahead_of_the_log_resyncs_with_a_dump() {
        let log = KvEventLog::new(4);
        log.publish((1..=6).map(Stored)); // seqs 1..=6; the ring holds 3..=6
        log.publish([Removed(2)]); // seq 7; the ring holds 4..=7
        let dump = KvRead::Resync { last_seq: 7, hashes: vec![1, 3, 4, 5, 6] };
        let resync = |r: KvRead| match r {
            KvRead::Resync { last_seq, hashes } => KvRead::Resync { last_seq, hashes: sorted(hashes) },
            other => other,
        };
        assert_eq!(resync(log.read(2, 100)), dump, "seq 3 fell off the ring");
        assert_eq!(log.read(3, 100), KvRead::Events { first_seq: 4, events: vec![Stored(4), Stored(5), Stored(6), Removed(2)] });
        assert_eq!(resync(log.read(8, 100)), dump, "a number the log has not reached (another worker process)");
    }

    #[test]
    fn batches_merge_runs_and_say_where_the_subscriber_is() {
        use pb::kv_event::E;
        let (b, at) = batch(KvRead::Events { first_seq: 5, events: vec![Stored(1), Stored(2), Removed(3), Stored(4)] }, None);
        assert_eq!((b.first_seq, b.resync, at), (5, false, 8));
        let kinds: Vec<_> = b.events.into_iter().map(|e| e.e.unwrap()).collect();
        assert_eq!(
            kinds,
            [
                E::Stored(pb::Stored { block_hashes: vec![1, 2] }),
                E::Removed(pb::Removed { block_hashes: vec![3] }),
                E::Stored(pb::Stored { block_hashes: vec![4] })
            ]
        );
        let (b, at) = batch(KvRead::Resync { last_seq: 9, hashes: vec![7] }, None);
        assert_eq!((b.first_seq, b.resync, at), (10, true, 9));
        assert_eq!(b.events[0].e, Some(E::Cleared(pb::Cleared {})));
        assert_eq!(b.events[1].e, Some(E::Stored(pb::Stored { block_hashes: vec![7] })));
    }

    #[tokio::test]
    async fn publishing_wakes_subscribers() {
        let log = std::sync::Arc::new(KvEventLog::new(8));
        let mut rx = log.subscribe();
        let l = std::sync::Arc::clone(&log);
        std::thread::spawn(move || l.publish([Stored(9)]));
        tokio::time::timeout(std::time::Duration::from_secs(5), rx.changed()).await.expect("woken").unwrap();
        assert_eq!(*rx.borrow(), 1);
    }

    #[tokio::test]
    async fn touch_wakes_subscribers_without_events() {
        let log = KvEventLog::new(8);
        log.publish([Stored(9)]);
        let mut rx = log.subscribe();
        rx.borrow_and_update();
        log.touch();
        tokio::time::timeout(std::time::Duration::from_secs(5), rx.changed()).await.expect("woken").unwrap();
        assert_eq!(log.last_seq(), 1, "no event was added");
    }
}
