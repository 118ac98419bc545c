"""The deployment files and work-pool job templates, read with Prefect's own models: the
deployments parse as `prefect deploy` reads them, the triggers as automations, and each job
template renders (with its defaults) into a job that requests GPUs and carries the rendezvous."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prefect.cli.deploy._models import PrefectYamlModel
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.events import DeploymentEventTrigger
from prefect.utilities.templating import apply_values

from diffusion_core.config import parse_config

DEPLOYMENTS = Path(__file__).resolve().parents[1] / "deployments"


@pytest.mark.parametrize("name", ["prefect.yaml", "prefect.remote.yaml"])
def test_deployment_files_parse_with_prefects_model(name: str) -> None:
    data = yaml.safe_load((DEPLOYMENTS / name).read_text())
    parsed = PrefectYamlModel.model_validate(data)
    by_name = {d.name: d for d in parsed.deployments}
    assert {"nightly-train", "evaluate"} <= set(by_name)
    nightly = by_name["nightly-train"]
    # One nightly run at a time.
    limit = nightly.concurrency_limit
    assert limit is not None and not isinstance(limit, int)
    assert (limit.limit, limit.collision_strategy) == (1, "CANCEL_NEW")
    for deployment in parsed.deployments:
        assert deployment.entrypoint and deployment.entrypoint.startswith("diffpipe.flows.")
        for trigger in deployment.triggers or []:
            DeploymentEventTrigger.model_validate({k: v for k, v in trigger.items() if k != "type"})
    # The parameters are what the flows accept: a packaged config and valid overrides.
    overrides = nightly.parameters.get("overrides", {})
    cfg = parse_config({})
    for key in overrides:
        section, _, field = key.partition(".")
        assert field in type(getattr(cfg, section)).model_fields, key


def test_the_remote_deployments_clone_a_pinned_commit() -> None:
    data = yaml.safe_load((DEPLOYMENTS / "prefect.remote.yaml").read_text())
    (step,) = data["pull"]
    clone = step["prefect.deployments.steps.git_clone"]
    assert clone["commit_sha"] == "{{ $DIFFPIPE_GIT_SHA }}" and "branch" not in clone


def _placeholders(value: object) -> set[str]:
    return set(re.findall(r"{{\s*([a-z_]+)\s*}}", json.dumps(value)))


@pytest.mark.parametrize(
    ("name", "kind"),
    [("kubernetes-job-template.json", "kubernetes"), ("docker-job-template.json", "docker")],
)
def test_job_templates_render_a_gpu_job(name: str, kind: str) -> None:
    template = json.loads((DEPLOYMENTS / name).read_text())
    pool = WorkPoolCreate(name="gpu", type=kind, base_job_template=template)
    variables = pool.base_job_template["variables"]["properties"]
    # Every placeholder of the job names a variable of the template.
    missing = _placeholders(template["job_configuration"]) - set(variables)
    assert not missing, missing
    defaults = {k: v["default"] for k, v in variables.items() if "default" in v}
    job = apply_values(template["job_configuration"], {**defaults, "name": "nightly"})
    if kind == "kubernetes":
        (container,) = job["job_manifest"]["spec"]["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        env = {e["name"]: e["value"] for e in container["env"]}
        assert {"DIFFPIPE_NNODES", "DIFFPIPE_NODE_RANK", "DIFFPIPE_RDZV_ENDPOINT"} <= set(env)
        assert env["DIFFPIPE_NNODES"] == "1"  # Kubernetes takes environment values as strings
    else:
        (request,) = job["container_create_kwargs"]["device_requests"]
        assert request["Count"] == -1 and request["Capabilities"] == [["gpu"]]
        assert job["container_create_kwargs"]["shm_size"] == "16g"


def test_deploy_names_bad_input_before_it_touches_the_server(tmp_path, monkeypatch, capsys):
    from diffpipe.flows.cli import main

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens there
    broken = tmp_path / "prefect.yaml"
    broken.write_text("deployments: [{name: x, entrypoint: 3, schedules: nope}]\n")
    assert main(["deploy", "--prefect-file", str(broken)]) == 2
    assert f"{broken}: not a Prefect deployment file" in capsys.readouterr().err
    assert main(["deploy", "--job-template", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert "--job-template" in err and "missing.json: not a JSON file" in err


def test_the_rejection_automation_parses_and_names_what_it_needs() -> None:
    from diffpipe.flows.runs import PLACEHOLDER
    from prefect.events.schemas.automations import AutomationCore

    text = (DEPLOYMENTS / "automations.yaml").read_text()
    data = yaml.safe_load(text)
    needed = set()

    def fill(value):
        if isinstance(value, str):
            needed.update(m.group(0) for m in PLACEHOLDER.finditer(value))
            return PLACEHOLDER.sub("00000000-0000-0000-0000-000000000001", value)
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return value

    (automation,) = [AutomationCore.model_validate(a) for a in fill(data)["automations"]]
    assert automation.trigger.expect == {"diffpipe.model.rejected"}
    (action,) = automation.actions
    assert action.type == "run-deployment" and action.parameters["model_name"].startswith("{{")
    assert needed == {"{{ deployment:compare/compare }}"}  # the commented block is not read
