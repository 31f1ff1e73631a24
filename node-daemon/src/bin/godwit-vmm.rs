fn main() {
    println!("godwit-vmm {}: VMM not built yet", env!("CARGO_PKG_VERSION"));
}
