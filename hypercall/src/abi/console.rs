//! The PV console ring shared with `xenconsoled` (`struct xencons_interface`).

use core::mem::{offset_of, size_of};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

/// The console ring page (`struct xencons_interface`, 3088 bytes).
///
/// Xen 4.19 appended a `uint8_t connection` byte (the backend's "serviced" flag, whose
/// reset value 0 means connected); this struct is the part every release shares, so it
/// ends where that byte starts. The layout test checks that against both Debian's 4.17
/// headers and 4.22.0's.
///
/// The indices are free-running `u32`s; the position in a ring is the index masked by the
/// ring's size (a power of two). The producer writes data, issues a write barrier, then
/// publishes its index, and notifies the console event channel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct XenconsInterface {
    /// Input ring (console to guest), `in` in C.
    pub in_: [u8; 1024],
    /// Output ring (guest to console).
    pub out: [u8; 2048],
    /// Input consumer index (guest).
    pub in_cons: u32,
    /// Input producer index (console daemon).
    pub in_prod: u32,
    /// Output consumer index (console daemon).
    pub out_cons: u32,
    /// Output producer index (guest).
    pub out_prod: u32,
}

impl XenconsInterface {
    /// Size of the input ring.
    pub const IN_SIZE: u32 = 1024;
    /// Size of the output ring.
    pub const OUT_SIZE: u32 = 2048;

    /// Position in `in_` of the free-running index `idx`.
    pub const fn in_pos(idx: u32) -> usize {
        (idx & (Self::IN_SIZE - 1)) as usize
    }

    /// Position in `out` of the free-running index `idx`.
    pub const fn out_pos(idx: u32) -> usize {
        (idx & (Self::OUT_SIZE - 1)) as usize
    }
}

impl Default for XenconsInterface {
    fn default() -> Self {
        Self::new_zeroed()
    }
}

const _: () = {
    assert!(XenconsInterface::IN_SIZE.is_power_of_two());
    assert!(XenconsInterface::OUT_SIZE.is_power_of_two());
    assert!(size_of::<XenconsInterface>() == 3088);
    assert!(offset_of!(XenconsInterface, in_) == 0);
    assert!(offset_of!(XenconsInterface, out) == 1024);
    assert!(offset_of!(XenconsInterface, in_cons) == 3072);
    assert!(offset_of!(XenconsInterface, in_prod) == 3076);
    assert!(offset_of!(XenconsInterface, out_cons) == 3080);
    assert!(offset_of!(XenconsInterface, out_prod) == 3084);
};
