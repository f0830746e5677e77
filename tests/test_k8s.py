"""k8s/, the Dockerfile and service/kuberay.py: what `kubectl apply -k` and the control API would send.

Every overlay is rendered with kubectl's built-in kustomize. Each rendered object is validated
against the Kubernetes schemas (kubernetes-validate ships them, strict: unknown fields fail) and,
for ray.io kinds, against the KubeRay v1.7 CRD schemas in ../shared/kuberay-crds, made strict the
same way: the API server prunes unknown fields of a custom resource silently, so a typo would
otherwise vanish on apply instead of failing here. Pod templates inside RayClusters and RayJobs
are validated a second time as core PodTemplates.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import socket
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from service import kuberay

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"
# Oldest Kubernetes these manifests promise to work on; fields newer than it fail validation.
K8S_VERSION = "1.30"

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None,
                                   reason="kubectl (which renders kustomize overlays) is not installed")
needs_crds = pytest.mark.skipif(not CRD_DIR.is_dir(),
                                reason=f"KubeRay v1.7 CRD schemas not found at {CRD_DIR} "
                                       f"(the shared/ folder beside the repository)")

VARIANTS = ["dev", "gpu", "dev/jobs", "gpu/jobs", "gpu+components"]


# ----------------------------------------------------------------------------- rendering


def kustomize(path: Path) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Each variant's objects. Rendered from a copy, where the overlays' git-ignored token files exist."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (which renders kustomize overlays) is not installed")
    root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(REPO / "k8s", root, ignore=shutil.ignore_patterns("ray-token", "api-tokens"))
    for overlay in ("dev", "gpu"):
        (root / "overlays" / overlay / "secrets" / "ray-token").write_text("4f1c" * 16)
        (root / "overlays" / overlay / "secrets" / "api-tokens").write_text(
            "tenants:\n  alice:\n    tokens: [\"sha256:" + "ab" * 32 + "\"]\n")
    both = root / "overlays" / "gpu+components"
    both.mkdir()
    (both / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["../gpu"],
        "components": ["../../components/gcs-ft", "../../components/rayjob-target"],
    }))
    return {name: kustomize(root / "overlays" / name) for name in VARIANTS}


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def cluster_specs(obj: dict) -> list[dict]:
    if obj["kind"] == "RayCluster":
        return [obj["spec"]]
    if obj["kind"] == "RayJob":
        return [obj["spec"]["rayClusterSpec"]]
    return []


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    out = []
    for spec in cluster_specs(obj):
        out.append(("head", spec["headGroupSpec"]["template"]))
        out += [(g["groupName"], g["template"]) for g in spec.get("workerGroupSpecs", [])]
    return out


def containers(node) -> list[dict]:
    """Every container of every pod spec anywhere below `node`."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found += value
            else:
                found += containers(value)
    elif isinstance(node, list):
        for value in node:
            found += containers(value)
    return found


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# ----------------------------------------------------------------------------- schemas


def strict(schema):
    """A CRD's openAPIV3Schema as JSON Schema, with unknown fields refused where fields are declared."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    out.pop("nullable", None)
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    path = CRD_DIR / f"ray.io_{kind.lower()}s.yaml"
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    assert "v1" in versions, f"{path}: no v1 version"
    schema = strict(versions["v1"]["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def crd_errors(obj: dict) -> list[str]:
    errors = crd_validator(obj["kind"]).iter_errors(obj)
    return [f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in errors]


@functools.lru_cache(maxsize=None)
def _core_errors(doc: str) -> tuple[str, ...]:
    import kubernetes_validate

    obj = json.loads(doc)
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return (f"{obj['kind']}/{obj['metadata'].get('name')}: {'.'.join(map(str, e.path))}: {e.message}",)
    except kubernetes_validate.SchemaNotFoundError as e:
        return (e.message,)
    return ()


def core_errors(obj: dict) -> list[str]:
    """Kubernetes' own schema; for custom resources, their metadata and pod templates."""
    if obj["apiVersion"].startswith("ray.io/"):
        docs = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}]
        docs += [{"apiVersion": "v1", "kind": "PodTemplate",
                  "metadata": {"name": f"{obj['metadata']['name']}-{group}"}, "template": tpl}
                 for group, tpl in pod_templates(obj)]
    else:
        docs = [obj]
    return [err for d in docs for err in _core_errors(json.dumps(d, sort_keys=True))]


# ----------------------------------------------------------------------------- every object validates


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_object_validates_against_kubernetes_schemas(rendered, variant):
    objs = rendered[variant]
    assert objs, f"{variant} rendered nothing"
    errors = [e for o in objs for e in core_errors(o)]
    assert not errors, "\n".join(errors)


@needs_crds
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_ray_object_validates_against_kuberay_crds(rendered, variant):
    ray_objs = [o for o in rendered[variant] if o["apiVersion"] == "ray.io/v1"]
    assert ray_objs, f"{variant} has no RayCluster or RayJob"
    errors = [e for o in ray_objs for e in crd_errors(o)]
    assert not errors, "\n".join(errors)


@needs_crds
def test_crd_validation_refuses_typos_and_wrong_types(rendered):
    cluster = one(rendered["dev"], "RayCluster")
    assert crd_errors(cluster) == []
    typo = copy.deepcopy(cluster)
    typo["spec"]["headGroupSpec"]["rayStartParam"] = {}
    assert any("rayStartParam" in e for e in crd_errors(typo))
    deep = copy.deepcopy(cluster)
    deep["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert any("imagePullPolicyy" in e for e in crd_errors(deep))
    wrong = copy.deepcopy(cluster)
    wrong["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "2"
    assert any("maxReplicas" in e for e in crd_errors(wrong))
    job = one(rendered["dev/jobs"], "RayJob", "raylm-prepare")
    bad_job = copy.deepcopy(job)
    bad_job["spec"]["shutdownAfterJobFinish"] = True
    assert any("shutdownAfterJobFinish" in e for e in crd_errors(bad_job))


def test_core_validation_refuses_typos(rendered):
    deployment = copy.deepcopy(one(rendered["dev"], "Deployment", "raylm-api"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert any("readinesProbe" in e for e in core_errors(deployment))
    cluster = copy.deepcopy(one(rendered["dev"], "RayCluster"))
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limit"] = {}
    assert any("limit" in e for e in core_errors(cluster))


# ----------------------------------------------------------------------------- Ray version


def pinned_ray_version() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in deps if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?==([0-9][^\s;,]*)", d.strip()))]
    assert len(pins) == 1, f"pyproject.toml: expected one `ray[...]==X` dependency, found {pins}"
    return pins[0]


def test_ray_version_everywhere_equals_the_pin(rendered):
    version = pinned_ray_version()
    for variant, objs in rendered.items():
        for obj in objs:
            for spec in cluster_specs(obj):
                assert spec["rayVersion"] == version, f"{variant} {obj['kind']}/{obj['metadata']['name']}: rayVersion"
            for c in containers(obj):
                tag = c["image"].rsplit(":", 1)[-1]
                assert tag.startswith(f"{version}-"), f"{variant}: image {c['image']} is not tagged for Ray {version}"
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(rf"^ARG RAY_VERSION={re.escape(version)}$", dockerfile, re.M), "Dockerfile: ARG RAY_VERSION"
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-", dockerfile, re.M), "Dockerfile: FROM rayproject/ray"
    manifest = kuberay.rayjob_manifest("v", "prepare", "output: x\n", image="raylm:x", namespace="raylm")
    assert manifest["spec"]["rayClusterSpec"]["rayVersion"] == version


# ----------------------------------------------------------------------------- the cluster and the API


@pytest.mark.parametrize("variant", ["dev", "gpu"])
def test_cluster_shape(rendered, variant):
    objs = rendered[variant]
    cluster = one(objs, "RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in json.dumps(head), "the head must not ask for a GPU"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert "nvidia.com/gpu" not in json.dumps(groups["cpu"])
    if variant == "dev":
        assert set(groups) == {"cpu"}
        assert "nvidia.com/gpu" not in json.dumps(objs)
        assert {c["image"].rsplit(":", 1)[1] for c in containers(objs)} == {f"{pinned_ray_version()}-cpu"}
    else:
        gpu = groups["gpu"]
        assert gpu["minReplicas"] < gpu["maxReplicas"], "the GPU group is elastic"
        limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"
        assert {c["image"].rsplit(":", 1)[1] for c in containers(objs)} == {f"{pinned_ray_version()}-gpu"}


@pytest.mark.parametrize("variant", ["dev", "gpu"])
def test_token_secret_is_shared_by_cluster_and_api(rendered, variant):
    objs = rendered[variant]
    auth = one(objs, "RayCluster")["spec"]["authOptions"]
    assert auth["mode"] == "token"
    secret = one(objs, "Secret", auth["secretName"])
    assert "auth_token" in secret["data"], "KubeRay reads the token from the key auth_token"
    api = one(objs, "Deployment", "raylm-api")["spec"]["template"]["spec"]
    env = env_of(api["containers"][0])
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": auth["secretName"], "key": "auth_token"}
    tokens_volume = next(v for v in api["volumes"] if v["name"] == "tokens")
    tokens_secret = one(objs, "Secret", tokens_volume["secret"]["secretName"])
    mount = next(m for m in api["containers"][0]["volumeMounts"] if m["name"] == "tokens")
    (key,) = tokens_secret["data"]
    assert env["RAYLM_TOKENS_FILE"]["value"] == f"{mount['mountPath']}/{key}"


@pytest.mark.parametrize("variant", ["dev", "gpu"])
def test_api_settings_point_at_this_installation(rendered, variant):
    objs = rendered[variant]
    cluster = one(objs, "RayCluster")
    deployment = one(objs, "Deployment", "raylm-api")
    api = deployment["spec"]["template"]["spec"]["containers"][0]
    env = env_of(api)
    assert env["RAYLM_RAY_ADDRESS"]["value"] == f"http://{cluster['metadata']['name']}-head-svc:8265"
    assert env["RAYLM_SUBMIT_TARGET"]["value"] == "ray"
    assert env["RAYLM_K8S_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    ray_images = {c["image"] for c in containers(cluster)}
    assert env["RAYLM_K8S_IMAGE"]["value"] == api["image"] and ray_images == {api["image"]}
    assert api["command"][:2] == ["raylm", "serve"] and "8000" in api["command"]
    service = one(objs, "Service", "raylm-api")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    # The objects service/kuberay.py puts into every RayJob exist here.
    one(objs, "PersistentVolumeClaim", kuberay.ARTIFACTS_CLAIM)
    one(objs, "ConfigMap", kuberay.STORAGE_CONFIG_MAP)
    assert {"secretRef": {"name": kuberay.S3_SECRET, "optional": True}} in api["envFrom"]
    role = one(objs, "Role", "raylm-api")
    granted = {(r, v) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert {("rayjobs", v) for v in ("create", "get", "delete")} <= granted
    assert ("rayjobs/status", "get") in granted
    binding = one(objs, "RoleBinding", "raylm-api")
    assert binding["subjects"][0]["name"] == deployment["spec"]["template"]["spec"]["serviceAccountName"]


def test_dashboard_port_is_open_only_to_the_control_api(rendered):
    objs = rendered["dev"]
    cluster = one(objs, "RayCluster")
    policy = one(objs, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"ray.io/cluster": cluster["metadata"]["name"],
                                                    "ray.io/node-type": "head"}
    api_labels = one(objs, "Deployment", "raylm-api")["spec"]["template"]["metadata"]["labels"]
    for rule in policy["ingress"]:
        covers_dashboard = any(p["port"] <= 8265 <= p.get("endPort", p["port"]) for p in rule["ports"])
        if not covers_dashboard:
            continue
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, f"8265 open to {peer}"
            assert peer["podSelector"]["matchLabels"].items() <= api_labels.items(), f"8265 open to {peer}"
    # Ray's own pods still reach everything else on the head (GCS 6379, client 10001, ...).
    for port in (6379, 10001, 52365):
        assert any(p["port"] <= port <= p.get("endPort", p["port"])
                   for rule in policy["ingress"] for p in rule["ports"]
                   if rule["from"] == [{"podSelector": {"matchLabels": {"ray.io/cluster": "raylm"}}}]), port


def test_components_switch_target_and_add_gcs_fault_tolerance(rendered):
    objs = rendered["gpu+components"]
    ft = one(objs, "RayCluster")["spec"]["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] and ft["redisPassword"]["valueFrom"]["secretKeyRef"]["key"] == "password"
    env = env_of(one(objs, "Deployment", "raylm-api")["spec"]["template"]["spec"]["containers"][0])
    assert env["RAYLM_SUBMIT_TARGET"]["value"] == "kubernetes"
    assert "gcsFaultToleranceOptions" not in one(rendered["gpu"], "RayCluster")["spec"]


# ----------------------------------------------------------------------------- RayJobs for kubectl


@pytest.mark.parametrize("variant", ["dev/jobs", "gpu/jobs"])
def test_rayjobs_run_allowlisted_entrypoints_and_clean_up(rendered, variant):
    objs = rendered[variant]
    jobs = [o for o in objs if o["kind"] == "RayJob"]
    assert sorted(j["metadata"]["labels"]["raylm.io/job"] for j in jobs) == ["prepare", "pretrain", "tune"]
    for job in jobs:
        kind = job["metadata"]["labels"]["raylm.io/job"]
        name = job["metadata"]["name"]
        spec = job["spec"]
        # the service's RayJobs also refuse links (they run over a tenant's storage); an operator's
        # own RayJobs run the same command over the operator's storage
        assert spec["entrypoint"] == kuberay.entrypoint(kind).removeprefix("RAYLM_NO_LINKS=1 ")
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 0
        assert len(name) <= kuberay.MAX_RAYJOB_NAME and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        mount = next(m for m in head["containers"][0]["volumeMounts"] if m["name"] == "job-config")
        assert mount["mountPath"] == kuberay.CONFIG_DIR
        config_map = one(objs, "ConfigMap", next(v for v in head["volumes"] if v["name"] == "job-config")
                         ["configMap"]["name"])
        assert "config.yaml" in config_map["data"]
        # `kubectl apply -l raylm.io/job=<kind>` must pick the RayJob together with its config.
        assert config_map["metadata"]["labels"]["raylm.io/job"] == kind
        assert "nvidia.com/gpu" not in json.dumps(spec["rayClusterSpec"]["headGroupSpec"])


@pytest.mark.parametrize("variant", ["dev/jobs", "gpu/jobs"])
def test_rayjob_configs_are_valid_job_configs_for_their_clusters(rendered, variant, tmp_path):
    from jobs.config import load_config
    from jobs.prepare import PrepareConfig
    from jobs.pretrain import PretrainConfig
    from jobs.tune import TuneConfig

    classes = {"prepare": PrepareConfig, "pretrain": PretrainConfig, "tune": TuneConfig}
    objs = rendered[variant]
    for kind, cls in classes.items():
        path = tmp_path / f"{kind}.yaml"
        path.write_text(one(objs, "ConfigMap", f"raylm-job-{kind}")["data"]["config.yaml"])
        cfg = load_config(cls, path)
        group = one(objs, "RayJob", f"raylm-{kind}")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
        has_gpu = "nvidia.com/gpu" in group["template"]["spec"]["containers"][0]["resources"]["limits"]
        train = cfg.pretrain if kind == "tune" else cfg
        if kind == "pretrain":
            assert cfg.num_workers == group["replicas"] == group["minReplicas"] == group["maxReplicas"], \
                f"{variant}: one Ray Train worker per pod"
        if kind != "prepare":
            assert train.use_gpu == has_gpu, f"{variant} {kind}: use_gpu vs the worker group"
            cpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
            assert train.cpus_per_worker <= cpus, f"{variant} {kind}: a Train worker must fit in a pod"
        for path_value in (getattr(cfg, "output"), getattr(train, "data", None)):
            if path_value:
                assert path_value.startswith(kuberay.ARTIFACTS_MOUNT + "/"), f"{kind}: {path_value} is off the volume"


# ----------------------------------------------------------------------------- the API's RayJobs


CONFIG = "data: /mnt/raylm/data/shakespeare\noutput: /mnt/raylm/runs/x\nnum_workers: 2\n"


@needs_crds
@pytest.mark.parametrize("use_gpu", [False, True])
def test_api_rayjob_validates(use_gpu):
    manifest = kuberay.rayjob_manifest("0f8e2a4c-1d3b-4e5f-9a7b-2c6d8e0f1a3b", "pretrain", CONFIG,
                                       image="raylm:2.60.0-gpu", namespace="raylm", num_workers=2,
                                       use_gpu=use_gpu)
    errors = crd_errors(manifest) + core_errors(manifest)
    assert not errors, "\n".join(errors)
    spec = manifest["spec"]
    assert spec["entrypoint"] == "RAYLM_NO_LINKS=1 python -m jobs.pretrain --config /etc/raylm/job/config.yaml"
    assert spec["shutdownAfterJobFinishes"] is True and spec["activeDeadlineSeconds"] > 0
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus == ("1" if use_gpu else None)
    assert "nvidia.com/gpu" not in json.dumps(spec["rayClusterSpec"]["headGroupSpec"])


def test_api_rayjob_carries_its_config_to_the_entrypoint_file():
    config = "output: /mnt/raylm/data/x\nvocab_size: 512\n# a comment, kept verbatim: 'quotes' \"too\"\n"
    manifest = kuberay.rayjob_manifest("job1", "prepare", config, image="raylm:2.60.0-cpu", namespace="team-a")
    assert manifest["metadata"] == {"name": "raylm-job1", "namespace": "team-a", "labels": {
        "app.kubernetes.io/part-of": "raylm", "app.kubernetes.io/component": "job",
        "raylm.io/kind": "prepare", "raylm.io/job-id": "job1"}}
    head = manifest["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    assert head["metadata"]["annotations"][kuberay.CONFIG_ANNOTATION] == config
    volume = next(v for v in head["spec"]["volumes"] if v["name"] == "job-config")
    (item,) = volume["downwardAPI"]["items"]
    assert item["fieldRef"]["fieldPath"] == f"metadata.annotations['{kuberay.CONFIG_ANNOTATION}']"
    mount = next(m for m in head["spec"]["containers"][0]["volumeMounts"] if m["name"] == "job-config")
    assert f"{mount['mountPath']}/{item['path']}" == kuberay.CONFIG_PATH
    assert manifest["spec"]["entrypoint"].endswith(f"--config {kuberay.CONFIG_PATH}")
    # The config never reaches the command line.
    assert "vocab_size" not in json.dumps(manifest["spec"]["entrypoint"])
    s3 = kuberay.rayjob_manifest("job1", "prepare", config, image="i:1", namespace="n", artifacts_claim=None)
    assert "persistentVolumeClaim" not in json.dumps(s3)


@pytest.mark.parametrize("kind", ["prepare; rm -rf /", "Pretrain", "chat", "", "jobs.pretrain"])
def test_api_rayjob_refuses_kinds_outside_the_allowlist(kind):
    with pytest.raises(ValueError, match="kind"):
        kuberay.rayjob_manifest("a1", kind, CONFIG, image="raylm:x", namespace="raylm")


def test_api_rayjob_refuses_bad_arguments_by_name():
    ok = dict(image="raylm:x", namespace="raylm")
    for job_id in ("a/b", "x" * 42, "a_b", "a-", "a.b"):
        with pytest.raises(ValueError, match="job_id"):
            kuberay.rayjob_manifest(job_id, "prepare", CONFIG, **ok)
    assert kuberay.rayjob_name("x" * 41) == "raylm-" + "x" * 41
    assert kuberay.rayjob_name("01HZY3F6AB") == "raylm-01hzy3f6ab"
    with pytest.raises(ValueError, match="config_yaml"):
        kuberay.rayjob_manifest("a1", "prepare", "  \n", **ok)
    with pytest.raises(ValueError, match="config_yaml"):
        kuberay.rayjob_manifest("a1", "prepare", "k: " + "v" * kuberay.MAX_CONFIG_BYTES, **ok)
    with pytest.raises(ValueError, match="namespace"):
        kuberay.rayjob_manifest("a1", "prepare", CONFIG, image="raylm:x", namespace="Team_A")
    with pytest.raises(ValueError, match="num_workers"):
        kuberay.rayjob_manifest("a1", "prepare", CONFIG, num_workers=0, **ok)
    with pytest.raises(ValueError, match="worker_memory"):
        kuberay.rayjob_manifest("a1", "prepare", CONFIG, worker_memory="16 GB", **ok)
    with pytest.raises(ValueError, match="image"):
        kuberay.rayjob_manifest("a1", "prepare", CONFIG, image="", namespace="raylm")


@pytest.mark.parametrize("status, state", [
    ({}, "pending"),
    ({"jobDeploymentStatus": "Initializing"}, "pending"),
    ({"jobDeploymentStatus": "Running", "jobStatus": "PENDING"}, "pending"),
    ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, "running"),
    ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, "succeeded"),
    ({"jobDeploymentStatus": "Complete", "jobStatus": "FAILED"}, "failed"),
    ({"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded"}, "failed"),
    ({"jobDeploymentStatus": "Running", "jobStatus": "STOPPED"}, "stopped"),
    ({"jobDeploymentStatus": "Suspended"}, "stopped"),
])
def test_rayjob_state(status, state):
    assert kuberay.rayjob_state(status) == state


def test_unreachable_kubernetes_api_is_a_clear_error():
    from kubernetes import client

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    configuration = client.Configuration(host=f"http://127.0.0.1:{port}")
    configuration.retries = 0
    api = client.CustomObjectsApi(client.ApiClient(configuration))
    manifest = kuberay.rayjob_manifest("a1", "prepare", CONFIG, image="raylm:x", namespace="raylm")
    calls = [lambda: kuberay.submit_rayjob(manifest, "raylm", api=api),
             lambda: kuberay.get_rayjob_status("raylm-a1", "raylm", api=api),
             lambda: kuberay.delete_rayjob("raylm-a1", "raylm", api=api)]
    for call in calls:
        with pytest.raises(kuberay.KubeRayError, match=rf"RayJob raylm/raylm-a1: cannot reach the Kubernetes API at http://127.0.0.1:{port}"):
            call()


def test_api_errors_say_what_failed_and_why():
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = client.CustomObjectsApi(client.ApiClient(client.Configuration(host="https://k8s.example:6443")))
    missing = kuberay._explain("reading", "RayJob raylm/raylm-a1", ApiException(status=404, reason="Not Found"), api)
    assert isinstance(missing, kuberay.RayJobNotFound) and "no such RayJob" in str(missing)
    no_crd = kuberay._explain("creating", "RayJob raylm/raylm-a1", ApiException(status=404, reason="Not Found"), api)
    assert not isinstance(no_crd, kuberay.RayJobNotFound) and "KubeRay operator" in str(no_crd)
    forbidden = kuberay._explain("creating", "RayJob raylm/raylm-a1", ApiException(status=403, reason="Forbidden"), api)
    assert "RBAC" in str(forbidden) and "HTTP 403" in str(forbidden)
