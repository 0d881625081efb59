"""dcube: diffusion-model hyper-features for robust medical image classification.

    import dcube
    run = dcube.fit("config.yaml")            # or a dict of sections; as `dcube run`
    run = dcube.load_run("runs/demo")         # a finished run
    run.predict_proba(images)                 # (N, n_classes), calibrated; run.classes_
    dcube.read_metrics("runs/demo")["test"]   # metrics with 95 % CIs

See docs/api.md.
"""

__version__ = "0.1.0"

__all__ = ["TrainedRun", "compare_runs", "fit", "load_run", "read_metrics", "__version__"]


def __getattr__(name):  # the API without importing torch at `import dcube` (the CLI's start-up stays fast)
    if name in ("TrainedRun", "compare_runs", "fit", "load_run", "read_metrics"):
        from dcube import api

        return getattr(api, name)
    raise AttributeError(f"module 'dcube' has no attribute {name!r}")
