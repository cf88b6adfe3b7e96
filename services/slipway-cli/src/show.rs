//! Human-readable output of run states and changes.

use crate::out::outln;
use serde_json::Value;

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

fn time(v: &Value) -> String {
    v.as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.format("%H:%M:%S%.3f").to_string())
        .unwrap_or_else(|| "-".into())
}

/// A run's status as a few lines.
pub fn print_status(state: &Value) {
    outln!(
        "run {} (pipeline {}): {}",
        s(&state["run_id"]),
        s(&state["pipeline"]),
        s(&state["phase"])
    );
    if let Some(r) = state["reason"].as_str() {
        outln!("  {r}");
    }
    if let Some(t) = state["trace_id"].as_str() {
        // A trace UI's URL template ({trace_id}), as the gateway has it.
        match std::env::var("SLIPWAY_TRACE_URL_TEMPLATE") {
            Ok(tpl) if tpl.contains("{trace_id}") => {
                outln!("  trace {t}  {}", tpl.replace("{trace_id}", t));
            }
            _ => outln!("  trace {t}"),
        }
    }
    if let Some(stages) = state["stages"].as_array() {
        for st in stages {
            outln!(
                "  {:<22} {:<10} {} → {}",
                s(&st["name"]),
                s(&st["status"]),
                time(&st["started_at"]),
                time(&st["finished_at"])
            );
            if let Some(r) = st["reason"].as_str() {
                for line in r.lines().take(12) {
                    outln!("      {line}");
                }
            }
        }
    }
    if let Some(gates) = state["gates"].as_array() {
        for g in gates {
            outln!(
                "  gate {}: {}{}",
                s(&g["stage"]),
                s(&g["verdict"]),
                g["baseline_run"]
                    .as_str()
                    .map(|b| format!(" (baseline run {b})"))
                    .unwrap_or_default()
            );
            for c in g["checks"].as_array().into_iter().flatten() {
                let detects = c["detectable"]
                    .as_f64()
                    .map(|d| format!(" (detects ≥ {d:.3} at 80% power)"))
                    .unwrap_or_default();
                outln!("      {:<5} {}{detects}", s(&c["verdict"]), s(&c["note"]));
            }
        }
    }
    for c in state["calibrations"].as_array().into_iter().flatten() {
        outln!(
            "  calibration {} (attempt {}): {} answers per item",
            s(&c["stage"]),
            c["attempt"].as_u64().unwrap_or(1),
            c["repeats"].as_u64().unwrap_or(0)
        );
        for d in c["datasets"].as_array().into_iter().flatten() {
            let listed: Vec<&str> = d["unstable_items"]
                .as_array()
                .into_iter()
                .flatten()
                .take(8)
                .filter_map(|i| i["id"].as_str())
                .collect();
            outln!(
                "      {}: {} of {} items unstable{}",
                s(&d["dataset"]),
                d["unstable"].as_u64().unwrap_or(0),
                d["items"].as_u64().unwrap_or(0),
                if listed.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({}{})",
                        listed.join(", "),
                        if d["unstable"].as_u64().unwrap_or(0) > listed.len() as u64 {
                            ", ..."
                        } else {
                            ""
                        }
                    )
                }
            );
            for (m, n) in d["metrics"].as_object().into_iter().flatten() {
                outln!(
                    "        {m}: agreement {:.3}; two single answers disagree on {:.1}% of items, two majorities on {:.1}%",
                    n["agreement"].as_f64().unwrap_or(1.0),
                    100.0 * n["flip_rate"].as_f64().unwrap_or(0.0),
                    100.0 * n["majority_flip_rate"].as_f64().unwrap_or(0.0)
                );
            }
        }
    }
    if let Some(a) = state["artifact"].as_object() {
        outln!(
            "  artifact {} ({} bytes)",
            a.get("digest").and_then(Value::as_str).unwrap_or(""),
            a.get("size").and_then(Value::as_u64).unwrap_or(0)
        );
    }
    print_rollouts(state);
}

/// Each rollout of a run: the weight now, then every look (both variants side by side).
pub fn print_rollouts(state: &Value) {
    for r in state["rollouts"].as_array().into_iter().flatten() {
        outln!(
            "  rollout {}: candidate at {}%, step {}{}",
            s(&r["environment"]),
            r["weight"].as_f64().unwrap_or(0.0),
            r["step"].as_u64().unwrap_or(0) + 1,
            if r["paused"].as_bool() == Some(true) {
                " (paused)"
            } else {
                ""
            }
        );
        for w in r["weights"].as_array().into_iter().flatten() {
            outln!(
                "      {} weight {}% ({}) → {}",
                time(&w["at"]),
                w["weight"].as_f64().unwrap_or(0.0),
                s(&w["cause"]),
                w["published"]
                    .as_array()
                    .map(|p| p.iter().map(s).collect::<Vec<_>>().join(", "))
                    .unwrap_or_default()
            );
        }
        for l in r["looks"].as_array().into_iter().flatten() {
            let req = &l["requests"];
            outln!(
                "      step {} +{}s  requests stable {} / candidate {}  {}: {}",
                l["step"].as_u64().unwrap_or(0) + 1,
                l["elapsed_secs"].as_u64().unwrap_or(0),
                req[0].as_f64().unwrap_or(0.0),
                req[1].as_f64().unwrap_or(0.0),
                s(&l["decision"]),
                s(&l["reason"])
            );
            for c in l["comparisons"].as_array().into_iter().flatten() {
                outln!(
                    "          {:<8} {:<14} stable {:.4}  candidate {:.4}  p {}",
                    s(&c["verdict"]),
                    s(&c["metric"]),
                    c["stable"].as_f64().unwrap_or(0.0),
                    c["candidate"].as_f64().unwrap_or(0.0),
                    c["p_value"]
                        .as_f64()
                        .map_or("-".into(), |p| format!("{p:.4}"))
                );
            }
            if let Some(ab) = l["ab"].as_object() {
                let iv = &ab["interval"];
                outln!(
                    "          A/B {}: effect {:+.4} [{:+.4}, {:+.4}]  always-valid p {:.4}",
                    ab.get("metric").map(s).unwrap_or_default(),
                    ab.get("effect").and_then(Value::as_f64).unwrap_or(0.0),
                    iv[0].as_f64().unwrap_or(0.0),
                    iv[1].as_f64().unwrap_or(0.0),
                    ab.get("p_value").and_then(Value::as_f64).unwrap_or(1.0)
                );
            }
        }
        for c in r["controls"].as_array().into_iter().flatten() {
            outln!(
                "      {} {} by {}{}",
                time(&c["at"]),
                s(&c["action"]),
                s(&c["by"]),
                c["comment"]
                    .as_str()
                    .map(|x| format!(": {x}"))
                    .unwrap_or_default()
            );
        }
    }
}

/// What changed between two states of a run, one line per change.
pub fn print_changes(before: Option<&Value>, after: &Value) {
    let now = chrono::Utc::now().format("%H:%M:%S");
    if before.map(|b| &b["phase"]) != Some(&after["phase"]) {
        outln!(
            "{now} run {} is {}",
            s(&after["run_id"]),
            s(&after["phase"])
        );
        if let Some(r) = after["reason"].as_str() {
            outln!("         {r}");
        }
    }
    let empty = Vec::new();
    let old = before
        .and_then(|b| b["stages"].as_array())
        .unwrap_or(&empty);
    for st in after["stages"].as_array().unwrap_or(&empty) {
        let prev = old.iter().find(|o| o["name"] == st["name"]);
        if prev.map(|p| &p["status"]) != Some(&st["status"]) && s(&st["status"]) != "pending" {
            outln!("{now}   {:<22} {}", s(&st["name"]), s(&st["status"]));
            if let Some(r) = st["reason"].as_str() {
                outln!("           {}", r.lines().next().unwrap_or(""));
            }
        }
    }
}

/// `slipway changes` as a table.
pub fn print_changes_table(rows: &[Value]) {
    if rows.is_empty() {
        outln!("No changes received.");
        return;
    }
    for r in rows {
        let outcome = &r["outcome"];
        let what = if let Some(run) = outcome["run_id"].as_str() {
            if outcome["duplicate"].as_bool() == Some(true) {
                format!("repeat of run {run}")
            } else {
                format!("run {run}")
            }
        } else if let Some(reason) = outcome["rejected"].as_str() {
            format!("rejected: {reason}")
        } else {
            "not answered yet".into()
        };
        outln!(
            "#{:<6} {:<25} {:<20} {:<38} {what}",
            r["seq"],
            r["time"].as_str().unwrap_or("-"),
            r["source"].as_str().unwrap_or("-"),
            r["id"].as_str().unwrap_or("-"),
        );
    }
}

/// `slipway dora` as a table.
pub fn print_dora(r: &slipway_domain::dora::Report) {
    let opt = |v: Option<f64>, unit: &str| v.map_or("-".to_string(), |x| format!("{x:.2}{unit}"));
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{:.1}%", x * 100.0));
    outln!(
        "DORA from {} to {}",
        r.since.format("%Y-%m-%d %H:%M"),
        r.until.format("%Y-%m-%d %H:%M")
    );
    outln!(
        "{:<24} {:>8} {:>10} {:>14} {:>10} {:>14} {:>8}",
        "pipeline",
        "deploys",
        "per day",
        "lead time p50",
        "fail rate",
        "recovery p50",
        "rework"
    );
    let row = |name: &str, m: &slipway_domain::dora::Measures| {
        outln!(
            "{:<24} {:>8} {:>10.2} {:>14} {:>10} {:>14} {:>8}",
            name,
            m.deployments,
            m.deployment_frequency_per_day,
            opt(m.change_lead_time_hours_p50, " h"),
            pct(m.change_fail_rate),
            opt(m.failed_deployment_recovery_hours_p50, " h"),
            pct(m.deployment_rework_rate),
        );
    };
    for (p, m) in &r.pipelines {
        row(p, m);
    }
    row("(all)", &r.overall);
}

/// `slipway services`: the replicas, then what each `up` keeps running, then what is missing.
pub fn print_services(running: &slipway_core::health::Running, missing: &[String]) {
    outln!(
        "{:<16} {:<40} {:<8} {:>9} {:<9} {:>5}  HEALTH",
        "SERVICE",
        "REPLICA",
        "VERSION",
        "UPTIME",
        "STATE",
        "LAG"
    );
    for r in &running.replicas {
        let state = match (r.live, r.ready) {
            (true, true) => "ready".to_string(),
            (true, false) => "not ready".to_string(),
            _ => "wedged".to_string(),
        };
        outln!(
            "{:<16} {:<40} {:<8} {:>8}s {:<9} {:>5}  {}{}",
            r.service,
            r.replica,
            r.version,
            r.uptime_secs,
            state,
            r.lag.map_or_else(|| "-".to_string(), |l| l.to_string()),
            r.health_url.as_deref().unwrap_or("-"),
            r.not_ready
                .as_deref()
                .map(|w| format!(" ({w})"))
                .unwrap_or_default()
        );
    }
    for s in &running.supervisors {
        outln!("slipway up on {} (pid {}):", s.host, s.pid);
        for p in &s.processes {
            outln!(
                "  {:<26} {:<12} restarts {:<4}{}{}",
                p.name,
                if p.running {
                    p.pid
                        .map_or_else(|| "running".to_string(), |pid| format!("pid {pid}"))
                } else {
                    "not running".to_string()
                },
                p.restarts,
                p.last_exit
                    .as_deref()
                    .map(|e| format!(" last exit: {e}"))
                    .unwrap_or_default(),
                if p.crash_looping {
                    "  CRASH-LOOPING"
                } else {
                    ""
                }
            );
        }
    }
    if !missing.is_empty() {
        outln!("no live replica: {}", missing.join(", "));
    }
}
