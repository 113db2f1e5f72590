//! Fault injection for the simulated host: fail the Nth call of an operation with an
//! errno, delay calls, or drop event-channel notifications.
//!
//! Operation names are the ones listed in [`OPS`]; an unknown name is rejected so a typo
//! cannot silently disable a test's fault.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;

use crate::error::{Error, Result};

/// Every operation the simulator checks for faults.
pub const OPS: &[&str] = &[
    "domain.list",
    "domain.info",
    "domain.pause",
    "domain.unpause",
    "domain.set_max_memory",
    "foreign.map",
    "gnttab.map",
    "gnttab.copy",
    "evtchn.bind",
    "evtchn.notify",
    "paging.enable",
    "paging.nominate",
    "paging.evict",
    "paging.load",
    "paging.resume",
];

/// What to do to a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The `nth` call from now (1 = the next one) fails with `errno`.
    FailNth { nth: u64, errno: i32 },
    /// Every call from now on fails with `errno`.
    FailAlways { errno: i32 },
    /// Every call from now on sleeps first.
    Delay(Duration),
    /// The `nth` notification from now is silently lost (only for `evtchn.notify`).
    DropNth { nth: u64 },
}

#[derive(Debug)]
struct Rule {
    fault: Fault,
    /// Calls seen since the rule was armed.
    seen: u64,
}

/// Outcome of a fault check for a notification.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Proceed,
    Drop,
}

/// The armed faults of one simulated host.
#[derive(Debug, Default)]
pub struct FaultPlan {
    rules: Mutex<HashMap<&'static str, Vec<Rule>>>,
}

impl FaultPlan {
    /// Arm a fault for `op`.
    ///
    /// # Errors
    /// `Invalid` for an unknown operation name.
    pub fn inject(&self, op: &str, fault: Fault) -> Result<()> {
        let key = OPS.iter().find(|o| **o == op).ok_or_else(|| {
            Error::Invalid(format!(
                "no simulated operation named {op:?}; known: {}",
                OPS.join(", ")
            ))
        })?;
        self.rules
            .lock()
            .entry(key)
            .or_default()
            .push(Rule { fault, seen: 0 });
        Ok(())
    }

    /// Remove every armed fault.
    pub fn clear(&self) {
        self.rules.lock().clear();
    }

    /// Called at the start of every simulated operation.
    ///
    /// # Errors
    /// The injected errno, naming the operation.
    pub fn check(&self, op: &'static str) -> Result<Verdict> {
        let mut delay = None;
        let mut verdict = Verdict::Proceed;
        let mut fail = None;
        {
            let mut rules = self.rules.lock();
            if let Some(list) = rules.get_mut(op) {
                for r in list.iter_mut() {
                    r.seen += 1;
                    match r.fault {
                        Fault::FailNth { nth, errno } if r.seen == nth => fail = Some(errno),
                        Fault::FailAlways { errno } => fail = Some(errno),
                        Fault::Delay(d) => delay = Some(d),
                        Fault::DropNth { nth } if r.seen == nth => verdict = Verdict::Drop,
                        _ => {}
                    }
                }
                list.retain(|r| match r.fault {
                    Fault::FailNth { nth, .. } | Fault::DropNth { nth } => r.seen < nth,
                    _ => true,
                });
            }
        }
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        match fail {
            Some(errno) => Err(Error::os(format!("{op} (injected fault)"), errno)),
            None => Ok(verdict),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nth_call_fails_once() {
        let plan = FaultPlan::default();
        plan.inject(
            "gnttab.map",
            Fault::FailNth {
                nth: 2,
                errno: libc::EAGAIN,
            },
        )
        .unwrap();
        assert!(plan.check("gnttab.map").is_ok());
        assert!(plan.check("gnttab.map").unwrap_err().is_errno(libc::EAGAIN));
        assert!(plan.check("gnttab.map").is_ok());
        assert!(plan
            .inject("gnttab.mapp", Fault::FailAlways { errno: 1 })
            .is_err());
    }
}
