//! KVM core smoke tests: a few hand-assembled 64-bit instructions started directly in
//! long mode exercise PIO/MMIO exits, ioeventfd, pause/resume and the exit reasons.
//! Skipped (with a printed reason) when `/dev/kvm` is absent or `VMM_TEST_NO_KVM=1`.

#![allow(clippy::cast_possible_truncation)] // Test data and figures, not guest input.

use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::kvm::{
    Datamatch, EntryMode, ExitAction, ExitHandler, IoEventAddress, KvmError, Vcpu, VcpuEvent,
    VcpuExitReason, VcpuHandle, VcpuInitRegs, VcpuState, Vm,
};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const CODE_ADDR: u64 = 0x1000;
const STACK_TOP: u64 = 0x8000;
const COUNTER_ADDR: u64 = 0x3000;
const POWEROFF_PORT: u16 = 0x600;
const POWEROFF_VALUE: u8 = 0x34;
const SERIAL_PORT: u16 = 0x3f8;
const LSR_PORT: u16 = 0x3fd;
const MMIO_BASE: u64 = 0xd000_0000;

use tests::skip::{NO_KVM_ENV, kvm_or_skip};

/// Records every exit; reads of the LSR return 'X', MMIO reads return 0xcafebabe.
#[derive(Default)]
struct Recorder {
    serial: Mutex<Vec<u8>>,
    pio_reads: Mutex<Vec<u16>>,
    mmio_writes: Mutex<Vec<(u64, Vec<u8>)>>,
    mmio_reads: Mutex<Vec<(u64, usize)>>,
}

impl ExitHandler for Recorder {
    fn pio_read(&self, _vcpu: u32, port: u16, data: &mut [u8]) {
        self.pio_reads.lock().unwrap().push(port);
        data.fill(if port == LSR_PORT { b'X' } else { 0xff });
    }

    fn pio_write(&self, _vcpu: u32, port: u16, data: &[u8]) -> ExitAction {
        match port {
            SERIAL_PORT => {
                self.serial.lock().unwrap().extend_from_slice(data);
                ExitAction::Continue
            }
            POWEROFF_PORT if data == [POWEROFF_VALUE] => ExitAction::Poweroff,
            _ => ExitAction::Continue,
        }
    }

    fn mmio_read(&self, _vcpu: u32, addr: u64, data: &mut [u8]) {
        self.mmio_reads.lock().unwrap().push((addr, data.len()));
        let v = 0xcafe_babe_u32.to_le_bytes();
        for (d, s) in data.iter_mut().zip(v.iter().cycle()) {
            *d = *s;
        }
    }

    fn mmio_write(&self, _vcpu: u32, addr: u64, data: &[u8]) -> ExitAction {
        self.mmio_writes.lock().unwrap().push((addr, data.to_vec()));
        ExitAction::Continue
    }
}

struct Guest {
    vm: Vm,
    mem: GuestMemoryMmap<()>,
    vcpu: Option<Vcpu>,
}

/// A 2 MiB one-vCPU VM in long mode with `code` at [`CODE_ADDR`].
fn guest(code: &[u8]) -> Guest {
    guest_in(code, EntryMode::Long64)
}

/// A 2 MiB one-vCPU VM entered in `mode` with `code` at [`CODE_ADDR`].
fn guest_in(code: &[u8], mode: EntryMode) -> Guest {
    let vm = Vm::new().expect("create VM");
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
    vm.register_memory(&mem).expect("register memory");
    mem.write_slice(code, GuestAddress(CODE_ADDR)).unwrap();
    Vcpu::write_boot_tables(&mem, mode).unwrap();
    let vcpu = Vcpu::new(&vm, 0, 1).expect("create vCPU");
    let regs = VcpuInitRegs {
        rip: CODE_ADDR,
        rsp: STACK_TOP,
        ..Default::default()
    };
    vcpu.configure_boot(mode, &regs).expect("boot state");
    Guest {
        vm,
        mem,
        vcpu: Some(vcpu),
    }
}

fn start(g: &mut Guest, rec: &Arc<Recorder>) -> (VcpuHandle, Receiver<VcpuEvent>) {
    let (tx, rx) = channel();
    let handler: Arc<dyn ExitHandler> = rec.clone();
    let h = VcpuHandle::spawn(g.vcpu.take().unwrap(), handler, Some(tx)).expect("spawn");
    (h, rx)
}

/// `mov dx, port; mov al, v; out dx, al` for each byte.
fn out_bytes(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut c = vec![0x66, 0xba];
    c.extend_from_slice(&port.to_le_bytes());
    for b in bytes {
        c.extend_from_slice(&[0xb0, *b, 0xee]);
    }
    c
}

fn poweroff() -> Vec<u8> {
    let mut c = out_bytes(POWEROFF_PORT, &[POWEROFF_VALUE]);
    c.extend_from_slice(&[0xf4, 0xeb, 0xfe]); // hlt; jmp $ (never reached)
    c
}

/// `mov eax, imm32` (zero-extended into rax).
fn mov_eax(v: u32) -> Vec<u8> {
    let mut c = vec![0xb8];
    c.extend_from_slice(&v.to_le_bytes());
    c
}

/// `mov dword [rax + disp8], imm32`.
fn store_rax(disp: u8, v: u32) -> Vec<u8> {
    let mut c = vec![0xc7, 0x40, disp];
    c.extend_from_slice(&v.to_le_bytes());
    c
}

fn wait_event(rx: &Receiver<VcpuEvent>) -> VcpuEvent {
    rx.recv_timeout(Duration::from_secs(30))
        .expect("vCPU did not end within 30 s")
}

#[test]
fn serial_mmio_and_poweroff() {
    if !kvm_or_skip("serial_mmio_and_poweroff") {
        return;
    }
    let mut code = Vec::new();
    for _ in 0..3 {
        code.extend(out_bytes(SERIAL_PORT, b"OK\n"));
    }
    // in al, dx from the LSR, echoed to the serial port.
    code.extend_from_slice(&[0x66, 0xba, 0xfd, 0x03, 0xec]);
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xee]);
    code.extend(mov_eax(MMIO_BASE as u32));
    code.extend(store_rax(0, 0x1234_5678));
    // mov ecx, [rax + 8]; mov [rax + 0x10], ecx
    code.extend_from_slice(&[0x8b, 0x48, 0x08, 0x89, 0x48, 0x10]);
    code.extend(poweroff());
    let mut g = guest(&code);
    let rec = Arc::new(Recorder::default());
    let (h, rx) = start(&mut g, &rec);
    let ev = wait_event(&rx);
    assert_eq!(ev.vcpu, 0);
    assert!(matches!(ev.reason, VcpuExitReason::Poweroff), "{ev:?}");
    assert!(matches!(h.join(), VcpuExitReason::Poweroff));
    assert_eq!(&*rec.serial.lock().unwrap(), b"OK\nOK\nOK\nX");
    assert_eq!(&*rec.pio_reads.lock().unwrap(), &[LSR_PORT]);
    assert_eq!(&*rec.mmio_reads.lock().unwrap(), &[(MMIO_BASE + 8, 4)]);
    let writes = rec.mmio_writes.lock().unwrap();
    assert_eq!(
        &*writes,
        &[
            (MMIO_BASE, 0x1234_5678_u32.to_le_bytes().to_vec()),
            (MMIO_BASE + 0x10, 0xcafe_babe_u32.to_le_bytes().to_vec()),
        ]
    );
}

#[test]
fn ioeventfd_fires_without_exit() {
    if !kvm_or_skip("ioeventfd_fires_without_exit") {
        return;
    }
    let notify = MMIO_BASE + 0x1000;
    let mut code = mov_eax(notify as u32);
    code.extend(store_rax(0, 1)); // matches: eventfd, no exit
    code.extend(store_rax(0, 1));
    code.extend(store_rax(0, 2)); // does not match: MMIO exit
    code.extend(poweroff());
    let mut g = guest(&code);
    let efd = EventFd::new(EFD_NONBLOCK).unwrap();
    let addr = IoEventAddress::Mmio(notify);
    g.vm.register_ioevent(&efd, addr, Datamatch::U32(1))
        .expect("register ioeventfd");
    let rec = Arc::new(Recorder::default());
    let (h, rx) = start(&mut g, &rec);
    assert!(matches!(wait_event(&rx).reason, VcpuExitReason::Poweroff));
    h.join();
    assert_eq!(efd.read().expect("eventfd must be readable"), 2);
    assert_eq!(
        &*rec.mmio_writes.lock().unwrap(),
        &[(notify, 2u32.to_le_bytes().to_vec())]
    );
    g.vm.unregister_ioevent(&efd, addr, Datamatch::U32(1))
        .expect("unregister ioeventfd");
    assert!(
        g.vm.unregister_ioevent(&efd, addr, Datamatch::U32(1))
            .is_err()
    );
}

#[test]
fn pause_resume_stop_a_looping_guest() {
    if !kvm_or_skip("pause_resume_stop_a_looping_guest") {
        return;
    }
    // loop: inc qword [COUNTER_ADDR]; jmp loop
    let mut code = vec![0x48, 0xff, 0x04, 0x25];
    code.extend_from_slice(&(COUNTER_ADDR as u32).to_le_bytes());
    code.extend_from_slice(&[0xeb, 0xf6]);
    let mut g = guest(&code);
    let rec = Arc::new(Recorder::default());
    let (h, rx) = start(&mut g, &rec);
    let counter = |m: &GuestMemoryMmap<()>| m.read_obj::<u64>(GuestAddress(COUNTER_ADDR)).unwrap();
    let wait_progress = |from: u64| {
        for _ in 0..200 {
            if counter(&g.mem) > from {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("guest made no progress from {from}");
    };
    wait_progress(0);
    for _ in 0..3 {
        let state = h.pause(Duration::from_secs(5)).expect("pause");
        assert_eq!(state, VcpuState::Paused);
        assert_eq!(h.state(), VcpuState::Paused);
        let c1 = counter(&g.mem);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(counter(&g.mem), c1, "a paused vCPU ran");
        h.resume();
        wait_progress(c1);
    }
    h.stop();
    assert!(matches!(wait_event(&rx).reason, VcpuExitReason::Stopped));
    assert!(matches!(h.join(), VcpuExitReason::Stopped));
}

#[test]
fn stop_while_paused() {
    if !kvm_or_skip("stop_while_paused") {
        return;
    }
    let mut g = guest(&[0xeb, 0xfe]); // jmp $
    let rec = Arc::new(Recorder::default());
    let (h, _rx) = start(&mut g, &rec);
    assert_eq!(h.pause(Duration::from_secs(5)).unwrap(), VcpuState::Paused);
    h.stop();
    assert!(matches!(h.join(), VcpuExitReason::Stopped));
}

#[test]
fn triple_fault_is_reported() {
    if !kvm_or_skip("triple_fault_is_reported") {
        return;
    }
    // ud2 with an empty IDT: #UD -> #DF -> triple fault.
    let mut g = guest(&[0x0f, 0x0b]);
    let rec = Arc::new(Recorder::default());
    let (h, rx) = start(&mut g, &rec);
    let ev = wait_event(&rx);
    assert!(matches!(ev.reason, VcpuExitReason::TripleFault), "{ev:?}");
    h.join();
}

#[test]
fn protected_mode_entry_for_pvh() {
    if !kvm_or_skip("protected_mode_entry_for_pvh") {
        return;
    }
    // The same encodings mean the same in 32-bit mode.
    let mut code = out_bytes(SERIAL_PORT, b"P32\n");
    code.extend(poweroff());
    let mut g = guest_in(&code, EntryMode::Protected32);
    let sregs = g.vcpu.as_ref().unwrap().fd().get_sregs().unwrap();
    assert_eq!(
        (sregs.cs.db, sregs.cs.l, sregs.cr0 & 0x8000_0001),
        (1, 0, 1)
    );
    let rec = Arc::new(Recorder::default());
    let (h, rx) = start(&mut g, &rec);
    assert!(matches!(wait_event(&rx).reason, VcpuExitReason::Poweroff));
    h.join();
    assert_eq!(&*rec.serial.lock().unwrap(), b"P32\n");
}

#[test]
fn two_vcpus_topology_and_stopping_a_waiting_ap() {
    if !kvm_or_skip("two_vcpus_topology_and_stopping_a_waiting_ap") {
        return;
    }
    let mut code = out_bytes(SERIAL_PORT, b"BSP\n");
    code.extend(poweroff());
    let vm = Vm::new().unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
    vm.register_memory(&mem).unwrap();
    mem.write_slice(&code, GuestAddress(CODE_ADDR)).unwrap();
    Vcpu::write_boot_tables(&mem, EntryMode::Long64).unwrap();
    let bsp = Vcpu::new(&vm, 0, 2).unwrap();
    let ap = Vcpu::new(&vm, 1, 2).unwrap();
    assert!(Vcpu::new(&vm, 2, 2).is_err(), "index beyond nr_vcpus");
    let cpuid = ap.fd().get_cpuid2(80).unwrap();
    let leaf1 = cpuid.as_slice().iter().find(|e| e.function == 1).unwrap();
    assert_eq!(leaf1.ebx >> 24, 1, "AP's APIC id");
    assert_eq!((leaf1.ebx >> 16) & 0xff, 2, "logical CPU count");
    assert_ne!(leaf1.ecx & (1 << 31), 0, "hypervisor bit");
    let regs = VcpuInitRegs {
        rip: CODE_ADDR,
        rsp: STACK_TOP,
        ..Default::default()
    };
    bsp.configure_boot(EntryMode::Long64, &regs).unwrap();
    let rec = Arc::new(Recorder::default());
    let (tx, rx) = channel();
    let b = VcpuHandle::spawn(bsp, rec.clone(), Some(tx.clone())).unwrap();
    let a = VcpuHandle::spawn(ap, rec.clone(), Some(tx)).unwrap();
    let ev = wait_event(&rx);
    assert_eq!(ev.vcpu, 0);
    assert!(matches!(ev.reason, VcpuExitReason::Poweroff));
    // The AP never got a SIPI: it waits inside KVM_RUN until kicked.
    assert_eq!(a.state(), VcpuState::Running);
    a.stop();
    let ev = wait_event(&rx);
    assert_eq!(ev.vcpu, 1);
    assert!(matches!(ev.reason, VcpuExitReason::Stopped));
    b.join();
    a.join();
    assert_eq!(&*rec.serial.lock().unwrap(), b"BSP\n");
}

#[test]
fn msi_routes_and_irqfd() {
    if !kvm_or_skip("msi_routes_and_irqfd") {
        return;
    }
    let vm = Vm::new().unwrap();
    let base = vm.route_count();
    assert_eq!(base, 40, "legacy PIC + IOAPIC routes");
    let gsi = vm.allocate_gsi().unwrap();
    assert_eq!(gsi, 24);
    vm.set_msi_route(gsi, 0xfee0_0000, 0, 0x41).unwrap();
    vm.set_msi_route(gsi, 0xfee0_0000, 0, 0x42).unwrap();
    assert_eq!(vm.route_count(), base + 1);
    let efd = EventFd::new(EFD_NONBLOCK).unwrap();
    vm.register_irqfd(&efd, gsi).unwrap();
    efd.write(1).unwrap();
    vm.unregister_irqfd(&efd, gsi).unwrap();
    vm.remove_msi_route(gsi).unwrap();
    assert_eq!(vm.route_count(), base);
    assert!(matches!(
        vm.set_msi_route(3, 0xfee0_0000, 0, 0x41),
        Err(KvmError::Invalid(_))
    ));
    assert!(vm.remove_msi_route(5).is_err());
}

#[test]
fn missing_kvm_device_is_a_clear_error() {
    let err = vmm::kvm::open_kvm_at(c"/nonexistent/kvm").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("/nonexistent/kvm"), "{msg}");
    assert!(msg.contains("kvm group"), "{msg}");
}

/// This binary's own tests run again as `scripts/test-all` runs them, with
/// `VMM_TEST_NO_KVM=1`: each prints one `SKIP` line past libtest's capture, on a line of
/// its own with one test thread or several, and `scripts/count-tests` counts it as skipped.
#[test]
fn without_kvm_each_test_prints_one_skip_line_and_counts_as_skipped() {
    let exe = std::env::current_exe().unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/count-tests");
    let kvm_tests = ["serial_mmio_and_poweroff", "stop_while_paused"];
    for threads in ["1", "2"] {
        let mut cmd = std::process::Command::new(&exe);
        cmd.env(NO_KVM_ENV, "1")
            .env_remove("RUST_TEST_THREADS")
            .arg(format!("--test-threads={threads}"))
            .arg("--exact")
            .args(kvm_tests)
            .arg("missing_kvm_device_is_a_clear_error");
        let out = cmd.output().unwrap();
        let log = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{log}");
        let mut skips: Vec<&str> = log.lines().filter(|l| l.starts_with("SKIP ")).collect();
        skips.sort_unstable();
        assert_eq!(
            skips,
            kvm_tests.map(|t| format!("SKIP {t}: VMM_TEST_NO_KVM is set")),
            "--test-threads={threads}:\n{log}"
        );
        let path = std::env::temp_dir().join(format!(
            "kvm-smoke-skips-{}-{threads}.log",
            std::process::id()
        ));
        std::fs::write(&path, &log).unwrap();
        let counted = std::process::Command::new(&script).arg(&path).output();
        let _ = std::fs::remove_file(&path);
        let counted = String::from_utf8_lossy(&counted.unwrap().stdout).into_owned();
        assert_eq!(
            counted.lines().last(),
            Some("tests: 1 passed, 0 failed, 2 skipped"),
            "--test-threads={threads}:\n{log}\n{counted}"
        );
    }
}
