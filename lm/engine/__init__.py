"""The inference engine (lm/engine/engine.py), its scheduler, block manager and model runner."""

from lm.engine.engine import Engine, EngineConfig, EngineStats

__all__ = ["Engine", "EngineConfig", "EngineStats"]
