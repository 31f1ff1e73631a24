fn main() {
    eprintln!("godwit-local: not built yet");
    std::process::exit(2);
}
