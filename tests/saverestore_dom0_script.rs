//! Runs `tests/xen-qemu/dom0-tests/saverestore.sh` against a stand-in `xl` that behaves like
//! the real one at the file level (save writes the stream into the path it is given, restore
//! reads it whole and checks it), so the FIFO plumbing of `--domain` and the script's own
//! logic are checked on any machine. The real-Xen run is the Xen-under-QEMU CI stage.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use remoca_saverestore::stream::{build_stream, BuildOptions, GuestShape};

const FAKE_XL: &str = r#"#!/bin/bash
S=$FAKE_XL_DIR
case "$1" in
  list)
    [ -f "$S/running" ] || { echo "$2 is an invalid domain identifier" >&2; exit 1; }
    printf 'Name ID Mem VCPUs State Time(s)\n%s 3 128 1 -b---- 1.5\n' "$2" ;;
  save)
    [ -f "$S/running" ] || { echo "no domain $2" >&2; exit 1; }
    cat "$S/stream.xl" > "$3" || exit 1
    rm "$S/running" ;;
  restore)
    cat "$2" > "$S/restored.xl" || exit 1
    cmp -s "$S/restored.xl" "$S/stream.xl" || { echo "restore: stream differs" >&2; exit 1; }
    echo restored >> "$S/restores"
    touch "$S/running" ;;
  *) exit 2 ;;
esac
"#;

#[test]
fn dom0_script_passes_against_a_stand_in_xl() {
    let d = tempfile::tempdir().unwrap();
    let bin = d.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let xl = bin.join("xl");
    std::fs::write(&xl, FAKE_XL).unwrap();
    std::fs::set_permissions(&xl, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ram: Vec<u8> = (0..2048 * 4096u32)
        .map(|i| (i / 4096 % 7) as u8 * (i % 13) as u8)
        .collect();
    let mut s = Vec::new();
    build_stream(
        &ram[..],
        &mut s,
        &BuildOptions::new(GuestShape::Pv, ram.len() as u64),
    )
    .unwrap();
    std::fs::write(d.path().join("stream.xl"), &s).unwrap();
    std::fs::write(d.path().join("running"), b"").unwrap();

    let remoca_dir = std::path::Path::new(env!("CARGO_BIN_EXE_remoca"))
        .parent()
        .unwrap();
    let path = format!(
        "{}:{}:{}",
        bin.display(),
        remoca_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/xen-qemu/dom0-tests/saverestore.sh"
    );
    let o = Command::new("bash")
        .arg(script)
        .env("PATH", path)
        .env("GUEST", "guest1")
        .env("FAKE_XL_DIR", d.path())
        .env("TMPDIR", d.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let results: Vec<&str> = out.lines().filter(|l| l.starts_with("@@RESULT")).collect();
    assert!(results.len() >= 10, "too few results:\n{out}");
    for r in &results {
        assert!(r.ends_with(" PASS"), "{r}\n{out}");
    }
    assert!(
        d.path().join("running").exists(),
        "guest not running at the end"
    );
    let restores = std::fs::read_to_string(d.path().join("restores")).unwrap();
    assert_eq!(
        restores.lines().count(),
        2,
        "expected two restores through remoca"
    );
}
