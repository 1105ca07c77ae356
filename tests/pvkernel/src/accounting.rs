//! The per-vCPU books the tests read (traps taken, hypercalls made through the tracing
//! page), and how an upcall keeps its own activity out of them: it saves this vCPU's
//! books on entry and puts them back before returning, so the interrupted code sees only
//! what it did itself. Only this vCPU writes its own books and the handler runs with
//! upcalls masked, so nothing is lost in between.

use crate::tracepage::{self, Snapshot};
use crate::traps::VECTORS;

/// One vCPU's books.
pub struct Books {
    traps: [u64; VECTORS],
    hypercalls: Snapshot,
}

/// This vCPU's books now.
pub fn save() -> Books {
    Books {
        traps: crate::traps::counts(),
        hypercalls: tracepage::snapshot(),
    }
}

/// Puts this vCPU's books back as they were at `save`.
pub fn restore(books: Books) {
    crate::traps::set_counts(&books.traps);
    tracepage::restore(&books.hypercalls);
}
