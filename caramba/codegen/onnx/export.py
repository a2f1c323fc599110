"""The ONNX export's files (caramba.export_onnx / `caramba export-onnx`, orchestrated by caramba/export.py): a
directory with model.onnx (+ model.onnx.data), genai_config.json (where onnxruntime-genai can run the model:
genai.py) and caramba.json, written completely or not at all.

The directory is built under a temporary sibling name `.<name>.<pid>.<hex>.tmp`, flock-ed by its writer, every
file fsynced, checked (onnx.checker, full check), then renamed into place. An existing non-empty directory is
replaced only with overwrite=True, by an atomic swap (renameat2 RENAME_EXCHANGE / renamex_np RENAME_SWAP: readers
see the old export or the new one, never none) after which the old one is removed; where the file system cannot
swap, the old one is moved aside (`.<name>.<pid>.<hex>.old`) first. Each export first removes the temp
directories of writers that died (killed mid-write: nobody holds the lock and the pid is gone) and puts back a
dead writer's moved-aside export when the directory itself is missing. Concurrent exports to one directory all
succeed: with overwrite the last one's files stay; without it, a directory that another export filled meanwhile
is accepted when it holds the same files byte for byte (else FileExistsError).
"""
from __future__ import annotations

import errno
import filecmp
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import onnx
import torch

from caramba.codegen.backend import CachedProgram
from caramba.codegen.onnx.cache import LAYOUTS, ONNX_NAMES
from caramba.codegen.onnx.genai import genai_config, genai_unsupported
from caramba.codegen.onnx.model import OnnxModel, build_model, check, resolve_opset
from caramba.fsutil import (atomic_copy_file, dead_temp_siblings, exchange_paths, fsync_dir, locked_temp_dir,
                            temp_sibling)

log = logging.getLogger("caramba")
MODEL_FILE, DATA_FILE, GENAI_FILE, META_FILE = "model.onnx", "model.onnx.data", "genai_config.json", "caramba.json"
EXTERNAL_DATA_BYTES = 1 << 30  # weights past 1 GiB go to model.onnx.data (protobuf stops at 2 GiB)


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    files: tuple[str, ...]
    bytes: int
    seconds: float
    cache: str  # the cache kinds' label
    mode: str
    opset: int
    layout: str = "optimum"


def check_export(out_dir: str | os.PathLike, *, overwrite: bool, cache_mode: str, cache_layout: str | None,
                 ort_contrib: bool, opset: int | None, max_seq_len: int | None) -> tuple[str, str, int]:
    """(cache mode, cache layout, opset) of an export, with everything checked before anything is compiled."""
    _check_target(Path(out_dir), overwrite)
    cache_mode, cache_layout = export_mode(cache_mode, cache_layout, ort_contrib)
    opset = resolve_opset(cache_mode, opset)
    if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int)
                                    or max_seq_len < 2):
        raise ValueError(f"max_seq_len must be an integer >= 2, got {max_seq_len!r}")
    return cache_mode, cache_layout, opset


def write_export(program: CachedProgram, model: torch.nn.Module, out_dir: str | os.PathLike, *, cache_mode: str,
                 cache_layout: str, opset: int, external_data: bool | None = None,
                 dump_dir: str | os.PathLike | None = None, say: Callable[[str], None], start: float,
                 overwrite: bool = False, weights: str | None = None,
                 weight_matmul: str | None = None) -> ExportResult:
    """Build the ONNX model of a lowered program and publish the export directory (module doc). weights: the
    weight quantization's name (metadata caramba.weights); weight_matmul: how int4 weights multiply (qops.py)."""
    out, config = Path(out_dir), program.config
    om = build_model(program.prefill, program.layout, config.kind_map, max_seq_len=config.max_seq_len,
                     qblock=config.qblock, mode=cache_mode, opset=opset, cache_layout=cache_layout,
                     extra_metadata={"caramba.weights": weights} if weights else None, weight_matmul=weight_matmul)
    weight_bytes = sum(t.numel() * t.element_size() for t in program.prefill.weights.values())
    external = weight_bytes > EXTERNAL_DATA_BYTES if external_data is None else external_data
    say(f"writing {len(om.proto.graph.node)} ONNX nodes, {weight_bytes / 2**20:.1f} MiB of weights"
        f"{' as external data' if external else ''}")
    swept = sweep_dead_writers(out)
    if swept:
        say(f"cleaned up after {len(swept)} killed export{'s' if len(swept) > 1 else ''}: "
            f"{', '.join(p.name for p in swept)}")
    no_genai = genai_unsupported(om, model, program)
    if no_genai is not None:
        say(f"no {GENAI_FILE}: {no_genai}; examples/onnx_generate.py (onnxruntime + numpy) runs it")
    with locked_temp_dir(out) as tmp:
        files = _write(tmp, om, model, program, config, external, None if no_genai else genai_config)
        say("checking the model (onnx.checker, full check)")
        check(onnx.load(str(tmp / MODEL_FILE), load_external_data=False) if not external else str(tmp / MODEL_FILE))
        if dump_dir is not None:
            atomic_copy_file(tmp / MODEL_FILE, Path(dump_dir) / MODEL_FILE)
        _publish(tmp, out, overwrite)
    size = sum((out / f).stat().st_size for f in files)
    seconds = time.perf_counter() - start
    say(f"wrote {out} ({', '.join(files)}; {size / 2**20:.1f} MiB) in {seconds:.1f}s")
    return ExportResult(out, tuple(files), size, seconds, config.label, cache_mode, opset, cache_layout)


def export_mode(mode: str, layout: str | None, ort_contrib: bool) -> tuple[str, str]:
    """(cache mode, cache layout) of an export, checked before anything is compiled."""
    modes = ("concat", "scatter", "shadow")
    if mode not in modes + ("contrib",):
        raise ValueError(f"cache_mode must be one of {', '.join(modes)}, got {mode!r}")
    if ort_contrib:
        if mode not in ("concat", "contrib"):
            raise ValueError(f"ort_contrib=True writes the GroupQueryAttention model (its own in-place cache); it "
                             f"cannot be combined with cache_mode={mode!r}")
        mode = "contrib"
    if layout is None:
        layout = "optimum" if mode == "concat" else "caramba"
    if layout not in LAYOUTS:
        raise ValueError(f"cache_layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "optimum" and mode != "concat":
        raise ValueError(f"the optimum cache layout grows past -> present (cache_mode 'concat'); cache_mode "
                         f"{mode!r} needs cache_layout 'caramba'")
    return mode, layout


def _check_target(out: Path, overwrite: bool) -> None:
    if out.suffix == ".onnx":
        raise ValueError(f"the output is a directory (model.onnx, genai_config.json, ... go inside it); got {out}")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another directory or pass overwrite=True "
                              f"(--force)")
    for up in out.parents:  # the nearest existing ancestor must be a directory (not a file the path runs under)
        if up.exists():
            if not up.is_dir():
                raise ValueError(f"{out} lies under {up}, which is a file; choose a path whose parents are "
                                 f"directories")
            break
    if not out.parent.exists():
        raise FileNotFoundError(f"the parent directory of {out} does not exist")


def _write(tmp: Path, om: OnnxModel, model, program, config, external: bool, genai) -> list[str]:
    files = [MODEL_FILE]
    if external:
        onnx.save_model(om.proto, str(tmp / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
        files.append(DATA_FILE)
    else:
        onnx.save_model(om.proto, str(tmp / MODEL_FILE))
    if genai is not None:
        (tmp / GENAI_FILE).write_text(json.dumps(genai(om, model, program, MODEL_FILE), indent=2) + "\n")
        files.append(GENAI_FILE)
    meta = {"format": "caramba-onnx/1", "model": MODEL_FILE, "opset": om.opset, "ir_version": 10,
            **{k.removeprefix("caramba."): _maybe_json(v) for k, v in om.metadata.items()},
            "cache_names": {n: f"past_key_values.%d.{ONNX_NAMES[n]}" for n in program.layout.names},
            "inputs": [i.name for i in om.proto.graph.input], "outputs": [o.name for o in om.proto.graph.output]}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    files.append(META_FILE)
    for f in files:
        with open(tmp / f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(tmp)
    return files


def _maybe_json(v: str) -> Any:
    try:
        return json.loads(v)
    except ValueError:
        return v


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Put the directory tmp at out (module doc). A rename succeeds where out is missing or empty; a non-empty out
    is swapped with tmp (overwrite), or kept when it holds tmp's files (an export that finished meanwhile)."""
    aside: list[Path] = []
    try:
        _place(tmp, out, overwrite, aside)
    except BaseException:
        if aside and not out.exists():
            os.rename(aside.pop(), out)  # the export this call moved aside goes back
        raise
    fsync_dir(out.parent)
    for old in aside:
        shutil.rmtree(old, ignore_errors=True)


def _place(tmp: Path, out: Path, overwrite: bool, aside: list[Path]) -> None:
    for _ in range(100):  # each turn follows another writer's move; a hundred means something else is wrong
        try:
            os.rename(tmp, out)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if not overwrite:
            if _same_files(tmp, out):
                return  # locked_temp_dir removes ours
            raise FileExistsError(f"{out} was filled by another writer while this export ran, with other files; "
                                  f"choose another directory or pass overwrite=True (--force)")
        try:
            if exchange_paths(tmp, out):
                return  # tmp now holds the old export: locked_temp_dir removes it
        except FileNotFoundError:
            continue  # out went away meanwhile: rename again
        old = temp_sibling(out, ".old")
        try:
            os.rename(out, old)
        except FileNotFoundError:
            continue
        aside.append(old)
    raise RuntimeError(f"could not rename {tmp.name} to {out}: other writers kept replacing it")


def _same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def sweep_dead_writers(out: Path) -> list[Path]:
    """Remove the temp directories that killed exports of `out` left behind (module doc); where out is missing,
    a dead writer's moved-aside export goes back to it first. Returns what was removed or put back."""
    done = []
    for old in dead_temp_siblings(out, ".old"):
        try:
            os.rename(old, out)  # only where out is missing or empty
        except OSError:
            shutil.rmtree(old, ignore_errors=True)
        done.append(old)
    for tmp in dead_temp_siblings(out, ".tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
        done.append(tmp)
    return done


def stderr_progress(line: str) -> None:
    print(f"[caramba] export: {line}", file=sys.stderr, flush=True)
