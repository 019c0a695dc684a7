//! The config file as the Python SDK reads it: generated files are read by Python's
//! `configparser` (what `databricks-sdk` uses) and by our `ini` module, before and after our
//! edit, and must agree on every profile's token.

use pat_rotator::ini;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::process::Command;

const PROFILES: [&str; 4] = ["DEFAULT", "prod", "Dev", "__settings__"];

fn gen_doc(rng: &mut StdRng) -> String {
    let eol = if rng.random_bool(0.3) { "\r\n" } else { "\n" };
    let mut out = String::new();
    if rng.random_bool(0.3) {
        out.push_str(&format!(
            "# databricks config{eol}; second comment{eol}{eol}"
        ));
    }
    let mut names: Vec<&str> = PROFILES.to_vec();
    let count = rng.random_range(1..=names.len());
    for _ in 0..count {
        let name = names.remove(rng.random_range(0..names.len()));
        out.push_str(&format!("[{name}]{eol}"));
        let mut keys = vec![
            "host",
            "Token",
            "cluster_id",
            "auth_type",
            "jobs-api-version",
        ];
        let n = rng.random_range(0..=keys.len());
        for _ in 0..n {
            let key = keys.remove(rng.random_range(0..keys.len()));
            let sep = ["=", " = ", ":", " : ", "  =\t"][rng.random_range(0..5)];
            let value = match key {
                "Token" => format!(
                    "dapi{:08x}{}",
                    rng.random::<u32>(),
                    ["", "  ", "\t", " ; note"][rng.random_range(0..4)]
                ),
                "host" => "https://adb-1.azuredatabricks.net".to_string(),
                _ => ["abc", "x ; inline text", "2.1", "value with spaces  "]
                    [rng.random_range(0..4)]
                .to_string(),
            };
            out.push_str(&format!("{key}{sep}{value}{eol}"));
            if key != "Token" && rng.random_bool(0.15) {
                out.push_str(&format!("  continued line{eol}"));
            }
            if rng.random_bool(0.2) {
                out.push_str(&format!("# note{eol}"));
            }
        }
        if rng.random_bool(0.5) {
            out.push_str(eol);
        }
    }
    if rng.random_bool(0.3) {
        while out.ends_with(['\n', '\r']) {
            out.pop();
        }
    }
    out
}

const READER: &str = r#"
import configparser, json, os, sys
out = {}
for name in sorted(os.listdir(sys.argv[1])):
    cp = configparser.ConfigParser()
    try:
        with open(os.path.join(sys.argv[1], name), newline="") as f:
            cp.read_string(f.read())
    except configparser.Error as e:
        out[name] = "ERROR"
        continue
    res = {}
    for p in sys.argv[2:]:
        if p == "DEFAULT":
            res[p] = cp.defaults().get("token")
        else:
            res[p] = cp.get(p, "token", fallback=None) if cp.has_section(p) else None
    out[name] = res
print(json.dumps(out))
"#;

#[test]
fn our_reading_and_editing_agree_with_python_configparser() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut docs = Vec::new();
    for i in 0..300 {
        let doc = gen_doc(&mut rng);
        let target = PROFILES[rng.random_range(0..PROFILES.len())];
        let edited =
            ini::set_values(&doc, target, &[("token", &format!("dapinew{i:04}"))]).unwrap();
        std::fs::write(dir.path().join(format!("{i:04}-a-original")), &doc).unwrap();
        std::fs::write(dir.path().join(format!("{i:04}-b-edited")), &edited).unwrap();
        docs.push((doc, edited, target));
    }
    let out = Command::new("python3")
        .arg("-c")
        .arg(READER)
        .arg(dir.path())
        .args(PROFILES)
        .output()
        .expect("python3 is on the machine image");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut compared = 0;
    for (i, (doc, edited, target)) in docs.iter().enumerate() {
        for (suffix, text) in [("a-original", doc), ("b-edited", edited)] {
            let py = &seen[format!("{i:04}-{suffix}")];
            assert_ne!(py, "ERROR", "configparser refused {suffix} #{i}:\n{text}");
            for p in PROFILES {
                // configparser only offers a section's token when the section exists (or DEFAULT).
                let ours = ini::get_value(text, p, "token").unwrap();
                let theirs = py[p].as_str().map(str::to_string);
                let section_exists = p == "DEFAULT" || text.contains(&format!("[{p}]"));
                let expected = if section_exists { ours } else { None };
                assert_eq!(expected, theirs, "profile {p} of {suffix} #{i}:\n{text:?}");
                compared += 1;
            }
        }
        assert_eq!(
            py_token(&seen, i, target),
            Some(format!("dapinew{i:04}")),
            "the SDK must read the new token in [{target}] of #{i}"
        );
    }
    assert_eq!(compared, 300 * 2 * PROFILES.len());
}

fn py_token(seen: &serde_json::Value, i: usize, profile: &str) -> Option<String> {
    seen[format!("{i:04}-b-edited")][profile]
        .as_str()
        .map(str::to_string)
}
