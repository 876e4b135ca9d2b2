//! Installing pages into guest memory: written into the memfd before the cutover, placed
//! through userfaultfd after a hybrid commit, hashed as they land; and the copies that went
//! stale punched out.

use xxhash_rust::xxh3::xxh3_64;

use crate::migration::{report::Mode, transport::zero_page_hash};
use crate::vmm::memory::{MemoryError, PAGE_SIZE};

use super::{DataError, Session, SessionPhase};

impl Session {
    /// Punches out of the memfd the copies this session holds of `pages`, one call per run of
    /// neighbouring pages; pages it has no copy of (never received, discarded, or received
    /// as zero, a hole already) cost nothing. Returns the pages punched, in order; on failure,
    /// the first page of the run that failed.
    pub(super) fn punch_held_copies(
        &self,
        mut pages: Vec<u64>,
    ) -> Result<Vec<u64>, (u64, MemoryError)> {
        pages.sort_unstable();
        pages.dedup();
        {
            let progress = self.lock();
            pages.retain(|&page| {
                progress.received[page as usize]
                    && progress.page_digests[page as usize] != zero_page_hash()
            });
        }
        for run in pages.chunk_by(|a, b| a + 1 == *b) {
            if let (Some(&first), Some(&last)) = (run.first(), run.last()) {
                self.memory
                    .remove_frames(first..last + 1)
                    .map_err(|source| (first, source))?;
            }
        }
        Ok(pages)
    }

    /// A `Discard` frame: the source's guest still runs and has written these pages since
    /// it sent them. Their copies are punched out now, one call per run of neighbouring
    /// pages, so the commit does not free them inside the downtime; they read as missing
    /// from here on, and a later copy fills them again. Pages already missing cost nothing.
    pub(super) fn drop_stale_copies(&self, pages: Vec<u64>) -> Result<(), DataError> {
        // Before the commit: userfaultfd, which the commit sets up, is not there yet.
        let phase = self.phase();
        if self.mode != Mode::Hybrid || phase != SessionPhase::Receiving {
            return Err(DataError::UnexpectedDiscard { phase });
        }
        let pages = self
            .punch_held_copies(pages)
            .map_err(|(page, source)| DataError::Free { page, source })?;
        let mut progress = self.lock();
        for &page in &pages {
            progress.received[page as usize] = false;
            progress.page_digests[page as usize] = zero_page_hash();
        }
        Ok(())
    }

    pub(super) fn install(&self, pages: &[(u64, Option<&[u8]>)]) -> Result<(), DataError> {
        // A frame may name a page twice (our sender never does): the later entry wins, as it
        // would from a later frame. Installed as they came, a page sent with data and then as
        // zero kept the data in memory while its hash said zero.
        let last_of_each;
        let pages = if repeats(pages) {
            last_of_each = last_of_each_page(pages);
            &last_of_each[..]
        } else {
            pages
        };
        let uffd = self.uffd.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(uffd) = uffd {
            let zero = [0u8; PAGE_SIZE as usize];
            for &(page, data) in pages {
                self.install_postcopy(&uffd, page, data.unwrap_or(&zero))?;
            }
            return Ok(());
        }
        // Before the commit. Pages with data go in through the memfd, one `pwritev` per run
        // of neighbouring pages: most pages arrive once, and a first write through the mapping
        // would fault and zero each one first.
        for run in pages.chunk_by(|a, b| a.0 + 1 == b.0 && a.1.is_some() == b.1.is_some()) {
            let Some(&(first, _)) = run.first() else {
                continue;
            };
            let data: Vec<&[u8]> = run.iter().filter_map(|&(_, data)| data).collect();
            if !data.is_empty() {
                self.memory
                    .write_frames_through_fd(first, &data)
                    .map_err(|source| DataError::Write {
                        page: first,
                        source,
                    })?;
            }
        }
        // Hashing on arrival keeps the digest out of the cutover's downtime; outside the lock,
        // which the session's other connections take too.
        let digests: Vec<u64> = pages
            .iter()
            .map(|&(_, data)| data.map_or_else(zero_page_hash, xxh3_64))
            .collect();
        // The session's memory is a fresh memfd, which reads as zeros: writing a zero page
        // would only make it resident. A page an earlier round filled is freed instead, and
        // reads as zeros again.
        let refilled_as_zero: Vec<u64> = {
            let progress = self.lock();
            pages
                .iter()
                .filter(|&&(page, data)| {
                    data.is_none()
                        && progress.received[page as usize]
                        && progress.page_digests[page as usize] != zero_page_hash()
                })
                .map(|&(page, _)| page)
                .collect()
        };
        for run in refilled_as_zero.chunk_by(|a, b| a + 1 == *b) {
            if let (Some(&first), Some(&last)) = (run.first(), run.last()) {
                self.memory
                    .remove_frames(first..last + 1)
                    .map_err(|source| DataError::Free {
                        page: first,
                        source,
                    })?;
            }
        }
        let mut progress = self.lock();
        for (&(page, _), digest) in pages.iter().zip(digests) {
            progress.received[page as usize] = true;
            progress.page_digests[page as usize] = digest;
        }
        Ok(())
    }
}

/// Whether a frame's entries name some page twice.
fn repeats(pages: &[(u64, Option<&[u8]>)]) -> bool {
    let mut indexes: Vec<u64> = pages.iter().map(|&(page, _)| page).collect();
    indexes.sort_unstable();
    indexes.windows(2).any(|w| w[0] == w[1])
}

/// A frame's entries with only the last of each page's, in their order.
fn last_of_each_page<'a>(pages: &[(u64, Option<&'a [u8]>)]) -> Vec<(u64, Option<&'a [u8]>)> {
    let mut seen = std::collections::HashSet::new();
    let mut kept: Vec<_> = pages
        .iter()
        .rev()
        .filter(|&&(page, _)| seen.insert(page))
        .copied()
        .collect();
    kept.reverse();
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_named_twice_keeps_its_last_entry() {
        let (a, b) = ([1u8; 4], [2u8; 4]);
        let pages = [(3, Some(&a[..])), (5, None), (3, None), (4, Some(&b[..]))];
        assert!(repeats(&pages));
        assert_eq!(
            last_of_each_page(&pages),
            [(5, None), (3, None), (4, Some(&b[..]))]
        );
        assert!(!repeats(&[(1, None), (0, Some(&a[..]))]));
    }
}
