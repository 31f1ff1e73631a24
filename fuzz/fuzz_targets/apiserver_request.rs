#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| godwit_e2e::apiserver::fuzz::request(data));
