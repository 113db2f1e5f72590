//! Scenario tests of the simulated host's grant, event-channel and mem_paging behaviour.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::abi::vm_event::VmEvent;
use crate::evtchn::EventChannels;
use crate::grant::{GrantCopy, GrantTables};
use crate::mem_paging::MemPaging;
use crate::ring::BackRing;

#[test]
fn grant_map_aliases_guest_memory_and_enforces_readonly() {
    let sim = SimHost::new();
    let dom = sim.create_domain(DomainSpec::pv("g", 64)).unwrap();
    let rw = sim.grant_access(dom, 0, 5, false).unwrap();
    let ro = sim.grant_access(dom, 0, 6, true).unwrap();
    let gnt = GrantTables::open(&sim).unwrap();
    let map = gnt.map(dom, &[rw], true).unwrap();
    map.write(0, b"from-dom0").unwrap();
    assert_eq!(&sim.guest_read(dom, 5).unwrap()[..9], b"from-dom0");
    assert!(gnt.map(dom, &[ro], true).unwrap_err().is_errno(libc::EPERM));
    assert!(gnt
        .map(dom, &[999], false)
        .unwrap_err()
        .is_errno(libc::EINVAL));
    assert!(
        sim.revoke_grant(dom, rw).unwrap_err().is_errno(libc::EBUSY),
        "mapped grant"
    );
    drop(map);
    sim.revoke_grant(dom, rw).unwrap();

    sim.guest_write(dom, 6, 100, b"guest-data").unwrap();
    let mut buf = [0u8; 10];
    gnt.copy(&mut [GrantCopy::FromGuest {
        dom,
        gref: ro,
        offset: 100,
        buf: &mut buf,
    }])
    .unwrap();
    assert_eq!(&buf, b"guest-data");
    let err = gnt
        .copy(&mut [GrantCopy::ToGuest {
            dom,
            gref: ro,
            offset: 0,
            buf: b"x",
        }])
        .unwrap_err();
    assert!(err.is_errno(libc::EPERM));
}

#[test]
fn event_channels_bind_notify_mask_and_rebind_after_close() {
    let sim = SimHost::new();
    let dom = sim.create_domain(DomainSpec::pv("g", 16)).unwrap();
    let remote = sim.evtchn_alloc_unbound(dom, 0).unwrap();
    let h = EventChannels::open(&sim).unwrap();
    let local = h.bind_interdomain(dom, remote).unwrap();
    assert!(
        h.bind_interdomain(dom, remote)
            .unwrap_err()
            .is_errno(libc::EINVAL),
        "already bound"
    );
    sim.evtchn_guest_notify(dom, remote).unwrap();
    assert_eq!(h.wait(Duration::from_secs(1)).unwrap(), Some(local));
    // Masked until unmasked: a second notify is only remembered.
    sim.evtchn_guest_notify(dom, remote).unwrap();
    assert_eq!(h.pending().unwrap(), None);
    h.unmask(local).unwrap();
    assert_eq!(h.pending().unwrap(), Some(local));
    h.notify(local).unwrap();
    assert!(sim.evtchn_guest_wait(dom, remote, Duration::from_secs(1)));
    // A restarted backend in the same domain can bind the guest's port again.
    drop(h);
    let h2 = EventChannels::open(&sim).unwrap();
    h2.bind_interdomain(dom, remote).unwrap();
    assert!(h2
        .bind_interdomain(77, 1)
        .unwrap_err()
        .is_errno(libc::ESRCH));
}

/// A driver domain's view: a guest grants to and opens its port for that domain, so only
/// that view maps the page and binds the port, not dom0 (and the other way round).
#[test]
fn a_driver_domain_view_uses_grants_and_ports_meant_for_it() {
    let sim = SimHost::new();
    let dom = sim.create_domain(DomainSpec::pv("g", 16)).unwrap();
    let drv = sim.create_domain(DomainSpec::pv("driver", 16)).unwrap();
    let view = sim.acting_as(drv);
    let to_drv = sim.grant_access(dom, drv, 1, false).unwrap();
    let to_dom0 = sim.grant_access(dom, 0, 2, false).unwrap();
    let (g0, gd) = (
        GrantTables::open(&sim).unwrap(),
        GrantTables::open(&view).unwrap(),
    );
    assert!(g0
        .map(dom, &[to_drv], true)
        .unwrap_err()
        .is_errno(libc::EINVAL));
    assert!(gd
        .map(dom, &[to_dom0], true)
        .unwrap_err()
        .is_errno(libc::EINVAL));
    sim.guest_write(dom, 1, 0, b"for the driver").unwrap();
    let m = gd.map(dom, &[to_drv], true).unwrap();
    let mut got = [0u8; 14];
    m.read(0, &mut got).unwrap();
    assert_eq!(&got, b"for the driver");
    drop(m);

    let port = sim.evtchn_alloc_unbound(dom, drv).unwrap();
    let (e0, ed) = (
        EventChannels::open(&sim).unwrap(),
        EventChannels::open(&view).unwrap(),
    );
    assert!(
        e0.bind_interdomain(dom, port).is_err(),
        "dom0 may not bind it"
    );
    let local = ed.bind_interdomain(dom, port).unwrap();
    ed.notify(local).unwrap();
    assert!(sim.evtchn_guest_wait(dom, port, Duration::from_secs(1)));
    sim.evtchn_guest_notify(dom, port).unwrap();
    assert_eq!(ed.wait(Duration::from_secs(1)).unwrap(), Some(local));
    // Closed by the driver domain, the port is free for that domain again, not for dom0.
    drop(ed);
    assert!(e0.bind_interdomain(dom, port).is_err());
    let again = EventChannels::open(&view).unwrap();
    again.bind_interdomain(dom, port).unwrap();
}

#[test]
fn injected_faults_hit_the_named_call() {
    let sim = SimHost::new();
    let dom = sim.create_domain(DomainSpec::pv("g", 16)).unwrap();
    let gref = sim.grant_access(dom, 0, 1, false).unwrap();
    let gnt = GrantTables::open(&sim).unwrap();
    sim.inject(
        "gnttab.map",
        Fault::FailNth {
            nth: 1,
            errno: libc::ENOMEM,
        },
    )
    .unwrap();
    assert!(gnt
        .map(dom, &[gref], true)
        .unwrap_err()
        .is_errno(libc::ENOMEM));
    assert!(gnt.map(dom, &[gref], true).is_ok());
    let remote = sim.evtchn_alloc_unbound(dom, 0).unwrap();
    let h = EventChannels::open(&sim).unwrap();
    let local = h.bind_interdomain(dom, remote).unwrap();
    sim.inject("evtchn.notify", Fault::DropNth { nth: 1 })
        .unwrap();
    h.notify(local).unwrap();
    assert!(
        !sim.evtchn_guest_wait(dom, remote, Duration::from_millis(50)),
        "dropped"
    );
    h.notify(local).unwrap();
    assert!(sim.evtchn_guest_wait(dom, remote, Duration::from_secs(1)));
}

#[test]
fn paging_enable_explains_why_it_cannot_work() {
    let sim = SimHost::new();
    let pv = sim.create_domain(DomainSpec::pv("pv", 16)).unwrap();
    let mut spec = DomainSpec::hvm("nohap", 16);
    spec.hap = false;
    let nohap = sim.create_domain(spec).unwrap();
    assert!(sim.enable(pv).unwrap_err().is_errno(libc::EOPNOTSUPP));
    assert!(sim.enable(nohap).unwrap_err().is_errno(libc::ENODEV));
}

/// A minimal pager, as a service would write it: evict a page, then serve the guest's
/// fault on it through the vm_event ring.
#[test]
fn paging_protocol_round_trip_and_version_check() {
    let sim = SimHost::new();
    let dom = sim.create_domain(DomainSpec::hvm("hvm", 64)).unwrap();
    sim.guest_write(dom, 9, 0, b"precious").unwrap();
    let ring = sim.enable(dom).unwrap();
    let h = EventChannels::open(&sim).unwrap();
    let port = h.bind_interdomain(dom, ring.remote_port).unwrap();
    let mut back = BackRing::<VmEvent, VmEvent>::new(Arc::new(ring.ring)).unwrap();

    // Nominate fails on a mapped page; evict fails if touched after nominate.
    let busy = sim.map(dom, &[9], false).unwrap();
    assert!(sim.nominate(dom, 9).unwrap_err().is_errno(libc::EBUSY));
    drop(busy);
    sim.nominate(dom, 9).unwrap();
    sim.guest_read(dom, 9).unwrap();
    assert!(sim.evict(dom, 9).unwrap_err().is_errno(libc::EBUSY));
    let mut saved = vec![0u8; PAGE_SIZE];
    {
        let m = sim.map(dom, &[9], false).unwrap();
        m.read(0, &mut saved).unwrap();
    }
    sim.nominate(dom, 9).unwrap();
    sim.evict(dom, 9).unwrap();
    assert_eq!(sim.page_state(dom, 9).unwrap(), PageState::PagedOut);
    assert!(sim
        .map(dom, &[9], false)
        .unwrap_err()
        .is_errno(libc::ENOENT));

    let guest = {
        let sim = sim.clone();
        std::thread::spawn(move || sim.guest_read(dom, 9))
    };
    // First response carries a stale version: Xen drops it and the vCPU stays blocked.
    let fired = h.wait(Duration::from_secs(5)).unwrap();
    assert_eq!(fired, Some(port));
    let req = back.next_request().unwrap().expect("a paging request");
    assert_eq!(req.paging_data().gfn, 9);
    sim.load(dom, 9, &saved).unwrap();
    let mut stale = req;
    stale.version = 6;
    back.push_response(stale);
    back.publish();
    sim.resume(dom).unwrap();
    assert_eq!(sim.dropped_paging_responses(dom).unwrap(), 1);
    assert!(
        !guest.is_finished(),
        "vCPU must stay blocked on a dropped response"
    );
    back.push_response(req.response());
    back.publish();
    h.notify(port).unwrap();
    sim.resume(dom).unwrap();
    let page = guest.join().unwrap().unwrap();
    assert_eq!(&page[..8], b"precious");
}

#[test]
fn disabling_paging_with_pages_out_crashes_the_guest() {
    let sim = SimHost::new();
    let dom = sim.create_domain(DomainSpec::hvm("hvm", 16)).unwrap();
    let _ring = sim.enable(dom).unwrap();
    sim.nominate(dom, 3).unwrap();
    sim.evict(dom, 3).unwrap();
    sim.disable(dom).unwrap();
    assert!(sim.is_crashed(dom).unwrap());
}

#[test]
fn destroying_a_domain_fires_release_and_removes_its_home() {
    let sim = SimHost::new();
    let dom = sim.create_domain(DomainSpec::pv("g", 16)).unwrap();
    let w = sim.watch("@releaseDomain", "rel").unwrap();
    w.next_timeout(Duration::from_secs(1)).unwrap();
    sim.destroy_domain(dom).unwrap();
    assert_eq!(
        w.next_timeout(Duration::from_secs(1)).unwrap().path,
        "@releaseDomain"
    );
    assert!(sim
        .read(Tx::NONE, &format!("/local/domain/{dom}/name"))
        .is_err());
    assert!(matches!(sim.info(dom), Err(Error::NoDomain(_))));
}
