//! The xenstore ring shared with `xenstored` (`xen/io/xs_wire.h`): the page a PV domU
//! finds at `start_info.store_mfn`, the message header, and the message types a minimal
//! client speaks.
//!
//! The four indices are free-running `u32`s; a byte at stream position `i` sits at
//! `i & (XENSTORE_RING_SIZE - 1)` of its ring. Each side writes data, issues a write
//! barrier, then publishes its producer index, and notifies the store event channel.

use core::mem::{offset_of, size_of};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Size of each of the two rings.
pub const XENSTORE_RING_SIZE: u32 = 1024;
/// The most a message's payload may hold.
pub const XENSTORE_PAYLOAD_MAX: u32 = 4096;

/// `XS_READ`: payload `path\0`; the reply is the value (no NUL).
pub const XS_READ: u32 = 2;
/// `XS_WATCH`: payload `path\0token\0`; the reply is `OK\0`, then an event at once.
pub const XS_WATCH: u32 = 4;
/// `XS_UNWATCH`: payload `path\0token\0`.
pub const XS_UNWATCH: u32 = 5;
/// `XS_WRITE`: payload `path\0value` (no NUL after the value).
pub const XS_WRITE: u32 = 11;
/// `XS_RM`: payload `path\0`.
pub const XS_RM: u32 = 13;
/// `XS_WATCH_EVENT`: payload `path\0token\0`, request id 0, at any time.
pub const XS_WATCH_EVENT: u32 = 15;
/// `XS_ERROR`: payload an errno name such as `ENOENT\0`.
pub const XS_ERROR: u32 = 16;

/// `struct xenstore_domain_interface`: the store page, the fields every release has
/// (newer releases append more after `error`, which a client that does not use them
/// never touches).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct XenstoreDomainInterface {
    /// Requests (guest to xenstored).
    pub req: [u8; 1024],
    /// Replies and watch events (xenstored to guest).
    pub rsp: [u8; 1024],
    /// Request consumer index (xenstored).
    pub req_cons: u32,
    /// Request producer index (guest).
    pub req_prod: u32,
    /// Reply consumer index (guest).
    pub rsp_cons: u32,
    /// Reply producer index (xenstored).
    pub rsp_prod: u32,
    /// Features the server offers (`XENSTORE_SERVER_FEATURE_*`).
    pub server_features: u32,
    /// Connection state (`XENSTORE_CONNECTED`/`XENSTORE_RECONNECT`).
    pub connection: u32,
    /// Why the server stopped serving the ring (`XENSTORE_ERROR_*`), if it did.
    pub error: u32,
}

/// `struct xsd_sockmsg`: every message's header, followed by `len` payload bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct XsdSockmsg {
    /// The message type (`XS_*`), `type` in C.
    pub type_: u32,
    /// Echoed in the reply (0 for a watch event).
    pub req_id: u32,
    /// The transaction (0: none).
    pub tx_id: u32,
    /// Payload length.
    pub len: u32,
}

const _: () = {
    assert!(XENSTORE_RING_SIZE.is_power_of_two());
    assert!(size_of::<XenstoreDomainInterface>() == 2076);
    assert!(offset_of!(XenstoreDomainInterface, rsp) == 1024);
    assert!(offset_of!(XenstoreDomainInterface, req_cons) == 2048);
    assert!(offset_of!(XenstoreDomainInterface, rsp_prod) == 2060);
    assert!(offset_of!(XenstoreDomainInterface, error) == 2072);
    assert!(size_of::<XsdSockmsg>() == 16);
};
