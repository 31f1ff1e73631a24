//! virtio-blk: the pattern the guest writes lands in the image file; a
//! read-only disk refuses writes.

mod common;

use std::time::Duration;

use common::{guest, start_vm, Scratch, BOOT};
use godwit_testkit::guest::blk_sector;
use godwit_vmm_control::Command as Cmd;

fn image(dir: &Scratch, name: &str) -> std::path::PathBuf {
    let p = dir.path(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(4 << 20).unwrap();
    p
}

#[test]
fn guest_disk_pattern_reaches_the_image() {
    let dir = Scratch::new("disk-rw");
    let img = image(&dir, "disk.img");
    let g = guest().display().to_string();
    let args: Vec<String> = vec![
        "--kernel".into(),
        g,
        "--memory-mib".into(),
        "128".into(),
        "--cmdline".into(),
        "hb_ms=100 blk_write=8:16:4242".into(),
        "--disk".into(),
        format!("path={}", img.display()),
    ];
    let mut vm = start_vm(&dir, "vm", &[], &args);
    let v = vm.console.wait_prefix("VIRTIO", BOOT).unwrap();
    assert!(v.text.contains("0xd0000000"), "{}", v.text);
    let w = vm.console.wait_prefix("BLK write", BOOT).unwrap();
    assert!(w.text.starts_with("BLK write ok"), "{}", w.text);
    let data = std::fs::read(&img).unwrap();
    for s in 8..24u64 {
        let off = s as usize * 512;
        assert!(
            data[off..off + 512] == blk_sector(4242, s),
            "sector {s} in the image differs from the guest's pattern"
        );
    }
    assert!(
        data[..8 * 512].iter().all(|b| *b == 0),
        "write outside the range"
    );
    vm.api(Cmd::Stop);
    vm.wait_exit(Duration::from_secs(10));
}

#[test]
fn read_only_disk_refuses_writes() {
    let dir = Scratch::new("disk-ro");
    let img = image(&dir, "ro.img");
    let g = guest().display().to_string();
    let args: Vec<String> = vec![
        "--kernel".into(),
        g,
        "--memory-mib".into(),
        "128".into(),
        "--cmdline".into(),
        "hb_ms=100 blk_write=0:4:7".into(),
        "--disk".into(),
        format!("path={},ro=on", img.display()),
    ];
    let mut vm = start_vm(&dir, "vm", &[], &args);
    let w = vm.console.wait_prefix("BLK write", BOOT).unwrap();
    assert!(w.text.starts_with("BLK write bad"), "{}", w.text);
    let data = std::fs::read(&img).unwrap();
    assert!(data.iter().all(|b| *b == 0), "read-only image was modified");
}
