//! Learning rate and weight decay as functions of the step (so a resumed run needs no state).

use crate::config::{OptimConfig, ScheduleKind};

#[derive(Debug, Clone)]
pub struct Schedule {
    cfg: OptimConfig,
    total_steps: u64,
}

impl Schedule {
    /// `train_steps` is the schedule's length unless `optim.decay_steps` is set.
    pub fn new(cfg: &OptimConfig, train_steps: u64) -> Self {
        let total_steps = cfg.decay_steps.unwrap_or(train_steps).max(1);
        Self {
            cfg: cfg.clone(),
            total_steps,
        }
    }

    fn fraction_step(&self, f: Option<f64>) -> Option<u64> {
        f.map(|f| (f * self.total_steps as f64).round() as u64)
    }

    /// Learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        let c = &self.cfg;
        let mut peak = c.lr;
        if let Some(drop) = self.fraction_step(c.lr_drop_at) {
            if step >= drop {
                peak *= c.lr_drop_factor;
            }
        }
        let min_lr = c.lr * c.min_lr_ratio;
        if step < c.warmup_steps {
            return peak * (step + 1) as f64 / c.warmup_steps as f64;
        }
        match c.schedule {
            ScheduleKind::Constant => peak,
            ScheduleKind::Cosine => {
                let span = self.total_steps.saturating_sub(c.warmup_steps).max(1) as f64;
                let progress = ((step - c.warmup_steps) as f64 / span).min(1.0);
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                let floor = min_lr.min(peak);
                floor + (peak - floor) * cosine
            }
        }
    }

    /// Weight decay of optimizer step `step`.
    pub fn weight_decay(&self, step: u64) -> f64 {
        match self.fraction_step(self.cfg.wd_off_at) {
            Some(off) if step >= off => 0.0,
            _ => self.cfg.weight_decay,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OptimConfig {
        OptimConfig {
            lr: 1.0,
            min_lr_ratio: 0.1,
            warmup_steps: 10,
            ..Default::default()
        }
    }

    #[test]
    fn warmup_then_cosine() {
        let s = Schedule::new(&cfg(), 110);
        assert!((s.lr(0) - 0.1).abs() < 1e-12);
        assert!((s.lr(9) - 1.0).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        // halfway through the decay: floor + (peak - floor) / 2
        assert!((s.lr(60) - 0.55).abs() < 1e-12);
        assert!((s.lr(110) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn decay_steps_fix_the_schedule() {
        let c = OptimConfig {
            decay_steps: Some(110),
            ..cfg()
        };
        let (a, b) = (Schedule::new(&c, 20), Schedule::new(&c, 40));
        for s in 0..20 {
            assert_eq!(a.lr(s), b.lr(s));
        }
        assert!((a.lr(60) - 0.55).abs() < 1e-12);
    }

    #[test]
    fn trilm_interventions() {
        let c = OptimConfig {
            lr_drop_at: Some(0.5),
            lr_drop_factor: 0.5,
            wd_off_at: Some(2.0 / 3.0),
            weight_decay: 0.1,
            ..cfg()
        };
        let s = Schedule::new(&c, 110);
        // before the drop at step 55 the plain cosine, after it the cosine from peak 0.5
        let cos = |st: u64| 0.5 * (1.0 + (std::f64::consts::PI * (st - 10) as f64 / 100.0).cos());
        assert!((s.lr(54) - (0.1 + 0.9 * cos(54))).abs() < 1e-12);
        assert!((s.lr(55) - (0.1 + 0.4 * cos(55))).abs() < 1e-12);
        assert_eq!(s.weight_decay(72), 0.1);
        assert_eq!(s.weight_decay(73), 0.0);
    }
}
