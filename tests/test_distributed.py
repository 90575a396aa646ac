"""Data-parallel expansion through ``accelerate``: 2 CPU processes (gloo), forked by its debug launcher.

The workers write what they hold to files; the assertions run here, in the pytest process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from expander.checkpoint import ExpandedGenerator
from expander.domains import Domain
from expander.registry import user_registry_path
from expander.guidance.clip import ClipGuidance
from expander.train import ExpansionConfig, Expander, Guidance, expand

@pytest.fixture(autouse=True)
def _cpu_machine_only():
    # accelerate's debug launcher forks, and a forked process cannot use CUDA once its parent has
    # touched the driver (checking for a GPU is enough); torch's Adam asks CUDA about graph capture
    # even for CPU tensors, so on a GPU machine the CPU workers fail. Seen on an H200 (2026-12-04).
    if torch.cuda.is_available():
        pytest.skip("forked CPU workers cannot run where CUDA is present; the multi-process path is tested on CPU machines (CI)")


SMALL = dict(steps=4, batch_size=2, base_batch_size=2, checkpoint_every=2)
GAN = dict(SMALL, r1_every=2)  # R1 runs on steps 0 and 2, through the DDP-wrapped discriminator


def pixel_distance(a, b):
    return (a - b).abs().mean(dim=(1, 2, 3))


def real_images(n, rng):
    return torch.rand(n, 3, 16, 16, generator=rng) * 2 - 1


def _guidance(clip_dir) -> Guidance:
    return Guidance(perceptual=pixel_distance, clip=ClipGuidance.from_pretrained([str(clip_dir)]))


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in module.named_parameters() if p.grad is not None}


def _state(model: ExpandedGenerator) -> dict[str, torch.Tensor]:
    tensors = {f"G.{k}": v for k, v in model.generator.state_dict().items()}
    tensors.update({f"D.{k}": v for k, v in model.discriminator.state_dict().items()})
    return {k: v.detach().clone().contiguous() for k, v in tensors.items()}


def _worker(start, clip_dir, out):
    """Runs on each of the 2 ranks."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    os.environ["OMP_NUM_THREADS"] = "1"  # else accelerate gives each CPU process 2 threads
    torch.set_num_threads(1)
    AcceleratorState._reset_state(True)  # never inherit a state the pytest process may have built
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    rank, guidance = accelerator.process_index, _guidance(clip_dir)

    # 1. one step of the bare trainer: the gradient it applied, and the weights after it
    model = ExpandedGenerator.from_pretrained(start)
    trainer = Expander(model, list(model.domains), guidance, ExpansionConfig(**SMALL), accelerator=accelerator)
    trainer.step()
    save_file(_grads(model.generator), str(out / f"grads{rank}.safetensors"))
    save_file(_state(model), str(out / f"step1_{rank}.safetensors"))

    # 2. expand() with the GAN loss, straight through, and killed at step 2 then resumed
    run = lambda steps, **kw: expand(  # noqa: E731
        ExpandedGenerator.from_pretrained(start), list(model.domains), guidance, ExpansionConfig(**{**GAN, "steps": steps}),
        real_sampler=real_images, progress=False, accelerator=accelerator, **kw
    )
    save_file(_state(run(4)), str(out / f"straight{rank}.safetensors"))
    run(2, state_dir=out / "state")
    save_file(_state(run(4, state_dir=out / "state", resume=True)), str(out / f"resumed{rank}.safetensors"))


@pytest.fixture
def start(tiny_generator, tiny_discriminator, tmp_path):
    model = ExpandedGenerator.from_generator(tiny_generator, tiny_discriminator, alpha=3.0, num_dormant=8)
    model.add_domain(Domain("zombie", direction=-1, prompt="a zombie"))
    model.add_domain(Domain("sketch", direction=-1, prompt="a sketch"))
    model.save_pretrained(tmp_path / "start")
    return tmp_path / "start"


def _reference_step(start, clip_dir):
    """One single-process step on the mean of the two ranks' losses (latents from seed + rank)."""
    model = ExpandedGenerator.from_pretrained(start)
    trainer = Expander(model, list(model.domains), _guidance(clip_dir), ExpansionConfig(**SMALL))
    losses = []
    for rank in (0, 1):
        trainer.rng.manual_seed(trainer.config.seed + rank)
        losses.append(sum(trainer.losses().values()))
    trainer.optimizers["G"].zero_grad(set_to_none=True)
    (sum(losses) / 2).backward()
    trainer.optimizers["G"].step()
    return _grads(model.generator), _state(model)


def test_two_processes_average_gradients_and_stay_in_sync(start, tiny_clip_dir, tmp_path):
    from accelerate.launchers import debug_launcher

    out = tmp_path / "out"
    out.mkdir()
    debug_launcher(_worker, args=(start, tiny_clip_dir, out), num_processes=2)
    before = _state(ExpandedGenerator.from_pretrained(start))
    files = lambda name: [load_file(str(out / f"{name}{r}.safetensors")) for r in (0, 1)]  # noqa: E731

    # The averaged gradient is the gradient of the mean of both ranks' losses, applied once.
    grads, step1 = files("grads"), files("step1_")
    expected_grads, expected_step1 = _reference_step(start, tiny_clip_dir)
    assert set(grads[0]) == set(expected_grads) and not any(k.startswith("style.") for k in grads[0])  # synthesis only
    for key, value in expected_grads.items():
        assert torch.equal(grads[0][key], grads[1][key]), key
        torch.testing.assert_close(grads[0][key], value, rtol=1e-4, atol=1e-6, msg=key)
    for key, value in expected_step1.items():
        assert torch.equal(step1[0][key], step1[1][key]), key
        torch.testing.assert_close(step1[0][key], value, rtol=1e-4, atol=1e-5, msg=key)

    # expand() with the GAN loss: both ranks hold the same G and D, which trained; the mapping did not.
    straight, resumed = files("straight"), files("resumed")
    for key, value in before.items():
        assert torch.equal(straight[0][key], straight[1][key]), key
        if key.startswith("G.style."):
            assert torch.equal(straight[0][key], value), key
    assert any(not torch.equal(straight[0][k], v) for k, v in before.items() if k.startswith("G.convs."))
    assert any(not torch.equal(straight[0][k], v) for k, v in before.items() if k.startswith("D."))

    # Rank 0 wrote the state with both ranks' RNGs; the resumed run is bit-identical to the straight one.
    state = load_file(str(out / "state" / "state.safetensors"))
    assert {"rng/rng", "rng/rng_rank1"} <= set(state) and not torch.equal(state["rng/rng"], state["rng/rng_rank1"])
    for key in before:
        assert torch.equal(straight[0][key], resumed[0][key]), key
        assert torch.equal(resumed[0][key], resumed[1][key]), key


# ---- `expander expand` under 2 processes --------------------------------------------------------------


def _cli_worker(recipe, marks):
    """Each rank runs the CLI, as `accelerate launch -m expander.cli expand recipe.yaml` would."""
    from accelerate.state import AcceleratorState
    from click.testing import CliRunner

    import expander.expansion
    from expander.cli import main

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    AcceleratorState._reset_state(True)
    rank = torch.distributed.get_rank()
    save, register = ExpandedGenerator.save_pretrained, expander.expansion.register_user_model

    def marked(what, function):
        def call(*args, **kwargs):
            (marks / f"{what}{rank}").touch()
            return function(*args, **kwargs)

        return call

    ExpandedGenerator.save_pretrained = marked("save", save)  # this forked process only
    expander.expansion.register_user_model = marked("register", register)
    result = CliRunner().invoke(main, ["expand", str(recipe)], catch_exceptions=False)
    (marks / f"output{rank}").write_text(f"{result.exit_code}\n{result.output}")


def test_expand_cli_with_two_processes_writes_once(tmp_path, tiny_generator, tiny_discriminator, tiny_clip_dir, monkeypatch):
    import yaml
    from accelerate.launchers import debug_launcher

    import expander.guidance.perceptual as perceptual

    lpips_distance = perceptual.lpips_distance  # random backbone: torchvision's weights are absent offline
    monkeypatch.setattr(perceptual, "lpips_distance", lambda net="vgg", pretrained=True: lpips_distance(net, pretrained=False))
    parent = ExpandedGenerator.from_generator(tiny_generator, tiny_discriminator, alpha=3.0, num_dormant=8, base_model="tiny")
    parent.save_pretrained(tmp_path / "parent")
    recipe = {
        "model": str(tmp_path / "parent"),
        "out": str(tmp_path / "joint"),
        "name": "tiny-joint",
        "guidance": {"clip": str(tiny_clip_dir), "perceptual": "lpips-alex"},
        "training": {"steps": 2, "batch_size": 2, "base_batch_size": 2, "checkpoint_every": 1},
        "domains": [{"name": "zombie", "prompt": "a zombie"}, {"name": "sketch", "prompt": "a sketch"}],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    marks = tmp_path / "marks"
    marks.mkdir()
    debug_launcher(_cli_worker, args=(tmp_path / "r.yaml", marks), num_processes=2)

    outputs = {}
    for rank in (0, 1):
        code, outputs[rank] = (marks / f"output{rank}").read_text().split("\n", 1)
        assert code == "0", outputs[rank]
    assert "with 2 domains" in outputs[0] and "with 2 domains" not in outputs[1], outputs  # reported once per run
    assert sorted(p.name for p in marks.iterdir() if not p.name.startswith("output")) == ["register0", "save0"]
    model = ExpandedGenerator.from_pretrained(tmp_path / "joint")
    assert model.domain_names == ["zombie", "sketch"] and [d.steps for d in model.domains] == [2, 2]
    assert "tiny-joint" in user_registry_path().read_text()
    assert not list(tmp_path.glob(".joint.state*")), "training state must be cleaned up"


def test_torchrun_two_cpu_processes_expand_the_world(tmp_path):
    """The real launcher path: fresh interpreters, the process group from WORLD_SIZE/RANK (~10 s).

    Not marked slow: the debug launcher above sets accelerate's state up itself, so only this test
    sees how a plain `torchrun` on a CPU-only machine starts (it once trained every rank alone).
    """
    import yaml

    recipe = {
        "model": "world-portraits",
        "out": str(tmp_path / "world-2"),
        "name": "world-2",
        "guidance": {"clip": "world", "perceptual": "auto"},
        "training": {"steps": 2, "batch_size": 1, "base_batch_size": 2, "checkpoint_every": 1},
        "domains": [{"name": "glasses", "prompt": "a portrait of a person with glasses"}, {"name": "zombie", "prompt": "a portrait of a zombie"}],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0"]
    result = subprocess.run([*command, "-m", "expander.cli", "expand", str(tmp_path / "r.yaml")], env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("with 2 domains") == 1, result.stdout  # the main rank reports, once
    model = ExpandedGenerator.from_pretrained(tmp_path / "world-2")
    assert [d.steps for d in model.domains] == [2, 2]
    assert "world-2" in user_registry_path().read_text()
