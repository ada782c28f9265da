//! GitHub webhooks: `X-Hub-Signature-256` verification, then the mapping of the delivery (whether
//! or not the signature matched, so the mapping is reached without forging an HMAC).
#![no_main]

use baton_gateway::github::{self, Delivery};
use baton_gateway_fuzz::{explained, http_headers, split, store};
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"It's a Secret to Everybody";

fuzz_target!(|data: &[u8]| {
    let (lines, body) = split(data);
    let headers = http_headers(&lines);
    let signature = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok());
    if let Err(e) = github::verify(SECRET, body, signature) {
        explained(&e.message);
    }
    match github::delivery(&headers, body) {
        Ok(Delivery::Event(event)) => store(&event),
        Ok(Delivery::Ping { .. }) => {}
        Ok(Delivery::Ignored(reason)) => explained(&reason),
        Err(e) => explained(&e.message),
    }
});
