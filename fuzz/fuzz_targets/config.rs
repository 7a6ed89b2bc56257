//! The TOML config (a file, or text pushed through the registry): parsing, static validation,
//! the userspace engine's checks, and the host checks against a made-up host. Every input is
//! a config or a list of problems; none panics, and every error renders.

#![no_main]

use std::path::Path;

use edgeplane::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.toml");
    let config = match Config::parse(text, path) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let host = edgeplane_fuzz::host();
    if let Err(e) = config.check_host_on(path, &host) {
        assert!(
            !e.problems().is_empty(),
            "a host check failed without a problem"
        );
        let _ = e.to_string();
    }
    // What `auto` checks before it falls back to the userspace engine.
    let mut problems = Vec::new();
    config.udp.userspace_problems(&mut problems);
    config.udp.userspace_host_problems(&host, &mut problems);
    config.can.userspace_problems(&mut problems);
    let names = config.interfaces();
    assert!(
        names.windows(2).all(|w| w[0] < w[1]),
        "interfaces not sorted once: {names:?}"
    );
});
