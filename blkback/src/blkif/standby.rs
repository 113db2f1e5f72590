//! Failover tier 2, the monitor's half in dom0 (`docs/failover.md`, "Tier 2"): watch a primary
//! driver domain, keep a copy of every disk it serves, and when it dies move each guest using
//! one of them to a standby driver domain.
//!
//! ```text
//!  /local/domain/<primary>/backend/<kind>/<guest>/<devid>   watched; toolstack keys copied
//!  @releaseDomain                                           the primary is gone (or dying)
//!        │
//!        ▼  per guest:  save (the guest suspends; its domain goes away)
//!                       restore paused (a new domid)
//!                       write each disk: frontend -> /local/domain/<standby>/backend/...
//!                       unpause: blkfront's resume reconnects to the standby's backend
//!                                and re-issues every request that was unanswered
//! ```
//!
//! The copies matter: the toolstack removes a domain's xenstore directory when it destroys it,
//! and with it the backend directories (`params`, `mode`, ...) of the disks it served.
//!
//! The suspend and resume go through [`GuestCycle`]; [`XlCycle`] is stock xl's (`xl save` and
//! `xl restore -p`). Linux cannot resume a PV guest in place with a fresh device state
//! (its event channels stay bound; `xc_domain_resume(fast=0)` leaves them so), so the guest
//! comes back as a new domain, and its disks are written for that domain before it runs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use remoca_xen::xenstore::{read_string, with_transaction, Access, Perm, Tx};
use remoca_xen::{DomId, Host, XenStore};

use super::{list, BlkifError};

/// Toolstack keys of a backend directory that move with the disk: `frontend`,
/// `frontend-id` and `state` are written anew for the restored guest.
fn backend_keys() -> impl Iterator<Item = &'static str> {
    super::xenbus::TOOLSTACK_KEYS
        .iter()
        .copied()
        .filter(|k| !k.starts_with("frontend"))
}

/// Toolstack keys of a frontend directory (`backend`, `backend-id` and `state` are written
/// anew; blkfront writes its ring keys itself on resume).
const FRONTEND_KEYS: &[&str] = &["virtual-device", "device-type", "trusted"];

/// One disk the primary serves, as the toolstack wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRecord {
    pub guest: DomId,
    pub devid: String,
    /// Frontend device class directory under the guest's `device/` (`vbd`).
    pub frontend_class: String,
    pub backend: Vec<(String, Vec<u8>)>,
    pub frontend: Vec<(String, Vec<u8>)>,
}

impl DiskRecord {
    fn has_keys_of(&self, other: &DiskRecord) -> bool {
        let covers = |mine: &[(String, Vec<u8>)], theirs: &[(String, Vec<u8>)]| {
            theirs.iter().all(|(k, _)| mine.iter().any(|(m, _)| m == k))
        };
        covers(&self.backend, &other.backend) && covers(&self.frontend, &other.frontend)
    }
}

/// The disks last seen under the primary's backend directory, by (guest, devid).
pub type Records = BTreeMap<(DomId, String), DiskRecord>;

fn read_opt(store: &dyn XenStore, path: &str) -> Result<Option<Vec<u8>>, BlkifError> {
    match store.read(Tx::NONE, path) {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_errno(libc::ENOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn copy_keys<'k>(
    store: &dyn XenStore,
    dir: &str,
    keys: impl IntoIterator<Item = &'k str>,
) -> Result<Vec<(String, Vec<u8>)>, BlkifError> {
    let mut out = Vec::new();
    for k in keys {
        if let Some(v) = read_opt(store, &format!("{dir}/{k}"))? {
            out.push((k.to_owned(), v));
        }
    }
    Ok(out)
}

/// Update `records` from `/local/domain/<primary>/backend/<kind>`. A disk whose backend
/// directory is gone, or has lost keys, keeps its last whole record while its frontend
/// directory is there (xenstored removes the nodes a dead domain owned one at a time, the
/// guest's disk stays); it is forgotten once the frontend directory is gone too (detached).
///
/// # Errors
/// xenstore errors other than a missing node.
pub fn refresh(
    store: &dyn XenStore,
    primary: DomId,
    kind: &str,
    records: &mut Records,
) -> Result<(), BlkifError> {
    let root = format!("/local/domain/{primary}/backend/{kind}");
    for guest in list(store, &root)? {
        let Ok(guest_id) = guest.parse::<DomId>() else {
            continue;
        };
        for devid in list(store, &format!("{root}/{guest}"))? {
            let be = format!("{root}/{guest}/{devid}");
            let Some(frontend) = read_opt(store, &format!("{be}/frontend"))? else {
                continue;
            };
            let frontend = String::from_utf8_lossy(&frontend).trim().to_owned();
            let class = frontend
                .rsplit('/')
                .nth(1)
                .filter(|c| !c.is_empty())
                .unwrap_or("vbd")
                .to_owned();
            let rec = DiskRecord {
                guest: guest_id,
                devid: devid.clone(),
                frontend_class: class,
                backend: copy_keys(store, &be, backend_keys())?,
                frontend: copy_keys(store, &frontend, FRONTEND_KEYS.iter().copied())?,
            };
            // xenstored deletes a dead domain's nodes one at a time, so a directory read
            // while the primary dies may have lost some: a copy replaces the last one only if
            // it has every key that one had (and a first copy needs `params`).
            let key = (guest_id, devid);
            let whole = match records.get(&key) {
                Some(old) => rec.has_keys_of(old),
                None => rec.backend.iter().any(|(k, _)| k == "params"),
            };
            if whole {
                records.insert(key, rec);
            }
        }
    }
    let mut gone = Vec::new();
    for (key, rec) in records.iter() {
        let fe = format!(
            "/local/domain/{}/device/{}/{}",
            rec.guest, rec.frontend_class, rec.devid
        );
        if read_opt(store, &format!("{fe}/backend"))?.is_none() {
            gone.push(key.clone());
        }
    }
    for key in gone {
        records.remove(&key);
    }
    Ok(())
}

/// Write a recorded disk for the restored guest `guest` (its new domid) with `standby` as its
/// backend, in one transaction, as libxl writes a disk: the backend directory
/// `/local/domain/<standby>/backend/<kind>/<guest>/<devid>` owned by the standby and readable
/// by the guest, the frontend directory owned by the guest and readable by the standby, both
/// in state Initialising (1). Returns the backend path.
///
/// # Errors
/// xenstore errors.
pub fn write_moved_disk(
    store: &dyn XenStore,
    rec: &DiskRecord,
    guest: DomId,
    standby: DomId,
    kind: &str,
) -> Result<String, BlkifError> {
    let be = format!(
        "/local/domain/{standby}/backend/{kind}/{guest}/{}",
        rec.devid
    );
    let fe = format!(
        "/local/domain/{guest}/device/{}/{}",
        rec.frontend_class, rec.devid
    );
    let back_perms = [
        Perm::new(standby, Access::None),
        Perm::new(guest, Access::Read),
    ];
    let front_perms = [
        Perm::new(guest, Access::None),
        Perm::new(standby, Access::Read),
    ];
    let guest_s = guest.to_string();
    let standby_s = standby.to_string();
    with_transaction(store, 16, |tx| {
        // Parents first with the device's permissions, so nodes made under them inherit them.
        for (dir, perms) in [
            (be.rsplit_once('/').map_or(&*be, |p| p.0), &back_perms),
            (fe.rsplit_once('/').map_or(&*fe, |p| p.0), &front_perms),
        ] {
            store.mkdir(tx, dir)?;
            store.set_perms(tx, dir, perms)?;
        }
        let back = copied_then(
            &rec.backend,
            [
                ("frontend", fe.as_bytes()),
                ("frontend-id", guest_s.as_bytes()),
                ("state", b"1"),
            ],
        );
        let front = copied_then(
            &rec.frontend,
            [
                ("backend", be.as_bytes()),
                ("backend-id", standby_s.as_bytes()),
                ("state", b"1"),
            ],
        );
        for (dir, keys, perms) in [(&be, &back, &back_perms), (&fe, &front, &front_perms)] {
            store.mkdir(tx, dir)?;
            store.set_perms(tx, dir, perms)?;
            for (k, v) in keys {
                let p = format!("{dir}/{k}");
                store.write(tx, &p, v)?;
                store.set_perms(tx, &p, perms)?;
            }
        }
        Ok(())
    })?;
    Ok(be)
}

/// A record's copied keys, then the keys written anew for the moved disk.
fn copied_then<'a>(
    copied: &'a [(String, Vec<u8>)],
    fresh: [(&'a str, &'a [u8]); 3],
) -> Vec<(&'a str, &'a [u8])> {
    copied
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .chain(fresh)
        .collect()
}

/// Drives a guest through suspend and resume for a takeover.
pub trait GuestCycle {
    /// Suspend the guest and save it; its domain is gone afterwards.
    ///
    /// # Errors
    /// Why it could not be saved.
    fn save(&mut self, name: &str) -> Result<(), BlkifError>;
    /// Bring the saved guest back, paused; returns its new domid.
    ///
    /// # Errors
    /// Why it could not be restored.
    fn restore_paused(&mut self, name: &str) -> Result<DomId, BlkifError>;
    /// Let the restored guest run.
    ///
    /// # Errors
    /// Why it could not be unpaused.
    fn unpause(&mut self, dom: DomId) -> Result<(), BlkifError>;
}

/// Stock xl: `xl save <name> <dir>/<name>.standby-save`, `xl restore -p` of that file,
/// `xl unpause`. The save file is removed once the guest is restored.
#[derive(Debug)]
pub struct XlCycle {
    pub save_dir: PathBuf,
    pub xl: PathBuf,
}

impl XlCycle {
    fn file(&self, name: &str) -> PathBuf {
        self.save_dir.join(format!("{name}.standby-save"))
    }

    fn xl(&self, args: &[&std::ffi::OsStr]) -> Result<String, BlkifError> {
        let out = Command::new(&self.xl)
            .args(args)
            .output()
            .map_err(|e| BlkifError::Standby(format!("cannot run {}: {e}", self.xl.display())))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(BlkifError::Standby(format!(
                "xl {} failed ({}): {}",
                args.iter()
                    .map(|a| a.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" "),
                out.status,
                err.trim().lines().last().unwrap_or("no message")
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl GuestCycle for XlCycle {
    fn save(&mut self, name: &str) -> Result<(), BlkifError> {
        let file = self.file(name);
        self.xl(&["save".as_ref(), name.as_ref(), file.as_os_str()])
            .map(drop)
    }

    fn restore_paused(&mut self, name: &str) -> Result<DomId, BlkifError> {
        let file = self.file(name);
        self.xl(&["restore".as_ref(), "-p".as_ref(), file.as_os_str()])?;
        let _ = std::fs::remove_file(&file);
        let id = self.xl(&["domid".as_ref(), name.as_ref()])?;
        id.trim()
            .parse()
            .map_err(|_| BlkifError::Standby(format!("xl domid {name} printed {:?}", id.trim())))
    }

    fn unpause(&mut self, dom: DomId) -> Result<(), BlkifError> {
        self.xl(&["unpause".as_ref(), dom.to_string().as_ref()])
            .map(drop)
    }
}

/// The monitor's settings.
#[derive(Debug, Clone)]
pub struct StandbyConfig {
    pub primary: DomId,
    pub standby: DomId,
    /// Backend directory kind (`vbd3`).
    pub kind: String,
    /// How often the primary is checked when no watch fires.
    pub poll: Duration,
}

/// One guest moved to the standby.
#[derive(Debug, Clone)]
pub struct Moved {
    pub name: String,
    pub old: DomId,
    pub new: DomId,
    /// New backend paths.
    pub disks: Vec<String>,
    pub save: Duration,
    pub restore: Duration,
    /// From noticing the primary's death to this guest running again.
    pub total: Duration,
}

/// What happened, for the caller's log.
#[derive(Debug)]
pub enum StandbyEvent<'a> {
    Watching(usize),
    PrimaryDied { disks: usize },
    Moved(&'a Moved),
    Failed { guest: DomId, error: &'a BlkifError },
}

fn primary_dead(host: &Host, primary: DomId) -> Result<bool, BlkifError> {
    match host.domains.info(primary) {
        Ok(info) => Ok(info.flags.dying || info.flags.shutdown),
        Err(e) if e.is_errno(libc::ESRCH) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// Watch the primary until it dies, then move every guest with a disk on it to the standby.
/// Returns the guests moved; a guest that could not be moved is reported through `report`
/// and the others are still moved.
///
/// # Errors
/// The primary or standby does not exist, or xenstore fails while watching.
pub fn run(
    host: &Host,
    cfg: &StandbyConfig,
    cycle: &mut dyn GuestCycle,
    report: &mut dyn FnMut(StandbyEvent<'_>),
) -> Result<Vec<Moved>, BlkifError> {
    let store = host.store.as_ref();
    host.domains.info(cfg.standby)?;
    if primary_dead(host, cfg.primary)? {
        return Err(BlkifError::Standby(format!(
            "the primary domain {} is not running",
            cfg.primary
        )));
    }
    let root = format!("/local/domain/{}/backend/{}", cfg.primary, cfg.kind);
    let disks = store.watch(&root, "standby-disks")?;
    let released = store.watch("@releaseDomain", "standby-release")?;
    let mut records = Records::new();
    let mut seen = usize::MAX;
    loop {
        crossbeam_channel::select! {
            recv(disks.receiver()) -> e => { e.map_err(|_| BlkifError::WatchLost(root.clone()))?; }
            recv(released.receiver()) -> e => {
                e.map_err(|_| BlkifError::WatchLost("@releaseDomain".into()))?;
            }
            default(cfg.poll) => {}
        }
        // Never refresh once the primary is going: its directory is being removed.
        if primary_dead(host, cfg.primary)? {
            break;
        }
        refresh(store, cfg.primary, &cfg.kind, &mut records)?;
        if records.len() != seen {
            seen = records.len();
            report(StandbyEvent::Watching(seen));
        }
    }
    let died = Instant::now();
    report(StandbyEvent::PrimaryDied {
        disks: records.len(),
    });
    let mut by_guest: BTreeMap<DomId, Vec<DiskRecord>> = BTreeMap::new();
    for rec in records.into_values() {
        by_guest.entry(rec.guest).or_default().push(rec);
    }
    let mut moved = Vec::new();
    for (guest, recs) in by_guest {
        match move_guest(host, cfg, cycle, guest, &recs, died) {
            Ok(m) => {
                report(StandbyEvent::Moved(&m));
                moved.push(m);
            }
            Err(error) => report(StandbyEvent::Failed {
                guest,
                error: &error,
            }),
        }
    }
    Ok(moved)
}

fn move_guest(
    host: &Host,
    cfg: &StandbyConfig,
    cycle: &mut dyn GuestCycle,
    guest: DomId,
    recs: &[DiskRecord],
    died: Instant,
) -> Result<Moved, BlkifError> {
    let store = host.store.as_ref();
    let name = read_string(store, Tx::NONE, &format!("/local/domain/{guest}/name"))
        .map_err(|e| BlkifError::Standby(format!("guest {guest} has no name in xenstore ({e})")))?;
    let t = Instant::now();
    cycle.save(&name)?;
    let save = t.elapsed();
    let t = Instant::now();
    let new = cycle.restore_paused(&name)?;
    let restore = t.elapsed();
    let mut disks = Vec::new();
    for rec in recs {
        disks.push(write_moved_disk(store, rec, new, cfg.standby, &cfg.kind)?);
    }
    cycle.unpause(new)?;
    Ok(Moved {
        name,
        old: guest,
        new,
        disks,
        save,
        restore,
        total: died.elapsed(),
    })
}

#[cfg(test)]
mod tests;
