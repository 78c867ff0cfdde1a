"""The lm-evaluation-harness model `blt`: any blt model (run dir, checkpoint of any ZeRO stage,
export) as an `lm_eval.api.model.LM`. Importing this module registers it.

    python -m blt.harness --model blt --model_args pretrained=runs/tiny --tasks blt_shakespeare_next_line
    blt lm-eval runs/tiny --tasks blt_shakespeare_next_line --limit 50

    import blt.harness.lm, lm_eval
    lm_eval.simple_evaluate(model="blt", model_args="pretrained=exports/tiny,batch_size=16", tasks=[...])

model_args: pretrained (the MODEL path), device (cpu, cuda, cuda:N, auto), batch_size (rows per
forward), dtype (float32, or bfloat16 autocast on GPU), max_gen_bytes (generate_until's default
length limit, in bytes; a task's `max_gen_toks` counts bytes too), share_context (true: the
choices of one context are scored from one cached encoding of it; false: a full forward each).
Text goes in and out as UTF-8.
The scoring itself is blt/harness/scoring.py.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from blt.harness.scoring import Scorer
from blt.typed import OptionError, PosInt, check_option

DTYPES = {"float32": None, "fp32": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def as_batch_size(value) -> int:
    """lm_eval passes batch_size as given on its command line (a string, maybe "auto")."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, str):
        raise OptionError(f"batch_size {value!r}: give a number of rows per forward (blt has no 'auto')")
    return check_option("batch_size", value, PosInt)


def as_flag(name: str, value) -> bool:
    """lm_eval passes model_args as strings ("true", "False", "0", ...)."""
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("true", "1", "yes"):
        return True
    if str(value).strip().lower() in ("false", "0", "no"):
        return False
    raise OptionError(f"{name} {value!r}: use true or false")


@register_model("blt")
class BltLM(LM):
    """A blt model and its patcher behind lm_eval's three request types. Construct it from a path
    (what lm_eval does with model_args) or, with `from_model`, around a model already in memory
    (the trainer does, with `dist`: its ranks share the requests)."""

    def __init__(
        self,
        pretrained: str | None = None,
        device: str = "cpu",
        batch_size: int | str = 16,
        dtype: str = "float32",
        max_gen_bytes: int = 256,
        max_batch_size: Any = None,
        share_context: bool | str = True,
        **unknown,
    ):
        super().__init__()
        if unknown:
            raise OptionError(
                f"model_args: unknown {', '.join(sorted(unknown))} (blt takes pretrained, device, "
                "batch_size, dtype, max_gen_bytes, share_context)"
            )
        if pretrained is None:
            raise OptionError("model_args needs pretrained=MODEL (a blt run dir, checkpoint or export)")
        if dtype not in DTYPES:
            raise OptionError(f"dtype {dtype!r}: use float32 or bfloat16")
        from blt.artifacts import load_model
        from blt.device import check_device

        batch = as_batch_size(batch_size)
        max_gen = check_option("max_gen_bytes", max_gen_bytes, PosInt)
        share = as_flag("share_context", share_context)
        if str(device).startswith("cuda") and not torch.cuda.is_available():  # lm_eval's CLI default is cuda:0
            logging.getLogger(__name__).warning("blt: no CUDA device here; running on cpu")
            device = "cpu"
        dev = check_device(str(device), "device")
        loaded = load_model(str(pretrained), dev)
        scorer = Scorer(
            loaded.model, loaded.patcher, loaded.cfg.data.seq_len, batch, DTYPES[dtype], share_context=share
        )
        self._setup(scorer, max_gen, torch.device(dev))
        self.source = str(loaded.where)

    @classmethod
    def from_model(
        cls,
        model,
        patcher,
        context: int,
        batch_size: int = 16,
        amp_dtype=None,
        max_gen_bytes: int = 256,
        dist=None,
        cached: bool = True,
        share_context: bool = True,
    ) -> BltLM:
        """Around a model in memory. With `dist` (rank, world_size, all_gather_object), the ranks
        share the requests; see `_shared`."""
        self = cls.__new__(cls)
        LM.__init__(self)
        sync = None
        if dist is not None and dist.world_size > 1:
            self.dist = dist
            sync = lambda n: max(dist.all_gather_object(n))  # noqa: E731
        device = next(model.parameters()).device
        self._setup(
            Scorer(model, patcher, context, batch_size, amp_dtype, sync, cached, share_context), max_gen_bytes, device
        )
        self.source = "in memory"
        return self

    def _setup(self, scorer: Scorer, max_gen_bytes: int, device: torch.device) -> None:
        self.scorer, self.max_gen_bytes, self._device = scorer, max_gen_bytes, device
        self.dist = getattr(self, "dist", None)

    def _shared(self, fn, items: list) -> list:
        """fn(items) in a job of several ranks: every rank builds every request (lm_eval sees one
        process, so none of its ranks can lack a request type, and a task with fewer documents
        than ranks is fine), scores its contiguous share (so a question's choices, which lm_eval
        lists together, mostly stay on one rank and share their context; the scorer keeps the
        ranks' forwards in step) and gets everyone's results back, in order."""
        if self.dist is None:
            return fn(items)
        W, r = self.dist.world_size, self.dist.rank
        bounds = [len(items) * k // W for k in range(W + 1)]
        return [x for part in self.dist.all_gather_object(fn(items[bounds[r] : bounds[r + 1]])) for x in part]

    # ------------------------------------------------------------------------- lm_eval's requests

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [(ctx.encode("utf-8"), cont.encode("utf-8")) for ctx, cont in (r.args for r in requests)]
        return self._shared(self.scorer.loglikelihood, pairs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self._shared(self.scorer.rolling, [r.args[0].encode("utf-8") for r in requests])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        args = [(ctx.encode("utf-8"), self._generation_options(kw)) for ctx, kw in (r.args for r in requests)]
        return self._shared(self._generate, args)

    def _generate(self, args: list[tuple[bytes, tuple]]) -> list[str]:
        """Rows with the same stop strings, length limit and temperature generate together,
        `batch_size` at a time; in a job, every rank walks the same groups and as many batches."""
        groups: dict[tuple, list[int]] = {}
        for i, (_, options) in enumerate(args):
            groups.setdefault(options, []).append(i)
        if self.dist is not None:
            keys = {k for ks in self.dist.all_gather_object(list(groups)) for k in ks}
            groups = {k: groups.get(k, []) for k in sorted(keys, key=repr)}
        out = [""] * len(args)
        B = self.scorer.batch_size
        for (until, max_bytes, temperature), rows in groups.items():
            rows = sorted(rows, key=lambda i: -len(args[i][0]))
            chunks = [rows[i : i + B] for i in range(0, len(rows), B)]
            if self.scorer.sync is not None:  # empty chunks still step with the other ranks
                chunks += [[] for _ in range(self.scorer.sync(len(chunks)) - len(chunks))]
            for chunk in chunks:
                texts = self.scorer.generate(
                    [args[i][0] for i in chunk], [s.encode("utf-8") for s in until], max_bytes, temperature
                )
                for i, t in zip(chunk, texts):
                    out[i] = t.decode("utf-8", errors="replace")
        return out

    def _generation_options(self, kwargs: dict) -> tuple:
        """A task's gen_kwargs -> (stop strings, max bytes, temperature); sampling is by temperature."""
        kwargs = dict(kwargs or {})
        until = kwargs.pop("until", None) or []
        until = (until,) if isinstance(until, str) else tuple(until)
        max_bytes = int(kwargs.pop("max_gen_toks", self.max_gen_bytes))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0) if kwargs.pop("do_sample", False) else 0.0
        return until, max_bytes, temperature

    def get_model_info(self) -> dict:
        return {"model_source": self.source, "context_bytes": self.scorer.context}
