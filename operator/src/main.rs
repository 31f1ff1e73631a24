//! The Godwit operator. The controllers arrive with the control-plane issue; until
//! then the binary only says what it is.

fn main() {
    println!(
        "godwit-operator {}: controllers not built yet",
        env!("CARGO_PKG_VERSION")
    );
}
