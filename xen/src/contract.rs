//! Contract checks of the Xen seam: the same assertions against the simulator (in
//! `cargo test`) and against real Xen (`remoca xen selftest`, run in dom0 by the
//! Xen-under-QEMU CI stage). Each check returns what a person would want to read on failure.

use std::time::Duration;

use crate::error::Error;
use crate::xenstore::{with_transaction, Access, Perm, Tx};
use crate::{DomId, Host, PAGE_SIZE};

/// Outcome of one check.
#[derive(Debug)]
pub struct Outcome {
    pub name: &'static str,
    pub result: Result<(), String>,
}

type Check = fn(&Host, &str) -> Result<(), String>;

/// The checks, with a name each. `scratch` is a xenstore directory the checks may use and
/// remove (e.g. `/local/domain/0/remoca-selftest`).
pub const CHECKS: &[(&str, Check)] = &[
    ("hypervisor_version", hypervisor_version),
    ("domain_list_has_dom0", domain_list_has_dom0),
    ("domain_unknown_is_esrch", domain_unknown_is_esrch),
    ("xenstore_write_read_rm", xenstore_write_read_rm),
    ("xenstore_mkdir_directory", xenstore_mkdir_directory),
    ("xenstore_missing_is_enoent", xenstore_missing_is_enoent),
    ("xenstore_perms_round_trip", xenstore_perms_round_trip),
    ("xenstore_transaction_commit", xenstore_transaction_commit),
    (
        "xenstore_transaction_conflict_eagain",
        xenstore_transaction_conflict,
    ),
    ("xenstore_watch_fires", xenstore_watch_fires),
];

/// Run every check; the scratch directory is removed afterwards.
pub fn run_all(host: &Host, scratch: &str) -> Vec<Outcome> {
    let out = CHECKS
        .iter()
        .map(|(name, check)| Outcome {
            name,
            result: check(host, scratch),
        })
        .collect();
    let _ = host.store.rm(Tx::NONE, scratch);
    out
}

fn e(err: Error) -> String {
    err.to_string()
        + &std::error::Error::source(&err)
            .map(|s| format!(": {s}"))
            .unwrap_or_default()
}

fn hypervisor_version(host: &Host, _: &str) -> Result<(), String> {
    let v = host.domains.hypervisor().map_err(e)?;
    if v.major < 4 {
        return Err(format!(
            "hypervisor {}.{} is older than Xen 4",
            v.major, v.minor
        ));
    }
    Ok(())
}

fn domain_list_has_dom0(host: &Host, _: &str) -> Result<(), String> {
    let list = host.domains().map_err(e)?;
    let dom0 = list
        .iter()
        .find(|d| d.domid == 0)
        .ok_or("dom0 missing from the domain list")?;
    if dom0.tot_pages == 0 || dom0.online_vcpus == 0 {
        return Err(format!(
            "dom0 reported with {} pages and {} vcpus",
            dom0.tot_pages, dom0.online_vcpus
        ));
    }
    if dom0.name != "Domain-0" {
        return Err(format!("dom0 is named {:?}", dom0.name));
    }
    Ok(())
}

fn domain_unknown_is_esrch(host: &Host, _: &str) -> Result<(), String> {
    match host.domains.info(32000) {
        Err(err) if err.is_errno(libc::ESRCH) => Ok(()),
        Err(err) => Err(format!("expected ESRCH, got {}", e(err))),
        Ok(d) => Err(format!("domain 32000 exists? {d:?}")),
    }
}

fn xenstore_write_read_rm(host: &Host, scratch: &str) -> Result<(), String> {
    let key = format!("{scratch}/rw/key");
    host.store.write(Tx::NONE, &key, b"value-1").map_err(e)?;
    let got = host.store.read(Tx::NONE, &key).map_err(e)?;
    if got != b"value-1" {
        return Err(format!("read back {:?}", String::from_utf8_lossy(&got)));
    }
    host.store
        .rm(Tx::NONE, &format!("{scratch}/rw"))
        .map_err(e)?;
    match host.store.read(Tx::NONE, &key) {
        Err(err) if err.is_errno(libc::ENOENT) => Ok(()),
        other => Err(format!("after rm, read gave {other:?}")),
    }
}

fn xenstore_mkdir_directory(host: &Host, scratch: &str) -> Result<(), String> {
    let dir = format!("{scratch}/dir");
    for c in ["a", "b", "c"] {
        host.store
            .mkdir(Tx::NONE, &format!("{dir}/{c}"))
            .map_err(e)?;
    }
    let mut names = host.store.directory(Tx::NONE, &dir).map_err(e)?;
    names.sort();
    if names != ["a", "b", "c"] {
        return Err(format!("directory lists {names:?}"));
    }
    let empty = host.store.read(Tx::NONE, &format!("{dir}/a")).map_err(e)?;
    if !empty.is_empty() {
        return Err("mkdir made a node with a value".into());
    }
    Ok(())
}

fn xenstore_missing_is_enoent(host: &Host, scratch: &str) -> Result<(), String> {
    match host
        .store
        .read(Tx::NONE, &format!("{scratch}/no/such/node"))
    {
        Err(err) if err.is_errno(libc::ENOENT) => Ok(()),
        other => Err(format!("expected ENOENT, got {other:?}")),
    }
}

fn xenstore_perms_round_trip(host: &Host, scratch: &str) -> Result<(), String> {
    let key = format!("{scratch}/perms");
    host.store.write(Tx::NONE, &key, b"x").map_err(e)?;
    let want = [
        Perm::new(0, Access::None),
        Perm::new(1, Access::Read),
        Perm::new(2, Access::Both),
    ];
    host.store.set_perms(Tx::NONE, &key, &want).map_err(e)?;
    let got = host.store.get_perms(Tx::NONE, &key).map_err(e)?;
    if got != want {
        return Err(format!("set {want:?}, got {got:?}"));
    }
    Ok(())
}

fn xenstore_transaction_commit(host: &Host, scratch: &str) -> Result<(), String> {
    let (a, b) = (format!("{scratch}/tx/a"), format!("{scratch}/tx/b"));
    with_transaction(&*host.store, 5, |tx| {
        host.store.write(tx, &a, b"1")?;
        host.store.write(tx, &b, b"2")
    })
    .map_err(e)?;
    let got = (
        host.store.read(Tx::NONE, &a).map_err(e)?,
        host.store.read(Tx::NONE, &b).map_err(e)?,
    );
    if got != (b"1".to_vec(), b"2".to_vec()) {
        return Err(format!("after commit read {got:?}"));
    }
    Ok(())
}

fn xenstore_transaction_conflict(host: &Host, scratch: &str) -> Result<(), String> {
    let key = format!("{scratch}/conflict");
    host.store.write(Tx::NONE, &key, b"0").map_err(e)?;
    let tx = host.store.transaction_start().map_err(e)?;
    host.store.read(tx, &key).map_err(e)?;
    host.store.write(tx, &key, b"from-tx").map_err(e)?;
    host.store.write(Tx::NONE, &key, b"outside").map_err(e)?;
    match host.store.transaction_end(tx, true) {
        Err(err) if err.is_errno(libc::EAGAIN) => {}
        other => {
            return Err(format!(
                "conflicting commit gave {other:?}, expected EAGAIN"
            ))
        }
    }
    let now = host.store.read(Tx::NONE, &key).map_err(e)?;
    if now != b"outside" {
        return Err(format!(
            "failed transaction changed the node to {:?}",
            String::from_utf8_lossy(&now)
        ));
    }
    Ok(())
}

fn xenstore_watch_fires(host: &Host, scratch: &str) -> Result<(), String> {
    let dir = format!("{scratch}/watched");
    host.store.mkdir(Tx::NONE, &dir).map_err(e)?;
    let w = host.store.watch(&dir, "tok").map_err(e)?;
    let first = w
        .next_timeout(Duration::from_secs(5))
        .ok_or("no initial watch event")?;
    if first.token != "tok" {
        return Err(format!("initial event token {:?}", first.token));
    }
    let leaf = format!("{dir}/leaf");
    host.store.write(Tx::NONE, &leaf, b"1").map_err(e)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if let Some(ev) = w.next_timeout(Duration::from_millis(200)) {
            if ev.path == leaf {
                return Ok(());
            }
        }
    }
    Err(format!("no watch event for {leaf}"))
}

/// Scan `dom`'s frames `[0, frames)` through the foreign-memory capability for a page that
/// starts with `marker`; returns the frame number. For PV guests frame numbers are machine
/// frames, for HVM/PVH guests guest frames, as libxenforeignmemory defines them.
///
/// # Errors
/// The map error, or `ENOENT` when no page carries the marker.
pub fn find_marker(host: &Host, dom: DomId, marker: &[u8], frames: u64) -> crate::Result<u64> {
    const BATCH: u64 = 1024;
    let mut page = vec![0u8; marker.len().min(PAGE_SIZE)];
    let mut start = 0;
    while start < frames {
        let gfns: Vec<u64> = (start..(start + BATCH).min(frames)).collect();
        let (map, errs) = host.foreign.map_sparse(dom, &gfns, false)?;
        for (i, err) in errs.iter().enumerate() {
            if *err != 0 {
                continue;
            }
            map.read(i * PAGE_SIZE, &mut page)?;
            if page == marker {
                return Ok(gfns[i]);
            }
        }
        start += BATCH;
    }
    Err(Error::os(
        format!("no frame of domain {dom} starts with the marker"),
        libc::ENOENT,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{DomainSpec, SimHost};

    #[test]
    fn every_contract_check_passes_on_the_simulator() {
        let host = Host::from_sim(SimHost::new());
        for o in run_all(&host, "/local/domain/0/remoca-selftest") {
            assert!(o.result.is_ok(), "{}: {:?}", o.name, o.result);
        }
        assert!(host
            .store
            .read(Tx::NONE, "/local/domain/0/remoca-selftest")
            .is_err());
    }

    #[test]
    fn marker_is_found_through_foreign_maps() {
        let sim = SimHost::new();
        let dom = sim.create_domain(DomainSpec::pv("guest", 3000)).unwrap();
        sim.guest_write(dom, 2047, 0, b"REMOCA-MARKER-42").unwrap();
        let host = Host::from_sim(sim);
        assert_eq!(
            find_marker(&host, dom, b"REMOCA-MARKER-42", 4096).unwrap(),
            2047
        );
        assert!(find_marker(&host, dom, b"ABSENT-MARKER", 4096)
            .unwrap_err()
            .is_errno(libc::ENOENT));
    }
}
