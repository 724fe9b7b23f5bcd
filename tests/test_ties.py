"""Tied and shared weights: `wrap` and `merge` refuse them instead of folding an expert
into a tensor that another place of the model also reads (issue #31, item 1)."""

from __future__ import annotations

import pytest
import torch
import transformers  # a test dependency: a missing one fails, never skips
from torch import nn

import molf
from molf.wrap import expert_tag


def tiny_qwen2(tie: bool) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=tie,
    )
    return transformers.Qwen2ForCausalLM(config).double()


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).double()


def snapshot(model: nn.Module) -> tuple[list, dict]:
    """Which module object sits where, and every parameter's value, flag and expert tag."""
    modules = [(n, id(m)) for n, m in model.named_modules()]
    params = {n: (p.detach().clone(), p.requires_grad, expert_tag(p)) for n, p in model.named_parameters()}
    return modules, params


def assert_unchanged(model: nn.Module, before: tuple[list, dict]) -> None:
    modules, params = snapshot(model)
    assert modules == before[0]
    assert params.keys() == before[1].keys()
    for n, (value, flag, tag) in params.items():
        assert (flag, tag) == before[1][n][1:], n
        torch.testing.assert_close(value, before[1][n][0], rtol=0, atol=0, msg=n)


def train(model: nn.Module, steps: int = 3) -> torch.Tensor:
    """A few MoLFAdamW steps on random tokens; the batch, for comparing outputs."""
    opt = molf.MoLFAdamW(model, lr=1e-2, lora_lr=1e-2)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return ids


@pytest.mark.parametrize("fft", [True, False])
@pytest.mark.parametrize(
    ("build", "head", "embedding"),
    [(lambda: tiny_qwen2(tie=True), "lm_head", "model.embed_tokens"), (tiny_gpt2, "lm_head", "transformer.wte")],
    ids=["qwen2", "gpt2"],
)
def test_wrap_refuses_a_tied_head_and_the_default_keeps_the_tie_through_merge(build, head, embedding, fft):
    model = build()
    assert model.get_submodule(head).weight is model.get_submodule(embedding).weight
    before = snapshot(model)
    with pytest.raises(
        molf.ConfigError,
        match=rf"wrap: {head}\.weight is tied to {embedding}\.weight \(tie_word_embeddings\).*"
        rf"exclude {head}",
    ):
        molf.wrap(model, molf.MoLFConfig(ranks=(4,), fft=fft, exclude_modules=()))
    assert_unchanged(model, before)

    # The default config leaves the head out: trained and merged models then agree, tie kept.
    molf.wrap(model, molf.MoLFConfig(ranks=(4,) if fft else (2, 4), fft=fft))
    ids = train(model)
    model.eval()  # GPT-2 has dropout
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        merged = molf.merge(model)
        torch.testing.assert_close(merged(input_ids=ids).logits, trained, rtol=1e-9, atol=1e-9)
    assert merged.get_submodule(head).weight is merged.get_submodule(embedding).weight


class SharedLinear(nn.Module):
    """One nn.Linear object registered at two places."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.again = self.proj
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.again(torch.tanh(self.proj(x))))


class AliasedParent(nn.Module):
    """A block reachable under two names: the same module, called once."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.alias = self.block
        self.lm_head = nn.Linear(4, 3)

    def forward(self, x):
        return self.lm_head(self.alias(x))


def test_wrap_refuses_one_linear_at_two_places_but_not_an_aliased_parent():
    model = SharedLinear()
    before = snapshot(model)
    with pytest.raises(molf.ConfigError, match=r"the layer proj is also used as again \(one module object"):
        molf.wrap(model, molf.MoLFConfig(ranks=(2,)))
    assert_unchanged(model, before)
    # Excluding the layer leaves both places unadapted: consistent, so allowed.
    molf.wrap(model, molf.MoLFConfig(ranks=(2,), exclude_modules=("proj",)))
    assert [n for n, _ in molf.routed_modules(model)] == ["out"]

    # Wrapping inside an aliased parent changes the one module both names reach.
    torch.manual_seed(0)
    model = molf.wrap(AliasedParent().double(), molf.MoLFConfig(ranks=(2,)))
    assert model.alias[0] is model.block[0] and isinstance(model.block[0], molf.MoLFLinear)
    with torch.no_grad():
        model.block[0].lora_B[0].normal_()
        x = torch.randn(5, 4, dtype=torch.float64)
        trained = model(x)
        torch.testing.assert_close(molf.merge(model)(x), trained, rtol=1e-12, atol=1e-12)


class TwoViews(nn.Module):
    def __init__(self, overlap: bool):
        super().__init__()
        flat = torch.randn(32 if overlap else 48)
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)
        # Two parameters over one buffer (as FSDP1's flat parameter lays them out).
        self.a.weight = nn.Parameter(flat[:16].view(4, 4))
        self.b.weight = nn.Parameter(flat[8:24].view(4, 4) if overlap else flat[16:32].view(4, 4))

    def forward(self, x):
        return self.b(self.a(x))


def test_wrap_refuses_weights_that_share_memory_but_not_disjoint_views():
    model = TwoViews(overlap=True)
    before = snapshot(model)
    with pytest.raises(molf.ConfigError, match=r"a\.weight is tied to b\.weight \(they share memory\)"):
        molf.wrap(model, molf.MoLFConfig(ranks=(2,), exclude_modules=()))
    assert_unchanged(model, before)
    assert len(molf.routed_modules(molf.wrap(TwoViews(overlap=False), molf.MoLFConfig(ranks=(2,))))) == 2


def test_merge_refuses_a_tie_made_after_wrap_and_changes_nothing():
    model = molf.wrap(tiny_qwen2(tie=False), molf.MoLFConfig(ranks=(4,), exclude_modules=()))
    layers = molf.routed_modules(model)
    assert layers[-1][0] == "lm_head"  # every other layer comes first: none may be merged
    with torch.no_grad():
        for _, layer in layers:
            layer.lora_B[0].normal_()
    # What tie_weights() does on a model whose head was not tied at wrap time.
    model.lm_head.base.weight = model.model.embed_tokens.weight
    before = snapshot(model)
    with pytest.raises(
        molf.ConfigError,
        match=r"merge: lm_head\.base\.weight is tied to model\.embed_tokens\.weight \(the same tensor\)"
        r".*nothing was changed",
    ):
        molf.merge(model)
    assert_unchanged(model, before)
    assert [n for n, _ in molf.routed_modules(model)] == [n for n, _ in layers]
    assert hasattr(model, "molf_config")


def test_merge_refuses_a_wrapped_layer_placed_twice_after_wrap():
    model = molf.wrap(SharedLinear(), molf.MoLFConfig(ranks=(2,), exclude_modules=("proj",)))
    model.extra = model.out  # the wrapped layer now sits at two places
    before = snapshot(model)
    with pytest.raises(molf.ConfigError, match=r"merge: the layer out is also used as extra.*nothing was changed"):
        molf.merge(model)
    assert_unchanged(model, before)
