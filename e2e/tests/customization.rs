//! Customization through the cluster: a VM with its own customization
//! (hostname, and user-data from a Secret made with `kubectl create secret`)
//! over its template's (static address) boots with a cloud-init NoCloud seed
//! as its last, read-only disk. The guest reads the seed (label `cidata`,
//! hostname on its console, the template's address answers TCP); mtools read
//! the Secret's user-data back from the seed byte for byte; after a live
//! migration the target's seed has the same sha256 as the source's (rebuilt
//! identically, not copied) and the guest keeps running.
//!
//! Needs the release binaries (as e2e/test.sh builds them), /dev/kvm and
//! mtools.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use godwit_e2e::driver::{
    console_has, ClusterDriver, EXAMPLE_MIGRATION, EXAMPLE_TEMPLATE, EXAMPLE_VM, EXAMPLE_VM_ADDR,
};
use godwit_node::storage::template::sha256_file;

const USER_DATA: &str =
    "#cloud-config\nruncmd:\n  - [sh, -c, 'echo seeded from a Secret > /run/godwit-seeded']\n";

fn vm_with_customization() -> String {
    format!(
        "{}\n  customization:\n    hostname: seeded-demo\n    userDataSecretRef:\n      name: demo-userdata\n",
        EXAMPLE_VM.trim_end()
    )
}

/// A file of the FAT image `img`, read with mtools.
fn mcopy(img: &Path, file: &str) -> Vec<u8> {
    let out = Command::new("mcopy")
        .args(["-n", "-i", img.to_str().unwrap(), &format!("::{file}"), "-"])
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .expect("mcopy runs (apt install mtools)");
    assert!(
        out.status.success(),
        "mcopy {file}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// One heartbeat line from the guest's TCP server, from inside the cluster's
/// network.
fn heartbeat_over_tcp(g: &ClusterDriver) -> String {
    g.cluster
        .fabric
        .client
        .run_in(|| {
            let addr: std::net::SocketAddr = EXAMPLE_VM_ADDR.parse().unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            let s = loop {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                    Ok(s) => break s,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(200))
                    }
                    Err(e) => panic!("cannot connect to the guest at {addr}: {e}"),
                }
            };
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut l = String::new();
            BufReader::new(s).read_line(&mut l).unwrap();
            l
        })
        .unwrap()
}

#[test]
fn a_vm_gets_its_seed_and_the_target_rebuilds_it_identically() {
    let dir = std::env::temp_dir().join(format!("godwit-custom-{}", std::process::id()));
    let g = ClusterDriver::up(2, &dir).expect("local cluster with Godwit");
    g.kubectl(
        &[
            "create",
            "secret",
            "generic",
            "demo-userdata",
            "-n",
            "default",
            &format!("--from-literal=userdata={USER_DATA}"),
        ],
        None,
    )
    .unwrap();
    g.apply(&g.example(EXAMPLE_TEMPLATE)).unwrap();
    g.apply(&g.example(&vm_with_customization())).unwrap();
    let vm = g.wait_running("demo", Duration::from_secs(90)).unwrap();
    let node = vm["status"]["nodeName"].as_str().unwrap().to_string();
    let i = g.node_index(&node).unwrap();
    let vm_dir = g.vm_dir(i, "default", "demo");
    g.wait(
        "the seed's hostname on the console",
        Duration::from_secs(30),
        || Ok(console_has(&vm_dir, "HOSTNAME seeded-demo").then_some(())),
    )
    .unwrap();
    assert!(
        console_has(
            &vm_dir,
            "SEED label=cidata files=meta-data,user-data,network-config"
        ),
        "no SEED line on the console"
    );
    // The guest brings its NIC up after it prints its hostname.
    g.wait(
        "the seed's address on the console",
        Duration::from_secs(30),
        || Ok(console_has(&vm_dir, "NET up ip=10.88.0.10 ").then_some(())),
    )
    .unwrap();
    let line = heartbeat_over_tcp(&g);
    assert!(line.starts_with("HB "), "{line:?}");

    // The seed is the last disk, read-only, and holds the Secret's user-data.
    let seed = vm_dir.join("cidata.img");
    let machine = std::fs::read_to_string(vm_dir.join("machine.json")).unwrap_or_default();
    assert!(machine.contains("\"seed\""), "{machine}");
    assert_eq!(mcopy(&seed, "user-data"), USER_DATA.as_bytes());
    let meta = String::from_utf8(mcopy(&seed, "meta-data")).unwrap();
    let uid = vm["metadata"]["uid"].as_str().unwrap();
    assert!(meta.contains(&format!("instance-id: \"{uid}\"")), "{meta}");
    assert!(meta.contains("local-hostname: \"seeded-demo\""), "{meta}");
    let source_sha = sha256_file(&seed).unwrap();

    // Live migration: the target's VMM gets a seed rebuilt identically.
    g.apply(&g.example(EXAMPLE_MIGRATION)).unwrap();
    let m = g
        .wait("the migration to end", Duration::from_secs(300), || {
            let m = g.get("gvmm", "demo-move")?;
            Ok(m.filter(|m| {
                matches!(
                    m["status"]["phase"].as_str(),
                    Some("Succeeded" | "Failed" | "Cancelled")
                )
            }))
        })
        .unwrap();
    assert_eq!(m["status"]["phase"], "Succeeded", "{m}");
    let target = m["status"]["targetNode"].as_str().unwrap().to_string();
    assert_ne!(target, node);
    g.wait_running("demo", Duration::from_secs(30)).unwrap();
    let target_dir = g.vm_dir(g.node_index(&target).unwrap(), "default", "demo");
    let target_seed = target_dir.join("cidata.img");
    assert_eq!(
        sha256_file(&target_seed).unwrap(),
        source_sha,
        "the target's seed differs from the source's"
    );
    // The guest goes on after the move, reachable at the same address.
    let line = heartbeat_over_tcp(&g);
    assert!(line.starts_with("HB "), "{line:?}");
}
