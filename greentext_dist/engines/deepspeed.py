"""DeepSpeed ZeRO-2 / ZeRO-3. Batch sizes, precision and clipping come from our config; a DeepSpeed JSON file
(ds_configs/ or --ds-config) supplies the ZeRO knobs and may only repeat, never contradict, the CLI."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from greentext_dist.config import Config
from greentext_dist.configs import DEEPSPEED
from greentext_dist.dist import DistEnv, destroy_with, on_main
from greentext_dist.errors import UserError
from greentext_dist.engines.base import EngineSpec, Traffic, buckets
from greentext_dist.files import derived
from greentext_dist.lora import adapted
from greentext_dist.model import apply_compile, build_model, lm_logits, pad_vocab, save_hf, true_vocab

log = logging.getLogger(__name__)
DS_CONFIGS = DEEPSPEED  # shipped in the package; ds_configs/ in a clone links here
UNIVERSAL = "universal"  # beside a checkpoint's train_state/: its DeepSpeed state without a world size, made on demand
_hf_ds_config = None  # transformers reads the live HfDeepSpeedConfig through a weak reference: keep it alive


def load_ds_config(cfg: Config, grad_accum: int, world_size: int, hidden: int) -> dict:
    """The DeepSpeed config for this run: the file's settings with every "auto" filled from ours."""
    path = Path(cfg.train.ds_config) if cfg.train.ds_config else DS_CONFIGS / f"{cfg.train.backend}{'_offload' if cfg.train.offload else ''}.json"
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"DeepSpeed config {path} does not exist", "pass an existing JSON file to --ds-config") from None
    except json.JSONDecodeError as e:
        raise UserError(f"DeepSpeed config {path} is not valid JSON (line {e.lineno}: {e.msg})", "fix the JSON syntax") from None
    t = cfg.train
    rows = t.micro_batch_size * grad_accum * world_size  # what DeepSpeed checks: the global batch plus any padding rows
    if ds.get("train_batch_size") == t.global_batch_size:
        ds["train_batch_size"] = rows
    ours = {
        ("train_batch_size",): (rows, "--global-batch-size"),
        ("train_micro_batch_size_per_gpu",): (t.micro_batch_size, "--micro-batch-size"),
        ("gradient_accumulation_steps",): (grad_accum, "--global-batch-size / (--micro-batch-size x ranks), rounded up"),
        ("gradient_clipping",): (cfg.optim.grad_clip, "--grad-clip"),
        ("bf16", "enabled"): (t.precision == "bf16", "--precision"),
        ("zero_optimization", "stage"): (int(t.backend[-1]), "--backend"),
        ("zero_optimization", "reduce_bucket_size"): (hidden * hidden, None),
        ("zero_optimization", "stage3_prefetch_bucket_size"): (int(0.9 * hidden * hidden), None),
        ("zero_optimization", "stage3_param_persistence_threshold"): (10 * hidden, None),
    }
    for keys, (value, flag) in ours.items():
        node = ds
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        have = node.get(keys[-1], "auto")
        if have == "auto" or (flag is None and keys[-1] not in node):
            node[keys[-1]] = value
        elif flag is not None and have != value and not (isinstance(value, float) and float(have) == value):
            raise UserError(
                f"{path} sets {'.'.join(keys)} = {have!r} but {flag} gives {value!r}",
                f"set it to \"auto\" in the file, or change {flag} to match",
            )
    if ds.get("fp16", {}).get("enabled") is True:
        raise UserError(f"{path} enables fp16", "use --precision bf16 (GPT-2 fine-tunes in bf16 without loss scaling)")
    if t.precision == "fp32":
        ds.get("data_types", {}).pop("grad_accum_dtype", None)
    return ds


def prepare_deepspeed(ds_config: dict, device: torch.device) -> None:
    """Before the model is built: hand our process group to deepspeed.comm and, for ZeRO-3, register the
    config so transformers builds/loads the model already partitioned (never whole on any rank)."""
    import deepspeed

    global _hf_ds_config
    # DeepSpeed's ZeRO calls torch collectives by their deprecated names (all_gather_into_tensor, reduce_scatter_tensor):
    # a FutureWarning per rank and name, for nothing the user can act on. Only torch's renaming notices are filtered.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated\. Please use `torch\.distributed\.\w+`",
                            category=FutureWarning)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):  # DeepSpeed print()s "... built successfully" once per rank
            deepspeed.init_distributed()  # wraps the existing torch.distributed group
    except BaseException:
        sys.stdout.write(captured.getvalue())  # what it printed may say why it failed
        raise
    destroy_with(end_run)
    if device.type == "cpu":
        release_shm_names()
    if ds_config["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        _hf_ds_config = HfDeepSpeedConfig(ds_config)


def saved_world(state: Path) -> int:
    """How many data-parallel ranks wrote a DeepSpeed state (each writes its own optimizer partition); 0: none here."""
    return len(list((state / "deepspeed").glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")))


def universal_copy(state: Path) -> Path:
    """A checkpoint's DeepSpeed state in DeepSpeed's universal layout (no world size in it), converted by DeepSpeed's
    own converter and kept as step-N/universal: made whole or not at all (files.derived), so a conversion killed
    halfway is never loaded and a damaged copy is converted again."""
    size = sum(p.stat().st_size for p in state.rglob("*") if p.is_file())
    free = shutil.disk_usage(state.parent).free
    if not (state.parent / UNIVERSAL).is_dir() and free < 1.1 * size:
        raise UserError(f"resuming {state.parent} on another number of ranks converts its DeepSpeed state once, which needs "
                        f"{size / 2**30:.1f} GiB beside it; {free / 2**30:.1f} GiB are free",
                        "free disk space there, or resume on the number of ranks that wrote it")

    def convert(tmp: Path) -> None:
        # In a fresh interpreter: its worker pool forks, which deadlocks in a process that holds a process group and
        # torch's threads. ZeRO-1/2 checkpoints need universal_checkpoint_info, which ours (and most) lack: injected.
        workers = str(min(4, os.cpu_count() or 1))
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(state / "deepspeed"),
               "--output_folder", str(tmp / UNIVERSAL), "--num_extract_workers", workers, "--num_merge_workers", workers,
               "--inject_missing_state"]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if p.returncode != 0:
            raise UserError(f"DeepSpeed could not convert {state} to its universal checkpoint:\n{(p.stdout + p.stderr)[-2000:]}",
                            "resume on the number of ranks that wrote it")

    return derived(state.parent / UNIVERSAL, convert, log.warning)


def end_run() -> None:
    """Leave nothing of this run for a next one in the same process (the Python API, a notebook): DeepSpeed's own
    destroy also forgets the groups it cloned from ours, and transformers forgets the ZeRO-3 config (it would build
    the next model partitioned)."""
    import deepspeed
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    global _hf_ds_config
    _hf_ds_config = None
    unset_hf_deepspeed_config()
    deepspeed.comm.destroy_process_group()


def shm_name(rank: int) -> Path:
    """Where DeepSpeed's CPU all-reduce (deepspeed/ops/csrc/cpu/comm/shm.cpp) keeps one rank's buffer."""
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_{rank}"


def release_shm_names() -> None:
    """On CPU under the `deepspeed` launcher (every rank on one machine), DeepSpeed maps a 66 MB /dev/shm file per
    rank and never unlinks it: each run would keep that much RAM until a reboot. Once every rank has mapped every
    other's (init_distributed returns after that: the barrier waits for all), the names can go; the mappings stay."""
    import torch.distributed as dist

    if "LOCAL_SIZE" in os.environ and dist.is_initialized():
        dist.barrier()
        shm_name(dist.get_rank()).unlink(missing_ok=True)


def build_ds_optimizer(model, cfg, ds_config: dict, device):
    """Our AdamW; with optimizer offload, DeepSpeed's CPU AdamW (same maths, runs on the CPU copies)."""
    from greentext_dist.optim import build_optimizer, param_groups

    if "offload_optimizer" not in ds_config["zero_optimization"]:
        return build_optimizer(model, cfg, device)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, adamw_mode=True)


class DeepSpeedEngine:
    can_skip = False

    def __init__(self, model, optimizer, env: DistEnv, ds_config: dict):
        import deepspeed

        self.env, self.ds_config = env, ds_config
        self.stage = ds_config["zero_optimization"]["stage"]
        self.sharded = self.stage == 3
        self.name = f"deepspeed zero{self.stage}" + (" + offload" if "offload_optimizer" in ds_config["zero_optimization"] else "")
        self.grad_accum = ds_config["gradient_accumulation_steps"]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.module = self.engine.module
        self.vocab = true_vocab(model)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return lm_logits(self.engine, x, position_ids)

    def generation_autocast(self):
        return contextlib.nullcontext()  # the module's weights are bf16 already under bf16

    @contextlib.contextmanager
    def accumulating(self, last: bool):
        yield
        if not last:
            self.engine.step()  # a micro-step: DeepSpeed only counts it, and syncs at the boundary itself

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed divides the loss by the accumulation steps and averages gradients over ranks;
        # our loss is already divided by the step's global token count, so undo both.
        self.engine.backward(loss * (self.grad_accum * self.env.world_size))

    def step(self, grad_clip: float, finite_loss: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The boundary step (DeepSpeed clips and updates), taken only for a finite loss. DeepSpeed has no public
        way to drop a step's gradients, so a non-finite loss stops the run before the update (can_skip False)."""
        if not bool(finite_loss.item()):
            return torch.tensor(float("nan")), False
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32)
        # Non-finite gradients under a finite loss: bf16 ZeRO-2 skips the update itself (check_grad_overflow);
        # other stages may have applied it, so report it as not applied and let the loop stop without saving.
        return norm, bool(torch.isfinite(norm))

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def save_state(self, folder: Path) -> None:
        # LoRA: the frozen base is not state (a resume builds it from its source again).
        with self.trainable_module_state():
            self.engine.save_checkpoint(str(folder), tag="deepspeed", exclude_frozen_parameters=adapted(self.module))

    @contextlib.contextmanager
    def trainable_module_state(self):
        """DeepSpeed drops frozen parameters from the module state by name, so the tied head (the frozen embedding under
        another name) stayed: the whole embedding in every LoRA checkpoint. Tensors of frozen parameters go, by storage."""
        if not adapted(self.module) or self.stage == 3:  # ZeRO-3's module state holds empty placeholders only
            yield
            return
        frozen = {p.data_ptr() for p in self.module.parameters() if not p.requires_grad}
        original = self.engine.module_state_dict

        def trainable(*args, **kwargs):
            return {k: v for k, v in original(*args, **kwargs).items() if v.data_ptr() not in frozen}

        self.engine.module_state_dict = trainable
        try:
            yield
        finally:
            del self.engine.module_state_dict

    def load_state(self, folder: Path) -> None:
        """The checkpoint's state; written by another number of ranks, through DeepSpeed's universal checkpoint: rank 0
        converts it once (kept beside it), every rank loads its own partition of that."""
        # DeepSpeed's own format is pickled (torch.load without weights_only): the one documented exception.
        wrote = saved_world(folder)
        if wrote in (0, self.env.world_size):
            path, _ = self.engine.load_checkpoint(str(folder), tag="deepspeed", load_optimizer_states=True, load_lr_scheduler_states=False,
                                                  load_module_strict=not adapted(self.module))
            if path is None:
                raise UserError(f"no DeepSpeed state in {folder}", "resume from a checkpoint written with a DeepSpeed --backend")
            return
        if self.env.is_main:
            log.warning(f"{folder.parent} was written by {wrote} ranks, this run has {self.env.world_size}: resuming through "
                        f"DeepSpeed's universal checkpoint ({'kept from an earlier resume' if (folder.parent / UNIVERSAL).is_dir() else 'converting it once'}, "
                        f"in {folder.parent / UNIVERSAL})")
        universal = on_main(universal_copy, folder)
        # DeepSpeed's ZeRO-3 universal loader gives every parameter group the hyperparameters of the first: the biases
        # and norms would be decayed. Ours are put back (the learning rate is set every step anyway).
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.engine._config.load_universal_checkpoint = True
        try:
            self.engine.load_checkpoint(str(universal), tag=UNIVERSAL, load_optimizer_states=True, load_lr_scheduler_states=False,
                                        load_module_strict=not adapted(self.module))
        finally:
            # Left on, ZeRO-3 would write only rank 0's model states at the next save (DeepSpeed #7546): the checkpoints
            # this run writes are ordinary ones for its own world size.
            self.engine._config.load_universal_checkpoint = False
        for group, kept in zip(self.optimizer.param_groups, hyper):
            group.update(kept)
        # It also hands every partition the one `step` tensor, which AdamW then advances once per partition (the bias
        # correction runs ahead): each gets its own.
        seen = set()
        for state in getattr(self.engine.optimizer, "optimizer", self.engine.optimizer).state.values():
            if torch.is_tensor(step := state.get("step")):
                if id(step) in seen:
                    state["step"] = step.clone()
                seen.add(id(step))

    def export_hf(self, folder: Path, max_shard_size: str) -> None:
        """Sharded safetensors of the 16-bit (or fp32) weights. Under ZeRO-3 the parameters are gathered one
        module at a time, so no rank ever holds the whole model on the GPU; rank 0 collects them on the CPU."""
        import deepspeed

        if self.stage < 3:
            if self.env.is_main:
                save_hf(self.module, folder, max_shard_size)
            return
        # A forward-only pass (validation, samples) leaves ZeRO-3's prefetched parameters in flight on the GPU's
        # side stream, and gathering one of them fails ("Cannot partition a param in flight"): wait and release.
        self.engine.empty_partition_cache()
        state = {}
        seen = set()
        for prefix, mod in self.module.named_modules():
            params = [(n, p) for n, p in mod.named_parameters(recurse=False) if id(p) not in seen]
            if not params:
                continue
            seen.update(id(p) for _, p in params)
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                if self.env.is_main:
                    for n, p in params:
                        state[f"{prefix}.{n}" if prefix else n] = p.detach().to("cpu", copy=True)
        if self.env.is_main:
            save_hf(self.module, folder, max_shard_size, state_dict=state)


def apply_deepspeed(model, optimizer, env: DistEnv, ds_config: dict) -> DeepSpeedEngine:
    return DeepSpeedEngine(model, optimizer, env, ds_config)


def build(cfg, env: DistEnv, grad_accum: int, weights: str | None, config) -> DeepSpeedEngine:
    """ZeRO-3 builds (or loads) the model already partitioned, with random init drawn one gathered module at a time."""
    ds_config = load_ds_config(cfg, grad_accum, env.world_size, config.n_embd)
    prepare_deepspeed(ds_config, env.device)
    gather = None
    if ds_config["zero_optimization"]["stage"] == 3:
        import deepspeed

        gather = lambda ps: deepspeed.zero.GatheredParameters(ps, modifier_rank=0)  # noqa: E731
    model = build_model(cfg.model, weights_from=weights, seed=cfg.train.seed, gather=gather)
    if gather is None:
        pad_vocab(model, cfg.model.pad_vocab or 1)
    if cfg.model.compile:
        apply_compile(model)
    return apply_deepspeed(model, build_ds_optimizer(model, cfg.optim, ds_config, env.device), env, ds_config)


# Memory by DeepSpeed's own accounting (the formulas of estimate_zero2/3_model_states_mem_needs, held to them in
# tests/test_fastpaths.py), bytes per GPU for n parameters on G GPUs.
def zero2_states(s, gpus: int, precision: str, offload: bool, accumulating: bool) -> tuple[float, float]:
    """16-bit weights on every GPU; 16-bit and fp32 gradients, fp32 master weights and AdamW moments sharded: 2 + 18/G.
    LoRA: the frozen base is its 16-bit weights only."""
    n, t = s.n_params, s.train_params
    return (2 * n, 0.0) if offload else (2 * n + 12 * t / gpus, 6 * t / gpus)


def zero3_states(s, gpus: int, precision: str, offload: bool, accumulating: bool) -> tuple[float, float]:
    """4 x the largest layer gathered, the rest sharded: 18/G; with offload, parameters and states on the CPU. LoRA: the
    frozen base is its 16-bit partitions only."""
    n, t = s.n_params, s.train_params
    return (4 * s.largest_layer, 0.0) if offload else (4 * s.largest_layer + (2 * n + 12 * t) / gpus, 4 * t / gpus)


# The shipped configs reduce in fp32 under bf16 ("communication_data_type": "fp32", as DDP and FSDP do): ZeRO-2 casts
# each 200M-element reduce bucket to an fp32 copy while it reduces it (ZeRO-3's buckets are d x d: small).
ZERO2_FP32_BUCKET = 4 * 200_000_000


ZERO2_BUCKET = 200_000_000  # ds_configs/zero2.json: reduce_bucket_size and allgather_bucket_size, in elements
ZERO3_PERSIST, ZERO3_REUSE = 10, 1_000_000_000  # "auto" persistence threshold (x d), stage3_max_reuse_distance


def zero2_comm(s, gpus: int, accum: int, precision: str, offload: bool, reshard: bool) -> list[Traffic]:
    """ZeRO-2 reduces every micro-batch's gradients (it has no no_sync), in fp32 ("communication_data_type"),
    bucket by bucket during backward: DeepSpeed 0.19 all-reduces each bucket (use_multi_rank_bucket_allreduce) and
    keeps its partition. After the optimizer step every rank all-gathers the updated 16-bit parameters, with no
    compute to hide behind. Counted on the real engine by scripts/bench_comm.py."""
    if gpus == 1:
        return []
    n, width = s.n_params, 2 if precision == "bf16" else 4
    decayed = s.largest_layer + (n - s.largest_layer - s.n_layer * s.block_params - 2 * s.n_embd) + s.n_layer * 12 * s.n_embd**2
    gathers = sum(max(1, group // ZERO2_BUCKET) for group in (decayed, n - decayed))  # per optimizer param group
    t = s.train_params  # LoRA: only the adapter has gradients and updates
    if s.trainable is not None:
        gathers = 2
    return [Traffic("all_reduce", "gradients, fp32, every micro-batch", 4 * t * accum, "backward", accum, 4 * min(t, ZERO2_BUCKET),
                    -(-t // ZERO2_BUCKET) * accum),
            Traffic("all_gather", "updated parameters, after the step", width * t, "", calls=gathers)]


def zero3_split(s, reuse: int = ZERO3_REUSE) -> tuple[int, int]:
    """(parameters ZeRO-3 partitions, parameters it gathers again in backward). Tensors under the persistence threshold
    (10 d: biases and layer norms) stay whole on every rank. A gathered parameter is kept from its forward use to its
    backward use when fewer than `reuse` (stage3_max_reuse_distance) elements are fetched in between: about twice the
    blocks after it, plus the tied head. Once any block is gathered again, so are the embeddings (their backward
    comes last). Medium and smaller keep everything; Large gathers its first 12 blocks again, XL its first 33."""
    d, block = s.n_embd, 12 * s.n_embd**2
    partitioned = s.n_params - (s.n_layer * 13 * d + 2 * d)
    again = sum(block for i in range(s.n_layer) if 2 * block * (s.n_layer - 1 - i) + s.largest_layer >= reuse)
    if again:
        again += partitioned - s.n_layer * block
    return partitioned, again


def zero3_comm(s, gpus: int, accum: int, precision: str, offload: bool, reshard: bool, reuse: int = ZERO3_REUSE) -> list[Traffic]:
    """Every micro-batch: the partitioned 16-bit parameters all-gathered in forward (prefetched module by module) and
    those released since gathered again in backward; every fp32 gradient reduce-scattered in backward (the persistent
    ones too). After the step, the persistent parameters are gathered from their owners. The embedding is gathered
    first and reduced last: nothing to hide behind. Counted on the real engine by scripts/bench_comm.py (with the
    shipped reuse distance, and with 0: everything gathered twice)."""
    if gpus == 1:
        return []
    width, d = 2 if precision == "bf16" else 4, s.n_embd
    partitioned, again = zero3_split(s, reuse)
    modules = 2 + 4 * s.n_layer  # wte, wpe and each block's four projections hold partitioned weights: a fetch each
    # Gradients are reduce-scattered in reduce_bucket_size ("auto": d x d elements) buckets, in backward order.
    reduces = buckets(reversed(s.parameters()), d * d) * accum
    out = [Traffic("all_gather", "parameters, forward", width * partitioned * accum, "forward", accum, width * s.largest_layer,
                   modules * accum)]
    if again:  # an upper bound on its launches: DeepSpeed coalesces some of backward's prefetches
        share = again / partitioned
        out.append(Traffic("all_gather", "parameters, backward", width * again * accum, "backward", accum, 0.0,
                           max(1, round(modules * share)) * accum))
    if s.trainable is not None:  # LoRA: the adapter's gradients, in a bucket or two a micro-batch
        return out + [Traffic("reduce_scatter", "gradients, fp32, every micro-batch", 4 * s.trainable * accum, "backward", accum,
                              0.0, -(-s.trainable // (d * d)) * accum)]
    return out + [Traffic("reduce_scatter", "gradients, fp32, every micro-batch", 4 * s.n_params * accum, "backward", accum,
                          4 * s.largest_layer, reduces),
                  Traffic("all_gather", "persistent parameters, after the step", width * (s.n_params - partitioned), "")]


def checkpoint_bytes(precision: str, n: int, stage: int) -> tuple[int, int]:
    """DeepSpeed trains and exports 16-bit module weights under bf16. Its state: fp32 master weights and moments, and
    under ZeRO-2 the module weights again (ZeRO-3's module file holds none). Measured: XL ZeRO-2 bf16, 23.2 GiB."""
    weights = (2 if precision == "bf16" else 4) * n
    return weights, 12 * n + (weights if stage == 2 else 0)


def half(precision: str) -> str:
    return "fp32" if precision == "fp32" else "bf16"


ZERO2 = EngineSpec(build, needs_process_group=True, compile_by_default=False, can_pad_vocab=True, same_world_to_resume=False,
                   states=zero2_states, checkpoint_bytes=lambda precision, n: checkpoint_bytes(precision, n, 2), compute=half,
                   workspace=lambda s, gpus, precision: ZERO2_FP32_BUCKET if precision == "bf16" else 0.0, can_offload=True,
                   comm=zero2_comm,
                   help="DeepSpeed ZeRO-2 (ds_configs/zero2.json)")
# ZeRO-3 on one GPU has nothing to shard but still gathers and releases every parameter around every module: XL
# measured 8.6% MFU on an H200 (docs/benchmarks.md) against 49% for compiled DDP. It holds fp32 gradient-accumulation
# partitions and flat 16-bit copies beside the activations: 3.5 bytes per parameter per GPU (calibrated on an H200).
ZERO3 = EngineSpec(build, needs_process_group=True, compile_by_default=False, can_pad_vocab=False, same_world_to_resume=False,
                   states=zero3_states, checkpoint_bytes=lambda precision, n: checkpoint_bytes(precision, n, 3), compute=half,
                   workspace=lambda s, gpus, precision: 3.5 * s.n_params / gpus, can_offload=True, alone_mfu=0.086,
                   comm=zero3_comm,
                   help="DeepSpeed ZeRO-3 (ds_configs/zero3.json), built partitioned")
