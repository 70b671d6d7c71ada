//! Attribution: cgroup id → cgroup path → pod UID and container id.
//!
//! A cgroup v2 id is the inode of its directory, so the path is found by
//! walking the cgroup mount and cached by inode. The kubelet names pod and
//! container cgroups differently per cgroup driver:
//! - systemd: `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`
//!   (uid with `_` for `-`; `crio-<id>.scope` for CRI-O, `docker-<id>.scope`);
//! - cgroupfs: `kubepods/burstable/pod<uid>/<id>`.
//!
//! With a [`PodCache`] (the Pod watch, [`crate::pods`]) a pod's workload is
//! `<namespace>/<pod>` with its labels and owner; until the watch knows the
//! UID it is `pod/<uid>`, and outside Kubernetes the cgroup path. Unknown
//! cgroups are `unattributed/<id>`: counted, never dropped.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::{
    pods::{PodCache, PodInfo},
    policy::WorkloadMeta,
};

/// Quality-of-service class of a pod, from its cgroup path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QosClass {
    /// `guaranteed` (directly under `kubepods`).
    Guaranteed,
    /// `burstable`.
    Burstable,
    /// `besteffort`.
    BestEffort,
}

/// What a kubepods cgroup path says about the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroup {
    /// Pod UID in its canonical form (`-` separated).
    pub pod_uid: String,
    /// Container id (64 hex digits) when the path reaches a container.
    pub container_id: Option<String>,
    /// Runtime named by the scope prefix (`containerd`, `crio`, `docker`).
    pub runtime: Option<String>,
    /// QoS class.
    pub qos: QosClass,
}

fn is_uid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        })
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Parses a cgroup path (absolute or relative to the cgroup mount) written
/// by either kubelet cgroup driver. `None` for anything else.
pub fn parse_kubepods_path(path: &str) -> Option<PodCgroup> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let start = parts
        .iter()
        .position(|p| *p == "kubepods.slice" || *p == "kubepods")?;
    let rest = &parts[start + 1..];
    if parts[start] == "kubepods.slice" {
        // systemd driver: the pod slice repeats its parents' names.
        let mut qos = QosClass::Guaranteed;
        for (i, p) in rest.iter().enumerate() {
            let Some(stem) = p.strip_suffix(".slice") else {
                continue;
            };
            if stem == "kubepods-burstable" {
                qos = QosClass::Burstable;
                continue;
            }
            if stem == "kubepods-besteffort" {
                qos = QosClass::BestEffort;
                continue;
            }
            let pod = stem.rsplit_once("-pod")?.1;
            let uid = pod.replace('_', "-");
            if !is_uid(&uid) {
                return None;
            }
            let (runtime, container_id) = match rest.get(i + 1) {
                Some(scope) => match parse_scope(scope) {
                    Some((r, id)) => (Some(r), Some(id)),
                    None => (None, None),
                },
                None => (None, None),
            };
            return Some(PodCgroup {
                pod_uid: uid,
                container_id,
                runtime,
                qos,
            });
        }
        None
    } else {
        // cgroupfs driver.
        let (qos, rest) = match rest.first() {
            Some(&"burstable") => (QosClass::Burstable, &rest[1..]),
            Some(&"besteffort") => (QosClass::BestEffort, &rest[1..]),
            _ => (QosClass::Guaranteed, rest),
        };
        let uid = rest.first()?.strip_prefix("pod")?;
        if !is_uid(uid) {
            return None;
        }
        let container_id = rest
            .get(1)
            .map(|c| c.rsplit_once('-').map_or(*c, |(_, id)| id))
            .filter(|c| is_container_id(c))
            .map(str::to_owned);
        Some(PodCgroup {
            pod_uid: uid.to_owned(),
            container_id,
            runtime: None,
            qos,
        })
    }
}

/// `cri-containerd-<id>.scope` → (`containerd`, id); `crio-<id>.scope`,
/// `docker-<id>.scope` likewise.
fn parse_scope(scope: &str) -> Option<(String, String)> {
    let stem = scope.strip_suffix(".scope")?;
    let (prefix, id) = stem.rsplit_once('-')?;
    if !is_container_id(id) {
        return None;
    }
    let runtime = prefix.strip_prefix("cri-").unwrap_or(prefix);
    Some((runtime.to_owned(), id.to_owned()))
}

/// A resolved workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// The identity detections name: `<namespace>/<pod>` once the Pod watch
    /// knows the pod, `pod/<uid>` before, the cgroup path outside
    /// Kubernetes, or `unattributed/<cgroup id>`.
    pub id: String,
    /// The cgroup path, when found.
    pub cgroup_path: Option<PathBuf>,
    /// Pod details, for pods.
    pub pod: Option<PodCgroup>,
    /// Namespace and labels for policy overrides (empty until the Pod watch).
    pub meta: WorkloadMeta,
    /// What the Pod watch knows (owner, node, images), once it knows it.
    pub pod_info: Option<Arc<PodInfo>>,
}

impl Workload {
    /// The container this cgroup belongs to, when the path names one and
    /// the Pod watch has reported it.
    pub fn container(&self) -> Option<&crate::pods::ContainerInfo> {
        let id = self.pod.as_ref()?.container_id.as_deref()?;
        self.pod_info.as_ref()?.container(id)
    }

    /// The stream's `Workload` message for this workload (cgroup `cgroup_id`
    /// below the mount `cgroup_root`): namespace, pod, container, owner and
    /// labels when the Pod watch knows the pod; the cgroup path (relative to
    /// the mount, as the contract says) always.
    pub fn to_proto(&self, cgroup_id: u64, cgroup_root: &Path) -> exfilguard_proto::v1::Workload {
        let info = self.pod_info.as_deref();
        let owner = info.and_then(|p| p.owner.as_ref());
        exfilguard_proto::v1::Workload {
            namespace: info.map(|p| p.namespace.clone()).unwrap_or_default(),
            pod: info.map(|p| p.name.clone()).unwrap_or_default(),
            container: self.container().map(|c| c.name.clone()).unwrap_or_default(),
            cgroup_path: self
                .cgroup_path
                .as_ref()
                .map(|p| {
                    let rel = p.strip_prefix(cgroup_root).unwrap_or(p);
                    format!("/{}", rel.display())
                })
                .unwrap_or_default(),
            cgroup_id,
            owner_kind: owner.map(|o| o.kind.clone()).unwrap_or_default(),
            owner_name: owner.map(|o| o.name.clone()).unwrap_or_default(),
            labels: info
                .map(|p| p.labels.clone().into_iter().collect())
                .unwrap_or_default(),
        }
    }

    /// Names the workload after `info` (namespace/name, labels). The name
    /// is set once: a pod's namespace and name never change for its UID,
    /// so detector state keyed by it stays whole; labels follow edits.
    fn attribute(&mut self, info: Arc<PodInfo>) {
        self.id = format!("{}/{}", info.namespace, info.name);
        self.meta = WorkloadMeta {
            namespace: Some(info.namespace.clone()),
            labels: info.labels.clone(),
        };
        self.pod_info = Some(info);
    }
}

/// Maps cgroup ids to workloads, walking the cgroup mount on a miss.
#[derive(Debug)]
pub struct Resolver {
    root: PathBuf,
    /// Boxed: a map slot is 16 bytes, not the 192 of a workload, so the
    /// table's empty slots cost little.
    cache: HashMap<u64, Box<Workload>>,
    /// Ids not found in the last walk; retried after the next walk only.
    walks: u64,
    pods: Option<PodCache>,
}

/// Upper bound on directories visited per walk, so a huge or looping tree
/// cannot stall the poll loop.
const MAX_WALK: usize = 200_000;

impl Resolver {
    /// Resolves below `root` (the cgroup v2 mount, `/sys/fs/cgroup`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            cache: HashMap::new(),
            walks: 0,
            pods: None,
        }
    }

    /// Names pod workloads from `pods` (the Pod watch's cache) from now on.
    pub fn set_pods(&mut self, pods: PodCache) {
        self.pods = Some(pods);
    }

    /// Walks done so far (for the metrics and tests).
    pub fn walks(&self) -> u64 {
        self.walks
    }

    /// The workload of `cgroup_id`. A miss walks the tree once; a cgroup
    /// still not found is `unattributed/<id>` (cached, so a flood of unknown
    /// ids does not walk every time; `forget` clears it).
    pub fn resolve(&mut self, cgroup_id: u64) -> &Workload {
        if !self.cache.contains_key(&cgroup_id) {
            self.walk(cgroup_id);
            self.cache.entry(cgroup_id).or_insert_with(|| {
                Box::new(Workload {
                    id: format!("unattributed/{cgroup_id}"),
                    cgroup_path: None,
                    pod: None,
                    meta: WorkloadMeta::default(),
                    pod_info: None,
                })
            });
        }
        let w = self.cache.get_mut(&cgroup_id).expect("inserted above");
        if let (Some(pods), Some(pod)) = (&self.pods, &w.pod) {
            // One map lookup per call; the entry changes only when the pod
            // object did. A pod that left the cache (deleted) keeps its last
            // name for the flows still draining from its cgroup.
            if let Some(info) = pods.get(&pod.pod_uid)
                && w.pod_info
                    .as_ref()
                    .is_none_or(|old| !Arc::ptr_eq(old, &info))
            {
                w.attribute(info);
            }
        }
        w
    }

    /// Drops cached entries (e.g. unattributed ones, to retry them).
    pub fn forget_unattributed(&mut self) {
        self.cache.retain(|_, w| w.cgroup_path.is_some());
    }

    /// Walks the tree, caching every leaf cgroup and `target`. Leaves are
    /// where processes live (cgroup v2 keeps them out of inner cgroups
    /// with controllers: the kubelet's pod and QoS slices), so one walk
    /// still answers the ids a node reports, without holding a workload
    /// for every slice above them (a third of the cache with 10,000 pods).
    /// An inner cgroup asked for is found and cached by its own walk.
    fn walk(&mut self, target: u64) {
        self.walks += 1;
        let mut stack = vec![self.root.clone()];
        let mut seen = 0;
        while let Some(dir) = stack.pop() {
            seen += 1;
            if seen > MAX_WALK {
                tracing::warn!(root = %self.root.display(), "cgroup walk stopped at {MAX_WALK} directories");
                break;
            }
            let Ok(id) = crate::datapath::cgroup_id(&dir) else {
                continue;
            };
            let children = stack.len();
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(e.path());
                    }
                }
            }
            if stack.len() == children || id == target {
                self.cache
                    .entry(id)
                    .or_insert_with(|| Box::new(workload_for(&self.root, &dir)));
            }
        }
    }
}

/// The workload a cgroup directory stands for.
pub fn workload_for(root: &Path, dir: &Path) -> Workload {
    let rel = dir.strip_prefix(root).unwrap_or(dir);
    let rel_s = format!("/{}", rel.display());
    let pod = parse_kubepods_path(&rel_s);
    let id = match &pod {
        Some(p) => format!("pod/{}", p.pod_uid),
        None => rel_s,
    };
    Workload {
        id,
        cgroup_path: Some(dir.to_owned()),
        pod,
        meta: WorkloadMeta::default(),
        pod_info: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f5e8a8c-3b1c-4c3e-9b7a-2d4e6f8a0b1c";
    const CID: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904a1b2c3d4e5f6a7b8c9d0e1f2";

    #[test]
    fn systemd_containerd_burstable() {
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope",
            UID.replace('-', "_")
        );
        assert_eq!(
            parse_kubepods_path(&p),
            Some(PodCgroup {
                pod_uid: UID.into(),
                container_id: Some(CID.into()),
                runtime: Some("containerd".into()),
                qos: QosClass::Burstable,
            })
        );
    }

    #[test]
    fn systemd_crio_guaranteed_and_pod_level() {
        let uid = UID.replace('-', "_");
        let p = format!("/kubepods.slice/kubepods-pod{uid}.slice/crio-{CID}.scope");
        let got = parse_kubepods_path(&p).unwrap();
        assert_eq!(got.runtime.as_deref(), Some("crio"));
        assert_eq!(got.qos, QosClass::Guaranteed);
        // The pod slice itself (the sandbox's parent): no container.
        let p =
            format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice");
        let got = parse_kubepods_path(&p).unwrap();
        assert_eq!((got.container_id, got.qos), (None, QosClass::BestEffort));
    }

    #[test]
    fn cgroupfs_layouts() {
        let p = format!("/kubepods/burstable/pod{UID}/{CID}");
        let got = parse_kubepods_path(&p).unwrap();
        assert_eq!(got.pod_uid, UID);
        assert_eq!(got.container_id.as_deref(), Some(CID));
        assert_eq!(got.qos, QosClass::Burstable);
        let p = format!("/kubepods/pod{UID}/crio-{CID}");
        let got = parse_kubepods_path(&p).unwrap();
        assert_eq!(
            (got.qos, got.container_id.as_deref()),
            (QosClass::Guaranteed, Some(CID))
        );
        // Nested under a node-level parent (kind, k3s).
        let p = format!("/kubelet.slice/kubelet-kubepods.slice/x/kubepods/besteffort/pod{UID}");
        assert_eq!(parse_kubepods_path(&p).unwrap().qos, QosClass::BestEffort);
    }

    #[test]
    fn not_pods() {
        for p in [
            "/",
            "/system.slice/sshd.service",
            "/user.slice/user-0.slice/session-1.scope",
            "/kubepods",
            "/kubepods.slice/kubepods-burstable.slice",
            "/kubepods/burstable/podnot-a-uid/abc",
            "/kubepods.slice/kubepods-podzz.slice",
        ] {
            assert_eq!(parse_kubepods_path(p), None, "{p}");
        }
    }

    #[test]
    fn resolves_by_walking_a_tree_and_caches() {
        // Directory inodes stand in for cgroup ids: the same lookup the
        // kernel's cgroup ids get on cgroupfs v2.
        let root = std::env::temp_dir().join(format!("exfilguard-attr-{}", std::process::id()));
        let pod = root.join(format!("kubepods/burstable/pod{UID}/{CID}"));
        let other = root.join("system.slice/cron.service");
        std::fs::create_dir_all(&pod).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        let mut r = Resolver::new(&root);
        let id = crate::datapath::cgroup_id(&pod).unwrap();
        assert_eq!(r.resolve(id).id, format!("pod/{UID}"));
        let oid = crate::datapath::cgroup_id(&other).unwrap();
        assert_eq!(r.resolve(oid).id, "/system.slice/cron.service");
        assert_eq!(r.walks(), 1, "second lookup served from the cache");
        assert_eq!(r.resolve(u64::MAX).id, format!("unattributed/{}", u64::MAX));
        assert_eq!(r.walks(), 2);
        r.resolve(u64::MAX);
        assert_eq!(r.walks(), 2, "unknown ids are cached too");
        // Inner cgroups (the pod's own cgroup above its container) are not
        // cached by walks for others; asked for, one walk finds them.
        let parent = pod.parent().unwrap();
        let pid = crate::datapath::cgroup_id(parent).unwrap();
        assert!(!r.cache.contains_key(&pid), "inner cgroup cached ahead");
        assert_eq!(r.resolve(pid).id, format!("pod/{UID}"));
        assert_eq!(r.resolve(pid).cgroup_path.as_deref(), Some(parent));
        assert_eq!(r.walks(), 3);
        r.resolve(pid);
        assert_eq!(r.walks(), 3, "then served from the cache");
        std::fs::remove_dir_all(&root).unwrap();
    }

    fn pod_event(
        labels: serde_json::Value,
    ) -> kube::runtime::watcher::Event<k8s_openapi::api::core::v1::Pod> {
        kube::runtime::watcher::Event::Apply(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "etl-0", "namespace": "data", "uid": UID, "labels": labels,
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet",
                        "name": "etl", "uid": "u", "controller": true}]},
                "spec": {"nodeName": "n1", "containers": [{"name": "etl", "image": "etl:1"}]},
                "status": {"containerStatuses": [{"name": "etl", "image": "etl:1",
                    "imageID": "registry/etl@sha256:bb", "containerID": format!("containerd://{CID}"),
                    "ready": true, "restartCount": 0}]},
            }))
            .unwrap(),
        )
    }

    #[test]
    fn pods_from_the_watch_name_workloads() {
        let root =
            std::env::temp_dir().join(format!("exfilguard-attr-pods-{}", std::process::id()));
        let dir = root.join(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope",
            UID.replace('-', "_")
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let id = crate::datapath::cgroup_id(&dir).unwrap();
        let pods = PodCache::new();
        let mut r = Resolver::new(&root);
        r.set_pods(pods.clone());
        // Not known to the watch yet: named by UID, still counted.
        assert_eq!(r.resolve(id).id, format!("pod/{UID}"));
        pods.apply(pod_event(serde_json::json!({"app": "etl"})));
        let w = r.resolve(id).clone();
        assert_eq!(w.id, "data/etl-0");
        assert_eq!(w.meta.namespace.as_deref(), Some("data"));
        assert_eq!(w.meta.labels["app"], "etl");
        let info = w.pod_info.as_ref().unwrap();
        assert_eq!(info.owner.as_ref().unwrap().name, "etl");
        let c = w.container().unwrap();
        assert_eq!(
            (c.name.as_str(), c.image_id.as_str()),
            ("etl", "registry/etl@sha256:bb")
        );
        let msg = w.to_proto(id, &root);
        assert_eq!(
            (
                msg.namespace.as_str(),
                msg.pod.as_str(),
                msg.container.as_str()
            ),
            ("data", "etl-0", "etl")
        );
        assert_eq!(
            (msg.owner_kind.as_str(), msg.owner_name.as_str()),
            ("StatefulSet", "etl")
        );
        assert_eq!((msg.cgroup_id, msg.labels["app"].as_str()), (id, "etl"));
        assert!(
            msg.cgroup_path.starts_with("/kubepods.slice/") && msg.cgroup_path.ends_with(".scope"),
            "{}",
            msg.cgroup_path
        );
        // A label edit reaches policy matching.
        pods.apply(pod_event(
            serde_json::json!({"app": "etl", "tier": "batch"}),
        ));
        assert_eq!(r.resolve(id).meta.labels["tier"], "batch");
        // Deleted pod: the last name stays for the flows still draining.
        pods.apply(match pod_event(serde_json::json!({})) {
            kube::runtime::watcher::Event::Apply(p) => kube::runtime::watcher::Event::Delete(p),
            _ => unreachable!(),
        });
        assert_eq!(r.resolve(id).id, "data/etl-0");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
