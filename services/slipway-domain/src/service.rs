//! Slipway's services by name: each event's `source` (`/slipway/<name>`), each binary
//! (`slipway-<name>`), each worker's durable consumer and each NATS user come from here.

use std::fmt;

use crate::stage::StageKind;

/// A Slipway service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Service {
    Conductor,
    Builder,
    Tester,
    Deployer,
    Monitor,
    /// The approval gateway.
    Approval,
    ModelEvaluator,
    PerfRegression,
    CostEstimator,
}

impl Service {
    /// Every service, in the order `slipway up` starts them.
    pub const ALL: [Service; 9] = [
        Service::Conductor,
        Service::Builder,
        Service::Tester,
        Service::Deployer,
        Service::Monitor,
        Service::Approval,
        Service::ModelEvaluator,
        Service::PerfRegression,
        Service::CostEstimator,
    ];

    /// Every service's binary, in [`Service::ALL`]'s order.
    pub const BINARIES: [&'static str; 9] = {
        let mut out = [""; 9];
        let mut i = 0;
        while i < out.len() {
            out[i] = Service::ALL[i].binary();
            i += 1;
        }
        out
    };

    /// The NATS users of the shipped least-privilege configuration: `admin` for operators, one
    /// per service, `cli` for people's `slipway` commands.
    pub const NATS_USERS: [&'static str; 11] = {
        let mut out = ["admin"; 11];
        let mut i = 0;
        while i < Service::ALL.len() {
            out[i + 1] = Service::ALL[i].nats_user();
            i += 1;
        }
        out[10] = "cli";
        out
    };

    /// The name: a worker's durable consumer, the last part of its events' source.
    pub const fn name(self) -> &'static str {
        match self {
            Service::Conductor => "conductor",
            Service::Builder => "builder",
            Service::Tester => "tester",
            Service::Deployer => "deployer",
            Service::Monitor => "monitor",
            Service::Approval => "approval",
            Service::ModelEvaluator => "model-evaluator",
            Service::PerfRegression => "perf-regression",
            Service::CostEstimator => "cost-estimator",
        }
    }

    /// Its events' `source`.
    pub const fn source(self) -> &'static str {
        match self {
            Service::Conductor => "/slipway/conductor",
            Service::Builder => "/slipway/builder",
            Service::Tester => "/slipway/tester",
            Service::Deployer => "/slipway/deployer",
            Service::Monitor => "/slipway/monitor",
            Service::Approval => "/slipway/approval",
            Service::ModelEvaluator => "/slipway/model-evaluator",
            Service::PerfRegression => "/slipway/perf-regression",
            Service::CostEstimator => "/slipway/cost-estimator",
        }
    }

    /// Its binary.
    pub const fn binary(self) -> &'static str {
        match self {
            Service::Conductor => "slipway-conductor",
            Service::Builder => "slipway-builder",
            Service::Tester => "slipway-tester",
            Service::Deployer => "slipway-deployer",
            Service::Monitor => "slipway-monitor",
            Service::Approval => "slipway-approval",
            Service::ModelEvaluator => "slipway-model-evaluator",
            Service::PerfRegression => "slipway-perf-regression",
            Service::CostEstimator => "slipway-cost-estimator",
        }
    }

    /// The NATS user it connects as under the shipped least-privilege configuration.
    pub const fn nats_user(self) -> &'static str {
        match self {
            Service::Approval => "gateway",
            other => other.name(),
        }
    }

    /// The service of a binary name.
    pub fn of_binary(binary: &str) -> Option<Service> {
        Self::ALL.into_iter().find(|s| s.binary() == binary)
    }

    /// The stages it works (none for the conductor; approvals for the gateway).
    pub const fn kinds(self) -> &'static [StageKind] {
        match self {
            Service::Conductor => &[],
            Service::Builder => &[StageKind::Build],
            Service::Tester => &[StageKind::Test],
            Service::Deployer => &[StageKind::Deploy, StageKind::Rollback, StageKind::Promote],
            // The monitor is also the rollouts' judge: both watch a live environment's metrics.
            Service::Monitor => &[StageKind::Monitor, StageKind::Rollout],
            Service::Approval => &[StageKind::Approval],
            Service::ModelEvaluator => &[StageKind::Evaluate],
            Service::PerfRegression => &[StageKind::Perf],
            Service::CostEstimator => &[StageKind::Cost],
        }
    }

    /// Whether its stages mostly wait on something outside Slipway (a deploy command, a monitor
    /// window, a remote model, a load test's target) rather than use this machine's cores.
    pub const fn waits(self) -> bool {
        matches!(
            self,
            Service::Deployer
                | Service::Monitor
                | Service::ModelEvaluator
                | Service::PerfRegression
                | Service::CostEstimator
        )
    }

    /// The service that works stages of `kind` (an approval is the gateway's).
    pub fn works(kind: StageKind) -> Service {
        match kind {
            StageKind::Build => Service::Builder,
            StageKind::Test => Service::Tester,
            StageKind::Deploy | StageKind::Rollback | StageKind::Promote => Service::Deployer,
            StageKind::Rollout => Service::Monitor,
            StageKind::Evaluate => Service::ModelEvaluator,
            StageKind::Perf => Service::PerfRegression,
            StageKind::Cost => Service::CostEstimator,
            StageKind::Approval => Service::Approval,
            StageKind::Monitor => Service::Monitor,
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One replica of a service as it last said of itself: its heartbeat in the `slipway-services`
/// KV bucket (`slipway_core::health`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct Heartbeat {
    pub service: String,
    pub replica: String,
    /// Its release (`CARGO_PKG_VERSION`).
    pub version: String,
    pub host: String,
    pub pid: u32,
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// When it said so.
    pub at: chrono::DateTime<chrono::Utc>,
    pub uptime_secs: u64,
    pub live: bool,
    pub ready: bool,
    /// Why it is not ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ready: Option<String>,
    /// Requests its consumer holds that it has not finished (waiting plus in hand).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
    /// Where its liveness and readiness are answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_url: Option<String>,
    /// Set by `slipway up` when it started this process again: its restarts so far, and how the
    /// one before ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarts: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
}

/// What `slipway up` keeps running on one host, under the key `up.<host>` of the heartbeat
/// bucket: each process, its restarts and its last exit.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct Supervision {
    pub host: String,
    /// `up`'s own process.
    pub pid: u32,
    pub at: chrono::DateTime<chrono::Utc>,
    pub processes: Vec<Supervised>,
}

/// One process `slipway up` keeps running.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct Supervised {
    /// The service's binary (`slipway-tester`), or `nats-server`.
    pub name: String,
    pub running: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Restarts over `up`'s life.
    pub restarts: u64,
    /// How it last ended (`exit status: 1`, `signal: 9 (SIGKILL)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// It exits again and again (five times within a minute); `up` keeps restarting it.
    pub crash_looping: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_of_a_service_comes_from_one_name() {
        for s in Service::ALL {
            assert_eq!(s.source(), format!("/slipway/{}", s.name()));
            assert_eq!(s.binary(), format!("slipway-{}", s.name()));
            assert_eq!(Service::of_binary(s.binary()), Some(s));
        }
        assert_eq!(Service::Approval.nats_user(), "gateway");
        assert_eq!(Service::BINARIES[0], "slipway-conductor");
        assert_eq!(
            Service::NATS_USERS,
            [
                "admin",
                "conductor",
                "builder",
                "tester",
                "deployer",
                "monitor",
                "gateway",
                "model-evaluator",
                "perf-regression",
                "cost-estimator",
                "cli"
            ]
        );
        assert_eq!(Service::of_binary("slipway"), None);
        for kind in StageKind::ALL {
            assert!(Service::works(kind).kinds().contains(&kind), "{kind:?}");
        }
        let worked: usize = Service::ALL.iter().map(|s| s.kinds().len()).sum();
        assert_eq!(worked, StageKind::ALL.len(), "each kind has one service");
    }
}
