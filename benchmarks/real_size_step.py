"""Real-size expansion step: what one step of `recipes/ffhq-nada.yaml` and `recipes/ffhq-sds.yaml` costs.

Nothing is downloaded: every model has the architecture the real recipes load, with random weights
(a step's cost does not depend on what the weights learned):

* generator and discriminator: StyleGAN2 config-f at 1024 px (FFHQ; ``StyleGAN2Config(resolution=1024)``);
* NADA: transformers ``CLIPModel`` as ViT-B/32 and ViT-B/16 (the recipes' ensemble);
* replay: LPIPS with a VGG backbone (the ``lpips`` package's network);
* SDS: Stable Diffusion v1.5's UNet, VAE and text encoder sizes (diffusers / transformers classes).

Each scenario builds an ``expander.train.Expander`` with the recipe's training settings and times
``Expander.step`` (the product's code path: one batched synthesis call, guidance, replay against the
frozen parent, backward, optimizer step), after warm-up steps, synchronising the GPU around each
step. Real models train without the GAN loss unless real photos are given; ``--gan`` adds it (with
the discriminator's lazy R1), on random stand-ins for the photos.

    python benchmarks/real_size_step.py --device cuda            # both recipes, 10 timed steps each
    python benchmarks/real_size_step.py --device cuda --scenarios nada --gan
    python benchmarks/real_size_step.py --device cuda --set base_batch_size=2   # a lighter variant
    python benchmarks/real_size_step.py --smoke                  # tiny sizes on the CPU: seconds (tests)

Prints a table; writes ``results.json`` to ``--out``.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
from expander.checkpoint import ExpandedGenerator  # noqa: E402
from expander.cli import _training_settings  # noqa: E402
from expander.domains import Domain  # noqa: E402
from expander.expansion import training_device  # noqa: E402
from expander.generators.stylegan2 import Discriminator, Generator, StyleGAN2Config  # noqa: E402
from expander.guidance.clip import ClipEncoder, ClipGuidance  # noqa: E402
from expander.guidance.diffusion import StableDiffusionGuidance  # noqa: E402
from expander.guidance.perceptual import lpips_distance  # noqa: E402
from expander.losses.sds import ScoreDistillation  # noqa: E402
from expander.recipes import Recipe  # noqa: E402
from expander.train import Expander, Guidance  # noqa: E402
from expander.world.clip import build_world_tokenizer, word_vocabulary  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SCENARIOS = {"nada": RECIPES / "ffhq-nada.yaml", "sds": RECIPES / "ffhq-sds.yaml"}


def word_tokenizer(words: set[str], max_length: int):
    """A word-level tokenizer over the prompts' words (the real BPE vocabulary needs a download; the
    text side runs once per run, so its vocabulary does not change a step's cost)."""
    return build_world_tokenizer(word_vocabulary(words), max_length)


def sizes(smoke: bool) -> dict[str, Any]:
    """The real architectures, or tiny ones of the same classes for ``--smoke``."""
    if not smoke:
        text = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77)
        vision = dict(image_size=224, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        return {
            "generator": StyleGAN2Config(resolution=1024),  # FFHQ config-f
            "clips": [dict(text=text, vision={**vision, "patch_size": 32}, projection_dim=512), dict(text=text, vision={**vision, "patch_size": 16}, projection_dim=512)],
            "unet": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),  # diffusers' defaults are SD v1's blocks
            "vae": dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512),
            "text_encoder": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77),
            "sd_resolution": 512,
        }
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16)
    return {
        "generator": StyleGAN2Config(resolution=32, style_dim=32, n_mlp=2, channels={4: 16, 8: 16, 16: 8, 32: 8}),
        "clips": [dict(text=text, vision=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2), projection_dim=8)],
        "unet": dict(
            sample_size=8, layers_per_block=1, block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
        ),
        "vae": dict(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=16),
        "text_encoder": text,
        "sd_resolution": 16,
    }


def build_guidance(method: str, recipe: Recipe, spec: dict[str, Any], device: torch.device) -> Guidance:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

    words = {w for d in recipe.domains for p in (d.prompt, d.source_prompt) if p for w in p.lower().replace(".", " ").split()}
    words |= {"a", "an", "photo", "portrait", "picture", "image", "of"}  # the NADA templates
    guidance = Guidance(perceptual=lpips_distance("vgg", pretrained=False).to(device))

    def text_settings(tokenizer) -> dict[str, int]:  # the text model's token ids, as the tokenizer numbers them
        return {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}

    if method == "nada":
        encoders = []
        for clip in spec["clips"]:
            tokenizer = word_tokenizer(words, clip["text"]["max_position_embeddings"])
            config = CLIPConfig(text_config={**clip["text"], **text_settings(tokenizer)}, vision_config=clip["vision"], projection_dim=clip["projection_dim"])
            encoders.append(ClipEncoder(CLIPModel(config).eval().to(device), tokenizer))
        guidance.clip = ClipGuidance(encoders)  # the real models' defaults: cosine directional loss, no views
    else:
        text = spec["text_encoder"]
        tokenizer = word_tokenizer(words, text["max_position_embeddings"])
        teacher = StableDiffusionGuidance(
            AutoencoderKL(**spec["vae"]).eval(),
            UNet2DConditionModel(**spec["unet"]).eval(),
            CLIPTextModel(CLIPTextConfig(**text, **text_settings(tokenizer))).eval(),
            tokenizer,
            dict(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config),
            resolution=spec["sd_resolution"],
        )
        for module in (teacher.vae, teacher.unet, teacher.text_encoder):
            module.to(device).requires_grad_(False)
        config = recipe.training
        guidance.teacher = ScoreDistillation(teacher, config.sds_config())
    return guidance


def timed_steps(step: Callable[[], dict], warmup: int, steps: int, device: torch.device) -> list[float]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    seconds = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        seconds.append(time.perf_counter() - start)
    return seconds


def run_scenario(method: str, spec: dict[str, Any], device: torch.device, warmup: int, steps: int, smoke: bool, settings: dict[str, Any], gan: bool) -> dict[str, Any]:
    recipe = Recipe.load(SCENARIOS[method])
    torch.manual_seed(0)
    G, D = Generator(spec["generator"]).eval(), Discriminator(spec["generator"])
    model = ExpandedGenerator.from_generator(G, D, alpha=20.0, num_dormant=min(64, spec["generator"].style_dim // 2), base_model="random-" + method)
    for domain in recipe.domains:
        model.add_domain(Domain(domain.name, -1, domain.method, prompt=domain.prompt, source_prompt=domain.source_prompt))
    model.to(device)
    guidance = build_guidance(method, recipe, spec, device)
    resolution = spec["generator"].resolution

    def real_images(n: int, rng: torch.Generator) -> torch.Tensor:  # (n, 3, R, R) stand-ins for a user's photo folder
        return torch.rand(n, 3, resolution, resolution, generator=rng) * 2 - 1

    config = recipe.training.with_settings({**({"batch_size": 1, "base_batch_size": 1} if smoke else {}), **settings})
    trainer = Expander(model, list(model.domains), guidance, config, real_sampler=real_images if gan else None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed_steps(trainer.step, warmup, steps, device)
    row = {
        "scenario": f"{method} ({SCENARIOS[method].name})" + (" + GAN" if gan else "") + "".join(f", {k}={v}" for k, v in settings.items()),
        "resolution": resolution,
        "batch": f"{config.domains_per_step} domains x {config.batch_size} + base {config.base_batch_size}",
        "median_step_s": statistics.median(seconds),
        "min_step_s": min(seconds),
        "steps_timed": len(seconds),
        "recipe_steps": recipe.training.steps,
    }
    row["recipe_hours"] = row["median_step_s"] * row["recipe_steps"] / 3600
    row["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return row


def main(argv=None) -> dict[str, Any]:
    parser = common.base_parser("real_size_step", __doc__)
    parser.add_argument("--device", default="auto", help="'auto' (a CUDA GPU if there is one), 'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), default=sorted(SCENARIOS))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per scenario (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gan", action="store_true", help="add the GAN loss, as with a folder of real photos")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE", help="training settings on top of the recipe's (repeatable)")
    args = parser.parse_args(argv)
    out = common.setup(args)
    device = training_device(args.device)
    spec = sizes(args.smoke)
    steps, warmup = (2, 1) if args.smoke else (args.steps, args.warmup)
    settings = _training_settings(tuple(args.settings))
    rows = [run_scenario(method, spec, device, warmup, steps, args.smoke, settings, args.gan) for method in args.scenarios]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"real-size expansion step on {name} (torch {torch.__version__}):")
    print(common.markdown_table(["scenario", "px", "batch per step", "median s/step", "min s/step", "the recipe's steps take (h)", "peak GPU GiB"],
                                [[r["scenario"], r["resolution"], r["batch"], r["median_step_s"], r["min_step_s"], r["recipe_hours"], r["peak_gpu_gib"]] for r in rows]))
    results = {"benchmark": "real_size_step", "environment": {**common.environment(args), "device": name}, "rows": rows}
    common.write_results(out, results)
    return results


if __name__ == "__main__":
    main()
