//! [`VirtioPciDevice`]: a virtio device behind the modern PCI transport.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

use super::common::{Action, COMMON_LEN, CommonConfig};
use super::msix::{CTRL_ENABLE, CTRL_FUNCTION_MASK, ENTRY_SIZE, Msix};
use super::{
    ActivatedQueue, NO_VECTOR, VIRTIO_PCI_DEVICE_BASE, VIRTIO_PCI_VENDOR, VIRTIO_RING_F_EVENT_IDX,
    VirtioDevice, VirtioPciError, VirtioPciHost, status,
};
use crate::pci::{
    BarInfo, BarSpec, CAP_ID_MSIX, CAP_ID_VENDOR, PciConfiguration, PciDevice, PciHeader,
};
use crate::virtio_blk::GuestMem;

/// Where each structure sits in BAR 0.
pub struct Layout;

impl Layout {
    /// Common configuration.
    pub const COMMON: u64 = 0x0000;
    /// ISR status byte.
    pub const ISR: u64 = 0x1000;
    /// Device configuration.
    pub const DEVICE: u64 = 0x2000;
    /// Notify addresses: queue `i` at `NOTIFY + 4 * i`.
    pub const NOTIFY: u64 = 0x3000;
    /// Notify address stride.
    pub const NOTIFY_MULTIPLIER: u32 = 4;
    /// MSI-X table.
    pub const MSIX_TABLE: u64 = 0x4000;
    /// MSI-X pending bits.
    pub const MSIX_PBA: u64 = 0x5000;
    /// Bytes of each region.
    pub const REGION: u64 = 0x1000;
}

/// Bytes of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
/// Most queues the layout holds (one MSI-X vector each plus config, 256 vectors).
const MAX_QUEUES: usize = 255;

const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

fn eventfd(what: &'static str) -> Result<EventFd, VirtioPciError> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map_err(|source| VirtioPciError::Io { what, source })
}

/// A queue index as the u16 virtio numbers queues by.
#[allow(clippy::cast_possible_truncation)] // i < MAX_QUEUES (255), checked in `new`
fn queue_index(i: usize) -> u16 {
    i as u16
}

// The regions lie inside the 32 KiB BAR 0 and `extra` is at most 4 bytes, so every cast
// fits its field.
#[allow(clippy::cast_possible_truncation)]
fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let mut c = vec![
        CAP_ID_VENDOR,
        0,
        (16 + extra.len()) as u8,
        cfg_type,
        0,
        0,
        0,
        0,
    ];
    c.extend_from_slice(&(offset as u32).to_le_bytes());
    c.extend_from_slice(&(length as u32).to_le_bytes());
    c.extend_from_slice(extra);
    c
}

/// A copy of the driver's queue setup (virtio-queue's `Queue` is not `Clone`).
fn copy_queue(q: &Queue, event_idx: bool) -> Result<Queue, VirtioPciError> {
    let mut c =
        Queue::new(q.max_size()).map_err(|e| VirtioPciError::Activate(format!("queue: {e}")))?;
    // Splitting an address into its halves is the point.
    #[allow(clippy::cast_possible_truncation)]
    let halves = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    c.set_size(q.size());
    let (lo, hi) = halves(q.desc_table());
    c.set_desc_table_address(lo, hi);
    let (lo, hi) = halves(q.avail_ring());
    c.set_avail_ring_address(lo, hi);
    let (lo, hi) = halves(q.used_ring());
    c.set_used_ring_address(lo, hi);
    c.set_event_idx(event_idx);
    c.set_ready(true);
    Ok(c)
}

/// A virtio device on the PCI bus (modern transport, MSI-X, BAR 0 64-bit).
pub struct VirtioPciDevice<D: VirtioDevice> {
    device: D,
    config: PciConfiguration,
    common: CommonConfig,
    msix: Msix,
    msix_cap: usize,
    host: Arc<dyn VirtioPciHost>,
    mem: GuestMem,
    kicks: Vec<EventFd>,
    isr: u8,
    /// Where the notify addresses are registered (0: nowhere).
    registered_base: u64,
    active: bool,
}

impl<D: VirtioDevice> VirtioPciDevice<D> {
    /// Wraps `device`; BAR 0 starts at `bar_addr` (0: unplaced until the guest places
    /// it) and the notify addresses are registered there.
    pub fn new(
        device: D,
        mem: GuestMem,
        host: Arc<dyn VirtioPciHost>,
        bar_addr: u64,
    ) -> Result<Self, VirtioPciError> {
        let sizes = device.queue_max_sizes();
        if sizes.is_empty() || sizes.len() > MAX_QUEUES {
            return Err(VirtioPciError::InvalidDevice(format!(
                "{} queues (1..={MAX_QUEUES} supported)",
                sizes.len()
            )));
        }
        let queues = sizes
            .iter()
            .map(|&s| Queue::new(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| VirtioPciError::InvalidDevice(format!("queue size: {e}")))?;
        let nq = queues.len();
        let num_vectors = queue_index(nq) + 1;
        let ty = device.device_type();
        let (class, subclass) = match ty {
            1 => (0x02, 0x00),
            2 => (0x01, 0x80),
            _ => (0xff, 0x00),
        };
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR,
            device_id: VIRTIO_PCI_DEVICE_BASE.wrapping_add(ty),
            revision: 1,
            class,
            subclass,
            prog_if: 0,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR,
            subsystem_id: 0x40,
        });
        // Firmware would leave memory decoding and bus mastering on.
        config.write(0x04, &[0x06]);
        config.add_bar(
            0,
            BarSpec {
                size: BAR_SIZE,
                mem64: true,
                prefetchable: false,
                addr: bar_addr,
            },
        )?;
        let mut msix = vec![CAP_ID_MSIX, 0];
        msix.extend_from_slice(&(num_vectors - 1).to_le_bytes());
        // Offsets inside the 32 KiB BAR 0 (BIR 0 in the low bits).
        #[allow(clippy::cast_possible_truncation)]
        let (table, pba) = (Layout::MSIX_TABLE as u32, Layout::MSIX_PBA as u32);
        msix.extend_from_slice(&table.to_le_bytes());
        msix.extend_from_slice(&pba.to_le_bytes());
        let msix_cap = config.add_capability(&msix, &[0, 0, 0, 0xc0])?;
        let device_len = u64::from(device.config_len()).min(Layout::REGION);
        let notify_len = nq as u64 * u64::from(Layout::NOTIFY_MULTIPLIER);
        for cap in [
            virtio_cap(CFG_COMMON, Layout::COMMON, COMMON_LEN, &[]),
            virtio_cap(CFG_ISR, Layout::ISR, 1, &[]),
            virtio_cap(CFG_DEVICE, Layout::DEVICE, device_len, &[]),
            virtio_cap(
                CFG_NOTIFY,
                Layout::NOTIFY,
                notify_len,
                &Layout::NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
        ] {
            config.add_capability(&cap, &[])?;
        }
        let kicks = (0..nq)
            .map(|_| eventfd("queue kick eventfd"))
            .collect::<Result<Vec<_>, _>>()?;
        let vector_fds = (0..num_vectors)
            .map(|_| eventfd("MSI-X vector eventfd"))
            .collect::<Result<Vec<_>, _>>()?;
        let mut dev = VirtioPciDevice {
            common: CommonConfig::new(device.features(), queues, num_vectors),
            device,
            config,
            msix: Msix::new(vector_fds, host.clone()),
            msix_cap,
            host,
            mem,
            kicks,
            isr: 0,
            registered_base: 0,
            active: false,
        };
        dev.register_notify(bar_addr);
        Ok(dev)
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device model, mutable (e.g. to take a test's workers).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device status as the driver last set it.
    pub fn status(&self) -> u8 {
        self.common.status
    }

    /// Whether the device was activated and not reset since.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The driver-accepted features.
    pub fn driver_features(&self) -> u64 {
        self.common.driver_features
    }

    /// Queue `i`'s kick eventfd (registered as the notify ioeventfd).
    pub fn kick_fd(&self, i: u16) -> Option<&EventFd> {
        self.kicks.get(usize::from(i))
    }

    /// MSI-X vector `v`'s eventfd (the irqfd).
    pub fn vector_fd(&self, v: u16) -> Option<&EventFd> {
        self.msix.fds.get(usize::from(v))
    }

    /// Guest-physical notify address of queue `i` with BAR 0 at `base`.
    pub fn notify_addr(base: u64, i: u16) -> u64 {
        base + Layout::NOTIFY + u64::from(i) * u64::from(Layout::NOTIFY_MULTIPLIER)
    }

    fn register_notify(&mut self, base: u64) {
        if self.registered_base != 0 {
            for (i, fd) in self.kicks.iter().enumerate() {
                let addr = Self::notify_addr(self.registered_base, queue_index(i));
                if let Err(e) = self.host.unregister_notify(addr, queue_index(i), fd) {
                    tracing::warn!(queue = i, addr, error = %e, "cannot unregister a notify address");
                }
            }
            self.registered_base = 0;
        }
        if base == 0 {
            return;
        }
        for (i, fd) in self.kicks.iter().enumerate() {
            let addr = Self::notify_addr(base, queue_index(i));
            if let Err(e) = self.host.register_notify(addr, queue_index(i), fd) {
                // Notifies then exit to the VMM and reach `write_bar`, which kicks too.
                tracing::warn!(queue = i, addr, error = %e, "cannot register a notify address");
            }
        }
        self.registered_base = base;
    }

    /// Takes the function off the machine (hot unplug): stops the device (its queues
    /// drain), unregisters the notify addresses and releases every MSI-X route.
    pub fn detach(&mut self) {
        self.reset();
        self.register_notify(0);
        self.msix.release_all();
    }

    /// The device configuration changed: bump the generation and interrupt the driver.
    pub fn signal_config_change(&mut self) {
        self.common.config_generation = self.common.config_generation.wrapping_add(1);
        self.isr |= 2;
        let v = self.common.config_msix_vector;
        if v != NO_VECTOR
            && let Some(fd) = self.msix.fds.get(usize::from(v))
        {
            let _ = fd.write(1);
        }
    }

    fn activate(&mut self) -> Result<(), VirtioPciError> {
        let features = self.common.driver_features;
        let event_idx = features & VIRTIO_RING_F_EVENT_IDX != 0;
        let guard = self.mem.memory();
        let mut queues = Vec::new();
        for (i, q) in self.common.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            if !q.is_valid(&*guard) {
                return Err(VirtioPciError::Activate(format!("queue {i} is invalid")));
            }
            let io = |what| move |source| VirtioPciError::Io { what, source };
            let queue = copy_queue(q, event_idx)?;
            let vector = self.common.queue_vectors[i];
            let call = match self.msix.fds.get(usize::from(vector)) {
                Some(fd) => fd.try_clone().map_err(io("cloning a vector eventfd"))?,
                None => eventfd("unrouted call eventfd")?,
            };
            queues.push(ActivatedQueue {
                index: queue_index(i),
                queue,
                kick: self.kicks[i]
                    .try_clone()
                    .map_err(io("cloning a kick eventfd"))?,
                call,
            });
        }
        drop(guard);
        self.device.activate(self.mem.clone(), features, queues)
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        self.common.reset();
        self.isr = 0;
        for fd in &self.kicks {
            let _ = fd.read();
        }
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        match self.common.write(offset, data) {
            Action::None => {}
            Action::Reset => self.reset(),
            Action::Activate => match self.activate() {
                Ok(()) => self.active = true,
                Err(e) => {
                    tracing::error!(error = %e, "virtio device activation failed");
                    self.common.status |= status::DEVICE_NEEDS_RESET;
                    self.signal_config_change();
                }
            },
        }
    }
}

impl<D: VirtioDevice> PciDevice for VirtioPciDevice<D> {
    fn read_config(&self, offset: u16, data: &mut [u8]) {
        self.config.read(u64::from(offset), data);
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.config.write(u64::from(offset), data);
        let ctrl = self.msix_cap + 2;
        let start = usize::from(offset);
        if start < ctrl + 2 && start + data.len() > ctrl {
            let control = self.config.read_u16(ctrl);
            self.msix
                .set_control(control & (CTRL_ENABLE | CTRL_FUNCTION_MASK));
        }
    }

    fn bar(&self, index: u8) -> Option<BarInfo> {
        self.config.bar(usize::from(index))
    }

    fn bar_moved(&mut self, index: u8, _old: u64, new: u64) {
        if index == 0 {
            self.register_notify(new);
        }
    }

    fn read_bar(&mut self, index: u8, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if index != 0 || data.len() > 8 {
            return;
        }
        let region = offset / Layout::REGION * Layout::REGION;
        let off = offset - region;
        if off + data.len() as u64 > Layout::REGION {
            return;
        }
        match region {
            Layout::COMMON => self.common.read(off, data),
            Layout::ISR if off == 0 && !data.is_empty() => {
                data[0] = std::mem::take(&mut self.isr);
            }
            Layout::DEVICE => self.device.read_config(off, data),
            Layout::MSIX_TABLE => self.msix.read_table(off, data),
            Layout::MSIX_PBA => self.msix.read_pba(off, data),
            _ => {}
        }
    }

    fn write_bar(&mut self, index: u8, offset: u64, data: &[u8]) {
        if index != 0 || data.len() > 8 {
            return;
        }
        let region = offset / Layout::REGION * Layout::REGION;
        let off = offset - region;
        if off + data.len() as u64 > Layout::REGION {
            return;
        }
        match region {
            Layout::COMMON => self.write_common(off, data),
            Layout::DEVICE => self.device.write_config(off, data),
            Layout::NOTIFY => {
                let q = off / u64::from(Layout::NOTIFY_MULTIPLIER);
                if let Some(fd) = usize::try_from(q).ok().and_then(|q| self.kicks.get(q)) {
                    let _ = fd.write(1);
                }
            }
            Layout::MSIX_TABLE if off < self.msix.fds.len() as u64 * ENTRY_SIZE => {
                self.msix.write_table(off, data)
            }
            _ => {}
        }
    }
}

impl<D: VirtioDevice> Drop for VirtioPciDevice<D> {
    fn drop(&mut self) {
        self.register_notify(0);
    }
}
