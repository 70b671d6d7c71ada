//! Decoding the agent's gRPC messages (what the controller reads off every
//! stream): any bytes decode or give an error, never a panic; whatever
//! decodes survives an encode/decode round trip (compared by size and
//! envelope: map order and NaN make field-wise equality meaningless).
#![no_main]

use exfilguard_proto::v1::AgentMessage;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = AgentMessage::decode(data) else {
        return;
    };
    let again = AgentMessage::decode(msg.encode_to_vec().as_slice())
        .expect("a re-encoded message decodes");
    assert_eq!(msg.encoded_len(), again.encoded_len());
    assert_eq!((msg.seq, msg.sent_at_unix_ms), (again.seq, again.sent_at_unix_ms));
    assert_eq!(
        msg.payload.as_ref().map(std::mem::discriminant),
        again.payload.as_ref().map(std::mem::discriminant)
    );
});
