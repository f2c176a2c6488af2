//! Open-loop arrival times: Poisson (exponential gaps) or gamma gaps for burstier traffic.
//!
//! The gap between arrivals is Gamma(shape = burstiness, scale = 1 / (rate · burstiness)),
//! so the mean rate is `rate` whatever the burstiness; burstiness 1 is a Poisson process,
//! below 1 is burstier, above 1 is smoother (as in vLLM's `--burstiness`).

use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Gamma};

/// Bad arrival parameters.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ArrivalError {
    #[error("request rate must be > 0 (got {0})")]
    Rate(f64),
    #[error("burstiness must be > 0 (got {0})")]
    Burstiness(f64),
}

/// A seeded stream of gaps between arrivals. An infinite rate yields zero gaps.
pub struct Arrivals {
    gamma: Option<Gamma<f64>>,
    rng: StdRng,
}

impl Arrivals {
    pub fn new(rate: f64, burstiness: f64, seed: u64) -> Result<Self, ArrivalError> {
        if rate.is_nan() || rate <= 0.0 {
            return Err(ArrivalError::Rate(rate));
        }
        if !burstiness.is_finite() || burstiness <= 0.0 {
            return Err(ArrivalError::Burstiness(burstiness));
        }
        let gamma = if rate.is_infinite() {
            None
        } else {
            let scale = 1.0 / (rate * burstiness);
            Some(Gamma::new(burstiness, scale).map_err(|_| ArrivalError::Rate(rate))?)
        };
        Ok(Self {
            gamma,
            rng: StdRng::seed_from_u64(seed),
        })
    }

    /// The next gap.
    pub fn next_gap(&mut self) -> Duration {
        match &self.gamma {
            None => Duration::ZERO,
            Some(g) => Duration::from_secs_f64(g.sample(&mut self.rng).max(0.0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kolmogorov–Smirnov statistic of `samples` against the CDF `cdf`.
    fn ks(mut samples: Vec<f64>, cdf: impl Fn(f64) -> f64) -> f64 {
        samples.sort_by(f64::total_cmp);
        let n = samples.len() as f64;
        samples
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let f = cdf(x);
                (f - i as f64 / n).abs().max(((i + 1) as f64 / n - f).abs())
            })
            .fold(0.0, f64::max)
    }

    #[test]
    fn poisson_gaps_fit_the_requested_rate() {
        let rate = 8.0;
        let mut a = Arrivals::new(rate, 1.0, 42).unwrap();
        let gaps: Vec<f64> = (0..5000).map(|_| a.next_gap().as_secs_f64()).collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        // Standard error of the mean gap is (1/rate)/sqrt(n) ≈ 0.0018 s; allow 4 of them.
        assert!((mean - 1.0 / rate).abs() < 0.007, "mean gap {mean}");
        // KS against Exp(rate): the 1% critical value is 1.63 / sqrt(n) ≈ 0.023.
        let d = ks(gaps, |x| 1.0 - (-rate * x).exp());
        assert!(d < 1.63 / (5000f64).sqrt(), "KS statistic {d}");
    }

    #[test]
    fn poisson_counts_per_window_fit_chi_square() {
        // Arrivals of a Poisson process at rate 5/s counted in 1 s windows are Poisson(5).
        let mut a = Arrivals::new(5.0, 1.0, 7).unwrap();
        let windows = 2000usize;
        let mut counts = vec![0u32; windows];
        let mut t = 0.0;
        loop {
            t += a.next_gap().as_secs_f64();
            if t >= windows as f64 {
                break;
            }
            counts[t as usize] += 1;
        }
        // Bins 0..=1, 2, 3, …, 9, ≥10 so every expected count is large.
        let pmf =
            |k: u32| (-5f64).exp() * 5f64.powi(k as i32) / (1..=k).map(f64::from).product::<f64>();
        let mut expected = vec![pmf(0) + pmf(1)];
        expected.extend((2..=9).map(pmf));
        expected.push(1.0 - expected.iter().sum::<f64>());
        let mut observed = vec![0f64; expected.len()];
        for c in counts {
            let bin = match c {
                0 | 1 => 0,
                c if c >= 10 => expected.len() - 1,
                c => c as usize - 1,
            };
            observed[bin] += 1.0;
        }
        let chi2: f64 = observed
            .iter()
            .zip(&expected)
            .map(|(o, e)| (o - e * windows as f64).powi(2) / (e * windows as f64))
            .sum();
        // 10 bins → 9 degrees of freedom; the 1% critical value is 21.67.
        assert!(chi2 < 21.67, "chi-square {chi2}");
    }

    #[test]
    fn gamma_keeps_the_mean_rate_and_changes_the_spread() {
        let mut a = Arrivals::new(10.0, 0.25, 3).unwrap();
        let gaps: Vec<f64> = (0..20000).map(|_| a.next_gap().as_secs_f64()).collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
        assert!((mean - 0.1).abs() < 0.005, "mean {mean}");
        // CV² of Gamma(k) is 1/k = 4.
        let cv2 = var / (mean * mean);
        assert!((cv2 - 4.0).abs() < 0.6, "cv² {cv2}");
    }

    #[test]
    fn same_seed_same_arrivals_and_infinite_rate_is_zero() {
        let mut a = Arrivals::new(3.0, 1.0, 9).unwrap();
        let mut b = Arrivals::new(3.0, 1.0, 9).unwrap();
        assert!((0..100).all(|_| a.next_gap() == b.next_gap()));
        let mut inf = Arrivals::new(f64::INFINITY, 1.0, 1).unwrap();
        assert_eq!(inf.next_gap(), Duration::ZERO);
        assert_eq!(
            Arrivals::new(0.0, 1.0, 1).err(),
            Some(ArrivalError::Rate(0.0))
        );
        assert_eq!(
            Arrivals::new(1.0, -1.0, 1).err(),
            Some(ArrivalError::Burstiness(-1.0))
        );
    }
}
