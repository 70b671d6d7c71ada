//! YAML files of one or more documents, read as JSON values (the shape the
//! Kubernetes types deserialize from).
use std::path::Path;

use serde::Deserialize as _;
use serde_json::Value;

use crate::CheckError;

/// One YAML document of a file.
#[derive(Debug, Clone)]
pub struct Doc {
    /// `file#index`, for messages.
    pub origin: String,
    /// The document.
    pub value: Value,
}

impl Doc {
    /// `apiVersion`, or "".
    pub fn api_version(&self) -> &str {
        self.value["apiVersion"].as_str().unwrap_or("")
    }
    /// `kind`, or "".
    pub fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }
    /// `metadata.name`, or "".
    pub fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }
    /// `Kind/name`, for messages and lookups.
    pub fn key(&self) -> String {
        format!("{}/{}", self.kind(), self.name())
    }
}

/// Parses every non-empty document of `text` (`origin` names it in errors).
pub fn parse(text: &str, origin: &str) -> Result<Vec<Doc>, CheckError> {
    let mut docs = Vec::new();
    for (index, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(de).map_err(|e| CheckError::Parse {
            origin: format!("{origin}#{index}"),
            message: e.to_string(),
        })?;
        // A document of only comments (or a trailing `---`) is null.
        if !value.is_null() {
            docs.push(Doc {
                origin: format!("{origin}#{index}"),
                value,
            });
        }
    }
    Ok(docs)
}

/// Reads and parses a YAML file.
pub fn load(path: &Path) -> Result<Vec<Doc>, CheckError> {
    parse(&crate::read(path)?, &path.display().to_string())
}

/// Lines that hold an integer written with a leading zero (`0440`): YAML 1.1
/// (the API server's parser) reads it as octal, YAML 1.2 as decimal, so the
/// same file means two things. Write modes in decimal (0440 = 288).
pub fn ambiguous_octal_lines(text: &str) -> Vec<(usize, String)> {
    text.lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let code = line.split('#').next().unwrap_or("");
            let (_, value) = code.split_once(": ")?;
            let v = value.trim();
            let octal = v.len() > 1 && v.starts_with('0') && v.bytes().all(|b| b.is_ascii_digit());
            octal.then(|| (i + 1, line.to_owned()))
        })
        .collect()
}

/// Compares two JSON values and returns the paths where they differ
/// (numbers compare by value, so `0` equals `0.0`).
pub fn differences(want: &Value, got: &Value) -> Vec<String> {
    let mut out = Vec::new();
    diff_into(want, got, String::new(), &mut out);
    out
}

fn diff_into(want: &Value, got: &Value, path: String, out: &mut Vec<String>) {
    match (want, got) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, va) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(vb) => diff_into(va, vb, p, out),
                    None => out.push(format!(
                        "{p}: present in the file, gone after the round trip (unknown field?)"
                    )),
                }
            }
            for k in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(format!(
                    "{path}.{k}: absent in the file, present after the round trip"
                ));
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            if a.len() != b.len() {
                out.push(format!("{path}: {} items, then {}", a.len(), b.len()));
            }
            for (i, (va, vb)) in a.iter().zip(b).enumerate() {
                diff_into(va, vb, format!("{path}[{i}]"), out);
            }
        }
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {a} became {b}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_files_and_empty_documents() {
        let docs = parse("# only a comment\n---\na: 1\n---\nb: [x]\n---\n", "t").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].value["b"][0], "x");
        let err = parse("a: [1\n", "t").unwrap_err();
        assert!(err.to_string().starts_with("t#0:"), "{err}");
    }

    #[test]
    fn octal_literals_are_found() {
        let text = "defaultMode: 0440\nport: 9464\nmode: 288 # 0440\nx: \"0440\"\nzero: 0\n";
        assert_eq!(
            ambiguous_octal_lines(text),
            vec![(1, "defaultMode: 0440".to_owned())]
        );
    }

    #[test]
    fn differences_name_paths() {
        let a = serde_json::json!({"spec": {"a": 1, "b": [1, 2], "c": 0}});
        let b = serde_json::json!({"spec": {"b": [1], "c": 0.0, "d": true}});
        let d = differences(&a, &b);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[0].starts_with(".spec.a: present in the file"), "{d:?}");
        assert!(d[1].starts_with(".spec.b: 2 items, then 1"), "{d:?}");
        assert!(d[2].starts_with(".spec.d: absent"), "{d:?}");
    }
}
