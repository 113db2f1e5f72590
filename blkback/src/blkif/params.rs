//! Which disk a device serves: the toolstack's `params` (`<format>:<target>`, as libxl
//! writes it for `backendtype=tap`) and `mode`, resolved against the configured exports.
//!
//! - `target` starting with `/` is a raw image path, opened read-write (read-only for
//!   `mode=r`; write-through when the backend is configured so) with the blkback raw layer;
//! - any other `target` names a configured export (template + overlay, ...), so a guest's
//!   disk line can say `target=vm1` and get the same disk stack the NBD server serves.
//!
//! Only `raw` format is accepted: the layers above do their own formats.

use std::path::Path;
use std::sync::Arc;

use crate::disk::Disk;
use crate::export::{error_chain, Export, Exports};
use crate::raw::RawFile;

use super::BlkifError;

/// The disk a device serves.
#[derive(Debug, Clone)]
pub struct ResolvedDisk {
    pub disk: Arc<dyn Disk>,
    /// Writes refused (`mode=r`, or a read-only disk).
    pub read_only: bool,
    /// The export, when the disk is one (its counters are updated).
    pub export: Option<Arc<Export>>,
    /// For logs: what was opened.
    pub description: String,
}

/// Split `params` into (format, target).
///
/// # Errors
/// [`BlkifError::Params`] for a missing `:` or an empty target.
pub fn split_params(params: &str) -> Result<(&str, &str), BlkifError> {
    let params = params.trim_end_matches('\0').trim();
    let (format, target) = params
        .split_once(':')
        .ok_or_else(|| BlkifError::Params(format!("{params:?} is not <format>:<target>")))?;
    if target.is_empty() {
        return Err(BlkifError::Params(format!("{params:?} names no target")));
    }
    Ok((format, target))
}

/// Open the disk for `params` / `mode`.
///
/// # Errors
/// [`BlkifError::Params`] for a format other than raw, an unknown export, or a file that
/// cannot be opened.
pub fn resolve(
    params: &str,
    mode: Option<&str>,
    exports: Option<&Exports>,
    write_through: bool,
) -> Result<ResolvedDisk, BlkifError> {
    let (format, target) = split_params(params)?;
    if format != "raw" {
        return Err(BlkifError::Params(format!(
            "format {format:?} is not supported (only raw; overlays are configured as exports)"
        )));
    }
    let want_ro = !matches!(mode.map(str::trim), Some(m) if m.starts_with('w'));
    if target.starts_with('/') {
        let path = Path::new(target);
        let raw = if want_ro {
            RawFile::open_read_only(path)
        } else if write_through {
            RawFile::open_write_through(path)
        } else {
            RawFile::open_read_write(path)
        }
        .map_err(|e| BlkifError::Params(format!("{target}: {}", error_chain(&e))))?;
        return Ok(ResolvedDisk {
            disk: Arc::new(raw),
            read_only: want_ro,
            export: None,
            description: format!(
                "raw {target}{}",
                if write_through && !want_ro {
                    " (write-through)"
                } else {
                    ""
                }
            ),
        });
    }
    let Some(exports) = exports else {
        return Err(BlkifError::Params(format!(
            "{target:?} is not an absolute path and no exports are configured"
        )));
    };
    match exports.get(target) {
        Some(e) => Ok(ResolvedDisk {
            disk: e.disk.clone(),
            read_only: want_ro || e.disk.is_read_only(),
            export: Some(e.clone()),
            description: format!("export {target} ({})", e.description),
        }),
        None => Err(BlkifError::Params(match exports.unavailable(target) {
            Some(why) => format!("export {target:?} is unavailable: {why}"),
            None => format!("no export named {target:?}"),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_forms() {
        assert_eq!(
            split_params("raw:/var/img.raw").unwrap(),
            ("raw", "/var/img.raw")
        );
        assert_eq!(split_params("raw:vm1\0").unwrap(), ("raw", "vm1"));
        assert!(split_params("/var/img.raw").is_err());
        assert!(split_params("raw:").is_err());
        assert!(resolve("vhd:/x", Some("w"), None, false)
            .unwrap_err()
            .to_string()
            .contains("vhd"));
        assert!(resolve("raw:vm1", Some("w"), None, false).is_err());
    }

    #[test]
    fn mode_r_is_read_only_and_missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.raw");
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        let params = format!("raw:{}", p.display());
        assert!(resolve(&params, Some("r"), None, false).unwrap().read_only);
        assert!(!resolve(&params, Some("w"), None, false).unwrap().read_only);
        let e = resolve("raw:/nonexistent/x.raw", Some("w"), None, false).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.raw"), "{e}");
    }
}
