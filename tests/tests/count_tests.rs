//! `scripts/count-tests`, which makes `scripts/test-all`'s closing line, on crafted logs:
//! a test that printed a `SKIP` line counts as skipped, not passed.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// The script's output for `log` on its standard input.
fn count(log: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/count-tests");
    let mut child = Command::new(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(log.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn totals(out: &str) -> &str {
    out.lines().last().unwrap_or_default()
}

#[test]
fn skip_lines_move_tests_from_passed_to_skipped() {
    let log = "\
     Running tests/a.rs (target/debug/deps/a-1)

running 3 tests
SKIP kvm_one: VMM_TEST_NO_KVM is set
test kvm_one ... ok
test plain ... ok
test ignored_one ... ignored

test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s

running 5 tests
test kvm_two ... 
SKIP kvm_two: /dev/kvm is missing or not accessible
ok

SKIP kvm_three: /dev/kvm is missing or not accessible
.
PARTIAL limits: hugepages in use (503) not checked
...
test result: FAILED. 4 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s

---- other stdout ----
  SKIP indented: not a skip line
SKIPPED: not a skip line either
script schemathesis: ok
SKIP schemathesis: PyPI is unreachable, schemathesis cannot be installed
";
    let out = count(log);
    // Passed: 2 + 4 + schemathesis, less the 4 SKIP lines; skipped: those and the ignored.
    assert_eq!(
        totals(&out),
        "tests: 3 passed, 1 failed, 5 skipped",
        "{out}"
    );
    let listed: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("SKIP") || l.starts_with("PARTIAL"))
        .collect();
    assert_eq!(
        listed.len(),
        5,
        "every SKIP and PARTIAL line is listed: {out}"
    );
}

#[test]
fn a_failed_script_and_no_skips() {
    let log = "\
test result: ok. 10 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s
test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s
script schemathesis: FAILED
";
    assert_eq!(totals(&count(log)), "tests: 10 passed, 1 failed, 0 skipped");
}
