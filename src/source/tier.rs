//! Tiering: which databases are hot (WAL streaming) and which are cold
//! (next-hour snapshots).
//!
//! This module owns the *decision* only; it opens nothing. The scheduler feeds
//! it the databases each scan saw change ([`Tiers::observe`]) and asks, once
//! per scan, what to promote and demote ([`Tiers::decide`]). The rules:
//!
//! * a database that changed within `hot-duration` is a candidate;
//! * at most `max-hot-databases` are hot, and the most recently changed win:
//!   when the hot set is full, a candidate that changed more recently than
//!   the stalest hot database takes its place;
//! * a hot database unchanged for `cold-after` goes cold;
//! * a database whose stream let go because its syncs kept failing (the
//!   store is down, `release-after`) is *held* cold until the cold tier has
//!   uploaded it ([`Tiers::hold`]): streaming again at once would take the
//!   application's WAL again and let it grow for another `release-after`.
//!
//! Memory is proportional to the hot set plus the databases that changed
//! within `hot-duration`, never to the fleet. Times are [`tokio::time::Instant`]
//! so tests drive the rules with paused time instead of sleeping.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::source::track::Id;

/// The tiering knobs (see [`crate::source::config::MultiDb`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierConfig {
    pub hot_duration: Duration,
    pub max_hot: usize,
    pub cold_after: Duration,
}

/// What one [`Tiers::decide`] call changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Databases to start streaming, most recently changed first.
    pub promote: Vec<Id>,
    /// Databases to stop streaming (their last frames are shipped first).
    pub demote: Vec<Id>,
}

/// The hot set and the recent changes that may join it.
#[derive(Debug)]
pub struct Tiers {
    cfg: TierConfig,
    /// Hot databases and when each last changed.
    hot: HashMap<Id, Instant>,
    /// Cold databases that changed within `hot-duration`, and when.
    recent: HashMap<Id, Instant>,
    /// Databases that cannot stream (not in WAL mode, say), until when; they
    /// stay cold without being offered again every scan.
    barred: HashMap<Id, Instant>,
    /// Databases released by a failing stream, cold until uploaded.
    held: HashSet<Id>,
    pub promotions: u64,
    pub demotions: u64,
}

impl Tiers {
    pub fn new(cfg: TierConfig) -> Tiers {
        Tiers {
            cfg,
            hot: HashMap::new(),
            recent: HashMap::new(),
            barred: HashMap::new(),
            held: HashSet::new(),
            promotions: 0,
            demotions: 0,
        }
    }

    pub fn config(&self) -> TierConfig {
        self.cfg
    }

    /// Records that `ids` changed at `now` (one scan's changed databases).
    pub fn observe(&mut self, ids: &[Id], now: Instant) {
        if self.cfg.max_hot == 0 {
            return;
        }
        for &id in ids {
            match self.hot.get_mut(&id) {
                Some(t) => *t = now,
                None => {
                    self.recent.insert(id, now);
                }
            }
        }
    }

    pub fn is_hot(&self, id: Id) -> bool {
        self.hot.contains_key(&id)
    }

    pub fn hot_count(&self) -> usize {
        self.hot.len()
    }

    /// Hot databases, in no particular order.
    pub fn hot_ids(&self) -> impl Iterator<Item = Id> + '_ {
        self.hot.keys().copied()
    }

    /// Forgets a database that left the fleet (deleted). Returns whether it was hot.
    pub fn forget(&mut self, id: Id) -> bool {
        self.recent.remove(&id);
        self.barred.remove(&id);
        self.held.remove(&id);
        self.hot.remove(&id).is_some()
    }

    /// Takes `id` out of the hot set because its stream let go after its
    /// syncs kept failing, or could not start; it stays cold until
    /// [`Tiers::uploaded`] says the cold tier could upload it (the store
    /// works again, the file is a database it can read).
    pub fn hold(&mut self, id: Id) {
        if self.hot.remove(&id).is_some() {
            self.demotions += 1;
        }
        self.recent.remove(&id);
        self.held.insert(id);
    }

    /// The cold tier uploaded `id`: a held database may stream again.
    /// Returns whether it was held.
    pub fn uploaded(&mut self, id: Id) -> bool {
        !self.held.is_empty() && self.held.remove(&id)
    }

    /// Databases held cold by [`Tiers::hold`].
    pub fn held_count(&self) -> usize {
        self.held.len()
    }

    /// Takes `id` out of the hot set because it cannot stream; it stays cold
    /// (and is not offered again) for `cold-after`.
    pub fn bar(&mut self, id: Id, now: Instant) {
        if self.hot.remove(&id).is_some() {
            self.demotions += 1;
        }
        self.recent.remove(&id);
        self.barred.insert(id, now + self.cfg.cold_after);
    }

    /// Applies the rules at `now` and returns what changed.
    pub fn decide(&mut self, now: Instant) -> Decision {
        let mut d = Decision::default();
        let cold_after = self.cfg.cold_after;
        self.hot.retain(|&id, &mut last| {
            let keep = now.saturating_duration_since(last) < cold_after;
            if !keep {
                d.demote.push(id);
            }
            keep
        });
        self.barred.retain(|_, &mut until| until > now);
        let hot_duration = self.cfg.hot_duration;
        self.recent
            .retain(|_, &mut t| now.saturating_duration_since(t) < hot_duration);
        let mut candidates: Vec<(Instant, Id)> = self
            .recent
            .iter()
            .filter(|(id, _)| !self.barred.contains_key(id) && !self.held.contains(id))
            .map(|(&id, &t)| (t, id))
            .collect();
        // Most recent first; ids break ties so the order is deterministic.
        candidates.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut stalest: Option<Vec<(Instant, Id)>> = None;
        for (t, id) in candidates {
            if self.hot.len() < self.cfg.max_hot {
                self.recent.remove(&id);
                self.hot.insert(id, t);
                d.promote.push(id);
                continue;
            }
            // Full: replace the stalest hot database if this one is newer.
            let stale = stalest.get_or_insert_with(|| {
                let mut v: Vec<(Instant, Id)> = self.hot.iter().map(|(&id, &t)| (t, id)).collect();
                v.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
                v
            });
            match stale.last() {
                Some(&(oldest, victim)) if oldest < t => {
                    stale.pop();
                    self.hot.remove(&victim);
                    d.demote.push(victim);
                    self.recent.remove(&id);
                    self.hot.insert(id, t);
                    d.promote.push(id);
                }
                _ => break,
            }
        }
        // A database demoted for a newer one may still be recent: it can come
        // back when a slot frees up.
        self.promotions += d.promote.len() as u64;
        self.demotions += d.demote.len() as u64;
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiers(max_hot: usize) -> Tiers {
        Tiers::new(TierConfig {
            hot_duration: Duration::from_secs(15),
            max_hot,
            cold_after: Duration::from_secs(300),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn change_promotes_and_silence_demotes_after_cold_after() {
        let mut t = tiers(10);
        t.observe(&[1, 2], Instant::now());
        let d = t.decide(Instant::now());
        assert_eq!(d.promote, vec![1, 2]);
        assert!(t.is_hot(1) && t.is_hot(2));
        // Keep 1 busy; 2 goes silent.
        for _ in 0..19 {
            tokio::time::advance(Duration::from_secs(15)).await;
            t.observe(&[1], Instant::now());
            assert_eq!(t.decide(Instant::now()), Decision::default());
        }
        // 2 last changed 285 s ago: one more scan and it is cold.
        tokio::time::advance(Duration::from_secs(15)).await;
        t.observe(&[1], Instant::now());
        let d = t.decide(Instant::now());
        assert_eq!(d.demote, vec![2]);
        assert!(t.is_hot(1) && !t.is_hot(2));
        assert_eq!((t.promotions, t.demotions), (2, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_older_than_hot_duration_does_not_promote() {
        let mut t = tiers(10);
        t.observe(&[7], Instant::now());
        tokio::time::advance(Duration::from_secs(16)).await;
        assert!(t.decide(Instant::now()).promote.is_empty());
        assert!(!t.is_hot(7));
    }

    #[tokio::test(start_paused = true)]
    async fn most_recently_changed_win_when_full() {
        let mut t = tiers(2);
        t.observe(&[1], Instant::now());
        tokio::time::advance(Duration::from_secs(1)).await;
        t.observe(&[2], Instant::now());
        tokio::time::advance(Duration::from_secs(1)).await;
        t.observe(&[3], Instant::now());
        let d = t.decide(Instant::now());
        // 3 and 2 are the most recent; 1 waits.
        assert_eq!(d.promote, vec![3, 2]);
        assert_eq!(t.hot_count(), 2);
        tokio::time::advance(Duration::from_secs(1)).await;
        t.observe(&[1], Instant::now());
        let d = t.decide(Instant::now());
        // 1 changed again, more recently than 2 (the stalest hot one).
        assert_eq!(d.promote, vec![1]);
        assert_eq!(d.demote, vec![2]);
        assert!(t.is_hot(1) && t.is_hot(3) && !t.is_hot(2));
    }

    #[tokio::test(start_paused = true)]
    async fn barred_databases_stay_cold_until_cold_after() {
        let mut t = tiers(10);
        t.observe(&[4], Instant::now());
        assert_eq!(t.decide(Instant::now()).promote, vec![4]);
        t.bar(4, Instant::now());
        assert!(!t.is_hot(4));
        tokio::time::advance(Duration::from_secs(10)).await;
        t.observe(&[4], Instant::now());
        assert!(t.decide(Instant::now()).promote.is_empty());
        tokio::time::advance(Duration::from_secs(291)).await;
        t.observe(&[4], Instant::now());
        assert_eq!(t.decide(Instant::now()).promote, vec![4]);
    }

    #[tokio::test(start_paused = true)]
    async fn held_databases_stay_cold_until_uploaded() {
        let mut t = tiers(10);
        t.observe(&[4, 5], Instant::now());
        assert_eq!(t.decide(Instant::now()).promote, vec![4, 5]);
        t.hold(4);
        assert!(!t.is_hot(4));
        assert_eq!((t.demotions, t.held_count()), (1, 1));
        // However long and however often it is written.
        tokio::time::advance(Duration::from_secs(3600)).await;
        t.observe(&[4], Instant::now());
        assert!(t.decide(Instant::now()).promote.is_empty());
        t.uploaded(5);
        t.observe(&[4], Instant::now());
        assert!(t.decide(Instant::now()).promote.is_empty());
        t.uploaded(4);
        assert_eq!(t.held_count(), 0);
        assert_eq!(t.decide(Instant::now()).promote, vec![4]);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_max_hot_turns_the_tier_off() {
        let mut t = tiers(0);
        t.observe(&[1, 2, 3], Instant::now());
        assert_eq!(t.decide(Instant::now()), Decision::default());
    }
}
