//! `remoca image create|inspect|commit` and `remoca blkback` refusing bad input clearly.

mod blkback_harness;

use std::process::Command;

use blkback_harness::*;
use remoca_blkback::nbd::{client, wire};

#[test]
fn image_commands_manage_overlays_and_refuse_bad_input() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let e = run_err(
        remoca()
            .args(["image", "create", "--template"])
            .arg(d.join("missing.raw"))
            .arg("--overlay")
            .arg(d.join("x.ovl")),
    );
    assert!(e.contains("missing.raw"), "{e}");
    let (t, o) = template_and_overlay(d, 2 << 20);
    let e = run_err(
        remoca()
            .args(["image", "create", "--template"])
            .arg(&t)
            .arg("--overlay")
            .arg(&o),
    );
    assert!(e.contains("already exists"), "{e}");
    let e = run_err(
        remoca()
            .args(["image", "create", "--cluster-size", "1000", "--template"])
            .arg(&t)
            .arg("--overlay")
            .arg(d.join("c.ovl")),
    );
    assert!(e.contains("power of two"), "{e}");
    let e = run_err(remoca().args(["image", "inspect"]).arg(&t));
    assert!(e.contains("wrong magic"), "{e}");

    // Write through the overlay, then commit it into a new template.
    let srv = Server::tcp(&[spec("vm", &t, Some(&o))]);
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x42 64k 64k"])
            .arg(srv.uri("vm")),
    );
    srv.stop();
    let info = run_ok(remoca().args(["image", "inspect"]).arg(&o));
    // The 64 KiB write is in the overlay, whatever the cluster size (4 KiB by default).
    assert!(info.contains("(65536 bytes)"), "{info}");
    let new = d.join("new.raw");
    run_ok(
        remoca()
            .args(["image", "commit"])
            .arg(&o)
            .arg("--to")
            .arg(&new),
    );
    let mut want = pattern(2 << 20, 3);
    want[65536..131072].fill(0x42);
    assert_eq!(std::fs::read(&new).unwrap(), want);
    let e = run_err(
        remoca()
            .args(["image", "commit"])
            .arg(&o)
            .arg("--to")
            .arg(&new),
    );
    assert!(e.contains("already exists"), "{e}");

    // The overlay refuses to open over another template, or one of another size.
    let e = run_err(
        remoca()
            .args(["blkback", "--listen", "127.0.0.1:0", "--export"])
            .arg(spec("vm", &new, Some(&o))),
    );
    assert!(e.contains("another template"), "{e}");
    let small = d.join("small.raw");
    std::fs::write(&small, vec![1u8; 4096]).unwrap();
    let e = run_err(
        remoca()
            .args(["blkback", "--listen", "127.0.0.1:0", "--export"])
            .arg(spec("vm", &small, Some(&o))),
    );
    assert!(e.contains("bytes"), "{e}");
    let e = run_err(
        remoca()
            .args(["blkback", "--listen", "127.0.0.1:0", "--export"])
            .arg(spec("vm", &d.join("gone.raw"), None)),
    );
    assert!(e.contains("gone.raw"), "{e}");
    let e = run_err(remoca().args(["blkback", "--listen", "127.0.0.1:0", "--export", "name=vm"]));
    assert!(e.contains("template="), "{e}");
    let e = run_err(
        remoca()
            .args(["blkback", "--export"])
            .arg(spec("vm", &t, None)),
    );
    assert!(e.contains("--listen"), "{e}");
}

#[test]
fn config_file_serves_several_exports() {
    require("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let (t, o) = template_and_overlay(dir.path(), 1 << 20);
    let cfg = dir.path().join("blkback.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\n[[export]]\nname = \"a\"\ntemplate = \"{}\"\noverlay = \"{}\"\n\
             [[export]]\nname = \"b\"\ntemplate = \"{}\"\nreadonly = true\n",
            t.display(), o.display(), t.display()
        ),
    )
    .unwrap();
    let srv = Server::start(&["--config".into(), cfg.display().to_string()]);
    let list = run_ok(
        Command::new("nbdinfo")
            .arg("--list")
            .arg(format!("nbd://{}", srv.addr)),
    );
    assert!(
        list.contains("export=\"a\"") && list.contains("export=\"b\""),
        "{list}"
    );
    srv.stop();
    std::fs::write(&cfg, "listen = \"127.0.0.1:0\"\nbogus = 1\n").unwrap();
    let e = run_err(remoca().arg("blkback").arg("--config").arg(&cfg));
    assert!(e.contains("bogus"), "{e}");
}

#[test]
fn a_missing_template_does_not_stop_the_other_exports() {
    require("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let (t, o) = template_and_overlay(dir.path(), 1 << 20);
    let gone = dir.path().join("gone.raw");
    let srv = Server::tcp(&[spec("vm", &t, Some(&o)), spec("broken", &gone, None)]);
    run_ok(Command::new("nbdinfo").arg(srv.uri("vm")));
    let out = Command::new("nbdinfo")
        .arg(srv.uri("broken"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "the broken export must be refused");
    // The refusal carries the cause (nbdinfo does not print server messages; read it raw).
    let mut s = std::net::TcpStream::connect(&srv.addr).unwrap();
    client::start_handshake(&mut s).unwrap();
    let mut d = 6u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"broken");
    d.extend_from_slice(&0u16.to_be_bytes());
    let replies = client::option(&mut s, wire::OPT_INFO, &d).unwrap();
    let (kind, msg) = replies.last().unwrap();
    assert_eq!(*kind, wire::REP_ERR_UNKNOWN);
    let msg = String::from_utf8_lossy(msg);
    assert!(
        msg.contains("unavailable") && msg.contains("gone.raw"),
        "{msg}"
    );
    // Still serving after the refusal.
    run_ok(Command::new("nbdinfo").arg(srv.uri("vm")));
    srv.stop();
}

/// A supervisor that reads nothing (its end of the pipe closed before the server even
/// announced its address) must not stop the server: every start-up line fails with EPIPE
/// and the exports are served all the same.
#[test]
fn a_server_whose_stdout_reader_is_gone_keeps_serving() {
    require("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let (t, o) = template_and_overlay(dir.path(), 1 << 20);
    let sock = dir.path().join("nbd.sock");
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = remoca()
        .args(["blkback", "--socket"])
        .arg(&sock)
        .arg("--export")
        .arg(spec("vm", &t, Some(&o)))
        .stdout(writer)
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !sock.exists() && start.elapsed() < std::time::Duration::from_secs(20) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "remoca blkback exited before listening"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///vm?socket={}", sock.display());
    let served = Command::new("nbdinfo").arg(&uri).output().unwrap();
    let exited = child.try_wait().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(exited.is_none(), "remoca blkback exited: {exited:?}");
    assert!(
        served.status.success(),
        "{}",
        String::from_utf8_lossy(&served.stderr)
    );
}
