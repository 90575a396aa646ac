"""Domains of an expanded generator: what each repurposed direction now means, and their validation."""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Optional

METHODS = ("nada", "sds", "mystyle", "manual")
BASE_DOMAIN = "base"
# The largest seed of sampling and training. torch's CPU generator seeds itself from the low 32 bits
# only (seed 2**32 draws what seed 0 draws), so a larger seed would silently repeat a smaller one's
# images; -2 leaves room for the seed + 1 that random noise and a second rank draw from.
MAX_SEED = 2**32 - 2
# The default seed of `expander eval`'s latents: held out from training, whose latents come from the
# recipe's seed (0 unless set) and begin with the same z as random_latents(n, 0), so a default eval of a
# default training run would score the very latents its domains were trained on. Seed 0 is also the
# stream the shipped world GAN's first mapping layer was initialised from (HISTORY.md, 2026-12-07).
EVAL_SEED = 1000
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-. ]{0,63}$")


@dataclass
class Domain:
    """One new domain living on one repurposed direction."""

    name: str  # unique, used on the command line: `expander sample --domain NAME`
    direction: int  # index into the SeFA basis (0 = most significant)
    method: str = "nada"  # adaptation loss that trained it: nada | sds | mystyle | manual
    prompt: Optional[str] = None  # target text (nada, sds)
    source_prompt: Optional[str] = None  # source text for directional losses (nada)
    images: Optional[str] = None  # image source (mystyle): folder or dataset description
    alpha: Optional[float] = None  # distance of the repurposed subspace; None = the model's alpha
    steps: int = 0  # training steps spent on this domain
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).date().isoformat())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Domain":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"domain entry {data.get('name', '?')!r} has unknown keys {unknown}; allowed: {sorted(known)}")
        if "name" not in data or "direction" not in data:
            raise ValueError(f"domain entry {data!r} needs at least 'name' and 'direction'")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def is_valid_alpha(value: Any) -> bool:
    """Whether ``value`` can be a domain's alpha: a positive finite number (not a bool or a numeric string)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_domain_name(name: Any) -> None:
    """Raise a ValueError unless ``name`` can name a domain (on the command line, in the model card)."""
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise ValueError(f"invalid domain name {name!r}: use 1-64 letters, digits, spaces, '_', '-' or '.', starting with a letter or digit")
    if name == BASE_DOMAIN:
        raise ValueError(f"'{BASE_DOMAIN}' is reserved for the source domain; choose another domain name")


def validate_domains(domains: Iterable[Domain], style_dim: int) -> list[Domain]:
    """Check names are valid and unique, directions unique and in range, methods known."""
    domains = list(domains)
    seen_names: dict[str, Domain] = {}
    seen_directions: dict[int, Domain] = {}
    for domain in domains:
        check_domain_name(domain.name)
        if domain.name in seen_names:
            raise ValueError(f"duplicate domain name {domain.name!r}: domain names must be unique")
        if not isinstance(domain.direction, int) or isinstance(domain.direction, bool):
            raise ValueError(f"domain {domain.name!r}: direction must be an integer, got {domain.direction!r}")
        if not 0 <= domain.direction < style_dim:
            raise ValueError(f"domain {domain.name!r}: direction {domain.direction} is out of range 0..{style_dim - 1}")
        if domain.direction in seen_directions:
            other = seen_directions[domain.direction]
            raise ValueError(f"domains {other.name!r} and {domain.name!r} both use direction {domain.direction}: each domain needs its own direction")
        if domain.method not in METHODS:
            raise ValueError(f"domain {domain.name!r}: unknown method {domain.method!r}; expected one of {list(METHODS)}")
        for key in ("prompt", "source_prompt", "images"):
            if getattr(domain, key) is not None and not isinstance(getattr(domain, key), str):
                raise ValueError(f"domain {domain.name!r}: {key} must be a text, got {getattr(domain, key)!r}")
        if not isinstance(domain.steps, int) or isinstance(domain.steps, bool) or domain.steps < 0:
            raise ValueError(f"domain {domain.name!r}: steps must be a whole number >= 0 (the training steps spent on it), got {domain.steps!r}")
        if not isinstance(domain.created, str):
            raise ValueError(f"domain {domain.name!r}: created must be a date text such as '2026-01-31', got {domain.created!r}")
        if domain.alpha is not None and not is_valid_alpha(domain.alpha):
            raise ValueError(f"domain {domain.name!r}: alpha must be a positive finite number, got {domain.alpha!r}")
        seen_names[domain.name] = domain
        seen_directions[domain.direction] = domain
    return domains


class UnknownDomainError(KeyError):
    """A domain name that the model does not have; the message lists close matches."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def unknown_domain_error(name: str, known: Iterable[str]) -> UnknownDomainError:
    known = sorted(set(known) | {BASE_DOMAIN})
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return UnknownDomainError(f"unknown domain {name!r}.{hint} Known domains: {', '.join(known)} (see `expander domains`).")
