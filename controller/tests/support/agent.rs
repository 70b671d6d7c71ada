//! A test agent: a real gRPC stream to a controller on 127.0.0.1 that says
//! Hello, sends critical volume detections and reads the commands back.

use std::{net::SocketAddr, time::Duration};

use exfilguard_proto::v1::{
    AgentMessage, Block, ControllerMessage, Detection, DetectionKind, Evidence, Hello, Severity,
    Workload, agent_gateway_client::AgentGatewayClient, agent_message, controller_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Streaming, transport::Channel};

/// How long a command may take to arrive.
const WAIT: Duration = Duration::from_secs(20);

/// A channel to the controller at `addr`, retried while it starts.
pub async fn channel(addr: SocketAddr) -> Channel {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5));
    for _ in 0..50 {
        if let Ok(ch) = endpoint.connect().await {
            return ch;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("controller at {addr} did not come up");
}

/// One agent's stream.
pub struct TestAgent {
    tx: mpsc::Sender<AgentMessage>,
    rx: Streaming<ControllerMessage>,
}

impl TestAgent {
    /// Opens the stream as node `node`.
    pub async fn connect(channel: Channel, node: &str) -> TestAgent {
        let (tx, out) = mpsc::channel(16);
        tx.send(AgentMessage {
            payload: Some(agent_message::Payload::Hello(Hello {
                node_name: node.into(),
                agent_version: "test".into(),
                ..Default::default()
            })),
            ..Default::default()
        })
        .await
        .unwrap();
        let rx = AgentGatewayClient::new(channel)
            .connect(ReceiverStream::new(out))
            .await
            .unwrap()
            .into_inner();
        TestAgent { tx, rx }
    }

    /// Sends a critical volume detection (150 MB out) of `workload` as
    /// message `seq`, episode `det-<seq>`.
    pub async fn detect(&self, seq: u64, workload: Workload) {
        let msg = AgentMessage {
            seq,
            sent_at_unix_ms: 1,
            payload: Some(agent_message::Payload::Detection(Detection {
                detection_id: format!("det-{seq}"),
                kind: DetectionKind::Volume as i32,
                severity: Severity::Critical as i32,
                workload: Some(workload),
                summary: "150 MB to 203.0.113.7:443 in 10 min".into(),
                bytes_estimate: 150_000_000,
                window_seconds: 600,
                threshold: 100_000_000,
                evidence: Some(Evidence::default()),
                ..Default::default()
            })),
        };
        self.tx.send(msg).await.unwrap();
    }

    /// The next command other than Welcome, PolicyUpdate and Ack.
    pub async fn command(&mut self) -> controller_message::Payload {
        loop {
            let msg = tokio::time::timeout(WAIT, self.rx.message())
                .await
                .expect("a command in time")
                .expect("stream ok")
                .expect("stream open");
            match msg.payload {
                Some(
                    controller_message::Payload::Welcome(_)
                    | controller_message::Payload::Ack(_)
                    | controller_message::Payload::PolicyUpdate(_),
                )
                | None => continue,
                Some(other) => return other,
            }
        }
    }

    /// The next command, which must be a Block.
    pub async fn block(&mut self) -> Block {
        match self.command().await {
            controller_message::Payload::Block(b) => b,
            other => panic!("expected a Block, got {other:?}"),
        }
    }
}
