//! Development material, compiled only with the `dev` feature: the sample animals.

use cmz_core::types::Persona;

/// The sample animal personas (JSON) offered when no persona store is configured.
pub const SAMPLE_PERSONAS: &str = include_str!("sample-personas.json");

/// The sample animal personas.
pub fn sample_personas() -> Vec<Persona> {
    serde_json::from_str(SAMPLE_PERSONAS).expect("the sample personas parse")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_sample_personas_parse() {
        assert!(super::sample_personas().len() >= 3);
    }
}
