fn main() {
    eprintln!("godwit-apiserver: not built yet");
    std::process::exit(2);
}
