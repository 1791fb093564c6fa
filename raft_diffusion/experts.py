"""Candidates from other experts: RAFT's data-collection step may "combine sampled results from other
pre-trained experts (e.g., LLaMA, ChatGPT, or even human)" (Dong et al. 2023, section 3).

`generation.experts` lists them beside the policy:
- `{model: PATH, per_prompt: N}`: another model of the run's backend, sampled with seeds of its own
  (`seeds.expert_seed(run seed, expert, iteration, j)`) and never trained; with `lora: PATH` it samples
  with that LoRA attached (an earlier run's final/, a diffusers or kohya `.safetensors` file, a PEFT
  adapter for text), whose bytes are hashed into every checkpoint as a folder's are;
- `{samples: DIR, per_prompt: N}`: a folder whose `samples.jsonl` has `{prompt, file}` rows (images
  of the run's resolution) or `{prompt, text}` rows. Each iteration, the rows of each of its prompts
  are drawn without replacement with the run's seed (up to N; a prompt without rows gets none).
  Every `file` must lie inside the folder after symlinks (`files.inside`) and decode fully and
  safely (`files.read_image`, as `score` decodes it); a folder is checked whole before the run
  claims its directory, and its content's hash goes into every checkpoint (`--resume` refuses a
  folder that changed since).

Each prompt's group holds the policy's K candidates and then each expert's: the same rewards score
them and the same selection ranks them. The backend makes them trainable (`Backend.adopt`): the
diffusion backend encodes expert images with its VAE (the only place the loop encodes an image;
`seconds.encode`), the text backend tokenizes expert texts with the policy's tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import candidates
from .config import ExpertConfig, RunConfig
from .errors import UserError
from .files import inside, read_image
from .kinds import kind_of
from .paths import ASSETS
from .prompts import resolve_path
from .protocols import Samples
from .seeds import expert_seed, folder_rng

POLICY = "policy"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # a diffusion run's final/
TEXT_ADAPTER = ("adapter_model.safetensors", "adapter_config.json")  # a text run's final/
BUILTIN_SAMPLES = {"toy-monet-cats": "toyworld/monet-cats"}


@dataclass
class Slot:
    """One candidate of an iteration: its prompt's group, its source and how to make it."""

    group: int
    source: str  # "policy" or the expert's label
    seed: int | None  # sampling seed (policy and model experts)
    row: dict[str, Any] | None = None  # a samples folder's row


def resolve_samples_dir(value: str, field: str, search: Sequence[Path] = ()) -> Path:
    """`builtin:NAME`, or a folder path (relative ones as prompt files are found: here, then beside
    the config)."""
    if value.startswith("builtin:"):
        name = value[len("builtin:"):]
        if name not in BUILTIN_SAMPLES:
            raise UserError(field, f"unknown built-in samples {name!r}", f"available: {', '.join(BUILTIN_SAMPLES)}")
        return ASSETS / BUILTIN_SAMPLES[name]
    return resolve_path(str(Path(value).expanduser()), search)


class SampleFolder:
    """A folder of candidates that people (or any program) made, read and checked once."""

    def __init__(self, spec: ExpertConfig, field: str, kind: str, resolution: int | None, search: Sequence[Path] = ()):
        self.label, self.per_prompt = spec.label, spec.per_prompt
        self.directory = resolve_samples_dir(spec.samples, field, search)
        index = self.directory / "samples.jsonl"
        if not index.is_file():
            what = "has no samples.jsonl" if self.directory.is_dir() else "does not exist"
            raise UserError(field, f"{self.directory} {what}",
                            "give a folder with a samples.jsonl of {prompt, file} or {prompt, text} rows")
        key = "file" if kind == "image" else "text"
        other = "text" if kind == "image" else "file"
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.index, self.resolution = index, resolution
        try:
            data = index.read_bytes()
        except OSError as e:
            raise UserError(field, f"cannot read {index}: {e.strerror or e}", "make it readable") from None
        # The folder's content, as the run read it: samples.jsonl's bytes, then each picture's name and
        # bytes (`fingerprint`, recorded in every checkpoint: a folder edited between resumes is refused).
        digest = hashlib.sha256(data)
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise UserError(field, f"{index} is not UTF-8 (bad byte at offset {e.start})", "save it as UTF-8") from None
        self.field = field
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{index}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(field, f"{where} is not JSON ({e.msg})", "write one JSON object per line") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise UserError(field, f"{where} has no \"prompt\" string", f"write {{\"prompt\": ..., \"{key}\": ...}}")
            if not isinstance(row.get(key), str):
                why = (f"has {other!r} where this {'diffusion' if kind == 'image' else 'text'} run needs {key!r}"
                       if other in row else f"has no {key!r} string")
                raise UserError(field, f"{where} {why}", f"write {{\"prompt\": ..., \"{key}\": ...}}")
            if kind == "image":
                digest.update(self._check_image(row["file"], where, field, resolution))
            elif not row["text"].strip():
                raise UserError(field, f"{where} has an empty text", "remove the row, or write its text")
            self.rows.setdefault(row["prompt"], []).append({"prompt": row["prompt"], key: row[key], "line": n})
        if not self.rows:
            raise UserError(field, f"{index} has no rows", "add {prompt, file} or {prompt, text} rows")
        self.fingerprint = digest.hexdigest()

    def _path(self, name: object, where: str, field: str) -> Path:
        """The row's file: inside the folder after symlinks (files.inside), or refused naming the row."""
        return inside(self.directory, name, field, where)

    def _check_image(self, name: str, where: str, field: str, resolution: int | None) -> bytes:
        """Refuse, naming the row, a file outside the folder, missing, or that does not decode fully and
        safely at the run's resolution (files.read_image: bombs, truncation, huge text chunks, modes).
        Returns what the folder's fingerprint takes of it: its name and bytes."""
        path = self._path(name, where, field)
        if not path.is_file():
            what = "is missing" if not path.exists() else "is not a file"
            raise UserError(field, f"{where}: {name!r} {what}", "fix the row's file, relative to the folder")
        self._read(path, name, where, field, resolution)
        return name.encode("utf-8") + b"\0" + path.read_bytes() + b"\0"

    def _read(self, path: Path, name: str, where: str, field: str, resolution: int | None) -> torch.Tensor:
        try:
            return read_image(path, field, size=(resolution, resolution) if resolution is not None else None)
        except UserError as e:  # read_image names the path; the row says more
            problem = e.problem[len(str(path)):].lstrip() if e.problem.startswith(str(path)) else e.problem
            raise UserError(field, f"{where}: {name!r} {problem}", e.fix) from None

    def check_prompts(self, prompts: Sequence[str], field: str) -> None:
        """Refuse a folder none of whose rows would ever be drawn: rows match prompts exactly."""
        if not set(self.rows) & set(prompts):
            example = next(iter(self.rows))
            raise UserError(self.field, f"none of its {len(self.rows)} prompts (e.g. {example!r}) is among {field}",
                            "write rows for the training prompts, worded exactly as there")

    def draw(self, prompt: str, seed: int, it: int, expert: int, group: int) -> list[dict[str, Any]]:
        rows = self.rows.get(prompt, [])
        if not rows:
            return []
        rng = folder_rng(seed, expert, it, group)
        picks = rng.permutation(len(rows))[:self.per_prompt]
        return [rows[i] for i in sorted(picks)]

    def held_per_prompt(self) -> int:
        """The most candidates it adds to one prompt's group: per_prompt, or fewer rows."""
        return min(self.per_prompt, max(len(rows) for rows in self.rows.values()))

    def load(self, rows: Sequence[dict[str, Any]], kind: str) -> Any:
        """The rows' outputs as the rewards read them: images (N, 3, H, W) in [0, 1], decoded as `score`
        decodes them (files.read_image: 16-bit and float pictures keep their scale), or texts."""
        if kind == "text":
            return [r["text"] for r in rows]
        images = []
        for r in rows:
            where = f"{self.index}:{r['line']}"
            images.append(self._read(self._path(r["file"], where, self.field), r["file"], where, self.field,
                                     self.resolution))
        # (N, H, W, 3) then permuted, as ever: the VAE's convolutions give other last bits on another layout
        return torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)

    def check_context(self, backend, field: str) -> None:
        """Refuse (naming the row) an expert text that, after its prompt, does not fit the policy's
        context: tokenized with the policy's tokenizer, as the backend trains on it."""
        limit = backend.context_length()
        if not limit:
            return
        for prompt, rows in self.rows.items():
            n_prompt = len(backend.encode(prompt))
            for r in rows:
                n = n_prompt + len(backend.tokenizer(r["text"], add_special_tokens=False)["input_ids"])
                if n > limit:
                    raise UserError(self.field, f"{self.index}:{r['line']}: the prompt and text are {n} tokens, "
                                    f"more than the {limit} of {field}'s context",
                                    "shorten the text, or remove the row")


class ExpertLora:
    """A model expert's LoRA (`generation.experts[].lora`), found and hashed before any model loads.

    Images: a run's final/ (or the run directory), or one `.safetensors` file under diffusers' names
    or, for SD 1.x/2.x, kohya's (`load_lora` attaches every layer of it or refuses). Text: a PEFT
    adapter directory (adapter_model.safetensors and adapter_config.json), as a text run's final/.
    """

    def __init__(self, value: str, kind: str, field: str, search: Sequence[Path] = ()):
        path = resolve_path(str(Path(value).expanduser()), search)
        if path.is_dir() and (path / "run.json").is_file() and (path / "final").is_dir():
            path = path / "final"  # a run directory: its final LoRA
        if kind == "image":
            files = [path if path.is_file() else path / LORA_WEIGHTS]
            fix = "pass a run's final/ or one LoRA .safetensors file (diffusers' or kohya's names)"
        elif path.is_file():
            raise UserError(field, f"{path} is a file, and a text expert's LoRA is a PEFT adapter directory",
                            "pass a text run's final/ (adapter_model.safetensors and adapter_config.json)")
        else:
            files = [path / name for name in TEXT_ADAPTER]
            fix = "pass a text run's final/ (adapter_model.safetensors and adapter_config.json)"
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise UserError(field, f"{missing[0]} not found" if path.exists() else f"{path} not found", fix)
        self.path = path  # what the backend loads
        digest = hashlib.sha256()
        for file in files:  # names and bytes: another adapter under the same name is another expert
            digest.update(file.name.encode("utf-8") + b"\0")
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        self.fingerprint = digest.hexdigest()


class Experts:
    """The run's experts: their folders read and checked, and their model paths, before any model
    is loaded (`Experts(config)`); then their models loaded beside the policy (`load(backend)`)."""

    def __init__(self, config: RunConfig, search: Sequence[Path] = ()):
        self.specs = list(config.generation.experts)
        kind = kind_of(config)
        self.kind = kind.output
        resolution = config.generation.resolution if self.kind == "image" else None
        self.sources: list[Any] = []
        for i, spec in enumerate(self.specs):
            if spec.samples is not None:
                self.sources.append(SampleFolder(spec, f"config generation.experts.{i}.samples", self.kind, resolution,
                                                 search))
            else:
                kind.check_model_path(spec.model, f"config generation.experts.{i}.model")
                self.sources.append(None)
        self.loras = {i: ExpertLora(spec.lora, self.kind, f"config generation.experts.{i}.lora", search)
                      for i, spec in enumerate(self.specs) if spec.model is not None and spec.lora is not None}

    def check_prompts(self, prompts: Sequence[str], field: str) -> None:
        for source in self.sources:
            if isinstance(source, SampleFolder):
                source.check_prompts(prompts, field)

    def load(self, backend) -> "Experts":
        for i, spec in enumerate(self.specs):
            if self.sources[i] is None:
                lora = self.loras.get(i)
                if lora is not None:  # the file as hashed, wherever it was found
                    spec = spec.model_copy(update={"lora": str(lora.path)})
                self.sources[i] = backend.load_expert(spec, f"config generation.experts.{i}.model")
        return self

    def held_per_prompt(self, i: int) -> int:
        """The most candidates expert `i` adds to a prompt's group (a folder's: no more than its rows)."""
        source = self.sources[i]
        return source.held_per_prompt() if isinstance(source, SampleFolder) else self.specs[i].per_prompt

    def check_context(self, backend) -> None:
        """Text runs: every folder text fits the policy's context after its prompt (needs the loaded
        policy's tokenizer: called once the backend is built, before the run writes anything)."""
        if self.kind != "text":
            return
        for source in self.sources:
            if isinstance(source, SampleFolder):
                source.check_context(backend, "the policy model")

    @property
    def fingerprint(self) -> dict[str, dict[str, str]]:
        """Each sample folder's and each expert LoRA's content hash, by expert index: what the
        checkpoints record."""
        found = {str(i): {"samples": spec.samples, "sha256": source.fingerprint}
                 for i, (spec, source) in enumerate(zip(self.specs, self.sources)) if isinstance(source, SampleFolder)}
        found.update({str(i): {"model": self.specs[i].model, "lora": self.specs[i].lora, "sha256": lora.fingerprint}
                      for i, lora in self.loras.items()})
        return dict(sorted(found.items(), key=lambda kv: int(kv[0])))

    def check_unchanged(self, checkpoints: Path) -> None:
        """On --resume: refuse a sample folder whose content differs from the one the checkpoints were
        made with (the first readable state.json decides; one without the record, of an older run, is
        taken as it is)."""
        _, found = candidates(checkpoints)
        for path in found:
            try:
                state = json.loads((path / "state.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # the resume itself falls back past it, or says why
            if not isinstance(state, dict):
                continue
            recorded = state.get("experts")
            if not isinstance(recorded, dict):
                return
            for i, now in self.fingerprint.items():
                then = recorded.get(i)
                if isinstance(then, dict) and then.get("sha256") != now["sha256"] and "lora" in now:
                    raise UserError(f"config generation.experts.{i}.lora",
                                    f"{self.loras[int(i)].path} changed since checkpoint {path.name} was made (its "
                                    "weights differ), so resuming would not continue the same run",
                                    "restore that LoRA, or start a new run (another --output-dir, or --overwrite)")
                if isinstance(then, dict) and then.get("sha256") != now["sha256"]:
                    folder = self.sources[int(i)].directory
                    raise UserError(f"config generation.experts.{i}.samples",
                                    f"{folder} changed since checkpoint {path.name} was made (its samples.jsonl "
                                    "or pictures differ), so resuming would not continue the same run",
                                    "restore the folder as it was, or start a new run (another --output-dir, "
                                    "or --overwrite)")
            return

    @property
    def labels(self) -> list[str]:
        return [POLICY] + [s.label for s in self.specs]

    def slots(self, prompts: Sequence[str], seed: int, it: int) -> list[Slot]:
        """The experts' candidates of an iteration (they follow the policy's): each expert's, prompt by prompt."""
        slots: list[Slot] = []
        for e, (spec, source) in enumerate(zip(self.specs, self.sources)):
            if isinstance(source, SampleFolder):
                for g, prompt in enumerate(prompts):
                    slots += [Slot(g, spec.label, None, row) for row in source.draw(prompt, seed, it, e, g)]
            else:
                j = 0
                for g in range(len(prompts)):
                    for _ in range(spec.per_prompt):
                        slots.append(Slot(g, spec.label, expert_seed(seed, e, it, j)))
                        j += 1
        return slots

    def make(self, backend, slots: Sequence[Slot], prompts: Sequence[str], desc: str, seconds: dict[str, float]):
        """Samples of the expert `slots` (those this process holds), in their order, made trainable;
        the time spent making expert outputs trainable goes to `seconds["encode"]`."""
        parts, order = [], []
        for label, source in zip(self.labels[1:], self.sources):
            mine = [k for k, s in enumerate(slots) if s.source == label]
            if not mine:
                continue
            these = [slots[k] for k in mine]
            texts = [prompts[s.group] for s in these]
            if isinstance(source, SampleFolder):
                out = source.load([s.row for s in these], self.kind)
            else:
                out = source.generate(texts, [s.seed for s in these], f"{desc} {label}")
            t0 = time.perf_counter()
            parts.append(backend.adopt(texts, [s.seed for s in these], out))
            seconds["encode"] = seconds.get("encode", 0.0) + time.perf_counter() - t0
            order += mine
        merged = concat(parts)
        position = {k: i for i, k in enumerate(order)}
        return merged.select([position[k] for k in sorted(order)])


def concat(parts: Sequence[Any]):
    """One `Samples` of several, in order (payload tensors concatenated, lists joined)."""
    parts = [p for p in parts if len(p)]
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return Samples([], [], [], {})
    first = parts[0]

    def join(values):
        if isinstance(values[0], torch.Tensor):
            return torch.cat(values)
        return [x for v in values for x in v]

    keys = set(first.payload)
    for p in parts[1:]:
        if set(p.payload) != keys:
            raise RuntimeError(f"candidates of different payloads: {sorted(keys)} and {sorted(p.payload)}")
    return Samples(prompts=[x for p in parts for x in p.prompts], seeds=[x for p in parts for x in p.seeds],
                   outputs=join([p.outputs for p in parts]),
                   payload={k: join([p.payload[k] for p in parts]) for k in first.payload})
