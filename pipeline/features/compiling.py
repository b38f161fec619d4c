"""Whether ``torch.compile`` pays for an extraction, decided by measurement.

``compute.compile: auto`` extracts the first batches eagerly (a probe: real work), times the
forward passes of all but the first two (the fastest counts), and compiles for the rest only
when the time the compiled graph would save on the images left exceeds what compiling costs
(the probe's images are then computed again by the compiled graph: see CompilePolicy).
What compiling costs and how much faster the compiled graph runs come from this machine's
record: every extraction notes its eager and compiled forward time per image and every
compile its seconds (the first in an inductor cache "cold", later ones "warm": inductor
reuses the cached kernels). Inductor builds its C++ kernels once more in every Python
environment (their key holds the compiler's command line, whose include paths name the venv),
so the record notes which environments have compiled, and the first compile in another one
apart from the warm ones. The record lives inside inductor's own cache folder, so a wiped
cache forgets its compile costs too. Where nothing is measured yet, the priors below
(measured on 2-core CPUs, docs/figures.md) stand in.

``always`` compiles before the first batch, ``never`` never does; all three update the record.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.model.devices import device_name
from pipeline.model.inference import extract_features
from pipeline.model.presets import normalize_batch

log = logging.getLogger(__name__)

PROBE_WARMUP = 2  # untimed eager batches first: the first ones run slower (kernel set-up)
PROBE_BATCHES = 4  # timed eager batches before deciding; the fastest counts (a busy machine
# only adds time)
# Where this machine has measured nothing yet (docs/figures.md, "Speed on a CPU"):
PRIOR_RATIO = 0.8  # compiled / eager forward time: 97-102 vs 78-83 img/s fp32, ~0.72 bf16
PRIOR_COLD_SECONDS = {"cpu": 15.0, "cuda": 60.0}  # first compile: 11-17 s, 13.9 s on CPUs;
# on a GPU not measured yet (scripts/gpu_check.sh), so a cautious guess
PRIOR_WARM_FRACTION = 0.3  # a warm compile / a cold one: 3-5 of 11-17 s, 3.3-4.0 of 13.9 s
RECORD_NAME = "food101-pipeline-compile.json"
ENVIRONMENTS_KEPT = 32  # the Python environments a record remembers (the latest ones)


def machine_key(device: torch.device, precision: str, image_size: int, batch_size: int) -> str:
    """What the measurements depend on: the processor (and threads) or GPU, torch, the
    precision and the (static) input shape."""
    where = device_name(device)
    if device.type == "cpu":
        where += f" x{torch.get_num_threads()} threads"
    return f"{where} | torch {torch.__version__} | {precision} | {batch_size}x{image_size}px"


def record_path() -> Path:
    """The record, inside inductor's cache folder (``TORCHINDUCTOR_CACHE_DIR`` or its
    default), so that it is forgotten with the compiled kernels whose cost it notes;
    ``FOOD101_COMPILE_RECORD`` names another file (the tests keep theirs apart)."""
    if os.environ.get("FOOD101_COMPILE_RECORD"):
        return Path(os.environ["FOOD101_COMPILE_RECORD"])
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / RECORD_NAME


@dataclass
class Measured:
    """One key's measurements (seconds); None where not measured yet."""

    eager_per_image: float | None = None
    compiled_per_image: float | None = None
    cold_compile: float | None = None
    warm_compile: float | None = None
    compiles: int = 0
    # compiled / eager, both timed in one extraction (an auto one that compiled after its
    # probe): the same load on the machine, unlike the two per-image figures from different runs
    ratio: float | None = None
    # the Python environments (sys.prefix) that have compiled, and the last first compile in
    # one of them after the cache was no longer cold: inductor builds its C++ kernels again
    # per environment (8-10 s against a warm 3-4 s on 2 cores), so that compile is not warm.
    # A record from before these were kept has no environments: its compiles count as warm.
    environments: list[str] = field(default_factory=list)
    new_environment_compile: float | None = None

    def compiled_here(self, environment: str) -> bool:
        """Whether ``environment`` has compiled (any, for a record that does not know)."""
        return not self.environments or environment in self.environments

    def note_compile(self, seconds: float, environment: str) -> None:
        """A compile of ``seconds`` in ``environment``: cold (the cache's first), warm (in an
        environment that had compiled), or the first in a new environment."""
        if self.compiles == 0:
            self.cold_compile = seconds
        elif self.compiled_here(environment):
            self.warm_compile = seconds
        else:
            self.new_environment_compile = seconds
        self.environments = [e for e in self.environments if e != environment][
            -(ENVIRONMENTS_KEPT - 1):] + [environment]
        self.compiles += 1


def python_environment() -> str:
    """The Python environment this process runs in (a venv's folder)."""
    return sys.prefix


def load_record(path: Path, key: str) -> Measured:
    try:
        entry = json.loads(path.read_text()).get(key, {})
        return Measured(**{k: v for k, v in entry.items() if k in Measured.__dataclass_fields__})
    except (OSError, ValueError, TypeError, AttributeError):
        return Measured()  # none yet, or unreadable: the priors stand in


def save_record(path: Path, key: str, measured: Measured) -> None:
    """Merge ``measured`` into the record (atomically); a folder that cannot be written
    only costs the next run its measurements."""
    try:
        try:
            record = json.loads(path.read_text())
            record = record if isinstance(record, dict) else {}
        except (OSError, ValueError):
            record = {}
        record[key] = asdict(measured)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("could not write the compile record %s: %s", path, exc)


@dataclass(frozen=True)
class Decision:
    compile: bool
    saving: float  # seconds the compiled graph would save on the images left
    cost: float  # seconds compiling would take
    why: str


def decide(images_left: int, eager_per_image: float, measured: Measured,
           device_type: str, env: str | None = None) -> Decision:
    """Compile when the expected saving on ``images_left`` exceeds the expected cost.

    ``env``: the Python environment that would compile (default: this one); one that has not
    compiled yet costs what such a first compile cost, where that was measured."""
    env = env or python_environment()
    if measured.ratio:
        ratio, ratio_from = measured.ratio, "measured"
    elif measured.eager_per_image and measured.compiled_per_image:
        ratio = measured.compiled_per_image / measured.eager_per_image
        ratio_from = "measured apart"
    else:
        ratio, ratio_from = PRIOR_RATIO, "prior"
    prior_cold = PRIOR_COLD_SECONDS.get(device_type, 60.0)
    if measured.compiles == 0:  # nothing compiled in this cache yet (so nothing measured)
        cost, cost_from = prior_cold, "cold, prior"
    elif not measured.compiled_here(env) and measured.new_environment_compile:
        cost, cost_from = measured.new_environment_compile, "measured"
    elif measured.warm_compile:  # in a new environment too, until such a compile is timed
        cost, cost_from = measured.warm_compile, "warm, measured"
    else:  # compiled once, cold: a warm compile is a fraction of that
        cost = (measured.cold_compile or prior_cold) * PRIOR_WARM_FRACTION
        cost_from = "warm, prior"
    if measured.compiles and not measured.compiled_here(env):
        cost_from += "; the first in this Python environment"
    saving = images_left * eager_per_image * max(0.0, 1.0 - ratio)
    why = (f"compiling would save ~{saving:.1f} s on {images_left} images (eager "
           f"{eager_per_image * 1e3:.2f} ms an image, compiled x{ratio:.2f} {ratio_from}) "
           f"and cost ~{cost:.1f} s ({cost_from})")
    return Decision(saving > cost, saving, cost, why)


def compiled_backbone(fused: nn.Module, batch_size: int, image_size: int,
                      precision: str, device: torch.device | str = "cpu") -> nn.Module | None:
    """``fused`` compiled by torch.compile (inductor, frozen weights, static shapes) and run
    once on a dummy batch; None, with a warning, where compiling fails (no C++ compiler...).

    Only the execution changes: the compiled graph computes the same features as the eager
    one (a test compares them), so the cache key does not depend on it.
    """
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # weights become constants: prepacked for oneDNN
    # A CUDA build of torch on a CPU-only machine warns "No CUDA runtime is found" when
    # inductor sets up its C++ toolchain; it compiles for the CPU either way.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    try:
        model = torch.compile(fused, dynamic=False)
        dummy = normalize_batch(np.zeros((batch_size, image_size, image_size, 3), np.uint8),
                                device)
        extract_features(model, dummy, precision)
    except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back, keep going
        first_line = (str(exc).splitlines() or [""])[0]
        log.warning("torch.compile failed (%s: %s); extracting without it (set "
                    "compute.compile=never to skip trying)", type(exc).__name__, first_line)
        return None
    log.info("backbone compiled for extraction in %.1f s", time.perf_counter() - t0)
    return model


@dataclass
class CompilePolicy:
    """The model one extraction runs, batch by batch: eager, then compiled when (and if)
    ``policy`` says so; it times the forward passes and updates the machine's record.

    In bf16 the compiled graph's features differ from the eager ones in the last bits, and a
    head trained for one epoch can amplify that, so one extraction never mixes the two: when
    it compiles after the probe, the probe's batches are computed again by the compiled
    graph (:attr:`redone`, ~0.2 s), and the caller replaces their eager features.
    """

    fused: nn.Module
    images: int
    policy: str  # auto | always | never
    device: torch.device
    precision: str
    image_size: int
    batch_size: int
    note: bool = True  # update the machine's record (of several processes, only the first)
    model: nn.Module = field(init=False)
    compiled: bool = field(default=False, init=False)
    compile_seconds: float = field(default=0.0, init=False)
    compile_seconds_in_loop: float = field(default=0.0, init=False)  # after the probe
    decision: str = field(default="", init=False)
    _key: str = field(default="", init=False)
    _measured: Measured = field(default_factory=Measured, init=False)
    _batches: int = field(default=0, init=False)
    _done: int = field(default=0, init=False)
    _eager: list[float] = field(default_factory=list, init=False)  # s/image, full batches
    _fast: list[float] = field(default_factory=list, init=False)
    _undecided: bool = field(default=False, init=False)
    _probe: list[tuple[torch.Tensor, int]] = field(default_factory=list, init=False)
    redone: list[np.ndarray] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.model = self.fused
        self._key = machine_key(self.device, self.precision, self.image_size, self.batch_size)
        self._measured = load_record(record_path(), self._key)
        if self.policy == "always":
            self.decision = "compute.compile=always"
            self._compile()
        elif self.policy == "never":
            self.decision = "compute.compile=never"
        elif self.images <= (PROBE_WARMUP + PROBE_BATCHES) * self.batch_size:
            self.decision = f"eager: {self.images} images are no more than the probe"
        else:
            self._undecided = True

    @property
    def deciding(self) -> bool:
        """Still probing: the features returned so far may yet be :attr:`redone`."""
        return self._undecided

    def _features(self, x: torch.Tensor, n: int) -> np.ndarray:
        if self.compiled and len(x) < self.batch_size:  # the compiled graph's static batch
            x = torch.cat([x, x.new_zeros((self.batch_size - len(x), *x.shape[1:]))])
        return extract_features(self.model, x, self.precision)[:n].cpu().numpy()

    def forward(self, x: torch.Tensor, n: int) -> tuple[np.ndarray, float]:
        """Features of the ``n`` real images of batch ``x`` and the seconds of the forward
        pass. The batch that ends the probe may set :attr:`redone`: the features of every
        batch so far, this one included, from the compiled graph."""
        if self._undecided:
            self._probe.append((x, n))
        t0 = time.perf_counter()
        feats = self._features(x, n)
        seconds = time.perf_counter() - t0  # .cpu() waits for the device
        self._batches += 1
        self._done += n
        if n == self.batch_size:
            if self.compiled:
                self._fast.append(seconds / n)
            elif self._batches > PROBE_WARMUP:
                self._eager.append(seconds / n)
        if self._undecided and len(self._eager) >= PROBE_BATCHES:
            self._undecided = False
            d = decide(self.images - self._done, min(self._eager),
                       self._measured, self.device.type)
            self.decision = ("compiled: " if d.compile else "eager: ") + d.why
            log.info("torch.compile: %s", self.decision)
            if d.compile:
                t0 = time.perf_counter()
                self._compile()
                if self.compiled:
                    t1 = time.perf_counter()
                    self.redone = [self._features(px, pn) for px, pn in self._probe]
                    log.info("the probe's %d images computed again by the compiled graph "
                             "(%.1f s): one graph computes every feature of this extraction",
                             sum(pn for _, pn in self._probe), time.perf_counter() - t1)
                self.compile_seconds_in_loop = time.perf_counter() - t0
            self._probe = []
        return feats, seconds

    def _compile(self) -> None:
        t0 = time.perf_counter()
        faster = compiled_backbone(self.fused, self.batch_size, self.image_size,
                                   self.precision, self.device)
        self.compile_seconds = time.perf_counter() - t0
        if faster is None:
            self.decision += " (compiling failed: eager)"
        else:
            self.model, self.compiled = faster, True
            self._measured.note_compile(self.compile_seconds, python_environment())

    def finish(self) -> None:
        """Note what this extraction measured in the machine's record."""
        if not self.note:
            return
        m = self._measured
        # the fastest batch of each: steady speed, whatever else ran on the machine meanwhile
        if self._eager:
            m.eager_per_image = min(self._eager)
        if self._fast:
            m.compiled_per_image = min(self._fast)
        if self._eager and self._fast:
            m.ratio = m.compiled_per_image / m.eager_per_image
        if self._eager or self._fast or self.compiled:
            save_record(record_path(), self._key, m)
