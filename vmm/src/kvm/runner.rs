//! The vCPU run loop on its own thread, with pause/resume/stop.
//!
//! Kicking: the owner sets the request under the control lock, then sends [`kick_signal`]
//! to the thread. Its handler sets `immediate_exit` in the thread's `kvm_run`, so a
//! signal that lands just before `KVM_RUN` still makes it return at once (`EINTR`); no
//! request is lost.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use block::sync;
use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::VcpuExit;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use super::{KvmError, Result, Vcpu};

/// What the run loop does after a handled exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitAction {
    /// Go back into the guest.
    Continue,
    /// The guest powered off (e.g. ACPI sleep/poweroff register written): end the loop.
    Poweroff,
    /// The guest asked for a reset: end the loop.
    Reset,
}

/// Receives the PIO/MMIO exits of every vCPU (the bus, later).
pub trait ExitHandler: Send + Sync {
    /// `in` from `port`: fill `data`.
    fn pio_read(&self, vcpu: u32, port: u16, data: &mut [u8]);
    /// `out` to `port`.
    fn pio_write(&self, vcpu: u32, port: u16, data: &[u8]) -> ExitAction;
    /// MMIO read at `addr`: fill `data`.
    fn mmio_read(&self, vcpu: u32, addr: u64, data: &mut [u8]);
    /// MMIO write at `addr`.
    fn mmio_write(&self, vcpu: u32, addr: u64, data: &[u8]) -> ExitAction;
}

/// Why a vCPU thread ended.
#[derive(Debug, Clone)]
pub enum VcpuExitReason {
    /// Guest-initiated poweroff (handler or `KVM_SYSTEM_EVENT_SHUTDOWN`).
    Poweroff,
    /// Guest-initiated reset (handler or `KVM_SYSTEM_EVENT_RESET`).
    Reset,
    /// Triple fault (`KVM_EXIT_SHUTDOWN`); treat as a reset.
    TripleFault,
    /// `hlt` exit (only without an in-kernel LAPIC).
    Halted,
    /// The owner called [`VcpuHandle::stop`].
    Stopped,
    /// The guest crashed (`KVM_SYSTEM_EVENT_CRASH`) or KVM failed.
    Error(Arc<KvmError>),
}

/// Run state of a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    /// In (or entering) `KVM_RUN`.
    Running,
    /// Parked until [`VcpuHandle::resume`].
    Paused,
    /// The thread has left its loop.
    Exited,
}

/// Sent on the owner's channel when a vCPU thread ends.
#[derive(Debug, Clone)]
pub struct VcpuEvent {
    /// vCPU index.
    pub vcpu: u32,
    /// Why it ended.
    pub reason: VcpuExitReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
}

#[derive(Debug)]
struct Ctl {
    request: Request,
    state: VcpuState,
}

#[derive(Debug)]
struct Control {
    ctl: Mutex<Ctl>,
    cv: Condvar,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        sync::lock(&self.ctl)
    }
}

thread_local! {
    /// `immediate_exit` byte of this thread's `kvm_run`, null outside a vCPU loop.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal used to kick vCPU threads out of `KVM_RUN` (SIGRTMIN + 2).
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN() + 2
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    IMMEDIATE_EXIT.with(|p| {
        let ptr = p.get();
        if !ptr.is_null() {
            // SAFETY: the pointer is set by this thread's run loop to the `immediate_exit`
            // byte of its live `kvm_run` mapping, and cleared before that mapping goes away.
            unsafe { std::ptr::write_volatile(ptr, 1) };
        }
    });
}

fn install_kick_handler() -> Result<()> {
    static RESULT: OnceLock<i32> = OnceLock::new();
    let errno = *RESULT.get_or_init(|| {
        register_signal_handler(kick_signal(), handle_kick)
            .err()
            .map_or(0, |e| e.errno())
    });
    if errno == 0 {
        Ok(())
    } else {
        Err(KvmError::Thread(format!(
            "cannot install the vCPU kick signal handler: errno {errno}"
        )))
    }
}

/// The owner's handle on a running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    index: u32,
    control: Arc<Control>,
    thread: Option<JoinHandle<VcpuExitReason>>,
}

impl VcpuHandle {
    /// Starts `vcpu`'s run loop on a thread named `vcpu<N>`. Exits go to `handler`; when the
    /// loop ends, a [`VcpuEvent`] goes to `events` (if given).
    pub fn spawn(
        vcpu: Vcpu,
        handler: Arc<dyn ExitHandler>,
        events: Option<Sender<VcpuEvent>>,
    ) -> Result<Self> {
        Self::spawn_notifying(vcpu, handler, events, None)
    }

    /// Like [`VcpuHandle::spawn`]; after the event is sent, `notify` (if given) is
    /// written, so that an owner waiting in epoll wakes up.
    pub fn spawn_notifying(
        vcpu: Vcpu,
        handler: Arc<dyn ExitHandler>,
        events: Option<Sender<VcpuEvent>>,
        notify: Option<Arc<EventFd>>,
    ) -> Result<Self> {
        install_kick_handler()?;
        let index = vcpu.index();
        let control = Arc::new(Control {
            ctl: Mutex::new(Ctl {
                request: Request::Run,
                state: VcpuState::Running,
            }),
            cv: Condvar::new(),
        });
        let ctl = control.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                block::thread_class::started(block::thread_class::ThreadClass::Vcpu);
                let reason = run_loop(vcpu, handler.as_ref(), &ctl);
                {
                    let mut g = ctl.lock();
                    g.state = VcpuState::Exited;
                    ctl.cv.notify_all();
                }
                tracing::info!(vcpu = index, ?reason, "vCPU exited");
                if let Some(tx) = events {
                    let _ = tx.send(VcpuEvent {
                        vcpu: index,
                        reason: reason.clone(),
                    });
                }
                if let Some(fd) = notify
                    && let Err(e) = fd.write(1)
                {
                    tracing::warn!(vcpu = index, error = %e, "cannot signal the VM's owner");
                }
                reason
            })
            .map_err(|e| KvmError::Thread(format!("spawn vcpu{index}: {e}")))?;
        Ok(VcpuHandle {
            index,
            control,
            thread: Some(thread),
        })
    }

    /// The vCPU index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The current run state.
    pub fn state(&self) -> VcpuState {
        self.control.lock().state
    }

    /// Kicks the thread out of `KVM_RUN` (it re-reads its request and goes on).
    fn kick(&self, g: &MutexGuard<'_, Ctl>) {
        if g.state == VcpuState::Exited {
            return;
        }
        if let Some(t) = &self.thread {
            // SAFETY: the thread is not joined yet (we hold its JoinHandle), so its
            // pthread_t is valid; the signal's handler is installed in `spawn`.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }

    /// Asks the vCPU to leave the guest and park; waits up to `timeout` until it has.
    /// Returns the state reached (`Paused`, or `Exited` if the loop had ended).
    pub fn pause(&self, timeout: Duration) -> Result<VcpuState> {
        let deadline = Instant::now() + timeout;
        let mut g = self.control.lock();
        if g.request == Request::Run {
            g.request = Request::Pause;
        }
        self.kick(&g);
        while g.state == VcpuState::Running {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(KvmError::Thread(format!(
                    "vcpu{} did not pause within {timeout:?}",
                    self.index
                )));
            }
            // Re-kick now and then in case a signal raced the thread's start.
            (g, _) = sync::wait_timeout(&self.control.cv, g, left.min(Duration::from_millis(50)));
            if g.state == VcpuState::Running {
                self.kick(&g);
            }
        }
        Ok(g.state)
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) {
        let mut g = self.control.lock();
        if g.request == Request::Pause {
            g.request = Request::Run;
            self.control.cv.notify_all();
        }
    }

    /// Asks the loop to end (it returns [`VcpuExitReason::Stopped`]); does not wait.
    pub fn stop(&self) {
        let mut g = self.control.lock();
        g.request = Request::Stop;
        self.control.cv.notify_all();
        self.kick(&g);
    }

    /// Waits for the thread to end and returns why it did.
    pub fn join(mut self) -> VcpuExitReason {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(reason)) => reason,
            _ => VcpuExitReason::Error(Arc::new(KvmError::Thread(format!(
                "vcpu{} panicked",
                self.index
            )))),
        }
    }
}

impl Drop for VcpuHandle {
    /// A handle dropped without [`VcpuHandle::join`] stops its thread and waits for it.
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            {
                let mut g = self.control.lock();
                g.request = Request::Stop;
                self.control.cv.notify_all();
                if g.state != VcpuState::Exited {
                    // SAFETY: the thread is not joined yet, so its pthread_t is valid.
                    unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
                }
            }
            let _ = t.join();
        }
    }
}

/// Clears the thread-local kick pointer when the loop ends (also on panic).
struct KickGuard;

impl Drop for KickGuard {
    fn drop(&mut self) {
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
    }
}

/// Blocks while paused; returns false when asked to stop.
fn wait_for_run(control: &Control) -> bool {
    let mut g = control.lock();
    loop {
        match g.request {
            Request::Run => {
                g.state = VcpuState::Running;
                return true;
            }
            Request::Stop => return false,
            Request::Pause => {
                if g.state != VcpuState::Paused {
                    g.state = VcpuState::Paused;
                    control.cv.notify_all();
                }
                g = sync::wait(&control.cv, g);
            }
        }
    }
}

fn run_loop(mut vcpu: Vcpu, handler: &dyn ExitHandler, control: &Control) -> VcpuExitReason {
    let index = vcpu.index();
    let ptr: *mut u8 = &mut vcpu.fd.get_kvm_run().immediate_exit;
    IMMEDIATE_EXIT.with(|p| p.set(ptr));
    let _guard = KickGuard;
    let err = |e: KvmError| VcpuExitReason::Error(Arc::new(e));
    loop {
        if !wait_for_run(control) {
            return VcpuExitReason::Stopped;
        }
        let action = match vcpu.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                handler.pio_read(index, port, data);
                ExitAction::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => handler.pio_write(index, port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => {
                handler.mmio_read(index, addr, data);
                ExitAction::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => handler.mmio_write(index, addr, data),
            Ok(VcpuExit::Intr) => ExitAction::Continue,
            Ok(VcpuExit::Hlt) => return VcpuExitReason::Halted,
            Ok(VcpuExit::Shutdown) => return VcpuExitReason::TripleFault,
            Ok(VcpuExit::SystemEvent(kind, data)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => ExitAction::Poweroff,
                KVM_SYSTEM_EVENT_RESET => ExitAction::Reset,
                KVM_SYSTEM_EVENT_CRASH => {
                    return err(KvmError::UnexpectedExit {
                        vcpu: index,
                        what: format!("guest crash event {data:x?}"),
                    });
                }
                other => {
                    return err(KvmError::UnexpectedExit {
                        vcpu: index,
                        what: format!("system event {other} {data:x?}"),
                    });
                }
            },
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return err(KvmError::FailEntry { reason, cpu });
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                // active member of the exit union.
                let suberror = unsafe { vcpu.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                let rip = vcpu.fd.get_regs().map_or(0, |r| r.rip);
                return err(KvmError::InternalError {
                    vcpu: index,
                    suberror,
                    rip,
                });
            }
            Ok(other) => {
                return err(KvmError::UnexpectedExit {
                    vcpu: index,
                    what: format!("{other:?}"),
                });
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.fd.set_kvm_immediate_exit(0);
                ExitAction::Continue
            }
            Err(source) => {
                return err(KvmError::Ioctl {
                    op: "KVM_RUN",
                    source,
                });
            }
        };
        match action {
            ExitAction::Continue => {}
            ExitAction::Poweroff => return VcpuExitReason::Poweroff,
            ExitAction::Reset => return VcpuExitReason::Reset,
        }
    }
}
