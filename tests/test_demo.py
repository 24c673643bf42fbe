"""`shockmon demo` end to end, its summary, and the LightningCLI configs that reproduce it."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from shockmon import cli, demo
from shockmon.events import EventKind, ShockEvent

torch.set_num_threads(1)

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*smaller than the logging interval:UserWarning",
    "ignore:.*LeafSpec.*",
    "ignore:.*args parameter is intended to run from within Python.*",
    "ignore::DeprecationWarning:lightning.pytorch.cli",  # jsonargparse 4.49+ deprecations inside LightningCLI
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
needs_jsonargparse = pytest.mark.skipif(
    importlib.util.find_spec("jsonargparse") is None, reason="LightningCLI needs jsonargparse[signatures]"
)


def test_demo_runs_end_to_end(tmp_path, capsys):
    code = cli.main(["demo", "--steps", "30", "--out", str(tmp_path), "--threads", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    assert "shockmon demo: grokking (a + b) mod 97 with a mlp, 30 steps on cpu" in out
    assert "train accuracy >= 0.99 (fit):" in out and "test accuracy  >= 0.90 (jumped):" in out
    assert "alerts:" in out
    assert f"TensorBoard: tensorboard --logdir {tmp_path}" in out
    events = list((tmp_path / "grokking_mlp").glob("version_0/events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_demo_transformer_variant_runs(tmp_path):
    threads, flush = torch.get_num_threads(), demo.flush_denormal_on()
    torch.set_flush_denormal(False)
    result = demo.run_demo(
        steps=4,
        out=str(tmp_path),
        device="cpu",
        model="transformer",
        eval_every=2,
        log_every=2,
        progress_bar=False,
        threads=threads + 1,  # differs from the caller's: restored on return
    )
    assert result.steps == 4 and result.model == "transformer"
    assert "attention" in result.symmetry_report
    assert torch.get_num_threads() == threads  # the demo's thread count is its own
    assert not demo.flush_denormal_on()  # and so is flushing subnormal floats
    torch.set_flush_denormal(flush)


def test_demo_flush_denormal_probe_reads_the_setting():
    before = demo.flush_denormal_on()
    try:
        for on in (True, False, True):
            torch.set_flush_denormal(on)
            assert demo.flush_denormal_on() is on
    finally:
        torch.set_flush_denormal(before)


def test_demo_history_and_split():
    xtr, ytr, xte, yte = demo.modular_addition(97, 0.5, seed=0)
    assert len(xtr) == 4704 and len(xte) == 4705
    pairs = {tuple(r) for r in xtr.tolist()} & {tuple(r) for r in xte.tolist()}
    assert not pairs  # disjoint
    assert demo._first([(10, 0.5, 0.0), (20, 0.995, 0.2), (30, 1.0, 0.95)], 1, 0.99) == 20
    assert demo._first([(10, 0.5, 0.0)], 2, 0.9) is None


def test_demo_summary_names_alerts_and_their_lead():
    events = [
        ShockEvent(EventKind.FORECAST, "rescale/net.mlp.0", "particle", 480, 640.0, 7.5, (3,)),
        ShockEvent(EventKind.SHOCK, "rescale/net.mlp.0", "particle", 655, 655.0, 9.0, (3,)),
    ]
    r = demo.DemoResult(
        "mlp",
        1200,
        "cpu",
        41.0,
        fit_step=260,
        jump_step=610,
        final_train_acc=1.0,
        final_test_acc=1.0,
        events=events,
        log_dir="runs/grokking_mlp/version_0",
    )
    text = demo.format_summary(r)
    assert "(fit):     step 260" in text and "(jumped):  step 610" in text
    assert "alerts: 2 (1 forecast, 1 shock)" in text
    assert (
        "step   480  forecast   rescale/net.mlp.0 (particle), predicted shock at step 640  130 steps before"
        in text
    )
    assert "45 steps after the jump" in text
    assert (
        "warned before the jump (step 610): 1 alert(s) within 200 steps, the first a forecast at step 480"
        " (130 steps ahead); closest predicted step 640" in text
    )
    assert "warned before the fit (step 260): no alert in the 200 steps before it" in text
    late = demo.DemoResult("mlp", 1200, "cpu", 41.0, 260, 610, 1.0, 1.0, events=events[1:], horizon=100)
    assert "warned before the jump (step 610): no alert in the 100 steps before it" in demo.format_summary(
        late
    )
    assert "tensorboard --logdir runs/grokking_mlp" in text
    none = demo.DemoResult("mlp", 10, "cpu", 1.0, None, None, math.nan, math.nan)
    assert "not reached (run longer: --steps)" in demo.format_summary(none)
    assert "alerts: none" in demo.format_summary(none)


def test_cli_choices_match_the_demo():
    assert cli.DEMO_MODELS == demo.MODELS and cli.DEMO_DEVICES == demo.DEVICES
    assert cli.DEMO_DEFAULT_STEPS == {m: d["steps"] for m, d in demo.DEFAULTS.items()}


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--steps", "0"])
    assert "expected a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--model", "cnn"])
    with pytest.raises(SystemExit):
        cli.main([])  # a subcommand is required


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_demo_cuda_without_gpu_is_a_clear_error(capsys, tmp_path):
    assert cli.main(["demo", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


@needs_jsonargparse
def test_lightning_cli_config_reproduces_the_demo(tmp_path):
    from shockmon import ShockEarlyStopping, ShockMonitor

    result = demo.cli_main(
        [
            "fit",
            "--config",
            str(CONFIGS / "grokking_mlp.yaml"),
            "--trainer.max_steps=20",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    trainer = result.trainer
    assert trainer.global_step == 20
    kinds = {type(cb) for cb in trainer.callbacks}
    assert ShockMonitor in kinds and ShockEarlyStopping in kinds
    assert "shockmon/steps_to_shock" in trainer.callback_metrics
    assert list(tmp_path.glob("grokking_mlp_cli/version_0/events.out.tfevents.*"))


@needs_jsonargparse
def test_lightning_cli_transformer_config_parses():
    result = demo.cli_main(["--config", str(CONFIGS / "grokking_transformer.yaml")], run=False)
    assert isinstance(result.model.net, demo.GrokTransformer)
    assert result.datamodule.train_fraction == 0.4
