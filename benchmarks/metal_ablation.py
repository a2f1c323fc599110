"""CPU ablation of the Metal kernels: plant one bug at a time in a worktree's copy of the MSL templates, run the
metal tests, print how many failed and which tests caught it (issue 17's five bugs: an off-by-one tail, a missing
barrier, a wrong q4_0 scale offset, a wrong GQA head map, a ring index off by one). Run it on a throwaway worktree,
never on your checkout (it rewrites files and restores them after each bug):

    git worktree add /tmp/abl HEAD && python benchmarks/metal_ablation.py /tmp/abl
"""
import os
import re
import subprocess
import sys
from pathlib import Path
root = Path(sys.argv[1])
A = "caramba/codegen/metal/attention_msl.py"
BUGS = [
 ("off-by-one tail: the last key of each partition's span dropped", A,
  "    const long hi = lo + chunk < n ? lo + chunk : n;", "    const long hi = lo + chunk < n ? lo + chunk : n - 1;"),
 ("missing barrier: the simdgroups' partial sums read before all are written", A,
  "            if (f < $DV) red_acc[sg][f] = acc[g][i];\n        }\n"
  "        threadgroup_barrier(mem_flags::mem_threadgroup);\n",
  "            if (f < $DV) red_acc[sg][f] = acc[g][i];\n        }\n"),
 ("wrong scale offset in q4_0: the block index taken from the packed byte, not the feature", A,
  '''    if t.kind == "q4_0":
        return f"(float({nibble}) - 8.0f) * {scale}"''',
  '''    if t.kind == "q4_0":
        return f"(float({nibble}) - 8.0f) * float(s{i}[{srow} + ({feature}) / 2 / {t.qblock}])"'''),
 ("wrong GQA head map: query head g of kv head k read as head g * H_kv + k", A,
  'f"        const ulong at = ((ulong(b) * {spec.heads} + kvh * {g} + g) * n_q + s) * {t.dim};"',
  'f"        const ulong at = ((ulong(b) * {spec.heads} + g * {spec.kv_heads} + kvh) * n_q + s) * {t.dim};"'),
 ("ring index: key j read from slot (j + 1) % C", A,
  'f"float(r{i}[b * st[{6 * i + 4}] + (j % {spec.capacity}) * st[{6 * i + 5}] + {feature}])"',
  'f"float(r{i}[b * st[{6 * i + 4}] + ((j + 1) % {spec.capacity}) * st[{6 * i + 5}] + {feature}])"'),
]
TESTS = ["tests/codegen/test_metal_attention.py", "tests/codegen/test_metal_target.py",
         "tests/codegen/test_metal_kv_append.py"]
env = dict(os.environ)
for name, path, old, new in BUGS:
    f = root / path
    text = f.read_text()
    assert text.count(old) == 1, (name, text.count(old))
    f.write_text(text.replace(old, new))
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider", *TESTS],
                           cwd=root, capture_output=True, text=True, env=env)
        failed = sorted(set(re.findall(r"^FAILED (\S+)", r.stdout, re.M)))
        summary = r.stdout.strip().splitlines()[-1]
        print(f"## {name}\n   {summary}")
        for t in failed:
            print("   caught by", t)
        sys.stdout.flush()
    finally:
        f.write_text(text)
