//! The xenbus side of one blkif device: states, the keys the backend publishes and the
//! ring description the frontend publishes (`io/xenbus.h`, `io/blkif.h`).
//!
//! ```text
//!  toolstack: backend + frontend dirs, both state 1
//!  backend:   features, sectors, info ........................ state 2 (InitWait)
//!  frontend:  ring-ref[N], event-channel, protocol ............ state 3 (Initialised)
//!  backend:   map ring, bind event channel .................... state 4 (Connected)
//!  frontend:  ................................................. state 4
//!  either:    5 (Closing) -> backend drains, unmaps, unbinds -> 6 (Closed)
//! ```

use remoca_xen::xenstore::{read_string, with_transaction, Access, Perm};
use remoca_xen::{DomId, GrantRef, Port, Tx, XenStore};

use super::parse::Abi;
use super::BlkifError;

/// `enum xenbus_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XenbusState {
    Unknown = 0,
    Initialising = 1,
    InitWait = 2,
    Initialised = 3,
    Connected = 4,
    Closing = 5,
    Closed = 6,
    Reconfiguring = 7,
    Reconfigured = 8,
}

impl XenbusState {
    /// Parse a `state` value; anything unreadable is `Unknown`, as xenbus treats it.
    pub fn parse(s: &str) -> XenbusState {
        match s.trim().parse::<u32>() {
            Ok(1) => XenbusState::Initialising,
            Ok(2) => XenbusState::InitWait,
            Ok(3) => XenbusState::Initialised,
            Ok(4) => XenbusState::Connected,
            Ok(5) => XenbusState::Closing,
            Ok(6) => XenbusState::Closed,
            Ok(7) => XenbusState::Reconfiguring,
            Ok(8) => XenbusState::Reconfigured,
            _ => XenbusState::Unknown,
        }
    }

    /// The number written to xenstore.
    pub fn code(self) -> u32 {
        self as u32
    }
}

/// `VDISK_CDROM`, `VDISK_REMOVABLE`, `VDISK_READONLY` for the `info` key.
pub const VDISK_CDROM: u32 = 1;
pub const VDISK_READONLY: u32 = 4;

/// What the backend tells the frontend about the disk and itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Features {
    /// Size in 512-byte sectors.
    pub sectors: u64,
    pub info: u32,
    pub discard: bool,
    pub max_indirect_segments: u16,
    pub max_ring_page_order: u32,
}

/// Read a key as text; `Ok(None)` when it does not exist.
///
/// # Errors
/// Xenstore errors other than `ENOENT`.
pub fn read_opt(store: &dyn XenStore, path: &str) -> Result<Option<String>, BlkifError> {
    match read_string(store, Tx::NONE, path) {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_errno(libc::ENOENT) => Ok(None),
        Err(e) => Err(BlkifError::Xen(e)),
    }
}

/// Read a state node; a missing node is `Unknown` (the device is gone).
///
/// # Errors
/// Xenstore errors other than `ENOENT`.
pub fn read_state(store: &dyn XenStore, path: &str) -> Result<XenbusState, BlkifError> {
    Ok(read_opt(store, &format!("{path}/state"))?
        .map_or(XenbusState::Unknown, |s| XenbusState::parse(&s)))
}

/// Write our `state`.
///
/// # Errors
/// Xenstore errors.
pub fn write_state(
    store: &dyn XenStore,
    backend: &str,
    state: XenbusState,
) -> Result<(), BlkifError> {
    store.write(
        Tx::NONE,
        &format!("{backend}/state"),
        state.code().to_string().as_bytes(),
    )?;
    Ok(())
}

/// Publish the features and disk properties, then move to `state`, in one transaction so
/// a frontend that sees the state also sees every key.
///
/// # Errors
/// Xenstore errors.
pub fn publish(
    store: &dyn XenStore,
    backend: &str,
    f: &Features,
    state: XenbusState,
) -> Result<(), BlkifError> {
    with_transaction(store, 16, |tx| {
        let w = |k: &str, v: String| store.write(tx, &format!("{backend}/{k}"), v.as_bytes());
        w("feature-flush-cache", "1".into())?;
        w("feature-barrier", "0".into())?;
        w("feature-persistent", "0".into())?;
        if f.discard {
            w("feature-discard", "1".into())?;
            w("discard-granularity", "4096".into())?;
            w("discard-alignment", "0".into())?;
            w("discard-secure", "0".into())?;
        } else {
            w("feature-discard", "0".into())?;
        }
        if f.max_indirect_segments > 0 {
            w(
                "feature-max-indirect-segments",
                f.max_indirect_segments.to_string(),
            )?;
        }
        w("max-ring-page-order", f.max_ring_page_order.to_string())?;
        w("sectors", f.sectors.to_string())?;
        w("info", f.info.to_string())?;
        w("sector-size", "512".into())?;
        w("physical-sector-size", "512".into())?;
        w("state", state.code().to_string())?;
        Ok(())
    })?;
    Ok(())
}

/// The ring as the frontend described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendRing {
    /// Grant refs of the ring pages, in order (`ring-ref` or `ring-ref0..N-1`).
    pub refs: Vec<GrantRef>,
    /// The frontend's unbound port.
    pub port: Port,
    pub abi: Abi,
}

fn parse_num<T: std::str::FromStr>(path: &str, v: &str) -> Result<T, BlkifError> {
    v.trim()
        .parse()
        .map_err(|_| BlkifError::Frontend(format!("{path}: {v:?} is not a number")))
}

/// Read `ring-page-order` + `ring-ref%u` (or `ring-ref`), `event-channel` and `protocol`.
///
/// # Errors
/// [`BlkifError::Frontend`] for missing or malformed keys, an order above
/// `max_order`, multi-queue, or an ABI other than x86.
pub fn read_frontend_ring(
    store: &dyn XenStore,
    frontend: &str,
    max_order: u32,
) -> Result<FrontendRing, BlkifError> {
    let key = |k: &str| format!("{frontend}/{k}");
    let need = |k: &str| -> Result<String, BlkifError> {
        read_opt(store, &key(k))?
            .ok_or_else(|| BlkifError::Frontend(format!("{} is missing", key(k))))
    };
    if let Some(q) = read_opt(store, &key("multi-queue-num-queues"))? {
        if parse_num::<u32>(&key("multi-queue-num-queues"), &q)? > 1 {
            return Err(BlkifError::Frontend(
                "frontend asks for several queues; this backend offers one".into(),
            ));
        }
    }
    let refs = match read_opt(store, &key("ring-page-order"))? {
        Some(o) => {
            let order: u32 = parse_num(&key("ring-page-order"), &o)?;
            if order > max_order {
                return Err(BlkifError::Frontend(format!(
                    "ring-page-order {order} is above max-ring-page-order {max_order}"
                )));
            }
            (0..1u32 << order)
                .map(|i| {
                    let k = format!("ring-ref{i}");
                    parse_num(&key(&k), &need(&k)?)
                })
                .collect::<Result<Vec<GrantRef>, _>>()?
        }
        None => vec![parse_num(&key("ring-ref"), &need("ring-ref")?)?],
    };
    let port = parse_num(&key("event-channel"), &need("event-channel")?)?;
    let protocol = read_opt(store, &key("protocol"))?;
    let abi = Abi::from_protocol(protocol.as_deref().map(str::trim))
        .map_err(|p| BlkifError::Frontend(format!("protocol {p:?} is not supported")))?;
    Ok(FrontendRing { refs, port, abi })
}

/// The toolstack's keys of a backend directory, copied when a device moves to another
/// driver domain (`frontend` and `frontend-id` first: a move to a new guest domain writes
/// those anew).
pub(super) const TOOLSTACK_KEYS: &[&str] = &[
    "frontend",
    "frontend-id",
    "params",
    "script",
    "online",
    "removable",
    "bootable",
    "dev",
    "type",
    "mode",
    "device-type",
    "discard-enable",
    "specification",
];

/// Failover tier 2, the toolstack's half (`docs/failover.md`): point a guest's disk at a
/// standby driver domain `to` after the domain serving it died. In one transaction:
///
/// - a backend directory `/local/domain/<to>/backend/<kind>/<guest>/<devid>` with the old
///   one's toolstack keys and state Initialising (1), owned by `to` and readable by the guest;
/// - the frontend's `backend` and `backend-id` pointing at it, the frontend directory and its
///   nodes readable by `to` (blkfront keeps the nodes it rewrites on resume);
/// - the frontend's `state` set to Initialising, as a restore writes it, so the standby does
///   not take the old ring (granted to the dead domain) for its own.
///
/// The old backend directory is left to the toolstack. The guest must then be suspended and
/// resumed: blkfront's resume re-reads `backend`/`backend-id`, makes a new ring and event
/// channel for the new backend and re-issues every request that was in flight. Returns the
/// new backend path.
///
/// # Errors
/// [`BlkifError::Params`] when the old backend has no `frontend`/`frontend-id`, xenstore
/// errors otherwise.
pub fn move_frontend(
    store: &dyn XenStore,
    old_backend: &str,
    to: DomId,
    kind: &str,
) -> Result<String, BlkifError> {
    let missing = |k: &str| BlkifError::Params(format!("{old_backend}/{k} is missing"));
    let frontend = read_opt(store, &format!("{old_backend}/frontend"))?
        .ok_or_else(|| missing("frontend"))?
        .trim()
        .to_owned();
    let guest: DomId = read_opt(store, &format!("{old_backend}/frontend-id"))?
        .ok_or_else(|| missing("frontend-id"))?
        .trim()
        .parse()
        .map_err(|_| BlkifError::Params(format!("{old_backend}/frontend-id is not a number")))?;
    let devid = old_backend
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let new_backend = format!("/local/domain/{to}/backend/{kind}/{guest}/{devid}");
    with_transaction(store, 16, |tx| {
        let back_perms = [Perm::new(to, Access::None), Perm::new(guest, Access::Read)];
        let front_perms = [Perm::new(guest, Access::None), Perm::new(to, Access::Read)];
        store.mkdir(tx, &new_backend)?;
        store.set_perms(tx, &new_backend, &back_perms)?;
        for k in TOOLSTACK_KEYS {
            match store.read(tx, &format!("{old_backend}/{k}")) {
                Ok(v) => store.write(tx, &format!("{new_backend}/{k}"), &v)?,
                Err(e) if e.is_errno(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
        store.write(tx, &format!("{new_backend}/state"), b"1")?;
        for k in store.directory(tx, &new_backend)? {
            store.set_perms(tx, &format!("{new_backend}/{k}"), &back_perms)?;
        }
        store.write(tx, &format!("{frontend}/backend"), new_backend.as_bytes())?;
        store.write(
            tx,
            &format!("{frontend}/backend-id"),
            to.to_string().as_bytes(),
        )?;
        store.write(tx, &format!("{frontend}/state"), b"1")?;
        store.set_perms(tx, &frontend, &front_perms)?;
        for k in store.directory(tx, &frontend)? {
            store.set_perms(tx, &format!("{frontend}/{k}"), &front_perms)?;
        }
        Ok(())
    })?;
    Ok(new_backend)
}

#[cfg(test)]
mod tests {
    use super::*;
    use remoca_xen::sim::SimHost;

    #[test]
    fn states_parse_like_xenbus() {
        assert_eq!(XenbusState::parse("4"), XenbusState::Connected);
        assert_eq!(XenbusState::parse("6\n"), XenbusState::Closed);
        assert_eq!(XenbusState::parse("x"), XenbusState::Unknown);
        assert_eq!(XenbusState::parse("99"), XenbusState::Unknown);
        assert_eq!(XenbusState::InitWait.code(), 2);
    }

    #[test]
    fn frontend_ring_keys_are_read_and_checked() {
        let sim = SimHost::new();
        let fe = "/local/domain/3/device/vbd/51712";
        let w = |k: &str, v: &str| {
            sim.write(Tx::NONE, &format!("{fe}/{k}"), v.as_bytes())
                .unwrap()
        };
        let read = || read_frontend_ring(&sim, fe, 4);
        assert!(matches!(read(), Err(BlkifError::Frontend(m)) if m.contains("ring-ref")));
        w("ring-ref", "8");
        w("event-channel", "5");
        assert_eq!(
            read().unwrap(),
            FrontendRing {
                refs: vec![8],
                port: 5,
                abi: Abi::X86_32
            },
            "no protocol key means x86_32"
        );
        w("protocol", "x86_64-abi");
        w("ring-page-order", "1");
        assert!(read().is_err(), "ring-ref1 missing");
        w("ring-ref0", "10");
        w("ring-ref1", "11");
        let r = read().unwrap();
        assert_eq!((r.refs, r.abi), (vec![10, 11], Abi::X86_64));
        w("ring-page-order", "5");
        assert!(read().unwrap_err().to_string().contains("above"));
        w("ring-page-order", "0");
        w("ring-ref0", "x");
        assert!(read().unwrap_err().to_string().contains("not a number"));
        w("ring-ref0", "10");
        w("protocol", "arm-abi");
        assert!(read().unwrap_err().to_string().contains("arm-abi"));
        w("protocol", "x86_64-abi");
        w("multi-queue-num-queues", "4");
        assert!(read().is_err());
    }

    #[test]
    fn publish_writes_every_offer_and_the_state_together() {
        let sim = SimHost::new();
        let be = "/local/domain/0/backend/vbd3/3/51712";
        let f = Features {
            sectors: 2048,
            info: VDISK_READONLY,
            discard: false,
            max_indirect_segments: 0,
            max_ring_page_order: 2,
        };
        publish(&sim, be, &f, XenbusState::InitWait).unwrap();
        let r = |k: &str| read_opt(&sim, &format!("{be}/{k}")).unwrap();
        assert_eq!(r("state").as_deref(), Some("2"));
        assert_eq!(r("sectors").as_deref(), Some("2048"));
        assert_eq!(r("info").as_deref(), Some("4"));
        assert_eq!(r("feature-discard").as_deref(), Some("0"));
        assert_eq!(
            r("feature-max-indirect-segments"),
            None,
            "not offered when 0"
        );
        assert_eq!(r("max-ring-page-order").as_deref(), Some("2"));
        assert_eq!(read_state(&sim, be).unwrap(), XenbusState::InitWait);
        assert_eq!(read_state(&sim, "/nowhere").unwrap(), XenbusState::Unknown);
    }
}
