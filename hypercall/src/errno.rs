//! Xen error numbers as a newtype.
//!
//! Xen returns `-errno` in `rax`. The values are Xen's own (`xen/include/public/errno.h`),
//! which match Linux's for every code Xen uses. An open newtype (not a closed enum) keeps
//! an unexpected value representable instead of turning it into undefined behaviour or a
//! panic.

use core::fmt;

/// A positive Xen error number, as returned negated in `rax` by a failing hypercall.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(transparent)]
pub struct Errno(pub i32);

macro_rules! errnos {
    ($($(#[$doc:meta])* $name:ident = $val:expr;)*) => {
        impl Errno {
            $($(#[$doc])* pub const $name: Errno = Errno($val);)*

            /// The symbolic name of this error number, if it is one Xen defines.
            pub const fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($val => Some(stringify!($name)),)*
                    _ => None,
                }
            }
        }
    };
}

errnos! {
    /// Operation not permitted.
    EPERM = 1;
    /// No such file or directory (Xen: no such object, e.g. vPMU not available for the vCPU).
    ENOENT = 2;
    /// No such process.
    ESRCH = 3;
    /// Interrupted system call.
    EINTR = 4;
    /// I/O error.
    EIO = 5;
    /// No such device or address.
    ENXIO = 6;
    /// Argument list too long.
    E2BIG = 7;
    /// Exec format error.
    ENOEXEC = 8;
    /// Bad file number.
    EBADF = 9;
    /// No child processes.
    ECHILD = 10;
    /// Try again.
    EAGAIN = 11;
    /// Out of memory.
    ENOMEM = 12;
    /// Permission denied.
    EACCES = 13;
    /// Bad address (a guest handle Xen could not copy).
    EFAULT = 14;
    /// Device or resource busy.
    EBUSY = 16;
    /// Already exists.
    EEXIST = 17;
    /// Cross-device link.
    EXDEV = 18;
    /// No such device.
    ENODEV = 19;
    /// Invalid argument.
    EINVAL = 22;
    /// File table overflow.
    ENFILE = 23;
    /// Too many open files.
    EMFILE = 24;
    /// No space left on device (Xen: a vPMU register bank does not fit the shared page).
    ENOSPC = 28;
    /// Too many links.
    EMLINK = 31;
    /// Math argument out of domain of function.
    EDOM = 33;
    /// Math result not representable.
    ERANGE = 34;
    /// Resource deadlock would occur.
    EDEADLK = 35;
    /// File name too long.
    ENAMETOOLONG = 36;
    /// No record locks available.
    ENOLCK = 37;
    /// Function not implemented (unknown hypercall).
    ENOSYS = 38;
    /// Directory not empty.
    ENOTEMPTY = 39;
    /// No data available.
    ENODATA = 61;
    /// Timer expired.
    ETIME = 62;
    /// Bad message.
    EBADMSG = 74;
    /// Value too large for defined data type.
    EOVERFLOW = 75;
    /// Illegal byte sequence.
    EILSEQ = 84;
    /// Interrupted system call should be restarted.
    ERESTART = 85;
    /// Socket operation on non-socket.
    ENOTSOCK = 88;
    /// Message too long.
    EMSGSIZE = 90;
    /// Operation not supported (Xen: vPMU disabled).
    EOPNOTSUPP = 95;
    /// Address already in use.
    EADDRINUSE = 98;
    /// Cannot assign requested address.
    EADDRNOTAVAIL = 99;
    /// No buffer space available.
    ENOBUFS = 105;
    /// Transport endpoint is already connected.
    EISCONN = 106;
    /// Transport endpoint is not connected.
    ENOTCONN = 107;
    /// Connection timed out.
    ETIMEDOUT = 110;
    /// Connection refused.
    ECONNREFUSED = 111;
}

impl Errno {
    /// Decodes a raw hypercall return value: negative values in `-4095..=-1` are errors,
    /// everything else is a success value.
    pub const fn from_ret(ret: i64) -> Result<u64, Errno> {
        if ret < 0 && ret >= -4095 {
            Err(Errno(-ret as i32))
        } else {
            Ok(ret as u64)
        }
    }

    /// The value Xen puts in `rax` for this error (`-errno`), e.g. for scripting a mock.
    pub const fn to_ret(self) -> i64 {
        -(self.0 as i64)
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name}"),
            None => write!(f, "Errno({})", self.0),
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "-{name} ({})", -self.0),
            None => write!(f, "-{}", self.0),
        }
    }
}
