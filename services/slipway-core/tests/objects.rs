//! Artifacts and logs in the object store, against a real nats-server: what is read back is
//! what was stored, whatever its size, and reads do not leave consumers behind on the server.

use std::path::{Path, PathBuf};

use slipway_core::bus::Bus;
use slipway_core::store::objects::Objects;
use slipway_core::store::objects::{self, DIRECT_PAGE_CHUNKS};
use slipway_core::testing::TestNats;
use slipway_domain::events::ObjectRef;

/// The client's default chunk size.
const CHUNK: usize = 128 * 1024;

async fn connected(nats: &TestNats) -> Bus {
    let bus = Bus::connect(&nats.settings(), "test").await.unwrap();
    bus.ensure_stream().await.unwrap();
    bus
}

/// `len` bytes that differ from chunk to chunk, so a chunk out of order would show.
fn bytes(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i / 7 % 251) as u8 ^ salt ^ (i / CHUNK) as u8)
        .collect()
}

fn file(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

/// The bucket's stream as the server holds it now.
async fn bucket_state(bus: &Bus, bucket: &str) -> async_nats::jetstream::stream::State {
    bus.jetstream()
        .get_stream(format!("OBJ_{bucket}"))
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .clone()
}

async fn consumers(bus: &Bus, bucket: &str) -> usize {
    bucket_state(bus, bucket).await.consumer_count
}

#[tokio::test]
async fn every_size_reads_back_as_stored_without_a_consumer() {
    let nats = TestNats::start();
    let bus = connected(&nats).await;
    let dir = tempfile::tempdir().unwrap();
    let page = DIRECT_PAGE_CHUNKS * CHUNK;
    let sizes = [
        0,
        1,
        CHUNK,
        CHUNK + 1,
        3 * CHUNK + 5,
        page,
        page + 1,
        3 * page + 7,
    ];
    for (i, len) in sizes.into_iter().enumerate() {
        let content = bytes(len, i as u8);
        let src = file(dir.path(), &format!("in-{i}"), &content);
        let stored = objects::put_file(&Objects::new(&bus), "artifacts", None, &src)
            .await
            .unwrap();
        assert_eq!(stored.size, len as u64);
        let out = dir.path().join(format!("out-{i}"));
        objects::get_file(&Objects::new(&bus), &stored, &out)
            .await
            .unwrap();
        assert!(std::fs::read(&out).unwrap() == content, "{len} bytes");
        let read = objects::read(&Objects::new(&bus), "artifacts", &stored.name)
            .await
            .unwrap();
        assert!(read == content, "{len} bytes in memory");
        assert_eq!(consumers(&bus, "artifacts").await, 0, "{len} bytes");
    }
}

#[tokio::test]
async fn a_chunk_missing_from_a_later_page_is_an_error_naming_the_object() {
    let nats = TestNats::start();
    let bus = connected(&nats).await;
    let dir = tempfile::tempdir().unwrap();
    let chunks = DIRECT_PAGE_CHUNKS + 8;
    let src = file(dir.path(), "a", &bytes(chunks * CHUNK, 8));
    let stored = objects::put_file(&Objects::new(&bus), "logs", Some("big.log"), &src)
        .await
        .unwrap();
    // A fresh bucket: the chunks are stream sequences 1 to `chunks`, the info the next one.
    bus.jetstream()
        .get_stream("OBJ_logs")
        .await
        .unwrap()
        .delete_message((DIRECT_PAGE_CHUNKS + 3) as u64)
        .await
        .unwrap();
    let out = dir.path().join("out");
    let err = objects::get_file(&Objects::new(&bus), &stored, &out)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "big.log has {} of its {chunks} chunks",
            chunks - 1
        )),
        "{err}"
    );
}

#[tokio::test]
async fn many_reads_leave_no_consumer_on_the_server() {
    let nats = TestNats::start();
    let bus = connected(&nats).await;
    let dir = tempfile::tempdir().unwrap();
    let src = file(dir.path(), "a", &bytes(2 * CHUNK + 3, 1));
    let stored = objects::put_file(&Objects::new(&bus), "artifacts", None, &src)
        .await
        .unwrap();
    let log = file(dir.path(), "log", b"build output\n");
    let named = objects::put_file(&Objects::new(&bus), "logs", Some("run-1/build.log"), &log)
        .await
        .unwrap();
    // The client's own read would leave one ordered consumer per read for 30 s.
    for i in 0..50 {
        objects::get_file(
            &Objects::new(&bus),
            &stored,
            &dir.path().join(format!("out-{i}")),
        )
        .await
        .unwrap();
        objects::read(&Objects::new(&bus), "logs", &named.name)
            .await
            .unwrap();
    }
    assert_eq!(consumers(&bus, "artifacts").await, 0);
    assert_eq!(consumers(&bus, "logs").await, 0);
}

#[tokio::test]
async fn objects_written_at_once_read_back_apart() {
    let nats = TestNats::start();
    let bus = connected(&nats).await;
    let dir = tempfile::tempdir().unwrap();
    // Two multi-chunk puts at once: their chunks interleave in the bucket's stream.
    let (a, b) = (bytes(5 * CHUNK + 1, 3), bytes(4 * CHUNK + 2, 4));
    let (pa, pb) = (file(dir.path(), "a", &a), file(dir.path(), "b", &b));
    let store = Objects::new(&bus);
    let (ra, rb) = tokio::join!(
        objects::put_file(&store, "artifacts", None, &pa),
        objects::put_file(&store, "artifacts", None, &pb),
    );
    for (stored, content) in [(ra.unwrap(), a), (rb.unwrap(), b)] {
        assert_reads_back(&bus, &stored, dir.path(), &content).await;
    }
}

#[tokio::test]
async fn a_replaced_object_reads_as_its_last_version() {
    let nats = TestNats::start();
    let bus = connected(&nats).await;
    let dir = tempfile::tempdir().unwrap();
    let first = file(dir.path(), "1", &bytes(3 * CHUNK, 5));
    let second = file(dir.path(), "2", b"shorter");
    objects::put_file(&Objects::new(&bus), "logs", Some("build.log"), &first)
        .await
        .unwrap();
    objects::put_file(&Objects::new(&bus), "logs", Some("build.log"), &second)
        .await
        .unwrap();
    assert_eq!(
        objects::read(&Objects::new(&bus), "logs", "build.log")
            .await
            .unwrap(),
        b"shorter"
    );
}

/// `stored` fetched into a file under `dir` holds exactly `content`.
async fn assert_reads_back(bus: &Bus, stored: &ObjectRef, dir: &Path, content: &[u8]) {
    let out = dir.join("out");
    objects::get_file(&Objects::new(bus), stored, &out)
        .await
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == content, "{}", stored.name);
}

/// Messages in the bucket's stream: chunks and infos.
async fn stored_messages(bus: &Bus, bucket: &str) -> u64 {
    bucket_state(bus, bucket).await.messages
}

#[tokio::test]
async fn a_put_is_the_object_stores_layout_and_a_replaced_versions_chunks_are_purged() {
    let nats = TestNats::start();
    let bus = connected(&nats).await;
    let dir = tempfile::tempdir().unwrap();
    let content = bytes(3 * CHUNK + 9, 6);
    let first = file(dir.path(), "1", &content);
    let stored = objects::put_file(
        &Objects::new(&bus),
        "logs",
        Some("runs/r/test-unit-1.log"),
        &first,
    )
    .await
    .unwrap();
    // The client's own info and streamed read find what its own put would have written.
    let store = objects::bucket(&Objects::new(&bus), "logs").await.unwrap();
    let info = store.info("runs/r/test-unit-1.log").await.unwrap();
    assert_eq!((info.size, info.chunks), (content.len(), 4));
    assert!(info.modified.is_some(), "{info:?}");
    let mut read = Vec::new();
    let mut object = store.get("runs/r/test-unit-1.log").await.unwrap();
    tokio::io::copy(&mut object, &mut read).await.unwrap();
    assert!(read == content);
    assert_eq!(stored.size, content.len() as u64);
    {
        use sha2::Digest;
        assert_eq!(
            stored.digest,
            format!("sha256:{:x}", sha2::Sha256::digest(&content))
        );
    }
    assert_eq!(stored_messages(&bus, "logs").await, 4 + 1);

    // Replaced: the new version's chunk and info are all that is left.
    let second = file(dir.path(), "2", b"shorter");
    objects::put_file(
        &Objects::new(&bus),
        "logs",
        Some("runs/r/test-unit-1.log"),
        &second,
    )
    .await
    .unwrap();
    assert_eq!(stored_messages(&bus, "logs").await, 1 + 1);
    assert_eq!(
        objects::read(&Objects::new(&bus), "logs", "runs/r/test-unit-1.log")
            .await
            .unwrap(),
        b"shorter"
    );

    // An empty object is its info alone.
    let empty = file(dir.path(), "3", b"");
    objects::put_file(&Objects::new(&bus), "logs", Some("empty.log"), &empty)
        .await
        .unwrap();
    assert_eq!(stored_messages(&bus, "logs").await, 1 + 1 + 1);
    assert!(
        objects::read(&Objects::new(&bus), "logs", "empty.log")
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn a_put_the_stream_refuses_part_of_names_nothing_and_the_last_version_stays() {
    use async_nats::jetstream::stream::DiscardPolicy;
    let nats = TestNats::start();
    let bus = connected(&nats).await;
    let dir = tempfile::tempdir().unwrap();
    objects::bucket(&Objects::new(&bus), "small").await.unwrap();
    // A bucket that refuses what does not fit, rather than dropping its oldest chunks.
    let mut stream = bus.jetstream().get_stream("OBJ_small").await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    config.max_bytes = (4 * CHUNK) as i64;
    config.discard = DiscardPolicy::New;
    bus.jetstream().update_stream(config).await.unwrap();

    let first = file(dir.path(), "1", b"first");
    objects::put_file(&Objects::new(&bus), "small", Some("x.log"), &first)
        .await
        .unwrap();
    let big = file(dir.path(), "2", &bytes(6 * CHUNK, 9));
    let err = objects::put_file(&Objects::new(&bus), "small", Some("x.log"), &big)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("object put chunk"), "{err}");
    assert_eq!(
        objects::read(&Objects::new(&bus), "small", "x.log")
            .await
            .unwrap(),
        b"first"
    );
}

#[tokio::test]
async fn an_artifact_deleted_and_built_again_is_stored_again() {
    let nats = TestNats::start();
    let bus = connected(&nats).await;
    let dir = tempfile::tempdir().unwrap();
    let content = bytes(2 * CHUNK, 7);
    let src = file(dir.path(), "a", &content);
    let stored = objects::put_file(&Objects::new(&bus), "artifacts", None, &src)
        .await
        .unwrap();
    objects::bucket(&Objects::new(&bus), "artifacts")
        .await
        .unwrap()
        .delete(&stored.name)
        .await
        .unwrap();
    let again = objects::put_file(&Objects::new(&bus), "artifacts", None, &src)
        .await
        .unwrap();
    assert_eq!(again, stored);
    assert_reads_back(&bus, &again, dir.path(), &content).await;
}

#[tokio::test]
async fn an_object_without_a_name_is_refused_and_any_other_name_is_held() {
    let nats = TestNats::start();
    let bus = connected(&nats).await;
    let dir = tempfile::tempdir().unwrap();
    let src = file(dir.path(), "a", b"log");
    let err = objects::put_file(&Objects::new(&bus), "logs", Some(""), &src)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("an object needs a name"), "{err}");
    for name in [".hidden", "trailing.", "runs/r/test:unit 1.log", "ünïcode"] {
        objects::put_file(&Objects::new(&bus), "logs", Some(name), &src)
            .await
            .unwrap();
        assert_eq!(
            objects::read(&Objects::new(&bus), "logs", name)
                .await
                .unwrap(),
            b"log"
        );
    }
}

#[tokio::test]
async fn missing_deleted_and_altered_objects_are_errors_that_name_them() {
    let nats = TestNats::start();
    let bus = connected(&nats).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");

    let missing = objects::read(&Objects::new(&bus), "logs", "nope.log")
        .await
        .unwrap_err();
    assert!(
        missing.to_string().contains("no object nope.log"),
        "{missing}"
    );

    let src = file(dir.path(), "a", b"artifact");
    let stored = objects::put_file(&Objects::new(&bus), "artifacts", None, &src)
        .await
        .unwrap();
    // An event whose digest is not the stored bytes' is refused after the read.
    let forged = ObjectRef {
        digest: format!("sha256:{}", "0".repeat(64)).into(),
        ..stored.clone()
    };
    let err = objects::get_file(&Objects::new(&bus), &forged, &out)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("the event says"), "{err}");

    objects::bucket(&Objects::new(&bus), "artifacts")
        .await
        .unwrap()
        .delete(&stored.name)
        .await
        .unwrap();
    let deleted = objects::get_file(&Objects::new(&bus), &stored, &out)
        .await
        .unwrap_err();
    assert!(deleted.to_string().contains("was deleted"), "{deleted}");
}

#[tokio::test]
async fn a_bucket_made_again_is_found_again() {
    let nats = TestNats::start();
    let bus = connected(&nats).await;
    let dir = tempfile::tempdir().unwrap();
    let src = file(dir.path(), "a", b"artifact");
    objects::put_file(&Objects::new(&bus), "artifacts", None, &src)
        .await
        .unwrap();
    bus.jetstream()
        .delete_object_store("artifacts")
        .await
        .unwrap();
    // The connection's handle names a stream that is gone: one call fails and drops it, the
    // next makes the bucket again.
    let mut failures = 0;
    let stored = loop {
        match objects::put_file(&Objects::new(&bus), "artifacts", None, &src).await {
            Ok(s) => break s,
            Err(e) => {
                failures += 1;
                assert!(failures < 2, "{e}");
            }
        }
    };
    assert_eq!(
        objects::read(&Objects::new(&bus), "artifacts", &stored.name)
            .await
            .unwrap(),
        b"artifact"
    );
}

#[tokio::test]
async fn an_object_whose_info_names_another_digest_is_refused() {
    use base64::Engine as _;
    let nats = TestNats::start();
    let bus = connected(&nats).await;
    let dir = tempfile::tempdir().unwrap();
    let src = file(dir.path(), "a", &bytes(2 * CHUNK + 9, 7));
    objects::put_file(&Objects::new(&bus), "logs", Some("build.log"), &src)
        .await
        .unwrap();
    // The object's info rewritten with a digest its chunks do not have.
    let store = objects::bucket(&Objects::new(&bus), "logs").await.unwrap();
    let mut info = serde_json::to_value(store.info("build.log").await.unwrap()).unwrap();
    info["digest"] = format!(
        "SHA-256={}",
        base64::engine::general_purpose::URL_SAFE.encode([0u8; 32])
    )
    .into();
    let meta = format!(
        "$O.logs.M.{}",
        base64::engine::general_purpose::URL_SAFE.encode("build.log")
    );
    bus.jetstream()
        .publish(meta, serde_json::to_vec(&info).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let err = objects::read(&Objects::new(&bus), "logs", "build.log")
        .await
        .unwrap_err();
    assert!(err.to_string().to_lowercase().contains("digest"), "{err}");
}

#[tokio::test]
async fn a_bucket_without_direct_gets_is_read_through_a_consumer() {
    let nats = TestNats::start();
    let bus = connected(&nats).await;
    let dir = tempfile::tempdir().unwrap();
    let content = bytes(3 * CHUNK + 1, 8);
    let src = file(dir.path(), "a", &content);
    let stored = objects::put_file(&Objects::new(&bus), "artifacts", None, &src)
        .await
        .unwrap();
    let js = bus.jetstream();
    let mut config = js
        .get_stream("OBJ_artifacts")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    config.allow_direct = false;
    js.update_stream(config).await.unwrap();
    // A fresh connection finds the bucket as it is now; the chunks come through a consumer.
    let fresh = connected(&nats).await;
    let out = dir.path().join("out");
    objects::get_file(&Objects::new(&fresh), &stored, &out)
        .await
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == content);
}
