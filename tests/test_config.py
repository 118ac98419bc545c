from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from diffusion_core.config import ConfigError, RunConfig, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_config_is_valid():
    cfg = load_config(REPO / "configs" / "quickstart.yaml")
    assert cfg.data.kind == "digits" and cfg.model.class_conditional


def test_unknown_key_names_file_key_and_allowed(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"train": {"stepz": 10}}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "train.stepz" in msg and "steps" in msg


def test_unknown_top_level_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trian: {}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*train"):
        load_config(path)


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError) as err:
        parse_config({"diffusion": {"schedule": "quadratic"}}, source="x.yaml")
    msg = str(err.value)
    assert "x.yaml" in msg and "diffusion.schedule" in msg
    assert "'linear'" in msg and "'cosine'" in msg and "'quadratic'" in msg


def test_bad_number_names_key():
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        parse_config({"train": {"batch_size": 0}})


def test_ddims_eta_out_of_range_is_refused_at_load_not_at_sampling():
    """DDIM's eta lives in [0, 1]: 2 is a config error naming the key, not a sampler error after
    the training; a request to a registered model is refused likewise."""
    from pydantic import ValidationError

    from diffusion_core.sampling import SampleRequest

    with pytest.raises(ConfigError, match=r"sample\.eta.*less than or equal to 1"):
        parse_config({"sample": {"eta": 2.0}})
    assert parse_config({"sample": {"eta": 1.0}}).sample.eta == 1.0
    with pytest.raises(ValidationError, match=r"eta"):
        SampleRequest(eta=1.5)


def test_root_required_for_folder():
    with pytest.raises(ConfigError, match=r"data\.root is required"):
        parse_config({"data": {"kind": "folder"}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_overrides_and_hash(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: a\n")
    cfg = load_config(path, {"train.steps": 7, "sample.sampler": "ddpm"})
    assert cfg.train.steps == 7 and cfg.sample.sampler == "ddpm"
    assert cfg.hash() == RunConfig.model_validate(cfg.to_dict()).hash()
    assert cfg.hash() != load_config(path).hash()


def test_every_setting_is_described_and_the_readme_table_is_the_generated_one() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "config_reference", Path(__file__).resolve().parents[1] / "docs" / "config_reference.py"
    )
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = script.reference_rows()
    assert all(doc for _, _, _, doc in rows), [key for key, _, _, doc in rows if not doc]
    assert "| `train.lr` | float | `0.002` |" in script.reference_markdown()
    readme = script.README.read_text()
    assert script.with_reference(readme) == readme, "run: python docs/config_reference.py"


def test_a_removed_key_is_refused_with_what_to_use_instead() -> None:
    with pytest.raises(ConfigError, match=r"sample\.num_samples .*pipeline\.num_samples"):
        parse_config({"sample": {"num_samples": 10}})


def test_training_identity_changes_only_with_what_changes_the_weights() -> None:
    base = parse_config({})
    same = [
        {"sample": {"guidance_scale": 3.0, "steps": 7}},
        {"safety": {"detectors": [{"name": "sanity"}]}},
        {"evaluation": {"interval_draws": 5}},
        {"pipeline": {"shards": 5, "watermark": {"enabled": True}}},
        {"train": {"log_every": 1, "checkpoint_every": 3, "num_threads": 1}},
        {"name": "renamed"},
    ]
    for change in same:
        assert parse_config(change).training_identity("d") == base.training_identity("d"), change
    different = [
        {"train": {"lr": 1e-4}},
        {"model": {"base_channels": 16}},
        {"diffusion": {"prediction": "v"}},
        {"train": {"seed": 1}},
    ]
    for change in different:
        assert parse_config(change).training_identity("d") != base.training_identity("d"), change
    assert base.training_identity("d") != base.training_identity("e")  # other data


def test_training_identity_names_a_text_model_file_by_its_content(tmp_path: Path) -> None:
    """Two checkouts of the same config (another worker, another path) resume each other's run;
    a changed text encoder config does not."""
    clip = (REPO / "configs" / "clip" / "tiny-clip.json").read_text()
    for where in ("a", "b", "c"):
        (tmp_path / where / "clip").mkdir(parents=True)
        (tmp_path / where / "clip" / "tiny-clip.json").write_text(clip)
        config = {
            "name": "t",
            "model": {"class_conditional": False},
            "text": {"model": "clip/tiny-clip.json"},
        }
        (tmp_path / where / "run.yaml").write_text(yaml.safe_dump(config))
    changed = json.loads(clip)
    changed["text_cfg"]["layers"] += 1
    (tmp_path / "c" / "clip" / "tiny-clip.json").write_text(json.dumps(changed))
    a, b, c = (load_config(tmp_path / w / "run.yaml") for w in ("a", "b", "c"))
    assert a.text is not None and b.text is not None and a.text.model != b.text.model
    assert a.training_identity("d") == b.training_identity("d")
    assert c.training_identity("d") != a.training_identity("d")
    # Weights checked against a digest are named by it, wherever they are kept.
    digest = "ab" * 32

    def weights(where: str, sha256: str) -> RunConfig:
        text = {"model": "tiny", "pretrained": f"{where}/w.bin", "sha256": sha256}
        return parse_config({"model": {"class_conditional": False}, "text": text})

    kept = [weights(where, digest) for where in ("/mnt/x", "s3://bucket")]
    assert kept[0].training_identity("d") == kept[1].training_identity("d")
    other = weights("/mnt/x", "cd" * 32)
    assert other.training_identity("d") != kept[0].training_identity("d")
