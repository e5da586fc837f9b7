"""Training frameworks' hooks for :class:`landscape.analyses.monitor.Monitor`: a Lightning ``Callback`` and a transformers
``TrainerCallback``. Each framework is imported only when its adapter is made, so neither is a dependency.

>>> # Lightning: trainer = Trainer(callbacks=[lightning_callback(Monitor(module, loss, data))])
>>> # transformers: Trainer(model, args, callbacks=[hf_callback(Monitor(model, "causal_lm", (ids, ids)))])

Both call :meth:`Monitor.step` after every optimizer step with the framework's step count (``global_step``: the
optimizer steps taken, so the first check can be at step ``every``) and its optimizer, and close the monitor when
training ends. Under gradient accumulation the hook fires once per micro-batch with the same step; the monitor
measures a step once.
"""

from __future__ import annotations

from typing import Any

from ..errors import LandscapeError
from .monitor import Monitor


def lightning_callback(monitor: Monitor) -> Any:
    """A ``lightning.pytorch.Callback`` (or ``pytorch_lightning``'s) that drives ``monitor``."""
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError:
            raise LandscapeError("Lightning is not installed", hint="pip install lightning") from None

    class LandscapeMonitor(Callback):  # type: ignore[misc,valid-type]
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            optimizers = trainer.optimizers
            monitor.step(trainer.global_step, optimizer=optimizers[0] if optimizers else None)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            monitor.close()

    return LandscapeMonitor()


def hf_callback(monitor: Monitor) -> Any:
    """A ``transformers.TrainerCallback`` that drives ``monitor``."""
    try:
        from transformers import TrainerCallback
    except ImportError:
        raise LandscapeError("transformers is not installed", hint="pip install transformers") from None

    class LandscapeMonitor(TrainerCallback):  # type: ignore[misc,valid-type]
        def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
            monitor.step(state.global_step, optimizer=optimizer)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            monitor.close()

    return LandscapeMonitor()
