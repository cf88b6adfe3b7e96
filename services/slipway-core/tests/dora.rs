//! DORA chunks against a real server: what DORA reads from chunks and the index's tail is what
//! it reads from the index alone, however the index was compacted.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use slipway_core::store::dora::{DoraChunks, report};
use slipway_core::store::runs::RunIndex;
use slipway_core::testing::TestNats;
use slipway_domain::dora::{Chunk, Deployed, Report, report_of};
use slipway_domain::index::{FOLD_VERSION, IndexEntry};

fn entry(n: i64, deployed: bool) -> IndexEntry {
    IndexEntry {
        fold: FOLD_VERSION,
        through: n as u64,
        run: serde_json::json!({ "run_id": format!("r{n}") }),
        deployed: deployed.then(|| Deployed {
            pipeline: format!("p{}", n % 2),
            deployed_at: Utc::now() - chrono::Duration::hours(n),
            lead_ms: 1000 * n,
            failed: n % 3 == 0,
            recovery_ms: (n % 3 == 0).then_some(500),
            rolled_back: n % 3 == 0,
        }),
    }
}

/// Every chunk in the bucket, in the order written.
async fn all_chunks(chunks: &DoraChunks) -> Vec<Chunk> {
    let (bytes, _) = chunks.since(DateTime::UNIX_EPOCH).await.unwrap();
    bytes
        .iter()
        .map(|b| serde_json::from_slice(b).unwrap())
        .collect()
}

/// DORA since `since` through DORA's chunks and the index after them.
async fn dora(index: &RunIndex, chunks: &DoraChunks, since: DateTime<Utc>) -> Report {
    report(index, Some(chunks), since, Utc::now(), HashMap::new())
        .await
        .unwrap()
}

/// DORA since `since` of exactly the `expected` deployments, up to the same end as `got`.
fn of(expected: &HashMap<String, Deployed>, since: DateTime<Utc>, got: &Report) -> Report {
    report_of(expected.values().cloned(), since, got.until)
}

#[tokio::test]
async fn dora_reads_the_same_deployments_from_chunks_and_tail_as_from_the_index() {
    let nats = TestNats::start();
    let bus = nats.bus().await;
    let index = RunIndex::open(&bus).await.unwrap();
    let chunks = DoraChunks::open(&bus).await.unwrap();
    let mut expected: HashMap<String, Deployed> = HashMap::new();
    // Eight runs; two ended without a production deploy.
    for n in 1..=8 {
        let e = entry(n, n % 4 != 0);
        if let Some(d) = &e.deployed {
            expected.insert(format!("r{n}"), d.clone());
        }
        assert!(index.put_once(&format!("r{n}"), &e).await.unwrap());
    }
    let epoch = DateTime::UNIX_EPOCH;
    let hour = Duration::from_secs(3600);
    let got = dora(&index, &chunks, epoch).await;
    assert_eq!(got, of(&expected, epoch, &got));

    // Chunks of three entries: two full ones; the last two entries are recent, so they stay
    // in the tail.
    assert_eq!(chunks.compact_with(&index, 3, hour).await.unwrap(), 2);
    let written = all_chunks(&chunks).await;
    assert_eq!(
        written
            .iter()
            .map(|c| (c.from, c.through))
            .collect::<Vec<_>>(),
        [(1, 3), (4, 6)]
    );
    assert_eq!(written.iter().map(Chunk::len).sum::<usize>(), 5);
    let got = dora(&index, &chunks, epoch).await;
    assert_eq!(got, of(&expected, epoch, &got));
    assert_eq!(chunks.compact_with(&index, 3, hour).await.unwrap(), 0);

    // A second writer over the same range finds its chunk there and writes nothing twice.
    let other = DoraChunks::open(&nats.bus().await).await.unwrap();
    let (a, b) = tokio::join!(
        chunks.compact_with(&index, 3, Duration::ZERO),
        other.compact_with(&index, 3, Duration::ZERO)
    );
    assert_eq!(a.unwrap() + b.unwrap(), 1, "the short last chunk, once");
    let written = all_chunks(&chunks).await;
    assert_eq!(written.last().map(|c| (c.from, c.through)), Some((7, 8)));

    // Runs indexed after the chunks are read from the tail; a window leaves older ones out.
    let late = entry(9, true);
    expected.insert("r9".into(), late.deployed.clone().unwrap());
    index.put_once("r9", &late).await.unwrap();
    let got = dora(&index, &chunks, epoch).await;
    assert_eq!(got, of(&expected, epoch, &got));
    let since = Utc::now() - chrono::Duration::minutes(150);
    let recent = dora(&index, &chunks, since).await;
    assert_eq!(
        recent.overall.deployments, 2,
        "r1 and r2 within 150 minutes"
    );
    assert_eq!(recent, of(&expected, since, &recent));

    // Dropped, the chunks leave DORA reading the index alone, and are made again.
    chunks.clear().await.unwrap();
    let got = dora(&index, &chunks, epoch).await;
    assert_eq!(got, of(&expected, epoch, &got));
    assert_eq!(
        chunks
            .compact_with(&index, 4, Duration::ZERO)
            .await
            .unwrap(),
        3
    );
    let got = dora(&index, &chunks, epoch).await;
    assert_eq!(got, of(&expected, epoch, &got));
}
