//! The KVM side of the virtio-pci transport: queue notify addresses become ioeventfds,
//! MSI-X vectors become irqfds bound to MSI routes.

use std::io;
use std::sync::{Arc, Mutex};

use block::sync::{get_mut, lock};
use devices::virtio_pci::{MsiMessage, VirtioPciHost};
use vmm_sys_util::eventfd::EventFd;

use crate::kvm::{Datamatch, IoEventAddress, Vm};

/// One MSI-X vector as KVM knows it.
#[derive(Clone, Copy, Debug, Default)]
struct VectorRoute {
    /// The GSI allocated for it (on first use, kept for the VM's life).
    gsi: Option<u32>,
    /// Whether the vector's eventfd is currently an irqfd on `gsi`.
    irqfd: bool,
}

/// A [`VirtioPciHost`] for one PCI function of a KVM VM.
pub struct KvmPciHost {
    vm: Arc<Vm>,
    vectors: Mutex<Vec<VectorRoute>>,
}

impl std::fmt::Debug for KvmPciHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmPciHost").finish_non_exhaustive()
    }
}

impl KvmPciHost {
    /// A host for one function of `vm`.
    pub fn new(vm: Arc<Vm>) -> Self {
        KvmPciHost {
            vm,
            vectors: Mutex::new(Vec::new()),
        }
    }
}

impl Drop for KvmPciHost {
    /// The function is gone (hot unplug or VM teardown): its routes and GSIs go back.
    fn drop(&mut self) {
        let vectors = get_mut(&mut self.vectors);
        for gsi in vectors.iter().filter_map(|r| r.gsi) {
            if let Err(e) = self.vm.remove_msi_route(gsi) {
                tracing::warn!(gsi, error = %e, "cannot remove an MSI route");
            }
            self.vm.release_gsi(gsi);
        }
    }
}

fn to_io(e: crate::kvm::KvmError) -> io::Error {
    io::Error::other(e.to_string())
}

impl VirtioPciHost for KvmPciHost {
    fn register_notify(&self, addr: u64, _queue: u16, fd: &EventFd) -> io::Result<()> {
        // Every queue has its own notify address (multiplier 4): match any value.
        self.vm
            .register_ioevent(fd, IoEventAddress::Mmio(addr), Datamatch::Any)
            .map_err(to_io)
    }

    fn unregister_notify(&self, addr: u64, _queue: u16, fd: &EventFd) -> io::Result<()> {
        self.vm
            .unregister_ioevent(fd, IoEventAddress::Mmio(addr), Datamatch::Any)
            .map_err(to_io)
    }

    fn set_msix_vector(
        &self,
        vector: u16,
        fd: &EventFd,
        msg: Option<MsiMessage>,
    ) -> io::Result<()> {
        let mut vectors = lock(&self.vectors);
        let idx = usize::from(vector);
        if vectors.len() <= idx {
            vectors.resize(idx + 1, VectorRoute::default());
        }
        let route = &mut vectors[idx];
        match msg {
            Some(m) => {
                let gsi = match route.gsi {
                    Some(g) => g,
                    None => {
                        let g = self.vm.allocate_gsi().map_err(to_io)?;
                        route.gsi = Some(g);
                        g
                    }
                };
                // The address's two halves: dropping the other half is the point.
                #[allow(clippy::cast_possible_truncation)]
                let (lo, hi) = (m.addr as u32, (m.addr >> 32) as u32);
                self.vm.set_msi_route(gsi, lo, hi, m.data).map_err(to_io)?;
                if !route.irqfd {
                    self.vm.register_irqfd(fd, gsi).map_err(to_io)?;
                    route.irqfd = true;
                }
                tracing::debug!(
                    vector,
                    gsi,
                    addr = m.addr,
                    data = m.data,
                    "MSI-X vector routed"
                );
            }
            None => {
                if let Some(gsi) = route.gsi {
                    if route.irqfd {
                        self.vm.unregister_irqfd(fd, gsi).map_err(to_io)?;
                        route.irqfd = false;
                    }
                    self.vm.remove_msi_route(gsi).map_err(to_io)?;
                    tracing::debug!(vector, gsi, "MSI-X vector masked");
                }
            }
        }
        Ok(())
    }
}
