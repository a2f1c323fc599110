"""Train the small byte-level DBA model that quality figures and tests use (a few minutes on one GPU).

Data is text every machine has: the Python standard library's source (`*.py` under sysconfig's stdlib path).
Files are split by a hash of their relative path (1 in 20 held out), so the split is stable across machines;
the held-out NLL is reported per byte (nats).

    python examples/train_tiny.py --out examples/tiny-dba --minutes 4          # on the GPU device
    python examples/train_tiny.py --out /tmp/t --steps 20 --device cpu          # smoke test
"""
from __future__ import annotations

import argparse
import math
import sysconfig
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

from caramba.models import ModelConfig, Transformer, count_parameters, save

CONFIG = ModelConfig(vocab_size=256, d_model=192, n_layers=4, n_heads=6, attention="decoupled", sem_dim=96,
                     geo_dim=192, v_dim=192, d_ff=512, tie_embeddings=True, max_seq_len=256)


def stdlib_split(root: Path | None = None, holdout: int = 20) -> tuple[bytes, bytes]:
    """(train, held-out) bytes of the standard library's Python source, split by file."""
    root = root or Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        rel = path.relative_to(root).as_posix()
        data = path.read_bytes()
        (held if zlib.crc32(rel.encode()) % holdout == 0 else train).append(data)
    return b"\n".join(train), b"\n".join(held)


def batches(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    while True:
        idx = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
        chunk = torch.stack([data[i:i + seq + 1] for i in idx.tolist()]).long()
        yield chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def evaluate(model: Transformer, data: torch.Tensor, seq: int, n_batches: int, device: str) -> float:
    """Mean NLL per byte (nats) over fixed, non-overlapping windows of the held-out text."""
    model.eval()
    starts = torch.linspace(0, data.numel() - seq - 2, n_batches * 16).long().tolist()
    total, count = 0.0, 0
    for i in range(0, len(starts), 16):
        chunk = torch.stack([data[s:s + seq + 1] for s in starts[i:i + 16]]).long().to(device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(chunk[:, :-1])
        total += F.cross_entropy(logits.float().reshape(-1, 256), chunk[:, 1:].reshape(-1), reduction="sum").item()
        count += chunk[:, 1:].numel()
    model.train()
    return total / count


def lr_at(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--minutes", type=float, default=4.0, help="stop early after this much training time")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    torch.manual_seed(0)
    train_bytes, held_bytes = stdlib_split()
    train = torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8)
    held = torch.frombuffer(bytearray(held_bytes), dtype=torch.uint8)
    model = Transformer(CONFIG).to(args.device).train()
    print(f"data: {train.numel() / 1e6:.1f} MB train, {held.numel() / 1e6:.2f} MB held out; "
          f"model: {count_parameters(model) / 1e6:.2f}M parameters on {args.device}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=args.device == "cuda")
    stream = batches(train, args.batch, args.seq, torch.Generator().manual_seed(0))
    start = time.perf_counter()
    print(f"{'step':>6} {'train nll':>10} {'held-out nll':>13} {'min':>6}")
    step = 0
    for step in range(args.steps):
        x, y = (t.to(args.device, non_blocking=True) for t in next(stream))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        with torch.autocast(device_type=args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            loss = F.cross_entropy(model(x).float().reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        elapsed = (time.perf_counter() - start) / 60
        if step % 500 == 0 or elapsed > args.minutes:
            print(f"{step:>6} {loss.item():>10.4f} {evaluate(model, held, args.seq, 8, args.device):>13.4f} {elapsed:>6.2f}",
                  flush=True)
        if elapsed > args.minutes:
            break
    final = evaluate(model, held, args.seq, 64, args.device)
    print(f"final: step {step}, held-out NLL {final:.4f} nats/byte ({final / math.log(2):.3f} bits/byte)")
    save(model.cpu().half(), args.out)  # fp16 weights: a few MB in git; load(dtype=torch.float32) for references
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
