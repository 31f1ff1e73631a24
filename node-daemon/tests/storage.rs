//! Storage: VMs booting from qcow2 overlays on cached templates, image
//! locks between VMM processes, changed-block tracking of guest writes,
//! template downloads from a local HTTP server (resume, checksum, errors),
//! a full disk and corrupt qcow2 headers. `qemu-img check` runs on every
//! qcow2 image we write and `qemu-img compare` is the oracle for contents.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{guest, run_vmm, start_vm, Scratch, BOOT};
use godwit_node::storage::image::{self, ImageFormat};
use godwit_node::storage::template::sha256_file;
use godwit_node::storage::{self, DiskImage, StorageError, TemplateCache};
use godwit_testkit::guest::blk_sector;
use godwit_vmm_control::Command as Cmd;
use serde_json::json;

/// Runs qemu-img; returns (success, stdout + stderr).
fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is installed (qemu-utils)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `qemu-img check` passes on a qcow2 image.
fn check(path: &Path) {
    let (ok, text) = qemu_img(&["check", "-f", "qcow2", path.to_str().unwrap()]);
    assert!(ok, "qemu-img check {}: {text}", path.display());
}

/// `qemu-img compare` finds the two images equal.
fn compare(a: &Path, fa: &str, b: &Path, fb: &str) {
    let (ok, text) = qemu_img(&[
        "compare",
        "-f",
        fa,
        "-F",
        fb,
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
    assert!(
        ok,
        "qemu-img compare {} {}: {text}",
        a.display(),
        b.display()
    );
}

/// Writes the guest's block pattern for `seed` to `count` sectors from
/// `sector` of a raw file.
fn write_pattern_raw(path: &Path, sector: u64, count: u64, seed: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for s in sector..sector + count {
        f.write_all_at(&blk_sector(seed, s), s * 512).unwrap();
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn vm_args(cmdline: &str, disks: &[String]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "--kernel".into(),
        guest().display().to_string(),
        "--memory-mib".into(),
        "128".into(),
        "--cmdline".into(),
        cmdline.into(),
    ];
    for d in disks {
        a.push("--disk".into());
        a.push(d.clone());
    }
    a
}

/// Boots the guest on `disk`, has it verify `verify` (sector, count, seed)
/// and write `write`, then stops it.
fn boot_verify_write(dir: &Scratch, disk: &Path, verify: (u64, u64, u64), write: (u64, u64, u64)) {
    let cmdline = format!(
        "hb_ms=100 blk_write={}:{}:{} blk_verify={}:{}:{}",
        write.0, write.1, write.2, verify.0, verify.1, verify.2
    );
    let mut vm = start_vm(
        dir,
        "vm",
        &[],
        &vm_args(&cmdline, &[format!("path={}", disk.display())]),
    );
    let w = vm.console.wait_prefix("BLK write", BOOT).unwrap();
    assert!(w.text.starts_with("BLK write ok"), "{}", w.text);
    let want = format!(
        "BLK verify ok sector={} count={} seed={}",
        verify.0, verify.1, verify.2
    );
    let v = vm
        .console
        .wait_for("the base's pattern verified", BOOT, |t| {
            t.starts_with("BLK verify") && t.contains(&format!("seed={}", verify.2))
                || t.starts_with("BLK verify bad")
        })
        .unwrap();
    assert_eq!(v.text, want);
    let r = vm.api(Cmd::Stop);
    assert_eq!(r["ok"], true, "{r}");
    assert!(vm.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn guest_boots_from_a_qcow2_overlay_on_a_cached_raw_template() {
    let dir = Scratch::new("stor-raw-base");
    // The template: a raw image with the pattern of seed 11 at 100..132.
    let src = dir.path("template.raw");
    image::create_blank(&src, 16 << 20, ImageFormat::Raw).unwrap();
    write_pattern_raw(&src, 100, 32, 11);
    let cache = TemplateCache::new(dir.path("cache")).unwrap();
    let t = cache
        .fetch(src.to_str().unwrap(), None, &mut |_| {})
        .unwrap();
    assert_eq!(t.format, ImageFormat::Raw);
    compare(&t.path, "raw", &src, "raw");
    let disk = dir.path("vm.qcow2");
    storage::provision(&t, &disk).unwrap();
    check(&disk);

    boot_verify_write(&dir, &disk, (100, 32, 11), (2000, 64, 4242));

    check(&disk);
    let expected = dir.path("expected.raw");
    std::fs::copy(&src, &expected).unwrap();
    write_pattern_raw(&expected, 2000, 64, 4242);
    compare(&disk, "qcow2", &expected, "raw");
    assert_eq!(
        sha256_file(&t.path).unwrap(),
        t.digest,
        "the cached base was written"
    );
    // Only the overlay holds the guest's writes.
    let img = DiskImage::open(&disk, None, true, true).unwrap();
    let ext = img.allocated_extents().unwrap();
    let bytes: u64 = ext.iter().map(|e| e.len).sum();
    assert!(
        bytes <= 2 * 65536 && !ext.is_empty(),
        "overlay allocation {ext:?}"
    );
}

#[test]
fn guest_boots_from_a_qcow2_overlay_on_a_qcow2_base() {
    let dir = Scratch::new("stor-qcow2-base");
    let base = dir.path("base.qcow2");
    storage::blank(16 << 20, ImageFormat::Qcow2, &base).unwrap();
    {
        let img = DiskImage::open(&base, None, false, true).unwrap();
        for s in 100..132u64 {
            img.write_at(&blk_sector(11, s), s * 512).unwrap();
        }
        img.flush().unwrap();
    }
    check(&base);
    let cache = TemplateCache::new(dir.path("cache")).unwrap();
    let t = cache
        .fetch(base.to_str().unwrap(), None, &mut |_| {})
        .unwrap();
    assert_eq!(t.format, ImageFormat::Qcow2);
    assert_eq!(t.virtual_size, 16 << 20);
    let disk = dir.path("vm.qcow2");
    storage::provision(&t, &disk).unwrap();
    check(&disk);

    boot_verify_write(&dir, &disk, (100, 32, 11), (3000, 16, 99));

    check(&disk);
    check(&t.path);
    let expected = dir.path("expected.raw");
    image::create_blank(&expected, 16 << 20, ImageFormat::Raw).unwrap();
    write_pattern_raw(&expected, 100, 32, 11);
    write_pattern_raw(&expected, 3000, 16, 99);
    compare(&disk, "qcow2", &expected, "raw");
    assert_eq!(sha256_file(&t.path).unwrap(), t.digest);
}

#[test]
fn a_second_vmm_cannot_open_a_disk_in_use() {
    let dir = Scratch::new("stor-lock");
    let base = dir.path("base.raw");
    image::create_blank(&base, 8 << 20, ImageFormat::Raw).unwrap();
    let disk = dir.path("vm1.qcow2");
    image::create_overlay(&disk, &base).unwrap();
    let mut vm = start_vm(
        &dir,
        "vm1",
        &[],
        &vm_args("hb_ms=100", &[format!("path={}", disk.display())]),
    );
    vm.console.wait_prefix("READY", BOOT).unwrap();
    let pid = vm.child.id();
    let g = guest().display().to_string();
    for opt in ["", ",ro=on"] {
        let spec = format!("path={}{opt}", disk.display());
        let out = run_vmm(&["--kernel", &g, "--disk", &spec, "--timeout-s", "5"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{spec}: {err}");
        assert!(
            err.contains(&format!("is locked by pid {pid} (")) && err.contains("godwit-vmm"),
            "{err}"
        );
    }
    // The base is shared: another overlay on it opens, the base itself
    // cannot be opened for writing, and the running disk is not removed.
    let other = dir.path("vm2.qcow2");
    image::create_overlay(&other, &base).unwrap();
    DiskImage::open(&other, None, false, true).unwrap();
    assert!(matches!(
        DiskImage::open(&base, None, false, true),
        Err(StorageError::Locked { .. })
    ));
    assert!(matches!(
        storage::remove(&disk),
        Err(StorageError::Locked { .. })
    ));
    // qemu-img honours our lock too.
    let (ok, text) = qemu_img(&["info", disk.to_str().unwrap()]);
    assert!(!ok && text.contains("lock"), "{text}");

    vm.api(Cmd::Stop);
    vm.wait_exit(Duration::from_secs(10));
    // Released when the VMM exits.
    DiskImage::open(&disk, None, false, true).unwrap();
    storage::remove(&disk).unwrap();
    assert!(!disk.exists());
}

#[test]
fn changed_block_tracking_reports_exactly_the_guest_writes() {
    let dir = Scratch::new("stor-cbt");
    let disk = dir.path("disk.qcow2");
    storage::blank(32 << 20, ImageFormat::Qcow2, &disk).unwrap();
    let mut vm = start_vm(
        &dir,
        "vm",
        &[],
        &vm_args("hb_ms=100", &[format!("path={}", disk.display())]),
    );
    vm.console.wait_prefix("READY", BOOT).unwrap();
    let r = vm.api(Cmd::DiskTakeDirty { disk: 0 });
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"]
        .as_str()
        .unwrap()
        .contains("send disk-dirty-start"));
    let r = vm.api(Cmd::DiskDirtyStart { disk: 0 });
    assert_eq!(r["ok"], true, "{r}");
    // Sectors 256..264 are bytes 128 KiB..132 KiB: block 2. Sectors
    // 1000..1300 are bytes 500 KiB..650 KiB: blocks 7 to 10.
    for (cmd, seed) in [("blkwrite 256 8 77", 77), ("blkwrite 1000 300 78", 78)] {
        vm.console.send(cmd).unwrap();
        let l = vm
            .console
            .wait_for("the write", BOOT, |t| {
                t.starts_with("BLK write")
                    && (t.contains(&format!("seed={seed}")) || t.contains("bad"))
            })
            .unwrap();
        assert!(l.text.starts_with("BLK write ok"), "{}", l.text);
    }
    let r = vm.api(Cmd::DiskTakeDirty { disk: 0 });
    assert_eq!(r["ok"], true, "{r}");
    let res = &r["result"];
    assert_eq!(res["granularity"], 65536);
    assert_eq!(res["blocks"], 5, "{res}");
    assert_eq!(
        res["ranges"],
        json!([[2 * 65536, 65536], [7 * 65536, 4 * 65536]]),
        "{res}"
    );
    // Taken means cleared; reads do not dirty.
    vm.console.send("blkverify 256 8 77").unwrap();
    vm.console.wait_prefix("BLK verify", BOOT).unwrap();
    let r = vm.api(Cmd::DiskTakeDirty { disk: 0 });
    assert_eq!(r["result"]["blocks"], 0, "{r}");
    vm.console.send("blkwrite 40000 1 5").unwrap(); // byte 20480000: block 312
    vm.console.wait_prefix("BLK write", BOOT).unwrap();
    let r = vm.api(Cmd::DiskTakeDirty { disk: 0 });
    assert_eq!(r["result"]["ranges"], json!([[312 * 65536, 65536]]), "{r}");
    let r = vm.api(Cmd::DiskTakeDirty { disk: 3 });
    assert!(r["error"].as_str().unwrap().contains("No disk 3"), "{r}");
    let r = vm.api(Cmd::DiskDirtyStop { disk: 0 });
    assert_eq!(r["ok"], true, "{r}");
    vm.api(Cmd::Stop);
    vm.wait_exit(Duration::from_secs(10));
    check(&disk);
}

#[test]
fn corrupt_qcow2_headers_are_refused_and_left_untouched() {
    let dir = Scratch::new("stor-corrupt");
    let g = guest().display().to_string();
    let disk = dir.path("bad.qcow2");
    storage::blank(8 << 20, ImageFormat::Qcow2, &disk).unwrap();
    let mut bytes = std::fs::read(&disk).unwrap();
    bytes[20..24].copy_from_slice(&40u32.to_be_bytes()); // cluster_bits 40
    std::fs::write(&disk, &bytes).unwrap();
    for spec in [
        format!("path={}", disk.display()),
        format!("path={},format=qcow2", disk.display()),
    ] {
        let out = run_vmm(&["--kernel", &g, "--disk", &spec, "--timeout-s", "5"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("is not a usable qcow2 image: cluster_bits 40"),
            "{err}"
        );
    }
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        bytes,
        "the image was changed"
    );

    // A raw file is not qcow2.
    let raw = dir.path("plain.raw");
    image::create_blank(&raw, 1 << 20, ImageFormat::Raw).unwrap();
    let out = run_vmm(&[
        "--kernel",
        &g,
        "--disk",
        &format!("path={},format=qcow2", raw.display()),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no qcow2 magic"));
    let out = run_vmm(&["--kernel", &g, "--disk", "path=/x,format=vmdk"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("use raw or qcow2"));

    // An overlay whose base is gone.
    let base = dir.path("base.raw");
    image::create_blank(&base, 1 << 20, ImageFormat::Raw).unwrap();
    let top = dir.path("top.qcow2");
    image::create_overlay(&top, &base).unwrap();
    std::fs::remove_file(&base).unwrap();
    let out = run_vmm(&["--kernel", &g, "--disk", &format!("path={}", top.display())]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("Backing image {} of", base.display())),
        "{err}"
    );
}

#[test]
fn every_image_we_write_passes_qemu_img_check() {
    let dir = Scratch::new("stor-check");
    let q = dir.path("blank.qcow2");
    storage::blank(20 << 30, ImageFormat::Qcow2, &q).unwrap();
    check(&q);
    let (_, info) = qemu_img(&["info", "--output=json", q.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"], 20u64 << 30);
    let r = dir.path("blank.raw");
    storage::blank(1 << 30, ImageFormat::Raw, &r).unwrap();
    let (_, info) = qemu_img(&["info", "--output=json", r.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["format"], "raw");
    assert_eq!(v["virtual-size"], 1u64 << 30);
    // A written qcow2 (data, rewrites, a zero tail, a cluster-straddling
    // write) checks clean and compares equal to the same writes on raw.
    let img = DiskImage::open(&q, None, false, true).unwrap();
    let shadow = dir.path("shadow.raw");
    image::create_blank(&shadow, 20 << 30, ImageFormat::Raw).unwrap();
    let sf = std::fs::OpenOptions::new()
        .write(true)
        .open(&shadow)
        .unwrap();
    for (off, len, byte) in [
        (0u64, 4096usize, 1u8),
        (65536 - 512, 1024, 2),
        (5 << 30, 1 << 20, 3),
        (0, 512, 4),
        ((20 << 30) - 4096, 4096, 5),
    ] {
        img.write_at(&vec![byte; len], off).unwrap();
        sf.write_all_at(&vec![byte; len], off).unwrap();
    }
    drop(img);
    check(&q);
    compare(&q, "qcow2", &shadow, "raw");
    // Sparse copies of both keep their holes and their contents.
    for (src, fmt) in [(&shadow, "raw"), (&q, "qcow2")] {
        let dst = dir.path(&format!("copy.{fmt}"));
        let st = image::copy_sparse(src, &dst).unwrap();
        assert!(st.data_bytes < 64 << 20, "{st:?}");
        compare(&dst, fmt, src, fmt);
    }
    check(&dir.path("copy.qcow2"));
    // The cloud-init seed is a raw disk image too.
    let seed = storage::NoCloudSeed {
        instance_id: "uid-1".into(),
        hostname: "vm-1".into(),
        ..Default::default()
    };
    let cfg = dir.path("cidata.img");
    storage::write_seed(&seed, &cfg).unwrap();
    let (ok, info) = qemu_img(&["info", "-f", "raw", cfg.to_str().unwrap()]);
    assert!(ok, "{info}");
    assert_eq!(std::fs::read(&cfg).unwrap(), seed.image().unwrap());
}

// ---- template downloads from a local HTTP server ----

/// How the test server answers.
#[derive(Clone, Copy)]
enum Serve {
    /// 200, or 206 for a Range request.
    Normal,
    /// Announce the whole length, send this many bytes, hang up.
    CutAfter(usize),
    /// This status, no body.
    Status(u16),
}

/// A one-thread HTTP/1.1 server on 127.0.0.1 that serves `body` for
/// `modes.len()` connections, one mode each, and records each request's
/// Range header. Stops after the last connection or after 60 s.
struct Server {
    url: String,
    ranges: Arc<Mutex<Vec<Option<String>>>>,
}

fn serve(body: Arc<Vec<u8>>, modes: Vec<Serve>) -> Server {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/image.raw", l.local_addr().unwrap());
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let rec = ranges.clone();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        for mode in modes {
            let s = loop {
                match l.accept() {
                    Ok((s, _)) => break s,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => return,
                }
            };
            s.set_nonblocking(false).unwrap();
            let range = answer(s, &body, mode);
            rec.lock().unwrap().push(range);
        }
    });
    Server { url, ranges }
}

fn answer(mut s: TcpStream, body: &[u8], mode: Serve) -> Option<String> {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut range = None;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("range:") {
            range = Some(v.trim().to_string());
        }
    }
    let start: usize = range
        .as_deref()
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.trim_end_matches('-').parse().ok())
        .unwrap_or(0);
    let _ = match mode {
        Serve::Status(code) => write!(
            s,
            "HTTP/1.1 {code} Nope\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
        Serve::Normal if start > 0 => write!(
            s,
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nConnection: close\r\n\r\n",
            body.len() - start,
            body.len() - 1,
            body.len()
        )
        .and_then(|_| s.write_all(&body[start..])),
        Serve::Normal => write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .and_then(|_| s.write_all(body)),
        Serve::CutAfter(n) => write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .and_then(|_| s.write_all(&body[..n])),
    };
    let _ = s.flush();
    range
}

/// 3 MiB with data, zero runs and a zero tail.
fn image_bytes() -> Vec<u8> {
    let mut v = vec![0u8; 3 << 20];
    for (i, b) in v.iter_mut().enumerate().take(1 << 20) {
        *b = (i % 251) as u8;
    }
    v[(2 << 20) + 7] = 1;
    v
}

fn digest_of(b: &[u8]) -> String {
    let p = std::env::temp_dir().join(format!("godwit-digest-{}", std::process::id()));
    std::fs::write(&p, b).unwrap();
    let d = sha256_file(&p).unwrap();
    std::fs::remove_file(&p).unwrap();
    d
}

#[test]
fn download_is_verified_cached_once_and_resumed_after_a_cut() {
    let dir = Scratch::new("stor-http");
    let body = Arc::new(image_bytes());
    let digest = digest_of(&body);
    let cache = TemplateCache::new(dir.path("cache")).unwrap();
    let srv = serve(
        body.clone(),
        vec![Serve::CutAfter(1_500_000), Serve::Normal],
    );

    let e = cache
        .fetch(&srv.url, Some(&format!("sha256:{digest}")), &mut |_| {})
        .unwrap_err();
    assert!(matches!(e, StorageError::Download(..)), "{e}");
    assert_eq!(names(cache.dir()), vec![format!("sha256-{digest}.partial")]);
    assert!(cache.get(&digest).unwrap().is_none());

    let mut seen = Vec::new();
    let t = cache
        .fetch(&srv.url, Some(&digest), &mut |p| seen.push(p))
        .unwrap();
    assert_eq!(
        *srv.ranges.lock().unwrap(),
        vec![None, Some("bytes=1500000-".to_string())]
    );
    let first = seen.first().unwrap();
    assert_eq!(first.resumed_from, 1_500_000);
    assert_eq!(first.total, Some(3 << 20));
    assert!(seen.last().unwrap().done);
    assert_eq!(names(cache.dir()), vec![format!("sha256-{digest}.raw")]);
    assert_eq!(std::fs::read(&t.path).unwrap(), *body);
    let src = dir.path("src.raw");
    std::fs::write(&src, &*body).unwrap();
    compare(&t.path, "raw", &src, "raw");
    // Zero runs are holes in the cache.
    use std::os::unix::fs::MetadataExt;
    assert!(std::fs::metadata(&t.path).unwrap().blocks() * 512 < (3 << 20) - (1 << 20));

    // Cached once: the same digest does not touch the network again (the
    // server has no connections left to serve).
    let again = cache.fetch(&srv.url, Some(&digest), &mut |_| {}).unwrap();
    assert_eq!(again, t);
    let vm = dir.path("vm.qcow2");
    storage::provision(&again, &vm).unwrap();
    check(&vm);
    compare(&vm, "qcow2", &src, "raw");
}

#[test]
fn failed_downloads_leave_nothing_behind() {
    let dir = Scratch::new("stor-http-fail");
    let body = Arc::new(image_bytes());
    let digest = digest_of(&body);
    let cache = TemplateCache::new(dir.path("cache")).unwrap();

    let srv = serve(
        body.clone(),
        vec![Serve::Status(404), Serve::Normal, Serve::CutAfter(1000)],
    );
    let e = cache
        .fetch(&srv.url, Some(&digest), &mut |_| {})
        .unwrap_err();
    assert!(matches!(e, StorageError::HttpStatus(_, 404)), "{e}");
    assert!(e.to_string().contains("answered HTTP 404"), "{e}");
    assert!(names(cache.dir()).is_empty(), "{:?}", names(cache.dir()));

    let wrong = "ab".repeat(32);
    let e = cache
        .fetch(&srv.url, Some(&wrong), &mut |_| {})
        .unwrap_err();
    assert!(matches!(e, StorageError::ChecksumMismatch { .. }), "{e}");
    assert!(
        e.to_string().contains(&format!("has sha256:{digest}")),
        "{e}"
    );
    assert!(names(cache.dir()).is_empty(), "{:?}", names(cache.dir()));

    // Without a digest a cut download cannot be resumed safely: dropped.
    let e = cache.fetch(&srv.url, None, &mut |_| {}).unwrap_err();
    assert!(matches!(e, StorageError::Download(..)), "{e}");
    assert!(names(cache.dir()).is_empty(), "{:?}", names(cache.dir()));

    // Nobody listening.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/x.raw");
    let e = cache.fetch(&url, Some(&digest), &mut |_| {}).unwrap_err();
    assert!(matches!(e, StorageError::Download(..)), "{e}");
    assert!(names(cache.dir()).is_empty(), "{:?}", names(cache.dir()));
}

// ---- a full disk ----

/// Limit on file size for the child (RLIMIT_FSIZE): writes past it fail
/// with EFBIG, as writes on a full file system fail with ENOSPC; both are
/// StorageError::NoSpace.
const CHILD_FSIZE: u64 = 1 << 20;

/// Runs `full_disk_child` in a child process whose files cannot grow past
/// 1 MiB: a per-process limit, so the test needs no tmpfs mount and does
/// not disturb the other tests running in this process.
#[test]
fn a_full_disk_leaves_the_source_untouched_and_nothing_partial() {
    use std::os::unix::process::CommandExt;
    let dir = Scratch::new("stor-full");
    let src = dir.path("src.raw");
    let body = image_bytes();
    std::fs::write(&src, &body).unwrap();
    let digest = digest_of(&body);
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "full_disk_child",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env("GODWIT_FULL_DISK_DIR", &dir.0);
    // SAFETY: setrlimit and signal are async-signal-safe; nothing else runs
    // between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: CHILD_FSIZE,
                rlim_max: CHILD_FSIZE,
            };
            libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
            // Without this the kernel kills the process on the first
            // write past the limit instead of failing it.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("FULL-DISK-CHILD OK"),
        "{text}"
    );
    assert_eq!(sha256_file(&src).unwrap(), digest, "the source changed");
    assert_eq!(names(&dir.0), vec!["cache", "src.raw"]);
    assert!(names(&dir.path("cache")).is_empty());
}

/// The child half of the full-disk test (does nothing when run normally).
#[test]
fn full_disk_child() {
    let Some(dir) = std::env::var_os("GODWIT_FULL_DISK_DIR").map(PathBuf::from) else {
        return;
    };
    let src = dir.join("src.raw");
    let cache = TemplateCache::new(dir.join("cache")).unwrap();
    let e = cache
        .fetch(src.to_str().unwrap(), None, &mut |_| {})
        .unwrap_err();
    assert!(matches!(e, StorageError::NoSpace(..)), "import: {e}");
    assert!(e.to_string().contains("No space left"), "{e}");
    assert!(names(cache.dir()).is_empty(), "{:?}", names(cache.dir()));

    let dst = dir.join("copy.raw");
    let e = image::copy_sparse(&src, &dst).unwrap_err();
    assert!(matches!(e, StorageError::NoSpace(..)), "copy: {e}");
    assert!(!dst.exists());

    let body = Arc::new(std::fs::read(&src).unwrap());
    let srv = serve(body.clone(), vec![Serve::Normal]);
    let e = cache
        .fetch(&srv.url, Some(&sha256_file(&src).unwrap()), &mut |_| {})
        .unwrap_err();
    assert!(matches!(e, StorageError::NoSpace(..)), "download: {e}");
    assert!(names(cache.dir()).is_empty(), "{:?}", names(cache.dir()));
    println!("FULL-DISK-CHILD OK");
}

// ---- provisioning with customization ----

#[test]
fn a_vm_provisioned_from_a_template_gets_its_customization() {
    use godwit_testkit::netns::{unique_name, Netns, Veth};
    const MAC: &str = "52:54:00:77:01:02";
    common::require_kvm();
    let dir = Scratch::new("stor-custom");
    let src = dir.path("template.raw");
    image::create_blank(&src, 16 << 20, ImageFormat::Raw).unwrap();
    write_pattern_raw(&src, 0, 8, 3);
    let cache = TemplateCache::new(dir.path("cache")).unwrap();
    let digest = sha256_file(&src).unwrap();
    let t = cache
        .fetch(
            src.to_str().unwrap(),
            Some(&format!("sha256:{digest}")),
            &mut |_| {},
        )
        .unwrap();
    let root = dir.path("root.qcow2");
    storage::provision(&t, &root).unwrap();
    let seed = storage::NoCloudSeed {
        instance_id: "uid-web-1".into(),
        hostname: "web-1".into(),
        ssh_authorized_keys: vec!["ssh-ed25519 AAAAC3Nza test@godwit".into()],
        network: Some(storage::SeedNetwork {
            mac: Some(MAC.into()),
            address: Some("10.77.1.2/24".into()),
            gateway: Some("10.77.1.1".into()),
            dns: vec!["10.77.1.1".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let cfg = dir.path("cidata.img");
    storage::write_seed(&seed, &cfg).unwrap();
    // No customization on the command line: the guest reads the seed, as
    // cloud-init would.
    let cmdline = "hb_ms=100 tcp_port=7001 blk_verify=0:8:3";

    let host = Netns::new("gwh").expect("create VM host namespace");
    let client = Netns::new("gwc").expect("create client namespace");
    let br = unique_name("br");
    host.add_bridge(&br).unwrap();
    let (va, vb) = (unique_name("va"), unique_name("vb"));
    let _veth = Veth::new(&host, &va, &client, &vb).unwrap();
    host.attach(&va, &br).unwrap();
    client.add_addr(&vb, "10.77.1.1/24").unwrap();
    let tap = unique_name("tap");
    let mut args = vm_args(
        cmdline,
        &[
            format!("path={}", root.display()),
            format!("path={},ro=on", cfg.display()),
        ],
    );
    args.extend(["--net".into(), format!("tap={tap},bridge={br},mac={MAC}")]);
    let mut vm = start_vm(&dir, "vm", &["ip", "netns", "exec", host.name()], &args);
    let s = vm.console.wait_prefix("SEED", BOOT).unwrap();
    assert_eq!(
        s.text,
        "SEED label=cidata files=meta-data,user-data,network-config"
    );
    let h = vm.console.wait_prefix("HOSTNAME", BOOT).unwrap();
    assert_eq!(h.text, "HOSTNAME web-1");
    let (mut net, mut blk) = (false, false);
    vm.console
        .wait_for("NET up and the base's pattern verified", BOOT, |t| {
            net |= t.starts_with("NET up");
            blk |= t.starts_with("BLK verify");
            net && blk
        })
        .unwrap();
    let find = |prefix: &str| {
        vm.console
            .lines()
            .iter()
            .find(|l| l.text.starts_with(prefix))
            .map(|l| l.text.clone())
            .unwrap()
    };
    let v = find("BLK verify");
    assert_eq!(v, "BLK verify ok sector=0 count=8 seed=3");
    let up = find("NET up");
    assert!(up.contains("ip=10.77.1.2 "), "{up}");
    // The address works: a client on the gateway's side reads a heartbeat.
    let line = client
        .run_in(|| {
            let addr: std::net::SocketAddr = "10.77.1.2:7001".parse().unwrap();
            let deadline = Instant::now() + Duration::from_secs(15);
            let s = loop {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                    Ok(s) => break s,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(200))
                    }
                    Err(e) => panic!("cannot connect to the guest: {e}"),
                }
            };
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut l = String::new();
            BufReader::new(s).read_line(&mut l).unwrap();
            l
        })
        .unwrap();
    assert!(line.starts_with("HB "), "{line:?}");
    // Both disks are there; the seed is unchanged (attached read-only).
    let blks = vm
        .console
        .lines()
        .iter()
        .filter(|l| l.text.starts_with("VIRTIO") && l.text.ends_with("blk"))
        .count();
    assert_eq!(blks, 2);
    assert_eq!(std::fs::read(&cfg).unwrap(), seed.image().unwrap());
    vm.api(Cmd::Stop);
    vm.wait_exit(Duration::from_secs(10));
    check(&root);
    assert_eq!(sha256_file(&t.path).unwrap(), digest);
}

#[test]
fn a_snapshot_of_a_running_vm_cannot_run_beside_it() {
    let dir = Scratch::new("stor-snap");
    let disk = dir.path("disk.qcow2");
    storage::blank(8 << 20, ImageFormat::Qcow2, &disk).unwrap();
    let mut vm = start_vm(
        &dir,
        "vm1",
        &[],
        &vm_args(
            "hb_ms=100 blk_write=64:16:21",
            &[format!("path={}", disk.display())],
        ),
    );
    let w = vm.console.wait_prefix("BLK write", BOOT).unwrap();
    assert!(w.text.starts_with("BLK write ok"), "{}", w.text);
    let snap = dir.path("snap");
    let r = vm.api(Cmd::SaveState { dir: snap.clone() });
    assert_eq!(r["ok"], true, "{r}");
    // The paused source still holds its disk.
    let out = run_vmm(&["--restore", snap.to_str().unwrap(), "--timeout-s", "5"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("is locked by pid"), "{err}");
    vm.api(Cmd::Stop);
    vm.wait_exit(Duration::from_secs(10));
    // Once it is gone the snapshot runs and finds the guest's data.
    let mut vm2 = start_vm(
        &dir,
        "vm2",
        &[],
        &["--restore".to_string(), snap.display().to_string()],
    );
    vm2.console.send("blkverify 64 16 21").unwrap();
    let v = vm2
        .console
        .wait_for("the pattern", BOOT, |t| t.starts_with("BLK verify"))
        .unwrap();
    assert_eq!(v.text, "BLK verify ok sector=64 count=16 seed=21");
    vm2.api(Cmd::Stop);
    vm2.wait_exit(Duration::from_secs(10));
    check(&disk);
}
