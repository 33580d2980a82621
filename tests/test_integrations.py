"""transformers' Trainer with fastlora: each checkpoint gets the adapter in
PEFT's format, and it reloads onto a fresh base model to the same outputs."""

from __future__ import annotations

import pytest
import torch

import fastlora

transformers = pytest.importorskip("transformers", reason="needs transformers (pip install -e '.[test]')")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")


def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        ids = torch.arange(i, i + 12) % 61
        return {"input_ids": ids, "labels": ids}


def test_trainer_checkpoints_reload(tmp_path):
    from fastlora.integrations import AdapterCheckpointCallback

    model = fastlora.apply_lora(tiny_llama(), r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, save_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, logging_steps=100, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[AdapterCheckpointCallback()])
    trainer.train()
    folder = tmp_path / "checkpoint-3" / "adapter"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    reloaded = fastlora.load_adapter(tiny_llama(), folder).eval()
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        got, want = reloaded(ids).logits, model.eval()(ids).logits
        assert (want - tiny_llama()(ids).logits).abs().max() > 1e-4  # training moved the adapters
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # the same weights and ops: fp32 rounding only
