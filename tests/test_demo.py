"""``fastlora demo``, run in-process with a few epochs: parameter counts, table
shapes, the merge, the JSON object and the text sections; and the ``fastlora``
command itself (``--help``, ``--version``, errors), in-process and as a process.

The full default run (100 epochs, the accuracy figures) is too slow for the suite;
these runs check the arithmetic and the plumbing, which do not depend on epochs.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastlora
from fastlora import demo
from fastlora.__main__ import COMMANDS
from fastlora.__main__ import main as cli_main
from fastlora.demo import output, settings, variants

SHAPES = {"fc1": (128, 256), "fc2": (256, 256), "fc3": (256, 10)}  # (in, out)
BASE_PARAMS = sum(i * o + o for i, o in SHAPES.values())
RANKS = (1, 4, 8, 16, 32, 64)
# The reference backend is forced (conftest sets TRITON_INTERPRET=1, under which
# "auto" would pick the slow interpreter); few epochs keep each run ~2-4 s.
QUICK = ["--epochs", "3", "--rank-epochs", "1", "--pretrain-epochs", "1", "--backend", "reference", "--no-progress"]


def lora_params(r: int, shapes=SHAPES) -> int:
    return sum(r * (i + o) for i, o in shapes.values())


def run_demo(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = demo.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def json_run():
    code, out, err = run_demo(QUICK + ["--json"])
    assert code == 0, err
    return json.loads(out)  # stdout holds one JSON object and nothing else


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    plot = tmp_path_factory.mktemp("plot") / "curves.png"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
        mp.setitem(sys.modules, "matplotlib.figure", None)
        code, out, err = run_demo(QUICK + ["--plot", str(plot)])
    assert code == 0, err
    return out, plot


def test_base_network_parameters(json_run):
    assert BASE_PARAMS == 101_386
    base = json_run["base"]
    assert base["parameters"] == 101_386
    assert base["layers"] == {name: i * o + o for name, (i, o) in SHAPES.items()}
    assert 0.0 <= base["task_a_accuracy"] <= 1.0


def test_lora_parameters(json_run):
    lora = json_run["lora"]
    assert [layer["trainable"] for layer in lora["layers"]] == [3_072, 4_096, 2_128]
    assert [layer["trainable"] for layer in lora["layers"]] == [8 * (i + o) for i, o in SHAPES.values()]
    assert lora["trainable"] == 9_296 == lora_params(8)
    assert lora["count_parameters"] == {"trainable": 9_296, "total": BASE_PARAMS + 9_296}
    assert lora["base_frozen"] is True
    assert round(lora["reduction_pct"], 1) == 90.8
    assert round(lora["compression"], 1) == 10.9
    assert json_run["accuracy"]["full_finetune_trainable"] == BASE_PARAMS


def test_task_b_change_is_low_rank(json_run):
    delta = json_run["task_b"]["delta"]
    rank = settings.DELTA_RANK
    assert [delta[name]["rank"] for name in SHAPES] == [rank, rank, rank + 1]
    assert json_run["task_b"]["train_samples"] == 1_000
    assert json_run["task_b"]["val_samples"] == 200


def test_rank_table(json_run):
    rows = json_run["rank_comparison"]["rows"]
    assert [row["rank"] for row in rows] == list(RANKS)
    for row in rows:
        expected = lora_params(row["rank"])
        assert row["trainable"] == expected
        assert row["compression"] == pytest.approx(BASE_PARAMS / expected)
        assert row["memory_savings_pct"] == pytest.approx(100 * (1 - expected / BASE_PARAMS))
        assert 0.0 <= row["val_accuracy"] <= 1.0
    assert (rows[0]["trainable"], rows[-1]["trainable"]) == (1_162, 74_368)
    assert [round(row["compression"], 1) for row in rows] == [87.3, 21.8, 10.9, 5.5, 2.7, 1.4]


def test_training_history(json_run):
    training = json_run["training"]
    history = training["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert set(history[0]) == {"epoch", "train_loss", "val_loss", "grad_norm", "epoch_time_s"}
    assert all(h["grad_norm"] > 0 and h["epoch_time_s"] > 0 for h in history)
    assert training["final_train_loss"] == history[-1]["train_loss"]
    assert training["best_val_loss"] == min(h["val_loss"] for h in history)
    assert training["base_weights_unchanged"] is True
    assert training["final_train_loss"] < training["initial_train_loss"]


def test_merge_matches_unmerged(json_run):
    merge = json_run["merge"]
    # Merged and unmerged compute the same math with roundings in other places:
    # a few float32 ulp at the outputs' magnitude (4 ulp; measured ~1).
    assert merge["max_abs_diff"] <= 4 * torch.finfo(torch.float32).eps * merge["max_abs_output"]
    assert merge["parameters"] == BASE_PARAMS
    assert merge["same_as_base"] is True
    assert merge["val_accuracy"] == json_run["accuracy"]["lora_val_accuracy"]


def test_json_config(json_run):
    config = json_run["config"]
    assert (config["input_size"], config["hidden_size"], config["output_size"]) == (128, 256, 10)
    assert (config["rank"], config["alpha"], config["backend"], config["variant"]) == (8, 8.0, "reference", "lora")
    assert json_run["plot"] is None


def test_text_sections(text_run):
    out, _ = text_run
    titles = [
        "1. Configuration",
        "2. Base network, pretrained on task A",
        "3. Task B",
        "4. Applying LoRA adapters",
        "5. Training the LoRA adapters on task B",
        "6. Loss curve",
        "7. Validation accuracy on task B",
        "8. Merging the LoRA adapters",
        "9. Rank comparison",
    ]
    positions = [out.index("\n" + title) for title in titles]
    assert positions == sorted(positions)
    for figure in ("101,386", "3,072", "4,096", "2,128", "9,296", "90.8 %", "10.9x", "Base frozen:             yes"):
        assert figure in out


def test_text_tables(text_run):
    out, _ = text_run
    training_rows = re.findall(r"^ +(\d+) \| +\d+\.\d{4} \| +\d+\.\d{4} \| +\d+\.\d{6} \| +\d+\.\d ms$", out, re.M)
    assert training_rows == ["1", "2", "3"]
    rank_rows = re.findall(r"^ +(\d+) \| +([\d,]+) \| +([\d.]+)x \| +([\d.]+) % \| +[\d.]+ %$", out, re.M)
    assert [int(r) for r, *_ in rank_rows] == list(RANKS)
    assert [int(n.replace(",", "")) for _, n, *_ in rank_rows] == [lora_params(r) for r in RANKS]
    assert [s for *_, s in rank_rows] == ["98.85", "95.42", "90.83", "81.66", "63.32", "26.65"]
    accuracy_rows = [
        line for line in out.splitlines() if re.match(r"^  (base network|LoRA r=8|full fine-tuning,)", line)
    ]
    assert len(accuracy_rows) == 3


def test_text_matches_json_run(text_run, json_run):
    # Same seed, two runs: the same figures (the demo is deterministic on CPU).
    out, _ = text_run
    lora = re.search(r"^  LoRA r=8, 3 epochs +\| +9,296 \| +([\d.]+) %", out, re.M)
    assert float(lora.group(1)) == round(100 * json_run["accuracy"]["lora_val_accuracy"], 1)
    final = re.search(r"final loss +([\d.]+)", out)
    assert float(final.group(1)) == round(json_run["training"]["final_train_loss"], 4)


def test_plot_without_matplotlib(text_run):
    out, plot = text_run
    assert "matplotlib is not installed" in out
    assert not plot.exists()


def test_ascii_curve_shape():
    lines = output.ascii_curve({"train": ("*", [3.0, 1.0, 0.5, 0.2]), "val": ("o", [3.0, 1.2, 0.9, 0.8])}, height=8)
    assert len(lines) == 8 + 3
    assert lines[0].lstrip().startswith("3 |")
    assert all("|" in line for line in lines[:8])


def test_bad_arguments():
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(io.StringIO()):
        demo.main(["--rank", "0"])
    assert exc.value.code == 2


def test_qlora_missing(monkeypatch):
    monkeypatch.setattr(variants, "qlora_class", lambda: None)
    code, out, err = run_demo(["--variant", "qlora"])
    assert code == 2
    assert "QLoRA is not available in this build" in err
    assert out == ""


def test_qlora_variant():
    pytest.importorskip("fastlora.qlora")
    argv = ["--variant", "qlora", "--epochs", "1", "--rank-epochs", "0", "--pretrain-epochs", "1"]
    code, out, err = run_demo(argv + ["--backend", "reference", "--json"])
    assert code == 0, err
    result = json.loads(out)
    assert result["lora"]["trainable"] == 9_296
    assert result["lora"]["base_frozen"] is True
    before = result["qlora"]["base_weight_bytes_before"]
    assert before == 4 * sum(i * o for i, o in SHAPES.values())
    assert result["qlora"]["base_weight_bytes_after"] < before / 6  # 4 bits + scales vs 32 bits
    assert result["merge"]["parameters"] == BASE_PARAMS
    assert result["merge"]["max_abs_diff"] < 1e-4


# --------------------------------------------------------------------------- variants

# One in-process run per variant, tiny epochs (the figures checked here do not depend on them).
TINY = ["--epochs", "1", "--rank-epochs", "0", "--pretrain-epochs", "1", "--backend", "reference", "--no-progress"]
OUTS = [o for _, o in SHAPES.values()]
ADALORA_INIT_R, ADALORA_TARGET_R = 12, 8  # the demo's default: init_r 12 pruned to LoRA r=8's budget


def expected_trainable(variant: str, r: int) -> list[int]:
    """Per-layer trainable counts, computed from the layer shapes alone."""
    if variant == "vera":
        return [r + o for o in OUTS]  # lambda_d [r] + lambda_b [out]
    if variant == "adalora":
        return [r * (i + o + 1) for i, o in SHAPES.values()]  # A [r, in] + E [r, 1] + B [out, r], r = init_r
    lora = [r * (i + o) for i, o in SHAPES.values()]  # A [r, in] + B [out, r]
    if variant in ("dora", "qdora"):
        return [n + o for n, o in zip(lora, OUTS)]  # + the magnitude m [out]
    return lora


@pytest.fixture(scope="module")
def variant_runs():
    """JSON of each variant's tiny run (built lazily, once per variant)."""
    runs: dict[str, dict] = {}

    def get(variant: str) -> dict:
        if variant not in runs:
            code, out, err = run_demo(["--variant", variant, "--json"] + TINY)
            assert code == 0, err
            runs[variant] = json.loads(out)
        return runs[variant]

    return get


VARIANT_CASES = ["dora", "qdora", "vera", "loraplus", "pissa", "olora", "adalora"]


@pytest.mark.parametrize("variant", VARIANT_CASES)
def test_variant_parameter_counts(variant_runs, variant):
    if variant == "qdora":
        pytest.importorskip("fastlora.qlora")
    result = variant_runs(variant)
    r = 256 if variant == "vera" else 8
    per_layer = expected_trainable(variant, ADALORA_INIT_R if variant == "adalora" else r)
    lora = result["lora"]
    assert result["config"]["variant"] == variant
    assert result["config"]["rank"] == r
    assert [layer["trainable"] for layer in lora["layers"]] == per_layer
    assert lora["trainable"] == sum(per_layer)
    assert lora["count_parameters"]["trainable"] == sum(per_layer)
    if variant != "qdora":  # NF4 weights are buffers, not parameters
        assert lora["count_parameters"]["total"] == BASE_PARAMS + sum(per_layer)
    assert lora["base_frozen"] is True
    assert lora["compression"] == pytest.approx(BASE_PARAMS / sum(per_layer))
    if variant in ("dora", "qdora"):
        assert [layer["magnitude"] for layer in lora["layers"]] == OUTS
        assert sum(per_layer) == lora_params(8) + sum(OUTS) == 9_818
    if variant == "vera":
        assert [(layer["lambda_d"], layer["lambda_b"]) for layer in lora["layers"]] == [(256, o) for o in OUTS]
        assert sum(per_layer) == 3 * 256 + sum(OUTS) == 1_290
        # One shared projection pair sized to the largest layer: [r, max in], [max out, r].
        assert result["vera"]["vera_A_shape"] == [256, 256]
        assert result["vera"]["vera_B_shape"] == [256, 256]
    if variant == "adalora":
        assert [(layer["lora_A"], layer["lora_E"], layer["lora_B"]) for layer in lora["layers"]] == [
            (ADALORA_INIT_R * i, ADALORA_INIT_R, o * ADALORA_INIT_R) for i, o in SHAPES.values()
        ]
        assert per_layer == [4_620, 6_156, 3_204]
        assert sum(per_layer) == 13_980
    # Merging leaves a plain network with the base's parameter count and the same outputs.
    merge = result["merge"]
    assert merge["parameters"] == BASE_PARAMS
    assert merge["max_abs_diff"] <= 8 * torch.finfo(torch.float32).eps * merge["max_abs_output"]
    assert merge["val_accuracy"] == result["accuracy"]["lora_val_accuracy"]
    training = result["training"]
    assert training["final_train_loss"] < training["initial_train_loss"]
    assert training["base_weights_unchanged"] is (None if variant == "qdora" else True)


@pytest.mark.parametrize("variant", ["pissa", "olora"])
def test_residual_init_variants_start_at_the_base(variant_runs, variant):
    result = variant_runs(variant)
    assert result["config"]["init"] == variant
    assert result["lora"]["base_replaced_by_residual"] is True
    # The base weights became the residual, yet the adapted model computes the base network.
    diff = result["lora"]["initial_output_max_abs_diff_vs_base"]
    assert 0 < diff <= 8 * torch.finfo(torch.float32).eps * result["merge"]["max_abs_output"]


def test_vera_defaults_and_lora_only_rank_table(variant_runs):
    result = variant_runs("vera")
    config = result["config"]
    assert (config["rank"], config["learning_rate"]) == (settings.VERA_RANK, settings.VERA_LR) == (256, 1e-2)
    assert "PEFT's default" in config["rank_default_note"]
    table = result["rank_comparison"]
    assert table["variant"] == "lora"
    assert [row["trainable"] for row in table["rows"]] == [lora_params(r) for r in RANKS]
    # VeRA starts as the base network exactly (lambda_b = 0).
    assert result["lora"]["initial_output_max_abs_diff_vs_base"] == 0.0


def test_dora_rank_table_counts_magnitudes(variant_runs):
    rows = variant_runs("dora")["rank_comparison"]["rows"]
    assert [row["trainable"] for row in rows] == [lora_params(r) + sum(OUTS) for r in RANKS]


def test_loraplus_uses_the_loraplus_optimizer(monkeypatch):
    calls = []
    real = variants.create_loraplus_optimizer

    def spy(model, optimizer_cls, lr, ratio=16.0, **kwargs):
        opt = real(model, optimizer_cls, lr=lr, ratio=ratio, **kwargs)
        calls.append((optimizer_cls, lr, ratio, [g["lr"] for g in opt.param_groups if g["params"]]))
        return opt

    monkeypatch.setattr(variants, "create_loraplus_optimizer", spy)
    code, out, err = run_demo(["--variant", "loraplus"] + TINY)
    assert code == 0, err
    assert calls == [(torch.optim.Adam, 1e-3, 16.0, [1e-3, 16e-3])]  # lora_A at lr, lora_B at 16 lr
    assert "create_loraplus_optimizer(model, Adam, lr, ratio=16)" in out
    assert re.search(r"^  This table compares plain LoRA ranks", out, re.M)
    assert "Total LoRA+ parameters:  9,296" in out


def test_dora_text_reports_magnitudes():
    code, out, err = run_demo(["--variant", "dora"] + TINY)
    assert code == 0, err
    assert "4. Applying DoRA adapters" in out
    rows = re.findall(r"^  (fc\d) +\| DoRALinear +\| [\d >-]+ \| +(A \d+x\d+ \+ B \d+x\d+ \+ m (\d+)) \| +([\d,]+)$", out, re.M)
    assert [(name, int(m), int(n.replace(",", ""))) for name, _, m, n in rows] == [
        (name, o, t) for name, o, t in zip(SHAPES, OUTS, expected_trainable("dora", 8))
    ]
    assert "of which magnitudes m:   522" in out


def test_pissa_rank_too_large_is_a_clear_error():
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(io.StringIO()) as err:
        demo.main(["--variant", "pissa", "--rank", "16"])
    assert exc.value.code == 2
    assert "--rank must be <= 10" in err.getvalue()


def _adalora_steps(epochs: int, batch_size: int) -> int:
    """The demo's total_step: epochs x mini-batches per epoch (1,000 training samples)."""
    return epochs * -(-1_000 // batch_size)


def _check_adalora_budget(result: dict, epochs: int, batch_size: int) -> None:
    ada = result["adalora"]
    total_step = _adalora_steps(epochs, batch_size)
    assert (ada["init_r"], ada["target_r"]) == (ADALORA_INIT_R, ADALORA_TARGET_R)
    assert ada["total_step"] == total_step
    assert ada["steps_per_epoch"] * epochs == total_step
    assert ada["tfinal"] >= 1 and ada["tinit"] + ada["tfinal"] < total_step
    assert (ada["initial_budget"], ada["target_budget"]) == (3 * ADALORA_INIT_R, 3 * ADALORA_TARGET_R)
    # One budget entry per epoch, at the epoch's last step; the budget only shrinks.
    budget = ada["budget"]
    assert [e["epoch"] for e in budget] == list(range(1, epochs + 1))
    assert [e["step"] for e in budget] == [total_step * e // epochs - 1 for e in range(1, epochs + 1)]
    assert all(a["budget"] >= b["budget"] for a, b in zip(budget, budget[1:]))
    for e in budget:
        assert e["total_active"] == sum(e["active_ranks"].values()) <= e["budget"]
        assert all(0 <= e["active_ranks"][n] <= ADALORA_INIT_R for n in SHAPES)
    # The last step is past total_step - tfinal: the final pattern holds target_r x 3 triplets.
    assert ada["final_step"] == total_step - ada["tfinal"] <= total_step - 1
    assert ada["final_pattern_reached"] is True
    assert budget[-1]["budget"] == 3 * ADALORA_TARGET_R
    assert ada["final_total_active"] == budget[-1]["total_active"] == 3 * ADALORA_TARGET_R
    pattern = ada["final_rank_pattern"]
    assert {n: len(pattern[n]) for n in SHAPES} == {n: ADALORA_INIT_R for n in SHAPES}
    assert {n: sum(pattern[n]) for n in SHAPES} == ada["final_active_ranks"]
    assert ada["val_accuracy"] == result["accuracy"]["lora_val_accuracy"]
    assert ada["merge_max_abs_diff"] == result["merge"]["max_abs_diff"]


def test_adalora_reaches_the_target_budget(variant_runs):
    result = variant_runs("adalora")  # TINY: 1 epoch of 20 steps
    assert result["config"]["variant"] == "adalora"
    _check_adalora_budget(result, epochs=1, batch_size=50)
    # The rank comparison is LoRA-only for AdaLoRA, and the adapted model starts as the base (E = 0).
    assert result["rank_comparison"]["variant"] == "lora"
    assert result["lora"]["initial_output_max_abs_diff_vs_base"] == 0.0


def test_adalora_budget_shrinks_over_epochs():
    # 3 epochs of 4 steps: the budget falls from 36 during training and ends at 24.
    argv = ["--variant", "adalora", "--json"] + TINY + ["--epochs", "3", "--batch-size", "250"]
    code, out, err = run_demo(argv)
    assert code == 0, err
    result = json.loads(out)
    _check_adalora_budget(result, epochs=3, batch_size=250)
    budgets = [e["budget"] for e in result["adalora"]["budget"]]
    assert 3 * ADALORA_INIT_R > budgets[0] and budgets[-1] == 3 * ADALORA_TARGET_R


def test_adalora_text_reports_ranks():
    code, out, err = run_demo(["--variant", "adalora"] + TINY)
    assert code == 0, err
    assert "4. Applying AdaLoRA adapters" in out
    row = r"^  (fc\d) +\| AdaLoRALinear +\| [\d >-]+ \| +A 12x(\d+) \+ E 12 \+ B (\d+)x12 \| +([\d,]+)$"
    rows = re.findall(row, out, re.M)
    assert [(name, int(i), int(o), int(n.replace(",", ""))) for name, i, o, n in rows] == [
        (name, i, o, t) for (name, (i, o)), t in zip(SHAPES.items(), expected_trainable("adalora", ADALORA_INIT_R))
    ]
    assert "Total AdaLoRA parameters:  13,980" in out
    # The training table's extra column: active ranks fc1/fc2/fc3 (sum) after the epoch.
    training_rows = re.findall(r"^ +1 \| .* ms \| +(\d+)/(\d+)/(\d+) \((\d+)\)$", out, re.M)
    assert len(training_rows) == 1
    *ranks, total = map(int, training_rows[0])
    assert sum(ranks) == total == 3 * ADALORA_TARGET_R
    pattern = re.findall(r"^    (fc\d)  ([#.]{12}) +(\d+) of 12$", out, re.M)
    assert [name for name, *_ in pattern] == list(SHAPES)
    assert [m.count("#") for _, m, _ in pattern] == [int(k) for *_, k in pattern] == ranks
    assert "merge_adalora(model)" in out
    assert re.search(r"^  AdaLoRA r=12->8, 1 epochs? +\| +13,980 \|", out, re.M)


def test_adalora_needs_two_steps():
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(io.StringIO()) as err:
        demo.main(["--variant", "adalora", "--epochs", "1", "--batch-size", "1000"])
    assert exc.value.code == 2
    assert "at least 2 training steps" in err.getvalue()


# --------------------------------------------------------------------------- the fastlora command

def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(argv)
    return code, out.getvalue(), err.getvalue()


def test_cli_help_lists_every_command():
    code, out, err = run_cli(["--help"])
    assert (code, err) == (0, "")
    assert out.startswith("usage: fastlora <command> [options]\n")
    for name, (summary, _) in COMMANDS.items():
        assert re.search(rf"^  {name} +{re.escape(summary)}$", out, re.M), name  # one line per command
    assert "demo" in COMMANDS
    assert re.search(r"^  -V, --version ", out, re.M) and re.search(r"^  -h, --help ", out, re.M)
    assert run_cli(["-h"])[1] == out


def test_cli_version_matches_the_package_metadata():
    code, out, err = run_cli(["--version"])
    assert (code, out, err) == (0, f"fastlora {fastlora.__version__}\n", "")
    assert run_cli(["-V"])[1] == out
    assert importlib.metadata.version("fastlora") == fastlora.__version__  # pyproject and __init__ agree


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "a command is required (demo)"),
        (["bogus"], "unknown command 'bogus' (commands: demo)"),
        (["--bogus"], "unknown option '--bogus'"),
    ],
)
def test_cli_errors_exit_2(argv, message):
    code, out, err = run_cli(argv)
    assert (code, out) == (2, "")
    assert err.startswith("usage: fastlora <command> [options]\n")
    assert f"fastlora: error: {message}" in err
    assert "see 'fastlora --help'" in err


def test_cli_passes_the_rest_to_the_command(monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "main", lambda argv, prog: calls.append((argv, prog)) or 7)
    assert run_cli(["demo", "--rank", "4", "--json"])[0] == 7  # the command's status is the process's
    assert calls == [(["--rank", "4", "--json"], "fastlora demo")]


def test_cli_demo_help_lists_the_demo_options():
    out = io.StringIO()
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stdout(out):
        cli_main(["demo", "--help"])
    assert exc.value.code == 0
    text = out.getvalue()
    assert text.startswith("usage: fastlora demo ")
    options = ["--rank", "--alpha", "--epochs", "--lr", "--seed", "--device", "--backend", "--variant", "--plot",
               "--json", "--no-progress", "--rank-epochs", "--pretrain-epochs", "--threads", "--batch-size"]
    assert sorted(re.findall(r"^  (--[a-z-]+)", text, re.M)) == sorted(options)


CONSOLE_SCRIPT = Path(sys.executable).with_name("fastlora")


@pytest.mark.skipif(not CONSOLE_SCRIPT.exists(), reason="the fastlora console script is not installed next to python")
@pytest.mark.parametrize(
    "command, code, stream, expected",
    [
        ([str(CONSOLE_SCRIPT), "--version"], 0, "stdout", f"fastlora {fastlora.__version__}\n"),
        ([str(CONSOLE_SCRIPT), "bogus"], 2, "stderr", "fastlora: error: unknown command 'bogus'"),
        ([sys.executable, "-m", "fastlora", "--help"], 0, "stdout", "usage: python -m fastlora <command> [options]"),
    ],
)
def test_cli_as_a_process(tmp_path, command, code, stream, expected):
    # Run outside the repository: its top-level kernels/ folder must not be on sys.path.
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == code, done.stderr
    assert expected in getattr(done, stream)


# --------------------------------------------------------------------------- --variant multi


def test_multi_variant_trains_every_task_together_as_one_after_the_other():
    """Three tasks' adapters trained in mixed batches against one after the other with
    the same batches: the same accuracies, each adapter better than the base on its task,
    and mixed-batch inference equal to each adapter alone."""
    code, out, err = run_demo(["--variant", "multi", "--json", "--epochs", "2"] + TINY[2:])
    assert code == 0, err
    result = json.loads(out)
    assert result["config"]["variant"] == "multi" and result["config"]["tasks"] == 3
    training = result["multi_training"]
    assert training["steps_one_by_one"] == 3 * training["steps_together"] == 3 * 2 * 20
    # each adapter's gradient is its own task's in both runs: only float32 rounding of the
    # summation order can differ (parameters O(0.1), 40 Adam steps of lr 1e-3)
    assert training["max_param_diff"] <= 1e-5
    for name, acc in result["accuracy"].items():
        # rounding-level parameter differences can flip at most a borderline sample or two of 200
        assert abs(acc["together"] - acc["one_by_one"]) <= 2 / 200, name
        assert acc["together"] > acc["base"] + 0.05, f"{name}: the adapter does not beat the base"
    inference = result["mixed_inference"]
    assert inference["rows"] == 3 * 200 + 50
    # the same adapters through one multi-adapter call vs row subsets: float32 rounding of logits O(10)
    assert inference["max_logit_diff_vs_same_adapters"] <= 1e-4
    assert inference["argmax_agreement_vs_one_by_one"] >= 0.99


def test_multi_variant_text_and_default_epochs():
    args = demo.build_parser().parse_args(["--variant", "multi"])
    demo._check_args(demo.build_parser(), args)
    assert args.epochs == settings.MULTI_EPOCHS
    code, out, err = run_demo(["--variant", "multi", "--epochs", "1"] + TINY[2:])
    assert code == 0, err
    for title in ("3. Tasks B1-B3", "4. One adapter per task", "5. Training the adapters together",
                  "6. Validation accuracy per task", "7. Mixed-batch inference"):  # fmt: skip
        assert title in out
    assert "8. " not in out  # no merge / rank comparison sections
