"""The quality-vs-cost sweep: measured NFE (batched guidance counts once), and the choice of the
cheapest setting that reaches the reference quality."""

from __future__ import annotations

import pytest
import torch

from diffusion_core.config import SweepSetting, parse_config
from diffusion_core.evaluation.fidelity import half_sample_interval
from diffusion_core.evaluation.sweep import (
    count_forwards,
    fewest_nfe_match,
    paired_matches,
    run_sweep,
)
from diffusion_core.sampling import SampleRequest
from tests.conftest import TINY, card_for
from tests.oracles import frechet_distance


def row(sampler: str, steps: int, fid: float, half_width: float = 0.1, wall: float = 1.0) -> dict:
    return {
        "sampler": sampler,
        "steps": steps,
        "nfe": float(steps),
        "wall_seconds": wall,
        "fid": fid,
        "fid_low": fid - half_width,
        "fid_high": fid + half_width,
    }


def test_fewest_nfe_match_against_the_longest_ddpm():
    rows = [
        row("ddim", 50, 1.05),
        row("ddpm", 1000, 1.0, 0.2),
        row("ddpm", 100, 3.0),
        row("dpmpp_2m", 5, 1.5),
        row("dpmpp_2m", 10, 1.19, wall=2.0),
        row("ddim", 10, 1.15),
    ]
    best = fewest_nfe_match(rows)
    assert (best["reference"]["sampler"], best["reference"]["steps"]) == ("ddpm", 1000)
    # Two settings at 10 NFE reach FID <= 1.2: the faster one wins.
    assert (best["match"]["sampler"], best["match"]["steps"]) == ("ddim", 10)
    assert best["note"].startswith("ddim-10 reaches ddpm-1000 quality with 10 NFE")
    # Without DDPM the reference is the setting with the most NFE; nothing may reach it.
    none = fewest_nfe_match([row("ddim", 100, 1.0), row("dpmpp_2m", 5, 2.0)])
    assert none["reference"]["steps"] == 100 and none["match"] is None
    assert none["note"].startswith("No setting reaches ddim-100 quality")
    with pytest.raises(ValueError, match="empty sweep"):
        fewest_nfe_match([])


def test_paired_matches_tells_a_shifted_setting_from_a_redrawn_one():
    """Features from a known distribution: the reference setting's samples and the reference set
    are N(0, I); one setting's samples are the same seeds' features plus small noise (a sampler
    close to the reference's), one draws fresh N(0, I) (as good, other noise), one is shifted by
    0.3 in every coordinate (worse by about 8 x 0.09 = 0.72 FID). The paired gap must call the
    first two matches and the shifted one not."""
    g = torch.Generator().manual_seed(0)
    n, d = 400, 8
    reference = torch.randn(n, d, generator=g, dtype=torch.float64)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    near = base + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)
    redrawn = torch.randn(n, d, generator=g, dtype=torch.float64)
    shifted = base + 0.3
    rows = [
        row("ddim", 10, 0.0) | {"spacing": "leading"},
        row("ddpm", 1000, 0.0) | {"spacing": "leading"},
        row("unipc", 10, 0.0) | {"spacing": "karras"},
        row("euler", 20, 0.0) | {"spacing": "karras"},
    ]
    out = paired_matches(rows, [shifted, base, near, redrawn], reference, draws=50)
    by = {r["sampler"]: r for r in out["rows"]}
    assert out["reference"] is by["ddpm"] and by["ddpm"]["gap"] == 0.0
    # The gap is the difference of the two FIDs against the whole reference.
    fid_base = frechet_distance(base, reference)
    assert by["ddim"]["gap"] == pytest.approx(frechet_distance(shifted, reference) - fid_base)
    assert by["ddim"]["gap"] == pytest.approx(d * 0.3**2, abs=0.15)
    assert not by["ddim"]["matches"] and by["ddim"]["gap_low"] > 0
    assert by["unipc"]["matches"] and by["euler"]["matches"]
    assert out["first_match_nfe"] == {"unipc:karras": 10.0, "euler:karras": 20.0}
    assert out["match"] is by["unipc"]
    assert out["note"].startswith("unipc-10 (karras) matches ddpm-1000 with 10 NFE")
    # Nothing matches: the note says so; mismatched inputs are refused.
    none = paired_matches(rows[:2], [shifted, base], reference, draws=20)
    assert none["match"] is None and none["note"].startswith("No setting matches ddpm-1000")
    with pytest.raises(ValueError, match="2 sweep rows but 1 feature sets"):
        paired_matches(rows[:2], [base], reference)


def test_sweep_counts_one_network_call_per_step_with_batched_guidance(single_thread):
    cfg = parse_config({**TINY, "diffusion": {"num_steps": 50}})
    torch.manual_seed(0)
    card = card_for(cfg)
    net = card.build().eval()
    reference = torch.randint(0, 256, (40, 1, 8, 8), generator=torch.Generator().manual_seed(1))

    def score(images: torch.Tensor) -> dict[str, float]:
        """FID on raw pixels: a real if crude measure."""
        g, r = images.flatten(1).double(), reference.flatten(1).double()
        lo, hi = half_sample_interval(frechet_distance, g, r, draws=5)
        return {
            "fid": frechet_distance(g, r),
            "fid_low": lo,
            "fid_high": hi,
            "kid": 0.0,
            "precision": 0.0,
            "recall": 0.0,
        }

    settings = (
        SweepSetting(sampler="ddpm", steps=7),
        SweepSetting(sampler="ddim", steps=3),
        SweepSetting(sampler="dpmpp_2m", steps=4),
        SweepSetting(sampler="heun", steps=4, spacing="karras"),
    )
    for scale in (1.0, 2.0):
        base = SampleRequest(guidance_scale=scale, batch_size=4, num_samples=10)  # 3 batches
        rows = run_sweep(net, card, base, settings, score=score)
        assert [(r["sampler"], r["nfe"], r["spacing"]) for r in rows] == [
            ("ddpm", 7, "leading"),
            ("ddim", 3, "leading"),
            ("dpmpp_2m", 4, "leading"),
            ("heun", 7, "karras"),  # 2 x 4 - 1
        ]
        assert all(r["fid_low"] < r["fid"] < r["fid_high"] and r["wall_seconds"] > 0 for r in rows)
        assert {r["guidance_scale"] for r in rows} == {scale}
    with count_forwards(net) as calls:
        net(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    assert calls == [1]


def test_cli_evaluate_rejects_a_bad_evaluation_file_before_starting(tmp_path, capsys):
    import yaml
    from diffpipe.flows.cli import main

    bad = tmp_path / "sweep.yaml"
    bad.write_text(yaml.safe_dump({"evaluation": {"sweep": [{"sampler": "lms", "steps": 5}]}}))
    assert main(["evaluate", "--model", "models:/none/1", "--evaluation", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "evaluation.sweep.0.sampler" in err
    (tmp_path / "empty.yaml").write_text("sample: {steps: 3}\n")
    assert (
        main(
            ["evaluate", "--model", "models:/none/1", "--evaluation", str(tmp_path / "empty.yaml")]
        )
        == 2
    )
    assert "needs an 'evaluation:' section" in capsys.readouterr().err
