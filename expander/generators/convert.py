"""Import StyleGAN2 checkpoints from rosinality's ``stylegan2-pytorch`` and NVIDIA's official code.

Two formats are read:

* **rosinality ``.pt``** (``torch.save`` of a dict with ``g_ema``, optionally ``g``, ``d``,
  ``latent_avg``, ``args``): read with ``torch.load(..., weights_only=True)`` only. ``args`` in real
  files is an ``argparse.Namespace``, which is plain data, so it alone is added to the allowed
  globals for that one call. The parameter names already match :mod:`expander.generators.stylegan2`,
  so loading is a strict ``load_state_dict``; the architecture is inferred from the tensor shapes.

* **NVIDIA ``.pkl``** (stylegan2-ada-pytorch, and the StyleGAN2 networks of the stylegan3 repo):
  these are plain ``pickle.dump`` s of live modules whose classes come from
  ``torch_utils.persistence``. Each module pickles as ``_reconstruct_persistent_obj(meta)`` where
  ``meta`` carries the *source code* of the defining module, which NVIDIA's loader ``exec`` s. Loading
  such a file with ``pickle.load`` runs whatever code the file contains.

Safety model for NVIDIA pickles:

1. Nothing is read without an explicit opt-in (``allow_pickle=True``, ``--allow-pickle`` in the CLI).
2. Even then no code from the file runs. :class:`_RestrictedUnpickler` resolves every global the
   pickle names through a fixed table of stand-ins that only build data:

   * tensors: ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter`` become checked
     rebuilders; their storages arrive as ``torch.storage._load_from_bytes(bytes)``, whose real
     implementation calls ``torch.load(weights_only=False)``, so it is replaced by
     ``torch.load(..., weights_only=True)`` that must return a storage;
   * ``torch_utils.persistence._reconstruct_persistent_obj`` returns a :class:`PickledModule` that
     keeps the class name and the module's ``__dict__`` (``_parameters``, ``_buffers``,
     ``_modules``, init kwargs). The embedded source code is dropped, never executed;
   * ``torch.nn.modules.*`` classes become :class:`PickledModule` too (they record their state via
     ``__setstate__``); ``dnnlib.EasyDict`` becomes a plain ``dict``;
   * data constructors: ``collections.OrderedDict``, ``set``/``frozenset``/``bytearray``, the
     ``latin1`` bytes encoding of old protocols, and numpy scalars/arrays/dtypes without object
     dtypes (NVIDIA layers store gains like ``np.sqrt(2)``).

   Any other global (``os.system``, ``builtins.eval``, ``torch_utils.persistence._src_to_module``,
   a real ``training.networks`` class, ...) raises :class:`UnsafePickleError` naming it, before
   anything is called.
3. The stand-in tree is then walked into a flat NVIDIA state dict and converted to rosinality's
   layout by :func:`convert_nvidia_state_dict` (and :func:`convert_nvidia_discriminator_state_dict`).

Layout facts used by the conversion (checked numerically against an NVIDIA-parameterised reference
forward pass in ``tests/generators/test_convert.py``):

* NVIDIA's ``FullyConnectedLayer`` stores ``randn / lr_multiplier`` and multiplies by
  ``lr_multiplier / sqrt(in)`` (bias by ``lr_multiplier``): the same convention as rosinality's
  ``EqualLinear``, so mapping layers and style affines copy unchanged (affines use ``bias_init=1``
  in both).
* Modulated convolutions: NVIDIA (out, in, k, k) -> rosinality (1, out, in, k, k). NVIDIA applies no
  weight gain before demodulation (it cancels) and multiplies toRGB styles by ``1/sqrt(in k k)``,
  which rosinality puts on the weight instead; without demodulation the two are the same product.
* NVIDIA's up-sampling conv (``up=2``, ``flip_weight=False``) runs as ``conv_transpose2d`` with the
  *unflipped* transposed weight, then a 4-tap FIR with gain 4 and padding (1, 1): exactly
  rosinality's ``conv_transpose2d(stride=2)`` + ``Blur``. No flip is needed.
* ``bias`` + lrelu(0.2) * sqrt(2) == rosinality's ``FusedLeakyReLU``; ``noise_strength`` ->
  ``noise.weight``; ``noise_const`` (res, res) -> ``noises.noise_N`` (1, 1, res, res) with
  ``b4.conv1`` -> 0, ``b{2^r}.conv0`` -> 2r-5, ``b{2^r}.conv1`` -> 2r-4; ``b4.const`` ->
  ``input.input`` with a batch axis; ``mapping.w_avg`` -> ``latent_avg``.
* Discriminator (resnet architecture): ``b{R}.fromrgb`` -> ``convs.0``; ``b{res}.conv0/conv1/skip``
  -> ``convs.K.conv1/conv2/skip``; ``b4.conv/fc/out`` -> ``final_conv`` / ``final_linear.0/1``.
  NVIDIA's down-sampling (FIR then strided conv, 1x1 skip: FIR then stride) matches rosinality's.

Not reproduced: NVIDIA's ``conv_clamp`` (activations clipped to +-256, inactive in practice for
fp32 inference; a warning is logged) and conditional (``c_dim > 0``) models, which are refused.
StyleGAN3 (alias-free) generators have a different architecture and are refused with a clear error.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import io
import logging
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..utils.io import mismatch_report, short_list, state_mismatches, weight_defect
from .stylegan2 import Discriminator, Generator, StyleGAN2Config, make_kernel

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

_DEFAULT_BLUR = (1, 3, 3, 1)
_W_AVG_SAMPLES = 4096  # rosinality's mean_latent(4096)


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A checkpoint asked for Python objects that expander refuses to build (never executed).

    Also a ``ValueError`` so callers (the CLI) can treat it like any other bad input.
    """


class PickleNotAllowedError(ValueError):
    """An NVIDIA ``.pkl`` was given without the explicit ``allow_pickle=True`` opt-in."""


class TensorFlowPickleError(ValueError):
    """An official NVIDIA TensorFlow StyleGAN2 pickle (``dnnlib.tflib``): readable only after conversion.

    Not an :class:`UnsafePickleError`: nothing was refused for safety; the networks in such a file are
    TensorFlow graphs plus variables, which no PyTorch loader reads directly.
    """


# ==================================================================================================
# Shared helpers
# ==================================================================================================


def _check_file(path: PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint is not a file: {path}")
    return path


def _load_strict(module: nn.Module, state_dict: dict, what: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the missing, unexpected and
    mis-shaped keys (up to 20 of each).

    torch's own error is a RuntimeError; checking first gives one ValueError that lists keys and
    shapes together, which is what a user needs to tell a wrong file from a wrong config.
    """
    not_tensors = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(f"{what}: entries that are not tensors: {short_list(not_tensors, 20)}")
    problems = state_mismatches(module.state_dict(), state_dict, limit=20)
    if problems:
        raise ValueError(f"{what} does not match the architecture {getattr(module, 'config', None)}: {problems}")
    for key, value in state_dict.items():
        _check_weight_values(value, f"{what}: {key}")
    module.load_state_dict(state_dict, strict=True)


def _check_weight_values(value: torch.Tensor, what: str) -> None:
    """Refuse integer/boolean tensors and NaN/Inf (``weight_defect``) before anything is built from them:
    the import would write a model whose every image is NaN, and the load check after saving would
    blame the expander checkpoint rather than the file that was imported."""
    defect = weight_defect(value)
    if defect is None:
        return
    if not value.is_floating_point():
        raise ValueError(
            f"{what} is {defect}, so this file holds something other than StyleGAN2 weights (a quantised or "
            f"otherwise re-encoded model?): import the original float checkpoint"
        )
    raise ValueError(
        f"{what} contains {defect}, so the model could never generate an image and nothing was written; the "
        f"training run that saved it had diverged or the file is damaged: import an earlier checkpoint or download it again"
    )


def _set_w_avg(G: Generator, latent_avg: Optional[torch.Tensor], source: str) -> None:
    """Use the stored mean w, or estimate it (seeded, so imports are reproducible) with a warning."""
    if latent_avg is None:
        logger.warning(
            "%s stores no mean w; estimating it from %d seeded samples of the mapping network", source, _W_AVG_SAMPLES
        )
        G.style.update_w_avg(_W_AVG_SAMPLES, generator=torch.Generator().manual_seed(0))
        return
    if not isinstance(latent_avg, torch.Tensor) or latent_avg.numel() != G.style_dim:
        shape = tuple(latent_avg.shape) if isinstance(latent_avg, torch.Tensor) else type(latent_avg).__name__
        raise ValueError(f"{source}: mean w has shape {shape}, expected ({G.style_dim},)")
    _check_weight_values(latent_avg, f"{source}: the mean w (latent_avg)")
    G.style.w_avg.copy_(latent_avg.detach().reshape(-1).to(G.style.w_avg))


# ==================================================================================================
# rosinality .pt
# ==================================================================================================


def _shape(state_dict: dict, key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise ValueError(f"cannot infer the architecture: key {key!r} is missing from the state dict")
    return tuple(state_dict[key].shape)


def _indices(state_dict: dict, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in state_dict if (m := re.fullmatch(pattern, k))})


def infer_config(state_dict: dict, lr_mlp: float = 0.01, channel_multiplier: int = 2) -> StyleGAN2Config:
    """Architecture of a rosinality ``g_ema`` state dict, from its keys and tensor shapes.

    resolution from the number of ``to_rgbs``, ``style_dim`` from ``style.1.weight``, ``n_mlp`` from
    the number of ``style.N.weight``, every width from the conv weights (set explicitly, so any
    channel table works). ``lr_mlp`` cannot be seen in the weights; rosinality always uses 0.01.
    """
    style = _indices(state_dict, r"style\.(\d+)\.weight")
    if not style:
        raise ValueError("cannot infer the architecture: no mapping layers (style.N.weight) in the state dict")
    if style != list(range(1, len(style) + 1)):
        gaps = sorted(set(range(1, max(style) + 1)) - set(style))
        raise ValueError(f"cannot infer the architecture: mapping layers are not contiguous, missing {[f'style.{i}.weight' for i in gaps]}")
    style_dim = _shape(state_dict, "style.1.weight")[1]

    to_rgbs = _indices(state_dict, r"to_rgbs\.(\d+)\..*")
    if to_rgbs != list(range(len(to_rgbs))):
        gaps = sorted(set(range(max(to_rgbs) + 1)) - set(to_rgbs))
        raise ValueError(f"cannot infer the architecture: to_rgbs layers are not contiguous, missing to_rgbs.{gaps}")
    resolution = 2 ** (len(to_rgbs) + 2)

    channels = {4: _shape(state_dict, "input.input")[1]}
    for j in range(len(to_rgbs)):
        # convs.{2j} is the upsampling conv into 2^(j+3); its weight is (1, out, in, k, k).
        channels[2 ** (j + 3)] = _shape(state_dict, f"convs.{2 * j + 1}.conv.weight")[1]
    try:
        return StyleGAN2Config(resolution=resolution, style_dim=style_dim, n_mlp=len(style), channels=channels, lr_mlp=lr_mlp, channel_multiplier=channel_multiplier)
    except ValueError as err:
        raise ValueError(f"cannot infer the architecture ({len(to_rgbs)} to_rgbs layers -> {resolution}x{resolution}): {err}") from err


# Pickle opcodes that name code to call (the ones torch's weights-only reader refuses as "Unsupported
# operand" rather than by the global's name): their byte values and names.
_CODE_OPCODES = {ord(op): name for op, name in ((pickle.INST, "INST"), (pickle.OBJ, "OBJ"), (pickle.GLOBAL, "GLOBAL"), (pickle.STACK_GLOBAL, "STACK_GLOBAL"), (pickle.REDUCE, "REDUCE"), (pickle.NEWOBJ, "NEWOBJ"), (pickle.NEWOBJ_EX, "NEWOBJ_EX"))}


def _is_tensorflow_global(qualified: str) -> bool:
    return qualified.startswith("dnnlib.tflib.")


def _tensorflow_pickle_message(qualified: str) -> str:
    return (
        f"this is an official NVIDIA TensorFlow StyleGAN2 pickle (it names {qualified}), which expander cannot read. Convert it "
        f"to PyTorch first, then import the result: either with rosinality's stylegan2-pytorch (python convert_weight.py "
        f"--repo PATH/TO/NVlabs/stylegan2 FILE.pkl writes FILE.pt; then expander import FILE.pt), or with NVIDIA's "
        f"stylegan2-ada-pytorch, whose legacy.py loads TensorFlow pickles and saves PyTorch ones (python legacy.py "
        f"--source=FILE.pkl --dest=FILE-pytorch.pkl; then expander import FILE-pytorch.pkl --allow-pickle)"
    )


def _weights_unpickler_detail(err: Exception) -> str:
    """The WeightsUnpickler's own reason (e.g. "Unsupported operand 60") out of torch's long message."""
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", str(err), re.S)
    return found.group(1).strip() if found else "torch.load(weights_only=True) could not read it"


def _torch_load_weights_only(path: Path) -> Any:
    """``torch.load(weights_only=True)``, allowing ``argparse.Namespace`` (rosinality's ``args``).

    A Namespace unpickles as ``Namespace.__new__`` + attribute assignment: data, not code.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message advises weights_only=False, which is the code execution this reader exists to avoid: keep only the facts.
        glob = re.search(r"GLOBAL ([\w.]+)", str(err))  # "Unsupported global: GLOBAL x.y" or "unsupported GLOBAL x.y whose module ..."
        operand = re.search(r"Unsupported operand (\d+)", str(err))
        if glob is not None:
            refused = glob.group(1)
        elif operand is not None and int(operand.group(1)) in _CODE_OPCODES:
            refused = f"the {_CODE_OPCODES[int(operand.group(1))]} opcode"
        else:
            refused = None
        if refused is not None and _is_tensorflow_global(refused):
            raise TensorFlowPickleError(f"{path}: {_tensorflow_pickle_message(refused)}") from None
        if refused is None:
            raise ValueError(
                f"{path} is not a readable PyTorch checkpoint: it is corrupt, truncated, or another kind of file (a saved web page "
                f"instead of the download, for instance); download it again. Details: {_weights_unpickler_detail(err)}"
            ) from None
        raise UnsafePickleError(
            f"{path}: the file contains pickled Python objects beyond tensors ({refused}); expander never unpickles arbitrary "
            f"code (torch.load(weights_only=True) refused it). If it is an NVIDIA StyleGAN pickle, give it a .pkl name and use "
            f"load_nvidia_pickle(..., allow_pickle=True) (CLI: expander import FILE.pkl --allow-pickle), which rebuilds only tensors and module state"
        ) from None
    except Exception as err:
        # A corrupt or truncated file fails deep inside the reader with whatever it tripped on: KeyError,
        # struct.error, ... from the unpickler, and safetensors' own SafetensorError (not a ValueError or
        # OSError) for .safetensors names, which torch.load hands to the safetensors reader.
        detail = f"{type(err).__name__}: {_first_line(err)}"
        if path.suffix.lower() == ".safetensors":
            raise ValueError(
                f"{path}: could not read it as a safetensors file ({detail}); it is truncated or corrupt, or not a safetensors "
                f"file at all (a torch.save checkpoint needs a .pt name): download it again"
            ) from err
        raise ValueError(f"{path}: could not read it as a PyTorch checkpoint ({detail}); check the file is a complete torch.save checkpoint (re-download it)") from err


def _first_line(err: Exception) -> str:
    """The first line of an error's message: some readers append pages of advice that do not apply here."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else repr(err)


# Keys that only a rosinality Generator's own state dict has at its top level (the mapping network's
# first layer and the 4x4 styled conv); a checkpoint nests them under g_ema.
_GENERATOR_STATE_KEYS = ("style.1.weight", "conv1.conv.weight")


def _is_bare_generator_state(data: dict) -> bool:
    return all(key in data for key in _GENERATOR_STATE_KEYS)


def _found_keys(data: Any, limit: int = 8) -> str:
    """What a file holds instead of the expected keys: a few of them (a state dict has hundreds), or its type."""
    if not isinstance(data, dict):
        return f"a {type(data).__name__}"
    return f"[{short_list([repr(key) for key in sorted(map(str, data))], limit)}]"


def _bare_generator_state_message(path: Path, state: dict) -> str:
    """A generator's state dict saved on its own (``torch.save(g_ema.state_dict())``, safetensors'
    ``save_file``): the weights are all there, only the checkpoint's ``g_ema`` level is missing."""
    if path.suffix.lower() == ".safetensors":
        # safetensors holds one flat dict of tensors, so it can never hold the nested checkpoint: the fix is a .pt.
        modules, read = "torch, safetensors.torch", f"safetensors.torch.load_file({str(path)!r})"
    else:
        modules, read = "torch", f"torch.load({str(path)!r}, weights_only=True)"
    wrapped = path.with_name(f"{path.stem}-g_ema.pt")
    return (
        f"{path}: this holds a bare generator state dict ({_found_keys(state, 5)}), not a rosinality StyleGAN2 checkpoint, "
        f"which keeps the generator under the key g_ema. If these are the EMA generator's weights, save them as one and "
        f"import that: python -c \"import {modules}; torch.save({{'g_ema': {read}}}, {str(wrapped)!r})\" then expander "
        f"import {wrapped} (add 'latent_avg': the mean w to the dict if you have it; otherwise it is estimated)"
    )


def _args_value(args: Any, name: str) -> Any:
    if isinstance(args, dict):
        return args.get(name)
    return getattr(args, name, None)


def load_rosinality_checkpoint(path: PathLike, config: Optional[StyleGAN2Config] = None) -> tuple[Generator, Optional[Discriminator]]:
    """Read a rosinality ``stylegan2-pytorch`` ``.pt`` into our :class:`Generator` (+ :class:`Discriminator`).

    Uses ``g_ema`` (the EMA generator) and ``d`` when present; ``g`` is ignored. ``w_avg`` comes from
    ``latent_avg`` (present in converted official weights), else it is estimated, seeded, with a
    warning. ``config`` defaults to :func:`infer_config` of ``g_ema``. Raises FileNotFoundError,
    :class:`UnsafePickleError` (a ValueError) for files needing arbitrary unpickling, ValueError for
    anything that is not a matching rosinality checkpoint (naming missing/unexpected keys).
    """
    path = _check_file(path)
    ckpt = _torch_load_weights_only(path)
    if not isinstance(ckpt, dict) or "g_ema" not in ckpt:
        if isinstance(ckpt, dict) and _is_bare_generator_state(ckpt):
            raise ValueError(_bare_generator_state_message(path, ckpt))
        raise ValueError(
            f"{path}: this is not a rosinality StyleGAN2 checkpoint: expected keys g_ema (and optionally g, d, latent_avg, args), found {_found_keys(ckpt)}"
        )
    g_state = ckpt["g_ema"]
    if not isinstance(g_state, dict):
        raise ValueError(f"{path}: g_ema is a {type(g_state).__name__}, expected a state dict")

    if config is None:
        multiplier = _args_value(ckpt.get("args"), "channel_multiplier")
        config = infer_config(g_state, channel_multiplier=int(multiplier) if isinstance(multiplier, int) else 2)
    G = Generator(config)
    _load_strict(G, g_state, f"{path}: g_ema")
    _set_w_avg(G, ckpt.get("latent_avg"), str(path))

    D = None
    if ckpt.get("d") is not None:
        if not isinstance(ckpt["d"], dict):
            raise ValueError(f"{path}: d is a {type(ckpt['d']).__name__}, expected a state dict")
        # rosinality's train.py builds G and D from the same size/channel_multiplier, so D must fit
        # the generator's config; a mismatch means a broken file and is reported, not papered over.
        D = Discriminator(config)
        _load_strict(D, ckpt["d"], f"{path}: d (discriminator)")
        D.eval()
    return G.eval(), D


# ==================================================================================================
# NVIDIA .pkl: restricted unpickling
# ==================================================================================================


class PickledModule:
    """What an unpickled NVIDIA (or ``torch.nn``) module becomes: a class name and its ``__dict__``.

    Nothing here is callable model code; it is only walked to collect tensors and hyperparameters.
    """

    default_class_name = ""  # set on the per-class stand-ins made for torch.nn.modules globals

    def __new__(cls, *args: Any, **kwargs: Any) -> "PickledModule":
        # NEWOBJ creates instances with __new__ alone, so the attributes are initialised here.
        obj = super().__new__(cls)
        obj.class_name = cls.default_class_name
        obj.state = {}
        return obj

    def __init__(self, class_name: Optional[str] = None, state: Optional[dict] = None):
        if class_name is not None:
            self.class_name = class_name
        if state is not None:
            self.state = state

    def __setstate__(self, state: Any) -> None:
        # BUILD for torch.nn stand-ins; (dict_state, slot_state) tuples are merged.
        if isinstance(state, tuple) and len(state) == 2:
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            state = merged
        if not isinstance(state, dict):
            raise UnsafePickleError(f"module {self.class_name} has a {type(state).__name__} state, expected a dict")
        self.state = state

    def __repr__(self) -> str:
        return f"PickledModule({self.class_name!r}, children={list(self.children())})"

    def children(self) -> dict[str, "PickledModule"]:
        modules = self.state.get("_modules") or {}
        return {name: child for name, child in modules.items() if child is not None}

    def child(self, dotted: str) -> Optional["PickledModule"]:
        node: Optional[PickledModule] = self
        for part in dotted.split("."):
            node = node.children().get(part) if node is not None else None
        return node

    def attribute(self, name: str, default: Any = None) -> Any:
        """A scalar setting of the module (``c_dim``, ``activation``, ...): None, a bool, number or text.

        numpy scalars come back as Python ones; anything else (an array, a dict) is not what a
        StyleGAN2 module stores there, so the file is refused rather than guessed at.
        """
        value = self.state.get(name, default)
        if hasattr(value, "item") and getattr(value, "shape", None) == ():  # a numpy scalar
            value = value.item()
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise ValueError(f"the module {self.class_name} stores {name} as a {type(value).__name__}, where a StyleGAN2 module has a number or a text: this is not a StyleGAN2 pickle")
        return value

    def init_kwargs(self) -> dict:
        kwargs = self.state.get("_init_kwargs")
        return dict(kwargs) if isinstance(kwargs, dict) else {}

    def walk(self, prefix: str = ""):
        """Yield (dotted name, module) for this module and every descendant."""
        yield prefix.rstrip("."), self
        for name, child in self.children().items():
            if not isinstance(child, PickledModule):
                raise UnsafePickleError(f"child {prefix}{name} is a {type(child).__name__}, expected a module")
            yield from child.walk(f"{prefix}{name}.")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat ``{dotted name: tensor}`` of parameters and persistent buffers, like ``nn.Module``."""
        out: dict[str, torch.Tensor] = {}
        for prefix, module in self.walk():
            prefix = f"{prefix}." if prefix else ""
            non_persistent = module.state.get("_non_persistent_buffers_set") or set()
            for group in ("_parameters", "_buffers"):
                for name, value in (module.state.get(group) or {}).items():
                    if value is None or (group == "_buffers" and name in non_persistent):
                        continue
                    if not isinstance(value, torch.Tensor):
                        raise UnsafePickleError(f"{prefix}{name} is a {type(value).__name__}, expected a tensor")
                    out[prefix + name] = value
        return out


class _EasyDict(dict):
    """Stand-in for ``dnnlib.EasyDict`` (a dict with attribute access; only the dict part matters)."""


def _reconstruct_persistent_obj(meta: Any) -> PickledModule:
    """Stand-in for ``torch_utils.persistence._reconstruct_persistent_obj``.

    The real one ``exec`` s ``meta['module_src']``; here the source is dropped unread and only the
    class name and the pickled ``__dict__`` are kept.
    """
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise UnsafePickleError("unsupported torch_utils.persistence object (expected meta with type='class')")
    class_name, state = meta.get("class_name"), meta.get("state")
    if not isinstance(class_name, str) or not isinstance(state, dict):
        raise UnsafePickleError("malformed torch_utils.persistence object: class_name must be a str and state a dict")
    return PickledModule(class_name, dict(state))


def _load_storage_from_bytes(data: Any) -> Union[torch.TypedStorage, torch.UntypedStorage]:
    """Stand-in for ``torch.storage._load_from_bytes``, whose real body is ``torch.load(weights_only=False)``."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError(f"torch.storage._load_from_bytes got a {type(data).__name__}, expected bytes")
    try:
        storage = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafePickleError(f"a tensor storage in the pickle holds more than tensor data and was refused: {err}") from err
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError(f"torch.storage._load_from_bytes produced a {type(storage).__name__}, expected a storage")
    return storage


def _is_int_tuple(value: Any) -> bool:
    return isinstance(value, (tuple, list, torch.Size)) and all(isinstance(v, int) for v in value)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_ignored: Any) -> torch.Tensor:
    """Stand-in for ``torch._utils._rebuild_tensor`` / ``_rebuild_tensor_v2``.

    Only a view of an already loaded storage is built; ``requires_grad``, backward hooks and
    metadata (the extra arguments of v2) are ignored: imported weights need none of them.
    """
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError(f"tensor rebuild got a {type(storage).__name__} instead of a storage")
    if not isinstance(storage_offset, int) or not _is_int_tuple(size) or not _is_int_tuple(stride):
        raise UnsafePickleError("tensor rebuild got malformed offset/size/stride")
    if isinstance(storage, torch.TypedStorage):
        dtype, untyped = storage.dtype, storage._untyped_storage
    else:
        dtype, untyped = torch.uint8, storage
    try:
        return torch.empty((0,), dtype=dtype).set_(untyped, storage_offset, tuple(size), tuple(stride))
    except RuntimeError as err:  # e.g. a view that runs past the end of its storage
        raise UnsafePickleError(f"tensor rebuild failed: {err}") from err


def _rebuild_parameter(data: Any, *_ignored: Any) -> torch.Tensor:
    """Stand-in for ``torch._utils._rebuild_parameter(_with_state)``: the tensor is all we keep."""
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError(f"parameter rebuild got a {type(data).__name__} instead of a tensor")
    return data


def _rebuild_from_type_v2(func: Any, _new_type: Any, args: Any, _state: Any) -> torch.Tensor:
    """Stand-in for ``torch._tensor._rebuild_from_type_v2`` (tensors with extra attributes).

    ``func`` was itself resolved through the restricted table; only our tensor rebuilders qualify.
    """
    if func not in (_rebuild_tensor, _rebuild_parameter) or not isinstance(args, tuple):
        raise UnsafePickleError("torch._tensor._rebuild_from_type_v2 with an unsupported rebuild function")
    return func(*args)


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """Stand-in for ``_codecs.encode``, which protocol <= 2 pickles use to store bytes as latin1 text."""
    if not isinstance(text, str) or encoding.lower().replace("-", "") != "latin1":
        raise UnsafePickleError("_codecs.encode is only allowed for latin1 text")
    return text.encode("latin1")


def _is_plain_dtype(dtype: Any) -> bool:
    """A numpy bool/int/float/complex dtype: no fields, no sub-arrays, no objects. Structured and void
    dtypes are refused: their field offsets come from the file, and a crafted offset reads out of bounds."""
    import numpy as np

    return isinstance(dtype, np.dtype) and dtype.kind in "biufc" and dtype.fields is None and dtype.subdtype is None and not dtype.hasobject


def _numpy_dtype(spec: Any, align: Any = False, copy: Any = True) -> Any:
    import numpy as np

    if not isinstance(spec, str):
        raise UnsafePickleError("numpy.dtype with a non-string spec")
    try:
        dtype = np.dtype(spec, bool(align), bool(copy))
    except TypeError as err:
        raise UnsafePickleError(f"numpy.dtype {spec!r} is not a dtype: {err}") from None
    if not _is_plain_dtype(dtype):
        raise UnsafePickleError(f"refused numpy dtype {spec!r}: only bool, integer, float and complex dtypes are read; object dtypes would carry arbitrary Python objects, void and structured ones fields at offsets the file chooses")
    return dtype


# The state numpy pickles for a plain dtype (after version and byte order): no sub-array, names or
# fields, default size and alignment, no flags. A BUILD with any other state is refused: it could turn
# a plain dtype into one with fields at arbitrary offsets, or flag it as holding objects.
_PLAIN_DTYPE_STATE = (None, None, None, -1, -1, 0)


def _numpy_build_allowed(inst: Any, state: Any) -> bool:
    import numpy as np

    if isinstance(inst, np.dtype):
        return isinstance(state, tuple) and len(state) == 8 and state[1] in ("<", ">", "|", "=") and tuple(state[2:]) == _PLAIN_DTYPE_STATE
    # ndarray.__setstate__((version, shape, dtype, is_fortran, raw bytes))
    return isinstance(state, tuple) and len(state) == 5 and _is_plain_dtype(state[2]) and isinstance(state[4], (bytes, bytearray))


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    import numpy as np

    if not _is_plain_dtype(dtype) or not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise UnsafePickleError("numpy scalar with an unsupported dtype or payload")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0]


class _NdarrayMarker:
    """What the global ``numpy.ndarray`` resolves to: a token for ``_reconstruct``, not callable."""


_NDARRAY = _NdarrayMarker()


def _numpy_reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> Any:
    import numpy as np

    if subtype is not _NDARRAY:
        raise UnsafePickleError("numpy array reconstruction is only allowed for plain numpy.ndarray")
    # An empty uint8 array; BUILD then fills it via ndarray.__setstate__ with a dtype that went
    # through _numpy_dtype (object dtypes refused) and raw bytes.
    return np.ndarray.__new__(np.ndarray, (0,), np.uint8)


def _copyreg_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """Stand-in for ``copyreg._reconstructor`` (protocol 0/1 objects): only our own stand-ins."""
    if cls is _EasyDict and base is dict and isinstance(state, (dict, type(None))):
        return _EasyDict(state or {})
    if not (isinstance(cls, type) and issubclass(cls, PickledModule)) or base is not object or state is not None:
        raise UnsafePickleError("copyreg._reconstructor is only allowed for module stand-ins and EasyDict")
    return cls.__new__(cls)


def _torch_module_stand_in(module: str, name: str) -> type:
    """A fresh PickledModule subclass for a ``torch.nn.modules`` class: NEWOBJ + BUILD record its state."""
    return type(name, (PickledModule,), {"default_class_name": f"{module}.{name}"})


def _numpy_globals() -> dict[str, Any]:
    table: dict[str, Any] = {"numpy.dtype": _numpy_dtype}
    if importlib.util.find_spec("numpy") is None:  # pragma: no cover - numpy ships with torch wheels in practice
        return table
    table["numpy.ndarray"] = _NDARRAY  # a token, so the real class can never be called with pickled args
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x and 2.x pickles
        table[f"{core}.scalar"] = _numpy_scalar
        table[f"{core}._reconstruct"] = _numpy_reconstruct
    return table


# Every global an NVIDIA pickle may name, mapped to what it becomes. Anything else is refused.
_SAFE_GLOBALS: dict[str, Any] = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.storage._load_from_bytes": _load_storage_from_bytes,
    "torch_utils.persistence._reconstruct_persistent_obj": _reconstruct_persistent_obj,
    "dnnlib.EasyDict": _EasyDict,
    "dnnlib.util.EasyDict": _EasyDict,
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.bytearray": bytearray,
    "__builtin__.set": set,  # protocol <= 2 spells builtins this way
    "__builtin__.frozenset": frozenset,
    "__builtin__.bytearray": bytearray,
    "_codecs.encode": _codecs_encode,
    "copyreg._reconstructor": _copyreg_reconstructor,
    "copy_reg._reconstructor": _copyreg_reconstructor,
    **_numpy_globals(),
}


def _build_allowed(inst: Any) -> bool:
    """Objects whose state a BUILD opcode may set: module stand-ins and numpy arrays/dtypes."""
    if isinstance(inst, PickledModule):
        return True
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return False
    return type(inst) is np.ndarray or isinstance(inst, np.dtype)


class _RestrictedUnpickler(pickle._Unpickler):
    """An unpickler whose every global lookup goes through ``_SAFE_GLOBALS`` (see module docstring).

    It extends the pure-Python unpickler rather than the C one for a single reason: the BUILD opcode
    (apply state to the object on the stack) would otherwise ``setattr`` on *any* object, including
    the stand-in functions and classes themselves. Here BUILD only reaches module stand-ins (whose
    ``__setstate__`` merely stores a dict), numpy arrays/dtypes, and dicts with an empty state.
    The cost is speed per opcode, which is small: a checkpoint is a few thousand objects plus
    large byte strings that are read in one piece.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        if qualified in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[qualified]
        if (module == "torch.nn.modules" or module.startswith("torch.nn.modules.")) and name.isidentifier():
            return _torch_module_stand_in(module, name)
        if _is_tensorflow_global(qualified):
            # Refused like any other global, but the user needs a conversion step, not a security warning.
            raise TensorFlowPickleError(_tensorflow_pickle_message(qualified))
        raise UnsafePickleError(
            f"refused to unpickle the global {qualified}: expander reads NVIDIA pickles with a restricted unpickler "
            f"that only rebuilds tensors and module state, and never imports or runs code named by the file"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refused a persistent id in the pickle (not used by NVIDIA StyleGAN pickles)")

    def _load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if _build_allowed(inst):
            if not isinstance(inst, PickledModule) and not _numpy_build_allowed(inst, state):
                raise UnsafePickleError(f"refused to set the state of a numpy {type(inst).__name__} to anything but a plain dtype's (BUILD)")
            inst.__setstate__(state)
        elif isinstance(inst, dict) and not state:
            pass  # dict subclasses (OrderedDict, EasyDict) pickle an empty __dict__
        else:
            raise UnsafePickleError(f"refused to set the state of a {type(inst).__name__} object (BUILD)")

    dispatch[pickle.BUILD[0]] = _load_build


def read_nvidia_pickle(path: PathLike, allow_pickle: bool = False) -> Any:
    """Unpickle an NVIDIA ``.pkl`` with the restricted unpickler; modules come back as :class:`PickledModule`.

    Nothing is opened without ``allow_pickle=True``.
    """
    if not allow_pickle:
        raise PickleNotAllowedError(
            f"{path} is a Python pickle. Reading one needs an explicit opt-in: pass allow_pickle=True "
            f"(CLI: expander import --allow-pickle). expander then reads it with a restricted unpickler that only "
            f"rebuilds tensors and module state and never runs code from the file."
        )
    path = _check_file(path)
    try:
        with open(path, "rb") as handle:
            return _RestrictedUnpickler(handle).load()
    except (UnsafePickleError, TensorFlowPickleError) as err:
        raise type(err)(f"{path}: {err}") from err
    except Exception as err:  # a truncated or garbled pickle fails in many ways; all mean "not readable"
        raise ValueError(f"{path}: could not read it as a pickle: {type(err).__name__}: {err}") from err


# ==================================================================================================
# NVIDIA layout -> rosinality layout
# ==================================================================================================


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _add_batch(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0)


def _noise_map(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, 1, *t.shape[-2:])


def _as_one(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1)


def _rgb_bias(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1, 1, 1)


# (NVIDIA key, rosinality key, transform, optional). Optional entries may be absent (use_noise=False).
_KeyMap = list[tuple[str, str, Callable[[torch.Tensor], torch.Tensor], bool]]


def _generator_key_map(config: StyleGAN2Config) -> _KeyMap:
    rows: _KeyMap = []
    for i in range(config.n_mlp):
        rows += [(f"mapping.fc{i}.weight", f"style.{i + 1}.weight", _same, False), (f"mapping.fc{i}.bias", f"style.{i + 1}.bias", _same, False)]

    def styled(nv: str, ros: str, noise_idx: int) -> _KeyMap:
        return [
            (f"{nv}.weight", f"{ros}.conv.weight", _add_batch, False),
            (f"{nv}.affine.weight", f"{ros}.conv.modulation.weight", _same, False),
            (f"{nv}.affine.bias", f"{ros}.conv.modulation.bias", _same, False),
            (f"{nv}.bias", f"{ros}.activate.bias", _same, False),
            (f"{nv}.noise_strength", f"{ros}.noise.weight", _as_one, True),
            (f"{nv}.noise_const", f"noises.noise_{noise_idx}", _noise_map, True),
        ]

    def to_rgb(nv: str, ros: str) -> _KeyMap:
        return [
            (f"{nv}.weight", f"{ros}.conv.weight", _add_batch, False),
            (f"{nv}.affine.weight", f"{ros}.conv.modulation.weight", _same, False),
            (f"{nv}.affine.bias", f"{ros}.conv.modulation.bias", _same, False),
            (f"{nv}.bias", f"{ros}.bias", _rgb_bias, False),
        ]

    rows.append(("synthesis.b4.const", "input.input", _add_batch, False))
    rows += styled("synthesis.b4.conv1", "conv1", 0)
    rows += to_rgb("synthesis.b4.torgb", "to_rgb1")
    for j, log_res in enumerate(range(3, config.log_size + 1)):
        block = f"synthesis.b{2 ** log_res}"
        rows += styled(f"{block}.conv0", f"convs.{2 * j}", 2 * j + 1)
        rows += styled(f"{block}.conv1", f"convs.{2 * j + 1}", 2 * j + 2)
        rows += to_rgb(f"{block}.torgb", f"to_rgbs.{j}")
    return rows


def _discriminator_key_map(config: StyleGAN2Config) -> _KeyMap:
    rows: _KeyMap = [
        (f"b{config.resolution}.fromrgb.weight", "convs.0.0.weight", _same, False),
        (f"b{config.resolution}.fromrgb.bias", "convs.0.1.bias", _same, False),
    ]
    for k, log_res in enumerate(range(config.log_size, 2, -1), start=1):
        block = f"b{2 ** log_res}"
        rows += [
            (f"{block}.conv0.weight", f"convs.{k}.conv1.0.weight", _same, False),
            (f"{block}.conv0.bias", f"convs.{k}.conv1.1.bias", _same, False),
            (f"{block}.conv1.weight", f"convs.{k}.conv2.1.weight", _same, False),
            (f"{block}.conv1.bias", f"convs.{k}.conv2.2.bias", _same, False),
            (f"{block}.skip.weight", f"convs.{k}.skip.1.weight", _same, False),
        ]
    rows += [
        ("b4.conv.weight", "final_conv.0.weight", _same, False),
        ("b4.conv.bias", "final_conv.1.bias", _same, False),
        ("b4.fc.weight", "final_linear.0.weight", _same, False),
        ("b4.fc.bias", "final_linear.0.bias", _same, False),
        ("b4.out.weight", "final_linear.1.weight", _same, False),
        ("b4.out.bias", "final_linear.1.bias", _same, False),
    ]
    return rows


def _check_resample_filters(source: dict, blur_kernel: Sequence[int], what: str) -> None:
    """NVIDIA stores its FIR filter in every layer; rosinality's blur kernels come from the config."""
    expected = make_kernel(blur_kernel)
    for key, value in source.items():
        if key.endswith("resample_filter"):
            if tuple(value.shape) != tuple(expected.shape) or not torch.allclose(value.float(), expected, atol=1e-6):
                raise ValueError(f"{what}: {key} is not the {list(blur_kernel)} filter this converter supports")


def _apply_key_map(source: dict, key_map: _KeyMap, template: dict, what: str) -> dict:
    """Fill ``template`` (a fresh rosinality state dict) from ``source``, strict in both directions."""
    out = dict(template)
    used, missing, mismatched = set(), [], []
    for src, dst, transform, optional in key_map:
        if src not in source:
            if optional and dst.endswith("noise.weight"):
                out[dst] = torch.zeros_like(template[dst])  # use_noise=False: no noise at all
            elif not optional:
                missing.append(src)
            continue
        value = transform(source[src].detach().to(torch.float32))
        if tuple(value.shape) != tuple(template[dst].shape):
            mismatched.append(f"{src} {tuple(source[src].shape)} -> {dst} {tuple(template[dst].shape)}")
            continue
        out[dst] = value.clone().contiguous()
        used.add(src)
    unexpected = sorted(k for k in source if k not in used and not k.endswith("resample_filter"))
    if missing or unexpected or mismatched:
        raise ValueError(f"{what} cannot be converted: {mismatch_report(sorted(missing), unexpected, mismatched, limit=20)}")
    return out


def infer_nvidia_config(nvidia_sd: dict, lr_multiplier: float = 0.01, blur_kernel: Sequence[int] = _DEFAULT_BLUR) -> StyleGAN2Config:
    """Architecture of an NVIDIA StyleGAN2 generator state dict (``mapping.*``, ``synthesis.*``)."""
    if any(k.startswith("synthesis.input.") or re.match(r"synthesis\.L\d+_", k) for k in nvidia_sd):
        raise ValueError("this is a StyleGAN3 (alias-free) generator; only StyleGAN2 generators can be converted")
    if any(k.startswith("mapping.embed.") for k in nvidia_sd):
        raise ValueError("this is a class-conditional generator (c_dim > 0); only unconditional models are supported")
    fcs = _indices(nvidia_sd, r"mapping\.fc(\d+)\.weight")
    if not fcs or fcs != list(range(len(fcs))):
        raise ValueError(f"cannot infer the architecture: mapping layers mapping.fcN.weight missing or not contiguous (found {fcs})")
    w_dim = _shape(nvidia_sd, f"mapping.fc{fcs[-1]}.weight")[0]
    for i in fcs:
        if _shape(nvidia_sd, f"mapping.fc{i}.weight") != (w_dim, w_dim):
            raise ValueError(
                f"mapping.fc{i}.weight has shape {_shape(nvidia_sd, f'mapping.fc{i}.weight')}; rosinality's layout needs "
                f"z_dim == w_dim == every mapping width ({w_dim})"
            )
    blocks = _indices(nvidia_sd, r"synthesis\.b(\d+)\..*")
    expected_blocks = [2**i for i in range(2, int(math.log2(max(blocks))) + 1)] if blocks else []
    if not blocks or blocks != expected_blocks:
        raise ValueError(f"cannot infer the architecture: synthesis blocks {blocks}, expected b4, b8, ... up to the output resolution")
    for res in blocks:
        if f"synthesis.b{res}.torgb.weight" not in nvidia_sd or f"synthesis.b{res}.skip.weight" in nvidia_sd:
            raise ValueError(f"synthesis.b{res} is not a 'skip' architecture block (every block needs a torgb, none a skip); only the default StyleGAN2 generator architecture is supported")
        if _shape(nvidia_sd, f"synthesis.b{res}.torgb.weight")[0] != 3:
            raise ValueError(f"synthesis.b{res}.torgb outputs {_shape(nvidia_sd, f'synthesis.b{res}.torgb.weight')[0]} channels; only RGB models are supported")
    channels = {res: _shape(nvidia_sd, f"synthesis.b{res}.conv1.weight")[0] for res in blocks}
    try:
        return StyleGAN2Config(resolution=blocks[-1], style_dim=w_dim, n_mlp=len(fcs), channels=channels, lr_mlp=float(lr_multiplier), blur_kernel=list(blur_kernel))
    except ValueError as err:
        raise ValueError(f"cannot convert this generator: {err}") from err


def convert_nvidia_state_dict(
    nvidia_sd: dict, lr_multiplier: float = 0.01, blur_kernel: Sequence[int] = _DEFAULT_BLUR
) -> tuple[dict, Optional[torch.Tensor], StyleGAN2Config]:
    """NVIDIA generator state dict -> (rosinality ``g_ema`` state dict, ``latent_avg`` or None, config).

    ``lr_multiplier`` is the mapping network's (NVIDIA's default 0.01; :func:`load_nvidia_pickle`
    reads it from the pickle). Every tensor is accounted for: missing or left-over keys raise.
    """
    config = infer_nvidia_config(nvidia_sd, lr_multiplier=lr_multiplier, blur_kernel=blur_kernel)
    _check_resample_filters(nvidia_sd, blur_kernel, "generator")
    source = {k: v for k, v in nvidia_sd.items() if k != "mapping.w_avg"}
    template = Generator(config).state_dict()
    state = _apply_key_map(source, _generator_key_map(config), template, "generator")
    latent_avg = nvidia_sd.get("mapping.w_avg")
    return state, (latent_avg.detach().float().clone() if latent_avg is not None else None), config


def convert_nvidia_discriminator_state_dict(nvidia_sd: dict, config: StyleGAN2Config) -> dict:
    """NVIDIA (resnet) discriminator state dict -> rosinality ``d`` state dict for ``config``.

    Raises ValueError when the discriminator cannot be expressed with ``config`` (other widths than
    the generator's, conditional, 'skip'/'orig' architecture, more than one minibatch-stddev channel).
    """
    if any(k.startswith("mapping.") for k in nvidia_sd):
        raise ValueError("the discriminator is class-conditional (c_dim > 0); only unconditional models are supported")
    if any(re.fullmatch(rf"b{res}\.fromrgb\.weight", k) for k in nvidia_sd for res in [2**i for i in range(2, config.log_size)]):
        raise ValueError("the discriminator is not the default 'resnet' architecture (fromrgb in more than the first block)")
    conv_in = nvidia_sd.get("b4.conv.weight")
    if conv_in is not None and conv_in.shape[1] != conv_in.shape[0] + 1:
        raise ValueError(f"the discriminator's minibatch-stddev layer adds {conv_in.shape[1] - conv_in.shape[0]} channels; rosinality's adds 1")
    _check_resample_filters(nvidia_sd, config.blur_kernel, "discriminator")
    template = Discriminator(config).state_dict()
    return _apply_key_map(nvidia_sd, _discriminator_key_map(config), template, "discriminator")


def _mapping_lr_multiplier(g_root: PickledModule) -> float:
    """The mapping network's learning-rate multiplier, as NVIDIA's layers actually apply it."""
    fc0 = g_root.child("mapping.fc0")
    if fc0 is not None and fc0.attribute("bias_gain") is not None:
        return float(fc0.attribute("bias_gain"))  # FullyConnectedLayer.bias_gain == lr_multiplier
    mapping = g_root.child("mapping")
    if mapping is not None and mapping.init_kwargs().get("lr_multiplier") is not None:
        return float(mapping.init_kwargs()["lr_multiplier"])
    return 0.01


def _check_generator_hyperparameters(g_root: PickledModule) -> None:
    """Refuse settings the rosinality layout cannot express; warn about the harmless ones."""
    if int(g_root.attribute("c_dim", 0) or 0) > 0:
        raise ValueError(f"this generator is class-conditional (c_dim={g_root.attribute('c_dim')}); only unconditional models are supported")
    clamped = False
    for name, module in g_root.walk():
        activation = module.attribute("activation")
        if name.startswith("mapping.fc") and activation not in (None, "lrelu"):
            raise ValueError(f"{name} uses activation {activation!r}; rosinality's mapping network uses lrelu")
        if name.startswith("synthesis.") and module.attribute("architecture") not in (None, "skip"):
            raise ValueError(f"{name} uses the {module.attribute('architecture')!r} architecture; only 'skip' is supported")
        clamped = clamped or module.attribute("conv_clamp") is not None
    if clamped:
        logger.warning("the NVIDIA generator clamps activations (conv_clamp); the converted model does not (inactive in practice for fp32 inference)")


def _convert_discriminator(d_root: Any, config: StyleGAN2Config, path: Path) -> Optional[Discriminator]:
    """Best effort: the generator is what matters, so an unconvertible D is dropped with a warning."""
    if not isinstance(d_root, PickledModule):
        return None
    try:
        if int(d_root.attribute("c_dim", 0) or 0) > 0:
            raise ValueError("the discriminator is class-conditional")
        state = convert_nvidia_discriminator_state_dict(d_root.state_dict(), config)
    except ValueError as err:
        logger.warning("%s: discriminator not imported (%s); the generator is unaffected", path, err)
        return None
    group_size = d_root.child("b4.mbstd").attribute("group_size") if d_root.child("b4.mbstd") is not None else None
    D = Discriminator(config, stddev_group=int(group_size) if group_size else 4)
    if group_size != 4:  # None means "the whole minibatch" in NVIDIA's code
        logger.warning("%s: NVIDIA minibatch-stddev group size %s; expander checkpoints reload with rosinality's 4", path, group_size)
    _load_strict(D, state, f"{path}: D (converted)")
    return D.eval()


def load_nvidia_pickle(path: PathLike, allow_pickle: bool = False) -> tuple[Generator, Optional[Discriminator]]:
    """Read an NVIDIA stylegan2-ada-pytorch / stylegan3 (StyleGAN2 networks) ``.pkl`` into our classes.

    Uses ``G_ema`` (and ``D`` when it can be converted; otherwise None with a logged warning).
    Requires ``allow_pickle=True`` (:class:`PickleNotAllowedError` otherwise, before the file is
    touched); reading goes through the restricted unpickler described in the module docstring.
    """
    data = read_nvidia_pickle(path, allow_pickle=allow_pickle)
    path = Path(path)
    if not isinstance(data, dict) or "G_ema" not in data:
        raise ValueError(f"{path}: this is not an NVIDIA StyleGAN2 pickle: expected keys G_ema (and optionally G, D), found {_found_keys(data)}")
    g_root = data["G_ema"]
    if not isinstance(g_root, PickledModule):
        raise ValueError(f"{path}: G_ema is a {type(g_root).__name__}, expected a pickled generator module")
    _check_generator_hyperparameters(g_root)
    state, latent_avg, config = convert_nvidia_state_dict(g_root.state_dict(), lr_multiplier=_mapping_lr_multiplier(g_root))
    G = Generator(config)
    _load_strict(G, state, f"{path}: G_ema (converted)")
    _set_w_avg(G, latent_avg, str(path))
    return G.eval(), _convert_discriminator(data.get("D"), config, path)
