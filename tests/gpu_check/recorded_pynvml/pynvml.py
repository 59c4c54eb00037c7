"""Stand-in for pynvml in a subprocess the check starts (labqd) when it runs against a recording.

gpu_check.py puts this folder first on PYTHONPATH only with --recording: the real pynvml module is loaded
(its constants and NVMLError), then its calls are replaced by RecordedNvml's answers from
$LABKIT_GPU_CHECK_RECORDING (with the live holder pid from $LABKIT_GPU_CHECK_HOLDER_PID).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
_spec = importlib.machinery.PathFinder.find_spec(
    "pynvml", [p for p in sys.path if Path(p or ".").resolve() != _here]
)
if _spec is None or _spec.loader is None:
    raise ImportError("the real pynvml (nvidia-ml-py) is not installed")
_real = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_real)
_self = sys.modules[__name__]
sys.modules[__name__] = _real  # recorded_nvml imports the real module
try:
    sys.path.insert(0, str(_here.parent))
    import os

    from recorded_nvml import RECORDING_ENV, RecordedNvml, holder_pid_from_env

    _fake = RecordedNvml(Path(os.environ[RECORDING_ENV]), holder_pid_from_env())
finally:
    sys.modules[__name__] = _self

globals().update({k: v for k, v in vars(_real).items() if not k.startswith("__")})
for _name in dir(_real):
    if _name.startswith("nvml") and callable(getattr(_real, _name)):
        try:
            globals()[_name] = getattr(_fake, _name)
        except AttributeError:
            del globals()[_name]  # a call the recording cannot answer: absent, not the real library's
