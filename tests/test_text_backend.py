"""The text backend on a tiny random LlamaForCausalLM with a real tokenizer: sampling, the masked
loss, the PEFT adapter, and whole RAFT runs through the same loop as images."""

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from raft_diffusion.backends.text import (
    IGNORE,
    TextBackend,
    left_pad,
    response_nll,
    sample,
    training_batch,
)
from raft_diffusion.train import run_training

from .conftest import metrics_without_seconds as _records

PROMPTS = ["I watched this film on a rainy Sunday afternoon.", "This western is set in a border town."]


@pytest.fixture
def backend(text_config):
    def make(**overrides) -> TextBackend:
        torch.manual_seed(0)
        return TextBackend(text_config(**overrides), Accelerator(cpu=True))

    return make


def test_left_pad_puts_padding_before_the_prompt():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_generation_gives_one_text_per_prompt_and_seed_within_the_length_range(backend):
    b = backend(generation={"max_new_tokens": [3, 7], "batch_size": 4})
    prompts, seeds = [p for p in PROMPTS for _ in range(5)], list(range(10))
    samples = b.generate(prompts, seeds)
    assert len(samples) == 10 and samples.seeds == seeds and samples.prompts == prompts
    assert all(isinstance(t, str) for t in samples.outputs)
    lengths = [len(r) for r in samples.payload["response_ids"]]
    assert all(3 <= n <= 7 for n in lengths) and len(set(lengths)) > 1  # drawn per sample
    assert samples.payload["prompt_ids"][0] == b.tokenizer(PROMPTS[0])["input_ids"]
    assert samples.outputs[0] == b.tokenizer.decode(samples.payload["response_ids"][0], skip_special_tokens=True)
    fixed = backend(generation={"max_new_tokens": 5}).generate(prompts[:3], seeds[:3])
    assert [len(r) for r in fixed.payload["response_ids"]] == [5, 5, 5]


def test_a_sample_depends_on_its_prompt_and_seed_not_on_its_batch(backend):
    # Alone, the short prompt is not padded; beside a longer one it is left-padded.
    b = backend(generation={"max_new_tokens": 8, "batch_size": 8})
    alone = b.generate([PROMPTS[1]], [42])
    mixed = b.generate([PROMPTS[0], PROMPTS[1], PROMPTS[1]], [7, 42, 43])
    assert len(b.encode(PROMPTS[0])) > len(b.encode(PROMPTS[1]))
    assert mixed.payload["response_ids"][1] == alone.payload["response_ids"][0]
    assert mixed.payload["response_ids"][2] != alone.payload["response_ids"][0]


def test_left_padded_greedy_sampling_matches_transformers_generate(backend):
    b = backend()
    model, tokenizer = b._peft(), b.tokenizer
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0  # the second prompt is padded
    with torch.inference_mode():
        reference = model.generate(**batch, do_sample=False, max_new_tokens=6, pad_token_id=b.pad_id)
    ours = sample(model, [b.encode(p) for p in PROMPTS], [0, 1], 6, b.pad_id, set(), temperature=1e-4)
    assert ours == reference[:, batch["input_ids"].shape[1]:].tolist()


def test_the_loss_reads_response_tokens_only():
    prompt, response = [[11, 12, 13, 14], [21, 22]], [[15, 16], [23, 24, 25]]
    ids, mask, labels = training_batch(prompt, response, pad_id=0)
    assert ids.tolist() == [[11, 12, 13, 14, 15, 16], [21, 22, 23, 24, 25, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]
    assert labels.tolist() == [[IGNORE] * 4 + [15, 16], [IGNORE, IGNORE, 23, 24, 25, IGNORE]]
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 30)
    loss, count = response_nll(logits, labels)
    assert count == 5
    # The logits at t predict token t + 1: positions 0-2 of row 0 and 0 of row 1 predict prompt
    # tokens, and changing them changes nothing; position 3 of row 0 predicts the first response token.
    changed = logits.clone()
    changed[0, :3] = torch.randn(3, 30) * 10
    changed[1, :1] = torch.randn(1, 30) * 10
    changed[1, 5] = torch.randn(30) * 10  # padding
    assert torch.equal(response_nll(changed, labels)[0], loss)
    changed[0, 3] += torch.randn(30) * 10
    assert not torch.equal(response_nll(changed, labels)[0], loss)


def test_the_model_loss_ignores_changes_to_the_prompt_logits(backend):
    # The same through the real model: logits at prompt positions (as a longer prompt would
    # change them) leave the loss unchanged, and the loss is transformers' own with masked labels.
    b = backend()
    p, r = [b.encode(PROMPTS[0])], [[300, 301, 302]]
    ids, mask, labels = training_batch(p, r, b.pad_id)
    with torch.inference_mode():
        out = b._peft()(input_ids=ids, attention_mask=mask, labels=labels)
        nll, count = response_nll(out.logits, labels)
        assert count == 3
        torch.testing.assert_close(nll / count, out.loss)
        logits = out.logits.clone()
        logits[:, : len(p[0]) - 1] = 0.0
        assert torch.equal(response_nll(logits, labels)[0], nll)


def test_training_lowers_the_loss_and_leaves_the_base_perplexity_alone(backend):
    b = backend(training={"learning_rate": 1e-2, "epochs": 1, "batch_size": 4})
    samples = b.generate([p for p in PROMPTS for _ in range(2)], [0, 1, 2, 3])
    base_before = b.base_nll(samples)
    generator = torch.Generator().manual_seed(0)
    losses = [b.train(samples, generator) for _ in range(8)]
    assert losses[-1] < losses[0] - 1.0  # nats per token
    assert b.base_nll(samples) == pytest.approx(base_before, rel=1e-6)  # the adapter is off for it
    metrics = b.eval_metrics(samples)
    assert set(metrics) == {"perplexity", "distinct-1", "distinct-2", "unique-2", "msttr"}
    assert metrics["perplexity"] == pytest.approx(torch.tensor(base_before[0] / base_before[1]).exp().item())


def test_saved_adapter_loads_in_peft_and_gives_the_same_logits(backend, text_config, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    b = backend()
    samples = b.generate(PROMPTS * 2, [0, 1, 2, 3])
    b.train(samples, torch.Generator().manual_seed(0))
    b.save_adapter(tmp_path / "final")
    assert {p.name for p in (tmp_path / "final").iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}
    config = json.loads((tmp_path / "final/adapter_config.json").read_text())
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"] and config["lora_alpha"] == 8

    base = AutoModelForCausalLM.from_pretrained(text_config().model.path)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "final")).eval()
    ids, mask, _ = training_batch(samples.payload["prompt_ids"], samples.payload["response_ids"], b.pad_id)
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits,
                           b._peft()(input_ids=ids, attention_mask=mask).logits)
    from peft.utils import get_peft_model_state_dict

    ours, theirs = b.adapter_state(), get_peft_model_state_dict(loaded)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in ours.items() if "lora_B" in k)  # it trained


def test_text_run_writes_texts_metrics_and_resumes_exactly(text_config, tmp_path):
    from raft_diffusion import report

    straight = text_config(output_dir=str(tmp_path / "straight"))
    metrics = run_training(straight, log=lambda s: None)
    run = Path(straight.output_dir)
    assert [r["iteration"] for r in metrics] == [0, 1]
    evaluation = metrics[-1]["eval"]
    assert {"reward", "vader", "perplexity", "distinct-1", "distinct-2", "unique-2", "msttr"} <= set(evaluation)
    assert metrics[0]["eval_before"]["perplexity"] > 1
    rows = [json.loads(x) for x in (run / "samples/iter_0001/samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 3 and sum(r["selected"] for r in rows) == 2
    assert {"prompt", "seed", "text", "scores", "selected", "reward"} <= set(rows[0])
    assert (run / "final/adapter_model.safetensors").is_file()
    page = report.before_after_samples(run).read_text()
    assert page.count("**before**") == page.count("**after**") == 4 and "airport" in page

    # One iteration, then --resume to two: the same metrics and the same adapter bytes.
    resumed = text_config(output_dir=str(tmp_path / "resumed"), raft={"iterations": 1})
    run_training(resumed, log=lambda s: None)
    resumed.raft.iterations = 2
    run_training(resumed, resume=True, log=lambda s: None)
    again = Path(resumed.output_dir)
    assert _records(again) == _records(run)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (again / "final" / name).read_bytes() == (run / "final" / name).read_bytes()


def test_nucleus_keeps_the_smallest_prefix_reaching_top_p_and_sampling_follows_it():
    from raft_diffusion.backends.text import next_tokens, nucleus

    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15], [0.97, 0.01, 0.01, 0.01]])
    kept, ids = nucleus(probs, 0.75)
    assert ids[0, :2].tolist() == [1, 2] and kept[0].tolist() == pytest.approx([0.5, 0.3, 0.0, 0.0])
    assert kept[1].tolist() == pytest.approx([0.97, 0.0, 0.0, 0.0])
    # A wide distribution: the top-k search must grow past its first k (256) and still be exact.
    flat = torch.softmax(torch.randn(3, 5000) * 0.1, dim=-1)
    kept, ids = nucleus(flat, 0.9)
    full, order = flat.sort(dim=-1, descending=True)
    n = int((full.cumsum(-1) - full <= 0.9).sum(-1)[0])
    assert n > 256 and int((kept[0] > 0).sum()) == n and set(ids[0, :n].tolist()) == set(order[0, :n].tolist())
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.3, 0.15]])).repeat(2000, 1)
    draws = next_tokens(logits, [torch.Generator().manual_seed(i) for i in range(2000)], 1.0, 0.75)
    counts = torch.bincount(draws, minlength=4).float() / 2000
    assert counts[0] == counts[3] == 0 and counts[1] == pytest.approx(0.5 / 0.8, abs=0.04)
