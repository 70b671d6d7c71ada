//! `exfilctl incidents evidence ID --out DIR`: writes every evidence item as
//! a file (the controller's stored bytes, exact) and `manifest.json`, then
//! reads each file back and checks its SHA-256 against the one the controller
//! stored at capture time. A mismatch means the stored bytes or the transfer
//! were altered: the export says so loudly and fails.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use exfilguard_controller::{
    evidence::sha256_hex,
    time::{now_ms, rfc3339_ms},
};
use exfilguard_proto::v1::{
    EvidenceItem, ExportEvidenceRequest, incidents_client::IncidentsClient,
};
use serde_json::{Value, json};
use tonic::transport::Channel;

/// What an export wrote.
pub struct Exported {
    /// The directory.
    pub dir: PathBuf,
    /// Items written.
    pub items: usize,
    /// SHA-256 of manifest.json (worth writing down in the case notes).
    pub manifest_sha256: String,
}

/// Creates `dir`, or checks that it is empty (unless `force`).
fn prepare(dir: &Path, force: bool) -> anyhow::Result<()> {
    match fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() && !force {
                bail!(
                    "{} is not empty: refusing to mix this export with other files (choose a new directory, or --force to write into it)",
                    dir.display()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            bail!("{} exists and is not a directory", dir.display())
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", dir.display())),
    }
}

/// The file name of item number `n`: never taken from the controller's
/// strings as they are (a hostile name must not escape the directory).
fn file_name(n: usize, item: &EvidenceItem) -> String {
    let kind: String = item
        .kind
        .chars()
        .take(48)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let media = item.media_type.to_ascii_lowercase();
    let ext = if media.starts_with("application/json") {
        "json"
    } else if media.starts_with("text/") {
        "txt"
    } else {
        "bin"
    };
    format!("{n:04}-{kind}.{ext}")
}

/// Writes `bytes` to `path` durably.
fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f =
        fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Exports incident `id`'s evidence into `dir`.
pub async fn export(
    api: &mut IncidentsClient<Channel>,
    endpoint: &str,
    id: &str,
    dir: &Path,
    force: bool,
) -> anyhow::Result<Exported> {
    prepare(dir, force)?;
    let mut stream = api
        .export_evidence(ExportEvidenceRequest {
            incident_id: id.to_string(),
        })
        .await
        .map_err(crate::status_err)?
        .into_inner();
    let mut entries: Vec<Value> = Vec::new();
    let mut mismatches: Vec<String> = Vec::new();
    while let Some(item) = stream.message().await.map_err(crate::status_err)? {
        let name = file_name(entries.len() + 1, &item);
        let path = dir.join(&name);
        write_file(&path, &item.content)?;
        // Check what is on disk now, not what we meant to write.
        let on_disk =
            fs::read(&path).with_context(|| format!("cannot read back {}", path.display()))?;
        let actual = sha256_hex(&on_disk);
        let verified = actual == item.sha256 && on_disk.len() as u64 == item.size;
        if !verified {
            mismatches.push(format!(
                "{name} ({} {}): the controller recorded SHA-256 {} and {} bytes at capture, the exported bytes hash to {actual} ({} bytes)",
                item.kind,
                item.item_id,
                if item.sha256.is_empty() { "(none)" } else { item.sha256.as_str() },
                item.size,
                on_disk.len()
            ));
        }
        let mut entry = json!({
            "file": name,
            "item_id": item.item_id,
            "kind": item.kind,
            "media_type": item.media_type,
            "captured_at": rfc3339_ms(item.captured_at_unix_ms),
            "captured_at_unix_ms": item.captured_at_unix_ms,
            "source": item.source,
            "size": item.size,
            "sha256": item.sha256,
            "sha256_verified": verified,
        });
        if !item.note.is_empty() {
            entry["note"] = json!(item.note);
            entry["original_size"] = json!(item.original_size);
            entry["original_sha256"] = json!(item.original_sha256);
        }
        entries.push(entry);
    }
    let exported_at = now_ms();
    let manifest = json!({
        "incident_id": id,
        "exported_at": rfc3339_ms(exported_at),
        "exported_at_unix_ms": exported_at,
        "controller_endpoint": endpoint,
        "exported_by": format!("exfilctl {}", env!("CARGO_PKG_VERSION")),
        "hash_algorithm": "sha256",
        "item_count": entries.len(),
        "items": entries,
    });
    let mut text = serde_json::to_vec_pretty(&manifest).context("render manifest")?;
    text.push(b'\n');
    write_file(&dir.join("manifest.json"), &text)?;
    if !mismatches.is_empty() {
        bail!(
            "EVIDENCE INTEGRITY FAILURE for incident {id}: {} of {} item(s) do not match the SHA-256 recorded at capture; the stored evidence or the transfer was altered. Do not rely on this export (manifest.json marks them sha256_verified=false):\n  {}",
            mismatches.len(),
            entries_len(&manifest),
            mismatches.join("\n  ")
        );
    }
    Ok(Exported {
        dir: dir.to_path_buf(),
        items: entries_len(&manifest),
        manifest_sha256: sha256_hex(&text),
    })
}

fn entries_len(manifest: &Value) -> usize {
    manifest["items"].as_array().map_or(0, Vec::len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_cannot_escape_the_directory() {
        let item = EvidenceItem {
            kind: "../../etc/passwd".into(),
            media_type: "application/json".into(),
            ..Default::default()
        };
        assert_eq!(file_name(3, &item), "0003-______etc_passwd.json");
        let item = EvidenceItem {
            kind: "pod_events".into(),
            media_type: "text/plain; charset=utf-8".into(),
            ..Default::default()
        };
        assert_eq!(file_name(12, &item), "0012-pod_events.txt");
    }

    #[test]
    fn a_non_empty_directory_needs_force_and_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        prepare(&dir.path().join("new/sub"), false).unwrap();
        fs::write(dir.path().join("x"), b"x").unwrap();
        let err = prepare(dir.path(), false).unwrap_err().to_string();
        assert!(err.contains("is not empty"), "{err}");
        prepare(dir.path(), true).unwrap();
        let err = prepare(&dir.path().join("x"), true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a directory"), "{err}");
    }
}
