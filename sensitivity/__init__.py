"""moeplan's sensitivity stage: model adapters, calibration data, the profiler and
evaluation, installed as `moeplan.sensitivity`; `factory/` makes the reference models and the
generated checkpoints they are tested on."""

if __name__ != "moeplan.sensitivity":  # the folder found by its bare name from a checkout's root
    raise ModuleNotFoundError(f"No module named {__name__!r} (moeplan's sensitivity/ folder is imported as "
                              f"moeplan.sensitivity)", name=__name__)
