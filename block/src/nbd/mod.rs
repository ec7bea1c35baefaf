//! NBD (network block device) client side, for disks whose image lives on an NBD server
//! (qemu-nbd, nbdkit, rbd-nbd, storage appliances): [`uri`] parses the NBD project's
//! URIs (`nbd://host[:port]/export`, `nbd+unix:///export?socket=PATH`), [`proto`] speaks
//! the protocol (fixed-newstyle handshake with `NBD_OPT_GO`; requests and simple replies
//! as a codec without I/O), [`stream`] connects and moves bytes, [`parts`] turns engine
//! ops into requests, [`conn`] drives one connection with a sender and a receiver thread
//! (reconnecting when it breaks), and [`client`] opens a disk's connections. The engine
//! the iothread uses is [`crate::engine::nbd`] (docs/architecture.md).

pub mod client;
pub mod conn;
pub mod parts;
pub mod proto;
mod send;
pub mod stream;
pub mod uri;

pub use client::{NbdClient, NbdLinkState, NbdOpenError, NbdOptions, NbdStatus};
pub use proto::{ExportInfo, NbdError, handshake};
pub use uri::{NbdAddress, NbdUri, is_nbd_uri};
