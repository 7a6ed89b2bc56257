//! A rule set pushed to the vehicle's `rules` key in etcd, through the path the agent's reload
//! takes (UTF-8, parse, validate, host checks, compile to kernel map entries and can-gw jobs),
//! on a made-up host. An accepted push has every interface, so compiling it again for the
//! interfaces present gives the same, with nothing waiting.

#![no_main]

use edgeplane::{fuzzing, runtime::prepare};
use libfuzzer_sys::fuzz_target;

const RULES_KEY: &[u8] = b"/edgeplane/v1/vehicles/WVWZZZ1JZXW000001/rules";

fuzz_target!(|data: &[u8]| {
    let push = fuzzing::push(RULES_KEY, 7, data.to_vec());
    let text = match push.text() {
        Ok(t) => t,
        Err(e) => {
            let _ = format!("{e:#}");
            return;
        }
    };
    let host = edgeplane_fuzz::host();
    match prepare::prepare_text_on(text, &push.origin, &host) {
        Ok(prepared) => {
            assert!(prepared.waiting.is_empty(), "{:?}", prepared.waiting);
            let again = prepare::prepare_for_present_on(&prepared, &host)
                .expect("an accepted rule set compiles again");
            assert!(
                again == prepared,
                "compiling an accepted rule set again differs"
            );
            let _ = prepared.udp_rules();
        }
        Err(e) => {
            let _ = format!("{e:#}");
        }
    }
});
