"""The persisted decision of cache_kind "auto" (SPEC §6 step 4): a JSON plan file keyed by a signature.

One file holds the plans of any number of signatures (models, devices, batch sizes ...); saving one keeps the
others. Layout (strict JSON; non-finite floats are written as the strings "inf", "-inf", "nan"):

    {"format_version": 1,
     "plans": {"<PlanSignature.key()>": {
         "signature": {"config": "<sha256>", "weights": "<sha256>", "device": "cuda NVIDIA H100 80GB HBM3 sm_90", ...},
         "choice": {"k": "q8_0", "v": "q4_0"},
         "created": 1767225600.0,
         "table": [{"kinds": {"k": "fp16", "v": "fp16"}, "nbytes": 33554432, "delta_nll": 0.0, "ppl_ratio": 1.0,
                    "mean_kl": 0.0, "tokens_per_s": 812.5, "passed": true, "reason": null}, ...]}}}

Writes are atomic: the new file is written to a temp file in the same directory, fsynced, and renamed over the old
one with os.replace (then the directory is fsynced), so a reader sees the old file or the new one, never a torn
one, and a failed write leaves the old file and no temp file. A save is a read-modify-write of the whole file;
concurrent saves from several processes are serialised by an exclusive flock on a sidecar `.<name>.lock` (left in
place, empty), so none loses another's entry. Where fcntl does not exist (Windows) saves are not serialised.

A file that is not UTF-8 JSON, does not follow the layout, or has another format_version is corrupt: `load` raises
PlanFileError naming the file, the problem and what to do, and leaves the file alone; `save` moves it aside to
`<name>.corrupt-<UTC timestamp>` first (never deleting it), logs a warning and returns the new path.

Weights digest: names, shapes and dtypes of every tensor of the state dict, plus the raw bytes of `sample` (1024)
elements per tensor at the evenly spaced flat indices i·numel // sample (all of them when numel <= sample). Any
training step, fine-tune or merged LoRA moves essentially every sampled element, so another checkpoint of the
same architecture is caught; the cost is one small gather per tensor and no full pass over memory. Measured on a
Llama-3.2-1B-shaped state dict (146 tensors, 1.24 G parameters, 2.5 GB in bf16): about 0.01 s warm, on CPU or on
an H100, against 1.6-2.0 s to hash every byte on CPU (sha256 at ~1.4 GB/s) and 3.6 s from the H100 (its 2.5 GB
device-to-host copy included). It misses an edit confined to unsampled elements, e.g. a few embedding rows changed
by hand: pass sample=None to hash every byte. Bytes are the machine's native (little-endian) layout, so the digest
is the same in every process and for the same values on any device (the device has its own signature field).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from caramba._version import __version__

from caramba.errors import CarambaError
from caramba.fsutil import atomic_write_text
from caramba.runtime.cache_candidates import Candidate, CandidateRow

try:
    import fcntl
except ImportError:  # Windows: see the module docstring
    fcntl = None

FORMAT_VERSION = 1
DEFAULT_REPROBE_S = 7 * 24 * 3600.0  # drivers, clocks and untracked libraries drift; a week is cheap to re-probe
log = logging.getLogger("caramba")


class PlanFileError(CarambaError, ValueError):
    """A plan file that cannot be read: not JSON, not the plan layout, or another format version."""


class _Malformed(Exception):
    """What is wrong with the file; `load` turns it into a PlanFileError, `save` into a set-aside."""


# ---------------------------------------------------------------------------------------------------------------
# Signature
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanSignature:
    """Everything a plan's measurements depend on; a plan is reused only for an equal signature."""

    config: str  # stable_digest of the model config
    weights: str  # weights_digest
    device: str  # describe_device: the hardware model, not its index
    dtype: str  # "float16"
    batch: int
    max_seq_len: int
    caramba_version: str
    torch_version: str
    options: str  # stable_digest of the settings that shaped the choice: budget, gates, qblock, eval text ...

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("batch", "max_seq_len"):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"PlanSignature.{f.name} must be an integer >= 1, got {value!r}")
            elif not isinstance(value, str):
                raise ValueError(f"PlanSignature.{f.name} must be a str, got {value!r}")

    @classmethod
    def of(cls, config: Any, weights: Mapping[str, torch.Tensor] | torch.nn.Module, device: str | torch.device,
           dtype: torch.dtype, batch: int, max_seq_len: int, options: Mapping[str, Any] | None = None, *,
           weights_sample: int | None = 1024) -> PlanSignature:
        """Digest a model config (a dict, a dataclass or anything with to_dict) and its weights for `device`."""

        return cls(stable_digest(config), weights_digest(weights, weights_sample), describe_device(device),
                   str(dtype).removeprefix("torch."), batch, max_seq_len, __version__, torch.__version__,
                   stable_digest(dict(options or {})))

    def key(self) -> str:
        """A stable 32-hex-digit key: the same fields give the same key in every process and on every machine."""
        return stable_digest(dataclasses.asdict(self))[:32]


def stable_digest(obj: Any) -> str:
    """sha256 of canonical JSON (sorted keys, no whitespace) of dicts, lists, dataclasses, scalars and dtypes."""
    text = json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain(dataclasses.asdict(obj))
    if callable(getattr(obj, "to_dict", None)):  # Hugging Face configs
        return _plain(obj.to_dict())
    if isinstance(obj, Mapping):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"cannot digest a mapping with non-str keys: {sorted(map(repr, obj))[:5]}")
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    raise TypeError(f"cannot digest a {type(obj).__name__} ({obj!r:.80}); pass plain dicts, lists and scalars")


def weights_digest(weights: Mapping[str, torch.Tensor] | torch.nn.Module, sample: int | None = 1024) -> str:
    """sha256 over names, shapes, dtypes and sampled values of every tensor (see the module docstring)."""
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int) or sample < 1):
        raise ValueError(f"sample must be a positive int or None (every byte), got {sample!r}")
    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        h.update(json.dumps([name, list(t.shape), str(t.dtype)]).encode() + b"\n")
        h.update(_value_bytes(t, sample))  # its length follows from shape and dtype: the stream is unambiguous
    return h.hexdigest()


def _value_bytes(t: torch.Tensor, sample: int | None) -> memoryview:
    flat = t.reshape(-1)
    if sample is not None and flat.numel() > sample:
        flat = flat[torch.arange(sample, device=flat.device) * flat.numel() // sample]
    return memoryview(flat.contiguous().cpu().view(torch.uint8).numpy())  # no copy for a contiguous CPU tensor


def describe_device(device: str | torch.device) -> str:
    """The hardware a measurement ran on: 'cuda NVIDIA H100 80GB HBM3 sm_90', 'mps', 'cpu x86_64'.

    The index is left out on purpose: two identical GPUs share a plan, two different ones do not.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return f"cpu {platform.machine()}"
    module = torch.get_device_module(device.type)
    if hasattr(module, "get_device_capability"):  # GPUs with a name and a compute capability
        major, minor = module.get_device_capability(device)
        return f"{device.type} {module.get_device_name(device)} sm_{major}{minor}"
    return device.type


# ---------------------------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """The choice for one signature and the measured table behind it; the chosen row is in the table and passed."""

    signature: PlanSignature
    choice: Candidate
    table: tuple[CandidateRow, ...]
    created: float  # seconds since the epoch (the PlanFile's clock)

    def __post_init__(self) -> None:
        object.__setattr__(self, "table", tuple(self.table))
        chosen = [row for row in self.table if row.candidate == self.choice]
        if len(chosen) != 1 or not chosen[0].passed:
            raise ValueError(f"the table must hold exactly one row for the choice {self.choice}, and it must have "
                             f"passed; found {len(chosen)} row(s)")
        if isinstance(self.created, bool) or not isinstance(self.created, (int, float)) \
                or not math.isfinite(self.created):
            raise ValueError(f"created must be a finite timestamp in seconds, got {self.created!r}")

    @property
    def cache_kind(self) -> str | dict[str, str]:
        """The choice as GenerateConfig.cache_kind takes it: a kind name, or a per-tensor mapping."""
        return self.choice.cache_kind


# ---------------------------------------------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------------------------------------------
class PlanFile:
    """Plans for many signatures in one JSON file; `clock` (seconds) is injectable so tests need not sleep."""

    def __init__(self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.clock = clock

    def load(self, signature: PlanSignature, max_age_s: float | None = DEFAULT_REPROBE_S) -> Plan | None:
        """The plan saved for `signature`, or None when the caller should probe again: no file, no entry for this
        signature (any field differs), or the plan is older than max_age_s (None: never too old) or dated in the
        future (a clock that was wrong then). Raises PlanFileError for a corrupt file, which it leaves untouched."""
        if max_age_s is not None and (isinstance(max_age_s, bool) or not isinstance(max_age_s, (int, float))
                                      or not max_age_s >= 0):
            raise ValueError(f"max_age_s must be a number >= 0 or None, got {max_age_s!r}")
        try:
            plan = (self._read() or {}).get(signature.key())
        except _Malformed as e:
            raise PlanFileError(
                f"plan file {self.path} is corrupt: {e}. It has been left as it is. Delete it or move it away to "
                f"have cache_kind 'auto' probe again (the next save of a plan there also moves it aside, to "
                f"{self.path.name}.corrupt-<timestamp>, and starts a new file).") from None
        if plan is None:
            return None
        age = self.clock() - plan.created
        if max_age_s is not None and not 0 <= age <= max_age_s:
            return None
        return plan

    def save(self, plan: Plan) -> Path | None:
        """Add or replace the entry of plan.signature, keeping every other entry; atomic. A corrupt file is first
        moved aside (and a warning logged): returns where it went, or None when nothing was set aside."""
        if not isinstance(plan, Plan):
            raise TypeError(f"save takes a Plan, got {type(plan).__name__}")
        entry = _entry_json(plan)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            aside = None
            try:
                entries = {key: _entry_json(p) for key, p in (self._read() or {}).items()}
            except _Malformed as e:
                aside, entries = self._set_aside(str(e)), {}
            entries[plan.signature.key()] = entry
            text = json.dumps({"format_version": FORMAT_VERSION, "plans": entries}, indent=1, allow_nan=False)
            self._write(text + "\n")
        return aside

    # ---- reading ------------------------------------------------------------------------------------------------
    def _read(self) -> dict[str, Plan] | None:
        """Every plan in the file, by key; None when there is no file. Any damage anywhere raises _Malformed."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise _Malformed(f"it is not UTF-8 text (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise _Malformed(f"it is not valid JSON ({e})") from None
        return {key: _plan(key, entry) for key, entry in _entries(data).items()}

    # ---- writing ------------------------------------------------------------------------------------------------
    def _write(self, text: str) -> None:
        atomic_write_text(self.path, text)

    def _set_aside(self, problem: str) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.clock()))
        aside, n = self.path.with_name(f"{self.path.name}.corrupt-{stamp}"), 1
        while aside.exists():  # under the lock, so no other save picks the same name
            aside, n = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}"), n + 1
        os.replace(self.path, aside)
        log.warning("plan file %s is corrupt: %s. Moved it aside to %s (every byte kept) and started a new one.",
                    self.path, problem, aside)
        return aside

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if fcntl is None:
            yield
            return
        with open(self.path.with_name(f".{self.path.name}.lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------------------
# JSON <-> Plan
# ---------------------------------------------------------------------------------------------------------------
_ROW_NUMBERS = ("delta_nll", "ppl_ratio", "mean_kl", "tokens_per_s")
_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def _entries(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _Malformed(f"it must hold a JSON object, got {type(data).__name__}")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise _Malformed(f"format_version is {version!r}, this caramba reads {FORMAT_VERSION} (a plan file from "
                         f"another caramba version, or not a plan file)")
    _keys(data, ("format_version", "plans"), "the top level")
    if not isinstance(data["plans"], dict):
        raise _Malformed(f"'plans' must be an object, got {type(data['plans']).__name__}")
    return data["plans"]


def _plan(key: str, entry: Any) -> Plan:
    try:
        return _plan_from_json(key, entry)
    except (_Malformed, ValueError, TypeError) as e:
        raise _Malformed(f"plans[{key!r}]: {e}") from None


def _entry_json(plan: Plan) -> dict[str, Any]:
    return {"signature": dataclasses.asdict(plan.signature), "choice": plan.choice.mapping,
            "created": plan.created, "table": [_row_json(row) for row in plan.table]}


def _row_json(row: CandidateRow) -> dict[str, Any]:
    numbers = {name: _float_json(getattr(row, name)) for name in _ROW_NUMBERS}
    return {"kinds": row.candidate.mapping, "nbytes": row.nbytes, **numbers, "passed": row.passed,
            "reason": row.reason}


def _float_json(x: float | None) -> float | str | None:
    if x is None or math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _plan_from_json(key: str, entry: Any) -> Plan:
    _keys(entry, ("signature", "choice", "created", "table"), "the entry")
    _keys(entry["signature"], tuple(f.name for f in dataclasses.fields(PlanSignature)), "signature")
    signature = PlanSignature(**entry["signature"])
    if signature.key() != key:
        raise _Malformed(f"the key does not match its signature (which has key {signature.key()!r}); "
                         f"was the file edited by hand?")
    if not isinstance(entry["table"], list):
        raise _Malformed(f"table must be a list, got {type(entry['table']).__name__}")
    table = tuple(_row_from_json(i, row) for i, row in enumerate(entry["table"]))
    return Plan(signature, _candidate(entry["choice"], "choice"), table, _number(entry["created"], "created"))


def _row_from_json(i: int, row: Any) -> CandidateRow:
    where = f"table[{i}]"
    _keys(row, ("kinds", "nbytes", *_ROW_NUMBERS, "passed", "reason"), where)
    nbytes, passed, reason = row["nbytes"], row["passed"], row["reason"]
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise _Malformed(f"{where}.nbytes must be an integer >= 0, got {nbytes!r}")
    if not isinstance(passed, bool) or not (reason is None or isinstance(reason, str)):
        raise _Malformed(f"{where}: passed must be true/false and reason a string or null, got {passed!r}, "
                         f"{reason!r}")
    numbers = {name: _optional_number(row[name], f"{where}.{name}") for name in _ROW_NUMBERS}
    return CandidateRow(_candidate(row["kinds"], f"{where}.kinds"), nbytes, **numbers, passed=passed, reason=reason)


def _candidate(kinds: Any, where: str) -> Candidate:
    if not isinstance(kinds, dict) or not all(isinstance(k, str) for k in kinds.values()):
        raise _Malformed(f"{where} must map tensor names to kind names, got {kinds!r}")
    try:
        return Candidate(tuple(kinds.items()))
    except ValueError as e:
        raise _Malformed(f"{where}: {e}") from None


def _optional_number(x: Any, where: str) -> float | None:
    return None if x is None else _number(x, where)


def _number(x: Any, where: str) -> float:
    if isinstance(x, str) and x in _NON_FINITE:
        return _NON_FINITE[x]
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise _Malformed(f"{where} must be a number, got {x!r}")
    return float(x)


def _keys(obj: Any, expected: tuple[str, ...], where: str) -> None:
    if not isinstance(obj, dict):
        raise _Malformed(f"{where} must be an object, got {type(obj).__name__}")
    missing, unknown = [k for k in expected if k not in obj], sorted(set(obj) - set(expected))
    if missing or unknown:
        raise _Malformed(f"{where} must have the keys {', '.join(expected)}; missing: {missing or 'none'}, "
                         f"unknown: {unknown or 'none'}")
