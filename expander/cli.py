"""The ``expander`` command line. Thin: every command parses, calls the library, and reports."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import click

from .domains import BASE_DOMAIN, EVAL_SEED, MAX_SEED
from .world.build import CLIP_PARTS

MODEL_HELP = "Registered model name, model folder, or Hub repo id (default: the registry's default model)."
TRAIN_DEVICE_HELP = "Where to train: 'auto' (the first CUDA GPU if there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N'. Ignored under accelerate launch, which gives each process its device."
REAL_IMAGES_HELP = (
    "Folder of real photos of the model's own domain (e.g. faces for an FFHQ model; subfolders included) for the GAN loss "
    "on the base subspace; needs the model's discriminator. World models use world renders without it."
)

OVERWRITE_HELP = "Replace a model in the output folder that has domains the result would not have (refused without it: that is another model)."
DEVICE_HELP = "'cpu', 'cuda', 'cuda:N' or 'auto' (a CUDA GPU if there is one)."
SEED = click.IntRange(0, MAX_SEED)
MAX_GRID_IMAGES = 1024  # a grid is one image in memory
MAX_FOLDER_IMAGES = 100_000  # a folder is written batch by batch, but the latents (n, D) are held


def _fail(message: str) -> None:
    raise click.ClickException(message)


def _image_path(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[str]:
    """An output image path whose format is known before any work (rendering can take minutes)."""
    from .utils.images import IMAGE_SUFFIXES

    if value is not None and Path(value).suffix.lower() not in IMAGE_SUFFIXES:
        raise click.BadParameter(f"{value!r} is not an image file name: end it in one of {', '.join(IMAGE_SUFFIXES)} (e.g. grid.png)", ctx=ctx, param=param)
    return value


def _grid_or_folder_path(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[str]:
    """An image file (a grid), or a folder (one PNG per image): a path without a suffix, ending in
    ``/``, or an existing folder. Checked before any work."""
    if value is None or _is_folder_out(value):
        return value
    try:
        return _image_path(ctx, param, value)
    except click.BadParameter as err:
        raise click.BadParameter(f"{err.message}, or end it in / for a folder of PNGs (e.g. {value}/)", ctx=ctx, param=param) from None


def _is_folder_out(value: str) -> bool:
    path = Path(value)
    return value.endswith(("/", os.sep)) or path.is_dir() or not (path.suffix or path.exists())


def _json_path(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[str]:
    """An output report path ending in .json, checked before the (minutes of) evaluation it holds."""
    if value is not None and Path(value).suffix.lower() != ".json":
        raise click.BadParameter(f"{value!r} is not a JSON file name: end it in .json (e.g. report.json)", ctx=ctx, param=param)
    return value


def _plot_path(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[str]:
    """An output plot path in a format matplotlib writes, known before the (possibly long) measurement."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if value is not None and Path(value).suffix.lower().lstrip(".") not in formats:
        raise click.BadParameter(f"{value!r} is not a plot file name matplotlib writes: end it in one of {', '.join('.' + f for f in formats)} (e.g. curve.png)", ctx=ctx, param=param)
    return value


def _direction_index(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value < -1:
        raise click.BadParameter(f"{value} is not a direction: give a direction index (0 or more; `expander directions` plots them) or -1 for the most dormant free one", ctx=ctx, param=param)
    return value


def _same_folder(path: str, other: Optional[str]) -> bool:
    return other is not None and Path(path).expanduser().resolve() == Path(other).expanduser().resolve()


def _path_argument(folder: str) -> str:
    """``folder`` as a --model value that always means the folder: a bare name is looked up in the registry first."""
    return folder if "/" in folder or folder.startswith((".", "~")) else f"./{folder}"


def _load(model: Optional[str], device: str = "cpu"):
    from .expansion import training_device
    from .hub import load_model

    try:
        return load_model(model, device=str(training_device(device)))
    except (FileNotFoundError, ValueError, KeyError) as err:
        _fail(str(err))


class _Group(click.Group):
    """Turns the library's errors that reach the top into one clean line instead of a traceback.

    The library raises ValueError (bad input: names, settings, shapes, a wrong checkpoint) and OSError
    (files, folders, the Hub) with messages that say what to do, and FloatingPointError (a training loss
    became NaN: what to change); ``expander -v`` keeps the traceback.
    """

    def invoke(self, ctx: click.Context):
        from .domains import UnknownDomainError

        try:
            return super().invoke(ctx)
        except (UnknownDomainError, ValueError, OSError, FloatingPointError) as err:
            if logging.getLogger().isEnabledFor(logging.INFO):  # -v: the whole story
                logging.getLogger("expander").exception("the command failed")
            raise click.ClickException(str(err) or type(err).__name__) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
@click.version_option(package_name="expander")
def main(verbose: bool) -> None:
    """expander: teach one StyleGAN2 many new domains on its dormant latent directions.

    \b
    Quick start (runs offline on a CPU with the built-in portraits world):
      expander domains
      expander sample --domain base -n 16 --out base.png
      expander directions --out curve.png
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--domain", default=BASE_DOMAIN, show_default=True, help="Domain name; 'base' is the source domain.")
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("-n", "--num", "num", default=16, show_default=True, type=click.IntRange(1, MAX_FOLDER_IMAGES), help=f"Number of images (at most {MAX_GRID_IMAGES} in a grid).")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the latents (same seed = same identities in every domain).")
@click.option("--strength", default=1.0, show_default=True, type=float, help="Position along the domain direction: 0 = base, 1 = domain.")
@click.option("--compose", default="", help="Comma-separated extra domains added at full strength, e.g. 'glasses,hat'.")
@click.option("--truncation", default=1.0, show_default=True, type=click.FloatRange(0, 1), help="Truncation psi towards the mean w.")
@click.option("--nrow", default=None, type=click.IntRange(1), help="Images per row of the grid.")
@click.option("--device", default="cpu", show_default=True, help=DEVICE_HELP)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1), help="Images rendered at once: memory, not results (they differ by float rounding at most).")
@click.option("--out", required=True, type=click.Path(), callback=_grid_or_folder_path, help="An image file (.png, .jpg, ...) for one grid, or a folder (no suffix, or ending in /) for one PNG per image, written as they render.")
def sample(domain, model, num, seed, strength, compose, truncation, nrow, batch_size, device, out):
    """Sample images from one domain (or a composition of domains): a grid, or a folder of PNGs.

    \b
    Example:
      expander sample --domain base -n 16 --seed 0 --out base.png
      expander sample --model runs/world-nada-10 --domain zombie --compose hat --out zombie_hat.png
      expander sample --model runs/world-nada-10 --domain zombie -n 5000 --out zombie/   # zombie/zombie-seed0-000000.png ...
    """
    import torch

    from .utils.images import save_grid, save_image_folder
    from .utils.io import check_replaceable

    folder = _is_folder_out(out)
    if not folder and num > MAX_GRID_IMAGES:
        raise click.BadParameter(f"a grid holds at most {MAX_GRID_IMAGES} images, not {num}; write them to a folder instead (--out {Path(out).with_suffix('')}/)", param_hint="'-n' / '--num'")
    if folder and nrow is not None:
        raise click.BadParameter("--nrow lays out a grid; a folder gets one file per image (name an image file for a grid)", param_hint="'--nrow'")
    extras = [name.strip() for name in compose.split(",") if name.strip()]
    drawn = "+".join(([domain] if domain != BASE_DOMAIN or not extras else []) + extras)  # "base" composed with hat draws hat
    # Everything that picks the images but the model, so two samples never share a file name.
    stem = drawn + (f"-strength{strength:g}" if strength != 1.0 else "") + (f"-psi{truncation:g}" if truncation != 1.0 else "") + f"-seed{seed}"
    if folder:
        check_replaceable(out, "the images are written into it")  # a ValueError: the group prints it
        _refuse_a_larger_earlier_sample(Path(out), stem, num)
    generator = _load(model, device)
    batches = generator.sample_batches(domain, n=num, seed=seed, strength=strength, compose=extras, truncation_psi=truncation, batch_size=batch_size)
    if folder:  # image i of a seed is image i of that seed's grid: -n only decides how many
        save_image_folder(batches, out, [_sample_file_name(stem, index) for index in range(num)])
    else:
        save_grid(torch.cat(list(batches)), out, nrow=nrow)
    click.echo(f"wrote {num} images of {drawn!r} to {out}" + (f" ({_sample_file_name(stem, 0)} ...)" if folder else ""))


def _sample_file_name(stem: str, index: int) -> str:
    return f"{stem}-{index:06d}.png"  # one width for every -n: image i has one name


def _refuse_a_larger_earlier_sample(folder: Path, stem: str, num: int) -> None:
    """A folder that holds images of this name beyond ``num`` (an earlier, larger -n) would end up a mix
    of two samples, which a Fréchet distance over the folder would silently measure."""
    import re

    pattern = re.compile(rf"{re.escape(stem)}-(\d+)\.png")
    beyond = sorted(p.name for p in folder.glob(f"{stem}-*.png") if (m := pattern.fullmatch(p.name)) and int(m.group(1)) >= num) if folder.is_dir() else []
    if beyond:
        raise ValueError(
            f"{folder} already holds {len(beyond)} images of this sample past -n {num} ({beyond[0]} ...), from an earlier, larger run; "
            f"writing {num} would leave a mix of two runs. Remove them, sample at least as many, or write to a new folder"
        )


@main.command()
@click.option("--model", default=None, help=MODEL_HELP)
def domains(model):
    """List the domains of a model: name, direction, method, alpha, steps, prompt / images; free directions.

    \b
    Example:
      expander domains --model world-portraits
    """
    generator = _load(model)
    rows = [("name", "direction", "method", "alpha", "steps", "prompt / images"), (BASE_DOMAIN, "-", "source", "-", "-", "-")]
    for d in generator.domains:
        anchors = generator.anchors(d.name)
        source = d.prompt or d.images or ""
        if anchors is not None:
            source += f" (sampled between its {len(anchors)} inversions)"
        rows.append((d.name, str(d.direction), d.method, f"{generator.domain_alpha(d):g}", str(d.steps), source))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            click.echo("  ".join("-" * w for w in widths))
    free = generator.free_directions()
    click.echo(f"\n{len(generator.domains)} domains; {len(free)} free dormant directions (next: {free[:5]})")


@main.command()
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--out", required=True, type=click.Path(dir_okay=False), callback=_plot_path, help="Output plot (.png, .pdf, .svg, ...).")
@click.option("--recompute", is_flag=True, help="Measure the dormancy curve again instead of using the stored one.")
@click.option("--save", is_flag=True, help="Store the measured curve in the model folder, so new domains take the most dormant directions by it (an imported model needs this once).")
@click.option("--samples", default=16, show_default=True, type=click.IntRange(1), help="Random latents per direction when measuring.")
@click.option("--perceptual", default="auto", show_default=True, type=click.Choice(["auto", "world", "lpips-vgg", "lpips-alex"]), help="Distance for the curve: auto (world net for world models, else LPIPS-VGG).")
@click.option("--device", default="cpu", show_default=True, help=DEVICE_HELP)
def directions(model, out, recompute, save, samples, perceptual, device):
    """Plot the SeFA spectrum and the dormancy curve (perceptual change per direction).

    \b
    Example:
      expander directions --out curve.png
      expander directions --model ffhq-expandable --recompute --save --device cuda --out curve.png
    """
    from .hub import resolve_model_folder
    from .plots import plot_directions
    from .registry import is_protected_model_folder
    from .subspace.dormancy import dormancy_curve
    from .utils.io import check_replaceable

    folder = None
    if save:
        folder, _ = resolve_model_folder(model)
        if is_protected_model_folder(folder):
            _fail(f"--save writes into the model folder, and {folder} is a built-in or downloaded model: copy the folder (cp -r) and pass the copy as --model, or drop --save")
        try:
            check_replaceable(folder)  # before the measurement, which is long on a real model
        except ValueError:
            _fail(f"--save rewrites the model folder {folder}, which is the current folder or contains it: run the command from outside that folder, with --model {folder}")
    generator = _load(str(folder) if folder else model, device)
    curve = generator.basis.dormancy.cpu()
    measured = recompute or curve.numel() == 0
    if measured:
        from .guidance.perceptual import load_perceptual

        distance = load_perceptual(perceptual, generator)
        curve = dormancy_curve(generator.generator, generator.basis, distance, n_samples=samples).cpu()
    generator.to("cpu")  # the plot and the checkpoint read the basis on the CPU
    if save:
        if not measured:
            _fail("--save stores a curve measured now: add --recompute")
        generator.basis.dormancy = curve
        generator.save_pretrained(folder)
    plot_directions(generator, curve, out)
    quarter = len(curve) // 4
    head, tail = curve[:quarter].mean().item(), curve[-quarter:].mean().item()
    click.echo(f"wrote {out}: first quarter changes images {head:.4f}, last quarter {tail:.4f} (ratio {head / max(tail, 1e-12):.1f}x)")
    if save:
        click.echo(f"stored the curve in {folder}; new domains now take the most dormant free directions by it (next: {generator.free_directions()[:5]})")


@main.command()
@click.option("--domain", required=True, help="Domain to traverse.")
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("-n", "--num", "num", default=4, show_default=True, type=click.IntRange(1, 64), help="Number of identities (rows).")
@click.option("--steps", default=7, show_default=True, type=click.IntRange(2, 33), help="Images per row.")
@click.option("--max-strength", default=1.0, show_default=True, type=float, help="Strips run from -s to +s.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the identities' latents.")
@click.option("--device", default="cpu", show_default=True, help=DEVICE_HELP)
@click.option("--out", required=True, type=click.Path(dir_okay=False), callback=_image_path, help="Output image grid (.png, .jpg, ...).")
def traverse(domain, model, num, steps, max_strength, seed, device, out):
    """Images along a domain's direction, from -s to +s (0 = base subspace).

    \b
    Example:
      expander traverse --model runs/world-nada-10 --domain zombie --steps 9 --max-strength 1.5 --out strip.png
    """
    from .utils.images import save_grid

    generator = _load(model, device)
    strip = generator.traverse(domain, n=num, seed=seed, max_strength=max_strength, steps=steps)
    save_grid(strip.flatten(0, 1), out, nrow=steps)
    click.echo(f"wrote {num}x{steps} traversal of {domain!r} to {out}")


@main.command()
@click.argument("repo_id")
@click.option("--revision", default=None, help="Branch, tag or commit (default: main). The registry pins the exact commit.")
@click.option("--name", default=None, help="Name in the local registry (default: the repo name; a name another model has is refused).")
def pull(repo_id, revision, name):
    """Download a model from the Hugging Face Hub and add it to the local registry.

    REPO_ID is a model repository written by `expander push` (config.json, model.safetensors,
    domains.json), e.g. the one pushed in `expander push --help`.

    \b
    Example:
      expander pull me/portraits-expanded --revision main
      expander sample --model portraits-expanded --domain zombie --out z.png
    """
    from .hub import pull as pull_model
    from .registry import user_registry_path

    try:
        entry = pull_model(repo_id, revision=revision, name=name)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    except Exception as err:  # huggingface_hub raises many network/cache error types
        _fail(f"could not download {repo_id}: {err}")
    click.echo(f"pulled {repo_id}@{entry.source['revision'][:10]} as {entry.name!r} ({len(entry.domains)} domains) into {user_registry_path()}")


@main.command()
@click.argument("model")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo as private; an existing public repo is refused, not made private.")
@click.option("--message", default="Upload expanded generator", show_default=True, help="Commit message on the Hub.")
def push(model, repo_id, private, message):
    """Upload a model (name or folder) to a Hugging Face Hub repo (needs `hf auth login`, or HF_TOKEN).

    Only the checkpoint's files are uploaded (your notes in the folder stay local), and an earlier
    model's checkpoint files in the repo are removed in the same commit.

    \b
    Example:
      expander push ./my-expanded me/portraits-expanded --private
    """
    from .hub import push as push_model

    try:
        url = push_model(model, repo_id, private=private, commit_message=message)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    except Exception as err:  # huggingface_hub raises many auth/network error types
        _fail(f"could not upload to {repo_id}: {err} (logged in? run `hf auth login`)")
    click.echo(f"pushed to {url}")


@main.command()
@click.argument("model", required=False)
def info(model):
    """Show a model's architecture, basis, domains and location.

    \b
    Example:
      expander info world-portraits
    """
    from .checkpoint import TRAINING_FILE
    from .hub import resolve_model_folder

    try:
        folder, name = resolve_model_folder(model)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    generator = _load(str(folder))
    config = generator.generator.config
    n_params = sum(p.numel() for p in generator.generator.parameters())
    click.echo(f"model:        {name}")
    click.echo(f"folder:       {folder}")
    click.echo(f"base model:   {generator.base_model or '-'}")
    if generator.description:
        click.echo(f"description:  {generator.description}")
    click.echo(f"architecture: StyleGAN2 {config.resolution}x{config.resolution}, W dim {config.style_dim}, {config.n_mlp}-layer mapping, {n_params / 1e6:.2f}M parameters")
    click.echo(f"basis:        SeFA, dormancy curve {'measured' if generator.basis.dormancy.numel() else 'not measured'}, {generator.num_dormant} dormant directions reserved")
    click.echo(f"alpha:        {generator.alpha:g}")
    click.echo(f"domains:      {len(generator.domains)} ({', '.join(generator.domain_names) or 'none yet'})")
    click.echo(f"discriminator: {'yes' if generator.discriminator is not None else 'no'}")
    runs = generator.training_log
    if runs:
        last = runs[-1]
        settings = last.get("settings") or {}
        click.echo(f"training:     {len(runs)} run{'s' if len(runs) > 1 else ''}; last {(last.get('date') or '?')[:10]}: {len(last['trained'])} domains, {settings.get('steps', '?')} steps, seed {settings.get('seed', '?')} (all settings: {folder / TRAINING_FILE})")
    else:
        click.echo("training:     not recorded (a parent model, or trained before expander kept training.json)")


@main.command(name="list")
def list_models():
    """List the registered models: the built-in zoo and what `expander pull` recorded.

    \b
    Example:
      expander list
      expander sample --model NAME --domain DOMAIN --out grid.png    # a name from the first column
    """
    from .registry import RegistryError, load_registries, user_registry_path

    try:
        registry = load_registries()
    except (RegistryError, ValueError) as err:
        _fail(str(err))

    def where(entry) -> str:
        missing = "path" in entry.source and not Path(entry.source["path"]).expanduser().is_dir()
        return entry.location() + (" (missing: train or pull it again)" if missing else "")

    rows = [(("* " if name == registry.default_model else "  ") + name, str(len(entry.domains)), where(entry), entry.description)
            for name, entry in sorted(registry.models.items())]
    header = ("  model", "domains", "source", "description")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3])
    click.echo(f"(* the default model; models pulled with `expander pull` or trained with a name are recorded in {user_registry_path()})")


@main.command(name="import")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the expanded checkpoint.")
@click.option("--allow-pickle", is_flag=True, help="Opt in to reading an NVIDIA .pkl (read with a restricted unpickler; no code is run).")
@click.option("--alpha", default=20.0, show_default=True, type=click.FloatRange(0, min_open=True), help="Default distance of repurposed subspaces.")
@click.option("--num-dormant", default=None, type=click.IntRange(1), help="Directions reserved as dormant (default: half of W).")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def import_checkpoint(checkpoint, out, allow_pickle, alpha, num_dormant, overwrite):
    """Turn a StyleGAN2 checkpoint (rosinality .pt or NVIDIA .pkl) into an expandable model.

    \b
    Example:
      expander import stylegan2-ffhq-config-f.pt --out ffhq-expandable
      expander import ffhq.pkl --allow-pickle --out ffhq-expandable
    """
    from .checkpoint import ExpandedGenerator, check_keeps_domains
    from .generators.convert import load_nvidia_pickle, load_rosinality_checkpoint
    from .registry import is_protected_model_folder
    from .utils.io import check_replaceable

    if is_protected_model_folder(Path(out)):
        _fail(f"--out {out} is inside a built-in or downloaded model (the package's weights or the Hugging Face cache); write the imported model to a folder of your own")
    try:
        check_replaceable(out)  # before the conversion, which is long for a 1024 px model
        check_keeps_domains(out, [], overwrite)  # an imported model has no domains yet
    except ValueError as err:
        _fail(str(err))
    try:
        if checkpoint.lower().endswith((".pkl", ".pickle")):
            G, D = load_nvidia_pickle(checkpoint, allow_pickle=allow_pickle)
        else:
            G, D = load_rosinality_checkpoint(checkpoint)
        model = ExpandedGenerator.from_generator(G, D, alpha=alpha, num_dormant=num_dormant, base_model=str(Path(checkpoint).name))
    except (FileNotFoundError, ValueError, RuntimeError, TypeError) as err:  # TypeError: values of the wrong kind in a file
        _fail(str(err))
    model.save_pretrained(out)
    click.echo(f"wrote {out}; run `expander directions --model {shlex.quote(_path_argument(out))} --recompute --save --out curve.png` (add --device cuda on a GPU) to measure and store its dormancy curve")


@main.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--steps", default=None, type=int, help="Override the recipe's training steps.")
@click.option("--out", default=None, help="Override the recipe's output folder; the result is then registered only under --name (the recipe's name keeps pointing at the recipe's own folder).")
@click.option("--name", default=None, help="Register the result under this name (default: the recipe's name, unless --out moves the run elsewhere).")
@click.option("--resume", is_flag=True, help="Continue a killed run (or one finished with --keep-state) from its last saved step; with a larger --steps, train it longer.")
@click.option("--keep-state", is_flag=True, help="Keep the training state (next to the output folder) after the run, so it can be continued later with --resume --steps N.")
@click.option("--force", is_flag=True, help="Allow non-dormant directions named in the recipe.")
@click.option("--seed", default=None, type=SEED, help="Override the recipe's seed.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Override any other training setting of the recipe (an ExpansionConfig field), e.g. --set lambda_composed_edits=4.0; repeatable.")
@click.option("--device", "device", default="auto", show_default=True, help=TRAIN_DEVICE_HELP)
@click.option("--real-images", default=None, type=click.Path(file_okay=False), help=REAL_IMAGES_HELP)
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.option("--show", is_flag=True, help="Print the recipe as this command would train it (what it `extends` merged in; --steps, --seed, --set and --out applied) as YAML, checked, and exit: nothing is loaded, trained or written.")
def expand(recipe, steps, out, name, resume, keep_state, force, seed, settings, device, real_images, overwrite, show):
    """Joint expansion of a model with every domain of a recipe file (see recipes/).

    \b
    Example:
      expander expand recipes/world-nada-10.yaml
      expander expand recipes/world-nada-10.yaml --resume
      expander expand recipes/world-nada-10.yaml --keep-state   # then, to train it longer:
      expander expand recipes/world-nada-10.yaml --resume --steps 1800
      expander expand recipes/world-nada-10.yaml --seed 1 --set lambda_nada_consistency=0.5 --out runs/variant --name variant
      expander expand variant.yaml   # a recipe with `extends: recipes/world-nada-10.yaml` and only its changes
      expander expand variant.yaml --seed 3 --show   # print it merged with what it extends, and exit
      accelerate launch --multi_gpu --num_processes 4 -m expander.cli expand recipes/ffhq-nada.yaml
    """
    from .distributed import is_main_process
    from .expansion import run_expansion, training_state_dir
    from .recipes import Recipe, resolved_recipe
    from .registry import check_name_available

    try:
        plan = Recipe.load(recipe)
        overrides = {**_training_settings(settings), **{k: v for k, v in (("steps", steps), ("seed", seed)) if v is not None}}
        # Either would replace every domain's entries of the recipe at once.
        if "domain_weights" in overrides:
            raise ValueError("set a domain's loss weights in its recipe entry (weights: {lambda_nada: 2.0}), not with --set domain_weights=...")
        if "negative_prompts" in overrides:
            raise ValueError("set a domain's negative prompts in its recipe entry (negative_prompts: [\"a portrait of a person wearing sunglasses\"]), not with --set negative_prompts=...")
        if overrides:  # validated like the recipe's own settings
            plan.training = plan.training.with_settings(overrides)
        if show:
            import yaml

            shown = resolved_recipe(recipe)
            shown = {**shown, **({"out": out} if out else {}), **({"training": {**(shown.get("training") or {}), **overrides}} if overrides else {})}
            click.echo(yaml.safe_dump(shown, sort_keys=False, allow_unicode=True, width=120), nl=False)
            return
        if name is None and (not out or plan.out is None or _same_folder(out, plan.out)):
            name = plan.name  # a variant written elsewhere must not take over the name of the recipe's own result
        out = out or plan.out
        if not out:
            raise ValueError(f"recipe {recipe} has no 'out' folder; add `out: FOLDER` to it or pass --out FOLDER")
        if name:  # before training: a run must not take over another model's name
            check_name_available(name, {"path": os.path.abspath(out)}, "trained")
        model = run_expansion(plan.model, plan.domains, out, plan.training, plan.guidance, name=name, resume=resume, force=force, keep_state=keep_state, overwrite=overwrite, device=device, real_images=real_images or plan.real_images, description=plan.description)
    except (FileNotFoundError, ValueError, IndexError) as err:
        _fail(str(err))
    if is_main_process():  # once per run, not once per rank under accelerate/torchrun
        click.echo(f"wrote {out} with {len(model.domains)} domains: {', '.join(model.domain_names)}" + (f"; registered as {name}" if name else ""))
        if plan.name and not name:
            click.echo(f"not registered as {plan.name}: that name stays with {plan.out}; sample this run with --model {_path_argument(out)}, or give it a name with --name")
        if keep_state:
            # Every option that shaped the run: a resume refuses another seed, settings or real images.
            command = ["expander", "expand", recipe, "--out", out] + (["--name", name] if name else [])
            command += ["--seed", seed] if seed is not None else []
            for setting in settings:
                command += ["--set", setting]
            command += ["--real-images", real_images] if real_images else []
            command += ["--force"] if force else []
            command += ["--resume", "--steps"]
            click.echo(f"kept the training state in {training_state_dir(out)}; train this run longer with: {shlex.join(str(part) for part in command)} N")


@main.command(name="add-domain")
@click.argument("prompt", required=False)
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--method", type=click.Choice(["nada", "sds", "mystyle"]), default=None, help="Default: nada for a prompt, mystyle with --images.")
@click.option("--images", default=None, help="Folder of photos of one subject (mystyle), or world:subject:SEED.")
@click.option("--name", default=None, help="Domain name (default: derived from the prompt or the folder).")
@click.option("--direction", default=-1, show_default=True, type=int, callback=_direction_index, help="Direction to repurpose; -1 = the most dormant free one.")
@click.option("--alpha", default=None, type=float, help="Distance of the new subspace (default: the model's alpha).")
@click.option("--negative-prompt", "negative_prompts", multiple=True, help="What the domain must not draw (nada, sds), e.g. \"a portrait of a person wearing sunglasses\" for an eyepatch (nada's weight: --set lambda_nada_negative=W, default 1.0); repeatable.")
@click.option("--steps", default=150, show_default=True, type=click.IntRange(1), help="Training steps.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Output folder (default: the model folder, or $EXPANDER_HOME/models/NAME for registered models).")
@click.option("--force", is_flag=True, help="Allow a non-dormant direction.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the training latents (and of the guidance's random views).")
@click.option("--clip", "clip_models", multiple=True, help="CLIP for nada: 'world', 'world-b', 'world-c' or a transformers id/folder; repeat for an ensemble (default: world + world-b for world models, ViT-B/32 + ViT-B/16 otherwise).")
@click.option("--perceptual", default="auto", show_default=True, type=click.Choice(["auto", "world", "lpips-vgg", "lpips-alex"]), help="Distance for replay and mystyle.")
@click.option("--diffusion", default=None, help="Teacher for sds: 'world' or a diffusers Stable Diffusion id/folder.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Any other training setting (an ExpansionConfig field, as in a recipe's `training` block), e.g. --set replay_batch_size=8; repeatable.")
@click.option("--device", "device", default="auto", show_default=True, help=TRAIN_DEVICE_HELP)
@click.option("--real-images", default=None, type=click.Path(file_okay=False), help=REAL_IMAGES_HELP)
@click.option("--resume", is_flag=True, help="Continue a killed run (or one finished with --keep-state) of the same command from its last saved step.")
@click.option("--keep-state", is_flag=True, help="Keep the training state (next to the output folder) after the run, to continue it later with --resume --steps N.")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def add_domain(prompt, model, method, images, name, direction, alpha, negative_prompts, steps, out, force, seed, clip_models, perceptual, diffusion, settings, device, real_images, resume, keep_state, overwrite):
    """Add one domain to an existing expanded model; existing domains are replayed, not forgotten.

    The built-in model and models in the Hugging Face cache are never changed: give --out for them.

    \b
    Example:
      expander add-domain "a portrait of a person with glasses" --name glasses --out runs/my-model
      expander add-domain --images photos/me --name me --steps 300 --model runs/my-model
    """
    from .distributed import is_main_process
    from .domains import Domain, check_domain_name
    from .expansion import run_expansion, training_state_dir
    from .hub import resolve_model_folder
    from .registry import builtin_model_names, expander_home, is_protected_model_folder, load_registries
    from .train import ExpansionConfig

    method = method or ("mystyle" if images else "nada")
    if method in ("nada", "sds") and not (prompt or "").strip():
        _fail(f"a {method} domain needs a non-empty PROMPT, e.g. expander add-domain \"a portrait of a zombie\"")
    if method == "mystyle" and not images:
        _fail("a mystyle domain needs --images FOLDER")
    if images and method != "mystyle":
        _fail(f"--images is for a mystyle domain (a subject's photos); a {method} domain learns from its PROMPT: leave --images out, or use --method mystyle")
    if method == "mystyle" and prompt:
        _fail(f"a mystyle domain learns from its --images, not from a PROMPT ({prompt!r} would be ignored): leave it out, and name the domain with --name")
    if negative_prompts and method == "mystyle":
        _fail("--negative-prompt steers a text domain (nada, sds); a mystyle domain learns from its photos and would ignore it: leave it out")
    if name is None:
        name = _slug(prompt or Path(images).name)
        try:
            check_domain_name(name)
        except ValueError as err:
            _fail(f"{err} (the name was derived from the {'prompt' if prompt else 'folder name'}); pass --name NAME")
    try:
        folder, model_name = resolve_model_folder(model)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    # Without --out, a registered model is updated in place: the new version goes to
    # $EXPANDER_HOME/models/NAME and NAME points to it. With --out, the name keeps its old target.
    # The built-in model is the exception: a user entry of the same name would hide it everywhere.
    registered = model_name in load_registries().models and out is None
    if out is None and (model_name in builtin_model_names() or (not registered and is_protected_model_folder(folder))):
        kind = "the built-in model" if model_name in builtin_model_names() else "a downloaded Hub snapshot"
        _fail(f"{model_name!r} is {kind}, which add-domain never changes: pass --out FOLDER for the expanded copy, e.g. --out runs/my-model")
    out = Path(out) if out else (expander_home() / "models" / model_name if registered else folder)
    if images and not images.startswith("world:"):  # recorded absolute, as a recipe's: a resume from elsewhere reads the same photos
        images = os.path.abspath(Path(images).expanduser())
    domain = Domain(name=name, direction=direction, method=method, prompt=prompt, images=images, alpha=alpha)
    try:
        training_settings = _training_settings(settings)
        if "negative_prompts" in training_settings:
            _fail("use --negative-prompt TEXT (repeatable) instead of --set negative_prompts=...")
        negatives = {"negative_prompts": {name: list(negative_prompts)}} if negative_prompts else {}
        config = ExpansionConfig.from_dict({"domains_per_step": 1, **training_settings, **negatives, "steps": steps, "seed": seed})
    except (TypeError, ValueError) as err:
        _fail(str(err))
    guidance_spec = {"perceptual": perceptual}
    if clip_models:
        guidance_spec["clip"] = list(clip_models)
    if diffusion:
        guidance_spec["diffusion"] = diffusion
    try:
        result = run_expansion(
            model_name if registered else str(folder),  # by name: a resume finds the name's new folder after an in-place run
            [domain], out, config, guidance_spec, name=model_name if registered else None, resume=resume, force=force, keep_state=keep_state, overwrite=overwrite, device=device, real_images=real_images
        )
    except (FileNotFoundError, ValueError, IndexError) as err:
        _fail(str(err))
    if is_main_process():
        click.echo(f"added {name!r} on direction {result.get_domain(name).direction}; wrote {out} ({len(result.domains)} domains)")
        if keep_state:
            click.echo(f"kept the training state in {training_state_dir(out)}; train it longer with the same command plus --resume --steps N")


def _training_settings(settings: tuple[str, ...]) -> dict:
    """``("key=value", ...)`` -> {key: value}, values parsed as YAML scalars (8, 0.2, true, [0.0, 0.99])."""
    import yaml

    parsed = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        key = key.strip()
        if not sep or not key:
            _fail(f"--set needs KEY=VALUE, got {setting!r} (e.g. --set replay_batch_size=8)")
        if key in ("steps", "seed"):
            _fail(f"use --{key} instead of --set {key}=...")
        if not value.strip():
            _fail(f"--set {key}= has an empty value; give one as in a recipe (8, 0.2, true, [0.0, 0.99], \"a text\")")
        try:
            parsed[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            _fail(f"--set {key}: cannot read the value {value!r}; write it as in a recipe (8, 0.2, true, [0.0, 0.99])")
    return parsed


def _slug(text: str) -> str:
    # Words joined by '_', as the world's attributes are named ("... with blue skin" -> blue_skin), so
    # `expander eval` finds a world domain's attribute without a mapping.
    filler = {"a", "an", "the", "of", "with", "wearing", "in", "portrait", "person", "photo", "picture", "image"}
    words = [w for w in "".join(c if c.isalnum() else " " for c in text.lower()).split() if w not in filler]
    return "_".join(words[:4]) or "domain"


@main.group()
def world():
    """The built-in portraits world: preview renders, rebuild its models.

    \b
    Example:
      expander world preview --out renders.png
      expander world build --what classifier
    """


@world.command()
@click.option("--out", required=True, type=click.Path(dir_okay=False), callback=_image_path, help="Output image grid (.png, .jpg, ...).")
@click.option("-n", "--num", "num", default=16, show_default=True, type=click.IntRange(1), help="Portraits to render.")
@click.option("--attributes", default="", help="Comma-separated target attributes to add, e.g. 'glasses,hat'.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the portraits' factors.")
def preview(out, num, attributes, seed):
    """Render portraits of the world (the ground truth the world's models learn from).

    \b
    Example:
      expander world preview --attributes zombie,hat -n 16 --out zombies.png
    """
    from .utils.images import save_grid
    from .world.renderer import sample_portraits

    names = [a.strip() for a in attributes.split(",") if a.strip()] or None
    try:
        batch = sample_portraits(num, seed, attributes=names)
    except ValueError as err:
        _fail(str(err))
    save_grid(batch.images, out)
    click.echo(f"wrote {num} renders to {out}; first caption: {batch.captions[0]!r}")


WORLD_PARTS = ("gan", "parent", *CLIP_PARTS, "classifier", "perceptual")


@world.command()
@click.option("--what", type=click.Choice(WORLD_PARTS), required=True, help="Which world model to (re)build.")
@click.option("--steps", default=None, type=click.IntRange(1), help="Training steps (default: what the shipped weights used; not for the parent, which is not trained).")
@click.option("--runs", default="runs", show_default=True, type=click.Path(file_okay=False), help="Folder for resumable training state.")
@click.option("--no-resume", is_flag=True, help="Start over instead of resuming from --runs.")
def build(what, steps, runs, no_resume):
    """Train one of the world's models, resumably; the result replaces the shipped weights.

    \b
    The order that reproduces the shipped package:
      expander world build --what perceptual
      expander world build --what classifier
      expander world build --what clip
      expander world build --what clip-b     # the second world CLIP of the NADA ensemble
      expander world build --what clip-c     # the third, trained with hard negatives
      expander world build --what gan        # about an hour or two on a 2-core CPU
      expander world build --what parent     # wraps the GAN: SeFA basis + dormancy curve
    """
    from .world import build as world_build

    try:
        path = world_build.build(what, steps=steps, runs=Path(runs), resume=not no_resume)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    click.echo(f"built the world {what}: {path}")


@main.command(name="eval")
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--parent", default=None, help="Parent model to compare source preservation with (default: the world parent).")
@click.option("-n", "--num", "num", default=256, show_default=True, type=click.IntRange(2), help="Samples per domain.")
@click.option("--seed", default=EVAL_SEED, show_default=True, type=SEED, help="Seed of the evaluation latents (the same seed, the same samples for every model); the default is held out from training's default seed 0.")
@click.option("--attribute", "attributes", multiple=True, metavar="DOMAIN=ATTRIBUTE", help="The world attribute a domain draws, when its name is not one (e.g. --attribute specs=glasses); repeatable.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), callback=_json_path, help="Write the full JSON report here (a summary is always printed).")
@click.option("--grid", default=None, type=click.Path(dir_okay=False), callback=_image_path, help="Image grid (.png, .jpg, ...): one row per domain.")
@click.option("--classifier-samples", default=2000, show_default=True, type=click.IntRange(0), help="Held-out renders to re-measure the evaluation classifier's accuracy on (0: skip).")
def evaluate(model, parent, num, seed, attributes, out, grid, classifier_samples):
    """Measure a world model exactly: source preservation, domain success, leakage, alignment, composition.

    \b
    Example:
      expander eval --out report.json --grid grid.png
      expander eval --model runs/world-nada-10 --num 512
    """
    from .guidance.perceptual import is_world_model
    from .utils.io import write_json
    from .world import metrics

    attribute_of = {}
    for pair in attributes:
        domain, sep, attribute = pair.partition("=")
        if not sep or not domain.strip() or not attribute.strip():
            _fail(f"--attribute needs DOMAIN=ATTRIBUTE, got {pair!r} (e.g. --attribute specs=glasses)")
        if domain.strip() in attribute_of:
            _fail(f"--attribute names domain {domain.strip()!r} twice ({attribute_of[domain.strip()]} and {attribute.strip()}); give each domain one attribute")
        if metrics.canonical_attribute(attribute) not in metrics.ATTRIBUTES:  # before minutes of loading and sampling
            _fail(f"--attribute {pair!r}: {attribute.strip()!r} is not a world attribute; use one of {', '.join(metrics.ATTRIBUTES)}")
        attribute_of[domain.strip()] = attribute.strip()
    generator = _load(model)
    if not is_world_model(generator):
        _fail("`expander eval` measures models of the portraits world (base_model expander/world); this model is not one")
    from .hub import resolve_model_folder
    from .registry import BUILTIN_REGISTRY, Registry

    # The world parent from the built-in zoo, not the merged registry: a user entry may reuse a name.
    reference = _load(parent) if parent else _load(str(resolve_model_folder(None, registry=Registry.load(BUILTIN_REGISTRY))[0]))
    report = metrics.evaluate(generator, n_samples=num, seed=seed, parent=reference, attribute_of=attribute_of)
    if classifier_samples:
        report["classifier"] = metrics.classifier_accuracy(n=classifier_samples)
    click.echo(metrics.format_report(report))
    if out:
        write_json(out, report)  # atomic: a report is never left half-written
        click.echo(f"wrote {out}")
    if grid:
        metrics.evaluation_grid(generator, grid, seed=seed)
        click.echo(f"wrote {grid}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
