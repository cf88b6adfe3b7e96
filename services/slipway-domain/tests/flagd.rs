//! The flag definitions a rollout writes are flagd flag files: they validate against flagd's
//! own schemas (`schemas/flagd/`, from open-feature/flagd-schemas), at every weight.

use serde_json::Value;
use slipway_domain::traffic::{Weight, flagd_definition};

fn schema(name: &str) -> Value {
    let path = format!("{}/../../schemas/flagd/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn every_weight_writes_a_flag_file_flagd_accepts() {
    let targeting = jsonschema::Resource::from_contents(schema("targeting.json")).unwrap();
    let validator = jsonschema::options()
        .with_resource("https://flagd.dev/schema/v0/targeting.json", targeting)
        // Draft 7 ignores the `$id` beside the root `$ref`: the base is given.
        .with_base_uri("https://flagd.dev/schema/v0/flags.json")
        .build(&schema("flags.json"))
        .unwrap();
    for percent in [0.0, 0.01, 5.0, 25.0, 50.0, 99.99, 100.0] {
        let flags = flagd_definition("model-version", Weight::percent(percent).unwrap());
        let errors: Vec<String> = validator
            .iter_errors(&flags)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{percent}%: {errors:?}\n{flags:#}");
    }
    // The check can fail: a split that names a weight flagd refuses is caught.
    let mut bad = flagd_definition("model-version", Weight::NONE);
    bad["flags"]["model-version"]["targeting"]["fractional"][1][1] = Value::from(-1);
    assert!(!validator.is_valid(&bad));
}
