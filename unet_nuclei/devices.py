"""Devices, precision and distribution: which strategy trains the model, and in which dtype.

On the TensorFlow backend, several GPUs (or logical CPU devices) of one machine train data-parallel with
``MirroredStrategy``; several machines (``TF_CONFIG``) with ``MultiWorkerMirroredStrategy``, through the
training loop of ``unet_nuclei.multiworker`` (Keras 3's ``model.fit`` fails there: keras-team/keras#20585).
On the JAX and PyTorch backends a run trains on one device (the first GPU, else the CPU), and TensorFlow
is never imported.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import keras

from unet_model_core import ONEDNN_CHOICE
from unet_nuclei.multiworker import cluster_spec

ONEDNN_CHOOSERS = {
    "user": "set by TF_ENABLE_ONEDNN_OPTS",
    "project": "turned on by this project",
    "tensorflow": "TensorFlow's default on this processor",
}


def on_tensorflow() -> bool:
    """Whether Keras runs on TensorFlow (``KERAS_BACKEND``), the one backend with distribution strategies."""
    return keras.backend.backend() == "tensorflow"


class OneDevice:
    """The strategy of a run on the JAX or PyTorch backend: one device, and the two things training asks
    of a ``tf.distribute.Strategy``."""

    num_replicas_in_sync = 1

    def scope(self):
        return contextlib.nullcontext()


def configure_devices(cpu_devices: int = 0) -> None:
    """Split the CPU into ``cpu_devices`` logical devices (to exercise multi-device code without GPUs).

    Must run before TensorFlow creates its devices, i.e. before any op runs in the process.  TensorFlow
    only: elsewhere ``cpu_devices`` > 1 is a ValueError, as is ``TF_CONFIG``."""
    if not on_tensorflow():
        what = "--cpu-devices" if cpu_devices > 1 else "TF_CONFIG (several machines)" if cluster_spec() else None
        if what:
            raise ValueError(
                f"{what} needs TensorFlow's distribution strategies, and Keras runs on "
                f"{keras.backend.backend()!r}: run with KERAS_BACKEND=tensorflow"
            )
        return
    if cpu_devices > 1:
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices)


def get_strategy(cpu_devices: int = 0):
    """TensorFlow's own engine for scaling out.

    * ``TF_CONFIG`` set (several machines): MultiWorkerMirroredStrategy over the workers it lists;
    * several GPUs on this machine: MirroredStrategy over all of them;
    * ``cpu_devices`` > 1 logical CPUs (tests, demos): MirroredStrategy over those;
    * otherwise the default (single-device) strategy.

    On the other backends, ``OneDevice``.
    """
    if not on_tensorflow():
        return OneDevice()
    import tensorflow as tf

    if cluster_spec() is not None:  # a malformed TF_CONFIG is a ValueError that names it
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    cpus = tf.config.list_logical_devices("CPU")
    if cpu_devices > 1 and len(cpus) > 1:
        return tf.distribute.MirroredStrategy(devices=[d.name for d in cpus[:cpu_devices]])
    return tf.distribute.get_strategy()


def is_multi_worker(strategy) -> bool:
    """Whether ``strategy`` trains across several machines (the loop of ``unet_nuclei.multiworker``)."""
    if not on_tensorflow():
        return False
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def gpu_count() -> int:
    """How many GPUs the backend sees (0 on a CPU-only machine)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return len(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        return sum(device.platform == "gpu" for device in jax.devices())
    if backend == "torch":
        import torch

        return torch.cuda.device_count()
    return 0


def gpu_capability() -> tuple[int, int]:
    """The first GPU's compute capability, (0, 0) where the backend does not say."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpu = tf.config.list_physical_devices("GPU")[0]
        return tuple(tf.config.experimental.get_device_details(gpu).get("compute_capability") or (0, 0))
    if backend == "torch":
        import torch

        return tuple(torch.cuda.get_device_capability(0))
    if backend == "jax":
        import jax

        gpu = next(device for device in jax.devices() if device.platform == "gpu")
        return tuple(int(part) for part in str(getattr(gpu, "compute_capability", "0.0")).split(".")[:2])
    return (0, 0)


def cpu_has_bfloat16(cpuinfo="/proc/cpuinfo") -> bool:
    """Whether the CPU has bfloat16 instructions (AVX512_BF16 or AMX), from Linux's /proc/cpuinfo;
    False where that cannot be read (other systems), which keeps float32 there."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def mixed_precision_is_fast() -> bool:
    """Whether mixed precision beats float32 on this machine: a GPU with float16 tensor cores (compute
    capability 7.0 or newer), or a CPU with bfloat16 instructions.  On this project's 2-core AVX-512 BF16
    CPU, bfloat16 halved the default training step (benchmarks/bench_step.py)."""
    if gpu_count():
        return gpu_capability() >= (7, 0)
    # Only TensorFlow's oneDNN kernels were measured to be faster in bfloat16 on such CPUs.
    return on_tensorflow() and cpu_has_bfloat16()


def set_precision(mixed: bool | None) -> str:
    """Set Keras' global dtype policy and return its name: float16 compute on GPUs, bfloat16 on CPUs
    (which lack fast float16), float32 when ``mixed`` is off; ``None`` chooses mixed precision where the
    hardware is fast at it (``mixed_precision_is_fast``).  The U-Net's output layer stays float32."""
    if mixed is None:
        mixed = mixed_precision_is_fast()
    policy = "float32"
    if mixed:
        policy = "mixed_float16" if gpu_count() else "mixed_bfloat16"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def onednn_enabled() -> bool | None:
    """Whether TensorFlow runs its oneDNN CPU kernels in this process (None where this TensorFlow does
    not say, or runs on another backend: the answer comes from a private module, as no public API has it)."""
    if not on_tensorflow():
        return None
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:
        return None
    return bool(_pywrap_util_port.IsMklEnabled())


def cpu_kernels() -> dict:
    """The Keras backend, and which CPU kernels TensorFlow runs and who chose them, for config.json and
    the run's first lines."""
    return {"backend": keras.backend.backend(), "onednn": onednn_enabled(), "chosen_by": ONEDNN_CHOICE}


def describe_cpu_kernels(kernels: dict) -> str:
    """One line for users: the kernels, who chose them, and how to choose otherwise."""
    backend = kernels.get("backend", "tensorflow")
    if backend != "tensorflow":
        return f"Keras backend {backend} (KERAS_BACKEND): TensorFlow is not used"
    if kernels["onednn"] is None:
        return "oneDNN CPU kernels: this TensorFlow does not say whether they run"
    state = "on" if kernels["onednn"] else "off"
    how = "TF_ENABLE_ONEDNN_OPTS=0 turns them off" if kernels["onednn"] else "TF_ENABLE_ONEDNN_OPTS=1 turns them on"
    return f"oneDNN CPU kernels {state} ({ONEDNN_CHOOSERS[kernels['chosen_by']]}; {how})"
