//! The facts a worker states about a job: `started`, then its result. Their ids derive from the
//! run, the type, the stage and the attempt, so a fact stated twice (a redelivered job) is one.

use chrono::{DateTime, Utc};

use crate::envelope::Event;
use crate::events::{EventData, StageKind, StageStarted};
use crate::ids;

/// The plain `started` fact of a request type (deploys, rollbacks and promotions state their own, with
/// what was live before; an approval is never started).
pub fn started_data(
    request_type: &str,
    stage: &str,
    attempt: u32,
    worker: &str,
) -> Option<EventData> {
    let s = StageStarted {
        stage: stage.to_string(),
        attempt,
        worker: worker.to_string(),
    };
    let kind = crate::events::stage_kind_of(request_type)?;
    Some(match kind {
        StageKind::Build => EventData::BuildStarted(s),
        StageKind::Test => EventData::TestStarted(s),
        StageKind::Evaluate => EventData::EvaluateStarted(s),
        StageKind::Perf => EventData::PerfStarted(s),
        StageKind::Cost => EventData::CostStarted(s),
        StageKind::Monitor => EventData::MonitorStarted(s),
        StageKind::Rollout => EventData::RolloutStarted(s),
        StageKind::Deploy | StageKind::Rollback | StageKind::Promote | StageKind::Approval => {
            return None;
        }
    })
}

/// The event `service` states about a job of `run_id` at `time`: deterministic id, so a repeat
/// is a duplicate.
pub fn fact(
    service: crate::service::Service,
    run_id: &str,
    data: EventData,
    time: DateTime<Utc>,
) -> Event {
    let (stage, attempt) = data.stage_fact().map_or(("", 0), |(s, a, _)| (s, a));
    let id = ids::derived(&[run_id, data.type_name(), stage, &attempt.to_string()]);
    Event::new(id, service.source(), Some(run_id.to_string()), time, data)
}
