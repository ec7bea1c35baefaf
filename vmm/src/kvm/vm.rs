//! The KVM VM: memory slots, in-kernel irqchip and PIT, ioeventfds, irqfds and the GSI
//! routing table (legacy IOAPIC/PIC routes plus MSI routes).

use std::collections::BTreeMap;
use std::sync::Mutex;

use block::sync::lock;
use kvm_bindings::{
    CpuId, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
    KvmIrqRouting, kvm_irq_routing_entry, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{KvmError, Result, ioctl_err, open_kvm};

/// Guest physical address of the 3-page TSS region KVM needs on Intel (below 4 GiB, in the
/// hole reserved right under the 4 GiB boundary, as QEMU and Cloud Hypervisor do).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Guest physical address of the one-page EPT identity map KVM needs on Intel.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// Number of IOAPIC pins, i.e. legacy GSIs 0..24. MSI GSIs start here.
pub const IOAPIC_PINS: u32 = 24;
/// Highest number of routing entries KVM accepts.
#[allow(clippy::cast_possible_truncation)] // 4096
pub const MAX_IRQ_ROUTES: u32 = kvm_bindings::KVM_MAX_IRQ_ROUTES as u32;

/// What written value an ioeventfd matches; its width is the access length it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datamatch {
    /// Any value, any length.
    Any,
    /// A 1-byte write of this value.
    U8(u8),
    /// A 2-byte write of this value (virtio-pci queue notify).
    U16(u16),
    /// A 4-byte write of this value.
    U32(u32),
    /// An 8-byte write of this value.
    U64(u64),
}

/// One KVM VM with an in-kernel IOAPIC/PIC/LAPIC and PIT.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    supported_cpuid: CpuId,
    legacy_routes: Vec<kvm_irq_routing_entry>,
    msi_routes: Mutex<BTreeMap<u32, kvm_irq_routing_entry>>,
    next_gsi: Mutex<u32>,
    free_gsis: Mutex<Vec<u32>>,
    next_slot: Mutex<u32>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").finish_non_exhaustive()
    }
}

impl Vm {
    /// Opens `/dev/kvm` (checking every required capability) and creates a VM with its TSS
    /// and identity-map addresses, an in-kernel irqchip, a PIT and the legacy GSI routes.
    pub fn new() -> Result<Self> {
        Self::with_kvm(open_kvm()?)
    }

    /// Same as [`Vm::new`] on an already opened and checked `Kvm`.
    pub fn with_kvm(kvm: Kvm) -> Result<Self> {
        let fd = kvm.create_vm().map_err(ioctl_err("KVM_CREATE_VM"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(ioctl_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        #[allow(clippy::cast_possible_truncation)] // below 4 GiB
        let tss = KVM_TSS_ADDRESS as usize;
        fd.set_tss_address(tss)
            .map_err(ioctl_err("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip()
            .map_err(ioctl_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(ioctl_err("KVM_CREATE_PIT2"))?;
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl_err("KVM_GET_SUPPORTED_CPUID"))?;
        let vm = Vm {
            kvm,
            fd,
            supported_cpuid,
            legacy_routes: legacy_routes(),
            msi_routes: Mutex::new(BTreeMap::new()),
            next_gsi: Mutex::new(IOAPIC_PINS),
            free_gsis: Mutex::new(Vec::new()),
            next_slot: Mutex::new(0),
        };
        vm.commit_routes(&vm.lock_routes())?;
        Ok(vm)
    }

    /// The `/dev/kvm` handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM file descriptor, for ioctls this type does not wrap.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// KVM's supported CPUID set (read once at creation).
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// Registers every region of `mem` as a KVM memory slot (slots numbered in order of
    /// registration). The mappings must outlive the VM: keep `mem` alive as long as it.
    pub fn register_memory(&self, mem: &GuestMemoryMmap<()>) -> Result<()> {
        let mut next_slot = lock(&self.next_slot);
        for region in mem.iter() {
            let slot = *next_slot;
            if slot as usize >= self.kvm.get_nr_memslots() {
                return Err(KvmError::Invalid(format!(
                    "out of KVM memory slots ({slot})"
                )));
            }
            let desc = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the host range is a live mmap owned by `mem` of exactly
            // `memory_size` bytes; the caller keeps `mem` alive for the VM's lifetime.
            unsafe { self.fd.set_user_memory_region(desc) }
                .map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION"))?;
            tracing::debug!(
                slot,
                gpa = desc.guest_phys_addr,
                size = desc.memory_size,
                "memory slot registered"
            );
            *next_slot += 1;
        }
        Ok(())
    }

    /// Makes KVM signal `fd` when the guest writes at `addr` (matching `datamatch`), without
    /// an exit to userspace.
    pub fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Datamatch,
    ) -> Result<()> {
        let op = "KVM_IOEVENTFD (assign)";
        let f = &self.fd;
        match datamatch {
            Datamatch::Any => f.register_ioevent(fd, &addr, NoDatamatch),
            Datamatch::U8(v) => f.register_ioevent(fd, &addr, v),
            Datamatch::U16(v) => f.register_ioevent(fd, &addr, v),
            Datamatch::U32(v) => f.register_ioevent(fd, &addr, v),
            Datamatch::U64(v) => f.register_ioevent(fd, &addr, v),
        }
        .map_err(ioctl_err(op))
    }

    /// Removes an ioeventfd registered with the same arguments.
    pub fn unregister_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Datamatch,
    ) -> Result<()> {
        let op = "KVM_IOEVENTFD (deassign)";
        let f = &self.fd;
        match datamatch {
            Datamatch::Any => f.unregister_ioevent(fd, &addr, NoDatamatch),
            Datamatch::U8(v) => f.unregister_ioevent(fd, &addr, v),
            Datamatch::U16(v) => f.unregister_ioevent(fd, &addr, v),
            Datamatch::U32(v) => f.unregister_ioevent(fd, &addr, v),
            Datamatch::U64(v) => f.unregister_ioevent(fd, &addr, v),
        }
        .map_err(ioctl_err(op))
    }

    /// Makes a write to `fd` inject the interrupt routed at `gsi`.
    pub fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(fd, gsi)
            .map_err(ioctl_err("KVM_IRQFD (assign)"))
    }

    /// Detaches `fd` from `gsi`.
    pub fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .unregister_irqfd(fd, gsi)
            .map_err(ioctl_err("KVM_IRQFD (deassign)"))
    }

    /// Raises or lowers a legacy interrupt line (IOAPIC pin / PIC input).
    pub fn set_irq_line(&self, irq: u32, active: bool) -> Result<()> {
        self.fd
            .set_irq_line(irq, active)
            .map_err(ioctl_err("KVM_IRQ_LINE"))
    }

    /// Hands out the next free GSI above the IOAPIC pins, for an MSI route.
    pub fn allocate_gsi(&self) -> Result<u32> {
        if let Some(g) = lock(&self.free_gsis).pop() {
            return Ok(g);
        }
        let mut next = lock(&self.next_gsi);
        if *next >= MAX_IRQ_ROUTES {
            return Err(KvmError::Invalid("out of GSIs".into()));
        }
        let gsi = *next;
        *next += 1;
        Ok(gsi)
    }

    /// Gives back a GSI from [`Vm::allocate_gsi`] (its route already removed), e.g. when
    /// a device is unplugged, so hot plug cycles do not run out of GSIs.
    pub fn release_gsi(&self, gsi: u32) {
        if (IOAPIC_PINS..MAX_IRQ_ROUTES).contains(&gsi) {
            let mut free = lock(&self.free_gsis);
            if !free.contains(&gsi) {
                free.push(gsi);
            }
        }
    }

    /// Routes `gsi` to the MSI message (`addr_hi:addr_lo`, `data`) and commits the whole
    /// routing table (legacy routes kept) with `KVM_SET_GSI_ROUTING`.
    pub fn set_msi_route(&self, gsi: u32, addr_lo: u32, addr_hi: u32, data: u32) -> Result<()> {
        if !(IOAPIC_PINS..MAX_IRQ_ROUTES).contains(&gsi) {
            return Err(KvmError::Invalid(format!("MSI GSI {gsi} out of range")));
        }
        let mut entry = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        entry.u.msi.address_lo = addr_lo;
        entry.u.msi.address_hi = addr_hi;
        entry.u.msi.data = data;
        let mut routes = self.lock_routes();
        let old = routes.insert(gsi, entry);
        if let Err(e) = self.commit_routes(&routes) {
            match old {
                Some(o) => routes.insert(gsi, o),
                None => routes.remove(&gsi),
            };
            return Err(e);
        }
        Ok(())
    }

    /// Removes the MSI route of `gsi` (a masked or disabled vector) and commits the table.
    pub fn remove_msi_route(&self, gsi: u32) -> Result<()> {
        if gsi < IOAPIC_PINS {
            return Err(KvmError::Invalid(format!("GSI {gsi} is a legacy route")));
        }
        let mut routes = self.lock_routes();
        if routes.remove(&gsi).is_some() {
            self.commit_routes(&routes)?;
        }
        Ok(())
    }

    /// Number of entries in the routing table (legacy routes included).
    pub fn route_count(&self) -> usize {
        self.legacy_routes.len() + self.lock_routes().len()
    }

    fn lock_routes(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, kvm_irq_routing_entry>> {
        lock(&self.msi_routes)
    }

    fn commit_routes(&self, routes: &BTreeMap<u32, kvm_irq_routing_entry>) -> Result<()> {
        let mut entries = self.legacy_routes.clone();
        entries.extend(routes.values().copied());
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| KvmError::Invalid(format!("routing table: {e:?}")))?;
        self.fd
            .set_gsi_routing(&table)
            .map_err(ioctl_err("KVM_SET_GSI_ROUTING"))
    }
}

/// KVM's default routes (`kvm_setup_default_irq_routing`): GSIs 0..16 to the PIC and the
/// IOAPIC, 16..24 to the IOAPIC only. `KVM_SET_GSI_ROUTING` replaces the whole table, so
/// these are sent with every commit.
fn legacy_routes() -> Vec<kvm_irq_routing_entry> {
    let entry = |gsi: u32, chip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        e
    };
    let mut v = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        if gsi < 8 {
            v.push(entry(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
        } else if gsi < 16 {
            v.push(entry(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
        }
        v.push(entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    v
}
