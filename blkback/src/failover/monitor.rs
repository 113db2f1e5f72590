//! Progress and liveness monitoring of one driver connection: pure logic over the events
//! the endpoint reports and the time it passes in, so it is tested with a fake clock.
//!
//! A driver is **faulty** when
//!
//! 1. its connection broke (reported by the endpoint's reader), or
//! 2. no heartbeat arrived for [`MonitorConfig::heartbeat_timeout`], or
//! 3. it is **stuck**: the oldest request it was sent has waited longer than the bound,
//!    a newer request was sent after it (the client keeps issuing), and no request at all
//!    completed within the bound. The bound is `max(floor, k × p99 of recent latencies)`,
//!    capped at `ceiling`, so a disk that is slow but completes requests raises its own
//!    bound and keeps completing, and is never declared stuck.
//!
//! The monitor lives in the endpoint, outside the drivers it watches: a hung driver cannot
//! stop it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Detection settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MonitorConfig {
    /// How often drivers send heartbeats (told to the driver by configuration).
    pub heartbeat_interval: Duration,
    /// No heartbeat for this long: faulty.
    pub heartbeat_timeout: Duration,
    /// Smallest progress bound.
    pub floor: Duration,
    /// Largest progress bound.
    pub ceiling: Duration,
    /// The bound is `k ×` the recent p99 latency (when that is above the floor).
    pub k: f64,
    /// How many recent completions the p99 is taken over.
    pub window: usize,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(100),
            heartbeat_timeout: Duration::from_millis(1000),
            floor: Duration::from_millis(1000),
            ceiling: Duration::from_secs(60),
            k: 4.0,
            window: 1024,
        }
    }
}

/// Why a driver was declared faulty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The connection broke (EOF, reset, a malformed frame).
    Broken,
    /// No heartbeat for this long.
    HeartbeatLost(Duration),
    /// The oldest request waited this long past no progress; the bound in force.
    Stuck { waited: Duration, bound: Duration },
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Broken => f.write_str("connection broke"),
            Fault::HeartbeatLost(d) => write!(f, "no heartbeat for {} ms", d.as_millis()),
            Fault::Stuck { waited, bound } => write!(
                f,
                "oldest request unanswered for {} ms (bound {} ms) with no progress",
                waited.as_millis(),
                bound.as_millis()
            ),
        }
    }
}

/// What the monitor knows about the outstanding requests of the watched driver, taken
/// from the endpoint's in-flight table at check time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Outstanding {
    /// When the oldest unanswered request was sent to this driver.
    pub oldest_sent: Option<Instant>,
    /// When the newest unanswered request was sent.
    pub newest_sent: Option<Instant>,
}

/// The monitor state of one driver connection.
#[derive(Debug)]
pub struct Monitor {
    cfg: MonitorConfig,
    last_heartbeat: Instant,
    last_completion: Instant,
    latencies: VecDeque<Duration>,
    broken: bool,
}

impl Monitor {
    /// Start watching a connection established at `now`.
    pub fn new(cfg: MonitorConfig, now: Instant) -> Self {
        Self {
            cfg,
            last_heartbeat: now,
            last_completion: now,
            latencies: VecDeque::with_capacity(cfg.window.min(4096)),
            broken: false,
        }
    }

    pub fn config(&self) -> &MonitorConfig {
        &self.cfg
    }

    /// A heartbeat arrived.
    pub fn on_heartbeat(&mut self, now: Instant) {
        self.last_heartbeat = self.last_heartbeat.max(now);
    }

    /// A request completed after `latency`.
    pub fn on_completion(&mut self, now: Instant, latency: Duration) {
        self.last_completion = self.last_completion.max(now);
        // Any answer proves the process runs, like a heartbeat.
        self.last_heartbeat = self.last_heartbeat.max(now);
        if self.cfg.window == 0 {
            return;
        }
        if self.latencies.len() == self.cfg.window {
            self.latencies.pop_front();
        }
        self.latencies.push_back(latency);
    }

    /// The connection broke.
    pub fn on_broken(&mut self) {
        self.broken = true;
    }

    /// The 99th percentile of the recent latencies (zero with none).
    pub fn p99(&self) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let mut v: Vec<Duration> = self.latencies.iter().copied().collect();
        let idx = ((v.len() as f64) * 0.99).ceil() as usize;
        let idx = idx.clamp(1, v.len()) - 1;
        let (_, p, _) = v.select_nth_unstable(idx);
        *p
    }

    /// The progress bound in force: `max(floor, k × p99)`, at most `ceiling`.
    pub fn bound(&self) -> Duration {
        let scaled = self.p99().mul_f64(self.cfg.k.max(0.0));
        scaled
            .max(self.cfg.floor)
            .min(self.cfg.ceiling.max(self.cfg.floor))
    }

    /// Check the driver at `now`.
    pub fn check(&self, now: Instant, out: Outstanding) -> Option<Fault> {
        if self.broken {
            return Some(Fault::Broken);
        }
        let silent = now.saturating_duration_since(self.last_heartbeat);
        if silent > self.cfg.heartbeat_timeout {
            return Some(Fault::HeartbeatLost(silent));
        }
        let (Some(oldest), Some(newest)) = (out.oldest_sent, out.newest_sent) else {
            return None;
        };
        let bound = self.bound();
        let waited = now.saturating_duration_since(oldest);
        let issuing = newest > oldest;
        let no_progress = now.saturating_duration_since(self.last_completion) > bound;
        if waited > bound && issuing && no_progress {
            return Some(Fault::Stuck { waited, bound });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn cfg() -> MonitorConfig {
        MonitorConfig {
            heartbeat_interval: 100 * MS,
            heartbeat_timeout: 1000 * MS,
            floor: 500 * MS,
            ceiling: 60_000 * MS,
            k: 4.0,
            window: 128,
        }
    }

    /// A slow disk: each request takes 3 s (six times the floor), requests queue behind one
    /// another (depth 8, so the oldest waits up to 24 s), heartbeats keep coming. Over ten
    /// simulated minutes, checked every 10 ms, it is never declared faulty.
    #[test]
    fn slow_but_progressing_driver_is_never_faulty() {
        let t0 = Instant::now();
        let mut m = Monitor::new(cfg(), t0);
        let service = 3000 * MS;
        let depth = 8u32;
        // The client keeps `depth` requests queued: the first `depth` are sent at t0, and
        // request i ≥ depth when request i - depth completes. The disk serves one at a time,
        // so request i completes at (i + 1) × service and waits up to depth × service.
        let mut next_done = 0u32;
        let mut sent = 0u32;
        let mut now = t0;
        let end = t0 + Duration::from_secs(600);
        let send_time = |i: u32| t0 + service * i.saturating_sub(depth - 1);
        while now < end {
            while sent < next_done + depth {
                sent += 1;
            }
            let done_at = t0 + service * (next_done + 1);
            if done_at <= now {
                m.on_completion(done_at, done_at - send_time(next_done));
                next_done += 1;
                continue;
            }
            if (now - t0).as_millis() % 100 == 0 {
                m.on_heartbeat(now);
            }
            let out = Outstanding {
                oldest_sent: Some(send_time(next_done)),
                newest_sent: Some(send_time(sent - 1)),
            };
            assert_eq!(m.check(now, out), None, "at {:?}", now - t0);
            now += 10 * MS;
        }
        assert!(next_done > 150);
        // The bound followed the latency up.
        assert!(m.bound() > 20_000 * MS, "bound {:?}", m.bound());
    }

    /// A driver that answered quickly, then stops answering while heartbeats go on and the
    /// client keeps issuing: declared stuck after the bound, and not before.
    #[test]
    fn stuck_driver_is_faulty_within_the_bound() {
        let t0 = Instant::now();
        let mut m = Monitor::new(cfg(), t0);
        for i in 0..200u32 {
            let t = t0 + MS * i;
            m.on_completion(t, 2 * MS);
        }
        let stuck_at = t0 + 200 * MS;
        let bound = m.bound();
        assert_eq!(bound, 500 * MS, "floor applies to a fast disk");
        let mut now = stuck_at;
        let mut declared = None;
        while now < stuck_at + Duration::from_secs(5) {
            m.on_heartbeat(now);
            let out = Outstanding {
                oldest_sent: Some(stuck_at),
                newest_sent: Some(now.max(stuck_at + MS)),
            };
            if let Some(f) = m.check(now, out) {
                declared = Some((now - stuck_at, f));
                break;
            }
            now += 10 * MS;
        }
        let (after, fault) = declared.expect("a stuck driver is declared faulty");
        assert!(matches!(fault, Fault::Stuck { .. }), "{fault}");
        assert!(after > bound, "not before the bound: {after:?}");
        assert!(after <= bound + 20 * MS, "within the bound: {after:?}");
    }

    /// One request outstanding and nothing newer: the progress rule waits (the client is not
    /// issuing), only the heartbeat rule applies.
    #[test]
    fn a_lone_long_request_is_not_stuck_while_heartbeats_come() {
        let t0 = Instant::now();
        let mut m = Monitor::new(cfg(), t0);
        let now = t0 + Duration::from_secs(30);
        m.on_heartbeat(now);
        let out = Outstanding {
            oldest_sent: Some(t0),
            newest_sent: Some(t0),
        };
        assert_eq!(m.check(now, out), None);
    }

    #[test]
    fn lost_heartbeat_and_broken_connection_are_faults() {
        let t0 = Instant::now();
        let mut m = Monitor::new(cfg(), t0);
        assert_eq!(m.check(t0 + 900 * MS, Outstanding::default()), None);
        assert!(matches!(
            m.check(t0 + 1100 * MS, Outstanding::default()),
            Some(Fault::HeartbeatLost(_))
        ));
        m.on_heartbeat(t0 + 1100 * MS);
        assert_eq!(m.check(t0 + 1200 * MS, Outstanding::default()), None);
        m.on_broken();
        assert_eq!(
            m.check(t0 + 1200 * MS, Outstanding::default()),
            Some(Fault::Broken)
        );
    }

    #[test]
    fn bound_is_floor_then_k_times_p99_capped() {
        let t0 = Instant::now();
        let mut m = Monitor::new(cfg(), t0);
        assert_eq!(m.bound(), 500 * MS);
        for _ in 0..99 {
            m.on_completion(t0, 10 * MS);
        }
        m.on_completion(t0, 400 * MS);
        // p99 of 100 samples is the 99th smallest: 10 ms.
        assert_eq!(m.p99(), 10 * MS);
        for _ in 0..10 {
            m.on_completion(t0, 400 * MS);
        }
        assert_eq!(m.p99(), 400 * MS);
        assert_eq!(m.bound(), 1600 * MS);
        for _ in 0..200 {
            m.on_completion(t0, Duration::from_secs(100));
        }
        assert_eq!(m.bound(), Duration::from_secs(60));
    }
}
