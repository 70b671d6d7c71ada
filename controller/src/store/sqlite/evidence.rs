//! The evidence table: append-only items per incident (SQLite triggers refuse
//! any UPDATE or DELETE, of these items and of the detection records), and
//! the export that merges both, oldest capture first.

use exfilguard_proto::v1::EvidenceItem;
use rusqlite::{Connection, Transaction, params};

use crate::{
    Error, Result,
    evidence::{self, NewEvidence},
};

/// Migration 4: the evidence table, and append-only triggers on it and on the
/// detection records.
pub(super) const MIGRATION: &str = r#"
    CREATE TABLE evidence (
        n INTEGER PRIMARY KEY AUTOINCREMENT,
        incident_id TEXT NOT NULL REFERENCES incidents(id),
        kind TEXT NOT NULL,
        captured_ms INTEGER NOT NULL,
        media_type TEXT NOT NULL,
        source TEXT NOT NULL,
        content BLOB NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        note TEXT NOT NULL,
        original_size INTEGER NOT NULL,
        original_sha256 TEXT NOT NULL
    );
    CREATE INDEX evidence_incident ON evidence(incident_id, n);
    CREATE TRIGGER evidence_append_only_update BEFORE UPDATE ON evidence
        BEGIN SELECT RAISE(ABORT, 'evidence is append-only'); END;
    CREATE TRIGGER evidence_append_only_delete BEFORE DELETE ON evidence
        BEGIN SELECT RAISE(ABORT, 'evidence is append-only'); END;
    CREATE TRIGGER detections_append_only_update BEFORE UPDATE ON detections
        BEGIN SELECT RAISE(ABORT, 'evidence is append-only'); END;
    CREATE TRIGGER detections_append_only_delete BEFORE DELETE ON detections
        BEGIN SELECT RAISE(ABORT, 'evidence is append-only'); END;
"#;

/// Appends `item` (bounded and hashed) to `incident`'s evidence.
pub(super) fn insert(
    tx: &Transaction<'_>,
    incident: &str,
    item: &NewEvidence,
) -> Result<EvidenceItem> {
    let b = evidence::bound(item.content.clone());
    tx.prepare_cached(
        "INSERT INTO evidence (incident_id, kind, captured_ms, media_type, source, content, size,
            sha256, note, original_size, original_sha256)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )
    .and_then(|mut s| {
        s.execute(params![
            incident,
            item.kind,
            item.captured_ms,
            item.media_type,
            item.source,
            b.content,
            b.content.len() as u64,
            b.sha256,
            b.note,
            b.original_size,
            b.original_sha256
        ])
    })
    .map_err(Error::store("insert evidence"))?;
    Ok(EvidenceItem {
        // Named by content, not by row, so every replica names it alike.
        item_id: format!(
            "{}/{}-{}",
            item.kind,
            item.captured_ms,
            b.sha256.get(..12).unwrap_or(&b.sha256)
        ),
        kind: item.kind.clone(),
        captured_at_unix_ms: item.captured_ms,
        media_type: item.media_type.clone(),
        sha256: b.sha256,
        size: b.content.len() as u64,
        source: item.source.clone(),
        note: b.note,
        original_size: b.original_size,
        original_sha256: b.original_sha256,
        content: b.content,
    })
}

/// Every item of `incident`: its detection records and its captured items,
/// oldest capture first (ties: detection records first, then insertion order).
pub(super) fn load(conn: &Connection, incident: &str) -> Result<Vec<EvidenceItem>> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT item_id, kind, captured_ms, media_type, sha256, size, source, content, note,
                    original_size, original_sha256 FROM (
                SELECT 'detection/' || node || '/' || seq AS item_id, 'detection' AS kind,
                       stored_ms AS captured_ms, 'application/json' AS media_type, sha256,
                       length(CAST(json AS BLOB)) AS size, 'agent:' || node AS source,
                       CAST(json AS BLOB) AS content, '' AS note,
                       length(CAST(json AS BLOB)) AS original_size, sha256 AS original_sha256,
                       0 AS origin, seq AS n
                  FROM detections WHERE incident_id = ?1
                UNION ALL
                SELECT kind || '/' || captured_ms || '-' || substr(sha256, 1, 12), kind,
                       captured_ms, media_type, sha256, size, source, content,
                       note, original_size, original_sha256, 1, n
                  FROM evidence WHERE incident_id = ?1)
             ORDER BY captured_ms, origin, n",
        )
        .map_err(Error::store("evidence items"))?;
    let rows = stmt
        .query_map([incident], |r| {
            Ok(EvidenceItem {
                item_id: r.get(0)?,
                kind: r.get(1)?,
                captured_at_unix_ms: r.get(2)?,
                media_type: r.get(3)?,
                sha256: r.get(4)?,
                size: r.get(5)?,
                source: r.get(6)?,
                content: r.get(7)?,
                note: r.get(8)?,
                original_size: r.get(9)?,
                original_sha256: r.get(10)?,
            })
        })
        .map_err(Error::store("evidence items"))?;
    rows.collect::<rusqlite::Result<_>>()
        .map_err(Error::store("evidence items"))
}
