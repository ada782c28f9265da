//! `baton_core::binding::http::decode` (the gateway's `POST /events`): binary, structured, batch.
#![no_main]

use baton_core::binding::{self, Limits};
use baton_gateway_fuzz::{explained, http_headers, split, store};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (lines, body) = split(data);
    let headers = http_headers(&lines);
    match binding::http::decode(&Limits::default(), &headers, body) {
        Ok(events) => events.iter().for_each(store),
        Err(e) => explained(&e.to_string()),
    }
});
