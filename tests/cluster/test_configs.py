"""The shipped cluster files: Ray launcher files validate against the schema inside the installed
ray package, KubeRay manifests parse and ask for the right accelerators, every file has a rayq
sibling (`*.rayq.yaml`) that resolves into a valid cluster section, nothing exposes the Ray
dashboard (8265), Ray Client (10001) or GCS (6379) ports to the public internet, KubeRay clusters
pin the dashboard host and admit only their own pods, and GCP nodes run as dedicated service
accounts with narrow scopes."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[2] / "cluster" / "configs"
LAUNCHERS = ["gcp-gpu.yaml", "gcp-tpu.yaml", "aws-gpu.yaml"]
MANIFESTS = ["kuberay-gpu.yaml", "kuberay-tpu.yaml"]
RAY_PORTS = {6379, 8265, 10001}


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads(Path(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json").read_text())


def load(name: str):
    return yaml.safe_load((CONFIGS / name).read_text())


def rayq_sibling(name: str) -> Path:
    return CONFIGS / name.replace(".yaml", ".rayq.yaml")


def test_the_shipped_set_is_complete():
    shipped = sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.endswith(".rayq.yaml"))
    assert shipped == sorted(LAUNCHERS + MANIFESTS)
    for name in LAUNCHERS + MANIFESTS:
        assert rayq_sibling(name).is_file(), f"{name}: no {rayq_sibling(name).name}"


# ----------------------------------------------------------------------------- Ray launcher files


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_validates_against_rays_schema(name, ray_schema):
    import jsonschema

    jsonschema.validate(load(name), ray_schema)
    # and the way `ray up` sees it: defaults of the provider filled in, then validated again
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load(name)))


def test_rays_schema_rejects_a_rayq_top_level_key(ray_schema):
    """Why the rayq section lives in a sibling file instead of a `rayq:` key."""
    import jsonschema

    config = load("gcp-gpu.yaml")
    config["rayq"] = {"cluster": {"device": "gpu"}}
    with pytest.raises(jsonschema.ValidationError, match="rayq"):
        jsonschema.validate(config, ray_schema)


@pytest.mark.parametrize("name", ["gcp-gpu.yaml", "aws-gpu.yaml"])
def test_gpu_launchers_offer_gpus_and_the_trainer_resource(name):
    types = load(name)["available_node_types"]
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types
    for t in gpu_types:
        assert t["resources"]["trainer"] == t["resources"]["GPU"]
    head = types[load(name)["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("evaluator") == 1


def test_gcp_gpu_nodes_attach_a100_or_h100():
    types = load("gcp-gpu.yaml")["available_node_types"]
    accels = {a["acceleratorType"] for t in types.values() for a in t["node_config"].get("guestAccelerators", [])}
    assert accels == {"nvidia-a100-80gb", "nvidia-h100-80gb"}
    for t in types.values():
        if t["node_config"].get("guestAccelerators"):
            assert {"onHostMaintenance": "TERMINATE"} in t["node_config"]["scheduling"]


def test_gcp_tpu_slice_matches_the_rayq_section():
    from ray.util.tpu import get_tpu_worker_resources

    launcher = load("gcp-tpu.yaml")
    cluster = yaml.safe_load(rayq_sibling("gcp-tpu.yaml").read_text())["cluster"]
    live = [t for t in launcher["available_node_types"].values()
            if "acceleratorConfig" in t["node_config"] and t.get("max_workers", 0) > 0]
    assert len(live) == 1
    acc = live[0]["node_config"]["acceleratorConfig"]
    assert acc["topology"] == cluster["topology"]
    assert cluster["accelerator_type"] == f"TPU-{acc['type']}"
    hosts, per_worker = get_tpu_worker_resources(cluster["topology"], cluster["accelerator_type"])
    assert cluster["workers"] % hosts == 0
    assert live[0]["resources"]["TPU"] == per_worker["TPU"]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_binds_the_dashboard_to_loopback_and_enables_token_auth(name):
    config = load(name)
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for cmd in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in cmd
    assert "~/.ray/auth_token" in config["file_mounts"]


# ----------------------------------------------------------------------------- KubeRay manifests


def manifest(name: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all((CONFIGS / name).read_text()) if d]
    assert docs, f"{name}: empty"
    return docs


def raycluster(name: str) -> dict:
    (cluster,) = [d for d in manifest(name) if d["kind"] == "RayCluster"]
    return cluster


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_is_a_raycluster_with_token_auth(name):
    cluster = raycluster(name)
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["rayVersion"] == "2.60.0"
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    for c in containers(spec["headGroupSpec"]):
        assert not any(k.endswith("/gpu") or k.endswith("/tpu") for k in c["resources"]["limits"])


def test_kuberay_gpu_asks_for_nvidia_gpus_on_gpu_nodes():
    cluster = raycluster("kuberay-gpu.yaml")
    groups = cluster["spec"]["workerGroupSpecs"]
    assert groups
    for g in groups:
        spec = g["template"]["spec"]
        assert spec["nodeSelector"]["cloud.google.com/gke-accelerator"] in {"nvidia-a100-80gb", "nvidia-h100-80gb"}
        for c in containers(g):
            assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == "8"
        assert '\\"trainer\\": 8' in g["rayStartParams"]["resources"]


def test_kuberay_tpu_asks_for_a_whole_slice():
    from ray.util.tpu import get_tpu_worker_resources

    cluster = raycluster("kuberay-tpu.yaml")
    rayq = yaml.safe_load(rayq_sibling("kuberay-tpu.yaml").read_text())["cluster"]
    (group,) = cluster["spec"]["workerGroupSpecs"]
    selector = group["template"]["spec"]["nodeSelector"]
    assert selector["cloud.google.com/gke-tpu-accelerator"] == "tpu-v4-podslice"
    assert selector["cloud.google.com/gke-tpu-topology"] == rayq["topology"]
    hosts, per_worker = get_tpu_worker_resources(rayq["topology"], rayq["accelerator_type"])
    assert group["numOfHosts"] == hosts and rayq["workers"] == hosts * group["replicas"]
    for c in containers(group):
        assert c["resources"]["limits"]["google.com/tpu"] == str(per_worker["TPU"])
        assert c["resources"]["requests"]["google.com/tpu"] == str(per_worker["TPU"])
        assert {"name": "PJRT_DEVICE", "value": "TPU"} in c["env"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_binds_the_dashboard_to_loopback(name):
    """KubeRay starts the head with --dashboard-host=0.0.0.0 unless rayStartParams says otherwise."""
    params = raycluster(name)["spec"]["headGroupSpec"]["rayStartParams"]
    assert params["dashboard-host"] == "127.0.0.1"
    for group in raycluster(name)["spec"]["workerGroupSpecs"]:
        assert "0.0.0.0" not in json.dumps(group.get("rayStartParams", {}))


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_ships_a_network_policy_admitting_only_its_own_pods(name):
    cluster = raycluster(name)
    label = {"ray.io/cluster": cluster["metadata"]["name"]}
    policies = [d for d in manifest(name) if d["kind"] == "NetworkPolicy"]
    assert len(policies) == 1, f"{name}: one NetworkPolicy expected"
    (policy,) = policies
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": label}  # every pod of this RayCluster
    assert "Ingress" in spec["policyTypes"]
    assert spec["ingress"], f"{name}: no ingress rule would deny even the cluster's own traffic"
    for rule in spec["ingress"]:
        # an empty rule or `from` admits everyone; ipBlock / namespaceSelector admit outsiders
        assert rule.get("from"), f"{name}: an ingress rule without `from` admits every source"
        for peer in rule["from"]:
            assert peer == {"podSelector": {"matchLabels": label}}, f"{name}: ingress from {peer}"


# ----------------------------------------------------------------------------- GCP service accounts

NARROW_SCOPES = {"https://www.googleapis.com/auth/compute", "https://www.googleapis.com/auth/devstorage.read_write",
                 "https://www.googleapis.com/auth/devstorage.read_only", "https://www.googleapis.com/auth/logging.write",
                 "https://www.googleapis.com/auth/monitoring.write"}
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"


@pytest.mark.parametrize("name", [n for n in LAUNCHERS if n.startswith("gcp")])
def test_gcp_nodes_use_dedicated_service_accounts_with_narrow_scopes(name):
    config = load(name)
    head_type = config["head_node_type"]
    for type_name, node_type in config["available_node_types"].items():
        accounts = node_type["node_config"].get("serviceAccounts")
        assert accounts and len(accounts) == 1, f"{name}: {type_name} names no service account (GCE's default)"
        (account,) = accounts
        assert account["email"] != "default" and account["email"].endswith(".iam.gserviceaccount.com"), \
            f"{name}: {type_name} runs as {account['email']}"
        scopes = set(account["scopes"])
        if type_name == head_type and "acceleratorConfig" not in json.dumps(config["available_node_types"]):
            assert scopes <= NARROW_SCOPES, f"{name}: head scopes {scopes}"
        elif type_name == head_type:  # it creates TPU slices: the TPU API accepts only cloud-platform
            assert scopes <= NARROW_SCOPES | {CLOUD_PLATFORM}
            header = "".join(line for line in (CONFIGS / name).read_text().splitlines(True) if line.startswith("#"))
            assert "roles/tpu.admin" in header and "cloud-platform" in header
        else:  # GPU / TPU nodes only read and write the bucket
            assert scopes <= NARROW_SCOPES and CLOUD_PLATFORM not in scopes, f"{name}: {type_name} scopes {scopes}"
            assert "compute" not in " ".join(scopes), f"{name}: {type_name} could create VMs"
    head_email = config["available_node_types"][head_type]["node_config"]["serviceAccounts"][0]["email"]
    worker_emails = {t["node_config"]["serviceAccounts"][0]["email"]
                     for n, t in config["available_node_types"].items() if n != head_type}
    assert head_email not in worker_emails  # the nodes cannot do what the head may


# ----------------------------------------------------------------------------- no public exposure


def _walk(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, node


def _rule_ports(rule: dict) -> set[int]:
    lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
    if lo == -1 or rule.get("IpProtocol") == "-1":
        return set(RAY_PORTS)
    return {p for p in RAY_PORTS if lo <= p <= hi}


@pytest.mark.parametrize("name", LAUNCHERS + MANIFESTS)
def test_no_file_exposes_ray_ports_publicly(name):
    text = (CONFIGS / name).read_text()
    docs = [d for d in yaml.safe_load_all(text) if d]
    for doc in docs:
        for path, value in _walk(doc):
            if isinstance(value, str):
                assert "0.0.0.0/0" not in value and "::/0" not in value, f"{name}{path}: open CIDR"
                assert value not in ("LoadBalancer", "NodePort"), f"{name}{path}: public Service type"
        if doc.get("kind") in ("Service", "Ingress", "Gateway", "HTTPRoute"):
            assert doc["kind"] == "Service" and doc["spec"].get("type", "ClusterIP") == "ClusterIP", name
        # AWS: extra inbound rules must never open a Ray port to an outside range
        for rule in (doc.get("provider", {}).get("security_group", {}) or {}).get("IpPermissions", []):
            outside = [r for r in rule.get("IpRanges", []) + rule.get("Ipv6Ranges", [])]
            assert not (outside and _rule_ports(rule)), f"{name}: security group opens a Ray port"
        # GCP: no firewall or access config that would publish the head's Ray ports
        for path, value in _walk(doc):
            assert "firewall" not in path.lower(), f"{name}{path}"
    # the documented ways in are tunnels, and never a port-forward bound to all interfaces
    assert ("ray dashboard" in text or "kubectl port-forward" in text)
    assert "--address 0.0.0.0" not in text and "--address=0.0.0.0" not in text


@pytest.mark.parametrize("name", LAUNCHERS + MANIFESTS)
def test_header_documents_start_access_address_and_storage(name):
    header = "".join(line for line in (CONFIGS / name).read_text().splitlines(True) if line.startswith("#"))
    assert ("ray up" in header) if name in LAUNCHERS else ("kubectl apply" in header)
    assert "--address" in header and "rayq search" in header
    assert rayq_sibling(name).name in header
    assert "gs://" in header or "s3://" in header


# ----------------------------------------------------------------------------- the rayq siblings


@pytest.mark.parametrize("name", LAUNCHERS + MANIFESTS)
def test_rayq_sibling_resolves_and_passes_the_backend_checks(name):
    from rayq.cluster import backends
    from rayq.cluster.commands import cluster_values
    from rayq.config import resolve

    values = cluster_values(str(rayq_sibling(name)))
    cfg = resolve(preset="tiny", values=values)
    c = cfg.cluster
    assert c.device == ("tpu" if "tpu" in name else "gpu")
    assert c.storage.startswith("gs://" if name.startswith(("gcp", "kuberay")) else "s3://")
    assert c.workers > 1 and c.sharding == "fsdp"
    backends.check(c)
    if c.device == "gpu":
        # the GPU nodes of the launcher / manifest hold the requested workers
        if name in LAUNCHERS:
            types = load(name)["available_node_types"]
            gpus = max(t["resources"].get("GPU", 0) * t.get("max_workers", 0) for t in types.values())
            cpus_per_node = min(t["resources"]["CPU"] for t in types.values() if t["resources"].get("GPU"))
        else:
            cluster = raycluster(name)
            g = cluster["spec"]["workerGroupSpecs"][0]
            gpus = int(containers(g)[0]["resources"]["limits"]["nvidia.com/gpu"]) * g["maxReplicas"]
            cpus_per_node = int(containers(g)[0]["resources"]["limits"]["cpu"])
        assert c.workers * c.gpus_per_worker <= gpus
        assert c.cpus_per_worker * 8 <= cpus_per_node


def test_configs_ship_as_package_data():
    files = {p.name for p in resources.files("rayq.cluster").joinpath("configs").iterdir()}
    assert set(LAUNCHERS + MANIFESTS) <= files
