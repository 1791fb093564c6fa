"""`raft-diffusion report` on a hostile or damaged run directory (issue 23, items 1, 3, 4 and 11).

No byte of a file outside the run directory reaches report.html: a row naming one (absolute, `../`,
a symlinked picture or folder) is refused with one line naming the row, exit 2. Every damage of the
records is one line, exit 2, no traceback and no report.html half-written; pictures are decoded
(a bomb, a truncated file, a text-chunk bomb refused) and embedded as pixels, never as their bytes.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from .conftest import run_in_process

MARKER = "RAFT-SECRET-7f3a9c1e-DO-NOT-LEAK"
BASE = "samples/base_eval/samples.jsonl"
LAST_EVAL = "samples/iter_0001/eval/samples.jsonl"
CANDIDATES = "samples/iter_0001/samples.jsonl"


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    """A private copy of the shared finished run (without its weights), its report.html removed."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out, ignore=shutil.ignore_patterns(".lock", "checkpoints", "final", "logs"))
    (out / "report.html").unlink()
    return out


@pytest.fixture
def secrets(tmp_path) -> dict[str, Path]:
    """Files outside the run directory that carry MARKER: a text file, and a PNG with it in a text chunk
    (and its pixels) so that even a decoded-and-re-encoded copy would be caught."""
    folder = tmp_path / "outside"
    folder.mkdir()
    text = folder / "secret.txt"
    text.write_text(f"password={MARKER}\n" * 20)
    info = PngImagePlugin.PngInfo()
    info.add_text("secret", MARKER)
    png = folder / "secret.png"
    Image.fromarray(np.full((64, 64, 3), 7, np.uint8)).save(png, pnginfo=info)
    return {"text": text, "png": png}


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _set_file(run: Path, rows_file: str, name: str, line: int = 0) -> None:
    rows = _rows(run / rows_file)
    rows[line]["file"] = name
    _write_rows(run / rows_file, rows)


def _leaks(page: str, secret: Path) -> list[str]:
    """Where any of the secret file's bytes show in the page: raw, as base64 of the whole file, or inside any
    embedded data URI once decoded."""
    data = secret.read_bytes()
    found = []
    if MARKER in page:
        found.append("marker in the page")
    if base64.b64encode(data).decode()[:200] in page:
        found.append("the file as base64")
    for uri in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page):
        decoded = base64.b64decode(uri)
        if MARKER.encode() in decoded or (len(data) > 64 and data[:64] in decoded):
            found.append("inside an embedded image")
    return found


def _report(capfd, run: Path):
    return run_in_process(capfd, "report", str(run))


def _refused(result, run: Path, names: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert names in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (run / "report.html").exists()  # nothing half-written either
    assert not list(run.glob(".tmp-*"))


# --- no file outside the run directory reaches the report -----------------------------------------


def _absolute(run, secret, rows_file):
    _set_file(run, rows_file, str(secret))


def _dotdot(run, secret, rows_file):
    folder = (run / rows_file).parent
    _set_file(run, rows_file, str(Path("..") / Path(*[".."] * (len(folder.relative_to(run).parts))) /
                                  secret.relative_to(run.parent)))


def _symlinked_picture(run, secret, rows_file):
    folder = (run / rows_file).parent
    name = _rows(run / rows_file)[0]["file"]
    (folder / name).unlink()
    (folder / name).symlink_to(secret)  # a PNG of the run's own name, pointing outside


def _symlinked_folder(run, secret, rows_file):
    # the whole sample folder replaced by a link to an outside copy of it (its rows, its pictures and the secret)
    folder = (run / rows_file).parent
    outside = secret.parent / "folder"
    shutil.copytree(folder, outside)
    shutil.copy(secret, outside / _rows(run / rows_file)[0]["file"])
    shutil.rmtree(folder)
    folder.symlink_to(outside)


LEAKS = {"absolute": _absolute, "dotdot": _dotdot, "symlinked_picture": _symlinked_picture,
         "symlinked_folder": _symlinked_folder}


@pytest.mark.parametrize("rows_file", [BASE, LAST_EVAL, CANDIDATES])
@pytest.mark.parametrize("kind", ["text", "png"])
@pytest.mark.parametrize("how", list(LEAKS))
def test_no_byte_of_a_file_outside_the_run_reaches_the_report(run, secrets, capfd, how, kind, rows_file):
    LEAKS[how](run, secrets[kind], rows_file)
    result = _report(capfd, run)
    page = (run / "report.html").read_text() if (run / "report.html").is_file() else ""
    assert _leaks(page, secrets[kind]) == []
    names = (rows_file if how != "symlinked_folder" else str(Path(rows_file).parent)) if how != "symlinked_picture" \
        else f"{rows_file} line 1"
    _refused(result, run, names)


def test_a_symlinked_config_or_metrics_outside_the_run_is_refused(run, tmp_path, capfd):
    outside = tmp_path / "outside.yaml"
    outside.write_text(f"backend: diffusion\nmodel: {{path: {MARKER}}}\n")
    (run / "config.yaml").unlink()
    (run / "config.yaml").symlink_to(outside)
    _refused(_report(capfd, run), run, "config.yaml")


def test_the_report_embeds_decoded_pixels_not_the_files_bytes(run, capfd):
    """A picture of the run with a text chunk: its pixels are shown, the chunk is not."""
    folder = run / "samples/iter_0001"
    row = _rows(folder / "samples.jsonl")[0]
    info = PngImagePlugin.PngInfo()
    info.add_text("note", MARKER)
    Image.open(folder / row["file"]).convert("RGB").save(folder / row["file"], pnginfo=info)
    assert _report(capfd, run).returncode == 0
    page = (run / "report.html").read_text()
    assert MARKER not in page
    uris = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert uris and not any(MARKER.encode() in base64.b64decode(u) for u in uris)


# --- every damage: one line, exit 2 --------------------------------------------------------------


def _metrics_line(run: Path, line: int, edit) -> None:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[line] = edit(lines[line])
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _record(line: int, **changes):
    def damage(run: Path) -> None:
        def edit(text: str) -> str:
            record = json.loads(text)
            for key, value in changes.items():
                record[key] = value
            return json.dumps(record)
        _metrics_line(run, line, edit)
    return damage


def _raw_eval_value(raw: str):
    """The first record's eval reward written as raw JSON text (a number json.dumps would never write)."""
    def damage(run: Path) -> None:
        _metrics_line(run, 0, lambda text: re.sub(r'"eval": \{"reward": [^,}]+', f'"eval": {{"reward": {raw}', text))
    return damage


def _config(text: str):
    def damage(run: Path) -> None:
        (run / "config.yaml").write_text(text)
    return damage


def _config_edit(edit):
    def damage(run: Path) -> None:
        import yaml

        data = yaml.safe_load((run / "config.yaml").read_text())
        edit(data)
        (run / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return damage


def _rows_edit(rows_file: str, edit):
    def damage(run: Path) -> None:
        rows = _rows(run / rows_file)
        edit(rows)
        _write_rows(run / rows_file, rows)
    return damage


def _rows_text(rows_file: str, line: int, text: str):
    def damage(run: Path) -> None:
        lines = (run / rows_file).read_text().splitlines()
        lines[line] = text
        (run / rows_file).write_text("\n".join(lines) + "\n")
    return damage


def _picture(rows_file: str, write):
    def damage(run: Path) -> None:
        folder = (run / rows_file).parent
        write(folder / _rows(run / rows_file)[0]["file"])
    return damage


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:60])


def _bomb(path: Path) -> None:
    """A small file whose header says 15000x15000 (PIL's decompression-bomb limit is 89 M pixels)."""
    data = bytearray(path.read_bytes())
    ihdr = data[8 + 8:8 + 8 + 13]
    ihdr[0:8] = struct.pack(">II", 15000, 15000)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


def _text_chunk_bomb(path: Path) -> None:
    """The picture itself, plus a zTXt chunk that inflates to 200 MB (a few hundred KB on disk)."""
    data = path.read_bytes()
    body = b"comment\x00\x00" + zlib.compress(b"\x00" * (200 * 2**20), 9)
    chunk = struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body) & 0xFFFFFFFF)
    path.write_bytes(data[:33] + chunk + data[33:])


def _unlink(path: Path) -> None:
    path.unlink()


def _del(key: str):
    def edit(rows: list[dict]) -> None:
        del rows[0][key]
    return edit


def _set(key: str, value):
    def edit(rows: list[dict]) -> None:
        rows[0][key] = value
    return edit


def _report_dir(run: Path) -> None:
    (run / "report.html").mkdir()
    (run / "report.html/keep.txt").write_text("mine")


HUGE_INT = "9" * 400
GIANT_INT = "9" * 5000  # more digits than Python converts (4300): json.loads raises ValueError, not a JSONDecodeError
LABEL = r"size in $\mathrm{kB}^$"

# case -> (damage, what the one line names)
DAMAGES = {
    "eval_a_list": (_record(1, eval=[1, 2]), "metrics.jsonl iteration 1 eval"),
    "eval_a_string": (_record(1, eval="good"), "metrics.jsonl iteration 1 eval"),
    "eval_before_a_list": (_record(0, eval_before=[0.5]), "metrics.jsonl iteration 0 eval_before"),
    "eval_before_a_string": (_record(0, eval_before="base"), "metrics.jsonl iteration 0 eval_before"),
    "huge_float_in_metrics": (_raw_eval_value("1e999"), "metrics.jsonl iteration 0 eval.reward"),
    "huge_int_in_metrics": (_raw_eval_value(HUGE_INT), "metrics.jsonl iteration 0 eval.reward"),
    "string_metric_value": (_record(1, eval={"reward": "0.5", "jpeg_compressibility": 0.1}),
                            "metrics.jsonl iteration 1 eval.reward"),
    "string_reward_mean": (_record(1, reward_mean="high"), "metrics.jsonl iteration 1 reward_mean"),
    "rewards_means_a_list": (_record(0, rewards=["jpeg"]), "metrics.jsonl iteration 0 rewards"),
    "config_garbled": (_config("backend: diffusion\nmodel: [unclosed\n  - {\n"), "config.yaml"),
    "config_python_object": (_config("backend: !!python/object/apply:os.system ['echo pwned > pwned.txt']\n"),
                             "config.yaml"),
    "config_a_list": (_config("- backend\n- diffusion\n"), "config.yaml"),
    "config_not_utf8": (lambda run: (run / "config.yaml").write_bytes(b"backend: diffusion\n# \xff\xfe\n"),
                        "config.yaml"),
    "report_threshold_nan": (_config_edit(lambda d: d["report"].update(judge_drop=float("nan"))),
                             "config.yaml report.judge_drop"),
    "report_threshold_negative": (_config_edit(lambda d: d["report"].update(collapse_drop=-0.5)),
                                  "config.yaml report.collapse_drop"),
    "report_threshold_unknown": (_config_edit(lambda d: d["report"].update(judge_dorp=0.1)),
                                 "config.yaml report.judge_dorp"),
    "rewards_not_a_list": (_config_edit(lambda d: d.update(rewards={"name": "clip"})), "config.yaml rewards"),
    "row_not_json": (_rows_text(BASE, 1, '{"file": "0001.png", "prompt": '), f"{BASE} line 2"),
    "row_not_an_object": (_rows_text(LAST_EVAL, 2, '["0002.png"]'), f"{LAST_EVAL} line 3"),
    "row_without_prompt": (_rows_edit(BASE, _del("prompt")), f"{BASE} line 1 prompt"),
    "string_score": (_rows_edit(LAST_EVAL, lambda r: r[0]["scores"].update(jpeg_compressibility="high")),
                     f"{LAST_EVAL} line 1 scores.jpeg_compressibility"),
    "string_reward": (_rows_edit(CANDIDATES, _set("reward", "-3.8")), f"{CANDIDATES} line 1 reward"),
    "eval_picture_missing": (_picture(BASE, _unlink), f"{BASE} line 1"),
    "eval_picture_truncated": (_picture(LAST_EVAL, _truncate), f"{LAST_EVAL} line 1"),
    "eval_picture_bomb": (_picture(BASE, _bomb), f"{BASE} line 1"),
    "eval_picture_text_chunk_bomb": (_picture(LAST_EVAL, _text_chunk_bomb), f"{LAST_EVAL} line 1"),
    "candidate_picture_truncated": (_picture(CANDIDATES, _truncate), f"{CANDIDATES} line 1"),
    "report_html_a_directory": (_report_dir, "report.html"),
}


@pytest.mark.parametrize("case", list(DAMAGES))
def test_a_damaged_run_directory_is_one_line_and_exit_2(run, capfd, case, monkeypatch):
    monkeypatch.chdir(run.parent)  # where a !!python/object/apply would leave its file
    damage, names = DAMAGES[case]
    damage(run)
    result = _report(capfd, run)
    if case == "report_html_a_directory":
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and names in lines[0], result.stderr
        assert (run / "report.html/keep.txt").read_text() == "mine"  # the user's directory is left as it is
        return
    _refused(result, run, names)
    assert not (run.parent / "pwned.txt").exists()


def test_the_config_is_read_without_constructing_python_objects(run, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (run / "config.yaml").write_text("!!python/object/apply:os.system ['echo pwned > pwned.txt']\n")
    _refused(_report(capfd, run), run, "config.yaml")
    assert not (tmp_path / "pwned.txt").exists()


def test_a_threshold_error_is_one_line_naming_the_field(run, capfd):
    import yaml

    data = yaml.safe_load((run / "config.yaml").read_text())
    data["report"] = {"judge_drop": ".nan", "diversity_drop": 7}
    (run / "config.yaml").write_text(yaml.safe_dump(data))
    result = _report(capfd, run)
    _refused(result, run, "report.judge_drop")
    assert "validation error" not in result.stderr and "errors.pydantic.dev" not in result.stderr


# --- what is not damage ----------------------------------------------------------------------------


def test_blank_lines_in_rows_and_metrics_are_skipped(run, capfd):
    for name in (BASE, LAST_EVAL, CANDIDATES, "metrics.jsonl"):
        lines = (run / name).read_text().splitlines()
        (run / name).write_text("\n\n".join(lines) + "\n\n   \n")
    result = _report(capfd, run)
    assert result.returncode == 0, result.stderr
    page = (run / "report.html").read_text()
    assert page.count("<figure>") == len(_rows(run / CANDIDATES)) and "id='grid'" in page


@pytest.mark.parametrize("raw", [GIANT_INT, "[" * 5000 + "]" * 5000])
def test_a_metrics_line_json_cannot_read_is_skipped_as_garbled(run, capfd, raw):
    """A number of 5,000 digits or nesting 5,000 deep is no record (as a line cut by a kill): the
    report skips it and says so, as a resumed run does."""
    _raw_eval_value(raw)(run)
    result = _report(capfd, run)
    assert result.returncode == 0, result.stderr
    assert "metrics.jsonl line 1 is garbled; skipped" in result.stderr and "Traceback" not in result.stderr


def test_a_missing_candidate_picture_is_left_out_with_a_warning(run, capfd):
    first = _rows(run / CANDIDATES)[0]["file"]
    (run / "samples/iter_0001" / first).unlink()
    result = _report(capfd, run)
    assert result.returncode == 0
    assert f"{CANDIDATES} line 1: {first} is missing" in result.stderr
    assert (run / "report.html").read_text().count("<figure>") == len(_rows(run / CANDIDATES)) - 1


def test_a_mathtext_label_is_drawn_as_plain_text(run, capfd):
    """A reward label with `$...$` (matplotlib's mathtext, unbalanced here) is text, in `report` and in the
    report a run writes after each evaluation (html_report.write, which loop.write_report calls)."""
    from raft_diffusion.html_report import write

    text = (run / "metrics.jsonl").read_text().replace("jpeg_compressibility", LABEL.replace("\\", "\\\\"))
    (run / "metrics.jsonl").write_text(text)
    assert LABEL in json.loads(text.splitlines()[0])["eval"]
    write(run)  # what the run calls: no exception
    result = _report(capfd, run)
    assert result.returncode == 0, result.stderr
    page = (run / "report.html").read_text()
    assert "id='curves'" in page and "Traceback" not in result.stderr


def test_a_right_to_left_override_in_a_prompt_cannot_reverse_the_page(run, capfd):
    evil = "a cat \u202eeslaf si siht\u202c in monet style \u2066x\u2069\u200f"
    script = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    for name in (BASE, LAST_EVAL, CANDIDATES):
        rows = _rows(run / name)
        for r in rows:
            if r["prompt"] == "a cat in monet style":
                r["prompt"] = evil
            elif r["prompt"] == "a red square":
                r["prompt"] = script
        _write_rows(run / name, rows)
    assert _report(capfd, run).returncode == 0
    page = (run / "report.html").read_text()
    for control in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f":
        assert control not in page
    assert "<bdi>a cat eslaf si siht in monet style x</bdi>" in page  # isolated from what follows it
    assert "<script>" not in page and "onerror=alert" not in page.replace("onerror=alert(2)&gt;", "")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_the_trackers_grid_refuses_a_row_outside_its_folder(run, secrets):
    """The eval grid sent to TensorBoard during a run reads its pictures as the report does (the run turns
    the UserError into a warning: the trackers are a view of metrics.jsonl)."""
    from types import SimpleNamespace

    from raft_diffusion.errors import UserError
    from raft_diffusion.trackers import _log_eval

    _set_file(run, BASE, str(secrets["png"]))
    accelerator = SimpleNamespace(log=lambda *a, **k: None, trackers=[])
    with pytest.raises(UserError, match="line 1: file: .* is an absolute path"):
        _log_eval(accelerator, run / "samples/base_eval", {"reward": 1.0}, 0)


def test_a_text_run_report_shows_texts_checked_and_isolated(run, capfd):
    """The rows of a text run (a text where an image run has a file): drawn as tables, each text in its <bdi>."""
    for name in (BASE, LAST_EVAL, CANDIDATES):
        rows = _rows(run / name)
        for i, r in enumerate(rows):
            del r["file"]
            r["text"] = f" and then \u202e{i} it ended <b>"
        _write_rows(run / name, rows)
    assert _report(capfd, run).returncode == 0
    page = (run / "report.html").read_text()
    assert "<table id='grid'>" in page and "<table id='candidates'>" in page and "\u202e" not in page
    assert "<bdi> and then 0 it ended &lt;b&gt;</bdi>" in page
    rows = _rows(run / BASE)
    rows[1]["text"] = 3  # not a text
    _write_rows(run / BASE, rows)
    (run / "report.html").unlink()
    _refused(_report(capfd, run), run, f"{BASE} line 2")
