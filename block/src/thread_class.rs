//! Classes of the threads a VM process runs, and one hook every such thread calls first
//! thing, so that the process can confine each class (its seccomp filter: `api::sandbox`).
//! Without a hook set, starting a thread does nothing more.

use std::sync::OnceLock;

/// What a thread does, for the syscalls it may make.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadClass {
    /// The API (HTTP, building and changing VMs) and the process's main thread.
    Api,
    /// A VM's control loop (lifecycle; it rebuilds a VM on a guest reset).
    Control,
    /// A vCPU (`KVM_RUN`, device emulation, queue activation).
    Vcpu,
    /// An iothread or an I/O worker (the data path).
    IoThread,
    /// A connection thread of a network disk (NBD): sends, receives, reconnects.
    Network,
}

impl ThreadClass {
    /// Every class.
    pub const ALL: [ThreadClass; 5] = [
        ThreadClass::Api,
        ThreadClass::Control,
        ThreadClass::Vcpu,
        ThreadClass::IoThread,
        ThreadClass::Network,
    ];

    /// Its name in options and messages.
    pub fn name(self) -> &'static str {
        match self {
            ThreadClass::Api => "api",
            ThreadClass::Control => "control",
            ThreadClass::Vcpu => "vcpu",
            ThreadClass::IoThread => "iothread",
            ThreadClass::Network => "network",
        }
    }
}

type Hook = Box<dyn Fn(ThreadClass) + Send + Sync>;

static HOOK: OnceLock<Hook> = OnceLock::new();

/// Sets the hook every later thread of a class calls when it starts; only the first call
/// sets it (returns whether this one did).
pub fn set_start_hook(hook: impl Fn(ThreadClass) + Send + Sync + 'static) -> bool {
    HOOK.set(Box::new(hook)).is_ok()
}

/// Called by a thread of `class` first thing.
pub fn started(class: ThreadClass) {
    if let Some(hook) = HOOK.get() {
        hook(class);
    }
}
