"""Every engine in the registry through the same checks: the protocol is complete, the CLI offers it, and a
real run on one rank matches the single-process reference, halts, resumes and exports stock GPT-2."""

import inspect

import pytest
from transformers import GPT2LMHeadModel

from conftest import assert_checkpoint_size, launch, reference_run, run_inprocess, tiny_args, train_losses
from greentext_dist.config import build_parser
from greentext_dist.engines import ENGINES, Engine, EngineSpec, ddp, deepspeed, fsdp

RUN = ["--global-batch-size", "4", "--micro-batch-size", "2", "--max-steps", "4", "--eval-every", "2", "--lr", "1e-3"]
CLASSES = {"ddp": ddp.DDPEngine, "zero2": deepspeed.DeepSpeedEngine, "zero3": deepspeed.DeepSpeedEngine, "fsdp": fsdp.FSDPEngine}


def protocol_methods():
    return {n for n, v in vars(Engine).items() if inspect.isfunction(v)}


def test_registry_is_the_one_list_of_engines():
    assert set(CLASSES) == set(ENGINES), "a new engine needs an entry in CLASSES here too"
    backend = next(a for a in build_parser()._actions if a.dest == "train.backend")
    assert backend.choices == ["auto", *ENGINES]
    for name, spec in ENGINES.items():
        assert isinstance(spec, EngineSpec) and callable(spec.build), name
        missing = {m for m in protocol_methods() if not callable(getattr(CLASSES[name], m, None))}
        assert not missing, f"{name} lacks {missing}"
        sig = inspect.signature(spec.build)
        assert list(sig.parameters) == ["cfg", "env", "grad_accum", "weights", "config"], name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory, RUN)[:2]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ENGINES))
def test_engine_contract(reference, tmp_path, name, capfd):
    data, ref = reference
    out = tmp_path / name

    def run(args: list[str]) -> str:
        """One process: a fresh one for DeepSpeed (it keeps process-wide state), this one for the others."""
        if ENGINES[name].build.__module__.endswith("deepspeed"):
            p = launch(args, launcher="python")
            code, err = p.returncode, p.stderr
        else:
            capfd.readouterr()
            code, err = run_inprocess(args), capfd.readouterr().err
        assert code == 0, err[-3000:]
        return err

    args = tiny_args(data, out, *RUN, "--backend", name)
    assert "halted after step 2" in run([*args, "--halt-at-step", "2"])
    assert "resuming from" in run(args)
    got = train_losses(out)
    assert len(got) == 4 and max(abs(a - b) for a, b in zip(got, ref)) <= 1e-4
    assert_checkpoint_size(out, name, "fp32")
    model = GPT2LMHeadModel.from_pretrained(out / "final")
    assert model.config.vocab_size == 50257 and model.config.n_layer == 2
