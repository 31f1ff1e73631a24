//! Godwit node daemon: the per-node agent and the KVM VMM it runs.
