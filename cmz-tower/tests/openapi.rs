//! `openapi.yaml` describes exactly what the router serves: every documented operation is
//! served (over real HTTP), and every served route is documented, with the same access
//! (public or bearer).

use std::collections::BTreeSet;

const SPEC: &str = include_str!("../openapi.yaml");

/// (METHOD, path, public) for each operation in the spec, read from its `paths` section.
fn documented() -> BTreeSet<(String, String, bool)> {
    let mut operations = BTreeSet::new();
    let mut in_paths = false;
    let mut path = None::<String>;
    let mut method = None::<String>;
    let mut public = false;
    let flush = |method: &mut Option<String>,
                 path: &Option<String>,
                 public: bool,
                 ops: &mut BTreeSet<(String, String, bool)>| {
        if let (Some(m), Some(p)) = (method.take(), path) {
            ops.insert((m, p.clone(), public));
        }
    };
    for line in SPEC.lines() {
        if !line.starts_with(' ') && !line.trim().is_empty() {
            flush(&mut method, &path, public, &mut operations);
            in_paths = line.trim_end() == "paths:";
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  /") {
            flush(&mut method, &path, public, &mut operations);
            path = Some(format!("/{}", p.trim_end().trim_end_matches(':')));
        } else if let Some(m) = line.strip_prefix("    ").filter(|l| !l.starts_with(' ')) {
            let m = m.trim_end().trim_end_matches(':');
            if matches!(m, "get" | "post" | "delete" | "put" | "patch") {
                flush(&mut method, &path, public, &mut operations);
                method = Some(m.to_uppercase());
                public = false;
            }
        } else if line.trim() == "security: []" && method.is_some() {
            public = true;
        }
    }
    flush(&mut method, &path, public, &mut operations);
    operations
}

#[test]
fn the_spec_and_the_router_list_the_same_operations() {
    let served: BTreeSet<(String, String, bool)> = cmz_tower::routes()
        .map(|r| (r.method.to_owned(), r.path.to_owned(), r.public))
        .collect();
    let documented = documented();
    assert!(
        !documented.is_empty(),
        "no operations found in openapi.yaml"
    );
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "served but not documented (or documented with other access): {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "documented but not served (or served with other access): {unserved:?}"
    );
}

#[tokio::test]
async fn every_documented_operation_answers_over_http() {
    let state = cmz_tower::state_from_env(&|name: &str| match name {
        "CMZ_DEV_USERS" => Some("embedded".into()),
        _ => None,
    })
    .await
    .unwrap();
    let app = cmz_tower::router(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = reqwest::Client::new();
    for (method, path, public) in documented() {
        let url = format!(
            "{base}{}",
            path.replace("{sessionId}", "conv_x_y_00000000")
                .replace("{animalId}", "cougar")
        );
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let response = client.request(method.clone(), &url).send().await.unwrap();
        let status = response.status().as_u16();
        let body = response.text().await.unwrap();
        assert!(status != 405, "{method} {path}: not served ({body})");
        assert!(
            !(status == 404 && body.contains("no such route")),
            "{method} {path}: not served"
        );
        if !public {
            assert_eq!(status, 401, "{method} {path} needs a token");
        }
    }
}

/// The values of the `Error` schema's `code` enum.
fn documented_codes() -> BTreeSet<String> {
    let start = SPEC.find("\n    Error:\n").expect("an Error schema");
    let schema = &SPEC[start..];
    let enum_at = schema.find("enum:").expect("the Error code enum");
    schema[enum_at + "enum:".len()..]
        .lines()
        .skip(1)
        .map_while(|line| line.trim().strip_prefix("- ").map(str::to_owned))
        .collect()
}

#[test]
fn every_error_code_has_one_status_and_is_documented() {
    use axum::http::StatusCode;
    let documented = documented_codes();
    let mut answered = BTreeSet::new();
    for code in cmz_core::Code::ALL {
        let status = cmz_tower::status_of(code);
        assert_eq!(cmz_tower::status_for(code.as_str()), status);
        assert_eq!(
            status == StatusCode::INTERNAL_SERVER_ERROR,
            code == cmz_core::Code::Internal,
            "{code} answers {status}"
        );
        answered.insert(code.as_str().to_owned());
    }
    for (code, status) in cmz_tower::HTTP_CODES {
        assert!(status.is_client_error(), "{code} answers {status}");
        assert_eq!(cmz_tower::status_for(code), status);
        assert!(
            code.parse::<cmz_core::Code>().is_err(),
            "{code} is listed twice"
        );
        answered.insert(code.to_owned());
    }
    assert_eq!(
        answered, documented,
        "the codes answered and the codes in openapi.yaml's Error schema differ"
    );
}
