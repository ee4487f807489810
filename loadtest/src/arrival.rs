//! When requests are sent. Closed loop: `C` virtual users, each sending its
//! next request as soon as its previous stream ends (ramped in evenly over
//! `--ramp-up`). Open loop: an arrival process (Poisson, constant, or gamma
//! with a burstiness factor) gives each request an *intended* send time,
//! independent of how fast the server answers; a linear ramp-up is applied
//! by time change, so the rate grows from 0 to R over the ramp. Seeded and
//! deterministic.

use std::time::Duration;

/// A small, fast, seeded PRNG (splitmix64); good enough for arrivals,
/// fault assignment and prompt picking, and reproducible everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5851_f42d_4c95_7f2d)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.unit(), self.unit());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Gamma(shape, 1) by Marsaglia and Tsang (shape < 1 via boosting).
    fn gamma(&mut self, shape: f64) -> f64 {
        if shape < 1.0 {
            let u = self.unit();
            return self.gamma(shape + 1.0) * u.powf(1.0 / shape);
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = (1.0 + c * x).powi(3);
            if v <= 0.0 {
                continue;
            }
            let u = self.unit();
            if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return d * v;
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ArrivalKind {
    /// Exponential gaps (a Poisson process).
    Poisson,
    /// Equal gaps of 1/R.
    Constant,
    /// Gamma gaps with shape = burstiness (1 = Poisson, < 1 burstier, > 1 smoother).
    Gamma,
}

/// Open-loop intended send times, as offsets from the start of the run.
#[derive(Debug, Clone)]
pub struct Arrivals {
    kind: ArrivalKind,
    rate: f64,
    burstiness: f64,
    ramp_s: f64,
    rng: Rng,
    /// Position in "full-rate time" (seconds at rate R).
    u: f64,
}

impl Arrivals {
    pub fn new(kind: ArrivalKind, rate: f64, burstiness: f64, ramp: Duration, seed: u64) -> Self {
        Arrivals {
            kind,
            rate,
            burstiness: if burstiness > 0.0 { burstiness } else { 1.0 },
            ramp_s: ramp.as_secs_f64(),
            rng: Rng::new(seed),
            u: 0.0,
        }
    }

    fn gap(&mut self) -> f64 {
        let mean = 1.0 / self.rate;
        match self.kind {
            ArrivalKind::Constant => mean,
            ArrivalKind::Poisson => -self.rng.unit().ln() * mean,
            ArrivalKind::Gamma => self.rng.gamma(self.burstiness) * mean / self.burstiness,
        }
    }

    /// The next intended send time (offset from the start).
    pub fn next_offset(&mut self) -> Duration {
        self.u += self.gap();
        // With a linear ramp the cumulative rate is R·t²/2T until T, then
        // R·(t − T/2): invert it.
        let t = if self.ramp_s <= 0.0 {
            self.u
        } else if self.u <= self.ramp_s / 2.0 {
            (2.0 * self.ramp_s * self.u).sqrt()
        } else {
            self.u + self.ramp_s / 2.0
        };
        Duration::from_secs_f64(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offsets(kind: ArrivalKind, b: f64, ramp: f64, n: usize, seed: u64) -> Vec<f64> {
        let mut a = Arrivals::new(kind, 100.0, b, Duration::from_secs_f64(ramp), seed);
        (0..n).map(|_| a.next_offset().as_secs_f64()).collect()
    }

    #[test]
    fn mean_rate_within_tolerance() {
        for (kind, b) in [
            (ArrivalKind::Poisson, 1.0),
            (ArrivalKind::Constant, 1.0),
            (ArrivalKind::Gamma, 0.5),
            (ArrivalKind::Gamma, 4.0),
        ] {
            let n = 50_000;
            let t = offsets(kind, b, 0.0, n, 7);
            let rate = n as f64 / t[n - 1];
            assert!((rate - 100.0).abs() < 2.0, "{kind:?} {b}: rate {rate}");
        }
    }

    #[test]
    fn burstiness_changes_spread() {
        let cv = |t: &[f64]| {
            let gaps: Vec<f64> = t.windows(2).map(|w| w[1] - w[0]).collect();
            let m = gaps.iter().sum::<f64>() / gaps.len() as f64;
            let var = gaps.iter().map(|g| (g - m).powi(2)).sum::<f64>() / gaps.len() as f64;
            var.sqrt() / m
        };
        let bursty = cv(&offsets(ArrivalKind::Gamma, 0.25, 0.0, 20_000, 3));
        let poisson = cv(&offsets(ArrivalKind::Poisson, 1.0, 0.0, 20_000, 3));
        let smooth = cv(&offsets(ArrivalKind::Gamma, 4.0, 0.0, 20_000, 3));
        assert!((poisson - 1.0).abs() < 0.05, "{poisson}");
        assert!((bursty - 2.0).abs() < 0.15, "{bursty}"); // cv = 1/sqrt(shape)
        assert!((smooth - 0.5).abs() < 0.05, "{smooth}");
        let c = cv(&offsets(ArrivalKind::Constant, 1.0, 0.0, 100, 3));
        assert!(c < 1e-6);
    }

    #[test]
    fn deterministic_by_seed() {
        assert_eq!(
            offsets(ArrivalKind::Poisson, 1.0, 0.0, 100, 9),
            offsets(ArrivalKind::Poisson, 1.0, 0.0, 100, 9)
        );
        assert_ne!(
            offsets(ArrivalKind::Poisson, 1.0, 0.0, 100, 9),
            offsets(ArrivalKind::Poisson, 1.0, 0.0, 100, 10)
        );
    }

    #[test]
    fn ramp_up_is_linear() {
        // 10 s ramp to 100/s: R·t²/2T = 125 arrivals by 5 s, 500 by 10 s, then 100/s.
        let t = offsets(ArrivalKind::Constant, 1.0, 10.0, 2_000, 1);
        let before = |s: f64| t.iter().filter(|&&x| x <= s).count();
        assert!((before(5.0) as i64 - 125).abs() <= 2, "{}", before(5.0));
        assert!((before(10.0) as i64 - 500).abs() <= 2, "{}", before(10.0));
        assert!((before(15.0) as i64 - 1000).abs() <= 2, "{}", before(15.0));
    }
}
