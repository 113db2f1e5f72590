//! A fixed pool of worker threads for blocking disk requests.
//!
//! Frontends run on async executors (NBD) or event-channel loops (blkif) and must never block
//! there; they hand each [`crate::request::Op`] to this pool. Compared with a thread per
//! request (or `tokio::task::spawn_blocking`), a fixed pool keeps workers busy back to back
//! under load: a worker that finishes a request takes the next one without sleeping, so deep
//! queues cost no thread wake-up per request.

use std::io;
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Default number of workers: enough to keep a few slow devices busy in parallel.
pub const DEFAULT_WORKERS: usize = 16;

/// Worker threads fed by one queue. Dropping the pool lets queued jobs finish, then joins.
#[derive(Debug)]
pub struct WorkerPool {
    tx: Option<crossbeam_channel::Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl WorkerPool {
    /// Start `n` (at least 1) threads named `name-N`.
    ///
    /// # Errors
    /// The OS refused to create a thread.
    pub fn new(n: usize, name: &str) -> io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            let rx = rx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || {
                        while let Ok(job) = rx.recv() {
                            job();
                        }
                    })?,
            );
        }
        Ok(Self {
            tx: Some(tx),
            threads,
        })
    }

    /// Queue `job` for a worker.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        if let Some(tx) = &self.tx {
            // Receivers live as long as the threads, which live until drop: cannot fail.
            let _ = tx.send(Box::new(job));
        }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        drop(self.tx.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn runs_every_job_before_drop_returns() {
        let done = Arc::new(AtomicUsize::new(0));
        let pool = WorkerPool::new(3, "test").unwrap();
        for _ in 0..100 {
            let d = done.clone();
            pool.submit(move || {
                d.fetch_add(1, Ordering::Relaxed);
            });
        }
        drop(pool);
        assert_eq!(done.load(Ordering::Relaxed), 100);
    }
}
