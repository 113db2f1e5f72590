//! Save to and restore from a real nfs-ganesha over `nfs://`, between two network namespaces
//! this test creates (a veth pair, addresses only inside them), with rpcbind in a private
//! /run. Needs root and nfs-ganesha, nfs-ganesha-vfs, rpcbind, iproute2; fails with a
//! message if they are absent.

use std::path::{Path, PathBuf};
use std::process::Command;

use remoca_saverestore::nfs_testbed::{NfsTestbed, CLIENT_IP};

use remoca_saverestore::stream::{build_stream, BuildOptions, GuestShape, PAGE_SIZE};

fn stream(pages: usize) -> Vec<u8> {
    let mut ram = Vec::with_capacity(pages * PAGE_SIZE);
    let mut x = 0x1234_5678_9abc_def1u64;
    for p in 0..pages {
        if p % 3 == 0 {
            ram.resize(ram.len() + PAGE_SIZE, 0);
        } else {
            for _ in 0..PAGE_SIZE / 8 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ram.extend_from_slice(&(x & 0x0f0f_0f0f_0f0f_0f0f).to_le_bytes());
            }
        }
    }
    let mut s = Vec::new();
    build_stream(
        &ram[..],
        &mut s,
        &BuildOptions::new(GuestShape::Pv, ram.len() as u64),
    )
    .unwrap();
    s
}

fn remoca() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_remoca"))
}

fn run(bed: &NfsTestbed, args: &[&str]) -> (bool, String) {
    let o = bed.client_cmd(remoca()).args(args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    v.sort();
    v
}

#[test]
fn save_to_and_restore_from_ganesha() {
    let w = tempfile::tempdir().unwrap();
    let bed = NfsTestbed::start(None).unwrap_or_else(|e| panic!("NFS test bed: {e}"));
    let s = stream(20_000);
    let xl: PathBuf = w.path().join("g.xl");
    std::fs::write(&xl, &s).unwrap();
    let xl_s = xl.to_str().unwrap();
    let export = bed.export();
    let url = bed.url("g.rsv");

    // Nothing serves NFS at the client's own address: a clear "unreachable" error.
    let (ok, err) = run(
        &bed,
        &[
            "save",
            "--from",
            xl_s,
            "--to",
            &format!("nfs://{CLIENT_IP}/x/y.rsv"),
        ],
    );
    assert!(!ok && err.contains("unreachable"), "{err}");

    let (ok, err) = run(&bed, &["save", "--quiet", "--from", xl_s, "--to", &url]);
    assert!(ok, "save to NFS failed: {err}");
    assert_eq!(
        listing(&export),
        vec!["g.rsv".to_string()],
        "temporary file left or image missing"
    );

    let back = w.path().join("back.xl");
    let (ok, err) = run(
        &bed,
        &["restore", "--quiet", &url, "--to", back.to_str().unwrap()],
    );
    assert!(ok, "restore from NFS failed: {err}");
    assert!(std::fs::read(&back).unwrap() == s, "NFS round trip differs");

    let o = bed
        .client_cmd(remoca())
        .args(["extract", &url, "--pfn", "7"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let local = w.path().join("local.rsv");
    std::fs::copy(export.join("g.rsv"), &local).unwrap();
    let o2 = Command::new(remoca())
        .args(["extract", local.to_str().unwrap(), "--pfn", "7"])
        .output()
        .unwrap();
    assert!(o.stdout.len() == 4096 && o.stdout == o2.stdout);

    // A save that fails half way (truncated input) leaves nothing on the server.
    let cut = w.path().join("cut.xl");
    std::fs::write(&cut, &s[..s.len() / 2]).unwrap();
    let (ok, err) = run(
        &bed,
        &[
            "save",
            "--quiet",
            "--from",
            cut.to_str().unwrap(),
            "--to",
            &bed.url("h.rsv"),
        ],
    );
    assert!(!ok && err.contains("truncated"), "{err}");
    assert_eq!(listing(&export), vec!["g.rsv".to_string()]);

    // A path the server does not export.
    let bad = format!(
        "nfs://{}/nonexistent-export/x.rsv",
        remoca_saverestore::nfs_testbed::SERVER_IP
    );
    let (ok, err) = run(&bed, &["save", "--quiet", "--from", xl_s, "--to", &bad]);
    assert!(!ok && err.contains("exports no directory"), "{err}");
}
