//! Alertmanager webhook notifications (payload version 4): one event per alert.
#![no_main]

use baton_gateway::alertmanager;
use baton_gateway_fuzz::{explained, store};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    match alertmanager::events(body) {
        Ok(events) => events.iter().for_each(store),
        Err(e) => explained(&e.message),
    }
});
