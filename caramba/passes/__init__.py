"""Graph passes: one per file, named for what they do; the pipeline order lives in pipeline.py."""
from caramba.passes.base import PassContext, PassFn
from caramba.passes.manager import Pass, PassError, PassManager, PassRecord, PipelineResult
from caramba.passes.pipeline import pipeline_for

__all__ = ["Pass", "PassContext", "PassError", "PassFn", "PassManager", "PassRecord", "PipelineResult",
           "pipeline_for"]
