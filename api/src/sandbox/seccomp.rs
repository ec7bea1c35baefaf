//! Seccomp filters per thread class (docs/architecture.md). Every thread of a VM
//! process installs the filter of its class when it starts ([`block::thread_class`]);
//! a thread inherits its creator's filter too, so a thread's allowed set is what its own
//! class and the classes of the threads that made it allow.
//!
//! The lists come from tracing a VM process (`strace -ff`) through every API call, a
//! guest's I/O on io_uring, native AIO and worker-thread disks, hot plug, a guest reset,
//! a reboot and a poweroff; `docs/sandbox.md` says why each class needs what it has.
//! Anything else ends the process (`--seccomp true`) or is logged by the kernel
//! (`--seccomp log`).

use std::collections::BTreeMap;

use block::thread_class::ThreadClass;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What every thread may do: memory, locks, signals, time, its own end, eventfd reads
/// and writes, waiting in epoll or poll.
const BASE: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_prctl,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_restart_syscall,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // abort() after a panic signals the process itself.
    libc::SYS_tgkill,
    libc::SYS_rt_sigaction,
    // A new thread installs its own class's filter (on top of its creator's).
    libc::SYS_seccomp,
];

/// The data path: submitting and reaping I/O (io_uring, Linux AIO, worker threads'
/// positioned reads and writes), flushes, discards (punch hole, BLKDISCARD), throttle
/// timers, CPU affinity changes.
const IO: &[i64] = &[
    libc::SYS_io_uring_enter,
    libc::SYS_io_submit,
    libc::SYS_io_getevents,
    libc::SYS_io_cancel,
    libc::SYS_io_destroy,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_lseek,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_sched_setaffinity,
    // An NBD disk's requests, sent by the iothread when its socket takes them at once;
    // a send that fails there breaks the link (shutdown wakes the connection's threads).
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
];

/// A vCPU: `KVM_RUN` and the device work its exits do, which includes activating a
/// queue when the guest driver starts a device (a new I/O engine, its eventfds, irqfd
/// and MSI routes, worker threads) and stopping it again.
const VCPU: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_register,
    libc::SYS_io_uring_enter,
    libc::SYS_io_setup,
    libc::SYS_io_destroy,
    libc::SYS_io_getevents,
    libc::SYS_epoll_create1,
    libc::SYS_statx,
    libc::SYS_newfstatat,
];

/// Syscalls that fail with EACCES on the data path and vCPUs instead of ending the
/// process: glibc's malloc reads `/proc/sys/vm/overcommit_memory` once, in whichever
/// thread first trims an arena, and `std::thread::available_parallelism` reads
/// `/sys/devices/system/cpu/online`; both go on without the file. Nothing else there
/// opens files.
const REFUSED: &[i64] = &[libc::SYS_openat, libc::SYS_open];

/// The API and the control loop: building, rebuilding and changing a VM (KVM, guest
/// memory, images and their locks, the kernel, the serial output, threads, I/O engines)
/// and serving HTTP on the sockets.
const BUILD: &[i64] = &[
    // Relative client paths are resolved against the working directory.
    libc::SYS_getcwd,
    libc::SYS_openat,
    // Opening without following symbolic links (vmmd --allowed-dir).
    libc::SYS_openat2,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_readlinkat,
    libc::SYS_fchmodat,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_readlink,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_flock,
    libc::SYS_ioctl,
    libc::SYS_memfd_create,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_epoll_create1,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_tid_address,
    libc::SYS_sched_setaffinity,
    libc::SYS_prlimit64,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_register,
    libc::SYS_io_uring_enter,
    libc::SYS_io_setup,
    libc::SYS_io_destroy,
    libc::SYS_io_submit,
    libc::SYS_io_getevents,
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_shutdown,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_umask,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    // glibc's resolver, for the host name of an NBD server when its disk opens: the
    // node name, and the DNS queries (A and AAAA together).
    libc::SYS_uname,
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
];

/// A network disk's connection threads (NBD): sending and receiving on their socket,
/// and reconnecting (a new socket, connect, the handshake with its timeouts) after a
/// pause.
const NETWORK: &[i64] = &[
    libc::SYS_connect,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_shutdown,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
];

/// `ioctl` request types a class may use (the `_IOC_TYPE` byte): KVM's for vCPUs
/// (`KVM_RUN`, `KVM_IRQFD`, `KVM_SET_GSI_ROUTING`, ...), the block layer's for the data
/// path (`BLKDISCARD`, `BLKZEROOUT`, `BLKGETSIZE64`).
const KVM_IOCTL_TYPE: u64 = 0xAE;
const BLOCK_IOCTL_TYPE: u64 = 0x12;

/// The syscalls `class` may make, with conditions where it has some.
fn rules(class: ThreadClass) -> Result<BTreeMap<i64, Vec<SeccompRule>>, String> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let (extra, ioctl_type): (&[&[i64]], Option<u64>) = match class {
        ThreadClass::Api | ThreadClass::Control => (&[BUILD, IO], None),
        // A vCPU starts I/O workers when the guest activates a queue: they inherit its
        // filter, so it allows what they do too.
        ThreadClass::Vcpu => (&[VCPU, IO], Some(KVM_IOCTL_TYPE)),
        ThreadClass::IoThread => (&[IO], Some(BLOCK_IOCTL_TYPE)),
        ThreadClass::Network => (&[NETWORK], None),
    };
    for sys in BASE.iter().chain(extra.iter().flat_map(|l| l.iter())) {
        map.insert(*sys, Vec::new());
    }
    if matches!(
        class,
        ThreadClass::Api | ThreadClass::Control | ThreadClass::Network
    ) {
        // Unix sockets (a serial socket, an NBD server's socket) and TCP/IP ones (an NBD
        // server, and the name lookup of its host when a disk opens); nothing else. The
        // API's TCP listener is bound before the filters. The resolver's netlink socket
        // (glibc sorts several addresses by the host's own) is let through here and
        // refused with EAFNOSUPPORT by the layer before ([`program`]): glibc goes on
        // without it.
        let families: &[i32] = if class == ThreadClass::Network {
            &[libc::AF_UNIX, libc::AF_INET, libc::AF_INET6]
        } else {
            &[
                libc::AF_UNIX,
                libc::AF_INET,
                libc::AF_INET6,
                libc::AF_NETLINK,
            ]
        };
        let mut rules = Vec::new();
        for &family in families {
            let is = SeccompCondition::new(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                u64::try_from(family).unwrap_or(1),
            )
            .map_err(|e| e.to_string())?;
            rules.push(SeccompRule::new(vec![is]).map_err(|e| e.to_string())?);
        }
        map.insert(libc::SYS_socket, rules);
    }
    if ioctl_type.is_some() {
        // Let through by this filter, refused by the one before it (see [`program`]).
        for sys in REFUSED {
            map.insert(*sys, Vec::new());
        }
    }
    if let Some(t) = ioctl_type {
        let only_type = SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(0xff00),
            t << 8,
        )
        .map_err(|e| e.to_string())?;
        map.insert(
            libc::SYS_ioctl,
            vec![SeccompRule::new(vec![only_type]).map_err(|e| e.to_string())?],
        );
    }
    Ok(map)
}

/// What a thread does when it makes a syscall outside its filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnViolation {
    /// The process ends (SIGSYS).
    Kill,
    /// The kernel logs it and lets it through.
    Log,
}

/// The filters of `class`, in the order to apply them. vCPUs and the data path get two:
/// the first refuses [`REFUSED`] with EACCES, the second (which lets them through, as
/// the kernel takes the strictest answer of all filters) allows the class's list.
pub fn program(class: ThreadClass, on_violation: OnViolation) -> Result<Vec<BpfProgram>, String> {
    let err =
        |e: &dyn std::fmt::Display| format!("seccomp filter of the {} threads: {e}", class.name());
    let mismatch = match on_violation {
        OnViolation::Kill => SeccompAction::KillProcess,
        OnViolation::Log => SeccompAction::Log,
    };
    let mut layers = Vec::new();
    if matches!(class, ThreadClass::Vcpu | ThreadClass::IoThread) {
        let refused = REFUSED.iter().map(|s| (*s, Vec::new())).collect();
        let eacces = u32::try_from(libc::EACCES).unwrap_or(13);
        let f = SeccompFilter::new(
            refused,
            SeccompAction::Allow,
            SeccompAction::Errno(eacces),
            TargetArch::x86_64,
        )
        .map_err(|e| err(&e))?;
        layers.push(
            f.try_into()
                .map_err(|e: seccompiler::BackendError| err(&e))?,
        );
    }
    if matches!(class, ThreadClass::Api | ThreadClass::Control) {
        let netlink = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            u64::try_from(libc::AF_NETLINK).unwrap_or(16),
        )
        .map_err(|e| err(&e))?;
        let rule = SeccompRule::new(vec![netlink]).map_err(|e| err(&e))?;
        let f = SeccompFilter::new(
            BTreeMap::from([(libc::SYS_socket, vec![rule])]),
            SeccompAction::Allow,
            SeccompAction::Errno(u32::try_from(libc::EAFNOSUPPORT).unwrap_or(97)),
            TargetArch::x86_64,
        )
        .map_err(|e| err(&e))?;
        layers.push(
            f.try_into()
                .map_err(|e: seccompiler::BackendError| err(&e))?,
        );
    }
    let filter = SeccompFilter::new(
        rules(class)?,
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| err(&e))?;
    layers.push(
        filter
            .try_into()
            .map_err(|e: seccompiler::BackendError| err(&e))?,
    );
    Ok(layers)
}

/// Applies the filters `layers` to the calling thread.
pub fn apply(layers: &[BpfProgram]) -> Result<(), String> {
    for p in layers {
        seccompiler::apply_filter(p).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_compiles_and_the_data_path_gets_less() {
        for class in ThreadClass::ALL {
            for mode in [OnViolation::Kill, OnViolation::Log] {
                let layers = program(class, mode).unwrap();
                assert!(layers.iter().all(|p| !p.is_empty()));
            }
        }
        let io = rules(ThreadClass::IoThread).unwrap();
        let vcpu = rules(ThreadClass::Vcpu).unwrap();
        let api = rules(ThreadClass::Api).unwrap();
        for forbidden in [
            libc::SYS_execve,
            libc::SYS_ptrace,
            libc::SYS_socket,
            libc::SYS_bind,
        ] {
            assert!(
                !io.contains_key(&forbidden),
                "iothreads may call {forbidden}"
            );
        }
        assert!(!vcpu.contains_key(&libc::SYS_socket));
        // The API and the NBD connection threads may make Unix and TCP/IP sockets only
        // (the API's netlink rule is refused by an earlier layer).
        assert_eq!(api[&libc::SYS_socket].len(), 4);
        let net = rules(ThreadClass::Network).unwrap();
        assert_eq!(net[&libc::SYS_socket].len(), 3);
        for forbidden in [
            libc::SYS_openat,
            libc::SYS_ioctl,
            libc::SYS_execve,
            libc::SYS_bind,
        ] {
            assert!(
                !net.contains_key(&forbidden),
                "network threads may call {forbidden}"
            );
        }
        assert!(!api.contains_key(&libc::SYS_execve));
        assert!(!api.contains_key(&libc::SYS_ptrace));
        // ioctl only with a condition on the data path and vCPUs.
        assert_eq!(io[&libc::SYS_ioctl].len(), 1);
        assert_eq!(vcpu[&libc::SYS_ioctl].len(), 1);
        assert!(api[&libc::SYS_ioctl].is_empty());
    }

    /// A thread under the API filter resolves a host name (as opening an `nbd://host/`
    /// disk does): the resolver's netlink socket is refused with EAFNOSUPPORT, not fatal,
    /// and the lookup succeeds. (A violation would end the whole test process.)
    #[test]
    fn the_api_filter_lets_the_resolver_work_without_netlink() {
        let prog = program(ThreadClass::Api, OnViolation::Kill).unwrap();
        let t = std::thread::spawn(move || {
            apply(&prog).unwrap();
            // SAFETY: socket() with constant arguments; a descriptor it returns is closed.
            let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0) };
            let errno = std::io::Error::last_os_error().raw_os_error();
            if fd >= 0 {
                // SAFETY: closing the descriptor we got.
                unsafe { libc::close(fd) };
            }
            let addrs: Vec<_> = std::net::ToSocketAddrs::to_socket_addrs(&("localhost", 10809))
                .map(Iterator::collect)
                .unwrap_or_default();
            (fd, errno, addrs.len())
        });
        let (fd, errno, found) = t.join().unwrap();
        assert_eq!((fd, errno), (-1, Some(libc::EAFNOSUPPORT)));
        assert!(found >= 1, "localhost did not resolve under the filter");
    }

    /// Forks; the child applies `prog` to itself, runs `body` and exits with what it
    /// returns (3 when the filter cannot be applied); returns the child's wait status.
    fn in_filtered_child(prog: &[BpfProgram], body: impl FnOnce() -> i32) -> i32 {
        // SAFETY: fork in a test; the child only applies the filter and makes syscalls,
        // then exits without returning into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = if apply(prog).is_err() { 3 } else { body() };
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(pid, &raw mut status, 0) };
        status
    }

    /// The syscalls an iothread makes when it sends an NBD batch itself and the server is
    /// gone (`sendmsg` fails with EPIPE, `shutdown` breaks the link) pass its filter: a
    /// process under the kill filter survives them.
    #[test]
    fn an_iothread_may_send_on_an_nbd_socket_and_break_the_link() {
        use std::os::fd::{AsRawFd, OwnedFd};
        let prog = program(ThreadClass::IoThread, OnViolation::Kill).unwrap();
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(theirs);
        let fd = OwnedFd::from(ours);
        let status = in_filtered_child(&prog, || {
            let mut data = [0u8; 28];
            let mut iovs = vec![libc::iovec {
                iov_base: data.as_mut_ptr().cast(),
                iov_len: data.len(),
            }];
            // SAFETY: the iovec describes `data`, alive for the call.
            let sent = unsafe { block::nbd::stream::send_some(fd.as_raw_fd(), &mut iovs) };
            let epipe = sent.is_err_and(|e| e.raw_os_error() == Some(libc::EPIPE));
            block::nbd::stream::shutdown(&fd);
            if epipe { 0 } else { 4 }
        });
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "status {status:#x} (signal {})",
            libc::WTERMSIG(status)
        );
    }

    /// A thread with the iothread filter in log mode can still do I/O work; one in kill
    /// mode dies only in a forked child, so the test process goes on.
    #[test]
    fn a_filtered_thread_that_steps_outside_ends_its_process() {
        let prog = program(ThreadClass::IoThread, OnViolation::Kill).unwrap();
        let status = in_filtered_child(&prog, || {
            // Allowed: getpid. Refused with EACCES: open. Forbidden: acct.
            // SAFETY: plain syscalls on a valid C string or a null pointer (acct with a
            // null path only switches accounting off, EPERM without the capability).
            unsafe {
                libc::getpid();
                let fd = libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY);
                if fd >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EACCES) {
                    return 4;
                }
                libc::syscall(libc::SYS_acct, std::ptr::null::<libc::c_char>());
            }
            0
        });
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }
}
