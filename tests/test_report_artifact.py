"""The Prefect markdown artifact that leads to a run's report, for local and S3 artefact roots."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from diffpipe.tasks.artifacts import artifact_key, report_artifact_markdown
from diffpipe.tasks.tracking import ModelRef

from diffusion_core.pipeline.stages.evaluate import Evaluation
from diffusion_core.pipeline.stages.safety import SafetyRef
from diffusion_core.pipeline.store import ArtefactStore

MODEL = ModelRef("quick_start.v2", "3", ["challenger"], "models:/quick_start.v2/3")
EVALUATION = Evaluation({"fid": 4.734, "kid": 0.0012}, {"sampler": "ddim"})
SAFETY = SafetyRef("runs/r1/safety", 996, 4, {"invalid": 0.004})
DECISION = {"promoted": False, "reason": "FID 4.734 vs 4.900: a tie", "previous_champion": "2"}


def test_markdown_links_the_local_report(tmp_path: Path) -> None:
    store = ArtefactStore(str(tmp_path / "my artefacts"))
    url = store.url("runs/r1/report", "index.html")
    md = report_artifact_markdown(MODEL, EVALUATION, SAFETY, DECISION, url, run_id="r1")
    [link] = [line for line in md.splitlines() if line.startswith("[Open the full report](")]
    target = link.removeprefix("[Open the full report](").removesuffix(")")
    assert " " not in target and urlparse(target).scheme == "file"
    assert (
        Path(unquote(urlparse(target).path)) == tmp_path / "my artefacts/runs/r1/report/index.html"
    )
    assert "| fid | 4.734 |" in md
    assert "Published 996, quarantined 4." in md
    assert "Promotion: not promoted (FID 4.734 vs 4.900: a tie)." in md
    assert "run `r1`, artifacts under `report/`" in md
    assert not any(line.startswith((" ", "\t")) for line in md.splitlines())


def test_markdown_for_an_s3_root_names_the_object() -> None:
    url = ArtefactStore("s3://bucket/diffpipe").url("runs/r1/report", "index.html")
    md = report_artifact_markdown(MODEL, EVALUATION, SAFETY, DECISION, url)
    assert "`s3://bucket/diffpipe/runs/r1/report/index.html`" in md
    assert "aws s3 cp --recursive s3://bucket/diffpipe/runs/r1/report/ report/" in md
    assert "](" not in md and "MLflow" not in md


def test_artifact_keys_are_valid_prefect_keys() -> None:
    from prefect.client.schemas.actions import ArtifactCreate

    assert artifact_key("quickstart", "report") == "quickstart-report"
    assert artifact_key("Quick_Start.v2", "comparison") == "quick-start-v2-comparison"
    assert artifact_key("_x_", "metrics") == "x-metrics"
    for name in ("quickstart", "Quick_Start.v2", "a b/c"):
        ArtifactCreate(key=artifact_key(name, "report"))  # Prefect's own key validation
