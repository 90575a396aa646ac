"""Multi-process (multi-GPU) expansion through Hugging Face ``accelerate``: the small pieces train.py needs.

Data-parallel training replicates the whole expansion step on every process and averages the
gradients of the synthesis network (and of the discriminator, when the GAN loss is on) with
``DistributedDataParallel``:

* :class:`SynthesisNetwork` wraps a :class:`~expander.generators.stylegan2.Generator` so that DDP
  can see its synthesis network: rosinality's flat layout makes synthesis a method, not a submodule.
  DDP averages the gradients of parameters with ``requires_grad=True`` only, i.e. the synthesis
  parameters; the frozen mapping network rides along untouched. Every synthesis parameter is used in every forward, so no
  ``find_unused_parameters`` is needed. The buffers (noise maps, FIR kernels, ``w_avg``) never change
  during training; DDP broadcasts them (and the parameters) from rank 0 when it wraps the module, so
  every rank starts from rank 0's weights, and again before each forward, which is cheap and keeps
  them identical by construction.
* Each process draws its own latents (``seed + rank``). Rank 0 draws exactly what a single-process
  run with the same seed draws, and one distributed step is one single-process step on the *mean* of
  the per-rank losses: N processes train with N times the latents per step (and, with more domains
  than ``domains_per_step``, each rank picks its own domains). Results therefore differ from a
  single-process run of the same recipe, as any larger batch does; they are reproducible for a fixed
  number of processes.
* The losses a step returns (and the progress bar, on the main process) are this rank's own.
* Training state holds every rank's RNG (``rng`` for rank 0, ``rng_rank{r}`` for the others), so a
  resumed run continues exactly with the same number of processes; rank 0 writes it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator

    from .generators.stylegan2 import Generator
    from .train import Guidance


class SynthesisNetwork(nn.Module):
    """``w -> image`` as a module: ``forward`` is ``generator.synthesis`` (for DDP and ``accelerate``)."""

    def __init__(self, generator: "Generator"):
        super().__init__()
        self.generator = generator

    def forward(self, w: torch.Tensor, noise_mode: str = "const") -> torch.Tensor:
        return self.generator.synthesis(w, noise_mode=noise_mode)


def is_distributed_launch() -> bool:
    """True when this process is one of several (``accelerate launch``, ``torchrun``, mpirun, a debug launcher)."""
    from accelerate.state import PartialState

    if PartialState._shared_state:  # already set up (debug/notebook launcher, or a caller's Accelerator)
        return PartialState().num_processes > 1
    # torchrun / `accelerate launch --multi_gpu` set WORLD_SIZE; MPI launchers (multi-CPU) their own.
    names = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    return max(int(os.environ.get(name, "1") or 1) for name in names) > 1


def _on_cpu_only() -> bool:
    # accelerate sets up a CPU process group (gloo) only when told to use the CPU: without this, a
    # plain `torchrun` on a machine without CUDA made every rank a lone process that trained and
    # wrote the output by itself.
    return not torch.cuda.is_available()


def make_accelerator() -> "Accelerator":
    """This rank's ``Accelerator``: GPUs where CUDA is, else one CPU process group over the ranks."""
    from accelerate import Accelerator

    return Accelerator(cpu=_on_cpu_only())


def is_main_process() -> bool:
    """False on every rank but the first of a distributed launch (for messages printed once per run)."""
    if not is_distributed_launch():
        return True
    from accelerate.state import PartialState

    return PartialState(cpu=_on_cpu_only()).is_main_process


def rng_name(rank: int) -> str:
    """Name of a rank's latent RNG in the training state; rank 0 keeps the single-process name."""
    return "rng" if rank == 0 else f"rng_rank{rank}"


def gather_generators(accelerator: "Accelerator", rng: torch.Generator) -> dict[str, torch.Generator]:
    """Every rank's RNG, as ``{rng_name(rank): generator}`` (a collective: call it on every rank)."""
    states = accelerator.gather(rng.get_state().to(accelerator.device)[None]).cpu()  # (num_processes, S) uint8
    generators = {}
    for rank, state in enumerate(states):
        generators[rng_name(rank)] = torch.Generator()
        generators[rng_name(rank)].set_state(state.clone())  # a row view would carry a storage offset
    return generators


def restore_rank_rng(folder: str | Path, rank: int, num_processes: int, rng: torch.Generator) -> None:
    """Load this rank's RNG from a training state; refuse a state saved by another number of processes."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / "state.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        saved = 1 + sum(k.startswith("rng/rng_rank") for k in keys)
        if saved != num_processes:
            raise ValueError(
                f"the training state in {folder} was saved by {saved} process(es); resume it with the same number "
                f"(this run has {num_processes}), or start over without --resume"
            )
        rng.set_state(f.get_tensor(f"rng/{rng_name(rank)}"))


def place_guidance(guidance: "Guidance", device: torch.device | str) -> "Guidance":
    """Move the guidance models and targets to ``device`` (in place; returns ``guidance``)."""
    device = torch.device(device)
    if isinstance(guidance.perceptual, nn.Module):
        guidance.perceptual.to(device)
    for encoder in getattr(guidance.clip, "encoders", ()):
        encoder.model.to(device)
    teacher = getattr(guidance.teacher, "teacher", None)  # ScoreDistillation -> its teacher
    if teacher is not None:
        _move_attributes(teacher, device)
    guidance.mystyle_targets = {name: tuple(t.to(device) for t in targets) for name, targets in guidance.mystyle_targets.items()}
    return guidance


def _move_attributes(obj: object, device: torch.device) -> None:
    """Tensors and modules held directly by a plain object (e.g. the world teacher's image bank)."""
    if isinstance(obj, nn.Module):
        obj.to(device)
        return
    for name, value in list(vars(obj).items()):
        if torch.is_tensor(value):
            setattr(obj, name, value.to(device))
        elif isinstance(value, nn.Module):
            value.to(device)
        elif isinstance(value, dict) and value and all(torch.is_tensor(v) for v in value.values()):
            setattr(obj, name, {k: v.to(device) for k, v in value.items()})
