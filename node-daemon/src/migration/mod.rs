//! Live migration of a running VM between two VMM processes: the wire
//! [`protocol`], the source's pre-copy / stop-and-copy / post-copy sender and the
//! target's receiver, following the Xen stages in the architecture document.

pub mod protocol;
