//! Loading the Xen libraries at run time, so the binary builds and starts without them.

use libloading::Library;

use crate::error::{Error, Result};

/// Open the first library of `names` that loads.
///
/// # Errors
/// `Absent` naming every candidate when none loads.
pub fn open_first(names: &[&str]) -> Result<Library> {
    let mut last = String::new();
    for name in names {
        // SAFETY: loading a Xen library runs its ELF initialisers; these libraries have
        // none with preconditions on our process.
        match unsafe { Library::new(name) } {
            Ok(lib) => return Ok(lib),
            Err(e) => last = e.to_string(),
        }
    }
    Err(Error::Absent {
        reason: format!("cannot load {} ({last})", names.join(" or ")),
    })
}

/// Resolve a symbol into a plain function pointer of type `T`.
///
/// # Safety
/// `T` must be the exact `unsafe extern "C" fn` type of the symbol, and the returned pointer
/// must not be called after `lib` is dropped (keep both in one struct).
pub unsafe fn symbol<T: Copy>(lib: &Library, name: &str) -> Result<T> {
    let mut cname = name.as_bytes().to_vec();
    cname.push(0);
    // SAFETY: the caller guarantees `T` matches the symbol's C signature.
    let sym = unsafe { lib.get::<T>(&cname) }.map_err(|e| Error::Absent {
        reason: format!("symbol {name} missing ({e})"),
    })?;
    Ok(*sym)
}

/// Candidate names of libxenctrl, newest first; its soname carries the Xen version.
pub const XENCTRL: &[&str] = &[
    "libxenctrl.so",
    "libxenctrl.so.4.17",
    "libxenctrl.so.4.18",
    "libxenctrl.so.4.19",
    "libxenctrl.so.4.20",
    "libxenctrl.so.4.16",
];
pub const XENFOREIGNMEMORY: &[&str] = &["libxenforeignmemory.so.1", "libxenforeignmemory.so"];
pub const XENGNTTAB: &[&str] = &["libxengnttab.so.1", "libxengnttab.so"];
pub const XENEVTCHN: &[&str] = &["libxenevtchn.so.1", "libxenevtchn.so"];
