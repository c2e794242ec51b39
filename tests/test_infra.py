"""The cluster manifests in infra/: schemas, image, entrypoints, schedules, credentials.

KubeRay objects are validated against the CRDs of KubeRay 1.7 (SAR_KUBERAY_CRDS, default
`../shared/kuberay` beside the repository; those tests skip, saying so, where it is absent) with
unknown fields rejected, as `kubectl apply --validate=strict` would; the AWS
cluster-launcher file against Ray's own `ray-schema.json`. Every entrypoint must be a `sar`
command line that parses and whose config resolves.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import tomllib
import zoneinfo
from functools import cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

from jobs.config import ConfigError, load_config
from jobs.parser import build_parser
from jobs.stages import NAMES as STAGES

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
# The KubeRay CRDs: $SAR_KUBERAY_CRDS (relative to the repository), else ../shared/kuberay.
CRD_DIR = (REPO / os.environ.get("SAR_KUBERAY_CRDS", "../shared/kuberay")).resolve()
KUBERAY_KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayCronJob": "raycronjobs"}
# Images that are not the project's: the CronJob's kubectl.
UTILITY_IMAGES = ("registry.k8s.io/kubectl:",)
SECRET_NAME = "sar-object-store"
SERVICE_ACCOUNT = "sar"
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 3 MB of YAML


# Loading ---------------------------------------------------------------------------------
def _manifest_files() -> list[Path]:
    return sorted(INFRA.glob("k8s/*.yaml"))


@cache
def _documents() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(file name, object) for every Kubernetes object, RayJobs kept in ConfigMaps included."""
    out = []
    for path in _manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            out.append((path.name, doc))
            if doc["kind"] == "ConfigMap":
                for key, text in doc.get("data", {}).items():
                    if key.endswith((".yaml", ".yml")):
                        out.append((f"{path.name}:{doc['metadata']['name']}/{key}", yaml.safe_load(text)))
    return tuple(out)


def _objects(*kinds: str) -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name, doc in _documents() if doc["kind"] in kinds]


def _ray_job_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every RayJob spec: RayJobs themselves and RayCronJob job templates."""
    specs = [(name, doc["spec"]) for name, doc in _objects("RayJob")]
    specs += [(name, doc["spec"]["jobTemplate"]) for name, doc in _objects("RayCronJob")]
    return specs


def _ray_cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    specs = [(name, doc["spec"]) for name, doc in _objects("RayCluster")]
    specs += [(name, s["rayClusterSpec"]) for name, s in _ray_job_specs() if "rayClusterSpec" in s]
    return specs


def _walk(node: Any, key: str) -> Iterator[Any]:
    """Every value stored under `key` anywhere in a YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of infra/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (INFRA / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _workdir() -> str:
    return [args for word, args in _dockerfile() if word == "WORKDIR"][-1]


# CRD schemas -----------------------------------------------------------------------------
def _strict(schema: Any) -> Any:
    """Close every object schema that lists its properties, as strict server validation does."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _crd_path(kind: str) -> Path:
    """The CRD file of a KubeRay kind; the test skips, naming the folder, when it is not there."""
    path = CRD_DIR / f"ray.io_{KUBERAY_KINDS[kind]}.yaml"
    if not path.is_file():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR}: set SAR_KUBERAY_CRDS to shared/kuberay to validate "
                    "the manifests")
    return path


@cache
def _crd_schema(kind: str, version: str) -> dict[str, Any]:
    path = _crd_path(kind)
    crd = yaml.load(path.read_text(), Loader=_YAML_LOADER)
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            assert v["served"], f"{kind} {version} is not served by KubeRay 1.7"
            return _strict(v["schema"]["openAPIV3Schema"])
    raise AssertionError(f"KubeRay 1.7 has no {kind} version {version}")


def _validate_kuberay(doc: dict[str, Any]) -> None:
    group, _, version = doc["apiVersion"].partition("/")
    assert group == "ray.io", doc["apiVersion"]
    jsonschema.Draft7Validator(_crd_schema(doc["kind"], version)).validate(doc)


def test_every_manifest_parses_and_names_itself():
    assert {p.name for p in _manifest_files()} >= {
        "raycluster.yaml", "rayjob-run.yaml", "raycronjob-retrain.yaml", "cronjob-retrain.yaml",
        "serviceaccount.yaml", *(f"rayjob-{s}.yaml" for s in STAGES),
    }
    for name, doc in _documents():
        assert doc.get("apiVersion") and doc.get("kind"), name
        meta = doc.get("metadata", {})
        assert meta.get("name") or meta.get("generateName"), f"{name}: {doc['kind']} has no name"


def test_kuberay_objects_match_the_crd_schemas():
    kuberay = _objects(*KUBERAY_KINDS)
    assert {doc["kind"] for _, doc in kuberay} == set(KUBERAY_KINDS)
    for name, doc in kuberay:
        try:
            _validate_kuberay(doc)
        except jsonschema.ValidationError as err:
            path = ".".join(str(p) for p in err.absolute_path)
            pytest.fail(f"{name}: {doc['kind']} invalid at {path}: {err.message}")


def test_the_schema_check_rejects_a_misspelt_field():
    _, doc = _objects("RayCluster")[0]
    bad = copy.deepcopy(doc)
    bad["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        _validate_kuberay(bad)


def test_embedded_cluster_specs_are_the_raycluster_spec():
    (_, cluster), = _objects("RayCluster")
    copies = [(name, spec) for name, spec in _ray_cluster_specs() if spec is not cluster["spec"]]
    assert len(copies) >= 3  # the whole run, the RayCronJob, the CronJob's RayJob
    for name, spec in copies:
        assert spec == cluster["spec"], f"{name}: rayClusterSpec differs from raycluster.yaml's spec"


def test_clusters_autoscale_a_gpu_group_on_the_images_ray():
    import ray

    for name, spec in _ray_cluster_specs():
        assert spec["rayVersion"] == ray.__version__, name
        assert spec["enableInTreeAutoscaling"] is True, name
        gpu_groups = [g for g in spec["workerGroupSpecs"]
                      if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                             for c in g["template"]["spec"]["containers"])]
        assert gpu_groups, f"{name}: no GPU worker group"
        for g in gpu_groups:
            assert g["minReplicas"] == 0 < g["maxReplicas"], f"{name}: {g['groupName']} does not scale from zero"


# Image -------------------------------------------------------------------------------------
def _project_images() -> list[tuple[str, str]]:
    images = [(name, img) for name, doc in _documents() for img in _walk(doc, "image")]
    aws = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    images.append(("aws/cluster.yaml", aws["docker"]["image"]))
    return [(name, img) for name, img in images if not img.startswith(UTILITY_IMAGES)]


def test_every_image_reference_is_the_one_project_image():
    images = _project_images()
    assert len(images) == 2 * len(_ray_cluster_specs()) + 1  # head and workers of each, the launcher
    names = {img for _, img in images}
    assert len(names) == 1, f"several images: {sorted(names)}"
    image = names.pop()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert image.rsplit(":", 1)[1] == version, f"{image}: tag is not the project version {version}"
    assert f"-t {image} " in (INFRA / "Dockerfile").read_text(), "the Dockerfile's build command names another image"


# Entrypoints -------------------------------------------------------------------------------
def _check_sar_command(where: str, line: str) -> list[str]:
    argv = shlex.split(line)
    assert argv[0] == "sar", f"{where}: entrypoint is not a sar command: {line}"
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{where}: `sar` rejects its entrypoint: {line}")
    assert args.config, f"{where}: no --config in {line}"
    prefix = _workdir().rstrip("/") + "/configs/"
    assert args.config.startswith(prefix), f"{where}: --config {args.config} is not under {prefix} in the image"
    local = REPO / "configs" / args.config[len(prefix):]
    assert local.is_file(), f"{where}: --config {args.config}: no {local.relative_to(REPO)}"
    try:
        load_config(local, args.overrides)
    except ConfigError as err:  # an unknown key or a bad value
        pytest.fail(f"{where}: {err}")
    return argv


def test_every_entrypoint_is_a_valid_sar_command():
    commands = {}
    for name, spec in _ray_job_specs():
        argv = _check_sar_command(name, spec["entrypoint"])
        commands.setdefault(argv[1], []).append(name)
    assert set(commands) == {*STAGES, "run"}, commands
    for stage in STAGES:
        assert f"rayjob-{stage}.yaml" in commands[stage]


def test_the_entrypoint_check_catches_a_bad_override():
    with pytest.raises(pytest.fail.Exception, match="unknown config key 'nosuch'"):
        _check_sar_command("test", f"sar run --config {_workdir()}/configs/demo.yaml --set nosuch=1")


def test_stage_jobs_use_the_long_lived_cluster_and_the_run_brings_its_own():
    (_, cluster), = _objects("RayCluster")
    for name, spec in _ray_job_specs():
        if name.startswith("rayjob-") and name != "rayjob-run.yaml":
            assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}, name
            assert "rayClusterSpec" not in spec, name
        else:
            assert "rayClusterSpec" in spec and spec["shutdownAfterJobFinishes"] is True, name


# Schedules ---------------------------------------------------------------------------------
_CRON_FIELDS = [(0, 59, {}), (0, 23, {}), (1, 31, {}),
                (1, 12, {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())}),
                (0, 7, {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())})]
_CRON_MACROS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def cron_error(expr: str) -> str | None:
    """Why `expr` is not a Kubernetes (robfig/cron, 5-field) schedule, or None if it is."""
    if expr.strip() in _CRON_MACROS:
        return None
    fields = expr.split()
    if len(fields) != 5:
        return f"{len(fields)} fields, not 5"
    for text, (lo, hi, names) in zip(fields, _CRON_FIELDS):
        for part in text.split(","):
            rng, _, step = part.partition("/")
            if step and (not step.isdigit() or int(step) < 1):
                return f"bad step in {part!r}"
            if rng in ("*", "?"):
                continue
            ends = rng.split("-")
            if len(ends) > 2:
                return f"bad range {part!r}"
            values = []
            for end in ends:
                value = names.get(end.lower()) if end.lower() in names else (int(end) if end.isdigit() else None)
                if value is None or not lo <= value <= hi:
                    return f"{end!r} is outside {lo}-{hi}"
                values.append(value)
            if len(values) == 2 and values[0] > values[1]:
                return f"empty range {part!r}"
    return None


def test_the_cron_check():
    for good in ("0 3 * * 0", "*/15 * * * *", "0 0 1 jan,jul *", "30 2 * * mon-fri", "@weekly"):
        assert cron_error(good) is None, good
    for bad in ("0 3 * *", "61 * * * *", "0 24 * * *", "0 0 0 * *", "* * * * 8", "*/0 * * * *", "0 5-2 * * *"):
        assert cron_error(bad) is not None, bad


def test_schedules_are_valid_cron_and_agree():
    schedules = {}
    for name, doc in _objects("RayCronJob", "CronJob"):
        spec = doc["spec"]
        assert cron_error(spec["schedule"]) is None, f"{name}: {spec['schedule']!r}: {cron_error(spec['schedule'])}"
        if "timeZone" in spec:
            zoneinfo.ZoneInfo(spec["timeZone"])  # raises for an unknown zone
        schedules[doc["kind"]] = (spec["schedule"], spec.get("timeZone"))
    assert set(schedules) == {"RayCronJob", "CronJob"}
    assert schedules["RayCronJob"] == schedules["CronJob"], "the two retraining schedules differ"


def test_the_cronjob_may_create_rayjobs_and_creates_the_retraining_job():
    (_, cron), = _objects("CronJob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    account = pod["serviceAccountName"]
    assert any(doc["metadata"]["name"] == account for _, doc in _objects("ServiceAccount"))
    bindings = [doc for _, doc in _objects("RoleBinding")
                if any(s["kind"] == "ServiceAccount" and s["name"] == account for s in doc["subjects"])]
    assert bindings, f"no RoleBinding for {account}"
    roles = {doc["metadata"]["name"]: doc for _, doc in _objects("Role")}
    rules = [r for b in bindings for r in roles[b["roleRef"]["name"]]["rules"]]
    assert any("ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and "create" in r["verbs"] for r in rules)

    (container,) = pod["containers"]
    assert container["image"].startswith(UTILITY_IMAGES)
    argv = container.get("command", []) + container.get("args", [])
    assert argv[:3] == ["kubectl", "create", "-f"]
    mount = next(m for m in container["volumeMounts"] if argv[3].startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmaps = {doc["metadata"]["name"]: doc for _, doc in _objects("ConfigMap")}
    job = yaml.safe_load(configmaps[volume["configMap"]["name"]]["data"][os.path.basename(argv[3])])
    assert job["kind"] == "RayJob" and "generateName" in job["metadata"]  # `create` makes a new one each time
    (_, raycron), = _objects("RayCronJob")
    assert job["spec"] == raycron["spec"]["jobTemplate"], "the CronJob's RayJob differs from the RayCronJob's"


# Credentials -------------------------------------------------------------------------------
def test_ray_pods_get_credentials_from_the_platform_or_a_secret():
    (_, account), = [(n, d) for n, d in _objects("ServiceAccount") if d["metadata"]["name"] == SERVICE_ACCOUNT]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+",
                        account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"])
    for name, spec in _ray_cluster_specs():
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            pod = group["template"]["spec"]
            assert pod["serviceAccountName"] == SERVICE_ACCOUNT, name
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            ray_container = pod["containers"][0]  # KubeRay's Ray container is the first
            refs = [e["secretRef"] for e in ray_container.get("envFrom", []) if "secretRef" in e]
            assert {"name": SECRET_NAME, "optional": True} in refs, f"{name}: no envFrom {SECRET_NAME}"
            for env in ray_container.get("env", []):
                assert "value" not in env or not re.search(r"KEY|SECRET|TOKEN|PASSWORD", env["name"]), name


def test_no_credentials_are_written_into_infra():
    secret_like = re.compile(
        r"AKIA[0-9A-Z]{16}"  # an AWS access key id
        r"|aws_secret_access_key\s*[:=]\s*\S"
        r"|AWS_SECRET_ACCESS_KEY\s*[:=]\s*['\"]?[A-Za-z0-9/+]{20}",
    )
    files = [p for p in INFRA.rglob("*") if p.is_file()]
    assert len(files) >= 12
    for path in files:
        assert not secret_like.search(path.read_text()), f"{path.relative_to(REPO)} holds a credential"
    for word, args in _dockerfile():
        if word in ("ENV", "ARG"):
            assert not re.search(r"AWS_|SECRET|TOKEN|PASSWORD", args), f"Dockerfile {word} {args}"


# Dockerfile --------------------------------------------------------------------------------
def test_dockerfile_builds_the_locked_environment_as_a_non_root_user():
    steps = _dockerfile()
    base = [args for word, args in steps if word == "FROM"][-1]
    assert "cuda" in base, base
    runs = [args for word, args in steps if word == "RUN"]
    assert any(re.search(r"\buv sync\b.*--locked", r) for r in runs)
    assert not any(re.search(r"\bpip install\b", r) for r in runs), "packages outside uv.lock"
    user = [args for word, args in steps if word == "USER"][-1].split(":")[0]
    assert user not in ("root", "0"), user
    assert _workdir() == "/app"
    copies_project = any(word == "COPY" and args.split()[:2] == [".", "."] for word, args in steps)
    assert copies_project, "the project is not in the image"


def test_docker_build_context_keeps_the_project():
    ignored = [line.strip().strip("/") for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for needed in ("configs", "jobs", "pipelines", "models", "pyproject.toml", "uv.lock"):
        assert needed not in ignored, needed
    assert ".venv" in ignored and ".git" in ignored


# AWS cluster launcher ----------------------------------------------------------------------
def test_aws_cluster_launcher_config_matches_rays_schema():
    import ray.autoscaler

    cfg = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["provider"]["type"] == "aws"
    assert cfg["head_node_type"] in cfg["available_node_types"]
    for name, node in cfg["available_node_types"].items():
        profile = node["node_config"]["IamInstanceProfile"]["Arn"]  # S3 access from the instance role
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", profile), name
    gpu = [n for n in cfg["available_node_types"].values() if n["node_config"]["InstanceType"].startswith(("p", "g"))]
    assert gpu and all(n["min_workers"] == 0 for n in gpu)
    assert not cfg["setup_commands"], "the image holds the environment: nothing to install at boot"
