//! Key distributions over N counters: uniform, or Zipf (rank 1 hottest).

use std::fmt;
use std::str::FromStr;

/// How keys are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Dist {
    Uniform,
    /// Zipf with exponent `s` (P(rank k) ∝ 1/k^s).
    Zipf(f64),
}

impl FromStr for Dist {
    type Err = String;

    /// `uniform`, `zipf` (s = 0.99) or `zipf:S`.
    fn from_str(s: &str) -> Result<Dist, String> {
        match s {
            "uniform" => Ok(Dist::Uniform),
            "zipf" => Ok(Dist::Zipf(0.99)),
            _ => match s.strip_prefix("zipf:").map(str::parse::<f64>) {
                Some(Ok(x)) if x > 0.0 => Ok(Dist::Zipf(x)),
                _ => Err(format!("{s:?}: expected uniform, zipf or zipf:S")),
            },
        }
    }
}

impl fmt::Display for Dist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dist::Uniform => f.write_str("uniform"),
            Dist::Zipf(s) => write!(f, "zipf:{s}"),
        }
    }
}

/// N counter keys (`k0000000` …) and a sampler over them.
pub struct KeySpace {
    names: Vec<String>,
    /// Cumulative probabilities for Zipf; `None` for uniform.
    cdf: Option<Vec<f64>>,
}

impl KeySpace {
    pub fn new(n: usize, dist: Dist) -> KeySpace {
        let names = (0..n).map(key_name).collect();
        let cdf = match dist {
            Dist::Uniform => None,
            Dist::Zipf(s) => {
                let mut acc = 0.0;
                let mut cdf: Vec<f64> = (1..=n)
                    .map(|k| {
                        acc += 1.0 / (k as f64).powf(s);
                        acc
                    })
                    .collect();
                for c in cdf.iter_mut() {
                    *c /= acc;
                }
                Some(cdf)
            }
        };
        KeySpace { names, cdf }
    }

    /// Given names, drawn uniformly.
    pub fn from_names(names: Vec<String>) -> KeySpace {
        KeySpace { names, cdf: None }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn name(&self, i: usize) -> &str {
        &self.names[i]
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// One key index drawn from the distribution.
    pub fn sample(&self, rng: &mut fastrand::Rng) -> usize {
        match &self.cdf {
            None => rng.usize(..self.names.len()),
            Some(cdf) => {
                let u = rng.f64();
                cdf.partition_point(|c| *c < u).min(cdf.len() - 1)
            }
        }
    }
}

/// The name of key `i`; fixed width so every event has the same size.
pub fn key_name(i: usize) -> String {
    format!("k{i:07}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_prefers_low_ranks_and_stays_in_range() {
        let ks = KeySpace::new(1000, Dist::Zipf(1.0));
        let mut rng = fastrand::Rng::with_seed(7);
        let mut hits = vec![0u32; 1000];
        for _ in 0..100_000 {
            hits[ks.sample(&mut rng)] += 1;
        }
        assert!(hits[0] > hits[9] && hits[9] > hits[999]);
        assert_eq!("zipf:1.2".parse::<Dist>(), Ok(Dist::Zipf(1.2)));
        assert!("zipf:x".parse::<Dist>().is_err());
    }
}
