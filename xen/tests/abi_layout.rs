//! Every `#[repr(C)]` ABI struct of `remoca_xen::abi` against Debian's `libxen-dev` headers:
//! a small C program built with the system compiler prints sizeof/offsetof and the
//! constants we copy, and each must equal what Rust computes for our definition.
//!
//! Without the headers the test says so and passes, unless `REMOCA_REQUIRE_LIBXEN=1` (set
//! by `.ci/run`, which installs `libxen-dev`), where their absence is a failure.

use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};
use std::process::Command;

use remoca_xen::abi::{blkif, domctl::DomainInfoRaw, gnttab::GrantCopySegment, ring, vm_event};

/// (key, C expression, Rust value). Keys are what a failure names.
fn expected() -> Vec<(&'static str, &'static str, u64)> {
    macro_rules! size {
        ($key:literal, $c:literal, $t:ty) => {
            ($key, concat!("sizeof(", $c, ")"), size_of::<$t>() as u64)
        };
    }
    macro_rules! off {
        ($key:literal, $c:literal, $cf:literal, $t:ty, $f:ident) => {
            (
                $key,
                concat!("offsetof(", $c, ", ", $cf, ")"),
                offset_of!($t, $f) as u64,
            )
        };
    }
    vec![
        // blkif (io/blkif.h), x86_64 layout.
        size!("blkif_request", "blkif_request_t", blkif::Request),
        off!(
            "blkif_request.operation",
            "blkif_request_t",
            "operation",
            blkif::Request,
            operation
        ),
        off!(
            "blkif_request.nr_segments",
            "blkif_request_t",
            "nr_segments",
            blkif::Request,
            nr_segments
        ),
        off!(
            "blkif_request.handle",
            "blkif_request_t",
            "handle",
            blkif::Request,
            handle
        ),
        off!(
            "blkif_request.id",
            "blkif_request_t",
            "id",
            blkif::Request,
            id
        ),
        off!(
            "blkif_request.sector_number",
            "blkif_request_t",
            "sector_number",
            blkif::Request,
            sector_number
        ),
        off!(
            "blkif_request.seg",
            "blkif_request_t",
            "seg",
            blkif::Request,
            seg
        ),
        size!(
            "blkif_request_segment",
            "struct blkif_request_segment",
            blkif::Segment
        ),
        off!(
            "blkif_request_segment.gref",
            "struct blkif_request_segment",
            "gref",
            blkif::Segment,
            gref
        ),
        off!(
            "blkif_request_segment.first_sect",
            "struct blkif_request_segment",
            "first_sect",
            blkif::Segment,
            first_sect
        ),
        off!(
            "blkif_request_segment.last_sect",
            "struct blkif_request_segment",
            "last_sect",
            blkif::Segment,
            last_sect
        ),
        size!(
            "blkif_request_discard",
            "struct blkif_request_discard",
            blkif::DiscardRequest
        ),
        off!(
            "blkif_request_discard.flag",
            "struct blkif_request_discard",
            "flag",
            blkif::DiscardRequest,
            flag
        ),
        off!(
            "blkif_request_discard.id",
            "struct blkif_request_discard",
            "id",
            blkif::DiscardRequest,
            id
        ),
        off!(
            "blkif_request_discard.sector_number",
            "struct blkif_request_discard",
            "sector_number",
            blkif::DiscardRequest,
            sector_number
        ),
        off!(
            "blkif_request_discard.nr_sectors",
            "struct blkif_request_discard",
            "nr_sectors",
            blkif::DiscardRequest,
            nr_sectors
        ),
        size!(
            "blkif_request_indirect",
            "struct blkif_request_indirect",
            blkif::IndirectRequest
        ),
        off!(
            "blkif_request_indirect.indirect_op",
            "struct blkif_request_indirect",
            "indirect_op",
            blkif::IndirectRequest,
            indirect_op
        ),
        off!(
            "blkif_request_indirect.nr_segments",
            "struct blkif_request_indirect",
            "nr_segments",
            blkif::IndirectRequest,
            nr_segments
        ),
        off!(
            "blkif_request_indirect.id",
            "struct blkif_request_indirect",
            "id",
            blkif::IndirectRequest,
            id
        ),
        off!(
            "blkif_request_indirect.sector_number",
            "struct blkif_request_indirect",
            "sector_number",
            blkif::IndirectRequest,
            sector_number
        ),
        off!(
            "blkif_request_indirect.handle",
            "struct blkif_request_indirect",
            "handle",
            blkif::IndirectRequest,
            handle
        ),
        off!(
            "blkif_request_indirect.indirect_grefs",
            "struct blkif_request_indirect",
            "indirect_grefs",
            blkif::IndirectRequest,
            indirect_grefs
        ),
        size!("blkif_response", "blkif_response_t", blkif::Response),
        off!(
            "blkif_response.id",
            "blkif_response_t",
            "id",
            blkif::Response,
            id
        ),
        off!(
            "blkif_response.operation",
            "blkif_response_t",
            "operation",
            blkif::Response,
            operation
        ),
        off!(
            "blkif_response.status",
            "blkif_response_t",
            "status",
            blkif::Response,
            status
        ),
        (
            "BLKIF_MAX_SEGMENTS_PER_REQUEST",
            "BLKIF_MAX_SEGMENTS_PER_REQUEST",
            blkif::MAX_SEGMENTS as u64,
        ),
        (
            "BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST",
            "BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST",
            blkif::MAX_INDIRECT_PAGES as u64,
        ),
        ("BLKIF_OP_READ", "BLKIF_OP_READ", blkif::OP_READ as u64),
        ("BLKIF_OP_WRITE", "BLKIF_OP_WRITE", blkif::OP_WRITE as u64),
        (
            "BLKIF_OP_FLUSH_DISKCACHE",
            "BLKIF_OP_FLUSH_DISKCACHE",
            blkif::OP_FLUSH_DISKCACHE as u64,
        ),
        (
            "BLKIF_OP_DISCARD",
            "BLKIF_OP_DISCARD",
            blkif::OP_DISCARD as u64,
        ),
        (
            "BLKIF_OP_INDIRECT",
            "BLKIF_OP_INDIRECT",
            blkif::OP_INDIRECT as u64,
        ),
        (
            "__CONST_RING_SIZE(blkif, 4096)",
            "__CONST_RING_SIZE(blkif, 4096)",
            blkif::RING_SIZE_ONE_PAGE as u64,
        ),
        // Shared-ring header (io/ring.h through blkif's DEFINE_RING_TYPES).
        (
            "sring.req_prod",
            "offsetof(struct blkif_sring, req_prod)",
            ring::REQ_PROD as u64,
        ),
        (
            "sring.req_event",
            "offsetof(struct blkif_sring, req_event)",
            ring::REQ_EVENT as u64,
        ),
        (
            "sring.rsp_prod",
            "offsetof(struct blkif_sring, rsp_prod)",
            ring::RSP_PROD as u64,
        ),
        (
            "sring.rsp_event",
            "offsetof(struct blkif_sring, rsp_event)",
            ring::RSP_EVENT as u64,
        ),
        (
            "sring.ring",
            "offsetof(struct blkif_sring, ring)",
            ring::ENTRIES as u64,
        ),
        (
            "sring header",
            "offsetof(struct blkif_sring, ring)",
            size_of::<ring::SringHeader>() as u64,
        ),
        // vm_event (xen/vm_event.h).
        size!("vm_event_request", "vm_event_request_t", vm_event::VmEvent),
        size!(
            "vm_event_response",
            "vm_event_response_t",
            vm_event::VmEvent
        ),
        off!(
            "vm_event.version",
            "vm_event_request_t",
            "version",
            vm_event::VmEvent,
            version
        ),
        off!(
            "vm_event.flags",
            "vm_event_request_t",
            "flags",
            vm_event::VmEvent,
            flags
        ),
        off!(
            "vm_event.reason",
            "vm_event_request_t",
            "reason",
            vm_event::VmEvent,
            reason
        ),
        off!(
            "vm_event.vcpu_id",
            "vm_event_request_t",
            "vcpu_id",
            vm_event::VmEvent,
            vcpu_id
        ),
        off!(
            "vm_event.altp2m_idx",
            "vm_event_request_t",
            "altp2m_idx",
            vm_event::VmEvent,
            altp2m_idx
        ),
        off!(
            "vm_event.u",
            "vm_event_request_t",
            "u",
            vm_event::VmEvent,
            u
        ),
        off!(
            "vm_event.data",
            "vm_event_request_t",
            "data",
            vm_event::VmEvent,
            data
        ),
        size!(
            "vm_event_paging",
            "struct vm_event_paging",
            vm_event::Paging
        ),
        off!(
            "vm_event_paging.gfn",
            "struct vm_event_paging",
            "gfn",
            vm_event::Paging,
            gfn
        ),
        off!(
            "vm_event_paging.p2mt",
            "struct vm_event_paging",
            "p2mt",
            vm_event::Paging,
            p2mt
        ),
        off!(
            "vm_event_paging.flags",
            "struct vm_event_paging",
            "flags",
            vm_event::Paging,
            flags
        ),
        (
            "VM_EVENT_INTERFACE_VERSION",
            "VM_EVENT_INTERFACE_VERSION",
            vm_event::INTERFACE_VERSION as u64,
        ),
        (
            "VM_EVENT_FLAG_VCPU_PAUSED",
            "VM_EVENT_FLAG_VCPU_PAUSED",
            vm_event::FLAG_VCPU_PAUSED as u64,
        ),
        (
            "VM_EVENT_REASON_MEM_PAGING",
            "VM_EVENT_REASON_MEM_PAGING",
            vm_event::REASON_MEM_PAGING as u64,
        ),
        (
            "MEM_PAGING_DROP_PAGE",
            "MEM_PAGING_DROP_PAGE",
            vm_event::PAGING_DROP_PAGE as u64,
        ),
        (
            "MEM_PAGING_EVICT_FAIL",
            "MEM_PAGING_EVICT_FAIL",
            vm_event::PAGING_EVICT_FAIL as u64,
        ),
        (
            "HVM_PARAM_PAGING_RING_PFN",
            "HVM_PARAM_PAGING_RING_PFN",
            vm_event::HVM_PARAM_PAGING_RING_PFN as u64,
        ),
        // xc_domaininfo_t (xenctrl.h; struct xen_domctl_getdomaininfo).
        size!("xc_domaininfo_t", "xc_domaininfo_t", DomainInfoRaw),
        off!(
            "domaininfo.domain",
            "xc_domaininfo_t",
            "domain",
            DomainInfoRaw,
            domain
        ),
        off!(
            "domaininfo.flags",
            "xc_domaininfo_t",
            "flags",
            DomainInfoRaw,
            flags
        ),
        off!(
            "domaininfo.tot_pages",
            "xc_domaininfo_t",
            "tot_pages",
            DomainInfoRaw,
            tot_pages
        ),
        off!(
            "domaininfo.max_pages",
            "xc_domaininfo_t",
            "max_pages",
            DomainInfoRaw,
            max_pages
        ),
        off!(
            "domaininfo.outstanding_pages",
            "xc_domaininfo_t",
            "outstanding_pages",
            DomainInfoRaw,
            outstanding_pages
        ),
        off!(
            "domaininfo.shr_pages",
            "xc_domaininfo_t",
            "shr_pages",
            DomainInfoRaw,
            shr_pages
        ),
        off!(
            "domaininfo.paged_pages",
            "xc_domaininfo_t",
            "paged_pages",
            DomainInfoRaw,
            paged_pages
        ),
        off!(
            "domaininfo.shared_info_frame",
            "xc_domaininfo_t",
            "shared_info_frame",
            DomainInfoRaw,
            shared_info_frame
        ),
        off!(
            "domaininfo.cpu_time",
            "xc_domaininfo_t",
            "cpu_time",
            DomainInfoRaw,
            cpu_time
        ),
        off!(
            "domaininfo.nr_online_vcpus",
            "xc_domaininfo_t",
            "nr_online_vcpus",
            DomainInfoRaw,
            nr_online_vcpus
        ),
        off!(
            "domaininfo.max_vcpu_id",
            "xc_domaininfo_t",
            "max_vcpu_id",
            DomainInfoRaw,
            max_vcpu_id
        ),
        off!(
            "domaininfo.ssidref",
            "xc_domaininfo_t",
            "ssidref",
            DomainInfoRaw,
            ssidref
        ),
        off!(
            "domaininfo.handle",
            "xc_domaininfo_t",
            "handle",
            DomainInfoRaw,
            handle
        ),
        off!(
            "domaininfo.cpupool",
            "xc_domaininfo_t",
            "cpupool",
            DomainInfoRaw,
            cpupool
        ),
        off!(
            "domaininfo.gpaddr_bits",
            "xc_domaininfo_t",
            "gpaddr_bits",
            DomainInfoRaw,
            gpaddr_bits
        ),
        off!(
            "domaininfo.arch_config",
            "xc_domaininfo_t",
            "arch_config",
            DomainInfoRaw,
            arch_config
        ),
        ("XEN_DOMINF_paused", "XEN_DOMINF_paused", 1 << 3),
        ("XEN_DOMINF_hap", "XEN_DOMINF_hap", 1 << 8),
        // Grant copy (xengnttab.h).
        size!(
            "xengnttab_grant_copy_segment_t",
            "xengnttab_grant_copy_segment_t",
            GrantCopySegment
        ),
        off!(
            "grant_copy.source",
            "xengnttab_grant_copy_segment_t",
            "source",
            GrantCopySegment,
            source
        ),
        off!(
            "grant_copy.dest",
            "xengnttab_grant_copy_segment_t",
            "dest",
            GrantCopySegment,
            dest
        ),
        off!(
            "grant_copy.len",
            "xengnttab_grant_copy_segment_t",
            "len",
            GrantCopySegment,
            len
        ),
        off!(
            "grant_copy.flags",
            "xengnttab_grant_copy_segment_t",
            "flags",
            GrantCopySegment,
            flags
        ),
        off!(
            "grant_copy.status",
            "xengnttab_grant_copy_segment_t",
            "status",
            GrantCopySegment,
            status
        ),
        (
            "GNTCOPY_source_gref",
            "GNTCOPY_source_gref",
            remoca_xen::abi::gnttab::GNTCOPY_SOURCE_GREF as u64,
        ),
        (
            "GNTCOPY_dest_gref",
            "GNTCOPY_dest_gref",
            remoca_xen::abi::gnttab::GNTCOPY_DEST_GREF as u64,
        ),
    ]
}

#[test]
fn abi_structs_match_libxen_dev() {
    let have_headers = [
        "/usr/include/xenctrl.h",
        "/usr/include/xen/io/blkif.h",
        "/usr/include/xengnttab.h",
    ]
    .iter()
    .all(|h| std::path::Path::new(h).exists());
    if !have_headers {
        assert!(
            std::env::var_os("REMOCA_REQUIRE_LIBXEN").is_none(),
            "REMOCA_REQUIRE_LIBXEN is set but libxen-dev's headers are missing (apt-get install libxen-dev)"
        );
        eprintln!("SKIPPED: libxen-dev is not installed (apt-get install libxen-dev)");
        return;
    }
    let want = expected();
    let mut c = String::from(
        "#include <stddef.h>\n#include <stdio.h>\n#include <xenctrl.h>\n#include <xengnttab.h>\n\
         #include <xen/io/blkif.h>\n#include <xen/vm_event.h>\n#include <xen/hvm/params.h>\n\
         int main(void) {\n",
    );
    for (key, expr, _) in &want {
        c += &format!("    printf(\"%s=%lu\\n\", \"{key}\", (unsigned long)({expr}));\n");
    }
    c += "    return 0;\n}\n";
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("abi.c");
    let exe = dir.path().join("abi");
    std::fs::write(&src, c).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("run the C compiler");
    assert!(
        out.status.success(),
        "compiling the ABI probe failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&exe).output().unwrap();
    assert!(out.status.success());
    let from_c: BTreeMap<String, u64> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
        .collect();
    let wrong: Vec<String> = want
        .iter()
        .filter(|(key, _, rust)| from_c.get(*key) != Some(rust))
        .map(|(key, _, rust)| format!("{key}: C says {:?}, Rust has {rust}", from_c.get(*key)))
        .collect();
    assert!(wrong.is_empty(), "ABI mismatches:\n{}", wrong.join("\n"));
    assert_eq!(from_c.len(), want.len());
}
