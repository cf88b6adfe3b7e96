//! `GET /v1/runs`: runs in pages, with a cursor, filtered by pipeline, phase and creation time.
//!
//! A listing is two sections, fixed when its first page is read (the index's last revision
//! then, `top`, is kept in the cursor):
//!
//! - **held**: the runs the gateway holds (in flight, or ended and not yet indexed) and the runs
//!   indexed after `top` (they ended while the listing was read), newest created first;
//! - **ended**: the index's entries up to `top`, most recently indexed first, read page by page
//!   from the index (never the whole of it).
//!
//! Every run is in exactly one section (by its index revision against `top`), and each section
//! is read in an order that runs added later cannot enter, so paging never skips or repeats a
//! run while runs start and end: runs created after the first page are left to the next
//! listing. A page costs what it reads: the held runs (the work in flight) and the entries it
//! scans, at most [`SCAN_BUDGET`] per request; a filter that matches few runs may return a
//! short page with a cursor to go on.

use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use slipway_domain::{Phase, Run};

use crate::AppState;
use crate::error::ApiError;
use crate::projection::ListKey;

/// At most this many index revisions are looked at for one page.
pub const SCAN_BUDGET: u64 = 20_000;

/// What a listing keeps: the filters and where the next page starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    #[serde(flatten)]
    pub filter: Filter,
    /// The index's last revision when the listing began.
    pub top: u64,
    /// In the held section: runs created before this one (creation in Unix nanoseconds, id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_before: Option<(i64, String)>,
    /// In the ended section: entries below this revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<u64>,
}

/// Which runs a listing shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Filter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
    /// Runs created at or after this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// Runs created before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
}

impl Filter {
    fn matches(&self, pipeline: &str, phase: Phase, created: DateTime<Utc>) -> bool {
        self.phase.is_none_or(|p| p == phase)
            && self.pipeline.as_deref().is_none_or(|p| p == pipeline)
            && self.since.is_none_or(|t| created >= t)
            && self.until.is_none_or(|t| created < t)
    }

    pub fn matches_run(&self, run: &Run) -> bool {
        self.matches(&run.pipeline, run.phase, run.created_at)
    }
}

/// A time in a query: RFC 3339, or a window back from now such as `7d`, `12h` or `90m`.
///
/// # Errors
/// A message naming the value.
pub fn parse_time(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    slipway_domain::dora::parse_window(s)
        .map(|w| now - w)
        .map_err(|_| format!("{s:?} is neither an RFC 3339 time nor a window such as 7d"))
}

impl Cursor {
    pub fn encode(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(self).expect("a cursor serialises"))
    }

    /// # Errors
    /// Why `s` is no cursor of this gateway.
    pub fn decode(s: &str) -> Result<Self, String> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| "cursor: not a cursor this gateway gave".to_string())?;
        serde_json::from_slice(&bytes)
            .map_err(|_| "cursor: not a cursor this gateway gave".to_string())
    }
}

/// One page: the runs (the same JSON as `slipway status --json`) and the cursor of the next,
/// if there may be more.
#[derive(Debug)]
pub struct Page {
    pub runs: Vec<Value>,
    pub next: Option<Cursor>,
}

fn key_of(created: DateTime<Utc>, id: &str) -> (i64, String) {
    (
        created.timestamp_nanos_opt().unwrap_or(i64::MAX),
        id.to_string(),
    )
}

/// What a listing looks at of an indexed run: pipeline, phase, creation and end.
type Fields = (String, Phase, DateTime<Utc>, Option<DateTime<Utc>>);

/// What an index entry shows of a run: its listing fields, read from its JSON.
fn fields(run: &Value) -> Option<Fields> {
    let pipeline = run.get("pipeline")?.as_str()?.to_string();
    let phase = Phase::parse(run.get("phase")?.as_str()?)?;
    let created = DateTime::parse_from_rfc3339(run.get("created_at")?.as_str()?)
        .ok()?
        .with_timezone(&Utc);
    let finished = run
        .get("finished_at")
        .and_then(Value::as_str)
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc));
    Some((pipeline, phase, created, finished))
}

/// An entry's run as JSON: the entry's own, or for one another fold made, the run folded from
/// its log (such entries exist only until the index is written again).
async fn entry_run(state: &AppState, e: slipway_core::store::runs::Indexed) -> Option<Value> {
    match e.entry {
        Some(entry) => Some(entry.run),
        None => crate::routes::run_from_log(state, &e.run_id)
            .await
            .ok()
            .map(|r| r.to_json()),
    }
}

/// The page `cursor` points at (the first page when `None`), of at most `limit` runs.
///
/// # Errors
/// [`ApiError`] when the index cannot be read.
pub async fn page(
    state: &AppState,
    filter: Filter,
    cursor: Option<Cursor>,
    limit: usize,
) -> Result<Page, ApiError> {
    let limit = limit.max(1);
    let Some(index) = &state.index else {
        // No index to read: the held runs alone.
        return Ok(held_only(state, &filter, cursor.as_ref(), limit));
    };
    let cursor = match cursor {
        Some(c) => c,
        None => Cursor {
            filter,
            top: index.last_revision().await?,
            held_before: None,
            below: None,
        },
    };
    if let Some(below) = cursor.below {
        return ended(state, cursor, below, limit, Vec::new()).await;
    }
    held(state, cursor, limit).await
}

fn held_only(state: &AppState, filter: &Filter, cursor: Option<&Cursor>, limit: usize) -> Page {
    let before = cursor.and_then(|c| c.held_before.clone());
    let runs = state.runs.read().expect("lock");
    let mut out: Vec<(ListKey, Value)> = runs
        .newest_first()
        .filter(|r| filter.matches_run(r))
        .filter(|r| {
            before
                .as_ref()
                .is_none_or(|b| key_of(r.created_at, &r.run_id) < *b)
        })
        .take(limit + 1)
        .map(|r| ((r.created_at, r.run_id.clone()), r.to_json()))
        .collect();
    let more = out.len() > limit;
    out.truncate(limit);
    Page {
        next: more.then(|| Cursor {
            filter: filter.clone(),
            top: 0,
            held_before: out.last().map(|((t, id), _)| key_of(*t, id)),
            below: None,
        }),
        runs: out.into_iter().map(|(_, v)| v).collect(),
    }
}

/// The held section from the cursor, then the ended section when it is done.
async fn held(state: &AppState, cursor: Cursor, limit: usize) -> Result<Page, ApiError> {
    let index = state.index.as_ref().expect("checked by the caller");
    let before = cursor.held_before.clone();
    let below_key =
        |created: DateTime<Utc>, id: &str| before.as_ref().is_none_or(|b| key_of(created, id) < *b);
    // The gateway's runs, newest first, with whether each has ended: enough for a page (the
    // ended ones may belong to the ended section, and are few: they leave once indexed).
    let mine: Vec<(i64, String, bool, Value)> = {
        let runs = state.runs.read().expect("lock");
        let mut open = 0;
        runs.newest_first()
            .filter(|r| cursor.filter.matches_run(r) && below_key(r.created_at, &r.run_id))
            .take_while(|r| {
                open += usize::from(!r.is_ended());
                open <= limit + 1
            })
            .map(|r| {
                let (t, id) = key_of(r.created_at, &r.run_id);
                (t, id, r.is_ended(), r.to_json())
            })
            .collect()
    };
    let mut by_id: std::collections::BTreeMap<String, ((i64, String), Value)> =
        std::collections::BTreeMap::new();
    for (t, id, is_ended, json) in mine {
        // An ended run already in the index as of `top` belongs to the ended section.
        if is_ended
            && index
                .revision(&id)
                .await?
                .is_some_and(|rev| rev <= cursor.top)
        {
            continue;
        }
        by_id.insert(id.clone(), ((t, id), json));
    }
    // Runs indexed since the listing began: they were held then, and may have left since.
    let last = index.last_revision().await?;
    if last > cursor.top {
        for e in index
            .before(last + 1, (last - cursor.top).min(SCAN_BUDGET))
            .await?
        {
            if e.revision <= cursor.top || by_id.contains_key(&e.run_id) {
                continue;
            }
            let run_id = e.run_id.clone();
            let Some(json) = entry_run(state, e).await else {
                continue;
            };
            let Some((pipeline, phase, created, _)) = fields(&json) else {
                continue;
            };
            if cursor.filter.matches(&pipeline, phase, created) && below_key(created, &run_id) {
                by_id.insert(run_id.clone(), (key_of(created, &run_id), json));
            }
        }
    }
    let mut found: Vec<((i64, String), Value)> = by_id.into_values().collect();
    found.sort_by(|a, b| b.0.cmp(&a.0));
    if found.len() > limit {
        found.truncate(limit);
        let held_before = found.last().map(|(k, _)| k.clone());
        return Ok(Page {
            runs: found.into_iter().map(|(_, v)| v).collect(),
            next: Some(Cursor {
                held_before,
                ..cursor
            }),
        });
    }
    let runs: Vec<Value> = found.into_iter().map(|(_, v)| v).collect();
    let left = limit - runs.len();
    let next = Cursor {
        held_before: None,
        below: Some(cursor.top + 1),
        ..cursor
    };
    if left == 0 {
        return Ok(Page {
            runs,
            next: (next.top > 0).then_some(next),
        });
    }
    ended(state, next, cursor.top + 1, left, runs).await
}

/// The ended section below revision `below`: up to `limit` runs after those already in `runs`.
async fn ended(
    state: &AppState,
    cursor: Cursor,
    mut below: u64,
    limit: usize,
    mut runs: Vec<Value>,
) -> Result<Page, ApiError> {
    let index = state.index.as_ref().expect("checked by the caller");
    let filtered = cursor.filter != Filter::default();
    let mut scanned = 0;
    let mut taken = 0;
    while below > 1 && scanned < SCAN_BUDGET {
        // Unfiltered, a page reads what it returns (and the odd gap of a replaced entry).
        let want = (limit - taken) as u64;
        let chunk = if filtered { want * 8 } else { want + 8 }
            .clamp(16, 4096)
            .min(SCAN_BUDGET - scanned);
        let entries = index.before(below, chunk).await?;
        scanned += chunk;
        let floor = below.saturating_sub(chunk).max(1);
        for e in entries {
            let revision = e.revision;
            let Some(json) = entry_run(state, e).await else {
                continue;
            };
            let Some((pipeline, phase, created, finished)) = fields(&json) else {
                continue;
            };
            // Entries are in about the order runs ended: one that ended before `since` means
            // the rest were created before it too.
            if cursor
                .filter
                .since
                .is_some_and(|since| finished.is_some_and(|f| f < since))
            {
                return Ok(Page { runs, next: None });
            }
            if cursor.filter.matches(&pipeline, phase, created) {
                runs.push(json);
                taken += 1;
                if taken == limit {
                    return Ok(Page {
                        runs,
                        next: (revision > 1).then_some(Cursor {
                            below: Some(revision),
                            ..cursor
                        }),
                    });
                }
            }
        }
        below = floor;
    }
    Ok(Page {
        runs,
        next: (below > 1).then_some(Cursor {
            below: Some(below),
            ..cursor
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_reads_back_and_a_forged_one_is_refused() {
        let c = Cursor {
            filter: Filter {
                phase: Some(Phase::Succeeded),
                pipeline: Some("svc a/b?".into()),
                since: Some(DateTime::from_timestamp(1_700_000_000, 0).unwrap()),
                until: None,
            },
            top: 42,
            held_before: Some((1_700_000_000_000_000_000, "r-1".into())),
            below: None,
        };
        let s = c.encode();
        assert!(
            s.chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
        );
        assert_eq!(Cursor::decode(&s).unwrap(), c);
        assert!(
            Cursor::decode("not a cursor")
                .unwrap_err()
                .contains("cursor")
        );
        assert!(Cursor::decode("e30").is_err()); // "{}": no top
    }

    #[test]
    fn times_are_rfc3339_or_a_window_back_from_now() {
        let now = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        assert_eq!(
            parse_time("2023-11-14T22:13:20Z", now).unwrap(),
            DateTime::parse_from_rfc3339("2023-11-14T22:13:20Z").unwrap()
        );
        assert_eq!(
            parse_time("1d", now).unwrap(),
            now - chrono::Duration::days(1)
        );
        assert!(
            parse_time("yesterday", now)
                .unwrap_err()
                .contains("yesterday")
        );
    }
}
