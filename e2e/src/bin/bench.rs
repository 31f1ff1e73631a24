fn main() {
    eprintln!("bench: not built yet");
    std::process::exit(2);
}
