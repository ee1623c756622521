"""prunevid-bench: measure what PruneVid's token reduction buys and costs on Qwen2.5-VL."""

from prunevid_bench.errors import PruneVidError

__version__ = "0.1.0"
__all__ = ["PruneVidError", "load_pipeline", "Pipeline", "RunResult", "RunConfig", "build_config", "register_method", "Method"]


def __getattr__(name):
    # Heavy imports (torch, transformers) only when used, so `prunevid --help` stays instant.
    if name in ("load_pipeline", "Pipeline"):
        from prunevid_bench import pipeline

        return getattr(pipeline, name)
    if name == "RunResult":
        from prunevid_bench.report import RunResult

        return RunResult
    if name in ("register_method", "Method"):
        from prunevid_bench import methods

        return getattr(methods, name)
    if name in ("RunConfig", "build_config"):
        from prunevid_bench import config

        return getattr(config, name)
    raise AttributeError(name)
