//! Opening exports with the remote layers beside plain ones (what `remoca blkback` will call),
//! and the swap device under concurrent requests.

mod remote_support;

use std::sync::Arc;

use remoca_blkback::export::ExportConfig;
use remoca_blkback::remote::{
    namespace_for, open_exports, CacheConfig, CacheExport, RemoteExportError, SwapConfig, SwapDisk,
    SwapExport,
};
use remoca_blkback::{Disk, WriteFlags};
use remote_support::*;

fn plain(name: &str, template: &std::path::Path) -> ExportConfig {
    ExportConfig {
        name: name.into(),
        template: template.into(),
        overlay: None,
        read_only: true,
        min_block: 512,
    }
}

fn swap_export(name: &str, dir: &std::path::Path, size: u64) -> SwapExport {
    SwapExport {
        name: name.into(),
        swap: SwapConfig {
            size,
            namespace: namespace_for("host-a", "swap", name),
            spill_path: dir.join(format!("{name}.spill")),
            spill_max: size.max(4096),
        },
    }
}

#[test]
fn plain_cached_and_swap_exports_open_together() {
    let (_servers, client) = servers_and_client(2);
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t.raw");
    let content: Vec<u8> = (0..(256u32 << 10)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&t, &content).unwrap();
    let plains = [plain("golden", &t), plain("vm1", &t)];
    let swaps = [
        swap_export("vm1-swap", dir.path(), 1 << 20),
        swap_export("broken-swap", dir.path(), 1000),
    ];
    let caches = [CacheExport {
        export: "vm1",
        cache: CacheConfig::new(namespace_for("host-a", "cache", "vm1")),
    }];
    let o = open_exports(&plains, &swaps, &caches, &client).unwrap();
    assert_eq!(o.failed.len(), 1);
    assert!(o.failed[0].to_string().contains("broken-swap"));
    assert!(o.exports.get("broken-swap").is_none());
    let vm1 = o.exports.get("vm1").unwrap();
    assert!(vm1.description.starts_with("remote cache over raw"));
    assert_eq!(vm1.min_block, 512);
    let sw = o.exports.get("vm1-swap").unwrap();
    assert_eq!(sw.min_block, 4096);
    assert_eq!(sw.disk.size(), 1 << 20);
    assert!(o
        .exports
        .get("golden")
        .unwrap()
        .description
        .starts_with("raw"));
    // Reads through the cached export are right, and the second pass is counted.
    for _ in 0..3 {
        let mut buf = vec![0u8; 64 << 10];
        vm1.disk.read_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, content[4096..4096 + (64 << 10)]);
    }
    let (name, cache) = &o.caches[0];
    assert_eq!(name, "vm1");
    assert_eq!(cache.stats().hits, 16);
    assert_eq!(o.swaps.len(), 1);

    let bad = [CacheExport {
        export: "nope",
        cache: CacheConfig::new(1),
    }];
    assert!(matches!(
        open_exports(&plains, &[], &bad, &client),
        Err(RemoteExportError::UnknownCacheTarget(_))
    ));
    assert_ne!(
        namespace_for("host-a", "swap", "vm1"),
        namespace_for("host-b", "swap", "vm1")
    );
    assert_ne!(
        namespace_for("host-a", "swap", "vm1"),
        namespace_for("host-a", "cache", "vm1")
    );
}

#[test]
fn concurrent_requests_on_the_swap_device_keep_every_block() {
    let (_servers, client) = servers_and_client(2);
    let dir = tempfile::tempdir().unwrap();
    let d = Arc::new(
        SwapDisk::open(
            client,
            SwapConfig {
                size: 4 << 20,
                namespace: 5,
                spill_path: dir.path().join("s"),
                spill_max: 4 << 20,
            },
        )
        .unwrap(),
    );
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                // Thread t owns blocks t, t+4, t+8, ...: neighbours share stripes.
                for round in 0..3u8 {
                    for b in (t..1024).step_by(4).take(64) {
                        let v = vec![((b as u8) ^ round ^ 0x5a) | 1; 4096];
                        d.write_at(&v, b * 4096, WriteFlags::default()).unwrap();
                    }
                    for b in (t..1024).step_by(4).take(64) {
                        let mut r = vec![0u8; 4096];
                        d.read_at(&mut r, b * 4096).unwrap();
                        assert_eq!(r, vec![((b as u8) ^ round ^ 0x5a) | 1; 4096], "block {b}");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(d.stats().remote_blocks, 256);
}
