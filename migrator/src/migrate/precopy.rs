//! Pre-copy: dumping memory while the process still runs (CRIU's
//! iterative pre-dumps), so that the final dump inside the freeze moves
//! only what changed since. It needs the kernel's soft-dirty tracking,
//! which CRIU's own feature check reports. Where it is missing (the lab
//! machine's kernel) every page moves inside the freeze, streamed to the
//! destination as it is dumped. The pre-dump path itself is not built yet:
//! no machine we have can run it, so it could not be tested; the report
//! says which case a migration was.

use crate::criu::CriuError;

/// The report's `precopy` line, from the result of CRIU's check.
pub(super) fn describe(dirty_tracking: Result<bool, CriuError>) -> String {
    match dirty_tracking {
        Ok(false) => {
            "unavailable (no dirty tracking: `criu check --feature mem_dirty_track` says this kernel lacks soft-dirty); every page moved inside the freeze".to_owned()
        }
        Ok(true) => {
            "not used (this kernel tracks dirty memory, but migrator has no iterative pre-dump yet); every page moved inside the freeze".to_owned()
        }
        Err(err) => format!(
            "unknown (CRIU's feature check failed: {err}); every page moved inside the freeze"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_says_why_precopy_was_not_used() {
        assert!(describe(Ok(false)).starts_with("unavailable (no dirty tracking"));
        assert!(describe(Ok(true)).starts_with("not used"));
        let failed = describe(Err(CriuError::NotFound));
        assert!(
            failed.starts_with("unknown (CRIU's feature check failed"),
            "{failed}"
        );
    }
}
