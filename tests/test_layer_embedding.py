"""LoRAEmbedding: LoRA on nn.Embedding against PEFT's lora.Embedding."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastlora
from fastlora import LoRAEmbedding

from _layer_twins import assert_matches_peft, count_matches_peft, peft_twin, randomize_adapters, run
from _oracles import assert_close_to

peft = pytest.importorskip("peft", reason="PEFT parity tests need peft (pip install 'fastlora[test]')")


def base_net(num=30, dim=12, seed=0, **kwargs):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(num, dim, **kwargs))


def adapted(net, **kwargs):
    kwargs.setdefault("r", 4)
    kwargs.setdefault("alpha", 8.0)
    model = fastlora.apply_lora(copy.deepcopy(net), target_modules=["0"], **kwargs)
    randomize_adapters(model)
    return model


def ids(num=30, shape=(3, 7), seed=1):
    return torch.randint(0, num, shape, generator=torch.Generator().manual_seed(seed))


def test_wraps_shares_freezes_and_initialises_as_peft():
    emb = nn.Embedding(30, 12, padding_idx=2)
    layer = LoRAEmbedding.from_embedding(emb, r=4, alpha=8)
    assert layer.weight is emb.weight and not layer.weight.requires_grad
    assert layer.lora_embedding_A.shape == (4, 30) and layer.lora_embedding_B.shape == (12, 4)
    assert layer.lora_A is layer.lora_embedding_A and layer.lora_B is layer.lora_embedding_B
    assert (layer.in_features, layer.out_features, layer.padding_idx) == (30, 12, 2)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_embedding_A", "lora_embedding_B"}
    assert set(layer.peft_tensors()) == {"lora_embedding_A", "lora_embedding_B"}
    # PEFT's init for embeddings: A = 0, B ~ N(0, 1); a fresh layer is its base.
    assert torch.equal(layer.lora_embedding_A, torch.zeros(4, 30))
    big = LoRAEmbedding.from_embedding(nn.Embedding(10, 256), r=16)
    assert abs(big.lora_embedding_B.std().item() - 1.0) < 0.05  # 4096 N(0, 1) samples: std within ~2 %
    x = ids()
    assert_close_to(layer(x), emb(x), 0.0, "fresh layer")
    assert "30, 12, padding_idx=2, r=4" in repr(layer)


@pytest.mark.parametrize(
    "options",
    [{}, {"padding_idx": 3}, {"scale_grad_by_freq": True}, {"max_norm": 1.5, "norm_type": 2.0}, {"max_norm": 2.0, "norm_type": 1.0}],
    ids=["plain", "padding_idx", "scale_grad_by_freq", "max_norm", "max_norm-l1"],
)
@pytest.mark.parametrize("r, rslora", [(1, False), (4, True), (8, False)])
def test_matches_peft_outputs_and_gradients(options, r, rslora):
    net = base_net(**options)
    ours = adapted(net, r=r, use_rslora=rslora)
    x = ids()
    x[0, :3] = 3  # a repeated id (scale_grad_by_freq) that is padding_idx in one case
    compared = assert_matches_peft(net, ours, x, r=r, lora_alpha=8, use_rslora=rslora, target_modules=["0"])
    assert compared == ["y", "0.lora_embedding_A", "0.lora_embedding_B"]


def test_padding_idx_gets_no_adapter_gradient_and_max_norm_renormalises_a_as_peft_does():
    net = base_net(padding_idx=3, max_norm=1.0)
    ours = adapted(net)
    layer = ours[0]
    with torch.no_grad():
        layer.lora_embedding_A.mul_(10)  # columns far above max_norm
    twin = peft_twin(net, ours, r=4, lora_alpha=8, target_modules=["0"])
    x = ids()
    x[0, 0] = 3
    grads = run(ours, x)
    run(twin, x)
    theirs = twin.base_model.model[0]
    assert torch.equal(grads["0.lora_embedding_A"][:, 3], torch.zeros(4))
    # max_norm renormalised the looked-up columns of A in place, in both (PEFT's semantics).
    used = torch.unique(x)
    norms = layer.lora_embedding_A[:, used].norm(dim=0)
    assert (norms <= 1.0 + 1e-5).all()
    assert_close_to(layer.lora_embedding_A, theirs.lora_embedding_A["default"], 1e-6, "renormalised A")
    assert_close_to(layer.weight, theirs.base_layer.weight, 1e-6, "renormalised table")


def test_dropout_is_kept_but_not_applied_as_in_peft():
    net = base_net()
    ours = adapted(net, dropout=0.5)
    layer = ours[0]
    assert layer.dropout == 0.5
    x = ids()
    layer.train()
    y_train = layer(x)
    layer.eval()
    assert torch.equal(y_train, layer(x))


def test_sparse_base_gives_dense_adapter_gradients():
    """PEFT 0.21's backward fails on a sparse=True embedding (a sparse gradient through
    A.T); here the frozen table keeps sparse=True and the adapters get dense gradients."""
    net = base_net(sparse=True)
    ours = adapted(net)
    dense = adapted(base_net())
    x = ids()
    got, want = run(ours, x), run(dense, x)
    assert ours[0].lora_embedding_A.grad.layout == torch.strided
    for k in ("y", "0.lora_embedding_A", "0.lora_embedding_B"):
        assert torch.equal(got[k], want[k])
    assert ours[0].to_base().sparse


def test_merge_unmerge_and_to_base_agree_with_peft():
    net = base_net(padding_idx=0)
    ours = adapted(net)
    layer = ours[0]
    twin = peft_twin(net, ours, r=4, lora_alpha=8, target_modules=["0"])
    x = ids()
    y = layer(x).detach()
    w0 = layer.weight.detach().clone()
    plain = layer.to_base()
    assert type(plain) is nn.Embedding and plain.weight is not layer.weight and torch.equal(layer.weight, w0)
    assert plain.padding_idx == 0 and not plain.weight.requires_grad
    twin.base_model.model[0].merge()
    peft_merged = twin.base_model.model[0].base_layer.weight.detach()
    eps = torch.finfo(torch.float32).eps
    scale = peft_merged.abs().max().item()
    assert_close_to(plain.weight, peft_merged, 2 * eps * scale, "to_base table vs PEFT's merge")
    layer.merge()
    assert layer.merged
    assert_close_to(layer.weight, peft_merged, 2 * eps * scale, "merged table vs PEFT's merge")
    # A lookup of the merged table vs W0[ids] + s (A^T[ids]) B^T: one rounding of an r-term sum.
    tol = 8 * eps * scale
    assert_close_to(layer(x), y, tol, "merged output")
    assert_close_to(plain(x), y, tol, "to_base output")
    layer.unmerge()
    assert_close_to(layer.weight, w0, eps * scale, "unmerged table")  # W + d - d, <= 1 ulp of the merged table


def test_merge_lora_and_count_parameters():
    net = base_net()
    ours = adapted(net)
    twin = peft_twin(net, ours, r=4, lora_alpha=8, target_modules=["0"])
    count_matches_peft(ours, twin)
    x = ids()
    y = ours(x).detach()
    fastlora.merge_lora(ours)
    assert type(ours[0]) is nn.Embedding
    assert_close_to(ours(x), y, 8 * torch.finfo(torch.float32).eps * y.abs().max().item(), "merged model")


def test_fp32_adapters_on_a_bf16_table_follow_peft():
    net = base_net().to(torch.bfloat16)
    ours = fastlora.apply_lora(copy.deepcopy(net), r=4, target_modules=["0"])
    layer = ours[0]
    layer.lora_embedding_A.data = layer.lora_embedding_A.data.float()
    layer.lora_embedding_B.data = layer.lora_embedding_B.data.float()
    randomize_adapters(ours)
    twin = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=4, target_modules=["0"]))  # fp32 adapters
    peft.set_peft_model_state_dict(twin, {f"base_model.model.0.{k}": v for k, v in layer.peft_tensors().items()})
    x = ids()
    y = ours(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, twin(x))  # the same expression in the same dtypes


def test_refusals_name_the_module():
    net = base_net()
    with pytest.raises(NotImplementedError, match=r"quantize='nf4'.*'0' is a Embedding"):
        fastlora.apply_lora(copy.deepcopy(net), target_modules=["0"], quantize="nf4")
    with pytest.raises(NotImplementedError, match=r"use_dora=True.*'0' is a Embedding"):
        fastlora.apply_lora(copy.deepcopy(net), target_modules=["0"], use_dora=True)
    with pytest.raises(NotImplementedError, match=r"LoRAEmbedding\(init='pissa'\)"):
        fastlora.apply_lora(copy.deepcopy(net), target_modules=["0"], init="pissa")

    class Scaled(nn.Embedding):
        def forward(self, x):
            return super().forward(x) * 3.0

    with pytest.raises(TypeError, match=r"Scaled overrides torch.nn.modules.sparse.Embedding.forward"):
        fastlora.apply_lora(nn.Sequential(Scaled(5, 4)), target_modules=["0"])
    with pytest.raises(TypeError, match="embedding must be an nn.Embedding"):
        LoRAEmbedding.from_embedding(nn.Linear(3, 4))
