//! The open loop's schedule, for `--rate`: a pacer thread releases requests as they fall due,
//! whatever the latency. (Without `--rate`, each worker sends its next request as soon as
//! the last answers.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Under `--rate`, how many requests one worker may have outstanding. Past it, requests
/// fall behind their schedule, and their latency still counts from when they were due.
pub(crate) const OPEN_LOOP_IN_FLIGHT: usize = 64;

/// How often the open loop's pacer releases the requests that have fallen due. tokio's
/// timers tick every millisecond, which would send each millisecond's requests in one
/// burst; a thread of its own can release them in smaller, steadier steps.
const PACER_STEP: Duration = Duration::from_micros(100);

/// The open loop's schedule: request `k` is due at `start + k / rate`. A pacer thread
/// releases each request once it is due; workers take them in order.
pub(crate) struct Schedule {
    start: Instant,
    every: Duration,
    released: tokio::sync::Semaphore,
    taken: AtomicUsize,
}

impl Schedule {
    /// Starts the pacer thread: `rate` requests per second until `stop_at`.
    pub(crate) fn start(rate: u32, stop_at: Instant) -> Arc<Schedule> {
        let schedule = Arc::new(Schedule {
            start: Instant::now(),
            every: Duration::from_secs_f64(1.0 / f64::from(rate.max(1))),
            released: tokio::sync::Semaphore::new(0),
            taken: AtomicUsize::new(0),
        });
        let pacer = schedule.clone();
        std::thread::Builder::new()
            .name("pacer".into())
            .spawn(move || pacer.pace(stop_at))
            .expect("a thread for the pacer");
        schedule
    }

    /// Releases every request due by now, in steps of [`PACER_STEP`], until `stop_at`.
    fn pace(&self, stop_at: Instant) {
        let mut released = 0usize;
        loop {
            let now = Instant::now();
            if now >= stop_at {
                self.released.close();
                return;
            }
            let due = (now.duration_since(self.start).as_nanos() / self.every.as_nanos().max(1))
                as usize
                + 1;
            self.released.add_permits(due - released);
            released = due;
            std::thread::sleep(PACER_STEP);
        }
    }

    /// Waits for the next request to fall due; when it was due. `None` once the run is over.
    pub(crate) async fn next(&self) -> Option<Instant> {
        self.released.acquire().await.ok()?.forget();
        let k = self.taken.fetch_add(1, Ordering::Relaxed);
        Some(self.start + self.every.mul_f64(k as f64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_open_loop_schedule_hands_out_each_due_time_once_in_order_then_ends() {
        let rate = 10_000;
        let schedule = Schedule::start(rate, Instant::now() + Duration::from_millis(100));
        let mut due = Vec::new();
        while let Some(t) = schedule.next().await {
            due.push(t);
        }
        assert!(!due.is_empty(), "the pacer released nothing");
        assert_eq!(due[0], schedule.start);
        let every = Duration::from_secs(1) / rate;
        for pair in due.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap.abs_diff(every) < Duration::from_micros(1),
                "gap {gap:?}"
            );
        }
        assert!(
            schedule.next().await.is_none(),
            "a closed schedule stays closed"
        );
    }
}
