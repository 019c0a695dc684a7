use super::*;

fn cfg(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
}

#[test]
fn defaults_match_the_design_table() {
    let c = cfg(&[]).unwrap();
    assert_eq!(c.token_lifetime, Duration::from_secs(900));
    assert_eq!(c.rotation_interval, Duration::from_secs(600));
    assert_eq!(c.threshold(), Duration::from_secs(60));
    assert_eq!(c.revoke_grace, Duration::from_secs(30));
    assert!(c.skip_when_idle);
    assert_eq!(c.profile, "DEFAULT");
    assert_eq!(c.listen.to_string(), "0.0.0.0:9464");
    assert_eq!(c.control_listen.to_string(), "127.0.0.1:9465");
    assert_eq!(c.source_of("PAT_TOKEN_LIFETIME"), Source::Default);
    assert!(c.warnings.is_empty());
}

#[test]
fn unparsable_value_names_the_variable() {
    let e = cfg(&[("PAT_TOKEN_LIFETIME", "abc")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("PAT_TOKEN_LIFETIME") && e.contains("abc") && e.contains("whole number"),
        "{e}"
    );
    let e = cfg(&[("PAT_ROTATION_INTERVAL", "-5")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("PAT_ROTATION_INTERVAL"), "{e}");
    let e = cfg(&[("PAT_HTTP_TIMEOUT", "0")]).unwrap_err().to_string();
    assert!(e.contains("PAT_HTTP_TIMEOUT"), "{e}");
}

#[test]
fn interval_must_be_shorter_than_lifetime() {
    let e = cfg(&[
        ("PAT_TOKEN_LIFETIME", "100"),
        ("PAT_ROTATION_INTERVAL", "100"),
    ])
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("PAT_ROTATION_INTERVAL") && e.contains("shorter than PAT_TOKEN_LIFETIME"),
        "{e}"
    );
}

#[test]
fn smallest_valid_lifetime_is_one_second_above_the_threshold() {
    // With interval < lifetime, threshold = min(interval, 60) < lifetime always holds, so the
    // threshold rule is implied by the interval rule; check the boundary on both sides.
    assert!(cfg(&[
        ("PAT_TOKEN_LIFETIME", "61"),
        ("PAT_ROTATION_INTERVAL", "60")
    ])
    .is_ok());
    assert!(cfg(&[("PAT_TOKEN_LIFETIME", "2"), ("PAT_ROTATION_INTERVAL", "1")]).is_ok());
    assert!(cfg(&[("PAT_TOKEN_LIFETIME", "1"), ("PAT_ROTATION_INTERVAL", "1")]).is_err());
}

#[test]
fn write_lock_wait_must_exceed_http_timeout() {
    let e = cfg(&[("PAT_WRITE_LOCK_WAIT", "30")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("PAT_WRITE_LOCK_WAIT") && e.contains("PAT_HTTP_TIMEOUT"),
        "{e}"
    );
}

#[test]
fn compressed_soak_settings_are_valid_with_a_warning() {
    let c = cfg(&[("PAT_TOKEN_LIFETIME", "8"), ("PAT_ROTATION_INTERVAL", "4")]).unwrap();
    assert_eq!(c.threshold(), Duration::from_secs(4));
    assert_eq!(c.warnings.len(), 1);
    assert_eq!(c.source_of("PAT_TOKEN_LIFETIME"), Source::Environment);
}

#[test]
fn bad_enums_and_addresses_are_rejected() {
    assert!(cfg(&[("PAT_SKIP_WHEN_IDLE", "maybe")])
        .unwrap_err()
        .to_string()
        .contains("PAT_SKIP_WHEN_IDLE"));
    assert!(cfg(&[("PAT_LOG_FORMAT", "xml")])
        .unwrap_err()
        .to_string()
        .contains("PAT_LOG_FORMAT"));
    let e = cfg(&[("PAT_CONTROL_LISTEN", "0.0.0.0:9465")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("PAT_CONTROL_LISTEN") && e.contains("loopback"),
        "{e}"
    );
    assert!(cfg(&[("PAT_CONTROL_LISTEN", "[::1]:9465")]).is_ok());
    assert!(cfg(&[("PAT_LISTEN", "nowhere")])
        .unwrap_err()
        .to_string()
        .contains("PAT_LISTEN"));
    assert!(cfg(&[("PAT_ON_ROTATE", "echo 'unterminated")])
        .unwrap_err()
        .to_string()
        .contains("PAT_ON_ROTATE"));
}

#[test]
fn on_rotate_is_split_without_a_shell() {
    let c = cfg(&[("PAT_ON_ROTATE", "kill -HUP 'my proxy'")]).unwrap();
    assert_eq!(c.on_rotate.unwrap(), vec!["kill", "-HUP", "my proxy"]);
}

#[test]
fn secrets_are_described_by_fingerprint() {
    let c = cfg(&[("DATABRICKS_TOKEN", "dapi-secret-bootstrap")]).unwrap();
    let all: String = c
        .describe()
        .iter()
        .map(|(n, v, _)| format!("{n}={v}\n"))
        .collect();
    assert!(!all.contains("dapi-secret-bootstrap"));
    assert!(all.contains("DATABRICKS_TOKEN=sha256:"));
    assert!(!format!("{c:?}").contains("dapi-secret-bootstrap"));
}

#[test]
fn host_normalisation() {
    assert_eq!(
        normalize_host("adb-1.azuredatabricks.net/"),
        "https://adb-1.azuredatabricks.net"
    );
    assert_eq!(
        normalize_host("http://127.0.0.1:8080//"),
        "http://127.0.0.1:8080"
    );
}

#[test]
fn host_must_be_a_bare_workspace_url() {
    for (given, want) in [
        (
            "https://adb-1.azuredatabricks.net/",
            "https://adb-1.azuredatabricks.net",
        ),
        (
            "adb-1.azuredatabricks.net",
            "https://adb-1.azuredatabricks.net",
        ),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://[::1]:8080/", "http://[::1]:8080"),
    ] {
        let c = cfg(&[("DATABRICKS_HOST", given)]).unwrap();
        assert_eq!(c.host.as_deref(), Some(want), "{given}");
    }
    // The form a URL copied from the browser has: the selector is dropped with a note.
    let c = cfg(&[(
        "DATABRICKS_HOST",
        "https://adb-1.azuredatabricks.net/?o=123",
    )])
    .unwrap();
    assert_eq!(c.host.as_deref(), Some("https://adb-1.azuredatabricks.net"));
    assert!(
        c.warnings.iter().any(|w| w.contains("?o=123")),
        "{:?}",
        c.warnings
    );
    for bad in [
        "https://adb-1.azuredatabricks.net/browse/folders",
        "https://adb-1.azuredatabricks.net/?o=123&x=1",
        "https://h/?q=1",
        "ftp://x",
        "http://h:99999",
        "https://user:pw@h",
        "https://h/#frag",
        "https://",
    ] {
        let e = cfg(&[("DATABRICKS_HOST", bad)]).unwrap_err().to_string();
        assert!(e.contains("DATABRICKS_HOST"), "{bad}: {e}");
    }
}

#[test]
fn profile_must_be_a_possible_section_name() {
    for bad in ["a]b", "[x", "dev\nprod", "tab\there", "bell\u{7}"] {
        let e = cfg(&[("DATABRICKS_CONFIG_PROFILE", bad)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("DATABRICKS_CONFIG_PROFILE"), "{bad:?}: {e}");
    }
    assert!(cfg(&[("DATABRICKS_CONFIG_PROFILE", "my-prod.v2_x")]).is_ok());
}

#[test]
fn control_secret_is_validated_and_never_echoed() {
    let e = cfg(&[("PAT_CONTROL_SECRET", "tooshort")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("PAT_CONTROL_SECRET") && !e.contains("tooshort"),
        "{e}"
    );
    let good = "Qm7Tz2Lp9Wx4Kd8Rv1Nc6Hs3Bj5Fy0Ge".to_string();
    let c = cfg(&[("PAT_CONTROL_SECRET", good.as_str())]).unwrap();
    assert!(c.control_secret.matches(&good));
    assert!(!format!("{c:?}").contains(&good));
    let d = c.describe();
    assert!(d.iter().all(|(_, v, _)| !v.contains(&good)));
    // Two starts without the variable get two different random secrets.
    let (a, b) = (cfg(&[]).unwrap(), cfg(&[]).unwrap());
    assert!(!a.control_secret.matches(b.control_secret.expose()));
}

#[test]
fn an_unknown_store_is_refused_not_ignored() {
    assert_eq!(
        cfg(&[("PAT_STORE", "file")]).unwrap().store,
        StoreKind::File
    );
    let e = cfg(&[("PAT_STORE", "s3")]).unwrap_err().to_string();
    assert!(e.contains("PAT_STORE") && e.contains("kubernetes"), "{e}");
}

#[test]
fn the_cluster_store_names_its_objects_with_the_documented_defaults() {
    let c = cfg(&[("PAT_STORE", "kubernetes")]).unwrap();
    assert_eq!(
        c.store,
        StoreKind::Kubernetes(KubeTarget {
            secret: "databricks-pat".into(),
            namespace: None,
            lease: "databricks-pat-rotation".into(),
        })
    );
    assert!(!c.revoke_seed);
    let c = cfg(&[
        ("PAT_STORE", "Kubernetes"),
        ("PAT_KUBE_SECRET", "team-pat"),
        ("PAT_KUBE_NAMESPACE", "data"),
        ("PAT_REVOKE_SEED", "true"),
    ])
    .unwrap();
    let StoreKind::Kubernetes(k) = &c.store else {
        panic!("not the cluster store")
    };
    assert_eq!(
        (k.secret.as_str(), k.lease.as_str()),
        ("team-pat", "team-pat-rotation")
    );
    assert_eq!(k.namespace.as_deref(), Some("data"));
    assert!(c.revoke_seed);
    for (var, bad) in [
        ("PAT_KUBE_SECRET", "Team_PAT"),
        ("PAT_KUBE_LEASE", "-lease"),
        ("PAT_REVOKE_SEED", "maybe"),
    ] {
        let e = cfg(&[("PAT_STORE", "kubernetes"), (var, bad)])
            .unwrap_err()
            .to_string();
        assert!(e.contains(var), "{e}");
    }
}

#[test]
fn ipv6_control_listener_works_with_a_warning() {
    let c = cfg(&[("PAT_CONTROL_LISTEN", "[::1]:9465")]).unwrap();
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("Go SDK") && w.contains("127.0.0.1")),
        "{:?}",
        c.warnings
    );
}

#[test]
fn the_default_instance_differs_per_config_file_and_profile_on_one_host() {
    let a = cfg(&[("DATABRICKS_CONFIG_FILE", "/srv/a/databrickscfg")]).unwrap();
    let a_other = cfg(&[
        ("DATABRICKS_CONFIG_FILE", "/srv/a/databrickscfg"),
        ("DATABRICKS_CONFIG_PROFILE", "other"),
    ])
    .unwrap();
    let b = cfg(&[("DATABRICKS_CONFIG_FILE", "/srv/b/databrickscfg")]).unwrap();
    let a_again = cfg(&[("DATABRICKS_CONFIG_FILE", "/srv/a/databrickscfg")]).unwrap();
    assert_ne!(a.instance, a_other.instance);
    assert_ne!(a.instance, b.instance);
    assert_ne!(a_other.instance, b.instance);
    assert_eq!(a.instance, a_again.instance, "stable across starts");
    // DESIGN: <hostname>-<8 hex of SHA-256(absolute path, NUL, profile)>, computed here
    // independently of the code under test.
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(b"/srv/a/databrickscfg\0DEFAULT");
    let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    assert!(a.instance.ends_with(&format!("-{hex}")), "{}", a.instance);
    assert!(!a.instance.contains(':'));
    let set = cfg(&[("PAT_INSTANCE", "pod-1")]).unwrap();
    assert_eq!(set.instance, "pod-1");
}

/// The README's configuration table and `VARIABLES` (what `config` and `--help` show) list
/// the same variables: none missing from the table, none in it that the code does not read;
/// each literal default is the one the code uses, each meaning is the code's, and each
/// secret says it is one.
#[test]
fn the_readme_table_lists_every_variable_config_reports() {
    let readme = include_str!("../../README.md");
    let section = readme
        .split("\n## Configuration\n")
        .nth(1)
        .expect("README has a Configuration section");
    let table: Vec<&str> = section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|row| row.strip_prefix("| `")?.split('`').next())
        .collect();
    let known: Vec<&str> = VARIABLES.iter().map(|v| v.name).collect();
    for v in VARIABLES {
        let Some(row) = section
            .lines()
            .find(|l| l.starts_with(&format!("| `{}` |", v.name)))
        else {
            continue;
        };
        let cells: Vec<&str> = row.split(" | ").collect();
        if let Some(default) = v.literal_default() {
            assert_eq!(
                cells[1],
                format!("`{default}`"),
                "README's default for {} is not the code's",
                v.name
            );
        }
        assert_eq!(
            row.contains("(secret:"),
            v.secret,
            "README and the code disagree on whether {} is a secret",
            v.name
        );
        // The meaning, as `--help`, `config` and the man page show it: the README's cell
        // without its formatting and its "(secret: ...)" note.
        let cell = cells[2..].join(" | ");
        let cell = cell.trim_end_matches(" |");
        let without_note = match (cell.find("(secret:"), cell.find(')')) {
            (Some(start), Some(_)) => {
                let end = start + cell[start..].find(')').unwrap_or(0);
                format!("{}{}", &cell[..start], &cell[end + 1..])
            }
            _ => cell.to_string(),
        };
        assert_eq!(
            without_note.replace('`', "").trim(),
            v.meaning,
            "README's meaning of {} is not the code's",
            v.name
        );
    }
    for name in &known {
        assert!(
            table.contains(name),
            "README's configuration table lacks {name}"
        );
    }
    for name in &table {
        assert!(
            known.contains(name),
            "README's configuration table lists {name}, which the code does not read"
        );
    }
    assert_eq!(
        table.len(),
        known.len(),
        "a variable listed twice: {table:?}"
    );
}

/// Settings that parse but cannot work are refused at start, by the rule for that variable
/// (the error starts with it), never echoing the whole value.
#[test]
fn weak_settings_are_refused_with_the_variable_named() {
    let long_comment = "c".repeat(10_000);
    let secret = "a".repeat(32);
    let weak: [&[(&str, &str)]; 4] = [
        &[("PAT_CONTROL_SECRET", &secret)],
        &[("DATABRICKS_HOST", "https://adb-1.example:0")],
        // The lock wait above it, so only the timeout's own bound can refuse it.
        &[
            ("PAT_HTTP_TIMEOUT", "100000"),
            ("PAT_WRITE_LOCK_WAIT", "100001"),
        ],
        &[("PAT_TOKEN_COMMENT", &long_comment)],
    ];
    for vars in weak {
        let var = vars[0].0;
        let e = cfg(vars).expect_err(var).to_string();
        assert!(e.starts_with(var), "{e}");
        assert!(e.len() < 500, "the error echoes the whole value: {e}");
        assert!(!e.contains(&secret), "{e}");
    }
}

/// Each variable is read by the parse its definition carries: a value that parse refuses is
/// refused at start, naming that variable, whatever else is set; and a value it accepts
/// (the definition's own default, where it has one) passes. A variable read some other way
/// than its row says would fail here.
#[test]
fn every_variable_is_read_by_the_parse_its_definition_carries() {
    use super::Parse;
    let base = [("DATABRICKS_HOST", "https://adb-1.2.azuredatabricks.net")];
    let mut checked = 0;
    for v in VARIABLES {
        let bad = match v.parse {
            Parse::Seconds { zero_ok: true } => "-1",
            Parse::Seconds { zero_ok: false } => "0",
            Parse::Boolean => "maybe",
            Parse::Address {
                loopback_because: None,
            } => "not-an-address",
            Parse::Address {
                loopback_because: Some(_),
            } => "10.0.0.1:9465",
            Parse::KubeName => "Not_A_Name",
            Parse::OneOf(_) => "neither",
            Parse::Port => "70000",
            Parse::Text => continue,
        };
        // The cluster store's names are read only with the cluster store.
        let store = [("PAT_STORE", "kubernetes")];
        let mut vars: Vec<(&str, &str)> = base.to_vec();
        if v.parse == Parse::KubeName {
            vars.extend(store);
        }
        vars.push((v.name, bad));
        match cfg(&vars) {
            Err(ConfigError::Invalid { var, .. }) => assert_eq!(var, v.name, "{bad}"),
            other => panic!(
                "{}={bad} was not refused as {:?}: {other:?}",
                v.name, v.parse
            ),
        }
        if let Some(good) = v.literal_default() {
            vars.pop();
            vars.push((v.name, good));
            assert!(cfg(&vars).is_ok(), "{}={good}", v.name);
        }
        checked += 1;
    }
    assert!(
        checked >= 15,
        "only {checked} variables have a parse of their own"
    );
}
