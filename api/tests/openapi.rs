//! `openapi.yaml` at the repository root must be what the handlers generate.

use std::path::Path;

#[test]
fn openapi_yaml_is_up_to_date() {
    let generated = api::server::openapi_yaml().expect("generate");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../openapi.yaml");
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    if generated != checked_in {
        let line = generated
            .lines()
            .zip(checked_in.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || "at the end".to_string(),
                |n| format!("at line {}", n + 1),
            );
        panic!(
            "{} differs from the generated description ({line}); regenerate it with\n    \
             cargo run -p api --bin gen-openapi -- openapi.yaml",
            path.display()
        );
    }
}
