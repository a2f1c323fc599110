"""Pass debugging: dumps (IR, diffs, DOT, summaries), numerics checks and the bisect, the options behind them."""
from caramba.debug.bisect_numerics import BisectResult, bisect
from caramba.debug.dump import DumpWriter
from caramba.debug.session import DebugOptions, run_pipeline

__all__ = ["BisectResult", "DebugOptions", "DumpWriter", "bisect", "run_pipeline"]
