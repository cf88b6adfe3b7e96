//! How a rollout moves traffic through interfaces teams already run: the OpenFeature flagd
//! flag definition of a split between the version in service (`stable`) and the `candidate`.
//! flagd's file sync and the OpenFeature SDKs' in-process flagd providers read it; its
//! `fractional` targeting buckets each evaluation by the flag key and the caller's targeting
//! key, so one user stays on one variant while the weight holds.

use serde_json::{Value, json};

/// The variant serving the version in service.
pub const STABLE: &str = "stable";
/// The variant serving the version being rolled out.
pub const CANDIDATE: &str = "candidate";

/// The candidate's share of traffic, in basis points (0 to 10,000; 500 is 5%).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Weight(u16);

impl Weight {
    pub const NONE: Self = Self(0);
    pub const ALL: Self = Self(10_000);

    /// A weight from a percentage (5.0 is 5%).
    ///
    /// # Errors
    /// A percentage outside 0..=100 (or not a number), named.
    pub fn percent(p: f64) -> Result<Self, String> {
        if !(0.0..=100.0).contains(&p) {
            return Err(format!("a weight is a percentage from 0 to 100, not {p}"));
        }
        Ok(Self((p * 100.0).round() as u16))
    }

    pub fn basis_points(self) -> u16 {
        self.0
    }

    pub fn as_percent(self) -> f64 {
        f64::from(self.0) / 100.0
    }
}

/// The flagd flag definition (a whole flags file) for `flag_key` with the candidate at
/// `weight`: variants `stable` and `candidate` (their values are their names; an
/// application maps them to its endpoints), the stable one the default when targeting cannot
/// be evaluated, and a `fractional` split in basis points.
pub fn flagd_definition(flag_key: &str, weight: Weight) -> Value {
    flagd_definition_for(flag_key, weight, false)
}

/// As [`flagd_definition`]; for a shadow rollout (`shadow`), the flag's metadata says
/// `"mode": "shadow"`: the router serves every request from the stable variant and sends a
/// copy of the share the flag gives the candidate to the candidate, keeping both answers.
pub fn flagd_definition_for(flag_key: &str, weight: Weight, shadow: bool) -> Value {
    let mut v = flagd_split(flag_key, weight);
    v["flags"][flag_key]["metadata"] = json!({ "mode": if shadow { "shadow" } else { "split" } });
    v
}

fn flagd_split(flag_key: &str, weight: Weight) -> Value {
    let candidate = weight.basis_points();
    json!({
        "$schema": "https://flagd.dev/schema/v0/flags.json",
        "flags": {
            flag_key: {
                "state": "ENABLED",
                "variants": { STABLE: STABLE, CANDIDATE: CANDIDATE },
                "defaultVariant": STABLE,
                "targeting": {
                    "fractional": [
                        [STABLE, 10_000 - candidate],
                        [CANDIDATE, candidate]
                    ]
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_percentages_kept_in_basis_points() {
        assert_eq!(Weight::percent(5.0).unwrap().basis_points(), 500);
        assert_eq!(Weight::percent(0.25).unwrap().basis_points(), 25);
        assert_eq!(Weight::percent(100.0).unwrap(), Weight::ALL);
        assert_eq!(Weight::percent(12.5).unwrap().as_percent(), 12.5);
        for bad in [-1.0, 100.5, f64::NAN] {
            assert!(
                Weight::percent(bad).unwrap_err().contains("0 to 100"),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_flag_splits_between_the_two_slots_by_weight() {
        let flags = flagd_definition("model-version", Weight::percent(5.0).unwrap());
        assert_eq!(
            flags,
            json!({
                "$schema": "https://flagd.dev/schema/v0/flags.json",
                "flags": { "model-version": {
                    "state": "ENABLED",
                    "variants": { "stable": "stable", "candidate": "candidate" },
                    "defaultVariant": "stable",
                    "targeting": { "fractional": [["stable", 9500], ["candidate", 500]] },
                    "metadata": { "mode": "split" }
                } }
            })
        );
        // A shadow's flag says so: the share is mirrored, not served.
        let shadow = flagd_definition_for("model-version", Weight::percent(10.0).unwrap(), true);
        assert_eq!(
            shadow["flags"]["model-version"]["metadata"]["mode"],
            "shadow"
        );
        // Back to zero (an abort): every evaluation is the stable's.
        let off = flagd_definition("model-version", Weight::NONE);
        assert_eq!(
            off["flags"]["model-version"]["targeting"]["fractional"],
            json!([["stable", 10_000], ["candidate", 0]])
        );
    }
}
