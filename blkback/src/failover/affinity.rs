//! The channel's two readers on one CPU.
//!
//! Every batch of requests crosses the channel twice: the driver's connection reader takes
//! the requests, the endpoint's reply reader takes the answers. When the two threads run on
//! different CPUs, each batch wakes a thread on the other CPU, and on a virtual machine that
//! wake-up (an inter-processor interrupt through the hypervisor) costs about as much as the
//! small request itself. Pinning both readers of a disk to the same CPU turns it into a
//! wake-up on the CPU the waker is running on (docs/failover.md, "The two readers on one
//! CPU"). The endpoint and its drivers pin their own readers; the operator gives them the
//! same CPU (`reader_cpu` in `remoca up`, `--reader-cpu` on the commands). The driver keeps
//! its workers, which run the large requests and flushes, off that CPU, so a long copy
//! never stands between a reader and the one CPU it may run on.

use std::io;

use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};

/// Check that this process may run on `cpu`, so a bad setting fails at start with its
/// reason instead of in a reader thread later.
///
/// # Errors
/// `cpu` is out of range or not in the process's allowed set (`taskset`, cgroup cpusets).
pub fn check_cpu(cpu: usize) -> io::Result<()> {
    if cpu >= CpuSet::MAX_CPU {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "reader CPU {cpu}: CPUs are numbered below {}",
                CpuSet::MAX_CPU
            ),
        ));
    }
    let allowed = sched_getaffinity(None)?;
    if !allowed.is_set(cpu) {
        let list: Vec<String> = (0..CpuSet::MAX_CPU)
            .filter(|&c| allowed.is_set(c))
            .map(|c| c.to_string())
            .collect();
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "reader CPU {cpu} is not one this process may run on (allowed: {})",
                list.join(",")
            ),
        ));
    }
    Ok(())
}

/// The lowest CPU this process may run on.
///
/// # Errors
/// `sched_getaffinity` failed.
pub fn first_allowed_cpu() -> io::Result<usize> {
    let allowed = sched_getaffinity(None)?;
    (0..CpuSet::MAX_CPU)
        .find(|&c| allowed.is_set(c))
        .ok_or_else(|| io::Error::other("the process may run on no CPU"))
}

/// Pin the calling thread to `cpu` (the thread alone: threads it starts later inherit it).
///
/// # Errors
/// See [`check_cpu`]; the kernel refused.
pub fn pin_this_thread(cpu: usize) -> io::Result<()> {
    check_cpu(cpu)?;
    let mut set = CpuSet::new();
    set.set(cpu);
    sched_setaffinity(None, &set)?;
    Ok(())
}

/// Keep the calling thread off `cpu`: it may run on every other CPU the process may run
/// on. Nothing changes when `cpu` is the only one.
///
/// # Errors
/// The kernel refused.
pub fn keep_this_thread_off(cpu: usize) -> io::Result<()> {
    let mut set = sched_getaffinity(None)?;
    if cpu < CpuSet::MAX_CPU && set.is_set(cpu) && set.count() > 1 {
        set.unset(cpu);
        sched_setaffinity(None, &set)?;
    }
    Ok(())
}

/// Pin the calling thread to `cpu` if one is given; a failure is logged, not fatal (the
/// thread still works, only slower).
pub(crate) fn pin_reader(cpu: Option<usize>, who: &str) {
    if let Some(cpu) = cpu {
        if let Err(e) = pin_this_thread(cpu) {
            tracing::warn!(cpu, reader = who, error = %e, "cannot pin the reader thread");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run `f` on a fresh thread, so pinning never narrows the test harness's threads.
    fn on_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().unwrap()
    }

    #[test]
    fn a_pinned_thread_runs_only_on_its_cpu() {
        let cpu = first_allowed_cpu().unwrap();
        let before = sched_getaffinity(None).unwrap();
        let (set, now) = on_thread(move || {
            pin_this_thread(cpu).unwrap();
            (
                sched_getaffinity(None).unwrap(),
                rustix::thread::sched_getcpu(),
            )
        });
        assert_eq!(set.count(), 1);
        assert!(set.is_set(cpu));
        assert_eq!(now, cpu);
        // The test's own thread kept its set.
        assert_eq!(sched_getaffinity(None).unwrap(), before);
    }

    #[test]
    fn a_thread_kept_off_a_cpu_may_run_on_every_other_one() {
        let allowed = sched_getaffinity(None).unwrap();
        let cpu = first_allowed_cpu().unwrap();
        let set = on_thread(move || {
            keep_this_thread_off(cpu).unwrap();
            sched_getaffinity(None).unwrap()
        });
        for c in 0..CpuSet::MAX_CPU {
            let want = allowed.is_set(c) && (c != cpu || allowed.count() == 1);
            assert_eq!(set.is_set(c), want, "CPU {c}");
        }
        // A CPU the thread may not run on anyway changes nothing.
        let set = on_thread(|| {
            keep_this_thread_off(CpuSet::MAX_CPU).unwrap();
            sched_getaffinity(None).unwrap()
        });
        assert_eq!(set, allowed);
    }

    #[test]
    fn a_cpu_outside_the_allowed_set_is_refused_with_the_set() {
        let e = on_thread(|| pin_this_thread(CpuSet::MAX_CPU)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let allowed = sched_getaffinity(None).unwrap();
        if let Some(off) = (0..CpuSet::MAX_CPU).find(|&c| !allowed.is_set(c)) {
            let e = on_thread(move || pin_this_thread(off)).unwrap_err();
            assert!(e.to_string().contains("allowed:"), "{e}");
            // Nothing changed for the thread that was refused.
            let kept = on_thread(move || {
                let _ = pin_this_thread(off);
                sched_getaffinity(None).unwrap()
            });
            assert_eq!(kept, allowed);
        }
    }
}
