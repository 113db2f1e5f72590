//! `remoca blkback` against the real NBD clients: qemu-io, qemu-img, nbdinfo, nbdcopy.

mod blkback_harness;

use std::process::Command;

use blkback_harness::*;

const SIZE: usize = 16 << 20;

#[test]
fn qemu_io_patterns_discard_and_zeroes_over_an_overlay() {
    require("qemu-io");
    require("nbdinfo");
    require("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let (t, o) = template_and_overlay(dir.path(), SIZE);
    let before = sha(&t);
    let srv = Server::tcp(&[spec("vm", &t, Some(&o))]);
    let uri = srv.uri("vm");
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw"])
            .args([
                "-c",
                "write -P 0xab 1M 256k",
                "-c",
                "write -P 0xcd 100 1000",
                "-c",
                "write -z 2M 192k",
                "-c",
                "discard 4M 128k",
                "-c",
                "flush",
            ])
            .arg(&uri),
    );
    let out = run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw"])
            .args([
                "-c",
                "read -P 0xab 1M 256k",
                "-c",
                "read -P 0xcd 100 1000",
                "-c",
                "read -P 0 2M 192k",
                "-c",
                "read -P 0 4M 128k",
            ])
            .arg(&uri),
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // Bytes the guest never wrote still come from the template.
    let tmpl = pattern(SIZE, 3);
    let got = dir.path().join("got.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &uri])
            .arg(&got),
    );
    let got = std::fs::read(got).unwrap();
    assert_eq!(&got[..100], &tmpl[..100]);
    assert_eq!(&got[1100..1 << 20], &tmpl[1100..1 << 20]);
    assert_eq!(&got[5 << 20..], &tmpl[5 << 20..]);
    // The map shows the zeroed and discarded ranges as holes that read as zero...
    let map = run_ok(Command::new("nbdinfo").arg("--map").arg(&uri));
    assert!(
        map.lines().any(|l| {
            let f: Vec<_> = l.split_whitespace().collect();
            f.len() >= 4 && f[0] == "2097152" && f[1] == "196608" && f[3] == "hole,zero"
        }),
        "{map}"
    );
    assert!(
        map.lines()
            .any(|l| l.trim_start().starts_with("4194304") && l.contains("hole,zero")),
        "{map}"
    );
    // ... and qemu:allocation-depth shows what the overlay holds vs the template.
    let depth = run_ok(
        Command::new("nbdinfo")
            .arg("--map=qemu:allocation-depth")
            .arg(&uri),
    );
    assert!(
        depth
            .lines()
            .any(|l| l.trim_start().starts_with("1048576") && l.contains("local")),
        "{depth}"
    );
    assert!(depth.contains("backing"), "{depth}");
    let json = run_ok(Command::new("qemu-img").args(["map", "-f", "raw", "--output=json", &uri]));
    assert!(
        json.contains("\"start\": 2097152, \"length\": 196608") && json.contains("\"zero\": true"),
        "{json}"
    );
    srv.stop();
    assert_eq!(sha(&t), before, "the template changed");
}

#[test]
fn writes_persist_across_server_restarts() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let (t, o) = template_and_overlay(dir.path(), SIZE);
    let before = sha(&t);
    let srv = Server::tcp(&[spec("vm", &t, Some(&o))]);
    run_ok(
        Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0x5a 3M 1M",
                "-c",
                "write -P 0x11 7 9",
            ])
            .arg(srv.uri("vm")),
    );
    srv.stop();
    let srv = Server::tcp(&[spec("vm", &t, Some(&o))]);
    let out = run_ok(
        Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "read -P 0x5a 3M 1M",
                "-c",
                "read -P 0x11 7 9",
            ])
            .arg(srv.uri("vm")),
    );
    assert!(!out.contains("verification failed"), "{out}");
    srv.stop();
    assert_eq!(sha(&t), before);
    let info = run_ok(remoca().args(["image", "inspect"]).arg(&o));
    assert!(info.contains("template check: matches"), "{info}");
}

#[test]
fn qemu_img_convert_compare_and_nbdcopy_over_unix_and_tcp() {
    require("qemu-img");
    require("nbdcopy");
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.raw");
    std::fs::write(&plain, vec![0u8; SIZE]).unwrap();
    let src = dir.path().join("src.raw");
    std::fs::write(&src, pattern(SIZE, 9)).unwrap();
    let sock = dir.path().join("nbd.sock");
    let srv = Server::start(&[
        "--socket".into(),
        sock.display().to_string(),
        "--export".into(),
        spec("disk", &plain, None),
    ]);
    let uri = srv.uri("disk");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    let back = dir.path().join("back.raw");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&back));
    assert_eq!(std::fs::read(&back).unwrap(), pattern(SIZE, 9));
    // nbdcopy into an overlay export over TCP, then compare through qemu-img.
    srv.stop();
    assert!(!sock.exists(), "socket left behind");
    assert_eq!(
        std::fs::read(&plain).unwrap(),
        pattern(SIZE, 9),
        "writes reached the raw file"
    );
    let (t, o) = template_and_overlay(dir.path(), SIZE);
    let srv = Server::tcp(&[spec("vm", &t, Some(&o))]);
    run_ok(Command::new("nbdcopy").arg(&src).arg(srv.uri("vm")));
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(srv.uri("vm")),
    );
    srv.stop();
    assert_eq!(
        std::fs::read(&t).unwrap(),
        pattern(SIZE, 3),
        "template changed"
    );
}

#[test]
fn nbdinfo_lists_exports_and_sees_multi_conn() {
    require("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let (t, o) = template_and_overlay(dir.path(), 1 << 20);
    let mut ro = spec("golden", &t, None);
    ro.push_str(",readonly");
    let srv = Server::tcp(&[spec("vm1", &t, Some(&o)), ro]);
    let list = run_ok(
        Command::new("nbdinfo")
            .arg("--list")
            .arg(format!("nbd://{}", srv.addr)),
    );
    assert!(
        list.contains("export=\"vm1\"") && list.contains("export=\"golden\""),
        "{list}"
    );
    run_ok(
        Command::new("nbdinfo")
            .args(["--can", "multi-conn"])
            .arg(srv.uri("vm1")),
    );
    run_ok(
        Command::new("nbdinfo")
            .args(["--is", "read-only"])
            .arg(srv.uri("golden")),
    );
    let out = Command::new("nbdinfo")
        .args(["--is", "read-only"])
        .arg(srv.uri("vm1"))
        .status()
        .unwrap();
    assert!(!out.success(), "vm1 must be writable");
    // Unknown export: the client gets an error, the server keeps serving.
    run_err(Command::new("nbdinfo").arg(srv.uri("nope")));
    run_ok(Command::new("nbdinfo").arg(srv.uri("vm1")));
    srv.stop();
}
