"""What the recipes' training runs share: the epoch loop with its stop points and checkpoints, the
end of each epoch (the best epoch's weights and metrics, early stopping), the state a checkpoint
carries and the check that it belongs to this run, mixed precision on GPUs, and the seeds of a
run's random streams.

torch is imported inside the functions, because the web process imports the recipes' modules.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from jobs.recipes.base import Recipe, RecipeContext, RecipeInputError, RecipeResult

if TYPE_CHECKING:
    import torch
    from torch import nn

_SEED_STRIDE = 6_364_136_223_846_793_005  # spreads the derived seeds apart


def derived_seed(seed: int, stream: int) -> int:
    """The seed of one random stream of a run (its split, an epoch's order), drawn from the run's
    seed, so that each use of randomness has a generator of its own."""
    return (seed * _SEED_STRIDE + stream) % 2**63


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision in bf16 on a GPU, fp16 where bf16 is missing; None (float32) on the CPU."""
    import torch

    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, *, enabled: bool = True) -> torch.autocast:
    """Forward passes in `amp_dtype(device)`; float32 where that is None or `enabled` is False."""
    import torch

    dtype = amp_dtype(device) if enabled else None
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


class Trainer(abc.ABC):
    """One training run's mutable state: where it is (epoch, batch, step), the model, its optimizer
    and the best epoch so far; all of it goes into a checkpoint and comes back from one, so that a
    resumed run ends with the weights of one that was never interrupted.

    A recipe's trainer calls `__init__`, places its data on `device`, sets `batches` and builds
    its model with `_start_model`; it says how an epoch orders the training rows
    (`_epoch_order`), what a step on a batch of them is (`_train_step`, which ends in `_step`),
    what the validation metrics are (`_val_metrics`, whose "loss" picks the best epoch), what
    besides the parameters and seed ties a checkpoint to the run (`_identity`), and what the run
    returns (`_result`, from `_write_best_model` and `_best_epoch_metrics`).

    With several processes (`ctx.world_size` > 1) every rank holds the same state: the loss is
    averaged over the ranks each step, and `_val_metrics` must give every rank the same values.
    """

    recipe: ClassVar[type[Recipe]]
    # False keeps training in float32 on every device.
    mixed_precision: ClassVar[bool] = True
    # True where training draws from torch's global generators (dropout): the checkpoint then
    # carries their state, so a resumed run draws what the uninterrupted one would have.
    saves_random_state: ClassVar[bool] = False

    batches: int
    model: nn.Module
    optimizer: torch.optim.Optimizer

    def __init__(self, ctx: RecipeContext) -> None:
        import torch

        self.ctx = ctx
        self.parameters = ctx.parameters
        self.device = torch.device(ctx.devices[0])
        self.batch_size = self.parameters["batch_size"]
        self.autocast = autocast(self.device, enabled=self.mixed_precision)
        # bf16 has float32's range; only fp16 gradients need scaling to avoid underflow.
        fp16 = self.mixed_precision and amp_dtype(self.device) == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        self.epoch = self.batch = self.step = 0
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.best_val_loss = math.inf
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.best_metrics: dict[str, Any] | None = None
        self.stale_epochs = 0

    def _start_model(
        self,
        build: Callable[[dict[str, Any]], nn.Module],
        architecture: dict[str, Any],
        learning_rate: float,
    ) -> None:
        """`model`, built from `architecture` on `device`, and its Adam `optimizer`."""
        import torch

        # The same initial weights (and dropout draws) for the same seed, whatever ran in this
        # process before.
        torch.manual_seed(self.ctx.seed)
        self.model = build(architecture).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=learning_rate)

    def run(self) -> RecipeResult | None:
        """Train from the start, or from `ctx.resume_state`, until the last epoch or an early
        stop; None, after a checkpoint, when the context says to stop."""
        if self.ctx.resume_state is not None:
            self._restore(self.ctx.resume_state)
        epochs = self.parameters["epochs"]
        total = epochs * self.batches
        while self.epoch < epochs:
            order = self._epoch_order()
            while self.batch < self.batches:
                if self.ctx.should_stop():
                    self.ctx.save_checkpoint(self._state(), self.step)
                    return None
                start = self.batch * self.batch_size
                self._train_step(order[start : start + self.batch_size])
                self.batch += 1
                self.step += 1
                self.ctx.progress(self.step, total, self.epoch + 1)
                if self.ctx.checkpoint_due():
                    self.ctx.save_checkpoint(self._state(), self.step)
            if self._end_epoch():
                break
        return self._result()

    @abc.abstractmethod
    def _epoch_order(self) -> torch.Tensor:
        """This epoch's training rows in the order its batches take them; drawn from the seed
        and the epoch alone, so that a resumed run draws the same order mid-epoch."""

    @abc.abstractmethod
    def _train_step(self, rows: torch.Tensor) -> None:
        """Train on the batch `rows` (a slice of `_epoch_order`): its loss, then `_step`."""

    @abc.abstractmethod
    def _val_metrics(self) -> dict[str, float | None]:
        """The validation metrics of the model as it is, "loss" among them; None for one that
        is undefined (it is not reported)."""

    @abc.abstractmethod
    def _identity(self) -> dict[str, Any]:
        """What, besides the recipe, the parameters and the seed, a checkpoint must match to
        continue this run: the classes and the sizes of the data, say."""

    @abc.abstractmethod
    def _result(self) -> RecipeResult:
        """What the finished run reports."""

    def _step(self, loss: torch.Tensor) -> None:
        """An optimizer step on the batch's `loss`, which joins the epoch's training loss."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        loss = loss.detach()
        if self.ctx.world_size > 1:
            from jobs.recipes.distributed import mean_

            mean_(loss)
        # Accumulated on the device, so the step does not wait for the GPU.
        self.loss_sum += loss

    def _end_epoch(self) -> bool:
        """Measure the epoch, keep the best weights; True when early stopping ends the run."""
        train_loss = (self.loss_sum / self.batches).item()
        metrics = self._val_metrics()
        if not (math.isfinite(train_loss) and math.isfinite(metrics["loss"])):
            raise RecipeInputError(
                f"The loss stopped being a finite number in epoch {self.epoch + 1}; "
                "lower the learning_rate."
            )
        self.ctx.log_metric(self.step, "loss", train_loss, "train")
        for name, value in metrics.items():
            if value is not None:
                self.ctx.log_metric(self.step, name, value, "val")
        self.epoch += 1
        self.batch = 0
        self.loss_sum.zero_()
        if metrics["loss"] < self.best_val_loss:
            self.best_val_loss = metrics["loss"]
            self.best_weights = {
                name: tensor.detach().clone() for name, tensor in self.model.state_dict().items()
            }
            self.best_metrics = {**metrics, "train_loss": train_loss, "epoch": self.epoch}
            self.stale_epochs = 0
            return False
        self.stale_epochs += 1
        patience = self.parameters["early_stopping_patience"]
        if patience and self.stale_epochs >= patience:
            self.ctx.log(
                f"Stopping early after epoch {self.epoch}: the validation loss has not improved "
                f"for {patience} epochs; keeping epoch {self.best_metrics['epoch']}."
            )
            return True
        return False

    def _write_best_model(self, config: dict[str, Any]) -> dict[str, str]:
        """Put the best epoch's weights back in the model and write them with `config`; the
        artifacts' paths."""
        self.model.load_state_dict(self.best_weights)
        return self.ctx.write_artifacts(self.model.state_dict(), config)

    def _best_epoch_metrics(self) -> dict[str, Any]:
        """The best epoch's validation metrics (val_<name>), its training loss and number, and
        the epochs trained."""
        best = self.best_metrics
        validation = {
            f"val_{name}": value
            for name, value in best.items()
            if name not in ("train_loss", "epoch")
        }
        return {
            **validation,
            "train_loss": best["train_loss"],
            "best_epoch": best["epoch"],
            "epochs_trained": self.epoch,
        }

    def _fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must match to continue this run rather than another one."""
        return {
            "recipe": self.recipe.name,
            "version": self.recipe.version,
            "parameters": self.parameters,
            "seed": self.ctx.seed,
            **self._identity(),
        }

    def _state(self) -> dict[str, Any]:
        state = {
            "fingerprint": self._fingerprint(),
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loss_sum": self.loss_sum,
            "best_val_loss": self.best_val_loss,
            "best_weights": self.best_weights,
            "best_metrics": self.best_metrics,
            "stale_epochs": self.stale_epochs,
        }
        if self.saves_random_state:
            state["random"] = self._random_state()
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self._fingerprint():
            raise RecipeInputError(
                "The checkpoint belongs to a run with other parameters, data or seed; "
                "start the job again without it."
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler.is_enabled() and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if self.saves_random_state:
            self._restore_random_state(state["random"])
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        self.loss_sum = state["loss_sum"].to(self.device)
        self.best_val_loss = state["best_val_loss"]
        if state["best_weights"] is not None:
            self.best_weights = {
                name: tensor.to(self.device) for name, tensor in state["best_weights"].items()
            }
        self.best_metrics = state["best_metrics"]
        self.stale_epochs = state["stale_epochs"]

    def _random_state(self) -> dict[str, torch.Tensor]:
        import torch

        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _restore_random_state(self, state: dict[str, torch.Tensor]) -> None:
        import torch

        torch.set_rng_state(state["cpu"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)
