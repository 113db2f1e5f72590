//! A Linux guest under `qemu-system-x86_64` (TCG) boots from a template served out of the
//! image store through a node's cache, over NBD (issue 8):
//!
//! - an ext4 root file system (busybox, an init script, checksummed data files) is made with
//!   `mke2fs -d` and imported with `remoca image import` into a fresh store;
//! - `remoca image-node --store` is the origin; `remoca blkback` with an EMPTY node cache
//!   serves `--export name=vm,image=os@1,chunk-list=...,overlay=...` over NBD (loopback TCP);
//! - the guest's initramfs only loads the virtio/ext4 modules and `switch_root`s into the
//!   disk: the guest's userland runs from the template. It checks every data file's SHA-256,
//!   writes files (into the overlay) and powers off;
//! - the test asserts the guest's report, that the node cache now holds chunks fetched from
//!   the origin, that the store's version exports byte-identical to the imported file and
//!   verifies, and that the overlay holds the writes; a second boot (new `remoca blkback`, warm
//!   cache) sees the files and fetches nothing from the origin (the origin's and the node's
//!   counters).
//!
//! `image_exports_serve_the_store_version_through_the_cli` checks the same CLI path with the
//! NBD clients only (no guest): a node-cache export with an overlay and a `store=` export
//! read back byte for byte, writes land in the overlay only (which commits as a layer), and
//! bad specs are refused.
//!
//! Needs the guest kernel (`blkback/tests/guest/fetch-kernel.sh`, `REMOCA_GUEST_KERNEL`),
//! `qemu-system-x86`, `busybox-static`, `e2fsprogs`, `cpio`: skipped with a message when
//! the kernel or QEMU is missing, failing when another tool is.

mod blkback_harness;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use blkback_harness::guest;
use blkback_harness::*;

/// The initramfs: modules, then the disk becomes the root and its init runs.
const INITRAMFS_INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m; done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if mount -t ext4 /dev/vda /mnt; then
  mount --move /dev /mnt/dev
  umount /proc /sys
  exec switch_root /mnt /sbin/remoca-init
fi
echo "REMOCA-MOUNT-FAILED"
echo "REMOCA-DONE"
poweroff -f
"#;

/// The init on the template's root file system.
const DISK_INIT: &str = r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
echo "REMOCA-ROOT: $(awk '$2 == "/" { d = $1 " " $3 } END { print d }' /proc/mounts)"
echo "REMOCA-TEMPLATE-MARKER: $(cat /template-marker)"
if (cd /data && sha256sum -c SHA256SUMS > /tmp/sums 2>&1); then
  echo "REMOCA-SUMS-OK $(grep -c ': OK$' /tmp/sums)"
else
  echo "REMOCA-SUMS-BAD"; cat /tmp/sums
fi
if [ -f /guest-wrote ]; then
  echo "REMOCA-SEEN: $(cat /guest-wrote)"
  if sha256sum -c /guest-blob.sum > /dev/null 2>&1; then echo "REMOCA-BLOB-OK"; fi
else
  echo "written by the first boot" > /guest-wrote
  dd if=/dev/urandom of=/guest-blob bs=64k count=32 2> /dev/null
  sha256sum /guest-blob > /guest-blob.sum
  echo "REMOCA-WROTE"
fi
sync
mount -o remount,ro /
sync
echo "REMOCA-DONE"
poweroff -f
"#;

const DATA_FILES: usize = 8;
const DATA_FILE_BYTES: usize = 1 << 20;

fn found(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Deterministic incompressible bytes (xorshift), different per seed.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The root file system tree: busybox, the init, the data files and their SHA256SUMS.
fn root_tree(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    for d in ["sbin", "proc", "sys", "dev", "tmp", "mnt", "data"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    guest::install_busybox(&root);
    std::fs::write(root.join("sbin/remoca-init"), DISK_INIT).unwrap();
    run_ok(
        Command::new("chmod")
            .arg("+x")
            .arg(root.join("sbin/remoca-init")),
    );
    std::fs::write(root.join("template-marker"), "remoca-store-template-v1").unwrap();
    for i in 0..DATA_FILES {
        std::fs::write(
            root.join(format!("data/file{i}")),
            noise(DATA_FILE_BYTES, i as u64 + 1),
        )
        .unwrap();
    }
    let sums = run_ok(Command::new("sh").arg("-c").arg(format!(
        "cd {} && sha256sum file*",
        root.join("data").display()
    )));
    std::fs::write(root.join("data/SHA256SUMS"), sums).unwrap();
    root
}

/// A running `remoca image-node --store` (the origin).
struct Origin {
    child: Child,
    addr: String,
    stats: PathBuf,
}

impl Origin {
    fn start(store: &Path, image: &str, list: &Path, stats: &Path) -> Origin {
        let mut child = remoca()
            .args(["image-node", "--listen", "127.0.0.1:0", "--store"])
            .arg(store)
            .args(["--image", image, "--chunk-list"])
            .arg(list)
            .arg("--stats")
            .arg(stats)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn remoca image-node");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .strip_prefix("origin listening on ")
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!("remoca image-node did not start: {line:?}")
            })
            .to_owned();
        Origin {
            child,
            addr,
            stats: stats.to_owned(),
        }
    }

    /// `served_chunks` from the origin's stats file, read once the file was rewritten after
    /// `since` (it is rewritten every 200 ms).
    fn served_chunks(&self, since: SystemTime) -> u64 {
        for _ in 0..100 {
            let fresh = std::fs::metadata(&self.stats)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t > since);
            if fresh {
                let text = std::fs::read_to_string(&self.stats).unwrap();
                return counter(&text, "served_chunks=")
                    .unwrap_or_else(|| panic!("no served_chunks in {text:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{} was not rewritten", self.stats.display());
    }

    fn stop(mut self) {
        run_ok(Command::new("kill").args(["-TERM", &self.child.id().to_string()]));
        let st = self.child.wait().unwrap();
        assert!(st.success(), "remoca image-node exited with {st}");
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The number after `key` in `text` (`key=N`, or `key N`).
fn counter(text: &str, key: &str) -> Option<u64> {
    let rest = &text[text.find(key)? + key.len()..];
    rest.trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Chunk files in a node cache directory.
fn cached_chunks(cache: &Path) -> usize {
    let Ok(subs) = std::fs::read_dir(cache.join("chunks")) else {
        return 0;
    };
    subs.flatten()
        .map(|s| std::fs::read_dir(s.path()).map_or(0, |f| f.count()))
        .sum()
}

/// One boot: a new `remoca blkback` on the node cache, the guest, the server stopped.
/// Returns the console, the server's stderr and the boot's wall time.
fn boot_once(
    d: &Path,
    cache: &Path,
    tag: &str,
    kernel: &Path,
    initrd: &Path,
    origin: &Origin,
    export: &str,
) -> (String, String, Duration) {
    let log = d.join(format!("blkback-{tag}.err"));
    let srv = Server::start_with_stderr(
        &[
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--image-cache".into(),
            cache.display().to_string(),
            "--image-origin".into(),
            origin.addr.clone(),
            "--export".into(),
            export.into(),
        ],
        Stdio::from(std::fs::File::create(&log).unwrap()),
    );
    let start = Instant::now();
    let console = guest::boot(kernel, initrd, &srv.uri("vm"), Duration::from_secs(300));
    let took = start.elapsed();
    srv.stop();
    let err = std::fs::read_to_string(&log).unwrap();
    (console, err, took)
}

#[test]
fn a_linux_guest_boots_from_a_store_image_through_an_empty_node_cache_then_a_warm_one() {
    let Some(kernel) = guest::kernel_dir() else {
        assert!(
            std::env::var_os("REMOCA_NO_SKIP").is_none(),
            "no guest kernel and REMOCA_NO_SKIP is set (CI's tests/setup.sh fetches it)"
        );
        eprintln!(
            "SKIPPED: no guest kernel (run blkback/tests/guest/fetch-kernel.sh, or set REMOCA_GUEST_KERNEL)"
        );
        return;
    };
    if !found("qemu-system-x86_64") {
        assert!(
            std::env::var_os("REMOCA_NO_SKIP").is_none(),
            "qemu-system-x86_64 missing and REMOCA_NO_SKIP is set"
        );
        eprintln!("SKIPPED: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)");
        return;
    }
    require("mke2fs");
    require("cpio");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // The root file system, imported into a fresh store.
    let tree = root_tree(d);
    let disk = d.join("os.raw");
    run_ok(
        Command::new("mke2fs")
            .args(["-q", "-t", "ext4", "-O", "^metadata_csum", "-d"])
            .arg(&tree)
            .arg(&disk)
            .arg("64M"),
    );
    let disk_sha = sha(&disk);
    let store = d.join("store");
    run_ok(
        remoca()
            .args(["image", "import"])
            .arg(&disk)
            .args(["os", "--store"])
            .arg(&store),
    );
    let initrd = guest::build_initramfs(d, &kernel, INITRAMFS_INIT);

    let list = d.join("os@1.list");
    let origin = Origin::start(&store, "os@1", &list, &d.join("origin.stats"));
    let data_chunks = std::fs::read_to_string(&list)
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| *l != "0")
        .count();
    let overlay = d.join("vm.ovl");
    let export = format!(
        "name=vm,image=os@1,chunk-list={},overlay={}",
        list.display(),
        overlay.display()
    );
    assert_eq!(cached_chunks(&d.join("cache")), 0);
    assert!(!overlay.exists());

    // First boot: empty cache.
    let (first, err1, t1) = boot_once(
        d,
        &d.join("cache"),
        "cold",
        &kernel,
        &initrd,
        &origin,
        &export,
    );
    let after_first = SystemTime::now();
    let cold_origin = origin.served_chunks(after_first);
    let cached = cached_chunks(&d.join("cache"));
    eprintln!(
        "first boot (empty cache): {:.1} s\n{err1}",
        t1.as_secs_f64()
    );
    for want in [
        "REMOCA-ROOT: /dev/vda ext4".to_string(),
        "REMOCA-TEMPLATE-MARKER: remoca-store-template-v1".into(),
        format!("REMOCA-SUMS-OK {DATA_FILES}"),
        "REMOCA-WROTE".into(),
    ] {
        assert!(first.contains(&want), "no {want:?} in:\n{first}");
    }
    assert!(
        overlay.exists(),
        "remoca blkback did not create the overlay"
    );
    let node_cold = counter(&err1, "| origin ").expect("the node's origin counter");
    assert!(node_cold > 0 && node_cold as usize <= data_chunks, "{err1}");
    assert_eq!(node_cold, cold_origin, "node and origin disagree:\n{err1}");
    assert_eq!(cached, node_cold as usize, "chunks cached vs fetched");
    assert!(err1.contains("boot profile of"), "{err1}");

    // The store's version is unchanged; the overlay holds the guest's writes.
    let out = d.join("export.raw");
    run_ok(
        remoca()
            .args(["image", "export", "os@1"])
            .arg(&out)
            .arg("--store")
            .arg(&store),
    );
    assert_eq!(sha(&out), disk_sha, "the store's image changed");
    run_ok(remoca().args(["image", "verify", "--store"]).arg(&store));
    let inspect = run_ok(
        remoca()
            .args(["image", "inspect"])
            .arg(&overlay)
            .arg("--template")
            .arg(&out),
    );
    let in_overlay = counter(&inspect, "in overlay:").expect("clusters in overlay");
    // The 2 MiB blob alone is 512 clusters of 4 KiB.
    assert!(in_overlay >= 512, "{inspect}");
    assert!(inspect.contains("template check: matches"), "{inspect}");

    // Second boot: warm cache, new server process.
    let (second, err2, t2) = boot_once(
        d,
        &d.join("cache"),
        "warm",
        &kernel,
        &initrd,
        &origin,
        &export,
    );
    let warm_origin = origin.served_chunks(SystemTime::now()) - cold_origin;
    eprintln!(
        "second boot (warm cache): {:.1} s\n{err2}",
        t2.as_secs_f64()
    );
    for want in [
        "REMOCA-ROOT: /dev/vda ext4",
        "REMOCA-SEEN: written by the first boot",
        "REMOCA-BLOB-OK",
    ] {
        assert!(second.contains(want), "no {want:?} in:\n{second}");
    }
    assert!(
        second.contains(&format!("REMOCA-SUMS-OK {DATA_FILES}")),
        "{second}"
    );
    assert_eq!(counter(&err2, "| origin "), Some(0), "{err2}");
    assert_eq!(warm_origin, 0, "the origin served chunks to a warm node");
    assert_eq!(sha(&out), disk_sha);

    // Third boot: another node with an empty cache but the first boot's profile prefetches
    // the boot's chunks in that order while the guest reads (on a fresh overlay).
    let cache3 = d.join("cache3");
    std::fs::create_dir_all(cache3.join("profiles")).unwrap();
    for p in std::fs::read_dir(d.join("cache/profiles")).unwrap() {
        let p = p.unwrap().path();
        std::fs::copy(&p, cache3.join("profiles").join(p.file_name().unwrap())).unwrap();
    }
    let export3 = format!(
        "name=vm,image=os@1,chunk-list={},overlay={}",
        list.display(),
        d.join("vm3.ovl").display()
    );
    let before3 = origin.served_chunks(SystemTime::now());
    let (third, err3, t3) = boot_once(d, &cache3, "profile", &kernel, &initrd, &origin, &export3);
    let prof_origin = origin.served_chunks(SystemTime::now()) - before3;
    eprintln!(
        "third boot (empty cache, profile): {:.1} s\n{err3}",
        t3.as_secs_f64()
    );
    assert!(
        third.contains(&format!("REMOCA-SUMS-OK {DATA_FILES}")),
        "{third}"
    );
    assert!(third.contains("REMOCA-WROTE"), "{third}");
    // Prefetch and the guest's reads share one fetch per chunk: nothing is fetched twice.
    assert_eq!(counter(&err3, "| origin "), Some(prof_origin), "{err3}");
    assert_eq!(cached_chunks(&cache3) as u64, prof_origin);
    assert!(prof_origin > 0 && prof_origin as usize <= data_chunks);
    origin.stop();
    eprintln!(
        "images_guest: {data_chunks} data chunks in the image; cold boot {:.1} s, {cold_origin} chunks from the origin; warm boot {:.1} s, {warm_origin} from the origin; cold boot with the profile {:.1} s, {prof_origin} from the origin",
        t1.as_secs_f64(),
        t2.as_secs_f64(),
        t3.as_secs_f64()
    );
}

#[test]
fn image_exports_serve_the_store_version_through_the_cli() {
    require("nbdcopy");
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 4 MiB: noise with a zero MiB in the middle, 16 KiB chunks.
    let mut img = noise(4 << 20, 99);
    img[1 << 20..2 << 20].fill(0);
    let raw = d.join("img.raw");
    std::fs::write(&raw, &img).unwrap();
    let store = d.join("store");
    run_ok(
        remoca()
            .args(["image", "import"])
            .arg(&raw)
            .args(["os", "--chunk-size", "16K", "--store"])
            .arg(&store),
    );
    let list = d.join("os@1.list");
    let origin = Origin::start(&store, "os@1", &list, &d.join("origin.stats"));
    let cache = d.join("cache");
    let ovl = d.join("a.ovl");
    let log = d.join("blkback.err");
    let srv = Server::start_with_stderr(
        &[
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--image-cache".into(),
            cache.display().to_string(),
            "--image-origin".into(),
            origin.addr.clone(),
            "--export".into(),
            format!(
                "name=a,image=os@1,chunk-list={},overlay={}",
                list.display(),
                ovl.display()
            ),
            "--export".into(),
            format!("name=b,image=os,store={}", store.display()),
        ],
        Stdio::from(std::fs::File::create(&log).unwrap()),
    );
    for name in ["a", "b"] {
        let out = d.join(format!("{name}.raw"));
        run_ok(Command::new("nbdcopy").arg(srv.uri(name)).arg(&out));
        assert!(std::fs::read(&out).unwrap() == img, "export {name} differs");
    }
    // Writes go to a's overlay; b (no overlay) is read-only.
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c", "flush"])
            .arg(srv.uri("a")),
    );
    let back = run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read -P 0x5a 1M 64k"])
            .arg(srv.uri("a")),
    );
    assert!(!back.contains("Pattern verification failed"), "{back}");
    let refused = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 0 4k"])
        .arg(srv.uri("b"))
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "a write to the read-only store export was accepted: {}",
        String::from_utf8_lossy(&refused.stdout)
    );
    srv.stop();
    let err = std::fs::read_to_string(&log).unwrap();
    let distinct: std::collections::HashSet<String> = std::fs::read_to_string(&list)
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| *l != "0")
        .map(str::to_owned)
        .collect();
    assert_eq!(
        counter(&err, "| origin "),
        Some(distinct.len() as u64),
        "each distinct chunk once from the origin:\n{err}"
    );
    let out = d.join("export.raw");
    run_ok(
        remoca()
            .args(["image", "export", "os@1"])
            .arg(&out)
            .arg("--store")
            .arg(&store),
    );
    assert!(
        std::fs::read(&out).unwrap() == img,
        "the store's image changed"
    );
    // The overlay blkback created over the image commits as a layer on it (once the origin,
    // which holds the store's read lock, is gone: a commit takes the writer lock).
    origin.stop();
    run_ok(
        remoca()
            .args(["image", "commit"])
            .arg(&ovl)
            .args(["--base", "os@1", "--image", "os", "--store"])
            .arg(&store),
    );
    let out2 = d.join("export2.raw");
    run_ok(
        remoca()
            .args(["image", "export", "os@2"])
            .arg(&out2)
            .arg("--store")
            .arg(&store),
    );
    let mut want = img.clone();
    want[1 << 20..(1 << 20) + (64 << 10)].fill(0x5a);
    assert!(
        std::fs::read(&out2).unwrap() == want,
        "os@2 is not os@1 + the write"
    );

    // Refused specs: a chunk list without a cache, both sources, no source.
    for (args, want) in [
        (
            vec![format!("name=a,image=os@1,chunk-list={}", list.display())],
            "--image-cache",
        ),
        (
            vec![format!(
                "name=a,image=os@1,chunk-list={},store={}",
                list.display(),
                store.display()
            )],
            "exactly one of",
        ),
        (vec!["name=a,image=os@1".to_string()], "exactly one of"),
    ] {
        let mut cmd = remoca();
        cmd.args(["blkback", "--listen", "127.0.0.1:0"]);
        for a in &args {
            cmd.arg("--export").arg(a);
        }
        let e = run_err(&mut cmd);
        assert!(e.contains(want), "{args:?}: {e}");
    }
}
