"""Generate from a `caramba export-onnx` directory with onnxruntime and numpy only (no torch, no caramba).

    caramba export-onnx --model examples/tiny-dba -o /tmp/tiny-onnx --cache-kind q8_0
    python examples/onnx_generate.py /tmp/tiny-onnx --prompt 'def read_config(path):' --max-new-tokens 64

The model takes input_ids and position_ids (batch, seq), attention_mask (batch, past + seq) when it has one (the
default "optimum" layout), and every cache tensor past_key_values.* (and past_attention.* for the in-place
"shadow"/"contrib" modes; each listed with its dtype and shape in the session's inputs) and returns logits and
present.*. Quantized caches are quantized and dequantized inside the model: this loop only hands each present
back as the next past. caramba.json says whether the cache grows (mode "concat": the past starts with a sequence
length of 0) or is a set of preallocated buffers updated in place (the other modes: sequence dims of
max_seq_len, each bound to the same memory for input and output).
Text is UTF-8 bytes (the byte-level models, vocab 256); --ids feeds token ids instead and prints ids.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8,
         "tensor(uint8)": np.uint8, "tensor(int64)": np.int64}


class OnnxDecoder:
    """One exported model and its cache for one row: `step(ids)` feeds tokens and returns the last logits."""

    def __init__(self, directory: Path, threads: int = 0) -> None:
        meta = json.loads((directory / "caramba.json").read_text())
        self.mode, self.max_seq_len = meta["cache"]["mode"], meta["cache"]["max_seq_len"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # int8 weights (--weights int8) are DequantizeLinear + MatMul: ONNX Runtime fuses the pair into MatMulNBits and,
        # by default, quantizes the activations to int8 for it (about 0.5% error); 0 keeps the product exact
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        self.session = ort.InferenceSession(str(directory / meta["model"]), options,
                                            providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        self.cache = {i.name: i for i in inputs if i.name.startswith(("past_key_values.", "past_attention."))}
        self.has_mask = any(i.name == "attention_mask" for i in inputs)
        self.length = 0
        self.past = {name: self._empty(i) for name, i in self.cache.items()}

    def _empty(self, info) -> np.ndarray:
        """batch 1; a symbolic sequence dim is 0 for a growing cache and max_seq_len for an in-place buffer."""
        length = 0 if self.mode == "concat" else self.max_seq_len
        shape = [d if isinstance(d, int) else 1 if d == "batch_size" else length for d in info.shape]
        return np.zeros(shape, NUMPY[info.type])

    def step(self, ids: list[int]) -> np.ndarray:
        if self.length + len(ids) > self.max_seq_len:
            raise SystemExit(f"the cache holds {self.max_seq_len} tokens; {self.length + len(ids)} do not fit")
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", np.array([ids], np.int64))
        io.bind_cpu_input("position_ids", np.arange(self.length, self.length + len(ids), dtype=np.int64)[None])
        if self.has_mask:  # one row, no padding: every key visible
            io.bind_cpu_input("attention_mask", np.ones((1, self.length + len(ids)), np.int64))
        io.bind_output("logits")
        for name, buf in self.past.items():
            present = _present(name)
            if self.mode != "concat":
                value = ort.OrtValue.ortvalue_from_numpy(buf)
                io.bind_ortvalue_input(name, value)
                io.bind_ortvalue_output(present, value)  # one buffer: the model writes the new tokens in place
            else:
                io.bind_cpu_input(name, buf)
                io.bind_output(present)
        self.session.run_with_iobinding(io)
        outputs = dict(zip([o.name for o in self.session.get_outputs()], io.get_outputs()))
        if self.mode == "concat":
            self.past = {name: outputs[_present(name)].numpy() for name in self.past}
        self.length += len(ids)
        return outputs["logits"].numpy()[0, -1]


def _present(past: str) -> str:
    """past_key_values.0.key -> present.0.key; past_attention.0.key -> present_attention.0.key"""
    return past.replace("past_key_values.", "present.", 1).replace("past_attention.", "present_attention.", 1)


def generate(decoder: OnnxDecoder, prompt: list[int], max_new_tokens: int, eos: set[int]):
    """Greedy decoding: yields each new token as soon as it is chosen."""
    logits = decoder.step(prompt)
    for i in range(max_new_tokens):
        token = int(np.argmax(logits))
        yield token
        if token in eos or i == max_new_tokens - 1:
            return
        logits = decoder.step([token])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path, help="a directory written by `caramba export-onnx`")
    ap.add_argument("--prompt", help="text to continue (UTF-8 bytes as token ids)")
    ap.add_argument("--ids", help="comma-separated token ids to continue (prints ids)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--eos-id", type=int, action="append", default=[])
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: one per core)")
    args = ap.parse_args(argv)
    if (args.prompt is None) == (args.ids is None):
        ap.error("give exactly one of --prompt and --ids")
    if not (args.model_dir / "caramba.json").is_file():
        ap.error(f"{args.model_dir} has no caramba.json: not a `caramba export-onnx` directory")
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be at least 1")
    prompt = list(args.prompt.encode()) if args.prompt is not None else [int(t) for t in args.ids.split(",")]
    if not prompt:
        ap.error("the prompt is empty")
    decoder = OnnxDecoder(args.model_dir, args.threads)
    tokens = generate(decoder, prompt, args.max_new_tokens, set(args.eos_id))
    if args.ids is not None:
        print(",".join(str(t) for t in tokens))
        return 0
    pending = b""
    for t in tokens:  # hold back an incomplete UTF-8 character until its last byte arrives
        pending += bytes([t]) if t < 256 else b""
        try:
            sys.stdout.write(pending.decode())
            pending = b""
        except UnicodeDecodeError as e:
            if e.reason != "unexpected end of data":
                sys.stdout.write(pending.decode(errors="replace"))
                pending = b""
        sys.stdout.flush()
    print(pending.decode(errors="replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
