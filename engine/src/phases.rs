//! Where a dump's or a restore's time goes: each phase's wall time, in
//! order, as `--stats FILE` and the benchmark report them (the fixed
//! costs of a small tree, say: seizing, the parasite, metadata, fsync).

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

/// The phases timed so far, each from the end of the one before.
#[derive(Debug, Clone)]
pub struct Phases {
    last: Instant,
    pub done: Vec<(&'static str, Duration)>,
}

impl Default for Phases {
    fn default() -> Phases {
        Phases::start()
    }
}

impl Phases {
    /// A clock started now.
    pub fn start() -> Phases {
        Phases {
            last: Instant::now(),
            done: Vec::new(),
        }
    }

    /// Phase `name` ended now.
    pub fn end(&mut self, name: &'static str) {
        let now = Instant::now();
        self.done.push((name, now - self.last));
        self.last = now;
    }

    /// Milliseconds of each phase, by name, in order.
    pub fn millis(&self) -> Vec<(&'static str, f64)> {
        self.done
            .iter()
            .map(|(n, d)| (*n, d.as_secs_f64() * 1e3))
            .collect()
    }
}
