"""deploy/: every Kustomize target renders (with a small renderer of the subset of Kustomize the
manifests use), validates against the Kubernetes schemas offline, and agrees with the code: the
container commands parse with the real `tessera` parser, the effective `tessera serve` configuration
(flags + TESSERA_* environment, through service.config.from_args) matches ports, probes, grace periods
and targets, and labels, selectors and volume references line up."""

from __future__ import annotations

import copy
import re
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from service.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S = DEPLOY / "k8s"
TARGETS = ["base", "overlays/cpu", "overlays/gpu", "caption", "overlays/gpu-caption"]
SERVICE_TARGETS = ["base", "overlays/cpu", "overlays/gpu"]
KUBERNETES_VERSIONS = ["1.27.0", "1.37.0"]  # native gRPC probes are GA since 1.27
HEALTH_SERVICES = {  # the serve contract's grpc.health.v1 service names
    "vision": "tessera.vision.v1.VisionService",
    "lm": "tessera.lm.v1.LanguageModelService",
    "gateway": "tessera.gateway.v1.GatewayService",
}

# ----- a renderer for the Kustomize subset used here ----------------------------------------------------

# Strategic-merge keys of the lists the patches touch (from the Kubernetes API's patchMergeKey); any
# other list is replaced by the patch's, as in Kubernetes.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name"}
KNOWN_FIELDS = {"apiVersion", "kind", "resources", "patches", "images", "labels"}


def strategic_merge(base, patch, key: str | None = None):
    if isinstance(base, dict) and isinstance(patch, dict):
        assert "$patch" not in patch, "the renderer does not implement $patch directives"
        merged = dict(base)
        for name, value in patch.items():
            merged[name] = strategic_merge(base[name], value, name) if name in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        merge_key = MERGE_KEYS[key]
        merged = [copy.deepcopy(item) for item in base]
        for item in patch:
            match = [i for i, old in enumerate(merged) if old[merge_key] == item[merge_key]]
            if match:
                merged[match[0]] = strategic_merge(merged[match[0]], item)
            else:
                merged.append(copy.deepcopy(item))
        return merged
    return copy.deepcopy(patch)


def render(directory: Path) -> list[dict]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KNOWN_FIELDS
    assert not unknown, f"{directory}: the test renderer does not implement {sorted(unknown)}"
    docs: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        docs += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch_entry in kustomization.get("patches", []):
        assert set(patch_entry) == {"path"}, "patches are files naming their target by kind and name"
        for patch in yaml.safe_load_all((directory / patch_entry["path"]).read_text()):
            targets = [i for i, d in enumerate(docs) if (d["kind"], d["metadata"]["name"]) ==
                       (patch["kind"], patch["metadata"]["name"])]
            assert len(targets) == 1, f"patch {patch_entry['path']} matches {len(targets)} resources"
            docs[targets[0]] = strategic_merge(docs[targets[0]], patch)
    for image in kustomization.get("images", []):
        for container in all_containers(docs):
            if container["image"].split(":")[0].split("@")[0] == image["name"]:
                container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    for label in kustomization.get("labels", []):
        assert not label.get("includeSelectors") and not label.get("includeTemplates")
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(label["pairs"])
    return docs


def pod_spec(doc: dict) -> dict | None:
    return doc["spec"]["template"]["spec"] if doc["kind"] in ("Deployment", "Job") else None


def all_containers(docs):
    return [c for d in docs if pod_spec(d) for c in pod_spec(d)["containers"]]


def find(docs, kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


@pytest.fixture(scope="module", params=TARGETS)
def rendered(request):
    return request.param, render(K8S / request.param)


@pytest.fixture(scope="module", params=SERVICE_TARGETS)
def services(request):
    return request.param, render(K8S / request.param)


# ----- schemas ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(rendered, version):
    import kubernetes_validate

    target, docs = rendered
    assert docs, target
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{target}: {doc['kind']}/{doc['metadata']['name']} invalid for {version}: {error.message} "
                        f"at {'/'.join(map(str, error.path))}")


def test_the_validator_rejects_a_broken_manifest():
    import kubernetes_validate

    docs = render(K8S / "base")
    broken = copy.deepcopy(find(docs, "Deployment", "tessera-lm")[0])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"  # must be a number
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


# ----- labels, selectors, references --------------------------------------------------------------------

def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_selectors_match_exactly_their_own_pods(rendered):
    target, docs = rendered
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in docs if pod_spec(d)}
    for deployment in find(docs, "Deployment"):
        assert _selects(deployment["spec"]["selector"]["matchLabels"], pods[deployment["metadata"]["name"]])
    for kind, selector_of in (("Service", lambda d: d["spec"]["selector"]),
                              ("PodDisruptionBudget", lambda d: d["spec"]["selector"]["matchLabels"])):
        for doc in find(docs, kind):
            matched = [name for name, labels in pods.items() if _selects(selector_of(doc), labels)]
            assert matched == [doc["metadata"]["name"]], f"{target}: {kind} {doc['metadata']['name']} selects {matched}"
    for hpa in find(docs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert find(docs, ref["kind"], ref["name"]) and hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_each_service_has_deployment_service_hpa_and_pdb(services):
    _, docs = services
    for component in HEALTH_SERVICES:
        name = f"tessera-{component}"
        for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
            assert len(find(docs, kind, name)) == 1, f"{kind} {name}"
    assert len(find(docs, "ConfigMap", "tessera-config")) == 1


def test_volumes_mounts_and_claims_line_up(rendered):
    target, docs = rendered
    # The caption Job uses the base's model claim (deployed with the services), so a claim may come from either.
    claims = {d["metadata"]["name"] for d in find(docs + render(K8S / "base"), "PersistentVolumeClaim")}
    for doc in docs:
        spec = pod_spec(doc)
        if spec is None:
            continue
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{target}: mount {mount['name']} has no volume"
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims


def test_containers_run_as_the_images_non_root_user(rendered):
    uid = int(re.search(r"^USER (\d+):(\d+)$", (DEPLOY / "Dockerfile").read_text(), re.M).group(1))
    target, docs = rendered
    for doc in docs:
        spec = pod_spec(doc)
        if spec is not None:
            assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == uid
            for container in spec["containers"]:
                assert container["securityContext"]["allowPrivilegeEscalation"] is False
                assert container["image"].split(":")[0].split("/")[-1] == "tessera"


# ----- agreement with `tessera serve` ---------------------------------------------------------------------

def _environment(container: dict, docs: list[dict]) -> dict[str, str]:
    """The container's environment as the kubelet builds it (ConfigMaps, then env; secrets as 'secret')."""
    environ = {}
    for source in container.get("envFrom", []):
        environ.update(find(docs, "ConfigMap", source["configMapRef"]["name"])[0]["data"])
    for variable in container.get("env", []):
        environ[variable["name"]] = variable.get("value", "secret")
    return environ


def _serve_config(docs, component: str, role: str | None = None):
    """The effective configuration of the `role` container (default: the component's own) of a
    component's pod."""
    from service.config import from_args

    role = role or component
    deployment = find(docs, "Deployment", f"tessera-{component}")[0]
    spec = deployment["spec"]["template"]["spec"]
    names = [c["name"] for c in spec["containers"]]
    assert names == (["gateway", "openai"] if component == "gateway" else [component])
    (container,) = [c for c in spec["containers"] if c["name"] == role]
    assert container["command"] == ["tessera"]
    args = build_parser().parse_args(container["args"])  # the real parser: exits on an unknown flag
    assert (args.command, args.role) == ("serve", role)
    environ = _environment(container, docs)
    return from_args(args.role, args, environ), spec, container, environ


@pytest.mark.parametrize("component", sorted(HEALTH_SERVICES))
def test_serve_command_ports_probes_and_grace_agree_with_the_code(services, component):
    target, docs = services
    config, spec, container, _ = _serve_config(docs, component)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": config.port, "metrics": config.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == config.port, f"{target} {component} {probe}"
    assert container["readinessProbe"]["grpc"]["service"] == HEALTH_SERVICES[component]
    # The gateway loads nothing; its service's status follows the backends (which may still be loading),
    # so only its readiness waits for them, never its start (a failed startup probe restarts it).
    startup_service = "" if component == "gateway" else HEALTH_SERVICES[component]
    assert container["startupProbe"]["grpc"]["service"] == startup_service
    assert container["livenessProbe"]["grpc"]["service"] == ""  # the process, not the model, is alive
    startup = container["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= (600 if component in ("vision", "lm") else 30), "room to load the model"
    grace = spec["terminationGracePeriodSeconds"]
    assert config.grace_period < grace <= config.grace_period + 10, "SIGKILL comes after the drain, not long after"
    service = find(docs, "Service", f"tessera-{component}")[0]
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert by_name["grpc"]["targetPort"] == "grpc" and by_name["metrics"]["targetPort"] == "metrics"
    template = find(docs, "Deployment", f"tessera-{component}")[0]["spec"]["template"]["metadata"]
    assert template["annotations"]["prometheus.io/port"] == str(config.metrics_port)


@pytest.mark.parametrize("component", sorted(HEALTH_SERVICES))
def test_environment_variables_are_serve_flags(services, component):
    from service.config import ServeConfig

    target, docs = services
    config, _, container, environ = _serve_config(docs, component)
    flags = {f"TESSERA_{f.name.upper()}" for f in fields(ServeConfig) if f.name != "role"}
    unknown = {name for name in environ if name.startswith("TESSERA_")} - flags
    assert not unknown, f"{target}: {component} sets {sorted(unknown)}, which `tessera serve` does not read"
    data = find(docs, "ConfigMap", "tessera-config")[0]["data"]
    for name, value in data.items():  # every setting reaches the effective configuration
        if name.startswith("TESSERA_") and name not in {e["name"] for e in container.get("env", [])}:
            field = name.removeprefix("TESSERA_").lower()
            effective = getattr(config, field)
            assert effective == type(effective)(value), f"{name}={value!r} but the server would use {effective!r}"


def test_the_openai_container_serves_http_in_front_of_its_pods_gateway(services):
    target, docs = services
    gateway, spec, _, _ = _serve_config(docs, "gateway")
    config, _, container, environ = _serve_config(docs, "gateway", "openai")
    assert config.gateway_target == f"localhost:{gateway.port}"  # the pod's own gateway
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": config.port}
    assert config.metrics_port == 0 != gateway.metrics_port  # one pod, one network: no second exporter on 9090
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": config.port}
    for probe in ("startupProbe", "livenessProbe"):  # /health is 503 while a backend loads: not for liveness
        assert container[probe]["tcpSocket"]["port"] == config.port
    assert environ["TESSERA_AUTH_TOKEN"] == "secret" and config.served_model_name
    assert config.grace_period < spec["terminationGracePeriodSeconds"]
    service = find(docs, "Service", "tessera-gateway")[0]
    assert {"name": "http", "port": 8000, "targetPort": "http", "appProtocol": "http"} in service["spec"]["ports"]


def test_gateway_targets_are_the_vision_and_lm_services(services):
    target, docs = services
    config, *_ = _serve_config(docs, "gateway")
    for address, component in ((config.vision_target, "vision"), (config.lm_target, "lm")):
        assert address.startswith("dns:///"), f"{target}: {address} must use the DNS resolver to reach every replica"
        host, port = address.removeprefix("dns:///").rsplit(":", 1)
        service = find(docs, "Service", host)
        assert service, f"{target}: gateway target {address} names no Service"
        assert service[0]["spec"].get("clusterIP") == "None", f"{target}: {host} must be headless"
        assert int(port) in [p["port"] for p in service[0]["spec"]["ports"] if p["name"] == "grpc"]
        assert service[0]["spec"]["selector"]["app.kubernetes.io/component"] == component


def test_gpu_overlay_puts_vision_and_lm_on_gpus_only():
    for target, gpu in (("overlays/gpu", True), ("overlays/cpu", False), ("base", False)):
        docs = render(K8S / target)
        config = find(docs, "ConfigMap", "tessera-config")[0]["data"]
        assert config["TESSERA_DEVICE"] == ("cuda" if gpu else "cpu")
        for component in HEALTH_SERVICES:
            for container in find(docs, "Deployment", f"tessera-{component}")[0]["spec"]["template"]["spec"]["containers"]:
                limits = container["resources"]["limits"]
                wants_gpu = gpu and component != "gateway"
                assert ("nvidia.com/gpu" in limits) == wants_gpu, f"{target} {component} {container['name']}"
                assert container["resources"]["requests"] and limits
                if wants_gpu:
                    assert container["image"].endswith("-cuda")


# ----- the captioning Job ---------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["caption", "overlays/gpu-caption"])
def test_caption_job_is_indexed_sharded_and_writes_to_a_volume(target):
    from service.caption import SHARD_COUNT_ENV, SHARD_INDEX_ENV, Shard

    docs = render(K8S / target)
    (job,) = find(docs, "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] <= spec["completions"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure"  # a restarted shard resumes from its output file
    (container,) = pod["containers"]
    assert container["command"] == ["tessera"]
    args = build_parser().parse_args(container["args"])
    assert args.command == "caption" and args.target is None and args.shard is None
    environ = {e["name"]: e for e in container["env"]}
    assert int(environ[SHARD_COUNT_ENV]["value"]) == spec["completions"]
    assert "job-completion-index" in environ[SHARD_INDEX_ENV]["valueFrom"]["fieldRef"]["fieldPath"]
    shard = Shard.from_environment({SHARD_INDEX_ENV: "3", SHARD_COUNT_ENV: environ[SHARD_COUNT_ENV]["value"]})
    assert shard == Shard(3, spec["completions"])
    assert f"$({SHARD_INDEX_ENV})" in str(args.out), "each shard writes its own file"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    writable = [p for p, m in mounts.items() if not m.get("readOnly") and str(args.out).startswith(p + "/")]
    assert writable, f"--out {args.out} is not on a writable volume"
    volume = {v["name"]: v for v in pod["volumes"]}[mounts[writable[0]]["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == "tessera-captions"
    for path in args.inputs + [args.model]:
        assert any(path == p or path.startswith(p + "/") for p in mounts), f"{path} is not mounted"
    if "gpu" in target:
        assert args.device == "cuda" and "nvidia.com/gpu" in container["resources"]["limits"]


def test_dockerfile_installs_the_committed_lock():
    """The image installs torch at the locked release, then the project under the lock's other pins;
    the lock is in the build context."""
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^COPY requirements-lock\.txt /src/$", text, re.M)
    installs = re.findall(r"pip install [^\n]*", text)
    assert any('"$torch_pin"' in line and "TORCH_INDEX_URL" in line for line in installs)
    assert "grep '^torch==' /src/requirements-lock.txt" in text
    assert any(line.startswith("pip install -c /src/constraints.txt /src") for line in installs)
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert "!requirements-lock.txt" in ignore
    assert (DEPLOY.parent / "requirements-lock.txt").is_file()


def test_dockerfile_has_cpu_and_cuda_variants_a_non_root_user_and_no_weights():
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\S+)$", text, re.M)
    assert {"cpu-base", "cuda-base"} <= set(stages)
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M) and "FROM ${VARIANT}-base" in text
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["tessera"\]$', text, re.M)
    copies = re.findall(r"^COPY (.+)$", text, re.M)
    assert not any(re.search(r"\.(gguf|safetensors|bin)\b|models", line) for line in copies)
    home = re.search(r"--home-dir (\S+)", text).group(1)
    for docs in (render(K8S / "base"), render(K8S / "caption")):
        for container in all_containers(docs):
            cache = [m for m in container.get("volumeMounts", []) if m["name"] == "cache"]
            assert all(m["mountPath"] == f"{home}/.cache" for m in cache)
            # every role compiles numba kernels into NUMBA_CACHE_DIR at start (the gateway and the HTTP front
            # too: sampling and decoding): a read-only root needs that directory writable
            if container.get("securityContext", {}).get("readOnlyRootFilesystem"):
                assert any(not m.get("readOnly") for m in cache), f"{container['name']}: no writable {home}/.cache"
    assert re.search(rf"\bNUMBA_CACHE_DIR={re.escape(home)}/\.cache/", text)
    ignore = [line for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    assert ignore[0] == "*" and "**/*.safetensors" in ignore and "**/*.gguf" in ignore  # allow-list context
