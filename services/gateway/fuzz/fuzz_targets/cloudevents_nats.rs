//! `baton_core::binding::nats::decode` (NATS ingress and every consumer of events): binary mode with
//! `ce-*` headers, or structured JSON without them.
#![no_main]

use baton_core::binding;
use baton_gateway_fuzz::{explained, nats_headers, split, store};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (lines, body) = split(data);
    // No header lines at all: a message without headers.
    let headers = (!lines.is_empty()).then(|| nats_headers(&lines));
    match binding::nats::decode(headers.as_ref(), body) {
        Ok(event) => store(&event),
        Err(e) => explained(&e.to_string()),
    }
});
