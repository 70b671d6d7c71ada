//! Leader election on a `coordination.k8s.io/v1` Lease, with client-go's
//! `leaderelection` semantics, so that of several controller replicas one
//! alone contains pods, sends alerts, captures evidence and writes
//! ExfilPolicy status.
//!
//! - A missing Lease is created with us as holder (a 409 means another
//!   replica was quicker).
//! - A Lease held by another replica is left alone until it expires, judged
//!   by when *we* last saw it change (resourceVersion), on our own monotonic
//!   clock plus the holder's `leaseDurationSeconds`: wall clocks of
//!   different nodes are never compared.
//! - An expired Lease, or one with no holder (released), is taken over with
//!   a PUT carrying the observed resourceVersion, so of two replicas trying
//!   at once the API server lets one through and answers the other 409.
//! - The leader renews every `renew_every`. When renewals keep failing it
//!   steps down at the renew deadline (two thirds of the lease), before the
//!   others could see the lease expire, so two replicas never lead at once.
//! - On shutdown the leader clears the holder, so another replica takes over
//!   within its `retry_every` rather than waiting for the lease to expire.
//!
//! The decisions are pure functions ([`observe`], [`decide`], [`desired`])
//! tested on their own; [`spawn`] runs them against the API server.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tokio::{
    sync::{oneshot, watch},
    task::JoinHandle,
    time::Instant,
};

use super::{FIELD_MANAGER, status_code};

/// Default Lease name.
pub const DEFAULT_NAME: &str = "exfilguard-controller";
/// Default namespace of the Lease when `POD_NAMESPACE` is not set.
pub const DEFAULT_NAMESPACE: &str = "exfilguard-system";
/// How long a release PUT may take at shutdown before we give up on it
/// (the lease then expires on its own).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the Lease is and how the election is timed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// Namespace of the Lease (the controller's own).
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// Our holder identity: the pod name and a random suffix, so a
    /// restarted pod is a new holder.
    pub identity: String,
    /// How long a lease holds without renewal (`leaseDurationSeconds`).
    pub lease_duration: Duration,
    /// How often the leader renews.
    pub renew_every: Duration,
    /// How often a replica that is not leader looks at the lease again.
    pub retry_every: Duration,
}

/// A configuration the election cannot work with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("leader election: {0}")]
pub struct ConfigError(String);

impl LeaseConfig {
    /// The defaults (15 s lease, renewed every 5 s, retried every 2 s) for a
    /// Lease in `namespace`, with an identity from [`default_identity`].
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: DEFAULT_NAME.into(),
            identity: default_identity(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            retry_every: Duration::from_secs(2),
        }
    }

    /// Sets the lease duration and scales renewal (a third) and retry (two
    /// fifteenths) with it, in client-go's default proportions.
    pub fn with_lease_duration(mut self, lease_duration: Duration) -> Self {
        self.lease_duration = lease_duration;
        self.renew_every = lease_duration / 3;
        self.retry_every = lease_duration * 2 / 15;
        self
    }

    /// When a leader whose renewals fail steps down: two thirds of the
    /// lease after its last successful renewal began, well before others
    /// (who count from when they saw that renewal) take the lease over.
    pub fn renew_deadline(&self) -> Duration {
        self.lease_duration * 2 / 3
    }

    /// Checks that the timings make sense together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError(m));
        if self.name.is_empty() || self.namespace.is_empty() || self.identity.is_empty() {
            return bad("lease name, namespace and identity must not be empty".into());
        }
        if self.lease_duration < Duration::from_secs(1) {
            return bad(format!(
                "lease duration {:?} is under 1 s (the Lease counts whole seconds)",
                self.lease_duration
            ));
        }
        if self.renew_every.is_zero() || self.retry_every.is_zero() {
            return bad("renew and retry periods must be above 0".into());
        }
        if self.renew_every >= self.renew_deadline() {
            return bad(format!(
                "renewing every {:?} leaves no second try before the renew deadline {:?} \
                 (two thirds of the lease)",
                self.renew_every,
                self.renew_deadline()
            ));
        }
        Ok(())
    }
}

/// `POD_NAME`, else the host name, else `exfilguard-controller`; then `_`
/// and 8 random hex digits.
pub fn default_identity() -> String {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let base = env("POD_NAME")
        .or_else(|| env("HOSTNAME"))
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| DEFAULT_NAME.into());
    format!("{}_{:08x}", base.trim(), rand::random::<u32>())
}

/// Whether this replica leads now; cheap to clone, each clone follows the
/// same election.
#[derive(Debug, Clone)]
pub struct Leader {
    /// `None`: always leader (standalone).
    rx: Option<watch::Receiver<bool>>,
    /// The elector is gone and that was reported once.
    gone: bool,
}

impl Leader {
    /// Always leader: a single controller without Kubernetes.
    pub fn always() -> Self {
        Self {
            rx: None,
            gone: false,
        }
    }

    /// A leader handle driven by `rx` (the elector's, or a test's own).
    pub fn from_receiver(rx: watch::Receiver<bool>) -> Self {
        Self {
            rx: Some(rx),
            gone: false,
        }
    }

    /// Whether we lead now. An elector that is gone (its task ended or was
    /// aborted) no longer renews: not leader.
    pub fn is_leader(&self) -> bool {
        match &self.rx {
            None => true,
            Some(rx) => rx.has_changed().is_ok() && *rx.borrow(),
        }
    }

    /// Waits until the leadership changes and returns whether we lead now
    /// (several changes in a row may be seen as one). Never returns for
    /// [`Leader::always`].
    pub async fn changed(&mut self) -> bool {
        let Some(rx) = &mut self.rx else {
            return std::future::pending().await;
        };
        if self.gone {
            return std::future::pending().await;
        }
        match rx.changed().await {
            Ok(()) => *rx.borrow_and_update(),
            Err(_) => {
                // The elector ended: report the loss once, then nothing.
                self.gone = true;
                false
            }
        }
    }

    /// Returns once we lead (at once if we do).
    pub async fn until_leader(&mut self) {
        while !self.is_leader() {
            self.changed().await;
        }
    }
}

/// What we last saw of the Lease, on our own clock.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// The Lease as read or written.
    pub lease: Lease,
    /// Its holder; `None` when empty (released).
    pub holder: Option<String>,
    /// The holder's lease duration.
    pub lease_duration: Duration,
    /// When we first saw this version of the Lease (our monotonic clock).
    pub seen_at: Instant,
}

impl Observation {
    /// `leaseTransitions` (0 when unset).
    pub fn transitions(&self) -> i32 {
        self.spec().lease_transitions.unwrap_or(0)
    }

    fn spec(&self) -> LeaseSpec {
        self.lease.spec.clone().unwrap_or_default()
    }
}

/// Takes note of `lease` as read at `now`: `seen_at` moves only when the
/// lease changed (resourceVersion, holder or renewTime) since `previous`,
/// so a holder that stopped renewing expires `lease_duration` after we saw
/// its last renewal, whatever its clock says. `fallback` is the duration
/// when the Lease has none.
pub fn observe(
    previous: Option<&Observation>,
    lease: Lease,
    fallback: Duration,
    now: Instant,
) -> Observation {
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let lease_duration = spec
        .lease_duration_seconds
        .filter(|s| *s > 0)
        .map_or(fallback, |s| Duration::from_secs(s as u64));
    let unchanged = previous.is_some_and(|p| {
        let ps = p.spec();
        p.lease.metadata.resource_version == lease.metadata.resource_version
            && p.holder == holder
            && ps.renew_time == spec.renew_time
    });
    let seen_at = match previous {
        Some(p) if unchanged => p.seen_at,
        _ => now,
    };
    Observation {
        lease,
        holder,
        lease_duration,
        seen_at,
    }
}

/// What to do about the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// There is none: create it with us as holder.
    Create,
    /// We hold it: renew (PUT with the observed resourceVersion).
    Renew,
    /// Free (no holder) or expired: take it over, one more transition.
    TakeOver {
        /// The previous holder, if any (for the log).
        from: Option<String>,
    },
    /// Another replica holds a live lease: look again later.
    Wait {
        /// The holder.
        holder: String,
        /// How long until it expires unless renewed.
        expires_in: Duration,
    },
}

/// The decision for `observed` (`None`: the Lease does not exist) by the
/// replica `identity` at `now`.
pub fn decide(observed: Option<&Observation>, identity: &str, now: Instant) -> Action {
    let Some(o) = observed else {
        return Action::Create;
    };
    match &o.holder {
        Some(h) if h == identity => Action::Renew,
        None => Action::TakeOver { from: None },
        Some(h) => {
            let expires = o.seen_at + o.lease_duration;
            if expires > now {
                Action::Wait {
                    holder: h.clone(),
                    expires_in: expires - now,
                }
            } else {
                Action::TakeOver {
                    from: Some(h.clone()),
                }
            }
        }
    }
}

/// `leaseDurationSeconds` for `d`, rounded up: others then wait at least
/// as long as we assume they do.
fn whole_seconds(d: Duration) -> i32 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i32::try_from(secs.max(1)).unwrap_or(i32::MAX)
}

/// The Lease to write for `action` (not for [`Action::Wait`]: `None`):
/// built from what we observed, so a PUT carries its resourceVersion.
pub fn desired(
    action: &Action,
    observed: Option<&Observation>,
    config: &LeaseConfig,
    now: Timestamp,
) -> Option<Lease> {
    let base = || Lease {
        metadata: ObjectMeta {
            name: Some(config.name.clone()),
            namespace: Some(config.namespace.clone()),
            ..Default::default()
        },
        spec: None,
    };
    let mut lease = observed.map_or_else(base, |o| o.lease.clone());
    let old = lease.spec.clone().unwrap_or_default();
    let spec = match action {
        Action::Wait { .. } => return None,
        Action::Create => LeaseSpec {
            holder_identity: Some(config.identity.clone()),
            lease_duration_seconds: Some(whole_seconds(config.lease_duration)),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(0),
            ..Default::default()
        },
        Action::Renew => LeaseSpec {
            holder_identity: Some(config.identity.clone()),
            lease_duration_seconds: Some(whole_seconds(config.lease_duration)),
            acquire_time: old.acquire_time.clone().or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            ..old
        },
        Action::TakeOver { .. } => LeaseSpec {
            holder_identity: Some(config.identity.clone()),
            lease_duration_seconds: Some(whole_seconds(config.lease_duration)),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(old.lease_transitions.unwrap_or(0).saturating_add(1)),
            ..old
        },
    };
    lease.spec = Some(spec);
    Some(lease)
}

/// The Lease that gives up `observed`: no holder and a one-second duration,
/// renewTime and transitions kept.
pub fn released(observed: &Observation) -> Lease {
    let mut lease = observed.lease.clone();
    let mut spec = lease.spec.take().unwrap_or_default();
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    lease.spec = Some(spec);
    lease
}

/// Stops the elector: [`LeaseGuard::shutdown`] releases the lease and waits
/// for it; dropping the guard releases it in the background.
#[derive(Debug)]
pub struct LeaseGuard {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl LeaseGuard {
    /// Stops leading (the watch says false first), releases the lease if we
    /// held it, and returns when that is done.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Ends the elector at once without releasing, as a crash would (the
    /// lease then expires); returns once it is gone. For failover tests.
    pub async fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        // Only now: a closed stop channel would have made it release.
        self.stop.take();
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts electing with `config` (checked first); returns the leadership
/// handle and the guard that stops the election.
pub fn spawn(client: Client, config: LeaseConfig) -> Result<(Leader, LeaseGuard), ConfigError> {
    config.validate()?;
    let (tx, rx) = watch::channel(false);
    let (stop, stop_rx) = oneshot::channel();
    let elector = Elector {
        api: Api::namespaced(client, &config.namespace),
        config,
        observed: None,
        tx,
    };
    let task = tokio::spawn(elector.run(stop_rx));
    Ok((
        Leader::from_receiver(rx),
        LeaseGuard {
            stop: Some(stop),
            task: Some(task),
        },
    ))
}

struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    observed: Option<Observation>,
    tx: watch::Sender<bool>,
}

/// How an attempt to write the lease ended.
enum Write {
    /// Written: we hold it.
    Held,
    /// Someone else holds it, or it changed under us (409).
    NotOurs,
}

impl Elector {
    fn params() -> PostParams {
        PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        }
    }

    fn note(&mut self, lease: Lease) {
        self.observed = Some(observe(
            self.observed.as_ref(),
            lease,
            self.config.lease_duration,
            Instant::now(),
        ));
    }

    /// Writes `lease` (create or replace); remembers what the server says.
    async fn write(&mut self, create: bool, lease: Lease) -> Result<Write, kube::Error> {
        let pp = Self::params();
        let written = if create {
            self.api.create(&pp, &lease).await
        } else {
            self.api.replace(&self.config.name, &pp, &lease).await
        };
        match written {
            Ok(l) => {
                self.note(l);
                Ok(Write::Held)
            }
            Err(e) if status_code(&e) == Some(409) => {
                // Stale: read it again before the next decision.
                self.observed = None;
                Ok(Write::NotOurs)
            }
            Err(e) => Err(e),
        }
    }

    /// One look at the lease as a candidate: read, decide, maybe write.
    async fn try_acquire(&mut self) -> Result<Write, kube::Error> {
        let now = Instant::now();
        match self.api.get_opt(&self.config.name).await? {
            Some(l) => self.note(l),
            None => self.observed = None,
        }
        let action = decide(self.observed.as_ref(), &self.config.identity, now);
        let Some(lease) = desired(
            &action,
            self.observed.as_ref(),
            &self.config,
            Timestamp::now(),
        ) else {
            if let Action::Wait { holder, expires_in } = &action {
                tracing::debug!(%holder, ?expires_in, lease = %self.config.name, "lease held by another replica");
            }
            return Ok(Write::NotOurs);
        };
        if let Action::TakeOver { from: Some(from) } = &action {
            tracing::info!(previous = %from, lease = %self.config.name, "lease expired; taking it over");
        }
        self.write(matches!(action, Action::Create), lease).await
    }

    /// Renews the lease we hold.
    async fn renew(&mut self) -> Result<Write, kube::Error> {
        let Some(lease) = desired(
            &Action::Renew,
            self.observed.as_ref(),
            &self.config,
            Timestamp::now(),
        ) else {
            return Ok(Write::NotOurs);
        };
        if self.observed.is_none() {
            return Ok(Write::NotOurs);
        }
        self.write(false, lease).await
    }

    fn set_leader(&self, leading: bool, why: &str) {
        let was = self.tx.send_replace(leading);
        if was == leading {
            return;
        }
        let transitions = self.observed.as_ref().map(Observation::transitions);
        let holder = self.observed.as_ref().and_then(|o| o.holder.clone());
        if leading {
            tracing::info!(identity = %self.config.identity, lease = %self.config.name,
                namespace = %self.config.namespace, ?transitions, "leadership gained");
        } else {
            tracing::info!(identity = %self.config.identity, lease = %self.config.name,
                holder = ?holder, ?transitions, why, "leadership lost");
        }
    }

    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        // Start of the last successful write while leading.
        let mut renewed: Option<Instant> = None;
        let mut next = Instant::now();
        loop {
            tokio::select! {
                _ = &mut stop => break,
                () = tokio::time::sleep_until(next) => {}
            }
            let started = Instant::now();
            match renewed {
                Some(last) => {
                    let deadline = last + self.config.renew_deadline();
                    let outcome = tokio::select! {
                        _ = &mut stop => break,
                        r = self.renew() => Some(r),
                        () = tokio::time::sleep_until(deadline) => None,
                    };
                    match outcome {
                        Some(Ok(Write::Held)) => {
                            renewed = Some(started);
                            next = started + self.config.renew_every;
                        }
                        Some(Ok(Write::NotOurs)) => {
                            renewed = None;
                            self.set_leader(false, "the lease changed under us (409)");
                            next = Instant::now();
                        }
                        Some(Err(e)) if Instant::now() < deadline => {
                            tracing::warn!(error = %e, lease = %self.config.name, "lease renewal failed; retrying");
                            next = (Instant::now() + self.config.retry_every).min(deadline);
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, lease = %self.config.name, "lease renewal failed");
                            renewed = None;
                            self.set_leader(false, "renew deadline passed");
                            next = Instant::now() + self.config.retry_every;
                        }
                        None => {
                            renewed = None;
                            self.set_leader(false, "renew deadline passed");
                            next = Instant::now() + self.config.retry_every;
                        }
                    }
                }
                None => {
                    let outcome = tokio::select! {
                        _ = &mut stop => break,
                        r = self.try_acquire() => r,
                    };
                    match outcome {
                        Ok(Write::Held) => {
                            renewed = Some(started);
                            self.set_leader(true, "");
                            next = started + self.config.renew_every;
                        }
                        Ok(Write::NotOurs) => next = Instant::now() + self.config.retry_every,
                        Err(e) => {
                            tracing::warn!(error = %e, lease = %self.config.name, "cannot read or write the lease; retrying");
                            next = Instant::now() + self.config.retry_every;
                        }
                    }
                }
            }
        }
        // Stopped: stop acting first, then hand the lease over.
        if renewed.is_some() {
            self.set_leader(false, "shutting down");
            match tokio::time::timeout(RELEASE_TIMEOUT, self.release()).await {
                Ok(Ok(true)) => tracing::info!(lease = %self.config.name, "lease released"),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "lease not released; it expires on its own")
                }
                Err(_) => tracing::warn!("lease release timed out; it expires on its own"),
            }
        }
    }

    /// Clears the holder if it is still us. A renewal cut short by the
    /// shutdown may have changed the lease after we last saw it: on a 409,
    /// read it again and retry once.
    async fn release(&mut self) -> Result<bool, kube::Error> {
        let pp = Self::params();
        for _ in 0..2 {
            let observed = match self.observed.take() {
                Some(o) => o,
                None => match self.api.get_opt(&self.config.name).await? {
                    Some(l) => observe(None, l, self.config.lease_duration, Instant::now()),
                    None => return Ok(false),
                },
            };
            if observed.holder.as_deref() != Some(self.config.identity.as_str()) {
                return Ok(false);
            }
            match self
                .api
                .replace(&self.config.name, &pp, &released(&observed))
                .await
            {
                Ok(_) => return Ok(true),
                Err(e) if status_code(&e) == Some(409) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LeaseConfig {
        LeaseConfig {
            namespace: "exfilguard-system".into(),
            name: DEFAULT_NAME.into(),
            identity: "me_1".into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            retry_every: Duration::from_secs(2),
        }
    }

    fn lease(rv: &str, holder: Option<&str>, secs: i32, renew: i64, transitions: i32) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(DEFAULT_NAME.into()),
                namespace: Some("exfilguard-system".into()),
                resource_version: Some(rv.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(Into::into),
                lease_duration_seconds: Some(secs),
                acquire_time: Some(MicroTime(Timestamp::from_second(100).unwrap())),
                renew_time: Some(MicroTime(Timestamp::from_second(renew).unwrap())),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        }
    }

    const FALLBACK: Duration = Duration::from_secs(15);

    #[test]
    fn a_missing_lease_is_created_with_us_as_holder() {
        let t0 = Instant::now();
        assert_eq!(decide(None, "me_1", t0), Action::Create);
        let now = Timestamp::from_second(1000).unwrap();
        let l = desired(&Action::Create, None, &config(), now).unwrap();
        let s = l.spec.unwrap();
        assert_eq!(l.metadata.name.as_deref(), Some(DEFAULT_NAME));
        assert_eq!(l.metadata.resource_version, None);
        assert_eq!(s.holder_identity.as_deref(), Some("me_1"));
        assert_eq!(s.lease_duration_seconds, Some(15));
        assert_eq!(s.lease_transitions, Some(0));
        assert_eq!(s.acquire_time, Some(MicroTime(now)));
        assert_eq!(s.renew_time, Some(MicroTime(now)));
    }

    #[test]
    fn our_own_lease_is_renewed_keeping_acquire_time_and_transitions() {
        let t0 = Instant::now();
        let o = observe(None, lease("7", Some("me_1"), 15, 200, 3), FALLBACK, t0);
        // Even long after: it is ours, and the PUT's resourceVersion decides.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(decide(Some(&o), "me_1", later), Action::Renew);
        let now = Timestamp::from_second(300).unwrap();
        let l = desired(&Action::Renew, Some(&o), &config(), now).unwrap();
        assert_eq!(l.metadata.resource_version.as_deref(), Some("7"));
        let s = l.spec.unwrap();
        assert_eq!(s.lease_transitions, Some(3));
        assert_eq!(
            s.acquire_time,
            Some(MicroTime(Timestamp::from_second(100).unwrap()))
        );
        assert_eq!(s.renew_time, Some(MicroTime(now)));
    }

    #[test]
    fn a_live_lease_of_another_replica_is_waited_on() {
        let t0 = Instant::now();
        let o = observe(None, lease("7", Some("other_2"), 15, 200, 1), FALLBACK, t0);
        let at = t0 + Duration::from_secs(4);
        assert_eq!(
            decide(Some(&o), "me_1", at),
            Action::Wait {
                holder: "other_2".into(),
                expires_in: Duration::from_secs(11)
            }
        );
        assert_eq!(
            desired(
                &decide(Some(&o), "me_1", at),
                Some(&o),
                &config(),
                Timestamp::now()
            ),
            None
        );
    }

    #[test]
    fn expiry_counts_from_when_we_saw_the_last_change_not_from_renew_time() {
        let t0 = Instant::now();
        // renewTime far in the past by the holder's clock: irrelevant.
        let o = observe(None, lease("7", Some("other_2"), 15, 1, 1), FALLBACK, t0);
        assert!(matches!(
            decide(Some(&o), "me_1", t0 + Duration::from_secs(1)),
            Action::Wait { .. }
        ));
        // Read again unchanged 10 s later: still counted from t0.
        let same = observe(
            Some(&o),
            lease("7", Some("other_2"), 15, 1, 1),
            FALLBACK,
            t0 + Duration::from_secs(10),
        );
        assert_eq!(same.seen_at, t0);
        assert_eq!(
            decide(Some(&same), "me_1", t0 + Duration::from_secs(15)),
            Action::TakeOver {
                from: Some("other_2".into())
            }
        );
        // A renewal (new resourceVersion) restarts the count.
        let renewed = observe(
            Some(&same),
            lease("8", Some("other_2"), 15, 2, 1),
            FALLBACK,
            t0 + Duration::from_secs(14),
        );
        assert_eq!(renewed.seen_at, t0 + Duration::from_secs(14));
        assert!(matches!(
            decide(Some(&renewed), "me_1", t0 + Duration::from_secs(15)),
            Action::Wait { .. }
        ));
    }

    #[test]
    fn an_expired_lease_is_taken_over_with_one_more_transition() {
        let t0 = Instant::now();
        let o = observe(None, lease("9", Some("other_2"), 15, 200, 4), FALLBACK, t0);
        let action = decide(Some(&o), "me_1", t0 + Duration::from_secs(15));
        assert_eq!(
            action,
            Action::TakeOver {
                from: Some("other_2".into())
            }
        );
        let now = Timestamp::from_second(500).unwrap();
        let l = desired(&action, Some(&o), &config(), now).unwrap();
        assert_eq!(l.metadata.resource_version.as_deref(), Some("9"));
        let s = l.spec.unwrap();
        assert_eq!(s.holder_identity.as_deref(), Some("me_1"));
        assert_eq!(s.lease_transitions, Some(5));
        assert_eq!(s.lease_duration_seconds, Some(15));
        assert_eq!(s.acquire_time, Some(MicroTime(now)));
        assert_eq!(s.renew_time, Some(MicroTime(now)));
    }

    #[test]
    fn a_released_lease_is_taken_over_at_once() {
        let t0 = Instant::now();
        for holder in [None, Some("")] {
            let o = observe(None, lease("9", holder, 1, 200, 2), FALLBACK, t0);
            assert_eq!(o.holder, None);
            assert_eq!(
                decide(Some(&o), "me_1", t0),
                Action::TakeOver { from: None }
            );
        }
    }

    #[test]
    fn the_holders_duration_counts_and_a_missing_one_falls_back() {
        let t0 = Instant::now();
        let short = observe(None, lease("1", Some("o"), 3, 1, 0), FALLBACK, t0);
        assert_eq!(short.lease_duration, Duration::from_secs(3));
        assert!(matches!(
            decide(Some(&short), "me_1", t0 + Duration::from_secs(3)),
            Action::TakeOver { .. }
        ));
        let mut l = lease("1", Some("o"), 0, 1, 0);
        l.spec.as_mut().unwrap().lease_duration_seconds = None;
        assert_eq!(observe(None, l, FALLBACK, t0).lease_duration, FALLBACK);
        // A missing transitions count starts from 0.
        let mut l = lease("1", Some("o"), 15, 1, 0);
        l.spec.as_mut().unwrap().lease_transitions = None;
        let o = observe(None, l, FALLBACK, t0);
        let taken = desired(
            &Action::TakeOver { from: None },
            Some(&o),
            &config(),
            Timestamp::now(),
        )
        .unwrap();
        assert_eq!(taken.spec.unwrap().lease_transitions, Some(1));
    }

    #[test]
    fn release_clears_the_holder_and_keeps_the_rest() {
        let o = observe(
            None,
            lease("12", Some("me_1"), 15, 200, 6),
            FALLBACK,
            Instant::now(),
        );
        let l = released(&o);
        assert_eq!(l.metadata.resource_version.as_deref(), Some("12"));
        let s = l.spec.unwrap();
        assert_eq!(s.holder_identity, None);
        assert_eq!(s.lease_duration_seconds, Some(1));
        assert_eq!(s.lease_transitions, Some(6));
        assert_eq!(
            s.renew_time,
            Some(MicroTime(Timestamp::from_second(200).unwrap()))
        );
    }

    #[test]
    fn timings_are_validated() {
        assert_eq!(config().validate(), Ok(()));
        assert_eq!(config().renew_deadline(), Duration::from_secs(10));
        // Whole seconds on the Lease, rounded up.
        assert_eq!(whole_seconds(Duration::from_secs(15)), 15);
        assert_eq!(whole_seconds(Duration::from_millis(1_500)), 2);
        assert_eq!(whole_seconds(Duration::from_millis(200)), 1);
        let c = config().with_lease_duration(Duration::from_secs(30));
        assert_eq!(c.renew_every, Duration::from_secs(10));
        assert_eq!(c.retry_every, Duration::from_secs(4));
        assert_eq!(c.validate(), Ok(()));
        for bad in [
            LeaseConfig {
                lease_duration: Duration::from_millis(500),
                ..config()
            },
            LeaseConfig {
                renew_every: Duration::from_secs(10),
                ..config()
            },
            LeaseConfig {
                retry_every: Duration::ZERO,
                ..config()
            },
            LeaseConfig {
                identity: String::new(),
                ..config()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn identities_differ_per_start() {
        let a = default_identity();
        let b = default_identity();
        assert_ne!(a, b);
        let (base, suffix) = a.rsplit_once('_').unwrap();
        assert!(!base.is_empty());
        assert_eq!(suffix.len(), 8);
    }

    #[tokio::test]
    async fn leader_handles_follow_the_election() {
        let always = Leader::always();
        assert!(always.is_leader());
        let (tx, rx) = watch::channel(false);
        let mut l = Leader::from_receiver(rx);
        assert!(!l.is_leader());
        tx.send_replace(true);
        assert!(l.changed().await);
        assert!(l.is_leader());
        l.until_leader().await;
        // The elector gone: not leader, reported once.
        drop(tx);
        assert!(!l.is_leader());
        assert!(!l.changed().await);
        assert!(
            tokio::time::timeout(Duration::from_millis(20), l.changed())
                .await
                .is_err()
        );
    }
}
