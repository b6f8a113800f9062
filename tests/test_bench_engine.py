"""`tessera bench engine`'s concurrency part: its figures over many workloads come from the engine run
with `SchedulingOnly` in place of the network, which is sound only if such a run takes the same steps."""

from __future__ import annotations

import random

import torch

from lm.kv_cache import KVLayout
from lm.models.gemma3 import Gemma3TextModel
from service.bench.engine import SchedulingOnly, concurrency_workload, run_workload
from test_lm_engine import tiny_config


def test_the_scheduling_only_network_replays_a_real_run_step_for_step():
    config = tiny_config()
    torch.manual_seed(0)
    model = Gemma3TextModel(config).eval()
    rng = random.Random(0)
    workload = ([[rng.randrange(3, 90) for _ in range(rng.randint(5, 80))] for _ in range(12)],
                [rng.randint(4, 24) for _ in range(12)])
    layout = KVLayout.from_config(config, 16)
    budget = (layout.blocks_for_request(128, 16) + 6) * layout.block_bytes(config, torch.float32)  # a few requests
    real = run_workload(model, config, workload, budget=budget, max_seq_len=128, prefill_chunk=16)
    replay = run_workload(SchedulingOnly(config), config, workload, budget=budget, max_seq_len=128, prefill_chunk=16)
    assert real["preemptions"] > 0 and real["peak"] > 1  # the budget makes the scheduler work
    assert (replay["running"], replay["preemptions"], replay["generated"]) == \
        (real["running"], real["preemptions"], real["generated"])


def test_the_workload_is_the_seeds_own():
    prompts, new_tokens = concurrency_workload(64, 0)
    assert len(prompts) == len(new_tokens) == 64
    assert all(50 <= len(p) <= 4000 for p in prompts) and all(16 <= n <= 256 for n in new_tokens)
    assert concurrency_workload(64, 0) == (prompts, new_tokens) and concurrency_workload(64, 1)[0] != prompts
