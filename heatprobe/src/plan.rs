//! The migration plan: the order in which to copy a target's pages.
//!
//! - read-write pages, cold to hot: the hot ones would be dirtied again, so they go late;
//! - read-only pages, hot to cold: the destination gets what it needs first;
//! - untouched pages last.
//!
//! Ties break by page number, so the same heat map always gives the same plan.

use std::{cmp::Ordering, ops::Range};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::heat::{Access, PageHeat};

/// A page list that cannot be planned.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("page {page} is outside the target's {start}..{end} pages")]
    OutsideUniverse { page: u64, start: u64, end: u64 },
    #[error("page {0} appears twice")]
    Duplicate(u64),
}

/// One of the plan's three segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Segment {
    /// Read-write pages, coldest first.
    ReadWrite,
    /// Read-only pages, hottest first.
    ReadOnly,
    /// Pages never touched, by address.
    Untouched,
}

/// Pages in copy order, in three segments.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationPlan {
    /// Read-write pages, coldest first.
    pub read_write: Vec<u64>,
    /// Read-only pages, hottest first.
    pub read_only: Vec<u64>,
    /// Pages of the universe never touched, as half-open ranges in address order.
    pub untouched: Vec<Range<u64>>,
}

impl MigrationPlan {
    /// Orders `pages`. With a `universe` (a guest's frames, say) every page of it is in the
    /// plan and pages not in `pages` form the untouched segment; without one, only the
    /// touched pages are.
    pub fn build(pages: &[PageHeat], universe: Option<Range<u64>>) -> Result<Self, PlanError> {
        let mut sorted: Vec<&PageHeat> = pages.iter().collect();
        sorted.sort_by_key(|p| p.page);
        for pair in sorted.windows(2) {
            if pair[0].page == pair[1].page {
                return Err(PlanError::Duplicate(pair[0].page));
            }
        }
        let mut untouched = Vec::new();
        if let Some(universe) = &universe {
            let mut next = universe.start;
            for page in &sorted {
                if !universe.contains(&page.page) {
                    return Err(PlanError::OutsideUniverse {
                        page: page.page,
                        start: universe.start,
                        end: universe.end,
                    });
                }
                if page.page > next {
                    untouched.push(next..page.page);
                }
                next = page.page + 1;
            }
            if next < universe.end {
                untouched.push(next..universe.end);
            }
        }
        let (mut read_write, mut read_only): (Vec<&PageHeat>, Vec<&PageHeat>) = sorted
            .into_iter()
            .partition(|p| p.access == Access::ReadWrite);
        read_write.sort_by(|a, b| a.heat.total_cmp(&b.heat).then(a.page.cmp(&b.page)));
        read_only.sort_by(|a, b| b.heat.total_cmp(&a.heat).then(a.page.cmp(&b.page)));
        Ok(Self {
            read_write: read_write.iter().map(|p| p.page).collect(),
            read_only: read_only.iter().map(|p| p.page).collect(),
            untouched,
        })
    }

    /// Every page of the plan in copy order.
    pub fn order(&self) -> impl Iterator<Item = u64> + '_ {
        self.read_write
            .iter()
            .chain(&self.read_only)
            .copied()
            .chain(self.untouched.iter().flat_map(Clone::clone))
    }

    /// Every page in the order pre-copy's round 0 sends them: read-only hot to cold, then the
    /// untouched pages, then read-write cold to hot. Every page written after it is sent goes
    /// again, so in pre-copy the pages seen written go after all the others, not only the hot
    /// ones after the cold: measured on kv-zipf with its hot keys in place, sending the
    /// read-write segment first had heat find more pages dirty after round 0 than address
    /// order (57k against 51k), since a page written once in the profile is likelier to be
    /// written again than one never seen written.
    pub fn precopy_order(&self) -> impl Iterator<Item = u64> + '_ {
        self.read_only
            .iter()
            .copied()
            .chain(self.untouched.iter().flat_map(Clone::clone))
            .chain(self.read_write.iter().copied())
    }

    /// The segments [`Self::precopy_order`] is made of, in the order it sends them, with their
    /// sizes in pages: the order is these segments one after the other. A dry run cuts the
    /// order it was given at these sizes to say which page is sent for which reason.
    pub fn precopy_segments(&self) -> [(Segment, u64); 3] {
        [
            (Segment::ReadOnly, self.read_only.len() as u64),
            (Segment::Untouched, self.untouched_len()),
            (Segment::ReadWrite, self.read_write.len() as u64),
        ]
    }

    /// Number of pages in the plan.
    pub fn len(&self) -> u64 {
        (self.read_write.len() + self.read_only.len()) as u64 + self.untouched_len()
    }

    fn untouched_len(&self) -> u64 {
        self.untouched.iter().map(|r| r.end - r.start).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Compares two pages the way the plan orders them; used by tests and by callers that merge
/// plans.
pub fn plan_cmp(a: &PageHeat, b: &PageHeat) -> Ordering {
    match (a.access, b.access) {
        (Access::ReadWrite, Access::ReadOnly) => Ordering::Less,
        (Access::ReadOnly, Access::ReadWrite) => Ordering::Greater,
        (Access::ReadWrite, Access::ReadWrite) => {
            a.heat.total_cmp(&b.heat).then(a.page.cmp(&b.page))
        }
        (Access::ReadOnly, Access::ReadOnly) => b.heat.total_cmp(&a.heat).then(a.page.cmp(&b.page)),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;
    use crate::heat::HeatClass;

    fn page(page: u64, heat: f64, access: Access) -> PageHeat {
        PageHeat {
            page,
            reads: 1,
            writes: u64::from(access == Access::ReadWrite),
            heat,
            class: HeatClass::Cold,
            access,
        }
    }

    #[test]
    fn the_patent_order() {
        let pages = [
            page(1, 5.0, Access::ReadWrite),
            page(2, 1.0, Access::ReadWrite),
            page(3, 9.0, Access::ReadOnly),
            page(4, 2.0, Access::ReadOnly),
            page(6, 3.0, Access::ReadWrite),
        ];
        let plan = MigrationPlan::build(&pages, Some(0..8)).unwrap();
        assert_eq!(plan.read_write, vec![2, 6, 1]);
        assert_eq!(plan.read_only, vec![3, 4]);
        assert_eq!(plan.untouched, vec![0..1, 5..6, 7..8]);
        assert_eq!(
            plan.order().collect::<Vec<_>>(),
            vec![2, 6, 1, 3, 4, 0, 5, 7]
        );
        assert_eq!(plan.len(), 8);
        assert_eq!(
            plan.precopy_order().collect::<Vec<_>>(),
            vec![3, 4, 0, 5, 7, 2, 6, 1]
        );
        assert_eq!(
            plan.precopy_segments(),
            [
                (Segment::ReadOnly, 2),
                (Segment::Untouched, 3),
                (Segment::ReadWrite, 3)
            ]
        );
    }

    #[test]
    fn bad_page_lists_are_refused() {
        let outside = [page(9, 1.0, Access::ReadOnly)];
        assert_eq!(
            MigrationPlan::build(&outside, Some(0..8)),
            Err(PlanError::OutsideUniverse {
                page: 9,
                start: 0,
                end: 8
            })
        );
        let twice = [
            page(1, 1.0, Access::ReadOnly),
            page(1, 2.0, Access::ReadWrite),
        ];
        assert_eq!(
            MigrationPlan::build(&twice, None),
            Err(PlanError::Duplicate(1))
        );
    }

    fn arb_pages() -> impl Strategy<Value = Vec<PageHeat>> {
        prop::collection::btree_map(0u64..256, (0.0f64..100.0, any::<bool>()), 0..64).prop_map(
            |m| {
                m.into_iter()
                    .map(|(p, (heat, rw))| {
                        page(
                            p,
                            heat,
                            if rw {
                                Access::ReadWrite
                            } else {
                                Access::ReadOnly
                            },
                        )
                    })
                    .collect()
            },
        )
    }

    proptest! {
        #[test]
        fn every_page_exactly_once_in_patent_order(pages in arb_pages()) {
            let plan = MigrationPlan::build(&pages, Some(0..256)).unwrap();
            let order: Vec<u64> = plan.order().collect();
            prop_assert_eq!(order.len() as u64, plan.len());
            // The pre-copy order is the same pages, written ones last.
            let precopy: Vec<u64> = plan.precopy_order().collect();
            prop_assert_eq!(
                precopy.iter().copied().collect::<BTreeSet<_>>(),
                order.iter().copied().collect::<BTreeSet<_>>()
            );
            prop_assert_eq!(precopy.len(), order.len());
            prop_assert_eq!(&precopy[precopy.len() - plan.read_write.len()..], &plan.read_write[..]);
            // Cut at the sizes precopy_segments gives, the order is its segments in turn.
            let mut rest = &precopy[..];
            for (segment, len) in plan.precopy_segments() {
                let (this, after) = rest.split_at(len as usize);
                let expected: Vec<u64> = match segment {
                    Segment::ReadOnly => plan.read_only.clone(),
                    Segment::ReadWrite => plan.read_write.clone(),
                    Segment::Untouched => plan.untouched.iter().flat_map(Clone::clone).collect(),
                };
                prop_assert_eq!(this, &expected[..], "{:?}", segment);
                rest = after;
            }
            prop_assert!(rest.is_empty());
            prop_assert_eq!(order.iter().copied().collect::<BTreeSet<_>>(), (0..256).collect());
            prop_assert_eq!(order.len(), 256);
            let by_page: std::collections::BTreeMap<u64, &PageHeat> =
                pages.iter().map(|p| (p.page, p)).collect();
            let touched: Vec<&PageHeat> =
                order.iter().filter_map(|p| by_page.get(p).copied()).collect();
            prop_assert_eq!(touched.len(), pages.len());
            // Touched pages come before untouched ones, in plan_cmp order.
            prop_assert!(order[..touched.len()].iter().all(|p| by_page.contains_key(p)));
            for pair in touched.windows(2) {
                prop_assert_eq!(plan_cmp(pair[0], pair[1]), Ordering::Less);
            }
        }

        #[test]
        fn without_a_universe_only_touched_pages(pages in arb_pages()) {
            let plan = MigrationPlan::build(&pages, None).unwrap();
            prop_assert!(plan.untouched.is_empty());
            prop_assert_eq!(plan.len(), pages.len() as u64);
        }
    }
}
