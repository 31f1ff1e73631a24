//! virtio-net over a tap on a bridge: a TCP client in another network
//! namespace streams the guest's heartbeat counter.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{guest, start_vm, Scratch, BOOT};
use godwit_testkit::guest::parse_heartbeat;
use godwit_testkit::netns::{unique_name, Netns, Veth};
use godwit_vmm_control::Command as Cmd;

#[test]
fn tcp_client_in_another_netns_streams_heartbeats() {
    common::require_kvm();
    let dir = Scratch::new("net");
    let host = Netns::new("gwh").expect("create VM host namespace");
    let client = Netns::new("gwc").expect("create client namespace");
    let br = unique_name("br");
    host.add_bridge(&br).unwrap();
    let (va, vb) = (unique_name("va"), unique_name("vb"));
    let _veth = Veth::new(&host, &va, &client, &vb).unwrap();
    // An uplink whose address sorts above nearly every random one: a tap
    // with a random address would become the bridge's lowest port, and the
    // bridge would take its address.
    host.ip(&["link", "set", &va, "address", "fc:ff:ff:ff:ff:fe"])
        .unwrap();
    host.attach(&va, &br).unwrap();
    let bridge_mac = || {
        let out = host.ip(&["-o", "link", "show", &br]).unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split("link/ether ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(bridge_mac(), "fc:ff:ff:ff:ff:fe");
    client.add_addr(&vb, "10.77.0.1/24").unwrap();
    let tap = unique_name("tap");

    let g = guest().display().to_string();
    let args: Vec<String> = vec![
        "--kernel".into(),
        g,
        "--memory-mib".into(),
        "128".into(),
        "--cmdline".into(),
        "hb_ms=50 ip=10.77.0.2/24 tcp_port=7000".into(),
        "--net".into(),
        format!("tap={tap},bridge={br},mac=52:54:00:77:00:02"),
    ];
    let mut vm = start_vm(&dir, "vm", &["ip", "netns", "exec", host.name()], &args);
    let up = vm.console.wait_prefix("NET up", BOOT).unwrap();
    assert!(up.text.contains("ip=10.77.0.2"), "{}", up.text);
    assert!(up.text.contains("mac=52:54:00:77:00:02"), "{}", up.text);
    // The tap exists in the VM's namespace and is on the bridge.
    let link = host.ip(&["-o", "link", "show", &tap]).unwrap();
    let link = String::from_utf8_lossy(&link.stdout).into_owned();
    assert!(link.contains(&format!("master {br}")), "{link}");
    // Its host-side address is `fe:...`, and the bridge (which carries a
    // node's IP on a real node) kept its own.
    assert!(link.contains("link/ether fe:"), "{link}");
    assert_eq!(
        bridge_mac(),
        "fc:ff:ff:ff:ff:fe",
        "the tap changed the bridge's address"
    );

    let counters = client
        .run_in(|| {
            let addr: SocketAddr = "10.77.0.2:7000".parse().unwrap();
            let deadline = Instant::now() + Duration::from_secs(15);
            let stream = loop {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err(e) => panic!("cannot connect to the guest: {e}"),
                }
            };
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut out = Vec::new();
            for line in BufReader::new(stream).lines() {
                let line = line.expect("read from guest");
                if let Some(hb) = parse_heartbeat(line.trim_end()) {
                    out.push(hb.counter);
                }
                if out.len() >= 10 {
                    break;
                }
            }
            out
        })
        .unwrap();
    assert_eq!(counters.len(), 10, "{counters:?}");
    for w in counters.windows(2) {
        assert_eq!(w[1], w[0] + 1, "counter stream has a gap: {counters:?}");
    }
    vm.api(Cmd::Stop);
    vm.wait_exit(Duration::from_secs(10));
}
