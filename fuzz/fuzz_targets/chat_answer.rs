#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tests::fuzz::chat_answer(data));
