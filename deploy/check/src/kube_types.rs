//! Each manifest deserialized into its k8s-openapi type and serialized back:
//! a wrong type fails the first step, and a misspelt or unknown field (which
//! serde ignores) shows up as a difference after the second.
use serde::{Serialize, de::DeserializeOwned};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{ConfigMap, Namespace, PersistentVolumeClaim, Secret, Service, ServiceAccount},
        networking::v1::NetworkPolicy,
        policy::v1::PodDisruptionBudget,
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};

use crate::{CheckError, docs::Doc};

/// Checks `doc` against the type its `apiVersion` and `kind` name. Kinds the
/// checker does not know are an error (add them here), not a pass.
pub fn check(doc: &Doc) -> Result<(), CheckError> {
    match (doc.api_version(), doc.kind()) {
        ("v1", "Namespace") => round_trip::<Namespace>(doc),
        ("v1", "ConfigMap") => round_trip::<ConfigMap>(doc),
        ("v1", "Secret") => round_trip::<Secret>(doc),
        ("v1", "Service") => round_trip::<Service>(doc),
        ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(doc),
        ("v1", "PersistentVolumeClaim") => round_trip::<PersistentVolumeClaim>(doc),
        ("apps/v1", "DaemonSet") => round_trip::<DaemonSet>(doc),
        ("apps/v1", "Deployment") => round_trip::<Deployment>(doc),
        ("networking.k8s.io/v1", "NetworkPolicy") => round_trip::<NetworkPolicy>(doc),
        ("policy/v1", "PodDisruptionBudget") => round_trip::<PodDisruptionBudget>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<ClusterRole>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            round_trip::<ClusterRoleBinding>(doc)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<Role>(doc),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => round_trip::<RoleBinding>(doc),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            round_trip::<CustomResourceDefinition>(doc)
        }
        (api, kind) => Err(CheckError::invalid(
            &doc.origin,
            format!("no Kubernetes type known for apiVersion {api:?} kind {kind:?}"),
        )),
    }
}

/// Deserializes `doc` into `T`, serializes it back, and compares.
pub fn round_trip<T: DeserializeOwned + Serialize>(doc: &Doc) -> Result<(), CheckError> {
    let typed: T = serde_json::from_value(doc.value.clone()).map_err(|e| {
        CheckError::invalid(format!("{} ({})", doc.origin, doc.key()), e.to_string())
    })?;
    let back = serde_json::to_value(&typed)
        .map_err(|e| CheckError::invalid(&doc.origin, format!("serializing back: {e}")))?;
    let diffs = crate::docs::differences(&doc.value, &back);
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(CheckError::invalid(
            format!("{} ({})", doc.origin, doc.key()),
            diffs.join("\n  "),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(yaml: &str) -> Doc {
        crate::docs::parse(yaml, "t").unwrap().remove(0)
    }

    #[test]
    fn a_valid_object_passes() {
        check(&doc(
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports: [{port: 80, targetPort: http}]\n",
        ))
        .unwrap();
    }

    #[test]
    fn misspelt_fields_wrong_types_and_unknown_kinds_fail() {
        let err = check(&doc(
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  prots: [{port: 80}]\n",
        ))
        .unwrap_err();
        assert!(
            err.to_string().contains(".spec.prots: present in the file"),
            "{err}"
        );
        let err = check(&doc(
            "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: d}\nspec:\n  selector: {}\n  template:\n    spec:\n      containers: [{name: a, ports: [{containerPort: \"9464\"}]}]\n",
        ))
        .unwrap_err();
        assert!(err.to_string().contains("invalid type"), "{err}");
        let err = check(&doc("apiVersion: v9\nkind: Thing\nmetadata: {name: x}\n")).unwrap_err();
        assert!(
            err.to_string().contains("no Kubernetes type known"),
            "{err}"
        );
    }
}
