//! `ferryctl plan`: how many target agents of which type move a data set before its deadline at
//! the least cost. Pure: the inputs are values, the answer is a value; nothing here reads a file
//! or the clock.
//!
//! The model (all in GB and hours, so the solver's numbers stay near 1):
//!
//! - `rᵢ` agents of type `i` (integer, `0 ≤ rᵢ ≤ max_countᵢ`), each moving `pᵢ` GB an hour at
//!   `cᵢ` an hour;
//! - `xᵢ` GB carried by the agents of type `i` (`0 ≤ xᵢ ≤ rᵢ·pᵢ·T`, `Σ xᵢ = D`): so the fleet's
//!   throughput `Σ rᵢ·pᵢ` is at least `P = D / T`, the seed's constraint;
//! - the path carries at most `B` GB an hour: `D ≤ B·T` (more agents do not widen it);
//! - minimise `T·Σ cᵢ·rᵢ + Σ eᵢ·xᵢ`: the fleet rented for the deadline plus egress at each
//!   type's price per GB.
//!
//! Solved exactly by good_lp with the pure-Rust microlp backend (branch and bound), then twice
//! more to break ties the same way every time: among the cheapest plans the fewest agents, then
//! the types listed first in the catalog. A tie (another plan as cheap with as many agents) is
//! reported.

use good_lp::{
    constraint, solvers::microlp::microlp, variable, Expression, ProblemVariables, Solution,
    SolverModel, Variable,
};
use serde::{Deserialize, Serialize};

/// One type of target agent a plan may use (a `[[agent]]` of the catalog).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentType {
    /// Name (an instance type, say).
    pub name: String,
    /// Price of one agent of this type per hour.
    pub price_per_hour: f64,
    /// What one agent moves, in bytes per second (written as a rate: `2.5gbit`).
    #[serde(with = "rate_text")]
    pub throughput: u64,
    /// Most agents of this type the plan may use (quota, capacity).
    pub max_count: u32,
    /// Price per GB (10⁹ bytes) that reaches this type (egress of the source's network).
    #[serde(default)]
    pub egress_per_gb: f64,
}

mod rate_text {
    use ferry_common::rate::Rate;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes_per_s: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&Rate(bytes_per_s.saturating_mul(8)).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = String::deserialize(d)?;
        let rate: Rate = text.parse().map_err(serde::de::Error::custom)?;
        Ok(rate.0 / 8)
    }
}

/// The catalog file: `[[agent]]` entries.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// The types.
    #[serde(rename = "agent")]
    pub agents: Vec<AgentType>,
}

/// What to plan for.
#[derive(Debug, Clone, PartialEq)]
pub struct Inputs {
    /// Bytes to move.
    pub bytes: u64,
    /// Seconds until the copy must be done.
    pub deadline_secs: u64,
    /// What the path between the sites carries, bytes per second (`None`: not limiting).
    pub path_limit: Option<u64>,
}

/// A plan's agents of one type.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pick {
    /// The type's name.
    pub agent_type: String,
    /// How many.
    pub count: u32,
    /// Bytes these agents carry.
    pub bytes: u64,
}

/// The cheapest plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// Agents by type, in catalog order (types not used left out).
    pub agents: Vec<Pick>,
    /// Agents in all.
    pub agent_count: u32,
    /// What they move together, bytes per second (the path's limit if that is lower).
    pub throughput: u64,
    /// Predicted duration at that throughput, seconds.
    pub duration_secs: u64,
    /// The fleet's price per hour.
    pub price_per_hour: f64,
    /// The fleet rented until the deadline (what the plan minimised).
    pub compute_cost: f64,
    /// The fleet rented for the predicted duration only.
    pub compute_cost_at_duration: f64,
    /// Egress.
    pub egress_cost: f64,
    /// `compute_cost + egress_cost`.
    pub total_cost: f64,
    /// The constraints that shape the plan, in words.
    pub binding: Vec<String>,
    /// Another plan exactly as cheap with as many agents, if one exists (the catalog order
    /// chose between them).
    pub tie: Option<Vec<Pick>>,
}

/// Why no plan meets the inputs, and what would make one.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// The inputs make no sense.
    #[error("{0}")]
    Input(String),
    /// The deadline cannot be met; `0` says why and what would meet it.
    #[error("no plan meets the deadline: {0}")]
    Infeasible(String),
    /// The solver failed.
    #[error("the solver failed: {0}")]
    Solver(String),
}

const GB: f64 = 1e9;
const HOUR: f64 = 3600.0;

/// A rate as people read it: bits per second.
pub fn rate_text(bytes_per_s: f64) -> String {
    let bits = bytes_per_s * 8.0;
    for (unit, scale) in [
        ("Tbit/s", 1e12),
        ("Gbit/s", 1e9),
        ("Mbit/s", 1e6),
        ("kbit/s", 1e3),
    ] {
        if bits >= scale {
            return format!("{:.2} {unit}", bits / scale);
        }
    }
    format!("{bits:.0} bit/s")
}

/// Seconds as people read them: `3d 4h`, `2h 05m`, `40m`, `12s`.
pub fn duration_text(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 && m > 0 {
        format!("{d}d {h}h {m:02}m")
    } else if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m:02}m")
    } else if m > 0 {
        format!("{m}m {s:02}s")
    } else {
        format!("{s}s")
    }
}

fn check(catalog: &Catalog, inputs: &Inputs) -> Result<(), PlanError> {
    let bad = |m: String| Err(PlanError::Input(m));
    if catalog.agents.is_empty() {
        return bad("the catalog lists no agent types ([[agent]] entries)".into());
    }
    if inputs.bytes == 0 {
        return bad("nothing to move: give the data's size (--data 50TB)".into());
    }
    if inputs.deadline_secs == 0 {
        return bad("a deadline of 0 cannot be met".into());
    }
    let mut names = std::collections::BTreeSet::new();
    for t in &catalog.agents {
        if !names.insert(t.name.as_str()) {
            return bad(format!("the catalog lists agent type {:?} twice", t.name));
        }
        if !(t.price_per_hour.is_finite() && t.price_per_hour >= 0.0) {
            return bad(format!("{}: price_per_hour must be 0 or more", t.name));
        }
        if !(t.egress_per_gb.is_finite() && t.egress_per_gb >= 0.0) {
            return bad(format!("{}: egress_per_gb must be 0 or more", t.name));
        }
        if t.throughput == 0 {
            return bad(format!("{}: throughput must be more than 0", t.name));
        }
        if t.max_count > i32::MAX as u32 {
            return bad(format!("{}: max_count is too large", t.name));
        }
    }
    Ok(())
}

/// One solve of the model, with `extra` constraints and `objective`; `None` when infeasible.
struct Model<'a> {
    catalog: &'a Catalog,
    d_gb: f64,
    t_h: f64,
}

struct Solved {
    counts: Vec<u32>,
    carried_gb: Vec<f64>,
}

impl Solved {
    /// `Σ f(type) × agents of that type`.
    fn per_agent(&self, catalog: &Catalog, f: impl Fn(&AgentType) -> f64) -> f64 {
        catalog
            .agents
            .iter()
            .zip(&self.counts)
            .map(|(a, &n)| f(a) * n as f64)
            .sum()
    }

    /// The fleet's price per hour.
    fn hourly(&self, catalog: &Catalog) -> f64 {
        self.per_agent(catalog, |a| a.price_per_hour)
    }

    /// What the fleet moves together, bytes per second.
    fn capacity(&self, catalog: &Catalog) -> f64 {
        self.per_agent(catalog, |a| a.throughput as f64)
    }

    /// Egress for what each type carries.
    fn egress(&self, catalog: &Catalog) -> f64 {
        catalog
            .agents
            .iter()
            .zip(&self.carried_gb)
            .map(|(a, gb)| a.egress_per_gb * gb)
            .sum()
    }
}

#[derive(Clone, Copy)]
enum Goal {
    /// The plan's cost.
    Cost,
    /// Fewest agents among plans costing at most the bound.
    Fewest { cost: f64 },
    /// Among plans of at most `cost` with `count` agents: earlier catalog types first
    /// (`earliest`), or last (to find a tie).
    Order {
        cost: f64,
        count: u32,
        earliest: bool,
    },
}

impl Model<'_> {
    fn solve(&self, goal: Goal) -> Result<Option<Solved>, PlanError> {
        let mut vars = ProblemVariables::new();
        let r: Vec<Variable> = self
            .catalog
            .agents
            .iter()
            .map(|t| vars.add(variable().integer().min(0).max(t.max_count as f64)))
            .collect();
        let x: Vec<Variable> = self
            .catalog
            .agents
            .iter()
            .map(|_| vars.add(variable().min(0)))
            .collect();
        let cost: Expression = self
            .catalog
            .agents
            .iter()
            .enumerate()
            .map(|(i, t)| self.t_h * t.price_per_hour * r[i] + t.egress_per_gb * x[i])
            .sum();
        let count: Expression = r.iter().copied().sum();
        let n = r.len() as f64;
        let objective = match goal {
            Goal::Cost => cost.clone(),
            Goal::Fewest { .. } => count.clone(),
            Goal::Order { earliest, .. } => r
                .iter()
                .enumerate()
                .map(|(i, &ri)| {
                    let w = if earliest {
                        i as f64 + 1.0
                    } else {
                        n - i as f64
                    };
                    w * ri
                })
                .sum(),
        };
        let mut problem = vars.minimise(objective).using(microlp);
        let carried: Expression = x.iter().copied().sum();
        problem = problem.with(constraint!(carried == self.d_gb));
        for (i, t) in self.catalog.agents.iter().enumerate() {
            let per_agent = t.throughput as f64 / GB * HOUR * self.t_h;
            problem = problem.with(constraint!(x[i] <= per_agent * r[i]));
        }
        match goal {
            Goal::Cost => {}
            Goal::Fewest { cost: bound } => {
                problem = problem.with(constraint!(cost <= bound));
            }
            Goal::Order {
                cost: bound,
                count: c,
                ..
            } => {
                problem = problem.with(constraint!(cost <= bound));
                problem = problem.with(constraint!(count == c as f64));
            }
        }
        match problem.solve() {
            Ok(s) => Ok(Some(Solved {
                counts: r
                    .iter()
                    .map(|&v| s.value(v).round().max(0.0) as u32)
                    .collect(),
                carried_gb: x.iter().map(|&v| s.value(v).max(0.0)).collect(),
            })),
            Err(good_lp::ResolutionError::Infeasible) => Ok(None),
            Err(e) => Err(PlanError::Solver(e.to_string())),
        }
    }
}

/// The cheapest plan for `inputs` from `catalog`.
pub fn plan(catalog: &Catalog, inputs: &Inputs) -> Result<Plan, PlanError> {
    check(catalog, inputs)?;
    let d = inputs.bytes as f64;
    let t = inputs.deadline_secs as f64;
    let needed = d / t;
    if let Some(limit) = inputs.path_limit {
        if (limit as f64) < needed {
            return Err(PlanError::Infeasible(format!(
                "the path carries at most {} and {} in {} needs {}: finish by {} at the earliest \
                 (--deadline {}s), or widen the path",
                rate_text(limit as f64),
                ferry_common::text::bytes(d),
                duration_text(inputs.deadline_secs),
                rate_text(needed),
                duration_text((d / limit as f64).ceil() as u64),
                (d / limit as f64).ceil() as u64,
            )));
        }
    }
    let fleet: f64 = catalog
        .agents
        .iter()
        .map(|a| a.throughput as f64 * a.max_count as f64)
        .sum();
    if fleet < needed {
        let best = catalog
            .agents
            .iter()
            .max_by(|a, b| a.throughput.cmp(&b.throughput))
            .expect("checked: not empty");
        let more = ((needed - fleet) / best.throughput as f64).ceil() as u64;
        let earliest = if fleet > 0.0 {
            format!(
                "finish by {} at the earliest",
                duration_text((d / fleet).ceil() as u64)
            )
        } else {
            "the catalog allows no agent (every max_count is 0)".to_string()
        };
        return Err(PlanError::Infeasible(format!(
            "every agent the catalog allows moves {} together and {} in {} needs {}: {earliest}, \
             or allow {more} more {} (max_count)",
            rate_text(fleet),
            ferry_common::text::bytes(d),
            duration_text(inputs.deadline_secs),
            rate_text(needed),
            best.name,
        )));
    }
    let model = Model {
        catalog,
        d_gb: d / GB,
        t_h: t / HOUR,
    };
    let infeasible = || PlanError::Solver("the solver found no plan although one exists".into());
    let cheapest = model.solve(Goal::Cost)?.ok_or_else(infeasible)?;
    let best = model.t_h * cheapest.hourly(catalog) + cheapest.egress(catalog);
    let bound = best + best.abs() * 1e-9 + 1e-7;
    let fewest = model
        .solve(Goal::Fewest { cost: bound })?
        .ok_or_else(infeasible)?;
    let count: u32 = fewest.counts.iter().sum();
    let first = model
        .solve(Goal::Order {
            cost: bound,
            count,
            earliest: true,
        })?
        .ok_or_else(infeasible)?;
    let last = model
        .solve(Goal::Order {
            cost: bound,
            count,
            earliest: false,
        })?
        .ok_or_else(infeasible)?;
    // With equal egress prices the solver's split of the bytes is one of many equally cheap
    // ones: they are shown in proportion to what each type can carry instead.
    let egress_differs = catalog
        .agents
        .iter()
        .any(|a| a.egress_per_gb != catalog.agents[0].egress_per_gb);
    let picks = |s: &Solved| -> Vec<Pick> {
        let total = s.capacity(catalog);
        catalog
            .agents
            .iter()
            .enumerate()
            .filter(|(i, _)| s.counts[*i] > 0)
            .map(|(i, a)| Pick {
                agent_type: a.name.clone(),
                count: s.counts[i],
                bytes: if egress_differs {
                    (s.carried_gb[i] * GB).round() as u64
                } else {
                    (d * a.throughput as f64 * s.counts[i] as f64 / total).round() as u64
                },
            })
            .collect()
    };
    let agents = picks(&first);
    let tie = (first.counts != last.counts).then(|| picks(&last));
    let capacity = first.capacity(catalog);
    let throughput = inputs
        .path_limit
        .map_or(capacity, |l| capacity.min(l as f64));
    let duration = d / throughput;
    let price_per_hour = first.hourly(catalog);
    let egress_cost = if egress_differs {
        first.egress(catalog)
    } else {
        catalog.agents[0].egress_per_gb * d / GB
    };
    let compute_cost = price_per_hour * model.t_h;
    // What shapes the plan.
    let mut binding = Vec::new();
    if inputs.path_limit.is_some_and(|l| capacity >= l as f64) {
        binding.push(format!(
            "the path: {} of agents, the path carries {}",
            rate_text(capacity),
            rate_text(throughput)
        ));
    }
    // The deadline shapes the fleet when twice the time would be done by a fleet cheaper by the
    // hour (with more time, fewer or smaller agents suffice).
    let relaxed = Model {
        t_h: model.t_h * 2.0,
        ..model
    }
    .solve(Goal::Cost)?
    .ok_or_else(infeasible)?;
    if relaxed.hourly(catalog) < price_per_hour - 1e-9 {
        binding.push(format!(
            "the deadline: it needs {}; with more time a fleet cheaper by the hour would do",
            rate_text(needed)
        ));
    }
    for (i, a) in catalog.agents.iter().enumerate() {
        if first.counts[i] > 0 && first.counts[i] == a.max_count {
            binding.push(format!("max_count of {}: all {} used", a.name, a.max_count));
        }
    }
    if egress_cost > compute_cost && egress_differs {
        binding.push(format!(
            "egress: {:.2} of {:.2} is egress, so types are chosen by their egress price",
            egress_cost,
            compute_cost + egress_cost
        ));
    } else if binding.is_empty() {
        let cheapest_compute = catalog
            .agents
            .iter()
            .map(|a| a.price_per_hour / (a.throughput as f64 / GB * HOUR))
            .fold(f64::INFINITY, f64::min);
        binding.push(format!(
            "nothing: {} agent finishes in {}, before the deadline (compute from {cheapest_compute:.4} per GB)",
            if count == 1 { "one" } else { "the cheapest" },
            duration_text(duration.ceil() as u64),
        ));
    }
    // Costs to four decimals: no float noise (18.432000000000002) in the JSON.
    let round4 = |x: f64| (x * 1e4).round() / 1e4;
    Ok(Plan {
        agent_count: count,
        agents,
        throughput: throughput.round() as u64,
        duration_secs: duration.ceil() as u64,
        price_per_hour: round4(price_per_hour),
        compute_cost: round4(compute_cost),
        compute_cost_at_duration: round4(price_per_hour * duration / HOUR),
        egress_cost: round4(egress_cost),
        total_cost: round4(compute_cost + egress_cost),
        binding,
        tie,
    })
}

/// The plan as `ferryctl plan` prints it.
pub fn table(p: &Plan, inputs: &Inputs) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let rows: Vec<[String; 3]> = p
        .agents
        .iter()
        .map(|a| {
            [
                a.agent_type.clone(),
                a.count.to_string(),
                ferry_common::text::bytes(a.bytes as f64),
            ]
        })
        .collect();
    let w0 = rows.iter().map(|r| r[0].len()).max().unwrap_or(0).max(10);
    let _ = writeln!(
        out,
        "{:<w0$}  {:>5}  {:>12}",
        "AGENT TYPE", "COUNT", "CARRIES"
    );
    for r in &rows {
        let _ = writeln!(out, "{:<w0$}  {:>5}  {:>12}", r[0], r[1], r[2]);
    }
    let _ = writeln!(
        out,
        "\n{} in {} by the deadline ({}): {} agent{} moving {}",
        ferry_common::text::bytes(inputs.bytes as f64),
        duration_text(p.duration_secs),
        duration_text(inputs.deadline_secs),
        p.agent_count,
        if p.agent_count == 1 { "" } else { "s" },
        rate_text(p.throughput as f64),
    );
    let _ = writeln!(
        out,
        "cost {:.2}: agents {:.2} ({:.2}/h until the deadline; {:.2} if released when done), egress {:.2}",
        p.total_cost, p.compute_cost, p.price_per_hour, p.compute_cost_at_duration, p.egress_cost
    );
    for b in &p.binding {
        let _ = writeln!(out, "binds: {b}");
    }
    if let Some(tie) = &p.tie {
        let other: Vec<String> = tie
            .iter()
            .map(|t| format!("{} × {}", t.count, t.agent_type))
            .collect();
        let _ = writeln!(
            out,
            "tie: {} costs the same (the catalog's order chose)",
            other.join(" + ")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ty(name: &str, price: f64, gbit: f64, max: u32, egress: f64) -> AgentType {
        AgentType {
            name: name.into(),
            price_per_hour: price,
            throughput: (gbit * 1e9 / 8.0) as u64,
            max_count: max,
            egress_per_gb: egress,
        }
    }

    fn counts(p: &Plan) -> Vec<(&str, u32)> {
        p.agents
            .iter()
            .map(|a| (a.agent_type.as_str(), a.count))
            .collect()
    }

    const TB: u64 = 1_000_000_000_000;

    fn inputs(tb: u64, hours: u64) -> Inputs {
        Inputs {
            bytes: tb * TB,
            deadline_secs: hours * 3600,
            path_limit: None,
        }
    }

    /// 100 TB in 24 h needs 9.26 Gbit/s. Small: 1 Gbit/s at 0.10/h; large: 10 Gbit/s at 0.80/h.
    /// Ten small agents cost 1.00/h, two large 1.60/h, one large (10 Gbit/s ≥ 9.26) 0.80/h: the
    /// optimum is one large agent; by hand, 0.80 × 24 = 19.20.
    #[test]
    fn a_mixed_catalog_takes_the_cheapest_fleet_that_meets_the_deadline() {
        let catalog = Catalog {
            agents: vec![
                ty("small", 0.10, 1.0, 50, 0.0),
                ty("large", 0.80, 10.0, 10, 0.0),
            ],
        };
        let p = plan(&catalog, &inputs(100, 24)).unwrap();
        assert_eq!(counts(&p), vec![("large", 1)]);
        assert!((p.total_cost - 19.20).abs() < 1e-6, "{p:?}");
        assert_eq!(p.throughput, 1_250_000_000);
        assert_eq!(p.duration_secs, 80_000); // 100 TB at 1.25 GB/s
        assert!(
            p.binding.iter().any(|b| b.starts_with("the deadline")),
            "{p:?}"
        );
        assert_eq!(p.tie, None);

        // 1 TB in 72 h: one small agent (0.10 × 72 = 7.20) is done in 2h 13m; nothing binds.
        let p = plan(&catalog, &inputs(1, 72)).unwrap();
        assert_eq!(counts(&p), vec![("small", 1)]);
        assert!((p.total_cost - 7.20).abs() < 1e-6, "{p:?}");
        assert_eq!(p.duration_secs, 8000);
        assert!(
            p.binding[0].starts_with("nothing: one agent finishes in 2h 13m"),
            "{p:?}"
        );

        // 100 TB in 12 h needs 18.5 Gbit/s: one large and nine small (19 Gbit/s, 1.70/h)
        // against two large (1.60/h): two large, 1.60 × 12 = 19.20.
        let p = plan(&catalog, &inputs(100, 12)).unwrap();
        assert_eq!(counts(&p), vec![("large", 2)]);
        assert!((p.total_cost - 19.20).abs() < 1e-6, "{p:?}");

        // With only one large allowed: one large and nine small (1.70/h × 12 = 20.40).
        let mut one = catalog.clone();
        one.agents[1].max_count = 1;
        let p = plan(&one, &inputs(100, 12)).unwrap();
        assert_eq!(counts(&p), vec![("small", 9), ("large", 1)]);
        assert!((p.total_cost - 20.40).abs() < 1e-6, "{p:?}");
        assert!(
            p.binding.iter().any(|b| b.contains("max_count of large")),
            "{p:?}"
        );
    }

    /// 10 TB in 10 h needs 2.22 Gbit/s; both types move 10 Gbit/s, so one agent either way.
    /// cheap-compute: 1.00/h + 0.09/GB → 10 + 900 = 910; low-egress: 3.00/h + 0.02/GB →
    /// 30 + 200 = 230. Egress dominates: the dearer agent wins.
    #[test]
    fn egress_decides_when_it_costs_more_than_the_agents() {
        let catalog = Catalog {
            agents: vec![
                ty("cheap-compute", 1.00, 10.0, 10, 0.09),
                ty("low-egress", 3.00, 10.0, 10, 0.02),
            ],
        };
        let p = plan(&catalog, &inputs(10, 10)).unwrap();
        assert_eq!(counts(&p), vec![("low-egress", 1)]);
        assert!((p.compute_cost - 30.0).abs() < 1e-6, "{p:?}");
        assert!((p.egress_cost - 200.0).abs() < 1e-3, "{p:?}");
        assert!((p.total_cost - 230.0).abs() < 1e-3, "{p:?}");
        assert!(p.binding.iter().any(|b| b.starts_with("egress")), "{p:?}");
        // More time would not change the agent: the deadline does not bind.
        assert!(
            !p.binding.iter().any(|b| b.starts_with("the deadline")),
            "{p:?}"
        );
        assert!((p.agents[0].bytes as f64 - 10e12).abs() < 1e6, "{p:?}");
    }

    /// Two types identical but for their names: the catalog's first is taken, and the other
    /// is named as a tie.
    #[test]
    fn a_tie_is_broken_by_catalog_order_and_reported() {
        let catalog = Catalog {
            agents: vec![
                ty("zone-a", 0.50, 5.0, 4, 0.01),
                ty("zone-b", 0.50, 5.0, 4, 0.01),
            ],
        };
        // 50 TB in 10 h needs 11.1 Gbit/s: three agents of 5 Gbit/s (1.50/h × 10 = 15, egress
        // 50,000 GB × 0.01 = 500).
        let p = plan(&catalog, &inputs(50, 10)).unwrap();
        assert_eq!(p.agent_count, 3);
        assert_eq!(counts(&p), vec![("zone-a", 3)]);
        assert!((p.total_cost - 515.0).abs() < 1e-3, "{p:?}");
        let tie = p.tie.as_ref().expect("a tie");
        assert_eq!(tie.iter().map(|t| t.count).sum::<u32>(), 3);
        assert!(tie.iter().any(|t| t.agent_type == "zone-b"), "{tie:?}");
        // Same inputs, same answer.
        assert_eq!(plan(&catalog, &inputs(50, 10)).unwrap(), p);
    }

    /// The fewest agents among equally cheap plans: a 2 Gbit/s agent at 0.20/h and a 1 Gbit/s
    /// one at 0.10/h cost the same per hour per Gbit/s; 4 Gbit/s is two of the first.
    #[test]
    fn among_equally_cheap_plans_the_fewest_agents() {
        let catalog = Catalog {
            agents: vec![ty("one", 0.10, 1.0, 10, 0.0), ty("two", 0.20, 2.0, 10, 0.0)],
        };
        // 18 TB in 10 h needs 4 Gbit/s exactly.
        let p = plan(&catalog, &inputs(18, 10)).unwrap();
        assert_eq!(counts(&p), vec![("two", 2)]);
        assert!((p.total_cost - 4.0).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn infeasible_inputs_say_what_would_meet_them() {
        let catalog = Catalog {
            agents: vec![
                ty("small", 0.10, 1.0, 5, 0.0),
                ty("large", 0.80, 10.0, 1, 0.0),
            ],
        };
        // 100 TB in 10 h needs 22.2 Gbit/s; the catalog allows 15.
        let e = plan(&catalog, &inputs(100, 10)).unwrap_err().to_string();
        assert!(e.contains("moves 15.00 Gbit/s together"), "{e}");
        assert!(e.contains("needs 22.22 Gbit/s"), "{e}");
        // 7.2 Gbit/s more: one more large agent.
        assert!(e.contains("allow 1 more large"), "{e}");
        // 100 TB at 15 Gbit/s: 53,334 s.
        assert!(e.contains("finish by 14h 48m"), "{e}");

        // The path binds before the agents do.
        let mut i = inputs(100, 24);
        i.path_limit = Some(1_000_000_000 / 8 * 5); // 5 Gbit/s
        let e = plan(&catalog, &i).unwrap_err().to_string();
        assert!(e.contains("the path carries at most 5.00 Gbit/s"), "{e}");
        assert!(e.contains("--deadline 160000s"), "{e}");

        // A path that carries enough, but less than the fleet: it is named as binding.
        i.path_limit = Some(10_000_000_000 / 8);
        let p = plan(&catalog, &i).unwrap();
        assert_eq!(counts(&p), vec![("large", 1)]);
        assert!(p.binding.iter().any(|b| b.starts_with("the path")), "{p:?}");

        assert!(matches!(
            plan(&Catalog { agents: vec![] }, &i),
            Err(PlanError::Input(_))
        ));
        assert!(matches!(
            plan(&catalog, &inputs(0, 1)),
            Err(PlanError::Input(_))
        ));
        assert!(matches!(
            plan(&catalog, &inputs(1, 0)),
            Err(PlanError::Input(_))
        ));
    }

    #[test]
    fn a_catalog_reads_rates_as_operators_write_them() {
        let c: Catalog = toml::from_str(
            "[[agent]]\nname = \"m\"\nprice_per_hour = 0.384\nthroughput = \"2500mbit\"\nmax_count = 20\negress_per_gb = 0.02\n",
        )
        .unwrap();
        assert_eq!(c.agents[0].throughput, 312_500_000);
        let e = toml::from_str::<Catalog>(
            "[[agent]]\nname = \"m\"\nprice_per_hour = 1\nthroughput = \"fast\"\nmax_count = 1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("fast"), "{e}");
        assert!(toml::from_str::<Catalog>("[[agent]]\nname = \"m\"\nprice = 1\n").is_err());
    }

    #[test]
    fn sizes_rates_and_durations_read_as_people_write_them() {
        assert_eq!(duration_text(53_334), "14h 48m");
        assert_eq!(duration_text(3 * 86_400 + 7200), "3d 2h");
        assert_eq!(duration_text(88_889), "1d 0h 41m");
        assert_eq!(duration_text(42), "42s");
        assert_eq!(rate_text(1.25e9), "10.00 Gbit/s");
    }
}
