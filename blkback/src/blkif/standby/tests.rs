use std::sync::{Arc, Mutex};
use std::time::Duration;

use remoca_xen::sim::{DomainSpec, SimHost};
use remoca_xen::xenstore::{read_string, Access, Perm, Tx};
use remoca_xen::{DomId, Host, XenStore};

use super::*;

const DEVID: &str = "51776";

/// A disk on `backend_dom` for `guest`, as tests/xen-qemu/dom0-tests/lib/vbd.sh writes it
/// (like libxl, in one transaction: a watcher never sees half a disk), with the ring keys
/// blkfront adds once connected.
fn attach(sim: &SimHost, backend_dom: DomId, guest: DomId) {
    let be = format!("/local/domain/{backend_dom}/backend/vbd3/{guest}/{DEVID}");
    let fe = format!("/local/domain/{guest}/device/vbd/{DEVID}");
    let (guest_s, backend_s) = (guest.to_string(), backend_dom.to_string());
    let back = [
        ("frontend", fe.as_str()),
        ("frontend-id", &guest_s),
        ("params", "raw:/dev/xvda"),
        ("mode", "w"),
        ("type", "vbd3"),
        ("state", "4"),
    ];
    let front = [
        ("backend", be.as_str()),
        ("backend-id", &backend_s),
        ("virtual-device", DEVID),
        ("device-type", "disk"),
        ("state", "4"),
        ("ring-ref", "8"),
        ("event-channel", "5"),
    ];
    with_transaction(sim, 4, |tx| {
        for (dir, keys) in [(&be, &back[..]), (&fe, &front[..])] {
            for (k, v) in keys {
                sim.write(tx, &format!("{dir}/{k}"), v.as_bytes())?;
            }
        }
        Ok(())
    })
    .unwrap();
}

fn read(sim: &SimHost, path: &str) -> String {
    read_string(sim, Tx::NONE, path).unwrap()
}

#[test]
fn records_outlive_the_primarys_directory_but_not_a_detach() {
    let sim = SimHost::new();
    let a = sim.create_domain(DomainSpec::pv("storage-a", 16)).unwrap();
    let g = sim.create_domain(DomainSpec::pv("vm", 16)).unwrap();
    attach(&sim, a, g);
    let mut recs = Records::new();
    refresh(&sim, a, "vbd3", &mut recs).unwrap();
    let rec = recs.get(&(g, DEVID.to_owned())).expect("recorded").clone();
    assert_eq!(rec.frontend_class, "vbd");
    assert!(rec
        .backend
        .contains(&("params".into(), b"raw:/dev/xvda".to_vec())));
    assert!(
        !rec.frontend
            .iter()
            .any(|(k, _)| k == "ring-ref" || k == "state"),
        "only toolstack keys are copied: {:?}",
        rec.frontend
    );

    // The primary's nodes go one by one (as xenstored removes a dead domain's), then the
    // whole directory: the whole record stays.
    let be = format!("/local/domain/{a}/backend/vbd3/{g}/{DEVID}");
    for k in ["mode", "params"] {
        sim.rm(Tx::NONE, &format!("{be}/{k}")).unwrap();
        refresh(&sim, a, "vbd3", &mut recs).unwrap();
        assert_eq!(recs.get(&(g, DEVID.to_owned())), Some(&rec), "{k} removed");
    }
    sim.rm(Tx::NONE, &format!("/local/domain/{a}/backend"))
        .unwrap();
    refresh(&sim, a, "vbd3", &mut recs).unwrap();
    assert_eq!(recs.get(&(g, DEVID.to_owned())), Some(&rec));

    // The frontend goes too (detached): forgotten.
    sim.rm(Tx::NONE, &format!("/local/domain/{g}/device/vbd/{DEVID}"))
        .unwrap();
    refresh(&sim, a, "vbd3", &mut recs).unwrap();
    assert!(recs.is_empty());
}

/// Save destroys the guest, restore creates it again (a new domid) and remembers it paused.
struct SimCycle {
    sim: SimHost,
    log: Arc<Mutex<Vec<String>>>,
}

impl GuestCycle for SimCycle {
    fn save(&mut self, name: &str) -> Result<(), BlkifError> {
        let info = Host::from_sim(self.sim.clone()).find_domain(name)?;
        self.sim.destroy_domain(info.domid)?;
        self.log.lock().unwrap().push(format!("save {name}"));
        Ok(())
    }

    fn restore_paused(&mut self, name: &str) -> Result<DomId, BlkifError> {
        let id = self.sim.create_domain(DomainSpec::pv(name, 16))?;
        self.log
            .lock()
            .unwrap()
            .push(format!("restore {name} {id}"));
        Ok(id)
    }

    fn unpause(&mut self, dom: DomId) -> Result<(), BlkifError> {
        self.log.lock().unwrap().push(format!("unpause {dom}"));
        Ok(())
    }
}

#[test]
fn primary_death_moves_each_guest_to_the_standby_before_it_runs_again() {
    let sim = SimHost::new();
    let a = sim.create_domain(DomainSpec::pv("storage-a", 16)).unwrap();
    let b = sim.create_domain(DomainSpec::pv("storage-b", 16)).unwrap();
    let g = sim.create_domain(DomainSpec::pv("vm", 16)).unwrap();
    let host = Host::from_sim(sim.clone());
    let cfg = StandbyConfig {
        primary: a,
        standby: b,
        kind: "vbd3".into(),
        poll: Duration::from_millis(50),
    };
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut cycle = SimCycle {
        sim: sim.clone(),
        log: log.clone(),
    };
    let (tx, rx) = crossbeam_channel::unbounded();
    let monitor = std::thread::spawn(move || {
        run(&host, &cfg, &mut cycle, &mut |e| {
            let line = match e {
                StandbyEvent::Watching(n) => format!("watching {n}"),
                StandbyEvent::PrimaryDied { disks } => format!("died {disks}"),
                StandbyEvent::Moved(m) => format!("moved {}", m.name),
                StandbyEvent::Failed { error, .. } => format!("failed {error}"),
            };
            tx.send(line).unwrap();
        })
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        "watching 0"
    );
    attach(&sim, a, g);
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        "watching 1"
    );
    sim.destroy_domain(a).unwrap();
    let moved = monitor.join().unwrap().unwrap();
    assert_eq!(rx.try_iter().collect::<Vec<_>>(), ["died 1", "moved vm"]);

    assert_eq!(moved.len(), 1);
    let m = &moved[0];
    assert_eq!((m.name.as_str(), m.old), ("vm", g));
    let new = m.new;
    assert_ne!(new, g);
    assert_eq!(
        *log.lock().unwrap(),
        [
            "save vm".to_owned(),
            format!("restore vm {new}"),
            format!("unpause {new}")
        ]
    );
    let be = format!("/local/domain/{b}/backend/vbd3/{new}/{DEVID}");
    let fe = format!("/local/domain/{new}/device/vbd/{DEVID}");
    assert_eq!(m.disks, std::slice::from_ref(&be));
    assert_eq!(read(&sim, &format!("{be}/params")), "raw:/dev/xvda");
    assert_eq!(read(&sim, &format!("{be}/frontend")), fe);
    assert_eq!(read(&sim, &format!("{be}/frontend-id")), new.to_string());
    assert_eq!(read(&sim, &format!("{be}/state")), "1");
    assert_eq!(read(&sim, &format!("{fe}/backend")), be);
    assert_eq!(read(&sim, &format!("{fe}/backend-id")), b.to_string());
    assert_eq!(read(&sim, &format!("{fe}/virtual-device")), DEVID);
    assert_eq!(read(&sim, &format!("{fe}/state")), "1");
    assert!(sim.read(Tx::NONE, &format!("{fe}/ring-ref")).is_err());
    assert_eq!(
        sim.get_perms(Tx::NONE, &be).unwrap(),
        [Perm::new(b, Access::None), Perm::new(new, Access::Read)]
    );
    assert_eq!(
        sim.get_perms(Tx::NONE, &format!("{fe}/backend")).unwrap(),
        [Perm::new(new, Access::None), Perm::new(b, Access::Read)]
    );
}

#[test]
fn a_dead_primary_or_missing_standby_is_refused() {
    let sim = SimHost::new();
    let a = sim.create_domain(DomainSpec::pv("storage-a", 16)).unwrap();
    let host = Host::from_sim(sim.clone());
    let mut cycle = SimCycle {
        sim: sim.clone(),
        log: Arc::default(),
    };
    let cfg = |primary, standby| StandbyConfig {
        primary,
        standby,
        kind: "vbd3".into(),
        poll: Duration::from_millis(50),
    };
    let e = run(&host, &cfg(a, 99), &mut cycle, &mut |_| {}).unwrap_err();
    assert!(
        matches!(e, BlkifError::Xen(ref x) if x.is_errno(libc::ESRCH)),
        "{e}"
    );
    let b = sim.create_domain(DomainSpec::pv("storage-b", 16)).unwrap();
    sim.destroy_domain(a).unwrap();
    let e = run(&host, &cfg(a, b), &mut cycle, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("not running"), "{e}");
}
