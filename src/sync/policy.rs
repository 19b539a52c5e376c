//! The decision at the heart of sync: given an associated pair's baseline
//! and both sides' current values, what should both sides hold afterwards?
//!
//! A pure function, so the whole policy matrix is tested as a table.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::model::{ConflictPolicy, Direction, Fallback, Values};

/// What the decision did, for the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "outcome")]
pub enum Outcome {
    /// Both sides already agree with the baseline: nothing to do.
    Unchanged,
    /// Both sides changed to the same values: only the baseline moves.
    Converged,
    /// Changes flowed from one side to the other.
    Applied { from: Side },
    /// Both sides changed different fields; `merge` kept all of them.
    Merged,
    /// The direction disregarded these changes on `side`; they are put back.
    Overwritten { side: Side, fields: BTreeSet<String> },
    /// Both sides changed; the policy decided.
    ConflictResolved {
        policy: String,
        local_lost: BTreeSet<String>,
        ldap_lost: BTreeSet<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    Local,
    Ldap,
}

/// The values both sides should hold after the sync, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub result: Values,
    pub outcome: Outcome,
}

/// Decides an associated pair: `fields` are the mapped fields compared.
pub fn decide(
    direction: Direction,
    policy: ConflictPolicy,
    fields: &BTreeSet<String>,
    baseline: &Values,
    local: &Values,
    ldap: &Values,
) -> Decision {
    let get = |v: &Values, f: &str| v.get(f).cloned().unwrap_or_default();
    // A field one side changed and the other does not already agree with.
    let mut local_changed = BTreeSet::new();
    let mut ldap_changed = BTreeSet::new();
    let mut converged = false;
    for f in fields {
        let (b, l, d) = (get(baseline, f), get(local, f), get(ldap, f));
        if l != b && l != d {
            local_changed.insert(f.clone());
        }
        if d != b && d != l {
            ldap_changed.insert(f.clone());
        }
        converged |= l == d && l != b;
    }
    let take = |from: &Values| -> Values {
        fields
            .iter()
            .map(|f| (f.clone(), get(from, f)))
            .filter(|(_, v)| !v.is_empty())
            .collect()
    };
    let nothing_to_do = local_changed.is_empty() && ldap_changed.is_empty();
    if nothing_to_do {
        let outcome = if converged {
            Outcome::Converged
        } else {
            Outcome::Unchanged
        };
        return Decision {
            result: take(local),
            outcome,
        };
    }
    match direction {
        Direction::LdapToLocal => {
            let outcome = if local_changed.is_empty() {
                Outcome::Applied { from: Side::Ldap }
            } else {
                Outcome::Overwritten {
                    side: Side::Local,
                    fields: local_changed,
                }
            };
            Decision {
                result: take(ldap),
                outcome,
            }
        }
        Direction::LocalToLdap => {
            let outcome = if ldap_changed.is_empty() {
                Outcome::Applied { from: Side::Local }
            } else {
                Outcome::Overwritten {
                    side: Side::Ldap,
                    fields: ldap_changed,
                }
            };
            Decision {
                result: take(local),
                outcome,
            }
        }
        Direction::Both if ldap_changed.is_empty() => Decision {
            result: take(local),
            outcome: Outcome::Applied { from: Side::Local },
        },
        Direction::Both if local_changed.is_empty() => Decision {
            result: take(ldap),
            outcome: Outcome::Applied { from: Side::Ldap },
        },
        Direction::Both => resolve(policy, fields, baseline, local, ldap, local_changed, ldap_changed),
    }
}

/// Both sides changed the object.
fn resolve(
    policy: ConflictPolicy,
    fields: &BTreeSet<String>,
    baseline: &Values,
    local: &Values,
    ldap: &Values,
    local_changed: BTreeSet<String>,
    ldap_changed: BTreeSet<String>,
) -> Decision {
    // For each field, the side whose value is kept.
    let pick = |f: &String| -> Pick {
        let in_local = local_changed.contains(f);
        let in_ldap = ldap_changed.contains(f);
        let whole_object = |p: Fallback| match p {
            Fallback::LocalWins => Pick::Local,
            Fallback::LdapWins => Pick::Ldap,
            // Fields both sides already agree on stay; the rest go back.
            Fallback::NoChange if in_local || in_ldap => Pick::Baseline,
            Fallback::NoChange => Pick::Local,
        };
        match policy {
            ConflictPolicy::LocalWins => whole_object(Fallback::LocalWins),
            ConflictPolicy::LdapWins => whole_object(Fallback::LdapWins),
            ConflictPolicy::NoChange => whole_object(Fallback::NoChange),
            ConflictPolicy::Merge(fallback) => match (in_local, in_ldap) {
                (true, true) => whole_object(fallback),
                (true, false) => Pick::Local,
                (false, true) => Pick::Ldap,
                (false, false) => Pick::Local,
            },
        }
    };
    let mut result = Values::new();
    let mut local_lost = BTreeSet::new();
    let mut ldap_lost = BTreeSet::new();
    for f in fields {
        let source = match pick(f) {
            Pick::Local => local,
            Pick::Ldap => ldap,
            Pick::Baseline => baseline,
        };
        let value = source.get(f).cloned().unwrap_or_default();
        if local_changed.contains(f) && local.get(f).cloned().unwrap_or_default() != value {
            local_lost.insert(f.clone());
        }
        if ldap_changed.contains(f) && ldap.get(f).cloned().unwrap_or_default() != value {
            ldap_lost.insert(f.clone());
        }
        if !value.is_empty() {
            result.insert(f.clone(), value);
        }
    }
    let outcome = if local_lost.is_empty() && ldap_lost.is_empty() {
        Outcome::Merged
    } else {
        Outcome::ConflictResolved {
            policy: policy.to_string(),
            local_lost,
            ldap_lost,
        }
    };
    Decision { result, outcome }
}

enum Pick {
    Local,
    Ldap,
    Baseline,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(a: &str, b: &str) -> Values {
        [("a", a), ("b", b)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), vec![v.to_owned()]))
            .collect()
    }

    fn short(outcome: &Outcome) -> String {
        let set = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(",");
        match outcome {
            Outcome::Unchanged => "unchanged".into(),
            Outcome::Converged => "converged".into(),
            Outcome::Merged => "merged".into(),
            Outcome::Applied { from: Side::Local } => "applied from local".into(),
            Outcome::Applied { from: Side::Ldap } => "applied from ldap".into(),
            Outcome::Overwritten { side, fields } => format!("{side:?} overwritten: {}", set(fields)).to_lowercase(),
            Outcome::ConflictResolved {
                local_lost, ldap_lost, ..
            } => {
                format!(
                    "conflict, local lost [{}], ldap lost [{}]",
                    set(local_lost),
                    set(ldap_lost)
                )
            }
        }
    }

    /// The baseline is a=1 b=1; each scenario gives (local, ldap).
    fn scenario(name: &str) -> (Values, Values) {
        match name {
            "neither" => (values("1", "1"), values("1", "1")),
            "local only" => (values("2", "1"), values("1", "1")),
            "ldap only" => (values("1", "1"), values("1", "3")),
            "both, disjoint" => (values("2", "1"), values("1", "3")),
            "both, overlapping" => (values("2", "1"), values("3", "1")),
            "both, same change" => (values("2", "1"), values("2", "1")),
            other => panic!("no scenario {other}"),
        }
    }

    #[test]
    fn policy_matrix() {
        use ConflictPolicy::*;
        use Direction::*;
        const ALL: [ConflictPolicy; 6] = [
            LocalWins,
            LdapWins,
            NoChange,
            Merge(Fallback::LocalWins),
            Merge(Fallback::LdapWins),
            Merge(Fallback::NoChange),
        ];
        // (direction, policies the row holds for, scenario, result a b, outcome)
        type Row<'a> = (Direction, &'a [ConflictPolicy], &'a str, (&'a str, &'a str), &'a str);
        let rows: &[Row] = &[
            (LdapToLocal, &ALL, "neither", ("1", "1"), "unchanged"),
            (LdapToLocal, &ALL, "local only", ("1", "1"), "local overwritten: a"),
            (LdapToLocal, &ALL, "ldap only", ("1", "3"), "applied from ldap"),
            (LdapToLocal, &ALL, "both, disjoint", ("1", "3"), "local overwritten: a"),
            (
                LdapToLocal,
                &ALL,
                "both, overlapping",
                ("3", "1"),
                "local overwritten: a",
            ),
            (LdapToLocal, &ALL, "both, same change", ("2", "1"), "converged"),
            (LocalToLdap, &ALL, "neither", ("1", "1"), "unchanged"),
            (LocalToLdap, &ALL, "local only", ("2", "1"), "applied from local"),
            (LocalToLdap, &ALL, "ldap only", ("1", "1"), "ldap overwritten: b"),
            (LocalToLdap, &ALL, "both, disjoint", ("2", "1"), "ldap overwritten: b"),
            (
                LocalToLdap,
                &ALL,
                "both, overlapping",
                ("2", "1"),
                "ldap overwritten: a",
            ),
            (LocalToLdap, &ALL, "both, same change", ("2", "1"), "converged"),
            (Both, &ALL, "neither", ("1", "1"), "unchanged"),
            (Both, &ALL, "local only", ("2", "1"), "applied from local"),
            (Both, &ALL, "ldap only", ("1", "3"), "applied from ldap"),
            (Both, &ALL, "both, same change", ("2", "1"), "converged"),
            (
                Both,
                &[LocalWins],
                "both, disjoint",
                ("2", "1"),
                "conflict, local lost [], ldap lost [b]",
            ),
            (
                Both,
                &[LdapWins],
                "both, disjoint",
                ("1", "3"),
                "conflict, local lost [a], ldap lost []",
            ),
            (
                Both,
                &[NoChange],
                "both, disjoint",
                ("1", "1"),
                "conflict, local lost [a], ldap lost [b]",
            ),
            (Both, &ALL[3..], "both, disjoint", ("2", "3"), "merged"),
            (
                Both,
                &[LocalWins, Merge(Fallback::LocalWins)],
                "both, overlapping",
                ("2", "1"),
                "conflict, local lost [], ldap lost [a]",
            ),
            (
                Both,
                &[LdapWins, Merge(Fallback::LdapWins)],
                "both, overlapping",
                ("3", "1"),
                "conflict, local lost [a], ldap lost []",
            ),
            (
                Both,
                &[NoChange, Merge(Fallback::NoChange)],
                "both, overlapping",
                ("1", "1"),
                "conflict, local lost [a], ldap lost [a]",
            ),
        ];
        let fields: BTreeSet<String> = ["a".to_owned(), "b".to_owned()].into();
        let mut checked = BTreeSet::new();
        for (direction, policies, name, (a, b), outcome) in rows {
            for policy in *policies {
                let (local, ldap) = scenario(name);
                let decision = decide(*direction, *policy, &fields, &values("1", "1"), &local, &ldap);
                let case = format!("{direction} / {policy} / {name}");
                assert_eq!(decision.result, values(a, b), "{case}: result");
                assert_eq!(short(&decision.outcome), *outcome, "{case}: outcome");
                assert!(checked.insert(case.clone()), "{case} is in the table twice");
            }
        }
        // Every direction x policy x scenario, each once: 3 x 6 x 6 distinct cases.
        assert_eq!(checked.len(), 3 * 6 * 6);
    }

    #[test]
    fn absent_fields_count_as_empty() {
        let fields: BTreeSet<String> = ["a".to_owned()].into();
        let baseline = Values::new();
        let ldap: Values = [("a".to_owned(), vec!["x".to_owned()])].into();
        let d = decide(
            Direction::Both,
            ConflictPolicy::LocalWins,
            &fields,
            &baseline,
            &Values::new(),
            &ldap,
        );
        assert_eq!((d.result, d.outcome), (ldap, Outcome::Applied { from: Side::Ldap }));
    }
}
