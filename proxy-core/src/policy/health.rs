//! Model health: consecutive upstream failures per direct model, as admin health and
//! heartbeats report it (0 healthy, 1 degraded after 4 to 7, 2 down after 8 or more;
//! any success resets the streak).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use crate::resources::{Model, ModelTarget};
use crate::snapshot::Snapshot;

/// Consecutive failures from which a model is reported degraded.
pub const DEGRADED_AFTER: u32 = 4;
/// Consecutive failures from which a model is reported down.
pub const DOWN_AFTER: u32 = 8;

/// The health level seed 001 defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Health {
    Healthy = 0,
    Degraded = 1,
    Down = 2,
}

impl Health {
    fn of_streak(failures: u32) -> Health {
        match failures {
            n if n >= DOWN_AFTER => Health::Down,
            n if n >= DEGRADED_AFTER => Health::Degraded,
            _ => Health::Healthy,
        }
    }

    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

/// Failure streaks by direct model name. Recording is a read lock plus one atomic
/// operation once a model has been seen.
#[derive(Debug, Default)]
pub struct ModelHealth {
    streaks: RwLock<HashMap<Arc<str>, AtomicU32>>,
}

impl ModelHealth {
    /// An upstream attempt for `model` failed (transport error, 5xx, 429 or timeout).
    pub fn failure(&self, model: &Arc<str>) {
        if let Some(streak) = read(&self.streaks).get(model) {
            streak.fetch_add(1, Ordering::Relaxed);
            return;
        }
        write(&self.streaks)
            .entry(model.clone())
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    /// An upstream attempt for `model` succeeded.
    pub fn success(&self, model: &str) {
        if let Some(streak) = read(&self.streaks).get(model) {
            streak.store(0, Ordering::Relaxed);
        }
    }

    /// The health of a direct model.
    pub fn direct(&self, model: &str) -> Health {
        read(&self.streaks).get(model).map_or(Health::Healthy, |s| {
            Health::of_streak(s.load(Ordering::Relaxed))
        })
    }

    /// The health of any model: a routing model is as healthy as its healthiest target
    /// that `snapshot` serves (down when it serves none).
    pub fn of(&self, snapshot: &Snapshot, model: &Model) -> Health {
        match &model.target {
            ModelTarget::Direct(_) => self.direct(&model.name),
            ModelTarget::Routing(routing) => routing
                .targets
                .iter()
                .filter(|t| snapshot.model(&t.model).is_some())
                .map(|t| self.direct(&t.model))
                .min()
                .unwrap_or(Health::Down),
        }
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streak_levels_and_reset() {
        let h = ModelHealth::default();
        let m: Arc<str> = "gpt".into();
        let mut seen = Vec::new();
        for _ in 0..9 {
            h.failure(&m);
            seen.push(h.direct("gpt").as_u8());
        }
        assert_eq!(seen, [0, 0, 0, 1, 1, 1, 1, 2, 2]);
        h.success("gpt");
        assert_eq!(h.direct("gpt"), Health::Healthy);
        assert_eq!(h.direct("never-seen"), Health::Healthy);
    }
}
