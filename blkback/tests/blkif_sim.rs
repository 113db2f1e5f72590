//! The blkif backend against a simulated frontend on the simulated Xen host: the xenbus
//! handshake through xenstore as libxl and Linux blkfront do it, requests through a shared
//! ring in granted guest pages, data by grant copy, notifications by event channel.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use remoca_blkback::blkif::parse::{
    encode_request, encode_segments, entry_from_bytes_32, entry_from_bytes_64, Abi, BlkifOp,
    BlkifRequest, DataSegment,
};
use remoca_blkback::blkif::xenbus::move_frontend;
use remoca_blkback::blkif::RESPONSE_MARK;
use remoca_blkback::blkif::{BlkifConfig, BlkifServer};
use remoca_blkback::overlay::Overlay;
use remoca_blkback::raw::RawFile;
use remoca_blkback::{ExportConfig, Exports};
use remoca_xen::abi::blkif::{
    Request, Request32, Response, Response32, OP_DISCARD, OP_FLUSH_DISKCACHE, OP_READ, OP_WRITE,
    RSP_EOPNOTSUPP, RSP_ERROR, RSP_OKAY,
};
use remoca_xen::ring::FrontRing;
use remoca_xen::sim::{DomainSpec, Fault, SimHost, SimStoreConn};
use remoca_xen::xenstore::{read_string, with_transaction, Access, Perm};
use remoca_xen::{DomId, EventChannels, ForeignMemory, GrantRef, Host, Port, Tx, XenStore};

/// A bound on every wait, so a broken backend fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(20);
const SECTOR: usize = 512;
const PAGE: usize = 4096;
/// Guest frames: ring pages from 0, indirect pages from 40, data pages from 64.
const INDIRECT_GFN: u64 = 40;
const DATA_GFN: u64 = 64;
const DATA_PAGES: usize = 300;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 7) as u8).wrapping_mul(31) ^ (i as u8))
        .collect()
}

/// A raw image of `sectors` sectors filled with a pattern.
fn image(dir: &Path, name: &str, sectors: usize, seed: u8) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, pattern(seed, sectors * SECTOR)).unwrap();
    p
}

struct Host0 {
    sim: SimHost,
    host: Host,
    dir: tempfile::TempDir,
}

impl Host0 {
    fn new() -> Host0 {
        let sim = SimHost::new();
        Host0 {
            host: Host::from_sim(sim.clone()),
            sim,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn serve(&self, config: BlkifConfig) -> BlkifServer {
        BlkifServer::spawn(self.host.clone(), config).unwrap()
    }

    fn guest(&self, name: &str) -> DomId {
        self.sim
            .create_domain(DomainSpec::pv(name, 2 * SLOT_PAGES))
            .unwrap()
    }

    fn xs0(&self) -> SimStoreConn {
        self.sim.xenstore().connect(0)
    }

    /// What libxl's device_disk_add writes for `backendtype=tap`: both directories in one
    /// transaction, each readable by the other end, state 1.
    fn add_disk(&self, dom: DomId, devid: u32, params: &str, mode: &str) {
        let xs = self.xs0();
        let be = backend_path(dom, devid);
        let fe = frontend_path(dom, devid);
        with_transaction(&xs, 8, |tx| {
            xs.mkdir(tx, &be)?;
            xs.set_perms(
                tx,
                &be,
                &[Perm::new(0, Access::None), Perm::new(dom, Access::Read)],
            )?;
            xs.mkdir(tx, &fe)?;
            xs.set_perms(
                tx,
                &fe,
                &[Perm::new(dom, Access::None), Perm::new(0, Access::Read)],
            )?;
            for (k, v) in [
                ("frontend", fe.clone()),
                ("params", params.to_owned()),
                ("script", "/etc/xen/scripts/block-remoca".into()),
                ("frontend-id", dom.to_string()),
                ("online", "1".into()),
                ("removable", "0".into()),
                ("bootable", "1".into()),
                ("state", "1".into()),
                ("dev", "xvdb".into()),
                ("type", "vbd3".into()),
                ("mode", mode.into()),
                ("device-type", "disk".into()),
                ("discard-enable", "1".into()),
            ] {
                xs.write(tx, &format!("{be}/{k}"), v.as_bytes())?;
            }
            for (k, v) in [
                ("backend", be.clone()),
                ("backend-id", "0".into()),
                ("state", "1".into()),
                ("virtual-device", devid.to_string()),
                ("device-type", "disk".into()),
                ("trusted", "1".into()),
            ] {
                xs.write(tx, &format!("{fe}/{k}"), v.as_bytes())?;
            }
            Ok(())
        })
        .unwrap();
    }

    /// libxl's removal after the backend reached Closed: both directories go.
    fn remove_disk(&self, dom: DomId, devid: u32) {
        let xs = self.xs0();
        xs.rm(Tx::NONE, &backend_path(dom, devid)).unwrap();
        xs.rm(Tx::NONE, &frontend_path(dom, devid)).unwrap();
    }

    fn read(&self, path: &str) -> Option<String> {
        read_string(&self.xs0(), Tx::NONE, path).ok()
    }

    /// Wait until `<dir>/state` is `want`.
    fn wait_state(&self, dir: &str, want: u32) {
        let xs = self.xs0();
        let w = xs.watch(&format!("{dir}/state"), "t").unwrap();
        loop {
            if self.read(&format!("{dir}/state")).as_deref() == Some(&want.to_string()) {
                return;
            }
            assert!(
                w.next_timeout(PATIENCE).is_some(),
                "{dir}/state never became {want} (is {:?})",
                self.read(&format!("{dir}/state"))
            );
        }
    }
}

fn backend_path(dom: DomId, devid: u32) -> String {
    format!("/local/domain/0/backend/vbd3/{dom}/{devid}")
}

fn frontend_path(dom: DomId, devid: u32) -> String {
    format!("/local/domain/{dom}/device/vbd/{devid}")
}

#[derive(Debug)]
enum Ring {
    X64(FrontRing<Request, Response>),
    X32(FrontRing<Request32, Response32>),
}

/// Linux blkfront, reduced to what the tests need.
struct Front {
    sim: SimHost,
    dom: DomId,
    devid: u32,
    ring: Option<Ring>,
    abi: Abi,
    ring_grefs: Vec<GrantRef>,
    port: Port,
    data: Vec<GrantRef>,
    indirect: Vec<GrantRef>,
    /// First guest frame of this device's pages.
    base: u64,
    next_id: u64,
    setup: Setup,
}

/// How the frontend describes its ring.
#[derive(Debug, Clone, Copy)]
struct Setup {
    /// `None`: write no `protocol` key (the backend must assume x86_32).
    protocol: Option<Abi>,
    /// `None`: a single `ring-ref`; `Some(n)`: `ring-page-order` n and `ring-ref0..`.
    order: Option<u32>,
    /// Which share of guest memory this device's pages use (two devices of one guest
    /// must not share ring or data pages).
    slot: u64,
}

const X64: Setup = Setup {
    protocol: Some(Abi::X86_64),
    order: None,
    slot: 0,
};
/// Guest frames per [`Setup::slot`].
const SLOT_PAGES: u64 = 1024;

impl Front {
    /// The whole handshake: [`Front::initialise`], then Connected on both sides.
    fn connect(h: &Host0, dom: DomId, devid: u32, setup: Setup) -> Front {
        let f = Front::initialise(h, dom, devid, setup);
        let be = h
            .read(&format!("{}/backend", frontend_path(dom, devid)))
            .unwrap();
        h.wait_state(&be, 4);
        f.set_state(4);
        f
    }

    /// Wait for the backend's InitWait, set up ring, port and data grants, publish them
    /// and move to Initialised. The backend is the one the frontend's `backend` and
    /// `backend-id` name, and the grants and the port are for that domain.
    fn initialise(h: &Host0, dom: DomId, devid: u32, setup: Setup) -> Front {
        let fe = frontend_path(dom, devid);
        let guest = h.sim.xenstore().connect(dom);
        let own = |k: &str| read_string(&guest, Tx::NONE, &format!("{fe}/{k}")).unwrap();
        let be = own("backend");
        let backend_id: DomId = own("backend-id").parse().unwrap();
        h.wait_state(&be, 2);
        // The frontend reads the backend's offer as the guest, through its permissions.
        let offer = |k: &str| read_string(&guest, Tx::NONE, &format!("{be}/{k}")).unwrap();
        let max_order: u32 = offer("max-ring-page-order").parse().unwrap();
        let pages = setup.order.map_or(1, |o| {
            assert!(o <= max_order);
            1usize << o
        });
        let base = setup.slot * SLOT_PAGES;
        let gfns: Vec<u64> = (base..base + pages as u64).collect();
        let ring_grefs: Vec<GrantRef> = gfns
            .iter()
            .map(|g| h.sim.grant_access(dom, backend_id, *g, false).unwrap())
            .collect();
        let map = Arc::new(ForeignMemory::map(&h.sim, dom, &gfns, true).unwrap());
        let abi = setup.protocol.unwrap_or(Abi::X86_32);
        let ring = match abi {
            Abi::X86_64 => Ring::X64(FrontRing::init(map).unwrap()),
            Abi::X86_32 => Ring::X32(FrontRing::init(map).unwrap()),
        };
        let port = h.sim.evtchn_alloc_unbound(dom, backend_id).unwrap();
        let data = (0..DATA_PAGES as u64)
            .map(|i| {
                h.sim
                    .grant_access(dom, backend_id, base + DATA_GFN + i, false)
                    .unwrap()
            })
            .collect();
        let indirect = (0..8)
            .map(|i| {
                h.sim
                    .grant_access(dom, backend_id, base + INDIRECT_GFN + i, true)
                    .unwrap()
            })
            .collect();
        with_transaction(&guest, 8, |tx| {
            let w = |k: &str, v: String| guest.write(tx, &format!("{fe}/{k}"), v.as_bytes());
            match setup.order {
                None => w("ring-ref", ring_grefs[0].to_string())?,
                Some(o) => {
                    w("ring-page-order", o.to_string())?;
                    for (i, g) in ring_grefs.iter().enumerate() {
                        w(&format!("ring-ref{i}"), g.to_string())?;
                    }
                }
            }
            w("event-channel", port.to_string())?;
            if let Some(p) = setup.protocol {
                w("protocol", p.name().into())?;
            }
            w("state", "3".into())
        })
        .unwrap();
        Front {
            sim: h.sim.clone(),
            dom,
            devid,
            ring: Some(ring),
            abi,
            ring_grefs,
            port,
            data,
            indirect,
            base,
            next_id: 1,
            setup,
        }
    }

    /// blkfront's resume (`blkfront_resume` + `blkif_recover`), after the toolstack moved the
    /// device to another backend: drop the old ring and every grant, find the backend again
    /// from `backend`/`backend-id`, make a new ring, port and grants for it, connect, and
    /// return the new frontend (request ids go on). The caller re-issues what was in flight.
    fn resume(mut self, h: &Host0) -> Front {
        self.ring = None;
        for g in self
            .ring_grefs
            .iter()
            .chain(&self.data)
            .chain(&self.indirect)
        {
            h.sim
                .revoke_grant(self.dom, *g)
                .expect("a grant of the old ring is still mapped");
        }
        let mut f = Front::connect(h, self.dom, self.devid, self.setup);
        f.next_id = self.next_id;
        f
    }

    fn set_state(&self, state: u32) {
        self.sim
            .xenstore()
            .connect(self.dom)
            .write(
                Tx::NONE,
                &format!("{}/state", frontend_path(self.dom, self.devid)),
                state.to_string().as_bytes(),
            )
            .unwrap();
    }

    /// Publish raw request bytes; notify only when the ring says the backend asked for it.
    fn push_bytes(&mut self, bytes: &[u8]) {
        let notify = match self.ring.as_mut().unwrap() {
            Ring::X64(r) => {
                assert!(r.push_request(entry_from_bytes_64(bytes)), "ring full");
                r.publish()
            }
            Ring::X32(r) => {
                assert!(r.push_request(entry_from_bytes_32(bytes)), "ring full");
                r.publish()
            }
        };
        if notify {
            self.sim.evtchn_guest_notify(self.dom, self.port).unwrap();
        }
    }

    fn push(&mut self, op: BlkifOp) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let req = BlkifRequest {
            id,
            handle: self.devid as u16,
            op,
        };
        let bytes = encode_request(self.abi, &req);
        self.push_bytes(&bytes);
        id
    }

    fn try_response(&mut self) -> Option<(u64, u8, i16)> {
        match self.ring.as_mut().unwrap() {
            Ring::X64(r) => r.next_response().map(|x| (x.id, x.operation, x.status)),
            Ring::X32(r) => r.next_response().map(|x| {
                let (id, op, st) = (x.id, x.operation, x.status);
                (id, op, st)
            }),
        }
    }

    /// The next response, sleeping on the event channel as blkfront does.
    fn response(&mut self) -> (u64, u8, i16) {
        loop {
            if let Some(r) = self.try_response() {
                return r;
            }
            let more = match self.ring.as_mut().unwrap() {
                Ring::X64(r) => r.final_check_for_responses(),
                Ring::X32(r) => r.final_check_for_responses(),
            };
            if !more {
                assert!(
                    self.sim.evtchn_guest_wait(self.dom, self.port, PATIENCE),
                    "no response notification"
                );
            }
        }
    }

    /// Submit and wait for the answer to this request; returns its status.
    fn call(&mut self, op: BlkifOp) -> i16 {
        let id = self.push(op);
        let (rid, _, status) = self.response();
        assert_eq!(rid, id);
        status
    }

    /// Segments over data pages `first_page..`, whole pages.
    fn pages(&self, first_page: usize, n: usize) -> Vec<DataSegment> {
        (first_page..first_page + n)
            .map(|i| DataSegment {
                gref: self.data[i],
                first_sect: 0,
                last_sect: 7,
            })
            .collect()
    }

    /// Copy `bytes` into the data pages of `segs`, in segment order.
    fn fill(&self, segs: &[DataSegment], bytes: &[u8]) {
        let mut at = 0;
        for s in segs {
            let page = self.page_of(s.gref);
            self.sim
                .guest_write(
                    self.dom,
                    page,
                    s.offset() as usize,
                    &bytes[at..at + s.len()],
                )
                .unwrap();
            at += s.len();
        }
        assert_eq!(at, bytes.len());
    }

    /// The bytes the data pages of `segs` hold, in segment order.
    fn collect(&self, segs: &[DataSegment]) -> Vec<u8> {
        let mut out = Vec::new();
        for s in segs {
            let page = self.sim.guest_read(self.dom, self.page_of(s.gref)).unwrap();
            out.extend_from_slice(&page[s.offset() as usize..s.offset() as usize + s.len()]);
        }
        out
    }

    fn page_of(&self, gref: GrantRef) -> u64 {
        self.base + DATA_GFN + self.data.iter().position(|g| *g == gref).unwrap() as u64
    }

    fn write(&mut self, sector: u64, segs: Vec<DataSegment>, bytes: &[u8]) -> i16 {
        self.fill(&segs, bytes);
        self.call(BlkifOp::Write {
            sector,
            segments: segs,
        })
    }

    fn read(&mut self, sector: u64, segs: Vec<DataSegment>) -> (i16, Vec<u8>) {
        let status = self.call(BlkifOp::Read {
            sector,
            segments: segs.clone(),
        });
        (status, self.collect(&segs))
    }
}

fn file_bytes(p: &Path, offset: usize, len: usize) -> Vec<u8> {
    std::fs::read(p).unwrap()[offset..offset + len].to_vec()
}

#[test]
fn handshake_publishes_features_connects_and_serves_reads_and_writes() {
    let h = Host0::new();
    let img = image(h.dir.path(), "disk.raw", 4096, 1);
    let server = h.serve(BlkifConfig::default());
    let dom = h.guest("g1");
    h.add_disk(dom, 51728, &format!("raw:{}", img.display()), "w");
    let mut f = Front::connect(&h, dom, 51728, X64);

    let be = backend_path(dom, 51728);
    let key = |k: &str| h.read(&format!("{be}/{k}"));
    assert_eq!(key("sectors").as_deref(), Some("4096"));
    assert_eq!(key("sector-size").as_deref(), Some("512"));
    assert_eq!(key("info").as_deref(), Some("0"));
    assert_eq!(key("feature-flush-cache").as_deref(), Some("1"));
    assert_eq!(key("feature-discard").as_deref(), Some("1"));
    assert_eq!(key("feature-max-indirect-segments").as_deref(), Some("256"));
    assert_eq!(key("max-ring-page-order").as_deref(), Some("4"));
    assert_eq!(
        key("params"),
        Some(format!("raw:{}", img.display())),
        "toolstack keys kept"
    );

    // Read what the image holds.
    let (st, got) = f.read(16, f.pages(0, 2));
    assert_eq!(st, RSP_OKAY);
    assert_eq!(got, file_bytes(&img, 16 * SECTOR, 2 * PAGE));

    // Write across full and partial segments, then read it back and find it in the file.
    let segs = vec![
        DataSegment {
            gref: f.data[3],
            first_sect: 2,
            last_sect: 5,
        },
        f.pages(4, 1)[0],
        DataSegment {
            gref: f.data[5],
            first_sect: 0,
            last_sect: 0,
        },
    ];
    let data = pattern(77, (4 + 8 + 1) * SECTOR);
    assert_eq!(f.write(100, segs.clone(), &data), RSP_OKAY);
    assert_eq!(
        f.call(BlkifOp::Flush {
            sector: 0,
            segments: vec![]
        }),
        RSP_OKAY
    );
    assert_eq!(file_bytes(&img, 100 * SECTOR, data.len()), data);
    let back = vec![
        f.pages(10, 1)[0],
        DataSegment {
            gref: f.data[11],
            first_sect: 0,
            last_sect: 4,
        },
    ];
    let (st, got) = f.read(100, back);
    assert_eq!(st, RSP_OKAY);
    assert_eq!(got, data);

    // A flush that carries data writes it durably.
    let fua = f.pages(20, 1);
    let d2 = pattern(9, PAGE);
    f.fill(&fua, &d2);
    assert_eq!(
        f.call(BlkifOp::Flush {
            sector: 200,
            segments: fua
        }),
        RSP_OKAY
    );
    assert_eq!(file_bytes(&img, 200 * SECTOR, PAGE), d2);
    server.shutdown().unwrap();
}

#[test]
fn x86_32_layout_with_and_without_a_protocol_key_on_multi_page_rings() {
    let h = Host0::new();
    let server = h.serve(BlkifConfig::default());
    for (i, protocol) in [None, Some(Abi::X86_32)].into_iter().enumerate() {
        let img = image(h.dir.path(), &format!("d{i}.raw"), 2048, 3 + i as u8);
        let dom = h.guest(&format!("g32-{i}"));
        h.add_disk(dom, 51712, &format!("raw:{}", img.display()), "w");
        let mut f = Front::connect(
            &h,
            dom,
            51712,
            Setup {
                protocol,
                order: Some(2),
                slot: 0,
            },
        );
        assert_eq!(f.abi, Abi::X86_32);
        let (st, got) = f.read(8, f.pages(0, 11));
        assert_eq!(st, RSP_OKAY);
        assert_eq!(got, file_bytes(&img, 8 * SECTOR, 11 * PAGE));
        // More requests than a one-page ring holds, so indices wrap a 4-page ring too.
        for n in 0..300u64 {
            let data = pattern(n as u8, PAGE);
            assert_eq!(
                f.write(n * 8 % 2000, f.pages(1, 1), &data),
                RSP_OKAY,
                "write {n}"
            );
            let (st, got) = f.read(n * 8 % 2000, f.pages(2, 1));
            assert_eq!((st, got), (RSP_OKAY, data), "read {n}");
        }
        // Many outstanding at once.
        let ids: Vec<u64> = (0..60)
            .map(|k| {
                f.push(BlkifOp::Read {
                    sector: k * 8,
                    segments: f.pages(k as usize, 1),
                })
            })
            .collect();
        let mut answered: Vec<u64> = (0..60)
            .map(|_| f.response())
            .map(|(id, op, st)| {
                assert_eq!((op, st), (OP_READ, RSP_OKAY));
                id
            })
            .collect();
        answered.sort_unstable();
        assert_eq!(answered, ids);
    }
    server.shutdown().unwrap();
}

#[test]
fn overlay_export_serves_writes_discard_and_leaves_the_template_alone() {
    let h = Host0::new();
    let template = image(h.dir.path(), "template.raw", 4096, 5);
    let before = std::fs::read(&template).unwrap();
    let overlay = h.dir.path().join("vm1.ovl");
    Overlay::create(
        &overlay,
        &RawFile::open_read_only(&template).unwrap(),
        16,
        "t",
    )
    .unwrap();
    let exports = Exports::open(&[ExportConfig {
        name: "vm1".into(),
        template: template.clone(),
        overlay: Some(overlay),
        read_only: false,
        min_block: 1,
    }])
    .unwrap();
    let server = h.serve(BlkifConfig {
        exports: Some(exports.clone()),
        ..BlkifConfig::default()
    });
    let dom = h.guest("ov");
    h.add_disk(dom, 51712, "raw:vm1", "w");
    let mut f = Front::connect(&h, dom, 51712, X64);

    let (st, got) = f.read(0, f.pages(0, 4));
    assert_eq!((st, got), (RSP_OKAY, before[..4 * PAGE].to_vec()));
    let data = pattern(42, 3 * PAGE);
    assert_eq!(f.write(64, f.pages(4, 3), &data), RSP_OKAY);
    let (st, got) = f.read(64, f.pages(8, 3));
    assert_eq!((st, got), (RSP_OKAY, data));

    // Discard reads back as zeroes afterwards; the template never changes.
    assert_eq!(
        f.call(BlkifOp::Discard {
            sector: 64,
            nr_sectors: 8,
            secure: false
        }),
        RSP_OKAY
    );
    let (st, got) = f.read(64, f.pages(12, 1));
    assert_eq!((st, got), (RSP_OKAY, vec![0u8; PAGE]));
    assert_eq!(
        f.call(BlkifOp::Discard {
            sector: 64,
            nr_sectors: 8,
            secure: true
        }),
        RSP_EOPNOTSUPP,
        "secure discard is not offered"
    );
    assert_eq!(
        f.call(BlkifOp::Flush {
            sector: 0,
            segments: vec![]
        }),
        RSP_OKAY
    );
    assert_eq!(std::fs::read(&template).unwrap(), before);
    let s = exports.get("vm1").unwrap().stats.snapshot();
    assert!(
        s.writes >= 1 && s.reads >= 3 && s.trims == 1 && s.flushes >= 1,
        "{s:?}"
    );
    server.shutdown().unwrap();
}

#[test]
fn indirect_requests_move_hundreds_of_segments() {
    let h = Host0::new();
    let img = image(h.dir.path(), "ind.raw", 8192, 7);
    let server = h.serve(BlkifConfig::default());
    let dom = h.guest("ind");
    h.add_disk(dom, 51712, &format!("raw:{}", img.display()), "w");
    for setup in [
        X64,
        Setup {
            protocol: Some(Abi::X86_32),
            order: None,
            slot: 0,
        },
    ] {
        let mut f = if setup.protocol == Some(Abi::X86_64) {
            Front::connect(&h, dom, 51712, setup)
        } else {
            // Reconnect as a 32-bit frontend: close, then start over.
            f_reconnect(&h, dom, setup)
        };
        let n = 256usize;
        let segs = f.pages(0, n);
        let data = pattern(setup.protocol.map_or(0, |a| a as u8), n * PAGE);
        f.fill(&segs, &data);
        write_indirect_page(&f, &segs);
        let st = f.call(BlkifOp::Indirect {
            write: true,
            sector: 512,
            nr_segments: n as u16,
            pages: vec![f.indirect[0]],
        });
        assert_eq!(st, RSP_OKAY);
        assert_eq!(file_bytes(&img, 512 * SECTOR, n * PAGE), data);

        let back = f.pages(DATA_PAGES - 40, 40);
        write_indirect_page(&f, &back);
        let id = f.push(BlkifOp::Indirect {
            write: false,
            sector: 512 + 8,
            nr_segments: 40,
            pages: vec![f.indirect[0]],
        });
        let (rid, op, st) = f.response();
        assert_eq!((rid, op, st), (id, OP_READ, RSP_OKAY), "answered as READ");
        assert_eq!(f.collect(&back), data[PAGE..41 * PAGE].to_vec());
        f.set_state(5);
        h.wait_state(&backend_path(dom, 51712), 6);
    }
    server.shutdown().unwrap();
}

/// After the device went Closed: the frontend starts again (state 1), as blkfront does on
/// reconnect, and the backend offers InitWait again.
fn f_reconnect(h: &Host0, dom: DomId, setup: Setup) -> Front {
    let fe = frontend_path(dom, 51712);
    h.sim
        .xenstore()
        .connect(dom)
        .write(Tx::NONE, &format!("{fe}/state"), b"1")
        .unwrap();
    Front::connect(h, dom, 51712, setup)
}

fn write_indirect_page(f: &Front, segs: &[DataSegment]) {
    let bytes = encode_segments(segs);
    for (i, chunk) in bytes.chunks(PAGE).enumerate() {
        f.sim
            .guest_write(f.dom, f.base + INDIRECT_GFN + i as u64, 0, chunk)
            .unwrap();
    }
}

#[test]
fn malformed_requests_get_errors_and_the_ring_keeps_serving() {
    let h = Host0::new();
    let img = image(h.dir.path(), "m.raw", 1024, 11);
    let server = h.serve(BlkifConfig::default());
    let dom = h.guest("bad");
    h.add_disk(dom, 51712, &format!("raw:{}", img.display()), "w");
    let mut f = Front::connect(&h, dom, 51712, X64);
    let good_read = |f: &mut Front| {
        let (st, got) = f.read(0, f.pages(0, 1));
        assert_eq!((st, got), (RSP_OKAY, file_bytes(&img, 0, PAGE)));
    };
    let seg = |gref, first, last| DataSegment {
        gref,
        first_sect: first,
        last_sect: last,
    };
    // Rounds enough to wrap the 32-slot ring several times.
    for round in 0..12 {
        let g = f.data[1];
        let cases: Vec<(BlkifOp, i16)> = vec![
            (
                BlkifOp::Read {
                    sector: 0,
                    segments: vec![seg(g, 5, 4)],
                },
                RSP_ERROR,
            ),
            (
                BlkifOp::Write {
                    sector: 0,
                    segments: vec![seg(9999, 0, 7)],
                },
                RSP_ERROR,
            ),
            (
                BlkifOp::Read {
                    sector: 0,
                    segments: vec![seg(9999, 0, 7)],
                },
                RSP_ERROR,
            ),
            (
                BlkifOp::Read {
                    sector: 0,
                    segments: vec![],
                },
                RSP_ERROR,
            ),
            (
                BlkifOp::Read {
                    sector: 1020,
                    segments: f.pages(0, 1),
                },
                RSP_ERROR,
            ),
            (
                BlkifOp::Discard {
                    sector: 1000,
                    nr_sectors: 100,
                    secure: false,
                },
                RSP_ERROR,
            ),
        ];
        for (op, want) in cases {
            let what = format!("{op:?}");
            assert_eq!(f.call(op), want, "round {round}: {what}");
        }
        // Shapes the encoder cannot produce: patch the bytes.
        let mut b = encode_request(
            Abi::X86_64,
            &BlkifRequest {
                id: 5000 + round,
                handle: 0,
                op: BlkifOp::Read {
                    sector: 0,
                    segments: f.pages(0, 1),
                },
            },
        );
        b[29] = 8; // last_sect beyond the page
        f.push_bytes(&b);
        assert_eq!(f.response(), (5000 + round, OP_READ, RSP_ERROR));
        b[29] = 7;
        b[1] = 12; // nr_segments
        f.push_bytes(&b);
        assert_eq!(f.response(), (5000 + round, OP_READ, RSP_ERROR));
        b[1] = 1;
        b[0] = 77; // unknown operation
        f.push_bytes(&b);
        assert_eq!(f.response(), (5000 + round, 77, RSP_EOPNOTSUPP));
        // An indirect request whose descriptor page holds a bad segment.
        write_indirect_page(&f, &[seg(g, 0, 7), seg(g, 6, 2)]);
        assert_eq!(
            f.call(BlkifOp::Indirect {
                write: false,
                sector: 0,
                nr_segments: 2,
                pages: vec![f.indirect[0]]
            }),
            RSP_ERROR
        );
        // An indirect page the backend may not read.
        assert_eq!(
            f.call(BlkifOp::Indirect {
                write: false,
                sector: 0,
                nr_segments: 2,
                pages: vec![4242]
            }),
            RSP_ERROR
        );
        good_read(&mut f);
    }
    assert!(f.next_id > 100);
    // A bad gref in a write never touched the disk.
    assert_eq!(std::fs::read(&img).unwrap(), pattern(11, 1024 * SECTOR));
    server.shutdown().unwrap();
}

#[test]
fn read_only_mode_refuses_writes_and_offers_no_discard() {
    let h = Host0::new();
    let img = image(h.dir.path(), "ro.raw", 256, 13);
    let server = h.serve(BlkifConfig::default());
    let dom = h.guest("ro");
    h.add_disk(dom, 51712, &format!("raw:{}", img.display()), "r");
    let mut f = Front::connect(&h, dom, 51712, X64);
    let be = backend_path(dom, 51712);
    assert_eq!(h.read(&format!("{be}/info")).as_deref(), Some("4"));
    assert_eq!(
        h.read(&format!("{be}/feature-discard")).as_deref(),
        Some("0")
    );
    assert_eq!(f.write(0, f.pages(0, 1), &[1u8; PAGE]), RSP_ERROR);
    assert_eq!(
        f.call(BlkifOp::Discard {
            sector: 0,
            nr_sectors: 8,
            secure: false
        }),
        RSP_EOPNOTSUPP
    );
    let (st, got) = f.read(0, f.pages(1, 1));
    assert_eq!((st, got), (RSP_OKAY, file_bytes(&img, 0, PAGE)));
    assert_eq!(std::fs::read(&img).unwrap(), pattern(13, 256 * SECTOR));
    server.shutdown().unwrap();
}

#[test]
fn injected_grant_copy_faults_fail_only_their_request() {
    let h = Host0::new();
    let img = image(h.dir.path(), "f.raw", 1024, 17);
    let server = h.serve(BlkifConfig::default());
    let dom = h.guest("faulty");
    h.add_disk(dom, 51712, &format!("raw:{}", img.display()), "w");
    let mut f = Front::connect(&h, dom, 51712, X64);

    h.sim
        .inject(
            "gnttab.copy",
            Fault::FailNth {
                nth: 1,
                errno: libc::EIO,
            },
        )
        .unwrap();
    let data = pattern(99, PAGE);
    assert_eq!(
        f.write(8, f.pages(0, 1), &data),
        RSP_ERROR,
        "copy from guest failed"
    );
    assert_eq!(
        file_bytes(&img, 8 * SECTOR, PAGE),
        pattern(17, 1024 * SECTOR)[8 * SECTOR..8 * SECTOR + PAGE].to_vec()
    );
    assert_eq!(f.write(8, f.pages(0, 1), &data), RSP_OKAY);
    h.sim
        .inject(
            "gnttab.copy",
            Fault::FailNth {
                nth: 1,
                errno: libc::EAGAIN,
            },
        )
        .unwrap();
    assert_eq!(
        f.read(8, f.pages(1, 1)).0,
        RSP_ERROR,
        "copy to guest failed"
    );
    let (st, got) = f.read(8, f.pages(1, 1));
    assert_eq!((st, got), (RSP_OKAY, data));
    server.shutdown().unwrap();
}

#[test]
fn frontend_closing_drains_unmaps_unbinds_and_the_device_can_come_back() {
    let h = Host0::new();
    let img = image(h.dir.path(), "c.raw", 1024, 19);
    let server = h.serve(BlkifConfig::default());
    let dom = h.guest("closer");
    h.add_disk(dom, 51712, &format!("raw:{}", img.display()), "w");
    let mut f = Front::connect(
        &h,
        dom,
        51712,
        Setup {
            protocol: Some(Abi::X86_64),
            order: Some(1),
            slot: 0,
        },
    );
    // Requests in flight when the frontend starts closing are still answered.
    let ids: Vec<u64> = (0..20)
        .map(|k| {
            f.push(BlkifOp::Read {
                sector: k * 8,
                segments: f.pages(k as usize, 1),
            })
        })
        .collect();
    f.set_state(5);
    let be = backend_path(dom, 51712);
    h.wait_state(&be, 6);
    let mut answered: Vec<u64> = (0..20).map(|_| f.response().0).collect();
    answered.sort_unstable();
    assert_eq!(answered, ids);

    // Nothing of the guest stays mapped or bound: the ring grants can be revoked (EBUSY if
    // still mapped) and the guest's port is free for a new backend to bind.
    let (ring_grefs, port) = (f.ring_grefs.clone(), f.port);
    f.ring = None;
    for g in &ring_grefs {
        h.sim
            .revoke_grant(dom, *g)
            .expect("ring grant still mapped after Closed");
    }
    let probe = EventChannels::open(&h.sim).unwrap();
    probe
        .bind_interdomain(dom, port)
        .expect("port still bound after Closed");
    drop(probe);
    // The toolstack's keys are still there.
    for k in ["params", "frontend", "frontend-id", "mode", "online"] {
        assert!(h.read(&format!("{be}/{k}")).is_some(), "{k} removed");
    }

    // libxl removes the device, then attaches it again.
    h.remove_disk(dom, 51712);
    h.add_disk(dom, 51712, &format!("raw:{}", img.display()), "w");
    let mut f2 = Front::connect(&h, dom, 51712, X64);
    let (st, got) = f2.read(0, f2.pages(0, 1));
    assert_eq!((st, got), (RSP_OKAY, file_bytes(&img, 0, PAGE)));
    server.shutdown().unwrap();
}

#[test]
fn toolstack_close_request_and_guest_destruction_release_everything() {
    let h = Host0::new();
    let img = image(h.dir.path(), "t.raw", 1024, 23);
    let server = h.serve(BlkifConfig::default());
    let dom = h.guest("detach");
    h.add_disk(dom, 51712, &format!("raw:{}", img.display()), "w");
    let mut f = Front::connect(&h, dom, 51712, X64);
    assert_eq!(f.read(0, f.pages(0, 1)).0, RSP_OKAY);
    // xl block-detach: libxl sets online=0 and the backend's state to Closing.
    let be = backend_path(dom, 51712);
    let xs = h.xs0();
    xs.write(Tx::NONE, &format!("{be}/online"), b"0").unwrap();
    xs.write(Tx::NONE, &format!("{be}/state"), b"5").unwrap();
    h.wait_state(&be, 6);
    f.ring = None;
    for g in f.ring_grefs.clone() {
        h.sim.revoke_grant(dom, g).unwrap();
    }

    // A second guest is destroyed while connected: its frontend directory disappears.
    let dom2 = h.guest("doomed");
    h.add_disk(dom2, 51712, &format!("raw:{}", img.display()), "w");
    let mut g = Front::connect(&h, dom2, 51712, X64);
    assert_eq!(g.read(0, g.pages(0, 1)).0, RSP_OKAY);
    g.ring = None;
    h.sim.destroy_domain(dom2).unwrap();
    h.wait_state(&backend_path(dom2, 51712), 6);
    server.shutdown().unwrap();
}

#[test]
fn two_devices_at_once_each_see_their_own_disk() {
    let h = Host0::new();
    let a = image(h.dir.path(), "a.raw", 2048, 29);
    let b = image(h.dir.path(), "b.raw", 2048, 31);
    let server = h.serve(BlkifConfig {
        workers: 4,
        ..BlkifConfig::default()
    });
    let d1 = h.guest("one");
    let d2 = h.guest("two");
    h.add_disk(d1, 51712, &format!("raw:{}", a.display()), "w");
    h.add_disk(d2, 51712, &format!("raw:{}", b.display()), "w");
    h.add_disk(d2, 51728, &format!("raw:{}", a.display()), "r");
    let mut f1 = Front::connect(&h, d1, 51712, X64);
    let mut f2 = Front::connect(
        &h,
        d2,
        51712,
        Setup {
            protocol: None,
            order: Some(3),
            slot: 0,
        },
    );
    let mut f3 = Front::connect(&h, d2, 51728, Setup { slot: 1, ..X64 });
    let stats = server.stats().lock().len();
    assert_eq!(stats, 3);
    let t1 = std::thread::spawn(move || {
        for n in 0..100u64 {
            let data = pattern(n as u8, PAGE);
            assert_eq!(f1.write(n * 8, f1.pages(0, 1), &data), RSP_OKAY);
        }
        f1
    });
    let t2 = std::thread::spawn(move || {
        for n in 0..100u64 {
            let data = pattern(200u8.wrapping_add(n as u8), PAGE);
            assert_eq!(f2.write(n * 8, f2.pages(0, 1), &data), RSP_OKAY);
        }
        f2
    });
    let _f1 = t1.join().unwrap();
    let _f2 = t2.join().unwrap();
    for n in 0..100usize {
        assert_eq!(file_bytes(&a, n * PAGE, PAGE), pattern(n as u8, PAGE));
        assert_eq!(
            file_bytes(&b, n * PAGE, PAGE),
            pattern(200u8.wrapping_add(n as u8), PAGE)
        );
    }
    // The read-only view of disk a sees d1's writes.
    let (st, got) = f3.read(8, f3.pages(0, 1));
    assert_eq!((st, got), (RSP_OKAY, pattern(1, PAGE)));
    server.shutdown().unwrap();
}

#[test]
fn restarted_backend_reattaches_and_answers_requests_left_on_the_ring() {
    let h = Host0::new();
    let img = image(h.dir.path(), "r.raw", 1024, 37);
    let server = h.serve(BlkifConfig::default());
    let dom = h.guest("survivor");
    h.add_disk(dom, 51712, &format!("raw:{}", img.display()), "w");
    let mut f = Front::connect(&h, dom, 51712, X64);
    assert_eq!(f.read(0, f.pages(0, 1)).0, RSP_OKAY);
    server.shutdown().unwrap();
    assert_eq!(
        h.read(&format!("{}/state", backend_path(dom, 51712)))
            .as_deref(),
        Some("4")
    );
    // The guest keeps issuing while no backend runs.
    let data = pattern(3, PAGE);
    f.fill(&f.pages(1, 1), &data);
    let id = f.push(BlkifOp::Write {
        sector: 16,
        segments: f.pages(1, 1),
    });
    let server = h.serve(BlkifConfig::default());
    let (rid, op, st) = f.response();
    assert_eq!((rid, op, st), (id, OP_WRITE, RSP_OKAY));
    assert_eq!(file_bytes(&img, 16 * SECTOR, PAGE), data);
    let (st, got) = f.read(16, f.pages(2, 1));
    assert_eq!((st, got), (RSP_OKAY, data));
    server.shutdown().unwrap();
    let _ = OP_DISCARD;
    let _ = OP_FLUSH_DISKCACHE;
}

/// Failover tier 1 with requests finishing out of order: the backend dies (as a SIGKILLed
/// process: nothing answered, ring unmapped, port closed) after the disk finished a later
/// request while an earlier one was still running. A new backend re-attaches to the live ring
/// and must answer both exactly once: none lost, none answered twice (blkfront disables a
/// disk that gets an answer for a request it is not waiting for).
#[test]
fn killed_backend_with_requests_finishing_out_of_order_loses_none_and_answers_none_twice() {
    let h = Host0::new();
    let img = image(h.dir.path(), "k.raw", 1024, 43);
    let server = h.serve(BlkifConfig {
        workers: 4,
        ..BlkifConfig::default()
    });
    let dom = h.guest("killed");
    h.add_disk(dom, 51712, &format!("raw:{}", img.display()), "w");
    let mut f = Front::connect(&h, dom, 51712, X64);
    assert_eq!(f.read(0, f.pages(0, 1)).0, RSP_OKAY);

    // Every grant copy now takes DELAY: the indirect write makes two (its segment page, then
    // its data), the plain write one, so the plain write, taken second, finishes first.
    const DELAY: Duration = Duration::from_secs(2);
    h.sim.inject("gnttab.copy", Fault::Delay(DELAY)).unwrap();
    let a_segs = f.pages(10, 12);
    let a_data = pattern(5, 12 * PAGE);
    f.fill(&a_segs, &a_data);
    write_indirect_page(&f, &a_segs);
    let a = f.push(BlkifOp::Indirect {
        write: true,
        sector: 64,
        nr_segments: 12,
        pages: vec![f.indirect[0]],
    });
    let b_data = pattern(6, PAGE);
    f.fill(&f.pages(30, 1), &b_data);
    let b = f.push(BlkifOp::Write {
        sector: 8,
        segments: f.pages(30, 1),
    });
    let waited = std::time::Instant::now();
    while file_bytes(&img, 8 * SECTOR, PAGE) != b_data {
        assert!(
            waited.elapsed() < PATIENCE,
            "the plain write never reached the disk"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    server.crash().unwrap();
    assert_ne!(
        file_bytes(&img, 64 * SECTOR, 12 * PAGE),
        a_data,
        "setup: the indirect write had finished too before the kill"
    );
    h.sim.clear_faults();

    let server = h.serve(BlkifConfig::default());
    let mut answered = vec![f.response(), f.response()];
    answered.sort_unstable();
    assert_eq!(
        answered,
        vec![(a, OP_WRITE, RSP_OKAY), (b, OP_WRITE, RSP_OKAY)],
        "each request answered once, as a write"
    );
    assert_eq!(file_bytes(&img, 64 * SECTOR, 12 * PAGE), a_data);
    assert_eq!(file_bytes(&img, 8 * SECTOR, PAGE), b_data);
    // No stray third answer: the next one is for the next request.
    let (st, got) = f.read(8, f.pages(40, 1));
    assert_eq!((st, got), (RSP_OKAY, b_data));
    server.shutdown().unwrap();
}

/// Failover tier 1, the narrowest kill: the backend wrote one request's response into its
/// slot but died before publishing `rsp_prod`. The slot now holds a (marked) response, not the
/// request; a new backend publishes it instead of reading it as a request, replays the other
/// request in flight, and nothing is answered twice.
#[test]
fn killed_between_writing_and_publishing_a_response_the_new_backend_publishes_it() {
    let h = Host0::new();
    let img = image(h.dir.path(), "w.raw", 1024, 53);
    let server = h.serve(BlkifConfig::default());
    let dom = h.guest("narrow");
    h.add_disk(dom, 51712, &format!("raw:{}", img.display()), "w");
    let mut f = Front::connect(&h, dom, 51712, X64);
    assert_eq!(f.read(0, f.pages(0, 1)).0, RSP_OKAY);

    h.sim
        .inject("gnttab.copy", Fault::Delay(Duration::from_secs(2)))
        .unwrap();
    let (d1, d2) = (pattern(9, PAGE), pattern(10, PAGE));
    f.fill(&f.pages(1, 1), &d1);
    f.fill(&f.pages(2, 1), &d2);
    let w1 = f.push(BlkifOp::Write {
        sector: 8,
        segments: f.pages(1, 1),
    });
    let w2 = f.push(BlkifOp::Write {
        sector: 16,
        segments: f.pages(2, 1),
    });
    server.crash().unwrap();
    h.sim.clear_faults();
    // What the dead process had done for w1: the write, and its response in w1's slot, as the
    // backend writes it (id, operation, pad, status, mark), with rsp_prod not advanced.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .and_then(|file| std::os::unix::fs::FileExt::write_all_at(&file, &d1, 8 * SECTOR as u64))
        .unwrap();
    let header = h.sim.guest_read(dom, f.base).unwrap();
    let rsp_prod = u32::from_le_bytes(header[8..12].try_into().unwrap());
    let slot = rsp_prod as usize % 32; // a one-page x86_64 ring has 32 slots
    let mut rsp = Vec::new();
    rsp.extend_from_slice(&w1.to_le_bytes());
    rsp.extend_from_slice(&[OP_WRITE, 0]);
    rsp.extend_from_slice(&RSP_OKAY.to_le_bytes());
    rsp.extend_from_slice(&RESPONSE_MARK.to_le_bytes());
    h.sim
        .guest_write(dom, f.base, 64 + slot * 112, &rsp)
        .unwrap();

    let server = h.serve(BlkifConfig::default());
    let mut answered = vec![f.response(), f.response()];
    answered.sort_unstable();
    assert_eq!(
        answered,
        vec![(w1, OP_WRITE, RSP_OKAY), (w2, OP_WRITE, RSP_OKAY)]
    );
    assert_eq!(file_bytes(&img, 8 * SECTOR, PAGE), d1);
    assert_eq!(file_bytes(&img, 16 * SECTOR, PAGE), d2);
    let (st, got) = f.read(16, f.pages(3, 1));
    assert_eq!((st, got), (RSP_OKAY, d2));
    server.shutdown().unwrap();
}

/// Failover tier 2 on the simulator (no second driver domain runs in the Xen-under-QEMU
/// stage): the driver domain serving a disk dies with writes in flight; the toolstack moves
/// the device to a standby driver domain (`move_frontend`) and the guest goes through
/// suspend/resume, where blkfront makes a new ring for the new backend and re-issues what
/// was in flight. Every write reaches the disk once answered, none is lost, and the disk
/// keeps serving from the standby.
#[test]
fn driver_domain_death_moves_the_disk_to_a_standby_domain_and_no_write_is_lost() {
    let h = Host0::new();
    let img = image(h.dir.path(), "t2.raw", 1024, 47);
    let primary = h.serve(BlkifConfig::default());
    let standby_dom = h
        .sim
        .create_domain(DomainSpec::pv("standby-driver", 16))
        .unwrap();
    let standby = BlkifServer::spawn(
        Host::from_sim(h.sim.acting_as(standby_dom)),
        BlkifConfig {
            backend_domid: standby_dom,
            ..BlkifConfig::default()
        },
    )
    .unwrap();
    let dom = h.guest("moved");
    h.add_disk(dom, 51712, &format!("raw:{}", img.display()), "w");
    let mut f = Front::connect(&h, dom, 51712, X64);
    let before = pattern(8, PAGE);
    assert_eq!(f.write(0, f.pages(0, 1), &before), RSP_OKAY);

    // Three writes in flight (every grant copy stalls) when the driver domain dies.
    h.sim
        .inject("gnttab.copy", Fault::Delay(Duration::from_secs(2)))
        .unwrap();
    let writes: Vec<(u64, usize, Vec<u8>)> = (1..=3u8)
        .map(|k| {
            (
                u64::from(k) * 64,
                usize::from(k) * 2,
                pattern(100 + k, 2 * PAGE),
            )
        })
        .collect();
    for (sector, page, data) in &writes {
        f.fill(&f.pages(*page, 2), data);
        f.push(BlkifOp::Write {
            sector: *sector,
            segments: f.pages(*page, 2),
        });
    }
    primary.crash().unwrap();
    assert!(f.try_response().is_none(), "setup: a write was answered");
    h.sim.clear_faults();

    // The toolstack's half, then the guest's suspend/resume.
    let old = backend_path(dom, 51712);
    let new = move_frontend(&h.xs0(), &old, standby_dom, "vbd3").unwrap();
    assert_eq!(
        new,
        format!("/local/domain/{standby_dom}/backend/vbd3/{dom}/51712")
    );
    let fe = frontend_path(dom, 51712);
    assert_eq!(h.read(&format!("{fe}/backend")), Some(new.clone()));
    assert_eq!(
        h.read(&format!("{fe}/backend-id")),
        Some(standby_dom.to_string())
    );
    assert_eq!(
        h.read(&format!("{new}/params")),
        h.read(&format!("{old}/params"))
    );
    let mut f = f.resume(&h);
    assert_eq!(h.read(&format!("{new}/state")).as_deref(), Some("4"));
    let ids: Vec<u64> = writes
        .iter()
        .map(|(sector, page, _)| {
            f.push(BlkifOp::Write {
                sector: *sector,
                segments: f.pages(*page, 2),
            })
        })
        .collect();
    let mut answered: Vec<(u64, u8, i16)> = ids.iter().map(|_| f.response()).collect();
    answered.sort_unstable();
    let want: Vec<(u64, u8, i16)> = ids.iter().map(|id| (*id, OP_WRITE, RSP_OKAY)).collect();
    assert_eq!(answered, want);
    for (sector, _, data) in &writes {
        assert_eq!(&file_bytes(&img, *sector as usize * SECTOR, 2 * PAGE), data);
    }
    let (st, got) = f.read(0, f.pages(20, 1));
    assert_eq!((st, got), (RSP_OKAY, before));
    let stats = standby.stats().lock().len();
    assert_eq!(stats, 1, "the standby serves the disk");
    standby.shutdown().unwrap();
}

#[test]
fn unusable_devices_are_refused_without_stopping_the_others() {
    let h = Host0::new();
    let img = image(h.dir.path(), "ok.raw", 256, 41);
    let server = h.serve(BlkifConfig::default());
    let dom = h.guest("mixed");
    h.add_disk(dom, 51712, "raw:/nonexistent/disk.raw", "w");
    h.add_disk(dom, 51728, &format!("vhd:{}", img.display()), "w");
    h.add_disk(dom, 51744, &format!("raw:{}", img.display()), "w");
    let mut f = Front::connect(&h, dom, 51744, Setup { slot: 1, ..X64 });
    let (st, got) = f.read(0, f.pages(0, 1));
    assert_eq!((st, got), (RSP_OKAY, file_bytes(&img, 0, PAGE)));
    for devid in [51712, 51728] {
        let be = backend_path(dom, devid);
        assert_eq!(
            h.read(&format!("{be}/state")).as_deref(),
            Some("1"),
            "{devid}"
        );
        assert_eq!(
            h.read(&format!("{be}/sectors")),
            None,
            "{devid} offered a disk"
        );
    }

    // A frontend speaking an ABI this backend does not: the device closes, nothing mapped.
    let dom2 = h.guest("arm");
    h.add_disk(dom2, 51712, &format!("raw:{}", img.display()), "w");
    let be = backend_path(dom2, 51712);
    h.wait_state(&be, 2);
    let gref = h.sim.grant_access(dom2, 0, 0, false).unwrap();
    let port = h.sim.evtchn_alloc_unbound(dom2, 0).unwrap();
    let guest = h.sim.xenstore().connect(dom2);
    let fe = frontend_path(dom2, 51712);
    for (k, v) in [
        ("ring-ref", gref.to_string()),
        ("event-channel", port.to_string()),
        ("protocol", "arm-abi".into()),
        ("state", "3".into()),
    ] {
        guest
            .write(Tx::NONE, &format!("{fe}/{k}"), v.as_bytes())
            .unwrap();
    }
    h.wait_state(&be, 6);
    h.sim.revoke_grant(dom2, gref).unwrap();
    // A ring order above the offer is refused the same way.
    let dom3 = h.guest("greedy");
    h.add_disk(dom3, 51712, &format!("raw:{}", img.display()), "w");
    let be = backend_path(dom3, 51712);
    h.wait_state(&be, 2);
    let guest = h.sim.xenstore().connect(dom3);
    let fe = frontend_path(dom3, 51712);
    for (k, v) in [
        ("ring-page-order", "9".to_string()),
        ("event-channel", "1".into()),
        ("state", "3".into()),
    ] {
        guest
            .write(Tx::NONE, &format!("{fe}/{k}"), v.as_bytes())
            .unwrap();
    }
    h.wait_state(&be, 6);
    server.shutdown().unwrap();
}

#[test]
fn connect_failures_release_what_was_taken_and_a_reconnect_succeeds() {
    let h = Host0::new();
    let img = image(h.dir.path(), "cf.raw", 256, 43);
    let server = h.serve(BlkifConfig::default());
    let dom = h.guest("unlucky");
    h.add_disk(dom, 51712, &format!("raw:{}", img.display()), "w");
    let be = backend_path(dom, 51712);
    for op in ["gnttab.map", "evtchn.bind"] {
        h.sim
            .inject(
                op,
                Fault::FailNth {
                    nth: 1,
                    errno: libc::ENOMEM,
                },
            )
            .unwrap();
        let mut f = Front::initialise(&h, dom, 51712, X64);
        h.wait_state(&be, 6);
        // The ring mapped before a failed bind was released again.
        f.ring = None;
        for g in f.ring_grefs.clone() {
            h.sim
                .revoke_grant(dom, g)
                .expect("ring left mapped after a failed connect");
        }
        // blkfront starts over.
        f.set_state(1);
    }
    let mut f = Front::connect(&h, dom, 51712, X64);
    let (st, got) = f.read(0, f.pages(0, 1));
    assert_eq!((st, got), (RSP_OKAY, file_bytes(&img, 0, PAGE)));
    server.shutdown().unwrap();
}
