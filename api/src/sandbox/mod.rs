//! A VM process confining itself (docs/architecture.md): its file access to the
//! files its VM's config names ([`landlock`]), and seccomp filters per thread class
//! ([`seccomp`]). `docs/sandbox.md` lists what each class may do and why.

pub mod landlock;
pub mod seccomp;

use std::sync::Mutex;

use block::sync::lock;
use block::thread_class::{self, ThreadClass};

use seccomp::OnViolation;

/// `--seccomp`: whether the process filters its syscalls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// Filter; a syscall outside its thread's class ends the process.
    #[default]
    True,
    /// Filter, but only log (in the kernel's audit log) what would be refused.
    Log,
    /// No filter.
    False,
}

impl SeccompMode {
    /// The option's value (`true`, `log`, `false`).
    pub fn as_str(self) -> &'static str {
        match self {
            SeccompMode::True => "true",
            SeccompMode::Log => "log",
            SeccompMode::False => "false",
        }
    }
}

/// Installs the filters: the calling thread (the process's main thread) gets the API
/// filter now, every later thread its class's filter when it starts. Call it once, before
/// any other thread starts.
pub fn install_seccomp(mode: SeccompMode) -> Result<(), String> {
    let on_violation = match mode {
        SeccompMode::False => {
            tracing::warn!("seccomp is off (--seccomp false): every thread may make any syscall");
            return Ok(());
        }
        SeccompMode::True => OnViolation::Kill,
        SeccompMode::Log => OnViolation::Log,
    };
    let mut programs = Vec::new();
    for class in ThreadClass::ALL {
        programs.push((class, seccomp::program(class, on_violation)?));
    }
    let program_of = move |class: ThreadClass| {
        programs
            .iter()
            .find(|(c, _)| *c == class)
            .map(|(_, p)| p.clone())
    };
    let api = program_of(ThreadClass::Api).ok_or("no API filter")?;
    let set = thread_class::set_start_hook(move |class| {
        let Some(p) = program_of(class) else { return };
        if let Err(e) = seccomp::apply(&p) {
            // A thread without its filter must not run: the process ends, reported.
            tracing::error!(class = class.name(), error = %e, "cannot install the seccomp filter");
            std::process::abort();
        }
        test_violation(class);
    });
    if !set {
        return Err("the thread start hook is already set".into());
    }
    seccomp::apply(&api)?;
    tracing::info!(
        mode = mode.as_str(),
        "seccomp filters installed per thread class"
    );
    Ok(())
}

/// The class whose next thread makes a forbidden syscall (debug builds only: tests).
static ARMED: Mutex<Option<ThreadClass>> = Mutex::new(None);

/// Debug builds only: the next thread of `class` to start makes a syscall outside its
/// filter (tests check that the VM process, and only it, ends, reported as crashed).
/// Release builds ignore it.
pub fn arm_test_violation(class: ThreadClass) {
    if cfg!(debug_assertions) {
        *lock(&ARMED) = Some(class);
    }
}

/// The class named by the debug-only environment variable `VMM_TEST_BAD_SYSCALL` for VM
/// `vm` (`<vm id>:<class>`).
pub fn test_violation_request(vm: &str) -> Option<ThreadClass> {
    if !cfg!(debug_assertions) {
        return None;
    }
    let value = std::env::var("VMM_TEST_BAD_SYSCALL").ok()?;
    let (id, class) = value.split_once(':')?;
    (id == vm)
        .then(|| ThreadClass::ALL.into_iter().find(|c| c.name() == class))
        .flatten()
}

fn test_violation(class: ThreadClass) {
    if !cfg!(debug_assertions) {
        return;
    }
    let armed = {
        let mut a = lock(&ARMED);
        if *a == Some(class) { a.take() } else { None }
    };
    if armed.is_some() {
        tracing::warn!(
            class = class.name(),
            "test: making a syscall outside the filter (acct)"
        );
        // SAFETY: acct with a null path only switches process accounting off (EPERM
        // without the capability); no memory is touched.
        unsafe { libc::syscall(libc::SYS_acct, std::ptr::null::<libc::c_char>()) };
    }
}
