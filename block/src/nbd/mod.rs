//! NBD (network block device) client side, for disks whose image lives on an NBD server
//! (qemu-nbd, nbdkit, rbd-nbd, storage appliances): [`uri`] parses the NBD project's
//! URIs (`nbd://host[:port]/export`, `nbd+unix:///export?socket=PATH`), [`proto`] speaks
//! the protocol (fixed-newstyle handshake with `NBD_OPT_GO`; requests and simple replies
//! as a codec without I/O). The engine that drives a connection from an iothread builds
//! on them (ARCHITECTURE.md section 4, "NBD").

pub mod proto;
pub mod uri;

pub use proto::{ExportInfo, NbdError, handshake};
pub use uri::{NbdAddress, NbdUri, is_nbd_uri};
