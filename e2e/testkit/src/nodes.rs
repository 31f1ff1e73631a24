//! Simulated nodes on one machine: each node is a network namespace with a
//! node bridge (VM taps attach to it) and its own address, all on one L2
//! segment through a fabric namespace, plus a client namespace outside every
//! node. A VM's address is reachable from every node and from the client, and
//! follows the VM when it moves, once its MAC is announced on the new node.
//!
//! ```text
//!            fabric ns: bridge "fab"
//!            /            |             \
//!   node-0 ns          node-1 ns         client ns
//!   br (10.88.0.1)     br (10.88.0.2)    10.88.0.100
//!   |tap VM ...        |tap VM ...
//! ```
//!
//! A node's uplink (its end of the veth to the fabric) can be shaped with
//! `tc tbf` or cut to test faults. Everything is removed on drop.

use crate::netns::{unique_name, Netns, NetnsError, Veth};

/// The /24 every fabric uses; namespaces keep separate fabrics apart.
pub const SUBNET: &str = "10.88.0";
/// The bridge VM taps attach to on every node (as in `examples/`).
pub const NODE_BRIDGE: &str = "godwit0";
/// The client's address.
pub const CLIENT_IP: &str = "10.88.0.100";

/// One simulated node.
pub struct Node {
    /// Node name (`node-0`, `node-1`, ...).
    pub name: String,
    /// Its namespace.
    pub ns: Netns,
    /// The bridge VM taps attach to.
    pub bridge: String,
    /// Its address on the segment.
    pub ip: String,
    /// Its end of the link to the fabric (shape or cut this).
    pub uplink: String,
}

impl Node {
    /// Shapes the node's uplink in both directions to `rate` (`tc` syntax, e.g. `1gbit`).
    pub fn shape(&self, fabric: &Fabric, rate: &str) -> Result<(), NetnsError> {
        self.ns.shape(&self.uplink, rate, "256kb", "20ms")?;
        let peer = fabric.peer_of(&self.name).expect("node is on the fabric");
        fabric.ns.shape(peer, rate, "256kb", "20ms")
    }

    /// Removes what [`Node::shape`] set.
    pub fn unshape(&self, fabric: &Fabric) -> Result<(), NetnsError> {
        self.ns.unshape(&self.uplink)?;
        let peer = fabric.peer_of(&self.name).expect("node is on the fabric");
        fabric.ns.unshape(peer)
    }

    /// Cuts the node off the segment.
    pub fn cut(&self) -> Result<(), NetnsError> {
        self.ns.cut(&self.uplink)
    }
}

/// Nodes and a client on one L2 segment.
pub struct Fabric {
    /// The fabric namespace with the segment's bridge.
    pub ns: Netns,
    /// The nodes.
    pub nodes: Vec<Node>,
    /// A namespace outside every node, for clients of the VMs.
    pub client: Netns,
    peers: Vec<(String, String)>,
    _links: Vec<Veth>,
}

impl Fabric {
    /// Creates `n` nodes (at most 90) and the client.
    pub fn new(n: usize) -> Result<Fabric, NetnsError> {
        assert!((1..=90).contains(&n), "1 to 90 nodes");
        let ns = Netns::new("gwf")?;
        ns.add_bridge("fab")?;
        let mut nodes = Vec::new();
        let mut links = Vec::new();
        let mut peers = Vec::new();
        for i in 0..n {
            let node_ns = Netns::new("gwn")?;
            // Every node has its own namespace, so every node can use the
            // bridge name VM specs name by default.
            let bridge = NODE_BRIDGE.to_string();
            node_ns.add_bridge(&bridge)?;
            let (up, down) = (unique_name("gwup"), unique_name("gwdn"));
            links.push(Veth::new(&node_ns, &up, &ns, &down)?);
            // The uplink gets an address like a NIC's (low, fixed), so the
            // bridge keeps it whatever taps come and go (the agent's taps
            // are `fe:...`; a bridge takes its lowest port's address).
            node_ns.ip(&[
                "link",
                "set",
                &up,
                "address",
                &format!("02:00:0a:58:00:{:02x}", i + 1),
            ])?;
            node_ns.attach(&up, &bridge)?;
            ns.attach(&down, "fab")?;
            let ip = format!("{SUBNET}.{}", i + 1);
            node_ns.add_addr(&bridge, &format!("{ip}/24"))?;
            let name = format!("node-{i}");
            peers.push((name.clone(), down));
            nodes.push(Node {
                name,
                ns: node_ns,
                bridge,
                ip,
                uplink: up,
            });
        }
        let client = Netns::new("gwc")?;
        let (c, f) = (unique_name("gwcl"), unique_name("gwcf"));
        links.push(Veth::new(&client, &c, &ns, &f)?);
        ns.attach(&f, "fab")?;
        client.add_addr(&c, &format!("{CLIENT_IP}/24"))?;
        Ok(Fabric {
            ns,
            nodes,
            client,
            peers,
            _links: links,
        })
    }

    /// The fabric-side end of `node`'s uplink.
    fn peer_of(&self, node: &str) -> Option<&str> {
        self.peers
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, p)| p.as_str())
    }

    /// The address of the `i`-th VM (`10.88.0.10`, `.11`, ...).
    pub fn vm_ip(i: usize) -> String {
        format!("{SUBNET}.{}", 10 + i)
    }
}
