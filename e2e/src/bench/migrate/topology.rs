//! Where the benchmark's migrations run: two network namespaces joined by a
//! veth pair (source `10.93.0.1`, target `10.93.0.2`), as it is or shaped
//! to 1 Gbit/s in both directions.

use godwit_testkit::netns::{unique_name, Netns, Veth};

use super::error::BenchError;

/// The source's address.
pub(super) const SRC_IP: &str = "10.93.0.1";
/// The target's address.
pub(super) const DST_IP: &str = "10.93.0.2";

/// The link between the two namespaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// The veth as it is.
    Unlimited,
    /// Both directions shaped to 1 Gbit/s.
    Gbit,
}

impl Link {
    /// Name as reported.
    pub fn name(self) -> &'static str {
        match self {
            Link::Unlimited => "unlimited",
            Link::Gbit => "1gbit",
        }
    }
}

/// Two namespaces joined by a veth pair; removed on Drop.
pub(super) struct Topology {
    // Field order: the veth goes before its namespaces.
    _veth: Veth,
    pub(super) a: Netns,
    pub(super) b: Netns,
    /// The veth's ends: in `a`, in `b`.
    devs: (String, String),
}

impl Topology {
    /// Bytes the two ends of the link have sent so far (both directions:
    /// the pages one way, acknowledgements and post-copy requests the
    /// other), from the interfaces' own counters.
    pub(super) fn wire_bytes(&self) -> Result<u64, BenchError> {
        let a = tx_bytes(&self.a, &self.devs.0)?;
        let b = tx_bytes(&self.b, &self.devs.1)?;
        Ok(a + b)
    }
}

/// `dev`'s transmitted bytes in `ns` (`ip -s -j link show`).
fn tx_bytes(ns: &Netns, dev: &str) -> Result<u64, BenchError> {
    let out = ns.ip(&["-s", "-j", "link", "show", "dev", dev])?;
    tx_bytes_of(&out.stdout).map_err(|e| BenchError::Vmm(format!("ip -s -j link show {dev}: {e}")))
}

/// The transmitted bytes in `ip -s -j link show dev DEV`'s output.
pub fn tx_bytes_of(json: &[u8]) -> Result<u64, String> {
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| format!("unreadable JSON: {e}"))?;
    v[0]["stats64"]["tx"]["bytes"]
        .as_u64()
        .ok_or_else(|| "no stats64.tx.bytes".to_string())
}

pub(super) fn topology(link: Link) -> Result<Topology, BenchError> {
    let a = Netns::new("bma")?;
    let b = Netns::new("bmb")?;
    let (da, db) = (unique_name("bva"), unique_name("bvb"));
    let veth = Veth::new(&a, &da, &b, &db)?;
    a.add_addr(&da, &format!("{SRC_IP}/24"))?;
    b.add_addr(&db, &format!("{DST_IP}/24"))?;
    if link == Link::Gbit {
        a.shape(&da, "1gbit", "1mb", "50ms")?;
        b.shape(&db, "1gbit", "1mb", "50ms")?;
    }
    Ok(Topology {
        _veth: veth,
        a,
        b,
        devs: (da, db),
    })
}

/// A TCP port that was free a moment ago (ports are per namespace and the
/// benchmark's namespaces hold nothing else, so any port free here is too).
pub(super) fn free_port() -> Result<u16, BenchError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| BenchError::Io("bind a probe port".into(), e))?;
    Ok(l.local_addr()
        .map_err(|e| BenchError::Io("probe port".into(), e))?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_bytes_come_from_the_interface_transmit_counter() {
        // What `ip -s -j link show dev bva-1` prints (iproute2 6.1), cut down.
        let out = br#"[{"ifindex":7,"ifname":"bva-1","flags":["UP"],"mtu":1500,"stats64":{"rx":{"bytes":1048576,"packets":900},"tx":{"bytes":1073741824,"packets":740000}}}]"#;
        assert_eq!(tx_bytes_of(out), Ok(1 << 30));
        assert!(tx_bytes_of(b"[]").unwrap_err().contains("stats64"));
        assert!(tx_bytes_of(b"Device does not exist")
            .unwrap_err()
            .contains("JSON"));
    }
}
