"""User rewards (`python:tests.rewards_for_tests:NAME`) that the tests plug into runs."""

import hashlib
import math
import os
import time

from raft_diffusion.rewards.jpeg import jpeg_kb, to_uint8


def content_hash_scores(images, prompts):
    """A score unrelated to image quality: the hash of the pixels, in [0, 1). A random-selection control."""
    return [int(hashlib.sha256(a.tobytes()).hexdigest()[:8], 16) / 16**8 for a in to_uint8(images)]


def flaky_jpeg(images, prompts):
    """-JPEG kB, but NaN for images whose first pixel is dark and a crash on batches holding bright ones."""
    arrays = to_uint8(images)
    if len(arrays) > 1 and any(a[0, 0].mean() > 200 for a in arrays):
        raise RuntimeError("flaky reward: cannot score this batch")
    scores = [-s for s in jpeg_kb(images)]
    out = []
    for a, s in zip(arrays, scores):
        if a[0, 0].mean() > 200:
            raise RuntimeError("flaky reward: bright pixel")
        out.append(math.nan if a[0, 0].mean() < 60 else s)
    return out


def slow_jpeg(images, prompts):
    """-JPEG kB, after a pause when RAFT_TEST_SLOW_REWARD is set (so a test can kill a run mid-iteration)."""
    pause = float(os.environ.get("RAFT_TEST_SLOW_REWARD", "0"))
    if pause:
        time.sleep(pause)
    return [-s for s in jpeg_kb(images)]


def brightness(images, prompts):
    """The mean pixel value of each image."""
    return images.mean(dim=(1, 2, 3)).tolist()


def redness(images, prompts):
    """Red minus the mean of green and blue, per image."""
    return (images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))).tolist()


# --- faulty rewards: each must stop a run with a clear line, never end it in "success" ----------


def wrong_length(images, prompts):
    return [0.0] * (len(prompts) + 1)


def strings(images, prompts):
    return ["good"] * len(prompts)


def always_raises(images, prompts):
    raise RuntimeError("the reward server is down")


def always_nan(images, prompts):
    return [math.nan] * len(prompts)


def exits(images, prompts):
    raise SystemExit(3)


def column(images, prompts):
    """(N, 1) scores, as a regression head returns them: accepted as N scores."""
    return images.mean(dim=(1, 2, 3))[:, None]


def mostly_nan(images, prompts):
    """Brightness, but NaN for 3 of every 4 samples: more than the default max_drop_fraction."""
    return [float(m) if i % 4 == 0 else math.nan for i, m in enumerate(images.mean(dim=(1, 2, 3)).tolist())]


def spy_jpeg(images, prompts):
    """-JPEG kB; each call appends `<rank> <n> <prompts>` to $RAFT_TEST_SPY/rank<R>.txt (which process scored what)."""
    spy = os.environ.get("RAFT_TEST_SPY")
    if spy:
        rank = os.environ.get("RANK", "0")
        with open(os.path.join(spy, f"rank{rank}.txt"), "a", encoding="utf-8") as f:
            f.write(f"{rank}\t{len(prompts)}\t{'|'.join(prompts)}\n")
    pause = float(os.environ.get("RAFT_TEST_SLOW_REWARD", "0"))
    if pause:
        time.sleep(pause)
    return [-s for s in jpeg_kb(images)]


def hangs_on_stars(images, prompts):
    """-JPEG kB, but a call holding a star's prompt hangs (a remote scorer that stopped answering)."""
    if any("star" in p for p in prompts):
        time.sleep(float(os.environ.get("RAFT_TEST_HANG", "30")))
    return [-s for s in jpeg_kb(images)]


def flat_for_squares(images, prompts):
    """The mean pixel value, but 0.5 for every candidate of a prompt naming a square (a group without signal)."""
    return [0.5 if "square" in p else float(v) for p, v in zip(prompts, images.mean(dim=(1, 2, 3)).tolist())]
