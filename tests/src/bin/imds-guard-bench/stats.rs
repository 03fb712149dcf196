//! How the bench compares: arms measured in interleaved rounds (A B C, then B C A, ...), so
//! that the machine's drift lands on every arm alike; per-round ratios against the baseline;
//! medians with a distribution-free confidence interval.

use std::fmt;

/// Confidence of [`Estimate`]'s interval, at least.
pub const CONFIDENCE: f64 = 0.95;

/// The median of some samples and a confidence interval for it.
#[derive(Clone, Copy, Debug)]
pub struct Estimate {
    pub median: f64,
    /// The interval, from order statistics: it holds the true median with probability at least
    /// [`CONFIDENCE`] whatever the distribution (the sign test's interval), for 6 samples or
    /// more; with fewer it is the whole range.
    pub low: f64,
    pub high: f64,
}

/// The median and its interval of `samples` (at least one).
pub fn estimate(samples: &[f64]) -> Estimate {
    assert!(!samples.is_empty(), "no samples");
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        f64::midpoint(sorted[n / 2 - 1], sorted[n / 2])
    };
    let k = outer_ranks(n);
    Estimate {
        median,
        low: sorted[k],
        high: sorted[n - 1 - k],
    }
}

/// The 0-based rank `k` of the interval's ends (`k` and `n - 1 - k`): the sign test's
/// `[x(j), x(n + 1 - j)]` (1-based) for the largest `j` with P(Binomial(n, ½) < j) ≤
/// (1 − CONFIDENCE) / 2; the whole range when there is none (fewer than 6 samples).
fn outer_ranks(n: usize) -> usize {
    let tail = (1.0 - CONFIDENCE) / 2.0;
    // P(X = i) for X ~ Binomial(n, ½), and P(X ≤ i).
    let mut probability = 0.5f64.powi(i32::try_from(n).expect("samples"));
    let mut cumulative = probability;
    let mut j = 0;
    for i in 0..n {
        if cumulative > tail {
            break;
        }
        j = i + 1;
        #[expect(clippy::cast_precision_loss, reason = "small counts")]
        {
            probability *= (n - i) as f64 / (i + 1) as f64;
        }
        cumulative += probability;
    }
    j.saturating_sub(1).min((n - 1) / 2)
}

impl Estimate {
    /// `f(median) [f(low), f(high)]`.
    pub fn show(&self, f: impl Fn(f64) -> String) -> String {
        format!("{} [{}, {}]", f(self.median), f(self.low), f(self.high))
    }
}

impl fmt::Display for Estimate {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(out, "{}", self.show(|x| format!("{x:.3}")))
    }
}

/// Measures each arm once per round for `rounds` rounds, the order rotating by one each round;
/// `samples[arm][round]`.
pub fn interleave(rounds: usize, arms: &mut [&mut dyn FnMut() -> f64]) -> Vec<Vec<f64>> {
    let mut samples = vec![Vec::with_capacity(rounds); arms.len()];
    for round in 0..rounds {
        crate::check_abort();
        for turn in 0..arms.len() {
            let arm = (round + turn) % arms.len();
            let sample = (arms[arm])();
            samples[arm].push(sample);
        }
    }
    samples
}

/// Per-round ratios of `arm` to `base` (same round).
pub fn ratios(arm: &[f64], base: &[f64]) -> Vec<f64> {
    arm.iter().zip(base).map(|(a, b)| a / b).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_is_the_sign_tests() {
        // Binomial(10, ½): P(X ≤ 1) = 11/1024 ≤ 2.5% < P(X ≤ 2) = 56/1024: ranks 2 and 9.
        let samples: Vec<f64> = (1..=10).map(f64::from).collect();
        let e = estimate(&samples);
        assert_eq!((e.median, e.low, e.high), (5.5, 2.0, 9.0));
        // n = 11: P(X ≤ 1) = 12/2048, P(X ≤ 2) = 67/2048 > 2.5%: ranks 2 and 10.
        let samples: Vec<f64> = (1..=11).rev().map(f64::from).collect();
        let e = estimate(&samples);
        assert_eq!((e.median, e.low, e.high), (6.0, 2.0, 10.0));
        // n = 5: even the extremes leave 2 × 1/32 > 5% outside: the whole range.
        let e = estimate(&[3.0, 1.0, 2.0, 5.0, 4.0]);
        assert_eq!((e.median, e.low, e.high), (3.0, 1.0, 5.0));
        // n = 20: P(X ≤ 5) = 2.07%, P(X ≤ 6) = 5.8%: ranks 6 and 15.
        let samples: Vec<f64> = (1..=20).map(f64::from).collect();
        let e = estimate(&samples);
        assert_eq!((e.low, e.high), (6.0, 15.0));
    }

    #[test]
    fn rounds_rotate_the_order() {
        let order = std::cell::RefCell::new(Vec::new());
        let (mut a, mut b, mut c) = (
            || {
                order.borrow_mut().push('a');
                1.0
            },
            || {
                order.borrow_mut().push('b');
                2.0
            },
            || {
                order.borrow_mut().push('c');
                3.0
            },
        );
        let samples = interleave(3, &mut [&mut a, &mut b, &mut c]);
        assert_eq!(samples, vec![vec![1.0; 3], vec![2.0; 3], vec![3.0; 3]]);
        assert_eq!(
            order.into_inner().into_iter().collect::<String>(),
            "abcbcacab"
        );
    }
}
