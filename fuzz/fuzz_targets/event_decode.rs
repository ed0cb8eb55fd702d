//! The event decoder on arbitrary bytes: it never panics, and whatever it
//! accepts encodes and decodes back to the same event.
#![no_main]

use libfuzzer_sys::fuzz_target;
use multiagents_core::event::EventCodec;

fuzz_target!(|bytes: &[u8]| {
    let codec = EventCodec::with_limit(64 * 1024);
    if let Ok(event) = codec.decode(bytes) {
        let again = codec.encode(&event).expect("a decoded event encodes");
        let back = codec.decode(&again).expect("an encoded event decodes");
        assert_eq!(event, back, "the event changed on a round trip");
    }
});
