//! A minimal xenstore client for a PV domU kernel: reads, writes, removals and watches
//! over the store ring, one request at a time, with no allocation.
//!
//! What a domU needs xenstore for is small: acknowledging the toolstack's suspend
//! request (`xl save`, `xl migrate`) and following `xl vcpu-set`. Both are watches:
//! the toolstack writes a node, the watch fires, the kernel reads the node and acts.
//!
//! ```ignore
//! use xenmsr::xenstore::{Client, Ring, Transport};
//!
//! /// The store's event channel; `wait` polls it (or yields) and gives up after a while.
//! struct Store { port: u32 }
//! impl Transport for Store {
//!     fn notify(&self) { let _ = hypercalls.evtchn_send(self.port); }
//!     fn wait(&self) -> bool { poll_port_or_yield(self.port) /* false once out of patience */ }
//!     fn begin(&self) { restart_the_deadline(); }
//! }
//!
//! // SAFETY: the store page (`start_info.store_mfn`, mapped at `page`), for the kernel's
//! // life, and this client is the only thing in the guest that uses it.
//! let ring = unsafe { Ring::new(page) };
//! let mut xs = Client::new(ring, Store { port: start_info.store_evtchn });
//! xs.watch("control/shutdown", "shutdown")?;
//! xs.watch("cpu", "cpu")?;
//! loop {
//!     while let Some(event) = xs.next_event() {
//!         if event.token() == "shutdown" {
//!             let mut value = [0u8; 16];
//!             match xs.read("control/shutdown", &mut value) {
//!                 Ok(n) if &value[..n] == b"suspend" => {
//!                     // Acknowledge first: the toolstack waits for the node to be cleared
//!                     // before it expects the domain to suspend.
//!                     xs.write("control/shutdown", b"")?;
//!                     if suspend() /* SCHEDOP_shutdown(SHUTDOWN_suspend) */ == RESUMED_ELSEWHERE {
//!                         // A new domain: xenstored reset the ring indices and forgot the
//!                         // watches, and the store port changed.
//!                         xs.transport_mut().port = start_info.store_evtchn;
//!                         xs.reconnect()?; // or `resume(ring)` if the page moved
//!                     }
//!                 }
//!                 Ok(_) => {}                       // "poweroff", "reboot", "" ...
//!                 Err(e) if e.is_enoent() => {}     // nothing requested
//!                 Err(e) => return Err(e),
//!             }
//!         } else if event.token() == "cpu" {
//!             // Look again at every `cpu/N/availability` ("online" or "offline").
//!         }
//!     }
//!     wait_for_the_store_port();
//! }
//! ```
//!
//! **The resume rule.** After a restore into a new domain, call [`Client::reconnect`] (or
//! [`Client::resume`] with the ring's new address) before any other call, with the
//! transport already on the new port: it forgets any partial message, takes the ring
//! indices as the new xenstored left them, and registers every remembered watch again
//! (each fires once, so the kernel looks at every watched node again). After a
//! cancelled suspend nothing needs doing, but `reconnect` is harmless: a watch the
//! server still has answers `EEXIST`, which counts as success.
//!
//! The server is not trusted. The ring page is only touched with volatile accesses, and
//! impossible indices, oversized messages, replies to requests never sent, replies of the
//! wrong type and malformed errors become [`XsError::Protocol`] (malformed watch events
//! are dropped), never a panic, a hang or an access outside the page. After a framing
//! error (bad indices, a length over 4096) the client skips everything the server has
//! produced so far, to start over on a message boundary. Every wait goes through
//! [`Transport::wait`], so a silent server becomes [`XsError::Timeout`].
//!
//! Only one request is in flight at a time. A reply that comes after its request gave up
//! (a timeout, a protocol error) is recognised by its request id and dropped. Watch
//! events arriving meanwhile are queued ([`EVENT_QUEUE_LEN`] of them; when the queue is
//! full the oldest is dropped and counted in [`Client::dropped_events`]: an event only
//! says "look again", so a kernel that sees the count move looks at all its nodes).
//!
//! [`Client::reconnect`]: crate::xenstore::Client::reconnect
//! [`Client::resume`]: crate::xenstore::Client::resume
//! [`XsError::Protocol`]: crate::xenstore::XsError::Protocol
//! [`Transport::wait`]: crate::xenstore::Transport::wait
//! [`XsError::Timeout`]: crate::xenstore::XsError::Timeout
//! [`EVENT_QUEUE_LEN`]: crate::xenstore::EVENT_QUEUE_LEN
//! [`Client::dropped_events`]: crate::xenstore::Client::dropped_events

use core::fmt;
use core::mem::{offset_of, size_of};
use core::ptr::NonNull;
use core::sync::atomic::{Ordering, fence};

/// The most a message's payload may hold (`XENSTORE_PAYLOAD_MAX`).
pub const PAYLOAD_MAX: usize = xenmsr_hypercall::abi::xenstore::XENSTORE_PAYLOAD_MAX as usize;
/// How many watches a [`Client`] remembers (and registers again on resume).
pub const MAX_WATCHES: usize = 4;
/// The longest watched path and the longest token a [`Client`] stores, in bytes; also the
/// longest event path kept whole in a [`WatchEvent`].
pub const NAME_MAX: usize = 64;
/// How many watch events a [`Client`] queues.
pub const EVENT_QUEUE_LEN: usize = 8;

// Message types (`enum xsd_sockmsg_type`) and the ring's layout come from the ABI crate,
// which checks them against Xen's headers.
use xenmsr_hypercall::abi::xenstore::{
    XS_ERROR, XS_READ, XS_RM, XS_UNWATCH, XS_WATCH, XS_WATCH_EVENT, XS_WRITE,
    XenstoreDomainInterface, XsdSockmsg,
};

/// The message header: type, request id, transaction id, payload length.
const HEADER_LEN: usize = size_of::<XsdSockmsg>();
/// The size of each of the two rings.
const RING_SIZE: u32 = xenmsr_hypercall::abi::xenstore::XENSTORE_RING_SIZE;
/// Offsets in `struct xenstore_domain_interface`.
const REQ_OFF: usize = offset_of!(XenstoreDomainInterface, req);
const RSP_OFF: usize = offset_of!(XenstoreDomainInterface, rsp);
const REQ_CONS: usize = offset_of!(XenstoreDomainInterface, req_cons);
const REQ_PROD: usize = offset_of!(XenstoreDomainInterface, req_prod);
const RSP_CONS: usize = offset_of!(XenstoreDomainInterface, rsp_cons);
const RSP_PROD: usize = offset_of!(XenstoreDomainInterface, rsp_prod);
/// The longest error name kept (`"ENOENT"`, `"EACCES"`...: all far shorter).
const ERRNO_MAX: usize = 15;
/// What finishes a request a timeout cut short (see [`Client::write`]).
const FILLER: [u8; 32] = [0xff; 32];

/// How the client reaches the server: the kernel's side of the store's event channel.
pub trait Transport {
    /// Kicks the server (`EVTCHNOP_send` on the store port). Called after every change
    /// of a ring index.
    fn notify(&self);

    /// Waits a little for the server (polls the store port, or yields) and returns
    /// whether to go on waiting: `false` when the caller's patience is exhausted, which
    /// ends the request with [`XsError::Timeout`]. A request calls it as often as it
    /// needs to, so `false` must come eventually.
    fn wait(&self) -> bool;

    /// Called when a request starts, before its first [`wait`](Self::wait): a transport
    /// whose patience is a deadline per request starts the deadline here. Does nothing
    /// by default.
    fn begin(&self) {}
}

/// The store ring page (`struct xenstore_domain_interface`).
///
/// Only [`Ring::new`], which is `unsafe`, makes one: the client stores into the page.
/// Safe code cannot point a ring at memory of its choosing:
///
/// ```compile_fail,E0451
/// fn forge() -> xenmsr::xenstore::Ring {
///     xenmsr::xenstore::Ring { page: core::ptr::NonNull::dangling() }
/// }
/// ```
///
/// ```compile_fail,E0133
/// fn forge() -> xenmsr::xenstore::Ring {
///     xenmsr::xenstore::Ring::new(core::ptr::NonNull::dangling())
/// }
/// ```
#[derive(Debug)]
pub struct Ring {
    page: NonNull<u8>,
}

// SAFETY: the page stays mapped for as long as the ring is used and nothing else in the
// guest touches it (`new`'s contract); the ring only accesses it through raw pointers
// from `&mut Client`, which is as sound on another CPU as on the one that made it.
unsafe impl Send for Ring {}

impl Ring {
    /// The store ring whose 4 KiB page is mapped at `page`.
    ///
    /// # Safety
    ///
    /// `page` must be page aligned and point to this domain's store page
    /// (`start_info.store_mfn`), mapped readable and writable for as long as the ring (or
    /// a [`Client`] holding it) is used, and nothing else in the guest may access the page
    /// meanwhile (keep one client, behind a lock if several vCPUs use it). No Rust
    /// reference may point into the page: the server writes it at any time.
    pub const unsafe fn new(page: NonNull<u8>) -> Ring {
        Ring { page }
    }

    /// The page's address.
    pub fn as_ptr(&self) -> *mut u8 {
        self.page.as_ptr()
    }

    fn load(&self, offset: usize) -> u32 {
        debug_assert!((REQ_CONS..=RSP_PROD).contains(&offset) && offset.is_multiple_of(4));
        // SAFETY: one of the page's aligned index fields (offsets fixed by this module);
        // the page is mapped (`new`'s contract) and the server may write it at any time,
        // so it is read volatile, never through a reference.
        unsafe {
            self.page
                .as_ptr()
                .wrapping_add(offset)
                .cast::<u32>()
                .read_volatile()
        }
    }

    fn store(&self, offset: usize, value: u32) {
        debug_assert!((REQ_CONS..=RSP_PROD).contains(&offset) && offset.is_multiple_of(4));
        // SAFETY: as in `load`; the guest's own index fields are written volatile.
        unsafe {
            self.page
                .as_ptr()
                .wrapping_add(offset)
                .cast::<u32>()
                .write_volatile(value)
        }
    }

    /// The response byte at free-running index `index`.
    fn rsp_byte(&self, index: u32) -> u8 {
        let offset = RSP_OFF + (index & (RING_SIZE - 1)) as usize;
        // SAFETY: a byte of the `rsp` array (index masked to its size) in the mapped page.
        unsafe { self.page.as_ptr().wrapping_add(offset).read_volatile() }
    }

    /// Stores the request byte at free-running index `index`.
    fn set_req_byte(&self, index: u32, byte: u8) {
        let offset = REQ_OFF + (index & (RING_SIZE - 1)) as usize;
        // SAFETY: a byte of the `req` array (index masked to its size) in the mapped page,
        // which the server only reads between `req_cons` and `req_prod`.
        unsafe { self.page.as_ptr().wrapping_add(offset).write_volatile(byte) }
    }
}

/// An error name xenstored answered with (`"ENOENT"`, `"EACCES"`, `"EEXIST"`...).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct XsErrno {
    text: [u8; ERRNO_MAX],
    len: u8,
}

impl XsErrno {
    /// From an `XS_ERROR` payload: an upper-case name, optionally NUL terminated.
    fn parse(payload: &[u8]) -> Option<XsErrno> {
        let name = match payload.split_last() {
            Some((0, name)) => name,
            _ => payload,
        };
        if name.is_empty()
            || name.len() > ERRNO_MAX
            || !name
                .iter()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        {
            return None;
        }
        let mut text = [0; ERRNO_MAX];
        text[..name.len()].copy_from_slice(name);
        Some(XsErrno {
            text,
            len: name.len() as u8,
        })
    }

    /// The name, as xenstored sent it.
    pub fn as_str(&self) -> &str {
        // `parse` only keeps ASCII upper-case letters and digits.
        core::str::from_utf8(&self.text[..usize::from(self.len)]).unwrap_or("")
    }

    /// Whether the name is `name` (`"EACCES"`, ...).
    pub fn is(&self, name: &str) -> bool {
        self.as_str() == name
    }

    /// Whether the node does not exist.
    pub fn is_enoent(&self) -> bool {
        self.is("ENOENT")
    }
}

impl fmt::Debug for XsErrno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for XsErrno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XsError {
    /// xenstored refused the request.
    Xenstore(XsErrno),
    /// [`Transport::wait`] ran out of patience before the request was sent or answered.
    Timeout,
    /// The request is longer than [`PAYLOAD_MAX`], a watch's path or token longer than
    /// [`NAME_MAX`], or the reply longer than the caller's buffer (the reply was consumed
    /// whole: the next request is unaffected).
    TooLong,
    /// The server broke the protocol; what it did.
    Protocol(&'static str),
    /// [`MAX_WATCHES`] watches are registered already.
    WatchTableFull,
    /// A path or token holds a NUL byte, which would change what the request means.
    Invalid(&'static str),
}

impl XsError {
    /// Whether xenstored answered `ENOENT` (no such node).
    pub fn is_enoent(&self) -> bool {
        matches!(self, XsError::Xenstore(errno) if errno.is_enoent())
    }
}

impl fmt::Display for XsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            XsError::Xenstore(errno) => write!(f, "xenstore error {errno}"),
            XsError::Timeout => write!(f, "xenstore did not answer in time"),
            XsError::TooLong => write!(f, "xenstore message too long"),
            XsError::Protocol(what) => write!(f, "xenstore protocol error: {what}"),
            XsError::WatchTableFull => write!(f, "all {MAX_WATCHES} xenstore watches in use"),
            XsError::Invalid(what) => write!(f, "invalid xenstore argument: {what}"),
        }
    }
}

/// A watch that fired: the node that changed (or the watched path itself, for the event
/// every new watch fires once) and the watch's token.
///
/// The path is kept up to [`NAME_MAX`] bytes; a longer one is cut there (at a character
/// boundary) and [`path_truncated`](Self::path_truncated) says so. Relative watches report
/// relative paths.
#[derive(Clone, Copy)]
pub struct WatchEvent {
    path: [u8; NAME_MAX],
    path_len: u8,
    token: [u8; NAME_MAX],
    token_len: u8,
    truncated: bool,
}

impl WatchEvent {
    const EMPTY: WatchEvent = WatchEvent {
        path: [0; NAME_MAX],
        path_len: 0,
        token: [0; NAME_MAX],
        token_len: 0,
        truncated: false,
    };

    /// The node that changed (maybe cut short: [`path_truncated`](Self::path_truncated)).
    pub fn path(&self) -> &str {
        // Checked to be UTF-8 when the event was queued.
        core::str::from_utf8(&self.path[..usize::from(self.path_len)]).unwrap_or("")
    }

    /// The token the watch was registered with.
    pub fn token(&self) -> &str {
        // A registered token (`&str`), compared byte for byte when the event was queued.
        core::str::from_utf8(&self.token[..usize::from(self.token_len)]).unwrap_or("")
    }

    /// Whether the path was longer than [`NAME_MAX`] bytes and [`path`](Self::path) holds
    /// its beginning only.
    pub fn path_truncated(&self) -> bool {
        self.truncated
    }
}

impl fmt::Debug for WatchEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WatchEvent")
            .field("path", &self.path())
            .field("token", &self.token())
            .field("truncated", &self.truncated)
            .finish()
    }
}

/// A remembered watch.
#[derive(Clone, Copy)]
struct Watch {
    path: [u8; NAME_MAX],
    path_len: u8,
    token: [u8; NAME_MAX],
    token_len: u8,
}

impl Watch {
    fn new(path: &str, token: &str) -> Watch {
        let mut watch = Watch {
            path: [0; NAME_MAX],
            path_len: path.len() as u8,
            token: [0; NAME_MAX],
            token_len: token.len() as u8,
        };
        watch.path[..path.len()].copy_from_slice(path.as_bytes());
        watch.token[..token.len()].copy_from_slice(token.as_bytes());
        watch
    }

    fn path(&self) -> &[u8] {
        &self.path[..usize::from(self.path_len)]
    }

    fn token(&self) -> &[u8] {
        &self.token[..usize::from(self.token_len)]
    }
}

/// Where the payload of the message being received goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sink {
    /// The reply to the request in flight: the caller's buffer.
    Reply,
    /// An `XS_ERROR` reply to the request in flight.
    Error,
    /// A watch event.
    Event,
    /// Nowhere (a stale reply, or the rest of a message already judged).
    Discard,
}

/// The message being received, which may arrive in pieces.
struct Rx {
    header: [u8; HEADER_LEN],
    /// Header bytes received; the payload follows once it is [`HEADER_LEN`].
    header_len: usize,
    sink: Sink,
    /// The payload's length and how much of it was received.
    len: usize,
    got: usize,
    /// The `XS_ERROR` payload's first bytes.
    error: [u8; ERRNO_MAX + 1],
    /// The event being assembled, which field the payload is in (0 path, 1 token, 2
    /// past both), and whether the token outgrew [`NAME_MAX`] (so is no token of ours).
    event: WatchEvent,
    field: u8,
    path_full: usize,
    bad_token: bool,
}

impl Rx {
    const fn new() -> Rx {
        Rx {
            header: [0; HEADER_LEN],
            header_len: 0,
            sink: Sink::Discard,
            len: 0,
            got: 0,
            error: [0; ERRNO_MAX + 1],
            event: WatchEvent::EMPTY,
            field: 0,
            path_full: 0,
            bad_token: false,
        }
    }

    fn header_word(&self, index: usize) -> u32 {
        let at = index * 4;
        u32::from_le_bytes([
            self.header[at],
            self.header[at + 1],
            self.header[at + 2],
            self.header[at + 3],
        ])
    }
}

/// What one received byte led to.
enum Took {
    /// Nothing yet.
    More,
    /// The request in flight is answered: the reply's full length (which may exceed the
    /// caller's buffer), or its error.
    Done(Result<usize, XsError>),
    /// The stream cannot be framed any more.
    Broken(&'static str),
}

/// A xenstore connection: the ring, the transport, the remembered watches and the queued
/// watch events.
///
/// Keep one per domain (the ring has one reader); it is a few KiB, so a kernel keeps it
/// in a static (behind a lock), not on a small stack.
pub struct Client<T> {
    ring: Ring,
    transport: T,
    /// The guest's own indices (the copies in the page are written from these, never
    /// read back: the server could change them).
    req_prod: u32,
    rsp_cons: u32,
    /// The id the next request gets (never 0, which events carry).
    next_id: u32,
    /// The request in flight, and its type.
    pending: Option<u32>,
    pending_type: u32,
    /// Bytes of a request a timeout cut short, still owed to the server.
    tx_owed: usize,
    rx: Rx,
    watches: [Option<Watch>; MAX_WATCHES],
    events: [WatchEvent; EVENT_QUEUE_LEN],
    event_head: usize,
    event_count: usize,
    dropped_events: u64,
}

impl<T> fmt::Debug for Client<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("ring", &self.ring)
            .field("req_prod", &self.req_prod)
            .field("rsp_cons", &self.rsp_cons)
            .field("pending", &self.pending)
            .field("watches", &self.watches.iter().flatten().count())
            .field("queued_events", &self.event_count)
            .field("dropped_events", &self.dropped_events)
            .finish_non_exhaustive()
    }
}

impl<T: Transport> Client<T> {
    /// A client on `ring`, taking the ring's indices as they are now.
    pub fn new(ring: Ring, transport: T) -> Client<T> {
        let mut client = Client {
            ring,
            transport,
            req_prod: 0,
            rsp_cons: 0,
            next_id: 1,
            pending: None,
            pending_type: 0,
            tx_owed: 0,
            rx: Rx::new(),
            watches: [None; MAX_WATCHES],
            events: [WatchEvent::EMPTY; EVENT_QUEUE_LEN],
            event_head: 0,
            event_count: 0,
            dropped_events: 0,
        };
        client.take_indices();
        client
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// The transport, to change it in place (a new store port after a restore).
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    /// The ring.
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// Reads the node at `path` (relative to the domain's home unless it starts with
    /// `/`) into `buf`, and returns the value's length. A value longer than `buf` is
    /// [`XsError::TooLong`].
    pub fn read(&mut self, path: &str, buf: &mut [u8]) -> Result<usize, XsError> {
        check_name(path)?;
        self.transact(XS_READ, &[path.as_bytes(), b"\0"], buf)
    }

    /// Writes `value` to the node at `path`, creating it if needed.
    ///
    /// A value long enough to make the message bigger than the ring (1 KiB) may be cut
    /// short by a [`XsError::Timeout`]; the rest of that message is then sent as `0xff`
    /// bytes before the next request, so the node's value is undefined (as it is after
    /// any timeout: the write may or may not have happened).
    pub fn write(&mut self, path: &str, value: &[u8]) -> Result<(), XsError> {
        check_name(path)?;
        self.transact_ok(XS_WRITE, &[path.as_bytes(), b"\0", value])
    }

    /// Removes the node at `path` and everything under it.
    pub fn rm(&mut self, path: &str) -> Result<(), XsError> {
        check_name(path)?;
        self.transact_ok(XS_RM, &[path.as_bytes(), b"\0"])
    }

    /// Watches `path` and everything under it; events carry `token`. The watch fires
    /// once at once, and is remembered for [`reconnect`](Self::reconnect). A watch the
    /// server has already (`EEXIST`) counts as success.
    ///
    /// `path` and `token` are at most [`NAME_MAX`] bytes; [`MAX_WATCHES`] watches fit.
    pub fn watch(&mut self, path: &str, token: &str) -> Result<(), XsError> {
        check_name(path)?;
        check_name(token)?;
        if path.len() > NAME_MAX || token.len() > NAME_MAX {
            return Err(XsError::TooLong);
        }
        let watch = Watch::new(path, token);
        let slot = match self.find_watch(path, token) {
            Some(_) => None,
            None => {
                // Remembered before the request, so that the event the watch fires is
                // kept even if it comes before the reply.
                let free = self.watches.iter().position(Option::is_none);
                let slot = free.ok_or(XsError::WatchTableFull)?;
                self.watches[slot] = Some(watch);
                Some(slot)
            }
        };
        let result = self.register(&watch);
        if let (Err(_), Some(slot)) = (result, slot) {
            self.watches[slot] = None;
        }
        result
    }

    /// Stops the watch of `path` with `token`, forgets it and drops its queued events.
    pub fn unwatch(&mut self, path: &str, token: &str) -> Result<(), XsError> {
        check_name(path)?;
        check_name(token)?;
        if let Some(slot) = self.find_watch(path, token) {
            self.watches[slot] = None;
            // Another watch may share the token; its events stay.
            if !self.token_known(token.as_bytes()) {
                self.purge_events(token.as_bytes());
            }
        }
        self.transact_ok(
            XS_UNWATCH,
            &[path.as_bytes(), b"\0", token.as_bytes(), b"\0"],
        )
    }

    /// The oldest queued watch event, after taking in whatever the server sent. Never
    /// waits.
    ///
    /// Only events whose token belongs to a remembered watch are queued; the others
    /// (after [`unwatch`](Self::unwatch), or malformed) are dropped and counted in
    /// [`dropped_events`](Self::dropped_events).
    pub fn next_event(&mut self) -> Option<WatchEvent> {
        // No request is in flight, so a pass ends early only at a reply to nothing (an
        // error to ignore) or a broken stream (resynchronised inside); a few passes take
        // in what follows.
        for _ in 0..4 {
            if let Ok(None) = self.pump(&mut []) {
                break;
            }
        }
        if self.event_count == 0 {
            return None;
        }
        let event = self.events[self.event_head];
        self.event_head = (self.event_head + 1) % EVENT_QUEUE_LEN;
        self.event_count -= 1;
        Some(event)
    }

    /// How many watch events were dropped: the queue was full (the oldest goes), or the
    /// event was malformed or for no remembered watch.
    pub fn dropped_events(&self) -> u64 {
        self.dropped_events
    }

    /// After a restore with the store page at a new address: [`reconnect`](Self::reconnect)
    /// on `ring`.
    pub fn resume(&mut self, ring: Ring) -> Result<(), XsError> {
        self.ring = ring;
        self.reconnect()
    }

    /// After a restore: forgets any partial message, takes the ring's indices as they
    /// are now, and registers every remembered watch again (each fires once). Change the
    /// transport first if the port changed ([`transport_mut`](Self::transport_mut)).
    /// Queued events stay. Returns the first error, after trying every watch.
    pub fn reconnect(&mut self) -> Result<(), XsError> {
        self.take_indices();
        let mut result = Ok(());
        for slot in 0..MAX_WATCHES {
            if let Some(watch) = self.watches[slot] {
                let registered = self.register(&watch);
                if result.is_ok() {
                    result = registered;
                }
            }
        }
        result
    }

    /// Starts over on the ring as it is now.
    fn take_indices(&mut self) {
        self.req_prod = self.ring.load(REQ_PROD);
        self.rsp_cons = self.ring.load(RSP_CONS);
        self.rx = Rx::new();
        self.pending = None;
        self.tx_owed = 0;
    }

    /// Sends `XS_WATCH` for `watch`; `EEXIST` counts as success.
    fn register(&mut self, watch: &Watch) -> Result<(), XsError> {
        match self.transact_ok(XS_WATCH, &[watch.path(), b"\0", watch.token(), b"\0"]) {
            Err(XsError::Xenstore(errno)) if errno.is("EEXIST") => Ok(()),
            other => other,
        }
    }

    fn find_watch(&self, path: &str, token: &str) -> Option<usize> {
        self.watches.iter().position(|w| {
            w.is_some_and(|w| w.path() == path.as_bytes() && w.token() == token.as_bytes())
        })
    }

    fn token_known(&self, token: &[u8]) -> bool {
        self.watches
            .iter()
            .any(|w| w.is_some_and(|w| w.token() == token))
    }

    /// Drops the queued events with `token`.
    fn purge_events(&mut self, token: &[u8]) {
        let mut kept = 0;
        for i in 0..self.event_count {
            let event = self.events[(self.event_head + i) % EVENT_QUEUE_LEN];
            if &event.token[..usize::from(event.token_len)] != token {
                self.events[(self.event_head + kept) % EVENT_QUEUE_LEN] = event;
                kept += 1;
            }
        }
        self.event_count = kept;
    }

    /// A request whose reply must be `OK`.
    fn transact_ok(&mut self, ty: u32, parts: &[&[u8]]) -> Result<(), XsError> {
        // A request too long is the caller's `TooLong`, not the server's fault.
        request_len(parts)?;
        let mut ack = [0u8; 3];
        match self.transact(ty, parts, &mut ack) {
            Ok(n) if &ack[..n] == b"OK\0" || &ack[..n] == b"OK" => Ok(()),
            Ok(_) | Err(XsError::TooLong) => Err(XsError::Protocol("the reply is not OK")),
            Err(error) => Err(error),
        }
    }

    /// Sends a request whose payload is `parts` and waits for its reply, whose payload
    /// goes to `out`.
    fn transact(&mut self, ty: u32, parts: &[&[u8]], out: &mut [u8]) -> Result<usize, XsError> {
        let len = request_len(parts)?;
        self.transport.begin();
        let id = self.next_id;
        self.next_id = match id.wrapping_add(1) {
            0 => 1,
            next => next,
        };
        self.send(ty, id, parts, len)?;
        self.pending = Some(id);
        self.pending_type = ty;
        loop {
            match self.pump(out) {
                Ok(Some(n)) if n > out.len() => return Err(XsError::TooLong),
                Ok(Some(n)) => return Ok(n),
                Ok(None) => {}
                Err(error) => return Err(error),
            }
            if !self.transport.wait() {
                self.abandon();
                return Err(XsError::Timeout);
            }
        }
    }

    /// Gives up on the request in flight: its reply, whenever it comes, is dropped.
    fn abandon(&mut self) {
        self.pending = None;
        if matches!(self.rx.sink, Sink::Reply | Sink::Error) {
            self.rx.sink = Sink::Discard;
        }
    }

    /// Writes one request (after the rest of one a timeout cut short) and publishes it.
    fn send(&mut self, ty: u32, id: u32, parts: &[&[u8]], len: usize) -> Result<(), XsError> {
        while self.tx_owed > 0 {
            let n = self.tx_owed.min(FILLER.len());
            self.put(&FILLER[..n])?;
        }
        let total = HEADER_LEN + len;
        // A message that fits the ring goes in whole or not at all.
        self.wait_for_room(total.min(RING_SIZE as usize))?;
        self.tx_owed = total;
        let mut header = [0u8; HEADER_LEN];
        for (i, word) in [ty, id, 0, len as u32].into_iter().enumerate() {
            header[i * 4..i * 4 + 4].copy_from_slice(&word.to_le_bytes());
        }
        self.put(&header)?;
        for part in parts {
            self.put(part)?;
        }
        self.publish();
        Ok(())
    }

    /// Free bytes in the request ring.
    fn room(&self) -> Result<usize, XsError> {
        let cons = self.ring.load(REQ_CONS);
        let used = self.req_prod.wrapping_sub(cons);
        if used > RING_SIZE {
            return Err(XsError::Protocol(
                "req_cons is not within a ring of req_prod",
            ));
        }
        // The slots are rewritten only after the server's consumer index was read.
        fence(Ordering::SeqCst);
        Ok((RING_SIZE - used) as usize)
    }

    /// Waits until the request ring has `need` free bytes, taking in responses meanwhile.
    fn wait_for_room(&mut self, need: usize) -> Result<(), XsError> {
        while self.room()? < need {
            self.waiting()?;
        }
        Ok(())
    }

    /// One wait while sending: responses (events, stale replies) are taken in, so the
    /// server never waits for us.
    fn waiting(&mut self) -> Result<(), XsError> {
        // No request is in flight: a broken stream was resynchronised inside.
        let _ = self.pump(&mut []);
        if self.transport.wait() {
            Ok(())
        } else {
            Err(XsError::Timeout)
        }
    }

    /// Writes `bytes` of the current request, publishing and waiting when the ring is full.
    fn put(&mut self, mut bytes: &[u8]) -> Result<(), XsError> {
        while !bytes.is_empty() {
            let room = self.room()?;
            if room == 0 {
                self.publish();
                self.waiting()?;
                continue;
            }
            let n = room.min(bytes.len());
            for &byte in &bytes[..n] {
                self.ring.set_req_byte(self.req_prod, byte);
                self.req_prod = self.req_prod.wrapping_add(1);
            }
            self.tx_owed -= n;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    /// Makes the request bytes written so far visible, and kicks the server.
    fn publish(&mut self) {
        fence(Ordering::Release);
        self.ring.store(REQ_PROD, self.req_prod);
        self.transport.notify();
    }

    /// Takes in what the response ring holds, up to the end of the reply to the request
    /// in flight: `Some(length)` then (its payload went to `out`, as much as fits).
    fn pump(&mut self, out: &mut [u8]) -> Result<Option<usize>, XsError> {
        let prod = self.ring.load(RSP_PROD);
        let available = prod.wrapping_sub(self.rsp_cons);
        if available > RING_SIZE {
            return Err(self.resync(prod, "rsp_prod is more than a ring ahead of rsp_cons"));
        }
        if available == 0 {
            return Ok(None);
        }
        fence(Ordering::Acquire);
        let mut result = Ok(None);
        while self.rsp_cons != prod {
            let byte = self.ring.rsp_byte(self.rsp_cons);
            self.rsp_cons = self.rsp_cons.wrapping_add(1);
            match self.take(byte, out) {
                Took::More => {}
                Took::Done(done) => {
                    result = done.map(Some);
                    break;
                }
                Took::Broken(what) => return Err(self.resync(prod, what)),
            }
        }
        self.release_rsp();
        result
    }

    /// Hands the consumed response bytes back to the server.
    fn release_rsp(&mut self) {
        fence(Ordering::SeqCst);
        self.ring.store(RSP_CONS, self.rsp_cons);
        self.transport.notify();
    }

    /// The stream cannot be trusted: skip everything produced up to `prod`, drop the
    /// partial message and the request in flight.
    fn resync(&mut self, prod: u32, what: &'static str) -> XsError {
        self.rsp_cons = prod;
        self.rx = Rx::new();
        self.pending = None;
        self.release_rsp();
        XsError::Protocol(what)
    }

    /// Takes one response byte.
    fn take(&mut self, byte: u8, out: &mut [u8]) -> Took {
        let rx = &mut self.rx;
        if rx.header_len < HEADER_LEN {
            rx.header[rx.header_len] = byte;
            rx.header_len += 1;
            if rx.header_len < HEADER_LEN {
                return Took::More;
            }
            return self.start_message();
        }
        let at = rx.got;
        rx.got += 1;
        match rx.sink {
            Sink::Reply => {
                if let Some(slot) = out.get_mut(at) {
                    *slot = byte;
                }
            }
            Sink::Error => {
                if let Some(slot) = rx.error.get_mut(at) {
                    *slot = byte;
                }
            }
            Sink::Event => event_byte(rx, byte),
            Sink::Discard => {}
        }
        if rx.got == rx.len {
            self.finish_message()
        } else {
            Took::More
        }
    }

    /// The header is complete: decide where the payload goes.
    fn start_message(&mut self) -> Took {
        let ty = self.rx.header_word(0);
        let id = self.rx.header_word(1);
        let len = self.rx.header_word(3) as usize;
        if len > PAYLOAD_MAX {
            return Took::Broken("a message longer than 4096 bytes");
        }
        self.rx.len = len;
        self.rx.got = 0;
        let mut early = None;
        self.rx.sink = if ty == XS_WATCH_EVENT {
            self.rx.event = WatchEvent::EMPTY;
            self.rx.field = 0;
            self.rx.path_full = 0;
            self.rx.bad_token = false;
            Sink::Event
        } else if self.pending == Some(id) {
            if ty == XS_ERROR {
                Sink::Error
            } else if ty == self.pending_type {
                Sink::Reply
            } else {
                self.pending = None;
                early = Some(XsError::Protocol(
                    "a reply of another type than the request",
                ));
                Sink::Discard
            }
        } else if self.next_id.wrapping_sub(id).wrapping_sub(1) < 0x8000_0000 && id != 0 {
            // A reply to an earlier request that gave up: dropped.
            Sink::Discard
        } else {
            self.pending = None;
            early = Some(XsError::Protocol("a reply to a request never sent"));
            Sink::Discard
        };
        let finished = if len == 0 {
            self.finish_message()
        } else {
            Took::More
        };
        match early {
            Some(error) => Took::Done(Err(error)),
            None => finished,
        }
    }

    /// The payload is complete.
    fn finish_message(&mut self) -> Took {
        self.rx.header_len = 0;
        match self.rx.sink {
            Sink::Reply => {
                self.pending = None;
                Took::Done(Ok(self.rx.len))
            }
            Sink::Error => {
                self.pending = None;
                let len = self.rx.len;
                let error = match self.rx.error.get(..len).and_then(XsErrno::parse) {
                    Some(errno) => XsError::Xenstore(errno),
                    None => XsError::Protocol("a malformed error reply"),
                };
                Took::Done(Err(error))
            }
            Sink::Event => {
                self.finish_event();
                Took::More
            }
            Sink::Discard => Took::More,
        }
    }

    /// Queues the assembled event, if it is whole and for a remembered watch.
    fn finish_event(&mut self) {
        let rx = &mut self.rx;
        let mut event = rx.event;
        let whole = rx.field == 2 && !rx.bad_token;
        let path_ok = match core::str::from_utf8(&event.path[..usize::from(event.path_len)]) {
            Ok(_) => true,
            // Cut inside a character: keep the characters before it.
            Err(e) if event.truncated && e.error_len().is_none() => {
                event.path_len = e.valid_up_to() as u8;
                true
            }
            Err(_) => false,
        };
        let token = &event.token[..usize::from(event.token_len)];
        if !whole || !path_ok || !self.token_known(token) {
            self.dropped_events += 1;
            return;
        }
        if self.event_count == EVENT_QUEUE_LEN {
            self.event_head = (self.event_head + 1) % EVENT_QUEUE_LEN;
            self.event_count -= 1;
            self.dropped_events += 1;
        }
        self.events[(self.event_head + self.event_count) % EVENT_QUEUE_LEN] = event;
        self.event_count += 1;
    }
}

/// One byte of an `XS_WATCH_EVENT` payload (`path\0token\0`).
fn event_byte(rx: &mut Rx, byte: u8) {
    match (rx.field, byte) {
        (0 | 1, 0) => rx.field += 1,
        (0, _) => {
            if rx.path_full < NAME_MAX {
                rx.event.path[rx.path_full] = byte;
                rx.path_full += 1;
                rx.event.path_len = rx.path_full as u8;
            } else {
                rx.event.truncated = true;
            }
        }
        (1, _) => {
            let len = usize::from(rx.event.token_len);
            if len < NAME_MAX {
                rx.event.token[len] = byte;
                rx.event.token_len += 1;
            } else {
                rx.bad_token = true;
            }
        }
        _ => {}
    }
}

/// The payload length of a request made of `parts`, if it is allowed.
fn request_len(parts: &[&[u8]]) -> Result<usize, XsError> {
    let len: usize = parts.iter().map(|part| part.len()).sum();
    if len > PAYLOAD_MAX {
        Err(XsError::TooLong)
    } else {
        Ok(len)
    }
}

/// A path or token must not hold a NUL, which ends it on the wire.
fn check_name(name: &str) -> Result<(), XsError> {
    if name.as_bytes().contains(&0) {
        Err(XsError::Invalid("a NUL byte in a path or token"))
    } else {
        Ok(())
    }
}
