//! An OTLP receiver for tests: decodes the real export (OTLP protobuf over HTTP, or gRPC) of
//! the services under test and keeps every span and metric name it received.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
    metrics_service_server::{MetricsService, MetricsServiceServer},
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;

/// One received span, ids in lowercase hex, attributes as strings.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    /// The exporting process's `service.name`.
    pub service: String,
    pub resource: BTreeMap<String, String>,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent: String,
    pub name: String,
    /// OTLP `SpanKind`: 1 internal, 2 server, 3 client, 4 producer, 5 consumer.
    pub kind: i32,
    pub attrs: BTreeMap<String, String>,
    /// Span ids this span links to.
    pub links: Vec<String>,
    /// OTLP status code: 0 unset, 1 ok, 2 error.
    pub status: i32,
    pub start_ns: u64,
    pub end_ns: u64,
}

impl Span {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attrs.get(key).map(String::as_str)
    }
}

#[derive(Debug, Default)]
struct Received {
    spans: Vec<Span>,
    /// Metric names by the exporting service.
    metrics: BTreeMap<String, BTreeSet<String>>,
    /// The last data point attributes seen per metric name (for checks on labels).
    metric_attrs: BTreeMap<String, BTreeSet<String>>,
    /// The latest value of each data point, by metric name and attributes: a histogram's count
    /// and sum, a sum's or gauge's value (and 0). Exports are cumulative, so the latest wins.
    points: BTreeMap<String, BTreeMap<Attributes, (f64, f64)>>,
}

/// A data point's attributes, as strings.
pub type Attributes = BTreeMap<String, String>;

/// A running receiver; stops with the test's runtime.
#[derive(Debug, Clone)]
pub struct Collector {
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` for the services.
    pub endpoint: String,
    received: Arc<Mutex<Received>>,
}

fn value(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value(&kv.value)))
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Received {
    fn traces(&mut self, req: ExportTraceServiceRequest) {
        for rs in req.resource_spans {
            let resource = attrs(&rs.resource.map(|r| r.attributes).unwrap_or_default());
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    self.spans.push(Span {
                        service: service.clone(),
                        resource: resource.clone(),
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        name: s.name,
                        kind: s.kind,
                        attrs: attrs(&s.attributes),
                        links: s.links.iter().map(|l| hex(&l.span_id)).collect(),
                        status: s.status.map_or(0, |st| st.code),
                        start_ns: s.start_time_unix_nano,
                        end_ns: s.end_time_unix_nano,
                    });
                }
            }
        }
    }

    fn metrics(&mut self, req: ExportMetricsServiceRequest) {
        use opentelemetry_proto::tonic::metrics::v1::metric::Data;
        for rm in req.resource_metrics {
            let resource = attrs(&rm.resource.map(|r| r.attributes).unwrap_or_default());
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for sm in rm.scope_metrics {
                for m in sm.metrics {
                    let keys: Vec<String> = match &m.data {
                        Some(Data::Histogram(h)) => h
                            .data_points
                            .iter()
                            .flat_map(|p| p.attributes.iter().map(|a| a.key.clone()))
                            .collect(),
                        Some(Data::Sum(s)) => s
                            .data_points
                            .iter()
                            .flat_map(|p| p.attributes.iter().map(|a| a.key.clone()))
                            .collect(),
                        Some(Data::Gauge(g)) => g
                            .data_points
                            .iter()
                            .flat_map(|p| p.attributes.iter().map(|a| a.key.clone()))
                            .collect(),
                        _ => vec![],
                    };
                    self.metric_attrs
                        .entry(m.name.clone())
                        .or_default()
                        .extend(keys);
                    let points = self.points.entry(m.name.clone()).or_default();
                    use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value as N;
                    let number = |v: &Option<N>| match v {
                        Some(N::AsDouble(d)) => *d,
                        Some(N::AsInt(i)) => *i as f64,
                        None => 0.0,
                    };
                    match &m.data {
                        Some(Data::Histogram(h)) => {
                            for p in &h.data_points {
                                points.insert(
                                    attrs(&p.attributes),
                                    (p.count as f64, p.sum.unwrap_or(0.0)),
                                );
                            }
                        }
                        Some(Data::Sum(x)) => {
                            for p in &x.data_points {
                                points.insert(attrs(&p.attributes), (number(&p.value), 0.0));
                            }
                        }
                        Some(Data::Gauge(g)) => {
                            for p in &g.data_points {
                                points.insert(attrs(&p.attributes), (number(&p.value), 0.0));
                            }
                        }
                        _ => {}
                    }
                    self.metrics
                        .entry(service.clone())
                        .or_default()
                        .insert(m.name);
                }
            }
        }
    }
}

async fn http_traces(State(r): State<Arc<Mutex<Received>>>, body: Bytes) -> impl IntoResponse {
    match ExportTraceServiceRequest::decode(body) {
        Ok(req) => {
            r.lock().unwrap().traces(req);
            protobuf(ExportTraceServiceResponse::default().encode_to_vec())
        }
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

async fn http_metrics(State(r): State<Arc<Mutex<Received>>>, body: Bytes) -> impl IntoResponse {
    match ExportMetricsServiceRequest::decode(body) {
        Ok(req) => {
            r.lock().unwrap().metrics(req);
            protobuf(ExportMetricsServiceResponse::default().encode_to_vec())
        }
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

fn protobuf(body: Vec<u8>) -> axum::response::Response {
    ([(header::CONTENT_TYPE, "application/x-protobuf")], body).into_response()
}

#[derive(Debug, Clone)]
struct Grpc(Arc<Mutex<Received>>);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().traces(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().metrics(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

impl Collector {
    /// An OTLP/HTTP (protobuf) receiver on a free loopback port.
    pub async fn http() -> Self {
        let received = Arc::new(Mutex::new(Received::default()));
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(http_traces))
            .route("/v1/metrics", axum::routing::post(http_metrics))
            .with_state(received.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            endpoint: format!("http://{addr}"),
            received,
        }
    }

    /// An OTLP/gRPC receiver on a free loopback port.
    pub async fn grpc() -> Self {
        let received = Arc::new(Mutex::new(Received::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = Grpc(received.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(svc.clone()))
                .add_service(MetricsServiceServer::new(svc))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Self {
            endpoint: format!("http://{addr}"),
            received,
        }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.received.lock().unwrap().spans.clone()
    }

    /// Metric names received so far, by exporting service.
    pub fn metrics(&self) -> BTreeMap<String, BTreeSet<String>> {
        self.received.lock().unwrap().metrics.clone()
    }

    /// Attribute keys seen on a metric's data points.
    pub fn metric_attrs(&self, name: &str) -> BTreeSet<String> {
        self.received
            .lock()
            .unwrap()
            .metric_attrs
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    /// The latest data points of a metric: attributes, and a histogram's count and sum or a
    /// sum's value (and 0).
    pub fn metric_points(&self, name: &str) -> Vec<(Attributes, f64, f64)> {
        self.received
            .lock()
            .unwrap()
            .points
            .get(name)
            .map(|p| p.iter().map(|(a, (v, s))| (a.clone(), *v, *s)).collect())
            .unwrap_or_default()
    }

    /// Waits until `done` holds for the spans received (panics with `what` after `timeout`).
    pub async fn wait(&self, what: &str, timeout: Duration, done: impl Fn(&[Span]) -> bool) {
        let until = Instant::now() + timeout;
        loop {
            if done(&self.spans()) {
                return;
            }
            assert!(
                Instant::now() < until,
                "timed out waiting for {what}; received {} spans",
                self.spans().len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
