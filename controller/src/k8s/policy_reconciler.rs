//! `ExfilPolicy` objects → the policy every agent gets.
//!
//! The reconciler watches `ExfilPolicy` in all namespaces, validates each
//! object, writes what it made of it to the object's status (server-side
//! apply on the status subresource, field manager [`FIELD_MANAGER`]), and
//! pushes the effective policy to every connected agent through the
//! [`Hub`]: the cluster default (the controller's `--agent-policy` file) with
//! one override per valid object, scoped to the object's namespace and pod
//! selector.
//!
//! Its core, [`reconcile`], is a pure function of the default and the
//! objects. Rules it implements:
//! - Order (the agent takes the first override that matches a workload; no
//!   merging across objects): by namespace, then the more specific selector
//!   first (more `matchLabels`), then by name. Objects of different
//!   namespaces never compete.
//! - A rejected object never reaches agents: it is left out of the policy
//!   (even when an earlier generation of it was valid) and its status says
//!   why, one error per field. Fixing the spec puts it back in force.
//! - Fields an agent cannot apply to one workload yet (windows, spike and
//!   tunnel tuning, cluster domains, domain allowlists, update interval,
//!   `lockdown_keeps_dns`, `matchExpressions` other than `In` with one value)
//!   are refused by name rather than ignored: they belong in the cluster
//!   default.
//!
//! Of several controller replicas each pushes to its own agents, and only
//! the elected leader ([`Leader`]) writes status.
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use exfilguard_proto::v1::{PolicyAction, PolicyOverride, PolicyUpdate};
use futures::StreamExt as _;
use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt as _,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::watch;

use super::{
    FIELD_MANAGER,
    crd::{Action, ExfilPolicy, ExfilPolicySpec, ExfilPolicyStatus, FieldError},
    lease::Leader,
};
use crate::{hub::Hub, time::now_ms};

/// Type of the status condition the reconciler maintains.
pub const READY: &str = "Ready";

/// Events arriving this close together are handled as one change.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);

/// After a failed status write, try again this much later.
const STATUS_RETRY: Duration = Duration::from_secs(5);

/// An object's identity: namespace and name.
pub type Key = (String, String);

/// What [`reconcile`] decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The effective policy (version 0: the caller numbers it).
    pub update: PolicyUpdate,
    /// The status every object should have, by namespace and name.
    pub statuses: BTreeMap<Key, ExfilPolicyStatus>,
}

fn err(field: impl Into<String>, problem: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Fields the agents cannot apply to the workloads of one policy yet.
fn unsupported(spec: &ExfilPolicySpec, out: &mut Vec<FieldError>) {
    const WHY: &str = "cannot be set per pod selector yet; set it in the cluster default (--agent-policy) or the node's policy file";
    let mut refuse = |field: &str, set: bool| {
        if set {
            out.push(err(field, WHY));
        }
    };
    if let Some(v) = &spec.volume {
        refuse("volume.window", v.window.is_some());
        refuse("volume.spike_factor", v.spike_factor.is_some());
        refuse("volume.spike_min_bytes", v.spike_min_bytes.is_some());
        refuse(
            "volume.spike_warmup_minutes",
            v.spike_warmup_minutes.is_some(),
        );
    }
    if let Some(d) = &spec.dns {
        refuse("dns.window", d.window.is_some());
        refuse("dns.spread_encoded_bytes", d.spread_encoded_bytes.is_some());
        refuse(
            "dns.tunnel_queries_per_minute",
            d.tunnel_queries_per_minute.is_some(),
        );
        refuse("dns.cluster_domains", d.cluster_domains.is_some());
    }
    if let Some(a) = &spec.allowlist {
        refuse("allowlist.domains", !a.domains.is_empty());
    }
    refuse("update_interval", spec.update_interval.is_some());
    refuse("lockdown_keeps_dns", spec.lockdown_keeps_dns.is_some());
}

/// The labels a selector requires, or an error per expression the agents
/// cannot evaluate (they match labels by equality).
fn selector_labels(spec: &ExfilPolicySpec, out: &mut Vec<FieldError>) -> BTreeMap<String, String> {
    let Some(sel) = &spec.pod_selector else {
        return BTreeMap::new();
    };
    let mut labels = sel.match_labels.clone().unwrap_or_default();
    for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
        let field = format!("pod_selector.matchExpressions[{i}]");
        match (e.operator.as_str(), e.values.as_deref()) {
            ("In", Some([v])) => match labels.get(&e.key) {
                Some(have) if have != v => out.push(err(
                    field,
                    format!(
                        "key {:?}: In [{v:?}] contradicts matchLabels {have:?}",
                        e.key
                    ),
                )),
                _ => {
                    labels.insert(e.key.clone(), v.clone());
                }
            },
            (op, _) => out.push(err(
                field,
                format!(
                    "{op} on {:?} is not supported: agents match labels by equality (use matchLabels, or In with exactly one value)",
                    e.key
                ),
            )),
        }
    }
    labels
}

/// The agent override for a valid object, or every reason it is not.
pub fn to_override(
    namespace: &str,
    name: &str,
    spec: &ExfilPolicySpec,
) -> Result<PolicyOverride, Vec<FieldError>> {
    let mut errors = spec.validate();
    unsupported(spec, &mut errors);
    let labels = selector_labels(spec, &mut errors);
    // What the agent would refuse must be refused here: one bad override
    // makes agents reject the whole update.
    if let Some(a) = &spec.allowlist {
        for (i, c) in a.cidrs.iter().enumerate() {
            if c.rsplit_once('/').is_some_and(|(_, len)| len == "0") {
                errors.push(err(
                    format!("allowlist.cidrs[{i}]"),
                    format!("{c:?} allowlists every address: detection would be off"),
                ));
            }
        }
    }
    if let Some(d) = &spec.dns
        && d.encoded_bytes == Some(0)
    {
        errors.push(err("dns.encoded_bytes", "must be above 0"));
    }
    let mut cap = (0, 0);
    if let Some(h) = &spec.hard_cap
        && let Ok(window) = exfilguard_policy::parse_duration(&h.window)
    {
        match u32::try_from(window.as_secs()) {
            Ok(0) => errors.push(err("hard_cap.window", "must be at least 1s")),
            Ok(s) => cap = (h.bytes, s),
            Err(_) => errors.push(err("hard_cap.window", "is too long")),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let volume = spec.volume.clone().unwrap_or_default();
    let action = match spec.action {
        None => PolicyAction::Unspecified,
        Some(Action::Alert) => PolicyAction::Alert,
        Some(Action::Lockdown) => PolicyAction::Lockdown,
        Some(Action::DryRun) => PolicyAction::DryRun,
    };
    Ok(PolicyOverride {
        source: format!("{namespace}/{name}"),
        namespace: namespace.to_owned(),
        match_labels: labels.into_iter().collect::<HashMap<_, _>>(),
        action: action as i32,
        volume_threshold_bytes: volume.threshold_bytes.unwrap_or(0),
        per_destination_bytes: volume.per_destination_bytes.unwrap_or(0),
        dns_encoded_bytes: spec.dns.as_ref().and_then(|d| d.encoded_bytes).unwrap_or(0),
        allow_cidrs: spec
            .allowlist
            .as_ref()
            .map(|a| a.cidrs.clone())
            .unwrap_or_default(),
        allow_domains: Vec::new(),
        hard_cap_bytes: cap.0,
        hard_cap_window_seconds: cap.1,
    })
}

fn ready(status: bool, reason: &str, message: String, generation: Option<i64>) -> Condition {
    Condition {
        type_: READY.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        // Placed by `reconcile`: kept when the status did not flip.
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
    }
}

/// Whether two statuses say the same, transition times aside.
pub fn same_status(a: &ExfilPolicyStatus, b: &ExfilPolicyStatus) -> bool {
    let strip = |s: &ExfilPolicyStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        }
        s
    };
    strip(a) == strip(b)
}

/// The effective policy and every object's status: `default` (the cluster
/// default; none = agents keep their own settings) with one override per
/// valid object, in the order the module documentation gives. `now` is the
/// transition time of a `Ready` condition that changes.
pub fn reconcile(
    default: Option<&PolicyUpdate>,
    objects: &[ExfilPolicy],
    now: Timestamp,
) -> Outcome {
    let mut valid = Vec::new();
    let mut statuses = BTreeMap::new();
    for obj in objects {
        let namespace = obj.namespace().unwrap_or_default();
        let name = obj.name_any();
        let generation = obj.metadata.generation;
        let mut status = match to_override(&namespace, &name, &obj.spec) {
            Ok(o) => {
                valid.push(o);
                ExfilPolicyStatus {
                    observed_generation: generation,
                    valid: Some(true),
                    errors: Vec::new(),
                    conditions: vec![ready(
                        true,
                        "Accepted",
                        "in force: part of the policy pushed to every agent".into(),
                        generation,
                    )],
                }
            }
            Err(errors) => {
                let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
                let message = format!(
                    "rejected, not sent to agents ({} error{}): {}",
                    errors.len(),
                    if errors.len() == 1 { "" } else { "s" },
                    errors.join("; ")
                );
                ExfilPolicyStatus {
                    observed_generation: generation,
                    valid: Some(false),
                    conditions: vec![ready(false, "Invalid", message, generation)],
                    errors,
                }
            }
        };
        let previous = obj
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == READY));
        for c in &mut status.conditions {
            c.last_transition_time = match previous {
                Some(p) if p.status == c.status => p.last_transition_time.clone(),
                _ => Time(now),
            };
        }
        statuses.insert((namespace, name), status);
    }
    valid.sort_by(|a, b| {
        (
            &a.namespace,
            std::cmp::Reverse(a.match_labels.len()),
            &a.source,
        )
            .cmp(&(
                &b.namespace,
                std::cmp::Reverse(b.match_labels.len()),
                &b.source,
            ))
    });
    let mut update = default.cloned().unwrap_or_default();
    update.version = 0;
    update.overrides = valid;
    Outcome { update, statuses }
}

/// The ExfilPolicy body of a status write (server-side apply).
pub fn status_patch(status: &ExfilPolicyStatus) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "exfilguard.io/v1alpha1",
        "kind": "ExfilPolicy",
        "status": status,
    })
}

/// Pushes the effective policy when it changed; returns the version pushed.
fn publish(hub: &Hub, last: &mut Option<PolicyUpdate>, mut update: PolicyUpdate) -> Option<u64> {
    let same = |a: &PolicyUpdate, b: &PolicyUpdate| {
        PolicyUpdate {
            version: 0,
            ..a.clone()
        } == PolicyUpdate {
            version: 0,
            ..b.clone()
        }
    };
    match last {
        Some(l) if same(l, &update) => return None,
        // Nothing ever pushed and nothing to say: agents keep their own.
        None if update == PolicyUpdate::default() => return None,
        _ => {}
    }
    // Above anything pushed before (a restarted controller uses the clock).
    update.version = now_ms().max(last.as_ref().map_or(0, |l| l.version + 1));
    let version = update.version;
    let agents = hub.set_policy(update.clone());
    tracing::info!(
        version,
        agents,
        overrides = update.overrides.len(),
        "effective agent policy pushed"
    );
    *last = Some(update);
    Some(version)
}

/// Writes the statuses that differ from what the objects carry; false if a
/// write failed (worth another try).
async fn write_statuses(
    client: &Client,
    objects: &mut BTreeMap<Key, ExfilPolicy>,
    statuses: &BTreeMap<Key, ExfilPolicyStatus>,
) -> bool {
    let mut all_ok = true;
    for (key, want) in statuses {
        let Some(obj) = objects.get_mut(key) else {
            continue;
        };
        if obj.status.as_ref().is_some_and(|s| same_status(s, want)) {
            continue;
        }
        let api: Api<ExfilPolicy> = Api::namespaced(client.clone(), &key.0);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match api
            .patch_status(&key.1, &params, &Patch::Apply(status_patch(want)))
            .await
        {
            Ok(_) => {
                // Known now, before the watch echoes it: no second write
                // when something else changes first.
                obj.status = Some(want.clone());
                tracing::info!(
                    namespace = %key.0, name = %key.1, valid = ?want.valid,
                    errors = want.errors.len(), "ExfilPolicy status written"
                );
            }
            // Gone since: its deletion is on its way.
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                all_ok = false;
                tracing::warn!(namespace = %key.0, name = %key.1, error = %e,
                    "could not write ExfilPolicy status; retrying");
            }
        }
    }
    all_ok
}

/// Runs the reconciler until the watch ends (never, in practice: watch
/// errors are retried with backoff). `default` carries the cluster default
/// (the `--agent-policy` file, re-read on SIGHUP); `debounce` is how long
/// it waits for more events after one arrives (keep it well under the 2 s
/// in which a change must reach the agents).
pub async fn run(
    client: Client,
    hub: Arc<Hub>,
    default: watch::Receiver<Option<PolicyUpdate>>,
    debounce: Duration,
) {
    run_with_leader(client, hub, default, debounce, Leader::always()).await
}

/// [`run`] where only the leader writes status: every replica computes the
/// effective policy and pushes it to its own agents, but statuses are
/// written only while `leader` says this replica leads (and all of them
/// again when it gains leadership).
pub async fn run_with_leader(
    client: Client,
    hub: Arc<Hub>,
    mut default: watch::Receiver<Option<PolicyUpdate>>,
    debounce: Duration,
    mut leader: Leader,
) {
    let api: Api<ExfilPolicy> = Api::all(client.clone());
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut objects: BTreeMap<Key, ExfilPolicy> = BTreeMap::new();
    let mut listing: Option<BTreeMap<Key, ExfilPolicy>> = None;
    let mut listed = false;
    let mut default_open = true;
    let mut last = hub.policy();
    let mut retry: Option<tokio::time::Instant> = None;
    let key = |o: &ExfilPolicy| (o.namespace().unwrap_or_default(), o.name_any());
    let mut apply = |ev: watcher::Event<ExfilPolicy>,
                     objects: &mut BTreeMap<Key, ExfilPolicy>,
                     listed: &mut bool| {
        match ev {
            watcher::Event::Apply(o) => {
                objects.insert(key(&o), o);
            }
            watcher::Event::Delete(o) => {
                objects.remove(&key(&o));
            }
            watcher::Event::Init => listing = Some(BTreeMap::new()),
            watcher::Event::InitApply(o) => {
                listing.get_or_insert_default().insert(key(&o), o);
            }
            watcher::Event::InitDone => {
                *objects = listing.take().unwrap_or_default();
                *listed = true;
            }
        }
    };
    loop {
        let retry_at = retry;
        tokio::select! {
            ev = events.next() => match ev {
                Some(Ok(ev)) => apply(ev, &mut objects, &mut listed),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "ExfilPolicy watch failed; retrying with backoff");
                    continue;
                }
                None => return,
            },
            changed = default.changed(), if default_open => {
                if changed.is_err() {
                    default_open = false;
                    continue;
                }
            }
            () = async { tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)).await }, if retry_at.is_some() => {
                retry = None;
            }
            // Gained: write what the previous leader may have left unwritten.
            _ = leader.changed() => {}
        }
        if !listed {
            continue;
        }
        // Let a burst (an `kubectl apply -f dir/`) settle into one push.
        let settle = tokio::time::sleep(debounce);
        tokio::pin!(settle);
        loop {
            tokio::select! {
                ev = events.next() => match ev {
                    Some(Ok(ev)) => apply(ev, &mut objects, &mut listed),
                    Some(Err(e)) => tracing::warn!(error = %e, "ExfilPolicy watch failed; retrying with backoff"),
                    None => return,
                },
                () = &mut settle => break,
            }
        }
        let list: Vec<ExfilPolicy> = objects.values().cloned().collect();
        let current_default = default.borrow().clone();
        let outcome = reconcile(current_default.as_ref(), &list, Timestamp::now());
        publish(&hub, &mut last, outcome.update);
        if !leader.is_leader() {
            continue;
        }
        if !write_statuses(&client, &mut objects, &outcome.statuses).await {
            retry = Some(tokio::time::Instant::now() + STATUS_RETRY);
        }
    }
}

/// Starts [`run_with_leader`] on the runtime.
pub fn spawn(
    client: Client,
    hub: Arc<Hub>,
    default: watch::Receiver<Option<PolicyUpdate>>,
    leader: Leader,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run_with_leader(
        client,
        hub,
        default,
        DEFAULT_DEBOUNCE,
        leader,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::crd::{Allowlist, DnsRules, HardCap, VolumeRules};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

    fn object(ns: &str, name: &str, spec: ExfilPolicySpec) -> ExfilPolicy {
        let mut o = ExfilPolicy::new(name, spec);
        o.metadata.namespace = Some(ns.into());
        o.metadata.generation = Some(3);
        o
    }

    fn selecting(labels: &[(&str, &str)]) -> Option<LabelSelector> {
        Some(LabelSelector {
            match_labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect(),
            ),
            match_expressions: None,
        })
    }

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn a_valid_object_becomes_an_override_scoped_to_namespace_and_selector() {
        let spec = ExfilPolicySpec {
            pod_selector: selecting(&[("app", "etl")]),
            action: Some(Action::Lockdown),
            volume: Some(VolumeRules {
                threshold_bytes: Some(5_000_000),
                per_destination_bytes: Some(4_000_000),
                ..Default::default()
            }),
            dns: Some(DnsRules {
                encoded_bytes: Some(1200),
                ..Default::default()
            }),
            allowlist: Some(Allowlist {
                cidrs: vec!["203.0.113.0/24".into()],
                domains: vec![],
            }),
            hard_cap: Some(HardCap {
                bytes: 1 << 30,
                window: "1h".into(),
            }),
            ..Default::default()
        };
        let o = to_override("shop", "etl", &spec).unwrap();
        assert_eq!(
            o,
            PolicyOverride {
                source: "shop/etl".into(),
                namespace: "shop".into(),
                match_labels: [("app".to_string(), "etl".to_string())].into(),
                action: PolicyAction::Lockdown as i32,
                volume_threshold_bytes: 5_000_000,
                per_destination_bytes: 4_000_000,
                dns_encoded_bytes: 1200,
                allow_cidrs: vec!["203.0.113.0/24".into()],
                allow_domains: vec![],
                hard_cap_bytes: 1 << 30,
                hard_cap_window_seconds: 3600,
            }
        );
        // No selector: the whole namespace; nothing set keeps everything.
        let o = to_override("shop", "all", &ExfilPolicySpec::default()).unwrap();
        assert!(o.match_labels.is_empty());
        assert_eq!(
            (o.action, o.volume_threshold_bytes, o.hard_cap_bytes),
            (0, 0, 0)
        );
    }

    #[test]
    fn match_expressions_in_with_one_value_map_others_are_refused() {
        let expr = |key: &str, op: &str, values: &[&str]| LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| (*v).into()).collect()),
        };
        let spec = |exprs| ExfilPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some([("tier".to_string(), "db".to_string())].into()),
                match_expressions: Some(exprs),
            }),
            ..Default::default()
        };
        let o = to_override("shop", "p", &spec(vec![expr("app", "In", &["etl"])])).unwrap();
        assert_eq!(o.match_labels.len(), 2);
        assert_eq!(o.match_labels["app"], "etl");
        let errs = to_override(
            "shop",
            "p",
            &spec(vec![
                expr("app", "NotIn", &["etl"]),
                expr("app", "In", &["a", "b"]),
                expr("tier", "In", &["web"]),
                expr("x", "Exists", &[]),
            ]),
        )
        .unwrap_err();
        let errs: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(errs.len(), 4, "{errs:#?}");
        assert!(
            errs[0]
                .starts_with("pod_selector.matchExpressions[0]: NotIn on \"app\" is not supported")
        );
        assert!(errs[1].starts_with("pod_selector.matchExpressions[1]: In on \"app\""));
        assert!(errs[2].contains("contradicts matchLabels"));
        assert!(errs[3].starts_with("pod_selector.matchExpressions[3]: Exists"));
    }

    #[test]
    fn invalid_and_unsupported_fields_are_named_and_keep_the_object_out() {
        let bad = object(
            "shop",
            "bad",
            ExfilPolicySpec {
                volume: Some(VolumeRules {
                    window: Some("10m".into()),
                    threshold_bytes: Some(0),
                    ..Default::default()
                }),
                allowlist: Some(Allowlist {
                    cidrs: vec!["0.0.0.0/0".into(), "10.0.0.0/33".into()],
                    domains: vec!["backup.example".into()],
                }),
                hard_cap: Some(HardCap {
                    bytes: 10,
                    window: "500ms".into(),
                }),
                update_interval: Some("1m".into()),
                ..Default::default()
            },
        );
        let good = object("shop", "good", ExfilPolicySpec::default());
        let out = reconcile(None, &[bad, good], t(1000));
        assert_eq!(out.update.overrides.len(), 1);
        assert_eq!(out.update.overrides[0].source, "shop/good");
        let s = &out.statuses[&("shop".to_string(), "bad".to_string())];
        assert_eq!(s.valid, Some(false));
        assert_eq!(s.observed_generation, Some(3));
        for field in [
            "volume.threshold_bytes: ",
            "volume.window: cannot be set per pod selector",
            "allowlist.cidrs[0]: \"0.0.0.0/0\" allowlists every address",
            "allowlist.cidrs[1]: ",
            "allowlist.domains: cannot be set per pod selector",
            "hard_cap.window: must be at least 1s",
            "update_interval: cannot be set per pod selector",
        ] {
            assert!(
                s.errors.iter().any(|e| e.starts_with(field)),
                "{field} missing in {:#?}",
                s.errors
            );
        }
        assert_eq!(s.errors.len(), 7, "{:#?}", s.errors);
        let c = &s.conditions[0];
        assert_eq!(
            (c.type_.as_str(), c.status.as_str(), c.reason.as_str()),
            ("Ready", "False", "Invalid")
        );
        assert!(
            c.message
                .starts_with("rejected, not sent to agents (7 errors): volume.threshold_bytes"),
            "{}",
            c.message
        );
        assert_eq!(c.last_transition_time, Time(t(1000)));
        let s = &out.statuses[&("shop".to_string(), "good".to_string())];
        assert_eq!(s.valid, Some(true));
        assert!(s.errors.is_empty());
        assert_eq!(s.conditions[0].status, "True");
    }

    #[test]
    fn overrides_are_ordered_by_namespace_specificity_and_name() {
        let objs = vec![
            object(
                "shop",
                "zz-etl-db",
                ExfilPolicySpec {
                    pod_selector: selecting(&[("app", "etl"), ("tier", "db")]),
                    ..Default::default()
                },
            ),
            object("shop", "aa-all", ExfilPolicySpec::default()),
            object(
                "batch",
                "b",
                ExfilPolicySpec {
                    pod_selector: selecting(&[("app", "x")]),
                    ..Default::default()
                },
            ),
            object(
                "shop",
                "mm-etl",
                ExfilPolicySpec {
                    pod_selector: selecting(&[("app", "etl")]),
                    ..Default::default()
                },
            ),
            object(
                "shop",
                "bb-web",
                ExfilPolicySpec {
                    pod_selector: selecting(&[("app", "web")]),
                    ..Default::default()
                },
            ),
        ];
        let order = |objs: &[ExfilPolicy]| -> Vec<String> {
            reconcile(None, objs, t(1))
                .update
                .overrides
                .into_iter()
                .map(|o| o.source)
                .collect()
        };
        let want = [
            "batch/b",
            "shop/zz-etl-db",
            "shop/bb-web",
            "shop/mm-etl",
            "shop/aa-all",
        ];
        assert_eq!(order(&objs), want);
        // Input order does not matter.
        let mut rev = objs.clone();
        rev.reverse();
        assert_eq!(order(&rev), want);
    }

    #[test]
    fn the_default_carries_through_and_overrides_go_on_top() {
        let default = PolicyUpdate {
            version: 77,
            volume_threshold_bytes: 100_000_000,
            volume_window_seconds: 600,
            action: PolicyAction::Alert as i32,
            allow_domains: vec!["backup.example".into()],
            ..Default::default()
        };
        let objs = [object(
            "shop",
            "p",
            ExfilPolicySpec {
                action: Some(Action::DryRun),
                ..Default::default()
            },
        )];
        let out = reconcile(Some(&default), &objs, t(1));
        assert_eq!(out.update.version, 0, "the caller numbers it");
        assert_eq!(out.update.volume_threshold_bytes, 100_000_000);
        assert_eq!(out.update.allow_domains, vec!["backup.example".to_string()]);
        assert_eq!(out.update.overrides.len(), 1);
        assert_eq!(out.update.overrides[0].action, PolicyAction::DryRun as i32);
        // No default, no objects: nothing to say.
        assert_eq!(reconcile(None, &[], t(1)).update, PolicyUpdate::default());
    }

    #[test]
    fn transition_time_is_kept_while_ready_does_not_flip() {
        let mut o = object("shop", "p", ExfilPolicySpec::default());
        let first = reconcile(None, std::slice::from_ref(&o), t(100)).statuses;
        let s = first.values().next().unwrap().clone();
        o.status = Some(s.clone());
        let again = reconcile(None, std::slice::from_ref(&o), t(200)).statuses;
        let s2 = again.values().next().unwrap();
        assert_eq!(s2.conditions[0].last_transition_time, Time(t(100)));
        assert!(same_status(&s, s2));
        // Made invalid: the condition flips, with the new time.
        o.spec.update_interval = Some("1m".into());
        o.metadata.generation = Some(4);
        let flipped = reconcile(None, std::slice::from_ref(&o), t(300)).statuses;
        let s3 = flipped.values().next().unwrap();
        assert_eq!(s3.conditions[0].last_transition_time, Time(t(300)));
        assert_eq!(s3.observed_generation, Some(4));
        assert!(!same_status(&s, s3));
    }

    #[test]
    fn the_committed_examples_are_valid() {
        use serde::Deserialize as _;
        let text = include_str!("../../../deploy/examples/exfilpolicy.yaml");
        let mut objs = Vec::new();
        for doc in serde_norway::Deserializer::from_str(text) {
            let v = serde_json::Value::deserialize(doc).unwrap();
            if !v.is_null() {
                objs.push(serde_json::from_value::<ExfilPolicy>(v).unwrap());
            }
        }
        assert_eq!(objs.len(), 2);
        let out = reconcile(None, &objs, t(1));
        for (k, s) in &out.statuses {
            assert_eq!(s.valid, Some(true), "{k:?}: {:?}", s.errors);
        }
        let sources: Vec<&str> = out
            .update
            .overrides
            .iter()
            .map(|o| o.source.as_str())
            .collect();
        assert_eq!(sources, ["shop/etl-export", "shop/shop-default"]);
    }

    #[test]
    fn publish_pushes_only_changes_with_a_rising_version() {
        let hub = Hub::new(4);
        let (_reg, mut rx) = hub.register("node-a").unwrap();
        let mut last = None;
        assert_eq!(publish(&hub, &mut last, PolicyUpdate::default()), None);
        let u = PolicyUpdate {
            volume_threshold_bytes: 5,
            ..Default::default()
        };
        let v1 = publish(&hub, &mut last, u.clone()).unwrap();
        assert!(
            matches!(rx.try_recv(), Ok(exfilguard_proto::v1::controller_message::Payload::PolicyUpdate(p)) if p.version == v1)
        );
        assert_eq!(publish(&hub, &mut last, u), None);
        assert!(rx.try_recv().is_err());
        // Back to nothing: still pushed, so agents drop the overrides.
        let v2 = publish(&hub, &mut last, PolicyUpdate::default()).unwrap();
        assert!(v2 > v1);
        assert!(rx.try_recv().is_ok());
    }
}
