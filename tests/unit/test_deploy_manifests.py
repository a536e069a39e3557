"""deploy/k8s: the manifests are not run here (docs/scale-out.md says so), but they parse
and say what the doc says: replicas named by their pods, ready by the gRPC health
service; Envoy hashing x-session-id onto a RING_HASH of them over HTTP/2, health-checked
by gRPC; the shim pointed at Envoy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


def _documents(name: str) -> dict[str, Any]:
    """The file's documents by kind (one of each kind per file)."""
    return {doc["kind"]: doc for doc in yaml.safe_load_all((K8S / name).read_text())}


def test_replicas_report_their_pod_name_and_are_ready_by_grpc_health() -> None:
    docs = _documents("replicas.yaml")
    assert docs["Service"]["spec"]["clusterIP"] == "None"
    [container] = docs["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    assert "--replica-id=$(POD_NAME)" in container["args"]
    assert container["readinessProbe"]["grpc"]["port"] == 50051
    # The pod outlives the drain (the kubelet killed it as the drain ended), and is scraped.
    grace = next(int(a.split("=")[1]) for a in container["args"] if a.startswith("--grace-s="))
    assert docs["StatefulSet"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace
    assert "--metrics-port=9400" in container["args"]


def test_envoy_hashes_the_session_header_onto_a_ring_of_replicas() -> None:
    envoy = yaml.safe_load(_documents("envoy.yaml")["ConfigMap"]["data"]["envoy.yaml"])
    [listener] = envoy["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    [route] = manager["route_config"]["virtual_hosts"][0]["routes"]
    assert route["route"]["hash_policy"] == [{"header": {"header_name": "x-session-id"}}]
    [cluster] = envoy["static_resources"]["clusters"]
    assert cluster["lb_policy"] == "RING_HASH" and route["route"]["cluster"] == cluster["name"]
    options = cluster["typed_extension_protocol_options"]
    assert "http2_protocol_options" in str(options)
    assert cluster["health_checks"][0]["grpc_health_check"] == {}
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert address["address"]["socket_address"]["address"] == "salience-replicas"


def test_the_shim_goes_through_envoy() -> None:
    docs = _documents("shim.yaml")
    [container] = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert "--target=salience:50050" in container["args"]
