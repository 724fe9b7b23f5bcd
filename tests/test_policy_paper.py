"""policy="paper": the published EPD top-1 routing (SPEC §2), an alias of "topk"."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import molf
from molf import _core as core


def _scores(rng: np.random.Generator, m: int, e: int) -> np.ndarray:
    s = rng.random((m, e))
    s[rng.random((m, e)) < 0.1] = np.nan
    s[rng.random((m, e)) < 0.1] = 0.5  # ties
    return s


@pytest.mark.parametrize("topk", [1, 2])
def test_router_paper_is_topk(topk):
    rng = np.random.default_rng(topk)
    paper = core.Router(7, 3, topk=topk, policy="paper")
    plain = core.Router(7, 3, topk=topk, policy="topk")
    assert paper.policy == "topk"  # the alias resolves to the canonical name
    for _ in range(30):
        s = _scores(rng, 7, 3)
        # Plain reference: the k highest finite scores, ties to the lower index.
        want = np.zeros((7, 3), bool)
        for i, row in enumerate(s):
            finite = [j for j in range(3) if np.isfinite(row[j])]
            for j in sorted(finite, key=lambda j: (-row[j], j))[:topk]:
                want[i, j] = True
        np.testing.assert_array_equal(paper.route(s), want)
        np.testing.assert_array_equal(plain.route(s), want)
    assert paper.to_bytes() == plain.to_bytes()


def test_unknown_policy_message_names_paper():
    with pytest.raises(core.ConfigError, match="'paper' \\(an alias of 'topk'\\)"):
        core.Router(2, 2, policy="Paper")


def _train(policy: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    model = molf.wrap(net, molf.MoLFConfig(ranks=(2,), alphas=(4.0,), exclude_modules=()))
    opt = molf.MoLFAdamW(model, lr=1e-2, lora_lr=3e-2, weight_decay=0.1, routing=molf.routing.policy_by_name(policy))
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    for _ in range(8):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()] + [torch.from_numpy(opt.ledger.wins())]


def test_optimizer_paper_matches_topk_bitwise():
    for a, b in zip(_train("paper"), _train("topk"), strict=True):
        assert torch.equal(a, b)


def test_paper_requires_epd():
    with pytest.raises(molf.ConfigError, match="policy 'paper'.*score must be 'epd', got 'pfn'"):
        molf.routing.policy_by_name("paper", score="pfn")
