"""What a training failure needs, kept beside the loop so the loop reads as the normal path: the
newest checkpoint, and what the step under way took (data position, RNG), so that a failure saves
the last completed step and says in one line where to go from there.

    recovery = Recovery(loader, trainer.save, step, resume_from)
    recovery.step_begins()                 # before a step draws its batches
    with recovery.update(): engine.step(lr)   # the weights are between two steps inside
    raise recovery.diverged(err, step, elapsed)  # a non-finite loss: save, and say what to resume
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from blt.artifacts.checkpoints import is_complete
from blt.train.checkpoint import rng_state, set_rng_state
from blt.train.distributed import PeerLostError
from blt.train.engine import DivergedError


class Recovery:
    def __init__(self, loader, save: Callable[[float, bool], Path], step: int, saved_path: Path | None):
        """`save(elapsed, prune)` checkpoints the trainer's current step (and reports it to `saved`)."""
        self.loader, self._save = loader, save
        self.saved_step, self.saved_path = step, saved_path  # what the last checkpoint holds
        self.rewind: tuple[dict, dict] | None = None  # (data position, RNG) before the step under way
        self.updating = False  # inside the optimizer update: the weights are between two steps

    def step_begins(self) -> None:
        """A step starts drawing batches and random numbers: remember what to give back."""
        self.rewind = (self.loader.state_dict(), rng_state())

    @contextmanager
    def update(self):
        """Around the optimizer update that completes a step; after it nothing needs giving back."""
        self.updating = True
        try:
            yield
        except DivergedError:  # raised before anything was updated
            self.updating = False
            raise
        self.rewind, self.updating = None, False

    def saved(self, step: int, path: Path) -> None:
        self.saved_step, self.saved_path = step, path

    def save_last_good(self, step: int, elapsed: float) -> Path | None:
        """After a failure: save the last completed step (its weights, optimizer, data position and
        RNG), keeping every older checkpoint. None when it is saved already, or when the failure
        came inside the optimizer update (the weights are then between two steps)."""
        if step == self.saved_step or self.updating:
            return None
        if self.rewind is not None:  # a step was under way: give back the batches and random numbers it took
            data, rng = self.rewind
            self.loader.load_state_dict(data)
            set_rng_state(rng)
            self.rewind = None
        return self._save(elapsed, False)

    def diverged(self, err: DivergedError, step: int, elapsed: float) -> DivergedError:
        """Save the last completed step; the one-line error says where to go from there. Resuming
        that step repeats the loss whatever the lr (the lr only enters the update after it), so
        it points to a checkpoint before the divergence."""
        what = f"{err} at step {step + 1}; lower optimizer.lr"
        try:
            saved = self.save_last_good(step, elapsed) or (self.saved_path if self.saved_step == step else None)
        except Exception as save_err:  # noqa: BLE001 - say both in the one line
            return DivergedError(
                f"{what} (saving step {step} failed: {type(save_err).__name__}: {str(save_err).strip()[:120]})"
            )
        if saved is None:  # no step completed: nothing to go back to (the run dir is taken back)
            return DivergedError(what)
        earlier = [d for d in sorted(Path(saved).parent.glob("step_*")) if is_complete(d) and d.name < Path(saved).name]
        where = (
            f"resume from before the divergence with checkpoint.resume={earlier[-1]}"
            if earlier
            else "start again in a new run_dir, as no checkpoint precedes the divergence"
        )
        return DivergedError(
            f"{what} and {where} (step {step} is saved in {saved}, but resuming it gives "
            "the same result whatever the lr)"
        )

    def save_after_failure(self, err: Exception, step: int, elapsed: float, say: Callable[[str], None]) -> None:
        """Save the last completed step before the error goes on, and `say` where in one line."""
        try:
            path = self.save_last_good(step, elapsed)
        except Exception as save_err:  # noqa: BLE001 - the original error matters more
            say(
                f"could not save step {step} after {type(err).__name__} "
                f"({type(save_err).__name__}: {str(save_err).strip()[:160]})"
            )
            return
        name = type(err).__name__
        if path is not None:
            say(f"{name} after step {step}: saved {path}; rerun the same command to resume from it")
        elif self.updating:
            say(
                f"{name} inside the update of step {step + 1}: its weights are between two steps "
                f"and were not saved; the newest checkpoint is {self.saved_path}"
            )
        elif self.saved_path is not None:
            say(
                f"{name} in step {step + 1}: step {step} is saved in {self.saved_path}; rerun "
                "the same command to resume from it"
            )


def peer_lost(err: Exception, rank: int, step: int, run_dir: Path) -> PeerLostError:
    """The one-line error of a process whose job lost another process."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)[:160]  # drop gloo's "[file.cc:537]" prefix
    return PeerLostError(
        f"rank {rank} lost another process of the job at step {step} ({first}); "
        f"rerun the same command to resume from the newest complete checkpoint in "
        f"{run_dir / 'checkpoints'}"
    )


def finish_the_error_message() -> None:
    """A process of a job that is already failing ignores SIGTERM from here on: a launcher that saw
    another process die (torchrun) stops the rest with SIGTERM, and the default action would end this
    one silently between leaving the training loop and printing why (its group teardown takes a
    while). The launcher's SIGKILL after its grace period (torchrun: 30 s) still bounds the exit."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass
