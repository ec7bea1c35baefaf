//! Tests that cannot run here say so in one line that reaches the test log, and
//! `scripts/test-all` (through `scripts/count-tests`) counts them as skipped, not passed:
//!
//! - `SKIP <test>: <why>`: the test returned early and checked nothing that matters
//!   ([`skip`]); print it exactly once per test.
//! - `PARTIAL <test>: <why>`: the test ran, but one of its checks could not
//!   ([`partial`]); counted with the passes, listed in the summary.
//!
//! libtest captures `print!`/`println!`/`eprint!` of a test and shows it only when the
//! test fails; these lines are written to the process's stdout handle itself, which the
//! capture does not reach. Each starts on a line of its own: libtest may have left a
//! line open (`test <name> ... ` is out before the test runs with one thread, and at
//! times with several; terse output is a line of dots), so the line begins with a newline.
//!
//! `VMM_TEST_NO_KVM=1` makes every KVM test skip as if `/dev/kvm` were missing
//! ([`kvm_or_skip`]).

use std::io::Write;

/// Set to `1` (any value but `0` or empty), every KVM test skips.
pub const NO_KVM_ENV: &str = "VMM_TEST_NO_KVM";

fn line(text: &str) {
    // One write, so lines of tests running in parallel do not interleave; a newline
    // first, as libtest may have left a line open (`test <name> ... ` is out before the
    // test runs with one thread, and at times with several; terse output is a line of
    // dots). An empty line costs nothing: the counting reads lines starting `SKIP `.
    let text = format!("\n{text}\n");
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Prints `SKIP <test>: <why>`: test `test` cannot run here and returns at once.
pub fn skip(test: &str, why: &str) {
    line(&format!("SKIP {test}: {why}"));
}

/// Prints `PARTIAL <test>: <why>`: test `test` runs, but without the check `why` names.
pub fn partial(test: &str, why: &str) {
    line(&format!("PARTIAL {test}: {why}"));
}

/// Whether a value of [`NO_KVM_ENV`] asks for no KVM: set, not empty and not `0`.
pub fn no_kvm_requested(value: Option<&str>) -> bool {
    value.is_some_and(|v| !v.is_empty() && v != "0")
}

/// Why KVM tests cannot run here, or None when they can: [`NO_KVM_ENV`] asks so, or
/// `/dev/kvm` cannot be opened read-write (what `kvm_ioctls::Kvm::new` does).
pub fn kvm_missing() -> Option<String> {
    if no_kvm_requested(std::env::var(NO_KVM_ENV).ok().as_deref()) {
        return Some(format!("{NO_KVM_ENV} is set"));
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm is missing or not accessible ({e})")),
    }
}

/// Whether KVM test `test` can run here; prints its `SKIP` line when not.
pub fn kvm_or_skip(test: &str) -> bool {
    match kvm_missing() {
        None => true,
        Some(why) => {
            skip(test, &why);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_empty_or_zero_value_leaves_kvm_on() {
        assert!(!no_kvm_requested(None));
        assert!(!no_kvm_requested(Some("")));
        assert!(!no_kvm_requested(Some("0")));
        assert!(no_kvm_requested(Some("1")));
        assert!(no_kvm_requested(Some("yes")));
    }
}
