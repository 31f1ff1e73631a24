fn main() {
    println!(
        "godwit-node {}: node agent not built yet",
        env!("CARGO_PKG_VERSION")
    );
}
