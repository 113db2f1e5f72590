//! `remoca save|restore|extract|inspect` as a user runs them: round trips through files and
//! pipes, extraction, and the clear errors with nothing left under the final name.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use remoca_saverestore::stream::{build_stream, BuildOptions, GuestShape, PAGE_SIZE};

fn remoca() -> Command {
    Command::new(env!("CARGO_BIN_EXE_remoca"))
}

fn ram(pages: usize) -> Vec<u8> {
    let mut r = Vec::with_capacity(pages * PAGE_SIZE);
    for p in 0..pages {
        match p % 5 {
            0 => r.resize(r.len() + PAGE_SIZE, 0),
            1 => r.extend_from_slice(&[7u8; PAGE_SIZE]),
            2 if p > 10 => {
                let s = r.len() - 7 * PAGE_SIZE;
                r.extend_from_within(s..s + PAGE_SIZE)
            }
            3 => r.extend((0..PAGE_SIZE).map(|i| ((i * 31 + p * 7) % 253) as u8)),
            _ => {
                let mut x = (p as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                for _ in 0..PAGE_SIZE / 8 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    r.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
    }
    r
}

fn xl_file(dir: &Path, shape: GuestShape, pages: usize) -> (PathBuf, Vec<u8>, Vec<u8>) {
    let ram = ram(pages);
    let mut s = Vec::new();
    build_stream(
        &ram[..],
        &mut s,
        &BuildOptions::new(shape, ram.len() as u64),
    )
    .unwrap();
    let p = dir.join(format!("{shape:?}.xl"));
    std::fs::write(&p, &s).unwrap();
    (p, s, ram)
}

fn ok(c: &mut Command) -> std::process::Output {
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "{c:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn fails(c: &mut Command) -> String {
    let o = c.output().unwrap();
    assert!(!o.status.success(), "{c:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    v.sort();
    v
}

#[test]
fn save_restore_extract_inspect_through_files_and_pipes() {
    let d = tempfile::tempdir().unwrap();
    for shape in [GuestShape::Pv, GuestShape::Hvm] {
        let (xl, stream, ram) = xl_file(d.path(), shape, 1500);
        let img = d.path().join(format!("{shape:?}.rsv"));
        ok(remoca()
            .args(["save", "--from"])
            .arg(&xl)
            .arg("--to")
            .arg(&img)
            .args(["--codec", "zstd"]));
        let back = d.path().join(format!("{shape:?}.back.xl"));
        ok(remoca().arg("restore").arg(&img).arg("--to").arg(&back));
        assert!(
            std::fs::read(&back).unwrap() == stream,
            "{shape:?} file round trip differs"
        );

        // stdin -> image on stdout -> restore to stdout
        let piped = d.path().join("piped.rsv");
        let o = ok(remoca()
            .args(["save", "--from", "-", "--to", "-", "--codec", "snap"])
            .stdin(std::fs::File::open(&xl).unwrap()));
        std::fs::write(&piped, &o.stdout).unwrap();
        let o = ok(remoca().arg("restore").arg(&piped).args(["--to", "-"]));
        assert!(o.stdout == stream, "{shape:?} pipe round trip differs");
        // A regular file is mapped and its pages read in place: the same image as read
        // through the pipe.
        let mapped = d.path().join("mapped.rsv");
        ok(remoca()
            .args(["save", "--quiet", "--codec", "snap", "--from"])
            .arg(&xl)
            .arg("--to")
            .arg(&mapped));
        assert!(
            std::fs::read(&mapped).unwrap() == std::fs::read(&piped).unwrap(),
            "{shape:?} the mapped file's image differs from the piped one"
        );

        // The fast mode (the C LZ4): its image names the codec, the format version and the
        // stream's length and digest.
        let fast = d.path().join("fast.rsv");
        ok(remoca()
            .args(["save", "--quiet", "--codec", "fast", "--from"])
            .arg(&xl)
            .arg("--to")
            .arg(&fast));
        let o = ok(remoca().arg("restore").arg(&fast).args(["--to", "-"]));
        assert!(o.stdout == stream, "{shape:?} fast round trip differs");
        let o = ok(remoca().arg("inspect").arg(&fast));
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            text.contains("format version 3")
                && text.contains("codec:        lz4:4")
                && text.contains(&format!("stream:       {} bytes (digest 0x", stream.len())),
            "{text}"
        );

        let o = ok(remoca().arg("extract").arg(&img).args(["--pfn", "0x203"]));
        assert!(o.stdout == ram[0x203 * PAGE_SIZE..0x204 * PAGE_SIZE]);
        let page = d.path().join("p");
        ok(remoca()
            .arg("extract")
            .arg(&img)
            .args(["--pfn", "999", "--out"])
            .arg(&page));
        assert!(std::fs::read(&page).unwrap() == ram[999 * PAGE_SIZE..1000 * PAGE_SIZE]);

        let o = ok(remoca().arg("inspect").arg(&img));
        let text = String::from_utf8_lossy(&o.stdout);
        for want in [
            "ratio:",
            "zstd",
            "libxc PAGE_DATA x",
            "libxl END",
            "duplicate",
            "remoca-guest",
        ] {
            assert!(text.contains(want), "inspect lacks {want:?}:\n{text}");
        }
    }
}

#[test]
fn bad_inputs_give_clear_errors_and_leave_nothing() {
    let d = tempfile::tempdir().unwrap();
    let (xl, mut stream, _) = xl_file(d.path(), GuestShape::Hvm, 300);
    let out = d.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let dest = out.join("g.rsv");

    // Truncated input stream.
    let cut = d.path().join("cut.xl");
    std::fs::write(&cut, &stream[..stream.len() - 100]).unwrap();
    let e = fails(
        remoca()
            .args(["save", "--from"])
            .arg(&cut)
            .arg("--to")
            .arg(&dest),
    );
    assert!(e.contains("truncated"), "{e}");
    assert!(names(&out).is_empty(), "left {:?}", names(&out));

    // Unknown mandatory libxc record: patch the TSC_INFO record type (HVM: after the pages).
    let tsc = stream
        .windows(8)
        .rposition(|w| w == [8, 0, 0, 0, 24, 0, 0, 0])
        .unwrap();
    stream[tsc] = 0x42;
    let bad = d.path().join("bad.xl");
    std::fs::write(&bad, &stream).unwrap();
    let e = fails(
        remoca()
            .args(["save", "--from"])
            .arg(&bad)
            .arg("--to")
            .arg(&dest),
    );
    assert!(
        e.contains("unknown mandatory libxc record type 0x42"),
        "{e}"
    );
    assert!(names(&out).is_empty());

    // Damaged image: corrupted block, truncated image, wrong magic.
    let img = d.path().join("g.rsv");
    ok(remoca()
        .args(["save", "--from"])
        .arg(&xl)
        .arg("--to")
        .arg(&img));
    let good = std::fs::read(&img).unwrap();
    let mut b = good.clone();
    b[32 + 16 + 100] ^= 0xff; // inside the first block
    std::fs::write(&img, &b).unwrap();
    let back = out.join("g.xl");
    let e = fails(remoca().arg("restore").arg(&img).arg("--to").arg(&back));
    assert!(e.contains("corrupted block 0"), "{e}");
    assert!(names(&out).is_empty());
    std::fs::write(&img, &good[..good.len() / 2]).unwrap();
    let e = fails(remoca().arg("restore").arg(&img).arg("--to").arg(&back));
    assert!(e.contains("truncated"), "{e}");
    std::fs::write(&img, &stream).unwrap();
    let e = fails(remoca().arg("inspect").arg(&img));
    assert!(e.contains("bad magic"), "{e}");
    let mut v = good.clone();
    v[8] = 9;
    std::fs::write(&img, &v).unwrap();
    let e = fails(remoca().arg("extract").arg(&img).args(["--pfn", "1"]));
    assert!(e.contains("version 9"), "{e}");
    assert!(names(&out).is_empty());

    // A pfn without data is named as such.
    std::fs::write(&img, &good).unwrap();
    let e = fails(remoca().arg("extract").arg(&img).args(["--pfn", "0xa0"]));
    assert!(e.contains("no data") && e.contains("XTAB"), "{e}");
}

#[test]
fn full_destination_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let (xl, _, _) = xl_file(d.path(), GuestShape::Pv, 2000);
    let mnt = d.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    // A 256 KiB tmpfs in a private mount namespace: the image does not fit.
    let script = format!(
        "mount -t tmpfs -o size=256k tmpfs {m} && {bin} save --codec snap --from {xl} --to {m}/g.rsv; rc=$?; ls -A {m}; exit $rc",
        m = mnt.display(),
        bin = env!("CARGO_BIN_EXE_remoca"),
        xl = xl.display()
    );
    let o = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "save into a full tmpfs succeeded");
    assert!(err.contains("destination is full"), "{err}");
    assert!(
        String::from_utf8_lossy(&o.stdout).trim().is_empty(),
        "left files: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn domain_mode_without_xl_says_so() {
    let o = remoca()
        .args(["save", "--domain", "guest1", "--to", "/tmp/never.rsv"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("`xl` was not found"), "{e}");
    assert!(!Path::new("/tmp/never.rsv").exists());
}
