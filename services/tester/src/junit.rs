//! A JUnit XML report reader: `<testsuites>`/`<testsuite>` (nested or not) with `<testcase>`
//! elements whose `<failure>`, `<error>` or `<skipped>` child gives the status.
//!
//! Untrusted input: case count and message length are capped, and a document that is not XML
//! is an error naming the position.

use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};
use slipway_domain::events::{CaseStatus, TestCase, TestSummary};

/// At most this many cases go into the event (failing ones first), so a suite's fact stays
/// well below NATS's message size limit; the summary still counts every case.
pub const MAX_CASES: usize = 500;
const MAX_MESSAGE: usize = 500;

/// A report that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("JUnit report is not valid XML at byte {position}: {message}")]
pub struct JunitError {
    pub position: u64,
    pub message: String,
}

/// The cases of a report and their summary.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Report {
    pub cases: Vec<TestCase>,
    pub summary: TestSummary,
}

fn attr(e: &BytesStart<'_>, name: &[u8]) -> Option<String> {
    e.attributes().flatten().find_map(|a| {
        (a.key.as_ref() == name).then(|| {
            a.unescape_value()
                .map(|v| v.into_owned())
                .unwrap_or_else(|_| String::from_utf8_lossy(&a.value).into_owned())
        })
    })
}

fn clip(s: &str) -> String {
    let s = s.trim();
    if s.len() <= MAX_MESSAGE {
        return s.to_string();
    }
    let mut end = MAX_MESSAGE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Parses a JUnit XML document.
///
/// # Errors
/// [`JunitError`] when the document is not well-formed XML.
pub fn parse(xml: &str) -> Result<Report, JunitError> {
    let mut reader = Reader::from_str(xml);
    reader.config_mut().trim_text(true);
    let mut report = Report::default();
    let mut current: Option<TestCase> = None;
    // Inside <failure>/<error>: its text becomes the message when it has no attribute.
    let mut in_detail = false;
    let mut saw_root = false;
    loop {
        let ev = reader.read_event().map_err(|e| JunitError {
            position: reader.error_position(),
            message: e.to_string(),
        })?;
        match ev {
            Event::Start(e) if e.name().as_ref() == b"testcase" => {
                saw_root = true;
                finish(&mut report, current.take());
                current = Some(case_from(&e));
            }
            // `<testcase .../>` has no children: it passed and is complete now.
            Event::Empty(e) if e.name().as_ref() == b"testcase" => {
                saw_root = true;
                finish(&mut report, current.take());
                finish(&mut report, Some(case_from(&e)));
            }
            Event::Start(e) | Event::Empty(e)
                if matches!(e.name().as_ref(), b"failure" | b"error" | b"skipped") =>
            {
                if let Some(c) = current.as_mut() {
                    let status = match e.name().as_ref() {
                        b"failure" => CaseStatus::Failed,
                        b"error" => CaseStatus::Error,
                        _ => CaseStatus::Skipped,
                    };
                    // A failure outranks a skip if a report has both.
                    if c.status == CaseStatus::Passed || status != CaseStatus::Skipped {
                        c.status = status;
                    }
                    if let Some(m) = attr(&e, b"message") {
                        c.message = Some(clip(&m));
                    }
                    in_detail = status != CaseStatus::Skipped;
                }
            }
            Event::Start(e) if matches!(e.name().as_ref(), b"testsuite" | b"testsuites") => {
                saw_root = true;
            }
            Event::Text(t) if in_detail => {
                if let Some(c) = current.as_mut()
                    && c.message.is_none()
                {
                    let text = t.decode().map(|s| s.into_owned()).unwrap_or_default();
                    if !text.trim().is_empty() {
                        c.message = Some(clip(&text));
                    }
                }
            }
            Event::CData(t) if in_detail => {
                if let Some(c) = current.as_mut()
                    && c.message.is_none()
                {
                    c.message = Some(clip(&String::from_utf8_lossy(&t)));
                }
            }
            Event::End(e) if matches!(e.name().as_ref(), b"failure" | b"error") => {
                in_detail = false;
            }
            Event::End(e) if e.name().as_ref() == b"testcase" => {
                finish(&mut report, current.take());
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !saw_root {
        return Err(JunitError {
            position: 0,
            message: "no <testsuite>, <testsuites> or <testcase> element".into(),
        });
    }
    Ok(report)
}

fn case_from(e: &BytesStart<'_>) -> TestCase {
    TestCase {
        name: attr(e, b"name").unwrap_or_else(|| "(unnamed)".into()),
        class: attr(e, b"classname"),
        status: CaseStatus::Passed,
        duration_ms: attr(e, b"time")
            .and_then(|t| t.trim().parse::<f64>().ok())
            .filter(|t| t.is_finite() && *t >= 0.0)
            .map(|t| (t * 1000.0).round() as u64),
        message: None,
    }
}

fn finish(report: &mut Report, case: Option<TestCase>) {
    let Some(case) = case else { return };
    let failing = matches!(case.status, CaseStatus::Failed | CaseStatus::Error);
    let s = &mut report.summary;
    s.tests += 1;
    match case.status {
        CaseStatus::Passed => s.passed += 1,
        CaseStatus::Failed => s.failed += 1,
        CaseStatus::Error => s.errors += 1,
        CaseStatus::Skipped => s.skipped += 1,
    }
    if report.cases.len() < MAX_CASES {
        report.cases.push(case);
    } else if failing {
        // Make room for a failing case by dropping a passing or skipped one.
        if let Some(i) = report
            .cases
            .iter()
            .rposition(|c| !matches!(c.status, CaseStatus::Failed | CaseStatus::Error))
        {
            report.cases.remove(i);
            report.cases.push(case);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"<?xml version="1.0"?>
<testsuites>
  <testsuite name="unit" tests="4">
    <testcase classname="math" name="adds" time="0.012"/>
    <testcase classname="math" name="divides" time="0.5">
      <failure message="expected 2, got 3">assertion at math.rs:10</failure>
    </testcase>
    <testcase classname="io" name="reads"><error><![CDATA[panic: disk]]></error></testcase>
    <testcase classname="io" name="later"><skipped/></testcase>
  </testsuite>
</testsuites>"#;

    #[test]
    fn parses_statuses_and_messages() {
        let r = parse(SAMPLE).unwrap();
        assert_eq!(
            r.summary,
            TestSummary {
                tests: 4,
                passed: 1,
                failed: 1,
                errors: 1,
                skipped: 1
            }
        );
        assert_eq!(r.cases[0].duration_ms, Some(12));
        assert_eq!(r.cases[1].status, CaseStatus::Failed);
        assert_eq!(r.cases[1].message.as_deref(), Some("expected 2, got 3"));
        assert_eq!(r.cases[2].message.as_deref(), Some("panic: disk"));
        assert_eq!(r.cases[3].status, CaseStatus::Skipped);
    }

    #[test]
    fn bad_documents_are_errors() {
        assert!(parse("not xml at all").is_err());
        assert!(parse("<testsuite><testcase name='a'></testsuite>").is_err());
        assert!(parse("<html/>").is_err());
    }

    #[test]
    fn a_huge_report_keeps_its_failures_within_the_cap() {
        let mut xml = String::from("<testsuite>");
        for i in 0..2000 {
            xml.push_str(&format!("<testcase name=\"ok{i}\"/>"));
        }
        xml.push_str("<testcase name=\"bad\"><failure message=\"boom\"/></testcase></testsuite>");
        let r = parse(&xml).unwrap();
        assert_eq!(r.summary.tests, 2001);
        assert_eq!(r.summary.failed, 1);
        assert_eq!(r.cases.len(), MAX_CASES);
        assert!(r.cases.iter().any(|c| c.name == "bad"));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in ".{0,400}") {
            let _ = parse(&s);
        }
    }
}
