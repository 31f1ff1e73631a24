//! `boot.fromImage`: kernels and initrds read out of disk images that real
//! tools built (`mkfs.ext4 -d`, `mkfs.vfat`, `sfdisk`, `qemu-img convert`),
//! checked against `sha256sum` and `blkid`. GPT, MBR (with a separate /boot
//! partition), a whole-disk filesystem, qcow2 and a qcow2 overlay; the
//! cache; and the errors for what is missing, each message checked.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use godwit_node::storage::boot_image::{BootCache, BootFiles};
use godwit_node::storage::ImageFormat;

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("godwit-bootimg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const MIB: u64 = 1 << 20;
const OLD: &str = "6.1.0-9-amd64";
const NEW: &str = "6.1.0-13-amd64";

/// Runs a tool; panics with its output when it fails; returns stdout.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (install it: e2e/install-deps.sh): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Pseudo-random bytes (xorshift), distinct per seed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes a file, creating its directory.
fn put(path: &Path, data: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

/// A root tree: /etc, /sbin and (with `boot`) /boot with two kernels and
/// their initrds. The newer kernel (by version; string order says the
/// other) is over 1 MiB, so it crosses the extractor's buffer.
fn root_tree(dir: &Path, boot: bool) {
    put(&dir.join("etc/fstab"), b"UUID=x / ext4 defaults 0 1\n");
    std::fs::create_dir_all(dir.join("sbin")).unwrap();
    if boot {
        boot_files(&dir.join("boot"));
    } else {
        std::fs::create_dir_all(dir.join("boot")).unwrap();
    }
}

fn boot_files(dir: &Path) {
    put(&dir.join(format!("vmlinuz-{OLD}")), &noise(1, 300_000));
    put(&dir.join(format!("vmlinuz-{NEW}")), &noise(2, 1_500_000));
    put(&dir.join(format!("initrd.img-{OLD}")), &noise(3, 200_000));
    put(&dir.join(format!("initrd.img-{NEW}")), &noise(4, 700_000));
    put(
        &dir.join(format!("config-{NEW}")),
        b"CONFIG_VIRTIO_MMIO=m\n",
    );
}

/// An ext4 filesystem image of `mib` MiB holding `tree`.
fn mkfs_ext4(path: &Path, mib: u64, tree: &Path) {
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-d",
            &tree.display().to_string(),
            &path.display().to_string(),
            &format!("{mib}M"),
        ],
    );
}

/// A vfat filesystem image of `mib` MiB.
fn mkfs_vfat(path: &Path, mib: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(mib * MIB).unwrap();
    run("mkfs.vfat", &["-n", "ESP", &path.display().to_string()]);
}

/// A partitioned disk of `mib` MiB (`label` gpt or dos): each
/// (filesystem image, sfdisk type) gets a partition of its size, from 1 MiB
/// on, and its bytes.
fn disk(path: &Path, mib: u64, label: &str, parts: &[(&Path, &str)]) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(mib * MIB).unwrap();
    let mut script = format!("label: {label}\n");
    let mut start = MIB;
    let mut placed = Vec::new();
    for (fs, kind) in parts {
        let size = std::fs::metadata(fs).unwrap().len();
        script += &format!("start={}, size={}, type={kind}\n", start / 512, size / 512);
        placed.push((fs.to_path_buf(), start));
        start += size;
    }
    let mut child = Command::new("sfdisk")
        .args(["-q", &path.display().to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("sfdisk (fdisk package)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sfdisk: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (fs, at) in placed {
        f.write_all_at(&std::fs::read(fs).unwrap(), at).unwrap();
    }
}

/// `blkid`'s UUID of the filesystem at `offset` (`size` bytes) of `disk`.
fn blkid_uuid(disk: &Path, offset: u64, size: u64) -> String {
    run(
        "blkid",
        &[
            "-p",
            "-O",
            &offset.to_string(),
            "-S",
            &size.to_string(),
            "-s",
            "UUID",
            "-o",
            "value",
            &disk.display().to_string(),
        ],
    )
}

fn sha256sum(path: &Path) -> String {
    run("sha256sum", &[&path.display().to_string()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The extracted kernel and initrd are the newest ones, byte for byte.
fn assert_newest(files: &BootFiles, boot_dir: &Path) {
    assert_eq!(files.version, NEW);
    assert_eq!(
        sha256sum(&files.kernel),
        sha256sum(&boot_dir.join(format!("vmlinuz-{NEW}")))
    );
    let initrd = files.initrd.as_ref().expect("an initrd");
    assert_eq!(
        sha256sum(initrd),
        sha256sum(&boot_dir.join(format!("initrd.img-{NEW}")))
    );
}

/// Resolves without a known digest (the file is hashed).
fn resolve(cache: &BootCache, image: &Path, format: ImageFormat) -> BootFiles {
    cache
        .resolve(image, format, None)
        .unwrap_or_else(|e| panic!("{}: {}", image.display(), godwit_crds::error_chain(&e)))
}

fn resolve_err(cache: &BootCache, image: &Path) -> String {
    match cache.resolve(image, ImageFormat::Raw, None) {
        Ok(f) => panic!("{} resolved to {f:?}", image.display()),
        Err(e) => godwit_crds::error_chain(&e),
    }
}

#[test]
fn gpt_disk_with_an_esp_newest_kernel_root_uuid_and_cache_hit() {
    let s = Scratch::new("gpt");
    let tree = s.path("tree");
    root_tree(&tree, true);
    mkfs_vfat(&s.path("esp.img"), 8);
    mkfs_ext4(&s.path("root.img"), 24, &tree);
    let image = s.path("disk.raw");
    disk(
        &image,
        40,
        "gpt",
        &[(&s.path("esp.img"), "uefi"), (&s.path("root.img"), "linux")],
    );
    let uuid = blkid_uuid(&image, 9 * MIB, 24 * MIB);
    assert_eq!(uuid.len(), 36, "blkid: {uuid:?}");

    let cache = BootCache::new(&s.path("images"));
    let digest = sha256sum(&image);
    let files = cache
        .resolve(&image, ImageFormat::Raw, Some(&format!("sha256:{digest}")))
        .unwrap();
    assert!(!files.cached);
    assert_newest(&files, &tree.join("boot"));
    assert_eq!(files.root_uuid, uuid);
    assert_eq!(
        files.cmdline("console=ttyS0 ro"),
        format!("root=UUID={uuid} console=ttyS0 ro")
    );
    let entry = s.path(&format!("images/boot/sha256-{digest}"));
    assert_eq!(files.kernel, entry.join(format!("vmlinuz-{NEW}")));

    // Second call: from the cache, the same files; no temporary left.
    let again = resolve(&cache, &image, ImageFormat::Raw);
    assert!(again.cached);
    assert_eq!(
        BootFiles {
            cached: false,
            ..again
        },
        files
    );
    let names: Vec<String> = std::fs::read_dir(s.path("images/boot"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec![format!("sha256-{digest}")]);

    // The same disk as qcow2, and a qcow2 overlay on that (read through
    // its backing chain): the same kernel, initrd and UUID.
    let qcow2 = s.path("disk.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "qcow2",
            &image.display().to_string(),
            &qcow2.display().to_string(),
        ],
    );
    let q = resolve(&cache, &qcow2, ImageFormat::Qcow2);
    assert!(!q.cached, "a qcow2 file has its own digest");
    assert_newest(&q, &tree.join("boot"));
    assert_eq!(q.root_uuid, uuid);
    let overlay = s.path("overlay.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            &qcow2.display().to_string(),
            &overlay.display().to_string(),
        ],
    );
    let o = resolve(&cache, &overlay, ImageFormat::Qcow2);
    assert_newest(&o, &tree.join("boot"));
    assert_eq!(o.root_uuid, uuid);
}

#[test]
fn mbr_disk_with_a_separate_boot_partition() {
    let s = Scratch::new("mbr");
    // Partition 1: /boot on its own (kernels at its top, no /etc);
    // partition 2: the root, whose /boot is the empty mount point.
    let boot_tree = s.path("boot-tree");
    boot_files(&boot_tree);
    let root = s.path("root-tree");
    root_tree(&root, false);
    mkfs_ext4(&s.path("boot.img"), 8, &boot_tree);
    mkfs_ext4(&s.path("root.img"), 8, &root);
    let image = s.path("disk.raw");
    disk(
        &image,
        20,
        "dos",
        &[(&s.path("boot.img"), "83"), (&s.path("root.img"), "83")],
    );
    let boot_uuid = blkid_uuid(&image, MIB, 8 * MIB);
    let root_uuid = blkid_uuid(&image, 9 * MIB, 8 * MIB);
    assert_ne!(boot_uuid, root_uuid);

    let cache = BootCache::new(&s.path("images"));
    let files = resolve(&cache, &image, ImageFormat::Raw);
    assert_newest(&files, &boot_tree);
    assert_eq!(
        files.root_uuid, root_uuid,
        "root= names the filesystem with /etc"
    );
}

#[test]
fn whole_disk_filesystem() {
    let s = Scratch::new("whole");
    let tree = s.path("tree");
    root_tree(&tree, true);
    let image = s.path("fs.raw");
    mkfs_ext4(&image, 16, &tree);
    let uuid = run(
        "blkid",
        &["-s", "UUID", "-o", "value", &image.display().to_string()],
    );
    let files = resolve(&BootCache::new(&s.path("images")), &image, ImageFormat::Raw);
    assert_newest(&files, &tree.join("boot"));
    assert_eq!(files.root_uuid, uuid);
}

#[test]
fn errors_name_what_is_missing() {
    let s = Scratch::new("errors");
    let cache = BootCache::new(&s.path("images"));

    let zeros = s.path("zeros.raw");
    std::fs::File::create(&zeros)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    let e = resolve_err(&cache, &zeros);
    assert!(
        e.contains("has no partition table (GPT or MBR) and no filesystem"),
        "{e}"
    );

    let no_boot = s.path("no-boot");
    put(&no_boot.join("etc/fstab"), b"\n");
    let image = s.path("no-boot.raw");
    mkfs_ext4(&image, 8, &no_boot);
    let e = resolve_err(&cache, &image);
    assert!(e.contains("has no /boot"), "{e}");
    assert!(e.contains("the whole disk: ext2/3/4"), "{e}");

    let empty_boot = s.path("empty-boot");
    root_tree(&empty_boot, false);
    put(&empty_boot.join(format!("boot/config-{NEW}")), b"\n");
    let image = s.path("empty-boot.raw");
    mkfs_ext4(&image, 8, &empty_boot);
    let e = resolve_err(&cache, &image);
    assert!(
        e.contains("has no kernel: /boot on the whole disk holds no vmlinuz-<version> file"),
        "{e}"
    );

    // A GPT disk with nothing but an EFI system partition, and a FAT
    // filesystem on the whole disk: vfat is not read.
    mkfs_vfat(&s.path("esp.img"), 8);
    let image = s.path("vfat-only.raw");
    disk(&image, 12, "gpt", &[(&s.path("esp.img"), "uefi")]);
    let e = resolve_err(&cache, &image);
    assert!(
        e.contains("has no ext2/3/4 filesystem (partition 1: vfat); fromImage reads /boot from ext2/3/4 only"),
        "{e}"
    );
    let e = resolve_err(&cache, &s.path("esp.img"));
    assert!(
        e.contains("has no ext2/3/4 filesystem (the whole disk: vfat)"),
        "{e}"
    );
    // Nothing was cached for any of them.
    let left = std::fs::read_dir(s.path("images/boot"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left, 0);
}
