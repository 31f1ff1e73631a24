#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    godwit_node::fuzz::virtio_blk(data);
});
