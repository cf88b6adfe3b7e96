//! The CloudEvents NATS protocol binding.
//!
//! Slipway writes binary content mode: every context attribute is a `ce-<name>` header,
//! `datacontenttype` is the `content-type` header, and the payload is the data. It reads both
//! binary mode and structured mode (`application/cloudevents+json`, the whole event as JSON in
//! the payload), so producers without header support can still publish changes.
//!
//! The mapping is written on `cloudevents-sdk`'s `BinarySerializer` / `BinaryDeserializer`
//! traits: the SDK's own `nats` feature targets an older client and only structured mode.

use async_nats::HeaderMap;
use bytes::Bytes;
use cloudevents::event::{Data, SpecVersion};
use cloudevents::message::{
    BinaryDeserializer, BinarySerializer, MessageAttributeValue, Result as MessageResult,
};

/// Header carrying the spec version in binary mode; its presence marks binary mode.
pub const SPEC_VERSION_HEADER: &str = "ce-specversion";
pub const CONTENT_TYPE: &str = "content-type";
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// Why a NATS message is not a CloudEvent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    #[error("not a CloudEvent: {0}")]
    NotCloudEvent(String),
}

/// Encodes an event in binary content mode.
pub fn encode(event: cloudevents::Event) -> (HeaderMap, Bytes) {
    BinaryDeserializer::deserialize_binary(event, HeaderWriter::default())
        .expect("header writer accepts every attribute")
}

#[derive(Default)]
struct HeaderWriter {
    headers: HeaderMap,
}

impl BinarySerializer<(HeaderMap, Bytes)> for HeaderWriter {
    fn set_spec_version(mut self, spec_version: SpecVersion) -> MessageResult<Self> {
        self.headers
            .insert(SPEC_VERSION_HEADER, spec_version.as_str());
        Ok(self)
    }

    fn set_attribute(mut self, name: &str, value: MessageAttributeValue) -> MessageResult<Self> {
        if name == "datacontenttype" {
            self.headers.insert(CONTENT_TYPE, value.to_string());
        } else {
            self.headers.insert(format!("ce-{name}"), value.to_string());
        }
        Ok(self)
    }

    fn set_extension(mut self, name: &str, value: MessageAttributeValue) -> MessageResult<Self> {
        self.headers.insert(format!("ce-{name}"), value.to_string());
        Ok(self)
    }

    fn end_with_data(self, bytes: Vec<u8>) -> MessageResult<(HeaderMap, Bytes)> {
        Ok((self.headers, Bytes::from(bytes)))
    }

    fn end(self) -> MessageResult<(HeaderMap, Bytes)> {
        Ok((self.headers, Bytes::new()))
    }
}

struct BinaryMessage<'a> {
    headers: &'a HeaderMap,
    payload: &'a [u8],
}

impl BinaryDeserializer for BinaryMessage<'_> {
    fn deserialize_binary<R: Sized, V: BinarySerializer<R>>(
        self,
        mut visitor: V,
    ) -> MessageResult<R> {
        let version = header(self.headers, SPEC_VERSION_HEADER).unwrap_or_default();
        let spec_version = SpecVersion::try_from(version)?;
        let attributes = spec_version.attribute_names();
        visitor = visitor.set_spec_version(spec_version)?;
        // Sorted so that decoding is deterministic whatever the header map's order.
        let mut names: Vec<(&str, &str)> = self
            .headers
            .iter()
            .filter_map(|(name, values)| {
                let name: &str = name.as_ref();
                Some((name, values.last()?.as_str()))
            })
            .collect();
        names.sort_unstable();
        for (name, value) in names {
            let lower = name.to_ascii_lowercase();
            let Some(attr) = lower.strip_prefix("ce-") else {
                continue;
            };
            if attr == "specversion" {
                continue;
            }
            let value = MessageAttributeValue::String(value.to_string());
            visitor = if attributes.contains(&attr) {
                visitor.set_attribute(attr, value)?
            } else {
                visitor.set_extension(attr, value)?
            };
        }
        if let Some(ct) = header(self.headers, CONTENT_TYPE) {
            visitor = visitor.set_attribute(
                "datacontenttype",
                MessageAttributeValue::String(ct.to_string()),
            )?;
        }
        if self.payload.is_empty() {
            visitor.end()
        } else {
            visitor.end_with_data(self.payload.to_vec())
        }
    }
}

/// A header's value, whatever the case of its name.
fn header<'a>(headers: &'a HeaderMap, wanted: &str) -> Option<&'a str> {
    headers.iter().find_map(|(name, values)| {
        let name: &str = name.as_ref();
        if name.eq_ignore_ascii_case(wanted) {
            values.last().map(|v| v.as_str())
        } else {
            None
        }
    })
}

/// Decodes a NATS message in either content mode.
///
/// # Errors
/// [`BindingError::NotCloudEvent`] saying what is missing or malformed.
pub fn decode(
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<cloudevents::Event, BindingError> {
    let binary = headers.is_some_and(|h| header(h, SPEC_VERSION_HEADER).is_some());
    let mut event = if binary {
        let headers = headers.expect("checked above");
        BinaryDeserializer::into_event(BinaryMessage { headers, payload })
            .map_err(|e| BindingError::NotCloudEvent(format!("binary mode: {e}")))?
    } else {
        let ct = headers.and_then(|h| header(h, CONTENT_TYPE));
        if let Some(ct) = ct
            && !ct.starts_with(STRUCTURED_CONTENT_TYPE)
        {
            return Err(BindingError::NotCloudEvent(format!(
                "no {SPEC_VERSION_HEADER} header (binary mode) and content-type {ct:?} is not \
                 {STRUCTURED_CONTENT_TYPE} (structured mode)"
            )));
        }
        if payload.is_empty() {
            return Err(BindingError::NotCloudEvent(
                "empty message: no ce-specversion header and no structured-mode body".into(),
            ));
        }
        serde_json::from_slice::<cloudevents::Event>(payload)
            .map_err(|e| BindingError::NotCloudEvent(format!("structured mode: {e}")))?
    };
    normalise_json_data(&mut event);
    Ok(event)
}

/// An event in the form Slipway itself writes (binary mode, `application/json` data, no
/// extension but trace context), decoded in one pass: the attributes straight from the
/// headers and the data straight from the bytes into its type. `None` for any other form and
/// for anything malformed, which [`decode`] then handles and explains; where both decode a
/// message they give the same event (tested on every event type).
pub fn decode_fast(headers: &HeaderMap, payload: &[u8]) -> Option<slipway_domain::envelope::Event> {
    let mut slots: [Option<&str>; 9] = [None; 9];
    const NAMES: [&str; 9] = [
        SPEC_VERSION_HEADER,
        CONTENT_TYPE,
        "ce-id",
        "ce-source",
        "ce-type",
        "ce-time",
        "ce-subject",
        "ce-traceparent",
        "ce-tracestate",
    ];
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        let Some(value) = values.last() else { continue };
        match NAMES.iter().position(|n| name.eq_ignore_ascii_case(n)) {
            // The same attribute twice (names differing in case): leave it to the full path.
            Some(i) if slots[i].replace(value.as_str()).is_some() => return None,
            Some(_) => {}
            // Another attribute or extension: the full path knows them all.
            None if name.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("ce-")) => return None,
            None => {}
        }
    }
    let [
        spec,
        ct,
        id,
        source,
        ty,
        time,
        subject,
        traceparent,
        tracestate,
    ] = slots;
    if spec? != "1.0" || ct? != "application/json" {
        return None;
    }
    let time = chrono::DateTime::parse_from_rfc3339(time?).ok()?;
    Some(slipway_domain::envelope::Event {
        data: slipway_domain::events::EventData::from_slice(ty?, payload)?,
        id: id?.to_string(),
        source: source?.to_string(),
        time: time.with_timezone(&chrono::Utc),
        subject: subject.map(str::to_string),
        traceparent: traceparent.map(str::to_string),
        tracestate: tracestate.map(str::to_string),
    })
}

/// Binary mode yields bytes; with a JSON content type the data is JSON, so parse it, or a
/// round trip would not be equal and re-serialising would give `data_base64`.
fn normalise_json_data(event: &mut cloudevents::Event) {
    use cloudevents::event::AttributesReader;
    let is_json = event
        .datacontenttype()
        .is_some_and(|ct| ct.starts_with("application/json") || ct.contains("+json"));
    if !is_json {
        return;
    }
    let parsed = match event.data() {
        Some(Data::Binary(b)) => serde_json::from_slice::<serde_json::Value>(b).ok(),
        Some(Data::String(s)) => serde_json::from_str::<serde_json::Value>(s).ok(),
        _ => None,
    };
    if let Some(v) = parsed {
        event.set_data_unchecked(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudevents::{EventBuilder, EventBuilderV10};

    fn sample() -> cloudevents::Event {
        EventBuilderV10::new()
            .id("1")
            .source("/test")
            .ty("dev.slipway.change.submitted.v1")
            .time(chrono::Utc::now())
            .extension(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .data("application/json", serde_json::json!({"a": 1}))
            .build()
            .unwrap()
    }

    #[test]
    fn binary_round_trip() {
        let e = sample();
        let (headers, payload) = encode(e.clone());
        assert_eq!(header(&headers, "ce-id"), Some("1"));
        assert_eq!(header(&headers, "content-type"), Some("application/json"));
        assert!(header(&headers, "ce-traceparent").is_some());
        assert_eq!(decode(Some(&headers), &payload).unwrap(), e);
    }

    #[test]
    fn structured_mode_is_read() {
        let e = sample();
        let body = serde_json::to_vec(&e).unwrap();
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, STRUCTURED_CONTENT_TYPE);
        assert_eq!(decode(Some(&h), &body).unwrap(), e);
        assert_eq!(decode(None, &body).unwrap(), e);
    }

    #[test]
    fn garbage_is_named() {
        let err = decode(None, b"not json").unwrap_err();
        assert!(err.to_string().contains("structured mode"), "{err}");
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, "text/plain");
        let err = decode(Some(&h), b"hi").unwrap_err();
        assert!(err.to_string().contains("text/plain"), "{err}");
        let mut h = HeaderMap::new();
        h.insert(SPEC_VERSION_HEADER, "1.0");
        let err = decode(Some(&h), b"{}").unwrap_err();
        assert!(err.to_string().contains("binary mode"), "{err}");
    }
}
