//! The BGP message decoder on arbitrary bytes: it must never panic, and whatever it accepts
//! must re-encode to bytes that decode to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_routed::packet::{decode, encode, frame, Ctx, Message};

fuzz_target!(|data: &[u8]| {
    for (four_octet_as, extended_message) in [(true, false), (false, false), (true, true)] {
        let ctx = Ctx {
            four_octet_as,
            extended_message,
        };
        let _ = frame(data);
        if let Ok(m) = decode(data, ctx) {
            let again = encode(&m, ctx);
            if again.len() <= ctx.max_len() {
                let back: Message = decode(&again, ctx).expect("our own encoding decodes");
                // treat_as_withdraw is a property of the received bytes, not of the message.
                if let (Message::Update(a), Message::Update(b)) = (&m, &back) {
                    assert_eq!(a.announced(), b.announced());
                } else {
                    assert_eq!(m, back);
                }
            }
        }
    }
});
