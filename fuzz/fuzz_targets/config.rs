//! Config files are written by hand on a gateway and overridden from the
//! environment: any text and any overrides must give a config or one error
//! naming the file and the key, never a panic. Both binaries' parsers and the
//! agent's validation (every cross-field check) run on each input.
//!
//! Input: the TOML text, optionally followed by a NUL and `KEY=value` lines
//! taken as the environment (`OUTPOST_SECTION__KEY` overrides).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (toml, env) = text.split_once('\0').unwrap_or((text, ""));
    let env: Vec<(String, String)> = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let path = Path::new("/etc/outpost/fuzz.toml");
    if let Ok(raw) = outpost_agent::config::parse(toml, env.clone(), path) {
        if let Err(e) = raw.validate(path) {
            // One line, naming the file.
            let e = e.to_string();
            assert!(!e.contains('\n'), "{e}");
        }
    }
    let _ = outpost_hub::config::parse(toml, env, path);
});
