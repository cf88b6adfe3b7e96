//! The envelope: a typed Slipway event with its CloudEvents context attributes.
//!
//! [`Event`] is what services handle; [`Event::to_cloudevent`] and [`Event::from_cloudevent`]
//! convert through `cloudevents-sdk`, and [`crate::binding`] carries the result over NATS.

use chrono::{DateTime, SubsecRound, Utc};
use cloudevents::event::{AttributesReader, Data, ExtensionValue};
use cloudevents::{EventBuilder, EventBuilderV10};
use serde::Serialize;

use crate::events::{DataError, EventData, type_parts};

/// CloudEvents extension names of W3C trace context (distributed-tracing extension).
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// A Slipway event: CloudEvents context plus typed data.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Unique per source; deterministic for derived events, so a repeat is a duplicate.
    pub id: String,
    /// The emitting service, as a URI reference (e.g. `/slipway/builder`).
    pub source: String,
    /// When the fact happened; events carry time so the pure logic never reads a clock.
    pub time: DateTime<Utc>,
    /// The run id, for run events.
    pub subject: Option<String>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    pub data: EventData,
}

/// A CloudEvent that is not a Slipway event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("missing CloudEvents attribute {0:?}")]
    Missing(&'static str),
    #[error("data of {type_name} is not JSON: {message}")]
    NotJson { type_name: String, message: String },
    #[error(transparent)]
    Data(#[from] DataError),
}

impl Event {
    /// A new event at `time` (rounded to microseconds, the precision JSON round trips keep).
    pub fn new(
        id: impl Into<String>,
        source: impl Into<String>,
        subject: Option<String>,
        time: DateTime<Utc>,
        data: EventData,
    ) -> Self {
        Self {
            id: id.into(),
            source: source.into(),
            time: time.trunc_subsecs(6),
            subject,
            traceparent: None,
            tracestate: None,
            data,
        }
    }

    pub fn type_name(&self) -> &'static str {
        self.data.type_name()
    }

    /// The NATS subject this event is stored under.
    ///
    /// Run events: `slipway.run.<run id>.<noun>.<verb>`; changes:
    /// `slipway.changes.<source token>`; rejections: `slipway.intake.rejected`.
    pub fn nats_subject(&self) -> String {
        match &self.data {
            EventData::ChangeSubmitted(_) => crate::subjects::change(&self.source),
            EventData::ChangeRejected(_) => crate::subjects::REJECTED.to_string(),
            _ => {
                let (noun, verb) = type_parts(self.type_name()).expect("catalogue types parse");
                let run = self.subject.as_deref().unwrap_or("unknown");
                format!("slipway.run.{run}.{noun}.{verb}")
            }
        }
    }

    /// The CloudEvents form.
    pub fn to_cloudevent(&self) -> cloudevents::Event {
        let mut b = EventBuilderV10::new()
            .id(self.id.clone())
            .source(self.source.clone())
            .ty(self.type_name())
            .time(self.time)
            .data("application/json", self.data.to_json());
        if let Some(s) = &self.subject {
            b = b.subject(s.clone());
        }
        if let Some(t) = &self.traceparent {
            b = b.extension(TRACEPARENT, t.clone());
        }
        if let Some(t) = &self.tracestate {
            b = b.extension(TRACESTATE, t.clone());
        }
        b.build().expect("all required attributes are set")
    }

    /// A typed event from any CloudEvent.
    ///
    /// # Errors
    /// [`EnvelopeError`] naming the missing attribute, the unknown type or the bad field.
    pub fn from_cloudevent(ce: &cloudevents::Event) -> Result<Self, EnvelopeError> {
        let type_name = ce.ty().to_string();
        let data = json_data(ce)?;
        let data = EventData::from_json(&type_name, data)?;
        let ext = |name: &str| match ce.extension(name) {
            Some(ExtensionValue::String(s)) => Some(s.clone()),
            Some(other) => Some(other.to_string()),
            None => None,
        };
        Ok(Self {
            id: ce.id().to_string(),
            source: ce.source().to_string(),
            time: ce.time().copied().ok_or(EnvelopeError::Missing("time"))?,
            subject: ce.subject().map(str::to_string),
            traceparent: ext(TRACEPARENT),
            tracestate: ext(TRACESTATE),
            data,
        })
    }

    /// Structured-mode JSON (`application/cloudevents+json`), as `slipway events` prints it.
    pub fn to_structured_json(&self) -> serde_json::Value {
        serde_json::to_value(self.to_cloudevent()).expect("CloudEvents serialise")
    }
}

/// The JSON `data` of a CloudEvent, whether it came as JSON, text or bytes.
///
/// # Errors
/// [`EnvelopeError::NotJson`] when the data is not JSON.
pub fn json_data(ce: &cloudevents::Event) -> Result<serde_json::Value, EnvelopeError> {
    let not_json = |message: String| EnvelopeError::NotJson {
        type_name: ce.ty().to_string(),
        message,
    };
    match ce.data() {
        None => Ok(serde_json::Value::Null),
        Some(Data::Json(v)) => Ok(v.clone()),
        Some(Data::String(s)) => serde_json::from_str(s).map_err(|e| not_json(e.to_string())),
        Some(Data::Binary(b)) => serde_json::from_slice(b).map_err(|e| not_json(e.to_string())),
    }
}

impl Serialize for Event {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_structured_json().serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::StageStarted;

    #[test]
    fn cloudevent_round_trip() {
        let mut e = Event::new(
            "id-1",
            "/slipway/builder",
            Some("run-1".into()),
            Utc::now(),
            EventData::BuildStarted(StageStarted {
                stage: "build".into(),
                attempt: 1,
                worker: "w1".into(),
            }),
        );
        e.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        let ce = e.to_cloudevent();
        assert_eq!(ce.ty(), "dev.slipway.build.started.v1");
        assert_eq!(Event::from_cloudevent(&ce).unwrap(), e);
        assert_eq!(e.nats_subject(), "slipway.run.run-1.build.started");
    }
}
