"""`raft-diffusion report RUN_DIR` writes one self-contained report.html (flags, curves, grid, tables)."""

import json
import re

from raft_diffusion.cli import main

from .conftest import copy_run
from .test_flags import COLLAPSE, HEALTHY


def _fake_run(path, records):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_report_of_a_collapsed_run_says_so_at_the_top(tmp_path, capsys):
    run = _fake_run(tmp_path / "run", COLLAPSE)
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    page = (run / "report.html").read_text()
    flags = page[page.index("id='flags'"):page.index("<h2>Curves")]
    assert flags.count("class='flag'") == 3 and "cat_in_monet peaked at 0.35 at iteration 4" in flags
    assert re.search(r"id='curves' alt='curves' src='data:image/png;base64,[A-Za-z0-9+/=]{1000,}'", page)


def test_report_of_a_healthy_run_raises_no_flag(tmp_path):
    run = _fake_run(tmp_path / "run", HEALTHY)
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "class='flag'" not in page and "No flag" in page


def test_report_of_a_real_run_embeds_the_grid_the_table_and_the_selected_candidates(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    (run / "report.html").unlink()  # the one the run wrote: `raft-diffusion report` writes it again
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    page = (run / "report.html").read_text()
    assert "src='data:image/png;base64," in page[page.index("id='grid'"):][:200]
    last = [json.loads(x) for x in (run / "samples/iter_0001/samples.jsonl").read_text().splitlines()]
    assert page.count("class=sel ") == sum(r["selected"] for r in last) > 0
    assert page.count("<figure>") == len(last)
    assert "id='per-prompt'" in page and "a cat in monet style" in page and "jpeg_compressibility" in page
    assert "src='" not in page.replace("src='data:", "")  # self-contained: nothing loaded from elsewhere


def test_report_of_a_directory_without_metrics_is_a_user_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: RUN_DIR: ")
    assert not (tmp_path / "empty/report.html").exists()


def test_a_reward_normalised_per_prompt_is_not_drawn_as_a_flat_zero(tmp_path):
    run = _fake_run(tmp_path / "run", HEALTHY)
    (run / "config.yaml").write_text("rewards:\n- {name: clip, normalize: per_prompt}\n")
    assert main(["report", str(run)]) == 0
    assert "its rewards are normalised, so its mean is 0 by construction" in (run / "report.html").read_text()
    (run / "config.yaml").write_text("rewards:\n- {name: clip, normalize: none}\n")
    assert main(["report", str(run)]) == 0
    assert "by construction" not in (run / "report.html").read_text()
