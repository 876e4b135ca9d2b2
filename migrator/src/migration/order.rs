//! The order pages travel in: ranks from the heat profile (or address order), kept current
//! from each round's dirty log, and which pages are held back for the last round.

use heatprobe::{MigrationPlan, plan::PlanError};

/// Page ranks: `rank[frame]` is the frame's position in the plan.
pub struct Order {
    rank: Vec<u32>,
    /// Pages dirty in the previous round.
    last_dirty: Option<Vec<bool>>,
    /// Frames that are hot and written.
    hot_writes: Vec<bool>,
    /// Frames hottest first (the post-copy push order).
    pub hottest_first: Vec<u64>,
    /// Each frame's position in `hottest_first`.
    heat_rank: Vec<u32>,
    /// Round 0's order (the plan's pre-copy order: pages seen written last).
    pub plan: Vec<u64>,
}

impl Order {
    pub fn address(frames: u64) -> Self {
        Self {
            rank: (0..frames as u32).collect(),
            last_dirty: None,
            hot_writes: vec![false; frames as usize],
            hottest_first: (0..frames).collect(),
            heat_rank: (0..frames as u32).collect(),
            plan: (0..frames).collect(),
        }
    }

    pub fn from_heat(pages: &[heatprobe::PageHeat], frames: u64) -> Result<Self, PlanError> {
        let plan = MigrationPlan::build(pages, Some(0..frames))?;
        let order: Vec<u64> = plan.precopy_order().collect();
        let mut rank = vec![0u32; frames as usize];
        for (position, &frame) in order.iter().enumerate() {
            rank[frame as usize] = position as u32;
        }
        let mut hot_writes = vec![false; frames as usize];
        for page in pages {
            if page.class == heatprobe::HeatClass::Hot
                && page.access == heatprobe::Access::ReadWrite
            {
                hot_writes[page.page as usize] = true;
            }
        }
        let mut by_heat: Vec<&heatprobe::PageHeat> = pages.iter().collect();
        by_heat.sort_by(|a, b| b.heat.total_cmp(&a.heat).then(a.page.cmp(&b.page)));
        let mut hottest_first: Vec<u64> = by_heat.iter().map(|p| p.page).collect();
        hottest_first.extend(plan.untouched.iter().flat_map(Clone::clone));
        let mut heat_rank = vec![u32::MAX; frames as usize];
        for (position, &frame) in hottest_first.iter().enumerate() {
            if let Some(slot) = heat_rank.get_mut(frame as usize) {
                *slot = position as u32;
            }
        }
        Ok(Self {
            rank,
            last_dirty: None,
            hot_writes,
            hottest_first,
            heat_rank,
            plan: order,
        })
    }

    pub fn sort(&self, frames: &mut [u64]) {
        frames.sort_by_key(|&f| self.rank[f as usize]);
    }

    /// Folds one round's dirty pages into the write heat: a page dirty in this round and
    /// the one before counts as a hot write (and only such a page), and goes after every other
    /// page of a round.
    pub fn learn_from_round(&mut self, dirty: &[u64]) {
        let mut now = vec![false; self.hot_writes.len()];
        for &f in dirty {
            now[f as usize] = true;
        }
        let last = self.last_dirty.replace(now.clone());
        let Some(last) = last else {
            return;
        };
        let base = self.rank.len() as u32;
        for (f, (&was, &is)) in last.iter().zip(&now).enumerate() {
            // From round 1 on, what is held back is what the dirty log shows being written
            // round after round; the profile's guess only shapes round 0.
            self.hot_writes[f] = was && is;
            if was && is {
                // Ranks beyond every planned one put it at the end of any round, keeping the
                // plan's order among such pages.
                if self.rank[f] < base {
                    self.rank[f] += base;
                }
            }
        }
    }

    /// Sorts `frames` by how soon the guest is likely to touch them after a cutover: pages the
    /// dirty log shows written check after check first, then by heat, hottest first. In
    /// address order (no heat, and no write is ever held back) that is lowest address first.
    pub fn sort_touch_first(&self, frames: &mut [u64]) {
        frames.sort_by_key(|&f| {
            let rank = self.heat_rank.get(f as usize).copied().unwrap_or(u32::MAX);
            (!self.is_hot_write(f), rank, f)
        });
    }

    /// Whether `frame` is held back as a hot write.
    pub fn is_hot_write(&self, frame: u64) -> bool {
        self.hot_writes
            .get(frame as usize)
            .copied()
            .unwrap_or(false)
    }

    /// Splits `frames` into what to send now and the hot written frames to hold back: at
    /// most `most` of them, those the dirty log and then the heat rank hottest; the rest go
    /// now, at the end of the round.
    pub fn hold_back_hot_writes(&self, frames: Vec<u64>, most: usize) -> (Vec<u64>, Vec<u64>) {
        let (mut now, mut later): (Vec<u64>, Vec<u64>) = frames
            .into_iter()
            .partition(|&f| !self.hot_writes[f as usize]);
        if later.len() > most {
            later.sort_by_key(|&f| (self.heat_rank[f as usize], f));
            now.extend(later.split_off(most));
            self.sort(&mut now);
            self.sort(&mut later);
        }
        (now, later)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(order: &Order, frames: u64) -> Vec<u64> {
        (0..frames).filter(|&f| order.is_hot_write(f)).collect()
    }

    #[test]
    fn pages_dirty_in_two_checks_in_a_row_are_held_back_and_go_last() {
        let mut order = Order::address(8);
        // One check says nothing of repetition.
        order.learn_from_round(&[1, 2, 3]);
        assert!(held(&order, 8).is_empty());
        order.learn_from_round(&[1, 2, 4]);
        assert_eq!(held(&order, 8), vec![1, 2]);
        // Only the last two checks count: 1 and 2 are quiet now, 4 repeats.
        order.learn_from_round(&[3, 4]);
        assert_eq!(held(&order, 8), vec![4]);
        let (now, later) = order.hold_back_hot_writes((0..8).collect(), usize::MAX);
        assert_eq!(later, vec![4]);
        assert_eq!(now, vec![0, 1, 2, 3, 5, 6, 7]);
        // Sorted, every page once held back goes after the others, in plan order.
        let mut frames: Vec<u64> = (0..8).rev().collect();
        order.sort(&mut frames);
        assert_eq!(frames, vec![0, 3, 5, 6, 7, 1, 2, 4]);
    }

    #[test]
    fn at_most_the_hottest_hot_writes_are_held_back_and_the_rest_go_last() {
        // Heat ranks 4 hottest, then 2, then 0 (a write weighs more than a read).
        let pages = [(0, 3, 0), (2, 0, 5), (4, 0, 9)]
            .map(|(page, reads, writes)| (page, heatprobe::PageCounts { reads, writes }));
        let mut heat = heatprobe::HeatMap::new(heatprobe::HeatConfig::default()).unwrap();
        heat.record_epoch(pages.to_vec());
        let mut order = Order::from_heat(&heat.pages(), 6).unwrap();
        order.learn_from_round(&[0, 2, 4]);
        order.learn_from_round(&[0, 2, 4]);
        let (now, later) = order.hold_back_hot_writes((0..6).collect(), usize::MAX);
        assert_eq!((now.len(), later.len()), (3, 3), "{now:?} {later:?}");
        // Room for one: the hottest is held; the other two go now, after every other page.
        let (now, later) = order.hold_back_hot_writes((0..6).collect(), 1);
        assert_eq!(later, vec![4]);
        assert_eq!(now.len(), 5);
        assert!(now[3..].iter().all(|&f| f == 0 || f == 2), "{now:?}");
        // No room: nothing held back.
        let (now, later) = order.hold_back_hot_writes((0..6).collect(), 0);
        assert!(later.is_empty());
        assert_eq!(now.len(), 6);
    }

    #[test]
    fn pages_likely_touched_first_are_the_hot_writes_then_the_hottest() {
        let pages = [(0, 1, 0), (1, 9, 0), (2, 0, 8), (3, 0, 1), (4, 0, 5)]
            .map(|(page, reads, writes)| (page, heatprobe::PageCounts { reads, writes }));
        let mut heat = heatprobe::HeatMap::new(heatprobe::HeatConfig::default()).unwrap();
        heat.record_epoch(pages.to_vec());
        let mut order = Order::from_heat(&heat.pages(), 6).unwrap();
        let mut frames = vec![5, 4, 3, 2, 1, 0];
        order.sort_touch_first(&mut frames);
        // Hottest first (a write weighs more than a read), untouched (5) last.
        assert_eq!(frames, vec![2, 1, 4, 0, 3, 5]);
        // Written in two checks running: first of all.
        order.learn_from_round(&[3]);
        order.learn_from_round(&[3]);
        order.sort_touch_first(&mut frames);
        assert_eq!(frames[0], 3);
        // Address order: lowest first.
        let mut frames = vec![5, 4, 3, 2, 1, 0];
        Order::address(6).sort_touch_first(&mut frames);
        assert_eq!(frames, vec![0, 1, 2, 3, 4, 5]);
    }
}
