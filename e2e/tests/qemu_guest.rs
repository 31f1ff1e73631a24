//! The Godwit test guest under real QEMU/KVM: heartbeats and CPU count, the
//! memory workload and its verifier, virtio-net TCP streaming and ping from
//! another network namespace, a virtio-blk pattern read back from the image
//! file, and a live migration between two local QEMU processes.
//!
//! These need /dev/kvm and `qemu-system-x86_64` (Debian `qemu-system-x86`),
//! `ip`/`tc` (`iproute2`) and `ping` (`iputils-ping`); without them they fail.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use godwit_testkit::guest::{blk_sector, field, parse_heartbeat, Heartbeat};
use godwit_testkit::netns::{Netns, Veth};
use godwit_testkit::qemu::{free_port, Qemu, QemuConfig, ScratchDir};
use serde_json::json;

const BOOT: Duration = Duration::from_secs(60);
const T: Duration = Duration::from_secs(30);

fn spawn(cfg: &QemuConfig) -> Qemu {
    Qemu::spawn(cfg).unwrap_or_else(|e| panic!("cannot run the test guest under QEMU/KVM: {e}"))
}

fn assert_consecutive(hbs: &[(Heartbeat, Instant)]) {
    for w in hbs.windows(2) {
        let (a, b) = (w[0].0, w[1].0);
        assert_eq!(
            b.counter,
            a.counter + 1,
            "heartbeat counters {a:?} -> {b:?}"
        );
        assert!(
            b.guest_ns > a.guest_ns,
            "guest clock went back: {a:?} -> {b:?}"
        );
        assert!(w[1].1 >= w[0].1);
    }
}

#[test]
fn heartbeats_arrive_and_two_cpus_are_counted_from_acpi() {
    let mut q = spawn(&QemuConfig {
        cpus: 2,
        append: "hb_ms=20".into(),
        ..Default::default()
    });
    let first = q.console.wait_prefix("GODWIT-TESTGUEST ", BOOT).unwrap();
    assert!(first.text.len() > "GODWIT-TESTGUEST ".len());
    let cmdline = q.console.wait_prefix("CMDLINE ", T).unwrap();
    assert!(cmdline.text.contains("hb_ms=20"), "{}", cmdline.text);
    let mem = q.console.wait_prefix("MEM ", T).unwrap();
    let bytes: u64 = mem.text[4..].parse().unwrap();
    assert!(bytes > 200 << 20 && bytes <= 256 << 20, "{}", mem.text);
    let cpus = q.console.wait_prefix("CPUS ", T).unwrap();
    assert_eq!(cpus.text, "CPUS 2");
    q.console.wait_prefix("READY", T).unwrap();
    let hbs = q.console.heartbeats(20, T).unwrap();
    assert_consecutive(&hbs);
    assert!(hbs[0].0.counter <= 2, "first heartbeat {:?}", hbs[0].0);
    // 19 periods of 20 ms by the guest's clock, within generous bounds (beats
    // are scheduled on a fixed grid, so a late first beat shortens the span).
    let span = hbs[19].0.guest_ns - hbs[0].0.guest_ns;
    assert!(
        (18 * 20_000_000..19 * 60_000_000).contains(&span),
        "19 heartbeats took {span} ns of guest time"
    );
    q.console.send("maxpause").unwrap();
    let mp = q.console.wait_prefix("MAXPAUSE ", T).unwrap();
    let ms: u64 = mp.text[9..].parse().unwrap();
    assert!(ms >= 19, "{}", mp.text);
}

#[test]
fn two_cpus_are_counted_from_the_mp_table_without_acpi() {
    let mut q = spawn(&QemuConfig {
        cpus: 2,
        acpi: false,
        append: "hb_ms=50".into(),
        ..Default::default()
    });
    let cpus = q.console.wait_prefix("CPUS ", BOOT).unwrap();
    assert_eq!(cpus.text, "CPUS 2");
    q.console.wait_prefix("READY", T).unwrap();
    assert_consecutive(&q.console.heartbeats(3, T).unwrap());
}

#[test]
fn memcheck_passes_after_dirtying_64_mib_and_catches_a_corrupted_page() {
    let mut q = spawn(&QemuConfig {
        memory_mib: 256,
        append: "hb_ms=10 dirty_mib=64 memcheck_s=1".into(),
        ..Default::default()
    });
    let dirty = q.console.wait_prefix("DIRTY ", BOOT).unwrap();
    assert_eq!(field(&dirty.text, "pages"), Some("16384"), "{}", dirty.text);
    q.console.wait_prefix("READY", T).unwrap();
    // A periodic check once every page has been written at least once.
    memcheck_ok(&mut q, "16384");
    // Heartbeats kept coming while the workload ran.
    assert_consecutive(&q.console.heartbeats(10, T).unwrap());

    q.console.send("corrupt 1234").unwrap();
    q.console.wait_prefix("CORRUPT page=1234", T).unwrap();
    q.console.send("memcheck").unwrap();
    let bad = q.console.wait_prefix("MEMCHECK bad", T).unwrap();
    assert_eq!(field(&bad.text, "page"), Some("1234"), "{}", bad.text);
    let expected = u64::from_str_radix(&field(&bad.text, "expected").unwrap()[2..], 16).unwrap();
    let found = u64::from_str_radix(&field(&bad.text, "found").unwrap()[2..], 16).unwrap();
    assert_eq!(expected ^ found, 1, "{}", bad.text);
}

#[test]
fn random_order_and_mixed_fill_verify_exactly_and_heartbeats_count_writes() {
    let mut q = spawn(&QemuConfig {
        memory_mib: 256,
        append: "hb_ms=10 dirty_mib=16 dirty_order=random dirty_fill=mix mix_mib=64 memcheck_s=1"
            .into(),
        ..Default::default()
    });
    let dirty = q.console.wait_prefix("DIRTY mib=", BOOT).unwrap();
    for (key, value) in [
        ("pages", "4096"),
        ("order", "random"),
        ("fill", "mix"),
        ("region_pages", "16384"),
    ] {
        assert_eq!(field(&dirty.text, key), Some(value), "{}", dirty.text);
    }
    // The whole 64 MiB region is written before READY.
    let filled = q.console.wait_prefix("DIRTY filled ", T).unwrap();
    assert_eq!(
        field(&filled.text, "pages"),
        Some("16384"),
        "{}",
        filled.text
    );
    q.console.wait_prefix("READY", T).unwrap();
    // A periodic check covers the region: cold pages and hot ones.
    memcheck_ok(&mut q, "16384");
    // Heartbeats keep their pace and count the pages written.
    let hbs = q.console.heartbeats(50, T).unwrap();
    assert_consecutive(&hbs);
    for w in hbs.windows(2) {
        assert!(
            w[1].0.written > w[0].0.written,
            "written did not grow: {:?} -> {:?}",
            w[0].0,
            w[1].0
        );
    }
    // Ten of these, at least: more than the 4096 pages of a pass.
    assert!(
        hbs[49].0.written - hbs[0].0.written > 4096,
        "{:?}",
        hbs[49].0
    );
    // Periodic checks keep passing while the writer runs.
    for _ in 0..2 {
        let ok = q.console.wait_prefix("MEMCHECK ", T).unwrap();
        assert!(ok.text.starts_with("MEMCHECK ok"), "{}", ok.text);
    }

    // Hot page 1234 is region page 1234 * 4, whatever its class.
    q.console.send("corrupt 1234").unwrap();
    q.console.wait_prefix("CORRUPT page=1234", T).unwrap();
    q.console.send("memcheck").unwrap();
    let bad = q.console.wait_prefix("MEMCHECK bad", T).unwrap();
    assert_eq!(field(&bad.text, "page"), Some("4936"), "{}", bad.text);
    let expected = u64::from_str_radix(&field(&bad.text, "expected").unwrap()[2..], 16).unwrap();
    let found = u64::from_str_radix(&field(&bad.text, "found").unwrap()[2..], 16).unwrap();
    assert_eq!(expected ^ found, 1, "{}", bad.text);
    // The paused writer writes nothing more.
    let hbs = q.console.heartbeats(3, T).unwrap();
    assert_eq!(hbs[0].0.written, hbs[2].0.written, "{hbs:?}");
}

#[test]
fn virtio_net_streams_heartbeats_over_tcp_and_answers_ping() {
    // The VM's host: a bridge joining the VM's tap and a veth to the client.
    let vm_ns = Netns::new("gvm").unwrap();
    let client_ns = Netns::new("gcl").unwrap();
    vm_ns.add_bridge("br0").unwrap();
    vm_ns.add_tap("tap0", Some("br0")).unwrap();
    let _veth = Veth::new(&vm_ns, "v-vm", &client_ns, "v-cl").unwrap();
    vm_ns.attach("v-vm", "br0").unwrap();
    client_ns.add_addr("v-cl", "10.77.0.2/24").unwrap();

    let mut q = spawn(&QemuConfig {
        acpi: false,
        append: "hb_ms=20 ip=10.77.0.10/24 gw=10.77.0.1 tcp_port=7777".into(),
        taps: vec!["tap0".into()],
        netns: Some(vm_ns.name().to_string()),
        ..Default::default()
    });
    let virtio = q.console.wait_prefix("VIRTIO ", BOOT).unwrap();
    assert!(virtio.text.ends_with(" net"), "{}", virtio.text);
    let up = q.console.wait_prefix("NET up", T).unwrap();
    assert_eq!(field(&up.text, "ip"), Some("10.77.0.10"));
    assert_eq!(field(&up.text, "mac").map(str::len), Some(17));
    q.console.wait_prefix("READY", T).unwrap();

    let ping = client_ns
        .exec("ping", &["-c", "3", "-i", "0.2", "-W", "2", "10.77.0.10"])
        .unwrap_or_else(|e| panic!("ping from the client namespace failed: {e}"));
    let out = String::from_utf8_lossy(&ping.stdout);
    assert!(out.contains("3 received"), "{out}");

    let counters = client_ns
        .run_in(|| -> Result<Vec<u64>, String> {
            let addr: SocketAddr = "10.77.0.10:7777".parse().unwrap();
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                .map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut r = BufReader::new(s);
            let mut out = Vec::new();
            let mut line = String::new();
            while out.len() < 30 {
                line.clear();
                r.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
                let hb = parse_heartbeat(line.trim_end())
                    .ok_or_else(|| format!("not a heartbeat: {line:?}"))?;
                out.push(hb.counter);
            }
            Ok(out)
        })
        .unwrap()
        .unwrap();
    for w in counters.windows(2) {
        assert!(
            w[1] > w[0],
            "TCP heartbeat counters went back: {counters:?}"
        );
    }
    let gaps = counters.windows(2).filter(|w| w[1] != w[0] + 1).count();
    assert!(
        gaps <= 2,
        "TCP stream skipped heartbeats {gaps} times: {counters:?}"
    );
}

#[test]
fn virtio_blk_pattern_is_on_the_image_file() {
    let dir = ScratchDir::new("blk").unwrap();
    let image = dir.path().join("disk.raw");
    fs::write(&image, vec![0u8; 4 << 20]).unwrap();
    let (sector, count, seed) = (100u64, 40u64, 0xfeed_beefu64);
    {
        let mut q = spawn(&QemuConfig {
            acpi: false,
            append: format!("hb_ms=50 blk_write={sector}:{count}:{seed}"),
            disks: vec![image.clone()],
            ..Default::default()
        });
        let virtio = q.console.wait_prefix("VIRTIO ", BOOT).unwrap();
        assert!(virtio.text.ends_with(" blk"), "{}", virtio.text);
        let w = q.console.wait_prefix("BLK write", T).unwrap();
        assert_eq!(
            w.text,
            format!("BLK write ok sector={sector} count={count} seed={seed}")
        );
        let v = q.console.wait_prefix("BLK verify", T).unwrap();
        assert_eq!(
            v.text,
            format!("BLK verify ok sector={sector} count={count} seed={seed}")
        );
        // A different seed does not verify.
        q.console
            .send(&format!("blkverify {sector} 1 {}", seed + 1))
            .unwrap();
        let bad = q.console.wait_prefix("BLK verify", T).unwrap();
        assert!(
            bad.text.starts_with("BLK verify bad sector=100 word=0"),
            "{}",
            bad.text
        );
    }
    let data = fs::read(&image).unwrap();
    for s in sector..sector + count {
        let at = s as usize * 512;
        assert_eq!(
            &data[at..at + 512],
            &blk_sector(seed, s)[..],
            "sector {s} on the image"
        );
    }
    assert!(data[..sector as usize * 512].iter().all(|b| *b == 0));
    let end = (sector + count) as usize * 512;
    assert!(data[end..].iter().all(|b| *b == 0));
}

#[test]
fn live_migration_keeps_heartbeats_and_memory() {
    let append = "hb_ms=10 dirty_mib=64 dirty_rate=20000";
    let port = free_port().unwrap();
    let uri = format!("tcp:127.0.0.1:{port}");
    let mut src = spawn(&QemuConfig {
        append: append.into(),
        ..Default::default()
    });
    let mut dst = spawn(&QemuConfig {
        append: append.into(),
        incoming: Some(uri.clone()),
        ..Default::default()
    });
    src.console.wait_prefix("READY", BOOT).unwrap();
    // Let the working set be written once (16384 pages at 20000 pages/s).
    src.console.heartbeats(100, T).unwrap();

    let mut qmp = src.qmp().unwrap();
    qmp.set_parameters(json!({ "max-bandwidth": 4u64 << 30, "downtime-limit": 300 }))
        .unwrap();
    qmp.migrate(&uri).unwrap();
    let done = qmp.wait_migration(Duration::from_secs(90)).unwrap();
    eprintln!("migration: {done}");

    // Everything the source printed before it stopped.
    while src
        .console
        .next_line(Duration::from_millis(300))
        .unwrap_or(None)
        .is_some()
    {}
    let last_src = src
        .console
        .lines()
        .iter()
        .rev()
        .find_map(|l| parse_heartbeat(&l.text))
        .expect("source heartbeats");

    // The destination continues the count: the first complete heartbeat line
    // follows the source's last one (a line cut by the switch-over is skipped).
    let first_dst = dst
        .console
        .wait_for("a heartbeat on the destination", T, |t| {
            parse_heartbeat(t).is_some()
        })
        .unwrap();
    let first = parse_heartbeat(&first_dst.text).unwrap();
    assert!(
        first.counter > last_src.counter && first.counter <= last_src.counter + 2,
        "source ended at {last_src:?}, destination started at {first:?}"
    );
    assert!(first.guest_ns > last_src.guest_ns);
    assert_consecutive(&dst.console.heartbeats(20, T).unwrap());

    dst.console.send("memcheck").unwrap();
    let check = dst.console.wait_prefix("MEMCHECK", T).unwrap();
    assert!(check.text.starts_with("MEMCHECK ok"), "{}", check.text);
    assert_eq!(field(&check.text, "pages"), Some("16384"), "{}", check.text);
}

#[test]
fn two_millisecond_heartbeats_keep_pace() {
    let mut q = spawn(&QemuConfig {
        append: "hb_ms=2".into(),
        ..Default::default()
    });
    q.console.wait_prefix("READY", BOOT).unwrap();
    let hbs = q.console.heartbeats(300, T).unwrap();
    assert_consecutive(&hbs);
    // 299 periods of 2 ms by the guest's clock; a late beat is not made up, so
    // falling behind shows as a longer span.
    let span = hbs[299].0.guest_ns - hbs[0].0.guest_ns;
    assert!(
        (596_000_000..2_400_000_000).contains(&span),
        "299 heartbeat periods of 2 ms took {span} ns of guest time"
    );
}

/// Reads heartbeat lines from `addr` until `n` arrived; returns each counter
/// with the host time it arrived.
fn read_tcp_heartbeats(addr: &str, n: usize) -> Result<Vec<(u64, Instant)>, String> {
    let addr: SocketAddr = addr.parse().unwrap();
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s);
    let mut out = Vec::new();
    let mut line = String::new();
    while out.len() < n {
        line.clear();
        let got = r
            .read_line(&mut line)
            .map_err(|e| format!("read after {} lines: {e}", out.len()))?;
        if got == 0 {
            return Err(format!("connection closed after {} lines", out.len()));
        }
        let hb =
            parse_heartbeat(line.trim_end()).ok_or_else(|| format!("not a heartbeat: {line:?}"))?;
        out.push((hb.counter, Instant::now()));
    }
    Ok(out)
}

#[test]
fn tcp_client_holds_its_connection_through_live_migration() {
    let vm_ns = Netns::new("gmv").unwrap();
    let client_ns = Netns::new("gmc").unwrap();
    vm_ns.add_bridge("br0").unwrap();
    vm_ns.add_tap("tap-src", Some("br0")).unwrap();
    vm_ns.add_tap("tap-dst", Some("br0")).unwrap();
    let _veth = Veth::new(&vm_ns, "v-vm", &client_ns, "v-cl").unwrap();
    vm_ns.attach("v-vm", "br0").unwrap();
    client_ns.add_addr("v-cl", "10.77.0.2/24").unwrap();

    // Both QEMUs in the VM's namespace: the migration stream uses its loopback.
    let uri = "tcp:127.0.0.1:4444".to_string();
    let append = "hb_ms=10 ip=10.77.0.10/24 tcp_port=7777 dirty_mib=16 dirty_rate=5000";
    let mut src = spawn(&QemuConfig {
        acpi: false,
        append: append.into(),
        taps: vec!["tap-src".into()],
        netns: Some(vm_ns.name().to_string()),
        ..Default::default()
    });
    let mut dst = spawn(&QemuConfig {
        acpi: false,
        append: append.into(),
        taps: vec!["tap-dst".into()],
        netns: Some(vm_ns.name().to_string()),
        incoming: Some(uri.clone()),
        ..Default::default()
    });
    src.console.wait_prefix("READY", BOOT).unwrap();
    let client = client_ns
        .spawn_in(|| read_tcp_heartbeats("10.77.0.10:7777", 400))
        .unwrap();
    src.console.heartbeats(100, T).unwrap();

    let mut qmp = src.qmp().unwrap();
    qmp.set_parameters(json!({ "max-bandwidth": 4u64 << 30, "downtime-limit": 300 }))
        .unwrap();
    qmp.migrate(&uri).unwrap();
    qmp.wait_migration(Duration::from_secs(90)).unwrap();
    while src
        .console
        .next_line(Duration::from_millis(300))
        .unwrap_or(None)
        .is_some()
    {}
    let last_src = src
        .console
        .lines()
        .iter()
        .rev()
        .find_map(|l| parse_heartbeat(&l.text))
        .expect("source heartbeats");
    dst.console.heartbeats(20, T).unwrap();

    let got = client.join().expect("client thread").unwrap().unwrap();
    for w in got.windows(2) {
        assert!(
            w[1].0 > w[0].0,
            "counter went back on the TCP stream: {:?} -> {:?}",
            w[0].0,
            w[1].0
        );
    }
    let last = got.last().unwrap().0;
    assert!(
        last > last_src.counter + 10,
        "the stream did not continue from the destination: source ended at {}, client's last {last}",
        last_src.counter
    );
    let max_gap = got.windows(2).map(|w| w[1].1 - w[0].1).max().unwrap();
    eprintln!("largest gap on the TCP stream through migration: {max_gap:?}");
}

/// Waits for the first periodic MEMCHECK over all `pages` pages (or a bad
/// one) and asserts it passed on a working set written at least twice.
fn memcheck_ok(q: &mut Qemu, pages: &str) {
    let ok = q
        .console
        .wait_for(&format!("MEMCHECK over all {pages} pages"), T, |t| {
            t.starts_with("MEMCHECK ")
                && (t.starts_with("MEMCHECK bad") || field(t, "pages") == Some(pages))
        })
        .unwrap();
    assert!(ok.text.starts_with("MEMCHECK ok"), "{}", ok.text);
    let gen: u64 = field(&ok.text, "gen").unwrap().parse().unwrap();
    assert!(gen >= 2, "{}", ok.text);
}
