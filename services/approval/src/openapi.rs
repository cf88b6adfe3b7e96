//! The OpenAPI document served at `/openapi.json`: the routes as `utoipa` declares them, the
//! schemas of runs, events and gate reports generated from the Rust types that serialise them
//! (with `schemars`), and the answers every route can give besides its own (a cross-site write,
//! a body or headers too large, a request that took too long).

use std::sync::LazyLock;

use serde_json::{Map, Value, json};
use utoipa::OpenApi;

use crate::routes::ApiDoc;

/// Where the generated schemas live in the document.
const COMPONENTS: &str = "#/components/schemas/";

/// Responses whose body `utoipa` declares as a bare object, and the schema they really have:
/// (path, method, status, schema).
const TYPED: &[(&str, &str, &str, &str)] = &[
    ("/v1/runs", "get", "200", "RunList"),
    ("/v1/runs/{id}", "get", "200", "Run"),
    ("/v1/runs/{id}/events", "get", "200", "EventList"),
    ("/v1/metrics/dora", "get", "200", "DoraReport"),
    ("/v1/runs/{id}/context", "get", "200", "RunContext"),
    ("/v1/runs/{id}/logs/{stage}", "get", "200", "LogPage"),
    ("/v1/audit", "get", "200", "AuditPage"),
    ("/v1/services", "get", "200", "ServiceList"),
];

/// The document, built once.
pub static DOCUMENT: LazyLock<Value> = LazyLock::new(build);

fn build() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the document serialises");
    let mut schemas = generated_schemas();
    if let Some(Value::Object(declared)) = doc.pointer("/components/schemas") {
        for (k, v) in declared {
            schemas.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    let components = doc
        .as_object_mut()
        .expect("an object")
        .entry("components")
        .or_insert_with(|| json!({}));
    components["schemas"] = Value::Object(schemas);
    components["securitySchemes"] = json!({
        "bearer": {"type": "http", "scheme": "bearer",
            "description": "A static approver token, or an ID or access token of the configured OpenID provider"},
        "session": {"type": "apiKey", "in": "cookie", "name": "slipway_session",
            "description": "The page's signed-in session; writes also need its X-CSRF-Token header"}
    });
    for (path, method, status, schema) in TYPED {
        let at = format!(
            "/paths/{}/{method}/responses/{status}/content/application~1json/schema",
            path.replace('~', "~0").replace('/', "~1")
        );
        if let Some(s) = doc.pointer_mut(&at) {
            *s = json!({"$ref": format!("{COMPONENTS}{schema}")});
        }
    }
    add_common_responses(&mut doc);
    doc
}

/// The schemas the Rust types give: `Run` (and what it holds: stages, gate reports, tests,
/// approvals, deployments, rollouts), every event's data by CloudEvents type, and the DORA
/// report.
fn generated_schemas() -> Map<String, Value> {
    let mut generator = schemars::generate::SchemaSettings::draft2020_12()
        .for_serialize()
        .with(|s| {
            s.definitions_path = "/components/schemas".into();
            s.meta_schema = None;
        })
        .into_generator();
    // Each a reference to the definition the generator keeps under the type's name.
    let run = generator.subschema_for::<slipway_domain::Run>().to_value();
    let dora = generator
        .subschema_for::<slipway_domain::dora::Report>()
        .to_value();
    generator.subschema_for::<slipway_domain::events::GateReport>();
    generator.subschema_for::<crate::console::RunContext>();
    generator.subschema_for::<crate::console::LogPage>();
    generator.subschema_for::<crate::console::AuditPage>();
    generator.subschema_for::<crate::routes::ServiceList>();
    let mut schemas = generator.take_definitions(true);
    schemas.insert("RunList".into(), json!({"type": "array", "items": run}));
    schemas.insert("DoraReport".into(), dora);

    // Each event type: the envelope, with the data of that type.
    let mut variants = Vec::new();
    for entry in slipway_domain::events::CATALOGUE {
        let data = hoist((entry.schema)().to_value(), &mut schemas);
        let name = format!("Data_{}", entry.type_name.replace('.', "_"));
        schemas.insert(name.clone(), data);
        variants.push(json!({
            "properties": {
                "type": {"const": entry.type_name},
                "data": {"$ref": format!("{COMPONENTS}{name}")}
            }
        }));
    }
    schemas.insert(
        "Event".into(),
        json!({
            "description": "A CloudEvent of the run's log, in structured mode",
            "type": "object",
            "required": ["specversion", "id", "source", "type"],
            "properties": {
                "specversion": {"const": "1.0"},
                "id": {"type": "string", "minLength": 1},
                "source": {"type": "string", "minLength": 1},
                "type": {"type": "string"},
                "subject": {"type": "string"},
                "time": {"type": "string", "format": "date-time"},
                "datacontenttype": {"type": "string"},
                "traceparent": {"type": "string"},
                "tracestate": {"type": "string"}
            },
            "oneOf": variants
        }),
    );
    schemas.insert(
        "UnreadableEvent".into(),
        json!({
            "description": "A message of the run's log that could not be read as an event, with why",
            "type": "object",
            "required": ["seq", "subject", "error"],
            "properties": {
                "seq": {"type": "integer", "minimum": 0},
                "subject": {"type": "string"},
                "error": {"type": "string"}
            }
        }),
    );
    schemas.insert(
        "EventList".into(),
        json!({"type": "array", "items": {"oneOf": [
            {"$ref": format!("{COMPONENTS}Event")},
            {"$ref": format!("{COMPONENTS}UnreadableEvent")}
        ]}}),
    );
    schemas
}

/// A root schema made a component: its `$defs` move beside it, and its references with them.
fn hoist(mut schema: Value, schemas: &mut Map<String, Value>) -> Value {
    if let Some(Value::Object(defs)) = schema.as_object_mut().and_then(|o| o.remove("$defs")) {
        for (k, mut v) in defs {
            rewrite_refs(&mut v);
            schemas.entry(k).or_insert(v);
        }
    }
    if let Some(o) = schema.as_object_mut() {
        o.remove("$schema");
    }
    rewrite_refs(&mut schema);
    schema
}

fn rewrite_refs(v: &mut Value) {
    match v {
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                if k == "$ref"
                    && let Value::String(r) = x
                    && let Some(name) = r.strip_prefix("#/$defs/")
                {
                    *r = format!("{COMPONENTS}{name}");
                } else {
                    rewrite_refs(x);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(rewrite_refs),
        _ => {}
    }
}

/// What the gateway's own layers answer on any route, declared on each operation that does
/// not say it already.
fn add_common_responses(doc: &mut Value) {
    let error = |description: &str| {
        json!({
            "description": description,
            "content": {"application/json": {"schema": {"$ref": format!("{COMPONENTS}ErrorBody")}}}
        })
    };
    let Some(Value::Object(paths)) = doc.get_mut("paths") else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (method, op) in item.iter_mut() {
            let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else {
                continue;
            };
            let mut add = |status: &str, description: &str| {
                responses
                    .entry(status.to_string())
                    .or_insert_with(|| error(description));
            };
            add(
                "431",
                "The request's headers are larger than the gateway accepts",
            );
            add(
                "503",
                "The request took longer than [gateway] request_timeout_secs, or NATS is unavailable",
            );
            if path.contains('{') {
                add("404", "No such resource");
            }
            if method != "get" {
                add("400", "Malformed request; the error names what is wrong");
                add(
                    "403",
                    "A cross-site write (another Origin or Sec-Fetch-Site), or the policy says no",
                );
                add("413", "The body is larger than [gateway] max_body_bytes");
            }
        }
    }
}
