//! The fuzz targets' bounded smoke, in CI: every committed seed of every target
//! (`fuzz/corpus/<target>/seed-*`) through the target's check, then seeded mutations of
//! them (bytes flipped, inserted, cut) and random inputs, a few thousand per target. The
//! long budget is libFuzzer's: `scripts/fuzz.sh` (its header says how long).

use std::path::Path;

use rand::{Rng, SeedableRng};

const CASES: usize = 3000;

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("seed-"))
        .map(|e| std::fs::read(e.path()).expect("seed"))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds for {target}");
    out
}

/// A seed with a few random edits.
fn mutate(rng: &mut rand::rngs::StdRng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..rng.random_range(1..5) {
        match rng.random_range(0..3) {
            0 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v[i] = rng.random();
            }
            1 => {
                let i = rng.random_range(0..=v.len());
                v.insert(i, rng.random());
            }
            _ if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v.truncate(i);
            }
            _ => {}
        }
    }
    v
}

/// Runs the seeds and the mutations; the check must accept some of them (else the
/// interesting half of it, past the parser, never ran).
fn smoke(target: &str, check: fn(&[u8]) -> bool) {
    let seeds = seeds(target);
    let accepted_seeds = seeds.iter().filter(|s| check(s)).count();
    assert!(accepted_seeds > 0, "{target}: no seed is accepted");
    let mut accepted = 0;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7e55e7a);
    for i in 0..CASES {
        let input = if i % 4 == 0 {
            let len = rng.random_range(0..256);
            (0..len).map(|_| rng.random()).collect()
        } else {
            mutate(&mut rng, &seeds[i % seeds.len()])
        };
        accepted += usize::from(check(&input));
    }
    eprintln!(
        "{target}: {accepted_seeds}/{} seeds and {accepted}/{CASES} variations accepted",
        seeds.len()
    );
    assert!(accepted > 0, "{target}: no variation accepted");
}

#[test]
fn bgp_decode() {
    smoke("bgp_decode", tessera_routed::fuzzing::decode_roundtrip);
}

#[test]
fn speaker_core() {
    smoke("speaker_core", tessera_routed::fuzzing::speaker_sequence);
}

#[test]
fn cni_config() {
    smoke("cni_config", tessera_cni::fuzzing::netconf);
}

#[test]
fn cni_args() {
    smoke("cni_args", tessera_cni::fuzzing::cni_args);
}

#[test]
fn resources_yaml() {
    smoke("resources_yaml", tessera_datastore::fuzzing::resources_yaml);
}

#[test]
fn stored_block() {
    smoke("stored_block", tessera_datastore::fuzzing::stored_block);
}
