//! A real API server for the tests, when `KUBECONFIG` is set, and a
//! namespace of the test's own on it.

use kube::Client;
use serde_json::json;

/// The real API server, when `KUBECONFIG` is set: `None` (and a printed
/// reason) otherwise.
pub async fn real_cluster(test: &str) -> Option<Client> {
    if std::env::var_os("KUBECONFIG").is_none_or(|v| v.is_empty()) {
        // Straight to the stream, past the test harness's capture, so the
        // skip shows in a normal `cargo test` run.
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: KUBECONFIG is not set (set it to run against a real API server)"
        );
        return None;
    }
    Some(
        Client::try_default()
            .await
            .unwrap_or_else(|e| panic!("KUBECONFIG is set but no client: {e}")),
    )
}

/// A namespace of the test's own, deleted on drop even when the test fails.
pub struct TestNamespace {
    client: Client,
    /// Its name.
    pub name: String,
}

impl TestNamespace {
    /// Creates a namespace with a unique name.
    pub async fn create(client: &Client) -> Self {
        use k8s_openapi::api::core::v1::Namespace;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!("exfilguard-test-{}-{nanos}", std::process::id());
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        kube::Api::<Namespace>::all(client.clone())
            .create(&Default::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        Self {
            client: client.clone(),
            name,
        }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        use k8s_openapi::api::core::v1::Namespace;
        let (client, name) = (self.client.clone(), self.name.clone());
        // Drop cannot await: delete from a thread with its own runtime.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                kube::Api::<Namespace>::all(client)
                    .delete(&name, &Default::default())
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("delete namespace {name}: {e}"))
            })
        })
        .join();
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("cleanup: {e}"),
            Err(_) => eprintln!("cleanup thread panicked"),
        }
    }
}

/// A pod labelled `app: web` running the pause image: two of them are two
/// replicas of one workload.
pub fn web_pod(name: &str) -> k8s_openapi::api::core::v1::Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}]},
    }))
    .unwrap()
}
