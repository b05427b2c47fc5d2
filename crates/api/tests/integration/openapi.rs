//! `/openapi.json` documents every route the app serves, and `/docs` renders it offline.

use std::collections::BTreeSet;

use actix_web::test::{TestRequest, call_service, read_body};
use serde_json::Value;

use crate::{TestStore, service};

/// The routes of DESIGN section 7 that batchd serves so far, as `(method, path)`.
const ROUTES: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/v1/batches"),
    ("post", "/v1/batches"),
    ("get", "/v1/batches/{id}"),
    ("post", "/v1/batches/{id}/cancel"),
    ("post", "/v1/batches/{id}/pause"),
    ("post", "/v1/batches/{id}/resume"),
    ("post", "/v1/batches/{id}/retry"),
    ("get", "/v1/batches/{id}/items"),
    ("get", "/v1/batches/{id}/events"),
    ("get", "/v1/batches/{id}/events/stream"),
    ("get", "/v1/batches/{id}/webhooks"),
    ("get", "/v1/items"),
    ("get", "/v1/items/{id}"),
    ("post", "/v1/items/{id}/cancel"),
    ("post", "/v1/items/{id}/input"),
    ("get", "/v1/queues"),
    ("post", "/v1/queues/{queue}/pause"),
    ("post", "/v1/queues/{queue}/resume"),
    ("post", "/v1/queues/{queue}/claim"),
    ("post", "/v1/items/{id}/heartbeat"),
    ("post", "/v1/items/{id}/events"),
    ("post", "/v1/items/{id}/complete"),
    ("post", "/v1/items/{id}/fail"),
    ("post", "/v1/items/{id}/needs-input"),
];

/// The pull-worker item calls: a lease token alone authorises them, a bearer token is optional.
const TOKEN_OPTIONAL: &[&str] = &[
    "/v1/items/{id}/heartbeat",
    "/v1/items/{id}/events",
    "/v1/items/{id}/complete",
    "/v1/items/{id}/fail",
    "/v1/items/{id}/needs-input",
];

const METHODS: &[&str] = &["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// Status, content type and raw body of a GET.
async fn fetch(uri: &str) -> (u16, String, Vec<u8>) {
    let store = TestStore::migrated().await;
    let app = service(&store).await;
    let response = call_service(&app, TestRequest::get().uri(uri).to_request()).await;
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, content_type, read_body(response).await.to_vec())
}

async fn document() -> Value {
    let (status, content_type, body) = fetch("/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(content_type, "application/json");
    serde_json::from_slice(&body).expect("/openapi.json is JSON")
}

/// Every `$ref` in `value`, recursively.
fn refs<'a>(value: &'a Value, found: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("$ref", Value::String(target)) => found.push(target),
                    _ => refs(value, found),
                }
            }
        }
        Value::Array(values) => values.iter().for_each(|v| refs(v, found)),
        _ => {}
    }
}

#[actix_web::test]
async fn the_document_is_openapi_3_and_lists_every_route() {
    let doc = document().await;
    let version = doc["openapi"].as_str().expect("an `openapi` version");
    assert!(version.starts_with("3."), "{version}");
    assert_eq!(doc["info"]["title"], "batchd");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));

    let paths = doc["paths"].as_object().expect("a `paths` object");
    let mut documented = BTreeSet::new();
    for (path, item) in paths {
        for method in METHODS {
            let Some(operation) = item.get(*method) else { continue };
            documented.insert((method.to_string(), path.clone()));
            let responses = operation["responses"].as_object().expect("responses");
            assert!(!responses.is_empty(), "{method} {path} documents no response");
            for parameter in operation["parameters"].as_array().into_iter().flatten() {
                assert!(
                    parameter["name"].is_string() && parameter["schema"].is_object(),
                    "{parameter}"
                );
                assert!(
                    ["path", "query", "header"].contains(&parameter["in"].as_str().unwrap_or_default()),
                    "{parameter}"
                );
            }
            if TOKEN_OPTIONAL.contains(&path.as_str()) {
                assert_eq!(
                    operation["security"],
                    serde_json::json!([{}, {"bearer": []}]),
                    "{method} {path}: security"
                );
            } else {
                let secured = operation["security"] == serde_json::json!([{"bearer": []}]);
                assert_eq!(secured, path.starts_with("/v1/"), "{method} {path}: security");
            }
            assert_eq!(
                responses.contains_key("429"),
                path.starts_with("/v1/"),
                "{method} {path}: the rate limit covers /v1"
            );
            for (status, response) in responses {
                assert!(
                    response["headers"]["x-request-id"].is_object(),
                    "{method} {path} {status}: x-request-id"
                );
            }
        }
    }
    let expected: BTreeSet<_> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(documented, expected);

    let ids: Vec<_> = paths
        .values()
        .flat_map(|item| METHODS.iter().filter_map(|m| item.get(*m)))
        .filter_map(|op| op["operationId"].as_str())
        .collect();
    assert_eq!(ids.len(), ROUTES.len(), "every operation has an id");
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        ids.len(),
        "operation ids are unique"
    );

    let bearer = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(
        (bearer["type"].as_str(), bearer["scheme"].as_str()),
        (Some("http"), Some("bearer"))
    );

    let mut targets = Vec::new();
    refs(&doc, &mut targets);
    assert!(!targets.is_empty());
    for target in targets {
        let name = target
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("a local schema reference: {target}"));
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "{target} is not defined"
        );
    }
}

#[actix_web::test]
async fn schemas_match_the_wire() {
    let doc = document().await;
    let schemas = &doc["components"]["schemas"];
    let required = |name: &str| -> BTreeSet<String> {
        schemas[name]["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    let properties = |name: &str| -> BTreeSet<String> {
        schemas[name]["properties"]
            .as_object()
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default()
    };

    // Fields are always present (null when they do not apply); `input` only on one item.
    let item = required("ItemView");
    assert_eq!(
        properties("ItemView").difference(&item).collect::<Vec<_>>(),
        vec!["input"]
    );
    assert_eq!(required("BatchView"), properties("BatchView"));
    assert_eq!(required("EventView"), properties("EventView"));
    assert_eq!(
        properties("ErrorDetail")
            .difference(&required("ErrorDetail"))
            .collect::<Vec<_>>(),
        vec!["current_status"]
    );
    assert_eq!(
        schemas["ItemView"]["properties"]["custom_id"]["type"],
        serde_json::json!(["string", "null"])
    );
    let created_at = &schemas["BatchView"]["properties"]["created_at"];
    assert_eq!(
        (created_at["type"].as_str(), created_at["format"].as_str()),
        (Some("string"), Some("date-time"))
    );
    assert_eq!(required("SubmitBatch"), BTreeSet::from(["items".to_owned()]));
    for closed in ["SubmitBatch", "SubmitItem", "WebhookSpec", "AnswerRequest"] {
        assert_eq!(
            schemas[closed]["additionalProperties"], false,
            "{closed} refuses unknown fields"
        );
    }

    // Status enums are the wire spellings.
    let spellings = |name: &str| -> Vec<String> {
        schemas[name]["enum"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    let statuses: Vec<_> = batchd_domain::ItemStatus::ALL.iter().map(|s| s.to_string()).collect();
    assert_eq!(spellings("ItemStatus"), statuses);
    assert_eq!(schemas["ItemStatus"]["type"], "string");
    assert!(spellings("EventType").contains(&"item.retry_scheduled".to_owned()));
    assert_eq!(spellings("OnItemFailure"), ["continue", "fail_batch"]);
}

#[actix_web::test]
async fn the_docs_page_works_offline() {
    let (status, content_type, body) = fetch("/docs").await;
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/html"), "{content_type}");
    let html = String::from_utf8(body).expect("UTF-8");
    assert!(html.contains("openapi.json"), "the page reads the document");
    for remote in ["http://", "https://", "src=\"//", "href=\"//", "url(//"] {
        assert!(
            !html.contains(remote),
            "the page loads nothing from the network: {remote}"
        );
    }
}
