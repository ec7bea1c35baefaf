//! Writes the service's OpenAPI description (generated from the handlers and types) to
//! the file given as argument, or to standard output. `openapi.yaml` at the repository
//! root is made with `cargo run -p api --bin gen-openapi -- openapi.yaml`.

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let yaml = match api::server::openapi_yaml() {
        Ok(y) => y,
        Err(e) => {
            eprintln!("gen-openapi: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match std::env::args_os().nth(1) {
        Some(path) => std::fs::write(&path, yaml),
        None => std::io::stdout().write_all(yaml.as_bytes()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gen-openapi: {e}");
            ExitCode::FAILURE
        }
    }
}
