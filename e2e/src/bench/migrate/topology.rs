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
    Ok(Topology { _veth: veth, a, b })
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
