//! Collectives between the ranks of a tensor-parallel group. [`Communicator`] is what a rank's backend calls;
//! [`CpuGroup`] implements it in process for CPU ranks (threads): every rank copies its part into a shared slot, and
//! after a barrier every rank reduces the slots **in rank order**, so all ranks get bitwise-identical results.
//! Collectives time out (a stuck or dead rank becomes an error, never a hang), and a rank that fails aborts the group
//! so the others' collectives return at once.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Why a collective failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommError {
    #[error("collective timed out after {0:?}: a rank is stuck or gone")]
    Timeout(Duration),
    #[error("the tensor-parallel group was aborted: {0}")]
    Aborted(String),
}

/// Runs `work` (a blocking call that waits for the other ranks, such as joining an NCCL group) on a thread of its
/// own, and waits for it at most `timeout`, returning early with [`CommError::Aborted`] when `aborted` gives a reason
/// (checked every few milliseconds). A call that never returns is abandoned: its thread is left to the process
/// exit, which a failed start-up leads to.
pub fn run_bounded<T: Send + 'static>(
    name: &str,
    timeout: Duration,
    aborted: &dyn Fn() -> Option<String>,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, CommError> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let _ = tx.send(work());
        })
        .map_err(|e| CommError::Aborted(format!("spawning {name}: {e}")))?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(why) = aborted() {
            return Err(CommError::Aborted(why));
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(CommError::Timeout(timeout));
        }
        match rx.recv_timeout((deadline - now).min(Duration::from_millis(5))) {
            Ok(value) => return Ok(value),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err(CommError::Aborted(format!("{name} panicked"))),
        }
    }
}

/// One rank's handle on its group.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Sums `buf` elementwise over all ranks; every rank ends with the same bits.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError>;
    /// Every rank's `local` (lengths may differ), concatenated in rank order into `out`, on every rank.
    fn all_gather(&self, local: &[f32], out: &mut Vec<f32>) -> Result<(), CommError>;
    fn barrier(&self) -> Result<(), CommError>;
    /// Fails the group: pending and later collectives on every rank return [`CommError::Aborted`].
    fn abort(&self, why: &str);
}

struct State {
    slots: Vec<Vec<f32>>,
    arrived: usize,
    generation: u64,
    aborted: Option<String>,
}

struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    cv: Condvar,
}

/// The in-process group: create it once, hand one [`CpuComm`] to each rank thread.
pub struct CpuGroup;

impl CpuGroup {
    /// Handles for ranks `0..world`; a collective waiting longer than `timeout` for the others fails.
    pub fn create(world: usize, timeout: Duration) -> Vec<CpuComm> {
        let shared = Arc::new(Shared {
            world,
            timeout,
            state: Mutex::new(State { slots: vec![Vec::new(); world], arrived: 0, generation: 0, aborted: None }),
            cv: Condvar::new(),
        });
        (0..world).map(|rank| CpuComm { rank, shared: Arc::clone(&shared) }).collect()
    }
}

/// One rank of a [`CpuGroup`].
pub struct CpuComm {
    rank: usize,
    shared: Arc<Shared>,
}

impl CpuComm {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking rank cannot leave the state half-updated in a way the others rely on: recover the guard.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until every rank has arrived (with `st` held on entry and on return).
    fn wait_all<'a>(&'a self, mut st: MutexGuard<'a, State>) -> Result<MutexGuard<'a, State>, CommError> {
        if let Some(why) = &st.aborted {
            return Err(CommError::Aborted(why.clone()));
        }
        let generation = st.generation;
        st.arrived += 1;
        if st.arrived == self.shared.world {
            st.arrived = 0;
            st.generation += 1;
            self.shared.cv.notify_all();
            return Ok(st);
        }
        let deadline = Instant::now() + self.shared.timeout;
        loop {
            if let Some(why) = &st.aborted {
                return Err(CommError::Aborted(why.clone()));
            }
            if st.generation != generation {
                return Ok(st);
            }
            let now = Instant::now();
            if now >= deadline {
                let why = format!("rank {} waited {:?} for the other ranks", self.rank, self.shared.timeout);
                st.aborted = Some(why);
                self.shared.cv.notify_all();
                return Err(CommError::Timeout(self.shared.timeout));
            }
            st = self.shared.cv.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn exchange(&self, local: &[f32]) -> Result<MutexGuard<'_, State>, CommError> {
        let mut st = self.lock();
        let slot = &mut st.slots[self.rank];
        slot.clear();
        slot.extend_from_slice(local);
        self.wait_all(st)
    }
}

impl Communicator for CpuComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        if self.shared.world == 1 {
            return Ok(());
        }
        let st = self.exchange(buf)?;
        buf.fill(0.0);
        for slot in &st.slots {
            for (b, v) in buf.iter_mut().zip(slot) {
                *b += v;
            }
        }
        // Nobody may overwrite a slot before every rank has read them all.
        self.wait_all(st).map(drop)
    }

    fn all_gather(&self, local: &[f32], out: &mut Vec<f32>) -> Result<(), CommError> {
        out.clear();
        if self.shared.world == 1 {
            out.extend_from_slice(local);
            return Ok(());
        }
        let st = self.exchange(local)?;
        for slot in &st.slots {
            out.extend_from_slice(slot);
        }
        self.wait_all(st).map(drop)
    }

    fn barrier(&self) -> Result<(), CommError> {
        let st = self.lock();
        self.wait_all(st).map(drop)
    }

    fn abort(&self, why: &str) {
        let mut st = self.lock();
        if st.aborted.is_none() {
            st.aborted = Some(format!("rank {}: {why}", self.rank));
        }
        self.shared.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bounded_call_returns_its_value_times_out_or_is_aborted() {
        let never = || None;
        assert_eq!(run_bounded("quick", Duration::from_secs(5), &never, || 7), Ok(7));
        // A join whose peers never come: the caller gets a timeout, the stuck thread is abandoned.
        let (_keep, rx) = std::sync::mpsc::channel::<()>();
        let started = Instant::now();
        let stuck = run_bounded("stuck", Duration::from_millis(50), &never, move || rx.recv().is_ok());
        assert_eq!(stuck, Err(CommError::Timeout(Duration::from_millis(50))));
        assert!(started.elapsed() < Duration::from_secs(2));
        // Another rank fails the group meanwhile: the wait ends at once with its reason.
        let (_keep, rx) = std::sync::mpsc::channel::<()>();
        let flag = Arc::new(Mutex::new(None::<String>));
        let setter = Arc::clone(&flag);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            *setter.lock().unwrap() = Some("rank 1 failed to load".into());
        });
        let started = Instant::now();
        let out = run_bounded("stuck", Duration::from_secs(60), &|| flag.lock().unwrap().clone(), move || rx.recv().is_ok());
        assert_eq!(out, Err(CommError::Aborted("rank 1 failed to load".into())));
        assert!(started.elapsed() < Duration::from_secs(2));
        // A panicking call is an error, not a hang.
        let out = run_bounded("panics", Duration::from_secs(60), &never, || -> u8 { panic!("boom") });
        assert!(matches!(out, Err(CommError::Aborted(ref m)) if m.contains("panicked")), "{out:?}");
    }

    fn run<T: Send + 'static>(world: usize, timeout: Duration, f: impl Fn(CpuComm) -> T + Send + Sync + 'static) -> Vec<T> {
        let f = Arc::new(f);
        let handles: Vec<_> = CpuGroup::create(world, timeout)
            .into_iter()
            .map(|c| {
                let f = Arc::clone(&f);
                std::thread::spawn(move || f(c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
    }

    #[test]
    fn all_reduce_is_identical_on_every_rank_and_repeatable() {
        let out = run(3, Duration::from_secs(10), |c| {
            let mut results = Vec::new();
            for step in 0..50 {
                let mut buf: Vec<f32> = (0..7).map(|i| (c.rank() * 100 + i + step) as f32 * 0.1).collect();
                c.all_reduce_sum(&mut buf).unwrap();
                results.push(buf);
            }
            results
        });
        assert_eq!(out[0], out[1]);
        assert_eq!(out[1], out[2]);
        let want: f32 = (0..3).map(|r| (r * 100 + 3) as f32 * 0.1).sum();
        assert_eq!(out[0][0][3], want);
    }

    #[test]
    fn all_gather_concatenates_in_rank_order() {
        let out = run(3, Duration::from_secs(10), |c| {
            let local: Vec<f32> = vec![c.rank() as f32; c.rank() + 1];
            let mut all = Vec::new();
            c.all_gather(&local, &mut all).unwrap();
            all
        });
        for o in out {
            assert_eq!(o, vec![0.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
        }
    }

    #[test]
    fn a_missing_rank_times_out_and_an_abort_reaches_everyone() {
        let out = run(3, Duration::from_millis(200), |c| {
            if c.rank() == 2 {
                return Ok(()); // never joins
            }
            c.barrier()
        });
        assert!(out[0].is_err() && out[1].is_err(), "{out:?}");
        let out = run(3, Duration::from_secs(30), |c| {
            if c.rank() == 1 {
                c.abort("load failed");
                return Err(CommError::Aborted("self".into()));
            }
            let mut b = [1.0f32];
            c.all_reduce_sum(&mut b)
        });
        for o in [&out[0], &out[2]] {
            assert!(matches!(o, Err(CommError::Aborted(w)) if w.contains("load failed")), "{o:?}");
        }
    }
}
