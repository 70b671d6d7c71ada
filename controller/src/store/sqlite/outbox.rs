//! The alert outbox in SQLite: `alert_events` (one row per incident
//! transition, written in the transition's transaction) fanned out to
//! `alert_outbox` (one row per transition and sink, with its attempts).

use exfilguard_proto::v1::IncidentState;
use rusqlite::{OptionalExtension, Transaction, params};

use super::{SqliteStore, add_timeline, load_incident, not_found};
use crate::{
    Error, Result,
    alerts::{Alert, Transition},
    store::{Delivery, DeliveryState, DeliveryStatus, Outbox, UnroutedAlert},
};

/// Schema of the outbox (migration 2).
pub(super) const MIGRATION: &str = r#"
    CREATE TABLE alert_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        incident_id TEXT NOT NULL REFERENCES incidents(id),
        transition TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        alert TEXT NOT NULL,
        routed INTEGER NOT NULL DEFAULT 0,
        UNIQUE (incident_id, transition)
    );
    CREATE INDEX alert_events_unrouted ON alert_events(id) WHERE routed = 0;
    CREATE TABLE alert_outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id INTEGER NOT NULL REFERENCES alert_events(id),
        incident_id TEXT NOT NULL,
        sink TEXT NOT NULL,
        state INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_ms INTEGER NOT NULL,
        last_error TEXT NOT NULL DEFAULT '',
        done_ms INTEGER NOT NULL DEFAULT 0,
        UNIQUE (event_id, sink)
    );
    CREATE INDEX alert_outbox_due ON alert_outbox(next_attempt_ms) WHERE state = 0;
    CREATE INDEX alert_outbox_incident ON alert_outbox(incident_id, sink, event_id) WHERE state = 0;
"#;

const PENDING: i32 = 0;
const DELIVERED: i32 = 1;
const FAILED: i32 = 2;

/// Records the alert for `incident`'s `transition`, inside the transaction
/// that made it. A transition happens once per incident; a second record of
/// the same one is ignored.
pub(super) fn record(
    tx: &Transaction<'_>,
    incident: &str,
    transition: Transition,
    at_ms: u64,
    actor: &str,
    cause: &str,
) -> Result<()> {
    let row = load_incident(tx, incident)?.ok_or_else(|| not_found(incident))?;
    let alert = Alert::new(&row, transition, at_ms, actor, cause);
    let json = serde_json::to_string(&alert)
        .map_err(|e| Error::Unavailable(format!("encode alert: {e}")))?;
    tx.prepare_cached(
        "INSERT OR IGNORE INTO alert_events (incident_id, transition, at_ms, alert) VALUES (?1, ?2, ?3, ?4)",
    )
    .and_then(|mut s| s.execute(params![incident, transition.as_str(), at_ms, json]))
    .map_err(Error::store("record alert"))?;
    Ok(())
}

/// The incident's state now, for the state column of a timeline note.
fn state_of(tx: &Transaction<'_>, incident: &str) -> Result<i32> {
    Ok(load_incident(tx, incident)?
        .map(|i| i.state)
        .unwrap_or(IncidentState::Unspecified as i32))
}

fn finish(
    store: &SqliteStore,
    d: &Delivery,
    state: i32,
    attempts: u32,
    error: &str,
    cause: &str,
    now_ms: u64,
) -> Result<()> {
    let mut conn = store.writer()?;
    let tx = conn.transaction().map_err(Error::store("begin"))?;
    let changed = tx
        .execute(
            "UPDATE alert_outbox SET state = ?2, attempts = ?3, last_error = ?4, done_ms = ?5 WHERE id = ?1 AND state = 0",
            params![d.id, state, attempts, error, now_ms],
        )
        .map_err(Error::store("finish delivery"))?;
    // Only the first finish of a row writes the timeline entry.
    if changed == 1 && load_incident(&tx, &d.incident_id)?.is_some() {
        let incident_state = state_of(&tx, &d.incident_id)?;
        add_timeline(
            &tx,
            &d.incident_id,
            now_ms,
            "controller",
            cause,
            incident_state,
        )?;
    }
    tx.commit().map_err(Error::store("commit"))
}

impl Outbox for SqliteStore {
    fn unrouted_alerts(&self, limit: u32) -> Result<Vec<UnroutedAlert>> {
        let conn = self.reader()?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, alert FROM alert_events WHERE routed = 0 ORDER BY id LIMIT ?1",
            )
            .map_err(Error::store("unrouted alerts"))?;
        let rows = stmt
            .query_map([limit], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(Error::store("unrouted alerts"))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(Error::store("unrouted alerts"))?;
        Ok(rows
            .into_iter()
            .filter_map(|(event_id, json)| match serde_json::from_str(&json) {
                Ok(alert) => Some(UnroutedAlert { event_id, alert }),
                Err(e) => {
                    tracing::error!(event_id, error = %e, "stored alert does not parse; not routed");
                    None
                }
            })
            .collect())
    }

    fn route_alerts(&self, routes: &[(i64, Vec<String>)], now_ms: u64) -> Result<()> {
        if routes.is_empty() {
            return Ok(());
        }
        let mut conn = self.writer()?;
        let tx = conn.transaction().map_err(Error::store("begin"))?;
        for (event_id, sinks) in routes {
            let incident: Option<String> = tx
                .query_row(
                    "SELECT incident_id FROM alert_events WHERE id = ?1 AND routed = 0",
                    [event_id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(Error::store("route alert"))?;
            let Some(incident) = incident else {
                continue;
            };
            for sink in sinks {
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO alert_outbox (event_id, incident_id, sink, next_attempt_ms) VALUES (?1, ?2, ?3, ?4)",
                )
                .and_then(|mut s| s.execute(params![event_id, incident, sink, now_ms]))
                .map_err(Error::store("route alert"))?;
            }
            tx.prepare_cached("UPDATE alert_events SET routed = 1 WHERE id = ?1")
                .and_then(|mut s| s.execute([event_id]))
                .map_err(Error::store("route alert"))?;
        }
        tx.commit().map_err(Error::store("commit"))
    }

    fn due_deliveries(&self, now_ms: u64, limit: u32) -> Result<Vec<Delivery>> {
        let conn = self.reader()?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT o.id, o.sink, o.attempts, e.alert, o.incident_id, e.transition
                 FROM alert_outbox o JOIN alert_events e ON e.id = o.event_id
                 WHERE o.state = 0 AND o.next_attempt_ms <= ?1
                   AND NOT EXISTS (SELECT 1 FROM alert_outbox p
                       WHERE p.state = 0 AND p.incident_id = o.incident_id AND p.sink = o.sink
                         AND p.event_id < o.event_id)
                 ORDER BY o.next_attempt_ms, o.id LIMIT ?2",
            )
            .map_err(Error::store("due deliveries"))?;
        let rows = stmt
            .query_map(params![now_ms, limit], |r| {
                let json: String = r.get(3)?;
                Ok(Delivery {
                    id: r.get(0)?,
                    sink: r.get(1)?,
                    attempts: r.get(2)?,
                    alert: serde_json::from_str(&json).ok(),
                    incident_id: r.get(4)?,
                    transition: r.get(5)?,
                })
            })
            .map_err(Error::store("due deliveries"))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(Error::store("due deliveries"))
    }

    fn next_delivery_ms(&self) -> Result<Option<u64>> {
        let conn = self.reader()?;
        conn.query_row(
            "SELECT MIN(next_attempt_ms) FROM alert_outbox WHERE state = 0",
            [],
            |r| r.get(0),
        )
        .map_err(Error::store("next delivery"))
    }

    fn delivered(
        &self,
        delivery: &Delivery,
        attempts: u32,
        detail: &str,
        now_ms: u64,
    ) -> Result<()> {
        let tries = if attempts == 1 { "attempt" } else { "attempts" };
        let cause = format!(
            "alert ({}) delivered to sink {} after {attempts} {tries} ({detail})",
            delivery.transition, delivery.sink
        );
        finish(self, delivery, DELIVERED, attempts, "", &cause, now_ms)
    }

    fn retry_later(&self, id: i64, attempts: u32, next_ms: u64, error: &str) -> Result<()> {
        let conn = self.writer()?;
        conn.execute(
            "UPDATE alert_outbox SET attempts = ?2, next_attempt_ms = ?3, last_error = ?4 WHERE id = ?1 AND state = 0",
            params![id, attempts, next_ms, error],
        )
        .map_err(Error::store("retry delivery"))?;
        Ok(())
    }

    fn delivery_failed(
        &self,
        delivery: &Delivery,
        attempts: u32,
        error: &str,
        now_ms: u64,
    ) -> Result<()> {
        let cause = format!(
            "alert ({}) to sink {} FAILED after {attempts} attempts: {error}",
            delivery.transition, delivery.sink
        );
        finish(self, delivery, FAILED, attempts, error, &cause, now_ms)
    }

    fn deliveries(&self, incident_id: &str) -> Result<Vec<DeliveryStatus>> {
        let conn = self.reader()?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT o.sink, e.transition, o.state, o.attempts, o.last_error
                 FROM alert_outbox o JOIN alert_events e ON e.id = o.event_id
                 WHERE o.incident_id = ?1 ORDER BY o.id",
            )
            .map_err(Error::store("deliveries"))?;
        let rows = stmt
            .query_map([incident_id], |r| {
                let state: i32 = r.get(2)?;
                Ok(DeliveryStatus {
                    sink: r.get(0)?,
                    transition: r.get(1)?,
                    state: match state {
                        PENDING => DeliveryState::Pending,
                        DELIVERED => DeliveryState::Delivered,
                        _ => DeliveryState::Failed,
                    },
                    attempts: r.get(3)?,
                    last_error: r.get(4)?,
                })
            })
            .map_err(Error::store("deliveries"))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(Error::store("deliveries"))
    }
}
