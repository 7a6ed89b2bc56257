//! Every config shipped in configs/ parses and validates.

use edgeplane::config::Config;

#[test]
fn every_shipped_config_is_valid() {
    let dir = edgeplane_testbed::workspace().join("configs");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            if let Err(e) = Config::load(&path) {
                panic!("{e}");
            }
            checked += 1;
        }
    }
    assert!(checked > 0, "no configs found in {}", dir.display());
}
