"""Every manifest under deploy/ against the Kubernetes schemas (kubernetes-validate, offline),
the Kustomize overlays rendered and validated, and the cross-references that make the
deployment work: gRPC probes on the served port, the drain period against --grace, memory
sized from the measured RSS, HPA metrics that the server really exports, selectors that match.

Custom resources (ServiceMonitor, KServe ServingRuntime / InferenceService) are not in the
Kubernetes schemas: their structure is checked here by hand, and the ServingRuntime's container
is validated as a core/v1 Container inside a Pod.
"""

from __future__ import annotations

import copy
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kv = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30.0"  # oldest Kubernetes the manifests target (native gRPC probes: GA in 1.27)
OVERLAYS = ("cpu-int4", "cpu-fp32", "gpu-tensorrt")
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("serving.kserve.io/v1alpha1", "ServingRuntime"),
        ("serving.kserve.io/v1beta1", "InferenceService")}
SERVER_LABELS = {"app.kubernetes.io/name": "granite-deploy", "app.kubernetes.io/component": "server"}
GIB = 1024 ** 3
# Peak RSS measured by bench/bench_engine.py for granite-4.0-1b at batch 8, up to 2048 tokens per
# sequence (README, "Weight-only quantization" table): limits must leave room above them.
MEASURED_PEAK_RSS_GIB = {"cpu-fp32": 10.9, "cpu-int4": 4.1}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")


def _all_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in _manifest_files() for d in _docs(p)]


def _is_patch(path: Path) -> bool:
    """Strategic-merge patches of an overlay (partial objects, validated after rendering)."""
    kust = path.parent / "kustomization.yaml"
    if not kust.exists():
        return False
    patches = yaml.safe_load(kust.read_text()).get("patches") or []
    return any(p.get("path") == path.name for p in patches)


def _validate(doc: dict) -> None:
    kv.validate(doc, K8S_VERSION, strict=True)


# ============================================================================ rendering (kustomize subset)

def _merge(base, patch):
    """Strategic merge as kustomize does it for the fields our patches touch: maps merge, lists
    of named objects (containers, env, volumes, volumeMounts) merge by name, other lists replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if (isinstance(base, list) and isinstance(patch, list) and patch
            and all(isinstance(x, dict) and "name" in x for x in base + patch)):
        out = [copy.deepcopy(x) for x in base]
        index = {x["name"]: i for i, x in enumerate(out)}
        for item in patch:
            if item["name"] in index:
                out[index[item["name"]]] = _merge(out[index[item["name"]]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def _containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec", {}) if "template" in spec else spec
    return pod.get("containers", []) + pod.get("initContainers", [])


def render(folder: Path) -> list[dict]:
    """The resources a kustomization produces (resources, patches by kind+name, images)."""
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    allowed = {"apiVersion", "kind", "resources", "patches", "images"}
    assert set(kust) <= allowed, f"{folder}: kustomization uses {set(kust) - allowed}: extend render()"
    docs: list[dict] = []
    for res in kust.get("resources", []):
        target = folder / res
        docs += render(target) if target.is_dir() else _docs(target)
    for patch in kust.get("patches", []):
        (p,) = _docs(folder / patch["path"])
        hits = [i for i, d in enumerate(docs) if d["kind"] == p["kind"] and d["metadata"]["name"] == p["metadata"]["name"]]
        assert len(hits) == 1, f"{folder}/{patch['path']}: patches {len(hits)} resources"
        docs[hits[0]] = _merge(docs[hits[0]], p)
    for image in kust.get("images", []):
        for d in docs:
            for c in _containers(d):
                name = c["image"].rsplit(":", 1)[0]
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    return docs


def _find(docs, kind, name=None):
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, (kind, name, len(hits))
    return hits[0]


def _env(container) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


# ============================================================================ schemas

def test_every_manifest_is_valid_against_the_kubernetes_schemas():
    checked, crds = 0, 0
    for path, doc in _all_docs():
        if _is_patch(path):
            continue
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            crds += 1
            continue
        try:
            _validate(doc)
        except kv.ValidationError as exc:
            pytest.fail(f"{path.relative_to(ROOT)}: {doc['kind']} {doc['metadata']['name']}: {str(exc).splitlines()[0]}")
        checked += 1
    assert checked >= 9 and crds == 4  # ServiceMonitor, two ServingRuntimes, InferenceService


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_render_to_valid_manifests(overlay):
    docs = render(DEPLOY / "overlays" / overlay)
    kinds = sorted(d["kind"] for d in docs)
    for kind in ("Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor"):
        assert kind in kinds
    assert kinds.count("Service") == 2
    for d in docs:
        if (d["apiVersion"], d["kind"]) not in CRDS:
            _validate(d)


def test_schema_validation_catches_mistakes():
    """The validator is not a no-op: a misspelt field and a wrong type are refused."""
    (dep,) = _docs(DEPLOY / "base" / "deployment.yaml")
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 8033}}
    with pytest.raises(kv.ValidationError):
        _validate(bad)
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = "grpc"  # must be int
    with pytest.raises(kv.ValidationError):
        _validate(bad)


def test_validation_needs_no_network(monkeypatch):
    """kubernetes-validate ships its schemas: validating with every connection refused works."""
    def refuse(*_a, **_k):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    (dep,) = _docs(DEPLOY / "base" / "deployment.yaml")
    _validate(dep)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_render_agrees_with_kubectl_kustomize(overlay):
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "overlays" / overlay)], capture_output=True,
                         text=True, timeout=60)
    if out.returncode != 0:
        pytest.skip(f"kubectl kustomize failed here: {out.stderr.strip()[:200]}")
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    theirs = sorted((_unordered(d) for d in yaml.safe_load_all(out.stdout) if d), key=key)
    ours = sorted((_unordered(d) for d in render(DEPLOY / "overlays" / overlay)), key=key)
    assert theirs == ours


def _unordered(value):
    """Lists of named objects compared as sets (kustomize appends new env entries after the
    patched ones; the order of env, containers and volumes carries no meaning here)."""
    if isinstance(value, dict):
        return {k: _unordered(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [_unordered(v) for v in value]
        if items and all(isinstance(x, dict) and "name" in x for x in items):
            return sorted(items, key=lambda x: x["name"])
        return items
    return value


# ============================================================================ the server Deployment

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_probes_drain_and_security(overlay):
    from granite_deploy.cli import build_parser

    docs = render(DEPLOY / "overlays" / overlay)
    dep = _find(docs, "Deployment", "granite-deploy")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = _env(c)
    grpc_port = int(env["GRANITE_DEPLOY_PORT"])
    assert grpc_port == 8033
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["grpc"] == grpc_port
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"] == int(env["GRANITE_DEPLOY_METRICS_PORT"])
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["http"] == int(env["GRANITE_DEPLOY_HTTP_PORT"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == grpc_port, probe  # native grpc.health.v1 probes
        assert c[probe]["grpc"].get("service", "") == ""
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 600  # load + verify + warm-up
    # drain: preStop, then SIGTERM -> `serve --grace` seconds for in-flight streams, inside the grace period
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    grace_opt = {a.dest: a for a in serve._actions}["grace"]
    assert "--grace" in grace_opt.option_strings
    grace = float(env["GRANITE_DEPLOY_GRACE"])
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + grace + 5
    # non-root, read-only artifact and root filesystem
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["artifacts"]["readOnly"] is True
    assert env["GRANITE_DEPLOY_ARTIFACT"].startswith(mounts["artifacts"]["mountPath"] + "/")
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["artifacts"]["persistentVolumeClaim"]["readOnly"] is True
    # threads follow the CPU limit, not the node's core count
    threads = next(e for e in c["env"] if e["name"] == "GRANITE_DEPLOY_THREADS")
    assert threads["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def _bytes(quantity: str) -> float:
    units = {"Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "K": 1e3, "M": 1e6, "G": 1e9}
    for u, f in units.items():
        if quantity.endswith(u):
            return float(quantity[: -len(u)]) * f
    return float(quantity)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_sized_per_precision(overlay):
    dep = _find(render(DEPLOY / "overlays" / overlay), "Deployment", "granite-deploy")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    req, lim = c["resources"]["requests"], c["resources"]["limits"]
    assert _bytes(req["memory"]) <= _bytes(lim["memory"])
    assert req["cpu"] == lim["cpu"]  # whole cores, guaranteed: decode speed is per core
    artifact = _env(c)["GRANITE_DEPLOY_ARTIFACT"]
    if overlay in MEASURED_PEAK_RSS_GIB:
        assert _bytes(lim["memory"]) >= 1.2 * MEASURED_PEAK_RSS_GIB[overlay] * GIB
        assert _bytes(req["memory"]) >= MEASURED_PEAK_RSS_GIB[overlay] * GIB
    assert artifact.endswith({"cpu-int4": "-int4", "cpu-fp32": "granite-4.0-1b", "gpu-tensorrt": "-fp16"}[overlay])
    if overlay == "gpu-tensorrt":
        assert lim["nvidia.com/gpu"] == "1" and c["image"].endswith("-tensorrt")
    else:
        assert "nvidia.com/gpu" not in lim and c["image"].endswith("-cpu")
    fp32 = _find(render(DEPLOY / "overlays" / "cpu-fp32"), "Deployment", "granite-deploy")
    int4 = _find(render(DEPLOY / "overlays" / "cpu-int4"), "Deployment", "granite-deploy")
    mem = lambda d: _bytes(d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"])  # noqa: E731
    assert mem(fp32) > 2 * mem(int4)


def test_services_pdb_and_selectors():
    docs = render(DEPLOY / "base")
    dep = _find(docs, "Deployment")
    assert dep["spec"]["selector"]["matchLabels"] == SERVER_LABELS
    assert SERVER_LABELS.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    svc = _find(docs, "Service", "granite-deploy")
    headless = _find(docs, "Service", "granite-deploy-headless")
    for s in (svc, headless):
        assert s["spec"]["selector"] == SERVER_LABELS
        grpc_port = {p["name"]: p for p in s["spec"]["ports"]}["grpc"]
        assert grpc_port["port"] == 8033 and grpc_port["targetPort"] == "grpc"
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is False
    pdb = _find(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == SERVER_LABELS
    assert pdb["spec"]["maxUnavailable"] == 1 and dep["spec"]["replicas"] >= 2


def test_service_monitor_scrapes_the_metrics_port():
    docs = render(DEPLOY / "base")
    sm = _find(docs, "ServiceMonitor")
    svc = _find(docs, "Service", "granite-deploy")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]} and ep["path"] == "/metrics"


def test_hpa_scales_on_metrics_the_server_exports():
    """HPA metric names -> prometheus-adapter rules -> series that serve/metrics.py really exposes."""
    from prometheus_client import generate_latest

    from granite_deploy.serve.metrics import Metrics

    hpa = _find(render(DEPLOY / "base"), "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "granite-deploy"}
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert wanted == {"granite_waiting_requests", "granite_running_requests"}
    (cm,) = _docs(DEPLOY / "monitoring" / "prometheus-adapter-rules.yaml")
    _validate(cm)
    rules = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
    published = {r["name"]["as"]: r for r in rules}
    assert wanted <= set(published)
    m = Metrics("onnxruntime-cpu/fp32")
    m.on_step({"running": 3, "waiting": 2})
    exposed = generate_latest(m.registry).decode()
    for name in wanted:
        rule = published[name]
        series = rule["name"]["matches"].strip("^$")
        assert rule["seriesQuery"].startswith(series + "{")
        assert f"\n{series}{{" in "\n" + exposed, f"serve/metrics.py does not export {series}"
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


# ============================================================================ KServe (CRDs: structure only)

def test_kserve_runtime_and_inference_service():
    (rt,) = _docs(DEPLOY / "kserve" / "servingruntime.yaml")
    (isvc,) = _docs(DEPLOY / "kserve" / "inferenceservice.yaml")
    assert (rt["apiVersion"], rt["kind"]) == ("serving.kserve.io/v1alpha1", "ServingRuntime")
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    (c,) = [c for c in rt["spec"]["containers"] if c["name"] == "kserve-container"]
    # the container is a core/v1 Container: validate it inside a Pod
    _validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "kserve-container-check"},
               "spec": {"containers": [c]}})
    env = _env(c)
    assert env["GRANITE_DEPLOY_ARTIFACT"] == "/mnt/models"  # where KServe's storage initializer puts the model
    (port,) = c["ports"]
    assert port == {"name": "h2c", "containerPort": 8033, "protocol": "TCP"} and env["GRANITE_DEPLOY_PORT"] == "8033"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["grpc"]["port"] == 8033
    formats = {f["name"] for f in rt["spec"]["supportedModelFormats"]}
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] in formats and model["runtime"] == rt["metadata"]["name"]
    assert model["storageUri"].split("://")[0] in {"pvc", "s3", "gs", "hf", "https", "oci"}
    assert model["ports"][0]["containerPort"] == 8033
    grace = float(env["GRANITE_DEPLOY_GRACE"])
    assert isvc["spec"]["predictor"]["terminationGracePeriodSeconds"] >= grace + 5 + 5


def test_kserve_openai_runtime_exposes_the_http_port():
    (rt,) = _docs(DEPLOY / "kserve" / "openai-servingruntime.yaml")
    assert (rt["apiVersion"], rt["kind"]) == ("serving.kserve.io/v1alpha1", "ServingRuntime")
    (c,) = rt["spec"]["containers"]
    _validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "kserve-openai-check"},
               "spec": {"containers": [c]}})
    env = _env(c)
    (port,) = c["ports"]  # KServe routes one port: here the HTTP API
    assert port["containerPort"] == int(env["GRANITE_DEPLOY_HTTP_PORT"]) == 8080
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 8080}
    assert c["livenessProbe"]["grpc"]["port"] == int(env["GRANITE_DEPLOY_PORT"])
    (grpc_rt,) = _docs(DEPLOY / "kserve" / "servingruntime.yaml")
    assert {f["name"] for f in rt["spec"]["supportedModelFormats"]} == {
        f["name"] for f in grpc_rt["spec"]["supportedModelFormats"]}
    # exactly one runtime is picked automatically for the format: the gRPC one
    assert [f["autoSelect"] for f in rt["spec"]["supportedModelFormats"]] == [False]


# ============================================================================ jobs

def test_export_job_writes_the_shared_volume():
    docs = render(DEPLOY / "jobs")
    pvc = _find(docs, "PersistentVolumeClaim", "granite-artifacts")
    job = _find(docs, "Job")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["image"].endswith("-export")
    env = _env(c)
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert env["GRANITE_EXPORT_OUTPUT"] == mounts["artifacts"]["mountPath"] and not mounts["artifacts"].get("readOnly")
    claim = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}["artifacts"]["persistentVolumeClaim"]
    assert claim["claimName"] == pvc["metadata"]["name"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    # the server mounts what the job writes
    dep = _find(render(DEPLOY / "overlays" / "cpu-int4"), "Deployment")
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert vols["artifacts"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    served = _env(dep["spec"]["template"]["spec"]["containers"][0])["GRANITE_DEPLOY_ARTIFACT"]
    assert served.rsplit("/", 1)[1] == f"{env['GRANITE_EXPORT_NAME']}-{env['GRANITE_EXPORT_QUANTIZE']}"
