//! remoca xen (being built).
