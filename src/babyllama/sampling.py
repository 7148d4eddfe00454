"""Where a model runs and how it picks tokens: the defaults that every command shares.

    from babyllama.sampling import DEVICE, Sampling
    Sampling()   # 256 new tokens at most, greedy, no top-k / top-p, no repetition penalty

Training (TrainConfig.device), `chat`, `serve` and `eval` take these, and so do their flags'
defaults, so the same question gets the same answer from each. No torch here: the command line
reads it to build its parser.
"""

from __future__ import annotations

from dataclasses import dataclass

from babyllama.errors import UserError

DEVICE = "auto"  # cuda when available, else mps, else cpu (checkpoint.pick_device)
MAX_TEMPERATURE = 2.0  # the OpenAI API's range, 0 to 2: the flags of chat, eval, serve and a request's alike
RANGES = {"max_new_tokens": ">= 1", "temperature": f"in [0, {MAX_TEMPERATURE:g}]", "top_k": ">= 0",
          "top_p": "in (0, 1]", "repetition_penalty": "in (0, 100]"}  # of each Sampling value, in words


@dataclass
class Sampling:
    """How to pick tokens (model.stream's arguments); out-of-range values stop with one sentence.

    The server's requests override temperature and top_p, and give max_tokens instead of max_new_tokens.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off (CTRL, Keskar et al., 2019)

    def __post_init__(self) -> None:
        """UserError for the first value out of range, naming its range alone: the others may be no setting of
        the command (serve has no max_new_tokens)."""
        if (why := out_of_range(**self.generate_kwargs())) is not None:
            raise UserError(why)

    def generate_kwargs(self) -> dict:
        """model.stream's / model.generate's sampling arguments."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_k": self.top_k,
                "top_p": self.top_p, "repetition_penalty": self.repetition_penalty}


def out_of_range(**values: float) -> str | None:
    """The sentence for the first of values (Sampling's fields by name: model.stream's arguments) out of its
    range (RANGES), e.g. "top_p = 0 is out of range (top_p in (0, 1])."; None when all are within."""
    checks = {"max_new_tokens": lambda v: v >= 1, "temperature": lambda v: 0 <= v <= MAX_TEMPERATURE,
              "top_k": lambda v: v >= 0, "top_p": lambda v: 0 < v <= 1,
              "repetition_penalty": lambda v: 0 < v <= 100}  # NaN fails every comparison
    bad = next((k for k, v in values.items() if not checks[k](v)), None)
    return None if bad is None else f"{bad} = {values[bad]} is out of range ({bad} {RANGES[bad]})."
