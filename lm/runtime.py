"""Loading a language model for serving: checkpoint resolution, weights, tokenizer, engine."""

from __future__ import annotations

import time
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lm.checkpoints import resolve_model
from lm.models.base import DecoderConfig
from lm.engine import Engine, EngineConfig
from lm.sampling import checkpoint_sampling_defaults
from lm.tokenizer import Tokenizer
from lm.weights import load_text_model
from vision.config import usable_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LanguageModel:
    """A loaded decoder with its tokenizer; `engine()` builds a serving engine around it."""

    path: Path  # checkpoint directory the weights came from
    config: DecoderConfig
    model: torch.nn.Module
    tokenizer: Tokenizer
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    quantization: str | None = None
    sampling_defaults: dict = field(default_factory=dict)  # lm.sampling.checkpoint_sampling_defaults

    def engine(self, engine_config: EngineConfig | None = None) -> Engine:
        if engine_config is None:
            engine_config = EngineConfig(stop_token_ids=self.tokenizer.special.stop_ids)
        return Engine(self.model, self.config, engine_config, tokenizer=self.tokenizer,
                      device=self.device, dtype=self.dtype)


def load_language_model(spec: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        quantize: str | None = None, cache_dir: str | Path | None = None,
                        progress: bool = True) -> LanguageModel:
    """`spec` is `gemma3-270m` (the embedded default), a `.gguf` file or a checkpoint directory."""
    started = time.perf_counter()
    device = usable_device(device)  # before any weights are read
    path = resolve_model(spec, cache_dir, progress=progress)
    config, model = load_text_model(path, dtype=dtype, device=device)
    tokenizer = Tokenizer.from_dir(path)
    if quantize is not None:
        from lm.quantize import calibration_ids, quantize_model

        quantize_model(model, quantize, calibration_ids=calibration_ids(tokenizer))
    generation = path / "generation_config.json"
    defaults = checkpoint_sampling_defaults(json.loads(generation.read_text(encoding="utf-8"))
                                            if generation.is_file() else {})
    return LanguageModel(path=path, config=config, model=model, tokenizer=tokenizer, device=torch.device(device),
                         dtype=dtype, load_seconds=time.perf_counter() - started, quantization=quantize,
                         sampling_defaults=defaults)
