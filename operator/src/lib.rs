//! The Godwit operator: the control plane that places VMs on nodes, provisions
//! them from templates, orchestrates migrations, restarts VMs of lost nodes and
//! balances load. Decisions are pure functions over plain data ([`scheduler`]);
//! the controllers only read, decide and write.

pub mod labels;
pub mod scheduler;
pub mod template;
