//! The `godwit-apiserver` binary: ready line, kubeconfig, request log file,
//! and the debug endpoints over plain HTTP.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

fn http(addr: &str, method: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn binary_prints_ready_line_and_logs_requests() {
    let dir = std::env::temp_dir().join(format!("godwit-apiserver-bin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let audit = dir.join("audit.jsonl");
    let kubeconfig = dir.join("kubeconfig");
    let mut child = Command::new(env!("CARGO_BIN_EXE_godwit-apiserver"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--token",
            "system:serviceaccount:godwit:operator",
        ])
        .arg("--audit-log")
        .arg(&audit)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .stdout(Stdio::piped())
        .spawn()
        .expect("server starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .expect("ready line")
        .to_string();
    let addr = url.strip_prefix("http://").unwrap().to_string();
    assert!(!addr.ends_with(":0"), "{line}");

    let output = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--cache-dir"])
        .arg(dir.join("cache"))
        .args(["get", "namespaces", "-o", "name"])
        .env("HOME", &dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("namespace/default"));

    let version = http(&addr, "GET", "/version");
    assert!(
        version.starts_with("HTTP/1.1 200") && version.contains("\"major\":\"1\""),
        "{version}"
    );
    let expired = http(&addr, "POST", "/debug/expire-watches");
    assert!(expired.starts_with("HTTP/1.1 200"), "{expired}");
    let requests = http(&addr, "GET", "/debug/requests");
    assert!(
        requests.contains("\"resource\":\"namespaces\""),
        "{requests}"
    );

    let log = std::fs::read_to_string(&audit).unwrap();
    let listed = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["verb"] == "list" && r["resource"] == "namespaces")
        .expect("the list is logged");
    assert_eq!(listed["user"], "system:serviceaccount:godwit:operator");
    assert_eq!(listed["code"], 200);

    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
