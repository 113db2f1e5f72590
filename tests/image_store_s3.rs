//! The image store on an S3-compatible server: `remoca image ... --store s3://BUCKET/PREFIX`
//! and `remoca image-node --store s3://...` against moto's server (PyPI `moto[server]`),
//! started by the test on 127.0.0.1 (port chosen by the server) and stopped by its PID.
//!
//! moto is looked for at `$REMOCA_MOTO_SERVER`, `/opt/remoca-venv/bin/moto_server` (what
//! tests/setup.sh installs), then `moto_server` on PATH; without it every test here prints
//! why it is skipped and passes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use remoca_blkback::images::store::backend::Backend;
use remoca_blkback::images::store::s3::{S3Backend, S3Url};

const BIN: &str = env!("CARGO_BIN_EXE_remoca");

/// A moto server on 127.0.0.1, killed (by PID) when dropped.
struct Moto {
    child: Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("REMOCA_MOTO_SERVER") {
        return Some(PathBuf::from(p));
    }
    let venv = PathBuf::from("/opt/remoca-venv/bin/moto_server");
    if venv.exists() {
        return Some(venv);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("moto_server"))
            .find(|p| p.exists())
    })
}

/// Start moto on a free loopback port (`-p 0`, the port read back from its banner).
fn start_moto(test: &str) -> Option<Moto> {
    let Some(bin) = moto_binary() else {
        assert!(
            std::env::var_os("REMOCA_NO_SKIP").is_none(),
            "{test}: moto_server not found and REMOCA_NO_SKIP is set (CI's tests/setup.sh installs it)"
        );
        eprintln!(
            "SKIPPED {test}: moto_server not found (pip install 'moto[server]' into \
             /opt/remoca-venv, as tests/setup.sh does, or set REMOCA_MOTO_SERVER)"
        );
        return None;
    };
    let mut child = Command::new(&bin)
        .args(["-H", "127.0.0.1", "-p", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
    // The banner ("Running on http://127.0.0.1:PORT") is on stderr; keep draining both
    // pipes so the server never blocks on a full one.
    let (tx, rx) = std::sync::mpsc::channel();
    for pipe in [
        Box::new(child.stderr.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stdout.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let mut moto = Moto { child, port: 0 };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while moto.port == 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(rest) = line.split("http://127.0.0.1:").nth(1) {
                    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    moto.port = digits.parse().unwrap_or(0);
                }
                seen.push(line);
            }
            Err(_) => panic!("moto_server printed no address in 30 s: {seen:?}"),
        }
    }
    Some(moto)
}

/// One plain HTTP/1.1 request to moto (which checks no signatures): status and body.
fn http(port: u16, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let head_end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP response head");
    let head = String::from_utf8_lossy(&resp[..head_end]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = resp[head_end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let n = usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
}

/// The store's own S3 adapter, for looking at and damaging objects.
fn backend(m: &Moto, bucket_prefix: &str) -> S3Backend {
    let url = S3Url::parse(&format!("s3://{bucket_prefix}"))
        .unwrap()
        .unwrap();
    S3Backend::with_endpoint(
        url,
        &format!("http://127.0.0.1:{}", m.port),
        "remoca-test",
        "remoca-test-secret",
    )
    .unwrap()
}

fn make_bucket(m: &Moto, bucket: &str) {
    let (status, body) = http(m.port, "PUT", &format!("/{bucket}"), b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

fn remoca(m: &Moto, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("REMOCA_STORE")
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", m.port))
        .env("AWS_ACCESS_KEY_ID", "remoca-test")
        .env("AWS_SECRET_ACCESS_KEY", "remoca-test-secret")
        .env("AWS_REGION", "us-east-1")
        .output()
        .expect("run remoca")
}

fn ok(m: &Moto, args: &[&str]) -> String {
    let o = remoca(m, args);
    assert!(
        o.status.success(),
        "remoca {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// `remoca image import FILE NAME --store STORE`, which must succeed.
fn import(m: &Moto, file: &Path, name: &str, store: &str) -> String {
    ok(
        m,
        &[
            "image",
            "import",
            file.to_str().unwrap(),
            name,
            "--store",
            store,
        ],
    )
}

/// `n` 64 KiB pieces: every 4th zeroes, the rest half random, half one repeated byte.
fn image(seed: u64, n: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; n << 16];
    for (i, p) in v.chunks_mut(1 << 16).enumerate() {
        if i % 4 != 1 {
            rng.fill(&mut p[..1 << 15]);
            p[1 << 15..].fill(i as u8);
        }
    }
    v
}

/// The number after `key` on the first line that contains it.
fn number_after(text: &str, key: &str) -> u64 {
    let at = text
        .find(key)
        .unwrap_or_else(|| panic!("no {key:?} in {text}"))
        + key.len();
    text[at..]
        .split_whitespace()
        .next()
        .unwrap()
        .trim_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap()
}

fn export(m: &Moto, store: &str, spec: &str) -> Vec<u8> {
    let o = remoca(m, &["image", "export", spec, "-", "--store", store]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

fn write(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

#[test]
fn import_export_dedup_and_verify_on_s3() {
    let Some(m) = start_moto("import_export_dedup_and_verify_on_s3") else {
        return;
    };
    make_bucket(&m, "remoca-images");
    let store = "s3://remoca-images/site-a/store";
    let d = tempfile::tempdir().unwrap();
    let a = image(1, 48);
    let mut b = a.clone();
    b[(5 << 16) + 100..(5 << 16) + 200].fill(0xee); // one piece differs
    let pa = write(d.path(), "a.raw", &a);
    let pb = write(d.path(), "b.raw", &b);

    let ra = import(&m, &pa, "a", store);
    let rb = import(&m, &pb, "b", store);
    assert_eq!(number_after(&rb, "zero pieces elided),"), 1, "{rb}");
    assert!(number_after(&ra, "zero pieces elided),") >= 35, "{ra}");

    assert_eq!(export(&m, store, "a"), a);
    assert_eq!(export(&m, store, "b@1"), b);
    let ls = ok(&m, &["image", "ls", "--store", store]);
    assert!(ls.contains('a') && ls.contains('b'), "{ls}");
    let v = ok(&m, &["image", "verify", "--store", store]);
    assert!(v.contains("store is consistent"), "{v}");

    // The objects are where the layout says, under the prefix.
    let s3 = backend(&m, "remoca-images/site-a/store");
    let mut keys: Vec<String> = s3.list("").unwrap().into_iter().map(|k| k.0).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "arenas/00000001.arena",
            "arenas/00000002.arena",
            "images/a/1.manifest",
            "images/b/1.manifest",
            "index"
        ]
    );

    // A reader of a prefix holding no store is told so.
    let o = remoca(
        &m,
        &["image", "ls", "--store", "s3://remoca-images/nothing-here"],
    );
    assert!(!o.status.success());

    // Flip one byte of a chunk payload in the first arena object: verify names a chunk.
    let key = "arenas/00000001.arena";
    let mut arena = s3.get(key).unwrap().expect("arena object");
    arena[16 + 56 + 20] ^= 0x01;
    s3.put(key, &arena).unwrap();
    let o = remoca(&m, &["image", "verify", "--store", store]);
    assert!(
        !o.status.success(),
        "verify must fail on a corrupted object"
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("BAD chunk")).count(),
        1,
        "{out}"
    );
    assert!(
        !remoca(&m, &["image", "export", "a", "-", "--store", store])
            .status
            .success()
    );
}

#[test]
fn an_origin_node_serves_a_version_from_s3() {
    let Some(m) = start_moto("an_origin_node_serves_a_version_from_s3") else {
        return;
    };
    make_bucket(&m, "remoca-origin");
    let store = "s3://remoca-origin/images";
    let d = tempfile::tempdir().unwrap();
    let a = image(7, 40);
    let pa = write(d.path(), "a.raw", &a);
    import(&m, &pa, "os", store);

    let list = d.path().join("os.list");
    let mut origin = Command::new(BIN)
        .args(["image-node", "--listen", "127.0.0.1:0", "--store", store])
        .args(["--image", "os", "--chunk-list"])
        .arg(&list)
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", m.port))
        .env("AWS_ACCESS_KEY_ID", "remoca-test")
        .env("AWS_SECRET_ACCESS_KEY", "remoca-test-secret")
        .env("AWS_REGION", "us-east-1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(origin.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .strip_prefix("origin listening on ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("origin said {line:?}"))
        .to_string();

    let out = d.path().join("deployed.raw");
    let node = remoca(
        &m,
        &[
            "image-node",
            "--listen",
            "127.0.0.1:0",
            "--cache",
            d.path().join("cache").to_str().unwrap(),
            "--origin",
            &addr,
            "--chunk-list",
            list.to_str().unwrap(),
            "--deploy",
            out.to_str().unwrap(),
            "--exit-after-deploy",
        ],
    );
    let _ = origin.kill();
    let _ = origin.wait();
    assert!(
        node.status.success(),
        "{}{}",
        String::from_utf8_lossy(&node.stdout),
        String::from_utf8_lossy(&node.stderr)
    );
    assert_eq!(std::fs::read(&out).unwrap(), a);
}

#[test]
fn a_second_writer_on_s3_fails_instead_of_replacing_the_first_ones_objects() {
    use remoca_blkback::images::chunk::ChunkSize;
    use remoca_blkback::images::store::{Store, StoreOptions};
    let Some(m) =
        start_moto("a_second_writer_on_s3_fails_instead_of_replacing_the_first_ones_objects")
    else {
        return;
    };
    make_bucket(&m, "remoca-race");
    let w = StoreOptions {
        write: true,
        ..StoreOptions::default()
    };
    let cs = ChunkSize::new(64 << 10).unwrap();
    let (a, b) = (image(21, 16), image(22, 16));
    // Both writers open before either publishes, so both pick arena 1 and version 1; the
    // second one's conditional PUT (If-None-Match: *) must fail.
    let mut w1 = Store::open_remote(std::sync::Arc::new(backend(&m, "remoca-race/s")), w).unwrap();
    let mut w2 = Store::open_remote(std::sync::Arc::new(backend(&m, "remoca-race/s")), w).unwrap();
    w1.import("os", &mut &a[..], cs, "w1", &mut |_| {}).unwrap();
    let e = w2
        .import("os", &mut &b[..], cs, "w2", &mut |_| {})
        .unwrap_err();
    assert!(e.to_string().contains("another writer"), "{e}");
    drop((w1, w2));
    assert_eq!(export(&m, "s3://remoca-race/s", "os@1"), a);
    let v = ok(&m, &["image", "verify", "--store", "s3://remoca-race/s"]);
    assert!(v.contains("store is consistent"), "{v}");
}

/// `remoca image gc` on S3: after `rm a@1`, the chunks only a@1 used are freed (its arena,
/// which `b` shares in part, is rewritten into a new object and the old one deleted), and
/// every kept version still exports byte-identical.
#[test]
fn gc_on_s3_frees_a_removed_versions_chunks_and_keeps_every_kept_version() {
    let Some(m) =
        start_moto("gc_on_s3_frees_a_removed_versions_chunks_and_keeps_every_kept_version")
    else {
        return;
    };
    make_bucket(&m, "remoca-gc");
    let store = "s3://remoca-gc/store";
    let d = tempfile::tempdir().unwrap();
    let a1 = image(31, 32);
    let mut b = a1.clone();
    for i in (0..32).step_by(2) {
        b[(i << 16) + 7] ^= 0x5a; // every other piece differs from a@1
    }
    let a2 = image(32, 32);
    for (name, data, img) in [
        ("a1.raw", &a1, "a"),
        ("b.raw", &b, "b"),
        ("a2.raw", &a2, "a"),
    ] {
        let p = write(d.path(), name, data);
        ok(
            &m,
            &[
                "image",
                "import",
                p.to_str().unwrap(),
                img,
                "--store",
                store,
            ],
        );
    }
    let s3 = backend(&m, "remoca-gc/store");
    let arenas = |s3: &S3Backend| {
        let mut k: Vec<String> = s3
            .list("arenas/")
            .unwrap()
            .into_iter()
            .map(|k| k.0)
            .collect();
        k.sort();
        k
    };
    assert_eq!(arenas(&s3).len(), 3);

    ok(&m, &["image", "rm", "a@1", "--store", store]);
    let out = ok(&m, &["image", "gc", "--store", store]);
    let stored: Vec<u64> = out
        .split("stored bytes ")
        .nth(1)
        .unwrap_or_else(|| panic!("{out}"))
        .split(';')
        .next()
        .unwrap()
        .split(" -> ")
        .map(|n| n.trim().parse().unwrap())
        .collect();
    assert!(stored[1] < stored[0], "stored bytes did not drop: {out}");
    // Only a@1's arena held garbage; b's pieces in it were copied to a new object.
    assert!(out.contains(" 1 arenas rewritten"), "{out}");
    let after = arenas(&s3);
    assert!(
        !after.contains(&"arenas/00000001.arena".to_string()),
        "a@1's arena is still there: {after:?}"
    );
    assert_eq!(after.len(), 3, "{after:?}");

    assert_eq!(export(&m, store, "a@2"), a2);
    assert_eq!(export(&m, store, "b@1"), b);
    assert!(
        !remoca(&m, &["image", "export", "a@1", "-", "--store", store])
            .status
            .success()
    );
    let v = ok(&m, &["image", "verify", "--store", store]);
    assert!(v.contains("store is consistent"), "{v}");
    assert!(v.contains(" 0 unreferenced chunks"), "{v}");
    // Nothing left to free: a second gc rewrites nothing.
    let again = ok(&m, &["image", "gc", "--store", store]);
    assert!(again.contains("freed 0 chunks"), "{again}");
    assert!(again.contains(" 0 arenas rewritten"), "{again}");
}

/// `remoca image commit --base` onto S3: an overlay made over an export of os@1, written
/// to, becomes os@2 = os@1 + the overlay's writes; os@1 is unchanged.
#[test]
fn commit_base_onto_s3_makes_a_layer_that_exports_as_base_plus_writes() {
    use remoca_blkback::overlay::Overlay;
    use remoca_blkback::raw::RawFile;
    use remoca_blkback::Disk;
    let Some(m) = start_moto("commit_base_onto_s3_makes_a_layer_that_exports_as_base_plus_writes")
    else {
        return;
    };
    make_bucket(&m, "remoca-commit");
    let store = "s3://remoca-commit/store";
    let d = tempfile::tempdir().unwrap();
    let base = image(41, 32);
    let pb = write(d.path(), "base.raw", &base);
    import(&m, &pb, "os", store);

    // The operator's workflow: export the version, make an overlay over it, the VM writes.
    let t = d.path().join("t.raw");
    ok(
        &m,
        &[
            "image",
            "export",
            "os@1",
            t.to_str().unwrap(),
            "--store",
            store,
        ],
    );
    let ov = d.path().join("vm.ovl");
    ok(
        &m,
        &[
            "image",
            "create",
            "--template",
            t.to_str().unwrap(),
            "--overlay",
            ov.to_str().unwrap(),
        ],
    );
    {
        let tdisk = std::sync::Arc::new(RawFile::open_read_only(&t).unwrap());
        let o = Overlay::open(&ov, tdisk, false).unwrap();
        o.write_at(&[0x5a; 100], 5000, Default::default()).unwrap(); // piece 0
        o.write_at(&[0x33; 4096], 20 << 16, Default::default())
            .unwrap(); // piece 20
        o.write_zeroes(30 << 16, 1 << 16, Default::default())
            .unwrap(); // piece 30 zeroed
        o.flush().unwrap();
    }
    let mut expect = base.clone();
    expect[5000..5100].fill(0x5a);
    expect[20 << 16..(20 << 16) + 4096].fill(0x33);
    expect[30 << 16..31 << 16].fill(0);

    let out = ok(
        &m,
        &[
            "image",
            "commit",
            ov.to_str().unwrap(),
            "--base",
            "os@1",
            "--image",
            "os",
            "--store",
            store,
        ],
    );
    assert!(
        out.starts_with("os@2: layer on os@1 with 3 changed pieces (1 zeroed), 2 new chunks"),
        "{out}"
    );
    assert_eq!(export(&m, store, "os@2"), expect);
    assert_eq!(export(&m, store, "os@1"), base);
    let v = ok(&m, &["image", "verify", "--store", store]);
    assert!(v.contains("store is consistent"), "{v}");
    // The base is in use by the layer: rm refuses, as on a local store.
    assert!(!remoca(&m, &["image", "rm", "os@1", "--store", store])
        .status
        .success());
}

/// `remoca blkback --export name=os,image=os,store=s3://...`: the image served over NBD
/// straight from the S3 store reads (nbdcopy) as the imported image, and is read-only.
#[test]
fn a_blkback_export_serves_an_image_straight_from_s3() {
    let Some(m) = start_moto("a_blkback_export_serves_an_image_straight_from_s3") else {
        return;
    };
    let has_nbdcopy = Command::new("sh")
        .args(["-c", "command -v nbdcopy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_nbdcopy {
        assert!(
            std::env::var_os("REMOCA_NO_SKIP").is_none(),
            "nbdcopy not found and REMOCA_NO_SKIP is set"
        );
        eprintln!(
            "SKIPPED a_blkback_export_serves_an_image_straight_from_s3: no nbdcopy (libnbd-bin)"
        );
        return;
    }
    make_bucket(&m, "remoca-nbd");
    let store = "s3://remoca-nbd/store";
    let d = tempfile::tempdir().unwrap();
    let img = image(61, 40);
    let p = write(d.path(), "os.raw", &img);
    import(&m, &p, "os", store);

    let mut srv = Command::new(BIN)
        .args(["blkback", "--listen", "127.0.0.1:0", "--export"])
        .arg(format!("name=os,image=os@1,store={store}"))
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", m.port))
        .env("AWS_ACCESS_KEY_ID", "remoca-test")
        .env("AWS_SECRET_ACCESS_KEY", "remoca-test-secret")
        .env("AWS_REGION", "us-east-1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(srv.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let Some(addr) = line.trim().strip_prefix("listening on ").map(str::to_owned) else {
        let _ = srv.kill();
        let _ = srv.wait();
        panic!("remoca blkback did not start: {line:?}");
    };
    let out = d.path().join("copy.raw");
    let copy = Command::new("nbdcopy")
        .arg(format!("nbd://{addr}/os"))
        .arg(&out)
        .output()
        .unwrap();
    let refused = Command::new("nbdcopy")
        .arg(&p)
        .arg(format!("nbd://{addr}/os"))
        .output()
        .unwrap();
    let _ = srv.kill();
    let _ = srv.wait();
    assert!(
        copy.status.success(),
        "{}",
        String::from_utf8_lossy(&copy.stderr)
    );
    assert!(
        std::fs::read(&out).unwrap() == img,
        "the export differs from the image"
    );
    assert!(
        !refused.status.success(),
        "a write to the store export was accepted"
    );
}
