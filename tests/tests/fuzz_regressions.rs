//! Runs every fuzz target's body (tests/src/fuzz.rs) over its committed seeds, every
//! input a fuzzing run ever crashed on (`fuzz/regressions/<target>/`), every prefix
//! of those, and a real certificate bundle made at run time. `scripts/fuzz` does the
//! fuzzing itself (cargo-fuzz, nightly); this keeps what it found fixed, on stable.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should fail the test loudly"
)]

use std::path::{Path, PathBuf};
use std::time::Duration;

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_seed_and_past_crash_runs_clean_with_all_its_prefixes() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    for (name, target) in tests::fuzz::TARGETS {
        let seeds = inputs(&fuzz.join("seeds").join(name));
        assert!(!seeds.is_empty(), "fuzz/seeds/{name} has no seed");
        let crashes = inputs(&fuzz.join("regressions").join(name));
        for path in seeds.iter().chain(&crashes) {
            let data = std::fs::read(path).unwrap();
            for end in 0..=data.len() {
                let input = &data[..end];
                let outcome = std::panic::catch_unwind(|| target(input));
                assert!(
                    outcome.is_ok(),
                    "{name} panicked on the first {end} bytes of {}",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn a_real_bundle_and_its_damaged_forms_load_or_fail_cleanly() {
    let ca = certs::CertificateAuthority::generate("fuzz CA", Duration::from_secs(86_400)).unwrap();
    let identity = certs::GatewayIdentity::new("env", "gw").unwrap();
    let issued = ca
        .issue_gateway(&identity, Duration::from_secs(3_600))
        .unwrap();
    let bundle = format!(
        "{}\0{}\0{}",
        issued.cert_pem,
        issued.key_pem.expose(),
        ca.cert_pem()
    );
    let data = bundle.as_bytes();
    // Every prefix, and every 7th byte flipped.
    for end in (0..=data.len()).step_by(3) {
        tests::fuzz::pem_bundle(&data[..end]);
    }
    for at in (0..data.len()).step_by(7) {
        let mut damaged = data.to_vec();
        damaged[at] ^= 0x5a;
        tests::fuzz::pem_bundle(&damaged);
    }
}
