//! The CloudEvents NATS decoder on any bytes: structured mode (no headers), and binary mode
//! with the input split into header values and a payload. It must return an error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = slipway_core::bus::decode(None, data);
    // Binary mode: the first line gives the ce-type, the second the ce-id, the rest is data.
    let mut parts = data.splitn(3, |b| *b == b'\n');
    let ty = parts.next().unwrap_or_default();
    let id = parts.next().unwrap_or_default();
    let payload = parts.next().unwrap_or_default();
    let (Ok(ty), Ok(id)) = (std::str::from_utf8(ty), std::str::from_utf8(id)) else {
        return;
    };
    // Values a header can carry on the wire (no CR or LF), as the server delivers them.
    let (Ok(ty), Ok(id)) = (
        ty.parse::<async_nats::HeaderValue>(),
        id.parse::<async_nats::HeaderValue>(),
    ) else {
        return;
    };
    let mut h = async_nats::HeaderMap::new();
    h.insert("ce-specversion", "1.0");
    h.insert("ce-source", "fuzz");
    h.insert("ce-type", ty);
    h.insert("ce-id", id);
    h.insert("content-type", "application/json");
    let _ = slipway_core::bus::decode(Some(&h), payload);
});
