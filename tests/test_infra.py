"""Offline checks of ``infra/``: every manifest against the real schemas, every command line
against the CLI's own parser, and the links between manifests and the image.

KubeRay kinds are validated with ``jsonschema`` against the ``openAPIV3Schema`` of the served
``v1`` version in the KubeRay v1.7.0 CRDs (``reference/kuberay-crds``), made strict
the way ``kubectl --validate=strict`` is (an unknown field is an error); their ``metadata`` is
checked as an ObjectMeta. Built-in kinds go through ``kubernetes-validate`` (strict, offline).
Templates are rendered with example values first (``envsubst`` variables).
"""

from __future__ import annotations

import copy
import gzip
import re
import shlex
import string
from functools import cache
from pathlib import Path
from typing import Any

import click
import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
CRDS = ROOT / "reference" / "kuberay-crds"
KUBERNETES_VERSION = "1.31"
PROG = "invardiff-registry"
# Example values for the templates' envsubst variables.
TEMPLATE_VALUES = {
    "JOB_NAME": "digits-flux-16",
    "MODEL": "digits-flux",
    "RESOLUTION": "16",
    "TRAJECTORIES": "8",
    "MIN_PSNR": "30",
}
KUBERAY_KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayCronJob": "raycronjobs"}


# ---- loading ------------------------------------------------------------------------------
def manifest_files() -> list[Path]:
    files = sorted([*INFRA.glob("k8s/*.yaml"), *INFRA.glob("templates/*.yaml")])
    assert files, f"no manifests under {INFRA}"
    return files


def render(text: str) -> str:
    """A template with its variables substituted (a plain manifest is returned unchanged)."""
    return string.Template(text).substitute(TEMPLATE_VALUES)


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(render(path.read_text())) if d is not None]


@cache
def all_documents() -> tuple[tuple[str, dict[str, Any]], ...]:
    return tuple((p.name, d) for p in manifest_files() for d in documents(p))


def the(kind: str) -> dict[str, Any]:
    """The one manifest of ``kind``."""
    found = [d for _, d in all_documents() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return copy.deepcopy(found[0])


# ---- schema validation --------------------------------------------------------------------
def strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever the API server would drop them."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    result = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        result["additionalProperties"] = False
    return result


@cache
def crd_schema(kind: str) -> dict[str, Any]:
    """The strict ``openAPIV3Schema`` of the served ``v1`` version of a KubeRay CRD."""
    with gzip.open(CRDS / f"ray.io_{KUBERAY_KINDS[kind]}.yaml.gz", "rt") as file:
        crd = yaml.load(file, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert version["served"], f"{kind} v1 is not served by KubeRay v1.7.0"
    return strict(version["schema"]["openAPIV3Schema"])


def validate(document: dict[str, Any]) -> None:
    """Raise when ``document`` would be refused by a cluster with KubeRay v1.7.0."""
    kind = document.get("kind")
    if kind in KUBERAY_KINDS:
        assert document.get("apiVersion") == "ray.io/v1", f"{kind} must be ray.io/v1"
        jsonschema.Draft7Validator(crd_schema(kind)).validate(document)
        # The CRD schema leaves metadata open; check it as the ObjectMeta it is.
        stand_in = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": document["metadata"]}
        kubernetes_validate.validate(stand_in, KUBERNETES_VERSION, strict=True)
    else:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


SCHEMA_ERRORS = (jsonschema.ValidationError, kubernetes_validate.ValidationError)


# ---- command lines ------------------------------------------------------------------------
def command_lines(node: Any) -> list[list[str]]:
    """Every ``invardiff-registry`` command line in a manifest: container commands (with
    their args) and RayJob entrypoints (shell strings)."""
    found: list[list[str]] = []
    if isinstance(node, dict):
        command = node.get("command")
        if isinstance(command, list) and command and command[0] == PROG:
            found.append([*command, *node.get("args", [])])
        entrypoint = node.get("entrypoint")
        if isinstance(entrypoint, str) and shlex.split(entrypoint)[:1] == [PROG]:
            found.append(shlex.split(entrypoint))
        for value in node.values():
            found += command_lines(value)
    elif isinstance(node, list):
        for value in node:
            found += command_lines(value)
    return found


def parse_command_line(argv: list[str]) -> click.Context:
    """Parse ``argv`` with the CLI's own click commands without running anything: resolve
    each (sub)group's subcommand and parse its options and arguments (types included)."""
    from registry.cli import main

    assert argv[0] == PROG
    command: click.Command = main
    name, args, context = PROG, argv[1:], None
    while True:
        context = command.make_context(name, list(args), parent=context)
        if not isinstance(command, click.Group):
            return context
        rest = [*getattr(context, "_protected_args", []), *context.args]
        name, found, args = command.resolve_command(context, rest)
        assert found is not None, f"no command {name!r}"
        command = found


# ---- the manifests ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "document"),
    all_documents(),
    ids=[f"{name}:{d['kind']}" for name, d in all_documents()],
)
def test_manifest_is_valid(name: str, document: dict[str, Any]) -> None:
    validate(document)


def test_the_expected_kinds_are_there() -> None:
    kinds = sorted(d["kind"] for _, d in all_documents())
    for kind in (
        "CronJob",
        "Job",
        "PersistentVolumeClaim",
        "RayCluster",
        "RayJob",
        "Role",
        "RoleBinding",
        "Secret",
        "ServiceAccount",
    ):
        assert kind in kinds


def test_cluster_autoscales_gpu_workers_from_zero_with_token_auth() -> None:
    spec = the("RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu["replicas"] == 0 and gpu["maxReplicas"] >= 1
    (worker,) = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_rayjob_runs_one_calibration_with_deadline_retries_and_cleanup() -> None:
    job = the("RayJob")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == [PROG, "calibrate"]
    assert argv[argv.index("--ray-address") + 1] == "auto"
    assert job["activeDeadlineSeconds"] > 0 and job["backoffLimit"] >= 1
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    assert job["rayClusterSpec"] == the("RayCluster")["spec"], "the job's cluster drifted"


def test_cronjob_recalibrates_against_the_cluster_without_overlap() -> None:
    cron = the("CronJob")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    (container,) = cron["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["command"][:3] == [PROG, "recalibrate", "--due"]
    env = {e["name"]: e for e in container["env"]}
    cluster = the("RayCluster")
    head_service = f"{cluster['metadata']['name']}-head-svc"  # KubeRay's naming
    assert re.fullmatch(rf"http://{head_service}:8265", env["RAY_ADDRESS"]["value"])
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    token = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token == {"name": cluster["spec"]["authOptions"]["secretName"], "key": "auth_token"}


def cluster_specs() -> dict[str, dict[str, Any]]:
    """Every Ray cluster spec: the long-lived RayCluster's and the RayJob template's."""
    return {
        "RayCluster": the("RayCluster")["spec"],
        "RayJob": the("RayJob")["spec"]["rayClusterSpec"],
    }


def _allowed(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    return any(
        group in rule.get("apiGroups", []) and resource in rule.get("resources", [])
        and verb in rule.get("verbs", [])
        for rule in rules
    )  # fmt: skip


def _mounts_token(pod: dict[str, Any]) -> bool:
    """Whether a pod gets its service account's API token (the pod's setting wins)."""
    if "automountServiceAccountToken" in pod:
        return pod["automountServiceAccountToken"]
    accounts = {
        d["metadata"]["name"]: d for _, d in all_documents() if d["kind"] == "ServiceAccount"
    }
    return accounts[pod.get("serviceAccountName", "default")].get(
        "automountServiceAccountToken", True
    )


# What Ray's KubeRay autoscaler calls (ray/autoscaler/_private/kuberay/node_provider.py and
# autoscaler/v2/.../kuberay/cloud_provider.py): GET/PATCH rayclusters/<name>, GET pods/<head>,
# LIST pods?labelSelector=...
AUTOSCALER_CALLS = [("", "pods", "get"), ("", "pods", "list"), ("ray.io", "rayclusters", "get"),
                    ("ray.io", "rayclusters", "patch")]  # fmt: skip


@pytest.mark.parametrize("which", ["RayCluster", "RayJob"])
def test_the_autoscaler_has_a_token_and_the_permissions_it_uses(which: str) -> None:
    spec = cluster_specs()[which]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]["template"]["spec"]
    assert _mounts_token(head), "the head's autoscaler sidecar gets no Kubernetes API token"
    account = head["serviceAccountName"]
    roles = {d["metadata"]["name"]: d for _, d in all_documents() if d["kind"] == "Role"}
    granted = [
        rule
        for _, binding in all_documents()
        if binding["kind"] == "RoleBinding"
        and {"kind": "ServiceAccount", "name": account} in binding["subjects"]
        and binding["roleRef"]["kind"] == "Role"
        for rule in roles[binding["roleRef"]["name"]]["rules"]
    ]
    missing = [call for call in AUTOSCALER_CALLS if not _allowed(granted, *call)]
    assert not missing, f"{account} may not {missing}"
    for group in spec["workerGroupSpecs"]:  # no other pod needs the API
        assert not _mounts_token(group["template"]["spec"])


@pytest.mark.parametrize("which", ["RayCluster", "RayJob"])
def test_the_workers_ask_for_what_the_gpu_group_offers(which: str) -> None:
    """The drivers on the head ask for GPUs even when no GPU node runs yet (the autoscaler
    adds them on demand); each actor's request fits one pod of the GPU group, and the worker
    cap the head declares is what the group can ever offer."""
    from workers.pool import GPUS_ENV, MAX_WORKERS_ENV, START_TIMEOUT_ENV, worker_resources

    spec = cluster_specs()[which]
    (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in head.get("env", [])}
    gpus = float(env[GPUS_ENV])
    assert gpus > 0, "the cluster's GPU workers start from zero: drivers must ask for GPUs"
    asked = worker_resources(gpus, 1.0)
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # actors never on the head
    offered = 0
    for group in spec["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        pod_gpus = float(group["rayStartParams"].get("num-gpus", limits.get("nvidia.com/gpu", 0)))
        pod_cpus = float(group["rayStartParams"].get("num-cpus", limits["cpu"]))
        if pod_gpus >= asked["num_gpus"] and pod_cpus >= asked["num_cpus"]:
            offered += group["maxReplicas"] * int(pod_gpus // asked["num_gpus"])
    assert offered > 0, f"no worker group offers {asked}"
    assert int(env[MAX_WORKERS_ENV]) == offered
    assert float(env[START_TIMEOUT_ENV]) >= 600  # room for a GPU node to come up


def test_the_rayjob_promotes_only_through_the_quality_gate() -> None:
    context = parse_command_line(shlex.split(the("RayJob")["spec"]["entrypoint"]))
    assert context.params["promote_alias"] == "production"
    assert context.params["min_psnr"] == float(TEMPLATE_VALUES["MIN_PSNR"])
    assert context.params["validate"] > 0


def _find(node: Any, key: str) -> list[Any]:
    """Every value of ``key`` anywhere in ``node``."""
    if isinstance(node, dict):
        own = [node[key]] if key in node else []
        return own + [v for value in node.values() for v in _find(value, key)]
    if isinstance(node, list):
        return [v for value in node for v in _find(value, key)]
    return []


def test_references_between_manifests_resolve() -> None:
    docs = [d for _, d in all_documents()]
    secret = the("Secret")
    ray_auth = the("RayCluster")["spec"]["authOptions"]["secretName"]
    keys = {secret["metadata"]["name"]: set(secret["stringData"]), ray_auth: {"auth_token"}}
    for ref in _find(docs, "secretRef"):
        assert ref["name"] == secret["metadata"]["name"]
    for ref in _find(docs, "secretKeyRef"):
        assert ref["key"] in keys[ref["name"]]
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert {c["claimName"] for c in _find(docs, "persistentVolumeClaim")} <= claims
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    assert set(_find(docs, "serviceAccountName")) == accounts
    assert len(set(_find(docs, "image"))) == 1, "every pod runs the one worker image"


def test_secret_template_holds_no_credentials() -> None:
    values = the("Secret")["stringData"]
    assert {"INVARDIFF_DATABASE_URL", "INVARDIFF_STORE_URL"} <= set(values)
    for name in ("INVARDIFF_DATABASE_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "CHANGE_ME" in values[name]


def test_every_command_line_parses() -> None:
    lines = [line for _, d in all_documents() for line in command_lines(d)]
    assert {line[1] for line in lines} >= {"calibrate", "recalibrate", "init"}
    for line in lines:
        parse_command_line(line)


def test_the_submitted_recalibration_entrypoint_parses() -> None:
    from workers.schedule import job_entrypoint

    context = parse_command_line(shlex.split(job_entrypoint("ab" * 32, 4, "production")))
    assert context.params["job_ref"] == "ab" * 32 and context.params["ray_address"] == "auto"
    assert (context.params["workers"], context.params["promote_alias"]) == (4, "production")


# ---- the checks fail on broken manifests ----------------------------------------------------
DELETE = object()


def _set(document: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    node = document
    *parents, last = path.split(".")
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return document


BROKEN = {
    "unknown RayCluster field": ("RayCluster", "spec.workerGroupSpecs.0.minReplica", 0),
    "rayStartParams value not a string": (
        "RayCluster",
        "spec.headGroupSpec.rayStartParams.num-cpus",
        0,
    ),
    "RayCluster missing head": ("RayCluster", "spec.headGroupSpec", DELETE),
    "bad auth mode": ("RayCluster", "spec.authOptions.mode", "password"),
    "RayJob backoffLimit not a number": ("RayJob", "spec.backoffLimit", "once"),
    "RayJob bad metadata": ("RayJob", "metadata.labels", ["calibrate"]),
    "CronJob unknown container field": (
        "CronJob",
        "spec.jobTemplate.spec.template.spec.containers.0.comand",
        ["x"],
    ),
    "CronJob schedule not a string": ("CronJob", "spec.schedule", 3),
    "Secret value not a string": ("Secret", "stringData.AWS_DEFAULT_REGION", 1),
    "ServiceAccount unknown field": ("ServiceAccount", "automountToken", False),
    "Role verbs not a list": ("Role", "rules.0.verbs", "get"),
    "RoleBinding without its role": ("RoleBinding", "roleRef", DELETE),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_a_broken_manifest_is_refused(case: str) -> None:
    kind, path, value = BROKEN[case]
    broken = _set(the(kind), path, value)
    with pytest.raises(SCHEMA_ERRORS):
        validate(broken)


@pytest.mark.parametrize(
    "argv",
    [
        "invardiff-registry recalibrate --due --max-age soon",
        "invardiff-registry recalibrate --due --max-days 30",
        "invardiff-registry calibrate digits-flux 16x --ray-address auto",
        "invardiff-registry calibrate digits-flux 16 --ray-adress auto",
        "invardiff-registry calibrat digits-flux 16",
        "invardiff-registry --database-url",
    ],
)
def test_a_broken_command_line_is_refused(argv: str) -> None:
    with pytest.raises(click.UsageError):
        parse_command_line(shlex.split(argv))


# ---- the image ----------------------------------------------------------------------------
def test_image_is_cuda_pytorch_with_the_fleet_extra_and_the_cluster_ray() -> None:
    dockerfile = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.MULTILINE)
    assert base and re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", base[1])
    assert re.search(r"pip install .*\"\.\[fleet\]\"", dockerfile)
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.MULTILINE)[1]
    assert the("RayCluster")["spec"]["rayVersion"] == ray_version
    assert the("RayJob")["spec"]["rayClusterSpec"]["rayVersion"] == ray_version


def test_image_context_holds_every_package() -> None:
    find = re.search(r"^include = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    included = re.findall(r'"([^"]+)"', find[1])
    allowed = {
        line[1:]
        for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    assert {"pyproject.toml", "README.md"} <= allowed
    assert {p.rstrip("*") for p in included} <= allowed
