#!/usr/bin/env python3
"""A gRPC client that is not ours: discovers exfilguard's services through
server reflection, checks health, and lists incidents using only what
reflection told it (no generated code, no .proto files).

Usage: generic_client.py ENDPOINT CA CERT KEY
Exits 0 and prints a summary on success; non-zero with the reason otherwise.
Needs grpcio, grpcio-reflection and grpcio-health-checking (PyPI).
"""

import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main() -> int:
    endpoint, ca, cert, key = sys.argv[1:5]
    with open(ca, "rb") as f:
        root = f.read()
    with open(cert, "rb") as f:
        chain = f.read()
    with open(key, "rb") as f:
        private = f.read()
    creds = grpc.ssl_channel_credentials(
        root_certificates=root, private_key=private, certificate_chain=chain
    )
    channel = grpc.secure_channel(
        endpoint, creds, options=[("grpc.ssl_target_name_override", "localhost")]
    )
    grpc.channel_ready_future(channel).result(timeout=10)

    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    wanted = {"exfilguard.v1.Incidents", "exfilguard.v1.AgentGateway", "grpc.health.v1.Health"}
    missing = wanted - services
    if missing:
        print(f"reflection does not list {sorted(missing)}; it lists {sorted(services)}")
        return 1

    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "exfilguard.v1.Incidents"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        if status != health_pb2.HealthCheckResponse.SERVING:
            print(f"health of {service!r} is {status}")
            return 1

    pool = descriptor_pool.DescriptorPool(db)
    method = pool.FindServiceByName("exfilguard.v1.Incidents").FindMethodByName("ListIncidents")
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    list_incidents = channel.unary_unary(
        "/exfilguard.v1.Incidents/ListIncidents",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_cls.FromString,
    )
    response = list_incidents(request_cls(page_size=10), timeout=10)
    incidents = json_format.MessageToDict(response).get("incidents", [])
    if not incidents or not all(i["id"].startswith("EXFIL-") for i in incidents):
        print(f"unexpected incidents: {incidents}")
        return 1
    print(f"OK services={sorted(services)} incidents={[i['id'] for i in incidents]} "
          f"first_state={incidents[0].get('state')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
