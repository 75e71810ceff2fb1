"""flops.py reports the paper's figure only for the paper's configuration; any other gets null and why."""

from __future__ import annotations

import json
import re

import pytest

from tests.test_cli import cli


def flops(tmp_path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "flops.json"
    p = cli("flops.py", *args, "--noxla_check", f"--output_json={out}")
    assert p.returncode == 0, p.stderr
    return json.loads(out.read_text()), p.stdout


def paper_cell(stdout: str) -> str:
    """The paper_PF cell of the printed table (columns are separated by two or more spaces)."""
    head, _, row = stdout.splitlines()[:3]
    return re.split(r"\s{2,}", row.strip())[re.split(r"\s{2,}", head.strip()).index("paper_PF")]


@pytest.mark.parametrize("args,differs", [
    (("--config=skyreels_vanilla", "--config.sampler.num_steps=20"), "sampler.num_steps=20 (paper: 50)"),
    (("--config=skyreels_fast", "--config.video.num_frames=97"), "video.num_frames=97 (paper: 177)"),
    (("--config=magi_vanilla", "--config.sampler.num_steps=32"), "sampler.num_steps=32 (paper: 64 or 16)"),
    (("--config=magi_vanilla", "--config.video.num_chunks=4"), "video.num_chunks=4 (paper: 10)"),
    (("--config=magi_fast",), "duplicate passes are dropped"),
])
def test_other_configs_report_no_paper_figure(tmp_path, args, differs):
    r, stdout = flops(tmp_path, *args)
    assert r["paper_pflops"] is None and r["relative_to_paper"] is None and r["total_pflops"] > 0
    assert any(differs in d for d in r["paper_config_differs"]) and r["note"].startswith("no paper figure")
    assert paper_cell(stdout) == "-" and "note: no paper figure" in stdout


@pytest.mark.parametrize("args,paper", [
    (("--config=skyreels_vanilla",), 113.0),
    (("--config=skyreels_fast", "--config.sampler.attention=full"), 113.0),  # compared with the block-causal count
    (("--config=magi_vanilla", "--config.sampler.num_steps=16"), 77.0),
])
def test_paper_configs_report_the_figure(tmp_path, args, paper):
    r, stdout = flops(tmp_path, *args)
    assert r["paper_pflops"] == paper and abs(r["relative_to_paper"]) < 0.05 and "paper_config_differs" not in r
    assert float(paper_cell(stdout)) == paper


def test_another_model_reports_no_paper_figure(tmp_path):
    from models.skyreels_v2 import SKYREELS_DF_1P3B

    mc = tmp_path / "model.json"
    mc.write_text(json.dumps({**SKYREELS_DF_1P3B, "num_layers": 20}))
    r, _ = flops(tmp_path, "--config=skyreels_vanilla", f"--model_config={mc}")
    assert r["paper_pflops"] is None and r["paper_config_differs"] == ["--model_config is not the released model's"]
    mc.write_text(json.dumps(SKYREELS_DF_1P3B))  # the released model's own config: still the paper's run
    assert flops(tmp_path, "--config=skyreels_vanilla", f"--model_config={mc}")[0]["paper_pflops"] == 113.0
