//! `#[repr(C)]` structures shared with Xen and the libxen* libraries, x86_64 layout.
//!
//! Every struct here is checked field by field against Debian's `libxen-dev` headers by
//! the `abi_layout` test (it compiles a C program that prints `sizeof`/`offsetof`).

pub mod blkif;
pub mod domctl;
pub mod gnttab;
pub mod ring;
pub mod vm_event;
